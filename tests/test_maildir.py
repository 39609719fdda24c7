"""The Maildir writer: nothing in new/ before it is complete, one name per delivery."""

from __future__ import annotations

import os

from twisted.trial import unittest

from mailauth import maildir
from mailauth.maildir import (
    MaildirWriter,
    UnsafeMailbox,
    ensureMaildir,
    mailboxProblem,
    maildirPath,
    uniqueName,
)


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


class MailboxPathTests(unittest.TestCase):
    """
    Issue #10 item 3: a login's local part and domain each become one path
    component of the Maildir template, and the path stays under the
    template's fixed start.
    """

    TEMPLATE = "/srv/mail/{domain}/{localpart}/Maildir"

    def test_safe(self) -> None:
        """Ordinary addresses, quoted or not, name a folder under the fixed start."""
        for login in ("bob@example.test", '"bob smith"@example.test', "b.o+b@example.test",
                      "x..y@example.test", "b\\ob@example.test", "ä@example.test"):
            self.assertIsNone(mailboxProblem(login), login)
            local = login.rpartition("@")[0]
            self.assertEqual(maildirPath(self.TEMPLATE, login),
                             f"/srv/mail/example.test/{local}/Maildir")

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
        self.assertRaises(UnsafeMailbox, maildirPath,
                          "/srv/mail/{domain}/../../{localpart}", "bob@example.test")
        self.assertRaises(UnsafeMailbox, maildirPath,
                          "/srv/mail/u-{localpart}/../../x", "bob@example.test")
        self.assertEqual(maildirPath("/srv/mail/u-{localpart}/Maildir", "bob@example.test"),
                         "/srv/mail/u-bob/Maildir")
        self.assertEqual(maildirPath("/srv/mail/{domain}/x/../{user}", "bob@example.test"),
                         "/srv/mail/example.test/bob@example.test")
        # Relative to the working folder: it must stay in it.
        self.assertEqual(maildirPath("{domain}/{localpart}", "bob@example.test"),
                         "example.test/bob")
        self.assertRaises(UnsafeMailbox, maildirPath, "{domain}/../../{localpart}",
                          "bob@example.test")

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
        self.assertEqual(maildirPath(template, "bob@example.test"),
                         base + "/mail/example.test/bob/Maildir")
