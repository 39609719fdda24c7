"""
The SMTP client that forwards queued mail to the configured upstream relay.

Twisted's C{ESMTPSender} is not used: it dot-stuffs each 16 KiB chunk on its
own, so message content can end the DATA section early and smuggle whole
transactions to the relay (D30 in docs/twisted-defects.rst), and it acts on
replies that were buffered before the STARTTLS handshake (D31). This client
sends the queue's stored bytes, which are dot-stuffed once when they are
written, verbatim, and aborts the connection when anything follows the 220
reply to STARTTLS.

Of the extensions the relay offers it uses SIZE, 8BITMIME, SMTPUTF8 (only
for mail that asked for it; otherwise internationalised domains go as
A-labels, and what cannot be sent in ASCII fails here with 5.6.7 or 5.6.9,
RFC 6531), DSN (passing on NOTIFY, ORCPT, RET and ENVID, RFC 3461) and
CHUNKING (BDAT with the dot-stuffing undone, RFC 3030).
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import re
from typing import Any, Optional

import service_identity.cryptography
from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet import defer, endpoints, protocol, ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailauth.addresses import asciiAddress
from mailauth.config import RelayConfig
from mailauth.dotstuff import Unstuffer
from mailauth.interfaces import IRelayConnector, IRelaySession
from mailauth.relaywire import RelayClientProtocol, RelayError, RelayReply

log = Logger(namespace="mailauth.relay")

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)
# The size of the BDAT chunks the message is sent in.
BDAT_CHUNK = 256 * 1024


def _extensions(reply: RelayReply) -> dict:
    """The EHLO keywords of C{reply}, upper case, to their parameters."""
    extensions = {}
    for line in reply.lines[1:]:
        words = line[4:].split(None, 1)
        if words:
            extensions[words[0].upper()] = words[1] if len(words) > 1 else ""
    return extensions


def _check(reply: RelayReply, expected: int, what: str) -> RelayReply:
    if reply.code != expected:
        raise RelayError(f"{what} refused: {reply.text}")
    return reply


@implementer(IRelaySession)
class RelaySession:
    """
    A session on which the greeting, EHLO, STARTTLS and AUTH are done.

    @ivar extensions: what the relay offered in its last EHLO reply.
    @ivar dsn: the relay offers DSN, so the NOTIFY, ORCPT, RET and ENVID of
        the messages it takes are passed on, and it reports from then on.
    """

    def __init__(self, protocol: RelayClientProtocol, extensions: dict) -> None:
        self._protocol = protocol
        self.extensions = extensions
        self.dsn = "DSN" in extensions
        self._resettable = True
        self._dirty = False

    @property
    def reusable(self) -> bool:
        """
        Whether the session can take another message: not once a
        transaction that did not end could not be reset (RSET refused), nor
        once the relay has hung up or said something out of turn (a 421
        while idle).
        """
        return self._resettable and not self._protocol.broken

    @defer.inlineCallbacks
    def deliver(self, sender, recipients, message, size, body8bit, envelope=None):
        proto = self._protocol
        results: dict = {}
        smtputf8 = envelope is not None and envelope.smtputf8 and "SMTPUTF8" in self.extensions
        wire = {recipient: recipient for recipient in recipients}
        if envelope is not None and envelope.smtputf8 and not smtputf8:
            # RFC 6531 3.2: without SMTPUTF8 only ASCII can go on. Domains
            # can be sent as A-labels; UTF-8 local parts and header fields
            # cannot, and fail here.
            if envelope.headers8bit:
                return dict.fromkeys(recipients, _UTF8_HEADERS)
            ascii = asciiAddress(sender) if sender else ""
            if ascii is None:
                return dict.fromkeys(recipients, _UTF8_SENDER)
            sender = ascii
            for recipient in recipients:
                ascii = asciiAddress(recipient)
                if ascii is None:
                    results[recipient] = _UTF8_RECIPIENT
                    del wire[recipient]
                else:
                    wire[recipient] = ascii
            if not wire:
                return results
        if body8bit and "8BITMIME" not in self.extensions:
            # RFC 6152 3: 8-bit content must be converted or returned. It is
            # returned: converting it would break a DKIM signature.
            results.update(dict.fromkeys(wire, _NO_8BITMIME))
            return results
        limit = _sizeLimit(self.extensions)
        if limit is not None and size > limit:
            # The relay would refuse it (RFC 1870 6.1), at best after the
            # upload: it fails here, as in Postfix.
            tooBig = _refusal(
                552, "5.3.4", f"message size {size} exceeds the relay's size limit of {limit}"
            )
            results.update(dict.fromkeys(wire, tooBig))
            return results
        try:
            yield self._transaction(
                results, sender, wire, message, size, body8bit, smtputf8, envelope
            )
        except RelayError as e:
            # The session failed after the relay refused some recipients
            # for good: those refusals stand (bounced now, as Postfix does,
            # not tried again with the others).
            e.refused = {r: reply for r, reply in results.items() if reply.code // 100 == 5}
            raise
        if self._dirty:
            # Reset now, as Postfix does, so that the next message finds the
            # session clean; if that fails, the replies above still stand,
            # and the next message gets a new session.
            try:
                reply = yield proto.command(b"RSET")
                self._resettable = reply.code // 100 == 2
            except RelayError:
                self._resettable = False
            self._dirty = False
        return results

    @defer.inlineCallbacks
    def _transaction(self, results, sender, wire, message, size, body8bit, smtputf8, envelope):
        """
        MAIL, RCPT for each recipient of C{wire} (its address to the form
        sent), then the message to those accepted; C{_dirty} says whether
        the transaction is left open on the relay's side.

        @param results: filled with each recipient's reply as it comes,
            so that what came before a failure is known.
        @return: a Deferred firing with C{results}.
        """
        proto = self._protocol
        # Reset even after a refused MAIL, as Postfix does.
        self._dirty = True
        reply = _classify(
            (yield proto.command(self._mailCommand(sender, size, body8bit, smtputf8, envelope)))
        )
        if reply.code // 100 != 2:
            results.update(dict.fromkeys(wire, reply))
            return results
        accepted = []
        for recipient, address in wire.items():
            command = b"RCPT TO:<" + _address(address) + b">"
            if self.dsn and envelope is not None:
                command += _rcptParameters(envelope, recipient, smtputf8)
            reply = _classify((yield proto.command(command)))
            results[recipient] = reply
            if reply.code // 100 == 2:
                accepted.append(recipient)
        if not accepted:
            return results
        if "CHUNKING" in self.extensions:
            reply, ended = yield self._sendChunks(message)
            # A chunk refused before LAST may leave the transaction open on
            # the relay's side: it is reset.
            self._dirty = not ended
        else:
            reply = _classify((yield proto.command(b"DATA")), intermediate=354)
            if reply.code == 354:
                reply = _classify((yield proto.sendMessage(message)))
                self._dirty = False
        for recipient in accepted:
            results[recipient] = reply
        return results

    def _mailCommand(
        self, sender: str, size: int, body8bit: bool, smtputf8: bool, envelope
    ) -> bytes:
        mail = b"MAIL FROM:<" + _address(sender) + b">"
        if "SIZE" in self.extensions:
            mail += b" SIZE=%d" % (size,)
        if body8bit and "8BITMIME" in self.extensions:
            mail += b" BODY=8BITMIME"
        if smtputf8:
            mail += b" SMTPUTF8"
        if self.dsn and envelope is not None:
            if envelope.ret is not None:
                mail += b" RET=" + envelope.ret.encode("ascii")
            if envelope.envid is not None:
                mail += b" ENVID=" + envelope.envid.encode("ascii")
        return mail

    @defer.inlineCallbacks
    def _sendChunks(self, message):
        """
        Send the stored message as BDAT chunks (RFC 3030), its dot-stuffing
        undone, each chunk waiting for its reply; the last one says LAST.

        @return: a Deferred firing with the reply that ends it, the one to
            the last chunk or the first refusal, and whether it was the
            last chunk's.
        """
        unstuffer = Unstuffer()
        pending = unstuffer.feed(message.read(BDAT_CHUNK))
        while True:
            data = message.read(BDAT_CHUNK)
            if not data:
                reply = _classify(
                    (yield self._protocol.sendChunk(pending + unstuffer.finish(), last=True))
                )
                return reply, True
            reply = _classify((yield self._protocol.sendChunk(pending, last=False)))
            if reply.code // 100 != 2:
                return reply, False
            pending = unstuffer.feed(data)

    @defer.inlineCallbacks
    def close(self):
        proto = self._protocol
        if proto.transport is not None and proto.transport.connected:
            try:
                yield proto.command(b"QUIT")
            except RelayError:
                pass
            proto.transport.loseConnection()
        yield proto.whenClosed()

    def abort(self):
        return self._protocol.abort()


def _classify(reply: RelayReply, intermediate: Optional[int] = None) -> RelayReply:
    """
    Check a reply within a transaction: a 421 ends the session, and a 3xx
    other than C{intermediate} is a protocol error, never a verdict on a
    recipient; so is a 2xx where C{intermediate} was due (to DATA: taken
    for the verdict, it would mark the message delivered unsent; Postfix
    defers it).

    @raise RelayError: for those.
    """
    if reply.code == 421:
        raise RelayError(f"relay closing the session: {reply.text}")
    if reply.code // 100 == 3 and reply.code != intermediate:
        raise RelayError(f"unexpected reply: {reply.text}")
    if reply.code // 100 == 2 and intermediate is not None:
        raise RelayError(f"unexpected reply to DATA: {reply.text}")
    return reply


def _sizeLimit(extensions: dict) -> Optional[int]:
    """
    The relay's SIZE limit (RFC 1870), or L{None}: none, 0, or not digits
    alone (C{1*DIGIT}, as Postfix's smtp(8) reads it; Python's C{int} also
    takes C{+5}, C{1_000} or other scripts' digits, and a limit misread so
    would bounce mail for good).
    """
    words = extensions.get("SIZE", "").split()
    if not words or not (words[0].isascii() and words[0].isdigit()):
        return None
    limit = int(words[0])
    return limit if limit > 0 else None


def _address(address: str) -> bytes:
    return address.encode("utf-8")


def _rcptParameters(envelope, recipient: str, smtputf8: bool) -> bytes:
    """
    The NOTIFY and ORCPT to pass on for C{recipient} (RFC 3461 5.2.1); a
    UTF-8 ORCPT for a relay without SMTPUTF8 goes in the ASCII
    utf-8-addr-xtext form (RFC 6533 3).
    """
    status = next((r for r in envelope.recipients if r.address == recipient), None)
    if status is None:
        return b""
    out = b""
    if status.notify is not None:
        out += b" NOTIFY=" + ",".join(status.notify).encode("ascii")
    if status.orcpt is not None:
        orcpt = status.orcpt
        if not smtputf8 and not orcpt.isascii():
            orcpt = "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in orcpt)
        out += b" ORCPT=" + orcpt.encode("utf-8")
    return out


def _refusal(code: int, status: str, why: str) -> RelayReply:
    return RelayReply(code, (f"{status} {why}",), local=True)


# RFC 6531 3.5 and its enhanced codes (RFC 5248): what cannot be sent to a
# relay without SMTPUTF8.
_UTF8_SENDER = _refusal(
    553, "5.6.7", "the relay does not offer SMTPUTF8 and the sender's local part is not ASCII"
)
_UTF8_RECIPIENT = _refusal(
    553, "5.6.7", "the relay does not offer SMTPUTF8 and the recipient's local part is not ASCII"
)
_UTF8_HEADERS = _refusal(
    554, "5.6.9", "the relay does not offer SMTPUTF8 and the message has UTF-8 header fields"
)


# RFC 6152 3 and RFC 3463 5.6.3 (conversion required but not supported).
_NO_8BITMIME = _refusal(
    554, "5.6.3", "the relay does not offer 8BITMIME and the message has 8-bit content"
)


def loadCertificates(path: str) -> list:
    """
    Every certificate of the PEM file at C{path} (a single CA or a bundle).

    @raise RelayError: if the file cannot be read or holds no certificate.
    """
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise RelayError(f"cannot read ca_file {path}: {e.strerror}") from None
    certificates = []
    for block in _PEM_CERTIFICATE.findall(pem):
        try:
            certificates.append(ssl.Certificate.loadPEM(block))
        except Exception:
            log.warn("ca_file {path}: skipping a certificate that cannot be parsed", path=path)
    if not certificates:
        raise RelayError(f"ca_file {path} holds no PEM certificate")
    return certificates


@implementer(IOpenSSLClientConnectionCreator)
class VerifyingClientTLS:
    """
    Client TLS for the relay that refuses, inside the handshake, any
    certificate that does not name the relay host in its subjectAltName.

    Twisted's L{ssl.optionsForClientTLS} checks the name with
    service_identity but turns only C{VerificationError} into a failure:
    anything else the check raises (C{CertificateError} for a certificate
    without subjectAltName, on Twisted 26) is logged and OpenSSL's verdict
    on the chain alone is kept, so the handshake succeeds (and on Twisted
    22.4, service_identity 18.1 falls back to the common name). Here the
    connection made by L{ssl.optionsForClientTLS} (trust root, TLS 1.2 at
    least, SNI) gets our own verify callback, which checks the leaf
    certificate itself and fails closed whatever goes wrong: the handshake
    stops before a byte of AUTH or mail is sent.

    One instance serves one connection attempt: L{refusal} says why its
    certificate was refused, for the one line that reports the attempt.

    @ivar refusal: why the relay's certificate was refused, or L{None}.
    """

    def __init__(self, host: str, trustRoot: Any, extraCertificateOptions: dict) -> None:
        self.host = host
        self.refusal: Optional[str] = None
        try:
            ipaddress.ip_address(host)
            self._isAddress = True
        except ValueError:
            self._isAddress = False
        self._options = ssl.optionsForClientTLS(
            host, trustRoot=trustRoot, extraCertificateOptions=extraCertificateOptions
        )

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        # Replaces the callback Twisted 26 sets on the connection (Twisted
        # 22.4 checks the name in an info callback once the handshake is
        # done, which a refusal here never lets it reach).
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        return connection

    def _verify(
        self, connection: SSL.Connection, certificate: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        if not ok or depth != 0:
            # OpenSSL's verdict on the chain stands; only the leaf names the host.
            return bool(ok)
        try:
            problem = self.nameProblem(certificate.to_cryptography())
        except Exception as e:
            problem = f"it cannot be checked ({type(e).__name__}: {e})"
        if problem is None:
            return True
        if self.refusal is None:
            self.refusal = f"certificate of {self.host} refused: {problem}"
        return False

    def nameProblem(self, certificate: x509.Certificate) -> Optional[str]:
        """
        Why C{certificate} does not name the relay host, or L{None} if it
        does: it must have a subjectAltName (the common name is never
        used, RFC 6125 6.4.4) that service_identity matches to the host.
        """
        try:
            certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return "it has no subjectAltName (a common name alone does not count)"
        try:
            if self._isAddress:
                service_identity.cryptography.verify_certificate_ip_address(certificate, self.host)
            else:
                service_identity.cryptography.verify_certificate_hostname(certificate, self.host)
        except Exception as e:
            # VerificationError, CertificateError, or anything else: refused.
            return f"it does not name {self.host} ({type(e).__name__}: {e})"
        return None


def readPassword(path: str) -> str:
    """
    The first line of the file at C{path}, stripped.

    @raise RelayError: if it cannot be read.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise RelayError(f"cannot read password_file {path}: {e}") from None


