"""The realm: routing, aliases, sender binding, one stored copy per transaction."""

from __future__ import annotations

import email
import email.policy
import errno
import os
import re
from email.utils import parsedate_to_datetime

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDeliveryFactory
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from mailauth.addressmap import AddressMap
from mailauth.fromheader import MAX_HEADER
from mailauth.headers import MAX_HOPS
from mailauth.interfaces import IUserDatabase
from mailauth.ownmail import LocalDelivery
from mailauth.passwords import parse
from mailauth.realm import Realm, submissionFields
from mailauth.replies import SMTPReply
from mailauth.routing import Router
from mailauth.userdb import User
from tests.fakes import MemoryQueue, MemoryUserDatabase, runInline
from tests.harness import LogWatcher
from tests.support import TRICKY_FROM, UNCHECKABLE_FROM

# The session ID the deliveries of these tests belong to.
SESSION = "5e55105e5510"

USERS = {
    "alice@example.test": "{PLAIN}a",
    "bob@example.test": "{PLAIN}b",
    "carol@other.test": "{PLAIN}c",
}


# A header section as mail clients write it: nothing is missing.
HEADER = (
    b"Subject: x\r\nDate: Sun, 29 Nov 2026 15:23:31 +0100\r\nMessage-ID: <1@client.example>\r\n"
)


def addr(text: str) -> smtp.Address:
    return smtp.Address(text.encode("ascii"))


class FakeSession:
    """What receivedHeader reads from the session of a recipient."""

    def __init__(self, tls="TLSv1.3 with cipher TLS_AES_128_GCM_SHA256") -> None:
        self.tls = tls

    def tlsDescription(self):
        return self.tls


def writeMap(test, text: str) -> AddressMap:
    path = test.mktemp()
    with open(path, "w") as f:
        f.write(text)
    return AddressMap(path)


class RealmTestsMixin:
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.users = MemoryUserDatabase(dict(USERS))
        self.aliases = writeMap(
            self,
            (
                "postmaster@example.test: alice@example.test\n"
                "team@example.test: alice@example.test, bob@example.test\n"
                "outside@example.test: someone@remote.test\n"
                "loop1@example.test: loop2@example.test\n"
                "loop2@example.test: loop1@example.test, bob@example.test\n"
                "bad line without colon\n"
            ),
        )
        self.senderMap = writeMap(
            self, ("newsletter@example.test: bob@example.test\n@other.test: alice@example.test\n")
        )
        self.router = Router(
            localDomains={"example.test", "other.test"},
            maildirTemplate=self.dir + "/{domain}/{localpart}/Maildir",
            users=self.users,
            aliases=self.aliases,
            senderMap=self.senderMap,
            senderLoginMatch=True,
        )
        self.queue = MemoryQueue()
        self.woken = 0
        self.clock = Clock()
        self.realm = Realm(
            router=self.router,
            hostname="mx.example.test",
            runBlocking=runInline,
            queue=self.queue,
            wakeQueue=self.wake,
            clock=self.clock,
        )

    def wake(self) -> None:
        self.woken += 1

    def delivery(self, login="alice@example.test"):
        if login is None:
            return self.realm.anonymous().getMessageDelivery()
        _, avatar, _ = self.realm.requestAvatar(login, None, IMessageDeliveryFactory)
        delivery = avatar.getMessageDelivery()
        # As the session does: its lines carry its ID.
        delivery.session = SESSION
        return delivery

    def user(self, text: str) -> smtp.User:
        return smtp.User(addr(text), (b"c", "192.0.2.1"), FakeSession(), b"")

    def stored(self, who: str, domain: str = "example.test") -> list:
        """Every message in the Maildir of C{who}'s new/."""
        new = os.path.join(self.dir, domain, who, "Maildir", "new")
        found = []
        for name in sorted(os.listdir(new)) if os.path.isdir(new) else []:
            with open(os.path.join(new, name), "rb") as f:
                found.append(f.read())
        return found


