"""Credentials checkers over the user database; every verification runs in a thread."""

from __future__ import annotations

import hmac
from typing import Any, Optional, Union

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.internet import defer
from zope.interface import implementer

from mailauth import allownets, apppasswords, passwords, scram
from mailauth.addresses import normalise
from mailauth.apppasswords import AppPassword
from mailauth.interfaces import BlockingRunner, ILoginOrigin, IUserDatabase
from mailauth.sasl import IBearerToken, MechanismUnavailable, TokenRefused
from mailauth.threads import PoolBusy
from mailauth.userdb import User, UserDatabaseUnavailable


class RightCredentialsRefused(UnauthorizedLogin):
    """
    Right credentials that do not log in all the same, which the client is
    answered as for wrong ones.

    @ivar login: the login they are right for, which the session logs: a
        bearer token names it, where the client need not.
    @ivar discovery: for a bearer token, the issuer's OpenID configuration
        URL, which a client whose token was refused is told (RFC 7628
        section 3.2.2, L{mailauth.sasl.TokenRefused}): without it the
        error would show that this token was good. L{None} otherwise.
    """

    discovery: Optional[str] = None

    def __init__(self, message: str = "", *, login: str) -> None:
        super().__init__(message)
        self.login = login


class LoginSuspended(RightCredentialsRefused):
    """
    The right credentials of a suspended login: the client is answered as
    for a wrong password, but the session logs it as suspended and never
    counts it as a guess.
    """


class AddressRefused(RightCredentialsRefused):
    """
    The right credentials of a login that may not log in from where the
    client is (Dovecot's C{allow_nets} or C{allow_real_nets}): answered
    and counted as a wrong password, which the client cannot tell it from;
    the session logs why.

    @ivar field: the extra field that refused it.
    @ivar why: what it found, for the log (C{"IP 203.0.113.9 not in allowed
        networks"}).
    """

    def __init__(self, field: str, why: str, *, login: str) -> None:
        super().__init__(f"{field} check failed: {why}", login=login)
        self.field = field
        self.why = why


# What the blocking part of a check found. A check that is not RIGHT, or
# whose user is suspended, answers 535.
RIGHT = "right"
WRONG = "wrong"
UNAVAILABLE = "unavailable"


def _unavailable(f):
    f.trap(UserDatabaseUnavailable)
    raise LoginFailed(f"user database unavailable: {f.getErrorMessage()}")


def _refusal(user: Optional[User], credentials) -> Optional[tuple[str, str]]:
    """
    Why C{user} may not log in from where C{credentials} come from
    (L{allownets.refusal}), or L{None}; credentials that do not say where
    they come from are refused for every user restricted to some networks.
    """
    if user is None:
        return None
    origin = credentials.origin if ILoginOrigin.providedBy(credentials) else None
    return allownets.refusal(user, origin)


def _result(ok: bool, user, refusal: Optional[tuple[str, str]] = None):
    """
    The avatar ID for right credentials of C{user}, unless C{refusal} says
    it may not log in from there, or it is suspended.
    """
    if not ok:
        raise UnauthorizedLogin()
    login = user.login.lower()
    if refusal is not None:
        raise AddressRefused(*refusal, login=login)
    if user.suspended:
        raise LoginSuspended(login=login)
    return login


def _busy(f):
    f.trap(PoolBusy)
    raise LoginFailed(f"too many logins waiting: {f.getErrorMessage()}")


def _verdict(found: str, user: Optional[User], credentials, refusal: Optional[tuple[str, str]]):
    """The avatar ID for a RIGHT check, else the failure the session answers."""
    if found == UNAVAILABLE:
        assert user is not None
        raise MechanismUnavailable(
            f"{credentials.mechanism} cannot verify a password stored as {user.password.scheme}"
        )
    return _result(found == RIGHT, user, refusal)


