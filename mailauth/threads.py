"""Private thread pools for blocking work (password hashes, fsync), as services."""

from __future__ import annotations

from typing import Callable

from twisted.application import service
from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool


class PoolBusy(Exception):
    """More work is waiting for the pool than it may queue."""


class PoolStopped(PoolBusy):
    """The pool has stopped (the daemon is stopping): it runs nothing more."""


class ThreadPoolService(service.Service):
    """
    A L{ThreadPool} of our own, started and stopped with the application.

    The reactor's shared pool also resolves host names, so a login storm
    hashing passwords there would starve DNS (D35 in docs/twisted-defects.rst); each kind of
    blocking work gets its own pool instead. At most C{maxQueued} calls
    wait for a thread; past that L{run} fails at once with L{PoolBusy}, so
    a flood costs memory in proportion to the limit, not to the flood.
    """

    def __init__(self, reactor, name: str, threads: int, maxQueued: int) -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=threads, name=name)
        self.maxQueued = maxQueued
        self.pending = 0

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        if not self.pool.joined:
            self.pool.stop()

    def run(self, f: Callable, *args, **kwargs) -> defer.Deferred:
        """
        Call C{f(*args, **kwargs)} in the pool; a Deferred of its result.
        Once the pool has stopped it fails at once with L{PoolStopped}
        (Twisted's pool would drop the call, and the Deferred never fire).
        """
        if self.pool.joined:
            return defer.fail(PoolStopped(f"{self.pool.name}: stopped"))
        if self.pending >= self.maxQueued:
            return defer.fail(PoolBusy(f"{self.pool.name}: {self.pending} calls waiting"))
        self.pending += 1

        def done(result):
            self.pending -= 1
            return result

        return threads.deferToThreadPool(self.reactor, self.pool, f, *args, **kwargs).addBoth(done)
