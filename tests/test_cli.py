"""Tests for L{mailauth.cli}, the C{mailauth} admin command."""

from __future__ import annotations

import argparse
import configparser
import importlib.metadata
import io
import os
import subprocess
import sys
from typing import Optional

from twisted.internet import defer, threads
from twisted.trial import unittest

import mailauth
from mailauth import cli
from mailauth.cli import Console, main
from mailauth.passwords import SCHEMES, parse, verify
from tests.harness import ROOT, Daemon
from tests.support import holdPort, searchableFolder, writeCertificate
from tests.test_pwquality import writePwnedFile, writePwnedRanges

CRAM = "{CRAM-MD5}" + "ab" * 32


class TerminalInput(io.BytesIO):
    """Standard input that is a terminal."""

    def isatty(self) -> bool:
        return True


class CommandMixin:
    """Runs C{mailauth} subcommands through L{main}, in a temporary folder."""

    def setUp(self) -> None:
        # Absolute: check-config warns about a relative state_dir or maildir.
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory)
        self.users = os.path.join(self.directory, "users")
        self.prompts: list[str] = []

    def mailauth(
        self,
        *argv: str,
        stdin: bytes = b"",
        answers: Optional[list[str]] = None,
        defaultConfig: Optional[str] = None,
    ) -> int:
        """
        Run C{mailauth ARGV...}, keeping its output in C{self.stdout} and
        C{self.stderr}.

        @param answers: what the terminal answers to password prompts; with
            them, standard input is a terminal.
        @param defaultConfig: the configuration read without --config; by
            default one that does not exist.
        """
        self.stdin = TerminalInput() if answers is not None else io.BytesIO(stdin)
        self.stdout, self.stderr = io.StringIO(), io.StringIO()

        def getpass(prompt: str) -> str:
            self.prompts.append(prompt)
            return answers.pop(0)

        if defaultConfig is None:
            defaultConfig = os.path.join(self.directory, "no-default.conf")
        return main(
            list(argv), Console(self.stdin, self.stdout, self.stderr, getpass), defaultConfig
        )

    def storedHash(self, login: str) -> str:
        with open(self.users) as f:
            for line in f:
                if line.startswith(login + ":"):
                    return line.rstrip("\n").split(":")[1]
        self.fail(f"no {login} in {self.users}")

    def writeConfig(
        self,
        users: str,
        extra: str = "",
        endpoint: str = "tcp:0:interface=127.0.0.1",
        auth: str = "",
    ) -> str:
        path = os.path.join(self.directory, "mailauth.conf")
        with open(path, "w") as f:
            f.write(
                f"[server]\nhostname = mail.example.org\nstate_dir = {self.directory}/state\n"
                f"[listener:submission]\nendpoint = {endpoint}\ntls = none\nauth = optional\n"
                f"[auth]\nusers = {users}\n{auth}"
                "[delivery]\nlocal_domains = example.org example.net\n"
                f"maildir = {self.directory}/mail/{{domain}}/{{localpart}}/Maildir\n" + extra
            )
        return path


