"""
End to end: the real service from L{mailauth.tap} on 127.0.0.1:0, Python's
smtplib over STARTTLS and implicit TLS with each mechanism, Maildir files
checked byte for byte.
"""

from __future__ import annotations

import email
import email.policy
import os
import pwd
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
from email.utils import parsedate_to_datetime

from twisted.internet import defer, reactor
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial import unittest

from mailauth import tap
from tests.harness import (
    CRAM,
    MESSAGE,
    PASSWORD,
    RECEIVED,
    ROOT,
    SHA512,
    VECTORS,
    Daemon,
    EndToEndMixin,
    LogWatcher,
    clientContext,
)
from tests.support import holdPort, searchableFolder, writeCertificate


class DeliveryTests(EndToEndMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def checkDelivered(self, listener: str, mechanism: str, login: str):
        result = yield self.submit(listener, mechanism, login, PASSWORD)
        self.assertEqual(result, {})
        [(name, content)] = self.daemon.delivered("bob@example.test")
        m = RECEIVED.match(content)
        self.assertIsNotNone(m, content[:400])
        self.assertEqual(m.group("login"), login.encode())
        self.assertEqual(content[m.end() :], MESSAGE.replace(b"\r\n", b"\n"))
        self.assertTrue(name.endswith(f",S={len(content)}"), name)
        self.assertEqual(
            os.listdir(os.path.join(self.daemon.maildir("bob@example.test"), "tmp")), []
        )
        mode = os.stat(self.daemon.maildir("bob@example.test")).st_mode & 0o777
        self.assertEqual(mode, 0o700)

    def test_startTLSPlain(self):
        """STARTTLS + PLAIN delivers the message byte for byte, with our Received header."""
        return self.checkDelivered("submission", "PLAIN", SHA512)

    def test_startTLSLogin(self):
        """STARTTLS + LOGIN delivers."""
        return self.checkDelivered("submission", "LOGIN", SHA512)

    def test_startTLSCramMD5(self):
        """STARTTLS + CRAM-MD5 for a user stored as Dovecot's CRAM-MD5 delivers."""
        return self.checkDelivered("submission", "CRAM-MD5", CRAM)

    def test_implicitPlain(self):
        """Implicit TLS + PLAIN delivers."""
        return self.checkDelivered("submissions", "PLAIN", SHA512)

    def test_implicitLogin(self):
        """Implicit TLS + LOGIN delivers."""
        return self.checkDelivered("submissions", "LOGIN", SHA512)

    def test_implicitCramMD5(self):
        """Implicit TLS + CRAM-MD5 delivers."""
        return self.checkDelivered("submissions", "CRAM-MD5", CRAM)

    @defer.inlineCallbacks
    def test_everyVectorLogsIn(self):
        """Every doveadm hash of the vectors file logs in over PLAIN with its password."""
        with open(VECTORS) as f:
            logins = [line.split(":", 1)[0] for line in f if ":" in line]
        for login in logins:
            result = yield self.submit("submissions", "PLAIN", login, PASSWORD)
            self.assertEqual(result, {}, login)
        self.assertEqual(len(self.daemon.delivered("bob@example.test")), len(logins))

    @defer.inlineCallbacks
    def test_cramMD5RefusedForHashedUser(self):
        """A user stored as a one-way hash cannot use CRAM-MD5: the ordinary 535."""
        e = yield self.assertFailure(
            self.submit("submissions", "CRAM-MD5", SHA512, PASSWORD),
            smtplib.SMTPAuthenticationError,
        )
        self.assertEqual(e.smtp_code, 535)

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        """A wrong password gets 535 5.7.8."""
        e = yield self.assertFailure(
            self.submit("submissions", "PLAIN", SHA512, "wrong"),
            smtplib.SMTPAuthenticationError,
        )
        self.assertEqual(
            (e.smtp_code, e.smtp_error), (535, b"5.7.8 Authentication credentials invalid")
        )

    @defer.inlineCallbacks
    def test_unknownUser(self):
        """An unknown user gets the same 535 as a wrong password."""
        e = yield self.assertFailure(
            self.submit("submissions", "PLAIN", "nobody@example.test", PASSWORD),
            smtplib.SMTPAuthenticationError,
        )
        self.assertEqual(e.smtp_code, 535)

    @defer.inlineCallbacks
    def test_relayDenied(self):
        """Without [relay], mail for other domains is refused with 554 5.7.1."""
        e = yield self.assertFailure(
            self.submit("submissions", "PLAIN", SHA512, PASSWORD, recipients=["x@remote.test"]),
            smtplib.SMTPRecipientsRefused,
        )
        self.assertEqual(e.recipients["x@remote.test"][0], 554)

    @defer.inlineCallbacks
    def test_senderBinding(self):
        """
        An authenticated user may not send as someone else: 553 5.7.1. The
        realm's line saying why ends with the session's ID, as the
        session's own lines do.
        """
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        e = yield self.assertFailure(
            self.submit("submissions", "PLAIN", SHA512, PASSWORD, sender="bob@example.test"),
            smtplib.SMTPSenderRefused,
        )
        self.assertEqual(e.smtp_code, 553)
        [refused] = watcher.matching("sender refused: ")
        [connect] = watcher.matching("^connect: ")
        session = re.search(r" session=([0-9a-f]{12})$", connect).group(1)
        self.assertRegex(refused, rf"from=<bob@example\.test> session={session}$")

    @defer.inlineCallbacks
    def test_severalRecipientsOneFileEach(self):
        """Two local recipients each get the message in their own Maildir."""
        result = yield self.submit(
            "submissions",
            "PLAIN",
            SHA512,
            PASSWORD,
            recipients=["bob@example.test", "alice.plain@example.test"],
        )
        self.assertEqual(result, {})
        [(_, bob)] = self.daemon.delivered("bob@example.test")
        [(_, alice)] = self.daemon.delivered("alice.plain@example.test")
        self.assertEqual(bob, alice)
        self.assertNotIn(b"\tfor <", bob)
        # Without the "for" clause the date still follows a ";" (RFC 5322 3.6.7).
        received = email.message_from_bytes(bob, policy=email.policy.SMTP).get_all("Received")
        self.assertIsNotNone(parsedate_to_datetime(received[0].rpartition(";")[2].strip()))

    @defer.inlineCallbacks
    def test_leadingWhitespaceCannotExtendReceived(self):
        """
        A message whose first line begins with a tab cannot continue the
        daemon's Received: field with an "authenticated as" of its own: it
        is delivered as body below a header section of the daemon's fields,
        the Date: and Message-ID: it lacks added there.
        """
        forged = b"\t(authenticated as ceo@example.test); Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        result = yield self.submit(
            "submissions", "PLAIN", SHA512, PASSWORD, message=forged + b"Subject: x\r\n\r\nhi\r\n"
        )
        self.assertEqual(result, {})
        [(_, content)] = self.daemon.delivered("bob@example.test")
        parsed = email.message_from_bytes(content, policy=email.policy.SMTP)
        [received] = parsed.get_all("Received")
        self.assertIn(f"(authenticated as {SHA512})", received)
        self.assertNotIn("ceo@", received)
        self.assertIsNotNone(parsed["Date"])
        self.assertIsNotNone(parsed["Message-ID"])
        self.assertIsNone(parsed["Subject"])
        self.assertTrue(parsed.get_payload().startswith("\t(authenticated as ceo@"))

    def test_noTLS11(self):
        """TLS 1.1 and older are refused: TLS 1.2 is the minimum."""
        port = self.daemon.ports["submissions"]

        def handshake():
            ctx = clientContext()
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            ctx.set_ciphers("ALL:@SECLEVEL=0")
            smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=10)

        return self.assertFailure(self.inThread(handshake), ssl.SSLError, OSError)

    @defer.inlineCallbacks
    def test_certificateReloadedOnSIGHUP(self):
        """SIGHUP loads a new certificate; new connections present it."""
        port = self.daemon.ports["submissions"]

        def peerCertificate():
            with smtplib.SMTP_SSL("127.0.0.1", port, context=clientContext(), timeout=10) as c:
                return c.sock.getpeercert(binary_form=True)

        before = yield self.inThread(peerCertificate)
        writeCertificate(os.path.join(self.daemon.dir, "tls"), name="renewed.example.test")
        yield self.reload()
        after = yield self.inThread(peerCertificate)
        self.assertNotEqual(before, after)
        self.assertIn(b"renewed.example.test", after)

    @defer.inlineCallbacks
    def test_usersFileReloadedOnSIGHUP(self):
        """A user added to the file can log in after SIGHUP, without a restart."""
        with open(os.path.join(self.daemon.dir, "users"), "a") as f:
            f.write("carol@example.test:{PLAIN}carol-secret-3\n")
        yield self.reload()
        result = yield self.submit("submissions", "PLAIN", "carol@example.test", "carol-secret-3")
        self.assertEqual(result, {})


