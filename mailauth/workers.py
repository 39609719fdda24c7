"""
C{[server] workers = N}: the listeners served by N processes, so that one
node uses all its cores.

The parent (C{twistd mailauth}) binds every listening socket itself, in
C{privilegedStartService}, while it may still be root: twistd's C{--uid} and
C{--gid} drop privileges after that, and the workers it then starts run as
that user. Each worker is C{python -m mailauth.workers}, started with
C{spawnProcess}, whose code is in L{mailauth.workerproc}; this module is
the parent's side. The worker inherits the sockets and adopts them
(C{adoptStreamPort}), so every worker accepts from the same accept queue:
connections waiting there when a worker dies are taken by the others, where
C{SO_REUSEPORT} would have reset the ones hashed to its socket. Implicit TLS
and PROXY-protocol listeners need nothing special: the worker wraps the
adopted socket's factory exactly as one process wraps its own.

The parent also runs what there must be one of: the forward queue's runner
(workers write into the queue and tell the parent to look), autoconfig, and
systemd's readiness, and the count of every worker's connections that
C{max_connections} and C{max_connections_per_address} limit. Each worker
keeps its own users file in memory, its certificate and its thread pools,
and re-reads its files on its own timer and on the SIGHUP the parent
forwards. Counters that must be shared across nodes (the throttle) live in
the C{[state]} backend, which is why C{workers > 1} needs one that is not
in memory.

The pipes between them (child descriptors):

  - 0, parent to worker: the configuration text the parent validated (so
    that a worker restarted later serves what the others serve, whatever
    happened to the file since), then the answers to its C{admit} and
    counter lines; its end means the parent is gone, and the worker stops.
  - 1, worker to parent: the worker's log events, one JSON object a line
    with what a log line shows (L{mailauth.workerlink.LogRelay}); the
    parent publishes them in its own log, where they read as the lines of
    one process do. When the parent logs to its standard output
    (C{twistd --logfile=-}, the journal under systemd), this is that
    output instead, and the worker writes the same lines there itself
    (L{mailauth.workerlink.WorkerLog}): relaying them was nine tenths of
    the parent's work under load, and a wake-up of it for every line.
  - 2: the worker's stderr, for what it writes before its log starts.
  - 3, worker to parent: control lines, C{ready} once it serves, C{wake}
    after it queued a message, C{alive} from its event loop every third
    of C{[server] worker_timeout}, C{admit}/C{release} for the
    connection limits the parent keeps for the whole node
    (L{mailauth.workerlink.NodeConnections}), and C{count}/C{block}/
    C{blocked} for the counters the workers share while Redis is down
    (L{mailauth.workerlink.NodeCounters}); the parent answers on pipe 0.
  - 4 and up: the listening sockets, in the order of the C{--listener}
    arguments.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import site
import sys
from typing import Any, Callable, Mapping, Optional, Sequence, Union, cast

import attrs
from twisted.application import service
from twisted.internet import defer, endpoints, error, protocol, task
from twisted.logger import Logger, LogPublisher, globalLogPublisher
from twisted.python.failure import Failure

from mailauth.workerlink import COUNTER_VERBS, NodeConnections, NodeCounters, eventFromRelay

log = Logger(namespace="mailauth.workers")

CONFIG_FD = 0
LOG_FD = 1
STDERR_FD = 2
CONTROL_FD = 3
FIRST_SOCKET_FD = 4

# Environment a worker must not inherit: systemd's messages are the
# parent's to send, and the sockets systemd passed are the parent's.
_PARENT_ONLY = frozenset(
    "NOTIFY_SOCKET WATCHDOG_USEC WATCHDOG_PID LISTEN_FDS LISTEN_PID LISTEN_FDNAMES".split()
)


class _Refuse(protocol.Factory):
    """The parent's factory: it holds the sockets but never accepts on them."""

    def buildProtocol(self, addr):
        return None


