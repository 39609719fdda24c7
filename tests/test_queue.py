"""Tests for L{mailauth.queue} and L{mailauth.dsn}: storage, scheduling, bounces."""

from __future__ import annotations

import email
import email.policy
import json
import os

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from mailauth import dsn, esmtp
from mailauth.config import RelayConfig
from mailauth.queue import (
    DELIVERED,
    FAILED,
    PENDING,
    DotStuffer,
    Envelope,
    Outcome,
    Queue,
    QueueService,
    RecipientStatus,
    RetryPolicy,
    deleteMessage,
    flushQueue,
    listQueue,
    unstuff,
)
from mailauth.relay import SMTPReply
from tests.fakes import FakeRelayConnector, RecordingLocalDelivery
from tests.smtpsink import QueueEvents

EPOCH = 1_700_000_000.0
MESSAGE = (
    b"From: alice@example.org\r\n"
    b"To: bob@remote.example\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
    b".\r\n"
    b"..two dots\r\n"
)
HEADERS = MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n"


def relayConfig(**overrides) -> RelayConfig:
    """A C{[relay]} section with test defaults."""
    values = dict(
        host="relay.test",
        port=587,
        tls="starttls",
        username=None,
        password_file=None,
        ca_file=None,
        verify_certificate=True,
        retry_initial=60.0,
        retry_max=3600.0,
        expire=5 * 86400.0,
        max_connections=2,
        timeout=30.0,
        queue_interval=30.0,
    )
    values.update(overrides)
    return RelayConfig(**values)


def stuffWhole(message: bytes) -> bytes:
    """The reference: stuff a whole canonical message in one go."""
    lines = message.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


class DotStufferTests(unittest.TestCase):
    """L{DotStuffer} and L{unstuff}."""

    def stuff(self, *chunks: bytes) -> bytes:
        stuffer = DotStuffer()
        return b"".join(stuffer.feed(c) for c in chunks) + stuffer.finish()

    def test_firstLine(self):
        """A dot at the very start of the message is doubled."""
        self.assertEqual(
            self.stuff(b".\r\nRCPT TO:<x@evil.test>\r\n"), b"..\r\nRCPT TO:<x@evil.test>\r\n"
        )

    def test_dotAfterChunkBoundary(self):
        """A dot starting a chunk after a chunk that ended a line is doubled (D30)."""
        self.assertEqual(self.stuff(b"a\r\n", b".\r\n", b"b\r\n"), b"a\r\n..\r\nb\r\n")

    def test_crlfSplit(self):
        """A CRLF split between chunks stays one line end, and the dot after it is doubled."""
        self.assertEqual(self.stuff(b"a\r", b"\n.b\r\n"), b"a\r\n..b\r\n")

    def test_bareLineEnds(self):
        """Bare CR and bare LF become CRLF."""
        self.assertEqual(self.stuff(b"a\nb\rc\r\r\n.d"), b"a\r\nb\r\nc\r\n\r\n..d\r\n")

    def test_finalLineEnd(self):
        """A message not ending in CRLF gets one, so C{.CRLF} is a line of its own."""
        self.assertEqual(self.stuff(b"abc"), b"abc\r\n")
        self.assertEqual(self.stuff(b"abc\r"), b"abc\r\n")
        self.assertEqual(self.stuff(), b"")

    @given(
        lines=st.lists(
            st.one_of(
                st.sampled_from([b"", b".", b"..", b".a", b"a.", b"a", b"\xff."]),
                st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
            ),
            max_size=30,
        ),
        cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=20),
    )
    @settings(max_examples=300, deadline=None)
    def test_anyChunking(self, lines, cuts):
        """
        However a canonical message is cut into chunks, the stored form is
        the whole message stuffed at once, and L{unstuff} gives it back.
        """
        message = b"".join(line + b"\r\n" for line in lines)
        stored = self.stuff(*self.cut(message, cuts))
        self.assertEqual(stored, stuffWhole(message))
        self.assertEqual(unstuff(stored), message)
        self.assertNotIn(b"\r\n.\r\n", b"\r\n" + stored)

    @given(
        message=st.lists(st.sampled_from([b"\r", b"\n", b".", b"a"]), max_size=40).map(b"".join),
        cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=10),
    )
    @settings(max_examples=300, deadline=None)
    def test_anyLineEnds(self, message, cuts):
        """
        Bare CR, bare LF and CRLF in any chunking store as the message with
        every line end made CRLF, one line end per CR, LF or CRLF.
        """
        canonical = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if canonical and not canonical.endswith(b"\r\n"):
            canonical += b"\r\n"
        stored = self.stuff(*self.cut(message, cuts))
        self.assertEqual(stored, stuffWhole(canonical))

    def cut(self, message, cuts):
        points = sorted({min(c, len(message)) for c in cuts})
        return [message[a:b] for a, b in zip([0] + points, points + [len(message)])]


