"""
Tests for L{mailauth.pgusers} and L{mailauth.userstore}, against a real
PostgreSQL server from Debian (L{tests.pgharness}), and through the real
C{mailauth} command and daemon.
"""

from __future__ import annotations

import io
import os
import signal
import smtplib
from typing import Any

from twisted.internet import defer, reactor, task, threads
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailauth import checks
from mailauth import config as configmod
from mailauth.cli import Console, main
from mailauth.interfaces import IUserDatabase, IUserStore
from mailauth.passwords import PasswordHash, makeHash, parse, verify
from mailauth.pglookups import PostgreSQLUserDatabase
from mailauth.pgusers import (
    SCHEMA_VERSION,
    PostgreSQLUserStore,
    checkDatabase,
    checkURI,
    connectionArguments,
    initSchema,
    isPostgreSQL,
    redact,
)
from mailauth.userdb import UserDatabase, UserDatabaseError, UserDatabaseUnavailable
from mailauth.userstore import UsersFileStore, storeFor
from tests import pgharness
from tests.harness import CONFIG, ROOT, Daemon, clientContext
from tests.support import usersFileDatabase

CRAM = "{CRAM-MD5}" + "ab" * 32
SHA512 = makeHash(b"alice-secret", "SHA512-CRYPT")


class URITests(unittest.TestCase):
    """Telling a PostgreSQL URI from a path, checking its form, hiding its password."""

    def test_isPostgreSQL(self) -> None:
        """
        C{postgresql://} and C{postgres://} (libpq's two designators) name a
        database; anything else is a users file.
        """
        for users in ("postgresql://h/db", "postgres:///db", "PostgreSQL://h/db"):
            self.assertTrue(isPostgreSQL(users), users)
        for users in ("/etc/mailauth/users", "postgresql", "users", "postgresql:/x"):
            self.assertFalse(isPostgreSQL(users), users)

    def test_redact(self) -> None:
        """
        A password in the user part or in the query is replaced by C{***};
        the rest is kept.
        """
        self.assertEqual(
            redact("postgresql://mail:s3cret@db.example/mail"),
            "postgresql://mail:***@db.example/mail",
        )
        self.assertEqual(
            redact("postgresql:///mail?user=m&password=s3cret&sslmode=require"),
            "postgresql:///mail?user=m&password=***&sslmode=require",
        )
        self.assertEqual(
            redact("postgresql://mail@db.example/mail"), "postgresql://mail@db.example/mail"
        )

    def test_connectionDefaults(self) -> None:
        """
        mailauth's defaults for what a URI leaves out: a connect timeout,
        its name, and TCP keepalives that notice a vanished server within
        a minute; what the URI says wins.
        """
        arguments = connectionArguments("postgresql://db.example/mail", 5)
        self.assertEqual(
            {k: arguments[k] for k in arguments if k not in ("host", "dbname")},
            {
                "connect_timeout": "5",
                "application_name": "mailauth",
                "keepalives": "1",
                "keepalives_idle": "30",
                "keepalives_interval": "10",
                "keepalives_count": "3",
            },
        )
        arguments = connectionArguments("postgresql:///mail?keepalives_idle=300&keepalives=0", 5)
        self.assertEqual((arguments["keepalives_idle"], arguments["keepalives"]), ("300", "0"))

    def test_goodForms(self) -> None:
        """
        libpq's URI forms are accepted: a socket folder in the query,
        several hosts, IPv6 addresses, no database at all.
        """
        for uri in (
            "postgresql://mail@localhost/mail",
            "postgresql:///mail?host=/run/postgresql",
            "postgresql:///mail?host=%2Frun%2Fpostgresql&port=5433",
            "postgresql://u:p@h1:5432,h2:5433/mail?target_session_attrs=read-write",
            "postgresql://[::1]:5432/mail",
            "postgres://",
        ):
            self.assertEqual(checkURI(uri), uri)

    def test_badForms(self) -> None:
        """
        A malformed URI is refused with a message naming what is wrong,
        which never shows the password.
        """
        for uri, why in (
            ("postgresql://u:pw@h:54x/db", r"'h:54x' is not host\[:port\]"),
            ("postgresql://u:pw@h:70000/db", "70000 is not a port number"),
            ("postgresql://u:pw@h/db#x", "no #fragment"),
            ("postgresql://u:pw@h/db?sslmode", "key=value"),
            ("postgresql://u:pw@h/my db", "white space"),
        ):
            with self.assertRaises(ValueError) as caught:
                checkURI(uri)
            self.assertRegex(str(caught.exception), why)
            self.assertNotIn("pw", str(caught.exception))
            self.assertIn("u:***@", str(caught.exception))

    def test_config(self) -> None:
        """
        C{[auth] users} takes a PostgreSQL URI as it is, and names itself in
        the error for a malformed one.
        """
        uri = "postgresql:///mail?host=/run/postgresql"
        text = CONFIG.format(dir="/srv").replace("users = /srv/users", f"users = {uri}")
        self.assertEqual(configmod.loadText(text, "m.conf").auth.users, uri)
        bad = text.replace(uri, "postgresql://h:x/mail")
        with self.assertRaises(configmod.ConfigError) as caught:
            configmod.loadText(bad, "m.conf")
        self.assertEqual(len(caught.exception.problems), 1)
        self.assertRegex(caught.exception.problems[0], r"^m\.conf: \[auth\] users: .*host\[:port\]")


