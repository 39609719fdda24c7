"""
Sending limits per login: messages and recipients per hour and per day,
over sliding windows in the counter store, and suspension of a login that
keeps hitting them (a stolen password stops within minutes).
"""

from __future__ import annotations

import re
from email.utils import formatdate, make_msgid
from typing import Callable, Optional

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailauth import replies
from mailauth.addresses import hashInDomain, normalise, withoutComment
from mailauth.durable import ReloadableFile
from mailauth.interfaces import ICounterStore, IReloadable, IUserDatabase
from mailauth.userdb import UserDatabaseUnavailable, fileLines

log = Logger(namespace="mailauth.limits")

HOUR = 3600.0
DAY = 86400.0
#: How long after suspending a login this process trusts its own word over
#: the user database's, until the database shows the suspension (another
#: process's copy of a users file is re-read every few seconds).
SETTLE = 60.0

# Each limit: what it counts and over how long. Its counter's key in the
# store is "limit:<what>:<period>:<login>"; one key, one window.
_COUNTED = {
    "messages_per_hour": ("messages", "hour", HOUR),
    "messages_per_day": ("messages", "day", DAY),
    "recipients_per_hour": ("recipients", "hour", HOUR),
    "recipients_per_day": ("recipients", "day", DAY),
}
MESSAGE_LIMITS = ("messages_per_hour", "messages_per_day")
RECIPIENT_LIMITS = ("recipients_per_hour", "recipients_per_day")


@attrs.frozen
class Limits:
    """
    One login's limits; 0 means none.

    @ivar suspend_after: suspend the login after this many limit hits in a
        day (a hit: a transaction refused at MAIL, or cut short at RCPT).
    """

    messages_per_hour: int = 0
    recipients_per_hour: int = 0
    messages_per_day: int = 0
    recipients_per_day: int = 0
    suspend_after: int = 0


#: The names of every limit, as C{[limits]} and the overrides file spell them.
KEYS = tuple(field.name for field in attrs.fields(Limits))


def counterKey(limit: str, login: str) -> str:
    """The counter store key of C{limit} for C{login}."""
    what, period, _ = _COUNTED[limit]
    return f"limit:{what}:{period}:{login}"


def hitsKey(login: str) -> str:
    """The counter store key of C{login}'s limit hits (over a day)."""
    return f"limit:hits:day:{login}"


def parseOverrides(text: str, path: str) -> tuple[dict[str, dict[str, int]], list[str]]:
    """
    Parse an overrides file: C{login: key=value [key=value...]} lines, the
    keys those of L{Limits} (a whole number, 0 for no limit); comments as
    in L{mailauth.addresses.withoutComment}. A malformed line
    is skipped, never fatal for the others; of two lines for one login the
    first counts.

    @return: the overrides by login (its L{normalise} key), and a C{"PATH:LINENO:
        message"} line per line skipped.
    """
    found: dict[str, dict[str, int]] = {}
    problems = []
    for lineno, raw in enumerate(fileLines(text), 1):
        line = withoutComment(raw).strip()
        if not line:
            continue
        login, colon, rest = line.partition(":")
        login = login.strip().lower()
        where = f"{path}:{lineno}"
        hashed = hashInDomain([login])
        if hashed is not None:
            problems.append(f"{where}: {hashed}")
            continue
        if not colon or not re.fullmatch(r"[^\s@]+@[^\s@]+", login):
            problems.append(f"{where}: expected 'login@domain: key=value [key=value...]'")
            continue
        # Under the key the user database finds the login by, so that any
        # spelling of it (a U-label domain, quotes) applies to its user.
        login = normalise(login)
        values: dict[str, int] = {}
        for word in rest.replace(",", " ").split():
            key, equals, value = word.partition("=")
            if key not in KEYS:
                problems.append(f"{where}: unknown limit {key!r} (known: {', '.join(KEYS)})")
                break
            if not equals or not value.isdigit() or len(value) > 12:
                problems.append(f"{where}: {key} needs a whole number, as in {key}=100")
                break
            values[key] = int(value)
        else:
            if not values:
                problems.append(f"{where}: no key=value after the login")
            elif login in found:
                problems.append(f"{where}: {login} given again; the first line counts")
            else:
                found[login] = values
    return found, problems


