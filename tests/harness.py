"""
The test harness for the running daemon: the real service built from a
configuration in a temporary directory (L{Daemon}), the mixins that start
it, a reactor whose clock the test drives (L{ClockedReactor}), raw and
library clients, and a log watcher. Every test of the running daemon uses
this module instead of importing another test module.
"""

from __future__ import annotations

import base64
import configparser
import glob
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from typing import Optional

from twisted.internet import defer, reactor, tcp, threads
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent, globalLogPublisher

from mailauth import config as configmod
from mailauth import tap
from mailauth.spool import Queue
from tests.support import writeCertificate

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VECTORS = os.path.join(HERE, "data", "dovecot-passwd")
PASSWORD = "alice-secret-1"
SHA512 = "alice.sha512-crypt@example.test"
CRAM = "alice.cram-md5@example.test"

CONFIG = """
[server]
hostname = mx.example.test
state_dir = {dir}/state
max_message_size = 1M

[tls]
certificate = {dir}/tls/cert.pem
private_key = {dir}/tls/key.pem

[listener:submission]
endpoint = tcp:0:interface=127.0.0.1
tls = starttls
auth = required

[listener:submissions]
endpoint = tcp:0:interface=127.0.0.1
tls = implicit
auth = required

[auth]
mechanisms = PLAIN LOGIN CRAM-MD5
users = {dir}/users

[delivery]
local_domains = example.test
maildir = {dir}/mail/{{domain}}/{{localpart}}/Maildir
"""

# As mail clients send it: with its Date and Message-ID, so that nothing
# is added to it on its way.
MESSAGE = (
    b"From: alice <" + SHA512.encode() + b">\r\n"
    b"To: bob@example.test\r\n"
    b"Subject: end to end\r\n"
    b"Date: Sun, 29 Nov 2026 15:23:31 +0100\r\n"
    b"Message-ID: <e2e.1@client.example>\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    b"8bit: \xc3\xa4\r\n"
)

RECEIVED = re.compile(
    rb"^Return-Path: <(?P<sender>[^>]*)>\n"
    rb"Received: from client\.example \(\[127\.0\.0\.1\]\)\n"
    rb"\t\(authenticated as (?P<login>[^)]+)\)\n"
    rb"\tby mx\.example\.test \(mailauth\) with ESMTPSA id (?P<id>[0-9A-F]{12})\n"
    rb"\t\(using TLSv1\.[23] with cipher [A-Z0-9_-]+\)\n"
    rb"\tfor <bob@example\.test>; .+\n"
)


def clientContext() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def smtpClient(port: int, implicit: bool = False, source: str = "") -> smtplib.SMTP:
    """
    (Blocking.) An smtplib client of 127.0.0.1:C{port}, connected and
    greeted: over implicit TLS (not verifying the test certificate) when
    C{implicit}, else in the clear (STARTTLS is the caller's); from
    C{source} when given.
    """
    address = (source, 0) if source else None
    if implicit:
        return smtplib.SMTP_SSL(
            "127.0.0.1",
            port,
            local_hostname="client.example",
            context=clientContext(),
            timeout=30,
            source_address=address,
        )
    return smtplib.SMTP(
        "127.0.0.1", port, local_hostname="client.example", timeout=30, source_address=address
    )


