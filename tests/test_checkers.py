"""
The credentials checkers: Deferreds (never coroutines), the same work for
every failure (the timing floor), and the failures the session must tell
apart: a mechanism the stored scheme cannot do, a suspended login.
"""

from __future__ import annotations

import base64
import hmac
import os

from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.mail.interfaces import IMessageDeliveryFactory
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailauth import passwords
from mailauth.allownets import Networks, Origin
from mailauth.checkers import AddressRefused, CramMD5Checker, LoginSuspended, PasswordChecker
from mailauth.counters import MemoryCounterStore
from mailauth.interfaces import IUserDatabase, IUserStore
from mailauth.metrics import Metrics
from mailauth.sasl import CramMD5Credentials, MechanismUnavailable, PlaintextCredentials
from mailauth.threads import PoolBusy
from mailauth.userdb import User, UserDatabaseError, parseUsers
from tests.fakes import MemoryUserDatabase, MemoryUserStore
from tests.harness import LogWatcher
from tests.support import (
    DATA,
    SECRET,
    MemoryMailbox,
    Session,
    makeFactory,
    makeThrottle,
    withoutSession,
)

USERS = {
    "alice@example.test": passwords.makeHash(b"secret", "SHA256-CRYPT"),
    "cram@example.test": passwords.makeHash(b"secret", "CRAM-MD5"),
    "plain@example.test": "{PLAIN}secret",
}

# One user per scheme, hashed by Dovecot's doveadm; the password is SECRET.
with open(os.path.join(DATA, "dovecot-passwd"), encoding="utf-8") as _f:
    HASHES = dict(line.split(":")[:2] for line in _f.read().splitlines() if line)
VECTORS, _problems = parseUsers("\n".join(f"{k}:{v}" for k, v in HASHES.items()), "vectors")
assert not _problems, _problems
ARGON2ID = "alice.argon2id@example.test"


