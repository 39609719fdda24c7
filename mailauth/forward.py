"""
The forwarder: the service that delivers the queue, scheduling attempts
with backoff, relaying through an L{IRelayConnector} and handing bounces to
local recipients to an L{ILocalDelivery}. What is due when, its
bookkeeping, is in L{mailauth.queueschedule}.
"""

from __future__ import annotations

from typing import Optional

import attrs
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailauth.config import RelayConfig
from mailauth.envelope import DELIVERED, FAILED, PENDING, Envelope, Outcome, RetryPolicy
from mailauth.interfaces import BlockingRunner, ILocalDelivery, IRelayConnector
from mailauth.metrics import Metrics
from mailauth.queueschedule import ScheduleMixin, _Timeline
from mailauth.relay import RelayError
from mailauth.replies import SMTPReply
from mailauth.spool import DamagedMessage, Queue, ScanResult, SettleResult
from mailauth.threads import PoolBusy

log = Logger(namespace="mailauth.queue")

# At most this many local jobs (a delivery of the server's own notice to a
# local Maildir, the queueing of a delay notice) at once: each is a few
# calls to the disk pool, which the sessions share and which refuses calls
# past its bound; Postfix's local_destination_concurrency_limit is 2 too.
LOCAL_CONCURRENCY = 2


