"""
Issue #10's defects, each attacked on the real server (or its real parts)
as the report found them: paths out of the mail root, a half-stored mixed
message, leaked tmp/ files, trickled DATA. Then twisted.mail's defects
(D1-D36 of docs/twisted-defects.rst) that no other module's tests show
mailauth is free of.
"""

from __future__ import annotations

import gc
import glob
import hmac
import importlib
import io
import os
import random
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import weakref
from typing import Optional

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.mail import smtp
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailauth import passwords, sasl, userdb
from mailauth.checkers import WRONG, CramMD5Checker, PasswordChecker
from mailauth.cli import Console, main
from mailauth.config import ConfigError, loadText
from mailauth.maildir import MaildirWriter
from mailauth.replies import SMTPReply
from mailauth.threads import PoolBusy, PoolStopped, ThreadPoolService
from tests.fakes import MemoryUserDatabase
from tests.harness import BOB, BOB_PASSWORD, AttackMixin, Daemon, RawClient, TwistdProcess, plain
from tests.support import (
    DiskFull,
    MemoryMailbox,
    QueueTestMixin,
    RecordingPortal,
    Session,
    makeFactory,
    makeSettings,
    passwordIs,
)
from tests.test_conformance import TEST_NAME, parseMap

ESCAPE = '"x/../../../escape"@example.test'
EVIL = "../../evil@example.test"


class PathEscapeTests(AttackMixin, unittest.TestCase):
    """
    Item 3: a login whose local part holds C{/} and C{..} made the Maildir
    template write outside the mail root. Such lines of the users file are
    skipped, with a problem naming why, so the login never works and the
    address is nobody's.
    """

    files = {
        "users": (
            "bob@example.test:{PLAIN}bob-secret-2\n"
            f"{ESCAPE}:{{PLAIN}}escape-secret\n"
            f"{EVIL}:{{PLAIN}}evil-secret\n"
        ),
    }

    def escaped(self) -> list:
        """Anything the attack made outside the mail root."""
        top = os.path.dirname(self.daemon.dir)
        return [
            path
            for path in glob.glob(os.path.join(top, "**"), recursive=True)
            if "escape" in path or "evil" in path
        ]

    def test_skippedWithReason(self) -> None:
        """Reading the users file skips both lines, each with one problem saying why."""
        users = userdb.UserDatabase(os.path.join(self.daemon.dir, "users"))
        users.load()
        self.assertEqual(users.logins(), ["bob@example.test"])
        self.assertEqual(
            users.problems,
            [
                f"{users.path}:2: the login {ESCAPE!r} cannot name a mailbox: "
                "its local part contains '/'",
                f"{users.path}:3: the login {EVIL!r} cannot name a mailbox: "
                "its local part contains '/'",
            ],
        )

    @defer.inlineCallbacks
    def test_loginAndDeliveryRefused(self):
        """
        The attack: log in as the quoted login and send to itself. The
        login fails; bob's message to that address is refused as unknown;
        nothing is written outside the mail root.
        """

        def attack():
            client = self.connect()
            client.ehlo()
            login = plain(ESCAPE.encode(), b"escape-secret")
            codes = [client.command(login)[0]]
            if codes[0] == 235:
                client.command(b"MAIL FROM:<" + ESCAPE.encode() + b">")
                client.command(b"RCPT TO:<" + ESCAPE.encode() + b">")
                client.command(b"DATA")
                client.command(b"Subject: out\r\n\r\nx\r\n.")
            bob = self.loggedIn(login=BOB, password=BOB_PASSWORD)
            bob.command(b"MAIL FROM:<bob@example.test>")
            codes.append(bob.command(b"RCPT TO:<" + ESCAPE.encode() + b">")[0])
            codes.append(bob.command(b"RCPT TO:<" + EVIL.encode() + b">")[0])
            return codes

        self.assertEqual((yield self.inThread(attack)), [535, 550, 501])
        self.assertEqual(self.escaped(), [])


class CheckLoginTests(unittest.TestCase):
    """Item 3 at the CLI: C{mailauth user add} refuses such logins, naming why."""

    def test_userAddRefused(self) -> None:
        """Each login is refused with one line, the users file untouched."""
        directory = self.mktemp()
        os.mkdir(directory)
        users = os.path.join(directory, "users")
        cases = {
            ESCAPE: "its local part contains '/'",
            EVIL: "its local part contains '/'",
            "a/b@example.test": "its local part contains '/'",
            "bob@..": "its domain starts with a dot",
            "bob@.hidden": "its domain starts with a dot",
        }
        for login, why in cases.items():
            stdout, stderr = io.StringIO(), io.StringIO()
            console = Console(io.BytesIO(b"long password\n"), stdout, stderr, None)
            code = main(["user", "add", login, "--users", users, "--scheme", "PLAIN"], console)
            self.assertEqual(code, 1, login)
            self.assertEqual(
                stderr.getvalue(),
                f"mailauth: invalid login {login!r}: it cannot name a mailbox: {why}\n",
            )
        self.assertFalse(os.path.exists(users))

    def test_checkLogin(self) -> None:
        """L{userdb.checkLogin} accepts ordinary addresses, quoted ones too."""
        for login in ("bob@example.test", '"bob.."@example.test', "b+ob@example.test"):
            userdb.checkLogin(login)
        self.assertRaises(userdb.UserDatabaseError, userdb.checkLogin, ESCAPE)


