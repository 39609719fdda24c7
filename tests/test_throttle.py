"""The brute-force throttle, on a Clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from mailauth.throttle import MAX_DELAY, addressKey
from tests.support import makeThrottle


class ThrottleTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = makeThrottle(self.clock)

    def test_firstFailuresNotDelayed(self) -> None:
        """The first few failures of an address are answered at once."""
        for _ in range(4):
            self.assertEqual(self.throttle.failure("192.0.2.1", "a@x.test"), 0)

    def test_tarpitGrows(self) -> None:
        """Past half the address limit each failure waits tarpit_delay longer."""
        delays = [self.throttle.failure("192.0.2.1", f"u{i}@x.test") for i in range(9)]
        self.assertEqual(delays, [0, 0, 0, 0, 0, 2.0, 4.0, 6.0, 8.0])

    def test_blockAtLimit(self) -> None:
        """At the limit the address is blocked for block_time, then free again."""
        for i in range(9):
            self.throttle.failure("192.0.2.1", f"u{i}@x.test")
        self.assertFalse(self.throttle.isBlocked("192.0.2.1"))
        self.throttle.failure("192.0.2.1", "u@x.test")
        self.assertTrue(self.throttle.isBlocked("192.0.2.1"))
        self.assertFalse(self.throttle.isBlocked("192.0.2.2"))
        self.clock.advance(899)
        self.assertTrue(self.throttle.isBlocked("192.0.2.1"))
        self.clock.advance(2)
        self.assertFalse(self.throttle.isBlocked("192.0.2.1"))

    def test_windowSlides(self) -> None:
        """Failures older than the window no longer count."""
        for _ in range(9):
            self.throttle.failure("192.0.2.1", "a@x.test")
        self.clock.advance(901)
        self.assertEqual(self.throttle.failure("192.0.2.1", "b@x.test"), 0)
        self.assertFalse(self.throttle.isBlocked("192.0.2.1"))

    def test_loginSlowedNotBlocked(self) -> None:
        """
        Failures for one login from many addresses slow that login's failures
        down but block no address, so the owner's own address stays usable.
        """
        delays = [self.throttle.failure(f"198.51.100.{i}", "alice@x.test") for i in range(20)]
        self.assertEqual(delays[:4], [0, 0, 0, 0])
        self.assertEqual(delays[4], 2.0)
        self.assertEqual(delays[-1], MAX_DELAY)
        self.assertFalse(any(self.throttle.isBlocked(f"198.51.100.{i}") for i in range(20)))
        self.assertFalse(self.throttle.isBlocked("192.0.2.1"))

    def test_ipv6Slash64(self) -> None:
        """IPv6 addresses count per /64: rotating addresses in one /64 does not help."""
        for i in range(10):
            self.throttle.failure(f"2001:db8:1:2::{i + 1:x}", "a@x.test")
        self.assertTrue(self.throttle.isBlocked("2001:db8:1:2::ffff"))
        self.assertFalse(self.throttle.isBlocked("2001:db8:1:3::1"))

    def test_addressKeys(self) -> None:
        """IPv4-mapped IPv6 counts as IPv4; other text is its own key."""
        self.assertEqual(addressKey("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(addressKey("2001:db8::1"), "2001:db8::/64")
        self.assertEqual(addressKey("local"), "local")

    def test_memoryBounded(self) -> None:
        """An attacker with many addresses and logins cannot grow the state past max_tracked."""
        for i in range(5000):
            self.throttle.failure(f"10.{i // 256 % 256}.{i % 256}.1", f"user{i}@x.test")
        self.assertLessEqual(self.throttle.trackedKeys(), 3 * 100)
