"""
The commands of the session outside AUTH and the mail transaction: HELO and
EHLO (with the extensions offered), STARTTLS (RFC 3207), and RSET, NOOP,
VRFY, EXPN, HELP and QUIT.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from twisted.internet import interfaces
from twisted.logger import Logger

from mailauth import replies, sasl
from mailauth.replies import Reply

log = Logger(namespace="mailauth.esmtp")

_HELO = re.compile(r"[\x21-\x7e]+")


class SessionCommands:
    """
    The commands of L{mailauth.esmtp.SubmissionProtocol} that neither
    authenticate nor carry a message, and what decides which extensions
    EHLO offers (also asked by AUTH); it uses the session's state and
    output methods.
    """

    # The session state this part reads and sets (typed where the session
    # sets it first, in mailauth.esmtp).
    _bdatFailed: Any
    _buffer: Any
    _errors: Any
    _helo: Any
    _junkCommands: Any

    if TYPE_CHECKING:
        # A mixin of SubmissionProtocol: its other attributes are the session's.
        def __getattr__(self, name: str) -> Any: ...

    def _saslContext(self) -> sasl.SASLContext:
        """What the SASL mechanisms see of this session, with the names offered in EHLO."""
        connection = None
        if self.tls.active:
            try:
                connection = self.transport.getHandle()
            except AttributeError:
                pass
        context = sasl.SASLContext(self.settings.hostname, self.clock, connection)
        table = self.factory.saslTable
        names = sasl.offered(table, self.factory.mechanisms, context)
        return sasl.SASLContext(self.settings.hostname, self.clock, connection, names)

    def _authAllowedNow(self) -> bool:
        if self.factory.authMode == "none":
            return False
        return self.tls.active or not self.factory.plaintextRequiresTLS

    def _startTLSOffered(self) -> bool:
        return (
            self.tls.mode == "starttls"
            and not self.tls.active
            and self.factory.tlsContext is not None
            and interfaces.ITLSTransport.providedBy(self.transport)
        )

    # -- commands ----------------------------------------------------------

    def do_HELO(self, arg: str):
        return self._hello(arg, esmtp=False)

    def do_EHLO(self, arg: str):
        return self._hello(arg, esmtp=True)

    def _hello(self, arg: str, esmtp: bool):
        # A domain name or address literal: printable, one word, and at
        # most 255 octets (RFC 1035), since it is copied into Received.
        if not arg or len(arg) > 255 or not _HELO.fullmatch(arg):
            verb = "EHLO" if esmtp else "HELO"
            return self._error(replies.SYNTAX.format(usage=f"{verb} hostname"))
        # The session's first (and, after STARTTLS, its first again) is
        # what it must send; only one repeated is junk.
        if self._helo is not None and self._junk():
            return None
        self._abortMessages()
        self._resetTransaction()
        self._bdatFailed = False
        self._helo = arg
        if not esmtp:
            self._send(Reply(250, self.settings.hostname))
            return
        lines = [
            self.settings.hostname,
            "PIPELINING",
            f"SIZE {self.settings.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
            "DSN",
        ]
        if self._startTLSOffered():
            lines.append("STARTTLS")
        if self._authAllowedNow() and self.login is None:
            lines.append("AUTH " + " ".join(self._saslContext().offered))
        self._sendLines(250, lines)

    def do_STARTTLS(self, arg: str):
        if self.tls.active:
            return self._error(replies.TLS_ACTIVE)
        if not self._startTLSOffered():
            return self._error(replies.STARTTLS_NOT_OFFERED)
        if arg:
            return self._error(replies.SYNTAX.format(usage="STARTTLS"))
        if self._buffer:
            # RFC 3207 / CVE-2011-0411: anything sent after STARTTLS before
            # the handshake was not protected by it; it is discarded.
            log.info(
                "discarded {n} bytes pipelined after STARTTLS: client=[{client}] session={session}",
                n=len(self._buffer),
                client=self._peer,
                session=self.session,
            )
            self._buffer = b""
        self._send(replies.STARTTLS_READY)
        self.transport.startTLS(self.factory.tlsContext)
        self.tls.active = True
        self._abortMessages()
        if self._logout is not None:
            self._logout()
        self._resetSession()

    def _junk(self) -> bool:
        """
        Count a command that moves no mail and can be repeated without end
        (NOOP, RSET, VRFY, HELP, HELO or EHLO once the session has one,
        and RCPT past max_recipients): past C{junk_command_limit} of
        them since the last message accepted, each counts as an error too,
        as with Postfix's C{smtpd_junk_command_limit} (whose table marks
        HELO and EHLO as well), so that a client repeating them cannot hold
        its connection for ever; at C{max_errors} the session ends with 421.
        Whether it ended.
        """
        self._junkCommands += 1
        if self._junkCommands <= self.settings.junk_command_limit:
            return False
        self._errors += 1
        return self._endIfTooManyErrors("junk_commands")

    def do_RSET(self, arg: str):
        if arg:
            return self._error(replies.SYNTAX.format(usage="RSET"))
        if self._junk():
            return None
        self._abortMessages()
        self._resetTransaction()
        self._bdatFailed = False
        self._send(replies.OK)

    def do_NOOP(self, arg: str):
        if not self._junk():
            self._send(replies.OK)

    def do_VRFY(self, arg: str):
        if not arg:
            return self._error(replies.SYNTAX.format(usage="VRFY address"))
        if self._junk():
            return None
        # Never confirm or deny that a user exists (RFC 5321 3.5.3).
        self._send(replies.CANNOT_VRFY)

    def do_EXPN(self, arg: str):
        return self._error(replies.NOT_IMPLEMENTED.format(command="EXPN"))

    def do_HELP(self, arg: str):
        if not self._junk():
            self._send(replies.HELP)

    def do_QUIT(self, arg: str):
        self._close(replies.BYE)
