"""
The address grammar and the MAIL and RCPT parameters: wire forms and keys,
SMTPUTF8 (RFC 6531), IDNA, the DSN parameters (RFC 3461), and the property
that every address the parser accepts can be stored and relayed.
"""

from __future__ import annotations

import io
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailauth import addresses
from mailauth.addresses import (
    MailParameters,
    RcptParameters,
    addressText,
    asciiAddress,
    decodeXtext,
    domainKey,
    encodeXtext,
    normalise,
    orcptFor,
    parseMailParameters,
    parsePath,
    parseRcptParameters,
    splitArguments,
)
from mailauth.envelope import Envelope, RecipientStatus
from mailauth.relay import RelayClientProtocol, RelaySession
from mailauth.replies import SMTPReply
from mailauth.spool import Queue


def wire(text: str, allowNull: bool = False, utf8: bool = False) -> str:
    return addressText(parsePath(text, allowNull, utf8))


def refusal(test, text: str, allowNull: bool = False, utf8: bool = False) -> str:
    e = test.assertRaises(SMTPReply, parsePath, text, allowNull, utf8)
    return f"{e.code} {e.text}"


class PathTests(unittest.TestCase):
    """L{parsePath}: the wire form of an address."""

    def test_quotingDropped(self) -> None:
        """
        Quotes a local part does not need, and quoted-pairs, are resolved:
        C{"carol"} and C{"c\\arol"} are C{carol} (RFC 5321 4.1.2, RFC 5322
        3.4.1); quotes that are needed stay, escaping only C{"} and C{\\}.
        """
        self.assertEqual(wire('<"carol"@example.org>'), "carol@example.org")
        self.assertEqual(wire('<"c\\arol"@example.org>'), "carol@example.org")
        self.assertEqual(wire('<"first.last"@example.org>'), "first.last@example.org")
        self.assertEqual(wire('<"a..b"@example.org>'), '"a..b"@example.org')
        self.assertEqual(wire('<"a\\"b"@example.org>'), '"a\\"b"@example.org')
        self.assertEqual(wire('<"a@b"@example.org>'), '"a@b"@example.org')
        self.assertEqual(wire('<""@example.org>'), '""@example.org')

    def test_casePreserved(self) -> None:
        """The local part keeps its case (RFC 5321 2.4); the domain is lower-cased."""
        self.assertEqual(wire("<Bob.Smith@Remote.EXAMPLE.>"), "Bob.Smith@remote.example")

    def test_sourceRouteDropped(self) -> None:
        """A source route is accepted and ignored (RFC 5321 appendix C)."""
        self.assertEqual(wire("<@a.example,@b.example:bob@c.example>"), "bob@c.example")

    def test_unrelayableRefused(self) -> None:
        """
        A quoted local part holding a space, an angle bracket or a control
        character gets 553 at MAIL or RCPT, never a 250 the queue cannot
        keep (issue 10 item 9).
        """
        for bad in (
            '<"x>y"@remote.example>',
            '<"a b"@remote.example>',
            '<"a<b"@remote.example>',
            '<"a\\ b"@remote.example>',
        ):
            self.assertEqual(
                refusal(self, bad),
                "553 5.1.3 Error: recipient address with spaces, angle brackets or controls "
                "not accepted",
            )
        self.assertTrue(
            refusal(self, '<"x>y"@remote.example>', allowNull=True).startswith("553 5.1.7 ")
        )
        self.assertTrue(
            refusal(self, '<"a\u202eb"@remote.example>', utf8=True).startswith("553 5.1.3 ")
        )

    def test_malformed(self) -> None:
        """Malformed paths get 501 5.1.3 (5.1.7 for a sender)."""
        for bad in (
            "<bob>",
            "<bob@>",
            "<@example.test>",
            "<a@b@example.test>",
            "<bad syntax",
            "bob@example.test",
            "<bob@example.test> ",
            "<bob@[999.0.0.1]>",
            "<bob@[general:stuff]>",
            "<bob@-bad.example>",
            "<a..b@example.test>",
            "<bob@" + "a" * 64 + ".example>",
        ):
            self.assertEqual(refusal(self, bad), "501 5.1.3 Bad recipient address syntax", bad)
        self.assertEqual(
            refusal(self, "<bob>", allowNull=True), "501 5.1.7 Bad sender address syntax"
        )
        self.assertEqual(refusal(self, "<>"), "501 5.1.3 Bad recipient address syntax")
        # A label of 63 octets is the longest (RFC 1035 2.3.4).
        longest = "a" * 63
        self.assertEqual(wire(f"<bob@{longest}.example>"), f"bob@{longest}.example")
        self.assertIsNone(parsePath("<>", allowNull=True))

    def test_tooLong(self) -> None:
        """A path over 256 octets (RFC 5321 4.5.3.1.3) gets 501."""
        path = "<" + "a" * 240 + "@example.test>"
        self.assertEqual(len(path.encode()), 255)  # one octet less than the most
        self.assertEqual(wire(path), path[1:-1])
        self.assertEqual(wire("<a" + path[1:]), "a" + path[1:-1])
        self.assertEqual(
            refusal(self, "<aa" + path[1:]), "501 5.1.3 Error: recipient address too long"
        )
        self.assertEqual(
            refusal(self, "<" + "é" * 121 + "@example.test>", utf8=True),
            "501 5.1.3 Error: recipient address too long",
        )

    def test_utf8NeedsSMTPUTF8(self) -> None:
        """
        UTF-8 in a path is refused with 553 5.6.7 unless the transaction is
        SMTPUTF8 (RFC 6531 3.5); then local parts and domains may hold it.
        """
        for text in ("<jörg@example.test>", "<bob@bücher.example>"):
            self.assertEqual(
                refusal(self, text),
                "553 5.6.7 Error: non-ASCII address needs the SMTPUTF8 parameter",
            )
        self.assertEqual(wire("<jörg@bücher.example>", utf8=True), "jörg@bücher.example")
        self.assertEqual(
            wire('<"jö rg"@bücher.example>'.replace(" ", ""), utf8=True), "jörg@bücher.example"
        )

    def test_idna(self) -> None:
        """
        Internationalised domains are checked with IDNA2008 and the UTS 46
        mapping: U-labels come out normalised (lower case, NFC), A-labels
        must decode, and a domain IDNA refuses is a syntax error.
        """
        self.assertEqual(wire("<a@BÜCHER.Example>", utf8=True), "a@bücher.example")
        self.assertEqual(wire("<a@bu\u0308cher.example>", utf8=True), "a@bücher.example")
        self.assertEqual(wire("<a@XN--BCHER-KVA.example>"), "a@xn--bcher-kva.example")
        self.assertEqual(
            refusal(self, "<a@xn--zz.example>"), "501 5.1.3 Bad recipient address syntax"
        )
        self.assertEqual(
            refusal(self, "<a@b\u00fccher\u200d.example>", utf8=True),
            "501 5.1.3 Bad recipient address syntax",
        )


