"""Dovecot-style C{{SCHEME}hash} password hashes: parsing, hashing and verification."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import hmac
import math
import re
import secrets
import struct
from typing import Callable, Optional

import argon2.exceptions
import argon2.low_level
import attrs
import bcrypt

#: Every scheme name that L{parse} accepts and L{makeHash} produces.
SCHEMES = (
    "ARGON2ID",
    "ARGON2I",
    "BLF-CRYPT",
    "SHA512-CRYPT",
    "SHA256-CRYPT",
    "CRYPT",
    "CRAM-MD5",
    "PLAIN",
    "CLEAR",
    "CLEARTEXT",
)

#: The schemes that store the password itself.
PLAINTEXT_SCHEMES = ("PLAIN", "CLEAR", "CLEARTEXT")

DEFAULT_SCHEME = "ARGON2ID"

# doveadm's argon2 parameters (Dovecot 2.3, see tests/data/dovecot-passwd).
_ARGON2: dict[str, dict] = {
    "ARGON2ID": dict(type=argon2.low_level.Type.ID, time_cost=3, memory_cost=65536),
    "ARGON2I": dict(type=argon2.low_level.Type.I, time_cost=4, memory_cost=32768),
}

# doveadm's default bcrypt cost is 5, far too cheap today.
_BCRYPT_COST = 10

# bcrypt reads at most this many bytes of a password (as crypt(3) and
# Dovecot do); bcrypt 4.1 and later raise instead of truncating themselves.
_BCRYPT_MAX = 72


@attrs.frozen
class PasswordHash:
    """
    A parsed C{{SCHEME}value} string.

    @ivar scheme: the upper-case scheme name, one of L{SCHEMES}; CLEAR and
        CLEARTEXT are kept as written and mean PLAIN.
    @ivar value: the hash as C{doveadm pw} prints it after the C{{SCHEME}}
        prefix; for the plaintext schemes the password itself, which is why it
        is left out of C{repr}.
    """

    scheme: str
    value: str = attrs.field(repr=False)


# -- the system's crypt(3), through libxcrypt's thread-safe entry points ---

_libcrypt = ctypes.CDLL(ctypes.util.find_library("crypt") or "libcrypt.so.1")
_libcrypt.crypt_rn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
_libcrypt.crypt_rn.restype = ctypes.c_char_p
_libcrypt.crypt_gensalt_rn.argtypes = [
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
]
_libcrypt.crypt_gensalt_rn.restype = ctypes.c_char_p
_libcrypt.crypt_checksalt.argtypes = [ctypes.c_char_p]
_libcrypt.crypt_checksalt.restype = ctypes.c_int

# sizeof(struct crypt_data) in libxcrypt.
_CRYPT_DATA_SIZE = 32768
# crypt_checksalt results that still verify: OK, METHOD_LEGACY, TOO_CHEAP.
_CRYPT_SALT_USABLE = (0, 3, 4)


def _crypt(password: bytes, setting: bytes) -> Optional[bytes]:
    """
    Run crypt(3) with a buffer of our own, so threads may call it at once.

    @return: the hash, or L{None} if libcrypt refused C{setting}.
    """
    data = ctypes.create_string_buffer(_CRYPT_DATA_SIZE)
    result = _libcrypt.crypt_rn(password, setting, data, _CRYPT_DATA_SIZE)
    # libxcrypt returns NULL, or a string starting with "*", on failure.
    if not result or result.startswith(b"*"):
        return None
    return result


def _cryptGenerate(password: bytes, prefix: bytes) -> str:
    if b"\0" in password:
        raise ValueError("a password for crypt(3) cannot contain a NUL byte")
    salt = ctypes.create_string_buffer(256)
    rbytes = secrets.token_bytes(16)
    if not _libcrypt.crypt_gensalt_rn(prefix, 0, rbytes, len(rbytes), salt, len(salt)):
        raise ValueError(f"the system's crypt(3) cannot make {prefix.decode()} hashes")
    result = _crypt(password, salt.value)
    if result is None:
        raise ValueError(f"the system's crypt(3) cannot make {prefix.decode()} hashes")
    return result.decode("ascii")


def _cryptVerify(value: str, password: bytes) -> bool:
    if b"\0" in password:
        return False
    expected = value.encode("utf-8", "surrogateescape")
    result = _crypt(password, expected)
    return result is not None and hmac.compare_digest(result, expected)


def _cryptCheck(value: str) -> None:
    if not value.isascii() or _libcrypt.crypt_checksalt(value.encode()) not in _CRYPT_SALT_USABLE:
        raise ValueError(f"{_preview(value)!r} is not a hash that this system's crypt(3) knows")


# -- bcrypt -----------------------------------------------------------------


def _bcryptPassword(password: bytes) -> Optional[bytes]:
    if b"\0" in password:
        return None
    return password[:_BCRYPT_MAX]


def _bcryptVerify(value: str, password: bytes) -> bool:
    secret = _bcryptPassword(password)
    if secret is None:
        return False
    try:
        # bcrypt compares in constant time itself.
        return bcrypt.checkpw(secret, value.encode("ascii"))
    except ValueError:
        return False


def _bcryptGenerate(password: bytes) -> str:
    secret = _bcryptPassword(password)
    if secret is None:
        raise ValueError("a password for bcrypt cannot contain a NUL byte")
    if len(password) > _BCRYPT_MAX:
        raise ValueError(f"bcrypt uses only the first {_BCRYPT_MAX} bytes of a password")
    # $2y$ (PHP's, and doveadm's, name) and $2b$ are the same algorithm;
    # bcrypt keeps whichever prefix the salt has.
    salt = bcrypt.gensalt(_BCRYPT_COST, prefix=b"2b").replace(b"$2b$", b"$2y$", 1)
    return bcrypt.hashpw(secret, salt).decode("ascii")


# -- argon2 -----------------------------------------------------------------

_ARGON2_PATTERN = (
    r"\$(argon2id|argon2i)\$(v=\d+\$)?m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+"
)
_ARGON2_TYPES = {"argon2id": argon2.low_level.Type.ID, "argon2i": argon2.low_level.Type.I}


def _argon2Verify(value: str, password: bytes) -> bool:
    # Like Dovecot (libsodium), verify by the type the string names.
    kind = value.split("$", 2)[1]
    try:
        return argon2.low_level.verify_secret(value.encode("ascii"), password, _ARGON2_TYPES[kind])
    except argon2.exceptions.VerificationError:
        return False


def _argon2Generate(password: bytes, scheme: str) -> str:
    return argon2.low_level.hash_secret(
        password, secrets.token_bytes(16), parallelism=1, hash_len=32, **_ARGON2[scheme]
    ).decode("ascii")


# -- CRAM-MD5: Dovecot stores the HMAC-MD5 context ---------------------------
#
# Dovecot's {CRAM-MD5} is the MD5 state (words A, B, C, D, little-endian)
# after one block of key XOR opad, then the state after key XOR ipad: the
# HMAC precomputation of RFC 2104 section 4. Answering a challenge resumes MD5
# from those states, which hashlib cannot do, hence this small MD5.

_MASK = 0xFFFFFFFF
_MD5_INIT = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_MD5_SHIFTS = (7, 12, 17, 22) * 4 + (5, 9, 14, 20) * 4 + (4, 11, 16, 23) * 4 + (6, 10, 15, 21) * 4
_MD5_K = tuple(int(abs(math.sin(i + 1)) * 2**32) & _MASK for i in range(64))


def _md5Compress(state: tuple, block: bytes) -> tuple:
    """MD5's compression function (RFC 1321) over one 64-byte block."""
    x = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | ~d), (7 * i) % 16
        f = (f + a + _MD5_K[i] + x[g]) & _MASK
        s = _MD5_SHIFTS[i]
        a, d, c, b = d, c, b, (b + ((f << s) | (f >> (32 - s)))) & _MASK
    return tuple((u + v) & _MASK for u, v in zip(state, (a, b, c, d)))


