"""
Property tests (hypothesis) of the SMTP session: random command sequences,
random bytes, broken base64 and SASL payloads, huge lines and smuggling
sequences, first on a StringTransport with a Clock, then against the real
service on 127.0.0.1 (random bytes, partial TLS ClientHellos).

The properties are plain functions so that C{bench/fuzz_long.py} can run
them with many more examples than CI does; here the runs are small and
derandomized, so CI is reproducible.
"""

from __future__ import annotations

import base64
import re
import socket
import ssl

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, threads
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from mailauth import esmtp
from mailauth.throttle import MAX_DELAY
from tests.harness import Daemon, RawClient, serverConnectionsClosed
from tests.support import (
    MemoryMailbox,
    RecordingPortal,
    Session,
    makeFactory,
    makeSettings,
    makeThrottle,
    passwordIs,
)

REPLY = re.compile(rb"^(\d{3})([ -])(.*)$", re.DOTALL)
ENHANCED = re.compile(rb"^([245])\.\d{1,3}\.\d{1,3} ")
HOST = b"mx.example.test"

# -- strategies ---------------------------------------------------------------

ADDRESSES = [
    b"<alice@example.test>",
    b"<bob@example.test>",
    b"<nobody@example.test>",
    b"<>",
    b"<bob@remote.test>",
    b"<bob%remote.test@example.test>",
    b"<@a.test:bob@remote.test>",
    b'<"bob@remote.test"@example.test>',
    b'<"a\\"b"@example.test>',
    b"<bob@[127.0.0.1]>",
    b"<bob@[IPv6:::1]>",
    b"<bob@[1.2.3]>",
    b"<bob@example.test.>",
    b"<BOB@EXAMPLE.TEST>",
    b"<bob@ex\xc3\xa4mple.test>",
    b"<bob@xn--exmple-cua.test>",
    b"<postmaster>",
    b"<bob>",
    b"bob@example.test",
    b"<bob@example.test",
    b"<<bob@example.test>>",
    b"<@>",
    b"<\x00@x>",
]

SMUGGLING = [
    b"\n.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n\x00.\r\n",
    b"\x00",
    b"\r\n.\r",
    b".",
    b"..",
    b"\r",
    b"\n",
]


def _noCRLF(data: bytes) -> bytes:
    """A line's content: anything but CRLF (which would make it two lines)."""
    return data.replace(b"\r\n", b"\r")


random_bytes = st.binary(max_size=120).map(_noCRLF)
huge = st.builds(
    lambda n, c: c * n,
    st.integers(esmtp.MAX_LINE - 16, esmtp.MAX_LINE + 16),
    st.sampled_from([b"x", b"A", b"\xff"]),
)
b64_of = st.binary(max_size=60).map(base64.b64encode)
broken_b64 = st.text("ABCabc0123+/=*!-_ \t", min_size=1, max_size=40).map(str.encode)
plain_payload = st.tuples(
    st.sampled_from([b"", b"alice@example.test", b"postmaster@example.test", b"\xff"]),
    st.sampled_from([b"alice@example.test", b"ALICE@example.test", b"", b"a\x00b", b"\n"]),
    st.sampled_from([b"secret", b"wrong", b"", b"\x00"]),
).map(lambda t: base64.b64encode(b"\0".join(t)))
sasl_response = st.one_of(
    b64_of, broken_b64, plain_payload, st.just(b"*"), st.just(b"="), random_bytes
)
mechanism = st.sampled_from([b"PLAIN", b"LOGIN", b"CRAM-MD5", b"plain", b"GSSAPI", b""])
params = st.sampled_from(
    [
        b"",
        b" SIZE=100",
        b" SIZE=99999999999",
        b" SIZE=x",
        b" BODY=8BITMIME",
        b" BODY=BOGUS",
        b" AUTH=<>",
        b" XYZZY",
        b" SIZE=1 SIZE=2",
        b" =",
    ]
)
address = st.one_of(st.sampled_from(ADDRESSES), random_bytes.map(lambda b: b"<" + b + b">"))

command = st.one_of(
    st.sampled_from(
        [
            b"EHLO client.example",
            b"HELO client.example",
            b"EHLO",
            b"NOOP",
            b"RSET",
            b"QUIT",
            b"DATA",
            b"DATA x",
            b"STARTTLS",
            b"VRFY bob",
            b"EXPN x",
            b"HELP",
            b"AUTH",
            b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0secret"),
            b"noop",
            b"MAIL FROM:<alice@example.test>",
            b"RCPT TO:<bob@example.test>",
        ]
    ),
    st.builds(lambda a, p: b"MAIL FROM:" + a + p, address, params),
    st.builds(lambda a, p: b"RCPT TO:" + a + p, address, params),
    st.builds(
        lambda m, r: b"AUTH " + m + (b" " + r if r else b""),
        mechanism,
        st.one_of(st.just(b""), sasl_response),
    ),
    sasl_response,
    random_bytes,
    huge,
)