class KeyTests(unittest.TestCase):
    """L{normalise} and L{domainKey}: one key per mailbox."""

    def test_spellingsOfOneMailbox(self) -> None:
        """Quoting, case, a trailing dot and U- or A-labels give one key."""
        keys = {
            normalise(a)
            for a in (
                "carol@example.org",
                '"carol"@example.org',
                '"c\\arol"@example.org',
                "Carol@EXAMPLE.org.",
                " carol@example.org ",
            )
        }
        self.assertEqual(keys, {"carol@example.org"})
        keys = {
            normalise(a)
            for a in (
                "Jörg@bücher.example",
                "jörg@xn--bcher-kva.example",
                "jo\u0308rg@BÜCHER.example",
            )
        }
        self.assertEqual(keys, {"jörg@xn--bcher-kva.example"})

    def test_domainsAndCatchAll(self) -> None:
        """C{@domain} keys and bare domains get the same domain key."""
        self.assertEqual(normalise("@Bücher.example"), "@xn--bcher-kva.example")
        self.assertEqual(domainKey("bücher.example."), "xn--bcher-kva.example")
        self.assertEqual(domainKey("[IPv6:::1]"), "[ipv6:::1]")
        self.assertEqual(domainKey("bad_\u0000.example"), "bad_\u0000.example")

    def test_needfulQuotesKept(self) -> None:
        """A key is still an address: quotes that are needed stay."""
        self.assertEqual(normalise('"A B"@example.org'), '"a b"@example.org')

    def test_asciiAddress(self) -> None:
        """For a relay without SMTPUTF8: A-label domains, and no UTF-8 local part."""
        self.assertEqual(asciiAddress("bob@bücher.example"), "bob@xn--bcher-kva.example")
        self.assertIsNone(asciiAddress("jörg@example.org"))


