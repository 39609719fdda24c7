"""
L{mailauth.checks}: what check-config and the daemon's start both check,
beyond the configuration's text.
"""

from __future__ import annotations

import io
import os
import re
import socket
import stat
import time

from twisted.internet import defer, threads
from twisted.trial import unittest

from mailauth import checks, cli, listening, passwords
from mailauth import config as configmod
from mailauth.checks import Account, Findings, checkAll, folderProblem, maildirRoots
from mailauth.tls import notAfter
from tests.harness import Daemon
from tests.support import holdPort, searchableFolder, writeCertificate

BASE = """
[server]
hostname = mx.example.test
state_dir = {dir}/state

[tls]
certificate = {dir}/tls/cert.pem
private_key = {dir}/tls/key.pem

[auth]
users = {dir}/users

[delivery]
local_domains = example.test example.net
maildir = {dir}/mail/{{domain}}/{{localpart}}/Maildir
"""


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def listener(name: str, endpoint: str, tls: str = "starttls") -> str:
    return f"[listener:{name}]\nendpoint = {endpoint}\ntls = {tls}\n"


def freePort() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CheckTestMixin:
    """A setup in a temporary folder: certificate, users file, configuration."""

    def setUp(self) -> None:
        self.dir = os.path.join(searchableFolder(self), "setup")
        os.mkdir(self.dir, 0o755)
        writeCertificate(os.path.join(self.dir, "tls"))
        self.users = os.path.join(self.dir, "users")
        with open(self.users, "w") as f:
            f.write("alice@example.test:{CRAM-MD5}" + "ab" * 32 + "\n")

    def config(self, listeners: str = "", extra: str = "") -> configmod.Config:
        if not listeners:
            listeners = listener("submission", "tcp:0:interface=127.0.0.1")
        path = os.path.join(self.dir, "mailauth.conf")
        with open(path, "w") as f:
            f.write(BASE.format(dir=self.dir) + listeners + extra)
        return configmod.load(path)


class FindingsTests(unittest.TestCase):
    def test_add(self) -> None:
        """Findings add up list by list."""
        self.assertEqual(
            Findings(("e1",), ("w1",), ("n1",)) + Findings(("e2",), (), ("n2",)),
            Findings(("e1", "e2"), ("w1",), ("n1", "n2")),
        )


class AccountTests(unittest.TestCase):
    """Permissions as another user would see them, from the mode bits."""

    def setUp(self) -> None:
        self.path = os.path.join(searchableFolder(self), "folder")
        os.mkdir(self.path)
        st = os.stat(self.path)
        self.ownerUID, self.ownerGID = st.st_uid, st.st_gid
        # Neither the owner nor in the group, whoever runs the tests.
        self.other = Account("other", self.ownerUID + 54321, self.ownerGID + 54321)

    def test_ownerGroupOther(self) -> None:
        """
        The owner is judged by the owner bits, a member of the group (primary
        or supplementary) by the group bits, anyone else by the other bits.
        """
        os.chmod(self.path, 0o750)
        owner = Account("owner", self.ownerUID, self.ownerGID + 1)
        member = Account("member", self.ownerUID + 1, self.ownerGID + 1, frozenset([self.ownerGID]))
        self.assertTrue(owner.may(self.path, os.W_OK | os.X_OK))
        self.assertTrue(member.may(self.path, os.R_OK | os.X_OK))
        self.assertFalse(member.may(self.path, os.W_OK))
        self.assertFalse(self.other.may(self.path, os.X_OK))
        os.chmod(self.path, 0o705)
        self.assertFalse(member.may(self.path, os.X_OK))
        self.assertTrue(self.other.may(self.path, os.X_OK))

    def test_root(self) -> None:
        """Root may read and write anything, and search folders."""
        os.chmod(self.path, 0)
        root = Account("root", 0, 0)
        self.assertTrue(root.may(self.path, os.R_OK | os.W_OK | os.X_OK))

    def test_process(self) -> None:
        """This process's own account asks the kernel (os.access)."""
        account = Account.ofProcess()
        self.assertTrue(account.isProcess)
        self.assertEqual(account.uid, os.geteuid())
        os.chmod(self.path, 0o500)
        for mode in (os.R_OK, os.W_OK, os.X_OK):
            self.assertEqual(account.may(self.path, mode), os.access(self.path, mode))

    def test_lookup(self) -> None:
        """
        A user is looked up by name or number, with its primary and
        supplementary groups, as twistd --uid would switch to it.
        """
        nobody = Account.lookup("nobody")
        self.assertEqual((nobody.name, nobody.uid, nobody.isProcess), ("nobody", 65534, False))
        self.assertIn(nobody.gid, nobody.groups)
        self.assertEqual(Account.lookup("65534"), nobody)
        self.assertEqual(Account.lookup(65534, 0).gid, 0)
        e = self.assertRaises(KeyError, Account.lookup, "no-such-user-here")
        self.assertEqual(e.args[0], "no user 'no-such-user-here'")
        self.assertRaises(KeyError, Account.lookup, "3999999")
        self.assertEqual(
            Account.lookup("3999999", 7), Account("3999999", 3999999, 7, frozenset([7]))
        )


