"""Counters shared by every worker and node through Redis, counted locally while it is down."""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailauth.config import redactURL
from mailauth.counters import (
    SLOTS_PER_WINDOW,
    MemoryCounterStore,
    checkBlock,
    checkHit,
    checkKey,
    checkTotal,
)
from mailauth.interfaces import BlockingRunner, ICounterStore
from mailauth.threads import PoolBusy, PoolStopped

if TYPE_CHECKING:
    from mailauth.workerlink import ParentCounters

log = Logger(namespace="mailauth.redisstore")

#: How long after Redis failed the store tries it again, in seconds.
RETRY_INTERVAL = 10.0
#: How long a Redis call may take before Redis counts as down, in seconds.
DEFAULT_TIMEOUT = 1.0
DEFAULT_PREFIX = "mailauth:"

# Every script takes the time in milliseconds as ARGV[1], or "" for Redis's
# own clock (TIME), and touches only KEYS[1]. Before Redis 5 a script must
# ask for effects replication to write after reading TIME; later versions
# always replicate effects.
_NOW = """
local now = tonumber(ARGV[1])
if not now then
  if redis.replicate_commands then redis.replicate_commands() end
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS[1] is a hash with two fields per slot of the window: n<slot>, the
# sum of its events, and t<slot>, the time of its latest event (as the
# memory store keeps them, mailauth.counters.SLOTS_PER_WINDOW). ARGV: now,
# window (ms), slot length (ms), amount (0: only read the total). Returns the
# total within the window, the new events included.
_COUNT = (
    _NOW
    + """
