"""Brute-force throttling: failed logins counted per client address and per login."""

from __future__ import annotations

import ipaddress
from typing import Callable, Optional, Union

from twisted.internet import defer
from twisted.logger import Logger

from mailauth import replies
from mailauth.addresses import normalise
from mailauth.counters import MemoryCounterStore
from mailauth.interfaces import ICounterStore

log = Logger(namespace="mailauth.esmtp")

# The longest a single 535 reply is held back, however many failures.
MAX_DELAY = 30.0
# Logins are counted under at most this many characters: a real one is an
# address (RFC 5321: at most 254), while an AUTH line may carry 9 KB of
# login, and the throttle must not keep thousands of those.
MAX_LOGIN_KEY = 256

# What the throttle's keys start with in the counter store, which it shares
# with the sending limits (mailauth.limits).
ADDRESS_PREFIX = "auth-address:"
LOGIN_PREFIX = "auth-login:"


IP = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def unmapped(ip: IP) -> IP:
    """
    C{ip} as mailauth takes a client: an IPv4 client of a dual-stack socket,
    or of a proxy that names it so (C{::ffff:192.0.2.1}; HAProxy does for
    C{bind :::587 v4v6}), is its IPv4 address, as Postfix takes it.
    """
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def clientIP(host: str) -> Optional[IP]:
    """
    The IP address C{host} names, L{unmapped}; L{None} if it names none
    (a UNIX socket's path).
    """
    try:
        return unmapped(ipaddress.ip_address(host))
    except ValueError:
        return None


def clientAddress(host: str) -> str:
    """
    Client address C{host} as it is logged and written into C{Received:}:
    an IPv4-mapped IPv6 address is its IPv4 address (L{unmapped}); anything
    else as it is.
    """
    ip = clientIP(host)
    return host if ip is None or ip.version == 6 else str(ip)


def addressKey(host: str) -> str:
    """
    The key that client address C{host} is counted under: the address
    itself for IPv4, its /64 for IPv6 (one subscriber usually holds a whole
    /64, so counting single IPv6 addresses would let one attacker rotate
    through billions of keys).
    """
    ip = clientIP(host)
    if ip is None:
        return host
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def loginKey(login: str) -> str:
    """
    The key that failures for C{login} are counted under: bounded, and the
    same for every spelling of it that logs in as one user (case, quoting,
    NFC, a trailing dot, the A- or U-label form of its domain: the user
    database finds the user by L{normalise}), so that a guesser cannot
    start the login's count afresh by spelling it another way.
    """
    # Cut before normalising too: an AUTH line may carry 9 KB of login.
    return LOGIN_PREFIX + normalise(login[: 4 * MAX_LOGIN_KEY])[:MAX_LOGIN_KEY]


