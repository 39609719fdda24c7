"""
DKIM signatures made in a helper process, so that signing does not hold
the GIL the event loop needs.

Signing a 10 KB message is about 0.1 ms of CPU, most of it Python
(canonicalising and hashing the header fields and the body). In a thread
of the daemon that time is taken from the event loop, which waits for the
GIL: at concurrency 50 the daemon lost 11-15% of its messages per second
to signing (bench/run --scenarios dkim), against under 1% when, as an
experiment, the same messages got a ready-made signature. A process of
its own signs on another core: with it the loss measured 1 to 8%.

The helper is C{python -m mailauth.signerproc}, one per daemon process
that delivers (each worker has its own), started when the first message
is signed and again after it ends. It reads requests on its stdin and
answers on its stdout, in order, one at a time; both are frames (L{frame}):

  - request: id, C{t=} timestamp, the largest header section to sign,
    the number of keys, then domain, selector, key file path and PEM
    private key of each, then the message as L{MessageSigner.write} took
    it;
  - answer: id, L{OK} and the C{DKIM-Signature} field(s), or
    L{NOT_SIGNABLE} or L{FAILED} and why.

The helper runs the same L{MessageSigner} as a thread would, so a
signature is the same bytes either way. Keys travel with each request (a
parsed key is kept per PEM), so a SIGHUP that reloads the keys needs
nothing from the helper, and it reads no file.

Only messages whose body the signer still holds whole (up to
L{dkimsign.HELD_BODY}) go to the helper; a larger one is hashed as it
streams and signed in a thread as before, so that no message is held
whole in memory to be signed. When the helper cannot answer (it cannot
be started, it ends, it takes longer than C{timeout}), the message is
signed in a thread instead: the helper never makes a message fail that a
thread would sign.
"""

from __future__ import annotations

import faulthandler
import signal
import struct
import sys
from typing import Any, BinaryIO, Optional

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailauth import dkimsign
from mailauth.workers import howEnded

log = Logger(namespace="mailauth.signerproc")

OK = b"ok"
NOT_SIGNABLE = b"not-signable"
FAILED = b"failed"

_LENGTH = struct.Struct("!I")
# Parsed keys the helper keeps, by PEM; more means keys were rotated often.
_KEY_CACHE = 64


def frame(fields: list) -> bytes:
    """The frame of C{fields} (bytes): its length, then each field's length and bytes."""
    body = b"".join(_LENGTH.pack(len(field)) + field for field in fields)
    return _LENGTH.pack(len(body)) + body


def fields(body: bytes) -> list:
    """
    The fields of a frame's body (without its length).

    @raise ValueError: if a field runs past the end.
    """
    out, at = [], 0
    while at < len(body):
        if at + 4 > len(body):
            raise ValueError("a field length is cut short")
        (size,) = _LENGTH.unpack_from(body, at)
        at += 4
        if at + size > len(body):
            raise ValueError("a field runs past the end of its frame")
        out.append(body[at : at + size])
        at += size
    return out


def request(number: int, timestamp: int, maxHeaderSize: int, keys, message: bytes) -> bytes:
    """The frame that asks the helper to sign C{message} with C{keys}."""
    parts = [b"%d" % number, b"%d" % timestamp, b"%d" % maxHeaderSize, b"%d" % len(keys)]
    for key in keys:
        parts += [
            key.domain.encode("ascii"),
            key.selector.encode("ascii"),
            key.path.encode("utf-8", "surrogateescape"),
            key.pem,
        ]
    parts.append(message)
    return frame(parts)


class _Clock:
    """The one time a request's signature carries."""

    def __init__(self, now: int) -> None:
        self.now = now

    def seconds(self) -> float:
        return self.now


class Helper:
    """The helper's side: answers each request frame with one answer frame."""

    def __init__(self) -> None:
        self._keys: dict = {}

    def _key(self, domain: bytes, selector: bytes, path: bytes, pem: bytes):
        cached = self._keys.get((domain, selector, path, pem))
        if cached is None:
            from cryptography.hazmat.primitives import serialization

            if len(self._keys) >= _KEY_CACHE:
                self._keys.clear()
            private = serialization.load_pem_private_key(pem, password=None)
            cached = dkimsign.fromPrivateKey(
                domain.decode("ascii"),
                selector.decode("ascii"),
                path.decode("utf-8", "surrogateescape"),
                private,
            )
            self._keys[(domain, selector, path, pem)] = cached
        return cached

    def answer(self, body: bytes) -> bytes:
        """The answer frame to the request frame's body C{body}."""
        parts = fields(body)
        number, timestamp, maxHeaderSize, count = (int(part) for part in parts[:4])
        if len(parts) != 5 + 4 * count:
            raise ValueError(f"a request with {count} keys has {len(parts)} fields")
        try:
            keys = [self._key(*parts[4 + 4 * n : 8 + 4 * n]) for n in range(count)]
            signer = dkimsign.MessageSigner(keys, _Clock(timestamp), maxHeaderSize)
            signer.write(parts[-1])
            status, payload = OK, signer.signatureHeader()
        except dkimsign.MessageNotSignable as e:
            status, payload = NOT_SIGNABLE, str(e).encode("utf-8", "replace")
        except Exception as e:
            status, payload = FAILED, str(e).encode("utf-8", "replace")
        return frame([b"%d" % number, status, payload])


