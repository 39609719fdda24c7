"""Tests for L{mailauth.pwquality}."""

from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable

from twisted.trial import unittest

from mailauth import pwquality
from mailauth.pwquality import (
    BreachedListError,
    PasswordPolicy,
    PasswordRefused,
    breachCount,
    checkBreachedList,
)


def sha1(password: bytes) -> str:
    return hashlib.sha1(password).hexdigest().upper()


def _withFiller(counts: dict[bytes, int], filler: int) -> dict[str, int]:
    """C{counts} by upper-case SHA-1, and C{filler} more hashes of other passwords."""
    lines = {sha1(b"filler %d" % i): i + 1 for i in range(filler)}
    lines.update({sha1(password): count for password, count in counts.items()})
    return lines


def writePwnedFile(
    path: str, counts: dict[bytes, int], filler: int = 1000, newline: str = "\r\n"
) -> None:
    """
    Write a Pwned Passwords file ordered by hash, as Have I Been Pwned
    ships it: C{SHA1:COUNT} lines, upper-case, CRLF.

    @param counts: how often each password was seen.
    @param filler: how many lines of other passwords to add.
    """
    lines = _withFiller(counts, filler)
    with open(path, "w", newline="") as f:
        for digest in sorted(lines):
            f.write(f"{digest}:{lines[digest]}{newline}")


def writePwnedRanges(
    directory: str, counts: dict[bytes, int], filler: int = 20, absent: Iterable[bytes] = ()
) -> None:
    """
    Write Pwned Passwords range files, C{ABCDE.txt} with C{SUFFIX:COUNT}
    lines, as the API's C{/range/ABCDE} answers and the downloader stores.

    @param absent: passwords not in the list whose range files must exist
        all the same (the real list has all 16**5 of them).
    """
    os.makedirs(directory, exist_ok=True)
    ranges: dict[str, list[str]] = {sha1(p)[:5]: [] for p in absent}
    lines = _withFiller(counts, filler)
    for digest in sorted(lines):
        ranges.setdefault(digest[:5], []).append(f"{digest[5:]}:{lines[digest]}\r\n")
    for prefix, entries in ranges.items():
        with open(os.path.join(directory, prefix + ".txt"), "w", newline="") as f:
            f.writelines(entries)


class PolicyTests(unittest.TestCase):
    """L{PasswordPolicy.check} refuses a password with one line saying why."""

    def test_minLength(self) -> None:
        """
        By default a password needs 8 characters: a shorter one is refused
        with a line giving both numbers.
        """
        policy = PasswordPolicy()
        self.assertEqual(policy.minLength, 8)
        error = self.assertRaises(PasswordRefused, policy.check, b"1234567")
        self.assertEqual(
            str(error), "password refused: it has 7 characters, and at least 8 are required"
        )
        self.assertIsNone(policy.check(b"12345678"))
        self.assertIsNone(PasswordPolicy(minLength=0).check(b"x"))
        self.assertRaises(PasswordRefused, PasswordPolicy(minLength=20).check, b"x" * 19)

    def test_lengthInCharacters(self) -> None:
        """
        The length counts characters, not bytes; a byte that is not UTF-8
        counts as one.
        """
        error = self.assertRaises(PasswordRefused, PasswordPolicy().check, "pässwö".encode())
        self.assertIn("it has 6 characters", str(error))
        self.assertIsNone(PasswordPolicy().check("pässwörd".encode()))
        self.assertIsNone(PasswordPolicy().check(b"\xff" * 8))

    def test_breached(self) -> None:
        """
        A password in the breached list is refused, saying how often it
        was seen; one not in it passes.
        """
        path = self.mktemp()
        writePwnedFile(path, {b"password123": 251682})
        policy = PasswordPolicy(breached=path)
        error = self.assertRaises(PasswordRefused, policy.check, b"password123")
        self.assertEqual(
            str(error),
            "password refused: it is in the list of breached passwords (251682 times);"
            " choose another",
        )
        self.assertIsNone(policy.check(b"correct horse battery staple"))

    def test_lengthFirst(self) -> None:
        """
        A password too short is refused for that, without searching the list.
        """
        policy = PasswordPolicy(breached=os.path.join(self.mktemp(), "missing"))
        error = self.assertRaises(PasswordRefused, policy.check, b"pw")
        self.assertIn("at least 8", str(error))
        self.assertRaises(BreachedListError, policy.check, b"long enough")


