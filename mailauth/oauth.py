"""
OAuth 2.0 bearer tokens for OAUTHBEARER and XOAUTH2: JWTs checked with
PyJWT against the issuer's public keys (a JWKS file, re-read when it
changes), opaque tokens asked about at the issuer's introspection endpoint
(RFC 7662). Imported only when C{[oauth]} is configured: it needs PyJWT.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Optional
from urllib.parse import quote, urlencode

import attrs
import jwt
from twisted.cred.error import LoginFailed
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from mailauth.durable import ReloadableFile
from mailauth.interfaces import BlockingRunner, IReloadable
from mailauth.sasl import TokenRefused
from mailauth.threads import PoolBusy

log = Logger(namespace="mailauth.oauth")

# The signature algorithms accepted, by key type (and curve): asymmetric
# only. "none" and the HMAC ones (HS256...) never are: with a public key as
# the HMAC secret anyone could sign.
_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_CURVES = {
    "EC": {"P-256": ("ES256",), "P-384": ("ES384",), "P-521": ("ES512",)},
    "OKP": {"Ed25519": ("EdDSA",), "Ed448": ("EdDSA",)},
}

#: Every algorithm a token may be signed with.
ALGORITHMS = frozenset(_RSA) | {
    a for curves in _CURVES.values() for c in curves.values() for a in c
}


class KeysUnavailable(Exception):
    """The JWKS file has never been read successfully."""


@attrs.frozen
class SigningKey:
    """
    One usable key of the issuer's JWKS.

    @ivar kid: its key ID, or L{None}.
    @ivar algorithms: the algorithms tokens signed with it may name.
    @ivar key: the public key, as PyJWT takes it.
    """

    kid: Optional[str]
    algorithms: tuple[str, ...]
    key: Any = attrs.field(repr=False)


def _algorithms(data: dict) -> tuple[str, ...]:
    """The algorithms a JWK may verify: by its type and curve, narrowed by its C{alg}."""
    kty, crv, alg = str(data.get("kty")), str(data.get("crv")), data.get("alg")
    allowed: tuple[str, ...] = _RSA if kty == "RSA" else _CURVES.get(kty, {}).get(crv, ())
    if alg is not None:
        allowed = (alg,) if alg in allowed else ()
    return allowed


def parseJWKS(data: bytes) -> tuple[list[SigningKey], list[str]]:
    """
    Read a JSON Web Key Set (RFC 7517 section 5).

    @return: the usable signing keys, and a line for each key skipped
        (symmetric, for encryption, of an unknown type or malformed).
    @raise ValueError: if C{data} is not a key set, or has no usable key.
    """
    try:
        document = json.loads(data)
    except ValueError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('not a JWK Set: no "keys" list')
    keys, skipped = [], []
    for index, entry in enumerate(document["keys"]):
        name = f"key {index}" + (f" ({entry.get('kid')})" if isinstance(entry, dict) else "")
        if not isinstance(entry, dict):
            skipped.append(f"{name}: not an object")
            continue
        if entry.get("use", "sig") != "sig":
            skipped.append(f"{name}: for {entry.get('use')!r}, not for signatures")
            continue
        allowed = _algorithms(entry)
        if not allowed:
            skipped.append(
                f"{name}: kty {entry.get('kty')!r}, crv {entry.get('crv')!r}, alg "
                f"{entry.get('alg')!r}: not an accepted signing key"
            )
            continue
        try:
            key = jwt.PyJWK(entry, allowed[0]).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as e:
            skipped.append(f"{name}: {e}")
            continue
        kid = entry.get("kid")
        keys.append(SigningKey(kid if isinstance(kid, str) else None, allowed, key))
    if not keys:
        raise ValueError("no usable signing key" + "".join(f"; {s}" for s in skipped))
    return keys, skipped


@implementer(IReloadable)
class JWKSFile(ReloadableFile):
    """
    The issuer's keys, read from the JWKS file at C{path} by L{load} and read
    again by L{maybeReload} when it changes (the daemon checks with the
    users file, and on SIGHUP): rotating keys is replacing the file. A file
    that cannot be read or holds no usable key keeps the keys read before.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._keys: Optional[list[SigningKey]] = None

    def load(self) -> bool:
        assert self.file is not None
        try:
            keys, skipped = parseJWKS(self.file.read())
        except (OSError, ValueError) as e:
            why = e.strerror if isinstance(e, OSError) else str(e)
            self.problems = [f"{self.path}: {why}"]
            if isinstance(e, ValueError) or self.reportable():
                kept = "keeping the keys read before" if self._keys else "no token can be checked"
                log.error(
                    "Cannot use the JWKS file {path}: {why}; {kept}",
                    path=self.path,
                    why=why,
                    kept=kept,
                )
            return False
        self._keys, self.problems = keys, [f"{self.path}: skipped {s}" for s in skipped]
        for problem in self.problems:
            log.warn("JWKS file: {problem}", problem=problem)
        log.info("JWKS file {path}: loaded {count} key(s)", path=self.path, count=len(keys))
        return True

    def keys(self) -> list[SigningKey]:
        """@raise KeysUnavailable: if the file was never read."""
        if self._keys is None:
            raise KeysUnavailable(f"the JWKS file {self.path} could not be read")
        return self._keys


