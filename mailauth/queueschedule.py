"""
The forward queue's scheduler: which queued message is due for what work,
and when. L{ScheduleMixin} keeps L{mailauth.forward.QueueService}'s view of
each message (L{_Entry}) and its work by due time in heaps (L{_Timeline}).

It is apart from L{mailauth.forward} because it is bookkeeping alone: no
clock (the time is passed in), no disk, no relay, no log; the service
scans the queue, starts the work that falls due and says when it is done.
"""

from __future__ import annotations

import heapq
from typing import Callable, Optional

import attrs

from mailauth.envelope import Envelope, RetryPolicy
from mailauth.interfaces import ILocalDelivery


@attrs.frozen
class _Entry:
    """The scheduler's view of one queued message."""

    nextAttempt: float
    remote: bool
    arrival: float = 0.0
    # When its delay notification falls due, attempt or not; None if none will.
    delayDue: Optional[float] = None


class _Timeline:
    """
    Messages by the time one kind of their work falls due, earliest first
    (a heap), so that finding what is due, or when the next thing is, does
    not look at every message in a queue of thousands.

    An item only stands while C{current} still gives its message that time
    (the message is not taken by some work, gone, or rescheduled); the
    others are dropped as they come up. Whoever gives a message a new time,
    or lets it go, adds the item again.
    """

    def __init__(self, current: Callable[[str], Optional[float]]) -> None:
        self._heap: list = []
        self._current = current

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, when: float, msgid: str) -> None:
        heapq.heappush(self._heap, (when, msgid))

    def first(self) -> Optional[tuple]:
        """The earliest C{(time, message)} that stands, or L{None}."""
        heap = self._heap
        while heap:
            when, msgid = heap[0]
            if self._current(msgid) == when:
                return heap[0]
            heapq.heappop(heap)
        return None

    def take(self, now: float) -> Optional[str]:
        """The message of the earliest item due at C{now}, removed; or L{None}."""
        first = self.first()
        if first is None or first[0] > now:
            return None
        heapq.heappop(self._heap)
        return first[1]

    def clear(self) -> None:
        self._heap = []


class ScheduleMixin:
    """
    The scheduling half of L{mailauth.forward.QueueService}: what it knows
    of each message and what falls due when. The service's C{__init__}
    sets the attributes.
    """

    # msgid -> _Entry, for every message the service knows.
    _index: dict
    # The messages some work has now (see _take): nothing else starts on them.
    _inFlight: set
    _localAttempts: _Timeline
    _remoteAttempts: _Timeline
    _delayNotices: _Timeline
    _policy: RetryPolicy
    _local: ILocalDelivery

    def _remember(self, envelope: Optional[Envelope], msgid: Optional[str] = None) -> None:
        if envelope is None:
            self._index.pop(msgid, None)
            return
        # An attempt at or after the expiry only expires a message that was
        # tried, so it does not wait for the relay.
        remote = envelope.triedAt(envelope.nextAttempt, self._policy) and any(
            not self._local.isLocal(address) for address in envelope.pending()
        )
        self._setEntry(
            envelope.id,
            _Entry(
                envelope.nextAttempt,
                remote,
                envelope.arrival,
                envelope.delayNoticeDue(self._policy),
            ),
        )

    def _setEntry(self, msgid: str, entry: _Entry) -> None:
        """Record C{entry} as the scheduler's view of C{msgid}, due as it says."""
        self._index[msgid] = entry
        if msgid not in self._inFlight:
            self._schedule(msgid)

    def _schedule(self, msgid: str) -> None:
        """Put C{msgid}'s work on the timelines, at the times its entry says."""
        self._addItems(msgid)
        # Items that no longer stand are dropped only as they come up: when
        # they far outnumber the messages, the timelines are made anew.
        timelines = (self._localAttempts, self._remoteAttempts, self._delayNotices)
        if sum(len(t) for t in timelines) > 4 * len(self._index) + 1000:
            for timeline in timelines:
                timeline.clear()
            for each in self._index:
                if each not in self._inFlight:
                    self._addItems(each)

    def _addItems(self, msgid: str) -> None:
        entry = self._index.get(msgid)
        if entry is None:
            return
        attempts = self._remoteAttempts if entry.remote else self._localAttempts
        attempts.add(entry.nextAttempt, msgid)
        if entry.delayDue is not None:
            self._delayNotices.add(entry.delayDue, msgid)

    def _take(self, msgid: str) -> None:
        """Some work has C{msgid} now: nothing else is started for it."""
        self._inFlight.add(msgid)

    def _release(self, msgid: str) -> None:
        """The work on C{msgid} is done: what it is due for next counts again."""
        self._inFlight.discard(msgid)
        self._schedule(msgid)

    def _attemptTime(self, msgid: str, remote: bool) -> Optional[float]:
        entry = self._index.get(msgid)
        if entry is None or entry.remote != remote or msgid in self._inFlight:
            return None
        return entry.nextAttempt

    def _delayTime(self, msgid: str) -> Optional[float]:
        entry = self._index.get(msgid)
        if entry is None or msgid in self._inFlight:
            return None
        return entry.delayDue

    def _nextLocal(self, now: float) -> Optional[_Timeline]:
        """
        The timeline of the local job due longest, or L{None}: a delivery
        to a local Maildir, or a delay notification (of a message no attempt
        has taken: an attempt queues its own), which is due on time even
        while the relay is held back.
        """
        due = [
            (first, timeline)
            for timeline in (self._localAttempts, self._delayNotices)
            for first in [timeline.first()]
            if first is not None and first[0] <= now
        ]
        return min(due, key=lambda pair: pair[0])[1] if due else None
