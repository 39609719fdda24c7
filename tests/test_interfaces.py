"""
The seams of L{mailauth.interfaces}: every real part and every fake declares
what it implements, and each fake passes the same suite as the real part it
stands for, so a fake cannot drift from what it fakes.
"""

from __future__ import annotations

import io
import os

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailauth import sasl
from mailauth.addressmap import AddressMap
from mailauth.dotstuff import DotStuffer
from mailauth.interfaces import (
    IForwardQueue,
    ILocalDelivery,
    IMessageSink,
    IRelayConnector,
    IRelaySession,
    IReloadable,
    ISASLMechanism,
)
from mailauth.limits import LimitOverrides
from mailauth.maildir import SPOOL, MaildirWriter
from mailauth.oauth import JWKSFile
from mailauth.ownmail import LocalDelivery
from mailauth.relay import RelayConnector, RelayReply
from mailauth.replies import SMTPReply
from mailauth.routing import Router
from mailauth.spool import Queue
from mailauth.userdb import UserDatabase
from tests.fakes import (
    FakeRelayConnector,
    MemoryQueue,
    MemoryUserDatabase,
    RecordingLocalDelivery,
    runInline,
)
from tests.smtpsink import SMTPSink, makePKI
from tests.support import TokenIssuer, relayConfig

MESSAGE = b"Subject: seams\r\n\r\n.a dotted line\r\nbody\r\n"


class MessageSinkTestsMixin:
    """
    L{IMessageSink}: bytes written, prepared, committed (or aborted), and
    whether what was stored can be seen. Subclasses say how to make a sink
    and how to read back what it stored.
    """

    def makeSink(self) -> IMessageSink:
        raise NotImplementedError()

    def stored(self) -> list:
        """Every message the sinks of this test made visible, as bytes."""
        raise NotImplementedError()

    def test_interface(self) -> None:
        """The sink provides L{IMessageSink}."""
        self.assertTrue(verifyObject(IMessageSink, self.makeSink()))

    def test_commitStores(self) -> None:
        """Written in chunks that split anywhere, committed: the message is stored whole."""
        sink = self.makeSink()
        for i in range(0, len(MESSAGE), 5):
            sink.write(MESSAGE[i : i + 5])
        self.assertEqual(self.stored(), [])
        sink.prepare()
        self.assertEqual(self.stored(), [])
        sink.commit()
        self.assertEqual(self.stored(), [MESSAGE])

    def test_commitPrepares(self) -> None:
        """C{commit} without C{prepare} prepares first."""
        sink = self.makeSink()
        sink.write(MESSAGE)
        sink.commit()
        self.assertEqual(self.stored(), [MESSAGE])

    def test_abortBeforeCommit(self) -> None:
        """An aborted message, written or prepared, is never stored."""
        for prepared in (False, True):
            sink = self.makeSink()
            sink.write(MESSAGE)
            if prepared:
                sink.prepare()
            sink.abort()
            sink.abort()
        self.assertEqual(self.stored(), [])

    def test_abortAfterCommit(self) -> None:
        """
        Aborting a committed message (another part of it failed) takes it
        back out.
        """
        sink = self.makeSink()
        sink.write(MESSAGE)
        sink.commit()
        sink.abort()
        self.assertEqual(self.stored(), [])

    def test_prepend(self) -> None:
        """
        Header fields prepended after the last write head the stored
        message, each on top of the one before; the message written first
        is unchanged below them, its leading dot too.
        """
        message = b"." + MESSAGE
        sink = self.makeSink()
        for i in range(0, len(message), 5):
            sink.write(message[i : i + 5])
        sink.prepend(b"X-First: 1\r\n")
        sink.prepend(b"X-Second: 2\r\n\tfolded\r\n")
        sink.prepare()
        sink.commit()
        self.assertEqual(self.stored(), [b"X-Second: 2\r\n\tfolded\r\nX-First: 1\r\n" + message])

    def test_prependLarge(self) -> None:
        """A message far larger than what a sink holds in memory gets the header on top too."""
        message = MESSAGE + b"".join(
            b"line %06d ......................................\r\n" % n for n in range(10000)
        )
        self.assertGreater(len(message), 4 * SPOOL)
        sink = self.makeSink()
        for i in range(0, len(message), 8191):
            sink.write(message[i : i + 8191])
        sink.prepend(b"X-Top: 1\r\n")
        sink.commit()
        [stored] = self.stored()
        # Not assertEqual: a diff of two large messages takes minutes.
        self.assertTrue(stored == b"X-Top: 1\r\n" + message, stored[:200])

    def test_abortAfterPrepend(self) -> None:
        """A message aborted after a prepend is never stored."""
        for size in (1, 10000):
            sink = self.makeSink()
            sink.write(MESSAGE * size)
            sink.prepend(b"X-Top: 1\r\n")
            sink.abort()
        self.assertEqual(self.stored(), [])