@attrs.define
class _Slot:
    """One worker, across its restarts."""

    index: int
    process: Any = None
    pid: Optional[int] = None
    startedAt: float = 0.0
    ready: bool = False
    delay: float = 0.0
    restart: Any = None
    ended: Optional[defer.Deferred] = None
    #: a SIGHUP that came while the worker was starting, for when it serves
    reload: bool = False
    #: when it last sent a control line
    heardAt: float = 0.0
    #: the SIGKILL that follows the SIGABRT of a hung worker (set until it ends)
    killer: Any = None


class _WorkerProtocol(protocol.ProcessProtocol):
    """The parent's end of one worker's pipes."""

    def __init__(self, pool: WorkerPool, slot: _Slot) -> None:
        self.pool = pool
        self.slot = slot
        self._buffers: dict = {LOG_FD: b"", STDERR_FD: b"", CONTROL_FD: b""}
        self.pid: Optional[int] = None

    def connectionMade(self) -> None:
        # Kept now: a worker that dies at once is reaped inside spawnProcess,
        # which then returns a process whose pid is already None.
        self.pid = getattr(self.transport, "pid", None)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD not in self._buffers:
            return
        buffered = self._buffers[childFD] + data
        *lines, self._buffers[childFD] = buffered.split(b"\n")
        for line in lines:
            self._line(childFD, line)

    def _line(self, childFD: int, line: bytes) -> None:
        if childFD == LOG_FD:
            self.pool._relay(self.slot, line)
        elif childFD == CONTROL_FD:
            self.pool._control(self.slot, line.strip())
        elif line.strip():
            log.warn(
                "worker {index} (pid {pid}): {line}",
                index=self.slot.index,
                pid=self.slot.pid,
                line=line.decode("utf-8", "replace").rstrip(),
            )

    def processEnded(self, reason: Failure) -> None:
        for childFD, rest in self._buffers.items():
            if rest:
                self._line(childFD, rest)
        self._buffers = {}
        self.pool._ended(self.slot, reason)


class HeldPort(service.Service):
    """
    A listener's socket, bound by the parent (in C{privilegedStartService},
    while it may still be root) and held open for its workers, which
    accept on it; the parent never does.

    @ivar listener: the listener's name, C{NAME} of C{[listener:NAME]}.
    @ivar description: its endpoint string.
    @ivar port: the listening port once bound, else L{None}.
    """

    def __init__(self, reactor, listener: str, description: str) -> None:
        self.reactor = reactor
        self.listener = listener
        self.description = description
        self.name = f"listener:{listener}"
        self.port: Any = None
        self._waitingForPort: Optional[defer.Deferred] = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._bind()

    def startService(self) -> None:
        super().startService()
        self._bind()

    def _bind(self) -> None:
        """Listen now (TCP, UNIX and systemd endpoints listen at once), or raise why not."""
        if self.port is not None:
            return
        d = endpoints.serverFromString(self.reactor, self.description).listen(_Refuse())
        result: list = []
        d.addBoth(result.append)
        if not result:
            raise RuntimeError(f"{self.description!r} did not listen at once")
        if isinstance(result[0], Failure):
            result[0].raiseException()
        self.port = result[0]
        # The workers accept; the parent only keeps the socket open for them.
        self.port.stopReading()
        # Where the daemon learns that, and where, a listening service
        # listens (mailauth.sdnotify, the "listening on" line).
        self._waitingForPort = defer.succeed(self.port)

    def stopService(self) -> Optional[defer.Deferred]:
        super().stopService()
        port, self.port = self.port, None
        return None if port is None else port.stopListening()


