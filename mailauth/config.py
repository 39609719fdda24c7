"""The INI configuration file, read into frozen value objects and fully validated."""

from __future__ import annotations

import configparser
import importlib.util
import re
import socket
from types import MappingProxyType
from typing import Optional

from mailauth.configtypes import (  # noqa: F401 (re-exported: what loadText returns)
    AuthConfig,
    AutoconfigConfig,
    Config,
    ConfigError,
    DeliveryConfig,
    DKIMKeyConfig,
    LimitsConfig,
    ListenerConfig,
    MetricsConfig,
    OAuthConfig,
    RelayConfig,
    ServerConfig,
    StateConfig,
    TLSConfig,
)
from mailauth.configvalues import (  # noqa: F401 (re-exported: the values of a Config)
    AUTH_MODES,
    HOSTNAME,
    KNOWN_MECHANISMS,
    OAUTH_MECHANISMS,
    PROXY_MODES,
    TLS_MODES,
    MailServer,
    choiceOf,
    nonEmpty,
    parseAddress,
    parseBool,
    parseClaim,
    parseDomain,
    parseDomains,
    parseDuration,
    parseHostname,
    parseIncoming,
    parseInt,
    parseIntrospectionURL,
    parseLabel,
    parseMaildirTemplate,
    parseMechanisms,
    parseNetworks,
    parsePort,
    parsePorts,
    parsePositive,
    parsePositiveDuration,
    parseSelector,
    parseSize,
    parseStateBackend,
    parseUsers,
    redactURL,
)

# Every section, its keys, and for each key (parser, default). A default of
# REQUIRED means the key must be given.
REQUIRED = object()

_SCHEMA: dict = {
    "server": {
        "hostname": (nonEmpty, None),
        "state_dir": (nonEmpty, "/var/lib/mailauth"),
        "max_message_size": (parseSize, "35M"),
        "max_recipients": (parsePositive, "100"),
        "max_connections": (parsePositive, "500"),
        "max_connections_per_address": (parsePositive, "20"),
        "timeout": (parsePositiveDuration, "5m"),
        "data_timeout": (parsePositiveDuration, "10m"),
        "max_data_time": (parsePositiveDuration, "30m"),
        "max_errors": (parsePositive, "10"),
        "junk_command_limit": (parsePositive, "100"),
        "auth_threads": (parsePositive, "4"),
        "disk_threads": (parsePositive, "4"),
        "log_format": (choiceOf(("text", "json")), "text"),
        "workers": (parsePositive, "1"),
        "worker_timeout": (parseDuration, "30s"),
    },
    "tls": {
        "certificate": (nonEmpty, REQUIRED),
        "private_key": (nonEmpty, REQUIRED),
    },
    "listener": {
        "endpoint": (nonEmpty, REQUIRED),
        "tls": (choiceOf(TLS_MODES), "starttls"),
        "auth": (choiceOf(AUTH_MODES), "required"),
        "proxy_protocol": (choiceOf(PROXY_MODES), "no"),
        "trusted_proxies": (parseNetworks, None),
        "proxy_timeout": (parseDuration, "10s"),
    },
    "auth": {
        "mechanisms": (parseMechanisms, "PLAIN LOGIN"),
        "users": (parseUsers, REQUIRED),
        "plaintext_requires_tls": (parseBool, "yes"),
        "failure_window": (parseDuration, "15m"),
        "max_failures_per_address": (parsePositive, "10"),
        "max_failures_per_login": (parsePositive, "5"),
        "tarpit_delay": (parseDuration, "2s"),
        "block_time": (parseDuration, "15m"),
        "max_tracked": (parsePositive, "10000"),
        "failures_per_session": (parsePositive, "3"),
        "password_min_length": (parseInt, "8"),
        "breached_passwords": (nonEmpty, None),
        "rehash": (parseBool, "no"),
    },
    "delivery": {
        "local_domains": (parseDomains, REQUIRED),
        "maildir": (parseMaildirTemplate, REQUIRED),
        "aliases": (nonEmpty, None),
        "sender_map": (nonEmpty, None),
        "sender_login_match": (parseBool, "yes"),
        "postmaster": (parseAddress, None),
        "header_from_match": (parseBool, "no"),
    },
    "limits": {
        "messages_per_hour": (parseInt, "0"),
        "recipients_per_hour": (parseInt, "0"),
        "messages_per_day": (parseInt, "0"),
        "recipients_per_day": (parseInt, "0"),
        "suspend_after": (parseInt, "0"),
        "overrides": (nonEmpty, None),
    },
    "relay": {
        "host": (nonEmpty, REQUIRED),
        "port": (parsePort, "587"),
        "tls": (choiceOf(TLS_MODES), "starttls"),
        "username": (nonEmpty, None),
        "password_file": (nonEmpty, None),
        "ca_file": (nonEmpty, None),
        "verify_certificate": (parseBool, "yes"),
        "retry_initial": (parsePositiveDuration, "1m"),
        "retry_max": (parsePositiveDuration, "1h"),
        "expire": (parseDuration, "5d"),
        "max_connections": (parsePositive, "2"),
        "timeout": (parsePositiveDuration, "5m"),
        "queue_interval": (parsePositiveDuration, "30s"),
        "delay_warning": (parseDuration, "4h"),
    },
    "autoconfig": {
        "endpoint": (nonEmpty, REQUIRED),
        "hostname": (parseHostname, None),
        "display_name": (parseLabel, None),
        "ports": (parsePorts, None),
        "incoming": (parseIncoming, None),
    },
    "metrics": {
        "endpoint": (nonEmpty, REQUIRED),
    },
    "oauth": {
        "issuer": (nonEmpty, REQUIRED),
        "audience": (nonEmpty, REQUIRED),
        "jwks": (nonEmpty, None),
        "login_claim": (parseClaim, "email"),
        "introspection_url": (parseIntrospectionURL, None),
        "introspection_client_id": (nonEmpty, None),
        "introspection_secret_file": (nonEmpty, None),
        "introspection_timeout": (parsePositiveDuration, "10s"),
        "leeway": (parseDuration, "1m"),
    },
    "state": {
        "backend": (parseStateBackend, "memory"),
        "prefix": (nonEmpty, "mailauth:"),
        "timeout": (parsePositiveDuration, "1s"),
    },
}


