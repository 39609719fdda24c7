"""SCRAM (RFC 5802, RFC 7677) with Dovecot's stored keys, so no password-equivalent is on disk."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
from typing import Any, Callable, Optional, cast

import attrs
from twisted.cred.credentials import ICredentials
from twisted.cred.error import LoginFailed
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from mailauth import allownets, durable, replies, sasl
from mailauth.interfaces import ILoginOrigin, ISASLMechanism
from mailauth.legacyschemes import Scheme

#: The stored schemes, by the name of the hash they use.
HASHES = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}

#: doveadm's iteration count, and the least RFC 7677 (section 4) and
#: Dovecot accept.
DEFAULT_ITERATIONS = 4096
MIN_ITERATIONS = 4096

#: The most we accept: room for OWASP's 600,000 for PBKDF2-HMAC-SHA256,
#: while one PLAIN verification (and each client's login) stays about as
#: dear as one ARGON2ID verification, a quarter of a second.
MAX_ITERATIONS = 1_000_000

#: doveadm's salt length, in bytes.
SALT_LENGTH = 16

#: The channel binding types (RFC 5929, RFC 9266).
TLS_EXPORTER = "tls-exporter"
TLS_UNIQUE = "tls-unique"
TLS_SERVER_END_POINT = "tls-server-end-point"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    """Strict base64: padding required, no stray characters."""
    if len(text) % 4:
        raise binascii.Error("bad length")
    return base64.b64decode(text, validate=True)


@attrs.frozen
class ScramKeys:
    """
    What a SCRAM server keeps of a password (RFC 5802 section 3): the salt
    and iteration count the client needs, the StoredKey that checks its
    proof and the ServerKey that proves the server to it. Neither key lets
    anyone log in.

    @ivar scheme: C{SCRAM-SHA-256} or C{SCRAM-SHA-1}.
    """

    scheme: str
    iterations: int
    salt: bytes
    storedKey: bytes = attrs.field(repr=False)
    serverKey: bytes = attrs.field(repr=False)

    @property
    def hashName(self) -> str:
        return HASHES[self.scheme]

    @classmethod
    def parse(cls, scheme: str, value: str) -> ScramKeys:
        """
        Read C{iterations,salt,StoredKey,ServerKey} as C{doveadm pw} prints
        it after the C{{SCHEME}} prefix.

        @raise ValueError: one line naming what is wrong.
        """
        hashName = HASHES[scheme]
        size = hashlib.new(hashName).digest_size
        fields = value.split(",")
        if len(fields) != 4:
            raise ValueError(f"a {scheme} hash is iterations,salt,StoredKey,ServerKey")
        count, salt, stored, server = fields
        if not re.fullmatch(r"[1-9][0-9]{0,9}", count):
            raise ValueError(f"{scheme} iteration count {count[:12]!r} is not a number")
        iterations = int(count)
        if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
            raise ValueError(
                f"{scheme} iteration count {iterations} is outside "
                f"{MIN_ITERATIONS}..{MAX_ITERATIONS}"
            )
        try:
            keys = cls(scheme, iterations, _unb64(salt), _unb64(stored), _unb64(server))
        except binascii.Error:
            raise ValueError(f"a {scheme} salt or key is not base64") from None
        if not keys.salt:
            raise ValueError(f"{scheme} salt is empty")
        if len(keys.storedKey) != size or len(keys.serverKey) != size:
            raise ValueError(f"a {scheme} StoredKey and ServerKey are {size} bytes each")
        return keys

    @classmethod
    def fromPassword(
        cls,
        password: bytes,
        scheme: str = "SCRAM-SHA-256",
        iterations: int = DEFAULT_ITERATIONS,
        salt: Optional[bytes] = None,
    ) -> ScramKeys:
        """
        Derive the keys of C{password}, with a fresh random salt unless one
        is given. The password is used as it is, as Dovecot does (clients
        SASLprep theirs, which changes only unusual non-ASCII passwords).
        """
        if salt is None:
            salt = secrets.token_bytes(SALT_LENGTH)
        hashName = HASHES[scheme]
        salted = hashlib.pbkdf2_hmac(hashName, password, salt, iterations)
        clientKey = hmac.new(salted, b"Client Key", hashName).digest()
        serverKey = hmac.new(salted, b"Server Key", hashName).digest()
        return cls(scheme, iterations, salt, hashlib.new(hashName, clientKey).digest(), serverKey)

    def format(self) -> str:
        """The value as C{doveadm pw} prints it after the C{{SCHEME}} prefix."""
        return ",".join(
            [str(self.iterations), _b64(self.salt), _b64(self.storedKey), _b64(self.serverKey)]
        )

    def verifyPassword(self, password: bytes) -> bool:
        """
        Whether C{password} is the one these keys were made from (for PLAIN
        and LOGIN). Blocks for the iteration count: call it in a thread.
        """
        other = ScramKeys.fromPassword(password, self.scheme, self.iterations, self.salt)
        return hmac.compare_digest(other.storedKey, self.storedKey)

    def proofValid(self, authMessage: bytes, proof: bytes) -> bool:
        """
        Whether C{proof} is the ClientProof of C{authMessage} (RFC 5802
        section 3), compared in constant time.
        """
        signature = hmac.new(self.storedKey, authMessage, self.hashName).digest()
        if len(proof) != len(signature):
            return False
        clientKey = bytes(a ^ b for a, b in zip(proof, signature))
        return hmac.compare_digest(hashlib.new(self.hashName, clientKey).digest(), self.storedKey)

    def serverSignature(self, authMessage: bytes) -> bytes:
        """The ServerSignature of C{authMessage}, sent as C{v=}."""
        return hmac.new(self.serverKey, authMessage, self.hashName).digest()

    def same(self, other: ScramKeys) -> bool:
        """Whether C{other} holds the same keys (the StoredKey compared in constant time)."""
        mine = (self.scheme, self.iterations, self.salt, self.serverKey)
        theirs = (other.scheme, other.iterations, other.salt, other.serverKey)
        return hmac.compare_digest(self.storedKey, other.storedKey) and mine == theirs


def storedKeys(stored: Any, scheme: str) -> Optional[ScramKeys]:
    """
    The SCRAM keys in a user's stored password.

    @param stored: a L{mailauth.passwords.PasswordHash}.
    @return: the keys, or L{None} if C{stored} is not of C{scheme} (such a
        user cannot log in with this mechanism). doveadm writes SCRAM keys
        with no encoding suffix; keys written with one (C{.B64}, C{.HEX})
        still verify over PLAIN, but are not used here.
    """
    if stored.scheme != scheme or stored.encoding is not None:
        return None
    return ScramKeys.parse(scheme, stored.value)


def _scheme(scheme: str) -> Scheme:
    """The L{mailauth.passwords} table entry: raw values are doveadm's text."""

    def check(raw: bytes) -> None:
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"a {scheme} hash is ASCII") from None
        ScramKeys.parse(scheme, text)

    def verify(raw: bytes, password: bytes, login: Optional[str]) -> bool:
        return ScramKeys.parse(scheme, raw.decode("ascii")).verifyPassword(password)

    def generate(password: bytes, login: Optional[str]) -> bytes:
        return ScramKeys.fromPassword(password, scheme).format().encode("ascii")

    return Scheme(check, verify, generate)


