"""
Every number an operator scrapes from C{/metrics}, defined once, and the
server for them.

With C{[server] workers} above 1 the sessions' numbers are counted in the
workers and the queue's in the parent, which serves them all: each worker
keeps its metrics in files of its own in L{workerFiles} (prometheus_client's
multiprocess mode, which the parent turns on in the workers' environment),
and the parent adds what those files hold to its own metrics at each scrape.
"""

from __future__ import annotations

import contextlib
import glob
import os
import struct
from typing import Any, Callable, Iterable, Optional

import attrs
from twisted.application import internet, service, strports
from twisted.logger import Logger
from twisted.web import resource

from mailauth.httplimits import BoundedSite

# With the parent's lines about its workers (docs/logs.rst).
log = Logger(namespace="mailauth.workers")

# The fixed label values; anything else is a bug at the call site, and
# raises ValueError whether metrics are served or not, so tests catch it.

#: C{result} of L{Metrics.authResult}.
AUTH_RESULTS = ("success", "failure", "suspended", "unavailable")

#: C{reason} of L{Metrics.connectionRefused}: the 421 before the greeting.
CONNECTION_REFUSALS = ("blocked", "too_many", "too_many_from_address")

#: C{reason} of L{Metrics.messageRefused}: why a transaction (or one of its
#: recipients) was refused.
REFUSAL_REASONS = (
    "auth_required",  # 530 5.7.0 MAIL before AUTH
    "sender_refused",  # 553 5.7.1 MAIL FROM an address the login may not use
    "suspended",  # 550 5.7.1 MAIL from a login suspended for its sending limits
    "relay_denied",  # 554 5.7.1 RCPT to another domain without AUTH or relay
    "unknown_user",  # 550 5.1.1 RCPT to an unknown local address
    "mailbox_not_allowed",  # 553 5.1.3 RCPT to an address that cannot name a Maildir
    "too_many_recipients",  # 452 4.5.3
    "too_big",  # 552 5.3.4 by SIZE= or at the end of DATA
    "bare_newline",  # 550 5.6.2 bare CR or LF in DATA
    "nul",  # 550 5.6.0 NUL in DATA
    "header_from",  # 550 5.7.1 a From: address the login may not use
    "not_signable",  # 550 5.6.0 [dkim]: a header that cannot be signed
    "too_many_hops",  # 554 5.4.6 more than 100 Received fields: a mail loop
    "limit",  # 451 4.7.1 a [limits] sending limit
    "storage",  # 451/452 the message could not be stored
    "user_database",  # 451 4.3.0 the user database did not answer (it logs why, once)
    "temporary",  # 451 4.3.0 any other temporary failure (a validator failed)
)

#: C{outcome} of L{Metrics.relayAttempt}, one per message handed to the relay.
RELAY_OUTCOMES = ("sent", "deferred", "bounced", "error")

#: C{by} of L{Metrics.dkimSigned}: where the signature was made.
DKIM_SIGNERS = ("process", "thread")
#: C{limit} of L{Metrics.limitHit}: the C{[limits]} keys.
LIMITS = ("messages_per_hour", "recipients_per_hour", "messages_per_day", "recipients_per_day")

# From a local fsync (milliseconds) to a slow disk or a busy pool (seconds).
DELIVERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# One message over the Internet, TLS and AUTH included when a session is new.
RELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

#: The families the forward queue's runner moves: the parent's, with workers.
QUEUE_FAMILIES = frozenset({"relayAttempts", "relay"})

QUEUE_SIZE = "mailauth_queue_messages"
QUEUE_OLDEST_AGE = "mailauth_queue_oldest_age_seconds"


@attrs.frozen
class _Definition:
    kind: str
    name: str
    help: str
    labels: tuple = ()
    buckets: tuple = ()


