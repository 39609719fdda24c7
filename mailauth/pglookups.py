"""
The daemon's lookups in the PostgreSQL user database (L{mailauth.pgusers}):
one login at a time, off the reactor through adbapi's connection pool, with
a timeout that also frees the pool thread of a connection that hangs.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from typing import Any, Optional

from twisted.application import service
from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailauth.addresses import normalise
from mailauth.interfaces import IUserDatabase
from mailauth.passwords import parse
from mailauth.pgusers import (
    _LOOKUP,
    LOOKUP_TIMEOUT,
    _appPasswords,
    _driver,
    _problem,
    _setTimeout,
    connectionArguments,
    pick,
    redact,
    spellings,
)
from mailauth.userdb import User, UserDatabaseUnavailable

# The same name in the log as the rest of the PostgreSQL user database.
log = Logger(namespace="mailauth.pgusers")


class _Connection(adbapi.Connection):
    """
    adbapi's wrapper of a pooled connection, made quiet about connections
    the server dropped. After a failed query adbapi (with C{cp_reconnect})
    rolls back and tries C{good_sql}, and if that fails logs two tracebacks
    (the second because its own reconnect keeps a connection it has already
    given up when connecting again fails). Here a connection that failed
    (psycopg2 marks it closed) is simply forgotten: the next lookup in this
    thread connects again, and the outage is logged once, by
    L{PostgreSQLUserDatabase}. Nothing else is sent: the lookups run in
    autocommit, so there is nothing to roll back, and C{good_sql} on a
    connection that stopped answering would wait with nothing to cut it.
    """

    def reconnect(self) -> None:
        self._forget()
        self._connection = self._pool.connect()

    def rollback(self) -> None:
        connection = self._connection
        if connection is None or connection.closed:
            self._forget()

    def _forget(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            self._pool.disconnect(connection)


class _ConnectionPool(adbapi.ConnectionPool):
    connectionFactory = _Connection


class _Lookup:
    """
    One lookup's hold on the connection its query runs on, so that a lookup
    that gave up can free the pool thread still waiting on that query.

    A server that stopped answering on a connection that is still open (a
    hung server or proxy, a host gone without a reset) would keep the
    thread in C{recv} until TCP gives up, hours later: after C{cp_max}
    such lookups every login got 454 until a restart. L{cut} shuts the
    socket down under the waiting query, which then fails at once; its
    connection is dropped and the thread's next lookup connects again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socket: Optional[int] = None
        self.gaveUp = False

    def start(self, connection: Any) -> None:
        """(Pool thread.) The query is about to be sent on C{connection}."""
        with self._lock:
            if self.gaveUp:
                raise defer.TimeoutError("the lookup gave up before its query was sent")
            self._socket = connection.fileno()

    def end(self) -> None:
        """(Pool thread.) The query returned or failed."""
        with self._lock:
            self._socket = None

    def cut(self) -> None:
        """
        (Reactor thread.) The lookup gave up. The socket is shut down only
        while the query waits on it: under the lock, so it is still that
        connection's, not a number the system has given to another file.
        """
        with self._lock:
            self.gaveUp = True
            if self._socket is None:
                return
            try:
                with socket.socket(fileno=os.dup(self._socket)) as handle:
                    handle.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@implementer(IUserDatabase)
