"""Dovecot-style C{{SCHEME}hash} password hashes: parsing, hashing and verification."""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import hashlib
import hmac
import math
import re
import secrets
import struct
from typing import Callable, Optional, Union

import argon2
import argon2.exceptions
import argon2.low_level
import attrs
import bcrypt

from mailauth import scram
from mailauth.hashcost import checkCost
from mailauth.legacyschemes import LEGACY_SCHEMES, Scheme, cryptSalt

#: The schemes that store the password itself.
PLAINTEXT_SCHEMES = ("PLAIN", "CLEAR", "CLEARTEXT")

#: The schemes whose users can answer CRAM-MD5 (L{cramMD5Digest}): the
#: plaintext ones and Dovecot's stored HMAC-MD5 context, by either name.
CRAM_MD5_SCHEMES = ("CRAM-MD5", "HMAC-MD5") + PLAINTEXT_SCHEMES

#: The schemes that fall quickly to a guessing attack on a stolen users file:
#: the password itself, the password-equivalents of the challenge mechanisms,
#: fast digests (salted or not) and the old crypt(3) methods. L{isWeak} also
#: looks inside CRYPT.
WEAK_SCHEMES = (
    "PLAIN",
    "CLEAR",
    "CLEARTEXT",
    "PLAIN-TRUNC",
    "CRAM-MD5",
    "HMAC-MD5",
    "DIGEST-MD5",
    "PLAIN-MD4",
    "PLAIN-MD5",
    "LDAP-MD5",
    "MD5",
    "SHA",
    "SHA1",
    "SHA256",
    "SHA512",
    "SMD5",
    "SSHA",
    "SSHA256",
    "SSHA512",
    "MD5-CRYPT",
    "DES-CRYPT",
    "PBKDF2",
)

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
    @ivar encoding: the encoding suffix written after the scheme name, in
        upper case (C{B64}, C{BASE64} or C{HEX}, as in C{{SHA256.HEX}}), or
        L{None} for the scheme's own.
    """

    scheme: str
    value: str = attrs.field(repr=False)
    encoding: Optional[str] = None


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
# What crypt(3) methods a CRYPT value may use and not be weak (isWeak).
_STRONG_CRYPT = (b"$2", b"$5$", b"$6$", b"$7$", b"$y$", b"$gy$", b"$argon2")
# DES-CRYPT reads at most this many bytes of a password.
_DES_MAX = 8


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


def _cryptWith(password: bytes, setting: Optional[bytes], name: str) -> bytes:
    if b"\0" in password:
        raise ValueError("a password for crypt(3) cannot contain a NUL byte")
    result = _crypt(password, setting) if setting else None
    if result is None:
        raise ValueError(f"the system's crypt(3) cannot make {name} hashes")
    return result


def _cryptGenerate(password: bytes, prefix: bytes) -> bytes:
    setting = ctypes.create_string_buffer(256)
    rbytes = secrets.token_bytes(16)
    if not _libcrypt.crypt_gensalt_rn(prefix, 0, rbytes, len(rbytes), setting, len(setting)):
        setting.value = b""
    return _cryptWith(password, setting.value, prefix.decode())


def _desGenerate(password: bytes, login: Optional[str]) -> bytes:
    # As doveadm: two salt characters, no prefix.
    if len(password) > _DES_MAX:
        raise ValueError(f"DES-CRYPT uses only the first {_DES_MAX} bytes of a password")
    return _cryptWith(password, cryptSalt(2), "DES-CRYPT")


def _cryptVerify(raw: bytes, password: bytes, login: Optional[str] = None) -> bool:
    if b"\0" in password:
        return False
    result = _crypt(password, raw)
    return result is not None and hmac.compare_digest(result, raw)


def _cryptCheck(raw: bytes) -> None:
    usable = raw.isascii() and b"\0" not in raw
    if not usable or _libcrypt.crypt_checksalt(raw) not in _CRYPT_SALT_USABLE:
        raise ValueError(f"{_described(raw)} is not a hash that this system's crypt(3) knows")


# -- MD5: Dovecot's name for MD5-CRYPT, which also reads PLAIN-MD5 digests -----


def _md5Digest(raw: bytes) -> bytes:
    """The MD5 digest in an C{{MD5}} value that is not MD5-crypt, read as PLAIN-MD5 is."""
    try:
        return _decode(_text(raw), "PLAIN-MD5", None)
    except ValueError:
        raise ValueError("not a valid MD5-CRYPT or PLAIN-MD5 password") from None


def _md5Check(raw: bytes) -> None:
    if raw.startswith(b"$1$"):
        _SCHEMES["MD5-CRYPT"].check(raw)
    else:
        _md5Digest(raw)


def _md5Verify(raw: bytes, password: bytes, login: Optional[str]) -> bool:
    if raw.startswith(b"$1$"):
        return _cryptVerify(raw, password)
    return hmac.compare_digest(hashlib.md5(password).digest(), _md5Digest(raw))


# -- bcrypt -----------------------------------------------------------------


def _bcryptPassword(password: bytes) -> Optional[bytes]:
    if b"\0" in password:
        return None
    return password[:_BCRYPT_MAX]


def _bcryptVerify(raw: bytes, password: bytes, login: Optional[str]) -> bool:
    secret = _bcryptPassword(password)
    if secret is None:
        return False
    try:
        # bcrypt compares in constant time itself.
        return bcrypt.checkpw(secret, raw)
    except ValueError:
        return False


def _bcryptGenerate(password: bytes, login: Optional[str]) -> bytes:
    secret = _bcryptPassword(password)
    if secret is None:
        raise ValueError("a password for bcrypt cannot contain a NUL byte")
    if len(password) > _BCRYPT_MAX:
        raise ValueError(f"bcrypt uses only the first {_BCRYPT_MAX} bytes of a password")
    # $2y$ (PHP's, and doveadm's, name) and $2b$ are the same algorithm;
    # bcrypt keeps whichever prefix the salt has.
    salt = bcrypt.gensalt(_BCRYPT_COST, prefix=b"2b").replace(b"$2b$", b"$2y$", 1)
    return bcrypt.hashpw(secret, salt)


# The schemes whose stored value is a crypt-style string with its parameters.
_COSTED = ("ARGON2ID", "ARGON2I", "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "CRYPT", "DES-CRYPT")


# -- argon2 -----------------------------------------------------------------

_ARGON2_PATTERN = (
    r"\$(argon2id|argon2i)\$(v=\d+\$)?m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+"
)
_ARGON2_TYPES = {b"argon2id": argon2.low_level.Type.ID, b"argon2i": argon2.low_level.Type.I}


def _argon2Verify(raw: bytes, password: bytes, login: Optional[str]) -> bool:
    # Like Dovecot (libsodium), verify by the type the string names.
    kind = raw.split(b"$", 2)[1]
    try:
        return argon2.low_level.verify_secret(raw, password, _ARGON2_TYPES[kind])
    except argon2.exceptions.VerificationError:
        return False


def _argon2Generate(password: bytes, scheme: str) -> bytes:
    return argon2.low_level.hash_secret(
        password, secrets.token_bytes(16), parallelism=1, hash_len=32, **_ARGON2[scheme]
    )


# -- CRAM-MD5 (and HMAC-MD5): Dovecot stores the HMAC-MD5 context ------------
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


def _cramContext(password: bytes, login: Optional[str] = None) -> bytes:
    key = hashlib.md5(password).digest() if len(password) > 64 else password
    key = key.ljust(64, b"\0")
    outer = _md5Compress(_MD5_INIT, bytes(k ^ 0x5C for k in key))
    inner = _md5Compress(_MD5_INIT, bytes(k ^ 0x36 for k in key))
    return struct.pack("<8I", *outer, *inner)


def _cramVerify(raw: bytes, password: bytes, login: Optional[str]) -> bool:
    return hmac.compare_digest(_cramContext(password), raw)


def cramMD5Digest(stored: PasswordHash, challenge: bytes) -> Optional[bytes]:
    """
    The answer to a CRAM-MD5 C{challenge} expected from the owner of C{stored}.

    @return: the lower-case hex HMAC-MD5 of C{challenge} keyed with the
        password, or L{None} if C{stored} is of a scheme that cannot answer
        CRAM-MD5 (anything but L{CRAM_MD5_SCHEMES}).
    """
    if stored.scheme not in CRAM_MD5_SCHEMES:
        return None
    raw = _decode(stored.value, stored.scheme, stored.encoding)
    if stored.scheme in PLAINTEXT_SCHEMES:
        return hmac.new(raw, challenge, "md5").hexdigest().encode("ascii")
    outer = struct.unpack("<4I", raw[:16])
    inner = struct.unpack("<4I", raw[16:])
    return _md5Finish(outer, _md5Finish(inner, challenge, 64), 64).hex().encode("ascii")


# -- plaintext ----------------------------------------------------------------


def _plainCheck(raw: bytes) -> None:
    if not raw:
        raise ValueError("empty plaintext password")


def _plainVerify(raw: bytes, password: bytes, login: Optional[str]) -> bool:
    # Comparing digests hides the length of the stored password too.
    return hmac.compare_digest(hashlib.sha256(raw).digest(), hashlib.sha256(password).digest())


# -- Dovecot's encodings: .b64 / .base64 / .hex, else the scheme's own ------

# Suffix, as written after the scheme name, to encoding.
_ENCODINGS = {"B64": "base64", "BASE64": "base64", "HEX": "hex"}


def _text(raw: bytes) -> str:
    # The users file is decoded with surrogateescape, so any bytes survive.
    return raw.decode("utf-8", "surrogateescape")


def _fromHex(data: bytes) -> Optional[bytes]:
    if not re.fullmatch(rb"(?:[0-9A-Fa-f]{2})*", data):
        return None
    return bytes.fromhex(data.decode("ascii"))


def _fromBase64(data: bytes) -> Optional[bytes]:
    # Dovecot skips white space in base64 and insists on the padding.
    try:
        return base64.b64decode(re.sub(rb"[ \t\r\n]", b"", data), validate=True)
    except (binascii.Error, ValueError):
        return None


def _decode(value: str, name: str, suffix: Optional[str]) -> bytes:
    """
    The raw value of C{{NAME.SUFFIX}value}, as Dovecot's C{password_decode}
    reads it: without a suffix, a fixed-size digest of twice its size in
    characters is hex (or else base64), any other length base64.

    @raise ValueError: if C{value} is not in that encoding or has the
        wrong size.
    """
    scheme = _SCHEMES[name]
    data = value.encode("utf-8", "surrogateescape")
    encoding = _ENCODINGS[suffix] if suffix else scheme.encoding
    if encoding == "none":
        raw: Optional[bytes] = data
    elif suffix is None and scheme.size:
        # Dovecot guesses, and falls back to base64 if hex fails.
        raw = _fromHex(data) if len(data) == 2 * scheme.size else None
        raw = _fromBase64(data) if raw is None else raw
        if raw is None or len(raw) != scheme.size:
            raise ValueError(
                f"{name}: {_described(data)} is neither {2 * scheme.size} hex digits"
                f" nor the base64 of {scheme.size} bytes"
            )
    else:
        raw = _fromHex(data) if encoding == "hex" else _fromBase64(data)
        if raw is None:
            raise ValueError(f"{name}: {_described(data)} is not {encoding}")
    assert raw is not None
    if scheme.size and len(raw) != scheme.size:
        raise ValueError(f"{name}: the value is {len(raw)} bytes long, not {scheme.size}")
    return raw


def _encode(raw: bytes, encoding: str) -> str:
    if encoding == "base64":
        return base64.b64encode(raw).decode("ascii")
    if encoding == "hex":
        return raw.hex()
    return _text(raw)


# -- the scheme table ---------------------------------------------------------


def _pattern(regex: str, what: str) -> Callable[[bytes], None]:
    def check(raw: bytes) -> None:
        if not re.fullmatch(regex, _text(raw)):
            raise ValueError(f"{_described(raw)} is not {what}")

    return check


_SCHEMES: dict[str, Scheme] = {
    "ARGON2ID": Scheme(
        _pattern(_ARGON2_PATTERN, "an argon2 hash ($argon2id$...)"),
        _argon2Verify,
        lambda password, login: _argon2Generate(password, "ARGON2ID"),
    ),
    "ARGON2I": Scheme(
        _pattern(_ARGON2_PATTERN, "an argon2 hash ($argon2i$...)"),
        _argon2Verify,
        lambda password, login: _argon2Generate(password, "ARGON2I"),
    ),
    "BLF-CRYPT": Scheme(
        _pattern(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}", "a bcrypt hash ($2y$...)"),
        _bcryptVerify,
        _bcryptGenerate,
    ),
    "SHA512-CRYPT": Scheme(
        _pattern(r"\$6\$(rounds=\d+\$)?[^$]*\$[./A-Za-z0-9]{86}", "a SHA-512 crypt hash ($6$...)"),
        _cryptVerify,
        lambda password, login: _cryptGenerate(password, b"$6$"),
    ),
    "SHA256-CRYPT": Scheme(
        _pattern(r"\$5\$(rounds=\d+\$)?[^$]*\$[./A-Za-z0-9]{43}", "a SHA-256 crypt hash ($5$...)"),
        _cryptVerify,
        lambda password, login: _cryptGenerate(password, b"$5$"),
    ),
    # What doveadm makes for CRYPT is bcrypt; verifying is crypt(3)'s job.
    "CRYPT": Scheme(_cryptCheck, _cryptVerify, _bcryptGenerate),
    "MD5-CRYPT": Scheme(
        _pattern(r"\$1\$[^$]{0,8}\$[./A-Za-z0-9]{22}", "an MD5-crypt hash ($1$...)"),
        _cryptVerify,
        lambda password, login: _cryptGenerate(password, b"$1$"),
    ),
    # doveadm makes MD5 as MD5-CRYPT; Dovecot reads PLAIN-MD5 digests too.
    "MD5": Scheme(_md5Check, _md5Verify, lambda password, login: _cryptGenerate(password, b"$1$")),
    # Dovecot verifies any crypt(3) string as DES-CRYPT, as it does as CRYPT.
    "DES-CRYPT": Scheme(_cryptCheck, _cryptVerify, _desGenerate),
    "CRAM-MD5": Scheme(lambda raw: None, _cramVerify, _cramContext, "hex", 32),
}
_SCHEMES["HMAC-MD5"] = _SCHEMES["CRAM-MD5"]
for _name in PLAINTEXT_SCHEMES:
    _SCHEMES[_name] = Scheme(_plainCheck, _plainVerify, lambda password, login: password)
_SCHEMES.update(LEGACY_SCHEMES)
# SCRAM keys are not password-equivalent and cost PBKDF2 to guess: strong.
_SCHEMES.update(scram.SCHEMES)

#: Every scheme name that L{parse} accepts and L{makeHash} produces (each
#: may be followed by C{.B64} or C{.HEX} to choose the encoding).
SCHEMES = tuple(_SCHEMES)

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
    ("$1$", "MD5-CRYPT"),
)

_OTP = "OTP is a one-time-password scheme and cannot be used by mailauth"


def _described(value: Union[str, bytes]) -> str:
    """
    A malformed hash as an error names it: by its length, never by any of
    its characters, which may be a plaintext password stored by mistake
    behind a scheme prefix (and log lines are read by many).
    """
    return f"the value of {len(value)} characters"


def _schemeParts(text: str) -> tuple[str, Optional[str]]:
    """
    @return: the scheme name and encoding suffix (or L{None}) of
        C{NAME[.SUFFIX]}, both upper-case.
    @raise ValueError: if either is unknown, or the scheme is OTP.
    """
    name, dot, suffix = text.upper().partition(".")
    if name == "OTP":
        raise ValueError(_OTP)
    if name not in _SCHEMES or (dot and suffix not in _ENCODINGS):
        raise ValueError(f"unknown password scheme {{{text}}} (known: {', '.join(SCHEMES)})")
    return name, suffix if dot else None


def schemeName(text: str) -> str:
    """
    @param text: a scheme name in any case, perhaps with an encoding suffix
        (C{sha256.hex}).
    @return: it in upper case, as L{makeHash} writes it.
    @raise ValueError: if L{makeHash} does not know it.
    """
    _schemeParts(text)
    return text.upper()


def parse(stored: str) -> PasswordHash:
    """
    Parse the password field of a users file line.

    @param stored: C{{SCHEME}value} or C{{SCHEME.ENCODING}value} as C{doveadm
        pw} prints it, or a bare crypt string (C{$6$...}, C{$2y$...},
        C{$y$...}, C{$argon2id$...}, or a 13-character DES one).
    @raise ValueError: for an unknown scheme, OTP, or a malformed hash; the
        message never contains a plaintext password.
    """
    match = re.fullmatch(r"\{([^{}]*)\}(.*)", stored, re.DOTALL)
    suffix = None
    if match:
        (scheme, suffix), value = _schemeParts(match.group(1)), match.group(2)
    elif stored.startswith("$"):
        value = stored
        scheme = next((s for p, s in _BARE_PREFIXES if stored.startswith(p)), "CRYPT")
    elif re.fullmatch(r"[./0-9A-Za-z]{13}", stored):
        value, scheme = stored, "DES-CRYPT"
    else:
        raise ValueError("the password has no {SCHEME} prefix and is not a crypt string ($...)")
    raw = _decode(value, scheme, suffix)
    _SCHEMES[scheme].check(raw)
    if scheme in _COSTED:
        checkCost(raw)
    return PasswordHash(scheme, value, suffix)


def verify(stored: PasswordHash, password: bytes, login: Optional[str] = None) -> bool:
    """
    Check C{password} against C{stored}, in constant time.

    This blocks for as long as the scheme is meant to cost (for argon2, tens
    of milliseconds): call it in a thread.

    @param login: the login as the client gave it; DIGEST-MD5 hashes are
        made from it (as Dovecot's are, from C{user@realm}), and without it
        no password is right for them.
    @return: whether C{password} is right; a wrong or unusable password
        (such as one with a NUL byte, for crypt) is L{False}, never an error.
    """
    raw = _decode(stored.value, stored.scheme, stored.encoding)
    return _SCHEMES[stored.scheme].verify(raw, password, login)


def makeHash(password: bytes, scheme: str = DEFAULT_SCHEME, login: Optional[str] = None) -> str:
    """
    Hash C{password} with a fresh random salt, as C{doveadm pw -s SCHEME}.

    @param scheme: one of L{SCHEMES}, in any case, perhaps with an encoding
        suffix (C{SHA256.HEX}).
    @param login: the login the hash is for, which DIGEST-MD5 needs (as
        C{doveadm pw -u}).
    @return: the whole C{{SCHEME}value} string.
    @raise ValueError: for an unknown scheme or a password the scheme
        cannot take (a NUL byte for crypt and bcrypt, more than 72 bytes for
        bcrypt or 8 for DES-CRYPT, which would silently use only the first
        ones), or DIGEST-MD5 without a login.
    """
    name, suffix = _schemeParts(scheme)
    raw = _SCHEMES[name].generate(password, login)
    encoding = _ENCODINGS[suffix] if suffix else _SCHEMES[name].encoding
    return f"{{{scheme.upper()}}}{_encode(raw, encoding)}"


def isWeak(stored: Union[str, PasswordHash]) -> bool:
    """
    Whether a hash of this scheme falls quickly to guessing, or is the
    password itself or its equivalent: a user to warn about and rehash.

    @param stored: a scheme name (an encoding suffix is ignored), or a
        parsed hash, for which a CRYPT or DES-CRYPT value is judged by the
        crypt(3) method it names (DES and MD5-crypt are weak).
    """
    if isinstance(stored, PasswordHash):
        if stored.scheme in ("CRYPT", "DES-CRYPT"):
            raw = _decode(stored.value, stored.scheme, stored.encoding)
            return not raw.startswith(_STRONG_CRYPT)
        stored = stored.scheme
    return stored.upper().partition(".")[0] in WEAK_SCHEMES


_ARGON2_PARAMETERS = re.compile(r"\$argon2id\$(?:v=(\d+)\$)?m=(\d+),t=(\d+),p=\d+\$")


def needsRehash(stored: PasswordHash) -> bool:
    """
    Whether C{stored} is weaker than what L{makeHash} makes today: another
    scheme or encoding, or ARGON2ID with an older version or less memory
    or time than the default's (C{[auth] rehash} replaces such hashes).
    """
    if stored.scheme != DEFAULT_SCHEME or stored.encoding is not None:
        return True
    m = _ARGON2_PARAMETERS.match(stored.value)
    if m is None:
        return True
    version, memory, time = int(m.group(1) or 16), int(m.group(2)), int(m.group(3))
    today = _ARGON2[DEFAULT_SCHEME]
    return version < 19 or memory < today["memory_cost"] or time < today["time_cost"]


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


def costsAsMuchAsDummy(stored: PasswordHash) -> bool:
    """
    Whether verifying C{stored} costs at least what L{dummyVerify} costs:
    a hash of the default scheme whose memory and time costs are at least
    the default's, on no more lanes (more lanes run in parallel threads, so
    they may finish sooner). A failed login that verified such a hash takes
    as long as an unknown login's without any dummy work on top.
    """
    if stored.scheme != DEFAULT_SCHEME:
        return False
    try:
        found = argon2.extract_parameters(
            _decode(stored.value, stored.scheme, stored.encoding).decode("ascii")
        )
    except (ValueError, UnicodeDecodeError):
        return False
    default = argon2.extract_parameters(_DUMMY.value)
    return (
        found.type == default.type
        and found.memory_cost >= default.memory_cost
        and found.time_cost >= default.time_cost
        and found.parallelism <= default.parallelism
    )
