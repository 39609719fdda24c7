"""
The realm: a login becomes an L{IMessageDeliveryFactory} whose deliveries
apply the sender policy, route recipients (local Maildir or the forward
queue) and store each message once.
"""

from __future__ import annotations

import functools
import time
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Callable, Optional, cast

from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDelivery, IMessageDeliveryFactory, IMessageSMTP
from twisted.python.failure import Failure
from zope.interface import implementer

from mailauth import dsn, replies
from mailauth.addresses import (
    MailParameters,
    RcptParameters,
    addressText,
    domainKey,
    encodeXtext,
    normalise,
    orcptFor,
)
from mailauth.envelope import MessageOptions, RecipientStatus
from mailauth.fromheader import MAX_HEADER, HeaderSection, UncheckableHeader, senderAddresses
from mailauth.headers import MAX_HOPS, HeaderCompleter, HopCounter
from mailauth.interfaces import (
    BlockingRunner,
    IForwardQueue,
    IMessageSink,
)
from mailauth.limits import SendingLimits
from mailauth.maildir import MaildirWriter, UnsafeMailbox
from mailauth.metrics import Metrics
from mailauth.ownmail import (
    DeliveryReports,
    LocalDelivery,
    newMessageID,
    queueMessage,
    returnPath,
)
from mailauth.replies import SMTPReply
from mailauth.routing import Router

if TYPE_CHECKING:
    # Only imported where [dkim] is configured: it needs dkimpy.
    from mailauth.dkimsign import KeyRing, MessageSigner
    from mailauth.signerproc import SigningProcess

log = Logger(namespace="mailauth.realm")


def _traceAddress(address: str, utf8: bool) -> str:
    """
    An address as the Received header names it: ASCII wherever it can be
    (domains in A-labels), so that a SMTPUTF8 message whose own header is
    ASCII can still go to a relay without SMTPUTF8; UTF-8 local parts only
    in SMTPUTF8 mail, as xtext otherwise.
    """
    local, _, domain = address.rpartition("@")
    if not local.isascii() and not utf8:
        local = encodeXtext(local)
    return f"{local}@{domainKey(domain)}" if local.isascii() else f"{local}@{domain}"


def _orcpt(params: RcptParameters, recipient: str, address: str) -> Optional[str]:
    """
    The ORCPT to keep for C{address}, reached from the RCPT address
    C{recipient}: the client's, else the RCPT address when an alias led
    elsewhere, so that reports name the address the sender wrote (RFC 3461
    4.2).
    """
    if params.orcpt is not None or normalise(address) == normalise(recipient):
        return params.orcpt
    return orcptFor(recipient)


@implementer(IRealm)
class Realm:
    """
    Hands out L{Avatar}s. C{runBlocking} runs the blocking storage work;
    C{queue} (optional) takes mail for other domains, and C{wakeQueue} is
    called once a message is in it. C{keyRing} (C{[dkim]}, optional) signs
    authenticated submissions from its domains, in C{signingProcess} when
    there is one (L{mailauth.signerproc}), else in C{runBlocking}'s
    threads; C{metrics} counts refusals.
    """

    def __init__(
        self,
        *,
        router: Router,
        hostname: str,
        runBlocking: BlockingRunner,
        queue: Optional[IForwardQueue] = None,
        wakeQueue: Callable[[], None] = lambda: None,
        clock,
        limits: Optional[SendingLimits] = None,
        keyRing: Optional[KeyRing] = None,
        metrics: Optional[Metrics] = None,
        signingProcess: Optional[SigningProcess] = None,
    ) -> None:
        self.router = router
        self.hostname = hostname
        self.runBlocking = runBlocking
        self.queue = queue
        self.wakeQueue = wakeQueue
        self.clock = clock
        self.limits = limits
        self.keyRing = keyRing
        self.signingProcess = signingProcess
        self.metrics = metrics if metrics is not None else Metrics()

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IMessageDeliveryFactory not in interfaces:
            raise NotImplementedError("mailauth avatars are IMessageDeliveryFactory only")
        login = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else avatarId
        # A login made with an app password names it (checkers.AppPasswordLogin).
        app = getattr(avatarId, "appPassword", None)
        return IMessageDeliveryFactory, Avatar(self, str(login), app), lambda: None

    def anonymous(self) -> Avatar:
        """The avatar of sessions that did not authenticate: local delivery only."""
        return Avatar(self, None)

    @defer.inlineCallbacks
    def deliverNotice(self, recipient: str, message: bytes):
        """
        Send a message of our own (a notice to the postmaster) from the null
        sender: into the Maildirs of a local C{recipient}, or into the
        forward queue for another domain.

        @param message: the whole message, CRLF line ends.
        @return: a Deferred that fires once it is stored.
        """
        if self.router.isLocal(recipient):
            yield LocalDelivery(self.router, self.hostname, self.runBlocking).deliver(
                recipient, message
            )
            return
        if self.queue is None:
            raise replies.RELAY_DENIED.error(address=recipient)
        yield queueMessage(self.queue, self.runBlocking, recipient, message)
        self.wakeQueue()


