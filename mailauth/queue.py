"""
The durable forward queue: messages for the relay, on disk until delivered.

Layout of the queue directory (C{<state_dir>/queue}):

  - C{tmp/}: files being written; anything here after a crash is garbage.
  - C{msg/ID.data}: the message, CRLF line ends, dot-stuffed once, so that
    the relay client sends it verbatim followed by C{.CRLF}.
  - C{msg/ID.json}: the envelope (sender, per-recipient state, retry times).
    Its rename into C{msg/} commits the message; a data file without an
    envelope is never sent.
  - C{lock}: C{flock}ed around every rewrite of an envelope, by the daemon
    and by C{mailauth queue}.
  - C{flush}: present when C{mailauth queue flush} asks the daemon to try
    everything now.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import threading
from typing import Callable, Iterator, Optional, Sequence

import attrs
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailauth import dsn
from mailauth.config import RelayConfig
from mailauth.durable import fsyncDirectory, unlink, writeDurably
from mailauth.relay import RelayConnector, RelayError, SMTPReply

log = Logger(namespace="mailauth.queue")

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ENVELOPE_VERSION = 1
# Whatever could end or extend the command the address is sent in.
_BAD_ADDRESS = re.compile(r"[\x00-\x20\x7f<>]")


def validID(msgid: str) -> bool:
    """
    Whether C{msgid} can name a queued message: letters, digits, C{.}, C{_}
    and C{-}, not starting with a dot, so it is safe as a file name.
    """
    return _ID.fullmatch(msgid) is not None


class DotStuffer:
    """
    Turns a message given in chunks into its stored form: bare CR and bare LF
    become CRLF, and a dot that starts a line is doubled (RFC 5321 4.5.2).

    It keeps state across chunks, so a chunk may end anywhere, even between
    CR and LF or right before a dot: this is what Twisted's client gets wrong
    (D30 in research/twisted-mail.md).
    """

    def __init__(self) -> None:
        self._pendingCR = False
        self._lineStart = True
        self._empty = True

    def feed(self, chunk: bytes) -> bytes:
        """@return: the stored form of C{chunk}, as far as it is known yet."""
        if self._pendingCR:
            chunk = b"\r" + chunk
            self._pendingCR = False
        if chunk.endswith(b"\r"):
            # It may be the first half of a CRLF.
            chunk = chunk[:-1]
            self._pendingCR = True
        if not chunk:
            return b""
        if b"\r" in chunk or b"\n" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
            chunk = chunk.replace(b"\r\n.", b"\r\n..")
        if self._lineStart and chunk.startswith(b"."):
            chunk = b"." + chunk
        self._lineStart = chunk.endswith(b"\r\n")
        self._empty = False
        return chunk

    def finish(self) -> bytes:
        """
        @return: the last bytes of the stored form, which ends with CRLF
            unless the message is empty.
        """
        if self._pendingCR or not (self._empty or self._lineStart):
            self._pendingCR = False
            self._lineStart = True
            self._empty = False
            return b"\r\n"
        return b""


def unstuff(stored: bytes) -> bytes:
    """The message whose stored (dot-stuffed) form is C{stored}."""
    if stored.startswith(b"."):
        stored = stored[1:]
    return stored.replace(b"\r\n.", b"\r\n")


@attrs.frozen
class RecipientStatus:
    """
    Where delivery to one recipient stands.

    @ivar address: C{local@domain}.
    @ivar state: L{PENDING}, L{DELIVERED} or L{FAILED}.
    @ivar reply: the last SMTP reply about it, on one line, if any.
    @ivar error: the last failure that was not an SMTP reply, if any.
    @ivar notified: for a failed recipient, whether the bounce about it has
        been queued (or none is due, for the null sender).
    @ivar expired: it failed because the message expired.
    """

    address: str
    state: str = PENDING
    reply: Optional[str] = None
    error: Optional[str] = None
    notified: bool = False
    expired: bool = False


@attrs.frozen
class Outcome:
    """
    The result of one attempt for one recipient.

    @ivar state: L{DELIVERED}, L{PENDING} (try again later) or L{FAILED}.
    """

    state: str
    reply: Optional[str] = None
    error: Optional[str] = None

    @classmethod
    def fromReply(cls, reply: SMTPReply) -> Outcome:
        """2xx delivered, 4xx try again, 5xx failed for good."""
        state = {2: DELIVERED, 4: PENDING}.get(reply.code // 100, FAILED)
        return cls(state, reply=reply.text)


@attrs.frozen
class RetryPolicy:
    """
    When to try again: C{initial} seconds after the first failure, doubling
    up to C{maximum}; recipients still pending C{expire} seconds after the
    message arrived fail.
    """

    initial: float = 60.0
    maximum: float = 3600.0
    expire: float = 5 * 86400.0

    @classmethod
    def fromConfig(cls, config: Optional[RelayConfig]) -> RetryPolicy:
        if config is None:
            return cls()
        return cls(config.retry_initial, config.retry_max, config.expire)

    def delay(self, failures: int) -> float:
        """The wait after the C{failures}th failed attempt in a row."""
        return min(self.initial * 2 ** min(max(failures - 1, 0), 64), self.maximum)


@attrs.frozen
class Envelope:
    """
    A queued message's envelope and delivery state, stored as JSON.

    @ivar id: the queue ID.
    @ivar sender: the envelope sender, C{""} for the null sender C{<>}.
    @ivar arrival: when it was queued (POSIX time).
    @ivar nextAttempt: when to try the pending recipients again.
    @ivar attempts: how many attempts were made.
    @ivar lastError: why the last attempt failed as a whole, if it did.
    @ivar size: size of the stored (dot-stuffed) message in bytes.
    @ivar body8bit: the message has bytes above 127.
    """

    id: str
    sender: str
    recipients: tuple
    arrival: float
    nextAttempt: float
    attempts: int = 0
    lastError: Optional[str] = None
    size: int = 0
    body8bit: bool = False

    def pending(self) -> list:
        """The addresses still to be delivered to."""
        return [r.address for r in self.recipients if r.state == PENDING]

    def unnotified(self) -> list:
        """The failed recipients no bounce has been queued for yet."""
        return [r for r in self.recipients if r.state == FAILED and not r.notified]

    def finished(self) -> bool:
        """Every recipient delivered, or failed with its bounce queued."""
        return all(
            r.state == DELIVERED or (r.state == FAILED and r.notified) for r in self.recipients
        )

    def expiresAt(self, policy: RetryPolicy) -> float:
        return self.arrival + policy.expire

    def afterAttempt(
        self, outcomes: dict, error: Optional[str], now: float, policy: RetryPolicy
    ) -> Envelope:
        """
        This envelope with the C{outcomes} (address to L{Outcome}) of an
        attempt applied, the next attempt scheduled, and the pending
        recipients failed if the message has expired.
        """
        recipients = []
        for r in self.recipients:
            outcome = outcomes.get(r.address)
            if outcome is not None and r.state == PENDING:
                r = attrs.evolve(
                    r,
                    state=outcome.state,
                    reply=outcome.reply if outcome.reply is not None else r.reply,
                    error=outcome.error,
                    notified=not self.sender,
                )
            recipients.append(r)
        envelope = self
        if outcomes:
            envelope = attrs.evolve(self, attempts=self.attempts + 1, lastError=error)
        envelope = attrs.evolve(envelope, recipients=tuple(recipients))
        envelope = attrs.evolve(
            envelope,
            nextAttempt=min(now + policy.delay(envelope.attempts), envelope.expiresAt(policy)),
        )
        if now >= envelope.expiresAt(policy):
            envelope = envelope.expire()
        return envelope

    def expire(self) -> Envelope:
        """This envelope with every pending recipient failed as expired."""
        return attrs.evolve(
            self,
            recipients=tuple(
                attrs.evolve(r, state=FAILED, expired=True, notified=not self.sender)
                if r.state == PENDING
                else r
                for r in self.recipients
            ),
        )

    def markNotified(self, addresses: Sequence[str]) -> Envelope:
        return attrs.evolve(
            self,
            recipients=tuple(
                attrs.evolve(r, notified=True) if r.address in addresses else r
                for r in self.recipients
            ),
        )

    def toJSON(self) -> bytes:
        return json.dumps(
            {
                "version": _ENVELOPE_VERSION,
                "id": self.id,
                "sender": self.sender,
                "arrival": self.arrival,
                "next_attempt": self.nextAttempt,
                "attempts": self.attempts,
                "last_error": self.lastError,
                "size": self.size,
                "body_8bit": self.body8bit,
                "recipients": [
                    {
                        "address": r.address,
                        "state": r.state,
                        "reply": r.reply,
                        "error": r.error,
                        "notified": r.notified,
                        "expired": r.expired,
                    }
                    for r in self.recipients
                ],
            },
            indent=1,
            sort_keys=True,
        ).encode("utf-8")

    @classmethod
    def fromJSON(cls, data: bytes) -> Envelope:
        """
        @raise ValueError: if C{data} is not an envelope.
        """
        try:
            obj = json.loads(data)
            if obj["version"] != _ENVELOPE_VERSION:
                raise ValueError(f"unknown envelope version {obj['version']!r}")
            recipients = tuple(
                RecipientStatus(
                    address=str(r["address"]),
                    state=r["state"],
                    reply=r.get("reply"),
                    error=r.get("error"),
                    notified=bool(r.get("notified", False)),
                    expired=bool(r.get("expired", False)),
                )
                for r in obj["recipients"]
            )
            if any(r.state not in (PENDING, DELIVERED, FAILED) for r in recipients):
                raise ValueError("unknown recipient state")
            return cls(
                id=str(obj["id"]),
                sender=str(obj["sender"]),
                recipients=recipients,
                arrival=float(obj["arrival"]),
                nextAttempt=float(obj["next_attempt"]),
                attempts=int(obj["attempts"]),
                lastError=obj.get("last_error"),
                size=int(obj.get("size", 0)),
                body8bit=bool(obj.get("body_8bit", False)),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed envelope: {e!r}") from None


class _Spool:
    """
    The queue directory's files, shared by the daemon and C{mailauth queue}.
    Every method blocks.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.tmp = os.path.join(directory, "tmp")
        self.msg = os.path.join(directory, "msg")
        self.lockPath = os.path.join(directory, "lock")
        self.flushPath = os.path.join(directory, "flush")

    def create(self) -> None:
        for path in (self.directory, self.tmp, self.msg):
            os.makedirs(path, mode=0o700, exist_ok=True)

    def exists(self) -> bool:
        return os.path.isdir(self.msg)

    def envelopePath(self, msgid: str) -> str:
        return os.path.join(self.msg, msgid + ".json")

    def dataPath(self, msgid: str) -> str:
        return os.path.join(self.msg, msgid + ".data")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the queue's lock: one envelope rewrite at a time, across processes."""
        fd = os.open(self.lockPath, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.geteuid() == 0:
                # mailauth queue run as root must not lock the daemon out.
                owner = os.stat(self.directory)
                os.fchown(fd, owner.st_uid, owner.st_gid)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def ids(self) -> list:
        """The IDs of every committed message."""
        try:
            names = os.listdir(self.msg)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(".json")] for n in names if n.endswith(".json"))

    def read(self, msgid: str, quarantine: bool = True) -> Optional[Envelope]:
        """
        The envelope of C{msgid}, or L{None} if there is no such message or
        it is unreadable. An unreadable envelope is logged and, if
        C{quarantine}, renamed to C{ID.corrupt} for the administrator.
        """
        path = self.envelopePath(msgid)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            envelope = Envelope.fromJSON(data)
            if envelope.id != msgid:
                raise ValueError(f"it names message {envelope.id!r}")
        except ValueError as e:
            log.error("queue: envelope {path} is unreadable: {error}", path=path, error=str(e))
            if quarantine:
                with contextlib.suppress(OSError):
                    os.rename(path, os.path.join(self.msg, msgid + ".corrupt"))
            return None
        return envelope

    def write(self, envelope: Envelope) -> None:
        """Replace the envelope atomically (temp file, fsync, rename)."""
        path = self.envelopePath(envelope.id)
        try:
            owner = os.stat(path)
        except FileNotFoundError:
            owner = None
        temp = os.path.join(self.tmp, f"{envelope.id}.{secrets.token_hex(4)}.json")
        try:
            writeDurably(temp, envelope.toJSON(), owner)
            os.rename(temp, path)
        except BaseException:
            unlink(temp)
            raise

    def update(self, msgid: str, change: Callable[[Envelope], Envelope]) -> Optional[Envelope]:
        """
        Rewrite the envelope of C{msgid} as C{change} makes it, under the lock,
        from what is on disk now.

        @return: the new envelope, or L{None} if the message is gone.
        """
        with self.locked():
            envelope = self.read(msgid)
            if envelope is None:
                return None
            changed = change(envelope)
            if changed != envelope:
                self.write(changed)
            return changed

    def remove(self, msgid: str) -> bool:
        """Remove a message, envelope first. @return: whether it was there."""
        found = unlink(self.envelopePath(msgid))
        unlink(self.dataPath(msgid))
        return found


