"""
Tests for L{mailauth.relay}: the client's wire protocol on a StringTransport,
and the whole forward path (queue, service, client) against L{SMTPSink} on
127.0.0.1 with the real reactor.
"""

from __future__ import annotations

import email
import email.policy
import io
import os

from twisted.internet import defer, reactor, task, threads
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailauth.forward import QueueService
from mailauth.queueadmin import listQueue
from mailauth.relay import (
    BDAT_CHUNK,
    RelayClientProtocol,
    RelayConnector,
    RelayError,
    RelaySession,
    loadCertificates,
)
from mailauth.spool import Queue
from mailauth.threads import ThreadPoolService
from tests.fakes import RecordingLocalDelivery, runInline
from tests.harness import MESSAGE as SUBMITTED
from tests.harness import PASSWORD, SHA512, Daemon, EndToEndMixin, LogWatcher
from tests.smtpsink import QueueEvents, SMTPSink, makePKI
from tests.support import MESSAGE, relayConfig

_pki = {}


def pki(name="default"):
    """A test PKI, made once per test run (key generation is not free)."""
    if name not in _pki:
        _pki[name] = makePKI()
    return _pki[name]


class TLSTransport(StringTransport):
    """A StringTransport that records C{startTLS}."""

    tlsStarted = None

    def startTLS(self, contextFactory):
        self.tlsStarted = contextFactory


class ProtocolTests(unittest.TestCase):
    """L{RelayClientProtocol} on a StringTransport and a Clock."""

    def setUp(self):
        self.clock = task.Clock()
        self.protocol = RelayClientProtocol(self.clock, 30)
        self.transport = TLSTransport()
        self.protocol.makeConnection(self.transport)

    def test_multilineReply(self):
        """A multi-line reply fires once, with every line."""
        greeting = self.protocol.greeting()
        self.protocol.dataReceived(b"220 hi\r\n")
        self.assertEqual(self.successResultOf(greeting).code, 220)
        reply = self.protocol.command(b"EHLO me")
        self.assertEqual(self.transport.value(), b"EHLO me\r\n")
        self.protocol.dataReceived(b"250-relay\r\n250-SIZE 10\r")
        self.assertNoResult(reply)
        self.protocol.dataReceived(b"\n250 AUTH PLAIN\r\n")
        result = self.successResultOf(reply)
        self.assertEqual(result.lines, ("250-relay", "250-SIZE 10", "250 AUTH PLAIN"))
        self.assertEqual(result.text, "250-relay 250-SIZE 10 250 AUTH PLAIN")

    def test_starttlsInjection(self):
        """
        D31: bytes that arrive with the 220 to STARTTLS, before the
        handshake, make the client abort instead of starting TLS.
        """
        self.protocol.dataReceived(b"220 hi\r\n")
        reply = self.protocol.startTLS(object())
        self.protocol.dataReceived(b"220 go\r\n250-injected\r\n250 AUTH LOGIN\r\n")
        self.assertIn("STARTTLS", str(self.failureResultOf(reply, RelayError).value))
        self.assertIsNone(self.transport.tlsStarted)
        self.assertTrue(self.transport.disconnecting)

    def test_starttls(self):
        """A clean 220 to STARTTLS starts TLS with the given settings."""
        self.protocol.dataReceived(b"220 hi\r\n")
        creator = object()
        reply = self.protocol.startTLS(creator)
        self.protocol.dataReceived(b"220 go\r\n")
        self.assertEqual(self.successResultOf(reply).code, 220)
        self.assertIs(self.transport.tlsStarted, creator)

    def test_timeout(self):
        """A relay that stops answering is dropped after the timeout."""
        greeting = self.protocol.greeting()
        self.clock.advance(29)
        self.assertNoResult(greeting)
        self.clock.advance(1)
        self.failureResultOf(greeting, RelayError)
        self.assertTrue(self.transport.disconnecting)

    def test_finalDotWaitsTenMinutes(self):
        """
        The reply to the final dot (or to the last BDAT chunk) is waited for
        ten minutes however short the timeout (RFC 5321 4.5.3.2.6): the
        relay may scan the message first, and giving up sooner makes it get
        the message again.
        """
        self.protocol.dataReceived(b"220 hi\r\n")
        reply = self.protocol.sendMessage(io.BytesIO(b"x\r\n"))
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        self.assertTrue(self.transport.value().endswith(b"x\r\n.\r\n"))
        self.clock.advance(599)
        self.assertNoResult(reply)
        self.clock.advance(1)
        self.assertIn("600 seconds", str(self.failureResultOf(reply, RelayError).value))

        protocol = RelayClientProtocol(self.clock, 30)
        protocol.makeConnection(TLSTransport())
        protocol.dataReceived(b"220 hi\r\n")
        chunk = protocol.sendChunk(b"x", last=False)
        self.clock.advance(30)
        self.failureResultOf(chunk, RelayError)
        protocol = RelayClientProtocol(self.clock, 30)
        protocol.makeConnection(TLSTransport())
        protocol.dataReceived(b"220 hi\r\n")
        last = protocol.sendChunk(b"x", last=True)
        self.clock.advance(599)
        self.assertNoResult(last)
        protocol.dataReceived(b"250 ok\r\n")
        self.assertEqual(self.successResultOf(last).code, 250)

    def test_malformed(self):
        """Garbage, a code change within a reply, or unsolicited replies abort."""
        for data in (b"hello\r\n", b"250-a\r\n251 b\r\n", b"220 hi\r\n250 extra\r\n"):
            protocol = RelayClientProtocol(self.clock, 30)
            transport = StringTransport()
            protocol.makeConnection(transport)
            greeting = protocol.greeting()
            protocol.dataReceived(data)
            self.assertTrue(transport.disconnecting, data)
            protocol.connectionLost(Failure(ConnectionDone()))
            if data.startswith(b"220"):
                self.successResultOf(greeting)
            else:
                self.failureResultOf(greeting, RelayError)

    def test_longLine(self):
        """An endless reply line is refused, not buffered."""
        greeting = self.protocol.greeting()
        self.protocol.dataReceived(b"220 " + b"x" * 10000)
        self.failureResultOf(greeting, RelayError)


