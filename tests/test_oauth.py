"""
Tests for OAUTHBEARER (RFC 7628) and XOAUTH2: the SASL mechanisms, the
token checks of L{mailauth.oauth} (JWTs minted here with PyJWT, a JWKS
file, a real introspection endpoint served by twisted.web), the checker,
the session's error challenge, the configuration, and the running daemon.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from unittest import mock

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web import resource, server
from zope.interface.verify import verifyObject

from mailauth import config as configmod
from mailauth.allownets import Origin
from mailauth.checkers import AddressRefused, LoginSuspended, OAuthChecker
from mailauth.checks import checkFiles
from mailauth.oauth import Introspector, JWKSFile, TokenVerifier, parseJWKS, verifyJWT
from mailauth.sasl import (
    MECHANISMS,
    BearerTokenCredentials,
    Challenge,
    IBearerToken,
    SASLContext,
    SASLError,
    TokenRefused,
    XOAuth2Credentials,
)
from tests.fakes import MemoryUserDatabase, runInline
from tests.harness import AttackMixin, Daemon
from tests.support import (
    MemoryMailbox,
    RecordingPortal,
    Session,
    TokenIssuer,
    makeFactory,
    withoutSession,
)

ISSUER = TokenIssuer.ISSUER
AUDIENCE = TokenIssuer.AUDIENCE
DISCOVERY = ISSUER + "/.well-known/openid-configuration"


def oauthbearer(token: str, authzid: str = "bob@example.test") -> bytes:
    """What msmtp sends for OAUTHBEARER, with C{token}."""
    a = f"a={authzid}" if authzid else ""
    return f"n,{a},\x01host=mx.example.test\x01port=587\x01auth=Bearer {token}\x01\x01".encode()


def xoauth2(token: str, user: str = "bob@example.test") -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class MechanismTests(unittest.TestCase):
    def start(self, name: str, initial):
        return MECHANISMS[name](SASLContext("mx.example.test", Clock())).start(initial)

    def test_oauthbearer(self) -> None:
        """
        OAUTHBEARER reads the GS2 header's authzid (with its =2C and =3D
        escapes) and the token after C{auth=Bearer}, in any case; the
        credentials are L{IBearerToken}s and never show the token.
        """
        creds = self.start("OAUTHBEARER", oauthbearer("eyJ.a-b_c.d~+/=="))
        self.assertEqual(
            creds, BearerTokenCredentials("bob@example.test", "eyJ.a-b_c.d~+/==", "OAUTHBEARER")
        )
        self.assertTrue(IBearerToken.providedBy(creds))
        self.assertNotIn("eyJ", repr(creds))
        creds = self.start("OAUTHBEARER", b"y,a=b=3Dob=2Cx@example.test,\x01auth=bearer  T\x01\x01")
        self.assertEqual((creds.username, creds.token), ("b=ob,x@example.test", "T"))
        creds = self.start("OAUTHBEARER", b"n,,\x01auth=Bearer T\x01\x01")
        self.assertEqual(creds.username, "")

    def test_xoauth2(self) -> None:
        """XOAUTH2 reads user= and the token."""
        creds = self.start("XOAUTH2", xoauth2("tok.en"))
        self.assertEqual(creds, XOAuth2Credentials("bob@example.test", "tok.en", "XOAUTH2"))

    def test_noInitialResponse(self) -> None:
        """Without an initial response both ask with an empty challenge, then read the next."""
        for name, message in (("OAUTHBEARER", oauthbearer("T")), ("XOAUTH2", xoauth2("T"))):
            mechanism = MECHANISMS[name](SASLContext("mx.example.test", Clock()))
            self.assertEqual(mechanism.start(None), Challenge(b""))
            self.assertEqual(mechanism.respond(message).token, "T")

    def test_malformed(self) -> None:
        """Each malformed message is a 501 naming what is wrong."""
        cases = [
            ("OAUTHBEARER", b"\x01", "must start with a GS2 header"),
            (
                "OAUTHBEARER",
                b"n,a=bob@example.test\x01auth=Bearer T\x01\x01",
                "must start with a GS2 header",
            ),
            ("OAUTHBEARER", b"p=tls-unique,,\x01auth=Bearer T\x01\x01", "no channel binding"),
            ("OAUTHBEARER", b"n,u=bob,\x01auth=Bearer T\x01\x01", "authzid must be a=LOGIN"),
            ("OAUTHBEARER", b"n,a=b=ob,\x01auth=Bearer T\x01\x01", "bare '='"),
            ("OAUTHBEARER", b"n,,\x01auth=Bearer T\x01", "each key=value must end with ^A"),
            ("OAUTHBEARER", b"n,,\x01auth=Bearer T", "must end with ^A"),
            ("OAUTHBEARER", b"n,,\x01\x01", "needs auth=Bearer <token>"),
            ("OAUTHBEARER", b"n,,\x01auth=Basic Ym9i\x01\x01", "needs auth=Bearer <token>"),
            ("OAUTHBEARER", b"n,,\x01auth=Bearer a b\x01\x01", "needs auth=Bearer <token>"),
            ("OAUTHBEARER", b"n,,\x01auth=Bearer T\x01auth=Bearer U\x01\x01", "repeated"),
            ("OAUTHBEARER", b"n,,\x01h st=x\x01auth=Bearer T\x01\x01", "malformed"),
            ("OAUTHBEARER", b"n,a=\xff,\x01auth=Bearer T\x01\x01", "not UTF-8"),
            ("XOAUTH2", b"auth=Bearer T\x01\x01", "needs user=LOGIN"),
            ("XOAUTH2", b"user=\x01auth=Bearer T\x01\x01", "login is empty"),
            ("XOAUTH2", b"user=bob\x01\x01", "needs auth=Bearer <token>"),
        ]
        for name, message, why in cases:
            e = self.assertRaises(SASLError, self.start, name, message)
            self.assertEqual(e.code, 501, message)
            self.assertIn(why, e.text, message)
            self.assertTrue(e.text.startswith("5.5.2 "), e.text)

    def test_errorChallenges(self) -> None:
        """
        A refusal is told as RFC 7628's JSON for OAUTHBEARER (with the
        issuer's discovery URL) and as Google's for XOAUTH2.
        """
        refused = TokenRefused("expired", discovery=DISCOVERY)
        self.assertEqual(
            json.loads(BearerTokenCredentials("", "T").failureChallenge(refused)),
            {"status": "invalid_token", "schemes": "bearer", "openid-configuration": DISCOVERY},
        )
        self.assertEqual(
            json.loads(BearerTokenCredentials("", "T").failureChallenge(UnauthorizedLogin())),
            {"status": "invalid_token", "schemes": "bearer"},
        )
        self.assertEqual(
            json.loads(XOAuth2Credentials("b", "T").failureChallenge(refused)),
            {"status": "401", "schemes": "bearer"},
        )


class JWTTests(unittest.TestCase):
    """L{verifyJWT} with tokens minted by a L{TokenIssuer}."""

    issuer = TokenIssuer("ec", "k1")
    issuer.addKey("k2", "ed25519")
    issuer.addKey("k3", "rsa")
    issuer.addKey("other", "ec")

    def setUp(self) -> None:
        self.keys, _ = parseJWKS(self.issuer.jwks("k1", "k2", "k3").encode())

    def verify(self, token: str, leeway: float = 0):
        return verifyJWT(token, self.keys, ISSUER, AUDIENCE, leeway)

    def refused(self, token: str, why: str, leeway: float = 0) -> None:
        e = self.assertRaises(TokenRefused, self.verify, token, leeway)
        self.assertIn(why, e.why)

    def test_valid(self) -> None:
        """A token signed with any of the keys (ES256, EdDSA, RS256) verifies."""
        for kid in ("k1", "k2", "k3"):
            self.assertEqual(self.verify(self.issuer.mint(kid=kid))["email"], "bob@example.test")

    def test_noKeyID(self) -> None:
        """A token without a kid is tried with every key of its algorithm."""
        import jwt

        private, _ = self.issuer.keys["k2"]
        token = jwt.encode(self.issuer.claims(), private, algorithm="EdDSA")
        self.assertNotIn("kid", jwt.get_unverified_header(token))
        self.assertEqual(self.verify(token)["sub"], "8e1b5c2a")

    def test_badSignature(self) -> None:
        """A token signed by another key under a known kid, or altered, fails."""
        forged = self.issuer.mint(kid="other", headers={"kid": "k1"})
        self.refused(forged, "the signature does not verify")
        head, body, signature = self.issuer.mint().split(".")
        claims = json.loads(base64.urlsafe_b64decode(body + "=="))
        claims["email"] = "alice@example.test"
        altered = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        self.refused(f"{head}.{altered}.{signature}", "the signature does not verify")

    def test_unknownKey(self) -> None:
        """A kid the JWKS does not have fails."""
        self.refused(self.issuer.mint(kid="other"), "no key in the JWKS for kid 'other'")

    def test_expired(self) -> None:
        """An expired token fails; within the leeway it still verifies."""
        self.refused(self.issuer.mint(lifetime=-30), "Signature has expired")
        self.assertTrue(self.verify(self.issuer.mint(lifetime=-30), leeway=60))

    def test_notYetValid(self) -> None:
        """A token whose nbf is ahead fails."""
        self.refused(self.issuer.mint(nbf=int(time.time()) + 600), "not yet valid")

    def test_wrongIssuerOrAudience(self) -> None:
        """Another issuer or audience fails; an audience list naming ours verifies."""
        self.refused(self.issuer.mint(iss="https://evil.example"), "ssuer")
        self.refused(self.issuer.mint(aud="webmail"), "udience")
        self.assertTrue(self.verify(self.issuer.mint(aud=["webmail", AUDIENCE])))

    def test_requiredClaims(self) -> None:
        """A token without exp, iss or aud fails."""
        for claim in ("exp", "iss", "aud"):
            self.refused(self.issuer.mint(**{claim: None}), f'"{claim}"')

    def test_algNone(self) -> None:
        """An unsigned token (alg none) fails, whatever kid it names."""

        def part(data: dict) -> str:
            return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

        token = f"{part({'alg': 'none', 'typ': 'JWT', 'kid': 'k1'})}.{part(self.issuer.claims())}."
        self.refused(token, "signature algorithm 'none' is not accepted")

    def test_hmacWithPublicKey(self) -> None:
        """A token 'signed' with HS256 keyed by a public key fails."""
        import hmac

        def part(data) -> str:
            raw = data if isinstance(data, bytes) else json.dumps(data).encode()
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

        signing = f"{part({'alg': 'HS256', 'kid': 'k3'})}.{part(self.issuer.claims())}"
        secret = json.dumps(self.issuer.jwk("k3")).encode()
        mac = hmac.new(secret, signing.encode(), "sha256").digest()
        self.refused(f"{signing}.{part(mac)}", "signature algorithm 'HS256' is not accepted")

    def test_algorithmOfAnotherKey(self) -> None:
        """A token naming an algorithm its key's type does not do fails."""
        token = self.issuer.mint(kid="k3", alg="PS256", headers={"kid": "k1"})
        self.refused(token, "no key in the JWKS for kid 'k1' and algorithm PS256")

    def test_malformed(self) -> None:
        """Something that is not a JWT fails."""
        self.refused("a.b.c", "malformed JWT")


