"""
Mail mailauth writes itself, from the null sender: delivery reports (RFC
3461 NOTIFY=SUCCESS), notices to the postmaster, and the queue's bounces
delivered to local addresses. Each is stored as a submission is: into
Maildirs with the same writer, or into the forward queue.
"""

from __future__ import annotations

import secrets
from typing import Callable, Optional, Sequence

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailauth import dsn, replies
from mailauth.envelope import MessageOptions
from mailauth.interfaces import BlockingRunner, IForwardQueue, ILocalDelivery, IMessageSink
from mailauth.maildir import MaildirWriter, UnsafeMailbox
from mailauth.routing import Router

# The lines are about delivery, as the realm's are (docs/logs.rst).
log = Logger(namespace="mailauth.realm")


def newMessageID() -> str:
    """A short, unguessable, upper-case queue ID (like Postfix's long IDs)."""
    return secrets.token_hex(6).upper()


def returnPath(sender: str) -> bytes:
    """
    The C{Return-Path:} field of final delivery (RFC 5321 4.4): the envelope
    sender, C{<>} for the null sender.
    """
    return b"Return-Path: <" + sender.encode("utf-8") + b">\r\n"


@implementer(ILocalDelivery)
class LocalDelivery:
    """
    Delivers a whole message (bounces from the queue) to a local address,
    through the aliases, with the same Maildir writer as SMTP delivery.
    """

    def __init__(self, router: Router, hostname: str, runBlocking: BlockingRunner) -> None:
        self.router = router
        self.hostname = hostname
        self.runBlocking = runBlocking

    def isLocal(self, address: str) -> bool:
        return self.router.isLocal(address)

    @defer.inlineCallbacks
    def deliver(self, recipient: str, message: bytes):
        """
        Store C{message} (CRLF line ends) for C{recipient}, after the
        C{Return-Path: <>} of its null sender: what the queue delivers
        locally are its bounces.

        @return: a Deferred that fails with L{replies.SMTPReply} 550 if
            nobody local has that address.
        """
        local, _ = yield self.router.expand(recipient)
        if not local:
            raise replies.NO_LOCAL_USER.error(address=recipient)
        try:
            maildirs = [self.router.maildirFor(login) for login in local]
        except UnsafeMailbox as e:
            log.error(
                "refusing to deliver a report or notice to <{address}>: {why}",
                address=recipient,
                why=str(e),
            )
            raise replies.MAILBOX_NOT_ALLOWED.error(address=recipient) from None

        # (The writer is made in the thread too: it makes missing folders.)
        yield self.runBlocking(
            lambda: storeWhole(MaildirWriter(maildirs, self.hostname, top=returnPath("")), message)
        )


def storeWhole(sink: IMessageSink, message: bytes) -> None:
    """
    Blocking: write C{message} whole into C{sink}, prepare and commit it;
    on any failure nothing of it is left.
    """
    try:
        sink.write(message)
        sink.prepare()
        sink.commit()
    except BaseException:
        sink.abort()
        raise


def queueMessage(
    queue: IForwardQueue,
    runBlocking: BlockingRunner,
    recipient: str,
    message: bytes,
    options: Optional[MessageOptions] = None,
    queueID: Optional[str] = None,
) -> defer.Deferred:
    """
    Put C{message} (whole, CRLF line ends) from the null sender to
    C{recipient} into the forward queue, in a thread; fires once it is
    durable (nothing of it is left if it cannot be).
    """
    sink = queue.newMessage(queueID or newMessageID(), "", [recipient], options)
    return runBlocking(storeWhole, sink, message)


class DeliveryReports:
    """
    The "delivered" and "expanded" reports (RFC 3461 5.2.3, 5.2.7.3) of one
    stored message, to its sender: through the queue, or straight into the
    sender's Maildir when there is no queue. The message is stored already,
    so a report that cannot be sent is only logged.
    """

    def __init__(
        self,
        *,
        router: Router,
        hostname: str,
        runBlocking: BlockingRunner,
        queue: Optional[IForwardQueue],
        wakeQueue: Callable[[], None],
        now: float,
    ) -> None:
        self.router = router
        self.hostname = hostname
        self.runBlocking = runBlocking
        self.queue = queue
        self.wakeQueue = wakeQueue
        self.now = now

    def send(
        self,
        *,
        queueID: str,
        session: str,
        sender: str,
        mail,
        header: bytes,
        action: str,
        recipients: Sequence[dsn.FailedRecipient],
    ) -> None:
        """
        One report of C{action} about the message C{queueID} (whose header
        section is C{header}, and whose MAIL parameters are C{mail}) for
        C{recipients}, to C{sender}.
        """
        reportID = newMessageID()
        boundary = f"{reportID}/{self.hostname}"
        report = dsn.buildReport(
            hostname=self.hostname,
            queueID=queueID,
            messageID=f"{reportID}@{self.hostname}",
            boundary=boundary,
            sender=sender,
            arrival=self.now,
            now=self.now,
            lastAttempt=self.now,
            action=action,
            recipients=recipients,
            original=dsn.returnedHeaders(header).replace(boundary.encode(), b"?"),
            envid=mail.envid,
            utf8=mail.smtputf8,
        )
        if self.queue is not None:
            d = queueMessage(
                self.queue,
                self.runBlocking,
                sender,
                report,
                MessageOptions(smtputf8=mail.smtputf8),
                reportID,
            )
            d.addCallback(lambda _: self.wakeQueue())
        elif self.router.isLocal(sender):
            d = LocalDelivery(self.router, self.hostname, self.runBlocking).deliver(sender, report)
        else:
            log.warn(
                "no [relay] to send a delivery report for {id} to <{sender}> session={session}",
                id=queueID,
                sender=sender,
                session=session,
            )
            return
        d.addCallbacks(
            lambda _: log.info(
                "delivery report for {id} to <{sender}>: {action} session={session}",
                id=queueID,
                sender=sender,
                action=action,
                session=session,
            ),
            lambda f: log.failure(
                "delivery report for {id} failed session={session}",
                f,
                id=queueID,
                session=session,
            ),
        )
