"""
Dovecot's allow_nets and allow_real_nets: the values of the fields
(L{mailauth.allownets}), every mechanism passing on where its client is,
the real peer behind a PROXY header, and the real daemon on 127.0.0.1:
smtplib logging in from inside and outside a user's networks, and raw
clients that send a PROXY v1 header first.
"""

from __future__ import annotations

import base64
import ipaddress
import smtplib

from twisted.internet import defer, protocol
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
from tests.harness import (
    AttackMixin,
    RawClient,
    b64,
    clientContext,
    insecureContext,
    plain,
    smtpClient,
)
from tests.support import TokenIssuer

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

    def test_mappedNetworks(self) -> None:
        """
        An IPv4-mapped network in the list is its IPv4 network, since the
        clients it names are matched as IPv4 (L{hostAddress}); it matched
        nobody.
        """
        nets = Networks.parse("::ffff:10.0.0.0/104,::ffff:192.0.2.7")
        self.assertTrue(nets.allows(hostAddress("10.1.2.3")))
        self.assertTrue(nets.allows(hostAddress("::ffff:10.1.2.3")))
        self.assertTrue(nets.allows(hostAddress("192.0.2.7")))
        self.assertFalse(nets.allows(hostAddress("11.0.0.1")))
        # Wider than the mapped block: an IPv6 network, as written.
        self.assertEqual(Networks.parse("::/95").networks, (ipaddress.ip_network("::/95"),))

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


# -- the real daemon ----------------------------------------------------------

USERS = (
    "near@example.test:{PLAIN}near-secret::::::allow_nets=127.0.0.0/8\n"
    "far@example.test:{PLAIN}far-secret::::::allow_nets=10.0.0.0/8,2001:db8::/32\n"
)
REFUSED = (
    "auth refused: client=[127.0.0.1] mechanism=PLAIN login=<far@example.test>: "
    "allow_nets check failed: IP 127.0.0.1 not in allowed networks"
)


class DaemonTests(AttackMixin, unittest.TestCase):
    """The real service, its users restricted to networks, and smtplib on 127.0.0.1."""

    files = {"users": USERS}
    settings = {
        "auth": {
            "max_failures_per_address": "2",
            "failures_per_session": "10",
            "tarpit_delay": "0s",
        },
    }

    def login(self, login: str, password: str) -> int:
        """(Blocking.) Log in with smtplib and AUTH PLAIN after STARTTLS; the reply code."""
        client = smtpClient(self.daemon.ports["submission"])
        try:
            client.ehlo()
            client.starttls(context=clientContext())
            client.ehlo()
            client.user, client.password = login, password
            try:
                code, _ = client.auth("PLAIN", client.auth_plain)
            except smtplib.SMTPAuthenticationError as e:
                code = e.smtp_code
            return code
        finally:
            client.close()

    @defer.inlineCallbacks
    def test_loopback(self):
        """
        From 127.0.0.1, a login restricted to 127.0.0.0/8 logs in; one
        restricted to 10.0.0.0/8 and 2001:db8::/32 gets 535 with its right
        password, logged with why and counted as a failed login: at
        max_failures_per_address (2) the next one is refused and the address
        blocked, as after wrong passwords.
        """
        self.assertEqual((yield self.inThread(self.login, "near@example.test", "near-secret")), 235)
        self.assertEqual(len(self.log.matching(r"auth success: client=\[127\.0\.0\.1\]")), 1)
        self.assertEqual((yield self.inThread(self.login, "far@example.test", "far-secret")), 535)
        self.assertEqual(
            [m.split(" session=")[0] for m in self.log.matching(r"^auth (refused|failure)")],
            [REFUSED, "auth failure: client=[127.0.0.1] mechanism=PLAIN login=<far@example.test>"],
        )
        self.assertFalse(self.log.matching("far-secret"))

        def again():
            client = self.connect("submissions")
            client.ehlo()
            return client.command(plain(b"far@example.test", b"far-secret"))[0]

        self.assertEqual((yield self.inThread(again)), 421)
        yield self.inThread(self.connect, "submission", "127.0.0.1", 421)


PROXIED = {"proxy_protocol": "v1", "trusted_proxies": "127.0.0.0/8"}


