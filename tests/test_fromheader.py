"""The From:/Sender: addresses of a message, read with the standard library's parser."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mailauth.fromheader import MAX_HEADER, HeaderSection, UncheckableHeader, senderAddresses
from tests.support import TRICKY_FROM, UNCHECKABLE_FROM


class SenderAddressesTests(unittest.TestCase):
    def test_tricky(self) -> None:
        """Every address a reader could take for the sender is found, and nothing else."""
        for header, expected in TRICKY_FROM:
            self.assertEqual(senderAddresses(header), expected, header)

    def test_uncheckable(self) -> None:
        """A From: or Sender: with no address that can be checked is an error, not a pass."""
        for header in UNCHECKABLE_FROM:
            self.assertRaises(UncheckableHeader, senderAddresses, header)


class HeaderSectionTests(unittest.TestCase):
    MESSAGE = b"From: alice@example.org\r\nSubject: x\r\n\r\nFrom: body@evil.test\r\n"

    def test_stopsAtEmptyLine(self) -> None:
        """Only the header section is kept: a From: line in the body is not a header."""
        section = HeaderSection()
        section.write(self.MESSAGE)
        self.assertTrue(section.complete)
        self.assertEqual(section.value(), b"From: alice@example.org\r\nSubject: x\r\n")

    @given(st.lists(st.integers(min_value=0, max_value=70), max_size=10))
    @settings(max_examples=200, deadline=None)
    def test_anyChunking(self, cuts) -> None:
        """
        However the message is cut, the header section is the same, and the
        body is what C{write} hands back, in order.
        """
        points = sorted(set(cuts))
        section = HeaderSection()
        body = b""
        for a, b in zip([0] + points, points + [len(self.MESSAGE)]):
            body += section.write(self.MESSAGE[a:b])
        self.assertEqual(section.value(), b"From: alice@example.org\r\nSubject: x\r\n")
        self.assertEqual(body, b"From: body@evil.test\r\n")

    def test_bodyReturned(self) -> None:
        """
        C{write} returns nothing of the header section nor of the empty
        line, then the rest of the chunk that ends it, then whole chunks.
        """
        section = HeaderSection()
        self.assertEqual(section.write(b"From: a@example.org\r\n"), b"")
        self.assertEqual(section.write(b"\r\n"), b"")
        self.assertTrue(section.complete)
        self.assertEqual(section.write(b"body\r\n"), b"body\r\n")
        section = HeaderSection()
        self.assertEqual(section.write(b"A: b\r\n\r\n\r\nline\r\n"), b"\r\nline\r\n")
        self.assertEqual(section.value(), b"A: b\r\n")

    def test_emptyLineFirst(self) -> None:
        """
        A message that starts with an empty line has no header fields: the
        next CRLF is the body's, even when it follows at once.
        """
        for message, body in [(b"\r\n\r\nbody\r\n", b"\r\nbody\r\n"), (b"\r\n", b"")]:
            section = HeaderSection()
            self.assertEqual(section.write(message[:1]) + section.write(message[1:]), body)
            self.assertTrue(section.complete)
            self.assertEqual(section.value(), b"")

    def test_noEmptyLine(self) -> None:
        """A message without an empty line is all header, and incomplete."""
        section = HeaderSection()
        self.assertEqual(section.write(b"A: b\r\nC: d\r\n"), b"")
        self.assertFalse(section.complete)
        self.assertEqual(section.value(), b"A: b\r\nC: d\r\n")

    def test_noHeaders(self) -> None:
        """A message that starts with the empty line has no header fields."""
        section = HeaderSection()
        section.write(b"\r\nFrom: body@evil.test\r\n")
        self.assertTrue(section.complete)
        self.assertEqual(section.value(), b"")

    def test_bounded(self) -> None:
        """A header section past the limit is given up: only the limit is held in memory."""
        section = HeaderSection()
        line = b"X-Filler: " + b"y" * 1000 + b"\r\n"
        for _ in range(MAX_HEADER // len(line) + 2):
            section.write(line)
        self.assertTrue(section.tooLong)
        self.assertFalse(section.complete)
        self.assertEqual(len(section.value()), MAX_HEADER)
        self.assertTrue(section.value().startswith(line * 3))
        self.assertEqual(section.write(b"\r\nbody\r\n"), b"")
        self.assertEqual(len(section.value()), MAX_HEADER)

    def test_limit(self) -> None:
        """
        The limit is on the header fields, however the chunk that ends them
        is cut: a section of exactly C{limit} bytes is kept, one more is not.
        """
        fields = b"A: " + b"x" * 95 + b"\r\n"
        self.assertEqual(len(fields), 100)
        for limit, kept in ((100, True), (99, False)):
            section = HeaderSection(limit)
            body = section.write(fields + b"\r\nbody\r\n")
            self.assertEqual((section.complete, section.tooLong), (kept, not kept), limit)
            self.assertEqual(body, b"body\r\n" if kept else b"")
            section = HeaderSection(limit)
            section.write(fields[:60])
            body = section.write(fields[60:] + b"\r\nbody\r\n")
            self.assertEqual(
                (section.value(), body), (fields, b"body\r\n") if kept else (fields[:limit], b"")
            )
