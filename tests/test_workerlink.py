"""
The node's connection limits with workers (L{mailauth.workerlink}): the
parent's one count (L{NodeConnections}) asked by each worker's sessions
through L{ParentConnections}, over the lines the real pipes carry; and the
parent's counters (L{NodeCounters}) the workers ask through
L{ParentCounters} while Redis is down. tests/test_workersdaemon.py runs the
same across two real workers.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from mailauth.counters import MemoryCounterStore
from mailauth.throttle import ConnectionLimiter
from mailauth.workerlink import (
    NodeConnections,
    NodeCounters,
    ParentConnections,
    ParentCounters,
    ParentRequests,
)
from tests.support import Session, WorkerPipes, makeFactory, makeThrottle

GREETING = [b"220 mx.example.test ESMTP mailauth"]
FROM_ADDRESS = [b"421 4.7.0 Error: too many connections from your address"]
TOO_MANY = [b"421 4.7.0 Error: too many connections, try again later"]
BLOCKED = [b"421 4.7.0 Error: too many failed logins, try again later"]


class NodeLimitsTests(unittest.TestCase):
    """Two workers' sessions, counted as one node."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.node = NodeConnections(ConnectionLimiter(3, 2))
        # Workers are numbered from 1, as the pool numbers them.
        # (n=n: each worker's own number.)
        self.pipes = {n: WorkerPipes(lambda line, n=n: self.node.control(n, line)) for n in (1, 2)}
        self.throttle = makeThrottle(self.clock)
        self.factories = {
            n: makeFactory(self.clock, connections=p.connections, throttle=self.throttle)
            for n, p in self.pipes.items()
        }
        self.sessions: list = []

    def connect(self, worker: int, host: str) -> list:
        """A client of C{host} to worker C{worker} (1 or 2); what it reads once answered."""
        session = Session(self.factories[worker], host)
        # Nothing before the parent answers: no greeting, no refusal.
        self.assertEqual(session.read(), [])
        self.pipes[worker].deliver()
        self.sessions.append(session)
        return session.read()

    def test_limitsCountEveryWorker(self) -> None:
        """
        C{max_connections_per_address} and C{max_connections} hold for the
        node, whichever worker took each connection; a closed one frees its
        place for any worker.
        """
        self.assertEqual(self.connect(1, "192.0.2.1"), GREETING)
        self.assertEqual(self.connect(2, "192.0.2.1"), GREETING)
        self.assertEqual(self.connect(1, "192.0.2.1"), FROM_ADDRESS)
        self.assertEqual(self.connect(2, "192.0.2.2"), GREETING)
        self.assertEqual(self.connect(1, "192.0.2.3"), TOO_MANY)
        self.sessions[0].protocol.connectionLost(None)
        self.assertEqual(self.pipes[1].sent[-1], b"release 192.0.2.1")
        self.assertEqual(self.connect(2, "192.0.2.1"), GREETING)
        self.assertEqual(self.node.limiter.count, 3)
        self.assertEqual(self.node.limiter.byAddress, {"192.0.2.1": 2, "192.0.2.2": 1})

    def test_refusedNeverReleased(self) -> None:
        """A refused connection was never counted: its end releases nothing."""
        self.node.limiter.perAddress = 0
        self.assertEqual(self.connect(1, "192.0.2.1"), FROM_ADDRESS)
        self.sessions[0].protocol.connectionLost(None)
        self.assertEqual(self.pipes[1].sent, [b"admit 1 192.0.2.1"])

    def test_leftWhileWaiting(self) -> None:
        """A client that leaves before the parent answers gives back the place it got."""
        session = Session(self.factories[1], "192.0.2.1")
        session.protocol.connectionLost(None)
        self.assertEqual(self.node.limiter.count, 1)
        self.pipes[1].deliver()
        self.assertEqual((session.read(), self.node.limiter.count), ([], 0))
        self.assertEqual(self.pipes[1].sent, [b"admit 1 192.0.2.1", b"release 192.0.2.1"])

    def test_blockedGivesItsPlaceBack(self) -> None:
        """An address the throttle blocks gets 421 and the place the parent gave it back."""
        self.successResultOf(self.throttle.store.block("auth-address:192.0.2.1", 60))
        self.assertEqual(self.connect(2, "192.0.2.1"), BLOCKED)
        self.assertEqual(self.node.limiter.count, 0)

    def test_workerEndedForgotten(self) -> None:
        """
        The connections of a worker that ended are given back, and only
        its own: a late or stray release cannot free another's place.
        """
        self.connect(1, "192.0.2.1")
        self.connect(1, "192.0.2.2")
        self.connect(2, "192.0.2.1")
        self.assertIsNone(self.node.control(2, b"release 192.0.2.2"))
        self.assertEqual(self.node.limiter.count, 3)
        self.node.forget(2)
        self.assertEqual(self.node.limiter.byAddress, {"192.0.2.1": 1, "192.0.2.2": 1})
        self.node.forget(2)
        self.node.control(2, b"release 192.0.2.1")
        self.assertEqual(self.node.limiter.count, 2)
        self.node.forget(1)
        self.assertEqual((self.node.limiter.count, self.node.limiter.byAddress), (0, {}))

    def test_ipv6CountedByPrefix(self) -> None:
        """The parent counts an IPv6 client by its /64, as one process does."""
        self.assertEqual(self.connect(1, "2001:db8::1"), GREETING)
        self.assertEqual(self.connect(2, "2001:db8::2"), GREETING)
        self.assertEqual(self.connect(2, "2001:db8::3"), FROM_ADDRESS)

    def test_answerForNoRequest(self) -> None:
        """An answer to nothing the worker asked (a garbled line) is ignored."""
        requests = ParentRequests(lambda line: None)
        d = ParentConnections(requests).acquire("192.0.2.1")
        requests.answered(b"7 ok")
        requests.answered(b"")
        self.assertNoResult(d)
        requests.answered(b"1 ok")
        self.assertIsNone(self.successResultOf(d))


