"""
Sending limits and suspension: on a Clock against the memory and the Redis
counter stores, through the realm, and a stolen password on the running
daemon.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import attrs
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDeliveryFactory
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailauth import checks, config
from mailauth.addressmap import AddressMap
from mailauth.config import ConfigError
from mailauth.counters import MemoryCounterStore
from mailauth.interfaces import IReloadable
from mailauth.limits import (
    SETTLE,
    LimitOverrides,
    Limits,
    SendingLimits,
    counterKey,
    hitsKey,
    parseOverrides,
)
from mailauth.metrics import Metrics
from mailauth.passwords import makeHash
from mailauth.pgusers import PostgreSQLUserStore, initSchema
from mailauth.realm import Realm
from mailauth.redisstore import RedisCounterStore
from mailauth.replies import SMTPReply
from mailauth.routing import Router
from mailauth.threads import ThreadPoolService
from mailauth.userdb import UserDatabase, UserDatabaseError
from mailauth.userstore import UsersFileStore
from tests import pgharness
from tests.fakes import MemoryQueue, MemoryUserStore, runInline
from tests.harness import ROOT, AttackMixin, Daemon, LogWatcher, RawClient, plain
from tests.redisharness import startRedis
from tests.support import MINIMAL_CONFIG, makeConfig, withoutSession

# A realistic time, on a slot boundary of an hour and of a day.
START = 1_700_006_400.0
HOUR = 3600.0
DAY = 86400.0

ALICE = "alice@example.test"
BOB = "bob@example.test"


def metric(metrics: Metrics, limit: str) -> float:
    return metrics.registry.get_sample_value("mailauth_limit_hits_total", {"limit": limit}) or 0


class Notices:
    """Records the notices sent to the postmaster (or fails, when C{error} is set)."""

    def __init__(self) -> None:
        self.sent: list = []
        self.error = None

    def __call__(self, recipient: str, message: bytes) -> defer.Deferred:
        if self.error is not None:
            return defer.fail(self.error)
        assert recipient == "postmaster@example.test", recipient
        self.sent.append(message)
        return defer.succeed(None)


class ParseOverridesTests(unittest.TestCase):
    def test_lines(self) -> None:
        """C{login: key=value ...} lines; logins lower-cased; comments and blank lines skipped."""
        found, problems = parseOverrides(
            "# bulk senders\n\n"
            "News@Example.test: messages_per_hour=1000 recipients_per_day=50000  # list\n"
            "cron@example.test: messages_per_day=0, suspend_after=0\n"
            "dev#ops@example.test: messages_per_day=7\t# a # in a local part is the login's\n",
            "limits",
        )
        self.assertEqual(problems, [])
        self.assertEqual(
            found,
            {
                "news@example.test": {"messages_per_hour": 1000, "recipients_per_day": 50000},
                "cron@example.test": {"messages_per_day": 0, "suspend_after": 0},
                "dev#ops@example.test": {"messages_per_day": 7},
            },
        )

    def test_hashInDomain(self) -> None:
        """A '#' where no domain can hold one is a comment without its space: reported."""
        found, problems = parseOverrides("a@example.test#x: messages_per_day=1\n", "limits")
        self.assertEqual(found, {})
        self.assertEqual(
            problems,
            [
                "limits:1: 'a@example.test#x': a '#' in a domain; "
                "a comment needs white space before its '#'"
            ],
        )

    def test_linesAsTheEditorNumbersThem(self) -> None:
        """
        Lines are split at LF only (CRLF too): a form feed (an Emacs page
        break) or U+2028 in a comment neither splits a line nor shifts the
        line numbers problems are reported with.
        """
        found, problems = parseOverrides(
            "# page one\x0c page two\u2028still the comment\r\n"
            "a@example.test: messages_per_day=3\r\n"
            "b@example.test: nonsense=1\n",
            "limits",
        )
        self.assertEqual(found, {"a@example.test": {"messages_per_day": 3}})
        self.assertEqual([p.split(": ")[0] for p in problems], ["limits:3"])

    def test_anySpellingOfTheLogin(self) -> None:
        """
        A line applies to its login however either side spells it (a U- or
        A-label domain, quotes, case), as the user database finds the user:
        a stricter limit for a login is never silently left out.
        """
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write('"Risky"@bücher.example: messages_per_hour=5\n')
        overrides = LimitOverrides(path)
        self.assertEqual(overrides.problems, [])
        for spelling in (
            "risky@xn--bcher-kva.example",
            "risky@bücher.example",
            "RISKY@Bücher.example",
        ):
            self.assertEqual(overrides.get(spelling), {"messages_per_hour": 5}, spelling)

    def test_badLines(self) -> None:
        """Each bad line is named with its number and why, and skipped; good lines still count."""
        found, problems = parseOverrides(
            "no colon here\n"
            "nobody: messages_per_hour=1\n"
            "a@x.test: messages_per_week=1\n"
            "b@x.test: messages_per_hour=many\n"
            "c@x.test: messages_per_hour\n"
            "d@x.test: messages_per_hour=-1\n"
            "e@x.test:\n"
            "f@x.test: recipients_per_hour=5\n"
            "F@x.test: recipients_per_hour=6\n",
            "limits",
        )
        self.assertEqual(found, {"f@x.test": {"recipients_per_hour": 5}})
        self.assertEqual(
            problems,
            [
                "limits:1: expected 'login@domain: key=value [key=value...]'",
                "limits:2: expected 'login@domain: key=value [key=value...]'",
                "limits:3: unknown limit 'messages_per_week' (known: messages_per_hour, "
                "recipients_per_hour, messages_per_day, recipients_per_day, suspend_after)",
                "limits:4: messages_per_hour needs a whole number, as in messages_per_hour=100",
                "limits:5: messages_per_hour needs a whole number, as in messages_per_hour=100",
                "limits:6: messages_per_hour needs a whole number, as in messages_per_hour=100",
                "limits:7: no key=value after the login",
                "limits:9: f@x.test given again; the first line counts",
            ],
        )


class LimitOverridesTests(unittest.TestCase):
    def write(self, text: str) -> None:
        with open(self.path + ".new", "w") as f:
            f.write(text)
        os.replace(self.path + ".new", self.path)

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.write("bulk@example.test: messages_per_hour=100\n")
        self.overrides = LimitOverrides(self.path)

    def test_interface(self) -> None:
        """It is an IReloadable, as the aliases are."""
        self.assertTrue(verifyObject(IReloadable, self.overrides))

    def test_reloadWhenChanged(self) -> None:
        """maybeReload reads the file again only when it changed."""
        self.assertFalse(self.overrides.maybeReload())
        self.write("bulk@example.test: messages_per_hour=200\nbroken\n")
        self.assertTrue(self.overrides.maybeReload())
        self.assertEqual(self.overrides.get("BULK@example.test"), {"messages_per_hour": 200})
        self.assertEqual(len(self.overrides.problems), 1)

    def test_unreadableKeepsWhatWasRead(self) -> None:
        """A file that cannot be read any more keeps the overrides read before, logged."""
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        os.unlink(self.path)
        self.overrides.load()
        self.assertEqual(self.overrides.get("bulk@example.test"), {"messages_per_hour": 100})
        self.assertTrue(watcher.matching("cannot read sending limit overrides"))

    def test_none(self) -> None:
        """Without a file there are no overrides."""
        overrides = LimitOverrides(None)
        self.assertEqual((overrides.get("a@b.test"), overrides.maybeReload()), ({}, False))


class ConfigTests(unittest.TestCase):
    def test_defaults(self) -> None:
        """Without [limits] nothing is limited and nobody is suspended."""
        cfg = makeConfig()
        self.assertEqual(
            (
                cfg.limits.messages_per_hour,
                cfg.limits.suspend_after,
                cfg.limits.overrides,
                cfg.delivery.postmaster,
            ),
            (0, 0, None, None),
        )

    def test_section(self) -> None:
        """[limits] and [delivery] postmaster are read."""
        cfg = makeConfig(
            "[limits]\nmessages_per_hour = 50\nrecipients_per_day = 1000\n"
            "suspend_after = 3\noverrides = /etc/mailauth/limits\n"
        )
        self.assertEqual(
            (
                cfg.limits.messages_per_hour,
                cfg.limits.recipients_per_day,
                cfg.limits.suspend_after,
                cfg.limits.overrides,
            ),
            (50, 1000, 3, "/etc/mailauth/limits"),
        )

    def test_badValues(self) -> None:
        """A bad limit or postmaster is one line naming the section and key."""
        text = "[limits]\nmessages_per_hour = lots\nsuspend_after = -1\nper_week = 3\n"
        e = self.assertRaises(ConfigError, makeConfig, text)
        self.assertEqual(len(e.problems), 3, e.problems)
        self.assertIn("test.conf: [limits] per_week: unknown key", e.problems[0])
        self.assertIn("[limits] messages_per_hour: 'lots' is not a whole number", e.problems[1])
        self.assertIn("[limits] suspend_after: '-1' must not be negative", e.problems[2])
        e = self.assertRaises(ConfigError, configWithDelivery, "postmaster = not an address")
        self.assertEqual(
            e.problems,
            (
                "test.conf: [delivery] postmaster: 'not an address' is "
                "not an address (local@domain)",
            ),
        )


class CheckConfigTests(unittest.TestCase):
    """What check-config says of [limits] overrides."""

    def config(self, overrides: str):
        return makeConfig(f"[limits]\noverrides = {overrides}\n")

    def test_unreadable(self) -> None:
        """An overrides file that cannot be read is an error naming the key."""
        path = os.path.abspath(self.mktemp())
        self.assertIn(
            f"test.conf: [limits] overrides: {path}: cannot be read",
            checks.checkFiles(self.config(path)),
        )

    def test_malformedLines(self) -> None:
        """Its malformed lines are warnings, as the daemon logs them when it skips them."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("a@x.test: messages_per_hour=10\nb@x.test: per_year=1\n")
        [warning] = checks.checkLines(self.config(path)).warnings
        self.assertTrue(warning.startswith(f"{path}:2: warning: unknown limit 'per_year'"), warning)
        self.assertTrue(warning.endswith("; the daemon skips this line"), warning)


