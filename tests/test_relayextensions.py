"""
The relay client's use of the upstream's extensions: SMTPUTF8 only when
offered (else A-labels, else a 5.6.7/5.6.9 failure decided here), the DSN
parameters passed on, and BDAT with the dot-stuffing undone; on a
StringTransport, and against L{SMTPSink} on 127.0.0.1.
"""

from __future__ import annotations

import io
import os

from twisted.internet import defer, reactor, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailauth.dotstuff import DotStuffer
from mailauth.envelope import Envelope, MessageOptions, RecipientStatus
from mailauth.forward import QueueService
from mailauth.relay import BDAT_CHUNK, RelayClientProtocol, RelayConnector, RelaySession
from mailauth.spool import Queue
from tests.fakes import RecordingLocalDelivery, runInline
from tests.smtpsink import QueueEvents, SMTPSink
from tests.support import relayConfig


def envelope(sender="alice@example.org", recipients=("bob@remote.example",), **kwargs):
    statuses = tuple(
        r if isinstance(r, RecipientStatus) else RecipientStatus(r) for r in recipients
    )
    return Envelope("m1", sender, statuses, 0.0, 0.0, **kwargs)


def stored(message: bytes) -> bytes:
    stuffer = DotStuffer()
    return stuffer.feed(message) + stuffer.finish()


class WireTestsMixin:
    extensions: dict = {}

    def setUp(self):
        self.protocol = RelayClientProtocol(task.Clock(), 30)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(b"220 hi\r\n")
        self.session = RelaySession(self.protocol, dict(self.extensions))

    def deliver(self, env, *replies, message=b"Subject: x\r\n\r\nbody\r\n"):
        """Send C{env}'s message, answering each command in turn; (sent, results)."""
        d = self.session.deliver(
            env.sender,
            [r.address for r in env.recipients],
            io.BytesIO(stored(message)),
            len(message),
            False,
            env,
        )
        sent = []
        for reply in replies:
            while self.transport.producer is not None:
                self.transport.producer.resumeProducing()
            sent.append(self.transport.value())
            self.transport.clear()
            self.protocol.dataReceived(reply + b"\r\n")
        sent.append(self.transport.value())
        return sent, self.successResultOf(d)


class WithoutExtensionsTests(WireTestsMixin, unittest.TestCase):
    """A relay that offers neither SMTPUTF8, DSN nor CHUNKING."""

    extensions = {"8BITMIME": ""}

    def test_aLabelsWhenNeeded(self):
        """
        SMTPUTF8 mail whose local parts are ASCII goes on with its domains
        as A-labels, and without the SMTPUTF8 parameter.
        """
        env = envelope("alice@bücher.example", ["bob@bücher.example"], smtputf8=True)
        sent, results = self.deliver(env, b"250 ok", b"250 ok", b"354 go", b"250 done")
        self.assertEqual(
            sent[:2],
            [
                b"MAIL FROM:<alice@xn--bcher-kva.example>\r\n",
                b"RCPT TO:<bob@xn--bcher-kva.example>\r\n",
            ],
        )
        self.assertEqual(results["bob@bücher.example"].text, "250 done")

    def test_utf8LocalPartFailsHere(self):
        """
        A recipient whose local part is UTF-8 fails here with 553 5.6.7
        (RFC 6531 3.5); the others are still sent.
        """
        env = envelope(
            "alice@example.org", ["jörg@remote.example", "bob@remote.example"], smtputf8=True
        )
        sent, results = self.deliver(env, b"250 ok", b"250 ok", b"354 go", b"250 done")
        self.assertEqual(sent[1], b"RCPT TO:<bob@remote.example>\r\n")
        refused = results["jörg@remote.example"]
        self.assertEqual((refused.code, refused.local), (553, True))
        self.assertTrue(refused.text.startswith("5.6.7 "))
        self.assertEqual(results["bob@remote.example"].code, 250)

    def test_utf8SenderFailsAll(self):
        """A UTF-8 sender local part cannot go at all: every recipient fails with 5.6.7."""
        env = envelope("jörg@example.org", ["bob@remote.example"], smtputf8=True)
        sent, results = self.deliver(env)
        self.assertEqual(sent, [b""])
        self.assertTrue(results["bob@remote.example"].text.startswith("5.6.7 "))

    def test_utf8HeadersFailAll(self):
        """UTF-8 header fields (RFC 6532) cannot be downgraded: 5.6.9 for every recipient."""
        env = envelope(recipients=["bob@remote.example"], smtputf8=True, headers8bit=True)
        sent, results = self.deliver(env)
        self.assertEqual(sent, [b""])
        self.assertEqual(results["bob@remote.example"].code, 554)
        self.assertTrue(results["bob@remote.example"].text.startswith("5.6.9 "))

    def test_noDSNParameters(self):
        """Without DSN on offer, no NOTIFY, ORCPT, RET or ENVID is sent."""
        env = envelope(
            recipients=[
                RecipientStatus("bob@remote.example", notify=("NEVER",), orcpt="rfc822;x@y.test")
            ],
            ret="HDRS",
            envid="E1",
        )
        sent, _ = self.deliver(env, b"250 ok", b"250 ok", b"354 go", b"250 done")
        self.assertEqual(
            sent[:2], [b"MAIL FROM:<alice@example.org>\r\n", b"RCPT TO:<bob@remote.example>\r\n"]
        )


