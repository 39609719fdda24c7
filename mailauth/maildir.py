"""Maildir delivery: one file written through tmp/, fsynced, linked into each new/."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import socket
import stat
import time
from typing import BinaryIO, Optional

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailauth.durable import fsyncDirectory, unlink, writeDurably
from mailauth.interfaces import BlockingRunner, IMessageSink

log = Logger(namespace="mailauth.maildir")

_SUBDIRS = ("tmp", "new", "cur")
# Bytes of a message held in memory before its tmp/ file is created; also
# the size of the file's write buffer after that.
SPOOL = 65536
_counter = 0


# What no local part or domain may hold: it becomes one path component.
_UNSAFE = re.compile(r"[/\x00-\x1f\x7f]")
# The longest file name (NAME_MAX on Linux and the BSDs), in bytes.
NAME_MAX = 255


class UnsafeMailbox(ValueError):
    """An address that cannot name a Maildir: the message says why."""


def mailboxProblem(address: str) -> Optional[str]:
    """
    Why C{address} cannot name a mailbox folder, or L{None} if it can.

    Its local part and its domain each become one path component of the
    Maildir template ({localpart}, {domain}, and {user} for both), so each
    must be one safe file name (L{componentProblem}), whatever quoting the
    address used.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return "it is not local@domain"
    return componentProblem(local, "local part") or componentProblem(domain, "domain")


def componentProblem(part: str, what: str) -> Optional[str]:
    """
    Why C{part} (the C{what} of an address) cannot be one path component,
    or L{None}: it must not be empty, hold C{/}, NUL or another control
    character, or start with a dot (so neither C{.} nor C{..}, nor a
    hidden name), and must be at most L{NAME_MAX} bytes.
    """
    if not part:
        return f"its {what} is empty"
    found = _UNSAFE.search(part)
    if found is not None:
        char = "'/'" if found.group() == "/" else f"control character {found.group()!r}"
        return f"its {what} contains {char}"
    if part.startswith("."):
        return f"its {what} starts with a dot"
    if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
        return f"its {what} is longer than {NAME_MAX} bytes"
    return None


def maildirPath(template: str, login: str) -> str:
    """
    The Maildir of C{login} by C{template}, checked to stay under the
    template's fixed start (what precedes its first C{{}}).

    C{..} is resolved in the text (L{os.path.normpath}), never by following
    symbolic links: a link the administrator made (C{/var/mail} to another
    disk) is not taken for an escape, and the path returned, the one
    checked, holds no C{..} for the kernel to resolve through a link.

    @raise UnsafeMailbox: if the login cannot name a folder
        (L{mailboxProblem}) or its path would leave the fixed start.
    """
    problem = mailboxProblem(login)
    if problem is not None:
        raise UnsafeMailbox(f"{login!r} cannot name a Maildir: {problem}")
    localpart, _, domain = login.rpartition("@")
    path = os.path.normpath(template.format(domain=domain, localpart=localpart, user=login))
    if not _under(path, template.split("{", 1)[0]):
        raise UnsafeMailbox(
            f"{login!r} cannot name a Maildir: {path!r} is outside the "
            f"maildir template's fixed start {template.split('{', 1)[0]!r}"
        )
    return path


def _under(path: str, fixed: str) -> bool:
    """Whether the normalised C{path} starts with the template's fixed start C{fixed}."""
    if not fixed:
        # A template relative to the working folder: stay in it.
        return not (os.path.isabs(path) or path == ".." or path.startswith("../"))
    base = os.path.normpath(fixed)
    if fixed.endswith("/") and not base.endswith("/"):
        base += "/"
    return path.startswith(base)


def _makeFolders(path: str, created: list) -> None:
    """
    Like C{os.makedirs}, but every folder it creates gets mode 0700, whatever
    the umask, and is added to C{created}.
    """
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        _makeFolders(parent, created)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    os.chmod(path, 0o700)
    created.append(path)


def ensureMaildir(path: str) -> list:
    """
    Create the Maildir C{path} and its tmp/new/cur folders (mode 0700) when
    missing.

    @return: the folders it created, parents first.
    """
    created: list = []
    for sub in _SUBDIRS:
        _makeFolders(os.path.join(path, sub), created)
    return created


def fsyncParents(folders: list) -> None:
    """
    Make new C{folders} durable: fsync the parent of each (the folder that
    gained an entry), each parent once.
    """
    for parent in dict.fromkeys(os.path.dirname(folder) for folder in folders):
        fsyncDirectory(parent)


