"""
The visible sender: the addresses of a message's C{From:} and C{Sender:}
header fields, read with the standard library's RFC 5322 parser, so that
submission can refuse a message whose From: names someone the login may
not send as (C{[delivery] header_from_match}).
"""

from __future__ import annotations

import email.policy
from email.parser import BytesParser

from mailauth.addresses import normalise

#: The header section is collected up to this many bytes; a longer one
#: cannot be checked (no real message has 256 KiB of header fields).
MAX_HEADER = 256 * 1024

_PARSER = BytesParser(policy=email.policy.SMTP)


class UncheckableHeader(Exception):
    """A From: or Sender: field that names no address that could be checked."""


class HeaderSection:
    """
    Collects the header section of a message as it streams past (canonical
    SMTP chunks, split anywhere), keeping at most L{MAX_HEADER} bytes.

    @ivar complete: the empty line that ends the header section was seen.
    @ivar tooLong: the header section is longer than L{MAX_HEADER}.
    """

    def __init__(self) -> None:
        self._data = bytearray()
        self.complete = False
        self.tooLong = False

    def write(self, chunk: bytes) -> None:
        if self.complete or self.tooLong:
            return
        start = max(len(self._data) - 3, 0)
        self._data += chunk
        end = self._data.find(b"\r\n\r\n", start)
        if end >= 0:
            del self._data[end + 2 :]
            self.complete = True
        elif self._data.startswith(b"\r\n"):
            # No header fields at all: the body starts at once.
            del self._data[:]
            self.complete = True
        elif len(self._data) > MAX_HEADER:
            self.tooLong = True
            del self._data[:]

    def value(self) -> bytes:
        """The header fields seen, each line ending with CRLF."""
        return bytes(self._data)


def senderAddresses(header: bytes) -> tuple:
    """
    Every address of the C{From:} and C{Sender:} fields of C{header}, in
    the one spelling the rest of mailauth compares (quoting that is not
    needed dropped, lower-cased, no trailing dot): groups are expanded,
    display names and comments (where an address may hide) are ignored,
    encoded words are decoded and then never taken for an address.

    @return: the addresses, in order; C{()} when there is no such field.
    @raise UncheckableHeader: for a field that names no mailbox or cannot be
        parsed as one, since such a field could not be checked.
    """
    message = _PARSER.parsebytes(header, headersonly=True)
    found = []
    for name in ("From", "Sender"):
        try:
            fields = message.get_all(name) or ()
        except Exception as e:
            # The library's header parser raises on some malformed input.
            raise UncheckableHeader(f"the {name}: field cannot be parsed ({e!r})") from None
        for field in fields:
            addresses = getattr(field, "addresses", ())
            if getattr(field, "defects", ()) or not addresses:
                raise UncheckableHeader(f"the {name}: field names no address that can be checked")
            for address in addresses:
                if not address.username or not address.domain:
                    raise UncheckableHeader(f"{name}: {address.addr_spec!r} is not an address")
                found.append(normalise(f"{_localPart(address.username)}@{address.domain}"))
    return tuple(dict.fromkeys(found))


def _localPart(username: str) -> str:
    """The local part as an envelope address spells it: quoted only when it must be."""
    atext = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
    dotAtom = all(part and set(part) <= atext for part in username.split("."))
    if dotAtom or not username.isascii():
        return username
    return '"' + username.replace("\\", "\\\\").replace('"', '\\"') + '"'
