"""
The PROXY protocol (HAProxy, v1 and v2) under a listener: the session is
built only once the header has named the real client, so its greeting,
connection limits, throttle, logs and C{Received:} all see the client and
never the proxy.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from typing import Any, Iterable, Optional, Union

import attrs
from twisted.internet import address, interfaces, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from mailauth.allownets import unmappedNetwork
from mailauth.throttle import IP, clientIP, unmapped

log = Logger(namespace="mailauth.proxy")

# The versions each C{proxy_protocol} setting accepts.
VERSIONS = {"v1": frozenset({1}), "v2": frozenset({2}), "any": frozenset({1, 2})}

# Seconds a trusted proxy has to send its whole header (haproxy's
# doc/proxy-protocol.txt: "at least 3 seconds to cover a TCP retransmit").
DEFAULT_TIMEOUT = 10.0

V1_SIGNATURE = b"PROXY "
# The longest v1 line, CRLF included ("PROXY UNKNOWN" with two full IPv6
# addresses and ports).
V1_MAX_LENGTH = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# The largest v2 address block with TLVs taken (the length field allows
# 65535). HAProxy in TCP mode sends at most a few hundred bytes: addresses,
# a unique ID, the SNI, a CRC; more is refused rather than buffered.
V2_MAX_LENGTH = 4096

_PORT = re.compile(r"0|[1-9][0-9]{0,4}")

IPAddress = Union[address.IPv4Address, address.IPv6Address]


class ProxyHeaderError(ValueError):
    """The bytes received are not a header this listener accepts; C{str()} says why."""


@attrs.frozen
class ProxyHeader:
    """
    A complete PROXY header.

    @ivar version: 1 or 2.
    @ivar command: C{"PROXY"}, or C{"LOCAL"} (v2: the proxy's own
        connection, e.g. a health check) or C{"UNKNOWN"} (v1).
    @ivar source: the client's address, or L{None} when the header names
        none (LOCAL, UNKNOWN, or a v2 family other than TCP over IPv4/IPv6):
        the connection's own addresses are used then, as the specification
        says.
    @ivar destination: the address the client connected to, or L{None}.
    @ivar length: how many bytes the header took; what follows is the
        protocol's.
    """

    version: int
    command: str
    source: Optional[IPAddress]
    destination: Optional[IPAddress]
    length: int


def parseHeader(data: bytes, versions: Iterable[int] = (1, 2)) -> Optional[ProxyHeader]:
    """
    Parse the PROXY header at the start of C{data}, which may be incomplete.

    @param versions: the versions accepted.
    @return: the header, or L{None} if C{data} is a valid beginning of one
        but not all of it yet.
    @raise ProxyHeaderError: if C{data} cannot be the beginning of an
        accepted header; as early as the first byte that shows it.
    """
    if data[:1] == V1_SIGNATURE[:1] and data[:6] == V1_SIGNATURE[: len(data[:6])]:
        version = 1
        complete = len(data) >= len(V1_SIGNATURE)
    elif data[:1] == V2_SIGNATURE[:1] and data[:12] == V2_SIGNATURE[: len(data[:12])]:
        version = 2
        complete = len(data) >= len(V2_SIGNATURE)
    elif not data:
        return None
    else:
        raise ProxyHeaderError("not a PROXY header")
    if not complete:
        return None
    if version not in versions:
        raise ProxyHeaderError(
            f"a v{version} PROXY header, but this listener takes "
            + " or ".join(f"v{v}" for v in sorted(versions))
        )
    return _parseV1(data) if version == 1 else _parseV2(data)


def _parseV1(data: bytes) -> Optional[ProxyHeader]:
    m = re.search(rb"[\r\n]", data[:V1_MAX_LENGTH])
    if m is None:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"v1: no CRLF within {V1_MAX_LENGTH} bytes")
        return None
    end = m.start()
    if end + 2 > V1_MAX_LENGTH:
        raise ProxyHeaderError(f"v1: no CRLF within {V1_MAX_LENGTH} bytes")
    if data[end : end + 2] != b"\r\n":
        if data[end : end + 1] == b"\r" and end + 1 == len(data):
            return None  # a CR, and its LF is yet to come
        raise ProxyHeaderError("v1: a bare CR or LF ends the line")
    try:
        fields = data[:end].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1: not ASCII") from None
    length = end + 2
    if fields[1] == "UNKNOWN":
        # The rest of the line "must be ignored" (doc/proxy-protocol.txt 2.1).
        return ProxyHeader(1, "UNKNOWN", None, None, length)
    if fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"v1: unknown protocol {fields[1][:16]!r}")
    if len(fields) != 6:
        raise ProxyHeaderError("v1: expected PROXY TCP4|TCP6 source destination port port")
    kind = ipaddress.IPv4Address if fields[1] == "TCP4" else ipaddress.IPv6Address
    try:
        if "%" in fields[2] + fields[3]:
            raise ValueError("a scope is no part of an address on the wire")
        source, destination = (kind(text) for text in fields[2:4])
    except ValueError:
        raise ProxyHeaderError(f"v1: the addresses are not {fields[1]} addresses") from None
    ports = []
    for text in fields[4:6]:
        if not _PORT.fullmatch(text) or int(text) > 65535:
            raise ProxyHeaderError(f"v1: {text[:16]!r} is not a port")
        ports.append(int(text))
    return ProxyHeader(
        1, "PROXY", _address(source, ports[0]), _address(destination, ports[1]), length
    )


def _parseV2(data: bytes) -> Optional[ProxyHeader]:
    if len(data) < 16:
        return None
    versionCommand, familyProtocol, size = struct.unpack_from("!BBH", data, 12)
    if versionCommand >> 4 != 2:
        raise ProxyHeaderError(f"v2: unknown version {versionCommand >> 4}")
    command = {0: "LOCAL", 1: "PROXY"}.get(versionCommand & 0xF)
    if command is None:
        raise ProxyHeaderError(f"v2: unknown command {versionCommand & 0xF}")
    if size > V2_MAX_LENGTH:
        raise ProxyHeaderError(f"v2: {size} bytes of addresses and TLVs, more than {V2_MAX_LENGTH}")
    length = 16 + size
    if len(data) < length:
        return None
    if command == "LOCAL":
        # The proxy's own connection: the block "including the family",
        # whatever that byte holds, is ignored (doc/proxy-protocol.txt 2.2).
        return ProxyHeader(2, "LOCAL", None, None, length)
    family, transport = familyProtocol >> 4, familyProtocol & 0xF
    if family > 3 or transport > 2:
        raise ProxyHeaderError(f"v2: unknown address family and protocol 0x{familyProtocol:02x}")
    block = data[16:length]
    if transport != 1 or family not in (1, 2):
        # UNSPEC, UDP or UNIX: not a TCP client we could name; the
        # specification lets the receiver fall back to the connection's
        # own addresses.
        return ProxyHeader(2, "PROXY", None, None, length)
    kind, size = (ipaddress.IPv4Address, 4) if family == 1 else (ipaddress.IPv6Address, 16)
    if len(block) < 2 * size + 4:
        raise ProxyHeaderError(f"v2: {len(block)} bytes are too few for the addresses")
    source, destination = kind(block[:size]), kind(block[size : 2 * size])
    sourcePort, destinationPort = struct.unpack_from("!HH", block, 2 * size)
    _checkTLVs(block[2 * size + 4 :])
    return ProxyHeader(
        2, "PROXY", _address(source, sourcePort), _address(destination, destinationPort), length
    )


def _checkTLVs(tlvs: bytes) -> None:
    """
    Walk the TLVs after the addresses: none is used, but each must fit
    inside the header, as HAProxy's own receiver requires.
    """
    offset = 0
    while offset < len(tlvs):
        if offset + 3 > len(tlvs):
            raise ProxyHeaderError("v2: a truncated TLV")
        (size,) = struct.unpack_from("!H", tlvs, offset + 1)
        offset += 3 + size
        if offset > len(tlvs):
            raise ProxyHeaderError("v2: a TLV longer than the header")


def _address(ip: IP, port: int) -> IPAddress:
    """
    The Twisted address of C{ip} and C{port}. An IPv4 client that a
    dual-stack proxy names as C{::ffff:192.0.2.1} is an IPv4 address
    (L{unmapped}).
    """
    ip = unmapped(ip)
    if ip.version == 4:
        return address.IPv4Address("TCP", str(ip), port)
    return address.IPv6Address("TCP", str(ip), port)


def isTrusted(peer, networks: Iterable) -> bool:
    """
    Whether C{peer} (a Twisted address) is inside one of C{networks}
    (L{ipaddress} networks). An IPv4 client of a dual-stack socket
    (C{::ffff:192.0.2.1}) counts as its IPv4 address, and so does a network
    written in that form (C{::ffff:10.0.0.5}, as C{ss} shows such a peer:
    L{unmappedNetwork}); a peer that is not an IP address (a UNIX socket)
    is never trusted.
    """
    host = getattr(peer, "host", None)
    ip = clientIP(host) if isinstance(host, str) else None
    return ip is not None and any(ip in unmappedNetwork(network) for network in networks)


def _hostOf(peer) -> str:
    return str(getattr(peer, "host", None) or peer)


def realPeer(transport) -> Any:
    """
    The address of the other end of the connection under C{transport}: the
    proxy's when a PROXY header named the client (whom C{getPeer} names
    then), else C{getPeer()}'s. A TLS wrapper above L{ProxiedTransport}
    passes the lookup down to it.
    """
    getRealPeer = getattr(transport, "getRealPeer", None)
    return getRealPeer() if getRealPeer is not None else transport.getPeer()


class ProxiedTransport:
    """
    The transport the wrapped protocol sees: the real connection, except
    that C{getPeer} and C{getHost} are the addresses the header named.
    """

    def __init__(self, transport, peer, host) -> None:
        self.transport = transport
        self._peer = peer
        self._host = host
        # The session looks for ITLSTransport before it offers STARTTLS;
        # TLSMemoryBIOProtocol copies these on to itself.
        directlyProvides(self, providedBy(transport))

    def getPeer(self):
        return self._peer

    def getHost(self):
        return self._host

    def getRealPeer(self):
        """The connection's own peer: the proxy that sent the header."""
        return self.transport.getPeer()

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def writeSequence(self, data) -> None:
        self.transport.writeSequence(data)

    def loseConnection(self) -> None:
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self.transport.abortConnection()

    def registerProducer(self, producer, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()

    def startTLS(self, contextFactory, normal: bool = True) -> None:
        # The TCP transport puts TLS under its protocol, which is the
        # ProxyProtocol: decrypted bytes keep flowing through it.
        self.transport.startTLS(contextFactory, normal)

    def getHandle(self):
        # Looked up on every call: startTLS replaces the transport's getHandle.
        return self.transport.getHandle()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.transport.setTcpNoDelay(enabled)

    def __getattr__(self, name: str):
        # Anything else (connected, disconnecting, getTcpKeepAlive...) is
        # the real transport's.
        return getattr(self.transport, name)


@implementer(interfaces.IHandshakeListener, interfaces.IHalfCloseableProtocol)
class ProxyProtocol(protocol.Protocol):
    """
    Holds a connection until its PROXY header is complete, then builds the
    wrapped factory's protocol for the client the header names and hands
    it everything that follows. Nothing of the wrapped protocol exists
    before that; a connection that does not deliver an accepted header in
    time is cut without a byte sent.

    @ivar wrappedProtocol: the protocol built after the header, or L{None}.
    """

    # A TCP transport: abortConnection, startTLS... beyond ITransport.
    transport: Any

    def __init__(self, factory: ProxyFactory) -> None:
        self.factory = factory
        self.wrappedProtocol: Optional[protocol.Protocol] = None
        self._buffer = b""
        self._timer = None
        self._dropped = False

    def connectionMade(self) -> None:
        if not isTrusted(self.transport.getPeer(), self.factory.trusted):
            self._drop("not in trusted_proxies")
            return
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timedOut)

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._dropped:
            return
        self._buffer += data
        try:
            header = parseHeader(self._buffer, self.factory.versions)
        except ProxyHeaderError as e:
            self._drop(str(e))
            return
        if header is not None:
            self._cancelTimer()
            rest, self._buffer = self._buffer[header.length :], b""
            self._start(header, rest)

    def handshakeCompleted(self) -> None:
        # STARTTLS puts TLS under this protocol: tell the session.
        if interfaces.IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def readConnectionLost(self) -> None:
        # The proxy passed on its client's half-close: the session answers
        # what it has; before the header it is the end of the connection.
        half = interfaces.IHalfCloseableProtocol(self.wrappedProtocol, None)
        if half is not None:
            half.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        half = interfaces.IHalfCloseableProtocol(self.wrappedProtocol, None)
        if half is not None:
            half.writeConnectionLost()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._cancelTimer()
        if self.wrappedProtocol is not None:
            wrapped, self.wrappedProtocol = self.wrappedProtocol, None
            wrapped.connectionLost(reason)
        elif not self._dropped:
            self._dropped = True
            self._log(f"closed after {len(self._buffer)} bytes, before a complete PROXY header")

    def _start(self, header: ProxyHeader, rest: bytes) -> None:
        peer = header.source or self.transport.getPeer()
        host = header.destination or self.transport.getHost()
        wrapped = self.factory.wrappedFactory.buildProtocol(peer)
        if wrapped is None:
            self._drop(f"the listener refused client [{_hostOf(peer)}]")
            return
        self.wrappedProtocol = wrapped
        wrapped.makeConnection(ProxiedTransport(self.transport, peer, host))
        if rest:
            wrapped.dataReceived(rest)

    def _timedOut(self) -> None:
        self._timer = None
        self._drop(f"no complete PROXY header within {self.factory.timeout:g}s")

    def _drop(self, why: str) -> None:
        self._dropped = True
        self._cancelTimer()
        self._buffer = b""
        self._log(why)
        self.transport.abortConnection()

    def _log(self, why: str) -> None:
        log.info(
            "proxy refused: source=[{source}] {why}",
            source=_hostOf(self.transport.getPeer()),
            why=why,
        )

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class ProxyFactory(protocol.Factory):
    """
    Puts a PROXY header reader in front of C{wrappedFactory}. For implicit
    TLS, wrap the C{TLSMemoryBIOFactory}: HAProxy in TCP mode sends the
    header in the clear, before the client's handshake.

    @ivar versions: the header versions accepted (1, 2).
    @ivar trusted: the L{ipaddress} networks allowed to send a header;
        connections from anywhere else are cut at once.
    """

    protocol = ProxyProtocol

    def __init__(
        self,
        wrappedFactory: interfaces.IProtocolFactory,
        mode: str,
        trusted: Iterable,
        clock: interfaces.IReactorTime,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """
        @param mode: C{"v1"}, C{"v2"} or C{"any"}: the versions accepted.
        @param timeout: seconds a trusted peer has to send its whole header.
        """
        self.wrappedFactory = wrappedFactory
        self.versions = VERSIONS[mode]
        self.trusted = tuple(trusted)
        self.clock = clock
        self.timeout = timeout

    def buildProtocol(self, addr) -> ProxyProtocol:
        return self.protocol(self)

    def doStart(self) -> None:
        self.wrappedFactory.doStart()
        super().doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()
        super().doStop()

    def logPrefix(self) -> str:
        if interfaces.ILoggingContext.providedBy(self.wrappedFactory):
            return f"PROXY {self.wrappedFactory.logPrefix()}"
        return f"PROXY {self.wrappedFactory.__class__.__name__}"