class RouterTests(RealmTestsMixin, unittest.TestCase):
    def test_expandUser(self) -> None:
        """A user expands to itself; domains and case do not matter."""
        self.assertEqual(
            self.successResultOf(self.router.expand("Alice@EXAMPLE.test.")),
            (("alice@example.test",), ()),
        )

    def test_expandAliases(self) -> None:
        """Aliases expand to their local and remote targets."""
        self.assertEqual(
            self.successResultOf(self.router.expand("team@example.test")),
            (("alice@example.test", "bob@example.test"), ()),
        )
        self.assertEqual(
            self.successResultOf(self.router.expand("outside@example.test")),
            ((), ("someone@remote.test",)),
        )

    def test_remoteTargetAsWritten(self) -> None:
        """
        An alias target in another domain keeps its local part as the
        aliases file writes it: only that domain may fold its case (RFC
        5321 2.4); it was forwarded lower-cased. Its domain is the key's
        (A-labels, lower case), and two spellings of it are one recipient.
        """
        with open(self.aliases.path, "a") as f:
            f.write(
                "fwd@example.test: John.Doe@Remote.Test, john.doe@remote.test, Ana@BÜCHER.example\n"
            )
        self.aliases.load()
        self.assertEqual(
            self.successResultOf(self.router.expand("FWD@example.test")),
            ((), ("John.Doe@remote.test", "Ana@xn--bcher-kva.example")),
        )

    def test_continuationLines(self) -> None:
        """
        As in aliases(5), a line that starts with white space continues
        the entry above it, past comments; its targets were skipped as a
        malformed line of their own, and their mail went nowhere. An
        indented line with a colon is still an entry of its own.
        """
        with open(self.aliases.path, "a") as f:
            f.write(
                "folded@example.test: alice@example.test,\n"
                "    # bob too\n"
                "    bob@example.test,\n"
                "\tsomeone@remote.test\n"
                "  indented@example.test: bob@example.test\n"
            )
        self.aliases.load()
        self.assertEqual(
            self.successResultOf(self.router.expand("folded@example.test")),
            (("alice@example.test", "bob@example.test"), ("someone@remote.test",)),
        )
        self.assertEqual(self.aliases.get("indented@example.test"), ("bob@example.test",))
        self.assertEqual(len(self.aliases.problems), 1)

    def test_hashInAddress(self) -> None:
        """
        A C{#} inside an address (RFC 5321 allows it in a local part) is the
        address's; one at the start of a line or after white space starts a
        comment. The whole rest of a line went as a comment, and an alias
        such as C{dev#ops@...} could not be written.
        """
        with open(self.aliases.path, "a") as f:
            f.write(
                "dev#ops@example.test: alice@example.test, bob#2@remote.test  # the team\n"
                "#gone@example.test: bob@example.test\n"
                "ops@example.test: alice@example.test,#bob@example.test\n"
                "old@example.test: bob@example.test#no space before this comment\n"
            )
        self.aliases.load()
        self.assertEqual(
            self.successResultOf(self.router.expand("dev#ops@example.test")),
            (("alice@example.test",), ("bob#2@remote.test",)),
        )
        self.assertEqual(self.aliases.get("#gone@example.test"), ())
        # After a comma too, as it always was.
        self.assertEqual(self.aliases.get("ops@example.test"), ("alice@example.test",))
        # A '#' no domain can hold: the line is reported, not taken for an address.
        self.assertEqual(self.aliases.get("old@example.test"), ())
        self.assertEqual([p.split(":")[1] for p in self.aliases.problems], ["6", "10"])
        self.assertIn(
            "'bob@example.test#no': a '#' in a domain; a comment needs white space before its '#'",
            self.aliases.problems[1],
        )

    def test_aliasLoop(self) -> None:
        """An alias loop ends; what it reaches is still delivered."""
        self.assertEqual(
            self.successResultOf(self.router.expand("loop1@example.test")),
            (("bob@example.test",), ()),
        )

    def test_unknown(self) -> None:
        """A local address that is neither user nor alias expands to nothing."""
        self.assertEqual(self.successResultOf(self.router.expand("nobody@example.test")), ((), ()))

    def test_malformedAliasLineReported(self) -> None:
        """A malformed aliases line is reported with its line number and skipped."""
        self.assertEqual(len(self.aliases.problems), 1)
        self.assertIn(":6: expected", self.aliases.problems[0])

    def test_mapFileNotUTF8(self) -> None:
        """
        Bytes that are not UTF-8 cost only their line (none at all in a
        comment), and a byte-order mark is not part of the first key: the
        whole file was thrown away for one such byte.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(
                b"\xef\xbb\xbfsales@example.test: alice@example.test\n"
                b"# Caf\xe9 team\n"
                b"caf\xe9@example.test: bob@example.test\n"
                b"team@example.test: bob@example.test\n"
            )
        aliases = AddressMap(path)
        self.assertEqual(aliases.get("sales@example.test"), ("alice@example.test",))
        self.assertEqual(aliases.get("team@example.test"), ("bob@example.test",))
        self.assertEqual(aliases.problems, [f"{path}:3: not UTF-8"])

    def test_senderOwnAddress(self) -> None:
        """A login may send as itself, in any case."""
        self.assertTrue(
            self.successResultOf(
                self.router.mayUseSender("alice@example.test", "ALICE@example.test")
            )
        )

    def test_senderAlias(self) -> None:
        """A login may send as an alias that leads to it."""
        self.assertTrue(
            self.successResultOf(
                self.router.mayUseSender("alice@example.test", "postmaster@example.test")
            )
        )
        self.assertTrue(
            self.successResultOf(self.router.mayUseSender("bob@example.test", "team@example.test"))
        )

    def test_senderMap(self) -> None:
        """The sender map grants addresses and whole domains."""
        self.assertTrue(
            self.successResultOf(
                self.router.mayUseSender("bob@example.test", "newsletter@example.test")
            )
        )
        self.assertTrue(
            self.successResultOf(self.router.mayUseSender("alice@example.test", "carol@other.test"))
        )
        self.assertFalse(
            self.successResultOf(self.router.mayUseSender("bob@example.test", "carol@other.test"))
        )

    def test_senderNotOwned(self) -> None:
        """Another user's address, or a foreign one, is not allowed."""
        self.assertFalse(
            self.successResultOf(self.router.mayUseSender("alice@example.test", "bob@example.test"))
        )
        self.assertFalse(
            self.successResultOf(self.router.mayUseSender("alice@example.test", "x@remote.test"))
        )

    def test_aliasesReloaded(self) -> None:
        """A changed aliases file is read again by maybeReload."""
        with open(self.aliases.path, "a") as f:
            f.write("new@example.test: bob@example.test\n")
        self.assertTrue(self.aliases.maybeReload())
        self.assertEqual(
            self.successResultOf(self.router.expand("new@example.test")),
            (("bob@example.test",), ()),
        )
        self.assertFalse(self.aliases.maybeReload())