class FolderTests(unittest.TestCase):
    """Whether a user could make files in a folder, making it first if missing."""

    def setUp(self) -> None:
        self.top = os.path.join(searchableFolder(self), "top")
        os.mkdir(self.top, 0o755)
        st = os.stat(self.top)
        self.owner = Account("owner", st.st_uid, st.st_gid)
        self.other = Account("other", st.st_uid + 54321, st.st_gid + 54321)

    def test_writable(self) -> None:
        """Its owner can write an existing folder, or make a missing one in it."""
        self.assertIsNone(folderProblem(self.owner, self.top))
        self.assertIsNone(folderProblem(self.owner, os.path.join(self.top, "a", "b")))

    def test_notWritable(self) -> None:
        """Another user cannot; the line names the user and the folder."""
        self.assertEqual(
            folderProblem(self.other, self.top),
            f"user other (uid {self.other.uid}) cannot write {self.top}",
        )
        self.assertEqual(
            folderProblem(self.other, os.path.join(self.top, "a", "b")),
            f"user other (uid {self.other.uid}) cannot write {self.top} to make {self.top}/a/b",
        )

    def test_cannotEnter(self) -> None:
        """A folder on the way that the user may not search stops it."""
        inner = os.path.join(self.top, "inner")
        os.mkdir(inner, 0o777)
        os.chmod(self.top, 0o750)
        self.assertEqual(
            folderProblem(self.other, inner),
            f"user other (uid {self.other.uid}) cannot enter {self.top}",
        )

    def test_fileInTheWay(self) -> None:
        """A file where a folder should be is named."""
        path = os.path.join(self.top, "file")
        open(path, "w").close()
        self.assertEqual(
            folderProblem(self.owner, os.path.join(path, "Maildir")), f"{path} is not a folder"
        )

    def test_maildirRoots(self) -> None:
        """
        The Maildirs are made in the part of the template before the first
        per-user field, for each local domain.
        """
        domains = frozenset(["b.test", "a.test"])
        self.assertEqual(
            maildirRoots("/var/mail/{domain}/{localpart}/Maildir", domains),
            ["/var/mail/a.test", "/var/mail/b.test"],
        )
        self.assertEqual(maildirRoots("/home/vmail/{user}/Maildir", domains), ["/home/vmail"])
        self.assertEqual(maildirRoots("/srv/{localpart}.{domain}", domains), ["/srv"])


