"""
The realm with the address forms and parameters the session hands over:
quoted local parts and IDNA domains routed by their key (issue 10 item 2,
RFC 6531), SMTPUTF8 in the Received header, and the DSN parameters and
options kept for the queue (RFC 3461), with delivery reports for local
recipients that ask for them.
"""

from __future__ import annotations

import email
import email.policy
import os

from twisted.internet.task import Clock
from twisted.mail.interfaces import IMessageDeliveryFactory
from twisted.trial import unittest

from mailauth.addresses import MailParameters, RcptParameters, Recipient, parsePath
from mailauth.addressmap import AddressMap
from mailauth.envelope import MessageOptions
from mailauth.realm import Realm
from mailauth.replies import SMTPReply
from mailauth.routing import Router
from mailauth.userdb import UserDatabase
from tests.fakes import MemoryQueue, MemoryUserDatabase, runInline
from tests.harness import LogWatcher

USERS = {
    "bob@example.org": "{PLAIN}b",
    "carol@example.org": "{PLAIN}c",
    "jörg@bücher.example": "{PLAIN}j",
}


class FakeSession:
    def tlsDescription(self):
        return "TLSv1.3 with cipher TLS_AES_128_GCM_SHA256"


class RoutingTestsMixin:
    """A realm over example.org and bücher.example, with a catch-all alias to bob."""

    withQueue = True

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        aliases = os.path.join(os.path.abspath(self.mktemp()))
        with open(aliases, "w", encoding="utf-8") as f:
            f.write(
                "@example.org: bob@example.org\n"
                "list@example.org: carol@example.org, far@remote.example\n"
                "info@xn--bcher-kva.example: jörg@bücher.example\n"
            )
        self.router = Router(
            localDomains={"example.org", "xn--bcher-kva.example"},
            maildirTemplate=self.dir + "/{domain}/{localpart}/Maildir",
            users=MemoryUserDatabase(dict(USERS)),
            aliases=AddressMap(aliases),
            senderMap=AddressMap(None),
            senderLoginMatch=True,
        )
        self.queue = MemoryQueue() if self.withQueue else None
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.woken = 0
        self.realm = Realm(
            router=self.router,
            hostname="mx.example.org",
            runBlocking=runInline,
            queue=self.queue,
            wakeQueue=self.wake,
            clock=self.clock,
        )

    def wake(self) -> None:
        self.woken += 1

    def delivery(self, login):
        _, avatar, _ = self.realm.requestAvatar(login, None, IMessageDeliveryFactory)
        return avatar.getMessageDelivery()

    def recipient(self, path: str, mail=None, params=None):
        mail = mail or MailParameters()
        params = params or RcptParameters()
        address = parsePath(path, allowNull=False, utf8=mail.smtputf8)
        return Recipient(address, (b"c", "192.0.2.1"), FakeSession(), b"", params, mail)

    def delivered(self, domain: str, local: str) -> list:
        new = os.path.join(self.dir, domain, local, "Maildir", "new")
        if not os.path.isdir(new):
            return []
        out = []
        for name in sorted(os.listdir(new)):
            with open(os.path.join(new, name), "rb") as f:
                out.append(f.read())
        return out

    def send(
        self, login, sender, recipients, body=b"Subject: x\r\n\r\nbody\r\n", session="5E5510N"
    ):
        d = self.delivery(login)
        d.session = session
        self.successResultOf(d.validateFrom(None, parsePath(sender, True, True)))
        factory = None
        for user in recipients:
            factory = self.successResultOf(d.validateTo(user))
        message = factory()
        message.write(d.receivedHeader((b"c", "192.0.2.1"), None, recipients))
        message.write(body)
        self.successResultOf(message.eomReceived())
        return d


class QuotedLocalPartTests(RoutingTestsMixin, unittest.TestCase):
    """Issue 10 item 2: quoted local parts are the mailbox they name."""

    def test_senderBindingNotBypassed(self) -> None:
        """
        With a catch-all alias to bob, bob may not send as C{"carol"} or
        C{"c\\arol"}: they are carol's address, and carol exists.
        """
        for sender in ('<"carol"@example.org>', '<"c\\arol"@example.org>', "<CAROL@example.org>"):
            d = self.delivery("bob@example.org")
            f = self.failureResultOf(d.validateFrom(None, parsePath(sender, True)), SMTPReply)
            self.assertEqual(f.value.code, 553, sender)
        d = self.delivery("bob@example.org")
        self.successResultOf(d.validateFrom(None, parsePath('<"nobody"@example.org>', True)))

    def test_quotedRecipientReachesItsMailbox(self) -> None:
        """C{RCPT TO:<"carol"@example.org>} lands in carol's Maildir, not bob's."""
        self.send(
            "bob@example.org",
            "<bob@example.org>",
            [
                self.recipient('<"carol"@example.org>'),
                self.recipient('<"c\\arol"@example.org>'),
            ],
        )
        self.assertEqual(len(self.delivered("example.org", "carol")), 1)
        self.assertEqual(self.delivered("example.org", "bob"), [])