class WithExtensionsTests(WireTestsMixin, unittest.TestCase):
    """A relay that offers SMTPUTF8, DSN and CHUNKING."""

    extensions = {"SMTPUTF8": "", "DSN": "", "CHUNKING": "", "8BITMIME": ""}

    def test_smtputf8AndDSNPassedOn(self):
        """
        UTF-8 addresses go as they are with SMTPUTF8; RET, ENVID, NOTIFY and
        ORCPT are passed on (RFC 3461 5.2.1); a UTF-8 ORCPT keeps its form.
        """
        env = envelope(
            "jörg@bücher.example",
            [
                RecipientStatus(
                    "anna@exämple.org",
                    notify=("SUCCESS", "FAILURE"),
                    orcpt="utf-8;Anna@exämple.org",
                ),
                RecipientStatus("bob@remote.example"),
            ],
            smtputf8=True,
            ret="FULL",
            envid="ID+2B1",
        )
        sent, results = self.deliver(env, b"250 ok", b"250 ok", b"250 ok", b"250 done")
        self.assertEqual(
            sent[0], "MAIL FROM:<jörg@bücher.example> SMTPUTF8 RET=FULL ENVID=ID+2B1\r\n".encode()
        )
        self.assertEqual(
            sent[1],
            "RCPT TO:<anna@exämple.org> NOTIFY=SUCCESS,FAILURE "
            "ORCPT=utf-8;Anna@exämple.org\r\n".encode(),
        )
        self.assertEqual(sent[2], b"RCPT TO:<bob@remote.example>\r\n")
        self.assertTrue(self.session.dsn)

    def test_bdatUndoesStuffing(self):
        """
        The stored message goes as BDAT chunks of the message itself: the
        dot-stuffing undone, nothing added, the last chunk marked LAST.
        """
        message = b".dot\r\n" + b"x" * (BDAT_CHUNK + 10) + b"\r\n.\r\n..two\r\n"
        env = envelope()
        sent, results = self.deliver(
            env, b"250 ok", b"250 ok", b"250 chunk", b"250 done", message=message
        )
        first, second = sent[2], sent[3]
        (firstCommand, firstChunk), (secondCommand, secondChunk) = (
            first.split(b"\r\n", 1),
            second.split(b"\r\n", 1),
        )
        self.assertEqual(firstCommand, b"BDAT %d" % (len(firstChunk),))
        self.assertEqual(secondCommand, b"BDAT %d LAST" % (len(secondChunk),))
        self.assertEqual(firstChunk + secondChunk, message)
        self.assertEqual(results["bob@remote.example"].text, "250 done")

    def test_bdatRefusalEnds(self):
        """
        A refused chunk ends the message: its reply is every accepted
        recipient's verdict, and no chunk follows, only the RSET that
        closes the transaction it may have left open.
        """
        message = b"y" * (BDAT_CHUNK * 2)
        sent, results = self.deliver(
            envelope(), b"250 ok", b"250 ok", b"552 5.3.4 too big", b"250 reset", message=message
        )
        self.assertEqual(sent[-2:], [b"RSET\r\n", b""])
        self.assertEqual(results["bob@remote.example"].code, 552)

    def test_noUTF8WhenNotAsked(self):
        """Mail that did not ask for SMTPUTF8 is sent without it, even when offered."""
        sent, _ = self.deliver(envelope(), b"250 ok", b"250 ok", b"250 done")
        self.assertEqual(sent[0], b"MAIL FROM:<alice@example.org>\r\n")


class SinkTests(unittest.TestCase):
    """The queue service and the real relay client against L{SMTPSink} with extensions."""

    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.events = QueueEvents()
        self.events.start(self)
        self.sink = SMTPSink(reactor, None, tls="none", credentials=None)
        self.sink.extensions = [b"SMTPUTF8", b"DSN", b"CHUNKING"]
        yield self.sink.start()
        self.addCleanup(self.sink.stop)
        self.directory = os.path.abspath(self.mktemp())
        config = relayConfig(
            host="127.0.0.1",
            port=self.sink.port,
            tls="none",
            timeout=5.0,
            retry_initial=0.1,
            retry_max=0.4,
        )
        self.queue = Queue(self.directory, reactor, "mail.example.org")
        self.service = QueueService(
            self.queue,
            config,
            reactor,
            RecordingLocalDelivery(["example.org"]),
            runBlocking=runInline,
            connector=RelayConnector(config, reactor, "mail.example.org"),
        )
        self.service.startService()
        self.addCleanup(self.service.stopService)

    @defer.inlineCallbacks
    def test_everyExtension(self):
        """
        A SMTPUTF8 message with DSN parameters goes to a relay offering all
        three extensions: SMTPUTF8, RET/ENVID, NOTIFY/ORCPT, and BDAT with
        exactly the submitted bytes.
        """
        message = "Subject: grüße\r\n\r\n.dot line\r\nbody\r\n".encode()
        writer = self.queue.newMessage(
            "m1",
            "jörg@bücher.example",
            [RecipientStatus("anna@exämple.org", notify=("FAILURE",), orcpt="rfc822;a+40b")],
            MessageOptions(smtputf8=True, ret="HDRS", envid="E"),
        )
        writer.write(message)
        writer.commit()
        self.service.wake()
        [transaction] = yield self.sink.waitForTransactions(1)
        self.assertEqual(transaction.data, message)
        self.assertEqual(transaction.sender, "jörg@bücher.example")
        self.assertEqual(transaction.recipients, ("anna@exämple.org",))
        self.assertIn("SMTPUTF8", transaction.mailParameters)
        self.assertIn("RET=HDRS ENVID=E", transaction.mailParameters)
        self.assertEqual(transaction.rcptParameters, ("NOTIFY=FAILURE ORCPT=rfc822;a+40b",))
        self.assertEqual(transaction.chunks, (len(message),))
        yield self.events.wait("removed", "m1")