def _read(stream: BinaryIO, size: int) -> Optional[bytes]:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def main() -> int:
    """The helper: answer requests on stdin until it ends (the daemon is gone or stops it)."""
    # Ctrl-C, SIGHUP and systemd's SIGTERM reach the whole process group
    # (or cgroup): the daemon ends the helper itself, by closing its stdin,
    # once the messages it is signing are signed; a SIGTERM that killed it
    # first would send them to threads and log the helper's end as an error.
    for number in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)
    faulthandler.enable()
    helper = Helper()
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = _read(source, 4)
        if head is None:
            return 0
        body = _read(source, _LENGTH.unpack(head)[0])
        if body is None:
            return 0
        sink.write(helper.answer(body))
        sink.flush()


# -- the daemon's side ---------------------------------------------------------


class HelperUnavailable(Exception):
    """The helper did not answer: the message is to be signed in a thread."""


class _HelperProtocol(protocol.ProcessProtocol):
    def __init__(self, owner: SigningProcess) -> None:
        self.owner = owner
        self.buffer = b""
        self.errors = b""
        self.pid: Optional[int] = None

    def connectionMade(self) -> None:
        # Kept now: a helper that dies at once is reaped inside
        # spawnProcess, which then returns a process whose pid is None.
        self.pid = getattr(self.transport, "pid", None)

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 4:
            (size,) = _LENGTH.unpack_from(self.buffer)
            if len(self.buffer) < 4 + size:
                return
            body, self.buffer = self.buffer[4 : 4 + size], self.buffer[4 + size :]
            self.owner._answered(self, body)

    def errReceived(self, data: bytes) -> None:
        *lines, self.errors = (self.errors + data).split(b"\n")
        for line in lines:
            self.owner._stderr(self, line)

    def processEnded(self, reason: Failure) -> None:
        if self.errors:
            self.owner._stderr(self, self.errors)
        self.owner._ended(self, reason)


