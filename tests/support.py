"""Helpers shared by the session and end-to-end tests: fakes, certificates, configs."""

from __future__ import annotations

import datetime
import io
import ipaddress
import os
import re
import shutil
import socket
import tempfile
from typing import Any, Callable, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, interfaces
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.mail.interfaces import IMessageDelivery, IMessageDeliveryFactory
from zope.interface import implementer

from mailauth import config as configmod
from mailauth.cli import Console, main
from mailauth.config import RelayConfig
from mailauth.esmtp import SubmissionFactory
from mailauth.replies import SMTPReply
from mailauth.spool import Queue
from mailauth.throttle import AuthThrottle, ConnectionLimiter
from mailauth.workerlink import ParentConnections, ParentCounters, ParentRequests
from mailauth.workerproc import _ParentLink

# Test data: real doveadm hashes (tests/data/README.md).
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# The password of every user in data/dovecot-passwd (Dovecot 2.3.19's doveadm).
SECRET = b"alice-secret-1"


#: The session ID field that ends every line a session logs.
SESSION_FIELD = re.compile(r" session=[0-9a-f]{12}$")


def withoutSession(line: str) -> str:
    """A session's log line without its C{session=ID} field, which is random."""
    return SESSION_FIELD.sub("", line)


def searchableFolder(test) -> str:
    """
    A new folder (mode 0755, removed after C{test}) that any user can
    reach: trial's own temporary folders are private to the user running
    the tests, and a permission check as another user would stop there.
    """
    path = tempfile.mkdtemp(prefix="mailauth-test-")
    test.addCleanup(shutil.rmtree, path)
    os.chmod(path, 0o755)
    return path


def holdPort(test) -> int:
    """
    A port on 127.0.0.1 held by another socket until C{test} ends: bound
    without SO_REUSEADDR, so nothing else can bind it, and not listening,
    so a connection to it is refused at once.
    """
    s = socket.socket()
    test.addCleanup(s.close)
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def writeCertificate(
    directory: str, name: str = "localhost", days: float = 90, passphrase: Optional[bytes] = None
) -> tuple:
    """
    Write a self-signed certificate for C{name} and 127.0.0.1 and its key.

    @param days: how long from now the certificate stays valid (negative:
        it expired that long ago).
    @param passphrase: encrypt the key with it.
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
        .not_valid_before(now - datetime.timedelta(days=max(1, 1 - days)))
        .not_valid_after(now + datetime.timedelta(days=days))
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
                serialization.BestAvailableEncryption(passphrase)
                if passphrase
                else serialization.NoEncryption(),
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
        if self.box.held is not None:
            # Stored when the test fires the Deferred.
            d: defer.Deferred = defer.Deferred()
            self.box.held.append(d)
            return d.addCallback(lambda _: self._store())
        return defer.succeed(self._store())

    def _store(self) -> str:
        self.box.stored.append(b"".join(self.chunks))
        return f"ID{len(self.box.stored)}"

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
        # A list: each commit waits for its Deferred there to be fired.
        self.held: Optional[list] = None

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


# The least a configuration file needs (no TLS, no files read).
MINIMAL_CONFIG = """
[listener:submission]
endpoint = tcp:2587
tls = none
auth = optional

[auth]
users = /etc/mailauth/users

[delivery]
local_domains = example.org
maildir = /var/mail/{domain}/{localpart}/Maildir
"""


def makeConfig(extra: str = "") -> configmod.Config:
    """A configuration loaded from L{MINIMAL_CONFIG} with C{extra} text after it."""
    return configmod.loadText(MINIMAL_CONFIG + extra, "test.conf")


def makeThrottle(clock, **overrides) -> AuthThrottle:
    values = dict(
        window=900.0,
        maxPerAddress=10,
        maxPerLogin=5,
        tarpitDelay=2.0,
        blockTime=900.0,
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


class Session:
    """One client talking to a fresh protocol over a StringTransport."""

    def __init__(self, factory, host: str = "192.0.2.1") -> None:
        self.factory = factory
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)

    def read(self) -> list:
        """The reply lines written since the last read."""
        data = self.transport.value()
        self.transport.clear()
        lines = data.split(b"\r\n")
        assert lines[-1] == b"", data
        return lines[:-1]

    def send(self, data: bytes) -> list:
        if getattr(self.protocol, "inHandshake", False):
            # A TLS layer hands the session bytes only once its handshake
            # is done, and says so first.
            self.protocol.handshakeCompleted()
        self.protocol.dataReceived(data)
        return self.read()

    def command(self, line: bytes) -> list:
        return self.send(line + b"\r\n")


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
        options=None,
    ):
        writer = (queue or self.queue).newMessage(msgid, sender, list(recipients), options)
        writer.write(message)
        return writer.commit()

    def diskFullFor(self, method: str, calls: int) -> None:
        """
        The queue's C{method} fails as on a full disk (C{ENOSPC}) for its
        next C{calls} calls, then works again.
        """
        self.failFor(method, calls, lambda: OSError(28, "No space left on device"))

    def failFor(self, method: str, calls: int, error: Callable[[], Exception]) -> None:
        """The queue's C{method} raises C{error()} for its next C{calls} calls."""
        real = getattr(self.queue, method)
        left = [calls]

        def failing(*args, **kwargs):
            if left[0]:
                left[0] -= 1
                raise error()
            return real(*args, **kwargs)

        self.patch(self.queue, method, failing)

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


