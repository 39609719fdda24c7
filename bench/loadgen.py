"""
An SMTP submission load generator (stdlib asyncio and ssl only).

It speaks to any submission server: connect, EHLO, STARTTLS (or implicit
TLS), AUTH PLAIN or LOGIN, then MAIL/RCPT/DATA transactions in lock step,
checking the code of every reply. A wrong reply counts as a failure under
its code and ends that connection (a worker then opens a new one). At the
end it prints one JSON line.

Modes:

- C{send}: C{--concurrency} connections, each sending C{--messages}
  messages before QUIT and a new connection, until C{--time} seconds have
  passed or C{--total} messages are in.
- C{storm}: one authenticated client sends NOOPs (one every
  C{--noop-interval} seconds) while C{--concurrency} clients log in all at
  once; reports the NOOP latency the storm causes.
- C{idle}: opens C{--concurrency} connections, each parked after EHLO with
  TLS done (no AUTH), prints C{parked N} on stderr, holds them for
  C{--hold} seconds and closes them.

Times: "login" is connect to the 235 reply (banner, EHLO, STARTTLS, EHLO,
AUTH); "message" is MAIL FROM sent to the 250 after the final dot.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import errno
import json
import math
import os
import socket
import ssl
import subprocess
import sys
import time
from typing import Iterator, Optional

CRLF = b"\r\n"


class Failed(Exception):
    """A reply other than the expected one, or a broken connection."""

    def __init__(self, key: str, detail: str = "") -> None:
        super().__init__(key, detail)
        self.key = key
        self.detail = detail


class Stats:
    """What every connection of a run adds to: counts, failures, latencies."""

    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0
        self.failures: collections.Counter = collections.Counter()
        self.examples: dict = {}
        self.login: list = []
        self.message: list = []
        self.noop: list = []
        # (queue ID, wall-clock time) of every 250 after DATA, for --ids.
        self.accepted: list = []

    def fail(self, e: Failed) -> None:
        self.failures[e.key] += 1
        self.examples.setdefault(e.key, e.detail[:200])


def percentile(values: list, p: float) -> Optional[float]:
    """Nearest-rank percentile of C{values} in milliseconds, or L{None} for none."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
    return round(ordered[index] * 1000, 3)