class RecordingRunner:
    """
    Runs the work at once (or, when C{hold} is set, when the test calls
    L{runHeld}), recording that it went through the pool.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.busy = False
        self.hold = False
        self.held: list = []

    def __call__(self, f, *args):
        self.calls += 1
        if self.busy:
            return defer.fail(PoolBusy("full"))
        if self.hold:
            d: defer.Deferred = defer.Deferred()
            self.held.append((d, f, args))
            return d
        return defer.maybeDeferred(f, *args)

    def runHeld(self) -> None:
        held, self.held = self.held, []
        for d, f, args in held:
            d.callback(f(*args))


class DummyLedger:
    """Records each dummy verification instead of spending it (patched into passwords)."""

    def __init__(self, test: unittest.TestCase) -> None:
        self.secrets: list = []
        test.patch(passwords, "dummyVerify", self.secrets.append)


def cramResponse(password: bytes, challenge: bytes = b"<1.2@mx>") -> bytes:
    return hmac.new(password, challenge, "md5").hexdigest().encode()


class PasswordCheckerTests(unittest.TestCase):
    def setUp(self) -> None:
        DummyLedger(self)  # what the dummy work costs is test_passwords' business
        self.run = RecordingRunner()
        self.users = MemoryUserDatabase(dict(USERS))
        self.checker = PasswordChecker(self.users, self.run)

    def check(self, login: str, password: bytes, checker=None):
        credentials = PlaintextCredentials(login, password, "PLAIN")
        return (checker or self.checker).requestAvatarId(credentials)

    def test_returnsDeferred(self) -> None:
        """
        requestAvatarId returns a Deferred, never a coroutine: on Twisted
        22.4 a coroutine from a checker logs everyone in (D36).
        """
        result = self.check("alice@example.test", b"wrong")
        self.assertIsInstance(result, defer.Deferred)
        self.failureResultOf(result, UnauthorizedLogin)

    def test_success(self) -> None:
        """The right password gives the lower-cased login as avatar id, via the pool."""
        self.assertEqual(
            self.successResultOf(self.check("Alice@example.test", b"secret")), "alice@example.test"
        )
        self.assertEqual(self.run.calls, 1)

    def test_unknownUserCostsAVerification(self) -> None:
        """An unknown user still runs one (dummy) verification in the pool."""
        ledger = DummyLedger(self)
        self.failureResultOf(self.check("nobody@example.test", b"x"), UnauthorizedLogin)
        self.assertEqual((ledger.secrets, self.run.calls), ([b"x"], 1))

    def test_everyFailureCostsADefaultVerification(self) -> None:
        """
        Whatever the stored scheme, a wrong password fails only after one
        verification at the default scheme's cost, in the same pool call: a
        dummy one for every scheme that costs less (SHA512-CRYPT, CRAM-MD5,
        PLAIN, bcrypt, argon2i...), none on top of verifying an ARGON2ID
        hash made with the default parameters, which is that cost already.
        So no login's failure comes sooner than an unknown login's.
        """
        ledger = DummyLedger(self)
        checker = PasswordChecker(MemoryUserDatabase(dict(HASHES)), self.run)
        spent = {}
        for login in VECTORS:
            before = len(ledger.secrets)
            self.failureResultOf(self.check(login, b"wrong", checker), UnauthorizedLogin)
            spent[login] = len(ledger.secrets) - before
        self.assertEqual(spent, {login: 0 if login == ARGON2ID else 1 for login in VECTORS})
        self.assertEqual(self.run.calls, len(VECTORS))

    def test_successSpendsNothingMore(self) -> None:
        """A right password is answered after its own verification, with no dummy work."""
        ledger = DummyLedger(self)
        self.successResultOf(self.check("plain@example.test", b"secret"))
        self.assertEqual(ledger.secrets, [])

    def test_databaseUnavailable(self) -> None:
        """A users file never read fails with LoginFailed (454), not UnauthorizedLogin (535)."""
        checker = PasswordChecker(MemoryUserDatabase(None), self.run)
        f = self.failureResultOf(
            checker.requestAvatarId(PlaintextCredentials("a@example.test", b"x", "PLAIN")),
            LoginFailed,
        )
        self.assertFalse(f.check(UnauthorizedLogin))

    def test_poolBusy(self) -> None:
        """A full auth pool is a temporary failure."""
        self.run.busy = True
        f = self.failureResultOf(self.check("alice@example.test", b"secret"), LoginFailed)
        self.assertFalse(f.check(UnauthorizedLogin))

    def test_suspended(self) -> None:
        """
        A suspended login with the right password fails with LoginSuspended
        (still an UnauthorizedLogin: 535), after the same work as any
        failure; with a wrong password it is an ordinary failure.
        """
        store = MemoryUserStore(dict(USERS))
        store.setSuspended("alice@example.test", True)
        checker = PasswordChecker(store, self.run)
        ledger = DummyLedger(self)
        f = self.failureResultOf(
            self.check("Alice@example.test", b"secret", checker), LoginSuspended
        )
        self.assertTrue(f.check(UnauthorizedLogin))
        self.assertEqual(ledger.secrets, [b"secret"])
        f = self.failureResultOf(
            self.check("alice@example.test", b"wrong", checker), UnauthorizedLogin
        )
        self.assertFalse(f.check(LoginSuspended))
        store.setSuspended("alice@example.test", False)
        self.assertEqual(
            self.successResultOf(self.check("alice@example.test", b"secret", checker)),
            "alice@example.test",
        )


NEAR = "{PLAIN}secret::::::allow_nets=10.0.0.0/8,2001:db8::/32"


class AllowNetsTests(unittest.TestCase):
    """
    Dovecot's allow_nets and allow_real_nets: the right password from
    elsewhere fails as a wrong one does (UnauthorizedLogin, the same work),
    as an L{AddressRefused} that says why for the log.
    """

    def setUp(self) -> None:
        self.ledger = DummyLedger(self)
        self.run = RecordingRunner()
        self.users = MemoryUserDatabase(
            {
                "near@example.test": NEAR,
                "gone@example.test": NEAR + " nologin",
                "proxied@example.test": "{PLAIN}secret::::::allow_real_nets=127.0.0.1",
                "both@example.test": (
                    "{PLAIN}secret::::::allow_nets=192.0.2.0/24 allow_real_nets=127.0.0.0/8"
                ),
                "local@example.test": "{PLAIN}secret::::::allow_nets=local",
                "cram@example.test": passwords.makeHash(b"secret", "CRAM-MD5")
                + "::::::allow_nets=10.0.0.0/8",
                "free@example.test": "{PLAIN}secret",
            }
        )
        self.checker = PasswordChecker(self.users, self.run)

    def check(self, login: str, client, real=None, password: bytes = b"secret"):
        """The check of C{password} for C{login} from C{client} through C{real}."""
        origin = Origin.of(client, client if real is None else real)
        credentials = PlaintextCredentials(login, password, "PLAIN", origin=origin)
        return self.checker.requestAvatarId(credentials)

    def refused(self, d, field: str, why: str) -> None:
        f = self.failureResultOf(d, AddressRefused)
        self.assertTrue(f.check(UnauthorizedLogin))
        self.assertFalse(f.check(LoginSuspended))
        self.assertEqual((f.value.field, f.value.why), (field, why))

    def test_inside(self) -> None:
        """
        From inside a listed network (IPv4, IPv6, an IPv4 client of a
        dual-stack socket) the right password logs in, with no more work
        than any login.
        """
        for client in ("10.1.2.3", "2001:db8::5", "::ffff:10.1.2.3"):
            self.assertEqual(
                self.successResultOf(self.check("Near@example.test", client)),
                "near@example.test",
            )
        self.assertEqual(self.ledger.secrets, [])

    def test_rightPasswordOutside(self) -> None:
        """
        The right password from outside fails as a wrong one: an
        UnauthorizedLogin after the same dummy verification; only the
        right password says why (the wrong one is just wrong).
        """
        self.refused(
            self.check("near@example.test", "192.0.2.1"),
            "allow_nets",
            "IP 192.0.2.1 not in allowed networks",
        )
        self.refused(
            self.check("near@example.test", "::ffff:192.0.2.1"),
            "allow_nets",
            "IP 192.0.2.1 not in allowed networks",
        )
        self.assertEqual(self.ledger.secrets, [b"secret"] * 2)
        f = self.failureResultOf(
            self.check("near@example.test", "192.0.2.1", password=b"wrong"), UnauthorizedLogin
        )
        self.assertFalse(f.check(AddressRefused))
        self.assertEqual(self.ledger.secrets, [b"secret"] * 2 + [b"wrong"])
        self.assertEqual(self.run.calls, 3)

    def test_suspendedOutside(self) -> None:
        """
        A suspended login's right password from outside is refused for the
        network (a failure counted as a guess); from inside it is the
        suspension.
        """
        self.refused(
            self.check("gone@example.test", "192.0.2.1"),
            "allow_nets",
            "IP 192.0.2.1 not in allowed networks",
        )
        self.failureResultOf(self.check("gone@example.test", "10.0.0.1"), LoginSuspended)

    def test_realNets(self) -> None:
        """
        allow_real_nets is checked against the connection's own peer (the
        proxy), allow_nets against the client; where both are set, both
        must allow the login.
        """
        self.successResultOf(self.check("proxied@example.test", "203.0.113.9", "127.0.0.1"))
        self.refused(
            self.check("proxied@example.test", "127.0.0.1", "192.0.2.7"),
            "allow_real_nets",
            "IP 192.0.2.7 not in allowed networks",
        )
        self.successResultOf(self.check("both@example.test", "192.0.2.7", "127.0.0.2"))
        self.refused(
            self.check("both@example.test", "192.0.2.7", "10.0.0.1"),
            "allow_real_nets",
            "IP 10.0.0.1 not in allowed networks",
        )
        self.refused(
            self.check("both@example.test", "127.0.0.2", "127.0.0.2"),
            "allow_nets",
            "IP 127.0.0.2 not in allowed networks",
        )

    def test_local(self) -> None:
        """
        C{local} allows a connection without an IP address (a UNIX socket)
        and no TCP client; a list without it refuses such a connection.
        """
        self.successResultOf(self.check("local@example.test", "local"))
        self.refused(
            self.check("local@example.test", "127.0.0.1"),
            "allow_nets",
            "IP 127.0.0.1 not in allowed networks",
        )
        self.refused(
            self.check("near@example.test", "local"),
            "allow_nets",
            "no IP address (a local connection), and 'local' is not listed",
        )

    def test_originUnknown(self) -> None:
        """
        Credentials that do not say where they come from are refused for a
        restricted user, never let in; a user without restriction is not
        concerned.
        """
        unknown = PlaintextCredentials("near@example.test", b"secret", "PLAIN")
        self.refused(
            self.checker.requestAvatarId(unknown),
            "allow_nets",
            "the client's address is not known",
        )
        free = PlaintextCredentials("free@example.test", b"secret", "PLAIN")
        self.assertEqual(self.successResultOf(self.checker.requestAvatarId(free)), free.username)

    def test_cramMD5(self) -> None:
        """CRAM-MD5's right digest is held to allow_nets too."""
        checker = CramMD5Checker(self.users, self.run)

        def check(client: str):
            credentials = CramMD5Credentials(
                "cram@example.test",
                b"<1.2@mx>",
                cramResponse(b"secret"),
                origin=Origin.of(client, client),
            )
            return checker.requestAvatarId(credentials)

        self.assertEqual(self.successResultOf(check("10.9.8.7")), "cram@example.test")
        self.refused(check("192.0.2.1"), "allow_nets", "IP 192.0.2.1 not in allowed networks")
        self.assertEqual(self.ledger.secrets, [cramResponse(b"secret")])


