"""
The conformance map (docs/conformance.rst) and the tests it names agree;
and the requirements of the map that no other module's tests prove.
"""

from __future__ import annotations

import base64
import importlib
import os
import re

from twisted.internet.task import Clock
from twisted.trial import unittest

from mailauth import config
from tests.support import MemoryMailbox, RecordingPortal, Session, makeFactory, passwordIs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAP = os.path.join(ROOT, "docs", "conformance.rst")
# Every standard the map must cover, as its section titles begin.
STANDARDS = (
    "RFC 5321:",
    "RFC 6409:",
    "RFC 4954:",
    "RFC 4616:",
    "RFC 2195:",
    "RFC 3207:",
    "RFC 8314:",
    "RFC 1870:",
    "RFC 2920:",
    "RFC 3463 and RFC 2034:",
    "RFC 3848:",
    "RFC 6531:",
    "RFC 3030:",
    "RFC 3461:",
)
TEST_NAME = re.compile(r"``(tests\.[A-Za-z0-9_.]+)``")


def parseMap(text: str) -> dict:
    """
    The rows of each section of the map: section title to a list of rows,
    each a list of its cells' text (section, requirement, proof).
    """
    sections: dict = {}
    lines = text.splitlines()
    current = None
    row = None
    for i, line in enumerate(lines):
        if i + 1 < len(lines) and re.fullmatch(r"=+", lines[i + 1]) and line.strip():
            current = sections.setdefault(line.strip(), [])
            row = None
        elif line.startswith("   * - ") and current is not None:
            row = [line[len("   * - ") :]]
            current.append(row)
        elif line.startswith("     - ") and row is not None:
            row.append(line[len("     - ") :])
        elif line.startswith("       ") and row is not None:
            row[-1] += " " + line.strip()
        elif not line.strip():
            continue
        else:
            row = None
    return sections


class MapTests(unittest.TestCase):
    """docs/conformance.rst: every requirement proven by a test that exists, or explained."""

    def setUp(self) -> None:
        with open(MAP, encoding="utf-8") as f:
            self.sections = parseMap(f.read())

    def requirementRows(self) -> list:
        return [(title, row) for title, rows in self.sections.items() for row in rows[1:]]

    def test_everyStandardMapped(self) -> None:
        """Each standard of issue 14 has its section, with requirement rows."""
        for prefix in STANDARDS:
            titles = [t for t in self.sections if t.startswith(prefix)]
            self.assertEqual(len(titles), 1, prefix)
            rows = self.sections[titles[0]]
            self.assertEqual(rows[0], ["Section", "Requirement", "Proof"], prefix)
            self.assertGreaterEqual(len(rows) - 1, 3, prefix)

    def test_everyRowProvenOrExplained(self) -> None:
        """
        Every row has three cells, and its proof names a test, or says N/A
        with a reason, or says Not met with a reason.
        """
        rows = self.requirementRows()
        self.assertGreater(len(rows), 150)
        for title, row in rows:
            self.assertEqual(len(row), 3, (title, row))
            section, requirement, proof = row
            self.assertTrue(section and requirement, (title, row))
            explained = re.search(r"(N/A|\*\*Not met[^*]*\*\*):\s*\S", proof)
            self.assertTrue(TEST_NAME.search(proof) or explained, (title, row))

    def test_namedTestsExist(self) -> None:
        """Every test the map names can be imported: module, class and method."""
        names = {name for _, row in self.requirementRows() for name in TEST_NAME.findall(row[2])}
        self.assertGreater(len(names), 100)
        for name in sorted(names):
            moduleName, className, methodName = name.rsplit(".", 2)
            module = importlib.import_module(moduleName)
            cls = getattr(module, className, None)
            self.assertIsNotNone(cls, f"{name}: no class {className} in {moduleName}")
            self.assertTrue(methodName.startswith("test_"), name)
            self.assertTrue(callable(getattr(cls, methodName, None)), f"{name} does not exist")

    def test_parser(self) -> None:
        """The map reader finds rows, continued cells and sections (so the checks above bite)."""
        sections = parseMap(
            "Title\n=====\n\n.. list-table::\n\n   * - A\n     - B\n       more\n"
            "     - ``tests.x.Y.test_z``\n   * - 1\n     - 2\n     - 3\n"
        )
        self.assertEqual(
            sections, {"Title": [["A", "B more", "``tests.x.Y.test_z``"], ["1", "2", "3"]]}
        )