class MixedAtomicityTests(AttackMixin, unittest.TestCase):
    """
    Item 6: a message for a local user and a remote address, where the
    queue cannot take it, is stored for nobody: the client's retry must
    not duplicate the local copy. (The relay is a closed port and the
    queue runs on a clock that never moves: nothing is sent.)
    """

    clocked = True
    settings = {"relay": {"host": "127.0.0.1", "port": "1", "tls": "none"}}
    MESSAGE = b"Subject: mixed\r\n\r\n" + b"body line\r\n" * 10000 + b"."

    def breakQueue(self) -> str:
        """
        Put a regular file where the queue's C{msg/} folder is: no rename
        into it can work, even for root (who ignores permission bits).
        """
        msg = os.path.join(self.daemon.config.server.state_dir, "queue", "msg")
        os.rmdir(msg)
        with open(msg, "w") as f:
            f.write("not a folder\n")
        return msg

    def send(self) -> tuple:
        """(Blocking.) bob sends the message to himself and to a remote address."""
        client = self.loggedIn()
        client.command(b"MAIL FROM:<bob@example.test>")
        assert client.command(b"RCPT TO:<bob@example.test>")[0] == 250
        assert client.command(b"RCPT TO:<someone@remote.test>")[0] == 250
        assert client.command(b"DATA")[0] == 354
        return client.command(self.MESSAGE)

    @defer.inlineCallbacks
    def test_allOrNothing(self):
        """
        With C{msg/} broken the message gets 451 and nothing is left in
        bob's Maildir (new/ nor tmp/) nor in the queue; once the fault is
        gone the client's retry is stored exactly once, locally and in the
        queue.
        """
        msg = self.breakQueue()
        code, text = yield self.inThread(self.send)
        self.assertEqual((code, text[0][:6]), (451, b"4.3.0 "))
        [warning] = self.log.matching(r"not stored: .*/queue/.*: Not a directory")
        self.assertIn("the client is told 451", warning)
        self.assertEqual(self.daemon.files("bob@example.test", "new"), [])
        self.assertEqual(self.daemon.files("bob@example.test", "tmp"), [])
        os.unlink(msg)
        os.mkdir(msg, 0o700)
        # The queue's own start-up scan, in a thread, may also have met the
        # broken folder, and said so with a traceback.
        self.flushLoggedErrors(NotADirectoryError)
        self.assertEqual(self.daemon.allDelivered(), [])
        code, text = yield self.inThread(self.send)
        self.assertEqual(code, 250, text)
        [(_, stored)] = self.daemon.delivered("bob@example.test")
        self.assertTrue(stored.endswith(b"\n\n" + b"body line\n" * 10000))
        queued = [item for item in self.daemon.allDelivered() if item.startswith("queued ")]
        self.assertEqual(len(queued), 1)
        self.assertEqual(self.daemon.files("bob@example.test", "tmp"), [])


BIG = b"Subject: big\r\n\r\n" + b"y" * 998 + b"\r\n" + (b"z" * 78 + b"\r\n") * 3000


class FullDiskTests(AttackMixin, unittest.TestCase):
    """
    Item 7: a full disk (the kernel's ENOSPC, from C{/dev/full}) while a
    message is stored: the client gets 452 4.3.1 and nothing stays in
    tmp/. It left six files behind when closing the file raised.
    """

    def send(self, message: bytes) -> tuple:
        client = self.loggedIn()
        client.command(b"MAIL FROM:<bob@example.test>")
        client.command(b"RCPT TO:<bob@example.test>")
        client.command(b"DATA")
        return client.command(message + b"\r\n.")

    @defer.inlineCallbacks
    def test_bigMessage(self):
        """A message past the in-memory spool fails as it streams to tmp/."""
        DiskFull(self)
        code, text = yield self.inThread(self.send, BIG)
        self.assertEqual((code, text[0][:6]), (452, b"4.3.1 "))
        [warning] = self.log.matching(r"not stored: .*/bob/Maildir: No space left on device")
        self.assertIn("the client is told 452", warning)
        self.assertEqual(self.daemon.files("bob@example.test", "tmp"), [])
        self.assertEqual(self.daemon.files("bob@example.test", "new"), [])

    @defer.inlineCallbacks
    def test_smallMessage(self):
        """A message held in memory fails when it is written at the end."""
        disk = DiskFull(self)
        code, text = yield self.inThread(self.send, b"Subject: small\r\n\r\nx")
        self.assertEqual((code, text[0][:6]), (452, b"4.3.1 "))
        [warning] = self.log.matching(r"not stored: .*/bob/Maildir: No space left on device")
        self.assertIn("the client is told 452", warning)
        self.assertEqual(len(disk.descriptors), 1)
        self.assertEqual(self.daemon.files("bob@example.test", "tmp"), [])
        self.assertEqual(self.daemon.files("bob@example.test", "new"), [])


class KilledMidDataTests(unittest.TestCase):
    """
    Item 7, at start: the daemon run by twistd is killed (SIGKILL) while a
    big message streams into a Maildir's tmp/; started again, it removes
    that partial file and says so in one log line.
    """

    def test_partialFileRemovedAtRestart(self) -> None:
        """The partial tmp/ file of the killed process is gone after the restart."""
        daemon = Daemon(self.mktemp(), {"listener:submission": None})
        twistd = TwistdProcess(daemon.configPath, os.path.join(daemon.dir, "first.log"))
        self.addCleanup(twistd.kill, signal.SIGKILL)
        twistd.spawn()
        [port] = twistd.waitFor(r"starting on (\d+)")
        twistd.waitFor(r"Maildir cleanup: removed 0 leftover file\(s\)")
        client = RawClient(int(port), tls=True)
        self.addCleanup(client.close)
        self.assertEqual(client.reply()[0], 220)
        client.ehlo()
        self.assertEqual(client.command(plain(BOB, BOB_PASSWORD))[0], 235)
        client.command(b"MAIL FROM:<bob@example.test>")
        client.command(b"RCPT TO:<bob@example.test>")
        self.assertEqual(client.command(b"DATA")[0], 354)
        client.send(BIG)
        tmp = os.path.join(daemon.maildir("bob@example.test"), "tmp")
        deadline = time.monotonic() + 30
        while not (os.path.isdir(tmp) and os.listdir(tmp)) and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting for another process; no clock to drive
        [partial] = os.listdir(tmp)
        twistd.kill(signal.SIGKILL)
        self.assertTrue(os.path.exists(os.path.join(tmp, partial)))

        twistd.logPath = os.path.join(daemon.dir, "second.log")
        twistd.spawn()
        [line] = twistd.waitFor(r".*Maildir cleanup: .*")
        self.assertIn(
            "Maildir cleanup: removed 1 leftover file(s) from tmp/ folders under "
            + os.path.join(daemon.dir, "mail"),
            line,
        )
        self.assertEqual(os.listdir(tmp), [])
        self.assertEqual(daemon.files("bob@example.test", "new"), [])
        twistd.kill()


