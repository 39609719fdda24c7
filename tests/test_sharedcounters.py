"""
Two running daemons sharing one real redis-server ([state] backend): a
brute force spread over both is stopped at one node's count, the sending
limits count across both, and with Redis gone honest logins go on.
"""

from __future__ import annotations

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.harness import BOB, BOB_PASSWORD, CHEAP_USERS, Daemon, LogWatcher, RawClient, plain
from tests.redisharness import startRedis


class TwoNodesMixin:
    """Two L{Daemon}s on the real reactor, their counters in one Redis."""

    settings: dict = {}

    def setUp(self):
        self.redis = startRedis(self)
        self.log = LogWatcher()
        self.addCleanup(self.log.stop)
        self.clients: list = []
        self.nodes = [self.node() for _ in range(2)]
        # Run first: the daemons stop only once their clients have gone.
        self.addCleanup(lambda: [client.close() for client in self.clients])

    def node(self, **state) -> Daemon:
        settings = {section: dict(values) for section, values in self.settings.items()}
        settings["state"] = {"backend": self.redis.url, "timeout": "0.5s", **state}
        daemon = Daemon(self.mktemp(), settings)
        self.addCleanup(daemon.stop)
        daemon.start()
        return daemon

    def connect(self, node: Daemon, source: str = "127.0.0.1") -> RawClient:
        """(Blocking.) A client of C{node}'s implicit TLS listener, greeting read."""
        client = RawClient(node.ports["submissions"], source=source, tls=True)
        self.clients.append(client)
        return client

    def inThread(self, f, *args):
        return threads.deferToThread(f, *args)


class BruteForceTests(TwoNodesMixin, unittest.TestCase):
    settings = {
        "auth": {
            "max_failures_per_address": "4",
            "tarpit_delay": "0s",
            "failures_per_session": "10",
        }
    }

    @defer.inlineCallbacks
    def test_spreadOverNodesBlockedAtOneNodesCount(self):
        """
        Wrong passwords from one address, alternating between the two
        nodes, are answered 535 three times and 421 4.7.0 at the fourth:
        the count of one node. Both nodes then refuse that address at
        connect; another address is served by both.
        """

        def attack():
            clients = [self.connect(node, "127.0.0.5") for node in self.nodes]
            for client in clients:
                assert client.reply()[0] == 220
                client.ehlo()
            return [clients[n % 2].command(plain(CHEAP_USERS[n], b"wrong")) for n in range(4)]

        replies = yield self.inThread(attack)
        self.assertEqual([code for code, _ in replies], [535, 535, 535, 421])
        self.assertEqual(replies[3][1], [b"4.7.0 Error: too many failed logins, try again later"])

        def greetings(source):
            return [self.connect(node, source).reply() for node in self.nodes]

        self.assertEqual(
            (yield self.inThread(greetings, "127.0.0.5")),
            [(421, [b"4.7.0 Error: too many failed logins, try again later"])] * 2,
        )
        self.assertEqual(
            [code for code, _ in (yield self.inThread(greetings, "127.0.0.6"))], [220, 220]
        )

    @defer.inlineCallbacks
    def test_redisDownHonestLoginsWork(self):
        """
        With Redis stopped, each node says so once and counts in its own
        memory: the right password still logs in (235), a wrong one is
        still answered 535, never 454.
        """
        self.redis.stop()

        def logins():
            codes = []
            for node in self.nodes:
                client = self.connect(node)
                codes.append(client.reply()[0])
                client.ehlo()
                codes.append(client.command(plain(BOB, b"wrong"))[0])
                codes.append(client.command(plain(BOB, BOB_PASSWORD))[0])
            return codes

        self.assertEqual((yield self.inThread(logins)), [220, 535, 235] * 2)
        self.assertEqual(len(self.log.matching(r"^state backend redis://.* failed")), 2)

    @defer.inlineCallbacks
    def test_redisHangingHonestLoginsWork(self):
        """
        A Redis that stops answering (SIGSTOP) costs each node one call's
        timeout, after which it counts in memory: logins still succeed.
        """
        self.redis.pause()

        def login(node):
            client = self.connect(node)
            code = client.reply()[0]
            client.ehlo()
            return [code, client.command(plain(BOB, BOB_PASSWORD))[0]]

        self.assertEqual((yield self.inThread(login, self.nodes[0])), [220, 235])
        self.redis.resume()


class SendingLimitTests(TwoNodesMixin, unittest.TestCase):
    settings = {"limits": {"messages_per_hour": "2"}}

    @defer.inlineCallbacks
    def test_limitCountsAcrossNodes(self):
        """One message through each node reaches a limit of two: the third MAIL gets 451 4.7.1."""

        def send():
            codes = []
            for n in range(3):
                client = self.connect(self.nodes[n % 2])
                client.reply()
                client.ehlo()
                client.command(plain(BOB, BOB_PASSWORD))
                code = client.command(b"MAIL FROM:<bob@example.test>")[0]
                codes.append(code)
                if code == 250:
                    client.command(b"RCPT TO:<alice.plain@example.test>")
                    client.command(b"DATA")
                    codes.append(client.command(b"hello\r\n.")[0])
            return codes, client.lines[-1]

        codes, last = yield self.inThread(send)
        self.assertEqual(codes, [250, 250, 250, 250, 451])
        self.assertEqual(
            last, b"451 4.7.1 Error: bob@example.test reached its limit of 2 messages per hour"
        )
