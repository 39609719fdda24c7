"""
The real daemon (L{mailauth.tap}, 127.0.0.1 port 0, real files) attacked and
used as issues 10 and 14 describe: quoted local parts against a catch-all
alias, addresses that cannot be relayed, reply lengths, a UTF-8 round trip
to a Maildir and to a relay, a BDAT session, and DSN parameters honoured.
"""

from __future__ import annotations

import base64
import email
import email.policy
import glob
import os

import attrs
from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailauth.envelope import RecipientStatus
from mailauth.spool import Queue, Spool
from tests.harness import ClockedReactor, Daemon, LogWatcher, RawClient, plain, smtpClient
from tests.smtpsink import QueueEvents, SMTPSink
from tests.support import holdPort

USERS = (
    "bob@example.test:{PLAIN}bob-secret-2\n"
    "carol@example.test:{PLAIN}carol-secret\n"
    "zoë@example.test:{PLAIN}zoë-secret\n"
    "jörg@bücher.example:{PLAIN}jörg-secret\n"
)


class DaemonMixin:
    """
    A daemon with users bob, carol, zoë@example.test and jörg@bücher.example,
    a catch-all alias of example.test to bob, an alias team@ of carol and
    far@remote.example, and a C{[relay]} to an
    L{SMTPSink} (plain SMTP, no AUTH) whose extensions each test chooses.
    """

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.events = QueueEvents()
        self.events.start(self)
        self.sink = SMTPSink(reactor, None, tls="none", credentials=None)
        yield self.sink.start()
        self.addCleanup(self.sink.stop)
        self.daemon = Daemon(
            self.mktemp(),
            settings={
                "delivery": {
                    "local_domains": "example.test bücher.example",
                    "aliases": "{dir}/aliases",
                }
            },
            files={
                "users": USERS,
                "aliases": "team@example.test: carol@example.test, far@remote.example\n"
                "@example.test: bob@example.test\n",
            },
            extra=f"\n[relay]\nhost = 127.0.0.1\nport = {self.sink.port}\ntls = none\n"
            "retry_initial = 1s\n",
        )
        self.addCleanup(self.daemon.stop)
        self.daemon.start()
        self.log = LogWatcher()
        self.addCleanup(self.log.stop)
        self.clients: list = []
        self.addCleanup(lambda: [c.close() for c in self.clients])

    def client(self, login: str = "bob@example.test", password: str = "bob-secret-2"):
        """(Blocking.) A raw client over implicit TLS, logged in."""
        client = RawClient(self.daemon.ports["submissions"], tls=True)
        self.clients.append(client)
        assert client.reply()[0] == 220
        client.ehlo()
        code, text = client.command(plain(login.encode(), password.encode()))
        assert code == 235, (code, text)
        return client

    def maildir(self, domain: str, local: str) -> list:
        """The messages in a Maildir's new/ (the path uses the address key)."""
        out = []
        for name in sorted(
            glob.glob(os.path.join(self.daemon.dir, "mail", domain, local, "Maildir", "new", "*"))
        ):
            with open(name, "rb") as f:
                out.append(f.read())
        return out

    def inThread(self, f, *args):
        return threads.deferToThread(f, *args)


