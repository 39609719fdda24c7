"""
The AUTH command of the session (RFC 4954): the SASL exchange with a
mechanism from L{mailauth.sasl}, the login through the portal, and the
failure path (counted in the throttle, tarpitted, logged for fail2ban).
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any, Optional, cast

import attrs
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail.interfaces import IMessageDeliveryFactory
from twisted.python.failure import Failure

from mailauth import replies, sasl
from mailauth.allownets import Origin
from mailauth.checkers import AddressRefused, LoginSuspended
from mailauth.logs import printable
from mailauth.proxy import realPeer
from mailauth.replies import Reply

log = Logger(namespace="mailauth.esmtp")


class AuthCommands:
    """
    The AUTH part of L{mailauth.esmtp.SubmissionProtocol}, whose state and
    output methods it uses.
    """

    # The session state this part reads and sets (typed where the session
    # sets it first, in mailauth.esmtp).
    _avatar: Any
    _logout: Any
    _mechanism: Any
    _mode: Any
    _tarpitCall: Any
    _authFailures: Any

    if TYPE_CHECKING:
        # A mixin of SubmissionProtocol: its other attributes are the session's.
        def __getattr__(self, name: str) -> Any: ...

    def do_AUTH(self, arg: str):
        if self.factory.authMode == "none":
            return self._error(replies.BAD_SEQUENCE.format(why="authentication not enabled"))
        if self._helo is None:
            return self._error(replies.BAD_SEQUENCE.format(why="send EHLO first"))
        if self.login is not None:
            return self._error(replies.BAD_SEQUENCE.format(why="already authenticated"))
        if self._hasSender:
            return self._error(
                replies.BAD_SEQUENCE.format(why="AUTH not allowed during a mail transaction")
            )
        words = arg.split(" ")
        name = words[0].upper()
        if not name or len(words) > 2:
            return self._error(replies.SYNTAX.format(usage="AUTH mechanism [initial-response]"))
        if name not in self.factory.mechanisms:
            return self._error(replies.UNKNOWN_MECHANISM)
        if not self._authAllowedNow():
            self._logRefusal("encryption_required", replies.ENCRYPTION_REQUIRED)
            return self._error(replies.ENCRYPTION_REQUIRED)
        context = attrs.evolve(self._saslContext(), origin=self._origin())
        if name not in context.offered:
            # Only -PLUS is ever held back: it needs TLS channel binding data.
            self._logRefusal("encryption_required", replies.ENCRYPTION_REQUIRED)
            return self._error(replies.ENCRYPTION_REQUIRED)
        d = self.factory.throttle.isBlocked(self._peer)
        d.addCallback(self._authStart, name, words, context)
        return d

    def _origin(self) -> Origin:
        """
        Where the client is, for its user's C{allow_nets}: the address the
        session serves (a PROXY header's client) and the connection's own
        peer (the proxy).
        """
        return Origin.of(self._peer, getattr(realPeer(self.transport), "host", None))

    def _authStart(self, blocked: bool, name: str, words: list, context: sasl.SASLContext):
        if self._mode == self.CLOSED:
            return None
        if blocked:
            self._hangUp("blocked")
            return self._close(replies.BLOCKED)
        mechanism = self.factory.saslTable[name](context)
        initial = None
        if len(words) == 2:
            initial = b"" if words[1] == "=" else self._decode(words[1].encode("ascii"))
            if initial is None:
                return
        self._mechanism = mechanism
        return self._step(lambda: mechanism.start(initial))

    def _decode(self, data: bytes) -> Optional[bytes]:
        """Strict base64 (no stray characters, nothing after the padding)."""
        if data == b"*":
            self._mechanism = None
            self._mode = self.COMMAND
            self._error(replies.AUTH_CANCELLED)
            return None
        try:
            if len(data) % 4:
                raise binascii.Error("bad length")
            return base64.b64decode(data, validate=True)
        except binascii.Error:
            self._mechanism = None
            self._mode = self.COMMAND
            self._error(replies.BAD_BASE64)
            return None

    def _authResponse(self, line: bytes):
        if isinstance(self._mechanism, _Refused):
            # Whatever answers the error challenge (RFC 7628's ^A, XOAUTH2's
            # empty line, even "*") gets the failure reply.
            refused, self._mechanism = self._mechanism, None
            self._mode = self.COMMAND
            return self._failureReply(refused.delay)
        data = self._decode(line)
        if data is None:
            return None
        mechanism = self._mechanism
        return self._step(lambda: mechanism.respond(data))

    def _step(self, advance):
        mechanism = self._mechanism
        try:
            step = advance()
        except (sasl.SASLError, sasl.AuthzidMismatch) as e:
            return self._stepFailed(e, mechanism)
        if isinstance(step, defer.Deferred):
            # A mechanism that looks the user up (SCRAM) answers later.
            self._mode = self.AUTH
            step.addCallbacks(self._stepped, self._stepError, errbackArgs=(mechanism,))
            return step
        return self._stepped(step)

    def _stepError(self, f: Failure, mechanism):
        f.trap(sasl.SASLError, sasl.AuthzidMismatch)
        return self._stepFailed(cast("sasl.SASLError | sasl.AuthzidMismatch", f.value), mechanism)

    def _stepFailed(self, e: sasl.SASLError | sasl.AuthzidMismatch, mechanism):
        if self._mode == self.CLOSED:
            return None
        self._mode = self.COMMAND
        self._mechanism = None
        if isinstance(e, sasl.AuthzidMismatch):
            return self._authFailed(mechanism.name, e.username, "authzid differs from login")
        return self._error(e)

    def _stepped(self, step):
        if self._mode == self.CLOSED:
            return None
        if isinstance(step, sasl.Challenge):
            self._mode = self.AUTH
            self._send(Reply(334, base64.b64encode(step.data).decode("ascii")))
            return None
        self._mode = self.COMMAND
        self._mechanism = None
        d = self.factory.portal.login(step, None, IMessageDeliveryFactory)
        d.addCallbacks(self._authSucceeded, self._authError, (step,), None, (step,))
        return d

    def _authSucceeded(self, result, credentials) -> None:
        interface, avatar, logout = result
        if self._mode == self.CLOSED:
            logout()
            return
        # The avatar knows the login when the credentials need not name it
        # (a bearer token names its own).
        login = getattr(avatar, "login", None) or credentials.username
        self.login = login.lower()
        self._avatar = avatar
        self._logout = logout
        app = getattr(avatar, "appPassword", None)
        log.info(
            "auth success: client=[{client}] mechanism={mechanism} login=<{login}>{app} "
            "session={session}",
            client=self._peer,
            mechanism=credentials.mechanism,
            login=printable(login),
            app=f" app={app}" if app else "",
            session=self.session,
        )
        self.factory.metrics.authResult(credentials.mechanism, "success")
        self._send(replies.AUTH_SUCCESS)

    def _authError(self, f: Failure, credentials):
        # A client that hung up while its credentials were checked is still
        # logged and counted (only the reply is left out): else a guesser
        # that never waits for its answers would spend the server's hashing
        # without ever being counted, blocked, or seen by fail2ban.
        # Neither of these is a guess: they are answered as one is (as late,
        # and ending the session after as many), but never counted, so their
        # owner is never blocked, and logged in lines fail2ban ignores.
        if f.check(LoginSuspended):
            log.info(
                "auth suspended: client=[{client}] mechanism={mechanism} login=<{login}> "
                "session={session}",
                client=self._peer,
                mechanism=credentials.mechanism,
                login=printable(cast(LoginSuspended, f.value).login),
                session=self.session,
            )
            self.factory.metrics.authResult(credentials.mechanism, "suspended")
            return self._notAGuess(f, credentials)
        if f.check(sasl.MechanismUnavailable):
            # The client chose a mechanism we offered but cannot verify for
            # this user: its owner must never be locked out for that.
            log.info(
                "auth mechanism unusable: client=[{client}] mechanism={mechanism} "
                "login=<{login}> session={session}",
                client=self._peer,
                mechanism=credentials.mechanism,
                login=printable(credentials.username),
                session=self.session,
            )
            self.factory.metrics.authResult(credentials.mechanism, "failure")
            return self._notAGuess(f, credentials)
        if f.check(UnauthorizedLogin):
            if f.check(AddressRefused):
                # Right credentials from the wrong place: answered and
                # counted as a wrong password, so the client learns nothing.
                refused = cast(AddressRefused, f.value)
                log.info(
                    "auth refused: client=[{client}] mechanism={mechanism} login=<{login}>: "
                    "{field} check failed: {why} session={session}",
                    field=refused.field,
                    client=self._peer,
                    mechanism=credentials.mechanism,
                    login=printable(refused.login),
                    why=refused.why,
                    session=self.session,
                )
            if f.check(sasl.TokenRefused):
                # Why, for the operator (never the token): the auth failure
                # line that follows is the one fail2ban reads.
                log.info(
                    "OAuth token refused: client=[{client}] mechanism={mechanism} "
                    "login=<{login}>: {why} session={session}",
                    client=self._peer,
                    mechanism=credentials.mechanism,
                    login=printable(credentials.username),
                    why=cast(sasl.TokenRefused, f.value).why,
                    session=self.session,
                )
            return self._authFailed(
                credentials.mechanism,
                credentials.username,
                "bad credentials",
                _failureChallenge(f, credentials),
            )
        if f.check(LoginFailed):
            log.error(
                "login could not be checked: {why} client=[{client}] session={session}",
                why=f.getErrorMessage(),
                client=self._peer,
                session=self.session,
            )
        else:
            log.failure(
                "login failed with an internal error: client=[{client}] session={session}",
                f,
                client=self._peer,
                session=self.session,
            )
        self.factory.metrics.authResult(credentials.mechanism, "unavailable")
        if self._mode != self.CLOSED:
            self._send(replies.AUTH_UNAVAILABLE)
        return None

    def _authFailed(
        self, mechanism: str, username: str, why: str, challenge: Optional[bytes] = None
    ):
        """
        Log a failed login and count it (per address and per login, in the
        throttle's store), then answer 535 after the tarpit delay, or hang
        up past the limits. No command is read meanwhile.

        @param challenge: error data to send first as a 334 challenge,
            whose response then gets the 535 (RFC 7628 section 3.2.2).
        """
        self._authFailures += 1
        log.info(
            "auth failure: client=[{client}] mechanism={mechanism} login=<{login}> "
            "session={session}",
            client=self._peer,
            mechanism=mechanism,
            login=printable(username),
            session=self.session,
        )
        self.factory.metrics.authResult(mechanism, "failure")
        d = self.factory.throttle.failure(self._peer, username, session=self.session)
        d.addCallback(self._checkBlocked)
        d.addErrback(self._throttleFailed)
        d.addCallback(self._answerFailure, challenge)
        return d

    def _notAGuess(self, f: Failure, credentials):
        """
        Answer a failure that is not a guess as a wrong password (or a
        refused token) is answered: after the delay one would get now, with
        the same error challenge first, closing the session after as many
        failures; but without counting it. Which of the two it was must not
        show, or a suspended login's password could be confirmed, and the
        logins that exist found with a mechanism their scheme cannot do.
        """
        self._authFailures += 1
        d = self.factory.throttle.delay(self._peer, credentials.username)
        d.addCallback(lambda delay: (delay, False))
        d.addErrback(self._throttleFailed)
        d.addCallback(self._answerFailure, _failureChallenge(f, credentials))
        return d

    def _checkBlocked(self, delay: float) -> defer.Deferred[tuple]:
        d = self.factory.throttle.isBlocked(self._peer)
        return d.addCallback(lambda blocked: (delay, blocked))

    def _throttleFailed(self, f: Failure) -> tuple:
        # The counter stores never fail; were one to, answer at once.
        log.failure(
            "counting a failed login failed: client=[{client}] session={session}",
            f,
            client=self._peer,
            session=self.session,
        )
        return (0.0, False)

    def _answerFailure(self, verdict: tuple, challenge: Optional[bytes] = None):
        """
        Once the failure is counted: hang up past the limits, else answer
        535 (or first the error C{challenge}, whose response gets the 535).
        """
        delay, blocked = verdict
        if self._mode == self.CLOSED:
            return None
        if blocked:
            self._hangUp("blocked")
            return self._close(replies.BLOCKED)
        if self._authFailures >= self.factory.failuresPerSession:
            self._hangUp("failures_per_session")
            return self._close(replies.TOO_MANY_FAILURES)
        if challenge is not None:
            self._mode = self.AUTH
            self._mechanism = _Refused(delay)
            self._send(Reply(334, base64.b64encode(challenge).decode("ascii")))
            return None
        return self._failureReply(delay)

    def _failureReply(self, delay: float):
        """Send the 535 of a failed login, after C{delay} seconds (the tarpit)."""
        if delay <= 0:
            self._send(replies.AUTH_FAILED)
            return None
        d: defer.Deferred[None] = defer.Deferred()
        self._tarpitCall = self.clock.callLater(delay, d.callback, None)

        def answer(ignored):
            self._tarpitCall = None
            if self._mode != self.CLOSED:
                self._send(replies.AUTH_FAILED)

        return d.addCallback(answer)


def _failureChallenge(f: Failure, credentials) -> Optional[bytes]:
    """What a bearer token mechanism tells the client in a last challenge before the 535."""
    final = getattr(credentials, "failureChallenge", None)
    return final(f.value) if final is not None else None


class _Refused:
    """
    In place of the mechanism once a login was refused with an error
    challenge: the client's next response gets the failure reply, after
    C{delay} seconds.
    """

    def __init__(self, delay: float) -> None:
        self.delay = delay
