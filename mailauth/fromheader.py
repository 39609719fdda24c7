"""
The visible sender: the addresses of a message's C{From:} and C{Sender:}
header fields, read with the standard library's RFC 5322 parser, so that
submission can refuse a message whose From: names someone the login may
not send as (C{[delivery] header_from_match}).
"""

from __future__ import annotations

import email.errors
import email.policy
from email.parser import Parser

from mailauth.addresses import normalise

#: The header section is collected up to this many bytes; a longer one
#: cannot be checked (no real message has 256 KiB of header fields).
MAX_HEADER = 256 * 1024

_PARSER = Parser(policy=email.policy.SMTP)


class UncheckableHeader(Exception):
    """A From: or Sender: field that names no address that could be checked."""


class HeaderSection:
    """
    Collects the header section of a message as it streams past (canonical
    SMTP chunks, split anywhere), keeping at most C{limit} bytes, and tells
    which bytes of each chunk are the body: the one copy of the header
    block that the C{From:} check and the DKIM signer read.

    The header section ends at the first empty line, as RFC 5322 2.1 and
    DKIM (RFC 6376 5.4) read it; a message without one is all header.

    @ivar complete: the empty line that ends the header section was seen.
    @ivar tooLong: the header section is longer than C{limit}; only its
        first C{limit} bytes are kept (for a delivery report's copy of the
        header, cut at a line end), not to be checked nor signed.
    """

    def __init__(self, limit: int = MAX_HEADER) -> None:
        self._data = bytearray()
        self._limit = limit
        self.complete = False
        self.tooLong = False

    def write(self, chunk: bytes) -> bytes:
        """
        Take the next chunk of the message.

        @return: the part of C{chunk} that belongs to the body (after the
            empty line), C{b""} while the header section goes on or once
            it is too long.
        """
        if self.complete:
            return chunk
        if self.tooLong:
            return b""
        start = max(len(self._data) - 3, 0)
        self._data += chunk
        if self._data.startswith(b"\r\n"):
            # No header fields at all: the body starts after this CRLF.
            end, body = 0, 2
        else:
            end = self._data.find(b"\r\n\r\n", start)
            if end < 0:
                if len(self._data) > self._limit:
                    self._giveUp()
                return b""
            end, body = end + 2, end + 4
        if end > self._limit:
            self._giveUp()
            return b""
        rest = bytes(self._data[body:])
        del self._data[end:]
        self.complete = True
        return rest

    def _giveUp(self) -> None:
        self.tooLong = True
        del self._data[self._limit :]

    def value(self) -> bytes:
        """
        The header fields seen (all of them once L{complete}), each line
        ending with CRLF, without the empty line; the first C{limit} bytes
        if L{tooLong}.
        """
        return bytes(self._data)


def senderAddresses(header: bytes) -> tuple:
    """
    Every address of the C{From:} and C{Sender:} fields of C{header}, in
    the one spelling the rest of mailauth compares (quoting that is not
    needed dropped, lower-cased, no trailing dot): groups are expanded,
    display names and comments (where an address may hide) are ignored,
    encoded words are decoded and then never taken for an address. The
    header is read as UTF-8 (RFC 6532: internationalised messages may
    carry UTF-8 in display names and addresses).

    @return: the addresses, in order; C{()} when there is no such field.
    @raise UncheckableHeader: for a field that names no mailbox or cannot be
        parsed as one, and for a header section the parser would read only
        in part (a line in it that is neither a field nor the continuation
        of one, after which a C{From:} would be hidden from the check but
        maybe not from a mail reader), since such a field could not be
        checked.
    """
    message = _PARSER.parsestr(header.decode("utf-8", "surrogateescape"), headersonly=True)
    if message.defects or message.get_payload():
        # A line the parser stopped at (the rest became the "body") or
        # skipped: what a mail reader makes of it is anybody's guess.
        raise UncheckableHeader("the header section holds a line that is not a header field")
    found = []
    for name in ("From", "Sender"):
        try:
            fields = message.get_all(name) or ()
        except Exception as e:
            # The library's header parser raises on some malformed input.
            raise UncheckableHeader(f"the {name}: field cannot be parsed ({e!r})") from None
        for field in fields:
            addresses = getattr(field, "addresses", ())
            defects = [
                d
                for d in getattr(field, "defects", ())
                if not isinstance(d, email.errors.NonASCIILocalPartDefect)
            ]
            if defects or not addresses:
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
