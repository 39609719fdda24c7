"""
The address grammar of SMTP commands (RFC 5321 4.1.2, RFC 6531 3.3): paths,
parameters, and the one spelling of an address the rest of mailauth compares.

Every address has two spellings here. Its I{wire form} is what is stored,
relayed and logged: the local part exactly as the client meant it, with
quoting that was not needed dropped and quoted-pairs resolved (C{"carol"} and
C{"c\\arol"} are C{carol}, RFC 5321 4.1.2, RFC 5322 3.4.1), the domain
lower-cased, internationalised labels in their normalised U-label form.
Its I{key} (L{normalise}) is what is compared: the local part also NFC
normalised and lower-cased, and the domain in A-labels (IDNA2008 with the
UTS 46 mapping, the C{idna} package), so that C{bücher.example} and
C{xn--bcher-kva.example} are one domain for local domains, routing, aliases,
logins and sender binding.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from typing import Iterable, Optional

import attrs
import idna
from twisted.mail import smtp

from mailauth import replies

# RFC 5321 4.5.3.1.3: a path is at most 256 octets, brackets included.
MAX_PATH = 256
# RFC 1035 2.3.4: a domain label is at most 63 octets.
MAX_LABEL = 63
# RFC 3461 4.4 and 4.2: the longest ENVID and ORCPT values.
MAX_ENVID = 100
MAX_ORCPT = 500

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_UTF8 = r"\u0080-\U0010ffff"


def _grammar(utf8: bool) -> re.Pattern:
    """The path grammar of RFC 5321 4.1.2, extended by RFC 6531 3.3 when C{utf8}."""
    extra = _UTF8 if utf8 else ""
    atom = rf"[{_ATEXT}{extra}]+"
    quoted = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{extra}]|\\[\x20-\x7e])*"'
    local = rf"(?:{atom}(?:\.{atom})*|{quoted})"
    label = rf"[A-Za-z0-9{extra}](?:[A-Za-z0-9{extra}-]*[A-Za-z0-9{extra}])?"
    domain = rf"(?:{label}(?:\.{label})*\.?|\[[0-9A-Fa-f:.]+\]|\[IPv6:[0-9A-Fa-f:.]+\])"
    return re.compile(
        rf"<(?:@{domain}(?:,@{domain})*:)?(?P<local>{local})@(?P<domain>{domain})>",
        re.IGNORECASE,
    )


_PATH = _grammar(utf8=False)
_PATH_UTF8 = _grammar(utf8=True)
_DOT_STRING = re.compile(rf"[{_ATEXT}{_UTF8}]+(?:\.[{_ATEXT}{_UTF8}]+)*")
# esmtp-keyword ["=" esmtp-value] (RFC 5321 4.1.2), the value with UTF-8 (RFC 6531 3.3).
_PARAM = re.compile(rf"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e{_UTF8}]+))?")
#: The longest C{MAIL ... AUTH=} value: a mailbox (RFC 5321's 256
#: octets), each octet written as C{+XX} at worst.
MAX_AUTH_PARAMETER = 3 * 256

_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
# RFC 6533 3: QCHAR and EmbeddedUnicodeChar, and UTF-8 in the unitext form.
_QCHAR = r"\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e"
_EMBEDDED = r"\\x\{[0-9A-Fa-f]{2,6}\}"
_UTF8_ADDR_XTEXT = re.compile(rf"(?:[{_QCHAR}]|{_EMBEDDED})+")
_UTF8_ADDR_UNITEXT = re.compile(rf"(?:[{_QCHAR}{_UTF8}]|{_EMBEDDED})+")
_NOTIFY = frozenset(("SUCCESS", "FAILURE", "DELAY"))
# Unicode categories never allowed in a local part: controls, formats
# (bidi overrides), surrogates, private use, unassigned, separators.
_REFUSED_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"))
# Zero-width (non-)joiners are formats that scripts such as Persian need.
_JOINERS = frozenset(("\u200c", "\u200d"))


class Recipient(smtp.User):
    """
    A recipient as the session hands it to L{IMessageDelivery.validateTo}:
    twisted.mail's C{User}, with the parameters of its RCPT command and of
    the transaction's MAIL command.

    @ivar params: the L{RcptParameters}.
    @ivar mail: the L{MailParameters} of the transaction.
    """

    def __init__(
        self, destination, helo, protocol, orig, params: RcptParameters, mail: MailParameters
    ) -> None:
        super().__init__(destination, helo, protocol, orig)
        self.params = params
        self.mail = mail


@attrs.frozen
class MailParameters:
    """
    What the MAIL command asked for besides the sender.

    @ivar size: the declared size (RFC 1870), or L{None}.
    @ivar body: C{"7BIT"} or C{"8BITMIME"} (RFC 6152), or L{None}.
    @ivar smtputf8: the client gave C{SMTPUTF8} (RFC 6531): UTF-8 addresses
        and header fields may follow.
    @ivar ret: C{"FULL"} or C{"HDRS"} (RFC 3461 4.3), or L{None}.
    @ivar envid: the ENVID (RFC 3461 4.4) as the client sent it, in xtext.
    """

    size: Optional[int] = None
    body: Optional[str] = None
    smtputf8: bool = False
    ret: Optional[str] = None
    envid: Optional[str] = None


@attrs.frozen
class RcptParameters:
    """
    What a RCPT command asked for besides the recipient (RFC 3461).

    @ivar notify: L{None} when NOTIFY was not given; C{("NEVER",)}, or some
        of C{SUCCESS}, C{FAILURE}, C{DELAY} in that order.
    @ivar orcpt: the ORCPT as the client sent it (C{addr-type;xtext}), or
        L{None}.
    """

    notify: Optional[tuple] = None
    orcpt: Optional[str] = None


def splitArguments(arg: str, keyword: str) -> tuple[str, dict]:
    """
    Split C{FROM:<path> PARAM=VALUE...} into the path and its parameters.
    The path ends at the first C{>} outside a quoted string, so a quoted
    local part may hold spaces; a path with no end is returned whole, for
    L{parsePath} to refuse.

    @raise SMTPReply: 501 for bad syntax, 555 for a repeated parameter.
    """
    if not arg.upper().startswith(keyword + ":"):
        raise replies.SYNTAX.error(usage=f"{keyword}:<address>")
    rest = arg[len(keyword) + 1 :].lstrip(" ")
    end = _pathEnd(rest)
    if end is None:
        return rest, {}
    path, params = rest[:end], rest[end:]
    if params and not params.startswith(" "):
        return rest, {}
    options: dict = {}
    for word in params.split(" "):
        if not word:
            continue
        m = _PARAM.fullmatch(word)
        if m is None:
            raise replies.BAD_PARAMETERS.error()
        name = m.group(1).upper()
        if name in options:
            raise replies.PARAMETER_TWICE.error(name=replies.echo(name))
        options[name] = m.group(2)
    return path, options


def _pathEnd(text: str) -> Optional[int]:
    """The index after the path's closing C{>}, or L{None} if it has none."""
    if not text.startswith("<"):
        end = text.find(" ")
        return None if end < 0 else end
    quoted = escaped = False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return i + 1
    return None


