"""
What the session logs and counts of its connection (connect, refusal
before the greeting, failed TLS handshake, disconnect) and of its refusals
and hang-ups: one line each, with the client's address and the session's
ID, as docs/logs.rst lists them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from OpenSSL import SSL
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailauth import replies
from mailauth.logs import printable, quoted
from mailauth.replies import Reply, ReplyLike

log = Logger(namespace="mailauth.esmtp")

# The reason a connection refused before the greeting is counted and logged under.
_CONNECTION_REFUSALS = {
    replies.BLOCKED: "blocked",
    replies.TOO_MANY_CONNECTIONS: "too_many",
    replies.TOO_MANY_FROM_ADDRESS: "too_many_from_address",
}
# Refusals counted but not logged as refusals: the session or the realm logs
# each where it happens, with its cause.
_REFUSALS_LOGGED_ELSEWHERE = frozenset({"storage", "temporary"})


class SessionLog:
    """
    The log lines and connection counts of
    L{mailauth.esmtp.SubmissionProtocol}, whose state they read.
    """

    if TYPE_CHECKING:
        # A mixin of SubmissionProtocol: its other attributes are the session's.
        def __getattr__(self, name: str) -> Any: ...

    def _logConnect(self) -> None:
        """Log and count a client admitted and greeted."""
        log.info(
            "connect: client=[{client}] listener={listener} session={session}",
            client=self._peer,
            listener=self.factory.name,
            session=self.session,
        )
        self.factory.metrics.connectionAccepted(self.factory.name)

    def _logConnectionRefused(self, refusal: Reply) -> None:
        """Log and count a connection refused with C{refusal} before the greeting."""
        reason = _CONNECTION_REFUSALS[refusal]
        log.info(
            "refused connection: client=[{client}] listener={listener} reason={reason} "
            "session={session}",
            client=self._peer,
            listener=self.factory.name,
            reason=reason,
            session=self.session,
        )
        self.factory.metrics.connectionRefused(self.factory.name, reason)

    def _logHandshakeFailure(self, reason: Failure) -> None:
        """Log a connection that ended (with C{reason}) in a failed TLS handshake."""
        if self.inHandshake and isinstance(reason, Failure) and reason.check(SSL.Error):
            # TLSMemoryBIOProtocol ends a failed handshake with OpenSSL's error.
            self._logHandshakeFailed(_sslReason(reason.value))

    def _logHandshakeFailed(self, why: str) -> None:
        log.info(
            'TLS handshake failed: client=[{client}] listener={listener} why="{why}" '
            "session={session}",
            client=self._peer,
            listener=self.factory.name,
            why=quoted(why),
            session=self.session,
        )

    def _logDisconnect(self) -> None:
        """Log and count the end of a session that was greeted."""
        self.factory.metrics.connectionClosed(self.factory.name)
        log.info(
            "disconnect: client=[{client}] login=<{login}> messages={messages} session={session}",
            client=self._peer,
            login=printable(self.login or ""),
            messages=self._accepted,
            session=self.session,
        )

    def _countRefusal(self, reason: str, reply: ReplyLike) -> None:
        """Count a refusal C{reply} under C{reason}; log it unless its cause is logged."""
        self.factory.metrics.messageRefused(reason)
        if reason not in _REFUSALS_LOGGED_ELSEWHERE:
            self._logRefusal(reason, reply)

    def _logRefusal(self, reason: str, reply: ReplyLike) -> None:
        log.info(
            "refused {command}: client=[{client}] login=<{login}> reason={reason} "
            'reply="{reply}" session={session}',
            command=self._verb,
            client=self._peer,
            login=printable(self.login or ""),
            reason=reason,
            reply=quoted(f"{reply.code} {reply.text}"),
            session=self.session,
        )

    def _hangUp(self, reason: str) -> None:
        """Log why the session is about to close with a 421."""
        log.info(
            "hang-up: client=[{client}] login=<{login}> reason={reason} command={command} "
            "session={session}",
            client=self._peer,
            login=printable(self.login or ""),
            reason=reason,
            command=self._verb,
            session=self.session,
        )


def _sslReason(error: Optional[BaseException]) -> str:
    """What OpenSSL said, in its own words: C{tlsv1 alert unknown ca}, C{wrong version number}."""
    if error is None:
        return "unknown"
    errors = error.args[0] if error.args and isinstance(error.args[0], list) else []
    reasons = [entry[-1] for entry in errors if isinstance(entry, tuple) and entry]
    return ", ".join(str(r) for r in reasons if r) or str(error) or type(error).__name__
