"""
The relay client against a broken or hostile upstream: replies in odd
shapes, at odd times, too slowly, or that do not fit the transaction. On a
StringTransport and a Clock; where the behaviour is not specified the client
does what Postfix's smtp(8) does.
"""

from __future__ import annotations

import io

from twisted.internet import task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailauth.envelope import DELIVERED, Outcome
from mailauth.relay import RelayClientProtocol, RelayConnector, RelayError, RelaySession
from tests.support import relayConfig


class HostileRelayMixin:
    """A session on a StringTransport, its greeting done, on a Clock."""

    extensions: dict = {"8BITMIME": ""}
    timeout = 30

    def setUp(self):
        self.clock = task.Clock()
        self.protocol = RelayClientProtocol(self.clock, self.timeout)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(b"220 hi\r\n")
        self.session = RelaySession(self.protocol, dict(self.extensions))

    def pump(self):
        """Let the message go out; return what was sent since the last call."""
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        sent = self.transport.value()
        self.transport.clear()
        return sent

    def deliver(self, size=20, message=b"Subject: x\r\n\r\nhi\r\n"):
        return self.session.deliver(
            "a@x.test", ["b@y.test", "c@y.test"], io.BytesIO(message), size, False
        )

    def answer(self, *replies):
        """Answer each command in turn with raw bytes; return what was sent before each."""
        sent = []
        for reply in replies:
            sent.append(self.pump())
            self.protocol.dataReceived(reply)
        return sent


class TransactionRepliesTests(HostileRelayMixin, unittest.TestCase):
    """Replies that do not say what the transaction needs."""

    def test_successToDataIsNoDelivery(self):
        """
        A 2xx to DATA, where 354 was due, is a protocol error: the message
        is tried again later. Before, the 250 was taken as the verdict on
        the message, which was marked delivered and removed from the queue
        without a byte of it sent.
        """
        d = self.deliver()
        sent = self.answer(b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"250 2.0.0 ok\r\n")
        self.assertEqual(sent[-1], b"DATA\r\n")
        self.assertIn("DATA", str(self.failureResultOf(d, RelayError).value))

    def test_anySuccessToMail(self):
        """
        Any 2xx to MAIL lets the transaction go on, as in Postfix. Before, a
        reply other than 250 was taken as every recipient's verdict, and a
        2xx one marked them all delivered though nothing was sent.
        """
        d = self.deliver()
        sent = self.answer(b"251 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n")
        self.assertEqual(
            sent[1:], [b"RCPT TO:<b@y.test>\r\n", b"RCPT TO:<c@y.test>\r\n", b"DATA\r\n"]
        )
        self.assertNoResult(d)
        self.assertTrue(self.pump().endswith(b"\r\n.\r\n"))
        self.protocol.dataReceived(b"250 2.0.0 queued\r\n")
        self.assertEqual(
            {r: v.text for r, v in self.successResultOf(d).items()},
            {"b@y.test": "250 2.0.0 queued", "c@y.test": "250 2.0.0 queued"},
        )

    def test_duplicateReplyIsNoVerdict(self):
        """
        A reply that arrives before its command was sent (a relay that
        answers twice, or pipelines junk) is a protocol error. Before, the
        extra 250 behind the reply to RCPT was taken as the reply to the
        next command: with CHUNKING, the message was marked delivered on a
        reply sent before the relay had seen its data.
        """
        self.session = RelaySession(self.protocol, {"CHUNKING": ""})
        d = self.session.deliver("a@x.test", ["b@y.test"], io.BytesIO(b"hi\r\n"), 4, False)
        self.answer(b"250 ok\r\n", b"250 ok\r\n250 2.0.0 queued\r\n")
        self.assertIn("unexpected", str(self.failureResultOf(d, RelayError).value))
        self.assertTrue(self.transport.disconnecting)


