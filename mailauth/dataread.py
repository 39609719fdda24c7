"""
The DATA reader: the bytes of a DATA section to the message, in bulk, with
only C{CRLF . CRLF} ending it (no SMTP smuggling).
"""

from __future__ import annotations

from typing import Callable, Optional

# How many bytes of a DATA line are held before they are passed on.
DATA_HOLD = 32768


class DataReader:
    """
    Turns the bytes of a DATA section into the message, in bulk rather than
    one call per line: finds the end (C{CRLF . CRLF} only), undoes
    dot-stuffing, notes bare CR or LF and NUL (which neither 7bit nor
    8BITMIME content may hold, RFC 2045 and 6152, and which the smuggling
    sequence C{CRLF NUL . CRLF} aims at servers further on) and counts the
    size. C{write} gets chunks of the message in canonical form (CRLF line
    ends, unstuffed), never splitting a CRLF pair.
    """

    def __init__(self, write: Callable[[bytes], None], maxSize: int) -> None:
        self._write = write
        self._maxSize = maxSize
        self._pending = b""
        self._bol = True
        self.size = 0
        self.bareNewline = False
        self.nul = False
        self.tooBig = False

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
                return buf[3:]
            if len(buf) < 3 and b".\r\n".startswith(buf):
                self._pending = buf
                return None
        end = buf.find(b"\r\n.\r\n")
        if end >= 0:
            self._emit(buf[: end + 2])
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
        chunk = chunk.replace(b"\r\n.", b"\r\n")
        crlf = chunk.count(b"\r\n")
        if chunk.count(b"\r") != crlf or chunk.count(b"\n") != crlf:
            self.bareNewline = True
        if b"\0" in chunk:
            self.nul = True
        self.size += len(chunk)
        if self.size > self._maxSize:
            self.tooBig = True
        if not (self.bareNewline or self.nul or self.tooBig):
            self._write(chunk)
