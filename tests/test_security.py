"""
Attacks on the real service: L{mailauth.tap.buildService} listening on
127.0.0.1, driven over real sockets (and TLS) the way an auditor would.
Each test's docstring names the defence it proves; each fails when that
defence is taken out.

Where timing matters the service runs on a L{ClockedReactor}: real sockets
and threads, but timeouts, tarpit delays and blocks move only when the test
advances its clock, so nothing here sleeps or asserts an upper bound on
wall-clock time.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailauth.throttle import MAX_DELAY, AuthThrottle, ConnectionLimiter
from tests.harness import (
    BOB,
    BOB_PASSWORD,
    CHEAP_USERS,
    PASSWORD,
    ROOT,
    SHA512,
    AttackMixin,
    Daemon,
    RawClient,
    b64,
    insecureContext,
    plain,
    serverConnectionsClosed,
)

# -- 1. brute force -----------------------------------------------------------


class BruteForceTests(AttackMixin, unittest.TestCase):
    """
    Failed logins against the real server, with a clock the test drives:
    a tarpitted 535 arrives only when the clock passes the delay, so a reply
    that arrives while the clock stands still was not delayed at all.
    """

    clocked = True
    settings = {
        "auth": {
            "tarpit_delay": "10s",
            "max_failures_per_address": "4",
            "max_failures_per_login": "3",
            "block_time": "60s",
            "failures_per_session": "10",
        }
    }

    def failure(self, source: str):
        return self.log.waitFor(rf"auth failure: client=\[{re.escape(source)}\]")

    @defer.inlineCallbacks
    def test_tarpitThenBlockWhileOthersServed(self):
        """
        Failures from one address are answered slowly past half its limit
        (tarpit), then with 421 4.7.0 and a hang-up at the limit, and new
        connections from it are refused until block_time passes; meanwhile
        another address fails and logs in with no delay at all.
        """

        def firstTwo():
            a = self.connect()
            a.ehlo()
            replies = [a.command(plain(login, b"wrong"))[0] for login in CHEAP_USERS[:2]]
            return a, replies

        a, replies = yield self.inThread(firstTwo)
        self.assertEqual(replies, [535, 535])

        logged = self.failure("127.0.0.1")
        yield self.inThread(a.send, plain(CHEAP_USERS[2], b"wrong") + b"\r\n")
        yield logged  # the server has counted it, and holds its reply back

        def otherAddress():
            b = self.connect(source="127.0.0.2")
            b.ehlo()
            return [
                b.command(plain(BOB, b"wrong")),
                b.command(plain(BOB, BOB_PASSWORD)),
                b.command(b"QUIT"),
            ]

        bReplies = yield self.inThread(otherAddress)
        self.assertEqual([code for code, _ in bReplies], [535, 235, 221])
        self.assertFalse(a.pending(), "the third failure was answered without delay")

        self.clock.advance(10)
        code, text = yield self.inThread(a.reply)
        self.assertEqual((code, text), (535, [b"5.7.8 Authentication credentials invalid"]))

        code, text = yield self.inThread(a.command, plain(CHEAP_USERS[3], b"wrong"))
        self.assertEqual(
            (code, text), (421, [b"4.7.0 Error: too many failed logins, try again later"])
        )
        self.assertTrue((yield self.inThread(a.closedByServer)))

        refused = yield self.inThread(self.connect, "submissions", "127.0.0.1", 421)
        self.assertEqual(
            refused.lines, [b"421 4.7.0 Error: too many failed logins, try again later"]
        )
        self.assertTrue((yield self.inThread(refused.closedByServer)))
        yield self.inThread(self.connect, "submission", "127.0.0.1", 421)
        yield self.inThread(self.connect, "submissions", "127.0.0.2", 220)

        self.clock.advance(60)
        yield self.inThread(self.loggedIn)

    @defer.inlineCallbacks
    def test_successNeverDelayed(self):
        """
        A correct password is answered at once, even from an address whose
        failures are being tarpitted right now.
        """

        def twoFailures():
            a = self.connect()
            a.ehlo()
            for login in CHEAP_USERS[:2]:
                a.command(plain(login, b"wrong"))
            return a

        a = yield self.inThread(twoFailures)
        logged = self.failure("127.0.0.1")
        yield self.inThread(a.send, plain(CHEAP_USERS[2], b"wrong") + b"\r\n")
        yield logged

        def sendFromSameAddress():
            b = self.loggedIn(source="127.0.0.1")
            replies = [
                b.command(b"MAIL FROM:<bob@example.test>"),
                b.command(b"RCPT TO:<alice.plain@example.test>"),
                b.command(b"DATA"),
            ]
            b.send(b"Subject: sent while tarpitted\r\n\r\nhello\r\n.\r\n")
            replies.append(b.reply())
            return [code for code, _ in replies]

        self.assertEqual((yield self.inThread(sendFromSameAddress)), [250, 250, 354, 250])
        self.assertFalse(a.pending())
        self.assertEqual(len(self.daemon.files("alice.plain@example.test")), 1)

    @defer.inlineCallbacks
    def test_attackerDoesNotLockOutOwner(self):
        """
        Someone guessing bob's password from 127.0.0.3 gets that address
        blocked; bob, from his own address, still connects and logs in at
        once. His own mistakes are only slowed (per-login tarpit), never
        answered with 421, and his address is not blocked.
        """

        def guess(n):
            return lambda c: c.command(plain(BOB, b"guess%d" % n))

        def firstGuesses():
            attacker = self.connect(source="127.0.0.3")
            attacker.ehlo()
            return attacker, [guess(n)(attacker)[0] for n in range(2)]

        attacker, codes = yield self.inThread(firstGuesses)
        self.assertEqual(codes, [535, 535])
        logged = self.failure("127.0.0.3")
        yield self.inThread(attacker.send, plain(BOB, b"guess2") + b"\r\n")
        yield logged
        self.clock.advance(10)
        self.assertEqual((yield self.inThread(attacker.reply))[0], 535)
        self.assertEqual((yield self.inThread(guess(3), attacker))[0], 421)
        yield self.inThread(self.connect, "submissions", "127.0.0.3", 421)

        owner = yield self.inThread(self.loggedIn)  # no clock movement: no delay
        yield self.inThread(owner.command, b"QUIT")

        def typo():
            c = self.connect()
            c.ehlo()
            return c

        c = yield self.inThread(typo)
        logged = self.failure("127.0.0.1")
        yield self.inThread(c.send, plain(BOB, b"typo") + b"\r\n")
        yield logged
        self.assertFalse(c.pending(), "bob's own failure was not slowed")
        self.clock.advance(MAX_DELAY)
        self.assertEqual(
            (yield self.inThread(c.reply)), (535, [b"5.7.8 Authentication credentials invalid"])
        )
        self.assertEqual((yield self.inThread(c.command, plain(BOB, BOB_PASSWORD)))[0], 235)
        yield self.inThread(self.loggedIn)


class RealTimeTarpitTests(AttackMixin, unittest.TestCase):
    """The tarpit on the real reactor, measured only from below."""

    settings = {
        "auth": {
            "tarpit_delay": "0.2s",
            "max_failures_per_address": "4",
            "failures_per_session": "10",
        }
    }

    @defer.inlineCallbacks
    def test_delayedReplyComesAfterTheDelay(self):
        """
        Past half of max_failures_per_address the 535 comes no sooner than
        tarpit_delay after the attempt; at the limit: 421 4.7.0.
        """

        def attack():
            c = self.connect()
            c.ehlo()
            codes = [c.command(plain(login, b"wrong"))[0] for login in CHEAP_USERS[:2]]
            start = time.monotonic()
            codes.append(c.command(plain(CHEAP_USERS[2], b"wrong"))[0])
            elapsed = time.monotonic() - start
            codes.append(c.command(plain(CHEAP_USERS[3], b"wrong"))[0])
            return codes, elapsed

        codes, elapsed = yield self.inThread(attack)
        self.assertEqual(codes, [535, 535, 535, 421])
        self.assertGreaterEqual(elapsed, 0.2)


class SessionFailureLimitTests(AttackMixin, unittest.TestCase):
    settings = {"auth": {"failures_per_session": "2"}}

    @defer.inlineCallbacks
    def test_failuresPerSession(self):
        """
        failures_per_session failed logins end the connection with 421
        4.7.0; the address is not blocked by that alone.
        """

        def attack():
            c = self.connect()
            c.ehlo()
            replies = [c.command(plain(BOB, b"wrong")), c.command(plain(BOB, b"wrong2"))]
            return replies, c.closedByServer()

        replies, closed = yield self.inThread(attack)
        self.assertEqual(
            replies,
            [
                (535, [b"5.7.8 Authentication credentials invalid"]),
                (421, [b"4.7.0 Error: too many failed logins"]),
            ],
        )
        self.assertTrue(closed)
        yield self.inThread(self.loggedIn)


class _Answered:
    """An L{AuthThrottle} on the memory store, whose Deferreds fire at once, read at once."""

    def __init__(self, test: unittest.TestCase, throttle: AuthThrottle) -> None:
        self.test = test
        self.throttle = throttle
        self.store = throttle.store

    def failure(self, host: str, login: str) -> float:
        return self.test.successResultOf(self.throttle.failure(host, login))

    def isBlocked(self, host: str) -> bool:
        return self.test.successResultOf(self.throttle.isBlocked(host))


class ThrottleTests(unittest.TestCase):
    """L{AuthThrottle} and L{ConnectionLimiter} on a Clock."""

    def throttle(self, **overrides) -> _Answered:
        self.clock = Clock()
        values = dict(
            window=900.0,
            maxPerAddress=10,
            maxPerLogin=5,
            tarpitDelay=2.0,
            blockTime=900.0,
            maxTracked=100,
        )
        values.update(overrides)
        return _Answered(self, AuthThrottle(self.clock, **values))

    def test_memoryBoundedByKeys(self):
        """
        However many addresses and logins fail, at most max_tracked of each
        (and of blocks) are remembered: memory stays bounded.
        """
        throttle = self.throttle(maxPerAddress=2)
        for i in range(5000):
            host = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
            throttle.failure(host, f"user{i}@example.test")
            throttle.failure(host, f"user{i}@example.test")
        self.assertLessEqual(throttle.store.trackedKeys(), 300)
        self.assertTrue(throttle.isBlocked("10.0.19.135"))

    def test_longLoginsBounded(self):
        """
        A flood of distinct logins of 9 KB each (the most an AUTH line
        holds) costs no more memory than short ones would: the throttle
        keeps a bounded key per login, not the attacker's whole string.
        """
        throttle = self.throttle(maxTracked=1000)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(3000):
                throttle.failure(f"192.0.2.{i % 200}", f"{i}" + "x" * 9000)
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        self.assertLess(grown, 4 * 1024 * 1024)

    def test_ipv6CountedPerSlash64(self):
        """
        IPv6 clients are counted by their /64, so rotating addresses inside
        one subscriber's network does not escape the block; other /64s are
        not affected.
        """
        throttle = self.throttle()
        for i in range(10):
            throttle.failure(f"2001:db8:1:2::{i + 1:x}", "x@example.test")
        self.assertTrue(throttle.isBlocked("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        self.assertFalse(throttle.isBlocked("2001:db8:1:3::1"))

    def test_ipv4MappedIsIPv4(self):
        """An IPv4-mapped IPv6 peer (dual-stack listener) is the same client as its IPv4."""
        throttle = self.throttle()
        for _ in range(10):
            throttle.failure("::ffff:192.0.2.7", "x@example.test")
        self.assertTrue(throttle.isBlocked("192.0.2.7"))

    def test_windowSlides(self):
        """Failures older than failure_window no longer count."""
        throttle = self.throttle()
        for _ in range(9):
            throttle.failure("192.0.2.1", "x@example.test")
        self.clock.advance(901)
        self.assertEqual(throttle.failure("192.0.2.1", "y@example.test"), 0)
        self.assertFalse(throttle.isBlocked("192.0.2.1"))

    def test_blockExpires(self):
        """A blocked address is served again after block_time."""
        throttle = self.throttle()
        for _ in range(10):
            throttle.failure("192.0.2.1", "x@example.test")
        self.clock.advance(899)
        self.assertTrue(throttle.isBlocked("192.0.2.1"))
        self.clock.advance(2)
        self.assertFalse(throttle.isBlocked("192.0.2.1"))

    def test_loginSlowedNeverBlocked(self):
        """
        Failures for one login from many addresses slow that login's
        failures, up to MAX_DELAY, without blocking any address or slowing
        other logins.
        """
        throttle = self.throttle()
        delays = [throttle.failure(f"192.0.2.{i}", "Alice@example.test") for i in range(40)]
        self.assertEqual(delays[:4], [0, 0, 0, 0])
        self.assertEqual(delays[4], 2.0)
        self.assertEqual(max(delays), MAX_DELAY)
        self.assertFalse(any(throttle.isBlocked(f"192.0.2.{i}") for i in range(40)))
        self.assertEqual(throttle.failure("192.0.2.200", "bob@example.test"), 0)

    def test_connectionsPerAddressCountIPv6Slash64(self):
        """
        max_connections_per_address counts an IPv6 client by its /64, as the
        throttle does, so one subscriber cannot take every slot by using a
        new address per connection.
        """
        limiter = ConnectionLimiter(total=100, perAddress=2)
        self.assertIsNone(limiter.acquire("2001:db8::1"))
        self.assertIsNone(limiter.acquire("2001:db8::2"))
        self.assertEqual(
            limiter.acquire("2001:db8::3").text,
            "4.7.0 Error: too many connections from your address",
        )
        self.assertIsNone(limiter.acquire("2001:db8:0:1::1"))
        limiter.release("2001:db8::1")
        self.assertIsNone(limiter.acquire("2001:db8::3"))
        for host in ("2001:db8::2", "2001:db8::3", "2001:db8:0:1::1"):
            limiter.release(host)
        self.assertEqual((limiter.count, limiter.byAddress), (0, {}))


# -- 2. limits ----------------------------------------------------------------


class LimitTests(AttackMixin, unittest.TestCase):
    clocked = True
    settings = {
        "server": {
            "max_connections": "4",
            "max_connections_per_address": "2",
            "max_recipients": "3",
            "max_errors": "3",
            "timeout": "30s",
            "data_timeout": "60s",
        }
    }

    @defer.inlineCallbacks
    def test_connectionsPerAddress(self):
        """
        Past max_connections_per_address from one address: 421 4.7.0 and a
        hang-up, while another address still gets its greeting.
        """
        yield self.inThread(self.connect)
        yield self.inThread(self.connect, "submission")
        extra = yield self.inThread(self.connect, "submissions", "127.0.0.1", 421)
        self.assertEqual(extra.lines, [b"421 4.7.0 Error: too many connections from your address"])
        self.assertTrue((yield self.inThread(extra.closedByServer)))
        yield self.inThread(self.connect, "submissions", "127.0.0.2")

    @defer.inlineCallbacks
    def test_totalConnections(self):
        """
        Past max_connections over all listeners: 421 4.7.0; a slot is free
        again once a client leaves.
        """
        first = yield self.inThread(self.connect, "submission", "127.0.0.1")
        for source in ("127.0.0.1", "127.0.0.2", "127.0.0.2"):
            yield self.inThread(self.connect, "submissions", source)
        extra = yield self.inThread(self.connect, "submissions", "127.0.0.3", 421)
        self.assertEqual(extra.lines, [b"421 4.7.0 Error: too many connections, try again later"])
        yield self.inThread(first.command, b"QUIT")
        self.assertTrue((yield self.inThread(first.closedByServer)))
        yield self.inThread(self.connect, "submissions", "127.0.0.3")

    @defer.inlineCallbacks
    def test_idleTimeout(self):
        """
        A session idle for timeout seconds gets 421 4.4.2 and is closed;
        each command restarts the timer.
        """
        c = yield self.inThread(self.connect)
        self.clock.advance(29)
        self.assertEqual((yield self.inThread(c.command, b"NOOP"))[0], 250)
        self.clock.advance(29)
        self.assertEqual((yield self.inThread(c.command, b"NOOP"))[0], 250)
        self.clock.advance(30)
        self.assertEqual(
            (yield self.inThread(c.reply)),
            (421, [b"4.4.2 mx.example.test Error: timeout exceeded"]),
        )
        self.assertTrue((yield self.inThread(c.closedByServer)))

    @defer.inlineCallbacks
    def test_dataTimeout(self):
        """
        A client that stops sending inside DATA gets 421 4.4.2 after
        data_timeout; the part it sent is not delivered.
        """

        def start():
            c = self.loggedIn()
            c.command(b"MAIL FROM:<bob@example.test>")
            c.command(b"RCPT TO:<alice.plain@example.test>")
            c.send(b"DATA\r\nSubject: never finished\r\n\r\nhalf a message\r\n")
            return c, c.reply()

        c, reply = yield self.inThread(start)
        self.assertEqual(reply[0], 354)
        self.clock.advance(60)
        self.assertEqual((yield self.inThread(c.reply))[0], 421)
        self.assertTrue((yield self.inThread(c.closedByServer)))
        self.assertEqual(self.daemon.allDelivered(), [])

    @defer.inlineCallbacks
    def test_commandLineTooLong(self):
        """
        A command line over 12288 octets gets 500 5.5.2 (an AUTH line 500
        5.5.6) and is skipped whole; the session goes on in step.
        """

        def send():
            c = self.connect()
            c.ehlo()
            return [
                c.command(b"NOOP " + b"x" * 20000),
                c.command(b"NOOP"),
                c.command(b"AUTH PLAIN " + b"A" * 20000),
                c.command(b"NOOP"),
            ]

        self.assertEqual(
            (yield self.inThread(send)),
            [
                (500, [b"5.5.2 Error: line too long"]),
                (250, [b"2.0.0 Ok"]),
                (500, [b"5.5.6 Authentication exchange line is too long"]),
                (250, [b"2.0.0 Ok"]),
            ],
        )

    @defer.inlineCallbacks
    def test_recipientsPerMessage(self):
        """Past max_recipients in one message: 452 4.5.3."""

        def send():
            c = self.loggedIn()
            c.command(b"MAIL FROM:<bob@example.test>")
            return [c.command(b"RCPT TO:<alice.plain@example.test>") for _ in range(4)]

        replies = yield self.inThread(send)
        self.assertEqual([code for code, _ in replies], [250, 250, 250, 452])
        self.assertEqual(replies[-1][1], [b"4.5.3 Error: too many recipients"])

    @defer.inlineCallbacks
    def test_sizeAtMail(self):
        """
        SIZE= over max_message_size is refused at MAIL with 552 5.3.4;
        exactly the maximum is accepted.
        """
        limit = self.daemon.config.server.max_message_size

        def send():
            c = self.loggedIn()
            return [
                c.command(b"MAIL FROM:<bob@example.test> SIZE=%d" % (limit + 1)),
                c.command(b"MAIL FROM:<bob@example.test> SIZE=%d" % limit),
            ]

        self.assertEqual(
            (yield self.inThread(send)),
            [
                (552, [b"5.3.4 Message size exceeds fixed maximum message size"]),
                (250, [b"2.1.0 Ok"]),
            ],
        )

    @defer.inlineCallbacks
    def test_sizeAtData(self):
        """
        A message larger than max_message_size (whatever SIZE= said) gets
        552 5.3.4 at the end of DATA; nothing is delivered and no temporary
        file is left behind.
        """
        limit = self.daemon.config.server.max_message_size
        line = b"x" * 998 + b"\r\n"

        def send():
            c = self.loggedIn()
            c.command(b"MAIL FROM:<bob@example.test> SIZE=1000")
            c.command(b"RCPT TO:<alice.plain@example.test>")
            c.command(b"DATA")
            c.send(line * (limit // len(line) + 1) + b".\r\nNOOP\r\n")
            return [c.reply(), c.reply()]

        self.assertEqual(
            (yield self.inThread(send)),
            [
                (552, [b"5.3.4 Message size exceeds fixed maximum message size"]),
                (250, [b"2.0.0 Ok"]),
            ],
        )
        self.assertEqual(self.daemon.allDelivered(), [])

    @defer.inlineCallbacks
    def test_tooManyErrors(self):
        """
        After max_errors error replies (unknown commands, bad syntax) the
        server answers 421 4.7.0 and closes.
        """

        def send():
            c = self.connect()
            replies = [c.command(b"XYZZY"), c.command(b"MAIL FROM:<x@example.test>")]
            c.send(b"EHLO\r\n")
            replies += [c.reply(), c.reply()]
            return replies, c.closedByServer()

        replies, closed = yield self.inThread(send)
        self.assertEqual([code for code, _ in replies], [500, 503, 501, 421])
        self.assertEqual(replies[-1][1], [b"4.7.0 Error: too many errors"])
        self.assertTrue(closed)

    @defer.inlineCallbacks
    def test_junkCommandsEndTheSession(self):
        """
        A client that only repeats NOOP is cut off: past the default
        junk_command_limit (100) each is an error, and max_errors more end
        the session with 421, as Postfix's smtpd_junk_command_limit does;
        the daemon logs the hang-up's reason.
        """

        def send():
            c = self.connect()
            codes = [c.command(b"NOOP")[0] for _ in range(100 + 3)]
            return codes, c.closedByServer()

        hangUp = self.log.waitFor(r"hang-up: .* reason=junk_commands command=NOOP")
        codes, closed = yield self.inThread(send)
        self.assertEqual(codes, [250] * 102 + [421])
        self.assertTrue(closed)
        yield hangUp


class NeverReadingClientTests(AttackMixin, unittest.TestCase):
    clocked = True
    settings = {"server": {**LimitTests.settings["server"], "junk_command_limit": "1000000"}}

    @defer.inlineCallbacks
    def test_clientThatNeverReads(self):
        """
        A client that pipelines commands and never reads the replies: the
        server stops taking commands and reading once its replies back up,
        so it holds a few socket buffers' worth, not everything sent (here
        every 8-byte EHLO costs a 120-byte reply). When the idle timeout
        then ends the session and the 421 cannot be sent either, the
        connection is cut one timeout later instead of staying forever.
        (Repeated EHLO is a junk command: junk_command_limit is raised here
        so that the flood fills the buffers before that limit ends it.)
        """

        def flood():
            c = self.connect("submission")
            c.sock.settimeout(0.5)
            chunk = b"EHLO x\r\n" * 8192
            sent = 0
            try:
                while sent < 24 * 2**20:
                    c.sock.sendall(chunk)
                    sent += len(chunk)
            except TimeoutError:
                pass
            return sent

        sent = yield self.inThread(flood)
        self.assertLess(sent, 16 * 2**20)
        self.clock.advance(30)
        self.clock.advance(30)
        yield serverConnectionsClosed()


# -- 3. open relay ------------------------------------------------------------

# Recipient tricks and the reply each gets from an unauthenticated session;
# every one is 5xx, and none of them reaches another domain.
RELAY_TRICKS = [
    (b"<bob@remote.test>", 554),
    (b"<bob%remote.test@example.test>", 550),
    (b"<remote.test!bob@example.test>", 550),
    (b"<@example.test:bob@remote.test>", 554),
    (b"<@example.test,@mx.example.test:bob@remote.test>", 554),
    (b'<"bob@remote.test"@example.test>', 550),
    (b'<"bob\\"@remote.test"@example.test>', 550),
    (b'<"bob@example.test"@remote.test>', 554),
    (b"<bob@[127.0.0.1]>", 554),
    (b"<postmaster@[127.0.0.1]>", 554),
    (b"<bob@[IPv6:::1]>", 554),
    (b"<bob@[999.0.0.1]>", 501),
    (b"<bob@remote.test.>", 554),
    (b"<bob@REMOTE.TEST>", 554),
    (b"<bob@sub.example.test>", 554),
    (b"<bob@example.test.remote.test>", 554),
    (b"<bob@example.test@remote.test>", 501),
    (b"<bob@example.test>@remote.test", 501),
    (b"<bob@ex\xc3\xa4mple.test>", 553),
    (b"<bob@ex\xc3\xa4mple.test> SMTPUTF8", 553),
    (b"<bob@xn--exmple-cua.test>", 554),
    (b"<bob@remote.test> NOTIFY=NEVER", 554),
    (b"bob@remote.test", 501),
]

# Forms of local addresses that must be treated as local, not refused.
LOCAL_FORMS = [
    b"<bob@EXAMPLE.TEST>",
    b"<BOB@Example.Test.>",
    b"<bob@example.test.>",
    b"<@remote.test:bob@example.test>",
]

MX_LISTENERS = {
    "listener:mx": {"endpoint": "tcp:0:interface=127.0.0.1", "tls": "none", "auth": "none"},
    "listener:optional": {
        "endpoint": "tcp:0:interface=127.0.0.1",
        "tls": "starttls",
        "auth": "optional",
    },
}


class OpenRelayMixin(AttackMixin):
    def battery(self, listener: str) -> list:
        """(Blocking.) Every trick in one unauthenticated session; the replies."""
        c = self.connect(listener)
        if listener == "optional":
            c.ehlo()
            c.starttls()
        c.ehlo()
        c.command(b"MAIL FROM:<someone@remote.test>")
        return [(trick, c.command(b"RCPT TO:" + trick)) for trick, _ in RELAY_TRICKS]

    @defer.inlineCallbacks
    def test_tricksRefused(self):
        """
        On auth = none and auth = optional listeners, without AUTH, none of
        the classic relay tricks (percent hack, bang paths, source routes,
        quoted local parts holding @, address literals, trailing dots, case,
        non-ASCII and punycode domains) is accepted: each gets a 5xx and
        nothing is delivered or queued.
        """
        for listener in ("mx", "optional"):
            replies = yield self.inThread(self.battery, listener)
            for (trick, (code, text)), (_, expected) in zip(replies, RELAY_TRICKS):
                self.assertEqual(code, expected, (listener, trick, text))
        self.assertEqual(self.daemon.allDelivered(), [])

    @defer.inlineCallbacks
    def test_authParameterClaimsNothing(self):
        """MAIL FROM with AUTH=<local user> does not make an unauthenticated session a sender."""

        def send():
            c = self.connect("mx")
            c.ehlo()
            c.command(b"MAIL FROM:<bob@example.test> AUTH=bob@example.test")
            return c.command(b"RCPT TO:<bob@remote.test>")

        self.assertEqual(
            (yield self.inThread(send)), (554, [b"5.7.1 <bob@remote.test>: Relay access denied"])
        )

    @defer.inlineCallbacks
    def test_localFormsDelivered(self):
        """
        Case variants, a trailing dot and a source route in front of a local
        address are the local mailbox: accepted and delivered there, and
        only there.
        """

        def send():
            c = self.connect("mx")
            c.ehlo()
            c.command(b"MAIL FROM:<someone@remote.test>")
            codes = [c.command(b"RCPT TO:" + form)[0] for form in LOCAL_FORMS]
            c.command(b"DATA")
            c.send(b"Subject: local\r\n\r\nhello\r\n.\r\n")
            codes.append(c.reply()[0])
            return codes

        self.assertEqual((yield self.inThread(send)), [250] * len(LOCAL_FORMS) + [250])
        [delivered] = self.daemon.allDelivered()
        self.assertEqual(
            os.path.dirname(delivered), os.path.join(self.daemon.maildir("bob@example.test"), "new")
        )


class OpenRelayTests(OpenRelayMixin, unittest.TestCase):
    settings = {"server": {"max_errors": "100"}, **MX_LISTENERS}


class OpenRelayWithRelayTests(OpenRelayMixin, unittest.TestCase):
    """
    The same battery with a [relay] configured, so mail for other domains
    could be queued: unauthenticated sessions still reach local mailboxes
    only. (The relay host is a closed port and the queue runs on a clock
    that never moves: nothing is sent anywhere.)
    """

    clocked = True
    settings = {
        "server": {"max_errors": "100"},
        **MX_LISTENERS,
        "relay": {"host": "127.0.0.1", "port": "1", "tls": "none"},
    }

    @defer.inlineCallbacks
    def test_authenticatedUserMayRelay(self):
        """The relay is really on: an authenticated user's remote recipient is accepted."""

        def send():
            c = self.loggedIn()
            c.command(b"MAIL FROM:<bob@example.test>")
            return c.command(b"RCPT TO:<someone@remote.test>")

        self.assertEqual((yield self.inThread(send)), (250, [b"2.1.5 Ok"]))


