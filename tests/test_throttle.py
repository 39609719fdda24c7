"""The brute-force throttle, on a Clock, counting in the memory counter store."""

from __future__ import annotations

import base64
import ipaddress

from twisted.cred.error import LoginFailed
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.mail.interfaces import IMessageDeliveryFactory
from twisted.trial import unittest
from zope.interface import implementer

from mailauth.counters import MemoryCounterStore
from mailauth.interfaces import ICounterStore
from mailauth.throttle import MAX_DELAY, AuthThrottle, addressKey, clientAddress, clientIP
from tests.harness import LogWatcher
from tests.support import (
    MemoryMailbox,
    RecordingPortal,
    Session,
    makeFactory,
    makeThrottle,
    passwordIs,
    withoutSession,
)


@implementer(ICounterStore)
class HeldStore:
    """
    A counter store whose answers wait for the test, as a shared store's
    answers wait for the network: each call is recorded with an unfired
    Deferred, answered by L{release} from the memory store underneath.
    """

    def __init__(self, clock) -> None:
        self.memory = MemoryCounterStore(clock)
        self.calls: list = []

    def _held(self, name, *args) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((name, args, d))
        return d

    def hit(self, key, window, amount=1):
        return self._held("hit", key, window, amount)

    def total(self, key, window):
        return self._held("total", key, window)

    def block(self, key, duration):
        return self._held("block", key, duration)

    def blocked(self, key):
        return self._held("blocked", key)

    def release(self) -> int:
        """Answer every call made so far; return how many."""
        calls, self.calls = self.calls, []
        for name, args, d in calls:
            d.callback(getattr(self.memory, name)(*args).result)
        return len(calls)


class ThrottleTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = makeThrottle(self.clock)

    def failure(self, host: str, login: str) -> float:
        return self.successResultOf(self.throttle.failure(host, login))

    def isBlocked(self, host: str) -> bool:
        return self.successResultOf(self.throttle.isBlocked(host))

    def test_firstFailuresNotDelayed(self) -> None:
        """The first few failures of an address are answered at once."""
        for _ in range(4):
            self.assertEqual(self.failure("192.0.2.1", "a@x.test"), 0)

    def test_tarpitGrows(self) -> None:
        """Past half the address limit each failure waits tarpit_delay longer."""
        delays = [self.failure("192.0.2.1", f"u{i}@x.test") for i in range(9)]
        self.assertEqual(delays, [0, 0, 0, 0, 0, 2.0, 4.0, 6.0, 8.0])

    def test_blockAtLimit(self) -> None:
        """At the limit the address is blocked for block_time, then free again."""
        for i in range(9):
            self.failure("192.0.2.1", f"u{i}@x.test")
        self.assertFalse(self.isBlocked("192.0.2.1"))
        self.failure("192.0.2.1", "u@x.test")
        self.assertTrue(self.isBlocked("192.0.2.1"))
        self.assertFalse(self.isBlocked("192.0.2.2"))
        self.clock.advance(899)
        self.assertTrue(self.isBlocked("192.0.2.1"))
        self.clock.advance(2)
        self.assertFalse(self.isBlocked("192.0.2.1"))

    def test_windowSlides(self) -> None:
        """Failures older than the window no longer count."""
        for _ in range(9):
            self.failure("192.0.2.1", "a@x.test")
        self.clock.advance(901)
        self.assertEqual(self.failure("192.0.2.1", "b@x.test"), 0)
        self.assertFalse(self.isBlocked("192.0.2.1"))

    def test_loginSlowedNotBlocked(self) -> None:
        """
        Failures for one login from many addresses slow that login's failures
        down but block no address, so the owner's own address stays usable.
        """
        delays = [self.failure(f"198.51.100.{i}", "alice@x.test") for i in range(20)]
        self.assertEqual(delays[:4], [0, 0, 0, 0])
        self.assertEqual(delays[4], 2.0)
        self.assertEqual(delays[-1], MAX_DELAY)
        self.assertFalse(any(self.isBlocked(f"198.51.100.{i}") for i in range(20)))
        self.assertFalse(self.isBlocked("192.0.2.1"))

    def test_loginCountCapped(self) -> None:
        """
        A login's count stops at four times its limit, as the in-memory
        windows the store replaced did: with a small tarpit delay its
        failures are slowed by at most 3 * max_failures_per_login + 1 steps.
        """
        throttle = makeThrottle(self.clock, tarpitDelay=0.5)
        delays = [
            self.successResultOf(throttle.failure(f"198.51.100.{i}", "alice@x.test"))
            for i in range(40)
        ]
        self.assertEqual(max(delays), 16 * 0.5)

    def test_loginSpellingsCountAsOne(self) -> None:
        """
        Every spelling of a login that logs in as the same user (case,
        quoting, a trailing dot, the U- or A-label form of its domain, NFC)
        counts under one key: spelling it anew does not start its count
        afresh.
        """
        spellings = [
            "alice@bücher.example",
            "Alice@Bücher.Example",
            '"alice"@bücher.example',
            "alice@xn--bcher-kva.example",
            "ALICE@XN--BCHER-KVA.EXAMPLE.",
            "alice@bu\u0308cher.example",
        ]
        delays = [self.failure(f"198.51.100.{i}", spelling) for i, spelling in enumerate(spellings)]
        self.assertEqual(delays, [0, 0, 0, 0, 2.0, 4.0])

    def test_ipv6Slash64(self) -> None:
        """IPv6 addresses count per /64: rotating addresses in one /64 does not help."""
        for i in range(10):
            self.failure(f"2001:db8:1:2::{i + 1:x}", "a@x.test")
        self.assertTrue(self.isBlocked("2001:db8:1:2::ffff"))
        self.assertFalse(self.isBlocked("2001:db8:1:3::1"))

    def test_addressKeys(self) -> None:
        """IPv4-mapped IPv6 counts as IPv4; other text is its own key."""
        self.assertEqual(addressKey("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(addressKey("2001:db8::1"), "2001:db8::/64")
        self.assertEqual(addressKey("local"), "local")

    def test_clientIP(self) -> None:
        """
        The one place an IPv4-mapped IPv6 address becomes IPv4, for the
        throttle's keys, the logs and the PROXY protocol's trust alike; other
        addresses are kept, and what is not an address is L{None}.
        """
        self.assertEqual(clientIP("::ffff:192.0.2.1"), ipaddress.IPv4Address("192.0.2.1"))
        self.assertEqual(clientIP("192.0.2.1"), ipaddress.IPv4Address("192.0.2.1"))
        self.assertEqual(clientIP("2001:db8::1"), ipaddress.IPv6Address("2001:db8::1"))
        self.assertIsNone(clientIP("/run/mailauth.sock"))
        self.assertEqual(clientAddress("::FFFF:192.0.2.1"), "192.0.2.1")
        self.assertEqual(clientAddress("2001:DB8::1"), "2001:DB8::1")
        self.assertEqual(clientAddress("local"), "local")

    def test_memoryBounded(self) -> None:
        """An attacker with many addresses and logins cannot grow the state past max_tracked."""
        for i in range(5000):
            self.failure(f"10.{i // 256 % 256}.{i % 256}.1", f"user{i}@x.test")
        self.assertLessEqual(self.throttle.store.trackedKeys(), 3 * 100)

    def test_sharedStore(self) -> None:
        """
        Two throttles on one counter store (two nodes sharing Redis) count
        together: the address is blocked after max_failures_per_address
        failures in all, and both refuse it.
        """
        store = MemoryCounterStore(self.clock)
        nodes = [makeThrottle(self.clock, store=store) for _ in range(2)]
        for i in range(9):
            self.successResultOf(nodes[i % 2].failure("192.0.2.1", f"u{i}@x.test"))
        self.assertEqual(
            [self.successResultOf(n.isBlocked("192.0.2.1")) for n in nodes], [False, False]
        )
        self.successResultOf(nodes[1].failure("192.0.2.1", "u@x.test"))
        self.assertEqual(
            [self.successResultOf(n.isBlocked("192.0.2.1")) for n in nodes], [True, True]
        )

    def test_answersWaitForTheStore(self) -> None:
        """
        The delay is known only once the store has counted the failure, and
        a block only once the store has recorded it.
        """
        store = HeldStore(self.clock)
        throttle = makeThrottle(self.clock, store=store, maxPerAddress=2)
        first = throttle.failure("192.0.2.1", "a@x.test")
        self.assertNoResult(first)
        self.assertEqual(store.release(), 2)
        self.assertEqual(self.successResultOf(first), 0)
        second = throttle.failure("192.0.2.1", "a@x.test")
        store.release()
        self.assertNoResult(second)
        self.assertEqual([name for name, _, _ in store.calls], ["block"])
        store.release()
        self.assertEqual(self.successResultOf(second), 2.0)
        blocked = throttle.isBlocked("192.0.2.1")
        self.assertNoResult(blocked)
        store.release()
        self.assertTrue(self.successResultOf(blocked))

    def test_onBlockOncePerBlock(self) -> None:
        """The onBlock hook (a metric) is called once when an address starts being blocked."""
        blocks = []
        throttle = makeThrottle(self.clock, maxPerAddress=3, onBlock=lambda: blocks.append(1))
        for _ in range(5):
            self.successResultOf(throttle.failure("192.0.2.1", "a@x.test"))
        self.assertEqual(blocks, [1])

    def test_blockAgainOnceEnded(self) -> None:
        """
        With C{block_time} shorter than C{failure_window}, the first failure
        after a block ends starts a new one, logged and counted as the
        first was; the failures of a session that began before the block
        are not. The count was then past the limit, and the new block came
        without its line or metric.
        """
        blocks = []
        log = LogWatcher()
        self.addCleanup(log.stop)
        throttle = makeThrottle(
            self.clock, maxPerAddress=3, blockTime=60.0, onBlock=lambda: blocks.append(1)
        )
        for _ in range(4):
            self.successResultOf(throttle.failure("192.0.2.1", "a@x.test"))
        self.assertEqual(blocks, [1])
        self.clock.advance(61)
        self.assertFalse(self.successResultOf(throttle.isBlocked("192.0.2.1")))
        self.successResultOf(throttle.failure("192.0.2.1", "a@x.test", "s2"))
        self.assertTrue(self.successResultOf(throttle.isBlocked("192.0.2.1")))
        self.assertEqual(blocks, [1, 1])
        lines = log.matching(r"^address blocked")
        self.assertEqual(len(lines), 2)
        self.assertEqual(
            lines[1],
            "address blocked: client=[192.0.2.1] key=192.0.2.1 failures=5 seconds=60 session=s2",
        )

    def test_blockLoggedOnceAcrossNodes(self) -> None:
        """
        Two nodes sharing a store, both past the limit at once after a
        block ended (block_time shorter than failure_window): the one whose
        failure started the new block logs it and counts it, the other not.
        Both asked the store whether the address was blocked, heard no,
        and both logged it.
        """
        store = HeldStore(self.clock)
        blocks: list = []
        nodes = [
            makeThrottle(
                self.clock,
                store=store,
                maxPerAddress=2,
                blockTime=60.0,
                onBlock=lambda: blocks.append(1),
            )
            for _ in range(2)
        ]
        for node in nodes:
            d = node.failure("192.0.2.1", "a@x.test")
            while store.release():
                pass
            self.successResultOf(d)
        self.assertEqual(blocks, [1])
        self.clock.advance(61)
        # Both count their failure (3 and 4) before either blocks.
        pending = [node.failure("192.0.2.1", "a@x.test") for node in nodes]
        while store.release():
            pass
        for d in pending:
            self.successResultOf(d)
        self.assertEqual(blocks, [1, 1])

    def test_fromConfig(self) -> None:
        """fromConfig takes the [auth] limits and counts in the store it is given."""
        from tests.support import makeConfig

        store = MemoryCounterStore(self.clock)
        throttle = AuthThrottle.fromConfig(self.clock, makeConfig().auth, store)
        self.assertIs(throttle.store, store)
        for _ in range(10):
            self.successResultOf(throttle.failure("192.0.2.1", "a@x.test"))
        self.assertTrue(self.successResultOf(store.blocked("auth-address:192.0.2.1")))


def plainLine(login: bytes, password: bytes) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(b"\0" + login + b"\0" + password)


class SessionTests(unittest.TestCase):
    """
    The session asks the throttle, whose store answers later (as Redis
    does): it reads no command until the answer is in, and its replies
    keep the order of the commands.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = HeldStore(self.clock)
        self.portal = RecordingPortal(
            MemoryMailbox(login="alice@example.test"), answer=passwordIs(b"secret")
        )
        self.factory = makeFactory(
            self.clock,
            portal=self.portal,
            tlsMode="implicit",
            throttle=makeThrottle(self.clock, store=self.store, maxPerAddress=4),
        )

    def test_greetingWaitsForTheStore(self) -> None:
        """
        A new connection is greeted only once the store says its address is
        not blocked; commands sent before are read after the greeting, in
        order.
        """
        session = Session(self.factory)
        self.assertEqual(session.send(b"EHLO c\r\nNOOP\r\n"), [])
        self.assertEqual(
            [(name, args) for name, args, _ in self.store.calls],
            [("blocked", ("auth-address:192.0.2.1",))],
        )
        self.store.release()
        lines = session.read()
        self.assertEqual(lines[0], b"220 mx.example.test ESMTP mailauth")
        self.assertEqual(lines[1], b"250-mx.example.test")
        self.assertEqual(lines[-1], b"250 2.0.0 Ok")

    def test_blockedAtConnect(self) -> None:
        """
        A blocked address gets 421 4.7.0 instead of the greeting, none of
        its commands are run, and its connection slot is given back.
        """
        self.successResultOf(self.store.memory.block("auth-address:192.0.2.1", 60))
        session = Session(self.factory)
        session.send(b"EHLO c\r\n")
        self.store.release()
        self.assertEqual(
            session.read(), [b"421 4.7.0 Error: too many failed logins, try again later"]
        )
        self.assertTrue(session.transport.disconnecting)
        self.assertEqual(self.factory.connections.count, 0)

    def test_leftWhileWaiting(self) -> None:
        """A client that leaves before it is admitted gives its connection slot back."""
        session = Session(self.factory)
        self.assertEqual(self.factory.connections.count, 1)
        session.protocol.connectionLost(None)
        self.store.release()
        self.assertEqual((session.read(), self.factory.connections.count), ([], 0))

    def greeted(self, host: str = "192.0.2.1") -> Session:
        session = Session(self.factory, host)
        self.store.release()
        session.read()
        session.command(b"EHLO c")
        return session

    def test_authWaitsForBlockedCheck(self) -> None:
        """AUTH asks whether the address is blocked first; NOOP after it waits its turn."""
        session = self.greeted()
        self.assertEqual(
            session.send(plainLine(b"alice@example.test", b"secret") + b"\r\nNOOP\r\n"), []
        )
        self.assertEqual(self.portal.logins, [])
        self.store.release()
        self.assertEqual(session.read(), [b"235 2.7.0 Authentication successful", b"250 2.0.0 Ok"])

    def test_authRefusedWhenBlocked(self) -> None:
        """An address blocked by another node is refused at AUTH with 421 and a hang-up."""
        session = self.greeted()
        self.successResultOf(self.store.memory.block("auth-address:192.0.2.1", 60))
        session.send(plainLine(b"alice@example.test", b"secret") + b"\r\n")
        self.store.release()
        self.assertEqual(
            session.read(), [b"421 4.7.0 Error: too many failed logins, try again later"]
        )
        self.assertEqual(self.portal.logins, [])

    def test_failureWaitsForTheCount(self) -> None:
        """
        The 535 is sent once the store has counted the failure (and said
        the address is not blocked); a command pipelined after it is
        answered after it.
        """
        session = self.greeted()
        session.send(plainLine(b"alice@example.test", b"wrong") + b"\r\nNOOP\r\n")
        self.store.release()  # the blocked check before the login
        self.assertEqual(session.read(), [])
        self.assertEqual(self.store.release(), 2)  # address and login counted
        self.assertEqual(session.read(), [])
        self.assertEqual(self.store.release(), 1)  # blocked now?
        self.assertEqual(
            session.read(), [b"535 5.7.8 Authentication credentials invalid", b"250 2.0.0 Ok"]
        )

    def test_blockedByThisFailure(self) -> None:
        """The failure that reaches the address limit is answered with 421 and a hang-up."""
        for _ in range(3):
            self.successResultOf(self.store.memory.hit("auth-address:192.0.2.1", 900))
        session = self.greeted()
        session.send(plainLine(b"alice@example.test", b"wrong") + b"\r\nNOOP\r\n")
        while self.store.release():
            pass
        self.assertEqual(
            session.read(), [b"421 4.7.0 Error: too many failed logins, try again later"]
        )
        self.assertTrue(session.transport.disconnecting)


class HangUpTests(unittest.TestCase):
    """A client that hangs up while its credentials are checked."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.portal = RecordingPortal(MemoryMailbox(login="alice@example.test"))
        self.throttle = makeThrottle(self.clock, maxPerAddress=4)
        self.factory = makeFactory(
            self.clock, portal=self.portal, tlsMode="implicit", throttle=self.throttle
        )
        self.events: list = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def guessAndHangUp(self, password: bytes) -> Session:
        """Send one guess, and hang up before it is answered."""
        session = Session(self.factory)
        session.command(b"EHLO c")
        session.command(plainLine(b"alice@example.test", password))
        self.assertEqual(len(self.portal.logins), 1)
        session.protocol.connectionLost(None)
        return session

    def test_wrongPasswordStillCounted(self) -> None:
        """
        A wrong password whose client hung up before the answer is logged
        and counted as any other (only the reply is left out): a guesser
        that never waits for its answers is blocked all the same.
        """
        for attempt in range(4):
            self.portal.logins = []
            session = self.guessAndHangUp(b"guess%d" % attempt)
            self.portal.fail()
            self.assertEqual(session.read(), [])
        self.assertTrue(self.successResultOf(self.throttle.isBlocked("192.0.2.1")))
        failures = [
            withoutSession(formatEvent(e))
            for e in self.events
            if e.get("log_format", "").startswith("auth failure:")
        ]
        self.assertEqual(
            failures,
            ["auth failure: client=[192.0.2.1] mechanism=PLAIN login=<alice@example.test>"] * 4,
        )

    def test_rightPasswordNotLoggedIn(self) -> None:
        """The right password of a client gone meanwhile logs nobody in, and counts nothing."""
        logouts: list = []
        session = self.guessAndHangUp(b"secret")
        self.portal.logins[0][1].callback(
            (IMessageDeliveryFactory, self.portal.avatar, lambda: logouts.append(True))
        )
        self.assertEqual((session.read(), session.protocol.login, logouts), ([], None, [True]))
        self.assertEqual(self.throttle.trackedKeys(), 0)

    def test_unavailableAfterHangUp(self) -> None:
        """A user database that failed meanwhile is logged; nothing is written to the client."""
        session = self.guessAndHangUp(b"secret")
        self.portal.fail(exc=LoginFailed("down"))
        self.assertEqual(session.read(), [])
        self.assertEqual(self.throttle.trackedKeys(), 0)
