"""
The mail transaction of the session: MAIL, RCPT, DATA and BDAT, handing
the message to the avatar's delivery and answering with what it stored.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Optional, cast

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailauth import replies
from mailauth.addresses import (
    MailParameters,
    Recipient,
    addressText,
    parseMailParameters,
    parsePath,
    parseRcptParameters,
    splitArguments,
)
from mailauth.dataread import ChunkReader, DataReader
from mailauth.replies import ReplyLike, SMTPReply
from mailauth.userdb import UserDatabaseUnavailable

log = Logger(namespace="mailauth.esmtp")

# BDAT chunk-size [SP "LAST"] (RFC 3030 2).
_BDAT = re.compile(r"([0-9]{1,20})(?: (LAST))?", re.IGNORECASE)


class MailTransaction:
    """
    MAIL, RCPT, DATA and BDAT of L{mailauth.esmtp.SubmissionProtocol},
    whose state and output methods it uses.
    """

    # The session state this part reads and sets (typed where the session
    # sets it first, in mailauth.esmtp).
    _bdatFailed: Any
    _chunk: Any
    _chunkVerdict: Any
    _contentStarted: Any
    _dataDeadline: Any
    _delivery: Any
    _hasSender: Any
    _mailParams: Any
    _messages: Any
    _mode: Any
    _reader: Any
    _sender: Any
    _writeFailure: Any
    _accepted: Any

    if TYPE_CHECKING:
        # A mixin of SubmissionProtocol: its other attributes are the session's.
        def __getattr__(self, name: str) -> Any: ...

    def do_MAIL(self, arg: str):
        if self._helo is None:
            return self._error(replies.BAD_SEQUENCE.format(why="send HELO/EHLO first"))
        if self._hasSender:
            return self._error(replies.BAD_SEQUENCE.format(why="nested MAIL command"))
        avatar = self._avatar
        if avatar is None:
            if self.factory.authMode == "required":
                return self._error(replies.AUTH_REQUIRED)
            avatar = self.factory.anonymous
        try:
            path, options = splitArguments(arg, "FROM")
            params = parseMailParameters(options, self.settings.max_message_size)
            sender = parsePath(path, allowNull=True, utf8=params.smtputf8)
        except SMTPReply as e:
            return self._error(e)
        self._bdatFailed = False
        # A new transaction: the time of chunks discarded before it ends.
        self._cancelDataDeadline()
        delivery = avatar.getMessageDelivery()
        delivery.session = self.session
        d = defer.maybeDeferred(delivery.validateFrom, self._heloPair(), sender)
        d.addCallbacks(self._senderOk, self._validationFailed, (delivery, params))
        return d

    def _senderOk(self, sender, delivery, params: MailParameters) -> None:
        if self._mode == self.CLOSED:
            return
        self._delivery = delivery
        self._sender = sender
        self._mailParams = params
        self._hasSender = True
        self._send(replies.SENDER_OK)

    def _validationFailed(self, f: Failure, *ignored) -> None:
        if self._mode == self.CLOSED:
            return
        if f.check(SMTPReply):
            self._error(cast(SMTPReply, f.value))
            return
        if f.check(UserDatabaseUnavailable):
            # An outage, which the user database logs once: a refusal line
            # per recipient, not a traceback.
            self._send(replies.USER_DATABASE_UNAVAILABLE)
            return
        log.failure(
            "address validation failed: client=[{client}] session={session}",
            f,
            client=self._peer,
            session=self.session,
        )
        self._send(replies.TEMPORARY_FAILURE)

    def do_RCPT(self, arg: str):
        if not self._hasSender:
            return self._error(replies.BAD_SEQUENCE.format(why="need MAIL command"))
        if self._reader is not None:
            return self._error(replies.BAD_SEQUENCE.format(why="RCPT after BDAT"))
        utf8 = self._mailParams.smtputf8
        try:
            # The path first: a malformed one is a 501 5.1.3 whatever follows it.
            path, options = splitArguments(arg, "TO")
            if path.lower() == "<postmaster>":
                path = f"<postmaster@{self.factory.postmasterDomain}>"
            recipient = parsePath(path, allowNull=False, utf8=utf8)
            params = parseRcptParameters(options, utf8)
        except SMTPReply as e:
            return self._error(e)
        if len(self._recipients) >= self.settings.max_recipients:
            # No error: the client is to send the rest in another
            # transaction (RFC 5321 4.5.3.1.10), and one that pipelined
            # them all must not be cut off at max_errors, losing the
            # recipients accepted. Past junk_command_limit they count as
            # errors, as Postfix counts those past its overshoot limit.
            if not self._junk():
                self._send(replies.TOO_MANY_RECIPIENTS)
            return None
        user = Recipient(
            recipient, self._heloPair(), self, self._sender or b"", params, self._mailParams
        )
        d = defer.maybeDeferred(self._delivery.validateTo, user)
        d.addCallbacks(self._recipientOk, self._validationFailed, (user,))
        return d

    def _recipientOk(self, messageFactory, user) -> None:
        if self._mode == self.CLOSED:
            return
        self._recipients.append((user, messageFactory))
        self._send(replies.RECIPIENT_OK)

    def do_DATA(self, arg: str):
        if not self._hasSender:
            return self._error(replies.BAD_SEQUENCE.format(why="need MAIL command"))
        if self._reader is not None:
            return self._error(replies.BAD_SEQUENCE.format(why="DATA after BDAT"))
        if not self._recipients:
            return self._error(replies.NO_VALID_RECIPIENTS)
        if arg:
            return self._error(replies.SYNTAX.format(usage="DATA"))
        header = self._startMessage()
        self._reader = DataReader(self._writeContent, self.settings.max_message_size)
        self._mode = self.DATA
        self._setTimeout(self.settings.data_timeout)
        self._startDataDeadline()
        self._send(replies.START_DATA)
        self._writeMessage(header)

    def _startMessage(self) -> bytes:
        """
        Make the message objects of the transaction (one per distinct sink:
        a delivery that hands the same IMessage to every recipient gets the
        body once, not N times).

        @return: the C{Received:} header to write first.
        """
        messages: list = []
        for _user, messageFactory in self._recipients:
            message = messageFactory()
            if not any(message is m for m in messages):
                messages.append(message)
        self._messages = messages
        users = [user for user, _ in self._recipients]
        return self._delivery.receivedHeader(self._heloPair(), self._sender, users)

    def do_BDAT(self, arg: str):
        """
        A chunk of the message (RFC 3030): its octets are read whatever the
        verdict, so that none of them is ever taken for a command; the
        reply comes once the chunk is read.
        """
        m = _BDAT.fullmatch(arg)
        if m is None:
            # How many octets follow is unknown, and reading them as
            # commands would run message content: hang up.
            self._hangUp("bad_bdat")
            return self._close(replies.BAD_BDAT)
        size, last = int(m.group(1)), m.group(2) is not None
        verdict: Optional[ReplyLike] = None
        if self._bdatFailed:
            verdict = replies.BAD_SEQUENCE.format(why="chunk discarded after an earlier error")
        elif not self._hasSender:
            verdict = replies.BAD_SEQUENCE.format(why="need MAIL command")
        elif not self._recipients:
            verdict = replies.NO_VALID_RECIPIENTS
        if verdict is None and self._reader is None:
            try:
                header = self._startMessage()
            except Exception:
                # The chunk must still be read (never run as commands).
                log.failure(
                    "could not store a message: client=[{client}] session={session}",
                    client=self._peer,
                    session=self.session,
                )
                self._abortMessages()
                self._resetTransaction()
                self._bdatFailed = True
                verdict = replies.STORAGE_FAILED
            else:
                self._reader = ChunkReader(self._writeContent, self.settings.max_message_size)
                # max_data_time holds for all the chunks of a message.
                self._startDataDeadline()
                self._writeMessage(header)
        if verdict is not None:
            chunk = ChunkReader(lambda data: None, 0)
            if self._dataDeadline is None:
                # Chunks read only to be discarded get max_data_time in
                # all too, from the first until MAIL, RSET or EHLO starts
                # afresh: else one could trickle in for ever, or "BDAT 0"
                # repeat for ever (neither is an error, RFC 3030 2).
                self._startDataDeadline()
        else:
            chunk = self._reader
        chunk.begin(size, last)
        self._chunk, self._chunkVerdict = chunk, verdict
        self._mode = self.BDAT
        self._setTimeout(self.settings.data_timeout)

    def _endChunk(self):
        chunk, verdict = self._chunk, self._chunkVerdict
        self._chunk = self._chunkVerdict = None
        self._setTimeout(self.settings.timeout)
        if verdict is not None:
            if self._bdatFailed:
                self._send(verdict)
                return None
            # A refused chunk fails the transaction as a broken one does:
            # the chunks a client pipelined behind it are discarded without
            # counting as errors (RFC 3030 2), until MAIL, RSET or EHLO.
            self._bdatFailed = True
            return self._error(verdict)
        reader = cast(ChunkReader, chunk)
        if reader.failed or self._writeFailure is not None or reader.last:
            failed = reader.failed or self._writeFailure is not None
            result = self._endMessage()
            self._bdatFailed = failed
            return result
        self._send(replies.CHUNK_RECEIVED.format(size=reader.size))
        return None

    def _writeContent(self, chunk: bytes) -> None:
        """
        Write what the client sent. Content whose first line begins with a
        space or a tab would continue mailauth's own C{Received:} field, so
        that a client could write into the server's trace (an
        "authenticated as" of its choosing): an empty line goes first, and
        the whole content is the body, as Postfix's smtpd does.
        """
        if not self._contentStarted and chunk:
            self._contentStarted = True
            if chunk[:1] in (b" ", b"\t"):
                self._writeMessage(b"\r\n")
        self._writeMessage(chunk)

    def _writeMessage(self, chunk: bytes) -> None:
        if self._writeFailure is not None:
            return
        try:
            for message in self._messages:
                message.write(chunk)
        except Exception:
            self._writeFailure = Failure()

    def _endData(self):
        self._cancelDataDeadline()
        self._setTimeout(self.settings.timeout)
        return self._endMessage()

    def _endMessage(self):
        """The whole message was read (or a BDAT chunk broke a rule): store it or refuse it."""
        self._cancelDataDeadline()
        reader, failure = self._reader, self._writeFailure
        if reader.bareNewline or reader.nul or reader.tooBig or failure is not None:
            self._abortMessages()
            self._resetTransaction()
            if reader.bareNewline:
                return self._error(replies.BARE_NEWLINE)
            if reader.nul:
                return self._error(replies.NUL_IN_MESSAGE)
            if reader.tooBig:
                return self._error(replies.TOO_BIG)
            return self._storageFailed(cast(Failure, failure))
        started = self.clock.seconds()
        messages, self._messages = self._messages, []
        d = defer.gatherResults(
            [defer.maybeDeferred(m.eomReceived) for m in messages], consumeErrors=True
        )
        d.addCallbacks(
            self._messageStored, self._messageFailed, (started,), errbackArgs=(messages,)
        )
        return d

    def _messageStored(self, ids: list, started: float) -> None:
        log.info(
            "message accepted: client=[{client}] login=<{login}> id={id} from=<{sender}> "
            "recipients={count} size={size} session={session}",
            client=self._peer,
            login=self.login or "",
            id=ids[0],
            sender=addressText(self._sender),
            count=len(self._recipients),
            size=self._reader.size,
            session=self.session,
        )
        self._accepted += 1
        # Postfix's limits are on errors and junk commands "without
        # delivering mail": a message accepted starts both counts again.
        self._errors = 0
        self._junkCommands = 0
        self.factory.metrics.messageAccepted(len(self._recipients), self.clock.seconds() - started)
        self._resetTransaction()
        if self._mode != self.CLOSED:
            self._send(replies.QUEUED.format(id=ids[0]))

    def _messageFailed(self, f: Failure, messages: list) -> None:
        if isinstance(f.value, defer.FirstError):
            f = f.value.subFailure
        for m in messages:
            m.connectionLost()
        self._resetTransaction()
        if self._mode == self.CLOSED:
            return
        if f.check(SMTPReply):
            self._send(cast(SMTPReply, f.value))
            return
        self._storageFailed(f)

    def _storageFailed(self, f: Failure) -> None:
        """
        Answer a message that could not be stored: with the store's own
        reply if it chose one (the realm logs why), 451 or 452 for an
        C{OSError} (a warning with the path and errno: a full disk or a
        folder the daemon may not write is the operator's to fix, not a
        bug), and 451 with the traceback logged for anything else.
        """
        if f.check(SMTPReply):
            self._send(cast(SMTPReply, f.value))
        elif f.check(OSError):
            e = cast(OSError, f.value)
            log.warn(
                "could not store a message from client=[{client}]: {path}: {error} "
                "(errno {errno}) session={session}",
                client=self._peer,
                path=e.filename or "-",
                error=e.strerror or e,
                errno=e.errno,
                session=self.session,
            )
            self._send(replies.storageFailure(e))
        else:
            log.failure(
                "could not store a message: client=[{client}] session={session}",
                f,
                client=self._peer,
                session=self.session,
            )
            self._send(replies.STORAGE_FAILED)

    def _abortMessages(self) -> None:
        self._cancelDataDeadline()
        messages, self._messages = self._messages, []
        for message in messages:
            try:
                message.connectionLost()
            except Exception:
                log.failure("aborting a message failed: session={session}", session=self.session)