def looksLikeJWT(token: str) -> bool:
    """Whether C{token} is a JWS compact serialisation with a readable header."""
    if token.count(".") != 2:
        return False
    try:
        jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        return False
    return True


def verifyJWT(
    token: str, keys: list[SigningKey], issuer: str, audience: str, leeway: float
) -> dict:
    """
    Blocking: check a JWT's signature with the issuer's C{keys}, and its
    expiry (C{exp}, required), not-before (C{nbf}), issuer and audience, all
    with PyJWT.

    @return: its claims.
    @raise TokenRefused: saying why not.
    """
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as e:
        raise TokenRefused(f"malformed JWT: {e}") from None
    alg, kid = header.get("alg"), header.get("kid")
    if alg not in ALGORITHMS:
        raise TokenRefused(f"signature algorithm {alg!r} is not accepted")
    candidates = [k for k in keys if alg in k.algorithms and (kid is None or k.kid == kid)]
    if not candidates:
        raise TokenRefused(f"no key in the JWKS for kid {kid!r} and algorithm {alg}")
    for key in candidates:
        try:
            return jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=audience,
                issuer=issuer,
                leeway=leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError as e:
            raise TokenRefused(f"{e}") from None
    raise TokenRefused("the signature does not verify")


@implementer(IBodyProducer)
class _Body:
    """A request body held in memory, written at once."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer) -> defer.Deferred:
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def _audiences(value: Any) -> list:
    return [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []


class Introspector:
    """
    Asks the issuer about a token it made (RFC 7662): an HTTP POST of
    C{token=...} to C{url}, authenticated as the client C{clientId} with
    HTTP Basic (RFC 6749 section 2.3.1), on the reactor with Twisted's
    L{Agent}. The answer must say C{"active": true}; its C{iss}, C{aud},
    C{exp} and C{nbf}, when present, must agree with the configuration.
    """

    def __init__(
        self,
        agent,
        url: str,
        clientId: str,
        secret: str,
        clock,
        timeout: float,
        issuer: str,
        audience: str,
        leeway: float,
    ) -> None:
        self.agent = agent
        self.url = url
        credentials = f"{quote(clientId, safe='')}:{quote(secret, safe='')}".encode()
        self._authorization = b"Basic " + base64.b64encode(credentials)
        self.clock = clock
        self.timeout = timeout
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway

    def claims(self, token: str) -> defer.Deferred[dict]:
        """
        @return: a Deferred firing with the introspection answer, or failing
            with L{TokenRefused} (inactive, or not for us) or L{LoginFailed}
            (the endpoint cannot be reached or answers nonsense: 454).
        """
        body = urlencode({"token": token, "token_type_hint": "access_token"}).encode("ascii")
        headers = Headers(
            {
                b"Content-Type": [b"application/x-www-form-urlencoded"],
                b"Accept": [b"application/json"],
                b"Authorization": [self._authorization],
            }
        )
        d = self.agent.request(b"POST", self.url.encode("ascii"), headers, _Body(body))
        d.addCallback(self._response)
        d.addTimeout(self.timeout, self.clock)
        d.addCallbacks(self._check, self._failed)
        return d

    def _response(self, response) -> defer.Deferred:
        d = readBody(response)
        if response.code != 200:
            d.addBoth(lambda ignored: self._refusedHTTP(response.code))
        return d

    @staticmethod
    def _refusedHTTP(code: int):
        raise LoginFailed(f"token introspection answered HTTP {code}")

    def _failed(self, f):
        if f.check(TokenRefused, LoginFailed):
            return f
        raise LoginFailed(f"token introspection failed: {f.getErrorMessage() or f.type.__name__}")

    def _check(self, body: bytes) -> dict:
        try:
            answer = json.loads(body)
        except ValueError:
            raise LoginFailed("token introspection answered something that is not JSON") from None
        if not isinstance(answer, dict):
            raise LoginFailed("token introspection answered something that is not a JSON object")
        if answer.get("active") is not True:
            raise TokenRefused("the issuer says the token is not active")
        if "iss" in answer and answer["iss"] != self.issuer:
            raise TokenRefused(f"the token's issuer is {answer['iss']!r}")
        if "aud" in answer and self.audience not in _audiences(answer["aud"]):
            raise TokenRefused(f"the token is not for audience {self.audience!r}")
        now = self.clock.seconds()
        expires, notBefore = _number(answer.get("exp")), _number(answer.get("nbf"))
        if expires is not None and now - self.leeway >= expires:
            raise TokenRefused(f"the token expired at {expires:.0f} (now {now:.0f})")
        if notBefore is not None and now + self.leeway < notBefore:
            raise TokenRefused(f"the token is not valid before {notBefore:.0f} (now {now:.0f})")
        return answer


def _number(value: Any) -> Optional[float]:
    """A JSON number (never a boolean), or L{None}."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