class FolderCheckTests(CheckTestMixin, unittest.TestCase):
    """state_dir and the Maildir roots, for the user the daemon runs as."""

    def test_unwritable(self) -> None:
        """A user who cannot write state_dir or the Maildir roots gets a line for each."""
        cfg = self.config()
        other = Account("other", os.getuid() + 54321, os.getgid() + 54321)
        os.chmod(self.dir, 0o755)
        findings = checks.checkFolders(cfg, other, chown=False)
        who = f"user other (uid {other.uid})"
        self.assertEqual(
            findings.errors,
            (
                f"{cfg.path}: [server] state_dir: {self.dir}/state: {who} cannot write {self.dir} "
                f"to make {self.dir}/state",
                f"{cfg.path}: [delivery] maildir: {self.dir}/mail/example.net: {who} cannot write "
                f"{self.dir} to make {self.dir}/mail/example.net, so no new Maildir can be made "
                "there",
                f"{cfg.path}: [delivery] maildir: {self.dir}/mail/example.test: {who} cannot write "
                f"{self.dir} to make {self.dir}/mail/example.test, so no new Maildir can be made "
                "there",
            ),
        )
        self.assertEqual(checks.checkFolders(cfg, Account.ofProcess(), chown=False), Findings())

    def test_chownedStateDir(self) -> None:
        """
        Under twistd --uid the daemon makes state_dir as root and gives it to
        the user, who then only needs to reach it.
        """
        cfg = self.config()
        other = Account("other", os.getuid() + 54321, os.getgid() + 54321)
        os.makedirs(os.path.join(self.dir, "mail"))
        os.chmod(os.path.join(self.dir, "mail"), 0o777)
        os.chmod(self.dir, 0o755)
        self.assertEqual(checks.checkFolders(cfg, other, chown=True), Findings())
        os.chmod(self.dir, 0o750)
        [state, *_] = checks.checkFolders(cfg, other, chown=True).errors
        self.assertEqual(
            state,
            f"{cfg.path}: [server] state_dir: {self.dir}/state: "
            f"user other (uid {other.uid}) cannot enter {self.dir}",
        )

    def test_filesReadAfterPrivilegesDrop(self) -> None:
        """
        Under twistd --uid, the relay's password file must be readable by
        that user (error); the files re-read on change or SIGHUP should be
        (warning). Without --uid nothing more is checked here.
        """
        password = os.path.join(self.dir, "relay-password")
        with open(password, "w") as f:
            f.write("secret\n")
        cfg = self.config(
            extra=f"[relay]\nhost = smtp.example.net\nusername = u\npassword_file = {password}\n"
        )
        for path in (password, self.users, cfg.tls.private_key):
            os.chmod(path, 0o600)
        mail = os.path.join(self.dir, "mail")
        os.mkdir(mail, 0o777)
        os.chmod(mail, 0o777)
        other = Account("other", os.getuid() + 54321, os.getgid() + 54321)
        who = f"user other (uid {other.uid}) cannot read it"
        self.assertEqual(
            checks.checkReadable(cfg, other, chown=True),
            Findings(
                errors=(
                    f"{cfg.path}: [relay] password_file: {password}: {who}, so the daemon "
                    "cannot relay",
                ),
                warnings=tuple(
                    f"{cfg.path}: {where}: warning: {path}: {who}, so the daemon cannot read it "
                    "again when it changes or on SIGHUP"
                    for where, path in (
                        ("[auth] users", self.users),
                        ("[tls] private_key", cfg.tls.private_key),
                    )
                ),
            ),
        )
        self.assertEqual(checks.checkReadable(cfg, other, chown=False), Findings())
        self.assertEqual(len(checkAll(cfg, other, chown=True).errors), 1)


