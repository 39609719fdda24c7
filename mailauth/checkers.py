"""Credentials checkers over the user database; every verification runs in a thread."""

from __future__ import annotations

import hmac
from typing import Any, Optional, Union

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailauth import apppasswords, passwords, scram
from mailauth.apppasswords import AppPassword
from mailauth.interfaces import BlockingRunner, IUserDatabase
from mailauth.sasl import IBearerToken, MechanismUnavailable, TokenRefused
from mailauth.threads import PoolBusy
from mailauth.userdb import User, UserDatabaseUnavailable

log = Logger(namespace="mailauth.checkers")


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


class AppPasswordLogin(str):
    """
    The avatar ID of a login made with one of the user's app passwords: the
    login itself (so every part that takes a login string takes it), which
    also names the app password used, for the log and the C{Received:}
    header.

    @ivar appPassword: the app password's label.
    """

    appPassword: str

    def __new__(cls, login: str, label: str) -> AppPasswordLogin:
        self = super().__new__(cls, login)
        self.appPassword = label
        return self


@implementer(ICredentialsChecker)
class PasswordChecker(_UserDatabaseChecker):
    """
    PLAIN and LOGIN: the password against the stored hash, in the auth pool;
    a password shaped like an app password is also tried against the one
    app password of the user that starts like it (L{AppPassword.prefix}).
    An unknown user costs the same dummy verifications, so its failure
    takes as long as a wrong password's.

    @ivar appPasswordUse: records each app password's use, or L{None}.
    @ivar rehasher: rehashes outdated password hashes after a login with
        them (C{[auth] rehash}), or L{None}.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        users: IUserDatabase,
        runBlocking: BlockingRunner,
        appPasswordUse: Any = None,
        rehasher: Any = None,
    ) -> None:
        super().__init__(users, runBlocking)
        self.appPasswordUse = appPasswordUse
        self.rehasher = rehasher

    @staticmethod
    def match(user: Optional[User], credentials) -> Union[bool, AppPassword]:
        """
        Blocking: which secret of C{user} (L{None}: unknown) the password is.

        @return: the L{AppPassword} it is, else whether it is the user's own.
        """
        candidate = apppasswords.normalise(credentials.password)
        if candidate is not None:
            app = user.appPassword(apppasswords.prefixOf(candidate)) if user else None
            if app is None:
                passwords.dummyVerify(candidate)
            elif passwords.verify(app.password, candidate):
                return app
        if user is None:
            passwords.dummyVerify(credentials.password)
            return False
        return passwords.verify(user.password, credentials.password)

    def _verify(self, user, credentials) -> defer.Deferred:
        d = self.runBlocking(self.match, user, credentials)
        d.addErrback(_busy)
        d.addCallback(self._verified, user, credentials)
        return d

    def _verified(self, match: Union[bool, AppPassword], user: User, credentials) -> str:
        login = _result(bool(match), user)
        if isinstance(match, AppPassword):
            if self.appPasswordUse is not None:
                self.appPasswordUse.record(login, match)
            return AppPasswordLogin(login, match.label)
        if self.rehasher is not None:
            self.rehasher.consider(user, credentials.password)
        return login


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
class OAuthChecker:
    """
    OAUTHBEARER and XOAUTH2: C{tokens} (a L{mailauth.oauth.TokenVerifier})
    checks the token and says which login it names; that login must exist
    in the user database (it carries the sending limits and sender rights)
    and be the one the client named, if it named one. Every refusal is a
    L{TokenRefused}, logged with its reason (never the token).
    """

    credentialInterfaces = (IBearerToken,)

    def __init__(self, users: IUserDatabase, tokens: Any) -> None:
        self.users = users
        self.tokens = tokens

    def requestAvatarId(self, credentials) -> defer.Deferred:
        d = self.tokens.login(credentials.token)
        d.addCallback(self._named, credentials)
        d.addErrback(self._refused, credentials)
        return d

    def _named(self, login: str, credentials) -> defer.Deferred:
        if credentials.username and credentials.username.lower() != login:
            raise TokenRefused(f"the token is for <{login}>", discovery=self.tokens.discovery)
        d = self.users.lookup(login)
        d.addErrback(_unavailable)
        d.addCallback(self._found, login)
        return d

    def _found(self, user: Optional[User], login: str) -> str:
        if user is None:
            raise TokenRefused(f"the token names <{login}>, who is not a user here",
                               discovery=self.tokens.discovery)
        return _result(True, user)

    @staticmethod
    def _refused(f, credentials):
        if f.check(TokenRefused):
            log.info(
                "OAuth token refused: mechanism={mechanism} login=<{login}>: {why}",
                mechanism=credentials.mechanism, login=credentials.username, why=f.value.why,
            )
        return f


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