# -- 4. SMTP smuggling --------------------------------------------------------

# The end-of-data look-alikes of SEC Consult's smtp-smuggling-tools (the
# inbound and outbound sets, 2023) and the ones Postfix's advisory lists.
SMUGGLING_SEQUENCES = [
    b"\n.\n",
    b"\n.\r",
    b"\r.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\r\r\n",
    b"\r\r\n.\r\r\n",
    b"\r\n.\r",
    b"\r\n\x00.\r",
    b"\r\n\x00.\n",
    b"\r\n.\x00\r\n",
    b"\n\n.\r\n",
    b"\r\n.\n",
]


def smugglingMessage(sequence: bytes) -> bytes:
    """SEC Consult's probe: a message, the sequence, then a whole second transaction."""
    return (
        b"From: bob@example.test\r\nTo: alice.plain@example.test\r\n"
        b"Subject: CHECK EMAIL\r\n\r\n"
        b"TESTING a fake end-of-data sequence!\r\n" + sequence + b"\r\n"
        b"mail FROM:<smuggled@example.test>\r\nrcpt TO:<alice.plain@example.test>\r\n"
        b"data\r\nFrom: smuggled@example.test\r\nSubject: SMUGGLED EMAIL\r\n\r\n"
        b"SMUGGLING WORKS\r\n.\r\n"
    )