class WorkerPool(service.Service):
    """
    Keeps C{count} worker processes serving the sockets its L{HeldPort}s hold:
    a worker that ends while the pool runs is started again (after 1 s, and
    twice as long each time it ends again within C{stableAfter}); on stop,
    each gets SIGTERM, and SIGKILL after C{stopTimeout}.

    A worker that serves and then says nothing on its control pipe for
    C{hangTimeout} seconds (its event loop sends C{alive} every third of
    that), or that has not said it serves L{startTimeout} seconds after it
    was started, hangs: it gets SIGABRT, on which it writes every thread's stack
    to its stderr (L{faulthandler}, which the pool logs) and dies, then
    SIGKILL if it has not ended C{stopTimeout} later; then it is started
    again as any worker that ends. As systemd's C{WatchdogSec=} does for
    the parent, whose event loop the workers' pipes need.

    A worker that ends before any worker has been ready means the daemon
    cannot serve (a key its user cannot read, a port it cannot adopt): the
    pool logs it and calls C{stopDaemon} instead of retrying forever.

    @ivar _waitingForPort: fires with L{True} once every worker has said it
        serves (or with L{None} if the pool gave up first): the readiness
        that L{mailauth.sdnotify} reads from a listening service.
    """

    name = "workers"
    minDelay = 1.0
    maxDelay = 30.0
    stableAfter = 30.0
    #: With a C{hangTimeout}: how long a worker may take to start serving
    #: (a hung file system under the users file, a key file on a dead
    #: mount); the C{hangTimeout} if that is longer.
    startTimeout = 60.0

    def __init__(
        self,
        reactor,
        count: int,
        listeners: Sequence[HeldPort],
        configPath: str,
        configText: str,
        *,
        wakeQueue: Callable[[], None] = lambda: None,
        stopDaemon: Optional[Callable[[], None]] = None,
        publisher: Optional[LogPublisher] = None,
        executable: str = sys.executable,
        environ: Optional[Mapping[str, str]] = None,
        stopTimeout: float = 10.0,
        hangTimeout: float = 0.0,
        connections: Optional[NodeConnections] = None,
        workerEnded: Callable[[int], None] = lambda pid: None,
        ownLog: Optional[int] = None,
        counters: Optional[NodeCounters] = None,
    ) -> None:
        """
        @param reactor: binds, spawns (C{IReactorProcess}) and keeps time.
        @param count: how many workers.
        @param listeners: the sockets of every listener, in order.
        @param configPath: the configuration file, named in its errors.
        @param configText: its text, which every worker is given.
        @param wakeQueue: called when a worker has queued a message.
        @param stopDaemon: stops the whole daemon, which failed; default
            C{reactor.stop} (under twistd, L{mailauth.tap.makeService} sets
            L{mailauth.tap.stopFailed}).
        @param publisher: where the workers' log events go; default the
            global log publisher (twistd's log).
        @param environ: the workers' environment, less what only the parent
            may use; default C{os.environ}.
        @param hangTimeout: seconds of silence after which a serving worker
            is taken to hang (C{[server] worker_timeout}); 0: never.
        @param connections: the node's connection counts, which the workers
            ask before they greet a client; L{None}: workers asking get no
            answer (only tests build a pool without).
        @param workerEnded: called with the process id of each worker that
            has ended (its metrics' live gauges are dropped).
        @param ownLog: a descriptor the parent logs to (its standard output,
            with C{twistd --logfile=-}), which each worker then gets as its
            own and writes its log lines to itself
            (L{mailauth.workerlink.WorkerLog}); L{None}: the workers' events
            are relayed to C{publisher}.
        @param counters: the node's counters, which the workers count on
            while Redis is down; L{None}: workers asking get no answer
            (only tests build a pool without).
        """
        self.reactor = reactor
        self.count = count
        self.listeners = tuple(listeners)
        self.configPath = configPath
        self.configText = configText
        self.wakeQueue = wakeQueue
        self.stopDaemon = stopDaemon if stopDaemon is not None else reactor.stop
        self.publisher = publisher if publisher is not None else globalLogPublisher
        self.executable = executable
        self.environ = workerEnvironment(os.environ if environ is None else environ)
        self.stopTimeout = stopTimeout
        self.hangTimeout = hangTimeout
        self.connections = connections
        self.counters = counters
        self.workerEnded = workerEnded
        self.ownLog = ownLog
        self._watch: Optional[task.LoopingCall] = None
        self._lastCheck: Optional[float] = None
        self.slots = [_Slot(index=n) for n in range(1, count + 1)]
        self._waitingForPort: defer.Deferred = defer.Deferred()
        self._everReady = False
        self._gaveUp = False

    # Service

    def startService(self) -> None:
        super().startService()
        for slot in self.slots:
            if not self._gaveUp:
                self._spawn(slot)
        if self.hangTimeout > 0:
            self._lastCheck = self.reactor.seconds()
            self._watch = task.LoopingCall(self._checkHung)
            self._watch.clock = self.reactor
            self._watch.start(self.hangTimeout / 3, now=False)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        ended = []
        for slot in self.slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            slot.restart = None
            _cancelKiller(slot)
            if slot.process is not None and slot.ended is not None:
                ended.append(slot.ended)
                _signal(slot, "TERM")
        killer = self.reactor.callLater(self.stopTimeout, self._killAll)
        d = defer.gatherResults(ended)

        def stopped(result):
            if killer.active():
                killer.cancel()
            return None

        return d.addBoth(stopped)

    def _killAll(self) -> None:
        for slot in self.slots:
            if slot.process is not None:
                log.warn(
                    "worker {index} (pid {pid}) did not stop within {seconds:g} s: killing it",
                    index=slot.index,
                    pid=slot.pid,
                    seconds=self.stopTimeout,
                )
                _signal(slot, "KILL")

    # Workers

    def reloadWorkers(self) -> None:
        """
        Send every worker SIGHUP, to reload its certificate and files. A
        worker still starting gets it once it serves: until it has set its
        handler, SIGHUP would kill it.
        """
        for slot in self.slots:
            if slot.process is not None and slot.ready:
                _signal(slot, "HUP")
            elif slot.process is not None:
                slot.reload = True

    def _spawn(self, slot: _Slot) -> None:
        slot.restart = None
        childFDs: dict = {CONFIG_FD: "w", LOG_FD: "r", STDERR_FD: "r", CONTROL_FD: "r"}
        args = [
            self.executable,
            "-m",
            "mailauth.workers",
            "--index",
            str(slot.index),
            "--config",
            self.configPath,
        ]
        if self.ownLog is not None:
            childFDs[LOG_FD] = self.ownLog
            args.append("--own-log")
        for offset, held in enumerate(self.listeners):
            childFDs[FIRST_SOCKET_FD + offset] = held.port.fileno()
            args += ["--listener", f"{held.listener}={FIRST_SOCKET_FD + offset}"]
        slot.ready = slot.reload = False
        slot.startedAt = slot.heardAt = self.reactor.seconds()
        proto = _WorkerProtocol(self, slot)
        try:
            process = self.reactor.spawnProcess(
                proto, self.executable, args, env=self.environ, childFDs=childFDs
            )
        except Exception:
            log.failure(
                "worker {index}: cannot run {executable}",
                index=slot.index,
                executable=self.executable,
            )
            self._ended(slot, Failure(error.ProcessTerminated(127)))
            return
        slot.process, slot.pid, slot.ended = process, proto.pid, defer.Deferred()
        data = self.configText.encode("utf-8")
        slot.process.writeToChild(CONFIG_FD, b"%d\n" % len(data) + data)
        log.info("worker {index} started (pid {pid})", index=slot.index, pid=slot.pid)

    def _checkHung(self) -> None:
        """
        Abort every serving worker that has said nothing for L{hangTimeout},
        and every starting one that has not started serving in L{startTimeout}.
        """
        now = self.reactor.seconds()
        last, self._lastCheck = self._lastCheck, now
        if last is not None and now - last > self.hangTimeout * 2 / 3:
            # This check comes late: the parent itself was held up (or the
            # clock jumped), and what the workers said meanwhile may still
            # be unread in their pipes. Count from now.
            for slot in self.slots:
                slot.heardAt = now
            return
        startTimeout = max(self.startTimeout, self.hangTimeout)
        for slot in self.slots:
            if slot.process is None or slot.killer is not None:
                continue
            if not slot.ready:
                if now - slot.heardAt > startTimeout:
                    log.error(
                        "worker {index} (pid {pid}) has not started serving {seconds:.0f} s "
                        "after it was started: it hangs; aborting it (SIGABRT: its threads' "
                        "stacks follow)",
                        index=slot.index,
                        pid=slot.pid,
                        seconds=now - slot.heardAt,
                    )
                    self._abort(slot)
            elif now - slot.heardAt > self.hangTimeout:
                log.error(
                    "worker {index} (pid {pid}) has said nothing for {seconds:.0f} s: its "
                    "event loop hangs; aborting it (SIGABRT: its threads' stacks follow)",
                    index=slot.index,
                    pid=slot.pid,
                    seconds=now - slot.heardAt,
                )
                self._abort(slot)

    def _abort(self, slot: _Slot) -> None:
        if not _signalMainThread(slot, signal.SIGABRT):
            # (Twisted translates only a few names: SIGABRT goes as a number.)
            _signal(slot, signal.SIGABRT)
        slot.killer = self.reactor.callLater(self.stopTimeout, self._killHung, slot)

    def _killHung(self, slot: _Slot) -> None:
        # slot.killer stays set until the worker ends: it is not aborted twice.
        if slot.process is not None:
            log.error(
                "worker {index} (pid {pid}) did not end {seconds:g} s after SIGABRT: killing it",
                index=slot.index,
                pid=slot.pid,
                seconds=self.stopTimeout,
            )
            _signal(slot, "KILL")

    def _control(self, slot: _Slot, line: bytes) -> None:
        slot.heardAt = self.reactor.seconds()
        if line.startswith((b"admit ", b"release ")):
            if self.connections is not None:
                self._answer(slot, self.connections.control(slot.index, line))
        elif line.startswith(COUNTER_VERBS):
            if self.counters is not None:
                self._answer(slot, self.counters.control(line))
        elif line == b"wake":
            self.wakeQueue()
        elif line == b"ready":
            slot.ready = True
            log.info("worker {index} (pid {pid}) is serving", index=slot.index, pid=slot.pid)
            if slot.reload:
                slot.reload = False
                _signal(slot, "HUP")
            if not (self._everReady or self._gaveUp) and all(s.ready for s in self.slots):
                self._everReady = True
                self._waitingForPort.callback(True)

    def _answer(self, slot: _Slot, answer: Optional[bytes]) -> None:
        """Write C{answer}, if any, to the worker of C{slot} (its configuration pipe)."""
        if answer is not None and slot.process is not None:
            # (KeyError: its pipe has closed, as it ends.)
            with contextlib.suppress(KeyError):
                slot.process.writeToChild(CONFIG_FD, answer + b"\n")

    def _relay(self, slot: _Slot, record: bytes) -> None:
        if not record.strip():
            return
        try:
            event = eventFromRelay(record, slot.index)
        except ValueError:
            log.warn(
                "worker {index} (pid {pid}) logged what is not JSON: {record!r}",
                index=slot.index,
                pid=slot.pid,
                record=record[:200],
            )
            return
        self.publisher(event)

    def _ended(self, slot: _Slot, reason: Failure) -> None:
        how = howEnded(reason)
        pid, lived = slot.pid, self.reactor.seconds() - slot.startedAt
        slot.process = slot.pid = None
        if self.connections is not None:
            self.connections.forget(slot.index)
        if pid is not None:
            self.workerEnded(pid)
        _cancelKiller(slot)
        ended, slot.ended = slot.ended, None
        if ended is not None:
            ended.callback(None)
        if not self.running:
            log.info(
                "worker {index} (pid {pid}) stopped: {how}", index=slot.index, pid=pid, how=how
            )
            return
        if self._gaveUp:
            return
        if not slot.ready and not self._everReady:
            self._gaveUp = True
            log.critical(
                "worker {index} (pid {pid}) {how} before it could serve; "
                "stopping mailauth (its error is logged above)",
                index=slot.index,
                pid=pid,
                how=how,
            )
            self._waitingForPort.callback(None)
            self.stopDaemon()
            return
        slot.delay = (
            self.minDelay
            if lived >= self.stableAfter or not slot.delay
            else min(self.maxDelay, slot.delay * 2)
        )
        log.error(
            "worker {index} (pid {pid}) {how}; starting it again in {delay:g} s",
            index=slot.index,
            pid=pid,
            how=how,
            delay=slot.delay,
        )
        slot.restart = self.reactor.callLater(slot.delay, self._spawn, slot)