#: The stored schemes, for L{mailauth.passwords}' table.
SCHEMES = {name: _scheme(name) for name in HASHES}


# -- channel bindings ---------------------------------------------------------


def _endPointHash(connection: Any) -> Optional[bytes]:
    """
    RFC 5929 section 4.1: the hash of our certificate, with the hash of its
    signature algorithm (SHA-256 for MD5 and SHA-1); L{None} for a
    certificate whose signature has no separate hash (Ed25519, Ed448).
    """
    from cryptography.hazmat.primitives import hashes
    from OpenSSL import crypto

    certificate = connection.get_certificate()
    if certificate is None:
        return None
    algorithm = certificate.to_cryptography().signature_hash_algorithm
    if algorithm is None:
        return None
    if isinstance(algorithm, (hashes.MD5, hashes.SHA1)):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate))
    return digest.finalize()


def channelBinding(connection: Any, cbType: str) -> Optional[bytes]:
    """
    The channel binding data of type C{cbType} for a server-side TLS
    connection.

    C{tls-exporter} (RFC 9266) is given for TLS 1.3 only: on TLS 1.2 it is
    defined only with the extended master secret, which pyOpenSSL cannot
    tell us was negotiated. C{tls-unique} (RFC 5929) is given for TLS 1.2
    only (it is undefined for TLS 1.3): it is the first Finished message of
    the handshake, the client's, since mailauth's TLS contexts (Twisted's
    C{CertificateOptions}) neither cache sessions nor issue tickets, so no
    handshake is abbreviated. C{tls-server-end-point} is given for both.

    @param connection: the L{OpenSSL.SSL.Connection}, or anything else (a
        socket, L{None}) without TLS.
    @return: the data, or L{None} if this connection has none of that type.
    """
    from OpenSSL import SSL

    if not isinstance(connection, SSL.Connection):
        return None
    try:
        version = connection.get_protocol_version_name()
        if cbType == TLS_EXPORTER and version == "TLSv1.3":
            return connection.export_keying_material(b"EXPORTER-Channel-Binding", 32)
        if cbType == TLS_UNIQUE and version == "TLSv1.2":
            return connection.get_peer_finished()
        if cbType == TLS_SERVER_END_POINT and version in ("TLSv1.2", "TLSv1.3"):
            return _endPointHash(connection)
    except SSL.Error:
        # The handshake is not finished: there is nothing to bind to yet.
        pass
    return None