class NewFolderDurabilityTests(AttackMixin, unittest.TestCase):
    """
    Item 8 on the running server: the first message to bob creates the
    mail root and bob's Maildir; by the time the client has its 250, the
    parent of every folder made was fsynced.
    """

    @defer.inlineCallbacks
    def test_parentsFsyncedBefore250(self):
        """Every folder that gained an entry was fsynced when the 250 arrived."""
        synced = []
        realFsync = os.fsync

        def fsync(fd):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            return realFsync(fd)

        self.patch(os, "fsync", fsync)
        root = os.path.join(self.daemon.dir, "mail")
        self.assertFalse(os.path.exists(root))

        def send():
            client = self.loggedIn()
            client.command(b"MAIL FROM:<bob@example.test>")
            client.command(b"RCPT TO:<bob@example.test>")
            client.command(b"DATA")
            code, _ = client.command(b"Subject: first\r\n\r\nx\r\n.")
            return code, list(synced)

        code, syncedBy250 = yield self.inThread(send)
        self.assertEqual(code, 250)
        box = self.daemon.maildir("bob@example.test")
        for parent in (
            self.daemon.dir,
            root,
            os.path.join(root, "example.test"),
            os.path.dirname(box),
            box,
            os.path.join(box, "new"),
        ):
            self.assertIn(parent, syncedBy250)


class TricklingDataSessionTests(unittest.TestCase):
    """
    Item 11 in the session, on a Clock: every read restarts data_timeout,
    so a client trickling a byte at a time held its slot forever; one DATA
    now gets max_data_time in all, then 421 4.4.2.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.mailbox = MemoryMailbox(login="alice@example.test")
        portal = RecordingPortal(self.mailbox, answer=passwordIs(b"secret"))
        settings = makeSettings(data_timeout=600.0, timeout=300.0, max_data_time=1800.0)
        self.session = Session(
            makeFactory(self.clock, portal=portal, tlsMode="implicit", settings=settings)
        )
        self.session.read()
        self.session.command(b"EHLO client.example")
        login = plain(b"alice@example.test", b"secret")
        self.assertEqual(self.session.command(login), [b"235 2.7.0 Authentication successful"])

    def startData(self) -> None:
        s = self.session
        s.command(b"MAIL FROM:<alice@example.test>")
        s.command(b"RCPT TO:<bob@example.test>")
        self.assertEqual(s.command(b"DATA")[0][:3], b"354")

    def test_trickleCut(self) -> None:
        """
        A byte every 500 seconds keeps data_timeout (600) from firing, but
        at 1800 seconds after the 354 the session ends with 421 4.4.2; the
        part sent is thrown away.
        """
        self.startData()
        for _ in range(3):
            self.clock.advance(500)
            self.assertEqual(self.session.send(b"x"), [])
        self.clock.advance(299)
        self.assertFalse(self.session.transport.disconnecting)
        self.clock.advance(1)
        self.assertEqual(
            self.session.read(),
            [b"421 4.4.2 mx.example.test Error: message transfer took too long"],
        )
        self.assertTrue(self.session.transport.disconnecting)
        self.assertEqual(self.mailbox.stored, [])
        self.assertTrue(self.mailbox.messages[0].aborted)

    def test_eachDataItsOwnTime(self) -> None:
        """
        A DATA that ends in time is unaffected: its deadline goes with it,
        and the next DATA gets max_data_time of its own.
        """
        self.startData()
        self.trickle(1799)
        self.assertEqual(self.session.send(b"\r\n.\r\n"), [b"250 2.0.0 Ok: queued as ID1"])
        self.clock.advance(200)
        self.assertEqual(self.session.command(b"NOOP"), [b"250 2.0.0 Ok"])
        self.startData()
        self.trickle(1799)
        self.assertEqual(self.session.send(b"\r\n.\r\n"), [b"250 2.0.0 Ok: queued as ID2"])
        self.assertFalse(self.session.transport.disconnecting)
        # Only the idle timeout is left.
        [idle] = self.clock.getDelayedCalls()
        self.assertEqual(idle.getTime(), self.clock.seconds() + 300)

    def trickle(self, seconds: int) -> None:
        """Send a byte every 500 seconds for C{seconds}."""
        while seconds > 0:
            step = min(seconds, 500)
            self.clock.advance(step)
            seconds -= step
            self.assertEqual(self.session.send(b"x"), [])

    def test_clientGoneCancels(self) -> None:
        """A client that leaves inside DATA leaves no deadline behind."""
        self.startData()
        self.session.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class TricklingDataTests(AttackMixin, unittest.TestCase):
    """
    Item 11 on the running server (its clock driven by the test): a client
    that sends one byte of DATA every 5 seconds never trips the 30-second
    data_timeout, and is cut off 60 seconds (max_data_time) after the 354.
    """

    clocked = True
    settings = {"server": {"data_timeout": "30s", "max_data_time": "60s"}}

    @defer.inlineCallbacks
    def test_trickleCut(self):
        """421 4.4.2, the connection closed, nothing delivered."""

        def start():
            client = self.loggedIn()
            client.command(b"MAIL FROM:<bob@example.test>")
            client.command(b"RCPT TO:<bob@example.test>")
            assert client.command(b"DATA")[0] == 354
            # Each byte leaves at once (no Nagle delay), so the server has
            # read it long before data_timeout.
            client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return client

        client = yield self.inThread(start)
        for _ in range(11):
            yield self.inThread(client.send, b"x")
            self.clock.advance(5)
        self.assertFalse((yield self.inThread(client.pending)))
        yield self.inThread(client.send, b"x")
        self.clock.advance(5)
        code, text = yield self.inThread(client.reply)
        self.assertEqual(
            (code, text), (421, [b"4.4.2 mx.example.test Error: message transfer took too long"])
        )
        self.assertTrue((yield self.inThread(client.closedByServer)))
        self.assertEqual(self.daemon.allDelivered(), [])


MINIMAL = """
[listener:submission]
endpoint = tcp:2587
tls = none
auth = optional