class QueueWriter:
    """
    Writes one new message into the queue: L{write} its chunks, then
    L{commit} it (or L{abort}).
    """

    def __init__(self, queue: Queue, msgid: str, sender: str, recipients: Sequence[str]) -> None:
        self._queue = queue
        self._spool = queue._spool
        self.msgid = msgid
        self._sender = sender
        self._recipients = tuple(recipients)
        self._arrival = queue.clock.seconds()
        self._stuffer = DotStuffer()
        self._size = 0
        self._body8bit = False
        self._tempData = os.path.join(self._spool.tmp, msgid + ".data")
        self._tempEnvelope = os.path.join(self._spool.tmp, msgid + ".json")
        self._file = open(self._tempData, "xb", opener=_privateOpener)
        self._done = False

    def write(self, chunk: bytes) -> None:
        """
        Add C{chunk} of the message (canonical form, not dot-stuffed; chunks
        may split anywhere).
        """
        if not self._body8bit and not chunk.isascii():
            self._body8bit = True
        stored = self._stuffer.feed(chunk)
        self._size += len(stored)
        self._file.write(stored)

    def commit(self) -> str:
        """
        Make the message durable: fsync the data, write the envelope (temp
        file, fsync, rename) and fsync the directory. Blocks: call it in a
        thread.

        @return: the queue ID.
        """
        if self._done:
            raise ValueError(f"message {self.msgid} was already committed or aborted")
        self._done = True
        spool = self._spool
        try:
            tail = self._stuffer.finish()
            self._size += len(tail)
            self._file.write(tail)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            envelope = Envelope(
                id=self.msgid,
                sender=self._sender,
                recipients=tuple(RecipientStatus(address) for address in self._recipients),
                arrival=self._arrival,
                nextAttempt=self._arrival,
                size=self._size,
                body8bit=self._body8bit,
            )
            os.rename(self._tempData, spool.dataPath(self.msgid))
            writeDurably(self._tempEnvelope, envelope.toJSON())
            os.rename(self._tempEnvelope, spool.envelopePath(self.msgid))
            # One directory fsync makes both names durable. Before it
            # returns, a power cut may keep the envelope but lose the data
            # file; recover() drops such an envelope, and it was never
            # acknowledged.
            fsyncDirectory(spool.msg)
        except BaseException:
            self._discard(committing=True)
            raise
        finally:
            self._queue._finished(self.msgid)
        return self.msgid

    def abort(self) -> None:
        """Forget the message and remove its files."""
        if self._done:
            return
        self._done = True
        self._discard(committing=False)
        self._queue._finished(self.msgid)

    def _discard(self, committing: bool) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        unlink(self._tempData)
        unlink(self._tempEnvelope)
        if committing:
            self._spool.remove(self.msgid)


