"""
Issue #12 items 3 and 4 in the delivery path: submissions DKIM-signed after
every header mailauth adds, verified by dkimpy's own verifier against the
DNS record C{mailauth dkim keygen} printed, on the Maildir path and the
relay path; and the From: binding, against the real daemon.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib

import dkim
from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDeliveryFactory
from twisted.trial import unittest

from mailauth import checks, replies
from mailauth import config as configmod
from mailauth.addressmap import AddressMap
from mailauth.dkimsign import KeyRing, SigningKey, loadKey
from mailauth.maildir import SPOOL
from mailauth.realm import Realm
from mailauth.replies import SMTPReply
from mailauth.routing import Router
from tests.fakes import MemoryQueue, MemoryUserDatabase, runInline
from tests.harness import BOB, BOB_PASSWORD, Daemon, LogWatcher, smtpClient
from tests.smtpsink import QueueEvents, SMTPSink
from tests.support import TRICKY_FROM, UNCHECKABLE_FROM, DiskFull, DNSStub, dkimKeygen

# A signing time in the past, as verifiers require.
NOW = 1_700_000_000

# Header sections as clients write them, each ending before the empty line.
PLAIN_HEADER = (
    b"From: Bob <bob@example.test>\r\n"
    b"To: Someone <someone@remote.example>\r\n"
    b"Subject: signed\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <signed.1@client.example>\r\n"
)
FOLDED_HEADER = (
    b"From: Bob\r\n <bob@example.test>\r\n"
    b"To: Someone <someone@remote.example>,\r\n\tSomeone Else <else@remote.example>\r\n"
    b"Subject: a folded\r\n   subject\t line   with  runs\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain;\r\n charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
)

#: Awkward messages (the header, the body): long lines, 8-bit bodies, folded
#: headers, dot-leading lines, no Date or Message-ID (mailauth adds them,
#: and they are signed), and one far past what a Maildir holds in memory.
MESSAGES = {
    "long lines": (PLAIN_HEADER, b"x" * 10000 + b"\r\n" + b"word  \t" * 3000 + b"\r\n"),
    "8-bit": (
        FOLDED_HEADER,
        "Grüße, ça va? Привет 😀\r\n".encode() + bytes(range(0x80, 0x100)) + b"\r\n",
    ),
    "dot-leading lines": (PLAIN_HEADER, b".\r\n..\r\n.hidden\r\n. \r\n...three\r\n"),
    "completed": (
        b"From: bob@example.test\r\nSubject: no date, no id\r\n",
        b"trailing blank lines\r\n\r\n \r\n\r\n",
    ),
    "large": (
        FOLDED_HEADER,
        b"".join(b".line %06d: \xc3\xa4 some text  \r\n" % n for n in range(12000)),
    ),
}


def verifyEach(message: bytes, dns: DNSStub) -> list:
    """dkimpy's verdict on each DKIM-Signature of C{message}, top first."""
    count = len(re.findall(rb"(?im)^DKIM-Signature:", message))
    verifier = dkim.DKIM(message)
    return [verifier.verify(idx=index, dnsfunc=dns) for index in range(count)]


class Keys:
    """One Ed25519 and one RSA key of example.test made by keygen, once per module."""

    made: dict = {}

    @classmethod
    def get(cls, testCase: unittest.TestCase) -> dict:
        if not cls.made:
            dns = DNSStub()
            for keyType, selector in (("ed25519", "mail1e"), ("rsa", "mail1r")):
                path, name, record = dkimKeygen(testCase, keyType, "example.test", selector)
                dns.add(name, record)
                cls.made[keyType] = (selector, path)
            cls.made["dns"] = dns
        return cls.made


def unsigned(stored: bytes) -> bytes:
    """C{stored} without its DKIM-Signature fields."""
    return re.sub(rb"(?ms)^DKIM-Signature:.*?\r\n(?=[^ \t])", b"", stored)


# -- the realm, with a real key ring -------------------------------------------


def addr(text: str) -> smtp.Address:
    return smtp.Address(text.encode("ascii"))


class FakeSession:
    def tlsDescription(self):
        return None


