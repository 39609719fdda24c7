"""The reply vocabulary: named once, documented, and never longer than a reply line may be."""

from __future__ import annotations

import os

from twisted.trial import unittest

from mailauth import replies

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


class ReplyTests(unittest.TestCase):
    def named(self) -> dict:
        return {k: v for k, v in vars(replies).items() if isinstance(v, replies.Reply)}

    def test_documented(self) -> None:
        """docs/replies.rst lists every named reply, with its code and text."""
        with open(os.path.join(DOCS, "replies.rst"), encoding="utf-8") as f:
            table = f.read()
        for name, reply in self.named().items():
            self.assertIn(f"``{name}``", table)
            self.assertIn(f"``{reply.code} {reply.text}``", table, name)

    def test_enhancedCodes(self) -> None:
        """Every final reply starts with an enhanced status code of its class."""
        for name, reply in self.named().items():
            if reply.code in (220, 334, 354) and not reply.text[:1].isdigit():
                continue  # the greeting, SASL challenges and 354 carry none
            first = reply.text.split(" ", 1)[0]
            self.assertRegex(first, r"^[245]\.\d{1,3}\.\d{1,3}$", name)
            self.assertEqual(first[0], str(reply.code)[0], name)

    def test_echoBounded(self) -> None:
        """Client text quoted back is cut, so no reply line outgrows 512 octets."""
        echoed = replies.echo("x" * 10000)
        self.assertLess(len(echoed), 100)
        self.assertTrue(echoed.startswith("x" * 64))
        self.assertEqual(replies.echo("short"), "short")

    def test_error(self) -> None:
        """A named reply raised with its fields filled in."""
        e = replies.RELAY_DENIED.error(address="x@remote.example")
        self.assertIsInstance(e, replies.SMTPReply)
        self.assertEqual((e.code, e.text), (554, "5.7.1 <x@remote.example>: Relay access denied"))
