"""The INI configuration file, read into frozen value objects and fully validated."""

from __future__ import annotations

import configparser
import importlib.util
import ipaddress
import re
import socket
from types import MappingProxyType
from typing import Callable, Iterable, Mapping, Optional
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import attrs

from mailauth.pgusers import checkURI, isPostgreSQL

TLS_MODES = ("starttls", "implicit", "none")
AUTH_MODES = ("required", "optional", "none")
PROXY_MODES = ("no", "v1", "v2", "any")
KNOWN_MECHANISMS = (
    "PLAIN",
    "LOGIN",
    "SCRAM-SHA-256",
    "SCRAM-SHA-256-PLUS",
    "SCRAM-SHA-1",
    "SCRAM-SHA-1-PLUS",
    "CRAM-MD5",
    "OAUTHBEARER",
    "XOAUTH2",
)
# The mechanisms that take OAuth 2.0 bearer tokens: they need [oauth].
OAUTH_MECHANISMS = ("OAUTHBEARER", "XOAUTH2")


class ConfigError(Exception):
    """
    The configuration is wrong; C{problems} holds one line per problem, each
    naming the file, the section and the key.
    """

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


@attrs.frozen
class ServerConfig:
    hostname: str
    state_dir: str
    max_message_size: int
    max_recipients: int
    max_connections: int
    max_connections_per_address: int
    timeout: float
    data_timeout: float
    max_errors: int
    auth_threads: int
    disk_threads: int
    # The whole of one DATA, however slowly it trickles in.
    max_data_time: float = 1800.0
    # text (twistd's lines) or json (one object a line, mailauth.logs).
    log_format: str = "text"


@attrs.frozen
class TLSConfig:
    certificate: str
    private_key: str


@attrs.frozen
class ListenerConfig:
    name: str
    endpoint: str
    tls: str
    auth: str
    proxy_protocol: str = "no"
    trusted_proxies: tuple = ()
    proxy_timeout: float = 10.0


@attrs.frozen
class AuthConfig:
    mechanisms: tuple
    users: str
    plaintext_requires_tls: bool
    failure_window: float
    max_failures_per_address: int
    max_failures_per_login: int
    tarpit_delay: float
    block_time: float
    max_tracked: int
    failures_per_session: int
    password_min_length: int
    breached_passwords: Optional[str]
    rehash: bool = False


@attrs.frozen
class DeliveryConfig:
    local_domains: frozenset
    maildir: str
    aliases: Optional[str]
    sender_map: Optional[str]
    sender_login_match: bool
    # Where postmaster@ each local domain and <Postmaster> go, when no user
    # or alias of that exact address takes them.
    postmaster: Optional[str] = None


@attrs.frozen
class LimitsConfig:
    """C{[limits]}: sending limits per authenticated login (0: none)."""

    messages_per_hour: int = 0
    recipients_per_hour: int = 0
    messages_per_day: int = 0
    recipients_per_day: int = 0
    suspend_after: int = 0
    overrides: Optional[str] = None


@attrs.frozen
class RelayConfig:
    host: str
    port: int
    tls: str
    username: Optional[str]
    password_file: Optional[str]
    ca_file: Optional[str]
    verify_certificate: bool
    retry_initial: float
    retry_max: float
    expire: float
    max_connections: int
    timeout: float
    queue_interval: float
    delay_warning: float = 4 * 3600.0


@attrs.frozen
class MailServer:
    """An IMAP or POP3 server that client autoconfiguration names for reading mail."""

    protocol: str
    hostname: str
    port: int
    tls: str


@attrs.frozen
class AutoconfigConfig:
    """
    The optional C{[autoconfig]} section, defaults resolved: C{hostname}
    from C{[server]}, C{display_name} from the local domains.
    """

    endpoint: str
    hostname: str
    display_name: str
    ports: tuple
    incoming: tuple


@attrs.frozen
class MetricsConfig:
    endpoint: str


