"""
The forward queue on disk: messages for the relay, stored until delivered.

Layout of the queue directory (C{<state_dir>/queue}):

  - C{tmp/}: files being written; anything here after a crash is garbage.
  - C{msg/ID.data}: the message, CRLF line ends, dot-stuffed once, so that
    the relay client sends it verbatim followed by C{.CRLF}.
  - C{msg/ID.json}: the envelope (sender, per-recipient state, retry times,
    and the header fields added on top of the message after it was
    written: its DKIM signature). Its rename into C{msg/} commits the
    message; a data file without an envelope is never sent.
  - C{lock}: C{flock}ed around every rewrite of an envelope, by the daemon
    and by C{mailauth queue}.
  - C{flush}: present when C{mailauth queue flush} asks the daemon to try
    everything now.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import re
import secrets
import threading
from typing import BinaryIO, Callable, Optional, Sequence, cast

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from mailauth import dsn
from mailauth.dotstuff import DotStuffer, StoredMessage, unstuff
from mailauth.durable import fsyncDirectory, locked, unlink, writeDurably
from mailauth.envelope import (
    ACTION_DELAYED,
    ACTION_FAILED,
    Envelope,
    MessageOptions,
    RecipientLike,
    RetryPolicy,
    recipientStatus,
)
from mailauth.interfaces import IForwardQueue, IMessageSink

log = Logger(namespace="mailauth.queue")

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Whatever could end or extend the command the address is sent in.
_BAD_ADDRESS = re.compile(r"[\x00-\x20\x7f<>]")


def validID(msgid: str) -> bool:
    """
    Whether C{msgid} can name a queued message: letters, digits, C{.}, C{_}
    and C{-}, not starting with a dot, so it is safe as a file name.
    """
    return _ID.fullmatch(msgid) is not None


class UnreadableEnvelope(ValueError):
    """A queued message's envelope that cannot be read: the message says why."""


class Spool:
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
        #: The IDs this process set aside as C{ID.corrupt}: gone from the
        #: queue, but not deleted by someone else.
        self.setAside: set = set()

    def create(self) -> None:
        for path in (self.directory, self.tmp, self.msg):
            os.makedirs(path, mode=0o700, exist_ok=True)

    def exists(self) -> bool:
        return os.path.isdir(self.msg)

    def envelopePath(self, msgid: str) -> str:
        return os.path.join(self.msg, msgid + ".json")

    def dataPath(self, msgid: str) -> str:
        return os.path.join(self.msg, msgid + ".data")

    def locked(self) -> contextlib.AbstractContextManager:
        """Hold the queue's lock: one envelope rewrite at a time, across processes."""
        # mailauth queue run as root must not lock the daemon out.
        owner = os.stat(self.directory) if os.geteuid() == 0 else None
        return locked(self.lockPath, owner)

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
        try:
            return self.load(msgid)
        except UnreadableEnvelope as e:
            log.error(
                "queue: envelope {path} is unreadable: {error}",
                path=self.envelopePath(msgid),
                error=str(e),
            )
            if quarantine:
                self.quarantine(msgid)
            return None

    def load(self, msgid: str) -> Optional[Envelope]:
        """
        The envelope of C{msgid}, or L{None} if there is no such message;
        nothing is logged.

        @raise UnreadableEnvelope: if it cannot be read, saying why.
        """
        try:
            with open(self.envelopePath(msgid), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            envelope = Envelope.fromJSON(data)
            if envelope.id != msgid:
                raise ValueError(f"it names message {envelope.id!r}")
        except ValueError as e:
            # Cut short: the error may quote the damaged bytes, all of them.
            why = str(e) if len(str(e)) <= 200 else str(e)[:200] + "..."
            raise UnreadableEnvelope(why) from None
        return envelope

    def setAsideIDs(self) -> list:
        """The IDs of the messages set aside as unreadable (C{ID.corrupt})."""
        try:
            names = os.listdir(self.msg)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(".corrupt")] for n in names if n.endswith(".corrupt"))

    def quarantine(self, msgid: str) -> None:
        """Rename the envelope of C{msgid} to C{ID.corrupt}: it is not sent."""
        self.setAside.add(msgid)
        with contextlib.suppress(OSError):
            os.rename(self.envelopePath(msgid), os.path.join(self.msg, msgid + ".corrupt"))

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
        """
        Remove a message, envelope first, a quarantined one (C{ID.corrupt})
        too. @return: whether it was there.
        """
        found = unlink(self.envelopePath(msgid))
        found = unlink(os.path.join(self.msg, msgid + ".corrupt")) or found
        unlink(self.dataPath(msgid))
        return found