def _md5Finish(state: tuple, data: bytes, done: int) -> bytes:
    """
    Finish an MD5 computation resumed from C{state}.

    @param done: how many bytes (a multiple of 64) produced C{state}.
    @return: the 16-byte digest of those bytes followed by C{data}.
    """
    length = (done + len(data)) * 8
    data += b"\x80" + b"\0" * ((55 - len(data)) % 64) + struct.pack("<Q", length & (2**64 - 1))
    for i in range(0, len(data), 64):
        state = _md5Compress(state, data[i : i + 64])
    return struct.pack("<4I", *state)


def _cramContext(password: bytes) -> bytes:
    key = hashlib.md5(password).digest() if len(password) > 64 else password
    key = key.ljust(64, b"\0")
    outer = _md5Compress(_MD5_INIT, bytes(k ^ 0x5C for k in key))
    inner = _md5Compress(_MD5_INIT, bytes(k ^ 0x36 for k in key))
    return struct.pack("<8I", *outer, *inner)


def _cramCheck(value: str) -> None:
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", value):
        raise ValueError(f"a CRAM-MD5 hash is 64 hex digits, not {_preview(value)!r}")


def _cramVerify(value: str, password: bytes) -> bool:
    return hmac.compare_digest(_cramContext(password), bytes.fromhex(value))


