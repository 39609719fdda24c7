"""In-memory fakes implementing the same interfaces as the real parts of mailauth."""

from __future__ import annotations

from typing import Optional

import attrs
from twisted.internet import defer
from zope.interface import implementer

from mailauth import replies
from mailauth.addresses import normalise
from mailauth.dotstuff import unstuff
from mailauth.envelope import MessageOptions, recipientStatus
from mailauth.interfaces import (
    IForwardQueue,
    ILocalDelivery,
    IMessageSink,
    IRelayConnector,
    IRelaySession,
    IReloadable,
    IUserDatabase,
    IUserStore,
)
from mailauth.passwords import parse
from mailauth.relay import RelayError, RelayReply
from mailauth.userdb import (
    User,
    UserDatabaseError,
    UserDatabaseUnavailable,
    checkLogin,
    parseUsers,
)


def runInline(f, *args, **kwargs) -> defer.Deferred:
    """A L{mailauth.interfaces.BlockingRunner} that runs the work at once, on this thread."""
    return defer.maybeDeferred(f, *args, **kwargs)


@implementer(IUserDatabase, IReloadable)
class MemoryUserDatabase:
    """
    A L{mailauth.userdb.UserDatabase} whose file is C{source}, a dict of login
    to C{{SCHEME}hash} string, or L{None} for a file that cannot be read.

    It is parsed as the real file is, and loaded at once; as with the file,
    later changes to C{source} are seen only after L{load} or L{maybeReload}.
    """

    path = "<memory>"

    def __init__(self, source: Optional[dict[str, str]] = None) -> None:
        self.source = source
        self.problems: list[str] = []
        self._users: Optional[dict[str, User]] = None
        self._loaded: Optional[dict[str, str]] = None
        self.load()

    def load(self) -> bool:
        if self.source is None:
            return False
        self._loaded = dict(self.source)
        text = "\n".join(f"{login}:{stored}" for login, stored in self._loaded.items())
        self._users, self.problems = parseUsers(text, self.path)
        return True

    def maybeReload(self) -> bool:
        if self.source is None or self.source == self._loaded:
            return False
        return self.load()

    def _current(self) -> dict[str, User]:
        if self._users is None:
            raise UserDatabaseUnavailable("the users were never loaded")
        return self._users

    def lookup(self, login: str) -> defer.Deferred:
        try:
            return defer.succeed(self.get(login))
        except UserDatabaseUnavailable:
            return defer.fail()

    def get(self, login: str) -> Optional[User]:
        return self._current().get(normalise(login))

    def exists(self, login: str) -> bool:
        return self.get(login) is not None

    def logins(self) -> list[str]:
        return sorted(self._current())


@implementer(IUserDatabase, IUserStore)
class MemoryUserStore:
    """
    A user database that is also its own L{IUserStore}: the edits (a
    suspension the daemon makes, a C{mailauth user} command) are seen by
    the next L{lookup} at once, as a database table's would be.

    @ivar users: lower-cased login to L{User}, in the order they were added.
    @ivar available: L{lookup} fails with L{UserDatabaseUnavailable} when
        this is false.
    """

    def __init__(self, users: Optional[dict[str, str]] = None) -> None:
        self.users: dict[str, User] = {}
        self.available = True
        for login, stored in (users or {}).items():
            self.addUser(login, stored)

    def lookup(self, login: str) -> defer.Deferred:
        if not self.available:
            return defer.fail(UserDatabaseUnavailable("the fake database is down"))
        return defer.succeed(self.users.get(login.lower()))

    def _user(self, login: str) -> User:
        user = self.users.get(login.lower())
        if user is None:
            raise UserDatabaseError(f"no user {login}")
        return user

    def addUser(self, login: str, hashString: str) -> None:
        checkLogin(login)
        if login.lower() in self.users:
            raise UserDatabaseError(f"user {login} already exists")
        try:
            password = parse(hashString)
        except ValueError as e:
            raise UserDatabaseError(str(e)) from None
        self.users[login.lower()] = User(login.lower(), password)

    def setPassword(self, login: str, hashString: str) -> None:
        user = self._user(login)
        try:
            password = parse(hashString)
        except ValueError as e:
            raise UserDatabaseError(str(e)) from None
        self.users[user.login] = attrs.evolve(user, password=password)

    def deleteUser(self, login: str) -> None:
        del self.users[self._user(login).login]

    def hasUser(self, login: str) -> bool:
        return login.lower() in self.users

    def listUsers(self) -> list[tuple[str, str]]:
        return [(user.login, user.password.scheme) for user in self.users.values()]

    def setSuspended(self, login: str, suspended: bool) -> None:
        user = self._user(login)
        self.users[user.login] = attrs.evolve(user, suspended=suspended)


# The forward queue's collaborators: local delivery and the relay.


@implementer(ILocalDelivery)
class RecordingLocalDelivery:
    """
    The local delivery the queue service uses for bounces to local senders:
    addresses in C{domains} are local; C{deliver} records the message.

    @ivar delivered: (recipient, message) pairs, in order.
    @ivar failures: address to a list of exceptions, raised one per
        delivery to it before it succeeds.
    @ivar users: the local addresses that exist, or L{None} for all.
    """

    def __init__(self, domains=("example.org",), users=None) -> None:
        self.domains = frozenset(domains)
        self.users = None if users is None else frozenset(users)
        self.delivered: list = []
        self.failures: dict = {}

    def isLocal(self, address: str) -> bool:
        return address.rpartition("@")[2].lower() in self.domains

    def deliver(self, recipient: str, message: bytes):
        failures = self.failures.get(recipient)
        if failures:
            return defer.fail(failures.pop(0))
        if self.users is not None and recipient.lower() not in self.users:
            return defer.fail(replies.NO_LOCAL_USER.error(address=recipient))
        self.delivered.append((recipient, message))
        return defer.succeed(None)