class QueueTestMixin:
    """A queue in a fresh directory, on a clock."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(EPOCH)
        self.directory = os.path.abspath(self.mktemp())
        self.queue = Queue(self.directory, self.reactor, "mail.example.org")

    def enqueue(
        self,
        msgid,
        sender="alice@example.org",
        recipients=("bob@remote.example",),
        message=MESSAGE,
        queue=None,
    ):
        writer = (queue or self.queue).newMessage(msgid, sender, list(recipients))
        writer.write(message)
        return writer.commit()

    def runFor(self, seconds):
        """Advance the clock by C{seconds}, stopping at every timer on the way."""
        end = self.reactor.seconds() + seconds
        while True:
            due = [c.getTime() for c in self.reactor.getDelayedCalls() if c.getTime() <= end]
            if not due:
                break
            self.reactor.advance(max(min(due) - self.reactor.seconds(), 0))
        self.reactor.advance(end - self.reactor.seconds())

    def files(self, sub):
        return sorted(os.listdir(os.path.join(self.directory, sub)))


class QueueStorageTests(QueueTestMixin, unittest.TestCase):
    """The files of L{Queue} and L{mailauth.queue.QueueWriter}."""

    def test_commitLayout(self):
        """
        After commit the stored message is dot-stuffed and the envelope is
        JSON with every recipient pending; nothing is left in tmp/.
        """
        writer = self.queue.newMessage("m1", "alice@example.org", ["bob@remote.example"])
        for i in range(0, len(MESSAGE), 7):
            writer.write(MESSAGE[i : i + 7])
        self.assertEqual(self.files("msg"), [])
        self.assertEqual(writer.commit(), "m1")
        self.assertEqual(self.files("msg"), ["m1.data", "m1.json"])
        self.assertEqual(self.files("tmp"), [])
        with open(os.path.join(self.directory, "msg", "m1.data"), "rb") as f:
            self.assertEqual(f.read(), stuffWhole(MESSAGE))
        with open(os.path.join(self.directory, "msg", "m1.json"), "rb") as f:
            envelope = json.load(f)
        self.assertEqual(envelope["sender"], "alice@example.org")
        self.assertEqual(envelope["arrival"], EPOCH)
        self.assertEqual(
            [(r["address"], r["state"]) for r in envelope["recipients"]],
            [("bob@remote.example", "pending")],
        )

    def test_abort(self):
        """Abort removes what was written."""
        writer = self.queue.newMessage("m1", "alice@example.org", ["bob@remote.example"])
        writer.write(MESSAGE)
        writer.abort()
        self.assertEqual(self.files("tmp") + self.files("msg"), [])

    def test_badIDs(self):
        """IDs that are not safe file names, or already used, are refused."""
        for bad in ("", "../x", ".hidden", "a/b", "x" * 200):
            self.assertRaises(ValueError, self.queue.newMessage, bad, "", ["b@remote.example"])
        self.enqueue("m1")
        self.assertRaises(ValueError, self.queue.newMessage, "m1", "", ["b@remote.example"])

    def test_badAddresses(self):
        """
        Addresses that could end or extend the SMTP command they are sent in
        are refused; so is an empty recipient (an empty sender is <>).
        """
        for sender, recipient in [
            ("a@x.test\r\nRCPT TO:<evil@x.test>", "b@y.test"),
            ("a@x.test", "b@y.test> NOTIFY=NEVER"),
            ("a@x.test", "<b@y.test>"),
            ("a@x.test", ""),
            ("a\x00@x.test", "b@y.test"),
        ]:
            self.assertRaises(ValueError, self.queue.newMessage, "m2", sender, [recipient])
        self.queue.newMessage("m2", "", ["b@y.test"]).abort()

    def test_recoverAfterCrash(self):
        """
        What a crash before commit leaves (a temp data file, a data file
        without an envelope, a temp envelope) is removed at start; so is an
        envelope whose data file is missing; committed messages stay.
        """
        self.enqueue("kept")
        crashed = self.queue.newMessage("crashed", "alice@example.org", ["b@remote.example"])
        crashed.write(MESSAGE)
        crashed._file.close()
        msg = os.path.join(self.directory, "msg")
        tmp = os.path.join(self.directory, "tmp")
        for path in (
            os.path.join(msg, "orphan.data"),
            os.path.join(tmp, "other.json"),
            os.path.join(tmp, "kept.1234.json"),
        ):
            with open(path, "wb") as f:
                f.write(b"x")
        self.enqueue("lost")
        os.unlink(os.path.join(msg, "lost.data"))
        # A new daemon on the same directory: the writer is not its own.
        restarted = Queue(self.directory, self.reactor, "mail.example.org")
        restarted.recover()
        self.assertEqual(self.files("tmp"), [])
        self.assertEqual(self.files("msg"), ["kept.data", "kept.json"])
        self.flushLoggedErrors()

    def test_recoverSparesWritersInProgress(self):
        """Recovery on a running queue keeps the files of messages being written."""
        writer = self.queue.newMessage("busy", "alice@example.org", ["b@remote.example"])
        writer.write(MESSAGE)
        self.queue.recover()
        writer.commit()
        self.assertEqual(self.files("msg"), ["busy.data", "busy.json"])


class EnvelopeTests(unittest.TestCase):
    """L{Envelope}: JSON, outcomes, backoff and expiry."""

    policy = RetryPolicy(initial=60, maximum=3600, expire=86400)

    def envelope(self, sender="alice@example.org"):
        return Envelope(
            id="m1",
            sender=sender,
            recipients=(RecipientStatus("a@x.test"), RecipientStatus("b@x.test")),
            arrival=1000.0,
            nextAttempt=1000.0,
        )

    def test_json(self):
        """An envelope survives JSON; garbage is a ValueError."""
        e = self.envelope().afterAttempt(
            {"a@x.test": Outcome(FAILED, reply="550 5.1.1 no")}, None, 1000.0, self.policy
        )
        self.assertEqual(Envelope.fromJSON(e.toJSON()), e)
        for garbage in (b"", b"[]", b'{"version": 1}', b'{"version": 2}'):
            self.assertRaises(ValueError, Envelope.fromJSON, garbage)

    def test_backoff(self):
        """The wait doubles from retry_initial up to retry_max."""
        self.assertEqual(
            [self.policy.delay(n) for n in range(1, 9)],
            [60, 120, 240, 480, 960, 1920, 3600, 3600],
        )

    def test_outcomes(self):
        """Each recipient takes its outcome; the next attempt follows the backoff."""
        e = self.envelope().afterAttempt(
            {
                "a@x.test": Outcome(DELIVERED, reply="250 ok"),
                "b@x.test": Outcome(PENDING, reply="451 4.3.0 later"),
            },
            None,
            1000.0,
            self.policy,
        )
        self.assertEqual([r.state for r in e.recipients], [DELIVERED, PENDING])
        self.assertEqual((e.attempts, e.nextAttempt), (1, 1060.0))
        self.assertEqual(e.pending(), ["b@x.test"])
        self.assertFalse(e.finished())

    def test_expiryClampsNextAttempt(self):
        """No retry is scheduled after the expiry; at expiry pending recipients fail."""
        e = attrs.evolve(self.envelope(), attempts=10)
        e = e.afterAttempt(
            {"a@x.test": Outcome(PENDING, error="refused")}, "refused", 86000.0, self.policy
        )
        self.assertEqual(e.nextAttempt, 87400.0)
        e = e.afterAttempt({}, None, 87400.0, self.policy)
        self.assertEqual([(r.state, r.expired) for r in e.recipients], [(FAILED, True)] * 2)
        self.assertEqual(len(e.unnotified()), 2)

    def test_nullSenderNeedsNoBounce(self):
        """Failures of a message from C{<>} count as notified: no bounce for a bounce."""
        e = self.envelope(sender="").afterAttempt(
            {
                "a@x.test": Outcome(FAILED, reply="550 no"),
                "b@x.test": Outcome(FAILED, reply="550 no"),
            },
            None,
            1000.0,
            self.policy,
        )
        self.assertEqual(e.unnotified(), [])
        self.assertTrue(e.finished())


class BounceTests(unittest.TestCase):
    """L{dsn.buildBounce}."""

    def bounce(self, failures, headers=HEADERS):
        return dsn.buildBounce(
            hostname="mail.example.org",
            queueID="m1",
            messageID="b1@mail.example.org",
            boundary="b1/mail.example.org",
            sender="alice@example.org",
            arrival=EPOCH,
            now=EPOCH + 60,
            failures=failures,
            originalHeaders=headers,
            relayHost="relay.test",
        )

    def test_report(self):
        """
        The bounce is a multipart/report of type delivery-status from
        MAILER-DAEMON, with per-recipient fields and the original headers.
        """
        data = self.bounce(
            [
                dsn.FailedRecipient("bob@remote.example", reply="550 5.1.1 <bob>: no such user"),
                dsn.FailedRecipient(
                    "carol@remote.example", reply="451 4.3.0 later", error="refused", expired=True
                ),
                dsn.FailedRecipient(
                    "dave@remote.example", error="connection refused", expired=True
                ),
            ]
        )
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))
        message = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(message["From"], "Mail Delivery System <MAILER-DAEMON@mail.example.org>")
        self.assertIn(b"\r\nTo: <alice@example.org>\r\n", data)
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(message.get_param("report-type"), "delivery-status")
        text, status, headers = message.get_payload()
        self.assertEqual(text.get_content_type(), "text/plain")
        self.assertIn("<bob@remote.example>: host relay.test said: 550 5.1.1", text.get_content())
        self.assertEqual(status.get_content_type(), "message/delivery-status")
        perMessage, *perRecipient = status.get_payload()
        self.assertEqual(perMessage["Reporting-MTA"], "dns; mail.example.org")
        self.assertEqual(
            [
                (r["Final-Recipient"], r["Action"], r["Status"], r["Diagnostic-Code"])
                for r in perRecipient
            ],
            [
                (
                    "rfc822; bob@remote.example",
                    "failed",
                    "5.1.1",
                    "smtp; 550 5.1.1 <bob>: no such user",
                ),
                ("rfc822; carol@remote.example", "failed", "4.3.0", "smtp; 451 4.3.0 later"),
                ("rfc822; dave@remote.example", "failed", "4.4.7", None),
            ],
        )
        self.assertEqual(headers.get_content_type(), "text/rfc822-headers")
        self.assertIn(b"Subject: hello\r\n", data)
        self.assertNotIn(b"Hello Bob.", data)

    def test_hostileReply(self):
        """A reply cannot add header lines to the report: it is cleaned to one line."""
        data = self.bounce([dsn.FailedRecipient("b@x.test", reply="550 a\r\nStatus: 2.0.0\x00")])
        self.assertIn(b"Diagnostic-Code: smtp; 550 a Status: 2.0.0?\r\n", data)

    def test_returnedHeaders(self):
        """Only the header section comes back, cut at a line end when it is huge."""
        self.assertEqual(dsn.returnedHeaders(MESSAGE), MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n")
        huge = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 80) for i in range(2000)) + b"\r\nbody"
        cut = dsn.returnedHeaders(huge)
        self.assertLessEqual(len(cut), dsn.MAX_RETURNED_HEADERS)
        self.assertTrue(cut.endswith(b"\r\n") and huge.startswith(cut))


class QueueServiceTests(QueueTestMixin, unittest.TestCase):
    """L{QueueService} on a clock with a fake relay."""

    def setUp(self):
        super().setUp()
        self.relay = FakeRelayConnector(self.reactor)
        self.local = RecordingLocalDelivery(["example.org"])
        self.events = QueueEvents()
        self.events.start(self)
        self.config = relayConfig()
        self.service = self.makeService()

    def makeService(self, queue=None, **overrides):
        service = QueueService(
            queue or self.queue,
            relayConfig(**overrides) if overrides else self.config,
            self.reactor,
            self.local,
            connector=self.relay,
        )
        return service

    def start(self, service=None):
        service = service or self.service
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def submit(self, msgid, **kwargs):
        self.enqueue(msgid, **kwargs)
        self.service.wake()
        self.reactor.advance(0)

    def test_delivered(self):
        """A queued message goes to the relay and leaves the queue."""
        self.start()
        self.submit("m1")
        self.assertEqual(
            self.relay.deliveries, [("alice@example.org", ("bob@remote.example",), MESSAGE)]
        )
        self.assertEqual(listQueue(self.directory), [])
        self.assertEqual(self.events.kinds("m1"), ["sent", "removed"])

    def test_startDeliversWhatIsQueued(self):
        """Messages queued before the service started (a restart) are delivered at start."""
        for i in range(3):
            self.enqueue(f"m{i}")
        self.start()
        self.assertEqual(len(self.relay.deliveries), 3)
        self.assertEqual(listQueue(self.directory), [])

    def test_connectionReuse(self):
        """With one connection allowed, several due messages share one session."""
        service = self.makeService(max_connections=1)
        for i in range(5):
            self.enqueue(f"m{i}")
        self.start(service)
        self.assertEqual(len(self.relay.deliveries), 5)
        self.assertEqual([s.messages for s in self.relay.sessions], [5])
        self.assertFalse(self.relay.sessions[0].open)

    def test_connectionLimit(self):
        """No more than max_connections sessions are opened at once."""
        self.relay.paused = True
        for i in range(6):
            self.enqueue(f"m{i}")
        self.start()
        self.assertEqual(len(self.relay.waiting), 2)
        for waiter, session in self.relay.waiting:
            waiter.callback(session)
        self.assertEqual(len(self.relay.deliveries), 6)
        self.assertEqual(len(self.relay.sessions), 2)

    def test_retryBackoff(self):
        """
        While the relay is down the message is retried retry_initial after
        the first failure, then at doubling intervals up to retry_max.
        """
        self.relay.down = True
        self.start()
        self.submit("m1")
        self.runFor(9 * 3600)
        gaps = [b - a for a, b in zip(self.relay.connectTimes, self.relay.connectTimes[1:])]
        self.assertEqual(gaps[:7], [60, 120, 240, 480, 960, 1920, 3600])
        [entry] = listQueue(self.directory)
        self.assertIn("fake relay is down", entry["last_error"])
        self.assertEqual(entry["recipients"][0]["state"], "pending")
        self.relay.down = False
        self.reactor.advance(3600)
        self.assertEqual(len(self.relay.deliveries), 1)
        self.assertEqual(listQueue(self.directory), [])

    def test_temporaryThenPermanent(self):
        """
        A 4xx leaves a recipient pending and a 5xx fails it for good, each
        recipient on its own; one bounce per failure, to the sender.
        """
        self.relay.replies = {
            "a@remote.example": [SMTPReply(451, ("451 4.3.0 later",))],
            "b@remote.example": [SMTPReply(550, ("550 5.1.1 unknown",))],
            "c@remote.example": [
                SMTPReply(451, ("451 4.3.0 later",)),
                SMTPReply(554, ("554 5.7.1 rejected",)),
            ],
        }
        self.start()
        self.submit("m1", recipients=("a@remote.example", "b@remote.example", "c@remote.example"))
        self.assertEqual(self.relay.deliveries, [])
        [entry] = listQueue(self.directory)
        self.assertEqual(
            [r["state"] for r in entry["recipients"]], ["pending", "failed", "pending"]
        )
        [(recipient, bounce1)] = self.local.delivered
        self.assertEqual(recipient, "alice@example.org")
        self.reactor.advance(60)
        self.assertEqual(
            self.relay.deliveries, [("alice@example.org", ("a@remote.example",), MESSAGE)]
        )
        self.assertEqual(listQueue(self.directory), [])
        [_, (_, bounce2)] = self.local.delivered
        self.assertEqual(self.failedIn(bounce1), [("rfc822; b@remote.example", "5.1.1")])
        self.assertEqual(self.failedIn(bounce2), [("rfc822; c@remote.example", "5.7.1")])

    def failedIn(self, bounce):
        message = email.message_from_bytes(bounce, policy=email.policy.default)
        status = message.get_payload()[1]
        return [(r["Final-Recipient"], r["Status"]) for r in status.get_payload()[1:]]

    def test_bounceToRemoteSenderGoesThroughRelay(self):
        """A bounce for a remote sender is queued and relayed, from the null sender."""
        self.relay.replies = {"bob@remote.example": [SMTPReply(550, ("550 5.1.1 unknown",))]}
        self.start()
        self.submit("m1", sender="alice@elsewhere.example")
        self.reactor.advance(0)
        [(sender, recipients, bounce)] = self.relay.deliveries
        self.assertEqual((sender, recipients), ("", ("alice@elsewhere.example",)))
        self.assertIn(b"From: Mail Delivery System <MAILER-DAEMON@mail.example.org>", bounce)
        self.assertEqual(listQueue(self.directory), [])

    def test_noBounceForNullSender(self):
        """A message from <> that fails is dropped without a bounce."""
        self.relay.replies = {"bob@remote.example": [SMTPReply(550, ("550 5.1.1 unknown",))]}
        self.start()
        self.submit("m1", sender="")
        self.reactor.advance(0)
        self.assertEqual((self.relay.deliveries, self.local.delivered), ([], []))
        self.assertEqual(listQueue(self.directory), [])
        self.assertNotIn("bounce", self.events.kinds("m1"))

    def test_expiry(self):
        """
        Recipients still pending when the message expires fail, and the
        (local) sender gets one bounce saying so.
        """
        self.relay.down = True
        service = self.makeService(expire=86400.0)
        self.start(service)
        self.enqueue("m1", recipients=("a@remote.example", "b@remote.example"))
        service.wake()
        self.runFor(30 * 3600)
        self.assertEqual(listQueue(self.directory), [])
        self.assertLess(self.relay.connectTimes[-1], EPOCH + 86400)
        [(recipient, bounce)] = self.local.delivered
        self.assertEqual(recipient, "alice@example.org")
        self.assertEqual(
            self.failedIn(bounce),
            [("rfc822; a@remote.example", "4.4.7"), ("rfc822; b@remote.example", "4.4.7")],
        )
        self.assertIn(b"delivery time expired", bounce)
        self.assertEqual(self.events.kinds("m1")[-4:], ["expired", "expired", "bounce", "removed"])

    def test_localBounceRetried(self):
        """A bounce whose local delivery fails for now is retried, not lost."""
        self.relay.replies = {"bob@remote.example": [SMTPReply(550, ("550 5.1.1 unknown",))]}
        self.local.failures["alice@example.org"] = [OSError("disk full")]
        self.start()
        self.submit("m1")
        self.assertEqual(self.local.delivered, [])
        [entry] = listQueue(self.directory)
        self.assertEqual(entry["sender"], "")
        self.reactor.advance(60)
        self.assertEqual(len(self.local.delivered), 1)
        self.assertEqual(listQueue(self.directory), [])

    def test_localBouncePermanentFailure(self):
        """
        A bounce that local delivery refuses for good (no such user) is
        dropped: there is no bounce for a bounce.
        """
        self.relay.replies = {"bob@remote.example": [SMTPReply(550, ("550 5.1.1 unknown",))]}
        self.local.failures["alice@example.org"] = [
            esmtp.SMTPReply(550, "5.1.1 <alice@example.org>: User unknown")
        ]
        self.start()
        self.submit("m1")
        self.assertEqual(listQueue(self.directory), [])
        self.assertEqual((self.local.delivered, len(self.relay.deliveries)), ([], 0))
        [event] = [
            e
            for e in self.events.events
            if e["queueEvent"] == "bounced" and e["recipient"] == "alice@example.org"
        ]
        self.assertEqual(event["why"], "550 5.1.1 <alice@example.org>: User unknown")

    def test_flush(self):
        """C{flushQueue} makes a waiting message due; the daemon notices at its next scan."""
        self.relay.down = True
        self.start()
        self.submit("m1")
        self.relay.down = False
        self.reactor.advance(30)
        self.assertEqual(self.relay.deliveries, [])
        self.assertEqual(flushQueue(self.directory), 1)
        self.assertEqual(listQueue(self.directory)[0]["next_attempt"], 0.0)
        self.reactor.advance(30)
        self.assertEqual(len(self.relay.deliveries), 1)

    def test_delete(self):
        """C{deleteMessage} removes a message; the daemon forgets it, without a bounce."""
        self.relay.down = True
        self.start()
        self.submit("m1")
        self.assertTrue(deleteMessage(self.directory, "m1"))
        self.assertFalse(deleteMessage(self.directory, "m1"))
        self.assertFalse(deleteMessage(self.directory, "../lock"))
        self.relay.down = False
        self.reactor.advance(3600)
        self.assertEqual((self.relay.deliveries, self.local.delivered), ([], []))
        self.assertEqual(self.files("msg"), [])

    def test_list(self):
        """C{listQueue} shows each message with its recipients' state and the last error."""
        self.relay.replies = {
            "b@remote.example": [SMTPReply(550, ("550 5.1.1 unknown",))],
            "a@remote.example": [SMTPReply(451, ("451 4.3.0 later",))],
        }
        self.start()
        self.submit("m1", recipients=("a@remote.example", "b@remote.example"))
        [entry] = [m for m in listQueue(self.directory) if m["id"] == "m1"]
        self.assertEqual(
            {k: entry[k] for k in ("id", "sender", "arrival", "next_attempt", "attempts")},
            {
                "id": "m1",
                "sender": "alice@example.org",
                "arrival": EPOCH,
                "next_attempt": EPOCH + 60,
                "attempts": 1,
            },
        )
        self.assertEqual(
            entry["recipients"],
            [
                {
                    "address": "a@remote.example",
                    "state": "pending",
                    "reply": "451 4.3.0 later",
                    "error": None,
                },
                {
                    "address": "b@remote.example",
                    "state": "failed",
                    "reply": "550 5.1.1 unknown",
                    "error": None,
                },
            ],
        )

    def test_cliOnMissingDirectory(self):
        """The commands work on a queue directory that does not exist yet."""
        missing = os.path.join(self.directory, "nope")
        self.assertEqual(listQueue(missing), [])
        self.assertEqual(flushQueue(missing), 0)
        self.assertFalse(deleteMessage(missing, "m1"))

    def test_noRelay(self):
        """Without a [relay], remote recipients wait (and expire), they do not bounce at once."""
        service = QueueService(self.queue, None, self.reactor, self.local)
        self.start(service)
        self.enqueue("m1")
        service.wake()
        self.reactor.advance(0)
        [entry] = listQueue(self.directory)
        self.assertIn("no [relay]", entry["last_error"])
