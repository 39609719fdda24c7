"""Credentials checkers over the user database; every verification runs in a thread."""

from __future__ import annotations

import hmac
from typing import Optional

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.internet import defer
from zope.interface import implementer

from mailauth import passwords, scram
from mailauth.interfaces import BlockingRunner, IUserDatabase
from mailauth.sasl import MechanismUnavailable
from mailauth.threads import PoolBusy
from mailauth.userdb import User, UserDatabaseUnavailable


class LoginSuspended(UnauthorizedLogin):
    """
    The right credentials of a suspended login: the client is answered as
    for a wrong password, but the session logs it as suspended and never
    counts it as a guess.
    """


# What the blocking part of a check found. A check that is not RIGHT, or
# whose user is suspended, answers 535.
RIGHT = "right"
WRONG = "wrong"
UNAVAILABLE = "unavailable"


def _unavailable(f):
    f.trap(UserDatabaseUnavailable)
    raise LoginFailed(f"user database unavailable: {f.getErrorMessage()}")


def _result(ok: bool, user):
    if not ok:
        raise UnauthorizedLogin()
    if user.suspended:
        raise LoginSuspended()
    return user.login.lower()


def _busy(f):
    f.trap(PoolBusy)
    raise LoginFailed(f"too many logins waiting: {f.getErrorMessage()}")


def _verdict(found: str, user: Optional[User], mechanism: str):
    """The avatar ID for a RIGHT check, else the failure the session answers."""
    if found == UNAVAILABLE:
        assert user is not None
        raise MechanismUnavailable(
            f"{mechanism} cannot verify a password stored as {user.password.scheme}"
        )
    return _result(found == RIGHT, user)


class _UserDatabaseChecker:
    """
    Looks the user up, then checks the credentials in the auth pool.

    Every check that ends in a 535 (unknown login, wrong password, a
    mechanism the stored scheme cannot do, a suspended login) spends at
    least one verification of the default scheme at its default cost
    (L{passwords.dummyVerify}) before it answers: the verification it made,
    if that was one, else a dummy one. So no failure comes sooner than an
    unknown login's, whatever the stored scheme, and on a loaded machine
    both slow down alike: nothing is measured, the same work is done.
    """

    def __init__(self, users: IUserDatabase, runBlocking: BlockingRunner) -> None:
        self.users = users
        self.runBlocking = runBlocking

    def requestAvatarId(self, credentials) -> defer.Deferred:
        d = self.users.lookup(credentials.username)
        d.addErrback(_unavailable)
        d.addCallback(self._verify, credentials)
        return d

    def _verify(self, user: Optional[User], credentials) -> defer.Deferred:
        d = self.runBlocking(self.check, user, credentials)
        d.addErrback(_busy)
        d.addCallback(_verdict, user, credentials.mechanism)
        return d

    @classmethod
    def check(cls, user: Optional[User], credentials) -> str:
        """
        Blocking: L{RIGHT}, L{WRONG} or L{UNAVAILABLE} for C{credentials}
        against C{user} (L{None}: unknown), having spent at least one
        default-cost verification unless the answer is a success.
        """
        found = cls.verify(user, credentials)
        succeeds = found == RIGHT and user is not None and not user.suspended
        if not succeeds and not cls.verifiedAtDefaultCost(user, found):
            passwords.dummyVerify(cls.secret(credentials))
        return found

    @staticmethod
    def verify(user: Optional[User], credentials) -> str:
        """Blocking: L{RIGHT}, L{WRONG} or L{UNAVAILABLE} (L{WRONG} for an unknown user)."""
        raise NotImplementedError()

    @staticmethod
    def verifiedAtDefaultCost(user: Optional[User], found: str) -> bool:
        """Whether L{verify} just spent a default-cost verification on C{user}."""
        return False

    @staticmethod
    def secret(credentials) -> bytes:
        """What the client sent as its secret, for the dummy verification."""
        raise NotImplementedError()


@implementer(ICredentialsChecker)
class PasswordChecker(_UserDatabaseChecker):
    """
    PLAIN and LOGIN: the password against the stored hash, in the auth pool.
    An unknown user costs one dummy verification of the default scheme, so
    its failure takes as long as a wrong password's.
    """

    credentialInterfaces = (IUsernamePassword,)

    @staticmethod
    def verify(user: Optional[User], credentials) -> str:
        if user is None:
            return WRONG
        return RIGHT if passwords.verify(user.password, credentials.password) else WRONG

    @staticmethod
    def verifiedAtDefaultCost(user: Optional[User], found: str) -> bool:
        return user is not None and passwords.costsAsMuchAsDummy(user.password)

    @staticmethod
    def secret(credentials) -> bytes:
        return credentials.password


@implementer(ICredentialsChecker)
class CramMD5Checker(_UserDatabaseChecker):
    """
    CRAM-MD5: works for users stored as CRAM-MD5 (Dovecot's HMAC-MD5
    context) or as plaintext. Anyone else gets the ordinary failure, as
    L{MechanismUnavailable}: the client's choice of a mechanism we offered
    says nothing about the password, so it is never counted as a guess. An
    unknown login is a guess at a name, and counts. The digests are compared
    in constant time.
    """

    credentialInterfaces = (IUsernameHashedPassword,)

    @staticmethod
    def verify(user: Optional[User], credentials) -> str:
        expected = None
        if user is not None:
            expected = passwords.cramMD5Digest(user.password, credentials.challenge)
        if expected is None:
            hmac.compare_digest(b"0" * 32, credentials.response)
            return WRONG if user is None else UNAVAILABLE
        return RIGHT if hmac.compare_digest(expected, credentials.response) else WRONG

    @staticmethod
    def secret(credentials) -> bytes:
        return credentials.response


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
        # A suspended login fails even with the right proof (LoginSuspended).
        return _result(True, user)