class EndpointTests(CheckTestMixin, unittest.TestCase):
    """Endpoint strings, parsed by Twisted, and what listening would refuse."""

    def problems(self, endpoint: str, daemon: bool = False) -> tuple:
        cfg = self.config(listener("submission", endpoint))
        return listening.checkListening(cfg, daemon).errors

    def assertProblem(self, endpoint: str, message: str, daemon: bool = False) -> None:
        path = os.path.join(self.dir, "mailauth.conf")
        self.assertEqual(
            self.problems(endpoint, daemon),
            (f"{path}: [listener:submission] endpoint: {endpoint!r}: {message}",),
        )

    def test_portNotANumber(self) -> None:
        """tcp:abc says the port is not a number."""
        self.assertProblem("tcp:abc", "'abc' is not a whole number")

    def test_portOutOfRange(self) -> None:
        """tcp:99999 parses, but is no port."""
        self.assertProblem("tcp:99999", "99999 is not a port number (0 to 65535)")

    def test_unknownOption(self) -> None:
        """A misspelt option is named, with the ones that exist."""
        self.assertProblem(
            "tcp:2587:interfce=127.0.0.1",
            "unknown option 'interfce' (known: port, interface, backlog)",
        )
        self.assertProblem(
            "unix:/tmp/x.sock:mdoe=600",
            "unknown option 'mdoe' (known: address, mode, backlog, lockfile)",
        )

    def test_badValues(self) -> None:
        """Bad option values and missing ones are said in words."""
        self.assertProblem("tcp:0:backlog=many", "'many' is not a whole number")
        self.assertProblem(f"unix:{self.dir}/s.sock:mode=999", "'999' is not an octal number")
        self.assertProblem("tcp:", "'' is not a whole number")
        self.assertProblem("TCP:587", "write the endpoint type in lower case: tcp:")

    def test_unixFolderMissing(self) -> None:
        """A unix: socket in a folder that does not exist cannot be made."""
        self.assertProblem(
            f"unix:{self.dir}/run/mailauth.sock", f"cannot listen: {self.dir}/run: no such folder"
        )

    def test_unixPathNotASocket(self) -> None:
        """A unix: path that is a file already cannot be a socket."""
        open(os.path.join(self.dir, "file"), "w").close()
        self.assertProblem(
            f"unix:{self.dir}/file", f"cannot listen: {self.dir}/file exists and is not a socket"
        )

    def test_unixGood(self) -> None:
        """A unix: socket in a folder that exists is fine."""
        self.assertEqual(self.problems(f"unix:{self.dir}/mailauth.sock"), ())

    def test_systemd(self) -> None:
        """
        A systemd: endpoint's options are checked; check-config, not started
        by systemd, cannot check the socket itself, but the daemon started
        without it is told.
        """
        self.assertEqual(self.problems("systemd:domain=INET:index=0"), ())
        self.assertProblem("systemd:domain=INTE:index=0", "domain= must be INET, INET6 or UNIX")
        self.assertProblem("systemd:domain=INET", "give exactly one of index= and name=")
        self.assertProblem("systemd:domain=INET:index=one", "index=one is not a whole number")
        self.assertProblem(
            "systemd:domain=INET:idx=0", "unknown option 'idx' (known: domain, index, name)"
        )
        self.assertProblem(
            "systemd:domain=INET:index=7",
            "systemd passed no such socket: start mailauth through its socket "
            "unit, or use a tcp: endpoint",
            daemon=True,
        )

    def test_metricsAndAutoconfig(self) -> None:
        """The [metrics] and [autoconfig] endpoints are checked as well."""
        cfg = self.config(extra="[metrics]\nendpoint = tcp:99999\n")
        self.assertEqual(
            listening.checkListening(cfg, False).errors,
            (
                f"{cfg.path}: [metrics] endpoint: 'tcp:99999': 99999 is not a port number "
                "(0 to 65535)",
            ),
        )


