"""
Tests that a PostgreSQL user database (L{mailauth.pgusers},
L{mailauth.pglookups}) finds a login by every spelling the users file
accepts (L{mailauth.addresses.normalise}), and that C{mailauth db init}
brings logins stored by older versions to that form, against a real
PostgreSQL server (L{tests.pgharness}).
"""

from __future__ import annotations

import io
import os
from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from mailauth.cli import Console, main
from mailauth.passwords import makeHash
from mailauth.pgusers import initSchema
from mailauth.userdb import UserDatabase, UserDatabaseError
from tests.support import usersFileDatabase
from tests.test_pgusers import CRAM, DatabaseMixin, openDatabase

# One login, spelled with its domain in U-labels and in A-labels.
ULABEL = "carol@bücher.example"
ALABEL = "carol@xn--bcher-kva.example"
# A local part in NFD (e + combining acute) and its NFC key.
NFD = "rene\u0301@example.org"
NFC = "ren\u00e9@example.org"
APP = makeHash(b"app-password", "SHA512-CRYPT")


class SpellingsMixin:
    """Both user databases find one login by each spelling of it."""

    def makeDatabase(self, users: dict[str, str]) -> Any:
        raise NotImplementedError()

    @defer.inlineCallbacks
    def test_domainLabels(self):
        """
        A login stored with its domain in U-labels logs in with the A-label
        spelling, and the other way round.
        """
        db = self.makeDatabase({ULABEL: CRAM, "dave@xn--bcher-kva.example": CRAM})
        for spelling in (ULABEL, ALABEL, "Carol@BÜCHER.example"):
            self.assertIsNotNone((yield db.lookup(spelling)), spelling)
        self.assertIsNotNone((yield db.lookup("dave@bücher.example")))

    @defer.inlineCallbacks
    def test_unicodeNormalForm(self):
        """
        A local part is found in either Unicode normal form.
        """
        db = self.makeDatabase({NFD: CRAM})
        self.assertIsNotNone((yield db.lookup(NFC)))
        self.assertIsNotNone((yield db.lookup(NFD)))


class UsersFileSpellingsTests(SpellingsMixin, unittest.TestCase):
    """The users file, the reference behaviour."""

    def makeDatabase(self, users: dict[str, str]) -> UserDatabase:
        return usersFileDatabase(self, users)


class PostgreSQLSpellingsTests(DatabaseMixin, SpellingsMixin, unittest.TestCase):
    """PostgreSQL, with users added by C{mailauth user add}."""

    def makeDatabase(self, users: dict[str, str]) -> Any:
        for login, stored in users.items():
            self.store.addUser(login, stored)
        return openDatabase(self, self.uri, clock=task.Clock())

    def test_storedAsKey(self) -> None:
        """
        C{addUser} stores the key of the login; any other spelling of it is
        then the same user to every edit.
        """
        self.store.addUser(ULABEL, CRAM)
        self.assertEqual(self.sql("SELECT login FROM mailauth.users"), [(ALABEL,)])
        with self.assertRaises(UserDatabaseError) as caught:
            self.store.addUser(ALABEL, CRAM)
        self.assertIn("already exists", str(caught.exception))
        self.assertTrue(self.store.hasUser("CAROL@bücher.example"))
        self.store.setSuspended(ULABEL, True)
        self.store.setPassword(ULABEL, APP)
        self.assertEqual(
            self.sql("SELECT login, password, suspended FROM mailauth.users"),
            [(ALABEL, APP, True)],
        )
        self.store.addAppPassword(ULABEL, "phone", APP, 1700000000, "abcd")
        self.assertEqual([a.label for a, _ in self.store.listAppPasswords(ALABEL)], ["phone"])
        self.store.deleteAppPassword(ULABEL, "phone")
        self.store.deleteUser(ULABEL)
        self.assertEqual(self.sql("SELECT login FROM mailauth.users"), [])

    @defer.inlineCallbacks
    def test_olderRowsStillFound(self):
        """
        A row an older version stored (only lower-cased, its domain in
        U-labels), before C{db init} stores it anew, still logs in and is
        still edited as it is spelled, and a new user cannot take its key.
        """
        self.sql("INSERT INTO mailauth.users (login, password) VALUES (%s, %s)", ULABEL, CRAM)
        db = openDatabase(self, self.uri, clock=task.Clock())
        user = yield db.lookup("Carol@Bücher.example")
        self.assertEqual(user.login, ULABEL)
        self.assertRaises(UserDatabaseError, self.store.addUser, ALABEL, CRAM)
        self.store.setSuspended(ULABEL, True)
        self.assertEqual(self.sql("SELECT login, suspended FROM mailauth.users"), [(ULABEL, True)])