def uniqueName(hostname: Optional[str] = None) -> str:
    """
    A Maildir file name no other delivery can pick (the modern form of
    maildir(5): seconds, microseconds, pid, a counter and random bits).
    """
    global _counter
    _counter += 1
    now = time.time()
    host = _nameHost(hostname or socket.gethostname())
    return (
        f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{_counter}R{secrets.token_hex(8)}.{host}"
    )


def _nameHost(hostname: str) -> str:
    """The host part of a Maildir name: no C{/} nor C{:} (maildir(5))."""
    return hostname.replace("/", r"\057").replace(":", r"\072")


@implementer(IMessageSink)
class MaildirWriter:
    """
    Streams one message to one or more Maildirs.

    L{write} takes the message in canonical SMTP form (CRLF line ends; a
    chunk may end between CR and LF) and stores it with LF line ends, as mail
    readers expect on Unix. L{prepare} (blocking: run it in a thread) makes
    it durable in the first Maildir's tmp/ (fsync of the file, and of the
    parents of every folder made for it); L{commit} hard-links it (or
    copies it across file systems) into each Maildir's new/ with
    C{,S=size}, fsyncs each new/ folder and removes the tmp/ file. Nothing
    appears in new/ before it is complete.

    The first L{SPOOL} bytes are held in memory and the tmp/ file is only
    created when the message grows past them, or by L{commit}: creating a
    file is a journalled metadata change that can wait milliseconds behind
    other deliveries' fsyncs, so most messages never create it on the
    caller's (the reactor's) thread. Past L{SPOOL} the message streams
    through a buffer of that size, so memory does not grow with its size.

    @param top: header fields of final delivery (C{Return-Path:}, CRLF
        ended) that head the file, above anything L{prepend} adds.
    """

    def __init__(self, maildirs: list, hostname: str, top: bytes = b"") -> None:
        self._maildirs = list(maildirs)
        self._hostname = hostname
        self._created = ensureMaildir(self._maildirs[0])
        self._name = uniqueName(hostname)
        self._tmp = os.path.join(self._maildirs[0], "tmp", self._name)
        self._file: Optional[BinaryIO] = None
        self._spool: list = []
        self._prepared = False
        self._pendingCR = False
        self._delivered: list = []
        self.size = 0
        self._top = top.replace(b"\r\n", b"\n")
        if self._top:
            self._store(self._top)

    def write(self, chunk: bytes) -> None:
        if self._pendingCR:
            chunk = b"\r" + chunk
        # A final CR may be the first half of a CRLF split across chunks.
        self._pendingCR = chunk.endswith(b"\r")
        if self._pendingCR:
            chunk = chunk[:-1]
        self._store(chunk.replace(b"\r\n", b"\n"))

    def _store(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._spool.append(data)
        if self.size > SPOOL:
            self._open()

    def _open(self) -> None:
        """Create the tmp/ file and move the spooled start of the message into it."""
        # Readable as well, for a copy behind a prepended header.
        fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=SPOOL)
        spool, self._spool = self._spool, []
        self._file.writelines(spool)

    def prepend(self, header: bytes) -> None:
        """
        Put C{header} (whole header fields, CRLF ended) on top of the message
        written so far, below the C{top} fields. A message still in memory
        gets it there; one already in its tmp/ file is copied behind it
        into a new tmp/ file by the kernel (C{copy_file_range}), never
        through this process's memory. Blocks: call it in a thread, after
        the last L{write}.

        @raise OSError: if the copy fails; L{abort} then removes both files.
        """
        if self._pendingCR:
            # Not half of a CRLF after all: the message is over.
            self._pendingCR = False
            self._store(b"\r")
        data = header.replace(b"\r\n", b"\n")
        if self._file is None:
            self._spool.insert(1 if self._top else 0, data)
            self.size += len(data)
            return
        name = uniqueName(self._hostname)
        path = os.path.join(self._maildirs[0], "tmp", name)
        old = self._file
        old.flush()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        new = os.fdopen(fd, "wb", buffering=SPOOL)
        try:
            new.write(self._top + data)
            new.flush()
            copyRange(old.fileno(), fd, len(self._top), self.size - len(self._top))
        except BaseException:
            with contextlib.suppress(OSError):
                new.close()
            unlink(path)
            raise
        self._file, self._name, self._tmp, previous = new, name, path, self._tmp
        self.size += len(data)
        with contextlib.suppress(OSError):
            old.close()
        unlink(previous)

    def prepare(self) -> None:
        """
        Get the whole message into its tmp/ file and fsync it, and the
        folders made for it. A message that never left the spool is written
        with one C{write}: every system call here hands the GIL back and
        forth with the reactor.

        @raise OSError: if any step fails.
        """
        if self._pendingCR:
            self._pendingCR = False
            self._store(b"\r")
        try:
            f = self._file
            if f is None:
                data = b"".join(self._spool)
                self._spool = []
                writeDurably(self._tmp, data)
            else:
                try:
                    f.flush()
                    os.fsync(f.fileno())
                finally:
                    f.close()
            fsyncParents(self._created)
        except BaseException:
            self.abort()
            raise
        self._prepared = True

    def commit(self) -> list:
        """
        Deliver the prepared message (preparing it first if needed) into
        every Maildir's new/.

        @return: the paths of the delivered files.
        @raise OSError: if any step fails; then no file is left in any new/
            that was not already complete, and L{abort} removes the rest.
        """
        if not self._prepared:
            self.prepare()
        final = f"{self._name},S={self.size}"
        created: list = []
        # The new/ folders already given the message, by identity: two
        # paths (a symbolic link the administrator made for a shared
        # mailbox, or for a domain that is another's alias) may lead to
        # one folder, which gets one copy, not a failed second link.
        # (One recipient, the common case, needs no stat for it.)
        done: set = set()
        several = len(self._maildirs) > 1
        try:
            for index, maildir in enumerate(self._maildirs):
                if index:
                    # The first was made by __init__, for its tmp/.
                    created += ensureMaildir(maildir)
                target = os.path.join(maildir, "new", final)
                if several:
                    folder = _identity(os.path.dirname(target))
                    if folder in done:
                        continue
                    done.add(folder)
                try:
                    try:
                        os.link(self._tmp, target)
                    except OSError as e:
                        if e.errno != errno.EXDEV:
                            raise
                        self._copyInto(maildir, final)
                except OSError as e:
                    # Named by the Maildir it could not go into: os.link and
                    # the copy name the source, the first Maildir's tmp/.
                    raise OSError(e.errno, e.strerror, target) from e
                self._delivered.append(target)
            fsyncParents(created)
            for maildir in self._maildirs:
                fsyncDirectory(os.path.join(maildir, "new"))
            unlink(self._tmp)
        except BaseException:
            self.abort()
            raise
        return list(self._delivered)

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
        """
        Throw the message away (client gone, message refused, or another
        part of it could not be stored): the tmp/ file and any file already
        linked into a new/ are removed, even if closing the file fails (a
        full disk). Never raises.
        """
        self._spool = []
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        for path in [self._tmp, *self._delivered]:
            with contextlib.suppress(OSError):
                unlink(path)
        self._delivered = []