class MaildirWriterSinkTests(MessageSinkTestsMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.maildir = os.path.abspath(self.mktemp())

    def makeSink(self) -> IMessageSink:
        return MaildirWriter([self.maildir], "mx.example.test")

    def stored(self) -> list:
        new = os.path.join(self.maildir, "new")
        found = []
        for name in sorted(os.listdir(new)):
            with open(os.path.join(new, name), "rb") as f:
                found.append(f.read().replace(b"\n", b"\r\n"))
        return found


class QueueWriterSinkTests(MessageSinkTestsMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.queue = Queue(os.path.abspath(self.mktemp()), Clock(), "mx.example.test")
        self.count = 0

    def makeSink(self) -> IMessageSink:
        self.count += 1
        return self.queue.newMessage(f"m{self.count}", "a@example.org", ["b@remote.example"])

    def stored(self) -> list:
        return [self.queue.readMessage(m) for m in sorted(self.queue.scan(frozenset()).present)]


class MemoryQueueWriterSinkTests(MessageSinkTestsMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.queue = MemoryQueue()
        self.count = 0

    def makeSink(self) -> IMessageSink:
        self.count += 1
        return self.queue.newMessage(f"m{self.count}", "a@example.org", ["b@remote.example"])

    def stored(self) -> list:
        return [data for _, _, data in self.queue.messages.values()]


class ForwardQueueTestsMixin:
    """L{IForwardQueue}: what it refuses when a message is started."""

    def makeQueue(self) -> IForwardQueue:
        raise NotImplementedError()

    def test_interface(self) -> None:
        """The queue provides L{IForwardQueue}."""
        self.assertTrue(verifyObject(IForwardQueue, self.makeQueue()))

    def test_noRecipients(self) -> None:
        """A message needs a recipient."""
        self.assertRaises(ValueError, self.makeQueue().newMessage, "m1", "a@example.org", [])

    def test_idInUse(self) -> None:
        """A queue ID is used once, while being written and once committed."""
        queue = self.makeQueue()
        writer = queue.newMessage("m1", "", ["b@remote.example"])
        self.assertRaises(ValueError, queue.newMessage, "m1", "", ["b@remote.example"])
        writer.write(MESSAGE)
        writer.commit()
        self.assertRaises(ValueError, queue.newMessage, "m1", "", ["b@remote.example"])


class QueueTests(ForwardQueueTestsMixin, unittest.TestCase):
    def makeQueue(self) -> IForwardQueue:
        return Queue(os.path.abspath(self.mktemp()), Clock(), "mx.example.test")


class MemoryQueueTests(ForwardQueueTestsMixin, unittest.TestCase):
    def makeQueue(self) -> IForwardQueue:
        return MemoryQueue()


class LocalDeliveryTestsMixin:
    """
    L{ILocalDelivery} for the domain C{example.org}, where
    C{alice@example.org} exists: local or not, delivered, or refused with a
    5xx L{SMTPReply}.
    """

    def makeDelivery(self) -> ILocalDelivery:
        raise NotImplementedError()

    def delivered(self) -> list:
        """(recipient, message) of every delivery made."""
        raise NotImplementedError()

    def test_interface(self) -> None:
        """The delivery provides L{ILocalDelivery}."""
        self.assertTrue(verifyObject(ILocalDelivery, self.makeDelivery()))

    def test_isLocal(self) -> None:
        """Addresses in the local domains are local, in any case."""
        delivery = self.makeDelivery()
        self.assertTrue(delivery.isLocal("alice@EXAMPLE.org"))
        self.assertFalse(delivery.isLocal("alice@remote.example"))

    def test_deliver(self) -> None:
        """A message for a local user is delivered."""
        delivery = self.makeDelivery()
        self.successResultOf(delivery.deliver("alice@example.org", MESSAGE))
        self.assertEqual(self.delivered(), [("alice@example.org", MESSAGE)])

    def test_unknown(self) -> None:
        """A message for nobody fails with a permanent L{SMTPReply}."""
        delivery = self.makeDelivery()
        f = self.failureResultOf(delivery.deliver("nobody@example.org", MESSAGE), SMTPReply)
        self.assertEqual(f.value.code // 100, 5)
        self.assertEqual(self.delivered(), [])


class LocalDeliveryTests(LocalDeliveryTestsMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        self.router = Router(
            localDomains={"example.org"},
            maildirTemplate=self.root + "/{domain}/{localpart}/Maildir",
            users=MemoryUserDatabase({"alice@example.org": "{PLAIN}a"}),
            aliases=AddressMap(None),
            senderMap=AddressMap(None),
            senderLoginMatch=True,
        )

    def makeDelivery(self) -> ILocalDelivery:
        return LocalDelivery(self.router, "mx.example.org", runInline)

    def delivered(self) -> list:
        new = os.path.join(self.root, "example.org", "alice", "Maildir", "new")
        if not os.path.isdir(new):
            return []
        found = []
        for name in sorted(os.listdir(new)):
            with open(os.path.join(new, name), "rb") as f:
                returnPath, stored = f.read().split(b"\n", 1)
            # Final delivery of a bounce: its null sender comes first.
            assert returnPath == b"Return-Path: <>", returnPath
            found.append(("alice@example.org", stored.replace(b"\n", b"\r\n")))
        return found


class RecordingLocalDeliveryTests(LocalDeliveryTestsMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.fake = RecordingLocalDelivery(["example.org"], users=["alice@example.org"])

    def makeDelivery(self) -> ILocalDelivery:
        return self.fake

    def delivered(self) -> list:
        return self.fake.delivered


def stuff(message: bytes) -> io.BytesIO:
    """The stored (dot-stuffed) form of a canonical message, as the queue keeps it."""
    stuffer = DotStuffer()
    return io.BytesIO(stuffer.feed(message) + stuffer.finish())


class RelayConnectorTestsMixin:
    """
    L{IRelayConnector} and L{IRelaySession}: connect, deliver one message to
    two recipients of which the relay refuses one, deliver another on the
    same session, close.
    """

    def makeConnector(self) -> IRelayConnector:
        raise NotImplementedError()

    def refuse(self, address: str) -> None:
        """Make the relay refuse C{address} with a 550 at RCPT."""
        raise NotImplementedError()

    def accepted(self) -> list:
        """(sender, recipients, message) of every message the relay accepted."""
        raise NotImplementedError()

    def test_interface(self) -> None:
        """The connector provides L{IRelayConnector}."""
        self.assertTrue(verifyObject(IRelayConnector, self.makeConnector()))

    @defer.inlineCallbacks
    def test_session(self):
        """A session delivers messages, with a reply per recipient, and closes."""
        self.refuse("nobody@remote.example")
        session = yield self.makeConnector().connect()
        self.assertTrue(verifyObject(IRelaySession, session))
        replies = yield session.deliver(
            "alice@example.org",
            ["bob@remote.example", "nobody@remote.example"],
            stuff(MESSAGE),
            len(MESSAGE),
            False,
        )
        self.assertEqual(sorted(replies), ["bob@remote.example", "nobody@remote.example"])
        self.assertIsInstance(replies["bob@remote.example"], RelayReply)
        self.assertEqual(replies["bob@remote.example"].code, 250)
        self.assertEqual(replies["nobody@remote.example"].code, 550)
        yield session.deliver("", ["bob@remote.example"], stuff(MESSAGE), len(MESSAGE), False)
        yield session.close()
        self.assertEqual(
            self.accepted(),
            [
                ("alice@example.org", ("bob@remote.example",), MESSAGE),
                ("", ("bob@remote.example",), MESSAGE),
            ],
        )


class RelayConnectorTests(RelayConnectorTestsMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.sink = SMTPSink(reactor, makePKI(), tls="none", credentials=None)
        yield self.sink.start()
        self.addCleanup(self.sink.stop)

    def makeConnector(self) -> IRelayConnector:
        config = relayConfig(host="127.0.0.1", port=self.sink.port, tls="none", timeout=5.0)
        return RelayConnector(config, reactor, "mx.example.org")

    def refuse(self, address: str) -> None:
        self.sink.rcptReplies[address] = [b"550 5.1.1 unknown"]

    def accepted(self) -> list:
        return [(t.sender, t.recipients, t.data) for t in self.sink.transactions]


class FakeRelayConnectorTests(RelayConnectorTestsMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.fake = FakeRelayConnector()

    def makeConnector(self) -> IRelayConnector:
        return self.fake

    def refuse(self, address: str) -> None:
        self.fake.replies[address] = [RelayReply(550, ("550 5.1.1 unknown",))]

    def accepted(self) -> list:
        return self.fake.deliveries


class DeclarationTests(unittest.TestCase):
    """Parts without a fake still declare and provide their interfaces."""

    def test_mechanisms(self) -> None:
        """Every SASL mechanism of the table provides L{ISASLMechanism}."""
        for name, mechanism in sasl.MECHANISMS.items():
            context = sasl.SASLContext("mx.example.test", Clock())
            self.assertTrue(verifyObject(ISASLMechanism, mechanism(context)), name)

    def test_addressMap(self) -> None:
        """The aliases and sender map are L{IReloadable}."""
        self.assertTrue(verifyObject(IReloadable, AddressMap(None)))


class ReloadableFileTests(unittest.TestCase):
    """
    Every L{IReloadable} file (users, aliases and sender map, sending limit
    overrides, JWKS) follows its file the same way: a file that is gone
    keeps what was read, is logged once (not at every periodic check), and
    is read again when it is back.
    """

    def check(self, make, first: bytes, second: bytes, current) -> None:
        """
        @param make: makes the reloadable from a path (and loads it).
        @param first: the file it is made from; C{second}, what replaces it.
        @param current: what the reloadable holds now, to compare.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(first)
        reloadable = make(path)
        self.assertTrue(verifyObject(IReloadable, reloadable))
        held = current(reloadable)
        self.assertFalse(reloadable.maybeReload())
        os.rename(path, path + ".away")
        with capturedLogs() as events:
            for _ in range(3):
                self.assertFalse(reloadable.maybeReload())
        errors = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1, [formatEvent(e) for e in errors])
        self.assertIn("No such file or directory", formatEvent(errors[0]))
        self.assertEqual(current(reloadable), held)
        # SIGHUP's load says it again.
        with capturedLogs() as events:
            self.assertFalse(reloadable.load())
        self.assertEqual(len([e for e in events if e["log_level"] == LogLevel.error]), 1)
        with open(path, "wb") as f:
            f.write(second)
        self.assertTrue(reloadable.maybeReload())
        self.assertNotEqual(current(reloadable), held)
        self.assertFalse(reloadable.maybeReload())

    def test_users(self) -> None:
        def make(path: str) -> UserDatabase:
            users = UserDatabase(path)
            users.load()
            return users

        self.check(
            make,
            b"a@example.test:{PLAIN}a\n",
            b"b@example.test:{PLAIN}b\n",
            lambda users: users.logins(),
        )

    def test_addressMap(self) -> None:
        self.check(
            AddressMap,
            b"a@example.test: b@example.test\n",
            b"a@example.test: c@example.test\n",
            lambda aliases: aliases.get("a@example.test"),
        )

    def test_limitOverrides(self) -> None:
        self.check(
            LimitOverrides,
            b"bulk@example.test: messages_per_hour=200\n",
            b"bulk@example.test: messages_per_hour=300\n",
            lambda overrides: overrides.get("bulk@example.test"),
        )

    def test_jwks(self) -> None:
        issuer = TokenIssuer("ec", "k1")
        issuer.addKey("k2", "ed25519")
        folder = os.path.abspath(self.mktemp())
        os.mkdir(folder)
        texts = []
        for kid in ("k1", "k2"):
            issuer.writeJWKS(os.path.join(folder, kid), kid)
            with open(os.path.join(folder, kid), "rb") as f:
                texts.append(f.read())

        def make(path: str) -> JWKSFile:
            keys = JWKSFile(path)
            keys.load()
            return keys

        self.check(make, texts[0], texts[1], lambda keys: [k.kid for k in keys.keys()])
