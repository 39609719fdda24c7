"""
The SMTP session on a StringTransport: every row of the reply table, and a
test for each twisted.mail server defect of docs/twisted-defects.rst that the
session closes (the D-numbers in the docstrings).
"""

from __future__ import annotations

import base64
import hmac
import re

from twisted.cred.error import LoginFailed
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial import unittest

from mailauth import dataread, esmtp
from mailauth.dataread import DataReader
from mailauth.replies import SMTPReply
from mailauth.userdb import UserDatabaseUnavailable
from tests.support import (
    MemoryMailbox,
    RecordingPortal,
    Session,
    makeFactory,
    makeSettings,
    passwordIs,
)

REPLY = re.compile(rb"^(\d{3})([ -])(.*)$")
ENHANCED = re.compile(rb"^[245]\.\d{1,3}\.\d{1,3} ")


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


PLAIN_ALICE = b64(b"\0alice@example.test\0secret")


class SessionTestsMixin:
    """Builds a factory and a session with a Clock, a portal that knows alice."""

    tlsMode = "starttls"
    authMode = "required"

    def setUp(self) -> None:
        self.clock = Clock()
        self.mailbox = MemoryMailbox(login="alice@example.test")
        self.anonymous = MemoryMailbox()
        self.portal = RecordingPortal(self.mailbox, answer=passwordIs(b"secret"))
        self.factory = self.makeFactory()
        self.session = Session(self.factory)
        self.greeting = self.session.read()

    def makeFactory(self, **overrides):
        values = dict(
            portal=self.portal,
            anonymous=self.anonymous,
            tlsMode=self.tlsMode,
            authMode=self.authMode,
        )
        values.update(overrides)
        return makeFactory(self.clock, **values)

    def ehlo(self) -> list:
        return self.session.command(b"EHLO client.example")

    def login(self) -> None:
        self.ehlo()
        self.assertEqual(
            self.session.command(b"AUTH PLAIN " + PLAIN_ALICE),
            [b"235 2.7.0 Authentication successful"],
        )

    def assertReply(self, lines: list, expected: bytes) -> None:
        self.assertEqual(lines, [expected])

    def assertCode(self, lines: list, code: int) -> None:
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith(b"%d " % code), lines)


class GreetingAndEHLOTests(SessionTestsMixin, unittest.TestCase):
    def test_greeting(self) -> None:
        """The greeting names the host and mailauth."""
        self.assertEqual(self.greeting, [b"220 mx.example.test ESMTP mailauth"])

    def test_mappedClientIsIPv4(self) -> None:
        """
        An IPv4 client of a dual-stack listener (C{::ffff:192.0.2.7}) is
        logged as its IPv4 address, as Postfix does; IPv6 clients stay.
        """
        for host, shown in (
            ("::ffff:192.0.2.7", "192.0.2.7"),
            ("2001:db8::7", "2001:db8::7"),
            ("192.0.2.8", "192.0.2.8"),
        ):
            with capturedLogs() as events:
                session = Session(self.factory, host=host)
            self.assertEqual(session.protocol.peerHost, shown)
            [connect] = [formatEvent(e) for e in events if "connect: " in formatEvent(e)]
            self.assertIn(f"client=[{shown}]", connect)

    def test_ehloBeforeTLS(self) -> None:
        """
        Before TLS on a STARTTLS listener, EHLO offers STARTTLS and no AUTH
        (D1: Twisted offers AUTH in cleartext).
        """
        self.assertEqual(
            self.ehlo(),
            [
                b"250-mx.example.test",
                b"250-PIPELINING",
                b"250-SIZE 1048576",
                b"250-8BITMIME",
                b"250-ENHANCEDSTATUSCODES",
                b"250-SMTPUTF8",
                b"250-CHUNKING",
                b"250-DSN",
                b"250 STARTTLS",
            ],
        )

    def test_ehloWithoutArgument(self) -> None:
        """EHLO needs a host name argument (D19)."""
        self.assertReply(self.session.command(b"EHLO"), b"501 5.5.4 Syntax: EHLO hostname")

    def test_ehloArgumentTooLong(self) -> None:
        """An EHLO name longer than a domain name can be is refused (it goes into Received)."""
        self.assertReply(
            self.session.command(b"EHLO " + b"a" * 256), b"501 5.5.4 Syntax: EHLO hostname"
        )
        self.assertEqual(self.session.command(b"EHLO " + b"a" * 255)[0], b"250-mx.example.test")

    def test_helo(self) -> None:
        """HELO gets a single 250 line."""
        self.assertReply(self.session.command(b"HELO client.example"), b"250 mx.example.test")

    def test_bareLineFeedInCommand(self) -> None:
        """
        A bare LF inside a command line is refused, so it cannot be pasted
        into a Received header (D17: C{EHLO evil\\nX-Injected: yes}).
        """
        self.assertReply(
            self.session.send(b"EHLO evil\nX-Injected: yes\r\n"),
            b"500 5.5.2 Error: bare CR or LF in command",
        )

    def test_controlCharactersInCommand(self) -> None:
        """
        A command holding a control character (NUL, ESC, DEL...; a tab is
        allowed) is refused with 500 5.5.2, whatever the command, and the
        session goes on.
        """
        for line in (b"NOOP \x00", b"VRFY bob\x1b[2J", b"HELP \x7f", b"VRFY \x7fbob"):
            self.assertReply(
                self.session.command(line), b"500 5.5.2 Error: control characters in command"
            )
        self.assertReply(self.session.command(b"NOOP \tx"), b"250 2.0.0 Ok")

    def test_unknownCommand(self) -> None:
        """Unknown commands get 500 5.5.2."""
        self.assertReply(self.session.command(b"XYZZY"), b"500 5.5.2 Error: command not recognized")

    def test_noopVrfyHelp(self) -> None:
        """NOOP, VRFY and HELP are implemented (D19); VRFY never reveals users."""
        self.assertReply(self.session.command(b"NOOP"), b"250 2.0.0 Ok")
        self.assertCode(self.session.command(b"VRFY alice"), 252)
        self.assertCode(self.session.command(b"HELP"), 214)

    def test_quit(self) -> None:
        """QUIT says goodbye and closes."""
        self.assertReply(self.session.command(b"QUIT"), b"221 2.0.0 Bye")
        self.assertTrue(self.session.transport.disconnecting)

    def test_mailBeforeHelo(self) -> None:
        """MAIL before HELO/EHLO is refused (D19)."""
        self.assertReply(
            self.session.command(b"MAIL FROM:<alice@example.test>"),
            b"503 5.5.1 Error: send HELO/EHLO first",
        )