class PortTests(CheckTestMixin, unittest.TestCase):
    """Each TCP port is bound for a moment on its interface."""

    def test_inUse(self) -> None:
        """A port something else holds is an error, for check-config and the daemon."""
        port = holdPort(self)
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        cfg = self.config(listener("submission", endpoint))
        line = (
            f"{cfg.path}: [listener:submission] endpoint: {endpoint!r}: cannot listen: "
            "Address already in use"
        )
        for daemon in (False, True):
            self.assertEqual(listening.checkListening(cfg, daemon), Findings(errors=(line,)))

    def test_free(self) -> None:
        """A free port is fine, and is free again after the check."""
        port = freePort()
        cfg = self.config(listener("submission", f"tcp:{port}:interface=127.0.0.1"))
        self.assertEqual(listening.checkListening(cfg, True), Findings())
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))

    def test_samePortTwice(self) -> None:
        """Two endpoints of the configuration on one port collide, as in the daemon."""
        port = freePort()
        cfg = self.config(
            listener("a", f"tcp:{port}:interface=127.0.0.1") + listener("b", f"tcp:{port}")
        )
        self.assertEqual(
            listening.checkListening(cfg, True).errors,
            (
                f"{cfg.path}: [listener:b] endpoint: 'tcp:{port}': cannot listen: "
                "Address already in use",
            ),
        )

    def test_noSuchAddress(self) -> None:
        """An interface that is no address of this machine cannot be bound."""
        cfg = self.config(listener("submission", f"tcp:{freePort()}:interface=192.0.2.1"))
        [error] = listening.checkListening(cfg, True).errors
        self.assertTrue(error.endswith("cannot listen: Cannot assign requested address"), error)

    def test_ipv6(self) -> None:
        """An IPv6 interface is bound as IPv6, as Twisted would."""
        port = freePort()
        cfg = self.config(listener("submission", f"tcp6:{port}:interface=\\:\\:1"))
        self.assertEqual(listening.checkListening(cfg, True), Findings())
        s = socket.socket(socket.AF_INET6)
        self.addCleanup(s.close)
        s.bind(("::1", port))
        self.assertEqual(len(listening.checkListening(cfg, True).errors), 1)

    @defer.inlineCallbacks
    def test_heldByRunningMailauth(self):
        """
        For check-config, ports held by a running mailauth (it greets as one,
        here over implicit TLS) are noted, not errors: restarting it frees
        them. The daemon itself still cannot start beside it.
        """
        daemon = Daemon(self.mktemp())
        self.addCleanup(daemon.stop)
        daemon.start()
        smtps = daemon.ports["submissions"]
        cfg = self.config(listener("submissions", f"tcp:{smtps}:interface=127.0.0.1", "implicit"))
        findings = yield threads.deferToThread(listening.checkListening, cfg, False)
        self.assertEqual(
            findings,
            Findings(
                notes=(
                    f"{cfg.path}: [listener:submissions] endpoint: "
                    f"'tcp:{smtps}:interface=127.0.0.1': "
                    "in use, by the running mailauth (it answers on [listener:submissions]): "
                    "not tried",
                )
            ),
        )
        findings = yield threads.deferToThread(listening.checkListening, cfg, True)
        self.assertEqual(len(findings.errors), 1)

    def test_greeting(self) -> None:
        """Only a mailauth greeting counts; a refused connection is no mailauth."""
        self.assertFalse(listening.greetsAsMailauth("127.0.0.1", holdPort(self), False))
        self.assertTrue(listening._GREETING.match(b"220 mx.example.test ESMTP mailauth\r\n"))
        self.assertFalse(listening._GREETING.match(b"220 mx.example.test ESMTP Postfix\r\n"))


class CertificateTests(CheckTestMixin, unittest.TestCase):
    """The certificate's expiry date and the key's encryption."""

    def test_expired(self) -> None:
        """An expired certificate is an error."""
        writeCertificate(os.path.join(self.dir, "tls"), days=-2)
        cfg = self.config()
        [error] = checkAll(cfg, Account.ofProcess()).errors
        self.assertRegex(
            error,
            rf"^{cfg.path}: \[tls\] certificate: {self.dir}/tls/cert.pem: "
            r"expired on \d{4}-\d\d-\d\d \d\d:\d\d UTC: renew it$",
        )

    def test_expiresSoon(self) -> None:
        """One that expires within 30 days is a warning, and not before."""
        cfg = self.config()
        expires = notAfter(cfg.tls.certificate)
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires))
        self.assertEqual(checks.checkCertificate(cfg, expires - 30 * 86400 - 1), Findings())
        self.assertEqual(
            checks.checkCertificate(cfg, expires - 29.5 * 86400),
            Findings(
                warnings=(
                    f"{cfg.path}: [tls] certificate: warning: {self.dir}/tls/cert.pem: "
                    f"expires on {date}, in 29 day(s): renew it",
                )
            ),
        )
        self.assertEqual(len(checks.checkCertificate(cfg, expires).errors), 1)

    def test_encryptedKey(self) -> None:
        """An encrypted key is one clear error, and nothing asks for a passphrase."""
        writeCertificate(os.path.join(self.dir, "tls"), passphrase=b"secret")
        cfg = self.config()
        self.assertEqual(
            checkAll(cfg, Account.ofProcess()).errors,
            (
                f"{cfg.path}: [tls]: {self.dir}/tls/key.pem: the private key is encrypted with a "
                "passphrase, which mailauth cannot ask for: store it decrypted (openssl pkey -in "
                "KEY -out NEWKEY), readable only by root and the daemon's group",
            ),
        )