def configWithDelivery(line: str):
    """A minimal configuration with C{line} added to its [delivery] section."""
    return config.loadText(MINIMAL_CONFIG.replace("maildir = ", line + "\nmaildir = "), "test.conf")


class LimitsTestsMixin:
    """
    L{SendingLimits} on C{self.clock} (at L{START}), counting in
    C{self.store}, made by L{makeStore}.
    """

    def makeStore(self):
        raise NotImplementedError()

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.store = self.makeStore()
        self.users = MemoryUserStore({ALICE: "{PLAIN}a", BOB: "{PLAIN}b"})
        self.metrics = Metrics.prometheus(process=False)
        self.notices = Notices()
        self.suspended: list = []
        self.storeError = None
        self.log = LogWatcher()
        self.addCleanup(self.log.stop)
        self.limits = self.makeLimits(
            Limits(
                messages_per_hour=3,
                recipients_per_hour=10,
                messages_per_day=5,
                recipients_per_day=20,
            )
        )

    def makeLimits(self, defaults: Limits, overrides=None) -> SendingLimits:
        def suspend(login: str) -> defer.Deferred:
            self.suspended.append(login)
            if self.storeError is not None:
                return defer.fail(self.storeError)
            return defer.maybeDeferred(self.users.setSuspended, login, True)

        return SendingLimits(
            store=self.store,
            defaults=defaults,
            overrides=overrides or LimitOverrides(None),
            users=self.users,
            suspend=suspend,
            postmaster="postmaster@example.test",
            deliver=self.notices,
            hostname="mx.example.test",
            clock=self.clock,
            metrics=self.metrics,
        )

    @defer.inlineCallbacks
    def send(self, login: str = ALICE, recipients: int = 1, limits=None):
        """One whole transaction: MAIL, each RCPT, and the count after acceptance."""
        transaction = (limits or self.limits).transaction(login)
        yield transaction.checkSender()
        for n in range(recipients):
            yield transaction.checkRecipient(n)
        yield transaction.record(recipients)

    @defer.inlineCallbacks
    def refused(self, d) -> defer.Deferred:
        try:
            yield d
        except SMTPReply as e:
            return (e.code, e.text)
        self.fail("not refused")

    @defer.inlineCallbacks
    def test_messagesPerHour(self):
        """
        Past messages_per_hour, MAIL gets 451 4.7.1 naming the limit; an hour
        (and at most one slot) later the window has slid and MAIL is taken.
        """
        for _ in range(3):
            yield self.send()
        self.assertEqual(
            (yield self.refused(self.limits.transaction(ALICE).checkSender())),
            (451, f"4.7.1 Error: {ALICE} reached its limit of 3 messages per hour"),
        )
        self.clock.advance(HOUR - 1)
        yield self.refused(self.limits.transaction(ALICE).checkSender())
        self.clock.advance(61)
        yield self.limits.transaction(ALICE).checkSender()

    @defer.inlineCallbacks
    def test_windowSlides(self):
        """
        The hour slides: messages sent at 0 and 30 minutes leave it one at a
        time, each an hour after it was sent.
        """
        yield self.send()
        self.clock.advance(1800)
        yield self.send()
        yield self.send()
        yield self.refused(self.limits.transaction(ALICE).checkSender())
        self.clock.advance(1800 + 60)
        yield self.limits.transaction(ALICE).checkSender()
        yield self.send()
        yield self.refused(self.limits.transaction(ALICE).checkSender())

    @defer.inlineCallbacks
    def test_messagesPerDay(self):
        """messages_per_day holds over the day once the hourly limit has slid away."""
        for _ in range(3):
            yield self.send()
        self.clock.advance(HOUR + 60)
        for _ in range(2):
            yield self.send()
        self.assertEqual(
            (yield self.refused(self.limits.transaction(ALICE).checkSender())),
            (451, f"4.7.1 Error: {ALICE} reached its limit of 5 messages per day"),
        )
        self.clock.advance(DAY - HOUR)
        yield self.limits.transaction(ALICE).checkSender()

    @defer.inlineCallbacks
    def test_recipientsIncludeThisTransaction(self):
        """
        RCPT counts the recipients already accepted in the transaction: with
        8 of 10 per hour sent, a message gets two recipients and its third
        gets 451 4.7.1; nothing is counted until a message is accepted.
        """
        yield self.send(recipients=8)
        transaction = self.limits.transaction(ALICE)
        yield transaction.checkSender()
        yield transaction.checkRecipient(0)
        yield transaction.checkRecipient(1)
        self.assertEqual(
            (yield self.refused(transaction.checkRecipient(2))),
            (451, f"4.7.1 Error: {ALICE} reached its limit of 10 recipients per hour"),
        )
        self.assertEqual(
            (yield self.store.total(counterKey("recipients_per_hour", ALICE), HOUR)), 8
        )
        yield transaction.record(2)
        self.assertEqual(
            (yield self.store.total(counterKey("recipients_per_hour", ALICE), HOUR)), 10
        )

    @defer.inlineCallbacks
    def test_perLogin(self):
        """One login at its limit does not hold back another."""
        for _ in range(3):
            yield self.send(ALICE)
        yield self.refused(self.limits.transaction(ALICE).checkSender())
        for _ in range(3):
            yield self.send(BOB)

    @defer.inlineCallbacks
    def test_overridesAndZero(self):
        """
        A login in the overrides file gets its own limits (a bulk sender);
        0 means no limit; the others keep the defaults.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"{BOB}: messages_per_hour=0 messages_per_day=10\n")
        limits = self.makeLimits(self.limits.defaults, LimitOverrides(path))
        for _ in range(10):
            yield self.send(BOB, limits=limits)
        yield self.refused(limits.transaction(BOB).checkSender())
        for _ in range(3):
            yield self.send(ALICE, limits=limits)
        yield self.refused(limits.transaction(ALICE).checkSender())

    @defer.inlineCallbacks
    def test_noLimitsNoCounters(self):
        """A login without limits is never refused and costs no counter."""
        limits = self.makeLimits(Limits())
        for _ in range(50):
            yield self.send(recipients=3, limits=limits)
        self.assertEqual((yield self.store.total(counterKey("messages_per_hour", ALICE), HOUR)), 0)

    @defer.inlineCallbacks
    def test_hitLoggedAndCounted(self):
        """Each refusal is one log line and one limitHit metric, by limit."""
        for _ in range(3):
            yield self.send()
        transaction = self.limits.transaction(ALICE)
        transaction.session = "5e55105e5510"
        yield self.refused(transaction.checkSender())
        self.assertEqual(
            self.log.matching("sending limit reached"),
            [
                f"sending limit reached: login=<{ALICE}> limit=messages_per_hour count=3 max=3 "
                "session=5e55105e5510"
            ],
        )
        self.assertEqual(metric(self.metrics, "messages_per_hour"), 1)

    @defer.inlineCallbacks
    def test_oneHitPerTransaction(self):
        """However many RCPTs a limit refuses in one transaction, they are one hit."""
        yield self.send(recipients=10)
        transaction = self.limits.transaction(ALICE)
        for _ in range(5):
            yield self.refused(transaction.checkRecipient(0))
        self.assertEqual((yield self.store.total(hitsKey(ALICE), DAY)), 1)
        self.assertEqual(metric(self.metrics, "recipients_per_hour"), 5)

    @defer.inlineCallbacks
    def test_suspendAfterHits(self):
        """
        The suspend_after-th hit in a day suspends the login in the user
        store, with one warning and one notice to the postmaster; later hits
        do neither again, and the suspended login is refused at MAIL with
        550 5.7.1 even once its limits have slid away. Resumed by hand, it
        sends again; its next hit that day suspends it again.
        """
        limits = self.makeLimits(attrs.evolve(self.limits.defaults, suspend_after=3))
        for _ in range(3):
            yield self.send(limits=limits)
        for _ in range(2):
            yield self.refused(limits.transaction(ALICE).checkSender())
        self.assertEqual(self.suspended, [])
        transaction = limits.transaction(ALICE)
        transaction.session = "5E5510N"
        yield self.refused(transaction.checkSender())
        self.assertEqual(self.suspended, [ALICE])
        self.assertTrue((yield self.users.lookup(ALICE)).suspended)
        [warning] = self.log.matching("login suspended")
        self.assertEqual(
            warning,
            f"login suspended: login=<{ALICE}> after 3 sending limit hits "
            f"today (last: messages_per_hour); 'mailauth user resume "
            f"{ALICE}' lifts it session=5E5510N",
        )
        [notice] = self.notices.sent
        self.assertIn(f"Subject: mailauth: login {ALICE} suspended\r\n".encode(), notice)
        self.assertIn(b"Auto-Submitted: auto-generated\r\n", notice)
        self.assertIn(b"To: <postmaster@example.test>\r\n", notice)
        self.assertIn(f"    mailauth user resume {ALICE}\r\n".encode(), notice)
        self.clock.advance(HOUR + 60)
        self.assertEqual(
            (yield self.refused(limits.transaction(ALICE).checkSender())),
            (550, f"5.7.1 Error: {ALICE} is suspended, contact your postmaster"),
        )
        self.assertEqual((len(self.suspended), len(self.notices.sent)), (1, 1))
        self.users.setSuspended(ALICE, False)  # mailauth user resume
        for _ in range(2):
            yield self.send(limits=limits)
        self.assertEqual(len(self.suspended), 1)
        yield self.refused(limits.transaction(ALICE).checkSender())
        self.assertEqual((len(self.suspended), len(self.notices.sent)), (2, 2))
        self.assertTrue((yield self.users.lookup(ALICE)).suspended)

    @defer.inlineCallbacks
    def test_suspendedOnceWhileTheStoreCatchesUp(self):
        """
        Hits right after a suspension, before the user database shows it (a
        users file is re-read every few seconds), do not suspend again.
        """
        limits = self.makeLimits(Limits(messages_per_hour=1, suspend_after=1))
        self.patch(self.users, "setSuspended", lambda login, value: None)
        yield self.send(limits=limits)
        for _ in range(3):
            yield self.refused(limits.transaction(ALICE).checkSender())
        self.assertEqual(self.suspended, [ALICE])
        self.clock.advance(SETTLE)
        yield self.refused(limits.transaction(ALICE).checkSender())
        self.assertEqual(self.suspended, [ALICE, ALICE])

    @defer.inlineCallbacks
    def test_resumedRightAwaySuspendedAgain(self):
        """
        A login resumed by hand right after its suspension (well within
        L{SETTLE}) is suspended again at its next hit that day: once the
        user database has shown the suspension, it is believed again.
        """
        limits = self.makeLimits(Limits(messages_per_hour=1, suspend_after=1))
        yield self.send(limits=limits)
        yield self.refused(limits.transaction(ALICE).checkSender())
        self.assertEqual(self.suspended, [ALICE])
        self.users.setSuspended(ALICE, False)  # mailauth user resume
        self.clock.advance(1)
        yield self.refused(limits.transaction(ALICE).checkSender())
        self.assertEqual(self.suspended, [ALICE, ALICE])
        self.assertTrue((yield self.users.lookup(ALICE)).suspended)
        self.assertEqual(len(self.notices.sent), 2)

    @defer.inlineCallbacks
    def test_suspensionRetried(self):
        """
        A suspension the user store refuses is logged as an error and tried
        again at the next hit; no notice is sent for a suspension not made.
        """
        limits = self.makeLimits(Limits(messages_per_hour=1, suspend_after=1))
        yield self.send(BOB, limits=limits)
        self.storeError = UserDatabaseError("cannot write /etc/mailauth/users: Read-only")
        transaction = limits.transaction(BOB)
        transaction.session = "5E5510N"
        yield self.refused(transaction.checkSender())
        [error] = self.log.matching("could not suspend")
        self.assertEqual(
            error,
            f"could not suspend login=<{BOB}> after 1 sending limit hits "
            "today: cannot write /etc/mailauth/users: Read-only session=5E5510N",
        )
        self.assertEqual(self.notices.sent, [])
        self.storeError = None
        yield self.refused(limits.transaction(BOB).checkSender())
        self.assertEqual(self.suspended, [BOB, BOB])
        self.assertTrue((yield self.users.lookup(BOB)).suspended)
        self.assertEqual(len(self.notices.sent), 1)

    @defer.inlineCallbacks
    def test_noPostmaster(self):
        """Without [delivery] postmaster a login is suspended all the same, and nobody told."""
        limits = self.makeLimits(Limits(messages_per_hour=1, suspend_after=1))
        limits.postmaster = None
        yield self.send(limits=limits)
        yield self.refused(limits.transaction(ALICE).checkSender())
        self.assertTrue((yield self.users.lookup(ALICE)).suspended)
        self.assertEqual(self.notices.sent, [])

    @defer.inlineCallbacks
    def test_noticeFailureLogged(self):
        """A notice that cannot be sent is logged; the suspension stands."""
        self.notices.error = OSError("disk full")
        limits = self.makeLimits(Limits(messages_per_hour=1, suspend_after=1))
        yield self.send(limits=limits)
        yield self.refused(limits.transaction(ALICE).checkSender())
        self.assertTrue((yield self.users.lookup(ALICE)).suspended)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    @defer.inlineCallbacks
    def test_suspendedBySomeoneElse(self):
        """A login suspended by hand while its session is open is refused at its next MAIL."""
        self.users.setSuspended(BOB, True)
        self.assertEqual((yield self.refused(self.limits.transaction(BOB).checkSender()))[0], 550)

    @defer.inlineCallbacks
    def test_databaseDownStillLimits(self):
        """A user database that cannot answer at MAIL does not refuse the mail; limits hold."""
        self.users.available = False
        yield self.send()
        yield self.send()
        yield self.send()
        yield self.refused(self.limits.transaction(ALICE).checkSender())


class MemoryLimitsTests(LimitsTestsMixin, unittest.TestCase):
    def makeStore(self):
        return MemoryCounterStore(self.clock)

    @defer.inlineCallbacks
    def test_recordNeverFails(self):
        """A count that cannot be made is logged; the accepted message stays accepted."""

        def broken(*args, **kwargs):
            return defer.fail(RuntimeError("store broken"))

        self.patch(self.store, "hit", broken)
        self.assertIsNone((yield self.limits.transaction(ALICE).record(1)))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class UsersFileSuspensionTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_suspensionShownAtOnce(self):
        """
        With a users file, the process that suspends a login reads the file
        again at once: the login's next AUTH finds it suspended, and its
        open sessions' next MAIL gets 550, without waiting for the file's
        next check seconds later.
        """
        path = self.mktemp()
        store = UsersFileStore(path)
        store.addUser(ALICE, "{PLAIN}a")
        users = UserDatabase(path)
        users.load()
        clock = Clock()
        clock.advance(START)
        limits = SendingLimits(
            store=MemoryCounterStore(clock),
            defaults=Limits(messages_per_hour=1, suspend_after=1),
            overrides=LimitOverrides(None),
            users=users,
            suspend=lambda login: defer.maybeDeferred(store.setSuspended, login, True),
            clock=clock,
            metrics=Metrics.prometheus(process=False),
        )
        transaction = limits.transaction(ALICE)
        yield transaction.checkSender()
        yield transaction.checkRecipient(0)
        yield transaction.record(1)
        failure = yield self.assertFailure(limits.transaction(ALICE).checkSender(), SMTPReply)
        self.assertEqual(failure.code, 451)
        self.assertTrue((yield users.lookup(ALICE)).suspended)
        failure = yield self.assertFailure(limits.transaction(ALICE).checkSender(), SMTPReply)
        self.assertEqual(failure.code, 550)


class RedisLimitsTests(LimitsTestsMixin, unittest.TestCase):
    """The same against a real redis-server, its windows on the Clock."""

    def makeStore(self):
        server = startRedis(self)
        pool = ThreadPoolService(reactor, "test-limits", 2, maxQueued=100)
        pool.startService()
        self.addCleanup(pool.stopService)
        store = RedisCounterStore.fromURL(
            server.unixURL, clock=self.clock, runBlocking=pool.run, serverTime=False
        )
        self.addCleanup(store.client.connection_pool.disconnect)
        return store


class FailingQueue(MemoryQueue):
    """A forward queue whose commits fail while C{failing} is set."""

    failing = False

    def newMessage(self, msgid, sender, recipients, options=None):
        writer = super().newMessage(msgid, sender, recipients, options)
        if self.failing:

            def commit():
                raise OSError(28, "No space left on device")

            writer.commit = commit
        return writer


def addr(text: str) -> smtp.Address:
    return smtp.Address(text.encode("ascii"))


class RealmTests(unittest.TestCase):
    """The realm checks the limits at MAIL and RCPT and counts what it accepted."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.dir = os.path.abspath(self.mktemp())
        self.users = MemoryUserStore({ALICE: "{PLAIN}a", BOB: "{PLAIN}b"})
        router = Router(
            localDomains={"example.test"},
            maildirTemplate=self.dir + "/{domain}/{localpart}/Maildir",
            users=self.users,
            aliases=AddressMap(None),
            senderMap=AddressMap(None),
            senderLoginMatch=True,
        )
        self.queue = FailingQueue()
        self.store = MemoryCounterStore(self.clock)
        self.limits = SendingLimits(
            store=self.store,
            defaults=Limits(messages_per_hour=2, recipients_per_hour=3),
            overrides=LimitOverrides(None),
            users=self.users,
            clock=self.clock,
            metrics=Metrics(),
        )
        self.realm = Realm(
            router=router,
            hostname="mx.example.test",
            runBlocking=runInline,
            queue=self.queue,
            clock=self.clock,
            limits=self.limits,
        )

    def delivery(self, login=ALICE):
        if login is None:
            return self.realm.anonymous().getMessageDelivery()
        _, avatar, _ = self.realm.requestAvatar(login, None, IMessageDeliveryFactory)
        return avatar.getMessageDelivery()

    def transaction(self, recipients, login=ALICE):
        """MAIL and RCPT, each accepted; the delivery and its message factories."""
        delivery = self.delivery(login)
        self.successResultOf(delivery.validateFrom(None, addr(ALICE)))
        factories = [
            self.successResultOf(
                delivery.validateTo(smtp.User(addr(recipient), (b"c", "192.0.2.1"), None, b""))
            )
            for recipient in recipients
        ]
        return delivery, factories

    def refusal(self, d) -> tuple:
        f = self.failureResultOf(d, SMTPReply)
        return (f.value.code, f.value.text.split(" ", 1)[0])

    def deliver(self, factories) -> defer.Deferred:
        message = factories[0]()
        message.write(b"Subject: x\r\n\r\nhello\r\n")
        return message.eomReceived()

    def counted(self, limit: str) -> int:
        return self.successResultOf(self.store.total(counterKey(limit, ALICE), HOUR))

    def test_countedWhenAccepted(self):
        """
        A message is counted, with the recipients it was accepted for, when
        it is stored, before the session's 250: the next MAIL sees it.
        """
        _, factories = self.transaction(["bob@example.test", "x@remote.test"])
        self.assertEqual(self.counted("messages_per_hour"), 0)
        self.assertIsInstance(self.successResultOf(self.deliver(factories)), str)
        self.assertEqual(
            (self.counted("messages_per_hour"), self.counted("recipients_per_hour")), (1, 2)
        )

    def test_failedMessageNotCounted(self):
        """A message that could not be stored (4xx to the client) is not counted."""
        self.queue.failing = True
        _, factories = self.transaction(["x@remote.test"])
        self.assertEqual(self.refusal(self.deliver(factories)), (452, "4.3.1"))
        self.assertEqual(self.counted("messages_per_hour"), 0)

    def test_mailAndRcptRefused(self):
        """At the limits: MAIL gets 451 4.7.1, and RCPT past the recipients in this message."""
        delivery = self.delivery()
        self.successResultOf(delivery.validateFrom(None, addr(ALICE)))
        users = [
            smtp.User(addr(f"u{n}@remote.test"), (b"c", "192.0.2.1"), None, b"") for n in range(4)
        ]
        for user in users[:3]:
            self.successResultOf(delivery.validateTo(user))
        self.assertEqual(self.refusal(delivery.validateTo(users[3])), (451, "4.7.1"))
        self.assertEqual(delivery.accepted, 3)
        for _ in range(2):
            _, factories = self.transaction(["bob@example.test"])
            self.successResultOf(self.deliver(factories))
        self.assertEqual(
            self.refusal(self.delivery().validateFrom(None, addr(ALICE))), (451, "4.7.1")
        )

    def test_anonymousNotLimited(self):
        """Sessions that did not log in (local delivery only) have no sending limits."""
        delivery = self.delivery(None)
        self.assertIsNone(delivery.limits)
        for _ in range(5):
            user = smtp.User(addr("bob@example.test"), (b"c", "192.0.2.1"), None, b"")
            self.successResultOf(delivery.validateTo(user))

    def test_noticeLocal(self):
        """A notice to a local postmaster lands in its Maildir."""
        self.successResultOf(self.realm.deliverNotice(BOB, b"Subject: n\r\n\r\nnotice\r\n"))
        [name] = os.listdir(os.path.join(self.dir, "example.test", "bob", "Maildir", "new"))

    def test_noticeRemote(self):
        """A notice to a postmaster elsewhere is queued from the null sender."""
        self.successResultOf(self.realm.deliverNotice("pm@remote.test", b"Subject: n\r\n\r\n"))
        [(sender, recipients, data)] = self.queue.messages.values()
        self.assertEqual(
            (sender, recipients, data), ("", ("pm@remote.test",), b"Subject: n\r\n\r\n")
        )

    def test_noticeNowhere(self):
        """Without a relay, a notice to another domain fails (and is logged by the caller)."""
        self.realm.queue = None
        self.failureResultOf(self.realm.deliverNotice("pm@remote.test", b"x"), SMTPReply)