class ImplicitTLSTests(SessionTestsMixin, unittest.TestCase):
    tlsMode = "implicit"

    def test_ehloOffersAuthNotStartTLS(self) -> None:
        """
        On an implicit-TLS listener AUTH is offered and STARTTLS is not
        (D4: Twisted offers STARTTLS inside TLS and wedges).
        """
        lines = self.ehlo()
        self.assertIn(b"250 AUTH PLAIN LOGIN CRAM-MD5", lines)
        self.assertNotIn(b"250-STARTTLS", lines)

    def test_startTLSInsideTLS(self) -> None:
        """STARTTLS inside TLS is refused and starts nothing (D4)."""
        self.ehlo()
        self.assertReply(self.session.command(b"STARTTLS"), b"554 5.5.1 Error: TLS already active")
        self.assertIsNone(self.session.transport.tlsStarted)


class StartTLSTests(SessionTestsMixin, unittest.TestCase):
    def test_startTLS(self) -> None:
        """STARTTLS answers 220 and starts TLS with the factory's context."""
        self.ehlo()
        self.assertReply(self.session.command(b"STARTTLS"), b"220 2.0.0 Ready to start TLS")
        self.assertIs(self.session.transport.tlsStarted, self.factory.tlsContext)

    def test_pipelinedAfterStartTLSDiscarded(self) -> None:
        """
        Commands sent in the same packet after STARTTLS are discarded, not
        executed inside TLS (D2, CVE-2011-0411).
        """
        self.ehlo()
        lines = self.session.send(b"STARTTLS\r\nEHLO injected\r\nMAIL FROM:<x@evil.test>\r\n")
        self.assertEqual(lines, [b"220 2.0.0 Ready to start TLS"])
        self.assertEqual(self.session.send(b""), [])
        # After the handshake the client must say EHLO again: nothing of
        # the injected EHLO survived.
        self.assertReply(
            self.session.command(b"MAIL FROM:<alice@example.test>"),
            b"503 5.5.1 Error: send HELO/EHLO first",
        )

    def test_partialLineAfterStartTLSDiscarded(self) -> None:
        """A partial line buffered before STARTTLS does not prefix the first TLS data (D2)."""
        self.ehlo()
        self.session.send(b"STARTTLS\r\nNO")
        self.assertReply(self.session.command(b"OP"), b"500 5.5.2 Error: command not recognized")

    def test_stateResetByStartTLS(self) -> None:
        """
        STARTTLS forgets the EHLO and any transaction begun before it
        (D3; RFC 3207 4.2).
        """
        factory = self.makeFactory(authMode="optional")
        session = Session(factory)
        session.read()
        session.command(b"EHLO client.example")
        self.assertReply(session.command(b"MAIL FROM:<bob@remote.test>"), b"250 2.1.0 Ok")
        session.command(b"STARTTLS")
        self.assertReply(
            session.command(b"RCPT TO:<bob@example.test>"), b"503 5.5.1 Error: need MAIL command"
        )
        lines = session.command(b"EHLO client.example")
        self.assertIn(b"250 AUTH PLAIN LOGIN CRAM-MD5", lines)
        self.assertNotIn(b"250-STARTTLS", lines)

    def test_startTLSNotOfferedOnPlainListener(self) -> None:
        """A tls = none listener neither offers nor accepts STARTTLS."""
        session = Session(self.makeFactory(tlsMode="none", plaintextRequiresTLS=False))
        session.read()
        self.assertNotIn(b"250-STARTTLS", session.command(b"EHLO c"))
        self.assertReply(session.command(b"STARTTLS"), b"502 5.5.1 Error: STARTTLS not offered")


class AuthBeforeTLSTests(SessionTestsMixin, unittest.TestCase):
    def test_authBeforeTLS(self) -> None:
        """AUTH before TLS gets 538 5.7.11 and no credentials are checked (D1)."""
        self.ehlo()
        self.assertReply(
            self.session.command(b"AUTH PLAIN " + PLAIN_ALICE),
            b"538 5.7.11 Encryption required for requested authentication mechanism",
        )
        self.assertEqual(self.portal.logins, [])

    def test_mailBeforeAuth(self) -> None:
        """MAIL before AUTH on an auth = required listener gets 530 5.7.0 (D13)."""
        self.ehlo()
        self.assertReply(
            self.session.command(b"MAIL FROM:<alice@example.test>"),
            b"530 5.7.0 Authentication required",
        )

    def test_plaintextAllowedWhenConfigured(self) -> None:
        """With plaintext_requires_tls = no, AUTH is offered before TLS."""
        session = Session(self.makeFactory(plaintextRequiresTLS=False))
        session.read()
        self.assertIn(b"250 AUTH PLAIN LOGIN CRAM-MD5", session.command(b"EHLO c"))


