"""In-memory fakes implementing the same interfaces as the real parts of mailauth."""

from __future__ import annotations

from typing import Optional

from zope.interface import implementer

from mailauth.userdb import IUserDatabase, User, UserDatabaseUnavailable, parseUsers


@implementer(IUserDatabase)
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

    def load(self) -> None:
        if self.source is None:
            return
        self._loaded = dict(self.source)
        text = "\n".join(f"{login}:{stored}" for login, stored in self._loaded.items())
        self._users, self.problems = parseUsers(text, self.path)

    def maybeReload(self) -> bool:
        if self.source is None or self.source == self._loaded:
            return False
        self.load()
        return True

    def _current(self) -> dict[str, User]:
        if self._users is None:
            raise UserDatabaseUnavailable("the users were never loaded")
        return self._users

    def lookup(self, login: str) -> Optional[User]:
        return self._current().get(login.lower())

    def exists(self, login: str) -> bool:
        return self.lookup(login) is not None

    def logins(self) -> list[str]:
        return sorted(self._current())


# The forward queue's collaborators: local delivery and the relay.

from twisted.internet import defer as _defer  # noqa: E402

from mailauth.queue import unstuff as _unstuff  # noqa: E402
from mailauth.relay import (  # noqa: E402
    IRelayConnector,
    IRelaySession,
    RelayError,
    SMTPReply,
)


class RecordingLocalDelivery:
    """
    The local delivery the queue service uses for bounces to local senders:
    addresses in C{domains} are local; C{deliver} records the message.

    @ivar delivered: (recipient, message) pairs, in order.
    @ivar failures: address to a list of exceptions, raised one per
        delivery to it before it succeeds.
    """

    def __init__(self, domains=("example.org",)) -> None:
        self.domains = frozenset(domains)
        self.delivered: list = []
        self.failures: dict = {}

    def isLocal(self, address: str) -> bool:
        return address.rpartition("@")[2].lower() in self.domains

    def deliver(self, recipient: str, message: bytes):
        failures = self.failures.get(recipient)
        if failures:
            return _defer.fail(failures.pop(0))
        self.delivered.append((recipient, message))
        return _defer.succeed(None)


@implementer(IRelayConnector)
class FakeRelayConnector:
    """
    A relay in memory.

    @ivar down: C{connect} fails, as with a relay that is down.
    @ivar paused: C{connect} returns a Deferred the test fires, from
        C{waiting} (pairs of Deferred and session).
    @ivar replies: address to a list of L{SMTPReply}s used one per attempt
        for it, then 250.
    @ivar deliveries: (sender, accepted recipients, message) per message
        accepted, the message with dot-stuffing undone.
    @ivar sessions: every L{FakeRelaySession} made.
    @ivar connectTimes: the clock's time at each C{connect}.
    """

    def __init__(self, clock=None) -> None:
        self.clock = clock
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
            return _defer.fail(RelayError("connection refused (fake relay is down)"))
        session = FakeRelaySession(self)
        self.sessions.append(session)
        if self.paused:
            waiter = _defer.Deferred()
            self.waiting.append((waiter, session))
            return waiter
        return _defer.succeed(session)

    def openSessions(self) -> int:
        return sum(1 for session in self.sessions if session.open)


@implementer(IRelaySession)
class FakeRelaySession:
    """A session with L{FakeRelayConnector}; counts its messages."""

    def __init__(self, connector: FakeRelayConnector) -> None:
        self.connector = connector
        self.open = True
        self.messages = 0

    def deliver(self, sender, recipients, message, size, body8bit):
        data = message.read()
        self.messages += 1
        results = {}
        for recipient in recipients:
            queued = self.connector.replies.get(recipient)
            reply = queued.pop(0) if queued else SMTPReply(250, ("250 2.0.0 Ok",))
            results[recipient] = reply
        accepted = tuple(r for r in recipients if results[r].code // 100 == 2)
        if accepted:
            self.connector.deliveries.append((sender, accepted, _unstuff(data)))
        return _defer.succeed(results)

    def close(self):
        self.open = False
        return _defer.succeed(None)

    def abort(self):
        self.open = False
        return _defer.succeed(None)