class DamagedMessage(Exception):
    """A queued message file that does not hold what its envelope says."""


@implementer(IMessageSink)
class QueueWriter:
    """
    Writes one new message into the queue: L{write} its chunks, then
    L{prepare} and L{commit} it (or L{abort}).
    """

    def __init__(
        self,
        queue: Queue,
        msgid: str,
        sender: str,
        recipients: Sequence[RecipientLike],
        options: MessageOptions,
    ) -> None:
        self._queue = queue
        self._spool = queue._spool
        self.msgid = msgid
        self._sender = sender
        self._recipients = tuple(recipientStatus(r) for r in recipients)
        self._options = options
        self._arrival = queue.clock.seconds()
        self._stuffer = DotStuffer()
        self._size = 0
        self._prefixDots = 0
        self._body8bit = False
        self._prefix = b""
        self._headers8bit = False
        # The end of the header section is looked for across chunks.
        self._inHeaders = True
        self._headerTail = b""
        self._tempData = os.path.join(self._spool.tmp, msgid + ".data")
        self._tempEnvelope = os.path.join(self._spool.tmp, msgid + ".json")
        self._file = open(self._tempData, "xb", opener=_privateOpener)
        # writing, prepared, committing, committed or aborted
        self._state = "writing"
        #: What was written, once prepared.
        self.envelope: Optional[Envelope] = None

    def write(self, chunk: bytes) -> None:
        """
        Add C{chunk} of the message (canonical form, not dot-stuffed; chunks
        may split anywhere).
        """
        if not self._body8bit and not chunk.isascii():
            self._body8bit = True
        if self._inHeaders:
            self._scanHeaders(chunk)
        stored = self._stuffer.feed(chunk)
        self._size += len(stored)
        self._file.write(stored)

    def prepend(self, header: bytes) -> None:
        """
        Put C{header} (whole header fields, canonical form) on top of the
        message: kept in the envelope (L{Envelope.prefix}, stored form), to
        be sent before the data file, which stays as it was written.
        """
        stuffer = DotStuffer()
        stored = stuffer.feed(header) + stuffer.finish()
        if not header.isascii():
            self._body8bit = self._headers8bit = True
        self._prefix = stored + self._prefix
        self._size += len(stored)
        self._prefixDots += stuffer.dots

    def _scanHeaders(self, chunk: bytes) -> None:
        """Note 8-bit bytes in the header section (RFC 6532 fields need SMTPUTF8 to go on)."""
        data = self._headerTail + chunk
        end = data.find(b"\r\n\r\n")
        if data.startswith(b"\r\n") and not self._headerTail:
            end = 0  # an empty header section
        if not data[: end if end >= 0 else len(data)].isascii():
            self._headers8bit = True
        if end >= 0:
            self._inHeaders = False
        self._headerTail = data[-3:]

    def prepare(self) -> None:
        """
        Make the message durable in C{tmp/}: fsync the data and write the
        envelope (fsynced). Blocks: call it in a thread.
        """
        if self._state != "writing":
            raise ValueError(f"message {self.msgid} is {self._state}, it cannot be prepared")
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
                recipients=self._recipients,
                arrival=self._arrival,
                nextAttempt=self._arrival,
                size=self._size,
                dots=self._stuffer.dots + self._prefixDots,
                body8bit=self._body8bit,
                prefix=self._prefix,
                smtputf8=self._options.smtputf8,
                headers8bit=self._headers8bit,
                ret=self._options.ret,
                envid=self._options.envid,
            )
            writeDurably(self._tempEnvelope, envelope.toJSON())
        except BaseException:
            self.abort()
            raise
        self.envelope = envelope
        self._state = "prepared"

    def commit(self) -> str:
        """
        Publish the message: the data and then the envelope are renamed into
        C{msg/} (the envelope's rename is the commit) and the folder is
        fsynced. Prepares it first if that was not done. Blocks.

        @return: the queue ID.
        """
        if self._state == "writing":
            self.prepare()
        if self._state != "prepared":
            raise ValueError(f"message {self.msgid} is {self._state}, it cannot be committed")
        spool = self._spool
        self._state = "committing"
        try:
            os.rename(self._tempData, spool.dataPath(self.msgid))
            os.rename(self._tempEnvelope, spool.envelopePath(self.msgid))
            # One directory fsync makes both names durable. Before it
            # returns, a power cut may keep the envelope but lose the data
            # file; recover() drops such an envelope, and it was never
            # acknowledged.
            fsyncDirectory(spool.msg)
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        self._queue._finished(self.msgid)
        return self.msgid

    def abort(self) -> None:
        """
        Forget the message and remove its files, even once committed (when
        another part of the same message could not be stored). Never raises.
        """
        if self._state == "aborted":
            return
        committed = self._state in ("committing", "committed")
        self._state = "aborted"
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            unlink(self._tempData)
        with contextlib.suppress(OSError):
            unlink(self._tempEnvelope)
        if committed:
            with contextlib.suppress(OSError), self._spool.locked():
                self._spool.remove(self.msgid)
        self._queue._finished(self.msgid)


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
    @ivar bounces: the queue IDs of the notifications it queued.
    @ivar expired: the recipients that failed because the message expired.
    @ivar actions: the action each of C{bounces} reports (C{failed},
        C{delayed}, C{delivered} or C{relayed}), in the same order.
    @ivar returned: the recipients a C{failed} notification was queued for.
    @ivar queued: the envelopes of C{bounces}, in the same order, for the
        forwarder to schedule without scanning the queue for them.
    @ivar gone: the message was not in the queue any more (deleted by
        another process, or set aside) when its envelope was to be written.
    """

    envelope: Optional[Envelope]
    bounces: tuple = ()
    expired: tuple = ()
    actions: tuple = ()
    returned: tuple = ()
    queued: tuple = ()
    gone: bool = False


@implementer(IForwardQueue)
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
        self._spool = Spool(directory)
        self._spool.create()
        self._active: set = set()
        self._activeLock = threading.Lock()

    def newID(self) -> str:
        """A new, unique queue ID."""
        return f"{int(self.clock.seconds()):x}{secrets.token_hex(6)}"

    def newMessage(
        self, msgid: str, sender: str, recipients: list, options: Optional[MessageOptions] = None
    ) -> QueueWriter:
        """
        Start writing a message.

        @param msgid: its queue ID (see L{validID}).
        @param sender: the envelope sender, C{""} for the null sender.
        @param recipients: the recipient addresses, C{local@domain}, or
            their L{RecipientStatus} with the DSN parameters given for them.
        @param options: SMTPUTF8 and the DSN parameters of the message.
        @raise ValueError: for a bad or used ID, or no recipients.
        """
        if not validID(msgid):
            raise ValueError(f"{msgid!r} cannot name a queued message")
        if not recipients:
            raise ValueError("a message needs at least one recipient")
        addresses = [recipientStatus(r).address for r in recipients]
        for address in [sender, *addresses]:
            if _BAD_ADDRESS.search(address) or (address != sender and not address):
                raise ValueError(f"{address!r} cannot be an envelope address")
        with self._activeLock:
            if msgid in self._active or os.path.exists(self._spool.envelopePath(msgid)):
                raise ValueError(f"message {msgid} is already queued")
            self._active.add(msgid)
        try:
            return QueueWriter(self, msgid, sender, recipients, options or MessageOptions())
        except BaseException:
            self._finished(msgid)
            raise

    def _finished(self, msgid: str) -> None:
        with self._activeLock:
            self._active.discard(msgid)

    # Blocking methods

    def recover(self) -> None:
        """
        Remove what a crash left: temp files, data files without an envelope,
        and envelopes without a data file (never acknowledged). The data file
        of a quarantined envelope (C{ID.corrupt}) stays with it, for the
        administrator to look at and C{mailauth queue delete}. Blocks.
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
                if kind == "data" and not {msgid + ".json", msgid + ".corrupt"} & names:
                    log.info(
                        "queue: removing {name}, a message that was never committed", name=name
                    )
                    unlink(os.path.join(self._spool.msg, name))
                elif kind == "json" and msgid + ".data" not in names:
                    log.error(
                        "queue: removing envelope {name}: its message file is missing", name=name
                    )
                    unlink(os.path.join(self._spool.msg, name))

    def scan(self, known: frozenset) -> ScanResult:
        """
        List the queue and read the envelopes of messages not in C{known}
        (of all, if a flush was requested). Blocks.
        """
        flushed = unlink(self._spool.flushPath)
        present = frozenset(self._spool.ids())
        envelopes = []
        for msgid in sorted(present):
            if flushed or msgid not in known:
                envelope = self._spool.read(msgid)
                if envelope is not None:
                    envelopes.append(envelope)
        return ScanResult(tuple(envelopes), present, flushed)

    def envelope(self, msgid: str) -> Optional[Envelope]:
        """The envelope of C{msgid}, or L{None}. Blocks."""
        return self._spool.read(msgid)

    def wasSetAside(self, msgid: str) -> bool:
        """Whether this process set C{msgid} aside as C{ID.corrupt} (not deleted)."""
        return msgid in self._spool.setAside

    def openMessage(self, envelope: Envelope) -> BinaryIO:
        """
        The stored (dot-stuffed) form of the message of C{envelope}, as the
        relay client sends it: its L{Envelope.prefix}, then its data file.

        @raise FileNotFoundError: if the data file is gone.
        @raise DamagedMessage: if it does not hold what the envelope says.
        """
        path = self._spool.dataPath(envelope.id)
        data = open(path, "rb")
        expected, actual = envelope.size - len(envelope.prefix), os.fstat(data.fileno()).st_size
        if envelope.size and actual != expected:
            data.close()
            raise DamagedMessage(f"{path} holds {actual} bytes, its envelope says {expected}")
        if not envelope.prefix:
            return data
        return cast(BinaryIO, io.BufferedReader(StoredMessage(envelope.prefix, data)))

    def quarantine(self, msgid: str, why: str) -> None:
        """Set C{msgid} aside, not to be sent, logging C{why}. Blocks."""
        log.error(
            "queue: {msgid}: {why}; it is set aside as {msgid}.corrupt and not sent: "
            "look at it, and remove it with mailauth queue delete",
            msgid=msgid,
            why=why,
        )
        with self._spool.locked():
            self._spool.quarantine(msgid)

    def readMessage(self, msgid: str) -> bytes:
        """
        The message C{msgid} itself (CRLF, not dot-stuffed), as a local
        delivery stores it. Blocks.

        @raise FileNotFoundError: if it is gone.
        @raise DamagedMessage: as L{openMessage}: a part must not be delivered.
        """
        envelope = self._spool.read(msgid)
        if envelope is None:
            raise FileNotFoundError(
                errno.ENOENT, "the message is not queued", self._spool.envelopePath(msgid)
            )
        with self.openMessage(envelope) as f:
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
        queue the notifications now due (one bounce for the recipients that
        failed since the last one, and the success and delay reports that
        were asked for), and remove the message once every recipient is
        done. Blocks.

        @param outcomes: address to L{Outcome}.
        @param error: why the attempt failed as a whole, if it did.
        @param relayHost: the host that gave the replies, for the bounce.
        """
        before: list[str] = []

        def change(envelope):
            before[:] = envelope.pending()
            return envelope.afterAttempt(outcomes, error, now, policy)

        envelope = self._spool.update(msgid, change)
        if envelope is None:
            return SettleResult(None, gone=True)
        expired = tuple(r.address for r in envelope.recipients if r.expired and r.address in before)
        return self._queueReportsDue(envelope, now, policy, relayHost, expired)

    def reportDue(self, msgid: str, now: float, policy: RetryPolicy) -> Optional[SettleResult]:
        """
        Queue the notifications due about C{msgid} now without an attempt:
        its delay notification, on time while the relay is held back. Blocks.

        @return: what was done, or L{None} if the message is gone.
        """
        envelope = self._spool.read(msgid)
        if envelope is None:
            return None
        return self._queueReportsDue(envelope, now, policy, None, ())

    def _queueReportsDue(
        self,
        envelope: Envelope,
        now: float,
        policy: RetryPolicy,
        relayHost: Optional[str],
        expired: tuple,
    ) -> SettleResult:
        """
        Queue the notifications due about C{envelope} and mark them in it,
        and remove the message if that was all it waited for. Blocks.
        """
        msgid = envelope.id
        current: Optional[Envelope] = envelope
        gone = False
        queued: list[Envelope] = []
        actions: list[str] = []
        returned: list[str] = []
        for action, due in envelope.reportsDue(now, policy):
            queued.append(self._queueReport(envelope, action, due, now, policy, relayHost))
            actions.append(action)
            if action == ACTION_FAILED:
                returned.extend(r.address for r in due)
            marked = functools.partial(_markNotified, [r.address for r in due], action)
            current = self._spool.update(msgid, marked)
            if current is None:
                gone = True
                break
        if current is not None and current.finished():
            with self._spool.locked():
                self._spool.remove(msgid)
            current = None
        return SettleResult(
            current,
            tuple(e.id for e in queued),
            expired,
            tuple(actions),
            tuple(returned),
            tuple(queued),
            gone,
        )

    def _queueReport(
        self,
        envelope: Envelope,
        action: str,
        recipients: list,
        now: float,
        policy: RetryPolicy,
        relayHost: Optional[str],
    ) -> Envelope:
        """
        Queue a notification to the sender of C{envelope} (from C{<>}).
        Blocks.

        @return: the notification's envelope.
        """
        # RET=FULL returns the whole message with a bounce, when not huge
        # (RFC 3461 4.3); otherwise, and for other reports, its header.
        full = (
            action == ACTION_FAILED
            and envelope.ret == "FULL"
            and envelope.size <= dsn.MAX_RETURNED_MESSAGE
        )
        limit = envelope.size if full else dsn.MAX_RETURNED_HEADERS + 4
        try:
            with open(self._spool.dataPath(envelope.id), "rb") as f:
                stored = envelope.prefix + f.read(limit)
        except FileNotFoundError:
            stored, full = b"", False
        original = unstuff(stored) if full else dsn.returnedHeaders(unstuff(stored))
        bounceID = self.newID()
        boundary = f"{bounceID}/{self.hostname}"
        while boundary.encode("ascii") in original:
            boundary += secrets.token_hex(4)
        utf8 = envelope.smtputf8
        message = dsn.buildReport(
            hostname=self.hostname,
            queueID=envelope.id,
            messageID=f"{bounceID}@{self.hostname}",
            boundary=boundary,
            sender=envelope.sender,
            arrival=envelope.arrival,
            now=now,
            action=action,
            recipients=[
                dsn.FailedRecipient(
                    r.address,
                    reply=r.reply,
                    error=r.error,
                    expired=r.expired,
                    status=r.status,
                    orcpt=r.orcpt,
                )
                for r in recipients
            ],
            original=original,
            full=full,
            relayHost=relayHost,
            envid=envelope.envid,
            retryUntil=envelope.expiresAt(policy) if action == ACTION_DELAYED else None,
            lastAttempt=envelope.lastAttempt,
            utf8=utf8,
        )
        writer = self.newMessage(bounceID, "", [envelope.sender], MessageOptions(smtputf8=utf8))
        try:
            writer.write(message)
        except BaseException:
            writer.abort()
            raise
        writer.commit()
        assert writer.envelope is not None
        return writer.envelope


def _markNotified(addresses: list, action: str, envelope: Envelope) -> Envelope:
    return envelope.markNotified(addresses, action)