class SessionTests(unittest.TestCase):
    """L{RelaySession} transactions on a StringTransport."""

    def setUp(self):
        self.protocol = RelayClientProtocol(task.Clock(), 30)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(b"220 hi\r\n")
        self.successResultOf(self.protocol.greeting())
        self.session = RelaySession(self.protocol, {"SIZE": "1000000", "8BITMIME": ""})

    def exchange(self, d, *replies):
        """Answer each command C{d} sends; return what was sent."""
        sent = []
        for reply in replies:
            while self.transport.producer is not None:
                self.transport.producer.resumeProducing()
            sent.append(self.transport.value())
            self.transport.clear()
            self.protocol.dataReceived(reply + b"\r\n")
        return sent

    def test_transaction(self):
        """
        MAIL with SIZE and BODY, one RCPT each, DATA, the stored bytes as
        they are and the final dot; each recipient gets its own verdict.
        """
        stored = b"..starts with a dot\r\n\xff\r\n"
        d = self.session.deliver("a@x.test", ["b@y.test", "c@y.test"], io.BytesIO(stored), 42, True)
        sent = self.exchange(d, b"250 ok", b"250 ok", b"550 5.1.1 no", b"354 go", b"250 queued")
        self.assertEqual(
            sent,
            [
                b"MAIL FROM:<a@x.test> SIZE=42 BODY=8BITMIME\r\n",
                b"RCPT TO:<b@y.test>\r\n",
                b"RCPT TO:<c@y.test>\r\n",
                b"DATA\r\n",
                stored + b".\r\n",
            ],
        )
        results = self.successResultOf(d)
        self.assertEqual(
            {k: v.text for k, v in results.items()},
            {"b@y.test": "250 queued", "c@y.test": "550 5.1.1 no"},
        )
        d = self.session.deliver("", ["b@y.test"], io.BytesIO(b""), 0, False)
        [first, reset] = self.exchange(d, b"451 4.3.0 later", b"250 reset")
        self.assertEqual(first, b"MAIL FROM:<> SIZE=0\r\n")
        # The refused transaction is reset before the next message.
        self.assertEqual(reset, b"RSET\r\n")
        self.assertEqual(self.successResultOf(d)["b@y.test"].code, 451)
        d = self.session.deliver("", ["b@y.test"], io.BytesIO(b""), 0, False)
        sent = self.exchange(d, b"250 ok", b"250 ok", b"354 go", b"250 ok")
        self.assertEqual(sent[0], b"MAIL FROM:<> SIZE=0\r\n")
        self.assertEqual(sent[-1], b".\r\n")

    def test_eightBitWithout8BITMIME(self):
        """
        8-bit content for a relay that does not offer 8BITMIME is returned
        (RFC 6152 3: convert or return; converting would break a DKIM
        signature), with 5.6.3, before any command is sent; 7-bit content
        goes.
        """
        self.session = RelaySession(self.protocol, {"SIZE": "1000000"})
        d = self.session.deliver("a@x.test", ["b@y.test"], io.BytesIO(b"\xff\r\n"), 3, True)
        result = self.successResultOf(d)["b@y.test"]
        self.assertEqual(
            (result.code, result.text),
            (554, "5.6.3 the relay does not offer 8BITMIME and the message has 8-bit content"),
        )
        self.assertEqual(self.transport.value(), b"")
        d = self.session.deliver("a@x.test", ["b@y.test"], io.BytesIO(b"x\r\n"), 3, False)
        [first] = self.exchange(d, b"451 later")
        self.assertEqual(first, b"MAIL FROM:<a@x.test> SIZE=3\r\n")

    def test_refusedChunkThenReset(self):
        """
        A BDAT chunk refused before the last leaves the relay's transaction
        open, maybe: it is reset before the next message, so that its MAIL
        is not taken for a nested one (and bounced for a 503 that was not
        its).
        """
        self.session = RelaySession(self.protocol, {"CHUNKING": ""})
        message = b"x" * (BDAT_CHUNK + 10)
        d = self.session.deliver("a@x.test", ["b@y.test"], io.BytesIO(message), 0, False)
        sent = self.exchange(d, b"250 ok", b"250 ok", b"552 5.3.4 too big", b"250 reset")
        self.assertTrue(sent[-2].startswith(b"BDAT %d\r\n" % BDAT_CHUNK), sent[-2][:20])
        self.assertEqual(sent[-1], b"RSET\r\n")
        self.assertEqual(self.successResultOf(d)["b@y.test"].code, 552)
        d = self.session.deliver("a@x.test", ["b@y.test"], io.BytesIO(b"hi\r\n"), 0, False)
        sent = self.exchange(d, b"250 ok", b"250 ok", b"250 done")
        self.assertEqual(sent[0], b"MAIL FROM:<a@x.test>\r\n")
        self.assertEqual(sent[-1], b"BDAT 4 LAST\r\nhi\r\n")
        self.assertEqual(self.successResultOf(d)["b@y.test"].code, 250)
        # A message that went through whole leaves nothing to reset.
        d = self.session.deliver("a@x.test", ["b@y.test"], io.BytesIO(b"hi\r\n"), 0, False)
        [first] = self.exchange(d, b"451 later")
        self.assertEqual(first, b"MAIL FROM:<a@x.test>\r\n")

    def test_unexpectedIntermediate(self):
        """A 354 where no data was asked for is a protocol error, not a verdict."""
        d = self.session.deliver("a@x.test", ["b@y.test"], io.BytesIO(b""), 0, False)
        self.exchange(d, b"354 what")
        self.failureResultOf(d, RelayError)

    def test_closing(self):
        """A 421 ends the session."""
        d = self.session.deliver("a@x.test", ["b@y.test"], io.BytesIO(b""), 0, False)
        self.exchange(d, b"250 ok", b"421 4.3.2 shutting down")
        self.failureResultOf(d, RelayError)