def _identity(path: str) -> tuple:
    """The device and inode of the folder C{path}, which every path to it shares."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def copyRange(source: int, target: int, offset: int, count: int) -> None:
    """
    Copy C{count} bytes of the file C{source} from C{offset} to the file
    C{target} at its current position: in the kernel with
    C{copy_file_range} (a reflink where the file system has them), else,
    where the kernel cannot (before Linux 4.5, across file systems before
    5.3, file systems that refuse it), by C{pread} and C{write} through a
    buffer of L{SPOOL} bytes.

    @raise OSError: if the copy fails, or C{source} ends early.
    """
    copy = getattr(os, "copy_file_range", None)
    while count > 0:
        if copy is not None:
            try:
                done = copy(source, target, count, offset)
            except OSError as e:
                if e.errno not in (
                    errno.ENOSYS,
                    errno.EXDEV,
                    errno.EINVAL,
                    errno.EOPNOTSUPP,
                    errno.EPERM,
                ):
                    raise
                copy = None
                continue
        else:
            chunk = os.pread(source, min(count, SPOOL), offset)
            view = memoryview(chunk)
            while view:
                view = view[os.write(target, view) :]
            done = len(chunk)
        if not done:
            raise OSError(errno.EIO, "the message file ended before its end")
        offset += done
        count -= done


# -- leftovers in tmp/ ------------------------------------------------------

# maildir(5): a file in tmp/ not accessed for 36 hours is garbage.
TMP_MAX_AGE = 36 * 3600
# A field of the template in a path component: never empty, never starting
# with a dot (mailboxProblem), never holding a slash.
_FIELD = re.compile(r"\{(?:domain|localpart|user)\}")


@attrs.frozen
class Leftovers:
    """
    What L{removeLeftovers} did.

    @ivar root: the folder it searched (the template's fixed start).
    @ivar removed: how many files it removed.
    @ivar failed: how many it could not remove (or folders it could not read).
    """

    root: str
    removed: int
    failed: int


def _component(text: str) -> re.Pattern:
    """A path component of the template as a pattern its fields can fill."""
    parts = _FIELD.split(text)
    return re.compile(r"(?!\.)[^/]+".join(re.escape(part) for part in parts))


def _realFolder(path: str) -> bool:
    """Whether C{path} is a folder and not a symbolic link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def maildirsOf(template: str) -> tuple[str, list]:
    """
    Every Maildir the template C{template} could have made: the folders
    under its fixed start whose names its fields could fill, found without
    following a symbolic link below that start (a link there may point
    anywhere).

    @return: the fixed start's folder and the Maildirs, in no set order.
    @raise OSError: if the fixed start's folder exists but cannot be read.
    """
    template = os.path.normpath(template)
    fixed = template.split("{", 1)[0]
    root = fixed.rstrip("/") if fixed.endswith("/") else os.path.dirname(fixed)
    root = root or ("/" if template.startswith("/") else ".")
    rest = template[len(root) :].lstrip("/") if root != "." else template
    found = [root]
    for text in rest.split("/"):
        deeper = []
        if _FIELD.search(text) is None:
            deeper = [path for path in (os.path.join(f, text) for f in found) if _realFolder(path)]
        else:
            pattern = _component(text)
            for folder in found:
                try:
                    entries = list(os.scandir(folder))
                except (FileNotFoundError, NotADirectoryError):
                    # No mail root yet (or a file in its place, which
                    # delivery reports): nothing to clean.
                    continue
                except OSError:
                    if folder == root:
                        raise
                    continue
                deeper += [
                    e.path
                    for e in entries
                    if pattern.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
                ]
        found = deeper
    return root, found


def removeLeftovers(template: str, hostname: str, now: float) -> Leftovers:
    """
    Empty the tmp/ folders of every Maildir of C{template} of what nobody
    will finish: files that a mailauth process on this host (C{hostname},
    as in L{uniqueName}) began and that process is gone (killed mid-DATA),
    and any file neither read nor written for L{TMP_MAX_AGE} (maildir(5)).
    Files of this process and of other live ones are kept, whatever their
    names. Blocks: run it in a thread.

    @param now: the time, in seconds since the epoch.
    """
    ours = re.compile(
        r"\d+\.M\d+P(?P<pid>\d+)Q\d+R[0-9a-f]{16}\."
        + re.escape(_nameHost(hostname))
        + r"(?:,S=\d+)?"
    )
    root, maildirs = maildirsOf(template)
    removed = failed = 0
    alive: dict = {}
    for maildir in maildirs:
        tmp = os.path.join(maildir, "tmp")
        if not _realFolder(tmp):
            continue
        try:
            entries = list(os.scandir(tmp))
        except OSError:
            failed += 1
            continue
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
                old = max(st.st_atime, st.st_mtime) < now - TMP_MAX_AGE
                match = ours.fullmatch(entry.name)
                if not old and match is not None:
                    pid = int(match.group("pid"))
                    if pid not in alive:
                        alive[pid] = pid == os.getpid() or _processExists(pid)
                    old = not alive[pid]
                if old:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
            except OSError:
                failed += 1
    return Leftovers(root, removed, failed)


def _processExists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        # EPERM: it exists, as another user.
        return True
    return True


class LeftoverCleanup(service.Service):
    """
    At start, runs L{removeLeftovers} in the disk pool and logs one line
    with what it did. A failure is logged too; it never stops the daemon.

    @ivar finished: fires when the cleanup is over (L{None} before start).
    """

    def __init__(
        self, template: str, hostname: str, runBlocking: BlockingRunner, clock: IReactorTime
    ) -> None:
        self.template = template
        self.hostname = hostname
        self.runBlocking = runBlocking
        self.clock = clock
        self.finished: Optional[defer.Deferred] = None

    def startService(self) -> None:
        super().startService()
        d = self.runBlocking(removeLeftovers, self.template, self.hostname, self.clock.seconds())
        d.addCallbacks(self._report, self._failed)
        self.finished = d

    def _report(self, result: Leftovers) -> None:
        log.info(
            "Maildir cleanup: removed {removed} leftover file(s) from tmp/ folders under "
            "{root}{failures}",
            removed=result.removed,
            root=result.root,
            failures=f"; {result.failed} could not be removed or read" if result.failed else "",
        )

    def _failed(self, reason: Failure) -> None:
        log.error(
            "Maildir cleanup under the maildir template failed: {why}", why=reason.getErrorMessage()
        )
