"""
The DKIM signing process (L{mailauth.signerproc}): its frames, the signer's
held message, the helper's answers, and real helper processes started,
killed, stopped with C{SIGSTOP} and ended, against signatures made in
this process and verified by dkimpy.
"""

from __future__ import annotations

import os
import re
import signal
import sys

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mailauth import dkimsign
from mailauth.dkimsign import HELD_BODY, MessageSigner, loadKey
from mailauth.signerproc import (
    FAILED,
    NOT_SIGNABLE,
    OK,
    Helper,
    SigningProcess,
    fields,
    frame,
    request,
)
from mailauth.workers import workerEnvironment
from tests.test_signing import MESSAGES, NOW, Keys, verifyEach

# Messages the helper signs (bodies held whole), and how they end.
SMALL = {name: header + b"\r\n" + body for name, (header, body) in MESSAGES.items()}
SMALL.pop("large")
SMALL.update(
    {
        "no empty line": b"From: bob@example.test\r\nSubject: all header\r\n",
        "no header fields": b"\r\nonly a body\r\n",
        "empty": b"",
        "header end split": b"From: bob@example.test\r\n\r\n\r\nbody\r\n",
    }
)
LARGE = MESSAGES["large"][0] + b"\r\n" + MESSAGES["large"][1]
UNPARSEABLE = b"From: bob@example.test\r\nnot a field\r\n\r\nbody\r\n"


def written(keys, message: bytes, chunk: int, clock=None) -> MessageSigner:
    """A signer that took C{message} in chunks of C{chunk} bytes."""
    signer = MessageSigner(keys, clock or fixedClock())
    for at in range(0, len(message), chunk):
        signer.write(message[at : at + chunk])
    return signer


def fixedClock() -> Clock:
    clock = Clock()
    clock.advance(NOW)
    return clock


class _KeysMixin:
    def setUp(self):
        made = Keys.get(self)
        self.dns = made["dns"]
        self.keys = [
            loadKey("example.test", made[keyType][0], made[keyType][1])
            for keyType in ("ed25519", "rsa")
        ]


class FramingTests(unittest.TestCase):
    def test_roundTrip(self):
        """A frame's length covers its body, whose fields come back as they went."""
        parts = [b"", b"1", b"x" * 100000, bytes(range(256))]
        data = frame(parts)
        self.assertEqual(int.from_bytes(data[:4], "big"), len(data) - 4)
        self.assertEqual(fields(data[4:]), parts)

    def test_cutShort(self):
        """A field that runs past its frame, or a length cut short, is a ValueError."""
        body = frame([b"abc", b"defg"])[4:]
        for broken in (body[:-1], body + b"\0\0"):
            self.assertRaises(ValueError, fields, broken)


class HeldMessageTests(_KeysMixin, unittest.TestCase):
    """L{MessageSigner.heldMessage}: what the helper is given signs as the signer would."""

    def test_signsAlike(self):
        """
        However the message was cut into chunks, a new signer given the
        held message in one write makes the same signature.
        """
        for name, message in SMALL.items():
            for chunk in (1, 2, 3, 7, 100, 4096, len(message) or 1):
                signer = written(self.keys, message, chunk)
                held = signer.heldMessage()
                self.assertEqual(held, message, (name, chunk))
                again = written(self.keys, held, len(held) or 1)
                self.assertEqual(again.signatureHeader(), signer.signatureHeader(), (name, chunk))

    def test_notHeld(self):
        """
        A body past L{HELD_BODY} is hashed as it streams, and a header too
        large to sign is not kept: neither can be handed on.
        """
        self.assertGreater(len(LARGE), HELD_BODY)
        self.assertIsNone(written(self.keys, LARGE, 4096).heldMessage())
        tooLong = b"X-Long: " + b"a" * dkimsign.MAX_HEADER_SIZE + b"\r\n\r\nbody\r\n"
        self.assertIsNone(written(self.keys, tooLong, 4096).heldMessage())


class HelperTests(_KeysMixin, unittest.TestCase):
    """The helper's answers, in this process."""

    def ask(self, message: bytes, keys=None, number: int = 7) -> list:
        data = request(number, NOW, dkimsign.MAX_HEADER_SIZE, keys or self.keys, message)
        answer = Helper().answer(data[4:])
        self.assertEqual(int.from_bytes(answer[:4], "big"), len(answer) - 4)
        return fields(answer[4:])

    def test_signs(self):
        """The answer is the signature this process would make, and it verifies."""
        for name, message in SMALL.items():
            number, status, payload = self.ask(message)
            self.assertEqual((number, status), (b"7", OK), name)
            self.assertEqual(payload, written(self.keys, message, 4096).signatureHeader(), name)
            if name != "empty":
                self.assertEqual(verifyEach(payload + message, self.dns), [True, True], name)

    def test_notSignable(self):
        """A header that does not parse: NOT_SIGNABLE and why."""
        number, status, payload = self.ask(UNPARSEABLE)
        self.assertEqual(status, NOT_SIGNABLE)
        self.assertEqual(payload.decode(), dkimsign._UNPARSEABLE)

    def test_brokenKey(self):
        """A key that is not one: FAILED, naming the PEM problem."""
        import attrs

        broken = attrs.evolve(self.keys[0], pem=b"-----BEGIN PRIVATE KEY-----\nnope\n")
        number, status, payload = self.ask(SMALL["8-bit"], keys=[broken])
        self.assertEqual(status, FAILED)
        self.assertTrue(payload, payload)

    def test_badRequest(self):
        """A request whose key count does not match its fields is a ValueError."""
        body = frame([b"1", b"%d" % NOW, b"100", b"2", b"example.test", b"message"])[4:]
        self.assertRaises(ValueError, Helper().answer, body)