def _privateOpener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, 0o600)


@attrs.frozen
class ScanResult:
    """
    What L{Queue.scan} found.

    @ivar envelopes: the envelopes it read.
    @ivar present: the IDs of every message in the queue.
    @ivar flushed: C{mailauth queue flush} asked for everything to be tried.
    """

    envelopes: tuple
    present: frozenset
    flushed: bool


@attrs.frozen
class SettleResult:
    """
    What L{Queue.settle} did.

    @ivar envelope: the message's envelope now, or L{None} if it left the
        queue (all done, or deleted).
    @ivar bounces: the queue IDs of the bounces it queued.
    @ivar expired: the recipients that failed because the message expired.
    """

    envelope: Optional[Envelope]
    bounces: tuple = ()
    expired: tuple = ()


class Queue:
    """
    The forward queue in C{directory}.

    L{newMessage} is cheap and is called on the reactor thread; the methods
    documented as blocking do file I/O with fsync and belong in a thread.

    @ivar hostname: this server's name, for bounces.
    @ivar clock: the source of time.
    """

    def __init__(self, directory: str, clock, hostname: str) -> None:
        self.directory = directory
        self.clock = clock
        self.hostname = hostname
        self._spool = _Spool(directory)
        self._spool.create()
        self._active: set = set()
        self._activeLock = threading.Lock()

    def newID(self) -> str:
        """A new, unique queue ID."""
        return f"{int(self.clock.seconds()):x}{secrets.token_hex(6)}"

    def newMessage(self, msgid: str, sender: str, recipients: list) -> QueueWriter:
        """
        Start writing a message.

        @param msgid: its queue ID (see L{validID}).
        @param sender: the envelope sender, C{""} for the null sender.
        @param recipients: the recipient addresses, C{local@domain}.
        @raise ValueError: for a bad or used ID, or no recipients.
        """
        if not validID(msgid):
            raise ValueError(f"{msgid!r} cannot name a queued message")
        if not recipients:
            raise ValueError("a message needs at least one recipient")
        for address in [sender, *recipients]:
            if _BAD_ADDRESS.search(address) or (address != sender and not address):
                raise ValueError(f"{address!r} cannot be an envelope address")
        with self._activeLock:
            if msgid in self._active or os.path.exists(self._spool.envelopePath(msgid)):
                raise ValueError(f"message {msgid} is already queued")
            self._active.add(msgid)
        try:
            return QueueWriter(self, msgid, sender, recipients)
        except BaseException:
            self._finished(msgid)
            raise

    def _finished(self, msgid: str) -> None:
        with self._activeLock:
            self._active.discard(msgid)

    def dataPath(self, msgid: str) -> str:
        """The stored (dot-stuffed) message file of C{msgid}."""
        return self._spool.dataPath(msgid)

    # Blocking methods

    def recover(self) -> None:
        """
        Remove what a crash left: temp files, data files without an envelope,
        and envelopes without a data file (never acknowledged). Blocks.
        """
        with self._spool.locked():
            with self._activeLock:
                active = set(self._active)
            for name in os.listdir(self._spool.tmp):
                if name.split(".", 1)[0] not in active:
                    unlink(os.path.join(self._spool.tmp, name))
            names = set(os.listdir(self._spool.msg))
            for name in sorted(names):
                msgid, _, kind = name.rpartition(".")
                if msgid in active:
                    continue
                if kind == "data" and msgid + ".json" not in names:
                    log.info(
                        "queue: removing {name}, a message that was never committed", name=name
                    )
                    unlink(os.path.join(self._spool.msg, name))
                elif kind == "json" and msgid + ".data" not in names:
                    log.error(
                        "queue: removing envelope {name}: its message file is missing", name=name
                    )
                    unlink(os.path.join(self._spool.msg, name))

    def scan(self, known: frozenset, everything: bool = False) -> ScanResult:
        """
        List the queue and read the envelopes of messages not in C{known}
        (of all, if C{everything} or a flush was requested). Blocks.
        """
        flushed = unlink(self._spool.flushPath)
        present = frozenset(self._spool.ids())
        envelopes = []
        for msgid in sorted(present):
            if everything or flushed or msgid not in known:
                envelope = self._spool.read(msgid)
                if envelope is not None:
                    envelopes.append(envelope)
        return ScanResult(tuple(envelopes), present, flushed)

    def envelope(self, msgid: str) -> Optional[Envelope]:
        """The envelope of C{msgid}, or L{None}. Blocks."""
        return self._spool.read(msgid)

    def readMessage(self, msgid: str) -> bytes:
        """The message C{msgid} itself (CRLF, not dot-stuffed). Blocks."""
        with open(self._spool.dataPath(msgid), "rb") as f:
            return unstuff(f.read())

    def settle(
        self,
        msgid: str,
        outcomes: dict,
        error: Optional[str],
        now: float,
        policy: RetryPolicy,
        relayHost: Optional[str] = None,
    ) -> SettleResult:
        """
        Record an attempt (or, with no C{outcomes}, only check for expiry),
        queue one bounce for the recipients that failed since the last one,
        and remove the message once every recipient is done. Blocks.

        @param outcomes: address to L{Outcome}.
        @param error: why the attempt failed as a whole, if it did.
        @param relayHost: the host that gave the replies, for the bounce.
        """
        before = []

        def change(envelope):
            before[:] = envelope.pending()
            return envelope.afterAttempt(outcomes, error, now, policy)

        envelope = self._spool.update(msgid, change)
        if envelope is None:
            return SettleResult(None)
        expired = tuple(r.address for r in envelope.recipients if r.expired and r.address in before)
        bounces = []
        failed = envelope.unnotified()
        if failed:
            if envelope.sender:
                bounces.append(self._queueBounce(envelope, failed, now, relayHost))
            envelope = self._spool.update(
                msgid, lambda e: e.markNotified([r.address for r in failed])
            )
        if envelope is not None and envelope.finished():
            with self._spool.locked():
                self._spool.remove(msgid)
            envelope = None
        return SettleResult(envelope, tuple(bounces), expired)

    def _queueBounce(
        self, envelope: Envelope, failed: list, now: float, relayHost: Optional[str]
    ) -> str:
        try:
            with open(self._spool.dataPath(envelope.id), "rb") as f:
                head = f.read(dsn.MAX_RETURNED_HEADERS + 4)
        except FileNotFoundError:
            head = b""
        headers = dsn.returnedHeaders(unstuff(head))
        bounceID = self.newID()
        boundary = f"{bounceID}/{self.hostname}"
        while boundary.encode("ascii") in headers:
            boundary += secrets.token_hex(4)
        message = dsn.buildBounce(
            hostname=self.hostname,
            queueID=envelope.id,
            messageID=f"{bounceID}@{self.hostname}",
            boundary=boundary,
            sender=envelope.sender,
            arrival=envelope.arrival,
            now=now,
            failures=[
                dsn.FailedRecipient(r.address, reply=r.reply, error=r.error, expired=r.expired)
                for r in failed
            ],
            originalHeaders=headers,
            relayHost=relayHost,
        )
        writer = self.newMessage(bounceID, "", [envelope.sender])
        try:
            writer.write(message)
        except BaseException:
            writer.abort()
            raise
        return writer.commit()


