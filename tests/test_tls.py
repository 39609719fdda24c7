"""
The server TLS context: chains, key mismatch, minimum version, reload; and
the daemon's TLS listeners against clients that stall in the handshake.
"""

from __future__ import annotations

import os
import socket
import time

from OpenSSL import SSL, crypto
from twisted.internet import defer
from twisted.trial import unittest

from mailauth.tls import ReloadableTLS, TLSError, loadOptions, notAfter
from tests.harness import AttackMixin, LogWatcher
from tests.support import writeCertificate

# The first bytes of a TLS record carrying a ClientHello, the rest never sent.
_PARTIAL_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def _recording(loadPrivateKey, asked: list):
    """C{crypto.load_privatekey}, noting the passphrase argument it is given."""

    def load(kind, data, passphrase=None):
        asked.append(passphrase)
        return loadPrivateKey(kind, data, passphrase)

    return load


class TLSTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.cert, self.key = writeCertificate(self.dir)

    def test_chainFile(self) -> None:
        """Certificates after the first in the file are sent as the chain."""
        other, _ = writeCertificate(os.path.join(self.dir, "ca"), name="intermediate")
        chain = os.path.join(self.dir, "fullchain.pem")
        with open(chain, "wb") as f:
            for path in (self.cert, other):
                with open(path, "rb") as part:
                    f.write(part.read())
        options = loadOptions(chain, self.key)
        self.assertEqual(len(options.extraCertChain), 1)
        self.assertEqual(options.certificate.get_subject().CN, "localhost")

    def test_tls12Minimum(self) -> None:
        """TLS 1.0 and 1.1 are switched off in the context."""
        ctx = loadOptions(self.cert, self.key).getContext()
        options = ctx.set_options(0)
        self.assertTrue(options & SSL.OP_NO_TLSv1)
        self.assertTrue(options & SSL.OP_NO_TLSv1_1)

    def test_keyMismatch(self) -> None:
        """A key that does not belong to the certificate is a clear error."""
        _, otherKey = writeCertificate(os.path.join(self.dir, "other"))
        e = self.assertRaises(TLSError, loadOptions, self.cert, otherKey)
        self.assertIn("does not match", str(e))

    def test_missingFiles(self) -> None:
        """Missing files are named."""
        e = self.assertRaises(TLSError, loadOptions, "/nonexistent.pem", self.key)
        self.assertIn("/nonexistent.pem: cannot read certificate", str(e))
        e = self.assertRaises(TLSError, loadOptions, self.cert, "/nonexistent.key")
        self.assertIn("/nonexistent.key: cannot read private key", str(e))

    def test_badKey(self) -> None:
        """A file that is not a key is named."""
        e = self.assertRaises(TLSError, loadOptions, self.cert, self.cert)
        self.assertEqual(str(e), f"{self.cert}: no PEM private key in it")

    def test_corruptKey(self) -> None:
        """A damaged key is named with OpenSSL's reason, not its raw error list."""
        with open(self.key, "rb") as f:
            lines = f.read().splitlines(keepends=True)
        with open(self.key, "wb") as f:
            f.writelines(lines[:1] + [b"AAAA" + lines[1][4:]] + lines[2:])
        e = self.assertRaises(TLSError, loadOptions, self.cert, self.key)
        self.assertTrue(str(e).startswith(f"{self.key}: bad private key: "), str(e))
        self.assertNotIn("[(", str(e))

    def test_encryptedKey(self) -> None:
        """
        An encrypted key is a clear error; OpenSSL never asks for its
        passphrase (on a terminal it would).
        """
        asked = []
        self.patch(crypto, "load_privatekey", _recording(crypto.load_privatekey, asked))
        writeCertificate(self.dir, passphrase=b"secret")
        e = self.assertRaises(TLSError, loadOptions, self.cert, self.key)
        self.assertEqual(
            str(e),
            f"{self.key}: the private key is encrypted with a passphrase, "
            "which mailauth cannot ask for: store it decrypted (openssl pkey -in "
            "KEY -out NEWKEY), readable only by root and the daemon's group",
        )
        [passphrase] = asked
        self.assertTrue(callable(passphrase))

    def test_notAfter(self) -> None:
        """notAfter is the leaf certificate's expiry, as a POSIX time."""
        writeCertificate(self.dir, days=10)
        # Written as now + 10 days: a time zone mistake would be hours off.
        self.assertLess(abs(notAfter(self.cert) - (time.time() + 10 * 86400)), 120)
        e = self.assertRaises(TLSError, notAfter, self.key)
        self.assertEqual(str(e), f"{self.key}: no PEM certificate in it")

    def test_reloadKeepsOldOnFailure(self) -> None:
        """A reload that fails keeps serving the old certificate."""
        tls = ReloadableTLS(self.cert, self.key)
        before = tls.getContext()
        with open(self.cert, "w") as f:
            f.write("garbage")
        self.assertFalse(tls.reload())
        self.assertIs(tls.getContext(), before)

    def test_reloadNewCertificate(self) -> None:
        """A good reload switches to a new context."""
        tls = ReloadableTLS(self.cert, self.key)
        before = tls.getContext()
        writeCertificate(self.dir, name="renewed")
        self.assertTrue(tls.reload())
        self.assertIsNot(tls.getContext(), before)

    def test_reloadRefusesExpired(self) -> None:
        """
        A reload whose certificate has expired keeps the old one, with an
        error naming the file and the date, as at start (an expired
        certificate is a check-config error): it was taken without a word.
        """
        log = self.watchLog()
        tls = ReloadableTLS(self.cert, self.key)
        before = tls.getContext()
        writeCertificate(self.dir, days=-2)
        self.assertFalse(tls.reload())
        self.assertIs(tls.getContext(), before)
        self.assertRegex(
            log.matching(TLS_LINES)[-1],
            rf"^TLS certificate not reloaded, keeping the old one: {self.cert}: "
            r"expired on \d{4}-\d\d-\d\d \d\d:\d\d UTC: renew it$",
        )

    def test_reloadWarnsOfExpiry(self) -> None:
        """
        A certificate that expires within 30 days is loaded, with a warning
        giving the days left; one that expires later without.
        """
        log = self.watchLog()
        writeCertificate(self.dir, days=5)
        now = time.time()
        tls = ReloadableTLS(self.cert, self.key, now=lambda: now)
        self.assertTrue(tls.reload())
        logged = log.matching(TLS_LINES)
        self.assertRegex(
            logged[-1],
            rf"^TLS certificate {self.cert} expires on \S+ \S+ UTC, in 4 day\(s\): renew it$",
        )
        self.assertEqual(logged[-2], f"TLS certificate reloaded from {self.cert}")
        tls.now = lambda: now - 60 * 86400
        self.assertTrue(tls.reload())
        self.assertEqual(
            log.matching(TLS_LINES)[len(logged) :],
            [f"TLS certificate reloaded from {self.cert}"],
        )

    def watchLog(self) -> LogWatcher:
        log = LogWatcher()
        self.addCleanup(log.stop)
        return log


