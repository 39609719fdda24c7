"""Brute-force throttling: failed logins counted per client address and per login."""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from typing import Deque, Optional

from twisted.logger import Logger

from mailauth import replies

log = Logger(namespace="mailauth.esmtp")

# The longest a single 535 reply is held back, however many failures.
MAX_DELAY = 30.0
# Logins are counted under at most this many characters: a real one is an
# address (RFC 5321: at most 254), while an AUTH line may carry 9 KB of
# login, and the throttle must not keep thousands of those.
MAX_LOGIN_KEY = 256


def addressKey(host: str) -> str:
    """
    The key that client address C{host} is counted under: the address
    itself for IPv4, its /64 for IPv6 (one subscriber usually holds a whole
    /64, so counting single IPv6 addresses would let one attacker rotate
    through billions of keys).
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class _Window:
    """
    Failure timestamps per key within a sliding window, for at most
    C{maxKeys} keys (least recently failed dropped first) and at most
    C{maxEvents} timestamps per key: memory stays bounded whatever an
    attacker does.
    """

    def __init__(self, window: float, maxEvents: int, maxKeys: int) -> None:
        self._window = window
        self._maxEvents = maxEvents
        self._maxKeys = maxKeys
        self._events: OrderedDict[str, Deque[float]] = OrderedDict()

    def add(self, key: str, now: float) -> int:
        """Record a failure for C{key} at C{now}; return its count in the window."""
        events = self._events.pop(key, None)
        if events is None:
            events = deque(maxlen=self._maxEvents)
        events.append(now)
        self._prune(events, now)
        self._events[key] = events
        while len(self._events) > self._maxKeys:
            self._events.popitem(last=False)
        return len(events)

    def _prune(self, events: Deque[float], now: float) -> None:
        while events and events[0] <= now - self._window:
            events.popleft()

    def __len__(self) -> int:
        return len(self._events)


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

    @ivar clock: an L{IReactorTime} provider.
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
    ) -> None:
        self.clock = clock
        self._maxPerAddress = maxPerAddress
        self._maxPerLogin = maxPerLogin
        self._tarpitDelay = tarpitDelay
        self._blockTime = blockTime
        self._maxTracked = maxTracked
        self._addresses = _Window(window, maxPerAddress, maxTracked)
        self._logins = _Window(window, maxPerLogin * 4, maxTracked)
        self._blocked: OrderedDict[str, float] = OrderedDict()

    @classmethod
    def fromConfig(cls, clock, auth) -> AuthThrottle:
        """Build from an L{mailauth.config.AuthConfig}."""
        return cls(
            clock,
            window=auth.failure_window,
            maxPerAddress=auth.max_failures_per_address,
            maxPerLogin=auth.max_failures_per_login,
            tarpitDelay=auth.tarpit_delay,
            blockTime=auth.block_time,
            maxTracked=auth.max_tracked,
        )

    def isBlocked(self, host: str) -> bool:
        """Whether connections and logins from C{host} are refused now."""
        key = addressKey(host)
        until = self._blocked.get(key)
        if until is None:
            return False
        if until <= self.clock.seconds():
            del self._blocked[key]
            return False
        return True

    def failure(self, host: str, login: str) -> float:
        """
        Record a failed login for C{login} from C{host}.

        @return: how many seconds to wait before answering the failure.
        """
        now = self.clock.seconds()
        key = addressKey(host)
        perAddress = self._addresses.add(key, now)
        perLogin = self._logins.add(login[:MAX_LOGIN_KEY].lower(), now)
        if perAddress >= self._maxPerAddress:
            self._blocked.pop(key, None)
            self._blocked[key] = now + self._blockTime
            while len(self._blocked) > self._maxTracked:
                self._blocked.popitem(last=False)
        excess = max(perAddress - self._maxPerAddress // 2, perLogin - self._maxPerLogin + 1, 0)
        return min(excess * self._tarpitDelay, MAX_DELAY)

    def trackedKeys(self) -> int:
        """How many addresses, logins and blocks are held in memory."""
        return len(self._addresses) + len(self._logins) + len(self._blocked)


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
        if self.count >= self.total:
            log.info("refused client={client}: too many connections", client=host)
            return replies.TOO_MANY_CONNECTIONS
        if self.byAddress.get(key, 0) >= self.perAddress:
            log.info("refused client={client}: too many connections from it", client=host)
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
