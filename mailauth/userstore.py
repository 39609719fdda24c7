"""
The user store that C{[auth] users} names, the users file
(L{UsersFileStore}) or PostgreSQL, behind one interface; and the two edits
the daemon makes after a login: recording an app password's use, and
rehashing a password to today's scheme.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailauth import apppasswords, passwords, userdb
from mailauth.addresses import normalise
from mailauth.apppasswords import AppPassword
from mailauth.interfaces import BlockingRunner, IAccountStore, IUserStore
from mailauth.passwords import PasswordHash
from mailauth.pgusers import PostgreSQLUserStore, isPostgreSQL, redact
from mailauth.userdb import User

log = Logger(namespace="mailauth.userstore")


@implementer(IUserStore, IAccountStore)
class UsersFileStore:
    """
    Edits of the users file at C{path}, through L{mailauth.userdb}'s atomic,
    locked functions.

    Suspension is Dovecot's C{nologin} extra field and each app password a
    C{mailauth_app=} extra field of the user's line (docs/accounts.rst);
    when each app password was last used is kept apart, in the file
    C{lastUsedPath} (under C{[server] state_dir}), so that a login never
    rewrites the users file.

    @ivar creating: whether a users file that does not exist yet counts as
        one without users (when adding: L{addUser} makes it), rather than
        as an error.
    @ivar lastUsedPath: the file of last uses, or L{None} when unknown (the
        command line given only C{--users}): uses are then neither shown
        nor recorded.
    """

    def __init__(
        self, path: str, creating: bool = False, lastUsedPath: Optional[str] = None
    ) -> None:
        self.path = path
        self.creating = creating
        self.lastUsedPath = lastUsedPath

    # -- IUserStore --------------------------------------------------------

    def addUser(self, login: str, hashString: str) -> None:
        userdb.addUser(self.path, login, hashString)

    def setPassword(self, login: str, hashString: str) -> None:
        userdb.setPassword(self.path, login, hashString)

    def deleteUser(self, login: str) -> None:
        userdb.deleteUser(self.path, login)

    def hasUser(self, login: str) -> bool:
        try:
            return userdb.hasUser(self.path, login)
        except userdb.UserDatabaseError:
            if self.creating and not os.path.lexists(self.path):
                return False
            raise

    def listUsers(self) -> list[tuple[str, str]]:
        return userdb.listUsers(self.path)

    def setSuspended(self, login: str, suspended: bool) -> None:
        userdb.setSuspended(self.path, login, suspended)

    # -- IAccountStore -----------------------------------------------------

    @property
    def usesKnown(self) -> bool:
        return self.lastUsedPath is not None

    def addAppPassword(
        self, login: str, label: str, hashString: str, created: int, prefix: str
    ) -> None:
        userdb.addAppPassword(self.path, login, label, hashString, created, prefix)

    def deleteAppPassword(self, login: str, label: str) -> None:
        userdb.deleteAppPassword(self.path, login, label)

    def listAppPasswords(self, login: str) -> list[tuple[AppPassword, Optional[float]]]:
        user = self._user(login)
        used = apppasswords.readLastUsed(self.lastUsedPath) if self.lastUsedPath else {}
        return [
            (app, used.get((user.login, app.label, app.created)))
            for app in sorted(user.appPasswords, key=lambda app: app.created)
        ]

    def appPasswordUsed(self, login: str, app: Any, when: float) -> None:
        if self.lastUsedPath is not None:
            apppasswords.recordLastUsed(self.lastUsedPath, login, app, when)

    def listAccounts(self) -> list[User]:
        return userdb.readUsers(self.path)

    def upgradePassword(self, login: str, verified: Any, hashString: str) -> bool:
        return userdb.replacePassword(self.path, login, verified, hashString)

    def _user(self, login: str) -> User:
        # Found as the edits and the daemon find it: in any case, quoting
        # and form of its domain (A- or U-labels).
        key = normalise(login)
        for user in userdb.readUsers(self.path):
            if normalise(user.login) == key:
                return user
        raise userdb.UserDatabaseError(f"no user {login} in {self.path}")


def storeFor(users: str, creating: bool = False, lastUsedPath: Optional[str] = None) -> Any:
    """
    @param users: the C{[auth] users} value: a users file, or a
        C{postgresql://} URI.
    @param creating: a users file may be missing (see L{UsersFileStore}).
    @param lastUsedPath: where a users file's app password uses are kept
        (see L{UsersFileStore}); a database keeps them itself.
    @return: the store to edit the users in: an L{IUserStore} and an
        L{IAccountStore}.
    """
    if isPostgreSQL(users):
        return PostgreSQLUserStore(users)
    return UsersFileStore(users, creating, lastUsedPath)


def describe(users: str) -> str:
    """@return: how to name C{users} in messages: the path, or the URI without its password."""
    return redact(users) if isPostgreSQL(users) else users


# -- what the daemon writes after a login ------------------------------------


class AppPasswordUse:
    """
    Records each app password's use through an L{IAccountStore}, off the
    reactor, at most once per L{INTERVAL} per app password: a client that
    logs in every few seconds costs one write a minute, not one a login.
    """

    INTERVAL = 60.0

    def __init__(self, store: IAccountStore, runBlocking: BlockingRunner, clock) -> None:
        self.store = store
        self.runBlocking = runBlocking
        self.clock = clock
        self._recorded: dict[tuple, float] = {}

    def record(self, login: str, app: AppPassword) -> Optional[defer.Deferred]:
        """
        Note that C{login} logged in with C{app} now.

        @return: the Deferred of the write (which never fails: a failure is
            logged), or L{None} if none was needed.
        """
        now = self.clock.seconds()
        key = (login.lower(), app.label, app.created)
        last = self._recorded.get(key)
        if last is not None and now - last < self.INTERVAL:
            return None
        self._recorded[key] = now
        d = self.runBlocking(self.store.appPasswordUsed, login.lower(), app, now)
        d.addErrback(
            lambda f: log.error(
                "Cannot record the use of app password {label} of <{login}>: {why}",
                label=app.label,
                login=login,
                why=f.getErrorMessage(),
            )
        )
        return d


def schemesNeededBy(mechanisms: Iterable[str]) -> frozenset[str]:
    """
    The password schemes that the offered challenge mechanisms read, which a
    rehash must keep: CRAM-MD5 reads L{passwords.CRAM_MD5_SCHEMES} (the
    plaintext ones too), SCRAM-SHA-1 and SCRAM-SHA-256 (with or without
    C{-PLUS}) their own stored keys.
    """
    keep: set[str] = set()
    for name in mechanisms:
        if name == "CRAM-MD5":
            keep.update(passwords.CRAM_MD5_SCHEMES)
        elif name.startswith("SCRAM-"):
            keep.add(name.removesuffix("-PLUS"))
    return frozenset(keep)


class Rehasher:
    """
    C{[auth] rehash = yes}: after a login with a user's own password (PLAIN
    or LOGIN), if its stored hash is outdated (L{passwords.needsRehash}),
    store the ARGON2ID hash of the password just verified, off the reactor,
    through L{IAccountStore.upgradePassword} (the users file's lock and
    atomic replacement; an C{UPDATE} for a database). Schemes that an
    offered challenge mechanism needs (C{keep}, L{schemesNeededBy}) are
    left alone. Each login is tried, and logged, once per process.
    """

    def __init__(
        self, store: IAccountStore, runBlocking: BlockingRunner, keep: frozenset[str]
    ) -> None:
        self.store = store
        self.runBlocking = runBlocking
        self.keep = keep
        self._tried: set[str] = set()

    def wanted(self, stored: PasswordHash) -> bool:
        """Whether a user whose password is stored as C{stored} would be rehashed."""
        return stored.scheme not in self.keep and passwords.needsRehash(stored)

    def consider(self, user: User, password: bytes) -> Optional[defer.Deferred]:
        """
        C{user} just logged in with C{password}, its own: rehash it if it
        is due.

        @return: the Deferred of the rehash (which never fails: the outcome
            is logged), or L{None} if there is none.
        """
        if user.login in self._tried or not self.wanted(user.password):
            return None
        self._tried.add(user.login)
        d = self.runBlocking(self._rehash, user.login, user.password, password)
        d.addCallbacks(self._done, self._failed, callbackArgs=(user,), errbackArgs=(user,))
        return d

    def _rehash(self, login: str, verified: PasswordHash, password: bytes) -> bool:
        hashString = passwords.makeHash(password, passwords.DEFAULT_SCHEME)
        return self.store.upgradePassword(login, verified, hashString)

    def _done(self, stored: bool, user: User) -> None:
        if stored:
            log.info(
                "Rehashed the password of <{login}> from {scheme} to {new}",
                login=user.login,
                scheme=user.password.scheme,
                new=passwords.DEFAULT_SCHEME,
            )
        else:
            log.info(
                "Did not rehash the password of <{login}>: it was changed since the login",
                login=user.login,
            )

    def _failed(self, f, user: User) -> None:
        log.error(
            "Cannot rehash the password of <{login}> to {new}: {why}",
            login=user.login,
            new=passwords.DEFAULT_SCHEME,
            why=f.getErrorMessage(),
        )
