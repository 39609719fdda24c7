"""
A small ESMTP server for tests of the relay client: it listens on
127.0.0.1, offers STARTTLS or implicit TLS with a certificate made for the
test, checks AUTH PLAIN and LOGIN against one user, records every
transaction, and answers as the test tells it to.
"""

from __future__ import annotations

import base64
import datetime
import os
import tempfile
from typing import Optional

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import defer, endpoints, protocol
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.protocols import basic, tls
from zope.interface import implementer


@attrs.frozen
class TestPKI:
    """
    A throwaway certificate authority and a server certificate it issued.

    @ivar caPEM: the CA certificate.
    @ivar certificatePEM: the server certificate.
    @ivar keyPEM: the server's private key.
    @ivar caKeyPEM: the CA's private key, to issue more certificates
        (L{issue}).
    """

    caPEM: bytes
    certificatePEM: bytes
    keyPEM: bytes
    caKeyPEM: bytes = b""

    def issue(
        self, names: tuple = (), addresses: tuple = (), commonName: Optional[str] = None
    ) -> TestPKI:
        """
        Another server certificate from the same CA: for C{names} (DNS)
        and C{addresses} (IP) in its subjectAltName, with no subjectAltName
        at all when both are empty (a common name only, as old CAs made
        them).

        @param commonName: the subject's common name (default: the first name).
        """
        caKey = serialization.load_pem_private_key(self.caKeyPEM, None)
        ca = x509.load_pem_x509_certificate(self.caPEM)
        certificate, key = _leaf(ca.subject, caKey, names, addresses, commonName)
        return attrs.evolve(self, certificatePEM=certificate, keyPEM=key)

    def serverContextFactory(self) -> ServerContextFactory:
        """
        TLS server settings with this certificate. They are loaded from PEM
        files, the one way that needs no pyOpenSSL certificate objects
        (deprecated in pyOpenSSL 26, the only kind pyOpenSSL 23 takes).
        """
        with tempfile.TemporaryDirectory() as directory:
            paths = []
            for name, pem in (("cert.pem", self.certificatePEM), ("key.pem", self.keyPEM)):
                paths.append(os.path.join(directory, name))
                with open(paths[-1], "wb") as f:
                    f.write(pem)
            context = SSL.Context(SSL.TLS_METHOD)
            context.set_min_proto_version(SSL.TLS1_2_VERSION)
            context.use_certificate_chain_file(paths[0])
            context.use_privatekey_file(paths[1])
        return ServerContextFactory(context)


@implementer(IOpenSSLContextFactory)
@attrs.frozen
class ServerContextFactory:
    """An old-style context factory, as C{startTLS} and TLSMemoryBIOFactory take."""

    context: SSL.Context

    def getContext(self) -> SSL.Context:
        return self.context


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    """Valid from yesterday for a week."""
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    return builder.not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(
        now + datetime.timedelta(days=7)
    )