def channelBindingTypes(connection: Any) -> tuple:
    """The channel binding types that L{channelBinding} gives for C{connection}."""
    return tuple(
        t
        for t in (TLS_EXPORTER, TLS_UNIQUE, TLS_SERVER_END_POINT)
        if channelBinding(connection, t) is not None
    )


# -- the server secret: stable fake salts for logins that do not exist ---------

_SECRET_LENGTH = 32


def loadSecret(path: str) -> bytes:
    """
    Read the server's SCRAM secret from C{path}, making it (32 random bytes,
    mode 0600) if it does not exist. Blocking: call it while starting.

    @raise ValueError: if the file holds fewer than 32 bytes.
    """
    try:
        durable.writeDurably(path, secrets.token_bytes(_SECRET_LENGTH))
    except FileExistsError:
        pass
    else:
        durable.fsyncDirectory(os.path.dirname(os.path.abspath(path)))
    with open(path, "rb") as f:
        secret = f.read()
    if len(secret) < _SECRET_LENGTH:
        raise ValueError(f"{path}: the SCRAM secret is shorter than {_SECRET_LENGTH} bytes")
    return secret


def fakeKeys(secret: bytes, scheme: str, login: str) -> ScramKeys:
    """
    Keys for a login that has none: the salt is derived from the server
    secret and the lower-cased login, so it is the same at every attempt,
    and the iteration count is the default, as for users that doveadm made.
    Nobody can answer them: the StoredKey is not the hash of any key known.
    """

    def derive(label: bytes, size: int) -> bytes:
        data = label + b"\0" + scheme.encode() + b"\0" + login.lower().encode("utf-8")
        return hmac.new(secret, data, "sha256").digest()[:size]

    size = hashlib.new(HASHES[scheme]).digest_size
    return ScramKeys(
        scheme,
        DEFAULT_ITERATIONS,
        derive(b"salt", SALT_LENGTH),
        derive(b"stored", size),
        derive(b"server", size),
    )


# -- the credentials the mechanism hands to the portal -----------------------


class IScramCredentials(ICredentials):
    """
    The end of a SCRAM exchange: the login, the keys it was answered with,
    and whether the client's proof was right for them.
    """


@implementer(IScramCredentials, ILoginOrigin)
@attrs.frozen
class ScramCredentials:
    """
    What a finished SCRAM exchange tells the portal. The mechanism checked
    the proof (in constant time); the checker (L{mailauth.checkers.ScramChecker})
    looks the user up again and accepts only a verified proof for the keys
    the user has now.

    @ivar scheme: the stored scheme the keys belong to.
    @ivar verified: the client's proof was right for C{keys}.
    """

    username: str
    mechanism: str
    scheme: str
    keys: ScramKeys
    verified: bool
    origin: Optional[allownets.Origin] = attrs.field(default=None, kw_only=True)


# -- the server mechanism ---------------------------------------------------

