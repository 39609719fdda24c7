"""
Dovecot's C{allow_nets} and C{allow_real_nets} extra fields: the networks a
login may log in from, read from the users file and checked at each login.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional, Union

import attrs

from mailauth.throttle import clientIP

#: The field checked against the client's address: the one a PROXY header
#: named, else the connection's peer.
ALLOW_NETS = "allow_nets"

#: The field checked against the connection's own peer: the proxy behind a
#: PROXY header, else the client.
ALLOW_REAL_NETS = "allow_real_nets"

FIELDS = (ALLOW_NETS, ALLOW_REAL_NETS)

#: The keyword that matches a connection without an IP address (a UNIX
#: socket), as in Dovecot; a TCP client never matches it.
LOCAL = "local"

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class NetworkListError(ValueError):
    """A C{allow_nets} value that cannot be read; the message says why."""


def hostAddress(host: Optional[str]) -> Optional[IPAddress]:
    """
    The IP address C{host} names, without a scope (C{fe80::1%eth0}), and
    an IPv4 client of a dual-stack socket (C{::ffff:192.0.2.1}) as its IPv4
    address; L{None} for anything that is not an IP address (C{"local"}, a
    UNIX socket's path, L{None}).
    """
    if not host:
        return None
    return clientIP(host.partition("%")[0])


@attrs.frozen
class Origin:
    """
    Where a login comes from, as its session saw it: what the credentials
    carry to the checker (L{mailauth.interfaces.ILoginOrigin}).

    @ivar client: the client's IP address (the one a PROXY header named,
        else the connection's peer), or L{None} if it has none (a UNIX
        socket).
    @ivar real: the IP address of the connection's own peer (the proxy's
        behind a PROXY header, else the client's), or L{None}.
    """

    client: Optional[IPAddress]
    real: Optional[IPAddress]

    @classmethod
    def of(cls, client: Optional[str], real: Optional[str]) -> Origin:
        """The origin of the hosts C{client} and C{real}, as L{hostAddress} reads them."""
        return cls(hostAddress(client), hostAddress(real))


@attrs.frozen
class Networks:
    """
    The value of one C{allow_nets} or C{allow_real_nets} field.

    @ivar networks: the IP networks (a single address is a /32 or /128).
    @ivar local: whether C{local} was listed: a connection without an IP
        address is allowed.
    """

    networks: tuple[IPNetwork, ...]
    local: bool = False

    def __str__(self) -> str:
        """The field's value, as Dovecot writes it: C{10.0.0.0/8,local}."""
        return ",".join([str(n) for n in self.networks] + ([LOCAL] if self.local else []))

    @classmethod
    def parse(cls, value: str) -> Networks:
        """
        Read a comma-separated list of IPv4 and IPv6 addresses, networks
        (C{10.0.0.0/8}, C{2001:db8::/32}; host bits may be set, as Dovecot
        allows) and the keyword C{local}.

        @raise NetworkListError: for an empty list or an entry that is none
            of these: one bad entry spoils the whole field, never widening
            what it allows.
        """
        networks = []
        local = False
        # Dovecot skips empty entries (a doubled or trailing comma).
        entries = [entry for entry in value.split(",") if entry]
        if not entries:
            raise NetworkListError("lists no network")
        for entry in entries:
            if entry == LOCAL:
                local = True
                continue
            try:
                if "%" in entry:
                    raise ValueError(entry)
                networks.append(unmappedNetwork(ipaddress.ip_network(entry, strict=False)))
            except ValueError:
                raise NetworkListError(
                    f"{entry[:64]!r} is not an IP address, a network or {LOCAL!r}"
                ) from None
        return cls(tuple(networks), local)

    def allows(self, ip: Optional[IPAddress]) -> bool:
        """Whether a login from C{ip} (L{None}: no IP address) is allowed."""
        if ip is None:
            return self.local
        return any(ip in network for network in self.networks)


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def unmappedNetwork(network: IPNetwork) -> IPNetwork:
    """
    C{network} as the clients it holds are matched: clients named as
    IPv4-mapped IPv6 addresses are matched as IPv4 (L{hostAddress}), so an
    IPv4-mapped network (C{::ffff:10.0.0.0/104}) is its IPv4 network
    (C{10.0.0.0/8}); one wider than the mapped block stays as it is.
    """
    if network.version == 6 and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def refusal(user: Any, origin: Optional[Origin]) -> Optional[tuple[str, str]]:
    """
    Why C{user} may not log in from C{origin}, or L{None} if it may.

    @param user: a L{mailauth.userdb.User}: its C{allowNets} and
        C{allowRealNets} (L{None}: no restriction) must both allow it.
    @param origin: where the login comes from; L{None} if that is not
        known, which no restriction allows.
    @return: the field that refuses, and why (Dovecot's words: C{"IP
        203.0.113.9 not in allowed networks"}), for the log.
    """
    for field, allowed, attribute in (
        (ALLOW_NETS, user.allowNets, "client"),
        (ALLOW_REAL_NETS, user.allowRealNets, "real"),
    ):
        if allowed is None:
            continue
        if origin is None:
            return field, "the client's address is not known"
        ip = getattr(origin, attribute)
        if not allowed.allows(ip):
            if ip is None:
                return field, f"no IP address (a local connection), and {LOCAL!r} is not listed"
            return field, f"IP {ip} not in allowed networks"
    return None