class HarnessTests(unittest.TestCase):
    """L{pgharness} needs Debian's PostgreSQL, and says so."""

    def test_missingServer(self) -> None:
        """
        Without the server's programs the harness fails (never skips),
        naming the package to install.
        """
        with self.assertRaises(unittest.FailTest) as caught:
            pgharness.binaries(self.mktemp())
        self.assertIn("apt-get install postgresql", str(caught.exception))

    def test_server(self) -> None:
        """
        The server runs as the unprivileged user when the tests run as root,
        and answers on its socket and on 127.0.0.1.
        """
        server = pgharness.sharedServer()
        [(user,)] = server.execute("postgres", "SELECT current_user")
        self.assertEqual(user, pgharness.SUPERUSER)
        with open(f"/proc/{server.process.pid}/status") as f:
            uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        self.assertNotEqual(uid, 0)
        connection = pgharness.driver().connect(server.uri("postgres", tcp=True))
        self.addCleanup(connection.close)
        self.assertEqual(connection.info.host, "127.0.0.1")


class DatabaseMixin:
    """A fresh database on the shared server, with the mailauth schema, per test."""

    def setUp(self) -> None:
        self.server = pgharness.sharedServer()
        self.database = self.server.createDatabase()
        self.uri = self.server.uri(self.database)
        initSchema(self.uri)
        self.store = PostgreSQLUserStore(self.uri)

    def sql(self, statement: str, *params: Any) -> list:
        return self.server.execute(self.database, statement, params)


def captureLog(testCase: unittest.TestCase) -> list[dict]:
    """Collect what L{mailauth.pgusers} logs during C{testCase}."""
    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "mailauth.pgusers":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    testCase.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


def openDatabase(testCase: unittest.TestCase, uri: str, **kwargs: Any) -> PostgreSQLUserDatabase:
    """A L{PostgreSQLUserDatabase} on the real reactor, closed when the test ends."""
    db = PostgreSQLUserDatabase(uri, reactor, **kwargs)
    db.startService()
    testCase.addCleanup(db.stopService)
    return db


class LookupTestsMixin:
    """
    The lookups every L{IUserDatabase} answers the same way, whatever it
    reads its users from: run against PostgreSQL and the users file.
    """

    def makeDatabase(self, users: dict[str, str]) -> Any:
        """
        @param users: login -> C{{SCHEME}hash}.
        @return: an L{IUserDatabase} with those users.
        """
        raise NotImplementedError()

    def test_interface(self) -> None:
        """
        The database provides L{IUserDatabase}.
        """
        self.assertTrue(verifyObject(IUserDatabase, self.makeDatabase({})))

    @defer.inlineCallbacks
    def test_lookup(self):
        """
        C{lookup} fires with the user, its hash parsed, not suspended.
        """
        db = self.makeDatabase({"alice@example.org": CRAM})
        user = yield db.lookup("alice@example.org")
        self.assertEqual(
            (user.login, user.password, user.suspended),
            ("alice@example.org", PasswordHash("CRAM-MD5", "ab" * 32), False),
        )

    @defer.inlineCallbacks
    def test_ignoresCase(self):
        """
        A login is found in any case, and comes back lower-cased.
        """
        db = self.makeDatabase({"Alice@Example.ORG": CRAM})
        user = yield db.lookup("ALICE@example.org")
        self.assertEqual(user.login, "alice@example.org")

    @defer.inlineCallbacks
    def test_unknown(self):
        """
        C{lookup} fires with L{None} for a login nobody has.
        """
        db = self.makeDatabase({"alice@example.org": CRAM})
        self.assertIsNone((yield db.lookup("bob@example.org")))

    @defer.inlineCallbacks
    def test_malformedHash(self):
        """
        A user whose stored hash cannot be parsed is looked up as nobody:
        its logins fail like a wrong password.
        """
        db = self.makeDatabase({"a@example.org": "{NOPE}x", "b@example.org": CRAM})
        self.assertIsNone((yield db.lookup("a@example.org")))
        self.assertIsNotNone((yield db.lookup("b@example.org")))


class UsersFileLookupTests(LookupTestsMixin, unittest.TestCase):
    """The users file answers lookups as PostgreSQL does."""

    def makeDatabase(self, users: dict[str, str]) -> UserDatabase:
        return usersFileDatabase(self, users)


