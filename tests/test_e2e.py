"""
End to end: the real service from L{mailauth.tap} on 127.0.0.1:0, Python's
smtplib over STARTTLS and implicit TLS with each mechanism, Maildir files
checked byte for byte.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import ssl
import subprocess
import sys

from twisted.internet import defer, reactor
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
    clientContext,
)
from tests.support import writeCertificate


class DeliveryTests(EndToEndMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def checkDelivered(self, listener: str, mechanism: str, login: str):
        result = yield self.submit(listener, mechanism, login, PASSWORD)
        self.assertEqual(result, {})
        [(name, content)] = self.daemon.delivered("bob@example.test")
        m = RECEIVED.match(content)
        self.assertIsNotNone(m, content[:400])
        self.assertEqual(m.group("login"), login.encode())
        self.assertEqual(content[m.end():], MESSAGE.replace(b"\r\n", b"\n"))
        self.assertTrue(name.endswith(f",S={len(content)}"), name)
        self.assertEqual(os.listdir(os.path.join(self.daemon.maildir("bob@example.test"), "tmp")),
                         [])
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
        self.assertEqual((e.smtp_code, e.smtp_error),
                         (535, b"5.7.8 Authentication credentials invalid"))

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
        """An authenticated user may not send as someone else: 553 5.7.1."""
        e = yield self.assertFailure(
            self.submit("submissions", "PLAIN", SHA512, PASSWORD, sender="bob@example.test"),
            smtplib.SMTPSenderRefused,
        )
        self.assertEqual(e.smtp_code, 553)

    @defer.inlineCallbacks
    def test_severalRecipientsOneFileEach(self):
        """Two local recipients each get the message in their own Maildir."""
        result = yield self.submit(
            "submissions", "PLAIN", SHA512, PASSWORD,
            recipients=["bob@example.test", "alice.plain@example.test"],
        )
        self.assertEqual(result, {})
        [(_, bob)] = self.daemon.delivered("bob@example.test")
        [(_, alice)] = self.daemon.delivered("alice.plain@example.test")
        self.assertEqual(bob, alice)
        self.assertNotIn(b"\tfor <", bob)

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


class ConfigErrorTests(unittest.TestCase):
    """A bad configuration never starts a half-working daemon."""

    def runTwistd(self, configPath: str):
        return subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "--nodaemon", "--pidfile=", "mailauth", "--config", configPath],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )

    def test_unknownKeyExitsNonZero(self):
        """twistd mailauth exits non-zero and names the file, section and key."""
        d = self.mktemp()
        daemon = Daemon(d)
        with open(daemon.configPath, "a") as f:
            f.write("\n[relay]\nhost = smtp.example.test\nprot = 587\n")
        result = self.runTwistd(daemon.configPath)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(f"{daemon.configPath}: [relay] prot: unknown key", result.stderr)

    def test_badCertificateExitsNonZero(self):
        """A certificate that does not load stops the daemon before it listens."""
        daemon = Daemon(self.mktemp())
        with open(os.path.join(daemon.dir, "tls", "cert.pem"), "w") as f:
            f.write("not a certificate\n")
        result = self.runTwistd(daemon.configPath)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("cert.pem: no PEM certificate in it", result.stderr)

    def test_pluginListed(self):
        """twistd finds the mailauth plugin."""
        result = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
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

        daemon = Daemon(self.mktemp(), extra="\n[relay]\nhost = 127.0.0.1\nport = 1\n")
        options = ServerOptions()
        options.parseOptions(["--uid", "65534", "--gid", "65534",
                              "mailauth", "--config", daemon.configPath])
        shutil.rmtree(daemon.config.server.state_dir)
        tap.makeService(options.subOptions, reactor)
        state = daemon.config.server.state_dir
        expected = (65534, 65534) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
        for path in (state, os.path.join(state, "queue"), os.path.join(state, "queue", "msg")):
            st = os.stat(path)
            self.assertEqual((st.st_uid, st.st_gid), expected, path)
