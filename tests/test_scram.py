"""
SCRAM: the RFC test vectors, doveadm's stored keys, every C{e=} path, and
channel binding over real pyOpenSSL connections on TLS 1.2 and TLS 1.3,
each exchange driven by a client written here from RFC 5802.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import io
import os
import re
import socket
import stat
from typing import Optional

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailauth import passwords, scram
from mailauth.checkers import ScramChecker
from mailauth.cli import Console, main
from mailauth.interfaces import ISASLMechanism
from mailauth.sasl import (
    MECHANISMS,
    AuthzidMismatch,
    Challenge,
    MechanismUnavailable,
    SASLContext,
    SASLError,
)
from mailauth.scram import ScramKeys
from mailauth.tls import loadOptions
from tests.fakes import MemoryUserDatabase
from tests.support import (
    MemoryMailbox,
    TLSStringTransport,
    makeFactory,
    makeThrottle,
    withoutSession,
    writeCertificate,
)

DATA = os.path.join(os.path.dirname(__file__), "data")

#: The passwords of tests/data/scram-passwd (made by doveadm pw).
DOVEADM_PASSWORDS = {
    "pencil@example.test": b"pencil",
    "horse@example.test": b"correct horse battery staple",
    "comma@example.test": b"a,b=c",
    "utf8@example.test": "pässwörd".encode(),
    "sha1@example.test": b"pencil",
}


def doveadmHashes() -> dict:
    with open(os.path.join(DATA, "scram-passwd")) as f:
        return dict(
            line.rstrip("\n").split(":", 1) for line in f if line.strip() and line[0] != "#"
        )


# -- a client written from RFC 5802, sharing nothing with mailauth.scram -----


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def storedHash(password: bytes, salt: bytes, iterations: int, hashName: str = "sha256") -> str:
    """C{{SCRAM-SHA-*}iterations,salt,StoredKey,ServerKey}, from RFC 5802 section 3."""
    salted = hashlib.pbkdf2_hmac(hashName, password, salt, iterations)
    clientKey = hmac.new(salted, b"Client Key", hashName).digest()
    serverKey = hmac.new(salted, b"Server Key", hashName).digest()
    scheme = {"sha256": "SCRAM-SHA-256", "sha1": "SCRAM-SHA-1"}[hashName]
    fields = [b64(salt), b64(hashlib.new(hashName, clientKey).digest()), b64(serverKey)]
    return f"{{{scheme}}}{iterations}," + ",".join(f.decode() for f in fields)


class Client:
    """The client side of RFC 5802, section 3 and 7."""

    def __init__(
        self,
        username: str,
        password: bytes,
        hashName: str = "sha256",
        *,
        flag: str = "n",
        cbType: Optional[str] = None,
        cbData: bytes = b"",
        authzid: Optional[str] = None,
        nonce: str = "fyko+d2lbbFgONRv9qkxdawL",
    ) -> None:
        self.username, self.password, self.hashName = username, password, hashName
        self.flag, self.cbType, self.cbData = flag, cbType, cbData
        self.authzid, self.nonce = authzid, nonce

    @staticmethod
    def saslname(name: str) -> str:
        return name.replace("=", "=3D").replace(",", "=2C")

    def first(self) -> bytes:
        flag = f"p={self.cbType}" if self.flag == "p" else self.flag
        authzid = f"a={self.saslname(self.authzid)}" if self.authzid else ""
        self.header = f"{flag},{authzid},".encode()
        self.bare = f"n={self.saslname(self.username)},r={self.nonce}".encode()
        return self.header + self.bare

    def final(self, serverFirst: bytes, cbind: Optional[bytes] = None) -> bytes:
        fields = dict(f.split(b"=", 1) for f in serverFirst.split(b","))
        assert fields[b"r"].startswith(self.nonce.encode()), serverFirst
        salted = hashlib.pbkdf2_hmac(
            self.hashName, self.password, base64.b64decode(fields[b"s"]), int(fields[b"i"])
        )
        clientKey = hmac.new(salted, b"Client Key", self.hashName).digest()
        storedKey = hashlib.new(self.hashName, clientKey).digest()
        if cbind is None:
            cbind = self.header + self.cbData
        withoutProof = b"c=" + b64(cbind) + b",r=" + fields[b"r"]
        authMessage = self.bare + b"," + serverFirst + b"," + withoutProof
        signature = hmac.new(storedKey, authMessage, self.hashName).digest()
        proof = bytes(a ^ b for a, b in zip(clientKey, signature))
        serverKey = hmac.new(salted, b"Server Key", self.hashName).digest()
        self.expected = b"v=" + b64(hmac.new(serverKey, authMessage, self.hashName).digest())
        return withoutProof + b",p=" + b64(proof)


# -- real TLS connections in memory ------------------------------------------


def writeCertificateWith(directory: str, key, algorithm) -> tuple:
    """A self-signed certificate signed with C{key} and C{algorithm}."""
    os.makedirs(directory)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, algorithm)
    )
    paths = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(paths[0], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return paths


def _pump(source: SSL.Connection, target: SSL.Connection) -> bool:
    try:
        data = source.bio_read(65536)
    except SSL.WantReadError:
        return False
    target.bio_write(data)
    return True


def tlsPair(certificate: tuple, version: int) -> tuple:
    """
    A server connection with mailauth's own TLS context and a client
    connection limited to C{version}, handshaken through memory.

    @return: C{(server, client)}
    """
    server = SSL.Connection(loadOptions(*certificate).getContext(), None)
    server.set_accept_state()
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_max_proto_version(version)
    client = SSL.Connection(context, None)
    client.set_connect_state()
    for _ in range(10):
        for connection in (client, server):
            try:
                connection.do_handshake()
            except SSL.WantReadError:
                pass
        moved = _pump(client, server) | _pump(server, client)
        if not moved:
            break
    return server, client


def endPointHash(client: SSL.Connection, hashName: str) -> bytes:
    """RFC 5929 section 4.1, from the client's side: the hash of the server's certificate."""
    certificate = client.get_peer_certificate().to_cryptography()
    return hashlib.new(hashName, certificate.public_bytes(serialization.Encoding.DER)).digest()


# -- the users ---------------------------------------------------------------

SECRET = b"s" * 32
RFC7677_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC5802_SALT = base64.b64decode("QSXCR+Q6sek8bf92")


def users() -> MemoryUserDatabase:
    source = doveadmHashes()
    source["user"] = storedHash(b"pencil", RFC7677_SALT, 4096)
    source["argon@example.test"] = passwords.makeHash(b"pencil", "SHA256-CRYPT")
    return MemoryUserDatabase(source)


class DeferredUsers:
    """A user database that answers later, as PostgreSQL's does."""

    def __init__(self, users) -> None:
        self.users = users
        self.waiting: list = []

    def lookup(self, login: str) -> defer.Deferred:
        d = defer.Deferred()
        self.waiting.append((d, login))
        return d

    def answer(self) -> None:
        d, login = self.waiting.pop(0)
        d.callback(self.users.get(login))


