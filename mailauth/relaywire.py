"""
The wire side of the relay client: one command, one complete reply, each
reply due within the timeout of its command, and anything the relay says
out of turn a protocol error that ends the session.
"""

from __future__ import annotations

import re
from typing import IO, Any, Optional

import attrs
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorTime
from twisted.protocols import basic
from twisted.python.failure import Failure

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|$)")
# What a reply's text may not carry into log lines and bounces: controls
# other than HT, and what Python or a terminal takes for a line break.
_UNPRINTABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
#: The least time the reply to the final dot (or the last chunk) is waited
#: for, whatever C{[relay] timeout} says: the relay may scan the message
#: first (RFC 5321 4.5.3.2.6: 10 minutes; Postfix's smtp_data_done_timeout).
#: Giving up sooner makes a slow relay that then takes it get it again.
DATA_DONE_TIMEOUT = 600.0


class RelayError(Exception):
    """
    The session with the relay failed as a whole (no connection, TLS or
    authentication failure, timeout, a 421, a protocol error): every
    recipient of the message in hand is to be tried again later, but those
    the relay refused for good before (C{refused}: recipient to the 5xx
    L{RelayReply}).
    """

    refused: dict = {}


@attrs.frozen
class RelayReply:
    """
    A complete SMTP reply from the relay (the server's own replies are
    L{mailauth.replies.Reply}).

    @ivar code: the three-digit reply code.
    @ivar lines: every line as received, code included, without CRLF.
    @ivar local: no server said it: this client refused the recipient
        itself (an address the relay cannot take); C{lines} then holds
        one line, the enhanced status code and why.
    """

    code: int
    lines: tuple
    local: bool = False

    @property
    def text(self) -> str:
        """The reply on one line, as quoted in logs, the queue and bounces."""
        return " ".join(self.lines)

    def __str__(self) -> str:
        return self.text