@implementer(IReloadable)
class LimitOverrides(ReloadableFile):
    """
    The C{[limits] overrides} file: per-login limits for bulk senders, over
    the defaults of C{[limits]}. Re-read when it changes; a file that
    cannot be read keeps what was read before.
    """

    def __init__(self, path: Optional[str]) -> None:
        super().__init__(path)
        self._overrides: dict[str, dict[str, int]] = {}
        self.load()

    def load(self) -> bool:
        if self.file is None:
            return False
        try:
            text = self.file.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            if self.reportable():
                log.error(
                    "cannot read sending limit overrides {path}: {why}; keeping those read before",
                    path=self.path,
                    why=e,
                )
            return False
        self._overrides, self.problems = parseOverrides(text, str(self.path))
        for problem in self.problems:
            log.warn("sending limit overrides: skipped {problem}", problem=problem)
        return True

    def get(self, login: str) -> dict[str, int]:
        """The limits C{login} overrides, by name."""
        if not self._overrides:
            return {}  # no file, or no line: no address to normalise
        return self._overrides.get(normalise(login), {})


@attrs.frozen
class _Suspension:
    """
    A suspension this process made: when, and whether the user database
    has shown it since.
    """

    at: float
    seen: bool = False


class SendingLimits:
    """
    Counts each login's accepted messages and recipients in an
    L{ICounterStore} (memory, or a Redis shared by every node), refuses
    MAIL and RCPT over a limit with C{451 4.7.1}, and suspends a login after
    C{suspend_after} hits in a day: through C{suspend} (the user store's
    C{setSuspended}, off the reactor), with one warning logged and one
    notice to the postmaster.

    Counts are taken when a message is accepted (the 250 after DATA), for
    the recipients it was accepted for, never for a message refused or
    lost; checks at MAIL and RCPT include the recipients this transaction
    already has. Two sessions of one login sending at the same instant can
    each pass a check the other's message then fills: a limit may be passed
    by the messages in flight at once, never more.

    A login found suspended at MAIL (by this, or by C{mailauth user
    suspend} while its session was open) is refused there too.
    """

    def __init__(
        self,
        *,
        store: ICounterStore,
        defaults: Limits,
        overrides: LimitOverrides,
        users: IUserDatabase,
        suspend: Optional[Callable[[str], defer.Deferred]] = None,
        postmaster: Optional[str] = None,
        deliver: Optional[Callable[[str, bytes], defer.Deferred]] = None,
        hostname: str = "localhost",
        clock,
        metrics,
    ) -> None:
        """
        @param suspend: called with a login to suspend it; a Deferred.
        @param postmaster: the address told of each suspension, if any.
        @param deliver: called with an address and a whole message (CRLF
            line ends) to send it there from the null sender; a Deferred.
        @param metrics: a L{mailauth.metrics.Metrics}.
        """
        self.store = store
        self.defaults = defaults
        self.overrides = overrides
        self.users = users
        self.suspend = suspend
        self.postmaster = postmaster
        self.deliver = deliver
        self.hostname = hostname
        self.clock = clock
        self.metrics = metrics
        # When this process suspended each login, and whether the user
        # database has shown it suspended since: until it has, for SETTLE
        # seconds, its lookups are not believed; once it has, a login it
        # shows not suspended was resumed (mailauth user resume).
        self._suspensions: dict[str, _Suspension] = {}

    def limitsFor(self, login: str) -> Limits:
        """The limits of C{login}: the defaults, with its overrides."""
        overridden = self.overrides.get(login)
        return attrs.evolve(self.defaults, **overridden) if overridden else self.defaults

    def transaction(self, login: str) -> LimitedTransaction:
        """What one mail transaction of C{login} asks and records."""
        return LimitedTransaction(self, login.lower())

    def exceeded(self, login: str, names: tuple, adding: int) -> defer.Deferred:
        """
        The first limit of C{names} that C{adding} more would pass, with
        the count so far; L{None} if none (at once, asking the store
        nothing, when C{login} has none of C{names}: every MAIL and RCPT
        of a server without limits comes here).
        """
        limits = self.limitsFor(login)
        active = [name for name in names if getattr(limits, name)]
        if not active:
            return defer.succeed(None)
        return self._exceeded(login, limits, active, adding)

    @defer.inlineCallbacks
    def _exceeded(self, login: str, limits: Limits, active: list, adding: int):
        counts = yield defer.gatherResults(
            [self.store.total(counterKey(name, login), _COUNTED[name][2]) for name in active],
            consumeErrors=True,
        )
        for name, count in zip(active, counts):
            if count + adding > getattr(limits, name):
                return name, count
        return None

    @defer.inlineCallbacks
    def refuse(self, transaction: LimitedTransaction, limit: str, count: int):
        """Log and count a refusal by C{limit}; maybe suspend; return the reply to raise."""
        login = transaction.login
        limits = self.limitsFor(login)
        what, period, _ = _COUNTED[limit]
        log.info(
            "sending limit reached: login=<{login}> limit={limit} count={count} max={max} "
            "session={session}",
            login=login,
            session=transaction.session,
            limit=limit,
            count=count,
            max=getattr(limits, limit),
        )
        self.metrics.limitHit(limit)
        if not transaction.hit:
            transaction.hit = True
            hits = yield self.store.hit(hitsKey(login), DAY)
            after = limits.suspend_after
            if after and hits >= after and (yield self._suspendable(login)):
                if login not in self._suspensions:
                    yield self._suspend(login, hits, limit, transaction.session)
        reply = replies.LIMIT_MESSAGES if what == "messages" else replies.LIMIT_RECIPIENTS
        return reply.error(login=login, max=getattr(limits, limit), period=period)

    @defer.inlineCallbacks
    def _suspendable(self, login: str):
        """
        Whether C{login} should be suspended now: it is not already (as the
        user database says, or by this process within L{SETTLE} seconds and
        not yet shown by the database). A suspension that failed, or that an
        administrator lifted, is thus made again at the next hit past
        C{suspend_after}, even right after it was made.
        """
        if self.suspend is None:
            return False
        now = self.clock.seconds()
        for name, suspension in list(self._suspensions.items()):
            if now - suspension.at >= SETTLE:
                del self._suspensions[name]
        try:
            user = yield self.users.lookup(login)
        except UserDatabaseUnavailable:
            return False  # tried again at the next hit
        mine = self._suspensions.get(login)
        if user is not None and user.suspended:
            if mine is not None:
                self._suspensions[login] = attrs.evolve(mine, seen=True)
            return False
        if mine is not None and not mine.seen:
            return False  # suspended here; the database does not show it yet
        self._suspensions.pop(login, None)
        return user is not None

    @defer.inlineCallbacks
    def _suspend(self, login: str, hits: int, limit: str, session: str):
        assert self.suspend is not None
        # Taken now, so that a hit of another session meanwhile waits its turn.
        self._suspensions[login] = _Suspension(self.clock.seconds())
        try:
            yield self.suspend(login)
        except Exception as e:
            del self._suspensions[login]
            log.error(
                "could not suspend login=<{login}> after {hits} sending limit hits today: {why} "
                "session={session}",
                login=login,
                hits=hits,
                why=e,
                session=session,
            )
            return
        yield self._reread(login)
        log.warn(
            "login suspended: login=<{login}> after {hits} sending limit hits today "
            "(last: {limit}); 'mailauth user resume {login}' lifts it session={session}",
            login=login,
            hits=hits,
            limit=limit,
            session=session,
        )
        if self.postmaster is None or self.deliver is None:
            return
        try:
            yield self.deliver(self.postmaster, self.notice(login, hits, limit))
        except Exception:
            log.failure(
                "could not send the postmaster the suspension notice of <{login}>", login=login
            )

    @defer.inlineCallbacks
    def _reread(self, login: str):
        """
        After this process suspended C{login}: read the users file again
        now (not at its next check, seconds later), so that the login's
        next AUTH and its open sessions' next MAIL are refused at once; and
        note whether the database shows the suspension.
        """
        if IReloadable.providedBy(self.users):
            try:
                self.users.maybeReload()
            except Exception:
                log.failure("reading the users file again after suspending <{login}>", login=login)
        try:
            user = yield self.users.lookup(login)
        except UserDatabaseUnavailable:
            return
        mine = self._suspensions.get(login)
        if user is not None and user.suspended and mine is not None:
            self._suspensions[login] = attrs.evolve(mine, seen=True)

    def notice(self, login: str, hits: int, limit: str) -> bytes:
        """The message telling L{postmaster} that C{login} was suspended."""
        limits = self.limitsFor(login)
        shown = ", ".join(
            f"{name} = {getattr(limits, name)}" for name in KEYS if getattr(limits, name)
        )
        lines = [
            f"From: Mail Delivery System <MAILER-DAEMON@{self.hostname}>",
            f"To: <{self.postmaster}>",
            f"Subject: mailauth: login {login} suspended",
            f"Date: {formatdate(self.clock.seconds(), localtime=True)}",
            f"Message-ID: {make_msgid('suspended', self.hostname)}",
            "Auto-Submitted: auto-generated",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "",
            f"mailauth on {self.hostname} has suspended the login {login}:",
            f"it reached its sending limits {hits} times within a day (the last",
            f"one: {limit}). Its limits: {shown}.",
            "",
            "Until the suspension is lifted it cannot log in (535), and open",
            "sessions cannot start new messages. A login that suddenly sends",
            "this much is often a stolen password: change it, then run",
            "",
            f"    mailauth user resume {login}",
            "",
        ]
        return "\r\n".join(lines).encode("utf-8")


