"""Tests for L{mailauth.forward}: scheduling, retries, bounces, on a clock with a fake relay."""

from __future__ import annotations

import email
import email.policy
import email.utils
import os
import re

from twisted.internet import defer
from twisted.trial import unittest

from mailauth.envelope import MessageOptions, RecipientStatus
from mailauth.forward import QueueService
from mailauth.queueadmin import deleteMessage, flushQueue, listQueue
from mailauth.relay import RelayReply
from mailauth.replies import SMTPReply
from mailauth.threads import PoolBusy
from tests.fakes import FakeRelayConnector, RecordingLocalDelivery, runInline
from tests.harness import LogWatcher
from tests.smtpsink import QueueEvents
from tests.support import EPOCH, MESSAGE, QueueTestMixin, relayConfig

DELAYED = "Delayed Mail (still being retried)"


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

    def makeService(self, queue=None, runBlocking=runInline, **overrides):
        service = QueueService(
            queue or self.queue,
            relayConfig(**overrides) if overrides else self.config,
            self.reactor,
            self.local,
            runBlocking=runBlocking,
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

    def test_outcomeNotWrittenNotSentAgain(self):
        """
        When the outcome of an attempt cannot be written (the queue's disk
        is full), a recipient the relay accepted is not sent the message
        again at the next attempt: its outcome is written then, with the
        others'. Before, it got a copy at every retry while the disk was full.
        """
        self.watcher = LogWatcher()
        self.addCleanup(self.watcher.stop)
        self.relay.replies["carol@remote.example"] = [
            RelayReply(451, ("4.3.0 later",)),
        ]
        self.diskFullFor("settle", 2)
        self.start()
        self.submit("m1", recipients=("bob@remote.example", "carol@remote.example"))
        self.assertEqual(
            [recipients for _, recipients, _ in self.relay.deliveries], [("bob@remote.example",)]
        )
        self.runFor(self.config.retry_initial)
        # carol, deferred, is tried again; bob, taken, is not.
        self.assertEqual(
            [recipients for _, recipients, _ in self.relay.deliveries],
            [("bob@remote.example",), ("carol@remote.example",)],
        )
        # The disk is still full: the next try waits twice as long.
        self.runFor(2 * self.config.retry_initial - 1)
        self.assertEqual(len(listQueue(self.directory)), 1)
        self.runFor(1)
        self.assertEqual(len(self.relay.deliveries), 2)
        self.assertEqual(listQueue(self.directory), [])
        # One line each, not a traceback: a full disk is no bug.
        self.assertEqual(self.flushLoggedErrors(), [])
        failed = [m for m in self.watcher.messages if "delivery attempt failed" in m]
        self.assertEqual(len(failed), 2)
        self.assertTrue(
            failed[1].endswith(
                "No space left on device (errno 28); tried again in "
                f"{2 * self.config.retry_initial:g} s"
            ),
            failed[1],
        )

    def test_truncatedMessageSetAside(self):
        """
        A message file that does not hold what its envelope says (cut short
        on disk) is never sent (a part of it, or a DATA that never ends):
        it is set aside as C{ID.corrupt} with its file, logged once, and
        the other messages go on.
        """
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        self.enqueue("cut")
        self.enqueue("whole")
        path = os.path.join(self.directory, "msg", "cut.data")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 7)
        self.start()
        self.assertEqual(
            [recipients for _, recipients, _ in self.relay.deliveries], [("bob@remote.example",)]
        )
        self.assertEqual(self.files("msg"), ["cut.corrupt", "cut.data"])
        [line] = [m for m in watcher.messages if "set aside" in m]
        self.assertRegex(line, r"^queue: cut: .*cut\.data holds \d+ bytes, its envelope says \d+;")
        self.runFor(3600)
        self.assertEqual(len(self.relay.deliveries), 1)

    def test_truncatedMessageNotDeliveredLocally(self):
        """
        A queued message for a local recipient (a notification to a local
        sender) whose file was cut short is not delivered, which would store
        a part of it: it is set aside as C{ID.corrupt} with its file, logged
        as on the relay path, and the other messages go on.
        """
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        self.enqueue("cut", sender="", recipients=("alice@example.org",))
        self.enqueue("whole", sender="", recipients=("alice@example.org",))
        path = os.path.join(self.directory, "msg", "cut.data")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 7)
        self.start()
        self.assertEqual(self.local.delivered, [("alice@example.org", MESSAGE)])
        self.assertEqual(self.files("msg"), ["cut.corrupt", "cut.data"])
        [line] = [m for m in watcher.messages if "set aside" in m]
        self.assertRegex(line, r"^queue: cut: .*cut\.data holds \d+ bytes, its envelope says \d+;")
        self.runFor(3600)
        self.assertEqual(len(self.local.delivered), 1)

    def test_scanDuringItsOwnRemovalNotCalledDeleted(self):
        """
        A listing of the queue made after an attempt removed its message,
        but read before that attempt's outcome, does not call the message
        deleted by someone else: its own attempt says what became of it.
        """
        held: dict = {"settle": [], "scan": []}

        def runBlocking(f, *args, **kwargs):
            name = getattr(f, "__name__", "")
            if name in held and (name != "scan" or holdScans):
                # Done now, as a thread would; its outcome told when the test says.
                result = f(*args, **kwargs)
                d = defer.Deferred()
                held[name].append((d, result))
                return d
            return runInline(f, *args, **kwargs)

        holdScans = False
        service = self.makeService(runBlocking=runBlocking)
        self.enqueue("m1")
        self.start(service)
        [(settled, outcome)] = held["settle"]
        self.assertEqual(listQueue(self.directory), [])
        holdScans = True
        service.wake()
        self.reactor.advance(0)
        [(scanned, listing)] = held["scan"]
        scanned.callback(listing)
        settled.callback(outcome)
        self.assertEqual(self.events.kinds("m1"), ["sent", "removed"])

    def heldScans(self) -> tuple:
        """
        A service whose listings of the queue are held: each is made (as a
        thread would make it) only when the test calls C{run} on it, and
        its outcome told only when the test fires it.

        @return: the service; the list of held listings, each a list
            C{[Deferred, scan function, its arguments, its outcome]}; and a
            list that holds listings while it is not empty.
        """
        held: list = []

        def runBlocking(f, *args, **kwargs):
            if getattr(f, "__name__", "") == "scan" and holding:
                d: defer.Deferred = defer.Deferred()
                held.append([d, f, args, None])
                return d
            return runInline(f, *args, **kwargs)

        holding = []
        service = self.makeService(runBlocking=runBlocking)
        return service, held, holding

    def notificationDuringScan(self, listFirst: bool) -> tuple:
        """
        m1 (from a remote sender) is refused while a listing of the queue
        is under way: its bounce is queued and scheduled by the attempt.
        The listing is made before the bounce is queued (C{listFirst}) or
        just before the bounce is tried; the bounce is deferred by the
        relay (C{listFirst}) or delivered.

        @return: the service, the bounce's ID, and the held listing.
        """
        self.relay.down = True
        service, held, holding = self.heldScans()
        self.enqueue("m1", sender="alice@remote.example")
        self.start(service)
        self.assertEqual(self.events.kinds("m1"), ["deferred"])
        holding.append(True)

        def release():
            # Before the service stops, which waits for its listings.
            holding.clear()
            for d, scan, args, outcome in held:
                if not d.called:
                    d.callback(outcome if outcome is not None else scan(*args))

        self.addCleanup(release)
        service.wake()
        self.reactor.advance(0)
        [listing] = held
        if listFirst:
            listing[3] = listing[1](*listing[2])
            self.relay.replies["alice@remote.example"] = [RelayReply(451, ("451 4.3.0 later",))]
        else:
            real = self.queue.openMessage

            def openMessage(envelope):
                if envelope.id != "m1" and listing[3] is None:
                    listing[3] = listing[1](*listing[2])
                return real(envelope)

            self.patch(self.queue, "openMessage", openMessage)
        self.relay.replies["bob@remote.example"] = [RelayReply(550, ("550 5.1.1 unknown",))]
        self.relay.down = False
        self.runFor(self.config.retry_initial)
        [(_, bounceID)] = [
            (e["msgid"], e["bounceID"]) for e in self.events.events if e["queueEvent"] == "bounce"
        ]
        self.assertIsNotNone(listing[3])
        return service, bounceID, listing

    def test_notificationQueuedDuringScanNotCalledDeleted(self):
        """
        A notification an attempt queued and scheduled while a listing of
        the queue was under way, the listing made before it was queued, is
        not called deleted by another process when the listing comes in:
        it was, and the notification waited for the next listing.
        """
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        service, bounceID, listing = self.notificationDuringScan(listFirst=True)
        self.assertEqual(self.events.kinds(bounceID), ["deferred"])
        listing[0].callback(listing[3])
        self.assertEqual([m for m in watcher.messages if "deleted" in m], [])
        self.assertEqual(self.events.kinds(bounceID), ["deferred"])
        # Tried again on time, without a listing of the queue.
        self.runFor(self.config.retry_initial)
        self.assertEqual(self.events.kinds(bounceID), ["deferred", "sent", "removed"])

    def test_notificationDoneDuringScanNotFoundAgain(self):
        """
        A notification queued and sent while a listing of the queue was
        under way, the listing made in between, is not taken up again from
        that listing when it comes in: it was, and its attempt found it
        gone and called it deleted by another process.
        """
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        service, bounceID, listing = self.notificationDuringScan(listFirst=False)
        self.assertEqual(self.events.kinds(bounceID), ["sent", "removed"])
        listing[0].callback(listing[3])
        self.reactor.advance(0)
        self.assertEqual([m for m in watcher.messages if "deleted" in m], [])
        self.assertEqual(self.events.kinds(bounceID), ["sent", "removed"])

    def test_refusedRecipientBouncedWhenSessionFailsLater(self):
        """
        A recipient the relay refused for good is bounced at once though
        the session then failed (a hang-up after the message), as in
        Postfix; the others are tried again.
        """
        self.relay.replies["carol@remote.example"] = [RelayReply(550, ("550 5.1.1 unknown",))]
        self.relay.lostAfterData = True
        self.start()
        self.submit("m1", recipients=("bob@remote.example", "carol@remote.example"))
        [message] = listQueue(self.directory)
        self.assertEqual(
            [(r["address"], r["state"], r["reply"]) for r in message["recipients"]],
            [
                ("bob@remote.example", "pending", None),
                ("carol@remote.example", "failed", "550 5.1.1 unknown"),
            ],
        )
        [(recipient, bounce)] = self.local.delivered
        self.assertEqual(recipient, "alice@example.org")
        self.assertIn(b"Final-Recipient: rfc822; carol@remote.example", bounce)
        self.assertNotIn(b"Final-Recipient: rfc822; bob@remote.example", bounce)

    def test_unreadableEnvelopeNotCalledDeleted(self):
        """
        An envelope found unreadable when its message is due is set aside
        with one error line; the forwarder does not also say someone
        deleted it.
        """
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        self.relay.down = True
        self.start()
        self.submit("m1")
        with open(os.path.join(self.directory, "msg", "m1.json"), "wb") as f:
            f.write(b"{not json")
        self.runFor(self.config.retry_initial)
        self.assertEqual(self.files("msg"), ["m1.corrupt", "m1.data"])
        self.assertEqual(len([m for m in watcher.messages if "is unreadable" in m]), 1)
        self.assertEqual([m for m in watcher.messages if "deleted" in m], [])
        self.assertNotIn("deleted", self.events.kinds("m1"))

    def test_deletedWhileSettlingNotCalledRemoved(self):
        """
        A message deleted (mailauth queue delete) while the outcome of its
        attempt is being written is logged as deleted, not as removed once
        done: a recipient still pending did not get it.
        """
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        self.relay.replies["bob@remote.example"] = [RelayReply(451, ("4.3.0 later",))]
        real = self.queue._spool.update

        def deleteFirst(msgid, change):
            deleteMessage(self.directory, msgid)
            return real(msgid, change)

        self.patch(self.queue._spool, "update", deleteFirst)
        self.start()
        self.submit("m1")
        self.assertEqual(self.events.kinds("m1"), ["deferred", "deleted"])
        self.assertIn(
            "queue: m1: deleted by another process (mailauth queue delete)", watcher.messages
        )

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

    def test_sessionNotReusableIsReplaced(self):
        """
        A session that says it cannot take another message (its RSET was
        refused) is closed, and the next message goes at once through a new
        one: the relay took the first message, so nothing is held back or
        deferred.
        """
        self.relay.reusable = False
        service = self.makeService(max_connections=1)
        for i in range(3):
            self.enqueue(f"m{i}")
        self.start(service)
        self.assertEqual(len(self.relay.deliveries), 3)
        self.assertEqual([s.messages for s in self.relay.sessions], [1, 1, 1])
        self.assertEqual(self.relay.openSessions(), 0)
        self.assertEqual(self.relay.connectTimes, [self.reactor.seconds()] * 3)
        self.assertEqual(listQueue(self.directory), [])

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
            "a@remote.example": [RelayReply(451, ("451 4.3.0 later",))],
            "b@remote.example": [RelayReply(550, ("550 5.1.1 unknown",))],
            "c@remote.example": [
                RelayReply(451, ("451 4.3.0 later",)),
                RelayReply(554, ("554 5.7.1 rejected",)),
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
        self.relay.replies = {"bob@remote.example": [RelayReply(550, ("550 5.1.1 unknown",))]}
        self.start()
        self.submit("m1", sender="alice@elsewhere.example")
        self.reactor.advance(0)
        [(sender, recipients, bounce)] = self.relay.deliveries
        self.assertEqual((sender, recipients), ("", ("alice@elsewhere.example",)))
        self.assertIn(b"From: Mail Delivery System <MAILER-DAEMON@mail.example.org>", bounce)
        self.assertEqual(listQueue(self.directory), [])

    def test_noBounceForNullSender(self):
        """A message from <> that fails is dropped without a bounce."""
        self.relay.replies = {"bob@remote.example": [RelayReply(550, ("550 5.1.1 unknown",))]}
        self.start()
        self.submit("m1", sender="")
        self.reactor.advance(0)
        self.assertEqual((self.relay.deliveries, self.local.delivered), ([], []))
        self.assertEqual(listQueue(self.directory), [])
        self.assertNotIn("bounce", self.events.kinds("m1"))

    def test_expireZeroTriesOnce(self):
        """
        With expire = 0 (Postfix's maximal_queue_lifetime = 0) a message is
        tried once: delivered if the relay takes it, bounced on the first
        temporary failure. Before, it was never tried: it had expired when
        it arrived, and every message bounced unsent.
        """
        self.relay.replies["b@remote.example"] = [RelayReply(451, ("451 4.3.0 later",))]
        service = self.makeService(expire=0.0)
        self.start(service)
        self.enqueue("m1", recipients=("a@remote.example", "b@remote.example"))
        service.wake()
        self.reactor.advance(0)
        self.assertEqual(
            [recipients for _, recipients, _ in self.relay.deliveries], [("a@remote.example",)]
        )
        self.assertEqual(listQueue(self.directory), [])
        [(recipient, bounce)] = self.local.delivered
        self.assertEqual(self.failedIn(bounce), [("rfc822; b@remote.example", "4.3.0")])

    def test_notificationWaitsForTheFailedRelay(self):
        """
        A notification to a remote sender queued by an attempt whose relay
        session failed (a recipient refused, then a hang-up) waits, like
        the rest, for the backoff that failure set. Before, it was
        scheduled before the failure was counted: a new connection went to
        the failing relay at once, and its failure doubled the backoff.
        """
        self.relay.replies["carol@remote.example"] = [RelayReply(550, ("550 5.1.1 unknown",))]
        self.relay.lostAfterData = True
        self.start()
        self.enqueue(
            "m1",
            sender="alice@remote.example",
            recipients=("bob@remote.example", "carol@remote.example"),
        )
        self.service.wake()
        self.reactor.advance(0)
        self.assertEqual(len(listQueue(self.directory)), 2)
        self.assertEqual(self.relay.connectTimes, [EPOCH])
        self.runFor(self.config.retry_initial - 1)
        self.assertEqual(self.relay.connectTimes, [EPOCH])
        self.relay.lostAfterData = False
        self.runFor(1)
        self.assertEqual(self.relay.connectTimes, [EPOCH, EPOCH + self.config.retry_initial])
        self.assertEqual(listQueue(self.directory), [])

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
        self.relay.replies = {"bob@remote.example": [RelayReply(550, ("550 5.1.1 unknown",))]}
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
        self.relay.replies = {"bob@remote.example": [RelayReply(550, ("550 5.1.1 unknown",))]}
        self.local.failures["alice@example.org"] = [
            SMTPReply(550, "5.1.1 <alice@example.org>: User unknown")
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
            "b@remote.example": [RelayReply(550, ("550 5.1.1 unknown",))],
            "a@remote.example": [RelayReply(451, ("451 4.3.0 later",))],
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


class NotificationTests(QueueTestMixin, unittest.TestCase):
    """
    RFC 3461 in the queue: NOTIFY decides which reports the sender gets,
    ORCPT, ENVID and RET shape them, and a relay that offers DSN takes
    over the reporting.
    """

    def setUp(self):
        super().setUp()
        self.relay = FakeRelayConnector(self.reactor)
        self.local = RecordingLocalDelivery(["example.org"])
        self.startQueue()

    def startQueue(self, **overrides):
        """Start a queue service on the queue (delay_warning 1h unless C{overrides} say)."""
        self.service = QueueService(
            self.queue,
            relayConfig(delay_warning=3600.0, **overrides),
            self.reactor,
            self.local,
            runBlocking=runInline,
            connector=self.relay,
        )
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def submit(self, msgid, notify=None, orcpt=None, options=None, recipient="bob@remote.example"):
        status = RecipientStatus(recipient, notify=notify, orcpt=orcpt)
        self.enqueue(msgid, recipients=[status], options=options)
        self.service.wake()
        self.reactor.advance(0)

    def reports(self):
        """(subject, per-message fields, per-recipient fields, third part) of each report."""
        out = []
        for recipient, data in self.local.delivered:
            self.assertEqual(recipient, "alice@example.org")
            message = email.message_from_bytes(data, policy=email.policy.default)
            _, status, original = message.get_payload()
            perMessage, *perRecipient = status.get_payload()
            out.append((message["Subject"], perMessage, perRecipient, original))
        return out

    def refuseAt(self, address="bob@remote.example"):
        self.relay.replies = {address: [RelayReply(550, ("550 5.1.1 unknown",))]}

    def countScans(self) -> list:
        """The C{known} argument of every listing of the queue from now on."""
        scans: list = []
        real = self.queue.scan

        def scan(known):
            scans.append(known)
            return real(known)

        self.patch(self.queue, "scan", scan)
        return scans

    def test_bouncesScheduledWithoutScan(self):
        """
        The notifications an attempt queues are scheduled as they are
        queued, not found by listing the queue again: before, each one
        listed the whole queue (a burst of them cost the square of its
        length).
        """
        refused = [RelayReply(550, ("550 5.1.1 unknown",))]
        for n in range(5):
            self.relay.replies[f"bob{n}@remote.example"] = list(refused)
            self.enqueue(f"m{n}", recipients=[f"bob{n}@remote.example"])
        scans = self.countScans()
        self.service.wake()
        self.reactor.advance(0)
        self.assertEqual(len(self.local.delivered), 5)
        self.assertEqual(listQueue(self.directory), [])
        self.assertEqual(len(scans), 1)

    def test_delayNoticesScheduledWithoutScan(self):
        """The delay notices made while the relay is down need no listing either."""
        self.relay.down = True
        # No listing of the queue but those of this test.
        self.restart(queue_interval=86400.0)
        for n in range(3):
            self.submit(f"m{n}", notify=("DELAY", "FAILURE"))
        scans = self.countScans()
        self.reactor.advance(3600)
        self.assertEqual([subject for subject, *_ in self.reports()], [DELAYED] * 3)
        self.assertEqual(scans, [])

    def test_busyDiskPoolIsNoCrash(self):
        """
        A delay notice put off because the disk threads are busy with
        sessions is one warning, no traceback, and is made once, by the
        next try (or the next attempt, whichever comes first).
        """
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        self.relay.down = True
        self.submit("m1", notify=("DELAY",))
        self.failFor("reportDue", 1, lambda: PoolBusy("disk: 100 calls waiting"))
        self.reactor.advance(3600)
        self.assertEqual(self.flushLoggedErrors(), [])
        [line] = [m for m in watcher.messages if "put off" in m]
        self.assertEqual(
            line,
            "queue: m1: delay notification put off: disk: 100 calls waiting; tried again in 60 s",
        )
        self.runFor(60)
        self.assertEqual([subject for subject, *_ in self.reports()], [DELAYED])

    def test_neverMeansNoBounce(self):
        """NOTIFY=NEVER: a failed recipient gets no bounce, and the message leaves the queue."""
        self.refuseAt()
        self.submit("m1", notify=("NEVER",))
        self.assertEqual(self.local.delivered, [])
        self.assertEqual(listQueue(self.directory), [])

    def test_successOnlyMeansNoBounce(self):
        """NOTIFY=SUCCESS without FAILURE: no bounce either."""
        self.refuseAt()
        self.submit("m1", notify=("SUCCESS",))
        self.assertEqual(self.local.delivered, [])

    def test_bounceCarriesOriginalRecipientAndEnvelopeId(self):
        """A bounce names the ORCPT (decoded) and the ENVID (RFC 3464 2.2.1, 2.3.1)."""
        self.refuseAt()
        self.submit(
            "m1",
            notify=("FAILURE",),
            orcpt="rfc822;Bob+2Bx@remote.example",
            options=MessageOptions(envid="ID+3D7"),
        )
        [(subject, perMessage, [perRecipient], original)] = self.reports()
        self.assertEqual(subject, "Undelivered Mail Returned to Sender")
        self.assertEqual(perMessage["Original-Envelope-Id"], "ID=7")
        self.assertEqual(perRecipient["Original-Recipient"], "rfc822; Bob+x@remote.example")
        self.assertEqual(original.get_content_type(), "text/rfc822-headers")

    def test_retFullReturnsTheMessage(self):
        """RET=FULL: the bounce returns the whole message as message/rfc822."""
        self.refuseAt()
        self.submit("m1", options=MessageOptions(ret="FULL"))
        [(_, _, _, original)] = self.reports()
        self.assertEqual(original.get_content_type(), "message/rfc822")
        self.assertIn(b"Hello Bob.\r\n.\r\n..two dots\r\n", self.local.delivered[0][1])

    def test_relayedWhenTheRelayTakesNoDSN(self):
        """
        NOTIFY=SUCCESS and a relay without DSN: once it accepts the message
        the sender gets a "relayed" report (RFC 3461 5.2.2), once.
        """
        self.submit("m1", notify=("SUCCESS", "FAILURE"))
        [(subject, _, [perRecipient], original)] = self.reports()
        self.assertEqual(subject, "Successful Mail Delivery Report")
        self.assertEqual((perRecipient["Action"], perRecipient["Status"]), ("relayed", "2.0.0"))
        self.assertEqual(original.get_content_type(), "text/rfc822-headers")
        self.assertEqual(listQueue(self.directory), [])

    def test_relayWithDSNReports(self):
        """
        A relay that offers DSN gets the request with the message, and the
        queue sends no report of its own; the relay saw the envelope.
        """
        self.relay.dsn = True
        self.submit("m1", notify=("SUCCESS",), orcpt="rfc822;b@remote.example")
        self.assertEqual(self.local.delivered, [])
        [envelope] = self.relay.sessions[0].envelopes
        self.assertEqual(envelope.recipients[0].notify, ("SUCCESS",))
        self.assertEqual(listQueue(self.directory), [])

    def test_delayReportedOnce(self):
        """
        NOTIFY=DELAY: once a recipient is still pending delay_warning after
        arrival, the sender hears it once, with Will-Retry-Until; the
        message stays queued.
        """
        self.relay.down = True
        self.submit("m1", notify=("DELAY", "FAILURE"))
        self.runFor(3000)
        self.assertEqual(self.local.delivered, [])
        self.runFor(3 * 3600)
        [(subject, _, [perRecipient], _)] = self.reports()
        self.assertEqual(subject, "Delayed Mail (still being retried)")
        self.assertEqual(perRecipient["Action"], "delayed")
        self.assertTrue(perRecipient["Status"].startswith("4."))
        self.assertIn("Will-Retry-Until", perRecipient)
        self.assertEqual(len(listQueue(self.directory)), 1)

    def restart(self, **overrides):
        """Stop the service and start another on the same queue, as after a restart."""
        self.service.stopService()
        self.startQueue(**overrides)

    def test_delayReportedOnTimeWhileRelayDown(self):
        """
        The delay report goes out when it falls due, delay_warning after
        arrival, though the relay being down holds the next attempt back
        for longer; the attempt that follows sends no second one.
        """
        self.relay.down = True
        self.restart(retry_initial=7200.0, retry_max=7200.0)
        self.submit("m1", notify=("DELAY", "FAILURE"))
        self.runFor(3599)
        self.assertEqual(self.local.delivered, [])
        self.runFor(1)
        [(_, _, [perRecipient], _)] = self.reports()
        self.assertEqual(perRecipient["Action"], "delayed")
        self.assertEqual(self.relay.connectTimes, [EPOCH])
        self.runFor(86400)
        self.assertGreater(len(self.relay.connectTimes), 2)
        self.assertEqual(len(self.reports()), 1)
        self.assertEqual(len(listQueue(self.directory)), 1)

    def test_delayReportDatesTheLastAttempt(self):
        """
        A delay report queued on its timer, between attempts, gives the
        time of the last attempt as its Last-Attempt-Date (RFC 3464
        2.3.7), not its own; one about a message never tried (the relay
        held back since before it came) gives none.
        """
        self.relay.down = True
        self.restart(retry_initial=7200.0, retry_max=7200.0)
        self.submit("m1", notify=("DELAY",))
        self.runFor(600)
        # The relay is held back now: m2 is not tried when it comes.
        self.submit("m2", notify=("DELAY",))
        self.runFor(3600)
        self.assertEqual(self.relay.connectTimes, [EPOCH])
        [(_, _, [first], _), (_, _, [second], _)] = self.reports()
        self.assertEqual(first["Last-Attempt-Date"], email.utils.formatdate(EPOCH, usegmt=True))
        self.assertIsNone(second["Last-Attempt-Date"])

    def test_delayReportNotRepeatedAfterRestart(self):
        """
        A delay report sent is recorded with the message: a restart of the
        daemon does not send it again.
        """
        self.relay.down = True
        self.submit("m1", notify=("DELAY",))
        self.runFor(3600)
        self.assertEqual(len(self.reports()), 1)
        self.restart()
        self.runFor(3 * 3600)
        self.assertEqual(len(self.reports()), 1)

    def test_delayReportRetriedAfterDiskError(self):
        """
        A delay report that cannot be queued (a full disk) is one error
        line, and is tried again with the backoff of failed attempts, before
        the next attempt would send it.
        """
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        self.diskFullFor("reportDue", 1)
        self.relay.down = True
        self.restart(retry_initial=300.0, retry_max=7200.0)
        self.submit("m1", notify=("DELAY",))
        self.runFor(3600)
        self.assertEqual(self.local.delivered, [])
        [line] = [m for m in watcher.messages if "delay notification failed" in m]
        self.assertTrue(
            line.endswith("No space left on device (errno 28); tried again in 300 s"), line
        )
        self.runFor(300)
        self.assertEqual(len(self.reports()), 1)
        self.assertEqual(self.flushLoggedErrors(), [])
        # Attempts at 0, 300, 900 and 2100 s; the next is at 4500 s.
        self.assertEqual(len(self.relay.connectTimes), 4)

    def test_flushWhileDelayReportQueued(self):
        """
        C{mailauth queue flush} while the delay report of a message is being
        queued (its work waits for the disk) still makes that message due
        at once: when the report is done, the message does not go back to
        the time of its next attempt from before the flush.
        """
        self.relay.down = True
        self.restart(retry_initial=7200.0, retry_max=7200.0)
        reportDue = self.queue.reportDue
        waiting = []

        def slowReportDue(*args):
            waiting.append((defer.Deferred(), args))
            return waiting[-1][0]

        self.submit("m1", notify=("DELAY",))
        self.patch(self.queue, "reportDue", slowReportDue)
        self.runFor(3600)
        [(d, args)] = waiting
        self.relay.down = False
        flushQueue(self.directory)
        self.runFor(30)
        self.assertEqual(self.relay.deliveries, [])
        d.callback(reportDue(*args))
        self.reactor.advance(0)
        self.assertEqual(len(self.reports()), 1)
        self.assertEqual(len(self.relay.deliveries), 1)

    def test_delayReportsFailingTogetherTriedOnceEach(self):
        """
        Two delay reports that fall due together and cannot be queued (a
        full disk) fail once each, with the first backoff: the one whose
        failure was already handled is not tried again at once from the
        state the queue had before (which doubled its backoff and logged
        it twice).
        """
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)

        def reportDueOnFullDisk(*args, **kwargs):
            raise OSError(28, "No space left on device")

        self.patch(self.queue, "reportDue", reportDueOnFullDisk)
        self.relay.down = True
        self.restart(retry_initial=300.0, retry_max=7200.0)
        self.submit("m1", notify=("DELAY",))
        self.submit("m2", notify=("DELAY",))
        self.runFor(3600)
        failed = [m for m in watcher.messages if "delay notification failed" in m]
        self.assertEqual(sorted(line.split(":")[1] for line in failed), [" m1", " m2"], failed)
        for line in failed:
            self.assertTrue(line.endswith("tried again in 300 s"), line)

    def test_notificationsLoggedByKind(self):
        """
        The log names each notification as Postfix does (non-delivery,
        delay, delivery status), and says an expired recipient was returned
        to its sender only when it was.
        """
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        self.submit("m1", notify=("SUCCESS",))
        self.refuseAt()
        self.submit("m2")
        self.relay.replies = {}
        self.relay.down = True
        self.submit("m3", notify=("DELAY", "FAILURE"))
        self.submit("m4", notify=("NEVER",))
        self.runFor(6 * 86400)
        kinds = {
            m.group(1): m.group(2)
            for m in (
                re.match(r"queue: (m\d): sender (.+) notification: ", t) for t in watcher.messages
            )
            if m
        }
        self.assertEqual(
            kinds, {"m1": "delivery status", "m2": "non-delivery", "m3": "non-delivery"}
        )
        self.assertIn("queue: m3: sender delay notification: ", " ".join(watcher.messages))
        expired = [t for t in watcher.messages if "status=expired" in t]
        self.assertEqual(
            expired,
            [
                "queue: m3: to=<bob@remote.example>, status=expired, returned to sender",
                "queue: m4: to=<bob@remote.example>, status=expired, not returned "
                "(NOTIFY without FAILURE, or a null sender)",
            ],
        )

    def test_noDelayUnlessAsked(self):
        """Without NOTIFY=DELAY no delay report is sent, however long it waits."""
        self.relay.down = True
        self.submit("m1")
        self.runFor(12 * 3600)
        self.assertEqual(self.local.delivered, [])

    def test_localRefusalStatus(self):
        """
        A recipient the relay client refuses itself (5.6.7) bounces with that
        status and the reason, not as a reply of the relay.
        """
        self.relay.replies = {
            "bob@remote.example": [
                RelayReply(553, ("5.6.7 the relay does not offer SMTPUTF8",), local=True)
            ]
        }
        self.submit("m1")
        [(_, _, [perRecipient], _)] = self.reports()
        self.assertEqual(perRecipient["Status"], "5.6.7")
        self.assertNotIn("Diagnostic-Code", perRecipient)
        self.assertIn(b"the relay does not offer SMTPUTF8", self.local.delivered[0][1])
