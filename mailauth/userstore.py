"""The user store that C{[auth] users} names: the users file or PostgreSQL, behind one interface."""

from __future__ import annotations

import os

from zope.interface import implementer

from mailauth import userdb
from mailauth.interfaces import IUserStore
from mailauth.pgusers import PostgreSQLUserStore, isPostgreSQL, redact


@implementer(IUserStore)
class UsersFileStore:
    """
    Edits of the users file at C{path}, through L{mailauth.userdb}'s atomic,
    locked functions.

    @ivar creating: whether a users file that does not exist yet counts as
        one without users (when adding: L{addUser} makes it), rather than
        as an error.
    """

    def __init__(self, path: str, creating: bool = False) -> None:
        self.path = path
        self.creating = creating

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
        """
        Not done yet: the users file has no place for a suspension until
        L{mailauth.userdb} gives it one.

        @raise UserDatabaseError: always, saying so.
        """
        raise userdb.UserDatabaseError(
            f"{self.path}: the users file cannot record suspensions yet;"
            " use a postgresql:// user database"
        )


def storeFor(users: str, creating: bool = False) -> IUserStore:
    """
    @param users: the C{[auth] users} value: a users file, or a
        C{postgresql://} URI.
    @param creating: a users file may be missing (see L{UsersFileStore}).
    @return: the store to edit the users in.
    """
    if isPostgreSQL(users):
        return PostgreSQLUserStore(users)
    return UsersFileStore(users, creating)


def describe(users: str) -> str:
    """@return: how to name C{users} in messages: the path, or the URI without its password."""
    return redact(users) if isPostgreSQL(users) else users
