"""Credentials checkers over the user database; every verification runs in a thread."""

from __future__ import annotations

import hmac

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.internet import defer
from zope.interface import implementer

from mailauth import passwords, scram
from mailauth.interfaces import BlockingRunner, IUserDatabase
from mailauth.sasl import MechanismUnavailable
from mailauth.threads import PoolBusy
from mailauth.userdb import UserDatabaseUnavailable


def _unavailable(f):
    f.trap(UserDatabaseUnavailable)
    raise LoginFailed(f"user database unavailable: {f.getErrorMessage()}")


def _result(ok: bool, user):
    if not ok:
        raise UnauthorizedLogin()
    return user.login.lower()


def _busy(f):
    f.trap(PoolBusy)
    raise LoginFailed(f"too many logins waiting: {f.getErrorMessage()}")


class _UserDatabaseChecker:
    """Looks the user up, then verifies in the auth pool."""

    def __init__(self, users: IUserDatabase, runBlocking: BlockingRunner) -> None:
        self.users = users
        self.runBlocking = runBlocking

    def requestAvatarId(self, credentials) -> defer.Deferred:
        d = self.users.lookup(credentials.username)
        d.addErrback(_unavailable)
        d.addCallback(self._verify, credentials)
        return d

    @staticmethod
    def verify(user, credentials) -> bool:
        """Blocking: whether C{credentials} are right for C{user} (L{None}: unknown)."""
        raise NotImplementedError()

    def _verify(self, user, credentials) -> defer.Deferred:
        d = self.runBlocking(self.verify, user, credentials)
        d.addErrback(_busy)
        d.addCallback(_result, user)
        return d


@implementer(ICredentialsChecker)
class PasswordChecker(_UserDatabaseChecker):
    """
    PLAIN and LOGIN: the password against the stored hash, in the auth pool.
    An unknown user costs one dummy verification of the default scheme, so
    its failure takes as long as a wrong password's.
    """

    credentialInterfaces = (IUsernamePassword,)

    @staticmethod
    def verify(user, credentials) -> bool:
        if user is None:
            passwords.dummyVerify(credentials.password)
            return False
        return passwords.verify(user.password, credentials.password)


@implementer(ICredentialsChecker)
class CramMD5Checker(_UserDatabaseChecker):
    """
    CRAM-MD5: works for users stored as CRAM-MD5 (Dovecot's HMAC-MD5
    context) or as plaintext; anyone else gets the ordinary failure.
    The digests are compared in constant time.
    """

    credentialInterfaces = (IUsernameHashedPassword,)

    @staticmethod
    def verify(user, credentials) -> bool:
        expected = None
        if user is not None:
            expected = passwords.cramMD5Digest(user.password, credentials.challenge)
        if expected is None:
            hmac.compare_digest(b"0" * 32, credentials.response)
            return False
        return hmac.compare_digest(expected, credentials.response)


@implementer(ICredentialsChecker)
class ScramChecker:
    """
    SCRAM: the mechanism checked the client's proof (in constant time,
    L{mailauth.scram.ScramKeys.proofValid}); this looks the user up again
    and accepts a verified proof only for the keys the user has now. A
    user whose password is stored in another scheme is refused with
    L{MechanismUnavailable}, which the session does not count as a guess.
    No work here blocks, so nothing goes to the auth pool.
    """

    credentialInterfaces = (scram.IScramCredentials,)

    def __init__(self, users: IUserDatabase) -> None:
        self.users = users

    def requestAvatarId(self, credentials) -> defer.Deferred:
        d = self.users.lookup(credentials.username)
        d.addErrback(_unavailable)
        d.addCallback(self._check, credentials)
        return d

    @staticmethod
    def _check(user, credentials) -> str:
        if user is None:
            raise UnauthorizedLogin()
        keys = scram.storedKeys(user.password, credentials.scheme)
        if keys is None:
            raise MechanismUnavailable(
                f"{credentials.mechanism} cannot verify a password stored as {user.password.scheme}"
            )
        if not (credentials.verified and keys.same(credentials.keys)):
            raise UnauthorizedLogin()
        # A suspended login fails even with the right proof.
        return _result(not user.suspended, user)