class UsersFileTests(CheckTestMixin, unittest.TestCase):
    """The users file's lines that the daemon would skip are warnings."""

    def test_malformedLines(self) -> None:
        """
        Each malformed line is one warning naming the file and line; the
        daemon leaves them out, as it logs them itself when it loads the file.
        """
        with open(self.users, "a") as f:
            f.write("no colon here\nbob@example.test:{NOPE}x\nplain@example.test:{PLAIN}pw\n")
        cfg = self.config()
        findings = checkAll(cfg, Account.ofProcess())
        self.assertEqual(findings.errors, ())
        self.assertEqual(len(findings.warnings), 3, findings.warnings)
        self.assertEqual(
            findings.warnings[0],
            f"{self.users}:2: warning: no ':' after the login; the daemon skips this line",
        )
        self.assertRegex(
            findings.warnings[1],
            rf"^{self.users}:3: warning: bob@example.test: "
            r".*NOPE.*; the daemon skips this line$",
        )
        self.assertEqual(
            findings.warnings[2],
            (
                f"{cfg.path}: [auth] users: warning: {self.users}: 1 user(s) with plaintext "
                "passwords: plain@example.test; set a hashed one with 'mailauth user passwd'"
            ),
        )
        self.assertEqual(checkAll(cfg, Account.ofProcess(), daemon=True), Findings())

    def test_addressMapLines(self) -> None:
        """The aliases' and sender map's skipped lines are warnings too."""
        aliases = os.path.join(self.dir, "aliases")
        with open(aliases, "w") as f:
            f.write("team@example.test: alice@example.test\nno address here\n")
        self.config()
        path = os.path.join(self.dir, "mailauth.conf")
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace("[delivery]\n", f"[delivery]\naliases = {aliases}\n"))
        cfg = configmod.load(path)
        self.assertEqual(
            checkAll(cfg, Account.ofProcess()).warnings,
            (
                f"{aliases}:2: warning: expected 'address: address[, address...]'; the daemon "
                "skips this line",
            ),
        )

    def test_deadAliases(self) -> None:
        """
        An alias for a user's own address (never used: the user's Maildir
        wins) and a local target that is no user and no alias (its share
        of the mail is dropped) are warnings; a target another alias or a
        catch-all takes, and postmaster with [delivery] postmaster, are not.
        """
        aliases = os.path.join(self.dir, "aliases")
        with open(aliases, "w") as f:
            f.write(
                "alice@example.test: alice@example.test, archive@example.test\n"
                "team@example.test: alice@example.test, tpyo@example.test, sales@example.test\n"
                "sales@example.test: alice@example.test\n"
                "abuse@example.test: postmaster@example.test\n"
                "@example.net: alice@example.test\n"
                "ops@example.test: anyone@example.net\n"
            )
        self.config()
        path = os.path.join(self.dir, "mailauth.conf")
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(
                text.replace(
                    "[delivery]\n",
                    f"[delivery]\naliases = {aliases}\npostmaster = alice@example.test\n",
                )
            )
        cfg = configmod.load(path)
        self.assertEqual(
            checkAll(cfg, Account.ofProcess()).warnings,
            (
                f"{aliases}: warning: alice@example.test is a user: this alias is never used "
                "(mail to a user goes to their Maildir)",
                f"{aliases}: warning: alice@example.test: archive@example.test is no user and "
                "no alias: mail for it is dropped",
                f"{aliases}: warning: team@example.test: tpyo@example.test is no user and no "
                "alias: mail for it is dropped",
            ),
        )

    def test_autoconfigWithoutIncoming(self) -> None:
        """An [autoconfig] that names no IMAP or POP3 server is a warning."""
        cfg = self.config(
            extra="[autoconfig]\nendpoint = tcp:0:interface=127.0.0.1\nports = submission:587\n"
        )
        self.assertEqual(
            checkAll(cfg, Account.ofProcess()).warnings,
            (
                f"{cfg.path}: [autoconfig] incoming: warning: not set: Thunderbird and Outlook "
                "discard a setup that names no IMAP or POP3 server",
            ),
        )


