"""
Tests for L{mailauth.userstore}: the users file as a store (suspension,
app passwords, password upgrades), the daemon's rehash after a login, and
the C{mailauth user suspend|resume} commands.
"""

from __future__ import annotations

import os
import re
import smtplib
import time

from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailauth import passwords
from mailauth.apppasswords import AppPassword
from mailauth.checkers import PasswordChecker
from mailauth.interfaces import IAccountStore, IUserStore
from mailauth.passwords import makeHash, needsRehash, parse, verify
from mailauth.pglookups import PostgreSQLUserDatabase
from mailauth.pgusers import initSchema
from mailauth.sasl import PlaintextCredentials
from mailauth.userdb import UserDatabase, UserDatabaseError, parseUsers
from mailauth.userstore import (
    AppPasswordUse,
    Rehasher,
    UsersFileStore,
    schemesNeededBy,
    storeFor,
)
from tests import pgharness
from tests.fakes import MemoryUserDatabase, MemoryUserStore, runInline
from tests.harness import (
    PASSWORD,
    AttackMixin,
    Daemon,
    LogWatcher,
    plain,
    smtpClient,
)
from tests.support import DATA, SECRET, runCommand

ARGON2ID = (
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$Yv3/T9rrrv6fTA4YLmxCNw"
    "$Eb8O3csleuZHx+iXWfHW5sx5Q1T2CZTyh/VRQ0yaFzU"
)
SHA256 = "{SHA256-CRYPT}$5$asVPx5CccgLd6Jem$3fNTongCSv7/.7KYc2vxnath7E/5zur79mlrjOcsjI8"
ORIGINAL = (
    "# users\n"
    f"alice@example.org:{SHA256}:1000:1000:Alice:/home/alice::userdb_quota_rule=*:1G\n"
    f"bob@example.org:{ARGON2ID}\n"
)


