"""
Blocking file helpers for durable writes, locks and change detection, used
by the Maildir writer, the queue and the users file (run them in a worker
thread when the reactor would otherwise wait).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from typing import Iterator, Optional


def fsyncDirectory(path: str) -> None:
    """fsync the folder C{path}, making the names created or renamed in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def writeDurably(path: str, data: bytes, owner: Optional[os.stat_result] = None) -> None:
    """
    Create C{path} (it must not exist) holding C{data}, fsynced, mode 0600;
    owned like C{owner} when we run as root.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, owner.st_uid, owner.st_gid)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink(path: str) -> bool:
    """Remove C{path}; whether it was there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


@contextlib.contextmanager
def locked(path: str, owner: Optional[os.stat_result] = None, mode: int = 0o600) -> Iterator[None]:
    """
    Hold an exclusive C{flock} on the lock file C{path} (created with
    C{mode} if missing, owned like C{owner} when we run as root, so that an
    admin command run as root does not lock the daemon out).

    The file is opened for reading only: C{flock} needs no write access, so
    a process that may only read the lock file (the daemon's user, in the
    file's group) can still take the lock.

    @raise OSError: if the lock file cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, owner.st_uid, owner.st_gid)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def replaceDurably(path: str, data: bytes, mode: int, like: Optional[os.stat_result]) -> None:
    """
    Replace the file C{path} by one holding C{data}, atomically: a temporary
    file in the same folder, owned like C{like} (the old file) as far as we
    may, fsynced, renamed over C{path}, and the folder fsynced. A reader
    sees the old file or the new one, never a mix.

    C{mode} is the most the file may allow: a new file gets it, and the old
    file's bits are kept within it (an edit may narrow a file's mode to
    C{mode}, never widen it: a users file an admin made 0600 stays so).

    @raise OSError: if it cannot be written; C{path} is then unchanged.
    """
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode if like is None else mode & stat.S_IMODE(like.st_mode))
            if like is not None:
                _keepOwner(f.fileno(), like)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink(tmp)
        raise
    # Make the rename itself durable; the new file is in place either way.
    with contextlib.suppress(OSError):
        fsyncDirectory(directory)


def _keepOwner(fd: int, old: os.stat_result) -> None:
    # Only root may give a file away; anyone may keep a group they are in.
    for uid in (old.st_uid, -1):
        try:
            os.fchown(fd, uid, old.st_gid)
            return
        except OSError:
            pass


def stamp(st: os.stat_result) -> tuple:
    """What tells one version of a file from the next: mtime, size and inode."""
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class WatchedFile:
    """
    A file read into memory that is read again when it changes: remembers
    how the file looked when last read (L{stamp}), so L{due} is one
    C{stat}. The users file, the aliases, the sender map, the sending limit
    overrides and the JWKS file use it, through L{ReloadableFile}.

    @ivar stamp: the file's stamp at the last L{read}, or the error that
        ended the last read.
    @ivar repeated: whether the last L{read} failed as the one before it:
        its owner reports an error once, not at every periodic check.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.stamp: Optional[tuple] = None
        self.repeated = False

    def read(self) -> bytes:
        """
        Read the whole file and remember its stamp.

        @raise OSError: if it cannot be read. L{due} stays true after that,
            so that reading is tried again: a fixed permission does not
            change the stamp.
        """
        try:
            with open(self.path, "rb") as f:
                current = stamp(os.fstat(f.fileno()))
                data = f.read()
        except OSError as e:
            failed = ("error", e.errno)
            self.repeated, self.stamp = failed == self.stamp, failed
            raise
        self.stamp, self.repeated = current, False
        return data

    def due(self) -> bool:
        """
        Whether to read the file again: it looks different from when it was
        last read, or the last read failed, or it cannot be looked at now
        (reading it then fails, and says why).
        """
        try:
            return stamp(os.stat(self.path)) != self.stamp
        except OSError:
            return True


class ReloadableFile:
    """
    What the L{mailauth.interfaces.IReloadable} files share: the path, the
    problems of the last load, and L{maybeReload} on top of the subclass's
    C{load}, which returns whether the file was read and logs why not when
    L{reportable} says so.
    """

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self.problems: list[str] = []
        self.file = WatchedFile(path) if path is not None else None
        self._checking = False

    def load(self) -> bool:
        raise NotImplementedError

    def maybeReload(self) -> bool:
        """Read the file again if it changed; whether it was read."""
        if self.file is None or not self.file.due():
            return False
        self._checking = True
        try:
            return self.load()
        finally:
            self._checking = False

    def reportable(self) -> bool:
        """
        Whether the file's read error is to be logged: always when asked to
        load it (at start, on SIGHUP), once per error by the periodic check.
        """
        return not (self._checking and self.file is not None and self.file.repeated)
