"""
The session's newer extensions on a StringTransport: SMTPUTF8 (RFC 6531),
CHUNKING/BDAT (RFC 3030) and the DSN parameters (RFC 3461), and the address
and reply rules of issue 10 (items 2, 9, 10, 12).
"""

from __future__ import annotations

import base64

from twisted.internet.task import Clock
from twisted.trial import unittest

from mailauth.replies import MAX_REPLY_LINE
from tests.support import MemoryMailbox, RecordingPortal, Session, makeFactory, passwordIs

HEADER = b"Received: from client.example\r\n"


class RecordingMailbox(MemoryMailbox):
    """A L{MemoryMailbox} that keeps every recipient the session handed over."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recipients: list = []

    def getMessageDelivery(self):
        delivery = super().getMessageDelivery()
        validateTo = delivery.validateTo

        def record(user):
            self.recipients.append(user)
            return validateTo(user)

        delivery.validateTo = record
        return delivery


class ExtensionTestsMixin:
    """A logged-in session over implicit TLS, its mailbox recording recipients."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.mailbox = RecordingMailbox(login="alice@example.test")
        portal = RecordingPortal(self.mailbox, answer=passwordIs(b"secret"))
        self.factory = makeFactory(self.clock, portal=portal, tlsMode="implicit")
        self.session = Session(self.factory)
        self.session.read()
        self.session.command(b"EHLO client.example")
        token = base64.b64encode(b"\0alice@example.test\0secret")
        assert self.session.command(b"AUTH PLAIN " + token)[0].startswith(b"235 ")

    def command(self, line: bytes) -> list:
        return self.session.command(line)

    def transaction(self, mail: bytes = b"MAIL FROM:<alice@example.test>") -> None:
        self.assertEqual(self.command(mail)[0][:3], b"250")
        self.assertEqual(self.command(b"RCPT TO:<bob@example.test>")[0][:3], b"250")


class SMTPUTF8Tests(ExtensionTestsMixin, unittest.TestCase):
    def test_utf8Transaction(self) -> None:
        """
        With SMTPUTF8 on MAIL, UTF-8 addresses are taken in MAIL and RCPT,
        in their normalised form, and the recipient knows the transaction
        is SMTPUTF8.
        """
        self.mailbox.users = ("bob@example.test", "jörg@example.test")
        self.mailbox.login = None
        self.assertEqual(
            self.command("MAIL FROM:<jörg@bücher.example> SMTPUTF8".encode()), [b"250 2.1.0 Ok"]
        )
        self.assertEqual(self.command("RCPT TO:<jörg@EXAMPLE.test>".encode()), [b"250 2.1.5 Ok"])
        [user] = self.mailbox.recipients
        self.assertEqual(user.dest.local, "jörg".encode())
        self.assertTrue(user.mail.smtputf8)
        self.assertEqual(str(user.orig.domain, "utf-8"), "bücher.example")

    def test_utf8WithoutParameter(self) -> None:
        """Without SMTPUTF8, a UTF-8 address gets 553 5.6.7 at MAIL and at RCPT."""
        self.assertEqual(
            self.command("MAIL FROM:<jörg@example.test>".encode()),
            [b"553 5.6.7 Error: non-ASCII address needs the SMTPUTF8 parameter"],
        )
        self.command(b"MAIL FROM:<alice@example.test>")
        self.assertEqual(
            self.command("RCPT TO:<jörg@example.test>".encode()),
            [b"553 5.6.7 Error: non-ASCII address needs the SMTPUTF8 parameter"],
        )

    def test_utf8OnlyInAddresses(self) -> None:
        """
        UTF-8 elsewhere than MAIL, RCPT and VRFY is refused as before, and
        bytes that are not UTF-8 at all get 500 5.5.2.
        """
        self.assertEqual(
            self.command("EHLO clïent.example".encode()),
            [b"500 5.5.2 Error: command contains non-ASCII characters"],
        )
        self.assertEqual(
            self.command(b"MAIL FROM:<j\xf6rg@example.test> SMTPUTF8"),
            [b"500 5.5.2 Error: bad UTF-8 syntax"],
        )
        self.assertEqual(self.command("VRFY jörg".encode())[0][:4], b"252 ")