class InternationalTests(RoutingTestsMixin, unittest.TestCase):
    """RFC 6531: IDNA domains and UTF-8 local parts routed by one key."""

    def test_localDomainsInEitherForm(self) -> None:
        """U-labels and A-labels of a local domain are both local."""
        for address in ("x@bücher.example", "x@XN--BCHER-KVA.example", "x@BÜCHER.example."):
            self.assertTrue(self.router.isLocal(address), address)
        self.assertFalse(self.router.isLocal("x@bucher.example"))

    def test_utf8LoginSendsAsItself(self) -> None:
        """A UTF-8 login may send as itself in any spelling of its domain, and as its alias."""
        for sender in (
            "<jörg@bücher.example>",
            "<Jörg@xn--bcher-kva.example>",
            "<info@bücher.example>",
        ):
            d = self.delivery("jörg@bücher.example")
            self.successResultOf(d.validateFrom(None, parsePath(sender, True, True)))

    def test_utf8Delivery(self) -> None:
        """
        Mail to a UTF-8 address is stored in the Maildir of its key: the
        domain in A-labels, the local part lower-cased in NFC; the Received
        header says UTF8SMTPSA (RFC 6531 3.7.3) and names it in UTF-8.
        """
        mail = MailParameters(smtputf8=True)
        self.send(
            "jörg@bücher.example",
            "<jörg@bücher.example>",
            [self.recipient("<JO\u0308RG@bücher.example>", mail)],
            body="Subject: grüße\r\n\r\nä\r\n".encode(),
        )
        [stored] = self.delivered("xn--bcher-kva.example", "jörg")
        self.assertIn(b" with UTF8SMTPSA id ", stored)
        # The wire form keeps the local part as the client wrote it.
        self.assertIn("for <JO\u0308RG@bücher.example>;".encode(), stored)
        self.assertIn("Subject: grüße\n".encode(), stored)

    def test_asciiReceivedWithoutSMTPUTF8(self) -> None:
        """Without SMTPUTF8 the Received header stays ASCII, even for a UTF-8 login."""
        d = self.delivery("jörg@bücher.example")
        header = d.receivedHeader((b"c", "192.0.2.1"), None, [self.recipient("<bob@example.org>")])
        self.assertTrue(header.isascii(), header)
        self.assertIn(b"(authenticated as j+C3+B6rg@xn--bcher-kva.example)", header)
        self.assertIn(b" with ESMTPSA id ", header)


