"""
SASL mechanisms for SMTP AUTH: PLAIN (RFC 4616), LOGIN, CRAM-MD5 (RFC 2195),
and the OAuth 2.0 bearer token ones, OAUTHBEARER (RFC 7628) and XOAUTH2.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
from typing import Any, Optional, Union

import attrs
from twisted.cred.credentials import ICredentials, IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from zope.interface import Attribute, implementer

from mailauth.addresses import normalise
from mailauth.allownets import Origin
from mailauth.interfaces import ILoginOrigin, ISASLMechanism


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
    @ivar origin: where the client is (L{Origin}), which every mechanism
        passes on in its credentials; L{None}: not known.
    """

    hostname: str
    clock: Any
    tls: Any = None
    offered: tuple = ()
    origin: Optional[Origin] = None


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


@implementer(IUsernamePassword, ILoginOrigin)
@attrs.frozen(repr=False)
class PlaintextCredentials:
    """
    A login and the password the client sent (PLAIN or LOGIN).

    The repr leaves the password out so it can never reach a log.
    """

    username: str
    password: bytes
    mechanism: str
    origin: Optional[Origin] = attrs.field(default=None, kw_only=True)

    def checkPassword(self, password: bytes) -> bool:
        return hmac.compare_digest(self.password, password)

    def __repr__(self) -> str:
        return f"<PlaintextCredentials {self.mechanism} {self.username!r}>"


@implementer(IUsernameHashedPassword, ILoginOrigin)
@attrs.frozen
class CramMD5Credentials:
    """A login, the challenge we sent and the client's hex HMAC-MD5 of it."""

    username: str
    challenge: bytes
    response: bytes
    mechanism: str = "CRAM-MD5"
    origin: Optional[Origin] = attrs.field(default=None, kw_only=True)

    def checkPassword(self, password: bytes) -> bool:
        expected = hmac.new(password, self.challenge, "md5").hexdigest().encode("ascii")
        return hmac.compare_digest(expected, self.response)


class IBearerToken(ICredentials):
    """
    An OAuth 2.0 bearer token (RFC 6750) sent with OAUTHBEARER or XOAUTH2.
    A refusal of it (L{TokenRefused}, or any L{UnauthorizedLogin}) is told
    to the client in a last challenge, L{failureChallenge}, whose response
    then gets the 535 (RFC 7628 section 3.2.2; SMTP AUTH has no other place
    for the error).
    """

    username = Attribute(
        "The login the client named (OAUTHBEARER's authzid, XOAUTH2's user=),"
        " or the empty string: the token names the login."
    )
    token = Attribute("The token, as the client sent it.")
    mechanism = Attribute("The mechanism's name.")

    def failureChallenge(error: Exception) -> bytes:
        """The error data to send the client for the refusal C{error} (JSON)."""


class TokenRefused(UnauthorizedLogin):
    """
    A bearer token was refused.

    @ivar why: what was wrong, for the log (never the token).
    @ivar status: the RFC 6750 error code for the client.
    @ivar discovery: the issuer's OpenID configuration URL, or L{None}.
    """

    def __init__(
        self, why: str, status: str = "invalid_token", discovery: Optional[str] = None
    ) -> None:
        super().__init__(why)
        self.why = why
        self.status = status
        self.discovery = discovery


@implementer(IBearerToken, ILoginOrigin)
@attrs.frozen(repr=False)
class BearerTokenCredentials:
    """
    A token sent with OAUTHBEARER; the repr leaves the token out so it can
    never reach a log.
    """

    username: str
    token: str
    mechanism: str = "OAUTHBEARER"
    # Keyword only: XOAuth2Credentials gives the mechanism another default,
    # which moves it after this field.
    origin: Optional[Origin] = attrs.field(default=None, kw_only=True)

    def failureChallenge(self, error: Exception) -> bytes:
        """RFC 7628 section 3.2.2: C{status}, C{schemes} and C{openid-configuration}."""
        body = {"status": getattr(error, "status", "invalid_token"), "schemes": "bearer"}
        discovery = getattr(error, "discovery", None)
        if discovery:
            body["openid-configuration"] = discovery
        return json.dumps(body, separators=(",", ":")).encode("ascii")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.mechanism} {self.username!r}>"


@attrs.frozen(repr=False)
class XOAuth2Credentials(BearerTokenCredentials):
    """A token sent with XOAUTH2, whose errors are as Google documents them."""

    mechanism: str = "XOAUTH2"

    def failureChallenge(self, error: Exception) -> bytes:
        """Google's XOAUTH2 error: C{status} is the HTTP status, C{401}."""
        return json.dumps({"status": "401", "schemes": "bearer"}, separators=(",", ":")).encode(
            "ascii"
        )


Credentials = Union[PlaintextCredentials, CramMD5Credentials, BearerTokenCredentials]


@attrs.frozen
class Challenge:
    """The server's next challenge (raw bytes; the session base64-encodes it)."""

    data: bytes


Step = Union[Challenge, PlaintextCredentials, CramMD5Credentials, BearerTokenCredentials]


@implementer(ISASLMechanism)
class Plain:
    """RFC 4616: C{authzid NUL authcid NUL passwd} in one response."""

    name = "PLAIN"

    def __init__(self, context: SASLContext) -> None:
        self.origin = context.origin

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
        # Logins are found in any spelling (L{normalise}): ALICE@ asks to
        # act as alice@, and so does an A-label spelling of a U-label domain.
        if authzid and normalise(_decodeIdentity(authzid, "authzid")) != normalise(username):
            raise AuthzidMismatch(username)
        return PlaintextCredentials(username, password, self.name, origin=self.origin)