local key = KEYS[1]
local window = tonumber(ARGV[2])
local slot = tonumber(ARGV[3])
local amount = tonumber(ARGV[4])
local fields = redis.call('HGETALL', key)
local values = {}
for i = 1, #fields, 2 do values[fields[i]] = fields[i + 1] end
local horizon = now - window
local total = 0
local stale = {}
for name, value in pairs(values) do
  if string.sub(name, 1, 1) == 't' then
    local id = string.sub(name, 2)
    if tonumber(value) <= horizon then
      stale[#stale + 1] = name
      stale[#stale + 1] = 'n' .. id
    else
      total = total + (tonumber(values['n' .. id]) or 0)
    end
  end
end
for i = 1, #stale, 200 do
  redis.call('HDEL', key, unpack(stale, i, math.min(i + 199, #stale)))
end
if amount > 0 then
  local id = string.format('%d', math.floor(now / slot))
  redis.call('HINCRBY', key, 'n' .. id, amount)
  local last = tonumber(values['t' .. id])
  if not last or now > last then
    redis.call('HSET', key, 't' .. id, string.format('%d', now))
  end
  redis.call('PEXPIRE', key, math.ceil(window + slot))
  total = total + amount
end
return total
"""
)

# KEYS[1] holds the time (ms) the block ends and expires then. ARGV: now,
# duration (ms).
# Returns 1 if KEYS[1] was not blocked before (a new block), else 0.
_BLOCK = (
    _NOW
    + """
local ends = tonumber(redis.call('GET', KEYS[1]) or '')
redis.call('SET', KEYS[1], string.format('%d', now + tonumber(ARGV[2])), 'PX', ARGV[2])
if ends and ends > now then return 0 end
return 1
"""
)

# Returns how many milliseconds KEYS[1] stays blocked, 0 if it is not.
_BLOCKED = (
    _NOW
    + """
local ends = tonumber(redis.call('GET', KEYS[1]) or '')
if ends and ends > now then return ends - now end
return 0
"""
)


class _Script:
    """A Lua script and its SHA1, the name Redis caches it under."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()


COUNT = _Script(_COUNT)
BLOCK = _Script(_BLOCK)
BLOCKED = _Script(_BLOCKED)


def makeClient(url: str, timeout: float = DEFAULT_TIMEOUT) -> redis.Redis:
    """
    A redis-py client for C{url} (C{redis://}, C{rediss://} or C{unix://},
    as C{redis.Redis.from_url} reads them) that gives up on a call after
    C{timeout} seconds and never retries by itself: the store decides what
    a failure means. It connects on its first call, not now.
    """
    options: dict[str, Any] = {"socket_timeout": timeout, "retry": Retry(NoBackoff(), 0)}
    if not url.lower().startswith("unix:"):
        # redis-py 4.3 (Debian bookworm) has no connect timeout for unix
        # sockets; there the socket timeout bounds the connect as well.
        options["socket_connect_timeout"] = timeout
    return redis.Redis.from_url(url, **options)


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


@implementer(ICounterStore)
class RedisCounterStore:
    """
    An L{ICounterStore} in Redis, shared by every process that uses the same
    Redis and prefix. Each update is one Lua script run atomically by Redis
    (EVALSHA, and EVAL when Redis answers NOSCRIPT), on one key per counter
    (a hash of per-slot sums, expiring once idle for a window) and one per
    block (expiring when the block ends). Redis calls block, so they run
    through C{runBlocking}.

    While Redis answers, its answers are the truth. Every update is also
    made in a local L{MemoryCounterStore} (and every block Redis reports is
    remembered there), so that when Redis fails (a connection error, a
    timeout, any error) this node goes on from its own recent history, not
    from nothing: the call is answered from the local store, one line is
    logged and C{onFallback} is called; later calls are answered locally
    until C{retryInterval} has passed on the clock, when one call tries
    Redis again (the others stay local meanwhile); when that succeeds, one
    line is logged and Redis answers again. Updates made during the outage
    stay local: they are not replayed into Redis, but a block set during it
    still holds on this node until it ends. No call ever fails because of
    Redis.

    With C{[server] workers}, each worker's local store is its own, and the
    parent's counters (C{node}, L{mailauth.workerlink.ParentCounters}) are
    the node's: a call answered locally is then also made there, and
    answered with the larger count (the parent's holds what every worker
    counted during the outage, the worker's its own history from before
    it) and with the blocks of either, so that during an outage the node's
    workers count together as one process does. While Redis answers (and
    the thread pool is not too busy) the parent is not asked.

    No call waits longer than C{timeout} from when it was made, however
    many were waiting for a thread when Redis hung: each is answered
    locally at its own deadline, and a thread that gets a call whose
    deadline has passed does not send it. A call the thread pool is too
    busy to take (L{PoolBusy}: a burst of connections, each asking whether
    its address is blocked) is answered locally too, but does not make
    the store stop using Redis: a flood of connections must not turn a
    node's shared counting off.

    @ivar usingFallback: whether calls are being answered locally because
        Redis failed.
    """

    def __init__(
        self,
        client: redis.Redis,
        clock,
        runBlocking: BlockingRunner,
        prefix: str = DEFAULT_PREFIX,
        fallback: Optional[MemoryCounterStore] = None,
        retryInterval: float = RETRY_INTERVAL,
        serverTime: bool = True,
        onFallback: Optional[Callable[[], None]] = None,
        where: str = "redis",
        timeout: float = DEFAULT_TIMEOUT,
        node: Optional[ParentCounters] = None,
    ) -> None:
        """
        @param client: a redis-py client, made by L{makeClient}.
        @param clock: an L{IReactorTime} provider.
        @param prefix: what every key this store writes starts with.
        @param fallback: the local store (default: a new one on C{clock}).
        @param serverTime: measure windows and blocks on Redis's clock
            (C{TIME}), one clock for every node however theirs drift; if
            false, on C{clock}, which a test can drive.
        @param where: how log lines name this Redis (no password in it).
        @param timeout: the longest a call waits for Redis, from when it is
            made (the client's own socket timeout should be the same).
        @param node: in a worker, its parent's counters, asked too while
            Redis does not answer; L{None}: this process counts alone.
        """
        self.client = client
        self.clock = clock
        self.prefix = prefix
        self.local = fallback if fallback is not None else MemoryCounterStore(clock)
        self.retryInterval = retryInterval
        self.serverTime = serverTime
        self.where = where
        self.usingFallback = False
        self.timeout = timeout
        self.node = node
        self._runBlocking = runBlocking
        self._onFallback = onFallback
        self._retryAt = 0.0
        self._probing = False

    @classmethod
    def fromURL(
        cls,
        url: str,
        clock,
        runBlocking: BlockingRunner,
        timeout: float = DEFAULT_TIMEOUT,
        **kwargs: Any,
    ) -> RedisCounterStore:
        """
        A store on the Redis at C{url}, whose calls time out after
        C{timeout} seconds; other keyword arguments as for the constructor.
        """
        return cls(
            makeClient(url, timeout),
            clock,
            runBlocking,
            where=redactURL(url),
            timeout=timeout,
            **kwargs,
        )

    # ICounterStore

    def hit(self, key: str, window: float, amount: int = 1) -> defer.Deferred:
        try:
            checkHit(key, window, amount)
        except ValueError:
            return defer.fail()
        self.local.add(key, window, amount)
        return self._count(key, window, amount)

    def total(self, key: str, window: float) -> defer.Deferred:
        try:
            checkTotal(key, window)
        except ValueError:
            return defer.fail()
        return self._count(key, window, 0)

    def block(self, key: str, duration: float) -> defer.Deferred:
        try:
            checkBlock(key, duration)
        except ValueError:
            return defer.fail()
        new = self.local.setBlock(key, duration)
        return self._call(
            BLOCK,
            self.prefix + "b:" + key,
            (self._now(), _milliseconds(duration)),
            # Redis knows of every node's blocks; without it, this node's
            # (the parent's answer, with workers: new for the node).
            lambda result: bool(result),
            lambda: self._withNode(
                new, lambda node: node.block(key, duration), lambda mine, nodes: nodes
            ),
        )

    def blocked(self, key: str) -> defer.Deferred:
        try:
            checkKey(key)
        except ValueError:
            return defer.fail()

        def answer(remaining: int) -> bool:
            if remaining > 0:
                # Remembered here, so that the block holds on this node
                # while Redis is down, even if another node set it.
                self.local.setBlock(key, remaining / 1000)
                return True
            # A block this node set while Redis was down never reached
            # Redis: it holds here until it ends, not only until Redis is back.
            return self.local.isBlocked(key)

        def remember(seconds: float) -> bool:
            # Another worker's block, held here too once seen.
            if seconds > 0:
                self.local.setBlock(key, seconds)
            return seconds > 0

        return self._call(
            BLOCKED,
            self.prefix + "b:" + key,
            (self._now(),),
            answer,
            lambda: self._withNode(
                self.local.isBlocked(key),
                lambda node: node.blockedFor(key).addCallback(remember),
                lambda mine, nodes: mine or nodes,
            ),
        )

    def _count(self, key: str, window: float, amount: int) -> defer.Deferred:
        windowMs = _milliseconds(window)
        return self._call(
            COUNT,
            self.prefix + "c:" + key,
            (self._now(), windowMs, windowMs / SLOTS_PER_WINDOW, amount),
            int,
            lambda: self._withNode(
                self.local.count(key, window),
                lambda node: node.count(key, window, amount),
                max,
            ),
        )

    def _withNode(
        self,
        mine: Any,
        ask: Callable[[ParentCounters], defer.Deferred],
        combine: Callable[[Any, Any], Any],
    ) -> Any:
        """
        A local answer: C{mine}, this process's, or with a parent (workers)
        C{combine(mine, answer)} of its answer to C{ask}; C{mine} alone if
        the parent could not answer (logged).
        """
        if self.node is None:
            return mine
        d = ask(self.node)
        d.addCallback(lambda nodes: combine(mine, nodes))

        def failed(failure: Failure) -> Any:
            log.error(
                "the parent's counters could not answer ({why}): this worker's alone",
                why=failure.getErrorMessage(),
            )
            return mine

        return d.addErrback(failed)

    def _now(self) -> Any:
        return "" if self.serverTime else round(self.clock.seconds() * 1000)

    def _call(
        self,
        script: _Script,
        key: str,
        args: tuple,
        answer: Callable[[Any], Any],
        localAnswer: Callable[[], Any],
    ) -> defer.Deferred:
        """
        Run C{script} on C{key} in Redis and give its result to C{answer};
        if Redis is not in use now or fails, give C{localAnswer()} instead.
        """
        probe = False
        if self.usingFallback:
            if self._probing or self.clock.seconds() < self._retryAt:
                return defer.maybeDeferred(localAnswer)
            self._probing = probe = True
        deadline = time.monotonic() + self.timeout
        try:
            d = self._runBlocking(self._evaluate, deadline, script, key, *args)
        except Exception:
            d = defer.fail()
        d.addTimeout(self.timeout, self.clock)
        d.addCallback(answer)
        d.addCallbacks(
            self._succeeded, self._failed, callbackArgs=(probe,), errbackArgs=(probe, localAnswer)
        )
        return d

    def _evaluate(self, deadline: float, script: _Script, key: str, *args: Any) -> Any:
        """
        In a thread: run C{script}, sending its source only if Redis lost
        it; nothing if the call's C{deadline} (L{time.monotonic}) has
        passed while it waited for this thread.
        """
        if time.monotonic() > deadline:
            raise TimeoutError("waited for a thread past the call's deadline")
        try:
            return self.client.evalsha(script.sha, 1, key, *args)
        except NoScriptError:
            return self.client.eval(script.source, 1, key, *args)

    def _succeeded(self, result: Any, probe: bool) -> Any:
        if probe:
            self._probing = False
            self.usingFallback = False
            log.info("state backend {where} answers again: counting there again", where=self.where)
        return result

    def _failed(self, failure: Failure, probe: bool, localAnswer: Callable[[], Any]) -> Any:
        if probe:
            self._probing = False
        if failure.check(PoolBusy) and not failure.check(PoolStopped):
            # Too many calls at once: this one is answered locally; Redis
            # itself has not failed.
            return localAnswer()
        self._retryAt = self.clock.seconds() + self.retryInterval
        if not self.usingFallback:
            self.usingFallback = True
            log.warn(
                "state backend {where} failed ({error}): counting in this process's memory, "
                "trying it again every {interval:g}s",
                where=self.where,
                error=f"{getattr(failure.type, '__name__', 'error')}: {failure.getErrorMessage()}",
                interval=self.retryInterval,
            )
            if self._onFallback is not None:
                try:
                    self._onFallback()
                except Exception:
                    log.failure("the state backend's onFallback hook failed")
        return localAnswer()