@attrs.frozen
class OAuthConfig:
    """
    The optional C{[oauth]} section: who issues the tokens OAUTHBEARER and
    XOAUTH2 accept, where its keys are, and how to ask about opaque tokens.
    """

    issuer: str
    audience: str
    jwks: Optional[str]
    login_claim: str
    introspection_url: Optional[str]
    introspection_client_id: Optional[str]
    introspection_secret_file: Optional[str]
    introspection_timeout: float
    leeway: float


@attrs.frozen
class StateConfig:
    backend: str
    prefix: str
    timeout: float


@attrs.frozen
class DKIMKeyConfig:
    """One signing key of a domain, its public half published at C{selector._domainkey.domain}."""

    selector: str
    keyfile: str


@attrs.frozen
class Config:
    path: str
    server: ServerConfig
    tls: Optional[TLSConfig]
    listeners: tuple
    auth: AuthConfig
    delivery: DeliveryConfig
    relay: Optional[RelayConfig]
    state: StateConfig
    autoconfig: Optional[AutoconfigConfig] = None
    metrics: Optional[MetricsConfig] = None
    #: [dkim]: signing domain -> its keys (a tuple of L{DKIMKeyConfig}), read-only.
    dkim: Mapping[str, tuple] = MappingProxyType({})
    oauth: Optional[OAuthConfig] = None
    limits: LimitsConfig = LimitsConfig()


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parseSize(text: str) -> int:
    """
    Parse C{"35M"}, C{"512K"}, C{"1G"} or a plain byte count.

    @raise ValueError: if C{text} is not such a size.
    """
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r} is not a size (a number with an optional K, M or G)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


def parseDuration(text: str) -> float:
    """
    Parse C{"30s"}, C{"5m"}, C{"1h"}, C{"5d"} or a plain number of seconds.

    @raise ValueError: if C{text} is not such a duration.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (a number with an optional s, m, h or d)")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def parseBool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"{text!r} is not yes or no")


def parseInt(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise ValueError(f"{text!r} must not be negative")
    return value


def parsePositive(text: str) -> int:
    value = parseInt(text)
    if value < 1:
        raise ValueError(f"{text!r} must be at least 1")
    return value


def parsePort(text: str) -> int:
    value = parseInt(text)
    if not 0 < value < 65536:
        raise ValueError(f"{text!r} is not a port number")
    return value


def _choice(options: tuple) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"{text!r} is not one of: {', '.join(options)}")
        return value

    return parse


def _text(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _users(text: str) -> str:
    """The users file's path, or a PostgreSQL URI (C{postgresql://...}) checked for form."""
    value = _text(text)
    return checkURI(value) if isPostgreSQL(value) else value


def _mechanisms(text: str) -> tuple:
    names = tuple(text.upper().split())
    if not names:
        raise ValueError("name at least one mechanism")
    unknown = [n for n in names if n not in KNOWN_MECHANISMS]
    if unknown:
        raise ValueError(
            f"unknown mechanism {' '.join(unknown)} (known: {' '.join(KNOWN_MECHANISMS)})"
        )
    return names


def _networks(text: str) -> tuple:
    """C{"127.0.0.1 10.0.0.0/8 2001:db8::/32"}: addresses and networks, IPv4 and IPv6."""
    networks = []
    for word in text.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(word))
        except ValueError as e:
            raise ValueError(f"{word!r} is not an IP address or network ({e})") from None
    if not networks:
        raise ValueError("name at least one address or network")
    return tuple(networks)


def parseDomain(text: str) -> str:
    """
    A domain name, lower-cased, without a trailing dot.

    @raise ValueError: if C{text} is not one (letters, digits and hyphens;
        labels of at most 63 characters).
    """
    domain = text.strip().lower().rstrip(".")
    if not HOSTNAME.fullmatch(domain) or len(domain) > 253:
        raise ValueError(f"{domain!r} is not a domain name")
    return domain