class CommandTests(CommandMixin, unittest.TestCase):
    """Running C{mailauth} subcommands through L{main}."""

    def test_userAddFromStdin(self) -> None:
        """
        C{user add} reads one line of standard input as the password and
        adds the user, with ARGON2ID unless told otherwise.
        """
        args = ("user", "add", "a@example.org", "--users", self.users)
        self.assertEqual(self.mailauth(*args, stdin=b"long password\n"), 0)
        self.assertEqual(self.stdout.getvalue(), f"a@example.org: added to {self.users}\n")
        self.assertEqual(self.stderr.getvalue(), "")
        self.assertEqual(parse(self.storedHash("a@example.org")).scheme, "ARGON2ID")

    def test_userAddScheme(self) -> None:
        """
        C{--scheme} chooses the scheme, in any case.
        """
        args = ("user", "add", "a@example.org", "--scheme", "sha256-crypt", "--users", self.users)
        self.assertEqual(self.mailauth(*args, stdin=b"long password\n"), 0)
        stored = parse(self.storedHash("a@example.org"))
        self.assertEqual(stored.scheme, "SHA256-CRYPT")
        self.assertTrue(verify(stored, b"long password"))

    def test_passwordKeepsSpaces(self) -> None:
        """
        Only the line ending is taken off a password read from standard
        input.
        """
        args = ("user", "add", "a@example.org", "--scheme", "PLAIN", "--users", self.users)
        self.assertEqual(self.mailauth(*args, stdin=b" pass word \r\nmore\n"), 0)
        self.assertEqual(self.storedHash("a@example.org"), "{PLAIN} pass word ")

    def test_userAddFromTerminal(self) -> None:
        """
        On a terminal, the password is asked for twice.
        """
        args = ("user", "add", "a@example.org", "--scheme", "PLAIN", "--users", self.users)
        self.assertEqual(self.mailauth(*args, answers=["pässword", "pässword"]), 0)
        self.assertEqual(self.prompts, ["New password: ", "Retype new password: "])
        self.assertEqual(self.storedHash("a@example.org"), "{PLAIN}pässword")

    def test_passwordsDiffer(self) -> None:
        """
        If the two passwords typed differ, nothing is added.
        """
        args = ("user", "add", "a@example.org", "--users", self.users)
        self.assertEqual(self.mailauth(*args, answers=["one", "two"]), 1)
        self.assertEqual(self.stderr.getvalue(), "mailauth: the passwords do not match\n")
        self.assertFalse(os.path.exists(self.users))

    def test_emptyPassword(self) -> None:
        """
        An empty password, or none at all, is refused.
        """
        for stdin in (b"\n", b""):
            args = ("user", "add", "a@example.org", "--users", self.users)
            self.assertEqual(self.mailauth(*args, stdin=stdin), 1)
            self.assertEqual(self.stderr.getvalue(), "mailauth: empty password refused\n")
        self.assertFalse(os.path.exists(self.users))

    def test_userAddExists(self) -> None:
        """
        Adding a user that exists fails before a password is read.
        """
        with open(self.users, "w") as f:
            f.write(f"a@example.org:{CRAM}\n")
        args = ("user", "add", "A@example.org", "--users", self.users)
        self.assertEqual(self.mailauth(*args, stdin=b"pw\n"), 1)
        self.assertEqual(
            self.stderr.getvalue(), f"mailauth: user A@example.org already exists in {self.users}\n"
        )
        self.assertEqual(self.stdin.tell(), 0)

    def test_userAddInvalidLogin(self) -> None:
        """
        A login that is not an address is refused before a password is read.
        """
        self.assertEqual(
            self.mailauth("user", "add", "alice", "--users", self.users, stdin=b"pw\n"), 1
        )
        self.assertIn("mailauth: invalid login 'alice'", self.stderr.getvalue())
        self.assertEqual(self.stdin.tell(), 0)

    def test_loginNotUTF8(self) -> None:
        """
        A login given in bytes that are not UTF-8 (as Python passes them:
        surrogates) is refused by every user command, with one line and
        before a password is read: no client could log in with it.
        """
        login = b"al\xffce@example.org".decode("utf-8", "surrogateescape")
        for command in (["add"], ["passwd"], ["del"], ["suspend"], ["app-password", "list"]):
            status = self.mailauth(
                "user", *command, login, "--users", self.users, stdin=b"pw\npw\n"
            )
            self.assertEqual(status, 2, command)
            self.assertIn("is not UTF-8", self.stderr.getvalue())
            self.assertNotIn("Traceback", self.stderr.getvalue())
            self.assertEqual(self.stdin.tell(), 0)
        self.assertFalse(os.path.exists(self.users))

    def test_userPasswd(self) -> None:
        """
        C{user passwd} replaces the password and keeps the line's other
        fields.
        """
        with open(self.users, "w") as f:
            f.write(f"a@example.org:{CRAM}:1000:1000\n")
        args = ("user", "passwd", "a@example.org", "--scheme", "PLAIN", "--users", self.users)
        self.assertEqual(self.mailauth(*args, stdin=b"new password\n"), 0)
        with open(self.users) as f:
            self.assertEqual(f.read(), "a@example.org:{PLAIN}new password:1000:1000\n")

    def test_userPasswdNoSuchUser(self) -> None:
        """
        Changing the password of a missing user fails before a password is
        read; so does a missing users file.
        """
        with open(self.users, "w") as f:
            f.write(f"a@example.org:{CRAM}\n")
        args = ("user", "passwd", "b@example.org", "--users", self.users)
        self.assertEqual(self.mailauth(*args, stdin=b"pw\n"), 1)
        self.assertEqual(
            self.stderr.getvalue(), f"mailauth: no user b@example.org in {self.users}\n"
        )
        self.assertEqual(self.stdin.tell(), 0)
        os.remove(self.users)
        self.assertEqual(self.mailauth(*args, stdin=b"pw\n"), 1)
        self.assertEqual(self.stderr.getvalue(), f"mailauth: {self.users}: no such file\n")

    def test_userDel(self) -> None:
        """
        C{user del} removes the user, and fails for a user not there.
        """
        with open(self.users, "w") as f:
            f.write(f"a@example.org:{CRAM}\nb@example.org:{CRAM}\n")
        self.assertEqual(self.mailauth("user", "del", "a@example.org", "--users", self.users), 0)
        with open(self.users) as f:
            self.assertEqual(f.read(), f"b@example.org:{CRAM}\n")
        self.assertEqual(self.mailauth("user", "del", "a@example.org", "--users", self.users), 1)
        self.assertEqual(
            self.stderr.getvalue(), f"mailauth: no user a@example.org in {self.users}\n"
        )

    def test_userList(self) -> None:
        """
        C{user list} prints each login and its scheme, in columns.
        """
        with open(self.users, "w") as f:
            f.write(f"# users\nalice@example.org:{CRAM}\nb@example.org:{{PLAIN}}x\n")
        self.assertEqual(self.mailauth("user", "list", "--users", self.users), 0)
        self.assertEqual(
            self.stdout.getvalue(),
            "alice@example.org  CRAM-MD5\nb@example.org      PLAIN\n",
        )

    def test_userListNetworks(self) -> None:
        """
        C{user list} shows where a login may log in from (Dovecot's
        C{allow_nets} and C{allow_real_nets}), as fields of the file (an
        address as its /32 network).
        """
        with open(self.users, "w") as f:
            f.write(
                "a@example.org:{PLAIN}x::::::allow_nets=10.0.0.0/8,2001:db8::/32,local\n"
                "b@example.org:{PLAIN}x::::::allow_real_nets=192.0.2.1 nologin\n"
            )
        self.assertEqual(self.mailauth("user", "list", "--users", self.users), 0)
        self.assertEqual(
            self.stdout.getvalue(),
            "a@example.org  PLAIN  allow_nets=10.0.0.0/8,2001:db8::/32,local\n"
            "b@example.org  PLAIN  suspended  allow_real_nets=192.0.2.1/32\n",
        )

    def test_unreadableUsersFile(self) -> None:
        """
        A users file that cannot be read is one line of error, not a
        traceback.
        """
        os.mkdir(self.users)
        self.assertEqual(self.mailauth("user", "list", "--users", self.users), 1)
        self.assertEqual(
            self.stderr.getvalue(), f"mailauth: cannot read {self.users}: Is a directory\n"
        )

    def test_usersFromConfig(self) -> None:
        """
        With C{--config}, the users file is the one the configuration names.
        """
        config = self.writeConfig(self.users)
        args = ("user", "add", "a@example.org", "--config", config)
        self.assertEqual(self.mailauth(*args, stdin=b"long password\n"), 0)
        self.assertEqual(self.mailauth("user", "list", "--config", config), 0)
        self.assertEqual(self.stdout.getvalue(), "a@example.org  ARGON2ID\n")

    def test_badConfig(self) -> None:
        """
        A configuration whose [auth] users cannot be read is reported one
        problem a line.
        """
        config = self.writeConfig(
            self.users, "[bogus]\nkey = 1\n[relay]\n", auth="password_min_length = short\n"
        )
        self.assertEqual(self.mailauth("user", "list", "--config", config), 1)
        problems = self.stderr.getvalue().splitlines()
        self.assertEqual(len(problems), 3)
        for problem in problems:
            self.assertTrue(problem.startswith(config + ": "), problem)

    def test_otherSectionBroken(self) -> None:
        """
        The user commands work when a section they do not need is broken:
        they read [auth] users and say the problems as warnings.
        """
        with open(self.users, "w") as f:
            f.write(f"a@example.org:{CRAM}\n")
        config = self.writeConfig(self.users, "[bogus]\nkey = 1\n[relay]\n")
        self.assertEqual(self.mailauth("user", "list", "--config", config), 0)
        self.assertEqual(self.stdout.getvalue(), "a@example.org  CRAM-MD5\n")
        warnings = self.stderr.getvalue().splitlines()
        self.assertEqual(len(warnings), 3, warnings)
        self.assertTrue(
            warnings[0].startswith(
                f"mailauth: warning: {config}: [bogus]: unknown section (known: "
            ),
            warnings[0],
        )
        self.assertEqual(
            warnings[1:],
            [
                f"mailauth: warning: {config}: [relay] host: missing (this key is required)",
                f"mailauth: warning: {config} has the problems above; using its [auth] users = "
                f"{self.users} anyway",
            ],
        )
        args = ("user", "add", "b@example.org", "--config", config)
        self.assertEqual(self.mailauth(*args, stdin=b"long password\n"), 0)
        self.assertTrue(verify(parse(self.storedHash("b@example.org")), b"long password"))

    def test_otherSectionBrokenPolicyKept(self) -> None:
        """The password policy of a configuration read that way still applies."""
        config = self.writeConfig(self.users, "[relay]\n", auth="password_min_length = 20\n")
        args = ("user", "add", "b@example.org", "--config", config)
        self.assertEqual(self.mailauth(*args, stdin=b"long password\n"), 1)
        self.assertIn("at least 20 are required", self.stderr.getvalue())

    def test_defaultConfig(self) -> None:
        """
        Without --users or --config, user commands read the default
        configuration; without one, they say how to name it.
        """
        with open(self.users, "w") as f:
            f.write(f"a@example.org:{CRAM}\n")
        config = self.writeConfig(self.users)
        self.assertEqual(self.mailauth("user", "list", defaultConfig=config), 0)
        self.assertEqual(self.stdout.getvalue(), "a@example.org  CRAM-MD5\n")
        missing = os.path.join(self.directory, "missing.conf")
        self.assertEqual(self.mailauth("user", "list", defaultConfig=missing), 1)
        self.assertEqual(
            self.stderr.getvalue(),
            f"mailauth: {missing}: no such file; name the configuration with --config PATH\n",
        )

    def test_usersOrConfig(self) -> None:
        """
        User commands take one of C{--users} and C{--config}, not both.
        """
        self.assertEqual(self.mailauth("user", "list", "--users", "u", "--config", "c"), 2)
        self.assertIn("not allowed with argument", self.stderr.getvalue())

    def test_userAddOutsideLocalDomains(self) -> None:
        """
        Adding a login of a domain that is not local is allowed, with a
        warning: it can send, but mail to it is not delivered here.
        """
        config = self.writeConfig(self.users)
        args = ("user", "add", "a@Elsewhere.test", "--config", config)
        self.assertEqual(self.mailauth(*args, stdin=b"long password\n"), 0)
        self.assertEqual(
            self.stderr.getvalue(),
            (
                f"mailauth: warning: elsewhere.test is not one of the local_domains of {config} "
                "(example.net example.org): a@Elsewhere.test can log in and send, but mail to it "
                "is not delivered here\n"
            ),
        )
        self.assertEqual(
            self.mailauth(
                "user", "add", "b@example.net", "--config", config, stdin=b"long password\n"
            ),
            0,
        )
        self.assertEqual(self.stderr.getvalue(), "")
        self.assertEqual(
            self.mailauth(
                "user", "add", "c@elsewhere.test", "--users", self.users, stdin=b"long password\n"
            ),
            0,
        )
        self.assertEqual(self.stderr.getvalue(), "")

    def test_userAddUnsafeLogin(self) -> None:
        """
        A login that userdb.checkLogin refuses is refused before anything
        is read or written, with or without a configuration.
        """
        config = self.writeConfig(self.users)
        for login in ("a\x01b@example.org", "#a@example.org", "a:b@example.org"):
            args = ("user", "add", login, "--config", config)
            self.assertEqual(self.mailauth(*args, stdin=b"long password\n"), 1)
            self.assertIn(f"mailauth: invalid login {login!r}", self.stderr.getvalue())
            self.assertEqual(self.stdin.tell(), 0)
        self.assertFalse(os.path.exists(self.users))

    def test_hash(self) -> None:
        """
        C{hash} prints a hash of the password, like C{doveadm pw}.
        """
        self.assertEqual(self.mailauth("hash", "-s", "PLAIN", stdin=b"pw\n"), 0)
        self.assertEqual(self.stdout.getvalue(), "{PLAIN}pw\n")
        self.assertEqual(self.mailauth("hash", "--scheme", "sha512-crypt", stdin=b"pw\n"), 0)
        self.assertTrue(verify(parse(self.stdout.getvalue().strip()), b"pw"))

    def test_hashUnknownScheme(self) -> None:
        """
        An unknown scheme is a usage error naming the known ones.
        """
        self.assertEqual(self.mailauth("hash", "-s", "NTLM", stdin=b"pw\n"), 2)
        self.assertIn("unknown password scheme {NTLM} (known: ARGON2ID,", self.stderr.getvalue())
        self.assertEqual(self.mailauth("hash", "-s", "OTP", stdin=b"pw\n"), 2)
        self.assertIn("OTP is a one-time-password scheme", self.stderr.getvalue())
        self.assertEqual(self.stdout.getvalue(), "")

    def test_hashRefused(self) -> None:
        """
        A password the scheme cannot take is one line of error.
        """
        self.assertEqual(self.mailauth("hash", "-s", "BLF-CRYPT", stdin=b"x" * 73 + b"\n"), 1)
        self.assertEqual(
            self.stderr.getvalue(), "mailauth: bcrypt uses only the first 72 bytes of a password\n"
        )

    def test_hashEveryScheme(self) -> None:
        """
        C{hash} makes every scheme, with an encoding suffix too; DIGEST-MD5
        is made for the login that C{-u} names, and needs it.
        """
        for scheme in SCHEMES:
            args = ("hash", "-s", scheme.lower(), "-u", "a@example.org")
            self.assertEqual(self.mailauth(*args, stdin=b"pw\n"), 0, self.stderr.getvalue())
            stored = self.stdout.getvalue().strip()
            self.assertTrue(stored.startswith(f"{{{scheme}}}"), stored)
            self.assertTrue(verify(parse(stored), b"pw", "a@example.org"), scheme)
        self.assertEqual(self.mailauth("hash", "-s", "sha256.hex", stdin=b"pw\n"), 0)
        self.assertEqual(
            self.stdout.getvalue(),
            "{SHA256.HEX}30c952fab122c3f9759f02a6d95c3758b246b4fee239957b2d4fee46e26170c4\n",
        )
        self.assertEqual(self.mailauth("hash", "-s", "DIGEST-MD5", stdin=b"pw\n"), 1)
        self.assertIn("DIGEST-MD5 is made from the login too", self.stderr.getvalue())

    def test_userAddDigestMD5(self) -> None:
        """
        C{user add -s DIGEST-MD5} makes the hash for the login it adds.
        """
        args = ("user", "add", "a@example.org", "-s", "DIGEST-MD5", "--users", self.users)
        self.assertEqual(self.mailauth(*args, stdin=b"long password\n"), 0)
        stored = parse(self.storedHash("a@example.org"))
        self.assertTrue(verify(stored, b"long password", "a@example.org"))
        self.assertFalse(verify(stored, b"long password", "b@example.org"))

    def test_tooShort(self) -> None:
        """
        C{user add} and C{user passwd} refuse a password of fewer than 8
        characters, saying why, and change nothing.
        """
        args = ("user", "add", "a@example.org", "--users", self.users)
        self.assertEqual(self.mailauth(*args, stdin=b"seven!!\n"), 1)
        self.assertEqual(
            self.stderr.getvalue(),
            "mailauth: password refused: it has 7 characters, and at least 8 are required\n",
        )
        self.assertFalse(os.path.exists(self.users))
        with open(self.users, "w") as f:
            f.write(f"a@example.org:{CRAM}\n")
        args = ("user", "passwd", "a@example.org", "--users", self.users)
        self.assertEqual(self.mailauth(*args, stdin=b"short\n"), 1)
        self.assertIn("password refused: it has 5 characters", self.stderr.getvalue())
        self.assertEqual(self.storedHash("a@example.org"), CRAM)

    def test_minLengthOption(self) -> None:
        """
        C{--min-length} sets the minimum, which counts characters; it must
        be a whole number.
        """
        args = ("user", "add", "a@example.org", "--min-length", "12", "--users", self.users)
        self.assertEqual(self.mailauth(*args, answers=["pässwörd123", "pässwörd123"]), 1)
        self.assertIn("it has 11 characters, and at least 12 are required", self.stderr.getvalue())
        args = ("user", "add", "a@example.org", "--min-length", "2", "--users", self.users)
        self.assertEqual(self.mailauth(*args, stdin=b"pw\n"), 0)
        args = ("user", "add", "b@example.org", "--min-length", "two", "--users", self.users)
        self.assertEqual(self.mailauth(*args, stdin=b"pw\n"), 2)
        self.assertIn("'two' is not a whole number", self.stderr.getvalue())

    def test_breached(self) -> None:
        """
        With C{--breached}, a password in the list, a file ordered by hash
        or a directory of range files, is refused; another is stored.
        """
        pwned = os.path.join(self.directory, "pwned.txt")
        writePwnedFile(pwned, {b"password123": 251682})
        ranges = os.path.join(self.directory, "ranges")
        writePwnedRanges(ranges, {b"password123": 251682}, absent=[b"long password"])
        for path in (pwned, ranges):
            args = ("user", "add", "a@example.org", "--breached", path, "--users", self.users)
            self.assertEqual(self.mailauth(*args, stdin=b"password123\n"), 1)
            self.assertEqual(
                self.stderr.getvalue(),
                "mailauth: password refused: it is in the list of breached passwords"
                " (251682 times); choose another\n",
            )
            self.assertFalse(os.path.exists(self.users))
        args = ("user", "add", "a@example.org", "--breached", ranges, "--users", self.users)
        self.assertEqual(self.mailauth(*args, stdin=b"long password\n"), 0)
        args = ("user", "passwd", "a@example.org", "--breached", pwned, "--users", self.users)
        self.assertEqual(self.mailauth(*args, stdin=b"password123\n"), 1)
        self.assertTrue(verify(parse(self.storedHash("a@example.org")), b"long password"))

    def test_breachedListUnusable(self) -> None:
        """
        A breached list that cannot be searched is an error before a
        password is read.
        """
        missing = os.path.join(self.directory, "missing.txt")
        args = ("user", "add", "a@example.org", "--breached", missing, "--users", self.users)
        self.assertEqual(self.mailauth(*args, stdin=b"long password\n"), 1)
        self.assertEqual(
            self.stderr.getvalue(),
            f"mailauth: breached password list {missing}: No such file or directory\n",
        )
        self.assertEqual(self.stdin.tell(), 0)
        self.assertFalse(os.path.exists(self.users))

    def test_qualityFromConfig(self) -> None:
        """
        With C{--config}, C{[auth] password_min_length} and
        C{breached_passwords} apply; the options override them.
        """
        pwned = os.path.join(self.directory, "pwned.txt")
        writePwnedFile(pwned, {b"password123": 3, b"tiny": 5})
        config = self.writeConfig(self.users)
        with open(config) as f:
            text = f.read()
        with open(config, "w") as f:
            f.write(
                text.replace(
                    f"users = {self.users}\n",
                    f"users = {self.users}\npassword_min_length = 12\n"
                    f"breached_passwords = {pwned}\n",
                )
            )
        args = ("user", "add", "a@example.org", "--config", config)
        self.assertEqual(self.mailauth(*args, stdin=b"eleven char\n"), 1)
        self.assertIn("at least 12 are required", self.stderr.getvalue())
        self.assertEqual(self.mailauth(*args, "--min-length", "4", stdin=b"password123\n"), 1)
        self.assertIn("breached passwords (3 times)", self.stderr.getvalue())
        self.assertEqual(
            self.mailauth(*args, "--min-length", "4", "--breached", self.users, stdin=b"tiny\n"),
            1,
        )
        self.assertIn(f"breached password list {self.users}: No such file", self.stderr.getvalue())
        self.assertEqual(self.mailauth(*args, "--min-length", "4", stdin=b"tiny\n"), 1)
        self.assertEqual(self.mailauth(*args, "--min-length", "4", stdin=b"good\n"), 0)

    def test_checkConfig(self) -> None:
        """
        C{check-config} says OK for a good configuration.
        """
        open(self.users, "w").close()
        config = self.writeConfig(self.users)
        self.assertEqual(self.mailauth("check-config", "--config", config), 0)
        self.assertEqual(self.stdout.getvalue(), f"{config}: OK\n")

    def test_checkConfigFiles(self) -> None:
        """
        C{check-config} also checks the files the configuration names: an
        unreadable users file and a certificate that does not load are
        reported with their section and key.
        """
        missing = os.path.join(self.directory, "no-such-users")
        cert = os.path.join(self.directory, "cert.pem")
        with open(cert, "w") as f:
            f.write("junk\n")
        config = self.writeConfig(missing, f"[tls]\ncertificate = {cert}\nprivate_key = {cert}\n")
        self.assertEqual(self.mailauth("check-config", "--config", config), 1)
        errors = self.stderr.getvalue().splitlines()
        self.assertEqual(len(errors), 2, errors)
        self.assertIn(f"[tls]: {cert}: no PEM certificate in it", errors[0])
        self.assertIn(f"[auth] users: {missing}: cannot be read", errors[1])

    def test_checkConfigNotAFile(self) -> None:
        """
        A directory, or a FIFO, named as the users file or a map is an error
        of check-config (and so of the daemon's start): it passed, and the
        daemon started with no users, or with no aliases.
        """
        folder = os.path.join(self.directory, "folder")
        os.mkdir(folder)
        fifo = os.path.join(self.directory, "fifo")
        os.mkfifo(fifo)
        config = self.writeConfig(folder, f"aliases = {fifo}\n")
        self.assertEqual(self.mailauth("check-config", "--config", config), 1)
        errors = self.stderr.getvalue().splitlines()
        self.assertIn(f"[auth] users: {folder}: is a directory, not a file", errors[0])
        self.assertIn(
            f"[delivery] aliases: {fifo}: is a FIFO or socket, not a file (reading it would wait",
            errors[1],
        )

    def test_checkConfigProblems(self) -> None:
        """
        C{check-config} prints every problem on its own line and exits 1,
        also for a file that cannot be read.
        """
        config = self.writeConfig(self.users, "[bogus]\nkey = 1\n[relay]\n")
        self.assertEqual(self.mailauth("check-config", "--config", config), 1)
        self.assertEqual(len(self.stderr.getvalue().splitlines()), 2)
        self.assertIn("[bogus]", self.stderr.getvalue())
        self.assertIn("[relay] host", self.stderr.getvalue())
        self.assertEqual(self.stdout.getvalue(), "")
        missing = os.path.join(self.directory, "missing.conf")
        self.assertEqual(self.mailauth("check-config", "--config", missing), 1)
        self.assertEqual(
            self.stderr.getvalue(), f"{missing}: cannot read: No such file or directory\n"
        )

    def test_noCommand(self) -> None:
        """
        Without a command, C{mailauth} prints its usage and exits 2.
        """
        self.assertEqual(self.mailauth(), 2)
        self.assertTrue(self.stderr.getvalue().startswith("usage: mailauth"))