# twistd's own run(), with another program taking a port between the checks
# of Options.postOptions and the daemon's listening: the race the checks
# cannot close, which the daemon must still report in one line.
RACE = """
import os, socket
from twisted.scripts.twistd import ServerOptions, runApp
config = ServerOptions()
config.parseOptions()
taken = socket.socket()
taken.bind(("127.0.0.1", int(os.environ["TAKE_PORT"])))
taken.listen()
runApp(config)
"""
TWISTD = "from twisted.scripts.twistd import run; run()"


class StorageFailureTests(EndToEndMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_maildirRootUnusable(self):
        """
        A Maildir root that cannot be used (here a file stands where its
        folder should be) gets the client 451; the log has one warning naming
        the path and errno, and no traceback.
        """
        with open(os.path.join(self.daemon.dir, "mail"), "w"):
            pass
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        e = yield self.assertFailure(
            self.submit("submissions", "PLAIN", SHA512, PASSWORD), smtplib.SMTPDataError
        )
        self.assertEqual(
            (e.smtp_code, e.smtp_error), (451, b"4.3.0 Error: local error in processing")
        )
        path = f"{self.daemon.dir}/mail/example.test"
        [line] = watcher.matching("not stored")
        self.assertRegex(
            line,
            rf"^message [0-9A-F]{{12}} not stored: {path}: Not a directory "
            r"\(errno 20\); the client is told 451, to try again later session=[0-9a-f]{12}$",
        )
        self.assertEqual(
            [x["log_level"] for x in watcher.events if x["log_level"] >= LogLevel.warn],
            [LogLevel.warn],
        )
        self.assertEqual(self.flushLoggedErrors(), [])


class LoopTests(EndToEndMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_loopRefused(self):
        """
        RFC 5321 6.3 through the daemon: a message that already carries 100
        Received fields gets 554 5.4.6 (mailauth's own makes 101) and
        nothing is delivered; with 99 it is delivered, 100 fields in all.
        """
        hops = b"".join(
            b"Received: from relay%d.example (relay%d.example [192.0.2.%d])\r\n"
            b"\tby relay%d.example; Wed, 2 Dec 2026 08:00:00 +0000\r\n" % (n, n, n % 250, n + 1)
            for n in range(100)
        )
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        e = yield self.assertFailure(
            self.submit("submissions", "PLAIN", SHA512, PASSWORD, message=hops + MESSAGE),
            smtplib.SMTPDataError,
        )
        self.assertEqual(
            (e.smtp_code, e.smtp_error),
            (554, b"5.4.6 Error: too many hops (101 Received header fields)"),
        )
        self.assertEqual(self.daemon.delivered("bob@example.test"), [])
        self.assertEqual(len(watcher.matching("a mail loop?")), 1)
        fewer = hops.split(b"\r\nReceived", 1)[1]
        result = yield self.submit(
            "submissions", "PLAIN", SHA512, PASSWORD, message=b"Received" + fewer + MESSAGE
        )
        self.assertEqual(result, {})
        [(name, content)] = self.daemon.delivered("bob@example.test")
        self.assertEqual(content.count(b"\nReceived: "), 100)
        self.assertTrue(content.startswith(b"Return-Path: <"), content[:100])


class ConfigErrorTests(unittest.TestCase):
    """
    A bad configuration never starts a half-working daemon: real twistd,
    in the foreground and as a daemon, exits non-zero with one line per
    mistake and no traceback.
    """

    def runTwistd(
        self,
        configPath: str,
        daemon: bool = False,
        twistdOptions=(),
        program: str = TWISTD,
        env=None,
        prefix=(),
    ):
        """
        Run twistd mailauth on C{configPath}.

        @return: the finished process, and what it wrote to its log file
            (as a daemon; in the foreground the log is its standard output).
        """
        where = os.path.abspath(self.mktemp())
        os.makedirs(where)
        log = os.path.join(where, "twistd.log")
        pidfile = os.path.join(where, "twistd.pid")
        mode = ["--pidfile", pidfile, "--logfile", log] if daemon else ["--nodaemon", "--pidfile="]
        result = subprocess.run(
            [
                *prefix,
                sys.executable,
                "-c",
                program,
                *mode,
                *twistdOptions,
                "mailauth",
                "--config",
                configPath,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, **(env or {})),
        )
        if daemon and result.returncode == 0 and os.path.exists(pidfile):
            with open(pidfile) as f:
                os.kill(int(f.read()), signal.SIGTERM)
        text = ""
        if os.path.exists(log):
            with open(log) as f:
                text = f.read()
        if daemon:
            self.assertFalse(os.path.exists(pidfile), "the pid file is left behind")
        return result, text

    def assertRefused(self, configPath: str, lines: list, **kwargs) -> None:
        """
        twistd mailauth, in the foreground and as a daemon, stops before
        listening: status 1, exactly C{lines} on standard error, and no
        traceback anywhere.
        """
        for daemon in (False, True):
            result, log = self.runTwistd(configPath, daemon, **kwargs)
            self.assertEqual(
                (result.returncode, result.stderr.splitlines()), (1, lines), f"daemon={daemon}"
            )
            self.assertNotIn("Traceback", result.stdout + log)

    def test_unknownKeyExitsNonZero(self):
        """twistd mailauth exits non-zero and names the file, section and key."""
        d = self.mktemp()
        daemon = Daemon(d)
        with open(daemon.configPath, "a") as f:
            f.write("\n[relay]\nhost = smtp.example.test\nprot = 587\n")
        result, _ = self.runTwistd(daemon.configPath)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(f"{daemon.configPath}: [relay] prot: unknown key", result.stderr)

    def test_badCertificateExitsNonZero(self):
        """A certificate that does not load stops the daemon before it listens."""
        daemon = Daemon(self.mktemp())
        with open(os.path.join(daemon.dir, "tls", "cert.pem"), "w") as f:
            f.write("not a certificate\n")
        result, _ = self.runTwistd(daemon.configPath)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("cert.pem: no PEM certificate in it", result.stderr)

    def test_badEndpoints(self):
        """
        Endpoint strings that crashed twistd with a traceback: each is one
        line, from the parser's own errors or from what listening would
        refuse.
        """
        daemon = Daemon(
            self.mktemp(),
            settings={
                "listener:submission": {"endpoint": "tcp:abc"},
                "listener:submissions": {"endpoint": "tcp:99999"},
                "listener:typo": {
                    "endpoint": "tcp:2587:interfce=127.0.0.1",
                    "tls": "none",
                    "auth": "optional",
                },
                "listener:unix": {
                    "endpoint": "unix:{dir}/run/mailauth.sock",
                    "tls": "none",
                    "auth": "optional",
                },
            },
            build=False,
        )
        where = f"{daemon.configPath}: [listener:"
        self.assertRefused(
            daemon.configPath,
            [
                f"{where}submission] endpoint: 'tcp:abc': 'abc' is not a whole number",
                f"{where}submissions] endpoint: 'tcp:99999': 99999 is not a port number "
                "(0 to 65535)",
                f"{where}typo] endpoint: 'tcp:2587:interfce=127.0.0.1': unknown option 'interfce' "
                "(known: port, interface, backlog)",
                f"{where}unix] endpoint: 'unix:{daemon.dir}/run/mailauth.sock': cannot listen: "
                f"{daemon.dir}/run: no such folder",
            ],
        )

    def test_portInUse(self):
        """A port another program holds is one line, before twistd forks."""
        port = holdPort(self)
        daemon = Daemon(
            self.mktemp(),
            settings={"listener:submission": {"endpoint": f"tcp:{port}:interface=127.0.0.1"}},
        )
        self.assertRefused(
            daemon.configPath,
            [
                f"{daemon.configPath}: [listener:submission] endpoint: "
                f"'tcp:{port}:interface=127.0.0.1': cannot listen: Address already in use"
            ],
        )

    def test_privilegedPort(self):
        """A port below 1024 the daemon may not bind is one line."""
        daemon = Daemon(
            self.mktemp(),
            settings={"listener:submission": {"endpoint": "tcp:1023:interface=127.0.0.1"}},
        )
        self.assertRefused(
            daemon.configPath,
            [
                f"{daemon.configPath}: [listener:submission] endpoint: "
                "'tcp:1023:interface=127.0.0.1': cannot listen: Permission denied"
            ],
            prefix=withoutBindCapability(),
        )

    def test_portTakenAfterChecks(self):
        """
        A port taken between the checks and listening is one logged line
        naming it, then status 1; as a daemon the waiting first process
        prints it too. No traceback, no pid file left behind.
        """
        port = freePort()
        daemon = Daemon(
            self.mktemp(),
            settings={"listener:submission": {"endpoint": f"tcp:{port}:interface=127.0.0.1"}},
        )
        line = (
            f"{daemon.configPath}: [listener:submission] endpoint: "
            f"'tcp:{port}:interface=127.0.0.1': cannot listen: Address already in use; "
            "mailauth stops"
        )
        env = {"TAKE_PORT": str(port)}
        result, _ = self.runTwistd(daemon.configPath, program=RACE, env=env)
        self.assertEqual((result.returncode, result.stderr), (1, ""))
        self.assertEqual(
            [x.split(" ", 1)[1] for x in result.stdout.splitlines() if "#error" in x],
            ["[mailauth.tap#error] " + line],
        )
        self.assertNotIn("Traceback", result.stdout)
        result, log = self.runTwistd(daemon.configPath, daemon=True, program=RACE, env=env)
        self.assertEqual(
            (result.returncode, result.stderr),
            (
                1,
                (
                    "An error has occurred: b'[listener:submission] "
                    f"tcp:{port}:interface=127.0.0.1: "
                    "Address already in use'\nPlease look at log file for more information.\n"
                ),
            ),
        )
        self.assertEqual(
            [x.split(" ", 1)[1] for x in log.splitlines() if "#error" in x],
            ["[mailauth.tap#error] " + line],
        )
        self.assertNotIn("Traceback", log)

    def test_maildirRootNotWritable(self):
        """
        A Maildir root the daemon's user cannot write (here the user of
        twistd --uid, or when not root a folder made read-only) is one line.
        """
        daemon = Daemon(os.path.join(searchableFolder(self), "d"))
        if os.geteuid() == 0:
            options, who = ["--uid", "65534", "--gid", "65534"], "user nobody (uid 65534)"
        else:
            os.chmod(daemon.dir, 0o555)
            self.addCleanup(os.chmod, daemon.dir, 0o755)
            options, who = [], f"user {pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"
        root = f"{daemon.dir}/mail/example.test"
        self.assertRefused(
            daemon.configPath,
            [
                f"{daemon.configPath}: [delivery] maildir: {root}: {who} cannot write {daemon.dir} "
                f"to make {root}, so no new Maildir can be made there"
            ],
            twistdOptions=options,
        )

    def test_expiredCertificate(self):
        """An expired certificate stops the daemon with one line."""
        daemon = Daemon(self.mktemp())
        writeCertificate(os.path.join(daemon.dir, "tls"), days=-1)
        result, _ = self.runTwistd(daemon.configPath)
        self.assertEqual(result.returncode, 1)
        self.assertRegex(
            result.stderr,
            rf"^{daemon.configPath}: \[tls\] certificate: "
            rf"{daemon.dir}/tls/cert.pem: expired on [^\n]* UTC: renew it\n$",
        )

    def test_encryptedKey(self):
        """An encrypted key stops the daemon with one line, never a passphrase prompt."""
        daemon = Daemon(self.mktemp())
        writeCertificate(os.path.join(daemon.dir, "tls"), passphrase=b"secret")
        self.assertRefused(
            daemon.configPath,
            [
                f"{daemon.configPath}: [tls]: {daemon.dir}/tls/key.pem: the private key is "
                "encrypted with a passphrase, which mailauth cannot ask for: store it decrypted "
                "(openssl pkey -in KEY -out NEWKEY), readable only by root and the daemon's group"
            ],
        )

    def test_pluginListed(self):
        """twistd finds the mailauth plugin."""
        result = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertIn("mailauth", result.stdout)


class PrivilegeDropTests(unittest.TestCase):
    def test_stateDirGivenToUid(self):
        """
        Under C{twistd --uid/--gid} started as root, the state directory and
        queue made while building the service belong to that user, so the
        daemon can still write them after dropping privileges.
        """
        from twisted.scripts.twistd import ServerOptions

        daemon = Daemon(
            os.path.join(searchableFolder(self), "d"),
            extra="\n[relay]\nhost = 127.0.0.1\nport = 1\n",
        )
        # The Maildirs are made by that user.
        os.mkdir(os.path.join(daemon.dir, "mail"), 0o700)
        if os.geteuid() == 0:
            os.chown(os.path.join(daemon.dir, "mail"), 65534, 65534)
        options = ServerOptions()
        options.parseOptions(
            ["--uid", "65534", "--gid", "65534", "mailauth", "--config", daemon.configPath]
        )
        shutil.rmtree(daemon.config.server.state_dir)
        tap.makeService(options.subOptions, reactor)
        state = daemon.config.server.state_dir
        expected = (65534, 65534) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
        for path in (state, os.path.join(state, "queue"), os.path.join(state, "queue", "msg")):
            st = os.stat(path)
            self.assertEqual((st.st_uid, st.st_gid), expected, path)


class StartupErrorTests(unittest.TestCase):
    """The built service, when a port it needs is taken at start."""

    def test_listenFailureIsOneLine(self):
        """
        A listener that cannot listen is logged as one error line naming the
        configuration key, the endpoint and why, and starting stops with
        L{tap.StartupError}.
        """
        port = holdPort(self)
        daemon = Daemon(
            self.mktemp(),
            settings={"listener:submissions": {"endpoint": f"tcp:{port}:interface=127.0.0.1"}},
        )
        # The service never started: close the port of the listener that did listen.
        listening = daemon.service.getServiceNamed("listener:submission")
        self.addCleanup(
            lambda: listening._waitingForPort.addCallback(lambda port: port.stopListening())
        )
        with capturedLogs() as events:
            e = self.assertRaises(tap.StartupError, daemon.service.privilegedStartService)
        line = (
            f"{daemon.configPath}: [listener:submissions] endpoint: "
            f"'tcp:{port}:interface=127.0.0.1': cannot listen: Address already in use"
        )
        self.assertEqual(str(e), line)
        self.assertEqual(
            [
                (x["log_level"], formatEvent(x))
                for x in events
                if x["log_namespace"] == "mailauth.tap"
            ],
            [(LogLevel.error, line + "; mailauth stops")],
        )

    def test_exitThroughStatusPipe(self):
        """
        Under twistd as a daemon, the short line goes through twistd's
        status pipe to the waiting first process, the pid file is removed,
        and the process exits with status 1.
        """
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        pidfile = self.mktemp()
        with open(pidfile, "w") as f:
            f.write(str(os.getpid()))
        parent = {"statusPipe": write, "pidfile": pidfile, "nodaemon": False}
        exit = tap._exitTwistd(parent)
        e = self.assertRaises(SystemExit, exit, "the whole line", "the short line")
        self.assertEqual(e.code, 1)
        self.assertEqual(os.read(read, 100), b"1 the short line")
        self.assertEqual(os.read(read, 100), b"")
        self.assertIsNone(parent["statusPipe"])
        self.assertFalse(os.path.exists(pidfile))

    def test_exitInForeground(self):
        """
        In the foreground the process exits with status 1; a pid file that is
        not its own is left alone.
        """
        pidfile = self.mktemp()
        with open(pidfile, "w") as f:
            f.write("1")
        exit = tap._exitTwistd({"pidfile": pidfile, "nodaemon": True, "logfile": "-"})
        self.assertEqual(self.assertRaises(SystemExit, exit, "line", "short").code, 1)
        self.assertTrue(os.path.exists(pidfile))


def freePort() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def withoutBindCapability() -> tuple:
    """
    A command prefix that runs a program unable to bind ports below 1024:
    as root, without CAP_NET_BIND_SERVICE (util-linux's setpriv); as
    another user, nothing.
    """
    if os.geteuid() != 0:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            start = int(f.read())
        if start <= 1023:
            raise AssertionError(
                f"net.ipv4.ip_unprivileged_port_start is {start}: every user "
                "may bind port 1023 here; run the tests as root"
            )
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise AssertionError("setpriv is missing: apt install util-linux")
    return (setpriv, "--bounding-set=-net_bind_service")
