"""
The forward queue's values: a queued message's envelope with each
recipient's state, the outcome of one attempt, and the retry policy.
Stored as JSON by L{mailauth.spool}; no I/O here.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import attrs

from mailauth.config import RelayConfig

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
_ENVELOPE_VERSION = 1


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
    def fromReply(cls, reply) -> Outcome:
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
    @ivar size: size of the stored (dot-stuffed) message in bytes, the
        L{prefix} included.
    @ivar body8bit: the message has bytes above 127.
    @ivar prefix: header fields (in the stored form) sent before the data
        file, added after the message was written (its DKIM signature).
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
    prefix: bytes = b""

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
                # ASCII in practice; any other byte survives as an escape.
                "prefix": self.prefix.decode("utf-8", "surrogateescape"),
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
                prefix=_prefixFromJSON(obj.get("prefix", "")),
            )
        except (KeyError, TypeError, AttributeError, UnicodeError) as e:
            raise ValueError(f"malformed envelope: {e!r}") from None


def _prefixFromJSON(value) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"the prefix is not text: {value!r}")
    return value.encode("utf-8", "surrogateescape")