class _EndingProcess:
    """A helper whose stdin pipe is gone, before its end is known (Twisted's KeyError)."""

    pid = 4242

    def writeToChild(self, fd: int, data: bytes) -> None:
        raise KeyError(fd)


class _EndingReactor(Clock):
    def spawnProcess(self, proto, executable, args, env=None, **kwargs):
        return _EndingProcess()


class _ReapedAtOnceReactor(Clock):
    """Spawns a helper that is reaped before spawnProcess returns, as Twisted does one that died."""

    def spawnProcess(self, proto, executable, args, env=None, **kwargs):
        process = _EndingProcess()
        proto.makeConnection(process)
        process.pid = None  # type: ignore[assignment]
        return process


class EndingHelperTests(_KeysMixin, unittest.TestCase):
    def test_pidOfAHelperReapedAtOnce(self):
        """
        A helper that dies the moment it starts is reaped inside
        spawnProcess, whose process then has no pid any more: the log names
        the one its protocol saw when it connected.
        """
        logged: list = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        proc = SigningProcess(_ReapedAtOnceReactor(), {}, clock=fixedClock())
        self.successResultOf(proc.sign(written(self.keys, SMALL["8-bit"], 4096)))
        self.assertIn("DKIM signing process started (pid 4242)", [formatEvent(e) for e in logged])

    def test_stdinGone(self):
        """
        Between the helper's stdin closing and its end being reported,
        writing to it raises: the message is signed in a thread, and no
        answer is waited for.
        """
        reactor = _EndingReactor()
        proc = SigningProcess(reactor, {}, clock=fixedClock())
        self.assertIsNone(self.successResultOf(proc.sign(written(self.keys, SMALL["8-bit"], 4096))))
        self.assertEqual(proc._pending, {})
        self.assertEqual(reactor.getDelayedCalls(), [])