class RelayClientProtocol(basic.LineReceiver):
    """
    The wire side of a relay session: one command, one reply, with a
    timeout on the injected clock.

    Each reply must be complete within the timeout of its command (RFC
    5321 4.5.3.2): a relay that trickles it in a byte at a time does not
    hold the session. Reply lines may end in a bare LF, which Postfix's
    smtp(8) accepts too, and control characters in them become C{?}, as
    Postfix makes them. A reply with anything behind it in the same read
    (we never pipeline, so nothing else is due) is a protocol error: the
    extra bytes would be taken for the reply to the next command.
    """

    # A CR before the LF is taken off in lineReceived.
    delimiter = b"\n"
    MAX_LENGTH = 4096
    # A TCP or TLS transport; Twisted types it as Optional[ITransport].
    transport: Any
    maxReplyLines = 200

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self._clock = clock
        self._timeout = timeout
        self._dataDoneTimeout = max(timeout, DATA_DONE_TIMEOUT)
        # What the timer now running waits for, in seconds.
        self._waitFor = timeout
        self._timer: Any = None
        self._waiting: Optional[defer.Deferred] = defer.Deferred()
        self._greeting = self._waiting
        self._lines: list = []
        self._code = 0
        self._tlsOnReply = None
        self._sendingData = False
        self._error: Optional[RelayError] = None
        self._closedWaiters: Optional[list] = []

    # Wire events

    def connectionMade(self) -> None:
        self._touch()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._error is None:
            # Every command from now on fails at once, rather than wait for
            # a reply on a connection that is gone.
            self._error = RelayError(f"connection lost: {reason.getErrorMessage()}")
        self._fire(Failure(self._error))
        waiters, self._closedWaiters = self._closedWaiters or [], None
        for waiter in waiters:
            waiter.callback(None)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail("reply line too long")

    def lineReceived(self, line: bytes) -> None:
        if self._error is not None:
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._waiting is None:
            return self._fail(f"unexpected reply: {_printable(line)}")
        if self._sendingData:
            return self._fail(f"reply while the message was being sent: {_printable(line)}")
        match = _REPLY_LINE.match(line)
        if match is None:
            return self._fail(f"malformed reply: {_printable(line)}")
        code = int(match.group(1))
        if self._lines and code != self._code:
            return self._fail(f"reply code changed within a reply: {_printable(line)}")
        self._code = code
        self._lines.append(_text(line))
        if len(self._lines) > self.maxReplyLines:
            return self._fail("reply too long")
        if match.group(2) == b"-":
            return
        reply = RelayReply(code, tuple(self._lines))
        self._lines = []
        creator, self._tlsOnReply = self._tlsOnReply, None
        if creator is not None and code == 220:
            # D31: anything already buffered behind the 220 was sent in
            # plaintext and would be read as if it came through TLS.
            if self._buffer:
                return self._fail("data after the reply to STARTTLS (injection attempt?)")
            self.transport.startTLS(creator)
        # From here the timer measures how long the session idles.
        self._touch()
        # What follows the reply in the same read is no reply to the next
        # command, which is sent only now: the reply stands (the relay may
        # have taken the message), and then the session ends.
        junk = self._buffer
        self._fire(reply)
        if junk:
            self._fail(f"unexpected data after a reply: {_printable(junk)}")

    @property
    def broken(self) -> bool:
        """The session failed, or the connection is gone: no command can succeed."""
        return self._error is not None

    # Commands

    def greeting(self) -> defer.Deferred:
        """
        @return: a Deferred for the server's greeting (it may have fired
            already), failing with L{RelayError}. Call it once.
        """
        return self._greeting

    def command(self, line: bytes) -> defer.Deferred:
        """
        Send C{line} and return a Deferred for its L{RelayReply}.
        """
        if self._error is not None:
            return defer.fail(self._error)
        self._waiting = defer.Deferred()
        self.transport.write(line + b"\r\n")
        self._touch()
        return self._waiting

    def startTLS(self, creator) -> defer.Deferred:
        """
        Send STARTTLS and begin the handshake with C{creator} on a 220.
        """
        self._tlsOnReply = creator
        return self.command(b"STARTTLS")

    def sendMessage(self, message: IO[bytes]) -> defer.Deferred:
        """
        Send the stored message C{message} verbatim and the final C{.CRLF};
        return a Deferred for the reply.
        """
        if self._error is not None:
            return defer.fail(self._error)
        waiting: defer.Deferred[RelayReply] = defer.Deferred()
        self._waiting = waiting
        self._sendingData = True

        def sent(_):
            self._sendingData = False
            if self._error is None:
                self.transport.write(b".\r\n")
                self._touch(self._dataDoneTimeout)

        def failed(reason):
            # The connection went away under the producer, which
            # connectionLost reports; or reading the file failed.
            self._sendingData = False
            if self._error is None and self.transport.connected:
                self._fail(f"cannot send the message: {reason.getErrorMessage()}")

        sender = basic.FileSender()
        sender.beginFileTransfer(message, self.transport, self._progress).addCallbacks(sent, failed)
        return waiting

    def sendChunk(self, data: bytes, last: bool) -> defer.Deferred:
        """
        Send C{BDAT} with C{data} as its chunk (RFC 3030); return a Deferred
        for the reply.
        """
        if self._error is not None:
            return defer.fail(self._error)
        self._waiting = defer.Deferred()
        command = b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"")
        self.transport.write(command + data)
        self._touch(self._dataDoneTimeout if last else None)
        return self._waiting

    def abort(self) -> defer.Deferred:
        """
        Drop the connection without a goodbye.

        @return: a Deferred that fires once the connection is gone.
        """
        self._fail("connection aborted")
        return self.whenClosed()

    def whenClosed(self) -> defer.Deferred:
        """@return: a Deferred that fires with L{None} once disconnected."""
        if self._closedWaiters is None:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._closedWaiters.append(waiter)
        return waiter

    # Internals

    def _progress(self, chunk: bytes) -> bytes:
        self._touch()
        return chunk

    def _touch(self, seconds: Optional[float] = None) -> None:
        """(Re)start the timer: C{seconds}, or C{[relay] timeout}, from now."""
        if self._error is not None:
            return
        self._waitFor = self._timeout if seconds is None else seconds
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._waitFor)
        else:
            self._timer = self._clock.callLater(self._waitFor, self._timedOut)

    def _timedOut(self) -> None:
        self._timer = None
        self._fail(f"no complete reply within {self._waitFor:g} seconds")

    def _fail(self, why: str) -> None:
        if self._error is None:
            self._error = RelayError(why)
            self._fire(Failure(self._error))
        if self.transport is not None:
            self.transport.abortConnection()

    def _fire(self, result) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is None:
            pass
        elif isinstance(result, Failure):
            waiting.errback(result)
        else:
            waiting.callback(result)


def _text(line: bytes) -> str:
    """A reply line as text for logs and bounces: UTF-8 where it is, no control characters."""
    return _UNPRINTABLE.sub("?", line.decode("utf-8", "replace"))


def _printable(line: bytes) -> str:
    return _text(line[:200])