class _Reader:
    """Collects problems while reading typed values out of a ConfigParser."""

    def __init__(self, path: str, parser: configparser.ConfigParser) -> None:
        self.path = path
        self.parser = parser
        self.problems: list[str] = []

    def problem(self, section: str, key: Optional[str], message: str) -> None:
        where = f"[{section}]" if key is None else f"[{section}] {key}"
        self.problems.append(f"{self.path}: {where}: {message}")

    def section(self, name: str, kind: str) -> dict:
        """
        Read every key of section C{name} by the schema of C{kind}; unknown
        keys and bad values are problems, and come back as C{None}.
        """
        schema = _SCHEMA[kind]
        raw = self.parser[name] if self.parser.has_section(name) else {}
        for key in raw:
            if key not in schema:
                self.problem(name, key, f"unknown key (known: {', '.join(sorted(schema))})")
        values: dict = {}
        for key, (parse, default) in schema.items():
            text = raw.get(key) if key in raw else default
            if text is REQUIRED:
                self.problem(name, key, "missing (this key is required)")
                values[key] = None
            elif text is None:
                values[key] = None
            else:
                try:
                    values[key] = parse(text)
                except ValueError as e:
                    self.problem(name, key, str(e))
                    values[key] = None
        return values


def loadText(text: str, path: str = "<string>") -> Config:
    """
    Parse and validate configuration C{text}.

    @raise ConfigError: naming every problem found, not only the first.
    """
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(";", "#"), empty_lines_in_values=False
    )
    try:
        parser.read_string(text, source=path)
    except configparser.Error as e:
        raise ConfigError([f"{path}: {' '.join(str(e).split())}"]) from None

    r = _Reader(path, parser)
    listenerNames = []
    for name in parser.sections():
        if name.startswith("listener:"):
            if not name[len("listener:") :].strip():
                r.problem(name, None, "a listener section needs a name after the colon")
            listenerNames.append(name)
        elif name == "dkim":
            continue
        elif name not in _SCHEMA or name == "listener":
            known = ", ".join(f"[{s}]" for s in _SCHEMA if s != "listener")
            r.problem(name, None, f"unknown section (known: {known}, [dkim], [listener:NAME])")

    for required in ("auth", "delivery"):
        if not parser.has_section(required):
            r.problem(required, None, "missing section")
    if not listenerNames:
        r.problems.append(f"{path}: no [listener:NAME] section: nothing would listen")

    server = r.section("server", "server")
    if server["hostname"] is None and "hostname" not in (
        parser["server"] if parser.has_section("server") else {}
    ):
        server["hostname"] = socket.gethostname()
    hostname = server["hostname"]
    if hostname is not None and not re.fullmatch(r"[A-Za-z0-9.-]+", hostname):
        r.problem("server", "hostname", f"{hostname!r} is not a host name")

    listeners = []
    for name in listenerNames:
        values = r.section(name, "listener")
        _checkProxy(r, name, values)
        listeners.append(ListenerConfig(name=name.split(":", 1)[1].strip(), **values))
        if values["endpoint"]:
            _checkEndpoint(r, name, values["endpoint"])
    usesTLS = any(listener.tls in ("starttls", "implicit") for listener in listeners)

    tls = None
    if parser.has_section("tls"):
        tls = TLSConfig(**r.section("tls", "tls"))
    elif usesTLS:
        r.problem("tls", None, "missing section: a listener uses TLS, so a certificate is needed")

    auth = r.section("auth", "auth") if parser.has_section("auth") else None
    delivery = r.section("delivery", "delivery") if parser.has_section("delivery") else None
    relay = r.section("relay", "relay") if parser.has_section("relay") else None
    state = r.section("state", "state")
    if (
        delivery is not None
        and delivery["postmaster"]
        and delivery["local_domains"]
        and delivery["postmaster"].rpartition("@")[2] not in delivery["local_domains"]
        and relay is None
    ):
        r.problem(
            "delivery",
            "postmaster",
            f"{delivery['postmaster']} is in another domain "
            "and there is no [relay] to forward to it",
        )
    limits = r.section("limits", "limits")
    if relay is not None and relay["username"] and not relay["password_file"]:
        r.problem("relay", "password_file", "missing: username is set, so a password is needed")
    metrics = r.section("metrics", "metrics") if parser.has_section("metrics") else None
    if metrics is not None:
        _checkMetrics(r, metrics["endpoint"])
    _checkWorkers(r, server["workers"], state["backend"])

    oauth = r.section("oauth", "oauth") if parser.has_section("oauth") else None
    _checkOAuth(r, auth, oauth)

    autoconfig = None
    if parser.has_section("autoconfig"):
        autoconfig = _autoconfig(r, parser, server, listeners, auth, delivery)
    dkim = _dkimSection(r) if parser.has_section("dkim") else {}

    if r.problems:
        raise ConfigError(r.problems)
    assert auth is not None and delivery is not None
    return Config(
        path=path,
        server=ServerConfig(**server),
        tls=tls,
        listeners=tuple(listeners),
        auth=AuthConfig(**auth),
        delivery=DeliveryConfig(**delivery),
        relay=RelayConfig(**relay) if relay is not None else None,
        autoconfig=autoconfig,
        metrics=MetricsConfig(**metrics) if metrics is not None else None,
        state=StateConfig(**state),
        limits=LimitsConfig(**limits),
        dkim=MappingProxyType(dkim),
        oauth=OAuthConfig(**oauth) if oauth is not None else None,
    )


