"""
A private PostgreSQL server for tests: Debian's own binaries, run as an
unprivileged user in a temporary folder, reachable only through a Unix
socket in that folder and 127.0.0.1 on a free port.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, Optional, Sequence
from urllib.parse import quote

from twisted.trial.unittest import FailTest

# The cluster's superuser, and the OS user the server runs as when the tests
# run as root (initdb and postgres refuse to run as root).
SUPERUSER = "postgres"
OS_USER = "postgres"

# Memory-backed where there is such a folder: the clusters are thrown away.
_FAST = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

_SETTINGS = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{sockets}'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 50
shared_buffers = 16MB
logging_collector = off
"""


def binaries(root: str = "/usr/lib/postgresql") -> str:
    """
    @param root: where Debian installs each PostgreSQL version's programs.
    @return: the folder holding the server's programs, of the newest
        version installed.
    @raise FailTest: if there is none: the tests need the real server.
    """
    versions = [name for name in os.listdir(root) if name.isdigit()] if os.path.isdir(root) else []
    found = [v for v in versions if os.path.exists(os.path.join(root, v, "bin", "postgres"))]
    if not found:
        raise FailTest(f"no PostgreSQL server in {root}/*/bin: apt-get install postgresql")
    return os.path.join(root, max(found, key=int), "bin")


def driver() -> Any:
    """
    @return: the psycopg2 module.
    @raise FailTest: if it is missing.
    """
    try:
        import psycopg2
    except ImportError:
        raise FailTest(
            "psycopg2 is missing: apt-get install python3-psycopg2,"
            " or pip install psycopg2-binary (the test extra)"
        ) from None
    return psycopg2


def _freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _owner() -> Optional[pwd.struct_passwd]:
    """The user to run the server as, or L{None} to run it as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(OS_USER)
    except KeyError:
        raise FailTest(
            f"running as root, and there is no {OS_USER!r} user to run PostgreSQL as:"
            " apt-get install postgresql"
        ) from None


def _run(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a server binary as the unprivileged user; raise with its output if it fails."""
    if _owner() is not None:
        argv = ["runuser", "-u", OS_USER, "--", *argv]
    result = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, **kwargs
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result


def _chown(path: str) -> None:
    owner = _owner()
    if owner is not None:
        subprocess.run(["chown", "-R", f"{owner.pw_uid}:{owner.pw_gid}", path], check=True)


_template: Optional[str] = None


def _templateCluster() -> str:
    """
    A freshly initialised data folder, made once per process and copied for
    each server (initdb takes a second; a copy a few milliseconds).
    """
    global _template
    if _template is None:
        initdb = os.path.join(binaries(), "initdb")
        top = tempfile.mkdtemp(prefix="mailauth-pgtemplate-", dir=_FAST)
        atexit.register(shutil.rmtree, top, True)
        os.chmod(top, 0o755)
        _chown(top)
        data = os.path.join(top, "data")
        _run(
            [
                initdb,
                "-D",
                data,
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ]
        )
        _template = data
    return _template