def cramMD5Digest(stored: PasswordHash, challenge: bytes) -> Optional[bytes]:
    """
    The answer to a CRAM-MD5 C{challenge} expected from the owner of C{stored}.

    @return: the lower-case hex HMAC-MD5 of C{challenge} keyed with the
        password, or L{None} if C{stored} is of a scheme that cannot answer
        CRAM-MD5 (anything but CRAM-MD5 and the plaintext schemes).
    """
    if stored.scheme in PLAINTEXT_SCHEMES:
        return hmac.new(_plainBytes(stored.value), challenge, "md5").hexdigest().encode("ascii")
    if stored.scheme == "CRAM-MD5":
        context = bytes.fromhex(stored.value)
        outer = struct.unpack("<4I", context[:16])
        inner = struct.unpack("<4I", context[16:])
        return _md5Finish(outer, _md5Finish(inner, challenge, 64), 64).hex().encode("ascii")
    return None


# -- plaintext ----------------------------------------------------------------


def _plainBytes(value: str) -> bytes:
    # The users file is decoded with surrogateescape, so any bytes survive.
    return value.encode("utf-8", "surrogateescape")


def _plainCheck(value: str) -> None:
    if not value:
        raise ValueError("empty plaintext password")


def _plainVerify(value: str, password: bytes) -> bool:
    # Comparing digests hides the length of the stored password too.
    return hmac.compare_digest(
        hashlib.sha256(_plainBytes(value)).digest(), hashlib.sha256(password).digest()
    )


# -- the scheme table ---------------------------------------------------------


