"""
The ESMTP submission session: framing, the command state machine, AUTH and
DATA, with every reply from the reply table of PRODUCT.md.

twisted.mail's C{ESMTP} server class has the defects listed in
docs/twisted-defects.rst (AUTH before TLS, commands pipelined after STARTTLS,
no reset on STARTTLS, DATA lines over 16 KiB run as commands, unbounded
buffers, crashes on malformed AUTH, replies out of order under pipelining,
per-recipient body copies, 550 for transient failures), so the protocol is
written here on L{Protocol}. twisted.mail's seams are kept: the factory holds
a cred L{Portal}; the avatar is an L{IMessageDeliveryFactory}; recipients
are L{smtp.User}s and addresses L{smtp.Address}es. The AUTH command is
L{mailauth.smtpauth}, MAIL/RCPT/DATA/BDAT L{mailauth.transaction}, HELO,
EHLO, STARTTLS and the rest L{mailauth.sessioncommands}, and the session's
log lines L{mailauth.sessionlog} (all parts of the one session class); the
DATA and BDAT readers are L{mailauth.dataread}, the address grammar and the
MAIL and RCPT parameters (SMTPUTF8, DSN) L{mailauth.addresses}, and every
reply is named in L{mailauth.replies}.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Callable, Optional, cast

from twisted.internet import defer, interfaces, protocol
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from mailauth import replies, sasl
from mailauth.addresses import (
    MailParameters,
)
from mailauth.dataread import ChunkReader
from mailauth.metrics import Metrics
from mailauth.replies import Reply, ReplyLike
from mailauth.sessioncommands import SessionCommands
from mailauth.sessionlog import SessionLog
from mailauth.smtpauth import AuthCommands
from mailauth.throttle import clientAddress
from mailauth.transaction import MailTransaction

log = Logger(namespace="mailauth.esmtp")

# RFC 4954 section 4: an AUTH line may be 12288 octets; every command line
# shares this cap, a longer one is refused and skipped without buffering it.
MAX_LINE = 12288
# Stop reading from a client that pipelines this much while a reply waits.
PIPELINE_HOLD = 65536


# Control characters other than tab (DEL included), refused in command lines.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# The commands whose arguments may hold UTF-8 (RFC 6531 3.3, 3.7.4.2).
_UTF8_COMMANDS = (b"MAIL ", b"RCPT ", b"VRFY ")


class _TLSState:
    """What the session knows about TLS on its connection."""

    def __init__(self, mode: str, active: bool) -> None:
        self.mode = mode
        self.active = active
        #: The protocol and cipher, for each message's Received header
        #: (asked of OpenSSL once: they hold for the connection's life).
        self.description: Optional[str] = None


@implementer(
    interfaces.IPushProducer, interfaces.IHandshakeListener, interfaces.IHalfCloseableProtocol
)
class SubmissionProtocol(
    SessionCommands, AuthCommands, MailTransaction, SessionLog, protocol.Protocol
):
    """
    One SMTP session. Commands are taken one at a time: while one waits for
    a Deferred (a login, a validator, the message commit) nothing more is
    read from the buffer, so pipelined replies come back in order.

    It is also the producer of its replies: while the transport cannot send
    them (a client that pipelines commands and never reads the answers) no
    more commands are taken and nothing more is read, so the replies
    waiting in memory stay bounded.

    @ivar session: the session ID, random, in every line it logs.
    """

    COMMAND, DATA, BDAT, AUTH, CLOSED = "command", "data", "bdat", "auth", "closed"

    # A TCP or TLS transport (write, pause, startTLS, getHandle...); Twisted
    # types it as Optional[ITransport], which names none of those.
    transport: Any

    def __init__(self, factory: SubmissionFactory) -> None:
        self.factory = factory
        self.settings = factory.settings
        self.host = factory.settings.hostname.encode("ascii")
        self.clock = factory.reactor
        self._buffer = b""
        self._mode = self.COMMAND
        self._busy = False
        self._paused = False
        self._writeBlocked = False
        # The client shut down its side (FIN, on a connection without TLS).
        self._inputEnded = False
        self._discarding = False
        self._timer = None
        self._dataDeadline: Any = None
        self._errors = 0
        # NOOP, RSET, VRFY, HELP, repeated HELO or EHLO and RCPT past
        # max_recipients since the last message accepted.
        self._junkCommands = 0
        self._authFailures = 0
        self._peer = "unknown"
        self._counted = False
        self._tarpitCall = None
        self.session = newSessionID()
        self._verb = "-"
        self._accepted = 0
        self._handshaken = False
        self.tls = _TLSState(factory.tlsMode, factory.tlsMode == "implicit")
        self._resetSession()

    # -- state -------------------------------------------------------------

    def _resetSession(self) -> None:
        """Forget everything negotiated: at start and after STARTTLS (RFC 3207 4.2)."""
        self._helo: Optional[str] = None
        self.login: Optional[str] = None
        self._avatar = None
        self._logout: Optional[Callable[[], None]] = None
        self._mechanism: Any = None
        # A BDAT transaction failed: chunks already pipelined are discarded
        # without counting as errors (RFC 3030 2) until MAIL, RSET or EHLO.
        self._bdatFailed = False
        self._resetTransaction()

    def _resetTransaction(self) -> None:
        self._delivery: Any = None
        self._sender: Optional[smtp.Address] = None
        self._hasSender = False
        self._recipients: list = []
        self._mailParams = MailParameters()
        # The transaction's content reader: a DataReader or a ChunkReader.
        self._reader: Any = None
        # The reader of the BDAT chunk being read (the transaction's, or
        # one that discards it) and the reply due when a discarded one ends.
        self._chunk: Optional[ChunkReader] = None
        self._chunkVerdict: Optional[ReplyLike] = None
        self._messages: list = []
        self._contentStarted = False
        self._writeFailure: Optional[Failure] = None

    def _heloPair(self) -> tuple:
        """The C{helo} argument of twisted.mail's delivery interfaces: (name bytes, client IP)."""
        return ((self._helo or "").encode("ascii"), self._peer)

    @property
    def peerHost(self) -> str:
        return self._peer

    def tlsDescription(self) -> Optional[str]:
        """C{"TLSv1.3 with cipher X"} for the Received header, or L{None} without TLS."""
        if not self.tls.active:
            return None
        if self.tls.description is None:
            try:
                handle = self.transport.getHandle()
                self.tls.description = (
                    f"{handle.get_protocol_version_name()} with cipher {handle.get_cipher_name()}"
                )
            except Exception:
                return "TLS"
        return self.tls.description

    # -- connection --------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self._peer = clientAddress(getattr(peer, "host", None) or "local")
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, NotImplementedError, OSError):
            pass
        # Nothing the client sends is read until it is admitted and greeted
        # (the throttle may have to ask a shared counter store first).
        self._busy = True
        self.transport.registerProducer(self, True)
        self._setTimeout(self.settings.timeout)
        d = self.factory.admit(self._peer)
        d.addCallback(self._admitted)
        d.addErrback(self._admitFailed)

    def _admitted(self, refusal: Optional[Reply]) -> None:
        if self._mode == self.CLOSED:
            # The client left while it waited.
            if refusal is None:
                self.factory.release(self._peer)
            return
        if refusal is not None:
            self._logConnectionRefused(refusal)
            self._mode = self.CLOSED
            self._cancelTimeout()
            self._send(refusal)
            self.transport.unregisterProducer()
            self.transport.loseConnection()
            # On implicit TLS the 421 waits for the client's handshake, and
            # the connection with it: one that never finishes (or starts)
            # its handshake is cut after the timeout, else a refused client
            # could hold any number of connections for ever.
            self._timer = self.clock.callLater(
                self.settings.timeout, self.transport.abortConnection
            )
            return
        self._counted = True
        self._logConnect()
        self._send(replies.GREETING.format(hostname=self.settings.hostname))
        self._busy = False
        if self._buffer or self._inputEnded:
            # Sent before the greeting: read now, in order. (Only then: a
            # TLS transport may pause its producer until the handshake ends.)
            self._processBuffer()

    def _admitFailed(self, f: Failure) -> None:
        log.failure(
            "admitting client=[{client}] failed session={session}",
            f,
            client=self._peer,
            session=self.session,
        )
        if self._mode != self.CLOSED:
            self._mode = self.CLOSED
            self._cancelTimeout()
            self.transport.unregisterProducer()
            self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        """The TLS handshake (implicit TLS, or after STARTTLS) succeeded."""
        self._handshaken = True

    @property
    def inHandshake(self) -> bool:
        """Whether TLS has started on the connection and its handshake has not ended."""
        return self.tls.active and not self._handshaken

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._logHandshakeFailure(reason)
        self._mode = self.CLOSED
        self._cancelTimeout()
        self._cancelDataDeadline()
        if self._tarpitCall is not None and self._tarpitCall.active():
            self._tarpitCall.cancel()
        self._abortMessages()
        if self._logout is not None:
            self._logout()
            self._logout = None
        if self._counted:
            self.factory.release(self._peer)
            self._counted = False
            self._logDisconnect()

    def readConnectionLost(self) -> None:
        """
        The client shut down its sending side (a half-close: C{printf ... |
        nc -N}, a script's C{shutdown(SHUT_WR)}) and may still read. Every
        command it sent before is answered, the 250 of a message being
        stored included, and then the connection is closed, as Postfix
        does. (Over TLS, Twisted's TLS layer takes a FIN for the end of
        the connection: this is for connections without TLS.)
        """
        self._inputEnded = True
        if self._mode != self.CLOSED and not self._busy:
            self._processBuffer()

    def writeConnectionLost(self) -> None:
        # Only after our own half-close, which mailauth never makes.
        pass

    def _close(self, reply: Optional[ReplyLike]) -> None:
        """Send C{reply} (if any), end the session and close once it is written."""
        if self._mode == self.CLOSED:
            return
        if reply is not None:
            self._send(reply)
        self._mode = self.CLOSED
        self._cancelDataDeadline()
        self._abortMessages()
        self.transport.unregisterProducer()
        self._cancelTimeout()
        if self.inHandshake:
            # A TLS handshake never finished (a client stalled in it, on
            # implicit TLS or after STARTTLS): Twisted's TLS layer would
            # hold the replies, and the connection, until it does, which
            # costs another timeout; no reply can reach such a client.
            self.transport.abortConnection()
            return
        self.transport.loseConnection()
        # A client that does not read keeps the connection open while our
        # last replies wait to be sent: one more timeout, then it is cut.
        self._timer = self.clock.callLater(self.settings.timeout, self.transport.abortConnection)

    # -- IPushProducer: the transport's send buffer is full, or drained ----

    def pauseProducing(self) -> None:
        self._writeBlocked = True

    def resumeProducing(self) -> None:
        self._writeBlocked = False
        if self._mode != self.CLOSED and not self._busy:
            self._processBuffer()

    def stopProducing(self) -> None:
        pass

    # -- timeouts ----------------------------------------------------------

    def _setTimeout(self, seconds: float) -> None:
        # Called for every command line and DATA read: moving the live
        # timer is a few attribute writes, a new one a heap push and a
        # cancelled call left for the reactor to skip.
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(seconds)
        else:
            self._timer = self.clock.callLater(seconds, self._timedOut)

    def _cancelTimeout(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timedOut(self) -> None:
        self._timer = None
        if self.inHandshake:
            # Stalled in its TLS handshake: no 421 can reach it (_close
            # cuts the connection), and it never spoke SMTP.
            self._logHandshakeFailed("timed out")
            self._close(None)
            return
        self._hangUp("data_timeout" if self._mode in (self.DATA, self.BDAT) else "timeout")
        self._close(replies.TIMEOUT.format(hostname=self.settings.hostname))

    # The data timeout restarts at every read, so a client that trickles a
    # byte at a time would hold its slot forever: one DATA also gets
    # max_data_time in all, from its 354 to its final dot; the BDAT chunks
    # of one message, from the first to the last.

    def _startDataDeadline(self) -> None:
        """
        Start max_data_time for a message (or for chunks read only to be
        discarded), in place of any that runs: DATA may follow a refused
        BDAT chunk of the same transaction, whose deadline would otherwise
        be lost, still running, and cut the session later.
        """
        self._cancelDataDeadline()
        self._dataDeadline = self.clock.callLater(self.settings.max_data_time, self._dataTooSlow)

    def _cancelDataDeadline(self) -> None:
        if self._dataDeadline is not None and self._dataDeadline.active():
            self._dataDeadline.cancel()
        self._dataDeadline = None

    def _dataTooSlow(self) -> None:
        self._dataDeadline = None
        self._hangUp("max_data_time")
        self._close(replies.DATA_TOO_SLOW.format(hostname=self.settings.hostname))

    # -- input -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._mode == self.CLOSED:
            return
        self._buffer += data
        self._processBuffer()

    def _processBuffer(self) -> None:
        """
        Work through buffered input: command lines one at a time, and DATA
        in bulk. Stops while a command waits for a Deferred.
        """
        while not (self._busy or self._writeBlocked) and self._mode != self.CLOSED:
            if self._mode == self.DATA:
                if not self._buffer:
                    break
                data, self._buffer = self._buffer, b""
                self._setTimeout(self.settings.data_timeout)
                rest = self._reader.feed(data)
                if rest is None:
                    break
                self._buffer = rest
                self._mode = self.COMMAND
                self._run(self._endData)
                continue
            if self._mode == self.BDAT:
                chunk = cast(ChunkReader, self._chunk)
                if chunk.remaining and not self._buffer:
                    break
                data, self._buffer = self._buffer, b""
                if data:
                    self._setTimeout(self.settings.data_timeout)
                rest = chunk.feed(data)
                if rest is None:
                    break
                self._buffer = rest
                self._mode = self.COMMAND
                self._run(self._endChunk)
                continue
            end = self._buffer.find(b"\r\n")
            # A final CR is kept: its LF may arrive in the next read.
            danglingCR = b"\r" if self._buffer.endswith(b"\r") else b""
            if self._discarding:
                if end < 0:
                    self._buffer = danglingCR
                    break
                self._buffer = self._buffer[end + 2 :]
                self._discarding = False
                continue
            if end < 0 and len(self._buffer) - len(danglingCR) <= MAX_LINE:
                break
            if end < 0 or end > MAX_LINE:
                # Refuse the line and skip to its end, holding none of it.
                authLine = self._mode == self.AUTH or self._buffer[:5].upper() == b"AUTH "
                if end < 0:
                    self._buffer = danglingCR
                    self._discarding = True
                else:
                    self._buffer = self._buffer[end + 2 :]
                self._lineTooLong(authLine)
                continue
            line = self._buffer[:end]
            self._buffer = self._buffer[end + 2 :]
            self._setTimeout(self.settings.timeout)
            if self._mode == self.AUTH:
                self._run(self._authResponse, line)
            else:
                self._run(self._command, line)
        if self._mode == self.CLOSED:
            return
        if self._inputEnded:
            # Nothing more can come: once every complete command is
            # answered, close (a message cut short is thrown away).
            if not (self._busy or self._writeBlocked):
                self._close(None)
            return
        hold = self._writeBlocked or (self._busy and len(self._buffer) > PIPELINE_HOLD)
        if hold and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        elif not hold and self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def _lineTooLong(self, authLine: bool) -> None:
        if authLine:
            self._mode = self.COMMAND
            self._mechanism = None
            self._error(replies.AUTH_LINE_TOO_LONG)
        else:
            self._error(replies.LINE_TOO_LONG)

    def _run(self, handler, *args) -> None:
        """
        Run one command handler; if it returns a Deferred, hold every later
        command until it fires. Any exception becomes a 451 reply and a
        logged failure, never an unhandled error.
        """
        try:
            result = handler(*args)
        except Exception:
            self._internalError(Failure())
            return
        if isinstance(result, defer.Deferred):
            self._busy = True
            result.addErrback(self._internalError)
            result.addBoth(self._resume)

    def _resume(self, ignored) -> None:
        self._busy = False
        if self._mode != self.CLOSED:
            self._processBuffer()

    def _internalError(self, f: Failure) -> None:
        log.failure(
            "internal error in session: client=[{client}] session={session}",
            f,
            client=self._peer,
            session=self.session,
        )
        if self._mode == self.CLOSED:
            return
        self._mode = self.COMMAND
        self._mechanism = None
        self._abortMessages()
        self._resetTransaction()
        self._send(replies.INTERNAL_ERROR)

    # -- output ------------------------------------------------------------

    def _send(self, reply: ReplyLike) -> None:
        metric = getattr(reply, "metric", None)
        if metric is not None:
            self._countRefusal(metric, reply)
        # No reply line longer than 512 octets, whatever was echoed into it
        # (RFC 5321 4.5.3.1.5).
        text = replies.cut(reply.code, reply.text)
        self.transport.write(f"{reply.code} {text}\r\n".encode("ascii", "replace"))

    def _sendLines(self, code: int, lines: list) -> None:
        out = [f"{code}-{line}\r\n" for line in lines[:-1]]
        out.append(f"{code} {lines[-1]}\r\n")
        self.transport.write("".join(out).encode("ascii"))

    def _error(self, reply: ReplyLike) -> None:
        """Send an error reply; past C{max_errors} say 421 and hang up."""
        self._errors += 1
        self._send(reply)
        self._endIfTooManyErrors("max_errors")

    def _endIfTooManyErrors(self, reason: str) -> bool:
        """At C{max_errors} errors: log why, say 421 and hang up. Whether it did."""
        if self._errors < self.settings.max_errors:
            return False
        self._hangUp(reason)
        self._close(replies.TOO_MANY_ERRORS)
        return True

    # -- commands ----------------------------------------------------------

    def _command(self, line: bytes):
        if b"\n" in line or b"\r" in line:
            return self._error(replies.BARE_NEWLINE_IN_COMMAND)
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            # UTF-8 only in the addresses and parameters of MAIL and RCPT
            # (and VRFY's argument), RFC 6531 3.3; the address parser then
            # refuses it without SMTPUTF8.
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                return self._error(replies.BAD_UTF8)
            if line[:5].upper() not in _UTF8_COMMANDS:
                return self._error(replies.NON_ASCII_COMMAND)
        if _CONTROL.search(text) is not None:
            return self._error(replies.CONTROL_IN_COMMAND)
        verb, _, arg = text.partition(" ")
        handler = getattr(self, "do_" + verb.upper(), None) if verb.isalpha() else None
        if handler is None:
            return self._error(replies.UNKNOWN_COMMAND)
        self._verb = verb.upper()
        return handler(arg.strip(" "))


def newSessionID() -> str:
    """A new session ID: 12 random hexadecimal digits, short to read, enough never to repeat."""
    return secrets.token_hex(6)


class SubmissionFactory(protocol.Factory):
    """
    Builds sessions for one listener, holding what they share: the portal,
    the settings, the TLS context, the throttle, the connection counts and
    the metrics.

    @ivar anonymous: the L{IMessageDeliveryFactory} used by sessions that did
        not authenticate (only on C{auth = optional | none} listeners).
    @ivar name: the listener's name (C{[listener:NAME]}), in log lines and
        metrics.
    """

    # Twisted's "Starting factory <...object at 0x...>" names no listener;
    # mailauth.tap logs each listener once it listens.
    noisy = False

    def __init__(
        self,
        *,
        settings,
        portal,
        anonymous,
        mechanisms: tuple,
        authMode: str,
        tlsMode: str,
        tlsContext,
        plaintextRequiresTLS: bool,
        throttle,
        connections,
        failuresPerSession: int,
        postmasterDomain: str,
        reactor,
        saslTable: Optional[dict] = None,
        metrics: Optional[Metrics] = None,
        name: str = "submission",
    ) -> None:
        self.settings = settings
        self.portal = portal
        self.anonymous = anonymous
        self.mechanisms = mechanisms
        self.authMode = authMode
        self.tlsMode = tlsMode
        self.tlsContext = tlsContext
        self.plaintextRequiresTLS = plaintextRequiresTLS
        self.throttle = throttle
        self.connections = connections
        self.failuresPerSession = failuresPerSession
        self.postmasterDomain = postmasterDomain
        self.reactor = reactor
        #: Mechanism name -> entry called with a L{sasl.SASLContext}.
        self.saslTable = sasl.MECHANISMS if saslTable is None else saslTable
        self.metrics = metrics if metrics is not None else Metrics()
        self.name = name

    def logPrefix(self) -> str:
        """How Twisted names the listener in its C{... starting on PORT} line."""
        return f"listener:{self.name}"

    def __repr__(self) -> str:
        return f"<SubmissionFactory listener:{self.name}>"

    def buildProtocol(self, addr) -> SubmissionProtocol:
        p = SubmissionProtocol(self)
        p.factory = self
        return p

    def admit(self, host: str) -> defer.Deferred[Optional[Reply]]:
        """
        Count a new connection from C{host} (with workers, the parent
        counts: the answer may come later), and ask the throttle whether
        C{host} is blocked, both at once.

        @return: a Deferred firing with L{None} to serve it (the caller
            L{release}s it later), or with the 421 that refuses it.
        """

        def notKnown(f: Failure) -> bool:
            # The counter stores never fail; were one to, serve the client.
            log.failure("could not tell whether client=[{client}] is blocked", f, client=host)
            return False

        def answer(blocked: bool, refusal: Optional[Reply]) -> Optional[Reply]:
            if not blocked:
                return refusal
            if refusal is None:
                self.connections.release(host)
            return replies.BLOCKED

        blocked = self.throttle.isBlocked(host).addErrback(notKnown)
        d = defer.maybeDeferred(self.connections.acquire, host)
        return d.addCallback(lambda refusal: blocked.addCallback(answer, refusal))

    def release(self, host: str) -> None:
        self.connections.release(host)