class PostgreSQLLookupTests(DatabaseMixin, LookupTestsMixin, unittest.TestCase):
    """L{PostgreSQLUserDatabase} reads C{mailauth.users}."""

    def makeDatabase(self, users: dict[str, str]) -> PostgreSQLUserDatabase:
        for login, stored in users.items():
            self.sql(
                "INSERT INTO mailauth.users (login, password) VALUES (%s, %s)",
                login.lower(),
                stored,
            )
        return openDatabase(self, self.uri, clock=task.Clock())

    @defer.inlineCallbacks
    def test_suspended(self):
        """
        A suspended user is found, with its flag set.
        """
        db = self.makeDatabase({"a@example.org": CRAM, "b@example.org": CRAM})
        self.store.setSuspended("a@example.org", True)
        self.assertTrue((yield db.lookup("a@example.org")).suspended)
        self.assertFalse((yield db.lookup("b@example.org")).suspended)

    @defer.inlineCallbacks
    def test_quotesInLogin(self):
        """
        A login with SQL in it is only a login: queries take parameters.
        """
        db = self.makeDatabase({"a@example.org": CRAM})
        self.assertIsNone((yield db.lookup("x' OR 'a'='a")))
        self.assertEqual(len(self.sql("SELECT * FROM mailauth.users")), 1)

    @defer.inlineCallbacks
    def test_malformedHashLoggedOnce(self):
        """
        An unusable stored hash is logged once (without the hash), not at
        every login; again when it changes to another unusable one; and
        the user can log in once it is fixed.
        """
        events = captureLog(self)
        db = self.makeDatabase({"a@example.org": "{NOPE}secret"})
        for _ in range(3):
            self.assertIsNone((yield db.lookup("a@example.org")))
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["log_level"].name, "error")
        self.assertEqual(events[0]["login"], "a@example.org")
        self.assertIn("unknown password scheme {NOPE}", events[0]["problem"])
        self.assertNotIn("secret", repr(events[0]))
        self.sql("UPDATE mailauth.users SET password = '{NOPE}other'")
        self.assertIsNone((yield db.lookup("a@example.org")))
        self.assertEqual(len(events), 2)
        self.sql("UPDATE mailauth.users SET password = %s", CRAM)
        self.assertEqual((yield db.lookup("a@example.org")).password.scheme, "CRAM-MD5")

    @defer.inlineCallbacks
    def test_malformedHashLoggedOncePerLogin(self):
        """Nor is it logged again for another spelling of the same login."""
        events = captureLog(self)
        db = self.makeDatabase({"a@xn--bcher-kva.example": "{NOPE}secret"})
        for spelling in ("a@xn--bcher-kva.example", "A@Bücher.example", '"a"@bücher.example.'):
            self.assertIsNone((yield db.lookup(spelling)))
        self.assertEqual([e["login"] for e in events], ["a@xn--bcher-kva.example"])

    @defer.inlineCallbacks
    def test_noSchema(self):
        """
        A database without the mailauth tables makes lookups fail with
        L{UserDatabaseUnavailable}, saying to run C{db init}.
        """
        db = openDatabase(self, self.server.uri(self.server.createDatabase()), clock=task.Clock())
        e = yield self.assertFailure(db.lookup("a@example.org"), UserDatabaseUnavailable)
        self.assertIn("run 'mailauth db init'", str(e))

    @defer.inlineCallbacks
    def test_statementTimeout(self):
        """
        The server cancels a lookup that waits longer than the timeout (here
        on a lock), and the lookup fails with L{UserDatabaseUnavailable};
        the clock, never advanced, plays no part.
        """
        db = openDatabase(self, self.uri, clock=task.Clock(), timeout=0.2)
        locker = self.server.connect(self.database)
        # Cleanups run last first: the lock goes before the pool is closed.
        self.addCleanup(locker.close)
        locker.autocommit = False
        locker.cursor().execute("LOCK TABLE mailauth.users IN ACCESS EXCLUSIVE MODE")
        e = yield self.assertFailure(db.lookup("a@example.org"), UserDatabaseUnavailable)
        self.assertIn("did not answer in time", str(e))

    test_statementTimeout.timeout = 30  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_overTCP(self):
        """
        A URI naming a host and port works as one naming the socket folder.
        """
        self.sql("INSERT INTO mailauth.users (login, password) VALUES ('a@example.org', %s)", CRAM)
        db = openDatabase(self, self.server.uri(self.database, tcp=True), clock=task.Clock())
        self.assertEqual((yield db.lookup("A@example.org")).login, "a@example.org")


