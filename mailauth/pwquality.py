"""Refuse a new password that is too short or known from a breach, before it is stored."""

from __future__ import annotations

import hashlib
import os
import re
from typing import BinaryIO, Optional

import attrs

DEFAULT_MIN_LENGTH = 8


class PasswordRefused(Exception):
    """A new password is not good enough; the message says why, in one line."""


class BreachedListError(Exception):
    """The list of breached passwords cannot be read, or is not in its format."""


@attrs.frozen
class PasswordPolicy:
    """
    What a new password must be.

    @ivar minLength: the fewest characters (Unicode code points; a byte
        that is not UTF-8 counts as one) it may have.
    @ivar breached: a local copy of Have I Been Pwned's Pwned Passwords
        (SHA-1), or L{None}: see L{breachCount}.
    """

    minLength: int = DEFAULT_MIN_LENGTH
    breached: Optional[str] = None

    def check(self, password: bytes) -> None:
        """
        @raise PasswordRefused: if C{password} is too short or in the list.
        @raise BreachedListError: if the list cannot be searched.
        """
        length = len(password.decode("utf-8", "surrogateescape"))
        if length < self.minLength:
            raise PasswordRefused(
                f"password refused: it has {length} characters, and at least"
                f" {self.minLength} are required"
            )
        if self.breached is not None:
            count = breachCount(self.breached, password)
            if count:
                raise PasswordRefused(
                    f"password refused: it is in the list of breached passwords"
                    f" ({count} times); choose another"
                )


# A line of either form: the whole SHA-1 (a sorted list) or the 35 hex
# digits after the 5 of a range file's name; the count is optional.
_LINE = re.compile(rb"\s*([0-9A-Fa-f]{35}(?:[0-9A-Fa-f]{5})?)(?::\s*([0-9]+))?\s*")
_RANGE_NAME = re.compile(r"[0-9A-Fa-f]{5}(\.txt)?")


def _parseLine(line: bytes, where: str) -> tuple[bytes, int]:
    """
    @return: the upper-case hex digest and the count (1 if none is given;
        0 for the padding lines that Pwned Passwords can add).
    """
    match = _LINE.fullmatch(line)
    if match is None:
        raise BreachedListError(f"{where}: not a Have I Been Pwned SHA-1 line (HASH:COUNT)")
    return match.group(1).upper(), int(match.group(2) or 1)


def breachCount(path: str, password: bytes) -> int:
    """
    How often C{password} appears in a local copy of Pwned Passwords,
    without reading more of it than a few lines.

    @param path: either a directory of range files, one per first five hex
        digits of the SHA-1, named C{ABCDE.txt} or C{ABCDE} (as the API's
        C{/range/ABCDE} answers, and the official downloader stores them),
        each line C{SUFFIX:COUNT}; or one file of C{SHA1:COUNT} lines sorted
        by hash (the downloadable "ordered by hash" file), searched by
        bisection.
    @return: the count, 0 if it is not there.
    @raise BreachedListError: if the list cannot be read or is malformed.
    """
    digest = hashlib.sha1(password).hexdigest().upper().encode("ascii")
    try:
        if os.path.isdir(path):
            return _rangeCount(path, digest)
        with open(path, "rb") as f:
            return _sortedCount(f, path, digest)
    except OSError as e:
        raise BreachedListError(f"breached password list {path}: {e.strerror}") from None


def _rangeFile(directory: str, prefix: str) -> str:
    for name in (prefix + ".txt", prefix, prefix.lower() + ".txt", prefix.lower()):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    raise BreachedListError(
        f"breached password list {directory}: no range file {prefix}.txt for this password"
    )


def _rangeCount(directory: str, digest: bytes) -> int:
    path = _rangeFile(directory, digest[:5].decode("ascii"))
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            key, count = _parseLine(line, f"{path}:{lineno}")
            if key == digest[5:] or key == digest:
                return count
    return 0


def _lineAfter(f: BinaryIO, offset: int, path: str) -> tuple[Optional[bytes], int]:
    """
    @return: the digest and count of the first line that starts at or after
        C{offset}, or C{(None, 0)} at the end of the file.
    """
    f.seek(max(offset - 1, 0))
    if offset > 0:
        # Skip the rest of the line that byte offset - 1 is in.
        f.readline()
    line = f.readline()
    if not line.strip():
        return None, 0
    where = f"{path}: the line after byte {offset}"
    key, count = _parseLine(line, where)
    if len(key) != 40:
        raise BreachedListError(f"{where}: not a whole SHA-1 (a range file is named by prefix)")
    return key, count


def _sortedCount(f: BinaryIO, path: str, digest: bytes) -> int:
    # Find the first line whose digest is not below ours: lines after an
    # offset only grow with it, so bisect over offsets.
    low, high = 0, os.fstat(f.fileno()).st_size
    while low < high:
        middle = (low + high) // 2
        key, _ = _lineAfter(f, middle, path)
        if key is None or key >= digest:
            high = middle
        else:
            low = middle + 1
    key, count = _lineAfter(f, low, path)
    return count if key == digest else 0


def checkBreachedList(path: str) -> None:
    """
    Check that C{path} looks like a list L{breachCount} can search, so that
    a mistake shows before anyone types a password: a directory with range
    files in it, or a file whose first, middle and last lines are sorted.

    @raise BreachedListError: naming the problem.
    """
    try:
        if os.path.isdir(path):
            with os.scandir(path) as entries:
                if not any(_RANGE_NAME.fullmatch(e.name) for e in entries):
                    raise BreachedListError(
                        f"breached password list {path}: no range files (ABCDE.txt) in it"
                    )
            return
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            keys = [_lineAfter(f, 0, path)[0], _lineAfter(f, size // 2, path)[0]]
            f.seek(max(size - 4096, 0))
            tail = f.read().split(b"\n")
            last = next((line for line in reversed(tail) if line.strip()), None)
            if last is not None:
                keys.append(_parseLine(last, f"{path}: the last line")[0])
    except OSError as e:
        raise BreachedListError(f"breached password list {path}: {e.strerror}") from None
    found = [k for k in keys if k is not None]
    if not found:
        raise BreachedListError(f"breached password list {path}: empty")
    if found != sorted(found):
        raise BreachedListError(
            f"breached password list {path}: not sorted by hash"
            " (use the file ordered by hash, not by count)"
        )