class DefaultCostTests(unittest.TestCase):
    """L{passwords.costsAsMuchAsDummy}: which hashes cost a dummy verification already."""

    def argon2(self, m: int, t: int, p: int, kind: str = "argon2id") -> passwords.PasswordHash:
        value = VECTORS[ARGON2ID].password.value
        head, rest = value.split("$m=", 1)
        return passwords.parse(
            "{ARGON2ID}"
            + head.replace("argon2id", kind)
            + f"$m={m},t={t},p={p}$"
            + rest.split("$", 1)[1]
        )

    def test_defaultParameters(self) -> None:
        """A new ARGON2ID hash, and doveadm's, cost a dummy verification."""
        self.assertTrue(passwords.costsAsMuchAsDummy(passwords.parse(passwords.makeHash(b"x"))))
        self.assertTrue(passwords.costsAsMuchAsDummy(VECTORS[ARGON2ID].password))
        self.assertTrue(passwords.costsAsMuchAsDummy(self.argon2(131072, 4, 1)))

    def test_cheaper(self) -> None:
        """Less memory or time, more lanes, argon2i or another scheme: not enough."""
        for stored in (
            self.argon2(32768, 3, 1),
            self.argon2(65536, 2, 1),
            self.argon2(65536, 3, 4),
            self.argon2(65536, 3, 1, "argon2i"),
            VECTORS["alice.argon2i@example.test"].password,
            VECTORS["alice.sha512-crypt@example.test"].password,
        ):
            self.assertFalse(passwords.costsAsMuchAsDummy(stored), stored)