class NodeCountersTests(unittest.TestCase):
    """Two workers counting on their parent's counters."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.node = NodeCounters(MemoryCounterStore(self.clock))
        self.pipes = [WorkerPipes(self.node.control) for _ in range(2)]

    def answer(self, pipe: WorkerPipes, d):
        self.assertNoResult(d)
        pipe.deliver()
        return self.successResultOf(d)

    def test_countTogether(self) -> None:
        """Hits from either worker add up in the parent; a read adds nothing."""
        one, two = self.pipes
        self.assertEqual(self.answer(one, one.counters.count("auth-address:192.0.2.1", 60, 1)), 1)
        self.assertEqual(self.answer(two, two.counters.count("auth-address:192.0.2.1", 60, 2)), 3)
        self.assertEqual(self.answer(one, one.counters.count("auth-address:192.0.2.1", 60)), 3)
        self.assertEqual(self.answer(two, two.counters.count("auth-address:192.0.2.9", 60)), 0)
        self.clock.advance(61)
        self.assertEqual(self.answer(one, one.counters.count("auth-address:192.0.2.1", 60)), 0)
        self.assertEqual(
            one.sent[0], b"count 1 auth-address%3A192.0.2.1 60.0 1", "the line on the pipe"
        )

    def test_blocks(self) -> None:
        """A block one worker sets is new once, and the other learns how long it holds."""
        one, two = self.pipes
        self.assertEqual(self.answer(two, two.counters.blockedFor("a")), 0)
        self.assertIs(self.answer(one, one.counters.block("a", 900)), True)
        self.assertIs(self.answer(two, two.counters.block("a", 900)), False)
        self.clock.advance(100.2004)
        # Rounded up to the millisecond: never shorter than the parent's.
        self.assertEqual(self.answer(two, two.counters.blockedFor("a")), 799.8)
        self.clock.advance(800)
        self.assertEqual(self.answer(one, one.counters.blockedFor("a")), 0)
        self.assertIs(self.answer(one, one.counters.block("a", 900)), True)

    def test_anyKey(self) -> None:
        """Keys with spaces, percent signs and non-ASCII text cross the pipe whole."""
        one, two = self.pipes
        key = 'limit:messages:"a b"%20@exämple.test'
        self.assertEqual(self.answer(one, one.counters.count(key, 60, 4)), 4)
        self.assertEqual(self.node.store.count(key, 60), 4)
        self.assertNotIn(b" b", one.sent[0])

    def test_answersInOrderOfArrival(self) -> None:
        """Questions waiting together are each answered with their own number."""
        one = self.pipes[0]
        first = one.counters.count("x", 60, 5)
        second = one.counters.count("y", 60, 7)
        one.deliver()
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (5, 7))

    def test_badLines(self) -> None:
        """
        A line the parent cannot read is answered C{ID ?}, which fails the
        question with ValueError; nothing is counted. A line without an ID
        gets no answer.
        """
        for line in (
            b"count k1 key",
            b"count k1 key sixty 1",
            b"count k1 key 60 1 2",
            b"count k1 %ZZ%FF 60 1",
            b"count k1 key -60 1",
            b"count k1  60 1",
            b"block k1 key",
            b"block k1 key 0",
            b"blocked k1",
            b"blocked k1 key extra",
            b"count k1",
        ):
            self.assertEqual(self.node.control(line), b"k1 ?", line)
        self.assertIsNone(self.node.control(b"count"))
        self.assertEqual(self.node.store.trackedKeys(), 0)
        requests = ParentRequests(lambda line: None)
        d = ParentCounters(requests).count("key", 60, 1)
        requests.answered(b"1 ?")
        self.failureResultOf(d, ValueError)

    def test_answerForNoQuestion(self) -> None:
        """An answer to nothing the worker asked is ignored."""
        requests = ParentRequests(lambda line: None)
        d = ParentCounters(requests).count("key", 60)
        requests.answered(b"7 3")
        requests.answered(b"")
        self.assertNoResult(d)
        requests.answered(b"1 3")
        self.assertEqual(self.successResultOf(d), 3)

    def test_answersTellApart(self) -> None:
        """
        On one worker's pipe, answers to counter questions and to connection
        requests, interleaved, each reach the one that asked.
        """
        connections = NodeConnections(ConnectionLimiter(3, 2))
        counters = self.node

        def control(line: bytes):
            if line.startswith((b"admit ", b"release ")):
                return connections.control(1, line)
            return counters.control(line)

        pipes = WorkerPipes(control)
        admitted = pipes.connections.acquire("192.0.2.1")
        counted = pipes.counters.count("k", 60, 2)
        blocked = pipes.counters.blockedFor("k")
        pipes.deliver()
        self.assertIsNone(self.successResultOf(admitted))
        self.assertEqual(self.successResultOf(counted), 2)
        self.assertEqual(self.successResultOf(blocked), 0)
        self.assertEqual(connections.limiter.count, 1)
