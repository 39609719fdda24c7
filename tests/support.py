"""Helpers shared by the session and end-to-end tests: fakes, certificates, configs."""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, interfaces
from twisted.internet.testing import StringTransport
from twisted.mail.interfaces import IMessageDelivery, IMessageDeliveryFactory
from zope.interface import implementer

from mailauth import config as configmod
from mailauth.esmtp import ConnectionLimiter, SMTPReply, SubmissionFactory
from mailauth.throttle import AuthThrottle


def writeCertificate(directory: str, name: str = "localhost") -> tuple:
    """
    Write a self-signed certificate for C{name} and 127.0.0.1 and its key.

    @return: C{(certificatePath, keyPath)}
    """
    os.makedirs(directory, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certPath = os.path.join(directory, "cert.pem")
    keyPath = os.path.join(directory, "key.pem")
    with open(certPath, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(keyPath, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return certPath, keyPath


@implementer(interfaces.ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that records C{startTLS} like a TCP transport would accept it."""

    tlsStarted = None

    def startTLS(self, contextFactory, normal=True):
        self.tlsStarted = contextFactory


class RecordingPortal:
    """
    A portal whose logins wait for the test: each C{login} is recorded with
    an unfired Deferred (or answered at once when C{answer} is set).
    """

    def __init__(self, avatar=None, answer=None) -> None:
        self.avatar = avatar
        self.answer = answer
        self.logins: list = []

    def login(self, credentials, mind, *interfaces):
        d = defer.Deferred()
        self.logins.append((credentials, d))
        if self.answer is not None:
            self.answer(self, credentials, d)
        return d

    def succeed(self, index: int = -1) -> None:
        self.logins[index][1].callback((IMessageDeliveryFactory, self.avatar, lambda: None))

    def fail(self, index: int = -1, exc=None) -> None:
        self.logins[index][1].errback(exc or UnauthorizedLogin())


def passwordIs(password: bytes):
    """A L{RecordingPortal} answer: succeed when the password matches."""

    def answer(portal, credentials, d):
        if credentials.checkPassword(password):
            d.callback((IMessageDeliveryFactory, portal.avatar, lambda: None))
        else:
            d.errback(UnauthorizedLogin())

    return answer


class MemoryMessage:
    """An IMessage that keeps the body in memory."""

    def __init__(self, box, fail=None) -> None:
        self.box = box
        self.chunks: list = []
        self.fail = fail
        self.aborted = False

    def write(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def lineReceived(self, line: bytes) -> None:
        self.write(line + b"\r\n")

    def eomReceived(self):
        if self.fail is not None:
            return defer.fail(self.fail)
        self.box.stored.append(b"".join(self.chunks))
        return defer.succeed(f"ID{len(self.box.stored)}")

    def connectionLost(self) -> None:
        self.aborted = True


@implementer(IMessageDeliveryFactory)
class MemoryMailbox:
    """
    An avatar that accepts local recipients of C{example.test}, refuses
    others like the real realm does, and stores messages in memory.
    """

    def __init__(self, login=None, users=("alice@example.test", "bob@example.test")) -> None:
        self.login = login
        self.users = users
        self.stored: list = []
        self.messages: list = []
        self.failWith = None

    def getMessageDelivery(self):
        return MemoryDelivery(self)


@implementer(IMessageDelivery)
class MemoryDelivery:
    def __init__(self, box: MemoryMailbox) -> None:
        self.box = box
        self.message = None

    def receivedHeader(self, helo, origin, recipients):
        return b"Received: from " + helo[0] + b"\r\n"

    def validateFrom(self, helo, origin):
        if self.box.login and origin is not None:
            sender = f"{origin.local.decode()}@{origin.domain.decode()}"
            if sender != self.box.login:
                raise SMTPReply(553, f"5.7.1 <{sender}>: Sender address not owned by user")
        return origin

    def validateTo(self, user):
        addr = f"{user.dest.local.decode()}@{user.dest.domain.decode()}"
        if not addr.endswith("@example.test"):
            if self.box.login is None:
                raise SMTPReply(554, f"5.7.1 <{addr}>: Relay access denied")
        elif addr not in self.box.users:
            raise SMTPReply(550, f"5.1.1 <{addr}>: Recipient address rejected: User unknown")

        def message():
            if self.message is None:
                self.message = MemoryMessage(self.box, self.box.failWith)
                self.box.messages.append(self.message)
            return self.message

        return message


class FakeTLSContext:
    def getContext(self):
        raise AssertionError("a StringTransport never handshakes")


def makeSettings(**overrides) -> configmod.ServerConfig:
    values = dict(
        hostname="mx.example.test",
        state_dir="/nonexistent",
        max_message_size=1024 * 1024,
        max_recipients=5,
        max_connections=10,
        max_connections_per_address=3,
        timeout=300.0,
        data_timeout=600.0,
        max_errors=10,
        auth_threads=1,
        disk_threads=1,
    )
    values.update(overrides)
    return configmod.ServerConfig(**values)


def makeThrottle(clock, **overrides) -> AuthThrottle:
    values = dict(
        window=900.0, maxPerAddress=10, maxPerLogin=5, tarpitDelay=2.0, blockTime=900.0,
        maxTracked=100,
    )
    values.update(overrides)
    return AuthThrottle(clock, **values)


def makeFactory(clock, portal=None, anonymous=None, settings=None, **overrides):
    values = dict(
        settings=settings or makeSettings(),
        portal=portal or RecordingPortal(),
        anonymous=anonymous or MemoryMailbox(),
        mechanisms=("PLAIN", "LOGIN", "CRAM-MD5"),
        authMode="required",
        tlsMode="starttls",
        tlsContext=FakeTLSContext(),
        plaintextRequiresTLS=True,
        throttle=None,
        connections=ConnectionLimiter(10, 3),
        failuresPerSession=3,
        postmasterDomain="example.test",
        reactor=clock,
    )
    values.update(overrides)
    if values["throttle"] is None:
        values["throttle"] = makeThrottle(clock)
    return SubmissionFactory(**values)