@implementer(IRelayConnector)
class FakeRelayConnector:
    """
    A relay in memory.

    @ivar down: C{connect} fails, as with a relay that is down.
    @ivar paused: C{connect} returns a Deferred the test fires, from
        C{waiting} (pairs of Deferred and session).
    @ivar replies: address to a list of L{RelayReply}s used one per attempt
        for it, then 250.
    @ivar deliveries: (sender, accepted recipients, message) per message
        accepted, the message with dot-stuffing undone.
    @ivar sessions: every L{FakeRelaySession} made.
    @ivar connectTimes: the clock's time at each C{connect}.
    @ivar dsn: the relay offers DSN.
    @ivar reusable: each session can take another message after the first.
    @ivar lostAfterData: the relay hangs up instead of answering the end of
        each message (after its replies to RCPT).
    """

    def __init__(self, clock=None) -> None:
        self.clock = clock
        self.dsn = False
        self.reusable = True
        self.lostAfterData = False
        self.down = False
        self.paused = False
        self.waiting: list = []
        self.replies: dict = {}
        self.deliveries: list = []
        self.sessions: list = []
        self.connectTimes: list = []

    def connect(self):
        if self.clock is not None:
            self.connectTimes.append(self.clock.seconds())
        if self.down:
            return defer.fail(RelayError("connection refused (fake relay is down)"))
        session = FakeRelaySession(self)
        self.sessions.append(session)
        if self.paused:
            waiter = defer.Deferred()
            self.waiting.append((waiter, session))
            return waiter
        return defer.succeed(session)

    def openSessions(self) -> int:
        return sum(1 for session in self.sessions if session.open)


@implementer(IRelaySession)
class FakeRelaySession:
    """A session with L{FakeRelayConnector}; counts its messages."""

    def __init__(self, connector: FakeRelayConnector) -> None:
        self.connector = connector
        self.open = True
        self.messages = 0
        self.dsn = connector.dsn
        self.reusable = True
        self.envelopes: list = []

    def deliver(self, sender, recipients, message, size, body8bit, envelope=None):
        self.envelopes.append(envelope)
        data = message.read()
        self.messages += 1
        self.reusable = self.connector.reusable
        results = {}
        for recipient in recipients:
            queued = self.connector.replies.get(recipient)
            reply = queued.pop(0) if queued else RelayReply(250, ("250 2.0.0 Ok",))
            results[recipient] = reply
        accepted = tuple(r for r in recipients if results[r].code // 100 == 2)
        if self.connector.lostAfterData:
            self.open = False
            error = RelayError("connection lost after the message")
            error.refused = {r: reply for r, reply in results.items() if reply.code // 100 == 5}
            return defer.fail(error)
        if accepted:
            self.connector.deliveries.append((sender, accepted, unstuff(data)))
        return defer.succeed(results)

    def close(self):
        self.open = False
        return defer.succeed(None)

    def abort(self):
        self.open = False
        return defer.succeed(None)


@implementer(IForwardQueue)
class MemoryQueue:
    """
    A forward queue in memory: records what is queued.

    @ivar writers: every L{MemoryQueueWriter} made, in order.
    @ivar messages: queue ID to (sender, recipients, message) of each
        committed message.
    """

    def __init__(self) -> None:
        self.writers: list = []
        self.messages: dict = {}

    def newMessage(self, msgid, sender, recipients, options=None):
        if not recipients:
            raise ValueError("a message needs at least one recipient")
        if msgid in self.messages or any(w.msgid == msgid and not w.aborted for w in self.writers):
            raise ValueError(f"message {msgid} is already queued")
        writer = MemoryQueueWriter(self, msgid, sender, recipients, options)
        self.writers.append(writer)
        return writer


@implementer(IMessageSink)
class MemoryQueueWriter:
    """
    One message being written to a L{MemoryQueue}.

    @ivar recipients: the recipient addresses.
    @ivar statuses: their L{RecipientStatus}, with NOTIFY and ORCPT.
    @ivar options: the L{MessageOptions} it was queued with.
    """

    def __init__(self, queue: MemoryQueue, msgid, sender, recipients, options=None) -> None:
        self.queue = queue
        self.statuses = [recipientStatus(r) for r in recipients]
        self.msgid, self.sender = msgid, sender
        self.recipients = [r.address for r in self.statuses]
        self.options = options or MessageOptions()
        self.data = b""
        self.prepared = self.committed = self.aborted = False

    def write(self, chunk):
        self.data += chunk

    def prepend(self, header):
        self.data = header + self.data

    def prepare(self):
        if self.aborted or self.committed:
            raise ValueError(f"message {self.msgid} cannot be prepared now")
        self.prepared = True

    def commit(self):
        if not self.prepared:
            self.prepare()
        self.committed = True
        self.queue.messages[self.msgid] = (self.sender, tuple(self.recipients), self.data)
        return self.msgid

    def abort(self):
        self.aborted = True
        self.queue.messages.pop(self.msgid, None)