class DSNParameterTests(ExtensionTestsMixin, unittest.TestCase):
    def test_parametersHandedOver(self) -> None:
        """RET, ENVID, NOTIFY and ORCPT are accepted and reach the delivery."""
        self.assertEqual(
            self.command(b"MAIL FROM:<alice@example.test> RET=HDRS ENVID=QQ+2B1"), [b"250 2.1.0 Ok"]
        )
        self.assertEqual(
            self.command(
                b"RCPT TO:<bob@example.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Bob+40example.test"
            ),
            [b"250 2.1.5 Ok"],
        )
        [user] = self.mailbox.recipients
        self.assertEqual((user.mail.ret, user.mail.envid), ("HDRS", "QQ+2B1"))
        self.assertEqual(
            (user.params.notify, user.params.orcpt),
            (("SUCCESS", "DELAY"), "rfc822;Bob+40example.test"),
        )

    def test_badParameters(self) -> None:
        """Malformed DSN parameters get 501 5.5.4; nothing is recorded."""
        self.assertEqual(
            self.command(b"MAIL FROM:<alice@example.test> RET=BODY")[0][:10], b"501 5.5.4 "
        )
        self.command(b"MAIL FROM:<alice@example.test>")
        self.assertEqual(
            self.command(b"RCPT TO:<bob@example.test> NOTIFY=NEVER,DELAY")[0][:10], b"501 5.5.4 "
        )
        self.assertEqual(self.mailbox.recipients, [])