class EndToEndMixin:
    def setUp(self):
        self.daemon = Daemon(self.mktemp())
        self.addCleanup(self.daemon.stop)
        self.daemon.start()

    def inThread(self, f, *args):
        return threads.deferToThread(f, *args)

    def reload(self) -> defer.Deferred:
        """Send this process SIGHUP; the Deferred fires once the daemon has reloaded."""
        watcher = LogWatcher()
        d = watcher.waitFor("SIGHUP: reloading")
        os.kill(os.getpid(), signal.SIGHUP)
        return d.addBoth(lambda result: watcher.stop() or result)

    def submit(
        self,
        listener: str,
        mechanism: str,
        login: str,
        password: str,
        message: bytes = MESSAGE,
        sender: str = None,
        recipients=("bob@example.test",),
    ):
        """Send one message with smtplib in a thread; the Deferred fires with sendmail's result."""
        port = self.daemon.ports[listener]

        def run():
            client = smtpClient(port, implicit=listener == "submissions")
            try:
                client.ehlo()
                if listener == "submission":
                    client.starttls(context=clientContext())
                    client.ehlo()
                client.user, client.password = login, password
                authobject = {
                    "PLAIN": client.auth_plain,
                    "LOGIN": client.auth_login,
                    "CRAM-MD5": client.auth_cram_md5,
                }[mechanism]
                client.auth(mechanism, authobject, initial_response_ok=(mechanism != "LOGIN"))
                return client.sendmail(sender or login, list(recipients), message)
            finally:
                client.quit()

        return self.inThread(run)


BOB = b"bob@example.test"
BOB_PASSWORD = b"bob-secret-2"
# Users of the vectors file whose hashes are cheap to check (no argon2), so
# failed logins cost the tests nothing; their password is PASSWORD.
CHEAP_USERS = (
    b"alice.plain@example.test",
    b"alice.clear@example.test",
    b"alice.cram-md5@example.test",
    b"alice.sha256-crypt@example.test",
)


def plain(login: bytes, password: bytes, authzid: bytes = b"") -> bytes:
    """An C{AUTH PLAIN} command line with its initial response."""
    return b"AUTH PLAIN " + base64.b64encode(authzid + b"\0" + login + b"\0" + password)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@defer.inlineCallbacks
def serverConnectionsClosed(timeout: float = 10.0):
    """
    Wait until the reactor holds no accepted connection: every client of a
    test has closed and the server has seen it. A server that keeps a
    connection open after its client left fails the test here.
    """
    deadline = time.monotonic() + timeout
    while True:
        open_ = [
            s for s in reactor.getReaders() + reactor.getWriters() if isinstance(s, tcp.Server)
        ]
        if not open_:
            return
        if time.monotonic() > deadline:
            for s in open_:
                s.abortConnection()
            raise AssertionError(f"server connections still open: {open_}")
        yield deferLater(reactor, 0.01, lambda: None)


class AttackMixin:
    """
    Starts a L{Daemon} from the class's C{settings} and C{files}; C{clocked}
    builds it on a L{ClockedReactor} with C{self.clock}.
    """

    settings: dict = {}
    files: dict = {}
    clocked = False

    def setUp(self):
        self.clock = Clock()
        self.daemon = Daemon(
            self.mktemp(),
            self.settings,
            self.files,
            ClockedReactor(self.clock) if self.clocked else reactor,
        )
        self.addCleanup(self.daemon.stop)
        self.daemon.start()
        self.log = LogWatcher()
        self.addCleanup(self.log.stop)
        self.clients: list = []
        self.addCleanup(self._closeClients)

    def _closeClients(self):
        for client in self.clients:
            client.close()

    def inThread(self, f, *args):
        return threads.deferToThread(f, *args)

    def connect(
        self, listener: str = "submissions", source: str = "127.0.0.1", expect: int = 220
    ) -> RawClient:
        """
        (Blocking: call in a thread.) A client whose greeting was read and
        had code C{expect}.
        """
        client = RawClient(
            self.daemon.ports[listener], source=source, tls=self.tlsMode(listener) == "implicit"
        )
        self.clients.append(client)
        code, text = client.reply()
        assert code == expect, (code, text)
        return client

    def tlsMode(self, listener: str) -> str:
        [mode] = [each.tls for each in self.daemon.config.listeners if each.name == listener]
        return mode

    def loggedIn(
        self,
        listener: str = "submissions",
        source: str = "127.0.0.1",
        login: bytes = BOB,
        password: bytes = BOB_PASSWORD,
    ) -> RawClient:
        """(Blocking.) A client that said EHLO and authenticated."""
        client = self.connect(listener, source)
        if self.tlsMode(listener) == "starttls":
            client.ehlo()
            client.starttls()
        client.ehlo()
        code, text = client.command(plain(login, password))
        assert code == 235, (code, text)
        return client


