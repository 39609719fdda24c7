"""Tell systemd (C{Type=notify}) when the daemon is ready and stopping, and that it is alive."""

from __future__ import annotations

import os
import socket
from typing import Iterable, Mapping, Optional

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

log = Logger(namespace="mailauth.sdnotify")


class Notifier:
    """
    Sends sd_notify(3) messages: datagrams to the C{AF_UNIX} socket that
    systemd names in C{$NOTIFY_SOCKET}, a path or, after C{@}, a name in
    the abstract namespace. A message that cannot be sent is logged, never
    raised: systemd's view of the daemon is no reason to stop serving mail.
    """

    def __init__(self, address: str) -> None:
        """
        @param address: C{$NOTIFY_SOCKET}: an absolute path or C{@name}.
        @raise ValueError: for anything else.
        """
        if address.startswith("@") and len(address) > 1:
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        else:
            raise ValueError(f"NOTIFY_SOCKET={address!r} is neither an absolute path nor @name")
        self._failed = False

    def send(self, *assignments: str) -> bool:
        """
        Send one message made of C{assignments} (C{"READY=1"}, C{"STATUS=..."}).

        @return: whether it was sent.
        """
        # A newline would start another assignment: never let text do that.
        data = "\n".join(a.replace("\n", " ") for a in assignments).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                # Never wait for systemd on the reactor thread.
                s.setblocking(False)
                s.sendto(data, self.address)
        except OSError as e:
            if not self._failed:
                log.warn(
                    "cannot notify systemd at {address}: {why}",
                    address=self.address.replace("\0", "@"),
                    why=e.strerror or e,
                )
            self._failed = True
            return False
        self._failed = False
        return True


def _waitingForPort(listener: service.IService) -> defer.Deferred:
    """
    A Deferred that fires with C{listener}'s port once it listens, or with
    L{None} if it could not. Twisted offers no public way to learn when a
    C{StreamServerEndpointService} listens: its C{_waitingForPort} is the
    Deferred of C{endpoint.listen()}, whose failure it turns into L{None}.
    """
    waiting = getattr(listener, "_waitingForPort", None)
    if waiting is None:
        # Not started, or Twisted changed: TCP, UNIX and systemd endpoints
        # listen as soon as they are started, which has happened by now.
        return defer.succeed(True)
    result: defer.Deferred = defer.Deferred()

    def listening(port):
        result.callback(port)
        # Keep the port as the result: stopService stops listening with it.
        return port

    waiting.addCallback(listening)
    return result


class ReadinessService(service.Service):
    """
    Sends C{READY=1} once every listening service listens and the reactor
    runs, then C{WATCHDOG=1} at C{watchdogInterval} from the reactor's own
    timer (a hung reactor misses them, and systemd restarts it), and
    C{STOPPING=1} when stopped.

    Put it last in the service tree: twistd binds every port in
    C{privilegedStartService} before any C{startService}, and a
    C{MultiService} starts its children in order and stops them in reverse,
    so this one starts after every listener and stops first.
    """

    name = "sdnotify"

    def __init__(
        self,
        notifier: Notifier,
        reactor,
        listening: Iterable[service.IService],
        watchdogInterval: Optional[float] = None,
    ) -> None:
        """
        @param reactor: provides C{callWhenRunning} and the clock of the
            watchdog pings.
        @param listening: the services whose ports must listen first (the
            SMTP listeners, the metrics server).
        @param watchdogInterval: seconds between C{WATCHDOG=1}, or L{None}.
        """
        self.notifier = notifier
        self.reactor = reactor
        self.listening = tuple(listening)
        self.watchdogInterval = watchdogInterval
        self._watchdog: Optional[task.LoopingCall] = None

    def startService(self) -> None:
        super().startService()
        if self.watchdogInterval is not None:
            self._watchdog = task.LoopingCall(self.notifier.send, "WATCHDOG=1")
            self._watchdog.clock = self.reactor
            self._watchdog.start(self.watchdogInterval, now=False)
        self.reactor.callWhenRunning(self._whenListening)

    def _whenListening(self) -> None:
        d = defer.gatherResults([_waitingForPort(s) for s in self.listening])
        d.addCallback(self._ready)

    def _ready(self, ports: list) -> None:
        if not self.running:
            return
        failed = [s.name for s, port in zip(self.listening, ports) if port is None]
        if failed:
            log.error(
                "not telling systemd we are ready: {names} could not listen",
                names=", ".join(failed),
            )
            self.notifier.send(f"STATUS=could not listen: {', '.join(failed)}")
            return
        names = ", ".join(s.name for s in self.listening)
        self.notifier.send("READY=1", f"STATUS=listening: {names}")

    def stopService(self) -> None:
        super().stopService()
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self.notifier.send("STOPPING=1", "STATUS=stopping")


def fromEnvironment(
    environ: Mapping[str, str],
    reactor,
    listening: Iterable[service.IService],
    pid: Optional[int] = None,
) -> Optional[ReadinessService]:
    """
    The readiness service systemd asks for in C{environ}, or L{None} when
    C{$NOTIFY_SOCKET} is not set (not started by systemd with
    C{Type=notify}) or unusable.

    @param pid: this process's id, for C{$WATCHDOG_PID}; default
        C{os.getpid()}.
    """
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    try:
        notifier = Notifier(address)
    except ValueError as e:
        log.warn("not notifying systemd: {why}", why=e)
        return None
    return ReadinessService(
        notifier,
        reactor,
        listening,
        _watchdogInterval(environ, os.getpid() if pid is None else pid),
    )


def _watchdogInterval(environ: Mapping[str, str], pid: int) -> Optional[float]:
    """Half of C{$WATCHDOG_USEC} in seconds, as sd_watchdog_enabled(3) advises; or L{None}."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    watchdogPID = environ.get("WATCHDOG_PID")
    if watchdogPID and watchdogPID != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        value = 0
    if value <= 0:
        log.warn("ignoring WATCHDOG_USEC={usec!r}: not a positive whole number", usec=usec)
        return None
    return value / 2 / 1_000_000