class DSNOptionTests(RoutingTestsMixin, unittest.TestCase):
    """RFC 3461: what the client asked goes with the message into the queue."""

    def test_optionsQueued(self) -> None:
        """
        RET, ENVID and SMTPUTF8 reach the queue; each remote recipient keeps
        its NOTIFY and ORCPT, and one reached through an alias gets the
        address the sender wrote as its ORCPT.
        """
        mail = MailParameters(smtputf8=True, ret="HDRS", envid="E1")
        self.send(
            "bob@example.org",
            "<bob@example.org>",
            [
                self.recipient(
                    "<x@remote.example>",
                    mail,
                    RcptParameters(notify=("FAILURE",), orcpt="rfc822;X@remote.example"),
                ),
                self.recipient("<list@example.org>", mail, RcptParameters(notify=("NEVER",))),
            ],
        )
        [writer] = self.queue.writers
        self.assertEqual(writer.options, MessageOptions(smtputf8=True, ret="HDRS", envid="E1"))
        self.assertEqual(
            [(s.address, s.notify, s.orcpt) for s in writer.statuses],
            [
                ("x@remote.example", ("FAILURE",), "rfc822;X@remote.example"),
                ("far@remote.example", ("NEVER",), "rfc822;list@example.org"),
            ],
        )
        self.assertEqual(len(self.delivered("example.org", "carol")), 1)

    def test_successReportQueued(self) -> None:
        """
        A local recipient with NOTIFY=SUCCESS: a "delivered" report from
        <> goes to the sender through the queue (RFC 3461 5.2.3), with the
        ENVID and the message's header.
        """
        mail = MailParameters(envid="ENV+2B1")
        self.send(
            "bob@example.org",
            "<bob@example.org>",
            [
                self.recipient("<carol@example.org>", mail, RcptParameters(notify=("SUCCESS",))),
            ],
            body=b"Subject: report me\r\n\r\nsecret body\r\n",
        )
        [report] = self.queue.writers
        self.assertEqual((report.sender, report.recipients), ("", ["bob@example.org"]))
        self.assertTrue(report.committed)
        self.assertEqual(self.woken, 1)
        message = email.message_from_bytes(report.data, policy=email.policy.default)
        self.assertEqual(message["Subject"], "Successful Mail Delivery Report")
        perMessage, perRecipient = message.get_payload()[1].get_payload()
        self.assertEqual(perMessage["Original-Envelope-Id"], "ENV+1")
        self.assertEqual(
            (perRecipient["Final-Recipient"], perRecipient["Action"], perRecipient["Status"]),
            ("rfc822; carol@example.org", "delivered", "2.0.0"),
        )
        self.assertIn(b"Subject: report me", report.data)
        self.assertNotIn(b"secret body", report.data)

    def reports(self, writers) -> list:
        """(action, Final-Recipient, Original-Recipient) of each report among C{writers}."""
        found = []
        for writer in writers:
            if writer.sender != "":
                continue
            message = email.message_from_bytes(writer.data, policy=email.policy.default)
            for perRecipient in message.get_payload()[1].get_payload()[1:]:
                found.append(
                    (
                        perRecipient["Action"],
                        perRecipient["Final-Recipient"],
                        perRecipient["Original-Recipient"],
                    )
                )
        return found

    def test_expandedAlias(self) -> None:
        """
        An alias of several addresses with NOTIFY=SUCCESS (RFC 3461
        5.2.7.3): one "expanded" report for the alias, with the sender's
        ORCPT; no "delivered" report for its local member, and its remote
        member is queued without SUCCESS (its FAILURE kept).
        """
        self.send(
            "bob@example.org",
            "<bob@example.org>",
            [
                self.recipient(
                    "<list@example.org>",
                    params=RcptParameters(
                        notify=("SUCCESS", "FAILURE"), orcpt="rfc822;List@example.org"
                    ),
                ),
            ],
        )
        message, report = self.queue.writers
        self.assertEqual(
            [(s.address, s.notify, s.orcpt) for s in message.statuses],
            [("far@remote.example", ("FAILURE",), "rfc822;List@example.org")],
        )
        self.assertEqual(
            self.reports([report]),
            [("expanded", "rfc822; list@example.org", "rfc822; List@example.org")],
        )
        self.assertIn(b"Subject: Successful Mail Delivery Report", report.data)
        self.assertEqual(len(self.delivered("example.org", "carol")), 1)

    def test_expandedSuccessOnly(self) -> None:
        """NOTIFY=SUCCESS alone: the alias's members are queued with NEVER."""
        self.send(
            "bob@example.org",
            "<bob@example.org>",
            [self.recipient("<list@example.org>", params=RcptParameters(notify=("SUCCESS",)))],
        )
        message, report = self.queue.writers
        self.assertEqual([s.notify for s in message.statuses], [("NEVER",)])
        self.assertEqual([r[0] for r in self.reports([report])], ["expanded"])

    def test_oneAddressAliasIsDelivered(self) -> None:
        """
        An alias of one address is that address: "delivered", as for any
        local recipient (the catch-all to bob here), beside an "expanded"
        report for an alias of several in the same transaction; each
        logged with its action and the session.
        """
        log = LogWatcher()
        self.addCleanup(log.stop)
        d = self.send(
            "bob@example.org",
            "<bob@example.org>",
            [
                self.recipient("<anyone@example.org>", params=RcptParameters(notify=("SUCCESS",))),
                self.recipient("<list@example.org>", params=RcptParameters(notify=("SUCCESS",))),
            ],
        )
        self.assertEqual(
            sorted(self.reports(self.queue.writers)),
            [
                ("delivered", "rfc822; anyone@example.org", None),
                ("expanded", "rfc822; list@example.org", None),
            ],
        )
        self.assertEqual(
            log.matching("^delivery report for "),
            [
                f"delivery report for {d.id} to <bob@example.org>: {action} session=5E5510N"
                for action in ("delivered", "expanded")
            ],
        )

    def test_noReportUnlessAsked(self) -> None:
        """Without NOTIFY=SUCCESS, or for the null sender, no report is made."""
        self.send(
            "bob@example.org",
            "<bob@example.org>",
            [
                self.recipient("<carol@example.org>", params=RcptParameters(notify=("FAILURE",))),
            ],
        )
        self.send(
            "bob@example.org",
            "<>",
            [
                self.recipient("<carol@example.org>", params=RcptParameters(notify=("SUCCESS",))),
            ],
        )
        self.assertEqual(self.queue.writers, [])
        self.assertEqual(len(self.delivered("example.org", "carol")), 2)


class ReportWithoutQueueTests(RoutingTestsMixin, unittest.TestCase):
    withQueue = False

    def test_reportToLocalSender(self) -> None:
        """Without a [relay], the delivery report goes straight to a local sender's Maildir."""
        self.send(
            "bob@example.org",
            "<bob@example.org>",
            [
                self.recipient("<carol@example.org>", params=RcptParameters(notify=("SUCCESS",))),
            ],
        )
        [report] = self.delivered("example.org", "bob")
        self.assertIn(b"Subject: Successful Mail Delivery Report", report)
        self.assertIn(b"Action: delivered", report)


class UsersFileKeyTests(unittest.TestCase):
    """UTF-8 logins in the users file, looked up by their key."""

    def test_eitherDomainForm(self) -> None:
        """
        A login written with U-labels is found by its A-label spelling and
        any case; a second line for the same key is a duplicate.
        """
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write('Jörg@Bücher.example:{PLAIN}a\n"jörg"@xn--bcher-kva.example:{PLAIN}b\n')
        users = UserDatabase(path)
        users.load()
        user = users.get("JÖRG@xn--bcher-kva.example")
        self.assertIsNotNone(user)
        self.assertEqual(user.login, "jörg@bücher.example")
        self.assertEqual(len(users.problems), 1)
        self.assertIn("duplicate login", users.problems[0])
