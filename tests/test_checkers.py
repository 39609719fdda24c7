"""The credentials checkers: Deferreds (never coroutines), equal work for unknown users."""

from __future__ import annotations

import hmac

from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.internet import defer
from twisted.trial import unittest

from mailauth import passwords
from mailauth.checkers import CramMD5Checker, PasswordChecker
from mailauth.sasl import CramMD5Credentials, PlaintextCredentials
from mailauth.threads import PoolBusy
from tests.fakes import MemoryUserDatabase

USERS = {
    "alice@example.test": passwords.makeHash(b"secret", "SHA256-CRYPT"),
    "cram@example.test": passwords.makeHash(b"secret", "CRAM-MD5"),
    "plain@example.test": "{PLAIN}secret",
}


class RecordingRunner:
    """Runs the work at once, recording that it went through the pool."""

    def __init__(self) -> None:
        self.calls = 0
        self.busy = False

    def __call__(self, f, *args):
        self.calls += 1
        if self.busy:
            return defer.fail(PoolBusy("full"))
        return defer.maybeDeferred(f, *args)


class PasswordCheckerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.run = RecordingRunner()
        self.users = MemoryUserDatabase(dict(USERS))
        self.checker = PasswordChecker(self.users, self.run)

    def check(self, login: str, password: bytes):
        return self.checker.requestAvatarId(PlaintextCredentials(login, password, "PLAIN"))

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
        self.assertEqual(self.successResultOf(self.check("Alice@example.test", b"secret")),
                         "alice@example.test")
        self.assertEqual(self.run.calls, 1)

    def test_unknownUserCostsAVerification(self) -> None:
        """An unknown user still runs one (dummy) verification in the pool."""
        calls = []
        self.patch(passwords, "dummyVerify", lambda pw: calls.append(pw))
        self.failureResultOf(self.check("nobody@example.test", b"x"), UnauthorizedLogin)
        self.assertEqual((calls, self.run.calls), ([b"x"], 1))

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


class CramMD5CheckerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.checker = CramMD5Checker(MemoryUserDatabase(dict(USERS)), RecordingRunner())

    def check(self, login: str, password: bytes, challenge=b"<1.2@mx>"):
        digest = hmac.new(password, challenge, "md5").hexdigest().encode()
        return self.checker.requestAvatarId(CramMD5Credentials(login, challenge, digest))

    def test_cramUser(self) -> None:
        """A user stored as CRAM-MD5 logs in with the right digest."""
        self.assertEqual(self.successResultOf(self.check("cram@example.test", b"secret")),
                         "cram@example.test")

    def test_plainUser(self) -> None:
        """A user stored in plaintext can use CRAM-MD5."""
        self.assertEqual(self.successResultOf(self.check("plain@example.test", b"secret")),
                         "plain@example.test")

    def test_wrongDigest(self) -> None:
        """A wrong digest fails."""
        self.failureResultOf(self.check("cram@example.test", b"nope"), UnauthorizedLogin)

    def test_hashedUserRefused(self) -> None:
        """A user with a one-way hash gets the ordinary failure, even with the right password."""
        self.failureResultOf(self.check("alice@example.test", b"secret"), UnauthorizedLogin)

    def test_returnsDeferred(self) -> None:
        """requestAvatarId returns a Deferred (D36)."""
        result = self.check("x@example.test", b"x")
        self.assertIsInstance(result, defer.Deferred)
        self.failureResultOf(result, UnauthorizedLogin)