class ScramKeysTests(unittest.TestCase):
    """L{ScramKeys}: Dovecot's stored form, derivation, and verification."""

    def test_rfc7677Vector(self) -> None:
        """
        The keys of C{pencil} with RFC 7677's salt verify its ClientProof and
        make its ServerSignature.
        """
        keys = ScramKeys.fromPassword(b"pencil", "SCRAM-SHA-256", 4096, RFC7677_SALT)
        authMessage = (
            b"n=user,r=rOprNGfwEbeRWgbNEkqO,"
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
            b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
        )
        proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
        self.assertTrue(keys.proofValid(authMessage, proof))
        self.assertFalse(keys.proofValid(authMessage + b"x", proof))
        self.assertEqual(
            b64(keys.serverSignature(authMessage)),
            b"6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        )
        self.assertTrue(keys.verifyPassword(b"pencil"))

    def test_rfc5802Vector(self) -> None:
        """The same for RFC 5802's SCRAM-SHA-1 example."""
        keys = ScramKeys.fromPassword(b"pencil", "SCRAM-SHA-1", 4096, RFC5802_SALT)
        authMessage = (
            b"n=user,r=fyko+d2lbbFgONRv9qkxdawL,"
            b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096,"
            b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j"
        )
        proof = base64.b64decode("v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=")
        self.assertTrue(keys.proofValid(authMessage, proof))
        self.assertEqual(b64(keys.serverSignature(authMessage)), b"rmF9pqV8S7suAoZWja4dJRkFsKQ=")

    def test_doveadmHashesOverPlain(self) -> None:
        """
        Every hash doveadm made verifies its password through
        L{passwords.verify} (PLAIN and LOGIN) and refuses another.
        """
        for login, stored in doveadmHashes().items():
            parsed = passwords.parse(stored)
            self.assertIn(parsed.scheme, ("SCRAM-SHA-256", "SCRAM-SHA-1"))
            self.assertTrue(passwords.verify(parsed, DOVEADM_PASSWORDS[login]), login)
            self.assertFalse(passwords.verify(parsed, DOVEADM_PASSWORDS[login] + b"x"), login)

    def test_formatIsDoveadms(self) -> None:
        """
        Parsing and formatting give back doveadm's text, and deriving the
        password with doveadm's salt makes the very same line.
        """
        for login, stored in doveadmHashes().items():
            scheme, value = re.fullmatch(r"\{(.*)\}(.*)", stored).groups()
            keys = ScramKeys.parse(scheme, value)
            self.assertEqual(keys.format(), value)
            made = ScramKeys.fromPassword(DOVEADM_PASSWORDS[login], scheme, 4096, keys.salt)
            self.assertEqual(made, keys)

    def test_makeHash(self) -> None:
        """
        L{passwords.makeHash} and C{mailauth hash -s SCRAM-SHA-256} make
        doveadm's form with a fresh 16-byte salt and 4096 iterations.
        """
        one = passwords.makeHash(b"pencil", "SCRAM-SHA-256")
        two = passwords.makeHash(b"pencil", "scram-sha-256")
        self.assertNotEqual(one, two)
        for made in (one, two):
            keys = ScramKeys.parse("SCRAM-SHA-256", made.removeprefix("{SCRAM-SHA-256}"))
            self.assertEqual((keys.iterations, len(keys.salt)), (4096, 16))
            self.assertEqual(made, storedHash(b"pencil", keys.salt, 4096))
        out, err = io.StringIO(), io.StringIO()
        status = main(["hash", "-s", "SCRAM-SHA-1"], Console(io.BytesIO(b"pw\n"), out, err, None))
        self.assertEqual((status, err.getvalue()), (0, ""))
        self.assertTrue(passwords.verify(passwords.parse(out.getvalue().strip()), b"pw"))

    def test_iterationBounds(self) -> None:
        """
        Counts from 4096 (RFC 7677's least, doveadm's default) to 1,000,000
        are accepted; fewer or more are refused when the hash is read.
        """
        salt = b"0123456789abcdef"
        for count in (4096, scram.MAX_ITERATIONS):
            made = storedHash(b"pw", salt, count)
            self.assertEqual(passwords.parse(made).scheme, "SCRAM-SHA-256")
        for count in (4095, 1, scram.MAX_ITERATIONS + 1):
            made = storedHash(b"pw", salt, 4096).replace("}4096,", f"}}{count},")
            e = self.assertRaises(ValueError, passwords.parse, made)
            self.assertEqual(
                str(e), f"SCRAM-SHA-256 iteration count {count} is outside 4096..1000000"
            )

    def test_malformed(self) -> None:
        """Each malformed stored value is refused with one line saying what is wrong."""
        good = doveadmHashes()["pencil@example.test"].removeprefix("{SCRAM-SHA-256}")
        count, salt, stored, server = good.split(",")
        cases = {
            f"{count},{salt},{stored}": "is iterations,salt,StoredKey,ServerKey",
            f"0x10,{salt},{stored},{server}": "iteration count '0x10' is not a number",
            f"{count},{salt}!,{stored},{server}": "salt or key is not base64",
            f"{count},{salt},{stored[:-4]},{server}": "StoredKey and ServerKey are 32 bytes",
            f"{count},,{stored},{server}": "salt is empty",
        }
        for value, message in cases.items():
            e = self.assertRaises(ValueError, passwords.parse, "{SCRAM-SHA-256}" + value)
            self.assertIn(message, str(e))
            self.assertNotIn("\n", str(e))
        self.assertRaises(ValueError, passwords.parse, "{SCRAM-SHA-1}" + good)

    def test_constantTime(self) -> None:
        """Passwords and proofs are compared with L{hmac.compare_digest}."""
        calls = []
        real = hmac.compare_digest

        def record(a, b):
            calls.append((a, b))
            return real(a, b)

        self.patch(hmac, "compare_digest", record)
        keys = ScramKeys.fromPassword(b"pencil", salt=RFC7677_SALT)
        self.assertFalse(keys.verifyPassword(b"wrong"))
        self.assertEqual(len(calls), 1)
        self.assertFalse(keys.proofValid(b"message", b"p" * 32))
        self.assertEqual(len(calls), 2)


class MechanismTests(unittest.TestCase):
    """L{scram.ScramMechanism} against the client above."""

    def setUp(self) -> None:
        self.users = users()

    def mechanism(self, name: str = "SCRAM-SHA-256", context=None, **kwargs):
        context = context or SASLContext("mail.example.test", None, None, (name,))
        kwargs.setdefault("secret", SECRET)
        kwargs.setdefault("users", self.users)
        return scram.ScramMechanism(context, name=name, **kwargs)

    def first(self, mechanism, client: Client) -> bytes:
        step = self.successResultOf(defer.maybeDeferred(mechanism.start, client.first()))
        self.assertIsInstance(step, Challenge)
        return step.data

    def exchange(self, mechanism, client: Client, cbind: Optional[bytes] = None):
        """Run a whole exchange; the credentials it ends with."""
        step = mechanism.respond(client.final(self.first(mechanism, client), cbind))
        if isinstance(step, Challenge):
            self.assertEqual(step.data, client.expected)
            step = mechanism.respond(b"")
        self.assertIsInstance(step, scram.ScramCredentials)
        return step

    def refused(self, step, value: bytes, outcome, mechanism):
        """
        C{step} (after the client-final message) is the C{e=value} challenge;
        the next response raises C{outcome}, whose reply names C{value}.
        """
        self.assertEqual(step, Challenge(b"e=" + value))
        e = self.assertRaises(outcome, mechanism.respond, b"")
        self.assertTrue(e.text.endswith(f"({value.decode()})"), e.text)
        return e

    def refusedAtOnce(self, message: bytes, value: str, mechanism=None):
        """
        The client-first C{message} is answered at once (RFC 5802 has no
        C{e=} there) with a L{SASLError} whose reply names C{value}.
        """
        mechanism = mechanism or self.mechanism()
        e = self.assertRaises(SASLError, mechanism.start, message)
        self.assertTrue(e.text.endswith(f"({value})"), e.text)
        self.assertNotIn("\n", e.text)
        return e

    def login(self, credentials) -> defer.Deferred:
        return ScramChecker(self.users).requestAvatarId(credentials)

    def test_interfaces(self) -> None:
        """The mechanism, its credentials and the checker provide their interfaces."""
        mechanism = self.mechanism()
        self.assertTrue(verifyObject(ISASLMechanism, mechanism))
        self.assertTrue(verifyObject(ICredentialsChecker, ScramChecker(self.users)))
        credentials = self.exchange(mechanism, Client("user", b"pencil"))
        self.assertTrue(scram.IScramCredentials.providedBy(credentials))

    def test_rfc7677Exchange(self) -> None:
        """
        With RFC 7677's nonces, the server sends exactly its server-first
        and server-final messages; the empty response then gives verified
        credentials, and the portal logs the user in.
        """
        mechanism = self.mechanism(makeNonce=lambda: "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
        self.assertEqual(mechanism.start(None), Challenge(b""))
        step = self.successResultOf(mechanism.respond(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"))
        self.assertEqual(
            step,
            Challenge(
                b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
            ),
        )
        step = mechanism.respond(
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
            b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        )
        self.assertEqual(step, Challenge(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="))
        credentials = mechanism.respond(b"")
        self.assertEqual(
            (credentials.username, credentials.mechanism, credentials.verified),
            ("user", "SCRAM-SHA-256", True),
        )

        @implementer(IRealm)
        class Realm:
            def requestAvatar(self, avatarId, mind, *interfaces):
                return interfaces[0], avatarId, lambda: None

        portal = Portal(Realm(), [ScramChecker(self.users)])
        result = self.successResultOf(portal.login(credentials, None, ISASLMechanism))
        self.assertEqual(result[1], "user")

    def test_rfc5802Exchange(self) -> None:
        """SCRAM-SHA-1 with RFC 5802's example messages."""
        sha1 = MemoryUserDatabase({"user": storedHash(b"pencil", RFC5802_SALT, 4096, "sha1")})
        mechanism = self.mechanism(
            "SCRAM-SHA-1", users=sha1, makeNonce=lambda: "3rfcNHYJY1ZVvWVs7j"
        )
        step = self.successResultOf(mechanism.start(b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"))
        self.assertEqual(
            step.data,
            b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
        )
        step = mechanism.respond(
            b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
        )
        self.assertEqual(step, Challenge(b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="))
        self.assertTrue(mechanism.respond(b"").verified)

    def test_doveadmUsers(self) -> None:
        """
        Every user doveadm hashed logs in with a full exchange, through the
        checker; the login with C{,} and C{=} in its password too.
        """
        for login, password in DOVEADM_PASSWORDS.items():
            scheme = passwords.parse(doveadmHashes()[login]).scheme
            client = Client(login, password, "sha1" if scheme == "SCRAM-SHA-1" else "sha256")
            credentials = self.exchange(self.mechanism(scheme), client)
            self.assertTrue(credentials.verified, login)
            self.assertEqual(self.successResultOf(self.login(credentials)), login)

    def test_serverNonce(self) -> None:
        """
        The server's part of the nonce is fresh from L{secrets} each time,
        printable and without commas.
        """
        nonces = set()
        for _ in range(3):
            data = self.first(self.mechanism(), Client("user", b"pencil", nonce="abc"))
            nonce = data.split(b",")[0][2:]
            self.assertRegex(nonce, rb"^abc[\x21-\x2b\x2d-\x7e]{32}$")
            nonces.add(nonce)
        self.assertEqual(len(nonces), 3)

    def test_lookupWaits(self) -> None:
        """
        The server-first message waits for the user database's answer,
        which may come later (PostgreSQL).
        """
        waiting = DeferredUsers(self.users)
        mechanism = self.mechanism(users=waiting)
        d = mechanism.start(Client("user", b"pencil").first())
        self.assertNoResult(d)
        self.assertEqual(waiting.waiting[0][1], "user")
        waiting.answer()
        self.assertRegex(self.successResultOf(d).data, rb"^r=fyko.*,s=W22Z.*,i=4096$")

    def test_wrongPassword(self) -> None:
        """
        A wrong proof gives unverified credentials at once (no C{e=}, as
        Dovecot and Cyrus: GNU SASL cannot parse one); the checker refuses
        them as a wrong password.
        """
        credentials = self.exchange(self.mechanism(), Client("pencil@example.test", b"pen"))
        self.assertFalse(credentials.verified)
        f = self.failureResultOf(self.login(credentials), UnauthorizedLogin)
        self.assertFalse(f.check(MechanismUnavailable))

    def test_unknownUser(self) -> None:
        """
        A login that does not exist gets a server-first message of the same
        shape, with a salt that is the same at every try and in any case,
        and fails only at the end, as a wrong password does.
        """

        def salt(login, secret=SECRET):
            data = self.first(self.mechanism(secret=secret), Client(login, b"x"))
            fields = re.fullmatch(rb"r=[^,]+,s=([A-Za-z0-9+/]{22}==),i=(\d+)", data)
            self.assertIsNotNone(fields, data)
            self.assertEqual(fields.group(2), b"4096")
            return fields.group(1)

        self.assertEqual(salt("nobody@example.test"), salt("Nobody@Example.TEST"))
        self.assertNotEqual(salt("nobody@example.test"), salt("nobody2@example.test"))
        self.assertNotEqual(salt("nobody@example.test"), salt("nobody@example.test", b"t" * 32))
        credentials = self.exchange(self.mechanism(), Client("nobody@example.test", b"x"))
        self.assertFalse(credentials.verified)
        f = self.failureResultOf(self.login(credentials), UnauthorizedLogin)
        self.assertFalse(f.check(MechanismUnavailable))

    def test_fakeKeysNeverVerify(self) -> None:
        """
        Even keys a client could answer (as if the server secret had
        leaked) never verify for a login that has no SCRAM keys.
        """
        self.patch(
            scram,
            "fakeKeys",
            lambda secret, scheme, login: ScramKeys.fromPassword(b"x", scheme, salt=b"s" * 16),
        )
        for login in ("nobody@example.test", "argon@example.test"):
            credentials = self.exchange(self.mechanism(), Client(login, b"x"))
            self.assertFalse(credentials.verified, login)

    def test_otherScheme(self) -> None:
        """
        A user stored in another scheme (or the other SCRAM) cannot do this
        mechanism: the exchange looks like an unknown user's, even with the
        right password, and the checker refuses with L{MechanismUnavailable}.
        """
        for name, login in (
            ("SCRAM-SHA-256", "argon@example.test"),
            ("SCRAM-SHA-256", "sha1@example.test"),
            ("SCRAM-SHA-1", "pencil@example.test"),
        ):
            client = Client(login, b"pencil", "sha1" if name == "SCRAM-SHA-1" else "sha256")
            credentials = self.exchange(self.mechanism(name), client)
            self.assertFalse(credentials.verified)
            f = self.failureResultOf(self.login(credentials), MechanismUnavailable)
            self.assertIn("cannot verify a password stored as", f.getErrorMessage())

    def test_checkerRechecks(self) -> None:
        """
        The checker accepts verified credentials only for the keys the user
        has now, and refuses a suspended user or a database that cannot
        answer.
        """
        credentials = self.exchange(self.mechanism(), Client("user", b"pencil"))
        self.users.source["user"] = storedHash(b"pencil", b"another salt!!", 4096)
        self.users.load()
        self.failureResultOf(self.login(credentials), UnauthorizedLogin)
        credentials = self.exchange(self.mechanism(), Client("user", b"pencil"))
        self.assertEqual(self.successResultOf(self.login(credentials)), "user")
        self.users._users["user"] = attrs.evolve(self.users.get("user"), suspended=True)
        self.failureResultOf(self.login(credentials), UnauthorizedLogin)
        unread = ScramChecker(MemoryUserDatabase(None)).requestAvatarId(credentials)
        self.failureResultOf(unread, LoginFailed)

    def test_databaseUnavailable(self) -> None:
        """A user database that cannot answer gives 454 (RFC 5802's no-resources)."""
        mechanism = self.mechanism(users=MemoryUserDatabase(None))
        f = self.failureResultOf(mechanism.start(Client("user", b"pencil").first()), SASLError)
        self.assertEqual(
            (f.value.code, f.value.text), (454, "4.7.0 Temporary authentication failure")
        )

    def test_badNonce(self) -> None:
        """A client-final with another nonce gets C{e=other-error}, then 501."""
        mechanism = self.mechanism()
        client = Client("user", b"pencil")
        serverFirst = self.first(mechanism, client)
        final = client.final(serverFirst).replace(b",r=fyko", b",r=xyko")
        e = self.refused(mechanism.respond(final), b"other-error", SASLError, mechanism)
        self.assertEqual(e.code, 501)
        self.assertIn("nonce", e.text)

    def test_authzid(self) -> None:
        """
        An authzid equal to the login is allowed; another fails at once,
        as PLAIN's does.
        """
        credentials = self.exchange(self.mechanism(), Client("user", b"pencil", authzid="user"))
        self.assertTrue(credentials.verified)
        # In any case: logins are case-insensitive.
        credentials = self.exchange(self.mechanism(), Client("user", b"pencil", authzid="USER"))
        self.assertTrue(credentials.verified)
        message = Client("user", b"pencil", authzid="admin").first()
        e = self.assertRaises(AuthzidMismatch, self.mechanism().start, message)
        self.assertEqual(e.username, "user")

    def test_malformedClientFirst(self) -> None:
        """Each malformed client-first message gets a 5xx naming its RFC 5802 error."""
        cases = {
            b"n,,n=user,r=ab\xff": (b"invalid-encoding", 501),
            b"n,n=user,r=abc": (b"invalid-encoding", 501),
            b"x,,n=user,r=abc": (b"invalid-encoding", 501),
            b"p=tls unique,,n=user,r=abc": (b"invalid-encoding", 501),
            b"n,admin,n=user,r=abc": (b"invalid-encoding", 501),
            b"n,,r=abc": (b"invalid-encoding", 501),
            b"n,,n=user": (b"invalid-encoding", 501),
            b"n,,n=user,r=": (b"invalid-encoding", 501),
            b"n,,n=user,r=a\x01c": (b"invalid-encoding", 501),
            b"n,,n=user,r=abc,1=x": (b"invalid-encoding", 501),
            b"n,,n=us\0er,r=abc": (b"invalid-encoding", 501),
            b"n,,n=us=2Xer,r=abc": (b"invalid-username-encoding", 501),
            b"n,a=ad=min,n=user,r=abc": (b"invalid-username-encoding", 501),
            b"n,,n=us\x01er,r=abc": (b"invalid-username-encoding", 501),
            b"n,,m=ext,n=user,r=abc": (b"extensions-not-supported", 504),
        }
        for message, (value, code) in cases.items():
            e = self.refusedAtOnce(message, value.decode())
            self.assertEqual(e.code, code, message)

    def test_unknownExtensionsIgnored(self) -> None:
        """Extensions other than m= are ignored (RFC 5802 section 7)."""
        mechanism = self.mechanism()
        step = self.successResultOf(mechanism.start(b"n,,n=user,r=abc,x=ignored"))
        self.assertTrue(step.data.startswith(b"r=abc"))

    def test_escapedUsername(self) -> None:
        """C{=2C} and C{=3D} in the username stand for C{,} and C{=}."""
        self.users.source["a,b=c@example.test"] = storedHash(b"pencil", b"salt" * 4, 4096)
        self.users.load()
        credentials = self.exchange(self.mechanism(), Client("a,b=c@example.test", b"pencil"))
        self.assertEqual(credentials.username, "a,b=c@example.test")
        self.assertTrue(credentials.verified)

    def test_malformedClientFinal(self) -> None:
        """Each malformed client-final message gets C{e=invalid-encoding}, then 501."""
        client = Client("user", b"pencil")
        for change in (
            lambda final: final.replace(b",p=", b",q="),
            lambda final: final.replace(b"c=biws", b"c=bi!s"),
            lambda final: final.replace(b"c=biws", b"x=biws"),
            lambda final: final[:-8] + b"AAAA",
            lambda final: final.replace(b",p=", b",1=x,p="),
        ):
            mechanism = self.mechanism()
            final = change(client.final(self.first(mechanism, client)))
            e = self.refused(mechanism.respond(final), b"invalid-encoding", SASLError, mechanism)
            self.assertEqual(e.code, 501)

    def test_emptyAcknowledgement(self) -> None:
        """After C{v=} the client must answer with an empty response."""
        mechanism = self.mechanism()
        client = Client("user", b"pencil")
        step = mechanism.respond(client.final(self.first(mechanism, client)))
        self.assertEqual(step.data, client.expected)
        e = self.assertRaises(SASLError, mechanism.respond, b"x")
        self.assertEqual(e.code, 501)
        self.assertRaises(SASLError, mechanism.respond, b"")

    def test_noBindingWithoutPlus(self) -> None:
        """
        SCRAM-SHA-256 with C{p=} gets C{e=channel-binding-not-supported};
        with C{n}, C{c=} must be exactly the header.
        """
        message = Client("user", b"p", flag="p", cbType="tls-unique").first()
        self.assertEqual(self.refusedAtOnce(message, "channel-binding-not-supported").code, 504)
        mechanism = self.mechanism()
        client = Client("user", b"pencil")
        final = client.final(self.first(mechanism, client), cbind=b"y,,")
        e = self.refused(
            mechanism.respond(final), b"channel-bindings-dont-match", SASLError, mechanism
        )
        self.assertEqual(e.code, 535)

    def test_downgrade(self) -> None:
        """
        C{y} (the client binds but saw no -PLUS) fails with
        C{e=server-does-support-channel-binding} when -PLUS was offered,
        and is fine when it was not.
        """
        offered = ("SCRAM-SHA-256", "SCRAM-SHA-256-PLUS")
        mechanism = self.mechanism(context=SASLContext("h", None, None, offered))
        message = Client("user", b"pencil", flag="y").first()
        e = self.refusedAtOnce(message, "server-does-support-channel-binding", mechanism)
        self.assertEqual(e.code, 535)
        credentials = self.exchange(self.mechanism(), Client("user", b"pencil", flag="y"))
        self.assertTrue(credentials.verified)

    def test_plusWithoutTLS(self) -> None:
        """
        -PLUS without TLS has no binding data: it is not offered, and a
        client that asks anyway gets C{e=unsupported-channel-binding-type}.
        """
        factory = scram.ScramFactory("SCRAM-SHA-256-PLUS", self.users, SECRET)
        context = SASLContext("h", None, None, ())
        self.assertFalse(factory.available(context))
        self.assertTrue(scram.ScramFactory("SCRAM-SHA-256", self.users, SECRET).available(context))
        message = Client("user", b"pencil", flag="p", cbType="tls-unique").first()
        self.refusedAtOnce(message, "unsupported-channel-binding-type", factory(context))


class ChannelBindingTests(unittest.TestCase):
    """-PLUS over real pyOpenSSL connections, the client's binding data taken from its side."""

    def setUp(self) -> None:
        self.users = users()
        self.certificate = writeCertificate(self.mktemp())

    def plus(self, server: SSL.Connection, name: str = "SCRAM-SHA-256-PLUS"):
        context = SASLContext("h", None, server, (name,))
        return scram.ScramFactory(name, self.users, SECRET)(context)

    def exchange(self, mechanism, client: Client):
        return MechanismTests.exchange(self, mechanism, client)

    first = MechanismTests.first
    refused = MechanismTests.refused
    refusedAtOnce = MechanismTests.refusedAtOnce

    def test_tls13(self) -> None:
        """
        TLS 1.3 offers tls-exporter and tls-server-end-point, and a -PLUS
        exchange with either succeeds; tls-unique is undefined there.
        """
        server, client = tlsPair(self.certificate, SSL.TLS1_3_VERSION)
        self.assertEqual(server.get_protocol_version_name(), "TLSv1.3")
        self.assertEqual(
            scram.channelBindingTypes(server), ("tls-exporter", "tls-server-end-point")
        )
        exporter = client.export_keying_material(b"EXPORTER-Channel-Binding", 32)
        for cbType, data in (
            ("tls-exporter", exporter),
            ("tls-server-end-point", endPointHash(client, "sha256")),
        ):
            scramClient = Client("user", b"pencil", flag="p", cbType=cbType, cbData=data)
            credentials = self.exchange(self.plus(server), scramClient)
            self.assertEqual(credentials.mechanism, "SCRAM-SHA-256-PLUS")
            self.assertTrue(credentials.verified, cbType)
        message = Client("user", b"p", flag="p", cbType="tls-unique").first()
        self.refusedAtOnce(message, "unsupported-channel-binding-type", self.plus(server))

    def test_tls12(self) -> None:
        """
        TLS 1.2 offers tls-unique (the client's Finished, as GNU SASL sends
        it there) and tls-server-end-point; tls-exporter is refused.
        """
        server, client = tlsPair(self.certificate, SSL.TLS1_2_VERSION)
        self.assertEqual(server.get_protocol_version_name(), "TLSv1.2")
        self.assertEqual(scram.channelBindingTypes(server), ("tls-unique", "tls-server-end-point"))
        for cbType, data in (
            ("tls-unique", client.get_finished()),
            ("tls-server-end-point", endPointHash(client, "sha256")),
        ):
            scramClient = Client("user", b"pencil", flag="p", cbType=cbType, cbData=data)
            self.assertTrue(self.exchange(self.plus(server), scramClient).verified, cbType)
        message = Client("user", b"p", flag="p", cbType="tls-exporter").first()
        self.refusedAtOnce(message, "unsupported-channel-binding-type", self.plus(server))

    def test_beforeHandshake(self) -> None:
        """
        A connection whose handshake has not finished exports no keying
        material (OpenSSL refuses), and asking is no error.
        """
        server = SSL.Connection(loadOptions(*self.certificate).getContext(), None)
        server.set_accept_state()
        self.assertIsNone(scram.channelBinding(server, "tls-exporter"))
        self.assertNotIn("tls-exporter", scram.channelBindingTypes(server))

    def test_notTLS(self) -> None:
        """Without a TLS connection (none, or a plain socket's handle) there is no binding."""
        for handle in (None, socket.socket()):
            self.assertEqual(scram.channelBindingTypes(handle), ())
            if handle is not None:
                handle.close()

    def test_mismatch(self) -> None:
        """
        Binding data from another connection (a man in the middle) gets
        C{e=channel-bindings-dont-match}, then 535, whatever the proof.
        """
        server, client = tlsPair(self.certificate, SSL.TLS1_3_VERSION)
        other, otherClient = tlsPair(self.certificate, SSL.TLS1_3_VERSION)
        data = otherClient.export_keying_material(b"EXPORTER-Channel-Binding", 32)
        mechanism = self.plus(server)
        scramClient = Client("user", b"pencil", flag="p", cbType="tls-exporter", cbData=data)
        step = mechanism.respond(scramClient.final(self.first(mechanism, scramClient)))
        e = self.refused(step, b"channel-bindings-dont-match", SASLError, mechanism)
        self.assertEqual(e.code, 535)

    def test_plusNeedsBinding(self) -> None:
        """-PLUS with C{n} or C{y} fails: the client chose binding by choosing -PLUS."""
        server, _ = tlsPair(self.certificate, SSL.TLS1_3_VERSION)
        for flag in ("n", "y"):
            message = Client("user", b"pencil", flag=flag).first()
            self.refusedAtOnce(message, "channel-bindings-dont-match", self.plus(server))

    def test_endPointHashFollowsSignature(self) -> None:
        """
        tls-server-end-point hashes with the certificate's signature hash
        (SHA-384 here); a certificate signed with Ed25519 has none.
        """
        paths = writeCertificateWith(
            self.mktemp(), ec.generate_private_key(ec.SECP384R1()), hashes.SHA384()
        )
        server, client = tlsPair(paths, SSL.TLS1_3_VERSION)
        self.assertEqual(
            scram.channelBinding(server, "tls-server-end-point"), endPointHash(client, "sha384")
        )
        paths = writeCertificateWith(self.mktemp(), ed25519.Ed25519PrivateKey.generate(), None)
        server, client = tlsPair(paths, SSL.TLS1_3_VERSION)
        self.assertEqual(scram.channelBindingTypes(server), ("tls-exporter",))


class SecretTests(unittest.TestCase):
    """L{scram.loadSecret}: the key of the fake salts, made once and kept."""

    def test_madeOnceAndKept(self) -> None:
        """The first load makes 32 random bytes, mode 0600; later loads read them."""
        os.mkdir(self.mktemp())
        path = os.path.join(os.path.dirname(self.mktemp()), "scram-secret")
        secret = scram.loadSecret(path)
        self.assertEqual(len(secret), 32)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(scram.loadSecret(path), secret)

    def test_tooShort(self) -> None:
        """A secret file shorter than 32 bytes is refused with a line naming it."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"short")
        e = self.assertRaises(ValueError, scram.loadSecret, path)
        self.assertEqual(str(e), f"{path}: the SCRAM secret is shorter than 32 bytes")


# -- the session: SCRAM through the SMTP AUTH command ------------------------


@implementer(IRealm)
class MailboxRealm:
    def requestAvatar(self, avatarId, mind, *interfaces):
        return interfaces[0], MemoryMailbox(login=avatarId), lambda: None


class HandleTransport(TLSStringTransport):
    """A session transport whose TLS connection is a real, handshaken one."""

    handle = None

    def getHandle(self):
        return self.handle


class SessionTests(unittest.TestCase):
    """SCRAM in the SMTP session, over a StringTransport."""

    def setUp(self) -> None:
        self.users = users()
        self.clock = Clock()
        self.throttle = makeThrottle(self.clock, tarpitDelay=0.0)
        self.portal = Portal(MailboxRealm(), [ScramChecker(self.users)])
        self.events: list = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def session(
        self, handle=None, tlsMode: str = "implicit", users=None, host: str = "192.0.2.1"
    ) -> HandleTransport:
        factory = makeFactory(
            self.clock,
            portal=self.portal,
            mechanisms=("PLAIN", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"),
            tlsMode=tlsMode,
            plaintextRequiresTLS=False,
            throttle=self.throttle,
            saslTable={**MECHANISMS, **scram.mechanisms(users or self.users, SECRET)},
        )
        transport = HandleTransport(peerAddress=IPv4Address("TCP", host, 40000))
        transport.handle = handle
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(transport)
        self.transport = transport
        self.send(b"EHLO client.example")
        return transport

    def send(self, line: bytes) -> list:
        self.transport.clear()
        self.protocol.dataReceived(line + b"\r\n")
        return self.transport.value().split(b"\r\n")[:-1]

    def challenge(self, lines: list) -> bytes:
        [line] = lines
        self.assertTrue(line.startswith(b"334 "), line)
        return base64.b64decode(line[4:])

    def logged(self) -> list:
        return [formatEvent(e) for e in self.events if "auth " in e.get("log_format", "")]

    def test_offeredWithBindingOnly(self) -> None:
        """
        -PLUS is offered only where the connection has channel binding
        data; asked for anyway, it gets 538.
        """
        self.session(tlsMode="none")
        self.assertIn(b"250 AUTH PLAIN SCRAM-SHA-256", self.send(b"EHLO client.example"))
        self.assertEqual(
            self.send(b"AUTH SCRAM-SHA-256-PLUS"),
            [b"538 5.7.11 Encryption required for requested authentication mechanism"],
        )
        server, _ = tlsPair(writeCertificate(self.mktemp()), SSL.TLS1_3_VERSION)
        self.session(server)
        self.assertIn(
            b"250 AUTH PLAIN SCRAM-SHA-256-PLUS SCRAM-SHA-256", self.send(b"EHLO client.example")
        )

    def test_plusLogin(self) -> None:
        """
        A whole SCRAM-SHA-256-PLUS login over TLS 1.3: server-first, the
        server-final C{v=} as a 334, the client's empty line, then 235.
        """
        server, client = tlsPair(writeCertificate(self.mktemp()), SSL.TLS1_3_VERSION)
        self.session(server)
        exporter = client.export_keying_material(b"EXPORTER-Channel-Binding", 32)
        scramClient = Client(
            "pencil@example.test", b"pencil", flag="p", cbType="tls-exporter", cbData=exporter
        )
        serverFirst = self.challenge(
            self.send(b"AUTH SCRAM-SHA-256-PLUS " + b64(scramClient.first()))
        )
        serverFinal = self.challenge(self.send(b64(scramClient.final(serverFirst))))
        self.assertEqual(serverFinal, scramClient.expected)
        self.assertEqual(self.send(b""), [b"235 2.7.0 Authentication successful"])
        self.assertEqual(self.protocol.login, "pencil@example.test")
        self.assertIn("mechanism=SCRAM-SHA-256-PLUS login=<pencil@example.test>", self.logged()[-1])

    def test_lookupHoldsPipelinedLines(self) -> None:
        """
        While the user database answers, the lines after AUTH wait: the
        client's C{*} is taken only after the server-first message.
        """
        waiting = DeferredUsers(self.users)
        self.session(tlsMode="none", users=waiting)
        scramClient = Client("pencil@example.test", b"pencil")
        self.assertEqual(
            self.send(b"AUTH SCRAM-SHA-256 " + b64(scramClient.first()) + b"\r\n*"), []
        )
        self.transport.clear()
        waiting.answer()
        lines = self.transport.value().split(b"\r\n")[:-1]
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(lines[0].startswith(b"334 "), lines)
        self.assertEqual(lines[1], b"501 5.7.0 Authentication cancelled")

    def test_wrongPasswordCounted(self) -> None:
        """
        A wrong proof is answered 535 at once (no C{e=}) and counted as a
        failed guess, as fail2ban sees it.
        """
        self.session(tlsMode="none")
        scramClient = Client("pencil@example.test", b"wrong")
        serverFirst = self.challenge(self.send(b"AUTH SCRAM-SHA-256 " + b64(scramClient.first())))
        self.assertEqual(
            self.send(b64(scramClient.final(serverFirst))),
            [b"535 5.7.8 Authentication credentials invalid"],
        )
        self.assertEqual(self.throttle.trackedKeys(), 2)
        self.assertIn("auth failure: client=[192.0.2.1] mechanism=SCRAM-SHA-256", self.logged()[-1])
        self.assertEqual(self.send(b"NOOP"), [b"250 2.0.0 Ok"])

    def test_unknownUserLikeWrongPassword(self) -> None:
        """An unknown login gets the very same replies as a wrong password, and counts."""
        self.session(tlsMode="none")
        scramClient = Client("nobody@example.test", b"pencil")
        serverFirst = self.challenge(self.send(b"AUTH SCRAM-SHA-256 " + b64(scramClient.first())))
        self.assertEqual(
            self.send(b64(scramClient.final(serverFirst))),
            [b"535 5.7.8 Authentication credentials invalid"],
        )
        self.assertEqual(self.throttle.trackedKeys(), 2)

    def test_allowNets(self) -> None:
        """
        The right password of a user restricted to 10.0.0.0/8, from
        192.0.2.1: the same salt as ever, then 535 at once with no server
        signature (which would confirm the password), counted and logged
        with why. From inside the network, the same user logs in.
        """
        self.users.source["pencil@example.test"] += "::::::allow_nets=10.0.0.0/8"
        self.users.load()

        def attempt() -> tuple:
            scramClient = Client("pencil@example.test", b"pencil")
            serverFirst = self.challenge(
                self.send(b"AUTH SCRAM-SHA-256 " + b64(scramClient.first()))
            )
            salt = re.search(rb",s=([^,]+),", serverFirst).group(1)
            return salt, self.send(b64(scramClient.final(serverFirst)))

        self.session(tlsMode="none")
        salt, lines = attempt()
        self.assertEqual(lines, [b"535 5.7.8 Authentication credentials invalid"])
        self.assertEqual(self.throttle.trackedKeys(), 2)
        self.assertEqual(
            [withoutSession(line) for line in self.logged()[-2:]],
            [
                "auth refused: client=[192.0.2.1] mechanism=SCRAM-SHA-256 "
                "login=<pencil@example.test>: allow_nets check failed: "
                "IP 192.0.2.1 not in allowed networks",
                "auth failure: client=[192.0.2.1] mechanism=SCRAM-SHA-256 "
                "login=<pencil@example.test>",
            ],
        )
        self.session(tlsMode="none", host="10.0.0.5")
        inside, lines = attempt()
        self.assertEqual(inside, salt)
        self.assertTrue(lines[0].startswith(b"334 "), lines)
        self.assertEqual(self.send(b""), [b"235 2.7.0 Authentication successful"])

    def test_suspendedNoServerSignature(self) -> None:
        """
        The right password of a suspended user gets no server signature
        (C{v=} would confirm the password to a guesser, where PLAIN's
        right password gets the 535 of a wrong one): 535 at once, logged as
        suspended and not counted. A wrong password of the same user is
        answered alike, and counted.
        """
        self.users.source["pencil@example.test"] += "::::::nologin"
        self.users.load()

        def attempt(password: bytes) -> list:
            scramClient = Client("pencil@example.test", password)
            serverFirst = self.challenge(
                self.send(b"AUTH SCRAM-SHA-256 " + b64(scramClient.first()))
            )
            return self.send(b64(scramClient.final(serverFirst)))

        self.session(tlsMode="none")
        self.assertEqual(attempt(b"pencil"), [b"535 5.7.8 Authentication credentials invalid"])
        self.assertEqual(self.throttle.trackedKeys(), 0)
        self.assertEqual(
            withoutSession(self.logged()[-1]),
            "auth suspended: client=[192.0.2.1] mechanism=SCRAM-SHA-256 "
            "login=<pencil@example.test>",
        )
        self.assertEqual(attempt(b"wrong"), [b"535 5.7.8 Authentication credentials invalid"])
        self.assertEqual(self.throttle.trackedKeys(), 2)
        self.assertIn("auth failure: client=[192.0.2.1]", self.logged()[-1])

    def scramFailures(self, login: str, sessions: int, tries: int) -> list:
        """The last reply of each of C{tries} SCRAM logins, in each of C{sessions} sessions."""
        answers = []
        for _ in range(sessions):
            self.session(tlsMode="none")
            for _ in range(tries):
                scramClient = Client(login, b"pencil")
                serverFirst = self.challenge(
                    self.send(b"AUTH SCRAM-SHA-256 " + b64(scramClient.first()))
                )
                answers.append(self.send(b64(scramClient.final(serverFirst))))
        return answers

    def test_otherSchemeNotCounted(self) -> None:
        """
        A user whose password SCRAM cannot verify gets the same replies as a
        wrong password (a session ends after as many), but it is not counted
        (issue #10 item 5) and is logged as unusable, not as a failure that
        fail2ban would see.
        """
        failed = [b"535 5.7.8 Authentication credentials invalid"]
        tooMany = [b"421 4.7.0 Error: too many failed logins"]
        self.assertEqual(
            self.scramFailures("argon@example.test", sessions=2, tries=3),
            [failed, failed, tooMany] * 2,
        )
        self.assertEqual(self.throttle.trackedKeys(), 0)
        self.assertFalse([line for line in self.logged() if "auth failure" in line])
        self.assertIn(
            "auth mechanism unusable: client=[192.0.2.1] mechanism=SCRAM-SHA-256 "
            "login=<argon@example.test>",
            self.logged()[-1],
        )
        # A wrong password, for comparison: the same replies, counted.
        self.assertEqual(
            self.scramFailures("alice@example.test", sessions=1, tries=3), [failed, failed, tooMany]
        )
        self.assertEqual(self.throttle.trackedKeys(), 2)

    def test_clientFirstRefused(self) -> None:
        """
        A refused client-first message is answered at once, the reply naming
        the RFC 5802 error; not counted as a guess.
        """
        server, _ = tlsPair(writeCertificate(self.mktemp()), SSL.TLS1_3_VERSION)
        self.session(server)
        scramClient = Client("pencil@example.test", b"pencil", flag="y")
        self.assertEqual(
            self.send(b"AUTH SCRAM-SHA-256 " + b64(scramClient.first())),
            [
                b"535 5.7.8 SCRAM-PLUS was offered: possible downgrade attack "
                b"(server-does-support-channel-binding)"
            ],
        )
        self.assertEqual(self.throttle.trackedKeys(), 0)

    def test_clientFinalRefused(self) -> None:
        """
        A refused client-final message gets its C{e=} as a 334 (the
        server-final message), and the client's answer gets the reply.
        """
        server, _ = tlsPair(writeCertificate(self.mktemp()), SSL.TLS1_3_VERSION)
        self.session(server)
        scramClient = Client(
            "pencil@example.test", b"pencil", flag="p", cbType="tls-exporter", cbData=b"x" * 32
        )
        serverFirst = self.challenge(
            self.send(b"AUTH SCRAM-SHA-256-PLUS " + b64(scramClient.first()))
        )
        outcome = self.challenge(self.send(b64(scramClient.final(serverFirst))))
        self.assertEqual(outcome, b"e=channel-bindings-dont-match")
        self.assertEqual(
            self.send(b""),
            [
                b"535 5.7.8 SCRAM channel binding does not match this connection "
                b"(channel-bindings-dont-match)"
            ],
        )
        self.assertEqual(self.throttle.trackedKeys(), 0)
