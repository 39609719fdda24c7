"""
The stored form of a queued message (L{mailauth.spool}): CRLF line ends,
dot-stuffed once, so that the relay client sends it verbatim followed by
C{.CRLF}; and back (for BDAT, local delivery and bounces).
"""

from __future__ import annotations

import io


class DotStuffer:
    """
    Turns a message given in chunks into its stored form: bare CR and bare LF
    become CRLF, and a dot that starts a line is doubled (RFC 5321 4.5.2).

    It keeps state across chunks, so a chunk may end anywhere, even between
    CR and LF or right before a dot: this is what Twisted's client gets wrong
    (D30 in docs/twisted-defects.rst).
    """

    def __init__(self) -> None:
        self._pendingCR = False
        self._lineStart = True
        self._empty = True
        #: How many dots the stuffing added so far: the stored form's size
        #: less these is the message's own (RFC 1870's SIZE).
        self.dots = 0

    def feed(self, chunk: bytes) -> bytes:
        """@return: the stored form of C{chunk}, as far as it is known yet."""
        if self._pendingCR:
            chunk = b"\r" + chunk
            self._pendingCR = False
        if chunk.endswith(b"\r"):
            # It may be the first half of a CRLF.
            chunk = chunk[:-1]
            self._pendingCR = True
        if not chunk:
            return b""
        if b"\r" in chunk or b"\n" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
            before = len(chunk)
            chunk = chunk.replace(b"\r\n.", b"\r\n..")
            self.dots += len(chunk) - before
        if self._lineStart and chunk.startswith(b"."):
            chunk = b"." + chunk
            self.dots += 1
        self._lineStart = chunk.endswith(b"\r\n")
        self._empty = False
        return chunk

    def finish(self) -> bytes:
        """
        @return: the last bytes of the stored form, which ends with CRLF
            unless the message is empty.
        """
        if self._pendingCR or not (self._empty or self._lineStart):
            self._pendingCR = False
            self._lineStart = True
            self._empty = False
            return b"\r\n"
        return b""


class StoredMessage(io.RawIOBase):
    """
    A queued message read as one file: the header fields added on top of
    it (its envelope's prefix), then its data file, which it closes.
    """

    def __init__(self, prefix: bytes, data: io.BufferedReader) -> None:
        super().__init__()
        self._prefix = memoryview(prefix)
        self._data = data

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._prefix:
            count = min(len(buffer), len(self._prefix))
            buffer[:count] = self._prefix[:count]
            self._prefix = self._prefix[count:]
            return count
        return self._data.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._data.close()
        super().close()


class Unstuffer:
    """
    Undoes the stored form's dot-stuffing for a message read in pieces (to
    send it with BDAT, which has none): the first dot of every line goes.
    A piece may end anywhere, even between CR and LF or right after them:
    a final CR or CRLF is held until the next piece shows what follows.
    """

    def __init__(self) -> None:
        self._lineStart = True
        self._held = b""

    def feed(self, piece: bytes) -> bytes:
        """@return: the message bytes of C{piece}, as far as they are known yet."""
        data = self._held + piece
        keep = 2 if data.endswith(b"\r\n") else 1 if data.endswith(b"\r") else 0
        data, self._held = data[: len(data) - keep], data[len(data) - keep :]
        if not data:
            return b""
        if self._lineStart and data.startswith(b"."):
            data = data[1:]
        # What is left ends neither in CR nor CRLF, so each line start in
        # it is followed by its first byte, and the next piece starts mid-line.
        self._lineStart = False
        return data.replace(b"\r\n.", b"\r\n")

    def finish(self) -> bytes:
        """@return: what is still held back (the message's last CRLF)."""
        held, self._held = self._held, b""
        return held


def unstuff(stored: bytes) -> bytes:
    """The message whose stored (dot-stuffed) form is C{stored}."""
    if stored.startswith(b"."):
        stored = stored[1:]
    return stored.replace(b"\r\n.", b"\r\n")
