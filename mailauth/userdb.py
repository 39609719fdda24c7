"""The users file (Dovecot's passwd-file format): parsing, reloading and atomic edits."""

from __future__ import annotations

import contextlib
import os
import re
from typing import Callable, Iterator, Optional

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailauth import allownets, apppasswords
from mailauth.addresses import normalise
from mailauth.allownets import NetworkListError, Networks
from mailauth.apppasswords import AppPassword, AppPasswordError
from mailauth.durable import ReloadableFile, locked, replaceDurably
from mailauth.interfaces import IReloadable, IUserDatabase
from mailauth.maildir import componentProblem, mailboxProblem
from mailauth.passwords import PLAINTEXT_SCHEMES, PasswordHash, parse

log = Logger(namespace="mailauth.userdb")

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
        fails (with its own log line, never counted as a guess). In the
        users file, Dovecot's C{nologin} extra field.
    @ivar appPasswords: its app passwords, each of which logs it in too.
    @ivar allowNets: where its client must be to log in (Dovecot's
        C{allow_nets}), L{None} for anywhere.
    @ivar allowRealNets: where the connection's own peer (a proxy) must be
        to log in (Dovecot's C{allow_real_nets}), L{None} for anywhere.
    """

    login: str
    password: PasswordHash
    lineno: Optional[int] = None
    suspended: bool = False
    appPasswords: tuple[AppPassword, ...] = ()
    allowNets: Optional[Networks] = None
    allowRealNets: Optional[Networks] = None

    def appPassword(self, prefix: str) -> Optional[AppPassword]:
        """The app password whose L{AppPassword.prefix} is C{prefix}, if any."""
        for app in self.appPasswords:
            if app.prefix == prefix:
                return app
        return None


class UserDatabaseUnavailable(Exception):
    """The users file has never been read successfully, so no login can be checked."""


class UserDatabaseError(Exception):
    """An edit of the users file was refused or failed; the message says why."""


def _splitLine(line: str) -> Optional[list[str]]:
    """
    The colon-separated fields of a user line, or L{None} for a comment or
    blank line.
    """
    line = line.rstrip("\r")
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    return line.split(":")


# Dovecot's passwd-file fields: login, password, uid, gid, gecos, home,
# shell, then the extra fields (space-separated key=value pairs).
_EXTRA = 7

#: The extra field (Dovecot's own) that marks a suspended login: C{nologin},
#: or C{nologin=VALUE}; Dovecot then refuses the user too, with the text of
#: a C{reason=} field if there is one.
NOLOGIN = "nologin"


def _extraFields(fields: list[str]) -> list[str]:
    """The extra fields of a split line, each C{key=value} or a bare C{key}."""
    return ":".join(fields[_EXTRA:]).split()


def _fieldKey(field: str) -> str:
    return field.partition("=")[0]


def _parseExtra(
    login: str, extra: list[str], where: str, problems: list[str]
) -> tuple[bool, tuple[AppPassword, ...]]:
    """
    The suspension and the app passwords in a line's extra fields; an app
    password field that cannot be read is skipped (that app password does
    not work) with a problem line, the user is kept.
    """
    suspended = False
    apps: dict[str, AppPassword] = {}
    for field in extra:
        key, _, value = field.partition("=")
        if key == NOLOGIN:
            suspended = True
        elif key == apppasswords.FIELD:
            try:
                app = apppasswords.parseField(value)
            except AppPasswordError as e:
                problems.append(f"{where}: {login}: {e}; this app password is ignored")
                continue
            if app.label in apps or any(a.prefix == app.prefix for a in apps.values()):
                problems.append(
                    f"{where}: {login}: app password {app.label} repeats the label"
                    " or prefix of another; it is ignored"
                )
                continue
            apps[app.label] = app
    return suspended, tuple(apps.values())


def _parseNetworks(extra: list[str]) -> dict[str, Networks]:
    """
    The C{allow_nets} and C{allow_real_nets} of a line's extra fields, by
    field name.

    @raise NetworkListError: if one cannot be read, or is given twice: the
        line is then skipped (its login cannot log in), never read as
        allowing more than it says.
    """
    found: dict[str, Networks] = {}
    for field in extra:
        key, eq, value = field.partition("=")
        if key not in allownets.FIELDS:
            continue
        if key in found:
            raise NetworkListError(f"{key} is given twice")
        if not eq:
            raise NetworkListError(f"{key} has no value")
        try:
            found[key] = Networks.parse(value)
        except NetworkListError as e:
            raise NetworkListError(f"{key}: {e}") from None
    return found


def parseUsers(text: str, path: str) -> tuple[dict[str, User], list[str]]:
    """
    Parse the text of a users file.

    Each line is C{login:{SCHEME}hash[:uid:gid:gecos:home:shell:extra]}; of
    Dovecot's fields after the hash only the extra fields (the eighth,
    space-separated C{key=value} pairs) are read here: C{nologin} (the
    login is suspended), L{apppasswords.FIELD} (an app password), and
    C{allow_nets} and C{allow_real_nets} (where it may log in from; one
    that cannot be read spoils its line); the others are kept as they are
    by every edit. A malformed line is skipped,
    never fatal for the others; of two lines for one login (compared
    without regard to case) the first wins, even when it is skipped: the
    login then cannot log in, as in Dovecot, rather than with the line
    that follows (one without the C{allow_nets} the first got wrong).

    @param path: names the file in problems.
    @return: the users by the key of their login (L{normalise}: case,
        quoting and the A- or U-label form of the domain do not matter),
        in file order, and a C{"PATH:LINENO: message"} line for each
        skipped line.
    """
    users: dict[str, User] = {}
    problems = []
    # The line each login was first seen on, and whether it was skipped.
    first: dict[str, tuple[int, bool]] = {}
    for lineno, line in enumerate(fileLines(text), 1):
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
        # A login without a domain never gets mail, but it must not be able
        # to name a path either.
        unsafe = mailboxProblem(login) if "@" in login else componentProblem(login, "login")
        if unsafe is not None:
            problems.append(f"{path}:{lineno}: the login {login!r} cannot name a mailbox: {unsafe}")
            continue
        key = normalise(login)
        if key in first:
            firstLine, skipped = first[key]
            problems.append(
                f"{path}:{lineno}: duplicate login {login} (first on line "
                f"{firstLine}{', skipped' if skipped else ''}); this line is ignored"
            )
            continue
        first[key] = (lineno, True)
        try:
            password = parse(fields[1])
        except ValueError as e:
            problems.append(f"{path}:{lineno}: {login}: {e}")
            continue
        extra = _extraFields(fields)
        try:
            nets = _parseNetworks(extra)
        except NetworkListError as e:
            problems.append(f"{path}:{lineno}: {login}: {e}")
            continue
        first[key] = (lineno, False)
        suspended, apps = _parseExtra(login, extra, f"{path}:{lineno}", problems)
        users[key] = User(
            login,
            password,
            lineno,
            suspended,
            apps,
            nets.get(allownets.ALLOW_NETS),
            nets.get(allownets.ALLOW_REAL_NETS),
        )
    return users, problems


def decodeFile(data: bytes) -> str:
    """
    The text of a users or map file: UTF-8 without a byte-order mark (an
    editor's BOM would become part of the first login), and bytes that are
    not UTF-8 kept as surrogates, so a password in a file that is not UTF-8
    still works.
    """
    text = data.decode("utf-8", "surrogateescape")
    return text[1:] if text.startswith("\ufeff") else text


def fileLines(text: str) -> list[str]:
    """
    The lines of a users or map file's C{text}, as its editor numbers them:
    split at LF only (a CR before it dropped), never at the form feeds,
    NELs or U+2028 that L{str.splitlines} also splits at.
    """
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


@implementer(IUserDatabase, IReloadable)
class UserDatabase(ReloadableFile):
    """
    The users file at C{path}, read into memory by L{load} and re-read by
    L{maybeReload} when it changes (the server calls that periodically and on
    SIGHUP). Logins are looked up without regard to case: keys are stored
    lower-cased. L{lookup} answers at once, from memory.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._users: Optional[dict[str, User]] = None

    def load(self) -> bool:
        """
        Read the users now.

        @return: whether they could be read.
        """
        assert self.file is not None
        try:
            text = decodeFile(self.file.read())
        except OSError as e:
            if self.reportable():
                self._failed(e)
            return False
        users, problems = parseUsers(text, self.file.path)
        before = len(self._users or ())
        self._users, self.problems = users, problems
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
        if before and not users:
            # Truncated by mistake, everyone is locked out; a file empty
            # from the start (/dev/null on an OAuth-only node) is no news.
            log.warn(
                "Users file {path}: loaded 0 user(s), where {before} were before:"
                " every login fails",
                path=self.path,
                before=before,
            )
        else:
            log.info("Users file {path}: loaded {count} user(s)", path=self.path, count=len(users))
        return True

    def _failed(self, error: OSError) -> None:
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

    def _loaded(self) -> dict[str, User]:
        if self._users is None:
            raise UserDatabaseUnavailable(f"the users file {self.path} could not be read")
        return self._users

    def lookup(self, login: str) -> defer.Deferred[Optional[User]]:
        try:
            return defer.succeed(self.get(login))
        except UserDatabaseUnavailable:
            return defer.fail()

    def get(self, login: str) -> Optional[User]:
        """
        The user C{login} (in any case, any spelling of its domain), or
        L{None}, read from memory.

        @raise UserDatabaseUnavailable: if the users were never read.
        """
        return self._loaded().get(normalise(login))

    def exists(self, login: str) -> bool:
        """Whether there is a user C{login}. @raise UserDatabaseUnavailable: never read."""
        return self.get(login) is not None

    def logins(self) -> list[str]:
        """Every login, lower-cased and sorted. @raise UserDatabaseUnavailable: never read."""
        return sorted(self._loaded())


# -- editing the file -------------------------------------------------------


def checkLogin(login: str) -> None:
    """
    Refuse a login that cannot be written to the users file, is not an
    address, is not UTF-8, or cannot name a mailbox folder.

    @raise UserDatabaseError: unless C{login} looks like C{local@domain} with no
        white space, control character or colon, and its local part and
        domain are each one safe path component (L{mailboxProblem}).
    """
    if not re.fullmatch(r"[^\s:@\x00-\x1f\x7f]+@[^\s:@\x00-\x1f\x7f]+", login) or login.startswith(
        "#"
    ):
        raise UserDatabaseError(
            f"invalid login {login!r}: use a full address (local@domain),"
            " without white space or ':'"
        )
    try:
        login.encode("utf-8")
    except UnicodeEncodeError:
        # Bytes that are not UTF-8, as Python passes them on (surrogates):
        # no client could log in with it (AUTH logins are UTF-8).
        raise UserDatabaseError(f"invalid login {login!r}: it is not UTF-8") from None
    unsafe = mailboxProblem(login)
    if unsafe is not None:
        raise UserDatabaseError(f"invalid login {login!r}: it cannot name a mailbox: {unsafe}")


def _checkHash(hashString: str) -> None:
    if re.search(r"[:\x00-\x1f\x7f]", hashString):
        raise UserDatabaseError("the password hash cannot contain ':' or control characters")
    try:
        parse(hashString)
    except ValueError as e:
        raise UserDatabaseError(str(e)) from None


def _names(line: str, login: str) -> bool:
    """
    Whether C{line} is one of C{login}'s, compared as loading compares
    logins (L{normalise}: case, quoting, the domain's A- or U-labels), so
    that an edit finds every line the daemon takes for that login.
    """
    fields = _splitLine(line)
    return fields is not None and normalise(fields[0]) == normalise(login)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """
    Serialise edits of C{path} through an exclusive lock on C{path}.lock,
    owned like C{path} (when root makes it), so that the daemon, which
    rehashes and suspends as its own user, is never locked out by a lock
    file an admin command made.
    """
    with contextlib.ExitStack() as stack:
        try:
            try:
                owner: Optional[os.stat_result] = os.stat(path)
            except FileNotFoundError:
                owner = None
            stack.enter_context(locked(path + ".lock", owner=owner, mode=FILE_MODE))
        except OSError as e:
            raise UserDatabaseError(f"cannot lock {path}: {e.strerror}") from None
        yield


def _readLines(path: str, missingOk: bool = False) -> tuple[list[str], Optional[os.stat_result]]:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            text = decodeFile(f.read())
    except FileNotFoundError:
        if missingOk:
            return [], None
        raise UserDatabaseError(f"{path}: no such file") from None
    except OSError as e:
        raise UserDatabaseError(f"cannot read {path}: {e.strerror}") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines, st


def _writeLines(path: str, lines: list[str], old: Optional[os.stat_result]) -> None:
    """Replace C{path} by C{lines}, atomically and durably."""
    data = "".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape")
    try:
        replaceDurably(path, data, FILE_MODE, old)
    except OSError as e:
        raise UserDatabaseError(f"cannot write {path}: {e.strerror}") from None


def _edit(
    path: str, change: Callable[[list[str]], Optional[list[str]]], create: bool = False
) -> None:
    """
    Under the lock, replace the lines of C{path} by C{change(lines)}, unless
    that is L{None}.

    A C{path} that is a symbolic link (to a users file on shared storage,
    or kept with other configuration) stays one: the file it leads to is
    the one locked and replaced, as the daemon reads it through the link.
    Replacing the link itself left the file it named stale for everyone
    else who reads it.
    """
    if os.path.islink(path):
        path = os.path.realpath(path)
    with _locked(path):
        lines, old = _readLines(path, missingOk=create)
        changed = change(lines)
        if changed is not None:
            _writeLines(path, changed, old)


def addUser(path: str, login: str, hashString: str) -> None:
    """
    Add a user to the users file at C{path}, creating the file if missing.

    @param hashString: C{{SCHEME}hash}, as L{mailauth.passwords.makeHash} makes.
    @raise UserDatabaseError: if the login or the hash is invalid, or the user exists.
    """
    checkLogin(login)
    _checkHash(hashString)

    def change(lines: list[str]) -> list[str]:
        if _hasLogin(lines, login):
            raise UserDatabaseError(f"user {login} already exists in {path}")
        return lines + [f"{login}:{hashString}"]

    _edit(path, change, create=True)


def setPassword(path: str, login: str, hashString: str) -> None:
    """
    Replace the password hash of C{login} (on every line naming it, even a
    malformed one), keeping the other fields of its line.

    @raise UserDatabaseError: if there is no such user or the hash is invalid.
    """
    _checkHash(hashString)

    def change(lines: list[str]) -> list[str]:
        if not _hasLogin(lines, login):
            raise UserDatabaseError(f"no user {login} in {path}")
        result = []
        for line in lines:
            if _names(line, login):
                fields = line.split(":")
                line = ":".join([fields[0], hashString] + fields[2:])
            result.append(line)
        return result

    _edit(path, change)


def deleteUser(path: str, login: str) -> None:
    """
    Remove every line for C{login} from the users file.

    @raise UserDatabaseError: if there is no such user.
    """

    def change(lines: list[str]) -> list[str]:
        if not _hasLogin(lines, login):
            raise UserDatabaseError(f"no user {login} in {path}")
        return [line for line in lines if not _names(line, login)]

    _edit(path, change)


def _hasLogin(lines: list[str], login: str) -> bool:
    # Even a line that loading would skip as malformed counts.
    return any(_names(line, login) for line in lines)


def hasUser(path: str, login: str) -> bool:
    """
    @return: whether the users file names C{login} on some line, even one
        whose hash is malformed (used to fail before asking for a password).
    @raise UserDatabaseError: if the file is missing or cannot be read.
    """
    return _hasLogin(_readLines(path)[0], login)


def listUsers(path: str) -> list[tuple[str, str]]:
    """
    @return: C{(login, scheme)} of every valid user line, in file order.
    @raise UserDatabaseError: if the file cannot be read.
    """
    lines, _ = _readLines(path)
    users, _ = parseUsers("\n".join(lines), path)
    return [(user.login, user.password.scheme) for user in users.values()]


def readUsers(path: str) -> list[User]:
    """
    @return: every valid user of the users file at C{path}, in file order,
        with its suspension and app passwords.
    @raise UserDatabaseError: if the file cannot be read.
    """
    lines, _ = _readLines(path)
    users, _ = parseUsers("\n".join(lines), path)
    return list(users.values())


# -- the extra fields: suspension, app passwords --------------------------


def _withExtra(fields: list[str], extra: list[str]) -> list[str]:
    """
    C{fields} with its extra fields replaced by C{extra}: the empty uid,
    gid, gecos, home and shell fields that must come before them are added,
    and dropped again when no extra field is left.
    """
    fields = fields[:_EXTRA] + [""] * (_EXTRA - len(fields))
    if extra:
        return fields + [" ".join(extra)]
    while len(fields) > 2 and fields[-1] == "":
        fields.pop()
    return fields


def _editUser(path: str, login: str, change: Callable[[list[str]], list[str]]) -> None:
    """
    Replace the fields of every line naming C{login} (as L{setPassword}
    does) by C{change(fields)}, under the lock, atomically.

    @raise UserDatabaseError: if there is no such user, or C{change} raises it.
    """

    def edit(lines: list[str]) -> list[str]:
        if not _hasLogin(lines, login):
            raise UserDatabaseError(f"no user {login} in {path}")
        return [
            ":".join(change(line.rstrip("\r").split(":"))) if _names(line, login) else line
            for line in lines
        ]

    _edit(path, edit)


def setSuspended(path: str, login: str, suspended: bool) -> None:
    """
    Suspend C{login} (add Dovecot's C{nologin} extra field) or lift the
    suspension (remove C{nologin} and its C{reason=}).

    @raise UserDatabaseError: if there is no such user.
    """

    def change(fields: list[str]) -> list[str]:
        extra = _extraFields(fields)
        if suspended:
            if not any(_fieldKey(f) == NOLOGIN for f in extra):
                extra.append(NOLOGIN)
        else:
            extra = [f for f in extra if _fieldKey(f) not in (NOLOGIN, "reason")]
        return _withExtra(fields, extra)

    _editUser(path, login, change)


def _appLabel(field: str) -> Optional[str]:
    key, _, value = field.partition("=")
    return value.split(",", 1)[0] if key == apppasswords.FIELD else None


def addAppPassword(
    path: str, login: str, label: str, hashString: str, created: int, prefix: str
) -> None:
    """
    Give C{login} an app password.

    @param hashString: its hash (C{{ARGON2ID}...}).
    @param created: when it was made, in seconds since the epoch.
    @param prefix: its L{AppPassword.prefix}.
    @raise UserDatabaseError: if there is no such user, the label is
        invalid or taken, another app password of the user has that
        prefix, or the user has L{apppasswords.MAX_PER_LOGIN}.
    """
    field = apppasswords.formatField(label, created, prefix, hashString)
    try:
        apppasswords.checkLabel(label)
        apppasswords.parseField(field.partition("=")[2])
    except AppPasswordError as e:
        raise UserDatabaseError(str(e)) from None
    _checkHash(hashString)
    if re.search(r"\s", hashString):
        raise UserDatabaseError("an app password hash cannot contain white space")

    def change(fields: list[str]) -> list[str]:
        extra = _extraFields(fields)
        labels = [name for name in map(_appLabel, extra) if name is not None]
        if label in labels:
            raise UserDatabaseError(f"{login} already has an app password {label}")
        if any(f.split(",")[2:3] == [prefix] for f in extra if _appLabel(f) is not None):
            raise UserDatabaseError(
                f"{login} has another app password starting with {prefix}; make a new one"
            )
        if len(labels) >= apppasswords.MAX_PER_LOGIN:
            raise UserDatabaseError(
                f"{login} already has {len(labels)} app passwords, the most allowed;"
                " delete one first"
            )
        return _withExtra(fields, extra + [field])

    _editUser(path, login, change)


def deleteAppPassword(path: str, login: str, label: str) -> None:
    """
    Revoke C{login}'s app password C{label}; its other passwords still work.

    @raise UserDatabaseError: if there is no such user or app password.
    """
    found: list[bool] = []

    def change(fields: list[str]) -> list[str]:
        extra = _extraFields(fields)
        kept = [f for f in extra if _appLabel(f) != label]
        if len(kept) == len(extra) and not found:
            raise UserDatabaseError(f"{login} has no app password {label}")
        found.append(True)
        return _withExtra(fields, kept)

    _editUser(path, login, change)


def replacePassword(path: str, login: str, expected: PasswordHash, hashString: str) -> bool:
    """
    Replace C{login}'s password hash by C{hashString} if it is still
    C{expected} (the one a login was just verified against), so that a
    password changed meanwhile by C{mailauth user passwd} is never undone.

    @return: whether it was replaced; the file is rewritten only then.
    @raise UserDatabaseError: if the file cannot be read or written, or
        C{hashString} is invalid.
    """
    _checkHash(hashString)
    replaced = []

    def change(lines: list[str]) -> Optional[list[str]]:
        result = list(lines)
        for i, line in enumerate(lines):
            fields = _splitLine(line)
            if fields is None or not _names(line, login) or len(fields) < 2:
                continue
            # Only the login's first line is the one loading uses (if it
            # can be read at all).
            try:
                current = parse(fields[1])
            except ValueError:
                break
            if current == expected:
                result[i] = ":".join([fields[0], hashString] + fields[2:])
                replaced.append(True)
            break
        return result if replaced else None

    _edit(path, change)
    return bool(replaced)
