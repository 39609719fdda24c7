"""
The PROXY protocol under a listener: the header reader on a StringTransport
and a Clock; the real daemon behind a raw client that speaks PROXY v1 and
v2; and the real HAProxy from Debian in front of the real daemon.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct

from twisted.internet import defer, interfaces, protocol, reactor, threads
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailauth import proxy
from mailauth.proxy import ProxiedTransport, ProxyFactory, ProxyHeader, ProxyHeaderError
from tests import haproxyharness
from tests.harness import (
    BOB,
    BOB_PASSWORD,
    AttackMixin,
    Daemon,
    LogWatcher,
    RawClient,
    clientContext,
    insecureContext,
    plain,
    smtpClient,
)
from tests.support import makeFactory, withoutSession

# What the spec (haproxy doc/proxy-protocol.txt) says the bytes are, written
# out here rather than taken from mailauth.proxy.
V2_SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
LOCAL, PROXY = 0x20, 0x21
TCP4, UDP4, TCP6, UNIX_STREAM, UNSPEC = 0x11, 0x12, 0x21, 0x31, 0x00

CLIENT = "203.0.113.9"
CLIENT6 = "2001:db8::9"
LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1")]


def v2(command: int = PROXY, family: int = TCP4, block: bytes = b"") -> bytes:
    """A v2 header: signature, version and command, family, length, block."""
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(block)) + block


def inet(source: str, destination: str, sourcePort: int, destinationPort: int) -> bytes:
    """A v2 address block for TCP over IPv4 or IPv6."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    return (
        socket.inet_pton(family, source)
        + socket.inet_pton(family, destination)
        + struct.pack("!HH", sourcePort, destinationPort)
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


V1_HEADER = f"PROXY TCP4 {CLIENT} 192.0.2.1 51234 587\r\n".encode()
V2_HEADER = v2(PROXY, TCP4, inet(CLIENT, "192.0.2.1", 51234, 587))


class RecordingProtocol(protocol.Protocol):
    """Records what it was given: the addresses at connectionMade, the bytes, the loss."""

    def __init__(self) -> None:
        self.peer = self.host = None
        self.data = b""
        self.lost = None

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()
        self.host = self.transport.getHost()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.lost = reason


@implementer(interfaces.IHalfCloseableProtocol)
class HalfCloseableProtocol(RecordingProtocol):
    """A RecordingProtocol that also records half-closes."""

    def __init__(self) -> None:
        super().__init__()
        self.halves: list = []

    def readConnectionLost(self) -> None:
        self.halves.append("read")

    def writeConnectionLost(self) -> None:
        self.halves.append("write")


class RecordingFactory(protocol.Factory):
    def __init__(self, protocol=RecordingProtocol) -> None:
        self.built: list = []
        self.starts = self.stops = 0
        self.protocol = protocol

    def buildProtocol(self, addr) -> RecordingProtocol:
        p = self.protocol()
        self.built.append((addr, p))
        return p

    def doStart(self) -> None:
        self.starts += 1

    def doStop(self) -> None:
        self.stops += 1