class Daemon:
    """
    The real service tree (L{mailauth.tap.buildService}) built from a
    configuration file in a temporary directory, listening on 127.0.0.1 port 0.

    @param settings: C{{section: {key: value}}} merged into the base
        configuration (C{{dir}} in a value is the daemon's directory); a
        value of L{None} removes the key, a section of L{None} the section.
    @param files: C{{name: text}} written into the directory first (aliases,
        sender maps).
    @param reactor: what the service is built on, e.g. a L{ClockedReactor}.
    @param extra: configuration text appended to the base configuration.
    @param build: build the service; without it only the files are
        written (for a configuration the daemon must refuse).
    """

    def __init__(
        self,
        directory: str,
        settings=None,
        files=None,
        reactor=reactor,
        extra: str = "",
        build: bool = True,
    ) -> None:
        self.dir = directory = os.path.abspath(directory)
        self.configPath = writeDaemonDirectory(directory, settings, files, extra)
        if build:
            self.config = configmod.load(self.configPath)
            self.service = tap.buildService(self.config, reactor)

    def start(self) -> None:
        self.service.startService()
        self.ports = {}
        for listener in self.config.listeners:
            svc = self.service.getServiceNamed(f"listener:{listener.name}")
            found = []
            # TCP listens at once; keep the port as the Deferred's result so
            # that stopService can still close it.
            svc._waitingForPort.addCallback(lambda port, found=found: found.append(port) or port)
            host = found[0].getHost()
            # A TCP port's number; a unix: listener's socket path.
            self.ports[listener.name] = getattr(host, "port", None) or os.fsdecode(host.name)

    @defer.inlineCallbacks
    def stop(self):
        yield defer.maybeDeferred(self.service.stopService)
        yield serverConnectionsClosed()

    def maildir(self, login: str) -> str:
        local, domain = login.split("@")
        return os.path.join(self.dir, "mail", domain, local, "Maildir")

    def delivered(self, login: str) -> list:
        files = sorted(glob.glob(os.path.join(self.maildir(login), "new", "*")))
        out = []
        for name in files:
            with open(name, "rb") as f:
                out.append((name, f.read()))
        return out

    def files(self, login: str, folder: str = "new") -> list:
        return glob.glob(os.path.join(self.maildir(login), folder, "*"))

    def allDelivered(self) -> list:
        """
        Every file in every Maildir's new/ and tmp/, every message in the
        forward queue and every file being written to it.
        """
        found = glob.glob(os.path.join(self.dir, "mail", "*", "*", "Maildir", "*", "*"))
        queueDir = os.path.join(self.config.server.state_dir, "queue")
        if os.path.isdir(queueDir):
            found += [
                f"queued {msgid}"
                for msgid in Queue(queueDir, Clock(), "x").scan(frozenset()).present
            ]
            found += glob.glob(os.path.join(queueDir, "tmp", "*"))
        return sorted(found)


def writeDaemonDirectory(directory: str, settings=None, files=None, extra: str = "") -> str:
    """
    Make C{directory} (which must not exist) a daemon's home, as L{Daemon}
    describes its parameters: a certificate, the users, the configuration.

    @return: the configuration file's path.
    """
    directory = os.path.abspath(directory)
    os.makedirs(directory)
    writeCertificate(os.path.join(directory, "tls"))
    shutil.copy(VECTORS, os.path.join(directory, "users"))
    with open(os.path.join(directory, "users"), "a") as f:
        f.write("bob@example.test:{PLAIN}bob-secret-2\n")
    configPath = os.path.join(directory, "mailauth.conf")
    with open(configPath, "w") as f:
        f.write(CONFIG.format(dir=directory) + extra)
    for name, text in (files or {}).items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)
    if settings:
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(configPath)
        for section, values in settings.items():
            if values is None:
                parser.remove_section(section)
                continue
            if not parser.has_section(section):
                parser.add_section(section)
            for key, value in values.items():
                if value is None:
                    parser.remove_option(section, key)
                else:
                    parser.set(section, key, value.replace("{dir}", directory))
        with open(configPath, "w") as f:
            parser.write(f)
    return configPath