class PostgreSQLUserDatabase(service.Service):
    """
    The users in the PostgreSQL table C{mailauth.users}, looked up one login
    at a time through a L{adbapi.ConnectionPool} of psycopg2 connections,
    in the pool's own threads.

    A connection that the server dropped (a restart, a failover) is noticed
    by the query that fails on it and replaced at once, and the query sent
    again, so the first login after the server is back works. While the
    server cannot answer, lookups fail with L{UserDatabaseUnavailable}: at
    once when nothing listens, else after C{timeout} seconds, both on the
    server (C{statement_timeout}) and on C{clock}, which also covers a hung
    server or network.

    A user whose stored hash cannot be parsed is logged (once until its hash
    changes) and looked up as nobody, so its logins fail like a wrong
    password: what Dovecot does for a password in an unknown scheme, and
    what the users file does with such a line.

    As a service, it closes its connections when it stops.

    @ivar uri: the libpq URI of the database.
    """

    def __init__(
        self,
        uri: str,
        reactor: Any,
        clock: Any = None,
        timeout: float = LOOKUP_TIMEOUT,
        connections: int = 4,
    ) -> None:
        """
        @param reactor: runs the pool's threads and delivers their results.
        @param clock: measures C{timeout}; C{reactor} by default.
        @param connections: at most this many connections (and lookups at
            once); they are opened when needed.
        @raise UserDatabaseError: if psycopg2 is missing or libpq refuses C{uri}.
        """
        self.uri = uri
        self.clock = clock if clock is not None else reactor
        self.timeout = timeout
        self._shown = redact(uri)
        self._pool = _ConnectionPool(
            "psycopg2",
            cp_reactor=reactor,
            cp_min=1,
            cp_max=connections,
            cp_reconnect=True,
            cp_noisy=False,
            cp_openfun=self._opened,
            **connectionArguments(uri, timeout),
        )
        self._psycopg2 = _driver()
        # login -> SHA-256 of the stored hash that could not be parsed, so
        # that it is logged once, not at every login; never the hash itself,
        # which may be a plaintext password.
        self._malformed: dict[str, bytes] = {}
        # Why the last lookup failed, or None if it worked: logged when it
        # changes, not at every login.
        self._trouble: Optional[str] = None

    def _opened(self, connection: Any) -> None:
        """Set up each new connection (in a pool thread)."""
        connection.autocommit = True
        _setTimeout(connection, self.timeout)

    def stopService(self) -> None:
        """Close the connections and stop the pool's threads."""
        super().stopService()
        self._pool.close()

    def _select(self, connection: Any, candidates: list, lookup: _Lookup) -> Optional[tuple]:
        """
        The user's row (the first of C{candidates} there is: L{spellings}),
        in a pool thread; once more on a new connection if this one died,
        unless the lookup gave up and cut it.
        """
        psycopg2 = self._psycopg2
        for attempt in (1, 2):
            try:
                lookup.start(connection)
                try:
                    with connection.cursor() as cursor:
                        cursor.execute(_LOOKUP, (candidates,))
                        return pick(cursor.fetchall(), candidates)
                finally:
                    lookup.end()
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                if attempt == 2 or not connection.closed or lookup.gaveUp:
                    raise
            connection.reconnect()
        raise AssertionError("not reached")

    def lookup(self, login: str) -> defer.Deferred:
        # The key of the users file (mailauth.addresses.normalise), and the
        # spellings older versions stored.
        candidates = spellings(login)
        # One login, one key, in whatever spelling it was asked for (a
        # malformed stored hash is logged once per login).
        key = normalise(login)
        running = _Lookup()
        d = self._pool.runWithConnection(self._select, candidates, running)
        d.addTimeout(self.timeout, self.clock)
        d.addErrback(_cutOnTimeout, running)
        d.addCallbacks(self._found, self._failed, callbackArgs=(key,))
        return d

    def _found(self, row: Optional[tuple], key: str) -> Optional[User]:
        if self._trouble is not None:
            log.info("User database {uri} answers again", uri=self._shown)
            self._trouble = None
        if row is None:
            self._malformed.pop(key, None)
            return None
        login, stored, suspended, apps = row
        try:
            password = parse(stored)
        except ValueError as e:
            digest = hashlib.sha256(stored.encode("utf-8", "surrogateescape")).digest()
            if self._malformed.get(key) != digest:
                self._malformed[key] = digest
                log.error(
                    "User database {uri}: {login}: {problem}; this login fails until"
                    " its password is set again ('mailauth user passwd')",
                    uri=self._shown,
                    login=login,
                    problem=str(e),
                )
            return None
        self._malformed.pop(key, None)
        return User(
            login,
            password,
            suspended=bool(suspended),
            appPasswords=_appPasswords(login, apps, self._shown),
        )

    def _failed(self, failure: Failure) -> None:
        if failure.check(defer.TimeoutError):
            why = f"{self._shown} did not answer within {self.timeout:g}s"
        elif isinstance(failure.value, self._psycopg2.Error):
            why = _problem(self.uri, failure.value)
        else:
            why = f"{self._shown}: {failure.getErrorMessage()}"
        if why != self._trouble:
            log.error("User database unavailable: {why}; logins get 454 until it answers", why=why)
            self._trouble = why
        raise UserDatabaseUnavailable(why)


def _cutOnTimeout(failure: Failure, lookup: _Lookup) -> Failure:
    if failure.check(defer.TimeoutError):
        lookup.cut()
    return failure