class UpgradeTests(DatabaseMixin, unittest.TestCase):
    """C{db init} stores logins written by older versions as their key."""

    def older(self, login: str, *apps: str) -> None:
        """Store C{login} as versions before this one did: lower-cased."""
        self.sql("INSERT INTO mailauth.users (login, password) VALUES (%s, %s)", login, CRAM)
        for n, label in enumerate(apps):
            self.sql(
                "INSERT INTO mailauth.app_passwords (login, label, password, prefix)"
                " VALUES (%s, %s, %s, %s)",
                login,
                label,
                APP,
                f"abc{n}",
            )

    @defer.inlineCallbacks
    def test_renamed(self):
        """
        C{initSchema} stores an older row under its key, with its app
        passwords, flags and hash, and says so; it then logs in by either
        spelling. Run again, it changes nothing.
        """
        self.older(ULABEL, "phone")
        self.older(NFD)
        self.older("plain@example.org")
        self.sql("UPDATE mailauth.users SET suspended = true WHERE login = %s", ULABEL)
        said: list[str] = []
        initSchema(self.uri, say=said.append)
        self.assertEqual(
            said,
            [
                f"{ULABEL}: stored as {ALABEL}, which every spelling of it finds",
                f"{NFD}: stored as {NFC}, which every spelling of it finds",
            ],
        )
        self.assertEqual(
            sorted(self.sql("SELECT login, password, suspended FROM mailauth.users")),
            sorted([(ALABEL, CRAM, True), (NFC, CRAM, False), ("plain@example.org", CRAM, False)]),
        )
        self.assertEqual(
            self.sql("SELECT login, label FROM mailauth.app_passwords"), [(ALABEL, "phone")]
        )
        db = openDatabase(self, self.uri, clock=task.Clock())
        for spelling in (ULABEL, ALABEL):
            user = yield db.lookup(spelling)
            self.assertEqual(
                (user.login, [a.label for a in user.appPasswords]), (ALABEL, ["phone"])
            )
        said.clear()
        initSchema(self.uri, say=said.append)
        self.assertEqual(said, [])

    def test_collision(self) -> None:
        """
        A row whose key another row has is kept as it is, and reported;
        once one of them is deleted by its spelling, the next run stores
        the other under the key.
        """
        self.older(ALABEL, "tablet")
        self.older(ULABEL, "phone")
        said: list[str] = []
        initSchema(self.uri, say=said.append)
        self.assertEqual(
            said,
            [
                f"{ULABEL}: not stored as {ALABEL}, another user's login; it logs in only as"
                f" spelled here until one of them is deleted ('mailauth user del {ULABEL}')"
            ],
        )
        self.assertEqual(
            sorted(self.sql("SELECT login, label FROM mailauth.app_passwords")),
            [(ULABEL, "phone"), (ALABEL, "tablet")],
        )
        # Each is edited as it is spelled.
        self.store.setSuspended(ULABEL, True)
        self.assertEqual(
            sorted(self.sql("SELECT login, suspended FROM mailauth.users")),
            [(ULABEL, True), (ALABEL, False)],
        )
        self.store.deleteUser(ALABEL)
        said.clear()
        initSchema(self.uri, say=said.append)
        self.assertEqual(said, [f"{ULABEL}: stored as {ALABEL}, which every spelling of it finds"])
        self.assertEqual(
            self.sql("SELECT login, label FROM mailauth.app_passwords"), [(ALABEL, "phone")]
        )

    def test_dbInitCommand(self) -> None:
        """
        C{mailauth db init} prints what it stored anew.
        """
        self.older(ULABEL)
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        config = os.path.join(directory, "mailauth.conf")
        with open(config, "w") as f:
            f.write(
                "[server]\nhostname = mail.example.org\n"
                "[listener:submission]\nendpoint = tcp:2587\ntls = none\nauth = optional\n"
                f"[auth]\nusers = {self.uri}\nplaintext_requires_tls = no\n"
                "[delivery]\nlocal_domains = example.org\n"
                "maildir = /var/mail/{domain}/{localpart}/Maildir\n"
            )
        stdout, stderr = io.StringIO(), io.StringIO()
        code = main(["db", "init", "--config", config], Console(io.BytesIO(), stdout, stderr))
        self.assertEqual((code, stderr.getvalue()), (0, ""))
        self.assertEqual(
            stdout.getvalue().splitlines()[0],
            f"{self.uri}: {ULABEL}: stored as {ALABEL}, which every spelling of it finds",
        )
