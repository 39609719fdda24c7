"""
What crosses the pipes between a worker and its parent (L{mailauth.workers})
besides the control words: the worker's log events, the connection
counts the limits of C{[server] max_connections} and
C{max_connections_per_address} are kept on for the whole node, and the
counters the workers share while Redis is down.

With one process the session counts its connections itself
(L{mailauth.throttle.ConnectionLimiter}). With workers, each would count
only its own, and a node of N workers would admit N times the limits. So
the parent keeps the one count (L{NodeConnections}), as Postfix's anvil(8)
keeps it for every smtpd process: a worker asks it before it greets a
client (L{ParentConnections}: C{admit ID HOST} on the control pipe, the
answer C{ID ok} or C{ID REASON} on the configuration pipe) and tells it
when the connection ends (C{release HOST}). The parent forgets the
connections of a worker that ends: they ended with it.

While Redis (C{[state] backend}) is down, the workers count failed logins
and sending limits in the parent too (L{NodeCounters}, asked through
L{ParentCounters}), so that the node's workers count together then as
well.

And a worker's life is tied to its parent's (L{dieWithParent}).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import math
import signal
import sys
from typing import Callable, Optional
from urllib.parse import quote, unquote

from twisted.internet import defer
from twisted.logger import (
    ILogObserver,
    LogLevel,
    eventAsJSON,
    eventAsText,
    eventFromJSON,
)
from zope.interface import implementer

from mailauth import replies
from mailauth.counters import MemoryCounterStore
from mailauth.logs import jsonFileObserver, textFileObserver
from mailauth.throttle import ConnectionLimiter

# The log, from worker to parent


@implementer(ILogObserver)
class LogRelay:
    """
    A worker's log observer: each event as one line for L{eventFromRelay}
    in the parent.

    With the text log format, a line holds only what a log line shows
    (C{L} and JSON of time, namespace, level, system, and the text with any
    traceback): L{twisted.logger.eventAsJSON} keeps every field, which
    costs a worker twice what writing the line does, and the parent as much
    again to read, for fields no text observer reads. With C{[server]
    log_format = json} the fields are the point: a line is then C{J} and
    the whole event as L{twisted.logger.eventAsJSON} writes it.

    @ivar full: whether to relay every field.
    """

    def __init__(self, out, full: bool = False) -> None:
        self.out = out
        self.full = full

    def __call__(self, event: dict) -> None:
        if self.full:
            line = "J" + eventAsJSON(event)
        else:
            level = event.get("log_level")
            line = "L" + json.dumps(
                {
                    "t": event.get("log_time"),
                    "n": event.get("log_namespace"),
                    "l": level.name if level is not None else None,
                    "s": event.get("log_system"),
                    "x": eventAsText(
                        event, includeTraceback=True, includeTimestamp=False, includeSystem=False
                    ),
                }
            )
        self.out.write(line + "\n")
        self.out.flush()


def eventFromRelay(record: bytes, worker: int) -> dict:
    """
    The event a L{LogRelay} line of worker number C{worker} stands for,
    with C{log_worker} set to C{worker}. A text line's event also names the
    worker in its system, the part of a line twistd writes in brackets:
    C{[mailauth.esmtp#info worker=2]}, so that the text log tells the
    workers apart as the JSON log does with C{log_worker}.

    @raise ValueError: if C{record} is not such a line.
    """
    kind, text = record[:1], record[1:].decode("utf-8")
    if kind == b"J":
        event = eventFromJSON(text)
        event["log_worker"] = worker
        return event
    data = json.loads(text) if kind == b"L" else None
    if not isinstance(data, dict) or not isinstance(data.get("x"), str):
        raise ValueError("not a relayed log event")
    event = {
        "log_time": data.get("t"),
        "log_namespace": data.get("n"),
        "log_format": "{log_text}",
        "log_text": data["x"],
    }
    if data.get("l") is not None:
        event["log_level"] = LogLevel.levelWithName(data["l"])
    event["log_system"] = _workerSystem(data.get("s"), data.get("n"), data.get("l"), worker)
    event["log_worker"] = worker
    return event


def _workerSystem(
    system: Optional[str], namespace: Optional[str], level: Optional[str], worker: int
) -> str:
    """
    The bracket of a worker's text log line: what one process would show
    (the event's system, else C{NAMESPACE#LEVEL}), then C{worker=N}.
    """
    if not system:
        system = f"{namespace or '-'}#{level or '-'}"
    return f"{system} worker={worker}"


@implementer(ILogObserver)
class WorkerLog:
    """
    A worker's log observer when it writes its own lines (to the standard
    output it shares with its parent, C{twistd --logfile=-}): each line as
    the parent writes the line of a relayed event (L{LogRelay} and
    L{eventFromRelay}), without crossing a pipe and the parent's event loop.

    Each line is one write of the whole line, as the parent's own lines
    are, so lines from the processes sharing the output do not mix:
    journald's stream takes a write whole, a file's shared offset one
    write after another, and a pipe a write of up to C{PIPE_BUF} (4 KiB;
    a longer line, a traceback, may interleave there).

    @ivar worker: the worker's number.
    """

    def __init__(self, out, worker: int, full: bool = False) -> None:
        """
        @param out: the shared output, a text file.
        @param full: JSON lines (C{[server] log_format = json}) with every
            field and C{log_worker}, instead of text lines.
        """
        self.worker = worker
        self.full = full
        self._write = jsonFileObserver(out) if full else textFileObserver(out)

    def __call__(self, event: dict) -> None:
        if self.full:
            self._write(dict(event, log_worker=self.worker))
            return
        level = event.get("log_level")
        system = _workerSystem(
            event.get("log_system"),
            event.get("log_namespace"),
            level.name if level is not None else None,
            self.worker,
        )
        self._write(dict(event, log_system=system))


# Connection limits for the whole node

#: The refusals a worker is told, by the word that names them on the pipe.
_REFUSALS = {
    b"too_many": replies.TOO_MANY_CONNECTIONS,
    b"too_many_from_address": replies.TOO_MANY_FROM_ADDRESS,
}
_WORDS = {reply: word for word, reply in _REFUSALS.items()}


class NodeConnections:
    """
    The parent's count of every worker's connections, on one
    L{ConnectionLimiter}; what each worker holds is kept apart, to be
    forgotten when it ends.
    """

    def __init__(self, limiter: ConnectionLimiter) -> None:
        self.limiter = limiter
        self._held: dict[int, collections.Counter] = {}

    def control(self, worker: int, line: bytes) -> Optional[bytes]:
        """
        Act on an C{admit} or C{release} line from worker number C{worker}.

        @return: the answer line (no line end) to write back to it, or
            L{None} for a line that needs none (a release, or no request).
        """
        verb, _, rest = line.partition(b" ")
        if verb == b"admit":
            ident, _, host = rest.partition(b" ")
            address = host.decode("ascii", "replace")
            refusal = self.limiter.acquire(address)
            if refusal is not None:
                return ident + b" " + _WORDS[refusal]
            self._held.setdefault(worker, collections.Counter())[address] += 1
            return ident + b" ok"
        if verb == b"release":
            address = rest.decode("ascii", "replace")
            held = self._held.get(worker)
            if held is not None and held[address] > 0:
                held[address] -= 1
                if not held[address]:
                    del held[address]
                self.limiter.release(address)
        return None

    def forget(self, worker: int) -> None:
        """Worker number C{worker} ended: so did every connection it held."""
        for address, count in self._held.pop(worker, collections.Counter()).items():
            for _ in range(count):
                self.limiter.release(address)


def _refusal(word: bytes) -> Optional[replies.Reply]:
    """The parent's answer to C{admit}: L{None} to serve, or the 421 that refuses."""
    return None if word == b"ok" else _REFUSALS.get(word, replies.TOO_MANY_CONNECTIONS)


class ParentRequests:
    """
    A worker's questions to its parent: each a line on the control pipe
    with an ID after its verb, answered on the configuration pipe by a line
    C{ID WORD}; the connections' and the counters' share the one pipe and
    the one series of IDs.

    @param send: writes one line (no line end) to the parent's control pipe.
    """

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self.send = send
        self._waiting: dict[bytes, defer.Deferred[bytes]] = {}
        self._next = 0

    def ask(self, verb: bytes, *words: bytes) -> defer.Deferred[bytes]:
        """
        Send C{verb ID WORDS...}: a Deferred firing with the answer's word.
        It never fires if the parent goes away first: the worker then stops.
        """
        self._next += 1
        ident = b"%d" % self._next
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiting[ident] = d
        self.send(b" ".join([verb, ident, *words]))
        return d

    def answered(self, line: bytes) -> None:
        """An answer line from the parent: fire the question it answers (none: ignored)."""
        ident, _, word = line.strip().partition(b" ")
        d = self._waiting.pop(ident, None)
        if d is not None:
            d.callback(word)


class ParentConnections:
    """
    A worker's connection limiter (what L{mailauth.esmtp.SubmissionFactory}
    calls C{connections}) that asks the parent's L{NodeConnections}.
    """

    def __init__(self, requests: ParentRequests) -> None:
        self._requests = requests

    def acquire(self, host: str) -> defer.Deferred[Optional[replies.Reply]]:
        """
        Ask the parent to count a new connection from C{host}.

        @return: a Deferred firing with L{None} to serve it, or with the 421
            that refuses it. It never fires if the parent goes away first:
            the worker then stops, and its connections with it.
        """
        d = self._requests.ask(b"admit", host.encode("ascii", "replace"))
        return d.addCallback(_refusal)

    def release(self, host: str) -> None:
        """A connection the parent admitted has ended."""
        self._requests.send(b"release " + host.encode("ascii", "replace"))


# Counters for the whole node while Redis is down

#: The verbs of the counter lines, worker to parent.
COUNTER_VERBS = (b"count ", b"block ", b"blocked ")


class NodeCounters:
    """
    The parent's counters, in its memory, that its workers count on while
    Redis (C{[state] backend}) does not answer, so that the node's workers
    count together during an outage, as one process does
    (L{mailauth.redisstore.RedisCounterStore}'s C{node}). A worker asks
    with a line on the control pipe, and is answered on its configuration
    pipe:

      - C{count ID KEY WINDOW AMOUNT}: add C{AMOUNT} (0: only read) to
        C{KEY}; the answer C{ID TOTAL}, its total within C{WINDOW} seconds;
      - C{block ID KEY SECONDS}: block C{KEY}; C{ID 1} if that is a new
        block, C{ID 0} if it was blocked already;
      - C{blocked ID KEY}: C{ID MILLISECONDS} it stays blocked, C{ID 0}.

    C{KEY} is percent-encoded (it may hold any character); a line that
    does not parse is answered C{ID ?}.
    """

    def __init__(self, store: MemoryCounterStore) -> None:
        self.store = store

    def control(self, line: bytes) -> Optional[bytes]:
        """
        Act on a counter line from a worker.

        @return: the answer line (no line end), or L{None} for a line
            without an ID to answer.
        """
        verb, *words = line.split(b" ")
        if not words:
            return None
        ident = words[0]
        try:
            key = unquote(words[1].decode("ascii"), errors="strict")
            if verb == b"count" and len(words) == 4:
                window, amount = float(words[2]), int(words[3])
                if amount:
                    value = self.store.add(key, window, amount)
                else:
                    value = self.store.count(key, window)
            elif verb == b"block" and len(words) == 3:
                value = int(self.store.setBlock(key, float(words[2])))
            elif verb == b"blocked" and len(words) == 2:
                value = math.ceil(self.store.blockedFor(key) * 1000)
            else:
                raise ValueError(line)
        except (ValueError, IndexError, UnicodeError):
            return ident + b" ?"
        return b"%s %d" % (ident, value)


class ParentCounters:
    """A worker's view of its parent's L{NodeCounters}."""

    def __init__(self, requests: ParentRequests) -> None:
        self._requests = requests

    def count(self, key: str, window: float, amount: int = 0) -> defer.Deferred[int]:
        """Add C{amount} (0: only read) to C{key}: its total within C{window} seconds."""
        return self._ask(b"count", key, repr(float(window)), str(int(amount)))

    def block(self, key: str, duration: float) -> defer.Deferred[bool]:
        """Block C{key} for C{duration} seconds: whether that is a new block."""
        return self._ask(b"block", key, repr(float(duration))).addCallback(bool)

    def blockedFor(self, key: str) -> defer.Deferred[float]:
        """How many seconds C{key} stays blocked; 0 if it is not blocked."""
        return self._ask(b"blocked", key).addCallback(lambda ms: ms / 1000)

    def _ask(self, verb: bytes, key: str, *words: str) -> defer.Deferred[int]:
        """Ask the parent: a Deferred firing with its number."""
        d = self._requests.ask(
            verb, quote(key, safe="").encode("ascii"), *(w.encode("ascii") for w in words)
        )
        return d.addCallback(_number)


def _number(word: bytes) -> int:
    """The parent's answer to a counter question, as a number."""
    try:
        return int(word)
    except ValueError:
        raise ValueError(f"the parent did not understand the question (answer {word!r})") from None


# The worker's life tied to its parent's


def dieWithParent() -> None:
    """
    On Linux, have the kernel send this process SIGKILL when its parent
    dies (C{PR_SET_PDEATHSIG}): a worker stops when its configuration pipe
    ends, but one whose event loop hangs never reads that end, and after a
    C{kill -9} of the parent it would keep its ports and lock the next
    daemon out. Elsewhere, or if the call fails, the pipe alone.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


_PR_SET_PDEATHSIG = 1