def parsePath(text: str, allowNull: bool, utf8: bool = False) -> Optional[smtp.Address]:
    """
    Parse an RFC 5321 reverse- or forward-path C{<...>} into its wire form:
    source routes are dropped (RFC 5321 appendix C), quoting the local part
    does not need is removed, the domain is lower-cased without a trailing
    dot, and internationalised labels are checked (IDNA2008) and put in
    their normalised form. Unqualified addresses, general address literals
    and anything after the closing bracket are refused, and so is any
    address that could not be stored and relayed as it is: a local part
    holding spaces, angle brackets or control characters.

    @param allowNull: the null path C{<>} is allowed (MAIL, not RCPT).
    @param utf8: the transaction is SMTPUTF8 (RFC 6531): UTF-8 is allowed.
    @return: the address (C{local} and C{domain} in UTF-8), or L{None} for
        the null path.
    @raise SMTPReply: 501 5.1.7/5.1.3 for a malformed path, 553 5.6.7 for
        UTF-8 without SMTPUTF8, 553 5.1.7/5.1.3 for an address that cannot
        be relayed.
    """
    which = _Which(allowNull)
    if text == "<>":
        if allowNull:
            return None
        raise which.syntax
    if len(text.encode("utf-8")) > MAX_PATH:
        raise which.tooLong
    if not text.isascii() and not utf8:
        raise replies.NEEDS_SMTPUTF8.error()
    m = (_PATH_UTF8 if utf8 else _PATH).fullmatch(text)
    if m is None:
        raise which.syntax
    domain = _wireDomain(m.group("domain"))
    if domain is None:
        raise which.syntax
    local = unquote(m.group("local"))
    if not relayable(local):
        raise which.unrelayable
    address = smtp.Address(b"")
    address.local = quoteLocal(local).encode("utf-8")
    address.domain = domain.encode("utf-8")
    address.addrstr = address.local + b"@" + address.domain
    return address