# Counters are named without _total: prometheus_client adds it. A gauge
# counts what is open in a process: with workers, the live ones' are added.
_DEFINITIONS = {
    "connections": _Definition(
        "counter", "mailauth_connections", "Connections accepted, by listener.", ("listener",)
    ),
    "connectionsRefused": _Definition(
        "counter",
        "mailauth_connections_refused",
        "Connections refused with 421 before the greeting, by listener and reason.",
        ("listener", "reason"),
    ),
    "connectionsOpen": _Definition(
        "gauge", "mailauth_connections_open", "Sessions open now, by listener.", ("listener",)
    ),
    "auth": _Definition(
        "counter",
        "mailauth_auth",
        "AUTH exchanges that reached a verdict, by mechanism and result.",
        ("mechanism", "result"),
    ),
    "messagesAccepted": _Definition(
        "counter", "mailauth_messages_accepted", "Messages accepted with 250 after DATA."
    ),
    "recipientsAccepted": _Definition(
        "counter", "mailauth_recipients_accepted", "Recipients of the messages accepted."
    ),
    "messagesRefused": _Definition(
        "counter",
        "mailauth_messages_refused",
        "Transactions or recipients refused, by reason.",
        ("reason",),
    ),
    "delivery": _Definition(
        "histogram",
        "mailauth_delivery_seconds",
        "Time from the end of DATA to the 250 reply (storing and fsyncing the message).",
        buckets=DELIVERY_BUCKETS,
    ),
    "relayAttempts": _Definition(
        "counter",
        "mailauth_relay_attempts",
        "Messages handed to the relay, by outcome.",
        ("outcome",),
    ),
    "relay": _Definition(
        "histogram",
        "mailauth_relay_seconds",
        "Time of one relay attempt of one message, connecting included when needed.",
        buckets=RELAY_BUCKETS,
    ),
    "throttleBlocks": _Definition(
        "counter",
        "mailauth_throttle_blocks",
        "Client addresses blocked after too many failed logins.",
    ),
    "limitHits": _Definition(
        "counter",
        "mailauth_limit_hits",
        "MAIL or RCPT refused because a login reached a sending limit, by limit.",
        ("limit",),
    ),
    "dkimSigned": _Definition(
        "counter",
        "mailauth_dkim_signed",
        "Messages stored with a DKIM signature, by where it was made: the signing "
        "process, or a thread (larger messages, and any while the process cannot sign).",
        ("by",),
    ),
    "counterStoreFallbacks": _Definition(
        "counter",
        "mailauth_counter_store_fallbacks",
        "Counter store operations answered without the store because it was unreachable.",
    ),
}

#: The families the sessions move: the workers', with workers.
SESSION_FAMILIES = frozenset(_DEFINITIONS) - QUEUE_FAMILIES


def workerFiles(cfg) -> str:
    """The folder where the workers of C{cfg}'s daemon keep their metrics."""
    return os.path.join(cfg.server.state_dir, "metrics")


class WorkerFiles(service.Service):
    """
    The folder for the workers' metrics: made when built, and emptied when
    started (before the workers start), since what an earlier run counted
    must not be added to this one's, as one process starts from zero. Not
    before: a second daemon started by mistake on the same state directory
    fails to listen first, and must leave the running one's counts alone.
    """

    name = "metrics-files"

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(path, mode=0o700, exist_ok=True)

    def startService(self) -> None:
        super().startService()
        for name in glob.glob(os.path.join(self.path, "*.db")):
            os.remove(name)


#: The size prometheus_client gives a metrics file it makes.
FIRST_SIZE = 1 << 16


def _reserve(path: str, keys: Iterable[str]) -> None:
    """
    Make the metrics file C{path} (made if missing) big enough for C{keys}
    more, at least L{FIRST_SIZE}, and every block of it allocated, before
    it is written through a memory map: on a full disk that write would
    kill the process (SIGBUS) rather than fail; this raises L{OSError}
    instead. The size doubles as prometheus_client's own growth does,
    which then never needs to.
    """
    with open(path, "a+b") as f:
        f.seek(0)
        head = f.read(4)
        used = struct.unpack("i", head)[0] if len(head) == 4 else 8
        # An entry: its length (4), the key padded to 8, a value and (from
        # prometheus_client 0.17 on) a timestamp (16).
        needed = used + sum(len(key.encode("utf-8")) + 36 for key in keys)
        size = max(os.fstat(f.fileno()).st_size, FIRST_SIZE)
        while size < needed:
            size *= 2
        os.posix_fallocate(f.fileno(), 0, size)