class CramMD5CheckerTests(unittest.TestCase):
    def setUp(self) -> None:
        DummyLedger(self)
        self.checker = CramMD5Checker(MemoryUserDatabase(dict(USERS)), RecordingRunner())

    def check(self, login: str, password: bytes, challenge=b"<1.2@mx>"):
        digest = cramResponse(password, challenge)
        return self.checker.requestAvatarId(CramMD5Credentials(login, challenge, digest))

    def test_cramUser(self) -> None:
        """A user stored as CRAM-MD5 logs in with the right digest."""
        self.assertEqual(
            self.successResultOf(self.check("cram@example.test", b"secret")), "cram@example.test"
        )

    def test_plainUser(self) -> None:
        """A user stored in plaintext can use CRAM-MD5."""
        self.assertEqual(
            self.successResultOf(self.check("plain@example.test", b"secret")), "plain@example.test"
        )

    def test_wrongDigest(self) -> None:
        """A wrong digest fails as a wrong password, not as an unusable mechanism."""
        f = self.failureResultOf(self.check("cram@example.test", b"nope"), UnauthorizedLogin)
        self.assertFalse(f.check(MechanismUnavailable))

    def test_hashedUserRefused(self) -> None:
        """
        A user with a one-way hash gets the ordinary failure, even with the
        right password, as MechanismUnavailable: not a guess.
        """
        f = self.failureResultOf(self.check("alice@example.test", b"secret"), MechanismUnavailable)
        self.assertTrue(f.check(UnauthorizedLogin))
        self.assertIn(
            "CRAM-MD5 cannot verify a password stored as SHA256-CRYPT", f.getErrorMessage()
        )

    def test_unknownUserIsAGuess(self) -> None:
        """An unknown login trying CRAM-MD5 is a wrong guess at a name, not a mechanism refused."""
        f = self.failureResultOf(self.check("nobody@example.test", b"secret"), UnauthorizedLogin)
        self.assertFalse(f.check(MechanismUnavailable))

    def test_everyFailureCostsADefaultVerification(self) -> None:
        """
        A wrong digest, an unknown login and a user CRAM-MD5 cannot verify
        each fail after one dummy verification in the pool; a right digest
        costs none.
        """
        ledger = DummyLedger(self)
        self.failureResultOf(self.check("cram@example.test", b"nope"))
        self.failureResultOf(self.check("nobody@example.test", b"secret"))
        self.failureResultOf(self.check("alice@example.test", b"secret"))
        self.assertEqual(len(ledger.secrets), 3)
        self.successResultOf(self.check("cram@example.test", b"secret"))
        self.assertEqual(len(ledger.secrets), 3)

    def test_returnsDeferred(self) -> None:
        """requestAvatarId returns a Deferred (D36)."""
        result = self.check("x@example.test", b"x")
        self.assertIsInstance(result, defer.Deferred)
        self.failureResultOf(result, UnauthorizedLogin)