class ClockedReactor:
    """
    The real reactor for sockets and threads, with a L{task.Clock} for time:
    the real service built on it listens on real ports, while its timers
    (idle timeouts, tarpit delays, blocks) move only when the test advances
    the clock, so no test has to sleep.
    """

    def __init__(self, clock, reactor=reactor) -> None:
        self.clock = clock
        self.reactor = reactor

    def callLater(self, delay, f, *args, **kwargs):
        return self.clock.callLater(delay, f, *args, **kwargs)

    def seconds(self) -> float:
        return self.clock.seconds()

    def getDelayedCalls(self):
        return self.clock.getDelayedCalls()

    def __getattr__(self, name):
        return getattr(self.reactor, name)


def insecureContext() -> ssl.SSLContext:
    """A client TLS context that accepts the test certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class RawClient:
    """
    A blocking SMTP client on a raw socket, for use in a thread: it sends
    exactly the bytes it is given and returns replies as they arrive, so
    tests can send what no well-behaved client library would.

    @ivar lines: every reply line received so far, in order.
    """

    def __init__(
        self,
        port: int,
        source: str = "127.0.0.1",
        tls: bool = False,
        timeout: float = 10.0,
        host: str = "127.0.0.1",
        unix: str = "",
    ) -> None:
        if unix:
            # A unix: listener, at the socket path C{unix}.
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(unix)
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.bind((source, 0))
            sock.connect((host, port))
        self.timeout = timeout
        if tls:
            sock = insecureContext().wrap_socket(sock)
        self.sock = sock
        self._buffer = b""
        self.lines: list = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readLine(self) -> bytes:
        """One reply line without its CRLF; C{b""} at end of stream."""
        while b"\r\n" not in self._buffer:
            data = self.sock.recv(65536)
            if not data:
                rest, self._buffer = self._buffer, b""
                return rest
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        self.lines.append(line)
        return line

    def reply(self) -> tuple:
        """
        One whole reply.

        @return: C{(code, [text of each line])}; C{(None, [])} if the
            server closed the connection first.
        """
        texts = []
        while True:
            line = self.readLine()
            if not line:
                return None, texts
            texts.append(line[4:])
            if line[3:4] != b"-":
                return int(line[:3]), texts

    def command(self, line: bytes) -> tuple:
        self.send(line + b"\r\n")
        return self.reply()

    def ehlo(self, name: bytes = b"client.example") -> tuple:
        return self.command(b"EHLO " + name)

    def starttls(self) -> None:
        """STARTTLS and the handshake; the caller says EHLO again."""
        code, text = self.command(b"STARTTLS")
        assert code == 220, (code, text)
        self.sock = insecureContext().wrap_socket(self.sock)

    def pending(self) -> bool:
        """
        Whether the server sent anything (or closed) that was not read yet.
        Never blocks; TLS records that carry no data (session tickets) do
        not count.
        """
        if self._buffer:
            return True
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(65536)
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        finally:
            self.sock.settimeout(self.timeout)
        self._buffer += data
        return True

    def closedByServer(self) -> bool:
        """
        Read to the end of the stream: True if the server closed it (or cut
        it off), False if it was still open when the socket timed out.
        """
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self._buffer += data
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class LogWatcher:
    """
    Collects what the process logs (the in-process daemon logs through the
    global log publisher) and lets a test wait for a line.

    @ivar messages: every formatted log message, in order.
    """

    def __init__(self) -> None:
        self.messages: list = []
        self.events: list = []
        self._waiting: list = []
        globalLogPublisher.addObserver(self)

    def stop(self) -> None:
        globalLogPublisher.removeObserver(self)

    def __call__(self, event) -> None:
        text = formatEvent(event)
        self.messages.append(text)
        self.events.append(event)
        for pattern, d in list(self._waiting):
            if re.search(pattern, text):
                self._waiting.remove((pattern, d))
                # Fire after the code that logged has finished its work.
                reactor.callLater(0, d.callback, text)

    def waitFor(self, pattern: str) -> defer.Deferred:
        """A Deferred that fires with the first message matching C{pattern} from now on."""
        d = defer.Deferred()
        self._waiting.append((pattern, d))
        return d

    def matching(self, pattern: str) -> list:
        return [m for m in self.messages if re.search(pattern, m)]


class TwistdProcess:
    """
    C{twistd --nodaemon mailauth --config PATH} as a child process of the
    test (on this test run's Python and Twisted), its log in a file, for
    what only a whole daemon shows: worker processes, signals, privileges.
    Every method blocks; the daemon is another process, so a test may call
    them on the reactor thread.

    @ivar ports: once started with workers: C{{listener name: port}} from
        the parent's C{[listener:NAME] listening on HOST:PORT} lines.
    """

    def __init__(
        self,
        configPath: str,
        logPath: str,
        twistdArgs=(),
        env=None,
        prelude: str = "",
        standardOutput: bool = False,
    ) -> None:
        """
        @param prelude: Python statements the daemon's process runs before
            twistd (each ended by C{;}).
        @param standardOutput: log as under systemd, C{--logfile=-}, with
            standard output and error written to C{logPath}; by default
            C{--logfile=logPath}.
        """
        self.configPath = configPath
        self.logPath = logPath
        self.standardOutput = standardOutput
        self.twistdArgs = tuple(twistdArgs)
        self.env = env
        self.prelude = prelude
        self.process = None
        self.ports: dict = {}
        self._output = ""
        # The NOTIFY_SOCKET it is started with (as systemd's Type=notify),
        # unless env has one; open until it has ended.
        self._notify: Optional[socket.socket] = None
        self._received: list = []

    def argv(self, pidfile: Optional[str] = None) -> list:
        """
        @param pidfile: run as a daemon with this pid file; by default in
            the foreground, with none.
        """
        # twistd's own entry point, so that Debian's python3 (no twistd on
        # its path, twistd3 instead) and a virtualenv run the same way.
        mode = ["--nodaemon", "--pidfile="] if pidfile is None else ["--pidfile", pidfile]
        return [
            sys.executable,
            "-c",
            self.prelude
            + "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
            *mode,
            "--logfile=-" if self.standardOutput else f"--logfile={self.logPath}",
            *self.twistdArgs,
            "mailauth",
            "--config",
            self.configPath,
        ]

    def start(self, workers: int = 1, timeout: float = 60.0) -> None:
        """
        Start it and wait until C{workers} workers serve; for 1, until it
        sends C{READY=1} (it listens and its reactor runs).
        """
        self.spawn()
        if workers > 1:
            self.waitForLog(r"worker \d+ \(pid \d+\) is serving", count=workers, timeout=timeout)
            for name, port in re.findall(r"\[listener:(\S+)\] listening on \S+:(\d+)", self.log()):
                self.ports[name] = int(port)
        elif "NOTIFY_SOCKET" in (os.environ if self.env is None else self.env):
            self.waitForLog(r"starting on \d+", timeout=timeout)
        else:
            # twistd logs "starting on" before its reactor runs, when a
            # SIGTERM would still kill it without its handlers: wait, as
            # systemd does, for READY=1, sent once the reactor runs.
            self._waitUntil(
                lambda: self._notices("READY=1"), 1, "no READY=1 on its NOTIFY_SOCKET", timeout
            )

    def _notices(self, assignment: str) -> list:
        """The sd_notify messages received so far that hold C{assignment}."""
        self._drain()
        return [m for m in self._received if assignment in m.split("\n")]

    def _drain(self) -> None:
        """Read the sd_notify messages waiting on its NOTIFY_SOCKET."""
        while True:
            try:
                self._received.append(self._notify.recv(4096).decode("utf-8"))
            except BlockingIOError:
                return

    def _environment(self) -> dict:
        path = [p for p in (ROOT, os.environ.get("PYTHONPATH")) if p]
        environ = dict(os.environ if self.env is None else self.env)
        environ["PYTHONPATH"] = os.pathsep.join(path)
        if "NOTIFY_SOCKET" not in environ:
            if self._notify is None:
                # A name in the abstract namespace: no file, no path length.
                self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._notify.bind(f"\0mailauth-test-{os.getpid()}-{id(self)}")
                self._notify.setblocking(False)
            environ["NOTIFY_SOCKET"] = "@" + self._notify.getsockname()[1:].decode()
        return environ

    def spawn(self) -> None:
        """Start it, without waiting (again after it ended: a restart)."""
        self._output = ""
        if self._notify is not None:
            self._drain()  # an earlier run's (not waited for), to be forgotten
        self._received = []
        if self.standardOutput:
            with open(self.logPath, "ab") as out:
                self.process = subprocess.Popen(
                    self.argv(),
                    cwd=ROOT,
                    env=self._environment(),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            return
        self.process = subprocess.Popen(
            self.argv(),
            cwd=ROOT,
            env=self._environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def daemonize(self, pidfile: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run it as a daemon; what twistd's first process did (it returns once started)."""
        return subprocess.run(
            self.argv(pidfile),
            cwd=ROOT,
            env=self._environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def log(self) -> str:
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def waitForLog(self, pattern: str, count: int = 1, timeout: float = 30.0) -> list:
        """
        Wait until the log has C{count} lines matching C{pattern}; those lines.

        @raise AssertionError: with the log and the output, if the daemon
            exits or C{timeout} passes first.
        """
        return self._waitUntil(
            lambda: [line for line in self.log().splitlines() if re.search(pattern, line)],
            count,
            f"{count} x {pattern!r} not in the log",
            timeout,
        )

    def waitFor(self, pattern: str, timeout: float = 60.0) -> list:
        """
        Wait until the log matches C{pattern} (over lines or not).

        @return: every match (C{re.findall}).
        """
        return self._waitUntil(
            lambda: re.findall(pattern, self.log()), 1, f"{pattern!r} not in the log", timeout
        )

    def _waitUntil(self, find, count: int, what: str, timeout: float) -> list:
        """
        Poll C{find} until it returns C{count} items or more; those items.

        @raise AssertionError: with the log and the output, if the daemon
            exits or C{timeout} passes first.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = find()
            if len(found) >= count:
                return found
            status = self.process.poll()
            if status is not None or time.monotonic() > deadline:
                state = "still running" if status is None else f"exited with {status}"
                raise AssertionError(
                    f"{what} (daemon {state}):\n{self.log()[-6000:]}\n{self.output()}"
                )
            time.sleep(0.05)

    def kill(self, number: int = signal.SIGTERM) -> None:
        """Send signal C{number} (unless it has ended) and wait until it is gone."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(number)
        self.wait()

    def output(self) -> str:
        """The end of what the daemon wrote on stdout and stderr (once it has exited)."""
        if self.process is None or self.process.poll() is None:
            return ""
        self._collect()
        return self._output[-4000:]

    def _collect(self) -> None:
        # (With standardOutput, the output is in the log.)
        if self.process.stdout is not None and not self.process.stdout.closed:
            self._output += self.process.stdout.read().decode("utf-8", "replace")
            self.process.stdout.close()

    def workerPIDs(self) -> list:
        """The process ids of the daemon's children (its workers)."""
        return childProcesses(self.process.pid)

    def signal(self, number: int) -> None:
        os.kill(self.process.pid, number)

    def wait(self, timeout: float = 30.0) -> int:
        status = self.process.wait(timeout)
        self._ended()
        return status

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s; reaps it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._ended()

    def _ended(self) -> None:
        """What it wrote, read; its NOTIFY_SOCKET closed (a restart makes another)."""
        self._collect()
        if self._notify is not None:
            self._notify.close()
            self._notify = None


def childProcesses(pid: int) -> list:
    """The process ids whose parent is C{pid} (Linux /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == pid:
                        children.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return sorted(children)


def processAlive(pid: int) -> bool:
    """Whether C{pid} runs (a zombie, ended but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False