class AddressFormTests(DaemonMixin, unittest.TestCase):
    """Issue 10 items 2, 9, 10 and 12 against the running server."""

    @defer.inlineCallbacks
    def test_quotedLocalPartsAreTheirMailbox(self):
        """
        With a catch-all alias to bob: bob cannot send as C{"carol"} or
        C{"c\\arol"} (carol's address), may send as a name nobody has, and
        mail to C{"carol"@example.test} lands in carol's Maildir, not bob's.
        """

        def run():
            c = self.client()
            codes = []
            for sender in (
                b'<"carol"@example.test>',
                b'<"c\\arol"@example.test>',
                b"<nobody@example.test>",
            ):
                codes.append(c.command(b"MAIL FROM:" + sender)[0])
                c.command(b"RSET")
            c.command(b"MAIL FROM:<bob@example.test>")
            codes.append(c.command(b'RCPT TO:<"carol"@example.test>')[0])
            codes.append(c.command(b"DATA")[0])
            codes.append(c.command(b"Subject: to carol\r\n\r\nhi\r\n.")[0])
            return codes

        codes = yield self.inThread(run)
        self.assertEqual(codes, [553, 553, 250, 250, 354, 250])
        [message] = self.maildir("example.test", "carol")
        self.assertIn(b"Subject: to carol", message)
        self.assertEqual(self.maildir("example.test", "bob"), [])

    @defer.inlineCallbacks
    def test_unrelayableRefusedAtRcpt(self):
        """
        C{RCPT TO:<"x>y"@remote.example>} gets 553 at RCPT; the rest of the
        transaction goes on and is relayed (no 451 at DATA).
        """

        def run():
            c = self.client()
            c.command(b"MAIL FROM:<bob@example.test>")
            refused = c.command(b'RCPT TO:<"x>y"@remote.example>')
            c.command(b"RCPT TO:<ok@remote.example>")
            c.command(b"DATA")
            return refused, c.command(b"Subject: x\r\n\r\nhi\r\n.")

        (code, text), (final, _) = yield self.inThread(run)
        self.assertEqual(code, 553)
        self.assertTrue(text[0].startswith(b"5.1.3 "), text)
        self.assertEqual(final, 250)
        [transaction] = yield self.sink.waitForTransactions(1)
        self.assertEqual(transaction.recipients, ("ok@remote.example",))
        yield self.events.wait("removed")

    @defer.inlineCallbacks
    def test_shortRepliesAndSyntax(self):
        """
        Every reply line stays within 512 octets however long the input
        (issue 10 item 10), and C{RCPT TO:<bad syntax} gets 501 5.1.3
        (item 12).
        """

        def run():
            c = self.client()
            c.command(b"MAIL FROM:<bob@example.test> " + b"X" * 10000)
            c.command(b"MAIL FROM:<bob@example.test>")
            c.command(b"RCPT TO:<" + b"r" * 10000 + b"@remote.example>")
            c.command(b"RCPT TO:<bob@example.test> " + b"N=1 " * 2000 + b"N=2")
            return c.command(b"RCPT TO:<bad syntax"), list(c.lines)

        (code, text), lines = yield self.inThread(run)
        self.assertEqual((code, text), (501, [b"5.1.3 Bad recipient address syntax"]))
        self.assertLessEqual(max(len(line) + 2 for line in lines), 512)


class InternationalTests(DaemonMixin, unittest.TestCase):
    """Issue 14: SMTPUTF8 end to end with smtplib's SMTPUTF8 option."""

    def smtplibSend(self, login, password, sender, recipients, message):
        """(Blocking.) smtplib over implicit TLS with SMTPUTF8; UTF-8 AUTH PLAIN done by hand."""
        client = smtpClient(self.daemon.ports["submissions"], implicit=True)
        try:
            client.ehlo()
            assert client.has_extn("smtputf8"), client.esmtp_features
            # smtplib encodes AUTH responses as ASCII; the UTF-8 login is
            # base64 of its UTF-8 bytes (RFC 4616).
            token = base64.b64encode(b"\0" + login.encode() + b"\0" + password.encode())
            code, _ = client.docmd("AUTH", "PLAIN " + token.decode())
            assert code == 235, code
            return client.sendmail(sender, recipients, message, mail_options=["SMTPUTF8"])
        finally:
            client.quit()

    @defer.inlineCallbacks
    def test_utf8RoundTrip(self):
        """
        A UTF-8 login sends with SMTPUTF8 to a UTF-8 local user and a UTF-8
        remote address: the Maildir (domain in A-labels) and the relay that
        offers SMTPUTF8 get the message with UTF-8 header fields, the
        Received header says UTF8SMTPSA, and the relay sees the addresses
        as written.
        """
        self.sink.extensions = [b"SMTPUTF8"]
        message = (
            "From: Jörg <jörg@bücher.example>\r\nTo: zoë@example.test\r\n"
            "Subject: grüße\r\n\r\nHallo Zoë.\r\n"
        ).encode()
        result = yield self.inThread(
            self.smtplibSend,
            "jörg@bücher.example",
            "jörg-secret",
            "jörg@bücher.example",
            ["zoë@example.test", "anna@exämple.org"],
            message,
        )
        self.assertEqual(result, {})
        [stored] = self.maildir("example.test", "zoë")
        self.assertIn(b" with UTF8SMTPSA id ", stored)
        self.assertIn("(authenticated as jörg@bücher.example)".encode(), stored)
        # Submission adds Date: and Message-ID:; the header and body are kept.
        head, _, body = message.partition(b"\r\n\r\n")
        self.assertIn(head.replace(b"\r\n", b"\n") + b"\n", stored)
        self.assertTrue(stored.endswith(b"\n\n" + body.replace(b"\r\n", b"\n")))
        [transaction] = yield self.sink.waitForTransactions(1)
        self.assertEqual(
            (transaction.sender, transaction.recipients),
            ("jörg@bücher.example", ("anna@exämple.org",)),
        )
        self.assertIn("SMTPUTF8", transaction.mailParameters)
        self.assertIn(head + b"\r\n", transaction.data)
        self.assertTrue(transaction.data.endswith(b"\r\n\r\n" + body))
        yield self.events.wait("removed")

    @defer.inlineCallbacks
    def test_downgradeOrBounce(self):
        """
        To a relay without SMTPUTF8: an ASCII local part at a UTF-8 domain
        goes on in A-labels, a UTF-8 local part bounces with 5.6.7 to the
        sender's Maildir.
        """
        message = b"Subject: ascii only\r\n\r\nhi\r\n"
        result = yield self.inThread(
            self.smtplibSend,
            "bob@example.test",
            "bob-secret-2",
            "bob@example.test",
            ["anna@exämple.org", "zoë@exämple.org"],
            message,
        )
        self.assertEqual(result, {})
        [transaction] = yield self.sink.waitForTransactions(1)
        self.assertEqual(transaction.recipients, ("anna@xn--exmple-cua.org",))
        self.assertNotIn("SMTPUTF8", transaction.mailParameters)
        yield self.events.wait("bounce")
        yield self.events.wait("removed", count=2)
        [bounce] = self.maildir("example.test", "bob")
        self.assertIn(b"Status: 5.6.7", bounce)
        self.assertIn("Final-Recipient: utf-8; zoë@exämple.org".encode(), bounce)


