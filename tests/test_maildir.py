"""The Maildir writer: nothing in new/ before it is complete, one name per delivery."""

from __future__ import annotations

import errno
import os
import subprocess

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailauth import maildir
from mailauth.maildir import (
    LeftoverCleanup,
    Leftovers,
    MaildirWriter,
    UnsafeMailbox,
    ensureMaildir,
    mailboxProblem,
    maildirPath,
    maildirsOf,
    removeLeftovers,
    uniqueName,
)
from tests.fakes import runInline
from tests.harness import LogWatcher
from tests.support import DiskFull


class MaildirTests(unittest.TestCase):
    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())

    def box(self, name: str) -> str:
        return os.path.join(self.root, name, "Maildir")

    def test_createdWithMode0700(self) -> None:
        """Missing folders are created with mode 0700 whatever the umask."""
        old = os.umask(0)
        try:
            ensureMaildir(self.box("a"))
        finally:
            os.umask(old)
        for path in (
            os.path.join(self.root, "a"),
            self.box("a"),
            os.path.join(self.box("a"), "new"),
        ):
            self.assertEqual(os.stat(path).st_mode & 0o777, 0o700, path)

    def test_nothingInNewBeforeCommit(self) -> None:
        """Until commit nothing is in new/; then the message is only in new/, with S=size."""
        writer = MaildirWriter([self.box("a")], "mx.example.test")
        writer.write(b"Subject: x\r\n\r\nbody\r\n")
        self.assertEqual(os.listdir(os.path.join(self.box("a"), "new")), [])
        [path] = writer.commit()
        self.assertEqual(os.listdir(os.path.join(self.box("a"), "tmp")), [])
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"Subject: x\n\nbody\n")
        self.assertTrue(path.endswith(",S=17"), path)

    def test_bigMessageStreamedThroughTmp(self) -> None:
        """
        Past the in-memory spool the message goes to its tmp/ file as it
        comes, not into memory; new/ stays empty until commit.
        """
        writer = MaildirWriter([self.box("a")], "mx")
        chunk = b"y" * 1000 + b"\r\n"
        count = 3 * maildir.SPOOL // len(chunk)
        for _ in range(count):
            writer.write(chunk)
        [tmp] = os.listdir(os.path.join(self.box("a"), "tmp"))
        self.assertGreater(os.stat(os.path.join(self.box("a"), "tmp", tmp)).st_size, maildir.SPOOL)
        self.assertEqual(os.listdir(os.path.join(self.box("a"), "new")), [])
        [path] = writer.commit()
        with open(path, "rb") as f:
            self.assertEqual(f.read(), (b"y" * 1000 + b"\n") * count)
        self.assertEqual(os.listdir(os.path.join(self.box("a"), "tmp")), [])

    def test_severalMaildirs(self) -> None:
        """One write, one file per Maildir."""
        writer = MaildirWriter([self.box("a"), self.box("b")], "mx")
        writer.write(b"x\r\n")
        paths = writer.commit()
        self.assertEqual(len(paths), 2)
        for path in paths:
            with open(path, "rb") as f:
                self.assertEqual(f.read(), b"x\n")

    def test_oneMailboxTwoPaths(self) -> None:
        """
        Two recipients whose Maildirs are one folder, through a symbolic
        link the administrator made (a shared mailbox), get one copy: the
        second link met the first's file (EEXIST) and failed the message
        for every recipient, at every retry of the client.
        """
        ensureMaildir(self.box("alice"))
        os.mkdir(os.path.join(self.root, "bob"))
        os.symlink(self.box("alice"), self.box("bob"))
        writer = MaildirWriter([self.box("c"), self.box("alice"), self.box("bob")], "mx")
        writer.write(b"x\r\n")
        paths = writer.commit()
        self.assertEqual(len(paths), 2)
        self.assertEqual(len(os.listdir(os.path.join(self.box("alice"), "new"))), 1)
        self.assertEqual(len(os.listdir(os.path.join(self.box("c"), "new"))), 1)
        self.assertEqual(os.listdir(os.path.join(self.box("c"), "tmp")), [])

    def test_abort(self) -> None:
        """An aborted message leaves nothing behind."""
        writer = MaildirWriter([self.box("a")], "mx")
        writer.write(b"x\r\n")
        writer.abort()
        for sub in ("tmp", "new", "cur"):
            self.assertEqual(os.listdir(os.path.join(self.box("a"), sub)), [])

    def test_failedCommitLeavesNoPartialDelivery(self) -> None:
        """If a later Maildir cannot take the message, none keeps it (the client retries)."""
        blocked = os.path.join(self.root, "blocked")
        os.makedirs(self.root)
        with open(blocked, "w") as f:
            f.write("a file where a folder should be")
        writer = MaildirWriter([self.box("a"), os.path.join(blocked, "Maildir")], "mx")
        writer.write(b"x\r\n")
        self.assertRaises(OSError, writer.commit)
        self.assertEqual(os.listdir(os.path.join(self.box("a"), "new")), [])
        self.assertEqual(os.listdir(os.path.join(self.box("a"), "tmp")), [])

    def test_failureNamesTheMaildir(self) -> None:
        """
        A Maildir whose new/ cannot take the link is what the error names,
        for the operator to fix: os.link names its source, the first
        Maildir's tmp/ file, which is fine.
        """
        maildir.ensureMaildir(self.box("b"))
        broken = os.path.join(self.box("b"), "new")
        os.rmdir(broken)
        with open(broken, "w") as f:
            f.write("a file where new/ should be")
        writer = MaildirWriter([self.box("a"), self.box("b")], "mx")
        writer.write(b"x\r\n")
        error = self.assertRaises(OSError, writer.commit)
        self.assertTrue(error.filename.startswith(broken + os.sep), error.filename)
        self.assertEqual(os.listdir(os.path.join(self.box("a"), "new")), [])

    def test_fsyncBeforeLink(self) -> None:
        """The file is fsynced before it is linked into new/, and new/ after."""
        calls = []
        realFsync, realLink = os.fsync, os.link

        def fsync(fd):
            calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            return realFsync(fd)

        def link(src, dst):
            calls.append(("link", dst))
            return realLink(src, dst)

        maildir.ensureMaildir(self.box("a"))
        self.patch(maildir.os, "fsync", fsync)
        self.patch(maildir.os, "link", link)
        writer = MaildirWriter([self.box("a")], "mx")
        writer.write(b"x\r\n")
        [path] = writer.commit()
        self.assertEqual([c[0] for c in calls], ["fsync", "link", "fsync"])
        self.assertIn("/tmp/", calls[0][1])
        self.assertEqual(calls[1][1], path)
        self.assertEqual(calls[2][1], os.path.join(self.box("a"), "new"))

    def test_uniqueNames(self) -> None:
        """Names never repeat and carry no / or : of the host name."""
        names = {uniqueName("a/b:c") for _ in range(1000)}
        self.assertEqual(len(names), 1000)
        self.assertFalse(any("/" in n or ":" in n for n in names))