class RealmSigningTests(unittest.TestCase):
    """The realm signs each copy of a submission; a message it cannot sign is never stored."""

    def setUp(self) -> None:
        keys = Keys.get(self)
        self.dns = keys["dns"]
        self.selector, path = keys["ed25519"]
        self.key = loadKey("example.test", self.selector, path)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.dir = os.path.abspath(self.mktemp())
        self.router = Router(
            localDomains={"example.test"},
            maildirTemplate=self.dir + "/{domain}/{localpart}/Maildir",
            users=MemoryUserDatabase(
                {"bob@example.test": "{PLAIN}b", "alice@example.test": "{PLAIN}a"}
            ),
            aliases=AddressMap(None),
            senderMap=AddressMap(None),
            senderLoginMatch=True,
        )
        self.queue = MemoryQueue()
        self.realm = Realm(
            router=self.router,
            hostname="mx.example.test",
            runBlocking=runInline,
            queue=self.queue,
            clock=self.clock,
            keyRing=KeyRing({"example.test": [self.key]}, self.clock),
        )

    def send(
        self,
        message: bytes,
        login="bob@example.test",
        sender="bob@example.test",
        recipients=("alice@example.test", "x@remote.example"),
        chunk: int = 4096,
    ):
        """Send C{message} as the session does (Received first); the end of data's Deferred."""
        if login is None:
            delivery = self.realm.anonymous().getMessageDelivery()
        else:
            _, avatar, _ = self.realm.requestAvatar(login, None, IMessageDeliveryFactory)
            delivery = avatar.getMessageDelivery()
        self.successResultOf(delivery.validateFrom(None, addr(sender) if sender else None))
        users = [
            smtp.User(addr(r), (b"client.example", "192.0.2.1"), FakeSession(), b"")
            for r in recipients
        ]
        factories = [self.successResultOf(delivery.validateTo(user)) for user in users]
        msg = factories[0]()
        msg.write(delivery.receivedHeader((b"client.example", "192.0.2.1"), addr(sender), users))
        for i in range(0, len(message), chunk):
            msg.write(message[i : i + chunk])
        return msg.eomReceived()

    def maildirCopies(self) -> list:
        new = os.path.join(self.dir, "example.test", "alice", "Maildir", "new")
        found = []
        for name in sorted(os.listdir(new)) if os.path.isdir(new) else []:
            with open(os.path.join(new, name), "rb") as f:
                found.append((name, f.read().replace(b"\n", b"\r\n")))
        return found

    def assertNothingStored(self) -> None:
        maildir = os.path.join(self.dir, "example.test", "alice", "Maildir")
        for sub in ("tmp", "new"):
            self.assertEqual(os.listdir(os.path.join(maildir, sub)), [], sub)
        self.assertEqual(self.queue.messages, {})

    def test_bothCopiesSigned(self) -> None:
        """
        The Maildir copy is Return-Path, then DKIM-Signature, then what the
        session and the realm wrote (Received first); the queued copy is
        the same without Return-Path. Both verify, with Return-Path above
        the signature or without it, and each is exactly the message with
        the signature on top.
        """
        new = os.path.join(self.dir, "example.test", "alice", "Maildir", "new")
        for name, (header, body) in MESSAGES.items():
            # One copy at a time: Maildir names do not sort by time (the
            # microseconds after M are not zero-padded).
            for old in os.listdir(new) if os.path.isdir(new) else []:
                os.remove(os.path.join(new, old))
            self.queue = self.realm.queue = MemoryQueue()
            self.successResultOf(self.send(header + b"\r\n" + body))
            [writer] = self.queue.writers
            queued = writer.data
            self.assertTrue(
                queued.startswith(
                    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed; d=example.test;"
                ),
                name,
            )
            self.assertEqual(verifyEach(queued, self.dns), [True], name)
            self.assertTrue(unsigned(queued).startswith(b"Received: from client.example"), name)
            self.assertTrue(queued.endswith(b"\r\n\r\n" + body), name)
            [(fileName, stored)] = self.maildirCopies()
            self.assertTrue(
                stored.startswith(b"Return-Path: <bob@example.test>\r\nDKIM-Signature:"), name
            )
            # Not assertEqual: a diff of two large messages takes minutes.
            self.assertTrue(stored == b"Return-Path: <bob@example.test>\r\n" + queued, name)
            self.assertEqual(verifyEach(stored, self.dns), [True], name)
            # S= counts what is on disk, the signature included.
            size = os.path.getsize(
                os.path.join(self.dir, "example.test", "alice", "Maildir", "new", fileName)
            )
            self.assertTrue(fileName.endswith(f",S={size}"), (fileName, size))
            # The check can fail: a changed byte below the signature does not verify.
            changed = re.sub(rb"\r\nFrom: ", b"\r\nFrom: x", queued, count=1)
            self.assertNotEqual(changed, queued)
            self.assertEqual(verifyEach(changed, self.dns), [False], name)
        self.assertGreater(len(MESSAGES["large"][1]), 4 * SPOOL)

    def test_completedFieldsSigned(self) -> None:
        """The Date and Message-ID mailauth adds are in the signature's h= list."""
        self.successResultOf(
            self.send(b"From: bob@example.test\r\n\r\nbody\r\n", recipients=("x@remote.example",))
        )
        [writer] = self.queue.writers
        tags = dkim.util.parse_tag_value(writer.data.split(b":", 1)[1].split(b"\r\nReceived:")[0])
        self.assertEqual(
            tags[b"h"].replace(b" ", b"").replace(b"\r\n", b""), b"from:date:message-id:from"
        )
        self.assertIn(b"\r\nDate: ", writer.data)
        changed = re.sub(
            rb"\r\nDate: [^\r]*", b"\r\nDate: Mon, 1 Jan 2001 00:00:00 +0000", writer.data
        )
        self.assertEqual(verifyEach(changed, self.dns), [False])

    def test_notSigned(self) -> None:
        """
        Mail from a domain without a key, from the null sender and from an
        unauthenticated client is stored as it came.
        """
        self.router.senderLoginMatch = False
        for login, sender in (
            ("bob@example.test", "bob@other.example"),
            ("bob@example.test", ""),
            (None, "bob@example.test"),
        ):
            self.queue = self.realm.queue = MemoryQueue()
            self.successResultOf(
                self.send(
                    PLAIN_HEADER + b"\r\nbody\r\n",
                    login=login,
                    sender=sender,
                    recipients=("alice@example.test",),
                )
            )
        for _, stored in self.maildirCopies():
            self.assertNotIn(b"DKIM-Signature", stored)
        self.assertEqual(len(self.maildirCopies()), 3)

    def test_notSignable(self) -> None:
        """
        A header that does not parse cannot be signed: 550 5.6.0, logged,
        nothing stored (never an unsigned copy).
        """
        for body in (b"body\r\n", MESSAGES["large"][1]):
            with capturedLogs() as events:
                f = self.failureResultOf(
                    self.send(b"From: bob@example.test\r\nnot a field\r\n\r\n" + body), SMTPReply
                )
            self.assertEqual(
                (f.value.code, f.value.text), (replies.NOT_SIGNABLE.code, replies.NOT_SIGNABLE.text)
            )
            self.assertNothingStored()
            self.assertTrue(all(w.aborted for w in self.queue.writers))
            [line] = [formatEvent(e) for e in events if e.get("log_namespace") == "mailauth.realm"]
            self.assertRegex(
                line,
                r"^message [0-9A-F]{12} not signed: login=<bob@example\.test>: "
                r"cannot sign the message: its header does not parse",
            )

    def test_signingFails(self) -> None:
        """
        A key that fails to sign: 451 4.3.0 (the client tries again),
        logged as an error naming the key file, nothing stored.
        """
        broken = SigningKey(
            domain="example.test",
            selector="bad",
            path="/keys/bad.pem",
            keyType="ed25519",
            publicKey="",
            private=object(),
        )
        self.realm.keyRing = KeyRing({"example.test": [broken]}, self.clock)
        for header, body in MESSAGES.values():
            with capturedLogs() as events:
                f = self.failureResultOf(self.send(header + b"\r\n" + body), SMTPReply)
            self.assertEqual((f.value.code, f.value.text), (451, replies.SIGNING_FAILED.text))
            self.assertNothingStored()
            self.assertTrue(all(w.aborted for w in self.queue.writers))
            [event] = [e for e in events if e.get("log_namespace") == "mailauth.realm"]
            self.assertEqual(event["log_level"].name, "error")
            self.assertRegex(
                formatEvent(event),
                r"^message [0-9A-F]{12} not signed: cannot sign "
                r"with /keys/bad\.pem: .+; the client is told 451",
            )

    def test_prependDiskFull(self) -> None:
        """
        The disk fills while the signature goes on top of a large Maildir
        copy: 452 4.3.1, and neither file is left in tmp/ nor anything in
        new/ or the queue.
        """
        disk = DiskFull(self, full=False)
        header, body = MESSAGES["large"]
        message = header + b"\r\n" + body
        _, avatar, _ = self.realm.requestAvatar("bob@example.test", None, IMessageDeliveryFactory)
        delivery = avatar.getMessageDelivery()
        self.successResultOf(delivery.validateFrom(None, addr("bob@example.test")))
        user = smtp.User(addr("alice@example.test"), (b"c", "192.0.2.1"), FakeSession(), b"")
        msg = self.successResultOf(delivery.validateTo(user))()
        msg.write(message)
        self.assertEqual(len(disk.descriptors), 1)
        disk.full = True
        f = self.failureResultOf(msg.eomReceived(), SMTPReply)
        self.assertEqual(f.value.code, 452)
        self.assertEqual(len(disk.descriptors), 2)
        self.assertNothingStored()

    def test_fromCheckedOnTheSignersHeader(self) -> None:
        """
        With header_from_match and signing, the one header copy serves
        both: a spoofed From: is refused before anything is signed or
        stored; the login's own is signed.
        """
        self.router.headerFromMatch = True
        f = self.failureResultOf(self.send(b"From: alice@example.test\r\n\r\nx\r\n"), SMTPReply)
        self.assertEqual(f.value.code, 550)
        self.assertNothingStored()
        self.successResultOf(self.send(b"From: bob@example.test\r\n\r\nx\r\n"))
        [(_, stored)] = self.maildirCopies()
        self.assertEqual(verifyEach(stored, self.dns), [True])

    @defer.inlineCallbacks
    def test_signingProcessCounted(self):
        """
        With a signing process (a real one), the messages it can take are
        signed there and the large one in the thread; both are stored the
        same, verify, and are counted by where they were signed.
        """
        from mailauth.metrics import Metrics
        from mailauth.signerproc import SigningProcess
        from mailauth.workers import workerEnvironment

        self.realm.metrics = Metrics.prometheus(process=False)
        self.realm.signingProcess = SigningProcess(
            reactor, workerEnvironment(os.environ), clock=self.clock
        )
        self.addCleanup(self.realm.signingProcess.stop)
        new = os.path.join(self.dir, "example.test", "alice", "Maildir", "new")
        for name, (header, body) in MESSAGES.items():
            self.queue = self.realm.queue = MemoryQueue()
            yield self.send(header + b"\r\n" + body)
            [writer] = self.queue.writers
            self.assertEqual(verifyEach(writer.data, self.dns), [True], name)
            [stored] = [
                data for _, data in self.maildirCopies() if data.endswith(b"\r\n\r\n" + body)
            ]
            self.assertTrue(stored == b"Return-Path: <bob@example.test>\r\n" + writer.data, name)
            for old in os.listdir(new):
                os.remove(os.path.join(new, old))
        registry = self.realm.metrics.registry
        counts = {
            by: registry.get_sample_value("mailauth_dkim_signed_total", {"by": by})
            for by in ("process", "thread")
        }
        self.assertEqual(counts, {"process": len(MESSAGES) - 1, "thread": 1})
        self.assertEqual(self.realm.signingProcess.signed, len(MESSAGES) - 1)