class CertificateTests(unittest.TestCase):
    """L{loadCertificates}."""

    def test_bundle(self):
        """Every certificate of a bundle is loaded."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"junk\n" + pki().caPEM + pki().certificatePEM)
        self.assertEqual(len(loadCertificates(path)), 2)

    def test_missing(self):
        """A missing file or one without certificates is a RelayError."""
        self.assertRaises(RelayError, loadCertificates, self.mktemp())
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"nothing here")
        self.assertRaises(RelayError, loadCertificates, path)


class EndToEndTests(unittest.TestCase):
    """
    The queue service with the real relay client against L{SMTPSink} on
    127.0.0.1; the tests wait on Deferreds, never on time.
    """

    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.events = QueueEvents()
        self.events.start(self)
        self.sink = SMTPSink(reactor, pki())
        yield self.sink.start()
        self.addCleanup(self.sink.stop)
        self.directory = os.path.abspath(self.mktemp())
        self.caFile = self.writeFile(pki().caPEM)
        self.passwordFile = self.writeFile(b"relay secret\nignored\n")
        self.local = RecordingLocalDelivery(["example.org"])

    def writeFile(self, data: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def config(self, **overrides):
        values = dict(
            host="127.0.0.1",
            port=self.sink.port,
            username="relay-user",
            password_file=self.passwordFile,
            ca_file=self.caFile,
            retry_initial=0.1,
            retry_max=0.4,
            timeout=5.0,
            queue_interval=60.0,
        )
        values.update(overrides)
        return relayConfig(**values)

    def startService(self, config=None, runBlocking=runInline):
        queue = Queue(self.directory, reactor, "mail.example.org")
        config = config or self.config()
        service = QueueService(
            queue,
            config,
            reactor,
            self.local,
            runBlocking=runBlocking,
            connector=RelayConnector(config, reactor, queue.hostname),
        )
        service.startService()
        self.addCleanup(service.stopService)
        return queue, service

    def submit(
        self,
        queue,
        service,
        msgid,
        message=MESSAGE,
        sender="alice@example.org",
        recipients=("bob@remote.example",),
        chunk=None,
    ):
        writer = queue.newMessage(msgid, sender, list(recipients))
        chunk = chunk or len(message) or 1
        for i in range(0, len(message), chunk):
            writer.write(message[i : i + chunk])
        writer.commit()
        service.wake()

    def assertQueued(self, msgid):
        self.assertIn(msgid, [m["id"] for m in listQueue(self.directory)])

    @defer.inlineCallbacks
    def test_delivered(self):
        """
        A message goes through STARTTLS and AUTH PLAIN to the relay; the
        relay gets exactly the submitted bytes, and the queue is emptied.
        """
        queue, service = self.startService()
        self.submit(queue, service, "m1")
        [transaction] = yield self.sink.waitForTransactions(1)
        self.assertEqual(transaction.data, MESSAGE)
        self.assertEqual(transaction.sender, "alice@example.org")
        self.assertEqual(transaction.recipients, ("bob@remote.example",))
        self.assertEqual((transaction.tls, transaction.login), (True, "relay-user"))
        self.assertIn("SIZE=", transaction.mailParameters)
        yield self.events.wait("removed", "m1")
        self.assertEqual(listQueue(self.directory), [])
        self.assertIn(b"AUTH PLAIN", b" ".join(self.sink.commands))

    @defer.inlineCallbacks
    def test_sizeIsTheMessages(self):
        """
        MAIL FROM's SIZE is the message's size as RFC 1870 counts it (CRLF
        line ends, not the dots stuffing adds, however the message came in
        chunks): it was the stored, stuffed size, a few bytes too many, and
        a message at the relay's very limit was refused.
        """
        message = b"Subject: dots\r\n\r\n.one\r\n..two\r\nplain\r\n.\r\n"
        queue, service = self.startService()
        self.submit(queue, service, "m1", message=message, chunk=3)
        [transaction] = yield self.sink.waitForTransactions(1)
        self.assertEqual(transaction.data, message)
        self.assertEqual(transaction.mailParameters, f"SIZE={len(message)}")

    @defer.inlineCallbacks
    def test_authLoginOnly(self):
        """When the relay offers only LOGIN, the client uses it."""
        self.sink.mechanisms = b"LOGIN"
        queue, service = self.startService()
        self.submit(queue, service, "m1")
        [transaction] = yield self.sink.waitForTransactions(1)
        self.assertEqual(transaction.login, "relay-user")
        self.assertIn(b"AUTH LOGIN", self.sink.commands)

    @defer.inlineCallbacks
    def test_implicitTLS(self):
        """With tls = implicit the client speaks TLS from the first byte."""
        yield self.sink.stop()
        self.sink = SMTPSink(reactor, pki(), tls="implicit")
        yield self.sink.start()
        self.addCleanup(self.sink.stop)
        queue, service = self.startService(self.config(tls="implicit"))
        self.submit(queue, service, "m1")
        [transaction] = yield self.sink.waitForTransactions(1)
        self.assertEqual((transaction.tls, transaction.data), (True, MESSAGE))
        self.assertNotIn(b"STARTTLS", self.sink.commands)

    @defer.inlineCallbacks
    def test_noTLS(self):
        """With tls = none and no username, plain SMTP; a thread pool does the disk work."""
        yield self.sink.stop()
        self.sink = SMTPSink(reactor, None, tls="none", credentials=None)
        yield self.sink.start()
        self.addCleanup(self.sink.stop)
        pool = ThreadPoolService(reactor, "test-queue-disk", 2, maxQueued=100)
        pool.startService()
        self.addCleanup(pool.stopService)
        queue, service = self.startService(
            self.config(tls="none", username=None, password_file=None), runBlocking=pool.run
        )
        self.submit(queue, service, "m1")
        [transaction] = yield self.sink.waitForTransactions(1)
        self.assertEqual((transaction.tls, transaction.data), (False, MESSAGE))
        yield self.events.wait("removed", "m1")

    @defer.inlineCallbacks
    def test_downThenUp(self):
        """
        While the relay is down the message stays queued; once it is back
        up, the retry delivers it.
        """
        port = self.sink.port
        yield self.sink.stop()
        queue, service = self.startService(self.config(port=port))
        self.submit(queue, service, "m1")
        yield self.events.wait("deferred", "m1", count=2)
        self.assertQueued("m1")
        self.assertIn("cannot connect", listQueue(self.directory)[0]["last_error"])
        self.sink = SMTPSink(reactor, pki())
        yield self.sink.start(port)
        self.addCleanup(self.sink.stop)
        [transaction] = yield self.sink.waitForTransactions(1)
        self.assertEqual(transaction.data, MESSAGE)
        yield self.events.wait("removed", "m1")

    @defer.inlineCallbacks
    def test_temporaryThenPermanent(self):
        """
        Per-recipient replies: a 4xx is retried, a 5xx fails that recipient
        only, and the sender gets a bounce for it through the relay, from <>.
        """
        self.sink.rcptReplies = {
            "a@remote.example": [b"451 4.3.0 try later"],
            "b@remote.example": [b"550 5.1.1 no such user"],
        }
        queue, service = self.startService()
        self.submit(
            queue,
            service,
            "m1",
            sender="alice@elsewhere.example",
            recipients=("a@remote.example", "b@remote.example"),
        )
        transactions = yield self.sink.waitForTransactions(2)
        yield self.events.wait("removed", "m1")
        byRecipient = {t.recipients: t for t in transactions}
        self.assertEqual(byRecipient[("a@remote.example",)].data, MESSAGE)
        bounce = byRecipient[("alice@elsewhere.example",)]
        self.assertEqual(bounce.sender, "")
        report = email.message_from_bytes(bounce.data, policy=email.policy.default)
        status = report.get_payload()[1].get_payload()[1]
        self.assertEqual(
            (
                status["Final-Recipient"],
                status["Action"],
                status["Status"],
                status["Diagnostic-Code"],
            ),
            ("rfc822; b@remote.example", "failed", "5.1.1", "smtp; 550 5.1.1 no such user"),
        )
        self.assertEqual(self.events.kinds("m1")[:3], ["deferred", "bounced", "bounce"])

    @defer.inlineCallbacks
    def test_dataRejected(self):
        """A 5xx at the end of DATA fails every accepted recipient."""
        self.sink.dataReplies = {"END": [b"554 5.6.0 content rejected"]}
        queue, service = self.startService()
        self.submit(queue, service, "m1", sender="")
        yield self.events.wait("removed", "m1")
        self.assertEqual(self.sink.transactions, [])
        self.assertEqual(self.events.kinds("m1"), ["bounced", "removed"])

    @defer.inlineCallbacks
    def test_hangUpAfterTheDot(self):
        """
        A relay that hangs up after the final dot without a reply has not
        taken the message: it is deferred, not marked delivered, stays
        queued, and goes at the next attempt.
        """
        self.sink.dataReplies = {"END": [None]}
        queue, service = self.startService()
        self.submit(queue, service, "m1")
        [transaction] = yield self.sink.waitForTransactions(1)
        self.assertEqual(transaction.data, MESSAGE)
        yield self.events.wait("removed", "m1")
        self.assertEqual(self.events.kinds("m1"), ["deferred", "sent", "removed"])
        self.assertEqual(len(self.sink.connections), 2)

    @defer.inlineCallbacks
    def test_stopDoesNotWaitForQuit(self):
        """
        Stopping the queue does not wait for a relay's reply to QUIT: the
        session is cut. It waited the whole C{[relay] timeout} (here a
        minute, longer than this test may take), holding up the daemon's
        stop.
        """
        self.sink.quitReply = None
        queue, service = self.startService(self.config(timeout=60.0))
        self.submit(queue, service, "m1")
        yield self.events.wait("removed", "m1")
        while b"QUIT" not in self.sink.commands:
            yield task.deferLater(reactor, 0.01, lambda: None)
        yield service.stopService()
        self.assertEqual(self.sink.commands[-1], b"QUIT")

    test_stopDoesNotWaitForQuit.timeout = 10  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_restartWithFullQueue(self):
        """
        Messages deferred by one daemon are delivered by the next one on the
        same directory.
        """
        port = self.sink.port
        yield self.sink.stop()
        queue, service = self.startService(self.config(port=port))
        for i in range(3):
            self.submit(queue, service, f"m{i}")
        for i in range(3):
            yield self.events.wait("deferred", f"m{i}")
        yield service.stopService()
        self.assertEqual(len(listQueue(self.directory)), 3)
        self.sink = SMTPSink(reactor, pki())
        yield self.sink.start(port)
        self.addCleanup(self.sink.stop)
        self.startService(self.config(port=port))
        transactions = yield self.sink.waitForTransactions(3)
        self.assertEqual([t.data for t in transactions], [MESSAGE] * 3)
        for i in range(3):
            yield self.events.wait("removed", f"m{i}")
        self.assertEqual(listQueue(self.directory), [])

    @defer.inlineCallbacks
    def test_crashBeforeCommit(self):
        """
        A message written but never committed (the daemon was killed before
        its 250) is never sent and its files are removed at the next start.
        """
        crashed = Queue(self.directory, reactor, "mail.example.org")
        writer = crashed.newMessage("crashed", "alice@example.org", ["bob@remote.example"])
        writer.write(MESSAGE)
        writer._file.close()
        del crashed, writer
        queue, service = self.startService()
        self.assertEqual(os.listdir(os.path.join(self.directory, "tmp")), [])
        self.submit(queue, service, "m1", message=b"Subject: second\r\n\r\nsecond\r\n")
        yield self.events.wait("removed", "m1")
        self.assertEqual(
            [t.data for t in self.sink.transactions], [b"Subject: second\r\n\r\nsecond\r\n"]
        )
        self.assertEqual(self.events.kinds("crashed"), [])

    @defer.inlineCallbacks
    def test_dotStuffingAtStart(self):
        """
        D30: a message starting with a lone dot line arrives whole, in one
        transaction; it cannot end DATA and inject commands.
        """
        message = b".\r\nRCPT TO:<injected@evil.test>\r\nbody\r\n"
        queue, service = self.startService()
        self.submit(queue, service, "m1", message=message)
        yield self.events.wait("removed", "m1")
        [transaction] = self.sink.transactions
        self.assertEqual(transaction.data, message)
        self.assertNotIn(b"RCPT TO:<injected@evil.test>", self.sink.commands)

    @defer.inlineCallbacks
    def test_dotStuffingAtChunkBoundaries(self):
        """
        D30: dot lines (and a whole smuggled transaction) right at the 16 KiB
        and 64 KiB boundaries, written in chunks that end there, arrive
        intact in exactly one transaction.
        """
        smuggled = (
            b".\r\nMAIL FROM:<smuggled@evil.test>\r\nRCPT TO:<victim@example.test>\r\n"
            b"DATA\r\nSubject: smuggled\r\n\r\nforged\r\n.\r\n"
        )
        message = b"Subject: big\r\n\r\n"
        for boundary in (16384, 65536):
            filler = boundary - len(message) - 2
            lines = [b"x" * 998] * (filler // 1000) + [b"y" * (filler % 1000)]
            message += b"\r\n".join(lines) + b"\r\n"
            self.assertEqual(len(message), boundary)
            message += smuggled
        queue, service = self.startService()
        self.submit(queue, service, "m1", message=message, chunk=16384)
        yield self.events.wait("removed", "m1")
        [transaction] = self.sink.transactions
        self.assertEqual(transaction.data, message)
        self.assertNotIn(b"MAIL FROM:<smuggled@evil.test>", self.sink.commands)
        self.assertEqual(len([c for c in self.sink.commands if c.startswith(b"MAIL")]), 1)

    @defer.inlineCallbacks
    def test_starttlsInjection(self):
        """
        D31: a relay (or a man in the middle) that sends extra replies with
        its 220 to STARTTLS gets the connection aborted; nothing else is
        said, and the message stays queued.
        """
        self.sink.starttlsReply = b"220 go\r\n250-injected\r\n250 AUTH LOGIN\r\n"
        queue, service = self.startService(self.config(retry_initial=60))
        self.submit(queue, service, "m1")
        yield self.events.wait("deferred", "m1")
        yield self.sink.waitForDisconnects(1)
        self.assertEqual([c.split()[0] for c in self.sink.commands], [b"EHLO", b"STARTTLS"])
        self.assertQueued("m1")
        self.assertIn("STARTTLS", listQueue(self.directory)[0]["last_error"])

    @defer.inlineCallbacks
    def test_wrongCA(self):
        """A relay certificate from another CA is refused; the message is retried later."""
        queue, service = self.startService(
            self.config(ca_file=self.writeFile(pki("other").caPEM), retry_initial=60)
        )
        self.submit(queue, service, "m1")
        yield self.events.wait("deferred", "m1")
        self.assertEqual(self.sink.transactions, [])
        self.assertQueued("m1")
        self.assertNotIn(b"MAIL", b" ".join(self.sink.commands))
        self.assertIn("certificate verify failed", listQueue(self.directory)[0]["last_error"])

    @defer.inlineCallbacks
    def test_wrongHostname(self):
        """A certificate that is not valid for the relay's name is refused."""
        yield self.sink.stop()
        self.sink = SMTPSink(reactor, pki())
        # 127.0.0.2 is loopback too, but not in the certificate.
        yield self.sink.start(interface="127.0.0.2")
        self.addCleanup(self.sink.stop)
        queue, service = self.startService(
            self.config(host="127.0.0.2", port=self.sink.port, retry_initial=60)
        )
        self.submit(queue, service, "m1")
        yield self.events.wait("deferred", "m1")
        self.assertEqual(self.sink.transactions, [])
        self.assertQueued("m1")
        self.assertIn("Mismatch", listQueue(self.directory)[0]["last_error"])

    @defer.inlineCallbacks
    def useCertificate(self, issued, tls="starttls"):
        """Restart the sink with the certificate C{issued}, from the test CA."""
        yield self.sink.stop()
        self.sink = SMTPSink(reactor, issued, tls=tls)
        yield self.sink.start()
        self.addCleanup(self.sink.stop)

    @defer.inlineCallbacks
    def assertCertificateRefused(self, issued, why, tls="starttls"):
        """
        Relaying to C{localhost}, whose certificate is C{issued} (from the
        trusted CA): the handshake fails, the relay gets neither AUTH nor
        mail, the message stays queued, and the attempt is one log line
        saying C{why}, with no traceback.
        """
        yield self.useCertificate(issued, tls)
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        queue, service = self.startService(self.config(host="localhost", tls=tls, retry_initial=60))
        self.submit(queue, service, "m1")
        yield self.events.wait("deferred", "m1")
        yield self.sink.waitForDisconnects(1)
        self.assertEqual(self.sink.transactions, [])
        self.assertEqual(
            [c.split()[0] for c in self.sink.commands],
            [b"EHLO", b"STARTTLS"] if tls == "starttls" else [],
        )
        self.assertQueued("m1")
        self.assertIn(why, listQueue(self.directory)[0]["last_error"])
        self.assertEqual([e for e in watcher.events if "log_failure" in e], [])
        [line] = watcher.matching("certificate")
        self.assertIn("status=deferred (certificate of localhost refused: ", line)
        self.assertIn(why, line)

    @defer.inlineCallbacks
    def test_rightSubjectAltName(self):
        """
        A certificate from the trusted CA whose subjectAltName names the
        relay host (a DNS name here) is accepted: the message is delivered.
        """
        yield self.useCertificate(pki().issue(names=("localhost",)))
        queue, service = self.startService(self.config(host="localhost"))
        self.submit(queue, service, "m1")
        [transaction] = yield self.sink.waitForTransactions(1)
        self.assertEqual((transaction.tls, transaction.login), (True, "relay-user"))

    def test_noSubjectAltName(self):
        """
        Issue #10 item 1: a certificate from the trusted CA with no
        subjectAltName, whose common name is the relay host, is refused
        (Twisted 26 let it through: service_identity's CertificateError
        was logged and ignored; Twisted 22.4's service_identity falls back
        to the common name).
        """
        return self.assertCertificateRefused(
            pki().issue(commonName="localhost"), "it has no subjectAltName"
        )

    def test_noSubjectAltNameImplicitTLS(self):
        """The same refusal with tls = implicit."""
        return self.assertCertificateRefused(
            pki().issue(commonName="localhost"), "it has no subjectAltName", tls="implicit"
        )

    def test_wrongSubjectAltName(self):
        """
        A certificate from the trusted CA whose subjectAltName names
        another host is refused, even when its common name is the relay's.
        """
        return self.assertCertificateRefused(
            pki().issue(names=("wrong.example",), commonName="localhost"),
            "it does not name localhost",
        )

    @defer.inlineCallbacks
    def test_noVerification(self):
        """With verify_certificate = no, a certificate from an unknown CA is accepted."""
        queue, service = self.startService(
            self.config(ca_file=self.writeFile(pki("other").caPEM), verify_certificate=False)
        )
        self.submit(queue, service, "m1")
        [transaction] = yield self.sink.waitForTransactions(1)
        self.assertTrue(transaction.tls)

    @defer.inlineCallbacks
    def test_starttlsRequired(self):
        """A relay that does not offer STARTTLS gets no mail and no password."""
        self.sink.tls = "none"
        queue, service = self.startService(self.config(retry_initial=60))
        self.submit(queue, service, "m1")
        yield self.events.wait("deferred", "m1")
        self.assertNotIn(b"AUTH", b" ".join(self.sink.commands))
        self.assertIn("does not offer STARTTLS", listQueue(self.directory)[0]["last_error"])

    @defer.inlineCallbacks
    def test_stopWhileRelaySilent(self):
        """
        Stopping the service while the relay has not even greeted ends the
        connection at once (not after the timeout); the message stays queued.
        """
        self.sink.greeting = None
        queue, service = self.startService(self.config(timeout=60.0))
        self.submit(queue, service, "m1")
        yield self.sink.waitForConnections(1)
        yield service.stopService()
        yield self.sink.waitForDisconnects(1)
        self.assertQueued("m1")

    @defer.inlineCallbacks
    def test_badPassword(self):
        """Refused credentials defer the message (a configuration problem, not a bounce)."""
        queue, service = self.startService(
            self.config(password_file=self.writeFile(b"wrong\n"), retry_initial=60)
        )
        self.submit(queue, service, "m1")
        yield self.events.wait("deferred", "m1")
        self.assertQueued("m1")
        self.assertIn("535", listQueue(self.directory)[0]["last_error"])