@implementer(IRelayConnector)
class RelayConnector:
    """
    Connects to the relay of C{config}: TLS (STARTTLS, implicit or none),
    certificate verification, EHLO and AUTH.

    The CA file and the password file are read at each connection, so both
    can be replaced without a restart.

    @param config: the C{[relay]} section.
    @param reactor: provides TCP, name resolution and time.
    @param hostname: the name to say in EHLO.
    """

    def __init__(self, config: RelayConfig, reactor, hostname: str) -> None:
        self._config = config
        self._reactor = reactor
        self._hostname = hostname

    def tlsOptions(self):
        """
        The client TLS settings: the relay's certificate must be issued by
        the system's or C{ca_file}'s CAs and name the relay host in its
        subjectAltName (L{VerifyingClientTLS}), unless C{verify_certificate}
        is off. TLS 1.2 at least, on Twisted 22.4 too.
        """
        minimum = {"raiseMinimumTo": ssl.TLSVersion.TLSv1_2}
        if not self._config.verify_certificate:
            return ssl.CertificateOptions(**minimum)
        if self._config.ca_file:
            trustRoot = ssl.trustRootFromCertificates(loadCertificates(self._config.ca_file))
        else:
            trustRoot = ssl.platformTrust()
        return VerifyingClientTLS(self._config.host, trustRoot, minimum)

    def connect(self) -> defer.Deferred:
        try:
            creator = self.tlsOptions() if self._config.tls != "none" else None
            password = None
            if self._config.username:
                password = readPassword(self._config.password_file or "")
        except RelayError as e:
            return defer.fail(e)
        config = self._config
        endpoint: Any = endpoints.HostnameEndpoint(
            self._reactor, config.host, config.port, timeout=config.timeout
        )
        if config.tls == "implicit":
            assert creator is not None
            endpoint = endpoints.wrapClientTLS(creator, endpoint)
        factory = protocol.Factory.forProtocol(
            functools.partial(RelayClientProtocol, self._reactor, config.timeout)
        )

        def notConnected(reason):
            reason.trap(Exception)
            refusal = getattr(creator, "refusal", None)
            if refusal is not None:
                raise RelayError(refusal)
            raise RelayError(
                f"cannot connect to {config.host} port {config.port}: "
                f"{reason.getErrorMessage() or reason.type.__name__}"
            )

        def established(proto):
            d = self._establish(proto, creator, password)

            def failed(reason):
                refusal = getattr(creator, "refusal", None)
                if refusal is not None:
                    reason = Failure(RelayError(refusal))
                elif not reason.check(RelayError):
                    reason = Failure(
                        RelayError(f"session setup failed: {reason.getErrorMessage()}")
                    )
                return proto.abort().addCallback(lambda _: reason)

            return d.addErrback(failed)

        connecting = endpoint.connect(factory)
        connecting.addCallbacks(established, notConnected)
        return connecting

    @defer.inlineCallbacks
    def _establish(self, proto: RelayClientProtocol, creator, password):
        config = self._config
        reply = yield proto.greeting()
        _check(reply, 220, "greeting")
        extensions = yield self._ehlo(proto)
        if config.tls == "starttls":
            if "STARTTLS" not in extensions:
                raise RelayError(f"{config.host} does not offer STARTTLS")
            reply = yield proto.startTLS(creator)
            _check(reply, 220, "STARTTLS")
            # Forget everything said before TLS (RFC 3207 section 4.2).
            extensions = yield self._ehlo(proto)
        if config.username:
            yield self._authenticate(proto, extensions, config.username, password)
        return RelaySession(proto, extensions)

    @defer.inlineCallbacks
    def _ehlo(self, proto: RelayClientProtocol):
        """
        EHLO, and the extensions the relay offers. A relay that refuses
        EHLO for good (5xx: one that knows only RFC 821) gets HELO, as
        RFC 5321 4.1.1.1 and Postfix do, and offers nothing: a relay that
        must do STARTTLS or AUTH then fails for want of them.
        """
        hostname = self._hostname.encode("ascii")
        reply = yield proto.command(b"EHLO " + hostname)
        if reply.code // 100 == 5:
            refused = reply.text
            reply = yield proto.command(b"HELO " + hostname)
            try:
                _check(reply, 250, "HELO")
            except RelayError as e:
                raise RelayError(f"{e} (after EHLO was refused: {refused})") from None
            return {}
        _check(reply, 250, "EHLO")
        return _extensions(reply)

    @defer.inlineCallbacks
    def _authenticate(self, proto, extensions, username: str, password: str):
        mechanisms = extensions.get("AUTH", "").upper().split()
        user = username.encode("utf-8")
        secret = password.encode("utf-8")
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + secret)
            reply = yield proto.command(b"AUTH PLAIN " + token)
        elif "LOGIN" in mechanisms:
            reply = yield proto.command(b"AUTH LOGIN")
            if reply.code == 334:
                reply = yield proto.command(base64.b64encode(user))
            if reply.code == 334:
                reply = yield proto.command(base64.b64encode(secret))
        else:
            raise RelayError(
                f"{self._config.host} offers no AUTH mechanism this client knows "
                f"(PLAIN, LOGIN); it offers: {' '.join(mechanisms) or 'none'}"
            )
        if reply.code != 235:
            raise RelayError(f"authentication as {username} failed: {reply.text}")
