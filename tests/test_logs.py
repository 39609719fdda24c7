"""
docs/logs.rst lists every line the daemon logs: checked against the code,
both ways, so the reference cannot fall behind. And the lines an operator
lives on are really written: one per refusal, hang-up and failed TLS
handshake, tied by the session ID; the listeners named at start; a deleted
queued message; the whole log as JSON under a real twistd.
"""

from __future__ import annotations

import ast
import base64
import glob
import json
import os
import re
import socket
import ssl
import subprocess
import sys

import attrs
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import (
    LogLevel,
    eventFromJSON,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailauth import config as configmod
from mailauth.forward import QueueService
from mailauth.logs import ClassicText, twistdLogsToStandardOutput
from mailauth.queueadmin import deleteMessage
from tests.fakes import FakeRelayConnector, RecordingLocalDelivery, runInline
from tests.harness import (
    BOB,
    BOB_PASSWORD,
    AttackMixin,
    Daemon,
    LogWatcher,
    RawClient,
    TwistdProcess,
    plain,
)
from tests.smtpsink import QueueEvents
from tests.support import (
    MemoryMailbox,
    QueueTestMixin,
    RecordingPortal,
    Session,
    makeFactory,
    makeSettings,
    passwordIs,
    relayConfig,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "logs.rst")

# The methods of twisted.logger.Logger, and the level each logs at.
LEVELS = {
    "debug": "debug",
    "info": "info",
    "warn": "warn",
    "error": "error",
    "critical": "critical",
    "failure": "critical, with a traceback",
}

HOW_TO_ADD = """\
docs/logs.rst must list every line the daemon logs. Add this one under the
heading ``{namespace}`` (make the heading if it is missing: the namespace as
an inline literal, underlined with '-'), as the format string exactly as in
the code, then an indented line that starts with its level:

``{format}``
    *{level}*. What it means, its fields, and what an operator does about it.
"""


@attrs.frozen
class Line:
    namespace: str
    level: str
    format: str
    where: str = ""


def loggedLines() -> list[Line]:
    """
    Every C{NAME.LEVEL("format", ...)} call in mailauth/ on a module-level
    C{NAME = Logger(namespace=...)}, with its namespace and level.
    """
    lines = []
    for path in sorted(glob.glob(os.path.join(ROOT, "mailauth", "*.py"))):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        loggers = {}
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call)
                and getattr(node.value.func, "id", None) == "Logger"
            ):
                namespace = next(
                    (k.value.value for k in node.value.keywords if k.arg == "namespace"), "?"
                )
                for target in node.targets:
                    loggers[getattr(target, "id", None)] = namespace
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in loggers
            ):
                where = f"{os.path.relpath(path, ROOT)}:{node.lineno}"
                first = node.args[0] if node.args else None
                if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                    raise AssertionError(
                        f"{where}: the format of a log line must be a string "
                        "literal, so that docs/logs.rst can list it"
                    )
                lines.append(
                    Line(loggers[node.func.value.id], LEVELS[node.func.attr], first.value, where)
                )
    return lines


def documentedLines() -> list[Line]:
    """
    The entries of docs/logs.rst: under a heading that is a namespace
    (C{``mailauth.x``} underlined with '-'), a line that is one inline
    literal (the format), then an indented line starting with C{*level*}.
    """
    with open(DOCS, encoding="utf-8") as f:
        text = f.read().split("\n")
    lines = []
    namespace = None
    for number, line in enumerate(text):
        following = text[number + 1] if number + 1 < len(text) else ""
        literal = re.fullmatch(r"``(.+)``", line)
        if re.fullmatch(r"[-=]{3,}", following):
            namespace = literal.group(1) if literal and following[0] == "-" else None
        elif literal and namespace is not None:
            level = re.match(r"\s+\*([^*]+)\*", following)
            lines.append(
                Line(
                    namespace,
                    level.group(1) if level else "(none)",
                    literal.group(1),
                    f"docs/logs.rst:{number + 1}",
                )
            )
    return lines


