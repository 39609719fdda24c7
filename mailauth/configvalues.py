"""
The value parsers of the configuration: sizes, durations, domains,
endpoints of URLs and the like, each turning one INI value into a typed
value or raising L{ValueError} with a sentence that says what is wrong.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Callable
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


@attrs.frozen
class MailServer:
    """An IMAP or POP3 server that client autoconfiguration names for reading mail."""

    protocol: str
    hostname: str
    port: int
    tls: str


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


def choiceOf(options: tuple) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"{text!r} is not one of: {', '.join(options)}")
        return value

    return parse


def nonEmpty(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def parseUsers(text: str) -> str:
    """The users file's path, or a PostgreSQL URI (C{postgresql://...}) checked for form."""
    value = nonEmpty(text)
    return checkURI(value) if isPostgreSQL(value) else value


def parseMechanisms(text: str) -> tuple:
    names = tuple(text.upper().split())
    if not names:
        raise ValueError("name at least one mechanism")
    unknown = [n for n in names if n not in KNOWN_MECHANISMS]
    if unknown:
        raise ValueError(
            f"unknown mechanism {' '.join(unknown)} (known: {' '.join(KNOWN_MECHANISMS)})"
        )
    return names


def parseNetworks(text: str) -> tuple:
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


def parseDomains(text: str) -> frozenset:
    """Domain names, internationalised ones in A-labels (the form addresses compare in)."""
    from mailauth.addresses import domainKey

    return frozenset(parseDomain(domainKey(d)) for d in text.replace(",", " ").split())


def parseAddress(text: str) -> str:
    """C{local@domain}, lower-cased: an address mail can be routed to."""
    value = text.strip().lower().rstrip(".")
    local, at, domain = value.rpartition("@")
    if not at or not local or not re.fullmatch(r"[\x21-\x7e]+", local) or not domain:
        raise ValueError(f"{text.strip()!r} is not an address (local@domain)")
    try:
        parseDomains(domain)
    except ValueError:
        raise ValueError(
            f"{text.strip()!r} is not an address: {domain!r} is not a domain name"
        ) from None
    return value


def parseMaildirTemplate(text: str) -> str:
    value = nonEmpty(text)
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


def parseHostname(text: str) -> str:
    value = nonEmpty(text).rstrip(".").lower()
    if len(value) > 253 or not HOSTNAME.fullmatch(value):
        raise ValueError(f"{text.strip()!r} is not a host name")
    return value


def parseLabel(text: str) -> str:
    value = nonEmpty(text)
    if not value.isprintable():
        raise ValueError(f"{value!r} has control characters")
    return value


def parsePorts(text: str) -> tuple:
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


def parseIncoming(text: str) -> tuple:
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
        servers.append(MailServer(protocol, parseHostname(m.group(2)), port, tls))
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


def parseStateBackend(text: str) -> str:
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


def parseClaim(text: str) -> str:
    """A JWT claim name: printable, no white space."""
    value = nonEmpty(text)
    if not value.isprintable() or re.search(r"\s", value):
        raise ValueError(f"{value!r} is not a claim name")
    return value


_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def parseIntrospectionURL(text: str) -> str:
    """
    An https:// URL; http:// only to this machine, since the request carries
    the token and the client secret.
    """
    value = nonEmpty(text)
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{value!r} is not an https:// URL")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        raise ValueError(
            f"{value!r}: use https:// (the request carries the token and the "
            "client secret); http:// only to localhost"
        )
    if not value.isascii():
        raise ValueError(f"{value!r}: write the URL in ASCII (punycode, %-escapes)")
    return value


def parsePositiveDuration(text: str) -> float:
    value = parseDuration(text)
    if value <= 0:
        raise ValueError(f"{text!r} must be more than 0")
    return value
