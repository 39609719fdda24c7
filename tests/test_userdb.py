"""Tests for L{mailauth.userdb}, and for the fake beside it in L{tests.fakes}."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import threading
from typing import Optional

from twisted.logger import capturedLogs, formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailauth.allownets import Networks
from mailauth.interfaces import IReloadable, IUserDatabase
from mailauth.passwords import PasswordHash, makeHash, verify
from mailauth.userdb import (
    UserDatabase,
    UserDatabaseError,
    UserDatabaseUnavailable,
    addUser,
    deleteUser,
    hasUser,
    listUsers,
    parseUsers,
    setPassword,
)
from tests.fakes import MemoryUserDatabase
from tests.support import DATA, SECRET

CRAM = "{CRAM-MD5}" + "ab" * 32


class UserDatabaseTestsMixin:
    """
    Tests of L{IUserDatabase}, run against the file-backed database and the
    in-memory fake alike.
    """

    def makeDatabase(self, source: Optional[dict[str, str]]) -> IUserDatabase:
        """
        @param source: login -> C{{SCHEME}hash}, in order; L{None} for users
            that cannot be read.
        @return: a database loaded from C{source}.
        """
        raise NotImplementedError()

    def changeSource(self, db: IUserDatabase, source: Optional[dict[str, str]]) -> None:
        """
        Change what C{db} reads, as an edit of the users file would.
        """
        raise NotImplementedError()

    def test_interface(self) -> None:
        """
        The database provides L{IUserDatabase} and L{IReloadable}.
        """
        self.assertTrue(verifyObject(IUserDatabase, self.makeDatabase({})))
        self.assertTrue(verifyObject(IReloadable, self.makeDatabase({})))

    def test_lookupDeferred(self) -> None:
        """
        C{lookup}, the server's way in, gives a Deferred of what C{get}
        reads from memory: the user, or L{None}.
        """
        db = self.makeDatabase({"alice@example.org": "{PLAIN}a"})
        self.assertEqual(
            self.successResultOf(db.lookup("ALICE@example.org")), db.get("alice@example.org")
        )
        self.assertIsNone(self.successResultOf(db.lookup("carol@example.org")))

    def test_lookup(self) -> None:
        """
        C{lookup} finds a user, with its parsed hash and line number, and
        returns L{None} for anyone else.
        """
        db = self.makeDatabase({"alice@example.org": "{PLAIN}a", "bob@example.org": CRAM})
        user = db.get("bob@example.org")
        self.assertEqual(user.login, "bob@example.org")
        self.assertEqual(user.password, PasswordHash("CRAM-MD5", "ab" * 32))
        self.assertEqual(user.lineno, 2)
        self.assertIsNone(db.get("carol@example.org"))
        self.assertTrue(db.exists("alice@example.org"))
        self.assertFalse(db.exists("carol@example.org"))
        self.assertEqual(db.problems, [])

    def test_ignoresCase(self) -> None:
        """
        Logins are found in any case, and are lower-cased in what the
        database returns.
        """
        db = self.makeDatabase({"Alice@Example.ORG": "{PLAIN}a"})
        self.assertEqual(db.get("ALICE@example.org").login, "alice@example.org")
        self.assertTrue(db.exists("alice@EXAMPLE.org"))
        self.assertEqual(db.logins(), ["alice@example.org"])

    def test_logins(self) -> None:
        """
        C{logins} lists every user, sorted.
        """
        db = self.makeDatabase({"b@example.org": CRAM, "a@example.org": CRAM})
        self.assertEqual(db.logins(), ["a@example.org", "b@example.org"])

    def test_malformedEntrySkipped(self) -> None:
        """
        A user whose hash cannot be parsed is left out and reported with its
        line number; the others are loaded.
        """
        db = self.makeDatabase(
            {"a@example.org": CRAM, "b@example.org": "{NOPE}x", "c@example.org": CRAM}
        )
        self.assertEqual(db.logins(), ["a@example.org", "c@example.org"])
        self.assertEqual(len(db.problems), 1)
        self.assertRegex(db.problems[0], r"^.+:2: b@example.org: unknown password scheme \{NOPE\}")

    def test_tooCostlyEntrySkipped(self) -> None:
        """
        A user whose argon2 hash asks for 4 GiB is left out and reported
        with its line number, so that guesses at it cannot exhaust memory.
        """
        huge = (
            "{ARGON2ID}$argon2id$v=19$m=4194304,t=3,p=1$vNKqkK8DQa5S4Jc06HUpwg"
            "$x7iCyjA2f/7FGLmp8BlZlHPNy3UXmjy30VTVz5mvJEE"
        )
        db = self.makeDatabase({"a@example.org": CRAM, "b@example.org": huge})
        self.assertEqual(db.logins(), ["a@example.org"])
        self.assertEqual(len(db.problems), 1)
        self.assertRegex(db.problems[0], r"^.+:2: b@example.org: argon2 memory m=4194304 KiB")

    def test_duplicateLogin(self) -> None:
        """
        Of two entries for one login, in any case, the first wins and the
        second is reported.
        """
        db = self.makeDatabase({"a@example.org": "{PLAIN}first", "A@example.org": "{PLAIN}2nd"})
        self.assertEqual(db.get("a@example.org").password.value, "first")
        self.assertEqual(len(db.problems), 1)
        self.assertRegex(db.problems[0], r":2: duplicate login a@example.org \(first on line 1\)")

    def test_maybeReloadUnchanged(self) -> None:
        """
        C{maybeReload} does nothing if nothing changed.
        """
        db = self.makeDatabase({"a@example.org": CRAM})
        self.assertFalse(db.maybeReload())
        self.assertEqual(db.logins(), ["a@example.org"])

    def test_maybeReloadChanged(self) -> None:
        """
        After a change, C{maybeReload} reads the users again, once.
        """
        db = self.makeDatabase({"a@example.org": CRAM})
        self.changeSource(db, {"b@example.org": "{PLAIN}b", "c@example.org": CRAM})
        self.assertEqual(db.logins(), ["a@example.org"])
        self.assertTrue(db.maybeReload())
        self.assertEqual(db.logins(), ["b@example.org", "c@example.org"])
        self.assertFalse(db.maybeReload())

    def test_neverLoaded(self) -> None:
        """
        If the users could never be read, every question raises
        L{UserDatabaseUnavailable}, so that logins fail temporarily.
        """
        db = self.makeDatabase(None)
        self.assertRaises(UserDatabaseUnavailable, db.get, "a@example.org")
        self.failureResultOf(db.lookup("a@example.org"), UserDatabaseUnavailable)
        self.assertRaises(UserDatabaseUnavailable, db.exists, "a@example.org")
        self.assertRaises(UserDatabaseUnavailable, db.logins)
        self.assertFalse(db.maybeReload())

    def test_unreadableKeepsUsers(self) -> None:
        """
        If the users cannot be read any more, those read before stay, and
        come back to date when they can be read again.
        """
        db = self.makeDatabase({"a@example.org": CRAM})
        self.changeSource(db, None)
        self.assertFalse(db.maybeReload())
        db.load()
        self.assertEqual(db.logins(), ["a@example.org"])
        self.changeSource(db, {"b@example.org": CRAM})
        self.assertTrue(db.maybeReload())
        self.assertEqual(db.logins(), ["b@example.org"])


def writeUsers(path: str, source: dict[str, str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{login}:{stored}\n" for login, stored in source.items())


class UserDatabaseTests(UserDatabaseTestsMixin, unittest.TestCase):
    """L{UserDatabase} reads the users file."""

    def setUp(self) -> None:
        os.mkdir(self.mktemp())
        self.path = os.path.join(os.path.dirname(self.mktemp()), "users")
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def makeDatabase(self, source: Optional[dict[str, str]]) -> UserDatabase:
        if source is not None:
            writeUsers(self.path, source)
        db = UserDatabase(self.path)
        db.load()
        return db

    def changeSource(self, db: UserDatabase, source: Optional[dict[str, str]]) -> None:
        if source is None:
            os.remove(self.path)
        else:
            # Replaced the way an editor or our own edits do: a new inode.
            writeUsers(self.path + ".new", source)
            os.replace(self.path + ".new", self.path)

    def logged(self, level: str) -> list[dict]:
        return [
            e
            for e in self.events
            if e.get("log_namespace") == "mailauth.userdb" and e["log_level"].name == level
        ]

    def test_malformedLines(self) -> None:
        """
        Comments and blank lines are ignored; each malformed line is
        reported and logged with its line number and skipped.
        """
        with open(self.path, "w") as f:
            f.write(
                "# mailauth users\n"
                "\n"
                "alice@example.org:{PLAIN}a\n"
                "no-colon-here\n"
                ":{PLAIN}x\n"
                "bob@example.org:{CRAM-MD5}abc\n"
                "   # indented comment\n"
                "carol@example.org:{SHA512-CRYPT}$6$x$y\n"
                "dave@example.org:{PLAIN}d\n"
            )
        db = self.makeDatabase(None)
        self.assertEqual(db.logins(), ["alice@example.org", "dave@example.org"])
        self.assertEqual(
            [p.split(": ", 1)[0] for p in db.problems],
            [f"{self.path}:4", f"{self.path}:5", f"{self.path}:6", f"{self.path}:8"],
        )
        self.assertIn("no ':' after the login", db.problems[0])
        self.assertIn("empty login", db.problems[1])
        self.assertIn("64 hex digits", db.problems[2])
        self.assertEqual(db.get("dave@example.org").lineno, 9)
        self.assertEqual(len(self.logged("warn")), 4 + 1)

    def test_extraFields(self) -> None:
        """
        The fields after the hash (uid, gid, gecos, home, shell, extra) are
        ignored, and so is a CR before the line end.
        """
        with open(self.path, "w") as f:
            f.write("a@example.org:{PLAIN}pw:1000:1000::/home/a::userdb_quota_rule=*:50M\r\n")
        db = self.makeDatabase(None)
        self.assertEqual(db.get("a@example.org").password, PasswordHash("PLAIN", "pw"))

    def test_dovecotVectors(self) -> None:
        """
        The users file of doveadm's hashes loads entirely.
        """
        shutil.copy(os.path.join(DATA, "dovecot-passwd"), self.path)
        db = self.makeDatabase(None)
        self.assertEqual(len(db.logins()), 9)
        self.assertEqual(db.problems, [])
        user = db.get("alice.sha512-crypt@example.test")
        self.assertTrue(verify(user.password, SECRET))

    def test_plaintextWarnedOncePerLoad(self) -> None:
        """
        Users with plaintext passwords are named in one warning per load.
        """
        db = self.makeDatabase(
            {"a@example.org": "{PLAIN}a", "b@example.org": "{CLEAR}b", "c@example.org": CRAM}
        )
        warnings = [e for e in self.logged("warn") if "plaintext" in e["log_format"]]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["logins"], "a@example.org b@example.org")
        db.load()
        self.assertEqual(len([e for e in self.logged("warn") if "plaintext" in e["log_format"]]), 2)

    def test_unreadableFile(self) -> None:
        """
        A users file that cannot be read (here, a directory) is logged once,
        not at every periodic reload, and leaves the database unavailable.
        """
        os.mkdir(self.path)
        db = self.makeDatabase(None)
        self.assertRaises(UserDatabaseUnavailable, db.get, "a@example.org")
        self.assertFalse(db.maybeReload())
        self.assertFalse(db.maybeReload())
        errors = self.logged("error")
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["path"], self.path)

    def test_reloadWhenRewrittenInPlace(self) -> None:
        """
        A file rewritten in place, same size and inode, is read again when
        its modification time changes.
        """
        db = self.makeDatabase({"a@example.org": "{PLAIN}1"})
        inode = os.stat(self.path).st_ino
        with open(self.path, "r+") as f:
            f.write("b")
        os.utime(self.path, ns=(0, os.stat(self.path).st_mtime_ns + 1))
        self.assertEqual(os.stat(self.path).st_ino, inode)
        self.assertTrue(db.maybeReload())
        self.assertEqual(db.logins(), ["b@example.org"])

    def test_reloadAfterEdit(self) -> None:
        """
        An edit by L{addUser} is seen by the next C{maybeReload}.
        """
        db = self.makeDatabase({"a@example.org": CRAM})
        addUser(self.path, "b@example.org", CRAM)
        self.assertTrue(db.maybeReload())
        self.assertEqual(db.logins(), ["a@example.org", "b@example.org"])

    def test_emptiedIsAWarning(self) -> None:
        """
        A reload that finds no users where the last load found some (a file
        truncated by mistake locks everyone out) is a warning naming how
        many there were; loading an empty file again, or one empty from the
        start, stays at info.
        """
        db = self.makeDatabase({})
        self.assertEqual([e["count"] for e in self.logged("info")], [0])
        writeUsers(self.path, {"a@example.org": CRAM, "b@example.org": CRAM})
        self.assertTrue(db.maybeReload())
        with open(self.path, "w"):
            pass  # emptied in place: same inode
        os.utime(self.path, ns=(0, os.stat(self.path).st_mtime_ns + 1))
        self.assertTrue(db.maybeReload())
        self.assertEqual(db.logins(), [])
        [warning] = self.logged("warn")
        self.assertEqual(
            formatEvent(warning),
            f"Users file {self.path}: loaded 0 user(s), where 2 were before: every login fails",
        )
        self.assertTrue(db.load())
        self.assertEqual([e["count"] for e in self.logged("info")], [0, 2, 0])
        self.assertEqual(len(self.logged("warn")), 1)


class AllowNetsTests(unittest.TestCase):
    """Dovecot's allow_nets and allow_real_nets extra fields, as the users file is parsed."""

    def parse(self, extra: str) -> tuple:
        """The user of a line with the extra fields C{extra} (or L{None}), and the problems."""
        users, problems = parseUsers(f"alice@example.org:{CRAM}::::::{extra}\n", "users")
        return users.get("alice@example.org"), problems

    def test_none(self) -> None:
        """A line without either field restricts nothing."""
        user, problems = self.parse("nologin")
        self.assertEqual((user.allowNets, user.allowRealNets, problems), (None, None, []))

    def test_networks(self) -> None:
        """
        Single addresses and CIDR networks of both families, with host
        bits set as Dovecot allows, and C{local}; a doubled comma is
        skipped as Dovecot skips it.
        """
        user, problems = self.parse(
            "allow_nets=192.0.2.7,10.1.2.3/8,,2001:db8::/32,::1,local"
            " allow_real_nets=127.0.0.1 userdb_quota_rule=*:50M"
        )
        self.assertEqual(problems, [])
        self.assertEqual(
            [str(net) for net in user.allowNets.networks],
            ["192.0.2.7/32", "10.0.0.0/8", "2001:db8::/32", "::1/128"],
        )
        self.assertTrue(user.allowNets.local)
        self.assertEqual(user.allowRealNets, Networks.parse("127.0.0.1"))
        self.assertFalse(user.allowRealNets.local)

    def test_malformed(self) -> None:
        """
        A field that cannot be read, is empty or is given twice spoils its
        line: it is skipped with a problem naming the file, the line and
        what is wrong, never read as allowing more.
        """
        cases = {
            "allow_nets=10.0.0.0/33": "allow_nets: '10.0.0.0/33' is not an IP address",
            "allow_nets=10.0.0.0/8,example.org": "allow_nets: 'example.org' is not",
            "allow_nets=fe80::1%eth0": "allow_nets: 'fe80::1%eth0' is not",
            "allow_real_nets=10.0.0.0/8;127.0.0.1": "allow_real_nets: '10.0.0.0/8;127",
            "allow_nets=LOCAL": "allow_nets: 'LOCAL' is not",
            "allow_nets=": "allow_nets: lists no network",
            "allow_nets=,": "allow_nets: lists no network",
            "allow_nets": "allow_nets has no value",
            "allow_nets=10.0.0.0/8 allow_nets=local": "allow_nets is given twice",
        }
        for extra, why in cases.items():
            user, problems = self.parse(extra)
            self.assertIsNone(user, extra)
            [problem] = problems
            self.assertTrue(problem.startswith(f"users:1: alice@example.org: {why}"), problem)

    def test_malformedLineKeepsItsLogin(self) -> None:
        """
        A line skipped as malformed still holds its login, as the first
        line of a login does: a later line for that login, in any form, is
        a duplicate and ignored too. Taking it instead would let a login
        whose allow_nets has a typo log in from anywhere, with the password
        of whatever line follows.
        """
        users, problems = parseUsers(
            f"alice@example.org:{CRAM}::::::allow_nets=10.0.0.300/8\n"
            f"ALICE@example.org:{CRAM}\n"
            f'"alice"@example.org:{CRAM}\n'
            "bob@example.org:{NOPE}x::::::allow_nets=10.0.0.0/8\n"
            "bob@example.org:{PLAIN}b\n"
            f"carol@example.org:{CRAM}\n",
            "users",
        )
        self.assertEqual(list(users), ["carol@example.org"])
        self.assertEqual(
            [problem for problem in problems if "duplicate" in problem],
            [
                f"users:{lineno}: duplicate login {login} (first on line {first}, skipped);"
                " this line is ignored"
                for lineno, login, first in (
                    (2, "alice@example.org", 1),
                    (3, '"alice"@example.org', 1),
                    (5, "bob@example.org", 4),
                )
            ],
        )
        self.assertEqual(len(problems), 5)


