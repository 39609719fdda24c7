"""The content readers on their own: the checks both share, and BDAT's counted chunks."""

from __future__ import annotations

from twisted.trial import unittest

from mailauth.dataread import ChunkReader, MessageChecker


class MessageCheckerTests(unittest.TestCase):
    """L{MessageChecker}: bare CR or LF, NUL and size, whatever the chunking."""

    def check(self, pieces, maxSize=10**6):
        out = []
        checker = MessageChecker(out.append, maxSize)
        for piece in pieces:
            checker.feed(piece)
        checker.finish()
        return b"".join(out), checker

    def test_crlfSplitAcrossChunks(self) -> None:
        """A CRLF cut between two chunks is a CRLF, passed on whole."""
        body, checker = self.check([b"a\r", b"\nb\r", b"\n"])
        self.assertEqual(body, b"a\r\nb\r\n")
        self.assertFalse(checker.failed)

    def test_bareNewlines(self) -> None:
        """A bare LF, a bare CR, and a CR that ends the message are all refused."""
        for pieces in ([b"a\nb\r\n"], [b"a\rb\r\n"], [b"a\r\n\r"], [b"a\r", b"b"], [b"\n"]):
            body, checker = self.check(pieces)
            self.assertTrue(checker.bareNewline, pieces)

    def test_nul(self) -> None:
        """A NUL is refused, and nothing after it is passed on."""
        body, checker = self.check([b"a\r\n", b"\0\r\n", b"more\r\n"])
        self.assertTrue(checker.nul)
        self.assertEqual(body, b"a\r\n")

    def test_size(self) -> None:
        """The size is counted over every chunk; past the limit nothing more goes on."""
        body, checker = self.check([b"12345", b"67890", b"x"], maxSize=10)
        self.assertEqual((checker.size, checker.tooBig, body), (11, True, b"1234567890"))

    def test_lastLineEnded(self) -> None:
        """
        A last line without its CRLF is given one, which the size does not
        count: a message of exactly the limit still passes.
        """
        body, checker = self.check([b"a\r\nb", b"c"], maxSize=5)
        self.assertEqual((body, checker.size, checker.failed), (b"a\r\nbc\r\n", 5, False))

    def test_nothingAddedOtherwise(self) -> None:
        """
        A message that ends with a CRLF, an empty one, and one that broke
        a rule get nothing added.
        """
        for pieces, expected in (
            ([b"a\r", b"\n"], b"a\r\n"),
            ([], b""),
            ([b"a\0b"], b""),
            ([b"12345", b"67890", b"x"], b"1234567890"),
        ):
            self.assertEqual(self.check(pieces, maxSize=10)[0], expected, pieces)


class ChunkReaderTests(unittest.TestCase):
    """L{ChunkReader}: exactly the announced octets, no dot handling."""

    def test_exactOctets(self) -> None:
        """A chunk ends after its size, whatever arrives with it; the rest is handed back."""
        out = []
        reader = ChunkReader(out.append, 10**6)
        reader.begin(6, last=False)
        self.assertIsNone(reader.feed(b"abc"))
        self.assertEqual(reader.feed(b"d\r\n.\r\nNOOP\r\n"), b".\r\nNOOP\r\n")
        self.assertEqual(b"".join(out), b"abcd\r\n")
        self.assertEqual((reader.size, reader.remaining, reader.chunks), (6, 0, 1))

    def test_noDotHandling(self) -> None:
        """
        Inside a chunk C{CRLF . CRLF} ends nothing and a leading dot stays:
        BDAT has no transparency (RFC 3030 2).
        """
        out = []
        reader = ChunkReader(out.append, 10**6)
        data = b"..x\r\n.\r\nMAIL FROM:<evil@evil.test>\r\n"
        reader.begin(len(data), last=True)
        self.assertEqual(reader.feed(data), b"")
        self.assertEqual(b"".join(out), data)
        self.assertFalse(reader.failed)

    def test_crlfAcrossChunks(self) -> None:
        """A CRLF split between two BDAT chunks is no bare CR."""
        out = []
        reader = ChunkReader(out.append, 10**6)
        reader.begin(2, last=False)
        reader.feed(b"a\r")
        reader.begin(2, last=True)
        reader.feed(b"\nb")
        self.assertFalse(reader.bareNewline)
        self.assertEqual(b"".join(out), b"a\r\nb\r\n")

    def test_lastChunkEndingInCR(self) -> None:
        """A CR at the very end of the last chunk is a bare CR."""
        reader = ChunkReader(lambda data: None, 10**6)
        reader.begin(2, last=False)
        reader.feed(b"a\r")
        reader.begin(0, last=True)
        self.assertTrue(reader.bareNewline)

    def test_bareLineFeed(self) -> None:
        """A bare LF in a chunk is refused as with DATA (Postfix's bare-newline reject)."""
        reader = ChunkReader(lambda data: None, 10**6)
        reader.begin(4, last=True)
        reader.feed(b"a\nb.")
        self.assertTrue(reader.failed)