@implementer(ISASLMechanism)
class Login:
    """The LOGIN mechanism: prompts C{Username:} then C{Password:}."""

    name = "LOGIN"

    def __init__(self, context: SASLContext) -> None:
        self.origin = context.origin
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
        return PlaintextCredentials(self._username, data, self.name, origin=self.origin)


_CRAM_RESPONSE = re.compile(rb"(.+) ([0-9a-f]{32})", re.DOTALL)


@implementer(ISASLMechanism)
class CramMD5:
    """
    RFC 2195: a challenge C{<random.time@hostname>} from the system CSPRNG;
    the response is C{login SP hex(HMAC-MD5(secret, challenge))}.
    """

    name = "CRAM-MD5"

    def __init__(self, context: SASLContext) -> None:
        self.origin = context.origin
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
        return CramMD5Credentials(username, self._challenge, m.group(2), origin=self.origin)


# RFC 6750's b64token, after "Bearer" and white space.
_BEARER = re.compile(r"bearer +([A-Za-z0-9._~+/-]+=*)", re.IGNORECASE)
# The key of an RFC 7628 key=value pair.
_KEY = re.compile(r"[A-Za-z]+")


def _pairs(text: str, what: str) -> dict[str, str]:
    """
    The C{key=value} pairs of C{text}, each followed by C{^A}, then one
    more C{^A} that ends the message (RFC 7628's C{*kvpair kvsep}).
    """
    if not text.endswith("\x01"):
        raise _malformed(f"{what} response must end with ^A")
    items = text[:-1].split("\x01")
    if items.pop() != "":
        raise _malformed(f"{what} response: each key=value must end with ^A")
    pairs: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not _KEY.fullmatch(key) or key in pairs:
            raise _malformed(f"{what} response has a malformed or repeated key=value")
        pairs[key] = value
    return pairs


def _bearer(pairs: dict[str, str], what: str) -> str:
    m = _BEARER.fullmatch(pairs.get("auth", ""))
    if m is None:
        raise _malformed(f"{what} response needs auth=Bearer <token>")
    return m.group(1)


def _saslname(text: str) -> str:
    """RFC 5801's saslname: C{=2C} is C{,} and C{=3D} is C{=}; no other C{=}."""
    if re.search(r"=(?!2C|3D)", text):
        raise _malformed("OAUTHBEARER authzid has a bare '='")
    return text.replace("=2C", ",").replace("=3D", "=")


class _TokenMechanism:
    """
    What the two bearer token mechanisms share: the token comes in one
    response (the initial one, or the answer to an empty challenge), in
    UTF-8, which L{parse} reads.
    """

    name = ""

    def __init__(self, context: SASLContext) -> None:
        self.origin = context.origin

    def start(self, initial: Optional[bytes]) -> Step:
        if initial is None:
            return Challenge(b"")
        return self.respond(initial)

    def respond(self, data: bytes) -> Step:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _malformed(f"{self.name} response is not UTF-8") from None
        return self.parse(text)

    def parse(self, text: str) -> BearerTokenCredentials:
        raise NotImplementedError


@implementer(ISASLMechanism)
class OAuthBearer(_TokenMechanism):
    """
    RFC 7628: C{gs2-header ^A host=... ^A port=... ^A auth=Bearer TOKEN ^A ^A},
    where the GS2 header is C{n,a=LOGIN,} (or C{n,,}: the token names the
    login). Channel binding (C{p=}) is refused, as the RFC has none for it.
    """

    name = "OAUTHBEARER"

    def parse(self, text: str) -> BearerTokenCredentials:
        header, kvsep, rest = text.partition("\x01")
        gs2 = header.split(",")
        if not kvsep or len(gs2) != 3 or gs2[2] != "":
            raise _malformed("OAUTHBEARER response must start with a GS2 header (n,a=LOGIN,)")
        flag, authzid = gs2[0], gs2[1]
        if flag not in ("n", "y"):
            raise _malformed("OAUTHBEARER has no channel binding; the GS2 flag must be n or y")
        username = ""
        if authzid:
            if not authzid.startswith("a="):
                raise _malformed("OAUTHBEARER authzid must be a=LOGIN")
            username = _decodeIdentity(_saslname(authzid[2:]).encode("utf-8"), "login")
        token = _bearer(_pairs(rest, "OAUTHBEARER"), "OAUTHBEARER")
        return BearerTokenCredentials(username, token, self.name, origin=self.origin)


@implementer(ISASLMechanism)
class XOAuth2(_TokenMechanism):
    """
    Google's XOAUTH2: C{user=LOGIN ^A auth=Bearer TOKEN ^A ^A}; after a
    refusal the client answers the error challenge with an empty response.
    """

    name = "XOAUTH2"

    def parse(self, text: str) -> BearerTokenCredentials:
        pairs = _pairs(text, "XOAUTH2")
        if "user" not in pairs:
            raise _malformed("XOAUTH2 response needs user=LOGIN")
        username = _decodeIdentity(pairs["user"].encode("utf-8"), "login")
        return XOAuth2Credentials(
            username, _bearer(pairs, "XOAUTH2"), self.name, origin=self.origin
        )


# Mechanism name -> class; each is built with a SASLContext. The daemon adds
# the SCRAM entries (mailauth.scram.mechanisms), which need the users.
MECHANISMS = {m.name: m for m in (Plain, Login, CramMD5, OAuthBearer, XOAuth2)}


def offered(table: dict, names: tuple, context: SASLContext) -> tuple:
    """The mechanisms of C{names} to offer on a session: those available there."""
    return tuple(n for n in names if getattr(table[n], "available", lambda context: True)(context))