class QueueService(ScheduleMixin, service.Service):
    """
    Delivers the queue: local recipients (bounces to local senders) through
    C{localDelivery}, at most L{LOCAL_CONCURRENCY} at once, the others
    through the relay, with at most C{max_connections} sessions, each
    reused for several messages.

    It scans the queue on start, every C{queue_interval} (which also picks
    up C{mailauth queue flush}), and when L{wake} is called after a commit.
    After a session fails as a whole (no connection, TLS, AUTH), new
    sessions wait, with the same backoff as messages, so a relay that is
    down is not hammered by every message in the queue. A delay
    notification is queued when it falls due, as Postfix's qmgr does, not
    at the next attempt, which that wait may put hours later.

    @param queue: the queue to deliver.
    @param relayConfig: the C{[relay]} section: retry policy, connections,
        scan interval.
    @param reactor: provides time.
    @param localDelivery: delivers to local recipients; a failure is
        temporary unless it is an L{SMTPReply} from 500 to 599.
    @param runBlocking: runs the queue's blocking file work (fsync) off the
        reactor.
    @param connector: makes the relay sessions.
    @param metrics: counts the relay attempts; L{probe} reports the queue.
    """

    name = "queue"

    def __init__(
        self,
        queue: Queue,
        relayConfig: RelayConfig,
        reactor,
        localDelivery: ILocalDelivery,
        *,
        runBlocking: BlockingRunner,
        connector: IRelayConnector,
        metrics: Optional[Metrics] = None,
    ) -> None:
        self._queue = queue
        self._config = relayConfig
        self._reactor = reactor
        self._local = localDelivery
        self._runBlocking = runBlocking
        self._connector = connector
        self._metrics = metrics if metrics is not None else Metrics()
        self._policy = RetryPolicy.fromConfig(relayConfig)
        self._maxConnections = relayConfig.max_connections
        self._interval = relayConfig.queue_interval
        self._relayHost = relayConfig.host
        self._index: dict = {}
        self._inFlight: set = set()
        # What is due when, by kind of work (see _Timeline).
        self._localAttempts = _Timeline(lambda msgid: self._attemptTime(msgid, remote=False))
        self._remoteAttempts = _Timeline(lambda msgid: self._attemptTime(msgid, remote=True))
        self._delayNotices = _Timeline(self._delayTime)
        # msgid -> the final outcomes (delivered, failed) of an attempt whose
        # outcome could not be written (a full disk): never sent again, and
        # written with the next attempt's.
        self._unsettled: dict[str, dict] = {}
        # msgid -> attempts in a row that failed on an error of this host
        # (a full disk), for their backoff.
        self._crashes: dict[str, int] = {}
        self._workers = 0
        self._localWorkers = 0
        self._tasks: set = set()
        self._sessions: set = set()
        self._connecting: set = set()
        self._loop: Optional[task.LoopingCall] = None
        self._timer = None
        self._wakeCall = None
        self._scanning = False
        self._rescan = False
        # The notifications scheduled as queued since the listing under way
        # began: newer in the scheduler than anything that listing says.
        self._queuedDuringScan: set = set()
        self._holdUntil = 0.0
        self._sessionFailures = 0

    # Service

    def startService(self) -> None:
        super().startService()
        self._queue.recover()
        loop = self._loop = task.LoopingCall(self._periodicScan)
        loop.clock = self._reactor
        loop.start(self._interval, now=True)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for call in (self._timer, self._wakeCall):
            if call is not None and call.active():
                call.cancel()
        for connecting in list(self._connecting):
            connecting.cancel()
        for session in list(self._sessions):
            session.abort()
        return defer.DeferredList(list(self._tasks)).addCallback(lambda _: None)

    def probe(self) -> tuple:
        """
        The queue as the forwarder last saw it, without touching the disk:
        C{(messages, age of the oldest in seconds)}, C{(0, 0.0)} when empty.
        For L{Metrics.watchQueue}.
        """
        if not self._index:
            return (0, 0.0)
        oldest = min(entry.arrival for entry in self._index.values())
        return (len(self._index), max(0.0, self._reactor.seconds() - oldest))

    def wake(self) -> None:
        """New mail was committed: look at the queue now."""
        if not self.running or (self._wakeCall is not None and self._wakeCall.active()):
            return
        self._wakeCall = self._reactor.callLater(0, self._scan)

    # Scanning and scheduling

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        self._tasks.add(d)

        def done(result):
            self._tasks.discard(d)
            return result

        return d.addBoth(done)

    def _periodicScan(self) -> defer.Deferred:
        self._scan()
        return defer.succeed(None)

    def _scan(self) -> None:
        if not self.running:
            return
        if self._scanning:
            self._rescan = True
            return
        self._scanning = True
        self._queuedDuringScan = set()
        d = self._runBlocking(self._queue.scan, frozenset(self._index) | frozenset(self._inFlight))
        d.addCallback(self._scanned)
        d.addErrback(self._scanFailed)

        def done(_):
            self._scanning = False
            if self._rescan:
                self._rescan = False
                self._scan()

        d.addCallback(done)
        self._track(d)

    def _scanFailed(self, failure: Failure) -> None:
        if failure.check(PoolBusy):
            # The sessions have the disk threads: the next scan is soon.
            log.warn(
                "queue: scanning {dir} put off: {error}",
                dir=self._queue.directory,
                error=str(failure.value),
            )
        else:
            log.failure("queue: scanning {dir} failed", failure, dir=self._queue.directory)

    def _scanned(self, result: ScanResult) -> None:
        # A notification queued since the listing began may be missing from
        # it, or listed before its own attempt: the scheduler knows better.
        fresh = self._queuedDuringScan
        for msgid in list(self._index):
            if msgid not in result.present and msgid not in self._inFlight and msgid not in fresh:
                # Not removed by the forwarder, which forgets what it removes
                # (one in flight may have been removed by its own attempt,
                # which says what became of it).
                self._deleted(msgid)
        for envelope in result.envelopes:
            entry = self._index.get(envelope.id)
            if envelope.id in fresh:
                continue
            if envelope.id not in self._inFlight:
                self._remember(envelope)
            elif result.flushed and entry is not None:
                # Busy (its delay notice being queued, say): due at once when
                # that is done, not at the time the flush cancelled. An
                # attempt under way sets its own next time when it ends.
                self._setEntry(envelope.id, attrs.evolve(entry, nextAttempt=envelope.nextAttempt))
        if result.flushed:
            log.info("queue: flush requested, trying every message now")
            self._holdUntil = 0.0
            self._sessionFailures = 0
        self._dispatch()

    def _dispatch(self) -> None:
        """Start what is due, and set a timer for what is due next."""
        if not self.running:
            return
        now = self._reactor.seconds()
        # A worker takes its first job before it returns, so none is
        # started for nothing; one that ran to its end at once (no thread)
        # has given its place back.
        while self._localWorkers < LOCAL_CONCURRENCY and self._nextLocal(now) is not None:
            self._localWorkers += 1
            self._track(self._localWorker())
        while self._workers < self._maxConnections and now >= self._holdUntil:
            first = self._remoteAttempts.first()
            if first is None or first[0] > now:
                break
            self._workers += 1
            self._track(self._worker())
        self._setTimer(now)

    def _setTimer(self, now: float) -> None:
        """
        Wake for the next work to fall due. Work due already but not
        started waits for a worker, which looks again when it is done.
        """
        upcoming = []
        for timeline, notBefore in (
            (self._localAttempts, now),
            (self._delayNotices, now),
            (self._remoteAttempts, max(now, self._holdUntil)),
        ):
            first = timeline.first()
            if first is not None and max(first[0], notBefore) > now:
                upcoming.append(max(first[0], notBefore))
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if upcoming:
            self._timer = self._reactor.callLater(min(upcoming) - now, self._dispatch)

    def _takeRemote(self) -> Optional[str]:
        msgid = self._remoteAttempts.take(self._reactor.seconds())
        if msgid is not None:
            self._take(msgid)
        return msgid

    def _takeLocal(self) -> Optional[tuple]:
        """The local job due longest, taken, as C{(the method that does it, message)}."""
        now = self._reactor.seconds()
        timeline = self._nextLocal(now)
        msgid = None if timeline is None else timeline.take(now)
        if msgid is None:
            return None
        self._take(msgid)
        return (self._reportDelay if timeline is self._delayNotices else self._attemptOne), msgid

    # Delivery

    @defer.inlineCallbacks
    def _worker(self):
        """One relay connection: deliver due messages until none is left."""
        session = None
        try:
            while self.running:
                msgid = self._takeRemote()
                if msgid is None:
                    break
                try:
                    session, ok = yield self._attempt(msgid, session)
                except Exception:
                    self._attemptCrashed(msgid)
                    ok = False
                finally:
                    self._release(msgid)
                if ok is False:
                    break
        finally:
            self._workers -= 1
        if session is not None:
            # Still among the sessions while it says QUIT: stopping aborts
            # it instead of waiting up to [relay] timeout for the reply.
            try:
                yield session.close()
            except Exception:
                log.failure("queue: closing the relay session failed")
            finally:
                self._sessions.discard(session)
        self._dispatch()

    @defer.inlineCallbacks
    def _localWorker(self):
        """
        Local work (deliveries, delay notifications) one job at a time,
        until none is due: at most L{LOCAL_CONCURRENCY} of these run, so a
        burst of due jobs does not take a call of the disk pool each.
        """
        try:
            while self.running:
                job = self._takeLocal()
                if job is None:
                    break
                work, msgid = job
                yield work(msgid)
                # What this job let go may be due for the relay now.
                self._dispatch()
        finally:
            self._localWorkers -= 1
        self._dispatch()

    @defer.inlineCallbacks
    def _attemptOne(self, msgid: str):
        try:
            yield self._attempt(msgid, None)
        except Exception:
            self._attemptCrashed(msgid)
        finally:
            self._release(msgid)

    def _attemptCrashed(self, msgid: str) -> None:
        """An attempt failed on a bug or an I/O error: it is tried again after L{_crashed}."""
        when = self._reactor.seconds() + self._crashed(msgid, "delivery attempt")
        entry = self._index.get(msgid)
        if entry is not None:
            self._setEntry(msgid, attrs.evolve(entry, nextAttempt=when))

    def _crashed(self, msgid: str, work: str) -> float:
        """
        A bug, an I/O error, a busy pool: log it, and return how long to
        wait before trying again, with the backoff of failed attempts (a
        full disk does not free itself in a minute). An I/O error is the
        host's to fix, and a disk pool busy with sessions is load, not a
        bug: one line each, no traceback.
        """
        failure = Failure()
        crashes = self._crashes[msgid] = self._crashes.get(msgid, 0) + 1
        delay = self._policy.delay(crashes)
        error = failure.value
        if isinstance(error, PoolBusy):
            log.warn(
                "queue: {msgid}: {work} put off: {error}; tried again in {delay:g} s",
                msgid=msgid,
                work=work,
                error=str(error),
                delay=delay,
            )
        elif isinstance(error, OSError) and error.errno is not None:
            log.error(
                "queue: {msgid}: {work} failed: {path}: {error} (errno {errno});"
                " tried again in {delay:g} s",
                msgid=msgid,
                work=work,
                path=error.filename or "the queue",
                error=error.strerror,
                errno=error.errno,
                delay=delay,
            )
        else:
            log.failure("queue: {msgid}: {work} failed", failure, msgid=msgid, work=work)
        return delay

    @defer.inlineCallbacks
    def _reportDelay(self, msgid: str):
        """
        Queue the delay notification due about C{msgid}, which no attempt
        is making now (the relay may be held back for hours).
        """
        try:
            result = yield self._runBlocking(
                self._queue.reportDue, msgid, self._reactor.seconds(), self._policy
            )
        except Exception:
            when = self._reactor.seconds() + self._crashed(msgid, "delay notification")
            entry = self._index.get(msgid)
            if entry is not None:
                self._setEntry(msgid, attrs.evolve(entry, delayDue=when))
        else:
            if result is None:
                self._deleted(msgid)
            else:
                self._report(msgid, {}, result)
                entry = self._index.get(msgid)
                if result.envelope is None:
                    self._index.pop(msgid, None)
                elif entry is not None:
                    # Only its notifications changed: the attempt schedule stays.
                    due = result.envelope.delayNoticeDue(self._policy)
                    self._setEntry(msgid, attrs.evolve(entry, delayDue=due))
                self._scheduleQueued(result)
        finally:
            self._release(msgid)

    @defer.inlineCallbacks
    def _attempt(self, msgid: str, session):
        """
        Try every pending recipient of C{msgid} once.

        @return: (the session to use next, or L{None}; whether the relay
            session worked, or L{None} if none was needed).
        """
        envelope = yield self._runBlocking(self._queue.envelope, msgid)
        if envelope is None:
            self._deleted(msgid)
            return session, None
        # What an earlier attempt decided but could not write is not tried again.
        outcomes: dict = dict(self._unsettled.get(msgid, {}))
        error = None
        ok = None
        if envelope.triedAt(self._reactor.seconds(), self._policy):
            pending = [a for a in envelope.pending() if a not in outcomes]
            local = [a for a in pending if self._local.isLocal(a)]
            remote = [a for a in pending if a not in local]
            try:
                if local:
                    outcomes.update((yield self._deliverLocally(msgid, local)))
                if remote:
                    started = self._reactor.seconds()
                    try:
                        session = yield self._relay(session, envelope, remote, outcomes)
                        ok = True
                    except RelayError as e:
                        error = str(e)
                        session = None
                        ok = False
                        outcomes.update({a: Outcome(PENDING, error=error) for a in remote})
                        outcomes.update(
                            (a, Outcome.fromReply(reply))
                            for a, reply in e.refused.items()
                            if a in outcomes
                        )
                    self._metrics.relayAttempt(
                        _relayOutcome(ok, [outcomes[a] for a in remote]),
                        self._reactor.seconds() - started,
                    )
            except DamagedMessage as e:
                # Damaged on disk (truncated): relaying it would send a part,
                # or never end its DATA; a Maildir would keep a part. Set
                # aside for the admin.
                yield self._runBlocking(self._queue.quarantine, msgid, str(e))
                self._index.pop(msgid, None)
                self._forgetAttempts(msgid)
                return session, None
        try:
            result = yield self._runBlocking(
                self._queue.settle,
                msgid,
                outcomes,
                error,
                self._reactor.seconds(),
                self._policy,
                self._relayHost,
            )
        except Exception:
            # The relay may have taken the message for some recipients: they
            # must not get it again because their outcome was not written.
            self._unsettled[msgid] = {a: o for a, o in outcomes.items() if o.state != PENDING}
            raise
        self._forgetAttempts(msgid)
        self._report(msgid, outcomes, result)
        self._remember(result.envelope, msgid)
        if ok:
            self._holdUntil = 0.0
            self._sessionFailures = 0
        elif ok is not None:
            self._sessionFailures += 1
            self._holdUntil = self._reactor.seconds() + self._policy.delay(self._sessionFailures)
        # Once the session's failure holds new ones back: a notification
        # to a remote sender must not open one at once.
        self._scheduleQueued(result)
        return session, ok

    def _scheduleQueued(self, result: SettleResult) -> None:
        """
        Schedule the notifications C{result} queued, as a scan would find
        them, without listing the queue (one scan per notification made a
        burst of them cost the square of the queue's length).
        """
        for envelope in result.queued:
            self._remember(envelope)
            if self._scanning:
                self._queuedDuringScan.add(envelope.id)
        if result.queued:
            self._dispatch()

    def _deleted(self, msgid: str) -> None:
        """
        C{msgid} was found gone, not removed by the forwarder: deleted by
        another process, or set aside as unreadable (which was logged then).
        """
        self._forgetAttempts(msgid)
        if self._index.pop(msgid, None) is not None and not self._queue.wasSetAside(msgid):
            log.info(
                "queue: {msgid}: deleted by another process (mailauth queue delete)",
                msgid=msgid,
                queueEvent="deleted",
            )

    def _forgetAttempts(self, msgid: str) -> None:
        """Its outcome written, or the message gone: what failed attempts left is dropped."""
        self._unsettled.pop(msgid, None)
        self._crashes.pop(msgid, None)

    @defer.inlineCallbacks
    def _relay(self, session, envelope: Envelope, remote: list, outcomes: dict):
        """
        Deliver C{envelope} to C{remote} through the relay, adding to
        C{outcomes}. @return: the session, to reuse.
        @raise RelayError: if the session failed; it is closed.
        """
        try:
            message = self._queue.openMessage(envelope)
        except FileNotFoundError:
            raise RelayError("the message file is gone (deleted?)") from None
        if session is not None and not session.reusable:
            # Its last transaction could not be reset, or the relay hung up
            # since: that is no failure of this message, which takes a new
            # session (without waiting on a QUIT to a relay in that state).
            self._sessions.discard(session)
            yield session.abort()
            session = None
        if session is None:
            connecting = self._connector.connect()
            self._connecting.add(connecting)
            try:
                session = yield connecting
            except Exception as e:
                message.close()
                if isinstance(e, defer.CancelledError):
                    raise RelayError("stopped while connecting") from None
                raise
            finally:
                self._connecting.discard(connecting)
            self._sessions.add(session)
        try:
            with message:
                replies = yield session.deliver(
                    envelope.sender,
                    remote,
                    message,
                    envelope.messageSize,
                    envelope.body8bit,
                    envelope,
                )
        except Exception as e:
            self._sessions.discard(session)
            yield session.abort()
            if isinstance(e, RelayError):
                raise
            log.failure("queue: relaying {msgid} failed", Failure(), msgid=envelope.id)
            raise RelayError(f"internal error: {e!r}") from None
        for address in remote:
            outcomes[address] = Outcome.fromReply(replies[address], upstreamDSN=session.dsn)
        return session

    @defer.inlineCallbacks
    def _deliverLocally(self, msgid: str, recipients: list):
        message = yield self._runBlocking(self._queue.readMessage, msgid)
        outcomes = {}
        for recipient in recipients:
            try:
                yield defer.maybeDeferred(self._local.deliver, recipient, message)
            except SMTPReply as e:
                state = FAILED if e.code >= 500 else PENDING
                outcomes[recipient] = Outcome(state, reply=f"{e.code} {e.text}")
            except Exception as e:
                outcomes[recipient] = Outcome(PENDING, error=f"local delivery failed: {e!r}")
            else:
                outcomes[recipient] = Outcome(
                    DELIVERED, reply="250 2.0.0 delivered locally", local=True
                )
        return outcomes

    def _report(self, msgid: str, outcomes: dict, result: SettleResult) -> None:
        """Log what happened, one line per recipient, in Postfix's manner."""
        for address, outcome in outcomes.items():
            status = {DELIVERED: "sent", PENDING: "deferred", FAILED: "bounced"}[outcome.state]
            log.info(
                "queue: {msgid}: to=<{recipient}>, status={status} ({why})",
                msgid=msgid,
                recipient=address,
                status=status,
                why=outcome.reply or outcome.error,
                queueEvent=status,
            )
        for address in result.expired:
            log.info(
                "queue: {msgid}: to=<{recipient}>, status=expired, {returned}",
                msgid=msgid,
                recipient=address,
                returned=(
                    "returned to sender"
                    if address in result.returned
                    else "not returned (NOTIFY without FAILURE, or a null sender)"
                ),
                queueEvent="expired",
            )
        for bounceID, action in zip(result.bounces, result.actions):
            log.info(
                "queue: {msgid}: sender {kind} notification: {bounceID}",
                msgid=msgid,
                kind=_NOTIFICATION_KINDS[action],
                bounceID=bounceID,
                queueEvent="bounce",
            )
        if result.gone:
            self._deleted(msgid)
        elif result.envelope is None:
            log.info("queue: {msgid}: removed", msgid=msgid, queueEvent="removed")


# What each notification is called in the log, as Postfix names them.
_NOTIFICATION_KINDS = {
    "failed": "non-delivery",
    "delayed": "delay",
    "delivered": "delivery status",
    "relayed": "delivery status",
}


def _relayOutcome(ok: bool, outcomes: list) -> str:
    """How one message's relay attempt is counted (L{Metrics.relayAttempt})."""
    if not ok:
        return "error"
    states = {outcome.state for outcome in outcomes}
    if PENDING in states:
        return "deferred"
    if FAILED in states:
        return "bounced"
    return "sent"
