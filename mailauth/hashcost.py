"""
The most work a stored password hash may ask for, and the parameters of
each crypt-style hash read to tell.

A hash whose parameters ask for more is refused when the users file is read
(its line skipped, as a malformed hash's is): each guess at that login,
which anyone who knows the login may send, would otherwise hold an auth
thread for minutes, or allocate gigabytes, until the daemon is killed for
memory or every login waits. Each bound is tens of times today's default.
"""

from __future__ import annotations

import re
from typing import Optional

from mailauth.legacyschemes import CRYPT_ALPHABET

#: argon2 memory, KiB: 2 GiB, RFC 9106's largest recommendation.
MAX_ARGON2_MEMORY = 2 * 1024 * 1024
#: argon2 memory times passes: that memory, four passes.
MAX_ARGON2_WORK = 4 * MAX_ARGON2_MEMORY
#: argon2 lanes: each is a thread of its own while verifying.
MAX_ARGON2_LANES = 16
#: bcrypt's cost (2**cost rounds); 12 takes a third of a second.
MAX_BCRYPT_COST = 17
#: SHA-crypt rounds (the default is 5000); also the most iterations of the
#: legacy crypt(3) methods that count them (SHA1-crypt, Sun MD5, BSDi DES).
MAX_CRYPT_ROUNDS = 10_000_000
#: yescrypt and scrypt memory, bytes: as argon2's (libxcrypt's costliest
#: yescrypt setting takes 1 GiB).
MAX_SCRYPT_MEMORY = MAX_ARGON2_MEMORY * 1024


def checkCost(raw: bytes) -> None:
    """
    Refuse a crypt-style C{raw} whose parameters ask for more work or
    memory than the bounds above.

    @raise ValueError: naming the parameter and its bound.
    """
    argon = re.match(rb"\$argon2(?:id|i|d)\$(?:v=\d+\$)?m=(\d+),t=(\d+),p=(\d+)\$", raw)
    if argon is not None:
        memory, passes, lanes = (int(g) for g in argon.groups())
        if memory > MAX_ARGON2_MEMORY:
            raise ValueError(
                f"argon2 memory m={memory} KiB is over the {MAX_ARGON2_MEMORY} KiB"
                " (2 GiB) mailauth verifies"
            )
        if memory * passes > MAX_ARGON2_WORK:
            raise ValueError(
                f"argon2 m={memory},t={passes} asks for more work than mailauth verifies"
                f" (m times t at most {MAX_ARGON2_WORK})"
            )
        if lanes > MAX_ARGON2_LANES:
            raise ValueError(
                f"argon2 p={lanes} is over the {MAX_ARGON2_LANES} lanes mailauth verifies"
            )
        return
    bcryptCost = re.match(rb"\$2[abxy]?\$(\d+)\$", raw)
    if bcryptCost is not None and int(bcryptCost.group(1)) > MAX_BCRYPT_COST:
        cost = int(bcryptCost.group(1))
        raise ValueError(f"bcrypt cost {cost} is over the {MAX_BCRYPT_COST} mailauth verifies")
    rounds = re.match(rb"\$[56]\$rounds=(\d+)\$", raw)
    if rounds is not None and int(rounds.group(1)) > MAX_CRYPT_ROUNDS:
        raise ValueError(
            f"SHA-crypt rounds={int(rounds.group(1))} is over the {MAX_CRYPT_ROUNDS}"
            " mailauth verifies"
        )
    # libxcrypt reads these counts with strtoul, which takes a sign ("-1"
    # is the largest count there is), and Sun MD5's "rounds=" may follow
    # "$md5," or "$md5$": only digits are let through, and bounded.
    legacy = re.match(rb"\$sha1\$([^$]*)\$|\$md5[,$]rounds=([^$]*)\$", raw)
    if legacy is not None:
        count = legacy.group(1) if legacy.group(1) is not None else legacy.group(2)
        setting = raw[: legacy.end() - 1].decode("ascii", "replace")
        if not re.fullmatch(rb"[0-9]{1,12}", count):
            raise ValueError(f"{setting}: the iteration count is not a plain number")
        if int(count) > MAX_CRYPT_ROUNDS:
            raise ValueError(
                f"{setting} asks for more than the {MAX_CRYPT_ROUNDS} iterations mailauth verifies"
            )
    if raw.startswith(b"_") and len(raw) >= 5:
        count = _fixed64(raw, 1, 24)
        if count is not None and count > MAX_CRYPT_ROUNDS:
            raise ValueError(
                f"BSDi DES-crypt count {count} is over the {MAX_CRYPT_ROUNDS} mailauth verifies"
            )
    scrypt = _scryptCost(raw)
    if scrypt is not None:
        memory, work = scrypt
        name = "scrypt" if raw.startswith(b"$7$") else "yescrypt"
        setting = raw[: raw.find(b"$", raw.index(b"$", 1) + 1)].decode("ascii", "replace")
        if memory > MAX_SCRYPT_MEMORY:
            raise ValueError(
                f"{name} {setting} asks for {memory >> 20} MiB, over the"
                f" {MAX_SCRYPT_MEMORY >> 20} MiB mailauth verifies"
            )
        if work > 4 * MAX_SCRYPT_MEMORY:
            raise ValueError(
                f"{name} {setting} asks for more work than mailauth verifies"
                f" ({memory >> 20} MiB {work // memory} times; at most 4 times 2048 MiB)"
            )


