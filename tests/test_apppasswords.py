"""
Tests for app passwords: L{mailauth.apppasswords} (making and reading
them), the password checker trying them, the C{mailauth user app-password}
commands, and logins with them on the running daemon.
"""

from __future__ import annotations

import os
import smtplib
import time

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from mailauth import apppasswords, passwords
from mailauth.allownets import Origin
from mailauth.apppasswords import AppPassword, AppPasswordError
from mailauth.checkers import AddressRefused, AppPasswordLogin, LoginSuspended, PasswordChecker
from mailauth.passwords import makeHash, parse
from mailauth.sasl import PlaintextCredentials
from mailauth.userdb import parseUsers
from tests.fakes import MemoryUserDatabase
from tests.harness import BOB_PASSWORD, AttackMixin, smtpClient
from tests.support import runCommand, withoutSession


class FormatTests(unittest.TestCase):
    def test_generate(self) -> None:
        """
        A new app password is five groups of four characters of the
        alphabet, joined by '-', different every time.
        """
        made = {apppasswords.generate() for _ in range(200)}
        self.assertEqual(len(made), 200)
        for password in made:
            self.assertRegex(password, r"^[a-hj-km-np-z2-9]{4}(-[a-hj-km-np-z2-9]{4}){4}$")
        self.assertEqual(set("".join(made).replace("-", "")), set(apppasswords.ALPHABET))

    def test_normalise(self) -> None:
        """
        A password with the shape of an app password, its groups joined by
        '-', ' ' or nothing, in any case, reads as its characters in lower
        case; anything else is no app password.
        """
        for typed in (
            b"abcd-efgh-jkmn-pqrs-tuvw",
            b"ABCD EFGH JKMN PQRS TUVW",
            b"abcdefghjkmnpqrstuvw",
            b"abcd-efgh jkmnpqrs-tuvw",
        ):
            self.assertEqual(apppasswords.normalise(typed), b"abcdefghjkmnpqrstuvw", typed)
        for other in (
            b"abcd-efgh-jkmn-pqrs",
            b"abcd-efgh-jkmn-pqrs-tuvw-",
            b"abcd--efgh-jkmn-pqrs-tuv",
            b"correct horse battery staple",
            b"abcd-efgh-jkmn-pqrs-tuv\xc3\xa4",
            b"",
        ):
            self.assertIsNone(apppasswords.normalise(other), other)

    def test_labels(self) -> None:
        """Labels are 1 to 32 letters, digits, '.', '_' or '-', starting with a letter or digit."""
        for good in ("phone", "Laptop_2", "a", "x" * 32, "thunderbird.home-pc"):
            self.assertEqual(apppasswords.checkLabel(good), good)
        for bad in ("", "-phone", "my phone", "x" * 33, "a,b", "a=b", "a:b", "é"):
            self.assertRaises(AppPasswordError, apppasswords.checkLabel, bad)

    def test_field(self) -> None:
        """A field made by formatField reads back as the same app password."""
        hashed = makeHash(b"abcdefghjkmnpqrstuvw")
        field = apppasswords.formatField("phone", 1700000000, "abcd", hashed)
        self.assertEqual(field, f"mailauth_app=phone,1700000000,abcd,{hashed}")
        self.assertEqual(
            apppasswords.parseField(field.partition("=")[2]),
            AppPassword("phone", 1700000000, "abcd", parse(hashed)),
        )

    def test_badFields(self) -> None:
        """Each malformed field is refused, saying what is wrong."""
        hashed = makeHash(b"abcdefghjkmnpqrstuvw")
        for value, message in [
            ("", "invalid app password label ''"),
            ("phone", "app password phone: '' is not a creation time"),
            (f"phone,-1,abcd,{hashed}", "'-1' is not a creation time"),
            (f"phone,1,ABC,{hashed}", "'ABC' is not 4 lower-case letters or digits"),
            ("phone,1,abcd,", "app password phone: the password has no {SCHEME} prefix"),
            ("phone,1,abcd,{ARGON2ID}nope", "is not an argon2 hash"),
        ]:
            e = self.assertRaises(AppPasswordError, apppasswords.parseField, value)
            self.assertIn(message, str(e))


BOB_HASH = makeHash(BOB_PASSWORD)


def userWithApps(*apps: tuple) -> str:
    """A users file line's password and extra fields: bob's own password, and C{apps}."""
    fields = " ".join(
        apppasswords.formatField(label, 1, password[:4], makeHash(password.encode()))
        for label, password in apps
    )
    return BOB_HASH + "::::::" + fields