class LogReferenceTests(unittest.TestCase):
    def test_everyLineDocumented(self) -> None:
        """Every line mailauth logs is in docs/logs.rst, under its namespace, with its level."""
        documented = {(x.namespace, x.format): x.level for x in documentedLines()}
        for line in loggedLines():
            message = (
                f"{line.where} logs a line docs/logs.rst does not list.\n"
                + HOW_TO_ADD.format(**attrs.asdict(line))
            )
            self.assertIn((line.namespace, line.format), documented, message)
            self.assertEqual(
                documented[(line.namespace, line.format)],
                line.level,
                f"{line.where}: docs/logs.rst gives this line the wrong level\n"
                + HOW_TO_ADD.format(**attrs.asdict(line)),
            )

    def test_everyDocumentedLineLogged(self) -> None:
        """Every line docs/logs.rst lists is still logged, so the reference never lies."""
        logged = {(x.namespace, x.format) for x in loggedLines()}
        for line in documentedLines():
            self.assertIn(
                (line.namespace, line.format),
                logged,
                f"{line.where} lists ``{line.format}`` under ``{line.namespace}``, "
                "which mailauth no longer logs there: change or remove the entry",
            )

    def test_parsers(self) -> None:
        """The two readers above find the lines they are meant to."""
        logged = loggedLines()
        self.assertIn(
            Line(
                "mailauth.esmtp",
                "info",
                "auth failure: client=[{client}] mechanism={mechanism} "
                "login=<{login}> session={session}",
            ),
            [attrs.evolve(x, where="") for x in logged],
        )
        self.assertIn("critical, with a traceback", {x.level for x in logged})
        self.assertGreater(len(logged), 40)
        self.assertEqual(len(documentedLines()), len({(x.namespace, x.format) for x in logged}))


SESSION = r" session=([0-9a-f]{12})$"


def sessionOf(line: str) -> str:
    """The session ID a log line ends with."""
    found = re.search(SESSION, line)
    assert found is not None, line
    return found.group(1)


