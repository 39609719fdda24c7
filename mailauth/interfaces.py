"""
The seams between mailauth's parts, declared once.

Each real part and each in-memory fake (C{tests/fakes.py}) declares which of
these it implements; C{verifyObject} checks them in the tests, and every fake
runs the same test suite as the real part it stands for. C{mailauth.tap}
chooses the implementations (users file or PostgreSQL, counters in memory or
in Redis); nothing below it knows which one it got.

Every method documented as returning a L{Deferred} must return one (never a
coroutine: Twisted 22.4's C{maybeDeferred} does not run coroutines,
defect D36 in C{docs/twisted-defects.rst}).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

#: Runs blocking work (file I/O with fsync, password hashes) off the reactor
#: thread: C{runBlocking(f, *args, **kwargs)} returns a L{Deferred} of
#: C{f(*args, **kwargs)}, as L{mailauth.threads.ThreadPoolService.run} does.
#: This one name is used by every part that is handed such a runner.
BlockingRunner = Callable[..., "Deferred[Any]"]


class IMessageSink(Interface):
    """
    Where the bytes of one message go while the session receives it: a
    Maildir writer, a queue writer. The session calls L{write} on the reactor
    thread, maybe L{prepend} (in a thread), then exactly one of L{commit}
    (in a thread) or L{abort}.
    """

    def write(chunk: bytes) -> None:
        """
        Take the next chunk of the message, in canonical SMTP form (CRLF line
        ends, dot-stuffing undone). A chunk may end anywhere, even between CR
        and LF.

        @raise OSError: if it cannot be stored; the message is then aborted.
        """

    def prepend(header: bytes) -> None:
        """
        Blocking: put C{header} (whole header fields in canonical form, each
        ending in CRLF) on top of the message written so far, as readers of
        the stored message will see it (below the fields of final delivery
        a Maildir puts first, C{Return-Path:}). Called after the last
        L{write} and before L{prepare}, for a header made once the whole
        message was seen (a DKIM signature); each call goes on top of the
        last. A large message is not read back into memory for it.

        @raise OSError: if it cannot be stored; the message is then aborted.
        """

    def prepare() -> None:
        """
        Blocking: make everything written durable where nobody sees it yet
        (a Maildir's C{tmp/}, the queue's C{tmp/}), so that L{commit} only
        has to publish it. Called before any sink of the message commits, so
        that one message to several sinks is stored in all or in none.

        @raise OSError: if that fails; L{abort} follows.
        """

    def commit() -> Any:
        """
        Blocking: publish the prepared message (link into C{new/}, rename
        the queue envelope into place) and make the names durable.

        @return: what was stored (a queue ID, the delivered file paths).
        @raise OSError: if that fails; L{abort} follows, and undoes it.
        """

    def abort() -> None:
        """
        Throw the message away, whatever state it is in (written, prepared,
        even committed when another sink of the same message failed to
        commit): every file it made is removed. Never raises.
        """


class ILocalDelivery(Interface):
    """
    Delivery of whole messages to local addresses, through the aliases: what
    the forward queue uses for bounces to local senders.
    """

    def isLocal(address: str) -> bool:
        """Whether C{address} (C{local@domain}) is in one of the local domains."""

    def deliver(recipient: str, message: bytes) -> Deferred[None]:
        """
        Store C{message} (CRLF line ends, not dot-stuffed) for C{recipient}.

        @return: a Deferred that fails with L{mailauth.replies.SMTPReply}
            (5xx if nobody local has that address) or with the storage
            error (temporary).
        """


class IForwardQueue(Interface):
    """The durable queue of mail for other domains, as the realm sees it."""

    def newMessage(msgid: str, sender: str, recipients: list, options: Any = None) -> IMessageSink:
        """
        Start writing a message; cheap, called on the reactor thread.

        @param msgid: its queue ID (letters, digits, C{.}, C{_}, C{-}).
        @param sender: the envelope sender, C{""} for the null sender.
        @param recipients: the recipient addresses, C{local@domain}, or
            their L{mailauth.envelope.RecipientStatus} carrying the NOTIFY
            and ORCPT the client gave.
        @param options: a L{mailauth.envelope.MessageOptions} (SMTPUTF8,
            RET, ENVID), or L{None} for none.
        @raise ValueError: for a bad or used ID, no recipients, or an
            address that cannot be stored.
        """


class IUserDatabase(Interface):
    """
    The users who may log in, as the server reads them: the users file (in
    memory) or a PostgreSQL table. Logins are compared without regard to
    case.
    """

    def lookup(login: str) -> Deferred[Any]:
        """
        @return: a Deferred firing with the L{mailauth.userdb.User} C{login}
            (in any case) or L{None}, or failing with
            L{mailauth.userdb.UserDatabaseUnavailable} when the database
            cannot answer now (the session then says 454, never 535).
        """


class ILoginOrigin(Interface):
    """
    Credentials that say where their login comes from, as the session saw
    it, so that a checker can hold a user to the networks it may log in
    from (Dovecot's C{allow_nets} and C{allow_real_nets}).
    """

    origin = Attribute(
        "A L{mailauth.allownets.Origin} (the client's IP address and the"
        " connection's own peer's), or L{None} if the session did not say:"
        " then no user restricted to some networks may log in."
    )


class IUserStore(Interface):
    """
    Edits of the user database, for the C{mailauth user} commands and for
    changes the daemon makes itself (a rehashed password, a suspension).
    Every method blocks: call it from the command line or in a thread.
    Logins are compared without regard to case.
    """

    def addUser(login: str, hashString: str) -> None:
        """
        Add a user with the password hash C{hashString} (C{{SCHEME}hash}).

        @raise mailauth.userdb.UserDatabaseError: if the login or the hash is
            invalid, or the user exists.
        """

    def setPassword(login: str, hashString: str) -> None:
        """Replace the password hash of C{login}. @raise UserDatabaseError: no such user."""

    def deleteUser(login: str) -> None:
        """Remove C{login}. @raise UserDatabaseError: no such user."""

    def hasUser(login: str) -> bool:
        """Whether C{login} exists (even with a malformed entry)."""

    def listUsers() -> list[tuple[str, str]]:
        """C{(login, scheme)} of every user, in the store's order."""

    def setSuspended(login: str, suspended: bool) -> None:
        """
        Suspend C{login} (its right password then fails with a 535 logged as
        suspended) or lift the suspension. Stored with the user, so it
        survives restarts. @raise UserDatabaseError: no such user.
        """


class IAccountStore(Interface):
    """
    What a user store keeps beside each login's password, and the edits the
    daemon makes after a login: app passwords (with when each was last
    used), the users to list with their suspension, and the rehash of a
    password to today's scheme. Implemented beside L{IUserStore}; every
    method blocks, like its. C{app} arguments are
    L{mailauth.apppasswords.AppPassword}s.
    """

    usesKnown = Attribute(
        "Whether L{listAppPasswords} can tell when each app password was last used."
    )

    def addAppPassword(login: str, label: str, hashString: str, created: int, prefix: str) -> None:
        """
        Give C{login} an app password, hashed as C{hashString}, made at
        C{created} (seconds since the epoch), whose first characters are
        C{prefix} (L{mailauth.apppasswords.AppPassword.prefix}).

        @raise mailauth.userdb.UserDatabaseError: no such user, an invalid
            or taken label, or too many app passwords.
        """

    def deleteAppPassword(login: str, label: str) -> None:
        """Revoke one app password. @raise UserDatabaseError: no such user or label."""

    def listAppPasswords(login: str) -> list[tuple[Any, Optional[float]]]:
        """
        @return: C{(app, lastUsed)} for each app password of C{login}, in
            the order they were made; C{lastUsed} is L{None} if never used.
        @raise UserDatabaseError: no such user.
        """

    def appPasswordUsed(login: str, app: Any, when: float) -> None:
        """Record that C{login} logged in with C{app} at C{when}."""

    def listAccounts() -> list[Any]:
        """
        Every user as a L{mailauth.userdb.User} (login, password hash,
        suspension, app passwords), in the store's order.
        """

    def upgradePassword(login: str, verified: Any, hashString: str) -> bool:
        """
        Store C{hashString} as C{login}'s password if its stored hash is
        still C{verified} (a L{mailauth.passwords.PasswordHash}): a password
        changed since the login was checked is never overwritten.

        @return: whether it was stored.
        """


class IReloadable(Interface):
    """A file read into memory that follows its changes (users, aliases, sender map)."""

    path = Attribute("The file's path, or L{None} if there is no file.")
    problems = Attribute('C{"PATH:LINENO: message"} for every line the last load skipped.')

    def load() -> bool:
        """
        Read the file now. If that fails, keep what was read before and log
        why; never raise.

        @return: whether it was read.
        """

    def maybeReload() -> bool:
        """
        Read the file again if it changed since it was last read, or could
        not be read then (an error is logged once, not at every check).

        @return: whether it was read again.
        """


class ICounterStore(Interface):
    """
    Counters over sliding windows and timed blocks, keyed by strings: the
    brute-force throttle and the sending limits keep their state here. The
    default lives in the process's memory; a shared one (Redis) lets every
    worker and node count together. Updates are atomic: two processes that
    L{hit} one key at once both count.
    """

    def hit(key: str, window: float, amount: int = 1) -> Deferred[int]:
        """
        Record C{amount} events for C{key} now.

        @param window: the length in seconds of the sliding window C{key}
            is counted over; one key is always used with one window.
        @return: a Deferred firing with the total for C{key} within the
            last C{window} seconds, these events included.
        """

    def total(key: str, window: float) -> Deferred[int]:
        """
        @return: a Deferred firing with the total for C{key} within the
            last C{window} seconds.
        """

    def block(key: str, duration: float) -> Deferred[bool]:
        """
        Mark C{key} blocked for the next C{duration} seconds (replacing a
        block it had).

        @return: a Deferred firing with whether it was not blocked before,
            for every process sharing the store: a new block, which one
            of them (the one told so) logs.
        """

    def blocked(key: str) -> Deferred[bool]:
        """@return: a Deferred firing with whether C{key} is blocked now."""


class IRelaySession(Interface):
    """An established, authenticated SMTP session with the relay."""

    dsn = Attribute(
        "Whether the relay takes DSN requests (RFC 3461): it then reports on"
        " the messages it accepts, and the queue no longer does."
    )
    reusable = Attribute(
        "Whether the session can take another message: false once a transaction"
        " that did not end could not be reset, or once the relay has hung up."
    )

    def deliver(
        sender: str,
        recipients: list[str],
        message: Any,
        size: int,
        body8bit: bool,
        envelope: Any = None,
    ) -> Deferred[dict]:
        """
        Send one message.

        @param sender: the envelope sender, C{""} for the null sender.
        @param recipients: the recipients to try.
        @param message: a binary file of the stored message: CRLF line ends,
            dot-stuffed, sent as it is and followed by C{.CRLF}.
        @param size: the message size, announced with C{SIZE=} if offered.
        @param body8bit: the message has 8-bit bytes.
        @param envelope: the message's L{mailauth.envelope.Envelope}, for
            SMTPUTF8 and the DSN parameters, or L{None}.
        @return: a Deferred firing with a dict of recipient to
            L{mailauth.relay.RelayReply} (the RCPT reply if it was refused,
            else the reply at the end of DATA, or the MAIL reply if MAIL
            failed, or one made here for an address the relay cannot
            take), or failing with L{mailauth.relay.RelayError}, after
            which the session is unusable.
        """

    def close() -> Deferred[None]:
        """Say QUIT and disconnect; the Deferred fires once disconnected."""

    def abort() -> Deferred[None]:
        """Drop the connection at once; the Deferred fires once disconnected."""


class IRelayConnector(Interface):
    """Makes sessions with the relay."""

    def connect() -> Deferred[Any]:
        """
        @return: a Deferred firing with an L{IRelaySession}, or failing with
            L{mailauth.relay.RelayError}.
        """


class ISASLMechanism(Interface):
    """
    One SASL exchange of one mechanism (RFC 4422), built per AUTH command.
    The session base64-decodes the client's responses and encodes the
    challenges.
    """

    name = Attribute("The mechanism's name as offered in EHLO, e.g. C{PLAIN}.")

    def start(initial: bytes | None) -> Any:
        """
        Begin the exchange, with the initial response if the client sent one.

        @return: a L{mailauth.sasl.Challenge} to send, or the credentials to
            hand to the portal, or a Deferred of either.
        @raise mailauth.sasl.SASLError: for a malformed response.
        """

    def respond(data: bytes) -> Any:
        """Take the client's next response; returns as L{start} does."""