@attrs.frozen
class _Entry:
    """The scheduler's view of one queued message."""

    nextAttempt: float
    remote: bool


class QueueService(service.Service):
    """
    Delivers the queue: local recipients (bounces to local senders) through
    C{localDelivery}, the others through the relay, with at most
    C{max_connections} sessions, each reused for several messages.

    It scans the queue on start, every C{queue_interval} (which also picks
    up C{mailauth queue flush}), and when L{wake} is called after a commit.
    After a session fails as a whole (no connection, TLS, AUTH), new
    sessions wait, with the same backoff as messages, so a relay that is
    down is not hammered by every message in the queue.

    @param queue: the queue to deliver.
    @param relayConfig: the C{[relay]} section, or L{None} if there is no
        relay: remote recipients then wait (and expire).
    @param reactor: provides time, and TCP for the relay client.
    @param localDelivery: has C{isLocal(address) -> bool} and
        C{deliver(recipient, message) -> Deferred}; C{message} is the whole
        message, CRLF line ends, not dot-stuffed. A failure is temporary,
        unless its value has a C{code} attribute from 500 to 599.
    @param runBlocking: runs blocking file work (fsync) off the reactor:
        C{runBlocking(f, *args)} returns a Deferred of C{f(*args)}, as
        L{mailauth.threads.ThreadPoolService.run} does; if L{None}, the work
        runs on the reactor thread.
    @param connector: makes relay sessions (an L{IRelayConnector}); by
        default a L{RelayConnector} for C{relayConfig}.
    """

    name = "queue"

    def __init__(
        self,
        queue: Queue,
        relayConfig: Optional[RelayConfig],
        reactor,
        localDelivery,
        *,
        runBlocking: Optional[Callable] = None,
        connector=None,
    ) -> None:
        self._queue = queue
        self._config = relayConfig
        self._reactor = reactor
        self._local = localDelivery
        self._runBlocking = runBlocking
        if connector is None and relayConfig is not None:
            connector = RelayConnector(relayConfig, reactor, queue.hostname)
        self._connector = connector
        self._policy = RetryPolicy.fromConfig(relayConfig)
        self._maxConnections = relayConfig.max_connections if relayConfig else 1
        self._interval = relayConfig.queue_interval if relayConfig else 30.0
        self._relayHost = relayConfig.host if relayConfig else None
        self._index: dict = {}
        self._inFlight: set = set()
        self._workers = 0
        self._tasks: set = set()
        self._sessions: set = set()
        self._connecting: set = set()
        self._loop = None
        self._timer = None
        self._wakeCall = None
        self._scanning = False
        self._rescan = False
        self._holdUntil = 0.0
        self._sessionFailures = 0

    # Service

    def startService(self) -> None:
        super().startService()
        self._queue.recover()
        self._loop = task.LoopingCall(self._periodicScan)
        self._loop.clock = self._reactor
        self._loop.start(self._interval, now=True)

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

    def wake(self) -> None:
        """New mail was committed: look at the queue now."""
        if not self.running or (self._wakeCall is not None and self._wakeCall.active()):
            return
        self._wakeCall = self._reactor.callLater(0, self._scan)

    # Scanning and scheduling

    def _blocking(self, f, *args) -> defer.Deferred:
        if self._runBlocking is None:
            return defer.maybeDeferred(f, *args)
        return self._runBlocking(f, *args)

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        self._tasks.add(d)

        def done(result):
            self._tasks.discard(d)
            return result

        return d.addBoth(done)

    def _periodicScan(self) -> defer.Deferred:
        self._scan()
        return defer.succeed(None)

    def _scan(self, everything: bool = False) -> None:
        if not self.running:
            return
        if self._scanning:
            self._rescan = True
            return
        self._scanning = True
        d = self._blocking(
            self._queue.scan, frozenset(self._index) | frozenset(self._inFlight), everything
        )
        d.addCallback(self._scanned)
        d.addErrback(
            lambda f: log.failure("queue: scanning {dir} failed", f, dir=self._queue.directory)
        )

        def done(_):
            self._scanning = False
            if self._rescan:
                self._rescan = False
                self._scan()

        d.addCallback(done)
        self._track(d)

    def _scanned(self, result: ScanResult) -> None:
        for msgid in list(self._index):
            if msgid not in result.present:
                del self._index[msgid]
        for envelope in result.envelopes:
            if envelope.id not in self._inFlight:
                self._remember(envelope)
        if result.flushed:
            log.info("queue: flush requested, trying every message now")
            self._holdUntil = 0.0
            self._sessionFailures = 0
        self._dispatch()

    def _remember(self, envelope: Optional[Envelope], msgid: Optional[str] = None) -> None:
        if envelope is None:
            self._index.pop(msgid, None)
            return
        # An attempt at or after the expiry only expires the message, so it
        # does not wait for the relay.
        remote = envelope.nextAttempt < envelope.expiresAt(self._policy) and any(
            not self._local.isLocal(address) for address in envelope.pending()
        )
        self._index[envelope.id] = _Entry(envelope.nextAttempt, remote)

    def _due(self, now: float) -> list:
        return sorted(
            (entry.nextAttempt, msgid)
            for msgid, entry in self._index.items()
            if entry.nextAttempt <= now and msgid not in self._inFlight
        )

    def _dispatch(self) -> None:
        """Start what is due, and set a timer for what is due next."""
        if not self.running:
            return
        now = self._reactor.seconds()
        remoteDue = 0
        for _, msgid in self._due(now):
            if self._index[msgid].remote:
                remoteDue += 1
            else:
                self._inFlight.add(msgid)
                self._track(self._attemptOne(msgid))
        if remoteDue and now >= self._holdUntil:
            for _ in range(min(remoteDue, self._maxConnections - self._workers)):
                self._workers += 1
                self._track(self._worker())
        self._setTimer(now)

    def _setTimer(self, now: float) -> None:
        upcoming = [
            max(entry.nextAttempt, self._holdUntil) if entry.remote else entry.nextAttempt
            for msgid, entry in self._index.items()
            if msgid not in self._inFlight
        ]
        upcoming = [when for when in upcoming if when > now]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if upcoming:
            self._timer = self._reactor.callLater(min(upcoming) - now, self._dispatch)

    def _takeRemote(self) -> Optional[str]:
        for _, msgid in self._due(self._reactor.seconds()):
            if self._index[msgid].remote:
                self._inFlight.add(msgid)
                return msgid
        return None

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
                    self._inFlight.discard(msgid)
                if ok is False:
                    break
        finally:
            self._workers -= 1
        if session is not None:
            self._sessions.discard(session)
            try:
                yield session.close()
            except Exception:
                log.failure("queue: closing the relay session failed")
        self._dispatch()

    @defer.inlineCallbacks
    def _attemptOne(self, msgid: str):
        try:
            yield self._attempt(msgid, None)
        except Exception:
            self._attemptCrashed(msgid)
        finally:
            self._inFlight.discard(msgid)
        self._dispatch()

    def _attemptCrashed(self, msgid: str) -> None:
        """A bug, an I/O error, a busy pool: log it, and try again later."""
        log.failure("queue: {msgid}: delivery attempt failed", msgid=msgid)
        entry = self._index.get(msgid)
        if entry is not None:
            self._index[msgid] = attrs.evolve(
                entry, nextAttempt=self._reactor.seconds() + self._policy.initial
            )

    @defer.inlineCallbacks
    def _attempt(self, msgid: str, session):
        """
        Try every pending recipient of C{msgid} once.

        @return: (the session to use next, or L{None}; whether the relay
            session worked, or L{None} if none was needed).
        """
        envelope = yield self._blocking(self._queue.envelope, msgid)
        if envelope is None:
            self._index.pop(msgid, None)
            return session, None
        outcomes: dict = {}
        error = None
        ok = None
        if self._reactor.seconds() < envelope.expiresAt(self._policy):
            local = [a for a in envelope.pending() if self._local.isLocal(a)]
            remote = [a for a in envelope.pending() if a not in local]
            if local:
                outcomes.update((yield self._deliverLocally(msgid, local)))
            if remote:
                try:
                    session = yield self._relay(session, envelope, remote, outcomes)
                    ok = True
                except RelayError as e:
                    error = str(e)
                    session = None
                    ok = False
                    outcomes.update({a: Outcome(PENDING, error=error) for a in remote})
        result = yield self._blocking(
            self._queue.settle,
            msgid,
            outcomes,
            error,
            self._reactor.seconds(),
            self._policy,
            self._relayHost,
        )
        self._report(msgid, outcomes, result)
        self._remember(result.envelope, msgid)
        if result.bounces:
            self.wake()
        if ok:
            self._holdUntil = 0.0
            self._sessionFailures = 0
        elif ok is not None:
            self._sessionFailures += 1
            self._holdUntil = self._reactor.seconds() + self._policy.delay(self._sessionFailures)
        return session, ok

    @defer.inlineCallbacks
    def _relay(self, session, envelope: Envelope, remote: list, outcomes: dict):
        """
        Deliver C{envelope} to C{remote} through the relay, adding to
        C{outcomes}. @return: the session, to reuse.
        @raise RelayError: if the session failed; it is closed.
        """
        if self._connector is None:
            raise RelayError("no [relay] is configured")
        try:
            message = open(self._queue.dataPath(envelope.id), "rb")
        except FileNotFoundError:
            raise RelayError("the message file is gone (deleted?)") from None
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
                    envelope.sender, remote, message, envelope.size, envelope.body8bit
                )
        except Exception as e:
            self._sessions.discard(session)
            yield session.abort()
            if isinstance(e, RelayError):
                raise
            log.failure("queue: relaying {msgid} failed", Failure(), msgid=envelope.id)
            raise RelayError(f"internal error: {e!r}") from None
        for address in remote:
            outcomes[address] = Outcome.fromReply(replies[address])
        return session

    @defer.inlineCallbacks
    def _deliverLocally(self, msgid: str, recipients: list):
        message = yield self._blocking(self._queue.readMessage, msgid)
        outcomes = {}
        for recipient in recipients:
            try:
                yield defer.maybeDeferred(self._local.deliver, recipient, message)
            except Exception as e:
                code = getattr(e, "code", None)
                if isinstance(code, int) and 400 <= code < 600:
                    text = getattr(e, "text", None) or str(e)
                    state = FAILED if code >= 500 else PENDING
                    outcomes[recipient] = Outcome(state, reply=f"{code} {text}")
                else:
                    outcomes[recipient] = Outcome(PENDING, error=f"local delivery failed: {e!r}")
            else:
                outcomes[recipient] = Outcome(DELIVERED, reply="250 2.0.0 delivered locally")
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
                "queue: {msgid}: to=<{recipient}>, status=expired, returned to sender",
                msgid=msgid,
                recipient=address,
                queueEvent="expired",
            )
        for bounceID in result.bounces:
            log.info(
                "queue: {msgid}: sender non-delivery notification: {bounceID}",
                msgid=msgid,
                bounceID=bounceID,
                queueEvent="bounce",
            )
        if result.envelope is None:
            log.info("queue: {msgid}: removed", msgid=msgid, queueEvent="removed")