class ChunkingTests(DaemonMixin, unittest.TestCase):
    """Issue 14: a BDAT session against the running server, relayed with BDAT."""

    @defer.inlineCallbacks
    def test_bdatSession(self):
        """
        BDAT chunks pipelined with MAIL and RCPT store exactly the chunks'
        bytes (dots and all) in the Maildir and relay them, with BDAT, to a
        relay that offers CHUNKING.
        """
        self.sink.extensions = [b"CHUNKING"]
        body = b"Subject: chunks\r\n\r\n.leading dot\r\n.\r\nMAIL FROM:<evil@evil.test>\r\n"

        def run():
            c = self.client()
            c.send(
                b"MAIL FROM:<bob@example.test>\r\nRCPT TO:<carol@example.test>\r\n"
                b"RCPT TO:<far@remote.example>\r\n"
                + b"BDAT 20\r\n"
                + body[:20]
                + b"BDAT %d LAST\r\n" % (len(body) - 20,)
                + body[20:]
                + b"NOOP\r\n"
            )
            return [c.reply() for _ in range(6)]

        replies = yield self.inThread(run)
        self.assertEqual([code for code, _ in replies], [250, 250, 250, 250, 250, 250])
        self.assertEqual(replies[3][1], [b"2.0.0 Ok: 20 octets"])
        # Exactly the chunks' bytes, after the header fields submission adds.
        head, _, text = body.partition(b"\r\n\r\n")
        [stored] = self.maildir("example.test", "carol")
        self.assertIn(head.replace(b"\r\n", b"\n") + b"\n", stored)
        self.assertTrue(stored.endswith(b"\n\n" + text.replace(b"\r\n", b"\n")), stored)
        [transaction] = yield self.sink.waitForTransactions(1)
        self.assertTrue(transaction.data.endswith(b"\r\n\r\n" + text))
        self.assertEqual(len(transaction.chunks), 1)
        yield self.events.wait("removed")

    @defer.inlineCallbacks
    def test_lastLineWithoutLineEnd(self):
        """
        Content sent with C{BDAT n LAST} that stops without a CRLF is
        stored in the Maildir ending with a line end (LF, as the Maildir
        stores every line), as the relay gets it (CRLF), and the C{,S=} of
        the file name is still the size of the file.
        """
        body = b"Subject: unfinished\r\n\r\nfirst line\r\nno line end"

        def run():
            c = self.client()
            c.send(
                b"MAIL FROM:<bob@example.test>\r\nRCPT TO:<carol@example.test>\r\n"
                b"RCPT TO:<far@remote.example>\r\nBDAT %d LAST\r\n" % (len(body),) + body
            )
            return [c.reply() for _ in range(4)]

        replies = yield self.inThread(run)
        self.assertEqual([code for code, _ in replies], [250, 250, 250, 250])
        [path] = glob.glob(
            os.path.join(self.daemon.dir, "mail", "example.test", "carol", "Maildir", "new", "*")
        )
        [stored] = self.maildir("example.test", "carol")
        self.assertTrue(stored.endswith(b"\n\nfirst line\nno line end\n"), stored[-60:])
        self.assertTrue(path.endswith(f",S={len(stored)}"), (path, len(stored)))
        [transaction] = yield self.sink.waitForTransactions(1)
        self.assertTrue(transaction.data.endswith(b"\r\nfirst line\r\nno line end\r\n"))
        yield self.events.wait("removed")