class StoreTestMixin:
    """A users file holding L{ORIGINAL}, and a store over it."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory)
        self.path = os.path.join(self.directory, "users")
        with open(self.path, "w") as f:
            f.write(ORIGINAL)
        self.store = UsersFileStore(self.path, lastUsedPath=os.path.join(self.directory, "used"))

    def read(self) -> str:
        with open(self.path) as f:
            return f.read()

    def loaded(self, login: str):
        db = UserDatabase(self.path)
        db.load()
        return db.get(login)


class UsersFileStoreTests(StoreTestMixin, unittest.TestCase):
    def test_suspendWritesNologin(self) -> None:
        """
        Suspending adds Dovecot's C{nologin} extra field, after the fields
        that must come before it, keeping every other field; loading reads
        the user as suspended.
        """
        self.store.setSuspended("Bob@example.org", True)
        self.assertEqual(self.read().splitlines()[2], f"bob@example.org:{ARGON2ID}::::::nologin")
        self.store.setSuspended("alice@example.org", True)
        self.assertEqual(
            self.read().splitlines()[1],
            f"alice@example.org:{SHA256}:1000:1000:Alice:/home/alice::"
            "userdb_quota_rule=*:1G nologin",
        )
        self.assertTrue(self.loaded("bob@example.org").suspended)
        self.assertTrue(self.loaded("alice@example.org").suspended)

    def test_suspendTwice(self) -> None:
        """Suspending a suspended login changes nothing."""
        self.store.setSuspended("bob@example.org", True)
        before = self.read()
        self.store.setSuspended("bob@example.org", True)
        self.assertEqual(self.read(), before)

    def test_resume(self) -> None:
        """
        Resuming removes C{nologin} (in either form) and its C{reason=},
        and the empty fields added for them: the line is as before.
        """
        self.store.setSuspended("alice@example.org", True)
        self.store.setSuspended("bob@example.org", True)
        self.store.setSuspended("alice@example.org", False)
        self.store.setSuspended("bob@example.org", False)
        self.assertEqual(self.read(), ORIGINAL)
        with open(self.path, "a") as f:
            f.write(f"carol@example.org:{ARGON2ID}::::::nologin=y reason=Moved userdb_x=1\n")
        self.assertTrue(self.loaded("carol@example.org").suspended)
        self.store.setSuspended("carol@example.org", False)
        self.assertEqual(
            self.read().splitlines()[3], f"carol@example.org:{ARGON2ID}::::::userdb_x=1"
        )
        self.assertFalse(self.loaded("carol@example.org").suspended)

    def test_crlfLine(self) -> None:
        """A line ending in CR LF keeps its hash whole when fields are added."""
        with open(self.path, "w") as f:
            f.write(f"bob@example.org:{ARGON2ID}\r\n")
        self.store.setSuspended("bob@example.org", True)
        user = self.loaded("bob@example.org")
        self.assertTrue(user.suspended)
        self.assertEqual(user.password, parse(ARGON2ID))

    def test_appPasswords(self) -> None:
        """
        App passwords are added as C{mailauth_app=} extra fields, listed in
        the order they were made, and deleted one at a time.
        """
        hashed = makeHash(b"abcdefghjkmnpqrstuvw")
        self.store.addAppPassword("bob@example.org", "phone", hashed, 1700000000, "abcd")
        self.store.addAppPassword("bob@example.org", "laptop", hashed, 1700000100, "wxyz")
        self.assertEqual(
            self.read().splitlines()[2],
            f"bob@example.org:{ARGON2ID}::::::mailauth_app=phone,1700000000,abcd,{hashed}"
            f" mailauth_app=laptop,1700000100,wxyz,{hashed}",
        )
        listed = self.store.listAppPasswords("BOB@example.org")
        self.assertEqual(
            [(app.label, app.created, app.prefix, used) for app, used in listed],
            [("phone", 1700000000, "abcd", None), ("laptop", 1700000100, "wxyz", None)],
        )
        self.assertEqual(
            [a.label for a in self.loaded("bob@example.org").appPasswords], ["phone", "laptop"]
        )
        self.store.deleteAppPassword("bob@example.org", "phone")
        self.assertEqual(
            [app.label for app, _ in self.store.listAppPasswords("bob@example.org")], ["laptop"]
        )
        self.store.deleteAppPassword("bob@example.org", "laptop")
        self.assertEqual(self.read(), ORIGINAL)

    def test_appPasswordRefusals(self) -> None:
        """
        What cannot be written as one extra field is refused: a label with a
        comma, a hash with white space; the file is unchanged.
        """
        hashed = makeHash(b"abcdefghjkmnpqrstuvw")
        for args, message in [
            (("bob@example.org", "p,q", hashed, 2, "efgh"), "invalid app password label 'p,q'"),
            (("bob@example.org", "tablet", "{PLAIN}a b", 2, "efgh"), "white space"),
        ]:
            e = self.assertRaises(UserDatabaseError, self.store.addAppPassword, *args)
            self.assertIn(message, str(e))
        self.assertEqual(self.read(), ORIGINAL)

    def test_malformedAppPasswordSkipped(self) -> None:
        """
        An app password field that cannot be read is skipped with a
        problem naming the line; the user and its other app passwords work.
        """
        hashed = makeHash(b"abcdefghjkmnpqrstuvw")
        text = (
            f"bob@example.org:{ARGON2ID}::::::mailauth_app=phone,x,abcd,{hashed}"
            f" mailauth_app=tab,1,efgh,{{NOPE}}x mailauth_app=ok,1,ijkm,{hashed}"
            f" mailauth_app=ok,2,nopq,{hashed}\n"
        )
        users, problems = parseUsers(text, "users")
        self.assertEqual([a.label for a in users["bob@example.org"].appPasswords], ["ok"])
        self.assertEqual(len(problems), 3)
        self.assertIn(
            "users:1: bob@example.org: app password phone: 'x' is not a creation time", problems[0]
        )
        self.assertIn("app password tab: unknown password scheme {NOPE}", problems[1])
        self.assertIn("app password ok repeats the label or prefix", problems[2])

    def test_lastUsed(self) -> None:
        """
        A recorded use is listed; a later use replaces it, an earlier one
        does not; an app password deleted and made again with the same
        label starts unused.
        """
        hashed = makeHash(b"abcdefghjkmnpqrstuvw")
        self.store.addAppPassword("bob@example.org", "phone", hashed, 100, "abcd")
        [(app, _)] = self.store.listAppPasswords("bob@example.org")
        self.store.appPasswordUsed("bob@example.org", app, 2000.0)
        self.store.appPasswordUsed("bob@example.org", app, 1500.0)
        self.assertEqual(self.store.listAppPasswords("bob@example.org"), [(app, 2000.0)])
        self.store.deleteAppPassword("bob@example.org", "phone")
        self.store.addAppPassword("bob@example.org", "phone", hashed, 200, "abcd")
        [(_, used)] = self.store.listAppPasswords("bob@example.org")
        self.assertIsNone(used)
        with open(self.store.lastUsedPath) as f:
            self.assertEqual(f.read(), "bob@example.org phone 100 2000\n")

    def test_lastUsedUnknownPlace(self) -> None:
        """Without a last-use file, uses are neither recorded nor listed."""
        store = UsersFileStore(self.path)
        app = AppPassword("phone", 1, "abcd", parse(ARGON2ID))
        store.appPasswordUsed("bob@example.org", app, 5.0)
        self.assertEqual(sorted(os.listdir(self.directory)), ["users"])

    def test_upgradePassword(self) -> None:
        """
        The hash is replaced when it is still the one verified, keeping the
        other fields; otherwise nothing is written at all.
        """
        new = makeHash(SECRET)
        self.assertTrue(self.store.upgradePassword("alice@example.org", parse(SHA256), new))
        self.assertEqual(
            self.read().splitlines()[1],
            f"alice@example.org:{new}:1000:1000:Alice:/home/alice::userdb_quota_rule=*:1G",
        )
        inode = os.stat(self.path).st_ino
        self.assertFalse(
            self.store.upgradePassword("alice@example.org", parse(SHA256), makeHash(b"other"))
        )
        self.assertFalse(self.store.upgradePassword("nobody@example.org", parse(SHA256), new))
        self.assertEqual(os.stat(self.path).st_ino, inode)

    def test_upgradeUsesFirstLine(self) -> None:
        """
        Of two lines for one login (in any form) the first is the one
        loaded, so it is the only one an upgrade may replace; if it cannot
        be read, the login is not loaded, and nothing is replaced.
        """
        new = makeHash(SECRET)
        with open(self.path, "w") as f:
            f.write(f"bob@example.org:{SHA256}\nBob@example.org:{SHA256}\n")
        self.assertTrue(self.store.upgradePassword("bob@example.org", parse(SHA256), new))
        self.assertEqual(
            self.read().splitlines(), [f"bob@example.org:{new}", f"Bob@example.org:{SHA256}"]
        )
        with open(self.path, "w") as f:
            f.write(f"bob@example.org:{{NOPE}}x\nbob@example.org:{SHA256}\n")
        self.assertFalse(self.store.upgradePassword("bob@example.org", parse(SHA256), new))


APP = makeHash(b"abcdefghjkmnpqrstuvw")


class AccountStoreTestsMixin:
    """
    What every L{IAccountStore} does alike, run against the users file and
    PostgreSQL: C{self.store} holds alice (SHA256-CRYPT) and bob
    (ARGON2ID); C{self.where} is how its errors name it.
    """

    def test_accountInterfaces(self) -> None:
        """The store provides L{IUserStore} and L{IAccountStore}, and knows uses."""
        self.assertTrue(verifyObject(IUserStore, self.store))
        self.assertTrue(verifyObject(IAccountStore, self.store))
        self.assertTrue(self.store.usesKnown)

    def test_appPasswordLifecycle(self) -> None:
        """
        App passwords are added, listed in the order they were made with
        their creation time and prefix, reach listAccounts, and are deleted
        one at a time.
        """
        self.store.addAppPassword("Bob@example.org", "phone", APP, 1700000000, "abcd")
        self.store.addAppPassword("bob@example.org", "laptop", APP, 1700000100, "wxyz")
        listed = self.store.listAppPasswords("BOB@example.org")
        self.assertEqual(
            [(app.label, app.created, app.prefix, app.password, used) for app, used in listed],
            [
                ("phone", 1700000000, "abcd", parse(APP), None),
                ("laptop", 1700000100, "wxyz", parse(APP), None),
            ],
        )
        accounts = {user.login: user for user in self.store.listAccounts()}
        self.assertEqual(
            [app.label for app in accounts["bob@example.org"].appPasswords], ["phone", "laptop"]
        )
        self.assertEqual(accounts["alice@example.org"].appPasswords, ())
        self.store.deleteAppPassword("bob@example.org", "phone")
        self.assertEqual(
            [app.label for app, _ in self.store.listAppPasswords("bob@example.org")], ["laptop"]
        )

    def test_appPasswordErrors(self) -> None:
        """
        A taken label or prefix, a bad label or prefix, an unknown user, a
        missing app password, or one more than the maximum fail, each
        saying why.
        """
        self.store.addAppPassword("bob@example.org", "phone", APP, 1, "abcd")
        cases = [
            (
                self.store.addAppPassword,
                ("bob@example.org", "phone", APP, 2, "efgh"),
                "bob@example.org already has an app password phone",
            ),
            (
                self.store.addAppPassword,
                ("bob@example.org", "tablet", APP, 2, "abcd"),
                "bob@example.org has another app password starting with abcd; make a new one",
            ),
            (
                self.store.addAppPassword,
                ("bob@example.org", "my phone", APP, 2, "efgh"),
                "invalid app password label 'my phone'",
            ),
            (
                self.store.addAppPassword,
                ("bob@example.org", "tablet", APP, 2, "EFGH"),
                "'EFGH' is not 4 lower-case letters or digits",
            ),
            (
                self.store.addAppPassword,
                ("nobody@example.org", "tablet", APP, 2, "efgh"),
                f"no user nobody@example.org in {self.where}",
            ),
            (
                self.store.deleteAppPassword,
                ("bob@example.org", "tablet"),
                "bob@example.org has no app password tablet",
            ),
            (
                self.store.deleteAppPassword,
                ("nobody@example.org", "phone"),
                f"no user nobody@example.org in {self.where}",
            ),
            (
                self.store.listAppPasswords,
                ("nobody@example.org",),
                f"no user nobody@example.org in {self.where}",
            ),
        ]
        for method, args, message in cases:
            e = self.assertRaises(UserDatabaseError, method, *args)
            self.assertIn(message, str(e))
        for i in range(15):
            self.store.addAppPassword("bob@example.org", f"app{i}", APP, 3, f"{i:04d}")
        e = self.assertRaises(
            UserDatabaseError,
            self.store.addAppPassword,
            "bob@example.org",
            "one-more",
            APP,
            4,
            "zzzz",
        )
        self.assertIn("bob@example.org already has 16 app passwords", str(e))
        self.assertEqual(len(self.store.listAppPasswords("bob@example.org")), 16)

    def test_appPasswordUsed(self) -> None:
        """
        A recorded use is listed; an earlier one does not replace it; an
        app password deleted and made again under its label starts unused.
        """
        self.store.addAppPassword("bob@example.org", "phone", APP, 100, "abcd")
        [(app, _)] = self.store.listAppPasswords("bob@example.org")
        self.store.appPasswordUsed("bob@example.org", app, 2000.0)
        self.store.appPasswordUsed("bob@example.org", app, 1500.0)
        self.assertEqual(self.store.listAppPasswords("bob@example.org"), [(app, 2000.0)])
        self.store.deleteAppPassword("bob@example.org", "phone")
        self.store.addAppPassword("bob@example.org", "phone", APP, 200, "efgh")
        [(_, used)] = self.store.listAppPasswords("bob@example.org")
        self.assertIsNone(used)

    def test_suspension(self) -> None:
        """A suspension shows in listAccounts, and is lifted; an unknown login fails."""
        self.store.setSuspended("Alice@example.org", True)
        accounts = {user.login: user.suspended for user in self.store.listAccounts()}
        self.assertEqual(accounts, {"alice@example.org": True, "bob@example.org": False})
        self.store.setSuspended("alice@example.org", False)
        self.assertFalse(any(user.suspended for user in self.store.listAccounts()))
        e = self.assertRaises(UserDatabaseError, self.store.setSuspended, "x@example.org", True)
        self.assertEqual(str(e), f"no user x@example.org in {self.where}")

    def test_upgradePasswordIfUnchanged(self) -> None:
        """
        The hash is replaced when it is still the one verified, and not
        when it was changed meanwhile, or for an unknown login.
        """
        new = makeHash(SECRET)
        self.assertTrue(self.store.upgradePassword("alice@example.org", parse(SHA256), new))
        accounts = {user.login: user.password for user in self.store.listAccounts()}
        self.assertEqual(accounts["alice@example.org"], parse(new))
        self.assertFalse(
            self.store.upgradePassword("alice@example.org", parse(SHA256), makeHash(b"other"))
        )
        self.assertFalse(self.store.upgradePassword("nobody@example.org", parse(SHA256), new))
        accounts = {user.login: user.password for user in self.store.listAccounts()}
        self.assertEqual(accounts["alice@example.org"], parse(new))


class FileAccountStoreTests(StoreTestMixin, AccountStoreTestsMixin, unittest.TestCase):
    """The shared suite on the users file."""

    def setUp(self) -> None:
        super().setUp()
        self.where = self.path

    def test_appPasswordsOfAnySpelling(self) -> None:
        """
        A login's app passwords are listed however the command spells it,
        as its other edits find it: a domain in U-labels for one stored in
        A-labels said there was no such user, so app-password add and list
        failed where passwd, del and suspend worked.
        """
        with open(self.path, "a") as f:
            f.write(f"carol@xn--bcher-kva.example:{SHA256}\n")
        self.store.addAppPassword("Carol@Bücher.example", "phone", APP, 1700000000, "abcd")
        [(app, used)] = self.store.listAppPasswords("carol@BÜCHER.example")
        self.assertEqual((app.label, used), ("phone", None))


class PostgreSQLAccountStoreTests(AccountStoreTestsMixin, unittest.TestCase):
    """The shared suite on PostgreSQL, a fresh database on Debian's server per test."""

    def setUp(self) -> None:
        self.server = pgharness.sharedServer()
        self.database = self.server.createDatabase()
        self.uri = self.where = self.server.uri(self.database)
        initSchema(self.uri)
        self.store = storeFor(self.uri)
        self.store.addUser("alice@example.org", SHA256)
        self.store.addUser("bob@example.org", ARGON2ID)

    def sql(self, statement: str, *params) -> list:
        return self.server.execute(self.database, statement, params)

    @defer.inlineCallbacks
    def test_lookupReadsAppPasswords(self):
        """
        The daemon's lookup reads the user's app passwords and suspension;
        a row edited by hand into something unreadable is left out.
        """
        self.store.addAppPassword("bob@example.org", "phone", APP, 1700000000, "abcd")
        self.store.setSuspended("bob@example.org", True)
        self.sql(
            "INSERT INTO mailauth.app_passwords (login, label, password, prefix)"
            " VALUES ('bob@example.org', 'broken', 'x', 'wxyz')"
        )
        db = PostgreSQLUserDatabase(self.uri, reactor)
        db.startService()
        self.addCleanup(db.stopService)
        user = yield db.lookup("BOB@example.org")
        self.assertTrue(user.suspended)
        self.assertEqual(user.appPasswords, (AppPassword("phone", 1700000000, "abcd", parse(APP)),))
        self.assertEqual(user.appPassword("abcd").label, "phone")
        alice = yield db.lookup("alice@example.org")
        self.assertEqual((alice.suspended, alice.appPasswords), (False, ()))

    def test_upgradeFromVersion2(self) -> None:
        """
        A version 2 database gets the prefix column; its users are kept and
        app passwords can be added.
        """
        database = self.server.createDatabase()
        uri = self.server.uri(database)
        self.assertEqual(initSchema(uri, target=2), (0, 2))
        self.assertEqual(initSchema(uri), (2, 3))
        store = storeFor(uri)
        store.addUser("bob@example.org", ARGON2ID)
        store.addAppPassword("bob@example.org", "phone", APP, 1, "abcd")
        self.assertEqual(
            [app.label for app, _ in store.listAppPasswords("bob@example.org")], ["phone"]
        )

    def test_prefixChecked(self) -> None:
        """The database itself refuses a malformed prefix or a repeated one."""
        self.store.addAppPassword("bob@example.org", "phone", APP, 1, "abcd")
        errors = pgharness.driver().errors
        for prefix, error in (("ABCD", errors.CheckViolation), ("abcd", errors.UniqueViolation)):
            with self.assertRaises(error):
                self.sql(
                    "INSERT INTO mailauth.app_passwords (login, label, password, prefix)"
                    " VALUES ('bob@example.org', 'tablet', 'x', %s)",
                    prefix,
                )