class CheckAllTests(CheckTestMixin, unittest.TestCase):
    def test_good(self) -> None:
        """A good setup has nothing to say."""
        self.assertEqual(checkAll(self.config(), Account.ofProcess()), Findings())

    def test_everyProblemOnce(self) -> None:
        """Problems of every kind are found together, one line each."""
        port = holdPort(self)
        os.remove(self.users)
        cfg = self.config(
            listener("a", "tcp:abc")
            + listener("b", f"tcp:{port}")
            + listener("c", f"unix:{self.dir}/no/such.sock")
        )
        errors = checkAll(cfg, Account.ofProcess()).errors
        self.assertEqual(len(errors), 4, errors)
        self.assertIn("[auth] users", errors[0])
        self.assertIn("[listener:a]", errors[1])
        self.assertIn("[listener:c]", errors[2])
        self.assertIn("[listener:b]", errors[3])

    def test_stateDirIsAFile(self) -> None:
        """A state_dir that is a file is an error for any user."""
        open(os.path.join(self.dir, "state"), "w").close()
        cfg = self.config()
        self.assertEqual(
            checkAll(cfg, Account.ofProcess()).errors,
            (
                f"{cfg.path}: [server] state_dir: {self.dir}/state: {self.dir}/state is not a "
                "folder",
            ),
        )
        self.assertTrue(stat.S_ISREG(os.stat(cfg.server.state_dir).st_mode))

    def test_relativePaths(self) -> None:
        """
        A relative state_dir or maildir template is a warning naming where it
        leads from the folder the check runs in, for check-config and the
        daemon's start alike (which would start in / under systemd); absolute
        ones give none.
        """
        self.assertEqual(checkAll(self.config(), Account.ofProcess()).warnings, ())
        here = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, here)
        folder = os.getcwd()
        cfg = configmod.loadText(
            BASE.format(dir=self.dir)
            .replace(f"state_dir = {self.dir}/state", "state_dir = state")
            .replace(f"maildir = {self.dir}/mail", "maildir = mail")
            + listener("submission", "tcp:0:interface=127.0.0.1"),
            "mailauth.conf",
        )
        expected = tuple(
            f"mailauth.conf: {where}: warning: {path} is relative to the folder each process "
            f"starts in ({folder}/{path} from this one, under / for a systemd unit): use an "
            "absolute path"
            for where, path in (
                ("[server] state_dir", "state"),
                ("[delivery] maildir", "mail/{domain}/{localpart}/Maildir"),
            )
        )
        for daemon in (False, True):
            findings = checkAll(cfg, Account.ofProcess(), daemon=daemon)
            self.assertEqual(findings.errors, ())
            self.assertEqual(findings.warnings, expected)