data_line = st.one_of(
    random_bytes,
    st.sampled_from(SMUGGLING),
    st.builds(lambda a, s, b: a + s + b, random_bytes, st.sampled_from(SMUGGLING), random_bytes),
    huge,
)
# Most DATA sections end; one that does not turns the rest of the script into body.
data_block = st.builds(
    lambda body, end: [b"DATA", *body] + ([b"."] if end else []),
    st.lists(data_line, max_size=6),
    st.sampled_from([True] * 7 + [False]),
)


def mostly(value: bytes, other):
    """C{value} three times in four, else something from C{other}."""
    return st.one_of(st.just(value), st.just(value), st.just(value), other)


transaction = st.builds(
    lambda sender, p, recipients, data: [
        b"MAIL FROM:" + sender + p,
        *(b"RCPT TO:" + r for r in recipients),
        *data,
    ],
    mostly(b"<alice@example.test>", address),
    mostly(b"", params),
    st.lists(mostly(b"<bob@example.test>", address), min_size=1, max_size=3),
    data_block,
)

login_first = st.just(
    [b"EHLO client.example", b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0secret")]
)


def _flatten(parts) -> list:
    out = []
    for part in parts:
        out.extend(part if isinstance(part, list) else [part])
    return out


# Anything, logged in or not: the protocol's robustness, its closing paths.
scripts = st.builds(
    lambda first, rest: first + _flatten(rest),
    st.one_of(st.just([]), login_first),
    st.lists(st.one_of(command, transaction, data_block), max_size=20),
)

# Logged in, mostly transactions with a few perturbations: what gets stored.
transactions = st.builds(
    lambda first, rest: first + _flatten(rest),
    login_first,
    st.lists(
        st.one_of(transaction, transaction, transaction, command, data_block),
        min_size=1,
        max_size=12,
    ),
)


# -- the session under test ---------------------------------------------------


class ErrorLog:
    """Every failure or warning logged while it watches."""

    def __init__(self) -> None:
        self.events: list = []
        globalLogPublisher.addObserver(self)

    def __call__(self, event) -> None:
        if "log_failure" in event or event.get("log_level", LogLevel.info) >= LogLevel.warn:
            self.events.append(event)

    def stop(self) -> list:
        globalLogPublisher.removeObserver(self)
        return self.events


def newSession(authMode: str, tlsMode: str, tarpit: float = 2.0, maxErrors: int = 10):
    clock = Clock()
    mailbox = MemoryMailbox(login="alice@example.test")
    anonymous = MemoryMailbox()
    factory = makeFactory(
        clock,
        portal=RecordingPortal(mailbox, answer=passwordIs(b"secret")),
        anonymous=anonymous,
        authMode=authMode,
        tlsMode=tlsMode,
        throttle=makeThrottle(clock, tarpitDelay=tarpit),
        settings=makeSettings(max_errors=maxErrors),
    )
    return clock, Session(factory), mailbox, anonymous


def checkReplyLines(lines: list, ehlo: bool) -> None:
    """
    Every line is C{NNN-text} or C{NNN text}; continuation lines belong to
    an EHLO reply; every reply but EHLO/HELO's, 334 and 354 carries an
    enhanced status code of the same class as its code.
    """
    for line in lines:
        m = REPLY.match(line)
        assert m, line
        code, sep, text = m.groups()
        assert code[:1] in b"2345", line
        if sep == b"-" or line == b"250 " + HOST or (ehlo and code == b"250"):
            assert code == b"250", line
            continue
        if code in (b"334", b"354"):
            continue
        e = ENHANCED.match(text)
        assert e and e.group(1) == code[:1], line


def checkScript(
    script: list, authMode: str = "required", tlsMode: str = "implicit", maxErrors: int = 10
) -> list:
    """
    Feed C{script} one line at a time (each with CRLF) and check, after
    each, what the session answered against a model of SMTP framing that
    knows only what the RFCs say: in command and AUTH mode each complete
    line gets exactly one final reply (two when the second is the 421 that
    ends the session); in DATA mode lines get no reply until the line
    C{.}, which gets exactly one; after the session closed, nothing.
    Then: the number of messages stored equals the number of 250 replies
    to DATA, every stored message is canonical (CRLF only, no NUL), and
    nothing was logged as an error.

    @return: the transcript, for comparisons.
    """
    errors = ErrorLog()
    try:
        clock, session, mailbox, anonymous = newSession(authMode, tlsMode, maxErrors=maxErrors)
        transcript = session.read()
        assert transcript == [b"220 mx.example.test ESMTP mailauth"], transcript
        data = closed = False
        queued = 0
        # The lines as the server frames them: a smuggling sequence may
        # hold a CRLF of its own.
        for line in b"".join(line + b"\r\n" for line in script).split(b"\r\n")[:-1]:
            session.protocol.dataReceived(line + b"\r\n")
            clock.advance(MAX_DELAY + 1)  # any tarpitted reply is due by now
            out = session.read()
            transcript.extend(out)
            if closed:
                assert out == [], (line, out)
                continue
            isEhlo = not data and line[:5].upper() == b"EHLO "
            checkReplyLines(out, isEhlo)
            finals = [reply for reply in out if reply[3:4] != b"-"]
            closed = session.transport.disconnecting
            if data and line != b".":
                assert out == [], (line, out)
                continue
            if closed:
                assert 1 <= len(finals) <= 2 and finals[-1][:3] in (b"421", b"221"), (line, out)
            else:
                assert len(finals) == 1, (line, out)
            if data:
                data = False
                queued += finals[0].startswith(b"250 2.0.0 Ok: queued as ")
            elif finals[0][:3] == b"354":
                data = True
        stored = mailbox.stored + anonymous.stored
        assert len(stored) == queued, (len(stored), queued)
        if authMode == "required":
            assert anonymous.stored == [], anonymous.stored
        for message in stored:
            assert message.count(b"\r") == message.count(b"\n") == message.count(b"\r\n")
            assert b"\0" not in message
    finally:
        logged = errors.stop()
    assert logged == [], logged
    return transcript


def _normalised(transcript: list) -> list:
    """Hide the CRAM-MD5 challenges, which are random."""
    return [b"334 <challenge>" if line.startswith(b"334 PD") else line for line in transcript]


def checkSplitInvariance(
    script: list, cuts: list, cutAfterCR: bool, authMode: str = "required"
) -> None:
    """
    The replies and the stored messages do not depend on how the client's
    bytes are cut into TCP segments. (STARTTLS is left out: what it
    discards depends on the segments, by design.)
    """
    wire = b"".join(line + b"\r\n" for line in script)
    points = set(c % (len(wire) + 1) for c in cuts)
    if cutAfterCR:
        points |= {i + 1 for i, byte in enumerate(wire) if byte == 13}
    points = sorted(points | {0, len(wire)})
    results = []
    for pieces in (
        [line + b"\r\n" for line in script],
        [wire[a:b] for a, b in zip(points, points[1:])],
    ):
        errors = ErrorLog()
        try:
            clock, session, mailbox, anonymous = newSession(authMode, "implicit", tarpit=0.0)
            for piece in pieces:
                session.protocol.dataReceived(piece)
            results.append((_normalised(session.read()), mailbox.stored, anonymous.stored))
        finally:
            assert errors.stop() == []
    assert results[0] == results[1], (results[0], results[1])


# A script without STARTTLS, cut points, and whether to cut after every CR.
segmentations = (
    scripts.map(lambda s: [line for line in s if line.upper() != b"STARTTLS"]),
    st.lists(st.integers(0, 10**6), max_size=30),
    st.booleans(),
)


# -- hypothesis settings ------------------------------------------------------

CI = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)