class SigningProcess(service.Service):
    """
    The daemon's side of the helper: L{sign} sends a message to it and
    fires with its signature, or with L{None} when the message is to be
    signed in a thread (its body is not held whole, or the helper cannot
    answer). The helper is started by the first message, and ended when
    the service stops.

    @ivar timeout: seconds a request may wait for its answer; then the
        helper is taken to hang, killed, and its requests signed in threads.
    @ivar retryAfter: after the helper could not be started, or ended
        sooner than this after it started, seconds during which messages
        are signed in threads without starting it again.
    @ivar signed: how many messages the helper signed.
    """

    name = "dkim-signer"
    timeout = 10.0
    retryAfter = 30.0

    def __init__(
        self, reactor, environ, executable: str = sys.executable, clock: Any = None
    ) -> None:
        """
        @param reactor: spawns the helper and keeps time.
        @param environ: the helper's environment (L{workers.workerEnvironment}).
        @param clock: gives the signatures' C{t=}; default C{reactor}.
        """
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.signed = 0
        self.environ = environ
        self.executable = executable
        self._proto: Optional[_HelperProtocol] = None
        self._process: Any = None
        self._pending: dict = {}
        self._next = 0
        self._notBefore = 0.0
        self._startedAt = 0.0
        self._pid: Optional[int] = None
        self._stopping = False
        self._whenEnded: list = []
        self._killer: Any = None

    def sign(self, signer: dkimsign.MessageSigner) -> defer.Deferred:
        """
        The signature of the message C{signer} has taken whole: a Deferred
        that fires with the C{DKIM-Signature} field(s), or L{None} when
        the message is to be signed in a thread instead; or fails with
        L{dkimsign.MessageNotSignable} or L{dkimsign.SigningError}, as
        L{MessageSigner.signatureHeader} would.
        """
        message = signer.heldMessage()
        if message is None or self._stopping or not self._running():
            return defer.succeed(None)
        self._next += 1
        number = self._next
        assert self._process is not None
        try:
            self._process.writeToChild(
                0,
                request(
                    number, int(self.clock.seconds()), signer.maxHeaderSize, signer.keys, message
                ),
            )
        except Exception:
            # Its stdin is gone: it is ending, and processEnded follows.
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        late = self.reactor.callLater(self.timeout, self._late, self._proto)
        self._pending[number] = (d, late)
        return d.addErrback(self._inThread)

    @staticmethod
    def _inThread(f: Failure) -> Optional[Failure]:
        f.trap(HelperUnavailable)
        return None

    @property
    def pid(self) -> Optional[int]:
        """The helper's process id while it runs, else L{None}."""
        return self._pid if self._process is not None else None

    def _running(self) -> bool:
        if self._process is not None:
            return True
        if self.reactor.seconds() < self._notBefore:
            return False
        proto = _HelperProtocol(self)
        try:
            self._process = self.reactor.spawnProcess(
                proto,
                self.executable,
                [self.executable, "-m", "mailauth.signerproc"],
                env=self.environ,
            )
        except Exception as e:
            # (Newer Twisted spawns with posix_spawn, which fails here for a
            # missing executable; older forks, and the child exits with 1.)
            log.error(
                "DKIM signing process: cannot run {executable}: {why}; signing in threads, "
                "trying again in {seconds:g} s",
                executable=self.executable,
                why=e,
                seconds=self.retryAfter,
            )
            self._notBefore = self.reactor.seconds() + self.retryAfter
            return False
        self._proto = proto
        self._startedAt = self.reactor.seconds()
        self._pid = proto.pid
        log.info("DKIM signing process started (pid {pid})", pid=self._pid)
        return True

    def _answered(self, proto: _HelperProtocol, body: bytes) -> None:
        try:
            number, status, payload = fields(body)
            d, late = self._pending.pop(int(number))
        except (ValueError, KeyError):
            log.error(
                "DKIM signing process: an answer that matches no request: {body!r}", body=body[:200]
            )
            self._kill(proto)
            return
        late.cancel()
        if status == OK:
            self.signed += 1
            d.callback(payload)
        elif status == NOT_SIGNABLE:
            d.errback(dkimsign.MessageNotSignable(payload.decode("utf-8", "replace")))
        else:
            d.errback(dkimsign.SigningError(payload.decode("utf-8", "replace")))

    def _stderr(self, proto: _HelperProtocol, line: bytes) -> None:
        if line.strip():
            log.warn(
                "DKIM signing process (pid {pid}): {line}",
                pid=self._pid,
                line=line.decode("utf-8", "replace").rstrip(),
            )

    def _late(self, proto: Optional[_HelperProtocol]) -> None:
        if proto is not self._proto or self._process is None:
            return
        # Once: the other requests' timers would say it again.
        for _, late in self._pending.values():
            if late.active():
                late.cancel()
        log.error(
            "DKIM signing process (pid {pid}) did not answer within {seconds:g} s: killing it; "
            "signing in threads until it is started again",
            pid=self._pid,
            seconds=self.timeout,
        )
        self._kill(proto)

    def _kill(self, proto: Optional[_HelperProtocol]) -> None:
        """SIGKILL the helper of C{proto} if it still runs; L{_ended} follows."""
        if proto is self._proto and self._process is not None:
            try:
                self._process.signalProcess("KILL")
            except (error.ProcessExitedAlready, OSError):
                pass

    def _forget(self, why: Exception) -> None:
        """The helper is gone: its requests are signed in threads; the next starts a new one."""
        self._proto = self._process = None
        pending, self._pending = self._pending, {}
        for d, late in pending.values():
            if late.active():
                late.cancel()
            d.errback(why)

    def _ended(self, proto: _HelperProtocol, reason: Failure) -> None:
        if proto is not self._proto:
            return
        if not self._stopping:
            # One that ends soon after it started would end again: wait.
            lived = self.reactor.seconds() - self._startedAt
            wait = self.retryAfter if lived < self.retryAfter else 0.0
            self._notBefore = self.reactor.seconds() + wait
            log.error(
                "DKIM signing process (pid {pid}) {how}; signing in threads until it is "
                "started again (in {wait:g} s at the earliest)",
                pid=self._pid,
                how=howEnded(reason),
                wait=wait,
            )
        self._forget(HelperUnavailable("the signing process ended"))
        if self._killer is not None and self._killer.active():
            self._killer.cancel()
        self._killer = None
        waiting, self._whenEnded = self._whenEnded, []
        for d in waiting:
            d.callback(None)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.stop()

    def stop(self) -> defer.Deferred:
        """
        End the helper: its stdin closes, it answers what it was asked and
        exits (SIGKILL if it has not after L{timeout}). Fires once it has.
        """
        self._stopping = True
        if self._process is None:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._whenEnded.append(d)
        if self._killer is None:
            self._killer = self.reactor.callLater(self.timeout, self._kill, self._proto)
            self._process.closeStdin()
        return d


if __name__ == "__main__":
    sys.exit(main())
