"""Maildir delivery: one file written through tmp/, fsynced, linked into each new/."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
import time
from typing import Optional

_SUBDIRS = ("tmp", "new", "cur")
_counter = 0


def _makeFolders(path: str) -> None:
    """Like C{os.makedirs}, but every folder it creates gets mode 0700, whatever the umask."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        _makeFolders(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    os.chmod(path, 0o700)


def ensureMaildir(path: str) -> None:
    """Create the Maildir C{path} and its tmp/new/cur folders (mode 0700) when missing."""
    for sub in _SUBDIRS:
        _makeFolders(os.path.join(path, sub))


def uniqueName(hostname: Optional[str] = None) -> str:
    """
    A Maildir file name no other delivery can pick (the modern form of
    maildir(5): seconds, microseconds, pid, a counter and random bits).
    """
    global _counter
    _counter += 1
    now = time.time()
    host = (hostname or socket.gethostname()).replace("/", r"\057").replace(":", r"\072")
    return (
        f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{_counter}"
        f"R{secrets.token_hex(8)}.{host}"
    )


def _fsyncDirectory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MaildirWriter:
    """
    Streams one message to one or more Maildirs.

    L{write} takes the message in canonical SMTP form (CRLF line ends, never
    a CRLF split across chunks) and stores it with LF line ends, as mail
    readers expect on Unix. L{commit} (blocking: run it in a thread) makes
    it durable: fsync of the file, then a hard link (or a copy across file
    systems) into each Maildir's new/ with C{,S=size}, and fsync of each
    new/ folder. Nothing appears in new/ before it is complete.
    """

    def __init__(self, maildirs: list, hostname: str) -> None:
        self._maildirs = list(maildirs)
        self._hostname = hostname
        ensureMaildir(self._maildirs[0])
        self._name = uniqueName(hostname)
        self._tmp = os.path.join(self._maildirs[0], "tmp", self._name)
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=65536)
        self.size = 0

    def write(self, chunk: bytes) -> None:
        data = chunk.replace(b"\r\n", b"\n")
        self._file.write(data)
        self.size += len(data)

    def commit(self) -> list:
        """
        Make the message durable in every Maildir.

        @return: the paths of the delivered files.
        @raise OSError: if any step fails; then no file is left in any new/
            that was not already complete.
        """
        f = self._file
        f.flush()
        os.fsync(f.fileno())
        f.close()
        final = f"{self._name},S={self.size}"
        delivered = []
        try:
            for maildir in self._maildirs:
                ensureMaildir(maildir)
                target = os.path.join(maildir, "new", final)
                try:
                    os.link(self._tmp, target)
                except OSError as e:
                    if e.errno != errno.EXDEV:
                        raise
                    self._copyInto(maildir, final)
                delivered.append(target)
            for maildir in self._maildirs:
                _fsyncDirectory(os.path.join(maildir, "new"))
        except BaseException:
            for path in delivered:
                _unlinkQuietly(path)
            raise
        finally:
            _unlinkQuietly(self._tmp)
        return delivered

    def _copyInto(self, maildir: str, final: str) -> None:
        tmp = os.path.join(maildir, "tmp", final)
        try:
            shutil.copyfile(self._tmp, tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, os.path.join(maildir, "new", final))
        except BaseException:
            _unlinkQuietly(tmp)
            raise

    def abort(self) -> None:
        """Throw the message away (client gone, message refused)."""
        if not self._file.closed:
            self._file.close()
        _unlinkQuietly(self._tmp)


def _unlinkQuietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