class JWKSTests(unittest.TestCase):
    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp())
        self.issuer = TokenIssuer("ec", "k1")
        self.issuer.addKey("k2", "ed25519")
        self.issuer.writeJWKS(self.path, "k1")
        self.keys = JWKSFile(self.path)
        self.keys.load()

    def test_shortCoordinateKey(self) -> None:
        """
        A P-256 key whose coordinate has a leading zero byte (one key in
        about 64) is written at full length by the tests' issuer, as RFC
        7518 wants and real issuers do, and is read and used. PyJWT before
        2.8 (Debian's) wrote it short, which the reader rightly refused:
        every test of such a run's issuer then got 454 (once in a while).
        """
        from cryptography.hazmat.primitives.asymmetric import ec

        for _ in range(5000):
            private = ec.generate_private_key(ec.SECP256R1())
            numbers = private.public_key().public_numbers()
            if min(numbers.x, numbers.y) < 1 << 248:
                break
        else:
            self.fail("no P-256 key with a leading zero byte in 5000")
        self.issuer.keys["k3"] = (private, "ES256")
        keys, skipped = parseJWKS(self.issuer.jwks("k3").encode())
        self.assertEqual((len(keys), skipped), (1, []))
        claims = verifyJWT(self.issuer.mint(kid="k3"), keys, ISSUER, AUDIENCE, 0)
        self.assertEqual(claims["email"], "bob@example.test")

    def test_interface(self) -> None:
        """The JWKS file is L{IReloadable}."""
        from mailauth.interfaces import IReloadable

        self.assertTrue(verifyObject(IReloadable, self.keys))

    def test_rotation(self) -> None:
        """
        A replaced JWKS file is read again on change: tokens signed with the
        new key verify, tokens signed with the retired one fail.
        """

        def verify(kid: str):
            return verifyJWT(self.issuer.mint(kid=kid), self.keys.keys(), ISSUER, AUDIENCE, 0)

        self.assertTrue(verify("k1"))
        self.assertRaises(TokenRefused, verify, "k2")
        self.assertFalse(self.keys.maybeReload())
        self.issuer.writeJWKS(self.path, "k2")
        self.assertTrue(self.keys.maybeReload())
        self.assertTrue(verify("k2"))
        self.assertRaises(TokenRefused, verify, "k1")

    def test_badFileKeepsKeys(self) -> None:
        """A JWKS file that cannot be used keeps the keys read before, and says why."""
        for text, why in [
            ("{", "not JSON"),
            ('{"keys": {}}', 'no "keys" list'),
            ('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "no usable signing key"),
        ]:
            with open(self.path, "w") as f:
                f.write(text)
            self.keys.maybeReload()
            self.assertIn(why, self.keys.problems[0])
            self.assertEqual([k.kid for k in self.keys.keys()], ["k1"])

    def test_skippedKeys(self) -> None:
        """Symmetric keys, encryption keys and unknown curves are skipped and named."""
        keys, skipped = parseJWKS(
            json.dumps(
                {
                    "keys": [
                        {"kty": "oct", "k": "c2VjcmV0", "kid": "h"},
                        dict(self.issuer.jwk("k1"), use="enc", kid="e"),
                        dict(self.issuer.jwk("k1"), crv="P-192", kid="c"),
                        dict(self.issuer.jwk("k1"), alg="HS256", kid="a"),
                        self.issuer.jwk("k2"),
                    ]
                }
            ).encode()
        )
        self.assertEqual([k.kid for k in keys], ["k2"])
        self.assertEqual(len(skipped), 4)
        self.assertIn("for 'enc', not for signatures", skipped[1])

    def test_neverRead(self) -> None:
        """Tokens cannot be checked (454, not 535) when the file was never read."""
        keys = JWKSFile(self.path + ".missing")
        keys.load()
        verifier = TokenVerifier(
            issuer=ISSUER,
            audience=AUDIENCE,
            loginClaim="email",
            leeway=0,
            keys=keys,
            introspector=None,
            runBlocking=runInline,
        )
        f = self.failureResultOf(verifier.login(self.issuer.mint()), LoginFailed)
        self.assertFalse(f.check(UnauthorizedLogin))


class ClaimTests(unittest.TestCase):
    def verifier(self, claim: str = "email") -> TokenVerifier:
        return TokenVerifier(
            issuer=ISSUER,
            audience=AUDIENCE,
            loginClaim=claim,
            leeway=0,
            keys=None,
            introspector=None,
            runBlocking=runInline,
        )

    def test_login(self) -> None:
        """
        The login is the configured claim, lower-cased, else sub; an email
        marked unverified is refused.
        """
        verifier = self.verifier()
        self.assertEqual(
            verifier.claimedLogin({"email": "Bob@Example.test", "sub": "x"}), "bob@example.test"
        )
        self.assertEqual(verifier.claimedLogin({"sub": "bob@example.test"}), "bob@example.test")
        self.assertEqual(
            self.verifier("preferred_username").claimedLogin(
                {"preferred_username": "carol@example.test", "email": "x@y"}
            ),
            "carol@example.test",
        )
        # email_verified false as JSON, a string, or a number: refused.
        for unverified in (False, "false", "False", 0, None, ""):
            e = self.assertRaises(
                TokenRefused,
                verifier.claimedLogin,
                {"email": "bob@example.test", "email_verified": unverified},
            )
            self.assertEqual((e.why, e.discovery), ("the token's email is not verified", DISCOVERY))
        for verified in (True, "true", "True"):
            self.assertEqual(
                verifier.claimedLogin({"email": "bob@example.test", "email_verified": verified}),
                "bob@example.test",
            )
        self.assertRaises(TokenRefused, verifier.claimedLogin, {"email": 3})

    def test_opaqueWithoutIntrospection(self) -> None:
        """A token that is no JWT is refused when nothing can introspect it."""
        f = self.failureResultOf(self.verifier().login("opaque-token"), TokenRefused)
        self.assertIn("not a JWT", f.value.why)


class Introspection(resource.Resource):
    """
    An RFC 7662 endpoint: C{answers} maps a token to the JSON object to
    answer (or to an int: that HTTP status, or to L{None}: never answer).
    Requests without the client's credentials get 401.
    """

    isLeaf = True

    def __init__(self, answers: dict) -> None:
        super().__init__()
        self.answers = answers
        self.requests: list = []

    def render_POST(self, request):
        self.requests.append(request)
        if (
            request.getHeader("authorization")
            != "Basic " + base64.b64encode(b"mailauth:s%3Acret").decode()
        ):
            request.setResponseCode(401)
            return b"{}"
        token = request.args[b"token"][0].decode()
        answer = self.answers.get(token, {"active": False})
        if answer is None:
            return server.NOT_DONE_YET
        if isinstance(answer, int):
            request.setResponseCode(answer)
            return b"oops"
        if isinstance(answer, bytes):
            return answer
        request.setHeader("content-type", "application/json")
        return json.dumps(answer).encode()


class IntrospectionTests(unittest.TestCase):
    """L{TokenVerifier} asking a real twisted.web endpoint about opaque tokens."""

    def setUp(self) -> None:
        now = int(time.time())
        self.endpoint = Introspection(
            {
                "good": {
                    "active": True,
                    "iss": ISSUER,
                    "aud": [AUDIENCE, "x"],
                    "exp": now + 60,
                    "email": "bob@example.test",
                },
                "bare": {"active": True, "sub": "carol@example.test"},
                "wrong-iss": {"active": True, "iss": "https://evil.example", "sub": "b"},
                "wrong-aud": {"active": True, "aud": "webmail", "sub": "b"},
                "expired": {"active": True, "exp": now - 120, "sub": "b"},
                "later": {"active": True, "nbf": now + 600, "sub": "b"},
                "error": 500,
                "not-json": b"<html>",
                "hang": None,
            }
        )
        self.port = reactor.listenTCP(0, server.Site(self.endpoint), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/introspect"

    def verifier(self, secret: str = "s:cret", clock=reactor) -> TokenVerifier:
        from twisted.web.client import Agent, HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=False)
        introspector = Introspector(
            Agent(reactor, pool=pool),
            self.url,
            "mailauth",
            secret,
            clock,
            10.0,
            ISSUER,
            AUDIENCE,
            30.0,
        )
        return TokenVerifier(
            issuer=ISSUER,
            audience=AUDIENCE,
            loginClaim="email",
            leeway=30.0,
            keys=None,
            introspector=introspector,
            runBlocking=runInline,
        )

    @defer.inlineCallbacks
    def test_active(self) -> None:
        """
        An active token names its login; the request is a form POST of the
        token, authenticated with the client's credentials.
        """
        self.assertEqual((yield self.verifier().login("good")), "bob@example.test")
        self.assertEqual((yield self.verifier().login("bare")), "carol@example.test")
        request = self.endpoint.requests[0]
        self.assertEqual(request.args, {b"token": [b"good"], b"token_type_hint": [b"access_token"]})
        self.assertEqual(request.getHeader("content-type"), "application/x-www-form-urlencoded")

    @defer.inlineCallbacks
    def test_refused(self) -> None:
        """Inactive, another issuer's or audience's, expired or future tokens are refused."""
        for token, why in [
            ("unknown", "not active"),
            ("wrong-iss", "issuer"),
            ("wrong-aud", "audience"),
            ("expired", "expired"),
            ("later", "not valid before"),
        ]:
            e = yield self.assertFailure(self.verifier().login(token), TokenRefused)
            self.assertIn(why, e.why)
            self.assertEqual(e.discovery, DISCOVERY)

    @defer.inlineCallbacks
    def test_unavailable(self) -> None:
        """
        An endpoint that errs, answers nonsense, refuses our credentials or
        cannot be reached is a temporary failure (454), never a 535.
        """
        cases = [
            ("error", "s:cret", "answered HTTP 500"),
            ("not-json", "s:cret", "not JSON"),
            ("good", "wrong", "answered HTTP 401"),
        ]
        for token, secret, why in cases:
            e = yield self.assertFailure(self.verifier(secret).login(token), LoginFailed)
            self.assertNotIsInstance(e, UnauthorizedLogin)
            self.assertIn(why, str(e))
        yield self.port.stopListening()
        e = yield self.assertFailure(self.verifier().login("good"), LoginFailed)
        self.assertIn("token introspection failed", str(e))

    @defer.inlineCallbacks
    def test_timeout(self) -> None:
        """An endpoint that does not answer in time is a temporary failure."""
        clock = Clock()
        d = self.verifier(clock=clock).login("hang")
        while not self.endpoint.requests:
            yield _turn()
        clock.advance(10)
        e = yield self.assertFailure(d, LoginFailed)
        self.assertIn("token introspection failed", str(e))


def _turn() -> defer.Deferred:
    """Let the reactor run once (the request reaches the endpoint over a real socket)."""
    from twisted.internet.task import deferLater

    return deferLater(reactor, 0.01, lambda: None)


class CheckerTests(unittest.TestCase):
    issuer = TokenIssuer("ec", "k1")

    def setUp(self) -> None:
        path = os.path.abspath(self.mktemp())
        self.issuer.writeJWKS(path)
        keys = JWKSFile(path)
        keys.load()
        self.tokens = TokenVerifier(
            issuer=ISSUER,
            audience=AUDIENCE,
            loginClaim="email",
            leeway=0,
            keys=keys,
            introspector=None,
            runBlocking=runInline,
        )
        self.users = MemoryUserDatabase(
            {"bob@example.test": "{PLAIN}x", "carol@example.test": "{PLAIN}y"}
        )
        self.checker = OAuthChecker(self.users, self.tokens)
        self.logged: list = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def check(self, token: str, username: str = "bob@example.test", mechanism="OAUTHBEARER"):
        return self.checker.requestAvatarId(BearerTokenCredentials(username, token, mechanism))

    def test_interface(self) -> None:
        """The checker is an L{ICredentialsChecker} for bearer tokens."""
        self.assertTrue(verifyObject(ICredentialsChecker, self.checker))
        self.assertEqual(self.checker.credentialInterfaces, (IBearerToken,))

    def test_success(self) -> None:
        """A good token for a local user gives its login, with or without an authzid."""
        self.assertEqual(
            self.successResultOf(self.check(self.issuer.mint("Bob@Example.test"))),
            "bob@example.test",
        )
        self.assertEqual(
            self.successResultOf(self.check(self.issuer.mint(), "")), "bob@example.test"
        )
        # The client may name the login in any spelling it logs in by.
        self.assertEqual(
            self.successResultOf(self.check(self.issuer.mint(), '"Bob"@example.test.')),
            "bob@example.test",
        )

    def test_refusals(self) -> None:
        """
        A token for a login that does not exist here, or for another login
        than the one named, or a bad token, is refused with the reason (the
        session logs it: L{SessionTests.test_refused}); the checker logs
        nothing.
        """
        token = self.issuer.mint("dave@example.test")
        f = self.failureResultOf(self.check(token, ""), TokenRefused)
        self.assertEqual(f.value.why, "the token names <dave@example.test>, who is not a user here")
        f = self.failureResultOf(self.check(self.issuer.mint("carol@example.test")), TokenRefused)
        self.assertEqual(f.value.why, "the token is for <carol@example.test>")
        self.assertEqual(f.value.discovery, DISCOVERY)
        expired = self.issuer.mint(lifetime=-100)
        f = self.failureResultOf(self.check(expired), TokenRefused)
        self.assertEqual(f.value.why, "Signature has expired")
        self.assertEqual([formatEvent(e) for e in self.logged], [])

    def test_allowNets(self) -> None:
        """
        A good token for a login restricted by allow_nets logs it in from
        inside the networks only; from outside it is refused as a bad
        token is (an UnauthorizedLogin, with the issuer's discovery URL for
        the client), saying why. So is a good token of a suspended login.
        """
        self.users.source["bob@example.test"] = "{PLAIN}x::::::allow_nets=10.0.0.0/8"
        self.users.load()

        def check(client: str):
            credentials = BearerTokenCredentials(
                "", self.issuer.mint(), "OAUTHBEARER", origin=Origin.of(client, client)
            )
            return self.checker.requestAvatarId(credentials)

        self.assertEqual(self.successResultOf(check("10.0.0.1")), "bob@example.test")
        f = self.failureResultOf(check("192.0.2.1"), AddressRefused)
        self.assertTrue(f.check(UnauthorizedLogin))
        self.assertEqual(f.value.why, "IP 192.0.2.1 not in allowed networks")
        # The client is told the issuer, as for a refused token.
        self.assertEqual(f.value.discovery, DISCOVERY)
        self.users.source["bob@example.test"] = "{PLAIN}x::::::nologin"
        self.users.load()
        f = self.failureResultOf(check("10.0.0.1"), LoginSuspended)
        self.assertEqual(f.value.discovery, DISCOVERY)

    def test_databaseUnavailable(self) -> None:
        """A user database that cannot answer is a temporary failure."""
        checker = OAuthChecker(MemoryUserDatabase(None), self.tokens)
        f = self.failureResultOf(
            checker.requestAvatarId(BearerTokenCredentials("", self.issuer.mint(), "OAUTHBEARER")),
            LoginFailed,
        )
        self.assertFalse(f.check(UnauthorizedLogin))


class SessionTests(unittest.TestCase):
    """The session's side of a bearer token exchange, over a StringTransport."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.portal = RecordingPortal(avatar=MemoryMailbox(login="bob@example.test"))
        self.factory = makeFactory(
            self.clock,
            portal=self.portal,
            mechanisms=("PLAIN", "OAUTHBEARER", "XOAUTH2"),
            plaintextRequiresTLS=False,
        )
        self.session = Session(self.factory)
        self.session.read()
        self.session.command(b"EHLO client.example")

    def test_success(self) -> None:
        """A token the portal accepts logs in as the avatar's login, even without an authzid."""
        reply = self.session.command(b"AUTH OAUTHBEARER " + b64(oauthbearer("T", "")))
        self.assertEqual(reply, [])
        credentials, _ = self.portal.logins[0]
        self.assertEqual((credentials.username, credentials.token), ("", "T"))
        self.portal.succeed()
        self.assertEqual(self.session.read(), [b"235 2.7.0 Authentication successful"])
        self.assertEqual(self.session.protocol.login, "bob@example.test")

    def refuse(self) -> list:
        self.portal.fail(exc=TokenRefused("expired", discovery=DISCOVERY))
        return self.session.read()

    def test_oauthbearerRefused(self) -> None:
        """
        A refused token gets a 334 with RFC 7628's JSON error; the client's
        dummy response (^A) then gets 535, and the failure counts once.
        """
        self.session.command(b"AUTH OAUTHBEARER " + b64(oauthbearer("T")))
        [line] = self.refuse()
        self.assertTrue(line.startswith(b"334 "), line)
        self.assertEqual(
            json.loads(base64.b64decode(line[4:])),
            {"status": "invalid_token", "schemes": "bearer", "openid-configuration": DISCOVERY},
        )
        self.assertEqual(
            self.session.command(b64(b"\x01")), [b"535 5.7.8 Authentication credentials invalid"]
        )
        self.assertEqual(self.session.protocol._authFailures, 1)
        self.assertEqual(self.session.command(b"NOOP"), [b"250 2.0.0 Ok"])

    def test_suspendedLikeRefused(self) -> None:
        """
        A good token of a suspended login gets what a refused token gets
        (the error challenge, then 535 to the dummy response), logged as
        suspended; it counts towards the session's failures, not as a guess.
        """
        self.session.command(b"AUTH OAUTHBEARER " + b64(oauthbearer("T")))
        suspended = LoginSuspended(login="bob@example.test")
        suspended.discovery = DISCOVERY  # as OAuthChecker sets it
        self.portal.fail(exc=suspended)
        [line] = self.session.read()
        self.assertTrue(line.startswith(b"334 "), line)
        self.assertEqual(
            json.loads(base64.b64decode(line[4:])),
            {"status": "invalid_token", "schemes": "bearer", "openid-configuration": DISCOVERY},
        )
        self.assertEqual(
            self.session.command(b64(b"\x01")), [b"535 5.7.8 Authentication credentials invalid"]
        )
        self.assertEqual(self.session.protocol._authFailures, 1)
        self.assertEqual(self.factory.throttle.trackedKeys(), 0)

    def test_xoauth2Refused(self) -> None:
        """
        XOAUTH2 as Google documents it: an empty challenge, the client's
        message, the JSON error with status 401, an empty response, 535.
        """
        self.assertEqual(self.session.command(b"AUTH XOAUTH2"), [b"334 "])
        self.assertEqual(self.session.command(b64(xoauth2("T"))), [])
        [line] = self.refuse()
        self.assertEqual(
            json.loads(base64.b64decode(line[4:])), {"status": "401", "schemes": "bearer"}
        )
        self.assertEqual(
            self.session.command(b""), [b"535 5.7.8 Authentication credentials invalid"]
        )

    def test_anyResponseEndsIt(self) -> None:
        """Even '*' or a line that is not base64 after the error gets the 535."""
        for answer in (b"*", b"!!"):
            self.session.command(b"AUTH OAUTHBEARER " + b64(oauthbearer("T")))
            self.refuse()
            self.assertEqual(
                self.session.command(answer), [b"535 5.7.8 Authentication credentials invalid"]
            )

    def test_temporaryFailure(self) -> None:
        """A token that cannot be checked now gets 454 at once, no challenge."""
        self.session.command(b"AUTH OAUTHBEARER " + b64(oauthbearer("T")))
        self.portal.fail(exc=LoginFailed("introspection unreachable"))
        self.assertEqual(self.session.read(), [b"454 4.7.0 Temporary authentication failure"])

    def test_tarpitAfterResponse(self) -> None:
        """Past the throttle's threshold the 535 waits its delay after the dummy response."""
        self.patch(
            self.factory.throttle, "failure", lambda host, login, session: defer.succeed(2.0)
        )
        self.session.command(b"AUTH OAUTHBEARER " + b64(oauthbearer("T")))
        self.refuse()
        self.assertEqual(self.session.command(b64(b"\x01")), [])
        self.clock.advance(2)
        self.assertEqual(self.session.read(), [b"535 5.7.8 Authentication credentials invalid"])

    def test_limitBeforeChallenge(self) -> None:
        """The failure that reaches the session's limit hangs up with 421, no challenge."""
        self.session.protocol._authFailures = self.factory.failuresPerSession - 1
        self.session.command(b"AUTH OAUTHBEARER " + b64(oauthbearer("T")))
        [line] = self.refuse()
        self.assertTrue(line.startswith(b"421 "), line)


class ConfigTests(unittest.TestCase):
    BASE = (
        "[listener:s]\nendpoint = tcp:2587\ntls = none\nauth = optional\n"
        "[auth]\nusers = /dev/null\nmechanisms = {mechanisms}\n"
        "[delivery]\nlocal_domains = example.org\nmaildir = /m/{{localpart}}\n"
    )

    def load(self, mechanisms: str = "PLAIN XOAUTH2", oauth: str = None):
        text = self.BASE.format(mechanisms=mechanisms)
        if oauth is not None:
            text += "[oauth]\n" + oauth
        return configmod.loadText(text, "c.conf")

    def problems(self, *args, **kwargs) -> list:
        e = self.assertRaises(configmod.ConfigError, self.load, *args, **kwargs)
        return list(e.problems)

    def test_defaults(self) -> None:
        """[oauth] with issuer, audience and jwks: login_claim email, 1m leeway."""
        cfg = self.load(oauth=f"issuer = {ISSUER}\naudience = mail\njwks = /k.json\n")
        self.assertEqual(
            cfg.oauth,
            configmod.OAuthConfig(
                issuer=ISSUER,
                audience="mail",
                jwks="/k.json",
                login_claim="email",
                introspection_url=None,
                introspection_client_id=None,
                introspection_secret_file=None,
                introspection_timeout=10.0,
                leeway=60.0,
            ),
        )
        self.assertIsNone(self.load("PLAIN").oauth)

    def test_mechanismNeedsSection(self) -> None:
        """OAUTHBEARER or XOAUTH2 without [oauth] is a problem naming the key."""
        self.assertEqual(
            self.problems("PLAIN OAUTHBEARER XOAUTH2"),
            [
                "c.conf: [auth] mechanisms: OAUTHBEARER XOAUTH2 needs an [oauth] section "
                "(issuer, audience, and jwks or introspection_url)"
            ],
        )

    def test_sectionProblems(self) -> None:
        """
        Missing issuer or audience, no way to check tokens, introspection
        without its client, or over http:// to another host, are problems.
        """
        self.assertEqual(
            self.problems(oauth="jwks = /k\n"),
            [
                "c.conf: [oauth] issuer: missing (this key is required)",
                "c.conf: [oauth] audience: missing (this key is required)",
            ],
        )
        self.assertEqual(
            self.problems(oauth="issuer = i\naudience = a\n"),
            [
                "c.conf: [oauth]: set jwks (the issuer's public keys, a JWKS file) or "
                "introspection_url (RFC 7662), or both: nothing could check a token"
            ],
        )
        problems = self.problems(
            oauth="issuer = i\naudience = a\nintrospection_url = http://id.example.org/introspect\n"
        )
        self.assertEqual(len(problems), 3)
        self.assertIn("use https://", problems[0])
        self.assertIn("[oauth] introspection_client_id: missing", problems[1])
        self.assertIn("[oauth] introspection_secret_file: missing", problems[2])
        cfg = self.load(
            oauth="issuer = i\naudience = a\nintrospection_url = "
            "http://127.0.0.1:8080/i\nintrospection_client_id = c\n"
            "introspection_secret_file = /s\nlogin_claim = preferred_username\n"
        )
        self.assertEqual(
            (cfg.oauth.introspection_url, cfg.oauth.login_claim),
            ("http://127.0.0.1:8080/i", "preferred_username"),
        )
        self.assertIn(
            "is not a claim name",
            self.problems(oauth="issuer = i\naudience = a\njwks = /k\nlogin_claim = e mail\n")[0],
        )

    def test_needsPyJWT(self) -> None:
        """Without PyJWT, [oauth] is a problem saying which package to install."""
        with mock.patch.dict(sys.modules, {"jwt": None}):
            problems = self.problems(oauth="issuer = i\naudience = a\njwks = /k\n")
        self.assertEqual(
            problems,
            [
                "c.conf: [oauth]: needs the Python package PyJWT (Debian: "
                "apt install python3-jwt; pip: pip install 'mailauth[oauth]')"
            ],
        )

    def test_checkFiles(self) -> None:
        """check-config reads the JWKS file: missing, or with no usable key, is a problem."""
        path = os.path.abspath(self.mktemp())
        cfg = self.load(oauth=f"issuer = i\naudience = a\njwks = {path}\n")
        self.assertEqual(checkFiles(cfg), [f"c.conf: [oauth] jwks: {path}: cannot be read"])
        with open(path, "w") as f:
            f.write('{"keys": []}')
        self.assertEqual(checkFiles(cfg), [f"c.conf: [oauth] jwks: {path}: no usable signing key"])
        TokenIssuer().writeJWKS(path)
        self.assertEqual(checkFiles(cfg), [])


class DaemonTests(AttackMixin, unittest.TestCase):
    """OAUTHBEARER and XOAUTH2 on the running daemon, with a raw client."""

    issuer = TokenIssuer("ec", "k1")
    issuer.addKey("k2", "ed25519")
    settings = {
        "auth": {"mechanisms": "PLAIN LOGIN OAUTHBEARER XOAUTH2"},
        "oauth": {"issuer": ISSUER, "audience": AUDIENCE, "jwks": "{dir}/jwks.json"},
    }
    files = {"jwks.json": issuer.jwks("k1")}

    def exchange(self, *lines: bytes) -> list:
        """(Blocking.) Log in over implicit TLS: each line sent, each reply read."""
        client = self.connect("submissions")
        client.ehlo()
        return [client.command(line) for line in lines]

    @defer.inlineCallbacks
    def test_login(self) -> None:
        """
        Both mechanisms log in with a token; the log names the mechanism
        and the login; mail can then be sent as that login.
        """
        token = self.issuer.mint()
        success = self.log.waitFor("auth success: .* mechanism=OAUTHBEARER")
        replies = yield self.inThread(
            self.exchange,
            b"AUTH OAUTHBEARER " + b64(oauthbearer(token)),
            b"MAIL FROM:<bob@example.test>",
        )
        self.assertEqual([code for code, _ in replies], [235, 250])
        self.assertEqual(
            withoutSession((yield success)),
            "auth success: client=[127.0.0.1] mechanism=OAUTHBEARER login=<bob@example.test>",
        )
        replies = yield self.inThread(self.exchange, b"AUTH XOAUTH2", b64(xoauth2(token)))
        self.assertEqual([code for code, _ in replies], [334, 235])

    @defer.inlineCallbacks
    def test_refused(self) -> None:
        """
        A bad token: 334 with the JSON error, then 535; logged with why
        (never the token), then as a failure, both lines of the session.
        """
        refused = self.log.waitFor("OAuth token refused: ")
        failure = self.log.waitFor("auth failure: .* mechanism=OAUTHBEARER")
        token = self.issuer.mint(lifetime=-90)
        replies = yield self.inThread(
            self.exchange,
            b"AUTH OAUTHBEARER " + b64(oauthbearer(token)),
            b"AQ==",
        )
        (code, [text]), second = replies
        self.assertEqual(code, 334)
        self.assertEqual(json.loads(base64.b64decode(text))["status"], "invalid_token")
        self.assertEqual(second, (535, [b"5.7.8 Authentication credentials invalid"]))
        failed = yield failure
        why = yield refused
        self.assertEqual(
            withoutSession(failed),
            "auth failure: client=[127.0.0.1] mechanism=OAUTHBEARER login=<bob@example.test>",
        )
        self.assertEqual(
            withoutSession(why),
            "OAuth token refused: client=[127.0.0.1] mechanism=OAUTHBEARER "
            "login=<bob@example.test>: Signature has expired",
        )
        self.assertEqual(why.rpartition(" session=")[2], failed.rpartition(" session=")[2])
        self.assertNotIn(token, why)

    @defer.inlineCallbacks
    def test_keyRotation(self) -> None:
        """
        The daemon reads a replaced JWKS file by itself: the new key's
        tokens log in, the retired key's are refused.
        """
        loaded = self.log.waitFor("JWKS file .*: loaded 1 key")
        self.issuer.writeJWKS(os.path.join(self.daemon.dir, "jwks.json"), "k2")
        yield loaded
        new = yield self.inThread(
            self.exchange, b"AUTH XOAUTH2 " + b64(xoauth2(self.issuer.mint(kid="k2")))
        )
        old = yield self.inThread(
            self.exchange, b"AUTH XOAUTH2 " + b64(xoauth2(self.issuer.mint(kid="k1"))), b""
        )
        self.assertEqual(new[0][0], 235)
        self.assertEqual([code for code, _ in old], [334, 535])


class OptionalTests(unittest.TestCase):
    def test_withoutPyJWT(self) -> None:
        """Without [oauth] the daemon is built and listens with PyJWT absent."""
        hidden = {name: None for name in sys.modules if name == "jwt" or name.startswith("jwt.")}
        hidden.update({"jwt": None, "mailauth.oauth": None})
        with mock.patch.dict(sys.modules, hidden):
            daemon = Daemon(self.mktemp())
            daemon.start()
        self.addCleanup(daemon.stop)
        self.assertEqual(sorted(daemon.ports), ["submission", "submissions"])
