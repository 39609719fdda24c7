"""A real redis-server from Debian for the tests, run unprivileged in a temporary folder."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

MISSING = "redis-server is not installed: apt-get install redis-server"

# How long redis-server may take to start answering or to exit.
STARTUP_TIMEOUT = 20.0


def freePort() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """
    One redis-server process listening on 127.0.0.1 (a free TCP port) and on
    a unix socket, keeping nothing on disk. It can be stopped and started
    again on the same addresses, and paused (SIGSTOP) to play a Redis that
    hangs.

    @ivar url: its C{redis://127.0.0.1:PORT/0} URL.
    @ivar unixURL: its C{unix:///PATH?db=0} URL.
    """

    def __init__(self, binary: str, directory: str) -> None:
        self.binary = binary
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        # A unix socket path must stay under ~100 bytes; trial's folders
        # can be longer.
        self._socketDir = tempfile.mkdtemp(prefix="redis-")
        self.socketPath = os.path.join(self._socketDir, "redis.sock")
        self.port = freePort()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.unixURL = f"unix://{self.socketPath}?db=0"
        self.logPath = os.path.join(self.directory, "redis.log")
        self.process: subprocess.Popen | None = None
        self.paused = False

    def start(self) -> None:
        """Start redis-server and wait until it answers PING."""
        self.process = subprocess.Popen(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--unixsocket",
                self.socketPath,
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
                "--logfile",
                self.logPath,
                "--daemonize",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        probe = self.client()
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited at once: {self.log()}")
                try:
                    if probe.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer in time: {self.log()}")
                time.sleep(0.01)
        finally:
            probe.connection_pool.disconnect()

    def stop(self, save: bool = False) -> None:
        """
        Stop redis-server (continuing it first if paused) and wait for it
        to exit.

        @param save: write its data to disk first, so that L{start} brings
            it back, as a Redis with persistence would.
        """
        if self.process is None:
            return
        if self.paused:
            self.resume()
        if save:
            client = self.client()
            try:
                client.shutdown(save=True)
            except redis.ConnectionError:
                pass  # redis-py >= 5 swallows the dropped connection itself
            finally:
                client.connection_pool.disconnect()
        else:
            self.process.terminate()
        try:
            self.process.wait(STARTUP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def pause(self) -> None:
        """Stop the process with SIGSTOP: connections stay open, nothing answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """Let a paused process run again (SIGCONT)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)
        self.paused = False

    def client(self) -> redis.Redis:
        """
        A plain client on the unix socket, to look at what is stored; close
        it with C{client.connection_pool.disconnect()}.
        """
        # No retries: redis-py >= 6 would retry a SHUTDOWN for seconds.
        return redis.Redis(
            unix_socket_path=self.socketPath, socket_timeout=5, retry=Retry(NoBackoff(), 0)
        )

    def log(self) -> str:
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return "(no log)"

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._socketDir, ignore_errors=True)


def startRedis(testCase) -> RedisServer:
    """
    Start a L{RedisServer} in a temporary folder of C{testCase}, stopped and
    removed when the test ends. Fails the test (never skips it) when
    redis-server is not installed.
    """
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/sbin")
    if binary is None:
        testCase.fail(MISSING)
    server = RedisServer(binary, testCase.mktemp())
    testCase.addCleanup(server.cleanup)
    server.start()
    return server