class CountingRunner:
    """Runs at once, counting the argon2 verifications (real and dummy) the work does."""

    def __init__(self, test: unittest.TestCase) -> None:
        self.verifications = 0
        real = passwords.verify

        def verify(stored, password, login=None):
            if stored.scheme == "ARGON2ID":
                self.verifications += 1
            return real(stored, password, login)

        test.patch(passwords, "verify", verify)

    def __call__(self, f, *args):
        return defer.maybeDeferred(f, *args)


class CheckerTests(unittest.TestCase):
    PHONE = "abcdefghjkmnpqrstuvw"
    LAPTOP = "zyxwvutsrqpnmkjhgfed"

    def setUp(self) -> None:
        self.users = MemoryUserDatabase(
            {
                "bob@example.test": userWithApps(("phone", self.PHONE), ("laptop", self.LAPTOP)),
                "carol@example.test": makeHash(b"carol-secret"),
            }
        )
        self.run = CountingRunner(self)
        self.uses: list = []
        self.checker = PasswordChecker(self.users, self.run, appPasswordUse=self)

    def record(self, login: str, app: AppPassword) -> None:
        self.uses.append((login, app.label))

    def check(self, login: str, password: bytes):
        return self.checker.requestAvatarId(PlaintextCredentials(login, password, "PLAIN"))

    def test_appPassword(self) -> None:
        """
        An app password logs its user in, however its groups are written;
        the avatar ID is the login and names the app password, whose use is
        recorded.
        """
        for typed in (
            b"abcd-efgh-jkmn-pqrs-tuvw",
            b"ABCD EFGH JKMN PQRS TUVW",
            self.LAPTOP.encode(),
        ):
            result = self.successResultOf(self.check("Bob@example.test", typed))
            self.assertIsInstance(result, AppPasswordLogin)
            self.assertEqual(result, "bob@example.test")
        self.assertEqual(result.appPassword, "laptop")
        self.assertEqual(
            self.uses,
            [
                ("bob@example.test", "phone"),
                ("bob@example.test", "phone"),
                ("bob@example.test", "laptop"),
            ],
        )

    def test_ownPasswordStillWorks(self) -> None:
        """The user's own password still logs it in, as a plain login."""
        result = self.successResultOf(self.check("bob@example.test", BOB_PASSWORD))
        self.assertEqual((result, type(result)), ("bob@example.test", str))
        self.assertEqual(self.uses, [])

    def test_wrongAppPassword(self) -> None:
        """
        An app password of another user, or one mistyped, fails; so does
        one after it is revoked, while the others still work.
        """
        self.failureResultOf(
            self.check("carol@example.test", self.PHONE.encode()), UnauthorizedLogin
        )
        self.failureResultOf(
            self.check("bob@example.test", b"abcd-efgh-jkmn-pqrs-tuvx"), UnauthorizedLogin
        )
        self.users.source["bob@example.test"] = userWithApps(("laptop", self.LAPTOP))
        self.users.load()
        self.failureResultOf(self.check("bob@example.test", self.PHONE.encode()), UnauthorizedLogin)
        self.successResultOf(self.check("bob@example.test", self.LAPTOP.encode()))

    def test_equalCost(self) -> None:
        """
        A password shaped like an app password costs two argon2
        verifications (the app password it may be, and the user's own
        password) for a user with app passwords, for one without, and for a
        login that does not exist; any other password costs one.
        """
        costs = {}
        for login in ("bob@example.test", "carol@example.test", "nobody@example.test"):
            for password in (b"abcd-xxxx-xxxx-xxxx-xxxx", b"wrong password"):
                before = self.run.verifications
                self.failureResultOf(self.check(login, password), UnauthorizedLogin)
                costs[login, password] = self.run.verifications - before
        self.assertEqual(set(costs[k] for k in costs if k[1] == b"wrong password"), {1})
        self.assertEqual(set(costs[k] for k in costs if k[1] != b"wrong password"), {2})

    def test_allowNets(self) -> None:
        """
        The user's allow_nets holds for its app passwords too: from outside,
        the right app password fails as a wrong one does, after the same two
        verifications, so the time taken does not confirm it; and so does
        a suspended login's right app password. From inside, it logs in.
        """
        line = userWithApps(("phone", self.PHONE)) + " allow_nets=10.0.0.0/8"
        self.users.source["bob@example.test"] = line
        self.users.source["gone@example.test"] = line + " nologin"
        self.users.load()

        def check(login: str, password: bytes, client: str):
            credentials = PlaintextCredentials(
                login, password, "PLAIN", origin=Origin.of(client, client)
            )
            before = self.run.verifications
            d = self.checker.requestAvatarId(credentials)
            return d, self.run.verifications - before

        d, cost = check("bob@example.test", self.PHONE.encode(), "10.0.0.1")
        self.assertEqual((self.successResultOf(d).appPassword, cost), ("phone", 1))
        d, cost = check("bob@example.test", self.PHONE.encode(), "192.0.2.1")
        self.assertEqual(
            (self.failureResultOf(d, AddressRefused).value.field, cost), ("allow_nets", 2)
        )
        d, cost = check("bob@example.test", b"abcd-xxxx-xxxx-xxxx-xxxx", "192.0.2.1")
        self.assertFalse(self.failureResultOf(d, UnauthorizedLogin).check(AddressRefused))
        self.assertEqual(cost, 2)
        d, cost = check("gone@example.test", self.PHONE.encode(), "10.0.0.1")
        self.failureResultOf(d, LoginSuspended)
        self.assertEqual(cost, 2)
        self.assertEqual(self.uses, [("bob@example.test", "phone")])

    def test_prefixLookup(self) -> None:
        """A user's app password is found by its first four characters, and only so."""
        users, _ = parseUsers("bob@example.test:" + userWithApps(("phone", self.PHONE)), "x")
        self.assertEqual([app.prefix for app in users["bob@example.test"].appPasswords], ["abcd"])
        self.assertIsNone(users["bob@example.test"].appPassword("zzzz"))