class DaemonForwardTests(unittest.TestCase):
    """
    The issue's acceptance test: the daemon built by L{mailauth.tap} with a
    C{[relay]}, an authenticated submission to a remote address, and the
    upstream sink receiving it.
    """

    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.events = QueueEvents()
        self.events.start(self)
        self.sink = SMTPSink(reactor, pki())
        yield self.sink.start()
        self.addCleanup(self.sink.stop)
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        caFile = os.path.join(base, "ca.pem")
        passwordFile = os.path.join(base, "relay-password")
        with open(caFile, "wb") as f:
            f.write(pki().caPEM)
        with open(passwordFile, "w") as f:
            f.write("relay secret\n")
        self.daemon = Daemon(
            os.path.join(base, "daemon"),
            extra=f"\n[relay]\nhost = 127.0.0.1\nport = {self.sink.port}\ntls = starttls\n"
            f"username = relay-user\npassword_file = {passwordFile}\nca_file = {caFile}\n",
        )
        self.addCleanup(self.daemon.stop)
        self.daemon.start()

    @defer.inlineCallbacks
    def test_forwarded(self):
        """
        A message an authenticated user sends to bob@remote.example arrives
        upstream with the same bytes after our Received header.
        """
        submitter = EndToEndMixin()
        submitter.daemon = self.daemon
        submitter.inThread = lambda f, *args: threads.deferToThread(f, *args)
        result = yield submitter.submit(
            "submission", "PLAIN", SHA512, PASSWORD, recipients=("bob@remote.example",)
        )
        self.assertEqual(result, {})
        [transaction] = yield self.sink.waitForTransactions(1)
        self.assertEqual(
            (transaction.sender, transaction.recipients), (SHA512, ("bob@remote.example",))
        )
        received, _, rest = transaction.data.partition(b"\r\nFrom: ")
        # No Return-Path: the relay is not the final hop (RFC 5321 4.4).
        self.assertTrue(received.startswith(b"Received: from client.example"), received)
        self.assertIn(b"with ESMTPSA", received)
        self.assertEqual(b"From: " + rest, SUBMITTED)
        yield self.events.wait("removed")
        self.assertEqual(listQueue(os.path.join(self.daemon.dir, "state", "queue")), [])

    @defer.inlineCallbacks
    def test_forwardedCompleted(self):
        """
        A submission without Date and Message-ID (RFC 6409 8.2, 8.3) reaches
        the relay with both, at the end of its header section.
        """
        submitter = EndToEndMixin()
        submitter.daemon = self.daemon
        submitter.inThread = lambda f, *args: threads.deferToThread(f, *args)
        yield submitter.submit(
            "submission",
            "PLAIN",
            SHA512,
            PASSWORD,
            message=b"Subject: bare\r\n\r\nbody\r\n",
            recipients=("bob@remote.example",),
        )
        [transaction] = yield self.sink.waitForTransactions(1)
        parsed = email.message_from_bytes(transaction.data, policy=email.policy.SMTP)
        self.assertEqual(parsed["Subject"], "bare")
        self.assertRegex(parsed["Message-ID"], r"^<\d{14}\.[0-9A-F]{12}@mx\.example\.test>$")
        self.assertIsNotNone(parsed["Date"].datetime)
        self.assertTrue(transaction.data.endswith(b"\r\n\r\nbody\r\n"))
        self.assertNotIn(b"Return-Path", transaction.data)
        yield self.events.wait("removed")

    @defer.inlineCallbacks
    def test_stopWhileRelaying(self):
        """
        The daemon stops at once while the queue is relaying (SIGTERM, or
        systemctl restart), with the message still queued for its next
        start. It never stopped: the thread pools were stopped while the
        aborted attempt still had its outcome to write through the disk
        pool, so the queue waited for work that would never run.
        """
        self.sink.greeting = None
        submitter = EndToEndMixin()
        submitter.daemon = self.daemon
        submitter.inThread = lambda f, *args: threads.deferToThread(f, *args)
        yield submitter.submit(
            "submission", "PLAIN", SHA512, PASSWORD, recipients=("bob@remote.example",)
        )
        yield self.sink.waitForConnections(1)
        # Within the test's timeout, far below the relay's 5 minutes.
        yield self.daemon.stop()
        [queued] = listQueue(os.path.join(self.daemon.dir, "state", "queue"))
        self.assertEqual(
            [(r["address"], r["state"]) for r in queued["recipients"]],
            [("bob@remote.example", "pending")],
        )