def runCommand(*argv: str, stdin: bytes = b"") -> tuple[int, str, str]:
    """
    Run C{mailauth ARGV...} in this process, with C{stdin} as standard input
    (not a terminal).

    @return: the exit status, standard output and standard error.
    """
    stdout, stderr = io.StringIO(), io.StringIO()
    status = main(list(argv), Console(io.BytesIO(stdin), stdout, stderr))
    return status, stdout.getvalue(), stderr.getvalue()


class TokenIssuer:
    """
    An OAuth 2.0 issuer for tests: signing keys made here, their JSON Web Key
    Set, and tokens minted with PyJWT (signed as a real issuer would), with
    times from the system clock, which PyJWT checks them against.
    """

    ISSUER = "https://id.example.test/realms/mail"
    AUDIENCE = "mailauth"

    def __init__(self, kind: str = "ec", kid: str = "k1") -> None:
        self.keys: dict = {}
        self.addKey(kid, kind)
        self.current = kid

    def addKey(self, kid: str, kind: str = "ec") -> None:
        """Make a key of C{kind} (C{ec}: P-256, C{ed25519}, C{rsa}) named C{kid}."""
        from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

        if kind == "ec":
            private, alg = ec.generate_private_key(ec.SECP256R1()), "ES256"
        elif kind == "ed25519":
            private, alg = ed25519.Ed25519PrivateKey.generate(), "EdDSA"
        else:
            private, alg = rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"
        self.keys[kid] = (private, alg)

    def jwk(self, kid: str) -> dict:
        import json

        from jwt import algorithms

        private, alg = self.keys[kid]
        exporter = {
            "ES256": algorithms.ECAlgorithm,
            "EdDSA": algorithms.OKPAlgorithm,
            "RS256": algorithms.RSAAlgorithm,
        }[alg]
        key = json.loads(exporter.to_jwk(private.public_key()))
        if alg == "ES256":
            # Each coordinate at its full 32 bytes (RFC 7518 6.2.1.2), as
            # issuers write them: PyJWT before 2.8 drops leading zero bytes
            # (one key in about 64), which a reader then rightly refuses.
            from jwt.utils import base64url_encode

            numbers = private.public_key().public_numbers()
            for name in ("x", "y"):
                value = getattr(numbers, name).to_bytes(32, "big")
                key[name] = base64url_encode(value).decode("ascii")
        key.update(kid=kid, use="sig")
        return key

    def jwks(self, *kids: str) -> str:
        """The JWKS text holding the public keys C{kids} (default: every key)."""
        import json

        return json.dumps({"keys": [self.jwk(kid) for kid in kids or self.keys]})

    def writeJWKS(self, path: str, *kids: str) -> None:
        """Replace the file C{path} by the JWKS of C{kids}, as a key rotation would."""
        tmp = path + ".new"
        with open(tmp, "w") as f:
            f.write(self.jwks(*kids))
        os.replace(tmp, path)

    def claims(self, login: str = "bob@example.test", lifetime: float = 300, **more) -> dict:
        import time

        now = int(time.time())
        claims = {
            "iss": self.ISSUER,
            "aud": self.AUDIENCE,
            "sub": "8e1b5c2a",
            "email": login,
            "email_verified": True,
            "iat": now,
            "exp": now + lifetime,
        }
        claims.update(more)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(
        self,
        login: str = "bob@example.test",
        kid: str = None,
        alg: str = None,
        headers: dict = None,
        **claims,
    ) -> str:
        """
        A signed token for C{login}, valid for five minutes unless C{claims}
        say otherwise (a claim given as L{None} is left out).
        """
        import jwt

        kid = kid or self.current
        private, defaultAlg = self.keys[kid]
        return jwt.encode(
            self.claims(login, **claims),
            private,
            algorithm=alg or defaultAlg,
            headers={"kid": kid, **(headers or {})},
        )