class CheckConfigTests(CommandMixin, unittest.TestCase):
    """
    C{mailauth check-config} says everything the daemon would refuse or
    warn about at start, one line each.
    """

    def setUp(self) -> None:
        super().setUp()
        with open(self.users, "w") as f:
            f.write(f"a@example.org:{CRAM}\n")

    def tlsConfig(self, days: float = 90, passphrase: Optional[bytes] = None) -> str:
        cert, key = writeCertificate(
            os.path.join(self.directory, "tls"), days=days, passphrase=passphrase
        )
        return self.writeConfig(self.users, f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n")

    def check(self, config: str, *options: str) -> int:
        return self.mailauth("check-config", "--config", config, *options)

    def test_badEndpoints(self) -> None:
        """
        Endpoint strings that twistd would crash on (with a traceback,
        before) are one line each: the parser's own errors, and a port or a
        folder that listening would refuse.
        """
        config = self.writeConfig(
            self.users,
            "".join(
                f"[listener:{name}]\nendpoint = {endpoint}\ntls = none\nauth = optional\n"
                for name, endpoint in [
                    ("a", "tcp:abc"),
                    ("b", "tcp:99999"),
                    ("c", "tcp:2587:interfce=127.0.0.1"),
                    ("d", f"unix:{self.directory}/run/mailauth.sock"),
                ]
            ),
        )
        self.assertEqual(self.check(config), 1)
        self.assertEqual(
            self.stderr.getvalue().splitlines(),
            [
                f"{config}: [listener:a] endpoint: 'tcp:abc': 'abc' is not a whole number",
                f"{config}: [listener:b] endpoint: 'tcp:99999': 99999 is not a port number "
                "(0 to 65535)",
                f"{config}: [listener:c] endpoint: 'tcp:2587:interfce=127.0.0.1': unknown option "
                "'interfce' (known: port, interface, backlog)",
                f"{config}: [listener:d] endpoint: 'unix:{self.directory}/run/mailauth.sock': "
                f"cannot listen: {self.directory}/run: no such folder",
            ],
        )
        self.assertEqual(self.stdout.getvalue(), "")

    def test_portInUse(self) -> None:
        """A port that something else holds is an error."""
        endpoint = f"tcp:{holdPort(self)}:interface=127.0.0.1"
        config = self.writeConfig(self.users, endpoint=endpoint)
        self.assertEqual(self.check(config), 1)
        self.assertEqual(
            self.stderr.getvalue(),
            f"{config}: [listener:submission] endpoint: "
            f"{endpoint!r}: cannot listen: Address already in use\n",
        )

    @defer.inlineCallbacks
    def test_portOfRunningMailauth(self):
        """
        A port held by a running mailauth is not an error: check-config is
        run beside the daemon before a restart.
        """
        daemon = Daemon(self.mktemp())
        self.addCleanup(daemon.stop)
        daemon.start()
        endpoint = f"tcp:{daemon.ports['submission']}:interface=127.0.0.1"
        config = self.writeConfig(self.users, endpoint=endpoint)
        status = yield threads.deferToThread(self.check, config)
        self.assertEqual((status, self.stderr.getvalue()), (0, ""))
        self.assertEqual(
            self.stdout.getvalue(),
            (
                f"{config}: [listener:submission] endpoint: {endpoint!r}: in use, by the running "
                "mailauth (it answers on [listener:submission]): not tried\n"
                f"{config}: OK\n"
            ),
        )

    def test_expiredCertificate(self) -> None:
        """An expired certificate is an error."""
        config = self.tlsConfig(days=-1)
        self.assertEqual(self.check(config), 1)
        self.assertRegex(
            self.stderr.getvalue(),
            rf"^{config}: \[tls\] certificate: "
            rf"{self.directory}/tls/cert.pem: expired on .* UTC: renew it\n$",
        )

    def test_certificateExpiresSoon(self) -> None:
        """One that expires within 30 days is a warning: exit 0, and it says warning."""
        config = self.tlsConfig(days=12.5)
        self.assertEqual(self.check(config), 0)
        self.assertRegex(
            self.stderr.getvalue(),
            rf"^{config}: \[tls\] certificate: warning: "
            rf"{self.directory}/tls/cert.pem: expires on .* UTC, in 12 day\(s\): "
            r"renew it\n$",
        )
        self.assertEqual(self.stdout.getvalue(), f"{config}: OK, with 1 warning(s)\n")

    def test_encryptedKey(self) -> None:
        """An encrypted key is one clear error; nothing asks for a passphrase."""
        config = self.tlsConfig(passphrase=b"secret")
        self.assertEqual(self.check(config), 1)
        self.assertEqual(
            self.stderr.getvalue(),
            (
                f"{config}: [tls]: {self.directory}/tls/key.pem: the private key is encrypted with "
                "a passphrase, which mailauth cannot ask for: store it decrypted (openssl pkey -in "
                "KEY -out NEWKEY), readable only by root and the daemon's group\n"
            ),
        )

    def test_usersFileLines(self) -> None:
        """Each line of the users file that the daemon would skip is a warning."""
        with open(self.users, "a") as f:
            f.write("broken\n\nb@example.org:{CRAM-MD5}\n")
        config = self.writeConfig(self.users)
        self.assertEqual(self.check(config), 0)
        lines = self.stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertEqual(
            lines[0], f"{self.users}:2: warning: no ':' after the login; the daemon skips this line"
        )
        self.assertTrue(lines[1].startswith(f"{self.users}:4: warning: b@example.org: "), lines)

    def test_allowNets(self) -> None:
        """
        check-config says nothing of a good allow_nets (the daemon enforces
        it) and warns of a line whose allow_nets cannot be read, which the
        daemon skips.
        """
        with open(self.users, "a") as f:
            f.write(
                "nets@example.org:{PLAIN}x::::::allow_nets=10.0.0.0/8,2001:db8::/32,local\n"
                "bad@example.org:{PLAIN}x::::::allow_real_nets=10.0.0.0/40\n"
            )
        config = self.writeConfig(self.users)
        self.assertEqual(self.check(config), 0)
        self.assertEqual(
            [line for line in self.stderr.getvalue().splitlines() if "_nets" in line],
            [
                f"{self.users}:3: warning: bad@example.org: allow_real_nets: '10.0.0.0/40' is"
                " not an IP address, a network or 'local'; the daemon skips this line"
            ],
        )

    def test_remoteAliasWithoutRelay(self) -> None:
        """
        An alias to another domain without a [relay] is a warning: mail to
        it would get 451 at every RCPT, and its senders retry for days.
        With a [relay] it is fine.
        """
        aliases = os.path.join(self.directory, "aliases")
        with open(aliases, "w") as f:
            f.write(
                "team@example.org: a@example.org, b@remote.example\nx@example.net: a@EXAMPLE.org\n"
            )
        config = self.writeConfig(self.users, f"aliases = {aliases}\n")
        self.assertEqual(self.check(config), 0)
        self.assertEqual(
            self.stderr.getvalue().splitlines(),
            [
                f"{aliases}: warning: team@example.org: b@remote.example is in another domain "
                "and there is no [relay]: mail to team@example.org gets 451 4.3.0"
            ],
        )
        config = self.writeConfig(
            self.users, f"aliases = {aliases}\n[relay]\nhost = relay.example\ntls = none\n"
        )
        self.assertEqual(self.check(config), 0)
        self.assertEqual(self.stderr.getvalue(), "")

    def test_uid(self) -> None:
        """
        With --uid, state_dir and the Maildir roots are checked as that user
        would see them; state_dir only needs to be reachable, since twistd
        started as root makes it and gives it to that user.
        """
        self.directory = os.path.join(searchableFolder(self), "setup")
        os.mkdir(self.directory, 0o755)
        self.users = os.path.join(self.directory, "users")
        with open(self.users, "w") as f:
            f.write(f"a@example.org:{CRAM}\n")
        config = self.writeConfig(self.users)
        nobody = "user nobody (uid 65534)"
        self.assertEqual(self.check(config, "--uid", "nobody"), 1)
        for domain in ("example.net", "example.org"):
            self.assertIn(
                f"{config}: [delivery] maildir: {self.directory}/mail/{domain}: {nobody} cannot "
                f"write {self.directory} to make {self.directory}/mail/{domain}, so no new "
                "Maildir can be made there\n",
                self.stderr.getvalue(),
            )
        self.assertEqual(len(self.stderr.getvalue().splitlines()), 2)
        os.mkdir(os.path.join(self.directory, "mail"), 0o755)
        os.chown(
            os.path.join(self.directory, "mail"), 65534, 65534
        ) if os.geteuid() == 0 else os.chmod(os.path.join(self.directory, "mail"), 0o777)
        self.assertEqual(self.check(config, "--uid", "65534"), 0, self.stderr.getvalue())
        self.assertEqual(self.check(config, "--uid", "no-such-user"), 1)
        self.assertEqual(self.stderr.getvalue(), "mailauth: --uid: no user 'no-such-user'\n")

    def test_defaultConfig(self) -> None:
        """check-config reads the default configuration without --config."""
        config = self.writeConfig(self.users)
        self.assertEqual(self.mailauth("check-config", defaultConfig=config), 0)
        self.assertEqual(self.stdout.getvalue(), f"{config}: OK\n")


class HelpTests(CommandMixin, unittest.TestCase):
    """The command line explains itself."""

    def test_version(self) -> None:
        """--version prints the package's version."""
        self.assertEqual(self.mailauth("--version"), 0)
        self.assertEqual(self.stdout.getvalue(), f"mailauth {cli.version()}\n")
        self.assertRegex(cli.version(), r"^\d+\.\d+")

    def test_sourceVersion(self) -> None:
        """The version used when not installed is setup.cfg's."""
        parser = configparser.ConfigParser()
        parser.read(os.path.join(ROOT, "setup.cfg"))
        self.assertEqual(cli.SOURCE_VERSION, parser["metadata"]["version"])
        self.patch(importlib.metadata, "version", _notInstalled)
        self.assertEqual(cli.version(), cli.SOURCE_VERSION)

    def test_everythingHasHelp(self) -> None:
        """Every command, subcommand, option and argument has a help line."""
        missing = []

        def walk(parser: argparse.ArgumentParser) -> None:
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for choice in action._choices_actions:
                        if not choice.help:
                            missing.append(f"{parser.prog} {choice.dest}")
                    for sub in action.choices.values():
                        walk(sub)
                elif not action.help:
                    name = "/".join(action.option_strings) or action.dest
                    missing.append(f"{parser.prog} {name}")
            if not parser.description:
                missing.append(f"{parser.prog}: no description")

        walk(cli._makeParser(cli.DEFAULT_CONFIG))
        self.assertEqual(missing, [])

    def test_helpOutput(self) -> None:
        """mailauth --help and mailauth user --help print their help and exit 0."""
        self.assertEqual(self.mailauth("--help"), 0)
        self.assertTrue(self.stdout.getvalue().startswith("usage: mailauth [-h] [--version]"))
        self.assertIn("check a configuration as the daemon would at start", self.stdout.getvalue())
        self.stdout.seek(0)
        self.stdout.truncate()
        self.assertEqual(self.mailauth("user", "--help"), 0)
        self.assertIn("Manage the users that [auth] users names", self.stdout.getvalue())
        self.assertIn("mailauth user add alice@example.org", self.stdout.getvalue())


def _notInstalled(name: str) -> str:
    raise importlib.metadata.PackageNotFoundError(name)


class ScriptTests(unittest.TestCase):
    """The command as a program."""

    def test_runAsModule(self) -> None:
        """
        C{python -m mailauth.cli} reads a password from its standard input
        and exits with the status of L{main}.
        """
        root = os.path.dirname(os.path.dirname(os.path.abspath(mailauth.__file__)))
        env = dict(os.environ, PYTHONPATH=root)
        result = subprocess.run(
            [sys.executable, "-m", "mailauth.cli", "hash", "-s", "CRAM-MD5"],
            input=b"alice-secret-1\n",
            capture_output=True,
            env=env,
            timeout=60,
        )
        self.assertEqual(result.stderr, b"")
        self.assertEqual(
            result.stdout,
            b"{CRAM-MD5}451f1cebcd891ea016e9a608e9c9303740c7cd126964ba63d2cd7799cd83017f\n",
        )
        self.assertEqual(result.returncode, 0)


class QueueCommandTests(unittest.TestCase):
    """C{mailauth queue list|flush|delete} on a state directory."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        from mailauth.spool import Queue

        self.stateDir = os.path.abspath(self.mktemp())
        self.clock = Clock()
        self.clock.advance(1795965994)
        self.queue = Queue(os.path.join(self.stateDir, "queue"), self.clock, "mx.example.test")
        writer = self.queue.newMessage("A1B2C3D4E5F6", "alice@example.org", ["bob@remote.test"])
        writer.write(b"Subject: x\r\n\r\nbody\r\n")
        writer.commit()
        self.stdout, self.stderr = io.StringIO(), io.StringIO()

    def mailauth(self, *argv: str) -> int:
        console = Console(io.BytesIO(), self.stdout, self.stderr)
        return main(list(argv), console)

    def test_list(self) -> None:
        """list shows each message with its sender and recipients."""
        self.assertEqual(self.mailauth("queue", "list", "--state-dir", self.stateDir), 0)
        out = self.stdout.getvalue()
        self.assertIn("A1B2C3D4E5F6", out)
        self.assertIn("<alice@example.org>", out)
        self.assertIn("<bob@remote.test>", out)
        self.assertTrue(out.endswith("-- 1 message(s) in the queue\n"), out)

    def test_listUnreadable(self) -> None:
        """
        A message whose envelope cannot be read (damaged, or set aside by
        the daemon as C{ID.corrupt}) is listed as one that cannot be sent,
        with why, and delete removes it: list said nothing of it, so the
        administrator never learnt of it nor of the ID to delete.
        """
        msg = os.path.join(self.stateDir, "queue", "msg")
        with open(os.path.join(msg, "BROKEN1.json"), "w") as f:
            f.write("{not json")
        with open(os.path.join(msg, "ASIDE1.corrupt"), "w") as f:
            f.write("garbage")
        with open(os.path.join(msg, "stray-file"), "w") as f:
            f.write("garbage")
        self.assertEqual(self.mailauth("queue", "list", "--state-dir", self.stateDir), 0)
        out = self.stdout.getvalue().splitlines()
        self.assertIn("ASIDE1  not sent: set aside as unreadable", out)
        [broken] = [line for line in out if line.startswith("BROKEN1  ")]
        self.assertIn("not sent: its envelope is unreadable: ", broken)
        self.assertEqual(
            out[-1],
            "-- 1 message(s) in the queue; 2 cannot be sent"
            " ('mailauth queue delete ID' removes one)",
        )
        self.assertEqual(self.stderr.getvalue(), "")
        for msgid in ("ASIDE1", "BROKEN1"):
            self.assertEqual(
                self.mailauth("queue", "delete", msgid, "--state-dir", self.stateDir), 0
            )
        self.assertEqual(
            sorted(os.listdir(msg)), ["A1B2C3D4E5F6.data", "A1B2C3D4E5F6.json", "stray-file"]
        )

    def test_flush(self) -> None:
        """flush makes every message due now."""
        self.assertEqual(self.mailauth("queue", "flush", "--state-dir", self.stateDir), 0)
        self.assertIn("1 message(s) due now", self.stdout.getvalue())

    def test_delete(self) -> None:
        """delete removes a message; an unknown ID is an error."""
        self.assertEqual(
            self.mailauth("queue", "delete", "A1B2C3D4E5F6", "--state-dir", self.stateDir), 0
        )
        self.assertEqual(self.mailauth("queue", "list", "--state-dir", self.stateDir), 0)
        self.assertIn("-- 0 message(s)", self.stdout.getvalue())
        self.assertEqual(
            self.mailauth("queue", "delete", "../../etc", "--state-dir", self.stateDir), 1
        )
        self.assertEqual(self.stderr.getvalue(), "mailauth: no message ../../etc in the queue\n")

    def writeConfig(self, extra: str = "") -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(
                f"[server]\nstate_dir = {self.stateDir}\n"
                "[listener:submission]\nendpoint = tcp:0\n"
                "[tls]\ncertificate = c.pem\nprivate_key = k.pem\n"
                "[auth]\nusers = users\n"
                "[delivery]\nlocal_domains = example.org\n"
                "maildir = /var/mail/{domain}/{localpart}/Maildir\n" + extra
            )
        return path

    def test_fromConfig(self) -> None:
        """The queue is the one under the configuration's state_dir."""
        config = self.writeConfig("[relay]\nhost = smtp.example.net\n")
        self.assertEqual(self.mailauth("queue", "list", "--config", config), 0)
        self.assertIn("A1B2C3D4E5F6", self.stdout.getvalue())
        self.assertEqual(
            main(["queue", "list"], Console(io.BytesIO(), self.stdout, self.stderr), config), 0
        )
        self.assertTrue(self.stdout.getvalue().endswith("-- 1 message(s) in the queue\n"))

    def test_missingStateDir(self) -> None:
        """
        A state directory that does not exist, or has no queue, is an error,
        not an empty queue, for every queue command.
        """
        missing = os.path.abspath(self.mktemp())
        for argv in (["list"], ["flush"], ["delete", "A1B2C3D4E5F6"]):
            self.assertEqual(self.mailauth("queue", *argv, "--state-dir", missing), 1)
            self.assertEqual(
                self.stderr.getvalue(),
                f"mailauth: {missing}: no such folder (is it the daemon's state_dir?)\n",
            )
            self.stderr.truncate(0)
            self.stderr.seek(0)
        os.mkdir(missing)
        self.assertEqual(self.mailauth("queue", "list", "--state-dir", missing), 1)
        self.assertEqual(
            self.stderr.getvalue(),
            f"mailauth: {missing}/queue: no such folder: "
            "the daemon makes it when it starts with a [relay] section\n",
        )
        self.assertEqual(self.stdout.getvalue(), "")

    def test_noRelay(self) -> None:
        """With a configuration that has no [relay], nothing is ever queued: it says so."""
        config = self.writeConfig()
        self.assertEqual(self.mailauth("queue", "list", "--config", config), 1)
        self.assertEqual(
            self.stderr.getvalue(),
            f"mailauth: {config}: no [relay] section, so "
            "mail for other domains is refused and nothing is ever queued\n",
        )