def _cancelKiller(slot: _Slot) -> None:
    if slot.killer is not None and slot.killer.active():
        slot.killer.cancel()
    slot.killer = None


def _signal(slot: _Slot, name: Union[str, int]) -> None:
    try:
        slot.process.signalProcess(name)
    except (error.ProcessExitedAlready, OSError):
        pass


def _signalMainThread(slot: _Slot, number: int) -> bool:
    """
    Send signal C{number} to the main thread of C{slot}'s worker, its event
    loop's (Linux's C{tgkill}: the main thread's id is the process's);
    whether it was sent. For SIGABRT: the stack dump (faulthandler) then
    runs in that thread, whose frames hold still while they are written.
    Sent to the process, the signal could land in a pool thread while the
    event loop ran on, and the loop's stack came out cut short: the one
    stack that tells why it hung.
    """
    from twisted.internet.process import Process

    if _tgkill is None or slot.pid is None or not isinstance(slot.process, Process):
        return False
    return _tgkill(slot.pid, slot.pid, number) == 0


def _findTgkill() -> Optional[Callable[[int, int, int], int]]:
    """glibc's C{tgkill} (2.30 and later), or L{None}."""
    try:
        tgkill = ctypes.CDLL(None, use_errno=True).tgkill
    except (AttributeError, OSError):
        return None
    tgkill.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int)
    tgkill.restype = ctypes.c_int
    return cast(Callable[[int, int, int], int], tgkill)