class GapTests(unittest.TestCase):
    """Requirements of the map that no other module's tests prove, on a session in memory."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.mailbox = MemoryMailbox(
            login="alice@example.test",
            users=("alice@example.test", "bob@example.test", "postmaster@example.test"),
        )
        portal = RecordingPortal(self.mailbox, answer=passwordIs(b"secret"))
        self.factory = makeFactory(self.clock, portal=portal, tlsMode="implicit")
        self.session = Session(self.factory)
        self.session.read()

    def command(self, line: bytes) -> list:
        return self.session.command(line)

    def login(self, verb: bytes = b"EHLO", auth: bytes = b"AUTH PLAIN ") -> None:
        self.command(verb + b" client.example")
        token = base64.b64encode(b"\0alice@example.test\0secret")
        self.assertEqual(self.command(auth + token), [b"235 2.7.0 Authentication successful"])

    def test_verbsCaseInsensitive(self) -> None:
        """Verbs and keywords in any case (RFC 5321 2.4): a whole transaction in lower case."""
        self.login(verb=b"ehlo", auth=b"auth plain ")
        self.assertEqual(self.command(b"mail from:<alice@example.test>"), [b"250 2.1.0 Ok"])
        self.assertEqual(self.command(b"Rcpt To:<bob@example.test>"), [b"250 2.1.5 Ok"])
        self.assertEqual(self.command(b"data")[0][:4], b"354 ")
        self.assertEqual(self.session.send(b"x\r\n.\r\n"), [b"250 2.0.0 Ok: queued as ID1"])
        self.assertEqual(self.command(b"quit"), [b"221 2.0.0 Bye"])

    def test_ehloResetsTransaction(self) -> None:
        """An EHLO in a transaction clears it as RSET does (RFC 5321 4.1.4)."""
        self.login()
        self.command(b"MAIL FROM:<alice@example.test>")
        self.assertEqual(self.command(b"EHLO client.example")[-1][:4], b"250 ")
        self.assertEqual(
            self.command(b"RCPT TO:<bob@example.test>"), [b"503 5.5.1 Error: need MAIL command"]
        )

    def test_expnNotImplemented(self) -> None:
        """EXPN gets 502: alias members are not listed (RFC 5321 3.5.2, 7.3)."""
        self.login()
        self.assertEqual(self.command(b"EXPN team"), [b"502 5.5.1 Error: EXPN not supported"])

    def test_postmasterRecognised(self) -> None:
        """C{<Postmaster>} without a domain, in any case, is postmaster@ (RFC 5321 4.5.1)."""
        self.login()
        self.command(b"MAIL FROM:<alice@example.test>")
        for path in (b"<Postmaster>", b"<POSTMASTER>", b"<postmaster>"):
            self.assertEqual(self.command(b"RCPT TO:" + path), [b"250 2.1.5 Ok"], path)

    def test_etrnNotOffered(self) -> None:
        """ETRN is neither offered nor accepted (RFC 6409 7: MUST NOT)."""
        lines = self.command(b"EHLO client.example")
        self.assertFalse([line for line in lines if b"ETRN" in line])
        self.assertEqual(
            self.command(b"ETRN example.test"), [b"500 5.5.2 Error: command not recognized"]
        )

    def test_authBeforeEhlo(self) -> None:
        """AUTH before EHLO gets 503 (RFC 4954 4)."""
        self.assertEqual(self.command(b"AUTH PLAIN"), [b"503 5.5.1 Error: send EHLO first"])

    def test_plainInvalidUTF8(self) -> None:
        """A PLAIN identity that is not UTF-8 is malformed: 501 (RFC 4616 2)."""
        self.command(b"EHLO client.example")
        token = base64.b64encode(b"\0al\xffce@example.test\0secret")
        self.assertEqual(self.command(b"AUTH PLAIN " + token)[0][:4], b"501 ")

    def test_repliesAreASCII(self) -> None:
        """A reply quoting a UTF-8 address is still ASCII (RFC 6531 3.7)."""
        self.login()
        [reply] = self.command("MAIL FROM:<jörg@example.test> SMTPUTF8".encode())
        self.assertTrue(reply.startswith(b"553 5.7.1 "), reply)
        self.assertTrue(reply.isascii(), reply)

    def test_startTLSWithArgument(self) -> None:
        """STARTTLS with a parameter gets 501 and starts nothing (RFC 3207 4)."""
        factory = makeFactory(self.clock, tlsMode="starttls")
        session = Session(factory)
        session.read()
        session.command(b"EHLO client.example")
        self.assertEqual(session.command(b"STARTTLS now"), [b"501 5.5.4 Syntax: STARTTLS"])
        self.assertIsNone(session.transport.tlsStarted)

    def test_defaultsMeetMinimums(self) -> None:
        """
        The defaults meet RFC 5321's minimums: a 5-minute timeout
        (4.5.3.2.7), 100 recipients (4.5.3.1.8), and a queue that gives up
        no sooner than after 4 days (4.5.4.1).
        """
        cfg = config.loadText(
            "[server]\nhostname = mx.example.test\nstate_dir = /var/lib/mailauth\n"
            "[listener:submission]\nendpoint = tcp:587\ntls = none\nauth = required\n"
            "[auth]\nusers = /etc/mailauth/users\nplaintext_requires_tls = no\n"
            "[delivery]\nlocal_domains = example.test\nmaildir = /var/mail/{user}\n"
            "[relay]\nhost = relay.example.test\n"
        )
        self.assertGreaterEqual(cfg.server.timeout, 300)
        self.assertGreaterEqual(cfg.server.max_recipients, 100)
        self.assertGreaterEqual(cfg.relay.expire, 4 * 86400)

    def test_shippedListeners(self) -> None:
        """
        The shipped configuration listens for submission on 587 with
        STARTTLS (RFC 6409 3.1) and on 465 with implicit TLS (RFC 8314 3.3),
        both requiring AUTH.
        """
        cfg = config.load(os.path.join(ROOT, "etc", "mailauth.conf"))
        listeners = {(each.endpoint.split(":")[1], each.tls, each.auth) for each in cfg.listeners}
        self.assertIn(("587", "starttls", "required"), listeners)
        self.assertIn(("465", "implicit", "required"), listeners)
