"""
RFC 3464 delivery status notifications for the forward queue: bounces, and
the delay and success reports that RFC 3461's NOTIFY asks for, with RFC
6533's UTF-8 forms for internationalised mail.
"""

from __future__ import annotations

import email.utils
import re
from typing import Optional, Sequence

import attrs

from mailauth.addresses import decodeXtext

# Keep a generated header line well under the 998-octet limit of RFC 5322.
_MAX_FIELD = 900
# How much of the original message's header is returned.
MAX_RETURNED_HEADERS = 64 * 1024
# RET=FULL returns the whole message up to this size; a bigger one gets
# its header section only (RFC 3461 4.3 leaves the limit to the MTA).
MAX_RETURNED_MESSAGE = 2 * 1024 * 1024

_ENHANCED = re.compile(r"^([245])\d\d[ -](\1)\.(\d{1,3})\.(\d{1,3})(?:\s|$)")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
# With UTF-8 allowed (RFC 6533): still no controls, and no line or
# paragraph separators or bidi controls that could disguise a field.
_UNPRINTABLE_UTF8 = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
# The actions that report success, each with the word a human reads.
_SUCCESS = {"delivered": "delivered", "relayed": "relayed", "expanded": "alias expanded"}
_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
    "relayed": "Successful Mail Delivery Report",
    "expanded": "Successful Mail Delivery Report",
}
_SUMMARIES = {
    "failed": [
        "Your message could not be delivered to one or more recipients.",
        "It is attached below.",
    ],
    "delayed": [
        "Your message could not be delivered yet to one or more recipients.",
        "Delivery will be tried again; you need not send it again.",
    ],
    "delivered": ["Your message was delivered to the mailbox of the recipients below."],
    "relayed": [
        "Your message was handed on to the next mail system for the recipients below.",
        "It does not report delivery, so no further notification will follow.",
    ],
    "expanded": [
        "Your message was delivered to the aliases below, each of which stands for",
        "several addresses it was passed on to. No notice of its delivery to those",
        "will follow; you will still be told if it cannot be delivered to any of them.",
    ],
}


@attrs.frozen
class FailedRecipient:
    """
    One recipient a notification is about (the name stays from when the
    queue only sent bounces).

    @ivar address: the recipient, C{local@domain}.
    @ivar reply: the last SMTP reply for it (C{"550 5.1.1 no such user"}),
        or L{None} when the failure was not an SMTP reply.
    @ivar error: a description of a failure that was not an SMTP reply
        (connection refused, certificate rejected), or L{None}.
    @ivar expired: the recipient failed because the message stayed in the
        queue for longer than the expiry time.
    @ivar status: the RFC 3463 status when it was decided here, or L{None}.
    @ivar orcpt: the ORCPT the client gave for it (C{type;xtext}), or L{None}.
    """

    address: str
    reply: Optional[str] = None
    error: Optional[str] = None
    expired: bool = False
    status: Optional[str] = None
    orcpt: Optional[str] = None


def statusCode(recipient: FailedRecipient, action: str = "failed") -> str:
    """
    The RFC 3463 status for C{recipient}: its own if it has one, else the
    enhanced code of its reply where there is one, else one derived from
    the reply code, the action or the reason. An enhanced code whose class
    is not the reply code's is out of protocol and ignored, as Postfix
    ignores it (a relay's C{550 2.0.0} must not report a delivery).
    """
    if action in _SUCCESS:
        return "2.0.0"
    if recipient.status:
        return recipient.status
    if recipient.reply:
        match = _ENHANCED.match(recipient.reply)
        if match:
            return ".".join(match.groups()[1:])
        if recipient.reply[:1] in ("4", "5"):
            return recipient.reply[0] + ".0.0"
    if recipient.expired:
        return "4.4.7"
    return "4.0.0" if action == "delayed" else "5.0.0"


def _clean(text: str, limit: int = _MAX_FIELD, utf8: bool = False) -> str:
    """Printable text on one line, so that nothing can end a header early."""
    text = (_UNPRINTABLE_UTF8 if utf8 else _UNPRINTABLE).sub("?", " ".join(text.split()))
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


def _addressField(address: str, utf8: bool) -> str:
    """An address with its type (RFC 3464 2.1.2; RFC 6533 3 for UTF-8)."""
    if address.isascii():
        return f"rfc822; {_clean(address)}"
    return f"utf-8; {_clean(address, utf8=utf8)}" if utf8 else f"rfc822; {_clean(address)}"


def _originalRecipient(orcpt: str, utf8: bool) -> str:
    kind, _, value = orcpt.partition(";")
    return f"{_clean(kind)}; {_clean(decodeXtext(value), utf8=utf8)}"