class CommandTests(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory)
        self.users = os.path.join(self.directory, "users")
        with open(self.users, "w") as f:
            f.write("bob@example.org:{PLAIN}bob-secret\n")
        self.config = os.path.join(self.directory, "mailauth.conf")
        with open(self.config, "w") as f:
            f.write(
                "[server]\nhostname = mail.example.org\n"
                f"state_dir = {self.directory}/state\n"
                "[listener:submission]\nendpoint = tcp:2587\ntls = none\nauth = optional\n"
                f"[auth]\nusers = {self.users}\n"
                "[delivery]\nlocal_domains = example.org\n"
                "maildir = /var/mail/{domain}/{localpart}/Maildir\n"
            )

    def add(self, label: str) -> str:
        status, out, err = runCommand(
            "user", "app-password", "add", "bob@example.org", label, "--users", self.users
        )
        self.assertEqual(status, 0, err)
        self.assertEqual(
            err,
            f"bob@example.org: app password {label} added to {self.users}; it is shown only now:\n",
        )
        return out.rstrip("\n")

    def test_add(self) -> None:
        """
        C{app-password add} prints a new password once, on its own line,
        and stores only its ARGON2ID hash, with the label and the time.
        """
        password = self.add("phone")
        self.assertRegex(password, r"^[a-z2-9]{4}(-[a-z2-9]{4}){4}$")
        with open(self.users) as f:
            text = f.read()
        self.assertNotIn(password.replace("-", ""), text)
        [app] = parseUsers(text, "x")[0]["bob@example.org"].appPasswords
        self.assertEqual(
            (app.label, app.prefix, app.password.scheme), ("phone", password[:4], "ARGON2ID")
        )
        self.assertTrue(passwords.verify(app.password, password.replace("-", "").encode()))
        self.assertNotEqual(self.add("laptop"), password)

    def test_addRefused(self) -> None:
        """A taken or bad label, or an unknown user, is one line of error."""
        self.add("phone")
        for login, label, message in [
            (
                "bob@example.org",
                "phone",
                "mailauth: bob@example.org already has an app password phone\n",
            ),
            (
                "bob@example.org",
                "my phone",
                "mailauth: invalid app password label 'my phone': use"
                " 1 to 32 letters, digits, '.', '_' or '-', starting"
                " with a letter or digit\n",
            ),
            ("x@example.org", "phone", f"mailauth: no user x@example.org in {self.users}\n"),
        ]:
            self.assertEqual(
                runCommand("user", "app-password", "add", login, label, "--users", self.users),
                (1, "", message),
            )

    def test_listAndDelete(self) -> None:
        """
        C{app-password list} shows each label, when it was made and last
        used (from the state directory); C{del} revokes one, and C{user
        list} shows the labels.
        """
        self.add("phone")
        self.add("laptop")
        status, out, _ = runCommand("user", "list", "--users", self.users)
        self.assertEqual(out, "bob@example.org  PLAIN  app passwords: phone, laptop\n")
        status, out, _ = runCommand(
            "user", "app-password", "list", "bob@example.org", "--config", self.config
        )
        lines = out.splitlines()
        self.assertEqual(lines[0], "LABEL   CREATED              LAST USED")
        self.assertRegex(lines[1], r"^phone   \d{4}-\d\d-\d\d \d\d:\d\d:\d\d  never$")
        self.assertRegex(lines[2], r"^laptop  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d  never$")
        status, out, _ = runCommand(
            "user", "app-password", "list", "bob@example.org", "--users", self.users
        )
        self.assertTrue(out.splitlines()[1].endswith("unknown (give --config or --state-dir)"))
        self.assertEqual(
            runCommand(
                "user", "app-password", "del", "bob@example.org", "phone", "--users", self.users
            ),
            (0, f"bob@example.org: app password phone deleted from {self.users}\n", ""),
        )
        self.assertEqual(
            runCommand(
                "user", "app-password", "del", "bob@example.org", "phone", "--users", self.users
            ),
            (1, "", "mailauth: bob@example.org has no app password phone\n"),
        )
        status, out, _ = runCommand("user", "list", "--users", self.users)
        self.assertEqual(out, "bob@example.org  PLAIN  app passwords: laptop\n")

    def test_lastUsedFromStateDir(self) -> None:
        """A use recorded in state_dir is listed, with --config or --state-dir."""
        self.add("phone")
        [app] = parseUsers(open(self.users).read(), "x")[0]["bob@example.org"].appPasswords
        os.mkdir(os.path.join(self.directory, "state"))
        apppasswords.recordLastUsed(
            os.path.join(self.directory, "state", apppasswords.LAST_USED_FILE),
            "bob@example.org",
            app,
            1767225600,
        )
        for where in (
            ["--config", self.config],
            ["--users", self.users, "--state-dir", f"{self.directory}/state"],
        ):
            status, out, _ = runCommand("user", "app-password", "list", "bob@example.org", *where)
            self.assertRegex(out.splitlines()[1], r"  20(25-12-31|26-01-01) \d\d:00:00$")