# A full disk


class DiskFull:
    """
    Makes the disk look full for the files mailauth creates in Maildir
    tmp/ folders, with the kernel's own ENOSPC: each is created as usual
    (so it exists and must be cleaned up), then its descriptor is pointed
    at C{/dev/full}, whose writes fail with ENOSPC. While L{full} is false
    new files are only recorded, and L{fill} fills the disk under them
    later (data then waits in a write buffer until flush or close).

    Installed with C{testCase.patch} on C{os.open}, for one test.
    """

    def __init__(self, testCase, full: bool = True) -> None:
        self.full = full
        self.descriptors: list = []
        self._open = os.open
        testCase.patch(os, "open", self.open)

    def open(self, path, flags, mode=0o777, *, dir_fd=None):
        fd = self._open(path, flags, mode, dir_fd=dir_fd)
        if (
            flags & os.O_CREAT
            and os.sep + "tmp" + os.sep in os.fsdecode(path)
            and "Maildir" in os.fsdecode(path)
        ):
            self.descriptors.append(fd)
            if self.full:
                self._point(fd)
        return fd

    def fill(self) -> None:
        """The disk is full now, for every file recorded so far."""
        self.full = True
        for fd in self.descriptors:
            self._point(fd)

    def _point(self, fd: int) -> None:
        full = self._open("/dev/full", os.O_WRONLY)
        try:
            os.dup2(full, fd)
        finally:
            os.close(full)


# From: headers (issue #12 item 3)

#: (header fields, the addresses a check of the visible sender must see)
#: for headers that try to make the sender look like something it is not.
TRICKY_FROM = [
    (b"From: alice@example.org\r\n", ("alice@example.org",)),
    (b"From: Alice <ALICE@Example.ORG>\r\n", ("alice@example.org",)),
    # A display name holding an address is only a name.
    (b'From: "bob@example.org" <mallory@evil.test>\r\n', ("mallory@evil.test",)),
    # So is a comment.
    (b"From: mallory@evil.test (bob@example.org)\r\n", ("mallory@evil.test",)),
    # Groups are expanded.
    (
        b"From: Team: alice@example.org, mallory@evil.test;\r\n",
        ("alice@example.org", "mallory@evil.test"),
    ),
    # Several From addresses, and two From fields: all of them count.
    (b"From: alice@example.org, mallory@evil.test\r\n", ("alice@example.org", "mallory@evil.test")),
    (
        b"From: alice@example.org\r\nFrom: mallory@evil.test\r\n",
        ("alice@example.org", "mallory@evil.test"),
    ),
    # Sender: counts as well.
    (
        b"From: alice@example.org\r\nSender: mallory@evil.test\r\n",
        ("alice@example.org", "mallory@evil.test"),
    ),
    # Encoded words are decoded for display, never taken for addresses.
    (b"From: =?utf-8?q?bob=40example=2Eorg?= <mallory@evil.test>\r\n", ("mallory@evil.test",)),
    (b"From: =?utf-8?q?Alice_=C3=A4?= <alice@example.org>\r\n", ("alice@example.org",)),
    # UTF-8 display names (RFC 6532) are names too.
    ("From: Jörg <alice@example.org>\r\n".encode(), ("alice@example.org",)),
    ('From: "bob@example.org Jörg" <mallory@evil.test>\r\n'.encode(), ("mallory@evil.test",)),
    # Quoted local parts are the same mailbox as unquoted ones.
    (b'From: "alice"@example.org\r\n', ("alice@example.org",)),
    (b'From: "al\\ice"@example.org\r\n', ("alice@example.org",)),
    (b'From: "a b"@example.org\r\n', ('"a b"@example.org',)),
    # Folded fields.
    (b"From: Alice\r\n <alice@example.org>\r\n", ("alice@example.org",)),
    (
        b"From: alice@example.org,\r\n\tmallory@evil.test\r\n",
        ("alice@example.org", "mallory@evil.test"),
    ),
    # Other fields do not matter.
    (b"Reply-To: mallory@evil.test\r\nTo: x@y.test\r\n", ()),
    (b"", ()),
]