def buildReport(
    *,
    hostname: str,
    queueID: str,
    messageID: str,
    boundary: str,
    sender: str,
    arrival: float,
    now: float,
    recipients: Sequence[FailedRecipient],
    original: bytes,
    action: str = "failed",
    full: bool = False,
    relayHost: Optional[str] = None,
    envid: Optional[str] = None,
    retryUntil: Optional[float] = None,
    lastAttempt: Optional[float] = None,
    utf8: bool = False,
) -> bytes:
    """
    A C{multipart/report; report-type=delivery-status} message telling
    C{sender} what became of its message for C{recipients}: that it failed
    (a bounce), is delayed, was delivered, or was relayed to a system that
    will not report further.

    It is meant to be sent from the null sender C{<>}; its C{From:} is
    C{MAILER-DAEMON@hostname}.

    @param hostname: this server's name (Reporting-MTA, From:).
    @param queueID: the queue ID of the message reported on.
    @param messageID: the C{Message-ID} of the report, without angle brackets.
    @param boundary: the MIME boundary; must not occur in C{original}.
    @param sender: the envelope sender of the message, the report's recipient.
    @param arrival: when the message was queued (POSIX time).
    @param now: when the report is made (POSIX time).
    @param recipients: the recipients it is about.
    @param original: the header section of the message (CRLF), or the whole
        message if C{full}.
    @param action: one of L{ACTIONS} (RFC 3464 2.3.3).
    @param full: C{original} is the whole message (RET=FULL), returned as
        C{message/rfc822} rather than C{text/rfc822-headers}.
    @param relayHost: the host whose replies are quoted, named in Remote-MTA.
    @param envid: the ENVID (xtext) the client gave, for Original-Envelope-Id.
    @param retryUntil: for a delay, when the queue gives up (Will-Retry-Until).
    @param lastAttempt: when delivery was last tried (Last-Attempt-Date);
        L{None} if it never was, and the field is left out (RFC 3464
        2.3.7: a report made between attempts must not date one itself).
    @param utf8: the message is internationalised (SMTPUTF8): the report
        uses the UTF-8 forms of RFC 6533 (C{message/global-delivery-status},
        C{utf-8} address types) and must be sent with SMTPUTF8.
    @return: the report in canonical form: CRLF line ends, not dot-stuffed.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown DSN action {action!r}")
    host = _clean(hostname)
    eightBit = not original.isascii()
    global_ = "global" if utf8 else ""
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{_clean(sender, utf8=utf8)}>",
        f"Subject: {_SUBJECTS[action]}",
        f"Date: {email.utils.formatdate(now, usegmt=True)}",
        f"Message-ID: <{_clean(messageID)}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
        f"Content-Transfer-Encoding: {'8bit' if eightBit or utf8 else '7bit'}",
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        f"Content-Type: text/plain; charset={'utf-8' if utf8 else 'us-ascii'}",
        "Content-Description: Notification",
        "",
        f"This is the mail system at host {host}.",
        "",
        *_SUMMARIES[action],
        "",
    ]
    for recipient in recipients:
        if recipient.reply:
            where = f"host {_clean(relayHost)} said" if relayHost else "the server said"
            reason = f"{where}: {_clean(recipient.reply, utf8=utf8)}"
        else:
            reason = _clean(recipient.error or f"delivery {action}", utf8=utf8)
        if recipient.expired:
            reason = f"delivery time expired; last problem: {reason}"
        if action in _SUCCESS:
            reason = _SUCCESS[action]
        lines += [f"<{_clean(recipient.address, utf8=utf8)}>: {reason}", ""]
    lines += [
        f"--{boundary}",
        f"Content-Type: message/{'global-' if utf8 else ''}delivery-status",
        "Content-Description: Delivery report",
        "",
        f"Reporting-MTA: dns; {host}",
    ]
    if envid is not None:
        lines.append(f"Original-Envelope-Id: {_clean(decodeXtext(envid))}")
    lines += [
        f"X-Mailauth-Queue-ID: {_clean(queueID)}",
        f"Arrival-Date: {email.utils.formatdate(arrival, usegmt=True)}",
    ]
    for recipient in recipients:
        lines.append("")
        if recipient.orcpt:
            lines.append(f"Original-Recipient: {_originalRecipient(recipient.orcpt, utf8)}")
        lines += [
            f"Final-Recipient: {_addressField(recipient.address, utf8)}",
            f"Action: {action}",
            f"Status: {statusCode(recipient, action)}",
        ]
        if recipient.reply:
            if relayHost:
                lines.append(f"Remote-MTA: dns; {_clean(relayHost)}")
            lines.append(f"Diagnostic-Code: smtp; {_clean(recipient.reply, utf8=utf8)}")
        if lastAttempt is not None:
            lines.append(f"Last-Attempt-Date: {email.utils.formatdate(lastAttempt, usegmt=True)}")
        if action == "delayed" and retryUntil is not None:
            lines.append(f"Will-Retry-Until: {email.utils.formatdate(retryUntil, usegmt=True)}")
    lines += ["", f"--{boundary}"]
    if full:
        lines += [
            f"Content-Type: message/{global_ or 'rfc822'}",
            "Content-Description: Undelivered Message"
            if action == "failed"
            else "Content-Description: Message",
        ]
    else:
        lines += [
            f"Content-Type: {'message/global-headers' if utf8 else 'text/rfc822-headers'}",
            "Content-Description: Undelivered Message Headers"
            if action == "failed"
            else "Content-Description: Message Headers",
        ]
    if eightBit:
        lines.append("Content-Transfer-Encoding: 8bit")
    lines.append("")
    head = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    if full and not original.endswith(b"\r\n"):
        original += b"\r\n"
    return head + original + f"\r\n--{boundary}--\r\n".encode("ascii")