class ArgumentTests(unittest.TestCase):
    """L{splitArguments}."""

    def test_quotedSpace(self) -> None:
        """The path ends at its closing bracket, not at a space inside quotes."""
        self.assertEqual(
            splitArguments('TO:<"a b"@x.test> NOTIFY=NEVER', "TO"),
            ('<"a b"@x.test>', {"NOTIFY": "NEVER"}),
        )
        self.assertEqual(splitArguments('TO:<"a>b"@x.test>', "TO"), ('<"a>b"@x.test>', {}))

    def test_unterminated(self) -> None:
        """A path without its end is returned whole, for the path syntax error."""
        self.assertEqual(splitArguments("TO:<bad syntax", "TO"), ("<bad syntax", {}))
        self.assertEqual(splitArguments("TO:<a@x.test>junk", "TO"), ("<a@x.test>junk", {}))

    def test_parameters(self) -> None:
        """Parameters are upper-cased; a repeated one is 555, a malformed one 501."""
        self.assertEqual(
            splitArguments("FROM:<> size=10 SMTPUTF8", "FROM"),
            ("<>", {"SIZE": "10", "SMTPUTF8": None}),
        )
        e = self.assertRaises(SMTPReply, splitArguments, "FROM:<> A=1 a=2", "FROM")
        self.assertEqual((e.code, e.text), (555, "5.5.4 Parameter A given twice"))
        e = self.assertRaises(SMTPReply, splitArguments, "FROM:<> =x", "FROM")
        self.assertEqual(e.code, 501)

    def test_echoCut(self) -> None:
        """An unknown parameter's name is echoed cut (issue 10 item 10)."""
        e = self.assertRaises(SMTPReply, parseMailParameters, {"X" * 10000: None}, 10)
        self.assertLess(len(e.text), 100)


