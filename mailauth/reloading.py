"""
What the daemon reads again while it runs: changed files on a timer, and
certificates, files and keys on SIGHUP; the configuration itself only at a
restart, which SIGHUP says when the file has changed.
"""

from __future__ import annotations

import signal
from typing import Any, Optional, Sequence

from twisted.application import service
from twisted.logger import Logger

from mailauth import config as configmod
from mailauth.interfaces import IReloadable

# The lines of the daemon's start and reloads share one namespace.
log = Logger(namespace="mailauth.tap")


class Reloader:
    """
    Reads the daemon's files again.

    @ivar sources: the users file, address maps and other L{IReloadable}s.
    @ivar tls: the L{mailauth.tls.ReloadableTLS}, or L{None}.
    @ivar keyRing: the L{mailauth.dkimsign.KeyRing}, or L{None}.
    @ivar pool: the L{mailauth.workers.WorkerPool} SIGHUP is passed on to, or L{None}.
    @ivar config: the configuration the daemon runs, to compare with its
        file on SIGHUP; L{None} in a worker (its parent compares).
    """

    def __init__(
        self,
        sources: Sequence[IReloadable],
        tls: Any = None,
        keyRing: Any = None,
        pool: Any = None,
        config: Optional[configmod.Config] = None,
    ) -> None:
        self.sources = sources
        self.tls = tls
        self.keyRing = keyRing
        self.pool = pool
        self.config = config

    def reloadFiles(self) -> None:
        """On the timer: every source that changed."""
        try:
            for source in self.sources:
                source.maybeReload()
        except Exception:
            log.failure("reloading the users, address or key files failed")

    def reloadAll(self) -> None:
        """On SIGHUP: everything, then the workers, then a word on the configuration."""
        log.info("SIGHUP: reloading certificates, users, address files and DKIM keys")
        if self.tls is not None:
            self.tls.reload()
        for source in self.sources:
            if source.path is not None:
                source.load()
        if self.keyRing is not None:
            self.keyRing.reload()
        if self.pool is not None:
            self.pool.reloadWorkers()
        if self.config is not None:
            self.compareConfiguration(self.config)

    @staticmethod
    def compareConfiguration(running: configmod.Config) -> None:
        """
        Log whether the configuration file still says what the daemon runs:
        an operator who edits it and sends SIGHUP (as C{postfix reload} would
        have it) learns that the change waits for a restart, and, if the
        file no longer loads, that a restart would fail, while the daemon
        goes on serving what it runs.
        """
        path = running.path
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            log.warn(
                "SIGHUP: cannot read {path} to compare it with the configuration in use: {why}",
                path=path,
                why=e.strerror,
            )
            return
        try:
            found = configmod.loadText(data.decode("utf-8-sig"), path)
        except UnicodeDecodeError as e:
            problems = [f"{path}: not UTF-8 text: {e}"]
        except configmod.ConfigError as e:
            problems = list(e.problems)
        else:
            if found != running:
                log.warn(
                    "SIGHUP: {path} has changed since mailauth started; the changes take "
                    "effect at the next restart (SIGHUP reloads only certificates, users, "
                    "address files and DKIM keys)",
                    path=path,
                )
            return
        for problem in problems:
            log.error(
                "SIGHUP: the configuration file is wrong, mailauth would not start with it; "
                "still serving with the configuration it started with: {problem}",
                problem=problem,
            )


def ignoreSIGHUP() -> None:
    """
    From now on SIGHUP does not end this process, whose default it is: a
    SIGHUP (a reload, a closed terminal) while the daemon starts, before
    L{SignalReload} handles it, or while it stops, after, would kill it
    outright, mid-start or mid-stop, leaving its pid file and ending with
    SIGHUP instead of its own status. Called as twistd reads its options.
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


class SignalReload(service.Service):
    """
    Calls C{reload} on the reactor thread on every SIGHUP while it runs;
    SIGHUP is ignored once it has stopped (never given back its default
    action, see L{ignoreSIGHUP}).
    """

    def __init__(self, reactor, reload) -> None:
        self.reactor = reactor
        self.reload = reload
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(
            signal.SIGHUP, lambda *a: self.reactor.callFromThread(self.reload)
        )

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            # (Another handler, a test's, is given back; the default is not.)
            previous = self._previous
            if previous == signal.SIG_DFL:
                previous = signal.SIG_IGN
            signal.signal(signal.SIGHUP, previous)
