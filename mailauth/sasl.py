"""SASL mechanisms for SMTP AUTH: PLAIN (RFC 4616), LOGIN and CRAM-MD5 (RFC 2195)."""

from __future__ import annotations

import hmac
import re
import secrets
from typing import Any, Optional, Union

import attrs
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from zope.interface import implementer

from mailauth.interfaces import ISASLMechanism


class SASLError(Exception):
    """
    The client's response is malformed for the mechanism; the session
    answers with C{code} and C{text} and ends the exchange.
    """

    def __init__(self, code: int, text: str) -> None:
        super().__init__(code, text)
        self.code = code
        self.text = text


class AuthzidMismatch(Exception):
    """
    PLAIN named an authorisation identity other than the login: the session
    answers like a wrong password (RFC 4616 lets us refuse to act for it).
    """

    def __init__(self, username: str) -> None:
        super().__init__(username)
        self.username = username


class MechanismUnavailable(UnauthorizedLogin):
    """
    A checker's refusal that says nothing about the password: the user's
    password is stored in a scheme this mechanism cannot verify (a user
    hashed with ARGON2ID trying CRAM-MD5 or SCRAM). The client answered the
    same as for a wrong password; the session must neither count it as a
    guess nor slow the client down (a client's choice among the mechanisms
    we offered must never lock its owner out).
    """


@attrs.frozen
class SASLContext:
    """
    What a mechanism may know of the session it runs in; a SASL table entry
    is called with one and returns an L{mailauth.interfaces.ISASLMechanism}.
    An entry may also have C{available(context) -> bool}, saying whether to
    offer it on that session at all (SCRAM-SHA-256-PLUS needs TLS).

    @ivar hostname: the server's name.
    @ivar clock: an C{IReactorTime}.
    @ivar tls: the session's L{OpenSSL.SSL.Connection} once TLS is active,
        else L{None}: channel binding reads it.
    @ivar offered: the mechanism names the session offered in EHLO.
    """

    hostname: str
    clock: Any
    tls: Any = None
    offered: tuple = ()


def _malformed(why: str) -> SASLError:
    return SASLError(501, f"5.5.2 {why}")


def _decodeIdentity(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(f"{what} is not UTF-8") from None
    if not text or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise _malformed(f"{what} is empty or holds control characters")
    return text


@implementer(IUsernamePassword)
@attrs.frozen(repr=False)
class PlaintextCredentials:
    """
    A login and the password the client sent (PLAIN or LOGIN).

    The repr leaves the password out so it can never reach a log.
    """

    username: str
    password: bytes
    mechanism: str

    def checkPassword(self, password: bytes) -> bool:
        return hmac.compare_digest(self.password, password)

    def __repr__(self) -> str:
        return f"<PlaintextCredentials {self.mechanism} {self.username!r}>"


@implementer(IUsernameHashedPassword)
@attrs.frozen
class CramMD5Credentials:
    """A login, the challenge we sent and the client's hex HMAC-MD5 of it."""

    username: str
    challenge: bytes
    response: bytes
    mechanism: str = "CRAM-MD5"

    def checkPassword(self, password: bytes) -> bool:
        expected = hmac.new(password, self.challenge, "md5").hexdigest().encode("ascii")
        return hmac.compare_digest(expected, self.response)


Credentials = Union[PlaintextCredentials, CramMD5Credentials]


@attrs.frozen
class Challenge:
    """The server's next challenge (raw bytes; the session base64-encodes it)."""

    data: bytes


Step = Union[Challenge, PlaintextCredentials, CramMD5Credentials]


@implementer(ISASLMechanism)
class Plain:
    """RFC 4616: C{authzid NUL authcid NUL passwd} in one response."""

    name = "PLAIN"

    def __init__(self, context: SASLContext) -> None:
        pass

    def start(self, initial: Optional[bytes]) -> Step:
        if initial is None:
            return Challenge(b"")
        return self.respond(initial)

    def respond(self, data: bytes) -> Step:
        parts = data.split(b"\0")
        if len(parts) != 3:
            raise _malformed("PLAIN response must be authzid NUL login NUL password")
        authzid, authcid, password = parts
        username = _decodeIdentity(authcid, "login")
        if not password:
            raise _malformed("PLAIN response has an empty password")
        if authzid and authzid != authcid:
            raise AuthzidMismatch(username)
        return PlaintextCredentials(username, password, self.name)


@implementer(ISASLMechanism)
class Login:
    """The LOGIN mechanism: prompts C{Username:} then C{Password:}."""

    name = "LOGIN"

    def __init__(self, context: SASLContext) -> None:
        self._username: Optional[str] = None

    def start(self, initial: Optional[bytes]) -> Step:
        if initial is None:
            return Challenge(b"Username:")
        return self.respond(initial)

    def respond(self, data: bytes) -> Step:
        if self._username is None:
            self._username = _decodeIdentity(data, "login")
            return Challenge(b"Password:")
        if not data:
            raise _malformed("LOGIN password is empty")
        return PlaintextCredentials(self._username, data, self.name)


_CRAM_RESPONSE = re.compile(rb"(.+) ([0-9a-f]{32})", re.DOTALL)


@implementer(ISASLMechanism)
class CramMD5:
    """
    RFC 2195: a challenge C{<random.time@hostname>} from the system CSPRNG;
    the response is C{login SP hex(HMAC-MD5(secret, challenge))}.
    """

    name = "CRAM-MD5"

    def __init__(self, context: SASLContext) -> None:
        now = int(context.clock.seconds())
        self._challenge = f"<{secrets.randbelow(10**18)}.{now}@{context.hostname}>".encode("ascii")

    def start(self, initial: Optional[bytes]) -> Step:
        if initial is not None:
            raise _malformed("CRAM-MD5 does not allow an initial response")
        return Challenge(self._challenge)

    def respond(self, data: bytes) -> Step:
        m = _CRAM_RESPONSE.fullmatch(data)
        if m is None:
            raise _malformed("CRAM-MD5 response must be login SP 32 lowercase hex digits")
        username = _decodeIdentity(m.group(1), "login")
        return CramMD5Credentials(username, self._challenge, m.group(2))


# Mechanism name -> class; each is built with a SASLContext. The daemon adds
# the SCRAM entries (mailauth.scram.mechanisms), which need the users.
MECHANISMS = {m.name: m for m in (Plain, Login, CramMD5)}


def offered(table: dict, names: tuple, context: SASLContext) -> tuple:
    """The mechanisms of C{names} to offer on a session: those available there."""
    return tuple(
        n for n in names if getattr(table[n], "available", lambda context: True)(context)
    )
