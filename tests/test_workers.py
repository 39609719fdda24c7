"""
C{[server] workers}: the parent that binds and supervises (L{WorkerPool}),
the worker that adopts the sockets, the configuration's rules, and what
L{tap.buildService} builds for each; tests/test_workersdaemon.py runs the
whole daemon.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

from twisted.application import service
from twisted.internet import defer, error, protocol, reactor, threads
from twisted.internet.task import Clock
from twisted.logger import (
    Logger,
    LogPublisher,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python import log as legacylog
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailauth import checks, tap, workers
from mailauth import config as configmod
from mailauth.checks import Account
from mailauth.counters import MemoryCounterStore
from mailauth.logs import eventAsJSONLine
from mailauth.metrics import QUEUE_FAMILIES, Metrics
from mailauth.throttle import ConnectionLimiter
from mailauth.workerlink import (
    LogRelay,
    NodeConnections,
    NodeCounters,
    ParentConnections,
    WorkerLog,
)
from mailauth.workerproc import AdoptedPortService, Worker, readConfigText
from mailauth.workers import (
    CONFIG_FD,
    CONTROL_FD,
    FIRST_SOCKET_FD,
    LOG_FD,
    STDERR_FD,
    HeldPort,
    WorkerPool,
    readConfiguration,
    workerEnvironment,
)
from tests.harness import (
    ROOT,
    ClockedReactor,
    writeDaemonDirectory,
)

ABRT = signal.SIGABRT

LISTENERS = [
    ("submission", "tcp:0:interface=127.0.0.1"),
    ("submissions", "tcp:0:interface=127.0.0.1"),
]


class FakeProcess:
    """What C{spawnProcess} returns, recording what the pool does to it."""

    def __init__(self, proto, pid: int) -> None:
        self.proto = proto
        self.pid = pid
        self.signals: list = []
        self.written: list = []
        self.ended = False

    def writeToChild(self, fd: int, data: bytes) -> None:
        if self.ended:
            raise KeyError(fd)  # as Twisted's, once the pipe has closed
        self.written.append((fd, data))

    def signalProcess(self, name: str) -> None:
        if self.ended:
            raise error.ProcessExitedAlready()
        self.signals.append(name)

    def end(self, exitCode=0, signal=None) -> None:
        """The process ends: with C{exitCode}, or killed by C{signal}."""
        self.ended = True
        self.proto.processEnded(Failure(error.ProcessTerminated(exitCode, signal)))


class SpawningReactor(ClockedReactor):
    """Real sockets, a test-driven clock, and processes that are only recorded."""

    def __init__(self, clock) -> None:
        super().__init__(clock)
        self.spawned: list = []

    def spawnProcess(self, proto, executable, args, env=None, childFDs=None, **kwargs):
        process = FakeProcess(proto, 1000 + len(self.spawned))
        proto.makeConnection(process)
        self.spawned.append(
            dict(executable=executable, args=args, env=env, childFDs=childFDs, process=process)
        )
        return process


class WorkerPoolTests(unittest.TestCase):
    """The parent's side, with real sockets and recorded processes."""

    def setUp(self):
        self.clock = Clock()
        self.reactor = SpawningReactor(self.clock)
        self.events: list = []
        self.wakes: list = []
        self.stops: list = []
        # What the pool logs itself, through the global publisher.
        self.logged: list = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def makePool(self, count: int = 2, **kwargs) -> WorkerPool:
        self.held = [HeldPort(self.reactor, name, description) for name, description in LISTENERS]
        for held in self.held:
            held.privilegedStartService()
            self.addCleanup(held.stopService)
        pool = WorkerPool(
            self.reactor,
            count,
            self.held,
            "/etc/mailauth/mailauth.conf",
            "[server]\nworkers = 2\n",
            wakeQueue=lambda: self.wakes.append(1),
            stopDaemon=lambda: self.stops.append(1),
            publisher=self.events.append,
            environ={"PATH": "/usr/bin", "NOTIFY_SOCKET": "/run/x"},
            **kwargs,
        )
        pool.privilegedStartService()
        pool.startService()
        return pool

    def process(self, n: int) -> FakeProcess:
        return self.reactor.spawned[n]["process"]

    def ready(self, n: int) -> None:
        self.process(n).proto.childDataReceived(CONTROL_FD, b"ready\n")

    def twoSaying(self, first: bytes, second: bytes, **kwargs) -> tuple:
        """
        A pool of two serving workers (built with C{kwargs}) that have sent
        these control lines: the pool and the two worker processes.
        """
        pool = self.makePool(**kwargs)
        self.ready(0)
        self.ready(1)
        workers = self.process(0), self.process(1)
        for process, lines in zip(workers, (first, second)):
            process.proto.childDataReceived(CONTROL_FD, lines)
        return (pool, *workers)

    def test_bindsAndHoldsWithoutAccepting(self):
        """
        The parent binds every listener when privileged, and never accepts
        on them itself: connections wait in the accept queue for a worker.
        """
        self.makePool()
        self.assertEqual(
            [held.name for held in self.held], ["listener:submission", "listener:submissions"]
        )
        for port in [held.port for held in self.held]:
            self.assertNotIn(port, reactor.getReaders())
            client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
            client.close()

    def test_workersInheritTheSockets(self):
        """
        Each worker is C{python -m mailauth.workers}, given the listening
        sockets at descriptors 4 and up, named in its arguments, and pipes
        for the configuration, its log, its stderr and control lines.
        """
        self.makePool()
        self.assertEqual(len(self.reactor.spawned), 2)
        for index, spawned in enumerate(self.reactor.spawned, start=1):
            fds = spawned["childFDs"]
            self.assertEqual(
                {fd: fds[fd] for fd in (CONFIG_FD, LOG_FD, STDERR_FD, CONTROL_FD)},
                {0: "w", 1: "r", 2: "r", 3: "r"},
            )
            self.assertEqual(fds[FIRST_SOCKET_FD], self.held[0].port.fileno())
            self.assertEqual(fds[FIRST_SOCKET_FD + 1], self.held[1].port.fileno())
            self.assertEqual(
                spawned["args"][1:],
                [
                    "-m",
                    "mailauth.workers",
                    "--index",
                    str(index),
                    "--config",
                    "/etc/mailauth/mailauth.conf",
                    "--listener",
                    "submission=4",
                    "--listener",
                    "submissions=5",
                ],
            )

    def test_configurationOnStdin(self):
        """
        Each worker is given the configuration text the parent validated
        (its length, then the text), not left to read the file, which may
        have changed since.
        """
        self.makePool()
        text = b"[server]\nworkers = 2\n"
        self.assertEqual(self.process(0).written, [(CONFIG_FD, b"%d\n" % len(text) + text)])

    def test_environment(self):
        """Workers never see systemd's notification socket: only the parent may use it."""
        self.makePool(count=1)
        env = self.reactor.spawned[0]["env"]
        self.assertNotIn("NOTIFY_SOCKET", env)
        self.assertEqual(env["PATH"], "/usr/bin")

    def test_restartsAWorkerThatDies(self):
        """
        A worker that dies while the pool runs is started again after a
        second, on the same sockets; the others are left alone.
        """
        self.makePool()
        self.ready(0)
        self.ready(1)
        self.process(0).end(signal=signal.SIGKILL)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.clock.advance(1)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertEqual(self.reactor.spawned[2]["args"][3:5], ["--index", "1"])
        self.assertEqual(self.process(1).signals, [])
        self.assertEqual(self.stops, [])

    def test_deadWorkersLiveGaugesDropped(self):
        """
        With [metrics], a worker that dies takes its open-session gauge file
        with it (prometheus_client's C{mark_process_dead}), before it is
        replaced; its counters are folded into the ended workers' files
        (L{mailauth.metrics.foldEnded}), so the node's totals never go
        back, and the other worker's files are left alone.
        """
        folder = self.mktemp()
        os.mkdir(folder)
        parent = Metrics.prometheus(process=False, families=QUEUE_FAMILIES, workerFiles=folder)
        self.makePool(workerEnded=parent.workerEnded)
        self.ready(0)
        self.ready(1)
        dead, alive = self.process(0).pid, self.process(1).pid
        for pid in (dead, alive):
            for kind in ("counter", "histogram", "gauge_livesum"):
                open(os.path.join(folder, f"{kind}_{pid}.db"), "wb").close()
        self.process(0).end(signal=signal.SIGKILL)
        # (These counter files hold no counts: folding them is removing
        # them; tests.test_metricfiles folds real ones.)
        self.assertEqual(
            sorted(os.listdir(folder)),
            [f"counter_{alive}.db", f"gauge_livesum_{alive}.db", f"histogram_{alive}.db"],
        )
        self.clock.advance(1)
        self.assertEqual(len(self.reactor.spawned), 3)

    def test_backoffWhenDyingAgain(self):
        """
        A worker that dies again soon after it was started waits twice as
        long each time (at most 30 s); one that served a while waits 1 s.
        """
        pool = self.makePool(count=1)
        self.ready(0)
        delays = []
        for n in range(7):
            self.process(n).end(exitCode=1)
            start = len(self.reactor.spawned)
            waited = 0.0
            while len(self.reactor.spawned) == start:
                self.clock.advance(0.5)
                waited += 0.5
            delays.append(waited)
            self.ready(n + 1)
        self.assertEqual(delays, [1, 2, 4, 8, 16, 30, 30])
        self.clock.advance(pool.stableAfter)
        self.process(7).end(exitCode=1)
        self.clock.advance(1)
        self.assertEqual(len(self.reactor.spawned), 9)

    def test_pidOfAWorkerReapedAtOnce(self):
        """
        A worker that dies the moment it starts is reaped inside
        spawnProcess, whose process then has no pid any more: the pool
        keeps the one its protocol saw when it connected, for the log.
        """
        spawn = self.reactor.spawnProcess

        def reapedAtOnce(*args, **kwargs):
            process = spawn(*args, **kwargs)
            process.pid = None
            return process

        self.reactor.spawnProcess = reapedAtOnce  # type: ignore[method-assign]
        pool = self.makePool(count=1)
        self.assertIn("worker 1 started (pid 1000)", [formatEvent(e) for e in self.logged])
        self.assertEqual(pool.slots[0].pid, 1000)

    def test_workerThatNeverServesStopsTheDaemon(self):
        """
        A worker that ends before any worker could serve (a key its user
        cannot read) stops the daemon instead of restarting forever, and
        the log says why.
        """
        pool = self.makePool()
        readiness = []
        pool._waitingForPort.addCallback(readiness.append)
        self.process(0).proto.childDataReceived(STDERR_FD, b"PermissionError: key.pem\n")
        self.process(0).end(exitCode=1)
        self.clock.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(self.stops, [1])
        self.assertEqual(readiness, [None])
        texts = [formatEvent(e) for e in self.logged]
        self.assertTrue(any("PermissionError: key.pem" in t for t in texts), texts)
        self.assertTrue(any("before it could serve; stopping mailauth" in t for t in texts), texts)

    def test_readyOnceEveryWorkerServes(self):
        """
        The readiness systemd is told of waits for every worker to say it
        serves.
        """
        pool = self.makePool()
        readiness = []
        pool._waitingForPort.addCallback(readiness.append)
        self.ready(0)
        self.assertEqual(readiness, [])
        self.ready(1)
        self.assertEqual(readiness, [True])

    def test_wakeReachesTheQueue(self):
        """A worker's C{wake} line (it queued a message) wakes the parent's queue runner."""
        self.makePool()
        self.process(1).proto.childDataReceived(CONTROL_FD, b"wa")
        self.assertEqual(self.wakes, [])
        self.process(1).proto.childDataReceived(CONTROL_FD, b"ke\nwake\n")
        self.assertEqual(self.wakes, [1, 1])

    def test_connectionsCountedForTheNode(self):
        """
        A worker's C{admit} line is answered on its configuration pipe from
        the one count the parent keeps for every worker; a worker that ends
        gives back every connection it held, its releases never another's.
        """
        pool, first, second = self.twoSaying(
            b"admit 1 192.0.2.1\nadmit 2 192.0.2.2\n",
            b"admit 1 192.0.2.1\nrelease 192.0.2.2\n",
            connections=NodeConnections(ConnectionLimiter(10, 1)),
        )
        self.assertEqual(first.written[1:], [(CONFIG_FD, b"1 ok\n"), (CONFIG_FD, b"2 ok\n")])
        self.assertEqual(second.written[1:], [(CONFIG_FD, b"1 too_many_from_address\n")])
        self.assertEqual(pool.connections.limiter.count, 2)
        first.end(signal=signal.SIGKILL)
        self.assertEqual(pool.connections.limiter.count, 0)
        second.proto.childDataReceived(CONTROL_FD, b"admit 2 192.0.2.1\n")
        self.assertEqual(second.written[2:], [(CONFIG_FD, b"2 ok\n")])
        # A request cut short by its worker's end is not answered, nor kept.
        second.proto.childDataReceived(CONTROL_FD, b"admit 3 192.0.2.")
        second.end(signal=signal.SIGKILL)
        self.assertEqual(second.written[3:], [])
        self.assertEqual(pool.connections.limiter.count, 0)
        self.clock.advance(1)
        self.assertEqual(len(self.reactor.spawned), 4)

    def test_countersKeptForTheNode(self):
        """
        A worker's counter lines (Redis down) are answered on its
        configuration pipe from the counters the parent keeps for every
        worker, which outlive a worker that ends.
        """
        pool, first, second = self.twoSaying(
            b"count k1 a 60.0 2\nblock k2 a 900.0\n",
            b"count k1 a 60.0 1\nblocked k2 a\n",
            counters=NodeCounters(MemoryCounterStore(self.clock)),
        )
        self.assertEqual(first.written[1:], [(CONFIG_FD, b"k1 2\n"), (CONFIG_FD, b"k2 1\n")])
        self.assertEqual(second.written[1:], [(CONFIG_FD, b"k1 3\n"), (CONFIG_FD, b"k2 900000\n")])
        first.end(signal=signal.SIGKILL)
        second.proto.childDataReceived(CONTROL_FD, b"count k3 a 60.0 0\n")
        self.assertEqual(second.written[3:], [(CONFIG_FD, b"k3 3\n")])
        self.assertEqual(pool.counters.store.count("a", 60), 3)

    def test_reloadForwarded(self):
        """
        L{WorkerPool.reloadWorkers} sends SIGHUP to every worker that
        serves; one still starting (whose handler is not set yet: SIGHUP
        would kill it) gets it once it says it serves.
        """
        pool = self.makePool()
        self.ready(0)
        pool.reloadWorkers()
        self.assertEqual([self.process(n).signals for n in (0, 1)], [["HUP"], []])
        self.ready(1)
        self.assertEqual([self.process(n).signals for n in (0, 1)], [["HUP"], ["HUP"]])
        self.ready(1)
        self.assertEqual(self.process(1).signals, ["HUP"])

    def test_logRelayedUnchanged(self):
        """
        A worker's log events, split anywhere across reads, are published in
        the parent's log so that each line reads exactly as one process
        writes it (the fail2ban filter's C{[mailauth.esmtp#info] auth
        failure: ...} included) but for the worker's number in the bracket:
        fields, braces in the text, Twisted's own legacy lines, and
        tracebacks.
        """
        self.makePool()
        out = io.StringIO()
        original = self._workerEvents(LogRelay(out))
        data = out.getvalue().encode("utf-8")
        proto = self.process(0).proto
        for start in range(0, len(data), 7):
            proto.childDataReceived(LOG_FD, data[start : start + 7])
        # Each line reads as the worker wrote it, its bracket naming the worker.
        self.assertEqual(
            [formatEventAsClassicLogText(e) for e in self.events],
            [
                re.sub(r"^(\S+ \[[^]]*)\]", r"\1 worker=1]", formatEventAsClassicLogText(e))
                for e in original
            ],
        )
        self.assertIn("ZeroDivisionError", formatEventAsClassicLogText(self.events[2]))
        self.assertRegex(
            formatEventAsClassicLogText(self.events[0]),
            r"^\S+ \[mailauth\.esmtp#info worker=1\] auth failure: "
            r"client=\[192\.0\.2\.7\] mechanism=PLAIN",
        )
        self.assertRegex(
            formatEventAsClassicLogText(self.events[4]),
            r"^\S+ \[- worker=1\] SubmissionFactory starting on 2587",
        )
        self.assertEqual([e["log_worker"] for e in self.events], [1, 1, 1, 1, 1])

    def test_brokenLogRecord(self):
        """A log record that is not JSON is logged as such, and the next one still arrives."""
        self.makePool()
        out = io.StringIO()
        Logger(observer=LogRelay(out)).info("after")
        self.process(0).proto.childDataReceived(
            LOG_FD, b"not json\nL[1]\nJ{\n" + out.getvalue().encode()
        )
        self.assertEqual([formatEvent(e) for e in self.events], ["after"])
        self.assertEqual(len([e for e in self.logged if "is not JSON" in e["log_format"]]), 3)

    def test_logRelayedWithEveryField(self):
        """
        With C{[server] log_format = json} a worker relays every field of
        an event, so the parent's JSON lines carry them (C{client},
        C{login}...) as one process's do.
        """
        self.makePool()
        original: list = []
        out = io.StringIO()
        relay = LogRelay(out, full=True)

        def both(event):
            original.append(event)
            relay(event)

        Logger(namespace="mailauth.esmtp", observer=both).info(
            "auth failure: client=[{client}] mechanism={mechanism} login=<{login}>",
            client="192.0.2.7",
            mechanism="PLAIN",
            login="bob@example.test",
        )
        self.process(0).proto.childDataReceived(LOG_FD, out.getvalue().encode())
        [relayed] = self.events
        line = json.loads(eventAsJSONLine(relayed))
        self.assertEqual(
            (line["client"], line["login"], line["log_worker"]),
            ("192.0.2.7", "bob@example.test", 1),
        )
        self.assertEqual(line["log_text"], json.loads(eventAsJSONLine(original[0]))["log_text"])
        self.assertEqual(
            formatEventAsClassicLogText(relayed), formatEventAsClassicLogText(original[0])
        )

    def _workerEvents(self, observer) -> list:
        """
        Log through C{observer} what a worker logs: fields, braces in the
        text, a traceback, non-ASCII text, and Twisted's own legacy lines;
        the events.
        """
        original: list = []

        def both(event):
            original.append(event)
            observer(event)

        logger = Logger(namespace="mailauth.esmtp", observer=both)
        logger.info(
            "auth failure: client=[{client}] mechanism={mechanism} login=<{login}>",
            client="192.0.2.7",
            mechanism="PLAIN",
            login="bob@example.test",
        )
        logger.warn("braces {text} stay", text="{not a field}")
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            logger.failure("it broke for {who}", who="us")
        logger.info("login=<{login}>", login="jörg@bücher.example")
        legacylog.LogPublisher(publishPublisher=LogPublisher(both)).msg(
            "SubmissionFactory starting on 2587", system="-"
        )
        return original

    def test_ownLogSameLinesAsRelayed(self):
        """
        A worker writing its own lines (L{WorkerLog}, when the parent logs
        to the standard output they share) writes each line exactly as the
        parent writes that event relayed to it, bracket and traceback
        included: one log, whichever way a line came.
        """
        self.makePool()
        relayed, own = io.StringIO(), io.StringIO()
        # From one line: older Twisted's tracebacks show the caller's too.
        for observer in (LogRelay(relayed), WorkerLog(own, 1)):
            self._workerEvents(observer)
        self.process(0).proto.childDataReceived(LOG_FD, relayed.getvalue().encode("utf-8"))
        parent = io.StringIO()
        parentLog = textFileLogObserver(parent)
        for event in self.events:
            parentLog(event)
        lines = own.getvalue().splitlines()
        self.assertEqual(lines, parent.getvalue().splitlines())
        self.assertRegex(
            lines[0],
            r"^\S+ \[mailauth\.esmtp#info worker=1\] auth failure: client=\[192\.0\.2\.7\]",
        )
        self.assertIn("ZeroDivisionError", own.getvalue())
        self.assertRegex(lines[-1], r"^\S+ \[- worker=1\] SubmissionFactory starting on 2587$")
        self.assertIn("login=<jörg@bücher.example>", own.getvalue())

    def test_ownLogWithEveryField(self):
        """
        With C{[server] log_format = json} a worker writing its own lines
        writes each event's JSON line with every field and C{log_worker},
        as the parent writes a relayed one.
        """
        out = io.StringIO()
        [original, *_] = self._workerEvents(WorkerLog(out, 2, full=True))
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(len(lines), 5)
        self.assertEqual(
            (lines[0]["client"], lines[0]["login"], lines[0]["log_worker"]),
            ("192.0.2.7", "bob@example.test", 2),
        )
        self.assertEqual(lines[0], json.loads(eventAsJSONLine(dict(original, log_worker=2))))
        self.assertIn("ZeroDivisionError", lines[2]["log_text"])

    def test_ownLogGivenToWorkers(self):
        """
        With C{ownLog}, the descriptor the parent logs to is each worker's
        standard output, and the worker is told to write its lines there.
        """
        self.makePool(count=1, ownLog=1)
        [spawned] = self.reactor.spawned
        self.assertEqual(spawned["childFDs"][LOG_FD], 1)
        self.assertIn("--own-log", spawned["args"])

    def test_logRelayedByDefault(self):
        """Without C{ownLog}, a worker's standard output is a pipe the parent reads."""
        self.makePool(count=1)
        [spawned] = self.reactor.spawned
        self.assertEqual(spawned["childFDs"][LOG_FD], "r")
        self.assertNotIn("--own-log", spawned["args"])

    def test_stopTerminatesThenKills(self):
        """
        Stopping sends each worker SIGTERM and waits for them; one that has
        not ended after C{stopTimeout} gets SIGKILL; nothing is restarted.
        """
        pool = self.makePool()
        self.ready(0)
        self.ready(1)
        stopped = []
        pool.stopService().addCallback(stopped.append)
        self.assertEqual([self.process(n).signals for n in (0, 1)], [["TERM"], ["TERM"]])
        self.process(0).end(exitCode=0)
        self.assertEqual(stopped, [])
        self.clock.advance(pool.stopTimeout)
        self.assertEqual(self.process(1).signals, ["TERM", "KILL"])
        self.process(1).end(signal=signal.SIGKILL)
        self.assertEqual(stopped, [None])
        self.clock.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_stopCancelsARestart(self):
        """A worker waiting to be started again is not started once the pool stops."""
        pool = self.makePool()
        self.ready(0)
        self.ready(1)
        self.process(0).end(signal=signal.SIGSEGV)
        d = pool.stopService()
        self.process(1).end(exitCode=0)
        self.assertIsNone(self.successResultOf(d))
        self.clock.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)

    def alive(self, n: int) -> None:
        self.process(n).proto.childDataReceived(CONTROL_FD, b"alive\n")

    def hangLines(self) -> list:
        """What the pool logged about hung workers."""
        return [
            formatEvent(e)
            for e in self.logged
            if e.get("log_namespace") == "mailauth.workers" and "SIGABRT" in formatEvent(e)
        ]

    def test_hungWorkerAborted(self):
        """
        A serving worker that says nothing for C{hangTimeout} gets SIGABRT
        (its stacks go to its stderr), one error line, and SIGKILL if it
        has not ended C{stopTimeout} later; it is then started again. The
        worker that keeps saying C{alive} is left alone.
        """
        pool = self.makePool(hangTimeout=30)
        self.ready(0)
        self.ready(1)

        def advance(seconds):
            # Worker 2 says alive every 5 s, as its event loop would.
            for _ in range(int(seconds // 5)):
                self.clock.advance(5)
                self.alive(1)

        advance(30)
        self.assertEqual(self.process(0).signals, [])
        advance(10)
        self.assertEqual(self.process(0).signals, [ABRT])
        [line] = self.hangLines()
        self.assertEqual(
            line,
            "worker 1 (pid 1000) has said nothing for 40 s: its event loop hangs; "
            "aborting it (SIGABRT: its threads' stacks follow)",
        )
        advance(pool.stopTimeout - 5)
        # No second SIGABRT while it is being aborted.
        self.assertEqual(self.process(0).signals, [ABRT])
        advance(5)
        self.assertEqual(self.process(0).signals, [ABRT, "KILL"])
        self.assertEqual(
            self.hangLines()[1:], ["worker 1 (pid 1000) did not end 10 s after SIGABRT: killing it"]
        )
        advance(60)
        self.assertEqual(self.process(0).signals, [ABRT, "KILL"])
        self.process(0).end(signal=signal.SIGKILL)
        advance(5)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertEqual(self.reactor.spawned[2]["args"][3:5], ["--index", "1"])
        self.assertEqual(self.process(1).signals, [])
        self.assertEqual(self.stops, [])
        self.assertEqual(len(self.hangLines()), 2)

    def tick(self, seconds: float, alive=()) -> None:
        """Let C{seconds} pass 5 s at a time, the workers C{alive} saying so each time."""
        for _ in range(int(seconds // 5)):
            self.clock.advance(5)
            for n in alive:
                self.alive(n)

    def test_abortedWorkerEnds(self):
        """A hung worker that dies of its SIGABRT is started again and never gets SIGKILL."""
        pool = self.makePool(count=1, hangTimeout=30)
        self.ready(0)
        self.tick(40)
        self.assertEqual(self.process(0).signals, [ABRT])
        self.process(0).end(signal=signal.SIGABRT)
        self.tick(pool.stopTimeout)
        self.assertEqual(self.process(0).signals, [ABRT])
        self.assertEqual(len(self.reactor.spawned), 2)
        # The new worker is watched afresh once it serves.
        self.ready(1)
        self.tick(30)
        self.assertEqual(self.process(1).signals, [])
        self.tick(10)
        self.assertEqual(self.process(1).signals, [ABRT])

    def test_anyControlLineCounts(self):
        """C{wake} lines are as good as C{alive}: a worker busy queueing mail is not hung."""
        self.makePool(count=1, hangTimeout=30)
        self.ready(0)
        for _ in range(20):
            self.tick(10)
            self.process(0).proto.childDataReceived(CONTROL_FD, b"wake\n")
        self.assertEqual(self.process(0).signals, [])

    def test_startingWorkerGivenAMinute(self):
        """
        A worker still starting (it only sends C{alive} once it serves) has
        L{WorkerPool.startTimeout}, a minute, to start serving: reading a
        large users file takes seconds. One that has not by then hangs (a
        users file on a hung mount): it is aborted as a serving one is, and
        then started again, instead of leaving its slot empty for good.
        """
        pool = self.makePool(count=1, hangTimeout=30)
        self.assertEqual(pool.startTimeout, 60)
        self.tick(60)
        self.assertEqual(self.process(0).signals, [])
        self.tick(10)
        self.assertEqual(self.process(0).signals, [ABRT])
        self.assertEqual(
            self.hangLines(),
            [
                "worker 1 (pid 1000) has not started serving 70 s after it was started: "
                "it hangs; aborting it (SIGABRT: its threads' stacks follow)"
            ],
        )

    def test_startTimeoutAtLeastTheHangTimeout(self):
        """A C{worker_timeout} longer than a minute is the start's deadline too."""
        self.makePool(count=1, hangTimeout=300)
        self.tick(300)
        self.assertEqual(self.process(0).signals, [])
        self.tick(100)
        self.assertEqual(self.process(0).signals, [ABRT])

    def test_noHangTimeout(self):
        """With C{hangTimeout} 0 (C{worker_timeout = 0}), a silent worker is never aborted."""
        self.makePool(count=1, hangTimeout=0)
        self.ready(0)
        self.tick(3600)
        self.assertEqual(self.process(0).signals, [])

    def test_parentHeldUp(self):
        """
        When the check itself comes late (the parent was held up, or the
        clock jumped ahead), what the workers said meanwhile may be unread:
        none is aborted, and silence counts from then.
        """
        self.makePool(hangTimeout=30)
        self.ready(0)
        self.ready(1)
        self.clock.advance(100)
        self.assertEqual([self.process(n).signals for n in (0, 1)], [[], []])
        self.tick(30, alive=(1,))
        self.assertEqual([self.process(n).signals for n in (0, 1)], [[], []])
        self.tick(10, alive=(1,))
        self.assertEqual([self.process(n).signals for n in (0, 1)], [[ABRT], []])

    def test_stopCancelsTheKill(self):
        """
        Stopping the pool while a hung worker is being aborted leaves the
        rest to the stop: SIGTERM, then one SIGKILL after C{stopTimeout}.
        """
        pool = self.makePool(count=1, hangTimeout=30)
        self.ready(0)
        self.tick(40)
        pool.stopService()
        self.clock.advance(pool.stopTimeout)
        self.assertEqual(self.process(0).signals, [ABRT, "TERM", "KILL"])
        self.clock.advance(pool.stopTimeout)
        self.assertEqual(self.process(0).signals, [ABRT, "TERM", "KILL"])

    def test_heldPortCloses(self):
        """A held socket is closed when its service stops: the port is free again."""
        held = HeldPort(self.reactor, "submission", LISTENERS[0][1])
        held.privilegedStartService()
        address = held.port.getHost()

        def free(_):
            with socket.socket() as s:
                s.bind((address.host, address.port))

        return defer.maybeDeferred(held.stopService).addCallback(free)


class WorkerSideTests(unittest.TestCase):
    """The worker's side: the adopted sockets and the configuration pipe."""

    def adoptAndTalk(self, family, address):
        """
        Adopt a listening socket of C{family} bound to C{address} as a
        worker does; talk to it; stop; the parent's copy must still listen.
        """
        parent = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(parent.close)
        parent.bind(address)
        parent.listen(5)
        parent.setblocking(False)
        factory = protocol.Factory.forProtocol(lambda: _Greeter())
        svc = Worker(1, {"submission": os.dup(parent.fileno())}, lambda: None).listen(
            "submission", factory, reactor
        )
        self.assertIsInstance(svc, AdoptedPortService)
        self.assertEqual(svc.name, "listener:submission")
        svc.startService()

        def connect():
            client = socket.socket(family, socket.SOCK_STREAM)
            client.settimeout(5)
            client.connect(parent.getsockname())
            return client

        def talk():
            with connect() as c:
                return c.recv(100)

        d = threads.deferToThread(talk)
        d.addCallback(self.assertEqual, b"hello\r\n")
        d.addCallback(lambda _: svc.stopService())
        # The parent's socket still listens: a connection waits in its queue.
        return d.addCallback(lambda _: connect().close())

    def test_adoptedSocketServes(self):
        """
        A worker serves an inherited listening socket with the factory it
        is given, and closes its copy on stop while the parent's stays open
        for the other workers.
        """
        return self.adoptAndTalk(socket.AF_INET, ("127.0.0.1", 0))

    def test_adoptedIPv6(self):
        """An inherited IPv6 socket (C{tcp6:}) is adopted as IPv6."""
        return self.adoptAndTalk(socket.AF_INET6, ("::1", 0))

    def test_adoptedUnix(self):
        """An inherited UNIX socket (C{unix:}) is adopted as one."""
        folder = tempfile.mkdtemp(prefix="w-")  # a socket path holds ~100 bytes
        self.addCleanup(shutil.rmtree, folder)
        return self.adoptAndTalk(socket.AF_UNIX, os.path.join(folder, "s"))

    def test_configurationText(self):
        """The worker reads exactly the text the parent wrote, however the pipe splits it."""
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        text = "[server]\nhostname = é.example\n" * 1000
        data = text.encode("utf-8")
        writer = threading.Thread(
            target=lambda: (os.write(w, b"%d\n" % len(data) + data), os.close(w))
        )
        writer.start()
        self.assertEqual(readConfigText(r), text)
        writer.join()

    def test_configurationCutShort(self):
        """A parent that dies while writing the configuration is a clear exit, not a hang."""
        for payload in (b"", b"12", b"100\n[server]\n"):
            r, w = os.pipe()
            os.write(w, payload)
            os.close(w)
            with self.assertRaises(SystemExit) as caught:
                readConfigText(r)
            os.close(r)
            self.assertIn("mailauth worker: ", str(caught.exception))


class _Greeter(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"hello\r\n")
        self.transport.loseConnection()


class ConfigurationTests(unittest.TestCase):
    """C{[server] workers} in the configuration."""

    BASE = """
[listener:submission]
endpoint = tcp:587
tls = none
[auth]
users = /etc/mailauth/users
[delivery]
local_domains = example.test
maildir = /var/mail/{domain}/{localpart}/Maildir
"""

    def load(self, text: str):
        return configmod.loadText(self.BASE + text, "/etc/mailauth/mailauth.conf")

    def problems(self, text: str) -> list:
        with self.assertRaises(configmod.ConfigError) as caught:
            self.load(text)
        return list(caught.exception.problems)

    def test_defaultOne(self):
        """Without the key there is one process, as before."""
        self.assertEqual(self.load("").server.workers, 1)

    def test_needsSharedCounters(self):
        """
        More than one worker with the counters in memory is one line naming
        the file, the section and the key: each process would count apart.
        """
        self.assertEqual(
            self.problems("[server]\nworkers = 2\n"),
            [
                "/etc/mailauth/mailauth.conf: [server] workers: 2 processes would each keep "
                "their own throttle counters with [state] backend = memory: set backend = "
                "redis://HOST:6379/0, or workers = 1"
            ],
        )

    def test_withRedis(self):
        """With the counters in Redis, any number of workers is fine."""
        cfg = self.load("[server]\nworkers = 4\n[state]\nbackend = redis://127.0.0.1:6379/0\n")
        self.assertEqual(cfg.server.workers, 4)

    def test_notANumber(self):
        """Zero, negative and non-numbers are refused."""
        for value in ("0", "-1", "two"):
            [problem] = self.problems(f"[server]\nworkers = {value}\n")
            self.assertIn("[server] workers: ", problem)

    def test_workerTimeout(self):
        """C{worker_timeout}: 30 s by default, a duration, 0 for never."""
        self.assertEqual(self.load("").server.worker_timeout, 30)
        self.assertEqual(self.load("[server]\nworker_timeout = 2m\n").server.worker_timeout, 120)
        self.assertEqual(self.load("[server]\nworker_timeout = 0\n").server.worker_timeout, 0)
        [problem] = self.problems("[server]\nworker_timeout = soon\n")
        self.assertIn("[server] worker_timeout: ", problem)

    def test_metricsWithWorkers(self):
        """[metrics] with workers is fine: the parent serves every worker's counts."""
        cfg = self.load(
            "[server]\nworkers = 2\n[state]\nbackend = redis://h:6379/0\n"
            "[metrics]\nendpoint = tcp:9587:interface=127.0.0.1\n"
        )
        self.assertEqual(
            (cfg.server.workers, cfg.metrics.endpoint), (2, "tcp:9587:interface=127.0.0.1")
        )


class BuildTests(unittest.TestCase):
    """What L{tap.buildService} builds for one process, a parent and a worker."""

    def build(self, settings: dict, worker=None):
        directory = self.mktemp()
        settings = dict(settings, relay={"host": "relay.example.test", "port": "2525"})
        path = writeDaemonDirectory(directory, settings)
        return tap.buildService(configmod.load(path), reactor, worker=worker)

    def names(self, top) -> set:
        return {s.name for s in top}

    def test_oneProcess(self):
        """C{workers = 1}: listeners and the queue in this process, as always; no pool."""
        names = self.names(self.build({}))
        self.assertTrue({"listener:submission", "listener:submissions", "queue"} <= names)
        self.assertNotIn("workers", names)

    def test_parent(self):
        """
        C{workers = 2}: the parent has the pool and the queue's runner, and
        holds the listeners' sockets without serving them itself.
        """
        top = self.build(
            {"server": {"workers": "2"}, "state": {"backend": "redis://127.0.0.1:6379/0"}}
        )
        names = self.names(top)
        self.assertIn("workers", names)
        self.assertIn("queue", names)
        pool = top.getServiceNamed("workers")
        self.assertEqual(
            [held.name for held in pool.listeners], ["listener:submission", "listener:submissions"]
        )
        for held in pool.listeners:
            self.assertIs(top.getServiceNamed(held.name), held)
            self.assertIsInstance(held, HeldPort)
        # The node's connection limits are counted here, for every worker.
        self.assertIsInstance(pool.connections, NodeConnections)
        self.assertEqual(
            (pool.connections.limiter.total, pool.connections.limiter.perAddress), (500, 20)
        )

    def test_parentServesTheWorkersMetrics(self):
        """
        With [metrics], the parent serves them, from a folder of the state
        directory it empties of an earlier run's counts once it listens
        (not before: a second daemon that cannot listen must not empty a
        running one's), and names that folder in the workers' environment;
        it drops the open-session gauges of a worker that ends.
        """
        settings = {
            "server": {"workers": "2"},
            "state": {"backend": "redis://127.0.0.1:6379/0"},
            "metrics": {"endpoint": "tcp:0:interface=127.0.0.1"},
        }
        cfg = configmod.load(writeDaemonDirectory(self.mktemp(), settings))
        folder = os.path.join(cfg.server.state_dir, "metrics")
        os.makedirs(folder)
        open(os.path.join(folder, "counter_1.db"), "wb").close()
        top = tap.buildService(cfg, reactor, environ={"PATH": "/usr/bin"})
        self.assertIn("metrics", self.names(top))
        self.assertEqual(os.listdir(folder), ["counter_1.db"])
        # Emptied as it starts, before the workers do.
        names = [s.name for s in top]
        self.assertLess(names.index("metrics-files"), names.index("workers"))
        top.getServiceNamed("metrics-files").startService()
        self.assertEqual(os.listdir(folder), [])
        pool = top.getServiceNamed("workers")
        self.assertEqual(pool.environ["PROMETHEUS_MULTIPROC_DIR"], folder)
        # A worker's live gauge file goes with it; its counters are folded
        # into the ended workers' (this file holds none: it just goes).
        for name in ("gauge_livesum_4242.db", "counter_4242.db"):
            open(os.path.join(folder, name), "wb").close()
        pool.workerEnded(4242)
        self.assertEqual(os.listdir(folder), [])

    def test_workerKeepsItsMetricsForTheParent(self):
        """
        A worker with [metrics] serves none: it counts into the folder its
        environment names, and refuses to start without one.
        """
        settings = {
            "server": {"workers": "2"},
            "state": {"backend": "redis://127.0.0.1:6379/0"},
            "metrics": {"endpoint": "tcp:0:interface=127.0.0.1"},
        }
        worker = Worker(1, {"submission": 4, "submissions": 5}, lambda: None)
        self.patch(os, "environ", {"PATH": "/usr/bin"})
        self.assertRaises(RuntimeError, self.build, settings, worker)
        self.patch(os, "environ", {"PATH": "/usr/bin", "PROMETHEUS_MULTIPROC_DIR": self.mktemp()})
        self.assertNotIn("metrics", self.names(self.build(settings, worker)))

    def test_stopFailedExitsWithOne(self):
        """
        L{tap.stopFailed}, which the pool of a parent is given, stops the
        reactor and has the process exit with status 1 once it ends (twistd
        would return 0), after flushing what it wrote.
        """
        registered: list = []
        self.patch(tap.atexit, "register", lambda *args: registered.append(args))
        stops: list = []

        class FakeReactor:
            def stop(self) -> None:
                stops.append(True)

        tap.stopFailed(FakeReactor())()
        self.assertEqual((stops, registered), ([True], [(tap._exitWithStatusOne, None)]))
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                "import atexit; from mailauth import tap; "
                "atexit.register(tap._exitWithStatusOne); print('written before the end')",
            ],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=ROOT),
            timeout=60,
        )
        self.assertEqual((child.returncode, child.stdout), (1, "written before the end\n"))

    def startReport(self):
        """A L{tap._StartReport} started on a real pipe, as a daemon's; and its read end."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        options = {"statusPipe": write}
        pool = service.Service()
        pool._waitingForPort = defer.Deferred()  # type: ignore[attr-defined]
        report = tap._StartReport(options, pool)
        report.startService()
        self.assertIsNone(options["statusPipe"])  # twistd no longer writes its 0
        return report, pool, read

    def test_startReportedOnceWorkersServe(self):
        """
        As a daemon, twistd's first process hears C{0} (started) only once
        every worker serves, not when the services have started.
        """
        report, pool, read = self.startReport()
        os.set_blocking(read, False)
        self.assertRaises(BlockingIOError, os.read, read, 100)
        pool._waitingForPort.callback(True)
        self.assertEqual(os.read(read, 100), b"0")
        report.stopService()
        self.assertEqual(os.read(read, 100), b"")  # closed, nothing more

    def test_startReportedFailedWhenStoppedFirst(self):
        """Stopped before the workers serve: C{1} and why, which twistd prints."""
        report, pool, read = self.startReport()
        report.stopService()
        self.assertEqual(os.read(read, 100), b"1 stopped before every worker served: see the log")

    def test_startReportedFailedAtExit(self):
        """
        When no worker could start, the answer waits for the exit hook
        (after twistd removed its pid file), and says so.
        """
        report, pool, read = self.startReport()
        registered: list = []
        self.patch(tap.atexit, "register", lambda *args: registered.append(args))

        class FakeReactor:
            def stop(self) -> None:
                report.stopService()

        tap.stopFailed(FakeReactor(), report)()
        os.set_blocking(read, False)
        self.assertRaises(BlockingIOError, os.read, read, 100)
        self.assertEqual(registered, [(tap._exitWithStatusOne, report)])
        self.patch(tap.os, "_exit", lambda status: None)
        self.patch(logging, "shutdown", lambda: None)  # trial's own logging stays
        tap._exitWithStatusOne(report)
        self.assertEqual(os.read(read, 100), b"1 no worker could start: see the log")

    def test_parentCannotListen(self):
        """
        A port the parent cannot bind stops mailauth with the one line a
        single process gives: file, listener, endpoint and why.
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        endpoint = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        top = self.build(
            {
                "server": {"workers": "2"},
                "state": {"backend": "redis://127.0.0.1:6379/0"},
                "listener:submissions": {"endpoint": endpoint},
            }
        )
        exits = []

        def exit(line, short):
            exits.append(line)
            raise SystemExit(1)

        top.exit = exit
        self.assertRaises(SystemExit, top.privilegedStartService)
        self.addCleanup(top.getServiceNamed("listener:submission").stopService)
        self.assertEqual(
            exits,
            [
                f"{top.path}: [listener:submissions] endpoint: "
                f"{endpoint!r}: cannot listen: Address already in use"
            ],
        )

    def test_worker(self):
        """
        A worker serves its inherited sockets and has no queue runner: it
        wakes the parent's instead.
        """
        asked = ParentConnections(lambda line: None)
        worker = Worker(1, {"submission": 4, "submissions": 5}, lambda: None, asked)
        top = self.build(
            {"server": {"workers": "2"}, "state": {"backend": "redis://127.0.0.1:6379/0"}}, worker
        )
        names = self.names(top)
        self.assertNotIn("queue", names)
        self.assertNotIn("workers", names)
        self.assertEqual(top.getServiceNamed("listener:submissions").fd, 5)
        # Its sessions ask the parent to count their connections.
        for name in ("listener:submission", "listener:submissions"):
            factory = top.getServiceNamed(name).factory
            self.assertIs(getattr(factory, "wrappedFactory", factory).connections, asked)

    def test_configurationChanged(self):
        """The parent refuses to start workers on a file that changed since it was checked."""
        path = writeDaemonDirectory(self.mktemp())
        cfg = configmod.load(path)
        self.assertEqual(readConfiguration(path, cfg), open(path).read())
        with open(path, "a") as f:
            f.write("[server]\nmax_recipients = 7\n")
        self.assertRaises(SystemExit, readConfiguration, path, cfg)

    def test_workerEnvironment(self):
        """The workers can import this copy of mailauth, and inherit no systemd sockets."""
        env = workerEnvironment({"LISTEN_FDS": "2", "LISTEN_PID": "1", "HOME": "/root"})
        self.assertEqual(set(env) - {"PYTHONPATH"}, {"HOME"})
        script = "import mailauth.workers, sys; print(mailauth.workers.__file__)"
        out = subprocess.run(
            [sys.executable, "-c", script],
            env=dict(env, PATH=os.environ["PATH"]),
            cwd="/",
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        self.assertEqual(out.strip(), workers.__file__)


class ReadableTests(unittest.TestCase):
    """What C{check-config --uid} (and twistd's start) says of files with workers."""

    def test_unreadableIsAnError(self):
        """
        A file the daemon's user cannot read is an error with workers (they
        read it when they start) and a warning with one process (only a
        reload reads it as that user).
        """
        found = {}
        for count in ("1", "2"):
            path = writeDaemonDirectory(
                os.path.join(self.mktemp(), "d"),
                {"server": {"workers": count}, "state": {"backend": "redis://127.0.0.1:6379/0"}},
            )
            folder = os.path.dirname(path)
            for _ in range(3):  # up to mktemp's own folder, made 0700
                os.chmod(folder, 0o755)
                folder = os.path.dirname(folder)
            for name, mode in (
                ("users", 0o644),
                ("tls/cert.pem", 0o644),
                ("tls", 0o755),
                ("tls/key.pem", 0o600),
            ):
                os.chmod(os.path.join(os.path.dirname(path), name), mode)
            stranger = Account("stranger", os.geteuid() + 12345, 54321)
            found[count] = checks.checkReadable(configmod.load(path), stranger, chown=True)
        self.assertEqual(found["1"].errors, ())
        self.assertEqual(len(found["1"].warnings), 1)
        self.assertIn("[tls] private_key: ", found["1"].warnings[0])
        self.assertEqual(found["2"].warnings, ())
        [error] = found["2"].errors
        self.assertTrue(
            error.endswith(
                "key.pem: user stranger (uid "
                f"{os.geteuid() + 12345}) cannot read it, and the "
                "workers ([server] workers = 2) read it as that user"
            ),
            error,
        )
