"""The users file (Dovecot's passwd-file format): parsing, reloading and atomic edits."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from typing import Callable, Iterator, Optional

import attrs
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from mailauth.passwords import PLAINTEXT_SCHEMES, PasswordHash, parse

log = Logger()

FILE_MODE = 0o640


@attrs.frozen
class User:
    """
    One user of the users file.

    @ivar login: the login, lower-cased: logins are compared without regard
        to case, so this is the one spelling the rest of mailauth sees.
    @ivar lineno: the line of the users file it came from (L{None} for a
        database that has no lines).
    @ivar suspended: the login is suspended: the right password still
        fails (with its own log line, never counted as a guess).
    """

    login: str
    password: PasswordHash
    lineno: Optional[int] = None
    suspended: bool = False


class UserDatabaseUnavailable(Exception):
    """The users file has never been read successfully, so no login can be checked."""


class UserDbError(Exception):
    """An edit of the users file was refused or failed; the message says why."""


class IUserDatabase(Interface):
    """
    The users, as the server reads them: in memory, so every lookup is a
    dictionary read that may run on the reactor thread. Logins are
    case-insensitive.
    """

    problems = Attribute('C{"PATH:LINENO: message"} for every line the last load skipped.')

    def load() -> None:
        """
        Read the users now. If that fails, keep the users read before and
        log why; never raise.
        """

    def maybeReload() -> bool:
        """
        Read the users again if they have changed since last read.

        @return: whether they were read again.
        """

    def lookup(login: str) -> Optional[User]:
        """
        @return: the user C{login} (in any case), or L{None}.
        @raise UserDatabaseUnavailable: if the users were never read.
        """

    def exists(login: str) -> bool:
        """
        @return: whether there is a user C{login} (in any case).
        @raise UserDatabaseUnavailable: if the users were never read.
        """

    def logins() -> list:
        """
        @return: every login, lower-cased and sorted.
        @raise UserDatabaseUnavailable: if the users were never read.
        """


def _splitLine(line: str) -> Optional[list[str]]:
    """
    The colon-separated fields of a user line, or L{None} for a comment or
    blank line.
    """
    line = line.rstrip("\r")
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    return line.split(":")


def parseUsers(text: str, path: str) -> tuple[dict[str, User], list[str]]:
    """
    Parse the text of a users file.

    Each line is C{login:{SCHEME}hash[:uid:gid:gecos:home:shell:extra]}; the
    fields after the hash are Dovecot's and are ignored here. A malformed
    line is skipped, never fatal for the others; of two lines for one login
    (compared without regard to case) the first wins.

    @param path: names the file in problems.
    @return: the users by lower-cased login, in file order, and a
        C{"PATH:LINENO: message"} line for each skipped line.
    """
    users: dict[str, User] = {}
    problems = []
    for lineno, line in enumerate(text.split("\n"), 1):
        fields = _splitLine(line)
        if fields is None:
            continue
        if len(fields) < 2:
            problems.append(f"{path}:{lineno}: no ':' after the login")
            continue
        login = fields[0].lower()
        if not login:
            problems.append(f"{path}:{lineno}: empty login")
            continue
        if re.search(r"\s", login):
            problems.append(f"{path}:{lineno}: the login contains white space")
            continue
        if login in users:
            problems.append(
                f"{path}:{lineno}: duplicate login {login} (first on line "
                f"{users[login].lineno}); this line is ignored"
            )
            continue
        try:
            password = parse(fields[1])
        except ValueError as e:
            problems.append(f"{path}:{lineno}: {login}: {e}")
            continue
        users[login] = User(login, password, lineno)
    return users, problems


def _readText(f) -> str:
    # surrogateescape: a password in a file that is not UTF-8 still works.
    return f.read().decode("utf-8", "surrogateescape")


def _stamp(st: os.stat_result) -> tuple:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@implementer(IUserDatabase)
class UserDatabase:
    """
    The users file at C{path}, read into memory by L{load} and re-read by
    L{maybeReload} when it changes (the server calls that periodically and on
    SIGHUP). Logins are looked up without regard to case: keys are stored
    lower-cased.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []
        self._users: Optional[dict[str, User]] = None
        # What the file looked like when last read: (mtime_ns, size, inode),
        # or the error that stopped us reading it, so that it is logged once.
        self._stamp: Optional[tuple] = None

    def load(self) -> None:
        self._read()

    def _read(self) -> bool:
        """
        Read the users now.

        @return: whether they could be read.
        """
        try:
            with open(self.path, "rb") as f:
                stamp = _stamp(os.fstat(f.fileno()))
                text = _readText(f)
        except OSError as e:
            self._failed(e)
            return False
        users, problems = parseUsers(text, self.path)
        self._users, self.problems, self._stamp = users, problems, stamp
        for problem in problems:
            log.warn("Users file: skipped {problem}", problem=problem)
        plaintext = [u.login for u in users.values() if u.password.scheme in PLAINTEXT_SCHEMES]
        if plaintext:
            log.warn(
                "Users file {path}: {count} user(s) with plaintext passwords: {logins};"
                " set a hashed one with 'mailauth user passwd'",
                path=self.path,
                count=len(plaintext),
                logins=" ".join(plaintext),
            )
        log.info("Users file {path}: loaded {count} user(s)", path=self.path, count=len(users))
        return True

    def _failed(self, error: OSError) -> None:
        stamp = ("error", error.errno)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        if self._users is None:
            log.error(
                "Cannot read users file {path}: {error}; every login fails for now",
                path=self.path,
                error=error.strerror,
            )
        else:
            log.error(
                "Cannot read users file {path}: {error}; keeping the {count} user(s) read before",
                path=self.path,
                error=error.strerror,
                count=len(self._users),
            )

    def maybeReload(self) -> bool:
        try:
            stamp = _stamp(os.stat(self.path))
        except OSError as e:
            self._failed(e)
            return False
        # After a failure the stamp is the error, so reading is retried (a
        # chmod that fixes it would not change the stamp).
        if stamp == self._stamp:
            return False
        return self._read()

    def _loaded(self) -> dict[str, User]:
        if self._users is None:
            raise UserDatabaseUnavailable(f"the users file {self.path} could not be read")
        return self._users

    def lookup(self, login: str) -> Optional[User]:
        return self._loaded().get(login.lower())

    def exists(self, login: str) -> bool:
        return self.lookup(login) is not None

    def logins(self) -> list[str]:
        return sorted(self._loaded())