# `mailauth queue` commands; safe while the daemon runs.


def listQueue(directory: str) -> list:
    """
    Every queued message, oldest first, as a dict: C{id}, C{sender},
    C{arrival}, C{next_attempt} (POSIX times), C{attempts}, C{size},
    C{last_error}, and C{recipients}: a list of dicts with C{address},
    C{state}, C{reply} and C{error}.
    """
    spool = _Spool(directory)
    messages = []
    for msgid in spool.ids():
        envelope = spool.read(msgid, quarantine=False)
        if envelope is None:
            continue
        messages.append(
            {
                "id": envelope.id,
                "sender": envelope.sender,
                "arrival": envelope.arrival,
                "next_attempt": envelope.nextAttempt,
                "attempts": envelope.attempts,
                "size": envelope.size,
                "last_error": envelope.lastError,
                "recipients": [
                    {"address": r.address, "state": r.state, "reply": r.reply, "error": r.error}
                    for r in envelope.recipients
                ],
            }
        )
    messages.sort(key=lambda m: (m["arrival"], m["id"]))
    return messages


def flushQueue(directory: str) -> int:
    """
    Make every queued message due now, and tell a running daemon, which
    notices within C{queue_interval}.

    @return: how many messages there are.
    """
    spool = _Spool(directory)
    if not spool.exists():
        return 0
    count = 0
    for msgid in spool.ids():
        if spool.update(msgid, lambda e: attrs.evolve(e, nextAttempt=0.0)) is not None:
            count += 1
    try:
        owner = os.stat(spool.directory)
        writeDurably(spool.flushPath, b"", owner)
    except FileExistsError:
        pass
    return count


def deleteMessage(directory: str, msgid: str) -> bool:
    """
    Remove message C{msgid} from the queue without a bounce.

    @return: whether there was such a message.
    """
    spool = _Spool(directory)
    if not validID(msgid) or not spool.exists():
        return False
    with spool.locked():
        return spool.remove(msgid)
