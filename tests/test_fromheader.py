"""The From:/Sender: addresses of a message, read with the standard library's parser."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mailauth.fromheader import MAX_HEADER, HeaderSection, UncheckableHeader, senderAddresses

# (header fields, the addresses a checker must see) for headers that try to
# make the visible sender look like something it is not.
TRICKY = [
    (b"From: alice@example.org\r\n", ("alice@example.org",)),
    (b"From: Alice <ALICE@Example.ORG>\r\n", ("alice@example.org",)),
    # A display name holding an address is only a name.
    (b'From: "bob@example.org" <mallory@evil.test>\r\n', ("mallory@evil.test",)),
    # So is a comment.
    (b"From: mallory@evil.test (bob@example.org)\r\n", ("mallory@evil.test",)),
    # Groups are expanded.
    (b"From: Team: alice@example.org, mallory@evil.test;\r\n",
     ("alice@example.org", "mallory@evil.test")),
    # Several From addresses, and two From fields: all of them count.
    (b"From: alice@example.org, mallory@evil.test\r\n",
     ("alice@example.org", "mallory@evil.test")),
    (b"From: alice@example.org\r\nFrom: mallory@evil.test\r\n",
     ("alice@example.org", "mallory@evil.test")),
    # Sender: counts as well.
    (b"From: alice@example.org\r\nSender: mallory@evil.test\r\n",
     ("alice@example.org", "mallory@evil.test")),
    # Encoded words are decoded for display, never taken for addresses.
    (b"From: =?utf-8?q?bob=40example=2Eorg?= <mallory@evil.test>\r\n", ("mallory@evil.test",)),
    (b"From: =?utf-8?q?Alice_=C3=A4?= <alice@example.org>\r\n", ("alice@example.org",)),
    # Quoted local parts are the same mailbox as unquoted ones.
    (b'From: "alice"@example.org\r\n', ("alice@example.org",)),
    (b'From: "al\\ice"@example.org\r\n', ("alice@example.org",)),
    (b'From: "a b"@example.org\r\n', ('"a b"@example.org',)),
    # Folded fields.
    (b"From: Alice\r\n <alice@example.org>\r\n", ("alice@example.org",)),
    # Other fields do not matter.
    (b"Reply-To: mallory@evil.test\r\nTo: x@y.test\r\n", ()),
    (b"", ()),
]

# Malformed fields, where the parser can only guess (it reads the first one
# as bob@example.org, which a mail reader may show): refused, never guessed.
UNCHECKABLE = [
    b"From: bob@example.org <mallory@evil.test>\r\n",
    b"From: <alice@example.org> mallory@evil.test\r\n",
    b"From: alice@example.org mallory@evil.test\r\n",
    b"From: Alice <alice@example.org.>\r\n",
    b"From:\r\n",
    b"From: Alice\r\n",
    b"From: garbage <<>>\r\n",
    b"From: =?utf-8?b?Ym9iQGV2aWwudGVzdA==?=\r\n",
    b"From: alice@\r\n",
    b"Sender: <>\r\n",
]


class SenderAddressesTests(unittest.TestCase):
    def test_tricky(self) -> None:
        """Every address a reader could take for the sender is found, and nothing else."""
        for header, expected in TRICKY:
            self.assertEqual(senderAddresses(header), expected, header)

    def test_uncheckable(self) -> None:
        """A From: or Sender: with no address that can be checked is an error, not a pass."""
        for header in UNCHECKABLE:
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
        """However the message is cut, the header section is the same."""
        points = sorted(set(cuts))
        section = HeaderSection()
        for a, b in zip([0] + points, points + [len(self.MESSAGE)]):
            section.write(self.MESSAGE[a:b])
        self.assertEqual(section.value(), b"From: alice@example.org\r\nSubject: x\r\n")

    def test_noHeaders(self) -> None:
        """A message that starts with the empty line has no header fields."""
        section = HeaderSection()
        section.write(b"\r\nFrom: body@evil.test\r\n")
        self.assertTrue(section.complete)
        self.assertEqual(section.value(), b"")

    def test_bounded(self) -> None:
        """A header section past the limit is given up, not held in memory."""
        section = HeaderSection()
        line = b"X-Filler: " + b"y" * 1000 + b"\r\n"
        for _ in range(MAX_HEADER // len(line) + 2):
            section.write(line)
        self.assertTrue(section.tooLong)
        self.assertFalse(section.complete)
        self.assertEqual(section.value(), b"")