@implementer(interfaces.ITLSTransport)
class FullTransport(StringTransport):
    """A StringTransport with the rest of a TCP transport's methods, recorded."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list = []
        self.handle = object()

    def startTLS(self, contextFactory, normal=True) -> None:
        self.calls.append(("startTLS", contextFactory, normal))

    def getHandle(self):
        return self.handle

    def setTcpNoDelay(self, enabled) -> None:
        self.calls.append(("setTcpNoDelay", enabled))


class Connection:
    """One connection from C{source} into a L{ProxyFactory} over a L{StringTransport}."""

    def __init__(
        self,
        test,
        mode: str = "any",
        source: str = "127.0.0.1",
        wrapped=None,
        timeout: float = 10.0,
        trusted=LOOPBACK,
    ) -> None:
        self.clock = Clock()
        self.wrapped = wrapped if wrapped is not None else RecordingFactory()
        self.factory = ProxyFactory(self.wrapped, mode, trusted, self.clock, timeout)
        kind = IPv6Address if ":" in source else IPv4Address
        self.transport = FullTransport(
            peerAddress=kind("TCP", source, 40000), hostAddress=kind("TCP", source, 2587)
        )
        self.protocol = self.factory.buildProtocol(self.transport.getPeer())
        with capturedLogs() as self.events:
            self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        with capturedLogs() as events:
            self.protocol.dataReceived(data)
        self.events.extend(events)

    def trickle(self, data: bytes) -> None:
        """Send C{data} one byte at a time; nothing may be built before the last."""
        for i in range(len(data) - 1):
            self.send(data[i : i + 1])
            built = getattr(self.wrapped, "built", []) or self.protocol.wrappedProtocol
            assert not built, f"built after {i + 1} of {len(data)} bytes"
            assert not self.transport.disconnecting, f"dropped after {i + 1} bytes"
        self.send(data[-1:])

    @property
    def session(self) -> RecordingProtocol:
        [(addr, p)] = self.wrapped.built
        return p

    def logged(self) -> list:
        return [formatEvent(e) for e in self.events if e.get("log_namespace") == "mailauth.proxy"]


class HeaderTests(unittest.TestCase):
    """The header reader, one connection at a time."""

    def assertBuiltFor(self, c: Connection, peer, host) -> None:
        [(addr, session)] = c.wrapped.built
        self.assertEqual((addr, session.peer, session.host), (peer, peer, host))
        self.assertEqual(session.transport.getPeer(), peer)
        self.assertFalse(c.transport.disconnecting)
        self.assertEqual(c.logged(), [])

    def assertDropped(self, c: Connection, why: str) -> None:
        self.assertEqual(c.wrapped.built, [])
        self.assertTrue(c.transport.disconnected, "the connection was not aborted")
        self.assertEqual(c.transport.value(), b"")
        source = c.transport.getPeer().host
        self.assertEqual(c.logged(), [f"proxy refused: source=[{source}] {why}"])

    def test_v1ByteByByte(self):
        """
        A v1 header trickling in one byte at a time builds nothing until its
        CRLF; then the wrapped protocol is built and connected with the
        header's source as peer and destination as host.
        """
        c = Connection(self)
        c.trickle(V1_HEADER)
        self.assertBuiltFor(
            c, IPv4Address("TCP", CLIENT, 51234), IPv4Address("TCP", "192.0.2.1", 587)
        )

    def test_v2ByteByByte(self):
        """A v2 header trickling in one byte at a time is read whole, then served."""
        c = Connection(self)
        c.trickle(V2_HEADER)
        self.assertBuiltFor(
            c, IPv4Address("TCP", CLIENT, 51234), IPv4Address("TCP", "192.0.2.1", 587)
        )

    def test_v1IPv6(self):
        """TCP6 in v1 names an IPv6 client, in its canonical form."""
        c = Connection(self, source="::1")
        c.trickle(b"PROXY TCP6 2001:DB8:0::9 2001:db8::1 40000 465\r\n")
        self.assertBuiltFor(
            c, IPv6Address("TCP", CLIENT6, 40000), IPv6Address("TCP", "2001:db8::1", 465)
        )

    def test_v2IPv6(self):
        """AF_INET6 in v2 names an IPv6 client."""
        c = Connection(self)
        c.trickle(v2(PROXY, TCP6, inet(CLIENT6, "2001:db8::1", 40000, 465)))
        self.assertBuiltFor(
            c, IPv6Address("TCP", CLIENT6, 40000), IPv6Address("TCP", "2001:db8::1", 465)
        )

    def test_mappedIPv4IsIPv4(self):
        """
        An IPv4 client that a dual-stack proxy names as IPv4-mapped IPv6
        (HAProxy does for C{bind :::587 v4v6}, in v1 and in v2) is served
        as an IPv4 client, as Postfix takes it: its address is logged and
        written into C{Received:} as C{198.51.100.7}, not C{::ffff:c633:6407}.
        """
        for header in (
            b"PROXY TCP6 ::ffff:198.51.100.7 ::ffff:192.0.2.1 40000 587\r\n",
            v2(PROXY, TCP6, inet("::ffff:198.51.100.7", "::ffff:192.0.2.1", 40000, 587)),
        ):
            c = Connection(self)
            c.trickle(header)
            self.assertBuiltFor(
                c,
                IPv4Address("TCP", "198.51.100.7", 40000),
                IPv4Address("TCP", "192.0.2.1", 587),
            )

    def test_v2TLVsSkipped(self):
        """
        TLVs after the addresses (ALPN, authority, CRC, no-op, unique ID, a
        custom one) are skipped whole; the bytes after the header reach the
        protocol untouched.
        """
        tlvs = (
            tlv(0x01, b"smtp")
            + tlv(0x02, b"mail.example.org")
            + tlv(0x03, b"\0\0\0\0")
            + tlv(0x04, b"")
            + tlv(0x05, b"u" * 128)
            + tlv(0xE0, b"\r\n.\r\nQUIT\r\n")
        )
        c = Connection(self)
        c.trickle(v2(PROXY, TCP4, inet(CLIENT, "192.0.2.1", 1, 2) + tlvs))
        c.send(b"EHLO a\r\n")
        self.assertBuiltFor(c, IPv4Address("TCP", CLIENT, 1), IPv4Address("TCP", "192.0.2.1", 2))
        self.assertEqual(c.session.data, b"EHLO a\r\n")

    def test_v2Local(self):
        """
        A v2 LOCAL header (HAProxy's health checks) is served with the
        connection's own addresses, whatever address block it carries.
        """
        # Whatever its family and protocol byte too (doc/proxy-protocol.txt
        # 2.2: "including the family which is ignored"), unknown ones included.
        for family, block in (
            (UNSPEC, b""),
            (TCP4, inet(CLIENT, "192.0.2.1", 1, 2)),
            (TCP4, b"junk"),
            (0x40, b""),
            (0x13, b"junk"),
            (0xFF, b""),
        ):
            c = Connection(self, source="127.0.0.5")
            c.trickle(v2(LOCAL, family, block))
            self.assertBuiltFor(
                c, IPv4Address("TCP", "127.0.0.5", 40000), IPv4Address("TCP", "127.0.0.5", 2587)
            )

    def test_v1Unknown(self):
        """v1 UNKNOWN, short or with (ignored) addresses, is served with the connection's own."""
        address = b"ffff:" * 7 + b"ffff"
        longest = b"PROXY UNKNOWN " + address + b" " + address + b" 65535 65535\r\n"
        self.assertEqual(len(longest), 107)
        for header in (b"PROXY UNKNOWN\r\n", longest):
            c = Connection(self)
            c.trickle(header)
            self.assertBuiltFor(
                c, IPv4Address("TCP", "127.0.0.1", 40000), IPv4Address("TCP", "127.0.0.1", 2587)
            )

    def test_v2OtherFamilies(self):
        """
        A v2 PROXY header for AF_UNSPEC, UDP or a UNIX socket names no TCP
        client: the connection's own addresses are used, as the
        specification allows.
        """
        for family, block in (
            (UNSPEC, b""),
            (UDP4, inet(CLIENT, "192.0.2.1", 1, 2)),
            (UNIX_STREAM, b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0")),
        ):
            c = Connection(self)
            c.send(v2(PROXY, family, block))
            self.assertBuiltFor(
                c, IPv4Address("TCP", "127.0.0.1", 40000), IPv4Address("TCP", "127.0.0.1", 2587)
            )

    def test_halfClosePassedOn(self):
        """
        A half-close the proxy passes on reaches a session that can take
        one (the SMTP session answers what it has before it closes); a
        protocol that cannot take one, or a connection still in its header,
        is closed.
        """
        c = Connection(self, wrapped=RecordingFactory(HalfCloseableProtocol))
        c.send(V1_HEADER)
        c.protocol.readConnectionLost()
        c.protocol.writeConnectionLost()
        self.assertEqual(c.session.halves, ["read", "write"])
        self.assertFalse(c.transport.disconnecting)
        for header in (V1_HEADER, V1_HEADER[:10]):
            c = Connection(self)
            c.send(header)
            c.protocol.readConnectionLost()
            self.assertTrue(c.transport.disconnecting)

    def test_bytesAfterHeaderPassedOn(self):
        """
        Bytes that arrive in the same read as the end of the header reach
        the protocol after its connectionMade; later bytes follow in order.
        """
        c = Connection(self)
        c.send(V1_HEADER[:10])
        c.send(V1_HEADER[10:] + b"EHLO client\r\nMAIL")
        self.assertEqual(c.session.data, b"EHLO client\r\nMAIL")
        c.send(b" FROM:<a@b>\r\n")
        self.assertEqual(c.session.data, b"EHLO client\r\nMAIL FROM:<a@b>\r\n")

    def test_untrustedSourceDropped(self):
        """
        A connection from outside trusted_proxies is cut at once, before it
        sends anything: its header, however valid, is never read.
        """
        c = Connection(self, source="198.51.100.7")
        self.assertDropped(c, "not in trusted_proxies")
        c.send(V1_HEADER + b"EHLO x\r\n")
        self.assertEqual(c.wrapped.built, [])
        self.assertEqual(c.clock.getDelayedCalls(), [])

    def test_trust(self):
        """
        trusted_proxies holds addresses and networks of both families; an
        IPv4 peer on a dual-stack socket counts as its IPv4 address; a UNIX
        socket peer is never trusted.
        """
        networks = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "192.0.2.7", "2001:db8::/32")]
        for host, expected in (
            ("10.1.2.3", True),
            ("11.0.0.1", False),
            ("192.0.2.7", True),
            ("192.0.2.8", False),
            ("2001:db8:1::1", True),
            ("2001:db9::1", False),
            ("::ffff:10.9.9.9", True),
            ("::ffff:11.0.0.1", False),
        ):
            kind = IPv6Address if ":" in host else IPv4Address
            self.assertEqual(proxy.isTrusted(kind("TCP", host, 1), networks), expected, host)
        from twisted.internet.address import UNIXAddress

        self.assertFalse(proxy.isTrusted(UNIXAddress(b"/run/x.sock"), networks))

    def test_trustMappedNetworks(self):
        """
        A proxy written in trusted_proxies as IPv4-mapped IPv6 (as C{ss}
        shows the peers of a dual-stack socket) is trusted, whether it
        connects to a dual-stack socket or to an IPv4 one: mailauth takes
        such a peer as its IPv4 address, and so the network too; a header
        it sends is read.
        """
        networks = [ipaddress.ip_network(n) for n in ("::ffff:127.0.0.1", "::ffff:10.0.0.0/104")]
        for host, expected in (
            ("127.0.0.1", True),
            ("::ffff:127.0.0.1", True),
            ("127.0.0.2", False),
            ("10.9.9.9", True),
            ("::ffff:10.9.9.9", True),
            ("11.0.0.1", False),
        ):
            kind = IPv6Address if ":" in host else IPv4Address
            self.assertEqual(proxy.isTrusted(kind("TCP", host, 1), networks), expected, host)
        c = Connection(self, trusted=networks)
        c.send(V1_HEADER)
        self.assertEqual([addr.host for addr, p in c.wrapped.built], [CLIENT])
        self.assertEqual(c.logged(), [])

    def test_garbageDropped(self):
        """
        A client that speaks SMTP (or TLS) where the header belongs is cut
        at its first byte, without a greeting.
        """
        tlsHello = b"\x16\x03\x01\x02\x00"
        for data in (b"EHLO client\r\n", tlsHello, b"PROXZ", b"\r\n\r\n\x00\r\nQUIX"):
            c = Connection(self)
            c.send(data)
            self.assertDropped(c, "not a PROXY header")

    def test_malformedV1Dropped(self):
        """Each way a v1 line can be wrong drops the connection, and says how."""
        notTCP = "v1: the addresses are not TCP"
        cases = [
            (b"PROXY TCP4 203.0.113.09 192.0.2.1 1 2\r\n", f"{notTCP}4 addresses"),
            (b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n", f"{notTCP}4 addresses"),
            (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", f"{notTCP}6 addresses"),
            (
                b"PROXY TCP4 203.0.113.9  192.0.2.1 1 2\r\n",
                "v1: expected PROXY TCP4|TCP6 source destination port port",
            ),
            (
                b"PROXY TCP4 203.0.113.9 192.0.2.1 1\r\n",
                "v1: expected PROXY TCP4|TCP6 source destination port port",
            ),
            (b"PROXY TCP4 203.0.113.9 192.0.2.1 65536 2\r\n", "v1: '65536' is not a port"),
            (b"PROXY TCP4 203.0.113.9 192.0.2.1 01 2\r\n", "v1: '01' is not a port"),
            (b"PROXY TCP4 203.0.113.9 192.0.2.1 1 -2\r\n", "v1: '-2' is not a port"),
            (b"PROXY UDP4 203.0.113.9 192.0.2.1 1 2\r\n", "v1: unknown protocol 'UDP4'"),
            (b"PROXY TCP4 203.0.113.9 192.0.2.1 1 2\n", "v1: a bare CR or LF ends the line"),
            (b"PROXY TCP4 203.0.113.9 192.0.2.1 1 2\rX", "v1: a bare CR or LF ends the line"),
            (b"PROXY TCP4 \xc3\xa9 192.0.2.1 1 2\r\n", "v1: not ASCII"),
            (b"PROXY UNKNOWN " + b"x" * 93, "v1: no CRLF within 107 bytes"),
            (b"PROXY UNKNOWN " + b"x" * 92 + b"\r", "v1: no CRLF within 107 bytes"),
        ]
        for data, why in cases:
            c = Connection(self)
            c.trickle(data)
            with self.subTest(data=data):
                self.assertDropped(c, why)

    def test_malformedV2Dropped(self):
        """
        Each way a v2 header can be wrong drops the connection, and says
        how, as soon as the fixed part or the block is in.
        """
        block = inet(CLIENT, "192.0.2.1", 1, 2)
        cases = [
            (v2(0x11, TCP4, block), "v2: unknown version 1"),
            (v2(0x22, TCP4, block), "v2: unknown command 2"),
            (v2(PROXY, 0x41, block), "v2: unknown address family and protocol 0x41"),
            (v2(PROXY, 0x13, block), "v2: unknown address family and protocol 0x13"),
            (v2(PROXY, TCP4, block[:11]), "v2: 11 bytes are too few for the addresses"),
            (v2(PROXY, TCP6, block), "v2: 12 bytes are too few for the addresses"),
            (v2(PROXY, TCP4, block + b"\x01\x00"), "v2: a truncated TLV"),
            (v2(PROXY, TCP4, block + b"\x01\x00\x05abc"), "v2: a TLV longer than the header"),
        ]
        for data, why in cases:
            c = Connection(self)
            c.send(data)
            self.assertDropped(c, why)

    def test_oversizeDropped(self):
        """
        A v2 length field past the bound drops the connection as soon as
        the 16 fixed bytes are in, without waiting for (or buffering) the
        block; the bound itself is accepted.
        """
        c = Connection(self)
        c.trickle(V2_SIGNATURE + bytes([PROXY, TCP4]) + struct.pack("!H", 4097))
        self.assertDropped(c, "v2: 4097 bytes of addresses and TLVs, more than 4096")

        c = Connection(self)
        block = inet(CLIENT, "192.0.2.1", 1, 2)
        c.send(v2(PROXY, TCP4, block + tlv(0x04, b"\0" * (4096 - 12 - 3))))
        self.assertBuiltFor(c, IPv4Address("TCP", CLIENT, 1), IPv4Address("TCP", "192.0.2.1", 2))

    def test_versionNotAccepted(self):
        """A listener set to one version drops the other, once its signature is complete."""
        c = Connection(self, mode="v1")
        c.trickle(V2_HEADER[:12])
        self.assertDropped(c, "a v2 PROXY header, but this listener takes v1")
        c = Connection(self, mode="v2")
        c.trickle(V1_HEADER[:6])
        self.assertDropped(c, "a v1 PROXY header, but this listener takes v2")
        for mode, header in (("v1", V1_HEADER), ("v2", V2_HEADER)):
            c = Connection(self, mode=mode)
            c.send(header)
            self.assertEqual(len(c.wrapped.built), 1)

    def test_timeout(self):
        """
        A trusted peer that has not sent its whole header when the timeout
        passes is cut; one that completes it in time is never cut by it.
        """
        c = Connection(self, timeout=10)
        c.send(V1_HEADER[:20])
        c.clock.advance(9.9)
        self.assertFalse(c.transport.disconnecting)
        with capturedLogs() as events:
            c.clock.advance(0.1)
        c.events.extend(events)
        self.assertDropped(c, "no complete PROXY header within 10s")
        c.send(V1_HEADER[20:])
        self.assertEqual(c.wrapped.built, [])

        c = Connection(self, timeout=10)
        c.clock.advance(9)
        c.send(V2_HEADER)
        self.assertEqual(c.clock.getDelayedCalls(), [])
        c.clock.advance(60)
        self.assertFalse(c.transport.disconnecting)

    def test_closedBeforeHeader(self):
        """A connection that ends before its header is complete is logged, and nothing is built."""
        c = Connection(self)
        c.send(V2_HEADER[:20])
        with capturedLogs() as events:
            c.protocol.connectionLost(protocol.connectionDone)
        c.events.extend(events)
        self.assertEqual(
            c.logged(),
            [
                "proxy refused: source=[127.0.0.1] closed after 20 bytes, "
                "before a complete PROXY header"
            ],
        )
        self.assertEqual((c.wrapped.built, c.clock.getDelayedCalls()), ([], []))

    def test_connectionLostForwarded(self):
        """Once built, the protocol hears of the connection's end."""
        c = Connection(self)
        c.send(V1_HEADER)
        c.protocol.connectionLost(protocol.connectionDone)
        self.assertIs(c.session.lost, protocol.connectionDone)

    def test_transportForwards(self):
        """
        The protocol's transport is the real one in all but its addresses:
        it declares the same interfaces (ITLSTransport lets the session
        offer STARTTLS) and passes writes, closes, producers, startTLS,
        getHandle and setTcpNoDelay through.
        """
        real = FullTransport()
        t = ProxiedTransport(
            real, IPv4Address("TCP", CLIENT, 1), IPv4Address("TCP", "192.0.2.1", 2)
        )
        self.assertTrue(interfaces.ITLSTransport.providedBy(t))
        self.assertTrue(interfaces.ITCPTransport.providedBy(t))
        self.assertEqual((t.getPeer().host, t.getHost().host), (CLIENT, "192.0.2.1"))
        t.write(b"220 ")
        t.writeSequence([b"ready", b"\r\n"])
        self.assertEqual(real.value(), b"220 ready\r\n")
        producer = object()
        t.registerProducer(producer, True)
        self.assertEqual((real.producer, real.streaming), (producer, True))
        t.unregisterProducer()
        self.assertIsNone(real.producer)
        t.pauseProducing()
        self.assertEqual(real.producerState, "paused")
        t.resumeProducing()
        self.assertEqual(real.producerState, "producing")
        t.stopProducing()
        self.assertEqual(real.producerState, "stopped")
        context = object()
        t.startTLS(context)
        t.setTcpNoDelay(True)
        self.assertEqual(real.calls, [("startTLS", context, True), ("setTcpNoDelay", True)])
        self.assertIs(t.getHandle(), real.handle)
        real.handle = object()  # as startTLS replaces it
        self.assertIs(t.getHandle(), real.handle)
        self.assertIs(t.connected, real.connected)
        t.loseConnection()
        self.assertTrue(real.disconnecting)
        self.assertFalse(real.disconnected)
        t.abortConnection()
        self.assertTrue(real.disconnected)

    def test_refusedByWrappedFactory(self):
        """A wrapped factory that builds nothing for the client gets the connection cut."""
        wrapped = RecordingFactory()
        wrapped.buildProtocol = lambda addr: None
        c = Connection(self, wrapped=wrapped)
        c.send(V1_HEADER)
        self.assertDropped(c, f"the listener refused client [{CLIENT}]")

    def test_factoryStartStop(self):
        """
        The factory is an IProtocolFactory; starting and stopping the
        listener starts and stops the wrapped factory.
        """
        wrapped = RecordingFactory()
        factory = ProxyFactory(wrapped, "v2", LOOPBACK, Clock())
        verifyObject(interfaces.IProtocolFactory, factory)
        factory.doStart()
        factory.doStop()
        self.assertEqual((wrapped.starts, wrapped.stops), (1, 1))

    def test_parseHeader(self):
        """parseHeader says L{None} for a beginning, the header when complete."""
        self.assertIsNone(proxy.parseHeader(b""))
        self.assertIsNone(proxy.parseHeader(V1_HEADER[:-1]))
        self.assertEqual(
            proxy.parseHeader(V1_HEADER + b"rest"),
            ProxyHeader(
                1,
                "PROXY",
                IPv4Address("TCP", CLIENT, 51234),
                IPv4Address("TCP", "192.0.2.1", 587),
                len(V1_HEADER),
            ),
        )
        self.assertEqual(
            proxy.parseHeader(v2(LOCAL, UNSPEC)), ProxyHeader(2, "LOCAL", None, None, 16)
        )
        self.assertRaises(ProxyHeaderError, proxy.parseHeader, V1_HEADER, [2])


class RealSessionTests(unittest.TestCase):
    """The real SMTP session behind the reader, on a StringTransport."""

    def test_sessionWaitsForHeader(self):
        """
        Before the header: no greeting, no connection counted. After it: the
        greeting, and the session counts and names the header's client.
        """
        clock = Clock()
        smtp = makeFactory(clock)
        c = Connection(self, wrapped=smtp)
        c.trickle(V2_HEADER[:-1])
        self.assertEqual((c.transport.value(), smtp.connections.count), (b"", 0))
        c.send(V2_HEADER[-1:] + b"EHLO client.example\r\n")
        lines = c.transport.value().split(b"\r\n")
        self.assertEqual(lines[0], b"220 mx.example.test ESMTP mailauth")
        self.assertIn(b"250 STARTTLS", lines)
        self.assertEqual(smtp.connections.byAddress, {CLIENT: 1})
        self.assertEqual(c.protocol.wrappedProtocol.peerHost, CLIENT)
        c.protocol.connectionLost(protocol.connectionDone)
        self.assertEqual(smtp.connections.byAddress, {})

    def test_droppedNeverCounted(self):
        """A connection dropped for its header never reaches the connection limits."""
        smtp = makeFactory(Clock())
        c = Connection(self, wrapped=smtp)
        c.send(b"EHLO client.example\r\n")
        c.protocol.connectionLost(protocol.connectionDone)
        self.assertEqual((c.transport.value(), smtp.connections.count), (b"", 0))


# -- the real daemon behind a client that speaks PROXY ------------------------

TRUSTED = "127.0.0.1 ::1"
PROXIED = {
    "listener:submission": {"proxy_protocol": "any", "trusted_proxies": TRUSTED},
    "listener:submissions": {"proxy_protocol": "any", "trusted_proxies": TRUSTED},
}


def headerFor(client: str, version: int = 2) -> bytes:
    """A PROXY header naming C{client} (port 40000) as connected to 192.0.2.1:587 or 2001:db8::1."""
    destination = "2001:db8::1" if ":" in client else "192.0.2.1"
    if version == 1:
        family = "TCP6" if ":" in client else "TCP4"
        return f"PROXY {family} {client} {destination} 40000 587\r\n".encode()
    return v2(PROXY, TCP6 if ":" in client else TCP4, inet(client, destination, 40000, 587))


class ProxiedDaemonTests(AttackMixin, unittest.TestCase):
    """
    The real service with proxy_protocol on both listeners, and raw clients
    on 127.0.0.1 that send a PROXY header naming some other client: that
    client, never 127.0.0.1, is the one the logs, the connection limits,
    the throttle and C{Received:} see.
    """

    clocked = True
    settings = dict(
        PROXIED,
        server={"max_connections_per_address": "2"},
        auth={"max_failures_per_address": "2", "failures_per_session": "10"},
    )

    def proxied(
        self, listener: str, header: bytes, source: str = "127.0.0.1", expect: int = 220
    ) -> RawClient:
        """
        (Blocking.) A client that sent C{header}, then (implicit TLS) its
        handshake, and read a greeting with code C{expect}.
        """
        client = RawClient(self.daemon.ports[listener], source=source)
        self.clients.append(client)
        client.send(header)
        if self.tlsMode(listener) == "implicit":
            client.sock = insecureContext().wrap_socket(client.sock)
        code, text = client.reply()
        assert code == expect, (code, text)
        return client

    def loggedInVia(self, listener: str, header: bytes) -> RawClient:
        client = self.proxied(listener, header)
        if self.tlsMode(listener) == "starttls":
            client.ehlo()
            client.starttls()
        client.ehlo()
        code, text = client.command(plain(BOB, BOB_PASSWORD))
        assert code == 235, (code, text)
        return client

    def send(self, listener: str, header: bytes) -> list:
        """(Blocking.) Log in through C{header} and send bob a message; the reply codes."""
        client = self.loggedInVia(listener, header)
        replies = [
            client.command(b"MAIL FROM:<bob@example.test>"),
            client.command(b"RCPT TO:<bob@example.test>"),
            client.command(b"DATA"),
        ]
        client.send(b"Subject: proxied\r\n\r\nhello\r\n.\r\n")
        replies += [client.reply(), client.command(b"QUIT")]
        return [code for code, _ in replies]

    @defer.inlineCallbacks
    def assertDelivered(self, listener: str, header: bytes, client: str):
        accepted = self.log.waitFor(rf"message accepted: client=\[{re.escape(client)}\]")
        codes = yield self.inThread(self.send, listener, header)
        self.assertEqual(codes, [250, 250, 354, 250, 221])
        yield accepted
        [(name, message)] = self.daemon.delivered("bob@example.test")
        literal = f"IPv6:{client}" if ":" in client else client
        self.assertIn(f"Received: from client.example ([{literal}])\n".encode(), message)
        self.assertEqual(
            len(self.log.matching(rf"auth success: client=\[{re.escape(client)}\]")), 1
        )
        self.assertEqual(self.log.matching(r"client=\[127\.0\.0\.1\]"), [])

    def test_startTLSNamesHeaderClient(self):
        """
        Behind a v2 header on the STARTTLS listener, the session greets,
        upgrades to TLS and takes a message; the log lines and C{Received:}
        name the header's client.
        """
        return self.assertDelivered("submission", headerFor(CLIENT), CLIENT)

    def test_implicitTLSNamesHeaderClient(self):
        """
        On the implicit-TLS listener the header comes first, in the clear,
        and the TLS handshake after it; an IPv6 client in a v1 header is
        the one logged and written into C{Received:}.
        """
        return self.assertDelivered("submissions", headerFor(CLIENT6, version=1), CLIENT6)

    @defer.inlineCallbacks
    def test_connectionLimitCountsHeaderClient(self):
        """
        max_connections_per_address (2) counts the header's client: its
        third connection is refused, while a fourth and fifth connection
        from the same proxy, for other clients, are served.
        """
        for listener in ("submission", "submissions"):
            yield self.inThread(self.proxied, listener, headerFor(CLIENT))
        extra = yield self.inThread(
            self.proxied, "submissions", headerFor(CLIENT), "127.0.0.1", 421
        )
        self.assertEqual(
            extra.lines[-1], b"421 4.7.0 Error: too many connections from your address"
        )
        for other in ("203.0.113.10", CLIENT6):
            yield self.inThread(self.proxied, "submission", headerFor(other))
        self.assertEqual(
            [withoutSession(m) for m in self.log.matching(r"refused connection: client=\[203\.")],
            [
                "refused connection: client=[203.0.113.9] listener=submissions "
                "reason=too_many_from_address"
            ],
        )

    @defer.inlineCallbacks
    def test_throttleCountsHeaderClient(self):
        """
        Failed logins count against the header's client: at the limit it
        is refused, on new connections too, while another client behind
        the same proxy still logs in.
        """

        def guess():
            client = self.proxied("submissions", headerFor(CLIENT))
            client.ehlo()
            return [client.command(plain(BOB, b"guess%d" % n))[0] for n in range(2)]

        self.assertEqual((yield self.inThread(guess)), [535, 421])
        self.assertEqual(len(self.log.matching(r"auth failure: client=\[203\.0\.113\.9\]")), 2)
        blocked = yield self.inThread(
            self.proxied, "submission", headerFor(CLIENT), "127.0.0.1", 421
        )
        self.assertEqual(
            blocked.lines, [b"421 4.7.0 Error: too many failed logins, try again later"]
        )
        client = yield self.inThread(self.loggedInVia, "submission", headerFor("203.0.113.10"))
        yield self.inThread(client.command, b"QUIT")

    @defer.inlineCallbacks
    def test_untrustedSourceRefused(self):
        """
        A connection from outside trusted_proxies is closed at once without
        a greeting, even with a valid header; one line logs its address.
        """

        def attempt(listener):
            try:
                client = RawClient(self.daemon.ports[listener], source="127.0.0.3")
            except ConnectionResetError:
                return b""  # cut before connect() returned
            self.clients.append(client)
            try:
                client.send(headerFor(CLIENT) + b"EHLO client.example\r\n")
            except OSError:
                pass  # already cut: the header was not even wanted
            return client.closedByServer() and client._buffer

        logged = self.log.waitFor(r"proxy refused")
        for listener in ("submission", "submissions"):
            self.assertEqual((yield self.inThread(attempt, listener)), b"")
        yield logged
        self.assertEqual(
            self.log.matching(r"proxy refused"),
            ["proxy refused: source=[127.0.0.3] not in trusted_proxies"] * 2,
        )

    @defer.inlineCallbacks
    def test_missingHeaderRefused(self):
        """
        A client that skips the header (SMTP on the STARTTLS listener, a TLS
        handshake on the implicit one) is cut without a greeting.
        """
        client = RawClient(self.daemon.ports["submission"])
        self.clients.append(client)
        yield self.inThread(client.send, b"EHLO client.example\r\n")
        self.assertTrue((yield self.inThread(client.closedByServer)))
        self.assertEqual(client._buffer, b"")

        def handshake():
            RawClient(self.daemon.ports["submissions"], tls=True)

        yield self.assertFailure(self.inThread(handshake), OSError)
        self.assertEqual(
            self.log.matching(r"proxy refused"),
            ["proxy refused: source=[127.0.0.1] not a PROXY header"] * 2,
        )

    @defer.inlineCallbacks
    def test_headerTimeout(self):
        """
        A trusted peer that sends part of a header and then nothing is cut
        when proxy_timeout (10s) passes, without a greeting.
        """
        client = RawClient(self.daemon.ports["submissions"])
        self.clients.append(client)
        logged = self.log.waitFor(r"proxy refused")
        yield self.inThread(client.send, headerFor(CLIENT)[:20])
        yield self.inThread(lambda: self.assertFalse(client.pending()))
        self.clock.advance(10)
        self.assertEqual(
            (yield logged), "proxy refused: source=[127.0.0.1] no complete PROXY header within 10s"
        )
        self.assertTrue((yield self.inThread(client.closedByServer)))
        self.assertEqual(client._buffer, b"")


# -- the real HAProxy in front of the real daemon ----------------------------


class HAProxyTests(unittest.TestCase):
    """
    Debian's haproxy in TCP mode in front of both listeners, with
    C{send-proxy} (v1) and C{send-proxy-v2}, and its health checks (v2
    sends them as LOCAL); smtplib sends through it from 127.0.0.5.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.daemon = Daemon(self.mktemp(), PROXIED)
        self.addCleanup(self.daemon.stop)
        self.daemon.start()
        self.log = LogWatcher()
        self.addCleanup(self.log.stop)
        submission = (("127.0.0.1", self.daemon.ports["submission"]),)
        submissions = (("127.0.0.1", self.daemon.ports["submissions"]),)
        self.haproxy = haproxyharness.HAProxy(
            self.mktemp(),
            {
                "starttls_v2": haproxyharness.Route(submission, "v2", "smtp"),
                "starttls_v1": haproxyharness.Route(submission, "v1", "smtp"),
                "implicit_v2": haproxyharness.Route(submissions, "v2", "tcp"),
                "implicit_v1": haproxyharness.Route(submissions, "v1", "tcp"),
            },
        )
        self.addCleanup(self.haproxy.stop)
        self.haproxy.start()
        yield self.haproxy.waitUntilChecked(reactor)

    def submit(self, route: str) -> dict:
        """(Blocking.) Send bob a message with smtplib through HAProxy, from 127.0.0.5."""
        port = self.haproxy.ports[route]
        implicit = route.startswith("implicit")
        client = smtpClient(port, implicit=implicit, source="127.0.0.5")
        if not implicit:
            client.starttls(context=clientContext())
        try:
            client.login(BOB.decode(), BOB_PASSWORD.decode())
            return client.sendmail(
                BOB.decode(), [BOB.decode()], f"Subject: via {route}\r\n\r\nhello\r\n".encode()
            )
        finally:
            client.quit()

    @defer.inlineCallbacks
    def test_mailThroughHAProxy(self):
        """
        Mail sent through HAProxy over STARTTLS and implicit TLS, with v1
        and v2 headers, is delivered with C{Received:} naming the client
        behind HAProxy, which the log lines name too; HAProxy's own health
        checks are served (they passed before the test began).
        """
        routes = sorted(self.haproxy.routes)
        for route in routes:
            self.assertEqual((yield threads.deferToThread(self.submit, route)), {})
        delivered = self.daemon.delivered("bob@example.test")
        self.assertEqual(len(delivered), len(routes))
        for _name, message in delivered:
            self.assertIn(b"Received: from client.example ([127.0.0.5])\n", message)
        self.assertEqual(
            len(self.log.matching(r"message accepted: client=\[127\.0\.0\.5\]")), len(routes)
        )
        self.assertEqual(self.log.matching(r"(auth|message).*client=\[127\.0\.0\.1\]"), [])