class ChunkingTests(ExtensionTestsMixin, unittest.TestCase):
    def bdat(self, data: bytes, last: bool = False) -> bytes:
        return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data

    def test_oneChunk(self) -> None:
        """BDAT n LAST carries the whole message as it is: no dot handling."""
        self.transaction()
        body = b"Subject: x\r\n\r\n..dots stay\r\n.\r\nMAIL FROM:<evil@evil.test>\r\n"
        self.assertEqual(
            self.session.send(self.bdat(body, last=True)), [b"250 2.0.0 Ok: queued as ID1"]
        )
        self.assertEqual(self.mailbox.stored, [HEADER + body])

    def test_leadingWhitespaceStartsTheBody(self) -> None:
        """
        With BDAT too, content whose first octet is a space or a tab gets
        an empty line before it, whichever chunk it comes in (an empty
        first chunk included), so it cannot continue the server's
        C{Received:}.
        """
        self.transaction()
        self.assertEqual(
            self.session.send(self.bdat(b"") + self.bdat(b"\t") + self.bdat(b"x\r\n", last=True))[
                -1
            ],
            b"250 2.0.0 Ok: queued as ID1",
        )
        self.assertEqual(self.mailbox.stored, [HEADER + b"\r\n\tx\r\n"])

    def test_pipelinedChunksAndTransactions(self) -> None:
        """
        Chunks, BDAT 0 LAST and a second transaction with DATA, all in one
        packet, get their replies in order (RFC 3030 with RFC 2920).
        """
        lines = self.session.send(
            b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
            + self.bdat(b"first\r")
            + self.bdat(b"\nsecond\r\n")
            + b"BDAT 0 LAST\r\n"
            + b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
            + b"DATA\r\nthird\r\n.\r\nNOOP\r\n"
        )
        self.assertEqual(
            lines,
            [
                b"250 2.1.0 Ok",
                b"250 2.1.5 Ok",
                b"250 2.0.0 Ok: 6 octets",
                b"250 2.0.0 Ok: 15 octets",
                b"250 2.0.0 Ok: queued as ID1",
                b"250 2.1.0 Ok",
                b"250 2.1.5 Ok",
                b"354 End data with <CR><LF>.<CR><LF>",
                b"250 2.0.0 Ok: queued as ID2",
                b"250 2.0.0 Ok",
            ],
        )
        self.assertEqual(
            self.mailbox.stored, [HEADER + b"first\r\nsecond\r\n", HEADER + b"third\r\n"]
        )

    def test_chunkSplitAcrossReads(self) -> None:
        """A chunk may arrive in any number of reads."""
        self.transaction()
        wire = self.bdat(b"abc\r\ndef\r\n", last=True)
        for byte in wire[:-1]:
            self.assertEqual(self.session.send(bytes([byte])), [])
        self.assertEqual(self.session.send(wire[-1:]), [b"250 2.0.0 Ok: queued as ID1"])

    def test_bareNewlineRefused(self) -> None:
        """
        A bare LF in a chunk fails the transaction with 550 5.6.2 at once;
        chunks already pipelined are read and discarded without counting
        as errors, and nothing is stored.
        """
        self.transaction()
        lines = self.session.send(
            self.bdat(b"a\nb\r\n")
            + self.bdat(b"more\r\n")
            + self.bdat(b"end\r\n", last=True)
            + b"NOOP\r\n"
        )
        self.assertEqual(
            lines,
            [
                b"550 5.6.2 Error: bare CR or LF in message, not accepted",
                b"503 5.5.1 Error: chunk discarded after an earlier error",
                b"503 5.5.1 Error: chunk discarded after an earlier error",
                b"250 2.0.0 Ok",
            ],
        )
        self.assertEqual(self.mailbox.stored, [])
        self.assertTrue(self.mailbox.messages[0].aborted)
        self.assertEqual(self.session.protocol._errors, 1)

    def test_nulRefused(self) -> None:
        """A NUL in a chunk gets 550 5.6.0."""
        self.transaction()
        self.assertEqual(
            self.session.send(self.bdat(b"a\0\r\n", last=True)),
            [b"550 5.6.0 Error: NUL character in message, not accepted"],
        )

    def test_sizeLimit(self) -> None:
        """The size limit counts every chunk: 552 5.3.4 at the chunk that passes it."""
        self.transaction()
        chunk = b"x" * 1000 + b"\r\n"
        for _ in range(1024 * 1024 // len(chunk)):
            self.assertEqual(self.session.send(self.bdat(chunk))[0][:4], b"250 ")
        self.assertEqual(
            self.session.send(self.bdat(chunk)),
            [b"552 5.3.4 Message size exceeds fixed maximum message size"],
        )
        self.assertEqual(self.mailbox.stored, [])

    def test_lastLineWithoutLineEnd(self) -> None:
        """
        Content that stops without a CRLF is passed on with one, which the
        size limit does not count: a message of exactly max_message_size
        octets is still accepted.
        """
        self.transaction()
        limit = self.factory.settings.max_message_size
        line = b"x" * 1000 + b"\r\n"
        body = line * (limit // len(line)) + b"y" * (limit % len(line))
        self.assertEqual((len(body), body[-2:]), (limit, b"yy"))
        self.assertEqual(
            self.session.send(self.bdat(body[:10]) + self.bdat(body[10:], last=True)),
            [b"250 2.0.0 Ok: 10 octets", b"250 2.0.0 Ok: queued as ID1"],
        )
        self.assertTrue(self.mailbox.stored == [HEADER + body + b"\r\n"])

    def test_outOfSequence(self) -> None:
        """
        BDAT before MAIL gets 503, and before any recipient 554 (no valid
        recipients), after its octets are read, so none of them is taken
        for a command.
        """
        smuggled = b"RSET\r\nMAIL FROM:<alice@example.test>\r\n"
        self.assertEqual(
            self.session.send(self.bdat(smuggled)), [b"503 5.5.1 Error: need MAIL command"]
        )
        self.command(b"MAIL FROM:<alice@example.test>")
        self.assertEqual(
            self.session.send(self.bdat(smuggled, last=True)),
            [b"554 5.5.1 Error: no valid recipients"],
        )
        self.assertEqual(self.command(b"RCPT TO:<bob@example.test>"), [b"250 2.1.5 Ok"])

    def test_chunksAfterRefusedChunkDiscarded(self) -> None:
        """
        A BDAT refused because no recipient was accepted fails the
        transaction like a broken chunk: the chunks the client pipelined
        behind it, more of them than max_errors, are read and discarded
        without counting as errors (RFC 3030 2), and the session goes on.
        """
        self.assertEqual(self.command(b"MAIL FROM:<alice@example.test>"), [b"250 2.1.0 Ok"])
        chunks = b"".join(self.bdat(b"line %d\r\n" % i) for i in range(12))
        lines = self.session.send(
            b"RCPT TO:<carol@example.test>\r\n"
            + chunks
            + self.bdat(b"end\r\n", last=True)
            + b"NOOP\r\n"
        )
        self.assertEqual(lines[0][:4], b"550 ")
        self.assertEqual(lines[1], b"554 5.5.1 Error: no valid recipients")
        self.assertEqual(
            lines[2:],
            [b"503 5.5.1 Error: chunk discarded after an earlier error"] * 12 + [b"250 2.0.0 Ok"],
        )
        self.assertFalse(self.session.transport.disconnecting)
        self.assertEqual(self.session.protocol._errors, 2)
        self.assertEqual(self.mailbox.stored, [])
        self.assertEqual(self.command(b"RSET"), [b"250 2.0.0 Ok"])
        self.transaction()
        self.assertEqual(
            self.session.send(self.bdat(b"x\r\n", last=True)), [b"250 2.0.0 Ok: queued as ID1"]
        )

    def test_discardedChunkTrickleCut(self) -> None:
        """
        A chunk read only to be discarded gets max_data_time too: a client
        trickling one in, each octet within the idle timeout, is cut off
        with 421 4.4.2 as one trickling a message is.
        """
        self.assertEqual(self.session.send(b"BDAT 99999999999999999999\r\nx"), [])
        limit = self.factory.settings.max_data_time
        for _ in range(int(limit // 290)):
            self.clock.advance(290)
            self.assertEqual(self.session.send(b"x"), [])
        self.clock.advance(limit % 290)
        self.assertEqual(
            self.session.read(),
            [b"421 4.4.2 mx.example.test Error: message transfer took too long"],
        )
        self.assertTrue(self.session.transport.disconnecting)

    def test_discardedChunksShareMaxDataTime(self) -> None:
        """
        Empty chunks repeated after a refused one (no error, and no junk
        command either) get max_data_time in all, from the first.
        """
        self.transaction()
        self.assertEqual(
            self.session.send(self.bdat(b"a\nb\r\n") + b"BDAT 0\r\n"),
            [
                b"550 5.6.2 Error: bare CR or LF in message, not accepted",
                b"503 5.5.1 Error: chunk discarded after an earlier error",
            ],
        )
        limit = self.factory.settings.max_data_time
        for _ in range(int(limit // 290)):
            self.clock.advance(290)
            self.assertEqual(
                self.command(b"BDAT 0"),
                [b"503 5.5.1 Error: chunk discarded after an earlier error"],
            )
        self.clock.advance(limit % 290)
        self.assertEqual(
            self.session.read(),
            [b"421 4.4.2 mx.example.test Error: message transfer took too long"],
        )

    def test_mailEndsDiscardedChunksTime(self) -> None:
        """
        MAIL starts afresh after discarded chunks: their max_data_time no
        longer runs, and the new message gets its own.
        """
        self.assertEqual(self.command(b"BDAT 0")[0][:4], b"503 ")
        self.transaction()
        limit = self.factory.settings.max_data_time
        for _ in range(int(limit // 290) + 1):
            self.clock.advance(290)
            self.assertEqual(self.command(b"NOOP"), [b"250 2.0.0 Ok"])
        self.assertEqual(
            self.session.send(self.bdat(b"x\r\n", last=True)), [b"250 2.0.0 Ok: queued as ID1"]
        )

    def test_dataEndsDiscardedChunksTime(self) -> None:
        """
        DATA after a refused chunk (MAIL, BDAT before any RCPT, RCPT, DATA)
        gets its own max_data_time in place of the discarded chunk's: that
        one no longer runs once the message is stored, nor once the client
        has gone (no timer outlives the session).
        """
        self.command(b"MAIL FROM:<alice@example.test>")
        self.assertEqual(self.command(b"BDAT 0"), [b"554 5.5.1 Error: no valid recipients"])
        self.assertEqual(self.command(b"RCPT TO:<bob@example.test>"), [b"250 2.1.5 Ok"])
        self.assertEqual(self.command(b"DATA"), [b"354 End data with <CR><LF>.<CR><LF>"])
        self.assertEqual(
            self.session.send(b"Subject: x\r\n\r\nbody\r\n.\r\n"), [b"250 2.0.0 Ok: queued as ID1"]
        )
        limit = self.factory.settings.max_data_time
        for _ in range(int(limit // 290) + 1):
            self.clock.advance(290)
            self.assertEqual(self.command(b"NOOP"), [b"250 2.0.0 Ok"])
        self.assertFalse(self.session.transport.disconnecting)
        self.command(b"QUIT")
        self.session.protocol.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_dataAndRcptAfterBdat(self) -> None:
        """DATA or RCPT once BDAT has begun get 503; LAST still ends the message."""
        self.transaction()
        self.session.send(self.bdat(b"a\r\n"))
        self.assertEqual(self.command(b"DATA"), [b"503 5.5.1 Error: DATA after BDAT"])
        self.assertEqual(
            self.command(b"RCPT TO:<alice@example.test>"), [b"503 5.5.1 Error: RCPT after BDAT"]
        )
        self.assertEqual(
            self.session.send(self.bdat(b"b\r\n", last=True)), [b"250 2.0.0 Ok: queued as ID1"]
        )
        self.assertEqual(
            self.session.send(self.bdat(b"c\r\n")), [b"503 5.5.1 Error: need MAIL command"]
        )

    def test_rsetAbortsChunks(self) -> None:
        """RSET between chunks throws the message away (RFC 3030 2)."""
        self.transaction()
        self.session.send(self.bdat(b"a\r\n"))
        self.assertEqual(self.command(b"RSET"), [b"250 2.0.0 Ok"])
        self.assertTrue(self.mailbox.messages[0].aborted)
        self.assertEqual(self.mailbox.stored, [])

    def test_messageNotStarted(self) -> None:
        """
        When the message cannot be started (its sink fails at once), the
        chunk is still read and discarded, never run as commands: 451.
        """
        self.transaction()

        def broken():
            raise OSError(5, "I/O error")

        self.session.protocol._recipients[0] = (self.session.protocol._recipients[0][0], broken)
        lines = self.session.send(
            self.bdat(b"QUIT\r\n") + self.bdat(b"RSET\r\n", last=True) + b"NOOP\r\n"
        )
        self.assertEqual(
            lines,
            [
                b"451 4.3.0 Error: local error in processing",
                b"503 5.5.1 Error: chunk discarded after an earlier error",
                b"250 2.0.0 Ok",
            ],
        )
        self.assertFalse(self.session.transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_malformedBdatCloses(self) -> None:
        """A BDAT whose size cannot be read closes the session: what follows is unknown."""
        self.transaction()
        self.assertEqual(
            self.command(b"BDAT 12x"),
            [b"421 4.5.2 Error: malformed BDAT command, closing connection"],
        )
        self.assertTrue(self.session.transport.disconnecting)
        self.assertEqual(self.mailbox.stored, [])

    def test_chunkTimeout(self) -> None:
        """Inside a chunk the data timeout applies, from each read."""
        self.transaction()
        self.session.send(b"BDAT 10 LAST\r\nabc")
        self.clock.advance(599)
        self.assertEqual(self.session.send(b"def"), [])
        self.clock.advance(599)
        self.assertFalse(self.session.transport.disconnecting)
        self.clock.advance(2)
        self.assertEqual(self.session.read()[0][:4], b"421 ")
        self.assertTrue(self.mailbox.messages[0].aborted)

    def test_chunksShareMaxDataTime(self) -> None:
        """
        The chunks of one message get max_data_time in all, however steadily
        they trickle in (each within the idle timeout): then 421 4.4.2 and
        nothing is stored.
        """
        self.transaction()
        limit = self.factory.settings.max_data_time
        self.assertEqual(self.session.send(self.bdat(b"x\r\n"))[0][:4], b"250 ")
        for _ in range(int(limit // 290)):
            self.clock.advance(290)
            self.assertEqual(self.session.send(self.bdat(b"x\r\n"))[0][:4], b"250 ")
        self.clock.advance(limit % 290)
        self.assertEqual(
            self.session.read(),
            [b"421 4.4.2 mx.example.test Error: message transfer took too long"],
        )
        self.assertTrue(self.mailbox.messages[0].aborted)
        self.assertEqual(self.mailbox.stored, [])

    def test_deadlineEndsWithMessage(self) -> None:
        """Once LAST is read the deadline is gone: the session goes on past max_data_time."""
        self.transaction()
        self.session.send(self.bdat(b"x\r\n", last=True))
        for _ in range(int(self.factory.settings.max_data_time // 290) + 1):
            self.clock.advance(290)
            self.assertEqual(self.command(b"NOOP"), [b"250 2.0.0 Ok"])

    def test_clientGoneInChunk(self) -> None:
        """A client that disconnects inside a chunk leaves nothing stored."""
        self.transaction()
        self.session.send(b"BDAT 10 LAST\r\nabc")
        self.session.protocol.connectionLost(None)
        self.assertTrue(self.mailbox.messages[0].aborted)
        self.assertEqual(self.mailbox.stored, [])


class AddressRuleTests(ExtensionTestsMixin, unittest.TestCase):
    """Issue 10: items 9, 10 and the last part of 12."""

    def test_unterminatedPath(self) -> None:
        """C{RCPT TO:<bad syntax} gets 501 5.1.3, not 555 (issue 10 item 12)."""
        self.command(b"MAIL FROM:<alice@example.test>")
        self.assertEqual(
            self.command(b"RCPT TO:<bad syntax"), [b"501 5.1.3 Bad recipient address syntax"]
        )

    def test_unstorableRefusedAtRcpt(self) -> None:
        """
        C{RCPT TO:<"x>y"@remote.example>} gets 553 at RCPT, not a 250 and
        then a 451 at DATA (issue 10 item 9).
        """
        self.command(b"MAIL FROM:<alice@example.test>")
        self.assertEqual(
            self.command(b'RCPT TO:<"x>y"@remote.example>'),
            [
                b"553 5.1.3 Error: recipient address with spaces, angle brackets or controls "
                b"not accepted"
            ],
        )
        self.assertEqual(self.mailbox.recipients, [])

    def test_replyLinesBounded(self) -> None:
        """
        A 10,000-byte parameter comes back cut: no reply line is longer than
        512 octets (RFC 5321 4.5.3.1.5, issue 10 item 10).
        """
        lines = [
            b"MAIL FROM:<alice@example.test> " + b"X" * 10000,
            b"MAIL FROM:<alice@example.test> " + b"A" * 5000 + b"=1 " + b"A" * 5000 + b"=2",
            b"MAIL FROM:<alice@example.test>",
            b"RCPT TO:<bob@example.test> " + b"N" * 10000,
            b"RCPT TO:<" + b"x" * 10000 + b"@example.test>",
        ]
        replies = [self.command(line) for line in lines]
        self.assertEqual(
            [reply[0][:4] for reply in replies], [b"555 ", b"555 ", b"250 ", b"555 ", b"501 "]
        )
        for [reply] in replies:
            self.assertLessEqual(len(reply) + 2, MAX_REPLY_LINE, reply[:80])

    def test_quotedLocalPartCanonical(self) -> None:
        """The recipient handed to the delivery has no needless quotes (issue 10 item 2)."""
        self.command(b"MAIL FROM:<alice@example.test>")
        self.assertEqual(self.command(b'RCPT TO:<"b\\ob"@example.test>'), [b"250 2.1.5 Ok"])
        [user] = self.mailbox.recipients
        self.assertEqual(user.dest.local, b"bob")
