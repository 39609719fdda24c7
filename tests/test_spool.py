"""Tests for L{mailauth.spool}: the queue's files, dot-stuffing and the queue commands."""

from __future__ import annotations

import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest

from mailauth.dotstuff import DotStuffer, unstuff
from mailauth.envelope import ACTION_DELAYED, FAILED, Outcome, RecipientStatus, RetryPolicy
from mailauth.queueadmin import deleteMessage
from mailauth.spool import DamagedMessage, Queue
from tests.support import EPOCH, HEADERS, MESSAGE, QueueTestMixin


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

    def test_dotsCounted(self):
        """
        The stuffer counts the dots it adds, wherever the chunks are cut:
        the stored size less them is the message's own.
        """
        message = b".a\r\n..b\r\nc.\r\n.\r\n"
        for size in range(1, len(message) + 1):
            stuffer = DotStuffer()
            stored = b"".join(
                stuffer.feed(message[i : i + size]) for i in range(0, len(message), size)
            )
            stored += stuffer.finish()
            self.assertEqual((stuffer.dots, len(stored) - stuffer.dots), (3, len(message)), size)

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

    def test_quarantinedKept(self):
        """
        An envelope that cannot be read is renamed C{ID.corrupt}; recovery
        keeps its message file with it (the message was acknowledged), and
        C{mailauth queue delete ID} removes both, saying it did.
        """
        self.enqueue("bad")
        msg = os.path.join(self.directory, "msg")
        with open(os.path.join(msg, "bad.json"), "wb") as f:
            f.write(b"\0" * 4096)
        with capturedLogs() as events:
            self.assertIsNone(self.queue.envelope("bad"))
        # The line quotes the damage cut short, not all 4096 bytes of it.
        [line] = [formatEvent(e) for e in events]
        self.assertIn("is unreadable: ", line)
        self.assertLess(len(line.partition("is unreadable: ")[2]), 210)
        self.assertEqual(self.files("msg"), ["bad.corrupt", "bad.data"])
        Queue(self.directory, self.reactor, "mail.example.org").recover()
        self.assertEqual(self.files("msg"), ["bad.corrupt", "bad.data"])
        self.assertTrue(deleteMessage(self.directory, "bad"))
        self.assertEqual(self.files("msg"), [])
        self.assertFalse(deleteMessage(self.directory, "bad"))

    def test_readMessageChecksSize(self):
        """
        readMessage, which local deliveries from the queue use, refuses a
        data file that is not the size its envelope says (cut short on
        disk), as openMessage does for the relay: a Maildir must not get a
        part of the message.
        """
        self.enqueue("cut")
        path = os.path.join(self.directory, "msg", "cut.data")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 7)
        e = self.assertRaises(DamagedMessage, self.queue.readMessage, "cut")
        self.assertRegex(str(e), r"cut\.data holds \d+ bytes, its envelope says \d+$")
        self.assertRaises(FileNotFoundError, self.queue.readMessage, "missing")

    def test_reportDue(self):
        """
        reportDue queues the delay report that is due without recording an
        attempt (the relay may be held back), marks it sent in the
        envelope, and queues nothing more when called again.
        """
        policy = RetryPolicy(delayWarning=600)
        self.enqueue("m1", recipients=[RecipientStatus("bob@remote.example", notify=("DELAY",))])
        before = self.queue.envelope("m1")
        self.assertEqual(self.queue.reportDue("m1", EPOCH + 599, policy).bounces, ())
        result = self.queue.reportDue("m1", EPOCH + 600, policy)
        self.assertEqual(result.actions, (ACTION_DELAYED,))
        [bounce] = result.bounces
        self.assertIn(b"Action: delayed", self.queue.readMessage(bounce))
        after = self.queue.envelope("m1")
        self.assertEqual(after, result.envelope)
        self.assertEqual((after.attempts, after.nextAttempt), (0, before.nextAttempt))
        self.assertTrue(after.recipients[0].delayNotified)
        self.assertEqual(self.queue.reportDue("m1", EPOCH + 900, policy).bounces, ())
        self.assertIsNone(self.queue.reportDue("gone", EPOCH + 900, policy))

    def test_recoverSparesWritersInProgress(self):
        """Recovery on a running queue keeps the files of messages being written."""
        writer = self.queue.newMessage("busy", "alice@example.org", ["b@remote.example"])
        writer.write(MESSAGE)
        self.queue.recover()
        writer.commit()
        self.assertEqual(self.files("msg"), ["busy.data", "busy.json"])


class PrependTests(QueueTestMixin, unittest.TestCase):
    """
    A header put on top of a queued message (its DKIM signature) is kept
    in the envelope, the data file untouched, and sent first.
    """

    HEADER = b"DKIM-Signature: v=1; a=ed25519-sha256;\r\n\tb=abc\r\n"

    def test_inEnvelope(self):
        """
        The data file is as written; the envelope holds the header (stored
        form) and a size that counts it; the message read back has it on top.
        """
        writer = self.queue.newMessage("m1", "alice@example.org", ["bob@remote.example"])
        writer.write(MESSAGE)
        writer.prepend(self.HEADER)
        writer.commit()
        with open(os.path.join(self.directory, "msg", "m1.data"), "rb") as f:
            self.assertEqual(f.read(), stuffWhole(MESSAGE))
        envelope = self.queue.envelope("m1")
        self.assertEqual(envelope.prefix, self.HEADER)
        self.assertEqual(envelope.size, len(self.HEADER) + len(stuffWhole(MESSAGE)))
        self.assertEqual(self.queue.readMessage("m1"), self.HEADER + MESSAGE)

    def test_openMessage(self):
        """
        openMessage reads the stored form, header first, in reads of any
        size, and closes the data file when closed.
        """
        message = b".starts with a dot\r\n" + MESSAGE * 2000
        writer = self.queue.newMessage("m1", "alice@example.org", ["bob@remote.example"])
        writer.write(message)
        writer.prepend(self.HEADER)
        writer.commit()
        envelope = self.queue.envelope("m1")
        stored = self.HEADER + stuffWhole(message)
        for size in (1, 7, len(self.HEADER) - 1, 16384, 10**7):
            with self.queue.openMessage(envelope) as f:
                pieces = []
                while piece := f.read(size):
                    pieces.append(piece)
                self.assertTrue(b"".join(pieces) == stored, size)
            self.assertTrue(f.closed)
        # Without a header, the data file itself.
        self.enqueue("m2")
        with self.queue.openMessage(self.queue.envelope("m2")) as f:
            self.assertEqual(f.read(), stuffWhole(MESSAGE))

    def test_bounceReturnsIt(self):
        """A bounce of a signed message returns its header section, signature included."""
        writer = self.queue.newMessage("m1", "alice@example.org", ["bob@remote.example"])
        writer.write(MESSAGE)
        writer.prepend(self.HEADER)
        writer.commit()
        result = self.queue.settle(
            "m1",
            {"bob@remote.example": Outcome(FAILED, reply="550 no")},
            None,
            EPOCH,
            RetryPolicy(),
        )
        [bounce] = result.bounces
        self.assertIn(b"\r\n" + self.HEADER + HEADERS, self.queue.readMessage(bounce))