class SessionFuzzTests(unittest.TestCase):
    @CI
    @given(scripts)
    def test_requiredListener(self, script):
        """
        On an auth = required listener, any sequence of commands, bytes,
        SASL payloads, huge lines and DATA sections gets well-formed replies
        in lockstep with the lines sent, stores only what it acknowledged,
        canonical, and never logs an error.
        """
        checkScript(script, "required", "implicit")

    @CI
    @given(transactions)
    def test_transactions(self, script):
        """
        Logged-in transactions with broken addresses, parameters and DATA
        sections full of smuggling sequences: each message stored is one
        that got its 250, whole and canonical (no bare CR or LF, no NUL).
        """
        checkScript(script, "required", "implicit", maxErrors=40)

    @CI
    @given(scripts)
    def test_optionalListenerBeforeTLS(self, script):
        """The same on an auth = optional STARTTLS listener, STARTTLS included."""
        checkScript(script, "optional", "starttls")

    @CI
    @given(*segmentations)
    def test_segmentationDoesNotMatter(self, script, cuts, cutAfterCR):
        """
        Whatever the segment boundaries (including a CR and its LF in two
        segments), the session answers and stores exactly the same.
        """
        checkSplitInvariance(script, cuts, cutAfterCR)

    def test_crAndLfInSeparateReads(self):
        """
        (Found by the segmentation property.) A line of exactly 12288 octets
        whose CR and LF arrive in separate reads is still accepted, and a
        longer one is refused without swallowing the command after it.
        """
        checkSplitInvariance([b"NOOP " + b"x" * (esmtp.MAX_LINE - 5), b"NOOP"], [], True)
        checkSplitInvariance([b"x" * (esmtp.MAX_LINE + 5), b"NOOP"], [], True)


