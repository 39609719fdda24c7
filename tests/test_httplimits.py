"""
The bounds of the HTTP endpoints (L{mailauth.httplimits}): what a hostile
client may send to C{/metrics} and the autoconfiguration, and for how long.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailauth import autoconfig
from mailauth.config import loadText
from mailauth.metrics import Metrics, metricsService
from tests import test_autoconfig
from tests.harness import LogWatcher

CLIENT = IPv4Address("TCP", "192.0.2.7", 40000)


PAGE = b"/mail/config-v1.1.xml"
AUTODISCOVER = b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: a\r\n"


class ClockedSiteMixin:
    def setUp(self) -> None:
        self.clock = Clock()
        self.log = LogWatcher()
        self.addCleanup(self.log.stop)
        # The autoconfiguration site, on the test's clock.
        cfg = loadText(test_autoconfig.DocumentTests.BASE.format(mechanisms="PLAIN"))
        self.site = autoconfig.makeSite(cfg, self.clock)
        self.site.maxConnections = 2
        self.document = autoconfig.ThunderbirdConfig(
            autoconfig.ClientSettings.fromConfig(cfg)
        ).document

    def connect(self):
        channel = self.site.buildProtocol(CLIENT)
        transport = StringTransport(peerAddress=CLIENT)
        channel.makeConnection(transport)
        self.addCleanup(self.close, channel, transport)
        return channel, transport

    @staticmethod
    def close(channel, transport) -> None:
        if not getattr(transport, "_lost", False):
            transport._lost = True
            channel.connectionLost(Failure(ConnectionDone()))


class SlowRequestTests(ClockedSiteMixin, unittest.TestCase):
    def test_tricklingRequestDropped(self) -> None:
        """
        A request that trickles in, a header line every 20 s, is dropped 30 s
        after its first byte, although the connection was never idle for
        Twisted's timeout (60 s): a few hundred such clients would otherwise
        hold as many of the daemon's file descriptors for hours.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET " + PAGE + b" HTTP/1.1\r\n")
        self.clock.advance(20)
        channel.dataReceived(b"Host: a\r\n")
        self.clock.advance(9)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"X-More: b\r\n")
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(
            self.log.matching(r"^autoconfig: no whole request from 192\.0\.2\.7 within 30 s")
        )

    def test_slowBodyDropped(self) -> None:
        """The body counts too: the whole request must arrive in time."""
        channel, transport = self.connect()
        channel.dataReceived(AUTODISCOVER + b"Content-Length: 50\r\n\r\n")
        for _ in range(30):
            channel.dataReceived(b"x")
            self.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_keepAliveNotDropped(self) -> None:
        """
        Requests that arrive in time are answered, and a connection kept
        alive between them is left to the idle timeout.
        """
        channel, transport = self.connect()
        for _ in range(3):
            channel.dataReceived(b"GET " + PAGE + b" HTTP/1.1\r\nHost: a\r\n")
            self.clock.advance(25)
            channel.dataReceived(b"\r\n")
            self.assertTrue(transport.value().endswith(b"\r\n\r\n" + self.document))
            transport.clear()
            self.clock.advance(50)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.log.matching("no whole request"), [])


class ConnectionLimitTests(ClockedSiteMixin, unittest.TestCase):
    def test_connectionsLimited(self) -> None:
        """
        Past C{maxConnections} open connections, new ones are refused
        (logged once) until one closes.
        """
        first, firstTransport = self.connect()
        self.connect()
        self.assertIsNone(self.site.buildProtocol(CLIENT))
        self.assertIsNone(self.site.buildProtocol(CLIENT))
        self.assertEqual(
            len(self.log.matching("autoconfig: 2 connections open: refusing new ones")), 1
        )
        self.close(first, firstTransport)
        self.assertIsNotNone(self.site.buildProtocol(CLIENT))

    def test_sitesLimited(self) -> None:
        """Both endpoints' sites are bounded."""
        from mailauth import httplimits

        cfg = loadText(test_autoconfig.DocumentTests.BASE.format(mechanisms="PLAIN"))
        site = autoconfig.makeSite(cfg, reactor)
        self.assertIsInstance(site, httplimits.BoundedSite)
        self.assertEqual(site.maxConnections, httplimits.MAX_CONNECTIONS)
        web = metricsService("tcp:0", Metrics.prometheus(), reactor)
        self.assertIsInstance(web.factory, httplimits.BoundedSite)


class BodyTests(ClockedSiteMixin, unittest.TestCase):
    def test_declaredLengthRefused(self) -> None:
        """
        A body declared longer than the limit is refused at once, before
        anything of it is read or stored.
        """
        channel, transport = self.connect()
        channel.dataReceived(AUTODISCOVER + b"Content-Length: 1000000000\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(
            self.log.matching(r"^autoconfig: request body over 16384 bytes from 192\.0\.2\.7")
        )

    def test_chunkedBodyLimited(self) -> None:
        """A chunked body (no length declared) is cut off at the limit too."""
        channel, transport = self.connect()
        channel.dataReceived(AUTODISCOVER + b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(2):
            channel.dataReceived(b"1f40\r\n" + b" " * 8000 + b"\r\n")
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"1f40\r\n" + b" " * 8000 + b"\r\n")
        self.assertTrue(transport.disconnecting)

    def test_headAnsweredQuietly(self) -> None:
        """
        HEAD gets the length of the GET answer without a body, and without
        Twisted's warning about the body it would drop (a log line for
        every HEAD request, which a client may send in any number).
        """
        channel, transport = self.connect()
        channel.dataReceived(b"HEAD " + PAGE + b" HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertIn(b"Content-Length: %d\r\n" % len(self.document), transport.value())
        self.assertTrue(transport.value().endswith(b"\r\n\r\n"))
        self.assertEqual(self.log.matching("HEAD request"), [])


class MetricsBodyTests(unittest.TestCase):
    """The metrics server, on 127.0.0.1 port 0, and a raw client."""

    def setUp(self) -> None:
        self.service = metricsService("tcp:0:interface=127.0.0.1", Metrics.prometheus(), reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        found: list = []
        self.service._waitingForPort.addCallback(lambda port: found.append(port) or port)
        self.port = found[0].getHost().port

    def test_scrapeWithABodyDropped(self):
        """
        A request to C{/metrics} with a body (a scrape has none) is dropped
        as soon as its length is known: Twisted's server would write a
        declared gigabyte into a temporary file, as it came.
        """

        def send() -> bytes:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000000\r\n\r\n")
                try:
                    for _ in range(1000):
                        s.sendall(b"x" * 65536)
                except OSError:
                    pass
                try:
                    return s.recv(100)
                except ConnectionResetError:
                    return b""

        d = threads.deferToThread(send)
        d.addCallback(self.assertEqual, b"")
        return d