class OutageTests(unittest.TestCase):
    """
    A server of the test's own is stopped, restarted and frozen under a
    L{PostgreSQLUserDatabase} that stays the same object throughout.
    """

    def setUp(self) -> None:
        self.server = pgharness.privateServer(self)
        self.database = self.server.createDatabase()
        initSchema(self.server.uri(self.database))
        PostgreSQLUserStore(self.server.uri(self.database)).addUser("a@example.org", CRAM)
        self.clock = task.Clock()

    def lookups(self, db: PostgreSQLUserDatabase, count: int) -> defer.Deferred:
        """C{count} lookups at once (so several pooled connections are used)."""
        return defer.DeferredList(
            [db.lookup("a@example.org") for _ in range(count)], consumeErrors=True
        )

    @defer.inlineCallbacks
    def checkRecovers(self, tcp: bool):
        events = captureLog(self)
        db = openDatabase(
            self, self.server.uri(self.database, tcp=tcp), clock=self.clock, connections=3
        )
        results = yield self.lookups(db, 6)
        self.assertEqual([ok for ok, _ in results], [True] * 6)

        self.server.stop()
        for _ in range(2):
            e = yield self.assertFailure(db.lookup("a@example.org"), UserDatabaseUnavailable)
            self.assertIn("cannot reach", str(e))
        # Failed at once, on the connection error: the clock never moved
        # and no timeout is left waiting.
        self.assertEqual((self.clock.seconds(), self.clock.getDelayedCalls()), (0, []))

        self.server.start()
        results = yield self.lookups(db, 6)
        self.assertEqual(
            [(ok, getattr(r, "login", r)) for ok, r in results], [(True, "a@example.org")] * 6
        )
        # The outage is logged when it starts and when it ends, not at
        # every lookup; adbapi logs no tracebacks.
        self.assertEqual([e["log_level"].name for e in events], ["error", "info"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_restartOverSocket(self):
        """
        With the server stopped, lookups fail with L{UserDatabaseUnavailable}
        at once (not on a timeout); once it is back, every lookup works
        again, on every pooled connection, the first time.
        """
        return self.checkRecovers(tcp=False)

    def test_restartOverTCP(self):
        """
        The same through 127.0.0.1, where a dropped connection shows only
        when it is next used.
        """
        return self.checkRecovers(tcp=True)

    @defer.inlineCallbacks
    def test_hungServer(self):
        """
        A lookup on a server that hangs fails with L{UserDatabaseUnavailable}
        when the timeout runs out on the clock; lookups work again once the
        server does.
        """
        db = openDatabase(
            self, self.server.uri(self.database), clock=self.clock, timeout=5, connections=1
        )
        yield db.lookup("a@example.org")
        self.server.pause()
        self.addCleanup(self.server.resume)
        d = db.lookup("a@example.org")
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        e = self.failureResultOf(d, UserDatabaseUnavailable).value
        self.assertIn("did not answer within 5s", str(e))
        self.server.resume()
        self.assertEqual((yield db.lookup("a@example.org")).login, "a@example.org")

    @defer.inlineCallbacks
    def test_hungConnectionReplaced(self):
        """
        A connection that stops answering while the server is otherwise
        well (its backend frozen, as behind a hung proxy or a host gone
        without a reset) costs one lookup its 454: the lookup that gave up
        frees the pool thread waiting on it, and the next lookup, on the
        same single thread, connects again and works. Before, that thread
        waited on the dead connection until TCP gave up, hours later, and
        every login got 454 until a restart.
        """
        events = captureLog(self)
        db = openDatabase(
            self, self.server.uri(self.database), clock=self.clock, timeout=30, connections=1
        )
        yield db.lookup("a@example.org")
        # The lookup's query waits for a lock, so that it is surely sent
        # before its backend is frozen; then the lock is let go.
        locker = self.server.connect(self.database)
        self.addCleanup(locker.close)
        locker.autocommit = False
        locker.cursor().execute("LOCK TABLE mailauth.users IN ACCESS EXCLUSIVE MODE")
        d = db.lookup("a@example.org")
        waiting = (
            "SELECT pid FROM pg_stat_activity"
            " WHERE application_name = 'mailauth' AND wait_event_type = 'Lock'"
        )
        backends: list = []
        for _ in range(200):
            backends = self.server.execute("postgres", waiting)
            if backends:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        [(backend,)] = backends
        os.kill(backend, signal.SIGSTOP)
        self.addCleanup(os.kill, backend, signal.SIGCONT)
        locker.rollback()
        self.clock.advance(30)
        self.failureResultOf(d, UserDatabaseUnavailable)
        # Within 20 s of real time, not when the frozen backend comes back.
        user = yield db.lookup("a@example.org").addTimeout(20, reactor)
        self.assertEqual(user.login, "a@example.org")
        self.assertEqual([e["log_level"].name for e in events], ["error", "info"])
        self.assertEqual(self.flushLoggedErrors(), [])


class DaemonRoleTests(DatabaseMixin, unittest.TestCase):
    """The daemon's role with exactly the grants docs/postgresql.rst gives it."""

    def test_documentedGrantsSuffice(self) -> None:
        """
        With those grants check-config passes, and the daemon looks users
        up, suspends a login (C{suspend_after}), rehashes a password
        (C{rehash = yes}) and records an app password's last use.
        """
        role = f"daemon_{self.database}"
        self.sql(f'CREATE ROLE "{role}" LOGIN')
        self.addCleanup(self.sql, f'DROP OWNED BY "{role}"')
        with open(os.path.join(ROOT, "docs", "postgresql.rst")) as f:
            grants = [line.strip() for line in f if line.startswith("    GRANT ")]
        self.assertEqual(len(grants), 4)
        for grant in grants:
            self.sql(grant.replace("TO mailauth;", f'TO "{role}"'))
        uri = self.uri.replace("user=postgres", f"user={role}")
        self.assertIn(f"user={role}", uri)
        self.store.addUser("a@example.org", SHA512)
        hashed = makeHash(b"app-secret", "SHA512-CRYPT")
        self.store.addAppPassword("a@example.org", "phone", hashed, 1700000000, "abcd")

        daemon = PostgreSQLUserStore(uri)
        self.assertIsNone(checkDatabase(uri))
        [(app, _)] = daemon.listAppPasswords("a@example.org")
        daemon.appPasswordUsed("a@example.org", app, 1700000500)
        self.assertTrue(daemon.upgradePassword("a@example.org", parse(SHA512), CRAM))
        daemon.setSuspended("a@example.org", True)
        self.assertEqual(
            self.sql(
                "SELECT u.password, u.suspended, extract(epoch FROM a.last_used)::bigint"
                " FROM mailauth.users u JOIN mailauth.app_passwords a USING (login)"
            ),
            [(CRAM, True, 1700000500)],
        )


class StoreTests(DatabaseMixin, unittest.TestCase):
    """L{PostgreSQLUserStore} edits C{mailauth.users}."""

    def test_interface(self) -> None:
        """
        Both stores provide L{IUserStore}; L{storeFor} picks one by the
        form of C{[auth] users}.
        """
        self.assertTrue(verifyObject(IUserStore, self.store))
        self.assertTrue(verifyObject(IUserStore, UsersFileStore("/nonexistent")))
        self.assertIsInstance(storeFor(self.uri), PostgreSQLUserStore)
        self.assertIsInstance(storeFor("/etc/mailauth/users"), UsersFileStore)

    def test_addUser(self) -> None:
        """
        C{addUser} stores the login lower-cased, the hash as given, not
        suspended, with its times.
        """
        self.store.addUser("Alice@Example.org", CRAM)
        [row] = self.sql(
            "SELECT login, password, suspended, created <= updated FROM mailauth.users"
        )
        self.assertEqual(row, ("alice@example.org", CRAM, False, True))
        self.assertTrue(self.store.hasUser("ALICE@example.org"))
        self.assertFalse(self.store.hasUser("bob@example.org"))

    def test_addUserExists(self) -> None:
        """
        Adding a login that exists, in any case, fails and changes nothing.
        """
        self.store.addUser("a@example.org", CRAM)
        with self.assertRaises(UserDatabaseError) as caught:
            self.store.addUser("A@example.org", "{PLAIN}x")
        self.assertEqual(str(caught.exception), f"user A@example.org already exists in {self.uri}")
        self.assertEqual(self.sql("SELECT password FROM mailauth.users"), [(CRAM,)])

    def test_addUserInvalid(self) -> None:
        """
        A login that is not an address, or a hash that cannot be parsed, is
        refused.
        """
        self.assertRaises(UserDatabaseError, self.store.addUser, "alice", CRAM)
        with self.assertRaises(UserDatabaseError) as caught:
            self.store.addUser("a@example.org", "{NOPE}x")
        self.assertIn("unknown password scheme", str(caught.exception))
        self.assertEqual(self.sql("SELECT * FROM mailauth.users"), [])

    def test_setPassword(self) -> None:
        """
        C{setPassword} replaces the hash and moves C{updated} on; it fails
        for a login nobody has.
        """
        self.store.addUser("a@example.org", CRAM)
        self.sql("UPDATE mailauth.users SET updated = updated - interval '1 day'")
        self.store.setPassword("A@example.org", "{PLAIN}new")
        [row] = self.sql("SELECT password, updated > created FROM mailauth.users")
        self.assertEqual(row, ("{PLAIN}new", True))
        with self.assertRaises(UserDatabaseError) as caught:
            self.store.setPassword("b@example.org", CRAM)
        self.assertEqual(str(caught.exception), f"no user b@example.org in {self.uri}")
        self.assertRaises(UserDatabaseError, self.store.setPassword, "a@example.org", "{NOPE}x")

    def test_deleteUser(self) -> None:
        """
        C{deleteUser} removes the user and its app passwords; it fails for a
        login nobody has.
        """
        self.store.addUser("a@example.org", CRAM)
        self.store.addUser("b@example.org", CRAM)
        self.sql(
            "INSERT INTO mailauth.app_passwords (login, label, password)"
            " VALUES ('a@example.org', 'phone', %s)",
            CRAM,
        )
        self.store.deleteUser("A@example.org")
        self.assertEqual(self.store.listUsers(), [("b@example.org", "CRAM-MD5")])
        self.assertEqual(self.sql("SELECT * FROM mailauth.app_passwords"), [])
        with self.assertRaises(UserDatabaseError) as caught:
            self.store.deleteUser("a@example.org")
        self.assertEqual(str(caught.exception), f"no user a@example.org in {self.uri}")

    def test_setSuspended(self) -> None:
        """
        C{setSuspended} suspends a user and lifts it, and fails for a login
        nobody has; lookups see the flag.
        """
        self.store.addUser("a@example.org", CRAM)
        self.store.setSuspended("A@example.org", True)
        self.assertEqual(self.sql("SELECT suspended FROM mailauth.users"), [(True,)])
        self.store.setSuspended("a@example.org", False)
        self.assertEqual(self.sql("SELECT suspended FROM mailauth.users"), [(False,)])
        with self.assertRaises(UserDatabaseError) as caught:
            self.store.setSuspended("b@example.org", True)
        self.assertEqual(str(caught.exception), f"no user b@example.org in {self.uri}")

    def test_listUsers(self) -> None:
        """
        C{listUsers} gives every login and its scheme, by login; a hash
        that cannot be parsed shows as INVALID.
        """
        self.store.addUser("b@example.org", SHA512)
        self.store.addUser("a@example.org", CRAM)
        self.sql("INSERT INTO mailauth.users (login, password) VALUES ('c@example.org', 'x')")
        self.assertEqual(
            self.store.listUsers(),
            [
                ("a@example.org", "CRAM-MD5"),
                ("b@example.org", "SHA512-CRYPT"),
                ("c@example.org", "INVALID"),
            ],
        )

    def test_unreachable(self) -> None:
        """
        When the database cannot be reached, every edit fails with one line
        saying so, without the password of the URI.
        """
        uri = f"postgresql://u:pw@127.0.0.1:{pgharness._freePort()}/nothing"
        store = PostgreSQLUserStore(uri)
        with self.assertRaises(UserDatabaseError) as caught:
            store.hasUser("a@example.org")
        message = str(caught.exception)
        self.assertTrue(message.startswith("cannot reach postgresql://u:***@127.0.0.1:"), message)
        self.assertNotIn("\n", message)
        self.assertNotIn("pw", message.split("@", 1)[0])

    def test_noSchema(self) -> None:
        """
        Edits in a database without the mailauth tables say to run C{db init}.
        """
        uri = self.server.uri(self.server.createDatabase())
        with self.assertRaises(UserDatabaseError) as caught:
            PostgreSQLUserStore(uri).addUser("a@example.org", CRAM)
        self.assertEqual(
            str(caught.exception),
            f"{uri} has no mailauth tables, or an older schema than version {SCHEMA_VERSION}:"
            " run 'mailauth db init' to create or upgrade it",
        )

    def test_loginsStoredLowerCase(self) -> None:
        """
        The table itself refuses a login that is not lower-cased, so another
        program writing to it cannot make two spellings of one login.
        """
        psycopg2 = pgharness.driver()
        self.assertRaises(
            psycopg2.errors.CheckViolation,
            self.sql,
            "INSERT INTO mailauth.users (login, password) VALUES ('A@x.org', 'x')",
        )


class SchemaTests(unittest.TestCase):
    """L{initSchema} creates and upgrades the schema, step by step."""

    def setUp(self) -> None:
        self.server = pgharness.sharedServer()
        self.database = self.server.createDatabase()
        self.uri = self.server.uri(self.database)

    def sql(self, statement: str, *params: Any) -> list:
        return self.server.execute(self.database, statement, params)

    def tables(self) -> list[str]:
        return [
            name
            for (name,) in self.sql(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = 'mailauth' ORDER BY 1"
            )
        ]

    def test_creates(self) -> None:
        """
        On an empty database, every step is applied and recorded.
        """
        self.assertEqual(initSchema(self.uri), (0, SCHEMA_VERSION))
        self.assertEqual(self.tables(), ["app_passwords", "schema_version", "users"])
        self.assertEqual(
            self.sql("SELECT version FROM mailauth.schema_version ORDER BY 1"),
            [(v,) for v in range(1, SCHEMA_VERSION + 1)],
        )
        self.assertIsNone(checkDatabase(self.uri))

    def test_idempotent(self) -> None:
        """
        Run again, it changes nothing and keeps the users.
        """
        initSchema(self.uri)
        PostgreSQLUserStore(self.uri).addUser("a@example.org", CRAM)
        self.assertEqual(initSchema(self.uri), (SCHEMA_VERSION, SCHEMA_VERSION))
        self.assertEqual(len(self.sql("SELECT * FROM mailauth.schema_version")), SCHEMA_VERSION)
        self.assertEqual(PostgreSQLUserStore(self.uri).listUsers(), [("a@example.org", "CRAM-MD5")])

    def test_upgradeFromVersion1(self) -> None:
        """
        A version 1 database (users, no app passwords) is upgraded to the
        current version, its users kept.
        """
        self.assertEqual(initSchema(self.uri, target=1), (0, 1))
        self.assertEqual(self.tables(), ["schema_version", "users"])
        PostgreSQLUserStore(self.uri).addUser("a@example.org", CRAM)
        self.assertEqual(
            checkDatabase(self.uri),
            f"{self.uri} has mailauth schema version 1:"
            f" run 'mailauth db init' to upgrade it to {SCHEMA_VERSION}",
        )
        # The daemon's lookups say the same, without claiming the tables are gone.
        with self.assertRaises(UserDatabaseError) as caught:
            PostgreSQLUserStore(self.uri).listAccounts()
        self.assertIn("or an older schema than version", str(caught.exception))
        self.assertEqual(initSchema(self.uri), (1, SCHEMA_VERSION))
        self.assertIn("app_passwords", self.tables())
        self.assertEqual(PostgreSQLUserStore(self.uri).listUsers(), [("a@example.org", "CRAM-MD5")])

    def test_newerRefused(self) -> None:
        """
        A schema newer than this mailauth knows is left alone, with an error.
        """
        initSchema(self.uri)
        self.sql("INSERT INTO mailauth.schema_version (version) VALUES (%s)", SCHEMA_VERSION + 1)
        with self.assertRaises(UserDatabaseError) as caught:
            initSchema(self.uri)
        self.assertIn(f"schema version {SCHEMA_VERSION + 1}, newer than", str(caught.exception))
        self.assertIn("newer than", checkDatabase(self.uri))

    def test_failedStepLeavesNothing(self) -> None:
        """
        If a step fails, the whole upgrade is rolled back.
        """
        self.sql("CREATE SCHEMA mailauth")
        self.sql("CREATE TABLE mailauth.users (x int)")
        self.assertRaises(UserDatabaseError, initSchema, self.uri)
        self.assertEqual(self.tables(), ["users"])


class CommandTests(DatabaseMixin, unittest.TestCase):
    """The C{mailauth} command on a PostgreSQL user database, through L{main}."""

    def setUp(self) -> None:
        super().setUp()
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        self.config = os.path.join(directory, "mailauth.conf")
        self.writeConfig(self.uri)

    def writeConfig(self, users: str) -> None:
        with open(self.config, "w") as f:
            f.write(
                "[server]\nhostname = mail.example.org\n"
                "[listener:submission]\nendpoint = tcp:0:interface=127.0.0.1\n"
                "tls = none\nauth = optional\n"
                f"[auth]\nusers = {users}\nplaintext_requires_tls = no\n"
                "[delivery]\nlocal_domains = example.org\n"
                "maildir = /var/mail/{domain}/{localpart}/Maildir\n"
            )

    def mailauth(self, *argv: str, stdin: bytes = b"") -> int:
        self.stdin = io.BytesIO(stdin)
        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        return main(list(argv), Console(self.stdin, self.stdout, self.stderr))

    def test_userCommands(self) -> None:
        """
        C{user add}, C{passwd}, C{list} and C{del} work on the database named
        by C{--config}.
        """
        where = ("--config", self.config)
        self.assertEqual(
            self.mailauth("user", "add", "Alice@example.org", *where, stdin=b"password-one\n"), 0
        )
        self.assertEqual(self.stdout.getvalue(), f"Alice@example.org: added to {self.uri}\n")
        [(stored,)] = self.sql(
            "SELECT password FROM mailauth.users WHERE login = 'alice@example.org'"
        )
        self.assertEqual(parse(stored).scheme, "ARGON2ID")
        self.assertTrue(verify(parse(stored), b"password-one"))

        self.assertEqual(
            self.mailauth(
                "user",
                "passwd",
                "alice@example.org",
                "-s",
                "SHA512-CRYPT",
                *where,
                stdin=b"password-two\n",
            ),
            0,
        )
        self.assertEqual(
            self.stdout.getvalue(), f"alice@example.org: password changed in {self.uri}\n"
        )
        [(stored,)] = self.sql("SELECT password FROM mailauth.users")
        self.assertTrue(verify(parse(stored), b"password-two"))

        self.assertEqual(
            self.mailauth(
                "user",
                "add",
                "bob@example.org",
                "-s",
                "CRAM-MD5",
                *where,
                stdin=b"password-three\n",
            ),
            0,
        )
        self.assertEqual(self.mailauth("user", "list", *where), 0)
        self.assertEqual(
            self.stdout.getvalue(), "alice@example.org  SHA512-CRYPT\nbob@example.org    CRAM-MD5\n"
        )

        self.assertEqual(self.mailauth("user", "del", "alice@example.org", *where), 0)
        self.assertEqual(self.stdout.getvalue(), f"alice@example.org: deleted from {self.uri}\n")
        self.assertEqual(self.sql("SELECT login FROM mailauth.users"), [("bob@example.org",)])

    def test_usersOption(self) -> None:
        """
        C{--users} takes a PostgreSQL URI as well as a file.
        """
        self.assertEqual(
            self.mailauth(
                "user", "add", "a@example.org", "--users", self.uri, stdin=b"long enough\n"
            ),
            0,
        )
        self.assertEqual(self.mailauth("user", "list", "--users", self.uri), 0)
        self.assertEqual(self.stdout.getvalue(), "a@example.org  ARGON2ID\n")
        self.assertEqual(self.mailauth("user", "list", "--users", "postgresql://h:x/db"), 1)
        self.assertIn("is not host[:port]", self.stderr.getvalue())

    def test_userErrors(self) -> None:
        """
        Adding a login that exists, or changing one that does not, fails
        before a password is read.
        """
        self.store.addUser("a@example.org", CRAM)
        self.assertEqual(
            self.mailauth("user", "add", "A@example.org", "--config", self.config, stdin=b"pw\n"), 1
        )
        self.assertEqual(
            self.stderr.getvalue(), f"mailauth: user A@example.org already exists in {self.uri}\n"
        )
        self.assertEqual(self.stdin.tell(), 0)
        self.assertEqual(
            self.mailauth(
                "user", "passwd", "b@example.org", "--config", self.config, stdin=b"pw\n"
            ),
            1,
        )
        self.assertEqual(self.stderr.getvalue(), f"mailauth: no user b@example.org in {self.uri}\n")
        self.assertEqual(self.stdin.tell(), 0)

    def test_userAddDatabaseDown(self) -> None:
        """
        With the database unreachable, C{user add} says so in one line
        before a password is read.
        """
        self.writeConfig(f"postgresql://127.0.0.1:{pgharness._freePort()}/mail")
        self.assertEqual(
            self.mailauth("user", "add", "a@example.org", "--config", self.config, stdin=b"pw\n"), 1
        )
        self.assertRegex(self.stderr.getvalue(), r"^mailauth: cannot reach postgresql://.+\n$")
        self.assertEqual(self.stdin.tell(), 0)

    def test_dbInit(self) -> None:
        """
        C{db init} creates the schema, then says it is up to date.
        """
        self.server.execute(self.database, "DROP SCHEMA mailauth CASCADE")
        self.assertEqual(self.mailauth("db", "init", "--config", self.config), 0)
        self.assertEqual(
            self.stdout.getvalue(),
            f"{self.uri}: created the mailauth schema (version {SCHEMA_VERSION})\n",
        )
        self.assertEqual(self.mailauth("db", "init", "--config", self.config), 0)
        self.assertEqual(
            self.stdout.getvalue(),
            f"{self.uri}: the mailauth schema is up to date (version {SCHEMA_VERSION})\n",
        )

    def test_dbInitUpgrades(self) -> None:
        """
        C{db init} on a version 1 schema upgrades it.
        """
        self.server.execute(self.database, "DROP SCHEMA mailauth CASCADE")
        initSchema(self.uri, target=1)
        self.assertEqual(self.mailauth("db", "init", "--config", self.config), 0)
        self.assertEqual(
            self.stdout.getvalue(),
            f"{self.uri}: upgraded the mailauth schema from version 1 to {SCHEMA_VERSION}\n",
        )

    def test_dbInitUsersFile(self) -> None:
        """
        C{db init} on a configuration with a users file says there is no
        database to initialise.
        """
        self.writeConfig("/etc/mailauth/users")
        self.assertEqual(self.mailauth("db", "init", "--config", self.config), 1)
        self.assertEqual(
            self.stderr.getvalue(),
            f"mailauth: {self.config}: [auth] users is a file (/etc/mailauth/users),"
            " not a postgresql:// URI: there is no database to initialise\n",
        )

    def test_checkConfig(self) -> None:
        """
        C{check-config} connects to the database: OK when the daemon can
        read its users, one line naming the key when it cannot connect or
        the schema is missing.
        """
        self.assertEqual(self.mailauth("check-config", "--config", self.config), 0)
        self.assertEqual(self.stdout.getvalue(), f"{self.config}: OK\n")

        self.writeConfig(f"postgresql://mail:pw@127.0.0.1:{pgharness._freePort()}/mail")
        self.assertEqual(self.mailauth("check-config", "--config", self.config), 1)
        self.assertRegex(
            self.stderr.getvalue(),
            rf"^{self.config}: \[auth\] users: cannot reach"
            r" postgresql://mail:\*\*\*@127\.0\.0\.1:\d+/mail: .+\n$",
        )

        empty = self.server.uri(self.server.createDatabase())
        self.writeConfig(empty)
        self.assertEqual(self.mailauth("check-config", "--config", self.config), 1)
        self.assertEqual(
            self.stderr.getvalue(),
            f"{self.config}: [auth] users: {empty} has no"
            " mailauth tables: run 'mailauth db init'\n",
        )

    def test_checkConfigBadParameter(self) -> None:
        """
        A URI parameter that libpq does not know is found without
        connecting, as the daemon starts.
        """
        self.writeConfig(self.uri + "&sslmod=require")
        cfg = configmod.load(self.config)
        self.assertEqual(
            checks.checkFiles(cfg),
            [
                f"{self.config}: [auth] users: {self.uri}&sslmod=require:"
                ' invalid URI query parameter: "sslmod"'
            ],
        )


class EndToEndTests(unittest.TestCase):
    """
    The real daemon from L{tap.buildService}, with C{users =
    postgresql://...}, logged into with smtplib.
    """

    def setUp(self):
        self.server = pgharness.privateServer(self)
        database = self.server.createDatabase()
        uri = self.server.uri(database)
        initSchema(uri)
        PostgreSQLUserStore(uri).addUser("alice@example.test", SHA512)
        self.daemon = Daemon(self.mktemp(), settings={"auth": {"users": uri}})
        self.addCleanup(self.daemon.stop)
        self.daemon.start()

    def authenticate(self, password: str) -> defer.Deferred:
        """AUTH PLAIN after STARTTLS; fires with the reply (code, text)."""
        port = self.daemon.ports["submission"]

        def run() -> tuple[int, bytes]:
            with smtplib.SMTP(
                "127.0.0.1", port, local_hostname="client.example", timeout=30
            ) as client:
                client.starttls(context=clientContext())
                client.ehlo()
                client.user, client.password = "alice@example.test", password
                try:
                    return client.auth("PLAIN", client.auth_plain)
                except smtplib.SMTPAuthenticationError as e:
                    return e.smtp_code, e.smtp_error

        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def test_login(self):
        """
        The right password gets 235, a wrong one 535; with the database down
        every login gets 454 4.7.0, never 535; once it is back, 235 again,
        without restarting the daemon.
        """
        ok = (235, b"2.7.0 Authentication successful")
        self.assertEqual((yield self.authenticate("alice-secret")), ok)
        self.assertEqual(
            (yield self.authenticate("wrong")), (535, b"5.7.8 Authentication credentials invalid")
        )
        self.server.stop()
        down = (454, b"4.7.0 Temporary authentication failure")
        self.assertEqual((yield self.authenticate("alice-secret")), down)
        self.assertEqual((yield self.authenticate("wrong")), down)
        self.server.start()
        self.assertEqual((yield self.authenticate("alice-secret")), ok)