#: A worker's metric files, by the kind prometheus_client names each by.
WORKER_FILE_KINDS = ("counter", "gauge_livesum", "histogram")


def reserveWorkerFiles(path: str, pid: int) -> None:
    """
    Make the metric files of worker C{pid} in C{path} before
    prometheus_client does, with L{_reserve}: it makes them sparse and
    writes them through a memory map, where a block that a full disk cannot
    give kills the worker (SIGBUS) instead of failing. An empty (all-zero)
    file is one it takes as new. A worker's series are all made when it
    starts and take a few KiB, so the files do not grow past L{FIRST_SIZE}.

    @raise OSError: if the disk has no room for them (the files are removed).
    """
    made = []
    try:
        for kind in WORKER_FILE_KINDS:
            name = os.path.join(path, f"{kind}_{pid}.db")
            made.append(name)
            _reserve(name, ())
    except OSError:
        for name in made:
            with contextlib.suppress(OSError):
                os.remove(name)
        raise


#: The kinds of a worker's metric files that keep counting after it ends.
_KEPT = ("counter", "histogram")


def foldEnded(path: str, pid: int) -> None:
    """
    Add what the ended worker C{pid} counted (its counter and histogram
    files in C{path}) to the files of every worker that ended before
    (C{counter_ended.db}, C{histogram_ended.db}), and remove its own: the
    totals stay as they were, and a worker that dies again and again
    leaves no trail of files for every scrape to read (two a restart, at
    most one restart every 30 s). On the parent's event loop, as scrapes
    are: none sees the worker's counts twice or not at all. A file that
    cannot be folded (a full disk) is kept as it is, and logged.
    """
    for kind in _KEPT:
        ended = os.path.join(path, f"{kind}_{pid}.db")
        try:
            _fold(ended, os.path.join(path, f"{kind}_ended.db"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError, RuntimeError, struct.error) as e:
            # (RuntimeError, struct.error: prometheus_client's words for a
            # file it cannot read.)
            log.error(
                "metrics of ended worker (pid {pid}) not folded, its file kept: {why}",
                pid=pid,
                why=e,
            )


def _fold(ended: str, target: str) -> None:
    """L{foldEnded}, for one file C{ended} and the file C{target} it goes into."""
    from prometheus_client.mmap_dict import MmapedDict

    sums: dict = {}
    if os.path.getsize(ended) > 0:  # (killed as it made the file: none)
        # (Entries are (key, value, pos), or (key, value, timestamp, pos)
        # from prometheus_client 0.17 on.)
        for entry in MmapedDict.read_all_values_from_file(ended):
            sums[entry[0]] = sums.get(entry[0], 0.0) + entry[1]
    if sums:
        _reserve(target, sums)
        # (Untyped: the two prometheus_client versions differ.)
        folded: Any = MmapedDict(target)
        try:
            for key, value in sums.items():
                current = folded.read_value(key)
                if isinstance(current, tuple):  # (value, timestamp)
                    folded.write_value(key, current[0] + value, 0.0)
                else:
                    folded.write_value(key, current + value)
        finally:
            folded.close()
    os.remove(ended)


class _Nothing:
    """Stands for every metric when none are served: takes every update, keeps nothing."""

    def labels(self, *args, **kwargs) -> _Nothing:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


_NOTHING = _Nothing()


def _check(value: str, allowed: tuple, what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{value!r} is not a {what} ({', '.join(allowed)})")


class Metrics:
    """
    The events mailauth counts, as methods the rest of the code calls.

    The same object exists whether or not C{[metrics]} is configured: built
    without a registry (C{Metrics()}) every method only checks its
    arguments, and nothing needs C{prometheus_client}.

    @ivar registry: the private C{prometheus_client.CollectorRegistry} that
        holds the metrics, or L{None} when they are not served.
    """

    # One per metric of _DEFINITIONS, set by __init__.
    _connections: Any
    _connectionsRefused: Any
    _connectionsOpen: Any
    _auth: Any
    _messagesAccepted: Any
    _recipientsAccepted: Any
    _messagesRefused: Any
    _delivery: Any
    _relayAttempts: Any
    _relay: Any
    _throttleBlocks: Any
    _limitHits: Any
    _counterStoreFallbacks: Any
    _dkimSigned: Any

    def __init__(
        self,
        registry=None,
        *,
        listeners: Iterable[str] = (),
        mechanisms: Iterable[str] = (),
        families: Iterable[str] = frozenset(_DEFINITIONS),
    ) -> None:
        """
        @param registry: a C{prometheus_client.CollectorRegistry} to define
            the metrics in, or L{None} for none (see L{prometheus}).
        @param listeners: listener names, whose series start at zero.
        @param mechanisms: SASL mechanism names, whose series start at zero.
        @param families: the metrics this process moves (by attribute, as
            L{SESSION_FAMILIES}); the others only check their arguments.
            The queue's size and age come with L{QUEUE_FAMILIES}.
        """
        self.registry = registry
        self.workerFiles: Optional[str] = None
        self._queueProbe: Optional[Callable[[], tuple]] = None
        families = frozenset(families)
        for attribute in _DEFINITIONS:
            setattr(self, "_" + attribute, _NOTHING)
        if registry is None:
            return
        import prometheus_client

        kinds = {
            "counter": prometheus_client.Counter,
            "gauge": prometheus_client.Gauge,
            "histogram": prometheus_client.Histogram,
        }
        for attribute, d in _DEFINITIONS.items():
            if attribute not in families:
                continue
            extra: dict = {"buckets": d.buckets} if d.buckets else {}
            if d.kind == "gauge":
                # (Used only in multiprocess mode: the sum over live processes.)
                extra["multiprocess_mode"] = "livesum"
            metric = kinds[d.kind](d.name, d.help, d.labels, registry=registry, **extra)
            setattr(self, "_" + attribute, metric)
        if QUEUE_FAMILIES <= families:
            registry.register(_QueueCollector(self))
        # A series that exists from the start makes rate() and increase()
        # right from the first event, not only from the second.
        for listener in listeners:
            self._connections.labels(listener)
            self._connectionsOpen.labels(listener)
            for reason in CONNECTION_REFUSALS:
                self._connectionsRefused.labels(listener, reason)
        for mechanism in mechanisms:
            for result in AUTH_RESULTS:
                self._auth.labels(mechanism, result)
        for reason in REFUSAL_REASONS:
            self._messagesRefused.labels(reason)
        for outcome in RELAY_OUTCOMES:
            self._relayAttempts.labels(outcome)
        for limit in LIMITS:
            self._limitHits.labels(limit)
        for by in DKIM_SIGNERS:
            self._dkimSigned.labels(by)

    @classmethod
    def prometheus(
        cls,
        *,
        listeners: Iterable[str] = (),
        mechanisms: Iterable[str] = (),
        process: bool = True,
        families: Iterable[str] = frozenset(_DEFINITIONS),
        workerFiles: Optional[str] = None,
    ) -> Metrics:
        """
        Metrics in a new private registry (never prometheus_client's global
        one, so that several services and tests in one process do not
        collide).

        @param process: add prometheus_client's C{process_*} (CPU, memory,
            file descriptors) and C{python_info} metrics.
        @param families: see L{__init__}.
        @param workerFiles: serve, with these, what the workers count in
            this folder, which must exist (L{WorkerFiles}).
        @raise ImportError: if prometheus_client is not installed.
        """
        from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

        registry = CollectorRegistry()
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        metrics = cls(registry, listeners=listeners, mechanisms=mechanisms, families=families)
        if workerFiles is not None:
            from prometheus_client.multiprocess import MultiProcessCollector

            MultiProcessCollector(registry, path=workerFiles)
            metrics.workerFiles = workerFiles
        return metrics

    @classmethod
    def fromConfig(cls, cfg, role: str = "one") -> Metrics:
        """
        Served metrics if the L{mailauth.config.Config} has a C{[metrics]}
        section, else metrics that only check their arguments.

        @param role: C{one} (the only process: every metric), C{parent}
            (of workers: the queue's metrics, with the workers' from
            L{workerFiles}, which must exist), or C{worker}
            (the sessions' metrics, kept in L{workerFiles} for the parent:
            the parent names that folder in the worker's environment).
        @raise RuntimeError: for a worker whose environment names no folder.
        """
        if cfg.metrics is None:
            return cls()
        names = dict(
            listeners=[listener.name for listener in cfg.listeners],
            mechanisms=cfg.auth.mechanisms,
        )
        if role == "worker":
            # prometheus_client reads it when it is first imported, which is
            # here in a worker: a value set later would not be seen.
            folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
            if not folder:
                raise RuntimeError("a worker with [metrics] needs PROMETHEUS_MULTIPROC_DIR")
            try:
                reserveWorkerFiles(folder, os.getpid())
            except OSError as e:
                log.error(
                    "metrics off in this worker: cannot reserve its files in {folder}: {why}",
                    folder=folder,
                    why=e.strerror or e,
                )
                return cls()
            return cls.prometheus(**names, process=False, families=SESSION_FAMILIES)
        if role == "parent":
            return cls.prometheus(**names, families=QUEUE_FAMILIES, workerFiles=workerFiles(cfg))
        return cls.prometheus(**names)

    def workerEnded(self, pid: int) -> None:
        """
        A worker has ended: its open sessions ended with it (its gauges
        are dropped); what its counters counted stays in the totals
        (L{foldEnded}).
        """
        if self.workerFiles is not None:
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(pid, self.workerFiles)
            foldEnded(self.workerFiles, pid)

    # -- connections -------------------------------------------------------

    def connectionAccepted(self, listener: str) -> None:
        """A session starts on C{listener} (its greeting is sent)."""
        self._connections.labels(listener).inc()
        self._connectionsOpen.labels(listener).inc()

    def connectionClosed(self, listener: str) -> None:
        """A session that L{connectionAccepted} counted has ended."""
        self._connectionsOpen.labels(listener).dec()

    def connectionRefused(self, listener: str, reason: str) -> None:
        """
        A connection to C{listener} was refused before the greeting.

        @param reason: one of L{CONNECTION_REFUSALS}.
        """
        _check(reason, CONNECTION_REFUSALS, "connection refusal reason")
        self._connections.labels(listener).inc()
        self._connectionsRefused.labels(listener, reason).inc()

    # -- sessions ----------------------------------------------------------

    def authResult(self, mechanism: str, result: str) -> None:
        """
        An AUTH exchange with C{mechanism} ended with a verdict.

        @param result: one of L{AUTH_RESULTS}: C{success} (235),
            C{failure} (535 for wrong credentials), C{suspended} (535 for a
            suspended login with the right password), C{unavailable} (454).
        """
        _check(result, AUTH_RESULTS, "AUTH result")
        self._auth.labels(mechanism, result).inc()

    def messageAccepted(self, recipients: int, seconds: float) -> None:
        """
        A message was accepted (250 after DATA).

        @param recipients: how many recipients it was accepted for.
        @param seconds: the time from the end of DATA to the 250.
        """
        self._messagesAccepted.inc()
        self._recipientsAccepted.inc(recipients)
        self._delivery.observe(seconds)

    def messageRefused(self, reason: str) -> None:
        """
        A transaction, a recipient or a message was refused.

        @param reason: one of L{REFUSAL_REASONS}.
        """
        _check(reason, REFUSAL_REASONS, "refusal reason")
        self._messagesRefused.labels(reason).inc()

    # -- forward queue -----------------------------------------------------

    def relayAttempt(self, outcome: str, seconds: float) -> None:
        """
        One message was handed to the relay.

        @param outcome: one of L{RELAY_OUTCOMES}: C{error} if the session
            failed as a whole (connection, TLS, AUTH, timeout); else
            C{deferred} if a recipient got a 4xx, C{bounced} if one got a
            5xx, C{sent} if every recipient was accepted.
        @param seconds: how long it took, connecting included if a new
            session was needed.
        """
        _check(outcome, RELAY_OUTCOMES, "relay outcome")
        self._relayAttempts.labels(outcome).inc()
        self._relay.observe(seconds)

    def watchQueue(self, probe: Callable[[], tuple]) -> None:
        """
        Report the queue on every scrape.

        @param probe: called on the reactor thread at each scrape; returns
            C{(messages, oldestAge)}: how many messages are queued, and the
            age in seconds of the oldest (0 when the queue is empty). It
            must not block.
        """
        self._queueProbe = probe

    # -- throttle and limits -----------------------------------------------

    def addressBlocked(self) -> None:
        """The throttle started refusing a client address."""
        self._throttleBlocks.inc()

    def limitHit(self, limit: str) -> None:
        """
        MAIL or RCPT was refused because a login reached C{limit}.

        @param limit: one of L{LIMITS}.
        """
        _check(limit, LIMITS, "sending limit")
        self._limitHits.labels(limit).inc()

    def dkimSigned(self, by: str) -> None:
        """
        A message was stored with its DKIM signature, made C{by} the
        signing process or a thread (one of L{DKIM_SIGNERS}).
        """
        _check(by, DKIM_SIGNERS, "DKIM signer")
        self._dkimSigned.labels(by).inc()

    def counterStoreFallback(self) -> None:
        """The counter store (Redis) was unreachable and was done without."""
        self._counterStoreFallbacks.inc()


class _QueueCollector:
    """Asks the queue for its size and age when the metrics are scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list:
        # Names only, without asking the queue (the registry calls this at
        # registration, to refuse duplicate names).
        return self._families(0, 0.0)

    def collect(self) -> list:
        probe = self._metrics._queueProbe
        if probe is None:
            return []
        size, age = probe()
        return self._families(size, age)

    def _families(self, size: int, age: float) -> list:
        from prometheus_client.core import GaugeMetricFamily

        return [
            GaugeMetricFamily(QUEUE_SIZE, "Messages in the forward queue.", value=size),
            GaugeMetricFamily(
                QUEUE_OLDEST_AGE,
                "Age of the oldest message in the forward queue (0 when empty).",
                value=age,
            ),
        ]


class MetricsResource(resource.Resource):
    """
    C{/metrics}: the registry in the Prometheus text format, or in
    OpenMetrics when the scraper asks for it, as prometheus_client's own
    server negotiates.
    """

    def __init__(self, registry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request) -> bytes:
        from prometheus_client.exposition import choose_encoder

        accept = request.getHeader(b"accept")
        encoder, contentType = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"content-type", contentType.encode("ascii"))
        return encoder(self.registry)


class _QuietSite(BoundedSite):
    """A site that does not write an access-log line for every scrape."""

    def log(self, request) -> None:
        pass


def metricsService(
    endpoint: str, metrics: Metrics, reactor
) -> internet.StreamServerEndpointService:
    """
    The web server for C{/metrics} on C{endpoint}, any Twisted server
    endpoint string, as a service named C{metrics}.

    @raise ValueError: if C{metrics} were built without a registry.
    """
    if metrics.registry is None:
        raise ValueError("these metrics have no registry to serve")
    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(metrics.registry))
    # A scrape is a GET: no request needs a body.
    site = _QuietSite(root, "metrics", 0, reactor)
    web = strports.service(endpoint, site, reactor=reactor)
    web.setName("metrics")
    return web
