"""The Maildir writer: nothing in new/ before it is complete, one name per delivery."""

from __future__ import annotations

import os

from twisted.trial import unittest

from mailauth import maildir
from mailauth.maildir import MaildirWriter, ensureMaildir, uniqueName


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
        for path in (os.path.join(self.root, "a"), self.box("a"),
                     os.path.join(self.box("a"), "new")):
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
        self.assertGreater(os.stat(os.path.join(self.box("a"), "tmp", tmp)).st_size,
                           maildir.SPOOL)
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
