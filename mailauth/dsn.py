"""RFC 3464 delivery status notifications (bounces) for the forward queue."""

from __future__ import annotations

import email.utils
import re
from typing import Optional, Sequence

import attrs

# Keep a generated header line well under the 998-octet limit of RFC 5322.
_MAX_FIELD = 900
# How much of the original message's header is returned.
MAX_RETURNED_HEADERS = 64 * 1024

_ENHANCED = re.compile(r"^[245]\d\d[ -]([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


@attrs.frozen
class FailedRecipient:
    """
    One recipient the message could not be delivered to.

    @ivar address: the recipient, C{local@domain}.
    @ivar reply: the last SMTP reply for it (C{"550 5.1.1 no such user"}),
        or L{None} when the failure was not an SMTP reply.
    @ivar error: a description of a failure that was not an SMTP reply
        (connection refused, certificate rejected), or L{None}.
    @ivar expired: the recipient failed because the message stayed in the
        queue for longer than the expiry time.
    """

    address: str
    reply: Optional[str] = None
    error: Optional[str] = None
    expired: bool = False


def statusCode(recipient: FailedRecipient) -> str:
    """
    The RFC 3463 status for C{recipient}: the enhanced code of its reply where
    there is one, else one derived from the reply code or the reason.
    """
    if recipient.reply:
        match = _ENHANCED.match(recipient.reply)
        if match:
            return ".".join(match.groups())
        if recipient.reply[:1] in ("4", "5"):
            return recipient.reply[0] + ".0.0"
    if recipient.expired:
        return "4.4.7"
    return "5.0.0"


def _clean(text: str, limit: int = _MAX_FIELD) -> str:
    """Printable ASCII on one line, so that nothing can end a header early."""
    text = _UNPRINTABLE.sub("?", " ".join(text.split()))
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def returnedHeaders(message: bytes) -> bytes:
    """
    The header section of C{message} (CRLF line ends), cut to
    L{MAX_RETURNED_HEADERS} at a line end, without the blank line after it.
    """
    end = message.find(b"\r\n\r\n")
    headers = message if end < 0 else message[: end + 2]
    if len(headers) > MAX_RETURNED_HEADERS:
        headers = headers[: headers.rfind(b"\r\n", 0, MAX_RETURNED_HEADERS) + 2]
    if headers and not headers.endswith(b"\r\n"):
        headers += b"\r\n"
    return headers


def buildBounce(
    *,
    hostname: str,
    queueID: str,
    messageID: str,
    boundary: str,
    sender: str,
    arrival: float,
    now: float,
    failures: Sequence[FailedRecipient],
    originalHeaders: bytes,
    relayHost: Optional[str] = None,
) -> bytes:
    """
    A C{multipart/report; report-type=delivery-status} message telling
    C{sender} that its message could not be delivered to C{failures}.

    It is meant to be sent from the null sender C{<>}; its C{From:} is
    C{MAILER-DAEMON@hostname}.

    @param hostname: this server's name (Reporting-MTA, From:).
    @param queueID: the queue ID of the failed message.
    @param messageID: the C{Message-ID} of the bounce, without angle brackets.
    @param boundary: the MIME boundary; must not occur in C{originalHeaders}.
    @param sender: the failed message's envelope sender, the bounce's recipient.
    @param arrival: when the failed message was queued (POSIX time).
    @param now: when the bounce is made (POSIX time).
    @param failures: the recipients that failed.
    @param originalHeaders: the header section of the failed message, CRLF.
    @param relayHost: the host whose replies are quoted, named in Remote-MTA.
    @return: the bounce in canonical form: CRLF line ends, not dot-stuffed.
    """
    host = _clean(hostname)
    eightBit = not originalHeaders.isascii()
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{_clean(sender)}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {email.utils.formatdate(now, usegmt=True)}",
        f"Message-ID: <{_clean(messageID)}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
        f"Content-Transfer-Encoding: {'8bit' if eightBit else '7bit'}",
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Description: Notification",
        "",
        f"This is the mail system at host {host}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "It is attached below.",
        "",
    ]
    for failure in failures:
        if failure.reply:
            where = f"host {_clean(relayHost)} said" if relayHost else "the server said"
            reason = f"{where}: {_clean(failure.reply)}"
        else:
            reason = _clean(failure.error or "delivery failed")
        if failure.expired:
            reason = f"delivery time expired; last problem: {reason}"
        lines += [f"<{_clean(failure.address)}>: {reason}", ""]
    lines += [
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        f"Reporting-MTA: dns; {host}",
        f"X-Mailauth-Queue-ID: {_clean(queueID)}",
        f"Arrival-Date: {email.utils.formatdate(arrival, usegmt=True)}",
    ]
    for failure in failures:
        lines += [
            "",
            f"Final-Recipient: rfc822; {_clean(failure.address)}",
            "Action: failed",
            f"Status: {statusCode(failure)}",
        ]
        if failure.reply:
            if relayHost:
                lines.append(f"Remote-MTA: dns; {_clean(relayHost)}")
            lines.append(f"Diagnostic-Code: smtp; {_clean(failure.reply)}")
        lines.append(f"Last-Attempt-Date: {email.utils.formatdate(now, usegmt=True)}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "Content-Description: Undelivered Message Headers",
    ]
    if eightBit:
        lines.append("Content-Transfer-Encoding: 8bit")
    lines.append("")
    head = "\r\n".join(lines).encode("ascii") + b"\r\n"
    return head + originalHeaders + f"\r\n--{boundary}--\r\n".encode("ascii")