class _Which:
    """
    The replies for a sender (C{allowNull}) or for a recipient, each made
    into its exception only when it is raised (most paths are good).
    """

    def __init__(self, sender: bool) -> None:
        self.sender = sender

    @property
    def syntax(self) -> Exception:
        return (replies.BAD_SENDER_SYNTAX if self.sender else replies.BAD_RECIPIENT_SYNTAX).error()

    @property
    def tooLong(self) -> Exception:
        return (replies.SENDER_TOO_LONG if self.sender else replies.RECIPIENT_TOO_LONG).error()

    @property
    def unrelayable(self) -> Exception:
        return (
            replies.SENDER_NOT_RELAYABLE if self.sender else replies.RECIPIENT_NOT_RELAYABLE
        ).error()


def _wireDomain(domain: str) -> Optional[str]:
    """
    The wire form of a domain as the grammar matched it, or L{None} if it
    is not a valid domain (a bad address literal, a bad IDNA label).
    """
    domain = domain.rstrip(".")
    if domain.startswith("["):
        domain = domain.lower()
        return domain if isAddressLiteral(domain) else None
    try:
        if domain.isascii():
            domain = domain.lower()
            if any(len(label) > MAX_LABEL for label in domain.split(".")):
                # No such name can exist (RFC 1035 2.3.4), nor be relayed;
                # IDNA refuses a U-label as long for the same reason.
                return None
            if "xn--" in domain:
                # A-labels must decode (RFC 5890 2.3.2.1).
                idna.decode(domain)
            return domain
        return idna.decode(idna.encode(domain, uts46=True))
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


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


def unquote(local: str) -> str:
    """The mailbox name a local part stands for: quotes removed, quoted-pairs resolved."""
    if not (local.startswith('"') and local.endswith('"') and len(local) >= 2):
        return local
    return re.sub(r"\\(.)", r"\1", local[1:-1], flags=re.DOTALL)


