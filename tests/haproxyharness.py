"""
The real HAProxy from Debian, started by a test in the foreground with a
configuration in a temporary folder, in front of mailauth listeners.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Optional

import attrs
from twisted.internet import defer
from twisted.internet.task import deferLater

HAPROXY = "/usr/sbin/haproxy"
SEND_PROXY = {"v1": "send-proxy", "v2": "send-proxy-v2"}


class HAProxyMissing(AssertionError):
    """No haproxy binary: the test fails (never skips) and says what to install."""


def findHAProxy() -> str:
    """
    @return: the path of the haproxy binary.
    @raise HAProxyMissing: naming the Debian package to install.
    """
    path = HAPROXY if os.access(HAPROXY, os.X_OK) else shutil.which("haproxy")
    if path is None:
        raise HAProxyMissing(f"{HAPROXY} not found: apt-get install haproxy")
    return path


@attrs.frozen
class Route:
    """
    One HAProxy frontend (TCP mode, on a socket the harness binds) and its
    backend of mailauth listeners.

    @ivar servers: C{(host, port)} of each backend server (round robin).
    @ivar proxy: C{"v1"} (C{send-proxy}) or C{"v2"} (C{send-proxy-v2}).
    @ivar check: C{"smtp"} (HAProxy's SMTP health check: greeting, then
        HELO), C{"tcp"} (connect only) or L{None} (no checks). Checks send
        the PROXY header too (C{check-send-proxy}): v2 a LOCAL command, v1
        a TCP4 line naming the check's own connection.
    """

    servers: tuple
    proxy: str = "v2"
    check: Optional[str] = "smtp"


class HAProxy:
    """
    A foreground haproxy process (C{-db}) whose frontends listen on
    127.0.0.1 sockets bound here (port 0, handed over as C{fd@N}, so there
    is no race for a free port).

    @ivar ports: the port of each route's frontend, by route name.
    @ivar logPath: haproxy's own output (its log goes to stdout).
    """

    def __init__(self, directory: str, routes: dict, source: str = "127.0.0.1") -> None:
        """
        @param routes: C{{name: Route}}.
        @param source: the address haproxy connects to the servers from.
        """
        self.binary = findHAProxy()
        self.dir = os.path.abspath(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.routes = routes
        self.source = source
        # A UNIX socket path holds at most ~100 bytes; a test's folder can be longer.
        self._socketDir = tempfile.mkdtemp(prefix="haproxy-")
        self.statsPath = os.path.join(self._socketDir, "stats.sock")
        self.configPath = os.path.join(self.dir, "haproxy.cfg")
        self.logPath = os.path.join(self.dir, "haproxy.log")
        self.ports: dict = {}
        self._sockets: dict = {}
        self.process: Optional[subprocess.Popen] = None

    def config(self) -> str:
        """The haproxy.cfg text (also a documentation example: it is what the tests run)."""
        lines = [
            "global",
            "    log stdout format raw local0 info",
            f"    stats socket {self.statsPath} mode 600 level admin",
            "    maxconn 1000",
            "",
            "defaults",
            "    mode tcp",
            "    log global",
            "    option tcplog",
            "    timeout connect 5s",
            "    timeout client 5m",
            "    timeout server 5m",
            "    timeout check 5s",
        ]
        for name, route in sorted(self.routes.items()):
            lines += [
                "",
                f"frontend fe_{name}",
                f"    bind fd@{self._sockets[name].fileno()}",
                f"    default_backend be_{name}",
                "",
                f"backend be_{name}",
                "    balance roundrobin",
                f"    source {self.source}",
            ]
            if route.check == "smtp":
                lines.append("    option smtpchk HELO haproxy.test")
            for i, (host, port) in enumerate(route.servers):
                server = f"    server s{i} {host}:{port} {SEND_PROXY[route.proxy]}"
                if route.check is not None:
                    server += " check check-send-proxy inter 1s rise 1 fall 3"
                lines.append(server)
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Bind the frontend sockets and start haproxy (it accepts once it has read them)."""
        for name in self.routes:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            self._sockets[name] = sock
            self.ports[name] = sock.getsockname()[1]
        with open(self.configPath, "w") as f:
            f.write(self.config())
        with open(self.logPath, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-db", "-f", self.configPath],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=[s.fileno() for s in self._sockets.values()],
                cwd=self.dir,
            )

    def output(self) -> str:
        with open(self.logPath, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stats(self) -> list:
        """
        (Blocking, briefly.) C{show stat} from the stats socket: one dict
        per frontend, backend and server row.
        """
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.statsPath)
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        header, *rows = data.decode().strip().splitlines()
        names = header.lstrip("# ").split(",")
        return [dict(zip(names, row.split(","))) for row in rows]

    @defer.inlineCallbacks
    def waitUntilChecked(self, reactor, timeout: float = 30.0):
        """
        Wait until every checked server has passed a health check (a Deferred).

        @raise AssertionError: if haproxy exits, or a check has not passed
            within C{timeout} seconds, with haproxy's output.
        """
        deadline = time.monotonic() + timeout
        passed = {"smtp": "L7OK", "tcp": "L4OK"}
        want = {
            (f"be_{name}", f"s{i}"): passed[route.check]
            for name, route in self.routes.items()
            if route.check is not None
            for i in range(len(route.servers))
        }
        seen: dict = {}
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"haproxy exited with {self.process.returncode}:\n" + self.output()
                )
            try:
                seen = {(row["pxname"], row["svname"]): row["check_status"] for row in self.stats()}
            except (OSError, ValueError):
                pass  # not listening on its stats socket yet
            if all(seen.get(key) == status for key, status in want.items()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"haproxy checks not passed: {seen}\n" + self.output())
            yield deferLater(reactor, 0.05, lambda: None)

    def stop(self) -> None:
        """Stop haproxy and close the frontend sockets."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        shutil.rmtree(self._socketDir, ignore_errors=True)