_tgkill = _findTgkill()


def howEnded(reason: Failure) -> str:
    """How a process ended, in words: C{exited with 1}, C{was killed by SIGKILL}."""
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig is not None:
        try:
            return f"was killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"was killed by signal {sig}"
    return f"exited with {getattr(value, 'exitCode', None)}"


def workerEnvironment(environ: Mapping[str, str]) -> dict:
    """
    The environment of a worker: the parent's, less what only the parent
    may use, and with this copy of mailauth importable.
    """
    env = {key: value for key, value in environ.items() if key not in _PARENT_ONLY}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in site.getsitepackages() and root not in env.get("PYTHONPATH", "").split(
        os.pathsep
    ):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def readConfiguration(path: str, expected) -> str:
    """
    The text of the configuration file C{path}, which the workers will be
    given, checked to be the one the parent validated as C{expected}.

    @raise SystemExit: if it cannot be read, or says something else now.
    """
    from mailauth import config as configmod

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        changed = configmod.loadText(text, path) != expected
    except (OSError, UnicodeDecodeError, configmod.ConfigError) as e:
        raise SystemExit(f"{path}: cannot read it again for the workers: {e}") from None
    if changed:
        raise SystemExit(f"{path}: changed while mailauth was starting; start it again")
    return text


if __name__ == "__main__":
    # The worker's code is in mailauth.workerproc; the command that starts
    # it stays "python -m mailauth.workers" (WorkerPool._spawn).
    from mailauth.workerproc import main

    sys.exit(main())