class TokenVerifier:
    """
    Says which login a bearer token names: a JWT is checked against the
    JWKS (in the auth pool, off the reactor); any other token, or any token
    when no JWKS is configured, is introspected. The login is the
    C{loginClaim} claim (for C{email}, unless C{email_verified} is false),
    else C{sub}.

    @ivar discovery: the issuer's OpenID configuration URL, told to clients
        whose token was refused (RFC 7628 section 3.2.2).
    """

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        loginClaim: str,
        leeway: float,
        keys: Optional[JWKSFile],
        introspector: Optional[Introspector],
        runBlocking: BlockingRunner,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.loginClaim = loginClaim
        self.leeway = leeway
        self.keys = keys
        self.introspector = introspector
        self.runBlocking = runBlocking
        self.discovery = issuer.rstrip("/") + "/.well-known/openid-configuration"

    @classmethod
    def fromConfig(cls, cfg, reactor, runBlocking: BlockingRunner) -> TokenVerifier:
        """
        Build it from an L{mailauth.config.OAuthConfig}: the JWKS file is
        read now, the introspection client secret too.
        """
        keys = None
        if cfg.jwks is not None:
            keys = JWKSFile(cfg.jwks)
            keys.load()
        introspector = None
        if cfg.introspection_url is not None:
            with open(cfg.introspection_secret_file, encoding="utf-8") as f:
                secret = f.readline().rstrip("\r\n")
            agent = Agent(
                reactor,
                connectTimeout=cfg.introspection_timeout,
                pool=HTTPConnectionPool(reactor, persistent=False),
            )
            introspector = Introspector(
                agent,
                cfg.introspection_url,
                cfg.introspection_client_id,
                secret,
                reactor,
                cfg.introspection_timeout,
                cfg.issuer,
                cfg.audience,
                cfg.leeway,
            )
        return cls(
            issuer=cfg.issuer,
            audience=cfg.audience,
            loginClaim=cfg.login_claim,
            leeway=cfg.leeway,
            keys=keys,
            introspector=introspector,
            runBlocking=runBlocking,
        )

    def login(self, token: str) -> defer.Deferred[str]:
        """
        @return: a Deferred firing with the lower-cased login C{token}
            names, or failing with L{TokenRefused}, or L{LoginFailed} when
            it cannot be checked now (454).
        """
        if self.keys is not None and looksLikeJWT(token):
            try:
                keys = self.keys.keys()
            except KeysUnavailable as e:
                return defer.fail(LoginFailed(str(e)))
            d = self.runBlocking(verifyJWT, token, keys, self.issuer, self.audience, self.leeway)
        elif self.introspector is not None:
            d = self.introspector.claims(token)
        else:
            return defer.fail(
                self._refused(
                    "not a JWT, and no introspection_url is set to ask about other tokens"
                )
            )
        d.addCallback(self.claimedLogin)
        d.addErrback(self._withDiscovery)
        return d

    def _refused(self, why: str) -> TokenRefused:
        return TokenRefused(why, discovery=self.discovery)

    def _withDiscovery(self, f):
        if f.check(TokenRefused) and f.value.discovery is None:
            raise self._refused(f.value.why)
        if f.check(PoolBusy):
            raise LoginFailed(f"too many logins waiting: {f.getErrorMessage()}")
        return f

    def claimedLogin(self, claims: dict) -> str:
        """
        @return: the login C{claims} name, lower-cased.
        @raise TokenRefused: if they name none.
        """
        value = claims.get(self.loginClaim)
        # Verified when absent or true; false in any form a provider sends
        # it (some map attributes to the strings "false" or "False") is not.
        verified = claims.get("email_verified", True)
        unverified = not (verified is True or str(verified).lower() == "true")
        if self.loginClaim == "email" and value is not None and unverified:
            raise self._refused("the token's email is not verified")
        if not isinstance(value, str) or not value:
            value = claims.get("sub")
        if not isinstance(value, str) or not value:
            raise self._refused(f"the token has neither a {self.loginClaim} nor a sub claim")
        return value.lower()
