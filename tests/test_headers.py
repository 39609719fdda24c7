"""The header section of a submission, completed as it streams (RFC 6409 8.2, 8.3)."""

from __future__ import annotations

from twisted.trial import unittest

from mailauth import headers
from mailauth.headers import HeaderCompleter, HopCounter

MISSING = {b"date": b"Date: now\r\n", b"message-id": b"Message-ID: <id@mx>\r\n"}


def complete(message: bytes, chunk: int = 0) -> tuple:
    """C{message} through a L{HeaderCompleter} in chunks of C{chunk} bytes (0: whole)."""
    out: list = []
    completer = HeaderCompleter(out.append, MISSING)
    step = chunk or len(message) or 1
    for i in range(0, len(message), step):
        completer.write(message[i : i + step])
    completer.finish()
    return b"".join(out), completer.added


class HeaderCompleterTests(unittest.TestCase):
    def test_bothMissing(self) -> None:
        """Both fields are added at the end of the header section, before the empty line."""
        self.assertEqual(
            complete(b"Received: x\r\nSubject: hi\r\n\r\nbody\r\n")[0],
            b"Received: x\r\nSubject: hi\r\nDate: now\r\nMessage-ID: <id@mx>\r\n\r\nbody\r\n",
        )

    def test_present(self) -> None:
        """Fields present in any case (a space before the colon too) are not added again."""
        message = b"Subject: hi\r\nmessage-id: <a@b>\r\nDATE : today\r\n\r\nbody\r\n"
        self.assertEqual(complete(message), (message, []))

    def test_onlyOneMissing(self) -> None:
        """Only the missing one is added."""
        self.assertEqual(
            complete(b"Date: today\r\n\r\nbody\r\n"),
            (b"Date: today\r\nMessage-ID: <id@mx>\r\n\r\nbody\r\n", [MISSING[b"message-id"]]),
        )

    def test_folded(self) -> None:
        """A folded field's continuation lines stay with it."""
        self.assertEqual(
            complete(b"Subject: a\r\n b\r\n\tc\r\nDate: d\r\n\r\nx\r\n")[0],
            b"Subject: a\r\n b\r\n\tc\r\nDate: d\r\nMessage-ID: <id@mx>\r\n\r\nx\r\n",
        )

    def test_bodyWithoutEmptyLine(self) -> None:
        """
        A line that is not a field ends the header section (a mail reader
        starts the body there): the fields go before it, and a field name in
        the body does not count.
        """
        self.assertEqual(
            complete(b"Subject: hi\r\nhello there\r\nDate: later\r\n")[0],
            b"Subject: hi\r\nDate: now\r\nMessage-ID: <id@mx>\r\nhello there\r\nDate: later\r\n",
        )

    def test_bodyOnly(self) -> None:
        """A message that starts with its body gets the fields first."""
        self.assertEqual(
            complete(b"\r\nbody\r\n")[0], b"Date: now\r\nMessage-ID: <id@mx>\r\n\r\nbody\r\n"
        )
        self.assertEqual(complete(b"")[0], b"Date: now\r\nMessage-ID: <id@mx>\r\n")

    def test_headersOnly(self) -> None:
        """A message that is all header section gets the fields at its end."""
        self.assertEqual(
            complete(b"Subject: hi\r\n")[0], b"Subject: hi\r\nDate: now\r\nMessage-ID: <id@mx>\r\n"
        )

    def test_anyChunks(self) -> None:
        """However the message is cut into chunks, the result is the same."""
        message = b"Received: x\r\nSubject: a\r\n b\r\nDate: d\r\n\r\nMessage-ID: body\r\n"
        whole = complete(message)
        for size in range(1, len(message)):
            self.assertEqual(complete(message, size), whole, size)

    def test_bodyPassesAtOnce(self) -> None:
        """Once the header section is over nothing more is held."""
        out: list = []
        completer = HeaderCompleter(out.append, MISSING)
        completer.write(b"Subject: hi\r\n")
        self.assertEqual(out, [])
        completer.write(b"\r\nbody")
        self.assertTrue(completer.done)
        completer.write(b" more\r\n")
        self.assertEqual(out[-1], b" more\r\n")

    def test_longHeaderSectionPassedOn(self) -> None:
        """
        A header section longer than HEADER_HOLD is passed on unchanged,
        nothing added, and nothing more held.
        """
        out: list = []
        completer = HeaderCompleter(out.append, MISSING)
        field = b"X-Long: " + b"y" * 998 + b"\r\n"
        count = headers.HEADER_HOLD // len(field) + 1
        for _ in range(count):
            completer.write(field)
        self.assertTrue(completer.done)
        self.assertEqual(b"".join(out), field * count)
        completer.write(b"\r\nbody\r\n")
        completer.finish()
        self.assertEqual(b"".join(out), field * count + b"\r\nbody\r\n")
        self.assertEqual(completer.added, [])


class HopCounterTests(unittest.TestCase):
    """L{headers.HopCounter} counts Received: fields of the header section only."""

    MESSAGE = (
        b"Received: a\r\nreceived  : b\r\n c\r\nX-Received: no\r\n"
        b"RECEIVED:x\r\nSubject: Received: no\r\n\r\nReceived: body\r\n"
    )

    def count(self, message: bytes, size: int) -> HopCounter:
        counter = HopCounter()
        for i in range(0, len(message), size):
            counter.write(message[i : i + size])
        return counter

    def test_everyChunkSize(self) -> None:
        """Three fields, whatever size the chunks; the empty line ends the count."""
        for size in range(1, len(self.MESSAGE) + 1):
            counter = self.count(self.MESSAGE, size)
            self.assertEqual((counter.count, counter.done), (3, True), size)

    def test_noHeader(self) -> None:
        """A message that starts with its empty line has no hops."""
        counter = self.count(b"\r\nReceived: x\r\n", 1)
        self.assertEqual((counter.count, counter.done), (0, True))

    def test_longFieldsAcrossChunks(self) -> None:
        """Fields far longer than a chunk, folded over many lines, count once each."""
        field = b"Received: " + b"x" * 1000 + b"\r\n\t" + b"y" * 500 + b"\r\n"
        counter = self.count(field * 150 + b"\r\nbody", 997)
        self.assertEqual(counter.count, 150)

    def test_scanEnds(self) -> None:
        """Past 256 KiB without an empty line, nothing more is counted."""
        field = b"Received: " + b"x" * 990 + b"\r\n"
        counter = self.count(field * 400, 4096)
        self.assertTrue(counter.done)
        self.assertLess(counter.count, 400)
        self.assertGreater(counter.count, 250)
