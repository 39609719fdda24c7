"""Maildir delivery: one file written through tmp/, fsynced, linked into each new/."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
import time
from typing import Optional

from mailauth.durable import fsyncDirectory, unlink, writeDurably

_SUBDIRS = ("tmp", "new", "cur")
# Bytes of a message held in memory before its tmp/ file is created; also
# the size of the file's write buffer after that.
SPOOL = 65536
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


class MaildirWriter:
    """
    Streams one message to one or more Maildirs.

    L{write} takes the message in canonical SMTP form (CRLF line ends, never
    a CRLF split across chunks) and stores it with LF line ends, as mail
    readers expect on Unix. L{commit} (blocking: run it in a thread) makes
    it durable: fsync of the file, then a hard link (or a copy across file
    systems) into each Maildir's new/ with C{,S=size}, and fsync of each
    new/ folder. Nothing appears in new/ before it is complete.

    The first L{SPOOL} bytes are held in memory and the tmp/ file is only
    created when the message grows past them, or by L{commit}: creating a
    file is a journalled metadata change that can wait milliseconds behind
    other deliveries' fsyncs, so most messages never create it on the
    caller's (the reactor's) thread. Past L{SPOOL} the message streams
    through a buffer of that size, so memory does not grow with its size.
    """

    def __init__(self, maildirs: list, hostname: str) -> None:
        self._maildirs = list(maildirs)
        self._hostname = hostname
        ensureMaildir(self._maildirs[0])
        self._name = uniqueName(hostname)
        self._tmp = os.path.join(self._maildirs[0], "tmp", self._name)
        self._file = None
        self._spool: list = []
        self.size = 0

    def write(self, chunk: bytes) -> None:
        data = chunk.replace(b"\r\n", b"\n")
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._spool.append(data)
        if self.size > SPOOL:
            self._open()

    def _open(self) -> None:
        """Create the tmp/ file and move the spooled start of the message into it."""
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=SPOOL)
        spool, self._spool = self._spool, []
        self._file.writelines(spool)

    def commit(self) -> list:
        """
        Make the message durable in every Maildir.

        @return: the paths of the delivered files.
        @raise OSError: if any step fails; then no file is left in any new/
            that was not already complete.
        """
        final = f"{self._name},S={self.size}"
        delivered = []
        try:
            self._sync()
            try:
                for index, maildir in enumerate(self._maildirs):
                    if index:
                        # The first was made by __init__, for its tmp/.
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
                    fsyncDirectory(os.path.join(maildir, "new"))
            except BaseException:
                for path in delivered:
                    unlink(path)
                raise
        finally:
            unlink(self._tmp)
        return delivered

    def _sync(self) -> None:
        """
        Get the whole message into its tmp/ file and fsync it. A message
        that never left the spool is written with one C{write}: every
        system call here hands the GIL back and forth with the reactor.
        """
        f = self._file
        if f is None:
            data = b"".join(self._spool)
            self._spool = []
            writeDurably(self._tmp, data)
            return
        try:
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()

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
            unlink(tmp)
            raise

    def abort(self) -> None:
        """Throw the message away (client gone, message refused)."""
        self._spool = []
        if self._file is None:
            return
        if not self._file.closed:
            self._file.close()
        unlink(self._tmp)