def _checkOAuth(r: _Reader, auth: Optional[dict], oauth: Optional[dict]) -> None:
    """
    OAUTHBEARER and XOAUTH2 need [oauth]; [oauth] needs a way to check
    tokens (the issuer's keys, or its introspection endpoint and the client
    to call it as), and PyJWT for the keys.
    """
    mechanisms = (auth or {}).get("mechanisms") or ()
    wanted = [m for m in mechanisms if m in OAUTH_MECHANISMS]
    if wanted and oauth is None:
        r.problem(
            "auth",
            "mechanisms",
            f"{' '.join(wanted)} needs an [oauth] section "
            "(issuer, audience, and jwks or introspection_url)",
        )
    if oauth is None:
        return
    if not r.parser.has_option("oauth", "jwks") and not r.parser.has_option(
        "oauth", "introspection_url"
    ):
        r.problem(
            "oauth",
            None,
            "set jwks (the issuer's public keys, a JWKS file) or "
            "introspection_url (RFC 7662), or both: nothing could check a token",
        )
    if r.parser.has_option("oauth", "introspection_url"):
        for key in ("introspection_client_id", "introspection_secret_file"):
            if not r.parser.has_option("oauth", key):
                r.problem(
                    "oauth",
                    key,
                    "missing: introspection_url needs the client to call "
                    "it as (introspection_client_id and introspection_secret_file)",
                )
    if importlib.util.find_spec("jwt") is None:
        r.problem(
            "oauth",
            None,
            "needs the Python package PyJWT (Debian: apt install "
            "python3-jwt; pip: pip install 'mailauth[oauth]')",
        )