# -- the real service ---------------------------------------------------------


def clientHello() -> bytes:
    """The bytes of a real TLS ClientHello, as a client would send first."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="mx.example.test")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


HELLO = clientHello()


def replyLinesWellFormed(data: bytes) -> None:
    """Every complete line the server sent is a reply line (the last may be cut off)."""
    for line in data.split(b"\r\n")[:-1]:
        assert REPLY.match(line), data


def readUntilClosed(sock) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return data
        if not chunk:
            return data
        data += chunk


garbage = st.lists(
    st.one_of(
        st.binary(max_size=2000),
        huge,
        st.sampled_from(
            [b"\r\n", b"DATA\r\n", b".\r\n", b"STARTTLS\r\n", b"AUTH LOGIN\r\n", b"EHLO x\r\n"]
        ),
    ),
    max_size=8,
)


def servesNextClient(port: int) -> None:
    """A well-behaved client on the implicit TLS port gets its greeting, EHLO and QUIT."""
    client = RawClient(port, tls=True)
    try:
        assert client.reply()[0] == 220
        assert client.ehlo()[0] == 250
        assert client.command(b"QUIT")[0] == 221
    finally:
        client.close()


def socketExample(ports: dict, pieces: list, helloCut: int, tail: bytes) -> None:
    """
    (Blocking.) C{pieces} on the STARTTLS port, then a hang-up; the first
    C{helloCut} bytes of a ClientHello and C{tail} on the implicit TLS port,
    then a hang-up; then an ordinary client must be served.
    """
    with socket.create_connection(("127.0.0.1", ports["submission"]), timeout=10) as sock:
        sendThenHangUp(sock, pieces)
        replyLinesWellFormed(readUntilClosed(sock))
    with socket.create_connection(("127.0.0.1", ports["submissions"]), timeout=10) as sock:
        sendThenHangUp(sock, [HELLO[:helloCut] + tail])
        readUntilClosed(sock)
    servesNextClient(ports["submissions"])


def sendThenHangUp(sock, pieces: list) -> None:
    """
    Send each piece, then close our side. The server may have hung up
    first (garbage where a TLS handshake should be, after STARTTLS): then
    sending fails with EPIPE, ECONNRESET or ENOTCONN, which is fine.
    """
    try:
        for piece in pieces:
            sock.sendall(piece)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


sockets = (garbage, st.integers(0, len(HELLO)), st.binary(max_size=64))


class RealSocketFuzzTests(unittest.TestCase):
    """
    Random bytes and broken TLS against the real service: it answers what
    it answers with well-formed lines, logs no error, and serves the next
    client.
    """

    def setUp(self):
        self.daemon = Daemon(self.mktemp(), {"server": {"max_errors": "1000"}})
        self.addCleanup(self.daemon.stop)
        self.daemon.start()

    @defer.inlineCallbacks
    def test_randomBytesAndBrokenTLS(self):
        """
        Random bytes on the STARTTLS port, and a cut or corrupted ClientHello
        on the implicit TLS port, each followed by a hang-up: the server
        stays up, serves the next client, and logs no error.
        """
        errors = ErrorLog()
        try:
            ports = self.daemon.ports

            @settings(CI, max_examples=25)
            @given(*sockets)
            def fuzz(pieces, helloCut, tail):
                socketExample(ports, pieces, helloCut, tail)

            yield threads.deferToThread(fuzz)
            yield serverConnectionsClosed()
        finally:
            logged = errors.stop()
        self.assertEqual([e for e in logged if "log_failure" in e], [])
        self.assertEqual(self.flushLoggedErrors(), [])