@implementer(IMessageDeliveryFactory)
class Avatar:
    """
    One logged-in user (or the anonymous client); a L{Delivery} per message.

    @ivar appPassword: the label of the app password it logged in with, or
        L{None}.
    """

    def __init__(
        self, realm: Realm, login: Optional[str], appPassword: Optional[str] = None
    ) -> None:
        self.realm = realm
        self.login = login
        self.appPassword = appPassword

    def getMessageDelivery(self) -> Delivery:
        delivery = Delivery(self.realm, self.login)
        delivery.appPassword = self.appPassword
        return delivery


@implementer(IMessageDelivery)
class Delivery:
    """One mail transaction: the sender check, each recipient, the Received header."""

    def __init__(self, realm: Realm, login: Optional[str]) -> None:
        self.realm = realm
        self.login = login
        self.id = newMessageID()
        self.sender = ""
        self.mail = MailParameters()
        self.maildirs: list = []
        self.remote: list = []
        # Each remote address's RecipientStatus, with NOTIFY and ORCPT.
        self.remoteStatus: dict = {}
        # The local recipients that asked to be told of delivery (NOTIFY=SUCCESS).
        self.successReports: list = []
        # The aliases of several addresses that asked for it: "expanded".
        self.expandedReports: list = []
        self._message: Optional[Message] = None
        self.appPassword: Optional[str] = None
        self._session = ""
        #: The recipients accepted so far, and what the sending limits
        #: check and count for this transaction (authenticated logins only).
        self.accepted = 0
        self.limits = (
            realm.limits.transaction(login)
            if login is not None and realm.limits is not None
            else None
        )

    @property
    def session(self) -> str:
        """The ID of the SMTP session it belongs to, for its log lines (the session sets it)."""
        return self._session

    @session.setter
    def session(self, value: str) -> None:
        self._session = value
        if self.limits is not None:
            self.limits.session = value

    def validateFrom(self, helo, origin) -> defer.Deferred:
        sender = addressText(origin)
        router = self.realm.router
        if self.login is not None and sender and router.senderLoginMatch:
            d = router.mayUseSender(self.login, sender)
            return d.addCallback(self._senderChecked, sender, origin)
        return self._senderAllowed(sender, origin)

    def _senderChecked(self, allowed: bool, sender: str, origin) -> defer.Deferred:
        if not allowed:
            log.info(
                "sender refused: login=<{login}> from=<{sender}> session={session}",
                login=self.login,
                sender=sender,
                session=self.session,
            )
            raise replies.SENDER_NOT_OWNED.error(address=sender, login=self.login)
        return self._senderAllowed(sender, origin)

    def _senderAllowed(self, sender: str, origin) -> defer.Deferred:
        """The sender may be used; then the sending limits have their say."""
        d = defer.succeed(None) if self.limits is None else self.limits.checkSender()

        def taken(ignored):
            self.sender = sender
            return origin

        return d.addCallback(taken)

    def validateTo(self, user: smtp.User) -> defer.Deferred:
        recipient = addressText(user.dest)
        # The session hands over an addresses.Recipient with the RCPT and
        # MAIL parameters; a plain smtp.User has none.
        params = getattr(user, "params", None) or RcptParameters()
        self.mail = getattr(user, "mail", None) or self.mail
        router = self.realm.router
        if router.isLocal(recipient):
            d = router.expand(recipient).addCallback(self._aliasesExpanded, recipient)
        elif self.login is None or self.realm.queue is None:
            return defer.fail(replies.RELAY_DENIED.error(address=recipient))
        else:
            d = defer.succeed(((), (recipient,)))
        return d.addCallback(self._routed, recipient, params)

    def _aliasesExpanded(self, routes: tuple, recipient: str) -> tuple:
        """The local C{recipient}'s (local logins, remote addresses), if it may have them."""
        local, remote = routes
        if not local and not remote:
            raise replies.UNKNOWN_RECIPIENT.error(address=recipient)
        if remote and self.realm.queue is None:
            log.error(
                "alias {alias} leads to another domain, and no [relay] is set session={session}",
                alias=recipient,
                session=self.session,
            )
            raise replies.CANNOT_FORWARD.error(address=recipient)
        return routes

    def _routed(self, routes: tuple, recipient: str, params: RcptParameters):
        """Where C{recipient} goes is known: its Maildirs, then the sending limits."""
        local, remote = routes
        router = self.realm.router
        try:
            paths = [router.maildirFor(login) for login in local]
        except UnsafeMailbox as e:
            log.error(
                "refusing to deliver to <{address}>: {why} session={session}",
                address=recipient,
                why=str(e),
                session=self.session,
            )
            raise replies.MAILBOX_NOT_ALLOWED.error(address=recipient) from None
        if self.limits is None:
            return self._recipientTaken(local, remote, paths, recipient, params)
        d = self.limits.checkRecipient(self.accepted)
        return d.addCallback(
            lambda ignored: self._recipientTaken(local, remote, paths, recipient, params)
        )

    def _recipientTaken(
        self, local: tuple, remote: tuple, paths: list, recipient: str, params: RcptParameters
    ) -> Callable[[], Message]:
        """Add C{recipient} to the transaction: its Maildirs, remote addresses and DSN wishes."""
        self.accepted += 1
        for path in paths:
            if path not in self.maildirs:
                self.maildirs.append(path)
        notify = params.notify
        success = notify is not None and "SUCCESS" in notify
        # RFC 3461 5.2.7.3: an alias that stands for several addresses is
        # reported "expanded" to a sender who asked for SUCCESS, and its
        # members are not reported on again (FAILURE and DELAY still are).
        expanded = success and len(local) + len(remote) > 1
        if expanded and notify is not None:
            notify = tuple(n for n in notify if n != "SUCCESS") or ("NEVER",)
        for address in remote:
            if address not in self.remote:
                self.remote.append(address)
                self.remoteStatus[address] = RecipientStatus(
                    address, notify=notify, orcpt=_orcpt(params, recipient, address)
                )
        if expanded:
            self.expandedReports.append(dsn.FailedRecipient(recipient, orcpt=params.orcpt))
        elif local and success:
            self.successReports.append(dsn.FailedRecipient(recipient, orcpt=params.orcpt))
        return self._getMessage

    def _getMessage(self) -> Message:
        if self._message is None:
            self._message = Message(self)
        return self._message

    def receivedHeader(self, helo, origin, recipients) -> bytes:
        """
        The C{Received:} header (RFC 5321 4.4) with ESMTPSA/ESMTPS/ESMTPA
        (RFC 3848) and the login; folded with CRLF, ready to be written.
        """
        session = recipients[0].protocol
        tlsText = session.tlsDescription()
        # RFC 6531 3.7.3: UTF8SMTP and its S and A forms for SMTPUTF8 mail.
        utf8 = any(getattr(getattr(r, "mail", None), "smtputf8", False) for r in recipients)
        with_ = ("UTF8SMTP" if utf8 else "ESMTP") + ("S" if tlsText else "")
        with_ += "A" if self.login else ""
        name = helo[0].decode("ascii") if isinstance(helo[0], bytes) else helo[0]
        # An address literal (RFC 5321 4.1.3): an IPv6 address is tagged.
        literal = f"IPv6:{helo[1]}" if ":" in helo[1] else helo[1]
        lines = [f"Received: from {name} ([{literal}])"]
        if self.login:
            login = _traceAddress(self.login, utf8)
            if self.appPassword:
                lines.append(f"\t(authenticated as {login} with app password {self.appPassword})")
            else:
                lines.append(f"\t(authenticated as {login})")
        lines.append(f"\tby {self.realm.hostname} (mailauth) with {with_} id {self.id}")
        if tlsText:
            lines.append(f"\t(using {tlsText})")
        # The ";" before the date is not optional (RFC 5322 3.6.7): with one
        # recipient it follows the "for" clause, with more it ends the line
        # before the date, as Postfix writes it.
        date = localDate(int(self.realm.clock.seconds()))
        if len(recipients) == 1:
            recipient = _traceAddress(addressText(recipients[0].dest), utf8)
            lines.append(f"\tfor <{recipient}>; {date}")
        else:
            lines[-1] += ";"
            lines.append(f"\t{date}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")