def _autoconfig(
    r: _Reader,
    parser: configparser.ConfigParser,
    server: dict,
    listeners: list,
    auth: Optional[dict],
    delivery: Optional[dict],
) -> Optional[AutoconfigConfig]:
    """
    Read C{[autoconfig]} and check it against the listeners: every listener
    it advertises needs a port clients can reach, and the mechanisms must
    name at least one way in that clients understand.
    """
    from mailauth.autoconfig import advertised, authenticationMethods

    values = r.section("autoconfig", "autoconfig")
    if values["endpoint"]:
        _checkEndpoint(r, "autoconfig", values["endpoint"])
    shown = advertised(listeners)
    if not shown:
        r.problem(
            "autoconfig",
            None,
            "no listener has tls = starttls or implicit and auth = "
            "required or optional: there is nothing to advertise",
        )
    names = {listener.name for listener in listeners}
    ports = dict(values["ports"] or ())
    for name in ports:
        if name not in names:
            r.problem("autoconfig", "ports", f"there is no [listener:{name}]")
        elif name not in {listener.name for listener in shown}:
            r.problem(
                "autoconfig",
                "ports",
                f"[listener:{name}] is not advertised "
                "(it needs tls = starttls or implicit and auth = required or optional)",
            )
    for listener in shown:
        if listener.name not in ports and not endpointPort(listener.endpoint):
            r.problem(
                "autoconfig",
                "ports",
                f"[listener:{listener.name}] endpoint "
                f"{listener.endpoint!r} names no port clients can reach: "
                f"add {listener.name}:PORT",
            )
    if auth is not None and auth["mechanisms"] and not authenticationMethods(auth["mechanisms"]):
        r.problem(
            "autoconfig",
            None,
            f"none of the [auth] mechanisms "
            f"({' '.join(auth['mechanisms'])}) is one mail clients can be told to use "
            "(PLAIN or LOGIN, CRAM-MD5, OAUTHBEARER or XOAUTH2)",
        )

    hostname = values["hostname"]
    if hostname is None and "hostname" not in parser["autoconfig"]:
        hostname = server["hostname"]
        if hostname is not None and not HOSTNAME.fullmatch(hostname.rstrip(".")):
            r.problem(
                "autoconfig",
                "hostname",
                f"the [server] hostname {hostname!r} is not a "
                "host name mail clients accept: set the public one here",
            )
    display = values["display_name"]
    if display is None and "display_name" not in parser["autoconfig"]:
        domains = delivery["local_domains"] if delivery is not None else None
        display = sorted(domains)[0] if domains else hostname
    if None in (values["endpoint"], hostname, display):
        return None
    return AutoconfigConfig(
        endpoint=values["endpoint"],
        hostname=hostname.rstrip(".").lower(),
        display_name=display,
        ports=tuple(sorted(ports.items())),
        incoming=values["incoming"] or (),
    )


def endpointPort(description: str) -> Optional[int]:
    """
    The TCP port a C{tcp:} or C{tcp6:} server endpoint string binds, or
    L{None} when it names none a client could use (port 0, C{unix:},
    C{systemd:}).
    """
    kind, _, rest = description.partition(":")
    if kind.lower() not in ("tcp", "tcp6"):
        return None
    args = re.split(r"(?<!\\):", rest)
    keywords = dict(a.split("=", 1) for a in args if "=" in a)
    positional = [a for a in args if "=" not in a]
    port = keywords.get("port", positional[0] if positional else "")
    try:
        value = int(port)
    except ValueError:
        return None
    return value if 0 < value < 65536 else None


def _checkMetrics(r: _Reader, endpoint: Optional[str]) -> None:
    """The [metrics] endpoint is an endpoint, and prometheus_client can be imported."""
    if endpoint:
        if endpoint.split(":", 1)[0].lower() in ("ssl", "tls"):
            r.problem(
                "metrics",
                "endpoint",
                f"{endpoint!r}: not for metrics (SIGHUP would not reload its "
                "certificate); listen on 127.0.0.1 or behind a TLS proxy",
            )
        else:
            _checkEndpoint(r, "metrics", endpoint)
    if importlib.util.find_spec("prometheus_client") is None:
        r.problem(
            "metrics",
            None,
            "needs the Python package prometheus_client (Debian: apt install "
            "python3-prometheus-client; pip: pip install 'mailauth[metrics]')",
        )


