"""
The realm: a login becomes an L{IMessageDeliveryFactory} whose deliveries
apply the sender policy, route recipients (local Maildir or the forward
queue) and store each message once.
"""

from __future__ import annotations

import secrets
from email.utils import formatdate
from typing import Callable, Optional

from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDelivery, IMessageDeliveryFactory, IMessageSMTP
from zope.interface import implementer

from mailauth.addressmap import AddressMap, normalise
from mailauth.esmtp import SMTPReply
from mailauth.maildir import MaildirWriter

log = Logger(namespace="mailauth.realm")

# How deep aliases may point at aliases before we call it a loop.
MAX_ALIAS_DEPTH = 10


def newMessageID() -> str:
    """A short, unguessable, upper-case queue ID (like Postfix's long IDs)."""
    return secrets.token_hex(6).upper()


def addressText(address: Optional[smtp.Address]) -> str:
    """C{smtp.Address} to C{local@domain} text; C{""} for the null sender."""
    if address is None:
        return ""
    return f"{address.local.decode('ascii')}@{address.domain.decode('ascii')}"


class Router:
    """
    Knows which domains are local, who exists, what aliases expand to and
    who may send as whom. Shared by every delivery; reads only in-memory
    data, so it is safe on the reactor thread.
    """

    def __init__(self, *, localDomains, maildirTemplate: str, users, aliases: AddressMap,
                 senderMap: AddressMap, senderLoginMatch: bool) -> None:
        self.localDomains = frozenset(localDomains)
        self.maildirTemplate = maildirTemplate
        self.users = users
        self.aliases = aliases
        self.senderMap = senderMap
        self.senderLoginMatch = senderLoginMatch

    def isLocal(self, address: str) -> bool:
        return normalise(address).rpartition("@")[2] in self.localDomains

    def expand(self, address: str) -> tuple:
        """
        Resolve C{address} through the aliases.

        @return: C{(local logins, remote addresses)}; both empty if the
            address is local and names nobody.
        """
        local, remote, seen = [], [], set()

        def walk(addr: str, depth: int) -> None:
            addr = normalise(addr)
            if addr in seen or depth > MAX_ALIAS_DEPTH:
                return
            seen.add(addr)
            if not self.isLocal(addr):
                remote.append(addr)
                return
            if self.users.exists(addr):
                local.append(addr)
                return
            for target in self.aliases.get(addr):
                walk(target, depth + 1)

        walk(address, 0)
        return _unique(local), _unique(remote)

    def maildirFor(self, login: str) -> str:
        localpart, _, domain = login.rpartition("@")
        return self.maildirTemplate.format(domain=domain, localpart=localpart, user=login)

    def mayUseSender(self, login: str, sender: str) -> bool:
        """
        Whether C{login} may use C{sender} in MAIL FROM: its own address, an
        alias that leads to it, or an address (or C{@domain}) granted to it
        in the sender map.
        """
        sender = normalise(sender)
        if sender == login or login in self.senderMap.get(sender):
            return True
        local, _ = self.expand(sender) if self.isLocal(sender) else ((), ())
        return login in local and not self.users.exists(sender)


def _unique(items: list) -> tuple:
    return tuple(dict.fromkeys(items))


@implementer(IRealm)
class Realm:
    """
    Hands out L{Sender} avatars. C{store} runs blocking storage work in a
    thread and returns a Deferred; C{queue} (optional) takes mail for
    other domains.
    """

    def __init__(self, *, router: Router, hostname: str, store: Callable, queue=None,
                 wakeQueue: Callable[[], None] = lambda: None, clock) -> None:
        self.router = router
        self.hostname = hostname
        self.store = store
        self.queue = queue
        self.wakeQueue = wakeQueue
        self.clock = clock

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IMessageDeliveryFactory not in interfaces:
            raise NotImplementedError("mailauth avatars are IMessageDeliveryFactory only")
        login = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else avatarId
        return IMessageDeliveryFactory, Sender(self, login), lambda: None

    def anonymous(self) -> Sender:
        """The avatar of sessions that did not authenticate: local delivery only."""
        return Sender(self, None)


@implementer(IMessageDeliveryFactory)
class Sender:
    """One logged-in user (or the anonymous client); a L{Delivery} per message."""

    def __init__(self, realm: Realm, login: Optional[str]) -> None:
        self.realm = realm
        self.login = login

    def getMessageDelivery(self) -> Delivery:
        return Delivery(self.realm, self.login)


