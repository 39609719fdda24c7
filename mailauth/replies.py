"""
Every reply the server sends, named once: the session, the realm and the
delivery code use these names, and the tests check the same names, so a
reply's wording lives in one place (docs/replies.rst lists them).
"""

from __future__ import annotations

import errno
from typing import Optional, Protocol

import attrs

# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets, CRLF included.
MAX_REPLY_LINE = 512


class ReplyLike(Protocol):
    """Anything the session can send as a reply: a L{Reply}, an L{SMTPReply}."""

    @property
    def code(self) -> int: ...

    @property
    def text(self) -> str: ...


class SMTPReply(Exception):
    """
    Raised by avatars, deliveries and messages to choose the exact reply:
    C{code} and C{text}, which starts with the enhanced status code.

    @ivar metric: the refusal reason it is counted under when the session
        sends it (L{mailauth.metrics.REFUSAL_REASONS}), or L{None}.
    """

    def __init__(self, code: int, text: str, metric: Optional[str] = None) -> None:
        super().__init__(code, text)
        self.code = code
        self.text = text
        self.metric = metric


@attrs.frozen
class Reply:
    """
    A named reply: C{code} and C{text}, where the text (after the code)
    starts with the enhanced status code (RFC 2034/3463) and may hold
    C{{name}} fields that L{format} fills in.

    @ivar metric: for a reply that refuses a transaction, a recipient or a
        message, the reason it is counted under when the session sends it
        (one of L{mailauth.metrics.REFUSAL_REASONS}), else L{None}.
    """

    code: int
    text: str
    metric: Optional[str] = attrs.field(default=None, kw_only=True)

    def format(self, **values: object) -> Reply:
        """This reply with its C{{name}} fields filled in from C{values}."""
        return Reply(self.code, self.text.format(**values), metric=self.metric)

    def error(self, **values: object) -> SMTPReply:
        """An L{SMTPReply} to raise, with the fields filled in."""
        reply = self.format(**values)
        return SMTPReply(reply.code, reply.text, reply.metric)


def cut(code: int, text: str) -> str:
    """
    C{text} cut so that the line C{"<code> <text>\\r\\n"} is at most
    L{MAX_REPLY_LINE} octets once encoded: the last guard behind L{echo}.
    """
    room = MAX_REPLY_LINE - len(f"{code} \r\n")
    if len(text.encode("utf-8")) <= room:
        return text
    return text.encode("utf-8")[: room - 3].decode("utf-8", "ignore") + "..."


def echo(text: str, limit: int = 64) -> str:
    """
    Client text quoted back in a reply, cut so that no reply line can grow
    past L{MAX_REPLY_LINE} however long the client's input was.
    """
    return text if len(text) <= limit else text[:limit] + "..."


# Connection and session
GREETING = Reply(220, "{hostname} ESMTP mailauth")
BYE = Reply(221, "2.0.0 Bye")
HELP = Reply(214, "2.0.0 See RFC 5321 and RFC 4954")
OK = Reply(250, "2.0.0 Ok")
CANNOT_VRFY = Reply(252, "2.0.0 Cannot VRFY user, but will accept message and attempt delivery")
TIMEOUT = Reply(421, "4.4.2 {hostname} Error: timeout exceeded")
DATA_TOO_SLOW = Reply(421, "4.4.2 {hostname} Error: message transfer took too long")
TOO_MANY_ERRORS = Reply(421, "4.7.0 Error: too many errors")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0 Error: too many connections, try again later")
TOO_MANY_FROM_ADDRESS = Reply(421, "4.7.0 Error: too many connections from your address")
INTERNAL_ERROR = Reply(451, "4.3.0 Error: internal error, try again later")

# Command syntax
LINE_TOO_LONG = Reply(500, "5.5.2 Error: line too long")
BARE_NEWLINE_IN_COMMAND = Reply(500, "5.5.2 Error: bare CR or LF in command")
NON_ASCII_COMMAND = Reply(500, "5.5.2 Error: command contains non-ASCII characters")
CONTROL_IN_COMMAND = Reply(500, "5.5.2 Error: control characters in command")
UNKNOWN_COMMAND = Reply(500, "5.5.2 Error: command not recognized")
BAD_UTF8 = Reply(500, "5.5.2 Error: bad UTF-8 syntax")
SYNTAX = Reply(501, "5.5.4 Syntax: {usage}")
BAD_PARAMETERS = Reply(501, "5.5.4 Syntax error in parameters")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7 Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3 Bad recipient address syntax")
SENDER_TOO_LONG = Reply(501, "5.1.7 Error: sender address too long")
RECIPIENT_TOO_LONG = Reply(501, "5.1.3 Error: recipient address too long")
SENDER_NOT_RELAYABLE = Reply(
    553, "5.1.7 Error: sender address with spaces, angle brackets or controls not accepted"
)
RECIPIENT_NOT_RELAYABLE = Reply(
    553, "5.1.3 Error: recipient address with spaces, angle brackets or controls not accepted"
)
NEEDS_SMTPUTF8 = Reply(553, "5.6.7 Error: non-ASCII address needs the SMTPUTF8 parameter")
NOT_IMPLEMENTED = Reply(502, "5.5.1 Error: {command} not supported")
BAD_SEQUENCE = Reply(503, "5.5.1 Error: {why}")
# DATA or BDAT after MAIL with no recipient accepted: with PIPELINING the
# client sent it before it knew (Postfix's words and code).
NO_VALID_RECIPIENTS = Reply(554, "5.5.1 Error: no valid recipients")
PARAMETER_TWICE = Reply(555, "5.5.4 Parameter {name} given twice")
UNSUPPORTED_PARAMETER = Reply(555, "5.5.4 Unsupported option: {name}")