class MemoryUserStoreTests(unittest.TestCase):
    """The fake user store the limits and checker tests suspend users in."""

    def test_interfaces(self) -> None:
        """It provides IUserDatabase and IUserStore."""
        store = MemoryUserStore()
        self.assertTrue(verifyObject(IUserDatabase, store))
        self.assertTrue(verifyObject(IUserStore, store))

    def test_suspendUnknown(self) -> None:
        """Suspending a login that does not exist is a UserDatabaseError."""
        self.assertRaises(UserDatabaseError, MemoryUserStore().setSuspended, "a@b.test", True)

    def test_edits(self) -> None:
        """Edits are seen by the next lookup, logins without regard to case."""
        store = MemoryUserStore({"A@example.test": "{PLAIN}x"})
        self.assertRaises(UserDatabaseError, store.addUser, "a@example.test", "{PLAIN}y")
        self.assertRaises(UserDatabaseError, store.addUser, "bad login", "{PLAIN}y")
        store.setPassword("a@example.test", "{PLAIN}z")
        self.assertEqual(store.listUsers(), [("a@example.test", "PLAIN")])
        self.assertTrue(store.hasUser("A@EXAMPLE.TEST"))
        store.setSuspended("a@example.test", True)
        self.assertTrue(self.successResultOf(store.lookup("a@example.test")).suspended)
        store.deleteUser("a@example.test")
        self.assertIsNone(self.successResultOf(store.lookup("a@example.test")))


# -- the session over the real checkers ---------------------------------------


@implementer(IRealm)
class MailboxRealm:
    def requestAvatar(self, avatarId, mind, *interfaces):
        return IMessageDeliveryFactory, MemoryMailbox(login=avatarId), lambda: None


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def plainLine(login: bytes, password: bytes) -> bytes:
    return b"AUTH PLAIN " + b64(b"\0" + login + b"\0" + password)