class LimitedTransaction:
    """
    One mail transaction of a login, as the sending limits see it.

    @ivar hit: whether a limit refused something in this transaction
        already (a transaction counts as one hit towards suspension however
        many of its recipients are refused).
    """

    def __init__(self, limits: SendingLimits, login: str) -> None:
        self.limits = limits
        self.login = login
        self.hit = False
        #: The SMTP session's ID, for the log lines.
        self.session = ""

    def checkSender(self) -> defer.Deferred:
        """
        At MAIL: a Deferred that fails with an L{replies.SMTPReply} if the
        login is suspended (5.7.1) or has reached a message limit (4.7.1).
        """
        d = defer.maybeDeferred(self.limits.users.lookup, self.login)
        d.addCallbacks(self._notSuspended, self._unknown)
        return d

    def _unknown(self, f):
        f.trap(UserDatabaseUnavailable)
        # The limits still hold; AUTH checked suspension.
        return self._notSuspended(None)

    def _notSuspended(self, user) -> defer.Deferred:
        if user is not None and user.suspended:
            log.info(
                "sender refused: login=<{login}> is suspended session={session}",
                login=self.login,
                session=self.session,
            )
            raise replies.SENDING_SUSPENDED.error(login=self.login)
        return self.limits.exceeded(self.login, MESSAGE_LIMITS, 1).addCallback(self._refuseOver)

    def checkRecipient(self, accepted: int) -> defer.Deferred:
        """
        At RCPT, with C{accepted} recipients already in this transaction: a
        Deferred that fails with an L{replies.SMTPReply} (4.7.1) if one more
        would pass a recipient limit.
        """
        d = self.limits.exceeded(self.login, RECIPIENT_LIMITS, accepted + 1)
        return d.addCallback(self._refuseOver)

    def _refuseOver(self, over: Optional[tuple]) -> Optional[defer.Deferred]:
        """Nothing if no limit is C{over}; else log and count the refusal, and fail with it."""
        if over is None:
            return None

        def fail(error: Exception):
            raise error

        return self.limits.refuse(self, *over).addCallback(fail)

    def record(self, recipients: int) -> defer.Deferred:
        """
        Count one message accepted for C{recipients} recipients (after it
        was stored, before its 250), under each limit the login has now.
        Never fails: a count that cannot be made is logged, and the message
        stays accepted.
        """
        store = self.limits.store
        limits = self.limits.limitsFor(self.login)
        # Only what limits this login now: no counters for logins without.
        counts = [
            store.hit(
                counterKey(name, self.login),
                _COUNTED[name][2],
                1 if name in MESSAGE_LIMITS else recipients,
            )
            for name in MESSAGE_LIMITS + RECIPIENT_LIMITS
            if getattr(limits, name)
        ]
        if not counts:
            return defer.succeed(None)
        d = defer.gatherResults(counts, consumeErrors=True)
        d.addCallbacks(lambda ignored: None, self._countFailed)
        return d

    def _countFailed(self, f) -> None:
        if f.check(defer.FirstError):
            f = f.value.subFailure
        log.failure("could not count a message of <{login}>", f, login=self.login)