class ProxiedTests(AttackMixin, unittest.TestCase):
    """
    Behind a PROXY v1 header sent by hand from a trusted proxy on
    127.0.0.1 or 127.0.0.2: allow_nets holds the header's client,
    allow_real_nets the proxy.
    """

    files = {
        "users": (
            "client@example.test:{PLAIN}secret::::::allow_nets=203.0.113.0/24\n"
            "loopback@example.test:{PLAIN}secret::::::allow_nets=127.0.0.0/8\n"
            "proxy@example.test:{PLAIN}secret::::::allow_real_nets=127.0.0.1\n"
        )
    }
    settings = {"listener:submission": PROXIED, "listener:submissions": PROXIED}

    def attempt(self, listener: str, proxy: str, client: str, login: bytes) -> int:
        """
        (Blocking.) From C{proxy}, a PROXY v1 header naming C{client}, then
        SMTP (and TLS), and AUTH PLAIN as C{login}; the reply code.
        """
        raw = RawClient(self.daemon.ports[listener], source=proxy)
        self.clients.append(raw)
        raw.send(f"PROXY TCP4 {client} 192.0.2.1 40000 587\r\n".encode())
        if self.tlsMode(listener) == "implicit":
            raw.sock = insecureContext().wrap_socket(raw.sock)
        code, text = raw.reply()
        assert code == 220, (code, text)
        if self.tlsMode(listener) == "starttls":
            raw.ehlo()
            raw.starttls()
        raw.ehlo()
        return raw.command(plain(login, b"secret"))[0]

    def refusals(self) -> list:
        return [m.split(" session=")[0] for m in self.log.matching(r"^auth refused")]

    @defer.inlineCallbacks
    def test_allowNetsHoldsHeaderClient(self):
        """
        allow_nets is checked against the client the header names, never
        the proxy: a login restricted to 203.0.113.0/24 logs in for a client
        there and is refused for one elsewhere; one restricted to
        127.0.0.0/8, the proxy's network, is refused.
        """
        for listener in ("submission", "submissions"):
            codes = []
            for client, login in (
                ("203.0.113.9", b"client@example.test"),
                ("198.51.100.7", b"client@example.test"),
                ("203.0.113.9", b"loopback@example.test"),
            ):
                codes.append(
                    (yield self.inThread(self.attempt, listener, "127.0.0.1", client, login))
                )
            self.assertEqual(codes, [235, 535, 535], listener)
        self.assertEqual(
            self.refusals(),
            [
                "auth refused: client=[198.51.100.7] mechanism=PLAIN login=<client@example.test>: "
                "allow_nets check failed: IP 198.51.100.7 not in allowed networks",
                "auth refused: client=[203.0.113.9] mechanism=PLAIN login=<loopback@example.test>: "
                "allow_nets check failed: IP 203.0.113.9 not in allowed networks",
            ]
            * 2,
        )

    @defer.inlineCallbacks
    def test_allowRealNetsHoldsProxy(self):
        """
        allow_real_nets is checked against the connection's own peer, the
        proxy: a login restricted to 127.0.0.1 logs in through the proxy on
        127.0.0.1 for any client, and is refused through 127.0.0.2, on the
        STARTTLS listener and under implicit TLS.
        """
        for listener in ("submission", "submissions"):
            codes = []
            for proxy in ("127.0.0.1", "127.0.0.2"):
                codes.append(
                    (
                        yield self.inThread(
                            self.attempt, listener, proxy, "203.0.113.9", b"proxy@example.test"
                        )
                    )
                )
            self.assertEqual(codes, [235, 535], listener)
        self.assertEqual(
            self.refusals(),
            [
                "auth refused: client=[203.0.113.9] mechanism=PLAIN login=<proxy@example.test>: "
                "allow_real_nets check failed: IP 127.0.0.2 not in allowed networks"
            ]
            * 2,
        )


def oauthbearer(token: str, authzid: str) -> bytes:
    """An OAUTHBEARER initial response, as msmtp sends it (C{a=} only if C{authzid})."""
    a = f"a={authzid}" if authzid else ""
    return f"n,{a},\x01auth=Bearer {token}\x01\x01".encode()


class TokenTests(AttackMixin, unittest.TestCase):
    """
    OAUTHBEARER on the real daemon: a good token for a login that may not
    log in from 127.0.0.1 is answered as a bad token is.
    """

    issuer = TokenIssuer("ec", "k1")
    settings = {
        "auth": {"mechanisms": "PLAIN OAUTHBEARER", "failures_per_session": "10"},
        "oauth": {
            "issuer": TokenIssuer.ISSUER,
            "audience": TokenIssuer.AUDIENCE,
            "jwks": "{dir}/jwks.json",
        },
    }
    files = {
        "jwks.json": issuer.jwks("k1"),
        "users": (
            "far@example.test:{PLAIN}x::::::allow_nets=10.0.0.0/8\n"
            "gone@example.test:{PLAIN}x::::::nologin\n"
        ),
    }

    def exchange(self, token: str, authzid: str = "") -> list:
        """(Blocking.) OAUTHBEARER with C{token} over implicit TLS, and ^A after a 334."""
        client = self.connect("submissions")
        client.ehlo()
        replies = [client.command(b"AUTH OAUTHBEARER " + b64(oauthbearer(token, authzid)))]
        if replies[0][0] == 334:
            replies.append(client.command(b64(b"\x01")))
        return replies

    @defer.inlineCallbacks
    def test_goodTokenFromElsewhere(self):
        """
        A good token of a login restricted to 10.0.0.0/8, sent from
        127.0.0.1, and one of a suspended login get the same error
        challenge as an expired token, the issuer's discovery URL included
        (RFC 7628 section 3.2.2), then 535: the JSON does not tell that the
        token was good.
        """
        bad = yield self.inThread(self.exchange, self.issuer.mint("far@example.test", lifetime=-90))
        far = yield self.inThread(self.exchange, self.issuer.mint("far@example.test"))
        gone = yield self.inThread(self.exchange, self.issuer.mint("gone@example.test"))
        self.assertEqual(bad[0][0], 334)
        self.assertIn(b"openid-configuration", base64.b64decode(bad[0][1][0]))
        self.assertEqual(far, bad)
        self.assertEqual(gone, bad)

    @defer.inlineCallbacks
    def test_refusalNamesTheTokensLogin(self):
        """
        A token names its login, and OAUTHBEARER need not: the auth refused
        and auth suspended lines name the login the good token is for.
        """
        for login in ("far@example.test", "gone@example.test"):
            yield self.inThread(self.exchange, self.issuer.mint(login))
        self.assertEqual(
            [
                line.split(" session=")[0]
                for line in self.log.matching(r"^auth (refused|suspended)")
            ],
            [
                "auth refused: client=[127.0.0.1] mechanism=OAUTHBEARER login=<far@example.test>: "
                "allow_nets check failed: IP 127.0.0.1 not in allowed networks",
                "auth suspended: client=[127.0.0.1] mechanism=OAUTHBEARER "
                "login=<gone@example.test>",
            ],
        )