class ParameterTests(unittest.TestCase):
    """L{parseMailParameters} and L{parseRcptParameters}."""

    def mailError(self, options: dict) -> tuple:
        e = self.assertRaises(SMTPReply, parseMailParameters, options, 1000)
        return e.code, e.text

    def rcptError(self, options: dict, utf8: bool = False) -> tuple:
        e = self.assertRaises(SMTPReply, parseRcptParameters, options, utf8)
        return e.code, e.text

    def test_mail(self) -> None:
        """SIZE, BODY, SMTPUTF8, RET, ENVID and AUTH are read and kept."""
        self.assertEqual(
            parseMailParameters(
                {
                    "SIZE": "10",
                    "BODY": "8bitmime",
                    "SMTPUTF8": None,
                    "RET": "hdrs",
                    "ENVID": "abc+2B1",
                    "AUTH": "<>",
                },
                1000,
            ),
            MailParameters(size=10, body="8BITMIME", smtputf8=True, ret="HDRS", envid="abc+2B1"),
        )

    def test_mailErrors(self) -> None:
        """Each malformed MAIL parameter gets its 501; too big a SIZE 552; unknown 555."""
        self.assertEqual(self.mailError({"SIZE": "1001"})[0], 552)
        self.assertEqual(self.mailError({"SIZE": "x"}), (501, "5.5.4 Syntax: SIZE=<number>"))
        self.assertEqual(self.mailError({"SMTPUTF8": "yes"})[0], 501)
        self.assertEqual(
            self.mailError({"RET": "ALL"}), (501, "5.5.4 Syntax: RET=FULL or RET=HDRS")
        )
        self.assertEqual(self.mailError({"RET": None})[0], 501)
        self.assertEqual(self.mailError({"ENVID": "x" * 101})[0], 501)
        self.assertEqual(self.mailError({"ENVID": "a+zz"})[0], 501)
        self.assertEqual(self.mailError({"ENVID": "a=b"})[0], 501)
        # AUTH= is ignored, but must be xtext (as Postfix checks it).
        for bad in (None, "", "a+zz@x.test", "a b", "a=b@x.test", "x" * 769):
            self.assertEqual(self.mailError({"AUTH": bad}), (501, "5.5.4 Syntax: AUTH=<xtext>"))
        for good in ("<>", "a+2Bb@x.test", "x" * 768):
            parseMailParameters({"AUTH": good}, 1000)
        self.assertEqual(
            self.mailError({"BINARYMIME": None}), (555, "5.5.4 Unsupported option: BINARYMIME")
        )

    def test_rcpt(self) -> None:
        """NOTIFY is kept in a fixed order; ORCPT as it was sent."""
        self.assertEqual(
            parseRcptParameters({"NOTIFY": "delay,Success", "ORCPT": "rfc822;a+2Bb@x.test"}, False),
            RcptParameters(notify=("SUCCESS", "DELAY"), orcpt="rfc822;a+2Bb@x.test"),
        )
        self.assertEqual(parseRcptParameters({"NOTIFY": "never"}, False).notify, ("NEVER",))
        self.assertEqual(
            parseRcptParameters({"ORCPT": "utf-8;jörg@x.test"}, True).orcpt, "utf-8;jörg@x.test"
        )
        self.assertEqual(
            parseRcptParameters({"ORCPT": "utf-8;j\\x{F6}rg@x.test"}, False).orcpt,
            "utf-8;j\\x{F6}rg@x.test",
        )

    def test_rcptErrors(self) -> None:
        """NEVER with another word, repeats, unknown words and bad ORCPTs get 501."""
        for notify in ("NEVER,SUCCESS", "SUCCESS,SUCCESS", "SOMETIMES", "", None):
            self.assertEqual(self.rcptError({"NOTIFY": notify})[0], 501, notify)
        for orcpt in (
            "rfc822",
            "rfc822;",
            ";a@x.test",
            "rfc822;a b",
            "rfc822;jörg@x.test",
            "utf-8;jörg@x.test",
            "rfc822;" + "a" * 500,
            "bad type;a@x.test",
        ):
            self.assertEqual(self.rcptError({"ORCPT": orcpt})[0], 501, orcpt)
        self.assertEqual(self.rcptError({"SIZE": "1"}), (555, "5.5.4 Unsupported option: SIZE"))


class XtextTests(unittest.TestCase):
    """xtext (RFC 3461 4) and RFC 6533's forms."""

    def test_roundTrip(self) -> None:
        """Encoding then decoding gives the text back; +, = and controls are escaped."""
        for text in ("plain", "a+b=c", "sp ace\r\n", "jörg@bücher.example", ""):
            encoded = encodeXtext(text)
            self.assertTrue(addresses.isXtext(encoded), encoded)
            self.assertEqual(decodeXtext(encoded), text)

    def test_orcptFor(self) -> None:
        """An ORCPT naming an address: rfc822 with xtext, utf-8 with escapes for + and =."""
        self.assertEqual(orcptFor("a+b@x.test"), "rfc822;a+2Bb@x.test")
        self.assertEqual(orcptFor("jörg+1@x.test"), "utf-8;jörg\\x{2B}1@x.test")
        self.assertEqual(decodeXtext(orcptFor("jörg+1@x.test")[6:]), "jörg+1@x.test")


# -- the property: what the parser accepts, the queue stores and the relay sends ----

_ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
_QTEXT = "".join(chr(c) for c in range(32, 127) if chr(c) not in '"\\')
_UTF8 = "äöüßéñжд中文€\u200d\u0301\u00a0\u2028\u202e\U0001f600"


def _atoms(alphabet: str):
    return st.lists(st.text(alphabet, min_size=1, max_size=8), min_size=1, max_size=4).map(".".join)


def _quoted(alphabet: str):
    pieces = st.one_of(
        st.sampled_from(list(alphabet)),
        st.sampled_from(["\\" + chr(c) for c in range(32, 127)]),
    )
    return st.lists(pieces, max_size=10).map(lambda p: '"' + "".join(p) + '"')