#: Header sections whose sender cannot be known for sure: malformed fields,
#: where the parser can only guess (it reads the first one as
#: bob@example.org, which a mail reader may show), and a line that is no
#: field, after which the parser would stop reading (and miss the From:).
UNCHECKABLE_FROM = [
    b"From: bob@example.org <mallory@evil.test>\r\n",
    b"From: <alice@example.org> mallory@evil.test\r\n",
    b"From: alice@example.org mallory@evil.test\r\n",
    b"From: Alice <alice@example.org.>\r\n",
    b"From:\r\n",
    b"From: Alice\r\n",
    b"From: garbage <<>>\r\n",
    b"From: =?utf-8?b?Ym9iQGV2aWwudGVzdA==?=\r\n",
    b"From: alice@\r\n",
    b"Sender: <>\r\n",
    b"From: \xff\xfe <alice@example.org>\r\n",
    b"Subject: x\r\nnot a field\r\nFrom: mallory@evil.test\r\n",
    b"Subject: x\r\nFrom : mallory@evil.test\r\n",
    b"Subject: x\r\nFrom mallory@evil.test\r\nFrom: alice@example.org\r\n",
]


# DKIM (issue #12 item 4)


def dkimKeygen(testCase, keyType: str, domain: str = "example.org", selector: str = "") -> tuple:
    """
    Run C{mailauth dkim keygen} into a new folder, as an operator does.

    @return: C{(key file, record name, record text)}, the record joined
        from the quoted strings the command printed.
    """
    import io
    import re

    from mailauth.cli import Console, main

    keydir = testCase.mktemp()
    argv = ["dkim", "keygen", domain, "--type", keyType, "--keydir", keydir]
    if selector:
        argv += ["--selector", selector]
    out, err = io.StringIO(), io.StringIO()
    status = main(argv, Console(io.BytesIO(), out, err))
    testCase.assertEqual((status, err.getvalue()), (0, ""))
    [line] = [line for line in out.getvalue().splitlines() if not line.startswith(";")]
    name, _, rest = line.partition(" IN TXT ")
    strings = re.findall(r'"([^"]*)"', rest)
    testCase.assertEqual(rest, " ".join(f'"{s}"' for s in strings))
    for s in strings:
        testCase.assertLessEqual(len(s), 255)
    [path] = [os.path.join(keydir, n) for n in os.listdir(keydir)]
    return path, name, "".join(strings)


class DNSStub:
    """A DNS stub for dkimpy's C{dnsfunc}: serves TXT records by name, and nothing else."""

    def __init__(self) -> None:
        self.records: dict = {}
        self.asked: list = []

    def add(self, name: str, text: str) -> None:
        self.records[name.rstrip(".").encode("ascii") + b"."] = text.encode("ascii")

    def __call__(self, name: bytes, timeout: float = 5):
        self.asked.append(name)
        return self.records.get(name.rstrip(b".") + b".")


def usersFileDatabase(case, users: dict) -> Any:
    """
    A loaded L{mailauth.userdb.UserDatabase} on a users file in a temporary
    folder of the test C{case}, one line C{login:stored} for each of C{users}.
    """
    from mailauth.userdb import UserDatabase

    path = os.path.abspath(case.mktemp())
    with open(path, "w") as f:
        f.writelines(f"{login}:{stored}\n" for login, stored in users.items())
    db = UserDatabase(path)
    db.load()
    return db


class WorkerPipes:
    """
    One worker's pipes to its parent, as lines: what the worker's
    L{ParentConnections} and L{ParentCounters} send goes to C{control}
    (the parent's) at once; its answers wait in the pipe until L{deliver},
    as they would for a turn of the reactor (with C{atOnce}, they are read
    as soon as written), and go back to the question each answers, as in a
    worker.
    """

    def __init__(self, control: Callable[[bytes], Optional[bytes]], atOnce: bool = False) -> None:
        self.control = control
        self.atOnce = atOnce
        self.sent: list = []
        self.pending: list = []
        self.link = _ParentLink(lambda: None)
        requests = ParentRequests(self.send)
        self.link.answered = requests.answered
        self.connections = ParentConnections(requests)
        self.counters = ParentCounters(requests)

    def send(self, line: bytes) -> None:
        self.sent.append(line)
        answer = self.control(line)
        if answer is not None:
            self.pending.append(answer + b"\n")
        if self.atOnce:
            self.deliver()

    def deliver(self) -> None:
        data, self.pending = b"".join(self.pending), []
        # However the pipe splits what the parent wrote.
        for n in range(0, len(data), 3):
            self.link.dataReceived(data[n : n + 3])