# TLS
STARTTLS_READY = Reply(220, "2.0.0 Ready to start TLS")
STARTTLS_NOT_OFFERED = Reply(502, "5.5.1 Error: STARTTLS not offered")
TLS_ACTIVE = Reply(554, "5.5.1 Error: TLS already active")

# AUTH (RFC 4954)
AUTH_SUCCESS = Reply(235, "2.7.0 Authentication successful")
AUTH_UNAVAILABLE = Reply(454, "4.7.0 Temporary authentication failure")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6 Authentication exchange line is too long")
AUTH_CANCELLED = Reply(501, "5.7.0 Authentication cancelled")
BAD_BASE64 = Reply(501, "5.5.2 Error: invalid base64 data")
UNKNOWN_MECHANISM = Reply(504, "5.5.4 Unrecognized authentication type")
AUTH_REQUIRED = Reply(530, "5.7.0 Authentication required", metric="auth_required")
AUTH_FAILED = Reply(535, "5.7.8 Authentication credentials invalid")
ENCRYPTION_REQUIRED = Reply(
    538, "5.7.11 Encryption required for requested authentication mechanism"
)
TOO_MANY_FAILURES = Reply(421, "4.7.0 Error: too many failed logins")
BLOCKED = Reply(421, "4.7.0 Error: too many failed logins, try again later")

# The mail transaction
SENDER_OK = Reply(250, "2.1.0 Ok")
RECIPIENT_OK = Reply(250, "2.1.5 Ok")
START_DATA = Reply(354, "End data with <CR><LF>.<CR><LF>")
QUEUED = Reply(250, "2.0.0 Ok: queued as {id}")
CHUNK_RECEIVED = Reply(250, "2.0.0 Ok: {size} octets")
BAD_BDAT = Reply(421, "4.5.2 Error: malformed BDAT command, closing connection")
TEMPORARY_FAILURE = Reply(
    451, "4.3.0 Error: temporary failure, try again later", metric="temporary"
)
USER_DATABASE_UNAVAILABLE = Reply(
    451, "4.3.0 Error: temporary lookup failure, try again later", metric="user_database"
)
CANNOT_FORWARD = Reply(
    451, "4.3.0 <{address}>: cannot forward, try again later", metric="temporary"
)
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3 Error: too many recipients", metric="too_many_recipients")
UNKNOWN_RECIPIENT = Reply(
    550, "5.1.1 <{address}>: Recipient address rejected: User unknown", metric="unknown_user"
)
MAILBOX_NOT_ALLOWED = Reply(
    553,
    "5.1.3 <{address}>: Recipient address rejected: mailbox name not allowed",
    metric="mailbox_not_allowed",
)
SENDER_NOT_OWNED = Reply(
    553, "5.7.1 <{address}>: Sender address not owned by user {login}", metric="sender_refused"
)
RELAY_DENIED = Reply(554, "5.7.1 <{address}>: Relay access denied", metric="relay_denied")
# [limits]: at MAIL (messages) or RCPT (recipients); a suspended login at MAIL.
LIMIT_MESSAGES = Reply(
    451, "4.7.1 Error: {login} reached its limit of {max} messages per {period}", metric="limit"
)
LIMIT_RECIPIENTS = Reply(
    451, "4.7.1 Error: {login} reached its limit of {max} recipients per {period}", metric="limit"
)
SENDING_SUSPENDED = Reply(
    550, "5.7.1 Error: {login} is suspended, contact your postmaster", metric="suspended"
)

# The message
TOO_BIG = Reply(552, "5.3.4 Message size exceeds fixed maximum message size", metric="too_big")
BARE_NEWLINE = Reply(
    550, "5.6.2 Error: bare CR or LF in message, not accepted", metric="bare_newline"
)
NUL_IN_MESSAGE = Reply(550, "5.6.0 Error: NUL character in message, not accepted", metric="nul")
STORAGE_FAILED = Reply(451, "4.3.0 Error: local error in processing", metric="storage")
STORAGE_FULL = Reply(452, "4.3.1 Error: insufficient system storage", metric="storage")
# [delivery] header_from_match: the visible sender must be the login's.
HEADER_FROM_NOT_OWNED = Reply(
    550,
    "5.7.1 <{address}>: From/Sender header address not owned by user {login}",
    metric="header_from",
)
HEADER_FROM_UNCHECKABLE = Reply(
    550, "5.7.1 Error: From/Sender header cannot be checked", metric="header_from"
)
# RFC 5321 6.3: more than MAX_HOPS Received fields, a mail loop.
TOO_MANY_HOPS = Reply(
    554, "5.4.6 Error: too many hops ({count} Received header fields)", metric="too_many_hops"
)
# [dkim]: a message is signed or not accepted.
NOT_SIGNABLE = Reply(
    550,
    "5.6.0 Error: malformed or oversized header, message cannot be signed",
    metric="not_signable",
)
SIGNING_FAILED = Reply(
    451, "4.3.0 Error: message could not be signed, try again later", metric="temporary"
)

# Local delivery of whole messages (bounces from the queue)
NO_LOCAL_USER = Reply(550, "5.1.1 <{address}>: User unknown")


def storageFailure(error: OSError) -> Reply:
    """
    The reply for a message that could not be stored because of C{error}:
    452 4.3.1 when the disk or the quota is full, else 451 4.3.0.
    """
    return STORAGE_FULL if error.errno in (errno.ENOSPC, errno.EDQUOT) else STORAGE_FAILED