class MechanismWarningTests(unittest.TestCase):
    def test_cramOfferedToHashedUsers(self) -> None:
        """
        CRAM-MD5 offered while some users are stored in schemes it cannot
        verify: one line naming the mechanism, how many users, their schemes
        and the schemes it needs.
        """
        cfg = configmod.loadText(makeConfigText("mechanisms = PLAIN LOGIN CRAM-MD5"), "test.conf")
        users = [
            ("a@x.test", "ARGON2ID"),
            ("b@x.test", "CRAM-MD5"),
            ("c@x.test", "PLAIN"),
            ("d@x.test", "SHA512-CRYPT"),
            ("e@x.test", "ARGON2ID"),
        ]
        self.assertEqual(
            checks.mechanismWarnings(cfg, users),
            [
                "test.conf: [auth] mechanisms: warning: CRAM-MD5 is offered but 3 of 5 users "
                "cannot use it (stored as ARGON2ID, SHA512-CRYPT), so clients that pick it fail "
                "for them; offer it only if every user is stored as CRAM-MD5, HMAC-MD5, PLAIN, "
                "CLEAR, CLEARTEXT"
            ],
        )

    def test_scram(self) -> None:
        """SCRAM-SHA-256 and its -PLUS need users stored as SCRAM-SHA-256: a line each."""
        cfg = configmod.loadText(
            makeConfigText("mechanisms = PLAIN SCRAM-SHA-256 SCRAM-SHA-256-PLUS"), "test.conf"
        )
        warnings = checks.mechanismWarnings(
            cfg, [("a@x.test", "SCRAM-SHA-256"), ("b@x.test", "ARGON2ID")]
        )
        self.assertEqual(
            [w.split(" is offered")[0].rsplit(" ", 1)[1] for w in warnings],
            ["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"],
        )
        self.assertTrue(all(w.endswith("stored as SCRAM-SHA-256") for w in warnings))

    def test_nothingToWarnAbout(self) -> None:
        """No warning when every user can use every mechanism offered, or CRAM-MD5 is not."""
        cram = configmod.loadText(makeConfigText("mechanisms = PLAIN CRAM-MD5"))
        self.assertEqual(
            checks.mechanismWarnings(cram, [("a@x.test", "CRAM-MD5"), ("b@x.test", "PLAIN")]), []
        )
        plain = configmod.loadText(makeConfigText("mechanisms = PLAIN LOGIN"))
        self.assertEqual(checks.mechanismWarnings(plain, [("a@x.test", "ARGON2ID")]), [])

    def test_fromTheUsersFile(self) -> None:
        """checkMechanisms reads the users file; one it cannot read gives no warning (an error)."""
        users = self.mktemp()
        with open(users, "w") as f:
            f.write(f"a@x.test:{passwords.makeHash(b'secret', 'SHA256-CRYPT')}\n")
        cfg = configmod.loadText(makeConfigText("mechanisms = CRAM-MD5", users))
        [warning] = checks.checkMechanisms(cfg).warnings
        self.assertIn("CRAM-MD5 is offered but 1 of 1 users cannot use it", warning)
        missing = configmod.loadText(makeConfigText("mechanisms = CRAM-MD5", users + ".gone"))
        self.assertEqual(checks.checkMechanisms(missing), Findings())

    def test_checkConfigWarnsAndSucceeds(self) -> None:
        """
        C{mailauth check-config} prints the warning on its own line to
        standard error and still says OK, exiting 0; the daemon's start
        finds the same warning (and logs it).
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        users = os.path.join(directory, "users")
        with open(users, "w") as f:
            f.write(f"a@x.test:{passwords.makeHash(b'secret', 'SHA512-CRYPT')}\n")
        path = os.path.join(directory, "mailauth.conf")
        text = makeConfigText("mechanisms = PLAIN CRAM-MD5", users)
        text = text.replace("tcp:2587", "tcp:0:interface=127.0.0.1").replace(
            "/var/mail/", directory + "/mail/"
        )
        with open(path, "w") as f:
            f.write(f"[server]\nstate_dir = {directory}/state\n" + text)
        console = cli.Console(io.BytesIO(), io.StringIO(), io.StringIO())
        self.assertEqual(
            cli.main(["check-config", "--config", path], console), 0, console.stderr.getvalue()
        )
        self.assertEqual(console.stdout.getvalue(), f"{path}: OK, with 1 warning(s)\n")
        [line] = console.stderr.getvalue().splitlines()
        self.assertIn(f"{path}: [auth] mechanisms: warning: CRAM-MD5 is offered", line)
        findings = checkAll(configmod.load(path), Account.ofProcess(), daemon=True)
        self.assertEqual(findings.warnings, (line,))

    def test_demoOffersWhatItsUsersCanDo(self) -> None:
        """
        The demo configuration (etc/demo.conf, with the users the Makefile
        adds for C{make run}) offers only mechanisms every demo user can use.
        """
        cfg = configmod.load(os.path.join(ROOT, "etc", "demo.conf"))
        with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
            makefile = f.read()
        added = re.findall(r"mailauth user add (\S+)(?: --scheme (\S+))?", makefile)
        self.assertTrue(added)
        users = [(login, scheme or passwords.DEFAULT_SCHEME) for login, scheme in added]
        self.assertEqual(checks.mechanismWarnings(cfg, users), [])


def makeConfigText(mechanisms: str, users: str = "/etc/mailauth/users") -> str:
    return f"""
[listener:submission]
endpoint = tcp:2587
tls = none
auth = optional

[auth]
{mechanisms}
users = {users}

[delivery]
local_domains = example.org
maildir = /var/mail/{{domain}}/{{localpart}}/Maildir
"""
