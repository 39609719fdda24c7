"""Tests for L{mailauth.dsn}: the RFC 3464 bounces the queue sends."""

from __future__ import annotations

import email
import email.policy

from twisted.trial import unittest

from mailauth import dsn
from tests.support import EPOCH, HEADERS, MESSAGE


class BounceTests(unittest.TestCase):
    """L{dsn.buildReport} for failures."""

    def bounce(self, failures, headers=HEADERS):
        return dsn.buildReport(
            hostname="mail.example.org",
            queueID="m1",
            messageID="b1@mail.example.org",
            boundary="b1/mail.example.org",
            sender="alice@example.org",
            arrival=EPOCH,
            now=EPOCH + 60,
            recipients=failures,
            original=headers,
            relayHost="relay.test",
        )

    def test_report(self):
        """
        The bounce is a multipart/report of type delivery-status from
        MAILER-DAEMON, with per-recipient fields and the original headers.
        """
        data = self.bounce(
            [
                dsn.FailedRecipient("bob@remote.example", reply="550 5.1.1 <bob>: no such user"),
                dsn.FailedRecipient(
                    "carol@remote.example", reply="451 4.3.0 later", error="refused", expired=True
                ),
                dsn.FailedRecipient(
                    "dave@remote.example", error="connection refused", expired=True
                ),
            ]
        )
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))
        message = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(message["From"], "Mail Delivery System <MAILER-DAEMON@mail.example.org>")
        self.assertIn(b"\r\nTo: <alice@example.org>\r\n", data)
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(message.get_param("report-type"), "delivery-status")
        text, status, headers = message.get_payload()
        self.assertEqual(text.get_content_type(), "text/plain")
        self.assertIn("<bob@remote.example>: host relay.test said: 550 5.1.1", text.get_content())
        self.assertEqual(status.get_content_type(), "message/delivery-status")
        perMessage, *perRecipient = status.get_payload()
        self.assertEqual(perMessage["Reporting-MTA"], "dns; mail.example.org")
        self.assertEqual(
            [
                (r["Final-Recipient"], r["Action"], r["Status"], r["Diagnostic-Code"])
                for r in perRecipient
            ],
            [
                (
                    "rfc822; bob@remote.example",
                    "failed",
                    "5.1.1",
                    "smtp; 550 5.1.1 <bob>: no such user",
                ),
                ("rfc822; carol@remote.example", "failed", "4.3.0", "smtp; 451 4.3.0 later"),
                ("rfc822; dave@remote.example", "failed", "4.4.7", None),
            ],
        )
        self.assertEqual(headers.get_content_type(), "text/rfc822-headers")
        self.assertIn(b"Subject: hello\r\n", data)
        self.assertNotIn(b"Hello Bob.", data)

    def test_hostileReply(self):
        """A reply cannot add header lines to the report: it is cleaned to one line."""
        data = self.bounce([dsn.FailedRecipient("b@x.test", reply="550 a\r\nStatus: 2.0.0\x00")])
        self.assertIn(b"Diagnostic-Code: smtp; 550 a Status: 2.0.0?\r\n", data)

    def test_statusClassFollowsTheReply(self):
        """
        The Status comes from the reply's enhanced code only when its class
        agrees with the reply code (RFC 3463 2; Postfix ignores one that
        does not, as out of protocol): a relay's C{550 2.0.0} does not make
        a bounce say the message was delivered. Before, it said Status 2.0.0
        with Action failed.
        """
        for reply, status in (
            ("550 2.0.0 ok", "5.0.0"),
            ("554 4.7.1 try later", "5.0.0"),
            ("451 5.1.1 no such user", "4.0.0"),
            ("550 5.1.1 no such user", "5.1.1"),
            ("550-5.7.1 first line 550 5.7.1 second", "5.7.1"),
        ):
            recipient = dsn.FailedRecipient("b@x.test", reply=reply)
            self.assertEqual(dsn.statusCode(recipient), status, reply)
            self.assertIn(f"Status: {status}\r\n".encode(), self.bounce([recipient]))

    def test_returnedHeaders(self):
        """Only the header section comes back, cut at a line end when it is huge."""
        self.assertEqual(dsn.returnedHeaders(MESSAGE), MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n")
        huge = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 80) for i in range(2000)) + b"\r\nbody"
        cut = dsn.returnedHeaders(huge)
        self.assertLessEqual(len(cut), dsn.MAX_RETURNED_HEADERS)
        self.assertTrue(cut.endswith(b"\r\n") and huge.startswith(cut))