# -- the real daemon -----------------------------------------------------------


class DaemonMixin:
    """
    The daemon with both keys of example.test in [dkim] and a [relay] that
    is an upstream recording what it gets; C{settings} adds to that.
    """

    settings: dict = {}
    files: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        keys = Keys.get(self)
        self.dns = keys["dns"]
        self.sink = SMTPSink(reactor, None, tls="none", credentials=None)
        yield self.sink.start()
        self.addCleanup(self.sink.stop)
        settings = {
            "dkim": {
                "example.test": " ".join(
                    f"{selector}:{path}" for selector, path in (keys["ed25519"], keys["rsa"])
                )
            },
            "relay": {
                "host": "127.0.0.1",
                "port": str(self.sink.port),
                "tls": "none",
                "timeout": "10s",
            },
        }
        for section, values in self.settings.items():
            settings.setdefault(section, {}).update(values)
        self.daemon = Daemon(self.mktemp(), settings, self.files)
        self.addCleanup(self.daemon.stop)
        self.daemon.start()
        self.log = LogWatcher()
        self.addCleanup(self.log.stop)
        self.queueEvents = QueueEvents()
        self.queueEvents.start(self)

    def sendAll(
        self,
        messages: list,
        recipients=("bob@example.test",),
        login: bytes = BOB,
        password: bytes = BOB_PASSWORD,
        sender: str = "bob@example.test",
        listener: str = "submissions",
    ):
        """
        Send every message in one session with smtplib (in a thread).

        @return: a Deferred firing with each message's outcome: C{250}, or
            the C{(code, text)} of its refusal.
        """
        port = self.daemon.ports[listener]

        def run():
            client = smtpClient(port, implicit=listener == "submissions")
            results = []
            try:
                if login:
                    client.login(login.decode(), password.decode())
                for message in messages:
                    try:
                        client.sendmail(sender, list(recipients), message)
                        results.append(250)
                    except smtplib.SMTPDataError as e:
                        results.append((e.smtp_code, e.smtp_error.decode()))
            finally:
                client.quit()
            return results

        return threads.deferToThread(run)