class _UserDatabaseChecker:
    """
    Looks the user up, then checks the credentials in the auth pool.

    Every check that ends in a 535 (unknown login, wrong password, a
    mechanism the stored scheme cannot do, a suspended login, a login from
    outside its C{allow_nets}) spends at least one verification of the
    default scheme at its default cost
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
        refusal = _refusal(user, credentials)
        d = self.runBlocking(self.check, user, credentials, refusal is None)
        d.addErrback(_busy)
        d.addCallback(_verdict, user, credentials, refusal)
        return d

    @classmethod
    def check(cls, user: Optional[User], credentials, allowed: bool = True) -> str:
        """
        Blocking: L{RIGHT}, L{WRONG} or L{UNAVAILABLE} for C{credentials}
        against C{user} (L{None}: unknown), having spent at least one
        default-cost verification unless the answer is a success.

        @param allowed: the user may log in from where the client is; if
            not, the right password is no success, and costs as much as a
            wrong one.
        """
        found = cls.verify(user, credentials)
        if not _succeeds(found, user, allowed) and not cls.verifiedAtDefaultCost(user, found):
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


def _succeeds(found: str, user: Optional[User], allowed: bool) -> bool:
    """Whether a check that found C{found} logs C{user} in."""
    return found == RIGHT and user is not None and not user.suspended and allowed


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
    An unknown user costs the same verifications, so its failure takes as
    long as a wrong password's.

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

    @classmethod
    def check(cls, user: Optional[User], credentials, allowed: bool = True) -> Any:
        """
        Blocking: the L{AppPassword} of C{user} the password is, else
        L{RIGHT} or L{WRONG} for the user's own password; at least one
        default-cost verification is spent unless it is a success.

        @param allowed: as for L{_UserDatabaseChecker.check}.
        """
        candidate = apppasswords.normalise(credentials.password)
        rightApp = False
        if candidate is not None:
            # One default-cost verification either way, the app password's
            # own (ARGON2ID) or a dummy one, before the user's own password:
            # every app-password-shaped password costs the same.
            app = user.appPassword(apppasswords.prefixOf(candidate)) if user else None
            if app is None:
                passwords.dummyVerify(candidate)
            elif user is not None and passwords.verify(app.password, candidate):
                if _succeeds(RIGHT, user, allowed):
                    return app
                # A right app password that fails (a suspended login, one
                # from outside its allow_nets) goes on to cost what a wrong
                # one does, so that the time taken does not confirm it.
                rightApp = True
        found = cls.verify(user, credentials)
        if not _succeeds(found, user, allowed) and not cls.verifiedAtDefaultCost(user, found):
            passwords.dummyVerify(credentials.password)
        return RIGHT if rightApp else found

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

    def _verify(self, user: Optional[User], credentials) -> defer.Deferred:
        refusal = _refusal(user, credentials)
        d = self.runBlocking(self.check, user, credentials, refusal is None)
        d.addErrback(_busy)
        d.addCallback(self._verified, user, credentials, refusal)
        return d

    def _verified(
        self,
        found: Union[str, AppPassword],
        user: Optional[User],
        credentials,
        refusal: Optional[tuple[str, str]],
    ) -> str:
        if isinstance(found, AppPassword):
            # check() returns one only for a login that succeeds.
            login = _result(True, user)
            if self.appPasswordUse is not None:
                self.appPasswordUse.record(login, found)
            return AppPasswordLogin(login, found.label)
        login = _verdict(found, user, credentials, refusal)
        if self.rehasher is not None:
            self.rehasher.consider(user, credentials.password)
        return login


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
class OAuthChecker:
    """
    OAUTHBEARER and XOAUTH2: C{tokens} (a L{mailauth.oauth.TokenVerifier})
    checks the token and says which login it names; that login must exist
    in the user database (it carries the sending limits and sender rights)
    and be the one the client named, if it named one. Every refusal is a
    L{TokenRefused}, whose reason the session logs (never the token).
    """

    credentialInterfaces = (IBearerToken,)

    def __init__(self, users: IUserDatabase, tokens: Any) -> None:
        self.users = users
        self.tokens = tokens

    def requestAvatarId(self, credentials) -> defer.Deferred:
        d = self.tokens.login(credentials.token)
        d.addCallback(self._named, credentials)
        return d

    def _named(self, login: str, credentials) -> defer.Deferred:
        # The client's login in any spelling the user database finds it by.
        if credentials.username and normalise(credentials.username) != normalise(login):
            raise TokenRefused(f"the token is for <{login}>", discovery=self.tokens.discovery)
        d = self.users.lookup(login)
        d.addErrback(_unavailable)
        d.addCallback(self._found, login, credentials)
        return d

    def _found(self, user: Optional[User], login: str, credentials) -> str:
        if user is None:
            raise TokenRefused(
                f"the token names <{login}>, who is not a user here",
                discovery=self.tokens.discovery,
            )
        try:
            return _result(True, user, _refusal(user, credentials))
        except RightCredentialsRefused as e:
            # A good token of a suspended login, or from outside its
            # allow_nets: the client is told what a refused token gets.
            e.discovery = self.tokens.discovery
            raise


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
        refusal = _refusal(user, credentials)
        if refusal is not None:
            # The mechanism never accepted a proof from there (whatever the
            # password, the client was answered as for a wrong one).
            raise AddressRefused(*refusal, login=user.login.lower())
        if not (credentials.verified and keys.same(credentials.keys)):
            raise UnauthorizedLogin()
        # A suspended login fails even with the right proof (LoginSuspended).
        return _result(True, user)