#: The lines of L{ReloadableTLS} (mailauth.tls).
TLS_LINES = r"^TLS certificate"


def _closedByServer(sock: socket.socket) -> bool:
    """(Blocking.) Whether the server closes C{sock} within its timeout."""
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


class StalledHandshakeTests(AttackMixin, unittest.TestCase):
    """
    A client that starts a TLS handshake and never finishes it (slowloris)
    is cut off after C{[server] timeout}, on implicit TLS and after
    STARTTLS alike: not after twice that, while Twisted's TLS layer held
    the 421 it could never send.
    """

    clocked = True
    settings = {"server": {"timeout": "30s"}}

    def stall(self, listener: str) -> socket.socket:
        """(Blocking.) A connection stalled in its handshake on C{listener}."""
        sock = socket.create_connection(("127.0.0.1", self.daemon.ports[listener]))
        sock.settimeout(5)
        if listener == "submission":
            for line in (b"EHLO client.example\r\n", b"STARTTLS\r\n"):
                sock.recv(65536)
                sock.sendall(line)
            assert sock.recv(65536).startswith(b"220 "), "no 220 to STARTTLS"
        sock.sendall(_PARTIAL_HELLO)
        return sock

    @defer.inlineCallbacks
    def assertCutAfterTimeout(self, listener: str):
        connected = self.log.waitFor(rf"^connect: .* listener={listener} ")
        sock = yield self.inThread(self.stall, listener)
        self.addCleanup(sock.close)
        yield connected
        failed = self.log.waitFor(r"^TLS handshake failed: ")
        self.clock.advance(29)
        self.assertEqual(self.log.matching(r"^TLS handshake failed: "), [])
        self.clock.advance(1)
        line = yield failed
        self.assertTrue((yield self.inThread(_closedByServer, sock)))
        # Logged as the handshake failure it is: it was never an SMTP
        # session that a 421 could close.
        self.assertRegex(
            line,
            rf"^TLS handshake failed: client=\[127\.0\.0\.1\] listener={listener} "
            r'why="timed out" session=[0-9a-f]{12}$',
        )
        self.assertEqual(self.log.matching(r"^hang-up: "), [])

    def test_implicitTLS(self):
        """
        On implicit TLS, a handshake that stalls is cut off after the
        timeout.
        """
        return self.assertCutAfterTimeout("submissions")

    def test_afterStartTLS(self):
        """
        After STARTTLS, a handshake that stalls is cut off after the
        timeout.
        """
        return self.assertCutAfterTimeout("submission")


class RefusedStalledHandshakeTests(AttackMixin, unittest.TestCase):
    """
    A connection refused before its greeting (here: one more than
    C{max_connections_per_address}) on implicit TLS, whose client never
    finishes its handshake, is cut off after C{[server] timeout} too: its
    421 waited in Twisted's TLS layer for a handshake that never came, with
    no timer at all, so such connections were never closed.
    """

    clocked = True
    settings = {"server": {"timeout": "30s", "max_connections_per_address": "1"}}

    def stall(self) -> socket.socket:
        """(Blocking.) A connection stalled in its handshake on implicit TLS."""
        sock = socket.create_connection(("127.0.0.1", self.daemon.ports["submissions"]))
        sock.settimeout(5)
        sock.sendall(_PARTIAL_HELLO)
        return sock

    @defer.inlineCallbacks
    def test_refusedConnectionCut(self):
        """
        The refused connection is closed once the timeout has passed, as
        the admitted one stalled beside it is.
        """
        connected = self.log.waitFor(r"^connect: .* listener=submissions ")
        first = yield self.inThread(self.stall)
        self.addCleanup(first.close)
        yield connected
        refused = self.log.waitFor(r"^refused connection: .* reason=too_many_from_address")
        second = yield self.inThread(self.stall)
        self.addCleanup(second.close)
        yield refused
        self.clock.advance(30)
        self.assertTrue((yield self.inThread(_closedByServer, first)))
        self.assertTrue((yield self.inThread(_closedByServer, second)))