class SmugglingTests(AttackMixin, unittest.TestCase):
    settings = {"server": {"max_errors": "100"}}

    def smuggle(self, listener: str) -> list:
        """(Blocking.) Each sequence in its own transaction; a NOOP after each."""
        c = self.loggedIn(listener)
        out = []
        for sequence in SMUGGLING_SEQUENCES:
            c.command(b"MAIL FROM:<bob@example.test>")
            c.command(b"RCPT TO:<alice.plain@example.test>")
            c.command(b"DATA")
            c.send(smugglingMessage(sequence) + b"NOOP\r\n")
            out.append((sequence, c.reply(), c.reply()))
        return out

    @defer.inlineCallbacks
    def check(self, listener: str):
        for sequence, first, second in (yield self.inThread(self.smuggle, listener)):
            # One reply for the message, one for the NOOP: the "second
            # transaction" was body, never commands.
            self.assertEqual(first[0], 550, (sequence, first))
            self.assertEqual(second, (250, [b"2.0.0 Ok"]), sequence)
        self.assertEqual(self.daemon.allDelivered(), [])

    def test_publishedSequencesImplicitTLS(self):
        """
        Over implicit TLS, none of the published smuggling sequences ends
        the message or starts a second transaction; each message holds a
        bare CR, bare LF or NUL and is refused at its end with 550, and
        nothing is delivered.
        """
        return self.check("submissions")

    def test_publishedSequencesStartTLS(self):
        """The same after STARTTLS."""
        return self.check("submission")

    @defer.inlineCallbacks
    def test_longLineStaysData(self):
        """
        A DATA line over 16 KiB does not drop the server back to command
        mode: the commands after it are body text of the one message (D15).
        """
        body = b"x" * 17000 + b"\r\nRSET\r\nMAIL FROM:<evil@remote.test>\r\n"

        def send():
            c = self.loggedIn()
            c.command(b"MAIL FROM:<bob@example.test>")
            c.command(b"RCPT TO:<alice.plain@example.test>")
            c.command(b"DATA")
            c.send(body + b".\r\nNOOP\r\n")
            return [c.reply()[0], c.reply()[0]]

        self.assertEqual((yield self.inThread(send)), [250, 250])
        [(_, content)] = self.daemon.delivered("alice.plain@example.test")
        self.assertTrue(content.endswith(body.replace(b"\r\n", b"\n")))