@implementer(IMessageSMTP)
class Message:
    """
    The one IMessage of a transaction, shared by all its recipients: the body
    is written once to a Maildir file (for local recipients) and once to the
    queue (for remote ones). At the end every sink is prepared (durable but
    unseen), then every sink commits, in a thread, before the 250: a
    failure anywhere aborts them all, so the message is stored for every
    recipient or for none, and a retry by the client cannot duplicate it.

    The Maildir copy starts with C{Return-Path:} (final delivery, RFC 5321
    4.4); the queued copy does not, the relay not being the final hop. An
    authenticated submission that lacks C{Date:} or C{Message-ID:} gets them
    at the end of its header section (RFC 6409 8.2, 8.3), added as the
    message streams (L{HeaderCompleter}). With C{[delivery]
    header_from_match} its C{From:} and C{Sender:} addresses must be the
    login's, checked before any sink prepares. With a key for the domain of
    its envelope sender it is signed: the signer is fed the bytes the sinks
    get (everything mailauth adds but C{Return-Path:}), the signature is
    made in the same thread as the storing, and each sink puts it on top
    (L{IMessageSink.prepend}), below C{Return-Path:}. The header block is
    kept once, by the signer or by a L{HeaderSection} of its own, for both
    the check and the signature.
    """

    def __init__(self, delivery: Delivery) -> None:
        realm = delivery.realm
        self.id = delivery.id
        self._realm = realm
        self._login = delivery.login
        self._session = delivery.session
        self._delivery = delivery
        self._sinks: list[IMessageSink] = []
        self._failed: Optional[SMTPReply] = None
        self._places = list(delivery.maildirs)
        mail = delivery.mail
        try:
            if delivery.remote:
                # The queue commits first: its commit is one rename, undone by
                # removing the message before anybody has sent it.
                assert realm.queue is not None, "validateTo takes remote ones only with a queue"
                self._places.insert(0, "the queue")
                self._sinks.append(
                    realm.queue.newMessage(
                        delivery.id,
                        delivery.sender,
                        [delivery.remoteStatus[address] for address in delivery.remote],
                        MessageOptions(smtputf8=mail.smtputf8, ret=mail.ret, envid=mail.envid),
                    )
                )
            if delivery.maildirs:
                self._sinks.append(
                    MaildirWriter(
                        delivery.maildirs, realm.hostname, top=returnPath(delivery.sender)
                    )
                )
        except OSError as e:
            self._storageFailed(e)
        self._remote = bool(delivery.remote)
        self._headers: Optional[HeaderCompleter] = None
        self._signer: Optional[MessageSigner] = None
        self._section: Optional[HeaderSection] = None
        self._checkFrom = False
        if delivery.login is not None:
            self._headers = HeaderCompleter(self._toSinks, submissionFields(realm, delivery.id))
            if realm.keyRing is not None:
                self._signer = realm.keyRing.signer(delivery.sender)
            self._checkFrom = realm.router.headerFromMatch
        self._hops = HopCounter()
        self._limits = delivery.limits
        self._accepted = delivery.accepted
        # A delivery report (NOTIFY=SUCCESS) returns the header section.
        self._report = bool(
            (delivery.successReports or delivery.expandedReports) and delivery.sender
        )
        # The header block is kept once, for the From: check, the signature
        # and the report alike.
        if self._signer is not None:
            self._section = self._signer.header
        elif self._checkFrom or self._report:
            self._section = HeaderSection()

    def _storageFailed(self, error: OSError) -> SMTPReply:
        """
        Log why the message cannot be stored, once, as a warning naming the
        path and errno (a full disk or a folder the daemon may not write
        is the operator's to fix, not a bug), and throw away what was
        written.

        @return: the 451 or 452 reply the client gets.
        """
        if self._failed is None:
            reply = replies.storageFailure(error)
            log.warn(
                "message {id} not stored: {path}: {error} (errno {errno}); the client is told "
                "{code}, to try again later session={session}",
                id=self.id,
                session=self._session,
                path=error.filename or " ".join(self._places),
                error=error.strerror or error,
                errno=error.errno,
                code=reply.code,
            )
            self._failed = reply.error()
            self.connectionLost()
        return self._failed

    def write(self, chunk: bytes) -> None:
        if self._failed is not None:
            return
        if self._headers is not None:
            self._headers.write(chunk)
        else:
            self._toSinks(chunk)

    def _toSinks(self, chunk: bytes) -> None:
        if self._failed is not None:
            return
        try:
            for sink in self._sinks:
                sink.write(chunk)
        except OSError as e:
            self._storageFailed(e)
            return
        self._hops.write(chunk)
        # The signer and the From: check see exactly what the sinks store.
        if self._signer is not None:
            self._signer.write(chunk)
        elif self._section is not None:
            self._section.write(chunk)

    def lineReceived(self, line: bytes) -> None:
        self.write(line + b"\r\n")

    def eomReceived(self):
        if self._headers is not None and self._failed is None:
            self._headers.finish()
        if self._failed is not None:
            return defer.fail(self._failed)
        if self._hops.count > MAX_HOPS:
            return defer.fail(self._looping())
        d = self._checkSenders() if self._checkFrom else defer.succeed(None)
        d.addCallback(self._store)
        d.addErrback(self._notStored)
        return d.addCallback(self._committed)

    def _looping(self) -> SMTPReply:
        """
        Refuse a message with more than L{MAX_HOPS} C{Received:} fields (a
        mail loop, RFC 5321 6.3): C{554 5.4.6}, logged, nothing kept.
        """
        self.connectionLost()
        log.warn(
            "message {id} refused: {count} Received header fields, more than {limit}: "
            "a mail loop? login=<{login}> from=<{sender}> session={session}",
            id=self.id,
            session=self._session,
            count=self._hops.count,
            limit=MAX_HOPS,
            login=self._login or "",
            sender=self._delivery.sender,
        )
        return replies.TOO_MANY_HOPS.error(count=self._hops.count)

    @defer.inlineCallbacks
    def _checkSenders(self):
        """
        Refuse the message (C{550 5.7.1}, logged and counted, nothing kept)
        unless every C{From:} and C{Sender:} address is one the login may
        use as MAIL FROM; a message without them passes. The header is
        parsed in a thread: it may be up to L{MAX_HEADER} bytes.
        """
        realm, section, login = self._realm, self._section, self._login
        assert section is not None and login is not None
        header = section.value()
        try:
            if section.tooLong or len(header) > MAX_HEADER:
                raise UncheckableHeader(f"the header section is longer than {MAX_HEADER} bytes")
            addresses = yield realm.runBlocking(senderAddresses, header)
        except UncheckableHeader as e:
            log.info(
                "header From refused: login=<{login}> id={id}: {why} session={session}",
                login=login,
                session=self._session,
                id=self.id,
                why=str(e),
            )
            self._refused()
            raise replies.HEADER_FROM_UNCHECKABLE.error() from None
        for address in addresses:
            if not (yield realm.router.mayUseSender(login, address)):
                log.info(
                    "header From refused: login=<{login}> from=<{address}> id={id} "
                    "session={session}",
                    login=login,
                    session=self._session,
                    address=address,
                    id=self.id,
                )
                self._refused()
                raise replies.HEADER_FROM_NOT_OWNED.error(
                    address=replies.echo(address), login=login
                )

    def _refused(self) -> None:
        """
        The From: check refused the message: nothing of it is kept (the
        session counts the refusal, by its reply's C{metric}).
        """
        self.connectionLost()

    def _store(self, ignored) -> defer.Deferred:
        """
        In a thread: sign the message, if it is signed (unless the signing
        process did first), and put the signature on top of every copy;
        then prepare every sink, then commit every sink. Any failure
        aborts them all.
        """
        sinks, signer, realm = self._sinks, self._signer, self._realm

        def storeAll(signature: Optional[bytes]) -> None:
            try:
                if signer is not None:
                    if signature is None:
                        signature = signer.signatureHeader()
                    for sink in sinks:
                        sink.prepend(signature)
                for sink in sinks:
                    sink.prepare()
                for sink in sinks:
                    sink.commit()
            except BaseException:
                for sink in sinks:
                    sink.abort()
                raise

        if signer is None:
            return realm.runBlocking(storeAll, None)
        if realm.signingProcess is None:
            d = defer.succeed(None)
        else:
            # Signed by the signing process when it can, else in the thread.
            d = realm.signingProcess.sign(signer)

        def store(signature: Optional[bytes]) -> defer.Deferred:
            def counted(result: Any) -> Any:
                realm.metrics.dkimSigned("thread" if signature is None else "process")
                return result

            return realm.runBlocking(storeAll, signature).addCallback(counted)

        return d.addCallback(store)

    def _notStored(self, f: Failure) -> Failure:
        if f.check(OSError):
            self._sinks = []  # storeAll aborted them
            raise self._storageFailed(cast(OSError, f.value))
        if self._signer is not None:
            # Only here, where a signer was made, is dkimpy sure to be there.
            from mailauth import dkimsign

            if f.check(dkimsign.MessageNotSignable):
                self.connectionLost()  # storeAll aborted them; again does no harm
                log.info(
                    "message {id} not signed: login=<{login}>: {why}; refused session={session}",
                    id=self.id,
                    session=self._session,
                    login=self._login,
                    why=f.getErrorMessage(),
                )
                raise replies.NOT_SIGNABLE.error()
            if f.check(dkimsign.SigningError):
                self.connectionLost()
                log.error(
                    "message {id} not signed: {why}; the client is told 451, to try again later "
                    "session={session}",
                    id=self.id,
                    session=self._session,
                    why=f.getErrorMessage(),
                )
                raise replies.SIGNING_FAILED.error()
        return f

    def _committed(self, ignored) -> defer.Deferred[str]:
        self._sinks = []
        if self._remote:
            self._realm.wakeQueue()
        if self._report:
            try:
                self._reportDelivery()
            except Exception:
                # The message is stored; only its report is lost.
                log.failure(
                    "delivery report for {id} failed session={session}",
                    id=self.id,
                    session=self._session,
                )
        if self._limits is None:
            return defer.succeed(self.id)
        # Counted before the 250, so that the next MAIL sees this message.
        return self._limits.record(self._accepted).addCallback(lambda ignored: self.id)

    def _reportDelivery(self) -> None:
        """
        Tell the sender that the local recipients that asked (NOTIFY=SUCCESS,
        RFC 3461 5.2.3) have the message, and which aliases of several
        addresses it was passed on through (5.2.7.3): one report for each
        (L{DeliveryReports}).
        """
        realm, delivery = self._realm, self._delivery
        assert self._section is not None, "made for the report"
        reports = DeliveryReports(
            router=realm.router,
            hostname=realm.hostname,
            runBlocking=realm.runBlocking,
            queue=realm.queue,
            wakeQueue=realm.wakeQueue,
            now=realm.clock.seconds(),
        )
        header = self._section.value()
        for action, recipients in (
            ("delivered", delivery.successReports),
            ("expanded", delivery.expandedReports),
        ):
            if recipients:
                reports.send(
                    queueID=self.id,
                    session=self._session,
                    sender=delivery.sender,
                    mail=delivery.mail,
                    header=header,
                    action=action,
                    recipients=recipients,
                )

    def connectionLost(self) -> None:
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.abort()


@functools.lru_cache(maxsize=4)
def localDate(second: int) -> str:
    """
    The RFC 5322 date of C{second} in local time: made once a second, not
    twice a message (the C{Date:} field, the C{Received:} header).
    """
    return formatdate(second, localtime=True)


def submissionFields(realm: Realm, messageID: str) -> dict[bytes, bytes]:
    """
    The C{Date:} and C{Message-ID:} fields a submission gets if it has none
    (RFC 6409 8.2, 8.3), by lower-case field name: the time now, and an ID
    made of the time, the transaction's random queue ID and our host name.
    """
    now = realm.clock.seconds()
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
    return {
        b"date": f"Date: {localDate(int(now))}\r\n".encode("ascii"),
        b"message-id": f"Message-ID: <{stamp}.{messageID}@{realm.hostname}>\r\n".encode("ascii"),
    }