@implementer(IMessageDelivery)
class Delivery:
    """One mail transaction: the sender check, each recipient, the Received header."""

    def __init__(self, realm: Realm, login: Optional[str]) -> None:
        self.realm = realm
        self.login = login
        self.id = newMessageID()
        self.sender = ""
        self.maildirs: list = []
        self.remote: list = []
        self._message: Optional[Message] = None

    def validateFrom(self, helo, origin):
        sender = addressText(origin)
        router = self.realm.router
        if (
            self.login is not None
            and sender
            and router.senderLoginMatch
            and not router.mayUseSender(self.login, sender)
        ):
            log.info(
                "sender refused: login=<{login}> from=<{sender}>", login=self.login, sender=sender
            )
            raise SMTPReply(553, f"5.7.1 <{sender}>: Sender address not owned by user {self.login}")
        self.sender = sender
        return origin

    def validateTo(self, user: smtp.User):
        recipient = addressText(user.dest)
        router = self.realm.router
        if router.isLocal(recipient):
            local, remote = router.expand(recipient)
            if not local and not remote:
                raise SMTPReply(
                    550, f"5.1.1 <{recipient}>: Recipient address rejected: User unknown"
                )
            if remote and self.realm.queue is None:
                log.error("alias {alias} leads to another domain, and no [relay] is set",
                          alias=recipient)
                raise SMTPReply(451, f"4.3.0 <{recipient}>: cannot forward, try again later")
        else:
            if self.login is None or self.realm.queue is None:
                raise SMTPReply(554, f"5.7.1 <{recipient}>: Relay access denied")
            local, remote = (), (recipient,)
        for login in local:
            path = router.maildirFor(login)
            if path not in self.maildirs:
                self.maildirs.append(path)
        for address in remote:
            if address not in self.remote:
                self.remote.append(address)
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
        with_ = "ESMTP" + ("S" if tlsText else "") + ("A" if self.login else "")
        name = helo[0].decode("ascii") if isinstance(helo[0], bytes) else helo[0]
        lines = [f"Received: from {name} ([{helo[1]}])"]
        if self.login:
            lines.append(f"\t(authenticated as {self.login})")
        lines.append(f"\tby {self.realm.hostname} (mailauth) with {with_} id {self.id}")
        if tlsText:
            lines.append(f"\t(using {tlsText})")
        forPart = f"for <{addressText(recipients[0].dest)}>; " if len(recipients) == 1 else ""
        date = formatdate(self.realm.clock.seconds(), localtime=True)
        lines.append(f"\t{forPart}{date}")
        return ("\r\n".join(lines) + "\r\n").encode("ascii")


@implementer(IMessageSMTP)
class Message:
    """
    The one IMessage of a transaction, shared by all its recipients: the body
    is written once to a Maildir file (for local recipients) and once to the
    queue (for remote ones), and committed in a thread before the 250.
    """

    def __init__(self, delivery: Delivery) -> None:
        realm = delivery.realm
        self.id = delivery.id
        self._realm = realm
        self._sinks = []
        if delivery.maildirs:
            self._sinks.append(MaildirWriter(delivery.maildirs, realm.hostname))
        if delivery.remote:
            self._sinks.append(realm.queue.newMessage(delivery.id, delivery.sender,
                                                      list(delivery.remote)))
        self._remote = bool(delivery.remote)

    def write(self, chunk: bytes) -> None:
        for sink in self._sinks:
            sink.write(chunk)

    def lineReceived(self, line: bytes) -> None:
        self.write(line + b"\r\n")

    def eomReceived(self):
        sinks = self._sinks

        def commitAll() -> None:
            for sink in sinks:
                sink.commit()

        d = self._realm.store(commitAll)
        d.addCallback(self._committed)
        return d

    def _committed(self, ignored) -> str:
        self._sinks = []
        if self._remote:
            self._realm.wakeQueue()
        return self.id

    def connectionLost(self) -> None:
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.abort()


class LocalDelivery:
    """
    Delivers a whole message (bounces from the queue) to a local address,
    through the aliases, with the same Maildir writer as SMTP delivery.
    """

    def __init__(self, router: Router, hostname: str, store: Callable) -> None:
        self.router = router
        self.hostname = hostname
        self.store = store

    def isLocal(self, address: str) -> bool:
        return self.router.isLocal(address)

    def deliver(self, recipient: str, message: bytes):
        """
        Store C{message} (CRLF line ends) for C{recipient}.

        @return: a Deferred that fails with L{SMTPReply} 550 if nobody local
            has that address.
        """
        local, _ = self.router.expand(recipient)
        if not local:
            return defer.fail(SMTPReply(550, f"5.1.1 <{recipient}>: User unknown"))
        maildirs = [self.router.maildirFor(login) for login in local]

        def write() -> None:
            writer = MaildirWriter(maildirs, self.hostname)
            try:
                writer.write(message)
                writer.commit()
            except BaseException:
                writer.abort()
                raise

        return self.store(write)