class PostgreSQLServer:
    """
    One private PostgreSQL cluster in a temporary folder (with a short
    name, in C{/dev/shm} or C{/tmp}, because a Unix socket path has at most
    107 bytes).

    @ivar sockets: the folder of its Unix socket.
    @ivar port: its TCP port on 127.0.0.1 (and the number in the socket's name).
    """

    def __init__(self) -> None:
        self.top = tempfile.mkdtemp(prefix="mailauth-pg-", dir=_FAST)
        os.chmod(self.top, 0o755)
        self.data = os.path.join(self.top, "data")
        self.sockets = os.path.join(self.top, "run")
        self.log = os.path.join(self.top, "server.log")
        self.port = _freePort()
        self.running = False
        self._databases = 0
        subprocess.run(["cp", "-a", _templateCluster(), self.data], check=True)
        os.mkdir(self.sockets)
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(_SETTINGS.format(port=self.port, sockets=self.sockets))
        _chown(self.top)

    def start(self) -> None:
        """
        Start the server and wait until it accepts connections.

        It runs as a child of this process that gets SIGINT (a fast
        shutdown) if this process dies, so that a test run that is killed
        leaves no server behind.
        """
        credentials = []
        owner = _owner()
        if owner is not None:
            credentials = [
                "--reuid",
                str(owner.pw_uid),
                "--regid",
                str(owner.pw_gid),
                "--clear-groups",
            ]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    "setpriv",
                    *credentials,
                    "--pdeathsig",
                    "INT",
                    "--",
                    os.path.join(binaries(), "postgres"),
                    "-D",
                    self.data,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.running = True
        self._waitReady()

    def _waitReady(self, limit: float = 60) -> None:
        """
        Wait until the server says it is ready, in C{postmaster.pid}, as
        C{pg_ctl -w} does.
        """
        deadline = time.monotonic() + limit
        pidfile = os.path.join(self.data, "postmaster.pid")
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.running = False
                raise RuntimeError(
                    f"postgres exited {self.process.returncode}:\n{self.serverLog()}"
                )
            try:
                with open(pidfile) as f:
                    lines = f.read().splitlines()
            except FileNotFoundError:
                lines = []
            if (
                len(lines) >= 8
                and int(lines[0]) == self.process.pid
                and lines[7].strip() == "ready"
            ):
                return
            time.sleep(0.01)
        raise RuntimeError(f"postgres not ready after {limit}s:\n{self.serverLog()}")

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are ended) and wait for it."""
        self.resume()
        self.process.send_signal(signal.SIGINT)
        self.process.wait(60)
        self.running = False

    def destroy(self) -> None:
        """Stop the server if it runs, and remove its folder."""
        if self.running:
            self.stop()
        shutil.rmtree(self.top, ignore_errors=True)

    def serverLog(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()
        except OSError:
            return ""

    def _processes(self) -> list[int]:
        """The postmaster and every process it started."""
        postmaster = self.process.pid
        pids = [postmaster]
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                with open(stat) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                pids.append(int(stat.split("/")[2]))
        return pids

    def pause(self) -> None:
        """
        Freeze the server and its sessions (SIGSTOP): connections stay open
        and every query hangs, as with a hung host.
        """
        self._paused = self._processes()
        for pid in self._paused:
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Undo L{pause}."""
        for pid in getattr(self, "_paused", []):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self._paused = []

    def uri(self, database: str, tcp: bool = False) -> str:
        """
        @return: a libpq URI for C{database} as the superuser: through the
            Unix socket, or with C{tcp} through 127.0.0.1.
        """
        if tcp:
            return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"
        return (
            f"postgresql:///{database}?host={quote(self.sockets, safe='/')}"
            f"&port={self.port}&user={SUPERUSER}"
        )

    def connect(self, database: str = "postgres") -> Any:
        """A psycopg2 connection (autocommit) to C{database}, as the superuser."""
        connection = driver().connect(self.uri(database))
        connection.autocommit = True
        return connection

    def execute(self, database: str, sql: str, params: Sequence[Any] = ()) -> list:
        """
        Run one statement in C{database}.

        @return: its rows, or C{[]} if it returns none.
        """
        connection = self.connect(database)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall() if cursor.description is not None else []
        finally:
            connection.close()

    def createDatabase(self) -> str:
        """
        Make a new, empty database.

        @return: its name.
        """
        self._databases += 1
        name = f"test{self._databases}"
        self.execute("postgres", f"CREATE DATABASE {name}")
        return name


_shared: Optional[PostgreSQLServer] = None


def sharedServer() -> PostgreSQLServer:
    """
    The server this test process shares between the tests that neither stop
    nor pause it (each makes its own database); started on first use,
    stopped when the process exits.
    """
    global _shared
    if _shared is None:
        server = PostgreSQLServer()
        atexit.register(server.destroy)
        server.start()
        _shared = server
    return _shared


def privateServer(testCase: Any) -> PostgreSQLServer:
    """
    A server of C{testCase}'s own, which it may stop, restart or pause; it
    is stopped and removed when the test ends.
    """
    server = PostgreSQLServer()
    testCase.addCleanup(server.destroy)
    server.start()
    return server