# -- 5. STARTTLS injection ----------------------------------------------------


class StartTLSInjectionTests(AttackMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_pipelinedCommandsDiscarded(self):
        """
        Commands sent in the same packet as STARTTLS are discarded, not run
        inside TLS after a real handshake (D2, CVE-2011-0411): the first
        reply inside TLS answers the first command sent inside TLS, and the
        injected EHLO left no trace, so EHLO is required again.
        """

        def afterHandshake(c):
            return [c.command(b"NOOP"), c.command(b"MAIL FROM:<bob@example.test>"), c.ehlo()]

        c = yield self.inThread(
            self.startTLSByHand, b"EHLO injected\r\nMAIL FROM:<bob@example.test>\r\n"
        )
        noop, mail, ehlo = yield self.inThread(afterHandshake, c)
        self.assertEqual(noop, (250, [b"2.0.0 Ok"]))
        self.assertEqual(mail, (503, [b"5.5.1 Error: send HELO/EHLO first"]))
        self.assertIn(b"AUTH PLAIN LOGIN CRAM-MD5", ehlo[1])
        self.assertNotIn(b"STARTTLS", ehlo[1])
        self.assertTrue(self.log.matching(r"discarded 45 bytes pipelined after STARTTLS"))

    @defer.inlineCallbacks
    def test_partialLineDiscarded(self):
        """
        A partial line sent before the handshake does not prefix the first
        line sent inside TLS.
        """
        c = yield self.inThread(self.startTLSByHand, b"MAIL FROM:<x@")
        self.assertEqual((yield self.inThread(c.command, b"NOOP")), (250, [b"2.0.0 Ok"]))

    def startTLSByHand(self, injected: bytes) -> RawClient:
        """
        (Blocking.) EHLO, then STARTTLS with C{injected} in the same send(),
        then a real TLS handshake on the same socket.
        """
        c = self.connect("submission")
        c.ehlo()
        c.send(b"STARTTLS\r\n" + injected)
        code, text = c.reply()
        assert code == 220, (code, text)
        assert not c._buffer, c._buffer
        c.sock = insecureContext().wrap_socket(c.sock, server_hostname=None)
        return c

    @defer.inlineCallbacks
    def test_noStartTLSOnImplicitListener(self):
        """STARTTLS inside implicit TLS is refused (D4)."""

        def send():
            c = self.connect()
            c.ehlo()
            return c.command(b"STARTTLS")

        self.assertEqual((yield self.inThread(send)), (554, [b"5.5.1 Error: TLS already active"]))


# -- 6. sender binding --------------------------------------------------------

ALIASES = """\
sales@example.test: bob@example.test, alice.plain@example.test
bob.alias@example.test: bob@example.test
@alias.test: bob@example.test
"""

SENDER_MAP = """\
boss@example.test: bob@example.test
shared@example.test: bob@example.test, alice.plain@example.test
@granted.test: bob@example.test
"""

SENDER_SETTINGS = {
    "delivery": {
        "local_domains": "example.test alias.test",
        "aliases": "{dir}/aliases",
        "sender_map": "{dir}/sender-map",
    },
    "server": {"max_errors": "100"},
}


class SenderBindingTests(AttackMixin, unittest.TestCase):
    settings = SENDER_SETTINGS
    files = {"aliases": ALIASES, "sender-map": SENDER_MAP}

    def senders(self, login: bytes, password: bytes, senders: list) -> list:
        """(Blocking.) The MAIL reply code for each sender, for one logged-in user."""
        c = self.loggedIn(login=login, password=password)
        codes = []
        for sender in senders:
            code, text = c.command(b"MAIL FROM:" + sender)
            codes.append(code)
            c.command(b"RSET")
            if code == 553:
                assert text[0].startswith(b"5.7.1 "), text
        return codes

    @defer.inlineCallbacks
    def test_ownAliasesAndGrants(self):
        """
        With sender_login_match on, bob may send as himself (any case, a
        trailing dot, quoting that changes nothing), as an alias leading to
        him (also through a catch-all alias), as an address granted in the
        sender map (also by @domain), and with the null sender; anything
        else gets 553 5.7.1.
        """
        allowed = [
            b"<bob@example.test>",
            b"<BOB@Example.Test.>",
            b"<bob.alias@example.test>",
            b"<sales@example.test>",
            b"<anything@alias.test>",
            b"<boss@example.test>",
            b"<shared@example.test>",
            b"<anyone@granted.test>",
            b"<>",
            b"<@remote.test:bob@example.test>",
            b'<"bob"@example.test>',
            b'<"b\\ob"@example.test>',
        ]
        refused = [
            b"<alice.plain@example.test>",
            b"<someone@remote.test>",
            b'<"alice.plain"@example.test>',
            b"<bob@example.test.remote.test>",
            b"<bob%example.test@remote.test>",
            b"<bob@[127.0.0.1]>",
            b"<x@sub.granted.test>",
        ]
        codes = yield self.inThread(self.senders, BOB, BOB_PASSWORD, allowed + refused)
        self.assertEqual(codes, [250] * len(allowed) + [553] * len(refused))

    @defer.inlineCallbacks
    def test_grantsArePerLogin(self):
        """
        alice may use the alias and the grant she shares with bob, not the
        ones that are his alone, nor his address.
        """
        codes = yield self.inThread(
            self.senders,
            b"alice.plain@example.test",
            PASSWORD.encode(),
            [
                b"<sales@example.test>",
                b"<shared@example.test>",
                b"<alice.plain@example.test>",
                b"<bob.alias@example.test>",
                b"<boss@example.test>",
                b"<x@granted.test>",
                b"<bob@example.test>",
            ],
        )
        self.assertEqual(codes, [250, 250, 250, 553, 553, 553, 553])

    @defer.inlineCallbacks
    def test_aliasSenderDelivers(self):
        """A message sent as an alias goes through end to end."""

        def send():
            c = self.loggedIn()
            codes = [
                c.command(b"MAIL FROM:<sales@example.test>")[0],
                c.command(b"RCPT TO:<alice.plain@example.test>")[0],
                c.command(b"DATA")[0],
            ]
            c.send(b"From: sales@example.test\r\n\r\nhi\r\n.\r\n")
            codes.append(c.reply()[0])
            return codes

        self.assertEqual((yield self.inThread(send)), [250, 250, 354, 250])
        self.assertEqual(len(self.daemon.files("alice.plain@example.test")), 1)


class SenderLoginMatchOffTests(AttackMixin, unittest.TestCase):
    settings = {"delivery": {"sender_login_match": "no"}}

    @defer.inlineCallbacks
    def test_anySender(self):
        """With sender_login_match = no, an authenticated user may use any sender."""

        def send():
            c = self.loggedIn()
            codes = []
            for sender in (b"<alice.plain@example.test>", b"<x@remote.test>"):
                codes.append(c.command(b"MAIL FROM:" + sender)[0])
                c.command(b"RSET")
            return codes

        self.assertEqual((yield self.inThread(send)), [250, 250])


# -- 7. logging and fail2ban --------------------------------------------------

FILTER = os.path.join(ROOT, "etc", "fail2ban", "filter.d", "mailauth.conf")
JSON_FILTER = os.path.join(ROOT, "etc", "fail2ban", "filter.d", "mailauth-json.conf")
JAIL = os.path.join(ROOT, "etc", "fail2ban", "jail.d", "mailauth.conf")

SECRETS = [b"hunter2-plain-secret", b"hunter2-login-secret", b"hunter2-cram-secret", BOB_PASSWORD]
# A login crafted to make a naive filter read another client address.
HOSTILE = b"x] client=[192.0.2.66] mechanism=PLAIN login=<y"
# The same with a line break, to forge a whole log line (refused before it is logged).
FORGED = (
    b"x\n2026-11-29T15:23:31+0000 [mailauth.esmtp#info] auth failure: "
    b"client=[192.0.2.67] mechanism=PLAIN login=<y>"
)

# The clients of the failed guesses in the log, one per auth failure line.
FAILED = [
    "127.0.0.1",
    "127.0.0.2",
    "127.0.0.3",
    "127.0.0.6",
    "127.0.0.7",
    "::1",
    "127.0.0.10",
    "127.0.0.10",
]

# One run of the daemon per log format, shared by the tests of a process.
_twistdRuns: dict = {}


def twistdLog(tmp: str, logFormat: str = "text") -> dict:
    """
    Run the real daemon once per test process and log format (C{[server]
    log_format}) with C{twistd --logfile}, exactly as an operator would,
    play every kind of login against it and return its log. Later calls
    return the same run.

    @return: C{{"log": text, "path": its file, "output": twistd's output}}
    """
    run = _twistdRuns.setdefault(logFormat, {})
    if run:
        return run
    daemon = Daemon(
        tmp,
        {
            "server": {"log_format": logFormat},
            "listener:v6": {"endpoint": "tcp6:0:interface=\\:\\:1", "tls": "implicit"},
            # 127.0.0.10 is blocked at its second failure.
            "auth": {"max_failures_per_address": "2"},
        },
    )
    logPath = os.path.join(daemon.dir, "mailauth.log")
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            "--logfile",
            logPath,
            "mailauth",
            "--config",
            daemon.configPath,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        ports = _waitForPorts(logPath, process, 3)
        _playLogins(ports)
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    with open(logPath, encoding="utf-8") as f:
        run.update(log=f.read(), path=logPath, output=output)
    return run


def _waitForPorts(logPath: str, process, count: int) -> list:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"twistd exited: {process.stdout.read()!r}")
        if os.path.exists(logPath):
            with open(logPath) as f:
                # A JSON line holds its text twice (the message, log_text).
                ports = list(dict.fromkeys(re.findall(r"starting on (\d+)", f.read())))
            if len(ports) >= count:
                return [int(p) for p in ports[:count]]
        time.sleep(0.05)  # waiting for another process to start; no clock to drive
    raise AssertionError("twistd did not start listening")