class DeliveryTests(RealmTestsMixin, unittest.TestCase):
    def test_senderRefused(self) -> None:
        """MAIL FROM an address the login does not own: 553 5.7.1."""
        e = self.failureResultOf(
            self.delivery().validateFrom(None, addr("bob@example.test")), SMTPReply
        ).value
        self.assertEqual(e.code, 553)
        self.assertTrue(e.text.startswith("5.7.1 "))

    def test_nullSenderAllowed(self) -> None:
        """The null sender is allowed for an authenticated user."""
        self.assertIsNone(self.successResultOf(self.delivery().validateFrom(None, None)))

    def test_anonymousSenderNotBound(self) -> None:
        """Unauthenticated (MX) sessions may use any sender; they reach only local users."""
        origin = addr("someone@remote.test")
        self.assertIs(self.successResultOf(self.delivery(None).validateFrom(None, origin)), origin)

    def test_bindingOff(self) -> None:
        """With sender_login_match = no any sender is accepted."""
        self.router.senderLoginMatch = False
        origin = addr("bob@example.test")
        self.assertIs(self.successResultOf(self.delivery().validateFrom(None, origin)), origin)

    def test_unknownLocalRecipient(self) -> None:
        """An unknown local recipient: 550 5.1.1."""
        e = self.failureResultOf(
            self.delivery().validateTo(self.user("nobody@example.test")), SMTPReply
        ).value
        self.assertEqual((e.code, e.text[:6]), (550, "5.1.1 "))

    def test_relayDeniedWithoutAuth(self) -> None:
        """Without AUTH a remote recipient gets 554 5.7.1 even with a queue."""
        e = self.failureResultOf(
            self.delivery(None).validateTo(self.user("x@remote.test")), SMTPReply
        ).value
        self.assertEqual(e.code, 554)

    def test_relayDeniedWithoutQueue(self) -> None:
        """Without [relay] even an authenticated user gets 554 5.7.1 for other domains."""
        self.realm.queue = None
        e = self.failureResultOf(
            self.delivery().validateTo(self.user("x@remote.test")), SMTPReply
        ).value
        self.assertEqual(e.code, 554)

    def test_aliasToRemoteWithoutRelay(self) -> None:
        """An alias leading outside with no [relay] is a temporary failure (a config fault)."""
        self.realm.queue = None
        e = self.failureResultOf(
            self.delivery(None).validateTo(self.user("outside@example.test")), SMTPReply
        ).value
        self.assertEqual(e.code, 451)

    def test_oneMessageObject(self) -> None:
        """Every recipient of a transaction gets the same message object."""
        d = self.delivery()
        first = self.successResultOf(d.validateTo(self.user("bob@example.test")))
        second = self.successResultOf(d.validateTo(self.user("x@remote.test")))
        self.assertIs(first(), second())

    def test_localAndRemote(self) -> None:
        """
        A message for local and remote recipients is written once to the
        Maildir and once to the queue; the queue is woken after the commit.
        """
        d = self.delivery()
        self.successResultOf(d.validateFrom(None, addr("alice@example.test")))
        self.successResultOf(d.validateTo(self.user("bob@example.test")))
        self.successResultOf(d.validateTo(self.user("team@example.test")))
        factory = self.successResultOf(d.validateTo(self.user("x@remote.test")))
        message = factory()
        message.write(HEADER + b"\r\nbody\r\n")
        result = self.successResultOf(message.eomReceived())
        self.assertEqual(result, d.id)
        self.assertEqual(self.woken, 1)
        [writer] = self.queue.writers
        self.assertEqual(
            (writer.sender, writer.recipients), ("alice@example.test", ["x@remote.test"])
        )
        self.assertEqual(writer.data, HEADER + b"\r\nbody\r\n")
        self.assertTrue(writer.committed)
        for who in ("alice", "bob"):
            self.assertEqual(
                self.stored(who),
                [
                    b"Return-Path: <alice@example.test>\n"
                    + HEADER.replace(b"\r\n", b"\n")
                    + b"\nbody\n"
                ],
            )

    def test_abortLeavesNothing(self) -> None:
        """A message aborted (client gone) leaves no file and nothing queued."""
        d = self.delivery()
        message = self.successResultOf(d.validateTo(self.user("bob@example.test")))()
        remote = self.successResultOf(d.validateTo(self.user("x@remote.test")))
        self.assertIs(remote(), message)
        message.write(b"partial")
        message.connectionLost()
        maildir = os.path.join(self.dir, "example.test", "bob", "Maildir")
        self.assertEqual(os.listdir(os.path.join(maildir, "tmp")), [])
        self.assertEqual(os.listdir(os.path.join(maildir, "new")), [])

    def test_maildirCannotBeMade(self) -> None:
        """
        A Maildir that cannot be made (a file where its folder should be) is
        a warning naming the path and errno, once; the message fails with
        451 at the end of data, and nothing of it is queued.
        """
        os.makedirs(self.dir)
        open(os.path.join(self.dir, "example.test"), "w").close()
        d = self.delivery()
        self.successResultOf(d.validateTo(self.user("x@remote.test")))
        with capturedLogs() as events:
            message = self.successResultOf(d.validateTo(self.user("bob@example.test")))()
            message.write(b"Subject: x\r\n\r\nbody\r\n")
            e = self.failureResultOf(message.eomReceived(), SMTPReply).value
        self.assertEqual((e.code, e.text), (451, "4.3.0 Error: local error in processing"))
        self.assertEqual(
            [(x["log_namespace"], x["log_level"], formatEvent(x)) for x in events],
            [
                (
                    "mailauth.realm",
                    LogLevel.warn,
                    f"message {d.id} not stored: {self.dir}/example.test/bob: "
                    "Not a directory (errno 20); "
                    f"the client is told 451, to try again later session={SESSION}",
                )
            ],
        )
        [writer] = self.queue.writers
        self.assertTrue(writer.aborted)
        self.assertEqual(self.queue.messages, {})

    def test_commitFails(self) -> None:
        """
        A failure while committing (here new/ is not a folder) is the same
        warning; every part of the message is thrown away.
        """
        maildir = os.path.join(self.dir, "example.test", "bob", "Maildir")
        os.makedirs(os.path.join(maildir, "tmp"))
        open(os.path.join(maildir, "new"), "w").close()
        d = self.delivery()
        message = self.successResultOf(d.validateTo(self.user("bob@example.test")))()
        message.write(b"Subject: x\r\n\r\nbody\r\n")
        with capturedLogs() as events:
            e = self.failureResultOf(message.eomReceived(), SMTPReply).value
        self.assertEqual(e.code, 451)
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertRegex(
            formatEvent(event),
            # The new/ that could not take it, for the operator to fix.
            rf"^message {d.id} not stored: {maildir}/new/\S+: "
            r"Not a directory \(errno 20\); the client is told 451",
        )
        self.assertEqual(os.listdir(os.path.join(maildir, "tmp")), [])

    def test_diskFull(self) -> None:
        """A full disk gets 452 4.3.1."""
        d = self.delivery()
        message = self.successResultOf(d.validateTo(self.user("x@remote.test")))()
        [writer] = self.queue.writers

        def full(chunk: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        writer.write = full
        with capturedLogs() as events:
            message.write(b"x")
            message.write(b"y")
            e = self.failureResultOf(message.eomReceived(), SMTPReply).value
        self.assertEqual((e.code, e.text), (452, "4.3.1 Error: insufficient system storage"))
        self.assertEqual(
            [formatEvent(x) for x in events],
            [
                f"message {d.id} not stored: the queue: No space left on device (errno 28); the "
                f"client is told 452, to try again later session={SESSION}"
            ],
        )
        self.assertTrue(writer.aborted)

    def test_receivedHeader(self) -> None:
        """The Received header names ESMTPSA, the login, TLS, the id and the recipient."""
        self.clock.advance(1795965994)
        d = self.delivery()
        header = d.receivedHeader(
            (b"client.example", "192.0.2.1"), None, [self.user("bob@example.test")]
        )
        lines = header.decode().split("\r\n")
        self.assertEqual(lines[0], "Received: from client.example ([192.0.2.1])")
        self.assertEqual(lines[1], "\t(authenticated as alice@example.test)")
        self.assertEqual(lines[2], f"\tby mx.example.test (mailauth) with ESMTPSA id {d.id}")
        self.assertEqual(lines[3], "\t(using TLSv1.3 with cipher TLS_AES_128_GCM_SHA256)")
        recipient, _, date = lines[4].partition("; ")
        self.assertEqual(recipient, "\tfor <bob@example.test>")
        # The time of the clock, in whatever zone the machine is in.
        self.assertEqual(parsedate_to_datetime(date).timestamp(), 1795965994)
        self.assertEqual(lines[5], "")

    def test_receivedHeaderManyRecipients(self) -> None:
        """
        With more than one recipient there is no C{for} clause, and the
        C{;} before the date (RFC 5322 3.6.7) ends the line before it, as
        Postfix writes it: a parser finds the date after the last C{;}.
        """
        self.clock.advance(1795965994)
        d = self.delivery()
        header = d.receivedHeader(
            (b"client.example", "192.0.2.1"),
            None,
            [self.user("bob@example.test"), self.user("alice@example.test")],
        )
        lines = header.decode().split("\r\n")
        self.assertEqual(lines[3], "\t(using TLSv1.3 with cipher TLS_AES_128_GCM_SHA256);")
        self.assertEqual(lines[5], "")
        field = email.message_from_bytes(header + b"\r\n", policy=email.policy.SMTP)["Received"]
        _, _, date = field.rpartition(";")
        self.assertEqual(parsedate_to_datetime(date.strip()).timestamp(), 1795965994)
        self.assertNotIn("for <", field)

    def test_receivedHeaderIPv6(self) -> None:
        """An IPv6 client is written as an address literal, tagged C{IPv6:} (RFC 5321 4.1.3)."""
        header = self.delivery().receivedHeader(
            (b"client.example", "2001:db8::42"), None, [self.user("bob@example.test")]
        )
        self.assertTrue(
            header.startswith(b"Received: from client.example ([IPv6:2001:db8::42])\r\n"), header
        )

    def test_receivedHeaderPlain(self) -> None:
        """Without TLS and AUTH the protocol is plain ESMTP (RFC 3848)."""
        d = self.delivery(None)
        user = smtp.User(addr("bob@example.test"), None, FakeSession(tls=None), b"")
        header = d.receivedHeader((b"c", "192.0.2.1"), None, [user, user])
        self.assertIn(b" with ESMTP id ", header)
        self.assertNotIn(b"authenticated", header)
        self.assertNotIn(b"\tfor <", header)


class LocalDeliveryTests(RealmTestsMixin, unittest.TestCase):
    def test_deliverThroughAliases(self) -> None:
        """A bounce for a local alias lands in its targets' Maildirs."""
        local = LocalDelivery(self.router, "mx.example.test", runInline)
        self.assertTrue(local.isLocal("team@EXAMPLE.test"))
        self.successResultOf(local.deliver("team@example.test", b"Subject: b\r\n\r\nx\r\n"))
        for who in ("alice", "bob"):
            new = os.path.join(self.dir, "example.test", who, "Maildir", "new")
            self.assertEqual(len(os.listdir(new)), 1)

    def test_deliverUnknown(self) -> None:
        """Delivering to nobody fails with 550."""
        local = LocalDelivery(self.router, "mx.example.test", runInline)
        f = self.failureResultOf(local.deliver("nobody@example.test", b"x\r\n"), SMTPReply)
        self.assertEqual(f.value.code, 550)


@implementer(IUserDatabase)
class UncheckedUsers:
    """
    A user database holding C{logins} without checking them, as a table
    filled by other tools might.
    """

    def __init__(self, *logins: str) -> None:
        self.logins = {login.lower() for login in logins}

    def lookup(self, login: str) -> defer.Deferred:
        found = login.lower() in self.logins
        return defer.succeed(User(login.lower(), parse("{PLAIN}x")) if found else None)


class UnsafeMailboxTests(RealmTestsMixin, unittest.TestCase):
    """
    Issue #10 item 3, at delivery: whatever the user database lets in, a
    login that cannot name a folder under the Maildir template's fixed
    start gets no Maildir.
    """

    ESCAPE = '"x/../../../escape"@example.test'

    def setUp(self) -> None:
        super().setUp()
        self.router.users = UncheckedUsers(self.ESCAPE, "alice@example.test")
        self.log = LogWatcher()
        self.addCleanup(self.log.stop)

    def assertNothingOutside(self) -> None:
        parent = os.path.dirname(self.dir)
        self.assertEqual([n for n in os.listdir(parent) if "escape" in n], [])
        self.assertFalse(os.path.exists(self.dir))

    def test_recipientRefused(self) -> None:
        """
        RCPT to such a login gets 553 5.1.3, one error is logged naming
        the recipient, why, and the session, and no folder is made anywhere.
        """
        delivery = self.delivery()
        delivery.session = "5E5510N"
        e = self.failureResultOf(delivery.validateTo(self.user(self.ESCAPE)), SMTPReply).value
        self.assertEqual((e.code, e.text[:6]), (553, "5.1.3 "))
        self.assertIn(self.ESCAPE, e.text)
        [line] = self.log.matching("refusing to deliver")
        self.assertTrue(line.startswith(f"refusing to deliver to <{self.ESCAPE}>: "), line)
        self.assertIn("its local part contains '/'", line)
        self.assertTrue(line.endswith(" session=5E5510N"), line)
        self.assertNothingOutside()

    def test_aliasToUnsafeRefused(self) -> None:
        """An alias that leads to such a login is refused the same way."""
        with open(self.aliases.path, "a") as f:
            f.write(f"sneaky@example.test: {self.ESCAPE}\n")
        self.aliases.load()
        e = self.failureResultOf(
            self.delivery().validateTo(self.user("sneaky@example.test")), SMTPReply
        ).value
        self.assertEqual(e.code, 553)
        self.assertNothingOutside()

    def test_localDeliveryRefused(self) -> None:
        """A bounce for such a login fails with 553 (permanent), writing nothing."""
        local = LocalDelivery(self.router, "mx.example.test", runInline)
        f = self.failureResultOf(local.deliver(self.ESCAPE, b"x\r\n"), SMTPReply)
        self.assertEqual(f.value.code, 553)
        [line] = self.log.matching("refusing to deliver")
        self.assertTrue(
            line.startswith(f"refusing to deliver a report or notice to <{self.ESCAPE}>: "), line
        )
        self.assertNothingOutside()


class PostmasterTests(RealmTestsMixin, unittest.TestCase):
    """
    Issue #10 item 12: with [delivery] postmaster, postmaster@ every local
    domain reaches that address, in any case, without an alias; a user or
    an alias of that exact address still takes its own.
    """

    def setUp(self) -> None:
        super().setUp()
        self.router.postmaster = "bob@example.test"

    def expand(self, address: str) -> tuple:
        return self.successResultOf(self.router.expand(address))

    def test_withoutAlias(self) -> None:
        """postmaster@other.test has no alias: it goes to the postmaster, in any case."""
        for address in ("postmaster@other.test", "PostMaster@OTHER.test"):
            self.assertEqual(self.expand(address), (("bob@example.test",), ()))

    def test_exactAliasWins(self) -> None:
        """postmaster@example.test has its own alias line (to alice): that counts."""
        self.assertEqual(self.expand("postmaster@example.test"), (("alice@example.test",), ()))

    def test_userWins(self) -> None:
        """A user named postmaster@ gets its own mail."""
        self.users.source["postmaster@other.test"] = "{PLAIN}p"
        self.users.load()
        self.assertEqual(self.expand("postmaster@other.test"), (("postmaster@other.test",), ()))

    def test_catchAllDoesNot(self) -> None:
        """A catch-all of the domain does not take postmaster mail."""
        with open(self.aliases.path, "a") as f:
            f.write("@other.test: alice@example.test\n")
        self.aliases.load()
        self.assertEqual(self.expand("postmaster@other.test"), (("bob@example.test",), ()))
        self.assertEqual(self.expand("anyone@other.test"), (("alice@example.test",), ()))

    def test_remotePostmaster(self) -> None:
        """The postmaster may be elsewhere: the mail is forwarded."""
        self.router.postmaster = "hostmaster@remote.test"
        self.assertEqual(self.expand("postmaster@other.test"), ((), ("hostmaster@remote.test",)))

    def test_unset(self) -> None:
        """Without the setting, postmaster@ is only what users and aliases make it."""
        self.router.postmaster = None
        self.assertEqual(self.expand("postmaster@other.test"), ((), ()))

    def test_recipientAccepted(self) -> None:
        """RCPT to postmaster@ a local domain is accepted and stored for the postmaster."""
        d = self.delivery(None)
        self.successResultOf(d.validateFrom(None, addr("someone@remote.test")))
        message = self.successResultOf(d.validateTo(self.user("POSTMASTER@other.test")))()
        message.write(b"Subject: hi\r\n\r\nx\r\n")
        self.successResultOf(message.eomReceived())
        self.assertEqual(
            self.stored("bob"), [b"Return-Path: <someone@remote.test>\nSubject: hi\n\nx\n"]
        )


class HopTests(RealmTestsMixin, unittest.TestCase):
    """
    RFC 5321 6.3: a message with more than L{MAX_HOPS} C{Received:} fields
    is taken for a mail loop: 554 5.4.6 at the end of data, nothing kept
    in any Maildir or the queue, one warning, counted as C{too_many_hops}.
    """

    def send(self, received: int, login=None, chunk: int = 7, spelling=b"Received"):
        """
        Send to bob and to a remote address a message that carries
        C{received} C{Received:} fields (folded, as real ones are), in
        pieces of C{chunk} bytes; the Deferred of its end of data.
        """
        d = self.delivery(login)
        self.successResultOf(d.validateFrom(None, addr(login or "someone@remote.test")))
        factories = [self.successResultOf(d.validateTo(self.user("bob@example.test")))]
        if login is not None:
            factories.append(self.successResultOf(d.validateTo(self.user("x@remote.test"))))
        message = factories[0]()
        hop = spelling + b": from a.example (a.example [192.0.2.1])\r\n\tby b.example; %d\r\n"
        body = (
            b"".join(hop % n for n in range(received))
            + b"X-Received: not a hop\r\nSubject: loop\r\n\r\n"
            + hop % 999 * 200
        )
        for i in range(0, len(body), chunk):
            message.write(body[i : i + chunk])
        return message.eomReceived()

    def test_loopRefused(self) -> None:
        """101 Received fields: 554 5.4.6, nothing kept, one warning naming the count."""
        with capturedLogs() as events:
            f = self.failureResultOf(self.send(MAX_HOPS + 1), SMTPReply)
        self.assertEqual(
            (f.value.code, f.value.text, f.value.metric),
            (554, "5.4.6 Error: too many hops (101 Received header fields)", "too_many_hops"),
        )
        self.assertEqual(self.stored("bob"), [])
        tmp = os.path.join(self.dir, "example.test", "bob", "Maildir", "tmp")
        self.assertEqual(os.listdir(tmp) if os.path.isdir(tmp) else [], [])
        warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("101 Received header fields, more than 100: a mail loop?", warnings[0])

    def test_submissionLoopNotQueued(self) -> None:
        """A looping submission is kept neither in the Maildir nor in the queue."""
        self.failureResultOf(self.send(MAX_HOPS + 5, login="alice@example.test"), SMTPReply)
        self.assertEqual(self.stored("bob"), [])
        self.assertEqual(self.queue.messages, {})
        self.assertEqual([w.aborted for w in self.queue.writers], [True])

    def test_atTheLimit(self) -> None:
        """
        100 Received fields pass; so do Received: lines in the body and
        fields that only end in Received; chunk ends fall everywhere.
        """
        for chunk in (1, 2, 3, 10, 64, 100000):
            self.assertTrue(self.successResultOf(self.send(MAX_HOPS, chunk=chunk)))
        self.assertEqual(len(self.stored("bob")), 6)

    def test_anySpelling(self) -> None:
        """Field names are not case-sensitive: RECEIVED and a space before the colon count."""
        for spelling in (b"RECEIVED", b"received \t "):
            self.failureResultOf(self.send(MAX_HOPS + 1, spelling=spelling), SMTPReply)
        self.assertEqual(self.stored("bob"), [])


class FinalDeliveryFieldsTests(RealmTestsMixin, unittest.TestCase):
    """
    Issue #10 item 12: local delivery starts each message with
    C{Return-Path:} (RFC 5321 4.4), the queued copy does not; an
    authenticated submission lacking C{Date:} or C{Message-ID:} gets them
    (RFC 6409 8.2, 8.3), in every copy.
    """

    def send(self, login, sender, body: bytes, *recipients: str):
        d = self.delivery(login)
        self.successResultOf(d.validateFrom(None, addr(sender) if sender else None))
        # As the session does: the message is made at DATA, after every RCPT.
        factories = [self.successResultOf(d.validateTo(self.user(r))) for r in recipients]
        message = factories[0]()
        for i in range(0, len(body), 7):
            message.write(body[i : i + 7])
        self.successResultOf(message.eomReceived())
        return d

    def test_returnPath(self) -> None:
        """The envelope sender, first, in the Maildir copy only."""
        self.send(
            "alice@example.test",
            "alice@example.test",
            HEADER + b"\r\nx\r\n",
            "bob@example.test",
            "x@remote.test",
        )
        [stored] = self.stored("bob")
        self.assertTrue(stored.startswith(b"Return-Path: <alice@example.test>\nSubject: x\n"))
        [writer] = self.queue.writers
        self.assertEqual(writer.data, HEADER + b"\r\nx\r\n")

    def test_nullSender(self) -> None:
        """The null sender is C{Return-Path: <>}."""
        self.send("alice@example.test", None, HEADER + b"\r\nx\r\n", "bob@example.test")
        [stored] = self.stored("bob")
        self.assertTrue(stored.startswith(b"Return-Path: <>\nSubject: x\n"))

    def test_bounceReturnPath(self) -> None:
        """A bounce delivered locally by the queue starts with C{Return-Path: <>}."""
        local = LocalDelivery(self.router, "mx.example.test", runInline)
        self.successResultOf(local.deliver("bob@example.test", b"Subject: b\r\n\r\nx\r\n"))
        self.assertEqual(self.stored("bob"), [b"Return-Path: <>\nSubject: b\n\nx\n"])

    def test_submissionCompleted(self) -> None:
        """
        Without Date and Message-ID, an authenticated submission gets both
        at the end of its header section, the same in the Maildir and in
        the queue.
        """
        self.clock.advance(1795965994)
        d = self.send(
            "alice@example.test",
            "alice@example.test",
            b"Subject: x\r\n\r\nbody\r\n",
            "bob@example.test",
            "x@remote.test",
        )
        fields = submissionFields(self.realm, d.id)
        self.assertEqual(
            fields[b"message-id"],
            f"Message-ID: <20261129152634.{d.id}@mx.example.test>\r\n".encode(),
        )
        date = fields[b"date"].decode()
        self.assertTrue(date.startswith("Date: ") and date.endswith("\r\n"), date)
        self.assertEqual(parsedate_to_datetime(date[6:-2]).timestamp(), 1795965994)
        completed = b"Subject: x\r\n" + fields[b"date"] + fields[b"message-id"] + b"\r\nbody\r\n"
        [writer] = self.queue.writers
        self.assertEqual(writer.data, completed)
        self.assertEqual(
            self.stored("bob"),
            [b"Return-Path: <alice@example.test>\n" + completed.replace(b"\r\n", b"\n")],
        )

    def test_notForAnonymous(self) -> None:
        """Mail that did not come through AUTH (an MX) is stored as it came."""
        self.send(None, "someone@remote.test", b"Subject: x\r\n\r\nbody\r\n", "bob@example.test")
        self.assertEqual(
            self.stored("bob"), [b"Return-Path: <someone@remote.test>\nSubject: x\n\nbody\n"]
        )

    def test_abortedWhileHeld(self) -> None:
        """A client gone while the header section is held leaves nothing."""
        d = self.delivery()
        message = self.successResultOf(d.validateTo(self.user("bob@example.test")))()
        message.write(b"Subject: x\r\n")
        message.connectionLost()
        maildir = os.path.join(self.dir, "example.test", "bob", "Maildir")
        self.assertEqual(os.listdir(os.path.join(maildir, "tmp")), [])
        self.assertEqual(os.listdir(os.path.join(maildir, "new")), [])


class HeaderFromTests(RealmTestsMixin, unittest.TestCase):
    """
    Issue #12 item 3: with C{header_from_match}, every From: and Sender:
    address of an authenticated submission must be one its login may use
    as MAIL FROM; else 550 5.7.1 at the end of data, nothing kept.
    """

    def setUp(self) -> None:
        super().setUp()
        self.router.headerFromMatch = True
        # The metric of every reply the end of data failed with: the session
        # counts a refusal under it (mailauth_messages_refused_total).
        self.metrics: list = []

    def send(self, header: bytes, login="alice@example.test", recipients=("bob@example.test",)):
        """
        Send a message with C{header} (and a Date and Message-ID) from
        C{login}; the Deferred of its end of data.
        """
        d = self.delivery(login)
        self.successResultOf(d.validateFrom(None, addr(login or "someone@remote.test")))
        factories = [self.successResultOf(d.validateTo(self.user(r))) for r in recipients]
        message = factories[0]()
        body = HEADER + header + b"\r\nbody\r\n"
        for i in range(0, len(body), 7):
            message.write(body[i : i + 7])
        return message.eomReceived().addErrback(self._metric)

    def _metric(self, f: Failure) -> Failure:
        if f.check(SMTPReply):
            self.metrics.append(f.value.metric)
        return f

    def refusals(self) -> int:
        """How many replies so far are counted as C{header_from} refusals."""
        return self.metrics.count("header_from")

    def assertNothingKept(self) -> None:
        maildir = os.path.join(self.dir, "example.test", "bob", "Maildir")
        for sub in ("tmp", "new"):
            folder = os.path.join(maildir, sub)
            self.assertEqual(os.listdir(folder) if os.path.isdir(folder) else [], [], sub)
        self.assertEqual(self.queue.messages, {})
        for writer in self.queue.writers:
            self.assertEqual((writer.prepared, writer.aborted), (False, True))

    def test_ownAddresses(self) -> None:
        """The login's own address, an alias to it, and a granted domain are accepted."""
        for header in (
            b"From: Alice <ALICE@example.test>\r\n",
            b"From: postmaster@example.test\r\nSender: alice@example.test\r\n",
            b"From: Team: someone@other.test, alice@example.test;\r\n",
        ):
            self.successResultOf(self.send(header))
        self.assertEqual(len(self.stored("bob")), 3)
        self.assertEqual(self.refusals(), 0)

    def test_spoofRefused(self) -> None:
        """
        A From: the login may not use: 550 5.7.1 naming it, nothing stored
        anywhere (the queue's copy never prepared), one log line, one count.
        """
        with capturedLogs() as events:
            f = self.failureResultOf(
                self.send(
                    b"From: Bob <bob@example.test>\r\n",
                    recipients=("bob@example.test", "x@remote.test"),
                ),
                SMTPReply,
            )
        self.assertEqual(
            (f.value.code, f.value.text),
            (
                550,
                (
                    "5.7.1 <bob@example.test>: From/Sender header address not owned by user "
                    "alice@example.test"
                ),
            ),
        )
        self.assertNothingKept()
        self.assertEqual(self.woken, 0)
        lines = [formatEvent(e) for e in events if e.get("log_namespace") == "mailauth.realm"]
        self.assertEqual(len(lines), 1)
        self.assertRegex(
            lines[0],
            r"^header From refused: login=<alice@example\.test> "
            rf"from=<bob@example\.test> id=[0-9A-F]{{12}} session={SESSION}$",
        )
        self.assertEqual(self.refusals(), 1)

    def test_senderField(self) -> None:
        """A Sender: the login may not use is refused like a From:."""
        f = self.failureResultOf(
            self.send(b"From: alice@example.test\r\nSender: newsletter@example.test\r\n"), SMTPReply
        )
        self.assertIn("<newsletter@example.test>", f.value.text)
        self.assertNothingKept()
        # The sender map grants it to bob.
        self.successResultOf(
            self.send(b"Sender: newsletter@example.test\r\n", login="bob@example.test")
        )

    def test_tricky(self) -> None:
        """
        The table of tricky From: headers: accepted exactly when every
        address a reader could take for the sender is granted (here: the
        login's own domain other.test, given to it whole by the sender map).
        """
        refused = 0
        for header, addresses in TRICKY_FROM:
            d = self.send(re.sub(rb"(?i)example\.org", b"other.test", header))
            if all(a.endswith("@example.org") for a in addresses):
                self.successResultOf(d)
            else:
                refused += 1
                f = self.failureResultOf(d, SMTPReply)
                self.assertEqual(f.value.code, 550, header)
                self.assertIn("<mallory@evil.test>", f.value.text)
        self.assertEqual(self.refusals(), refused)
        self.assertGreater(refused, 5)

    def test_uncheckable(self) -> None:
        """A From: or Sender: that cannot be checked is refused, never guessed."""
        for header in UNCHECKABLE_FROM:
            with capturedLogs() as events:
                f = self.failureResultOf(
                    self.send(header.replace(b"example.org", b"example.test")), SMTPReply
                )
            self.assertEqual(
                (f.value.code, f.value.text),
                (550, "5.7.1 Error: From/Sender header cannot be checked"),
                header,
            )
            [line] = [formatEvent(e) for e in events if e.get("log_namespace") == "mailauth.realm"]
            self.assertRegex(
                line,
                r"^header From refused: login=<alice@example\.test> "
                r"id=[0-9A-F]{12}: .+",
            )
        self.assertNothingKept()
        self.assertEqual(self.refusals(), len(UNCHECKABLE_FROM))

    def test_headerTooLong(self) -> None:
        """A header section over MAX_HEADER cannot be checked: refused."""
        filler = b"".join(b"X-Filler: %06d\r\n" % n for n in range(MAX_HEADER // 16 + 1))
        f = self.failureResultOf(self.send(b"From: alice@example.test\r\n" + filler), SMTPReply)
        self.assertEqual(f.value.code, 550)
        self.assertNothingKept()
        # Just under the limit passes.
        filler = filler[: MAX_HEADER - len(HEADER) - 2000]
        filler = filler[: filler.rindex(b"\r\n") + 2]
        self.successResultOf(self.send(b"From: alice@example.test\r\n" + filler))

    def test_noFrom(self) -> None:
        """A message without From: is accepted, and none is invented."""
        self.successResultOf(self.send(b"To: bob@example.test\r\n"))
        [stored] = self.stored("bob")
        self.assertNotRegex(stored, rb"(?im)^from:")
        self.assertIn(b"\nTo: bob@example.test\n", stored)

    def test_offByDefault(self) -> None:
        """Without header_from_match, any From: is accepted, as before."""
        self.router.headerFromMatch = False
        self.successResultOf(self.send(b"From: mallory@evil.test\r\n"))
        self.assertEqual(len(self.stored("bob")), 1)

    def test_anonymousNotChecked(self) -> None:
        """Mail that did not come through AUTH (an MX) is not checked."""
        self.successResultOf(self.send(b"From: mallory@evil.test\r\n", login=None))
        self.assertEqual(len(self.stored("bob")), 1)
        self.assertEqual(self.refusals(), 0)