# How yescrypt writes its parameters in crypt(3)'s base 64 digits
# (libxcrypt's yescrypt-common.c: decode64_uint32 and decode64_uint32_fixed).


def _digit(raw: bytes, at: int) -> Optional[int]:
    if at >= len(raw):
        return None
    found = CRYPT_ALPHABET.find(raw[at : at + 1])
    return found if found >= 0 else None


def _fixed64(raw: bytes, at: int, bits: int) -> Optional[int]:
    """A number of C{bits} bits at C{raw[at:]}, six bits a digit, lowest first."""
    value = 0
    for shift in range(0, bits, 6):
        digit = _digit(raw, at + shift // 6)
        if digit is None:
            return None
        value |= digit << shift
    return value


def _variable64(raw: bytes, at: int, minimum: int) -> Optional[tuple[int, int]]:
    """yescrypt's variable-length number at C{raw[at:]}: it and where it ends."""
    first = _digit(raw, at)
    if first is None:
        return None
    start, end, chars, bits, value = 0, 47, 1, 0, minimum
    while first > end:
        value += (end + 1 - start) << bits
        start, end = end + 1, end + 1 + (62 - end) // 2
        chars, bits = chars + 1, bits + 6
    value += (first - start) << bits
    for n in range(1, chars):
        digit = _digit(raw, at + n)
        if digit is None:
            return None
        bits -= 6
        value += digit << bits
    return value, at + chars


def _scryptCost(raw: bytes) -> Optional[tuple[int, int]]:
    """
    The memory (bytes) and work (bytes times passes) a yescrypt (C{$y$},
    C{$gy$}) or scrypt (C{$7$}) setting asks for; L{None} for any other
    hash, or one whose parameters do not read (crypt(3) refuses it then).
    """
    if raw.startswith(b"$7$"):
        logN, r, p = _digit(raw, 3), _fixed64(raw, 4, 30), _fixed64(raw, 9, 30)
        if logN is None or r is None or p is None:
            return None
        memory = 128 * r << logN  # (logN is one digit: at most 63)
        return memory, memory * p
    at = 3 if raw.startswith(b"$y$") else 4 if raw.startswith(b"$gy$") else None
    if at is None:
        return None
    fields = []
    for minimum in (0, 1, 1):
        read = _variable64(raw, at, minimum)
        if read is None:
            return None
        value, at = read
        fields.append(value)
    flavor, logN, r = fields
    p, t = 1, 0
    if raw[at : at + 1] != b"$":
        read = _variable64(raw, at, 1)
        if read is None:
            return None
        have, at = read
        if have & 1:
            read = _variable64(raw, at, 2)
            if read is None:
                return None
            p, at = read
        if have & 2:
            read = _variable64(raw, at, 1)
            if read is None:
                return None
            t, at = read
    # yescrypt proper (YESCRYPT_RW, flavors 2 and up) divides its work
    # among p threads; classic scrypt and its WORM variant do it p times
    # over (one after another in libxcrypt, in the same memory).
    times = 1 if flavor >= 2 else p
    # (N = 2**logN; past 2**64 it is over every bound, and a shift by a
    # larger number would itself allocate that much.)
    memory = 128 * r << min(logN, 64)
    return memory, memory * times * (t + 1)