class ConnectorTests(unittest.TestCase):
    """L{RelayConnector} settings."""

    def test_tlsOptions(self):
        """
        The relay's certificate is checked against the system's CAs by
        default, against ca_file when set, and not at all only when
        verify_certificate is off.
        """
        from twisted.internet import ssl
        from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

        for config in (relayConfig(), relayConfig(ca_file=self.caFile())):
            options = RelayConnector(config, reactor, "mail.example.org").tlsOptions()
            self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(options))
        options = RelayConnector(
            relayConfig(verify_certificate=False), reactor, "mail.example.org"
        ).tlsOptions()
        self.assertIsInstance(options, ssl.CertificateOptions)
        self.assertFalse(options.verify)

    def caFile(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(pki().caPEM)
        return path

    def test_configErrorsFailTheConnection(self):
        """An unreadable CA or password file fails the attempt with a clear RelayError."""
        connector = RelayConnector(
            relayConfig(ca_file="/nonexistent/ca.pem"), reactor, "mail.example.org"
        )
        failure = self.failureResultOf(connector.connect(), RelayError)
        self.assertIn("ca_file", str(failure.value))
        connector = RelayConnector(
            relayConfig(tls="none", username="u", password_file="/nonexistent/pw"),
            reactor,
            "mail.example.org",
        )
        failure = self.failureResultOf(connector.connect(), RelayError)
        self.assertIn("password_file", str(failure.value))