def _domains(utf8: bool):
    letters = "abcz09" + ("äöü中" if utf8 else "")
    label = st.text(letters, min_size=1, max_size=10)
    return st.one_of(
        st.lists(label, min_size=1, max_size=4).map(".".join),
        st.sampled_from(["[127.0.0.1]", "[IPv6:::1]", "xn--bcher-kva.example", "example."]),
    )


def _paths(utf8: bool):
    locals_ = st.one_of(
        _atoms(_ATEXT + (_UTF8 if utf8 else "")), _quoted(_QTEXT + (_UTF8 if utf8 else ""))
    )
    return st.builds(lambda local, domain: f"<{local}@{domain}>", locals_, _domains(utf8))


def _accepted(path: str, utf8: bool):
    try:
        return parsePath(path, allowNull=False, utf8=utf8)
    except SMTPReply as e:
        assert e.code in (501, 553), (path, e.code, e.text)
        return None


class RoundTripTests(unittest.TestCase):
    """
    Issue 10 item 9: every address the parser accepts round-trips through
    the queue envelope (JSON, the queue's own address check) and the relay
    client's MAIL and RCPT commands, and reads back as the same address.
    """

    def setUp(self) -> None:
        self.queue = Queue(os.path.abspath(self.mktemp()), task.Clock(), "mx.example.test")
        self.count = 0

    def relayCommands(self, sender: str, recipient: str, utf8: bool) -> list:
        """The MAIL and RCPT lines the relay client sends for these addresses."""
        protocol = RelayClientProtocol(task.Clock(), 30)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"220 hi\r\n")
        session = RelaySession(protocol, {"SMTPUTF8": "", "DSN": "", "8BITMIME": ""})
        envelope = Envelope("m", sender, (RecipientStatus(recipient),), 0.0, 0.0, smtputf8=utf8)
        d = session.deliver(sender, [recipient], io.BytesIO(b""), 0, False, envelope)
        lines = []
        for reply in (b"250 ok", b"550 no"):
            lines.append(transport.value())
            transport.clear()
            protocol.dataReceived(reply + b"\r\n")
        # The transaction every recipient refused is reset.
        self.assertEqual(transport.value(), b"RSET\r\n")
        protocol.dataReceived(b"250 reset\r\n")
        self.successResultOf(d)
        return lines

    def check(self, path: str, utf8: bool) -> None:
        address = _accepted(path, utf8)
        if address is None:
            return
        text = addressText(address)
        envelope = Envelope("m", text, (RecipientStatus(text),), 0.0, 0.0, smtputf8=utf8)
        self.assertEqual(Envelope.fromJSON(envelope.toJSON()), envelope)
        self.count += 1
        writer = self.queue.newMessage(f"m{self.count}", text, [text])
        writer.abort()
        mail, rcpt = self.relayCommands(text, text, utf8)
        for line, keyword in ((mail, "FROM"), (rcpt, "TO")):
            self.assertTrue(line.endswith(b"\r\n"))
            self.assertNotIn(b"\n", line[:-2])
            self.assertNotIn(b"\r", line[:-2])
            arg = line[:-2].decode("utf-8").split(" ", 1)[1]
            sent, options = splitArguments(arg, keyword)
            self.assertEqual(addressText(parsePath(sent, keyword == "FROM", utf8)), text)
            self.assertEqual(options, {"SMTPUTF8": None} if keyword == "FROM" and utf8 else {})

    @settings(max_examples=300, deadline=None)
    @given(_paths(utf8=False))
    def test_ascii(self, path: str) -> None:
        """Every ASCII address accepted is stored and relayed as it was accepted."""
        self.check(path, utf8=False)

    @settings(max_examples=300, deadline=None)
    @given(_paths(utf8=True))
    def test_utf8(self, path: str) -> None:
        """Every SMTPUTF8 address accepted is stored and relayed as it was accepted."""
        self.check(path, utf8=True)

    def test_examples(self) -> None:
        """The addresses of issue 10: refused at once, or stored and relayed."""
        self.check('<"x>y"@remote.example>', utf8=False)
        self.check('<"carol"@example.org>', utf8=False)
        self.check('<"a\\"b"@remote.example>', utf8=False)
        self.check("<jörg@bücher.example>", utf8=True)
        self.assertEqual(self.count, 3)