def quoteLocal(name: str) -> str:
    """
    The shortest local part for the mailbox name C{name}: a dot-string if
    it is one, else a quoted string escaping only C{"} and C{\\}.
    """
    if _DOT_STRING.fullmatch(name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def relayable(name: str) -> bool:
    """
    Whether the mailbox name C{name} (unquoted) can be stored in the queue
    and sent on in a MAIL or RCPT command whatever the next server's
    parser: no spaces, no angle brackets, no control, format or unassigned
    characters.
    """
    for char in name:
        if char in " <>" or char < " " or char == "\x7f":
            return False
        if ord(char) > 127 and char not in _JOINERS:
            if unicodedata.category(char) in _REFUSED_CATEGORIES:
                return False
    return True


def addressText(address: Optional[smtp.Address]) -> str:
    """C{smtp.Address} to C{local@domain} text; C{""} for the null sender."""
    if address is None:
        return ""
    return f"{address.local.decode('utf-8')}@{address.domain.decode('utf-8')}"


def domainKey(domain: str) -> str:
    """
    The form in which domains are compared: lower case, no trailing dot,
    internationalised labels as A-labels. A domain that IDNA refuses is
    compared lower-cased as it is.
    """
    domain = domain.strip().rstrip(".")
    if domain.isascii():
        return domain.lower()
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return domain.lower()


def normalise(address: str) -> str:
    """
    The key of an address, in which two spellings of one mailbox are equal:
    the local part unquoted, NFC-normalised and lower-cased (then quoted
    again only if it must be), the domain as L{domainKey} makes it. Never
    raises: it is applied to addresses from files as well (aliases, the
    sender map, logins), and an C{@domain} key keeps its empty local part.
    Remembered for the last 1024 addresses of at most 256 characters: each
    message asks it of the same few about seven times (sender, login,
    recipient, aliases); a flood of long logins is not kept.
    """
    if len(address) > 256:
        return _normalise(address)
    return _normaliseShort(address)


@functools.lru_cache(maxsize=1024)
def _normaliseShort(address: str) -> str:
    return _normalise(address)


def _normalise(address: str) -> str:
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at:
        return domainKey(address) if address.startswith("@") else address.lower().rstrip(".")
    name = unicodedata.normalize("NFC", unquote(local)).lower()
    return (quoteLocal(name) if name else "") + "@" + domainKey(domain)


def asciiAddress(address: str) -> Optional[str]:
    """
    C{address} (wire form) with its domain in A-labels, for a server that
    does not offer SMTPUTF8; L{None} if its local part is not ASCII, so
    that it cannot be sent there at all (RFC 6531 3.2).
    """
    local, _, domain = address.rpartition("@")
    if not local.isascii():
        return None
    return f"{local}@{domainKey(domain)}" if domain else address


def parseMailParameters(options: dict, maxSize: int) -> MailParameters:
    """
    Check the parameters of a MAIL command.

    @param options: upper-case name to value (L{None} for none).
    @param maxSize: the size limit, for C{SIZE=}.
    @raise SMTPReply: 501 for a malformed value, 552 for a size over the
        limit, 555 for an unknown parameter.
    """
    values: dict = {}
    for name, value in options.items():
        if name == "SIZE":
            if value is None or not value.isdigit() or not value.isascii() or len(value) > 20:
                raise replies.SYNTAX.error(usage="SIZE=<number>")
            if int(value) > maxSize:
                raise replies.TOO_BIG.error()
            values["size"] = int(value)
        elif name == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise replies.SYNTAX.error(usage="BODY=7BIT or BODY=8BITMIME")
            values["body"] = value.upper()
        elif name == "SMTPUTF8":
            if value is not None:
                raise replies.SYNTAX.error(usage="SMTPUTF8 (without a value)")
            values["smtputf8"] = True
        elif name == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise replies.SYNTAX.error(usage="RET=FULL or RET=HDRS")
            values["ret"] = value.upper()
        elif name == "ENVID":
            if value is None or len(value) > MAX_ENVID or not isXtext(value):
                raise replies.SYNTAX.error(usage="ENVID=<xtext of at most 100 characters>")
            values["envid"] = value
        elif name == "AUTH":
            # RFC 4954 section 5: accepted, and ignored, as Postfix does once
            # it has checked it is xtext ("<>" is).
            if not value or len(value) > MAX_AUTH_PARAMETER or not isXtext(value):
                raise replies.SYNTAX.error(usage="AUTH=<xtext>")
        else:
            raise replies.UNSUPPORTED_PARAMETER.error(name=replies.echo(name))
    return MailParameters(**values)


def parseRcptParameters(options: dict, smtputf8: bool) -> RcptParameters:
    """
    Check the parameters of a RCPT command (RFC 3461 4.1, 4.2).

    @param smtputf8: the transaction is SMTPUTF8, so ORCPT may be of the
        C{utf-8} address type (RFC 6533 3).
    @raise SMTPReply: 501 for a malformed value, 555 for an unknown one.
    """
    values: dict = {}
    for name, value in options.items():
        if name == "NOTIFY":
            words = (value or "").upper().split(",")
            if words == ["NEVER"]:
                values["notify"] = ("NEVER",)
            elif not value or len(set(words)) != len(words) or not set(words) <= _NOTIFY:
                raise replies.SYNTAX.error(usage="NOTIFY=NEVER or NOTIFY=SUCCESS,FAILURE,DELAY")
            else:
                values["notify"] = tuple(w for w in ("SUCCESS", "FAILURE", "DELAY") if w in words)
        elif name == "ORCPT":
            if value is None or len(value) > MAX_ORCPT or not _validOrcpt(value, smtputf8):
                raise replies.SYNTAX.error(usage="ORCPT=rfc822;<xtext address>")
            values["orcpt"] = value
        else:
            raise replies.UNSUPPORTED_PARAMETER.error(name=replies.echo(name))
    return RcptParameters(**values)


def _validOrcpt(value: str, smtputf8: bool) -> bool:
    kind, semicolon, address = value.partition(";")
    if not semicolon or not address or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", kind):
        return False
    if kind.lower() == "utf-8":
        # RFC 6533 3: utf-8-addr-xtext, or utf-8-addr-unitext once SMTPUTF8.
        pattern = _UTF8_ADDR_UNITEXT if smtputf8 else _UTF8_ADDR_XTEXT
        return pattern.fullmatch(address) is not None
    return address.isascii() and isXtext(address)


def isXtext(value: str) -> bool:
    """Whether C{value} is RFC 3461 xtext (C{+XX} escapes, nothing else special)."""
    return _XTEXT.fullmatch(value) is not None


def decodeXtext(value: str) -> str:
    """
    The text an xtext value (RFC 3461 4), or an RFC 6533 utf-8-addr-xtext
    or -unitext value, stands for; bytes that are not UTF-8 are replaced.
    """
    out = bytearray()
    for m in re.finditer(r"\+([0-9A-Fa-f]{2})|\\x\{([0-9A-Fa-f]{1,6})\}|(.)", value, re.DOTALL):
        if m.group(1):
            out.append(int(m.group(1), 16))
        elif m.group(2):
            code = int(m.group(2), 16)
            out += chr(code).encode("utf-8", "replace") if code < 0x110000 else b"?"
        else:
            out += m.group(3).encode("utf-8", "surrogatepass")
    return out.decode("utf-8", "replace")


def orcptFor(address: str) -> str:
    """
    An ORCPT value naming C{address} (RFC 3461 4.2): C{rfc822;} with xtext
    for an ASCII address, C{utf-8;} with utf-8-addr-unitext otherwise (RFC
    6533 3).
    """
    if address.isascii():
        return "rfc822;" + encodeXtext(address)
    return "utf-8;" + "".join(
        c if (c > "~" or ("!" <= c <= "~" and c not in "+=\\")) else f"\\x{{{ord(c):X}}}"
        for c in address
    )


def encodeXtext(text: str) -> str:
    """C{text} as xtext: C{+}, C{=} and characters outside C{!}..C{~} escaped."""
    out = []
    for char in text:
        if "!" <= char <= "~" and char not in "+=":
            out.append(char)
        else:
            out.extend(f"+{byte:02X}" for byte in char.encode("utf-8"))
    return "".join(out)


def withoutComment(line: str) -> str:
    """
    A line of a map file (C{aliases}, C{sender_map}, C{[limits] overrides})
    without its comment: a C{#} at its start, after white space or after a
    comma starts one; a C{#} inside an address (a local part may hold one,
    RFC 5321's C{atext}) is the address's.
    """
    return re.split(r"(?:^|(?<=[\s,]))#", line, maxsplit=1)[0]


def hashInDomain(words: Iterable[str]) -> Optional[str]:
    """
    What is wrong with the first of C{words} (the addresses of a map file's
    line, after L{withoutComment}) with a C{#} in its domain, where none
    can be: a comment written without white space before it
    (C{b@y.org#old}), which the line's reader reports rather than take it
    for part of an address; L{None} if none has one.
    """
    for word in words:
        if "#" in word.rpartition("@")[2]:
            return f"{word!r}: a '#' in a domain; a comment needs white space before its '#'"
    return None