class AuthTests(SessionTestsMixin, unittest.TestCase):
    tlsMode = "implicit"

    def test_plainInitialResponse(self) -> None:
        """AUTH PLAIN with an initial response logs in."""
        self.login()
        credentials = self.portal.logins[0][0]
        self.assertEqual(credentials.username, "alice@example.test")
        self.assertEqual(credentials.mechanism, "PLAIN")

    def test_plainEmptyChallenge(self) -> None:
        """AUTH PLAIN without a response gets an empty 334, then takes the response."""
        self.ehlo()
        self.assertReply(self.session.command(b"AUTH PLAIN"), b"334 ")
        self.assertReply(self.session.command(PLAIN_ALICE), b"235 2.7.0 Authentication successful")

    def test_plainEqualsIsEmptyInitialResponse(self) -> None:
        """C{=} is an empty initial response (RFC 4954), malformed for PLAIN (D5)."""
        self.ehlo()
        self.assertCode(self.session.command(b"AUTH PLAIN ="), 501)

    def test_login(self) -> None:
        """LOGIN prompts Username: and Password: in base64 (D10: not NUL-suffixed)."""
        self.ehlo()
        self.assertReply(self.session.command(b"AUTH LOGIN"), b"334 " + b64(b"Username:"))
        self.assertReply(
            self.session.command(b64(b"alice@example.test")), b"334 " + b64(b"Password:")
        )
        self.assertReply(
            self.session.command(b64(b"secret")), b"235 2.7.0 Authentication successful"
        )

    def test_loginInitialResponse(self) -> None:
        """LOGIN with the user name as initial response goes straight to Password:."""
        self.ehlo()
        self.assertReply(
            self.session.command(b"AUTH LOGIN " + b64(b"alice@example.test")),
            b"334 " + b64(b"Password:"),
        )

    def test_cramMD5(self) -> None:
        """
        CRAM-MD5 sends a random challenge naming our host (D8: not
        C{@None}, not Mersenne Twister) and passes the digest to the portal.
        """
        self.ehlo()
        lines = self.session.command(b"AUTH CRAM-MD5")
        challenge = base64.b64decode(lines[0][4:])
        self.assertRegex(challenge, rb"^<\d+\.\d+@mx\.example\.test>$")
        second = Session(self.factory)
        second.read()
        second.command(b"EHLO c")
        self.assertNotEqual(second.command(b"AUTH CRAM-MD5"), lines)
        digest = hmac.new(b"secret", challenge, "md5").hexdigest().encode()
        self.assertReply(
            self.session.command(b64(b"alice@example.test " + digest)),
            b"235 2.7.0 Authentication successful",
        )

    def test_cramMD5NoInitialResponse(self) -> None:
        """CRAM-MD5 allows no initial response (D8)."""
        self.ehlo()
        self.assertCode(self.session.command(b"AUTH CRAM-MD5 " + b64(b"x")), 501)

    def test_cramMD5MalformedResponse(self) -> None:
        """A CRAM-MD5 response without a space gets 501, not a dropped connection (D5)."""
        self.ehlo()
        self.session.command(b"AUTH CRAM-MD5")
        self.assertCode(self.session.command(b64(b"alicenospace")), 501)
        self.assertFalse(self.session.transport.disconnecting)

    def test_wrongPassword(self) -> None:
        """Wrong credentials get 535 5.7.8 (D13)."""
        self.ehlo()
        self.assertReply(
            self.session.command(b"AUTH PLAIN " + b64(b"\0alice@example.test\0wrong")),
            b"535 5.7.8 Authentication credentials invalid",
        )

    def test_unknownMechanism(self) -> None:
        """An unknown mechanism gets 504 5.5.4."""
        self.ehlo()
        self.assertReply(
            self.session.command(b"AUTH GSSAPI"), b"504 5.5.4 Unrecognized authentication type"
        )

    def test_authWithoutMechanism(self) -> None:
        """A bare AUTH gets 501, not an IndexError (D5, Twisted #7753)."""
        self.ehlo()
        self.assertCode(self.session.command(b"AUTH"), 501)

    def test_plainTwoFields(self) -> None:
        """A PLAIN response with two fields gets 501 5.5.2 (D5)."""
        self.ehlo()
        lines = self.session.command(b"AUTH PLAIN " + b64(b"alice\0secret"))
        self.assertCode(lines, 501)
        self.assertTrue(lines[0].startswith(b"501 5.5.2"))

    def test_invalidBase64(self) -> None:
        """Non-alphabet characters and data after the padding are refused (D6)."""
        self.ehlo()
        self.assertReply(
            self.session.command(b"AUTH PLAIN AGFs!!**aWNlAHNlY3JldA=="),
            b"501 5.5.2 Error: invalid base64 data",
        )
        self.assertReply(
            self.session.command(b"AUTH PLAIN " + PLAIN_ALICE + b"trailing"),
            b"501 5.5.2 Error: invalid base64 data",
        )
        self.assertEqual(self.portal.logins, [])

    def test_cancel(self) -> None:
        """C{*} cancels the exchange with 501 5.7.0."""
        self.ehlo()
        self.session.command(b"AUTH LOGIN")
        self.assertReply(self.session.command(b"*"), b"501 5.7.0 Authentication cancelled")
        self.assertReply(self.session.command(b"NOOP"), b"250 2.0.0 Ok")

    def test_authzidMismatch(self) -> None:
        """
        A PLAIN authzid other than the login is refused like wrong
        credentials, without asking the portal (D7).
        """
        self.ehlo()
        self.assertReply(
            self.session.command(
                b"AUTH PLAIN " + b64(b"postmaster@example.test\0alice@example.test\0secret")
            ),
            b"535 5.7.8 Authentication credentials invalid",
        )
        self.assertEqual(self.portal.logins, [])

    def test_authzidEqualToLogin(self) -> None:
        """
        A PLAIN authzid equal to the login is accepted, in any spelling the
        login is found by (case, quoting, a trailing dot).
        """
        for n, authzid in enumerate(
            (
                b"alice@example.test",
                b"ALICE@Example.Test",
                b'"alice"@example.test',
                b"alice@example.test.",
            )
        ):
            # Each from an address of its own: the factory allows two at once.
            session = Session(self.factory, host=f"192.0.2.{n + 10}")
            session.read()
            session.command(b"EHLO client.example")
            self.assertReply(
                session.command(b"AUTH PLAIN " + b64(authzid + b"\0alice@example.test\0secret")),
                b"235 2.7.0 Authentication successful",
            )

    def test_authLineTooLong(self) -> None:
        """An AUTH line over 12288 octets gets 500 5.5.6, and nothing is held (D16)."""
        self.ehlo()
        self.assertReply(
            self.session.send(b"AUTH PLAIN " + b"A" * 20000),
            b"500 5.5.6 Authentication exchange line is too long",
        )
        self.assertLessEqual(len(self.session.protocol._buffer), esmtp.MAX_LINE)
        self.session.send(b"A" * 20000 + b"\r\n")
        self.assertReply(self.session.command(b"NOOP"), b"250 2.0.0 Ok")

    def test_authResponseTooLong(self) -> None:
        """A SASL continuation line over the limit also gets 500 5.5.6."""
        self.ehlo()
        self.session.command(b"AUTH PLAIN")
        self.assertReply(
            self.session.command(b"A" * 13000),
            b"500 5.5.6 Authentication exchange line is too long",
        )

    def test_authLineAtLimit(self) -> None:
        """An AUTH line of 12288 octets is within the RFC 4954 limit."""
        self.ehlo()
        line = b"AUTH PLAIN " + b64(b"\0alice@example.test\0" + b"x" * 9000)
        self.assertLessEqual(len(line), 12288)
        self.assertReply(
            self.session.command(line), b"535 5.7.8 Authentication credentials invalid"
        )

    def test_authTwice(self) -> None:
        """AUTH when already authenticated gets 503."""
        self.login()
        self.assertReply(
            self.session.command(b"AUTH PLAIN " + PLAIN_ALICE),
            b"503 5.5.1 Error: already authenticated",
        )

    def test_authInsideTransaction(self) -> None:
        """AUTH inside a mail transaction gets 503 (D11; RFC 4954 section 4)."""
        session = Session(self.makeFactory(authMode="optional"))
        session.read()
        session.command(b"EHLO c")
        session.command(b"MAIL FROM:<bob@remote.test>")
        self.assertReply(
            session.command(b"AUTH PLAIN " + PLAIN_ALICE),
            b"503 5.5.1 Error: AUTH not allowed during a mail transaction",
        )

    def test_userDatabaseUnavailable(self) -> None:
        """When the user database cannot be read: 454 4.7.0."""
        self.portal.answer = None
        self.ehlo()
        self.session.command(b"AUTH PLAIN " + PLAIN_ALICE)
        self.portal.fail(exc=LoginFailed("user database unavailable"))
        self.assertReply(self.session.read(), b"454 4.7.0 Temporary authentication failure")

    def test_internalErrorIsTemporary(self) -> None:
        """Any other error of the portal is logged and answered 454, the session goes on."""
        self.portal.answer = None
        self.ehlo()
        self.session.command(b"AUTH PLAIN " + PLAIN_ALICE)
        self.portal.fail(exc=RuntimeError("boom"))
        self.assertReply(self.session.read(), b"454 4.7.0 Temporary authentication failure")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertReply(self.session.command(b"NOOP"), b"250 2.0.0 Ok")

    def test_authNotOfferedOnMXListener(self) -> None:
        """An auth = none listener neither offers nor accepts AUTH."""
        session = Session(self.makeFactory(authMode="none"))
        session.read()
        self.assertFalse([x for x in session.command(b"EHLO c") if b"AUTH" in x])
        self.assertReply(
            session.command(b"AUTH PLAIN " + PLAIN_ALICE),
            b"503 5.5.1 Error: authentication not enabled",
        )

    def test_tooManyFailuresInSession(self) -> None:
        """After failures_per_session failed logins the session ends with 421 4.7.0."""
        self.ehlo()
        bad = b"AUTH PLAIN " + b64(b"\0alice@example.test\0wrong")
        self.assertCode(self.session.command(bad), 535)
        self.assertCode(self.session.command(bad), 535)
        self.assertReply(self.session.command(bad), b"421 4.7.0 Error: too many failed logins")
        self.assertTrue(self.session.transport.disconnecting)

    def test_pipelinedAuthThenMail(self) -> None:
        """
        MAIL pipelined behind AUTH waits for the login to finish, so replies
        stay in order (D14).
        """
        self.portal.answer = None
        self.ehlo()
        lines = self.session.send(
            b"AUTH PLAIN " + PLAIN_ALICE + b"\r\nMAIL FROM:<alice@example.test>\r\n"
        )
        self.assertEqual(lines, [])
        self.portal.succeed()
        self.assertEqual(
            self.session.read(),
            [b"235 2.7.0 Authentication successful", b"250 2.1.0 Ok"],
        )