class DaemonSigningTests(DaemonMixin, unittest.TestCase):
    """Issue #12's done-when: a signed message verifies with dkimpy, both paths."""

    @defer.inlineCallbacks
    def test_maildirPath(self):
        """
        Every awkward message delivered to a Maildir carries an Ed25519 and
        an RSA signature under its Return-Path; both verify.
        """
        messages = [header + b"\r\n" + body for header, body in MESSAGES.values()]
        results = yield self.sendAll(messages)
        self.assertEqual(results, [250] * len(messages))
        delivered = [
            stored.replace(b"\n", b"\r\n")
            for _, stored in self.daemon.delivered("bob@example.test")
        ]
        self.assertEqual(len(delivered), len(messages))
        for name, (_, body) in MESSAGES.items():
            [stored] = [d for d in delivered if d.endswith(b"\r\n\r\n" + body)]
            lines = stored.split(b"\r\n")
            self.assertEqual(lines[0], b"Return-Path: <bob@example.test>", name)
            self.assertTrue(lines[1].startswith(b"DKIM-Signature: v=1; a=ed25519-sha256;"), name)
            self.assertEqual(verifyEach(stored, self.dns), [True, True], name)
            self.assertIn(b"a=rsa-sha256", stored.split(b"\r\nReceived:")[0])
        # The signing process signed all but the large one, which a thread
        # signed as it streamed in.
        self.assertEqual(_realmOf(self.daemon).signingProcess.signed, len(messages) - 1)

    def test_relayPath(self):
        """
        Every awkward message relayed upstream arrives with both
        signatures on top, and they verify there.
        """
        return self.relayed()

    def test_relayPathChunking(self):
        """The same through an upstream that offers CHUNKING: sent with BDAT."""
        self.sink.extensions = [b"CHUNKING"]
        d = self.relayed()
        d.addCallback(
            lambda _: self.assertIn(b"BDAT", b" ".join(c[:4] for c in self.sink.commands))
        )
        return d

    @defer.inlineCallbacks
    def relayed(self):
        messages = [header + b"\r\n" + body for header, body in MESSAGES.values()]
        results = yield self.sendAll(messages, recipients=("someone@remote.example",))
        self.assertEqual(results, [250] * len(messages))
        transactions = yield self.sink.waitForTransactions(len(messages))
        for name, (_, body) in MESSAGES.items():
            [t] = [t for t in transactions if t.data.endswith(b"\r\n\r\n" + body)]
            self.assertEqual(
                (t.sender, t.recipients), ("bob@example.test", ("someone@remote.example",))
            )
            self.assertTrue(t.data.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256;"), name)
            self.assertEqual(verifyEach(t.data, self.dns), [True, True], name)
            # The message's own size, signatures included (RFC 1870: not
            # the dots that stuffing adds, which it counted before).
            self.assertIn(b"SIZE=%d" % len(t.data), t.mailParameters.encode())
        # Stopping the daemon while the queue settles the last one would
        # hang (the disk pool stops first; see the report of this branch).
        yield self.queueEvents.wait("removed", count=len(messages))

    @defer.inlineCallbacks
    def test_notSignable(self):
        """A header that does not parse: 550 5.6.0, and the session goes on."""
        results = yield self.sendAll(
            [
                b"From: bob@example.test\r\nno colon here\r\n\r\nx\r\n",
                PLAIN_HEADER + b"\r\nfine\r\n",
            ]
        )
        self.assertEqual(results, [(550, replies.NOT_SIGNABLE.text), 250])
        self.assertEqual(len(self.daemon.delivered("bob@example.test")), 1)


class DaemonFromBindingTests(DaemonMixin, unittest.TestCase):
    """
    Issue #12's done-when: From: spoofing is refused, against the table of
    tricky headers; bob may send as the whole of example.org (sender map).
    """

    settings = {
        "delivery": {"header_from_match": "yes", "sender_map": "{dir}/sender-map"},
        "listener:mx": {"endpoint": "tcp:0:interface=127.0.0.1", "tls": "none", "auth": "none"},
    }
    files = {"sender-map": "@example.org: bob@example.test\n"}

    @defer.inlineCallbacks
    def test_tricky(self):
        """
        Each tricky From: is accepted exactly when every address a reader
        could take for the sender is bob's, and the accepted ones are signed.
        """
        messages = [header + b"Subject: tricky\r\n\r\nbody\r\n" for header, _ in TRICKY_FROM]
        results = yield self.sendAll(messages)
        expected = []
        for _, addresses in TRICKY_FROM:
            if all(a.endswith("@example.org") for a in addresses):
                expected.append(250)
            else:
                expected.append(
                    (
                        550,
                        "5.7.1 <mallory@evil.test>: From/Sender header address "
                        "not owned by user bob@example.test",
                    )
                )
        self.assertEqual(results, expected)
        delivered = self.daemon.delivered("bob@example.test")
        self.assertEqual(len(delivered), expected.count(250))
        for _, stored in delivered:
            self.assertEqual(verifyEach(stored.replace(b"\n", b"\r\n"), self.dns), [True, True])
        self.assertTrue(
            self.log.matching(
                r"header From refused: login=<bob@example\.test> "
                r"from=<mallory@evil\.test> id="
            )
        )

    @defer.inlineCallbacks
    def test_uncheckable(self):
        """Every header whose sender cannot be known for sure is refused, nothing kept."""
        messages = [header + b"Subject: x\r\n\r\nbody\r\n" for header in UNCHECKABLE_FROM]
        results = yield self.sendAll(messages)
        self.assertEqual(results, [(550, replies.HEADER_FROM_UNCHECKABLE.text)] * len(messages))
        self.assertEqual(self.daemon.allDelivered(), [])

    @defer.inlineCallbacks
    def test_remoteRecipientsToo(self):
        """A spoofed message for another domain is refused as well: nothing is queued."""
        results = yield self.sendAll(
            [b"From: alice@example.test\r\n\r\nx\r\n"],
            recipients=("someone@remote.example", "bob@example.test"),
        )
        self.assertEqual(results[0][0], 550)
        self.assertEqual(self.daemon.allDelivered(), [])
        self.assertEqual(self.sink.transactions, [])

    @defer.inlineCallbacks
    def test_mxNotChecked(self):
        """
        Mail from a client that did not log in (an MX port) is not checked,
        nor signed, even from a signing domain.
        """
        results = yield self.sendAll(
            [b"From: mallory@evil.test\r\n\r\nx\r\n"], login=b"", listener="mx"
        )
        self.assertEqual(results, [250])
        [(_, stored)] = self.daemon.delivered("bob@example.test")
        self.assertNotIn(b"DKIM-Signature", stored)


class DaemonDefaultsTests(DaemonMixin, unittest.TestCase):
    """Without header_from_match, any From: passes, as before the key existed."""

    @defer.inlineCallbacks
    def test_spoofAccepted(self):
        """The default keeps today's behaviour: a From: of someone else is delivered."""
        results = yield self.sendAll([b"From: mallory@evil.test\r\n\r\nx\r\n"])
        self.assertEqual(results, [250])


class CheckConfigTests(unittest.TestCase):
    """A key that cannot be read is a check-config error, and the daemon does not start."""

    def test_unreadableKey(self) -> None:
        """check-config names the configuration, the domain and the file."""
        daemon = Daemon(
            self.mktemp(), {"dkim": {"example.test": "sel:{dir}/missing.pem"}}, build=False
        )
        cfg = configmod.load(daemon.configPath)
        errors = checks.checkAll(cfg, checks.Account.ofProcess()).errors
        self.assertIn(
            f"{daemon.configPath}: [dkim] example.test: {daemon.dir}/missing.pem: "
            "cannot read: No such file or directory",
            errors,
        )

    def test_keyRingBuilt(self) -> None:
        """With [dkim] the realm gets the keys; without it, none."""
        selector, path = Keys.get(self)["ed25519"]
        daemon = Daemon(self.mktemp(), {"dkim": {"example.test": f"{selector}:{path}"}})
        signed = _realmOf(daemon)
        self.assertEqual([k.path for k in signed.keyRing.keysFor("a@example.test")], [path])
        self.assertIsNone(_realmOf(Daemon(self.mktemp())).keyRing)


class KeyReloadTests(unittest.TestCase):
    """SIGHUP reads the [dkim] key files again: a key replaced in place signs."""

    def sendOne(self, daemon: Daemon, subject: str) -> defer.Deferred:
        """bob sends bob one message over implicit TLS; the Deferred fires with it stored."""

        def run():
            client = smtpClient(daemon.ports["submissions"], implicit=True)
            try:
                client.login(BOB.decode(), BOB_PASSWORD.decode())
                client.sendmail(
                    "bob@example.test",
                    ["bob@example.test"],
                    f"From: bob@example.test\r\nSubject: {subject}\r\n\r\nhello\r\n",
                )
            finally:
                client.quit()
            [stored] = [m for _, m in daemon.delivered("bob@example.test") if subject.encode() in m]
            return stored.replace(b"\n", b"\r\n")

        return threads.deferToThread(run)

    def sighup(self) -> defer.Deferred:
        """SIGHUP to this process; fires once the keys were read again (or not)."""
        watcher = LogWatcher()
        d = watcher.waitFor("DKIM keys (not )?reloaded")
        os.kill(os.getpid(), signal.SIGHUP)
        return d.addBoth(lambda result: watcher.stop() or result)

    @defer.inlineCallbacks
    def test_replacedKeySigns(self):
        """
        A key file replaced in place signs the next message after SIGHUP
        (the new record verifies it, the old does not); a key file that
        became unreadable leaves the new key signing.
        """
        path, name, oldRecord = dkimKeygen(self, "ed25519", "example.test", "rot")
        _, _, newRecord = newKey = dkimKeygen(self, "ed25519", "example.test", "rot")
        daemon = Daemon(self.mktemp(), {"dkim": {"example.test": f"rot:{path}"}})
        self.addCleanup(daemon.stop)
        daemon.start()
        oldDNS, newDNS = DNSStub(), DNSStub()
        oldDNS.add(name, oldRecord)
        newDNS.add(name, newRecord)

        before = yield self.sendOne(daemon, "before")
        self.assertEqual(
            (verifyEach(before, oldDNS), verifyEach(before, newDNS)), ([True], [False])
        )

        os.replace(newKey[0], path)
        line = yield self.sighup()
        self.assertIn("DKIM keys reloaded: 1 key(s) for example.test", line)
        after = yield self.sendOne(daemon, "after")
        self.assertEqual((verifyEach(after, oldDNS), verifyEach(after, newDNS)), ([False], [True]))

        os.remove(path)
        line = yield self.sighup()
        self.assertIn("DKIM keys not reloaded, signing with the old ones: ", line)
        self.assertIn(path, line)
        still = yield self.sendOne(daemon, "still")
        self.assertEqual(verifyEach(still, newDNS), [True])


def _realmOf(daemon: Daemon) -> Realm:
    """The realm of the daemon's portal."""
    factory = daemon.service.getServiceNamed("listener:submission").factory
    return factory.portal.realm