class SigningProcessTests(_KeysMixin, unittest.TestCase):
    """Real helper processes."""

    def setUp(self):
        super().setUp()
        self.logged: list = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def process(self, **kwargs) -> SigningProcess:
        proc = SigningProcess(reactor, workerEnvironment(os.environ), clock=fixedClock(), **kwargs)
        self.addCleanup(proc.stop)
        return proc

    def lines(self) -> list:
        return [
            formatEvent(e) for e in self.logged if e.get("log_namespace") == "mailauth.signerproc"
        ]

    def expected(self, message: bytes) -> bytes:
        return written(self.keys, message, 4096).signatureHeader()

    @defer.inlineCallbacks
    def test_signsAsThisProcessWould(self):
        """
        Many messages at once, answered in order by one helper: each gets
        the signature a thread would make, and they verify.
        """
        proc = self.process()
        messages = list(SMALL.values()) * 5
        signatures = yield defer.gatherResults(
            [proc.sign(written(self.keys, m, 1000)) for m in messages]
        )
        self.assertEqual(signatures, [self.expected(m) for m in messages])
        self.assertEqual(proc.signed, len(messages))
        self.assertEqual(verifyEach(signatures[0] + messages[0], self.dns), [True, True])
        [started] = self.lines()
        self.assertEqual(started, f"DKIM signing process started (pid {proc.pid})")

    @defer.inlineCallbacks
    def test_refusalsAsThisProcessWould(self):
        """A header that does not parse, and a broken key, fail as in a thread."""
        import attrs

        proc = self.process()
        with self.assertRaises(dkimsign.MessageNotSignable):
            yield proc.sign(written(self.keys, UNPARSEABLE, 4096))
        broken = attrs.evolve(self.keys[0], pem=b"not a key")
        with self.assertRaises(dkimsign.SigningError):
            yield proc.sign(written([broken], SMALL["8-bit"], 4096))
        # The helper goes on.
        signature = yield proc.sign(written(self.keys, SMALL["8-bit"], 4096))
        self.assertEqual(signature, self.expected(SMALL["8-bit"]))

    @defer.inlineCallbacks
    def test_largeInThread(self):
        """A message whose body is not held whole is left to a thread: no helper starts."""
        proc = self.process()
        result = yield proc.sign(written(self.keys, LARGE, 4096))
        self.assertIsNone(result)
        self.assertIsNone(proc.pid)
        self.assertEqual(self.lines(), [])

    @defer.inlineCallbacks
    def test_helperKilled(self):
        """
        A helper killed with a message waiting for it: that message goes to
        a thread (L{None}), one error line; a new helper is only started
        C{retryAfter} later (it died young), and then signs.
        """
        proc = self.process()
        first = yield proc.sign(written(self.keys, SMALL["8-bit"], 4096))
        self.assertEqual(first, self.expected(SMALL["8-bit"]))
        pid = proc.pid
        os.kill(pid, signal.SIGSTOP)
        waiting = proc.sign(written(self.keys, SMALL["8-bit"], 4096))
        os.kill(pid, signal.SIGKILL)
        result = yield waiting
        self.assertIsNone(result)
        self.assertEqual(
            self.lines()[1:],
            [
                f"DKIM signing process (pid {pid}) was killed by SIGKILL; signing in threads "
                "until it is started again (in 30 s at the earliest)"
            ],
        )
        result = yield proc.sign(written(self.keys, SMALL["8-bit"], 4096))
        self.assertIsNone(result)
        self.assertIsNone(proc.pid)
        proc._notBefore = 0
        result = yield proc.sign(written(self.keys, SMALL["8-bit"], 4096))
        self.assertEqual(result, self.expected(SMALL["8-bit"]))
        self.assertNotEqual(proc.pid, pid)

    @defer.inlineCallbacks
    def test_helperHangs(self):
        """
        A helper that does not answer within C{timeout} is killed, and
        what waited for it goes to a thread.
        """
        proc = self.process()
        first = yield proc.sign(written(self.keys, SMALL["8-bit"], 4096))
        self.assertEqual(first, self.expected(SMALL["8-bit"]))
        # Short only now that it has started (its imports take a while on a busy machine).
        proc.timeout = 0.5
        pid = proc.pid
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(lambda: _kill(pid))
        results = yield defer.gatherResults(
            [proc.sign(written(self.keys, m, 4096)) for m in SMALL.values()]
        )
        self.assertEqual(results, [None] * len(SMALL))
        self.assertEqual(
            self.lines()[1],
            f"DKIM signing process (pid {pid}) did not answer within 0.5 s: killing it; "
            "signing in threads until it is started again",
        )
        self.assertIn("was killed by SIGKILL", self.lines()[2])
        self.assertFalse(_alive(pid))

    @defer.inlineCallbacks
    def test_cannotRun(self):
        """
        A Python that cannot run the helper (here, none at all): messages
        go to threads, and it is not tried again at once.
        """
        proc = self.process(executable="/nonexistent/python3")
        result = yield proc.sign(written(self.keys, SMALL["8-bit"], 4096))
        self.assertIsNone(result)
        lines = self.lines()
        # Newer Twisted cannot spawn it at all; older forks, and the child exits with 1.
        self.assertTrue(
            lines
            == [
                "DKIM signing process: cannot run /nonexistent/python3: [Errno 2] No such file "
                "or directory: '/nonexistent/python3'; signing in threads, trying again in 30 s"
            ]
            or (
                re.fullmatch(r"DKIM signing process started \(pid \d+\)", lines[0]) is not None
                and lines[-1].endswith(
                    "exited with 1; signing in threads until it is started again "
                    "(in 30 s at the earliest)"
                )
            ),
            lines,
        )
        result = yield proc.sign(written(self.keys, SMALL["8-bit"], 4096))
        self.assertIsNone(result)
        self.assertEqual(self.lines(), lines)

    @defer.inlineCallbacks
    def test_stopAnswersFirst(self):
        """
        Stopping closes the helper's stdin: it answers what it was asked,
        then exits, quietly; afterwards messages go to threads.
        """
        proc = self.process()
        pending = [proc.sign(written(self.keys, m, 4096)) for m in SMALL.values()]
        pid = proc.pid
        # The daemon's stop and anyone else's: both fire once it has ended.
        yield defer.gatherResults([proc.stop(), proc.stop()])
        self.assertFalse(_alive(pid))
        results = yield defer.gatherResults(pending)
        self.assertEqual(results, [self.expected(m) for m in SMALL.values()])
        result = yield proc.sign(written(self.keys, SMALL["8-bit"], 4096))
        self.assertIsNone(result)
        self.assertEqual(len(self.lines()), 1)

    def test_endsWithTheDaemon(self):
        """
        A helper ignores the SIGTERM systemd sends the whole unit (its
        daemon ends it, once what it signs is signed), and exits by itself
        when its daemon is gone (its stdin closes without a stop): none is
        left behind a kill -9.
        """
        import subprocess

        child = subprocess.Popen(
            [sys.executable, "-m", "mailauth.signerproc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=workerEnvironment(os.environ),
        )
        self.addCleanup(lambda: child.poll() is None and child.kill())

        def ask(number: int) -> list:
            child.stdin.write(request(number, NOW, 65536, self.keys, SMALL["8-bit"]))
            child.stdin.flush()
            size = int.from_bytes(child.stdout.read(4), "big")
            return fields(child.stdout.read(size))[:2]

        self.assertEqual(ask(1), [b"1", OK])
        child.send_signal(signal.SIGTERM)
        self.assertEqual(ask(2), [b"2", OK])
        child.stdin.close()
        self.assertEqual(child.stdout.read(), b"")
        self.assertEqual(child.wait(30), 0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