def parseSelector(text: str) -> str:
    """
    A DKIM selector (RFC 6376 3.1: dot-separated labels of letters, digits
    and hyphens), lower-cased.

    @raise ValueError: if C{text} is not one.
    """
    selector = text.strip().lower()
    if not HOSTNAME.fullmatch(selector):
        raise ValueError(
            f"{selector!r} is not a DKIM selector (letters, digits, hyphens, dot-separated)"
        )
    return selector


def _domains(text: str) -> frozenset:
    """Domain names, internationalised ones in A-labels (the form addresses compare in)."""
    from mailauth.addresses import domainKey

    return frozenset(parseDomain(domainKey(d)) for d in text.replace(",", " ").split())


def _address(text: str) -> str:
    """C{local@domain}, lower-cased: an address mail can be routed to."""
    value = text.strip().lower().rstrip(".")
    local, at, domain = value.rpartition("@")
    if not at or not local or not re.fullmatch(r"[\x21-\x7e]+", local) or not domain:
        raise ValueError(f"{text.strip()!r} is not an address (local@domain)")
    try:
        _domains(domain)
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not an address: {domain!r} is not a domain "
                         "name") from None
    return value


def _maildirTemplate(text: str) -> str:
    value = _text(text)
    try:
        value.format(domain="d", localpart="l", user="u@d")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"{value!r}: only {{domain}}, {{localpart}} and {{user}} may be used ({e})"
        ) from None
    if "{localpart}" not in value and "{user}" not in value:
        raise ValueError("must contain {localpart} or {user}, or every user shares one Maildir")
    return value


# A host name as mail clients check it (Thunderbird's isLegalHostName).
HOSTNAME = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.I
)

# Incoming servers by URL scheme: (protocol, tls, default port).
_INCOMING_SCHEMES = {
    "imaps": ("imap", "implicit", 993),
    "imap": ("imap", "starttls", 143),
    "pop3s": ("pop3", "implicit", 995),
    "pop3": ("pop3", "starttls", 110),
}


def _hostname(text: str) -> str:
    value = _text(text).rstrip(".").lower()
    if len(value) > 253 or not HOSTNAME.fullmatch(value):
        raise ValueError(f"{text.strip()!r} is not a host name")
    return value


def _label(text: str) -> str:
    value = _text(text)
    if not value.isprintable():
        raise ValueError(f"{value!r} has control characters")
    return value


def _ports(text: str) -> tuple:
    """C{"submission:587 submissions:465"} to C{(("submission", 587), ...)}."""
    pairs = []
    for item in text.replace(",", " ").split():
        name, colon, port = item.rpartition(":")
        if not colon or not name:
            raise ValueError(f"{item!r} is not LISTENER:PORT (e.g. submission:587)")
        pairs.append((name, parsePort(port)))
    if not pairs:
        raise ValueError("must not be empty")
    return tuple(pairs)


def _incoming(text: str) -> tuple:
    """
    C{"imaps://imap.example.org"} and the like to L{MailServer}s: imaps and
    pop3s are implicit TLS, imap and pop3 STARTTLS (never plain text).
    """
    servers = []
    for item in text.replace(",", " ").split():
        m = re.fullmatch(r"([a-z0-9]+)://([^/:]+)(?::([^/]*))?/?", item, re.I)
        if not m or m.group(1).lower() not in _INCOMING_SCHEMES:
            raise ValueError(
                f"{item!r} is not imaps://HOST[:PORT], imap://, pop3s:// or pop3:// "
                "(imap:// and pop3:// mean STARTTLS)"
            )
        protocol, tls, port = _INCOMING_SCHEMES[m.group(1).lower()]
        if m.group(3) is not None:
            port = parsePort(m.group(3))
        servers.append(MailServer(protocol, _hostname(m.group(2)), port, tls))
    if not servers:
        raise ValueError("must not be empty")
    return tuple(servers)