class MailboxPathTests(unittest.TestCase):
    """
    Issue #10 item 3: a login's local part and domain each become one path
    component of the Maildir template, and the path stays under the
    template's fixed start.
    """

    TEMPLATE = "/srv/mail/{domain}/{localpart}/Maildir"

    def test_safe(self) -> None:
        """Ordinary addresses, quoted or not, name a folder under the fixed start."""
        for login in (
            "bob@example.test",
            '"bob smith"@example.test',
            "b.o+b@example.test",
            "x..y@example.test",
            "b\\ob@example.test",
            "ä@example.test",
        ):
            self.assertIsNone(mailboxProblem(login), login)
            local = login.rpartition("@")[0]
            self.assertEqual(
                maildirPath(self.TEMPLATE, login), f"/srv/mail/example.test/{local}/Maildir"
            )

    def test_unsafe(self) -> None:
        """
        A local part or domain that is not one safe file name is refused,
        with a reason: a slash, NUL or another control character, a
        leading dot (so C{.} and C{..}), empty, too long, or no C{@}.
        """
        cases = {
            '"x/../../../escape"@example.test': "its local part contains '/'",
            "../../evil@example.test": "its local part contains '/'",
            "..@example.test": "its local part starts with a dot",
            ".@example.test": "its local part starts with a dot",
            ".hidden@example.test": "its local part starts with a dot",
            "bob@..": "its domain starts with a dot",
            "bob@.example.test": "its domain starts with a dot",
            "bob@example.test/..": "its domain contains '/'",
            '"a\x00b"@example.test': "its local part contains control character '\\x00'",
            '"a\nb"@example.test': "its local part contains control character '\\n'",
            "bob@exa\x7fmple.test": "its domain contains control character '\\x7f'",
            "@example.test": "its local part is empty",
            "bob@": "its domain is empty",
            "bob": "it is not local@domain",
            "x" * 256 + "@example.test": "its local part is longer than 255 bytes",
        }
        for login, why in cases.items():
            self.assertEqual(mailboxProblem(login), why, login)
            error = self.assertRaises(UnsafeMailbox, maildirPath, self.TEMPLATE, login)
            self.assertIn(why, str(error))

    def test_staysUnderFixedStart(self) -> None:
        """
        However the template is written, a path that leaves its fixed start
        (what precedes the first field) is refused; C{..} is resolved in
        the text, so the returned path holds none.
        """
        self.assertRaises(
            UnsafeMailbox, maildirPath, "/srv/mail/{domain}/../../{localpart}", "bob@example.test"
        )
        self.assertRaises(
            UnsafeMailbox, maildirPath, "/srv/mail/u-{localpart}/../../x", "bob@example.test"
        )
        self.assertEqual(
            maildirPath("/srv/mail/u-{localpart}/Maildir", "bob@example.test"),
            "/srv/mail/u-bob/Maildir",
        )
        self.assertEqual(
            maildirPath("/srv/mail/{domain}/x/../{user}", "bob@example.test"),
            "/srv/mail/example.test/bob@example.test",
        )
        # Relative to the working folder: it must stay in it.
        self.assertEqual(
            maildirPath("{domain}/{localpart}", "bob@example.test"), "example.test/bob"
        )
        self.assertRaises(
            UnsafeMailbox, maildirPath, "{domain}/../../{localpart}", "bob@example.test"
        )

    def test_symlinkNotFollowed(self) -> None:
        """
        A symbolic link the administrator made under the fixed start (the
        mail root moved to another disk) is not resolved: the path is
        checked and returned as the template makes it.
        """
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "disk"))
        os.symlink(os.path.join(base, "disk"), os.path.join(base, "mail"))
        template = base + "/mail/{domain}/{localpart}/Maildir"
        self.assertEqual(
            maildirPath(template, "bob@example.test"), base + "/mail/example.test/bob/Maildir"
        )