# -- the running daemon, with users in PostgreSQL (they store suspensions) ----

THIEF = b"alice@example.test"
THIEF_PASSWORD = b"alice-stolen-1"
OTHER = b"bob@example.test"
OTHER_PASSWORD = b"bob-own-2"
POSTMASTER = "postmaster@example.test"


def usersInPostgreSQL() -> str:
    """A fresh database on the shared PostgreSQL with the thief, the other login and postmaster."""
    server = pgharness.sharedServer()
    uri = server.uri(server.createDatabase())
    initSchema(uri)
    store = PostgreSQLUserStore(uri)
    for login, password in (
        (THIEF, THIEF_PASSWORD),
        (OTHER, OTHER_PASSWORD),
        (POSTMASTER.encode(), b"postmaster-3"),
    ):
        store.addUser(login.decode(), makeHash(password, "SHA256-CRYPT"))
    return uri


def limitSettings(uri: str) -> dict:
    return {
        "auth": {"users": uri},
        "delivery": {"postmaster": POSTMASTER},
        "limits": {"messages_per_hour": "5", "suspend_after": "3", "overrides": "{dir}/limits"},
    }


def sendOne(client, sender: bytes, subject: bytes) -> list:
    """(Blocking.) One message on a logged-in client; the reply codes, stopping at a refusal."""
    codes = [client.command(b"MAIL FROM:<" + sender + b">")[0]]
    if codes[-1] != 250:
        client.command(b"RSET")
        return codes
    codes.append(client.command(b"RCPT TO:<" + POSTMASTER.encode() + b">")[0])
    codes.append(client.command(b"DATA")[0])
    codes.append(client.command(b"Subject: " + subject + b"\r\n\r\nbuy now\r\n.")[0])
    return codes