class SessionLineTests(AttackMixin, unittest.TestCase):
    """
    The daemon on a clock the test drives: each refusal, hang-up and
    failed TLS handshake is one line with C{client=[ADDRESS]} and the
    session's ID.
    """

    clocked = True
    settings = {
        "server": {
            "max_message_size": "1K",
            "max_errors": "5",
            "timeout": "30s",
            "data_timeout": "10m",
            "max_data_time": "1m",
        },
        "auth": {
            "max_failures_per_address": "4",
            "failures_per_session": "2",
            "tarpit_delay": "0s",
        },
    }

    def lines(self, pattern: str) -> list:
        return self.log.matching(pattern)

    @defer.inlineCallbacks
    def test_oneSessionTiedTogether(self) -> None:
        """
        Every line of one session, from connect to disconnect, ends with the
        same session ID; the next session has another.
        """

        def run():
            client = self.loggedIn()
            replies = [
                client.command(line)[0]
                for line in (
                    b"MAIL FROM:<bob@example.test>",
                    b"RCPT TO:<nobody@example.test>",
                    b"RCPT TO:<someone@remote.example>",
                    b"RCPT TO:<alice.plain@example.test>",
                    b"DATA",
                    b"Subject: x\r\n\r\nx\r\n.",
                    b"QUIT",
                )
            ]
            client.close()
            return replies

        disconnected = self.log.waitFor(r"^disconnect: ")
        self.assertEqual((yield self.inThread(run)), [250, 550, 554, 250, 354, 250, 221])
        yield disconnected
        session = [m for m in self.log.messages if "client=[127.0.0.1]" in m]
        self.assertEqual(
            [m.split(":")[0] for m in session],
            [
                "connect",
                "auth success",
                "refused RCPT",
                "refused RCPT",
                "message accepted",
                "disconnect",
            ],
        )
        self.assertEqual(len({sessionOf(m) for m in session}), 1)
        self.assertRegex(
            session[0], r"^connect: client=\[127\.0\.0\.1\] listener=submissions" + SESSION
        )
        self.assertRegex(
            session[2],
            r"^refused RCPT: client=\[127\.0\.0\.1\] "
            r'login=<bob@example\.test> reason=unknown_user reply="550 5\.1\.1 '
            r'<nobody@example\.test>: Recipient address rejected: User unknown"' + SESSION,
        )
        self.assertRegex(
            session[3],
            r" reason=relay_denied reply=\"554 5\.7\.1 "
            r"<someone@remote\.example>: Relay access denied\"" + SESSION,
        )
        self.assertRegex(
            session[5],
            r"^disconnect: client=\[127\.0\.0\.1\] "
            r"login=<bob@example\.test> messages=1" + SESSION,
        )
        second = yield self.inThread(self.connect)
        yield self.inThread(second.command, b"QUIT")
        connects = self.lines(r"^connect: ")
        self.assertEqual(len(connects), 2)
        self.assertNotEqual(sessionOf(connects[0]), sessionOf(connects[1]))

    @defer.inlineCallbacks
    def test_messageRefusals(self) -> None:
        """
        Too big (by SIZE= and at the end of DATA), a bare LF, a NUL: one
        C{refused} line each, naming the command and the reply.
        """

        def run():
            client = self.loggedIn()
            replies = [client.command(b"MAIL FROM:<bob@example.test> SIZE=5000")[0]]
            for body in (b"x" * 2000, b"bare\nLF", b"N\x00L"):
                replies += [
                    client.command(line)[0]
                    for line in (
                        b"MAIL FROM:<bob@example.test>",
                        b"RCPT TO:<alice.plain@example.test>",
                        b"DATA",
                    )
                ]
                replies.append(client.command(body + b"\r\n.")[0])
            return replies

        self.assertEqual(
            (yield self.inThread(run)),
            [552, 250, 250, 354, 552, 250, 250, 354, 550, 250, 250, 354, 550],
        )
        refused = self.lines(r"^refused ")
        self.assertEqual(
            [
                re.match(r"refused (\w+): .* reason=(\w+) reply=\"(\d+) ", line).groups()
                for line in refused
            ],
            [
                ("MAIL", "too_big", "552"),
                ("DATA", "too_big", "552"),
                ("DATA", "bare_newline", "550"),
                ("DATA", "nul", "550"),
            ],
        )
        for line in refused:
            self.assertRegex(
                line, r"client=\[127\.0\.0\.1\] login=<bob@example\.test> .*" + SESSION
            )

    @defer.inlineCallbacks
    def test_authAndMailRefusals(self) -> None:
        """AUTH before TLS (538) and MAIL before AUTH (530) are logged, with no login."""

        def run():
            client = self.connect("submission")
            client.ehlo()
            return (
                client.command(plain(BOB, BOB_PASSWORD))[0],
                client.command(b"MAIL FROM:<bob@example.test>")[0],
            )

        self.assertEqual((yield self.inThread(run)), (538, 530))
        self.assertEqual(
            [line.split(" reply=")[0] for line in self.lines(r"^refused ")],
            [
                "refused AUTH: client=[127.0.0.1] login=<> reason=encryption_required",
                "refused MAIL: client=[127.0.0.1] login=<> reason=auth_required",
            ],
        )
        self.assertIn(
            'reply="538 5.7.11 Encryption required for requested authentication mechanism"',
            self.lines(r"^refused AUTH")[0],
        )

    @defer.inlineCallbacks
    def test_hangUps(self) -> None:
        """
        The idle timeout, the data timeout, max_data_time and max_errors
        each end a session with one C{hang-up} line naming the limit and
        the last command.
        """
        idle = yield self.inThread(self.connect)
        yield self.inThread(idle.ehlo)
        self.clock.advance(30)
        self.assertTrue((yield self.inThread(idle.closedByServer)))

        def startData():
            client = self.loggedIn()
            for line in (
                b"MAIL FROM:<bob@example.test>",
                b"RCPT TO:<alice.plain@example.test>",
                b"DATA",
            ):
                client.command(line)
            return client

        slow = yield self.inThread(startData)
        self.clock.advance(60)
        self.assertTrue((yield self.inThread(slow.closedByServer)))

        def errors():
            client = self.connect()
            return [client.command(b"BOGUS")[0] for _ in range(5)] + [client.reply()[0]]

        self.assertEqual((yield self.inThread(errors)), [500, 500, 500, 500, 500, 421])
        self.assertEqual(
            [line.split(" session=")[0] for line in self.lines(r"^hang-up: ")],
            [
                "hang-up: client=[127.0.0.1] login=<> reason=timeout command=EHLO",
                "hang-up: client=[127.0.0.1] login=<bob@example.test> reason=max_data_time "
                "command=DATA",
                "hang-up: client=[127.0.0.1] login=<> reason=max_errors command=-",
            ],
        )

    @defer.inlineCallbacks
    def test_failuresAndBlock(self) -> None:
        """
        Failed logins past failures_per_session end the session; past
        max_failures_per_address the address is blocked (one line, with
        the session whose failure blocked it), the session ends, and its
        next connection is refused.
        """

        def fail(count):
            client = self.connect()
            client.ehlo()
            return [client.command(plain(BOB, b"wrong%d" % n))[0] for n in range(count)]

        self.assertEqual((yield self.inThread(fail, 2)), [535, 421])
        self.assertEqual((yield self.inThread(fail, 2)), [535, 421])
        yield self.inThread(self.connect, "submissions", "127.0.0.1", 421)
        hangUps = self.lines(r"^hang-up: ")
        self.assertEqual(
            [line.split(" command=")[0] for line in hangUps],
            [
                "hang-up: client=[127.0.0.1] login=<> reason=failures_per_session",
                "hang-up: client=[127.0.0.1] login=<> reason=blocked",
            ],
        )
        [blocked] = self.lines(r"^address blocked: ")
        self.assertRegex(
            blocked,
            r"^address blocked: client=\[127\.0\.0\.1\] key=127\.0\.0\.1 "
            r"failures=4 seconds=900" + SESSION,
        )
        self.assertEqual(sessionOf(blocked), sessionOf(hangUps[1]))
        [refused] = self.lines(r"^refused connection: ")
        self.assertRegex(
            refused,
            r"^refused connection: client=\[127\.0\.0\.1\] "
            r"listener=submissions reason=blocked" + SESSION,
        )
        self.assertNotEqual(sessionOf(refused), sessionOf(blocked))

    @defer.inlineCallbacks
    def test_tlsHandshakeFailures(self) -> None:
        """
        A client that does not trust the certificate (implicit TLS and
        STARTTLS), and one speaking plain SMTP to the TLS port: one line
        each with OpenSSL's reason; a handshake that works logs none.
        """

        def distrust(port, starttls):
            sock = socket.create_connection(("127.0.0.1", port))
            if starttls:
                sock.recv(1000)
                sock.sendall(b"EHLO x\r\n")
                sock.recv(1000)
                sock.sendall(b"STARTTLS\r\n")
                sock.recv(1000)
            strict = ssl.create_default_context()
            with self.assertRaises(ssl.SSLError):
                strict.wrap_socket(sock, server_hostname="localhost")
            sock.close()

        def plaintext(port):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"EHLO client.example\r\n")
            sock.recv(1000)
            sock.close()

        failed = self.log.waitFor(r"^TLS handshake failed: .* listener=submissions why=")
        yield self.inThread(distrust, self.daemon.ports["submissions"], False)
        yield failed
        failed = self.log.waitFor(r"^TLS handshake failed: .* listener=submission why=")
        yield self.inThread(distrust, self.daemon.ports["submission"], True)
        yield failed
        failed = self.log.waitFor(r"^TLS handshake failed: ")
        yield self.inThread(plaintext, self.daemon.ports["submissions"])
        yield failed

        def brokenAfterHandshake():
            # A record that does not decrypt, under a session whose
            # handshake worked: OpenSSL fails, but not the handshake.
            client = self.loggedIn()
            raw = socket.socket(fileno=os.dup(client.sock.fileno()))
            raw.sendall(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
            raw.close()
            with self.assertRaises(ssl.SSLError):
                client.closedByServer()  # the server's alert

        disconnected = self.log.waitFor(r"^disconnect: client=\[127\.0\.0\.1\] login=<bob@")
        yield self.inThread(brokenAfterHandshake)
        yield disconnected
        lines = self.lines(r"^TLS handshake failed: ")
        self.assertEqual(len(lines), 3, lines)
        for line in lines[:2]:
            self.assertRegex(
                line,
                r"^TLS handshake failed: client=\[127\.0\.0\.1\] "
                r'listener=submissions? why="[^"]*(alert|certificate)[^"]*"' + SESSION,
            )
        self.assertRegex(lines[2], r'why="[^"]*(version|protocol|http)[^"]*"')


class ProxiedTLSTests(AttackMixin, unittest.TestCase):
    """STARTTLS behind HAProxy: TLS goes under the PROXY reader, not the session."""

    settings = {
        "listener:proxied": {
            "endpoint": "tcp:0:interface=127.0.0.1",
            "tls": "starttls",
            "auth": "required",
            "proxy_protocol": "v1",
            "trusted_proxies": "127.0.0.1",
        }
    }

    @defer.inlineCallbacks
    def test_handshakeSeenThroughProxy(self) -> None:
        """
        The session learns that the handshake after STARTTLS worked through
        the PROXY reader: an OpenSSL failure later is not logged as a failed
        handshake, and the lines name the client the header named.
        """

        def run():
            client = RawClient(self.daemon.ports["proxied"])
            self.clients.append(client)
            client.send(b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 587\r\n")
            client.reply()
            client.ehlo()
            client.starttls()
            client.ehlo()
            assert client.command(plain(BOB, BOB_PASSWORD))[0] == 235
            raw = socket.socket(fileno=os.dup(client.sock.fileno()))
            raw.sendall(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
            raw.close()
            with self.assertRaises(ssl.SSLError):
                client.closedByServer()

        disconnected = self.log.waitFor(r"^disconnect: client=\[203\.0\.113\.9\] login=<bob@")
        yield self.inThread(run)
        yield disconnected
        self.assertEqual(self.log.matching(r"^TLS handshake failed"), [])


class DataTimeoutTests(AttackMixin, unittest.TestCase):
    """The idle time allowed inside DATA."""

    clocked = True
    settings = {"server": {"timeout": "5m", "data_timeout": "30s", "max_data_time": "30m"}}

    @defer.inlineCallbacks
    def test_dataTimeout(self) -> None:
        """Idle inside DATA past data_timeout: the hang-up says so."""

        def startData():
            client = self.loggedIn()
            for line in (
                b"MAIL FROM:<bob@example.test>",
                b"RCPT TO:<alice.plain@example.test>",
                b"DATA",
            ):
                client.command(line)
            client.send(b"Subject: part\r\n")
            return client

        client = yield self.inThread(startData)
        self.clock.advance(30)
        self.assertTrue((yield self.inThread(client.closedByServer)))

        [line] = self.log.matching(r"^hang-up: ")
        self.assertIn(" reason=data_timeout command=DATA ", line)

    def test_bdatTimeout(self) -> None:
        """Idle inside a BDAT chunk past data_timeout: the same, naming BDAT."""
        clock = Clock()
        portal = RecordingPortal(MemoryMailbox(), answer=passwordIs(b"secret"))
        factory = makeFactory(
            clock,
            portal=portal,
            tlsMode="implicit",
            settings=makeSettings(timeout=300.0, data_timeout=30.0),
        )
        session = Session(factory)
        session.command(b"EHLO client.example")
        session.command(b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0secret"))
        session.command(b"MAIL FROM:<alice@example.test>")
        session.command(b"RCPT TO:<bob@example.test>")
        self.assertEqual(session.send(b"BDAT 100 LAST\r\nSubject: part\r\n"), [])
        clock.advance(30)
        self.assertEqual(session.read(), [b"421 4.4.2 mx.example.test Error: timeout exceeded"])
        [line] = self.log.matching(r"^hang-up: ")
        self.assertRegex(
            line,
            r"^hang-up: client=\[192\.0\.2\.1\] login=<alice@example\.test> "
            r"reason=data_timeout command=BDAT" + SESSION,
        )


class RefusedConnectionTests(AttackMixin, unittest.TestCase):
    """The refusals before the greeting."""

    settings = {"server": {"max_connections_per_address": "1", "max_connections": "2"}}

    @defer.inlineCallbacks
    def test_tooMany(self) -> None:
        """Too many from one address, and too many in all, each name their reason."""
        yield self.inThread(self.connect, "submission", "127.0.0.1")
        yield self.inThread(self.connect, "submission", "127.0.0.1", 421)
        yield self.inThread(self.connect, "submissions", "127.0.0.2")
        yield self.inThread(self.connect, "submissions", "127.0.0.3", 421)
        self.assertEqual(
            [re.sub(SESSION, "", m) for m in self.log.matching("^refused conn")],
            [
                "refused connection: client=[127.0.0.1] listener=submission "
                "reason=too_many_from_address",
                "refused connection: client=[127.0.0.3] listener=submissions reason=too_many",
            ],
        )


class ListenerLineTests(unittest.TestCase):
    """At start, each listener is named with its configuration and address."""

    def test_listening(self) -> None:
        """
        One line per listener and for [metrics], with the address it got
        and its endpoint, TLS, AUTH and PROXY modes; none before every
        port listens.
        """
        daemon = Daemon(
            self.mktemp(),
            settings={
                "metrics": {"endpoint": "tcp:0:interface=127.0.0.1"},
                "listener:mx": {
                    "endpoint": "tcp:0:interface=127.0.0.1",
                    "tls": "none",
                    "auth": "none",
                    "proxy_protocol": "v2",
                    "trusted_proxies": "127.0.0.1",
                },
            },
        )
        log = LogWatcher()
        self.addCleanup(log.stop)
        daemon.start()
        self.addCleanup(daemon.stop)
        self.assertEqual(
            log.matching("listening on"),
            [
                f"[listener:submission] listening on 127.0.0.1:{daemon.ports['submission']}: "
                "endpoint=tcp:0:interface=127.0.0.1 tls=starttls auth=required proxy_protocol=no",
                f"[listener:submissions] listening on 127.0.0.1:{daemon.ports['submissions']}: "
                "endpoint=tcp:0:interface=127.0.0.1 tls=implicit auth=required proxy_protocol=no",
                f"[listener:mx] listening on 127.0.0.1:{daemon.ports['mx']}: "
                "endpoint=tcp:0:interface=127.0.0.1 tls=none auth=none proxy_protocol=v2",
                f"[metrics] listening on 127.0.0.1:"
                f"{daemon.service.getServiceNamed('metrics')._waitingForPort.result.getHost().port}"
                ": "
                "endpoint=tcp:0:interface=127.0.0.1",
            ],
        )


class QueueDeleteTests(QueueTestMixin, unittest.TestCase):
    """C{mailauth queue delete}, run in another process, is logged by the daemon."""

    def test_deletedLogged(self) -> None:
        """
        A message the forwarder knew and that left the queue without it
        (C{mailauth queue delete}) is logged as deleted at its next scan,
        once; one it delivers is not.
        """
        events = QueueEvents()
        events.start(self)
        relay = FakeRelayConnector(self.reactor)
        relay.down = True
        service = QueueService(
            self.queue,
            relayConfig(),
            self.reactor,
            RecordingLocalDelivery(["example.org"]),
            runBlocking=runInline,
            connector=relay,
        )
        self.enqueue("m1")
        self.enqueue("m2")
        log = LogWatcher()
        self.addCleanup(log.stop)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertTrue(deleteMessage(self.directory, "m1"))
        self.reactor.advance(relayConfig().queue_interval)
        self.reactor.advance(relayConfig().queue_interval)
        self.assertEqual(
            log.matching("deleted"),
            ["queue: m1: deleted by another process (mailauth queue delete)"],
        )
        self.assertEqual(events.kinds("m1")[-1], "deleted")
        self.assertNotIn("deleted", events.kinds("m2"))


class FormatConfigTests(unittest.TestCase):
    """C{[server] log_format}."""

    def test_values(self) -> None:
        """text by default; json; anything else is one clear line."""
        base = Daemon(self.mktemp(), build=False).configPath
        with open(base) as f:
            text = f.read()
        self.assertEqual(configmod.loadText(text).server.log_format, "text")
        json_ = text.replace("[server]\n", "[server]\nlog_format = JSON\n")
        self.assertEqual(configmod.loadText(json_).server.log_format, "json")
        bad = text.replace("[server]\n", "[server]\nlog_format = xml\n")
        e = self.assertRaises(configmod.ConfigError, configmod.loadText, bad, "x.conf")
        self.assertEqual(
            e.problems, ("x.conf: [server] log_format: 'xml' is not one of: text, json",)
        )


class StandardOutputTests(unittest.TestCase):
    """L{twistdLogsToStandardOutput}: when the workers may write to twistd's output themselves."""

    def test_choice(self) -> None:
        """
        Only when twistd itself writes its text to standard output: C{-}
        or no file in the foreground; not a file, syslog, or a C{--logger}
        of the user's own (which must see every event).
        """
        cases = [
            ({"nodaemon": True, "logfile": "-"}, True),
            ({"nodaemon": True, "logfile": None}, True),
            ({"nodaemon": True, "logfile": "/var/log/mailauth.log"}, False),
            ({"nodaemon": False, "logfile": None}, False),
            ({"nodaemon": True, "logfile": "-", "syslog": True}, False),
            ({"nodaemon": True, "logfile": "-", "logger": print}, False),
        ]
        self.assertEqual(
            [twistdLogsToStandardOutput(options) for options, _ in cases],
            [expected for _, expected in cases],
        )


class JSONTwistdTests(unittest.TestCase):
    """C{[server] log_format = json} under a real twistd."""

    timeout = 90

    def test_jsonLines(self) -> None:
        """
        Every line twistd writes is one JSON object, Twisted's own ones
        too; a session's line carries its fields (client, session...),
        its level and namespace, and its text as the text format shows
        it, which eventFromJSON formats back.
        """
        daemon = Daemon(self.mktemp(), settings={"server": {"log_format": "json"}}, build=False)
        twistd = TwistdProcess(daemon.configPath, os.path.join(daemon.dir, "mailauth.log"))
        twistd.spawn()
        try:
            [port] = twistd.waitFor(r"\[listener:submissions\] listening on 127\.0\.0\.1:(\d+)")
            client = RawClient(int(port), tls=True)
            client.reply()
            client.ehlo()
            self.assertEqual(client.command(plain(BOB, b"wrong"))[0], 535)
            client.close()
            twistd.waitFor(r'"log_text": "disconnect: ')
        finally:
            twistd.kill()
        lines = twistd.log().splitlines()
        events = [json.loads(line) for line in lines]
        self.assertGreater(len(events), 5)
        [failure] = [e for e in events if e["log_format"].startswith("auth failure: ")]
        self.assertEqual(
            (failure["client"], failure["mechanism"], failure["login"]),
            ("127.0.0.1", "PLAIN", BOB.decode()),
        )
        self.assertEqual(
            (failure["log_namespace"], failure["log_level"]["name"]), ("mailauth.esmtp", "info")
        )
        self.assertEqual(
            failure["log_text"],
            f"auth failure: client=[127.0.0.1] mechanism=PLAIN "
            f"login=<{BOB.decode()}> session={failure['session']}",
        )
        [line] = [line for line in lines if '"auth failure: ' in line]
        self.assertEqual(formatEvent(eventFromJSON(line)), failure["log_text"])
        sessions = {e["session"] for e in events if e.get("client") == "127.0.0.1"}
        self.assertEqual(sessions, {failure["session"]})
        self.assertTrue(any("starting up" in e["log_text"] for e in events))

    def test_refusedWithSyslog(self) -> None:
        """JSON cannot go to syslog: twistd stops with one line saying so, not a traceback."""
        daemon = Daemon(self.mktemp(), settings={"server": {"log_format": "json"}}, build=False)
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "--nodaemon",
                "--pidfile=",
                "--syslog",
                "mailauth",
                "--config",
                daemon.configPath,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(
            "twistd mailauth: [server] log_format = json writes to --logfile; it does "
            "not work with --syslog",
            result.stdout + result.stderr,
        )
        self.assertNotIn("Traceback", result.stdout + result.stderr)


class _Thing:
    part = "an attribute"

    def __repr__(self) -> str:
        return "<thing {with} braces>"


def _twistdLine(event: dict):
    """The line twistd's own text observer (C{textFileLogObserver}) writes."""
    return formatEventAsClassicLogText(
        event, formatTime=lambda when: formatTime(when, timeFormatRFC3339)
    )


class ClassicTextTests(unittest.TestCase):
    """
    L{ClassicText} writes exactly the line twistd's text observer writes,
    for the formats mailauth logs and for every other kind Twisted takes.
    """

    def test_sameLines(self) -> None:
        try:
            raise ZeroDivisionError("boom")
        except ZeroDivisionError:
            failure = Failure()
        base = {
            "log_time": 1_700_000_000.25,
            "log_namespace": "mailauth.esmtp",
            "log_level": LogLevel.info,
        }
        events = [
            # Plain names, specs, conversions, braces and line breaks in values.
            {
                "log_format": "auth failure: client=[{client}] login=<{login}> n={n:5d}",
                "client": "192.0.2.7",
                "login": "bob@example.test",
                "n": 42,
            },
            {
                "log_format": "why={why!r} size={size:.2f} {{literal}}",
                "why": "a {b} c",
                "size": 3.14159,
            },
            {"log_format": "two\nlines: {text}", "text": "and\na third"},
            {"log_format": "a thing: {thing} {thing!s} {thing!r}", "thing": _Thing()},
            {"log_format": "unicode: {login}", "login": "jörg@bücher.example"},
            {"log_format": "system given", "log_system": "-"},
            {"log_format": "failed: {why}", "why": "boom", "log_failure": failure},
            # Not plain names: Twisted's formatting, as it is.
            {"log_format": "attribute: {thing.part}", "thing": _Thing()},
            {"log_format": "call: {thing()}", "thing": lambda: "called"},
            {"log_format": "index: {items[0]}", "items": ["first"]},
            {"log_format": "positional: {0} {}"},
            {"log_format": "missing: {nobody}"},
            {"log_format": "nested spec: {n:{width}}", "n": 7, "width": 4},
            {"log_format": b"bytes: {login}", "login": "x"},
            {"log_format": "broken {"},
            {"log_format": "no fields at all"},
            {"message": ("legacy",), "log_format": None},
            {},
        ]
        text = ClassicText()
        for extra in events:
            event = dict(base, **extra)
            self.assertEqual(text(event), _twistdLine(event), extra)
        # Without a time, a level or a namespace.
        for event in ({"log_format": "bare {x}", "x": 1}, {"log_format": "bare"}):
            self.assertEqual(text(event), _twistdLine(event))

    def test_timeAsTwistd(self) -> None:
        """
        The time is made once a second, and is twistd's: within a second,
        in the microsecond where it rounds up to the next second, at the
        next second, and when the clock steps back.
        """
        text = ClassicText()
        base = 1_700_000_000
        for when in (
            base + 0.1,
            base + 0.75,
            base + 0.9999996,
            base + 0.1,
            base + 1.0,
            base + 1.5,
            base - 3600.25,
            None,
        ):
            self.assertEqual(
                text.formatTime(when), formatTime(when, timeFormatRFC3339, default="-")
            )
            event = {"log_time": when, "log_format": "x {y}", "y": 1}
            self.assertEqual(text(event), _twistdLine(event))