class FullDiskTests(unittest.TestCase):
    """
    Issue #10 item 7: when the disk fills, whether at a write, at the
    flush in L{MaildirWriter.prepare} or at the close in
    L{MaildirWriter.abort}, no file is left in tmp/ (nor in new/).
    """

    def setUp(self) -> None:
        self.box = os.path.join(os.path.abspath(self.mktemp()), "a", "Maildir")

    def assertEmpty(self) -> None:
        for sub in ("tmp", "new"):
            self.assertEqual(os.listdir(os.path.join(self.box, sub)), [], sub)

    def assertFull(self, error: OSError) -> None:
        self.assertEqual(error.errno, errno.ENOSPC)

    def test_smallMessage(self) -> None:
        """A message that never left memory fails at commit, leaving nothing."""
        disk = DiskFull(self)
        writer = MaildirWriter([self.box], "mx")
        writer.write(b"Subject: x\r\n\r\nbody\r\n")
        self.assertFull(self.assertRaises(OSError, writer.commit))
        self.assertEqual(len(disk.descriptors), 1)
        self.assertEmpty()

    def test_fullWhileStreaming(self) -> None:
        """
        A big message fails at a write once its buffer flushes; the abort
        that follows (closing the file flushes the buffer again, and fails
        again) still removes the file.
        """
        DiskFull(self)
        writer = MaildirWriter([self.box], "mx")
        chunk = b"y" * 1000 + b"\r\n"
        with self.assertRaises(OSError) as caught:
            for _ in range(3 * maildir.SPOOL // len(chunk)):
                writer.write(chunk)
        self.assertFull(caught.exception)
        self.assertEqual(len(os.listdir(os.path.join(self.box, "tmp"))), 1)
        writer.abort()
        self.assertEmpty()

    def test_fullAtFlush(self) -> None:
        """
        The disk fills while the end of the message waits in the write
        buffer: L{MaildirWriter.prepare} fails at its flush and removes
        the file.
        """
        disk = DiskFull(self, full=False)
        writer = MaildirWriter([self.box], "mx")
        writer.write(b"y" * (maildir.SPOOL + 1) + b"\r\n")
        writer.write(b"the end waits in the buffer\r\n")
        disk.fill()
        self.assertFull(self.assertRaises(OSError, writer.prepare))
        self.assertEmpty()

    def test_fullAtAbortClose(self) -> None:
        """
        The disk fills while data waits in the buffer and the client goes
        away: closing fails with ENOSPC inside L{MaildirWriter.abort},
        which still removes the file and raises nothing.
        """
        disk = DiskFull(self, full=False)
        writer = MaildirWriter([self.box], "mx")
        writer.write(b"y" * (maildir.SPOOL + 1) + b"\r\n")
        writer.write(b"the end waits in the buffer\r\n")
        disk.fill()
        writer.abort()
        self.assertEmpty()


def deadPid() -> int:
    """The process ID of a process that has ended (and was reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


class LeftoverTests(unittest.TestCase):
    """
    Issue #10 item 7, at start: the tmp/ files nobody will finish are
    removed from every Maildir of the template, and nothing else.
    """

    NOW = 1_800_000_000.0

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        self.template = self.root + "/{domain}/{localpart}/Maildir"

    def box(self, login: str) -> str:
        local, domain = login.split("@")
        path = os.path.join(self.root, domain, local, "Maildir")
        ensureMaildir(path)
        return path

    def put(self, folder: str, name: str, age: float = 0.0) -> str:
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(b"partial")
        os.utime(path, (self.NOW - age, self.NOW - age))
        return path

    def ours(self, pid: int, host: str = "mx.example.test", counter: int = 7) -> str:
        """A name L{uniqueName} would have made in process C{pid}."""
        return f"1700000000.M123456P{pid}Q{counter}R{'ab' * 8}.{host}"

    def test_removed(self) -> None:
        """
        Removed: a file of this host's mailauth whose process is gone
        (killed mid-DATA), its copy named C{,S=size}, and any file not
        touched for 36 hours. Kept: files of live processes (this one
        included), of another host, younger unknown files, symbolic links,
        anything outside tmp/, and Maildirs reached through a link.
        """
        bob, carol = self.box("bob@example.test"), self.box("carol@other.test")
        dead = deadPid()
        gone = [
            self.put(os.path.join(bob, "tmp"), self.ours(dead)),
            self.put(os.path.join(carol, "tmp"), self.ours(dead) + ",S=7"),
            self.put(os.path.join(carol, "tmp"), "old-junk", age=36 * 3600 + 1),
            self.put(os.path.join(bob, "tmp"), self.ours(os.getpid(), counter=8), age=40 * 3600),
        ]
        kept = [
            self.put(os.path.join(bob, "tmp"), self.ours(os.getpid())),
            self.put(os.path.join(bob, "tmp"), self.ours(1)),
            self.put(os.path.join(bob, "tmp"), self.ours(dead, "mx2.example.test")),
            self.put(os.path.join(bob, "tmp"), "young-junk", age=35 * 3600),
            self.put(os.path.join(bob, "new"), self.ours(dead)),
            self.put(os.path.join(bob, "cur"), "old-mail", age=400 * 86400),
            self.put(self.root, "old-file-in-the-root", age=400 * 86400),
        ]
        os.symlink(kept[0], os.path.join(bob, "tmp", self.ours(dead) + ".link"))
        kept.append(os.path.join(bob, "tmp", self.ours(dead) + ".link"))
        elsewhere = os.path.abspath(self.mktemp())
        ensureMaildir(os.path.join(elsewhere, "Maildir"))
        kept.append(self.put(os.path.join(elsewhere, "Maildir", "tmp"), self.ours(dead)))
        os.symlink(elsewhere, os.path.join(self.root, "example.test", "linked"))

        result = removeLeftovers(self.template, "mx.example.test", self.NOW)
        for path in gone:
            self.assertFalse(os.path.lexists(path), path)
        self.assertEqual(result, Leftovers(self.root, 4, 0))
        for path in kept:
            self.assertTrue(os.path.lexists(path), path)

    def test_maildirsOf(self) -> None:
        """
        The Maildirs are the folders the template's fields could fill:
        fields never match a name that starts with a dot, literal parts
        match only themselves.
        """
        for login in ("bob@example.test", "carol@other.test"):
            self.box(login)
        os.makedirs(os.path.join(self.root, "example.test", ".hidden", "Maildir", "tmp"))
        os.makedirs(os.path.join(self.root, "example.test", "dave", "NotMaildir", "tmp"))
        root, found = maildirsOf(self.template)
        self.assertEqual(root, self.root)
        self.assertEqual(
            sorted(found),
            [
                os.path.join(self.root, "example.test", "bob", "Maildir"),
                os.path.join(self.root, "other.test", "carol", "Maildir"),
            ],
        )
        root, found = maildirsOf(self.root + "/u-{user}")
        self.assertEqual((root, found), (self.root, []))
        os.makedirs(self.root + "/u-bob@example.test/tmp")
        self.assertEqual(
            maildirsOf(self.root + "/u-{user}")[1], [self.root + "/u-bob@example.test"]
        )

    def test_missingRoot(self) -> None:
        """
        No mail root yet (no delivery ever made), or a file in its place
        (which delivery reports): nothing to do, no error.
        """
        self.assertEqual(removeLeftovers(self.template, "mx", self.NOW), Leftovers(self.root, 0, 0))
        with open(self.root, "w") as f:
            f.write("a file where the mail root should be\n")
        self.assertEqual(removeLeftovers(self.template, "mx", self.NOW), Leftovers(self.root, 0, 0))

    def test_service(self) -> None:
        """
        L{LeftoverCleanup} runs at start through the blocking runner and
        logs one line with the count.
        """
        self.put(os.path.join(self.box("bob@example.test"), "tmp"), self.ours(deadPid()))
        clock = Clock()
        clock.advance(self.NOW)
        ran = []

        def runBlocking(f, *args):
            ran.append(f)
            return runInline(f, *args)

        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        cleanup = LeftoverCleanup(self.template, "mx.example.test", runBlocking, clock)
        cleanup.startService()
        self.successResultOf(cleanup.finished)
        self.assertEqual(ran, [removeLeftovers])
        self.assertEqual(
            watcher.matching("Maildir cleanup"),
            [f"Maildir cleanup: removed 1 leftover file(s) from tmp/ folders under {self.root}"],
        )

    def test_serviceFailure(self) -> None:
        """A cleanup that cannot run is one error line; the daemon goes on."""
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)

        def runBlocking(f, *args):
            return defer.fail(PermissionError(13, "Permission denied"))

        cleanup = LeftoverCleanup(self.template, "mx.example.test", runBlocking, Clock())
        cleanup.startService()
        self.assertIsNone(self.successResultOf(cleanup.finished))
        self.assertEqual(
            watcher.matching("Maildir cleanup"),
            ["Maildir cleanup under the maildir template failed: [Errno 13] Permission denied"],
        )


class NewFolderDurabilityTests(unittest.TestCase):
    """
    Issue #10 item 8: the first delivery to a new user creates up to five
    folders; the parent of each is fsynced (the entry it gained made
    durable) before the message is linked into new/.
    """

    def test_parentsFsynced(self) -> None:
        """Every created folder's parent is fsynced, each once, before the link."""
        calls = []
        realFsync, realLink = os.fsync, os.link

        def fsync(fd):
            calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            return realFsync(fd)

        def link(src, dst):
            calls.append(("link", dst))
            return realLink(src, dst)

        top = os.path.abspath(self.mktemp())
        os.makedirs(top)
        box = os.path.join(top, "mail", "example.test", "alice", "Maildir")
        self.patch(maildir.os, "fsync", fsync)
        self.patch(maildir.os, "link", link)
        writer = MaildirWriter([box], "mx")
        writer.write(b"x\r\n")
        writer.commit()
        parents = [
            top,
            os.path.join(top, "mail"),
            os.path.join(top, "mail", "example.test"),
            os.path.dirname(box),
            box,
        ]
        [linked] = [index for index, (kind, _) in enumerate(calls) if kind == "link"]
        synced = [path for kind, path in calls[:linked] if kind == "fsync"]
        for parent in parents:
            self.assertEqual(synced.count(parent), 1, parent)
        self.assertEqual(calls[linked + 1 :], [("fsync", os.path.join(box, "new"))])

    def test_secondMaildirParentsFsynced(self) -> None:
        """A second recipient's new Maildir gets its parents fsynced too, before commit returns."""
        synced = []
        realFsync = os.fsync

        def fsync(fd):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            return realFsync(fd)

        top = os.path.abspath(self.mktemp())
        first, second = (os.path.join(top, who, "Maildir") for who in ("a", "b"))
        self.patch(maildir.os, "fsync", fsync)
        writer = MaildirWriter([first, second], "mx")
        writer.write(b"x\r\n")
        writer.commit()
        for parent in (os.path.join(top, "b"), second):
            self.assertIn(parent, synced)


class PrependTests(unittest.TestCase):
    """
    Header fields put on top of a written message (a DKIM signature), below
    the fields of final delivery, in memory or by a copy of the tmp/ file.
    """

    TOP = b"Return-Path: <a@example.test>\r\n"
    HEADER = b"DKIM-Signature: v=1;\r\n\tb=xyz\r\n"

    def setUp(self) -> None:
        self.box = os.path.join(os.path.abspath(self.mktemp()), "Maildir")

    def deliver(self, message: bytes) -> bytes:
        writer = MaildirWriter([self.box], "mx.example.test", top=self.TOP)
        for i in range(0, len(message), 10000):
            writer.write(message[i : i + 10000])
        writer.prepend(self.HEADER)
        [path] = writer.commit()
        self.assertEqual(os.listdir(os.path.join(self.box, "tmp")), [])
        with open(path, "rb") as f:
            stored = f.read()
        self.assertTrue(path.endswith(f",S={len(stored)}"), path)
        return stored

    def test_belowTop(self) -> None:
        """A small message and one past the memory spool: top, then the header, then it."""
        for message in (
            b"Subject: x\r\n\r\nbody\r\n",
            b"Subject: x\r\n\r\n" + b"line of text\r\n" * (3 * maildir.SPOOL // 14),
        ):
            expected = (self.TOP + self.HEADER + message).replace(b"\r\n", b"\n")
            # Not assertEqual: a diff of two large messages takes minutes.
            self.assertTrue(self.deliver(message) == expected, len(message))

    def test_finalCR(self) -> None:
        """A message ending in a CR that no LF followed keeps it below the header."""
        writer = MaildirWriter([self.box], "mx.example.test", top=self.TOP)
        writer.write(b"a\r\nb\r")
        writer.prepend(self.HEADER)
        [path] = writer.commit()
        with open(path, "rb") as f:
            self.assertEqual(f.read(), (self.TOP + self.HEADER).replace(b"\r\n", b"\n") + b"a\nb\r")

    def test_withoutCopyFileRange(self) -> None:
        """
        Where the kernel refuses copy_file_range (ENOSYS, EXDEV across file
        systems), the file is copied through a buffer: same result.
        """
        calls = []

        def refuse(*args):
            calls.append(args)
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        self.patch(os, "copy_file_range", refuse)
        message = b"Subject: x\r\n\r\n" + b"line of text\r\n" * (3 * maildir.SPOOL // 14)
        expected = (self.TOP + self.HEADER + message).replace(b"\r\n", b"\n")
        self.assertTrue(self.deliver(message) == expected)
        self.assertEqual(len(calls), 1)

    def test_copyRangeShortSource(self) -> None:
        """A source that ends before the count is an error, not a short copy."""
        source = os.path.join(os.path.abspath(self.mktemp()))
        with open(source, "wb") as f:
            f.write(b"0123456789")
        with open(source, "rb") as src, open(source + ".copy", "wb") as dst:
            maildir.copyRange(src.fileno(), dst.fileno(), 2, 8)
            e = self.assertRaises(OSError, maildir.copyRange, src.fileno(), dst.fileno(), 5, 8)
        self.assertEqual(e.errno, errno.EIO)
        with open(source + ".copy", "rb") as f:
            self.assertEqual(f.read(), b"23456789" + b"56789")

    def test_diskFullWhileCopying(self) -> None:
        """
        The disk fills while the copy is made: OSError, and abort leaves
        neither file in tmp/ and nothing in new/.
        """
        disk = DiskFull(self, full=False)
        writer = MaildirWriter([self.box], "mx.example.test", top=self.TOP)
        writer.write(b"Subject: x\r\n\r\n" + b"line of text\r\n" * (3 * maildir.SPOOL // 14))
        disk.full = True
        self.assertRaises(OSError, writer.prepend, self.HEADER)
        writer.abort()
        self.assertEqual(len(disk.descriptors), 2)
        for sub in ("tmp", "new"):
            self.assertEqual(os.listdir(os.path.join(self.box, sub)), [], sub)
