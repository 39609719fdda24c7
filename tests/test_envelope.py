"""Tests for L{mailauth.envelope}: per-recipient state, retries, expiry, JSON."""

from __future__ import annotations

import json

import attrs
from twisted.trial import unittest

from mailauth.envelope import (
    ACTION_DELAYED,
    ACTION_FAILED,
    ACTION_RELAYED,
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

    def test_expireZeroTriesOnce(self):
        """
        expire = 0 tries a message once: the first temporary failure fails
        the recipients still pending, as expired (Postfix's
        maximal_queue_lifetime = 0); what the attempt settled stays.
        """
        once = attrs.evolve(self.policy, expire=0)
        e = self.envelope()
        self.assertEqual(e.pending(), ["a@x.test", "b@x.test"])
        e = e.afterAttempt(
            {
                "a@x.test": Outcome(DELIVERED, reply="250 ok"),
                "b@x.test": Outcome(PENDING, reply="451 4.3.0 later"),
            },
            None,
            1000.0,
            once,
        )
        self.assertEqual(
            [(r.state, r.expired) for r in e.recipients], [(DELIVERED, False), (FAILED, True)]
        )
        self.assertEqual(e.attempts, 1)

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
        for prefix in (
            b"",
            b"DKIM-Signature: v=1;\r\n\tb=x\r\n",
            "X: Jörg\r\n".encode(),
            b"X: \xff\xfe\r\n",
        ):
            e = Envelope(
                id="m1",
                sender="",
                recipients=(RecipientStatus("a@x.test"),),
                arrival=1.0,
                nextAttempt=1.0,
                prefix=prefix,
            )
            self.assertEqual(Envelope.fromJSON(e.toJSON()).prefix, prefix)
        self.assertIn(
            b'"prefix": "DKIM-Signature: v=1;\\r\\n\\tb=x\\r\\n"',
            Envelope(
                id="m1",
                sender="",
                recipients=(),
                arrival=1.0,
                nextAttempt=1.0,
                prefix=b"DKIM-Signature: v=1;\r\n\tb=x\r\n",
            ).toJSON(),
        )

    def test_malformed(self):
        """A prefix that is not text is a malformed envelope."""
        e = json.loads(
            Envelope(id="m1", sender="", recipients=(), arrival=1.0, nextAttempt=1.0).toJSON()
        )
        e["prefix"] = 5
        self.assertRaises(ValueError, Envelope.fromJSON, json.dumps(e).encode())
        # An envelope written before prefixes existed has none.
        del e["prefix"]
        self.assertEqual(Envelope.fromJSON(json.dumps(e).encode()).prefix, b"")


V1 = b"""{"version": 1, "id": "m1", "sender": "a@x.test", "arrival": 1000.0,
 "next_attempt": 1060.0, "attempts": 1, "last_error": null, "size": 10, "body_8bit": false,
 "recipients": [
  {"address": "b@y.test", "state": "delivered", "reply": "250 ok", "error": null,
   "notified": false, "expired": false},
  {"address": "c@y.test", "state": "failed", "reply": "550 no", "error": null,
   "notified": false, "expired": false},
  {"address": "d@y.test", "state": "pending", "reply": null, "error": null,
   "notified": false, "expired": false}]}"""


class VersionTests(unittest.TestCase):
    """Envelope version 2 (SMTPUTF8 and DSN) and the version 1 envelopes still queued."""

    policy = RetryPolicy(initial=60, maximum=3600, expire=86400, delayWarning=600)

    def test_readVersion1(self):
        """
        A version 1 envelope is read: a delivered recipient needs nothing
        more, a failed one still gets its bounce, as before.
        """
        e = Envelope.fromJSON(V1)
        self.assertEqual(
            [(r.state, r.action, r.notified) for r in e.recipients],
            [
                (DELIVERED, ACTION_RELAYED, True),
                (FAILED, ACTION_FAILED, False),
                (PENDING, None, False),
            ],
        )
        due = e.reportsDue(1000.0, self.policy)
        self.assertEqual(
            [(a, [r.address for r in rs]) for a, rs in due], [(ACTION_FAILED, ["c@y.test"])]
        )
        self.assertFalse(e.smtputf8)
        again = Envelope.fromJSON(e.toJSON())
        self.assertEqual(again, e)
        self.assertIn(b'"version": 2', e.toJSON())

    def test_version2Fields(self):
        """SMTPUTF8, RET, ENVID, NOTIFY, ORCPT and the notification state survive JSON."""
        e = Envelope(
            id="m2",
            sender="jörg@bücher.example",
            recipients=(
                RecipientStatus(
                    "b@y.test",
                    notify=("SUCCESS", "DELAY"),
                    orcpt="rfc822;B@y.test",
                    status="5.6.7",
                    action=ACTION_FAILED,
                    delayNotified=True,
                ),
            ),
            arrival=1.0,
            nextAttempt=2.0,
            smtputf8=True,
            headers8bit=True,
            ret="HDRS",
            envid="E+2B",
        )
        self.assertEqual(Envelope.fromJSON(e.toJSON()), e)
        for bad in (
            b'{"version": 2, "id": "x", "sender": "", "arrival": 0, "next_attempt": 0,'
            b' "attempts": 0, "recipients": [], "ret": 5}',
            b'{"version": 3, "id": "x"}',
        ):
            self.assertRaises(ValueError, Envelope.fromJSON, bad)

    def test_delayDue(self):
        """A delay report is due past delayWarning, only for NOTIFY=DELAY, and only once."""
        e = _delayAsked()
        self.assertEqual(e.reportsDue(1500.0, self.policy), [])
        [(action, [r])] = e.reportsDue(1600.0, self.policy)
        self.assertEqual((action, r.address), (ACTION_DELAYED, "b@y.test"))
        e = e.markNotified(["b@y.test"], ACTION_DELAYED)
        self.assertEqual(e.reportsDue(5000.0, self.policy), [])
        self.assertFalse(e.finished())

    def test_delayNoticeDue(self):
        """
        delayNoticeDue says when the delay report falls due, for the
        scheduler to queue it without an attempt: delayWarning after
        arrival while a recipient that asked for it waits untold; never for
        the null sender, once told, or when the message expires first.
        """
        e = _delayAsked()
        self.assertEqual(e.delayNoticeDue(self.policy), 1600.0)
        self.assertIsNone(e.markNotified(["b@y.test"], ACTION_DELAYED).delayNoticeDue(self.policy))
        self.assertIsNone(attrs.evolve(e, sender="").delayNoticeDue(self.policy))
        quick = attrs.evolve(self.policy, expire=600)
        self.assertIsNone(e.delayNoticeDue(quick))
        self.assertIsNone(attrs.evolve(e, recipients=e.recipients[1:]).delayNoticeDue(self.policy))

    def test_noDelayReportsAtZero(self):
        """delay_warning = 0 sends no delay reports (Postfix's delay_warning_time = 0)."""
        never = attrs.evolve(self.policy, delayWarning=0)
        e = _delayAsked()
        self.assertIsNone(e.delayNoticeDue(never))
        self.assertEqual(e.reportsDue(1000.0, never), [])
        self.assertEqual(e.reportsDue(10**6, never), [])

    def test_upstreamDSNEndsReporting(self):
        """A recipient handed to a relay that takes DSN needs no report from here."""
        e = Envelope(
            id="m",
            sender="a@x.test",
            arrival=0.0,
            nextAttempt=0.0,
            recipients=(RecipientStatus("b@y.test", notify=("SUCCESS",)),),
        )
        done = e.afterAttempt(
            {"b@y.test": Outcome(DELIVERED, reply="250 ok", upstreamDSN=True)},
            None,
            0.0,
            self.policy,
        )
        self.assertEqual(done.reportsDue(0.0, self.policy), [])
        self.assertTrue(done.finished())
        relayed = e.afterAttempt(
            {"b@y.test": Outcome(DELIVERED, reply="250 ok")}, None, 0.0, self.policy
        )
        self.assertEqual([a for a, _ in relayed.reportsDue(0.0, self.policy)], [ACTION_RELAYED])
        self.assertFalse(relayed.finished())

    def test_localRefusal(self):
        """A reply the relay client made itself becomes a failure with its status, no reply."""

        class Reply:
            code, text, local = 553, "5.6.7 not ASCII", True

        outcome = Outcome.fromReply(Reply())
        self.assertEqual(
            (outcome.state, outcome.status, outcome.error, outcome.reply),
            (FAILED, "5.6.7", "not ASCII", None),
        )


def _delayAsked() -> Envelope:
    """A message that arrived at 1000, one recipient of two asking for delay reports."""
    return Envelope(
        id="m",
        sender="a@x.test",
        arrival=1000.0,
        nextAttempt=1000.0,
        recipients=(
            RecipientStatus("b@y.test", notify=("DELAY",)),
            RecipientStatus("c@y.test"),
        ),
    )