class SizeLimitTests(HostileRelayMixin, unittest.TestCase):
    """The relay's SIZE limit (RFC 1870)."""

    extensions = {"SIZE": "1000", "8BITMIME": ""}

    def test_overTheLimitFailsHere(self):
        """
        A message bigger than the relay's SIZE limit fails with 552 5.3.4
        for every recipient, without a command sent, as Postfix does:
        sending it would only have it refused, or taken by a relay that
        does not enforce its own limit. Before, MAIL was sent anyway.
        """
        d = self.deliver(size=1001)
        results = self.successResultOf(d)
        self.assertEqual(self.transport.value(), b"")
        for reply in results.values():
            self.assertEqual(reply.code, 552)
            self.assertEqual(
                reply.text, "5.3.4 message size 1001 exceeds the relay's size limit of 1000"
            )
            outcome = Outcome.fromReply(reply)
            self.assertEqual((outcome.state, outcome.status), ("failed", "5.3.4"))

    def test_atTheLimitGoes(self):
        """A message of exactly the limit, and any when SIZE has no number or 0, is sent."""
        d = self.deliver(size=1000)
        self.assertEqual(self.pump(), b"MAIL FROM:<a@x.test> SIZE=1000\r\n")
        self.answer(b"451 later\r\n", b"250 reset\r\n")
        self.successResultOf(d)
        for limit in ("", "0", "junk"):
            self.session = RelaySession(self.protocol, {"SIZE": limit})
            d = self.deliver(size=10**9)
            self.assertTrue(self.pump().endswith(b"SIZE=1000000000\r\n"), limit)
            self.answer(b"451 later\r\n", b"250 reset\r\n")
            self.successResultOf(d)

    def test_limitOfDigitsOnly(self):
        """
        A SIZE value that is not ASCII digits alone (RFC 1870: 1*DIGIT) is
        no limit, as Postfix reads it. Before, Python's int() took C{+5},
        C{1_0} or an Arabic-Indic five for a limit, and every message over
        it bounced for good, never sent.
        """
        for limit in ("+5", "1_0", "\u0665", "-1"):
            self.session = RelaySession(self.protocol, {"SIZE": limit})
            d = self.deliver(size=1000)
            self.assertEqual(self.pump(), b"MAIL FROM:<a@x.test> SIZE=1000\r\n", limit)
            self.answer(b"451 later\r\n", b"250 reset\r\n")
            self.assertEqual({r.code for r in self.successResultOf(d).values()}, {451}, limit)


class SlowRelayTests(HostileRelayMixin, unittest.TestCase):
    """A relay that answers a byte at a time, too slowly."""

    def test_dripFedReplyTimesOut(self):
        """
        Each reply must be complete within the timeout of its command (RFC
        5321 4.5.3.2), however it trickles in. Before, every byte restarted
        the timer, so a relay sending one byte a second held the
        connection, and the messages in it, forever.
        """
        d = self.deliver()
        self.pump()
        for byte in b"250 a slow but steady reply that never quite ends":
            self.protocol.dataReceived(bytes([byte]))
            self.clock.advance(1)
        self.assertIn("30 seconds", str(self.failureResultOf(d, RelayError).value))

    def test_dripFedGreetingTimesOut(self):
        """The greeting too must be complete within the timeout."""
        protocol = RelayClientProtocol(self.clock, 30)
        protocol.makeConnection(StringTransport())
        greeting = protocol.greeting()
        for byte in b"220-" + b"x" * 40:
            protocol.dataReceived(bytes([byte]))
            self.clock.advance(1)
        self.failureResultOf(greeting, RelayError)

    def test_splitAtEveryByte(self):
        """A reply that arrives a byte at a time, in time, is read as a whole."""
        d = self.deliver()
        replies = [b"250-first\r\n250 ok\r\n", b"250 ok\r\n", b"550 5.1.1 no\r\n", b"354 go\r\n"]
        for reply in replies + [b"250 2.0.0 queued\r\n"]:
            self.pump()
            for byte in reply:
                self.protocol.dataReceived(bytes([byte]))
        results = self.successResultOf(d)
        self.assertEqual(results["b@y.test"].text, "250 2.0.0 queued")
        self.assertEqual(results["c@y.test"].text, "550 5.1.1 no")