class NeedsRehashTests(unittest.TestCase):
    def test_outdated(self) -> None:
        """
        Every scheme but ARGON2ID is outdated, and so is ARGON2ID with an
        older version, less memory or fewer passes than today's.
        """
        outdated = [
            SHA256,
            "{PLAIN}x",
            "{ARGON2I}$argon2i$v=19$m=65536,t=3,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
            "{ARGON2ID}$argon2id$v=16$m=65536,t=3,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
            "{ARGON2ID}$argon2id$m=65536,t=3,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
            "{ARGON2ID}$argon2id$v=19$m=32768,t=3,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
            "{ARGON2ID}$argon2id$v=19$m=65536,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
        ]
        for stored in outdated:
            self.assertTrue(needsRehash(parse(stored)), stored)
        current = [
            ARGON2ID,
            makeHash(b"x"),
            "$argon2id$v=19$m=65536,t=3,p=1$c2FsdHNhbHQ$aGFz",
            "{ARGON2ID}$argon2id$v=19$m=131072,t=4,p=4$c2FsdHNhbHQ$aGFzaGhhc2g",
        ]
        for stored in current:
            self.assertFalse(needsRehash(parse(stored)), stored)

    def test_schemesNeededBy(self) -> None:
        """CRAM-MD5 keeps its schemes and plaintext; SCRAM its own keys, -PLUS or not."""
        self.assertEqual(schemesNeededBy(["PLAIN", "LOGIN"]), frozenset())
        self.assertEqual(schemesNeededBy(["CRAM-MD5"]), frozenset(passwords.CRAM_MD5_SCHEMES))
        self.assertEqual(
            schemesNeededBy(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1"]),
            frozenset(["SCRAM-SHA-256", "SCRAM-SHA-1"]),
        )


class RecordingStore:
    """An L{IAccountStore}'s upgrades and uses, recorded, or failing with C{error}."""

    def __init__(self, error: Exception = None, answer: bool = True) -> None:
        self.upgrades: list = []
        self.uses: list = []
        self.error = error
        self.answer = answer

    def upgradePassword(self, login, verified, hashString) -> bool:
        if self.error is not None:
            raise self.error
        self.upgrades.append((login, verified, hashString))
        return self.answer

    def appPasswordUsed(self, login, app, when) -> None:
        if self.error is not None:
            raise self.error
        self.uses.append((login, app.label, when))


class RehasherTests(unittest.TestCase):
    def setUp(self) -> None:
        self.logged: list = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def messages(self) -> list:
        return [
            formatEvent(e) for e in self.logged if e.get("log_namespace") == "mailauth.userstore"
        ]

    def login(self, rehasher: Rehasher, login: str, stored: str, password: bytes = SECRET):
        users = MemoryUserDatabase({login: stored})
        checker = PasswordChecker(users, runInline, rehasher=rehasher)
        return checker.requestAvatarId(PlaintextCredentials(login, password, "PLAIN"))

    def test_rehashedOnce(self) -> None:
        """
        A login with an outdated hash stores an ARGON2ID hash of the
        password, verified against the hash it replaces; it is logged, and
        tried once per login.
        """
        store = RecordingStore()
        rehasher = Rehasher(store, runInline, frozenset())
        self.successResultOf(self.login(rehasher, "alice@example.org", SHA256))
        self.successResultOf(self.login(rehasher, "alice@example.org", SHA256))
        [(login, verified, new)] = store.upgrades
        self.assertEqual((login, verified), ("alice@example.org", parse(SHA256)))
        self.assertTrue(new.startswith("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$"))
        self.assertTrue(verify(parse(new), SECRET))
        self.assertEqual(
            self.messages(),
            ["Rehashed the password of <alice@example.org> from SHA256-CRYPT to ARGON2ID"],
        )

    def test_notRehashed(self) -> None:
        """
        No rehash for a current hash, a wrong password, a scheme an offered
        mechanism needs, or an app password login.
        """
        store = RecordingStore()
        keep = schemesNeededBy(["CRAM-MD5"])
        rehasher = Rehasher(store, runInline, keep)
        self.successResultOf(self.login(rehasher, "a@example.org", ARGON2ID))
        self.failureResultOf(self.login(rehasher, "b@example.org", SHA256, b"wrong"))
        self.successResultOf(self.login(rehasher, "c@example.org", "{PLAIN}alice-secret-1"))
        self.successResultOf(self.login(rehasher, "d@example.org", makeHash(SECRET, "CRAM-MD5")))
        self.assertEqual(store.upgrades, [])
        # Without CRAM-MD5 on offer, the plaintext user is moved to ARGON2ID.
        rehasher = Rehasher(store, runInline, frozenset())
        self.successResultOf(self.login(rehasher, "c@example.org", "{PLAIN}alice-secret-1"))
        self.assertEqual([login for login, _, _ in store.upgrades], ["c@example.org"])

    def test_changedMeanwhile(self) -> None:
        """A hash changed since the login is left alone, and that is logged."""
        rehasher = Rehasher(RecordingStore(answer=False), runInline, frozenset())
        self.successResultOf(self.login(rehasher, "alice@example.org", SHA256))
        self.assertEqual(
            self.messages(),
            ["Did not rehash the password of <alice@example.org>: it was changed since the login"],
        )

    def test_failureLoggedOnce(self) -> None:
        """
        A store that cannot be written fails the rehash, never the login,
        and is logged once for the login.
        """
        store = RecordingStore(
            UserDatabaseError("cannot write /etc/mailauth/users: Read-only file system")
        )
        rehasher = Rehasher(store, runInline, frozenset())
        for _ in range(2):
            self.assertEqual(
                self.successResultOf(self.login(rehasher, "a@example.org", SHA256)), "a@example.org"
            )
        self.assertEqual(
            self.messages(),
            [
                "Cannot rehash the password of <a@example.org> to ARGON2ID: cannot write "
                "/etc/mailauth/users: Read-only file system"
            ],
        )

    def test_offTheReactor(self) -> None:
        """The hash and the write go through the runner, and the login does not wait for them."""
        pending: list = []

        def runLater(f, *args):
            d = defer.Deferred()
            pending.append((f, args, d))
            return d

        store = RecordingStore()
        rehasher = Rehasher(store, runLater, frozenset())
        checker = PasswordChecker(
            MemoryUserDatabase({"a@example.org": SHA256}), runInline, rehasher=rehasher
        )
        result = checker.requestAvatarId(PlaintextCredentials("a@example.org", SECRET, "PLAIN"))
        self.assertEqual(self.successResultOf(result), "a@example.org")
        self.assertEqual(store.upgrades, [])
        [(f, args, d)] = pending
        d.callback(f(*args))
        self.assertEqual(len(store.upgrades), 1)


class AppPasswordUseTests(unittest.TestCase):
    def test_atMostOnceAMinute(self) -> None:
        """
        Uses of one app password are written at most once a minute; another
        app password has its own minute.
        """
        clock = Clock()
        store = RecordingStore()
        use = AppPasswordUse(store, runInline, clock)
        phone = AppPassword("phone", 1, "abcd", parse(ARGON2ID))
        laptop = AppPassword("laptop", 1, "efgh", parse(ARGON2ID))
        use.record("Bob@example.org", phone)
        clock.advance(59)
        self.assertIsNone(use.record("bob@example.org", phone))
        use.record("bob@example.org", laptop)
        clock.advance(1)
        use.record("bob@example.org", phone)
        self.assertEqual(
            store.uses,
            [
                ("bob@example.org", "phone", 0),
                ("bob@example.org", "laptop", 59),
                ("bob@example.org", "phone", 60),
            ],
        )

    def test_failureLogged(self) -> None:
        """A write that fails is logged; the login is not affected."""
        logged: list = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        use = AppPasswordUse(
            RecordingStore(OSError(28, "No space left on device")), runInline, Clock()
        )
        d = use.record("bob@example.org", AppPassword("phone", 1, "abcd", parse(ARGON2ID)))
        self.successResultOf(d)
        self.assertIn(
            "Cannot record the use of app password phone of <bob@example.org>: "
            "[Errno 28] No space left on device",
            [formatEvent(e) for e in logged],
        )


class SuspendCommandTests(StoreTestMixin, unittest.TestCase):
    def test_suspendResume(self) -> None:
        """
        C{user suspend} and C{user resume} write and lift C{nologin};
        C{user list} shows the suspension.
        """
        self.assertEqual(
            runCommand("user", "suspend", "bob@example.org", "--users", self.path),
            (0, f"bob@example.org: suspended in {self.path}\n", ""),
        )
        self.assertTrue(self.loaded("bob@example.org").suspended)
        status, out, _ = runCommand("user", "list", "--users", self.path)
        self.assertEqual(
            out, "alice@example.org  SHA256-CRYPT\nbob@example.org    ARGON2ID      suspended\n"
        )
        self.assertEqual(
            runCommand("user", "resume", "bob@example.org", "--users", self.path),
            (0, f"bob@example.org: resumed in {self.path}\n", ""),
        )
        self.assertEqual(self.read(), ORIGINAL)

    def test_suspendUnknown(self) -> None:
        """Suspending an unknown login is one line of error."""
        self.assertEqual(
            runCommand("user", "suspend", "x@example.org", "--users", self.path),
            (1, "", f"mailauth: no user x@example.org in {self.path}\n"),
        )


def writeConfig(directory: str, users: str, extra: str = "") -> str:
    path = os.path.join(directory, "mailauth.conf")
    with open(path, "w") as f:
        f.write(
            "[server]\nhostname = mail.example.org\n"
            f"state_dir = {directory}/state\n"
            "[listener:submission]\nendpoint = tcp:0\ntls = none\nauth = optional\n"
            f"[auth]\nusers = {users}\n{extra}"
            "[delivery]\nlocal_domains = example.org\n"
            f"maildir = {directory}/mail/{{domain}}/{{localpart}}/Maildir\n"
        )
    return path


class RehashConfigTests(unittest.TestCase):
    def test_checkConfigWarns(self) -> None:
        """
        With C{rehash = yes}, check-config warns (and still passes) when the
        daemon's user cannot write the users file's folder; without rehash
        it says nothing. (As root, the daemon's user is --uid nobody: root
        may write anywhere.)
        """
        directory = os.path.abspath(self.mktemp())
        readonly = os.path.join(directory, "etc")
        os.makedirs(readonly)
        for folder in ("state", "mail"):
            os.mkdir(os.path.join(directory, folder))
            os.chmod(os.path.join(directory, folder), 0o777)
        # trial's own folder for the test is private: let the daemon's user in.
        os.chmod(os.path.dirname(directory), 0o755)
        users = os.path.join(readonly, "users")
        with open(users, "w") as f:
            f.write(f"bob@example.org:{ARGON2ID}\n")
        os.chmod(readonly, 0o555)
        self.addCleanup(os.chmod, readonly, 0o755)
        uid = ["--uid", "nobody"] if os.geteuid() == 0 else []
        config = writeConfig(directory, users, "rehash = yes\n")
        status, out, err = runCommand("check-config", "--config", config, *uid)
        self.assertEqual((status, out), (0, f"{config}: OK, with 1 warning(s)\n"), err)
        self.assertRegex(
            err,
            f"^{re.escape(config)}: \\[auth\\] rehash: warning: .*cannot write "
            f"{re.escape(readonly)}, so no password can be rehashed; keep the "
            "users file where the daemon may write \\(e.g. "
            "/var/lib/mailauth/users\\)\n$",
        )
        config = writeConfig(directory, users)
        self.assertEqual(
            runCommand("check-config", "--config", config, *uid), (0, f"{config}: OK\n", "")
        )

    def test_badValue(self) -> None:
        """C{rehash} takes yes or no."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = writeConfig(directory, "/dev/null", "rehash = sometimes\n")
        status, _, err = runCommand("check-config", "--config", config)
        self.assertEqual(
            (status, err), (1, f"{config}: [auth] rehash: 'sometimes' is not yes or no\n")
        )


class RehashDaemonTests(AttackMixin, unittest.TestCase):
    """The running daemon with C{rehash = yes}, users from the doveadm vectors."""

    settings = {"auth": {"rehash": "yes"}}

    @defer.inlineCallbacks
    def test_rehashOnLogin(self) -> None:
        """
        A PLAIN login of a SHA512-CRYPT user stores an ARGON2ID hash in the
        users file, which the daemon reads back; the next login is checked
        against it. A CRAM-MD5 user (CRAM-MD5 is offered) keeps its hash.
        """
        login = "alice.sha512-crypt@example.test"
        done = self.log.waitFor(r"Rehashed the password of <alice\.sha512-crypt@")
        client = yield self.inThread(
            self.loggedIn, "submissions", "127.0.0.1", login.encode(), PASSWORD.encode()
        )
        client.close()
        yield done
        with open(os.path.join(self.daemon.dir, "users")) as f:
            lines = {line.split(":")[0]: line.rstrip("\n").split(":")[1] for line in f}
        self.assertTrue(lines[login].startswith("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$"))
        self.assertTrue(verify(parse(lines[login]), PASSWORD.encode()))
        reloaded = self.log.waitFor(r"Users file .*: loaded")
        yield reloaded
        client = yield self.inThread(
            self.loggedIn, "submissions", "127.0.0.1", login.encode(), PASSWORD.encode()
        )
        client.close()
        cram = "alice.cram-md5@example.test"
        client = yield self.inThread(self.connect, "submissions")
        yield self.inThread(client.ehlo)
        code, _ = yield self.inThread(client.command, plain(cram.encode(), PASSWORD.encode()))
        self.assertEqual(code, 235)
        client.close()
        with open(os.path.join(DATA, "dovecot-passwd")) as f:
            original = [line for line in f if line.startswith(cram + ":")]
        with open(os.path.join(self.daemon.dir, "users")) as f:
            self.assertIn(original[0], f.read())
        self.assertEqual(
            [m for m in self.log.messages if "rehash" in m.lower()[:40]],
            [f"Rehashed the password of <{login}> from SHA512-CRYPT to ARGON2ID"],
        )


class PostgreSQLDaemonTests(unittest.TestCase):
    """The running daemon on a PostgreSQL user database, logged into with smtplib."""

    def setUp(self):
        self.server = pgharness.sharedServer()
        self.database = self.server.createDatabase()
        self.uri = self.server.uri(self.database)
        initSchema(self.uri)
        self.store = storeFor(self.uri)
        self.store.addUser("alice@example.test", SHA256)
        self.daemon = Daemon(self.mktemp(), settings={"auth": {"users": self.uri, "rehash": "yes"}})
        self.addCleanup(self.daemon.stop)
        self.daemon.start()
        self.log = LogWatcher()
        self.addCleanup(self.log.stop)

    def login(self, password: str) -> defer.Deferred:
        """AUTH PLAIN over implicit TLS; fires with the reply code."""
        port = self.daemon.ports["submissions"]

        def run() -> int:
            with smtpClient(port, implicit=True) as client:
                client.ehlo()
                client.user, client.password = "alice@example.test", password
                try:
                    return client.auth("PLAIN", client.auth_plain)[0]
                except smtplib.SMTPAuthenticationError as e:
                    return e.smtp_code

        return threads.deferToThread(run)

    def sql(self, statement: str) -> list:
        return self.server.execute(self.database, statement)

    @defer.inlineCallbacks
    def test_appPasswordAndRehash(self):
        """
        An app password made with the command works at once (each login
        looks the user up) and its use lands in last_used; a login with the
        user's own SHA256-CRYPT password rehashes it to ARGON2ID in the
        table; a suspended login fails with either.
        """
        status, password, err = runCommand(
            "user",
            "app-password",
            "add",
            "alice@example.test",
            "phone",
            "--config",
            self.daemon.configPath,
        )
        self.assertEqual(status, 0, err)
        self.assertEqual((yield self.login(password.strip())), 235)
        deadline = time.monotonic() + 10
        while not self.sql("SELECT 1 FROM mailauth.app_passwords WHERE last_used IS NOT NULL"):
            self.assertLess(time.monotonic(), deadline, "last_used never written")
            yield deferLater(reactor, 0.01, lambda: None)

        rehashed = self.log.waitFor("Rehashed the password of <alice@example.test>")
        self.assertEqual((yield self.login(PASSWORD)), 235)
        yield rehashed
        [(stored,)] = self.sql("SELECT password FROM mailauth.users")
        self.assertEqual(parse(stored).scheme, "ARGON2ID")
        self.assertTrue(verify(parse(stored), PASSWORD.encode()))
        self.assertEqual((yield self.login(PASSWORD)), 235)

        status, out, _ = runCommand("user", "list", "--config", self.daemon.configPath)
        self.assertEqual(out, "alice@example.test  ARGON2ID  app passwords: phone\n")


class UserStoreTestsMixin:
    """
    The L{IUserStore} contract, run against the users file, PostgreSQL and
    the in-memory fake (L{tests.fakes.MemoryUserStore}) alike: what the
    C{mailauth user} commands and the daemon's suspensions rely on.
    C{makeStore()} returns an empty store; C{suspended(login)} reads back
    whether the store holds C{login} as suspended.
    """

    def makeStore(self):
        raise NotImplementedError()

    def suspended(self, store, login: str) -> bool:
        raise NotImplementedError()

    def test_interface(self) -> None:
        """The store provides L{IUserStore}."""
        self.assertTrue(verifyObject(IUserStore, self.makeStore()))

    def test_addListHas(self) -> None:
        """Users are added once each, in any case, found and listed with their scheme."""
        store = self.makeStore()
        store.addUser("Alice@Example.org", SHA256)
        store.addUser("bob@example.org", ARGON2ID)
        self.assertTrue(store.hasUser("ALICE@example.org"))
        self.assertFalse(store.hasUser("carol@example.org"))
        self.assertEqual(
            sorted(store.listUsers()),
            [("alice@example.org", "SHA256-CRYPT"), ("bob@example.org", "ARGON2ID")],
        )
        self.assertRaises(UserDatabaseError, store.addUser, "ALICE@example.org", ARGON2ID)

    def test_refusals(self) -> None:
        """A bad hash, an unsafe login, or a user that is not there: L{UserDatabaseError}."""
        store = self.makeStore()
        self.assertRaises(UserDatabaseError, store.addUser, "a@example.org", "{NOPE}x")
        self.assertRaises(UserDatabaseError, store.addUser, "../x@example.org", ARGON2ID)
        for change in (
            lambda: store.setPassword("nobody@example.org", ARGON2ID),
            lambda: store.deleteUser("nobody@example.org"),
            lambda: store.setSuspended("nobody@example.org", True),
        ):
            self.assertRaises(UserDatabaseError, change)

    def test_passwordAndDelete(self) -> None:
        """A password is replaced; a deleted user is gone."""
        store = self.makeStore()
        store.addUser("alice@example.org", SHA256)
        store.setPassword("ALICE@example.org", ARGON2ID)
        self.assertEqual(store.listUsers(), [("alice@example.org", "ARGON2ID")])
        store.deleteUser("Alice@example.org")
        self.assertEqual(store.listUsers(), [])
        self.assertFalse(store.hasUser("alice@example.org"))

    def test_suspension(self) -> None:
        """A login is suspended and resumed; the user stays, with its password."""
        store = self.makeStore()
        store.addUser("alice@example.org", SHA256)
        store.setSuspended("ALICE@example.org", True)
        self.assertTrue(self.suspended(store, "alice@example.org"))
        store.setSuspended("alice@example.org", False)
        self.assertFalse(self.suspended(store, "alice@example.org"))
        self.assertEqual(store.listUsers(), [("alice@example.org", "SHA256-CRYPT")])


class FileUserStoreTests(UserStoreTestsMixin, unittest.TestCase):
    def makeStore(self):
        path = os.path.abspath(self.mktemp())
        return UsersFileStore(path, creating=True)

    def suspended(self, store, login: str) -> bool:
        db = UserDatabase(store.path)
        db.load()
        return db.get(login).suspended


class PostgreSQLUserStoreTests(UserStoreTestsMixin, unittest.TestCase):
    def makeStore(self):
        self.server = pgharness.sharedServer()
        self.database = self.server.createDatabase()
        uri = self.server.uri(self.database)
        initSchema(uri)
        return storeFor(uri)

    def suspended(self, store, login: str) -> bool:
        [(value,)] = self.server.execute(
            self.database, "SELECT suspended FROM mailauth.users WHERE login = %s", (login,)
        )
        return value


class MemoryUserStoreTests(UserStoreTestsMixin, unittest.TestCase):
    def makeStore(self):
        return MemoryUserStore()

    def suspended(self, store, login: str) -> bool:
        return self.successResultOf(store.lookup(login)).suspended
