"""
The worker process that L{mailauth.workers.WorkerPool} starts, as
C{python -m mailauth.workers}: it reads its configuration from the parent,
adopts the inherited listening sockets and serves them (L{Worker},
L{AdoptedPortService}), and talks to the parent on its pipes
(L{_ParentLink}).

It is apart from L{mailauth.workers}, the parent's side, because the two
run in different processes and share only the pipes' layout (the
C{*_FD} numbers there). The command stays C{mailauth.workers}, whose
C{__main__} calls L{main} here: it is what C{ps} and the docs show.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import socket
from typing import Any, Callable, Iterable, Mapping, Optional, cast

import attrs
from twisted.application import service
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger

from mailauth.workerlink import (
    LogRelay,
    ParentConnections,
    ParentCounters,
    ParentRequests,
    WorkerLog,
    dieWithParent,
)
from mailauth.workers import CONFIG_FD, CONTROL_FD, LOG_FD

# The namespace of the parent's lines about its workers: docs/logs.rst
# lists a worker's own lines under it too.
log = Logger(namespace="mailauth.workers")


@attrs.frozen
class Worker:
    """
    What L{mailauth.tap.buildService} needs to build a worker instead of a
    whole daemon: the inherited sockets to serve, and how to tell the
    parent that the queue has new mail, and the connection limiter that
    asks the parent.

    @ivar sockets: listener name to inherited file descriptor.
    @ivar connections: what the sessions count their connections on (a
        L{ParentConnections}); L{None}: each worker counts its own.
    @ivar counters: the parent's counters, which the throttle and the
        sending limits count on too while Redis is down; L{None}: each
        worker alone.
    """

    index: int
    sockets: Mapping[str, int]
    wakeQueue: Callable[[], None]
    connections: Optional[ParentConnections] = None
    counters: Optional[ParentCounters] = None

    def listen(self, name: str, factory: IProtocolFactory, reactor) -> service.IService:
        """The service that serves listener C{name}'s inherited socket with C{factory}."""
        return AdoptedPortService(reactor, self.sockets[name], factory, f"listener:{name}")


class AdoptedPortService(service.Service):
    """Serves an inherited listening socket: adopts it on start, closes it on stop."""

    def __init__(self, reactor, fd: int, factory: IProtocolFactory, name: str) -> None:
        self.reactor = reactor
        self.fd = fd
        self.factory = factory
        self.name = name
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        probe = socket.socket(fileno=self.fd)
        self.family = probe.family
        probe.detach()
        # adoptStreamPort takes a copy and leaves the original to us.
        self.port = self.reactor.adoptStreamPort(self.fd, self.family, self.factory)
        os.close(self.fd)

    def stopService(self) -> Optional[defer.Deferred]:
        super().stopService()
        if self.port is None:
            return None
        port, self.port = self.port, None
        if self.family == socket.AF_UNIX:
            # Twisted's UNIX port removes its socket's path when it stops
            # listening, which would cut the others off: this worker only
            # stops accepting, and its copy closes when it exits. The
            # parent removes the path when the daemon stops.
            port.stopReading()
            return None
        return port.stopListening()


class _ParentLink(protocol.Protocol):
    """
    The worker's end of the pipes to its parent: control lines out; in, on
    the configuration pipe, the answers to C{admit} and counter lines (for
    C{answered}), and its end, which means the parent is gone.
    """

    def __init__(
        self, parentGone: Callable[[], None], answered: Callable[[bytes], None] = lambda line: None
    ) -> None:
        self.parentGone = parentGone
        self.answered = answered
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            self.answered(line)

    def send(self, line: bytes) -> None:
        if self.transport is not None:
            self.transport.write(line + b"\n")

    def wake(self) -> None:
        self.send(b"wake")

    def connectionLost(self, reason=None) -> None:
        self.transport = None
        self.parentGone()


def readConfigText(fd: int) -> str:
    """Read what L{WorkerPool} writes first on C{fd}: a length line, then that many bytes."""
    header = b""
    while not header.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            raise SystemExit("mailauth worker: the parent sent no configuration")
        header += chunk
    size = int(header)
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise SystemExit("mailauth worker: the configuration from the parent was cut short")
        data += chunk
    return data.decode("utf-8")


def _arguments(argv: Optional[Iterable[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mailauth.workers",
        description="A mailauth worker process; twistd mailauth starts these itself.",
    )
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--config", required=True, help="the file the configuration came from")
    parser.add_argument("--listener", action="append", default=[], metavar="NAME=FD")
    parser.add_argument(
        "--own-log",
        action="store_true",
        help="write log lines to standard output, the parent's own log, instead of relaying them",
    )
    return parser.parse_args(None if argv is None else list(argv))


def main(argv: Optional[Iterable[str]] = None) -> int:
    """Run one worker until its parent stops it or goes away; the exit status."""
    dieWithParent()
    args = _arguments(argv)
    # Ctrl-C in a terminal reaches every process of the group: the parent
    # stops its workers itself, in order. A SIGHUP before the service sets
    # its handler would kill the worker; the files are being read anyway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # The SIGABRT the parent sends a hung worker (or any fatal signal)
    # writes every thread's stack to stderr, which the parent logs.
    faulthandler.enable(all_threads=True)
    text = readConfigText(CONFIG_FD)
    sockets = {}
    for item in args.listener:
        name, _, fd = item.rpartition("=")
        sockets[name] = int(fd)

    from twisted.internet import reactor as globalReactor
    from twisted.internet import stdio
    from twisted.logger import globalLogBeginner

    from mailauth import config as configmod
    from mailauth import tap

    out = open(LOG_FD, "w", encoding="utf-8", closefd=False)
    cfg = configmod.loadText(text, args.config)
    full = cfg.server.log_format == "json"
    observer = WorkerLog(out, args.index, full) if args.own_log else LogRelay(out, full)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    reactor: Any = globalReactor
    failed: list = []
    stopping: list = []

    def stop() -> None:
        if not stopping:
            stopping.append(True)
            reactor.stop()

    def parentGone() -> None:
        if not stopping:
            log.info("worker {index}: the parent process is gone: stopping", index=args.index)
            stop()

    link = _ParentLink(parentGone)
    requests = ParentRequests(link.send)
    link.answered = requests.answered
    connections, counters = ParentConnections(requests), ParentCounters(requests)
    # (mypy reads the Windows StandardIO, which has no stdin or stdout.)
    cast(Any, stdio.StandardIO)(link, stdin=CONFIG_FD, stdout=CONTROL_FD, reactor=reactor)
    worker = Worker(args.index, sockets, link.wake, connections, counters)
    top = tap.buildService(cfg, reactor, worker=worker)

    def start() -> None:
        # SIGTERM comes twice when systemd signals the whole group and the
        # parent forwards its own: stop once, quietly.
        signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(stop))
        try:
            top.startService()
        except Exception:
            log.failure("worker {index} could not start", index=args.index)
            failed.append(True)
            stop()
            return
        link.send(b"ready")
        if cfg.server.worker_timeout > 0:
            alive = task.LoopingCall(link.send, b"alive")
            alive.clock = reactor
            alive.start(cfg.server.worker_timeout / 3, now=False)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    return 1 if failed else 0
