"""
Dovecot's C{allow_nets} and C{allow_real_nets} extra fields: the networks a
login may log in from, read from the users file and checked at each login.
"""

from __future__ import annotations

import ipaddress
from typing import Optional, Union

import attrs

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def hostAddress(host: Optional[str]) -> Optional[IPAddress]:
    """
    The IP address C{host} names, without a scope (C{fe80::1%eth0}), and
    an IPv4 client of a dual-stack socket (C{::ffff:192.0.2.1}) as its IPv4
    address; L{None} for anything that is not an IP address (C{"local"}, a
    UNIX socket's path, L{None}).
    """
    if not host:
        return None
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


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