class StolenPasswordTests(AttackMixin, unittest.TestCase):
    """
    A stolen password used to send as fast as one session can, against the
    real daemon with users in PostgreSQL: refused at the configured limit,
    then suspended, while another login from the same address sends on.
    """

    files = {"limits": f"{OTHER.decode()}: messages_per_hour=100\n"}

    def setUp(self):
        self.settings = limitSettings(usersInPostgreSQL())
        super().setUp()

    @defer.inlineCallbacks
    def test_refusedThenSuspended(self):
        """
        Five messages go, then MAIL gets 451 4.7.1 three times (the third
        hit suspends: one warning, one notice to the postmaster), then 550
        5.7.1 in the same session; a new AUTH with the right password gets
        535 and an C{auth suspended} line, never a counted failure. The
        other login, from the same address, sends between every attempt.
        """

        def run():
            thief = self.loggedIn(login=THIEF, password=THIEF_PASSWORD)
            other = self.loggedIn(login=OTHER, password=OTHER_PASSWORD)
            thiefCodes, otherCodes = [], []
            for n in range(9):
                thiefCodes.append(sendOne(thief, THIEF, b"spam %d" % n)[-1])
                otherCodes.append(sendOne(other, OTHER, b"own %d" % n)[-1])
            again = self.connect()
            again.ehlo()
            return thiefCodes, otherCodes, again.command(plain(THIEF, THIEF_PASSWORD))

        thiefCodes, otherCodes, relogin = yield self.inThread(run)
        self.assertEqual(thiefCodes, [250] * 5 + [451] * 3 + [550])
        self.assertEqual(otherCodes, [250] * 9)
        self.assertEqual(relogin, (535, [b"5.7.8 Authentication credentials invalid"]))
        self.assertEqual(
            len(
                self.log.matching(
                    r"^login suspended: login=<alice@example\.test> "
                    r"after 3 sending limit hits today"
                )
            ),
            1,
        )
        self.assertEqual(len(self.log.matching(r"^sending limit reached: login=<alice")), 3)
        self.assertEqual(
            [withoutSession(m) for m in self.log.matching(r"^auth suspended: ")],
            ["auth suspended: client=[127.0.0.1] mechanism=PLAIN login=<alice@example.test>"],
        )
        self.assertEqual(self.log.matching(r"^auth failure: "), [])
        delivered = [content for _, content in self.daemon.delivered(POSTMASTER)]
        notices = [
            c for c in delivered if b"Subject: mailauth: login alice@example.test suspended" in c
        ]
        self.assertEqual(len(notices), 1)
        self.assertEqual(len(delivered), 5 + 9 + 1)