def _playLogins(ports: list) -> None:
    starttls, v4, v6 = ports

    clients = []

    def session(source, host="127.0.0.1", port=v4):
        c = RawClient(port, source=source, tls=True, host=host)
        clients.append(c)
        assert c.reply()[0] == 220
        c.ehlo()
        return c

    try:
        # PLAIN failure; LOGIN failure with the password as the second
        # response; CRAM-MD5 failure; an authzid mismatch.
        c = session("127.0.0.1")
        assert c.command(plain(BOB, SECRETS[0]))[0] == 535
        c = session("127.0.0.2")
        c.command(b"AUTH LOGIN")
        c.command(b64(BOB))
        assert c.command(b64(SECRETS[1]))[0] == 535
        c = session("127.0.0.3")
        challenge = base64.b64decode(c.command(b"AUTH CRAM-MD5")[1][0])
        digest = hmac.new(SECRETS[2], challenge, "md5").hexdigest().encode()
        assert c.command(b64(BOB + b" " + digest))[0] == 535
        c = session("127.0.0.7")
        assert c.command(plain(BOB, BOB_PASSWORD, authzid=b"postmaster@example.test"))[0] == 535
        # The right password over CRAM-MD5 for a user stored as SHA512-CRYPT:
        # the client's choice of mechanism, not a guess.
        c = session("127.0.0.9")
        challenge = base64.b64decode(c.command(b"AUTH CRAM-MD5")[1][0])
        digest = hmac.new(PASSWORD.encode(), challenge, "md5").hexdigest().encode()
        assert c.command(b64(SHA512.encode() + b" " + digest))[0] == 535
        # Successes, PLAIN and LOGIN.
        c = session("127.0.0.4")
        assert c.command(plain(BOB, BOB_PASSWORD))[0] == 235
        c = session("127.0.0.5")
        c.command(b"AUTH LOGIN " + b64(BOB))
        assert c.command(b64(BOB_PASSWORD))[0] == 235
        # Hostile logins.
        c = session("127.0.0.6")
        assert c.command(plain(HOSTILE, b"wrong"))[0] == 535
        c = session("127.0.0.8")
        assert c.command(plain(FORGED, b"wrong"))[0] == 501
        c.command(b"AUTH LOGIN")
        assert c.command(b64(FORGED))[0] == 501
        # IPv6.
        c = session("::1", host="::1", port=v6)
        assert c.command(plain(BOB, b"wrong"))[0] == 535
        # The other lines of a session, none of them a failure to ban:
        # refused commands, AUTH before TLS, a TLS handshake that fails, an
        # address blocked, the hang-up and the refused connection after it.
        c = session("127.0.0.4")
        assert c.command(plain(BOB, BOB_PASSWORD))[0] == 235
        assert c.command(b"MAIL FROM:<bob@example.test>")[0] == 250
        assert c.command(b"RCPT TO:<nobody@example.test>")[0] == 550
        assert c.command(b"RCPT TO:<someone@remote.example>")[0] == 554
        c = RawClient(starttls, source="127.0.0.11")
        clients.append(c)
        assert c.reply()[0] == 220 and c.ehlo()[0] == 250
        assert c.command(plain(BOB, BOB_PASSWORD))[0] == 538
        assert c.command(b"MAIL FROM:<bob@example.test>")[0] == 530
        c = RawClient(v4, source="127.0.0.12")
        clients.append(c)
        c.send(b"EHLO client.example\r\n")
        assert c.reply() == (None, [])
        c = session("127.0.0.10")
        assert c.command(plain(BOB, b"guess1"))[0] == 535
        assert c.command(plain(BOB, b"guess2"))[0] == 421
        c = RawClient(v4, source="127.0.0.10", tls=True)
        clients.append(c)
        assert c.reply()[0] == 421
    finally:
        for c in clients:
            c.close()


