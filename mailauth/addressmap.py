"""Files that map addresses to lists of addresses: aliases and the sender map."""

from __future__ import annotations

import os
from typing import Optional

from twisted.logger import Logger

log = Logger(namespace="mailauth.addressmap")


def normalise(address: str) -> str:
    """Lower-case an address and drop a trailing dot of its domain."""
    return address.strip().lower().rstrip(".")


class AddressMap:
    """
    A file of lines C{key: value[, value...]}, C{#} comments and blank lines
    ignored; keys and values are addresses (C{@domain} keys match a whole
    domain). Re-read when it changes; a malformed line is reported with its
    line number and skipped.

    @ivar problems: C{"PATH:LINE: message"} for each line skipped at the
        last load.
    """

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self.problems: list = []
        self._map: dict = {}
        self._stamp = None
        if path is not None:
            self.load()

    def load(self) -> None:
        try:
            st = os.stat(self.path)
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            log.error("cannot read {path}: {why}", path=self.path, why=e)
            return
        entries: dict = {}
        problems = []
        for lineno, raw in enumerate(lines, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            key, sep, rest = line.partition(":")
            key = normalise(key)
            values = [normalise(v) for v in rest.replace(",", " ").split()]
            if not sep or "@" not in key or not values or any("@" not in v for v in values):
                problems.append(f"{self.path}:{lineno}: expected 'address: address[, address...]'")
                continue
            if key in entries:
                problems.append(f"{self.path}:{lineno}: {key} given again; the first one counts")
                continue
            entries[key] = tuple(values)
        for problem in problems:
            log.warn("{problem}", problem=problem)
        self._map = entries
        self.problems = problems
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)

    def maybeReload(self) -> bool:
        """Re-read the file if it changed since the last load."""
        if self.path is None:
            return False
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        if (st.st_mtime_ns, st.st_size, st.st_ino) == self._stamp:
            return False
        self.load()
        return True

    def get(self, address: str) -> tuple:
        """The values for C{address}, or for its C{@domain}, or C{()}."""
        address = normalise(address)
        found = self._map.get(address)
        if found is None and "@" in address:
            found = self._map.get("@" + address.rsplit("@", 1)[1])
        return found or ()

    def items(self):
        return self._map.items()