class MemoryUserDatabaseTests(UserDatabaseTestsMixin, unittest.TestCase):
    """L{MemoryUserDatabase} behaves as the users file does."""

    def makeDatabase(self, source: Optional[dict[str, str]]) -> MemoryUserDatabase:
        return MemoryUserDatabase(source)

    def changeSource(self, db: MemoryUserDatabase, source: Optional[dict[str, str]]) -> None:
        db.source = source


class EditTests(unittest.TestCase):
    """The atomic edits of the users file."""

    ORIGINAL = (
        "# mailauth users\n"
        "\n"
        "alice@example.org:{PLAIN}a:1000:1000:Alice:/home/alice::userdb_quota_rule=*:1G\n"
        "broken line\n"
        "bob@example.org:{NOPE}x\n"
        "carol@example.org:" + CRAM + "\n"
    )

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.path = os.path.join(self.directory, "users")
        with open(self.path, "w") as f:
            f.write(self.ORIGINAL)
        # Readable by all, as an admin's editor may leave it.
        os.chmod(self.path, 0o644)

    def read(self) -> str:
        with open(self.path) as f:
            return f.read()

    def assertCleanlyWritten(self, mode: int = 0o640) -> None:
        """
        The file has mode C{mode} (from 0644, 0640: an edit takes away what
        the world could read) and no temporary file is left beside it.
        """
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), mode)
        self.assertEqual(sorted(os.listdir(self.directory)), ["users", "users.lock"])

    def test_addUser(self) -> None:
        """
        A new user is appended; every other line, comments and malformed
        ones included, is kept as it was.
        """
        addUser(self.path, "Dave@example.org", CRAM)
        self.assertEqual(self.read(), self.ORIGINAL + "Dave@example.org:" + CRAM + "\n")
        self.assertCleanlyWritten()

    def test_addUserCreatesFile(self) -> None:
        """
        Adding to a missing file creates it.
        """
        os.remove(self.path)
        addUser(self.path, "a@example.org", CRAM)
        self.assertEqual(self.read(), "a@example.org:" + CRAM + "\n")
        self.assertCleanlyWritten()

    def test_addUserExists(self) -> None:
        """
        A login already in the file, in any case and even on a line with a
        malformed hash, cannot be added again.
        """
        for login in ("ALICE@example.org", "bob@example.org"):
            error = self.assertRaises(UserDatabaseError, addUser, self.path, login, CRAM)
            self.assertIn("already exists", str(error))
        self.assertEqual(self.read(), self.ORIGINAL)

    def test_loginInAnyForm(self) -> None:
        """
        A login is found in every form the daemon reads as that login (its
        domain in A- or U-labels, any case): adding it again in another
        form is refused, where it wrote a line the daemon ignores as a
        duplicate, and the other edits find it.
        """
        with open(self.path, "a") as f:
            f.write("x@bücher.example:{PLAIN}old\n")
        error = self.assertRaises(
            UserDatabaseError, addUser, self.path, "X@xn--bcher-kva.example", CRAM
        )
        self.assertIn("already exists", str(error))
        setPassword(self.path, "x@xn--bcher-kva.example", CRAM)
        self.assertEqual(self.read(), self.ORIGINAL + "x@bücher.example:" + CRAM + "\n")
        self.assertTrue(hasUser(self.path, "x@XN--BCHER-KVA.example"))
        deleteUser(self.path, "x@xn--bcher-kva.example")
        self.assertEqual(self.read(), self.ORIGINAL)

    def test_malformedAllowNetsRefused(self) -> None:
        """
        A line whose allow_nets cannot be read is skipped when the file is
        loaded, with a warning naming the file, the line and the entry: its
        login cannot log in, rather than from anywhere. The other users
        (one restricted correctly) still work.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                f"alice@example.org:{CRAM}::::::allow_nets=10.0.0.0/8,10.0.0.300/8 nologin\n"
                f"bob@example.org:{CRAM}::::::allow_nets=10.0.0.0/8\n"
            )
        users = UserDatabase(path)
        with capturedLogs() as events:
            users.load()
        self.assertIn(
            f"Users file: skipped {path}:1: alice@example.org: allow_nets:"
            " '10.0.0.300/8' is not an IP address, a network or 'local'",
            [formatEvent(e) for e in events],
        )
        self.assertEqual(users.logins(), ["bob@example.org"])

    def test_byteOrderMark(self) -> None:
        """A byte-order mark an editor put first is not part of the first login."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"\xef\xbb\xbf" + f"alice@example.org:{CRAM}\n".encode())
        users = UserDatabase(path)
        users.load()
        self.assertEqual(users.logins(), ["alice@example.org"])

    def test_addUserInvalidLogin(self) -> None:
        """
        A login must look like an address and fit in the file.
        """
        for login in [
            "alice",
            "alice@",
            "@example.org",
            "a b@example.org",
            "a:b@example.org",
            "a@b@example.org",
            "#a@example.org",
            "a\n@example.org",
            "",
            # Bytes that are not UTF-8, as Python decodes them from argv.
            b"al\xffce@example.org".decode("utf-8", "surrogateescape"),
        ]:
            error = self.assertRaises(UserDatabaseError, addUser, self.path, login, CRAM)
            self.assertIn("invalid login", str(error))
        self.assertEqual(self.read(), self.ORIGINAL)

    def test_invalidHash(self) -> None:
        """
        A hash that does not parse, or that would break the line, is refused.
        """
        for hashString in ("{NOPE}x", "{PLAIN}a:b", "{PLAIN}a\nb", "{CRAM-MD5}abc"):
            self.assertRaises(UserDatabaseError, addUser, self.path, "d@example.org", hashString)
            self.assertRaises(
                UserDatabaseError, setPassword, self.path, "alice@example.org", hashString
            )
        self.assertEqual(self.read(), self.ORIGINAL)

    def test_setPassword(self) -> None:
        """
        A new password replaces the hash and keeps the other fields, and
        the file's narrower mode: 0600 stays 0600 (it was made 0640).
        """
        os.chmod(self.path, 0o600)
        hashString = makeHash(b"new", "SHA256-CRYPT")
        setPassword(self.path, "ALICE@example.org", hashString)
        self.assertEqual(
            self.read(),
            self.ORIGINAL.replace("{PLAIN}a:", hashString + ":"),
        )
        self.assertTrue(verify(loadUsers(self.path).get("alice@example.org").password, b"new"))
        self.assertCleanlyWritten(0o600)

    def test_setPasswordFixesMalformed(self) -> None:
        """
        A user whose line has a malformed hash can be given a new password.
        """
        setPassword(self.path, "bob@example.org", CRAM)
        self.assertIn("\nbob@example.org:" + CRAM + "\n", self.read())

    def test_setPasswordNoSuchUser(self) -> None:
        """
        Setting the password of a user not in the file is an error.
        """
        error = self.assertRaises(UserDatabaseError, setPassword, self.path, "d@example.org", CRAM)
        self.assertEqual(str(error), f"no user d@example.org in {self.path}")

    def test_deleteUser(self) -> None:
        """
        Deleting removes every line for the login, in any case, and nothing
        else.
        """
        with open(self.path, "a") as f:
            f.write("Carol@Example.org:{PLAIN}dup\n")
        deleteUser(self.path, "carol@example.org")
        self.assertEqual(self.read(), self.ORIGINAL.replace("carol@example.org:" + CRAM + "\n", ""))
        self.assertCleanlyWritten()

    def test_deleteUserNoSuchUser(self) -> None:
        """
        Deleting a user not in the file is an error, and so is editing a
        file that does not exist.
        """
        self.assertRaises(UserDatabaseError, deleteUser, self.path, "d@example.org")
        os.remove(self.path)
        error = self.assertRaises(UserDatabaseError, deleteUser, self.path, "alice@example.org")
        self.assertEqual(str(error), f"{self.path}: no such file")

    def test_keepsGroup(self) -> None:
        """
        The rewritten file keeps the group of the file it replaces.
        """
        others = [g for g in os.getgroups() if g != os.stat(self.path).st_gid]
        if os.getuid() == 0:
            others.append(4242)
        if not others:
            raise unittest.SkipTest("needs a second group, or root")
        os.chown(self.path, -1, others[0])
        deleteUser(self.path, "carol@example.org")
        self.assertEqual(os.stat(self.path).st_gid, others[0])

    def test_symlinkKept(self) -> None:
        """
        A users file that is a symbolic link (to shared storage, or to
        where configuration is kept) stays one: the file it leads to gets
        the edit, and its lock. The link was replaced by a new file, and
        the file it named, which others read, never saw the edit.
        """
        shared = os.path.join(self.directory, "shared")
        os.mkdir(shared)
        target = os.path.join(shared, "users")
        os.rename(self.path, target)
        os.symlink(os.path.join("shared", "users"), self.path)
        addUser(self.path, "dave@example.org", CRAM)
        setPassword(self.path, "alice@example.org", CRAM)
        self.assertTrue(os.path.islink(self.path))
        with open(target) as f:
            text = f.read()
        self.assertIn("\ndave@example.org:" + CRAM + "\n", text)
        self.assertIn("alice@example.org:" + CRAM + ":1000:", text)
        self.assertEqual(sorted(os.listdir(shared)), ["users", "users.lock"])
        self.assertEqual(sorted(os.listdir(self.directory)), ["shared", "users"])
        self.assertEqual(listUsers(self.path)[-1], ("dave@example.org", "CRAM-MD5"))

    def test_unwritableDirectory(self) -> None:
        """
        A file that cannot be written is an error naming it and the reason.
        """
        missing = os.path.join(self.directory, "missing", "users")
        error = self.assertRaises(UserDatabaseError, addUser, missing, "a@example.org", CRAM)
        self.assertIn(missing, str(error))
        self.assertIn("No such file or directory", str(error))

    def test_concurrentEdits(self) -> None:
        """
        Edits made at once are serialised: none is lost.
        """

        def add(n: int) -> None:
            for i in range(10):
                addUser(self.path, f"u{n}.{i}@example.org", CRAM)

        threads = [threading.Thread(target=add, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(listUsers(self.path)), 2 + 40)

    def test_listUsers(self) -> None:
        """
        C{listUsers} gives the login and scheme of each valid user, in file
        order.
        """
        self.assertEqual(
            listUsers(self.path),
            [("alice@example.org", "PLAIN"), ("carol@example.org", "CRAM-MD5")],
        )

    def test_hasUser(self) -> None:
        """
        C{hasUser} sees any line naming the login, even a malformed one.
        """
        self.assertTrue(hasUser(self.path, "Bob@example.org"))
        self.assertFalse(hasUser(self.path, "dave@example.org"))

    def test_unreadable(self) -> None:
        """
        Listing a missing or unreadable file is an error naming it.
        """
        os.remove(self.path)
        self.assertRaises(UserDatabaseError, listUsers, self.path)
        self.assertRaises(UserDatabaseError, hasUser, self.path, "a@example.org")
        os.mkdir(self.path)
        error = self.assertRaises(UserDatabaseError, listUsers, self.path)
        self.assertIn(self.path, str(error))


def loadUsers(path: str) -> UserDatabase:
    db = UserDatabase(path)
    db.load()
    return db


class LockOwnerTests(unittest.TestCase):
    """The users file's lock does not lock out the daemon's user."""

    def test_lockFileOwnedLikeUsersFile(self) -> None:
        """
        The lock file an edit makes belongs to the users file's owner and
        group (root makes it for the daemon's user), and is taken through a
        read-only descriptor, so that group read access is enough.
        """
        if os.geteuid() != 0:
            raise AssertionError("run as root (CI does): only root can give files away")
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        path = os.path.join(directory, "users")
        with open(path, "w") as f:
            f.write("alice@example.org:{PLAIN}a\n")
        os.chown(path, 65534, 65534)
        addUser(path, "bob@example.org", CRAM)
        lock = os.stat(path + ".lock")
        self.assertEqual((lock.st_uid, lock.st_gid), (65534, 65534))
        self.assertEqual(lock.st_mode & 0o777, 0o640)
        # What the daemon's user can do with it: open it read-only and lock.
        fd = os.open(path + ".lock", os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