class SessionTests(unittest.TestCase):
    """
    The session over a real portal with the real checkers, the users of
    C{tests/data/dovecot-passwd} and bob, suspended.
    """

    def setUp(self) -> None:
        self.ledger = DummyLedger(self)
        self.clock = Clock()
        self.users = MemoryUserStore(dict(HASHES))
        self.users.addUser("bob@example.test", "{PLAIN}bob-secret")
        self.users.setSuspended("bob@example.test", True)
        self.run = RecordingRunner()
        portal = Portal(
            MailboxRealm(),
            [PasswordChecker(self.users, self.run), CramMD5Checker(self.users, self.run)],
        )
        self.store = MemoryCounterStore(self.clock)
        self.metrics = Metrics.prometheus(process=False)
        self.factory = makeFactory(
            self.clock,
            portal=portal,
            tlsMode="implicit",
            throttle=makeThrottle(self.clock, store=self.store, maxPerAddress=10, maxPerLogin=3),
            failuresPerSession=20,
            metrics=self.metrics,
        )
        self.log = LogWatcher()
        self.addCleanup(self.log.stop)

    def session(self, host: str = "192.0.2.1") -> Session:
        session = Session(self.factory, host)
        session.read()
        session.command(b"EHLO c")
        return session

    def authLines(self) -> list:
        return [withoutSession(m) for m in self.log.messages if m.startswith("auth ")]

    def metric(self, mechanism: str, result: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "mailauth_auth_total", {"mechanism": mechanism, "result": result}
        )
        return value or 0.0

    def cram(self, session: Session, login: bytes, password: bytes) -> list:
        [challenge] = session.command(b"AUTH CRAM-MD5")
        digest = cramResponse(password, base64.b64decode(challenge[4:]))
        return session.command(b64(login + b" " + digest))

    def test_failureWaitsForTheFloor(self) -> None:
        """
        A wrong password for a user whose scheme is cheap (SHA512-CRYPT) is
        not answered until the auth pool has run the check, dummy
        verification included: the 535 comes no sooner than an unknown
        login's.
        """
        ledger = self.ledger
        self.run.hold = True
        session = self.session()
        for login in (b"alice.sha512-crypt@example.test", b"nobody@example.test"):
            self.assertEqual(session.command(plainLine(login, b"wrong")), [])
            self.assertEqual(ledger.secrets, [])
            self.run.runHeld()
            self.assertEqual(ledger.secrets, [b"wrong"])
            self.assertEqual(session.read(), [b"535 5.7.8 Authentication credentials invalid"])
            del ledger.secrets[:]

    def test_mechanismChoiceNeverCounted(self) -> None:
        """
        A user stored as ARGON2ID whose client picks CRAM-MD5 (offered)
        gets the ordinary 535, logged as an unusable mechanism (a line the
        fail2ban filter does not match) and never counted: eight tries from
        one address are all answered at once, the address is not blocked,
        and the right password then logs in over PLAIN without delay.
        """
        for _ in range(8):
            session = self.session()
            self.assertEqual(
                self.cram(session, ARGON2ID.encode(), SECRET),
                [b"535 5.7.8 Authentication credentials invalid"],
            )
            session.protocol.connectionLost(None)
        self.assertEqual(self.store.trackedKeys(), 0)
        self.assertEqual(
            self.authLines(),
            [f"auth mechanism unusable: client=[192.0.2.1] mechanism=CRAM-MD5 login=<{ARGON2ID}>"]
            * 8,
        )
        self.assertEqual(self.metric("CRAM-MD5", "failure"), 8)
        session = self.session()
        self.assertEqual(
            session.command(plainLine(ARGON2ID.encode(), SECRET)),
            [b"235 2.7.0 Authentication successful"],
        )

    def test_unknownLoginCramCounted(self) -> None:
        """An unknown login trying CRAM-MD5 is a guess at a name: logged and counted as one."""
        session = self.session()
        self.assertEqual(
            self.cram(session, b"nobody@example.test", SECRET),
            [b"535 5.7.8 Authentication credentials invalid"],
        )
        self.assertEqual(
            self.authLines(),
            ["auth failure: client=[192.0.2.1] mechanism=CRAM-MD5 login=<nobody@example.test>"],
        )
        self.assertEqual(self.successResultOf(self.store.total("auth-address:192.0.2.1", 900)), 1)

    def test_suspendedRightPassword(self) -> None:
        """
        A suspended login with the right password gets 535 5.7.8, one
        C{auth suspended:} line, the C{suspended} metric, and is never
        counted as a guess; its wrong password is an ordinary failure.
        """
        session = self.session()
        for _ in range(5):
            self.assertEqual(
                session.command(plainLine(b"bob@example.test", b"bob-secret")),
                [b"535 5.7.8 Authentication credentials invalid"],
            )
        self.assertEqual(self.store.trackedKeys(), 0)
        self.assertEqual(
            self.authLines(),
            ["auth suspended: client=[192.0.2.1] mechanism=PLAIN login=<bob@example.test>"] * 5,
        )
        self.assertEqual(
            (self.metric("PLAIN", "suspended"), self.metric("PLAIN", "failure")), (5, 0)
        )
        self.assertEqual(
            session.command(plainLine(b"bob@example.test", b"wrong")),
            [b"535 5.7.8 Authentication credentials invalid"],
        )
        self.assertEqual(
            self.authLines()[-1],
            "auth failure: client=[192.0.2.1] mechanism=PLAIN login=<bob@example.test>",
        )
        self.assertEqual(self.metric("PLAIN", "failure"), 1)

    def secondsTo535(self, session: Session, send) -> float:
        """
        C{send(session)}, then advance the clock until the 535 comes; the
        seconds it took (C{send} returns the replies that came at once).
        """
        waited = 0.0
        replies = send(session)
        while not replies and waited < 60:
            self.clock.advance(0.25)
            waited += 0.25
            replies = session.read()
        self.assertEqual(replies, [b"535 5.7.8 Authentication credentials invalid"])
        return waited

    def counts(self, login: str) -> list:
        return [
            self.successResultOf(self.store.total(key, 900))
            for key in ("auth-address:192.0.2.1", f"auth-login:{login}")
        ]

    def test_notAGuessAnsweredAsLateAsAGuess(self) -> None:
        """
        Once wrong passwords have piled up, the next waits in the tarpit;
        the right password of a suspended login waits just as long as a
        wrong one would then, and so does a mechanism the login's scheme
        cannot do: a quicker 535 would confirm a suspended login's
        password, or that a login exists. Neither is counted.
        """
        session = self.session()
        bob = b"bob@example.test"

        def plain(login: bytes, password: bytes):
            return lambda s: s.command(plainLine(login, password))

        wrong = [self.secondsTo535(session, plain(bob, b"wrong")) for _ in range(3)]
        self.assertEqual(wrong, [0.0, 0.0, 2.0])  # the third reaches maxPerLogin
        before = self.counts("bob@example.test")
        suspended = self.secondsTo535(session, plain(bob, b"bob-secret"))
        self.assertEqual(self.counts("bob@example.test"), before)
        self.assertEqual((suspended, self.secondsTo535(session, plain(bob, b"wrong"))), (4.0, 4.0))

        argon = ARGON2ID.encode()
        wrong = [self.secondsTo535(session, plain(argon, b"wrong")) for _ in range(3)]
        self.assertEqual(wrong, [0.0, 2.0, 4.0])  # the address's count matters too now
        before = self.counts(ARGON2ID)
        unusable = self.secondsTo535(session, lambda s: self.cram(s, argon, SECRET))
        self.assertEqual(self.counts(ARGON2ID), before)
        self.assertEqual((unusable, self.secondsTo535(session, plain(argon, b"wrong"))), (6.0, 6.0))

    def test_outsideAllowNetsCounted(self) -> None:
        """
        The right password of a login restricted to 10.0.0.0/8, from
        192.0.2.1, gets the 535 of a wrong password, is counted as one (per
        address and per login, and in the metric), and is logged with why;
        from inside the network it logs in.
        """
        self.users.users["far@example.test"] = User(
            "far@example.test",
            passwords.parse("{PLAIN}far-secret"),
            allowNets=Networks.parse("10.0.0.0/8"),
        )
        session = self.session()
        self.assertEqual(
            session.command(plainLine(b"far@example.test", b"far-secret")),
            [b"535 5.7.8 Authentication credentials invalid"],
        )
        self.assertEqual(self.counts("far@example.test"), [1, 1])
        self.assertEqual(self.metric("PLAIN", "failure"), 1)
        self.assertEqual(
            self.authLines(),
            [
                "auth refused: client=[192.0.2.1] mechanism=PLAIN login=<far@example.test>: "
                "allow_nets check failed: IP 192.0.2.1 not in allowed networks",
                "auth failure: client=[192.0.2.1] mechanism=PLAIN login=<far@example.test>",
            ],
        )
        self.assertNotIn("far-secret", " ".join(self.log.messages))
        session = self.session("10.0.0.5")
        self.assertEqual(
            session.command(plainLine(b"far@example.test", b"far-secret")),
            [b"235 2.7.0 Authentication successful"],
        )

    def test_resultsMetric(self) -> None:
        """Success, failure and a database that cannot answer are each counted by mechanism."""
        session = self.session()
        session.command(plainLine(b"nobody@example.test", b"x"))
        self.users.available = False
        self.assertEqual(
            session.command(plainLine(b"nobody@example.test", b"x")),
            [b"454 4.7.0 Temporary authentication failure"],
        )
        self.users.available = True
        session.command(plainLine(b"alice.plain@example.test", SECRET))
        self.assertEqual(
            [self.metric("PLAIN", r) for r in ("success", "failure", "unavailable")], [1, 1, 1]
        )
        self.flushLoggedErrors()
