"""
The readers of message content: DATA (the bytes up to C{CRLF . CRLF}, in
bulk, with no other end: no SMTP smuggling) and BDAT (counted chunks, RFC
3030), both passing the message on through the same checks.
"""

from __future__ import annotations

from typing import Callable, Optional

# How many bytes of a DATA line are held before they are passed on.
DATA_HOLD = 32768


class MessageChecker:
    """
    What both readers check in the message they pass on: bare CR or LF and
    NUL (which neither 7bit nor 8BITMIME content may hold, RFC 2045 2.7,
    2.8 and RFC 6152, and which the smuggling sequences C{LF . LF} and
    C{CRLF NUL . CRLF} aim at servers further on), and the size. Once
    something is wrong nothing more is passed on.

    C{feed} takes the message in canonical form, in chunks that may split
    a CRLF pair: a CR at the end of a chunk is held until the next one
    shows whether an LF follows.

    What it passes on ends with a line end: BDAT content may stop anywhere
    (RFC 3030), and a last line without its CRLF gets one, as Postfix
    stores it, so that the Maildir copy, the queued copy and the DKIM
    signer all get the same message (the signature would not change:
    relaxed canonicalisation ends a last line the same way). That CRLF is
    not in C{size}: the size limit counts what the client sent, so two
    more octets never turn an accepted message into a refused one.
    """

    def __init__(self, write: Callable[[bytes], None], maxSize: int) -> None:
        self._write = write
        self._maxSize = maxSize
        self._heldCR = False
        # Bytes were passed on and the last of them did not end a line.
        self._lineOpen = False
        self.size = 0
        self.bareNewline = False
        self.nul = False
        self.tooBig = False

    @property
    def failed(self) -> bool:
        """Whether the message broke a rule; nothing more is passed on then."""
        return self.bareNewline or self.nul or self.tooBig

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.size += len(chunk)
        if self.size > self._maxSize:
            self.tooBig = True
        if self._heldCR:
            chunk = b"\r" + chunk
            self._heldCR = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._heldCR = True
        crlf = chunk.count(b"\r\n")
        if chunk.count(b"\r") != crlf or chunk.count(b"\n") != crlf:
            self.bareNewline = True
        if b"\0" in chunk:
            self.nul = True
        if chunk and not self.failed:
            self._write(chunk)
            self._lineOpen = not chunk.endswith(b"\r\n")

    def finish(self) -> None:
        """
        The message is complete: a CR still held was a bare CR, and a last
        line without its CRLF is given one.
        """
        if self._heldCR:
            self._heldCR = False
            self.bareNewline = True
        elif self._lineOpen and not self.failed:
            self._lineOpen = False
            self._write(b"\r\n")


class DataReader:
    """
    Turns the bytes of a DATA section into the message, in bulk rather than
    one call per line: finds the end (C{CRLF . CRLF} only), undoes
    dot-stuffing and hands the rest to a L{MessageChecker}. C{write} gets
    chunks of the message in canonical form (CRLF line ends, unstuffed).
    """

    def __init__(self, write: Callable[[bytes], None], maxSize: int) -> None:
        self._checker = MessageChecker(write, maxSize)
        self._pending = b""
        self._bol = True

    @property
    def size(self) -> int:
        return self._checker.size

    @property
    def bareNewline(self) -> bool:
        return self._checker.bareNewline

    @property
    def nul(self) -> bool:
        return self._checker.nul

    @property
    def tooBig(self) -> bool:
        return self._checker.tooBig

    def feed(self, data: bytes) -> Optional[bytes]:
        """
        Take more of the DATA section.

        @return: L{None} while the message goes on; at its end, the bytes
            that followed it (the next pipelined commands, maybe C{b""}).
        """
        buf = self._pending + data if self._pending else data
        self._pending = b""
        if self._bol:
            if buf.startswith(b".\r\n"):
                self._checker.finish()
                return buf[3:]
            if len(buf) < 3 and b".\r\n".startswith(buf):
                self._pending = buf
                return None
        end = buf.find(b"\r\n.\r\n")
        if end >= 0:
            self._emit(buf[: end + 2])
            self._checker.finish()
            return buf[end + 5 :]
        last = buf.rfind(b"\r\n")
        if last >= 0:
            self._emit(buf[: last + 2])
            self._bol = True
            buf = buf[last + 2 :]
        if len(buf) > DATA_HOLD:
            # A very long line: pass it on, keeping a final CR that may
            # start the CRLF of the next read.
            keep = 1 if buf.endswith(b"\r") else 0
            self._emit(buf[: len(buf) - keep])
            self._bol = False
            buf = buf[len(buf) - keep :]
        self._pending = buf
        return None

    def _emit(self, chunk: bytes) -> None:
        if self._bol and chunk.startswith(b"."):
            chunk = chunk[1:]
        self._checker.feed(chunk.replace(b"\r\n.", b"\r\n"))


class ChunkReader:
    """
    Reads the chunks of one BDAT transaction (RFC 3030 2): each C{BDAT n}
    is followed by exactly C{n} octets of the message, taken as they are,
    with no dot handling and no end marker inside them. The content still
    goes through the L{MessageChecker}: without BINARYMIME, which mailauth
    does not offer, BDAT carries the same 7bit or 8BITMIME text as DATA
    (RFC 3030 3), so a bare CR or LF or a NUL is refused as with DATA (as
    Postfix's C{smtpd_forbid_bare_newline = reject} does).

    @ivar remaining: octets of the current chunk still to be read.
    @ivar last: the current chunk is the last one (C{BDAT n LAST}).
    """

    def __init__(self, write: Callable[[bytes], None], maxSize: int) -> None:
        self._checker = MessageChecker(write, maxSize)
        self.remaining = 0
        self.last = False
        self.chunks = 0

    @property
    def size(self) -> int:
        return self._checker.size

    @property
    def bareNewline(self) -> bool:
        return self._checker.bareNewline

    @property
    def nul(self) -> bool:
        return self._checker.nul

    @property
    def tooBig(self) -> bool:
        return self._checker.tooBig

    @property
    def failed(self) -> bool:
        return self._checker.failed

    def begin(self, size: int, last: bool) -> None:
        """A C{BDAT size [LAST]} command was read; its octets follow."""
        self.remaining = size
        self.last = last
        self.chunks += 1
        if last and size == 0:
            self._checker.finish()

    def feed(self, data: bytes) -> Optional[bytes]:
        """
        Take more octets of the current chunk.

        @return: L{None} while the chunk goes on; at its end, the bytes that
            followed it (the next pipelined commands, maybe C{b""}).
        """
        take = data[: self.remaining]
        self.remaining -= len(take)
        self._checker.feed(take)
        if self.remaining:
            return None
        if self.last:
            self._checker.finish()
        return data[len(take) :]