class AuthThrottle:
    """
    Counts failed logins and decides how long to hold back each 535 reply
    and which client addresses to refuse.

    Failures from one address beyond half its limit are answered ever more
    slowly (tarpit); at the limit the address is refused for C{blockTime}.
    Failures for one login beyond its limit are only slowed down, never
    blocked, so that someone guessing a user's password from elsewhere
    cannot lock the user out of their own address. Successful logins are
    never delayed: only the failure replies are.

    The counts and blocks live in an L{ICounterStore}: this process's memory
    by default, or a Redis shared by every node, so that a brute force
    spread over the nodes is stopped after as many failures as against one.
    Every answer is therefore a L{Deferred}; the memory store answers at
    once. Counted as the old in-memory windows counted: a count never
    exceeds C{maxPerAddress} for an address nor four times C{maxPerLogin}
    for a login.

    @ivar clock: an L{IReactorTime} provider.
    @ivar store: the L{ICounterStore} holding the counts and blocks.
    """

    def __init__(
        self,
        clock,
        window: float,
        maxPerAddress: int,
        maxPerLogin: int,
        tarpitDelay: float,
        blockTime: float,
        maxTracked: int,
        store: Optional[ICounterStore] = None,
        onBlock: Callable[[], None] = lambda: None,
    ) -> None:
        """
        @param maxTracked: without a C{store}, the throttle keeps its own in
            memory, holding at most this many counters and as many blocks.
        @param onBlock: called each time an address starts being blocked
            (a metric).
        """
        self.clock = clock
        self.store = store if store is not None else MemoryCounterStore(clock, maxTracked)
        self._window = window
        self._maxPerAddress = maxPerAddress
        self._maxPerLogin = maxPerLogin
        self._tarpitDelay = tarpitDelay
        self._blockTime = blockTime
        self._onBlock = onBlock

    @classmethod
    def fromConfig(
        cls,
        clock,
        auth,
        store: Optional[ICounterStore] = None,
        onBlock: Callable[[], None] = lambda: None,
    ) -> AuthThrottle:
        """Build from an L{mailauth.config.AuthConfig}, counting in C{store}."""
        return cls(
            clock,
            window=auth.failure_window,
            maxPerAddress=auth.max_failures_per_address,
            maxPerLogin=auth.max_failures_per_login,
            tarpitDelay=auth.tarpit_delay,
            blockTime=auth.block_time,
            maxTracked=auth.max_tracked,
            store=store,
            onBlock=onBlock,
        )

    def isBlocked(self, host: str) -> defer.Deferred[bool]:
        """
        @return: a Deferred firing with whether connections and logins from
            C{host} are refused now.
        """
        return self.store.blocked(ADDRESS_PREFIX + addressKey(host))

    def failure(self, host: str, login: str, session: str = "-") -> defer.Deferred[float]:
        """
        Record a failed login for C{login} from C{host}; block C{host} if
        that reaches its limit.

        @param session: the ID of the session that failed, for the log line
            of a block.
        @return: a Deferred firing, once the failure is counted, with how
            many seconds to wait before answering it.
        """
        address = ADDRESS_PREFIX + addressKey(host)
        d = defer.gatherResults(
            [
                self.store.hit(address, self._window),
                self.store.hit(loginKey(login), self._window),
            ],
            consumeErrors=True,
        )
        d.addErrback(_firstError)
        return d.addCallback(self._counted, address, host, session)

    def delay(self, host: str, login: str) -> defer.Deferred[float]:
        """
        How long a wrong password for C{login} from C{host} would wait now,
        counting nothing: for the failures that are not guesses (the right
        password of a suspended login, a mechanism its stored scheme cannot
        do), so that their 535 comes no sooner than a wrong password's and
        does not tell the guesser which it was.
        """
        d = defer.gatherResults(
            [
                self.store.total(ADDRESS_PREFIX + addressKey(host), self._window),
                self.store.total(loginKey(login), self._window),
            ],
            consumeErrors=True,
        )
        d.addErrback(_firstError)
        return d.addCallback(lambda counts: self._delay(counts[0] + 1, counts[1] + 1))

    def trackedKeys(self) -> int:
        """How many counters and blocks its store holds in this process's memory."""
        return self.store.trackedKeys() if isinstance(self.store, MemoryCounterStore) else 0

    def _delay(self, perAddress: int, perLogin: int) -> float:
        """The tarpit delay of a failure that makes these counts."""
        # The in-memory windows this replaces kept at most this many events.
        perAddress = min(perAddress, self._maxPerAddress)
        perLogin = min(perLogin, self._maxPerLogin * 4)
        excess = max(perAddress - self._maxPerAddress // 2, perLogin - self._maxPerLogin + 1, 0)
        return min(excess * self._tarpitDelay, MAX_DELAY)

    def _counted(self, counts: list, address: str, host: str, session: str):
        delay = self._delay(counts[0], counts[1])
        if counts[0] < self._maxPerAddress:
            return delay

        def blocked(new: bool) -> float:
            # Logged by the one failure, on the one node, that started the
            # block: not by those of sessions that began before it, nor
            # again when a failure past the limit extends it; but anew
            # when one comes after it ended while the window still holds
            # the failures (block_time shorter than failure_window).
            if new:
                log.info(
                    "address blocked: client=[{client}] key={key} failures={failures} "
                    "seconds={seconds:g} session={session}",
                    client=host,
                    key=address[len(ADDRESS_PREFIX) :],
                    failures=counts[0],
                    seconds=self._blockTime,
                    session=session,
                )
                self._onBlock()
            return delay

        return self.store.block(address, self._blockTime).addCallback(blocked)


def _firstError(f):
    """The failure inside a L{defer.FirstError}, so callers see what went wrong."""
    f.trap(defer.FirstError)
    return f.value.subFailure


class ConnectionLimiter:
    """
    Connection counts shared by every listener: at most C{total} at once and
    at most C{perAddress} from one client address, an IPv6 client counted by
    its /64 as the throttle counts it (L{addressKey}).
    """

    def __init__(self, total: int, perAddress: int) -> None:
        self.total = total
        self.perAddress = perAddress
        self.count = 0
        self.byAddress: dict[str, int] = {}

    def acquire(self, host: str) -> Optional[replies.Reply]:
        """
        Count a new connection from C{host}.

        @return: L{None} to serve it, or the 421 that refuses it.
        """
        key = addressKey(host)
        # The session logs and counts the refusal.
        if self.count >= self.total:
            return replies.TOO_MANY_CONNECTIONS
        if self.byAddress.get(key, 0) >= self.perAddress:
            return replies.TOO_MANY_FROM_ADDRESS
        self.count += 1
        self.byAddress[key] = self.byAddress.get(key, 0) + 1
        return None

    def release(self, host: str) -> None:
        key = addressKey(host)
        self.count -= 1
        left = self.byAddress.get(key, 1) - 1
        if left:
            self.byAddress[key] = left
        else:
            self.byAddress.pop(key, None)
