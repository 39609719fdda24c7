"""
The address grammar of SMTP commands (RFC 5321 4.1.2): paths, parameters,
and the one spelling of an address the rest of mailauth compares.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Optional

from twisted.mail import smtp

from mailauth import replies

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL = rf'(?:{_ATOM}(?:\.{_ATOM})*|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*")'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*\.?|\[[0-9A-Fa-f:.]+\]|\[IPv6:[0-9A-Fa-f:.]+\])"
_PATH = re.compile(
    rf"<(?:@{_DOMAIN}(?:,@{_DOMAIN})*:)?(?P<mailbox>(?P<local>{_LOCAL})@(?P<domain>{_DOMAIN}))>"
)
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?")


def parsePath(text: str, allowNull: bool) -> Optional[smtp.Address]:
    """
    Parse an RFC 5321 reverse- or forward-path C{<...>}: source routes are
    dropped (RFC 5321 appendix C), a trailing dot of the domain is removed
    and the domain is lower-cased. Non-ASCII, unqualified addresses and
    anything after the closing bracket are refused.

    @return: the address, or L{None} for the null path C{<>}.
    @raise SMTPReply: 501 5.1.7/5.1.3 for a malformed path.
    """
    if text == "<>":
        if allowNull:
            return None
        raise replies.BAD_RECIPIENT_SYNTAX.error()
    m = _PATH.fullmatch(text)
    domain = m.group("domain").rstrip(".").lower() if m else ""
    if m is None or (domain.startswith("[") and not isAddressLiteral(domain)):
        if allowNull:
            raise replies.BAD_SENDER_SYNTAX.error()
        raise replies.BAD_RECIPIENT_SYNTAX.error()
    # smtp.Address's own tokenizer raises on address literals and on quoted
    # local parts holding an escaped quote, both valid here; the path is
    # validated already, so the Address is filled in directly.
    address = smtp.Address(b"")
    address.local = m.group("local").encode("ascii")
    address.domain = domain.encode("ascii")
    address.addrstr = address.local + b"@" + address.domain
    return address


def isAddressLiteral(domain: str) -> bool:
    """Whether C{[a.b.c.d]} or C{[ipv6:...]} (lower-cased) holds a valid address."""
    inner = domain[1:-1]
    try:
        if inner.startswith("ipv6:"):
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def splitArguments(arg: str, keyword: str) -> tuple[str, dict]:
    """
    Split C{FROM:<path> PARAM=VALUE...} into the path and its parameters.

    @raise SMTPReply: 501 for bad syntax, 555 for a repeated parameter.
    """
    if not arg.upper().startswith(keyword + ":"):
        raise replies.SYNTAX.error(usage=f"{keyword}:<address>")
    rest = arg[len(keyword) + 1 :].lstrip(" ")
    path, _, params = rest.partition(" ")
    options: dict = {}
    for word in params.split():
        m = _PARAM.fullmatch(word)
        if m is None:
            raise replies.BAD_PARAMETERS.error()
        name = m.group(1).upper()
        if name in options:
            raise replies.PARAMETER_TWICE.error(name=name)
        options[name] = m.group(2)
    return path, options


def addressText(address: Optional[smtp.Address]) -> str:
    """C{smtp.Address} to C{local@domain} text; C{""} for the null sender."""
    if address is None:
        return ""
    return f"{address.local.decode('ascii')}@{address.domain.decode('ascii')}"


def normalise(address: str) -> str:
    """Lower-case an address and drop a trailing dot of its domain."""
    return address.strip().lower().rstrip(".")