class DaemonTests(AttackMixin, unittest.TestCase):
    """Logins with app passwords on the running daemon."""

    def submit(self, password: str) -> dict:
        """(Blocking.) Send bob's message over implicit TLS, with AUTH PLAIN and C{password}."""
        client = smtpClient(self.daemon.ports["submissions"], implicit=True)
        try:
            client.ehlo()
            client.user, client.password = "bob@example.test", password
            client.auth("PLAIN", client.auth_plain)
            return client.sendmail(
                "bob@example.test", ["alice.plain@example.test"], b"Subject: app\r\n\r\nhello\r\n"
            )
        finally:
            client.close()

    @defer.inlineCallbacks
    def reloaded(self):
        """Wait until the daemon has read the users file again."""
        yield self.log.waitFor(r"Users file .*: loaded")

    @defer.inlineCallbacks
    def test_loginWithAppPassword(self) -> None:
        """
        An app password made with the command logs in once the daemon has
        read the file: the log line and the Received header name its label,
        never the secret; its use is kept in state_dir; once deleted, it
        fails while the user's own password still works.
        """
        loaded = self.reloaded()
        status, password, err = runCommand(
            "user",
            "app-password",
            "add",
            "bob@example.test",
            "phone",
            "--config",
            self.daemon.configPath,
        )
        self.assertEqual(status, 0, err)
        password = password.strip()
        yield loaded
        success = self.log.waitFor(r"auth success: .* login=<bob@example\.test>")
        yield self.inThread(self.submit, password)
        logged = yield success
        self.assertEqual(
            withoutSession(logged),
            "auth success: client=[127.0.0.1] mechanism=PLAIN login=<bob@example.test> app=phone",
        )
        [(_, content)] = self.daemon.delivered("alice.plain@example.test")
        self.assertIn(b"\t(authenticated as bob@example.test with app password phone)\n", content)
        self.assertNotIn(password.encode(), content)
        self.assertFalse([m for m in self.log.messages if password in m])
        usedFile = os.path.join(self.daemon.config.server.state_dir, apppasswords.LAST_USED_FILE)
        # Written in the disk pool, beside the message: wait for it.
        deadline = time.monotonic() + 10
        while not os.path.exists(usedFile) and time.monotonic() < deadline:
            yield deferLater(reactor, 0.01, lambda: None)
        with open(usedFile) as f:
            self.assertRegex(f.read(), r"^bob@example\.test phone \d+ \d+\n$")

        loaded = self.reloaded()
        self.assertEqual(
            runCommand(
                "user",
                "app-password",
                "del",
                "bob@example.test",
                "phone",
                "--config",
                self.daemon.configPath,
            )[0],
            0,
        )
        yield loaded
        e = yield self.assertFailure(
            self.inThread(self.submit, password), smtplib.SMTPAuthenticationError
        )
        self.assertEqual(e.smtp_code, 535)
        success = self.log.waitFor(r"auth success: .* login=<bob@example\.test>")
        yield self.inThread(self.submit, BOB_PASSWORD.decode())
        logged = yield success
        self.assertTrue(withoutSession(logged).endswith("login=<bob@example.test>"), logged)