class CountingFile(io.FileIO):
    """A file that counts the bytes read from it."""

    bytesRead = 0

    def readinto(self, buffer) -> int:
        count = super().readinto(buffer)
        self.bytesRead += count or 0
        return count


class SortedFileTests(unittest.TestCase):
    """L{breachCount} bisects the list ordered by hash."""

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.listed = {b"password%d" % i: i + 1 for i in range(300)}
        writePwnedFile(self.path, self.listed, filler=5000)

    def test_everyLine(self) -> None:
        """
        Every password in the list is found with its count, the first and
        last lines among them; others are not found.
        """
        for password, count in self.listed.items():
            self.assertEqual(breachCount(self.path, password), count, password)
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\r\n")
        self.assertEqual(lines[-1], b"")
        for line in (lines[0], lines[-2]):
            digest, count = line.split(b":")
            self.assertEqual(pwquality._sortedCount(open(self.path, "rb"), "x", digest), int(count))
        for password in (b"", b"not listed", b"password-1", b"Password1"):
            self.assertEqual(breachCount(self.path, password), 0, password)

    def test_readsLittle(self) -> None:
        """
        The search reads a few blocks, not the file: the real one is over
        30 GB.
        """
        writePwnedFile(self.path, self.listed, filler=50000)
        size = os.path.getsize(self.path)
        for password in (b"password7", b"not listed"):
            raw = CountingFile(self.path)
            with io.BufferedReader(raw) as f:
                found = pwquality._sortedCount(f, self.path, sha1(password).encode())
            self.assertEqual(found, self.listed.get(password, 0))
            self.assertLess(raw.bytesRead, size // 10, password)

    def test_formats(self) -> None:
        """
        LF line ends, lower-case hex and lines without a count (taken as
        seen once) are read too.
        """
        writePwnedFile(self.path, {b"hunter2": 17}, newline="\n")
        self.assertEqual(breachCount(self.path, b"hunter2"), 17)
        with open(self.path, "w") as f:
            f.write(f"{sha1(b'a').lower()}\n{sha1(b'b').lower()}\n")
        self.assertEqual(breachCount(self.path, b"a"), 1)
        self.assertEqual(breachCount(self.path, b"b"), 1)
        self.assertEqual(breachCount(self.path, b"c"), 0)

    def test_padding(self) -> None:
        """
        A line with count 0, as Pwned Passwords adds for padding, is not a
        breach.
        """
        with open(self.path, "w") as f:
            f.write(f"{sha1(b'padded')}:0\r\n")
        self.assertEqual(breachCount(self.path, b"padded"), 0)
        self.assertIsNone(PasswordPolicy(minLength=0, breached=self.path).check(b"padded"))

    def test_emptyFile(self) -> None:
        """
        An empty list has no password in it.
        """
        open(self.path, "w").close()
        self.assertEqual(breachCount(self.path, b"anything"), 0)

    def test_malformed(self) -> None:
        """
        A line that is not C{SHA1:COUNT}, or a range file (35 hex digits a
        line) named as the whole list, is an error naming the file.
        """
        with open(self.path, "w") as f:
            f.write("password123:5\r\n")
        error = self.assertRaises(BreachedListError, breachCount, self.path, b"x")
        self.assertIn(self.path, str(error))
        self.assertIn("not a Have I Been Pwned SHA-1 line (HASH:COUNT)", str(error))
        with open(self.path, "w") as f:
            f.write(f"{sha1(b'x')[5:]}:5\r\n")
        error = self.assertRaises(BreachedListError, breachCount, self.path, b"x")
        self.assertIn("not a whole SHA-1 (a range file is named by prefix)", str(error))

    def test_missing(self) -> None:
        """
        A list that cannot be read is an error naming it and why.
        """
        path = os.path.join(self.mktemp(), "pwned.txt")
        error = self.assertRaises(BreachedListError, breachCount, path, b"x")
        self.assertEqual(str(error), f"breached password list {path}: No such file or directory")


class RangeDirectoryTests(unittest.TestCase):
    """L{breachCount} reads the one range file a password's hash falls in."""

    def setUp(self) -> None:
        self.directory = self.mktemp()
        writePwnedRanges(
            self.directory, {b"password123": 251682, b"letmein": 9}, absent=[b"good password"]
        )

    def test_found(self) -> None:
        """
        A listed password is found in the file named by the first five hex
        digits of its SHA-1; another is not.
        """
        self.assertEqual(breachCount(self.directory, b"password123"), 251682)
        self.assertEqual(breachCount(self.directory, b"letmein"), 9)
        self.assertEqual(breachCount(self.directory, b"good password"), 0)

    def test_names(self) -> None:
        """
        Range files may also be named without C{.txt} or in lower case,
        and hold whole hashes.
        """
        prefix = sha1(b"letmein")[:5]
        os.rename(
            os.path.join(self.directory, prefix + ".txt"),
            os.path.join(self.directory, prefix.lower()),
        )
        self.assertEqual(breachCount(self.directory, b"letmein"), 9)
        with open(os.path.join(self.directory, prefix.lower()), "w") as f:
            f.write(f"{sha1(b'letmein')}:10\n")
        self.assertEqual(breachCount(self.directory, b"letmein"), 10)

    def test_missingRangeFile(self) -> None:
        """
        Without the range file a password needs, it cannot be checked:
        an error names the file, rather than letting the password through.
        """
        prefix = sha1(b"not here")[:5]
        error = self.assertRaises(BreachedListError, breachCount, self.directory, b"not here")
        self.assertEqual(
            str(error),
            f"breached password list {self.directory}: no range file {prefix}.txt"
            " for this password",
        )

    def test_malformedRangeFile(self) -> None:
        """
        Blank lines are skipped; a malformed line is an error naming the
        file and line.
        """
        path = os.path.join(self.directory, sha1(b"good password")[:5] + ".txt")
        with open(path, "w") as f:
            f.write("\r\nnot a hash\r\n")
        error = self.assertRaises(BreachedListError, breachCount, self.directory, b"good password")
        self.assertEqual(str(error), f"{path}:2: not a Have I Been Pwned SHA-1 line (HASH:COUNT)")


class CheckListTests(unittest.TestCase):
    """L{checkBreachedList} catches a wrong list before a password is typed."""

    def test_good(self) -> None:
        """
        A file ordered by hash and a directory of range files pass.
        """
        path = self.mktemp()
        writePwnedFile(path, {b"x": 1})
        self.assertIsNone(checkBreachedList(path))
        directory = self.mktemp()
        writePwnedRanges(directory, {b"x": 1}, filler=3)
        self.assertIsNone(checkBreachedList(directory))

    def test_problems(self) -> None:
        """
        A missing path, an empty file or directory, a file ordered by count
        (which bisection would search wrongly) and one of other lines are
        each refused with a line saying so.
        """
        path = self.mktemp()
        error = self.assertRaises(BreachedListError, checkBreachedList, path)
        self.assertEqual(str(error), f"breached password list {path}: No such file or directory")
        open(path, "w").close()
        error = self.assertRaises(BreachedListError, checkBreachedList, path)
        self.assertEqual(str(error), f"breached password list {path}: empty")
        with open(path, "w") as f:
            for i in range(100):
                f.write(f"{sha1(b'%d' % i)}:{1000 - i}\r\n")
        error = self.assertRaises(BreachedListError, checkBreachedList, path)
        self.assertEqual(
            str(error),
            f"breached password list {path}: not sorted by hash"
            " (use the file ordered by hash, not by count)",
        )
        with open(path, "w") as f:
            f.write("alice:{PLAIN}secret\n")
        error = self.assertRaises(BreachedListError, checkBreachedList, path)
        self.assertIn("not a Have I Been Pwned SHA-1 line", str(error))
        directory = self.mktemp()
        os.mkdir(directory)
        with open(os.path.join(directory, "README"), "w") as f:
            f.write("nothing\n")
        error = self.assertRaises(BreachedListError, checkBreachedList, directory)
        self.assertEqual(
            str(error), f"breached password list {directory}: no range files (ABCDE.txt) in it"
        )
