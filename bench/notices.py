#!/usr/bin/env python3
"""
What the forward queue's scheduler costs with thousands of messages queued:
CPU seconds of the whole run and of the scheduler alone, printed; nothing is
asserted.

    .venv/bin/python bench/notices.py                  # 1000, 2000 and 4000 messages
    .venv/bin/python bench/notices.py 10000 --dir /dev/shm

Each run queues N messages from a local sender, each to a remote recipient
with NOTIFY=DELAY, into a real queue folder (on tmpfs, --dir /dev/shm, the
disk's fsyncs cost nothing and the figures are the code's), and runs
mailauth.forward.QueueService on a clock, its blocking work done one call
at a time as a thread pool would, against a relay in memory: first an hour
with the relay down (an attempt at the start, then one delay notice per
message, queued and delivered to the local sender), then with the relay back
until the queue is empty. "scheduler" is the time spent finding what is
due and setting the timer: before it kept its timelines (heaps) it looked at
every message for each, and grew with the square of the queue (4000
messages: 43 s of the relay-down hour's 50 s; now 0.2 s of 5 s).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet import defer  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from zope.interface import implementer  # noqa: E402

from mailauth.envelope import RecipientStatus  # noqa: E402
from mailauth.forward import QueueService  # noqa: E402
from mailauth.interfaces import ILocalDelivery, IRelaySession  # noqa: E402
from mailauth.relay import RelayError, RelayReply  # noqa: E402
from mailauth.spool import Queue  # noqa: E402
from tests.support import relayConfig  # noqa: E402

MESSAGE = b"From: alice@example.org\r\nSubject: queued\r\n\r\nHello Bob.\r\n"
# The scheduler's own work: finding what is due, setting the timer.
SCHEDULER = ("_dispatch", "_setTimer", "_takeLocal", "_takeRemote", "_scanned")


class Pool:
    """Blocking work run one call at a time when pumped, as a thread pool does it."""

    def __init__(self) -> None:
        self.calls: collections.deque = collections.deque()

    def __call__(self, f, *args, **kwargs) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((d, f, args, kwargs))
        return d

    def pump(self) -> None:
        while self.calls:
            d, f, args, kwargs = self.calls.popleft()
            try:
                result = f(*args, **kwargs)
            except Exception:
                d.errback()
            else:
                d.callback(result)


@implementer(ILocalDelivery)
class LocalSenders:
    def __init__(self) -> None:
        self.delivered = 0

    def isLocal(self, address: str) -> bool:
        return address.endswith("@example.org")

    def deliver(self, recipient: str, message: bytes) -> defer.Deferred:
        self.delivered += 1
        return defer.succeed(None)


@implementer(IRelaySession)
class Session:
    dsn = False
    reusable = True

    def __init__(self, relay) -> None:
        self.relay = relay

    def deliver(self, sender, recipients, message, size, body8bit, envelope=None):
        message.read()
        self.relay.relayed += 1
        return defer.succeed({r: RelayReply(250, ("2.0.0 Ok",)) for r in recipients})

    def close(self):
        return defer.succeed(None)

    def abort(self):
        return defer.succeed(None)


class Relay:
    def __init__(self) -> None:
        self.down = True
        self.relayed = 0

    def connect(self) -> defer.Deferred:
        if self.down:
            return defer.fail(RelayError("connection refused"))
        return defer.succeed(Session(self))


def run(count: int, folder: str) -> None:
    directory = tempfile.mkdtemp(prefix="mailauth-bench-queue-", dir=folder)
    try:
        clock = Clock()
        clock.advance(1_800_000_000)
        queue = Queue(directory, clock, "mail.example.org")
        for n in range(count):
            writer = queue.newMessage(
                f"m{n:06d}",
                "alice@example.org",
                [RecipientStatus("bob@remote.example", notify=("DELAY",))],
            )
            writer.write(MESSAGE)
            writer.commit()
        relay, local, pool = Relay(), LocalSenders(), Pool()
        config = relayConfig(host="relay.example", retry_max=7200.0, delay_warning=3600.0)
        service = QueueService(queue, config, clock, local, runBlocking=pool, connector=relay)
        spent = collections.Counter()
        for name in SCHEDULER:
            if hasattr(service, name):
                setattr(service, name, timed(getattr(service, name), name, spent))

        def runFor(seconds: float) -> float:
            cpu = time.process_time()
            end = clock.seconds() + seconds
            while True:
                pool.pump()
                due = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= end]
                if not due:
                    break
                clock.advance(max(min(due) - clock.seconds(), 0))
            clock.advance(end - clock.seconds())
            pool.pump()
            return time.process_time() - cpu

        service.startService()
        down = runFor(3600)
        downScheduler = sum(spent.values())
        spent.clear()
        relay.down = False
        back = runFor(7200)
        service.stopService()
        print(
            f"{count:>8} {down:>9.2f} {downScheduler:>10.2f} {local.delivered:>8}"
            f" {back:>9.2f} {sum(spent.values()):>10.2f} {relay.relayed:>8}",
            flush=True,
        )
    finally:
        shutil.rmtree(directory)


def timed(method, name: str, spent: collections.Counter):
    """C{method}, adding its CPU time to C{spent}, unless a timed method called it."""

    def call(*args, **kwargs):
        if _depth[0]:
            return method(*args, **kwargs)
        _depth[0] += 1
        start = time.process_time()
        try:
            return method(*args, **kwargs)
        finally:
            spent[name] += time.process_time() - start
            _depth[0] -= 1

    return call


# How many timed methods are running (they call each other).
_depth = [0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("counts", nargs="*", type=int, default=[1000, 2000, 4000])
    parser.add_argument("--dir", default=None, help="where the queue folders go (default: TMPDIR)")
    args = parser.parse_args()
    print("CPU seconds of each phase, and of the scheduler within it")
    print(
        f"{'messages':>8} {'relay down':>9} {'scheduler':>10} {'notices':>8}"
        f" {'relay back':>9} {'scheduler':>10} {'relayed':>8}"
    )
    for count in args.counts:
        run(count, args.dir)


if __name__ == "__main__":
    main()