class NotificationTests(DaemonMixin, unittest.TestCase):
    """Issue 14: a message with DSN parameters, against relays with and without DSN."""

    def send(self, mail: bytes, rcpt: bytes):
        def run():
            c = self.client()
            c.command(b"MAIL FROM:<bob@example.test> " + mail)
            c.command(b"RCPT TO:<far@remote.example> " + rcpt)
            c.command(b"DATA")
            return c.command(b"Subject: dsn test\r\n\r\nbody\r\n.")

        return self.inThread(run)

    @defer.inlineCallbacks
    def test_passedToRelayWithDSN(self):
        """RET, ENVID, NOTIFY and ORCPT reach a relay that offers DSN; no report is sent here."""
        self.sink.extensions = [b"DSN"]
        code, _ = yield self.send(
            b"RET=HDRS ENVID=dsn+2Btest", b"NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;far@remote.example"
        )
        self.assertEqual(code, 250)
        [transaction] = yield self.sink.waitForTransactions(1)
        self.assertIn("RET=HDRS ENVID=dsn+2Btest", transaction.mailParameters)
        self.assertEqual(
            transaction.rcptParameters, ("NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;far@remote.example",)
        )
        yield self.events.wait("removed")
        self.assertEqual(self.maildir("example.test", "bob"), [])

    @defer.inlineCallbacks
    def test_relayedReport(self):
        """NOTIFY=SUCCESS and a relay without DSN: the sender gets a "relayed" report."""
        yield self.send(b"ENVID=E1", b"NOTIFY=SUCCESS")
        yield self.sink.waitForTransactions(1)
        yield self.events.wait("bounce")
        yield self.events.wait("removed", count=2)
        [report] = self.maildir("example.test", "bob")
        message = email.message_from_bytes(
            report.replace(b"\n", b"\r\n"), policy=email.policy.default
        )
        self.assertEqual(message["Subject"], "Successful Mail Delivery Report")
        self.assertIn(b"Action: relayed", report)
        self.assertIn(b"Original-Envelope-Id: E1", report)

    @defer.inlineCallbacks
    def test_expandedAlias(self):
        """
        NOTIFY=SUCCESS,FAILURE to an alias of two addresses (RFC 3461
        5.2.7.3): the sender gets one "expanded" report for the alias, the
        relay gets the remote member with NOTIFY=FAILURE only, and the
        local member gets the message without a report of its own.
        """
        self.sink.extensions = [b"DSN"]

        def run():
            c = self.client()
            c.command(b"MAIL FROM:<bob@example.test> ENVID=T1")
            c.command(b"RCPT TO:<team@example.test> NOTIFY=SUCCESS,FAILURE")
            c.command(b"DATA")
            return c.command(b"Subject: team\r\n\r\nbody\r\n.")

        code, _ = yield self.inThread(run)
        self.assertEqual(code, 250)
        [transaction] = yield self.sink.waitForTransactions(1)
        self.assertEqual(
            transaction.rcptParameters, ("NOTIFY=FAILURE ORCPT=rfc822;team@example.test",)
        )
        yield self.events.wait("removed", count=2)
        [report] = self.maildir("example.test", "bob")
        self.assertIn(b"Action: expanded", report)
        self.assertIn(b"Final-Recipient: rfc822; team@example.test", report)
        self.assertIn(b"Original-Envelope-Id: T1", report)
        self.assertNotIn(b"Action: delivered", report)
        [stored] = self.maildir("example.test", "carol")
        self.assertIn(b"Subject: team", stored)

    @defer.inlineCallbacks
    def test_neverMeansNoBounce(self):
        """NOTIFY=NEVER: a recipient the relay refuses gets no bounce."""
        self.sink.rcptReplies = {"far@remote.example": [b"550 5.1.1 no such user"]}
        yield self.send(b"", b"NOTIFY=NEVER")
        yield self.events.wait("bounced")
        yield self.events.wait("removed")
        self.assertEqual(self.maildir("example.test", "bob"), [])
        self.assertNotIn("bounce", [e["queueEvent"] for e in self.events.events])

    @defer.inlineCallbacks
    def test_bounceWithOriginalRecipient(self):
        """Without NEVER a refused recipient bounces, naming its ORCPT and the full message."""
        self.sink.rcptReplies = {"far@remote.example": [b"550 5.1.1 no such user"]}
        yield self.send(b"RET=FULL", b"ORCPT=rfc822;Far+40Remote")
        yield self.events.wait("bounce")
        yield self.events.wait("removed", count=2)
        [bounce] = self.maildir("example.test", "bob")
        self.assertIn(b"Original-Recipient: rfc822; Far@Remote", bounce)
        self.assertIn(b"Content-Type: message/rfc822", bounce)
        self.assertIn(b"\nbody\n", bounce)