def makeBody(size: int, sender: str, recipients: list) -> bytes:
    """
    A message of about C{size} bytes in SMTP wire form: 76-character lines,
    one in 32 starting with a dot (so dot-stuffing is exercised), stuffed
    and ended with C{CRLF . CRLF}.
    """
    header = (
        f"From: <{sender}>\r\nTo: {', '.join(f'<{r}>' for r in recipients)}\r\n"
        f"Subject: load test\r\nMessage-ID: <bench@loadgen>\r\n\r\n"
    ).encode("ascii")
    alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    lines = []
    for i in range(32):
        line = (alphabet[i:] + alphabet[:i]) * 2
        line = line[:76]
        if i == 7:
            line = b"." + line[1:]
        lines.append(line + CRLF)
    block = b"".join(lines)
    need = max(0, size - len(header))
    body = block * (need // len(block)) + b"".join(lines[: (need % len(block)) // 78])
    text = header + body
    if not text.endswith(CRLF):
        text += CRLF
    return text.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def clientContext(cafile: Optional[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    if cafile is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Stream:
    """
    One connection's socket, read and written from the event loop's
    callbacks, with TLS done by the ssl module on the socket itself.

    asyncio's streams run TLS through a layer of Python (the memory BIOs of
    C{sslproto}), and C{wait_for} makes a task per reply: at concurrency 50
    the load generator then spent about a third as much CPU per message as
    the servers it measured, on the same CPUs. This keeps it to the socket
    calls.
    """

    READ_SIZE = 1 << 18
    # A server that sends this much without a line end is not answering SMTP.
    MAX_LINE = 1 << 20

    def __init__(self, sock: socket.socket) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.fd = sock.fileno()
        self.buffer = bytearray()
        #: Why the connection ended (EOF, an error), or L{None} while it is open.
        self.closed: Optional[str] = None
        # Chunks waiting to be sent; the first may be half sent (TLS retries
        # must repeat it unchanged).
        self.out: collections.deque = collections.deque()
        self.readWaiter: Optional[asyncio.Future] = None
        self.writeWaiter: Optional[asyncio.Future] = None
        self.watchingWrites = False
        self.loop.add_reader(self.fd, self._readable)

    @classmethod
    async def connect(cls, address: tuple, source: Optional[str]) -> Stream:
        sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if source:
                sock.bind((source, 0))
            await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    @staticmethod
    def _wake(waiter: Optional[asyncio.Future]) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _end(self, why: str) -> None:
        if self.closed is None:
            self.closed = why
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
        self._wake(self.readWaiter)
        self._wake(self.writeWaiter)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(self.READ_SIZE)
            # TLS: what the ssl module already decrypted makes no socket event.
            while data and isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
                data += self.sock.recv(self.READ_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except (OSError, ssl.SSLError) as e:
            self._end(repr(e))
            return
        if not data:
            self._end("EOF")
            return
        self.buffer += data
        self._wake(self.readWaiter)

    async def readline(self) -> bytes:
        """The next line, CRLF included; L{ConnectionError} once the connection ends."""
        while True:
            end = self.buffer.find(CRLF)
            if end >= 0:
                line = bytes(self.buffer[: end + 2])
                del self.buffer[: end + 2]
                return line
            if self.closed is not None:
                raise ConnectionError(self.closed)
            if len(self.buffer) > self.MAX_LINE:
                raise ConnectionError(f"no line end in {len(self.buffer)} bytes")
            self.readWaiter = self.loop.create_future()
            await self.readWaiter

    def write(self, data) -> None:
        """Send C{data} (bytes or a memoryview) as soon as the socket takes it."""
        if self.closed is not None:
            return  # the next read reports it
        self.out.append(data)
        if len(self.out) == 1:
            self._flush()

    def _flush(self) -> None:
        while self.out:
            chunk = self.out[0]
            try:
                sent = self.sock.send(chunk)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent = 0
            except (OSError, ssl.SSLError) as e:
                self._end(repr(e))
                return
            if sent < len(chunk):
                if sent:
                    self.out[0] = memoryview(chunk)[sent:]
                if not self.watchingWrites:
                    self.watchingWrites = True
                    self.loop.add_writer(self.fd, self._flush)
                return
            self.out.popleft()
        if self.watchingWrites:
            self.watchingWrites = False
            self.loop.remove_writer(self.fd)
        self._wake(self.writeWaiter)

    async def drain(self) -> None:
        """Wait until everything written is sent; L{ConnectionError} if it cannot be."""
        while self.out and self.closed is None:
            self.writeWaiter = self.loop.create_future()
            await self.writeWaiter
        if self.closed is not None:
            raise ConnectionError(self.closed)

    async def startTLS(self, ctx: ssl.SSLContext, hostname: str) -> None:
        """The TLS handshake on this connection (the server has said go ahead)."""
        await self.drain()
        if self.buffer:
            raise ssl.SSLError("the server sent data before the TLS handshake")
        self.loop.remove_reader(self.fd)
        self.sock = ctx.wrap_socket(
            self.sock,
            server_hostname=hostname if ctx.check_hostname else None,
            do_handshake_on_connect=False,
        )
        while True:
            try:
                self.sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                watch, unwatch = self.loop.add_reader, self.loop.remove_reader
            except ssl.SSLWantWriteError:
                watch, unwatch = self.loop.add_writer, self.loop.remove_writer
            ready = self.loop.create_future()
            watch(self.fd, self._wake, ready)
            try:
                await ready
            finally:
                unwatch(self.fd)
        self.loop.add_reader(self.fd, self._readable)

    def close(self) -> None:
        """Drop the connection at once (no QUIT, no TLS close)."""
        self._end("closed")
        self.sock.close()


class Client:
    """One SMTP connection, in lock step: every command waits for its reply."""

    def __init__(self, options, stats: Stats) -> None:
        self.options = options
        self.stats = stats
        self.stream: Optional[Stream] = None

    async def reply(self, expected: int) -> list:
        lines = []
        assert self.stream is not None
        try:
            async with asyncio.timeout(self.options.timeout):
                while True:
                    line = await self.stream.readline()
                    lines.append(line)
                    if line[3:4] != b"-":
                        break
        except TimeoutError:
            raise Failed("timeout", f"waiting for {expected}") from None
        except (ConnectionError, ssl.SSLError) as e:
            raise Failed("closed", f"waiting for {expected}: {e!r}") from None
        code = lines[-1][:3]
        if code != str(expected).encode("ascii"):
            raise Failed(
                code.decode("ascii", "replace") or "empty",
                b"".join(lines).decode("ascii", "replace").strip(),
            )
        return lines

    async def command(self, line: str, expected: int) -> list:
        assert self.stream is not None
        self.stream.write(line.encode("ascii") + CRLF)
        return await self.reply(expected)

    async def connect(self, ctx: ssl.SSLContext) -> None:
        o = self.options
        try:
            async with asyncio.timeout(o.timeout):
                self.stream = await Stream.connect(o.address, o.source)
                if o.tls == "implicit":
                    await self.stream.startTLS(ctx, o.host)
        except (TimeoutError, OSError, ssl.SSLError) as e:
            raise Failed("connect", repr(e)) from None
        await self.reply(220)
        lines = await self.command(f"EHLO {o.helo}", 250)
        if o.tls == "starttls":
            if not any(line[4:].strip().upper() == b"STARTTLS" for line in lines):
                raise Failed("no-starttls", "STARTTLS not offered")
            await self.command("STARTTLS", 220)
            try:
                async with asyncio.timeout(o.timeout):
                    await self.stream.startTLS(ctx, o.host)
            except (TimeoutError, OSError, ssl.SSLError) as e:
                raise Failed("tls", repr(e)) from None
            await self.command(f"EHLO {o.helo}", 250)

    async def authenticate(self, user: str) -> None:
        o = self.options
        if o.mechanism == "PLAIN":
            token = base64.b64encode(f"\0{user}\0{o.password}".encode()).decode("ascii")
            await self.command(f"AUTH PLAIN {token}", 235)
        elif o.mechanism == "LOGIN":
            await self.command("AUTH LOGIN", 334)
            await self.command(base64.b64encode(user.encode()).decode("ascii"), 334)
            await self.command(base64.b64encode(o.password.encode()).decode("ascii"), 235)

    async def login(self, ctx: ssl.SSLContext, user: str) -> None:
        started = time.perf_counter()
        await self.connect(ctx)
        await self.authenticate(user)
        self.stats.login.append(time.perf_counter() - started)

    async def quit(self) -> None:
        try:
            await self.command("QUIT", 221)
        except Failed:
            pass
        self.close()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def userFor(options, n: int) -> str:
    return options.user.replace("{n}", str(n % options.user_count))


class SendSession:
    """
    One connection of the C{send} mode as a state machine driven from the
    event loop's callbacks: no task, future or timer per reply. Each
    reply is checked against the code its step expects; a wrong one, a
    broken connection or a reply later than C{--timeout} (seen by
    L{Watchdog}) ends the connection as a failure, and a new one starts
    50 ms later, as long as there is time and budget left.
    """

    def __init__(self, run: SendRun, index: int) -> None:
        self.run = run
        self.options = run.options
        self.user = userFor(run.options, index)
        self.sender = run.options.sender or self.user
        self.sock: Optional[socket.socket] = None
        self.fd = -1
        self.buffer = bytearray()
        # The lines of the reply being read, and of the last one read.
        self.lines: list = []
        self.reply: list = []
        self.rcpts: Iterator = iter(())
        self.out: collections.deque = collections.deque()
        self.watchingWrites = False
        # What the next reply answers: (expected code, what to do with it).
        self.step: Optional[tuple] = None
        #: When the awaited reply (or connection, or handshake) was asked for.
        self.waitingSince: Optional[float] = None
        self.started = 0.0
        self.sent = 0

    # The life of a connection.

    def start(self) -> None:
        o = self.options
        if not self.run.going():
            self.run.ended(self)
            return
        self.buffer.clear()
        self.lines = []
        self.sent = 0
        self.started = time.perf_counter()
        self.waitingSince = time.monotonic()
        sock = socket.socket(socket.AF_INET6 if ":" in o.address[0] else socket.AF_INET)
        self.sock, self.fd = sock, sock.fileno()
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if o.source:
                sock.bind((o.source, 0))
            err = sock.connect_ex(o.address)
        except OSError as e:
            self.fail("connect", repr(e))
            return
        if err not in (0, errno.EINPROGRESS):
            self.fail("connect", os.strerror(err))
            return
        self.run.loop.add_writer(self.fd, self._connected)

    def _connected(self) -> None:
        self.run.loop.remove_writer(self.fd)
        assert self.sock is not None
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail("connect", os.strerror(err))
            return
        if self.options.tls == "implicit":
            self._startTLS(lambda: self.expect(220, self._greeted))
        else:
            self.run.loop.add_reader(self.fd, self._readable)
            self.expect(220, self._greeted)

    def _greeted(self) -> None:
        self.command(f"EHLO {self.options.helo}", 250, self._ehloed)

    def _ehloed(self) -> None:
        if self.options.tls != "starttls" or isinstance(self.sock, ssl.SSLSocket):
            return self._authenticate()
        if not any(line[4:].strip().upper() == b"STARTTLS" for line in self.reply):
            return self.fail("no-starttls", "STARTTLS not offered")
        self.command("STARTTLS", 220, self._tlsAsked)

    def _tlsAsked(self) -> None:
        if self.buffer:
            return self.fail("tls", "the server sent data before the TLS handshake")
        self.run.loop.remove_reader(self.fd)
        self._startTLS(self._greeted)

    def _startTLS(self, then) -> None:
        o = self.options
        ctx = self.run.ctx
        try:
            self.sock = ctx.wrap_socket(
                self.sock,
                server_hostname=o.host if ctx.check_hostname else None,
                do_handshake_on_connect=False,
            )
        except (OSError, ssl.SSLError) as e:
            return self.fail("tls", repr(e))
        self.waitingSince = time.monotonic()
        self._handshake(then)

    def _handshake(self, then) -> None:
        loop = self.run.loop
        loop.remove_reader(self.fd)
        loop.remove_writer(self.fd)
        assert isinstance(self.sock, ssl.SSLSocket)
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            loop.add_reader(self.fd, self._handshake, then)
            return
        except ssl.SSLWantWriteError:
            loop.add_writer(self.fd, self._handshake, then)
            return
        except (OSError, ssl.SSLError) as e:
            return self.fail("tls", repr(e))
        loop.add_reader(self.fd, self._readable)
        then()

    def _authenticate(self) -> None:
        o = self.options
        if o.mechanism == "PLAIN":
            token = base64.b64encode(f"\0{self.user}\0{o.password}".encode()).decode("ascii")
            self.command(f"AUTH PLAIN {token}", 235, self._loggedIn)
        else:
            user = base64.b64encode(self.user.encode()).decode("ascii")
            password = base64.b64encode(o.password.encode()).decode("ascii")
            self.command(
                "AUTH LOGIN",
                334,
                lambda: self.command(
                    user, 334, lambda: self.command(password, 235, self._loggedIn)
                ),
            )

    def _loggedIn(self) -> None:
        self.run.stats.login.append(time.perf_counter() - self.started)
        self._next()

    def _next(self) -> None:
        """The next message on this connection, or QUIT."""
        if self.sent >= self.options.messages or not self.run.take():
            self.command("QUIT", 221, self._quitted, failOK=True)
            return
        self.started = time.perf_counter()
        self.rcpts = iter(self.run.recipients)
        self.command(f"MAIL FROM:<{self.sender}>", 250, self._rcpt)

    def _rcpt(self) -> None:
        rcpt = next(self.rcpts, None)
        if rcpt is None:
            self.command("DATA", 354, self._body)
        else:
            self.command(f"RCPT TO:<{rcpt}>", 250, self._rcpt)

    def _body(self) -> None:
        body = self.run.body
        view = memoryview(body)
        for start in range(0, len(body), 1 << 20):
            self.write(view[start : start + (1 << 20)])
        self.expect(250, self._accepted)

    def _accepted(self) -> None:
        stats = self.run.stats
        if self.options.ids:
            queued = self.reply[-1].split(b"queued as ", 1)
            stats.accepted.append((queued[-1].strip().decode("ascii", "replace"), time.time()))
        stats.message.append(time.perf_counter() - self.started)
        stats.messages += 1
        stats.bytes += len(self.run.body)
        self.sent += 1
        self._next()

    def _quitted(self) -> None:
        self.close()
        self.start()

    # Replies and writes.

    def expect(self, code: int, then, failOK: bool = False) -> None:
        self.step = (str(code).encode("ascii"), then, failOK)
        self.waitingSince = time.monotonic()
        self._replies()

    def command(self, line: str, code: int, then, failOK: bool = False) -> None:
        self.write(line.encode("ascii") + CRLF)
        self.expect(code, then, failOK)

    def _replies(self) -> None:
        """Hand every complete reply in the buffer to the step awaiting it."""
        while self.step is not None:
            end = self.buffer.find(CRLF)
            if end < 0:
                if len(self.buffer) > Stream.MAX_LINE:
                    self.fail("closed", f"no line end in {len(self.buffer)} bytes")
                return
            line = bytes(self.buffer[: end + 2])
            del self.buffer[: end + 2]
            self.lines.append(line)
            if line[3:4] == b"-":
                continue
            self.reply, self.lines = self.lines, []
            code, then, failOK = self.step
            self.step = None
            self.waitingSince = None
            if line[:3] != code and not failOK:
                self.fail(
                    line[:3].decode("ascii", "replace") or "empty",
                    b"".join(self.reply).decode("ascii", "replace").strip(),
                )
                return
            then()

    def _readable(self) -> None:
        sock = self.sock
        assert sock is not None
        try:
            data = sock.recv(Stream.READ_SIZE)
            while data and isinstance(sock, ssl.SSLSocket) and sock.pending():
                data += sock.recv(Stream.READ_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except (OSError, ssl.SSLError) as e:
            return self.broken(repr(e))
        if not data:
            return self.broken("EOF")
        self.buffer += data
        self._replies()

    def write(self, data) -> None:
        self.out.append(data)
        if len(self.out) == 1:
            self._flush()

    def _flush(self) -> None:
        sock = self.sock
        if sock is None:
            return
        while self.out:
            chunk = self.out[0]
            try:
                sent = sock.send(chunk)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent = 0
            except (OSError, ssl.SSLError) as e:
                self.out.clear()
                return self.broken(repr(e))
            if sent < len(chunk):
                if sent:
                    self.out[0] = memoryview(chunk)[sent:]
                if not self.watchingWrites:
                    self.watchingWrites = True
                    self.run.loop.add_writer(self.fd, self._flush)
                return
            self.out.popleft()
        if self.watchingWrites:
            self.watchingWrites = False
            self.run.loop.remove_writer(self.fd)

    # Endings.

    def broken(self, why: str) -> None:
        """The connection ended under us: a failure of the step awaiting a reply."""
        if self.step is not None and self.step[2]:
            return self._quitted()  # QUIT's reply may be lost; the message counts
        self.fail("closed", f"waiting for {self.step[0].decode() if self.step else '-'}: {why}")

    def timedOut(self) -> None:
        self.fail("timeout", f"waiting for {self.step[0].decode() if self.step else 'TLS'}")

    def fail(self, key: str, detail: str = "") -> None:
        self.run.stats.fail(Failed(key, detail))
        self.close()
        self.run.loop.call_later(0.05, self.start)

    def close(self) -> None:
        """Drop the connection at once (no TLS close)."""
        self.step = None
        self.waitingSince = None
        self.out.clear()
        self.watchingWrites = False
        if self.sock is not None:
            self.run.loop.remove_reader(self.fd)
            self.run.loop.remove_writer(self.fd)
            self.sock.close()
            self.sock = None


class SendRun:
    """The C{send} mode: L{SendSession}s until the time or budget is spent."""

    def __init__(self, options, ctx, stats: Stats) -> None:
        self.options = options
        self.ctx = ctx
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        self.recipients = [options.rcpt[i % len(options.rcpt)] for i in range(options.recipients)]
        self.body = makeBody(options.size, options.sender or userFor(options, 0), self.recipients)
        self.deadline = time.monotonic() + options.time
        self.budget = options.total or math.inf
        self.live: set = set()
        self.done = self.loop.create_future()

    def going(self) -> bool:
        return time.monotonic() < self.deadline and self.budget > 0

    def take(self) -> bool:
        """One more message from the budget, if there is time and budget."""
        if not self.going():
            return False
        self.budget -= 1
        return True

    def ended(self, session: SendSession) -> None:
        self.live.discard(session)
        if not self.live and not self.done.done():
            self.done.set_result(None)

    def watch(self) -> None:
        """Once a second: end the sessions whose awaited reply is overdue."""
        limit = time.monotonic() - self.options.timeout
        for session in list(self.live):
            if session.waitingSince is not None and session.waitingSince < limit:
                session.timedOut()
        self.watchdog = self.loop.call_later(1.0, self.watch)

    async def __call__(self) -> None:
        self.live = {SendSession(self, i) for i in range(self.options.concurrency)}
        for session in list(self.live):
            session.start()
        self.watch()
        try:
            await self.done
        finally:
            self.watchdog.cancel()


async def runSend(options, ctx, stats: Stats) -> None:
    await SendRun(options, ctx, stats)()


async def runStorm(options, ctx, stats: Stats) -> dict:
    """The NOOP client first, then every storm login at once; NOOPs stop when the storm ends."""
    noopClient = Client(options, Stats())
    await noopClient.login(ctx, options.noop_user or userFor(options, 0))
    stormDone = asyncio.Event()
    deadline = time.monotonic() + options.time

    async def noops() -> None:
        while not stormDone.is_set() and time.monotonic() < deadline:
            started = time.perf_counter()
            await noopClient.command("NOOP", 250)
            stats.noop.append(time.perf_counter() - started)
            await asyncio.sleep(options.noop_interval)

    async def one(i: int) -> None:
        client = Client(options, stats)
        try:
            await client.login(ctx, userFor(options, i))
            await client.quit()
        except Failed as e:
            stats.fail(e)
            client.close()
        except Exception as e:  # counted, not fatal, as in sendWorker
            stats.fail(Failed("error", repr(e)))
            client.close()

    noopTask = asyncio.ensure_future(noops())
    await asyncio.sleep(0.2)  # a few NOOPs before the storm, as a baseline
    started = time.perf_counter()
    storm = asyncio.gather(*(one(i) for i in range(options.concurrency)))
    try:
        await asyncio.wait_for(storm, max(0.1, deadline - time.monotonic()))
    except TimeoutError:
        stats.failures["time-cap"] += 1
    stormTime = time.perf_counter() - started
    stormDone.set()
    try:
        await noopTask
    except Failed as e:
        stats.fail(e)
    await noopClient.quit()
    return {"logins": len(stats.login), "storm_s": round(stormTime, 3)}


async def runIdle(options, ctx, stats: Stats) -> dict:
    """Open the connections (at most C{--ramp} handshakes at a time), park them, hold, close."""
    gate = asyncio.Semaphore(options.ramp)
    clients: list = []
    deadline = time.monotonic() + options.time

    async def one(i: int) -> None:
        async with gate:
            if time.monotonic() >= deadline:
                stats.failures["time-cap"] += 1
                return
            client = Client(options, stats)
            started = time.perf_counter()
            try:
                await client.connect(ctx)
            except Failed as e:
                stats.fail(e)
                client.close()
                return
            stats.login.append(time.perf_counter() - started)
            clients.append(client)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(options.concurrency)))
    openTime = time.perf_counter() - started
    print(f"parked {len(clients)}", file=sys.stderr, flush=True)
    await asyncio.sleep(min(options.hold, max(0.0, deadline - time.monotonic())))
    # Every parked connection must still be answering.
    alive = 0
    for client in clients:
        try:
            await client.command("NOOP", 250)
            alive += 1
        except Failed as e:
            stats.fail(e)
        client.close()
    return {"parked": len(clients), "alive_after_hold": alive, "open_s": round(openTime, 3)}


def parseArgs(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--source", help="connect from this local address (e.g. 127.0.0.21)")
    p.add_argument(
        "--ids", help="send: write 'QUEUE-ID UNIX-TIME' of every accepted message to this file"
    )
    p.add_argument("--port", type=int, default=587)
    p.add_argument("--tls", choices=("none", "starttls", "implicit"), default="starttls")
    p.add_argument("--cafile", help="verify the server against this CA (default: no check)")
    p.add_argument("--mechanism", choices=("PLAIN", "LOGIN"), default="PLAIN")
    p.add_argument(
        "--user",
        required=True,
        help="login; '{n}' in it becomes the connection number modulo --user-count",
    )
    p.add_argument("--user-count", type=int, default=1)
    p.add_argument("--password", required=True)
    p.add_argument("--sender", help="MAIL FROM address (default: the login)")
    p.add_argument("--rcpt", action="append", help="recipient address (repeat for several)")
    p.add_argument("--recipients", type=int, default=1, help="RCPTs per message")
    p.add_argument("--helo", default="loadgen.example")
    p.add_argument("--mode", choices=("send", "storm", "idle"), default="send")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--messages", type=int, default=1, help="messages per connection")
    p.add_argument("--total", type=int, default=0, help="stop after this many messages")
    p.add_argument("--size", type=int, default=10240, help="message size in bytes")
    p.add_argument("--time", type=float, default=10.0, help="time cap in seconds")
    p.add_argument("--timeout", type=float, default=30.0, help="per reply, in seconds")
    p.add_argument("--noop-user", help="storm: the login of the NOOP client")
    p.add_argument("--noop-interval", type=float, default=0.01)
    p.add_argument("--hold", type=float, default=3.0, help="idle: seconds to hold")
    p.add_argument("--ramp", type=int, default=50, help="idle: handshakes at a time")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="send: split the connections over this many client processes",
    )
    p.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    options = p.parse_args(argv)
    if options.mode == "send" and not options.rcpt:
        p.error("--rcpt is required in send mode")
    if options.processes > 1 and options.mode != "send":
        p.error("--processes is for send mode only")
    if options.ids and options.processes > 1:
        p.error("--ids needs --processes 1")
    return options


def summary(options, stats: Stats, elapsed: float, cpu: float, extra: dict) -> dict:
    messageTime = sum(stats.message)
    result = {
        "mode": options.mode,
        "concurrency": options.concurrency,
        "messages": stats.messages,
        "failures": dict(stats.failures),
        "elapsed_s": round(elapsed, 3),
        "client_cpu_s": round(cpu, 3),
        "msgs_per_s": round(stats.messages / elapsed, 2) if elapsed else None,
        "mb_per_s": round(stats.bytes / messageTime / 1e6, 2) if messageTime else None,
        "login_p50_ms": percentile(stats.login, 50),
        "login_p99_ms": percentile(stats.login, 99),
        "message_p50_ms": percentile(stats.message, 50),
        "message_p99_ms": percentile(stats.message, 99),
    }
    if stats.noop:
        result.update(
            noops=len(stats.noop),
            noop_p50_ms=percentile(stats.noop, 50),
            noop_p99_ms=percentile(stats.noop, 99),
            noop_max_ms=percentile(stats.noop, 100),
        )
    if stats.examples:
        result["failure_examples"] = stats.examples
    result.update(extra)
    if options.raw:
        result["raw"] = {
            "login": stats.login,
            "message": stats.message,
            "noop": stats.noop,
            "bytes": stats.bytes,
            "examples": stats.examples,
        }
    return result


async def main(options) -> dict:
    ctx = clientContext(options.cafile)
    # Resolved once, not per connection (a thread hop in asyncio).
    try:
        options.address = socket.getaddrinfo(options.host, options.port, type=socket.SOCK_STREAM)[
            0
        ][4][:2]
    except OSError as e:
        raise SystemExit(f"loadgen: cannot resolve {options.host}: {e}") from None
    stats = Stats()
    extra: dict = {}
    started = time.perf_counter()
    cpu = time.process_time()
    run = {"send": runSend, "storm": runStorm, "idle": runIdle}[options.mode]
    try:
        extra = await asyncio.wait_for(run(options, ctx, stats), options.time + 60) or {}
    except TimeoutError:
        stats.failures["time-cap"] += 1
    except Failed as e:
        stats.fail(e)
    elapsed = time.perf_counter() - started
    if options.ids:
        with open(options.ids, "w") as f:
            f.writelines(f"{msgid} {when:.6f}\n" for msgid, when in stats.accepted)
    return summary(options, stats, elapsed, time.process_time() - cpu, extra)


def runProcesses(options, argv: list) -> dict:
    """
    C{--processes N} in send mode: N copies of this script share the
    connections (and C{--total}); their raw latencies are merged here, so
    one client process's CPU does not cap what a server can take.
    """
    n = options.processes
    children = []
    started = time.perf_counter()
    for i in range(n):
        share = options.concurrency // n + (1 if i < options.concurrency % n else 0)
        total = options.total // n + (1 if i < options.total % n else 0) if options.total else 0
        if share == 0:
            continue
        args = argv + [
            "--processes",
            "1",
            "--raw",
            "--concurrency",
            str(share),
            "--total",
            str(total),
        ]
        children.append(
            subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
        )
    stats, cpu, elapsed = Stats(), 0.0, 0.0
    for child in children:
        try:
            out, _ = child.communicate(timeout=options.time + 120)
            r = json.loads(out.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, IndexError, ValueError):
            child.kill()
            stats.failures["child"] += 1
            continue
        stats.messages += r["messages"]
        stats.failures.update(r["failures"])
        stats.login += r["raw"]["login"]
        stats.message += r["raw"]["message"]
        stats.noop += r["raw"]["noop"]
        stats.bytes += r["raw"]["bytes"]
        for key, text in r["raw"]["examples"].items():
            stats.examples.setdefault(key, text)
        cpu += r["client_cpu_s"]
        elapsed = max(elapsed, r["elapsed_s"])
    options.raw = False
    result = summary(options, stats, elapsed or time.perf_counter() - started, cpu, {})
    result["processes"] = n
    return result


if __name__ == "__main__":
    opts = parseArgs()
    if opts.processes > 1:
        out = runProcesses(opts, [a for a in sys.argv[1:]])
    else:
        out = asyncio.run(main(opts))
    print(json.dumps(out), flush=True)