class ReplyShapeTests(HostileRelayMixin, unittest.TestCase):
    """Reply lines that are not what RFC 5321 says."""

    def test_bareLineFeeds(self):
        """
        Reply lines that end in a bare LF are read as lines, as Postfix
        reads them. Before, the client waited for a CRLF that never came,
        until the timeout, and every message was deferred until it expired.
        """
        d = self.deliver()
        sent = self.answer(b"250-ok\n250 ok\n", b"250 ok\n", b"550 5.1.1 no\n", b"354 go\n")
        self.assertEqual(sent[-1], b"DATA\r\n")
        self.pump()
        self.protocol.dataReceived(b"250 2.0.0 queued\n")
        results = self.successResultOf(d)
        self.assertEqual(results["b@y.test"].lines, ("250 2.0.0 queued",))
        self.assertEqual(results["c@y.test"].lines, ("550 5.1.1 no",))
        self.assertEqual(Outcome.fromReply(results["b@y.test"]).state, DELIVERED)

    def test_controlCharactersReplaced(self):
        """
        Control characters in a reply (a CR, an escape sequence) become
        C{?} as Postfix's smtp(8) makes them: the reply is quoted in log
        lines and bounces. Before, they were kept as they came.
        """
        d = self.deliver()
        self.answer(b"550 5.7.1 no\rqueue: x\x1b[2J\x00 \t end\r\n", b"250 reset\r\n")
        reply = self.successResultOf(d)["b@y.test"]
        self.assertEqual(reply.text, "550 5.7.1 no?queue: x?[2J? \t end")