def redactURL(url: str) -> str:
    """C{url} with its password, if any, replaced by C{***}: fit for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{name}:***@{host}"))


def _stateBackend(text: str) -> str:
    """
    C{memory}, or a Redis URL of the forms redis-py's C{from_url} reads:
    C{redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]}, the same with
    C{rediss://} (TLS), or C{unix://[[USER]:PASSWORD@]/PATH[?db=DB]}.
    """
    value = text.strip()
    if value.lower() == "memory":
        return "memory"
    parts = urlsplit(value)
    shown = redactURL(value)
    scheme = parts.scheme.lower()
    if scheme in ("redis", "rediss"):
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError(f"{shown!r}: the port is not a number from 1 to 65535")
        if not parts.hostname:
            raise ValueError(f"{shown!r}: name the Redis host, as in {scheme}://HOST:6379/0")
        if not re.fullmatch(r"/?|/\d+", parts.path):
            raise ValueError(f"{shown!r}: the path must be a database number, as in /0")
    elif scheme == "unix":
        if parts.hostname or not parts.path.startswith("/"):
            raise ValueError(
                f"{shown!r}: name the socket's absolute path, as in "
                "unix:///run/redis/redis-server.sock"
            )
    else:
        raise ValueError(
            f"{shown!r} is not memory or a redis://HOST:6379/0, rediss:// or unix:///PATH URL"
        )
    if parts.query:
        try:
            query = dict(parse_qsl(parts.query, strict_parsing=True))
        except ValueError:
            raise ValueError(f"{shown!r}: the query must be NAME=VALUE pairs joined by &") from None
        if not query.get("db", "0").isdigit():
            raise ValueError(f"{shown!r}: db= must be a database number")
    return value


def _claim(text: str) -> str:
    """A JWT claim name: printable, no white space."""
    value = _text(text)
    if not value.isprintable() or re.search(r"\s", value):
        raise ValueError(f"{value!r} is not a claim name")
    return value


_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def _introspectionURL(text: str) -> str:
    """
    An https:// URL; http:// only to this machine, since the request carries
    the token and the client secret.
    """
    value = _text(text)
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{value!r} is not an https:// URL")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        raise ValueError(f"{value!r}: use https:// (the request carries the token and the "
                         "client secret); http:// only to localhost")
    if not value.isascii():
        raise ValueError(f"{value!r}: write the URL in ASCII (punycode, %-escapes)")
    return value


def _positiveDuration(text: str) -> float:
    value = parseDuration(text)
    if value <= 0:
        raise ValueError(f"{text!r} must be more than 0")
    return value


# Every section, its keys, and for each key (parser, default). A default of
# REQUIRED means the key must be given.
REQUIRED = object()

_SCHEMA: dict = {
    "server": {
        "hostname": (_text, None),
        "state_dir": (_text, "/var/lib/mailauth"),
        "max_message_size": (parseSize, "35M"),
        "max_recipients": (parsePositive, "100"),
        "max_connections": (parsePositive, "500"),
        "max_connections_per_address": (parsePositive, "20"),
        "timeout": (parseDuration, "5m"),
        "data_timeout": (parseDuration, "10m"),
        "max_data_time": (_positiveDuration, "30m"),
        "max_errors": (parsePositive, "10"),
        "auth_threads": (parsePositive, "4"),
        "disk_threads": (parsePositive, "4"),
        "log_format": (_choice(("text", "json")), "text"),
    },
    "tls": {
        "certificate": (_text, REQUIRED),
        "private_key": (_text, REQUIRED),
    },
    "listener": {
        "endpoint": (_text, REQUIRED),
        "tls": (_choice(TLS_MODES), "starttls"),
        "auth": (_choice(AUTH_MODES), "required"),
        "proxy_protocol": (_choice(PROXY_MODES), "no"),
        "trusted_proxies": (_networks, None),
        "proxy_timeout": (parseDuration, "10s"),
    },
    "auth": {
        "mechanisms": (_mechanisms, "PLAIN LOGIN"),
        "users": (_users, REQUIRED),
        "plaintext_requires_tls": (parseBool, "yes"),
        "failure_window": (parseDuration, "15m"),
        "max_failures_per_address": (parsePositive, "10"),
        "max_failures_per_login": (parsePositive, "5"),
        "tarpit_delay": (parseDuration, "2s"),
        "block_time": (parseDuration, "15m"),
        "max_tracked": (parsePositive, "10000"),
        "failures_per_session": (parsePositive, "3"),
        "password_min_length": (parseInt, "8"),
        "breached_passwords": (_text, None),
        "rehash": (parseBool, "no"),
    },
    "delivery": {
        "local_domains": (_domains, REQUIRED),
        "maildir": (_maildirTemplate, REQUIRED),
        "aliases": (_text, None),
        "sender_map": (_text, None),
        "sender_login_match": (parseBool, "yes"),
        "postmaster": (_address, None),
    },
    "limits": {
        "messages_per_hour": (parseInt, "0"),
        "recipients_per_hour": (parseInt, "0"),
        "messages_per_day": (parseInt, "0"),
        "recipients_per_day": (parseInt, "0"),
        "suspend_after": (parseInt, "0"),
        "overrides": (_text, None),
    },
    "relay": {
        "host": (_text, REQUIRED),
        "port": (parsePort, "587"),
        "tls": (_choice(TLS_MODES), "starttls"),
        "username": (_text, None),
        "password_file": (_text, None),
        "ca_file": (_text, None),
        "verify_certificate": (parseBool, "yes"),
        "retry_initial": (parseDuration, "1m"),
        "retry_max": (parseDuration, "1h"),
        "expire": (parseDuration, "5d"),
        "max_connections": (parsePositive, "2"),
        "timeout": (parseDuration, "5m"),
        "queue_interval": (parseDuration, "30s"),
        "delay_warning": (parseDuration, "4h"),
    },
    "autoconfig": {
        "endpoint": (_text, REQUIRED),
        "hostname": (_hostname, None),
        "display_name": (_label, None),
        "ports": (_ports, None),
        "incoming": (_incoming, None),
    },
    "metrics": {
        "endpoint": (_text, REQUIRED),
    },
    "oauth": {
        "issuer": (_text, REQUIRED),
        "audience": (_text, REQUIRED),
        "jwks": (_text, None),
        "login_claim": (_claim, "email"),
        "introspection_url": (_introspectionURL, None),
        "introspection_client_id": (_text, None),
        "introspection_secret_file": (_text, None),
        "introspection_timeout": (_positiveDuration, "10s"),
        "leeway": (parseDuration, "1m"),
    },
    "state": {
        "backend": (_stateBackend, "memory"),
        "prefix": (_text, "mailauth:"),
        "timeout": (_positiveDuration, "1s"),
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
            if not name[len("listener:"):].strip():
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
    if (delivery is not None and delivery["postmaster"] and delivery["local_domains"]
            and delivery["postmaster"].rpartition("@")[2] not in delivery["local_domains"]
            and relay is None):
        r.problem("delivery", "postmaster", f"{delivery['postmaster']} is in another domain "
                  "and there is no [relay] to forward to it")
    limits = r.section("limits", "limits")
    if relay is not None and relay["username"] and not relay["password_file"]:
        r.problem("relay", "password_file", "missing: username is set, so a password is needed")
    metrics = r.section("metrics", "metrics") if parser.has_section("metrics") else None
    if metrics is not None:
        _checkMetrics(r, metrics["endpoint"])

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
        r.problem("auth", "mechanisms", f"{' '.join(wanted)} needs an [oauth] section "
                  "(issuer, audience, and jwks or introspection_url)")
    if oauth is None:
        return
    if not r.parser.has_option("oauth", "jwks") and not r.parser.has_option(
        "oauth", "introspection_url"
    ):
        r.problem("oauth", None, "set jwks (the issuer's public keys, a JWKS file) or "
                  "introspection_url (RFC 7662), or both: nothing could check a token")
    if r.parser.has_option("oauth", "introspection_url"):
        for key in ("introspection_client_id", "introspection_secret_file"):
            if not r.parser.has_option("oauth", key):
                r.problem("oauth", key, "missing: introspection_url needs the client to call "
                          "it as (introspection_client_id and introspection_secret_file)")
    if importlib.util.find_spec("jwt") is None:
        r.problem("oauth", None, "needs the Python package PyJWT (Debian: apt install "
                  "python3-jwt; pip: pip install 'mailauth[oauth]')")


def _autoconfig(r: _Reader, parser: configparser.ConfigParser, server: dict, listeners: list,
                auth: Optional[dict], delivery: Optional[dict]) -> Optional[AutoconfigConfig]:
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
        r.problem("autoconfig", None, "no listener has tls = starttls or implicit and auth = "
                  "required or optional: there is nothing to advertise")
    names = {listener.name for listener in listeners}
    ports = dict(values["ports"] or ())
    for name in ports:
        if name not in names:
            r.problem("autoconfig", "ports", f"there is no [listener:{name}]")
        elif name not in {listener.name for listener in shown}:
            r.problem("autoconfig", "ports", f"[listener:{name}] is not advertised "
                      "(it needs tls = starttls or implicit and auth = required or optional)")
    for listener in shown:
        if listener.name not in ports and not endpointPort(listener.endpoint):
            r.problem("autoconfig", "ports", f"[listener:{listener.name}] endpoint "
                      f"{listener.endpoint!r} names no port clients can reach: "
                      f"add {listener.name}:PORT")
    if auth is not None and auth["mechanisms"] and not authenticationMethods(auth["mechanisms"]):
        r.problem("autoconfig", None, f"none of the [auth] mechanisms "
                  f"({' '.join(auth['mechanisms'])}) is one mail clients can be told to use "
                  "(PLAIN or LOGIN, CRAM-MD5, OAUTHBEARER or XOAUTH2)")

    hostname = values["hostname"]
    if hostname is None and "hostname" not in parser["autoconfig"]:
        hostname = server["hostname"]
        if hostname is not None and not HOSTNAME.fullmatch(hostname.rstrip(".")):
            r.problem("autoconfig", "hostname", f"the [server] hostname {hostname!r} is not a "
                      "host name mail clients accept: set the public one here")
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
            r.problem("metrics", "endpoint",
                      f"{endpoint!r}: not for metrics (SIGHUP would not reload its "
                      "certificate); listen on 127.0.0.1 or behind a TLS proxy")
        else:
            _checkEndpoint(r, "metrics", endpoint)
    if importlib.util.find_spec("prometheus_client") is None:
        r.problem("metrics", None,
                  "needs the Python package prometheus_client (Debian: apt install "
                  "python3-prometheus-client; pip: pip install 'mailauth[metrics]')")


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
        r.problem(section, "trusted_proxies",
                  f"missing: proxy_protocol = {values['proxy_protocol']} needs the addresses "
                  "of the proxies allowed to send the header")
    endpoint = values["endpoint"] or ""
    if endpoint.split(":", 1)[0].lower() == "unix":
        r.problem(section, "proxy_protocol",
                  f"{endpoint!r}: a unix: endpoint has no client address to check against "
                  "trusted_proxies; use tcp:")


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
        r.problem("dkim", None, "needs the Python package dkimpy (Debian: apt install "
                  "python3-dkim; pip: pip install 'mailauth[dkim]')")
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
        r.problem(section, "endpoint",
                  f"{description!r}: haproxy: endpoints are not supported; use a tcp: endpoint "
                  "with proxy_protocol = v1 | v2 | any and trusted_proxies")
    elif kind in ("ssl", "tls"):
        instead = ("a tcp: endpoint with tls = implicit" if section.startswith("listener:")
                   else "a tcp: endpoint behind a web server that does TLS")
        r.problem(section, "endpoint", f"{description!r}: use {instead} instead of {kind}:")
    elif kind not in known:
        r.problem(section, "endpoint", f"{description!r}: unknown endpoint type {kind!r}")


def load(path: str) -> Config:
    """
    Read and validate the configuration file at C{path}.

    @raise ConfigError: if it cannot be read or is wrong in any way.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text: {e}"]) from None
    return loadText(text, path)
