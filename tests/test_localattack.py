"""
Local delivery attacked on the running daemon as a careless operator sets
it up: mailboxes shared through symbolic links, aliases written as
aliases(5) allows.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.trial import unittest

from tests.harness import AttackMixin

PLAIN_SENDER = "alice.plain@example.test"


class SharedMailboxTests(AttackMixin, unittest.TestCase):
    """
    The administrator shares one Maildir between two logins with a symbolic
    link (C{bob}'s Maildir leads to C{alice.plain}'s). A message to both,
    or to an alias of both, gets one 250 and one copy in the shared
    folder; it got 451 at every try (the second link met the first's file),
    so nobody ever got it.
    """

    def setUp(self):
        super().setUp()
        shared = self.daemon.maildir(PLAIN_SENDER)
        os.makedirs(os.path.dirname(self.daemon.maildir("bob@example.test")))
        os.makedirs(shared)
        os.symlink(shared, self.daemon.maildir("bob@example.test"))

    def send(self, *recipients: bytes) -> tuple:
        client = self.loggedIn()
        client.command(b"MAIL FROM:<bob@example.test>")
        for recipient in recipients:
            assert client.command(b"RCPT TO:<" + recipient + b">")[0] == 250
        assert client.command(b"DATA")[0] == 354
        return client.command(b"Subject: shared\r\n\r\nbody\r\n.")

    @defer.inlineCallbacks
    def test_deliveredOnce(self):
        """Both recipients, one mailbox: one copy, 250."""
        code, text = yield self.inThread(self.send, b"bob@example.test", PLAIN_SENDER.encode())
        self.assertEqual(code, 250, text)
        self.assertEqual(len(self.daemon.files(PLAIN_SENDER)), 1)
        self.assertEqual(self.daemon.files(PLAIN_SENDER, "tmp"), [])