class SessionReuseTests(HostileRelayMixin, unittest.TestCase):
    """Whether a session can take the next message: RSET, hang-ups."""

    def test_refusedResetEndsOnlyTheSession(self):
        """
        A transaction that did not end (every recipient refused) is reset
        at once, as Postfix does; a relay that refuses the RSET leaves the
        replies to the message standing and the session marked not
        reusable, so the next message gets a new one. Before, RSET was sent
        at the start of the next message, whose attempt failed as a whole
        on the refusal (and held every new session back for the backoff).
        """
        d = self.deliver()
        sent = self.answer(
            b"250 ok\r\n", b"550 5.1.1 no\r\n", b"550 5.1.1 no\r\n", b"502 5.5.1 what\r\n"
        )
        self.assertEqual(sent[-1], b"RSET\r\n")
        results = self.successResultOf(d)
        self.assertEqual({reply.code for reply in results.values()}, {550})
        self.assertFalse(self.session.reusable)

    def test_lostDuringResetEndsOnlyTheSession(self):
        """A connection lost at the RSET leaves the replies to the message standing."""
        d = self.deliver()
        self.answer(b"550 5.7.1 no\r\n")
        self.assertEqual(self.pump(), b"RSET\r\n")
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual({reply.code for reply in self.successResultOf(d).values()}, {550})
        self.assertFalse(self.session.reusable)

    def test_resetSessionIsReusable(self):
        """A clean transaction sends no RSET; one reset with a 250 stays reusable."""
        d = self.deliver()
        self.answer(b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n")
        self.assertTrue(self.pump().endswith(b"\r\n.\r\n"))
        self.protocol.dataReceived(b"250 2.0.0 queued\r\n")
        self.successResultOf(d)
        self.assertEqual(self.pump(), b"")
        self.assertTrue(self.session.reusable)
        d = self.deliver()
        self.answer(b"451 4.3.0 later\r\n", b"250 2.0.0 reset\r\n")
        self.successResultOf(d)
        self.assertTrue(self.session.reusable)

    def test_hangUpBetweenMessages(self):
        """
        A relay that hangs up between messages (its idle timeout, a
        restart) leaves a session that says it is not reusable, and a
        command on it fails at once. Before, the next message was sent into
        the closed connection and waited the whole timeout for a reply,
        then was deferred, and new sessions were held back.
        """
        d = self.deliver()
        self.answer(b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n")
        self.pump()
        self.protocol.dataReceived(b"250 2.0.0 queued\r\n")
        self.successResultOf(d)
        self.assertTrue(self.session.reusable)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(self.session.reusable)
        self.failureResultOf(self.deliver(), RelayError)

    def test_closingWhileIdle(self):
        """A 421 while no command is pending (the relay's idle timeout) ends the session."""
        self.protocol.dataReceived(b"421 4.4.2 idle for too long\r\n")
        self.assertFalse(self.session.reusable)
        self.assertTrue(self.transport.disconnecting)


class ClosingTests(HostileRelayMixin, unittest.TestCase):
    """A 421 at any stage ends the session; the message is tried again."""

    def establish(self, *replies, tls="none"):
        """Set a session up through a fresh connection answered with C{replies}."""
        connector = RelayConnector(relayConfig(tls=tls), self.clock, "me.test")
        protocol = RelayClientProtocol(self.clock, 30)
        transport = StringTransport()
        protocol.makeConnection(transport)
        d = connector._establish(protocol, None, None)
        for reply in replies:
            protocol.dataReceived(reply)
        return d, transport

    def test_atTheGreetingAndEHLO(self):
        """A 421 greeting, or a 421 to EHLO, fails the session setup."""
        for replies in ([b"421 4.3.2 busy\r\n"], [b"220 hi\r\n", b"421 4.3.2 busy\r\n"]):
            d, _ = self.establish(*replies)
            self.assertIn("421 4.3.2 busy", str(self.failureResultOf(d, RelayError).value))

    def test_heloWhenEHLORefused(self):
        """
        A relay that refuses EHLO for good (an RFC 821 server) gets HELO
        and is used without extensions, as Postfix does; one that refuses
        HELO too fails the session. Before, a 5xx to EHLO failed it at once.
        """
        d, transport = self.establish(
            b"220 old\r\n", b"502 5.5.2 unknown command\r\n", b"250 old.example\r\n"
        )
        session = self.successResultOf(d)
        self.assertEqual(session.extensions, {})
        self.assertEqual(transport.value(), b"EHLO me.test\r\nHELO me.test\r\n")
        d, _ = self.establish(b"220 old\r\n", b"554 5.7.1 not you\r\n", b"550 go away\r\n")
        error = str(self.failureResultOf(d, RelayError).value)
        self.assertIn("550 go away", error)
        self.assertIn("after EHLO was refused: 554 5.7.1 not you", error)
        # A relay that must do STARTTLS cannot, without EHLO.
        d, _ = self.establish(b"220 old\r\n", b"502 no\r\n", b"250 ok\r\n", tls="starttls")
        self.assertIn("does not offer STARTTLS", str(self.failureResultOf(d, RelayError).value))

    def test_noStartTLSNoSecrets(self):
        """With tls = starttls, a relay that does not offer it gets nothing after EHLO."""
        d, transport = self.establish(
            b"220 hi\r\n", b"250-relay\r\n250 AUTH PLAIN\r\n", tls="starttls"
        )
        self.assertIn("does not offer STARTTLS", str(self.failureResultOf(d, RelayError).value))
        self.assertEqual(transport.value(), b"EHLO me.test\r\n")

    def test_inTheTransaction(self):
        """A 421 to MAIL, to DATA, or after the dot is no verdict on the message."""
        for before in ([], [b"250 ok\r\n"] * 3, [b"250 ok\r\n"] * 3 + [b"354 go\r\n"]):
            self.setUp()
            d = self.deliver()
            self.answer(*before)
            self.pump()
            self.protocol.dataReceived(b"421 4.3.2 shutting down\r\n")
            self.assertIn("421", str(self.failureResultOf(d, RelayError).value))

    def test_refusalsBeforeTheEndStand(self):
        """
        A recipient the relay refused for good (5xx to RCPT) stays refused
        when the session fails later (a 421 after the dot): the error says
        so, for it to be bounced now, as Postfix does, while the others are
        tried again. Before, it was tried again with them.
        """
        d = self.deliver()
        self.answer(b"250 ok\r\n", b"550 5.1.1 no such user\r\n", b"250 ok\r\n", b"354 go\r\n")
        self.pump()
        self.protocol.dataReceived(b"421 4.3.2 shutting down\r\n")
        error = self.failureResultOf(d, RelayError).value
        self.assertEqual(
            {r: reply.text for r, reply in error.refused.items()},
            {"b@y.test": "550 5.1.1 no such user"},
        )
