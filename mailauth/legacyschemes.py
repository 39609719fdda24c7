"""The legacy digests of old Dovecot passwd-files and LDAP exports, verified as Dovecot 2.3 does."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Callable, Optional

import attrs


@attrs.frozen
class Scheme:
    """
    How one password scheme is checked, verified and made: an entry of the
    scheme table in L{mailauth.passwords}.

    Each function works on the raw value, what is left of C{{SCHEME}value}
    once its encoding (a C{.b64} or C{.hex} suffix, else C{encoding}) is
    undone, as Dovecot's C{password_decode} does.

    @ivar check: raises L{ValueError} with a one-line reason if a raw value
        cannot be of this scheme; it never quotes a plaintext password.
    @ivar verify: C{(raw, password, login)}: whether C{password} is right;
        C{login} is the login as the client gave it, or L{None}.
    @ivar generate: C{(password, login)}: a fresh raw value.
    @ivar encoding: how the raw value is written when no suffix says:
        C{"none"}, C{"base64"} or C{"hex"}.
    @ivar size: the raw length of a fixed-size digest, or 0. Where it is
        set and no suffix is given, a value of twice that many characters is
        read as hex and any other as base64, as Dovecot guesses.
    """

    check: Callable[[bytes], None]
    verify: Callable[[bytes, bytes, Optional[str]], bool]
    generate: Callable[[bytes, Optional[str]], bytes]
    encoding: str = "none"
    size: int = 0


#: crypt(3)'s base 64 digits, in the order of their values.
CRYPT_ALPHABET = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def cryptSalt(length: int) -> bytes:
    """
    @return: C{length} random characters of the crypt alphabet, as Dovecot's
        C{password_generate_salt} makes them.
    """
    return bytes(secrets.choice(CRYPT_ALPHABET) for _ in range(length))


def _anything(raw: bytes) -> None:
    """A fixed-size digest has been checked by its length already."""


# -- unsalted digests: SHA, SHA1, SHA256, SHA512, PLAIN-MD5, LDAP-MD5, PLAIN-MD4


# Dovecot's generic verification: make the digest again and compare.
def _digest(hashFunction: Callable[[bytes], bytes], encoding: str, size: int) -> Scheme:
    return Scheme(
        _anything,
        lambda raw, password, login: hmac.compare_digest(hashFunction(password), raw),
        lambda password, login: hashFunction(password),
        encoding,
        size,
    )


def _hashlib(name: str) -> Callable[[bytes], bytes]:
    return lambda data: hashlib.new(name, data).digest()


def _md4(data: bytes) -> bytes:
    """
    MD4 (RFC 1320), which OpenSSL 3 keeps in its legacy provider: hashlib
    has it only where that provider is loaded, else PyCryptodome (Debian's
    python3-pycryptodome, PyPI's pycryptodomex) computes it.
    """
    try:
        return hashlib.new("md4", data).digest()
    except ValueError:
        pass
    try:
        from Cryptodome.Hash import MD4
    except ImportError:
        raise ValueError(
            "PLAIN-MD4 needs MD4, which this Python's hashlib lacks:"
            " install python3-pycryptodome (pip: pycryptodomex)"
        ) from None
    return MD4.new(data).digest()


def _md4Check(raw: bytes) -> None:
    # Refuse the line when it is read, not at every login.
    _md4(b"")


# -- salted digests: SSHA, SSHA256, SSHA512, SMD5 -----------------------------
#
# The digest of the password and then the salt, followed by the salt. Dovecot
# makes 4-byte salts and accepts any length but none.


def _salted(name: str, hashName: str) -> Scheme:
    size = hashlib.new(hashName).digest_size

    def check(raw: bytes) -> None:
        if len(raw) <= size:
            raise ValueError(f"{name} password is too short ({len(raw)} bytes, no salt)")

    def verify(raw: bytes, password: bytes, login: Optional[str]) -> bool:
        expected = hashlib.new(hashName, password + raw[size:]).digest()
        return hmac.compare_digest(expected, raw[:size])

    def generate(password: bytes, login: Optional[str]) -> bytes:
        salt = secrets.token_bytes(4)
        return hashlib.new(hashName, password + salt).digest() + salt

    return Scheme(check, verify, generate, "base64")


# -- PLAIN-TRUNC: the password, perhaps truncated, after its length ----------
#
# Stored as LENGTH-PASSWORD. When PASSWORD has LENGTH bytes it may be a
# prefix of the real password, which then only has to start with it.
# (doveadm pw -s PLAIN-TRUNC leaves the length out, which Dovecot itself
# then refuses; makeHash writes it.)


def _truncSplit(raw: bytes) -> tuple[int, bytes]:
    match = re.match(rb"([0-9]*)-", raw)
    if match is None:
        raise ValueError("PLAIN-TRUNC missing length: prefix")
    return int(match.group(1) or b"0"), raw[match.end() :]


def _truncCheck(raw: bytes) -> None:
    if not _truncSplit(raw)[1]:
        # Dovecot would take any password for it.
        raise ValueError("empty PLAIN-TRUNC password")


def _truncVerify(raw: bytes, password: bytes, login: Optional[str]) -> bool:
    length, stored = _truncSplit(raw)
    if len(stored) == length and len(password) >= length:
        return hmac.compare_digest(stored, password[:length])
    return hmac.compare_digest(hashlib.sha256(stored).digest(), hashlib.sha256(password).digest())


# -- PBKDF2: Dovecot's $1$SALT$ROUNDS$HEX, PBKDF2-HMAC-SHA1 --------------------

_PBKDF2_ROUNDS = 5000
# More would hold an auth thread for many seconds at every guess (10 million
# rounds take about as long as the costliest SHA-crypt hash mailauth reads).
_PBKDF2_MAX_ROUNDS = 10_000_000


def _pbkdf2Split(raw: bytes) -> tuple[bytes, int, bytes]:
    fields = raw[3:].split(b"$") if raw.startswith(b"$1$") else []
    if len(fields) != 3:
        raise ValueError("a PBKDF2 hash is $1$SALT$ROUNDS$HEX")
    salt, rounds, key = fields
    if not re.fullmatch(rb"[0-9]{1,10}", rounds) or not 1 <= int(rounds) <= _PBKDF2_MAX_ROUNDS:
        shown = rounds[:12].decode("ascii", "replace")
        raise ValueError(
            f"PBKDF2 rounds {shown!r} is not a number from 1 to {_PBKDF2_MAX_ROUNDS}"
            " (the most mailauth verifies)"
        )
    if not re.fullmatch(rb"[0-9A-Fa-f]{40}", key):
        raise ValueError("PBKDF2 hash not 160bit hex-encoded")
    return salt, int(rounds), bytes.fromhex(key.decode("ascii"))


def _pbkdf2Check(raw: bytes) -> None:
    _pbkdf2Split(raw)


def _pbkdf2Verify(raw: bytes, password: bytes, login: Optional[str]) -> bool:
    salt, rounds, key = _pbkdf2Split(raw)
    return hmac.compare_digest(hashlib.pbkdf2_hmac("sha1", password, salt, rounds), key)


def _pbkdf2Generate(password: bytes, login: Optional[str]) -> bytes:
    saltChars = cryptSalt(16)
    key = hashlib.pbkdf2_hmac("sha1", password, saltChars, _PBKDF2_ROUNDS)
    return b"$1$%s$%d$%s" % (saltChars, _PBKDF2_ROUNDS, key.hex().encode("ascii"))


# -- DIGEST-MD5: MD5(user:realm:password), made for one login -----------------


def _digestMD5(password: bytes, login: Optional[str]) -> bytes:
    """
    As Dovecot: the login is C{user@realm}, split at its last C{@} (so
    C{user@domain@realm} keeps C{user@domain}); without one the realm is empty.
    """
    if login is None:
        raise ValueError("DIGEST-MD5 is made from the login too: give it (user@realm)")
    user, _, realm = login.rpartition("@") if "@" in login else (login, "", "")
    return hashlib.md5(f"{user}:{realm}:".encode("utf-8", "surrogateescape") + password).digest()


def _digestMD5Verify(raw: bytes, password: bytes, login: Optional[str]) -> bool:
    # Without the login the digest cannot be made again: no password is right.
    return login is not None and hmac.compare_digest(_digestMD5(password, login), raw)


#: The legacy digests, by scheme name. The crypt(3) ones (DES-CRYPT,
#: MD5-CRYPT, and MD5, which is MD5-CRYPT or PLAIN-MD5) and HMAC-MD5 (which
#: is CRAM-MD5) are in L{mailauth.passwords} beside the code they share.
LEGACY_SCHEMES = {
    "SHA": _digest(_hashlib("sha1"), "base64", 20),
    "SHA1": _digest(_hashlib("sha1"), "base64", 20),
    "SHA256": _digest(_hashlib("sha256"), "base64", 32),
    "SHA512": _digest(_hashlib("sha512"), "base64", 64),
    "SSHA": _salted("SSHA", "sha1"),
    "SSHA256": _salted("SSHA256", "sha256"),
    "SSHA512": _salted("SSHA512", "sha512"),
    "SMD5": _salted("SMD5", "md5"),
    "PLAIN-MD4": attrs.evolve(_digest(_md4, "hex", 16), check=_md4Check),
    "PLAIN-MD5": _digest(_hashlib("md5"), "hex", 16),
    "LDAP-MD5": _digest(_hashlib("md5"), "base64", 16),
    "PLAIN-TRUNC": Scheme(
        _truncCheck,
        _truncVerify,
        lambda password, login: b"%d-%s" % (len(password), password),
    ),
    "PBKDF2": Scheme(_pbkdf2Check, _pbkdf2Verify, _pbkdf2Generate),
    "DIGEST-MD5": Scheme(_anything, _digestMD5Verify, _digestMD5, "hex", 16),
}