_CB_NAME = re.compile(r"[A-Za-z0-9.-]+")
_PRINTABLE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")
_ATTRIBUTE = re.compile(r"[A-Za-z]=[^,\0]+")


class _Refused(Exception):
    """
    An RFC 5802 error: C{value} is its C{e=} name, C{outcome} the exception
    that makes the session's reply.
    """

    def __init__(self, value: str, outcome: Exception) -> None:
        super().__init__(value)
        self.value = value
        self.outcome = outcome


def _refused(value: str, code: int, text: str) -> _Refused:
    """The reply names the RFC 5802 error value, for clients that show only the reply."""
    return _Refused(value, sasl.SASLError(code, f"{text} ({value})"))


def _malformed(value: str, why: str) -> _Refused:
    return _refused(value, 501, f"5.5.2 {why}")


def _saslname(text: str, what: str) -> str:
    """RFC 5802 section 5.1: undo C{=2C} and C{=3D}; anything else after C{=} is refused."""
    if not re.fullmatch(r"(?:[^=,\0]|=2C|=3D)+", text):
        raise _malformed("invalid-username-encoding", f"SCRAM {what} is badly encoded")
    name = text.replace("=2C", ",").replace("=3D", "=")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise _malformed("invalid-username-encoding", f"SCRAM {what} holds control characters")
    return name


def _serverNonce() -> str:
    return secrets.token_urlsafe(24)


@attrs.frozen
class _ClientFirst:
    flag: str
    cbType: Optional[str]
    authzid: Optional[str]
    username: str
    nonce: str
    header: bytes
    bare: bytes


