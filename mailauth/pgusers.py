"""
The user database in PostgreSQL, for nodes that share one: its URIs and
connections, edits for the C{mailauth user} commands, and the schema. The
daemon's lookups, off the reactor through adbapi, are
L{mailauth.pglookups}.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Callable, Iterator, Optional
from urllib.parse import parse_qsl, unquote, urlsplit

import idna
from twisted.logger import Logger
from zope.interface import implementer

from mailauth import apppasswords
from mailauth.addresses import normalise
from mailauth.apppasswords import AppPassword, AppPasswordError
from mailauth.interfaces import IAccountStore, IUserStore
from mailauth.passwords import PasswordHash, parse
from mailauth.userdb import User, UserDatabaseError, checkLogin

log = Logger(namespace="mailauth.pgusers")

#: How long a lookup may take, in seconds, before the login is answered
#: 454: the server cancels the query after this long (C{statement_timeout})
#: and the daemon stops waiting after this long on its own clock.
LOOKUP_TIMEOUT = 5.0

#: How long a statement of C{mailauth user} or C{db init} may take.
EDIT_TIMEOUT = 30.0

#: The schema version this mailauth creates and reads.
SCHEMA_VERSION = 3

#: The steps from each version to the next: C{_STEPS[n]} makes version n
#: from version n - 1. A step is never changed once released; a new one is
#: added instead.
_STEPS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE SCHEMA IF NOT EXISTS mailauth",
        """CREATE TABLE mailauth.schema_version (
            version integer PRIMARY KEY,
            applied timestamptz NOT NULL DEFAULT now())""",
        # Logins are stored lower-cased, so the primary key makes them
        # unique without regard to case.
        """CREATE TABLE mailauth.users (
            login text PRIMARY KEY CHECK (login <> '' AND login = lower(login)),
            password text NOT NULL,
            suspended boolean NOT NULL DEFAULT false,
            created timestamptz NOT NULL DEFAULT now(),
            updated timestamptz NOT NULL DEFAULT now())""",
    ),
    2: (
        """CREATE TABLE mailauth.app_passwords (
            login text NOT NULL REFERENCES mailauth.users (login) ON DELETE CASCADE,
            label text NOT NULL CHECK (label <> ''),
            password text NOT NULL,
            created timestamptz NOT NULL DEFAULT now(),
            last_used timestamptz,
            PRIMARY KEY (login, label))""",
    ),
    # An app password's first characters, kept in clear so that a login
    # tries the one it may be (mailauth.apppasswords.AppPassword.prefix).
    # Rows without one (none were ever written) are never tried.
    3: (
        """ALTER TABLE mailauth.app_passwords
            ADD COLUMN prefix text CHECK (prefix ~ '^[a-z0-9]{4}$')""",
        """CREATE UNIQUE INDEX app_passwords_login_prefix
            ON mailauth.app_passwords (login, prefix)""",
    ),
}

# Any number: it only has to differ from the other advisory locks taken in
# the same database, so that two "db init" runs take turns.
_INIT_LOCK = 0x6D61696C61757468

# A user's row with its app passwords, as a JSON array of
# [label, created (seconds), prefix, hash]; ordered by login and creation.
_USERS = """
    SELECT u.login, u.password, u.suspended,
           coalesce(json_agg(json_build_array(
                        a.label, floor(extract(epoch FROM a.created))::bigint, a.prefix,
                        a.password) ORDER BY a.created, a.label)
                    FILTER (WHERE a.prefix IS NOT NULL), '[]'::json)
    FROM mailauth.users u LEFT JOIN mailauth.app_passwords a ON a.login = u.login
    {where} GROUP BY u.login ORDER BY u.login"""
_LOOKUP = _USERS.format(where="WHERE u.login = ANY(%s)")
_ALL_USERS = _USERS.format(where="")

_URI_SCHEMES = ("postgresql", "postgres")


# -- logins -----------------------------------------------------------------


def spellings(login: str) -> list[str]:
    """
    The stored logins that C{login} may name, the one to prefer first: as
    older mailauth versions stored it (only lower-cased); then its key
    (L{normalise}: also unquoted, NFC, the domain in A-labels), which is how
    logins are stored now and how the users file finds them, so that
    C{carol@b\u00fccher.example} and C{carol@xn--bcher-kva.example} are one
    login; then the key with its domain in U-labels, as an older version
    (or another program) stored a login typed that way and C{mailauth db
    init} has not yet stored anew (L{normaliseLogins}). The spelling as
    given comes first so that two rows that C{db init} could not merge are
    each still found as they were before.
    """
    key = normalise(login)
    found = [login.lower(), key]
    local, _, domain = key.rpartition("@")
    if "xn--" in domain:
        try:
            found.append(f"{local}@{idna.decode(domain)}")
        except (idna.IDNAError, UnicodeError, ValueError):
            pass
    return list(dict.fromkeys(found))


def pick(rows: list, candidates: list[str]) -> Optional[tuple]:
    """@return: of C{rows} (login first), the one whose login comes first in C{candidates}."""
    byLogin = {row[0]: row for row in rows}
    for candidate in candidates:
        if candidate in byLogin:
            return byLogin[candidate]
    return None


# -- connection URIs --------------------------------------------------------


def isPostgreSQL(users: str) -> bool:
    """
    @return: whether C{users} (the C{[auth] users} key) names a PostgreSQL
        database, a libpq URI (C{postgresql://...}), rather than a file.
    """
    return users.split("://", 1)[0].lower() in _URI_SCHEMES and "://" in users


# The query parameters that carry a secret: the password, and the
# passphrase of the client's key.
_SECRET_PARAMETERS = re.compile(r"([?&](?:ssl)?password=)([^&#]*)", re.IGNORECASE)


def _userPartEnd(rest: str) -> int:
    """
    Where the C{user[:password]@} before the host in C{rest} (a URI after
    its C{://}) has its C{@}, or -1. A password may hold C{/}, C{?}, C{#}
    or C{@} that should have been percent-encoded: the user part ends at
    the last C{@} before the query, or before the first C{=} of a query,
    so that none of it is taken for the host and shown.
    """
    authority = re.split(r"[?#]", rest, maxsplit=1)[0]
    end = authority.rfind("@")
    return end if end >= 0 else rest.split("=", 1)[0].rfind("@")


def _secrets(uri: str) -> list[str]:
    """The passwords in C{uri}, as written and percent-decoded."""
    found = [m.group(2) for m in _SECRET_PARAMETERS.finditer(uri)]
    rest = uri.partition("://")[2]
    user = rest[: max(0, _userPartEnd(rest))]
    if ":" in user:
        found.append(user.split(":", 1)[1])
    return [form for secret in found if secret for form in dict.fromkeys((secret, unquote(secret)))]


def redact(uri: str) -> str:
    """
    @return: C{uri} with any password in it replaced by C{***}, to be shown
        in logs and messages.
    """
    scheme, sep, rest = uri.partition("://")
    user = rest[: max(0, _userPartEnd(rest))] if sep else ""
    if ":" in user:
        rest = user.split(":", 1)[0] + ":***" + rest[len(user) :]
    return _SECRET_PARAMETERS.sub(r"\1***", scheme + sep + rest)


def scrub(uri: str, text: str) -> str:
    """
    @return: C{text}, a message about C{uri} (libpq's own, which may quote
        the URI or the part of it that it could not parse), with every
        password of C{uri}, or any part of one in quotes, shown as C{***}.
    """
    secrets = _secrets(uri)
    text = text.replace(uri, redact(uri))
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")

    def hide(match: re.Match) -> str:
        part = match.group(1)
        return '"***"' if part and any(part in secret for secret in secrets) else match.group(0)

    return re.sub(r"[\"']([^\"']*)[\"']", hide, text)


def checkURI(uri: str) -> str:
    """
    Check the form of a libpq connection URI, as the configuration is read
    (without the driver, which may be missing there).

    @return: C{uri}.
    @raise ValueError: naming what is wrong, never with the password.
    """
    try:
        return _checkURI(uri, redact(uri))
    except ValueError as e:
        raise ValueError(scrub(uri, str(e))) from None


def _checkURI(uri: str, shown: str) -> str:
    """L{checkURI}, its messages showing C{uri} as C{shown}."""
    scheme = uri.split("://", 1)[0]
    if scheme not in _URI_SCHEMES:
        raise ValueError(f"{shown!r}: a PostgreSQL URI starts with postgresql://")
    if re.search(r"[\s\x00-\x1f\x7f]", uri):
        raise ValueError(f"{shown!r}: white space or control characters in the URI")
    rest = uri.partition("://")[2]
    user = rest[: max(0, _userPartEnd(rest))]
    if re.search(r"[/?#@]|%(?![0-9A-Fa-f]{2})", user):
        # libpq would take part of the password for the host, or refuse it
        # quoting it.
        raise ValueError(
            f"{shown!r}: percent-encode / ? # @ and % in the user name and password"
            " (%2F %3F %23 %40 %25)"
        )
    try:
        parts = urlsplit(uri)
    except ValueError as e:
        raise ValueError(f"{shown!r}: {e}") from None
    if parts.fragment or uri.endswith("#"):
        raise ValueError(f"{shown!r}: a PostgreSQL URI has no #fragment")
    hosts = re.split(r"[/?#]", rest[_userPartEnd(rest) + 1 :], maxsplit=1)[0]
    for host in hosts.split(",") if hosts else ():
        m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\[\]:]*)(?::(\d*))?", host)
        if m is None:
            raise ValueError(f"{shown!r}: {host!r} is not host[:port]")
        port = m.group(2)
        if port and not 0 < int(port) < 65536:
            raise ValueError(f"{shown!r}: {port} is not a port number")
    try:
        parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError(f"{shown!r}: the query is not key=value&key=value") from None
    return uri


def _driver() -> Any:
    """
    @return: the psycopg2 module.
    @raise UserDatabaseError: if it is not installed.
    """
    try:
        import psycopg2
        import psycopg2.errors  # noqa: F401 (makes psycopg2.errors an attribute)
        import psycopg2.extensions  # noqa: F401
    except ImportError:
        raise UserDatabaseError(
            "a postgresql:// user database needs psycopg2: apt-get install python3-psycopg2"
        ) from None
    return psycopg2


def connectionArguments(uri: str, timeout: float) -> dict[str, str]:
    """
    The libpq keywords for C{uri}, with mailauth's defaults for those it
    leaves out: give up connecting after C{timeout} seconds, name mailauth
    in C{pg_stat_activity}, and probe idle connections with TCP keepalives
    (after 30 s idle, every 10 s, 3 times), so that one to a server that
    vanished (powered off, a network split) is noticed within a minute
    rather than the system's two hours.

    @raise UserDatabaseError: if psycopg2 is missing or libpq refuses C{uri}.
    """
    psycopg2 = _driver()
    try:
        arguments = psycopg2.extensions.parse_dsn(uri)
    except psycopg2.Error as e:
        raise UserDatabaseError(f"{redact(uri)}: {_firstLine(e, uri)}") from None
    # libpq counts connect_timeout in whole seconds, and makes 1 into 2.
    arguments.setdefault("connect_timeout", str(max(2, math.ceil(timeout))))
    arguments.setdefault("application_name", "mailauth")
    for keyword, value in _KEEPALIVES.items():
        arguments.setdefault(keyword, value)
    return arguments


_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}


def _firstLine(error: BaseException, uri: str) -> str:
    """The first line of libpq's message C{error} about C{uri}, without its passwords."""
    text = scrub(uri, str(error).strip())
    text = re.sub(r"^invalid dsn: ", "", text)
    return text.splitlines()[0] if text else error.__class__.__name__


def _setTimeout(connection: Any, timeout: float) -> None:
    """Make the server cancel any statement of C{connection} after C{timeout} seconds."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT set_config('statement_timeout', %s, false)",
            (f"{max(1, round(timeout * 1000))}ms",),
        )


def _problem(uri: str, error: BaseException) -> str:
    """One line saying why the database at C{uri} could not answer."""
    psycopg2 = _driver()
    shown = redact(uri)
    if isinstance(error, (psycopg2.errors.UndefinedTable, psycopg2.errors.UndefinedColumn)):
        # No schema, or one older than this mailauth's (its users are there).
        return (
            f"{shown} has no mailauth tables, or an older schema than version"
            f" {SCHEMA_VERSION}: run 'mailauth db init' to create or upgrade it"
        )
    if isinstance(error, psycopg2.errors.QueryCanceled):
        return f"{shown} did not answer in time"
    if isinstance(error, psycopg2.OperationalError):
        return f"cannot reach {shown}: {_firstLine(error, uri)}"
    return f"{shown}: {_firstLine(error, uri)}"


def _appPasswords(login: str, rows: list, shown: str) -> tuple[AppPassword, ...]:
    """
    The app passwords of C{login} from the lookup's JSON rows; one that
    cannot be read (edited by hand) is logged and left out: it does not work.
    """
    apps = []
    for label, created, prefix, stored in rows:
        try:
            apps.append(apppasswords.parseField(f"{label},{created},{prefix},{stored}"))
        except AppPasswordError as e:
            log.error(
                "User database {uri}: {login}: {problem}; it does not work",
                uri=shown,
                login=login,
                problem=str(e),
            )
    return tuple(apps)


# -- edits, for the mailauth command -----------------------------------------


@contextlib.contextmanager
def _transaction(uri: str) -> Iterator[Any]:
    """
    A cursor in one transaction on a new connection to C{uri}: committed if
    the block ends normally, else rolled back; the connection is closed
    either way.

    @raise UserDatabaseError: for any database error, in one line.
    """
    psycopg2 = _driver()
    try:
        connection = psycopg2.connect(**connectionArguments(uri, EDIT_TIMEOUT))
    except psycopg2.Error as e:
        raise UserDatabaseError(_problem(uri, e)) from None
    try:
        with connection:
            _setTimeout(connection, EDIT_TIMEOUT)
            with connection.cursor() as cursor:
                yield cursor
    except psycopg2.Error as e:
        raise UserDatabaseError(_problem(uri, e)) from None
    finally:
        connection.close()


def _parseHash(hashString: str) -> None:
    try:
        parse(hashString)
    except ValueError as e:
        raise UserDatabaseError(str(e)) from None


@implementer(IUserStore, IAccountStore)
class PostgreSQLUserStore:
    """
    Edits of C{mailauth.users} and C{mailauth.app_passwords}, each in its
    own transaction on a plain psycopg2 connection; every method blocks.
    Logins are stored as their key (L{normalise}), and found by any
    spelling of it (L{spellings}), as in the users file.
    """

    usesKnown = True

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._shown = redact(uri)

    def _stored(self, cursor: Any, login: str, lock: bool = False) -> Optional[str]:
        """
        The login as stored of the row C{login} names (L{spellings}), or
        L{None}; with C{lock}, that row is held until the transaction ends.
        """
        candidates = spellings(login)
        cursor.execute(
            "SELECT login FROM mailauth.users WHERE login = ANY(%s)"
            + (" FOR UPDATE" if lock else ""),
            (candidates,),
        )
        row = pick(cursor.fetchall(), candidates)
        return None if row is None else row[0]

    def _existing(self, cursor: Any, login: str, lock: bool = False) -> str:
        """L{_stored}, which must be there. @raise UserDatabaseError: none."""
        stored = self._stored(cursor, login, lock)
        if stored is None:
            raise UserDatabaseError(f"no user {login} in {self._shown}")
        return stored

    def addUser(self, login: str, hashString: str) -> None:
        checkLogin(login)
        _parseHash(hashString)
        with _transaction(self.uri) as cursor:
            # Any spelling counts: a row an older mailauth stored with the
            # domain's U-labels is this login too.
            exists = self._stored(cursor, login) is not None
            if not exists:
                cursor.execute(
                    "INSERT INTO mailauth.users (login, password) VALUES (%s, %s)"
                    " ON CONFLICT (login) DO NOTHING",
                    (normalise(login), hashString),
                )
            if exists or cursor.rowcount == 0:
                raise UserDatabaseError(f"user {login} already exists in {self._shown}")

    def setPassword(self, login: str, hashString: str) -> None:
        _parseHash(hashString)
        with _transaction(self.uri) as cursor:
            cursor.execute(
                "UPDATE mailauth.users SET password = %s, updated = now() WHERE login = %s",
                (hashString, self._existing(cursor, login, lock=True)),
            )

    def deleteUser(self, login: str) -> None:
        with _transaction(self.uri) as cursor:
            cursor.execute(
                "DELETE FROM mailauth.users WHERE login = %s",
                (self._existing(cursor, login, lock=True),),
            )

    def setSuspended(self, login: str, suspended: bool) -> None:
        with _transaction(self.uri) as cursor:
            cursor.execute(
                "UPDATE mailauth.users SET suspended = %s, updated = now() WHERE login = %s",
                (suspended, self._existing(cursor, login, lock=True)),
            )

    def hasUser(self, login: str) -> bool:
        with _transaction(self.uri) as cursor:
            return self._stored(cursor, login) is not None

    def listUsers(self) -> list[tuple[str, str]]:
        """
        C{(login, scheme)} of every user, by login; the scheme of a hash that
        cannot be parsed is C{INVALID} (its logins fail).
        """
        with _transaction(self.uri) as cursor:
            cursor.execute("SELECT login, password FROM mailauth.users ORDER BY login")
            rows = cursor.fetchall()
        users = []
        for login, stored in rows:
            try:
                scheme = parse(stored).scheme
            except ValueError:
                scheme = "INVALID"
            users.append((login, scheme))
        return users

    # -- IAccountStore -----------------------------------------------------

    def _lockUser(self, cursor: Any, login: str) -> str:
        """
        Hold C{login}'s row until the transaction ends.

        @return: its login as stored.
        @raise UserDatabaseError: there is none.
        """
        return self._existing(cursor, login, lock=True)

    def addAppPassword(
        self, login: str, label: str, hashString: str, created: int, prefix: str
    ) -> None:
        try:
            apppasswords.checkLabel(label)
            apppasswords.parseField(f"{label},{created},{prefix},{hashString}")
        except AppPasswordError as e:
            raise UserDatabaseError(str(e)) from None
        with _transaction(self.uri) as cursor:
            # The user's row lock makes two adds take turns, so the checks hold.
            stored = self._lockUser(cursor, login)
            cursor.execute(
                "SELECT label, prefix FROM mailauth.app_passwords WHERE login = %s",
                (stored,),
            )
            rows = cursor.fetchall()
            if any(row[0] == label for row in rows):
                raise UserDatabaseError(f"{login} already has an app password {label}")
            if any(row[1] == prefix for row in rows):
                raise UserDatabaseError(
                    f"{login} has another app password starting with {prefix}; make a new one"
                )
            if len(rows) >= apppasswords.MAX_PER_LOGIN:
                raise UserDatabaseError(
                    f"{login} already has {len(rows)} app passwords, the most allowed;"
                    " delete one first"
                )
            cursor.execute(
                "INSERT INTO mailauth.app_passwords (login, label, password, created, prefix)"
                " VALUES (%s, %s, %s, to_timestamp(%s), %s)",
                (stored, label, hashString, created, prefix),
            )

    def deleteAppPassword(self, login: str, label: str) -> None:
        with _transaction(self.uri) as cursor:
            stored = self._lockUser(cursor, login)
            cursor.execute(
                "DELETE FROM mailauth.app_passwords WHERE login = %s AND label = %s",
                (stored, label),
            )
            if cursor.rowcount == 0:
                raise UserDatabaseError(f"{login} has no app password {label}")

    def listAppPasswords(self, login: str) -> list[tuple[AppPassword, Optional[float]]]:
        with _transaction(self.uri) as cursor:
            stored = self._lockUser(cursor, login)
            cursor.execute(
                "SELECT label, floor(extract(epoch FROM created))::bigint, prefix, password,"
                " extract(epoch FROM last_used)::float8 FROM mailauth.app_passwords"
                " WHERE login = %s AND prefix IS NOT NULL ORDER BY created, label",
                (stored,),
            )
            rows = cursor.fetchall()
        found = []
        for label, created, prefix, stored, used in rows:
            try:
                app = apppasswords.parseField(f"{label},{created},{prefix},{stored}")
            except AppPasswordError:
                continue
            found.append((app, used))
        return found

    def appPasswordUsed(self, login: str, app: Any, when: float) -> None:
        # The prefix tells this app password from one deleted and made again
        # under its label; a later use already recorded is kept.
        with _transaction(self.uri) as cursor:
            stored = self._stored(cursor, login)
            cursor.execute(
                "UPDATE mailauth.app_passwords SET last_used = greatest(last_used,"
                " to_timestamp(%s)) WHERE login = %s AND label = %s AND prefix = %s",
                (when, stored, app.label, app.prefix),
            )

    def listAccounts(self) -> list[User]:
        """Every user whose hash can be parsed, by login, with its app passwords."""
        with _transaction(self.uri) as cursor:
            cursor.execute(_ALL_USERS)
            rows = cursor.fetchall()
        users = []
        for login, stored, suspended, apps in rows:
            try:
                password = parse(stored)
            except ValueError:
                continue
            users.append(
                User(
                    login,
                    password,
                    suspended=bool(suspended),
                    appPasswords=_appPasswords(login, apps, self._shown),
                )
            )
        return users

    def upgradePassword(self, login: str, verified: Any, hashString: str) -> bool:
        """
        An C{UPDATE} that only replaces the hash the login was checked
        against: compared parsed, as the lookup read it, under the row's lock.
        """
        _parseHash(hashString)
        with _transaction(self.uri) as cursor:
            candidates = spellings(login)
            cursor.execute(
                "SELECT login, password FROM mailauth.users WHERE login = ANY(%s) FOR UPDATE",
                (candidates,),
            )
            row = pick(cursor.fetchall(), candidates)
            if row is None or not _same(row[1], verified):
                return False
            cursor.execute(
                "UPDATE mailauth.users SET password = %s, updated = now() WHERE login = %s",
                (hashString, row[0]),
            )
            return True


def _same(stored: str, verified: PasswordHash) -> bool:
    try:
        return parse(stored) == verified
    except ValueError:
        return False


# -- the schema -------------------------------------------------------------


def _schemaVersion(cursor: Any) -> int:
    """The version of the mailauth schema, 0 if there is none."""
    cursor.execute("SELECT to_regclass('mailauth.schema_version') IS NOT NULL")
    if not cursor.fetchone()[0]:
        return 0
    cursor.execute("SELECT coalesce(max(version), 0) FROM mailauth.schema_version")
    return cursor.fetchone()[0]


def initSchema(
    uri: str, target: int = SCHEMA_VERSION, say: Optional[Callable[[str], None]] = None
) -> tuple[int, int]:
    """
    Create the mailauth schema in the database at C{uri}, or upgrade it one
    step at a time to version C{target}, then store every login as its key
    (L{normaliseLogins}), all in one transaction: it ends fully upgraded or
    untouched. Running it again changes nothing. Two runs at once take
    turns.

    @param target: the version to reach; older ones only for tests of the
        upgrade.
    @param say: called with a line for each login it stored anew, or could
        not (L{normaliseLogins}).
    @return: the versions before and after.
    @raise UserDatabaseError: if the database cannot be reached or changed, or
        its schema is newer than C{target}.
    """
    with _transaction(uri) as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_INIT_LOCK,))
        before = _schemaVersion(cursor)
        if before > target:
            raise UserDatabaseError(
                f"{redact(uri)} has mailauth schema version {before}, newer than"
                f" this mailauth's {target}: upgrade mailauth"
            )
        for version in range(before + 1, target + 1):
            for statement in _STEPS[version]:
                cursor.execute(statement)
            cursor.execute("INSERT INTO mailauth.schema_version (version) VALUES (%s)", (version,))
        for line in normaliseLogins(cursor, appPasswords=target >= 2):
            if say is not None:
                say(line)
    return before, target


def normaliseLogins(cursor: Any, appPasswords: bool = True) -> list[str]:
    """
    Store every login as its key (L{normalise}), which is how the daemon
    and the C{mailauth user} commands find it first, in the transaction of
    C{cursor}.

    Older versions stored a login only lower-cased: one with its domain in
    U-labels (C{carol@b\u00fccher.example}) could not log in as
    C{carol@xn--bcher-kva.example}, although the users file takes both for
    one login. SQL cannot make the key (IDNA), so it is made here, at each
    C{db init}, which also catches rows another program wrote since. A row
    whose key another row already has is left as it is (it still logs in
    as it is spelled: L{spellings}), and reported, so that no row is lost
    or merged behind the administrator's back.

    @param appPasswords: the table C{mailauth.app_passwords} exists; its
        rows follow their login.
    @return: a line for each row renamed or left alone.
    """
    cursor.execute("SELECT login FROM mailauth.users ORDER BY login FOR UPDATE")
    logins = [login for (login,) in cursor.fetchall()]
    taken = set(logins)
    lines = []
    for login in logins:
        key = normalise(login)
        if key == login:
            continue
        if key in taken:
            lines.append(
                f"{login}: not stored as {key}, another user's login; it logs in only as"
                f" spelled here until one of them is deleted ('mailauth user del {login}')"
            )
            continue
        # The key is not updated in place: the app passwords' foreign key
        # has no ON UPDATE CASCADE. The new row takes them, then the old goes.
        cursor.execute(
            "INSERT INTO mailauth.users (login, password, suspended, created, updated)"
            " SELECT %s, password, suspended, created, updated FROM mailauth.users"
            " WHERE login = %s",
            (key, login),
        )
        if appPasswords:
            cursor.execute(
                "UPDATE mailauth.app_passwords SET login = %s WHERE login = %s", (key, login)
            )
        cursor.execute("DELETE FROM mailauth.users WHERE login = %s", (login,))
        taken.discard(login)
        taken.add(key)
        lines.append(f"{login}: stored as {key}, which every spelling of it finds")
    return lines


def checkSetup(uri: str) -> Optional[str]:
    """
    Check what the daemon needs before it starts, without connecting: the
    driver, and a URI that libpq accepts. (The database may be down when
    the daemon starts: logins get 454 until it is up.)

    @return: L{None}, or one line saying what is wrong.
    """
    try:
        connectionArguments(uri, LOOKUP_TIMEOUT)
    except UserDatabaseError as e:
        return str(e)
    return None


def checkDatabase(uri: str) -> Optional[str]:
    """
    Connect to the user database at C{uri} and check that the daemon can
    read its users (for C{mailauth check-config}).

    @return: L{None}, or one line saying what is wrong and what to do.
    """
    try:
        with _transaction(uri) as cursor:
            version = _schemaVersion(cursor)
            if version == 0:
                return f"{redact(uri)} has no mailauth tables: run 'mailauth db init'"
            if version > SCHEMA_VERSION:
                return (
                    f"{redact(uri)} has mailauth schema version {version}, newer than"
                    f" this mailauth's {SCHEMA_VERSION}: upgrade mailauth"
                )
            if version < SCHEMA_VERSION:
                return (
                    f"{redact(uri)} has mailauth schema version {version}:"
                    f" run 'mailauth db init' to upgrade it to {SCHEMA_VERSION}"
                )
            cursor.execute(_LOOKUP, ([],))
    except UserDatabaseError as e:
        return str(e)
    return None