class KillTests(unittest.TestCase):
    """
    C{twistd mailauth} killed with SIGKILL mid-window and started again:
    the counters in its memory are lost (at most a window's worth), the
    suspension stored with the user never is.
    """

    def start(self) -> int:
        """Start twistd on the daemon's configuration; return its submissions port."""
        logPath = os.path.join(self.daemon.dir, f"twistd{len(self.processes)}.log")
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
                self.daemon.configPath,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        self.addCleanup(self.stop, process)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"twistd exited: {process.stdout.read()!r}")
            if os.path.exists(logPath):
                with open(logPath) as f:
                    ports = re.findall(r"starting on (\d+)", f.read())
                if len(ports) == 2:
                    return int(ports[1])  # submission, then submissions
            time.sleep(0.05)  # another process is starting; there is no clock to drive
        raise AssertionError("twistd did not start listening")

    def stop(self, process) -> None:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)

    def client(self, port: int, login: bytes, password: bytes) -> RawClient:
        client = RawClient(port, tls=True)
        self.addCleanup(client.close)
        assert client.reply()[0] == 220
        client.ehlo()
        code, text = client.command(plain(login, password))
        assert code == 235, (code, text)
        return client

    def test_killMidWindow(self):
        """
        Before the kill: the thief is suspended after one hit, and the other
        login has sent one of its two messages an hour. After SIGKILL and a
        restart, the thief still gets 535; the other login's count started
        again from nothing (two more go, the third is refused).
        """
        self.processes: list = []
        settings = limitSettings(usersInPostgreSQL())
        settings["limits"].update(messages_per_hour="2", suspend_after="1")
        self.daemon = Daemon(self.mktemp(), settings, files={"limits": ""})
        port = self.start()
        thief = self.client(port, THIEF, THIEF_PASSWORD)
        codes = [sendOne(thief, THIEF, b"spam %d" % n)[-1] for n in range(4)]
        self.assertEqual(codes, [250, 250, 451, 550])
        other = self.client(port, OTHER, OTHER_PASSWORD)
        self.assertEqual(sendOne(other, OTHER, b"before")[-1], 250)

        self.processes[0].send_signal(signal.SIGKILL)
        self.processes[0].wait(30)
        port = self.start()

        again = RawClient(port, tls=True)
        self.addCleanup(again.close)
        again.reply()
        again.ehlo()
        self.assertEqual(again.command(plain(THIEF, THIEF_PASSWORD))[0], 535)
        other = self.client(port, OTHER, OTHER_PASSWORD)
        self.assertEqual(
            [sendOne(other, OTHER, b"after %d" % n)[-1] for n in range(3)], [250, 250, 451]
        )
