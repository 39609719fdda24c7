"""Tests for L{mailauth.envelope}: per-recipient state, retries, expiry, JSON."""

from __future__ import annotations

import json

import attrs
from twisted.trial import unittest

from mailauth.envelope import (
    DELIVERED,
    FAILED,
    PENDING,
    Envelope,
    Outcome,
    RecipientStatus,
    RetryPolicy,
)


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


class PrefixTests(unittest.TestCase):
    """The header kept on top of a queued message survives JSON, whatever its bytes."""

    def test_roundTrip(self):
        """ASCII stays readable in the file; any other byte comes back as it was."""
        for prefix in (b"", b"DKIM-Signature: v=1;\r\n\tb=x\r\n", "X: Jörg\r\n".encode(),
                       b"X: \xff\xfe\r\n"):
            e = Envelope(id="m1", sender="", recipients=(RecipientStatus("a@x.test"),),
                         arrival=1.0, nextAttempt=1.0, prefix=prefix)
            self.assertEqual(Envelope.fromJSON(e.toJSON()).prefix, prefix)
        self.assertIn(b'"prefix": "DKIM-Signature: v=1;\\r\\n\\tb=x\\r\\n"',
                      Envelope(id="m1", sender="", recipients=(), arrival=1.0, nextAttempt=1.0,
                               prefix=b"DKIM-Signature: v=1;\r\n\tb=x\r\n").toJSON())

    def test_malformed(self):
        """A prefix that is not text is a malformed envelope."""
        e = json.loads(Envelope(id="m1", sender="", recipients=(), arrival=1.0,
                                nextAttempt=1.0).toJSON())
        e["prefix"] = 5
        self.assertRaises(ValueError, Envelope.fromJSON, json.dumps(e).encode())
        # An envelope written before prefixes existed has none.
        del e["prefix"]
        self.assertEqual(Envelope.fromJSON(json.dumps(e).encode()).prefix, b"")