class ReportTests(unittest.TestCase):
    """L{dsn.buildReport} for delays, successes and internationalised mail."""

    def report(self, recipients, **kwargs):
        values = dict(
            hostname="mail.example.org",
            queueID="m1",
            messageID="r1@mail.example.org",
            boundary="r1/mail.example.org",
            sender="alice@example.org",
            arrival=EPOCH,
            now=EPOCH + 3600,
            recipients=recipients,
            original=HEADERS,
        )
        values.update(kwargs)
        data = dsn.buildReport(**values)
        return data, email.message_from_bytes(data, policy=email.policy.default)

    def test_delayed(self):
        """A delay report says delayed, a 4.x.x status and Will-Retry-Until."""
        _, message = self.report(
            [dsn.FailedRecipient("b@x.test", error="connection refused")],
            action="delayed",
            retryUntil=EPOCH + 86400,
        )
        self.assertEqual(message["Subject"], "Delayed Mail (still being retried)")
        [perRecipient] = message.get_payload()[1].get_payload()[1:]
        self.assertEqual((perRecipient["Action"], perRecipient["Status"]), ("delayed", "4.0.0"))
        self.assertEqual(perRecipient["Will-Retry-Until"], "Wed, 15 Nov 2023 22:13:20 GMT")

    def test_utf8(self):
        """
        For SMTPUTF8 mail the report uses RFC 6533's forms: global
        delivery-status and headers, utf-8 address types, UTF-8 kept.
        """
        data, message = self.report(
            [
                dsn.FailedRecipient(
                    "jörg@bücher.example",
                    reply="550 5.1.1 unknown",
                    orcpt="utf-8;J\\x{F6}rg@b\\x{FC}cher.example",
                )
            ],
            sender="anna@exämple.org",
            original="Subject: grüße\r\n".encode(),
            utf8=True,
        )
        self.assertIn("To: <anna@exämple.org>".encode(), data)
        _, status, headers = message.get_payload()
        self.assertEqual(status.get_content_type(), "message/global-delivery-status")
        self.assertEqual(headers.get_content_type(), "message/global-headers")
        self.assertIn("Final-Recipient: utf-8; jörg@bücher.example".encode(), data)
        self.assertIn("Original-Recipient: utf-8; Jörg@bücher.example".encode(), data)

    def test_expanded(self):
        """
        An "expanded" report (RFC 3461 5.2.7.3): a success, 2.0.0, for the
        alias the sender wrote, with the ORCPT it gave.
        """
        data, message = self.report(
            [dsn.FailedRecipient("team@example.org", orcpt="rfc822;Team@example.org")],
            action="expanded",
        )
        self.assertEqual(message["Subject"], "Successful Mail Delivery Report")
        text, status, _ = message.get_payload()
        self.assertIn("<team@example.org>: alias expanded", text.get_content())
        self.assertIn("No notice of its delivery to those", text.get_content())
        _, perRecipient = status.get_payload()
        self.assertEqual(
            [perRecipient[k] for k in ("Original-Recipient", "Final-Recipient", "Action")],
            ["rfc822; Team@example.org", "rfc822; team@example.org", "expanded"],
        )
        self.assertEqual(perRecipient["Status"], "2.0.0")
        self.assertIsNone(perRecipient["Diagnostic-Code"])

    def test_unknownAction(self):
        """Only the RFC 3464 actions are made."""
        self.assertRaises(ValueError, self.report, [], action="bounced")