def _pattern(regex: str, what: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        if not re.fullmatch(regex, value):
            raise ValueError(f"{_preview(value)!r} is not {what}")

    return check


@attrs.frozen
class _Scheme:
    check: Callable[[str], None]
    verify: Callable[[str, bytes], bool]
    generate: Callable[[bytes], str]


_SCHEMES = {
    "ARGON2ID": _Scheme(
        _pattern(_ARGON2_PATTERN, "an argon2 hash ($argon2id$...)"),
        _argon2Verify,
        lambda password: _argon2Generate(password, "ARGON2ID"),
    ),
    "ARGON2I": _Scheme(
        _pattern(_ARGON2_PATTERN, "an argon2 hash ($argon2i$...)"),
        _argon2Verify,
        lambda password: _argon2Generate(password, "ARGON2I"),
    ),
    "BLF-CRYPT": _Scheme(
        _pattern(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}", "a bcrypt hash ($2y$...)"),
        _bcryptVerify,
        _bcryptGenerate,
    ),
    "SHA512-CRYPT": _Scheme(
        _pattern(r"\$6\$(rounds=\d+\$)?[^$]*\$[./A-Za-z0-9]{86}", "a SHA-512 crypt hash ($6$...)"),
        _cryptVerify,
        lambda password: _cryptGenerate(password, b"$6$"),
    ),
    "SHA256-CRYPT": _Scheme(
        _pattern(r"\$5\$(rounds=\d+\$)?[^$]*\$[./A-Za-z0-9]{43}", "a SHA-256 crypt hash ($5$...)"),
        _cryptVerify,
        lambda password: _cryptGenerate(password, b"$5$"),
    ),
    # What doveadm makes for CRYPT is bcrypt; verifying is crypt(3)'s job.
    "CRYPT": _Scheme(_cryptCheck, _cryptVerify, _bcryptGenerate),
    "CRAM-MD5": _Scheme(_cramCheck, _cramVerify, lambda password: _cramContext(password).hex()),
}
for _name in PLAINTEXT_SCHEMES:
    _SCHEMES[_name] = _Scheme(
        _plainCheck, _plainVerify, lambda password: password.decode("utf-8", "surrogateescape")
    )

# Bare crypt strings (Dovecot's default scheme for passwd-file is CRYPT),
# by prefix; anything else starting with "$" is left to crypt(3).
_BARE_PREFIXES = (
    ("$argon2id$", "ARGON2ID"),
    ("$argon2i$", "ARGON2I"),
    ("$2a$", "BLF-CRYPT"),
    ("$2b$", "BLF-CRYPT"),
    ("$2y$", "BLF-CRYPT"),
    ("$6$", "SHA512-CRYPT"),
    ("$5$", "SHA256-CRYPT"),
)


def _preview(value: str) -> str:
    """Enough of a malformed hash to recognise it, never a whole password."""
    return value if len(value) <= 12 else value[:12] + "..."


def parse(stored: str) -> PasswordHash:
    """
    Parse the password field of a users file line.

    @param stored: C{{SCHEME}value} as C{doveadm pw} prints it, or a bare
        crypt string (C{$6$...}, C{$2y$...}, C{$y$...}, C{$argon2id$...}).
    @raise ValueError: for an unknown scheme or a malformed hash; the message
        never contains a plaintext password.
    """
    match = re.fullmatch(r"\{([^{}]*)\}(.*)", stored, re.DOTALL)
    if match:
        scheme, value = match.group(1).upper(), match.group(2)
        if scheme not in _SCHEMES:
            raise ValueError(
                f"unknown password scheme {{{match.group(1)}}} (known: {', '.join(SCHEMES)})"
            )
    elif stored.startswith("$"):
        value = stored
        scheme = next((s for p, s in _BARE_PREFIXES if stored.startswith(p)), "CRYPT")
    else:
        raise ValueError("the password has no {SCHEME} prefix and is not a crypt string ($...)")
    _SCHEMES[scheme].check(value)
    return PasswordHash(scheme, value)


def verify(stored: PasswordHash, password: bytes) -> bool:
    """
    Check C{password} against C{stored}, in constant time.

    This blocks for as long as the scheme is meant to cost (for argon2, tens
    of milliseconds): call it in a thread.

    @return: whether C{password} is right; a wrong or unusable password
        (such as one with a NUL byte, for crypt) is L{False}, never an error.
    """
    return _SCHEMES[stored.scheme].verify(stored.value, password)


def makeHash(password: bytes, scheme: str = DEFAULT_SCHEME) -> str:
    """
    Hash C{password} with a fresh random salt, as C{doveadm pw -s SCHEME}.

    @param scheme: one of L{SCHEMES}, in any case.
    @return: the whole C{{SCHEME}value} string.
    @raise ValueError: for an unknown scheme or a password the scheme
        cannot take (a NUL byte for crypt and bcrypt, more than 72 bytes for
        bcrypt, which would silently use only the first 72).
    """
    name = scheme.upper()
    if name not in _SCHEMES:
        raise ValueError(f"unknown password scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    return f"{{{name}}}{_SCHEMES[name].generate(password)}"


# A hash of a random password with the default scheme and parameters, which
# test_passwords checks against what makeHash makes.
_DUMMY = parse(
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$vNKqkK8DQa5S4Jc06HUpwg"
    "$x7iCyjA2f/7FGLmp8BlZlHPNy3UXmjy30VTVz5mvJEE"
)


def dummyVerify(password: bytes) -> None:
    """
    Spend the time L{verify} spends on a hash of the default scheme, so that
    a login that does not exist costs as much as a wrong password.
    """
    verify(_DUMMY, password)
