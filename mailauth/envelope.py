"""
The forward queue's values: a queued message's envelope with each
recipient's state and what the client asked for it (SMTPUTF8, the DSN
parameters of RFC 3461), the outcome of one attempt, the retry policy, and
which delivery status notifications are due. Stored as JSON by
L{mailauth.spool}; no I/O here.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence, Union

import attrs

from mailauth.config import RelayConfig

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
# The Action of a DSN (RFC 3464 2.3.3) for each kind of notification.
ACTION_FAILED = "failed"
ACTION_DELAYED = "delayed"
ACTION_DELIVERED = "delivered"
ACTION_RELAYED = "relayed"
# Version 2 adds SMTPUTF8 and the DSN parameters; version 1 is still read.
_ENVELOPE_VERSION = 2
_READABLE_VERSIONS = (1, 2)


@attrs.frozen
class RecipientStatus:
    """
    Where delivery to one recipient stands.

    @ivar address: C{local@domain}.
    @ivar state: L{PENDING}, L{DELIVERED} or L{FAILED}.
    @ivar reply: the last SMTP reply about it, on one line, if any.
    @ivar error: the last failure that was not an SMTP reply, if any.
    @ivar notified: once it is delivered or failed, whether the notification
        due about that (a bounce, a success DSN) has been queued, or none
        is due (the null sender, NOTIFY without it).
    @ivar expired: it failed because the message expired.
    @ivar notify: the RCPT command's NOTIFY (RFC 3461 4.1): L{None} if not
        given, else C{("NEVER",)} or some of C{SUCCESS}, C{FAILURE},
        C{DELAY}.
    @ivar orcpt: the RCPT command's ORCPT as the client sent it, or L{None}.
    @ivar status: the RFC 3463 status of a failure decided here rather than
        said by a server (an address the relay cannot take), or L{None}.
    @ivar action: once final, how it ended: L{ACTION_FAILED},
        L{ACTION_DELIVERED} (stored locally) or L{ACTION_RELAYED} (handed
        to a relay that did not take the DSN request).
    @ivar delayNotified: a delay notification about it has been queued.
    """

    address: str
    state: str = PENDING
    reply: Optional[str] = None
    error: Optional[str] = None
    notified: bool = False
    expired: bool = False
    notify: Optional[tuple] = None
    orcpt: Optional[str] = None
    status: Optional[str] = None
    action: Optional[str] = None
    delayNotified: bool = False

    def wants(self, kind: str) -> bool:
        """
        Whether NOTIFY asks for notifications of C{kind} (C{"SUCCESS"},
        C{"FAILURE"}, C{"DELAY"}); without NOTIFY only failures are
        reported (RFC 3461 4.1 leaves delays to the MTA; mailauth sends
        them only when asked).
        """
        if self.notify is None:
            return kind == "FAILURE"
        return kind in self.notify


@attrs.frozen
class Outcome:
    """
    The result of one attempt for one recipient.

    @ivar state: L{DELIVERED}, L{PENDING} (try again later) or L{FAILED}.
    @ivar status: the RFC 3463 status of a failure decided here.
    @ivar local: it was delivered here, not handed to a relay.
    @ivar upstreamDSN: the relay took the DSN request (it offers DSN), so
        notifications from now on are its business.
    """

    state: str
    reply: Optional[str] = None
    error: Optional[str] = None
    status: Optional[str] = None
    local: bool = False
    upstreamDSN: bool = False

    @classmethod
    def fromReply(cls, reply, upstreamDSN: bool = False) -> Outcome:
        """
        2xx delivered, 4xx try again, 5xx failed for good. A reply that the
        relay client made itself (C{reply.local}: an address that relay
        cannot take) is a failure decided here, with its status.
        """
        state = {2: DELIVERED, 4: PENDING}.get(reply.code // 100, FAILED)
        if getattr(reply, "local", False):
            status, _, why = reply.text.partition(" ")
            return cls(state, error=why, status=status)
        return cls(state, reply=reply.text, upstreamDSN=upstreamDSN)


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
    delayWarning: float = 4 * 3600.0

    @classmethod
    def fromConfig(cls, config: Optional[RelayConfig]) -> RetryPolicy:
        if config is None:
            return cls()
        return cls(config.retry_initial, config.retry_max, config.expire, config.delay_warning)

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
    @ivar lastAttempt: when the last attempt was made (POSIX time), for the
        Last-Attempt-Date of reports; L{None} before the first.
    @ivar size: size of the stored (dot-stuffed) message in bytes, the
        L{prefix} included.
    @ivar dots: how many of those bytes are the dots the stuffing added:
        the message's own size (RFC 1870's SIZE, L{messageSize}) is the
        rest; 0 in an envelope queued before it was kept.
    @ivar body8bit: the message has bytes above 127.
    @ivar prefix: header fields (in the stored form) sent before the data
        file, added after the message was written (its DKIM signature).
    @ivar smtputf8: the client gave SMTPUTF8 (RFC 6531): addresses and
        header fields may be UTF-8.
    @ivar headers8bit: the header section has bytes above 127.
    @ivar ret: the MAIL command's RET (C{FULL}, C{HDRS}) or L{None}.
    @ivar envid: the MAIL command's ENVID, in xtext as sent, or L{None}.
    """

    id: str
    sender: str
    recipients: tuple
    arrival: float
    nextAttempt: float
    attempts: int = 0
    lastError: Optional[str] = None
    lastAttempt: Optional[float] = None
    size: int = 0
    dots: int = 0
    body8bit: bool = False
    prefix: bytes = b""
    smtputf8: bool = False
    headers8bit: bool = False
    ret: Optional[str] = None
    envid: Optional[str] = None

    @property
    def messageSize(self) -> int:
        """The message's size as RFC 1870 counts it: not its stuffed dots."""
        return self.size - self.dots

    def pending(self) -> list:
        """The addresses still to be delivered to."""
        return [r.address for r in self.recipients if r.state == PENDING]

    def unnotified(self) -> list:
        """The failed recipients no bounce has been queued for yet."""
        return [r for r in self.recipients if r.state == FAILED and not r.notified]

    def reportsDue(self, now: float, policy: RetryPolicy) -> list:
        """
        The delivery status notifications to send now, as C{(action,
        recipients)} pairs, failures first: the recipients that failed or
        were delivered since the last report and asked for it, and those
        still pending past C{policy.delayWarning} that asked for delays
        (NOTIFY=DELAY) and were not told yet. Nothing for the null sender.
        """
        if not self.sender:
            return []
        reports = []
        for action in (ACTION_FAILED, ACTION_DELIVERED, ACTION_RELAYED):
            due = [r for r in self.recipients if r.action == action and not r.notified]
            if due:
                reports.append((action, due))
        delayDue = self.delayNoticeDue(policy)
        if delayDue is not None and now >= delayDue:
            reports.append((ACTION_DELAYED, self._awaitingDelayNotice()))
        return reports

    def delayNoticeDue(self, policy: RetryPolicy) -> Optional[float]:
        """
        When a delay notification about this message falls due:
        C{policy.delayWarning} after arrival, if a recipient that asked for
        one (NOTIFY=DELAY) is still pending and was not told, and the
        message has not expired by then (its bounce says more). L{None} if
        none will, or if C{policy.delayWarning} is 0 (no delay reports, as
        Postfix's C{delay_warning_time = 0}).
        """
        if policy.delayWarning <= 0:
            return None
        due = self.arrival + policy.delayWarning
        if not self.sender or due >= self.expiresAt(policy) or not self._awaitingDelayNotice():
            return None
        return due

    def _awaitingDelayNotice(self) -> list:
        return [
            r
            for r in self.recipients
            if r.state == PENDING and r.wants("DELAY") and not r.delayNotified
        ]

    def _final(self, r: RecipientStatus) -> RecipientStatus:
        """C{r}, now final, with whether a notification about it is still due."""
        if r.state == FAILED:
            action = ACTION_FAILED
            due = r.wants("FAILURE")
        else:
            action = r.action or ACTION_RELAYED
            due = r.wants("SUCCESS")
        return attrs.evolve(r, action=action, notified=not (self.sender and due))

    def finished(self) -> bool:
        """Every recipient delivered or failed, with what it asked to be told queued."""
        return all(r.state != PENDING and r.notified for r in self.recipients)

    def expiresAt(self, policy: RetryPolicy) -> float:
        return self.arrival + policy.expire

    def triedAt(self, when: float, policy: RetryPolicy) -> bool:
        """
        Whether an attempt at C{when} tries to deliver, rather than only
        expire the message: before its expiry, or if it was never tried
        (with C{expire = 0} a message is tried once, as with Postfix's
        C{maximal_queue_lifetime = 0}, not bounced unsent).
        """
        return when < self.expiresAt(policy) or self.attempts == 0

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
                    status=outcome.status,
                )
                if outcome.state == DELIVERED:
                    r = attrs.evolve(
                        r, action=ACTION_DELIVERED if outcome.local else ACTION_RELAYED
                    )
                    if outcome.upstreamDSN:
                        # The relay reports from here on (RFC 3461 5.2.2).
                        r = attrs.evolve(r, notify=("NEVER",))
                if outcome.state != PENDING:
                    r = self._final(r)
            recipients.append(r)
        envelope = self
        if outcomes:
            envelope = attrs.evolve(
                self, attempts=self.attempts + 1, lastError=error, lastAttempt=now
            )
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
                self._final(attrs.evolve(r, state=FAILED, expired=True))
                if r.state == PENDING
                else r
                for r in self.recipients
            ),
        )

    def markNotified(self, addresses: Sequence[str], action: Optional[str] = None) -> Envelope:
        """
        This envelope with a notification queued about C{addresses}: a delay
        notification if C{action} is L{ACTION_DELAYED}, else the final one.
        """
        change = {"delayNotified": True} if action == ACTION_DELAYED else {"notified": True}
        return attrs.evolve(
            self,
            recipients=tuple(
                attrs.evolve(r, **change) if r.address in addresses else r for r in self.recipients
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
                "last_attempt": self.lastAttempt,
                "size": self.size,
                "dots": self.dots,
                "body_8bit": self.body8bit,
                # ASCII in practice; any other byte survives as an escape.
                "prefix": self.prefix.decode("utf-8", "surrogateescape"),
                "smtputf8": self.smtputf8,
                "headers_8bit": self.headers8bit,
                "ret": self.ret,
                "envid": self.envid,
                "recipients": [
                    {
                        "address": r.address,
                        "state": r.state,
                        "reply": r.reply,
                        "error": r.error,
                        "notified": r.notified,
                        "expired": r.expired,
                        "notify": list(r.notify) if r.notify is not None else None,
                        "orcpt": r.orcpt,
                        "status": r.status,
                        "action": r.action,
                        "delay_notified": r.delayNotified,
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
            if obj["version"] not in _READABLE_VERSIONS:
                raise ValueError(f"unknown envelope version {obj['version']!r}")
            recipients = tuple(_recipientFromJSON(r) for r in obj["recipients"])
            if any(r.state not in (PENDING, DELIVERED, FAILED) for r in recipients):
                raise ValueError("unknown recipient state")
            if obj["version"] == 1:
                # Version 1 knew no actions and no success notifications:
                # a final recipient was relayed or failed, and only a
                # failure could still be waiting for its bounce.
                recipients = tuple(
                    attrs.evolve(
                        r,
                        action=ACTION_FAILED if r.state == FAILED else ACTION_RELAYED,
                        notified=r.notified or r.state == DELIVERED,
                    )
                    if r.state != PENDING
                    else r
                    for r in recipients
                )
            return cls(
                id=str(obj["id"]),
                sender=str(obj["sender"]),
                recipients=recipients,
                arrival=float(obj["arrival"]),
                nextAttempt=float(obj["next_attempt"]),
                attempts=int(obj["attempts"]),
                lastError=obj.get("last_error"),
                lastAttempt=_optionalTime(obj.get("last_attempt")),
                size=int(obj.get("size", 0)),
                dots=int(obj.get("dots", 0)),
                body8bit=bool(obj.get("body_8bit", False)),
                prefix=_prefixFromJSON(obj.get("prefix", "")),
                smtputf8=bool(obj.get("smtputf8", False)),
                headers8bit=bool(obj.get("headers_8bit", False)),
                ret=_optionalText(obj.get("ret")),
                envid=_optionalText(obj.get("envid")),
            )
        except (KeyError, TypeError, AttributeError, UnicodeError) as e:
            raise ValueError(f"malformed envelope: {e!r}") from None


def _prefixFromJSON(value) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"the prefix is not text: {value!r}")
    return value.encode("utf-8", "surrogateescape")


def _optionalTime(value) -> Optional[float]:
    # Envelopes written before it was kept have none.
    return None if value is None else float(value)


def _optionalText(value) -> Optional[str]:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"expected text, got {value!r}")
    return value


def _recipientFromJSON(r: dict) -> RecipientStatus:
    notify = r.get("notify")
    if notify is not None:
        notify = tuple(str(word) for word in notify)
    return RecipientStatus(
        address=str(r["address"]),
        state=r["state"],
        reply=r.get("reply"),
        error=r.get("error"),
        notified=bool(r.get("notified", False)),
        expired=bool(r.get("expired", False)),
        notify=notify,
        orcpt=_optionalText(r.get("orcpt")),
        status=_optionalText(r.get("status")),
        action=_optionalText(r.get("action")),
        delayNotified=bool(r.get("delay_notified", False)),
    )


@attrs.frozen
class MessageOptions:
    """
    What the client asked for a message as a whole, kept in its envelope.

    @ivar smtputf8: SMTPUTF8 was given (RFC 6531).
    @ivar ret: RET (C{FULL} or C{HDRS}), or L{None}.
    @ivar envid: ENVID in xtext, or L{None}.
    """

    smtputf8: bool = False
    ret: Optional[str] = None
    envid: Optional[str] = None


#: A recipient handed to the queue: its address, or its status with the
#: NOTIFY and ORCPT the client gave.
RecipientLike = Union[str, RecipientStatus]


def recipientStatus(recipient: RecipientLike) -> RecipientStatus:
    """A new recipient's L{RecipientStatus}, from an address or from one."""
    if isinstance(recipient, RecipientStatus):
        return RecipientStatus(recipient.address, notify=recipient.notify, orcpt=recipient.orcpt)
    return RecipientStatus(recipient)
