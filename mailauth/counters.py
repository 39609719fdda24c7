"""Counters over sliding windows and timed blocks, held in this process's memory."""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from typing import Any, Callable, Optional

from twisted.internet import defer
from zope.interface import implementer

from mailauth.interfaces import BlockingRunner, ICounterStore

#: Each window is cut into this many slots, aligned on multiples of the slot
#: length (window / 60: 15 s of a 15-minute window, 24 minutes of a day).
#: The events of one slot are kept as one (slot, latest time, sum) entry, so
#: a key holds at most SLOTS_PER_WINDOW + 2 entries however many events it
#: gets. An entry is forgotten once its latest event is a whole window old:
#: every event counts for at least the window and at most one slot longer,
#: never less. Events at one instant expire exactly after the window.
SLOTS_PER_WINDOW = 60

#: The default bound on the keys a memory store holds (and, separately, on
#: its blocks): the throttle's addresses and logins, and the per-login
#: sending limits, share one store.
DEFAULT_MAX_KEYS = 40000


def slotLength(window: float) -> float:
    """The length in seconds of the slots whose events a window merges."""
    return window / SLOTS_PER_WINDOW


def _isNumber(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def checkKey(key: Any) -> None:
    """@raise ValueError: unless C{key} is a non-empty string."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"counter key {key!r} is not a non-empty string")


def checkTotal(key: Any, window: Any) -> None:
    """@raise ValueError: unless C{key} and C{window} suit L{ICounterStore.total}."""
    checkKey(key)
    if not _isNumber(window) or not 0 < window < math.inf:
        raise ValueError(f"window {window!r} is not a positive number of seconds")


def checkHit(key: Any, window: Any, amount: Any) -> None:
    """@raise ValueError: unless the arguments suit L{ICounterStore.hit}."""
    checkTotal(key, window)
    if not isinstance(amount, int) or isinstance(amount, bool) or amount < 1:
        raise ValueError(f"amount {amount!r} is not a whole number of at least 1")


def checkBlock(key: Any, duration: Any) -> None:
    """@raise ValueError: unless C{duration} is a positive number of seconds."""
    checkKey(key)
    if not _isNumber(duration) or not 0 < duration < math.inf:
        raise ValueError(f"duration {duration!r} is not a positive number of seconds")


class _Counter:
    """
    The events of one key: a flat array of (slot, latest time, sum) triples,
    oldest first. The latest times rise along the array, so expired entries
    are always at its front.
    """

    __slots__ = ("window", "entries")

    def __init__(self, window: float) -> None:
        self.window = window
        self.entries = array("d")

    def prune(self, now: float) -> None:
        entries = self.entries
        horizon = now - self.window
        end = 0
        while end < len(entries) and entries[end + 1] <= horizon:
            end += 3
        if end:
            del entries[:end]

    def add(self, now: float, amount: int) -> None:
        entries = self.entries
        slot = math.floor(now / slotLength(self.window))
        # A clock set back lands in an older slot: merge it into the newest
        # entry, so the array stays in order and nothing expires early.
        if entries and slot <= entries[-3]:
            entries[-2] = max(entries[-2], now)
            entries[-1] += amount
        else:
            entries.extend((slot, now, amount))

    def sum(self) -> int:
        return int(sum(self.entries[2::3]))

    def idle(self, now: float) -> bool:
        """Whether every event has expired."""
        return not self.entries or self.entries[-2] <= now - self.window


@implementer(ICounterStore)
class MemoryCounterStore:
    """
    An L{ICounterStore} in this process's memory: the default, and the
    fallback of L{mailauth.redisstore.RedisCounterStore} while Redis is
    unreachable.

    Atomic by construction (everything runs on the reactor thread), on the
    injected clock, with precision as L{SLOTS_PER_WINDOW} says. Memory stays
    bounded whatever an attacker does: at most C{maxKeys} counters (the least
    recently used dropped first, idle ones as soon as they are seen) of at
    most C{SLOTS_PER_WINDOW + 2} entries each, and at most C{maxKeys} blocks
    (the least recently set dropped first).

    Besides the L{ICounterStore} methods, which answer with fired Deferreds,
    it offers the same operations synchronously (L{add}, L{count},
    L{setBlock}, L{isBlocked}).

    @ivar clock: an L{IReactorTime} provider.
    """

    def __init__(self, clock, maxKeys: int = DEFAULT_MAX_KEYS) -> None:
        if maxKeys < 1:
            raise ValueError(f"maxKeys {maxKeys!r} must be at least 1")
        self.clock = clock
        self.maxKeys = maxKeys
        self._counters: OrderedDict[str, _Counter] = OrderedDict()
        self._blocks: OrderedDict[str, float] = OrderedDict()

    # ICounterStore

    def hit(self, key: str, window: float, amount: int = 1) -> defer.Deferred:
        return defer.maybeDeferred(self.add, key, window, amount)

    def total(self, key: str, window: float) -> defer.Deferred:
        return defer.maybeDeferred(self.count, key, window)

    def block(self, key: str, duration: float) -> defer.Deferred:
        return defer.maybeDeferred(self.setBlock, key, duration)

    def blocked(self, key: str) -> defer.Deferred:
        return defer.maybeDeferred(self.isBlocked, key)

    # The same, synchronously.

    def add(self, key: str, window: float, amount: int = 1) -> int:
        """
        Record C{amount} events for C{key} now.

        @return: the total for C{key} within the last C{window} seconds.
        @raise ValueError: for a bad key, window or amount.
        """
        checkHit(key, window, amount)
        now = self.clock.seconds()
        counter = self._counters.pop(key, None)
        if counter is None:
            counter = _Counter(window)
        counter.window = window
        counter.prune(now)
        counter.add(now, amount)
        self._counters[key] = counter
        while len(self._counters) > self.maxKeys:
            self._counters.popitem(last=False)
        self._dropIdle(now)
        return counter.sum()

    def count(self, key: str, window: float) -> int:
        """
        @return: the total for C{key} within the last C{window} seconds.
        @raise ValueError: for a bad key or window.
        """
        checkTotal(key, window)
        counter = self._counters.get(key)
        if counter is None:
            return 0
        now = self.clock.seconds()
        counter.window = window
        counter.prune(now)
        if not counter.entries:
            del self._counters[key]
            return 0
        self._counters.move_to_end(key)
        return counter.sum()

    def setBlock(self, key: str, duration: float) -> bool:
        """
        Mark C{key} blocked for the next C{duration} seconds, replacing any
        block it had.

        @return: whether it was not blocked before: a new block.
        @raise ValueError: for a bad key or duration.
        """
        checkBlock(key, duration)
        now = self.clock.seconds()
        ends = self._blocks.pop(key, None)
        self._blocks[key] = now + duration
        while len(self._blocks) > self.maxKeys:
            self._blocks.popitem(last=False)
        self._dropIdle(now)
        return ends is None or ends <= now

    def isBlocked(self, key: str) -> bool:
        """
        Whether C{key} is blocked now.

        @raise ValueError: for a bad key.
        """
        return self.blockedFor(key) > 0

    def blockedFor(self, key: str) -> float:
        """
        How many seconds C{key} stays blocked; 0 if it is not blocked.

        @raise ValueError: for a bad key.
        """
        checkKey(key)
        until = self._blocks.get(key)
        if until is None:
            return 0
        remaining = until - self.clock.seconds()
        if remaining <= 0:
            del self._blocks[key]
            return 0
        return remaining

    def trackedKeys(self) -> int:
        """How many counters and blocks are held in memory."""
        return len(self._counters) + len(self._blocks)

    def _dropIdle(self, now: float) -> None:
        """
        Forget a few of the least recently used counters and blocks if they
        have expired, so that memory follows what is live without a timer.
        """
        for _ in range(2):
            if self._counters:
                key, counter = next(iter(self._counters.items()))
                if counter.idle(now):
                    del self._counters[key]
            if self._blocks:
                key, until = next(iter(self._blocks.items()))
                if until <= now:
                    del self._blocks[key]


def memoryCounterStore(cfg, clock) -> MemoryCounterStore:
    """
    A memory store for the counters of C{cfg} (a L{mailauth.config.Config}),
    of four times C{[auth] max_tracked} keys: the one of a single process,
    the fallback of a Redis store, and the node's in a parent of workers.
    """
    return MemoryCounterStore(clock, maxKeys=cfg.auth.max_tracked * 4)


def counterStoreFromConfig(
    cfg,
    reactor,
    runBlocking: BlockingRunner,
    onFallback: Optional[Callable[[], None]] = None,
    node: Any = None,
) -> ICounterStore:
    """
    The counter store C{[state] backend} names: a L{MemoryCounterStore}, or
    a L{mailauth.redisstore.RedisCounterStore} whose Redis calls run through
    C{runBlocking} (a small thread pool of its own) and which falls back to
    a L{MemoryCounterStore} while Redis is unreachable.

    @param cfg: a L{mailauth.config.Config}.
    @param reactor: an L{IReactorTime} provider: the clock.
    @param onFallback: called each time the Redis store starts counting in
        memory because Redis is unreachable (a metric).
    @param node: in a worker, the parent's counters
        (L{mailauth.workerlink.ParentCounters}), which the Redis store asks
        too while Redis is unreachable.
    @raise mailauth.config.ConfigError: if the backend is Redis and the
        Python redis client is not installed.
    """
    if cfg.state.backend == "memory":
        return memoryCounterStore(cfg, reactor)
    try:
        from mailauth.redisstore import RedisCounterStore
    except ImportError:
        from mailauth.config import ConfigError

        raise ConfigError(
            [
                f"{cfg.path}: [state] backend: a redis URL needs the Python redis client "
                "(apt-get install python3-redis, or pip install 'mailauth[redis]')"
            ]
        ) from None
    return RedisCounterStore.fromURL(
        cfg.state.backend,
        clock=reactor,
        runBlocking=runBlocking,
        prefix=cfg.state.prefix,
        timeout=cfg.state.timeout,
        fallback=memoryCounterStore(cfg, reactor),
        onFallback=onFallback,
        node=node,
    )
