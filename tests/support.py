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
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.mail.interfaces import IMessageDelivery, IMessageDeliveryFactory
from zope.interface import implementer

from mailauth import config as configmod
from mailauth.config import RelayConfig
from mailauth.esmtp import SubmissionFactory
from mailauth.replies import SMTPReply
from mailauth.spool import Queue
from mailauth.throttle import AuthThrottle, ConnectionLimiter

# Test data: real doveadm hashes (tests/data/README.md).
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# The password of every user in data/dovecot-passwd (Dovecot 2.3.19's doveadm).
SECRET = b"alice-secret-1"


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


# -- helpers for attacking a real listening service (tests.test_security,
# tests.test_fuzz, tests.test_interop) -------------------------------------

import re as _re  # noqa: E402
import socket as _socket  # noqa: E402
import ssl as _ssl  # noqa: E402

from twisted.internet import reactor as _reactor  # noqa: E402
from twisted.logger import formatEvent as _formatEvent  # noqa: E402
from twisted.logger import globalLogPublisher as _globalLogPublisher  # noqa: E402


class ClockedReactor:
    """
    The real reactor for sockets and threads, with a L{task.Clock} for time:
    the real service built on it listens on real ports, while its timers
    (idle timeouts, tarpit delays, blocks) move only when the test advances
    the clock, so no test has to sleep.
    """

    def __init__(self, clock, reactor=_reactor) -> None:
        self.clock = clock
        self._reactor = reactor

    def callLater(self, delay, f, *args, **kwargs):
        return self.clock.callLater(delay, f, *args, **kwargs)

    def seconds(self) -> float:
        return self.clock.seconds()

    def getDelayedCalls(self):
        return self.clock.getDelayedCalls()

    def __getattr__(self, name):
        return getattr(self._reactor, name)


def insecureContext() -> _ssl.SSLContext:
    """A client TLS context that accepts the test certificate."""
    ctx = _ssl.SSLContext(_ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = _ssl.CERT_NONE
    return ctx


class RawClient:
    """
    A blocking SMTP client on a raw socket, for use in a thread: it sends
    exactly the bytes it is given and returns replies as they arrive, so
    tests can send what no well-behaved client library would.

    @ivar lines: every reply line received so far, in order.
    """

    def __init__(self, port: int, source: str = "127.0.0.1", tls: bool = False,
                 timeout: float = 10.0, host: str = "127.0.0.1") -> None:
        family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
        sock = _socket.socket(family, _socket.SOCK_STREAM)
        sock.settimeout(timeout)
        self.timeout = timeout
        sock.bind((source, 0))
        sock.connect((host, port))
        if tls:
            sock = insecureContext().wrap_socket(sock)
        self.sock = sock
        self._buffer = b""
        self.lines: list = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readLine(self) -> bytes:
        """One reply line without its CRLF; C{b""} at end of stream."""
        while b"\r\n" not in self._buffer:
            data = self.sock.recv(65536)
            if not data:
                rest, self._buffer = self._buffer, b""
                return rest
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        self.lines.append(line)
        return line

    def reply(self) -> tuple:
        """
        One whole reply.

        @return: C{(code, [text of each line])}; C{(None, [])} if the
            server closed the connection first.
        """
        texts = []
        while True:
            line = self.readLine()
            if not line:
                return None, texts
            texts.append(line[4:])
            if line[3:4] != b"-":
                return int(line[:3]), texts

    def command(self, line: bytes) -> tuple:
        self.send(line + b"\r\n")
        return self.reply()

    def ehlo(self, name: bytes = b"client.example") -> tuple:
        return self.command(b"EHLO " + name)

    def starttls(self) -> None:
        """STARTTLS and the handshake; the caller says EHLO again."""
        code, text = self.command(b"STARTTLS")
        assert code == 220, (code, text)
        self.sock = insecureContext().wrap_socket(self.sock)

    def pending(self) -> bool:
        """
        Whether the server sent anything (or closed) that was not read yet.
        Never blocks; TLS records that carry no data (session tickets) do
        not count.
        """
        if self._buffer:
            return True
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(65536)
        except (_ssl.SSLWantReadError, BlockingIOError):
            return False
        finally:
            self.sock.settimeout(self.timeout)
        self._buffer += data
        return True

    def closedByServer(self) -> bool:
        """
        Read to the end of the stream: True if the server closed it (or cut
        it off), False if it was still open when the socket timed out.
        """
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self._buffer += data
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class LogWatcher:
    """
    Collects what the process logs (the in-process daemon logs through the
    global log publisher) and lets a test wait for a line.

    @ivar messages: every formatted log message, in order.
    """

    def __init__(self) -> None:
        self.messages: list = []
        self.events: list = []
        self._waiting: list = []
        _globalLogPublisher.addObserver(self)

    def stop(self) -> None:
        _globalLogPublisher.removeObserver(self)

    def __call__(self, event) -> None:
        text = _formatEvent(event)
        self.messages.append(text)
        self.events.append(event)
        for pattern, d in list(self._waiting):
            if _re.search(pattern, text):
                self._waiting.remove((pattern, d))
                # Fire after the code that logged has finished its work.
                _reactor.callLater(0, d.callback, text)

    def waitFor(self, pattern: str) -> defer.Deferred:
        """A Deferred that fires with the first message matching C{pattern} from now on."""
        d = defer.Deferred()
        self._waiting.append((pattern, d))
        return d

    def matching(self, pattern: str) -> list:
        return [m for m in self.messages if _re.search(pattern, m)]


# The forward queue

EPOCH = 1_700_000_000.0
MESSAGE = (
    b"From: alice@example.org\r\n"
    b"To: bob@remote.example\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
    b".\r\n"
    b"..two dots\r\n"
)
HEADERS = MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n"


def relayConfig(**overrides) -> RelayConfig:
    """A C{[relay]} section with test defaults."""
    values = dict(
        host="relay.test",
        port=587,
        tls="starttls",
        username=None,
        password_file=None,
        ca_file=None,
        verify_certificate=True,
        retry_initial=60.0,
        retry_max=3600.0,
        expire=5 * 86400.0,
        max_connections=2,
        timeout=30.0,
        queue_interval=30.0,
    )
    values.update(overrides)
    return RelayConfig(**values)


class QueueTestMixin:
    """A queue in a fresh directory, on a clock."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(EPOCH)
        self.directory = os.path.abspath(self.mktemp())
        self.queue = Queue(self.directory, self.reactor, "mail.example.org")

    def enqueue(
        self,
        msgid,
        sender="alice@example.org",
        recipients=("bob@remote.example",),
        message=MESSAGE,
        queue=None,
    ):
        writer = (queue or self.queue).newMessage(msgid, sender, list(recipients))
        writer.write(message)
        return writer.commit()

    def runFor(self, seconds):
        """Advance the clock by C{seconds}, stopping at every timer on the way."""
        end = self.reactor.seconds() + seconds
        while True:
            due = [c.getTime() for c in self.reactor.getDelayedCalls() if c.getTime() <= end]
            if not due:
                break
            self.reactor.advance(max(min(due) - self.reactor.seconds(), 0))
        self.reactor.advance(end - self.reactor.seconds())

    def files(self, sub):
        return sorted(os.listdir(os.path.join(self.directory, sub)))