class TransactionTests(SessionTestsMixin, unittest.TestCase):
    tlsMode = "implicit"

    def setUp(self) -> None:
        super().setUp()
        self.login()

    def test_dataTimeout(self) -> None:
        """
        Inside DATA the longer data_timeout runs from each read; after the
        message the idle timeout applies again.
        """
        s = self.session
        s.command(b"MAIL FROM:<alice@example.test>")
        s.command(b"RCPT TO:<bob@example.test>")
        s.command(b"DATA")
        self.clock.advance(599)
        self.assertEqual(s.send(b"x\r\n"), [])
        self.clock.advance(599)
        self.assertEqual(s.send(b".\r\n"), [b"250 2.0.0 Ok: queued as ID1"])
        self.clock.advance(299)
        self.assertFalse(s.transport.disconnecting)
        self.clock.advance(2)
        self.assertReply(s.read(), b"421 4.4.2 mx.example.test Error: timeout exceeded")

    def junkLimited(self, limit: int) -> None:
        """A new logged-in session whose junk_command_limit is C{limit}."""
        self.factory = self.makeFactory(settings=makeSettings(junk_command_limit=limit))
        self.session = Session(self.factory)
        self.session.read()
        self.login()

    def test_junkCommandsCountAsErrors(self) -> None:
        """
        Past junk_command_limit NOOP, RSET, VRFY and HELP each counts as an
        error, still answered, until max_errors ends the session with 421
        (Postfix's smtpd_junk_command_limit): a client cannot hold its
        connection for ever without sending mail.
        """
        self.junkLimited(4)
        s = self.session
        for command in (b"NOOP", b"RSET", b"VRFY bob", b"HELP"):
            self.assertNotEqual(s.command(command)[-1][:3], b"421")
        for _ in range(9):
            self.assertReply(s.command(b"NOOP"), b"250 2.0.0 Ok")
        self.assertFalse(s.transport.disconnecting)
        self.assertReply(s.command(b"NOOP"), b"421 4.7.0 Error: too many errors")
        self.assertTrue(s.transport.disconnecting)

    def test_resetBeforeHelloIsJunk(self) -> None:
        """RSET counts as junk before any HELO or EHLO too: it cannot be repeated for ever."""
        self.factory = self.makeFactory(settings=makeSettings(junk_command_limit=4))
        s = Session(self.factory)
        s.read()
        for _ in range(4 + 9):
            self.assertReply(s.command(b"RSET"), b"250 2.0.0 Ok")
        self.assertFalse(s.transport.disconnecting)
        self.assertReply(s.command(b"RSET"), b"421 4.7.0 Error: too many errors")
        self.assertTrue(s.transport.disconnecting)

    def test_repeatedHelloIsJunk(self) -> None:
        """
        A repeated HELO or EHLO counts as a junk command too (Postfix's
        command table marks both so): a client that only repeats EHLO,
        which no error or other limit stopped, is cut off like one
        repeating NOOP. The first EHLO (here the login's) is not counted.
        """
        self.junkLimited(4)
        s = self.session
        for _ in range(2):
            self.assertEqual(s.command(b"EHLO client.example")[-1], b"250 DSN")
            self.assertReply(s.command(b"HELO client.example"), b"250 mx.example.test")
        for _ in range(9):
            self.assertEqual(s.command(b"EHLO client.example")[-1], b"250 DSN")
        self.assertFalse(s.transport.disconnecting)
        self.assertReply(s.command(b"EHLO client.example"), b"421 4.7.0 Error: too many errors")
        self.assertTrue(s.transport.disconnecting)

    def test_junkCountStartsAgainAfterAMessage(self) -> None:
        """
        A message accepted starts the counts of junk commands and of errors
        again, as in Postfix (its limits are on errors "without delivering
        mail").
        """
        self.junkLimited(4)
        s = self.session
        for _ in range(3):
            # The limit, then as many more as max_errors allows but one.
            for _ in range(4 + 9):
                self.assertReply(s.command(b"NOOP"), b"250 2.0.0 Ok")
            s.command(b"MAIL FROM:<alice@example.test>")
            s.command(b"RCPT TO:<bob@example.test>")
            s.command(b"DATA")
            self.assertEqual(s.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n")[-1][:3], b"250")
        self.assertFalse(s.transport.disconnecting)
        for _ in range(4 + 9):
            self.assertReply(s.command(b"NOOP"), b"250 2.0.0 Ok")
        self.assertReply(s.command(b"NOOP"), b"421 4.7.0 Error: too many errors")

    def test_message(self) -> None:
        """A whole transaction: the body reaches the message once, with our header."""
        s = self.session
        self.assertReply(s.command(b"MAIL FROM:<alice@example.test>"), b"250 2.1.0 Ok")
        self.assertReply(s.command(b"RCPT TO:<bob@example.test>"), b"250 2.1.5 Ok")
        self.assertReply(s.command(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>")
        self.assertEqual(
            s.send(b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n"), [b"250 2.0.0 Ok: queued as ID1"]
        )
        self.assertEqual(
            self.mailbox.stored,
            [b"Received: from client.example\r\nSubject: hi\r\n\r\n.dot\r\nbody\r\n"],
        )

    def test_senderNotOwned(self) -> None:
        """MAIL FROM an address the user does not own gets 553 5.7.1."""
        lines = self.session.command(b"MAIL FROM:<bob@example.test>")
        self.assertCode(lines, 553)
        self.assertTrue(lines[0].startswith(b"553 5.7.1 "))

    def test_nullSender(self) -> None:
        """The null sender is accepted."""
        self.assertReply(self.session.command(b"MAIL FROM:<>"), b"250 2.1.0 Ok")

    def test_unknownLocalRecipient(self) -> None:
        """An unknown local recipient gets 550 5.1.1."""
        self.session.command(b"MAIL FROM:<alice@example.test>")
        lines = self.session.command(b"RCPT TO:<nobody@example.test>")
        self.assertTrue(lines[0].startswith(b"550 5.1.1 "), lines)

    def test_mailParameters(self) -> None:
        """
        MAIL parameters are parsed: SIZE and BODY checked, unknown ones
        refused (D18: Twisted ignores them all).
        """
        s = self.session
        self.assertReply(
            s.command(b"MAIL FROM:<alice@example.test> SIZE=99999999999"),
            b"552 5.3.4 Message size exceeds fixed maximum message size",
        )
        self.assertReply(
            s.command(b"MAIL FROM:<alice@example.test> BODY=BOGUS"),
            b"501 5.5.4 Syntax: BODY=7BIT or BODY=8BITMIME",
        )
        self.assertReply(
            s.command(b"MAIL FROM:<alice@example.test> XYZZY=1"),
            b"555 5.5.4 Unsupported option: XYZZY",
        )
        self.assertReply(
            s.command(b"MAIL FROM:<alice@example.test> SIZE=100 BODY=8BITMIME AUTH=<>"),
            b"250 2.1.0 Ok",
        )

    def test_nestedMail(self) -> None:
        """A second MAIL inside a transaction gets 503."""
        self.session.command(b"MAIL FROM:<alice@example.test>")
        self.assertReply(
            self.session.command(b"MAIL FROM:<alice@example.test>"),
            b"503 5.5.1 Error: nested MAIL command",
        )

    def test_rcptBeforeMail(self) -> None:
        """RCPT before MAIL gets 503."""
        self.assertReply(
            self.session.command(b"RCPT TO:<bob@example.test>"),
            b"503 5.5.1 Error: need MAIL command",
        )

    def test_dataBeforeRcpt(self) -> None:
        """
        DATA in a transaction with no recipient accepted gets 554 no valid
        recipients, as Postfix answers: with PIPELINING the client sent it
        before it knew its recipients were refused (RFC 5321 3.3 allows
        503 or 554; 503 said "need RCPT command" to a client that sent one).
        """
        self.session.command(b"MAIL FROM:<alice@example.test>")
        self.assertReply(self.session.command(b"DATA"), b"554 5.5.1 Error: no valid recipients")

    def test_badAddressSyntax(self) -> None:
        """Malformed paths get 501 with the matching enhanced code."""
        self.assertReply(
            self.session.command(b"MAIL FROM:alice@example.test"),
            b"501 5.1.7 Bad sender address syntax",
        )
        self.session.command(b"MAIL FROM:<alice@example.test>")
        for bad in (b"<bob>", b"<bob@>", b"<@example.test>", b"<a@b@example.test>", b"<>"):
            self.assertReply(
                self.session.command(b"RCPT TO:" + bad), b"501 5.1.3 Bad recipient address syntax"
            )
        # The path ends at its closing bracket, so a space inside it is a
        # bad address, not the start of parameters.
        self.assertReply(
            self.session.command(b"RCPT TO:<a b@example.test>"),
            b"501 5.1.3 Bad recipient address syntax",
        )
        self.assertReply(
            self.session.command(b"RCPT TO:<bob@example.test> X"),
            b"555 5.5.4 Unsupported option: X",
        )

    def test_recipientsPastTheLimitAreNoErrors(self) -> None:
        """
        A client that pipelines more recipients than max_recipients, more
        of them over the limit than max_errors, gets 452 for each one over
        and keeps its session: the message goes to the recipients
        accepted (RFC 5321 4.5.3.1.10), as with Postfix's
        smtpd_recipient_overshoot_limit.
        """
        s = self.session
        limit = self.factory.settings.max_recipients
        lines = s.send(
            b"MAIL FROM:<alice@example.test>\r\n"
            + b"RCPT TO:<bob@example.test>\r\n" * (limit + 20)
            + b"DATA\r\n"
        )
        self.assertEqual(
            lines,
            [b"250 2.1.0 Ok"]
            + [b"250 2.1.5 Ok"] * limit
            + [b"452 4.5.3 Error: too many recipients"] * 20
            + [b"354 End data with <CR><LF>.<CR><LF>"],
        )
        self.assertEqual(
            s.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n"), [b"250 2.0.0 Ok: queued as ID1"]
        )
        self.assertFalse(s.transport.disconnecting)

    def test_recipientsFarPastTheLimitEndTheSession(self) -> None:
        """
        Recipients over the limit are junk commands: past
        junk_command_limit of them each is an error too, so a client
        repeating RCPT for ever is cut off at max_errors.
        """
        self.junkLimited(4)
        s = self.session
        limit = self.factory.settings.max_recipients
        s.command(b"MAIL FROM:<alice@example.test>")
        for _ in range(limit):
            self.assertReply(s.command(b"RCPT TO:<bob@example.test>"), b"250 2.1.5 Ok")
        for _ in range(4 + 9):
            self.assertReply(
                s.command(b"RCPT TO:<bob@example.test>"), b"452 4.5.3 Error: too many recipients"
            )
        self.assertReply(
            s.command(b"RCPT TO:<bob@example.test>"), b"421 4.7.0 Error: too many errors"
        )

    def test_tooManyRecipients(self) -> None:
        """Past max_recipients: 452 4.5.3."""
        self.session.command(b"MAIL FROM:<alice@example.test>")
        for _ in range(5):
            self.assertCode(self.session.command(b"RCPT TO:<bob@example.test>"), 250)
        self.assertReply(
            self.session.command(b"RCPT TO:<bob@example.test>"),
            b"452 4.5.3 Error: too many recipients",
        )

    def test_oneMessageForManyRecipients(self) -> None:
        """Two recipients sharing a sink get one copy of the body (D21)."""
        s = self.session
        s.command(b"MAIL FROM:<alice@example.test>")
        s.command(b"RCPT TO:<bob@example.test>")
        s.command(b"RCPT TO:<alice@example.test>")
        s.command(b"DATA")
        s.send(b"x\r\n.\r\n")
        self.assertEqual(len(self.mailbox.messages), 1)
        self.assertEqual(len(self.mailbox.stored), 1)

    def test_storageFailureIsTemporary(self) -> None:
        """
        A message that cannot be stored gets 451 4.3.0, not 550 (D21); the
        OSError is a warning naming the path and errno, not a traceback.
        """
        self.mailbox.failWith = OSError(5, "I/O error", "/var/mail/x")
        self.startData()
        with capturedLogs() as events:
            self.assertReply(
                self.session.send(b"x\r\n.\r\n"), b"451 4.3.0 Error: local error in processing"
            )
        self.assertEqual(
            [(e["log_level"], formatEvent(e)) for e in events],
            [
                (
                    LogLevel.warn,
                    "could not store a message from client=[192.0.2.1]: /var/mail/x: "
                    f"I/O error (errno 5) session={self.session.protocol.session}",
                )
            ],
        )
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_userDatabaseDownAtRCPT(self) -> None:
        """
        A recipient whose lookup finds the user database down gets 451
        4.3.0 and one refusal line, not a traceback: the outage is logged
        once by the database itself.
        """
        self.session.command(b"MAIL FROM:<alice@example.test>")
        delivery = self.session.protocol._delivery

        def validateTo(user):
            raise UserDatabaseUnavailable("postgresql:///mail did not answer within 5s")

        delivery.validateTo = validateTo
        with capturedLogs() as events:
            self.assertReply(
                self.session.command(b"RCPT TO:<bob@example.test>"),
                b"451 4.3.0 Error: temporary lookup failure, try again later",
            )
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                "refused RCPT: client=[192.0.2.1] login=<alice@example.test> "
                'reason=user_database reply="451 4.3.0 Error: temporary lookup failure, try '
                f'again later" session={self.session.protocol.session}'
            ],
        )
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_diskFull(self) -> None:
        """A full disk gets 452 4.3.1, and the message is not acknowledged."""
        self.mailbox.failWith = OSError(28, "No space left on device")
        self.startData()
        self.assertReply(
            self.session.send(b"x\r\n.\r\n"), b"452 4.3.1 Error: insufficient system storage"
        )
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_unexpectedStorageFailure(self) -> None:
        """Any other exception from storing is 451 with its traceback logged."""
        self.mailbox.failWith = ZeroDivisionError()
        self.startData()
        self.assertReply(
            self.session.send(b"x\r\n.\r\n"), b"451 4.3.0 Error: local error in processing"
        )
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_rejectedByMessage(self) -> None:
        """A message may pick its own reply with SMTPReply."""
        self.mailbox.failWith = SMTPReply(554, "5.7.0 Message refused")
        self.startData()
        self.assertReply(self.session.send(b"x\r\n.\r\n"), b"554 5.7.0 Message refused")

    def startData(self) -> None:
        s = self.session
        s.command(b"MAIL FROM:<alice@example.test>")
        s.command(b"RCPT TO:<bob@example.test>")
        s.command(b"DATA")

    def test_messageTooBig(self) -> None:
        """A body over max_message_size gets 552 5.3.4 at the end, and nothing is stored."""
        self.startData()
        for _ in range(20):
            self.assertEqual(self.session.send(b"x" * 65535 + b"\r\n"), [])
        self.assertReply(
            self.session.send(b".\r\n"),
            b"552 5.3.4 Message size exceeds fixed maximum message size",
        )
        self.assertEqual(self.mailbox.stored, [])
        self.assertTrue(self.mailbox.messages[0].aborted)

    def test_bareLineFeedInData(self) -> None:
        """A bare LF in DATA is rejected at the end with 550 5.6.2; nothing is stored (D17)."""
        self.startData()
        self.assertReply(
            self.session.send(b"a\nb\r\n.\r\n"),
            b"550 5.6.2 Error: bare CR or LF in message, not accepted",
        )
        self.assertEqual(self.mailbox.stored, [])

    def test_bareCarriageReturnInData(self) -> None:
        """A bare CR in DATA is rejected as well."""
        self.startData()
        self.assertCode(self.session.send(b"a\rb\r\n.\r\n"), 550)

    def test_smugglingSequencesDoNotEndData(self) -> None:
        """
        C{\\n.\\n}, C{\\r.\\r}, C{\\n.\\r\\n} and C{\\r\\n.\\n} never end the
        message or start a second one (D17, SMTP smuggling).
        """
        for seq in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"):
            self.startData()
            smuggled = b"a" + seq + b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<bob@example.test>\r\n"
            self.assertEqual(self.session.send(smuggled), [], seq)
            self.assertCode(self.session.send(b".\r\n"), 550)
        self.assertEqual(self.mailbox.stored, [])

    def test_longDataLineStaysData(self) -> None:
        """
        A DATA line over 16 KiB stays part of the message, and what follows
        it is body, not commands (D15).
        """
        self.startData()
        body = b"x" * 17000 + b"\r\nRSET\r\nMAIL FROM:<evil@evil.test>\r\n"
        self.assertEqual(self.session.send(body), [])
        self.assertEqual(self.session.send(b".\r\n"), [b"250 2.0.0 Ok: queued as ID1"])
        self.assertEqual(self.mailbox.stored[0], b"Received: from client.example\r\n" + body)

    def test_leadingWhitespaceStartsTheBody(self) -> None:
        """
        Content whose first line begins with a space or a tab cannot fold
        itself into the server's C{Received:}: an empty line goes before
        it, so all of it is body, as Postfix's smtpd does. A folded header
        line further down is left alone.
        """
        for first in (b" ", b"\t"):
            self.startData()
            content = first + b"(authenticated as ceo@example.test)\r\nSubject: x\r\n z\r\n"
            self.assertEqual(self.session.send(content), [])
            self.assertCode(self.session.send(b".\r\n"), 250)
            self.assertEqual(
                self.mailbox.stored[-1], b"Received: from client.example\r\n\r\n" + content
            )
        self.startData()
        self.session.send(b"Subject: x\r\n z\r\n\r\n b\r\n.\r\n")
        self.assertEqual(
            self.mailbox.stored[-1],
            b"Received: from client.example\r\nSubject: x\r\n z\r\n\r\n b\r\n",
        )

    def test_pipelinedAfterData(self) -> None:
        """Commands pipelined after the final dot are answered after the 250 (D14, p21)."""
        self.startData()
        self.assertEqual(
            self.session.send(b"x\r\n.\r\nNOOP\r\n"),
            [b"250 2.0.0 Ok: queued as ID1", b"250 2.0.0 Ok"],
        )

    def test_pipelinedTransactions(self) -> None:
        """A whole pipelined transaction in one packet gets its replies in order."""
        lines = self.session.send(
            b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
            b"RCPT TO:<nobody@example.test>\r\nDATA\r\nhello\r\n.\r\nQUIT\r\n"
        )
        self.assertEqual(
            [line[:3] for line in lines], [b"250", b"250", b"550", b"354", b"250", b"221"]
        )

    def test_halfCloseAnswersEverything(self) -> None:
        """
        A client that shuts down its sending side after a pipelined
        transaction (C{nc -N}) still gets the 250 of its message, stored
        after the FIN, and the replies to what followed; then the session
        closes, as Postfix's does.
        """
        self.mailbox.held = []
        s = self.session
        lines = s.send(
            b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
            b"DATA\r\nhello\r\n.\r\nNOOP\r\n"
        )
        self.assertEqual([line[:3] for line in lines], [b"250", b"250", b"354"])
        s.protocol.readConnectionLost()
        self.assertFalse(s.transport.disconnecting)
        self.mailbox.held[0].callback(None)
        self.assertEqual(s.read(), [b"250 2.0.0 Ok: queued as ID1", b"250 2.0.0 Ok"])
        self.assertTrue(s.transport.disconnecting)
        self.assertEqual(self.mailbox.stored, [b"Received: from client.example\r\nhello\r\n"])

    def test_halfCloseWithQuit(self) -> None:
        """QUIT before the FIN is answered once, with its 221."""
        s = self.session
        self.assertEqual(s.send(b"NOOP\r\nQUIT\r\n")[-1][:4], b"221 ")
        s.protocol.readConnectionLost()
        self.assertEqual(s.read(), [])
        self.assertTrue(s.transport.disconnecting)

    def test_halfCloseIdle(self) -> None:
        """A FIN with nothing left to answer closes the session at once."""
        self.session.protocol.readConnectionLost()
        self.assertEqual(self.session.read(), [])
        self.assertTrue(self.session.transport.disconnecting)

    def test_halfCloseInData(self) -> None:
        """A FIN inside DATA ends a message that can never be complete: nothing is stored."""
        self.startData()
        self.session.send(b"half a message\r\n")
        self.session.protocol.readConnectionLost()
        self.assertTrue(self.session.transport.disconnecting)
        self.assertEqual(self.mailbox.stored, [])
        self.assertTrue(self.mailbox.messages[0].aborted)

    def test_halfCloseBeforeGreeting(self) -> None:
        """
        A client that sends its commands and its FIN while the listener
        still decides whether to admit it gets the greeting, the replies,
        and then the close; with no command, the greeting and the close.
        """
        for sent, expected in ((b"NOOP\r\n", [b"250 2.0.0 Ok"]), (b"", [])):
            admission: defer.Deferred = defer.Deferred()
            self.factory.admit = lambda host, admission=admission: admission
            s = Session(self.factory)
            s.protocol.dataReceived(sent)
            s.protocol.readConnectionLost()
            self.assertEqual(s.read(), [])
            admission.callback(None)
            self.assertEqual(s.read(), [b"220 mx.example.test ESMTP mailauth"] + expected)
            self.assertTrue(s.transport.disconnecting)

    def test_clientGoneInData(self) -> None:
        """A client that disconnects inside DATA leaves nothing stored."""
        self.startData()
        self.session.send(b"half a message\r\n")
        self.session.protocol.connectionLost(None)
        self.assertEqual(self.mailbox.stored, [])
        self.assertTrue(self.mailbox.messages[0].aborted)

    def test_rset(self) -> None:
        """RSET ends the transaction."""
        self.session.command(b"MAIL FROM:<alice@example.test>")
        self.assertReply(self.session.command(b"RSET"), b"250 2.0.0 Ok")
        self.assertReply(
            self.session.command(b"RCPT TO:<bob@example.test>"),
            b"503 5.5.1 Error: need MAIL command",
        )


class RelayTests(SessionTestsMixin, unittest.TestCase):
    authMode = "optional"
    tlsMode = "implicit"

    def test_unauthenticatedLocalOnly(self) -> None:
        """Without AUTH on an optional listener, only local recipients are accepted."""
        self.ehlo()
        self.session.command(b"MAIL FROM:<someone@remote.test>")
        self.assertReply(self.session.command(b"RCPT TO:<bob@example.test>"), b"250 2.1.5 Ok")
        lines = self.session.command(b"RCPT TO:<bob@remote.test>")
        self.assertEqual(lines, [b"554 5.7.1 <bob@remote.test>: Relay access denied"])


class LimitTests(SessionTestsMixin, unittest.TestCase):
    def test_lineTooLong(self) -> None:
        """
        Input with no CRLF is not buffered past the limit (D16): one 500,
        the rest up to the next CRLF skipped, and the session goes on.
        """
        for _ in range(10):
            self.session.send(b"x" * 65536)
        self.assertLessEqual(len(self.session.protocol._buffer), esmtp.MAX_LINE)
        self.assertEqual(self.session.read(), [])
        self.session.send(b"\r\n")
        self.assertReply(self.session.command(b"NOOP"), b"250 2.0.0 Ok")

    def test_lineTooLongReply(self) -> None:
        """A long ordinary command line gets 500 5.5.2 once."""
        self.assertReply(
            self.session.send(b"NOOP " + b"x" * 13000), b"500 5.5.2 Error: line too long"
        )

    def test_tooManyErrors(self) -> None:
        """After max_errors error replies: 421 4.7.0 and the connection closes."""
        for _ in range(9):
            self.assertCode(self.session.command(b"XYZZY"), 500)
        lines = self.session.command(b"XYZZY")
        self.assertEqual(lines[-1], b"421 4.7.0 Error: too many errors")
        self.assertTrue(self.session.transport.disconnecting)

    def test_idleTimeout(self) -> None:
        """An idle session gets 421 4.4.2 when the timeout passes (D23)."""
        self.clock.advance(299)
        self.assertEqual(self.session.read(), [])
        self.clock.advance(2)
        self.assertReply(self.session.read(), b"421 4.4.2 mx.example.test Error: timeout exceeded")
        self.assertTrue(self.session.transport.disconnecting)

    def test_timeoutNotResetByPartialLines(self) -> None:
        """Bytes that never complete a line do not keep a session alive."""
        for _ in range(10):
            self.clock.advance(60)
            self.session.send(b"N")
        self.assertTrue(self.session.transport.disconnecting)

    def test_commandRestartsIdleTimer(self) -> None:
        """Every complete command line starts the idle timeout again."""
        for _ in range(3):
            self.clock.advance(299)
            self.assertReply(self.session.command(b"NOOP"), b"250 2.0.0 Ok")
        self.clock.advance(299)
        self.assertEqual(self.session.read(), [])
        self.clock.advance(2)
        self.assertReply(self.session.read(), b"421 4.4.2 mx.example.test Error: timeout exceeded")

    def test_connectionsPerAddress(self) -> None:
        """Past max_connections_per_address from one address: 421 4.7.0."""
        Session(self.factory).read()
        Session(self.factory).read()
        extra = Session(self.factory)
        self.assertReply(extra.read(), b"421 4.7.0 Error: too many connections from your address")
        self.assertTrue(extra.transport.disconnecting)
        other = Session(self.factory, host="192.0.2.2")
        self.assertEqual(other.read(), [b"220 mx.example.test ESMTP mailauth"])

    def test_connectionSlotReleased(self) -> None:
        """A closed connection frees its slot."""
        Session(self.factory).read()
        third = Session(self.factory)
        third.protocol.connectionLost(None)
        fourth = Session(self.factory)
        self.assertEqual(fourth.read(), [b"220 mx.example.test ESMTP mailauth"])

    def test_pipelineBackpressure(self) -> None:
        """A client pipelining a flood while a command waits is paused, then resumed."""
        # The flood is of NOOPs: past junk_command_limit they would end the
        # session, which is not what this is about.
        self.factory = self.makeFactory(
            tlsMode="implicit", settings=makeSettings(junk_command_limit=10**6)
        )
        self.portal.answer = None
        session = Session(self.factory)
        session.read()
        session.command(b"EHLO c")
        session.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n" + b"NOOP\r\n" * 20000)
        self.assertEqual(session.transport.producerState, "paused")
        self.portal.succeed()
        self.assertEqual(session.transport.producerState, "producing")
        self.assertEqual(len(session.read()), 20001)


class ThrottleSessionTests(SessionTestsMixin, unittest.TestCase):
    tlsMode = "implicit"

    def test_tarpitDelaysFailure(self) -> None:
        """Past half the per-address limit, the 535 comes only after the tarpit delay."""
        bad = b"AUTH PLAIN " + b64(b"\0alice@example.test\0wrong")
        for i in range(5):
            s = Session(self.factory, host=f"192.0.2.{i + 10}")
            s.read()
        for _ in range(5):
            self.factory.throttle.failure("192.0.2.1", "x@example.test")
        self.ehlo()
        self.assertEqual(self.session.command(bad), [])
        self.clock.advance(1.9)
        self.assertEqual(self.session.read(), [])
        self.clock.advance(0.2)
        self.assertReply(self.session.read(), b"535 5.7.8 Authentication credentials invalid")

    def test_blockedAddressRefused(self) -> None:
        """An address past its failure limit is refused at connect with 421 4.7.0."""
        for _ in range(10):
            self.factory.throttle.failure("192.0.2.1", "x@example.test")
        s = Session(self.factory)
        self.assertReply(s.read(), b"421 4.7.0 Error: too many failed logins, try again later")
        other = Session(self.factory, host="192.0.2.9")
        self.assertEqual(other.read(), [b"220 mx.example.test ESMTP mailauth"])


class ReplyFormatTests(SessionTestsMixin, unittest.TestCase):
    def test_everyReplyHasEnhancedCode(self) -> None:
        """Every reply but the greeting, EHLO and 334 carries an enhanced status code (D13)."""
        s = self.session
        lines = []
        for command in (
            b"NOOP",
            b"XYZZY",
            b"HELO c",
            b"EHLO",
            b"MAIL FROM:<a@b.test>",
            b"AUTH PLAIN",
            b"RSET",
            b"VRFY x",
            b"EXPN x",
            b"HELP",
            b"DATA",
            b"RCPT TO:<x@y.test>",
            b"STARTTLS",
        ):
            lines.extend(s.command(command))
        for line in lines:
            code, sep, text = REPLY.match(line).groups()
            if line == b"250 mx.example.test":
                continue
            self.assertRegex(text, ENHANCED, line)


class DataReaderTests(unittest.TestCase):
    """The bulk DATA scanner on its own, fed in every possible split."""

    def feedAll(self, wire: bytes, splits) -> tuple:
        """
        Feed C{wire} cut at C{splits}; after the end of the message the
        remaining pieces join what the reader handed back.
        """
        out = []
        reader = DataReader(out.append, 10**6)
        bounds = [0, *splits, len(wire)]
        pieces = [wire[a:b] for a, b in zip(bounds, bounds[1:])]
        rest = None
        for n, piece in enumerate(pieces):
            rest = reader.feed(piece)
            if rest is not None:
                rest += b"".join(pieces[n + 1 :])
                break
        return b"".join(out), rest, reader

    def test_everySplit(self) -> None:
        """Whatever the packet boundaries, the message and the leftover are the same."""
        wire = b".leading\r\n..two\r\nmid.dle\r\n.\r\nNOOP\r\n"
        for i in range(len(wire) + 1):
            for j in range(i, len(wire) + 1):
                body, rest, reader = self.feedAll(wire, [i, j])
                self.assertEqual(body, b"leading\r\n.two\r\nmid.dle\r\n", (i, j))
                self.assertEqual(rest, b"NOOP\r\n", (i, j))
                self.assertFalse(reader.bareNewline)

    def test_emptyMessage(self) -> None:
        """A message of nothing ends at once."""
        body, rest, _ = self.feedAll(b".\r\n", [])
        self.assertEqual((body, rest), (b"", b""))

    def test_longLineIsStreamed(self) -> None:
        """A line longer than the hold limit is passed on before its end arrives."""
        out = []
        reader = DataReader(out.append, 10**7)
        reader.feed(b"y" * (dataread.DATA_HOLD * 3))
        self.assertGreater(sum(map(len, out)), dataread.DATA_HOLD)
        self.assertIsNotNone(reader.feed(b"\r\n.\r\n"))
        self.assertEqual(b"".join(out), b"y" * (dataread.DATA_HOLD * 3) + b"\r\n")

    def test_crlfNotSplitAcrossChunks(self) -> None:
        """A CR at the end of a long piece is held so CRLF reaches the sink whole."""
        out = []
        reader = DataReader(out.append, 10**7)
        reader.feed(b"z" * (dataread.DATA_HOLD + 10) + b"\r")
        reader.feed(b"\nnext\r\n.\r\n")
        self.assertFalse(reader.bareNewline)
        self.assertFalse(any(chunk.endswith(b"\r") for chunk in out))


class SettingsTests(unittest.TestCase):
    def test_sizeAdvertised(self) -> None:
        """SIZE advertises max_message_size."""
        clock = Clock()
        factory = makeFactory(clock, settings=makeSettings(max_message_size=12345))
        s = Session(factory)
        s.read()
        self.assertIn(b"250-SIZE 12345", s.command(b"EHLO c"))


class PortalRecordingTests(unittest.TestCase):
    def test_credentialsReprHidesPassword(self) -> None:
        """Credentials never show the password in a repr (so never in a log)."""
        portal = RecordingPortal(MemoryMailbox())
        factory = makeFactory(Clock(), portal=portal, tlsMode="implicit")
        s = Session(factory)
        s.read()
        s.command(b"EHLO c")
        s.command(b"AUTH PLAIN " + b64(b"\0alice@example.test\0hunter2"))
        self.assertNotIn("hunter2", repr(portal.logins[0][0]))