def fail2banRegex(logPath: str, out: str, filterPath: str = FILTER) -> list:
    """Debian's fail2ban-regex on C{logPath} with our filter; one line per match."""
    try:
        result = subprocess.run(
            ["fail2ban-regex", "--out", out, logPath, filterPath],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except FileNotFoundError:
        raise AssertionError("fail2ban-regex is missing: apt-get install fail2ban") from None
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


class FailToBanJSONTests(unittest.TestCase):
    """
    The same daemon run with C{[server] log_format = json}; Debian's
    fail2ban-regex reads its log with the shipped JSON filter.
    """

    def setUp(self):
        self.run = twistdLog(os.path.abspath(self.mktemp()), "json")
        self.events = [json.loads(line) for line in self.run["log"].splitlines()]

    def test_filterMatchesFailuresOnly(self):
        """
        mailauth-json.conf matches every "auth failure" line of the real
        JSON log, and nothing else (no success, no other line of a session,
        whatever its fields), for IPv4 and IPv6, at the time the line has.
        """
        failures = [
            line
            for line, event in zip(self.run["log"].splitlines(), self.events)
            if event.get("log_text", "").startswith("auth failure: ")
        ]
        self.assertEqual(len(failures), len(FAILED))
        self.assertTrue(
            any(e.get("log_text", "").startswith("auth success: ") for e in self.events)
        )
        matched = fail2banRegex(self.run["path"], "msg", JSON_FILTER)
        self.assertEqual(sorted(matched), sorted(failures))
        self.assertEqual(sorted(fail2banRegex(self.run["path"], "ip", JSON_FILTER)), sorted(FAILED))
        # The time fail2ban takes is the line's own.
        rows = fail2banRegex(self.run["path"], "row", JSON_FILTER)
        self.assertEqual(
            sorted(int(float(re.match(r"\['[^']*',\s*([0-9.]+),", row).group(1))) for row in rows),
            sorted(int(json.loads(line)["log_time"]) for line in failures),
        )

    def test_escapedLoginCannotForge(self):
        """
        A login full of quotes, backslashes and a forged log_text cannot
        make a line match for another address, nor hide a failure: the
        JSON escapes inside the login are the only ones the filter accepts.
        """
        folder = os.path.abspath(self.mktemp())
        os.mkdir(folder)
        path = os.path.join(folder, "forged.log")
        forged = 'x", "log_text": "auth failure: client=[192.0.2.66] mechanism=PLAIN login=<y>'
        lines = []
        for client, login, text in [
            ("192.0.2.1", forged, "auth success"),
            ("192.0.2.2", 'a"b\\c', "auth failure"),
        ]:
            event = {
                "log_namespace": "mailauth.esmtp",
                "log_time": 1796052211.5,
                "client": client,
                "login": login,
                "log_text": f"{text}: client=[{client}] mechanism=PLAIN login=<{login}> "
                "session=5f1c0e2a9b3d",
            }
            lines.append(json.dumps(event))
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.assertEqual(fail2banRegex(path, "ip", JSON_FILTER), ["192.0.2.2"])


class FailToBanTests(unittest.TestCase):
    """
    The daemon run by twistd with a log file; PLAIN, LOGIN and CRAM-MD5
    logins that fail and succeed, from 127.0.0.x and ::1; Debian's
    fail2ban-regex reads the real log with the shipped filter.
    """

    def setUp(self):
        self.run = twistdLog(os.path.abspath(self.mktemp()))

    def authLines(self, kind: str) -> list:
        return [line for line in self.run["log"].splitlines() if f"auth {kind}:" in line]

    def test_oneFixedLinePerResult(self):
        """
        Each AUTH result is one line: C{auth failure|success: client=[IP]
        mechanism=M login=<L>}, with the mechanism that was used.
        """
        failures = self.authLines("failure")
        successes = self.authLines("success")
        pattern = (
            r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[mailauth\.esmtp#info\] "
            r"auth (failure|success): client=\[([0-9a-f.:]+)\] "
            r"mechanism=(PLAIN|LOGIN|CRAM-MD5) login=<([^<> ]*)> session=[0-9a-f]{12}$"
        )
        for line in failures + successes:
            self.assertRegex(line, pattern)
        self.assertEqual(
            sorted(re.match(pattern, line).group(2, 3) for line in failures),
            [
                ("127.0.0.1", "PLAIN"),
                ("127.0.0.10", "PLAIN"),
                ("127.0.0.10", "PLAIN"),
                ("127.0.0.2", "LOGIN"),
                ("127.0.0.3", "CRAM-MD5"),
                ("127.0.0.6", "PLAIN"),
                ("127.0.0.7", "PLAIN"),
                ("::1", "PLAIN"),
            ],
        )
        self.assertEqual(
            sorted(re.match(pattern, line).group(2, 3) for line in successes),
            [("127.0.0.4", "PLAIN"), ("127.0.0.4", "PLAIN"), ("127.0.0.5", "LOGIN")],
        )

    def test_noPasswordLogged(self):
        """
        No password, nor any AUTH payload holding one, reaches the log: not
        for a failed PLAIN, not for LOGIN's second response, not for a
        success.
        """
        log = self.run["log"].encode()
        for secret in SECRETS:
            for form in (secret, b64(secret), b64(b"\0" + BOB + b"\0" + secret)):
                self.assertNotIn(form, log)
        self.assertNotIn(b64(BOB + b" "), log)

    def test_filterMatchesFailuresOnly(self):
        """
        fail2ban-regex with etc/fail2ban/filter.d/mailauth.conf matches every
        failure line of the real log and no success line, for IPv4 and IPv6.
        """
        matched = fail2banRegex(self.run["path"], "msg")
        self.assertEqual(sorted(matched), sorted(self.authLines("failure")))
        self.assertEqual(sorted(fail2banRegex(self.run["path"], "ip")), sorted(FAILED))

    def test_otherSessionLinesNotMatched(self):
        """
        The other lines of a session (connect and disconnect, refused
        commands, AUTH before TLS, a failed TLS handshake, the address
        blocked, the hang-up and the refused connection) are in the log,
        with the client and the session, and the filter matches none.
        """
        log = self.run["log"]
        for pattern in [
            r"connect: client=\[127\.0\.0\.12\] listener=submissions",
            r'TLS handshake failed: client=\[127\.0\.0\.12\] listener=submissions why="[^"]+"',
            r"refused RCPT: client=\[127\.0\.0\.4\] login=<bob@example\.test> "
            r"reason=unknown_user",
            r"refused RCPT: client=\[127\.0\.0\.4\] .* reason=relay_denied",
            r"refused AUTH: client=\[127\.0\.0\.11\] login=<> reason=encryption_required",
            r"refused MAIL: client=\[127\.0\.0\.11\] login=<> reason=auth_required",
            r"address blocked: client=\[127\.0\.0\.10\] key=127\.0\.0\.10 failures=2",
            r"hang-up: client=\[127\.0\.0\.10\] login=<> reason=blocked command=AUTH",
            r"refused connection: client=\[127\.0\.0\.10\] listener=submissions reason=blocked",
            r"disconnect: client=\[127\.0\.0\.4\] login=<bob@example\.test> messages=0",
        ]:
            self.assertRegex(log, rf"\[mailauth\.esmtp#info\] {pattern}.* session=[0-9a-f]{{12}}\n")
        matched = set(fail2banRegex(self.run["path"], "ip"))
        for client in ("127.0.0.4", "127.0.0.11", "127.0.0.12"):
            self.assertNotIn(client, matched)
        self.assertEqual(fail2banRegex(self.run["path"], "ip").count("127.0.0.10"), 2)

    def test_sessionTiesItsLines(self):
        """
        Every line of a session ends with the same session ID, from its
        connect to its disconnect; another session has another.
        """
        sessions: dict = {}
        for line in self.run["log"].splitlines():
            if "client=[127.0.0.10]" in line:
                session = re.search(r" session=([0-9a-f]{12})$", line).group(1)
                sessions.setdefault(session, []).append(line.split("] ", 1)[1].split(":")[0])
        # The refused connection after the block is a session of its own.
        self.assertEqual(
            sorted(sessions.values()),
            [
                [
                    "connect",
                    "auth failure",
                    "auth failure",
                    "address blocked",
                    "hang-up",
                    "disconnect",
                ],
                ["refused connection"],
            ],
        )

    def test_mechanismChoiceNotMatched(self):
        """
        A login refused only because its stored scheme cannot do the
        mechanism the client picked is logged on its own line, which the
        filter does not match: fail2ban never bans a user for their
        client's choice. The same holds for a suspended login's line.
        """
        [line] = [
            line for line in self.run["log"].splitlines() if "127.0.0.9" in line and "auth " in line
        ]
        self.assertRegex(
            line,
            r"\] auth mechanism unusable: client=\[127\.0\.0\.9\] "
            rf"mechanism=CRAM-MD5 login=<{re.escape(SHA512)}> session=[0-9a-f]{{12}}$",
        )
        self.assertNotIn("127.0.0.9", fail2banRegex(self.run["path"], "ip"))
        path = self.run["path"] + ".suspended"
        with open(path, "w") as f:
            f.write(
                line[:24] + " [mailauth.esmtp#info] auth suspended: client=[192.0.2.9] "
                "mechanism=PLAIN login=<bob@example.test>\n"
            )
        self.assertEqual(fail2banRegex(path, "ip"), [])

    def test_hostileLoginBansOnlyTheSender(self):
        """
        A login crafted to look like another client address, or to forge a
        whole line with a line break, cannot make fail2ban ban anyone but
        the client that sent it.
        """
        self.assertNotIn("192.0.2.66", fail2banRegex(self.run["path"], "ip"))
        self.assertNotIn("192.0.2.67", self.run["log"])
        [line] = [line for line in self.authLines("failure") if "127.0.0.6" in line]
        self.assertIn(r"login=<x]\x20client=[192.0.2.66]\x20mechanism=PLAIN\x20login=\x3cy>", line)

    def test_journalLinesMatch(self):
        """
        Under systemd (twistd --logfile=-) fail2ban reads the journal, whose
        lines carry the host and C{twistd3[pid]:} before twistd's own line;
        the filter matches those too, and still only failures.
        """
        path = self.run["path"] + ".journal"
        with open(path, "w") as f:
            for line in self.run["log"].splitlines():
                f.write(f"{line[:24]} mail.example.org twistd3[4242]: {line}\n")
        self.assertEqual(sorted(fail2banRegex(path, "ip")), sorted(FAILED))

    def test_jailExampleLoads(self):
        """
        fail2ban's own configuration reader, given Debian's configuration
        with our filter and example jail added, builds a jail that watches
        the journal of mailauth.service with our expression and bans on the
        submission ports.
        """
        confdir = os.path.abspath(self.mktemp())
        shutil.copytree("/etc/fail2ban", confdir)
        shutil.copy(FILTER, os.path.join(confdir, "filter.d"))
        shutil.copy(JAIL, os.path.join(confdir, "jail.d"))
        result = subprocess.run(
            ["fail2ban-client", "-c", confdir, "-d"], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        dump = result.stdout
        self.assertIn("['add', 'mailauth', 'systemd']", dump)
        self.assertIn(
            "['set', 'mailauth', 'addjournalmatch', '_SYSTEMD_UNIT=mailauth.service']", dump
        )
        self.assertIn("auth failure: client=\\\\[<ADDR>\\\\]", dump)
        self.assertIn("--dports submission,submissions ", dump)
        self.assertIn("['start', 'mailauth']", dump)