[auth]
users = /etc/mailauth/users

[delivery]
local_domains = example.org example.net
maildir = /var/mail/{domain}/{localpart}/Maildir
"""


class ConfigTests(unittest.TestCase):
    """The keys items 11 and 12 add: defaults and one clear line per bad value."""

    def problems(self, text: str) -> tuple:
        return self.assertRaises(ConfigError, loadText, text, "test.conf").problems

    def test_maxDataTime(self) -> None:
        """[server] max_data_time: 30 minutes unless set; a duration above 0."""
        self.assertEqual(loadText(MINIMAL).server.max_data_time, 1800.0)
        self.assertEqual(
            loadText(MINIMAL + "[server]\nmax_data_time = 45s\n").server.max_data_time, 45.0
        )
        for bad, why in (("0", "'0' must be more than 0"), ("soon", "'soon' is not a duration")):
            [problem] = self.problems(MINIMAL + f"[server]\nmax_data_time = {bad}\n")
            self.assertTrue(
                problem.startswith(f"test.conf: [server] max_data_time: {why}"), problem
            )

    def test_postmaster(self) -> None:
        """
        [delivery] postmaster: unset unless given; an address, lower-cased;
        one in another domain needs a [relay].
        """
        self.assertIsNone(loadText(MINIMAL).delivery.postmaster)
        self.assertEqual(
            loadText(MINIMAL + "postmaster = Admin@Example.NET\n").delivery.postmaster,
            "admin@example.net",
        )
        self.assertEqual(
            self.problems(MINIMAL + "postmaster = admin\n"),
            ("test.conf: [delivery] postmaster: 'admin' is not an address (local@domain)",),
        )
        self.assertEqual(
            self.problems(MINIMAL + "postmaster = admin@remote.test\n"),
            (
                "test.conf: [delivery] postmaster: admin@remote.test is in another domain and "
                "there is no [relay] to forward to it",
            ),
        )
        relay = "[relay]\nhost = relay.test\n"
        cfg = loadText(MINIMAL + "postmaster = admin@remote.test\n" + relay)
        self.assertEqual(cfg.delivery.postmaster, "admin@remote.test")


class StoppedPoolTests(unittest.TestCase):
    def test_runAfterStopFails(self) -> None:
        """
        Work handed to a stopped thread pool fails at once with
        L{PoolStopped} (a L{PoolBusy}), so that whoever waits for it goes
        on; Twisted's pool drops it, and its Deferred never fires.
        """
        pool = ThreadPoolService(reactor, "test-stopped", 1, maxQueued=10)
        pool.startService()
        pool.stopService()
        pool.stopService()  # a second stop (the daemon stopped twice) is harmless
        failure = self.failureResultOf(pool.run(lambda: 1), PoolStopped)
        self.assertIsInstance(failure.value, PoolBusy)
        self.assertEqual(pool.pending, 0)


class HalfCloseTests(AttackMixin, unittest.TestCase):
    """
    A client that pipelines a whole transaction and then shuts down its
    sending side (C{printf ... | nc -N}, a script's C{shutdown(SHUT_WR)})
    on a listener without TLS reads every reply, the 250 of its message
    included, as Postfix's clients do; the log counts the message.
    """

    settings = {
        "listener:mx": {"endpoint": "tcp:0:interface=127.0.0.1", "tls": "none", "auth": "none"},
    }

    def halfClosed(self, commands: bytes) -> bytes:
        """(Blocking.) Send C{commands}, shut down the sending side, read until the end."""
        with socket.create_connection(("127.0.0.1", self.daemon.ports["mx"]), timeout=30) as s:
            s.sendall(commands)
            s.shutdown(socket.SHUT_WR)
            received = b""
            while True:
                data = s.recv(65536)
                if not data:
                    return received
                received += data

    @defer.inlineCallbacks
    def test_everyReplyArrives(self):
        transaction = (
            b"EHLO client.example\r\nMAIL FROM:<carol@remote.example>\r\n"
            b"RCPT TO:<bob@example.test>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n"
        )
        for tail in (b"QUIT\r\n", b""):
            disconnect = self.log.waitFor(r"^disconnect: client=\[127\.0\.0\.1\]")
            received = yield self.inThread(self.halfClosed, transaction + tail)
            codes = [line[:4] for line in received.split(b"\r\n") if line[3:4] == b" "]
            expected = [b"220 ", b"250 ", b"250 ", b"250 ", b"354 ", b"250 "]
            self.assertEqual(codes, expected + ([b"221 "] if tail else []), received)
            self.assertIn(b"250 2.0.0 Ok: queued as ", received)
            self.assertRegex((yield disconnect), r" messages=1 ")
        self.assertEqual(len(self.daemon.delivered("bob@example.test")), 2)


class FinalDeliveryFieldsTests(AttackMixin, unittest.TestCase):
    """
    Item 12 on the running server: C{Return-Path:} on local delivery;
    C{Date:} and C{Message-ID:} added to authenticated submissions that lack
    them, never to mail from an MX session; postmaster@ every local domain
    and C{<Postmaster>} reach [delivery] postmaster without an alias.
    """

    settings = {
        "delivery": {
            "local_domains": "example.test example.net",
            "postmaster": "alice.plain@example.test",
        },
        "listener:mx": {"endpoint": "tcp:0:interface=127.0.0.1", "tls": "none", "auth": "none"},
    }

    def transaction(self, client, sender: bytes, recipients: list, message: bytes) -> list:
        codes = [client.command(b"MAIL FROM:<" + sender + b">")[0]]
        codes += [client.command(b"RCPT TO:" + r)[0] for r in recipients]
        codes.append(client.command(b"DATA")[0])
        codes.append(client.command(message + b"\r\n.")[0])
        return codes

    @defer.inlineCallbacks
    def test_submissionCompleted(self):
        """
        bob's message without Date and Message-ID is stored with
        Return-Path first, and both fields at the end of its header section.
        """

        def send():
            return self.transaction(
                self.loggedIn(),
                b"bob@example.test",
                [b"<bob@example.test>"],
                b"Subject: bare\r\n\r\nbody",
            )

        self.assertEqual((yield self.inThread(send)), [250, 250, 354, 250])
        [(_, stored)] = self.daemon.delivered("bob@example.test")
        self.assertTrue(stored.startswith(b"Return-Path: <bob@example.test>\nReceived: "))
        header, _, body = stored.partition(b"\n\n")
        self.assertEqual(body, b"body\n")
        self.assertRegex(
            header,
            rb"\nSubject: bare\nDate: [^\n]+\n"
            rb"Message-ID: <\d{14}\.[0-9A-F]{12}@mx\.example\.test>$",
        )

    @defer.inlineCallbacks
    def test_mxUnchanged(self):
        """A message from an MX session gets Return-Path and nothing else."""

        def send():
            client = self.connect("mx")
            client.ehlo()
            return self.transaction(
                client, b"", [b"<bob@example.test>"], b"Subject: bounce\r\n\r\nbody"
            )

        self.assertEqual((yield self.inThread(send)), [250, 250, 354, 250])
        [(_, stored)] = self.daemon.delivered("bob@example.test")
        self.assertTrue(stored.startswith(b"Return-Path: <>\nReceived: "))
        self.assertTrue(stored.endswith(b"\nSubject: bounce\n\nbody\n"))
        self.assertNotIn(b"\nDate:", stored)
        self.assertNotIn(b"\nMessage-ID:", stored)

    @defer.inlineCallbacks
    def test_postmaster(self):
        """
        <Postmaster> and postmaster@ each local domain, in any case, are
        accepted from an MX session though no alias names them, and the
        message reaches the postmaster once.
        """

        def send():
            client = self.connect("mx")
            client.ehlo()
            return self.transaction(
                client,
                b"someone@remote.test",
                [b"<Postmaster>", b"<POSTMASTER@Example.NET>", b"<postmaster@example.test>"],
                b"Subject: to the postmaster\r\n\r\nhello",
            )

        self.assertEqual((yield self.inThread(send)), [250, 250, 250, 250, 354, 250])
        [(_, stored)] = self.daemon.delivered("alice.plain@example.test")
        self.assertTrue(stored.startswith(b"Return-Path: <someone@remote.test>\n"))
        self.assertTrue(stored.endswith(b"\nSubject: to the postmaster\n\nhello\n"))


# -- twisted.mail's defects (docs/twisted-defects.rst) ----------------------
#
# The defects of twisted.mail that mailauth replaced, each shown absent here
# where no other module's tests already show it; the table in
# docs/twisted-defects.rst names every test, here and elsewhere.

LIBRARY_VERIFIED = ("ARGON2ID", "ARGON2I", "BLF-CRYPT")


class StartTLSForgetsLoginTests(unittest.TestCase):
    """D3: Twisted keeps a login made before STARTTLS; RFC 3207 4.2 says forget it."""

    def test_loginForgotten(self) -> None:
        """
        On a listener that allows AUTH in the clear, a login and a
        transaction made before STARTTLS are forgotten by it: AUTH is
        offered again, and MAIL needs it.
        """
        clock = Clock()
        portal = RecordingPortal(MemoryMailbox(login="alice@example.test"), passwordIs(b"s"))
        session = Session(makeFactory(clock, portal=portal, plaintextRequiresTLS=False))
        session.read()
        session.command(b"EHLO client.example")
        self.assertEqual(
            session.command(plain(b"alice@example.test", b"s")),
            [b"235 2.7.0 Authentication successful"],
        )
        self.assertEqual(session.command(b"MAIL FROM:<alice@example.test>"), [b"250 2.1.0 Ok"])
        self.assertEqual(session.command(b"STARTTLS"), [b"220 2.0.0 Ready to start TLS"])
        self.assertIn(b"250 AUTH PLAIN LOGIN CRAM-MD5", session.command(b"EHLO client.example"))
        self.assertEqual(
            session.command(b"MAIL FROM:<alice@example.test>"),
            [b"530 5.7.0 Authentication required"],
        )


class CramMD5ChallengeTests(unittest.TestCase):
    """D8: Twisted's CRAM-MD5 challenge comes from C{random} and the clock."""

    def test_notFromRandom(self) -> None:
        """
        Two challenges made at the same second, each after C{random} was
        seeded alike (what an attacker who learnt the Mersenne Twister's
        state could predict), differ: they come from the system's CSPRNG.
        """
        clock = Clock()
        clock.advance(1_700_000_000)
        context = sasl.SASLContext("mx.example.test", clock, None)
        challenges = set()
        for _ in range(2):
            random.seed(1)
            challenges.add(sasl.CramMD5(context).start(None).data)
        self.assertEqual(len(challenges), 2)


class ConstantTimeTests(unittest.TestCase):
    """
    D8 and D9: Twisted compares passwords and CRAM-MD5 digests with C{==}.
    Every comparison mailauth makes of a secret goes through
    L{hmac.compare_digest}; argon2 and bcrypt hashes are compared by their
    libraries, which do so in constant time themselves.
    """

    def setUp(self) -> None:
        self.calls: list = []
        real = hmac.compare_digest

        def record(a, b):
            self.calls.append((a, b))
            return real(a, b)

        self.patch(hmac, "compare_digest", record)

    def test_everyScheme(self) -> None:
        """A wrong password is compared in constant time, whatever the stored scheme."""
        schemes = [s for s in passwords.SCHEMES if s not in LIBRARY_VERIFIED]
        self.assertGreater(len(schemes), 20)
        for scheme in schemes:
            stored = passwords.parse(passwords.makeHash(b"pw-right", scheme, "bob@example.test"))
            del self.calls[:]
            self.assertFalse(passwords.verify(stored, b"pw-wrong", "bob@example.test"), scheme)
            self.assertTrue(self.calls, scheme)

    def test_checkers(self) -> None:
        """
        The PLAIN/LOGIN checker compares through the password schemes
        above; the CRAM-MD5 checker compares the client's digest in
        constant time, for a user stored as CRAM-MD5 and as plaintext.
        """
        users = MemoryUserDatabase(
            {
                "plain@example.test": "{PLAIN}secret",
                "cram@example.test": passwords.makeHash(b"secret", "CRAM-MD5"),
            }
        )
        plainUser = self.successResultOf(users.lookup("plain@example.test"))
        credentials = sasl.PlaintextCredentials("plain@example.test", b"wrong", "PLAIN")
        self.assertEqual(PasswordChecker.verify(plainUser, credentials), WRONG)
        self.assertEqual(len(self.calls), 1)
        for login in ("plain@example.test", "cram@example.test"):
            del self.calls[:]
            user = self.successResultOf(users.lookup(login))
            wrong = sasl.CramMD5Credentials(login, b"<1.2@mx>", b"0" * 32)
            self.assertEqual(CramMD5Checker.verify(user, wrong), WRONG)
            self.assertEqual([b for _, b in self.calls], [b"0" * 32], login)

    def test_credentials(self) -> None:
        """The credentials' own checkPassword (IUsernamePassword and its hashed kind) too."""
        self.assertFalse(sasl.PlaintextCredentials("a", b"wrong", "PLAIN").checkPassword(b"s"))
        self.assertEqual(self.calls, [(b"wrong", b"s")])
        self.assertFalse(sasl.CramMD5Credentials("a", b"<1.2@mx>", b"0" * 32).checkPassword(b"s"))
        self.assertEqual(len(self.calls), 2)


class _RefusingPortal:
    """A portal that refuses every login at once and keeps nothing of it."""

    def login(self, credentials, mind, *interfaces):
        return defer.fail(UnauthorizedLogin())


class FailedLoginForgottenTests(unittest.TestCase):
    """
    D12: Twisted's C{_ebAuthenticated} clears C{self.challenge} instead of
    C{self.challenger}, so the failed exchange, password included, stays
    referenced by the session.
    """

    def test_credentialsReleased(self) -> None:
        """Once the 535 is sent nothing keeps the failed credentials (their password)."""
        clock = Clock()
        session = Session(makeFactory(clock, portal=_RefusingPortal(), tlsMode="implicit"))
        session.read()
        session.command(b"EHLO client.example")
        made: list = []
        real = sasl.Plain.start

        def start(mechanism, initial):
            step = real(mechanism, initial)
            made.append(weakref.ref(step))
            return step

        self.patch(sasl.Plain, "start", start)
        self.assertEqual(
            session.command(plain(b"alice@example.test", b"guess")),
            [b"535 5.7.8 Authentication credentials invalid"],
        )
        gc.collect()
        self.assertEqual(len(made), 1)
        self.assertIsNone(made[0]())
        self.assertEqual(session.command(b"NOOP"), [b"250 2.0.0 Ok"])


class _HeldMailbox(MemoryMailbox):
    """A mailbox whose deliveries answer MAIL and RCPT only when the test says."""

    def __init__(self) -> None:
        super().__init__(login="alice@example.test")
        self.validations: list = []

    def getMessageDelivery(self):
        delivery = super().getMessageDelivery()
        validateFrom, validateTo = delivery.validateFrom, delivery.validateTo

        def later(validate):
            def held(*args):
                d: defer.Deferred = defer.Deferred()
                self.validations.append(d)
                return d.addCallback(lambda _: validate(*args))

            return held

        delivery.validateFrom = later(validateFrom)
        delivery.validateTo = later(validateTo)
        return delivery


class AsynchronousValidatorTests(unittest.TestCase):
    """
    D14 (probe p20): with validators that answer later, as the realm's do,
    Twisted answers pipelined commands out of order and runs RCPT before
    MAIL has been accepted.
    """

    def test_pipelinedInOrder(self) -> None:
        """
        MAIL, RCPT, DATA and the message in one packet: nothing after MAIL
        runs until MAIL's validator answers, and the replies come in order.
        """
        clock = Clock()
        mailbox = _HeldMailbox()
        portal = RecordingPortal(mailbox, answer=passwordIs(b"s"))
        session = Session(makeFactory(clock, portal=portal, tlsMode="implicit"))
        session.read()
        session.command(b"EHLO client.example")
        session.command(plain(b"alice@example.test", b"s"))
        lines = session.send(
            b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
            b"RCPT TO:<nobody@example.test>\r\nDATA\r\nhello\r\n.\r\nNOOP\r\n"
        )
        self.assertEqual((lines, len(mailbox.validations)), ([], 1))
        mailbox.validations[0].callback(None)
        self.assertEqual((session.read(), len(mailbox.validations)), ([b"250 2.1.0 Ok"], 2))
        mailbox.validations[1].callback(None)
        self.assertEqual((session.read(), len(mailbox.validations)), ([b"250 2.1.5 Ok"], 3))
        mailbox.validations[2].callback(None)
        self.assertEqual([line[:3] for line in session.read()], [b"550", b"354", b"250", b"250"])
        self.assertEqual(mailbox.stored, [b"Received: from client.example\r\nhello\r\n"])


class _FailingMailbox(MemoryMailbox):
    """A mailbox whose MAIL, RCPT or message write fails with a given exception."""

    def __init__(self) -> None:
        super().__init__(login="alice@example.test")
        self.failAt: Optional[str] = None
        self.error: Exception = ValueError()

    def getMessageDelivery(self):
        delivery = super().getMessageDelivery()
        box = self

        def failing(name, validate):
            def check(*args):
                if box.failAt == name:
                    raise box.error
                return validate(*args)

            return check

        delivery.validateFrom = failing("MAIL", delivery.validateFrom)
        delivery.validateTo = failing("RCPT", delivery.validateTo)
        return delivery


class _LoggedInMixin:
    """A session on a Clock, logged in as alice, over a L{_FailingMailbox}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.mailbox = _FailingMailbox()
        portal = RecordingPortal(self.mailbox, answer=passwordIs(b"s"))
        self.session = Session(makeFactory(self.clock, portal=portal, tlsMode="implicit"))
        self.session.read()
        self.session.command(b"EHLO client.example")
        self.session.command(plain(b"alice@example.test", b"s"))


class ValidatorErrorTests(_LoggedInMixin, unittest.TestCase):
    """
    D20: Twisted's MAIL and RCPT need an error's C{resp} as text and its
    DATA needs bytes; the wrong one leaves RCPT unanswered or drops the
    connection. mailauth's session answers whatever a validator or a
    message raises, once, and goes on.
    """

    ERRORS = (
        (SMTPReply(553, "5.7.1 no"), b"553 5.7.1 no"),
        (smtp.SMTPServerError(550, b"bytes resp"), b"451 4.3.0 "),
        (smtp.SMTPServerError(550, "text resp"), b"451 4.3.0 "),
        (ValueError("a bug"), b"451 4.3.0 "),
    )

    def test_mailAndRcpt(self) -> None:
        """Each error at MAIL or RCPT gets one reply; the next command is answered."""
        s = self.session
        for error, reply in self.ERRORS:
            self.mailbox.error = error
            self.mailbox.failAt = "MAIL"
            [line] = s.command(b"MAIL FROM:<alice@example.test>")
            self.assertTrue(line.startswith(reply), (error, line))
            self.mailbox.failAt = "RCPT"
            self.assertEqual(s.command(b"MAIL FROM:<alice@example.test>"), [b"250 2.1.0 Ok"])
            [line] = s.command(b"RCPT TO:<bob@example.test>")
            self.assertTrue(line.startswith(reply), (error, line))
            self.assertEqual(s.command(b"RSET"), [b"250 2.0.0 Ok"])
        self.flushLoggedErrors(ValueError, smtp.SMTPServerError)

    def test_data(self) -> None:
        """Each error from writing the message gets one reply at its end; nothing is stored."""
        s = self.session
        for error, reply in self.ERRORS:
            s.command(b"MAIL FROM:<alice@example.test>")
            s.command(b"RCPT TO:<bob@example.test>")
            s.command(b"DATA")
            [message] = [m for m in self.mailbox.messages if not m.aborted]

            def write(chunk, error=error):
                raise error

            message.write = write
            [line] = s.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
            self.assertTrue(line.startswith(reply), (error, line))
            self.assertEqual(s.command(b"NOOP"), [b"250 2.0.0 Ok"])
        self.assertEqual(self.mailbox.stored, [])
        self.flushLoggedErrors(ValueError, smtp.SMTPServerError)


class BodyUnchangedTests(_LoggedInMixin, unittest.TestCase):
    def test_firstLineWithoutColon(self) -> None:
        """
        D17: Twisted inserts an empty line before a first content line
        that has no colon. mailauth stores the content as sent.
        """
        s = self.session
        s.command(b"MAIL FROM:<alice@example.test>")
        s.command(b"RCPT TO:<bob@example.test>")
        s.command(b"DATA")
        s.send(b"just text, no header\r\nline two\r\n.\r\n")
        self.assertEqual(
            self.mailbox.stored,
            [b"Received: from client.example\r\njust text, no header\r\nline two\r\n"],
        )


class QueueDurabilityTests(QueueTestMixin, unittest.TestCase):
    """
    D22: nothing in twisted.mail fsyncs. A message queued for the relay is
    durable before the queue's commit returns (and so before the 250): its
    data and envelope fsynced before they are renamed into C{msg/}, and
    C{msg/} fsynced after.
    """

    def test_fsyncBeforeCommitReturns(self) -> None:
        calls: list = []
        realFsync, realRename = os.fsync, os.rename

        def fsync(fd):
            calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            return realFsync(fd)

        def rename(source, target):
            calls.append(("rename", source))
            return realRename(source, target)

        self.patch(os, "fsync", fsync)
        self.patch(os, "rename", rename)
        writer = self.queue.newMessage("m1", "alice@example.org", ["bob@remote.example"])
        writer.write(b"Subject: x\r\n\r\nbody\r\n")
        writer.commit()
        renamed = [path for kind, path in calls if kind == "rename"]
        self.assertEqual(len(renamed), 2)
        for path in renamed:
            self.assertLess(calls.index(("fsync", path)), calls.index(("rename", path)), path)
        self.assertEqual(calls[-1], ("fsync", os.path.join(self.directory, "msg")))


class LocalSocketRelayTests(AttackMixin, unittest.TestCase):
    """
    D26: Twisted's C{DomainQueuer.willRelay} relays for any client on
    127.0.0.1 or a UNIX socket, an open relay behind a local proxy. mailauth
    relays for a login only, wherever the client is: here a unix: listener
    without AUTH, with a [relay] configured (a closed port, on a clock that
    never moves: nothing is sent). 127.0.0.1 is
    L{tests.test_security.OpenRelayWithRelayTests}.
    """

    clocked = True

    def setUp(self):
        folder = tempfile.mkdtemp(prefix="mailauth-")
        self.addCleanup(shutil.rmtree, folder)
        # A short path: a UNIX socket's is at most 107 bytes.
        self.socketPath = os.path.join(folder, "s")
        self.settings = {
            "listener:local": {
                "endpoint": f"unix:{self.socketPath}",
                "tls": "none",
                "auth": "none",
            },
            "relay": {"host": "127.0.0.1", "port": "1", "tls": "none"},
        }
        super().setUp()

    @defer.inlineCallbacks
    def test_noRelayForLocalSocket(self):
        """A remote recipient gets 554 5.7.1; a local one is accepted; nothing is queued."""

        def send():
            client = RawClient(0, unix=self.socketPath)
            self.clients.append(client)
            client.reply()
            client.ehlo()
            client.command(b"MAIL FROM:<www-data@example.test>")
            return [client.command(b"RCPT TO:<" + r + b">") for r in (b"x@remote.test", BOB)]

        self.assertEqual(self.daemon.ports["local"], self.socketPath)
        self.assertEqual(
            (yield self.inThread(send)),
            [(554, [b"5.7.1 <x@remote.test>: Relay access denied"]), (250, [b"2.1.5 Ok"])],
        )
        self.assertEqual(self.daemon.allDelivered(), [])


class PrivatePoolTests(AttackMixin, unittest.TestCase):
    """
    D35: the reactor's thread pool also resolves host names. Password
    hashes and Maildir writes run in mailauth's own pools, never in it.
    """

    @defer.inlineCallbacks
    def test_blockingWorkInOwnPools(self):
        """A login and a delivery over the wire run their blocking work in the named pools."""
        threadsUsed: dict = {}

        def recorded(name, f):
            def run(*args, **kwargs):
                threadsUsed.setdefault(name, set()).add(threading.current_thread().name)
                return f(*args, **kwargs)

            return run

        self.patch(passwords, "verify", recorded("verify", passwords.verify))
        self.patch(MaildirWriter, "commit", recorded("commit", MaildirWriter.commit))

        def send():
            client = self.loggedIn()
            client.command(b"MAIL FROM:<bob@example.test>")
            client.command(b"RCPT TO:<bob@example.test>")
            client.command(b"DATA")
            return client.command(b"Subject: x\r\n\r\nbody\r\n.")[0]

        self.assertEqual((yield self.inThread(send)), 250)
        self.assertEqual(len(self.daemon.delivered("bob@example.test")), 1)
        [verify], [commit] = threadsUsed["verify"], threadsUsed["commit"]
        self.assertRegex(verify, r"^PoolThread-mailauth-auth-\d+$")
        self.assertRegex(commit, r"^PoolThread-mailauth-disk-\d+$")


DEFECTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "twisted-defects.rst"
)


class DefectTableTests(unittest.TestCase):
    """
    docs/twisted-defects.rst: a row for every defect of the report (it has
    no D24), each naming tests that exist or saying why none is needed.
    """

    def setUp(self) -> None:
        with open(DEFECTS, encoding="utf-8") as f:
            sections = parseMap(f.read())
        self.rows = []
        for title, rows in sections.items():
            if rows:
                self.assertEqual(rows[0], ["ID", "Twisted's defect", "mailauth", "Tests"], title)
                self.rows += rows[1:]

    def test_everyDefect(self) -> None:
        """D1 to D36 but D24, each once, in order, each row with its four cells."""
        expected = [f"D{n}" for n in range(1, 37) if n != 24]
        self.assertEqual([row[0] for row in self.rows], expected)
        for row in self.rows:
            self.assertEqual(len(row), 4, row)
            self.assertTrue(all(row), row)

    def test_provenOrExplained(self) -> None:
        """Every row names a test, or says N/A and why."""
        for row in self.rows:
            explained = re.search(r"\*\*N/A\*\*:\s*\S", row[3])
            self.assertTrue(TEST_NAME.search(row[3]) or explained, row)

    def test_namedTestsExist(self) -> None:
        """Every test the table names can be imported: module, class and method."""
        names = {name for row in self.rows for name in TEST_NAME.findall(row[3])}
        self.assertGreater(len(names), 80)
        for name in sorted(names):
            moduleName, className, methodName = name.rsplit(".", 2)
            cls = getattr(importlib.import_module(moduleName), className, None)
            self.assertIsNotNone(cls, f"{name}: no class {className} in {moduleName}")
            self.assertTrue(methodName.startswith("test_"), name)
            self.assertTrue(callable(getattr(cls, methodName, None)), f"{name} does not exist")
