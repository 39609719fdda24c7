"""Files that map addresses to lists of addresses: aliases and the sender map."""

from __future__ import annotations

from typing import Optional

from twisted.logger import Logger
from zope.interface import implementer

from mailauth.addresses import hashInDomain, normalise, withoutComment
from mailauth.durable import ReloadableFile
from mailauth.interfaces import IReloadable
from mailauth.userdb import decodeFile, fileLines

log = Logger(namespace="mailauth.addressmap")


def _isUTF8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _logicalLines(lines: list) -> list:
    """
    C{(first line number, text)} of each entry of C{lines}, comments and
    blank lines left out: as in aliases(5), a line that starts with white
    space continues the entry above it, so a long list of targets can be
    folded; unless it has a C{:} of its own, which makes it an entry as
    it always was.
    """
    logical: list = []
    for lineno, raw in enumerate(lines, 1):
        line = withoutComment(raw).strip()
        if not line:
            continue
        if logical and raw[:1].isspace() and ":" not in line:
            first, text = logical[-1]
            logical[-1] = (first, f"{text} {line}")
        else:
            logical.append((lineno, line))
    return logical


@implementer(IReloadable)
class AddressMap(ReloadableFile):
    """
    A file of lines C{key: value[, value...]}, comments (from a C{#} at the
    start of a line, after white space or after a comma:
    L{mailauth.addresses.withoutComment}) and blank lines ignored, a line
    that starts with white space (and has no C{:}) the continuation of the
    one above; keys and values are addresses (C{@domain} keys match a whole
    domain). Re-read when it changes; a
    malformed line is reported with its line number and skipped.

    @ivar problems: C{"PATH:LINE: message"} for each line skipped at the
        last load.
    """

    def __init__(self, path: Optional[str]) -> None:
        super().__init__(path)
        self._map: dict = {}
        self._written: dict = {}
        self.load()

    def load(self) -> bool:
        if self.file is None:
            return False
        try:
            lines = fileLines(decodeFile(self.file.read()))
        except OSError as e:
            if self.reportable():
                log.error(
                    "cannot read {path}: {why}; keeping the {count} entries read before",
                    path=self.path,
                    why=e,
                    count=len(self._map),
                )
            return False
        entries: dict = {}
        spelled: dict = {}
        problems = []
        for lineno, line in _logicalLines(lines):
            if not _isUTF8(line):
                # One line, not the whole file (a comment may hold anything).
                problems.append(f"{self.path}:{lineno}: not UTF-8")
                continue
            key, sep, rest = line.partition(":")
            written = tuple(rest.replace(",", " ").split())
            hashed = hashInDomain((key.strip(), *written))
            if hashed is not None:
                problems.append(f"{self.path}:{lineno}: {hashed}")
                continue
            key = normalise(key)
            values = [normalise(v) for v in written]
            if not sep or "@" not in key or not values or any("@" not in v for v in values):
                problems.append(f"{self.path}:{lineno}: expected 'address: address[, address...]'")
                continue
            if key in entries:
                problems.append(f"{self.path}:{lineno}: {key} given again; the first one counts")
                continue
            entries[key] = tuple(values)
            spelled[key] = written
        for problem in problems:
            log.warn("{problem}", problem=problem)
        self._map = entries
        self._written = spelled
        self.problems = problems
        return True

    def get(self, address: str) -> tuple:
        """The values for C{address}, or for its C{@domain}, or C{()}, as keys (L{normalise})."""
        return self._map.get(self._key(address), ())

    def written(self, address: str) -> tuple:
        """
        The values of L{get} as the file spells them: an address in another
        domain is passed on with its local part as written, which only its
        own domain may fold (RFC 5321 2.4).
        """
        return self._written.get(self._key(address), ())

    def _key(self, address: str) -> str:
        """The key that C{address} finds: its own, else its C{@domain}'s."""
        address = normalise(address)
        if address not in self._map and "@" in address:
            return "@" + address.rsplit("@", 1)[1]
        return address

    def items(self):
        return self._map.items()
