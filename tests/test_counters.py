"""The counter stores, in memory and in a real Redis, through one test suite on a Clock."""

from __future__ import annotations

import sys
import time
import tracemalloc

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailauth import counters, redisstore
from mailauth.config import ConfigError, loadText
from mailauth.counters import SLOTS_PER_WINDOW, MemoryCounterStore, counterStoreFromConfig
from mailauth.interfaces import ICounterStore
from mailauth.redisstore import COUNT, RedisCounterStore
from mailauth.threads import ThreadPoolService
from mailauth.workerlink import NodeCounters, ParentCounters, ParentRequests
from tests.harness import LogWatcher
from tests.redisharness import freePort, startRedis
from tests.support import WorkerPipes
from tests.test_config import MINIMAL

# A realistic time (seconds since the epoch), on a slot boundary of WINDOW.
START = 1_700_000_000.0
# Ten minutes: slots of 10 seconds.
WINDOW = 600.0
SLOT = WINDOW / SLOTS_PER_WINDOW


class CounterStoreTestsMixin:
    """
    What every L{ICounterStore} does, on C{self.clock} (a L{Clock} at
    L{START}); C{self.store} is the store under test, made in C{setUp}.
    """

    clock: Clock
    store: ICounterStore

    def test_interface(self) -> None:
        """The store provides ICounterStore."""
        self.assertTrue(verifyObject(ICounterStore, self.store))

    @defer.inlineCallbacks
    def test_hitCounts(self):
        """Each hit answers the total within the window, its own amount included."""
        results = []
        for amount in (1, 1, 5, 100000):
            results.append((yield self.store.hit("k", WINDOW, amount)))
        self.assertEqual(results, [1, 2, 7, 100007])

    @defer.inlineCallbacks
    def test_totalReads(self):
        """total answers the sum without adding to it; an unknown key is 0."""
        self.assertEqual((yield self.store.total("k", WINDOW)), 0)
        yield self.store.hit("k", WINDOW, 3)
        self.assertEqual((yield self.store.total("k", WINDOW)), 3)
        self.assertEqual((yield self.store.total("k", WINDOW)), 3)

    @defer.inlineCallbacks
    def test_keysSeparate(self):
        """Each key counts on its own."""
        yield self.store.hit("addr:192.0.2.1", WINDOW, 2)
        yield self.store.hit("login:alice@example.org", WINDOW)
        self.assertEqual((yield self.store.total("addr:192.0.2.1", WINDOW)), 2)
        self.assertEqual((yield self.store.total("login:alice@example.org", WINDOW)), 1)
        self.assertEqual((yield self.store.total("addr:192.0.2.2", WINDOW)), 0)

    @defer.inlineCallbacks
    def test_windowSlides(self):
        """Events stop counting exactly one window after they happened."""
        yield self.store.hit("k", WINDOW, 3)
        self.clock.advance(WINDOW - 1)
        self.assertEqual((yield self.store.hit("k", WINDOW)), 4)
        self.clock.advance(1)
        self.assertEqual((yield self.store.total("k", WINDOW)), 1)
        self.clock.advance(WINDOW - 2)
        self.assertEqual((yield self.store.total("k", WINDOW)), 1)
        self.clock.advance(1)
        self.assertEqual((yield self.store.total("k", WINDOW)), 0)
        self.assertEqual((yield self.store.hit("k", WINDOW)), 1)

    @defer.inlineCallbacks
    def test_slotPrecision(self):
        """
        Events within one slot (window / 60) are kept together and expire
        with the latest of them: an event counts at most one slot longer
        than the window, never less.
        """
        yield self.store.hit("k", WINDOW)
        self.clock.advance(SLOT / 2)
        yield self.store.hit("k", WINDOW)
        self.clock.advance(SLOT / 2)
        yield self.store.hit("k", WINDOW)
        self.clock.advance(WINDOW - SLOT / 2 - 1)
        # The first event is a window old, yet counted with the second, in
        # its slot; the third, in the next slot, is counted too.
        self.assertEqual((yield self.store.total("k", WINDOW)), 3)
        self.clock.advance(1)
        self.assertEqual((yield self.store.total("k", WINDOW)), 1)
        self.clock.advance(SLOT / 2)
        self.assertEqual((yield self.store.total("k", WINDOW)), 0)

    @defer.inlineCallbacks
    def test_longWindow(self):
        """
        A day of events, one every 97 seconds, is counted exactly; half a
        day later the older half has expired, give or take one slot.
        """
        day = 86400.0
        every = 97
        count = 0
        for _ in range(int(day // every)):
            count = yield self.store.hit("k", day, 2)
            self.clock.advance(every)
        self.assertEqual(count, 2 * int(day // every))
        self.assertEqual((yield self.store.total("k", day)), count)
        self.clock.advance(day / 2)
        # Exactly: the events after now - day.
        now = self.clock.seconds()
        exact = sum(2 for i in range(int(day // every)) if START + i * every > now - day)
        slack = 2 * (int(day / SLOTS_PER_WINDOW) // every + 1)
        total = yield self.store.total("k", day)
        self.assertTrue(exact <= total <= exact + slack, (exact, total))

    @defer.inlineCallbacks
    def test_blockExpires(self):
        """A block holds for its duration on the clock, then ends by itself."""
        self.assertFalse((yield self.store.blocked("k")))
        yield self.store.block("k", 60)
        self.assertTrue((yield self.store.blocked("k")))
        self.assertFalse((yield self.store.blocked("other")))
        self.clock.advance(59)
        self.assertTrue((yield self.store.blocked("k")))
        self.clock.advance(1)
        self.assertFalse((yield self.store.blocked("k")))

    @defer.inlineCallbacks
    def test_blockRenewed(self):
        """
        Blocking a blocked key again starts its duration again; the answer
        says whether the block is new (the key was not blocked before).
        """
        self.assertIs((yield self.store.block("k", 60)), True)
        self.clock.advance(30)
        self.assertIs((yield self.store.block("k", 60)), False)
        self.clock.advance(59)
        self.assertTrue((yield self.store.blocked("k")))
        self.clock.advance(1)
        self.assertFalse((yield self.store.blocked("k")))
        self.assertIs((yield self.store.block("k", 60)), True)

    @defer.inlineCallbacks
    def test_blocksAndCountersSeparate(self):
        """A block and a counter of the same key do not touch each other."""
        yield self.store.block("k", 60)
        self.assertEqual((yield self.store.total("k", WINDOW)), 0)
        yield self.store.hit("j", WINDOW)
        self.assertFalse((yield self.store.blocked("j")))

    @defer.inlineCallbacks
    def test_badArguments(self):
        """Bad arguments fail the Deferred with a ValueError naming them, and record nothing."""
        cases = [
            (self.store.hit, ("k", 0), "window 0"),
            (self.store.hit, ("k", -5.0), "window -5.0"),
            (self.store.hit, ("k", float("inf")), "window inf"),
            (self.store.hit, ("k", WINDOW, 0), "amount 0"),
            (self.store.hit, ("k", WINDOW, -1), "amount -1"),
            (self.store.hit, ("k", WINDOW, 1.5), "amount 1.5"),
            (self.store.hit, ("", WINDOW), "counter key ''"),
            (self.store.hit, (None, WINDOW), "counter key None"),
            (self.store.total, ("k", "600"), "window '600'"),
            (self.store.block, ("k", 0), "duration 0"),
            (self.store.block, ("k", -1), "duration -1"),
            (self.store.blocked, (b"k",), "counter key b'k'"),
        ]
        for method, args, message in cases:
            e = yield self.assertFailure(method(*args), ValueError)
            self.assertTrue(str(e).startswith(message), (args, str(e)))
        self.assertEqual((yield self.store.total("k", WINDOW)), 0)
        self.assertFalse((yield self.store.blocked("k")))


class MemoryCounterStoreTests(CounterStoreTestsMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.store = MemoryCounterStore(self.clock, maxKeys=100)

    def test_keysBounded(self) -> None:
        """
        However many keys an attacker makes, at most maxKeys counters and
        maxKeys blocks are held, the least recently used dropped first.
        """
        store = self.store
        for i in range(5000):
            store.add(f"addr:{i}", WINDOW)
            store.setBlock(f"addr:{i}", 60)
            store.add("kept", WINDOW)
        self.assertEqual(store.trackedKeys(), 200)
        self.assertEqual(store.count("kept", WINDOW), 5000)
        self.assertEqual(store.count("addr:4999", WINDOW), 1)
        self.assertTrue(store.isBlocked("addr:4999"))
        self.assertEqual(store.count("addr:0", WINDOW), 0)
        self.assertFalse(store.isBlocked("addr:0"))

    def test_readKeepsKey(self) -> None:
        """A counter read with total is used as much as one hit: it is dropped last."""
        store = self.store
        store.add("read", WINDOW)
        for i in range(500):
            store.add(f"addr:{i}", WINDOW)
            store.count("read", WINDOW)
        self.assertEqual(store.count("read", WINDOW), 1)

    def test_idleForgotten(self) -> None:
        """Counters and blocks that expired are dropped as newer ones arrive."""
        store = self.store
        for i in range(50):
            store.add(f"old:{i}", WINDOW)
            store.setBlock(f"old:{i}", 60)
        self.clock.advance(WINDOW)
        for i in range(30):
            store.add(f"new:{i}", WINDOW)
            store.setBlock(f"new:{i}", 60)
        self.assertEqual(store.trackedKeys(), 60)

    def test_eventsCompacted(self) -> None:
        """
        A key hit 100000 times over a day (recipients in a daily limit)
        holds a few kilobytes, not one entry per event.
        """
        day = 86400.0
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(100000):
            self.store.add("login:bulk@example.org", day)
            self.clock.advance(day / 100000)
        used = tracemalloc.get_traced_memory()[0] - before
        self.assertEqual(self.store.count("login:bulk@example.org", day), 100000)
        self.assertLess(used, 8000)

    def test_clockSetBack(self) -> None:
        """An event recorded after the clock was set back is counted and expires no earlier."""
        self.store.add("k", WINDOW)
        self.clock.rightNow -= 3 * SLOT
        self.assertEqual(self.store.add("k", WINDOW), 2)
        self.clock.rightNow += 3 * SLOT + WINDOW - 1
        self.assertEqual(self.store.count("k", WINDOW), 2)
        self.clock.advance(1)
        self.assertEqual(self.store.count("k", WINDOW), 0)

    def test_maxKeysChecked(self) -> None:
        """maxKeys below 1 is refused."""
        self.assertRaises(ValueError, MemoryCounterStore, self.clock, maxKeys=0)


def redisEvents(watcher: LogWatcher) -> list:
    """What the Redis store logged, formatted."""
    return [
        m
        for m, e in zip(watcher.messages, watcher.events)
        if e.get("log_namespace") == "mailauth.redisstore"
    ]


class RedisCounterStoreTests(CounterStoreTestsMixin, unittest.TestCase):
    """
    The Redis store against a real redis-server, its time driven by the
    Clock (C{serverTime=False}), its calls in a real thread pool.
    """

    def setUp(self) -> None:
        self.redis = startRedis(self)
        self.pool = ThreadPoolService(reactor, "test-redis", 4, maxQueued=100)
        self.pool.startService()
        self.addCleanup(self.pool.stopService)
        self.clock = Clock()
        self.clock.advance(START)
        self.fallbacks = 0
        self.watcher = LogWatcher()
        self.addCleanup(self.watcher.stop)
        self.store = self.makeStore()
        self.inspect = self.redis.client()
        self.addCleanup(self.inspect.connection_pool.disconnect)

    def makeStore(self, url=None, **kwargs) -> RedisCounterStore:
        def onFallback():
            self.fallbacks += 1

        options = dict(
            clock=self.clock,
            runBlocking=self.pool.run,
            serverTime=False,
            timeout=0.5,
            retryInterval=10,
            onFallback=onFallback,
        )
        options.update(kwargs)
        store = RedisCounterStore.fromURL(url or self.redis.unixURL, **options)
        self.addCleanup(store.client.connection_pool.disconnect)
        return store

    @defer.inlineCallbacks
    def test_twoNodesCountTogether(self):
        """Two stores on one Redis (two nodes), over TCP and the unix socket, count together."""
        other = self.makeStore(self.redis.url)
        self.assertEqual((yield self.store.hit("k", WINDOW, 2)), 2)
        self.assertEqual((yield other.hit("k", WINDOW, 3)), 5)
        self.assertEqual((yield self.store.total("k", WINDOW)), 5)
        self.assertEqual((yield other.total("k", WINDOW)), 5)
        self.assertFalse(self.store.usingFallback or other.usingFallback)

    @defer.inlineCallbacks
    def test_bruteForceSpreadOverNodes(self):
        """
        Guesses spread over three nodes are counted once each, so the
        limit is reached after as many guesses as against one node, and a
        block set by one node holds on the others.
        """
        nodes = [self.store, self.makeStore(), self.makeStore(self.redis.url)]
        totals = []
        for guess in range(10):
            totals.append((yield nodes[guess % 3].hit("addr:192.0.2.7", WINDOW)))
        self.assertEqual(totals, list(range(1, 11)))
        # The node that sets the block is told it is new; the others, not.
        self.assertIs((yield nodes[1].block("addr:192.0.2.7", 900)), True)
        for node in nodes:
            self.assertTrue((yield node.blocked("addr:192.0.2.7")))
        self.assertIs((yield nodes[2].block("addr:192.0.2.7", 900)), False)

    @defer.inlineCallbacks
    def test_concurrentHitsAtomic(self):
        """Hits in flight at once from two nodes are all counted, each total once."""
        other = self.makeStore(self.redis.url)
        results = yield defer.gatherResults(
            [node.hit("k", WINDOW) for _ in range(50) for node in (self.store, other)]
        )
        self.assertEqual(sorted(results), list(range(1, 101)))

    @defer.inlineCallbacks
    def test_keysUnderPrefixExpire(self):
        """
        Every key is under the prefix and has a time to live: a counter a
        window and a slot after its last hit, a block at its end.
        """
        store = self.makeStore(prefix="test:")
        yield store.hit("login:alice@example.org", WINDOW)
        yield store.block("addr:192.0.2.1", 60)
        keys = sorted(self.inspect.keys("*"))
        self.assertEqual(keys, [b"test:b:addr:192.0.2.1", b"test:c:login:alice@example.org"])
        counterTTL = self.inspect.pttl("test:c:login:alice@example.org")
        self.assertTrue(WINDOW * 1000 < counterTTL <= (WINDOW + SLOT) * 1000, counterTTL)
        blockTTL = self.inspect.pttl("test:b:addr:192.0.2.1")
        self.assertTrue(50000 < blockTTL <= 60000, blockTTL)

    @defer.inlineCallbacks
    def test_compactInRedis(self):
        """
        A key hit every few seconds over its window holds one entry per
        slot, and counts as the memory store does.
        """
        memory = MemoryCounterStore(self.clock)
        for _ in range(200):
            total = yield self.store.hit("k", WINDOW)
            self.assertEqual(total, memory.add("k", WINDOW))
            self.clock.advance(7)
        self.assertEqual((yield self.store.total("k", WINDOW)), memory.count("k", WINDOW))
        self.assertLessEqual(self.inspect.hlen("mailauth:c:k"), 2 * (SLOTS_PER_WINDOW + 2))

    @defer.inlineCallbacks
    def test_scriptCacheFlushed(self):
        """When Redis has lost the scripts (a restart, SCRIPT FLUSH), they are sent again."""
        yield self.store.hit("k", WINDOW)
        yield self.store.block("b", 60)
        self.inspect.script_flush()
        self.assertEqual((yield self.store.hit("k", WINDOW)), 2)
        self.assertTrue((yield self.store.blocked("b")))
        self.assertEqual(
            self.inspect.script_exists(redisstore.COUNT.sha, redisstore.BLOCKED.sha), [True, True]
        )
        self.assertFalse(self.store.usingFallback)

    @defer.inlineCallbacks
    def test_serverTime(self):
        """With serverTime, windows and blocks are measured on Redis's clock, not the node's."""
        store = self.makeStore(serverTime=True)
        self.clock.advance(-START)
        yield store.hit("k", WINDOW)
        seconds, micros = self.inspect.time()
        [stamp] = [
            int(v) for f, v in self.inspect.hgetall("mailauth:c:k").items() if f.startswith(b"t")
        ]
        self.assertLess(abs(stamp - (seconds * 1000 + micros // 1000)), 60000)
        yield store.block("b", 60)
        self.clock.advance(3600)
        self.assertTrue((yield store.blocked("b")))

    @defer.inlineCallbacks
    def test_redisStopped(self):
        """
        With Redis stopped every call is answered from the node's memory;
        one line is logged and the hook called once; Redis is tried again
        after the retry interval, and answers again with one more line.
        """
        yield self.store.hit("k", WINDOW, 3)
        yield self.store.block("b", 900)
        self.redis.stop(save=True)
        self.assertEqual((yield self.store.hit("k", WINDOW)), 4)
        self.assertTrue(self.store.usingFallback)
        self.assertEqual((yield self.store.hit("k", WINDOW)), 5)
        self.assertEqual((yield self.store.total("k", WINDOW)), 5)
        self.assertTrue((yield self.store.blocked("b")))
        yield self.store.block("c", 900)
        self.assertTrue((yield self.store.blocked("c")))
        self.assertEqual(self.fallbacks, 1)
        [line] = redisEvents(self.watcher)
        self.assertIn("state backend unix://", line)
        self.assertIn("counting in this process's memory", line)

        # Redis is back (from its dump), but is not tried again before the
        # interval.
        self.redis.start()
        self.clock.advance(9)
        self.assertEqual((yield self.store.hit("k", WINDOW)), 6)
        self.assertTrue(self.store.usingFallback)
        self.clock.advance(1)
        self.assertEqual((yield self.store.hit("k", WINDOW)), 4)
        self.assertFalse(self.store.usingFallback)
        self.assertEqual(len(redisEvents(self.watcher)), 2)
        self.assertIn("answers again", redisEvents(self.watcher)[1])
        self.assertEqual(self.fallbacks, 1)

    @defer.inlineCallbacks
    def test_blockSeenHeldInOutage(self):
        """
        A block set by another node, once seen, still holds on this node
        while Redis is down, until it ends.
        """
        other = self.makeStore(self.redis.url)
        yield other.block("addr:192.0.2.9", 900)
        self.clock.advance(100)
        self.assertTrue((yield self.store.blocked("addr:192.0.2.9")))
        self.redis.stop()
        self.assertTrue((yield self.store.blocked("addr:192.0.2.9")))
        self.assertTrue(self.store.usingFallback)
        self.clock.advance(799)
        self.assertTrue((yield self.store.blocked("addr:192.0.2.9")))
        self.clock.advance(1)
        self.assertFalse((yield self.store.blocked("addr:192.0.2.9")))

    @defer.inlineCallbacks
    def test_blockSetInOutageHeldAfter(self):
        """
        A block this node set while Redis was down still holds on it once
        Redis answers again (Redis never heard of it), until it ends: the
        address it refused is not let in again the moment Redis is back.
        """
        self.redis.stop()
        yield self.store.block("addr:192.0.2.9", 900)
        self.assertTrue((yield self.store.blocked("addr:192.0.2.9")))
        self.assertTrue(self.store.usingFallback)
        self.redis.start()
        self.clock.advance(10)
        self.assertTrue((yield self.store.blocked("addr:192.0.2.9")))
        self.assertFalse(self.store.usingFallback)
        self.assertFalse((yield self.store.blocked("addr:192.0.2.10")))
        self.clock.advance(889)
        self.assertTrue((yield self.store.blocked("addr:192.0.2.9")))
        self.clock.advance(1)
        self.assertFalse((yield self.store.blocked("addr:192.0.2.9")))

    @defer.inlineCallbacks
    def test_retriedWhileDown(self):
        """A Redis still down at the retry is tried again later, without logging again."""
        self.redis.stop()
        yield self.store.hit("k", WINDOW)
        for _ in range(3):
            self.clock.advance(10)
            self.assertEqual((yield self.store.total("k", WINDOW)), 1)
            self.assertTrue(self.store.usingFallback)
        self.assertEqual(len(redisEvents(self.watcher)), 1)
        self.assertEqual(self.fallbacks, 1)

    @defer.inlineCallbacks
    def test_countsAcrossFallback(self):
        """
        During an outage a node counts its own hits, those before it
        included; once Redis is back (here restarted from its dump) its
        counts are the truth again, and the hits counted locally during
        the outage are not in them.
        """
        other = self.makeStore(self.redis.url)
        yield self.store.hit("k", WINDOW, 3)
        yield other.hit("k", WINDOW, 4)
        self.redis.stop(save=True)
        self.assertEqual((yield self.store.hit("k", WINDOW, 2)), 3 + 2)
        self.assertEqual((yield other.hit("k", WINDOW, 2)), 4 + 2)
        self.redis.start()
        self.clock.advance(10)
        self.assertEqual((yield self.store.hit("k", WINDOW)), 3 + 4 + 1)
        self.assertEqual((yield other.total("k", WINDOW)), 3 + 4 + 1)
        self.assertFalse(self.store.usingFallback or other.usingFallback)

    def workers(self) -> tuple:
        """
        Two workers' stores (same Redis) and their parent's counters, the
        pipes between them answering at once; and each worker's pipe.
        """
        node = NodeCounters(MemoryCounterStore(self.clock))
        pipes = [WorkerPipes(node.control, atOnce=True) for _ in range(2)]
        stores = [self.makeStore(self.redis.url, node=p.counters) for p in pipes]
        return stores, node, pipes

    @defer.inlineCallbacks
    def test_workersCountTogetherInOutage(self):
        """
        With workers, hits answered locally during an outage are counted in
        the parent too, and answered with the larger of its count and the
        worker's own (which holds the worker's history from before the
        outage): the workers of a node count together, as one process
        does. A block one of them sets is new once for the node, and holds
        for the other.
        """
        (one, two), node, pipes = self.workers()
        yield one.hit("k", WINDOW, 3)
        self.redis.stop()
        self.assertEqual((yield one.hit("k", WINDOW)), 4)
        self.assertEqual((yield two.hit("k", WINDOW)), 2)
        self.assertEqual((yield two.hit("k", WINDOW, 3)), 5)
        self.assertEqual((yield one.total("k", WINDOW)), 5)
        self.assertEqual((yield two.total("k", WINDOW)), 5)
        self.assertTrue(one.usingFallback and two.usingFallback)
        self.assertIs((yield one.block("addr:192.0.2.9", 900)), True)
        self.assertIs((yield two.block("addr:192.0.2.9", 900)), False)
        self.assertTrue((yield two.blocked("addr:192.0.2.9")))
        self.assertFalse((yield two.blocked("addr:192.0.2.10")))

    @defer.inlineCallbacks
    def test_blockSeenFromParentRemembered(self):
        """
        A block another worker set during the outage, once a worker has
        learned it from the parent, holds on that worker after the outage
        too, for what remained of it.
        """
        (one, two), node, pipes = self.workers()
        self.redis.stop()
        yield one.block("addr:192.0.2.9", 900)
        self.clock.advance(100)
        self.assertTrue((yield two.blocked("addr:192.0.2.9")))
        self.assertTrue(two.local.isBlocked("addr:192.0.2.9"))
        self.redis.start()
        self.clock.advance(10)
        self.assertTrue((yield two.blocked("addr:192.0.2.9")))
        self.assertFalse(two.usingFallback)
        self.clock.advance(789)
        self.assertTrue((yield two.blocked("addr:192.0.2.9")))
        self.clock.advance(1)
        self.assertFalse((yield two.blocked("addr:192.0.2.9")))

    @defer.inlineCallbacks
    def test_parentNotAskedWhileRedisAnswers(self):
        """While Redis answers, a worker sends its parent nothing: no cost per call."""
        (one, two), node, pipes = self.workers()
        yield one.hit("k", WINDOW)
        yield one.total("k", WINDOW)
        yield one.block("addr:192.0.2.9", 60)
        self.assertTrue((yield two.blocked("addr:192.0.2.9")))
        self.assertFalse((yield two.blocked("addr:192.0.2.10")))
        self.assertEqual([p.sent for p in pipes], [[], []])

    @defer.inlineCallbacks
    def test_parentCannotAnswer(self):
        """
        A question the parent cannot answer is answered by the worker
        alone, with an error line: no call fails for it.
        """
        node = NodeCounters(MemoryCounterStore(self.clock))
        garbled = ParentRequests(lambda line: garbled.answered(line.split(b" ")[1] + b" ?"))
        store = self.makeStore(node=ParentCounters(garbled))
        yield store.hit("k", WINDOW, 2)
        self.redis.stop()
        self.assertEqual((yield store.hit("k", WINDOW)), 3)
        self.assertFalse((yield store.blocked("b")))
        self.assertIs((yield store.block("b", 60)), True)
        self.assertEqual(node.store.trackedKeys(), 0)
        errors = [
            e
            for e in self.watcher.events
            if "parent's counters could not answer" in e.get("log_format", "")
        ]
        self.assertEqual(len(errors), 3)

    @defer.inlineCallbacks
    def test_restartedRedisEmpty(self):
        """
        A Redis restarted without its data is used again at once, and
        counts from nothing, as a restarted daemon with memory counters
        does (run Redis with persistence to keep counts over restarts).
        """
        yield self.store.hit("k", WINDOW, 3)
        self.redis.stop()
        self.redis.start()
        self.assertEqual((yield self.store.hit("k", WINDOW)), 1)
        self.assertFalse(self.store.usingFallback)
        self.assertEqual(redisEvents(self.watcher), [])

    @defer.inlineCallbacks
    def test_redisHung(self):
        """
        A Redis that stops answering (SIGSTOP) times out into the fallback;
        once it runs again it is used again after the retry interval.
        """
        yield self.store.hit("k", WINDOW)
        self.redis.pause()
        self.assertEqual((yield self.store.hit("k", WINDOW)), 2)
        self.assertTrue(self.store.usingFallback)
        [line] = redisEvents(self.watcher)
        self.assertIn("TimeoutError", line)
        self.redis.resume()
        self.clock.advance(10)
        self.assertEqual((yield self.store.hit("k", WINDOW)), 3)
        self.assertFalse(self.store.usingFallback)

    @defer.inlineCallbacks
    def test_oneProbeAtATime(self):
        """While one call tries a Redis that hangs, the others are answered locally at once."""
        self.redis.pause()
        yield self.store.hit("k", WINDOW)
        self.clock.advance(10)
        probe = self.store.hit("k", WINDOW)
        others = [self.store.hit("k", WINDOW) for _ in range(5)]
        self.assertEqual([d.called for d in others], [True] * 5)
        self.assertFalse(probe.called)
        self.assertEqual((yield probe), 7)
        self.assertTrue(self.store.usingFallback)
        self.assertEqual(len(redisEvents(self.watcher)), 1)

    @defer.inlineCallbacks
    def test_poolBusy(self):
        """
        A call the thread pool is too busy to take (a burst of connections)
        is answered locally, but Redis has not failed: the store goes on
        using it, so a flood of connections cannot turn the node's shared
        counting off.
        """
        busy = [True]
        full = ThreadPoolService(reactor, "full", 1, maxQueued=0).run

        def runBlocking(*args):
            return full(*args) if busy[0] else self.pool.run(*args)

        store = self.makeStore(runBlocking=runBlocking)
        yield self.store.hit("k", WINDOW, 5)
        self.assertEqual((yield store.hit("k", WINDOW)), 1)
        self.assertFalse(store.usingFallback)
        self.assertEqual((self.fallbacks, redisEvents(self.watcher)), (0, []))
        busy[0] = False
        # The hit answered locally stays local, as in an outage.
        self.assertEqual((yield store.hit("k", WINDOW)), 6)

    def test_queuedCallsKeepTheirDeadline(self):
        """
        When Redis hangs with many calls waiting for a thread, each is
        answered locally C{timeout} after it was made, not one timeout
        after another as the threads free up: honest logins never wait
        for Redis longer than C{[state] timeout}. One line is logged.
        """
        stuck: list = []

        def runBlocking(*args):
            stuck.append(defer.Deferred())
            return stuck[-1]

        store = self.makeStore(runBlocking=runBlocking)
        calls = [store.hit("k", WINDOW) for _ in range(20)]
        self.clock.advance(0.4)
        self.assertEqual([d.called for d in calls], [False] * 20)
        self.clock.advance(0.1)
        # (Each hit was counted locally when it was made.)
        self.assertEqual([self.successResultOf(d) for d in calls], [20] * 20)
        self.assertTrue(store.usingFallback)
        self.assertEqual(len(redisEvents(self.watcher)), 1)
        self.assertIn("TimeoutError", redisEvents(self.watcher)[0])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_expiredCallNotSent(self):
        """A thread that gets a call whose deadline has passed does not send it to Redis."""
        self.assertRaises(
            TimeoutError, self.store._evaluate, time.monotonic() - 1, COUNT, "mailauth:c:k", 0
        )

    @defer.inlineCallbacks
    def test_passwordNotLogged(self):
        """The fallback line names the Redis without its password."""
        store = self.makeStore(f"redis://:s3cret@127.0.0.1:{freePort()}/0")
        self.assertEqual((yield store.hit("k", WINDOW)), 1)
        [line] = redisEvents(self.watcher)
        self.assertIn("redis://:***@127.0.0.1", line)
        self.assertNotIn("s3cret", line)

    @defer.inlineCallbacks
    def test_hookFailureLogged(self):
        """A hook that raises is logged, and the call is still answered."""

        def broken():
            raise RuntimeError("metric broken")

        self.redis.stop()
        store = self.makeStore(onFallback=broken)
        self.assertEqual((yield store.hit("k", WINDOW)), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class FactoryTests(unittest.TestCase):
    def test_memory(self) -> None:
        """backend = memory (the default) makes a MemoryCounterStore on the reactor's clock."""
        clock = Clock()
        store = counterStoreFromConfig(loadText(MINIMAL), clock, runBlocking=None)
        self.assertIsInstance(store, MemoryCounterStore)
        self.assertIs(store.clock, clock)
        self.assertEqual(store.maxKeys, 4 * 10000)

    def test_redis(self) -> None:
        """A redis URL makes a RedisCounterStore with the prefix and timeout of [state]."""
        cfg = loadText(
            MINIMAL + "\n[state]\nbackend = redis://:pw@127.0.0.1:6390/2\nprefix = mx:\n"
            "timeout = 250\n"
        )
        calls = []
        store = counterStoreFromConfig(cfg, Clock(), calls.append, onFallback=calls.append)
        self.addCleanup(store.client.connection_pool.disconnect)
        self.assertIsInstance(store, RedisCounterStore)
        self.assertEqual((store.prefix, store.where), ("mx:", "redis://:***@127.0.0.1:6390/2"))
        self.assertTrue(store.serverTime)
        self.assertIsInstance(store.local, MemoryCounterStore)
        kwargs = store.client.connection_pool.connection_kwargs
        self.assertEqual((kwargs["socket_timeout"], kwargs["db"]), (250.0, 2))

    def test_redisClientMissing(self) -> None:
        """Without the redis client, a redis backend is one clear configuration error."""
        cfg = loadText(MINIMAL + "\n[state]\nbackend = redis://127.0.0.1/0\n", "test.conf")
        saved = {name: sys.modules.get(name) for name in ("redis", "mailauth.redisstore")}

        def restore():
            for name, module in saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module

        self.addCleanup(restore)
        sys.modules["redis"] = None
        sys.modules.pop("mailauth.redisstore", None)
        e = self.assertRaises(ConfigError, counters.counterStoreFromConfig, cfg, Clock(), None)
        self.assertEqual(len(e.problems), 1)
        self.assertIn(
            "test.conf: [state] backend: a redis URL needs the Python redis client", e.problems[0]
        )