# -- editing the file -------------------------------------------------------


def checkLogin(login: str) -> None:
    """
    Refuse a login that cannot be written to the users file or is not an
    address.

    @raise UserDbError: unless C{login} looks like C{local@domain} with no
        white space, control character or colon.
    """
    if not re.fullmatch(r"[^\s:@\x00-\x1f\x7f]+@[^\s:@\x00-\x1f\x7f]+", login) or login.startswith(
        "#"
    ):
        raise UserDbError(
            f"invalid login {login!r}: use a full address (local@domain),"
            " without white space or ':'"
        )


def _checkHash(hashString: str) -> None:
    if re.search(r"[:\x00-\x1f\x7f]", hashString):
        raise UserDbError("the password hash cannot contain ':' or control characters")
    try:
        parse(hashString)
    except ValueError as e:
        raise UserDbError(str(e)) from None


def _lineLogin(line: str) -> Optional[str]:
    fields = _splitLine(line)
    return fields[0].lower() if fields is not None else None


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Serialise edits of C{path} through an exclusive lock on C{path}.lock."""
    try:
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
    except OSError as e:
        raise UserDbError(f"cannot lock {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _readLines(path: str, missingOk: bool = False) -> tuple[list[str], Optional[os.stat_result]]:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            text = _readText(f)
    except FileNotFoundError:
        if missingOk:
            return [], None
        raise UserDbError(f"{path}: no such file") from None
    except OSError as e:
        raise UserDbError(f"cannot read {path}: {e.strerror}") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines, st


def _writeLines(path: str, lines: list[str], old: Optional[os.stat_result]) -> None:
    """
    Replace C{path} by C{lines}, atomically: a temporary file in the same
    directory, fsynced, then renamed over C{path}.
    """
    directory = os.path.dirname(path) or "."
    data = "".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    except OSError as e:
        raise UserDbError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            if old is not None:
                _keepOwner(f.fileno(), old)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise UserDbError(f"cannot write {path}: {e.strerror}") from None
    # Make the rename itself durable; the new file is in place either way.
    with contextlib.suppress(OSError):
        dirfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


def _keepOwner(fd: int, old: os.stat_result) -> None:
    # Only root may give a file away; anyone may keep a group they are in.
    for uid in (old.st_uid, -1):
        try:
            os.fchown(fd, uid, old.st_gid)
            return
        except OSError:
            pass


def _edit(path: str, change: Callable[[list[str]], list[str]], create: bool = False) -> None:
    with _locked(path):
        lines, old = _readLines(path, missingOk=create)
        _writeLines(path, change(lines), old)


def addUser(path: str, login: str, hashString: str) -> None:
    """
    Add a user to the users file at C{path}, creating the file if missing.

    @param hashString: C{{SCHEME}hash}, as L{mailauth.passwords.makeHash} makes.
    @raise UserDbError: if the login or the hash is invalid, or the user exists.
    """
    checkLogin(login)
    _checkHash(hashString)

    def change(lines: list[str]) -> list[str]:
        if _hasLogin(lines, login):
            raise UserDbError(f"user {login} already exists in {path}")
        return lines + [f"{login}:{hashString}"]

    _edit(path, change, create=True)


def setPassword(path: str, login: str, hashString: str) -> None:
    """
    Replace the password hash of C{login} (on every line naming it, even a
    malformed one), keeping the other fields of its line.

    @raise UserDbError: if there is no such user or the hash is invalid.
    """
    _checkHash(hashString)

    def change(lines: list[str]) -> list[str]:
        if not _hasLogin(lines, login):
            raise UserDbError(f"no user {login} in {path}")
        result = []
        for line in lines:
            if _lineLogin(line) == login.lower():
                fields = line.split(":")
                line = ":".join([fields[0], hashString] + fields[2:])
            result.append(line)
        return result

    _edit(path, change)


def deleteUser(path: str, login: str) -> None:
    """
    Remove every line for C{login} from the users file.

    @raise UserDbError: if there is no such user.
    """

    def change(lines: list[str]) -> list[str]:
        if not _hasLogin(lines, login):
            raise UserDbError(f"no user {login} in {path}")
        return [line for line in lines if _lineLogin(line) != login.lower()]

    _edit(path, change)


def _hasLogin(lines: list[str], login: str) -> bool:
    # Even a line that loading would skip as malformed counts.
    return any(_lineLogin(line) == login.lower() for line in lines)


def hasUser(path: str, login: str) -> bool:
    """
    @return: whether the users file names C{login} on some line, even one
        whose hash is malformed (used to fail before asking for a password).
    @raise UserDbError: if the file is missing or cannot be read.
    """
    return _hasLogin(_readLines(path)[0], login)


def listUsers(path: str) -> list[tuple[str, str]]:
    """
    @return: C{(login, scheme)} of every valid user line, in file order.
    @raise UserDbError: if the file cannot be read.
    """
    lines, _ = _readLines(path)
    users, _ = parseUsers("\n".join(lines), path)
    return [(user.login, user.password.scheme) for user in users.values()]
