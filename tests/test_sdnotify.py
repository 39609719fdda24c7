"""
systemd readiness: sd_notify datagrams to a real socket, READY=1 only once
every port listens, WATCHDOG=1 on the reactor's clock, STOPPING=1 at the end.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile

from twisted.application import internet
from twisted.internet import defer, protocol, reactor, task, threads
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from mailauth import sdnotify, tap
from mailauth.sdnotify import Notifier, ReadinessService
from tests.harness import ClockedReactor, Daemon, LogWatcher, RawClient

METRICS = {"metrics": {"endpoint": "tcp:0:interface=127.0.0.1"}}


class Receiver:
    """What systemd does: a datagram socket that collects sd_notify messages."""

    def __init__(self, testCase: unittest.TestCase, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        testCase.addCleanup(self.sock.close)
        if abstract:
            name = f"mailauth-test-{secrets.token_hex(8)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            # A socket path must fit in 108 bytes, which trial's temporary
            # directories under the checkout may not: a short one in /tmp.
            directory = tempfile.mkdtemp(prefix="mailauth-sdnotify-")
            testCase.addCleanup(shutil.rmtree, directory)
            self.address = os.path.join(directory, "notify")
            self.sock.bind(self.address)
        self.sock.setblocking(False)
        # Ask for each sender's credentials, as systemd does to enforce
        # NotifyAccess=main.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, timeout: float = 30.0) -> tuple:
        """
        Wait for one message.

        @return: (its assignments, the sender's process id).
        """
        readable, _, _ = select.select([self.sock], [], [], timeout)
        assert readable, f"nothing received on {self.address} within {timeout} s"
        credentials = struct.calcsize("iII")
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(credentials))
        pid = None
        for level, kind, value in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                pid = struct.unpack("iII", value[:credentials])[0]
        return data.decode("utf-8").split("\n"), pid

    def messages(self) -> list:
        """Every message received since the last call, each as a list of assignments."""
        out = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return out
            out.append(data.decode("utf-8").split("\n"))


class RunningReactor(ClockedReactor):
    """
    The real reactor with a Clock for time, as running. Trial drives the
    real reactor without ever marking it running, so its startup triggers
    (callWhenRunning) would never fire; twistd's reactor.run() fires them.
    """

    def callWhenRunning(self, f, *args, **kwargs):
        f(*args, **kwargs)


class FakePort:
    def __init__(self) -> None:
        self.listening = True

    def stopListening(self):
        self.listening = False
        return defer.succeed(None)


class ManualEndpoint:
    """A server endpoint whose listen() the test completes: a port that listens late."""

    def __init__(self) -> None:
        self.listening = defer.Deferred()

    def listen(self, factory):
        return self.listening


def lateListener(name: str) -> tuple:
    endpoint = ManualEndpoint()
    service = internet.StreamServerEndpointService(endpoint, protocol.Factory())
    service.setName(name)
    return service, endpoint


class NotifierTests(unittest.TestCase):
    def test_pathSocket(self) -> None:
        """A message reaches a socket named by its path, one assignment a line."""
        receiver = Receiver(self)
        self.assertTrue(Notifier(receiver.address).send("READY=1", "STATUS=up"))
        self.assertEqual(receiver.messages(), [["READY=1", "STATUS=up"]])

    def test_abstractSocket(self) -> None:
        """@name is a socket in the abstract namespace."""
        receiver = Receiver(self, abstract=True)
        self.assertTrue(Notifier(receiver.address).send("WATCHDOG=1"))
        self.assertEqual(receiver.messages(), [["WATCHDOG=1"]])

    def test_newlineCannotAddAssignments(self) -> None:
        """A newline in a status text cannot smuggle in another assignment."""
        receiver = Receiver(self)
        Notifier(receiver.address).send("STATUS=a\nREADY=1")
        self.assertEqual(receiver.messages(), [["STATUS=a READY=1"]])

    def test_unreachableSocketLogged(self) -> None:
        """
        A socket that is gone is a warning, logged once until a send works
        again, never an exception.
        """
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        directory = tempfile.mkdtemp(prefix="mailauth-sdnotify-")
        self.addCleanup(shutil.rmtree, directory)
        notifier = Notifier(os.path.join(directory, "gone"))
        self.assertFalse(notifier.send("READY=1"))
        self.assertFalse(notifier.send("WATCHDOG=1"))
        self.assertEqual(len(watcher.matching("cannot notify systemd at .*gone: ")), 1)

    def test_badAddress(self) -> None:
        """Neither an absolute path nor @name: ValueError naming it."""
        for address in ("notify", "@", "vsock:2:123"):
            e = self.assertRaises(ValueError, Notifier, address)
            self.assertIn(repr(address), str(e))


class EnvironmentTests(unittest.TestCase):
    def test_noSocketNoService(self) -> None:
        """Without NOTIFY_SOCKET there is nothing to notify and no service."""
        self.assertIsNone(sdnotify.fromEnvironment({}, reactor, []))
        self.assertIsNone(sdnotify.fromEnvironment({"NOTIFY_SOCKET": ""}, reactor, []))

    def test_badSocketNoService(self) -> None:
        """An unusable NOTIFY_SOCKET is a warning, and no service."""
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        self.assertIsNone(sdnotify.fromEnvironment({"NOTIFY_SOCKET": "relative"}, reactor, []))
        self.assertEqual(
            len(watcher.matching("not notifying systemd: NOTIFY_SOCKET='relative'")), 1
        )

    def test_watchdogInterval(self) -> None:
        """The watchdog is pinged at half of WATCHDOG_USEC."""
        service = sdnotify.fromEnvironment(
            {"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": "30000000"}, reactor, []
        )
        self.assertEqual(service.watchdogInterval, 15.0)
        service = sdnotify.fromEnvironment({"NOTIFY_SOCKET": "/run/notify"}, reactor, [])
        self.assertIsNone(service.watchdogInterval)

    def test_watchdogForAnotherProcess(self) -> None:
        """A WATCHDOG_PID other than ours means the watchdog is not ours to ping."""
        environ = {
            "NOTIFY_SOCKET": "/run/notify",
            "WATCHDOG_USEC": "30000000",
            "WATCHDOG_PID": "4242",
        }
        self.assertIsNone(sdnotify.fromEnvironment(environ, reactor, [], pid=1).watchdogInterval)
        self.assertEqual(
            sdnotify.fromEnvironment(environ, reactor, [], pid=4242).watchdogInterval, 15.0
        )

    def test_badWatchdog(self) -> None:
        """A WATCHDOG_USEC that is not a positive number is a warning and no watchdog."""
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        for usec in ("soon", "0", "-5"):
            service = sdnotify.fromEnvironment(
                {"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": usec}, reactor, []
            )
            self.assertIsNone(service.watchdogInterval)
        self.assertEqual(len(watcher.matching("ignoring WATCHDOG_USEC=")), 3)


class ReadinessTests(unittest.TestCase):
    """L{ReadinessService} with ports whose listening the test controls."""

    def setUp(self) -> None:
        self.receiver = Receiver(self)
        self.reactor = MemoryReactorClock()

    def start(self, listeners, watchdog=None, run=True) -> ReadinessService:
        """Start the listeners and the service, then the reactor as twistd does."""
        for listener in listeners:
            listener.startService()
        service = ReadinessService(
            Notifier(self.receiver.address), self.reactor, listeners, watchdog
        )
        service.startService()
        if run:
            self.reactor.run()
        return service

    def test_readyOnceTheReactorRuns(self) -> None:
        """
        Ports bound and services started (twistd, before reactor.run()): no
        READY=1 yet; it is sent once the reactor runs.
        """
        one, oneEndpoint = lateListener("one")
        oneEndpoint.listening.callback(FakePort())
        self.start([one], run=False)
        self.assertEqual(self.receiver.messages(), [])
        self.reactor.run()
        self.assertEqual(self.receiver.messages(), [["READY=1", "STATUS=listening: one"]])

    def test_readyOnceEveryPortListens(self) -> None:
        """READY=1 waits for the last port to listen, and names what listens."""
        (one, oneEndpoint), (two, twoEndpoint) = lateListener("one"), lateListener("two")
        self.start([one, two])
        oneEndpoint.listening.callback(FakePort())
        self.assertEqual(self.receiver.messages(), [])
        port = FakePort()
        twoEndpoint.listening.callback(port)
        self.assertEqual(self.receiver.messages(), [["READY=1", "STATUS=listening: one, two"]])
        # The listener still holds its port, and stops it.
        two.stopService()
        self.assertFalse(port.listening)

    def test_notReadyWhenAPortFails(self) -> None:
        """A port that cannot listen: no READY=1, a status and a logged error saying which."""
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        (one, oneEndpoint), (two, twoEndpoint) = lateListener("one"), lateListener("two")
        self.start([one, two])
        oneEndpoint.listening.callback(FakePort())
        twoEndpoint.listening.errback(CannotListenError("127.0.0.1", 25, OSError(98, "in use")))
        self.flushLoggedErrors(CannotListenError)
        self.assertEqual(self.receiver.messages(), [["STATUS=could not listen: two"]])
        self.assertEqual(len(watcher.matching("not telling systemd we are ready: two could")), 1)

    def test_watchdogOnTheClock(self) -> None:
        """WATCHDOG=1 every interval of the reactor's clock, and none after stopping."""
        service = self.start([], watchdog=15.0)
        self.assertEqual(self.receiver.messages(), [["READY=1", "STATUS=listening: "]])
        self.reactor.advance(14)
        self.assertEqual(self.receiver.messages(), [])
        self.reactor.advance(1)
        self.assertEqual(self.receiver.messages(), [["WATCHDOG=1"]])
        self.reactor.advance(15)
        self.reactor.advance(15)
        self.assertEqual(self.receiver.messages(), [["WATCHDOG=1"], ["WATCHDOG=1"]])
        service.stopService()
        self.assertEqual(self.receiver.messages(), [["STOPPING=1", "STATUS=stopping"]])
        self.reactor.advance(60)
        self.assertEqual(self.receiver.messages(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stoppedBeforeListening(self) -> None:
        """Stopped while a port is still binding: STOPPING=1, never READY=1."""
        one, oneEndpoint = lateListener("one")
        service = self.start([one])
        service.stopService()
        oneEndpoint.listening.callback(FakePort())
        self.assertEqual(self.receiver.messages(), [["STOPPING=1", "STATUS=stopping"]])


class DaemonTests(unittest.TestCase):
    """The real daemon from tap.buildService, with NOTIFY_SOCKET set as systemd sets it."""

    def setUp(self) -> None:
        self.receiver = Receiver(self)
        self.clock = task.Clock()
        self.daemon = Daemon(self.mktemp(), settings=METRICS)
        environ = {"NOTIFY_SOCKET": self.receiver.address, "WATCHDOG_USEC": "30000000"}
        self.daemon.service = tap.buildService(
            self.daemon.config, RunningReactor(self.clock), environ=environ
        )

    @defer.inlineCallbacks
    def test_readyWatchdogStopping(self) -> None:
        """
        Started: READY=1 naming every listener and the metrics server, whose
        ports then answer; WATCHDOG=1 every 15 s of the clock; STOPPING=1
        when stopped.
        """
        self.assertEqual(list(self.daemon.service)[-1].name, "sdnotify")
        self.daemon.start()
        stopped = False
        try:
            self.assertEqual(
                self.receiver.messages(),
                [
                    [
                        "READY=1",
                        "STATUS=listening: listener:submission, listener:submissions, metrics",
                    ]
                ],
            )

            def greeting(port):
                client = RawClient(port)
                try:
                    return client.reply()
                finally:
                    client.close()

            code, _ = yield threads.deferToThread(greeting, self.daemon.ports["submission"])
            self.assertEqual(code, 220)
            self.clock.advance(15)
            self.assertEqual(self.receiver.messages(), [["WATCHDOG=1"]])
            yield self.daemon.stop()
            stopped = True
            self.assertEqual(self.receiver.messages(), [["STOPPING=1", "STATUS=stopping"]])
        finally:
            if not stopped:
                yield self.daemon.stop()

    def test_nothingWithoutNotifySocket(self) -> None:
        """Built without NOTIFY_SOCKET the daemon has no readiness service."""
        service = tap.buildService(self.daemon.config, reactor, environ={})
        self.assertRaises(KeyError, service.getServiceNamed, "sdnotify")

    def test_makeServiceReadsEnvironment(self) -> None:
        """twistd's makeService takes NOTIFY_SOCKET from the process environment."""
        options = tap.Options()
        options.parseOptions(["--config", self.daemon.configPath])
        self.patch(os, "environ", {"NOTIFY_SOCKET": self.receiver.address})
        service = tap.makeService(options, reactor)
        self.assertEqual(
            service.getServiceNamed("sdnotify").notifier.address, self.receiver.address
        )


class TwistdTests(unittest.TestCase):
    """C{twistd --nodaemon mailauth} started the way systemd starts C{Type=notify} units."""

    def test_notifiesAsMainProcess(self) -> None:
        """
        twistd sends READY=1 once listening, then WATCHDOG=1, then
        STOPPING=1 on SIGTERM, each from the very process that was started
        (the main PID, as NotifyAccess=main requires: --nodaemon does not
        fork).
        """
        receiver = Receiver(self)
        daemon = Daemon(self.mktemp(), settings=METRICS)
        environ = dict(os.environ, NOTIFY_SOCKET=receiver.address, WATCHDOG_USEC="200000")
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "--nodaemon",
                "--pidfile=",
                "--logfile=-",
                "mailauth",
                "--config",
                daemon.configPath,
            ],
            cwd=daemon.dir,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            ready, pid = receiver.receive()
            self.assertEqual(
                ready,
                [
                    "READY=1",
                    "STATUS=listening: listener:submission, listener:submissions, metrics",
                ],
            )
            self.assertEqual(pid, process.pid)
            self.assertEqual(receiver.receive(), (["WATCHDOG=1"], process.pid))
            process.send_signal(signal.SIGTERM)
            while True:
                message, pid = receiver.receive()
                if message != ["WATCHDOG=1"]:
                    break
            self.assertEqual((message, pid), (["STOPPING=1", "STATUS=stopping"], process.pid))
            output, _ = process.communicate(timeout=30)
            # twistd ends by the signal it was stopped with, which systemd
            # counts as a clean stop.
            self.assertEqual(process.returncode, -signal.SIGTERM, output.decode(errors="replace"))
        finally:
            if process.returncode is None:
                process.kill()
                process.communicate()