class DelayNoticeTests(unittest.TestCase):
    """
    Delay notices (NOTIFY=DELAY) from the real daemon, built on a clock the
    test drives.
    """

    timeout = 30

    def setUp(self):
        self.clock = Clock()
        self.events = QueueEvents()
        self.events.start(self)
        self.log = LogWatcher()
        self.addCleanup(self.log.stop)

    def restartWithQueue(self, count: int, now: float, **relay):
        """
        Start the daemon at C{now} on a queue that holds C{count} messages
        from bob, each to a remote recipient with NOTIFY=DELAY, that arrived
        at 0 and were tried then (their next attempt is an hour later), as
        the daemon finds them after a restart while the relay was down.
        """
        self.daemon = Daemon(
            self.mktemp(),
            settings={
                # The disk pool queues at most 2 * max_connections calls.
                "server": {"max_connections": "2"},
                "relay": {
                    "host": "127.0.0.1",
                    "port": str(holdPort(self)),
                    "tls": "none",
                    "retry_initial": "1h",
                    "delay_warning": "10m",
                    **relay,
                },
            },
            reactor=ClockedReactor(self.clock),
        )
        self.addCleanup(self.daemon.stop)
        spool = Spool(os.path.join(self.daemon.config.server.state_dir, "queue"))
        queue = Queue(spool.directory, self.clock, "mx.example.test")
        for n in range(count):
            writer = queue.newMessage(
                f"m{n}",
                "bob@example.test",
                [RecipientStatus("far@remote.example", notify=("DELAY",))],
            )
            writer.write(b"Subject: %d\r\n\r\nbody\r\n" % n)
            writer.commit()
            spool.update(f"m{n}", lambda e: attrs.evolve(e, attempts=1, nextAttempt=3600.0))
        self.clock.advance(now)
        self.daemon.start()

    @defer.inlineCallbacks
    def test_manyDueTogether(self):
        """
        More delay notices due at once than the disk pool may queue calls
        for (at a restart): each is queued and delivered to the sender's
        Maildir, and none fails for a busy pool (the queue took a call of
        the pool for every due notice, and every due delivery, at once: the
        calls past the pool's bound failed, each with a traceback, to be
        tried again an hour later).
        """
        failed = self.log.waitFor("(delay notification|delivery attempt) failed")
        queued = self.events.wait("bounce", count=12)
        self.restartWithQueue(12, now=600.0)
        yield defer.DeferredList([failed, queued], fireOnOneCallback=True)
        # The notices' own delivery starts at the scan their commit asked for.
        self.clock.advance(0)
        delivered = self.events.wait("removed", count=12)
        yield defer.DeferredList([failed, delivered], fireOnOneCallback=True)
        self.assertEqual(self.log.matching(" failed"), [])
        notices = self.daemon.delivered("bob@example.test")
        self.assertEqual(len(notices), 12)
        for _, notice in notices:
            self.assertIn(b"\nAction: delayed\n", notice)
