"""
App passwords: generated secrets that log a user in beside its own password,
each with a label, stored hashed in the users file, revoked one at a time.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from typing import Iterator, Optional

import attrs

from mailauth.durable import locked, replaceDurably
from mailauth.passwords import PasswordHash, parse

#: The extra field of a users file line (Dovecot's passwd-file format keeps
#: C{key=value} pairs, separated by spaces, in its eighth field) that holds
#: one app password: C{mailauth_app=LABEL,CREATED,PREFIX,{ARGON2ID}...}.
FIELD = "mailauth_app"

#: The scheme app passwords are stored in.
SCHEME = "ARGON2ID"

#: At most this many app passwords per login.
MAX_PER_LOGIN = 16

#: The characters of a generated app password: lower-case letters and digits
#: without the ones people confuse (0 o, 1 l i).
ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"

#: Groups of L{GROUP} characters, joined by C{-} when shown.
GROUPS = 5
GROUP = 4

# The shape of an app password as a client may send it: the groups joined
# by "-", " " or nothing, in any case (letters and digits, so that a mistyped
# character still has the shape and fails as a wrong password).
_SHAPE = re.compile(rb"[A-Za-z0-9]{%d}(?:[- ]?[A-Za-z0-9]{%d}){%d}" % (GROUP, GROUP, GROUPS - 1))

_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")


class AppPasswordError(ValueError):
    """An app password field or label is malformed; the message says why."""


@attrs.frozen
class AppPassword:
    """
    One app password of a user.

    @ivar label: what the user calls it (C{phone}, C{laptop-thunderbird}),
        unique for its login; named in logs and the C{Received:} header.
    @ivar created: when it was made, in seconds since the epoch.
    @ivar prefix: its first L{GROUP} characters, kept in clear so that a
        login tries the one app password the client may mean, never all of
        them: a wrong app password costs one verification, whoever sent it
        and however many app passwords the login has (the other 79 bits
        stay secret).
    @ivar password: the ARGON2ID hash of the whole password (L{normalise}d),
        never the secret.
    """

    label: str
    created: int
    prefix: str
    password: PasswordHash = attrs.field(repr=False)


def checkLabel(label: str) -> str:
    """
    @return: C{label}, if it may name an app password.
    @raise AppPasswordError: unless it is 1 to 32 letters, digits, C{.},
        C{_} or C{-}, starting with a letter or digit (so it fits in a log
        line, a header comment and a users file field as it is).
    """
    if not _LABEL.fullmatch(label):
        raise AppPasswordError(
            f"invalid app password label {label!r}: use 1 to 32 letters, digits, '.', '_'"
            " or '-', starting with a letter or digit"
        )
    return label


def generate() -> str:
    """
    A new app password from the system's CSPRNG: 20 characters of
    L{ALPHABET} (99 bits), in groups of four joined by C{-}, as it is shown
    to the user once.
    """
    chars = "".join(secrets.choice(ALPHABET) for _ in range(GROUPS * GROUP))
    return "-".join(chars[i : i + GROUP] for i in range(0, len(chars), GROUP))


def normalise(password: bytes) -> Optional[bytes]:
    """
    What is hashed and checked of a password that has the shape of an app
    password: its letters and digits, lower-cased, without separators.

    @return: that, or L{None} if C{password} cannot be an app password (so
        no app password needs to be tried).
    """
    if not _SHAPE.fullmatch(password):
        return None
    return password.replace(b"-", b"").replace(b" ", b"").lower()


def prefixOf(normalised: bytes) -> str:
    """The L{AppPassword.prefix} of a L{normalise}d app password."""
    return normalised[:GROUP].decode("ascii")


def formatField(label: str, created: int, prefix: str, hashString: str) -> str:
    """
    The users file extra field holding an app password.

    @param hashString: its hash as written (C{{ARGON2ID}$argon2id$...}).
    """
    return f"{FIELD}={label},{created},{prefix},{hashString}"


_PREFIX = re.compile(f"[a-z0-9]{{{GROUP}}}")


def parseField(value: str) -> AppPassword:
    """
    Read the value of a L{FIELD} extra field: C{LABEL,CREATED,PREFIX,HASH}.

    @raise AppPasswordError: if it is malformed, naming what is wrong.
    """
    label, created, prefix, hashString = (value.split(",", 3) + ["", "", ""])[:4]
    checkLabel(label)
    if not created.isdigit():
        raise AppPasswordError(f"app password {label}: {created!r} is not a creation time")
    if not _PREFIX.fullmatch(prefix):
        raise AppPasswordError(
            f"app password {label}: {prefix!r} is not {GROUP} lower-case letters or digits"
        )
    try:
        password = parse(hashString)
    except ValueError as e:
        raise AppPasswordError(f"app password {label}: {e}") from None
    return AppPassword(label, int(created), prefix, password)


# -- when each app password was last used -----------------------------------
#
# Kept out of the users file, which the daemon must not rewrite at every
# login (and which may be read-only for it): one line per app password,
# "LOGIN LABEL CREATED LASTUSED", in a file under [server] state_dir. The
# creation time tells a label deleted and made again from the old one.

LAST_USED_FILE = "app-passwords-used"


def _lastUsedKey(login: str, app: AppPassword) -> tuple:
    return (login.lower(), app.label, app.created)


def readLastUsed(path: str) -> dict[tuple, float]:
    """
    @return: C{{(login, label, created): last use}} from the file at
        C{path}; nothing if it does not exist. Malformed lines are skipped.
    @raise OSError: if it exists and cannot be read.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    found: dict[tuple, float] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) != 4 or not (words[2].isdigit() and words[3].isdigit()):
            continue
        found[(words[0], words[1], int(words[2]))] = float(words[3])
    return found


def lastUsed(path: Optional[str], login: str, app: AppPassword) -> Optional[float]:
    """When C{login}'s C{app} was last used, per the file at C{path}, or L{None}."""
    if path is None:
        return None
    return readLastUsed(path).get(_lastUsedKey(login, app))


@contextlib.contextmanager
def _lockedFile(path: str) -> Iterator[None]:
    with locked(path + ".lock", mode=0o640):
        yield


def recordLastUsed(path: str, login: str, app: AppPassword, when: float) -> None:
    """
    Blocking: record that C{login} used C{app} at C{when}, under the file's
    lock and by atomic replacement, so that several processes may record
    at once; a later time already recorded is kept.

    @raise OSError: if the file cannot be written.
    """
    with _lockedFile(path):
        found = readLastUsed(path)
        key = _lastUsedKey(login, app)
        found[key] = max(found.get(key, 0.0), when)
        lines = [f"{k[0]} {k[1]} {k[2]} {int(v)}\n" for k, v in sorted(found.items())]
        try:
            old: Optional[os.stat_result] = os.stat(path)
        except FileNotFoundError:
            old = None
        replaceDurably(path, "".join(lines).encode("utf-8"), 0o640, old)
