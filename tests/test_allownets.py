"""
Dovecot's allow_nets and allow_real_nets (L{mailauth.allownets}): the
values of the fields, every mechanism passing on where its client is, the
real peer behind a PROXY header.
"""

from __future__ import annotations

import ipaddress

from twisted.internet import protocol
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailauth import sasl
from mailauth.allownets import Networks, Origin, hostAddress, refusal
from mailauth.interfaces import ILoginOrigin
from mailauth.proxy import ProxiedTransport, realPeer
from mailauth.userdb import User

ip = ipaddress.ip_address


class NetworksTests(unittest.TestCase):
    def test_allows(self) -> None:
        """
        An address is allowed inside a listed network of its family; a
        connection without an IP address only where C{local} is listed.
        """
        nets = Networks.parse("10.0.0.0/8,192.0.2.7,2001:db8::/32")
        self.assertTrue(nets.allows(ip("10.255.0.1")))
        self.assertTrue(nets.allows(ip("192.0.2.7")))
        self.assertTrue(nets.allows(ip("2001:db8::1")))
        self.assertFalse(nets.allows(ip("192.0.2.8")))
        self.assertFalse(nets.allows(ip("::ffff:10.0.0.1")))  # Origin maps it first
        self.assertFalse(nets.allows(None))
        self.assertTrue(Networks.parse("local").allows(None))
        self.assertFalse(Networks.parse("local").allows(ip("127.0.0.1")))

    def test_hostAddress(self) -> None:
        """
        An IPv4 client of a dual-stack socket is its IPv4 address, a scoped
        IPv6 address loses its scope, and what is not an IP address (a
        UNIX socket) is none.
        """
        self.assertEqual(hostAddress("::ffff:192.0.2.1"), ip("192.0.2.1"))
        self.assertEqual(hostAddress("fe80::1%eth0"), ip("fe80::1"))
        self.assertEqual(hostAddress("2001:db8::1"), ip("2001:db8::1"))
        for host in ("local", "/run/mailauth.sock", "", None):
            self.assertIsNone(hostAddress(host))

    def test_refusal(self) -> None:
        """A user without either field is never refused, even from an unknown origin."""
        free = User("a@example.test", None)
        self.assertIsNone(refusal(free, None))
        self.assertIsNone(refusal(free, Origin(None, None)))


class MechanismTests(unittest.TestCase):
    """Every mechanism hands the portal the origin its session gave it."""

    ORIGIN = Origin.of("192.0.2.1", "127.0.0.1")

    def test_originPassedOn(self) -> None:
        context = sasl.SASLContext("mx.example.test", Clock(), origin=self.ORIGIN)
        first = {
            "PLAIN": b"\0alice@example.test\0secret",
            "LOGIN": b"alice@example.test",
            "OAUTHBEARER": b"n,a=alice@example.test,\x01auth=Bearer abc\x01\x01",
            "XOAUTH2": b"user=alice@example.test\x01auth=Bearer abc\x01\x01",
        }
        for name, mechanism in sasl.MECHANISMS.items():
            exchange = mechanism(context)
            if name == "CRAM-MD5":
                exchange.start(None)
                step = exchange.respond(b"alice@example.test " + b"0" * 32)
            else:
                step = exchange.start(first[name])
                if name == "LOGIN":
                    step = exchange.respond(b"secret")
            self.assertTrue(verifyObject(ILoginOrigin, step), name)
            self.assertEqual(step.origin, self.ORIGIN, name)


class RealPeerTests(unittest.TestCase):
    def test_realPeer(self) -> None:
        """
        The real peer is the connection's own: the proxy under a
        L{ProxiedTransport}, also through a wrapper above it (as TLS is for
        implicit TLS behind a proxy), and the peer itself without a proxy.
        """
        proxy = IPv4Address("TCP", "127.0.0.2", 1234)
        client = IPv4Address("TCP", "203.0.113.9", 40000)
        tcp = StringTransport(peerAddress=proxy)
        self.assertEqual(realPeer(tcp), proxy)
        proxied = ProxiedTransport(tcp, client, tcp.getHost())
        self.assertEqual((proxied.getPeer(), realPeer(proxied)), (client, proxy))
        wrapper = ProtocolWrapper(WrappingFactory(protocol.Factory()), protocol.Protocol())
        wrapper.makeConnection(proxied)
        self.assertEqual((wrapper.getPeer(), realPeer(wrapper)), (client, proxy))