def _checkProxy(r: _Reader, section: str, values: dict) -> None:
    """
    A listener behind a PROXY-protocol proxy must say which proxies to
    believe: a header from anyone else would let them choose the client
    address that limits, throttling and logs see.
    """
    if values["proxy_timeout"] is not None and values["proxy_timeout"] <= 0:
        r.problem(section, "proxy_timeout", "must be more than 0")
    if values["proxy_protocol"] in (None, "no"):
        values["trusted_proxies"] = values["trusted_proxies"] or ()
        return
    if not r.parser.has_option(section, "trusted_proxies"):
        r.problem(
            section,
            "trusted_proxies",
            f"missing: proxy_protocol = {values['proxy_protocol']} needs the addresses "
            "of the proxies allowed to send the header",
        )
    endpoint = values["endpoint"] or ""
    if endpoint.split(":", 1)[0].lower() == "unix":
        r.problem(
            section,
            "proxy_protocol",
            f"{endpoint!r}: a unix: endpoint has no client address to check against "
            "trusted_proxies; use tcp:",
        )


def _checkWorkers(r: _Reader, workers: Optional[int], backend: Optional[str]) -> None:
    """
    Several worker processes need the state they would otherwise each keep
    apart in one place: the throttle counters in a shared backend.
    """
    if workers is None or workers == 1:
        return
    if backend == "memory":
        r.problem(
            "server",
            "workers",
            f"{workers} processes would each keep their own throttle counters with "
            "[state] backend = memory: set backend = redis://HOST:6379/0, or workers = 1",
        )


def _dkimSection(r: _Reader) -> dict:
    """
    Read [dkim], whose keys are the signing domains, not names from the
    schema: C{domain = selector:keyfile}, or several C{selector:keyfile}
    separated by spaces to sign with each (an RSA and an Ed25519 key). Only
    the syntax is checked here; L{mailauth.dkimsign.loadKeys} reads the keys.
    """
    keys: dict = {}
    for key, text in r.parser["dkim"].items():
        try:
            domain = parseDomain(key)
        except ValueError as e:
            r.problem("dkim", key, f"{e}: each key in [dkim] is a signing domain")
            continue
        if domain in keys:
            r.problem("dkim", key, f"{domain} is listed twice")
            continue
        entries: list = []
        problems = len(r.problems)
        for item in text.split():
            selector, colon, keyfile = item.partition(":")
            if not colon or not selector or not keyfile:
                r.problem("dkim", key, f"{item!r} is not selector:keyfile")
                continue
            try:
                selector = parseSelector(selector)
            except ValueError as e:
                r.problem("dkim", key, str(e))
                continue
            if any(entry.selector == selector for entry in entries):
                r.problem("dkim", key, f"selector {selector} is listed twice")
            entries.append(DKIMKeyConfig(selector=selector, keyfile=keyfile))
        if not entries and len(r.problems) == problems:
            r.problem("dkim", key, "missing selector:keyfile")
        keys[domain] = tuple(entries)
    if keys and importlib.util.find_spec("dkim") is None:
        r.problem(
            "dkim",
            None,
            "needs the Python package dkimpy (Debian: apt install "
            "python3-dkim; pip: pip install 'mailauth[dkim]')",
        )
    return keys


def _checkEndpoint(r: _Reader, section: str, description: str) -> None:
    """
    Reject endpoint strings whose type Twisted does not know, or which carry
    their own TLS: mailauth wraps TLS itself so it can enforce TLS 1.2 and
    reload certificates.
    """
    from twisted.internet import endpoints
    from twisted.plugin import getPlugins

    kind = description.split(":", 1)[0].lower()
    known = {"tcp", "tcp6", "unix", "systemd"} | {
        p.prefix.lower() for p in getPlugins(endpoints.IStreamServerEndpointStringParser)
    }
    if kind == "haproxy":
        # Twisted's PROXY-protocol wrapper calls connectionMade before the
        # header is read and trusts any source (D32 in docs/twisted-defects.rst):
        # mailauth reads the header itself (mailauth.proxy).
        r.problem(
            section,
            "endpoint",
            f"{description!r}: haproxy: endpoints are not supported; use a tcp: endpoint "
            "with proxy_protocol = v1 | v2 | any and trusted_proxies",
        )
    elif kind in ("ssl", "tls"):
        instead = (
            "a tcp: endpoint with tls = implicit"
            if section.startswith("listener:")
            else "a tcp: endpoint behind a web server that does TLS"
        )
        r.problem(section, "endpoint", f"{description!r}: use {instead} instead of {kind}:")
    elif kind not in known:
        r.problem(section, "endpoint", f"{description!r}: unknown endpoint type {kind!r}")


def load(path: str) -> Config:
    """
    Read and validate the configuration file at C{path}.

    @raise ConfigError: if it cannot be read or is wrong in any way.
    """
    try:
        # utf-8-sig: a byte-order mark an editor put first is not text.
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text: {e}"]) from None
    return loadText(text, path)