def _parseClientFirst(data: bytes) -> _ClientFirst:
    """RFC 5802 section 7, C{client-first-message}."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed("invalid-encoding", "SCRAM message is not UTF-8") from None
    parts = text.split(",", 2)
    if len(parts) != 3 or "\0" in text:
        raise _malformed("invalid-encoding", "SCRAM client-first message is malformed")
    flag, authzid, bare = parts
    cbType = None
    if flag.startswith("p="):
        cbType = flag[2:]
        if not _CB_NAME.fullmatch(cbType):
            raise _malformed("invalid-encoding", "SCRAM channel binding name is malformed")
        flag = "p"
    elif flag not in ("n", "y"):
        raise _malformed("invalid-encoding", "SCRAM channel binding flag is not n, y or p=")
    if authzid:
        if not authzid.startswith("a="):
            raise _malformed("invalid-encoding", "SCRAM authzid is malformed")
        authzid = _saslname(authzid[2:], "authzid")
    fields = bare.split(",")
    if fields[0].startswith("m="):
        raise _refused(
            "extensions-not-supported", 504, "5.5.4 SCRAM mandatory extensions are not supported"
        )
    if len(fields) < 2 or not fields[0].startswith("n=") or not fields[1].startswith("r="):
        raise _malformed("invalid-encoding", "SCRAM client-first message needs n= and r=")
    username = _saslname(fields[0][2:], "username")
    nonce = fields[1][2:]
    if not _PRINTABLE.fullmatch(nonce):
        raise _malformed("invalid-encoding", "SCRAM client nonce is empty or not printable")
    if not all(_ATTRIBUTE.fullmatch(f) for f in fields[2:]):
        raise _malformed("invalid-encoding", "SCRAM extension is malformed")
    header = data[: len(data) - len(bare.encode("utf-8"))]
    return _ClientFirst(
        flag, cbType, authzid or None, username, nonce, header, bare.encode("utf-8")
    )


@implementer(ISASLMechanism)
class ScramMechanism:
    """
    The server side of one SCRAM exchange, SCRAM-SHA-256(-PLUS) or
    SCRAM-SHA-1(-PLUS).

    After the client-first message it looks the user up; a login that does
    not exist, or whose password is stored in another scheme, gets keys
    from L{fakeKeys}, so the exchange looks the same as for a real user and
    fails only at the end, with the same reply as a wrong password.

    A right proof is answered with the server-final C{v=} as a challenge;
    the credentials go to the portal once the client answers it with an
    empty response (RFC 4954 section 4). A wrong proof hands the portal
    credentials marked unverified at once, so the failure is counted even
    if the client then hangs up, and the session answers 535 with no
    C{e=invalid-proof}, as Dovecot and Cyrus do: GNU SASL (msmtp, gsasl)
    cannot parse an C{e=} and would report a protocol error instead of a
    failed login. The other errors of the client-final message are sent as
    a server-final C{e=} challenge (RFC 4422 section 3.6: an SMTP reply
    cannot carry it) and the client's next response, whatever it is, gets
    the error reply; errors of the client-first message, where RFC 5802
    has no C{e=}, get the reply at once. Every reply names the error value.
    """

    def __init__(
        self,
        context: sasl.SASLContext,
        *,
        name: str,
        users: Any,
        secret: bytes,
        makeNonce: Callable[[], str] = _serverNonce,
    ) -> None:
        self.name = name
        self.scheme = name.removesuffix("-PLUS")
        self.plus = name.endswith("-PLUS")
        self.context = context
        self.users = users
        self.secret = secret
        self.makeNonce = makeNonce
        self._respond: Callable[[bytes], Any] = self._clientFirst
        self._refusal: Optional[Exception] = None

    def start(self, initial: Optional[bytes]) -> Any:
        if initial is None:
            return sasl.Challenge(b"")
        return self.respond(initial)

    def respond(self, data: bytes) -> Any:
        if self._refusal is not None:
            raise self._refusal
        step = self._respond
        try:
            result = step(data)
        except _Refused as e:
            return self._refuse(e, final=step == self._clientFinal)
        if isinstance(result, defer.Deferred):
            return result.addErrback(self._refuseLater)
        return result

    def _refuse(self, refused: _Refused, final: bool) -> sasl.Challenge:
        """
        RFC 5802 has C{e=} only in the server-final message: an error in the
        client-final message is sent so, as a challenge (RFC 4422 section
        3.6), and the client's answer gets the reply; an error in the
        client-first message is answered at once.
        """
        if not final:
            raise refused.outcome
        self._refusal = refused.outcome
        return sasl.Challenge(b"e=" + refused.value.encode("ascii"))

    def _refuseLater(self, f: Failure) -> None:
        f.trap(_Refused)
        refused = cast(_Refused, f.value)
        raise refused.outcome

    # -- client-first ----------------------------------------------------

    def _clientFirst(self, data: bytes) -> defer.Deferred:
        first = _parseClientFirst(data)
        binding = self._bindingFor(first)
        if first.authzid is not None and first.authzid.lower() != first.username.lower():
            raise _Refused("other-error", sasl.AuthzidMismatch(first.username))
        d = defer.maybeDeferred(self.users.lookup, first.username)
        d.addCallbacks(self._serverFirst, self._unavailable, (first, binding))
        return d

    def _bindingFor(self, first: _ClientFirst) -> Optional[bytes]:
        """The channel binding data the client must send back (RFC 5802 section 6)."""
        if self.plus:
            if first.flag != "p":
                raise _malformed("channel-bindings-dont-match", f"{self.name} needs the p= flag")
            cbType = first.cbType or ""
            data = channelBinding(self.context.tls, cbType)
            if data is None:
                raise _refused(
                    "unsupported-channel-binding-type",
                    504,
                    f"5.5.4 SCRAM channel binding {replies.echo(cbType)} is not available here",
                )
            return data
        if first.flag == "p":
            raise _refused(
                "channel-binding-not-supported",
                504,
                f"5.5.4 {self.name} does not bind; use {self.name}-PLUS",
            )
        if first.flag == "y" and any(
            n.startswith("SCRAM-") and n.endswith("-PLUS") for n in self.context.offered
        ):
            # The client binds but saw no -PLUS: someone removed it (section 6).
            raise _refused(
                "server-does-support-channel-binding",
                535,
                "5.7.8 SCRAM-PLUS was offered: possible downgrade attack",
            )
        return None

    def _unavailable(self, f: Failure) -> None:
        from mailauth.userdb import UserDatabaseUnavailable

        f.trap(UserDatabaseUnavailable, LoginFailed)
        raise _Refused(
            "no-resources",
            sasl.SASLError(replies.AUTH_UNAVAILABLE.code, replies.AUTH_UNAVAILABLE.text),
        )

    def _serverFirst(self, user: Any, first: _ClientFirst, binding: Optional[bytes]):
        keys = None if user is None else storedKeys(user.password, self.scheme)
        # A user who may not log in from here (allow_nets) gets its own salt
        # but never a server signature: that would tell the client its
        # password was right. Its proof fails as a wrong one does, and the
        # checker says why.
        self._fake = keys is None or allownets.refusal(user, self.context.origin) is not None
        # Nor does a suspended user: its proof is checked (the checker tells
        # a right one, not a guess, from a wrong one), never confirmed.
        self._withhold = self._fake or user.suspended
        if keys is None:
            keys = fakeKeys(self.secret, self.scheme, first.username)
        self._first, self._binding, self._keys = first, binding, keys
        self._nonce = (first.nonce + self.makeNonce()).encode("ascii")
        self._serverFirstMessage = b"r=%s,s=%s,i=%d" % (
            self._nonce,
            _b64(keys.salt).encode("ascii"),
            keys.iterations,
        )
        self._respond = self._clientFinal
        return sasl.Challenge(self._serverFirstMessage)

    # -- client-final ----------------------------------------------------

    def _clientFinal(self, data: bytes) -> Any:
        first, keys = self._first, self._keys
        self._respond = self._finished
        head, sep, proofText = data.rpartition(b",p=")
        fields = head.split(b",")
        if (
            not sep
            or len(fields) < 2
            or not fields[0].startswith(b"c=")
            or not fields[1].startswith(b"r=")
            or not all(re.fullmatch(rb"[A-Za-z]=[^,\0]+", f) for f in fields[2:])
        ):
            raise _malformed("invalid-encoding", "SCRAM client-final message is malformed")
        try:
            cbind = _unb64(fields[0][2:].decode("ascii"))
            proof = _unb64(proofText.decode("ascii"))
        except (binascii.Error, UnicodeDecodeError):
            raise _malformed("invalid-encoding", "SCRAM c= or p= is not base64") from None
        if not hmac.compare_digest(cbind, first.header + (self._binding or b"")):
            raise _refused(
                "channel-bindings-dont-match",
                535,
                "5.7.8 SCRAM channel binding does not match this connection",
            )
        if not hmac.compare_digest(fields[1][2:], self._nonce):
            raise _malformed("other-error", "SCRAM nonce is not the one the server sent")
        if len(proof) != hashlib.new(keys.hashName).digest_size:
            raise _malformed("invalid-encoding", "SCRAM proof has the wrong length")
        authMessage = first.bare + b"," + self._serverFirstMessage + b"," + head
        verified = keys.proofValid(authMessage, proof) and not self._fake
        credentials = ScramCredentials(
            first.username, self.name, self.scheme, keys, verified, origin=self.context.origin
        )
        if not verified or self._withhold:
            return credentials
        self._respond = lambda data: self._acknowledged(data, credentials)
        return sasl.Challenge(b"v=" + _b64(keys.serverSignature(authMessage)).encode("ascii"))

    def _acknowledged(self, data: bytes, credentials: ScramCredentials) -> ScramCredentials:
        self._respond = self._finished
        if data:
            raise sasl.SASLError(501, "5.5.2 SCRAM expects an empty response after v=")
        return credentials

    def _finished(self, data: bytes) -> Any:
        raise sasl.SASLError(501, "5.5.2 SCRAM exchange is over")


@attrs.frozen
class ScramFactory:
    """
    A SASL table entry (see L{mailauth.sasl.SASLContext}) for one SCRAM
    mechanism, holding what its exchanges share.
    """

    name: str
    users: Any
    secret: bytes = attrs.field(repr=False)

    def available(self, context: sasl.SASLContext) -> bool:
        """A -PLUS mechanism only where the connection has channel binding data."""
        return not self.name.endswith("-PLUS") or bool(channelBindingTypes(context.tls))

    def __call__(self, context: sasl.SASLContext) -> ScramMechanism:
        return ScramMechanism(context, name=self.name, users=self.users, secret=self.secret)


#: The SCRAM mechanisms mailauth offers.
MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-1", "SCRAM-SHA-1-PLUS")


def mechanisms(users: Any, secret: bytes) -> dict:
    """The SASL table entries of L{MECHANISMS}, by name."""
    return {name: ScramFactory(name, users, secret) for name in MECHANISMS}