def makePKI(names: tuple = ("localhost",), addresses: tuple = ("127.0.0.1",)) -> TestPKI:
    """
    A new CA and a server certificate for C{names} and C{addresses},
    valid from yesterday for a week.
    """
    caKey = ec.generate_private_key(ec.SECP256R1())
    caName = _name("mailauth test CA")
    ca = (
        _validity(x509.CertificateBuilder())
        .subject_name(caName)
        .issuer_name(caName)
        .public_key(caKey.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(caKey, hashes.SHA256())
    )
    certificate, key = _leaf(caName, caKey, names, addresses, None)
    return TestPKI(
        caPEM=ca.public_bytes(serialization.Encoding.PEM),
        certificatePEM=certificate,
        keyPEM=key,
        caKeyPEM=_keyPEM(caKey),
    )


def _keyPEM(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _leaf(
    caName: x509.Name, caKey, names: tuple, addresses: tuple, commonName: Optional[str]
) -> tuple:
    """A server certificate issued by C{caName}, and its key, both in PEM."""
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    alternatives = [x509.DNSName(n) for n in names] + [
        x509.IPAddress(ipaddress.ip_address(a)) for a in addresses
    ]
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(_name(commonName or (names + addresses)[0]))
        .issuer_name(caName)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    )
    if alternatives:
        builder = builder.add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
    certificate = builder.sign(caKey, hashes.SHA256())
    return certificate.public_bytes(serialization.Encoding.PEM), _keyPEM(key)


@attrs.frozen
class Transaction:
    """
    One message the sink accepted.

    @ivar sender: the MAIL FROM address (C{""} for C{<>}).
    @ivar mailParameters: what followed the address in MAIL FROM.
    @ivar recipients: the accepted RCPT TO addresses.
    @ivar data: the message, dot-stuffing undone, CRLF line ends.
    @ivar tls: whether the session was encrypted.
    @ivar login: the authenticated user, or L{None}.
    @ivar rcptParameters: what followed each accepted RCPT TO address.
    @ivar chunks: the sizes of the BDAT chunks it came in (none for DATA).
    """

    sender: str
    mailParameters: str
    recipients: tuple
    data: bytes
    tls: bool
    login: Optional[str]
    rcptParameters: tuple = ()
    chunks: tuple = ()


class SinkProtocol(basic.LineReceiver):
    """One session with the sink."""

    delimiter = b"\r\n"
    MAX_LENGTH = 1024 * 1024

    def __init__(self, sink: SMTPSink, implicitTLS: bool) -> None:
        self.sink = sink
        self.tls = implicitTLS
        self._reset()
        self.login: Optional[str] = None
        self._inData = False
        self._authState: Optional[str] = None
        self._authUser = ""

    def _reset(self) -> None:
        self.sender: Optional[str] = None
        self.mailParameters = ""
        self.recipients: list = []
        self.rcptParameters: list = []
        self.data: list = []
        self.chunks: list = []
        self._chunkLeft = 0
        self._chunkLast = False

    def connectionMade(self) -> None:
        self.sink._connected(self)
        if self.sink.greeting is not None:
            self.reply(self.sink.greeting)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.sink._lost(self)

    def reply(self, line: bytes) -> None:
        self.transport.write(line + b"\r\n")

    def lineReceived(self, line: bytes) -> None:
        if self._inData:
            return self._dataLine(line)
        self.sink.commands.append(line)
        if self._authState is not None:
            return self._authLine(line)
        verb, _, argument = line.partition(b" ")
        handler = getattr(self, "smtp_" + verb.upper().decode("ascii", "replace"), None)
        if handler is None:
            return self.reply(b"502 5.5.2 unknown command")
        handler(argument)

    def smtp_EHLO(self, argument: bytes) -> None:
        lines = [
            b"sink.test",
            b"SIZE 100000000",
            b"8BITMIME",
            b"ENHANCEDSTATUSCODES",
            *self.sink.extensions,
        ]
        if self.sink.tls == "starttls" and not self.tls:
            lines.append(b"STARTTLS")
        if self.sink.credentials and (self.tls or self.sink.tls == "none"):
            lines.append(b"AUTH " + self.sink.mechanisms)
        for line in lines[:-1]:
            self.reply(b"250-" + line)
        self.reply(b"250 " + lines[-1])

    def smtp_STARTTLS(self, argument: bytes) -> None:
        if self.tls or self.sink.tls != "starttls":
            return self.reply(b"503 5.5.1 TLS not available now")
        if self.sink.starttlsReply is not None:
            self.transport.write(self.sink.starttlsReply)
        else:
            self.reply(b"220 2.0.0 go ahead")
        self.transport.startTLS(self.sink.serverContext)
        self.tls = True
        self._reset()
        self.login = None

    def smtp_AUTH(self, argument: bytes) -> None:
        mechanism, _, initial = argument.partition(b" ")
        if not self.sink.credentials or mechanism.upper() not in self.sink.mechanisms.split():
            return self.reply(b"504 5.5.4 unrecognised mechanism")
        if mechanism.upper() == b"PLAIN":
            if initial:
                return self._plain(initial)
            self._authState = "plain"
            return self.reply(b"334 ")
        self._authState = "user"
        self.reply(b"334 " + base64.b64encode(b"Username:"))

    def _authLine(self, line: bytes) -> None:
        state, self._authState = self._authState, None
        if state == "plain":
            return self._plain(line)
        if state == "user":
            self._authUser = base64.b64decode(line).decode("utf-8")
            self._authState = "password"
            return self.reply(b"334 " + base64.b64encode(b"Password:"))
        self._check(self._authUser, base64.b64decode(line).decode("utf-8"))

    def _plain(self, token: bytes) -> None:
        _, user, password = base64.b64decode(token).split(b"\0")
        self._check(user.decode("utf-8"), password.decode("utf-8"))

    def _check(self, user: str, password: str) -> None:
        if (user, password) == self.sink.credentials:
            self.login = user
            self.reply(b"235 2.7.0 Authentication successful")
        else:
            self.reply(b"535 5.7.8 Authentication credentials invalid")

    def smtp_MAIL(self, argument: bytes) -> None:
        if self.sink.credentials and self.login is None:
            return self.reply(b"530 5.7.0 Authentication required")
        text = argument.decode("utf-8")
        if not text.upper().startswith("FROM:<") or ">" not in text:
            return self.reply(b"501 5.5.4 syntax")
        address, _, parameters = text[6:].partition(">")
        self._reset()
        self.sender = address
        self.mailParameters = parameters.strip()
        self.reply(self.sink._next(self.sink.mailReplies, address, b"250 2.1.0 ok"))

    def smtp_RCPT(self, argument: bytes) -> None:
        if self.sender is None:
            return self.reply(b"503 5.5.1 MAIL first")
        text = argument.decode("utf-8")
        address, _, parameters = text[3:].strip().partition(">")
        address = address.lstrip("<")
        reply = self.sink._next(self.sink.rcptReplies, address, b"250 2.1.5 ok")
        if reply.startswith(b"2"):
            self.recipients.append(address)
            self.rcptParameters.append(parameters.strip())
        self.reply(reply)

    def smtp_DATA(self, argument: bytes) -> None:
        if not self.recipients:
            return self.reply(b"503 5.5.1 RCPT first")
        reply = self.sink._next(self.sink.dataReplies, "DATA", b"354 go ahead")
        if reply.startswith(b"354"):
            self._inData = True
            self.data = []
        self.reply(reply)

    def smtp_BDAT(self, argument: bytes) -> None:
        size, _, last = argument.partition(b" ")
        self._chunkLeft = int(size)
        self._chunkLast = last.upper() == b"LAST"
        self.chunks.append(self._chunkLeft)
        self.setRawMode()
        if not self._chunkLeft:
            self.rawDataReceived(b"")

    def rawDataReceived(self, data: bytes) -> None:
        take, rest = data[: self._chunkLeft], data[self._chunkLeft :]
        self._chunkLeft -= len(take)
        self.data.append(take)
        if self._chunkLeft:
            return
        if not self.recipients:
            self.reply(b"503 5.5.1 RCPT first")
        elif self._chunkLast:
            self._endMessage()
        else:
            self.reply(b"250 2.0.0 %d octets" % (sum(self.chunks),))
        self.setLineMode(rest)

    def _endMessage(self) -> None:
        transaction = Transaction(
            sender=self.sender,
            mailParameters=self.mailParameters,
            recipients=tuple(self.recipients),
            data=b"".join(self.data),
            tls=self.tls,
            login=self.login,
            rcptParameters=tuple(self.rcptParameters),
            chunks=tuple(self.chunks),
        )
        self._reset()
        reply = self.sink._next(self.sink.dataReplies, "END", b"250 2.0.0 Ok: queued")
        if reply is None:
            self.transport.loseConnection()
            return
        if reply.startswith(b"2"):
            self.sink._received(transaction)
        self.reply(reply)

    def _dataLine(self, line: bytes) -> None:
        if line == b".":
            self._inData = False
            self._endMessage()
            return
        if line.startswith(b"."):
            line = line[1:]
        self.data.append(line + b"\r\n")

    def smtp_RSET(self, argument: bytes) -> None:
        self._reset()
        self.reply(b"250 2.0.0 ok")

    def smtp_NOOP(self, argument: bytes) -> None:
        self.reply(b"250 2.0.0 ok")

    def smtp_QUIT(self, argument: bytes) -> None:
        if self.sink.quitReply is None:
            return  # a relay that never answers, and keeps the connection
        self.reply(self.sink.quitReply)
        self.transport.loseConnection()


class SMTPSink:
    """
    A test upstream server on 127.0.0.1.

    Behaviour is set through attributes:

      - C{mailReplies}, C{rcptReplies}: address to a list of replies (bytes,
        no CRLF) used one per command, then the default (250);
      - C{dataReplies}: C{"DATA"} (the reply to DATA) and C{"END"} (after the
        final dot) to lists of replies, likewise; L{None} in C{"END"} hangs
        up without a reply (and without recording the message);
      - C{starttlsReply}: raw bytes written in place of the 220 to STARTTLS;
      - C{greeting}: the banner, or L{None} for a server that never speaks;
      - C{quitReply}: the reply to QUIT, or L{None} for a server that never
        answers it (and keeps the connection open);
      - C{extensions}: more EHLO keywords to offer (C{b"SMTPUTF8"},
        C{b"DSN"}, C{b"CHUNKING"}: BDAT is understood).

    @ivar transactions: every accepted L{Transaction}.
    @ivar commands: every command line received, in order.
    @ivar connections: every L{SinkProtocol} that was connected.
    """

    def __init__(
        self,
        reactor,
        pki: Optional[TestPKI] = None,
        tls: str = "starttls",
        credentials: Optional[tuple] = ("relay-user", "relay secret"),
        mechanisms: bytes = b"PLAIN LOGIN",
    ) -> None:
        self.reactor = reactor
        self.pki = pki
        self.serverContext = pki.serverContextFactory() if pki is not None else None
        self.tls = tls
        self.credentials = credentials
        self.mechanisms = mechanisms
        self.mailReplies: dict = {}
        self.rcptReplies: dict = {}
        self.dataReplies: dict = {}
        self.starttlsReply: Optional[bytes] = None
        self.greeting: Optional[bytes] = b"220 sink.test ESMTP test sink"
        self.quitReply: Optional[bytes] = b"221 2.0.0 bye"
        self.extensions: list = []
        self.transactions: list = []
        self.commands: list = []
        self.connections: list = []
        self.port = 0
        self._listening = None
        self._transactionWaiters: list = []
        self._connectionWaiters: list = []
        self._disconnectWaiters: list = []
        self._lostCount = 0

    def start(self, port: int = 0, interface: str = "127.0.0.1") -> defer.Deferred:
        """Listen on C{interface} (on C{port}, or any free port); fires with the port."""
        factory = protocol.Factory.forProtocol(lambda: SinkProtocol(self, self.tls == "implicit"))
        if self.tls == "implicit":
            factory = tls.TLSMemoryBIOFactory(self.serverContext, False, factory)
        endpoint = endpoints.TCP4ServerEndpoint(self.reactor, port, interface=interface)

        def listening(listeningPort):
            self._listening = listeningPort
            self.port = listeningPort.getHost().port
            return self.port

        return endpoint.listen(factory).addCallback(listening)

    def stop(self) -> defer.Deferred:
        """Stop listening and drop every connection; fires once all are gone."""
        waiters = [self.waitForDisconnects(len(self.connections))]
        for connection in self.connections:
            if connection.transport.connected:
                connection.transport.abortConnection()
        if self._listening is not None:
            waiters.append(defer.maybeDeferred(self._listening.stopListening))
            self._listening = None
        return defer.gatherResults(waiters).addCallback(lambda _: None)

    @classmethod
    @defer.inlineCallbacks
    def freePort(cls, reactor):
        """A port on 127.0.0.1 that nothing listens on (a relay that is down)."""
        endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = yield endpoint.listen(protocol.Factory.forProtocol(protocol.Protocol))
        number = port.getHost().port
        yield port.stopListening()
        return number

    def waitForTransactions(self, count: int) -> defer.Deferred:
        """Fires with the transactions once there are at least C{count}."""
        return self._wait(self._transactionWaiters, count, self.transactions)

    def waitForConnections(self, count: int) -> defer.Deferred:
        """Fires once C{count} connections were made."""
        return self._wait(self._connectionWaiters, count, self.connections)

    def _connected(self, connection: SinkProtocol) -> None:
        self.connections.append(connection)
        self._notify(self._connectionWaiters, self.connections)

    def waitForDisconnects(self, count: int) -> defer.Deferred:
        """Fires once C{count} connections have ended."""
        waiter = defer.Deferred()
        self._disconnectWaiters.append((count, waiter))
        self._lost(None)
        return waiter

    def _wait(self, waiters: list, count: int, items: list) -> defer.Deferred:
        if len(items) >= count:
            return defer.succeed(list(items))
        waiter = defer.Deferred()
        waiters.append((count, waiter))
        return waiter

    def _received(self, transaction: Transaction) -> None:
        self.transactions.append(transaction)
        self._notify(self._transactionWaiters, self.transactions)

    def _notify(self, waiters: list, items: list) -> None:
        for count, waiter in list(waiters):
            if len(items) >= count:
                waiters.remove((count, waiter))
                waiter.callback(list(items))

    def _lost(self, connection: Optional[SinkProtocol]) -> None:
        if connection is not None:
            self._lostCount += 1
        for count, waiter in list(self._disconnectWaiters):
            if self._lostCount >= count:
                self._disconnectWaiters.remove((count, waiter))
                waiter.callback(None)

    def _next(self, table: dict, key: str, default: bytes) -> bytes:
        replies = table.get(key)
        if replies:
            return replies.pop(0)
        return default


class QueueEvents:
    """
    Collects the log events of L{mailauth.queue.QueueService} (those with a
    C{queueEvent} key) so tests can wait for them instead of sleeping.
    """

    def __init__(self) -> None:
        self.events: list = []
        self._waiters: list = []

    def start(self, testCase) -> None:
        """Observe the global log publisher for the duration of C{testCase}."""
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self)
        testCase.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict) -> None:
        if "queueEvent" not in event:
            return
        self.events.append(event)
        for waiter in list(self._waiters):
            kind, msgid, count, d = waiter
            if len(self._matching(kind, msgid)) >= count:
                self._waiters.remove(waiter)
                d.callback(None)

    def _matching(self, kind: str, msgid: Optional[str]) -> list:
        return [
            e
            for e in self.events
            if e["queueEvent"] == kind and (msgid is None or e.get("msgid") == msgid)
        ]

    def kinds(self, msgid: str) -> list:
        """The kinds of event logged about C{msgid}, in order."""
        return [e["queueEvent"] for e in self.events if e.get("msgid") == msgid]

    def wait(self, kind: str, msgid: Optional[str] = None, count: int = 1) -> defer.Deferred:
        """
        Fires once C{count} events of C{kind} (C{"sent"}, C{"deferred"},
        C{"bounced"}, C{"expired"}, C{"bounce"}, C{"removed"}) were logged,
        about C{msgid} if given; earlier events count.
        """
        if len(self._matching(kind, msgid)) >= count:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append((kind, msgid, count, d))
        return d
