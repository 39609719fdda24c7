"""
Submission's fixes to a message's header section (RFC 6409 8.2 and 8.3),
made as the message streams: a missing C{Date:} or C{Message-ID:} is added.
"""

from __future__ import annotations

import re
from typing import Callable

# How much of a message is held, at most, while its header section is read.
HEADER_HOLD = 65536
# A header field's first line: a field name (printable, no colon; a space
# before the colon is tolerated, as Postfix does), then a colon.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


class HeaderCompleter:
    """
    Passes a message (CRLF line ends, in chunks) on to C{write}, adding the
    fields in C{missing} that its header section lacks.

    The start of the message is held back until the header section is
    known to be over: at its first empty line, or at the first line that is
    neither a header field nor the continuation of one (where a mail reader
    would start the body). The missing fields are added there, at the end
    of the header section, as Postfix's cleanup adds them. A header section
    longer than L{HEADER_HOLD} is passed on unchanged, without holding more
    of it: what the rest holds cannot be known before the bytes must move
    on, and memory per session stays bounded.

    @param write: takes the message on.
    @param missing: field name (lower case) to the whole field (CRLF
        ended), each added if the message has no field of that name.
    """

    def __init__(self, write: Callable[[bytes], None], missing: dict[bytes, bytes]) -> None:
        self._write = write
        self._missing = dict(missing)
        self._held = bytearray()
        # Where the next unread line of the held bytes starts.
        self._line = 0
        self._inField = False
        self.done = False
        self.added: list[bytes] = []

    def write(self, chunk: bytes) -> None:
        """Take C{chunk}; pass on what is known to need no change."""
        if self.done:
            self._write(chunk)
            return
        self._held += chunk
        while not self.done:
            end = self._held.find(b"\r\n", self._line)
            if end < 0:
                break
            line = bytes(self._held[self._line : end])
            if line[:1] in (b" ", b"\t") and self._inField:
                pass
            else:
                field = _FIELD.match(line)
                if field is None:
                    # An empty line, or the body begun without one.
                    self._complete(self._line)
                    return
                self._missing.pop(field.group(1).lower(), None)
                self._inField = True
            self._line = end + 2
        if not self.done and len(self._held) > HEADER_HOLD:
            self._passOn(bytes(self._held))

    def finish(self) -> None:
        """
        The message is over: a message that is all header section gets the
        missing fields at its end.
        """
        if not self.done:
            self._complete(self._line)

    def _complete(self, at: int) -> None:
        """Insert the missing fields at offset C{at} of the held bytes and pass everything on."""
        self.added = list(self._missing.values())
        held = bytes(self._held)
        self._passOn(held[:at] + b"".join(self.added) + held[at:])

    def _passOn(self, data: bytes) -> None:
        self.done = True
        self._held = bytearray()
        self._write(data)


#: More C{Received:} fields than this and a message is taken for a loop
#: (RFC 5321 6.3: "a large rejection threshold, normally at least 100
#: Received entries"; qmail and OpenSMTPD also stop at 100).
MAX_HOPS = 100
# How far into a message its Received: fields are counted: past this a
# header section is not looked at any further (as MAX_HEADER for From:).
_HOP_SCAN = 256 * 1024
# A Received: field's start, or the empty line that ends the header
# section; each at a line start, so after the CRLF that ends a line.
_HOP = re.compile(rb"\r\n(?:received[ \t]{0,32}:|\r\n)", re.IGNORECASE)
# The longest match: bytes kept from one chunk to the next, for a match
# that a chunk's end cuts.
_HOP_KEEP = len(b"\r\nreceived") + 32 + 1


class HopCounter:
    """
    Counts the C{Received:} header fields of a message as it streams past
    (CRLF line ends, chunks split anywhere), for loop detection (RFC 5321
    6.3): up to the empty line that ends the header section, in bulk
    regular expression scans, keeping no more than a few bytes.

    @ivar count: the C{Received:} fields seen so far.
    @ivar done: the header section is over (or longer than is looked at).
    """

    def __init__(self) -> None:
        self.count = 0
        self.done = False
        self._seen = 0
        # As if a line ended just before the message: its first line is a
        # line start too.
        self._carry = b"\r\n"

    def write(self, chunk: bytes) -> None:
        if self.done:
            return
        data = self._carry + chunk
        last = 0
        for match in _HOP.finditer(data):
            if match.group() == b"\r\n\r\n":
                self.done = True
                return
            self.count += 1
            last = match.end()
        # Bytes that may start a match the next chunk completes; never any
        # of a match already counted.
        self._carry = data[max(last, len(data) - _HOP_KEEP) :]
        self._seen += len(chunk)
        if self._seen > _HOP_SCAN:
            self.done = True
