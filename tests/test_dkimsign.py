"""
DKIM signing: signatures made while the message streams in, checked by
dkimpy's own verifier against the DNS record C{mailauth dkim keygen} prints.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import subprocess
import sys
import tracemalloc
import types
from unittest import mock

import dkim
from cryptography.hazmat.primitives import serialization
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial import unittest

import mailauth
from mailauth.cli import Console, main
from mailauth.config import ConfigError, loadText
from mailauth.dkimsign import (
    HELD_BODY,
    KeyRing,
    MessageNotSignable,
    MessageSigner,
    RelaxedBodyHash,
    _Relaxed,
    defaultSelector,
    loadKey,
    loadKeys,
    parseHeader,
)
from tests.support import DNSStub, dkimKeygen

# A fixed signing time (t=), in the past as verifiers require.
NOW = 1_700_000_000

CONFIG = """
[listener:submission]
endpoint = tcp:2587
tls = none
auth = optional

[auth]
users = /etc/mailauth/users

[delivery]
local_domains = example.org
maildir = /var/mail/{domain}/{localpart}/Maildir
"""

HEADER = (
    b"Received: from client.example ([192.0.2.1])\r\n"
    b"\tby mail.example.org (mailauth) with ESMTPSA id 1A2B3C\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: a folded\r\n   subject\t line\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
)

BODIES = {
    "plain": b"Hello Bob,\r\n\r\nsee you.\r\n",
    "empty": b"",
    "blank lines only": b"\r\n\r\n\r\n",
    "long lines": b"x" * 10000 + b"\r\n" + b"word " * 3000 + b"\r\n",
    "8-bit": "Grüße, ça va? Привет 😀\r\n".encode() + bytes(range(0x80, 0x100)) + b"\r\n",
    "dot-leading lines": b".\r\n..\r\n.hidden\r\n. \r\n",
    "trailing blank lines": b"text\r\n\r\n \r\n\t\r\n\r\n",
    "whitespace": b"  lead\t and  \t inner   \r\n\t\r\ntrail \t \r\n",
    "no final CRLF": b"last line without end",
    "bare CR inside a line": b"a\rb\r\n",
}


class _NoExtraFrom(list):
    """
    The h= list, for L{LiteralDKIM}: dkimpy's verifier appends a From of its
    own (a defence of its own, Debian bug 644046); this list ignores that.
    """

    def append(self, item: bytes) -> None:
        pass


class LiteralDKIM(dkim.DKIM):
    """dkimpy's verifier checking exactly the fields the h= tag lists, as RFC 6376 does."""

    def verify_headerprep(self, idx: int = 0):
        prep = super().verify_headerprep(idx)
        if not prep:
            return prep
        sig, include, sigheaders = prep
        return sig, _NoExtraFrom(include), sigheaders


def sign(keys, message: bytes, chunks=None, clock=None, holdBody=HELD_BODY) -> bytes:
    """
    Sign C{message} written in pieces of the sizes in C{chunks} (else at
    once), holding at most C{holdBody} bytes of body to hash at the end.
    """
    if clock is None:
        clock = Clock()
        clock.advance(NOW)
    signer = MessageSigner(keys, clock, holdBody=holdBody)
    sizes = iter(chunks or [len(message)])
    offset = 0
    while offset < len(message):
        size = next(sizes, len(message))
        signer.write(message[offset : offset + size])
        offset += size
    return signer.signatureHeader()


class KeyPair:
    """A key made by the keygen command, loaded, with the DNS serving its record."""

    def __init__(
        self,
        testCase: unittest.TestCase,
        keyType: str,
        domain: str = "example.org",
        selector: str = "",
    ) -> None:
        self.path, self.name, self.record = dkimKeygen(testCase, keyType, domain, selector)
        self.selector = self.name.split("._domainkey.")[0]
        self.key = loadKey(domain, self.selector, self.path)
        self.dns = DNSStub()
        self.dns.add(self.name, self.record)


class _Keys:
    """One key of each type, made once for the whole module (RSA keys take a while)."""

    pairs: dict = {}

    @classmethod
    def get(cls, testCase: unittest.TestCase, keyType: str) -> KeyPair:
        if keyType not in cls.pairs:
            cls.pairs[keyType] = KeyPair(testCase, keyType)
        return cls.pairs[keyType]


class SigningTests(unittest.TestCase):
    """Signatures verify with dkimpy, for both key types and awkward messages."""

    def assertVerifies(self, pair: KeyPair, message: bytes, signature: bytes) -> None:
        self.assertTrue(
            dkim.verify(signature + message, dnsfunc=pair.dns),
            f"does not verify:\n{signature + message!r}",
        )
        self.assertIn(pair.name.encode("ascii"), pair.dns.asked)

    def checkBodies(self, keyType: str) -> None:
        pair = _Keys.get(self, keyType)
        for name, body in BODIES.items():
            message = HEADER + b"\r\n" + body
            signature = sign([pair.key], message)
            self.assertVerifies(pair, message, signature)
            # The check can fail: a changed body does not verify.
            changed = HEADER + b"\r\n" + body + b"more\r\n"
            self.assertFalse(dkim.verify(signature + changed, dnsfunc=pair.dns), name)

    def test_ed25519(self) -> None:
        """
        Ed25519-SHA256 signatures (RFC 8463) of messages with long lines,
        8-bit bytes, folded headers, dot-leading lines, trailing blank
        lines or an empty body verify with dkimpy; a changed body does not.
        """
        self.checkBodies("ed25519")

    def test_rsa(self) -> None:
        """The same messages signed with RSA-SHA256 (2048 bits) verify too."""
        self.checkBodies("rsa")

    def test_tags(self) -> None:
        """
        The signature is relaxed/relaxed, names the domain, selector and
        algorithm, and signs the usual header fields (not Received).
        """
        for keyType, algorithm in [("ed25519", b"ed25519-sha256"), ("rsa", b"rsa-sha256")]:
            pair = _Keys.get(self, keyType)
            message = HEADER + b"Reply-To: <r@example.org>\r\nList-Id: <l.example.org>\r\n\r\nx\r\n"
            signature = sign([pair.key], message)
            self.assertTrue(signature.startswith(b"DKIM-Signature: "))
            self.assertTrue(signature.endswith(b"\r\n"))
            for line in signature.split(b"\r\n")[1:-1]:
                self.assertTrue(line.startswith(b" "), line)
            tags = dkim.util.parse_tag_value(signature.split(b":", 1)[1])
            self.assertEqual(tags[b"a"], algorithm)
            self.assertEqual(tags[b"c"], b"relaxed/relaxed")
            self.assertEqual(tags[b"d"], b"example.org")
            self.assertEqual(tags[b"s"], pair.selector.encode())
            self.assertEqual(tags[b"t"], str(NOW).encode())
            names = [n.strip() for n in tags[b"h"].split(b":")]
            self.assertEqual(
                names,
                [
                    b"from",
                    b"to",
                    b"subject",
                    b"date",
                    b"message-id",
                    b"mime-version",
                    b"content-type",
                    b"content-transfer-encoding",
                    b"reply-to",
                    b"list-id",
                    b"from",
                ],
            )

    def test_fromOversigned(self) -> None:
        """
        From: is listed in h= once more than it occurs, so a From: added
        on top after signing breaks the signature, even for a verifier that
        checks exactly what h= lists (as RFC 6376 does; dkimpy adds a
        check of its own, which this verifier leaves out).
        """
        pair = _Keys.get(self, "ed25519")
        message = HEADER + b"\r\nbody\r\n"
        signature = sign([pair.key], message)
        tags = dkim.util.parse_tag_value(signature.split(b":", 1)[1])
        names = [n.strip() for n in tags[b"h"].split(b":")]
        self.assertEqual(names.count(b"from"), 2)

        self.assertTrue(LiteralDKIM(signature + message).verify(dnsfunc=pair.dns))
        forged = signature + b"From: Mallory <ceo@example.org>\r\n" + message
        self.assertFalse(LiteralDKIM(forged).verify(dnsfunc=pair.dns))
        self.assertFalse(dkim.verify(forged, dnsfunc=pair.dns))

    def test_noFrom(self) -> None:
        """A message without From: is signed with h=from (signing its absence)."""
        pair = _Keys.get(self, "ed25519")
        message = b"Subject: no sender\r\n\r\nbody\r\n"
        signature = sign([pair.key], message)
        self.assertVerifies(pair, message, signature)
        self.assertFalse(
            dkim.verify(signature + b"From: x@example.org\r\n" + message, dnsfunc=pair.dns)
        )

    def test_repeatedFieldsAllSigned(self) -> None:
        """A field that occurs twice (two To:) is signed twice; From: three times for two."""
        pair = _Keys.get(self, "ed25519")
        message = (
            b"From: a@example.org\r\nFrom: b@example.org\r\nTo: c@example.net\r\n"
            b"To: d@example.net\r\n\r\nbody\r\n"
        )
        signature = sign([pair.key], message)
        tags = dkim.util.parse_tag_value(signature.split(b":", 1)[1])
        names = [n.strip() for n in tags[b"h"].split(b":")]
        self.assertEqual(names, [b"from", b"from", b"to", b"to", b"from"])
        self.assertVerifies(pair, message, signature)

    def test_headersOnly(self) -> None:
        """A message of header fields and no blank line is signed with an empty body."""
        pair = _Keys.get(self, "rsa")
        message = b"From: a@example.org\r\nSubject: x\r\n"
        self.assertVerifies(pair, message, sign([pair.key], message))

    def test_noHeaderFields(self) -> None:
        """A message that starts with its blank line (no fields at all) is signed too."""
        pair = _Keys.get(self, "ed25519")
        message = b"\r\nonly a body\r\n"
        self.assertVerifies(pair, message, sign([pair.key], message, [1, 1, 1]))

    def test_twoKeys(self) -> None:
        """
        With an RSA and an Ed25519 key for one domain, the message gets one
        signature of each, and both verify.
        """
        rsaPair, edPair = _Keys.get(self, "rsa"), _Keys.get(self, "ed25519")
        dns = DNSStub()
        dns.add(rsaPair.name, rsaPair.record)
        dns.add(edPair.name, edPair.record)
        message = HEADER + b"\r\nbody\r\n"
        signatures = sign([rsaPair.key, edPair.key], message)
        self.assertEqual(signatures.count(b"DKIM-Signature:"), 2)
        checker = dkim.DKIM(signatures + message)
        algorithms = set()
        for index in range(2):
            self.assertTrue(checker.verify(idx=index, dnsfunc=dns))
            algorithms.add(checker.signature_fields[b"a"])
        self.assertEqual(algorithms, {b"rsa-sha256", b"ed25519-sha256"})

    def test_sameAsDkimpy(self) -> None:
        """
        The streamed signature is byte for byte the one dkimpy's own
        C{DKIM.sign} makes of the whole message, with the same time and
        header list (so the private-key operation gives dkimpy's bytes too).
        """
        fixedTime = types.SimpleNamespace(time=lambda: NOW)
        self.patch(dkim, "time", fixedTime)
        for keyType in ["rsa", "ed25519"]:
            pair = _Keys.get(self, keyType)
            private = pair.key.private
            if keyType == "rsa":
                # PKCS#1: what every dkimpy version reads.
                privkey = private.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.TraditionalOpenSSL,
                    serialization.NoEncryption(),
                )
            else:
                privkey = base64.b64encode(
                    private.private_bytes(
                        serialization.Encoding.Raw,
                        serialization.PrivateFormat.Raw,
                        serialization.NoEncryption(),
                    )
                )
            for name, body in BODIES.items():
                message = HEADER + b"\r\n" + body
                ours = sign([pair.key], message, [5] * len(message))
                tags = dkim.util.parse_tag_value(ours.split(b":", 1)[1])
                theirs = dkim.DKIM(message, signature_algorithm=pair.key.algorithm).sign(
                    pair.selector.encode(),
                    b"example.org",
                    privkey,
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=[n.strip() for n in tags[b"h"].split(b":")],
                )
                self.assertEqual(ours, theirs, (keyType, name))

    def test_signatureHeaderTwice(self) -> None:
        """signatureHeader can be asked again and gives the same fields."""
        pair = _Keys.get(self, "ed25519")
        clock = Clock()
        clock.advance(NOW)
        signer = MessageSigner([pair.key], clock)
        signer.write(HEADER + b"\r\nbody  \r\n\r\n")
        self.assertEqual(signer.signatureHeader(), signer.signatureHeader())

    def test_opensslKeys(self) -> None:
        """
        Keys made by openssl (PKCS#8 RSA, the traditional PKCS#1 RSA form,
        Ed25519) load, and their signatures verify against the public key
        that openssl derives.
        """
        folder = self.mktemp()
        os.mkdir(folder)
        commands = {
            "pkcs8.pem": ["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            "pkcs1.pem": ["genrsa", "-traditional"],
            "ed.pem": ["genpkey", "-algorithm", "ed25519"],
        }
        for name, command in commands.items():
            path = os.path.join(folder, name)
            bits = ["2048"] if command[0] == "genrsa" else []
            run = subprocess.run(["openssl", *command, "-out", path, *bits], capture_output=True)
            self.assertEqual(run.returncode, 0, f"openssl (Debian: openssl): {run.stderr!r}")
            os.chmod(path, 0o600)
            with open(path, "rb") as f:
                if name == "pkcs1.pem":
                    self.assertIn(b"BEGIN RSA PRIVATE KEY", f.read())
            key = loadKey("example.org", "s1", path)
            public = subprocess.run(
                ["openssl", "pkey", "-in", path, "-pubout", "-outform", "DER"],
                capture_output=True,
                check=True,
            ).stdout
            if key.keyType == "ed25519":
                # The SubjectPublicKeyInfo ends with the bare 32-octet key (RFC 8410).
                public = public[-32:]
            dns = DNSStub()
            dns.add(
                "s1._domainkey.example.org.",
                f"v=DKIM1; k={key.keyType}; p={base64.b64encode(public).decode()}",
            )
            message = HEADER + b"\r\nbody\r\n"
            self.assertTrue(dkim.verify(sign([key], message) + message, dnsfunc=dns), name)


# Messages built from the awkward pieces: whitespace runs, CRLFs, bare CRs,
# dots, 8-bit bytes; never a bare LF (the session refuses those, and dkimpy
# reads one as a line end).
_pieces = st.sampled_from(
    [
        b"a",
        b"word",
        b" ",
        b"  ",
        b"\t",
        b"\r\n",
        b"\r\n\r\n",
        b"\r",
        b".",
        b"\xc3\xa9",
        b"\xff",
        b"x" * 100,
    ]
)
bodies = st.lists(_pieces, max_size=60).map(b"".join)
headerValues = st.lists(
    st.sampled_from([b"v", b" ", b"\t", b"\r\n ", b"\r\n\t", b"\xc3\xa9"]), max_size=8
).map(lambda parts: b"x" + b"".join(parts))
headerBlocks = st.lists(
    st.tuples(st.sampled_from([b"From", b"To", b"Subject", b"X-Other", b"cc"]), headerValues),
    max_size=6,
).map(lambda fields: b"".join(name + b":" + value + b"\r\n" for name, value in fields))
cuts = st.lists(st.integers(min_value=0, max_value=20), max_size=40)


def splitAt(data: bytes, sizes: list) -> list:
    """C{data} in pieces of C{sizes} (empty pieces included), the rest in one piece."""
    pieces, offset = [], 0
    for size in sizes:
        pieces.append(data[offset : offset + size])
        offset += size
    pieces.append(data[offset:])
    return pieces


class StreamingTests(unittest.TestCase):
    """
    How the message is cut into chunks never changes the signature. The
    properties run derandomized, so CI is reproducible.
    """

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(bodies, cuts)
    def test_bodyHashLikeDkimpy(self, body: bytes, sizes: list) -> None:
        """
        The streamed relaxed body hash equals SHA-256 of dkimpy's
        canonicalisation of the whole body, however the body is cut.
        """
        h = RelaxedBodyHash()
        for piece in splitAt(body, sizes):
            h.update(piece)
        self.assertEqual(h.digest(), hashlib.sha256(Relaxed.canonicalize_body(body)).digest())

    @settings(max_examples=100, deadline=None, derandomize=True, database=None)
    @given(headerBlocks, bodies, cuts)
    def test_chunkingDoesNotMatter(self, header: bytes, body: bytes, sizes: list) -> None:
        """
        A message (generated fields, folded or not, and body) signed in
        random chunks, split even inside CRLF, gets the signature it gets
        when written at once, and dkimpy verifies it.
        """
        pair = _Keys.get(self, "ed25519")
        message = b"From: a@example.org\r\n" + header + b"\r\n" + body
        whole = sign([pair.key], message)
        pieces = [len(p) for p in splitAt(message, sizes)]
        self.assertEqual(sign([pair.key], message, pieces), whole)
        # Hashed chunk by chunk as they come, as past HELD_BODY.
        self.assertEqual(sign([pair.key], message, pieces, holdBody=0), whole)
        self.assertTrue(dkim.verify(whole + message, dnsfunc=pair.dns), repr(message))

    def test_pastHeldBody(self) -> None:
        """
        A body longer than L{HELD_BODY}, with runs of spaces, tabs and empty
        lines at every offset, gets one signature whether it is written at
        once, in chunks that end just before, at and after the held limit,
        or hashed chunk by chunk; dkimpy verifies it.
        """
        pair = _Keys.get(self, "ed25519")
        line = b"word  \t and\tmore   words \r\n\r\n \r\n"
        body = line * (3 * HELD_BODY // len(line) + 7) + b"last   \r\n\r\n"
        message = HEADER + b"\r\n" + body
        self.assertGreater(len(body), 3 * HELD_BODY)
        whole = sign([pair.key], message, holdBody=len(message))
        self.assertTrue(dkim.verify(whole + message, dnsfunc=pair.dns))
        for size in [HELD_BODY - 1, HELD_BODY, HELD_BODY + 1, 4097, 33, len(message)]:
            for hold in [0, 1, 40, HELD_BODY]:
                self.assertEqual(
                    sign([pair.key], message, [size] * len(message), holdBody=hold),
                    whole,
                    (size, hold),
                )

    def test_everyChunkSize(self) -> None:
        """
        Chunks of every size from 1 byte to the whole message give one
        signature; so do a few sizes for a message of long lines.
        """
        pair = _Keys.get(self, "ed25519")
        body = b"".join(v for k, v in BODIES.items() if k != "long lines") + b"\r\n \r\n"
        message = HEADER + b"\r\n" + body
        whole = sign([pair.key], message)
        self.assertTrue(dkim.verify(whole + message, dnsfunc=pair.dns))
        for size in range(1, len(message) + 1):
            self.assertEqual(sign([pair.key], message, [size] * len(message)), whole, size)
        message = HEADER + b"\r\n" + BODIES["long lines"]
        whole = sign([pair.key], message)
        for size in [1, 2, 3, 5, 64, 999, 4096, 10001, 65536]:
            self.assertEqual(sign([pair.key], message, [size] * len(message)), whole, size)

    def test_fiftyMegabytes(self) -> None:
        """
        A 50 MB message is signed in bounded memory: the peak traced while
        writing and signing stays under 2 MB, and bh= is the hash of the
        whole body.
        """
        pair = _Keys.get(self, "rsa")
        # Lines of 79 octets in chunks of 65537: chunk ends fall everywhere,
        # inside words, whitespace runs and CRLFs.
        line = b"The quick  brown fox\tjumps over the lazy dog .. 0123456789 abcdefghijklmn  \r\n"
        size = 65537
        count = 50 * 1024 * 1024 // size + 1
        lines = -(-count * size // len(line))
        stream = line * (size // len(line) + 2)
        clock = Clock()
        clock.advance(NOW)
        tracemalloc.start()
        try:
            signer = MessageSigner([pair.key], clock)
            signer.write(HEADER + b"\r\n")
            for index in range(count):
                offset = index * size % len(line)
                signer.write(stream[offset : offset + size])
            # The rest of the last line.
            signer.write(line[count * size % len(line) :])
            signature = signer.signatureHeader()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertGreater(count * size, 50 * 1024 * 1024)
        self.assertLess(peak, 2 * 1024 * 1024)

        # The body is the line, over and over: its canonical form is
        # dkimpy's canonical form of the line, over and over.
        expected = hashlib.sha256()
        block = Relaxed.canonicalize_body(line) * 1000
        for _ in range(lines // 1000):
            expected.update(block)
        expected.update(Relaxed.canonicalize_body(line) * (lines % 1000))
        tags = dkim.util.parse_tag_value(signature.split(b":", 1)[1])
        self.assertEqual(tags[b"bh"], base64.b64encode(expected.digest()))


# Header lines as they come: fields (names with and without the oddities
# dkimpy's parser allows), continuations, mbox From lines, and lines that
# are none of those.
_headerLines = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from([b"From", b"to", b"X-A", b"Subject", b"x:y", b"~!"]),
            st.lists(
                st.sampled_from([b"v", b" ", b"\t", b"\x0b", b"\x0c", b"\xc3\xa9", b":", b"  x  "]),
                max_size=6,
            ).map(b"".join),
        ).map(lambda f: f[0] + b":" + f[1]),
        st.lists(st.sampled_from([b" ", b"\t", b"w", b"\x0b"]), min_size=1, max_size=5).map(
            lambda parts: b" " + b"".join(parts)
        ),
        st.sampled_from([b"From alice@example.org Mon", b"no colon", b"Bad Name: x", b":x"]),
    ),
    max_size=8,
)


class DkimpyEquivalenceTests(unittest.TestCase):
    """
    The header is parsed and canonicalised by bytes operations of our own,
    for speed; they must do exactly what dkimpy's code does.
    """

    @settings(max_examples=500, deadline=None, derandomize=True, database=None)
    @given(_headerLines)
    def test_parseHeader(self, lines: list) -> None:
        """parseHeader returns what dkimpy's rfc822_parse does, and refuses what it refuses."""
        block = b"".join(line + b"\r\n" for line in lines)
        try:
            expected = dkim.rfc822_parse(block)[0]
        except (dkim.MessageFormatError, IndexError):
            self.assertRaises(MessageNotSignable, parseHeader, block)
        else:
            self.assertEqual(parseHeader(block), expected)

    @settings(max_examples=500, deadline=None, derandomize=True, database=None)
    @given(_headerLines)
    def test_relaxed(self, lines: list) -> None:
        """The relaxed canonical form of every field is dkimpy's."""
        block = b"".join(line + b"\r\n" for line in lines)
        try:
            headers = dkim.rfc822_parse(block)[0]
        except (dkim.MessageFormatError, IndexError):
            return
        self.assertEqual(
            _Relaxed.canonicalize_headers(headers), Relaxed.canonicalize_headers(headers)
        )

    def test_relaxedExamples(self) -> None:
        """Runs of spaces and tabs, folding, and other whitespace at the ends."""
        for value in (
            b" a  \t b\r\n",
            b"\x0b a\r\n\t b \x0c\r\n",
            b"\r\n",
            b" \t \r\n",
            b"a\r\r\nb\r\n",
        ):
            self.assertEqual(
                _Relaxed.canonicalize_headers([(b"X-A ", value)]),
                Relaxed.canonicalize_headers([(b"X-A ", value)]),
                value,
            )

    def test_relaxedBareLF(self) -> None:
        """
        A bare LF inside a field is removed, as newer dkimpy does (1.1.8)
        (Debian bookworm's 1.1.4 kept it). No message mailauth accepts holds
        one (DATA refuses bare LF with 550 5.6.2), so the difference between
        the two dkimpy versions never reaches a signature.
        """
        self.assertEqual(
            _Relaxed.canonicalize_headers([(b"X-A ", b"a\nb\r\n")]), [(b"x-a", b"ab\r\n")]
        )


class UnsignableTests(unittest.TestCase):
    """Messages that cannot be signed are reported, never signed wrongly."""

    def test_headerTooLarge(self) -> None:
        """
        A header block over the limit is not held: the signer stops
        keeping it, and signatureHeader raises MessageNotSignable.
        """
        pair = _Keys.get(self, "ed25519")
        signer = MessageSigner([pair.key], Clock(), maxHeaderSize=1000)
        for _ in range(100):
            signer.write(b"X-Filler: " + b"y" * 90 + b"\r\n")
        signer.write(b"\r\nbody\r\n")
        e = self.assertRaises(MessageNotSignable, signer.signatureHeader)
        self.assertIn("larger than 1000 bytes", str(e))

    def test_headerUnderLimit(self) -> None:
        """A header block just under the limit, ended in the same chunk as more body, signs."""
        pair = _Keys.get(self, "ed25519")
        signer = MessageSigner([pair.key], Clock(), maxHeaderSize=1000)
        header = b"From: a@example.org\r\nX-Filler: " + b"y" * (998 - 33) + b"\r\n"
        self.assertEqual(len(header), 998)
        signer.write(header + b"\r\n" + b"body\r\n" * 1000)
        self.assertTrue(signer.signatureHeader().startswith(b"DKIM-Signature:"))

    def test_malformedHeader(self) -> None:
        """A line in the header that is not a field (no colon) makes the message unsignable."""
        pair = _Keys.get(self, "ed25519")
        for message in [
            b"From: a@example.org\r\nnot a field\r\n\r\nbody\r\n",
            b" continuation first\r\nFrom: a@example.org\r\n\r\nbody\r\n",
            b"From: a@example.org\r\njust text, no blank line\r\n",
        ]:
            signer = MessageSigner([pair.key], Clock())
            signer.write(message)
            e = self.assertRaises(MessageNotSignable, signer.signatureHeader)
            self.assertIn("header does not parse", str(e))


class KeyRingTests(unittest.TestCase):
    """Which senders get signed."""

    def setUp(self) -> None:
        self.pair = _Keys.get(self, "ed25519")
        self.ring = KeyRing({"example.org": (self.pair.key,)}, Clock())

    def test_exactDomain(self) -> None:
        """
        The envelope sender's domain chooses the key, compared without
        regard to case or a trailing dot; subdomains, other domains and the
        null sender get no signer.
        """
        for sender in ["alice@example.org", "Alice@EXAMPLE.org", "a@example.org."]:
            self.assertIsInstance(self.ring.signer(sender), MessageSigner, sender)
            self.assertEqual(self.ring.keysFor(sender), (self.pair.key,))
        for sender in [
            "",
            "alice@lists.example.org",
            "alice@example.net",
            "example.org",
            "@example.org",
            "alice@notexample.org",
            "a@" + "\u00e9" * 64 + ".org",
        ]:
            self.assertIsNone(self.ring.signer(sender), sender)

    def test_internationalDomain(self) -> None:
        """A sender in an internationalised domain is signed by the key of its A-label."""
        ring = KeyRing({"xn--bcher-kva.example": (self.pair.key,)}, Clock())
        self.assertEqual(ring.keysFor("j\u00f6rg@B\u00fccher.example"), (self.pair.key,))
        self.assertEqual(ring.keysFor("a@xn--bcher-kva.example"), (self.pair.key,))

    def test_internationalDomainAsEverywhereElse(self) -> None:
        """
        The A-label is the one the rest of mailauth compares domains in
        (IDNA 2008 with UTS 46, as L{mailauth.addresses.domainKey}), not
        Python's IDNA 2003 codec, which reads C{fa\u00df.de} as C{fass.de}:
        with it, mail from a sender of C{fa\u00df.de} went out unsigned
        although its domain had a key, or signed by the key of another
        domain, C{fass.de}, if that had one.
        """
        other = _Keys.get(self, "rsa")
        ring = KeyRing({"xn--fa-hia.de": (self.pair.key,), "fass.de": (other.key,)}, Clock())
        self.assertEqual(ring.keysFor("j\u00f6rg@fa\u00df.de"), (self.pair.key,))
        self.assertEqual(ring.keysFor("j\u00f6rg@FASS.de"), (other.key,))

    def test_signerSigns(self) -> None:
        """The signer the ring hands out signs with the domain's key at the clock's time."""
        clock = Clock()
        clock.advance(NOW + 5)
        ring = KeyRing({"example.org": (self.pair.key,)}, clock)
        signer = ring.signer("alice@example.org")
        message = HEADER + b"\r\nbody\r\n"
        signer.write(message)
        signature = signer.signatureHeader()
        self.assertIn(b"t=%d;" % (NOW + 5), signature.replace(b"\r\n ", b" "))
        self.assertTrue(dkim.verify(signature + message, dnsfunc=self.pair.dns))


class KeyRingReloadTests(unittest.TestCase):
    """SIGHUP's reload of the keys: all new ones, or all old ones."""

    def test_reloaded(self) -> None:
        """The keys the loader reads now sign new messages; one line says so."""
        old, new = _Keys.get(self, "ed25519"), _Keys.get(self, "rsa")
        loaded = [{"example.org": (new.key,), "example.net": (new.key, old.key)}]
        ring = KeyRing({"example.org": (old.key,)}, Clock(), load=loaded.pop)
        with capturedLogs() as events:
            ring.reload()
        self.assertEqual(ring.keysFor("a@example.org"), (new.key,))
        self.assertEqual(ring.keysFor("a@example.net"), (new.key, old.key))
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["DKIM keys reloaded: 3 key(s) for example.net example.org"],
        )

    def test_failedReloadKeepsEveryOldKey(self) -> None:
        """
        A key the loader cannot use is logged as an error, line by line, and
        every key read before stays in use.
        """
        old = _Keys.get(self, "ed25519")

        def broken():
            raise ConfigError(["test.conf: [dkim] example.org: a.pem: gone", "second"])

        ring = KeyRing({"example.org": (old.key,)}, Clock(), load=broken)
        with capturedLogs() as events:
            ring.reload()
        self.assertEqual(ring.keysFor("a@example.org"), (old.key,))
        self.assertEqual(
            [(e["log_level"], formatEvent(e)) for e in events],
            [
                (
                    LogLevel.error,
                    "DKIM keys not reloaded, signing with the old ones: "
                    "test.conf: [dkim] example.org: a.pem: gone",
                ),
                (LogLevel.error, "DKIM keys not reloaded, signing with the old ones: second"),
            ],
        )

    def test_withoutLoader(self) -> None:
        """A ring made without a loader keeps its keys and logs nothing."""
        old = _Keys.get(self, "ed25519")
        ring = KeyRing({"example.org": (old.key,)}, Clock())
        with capturedLogs() as events:
            ring.reload()
        self.assertEqual((ring.keysFor("a@example.org"), events), ((old.key,), []))


class LoadKeysTests(unittest.TestCase):
    """Reading the keys of [dkim]: each bad one is one line naming the file."""

    def config(self, lines: str):
        return loadText(CONFIG + "[dkim]\n" + lines, "test.conf")

    def problems(self, lines: str) -> tuple:
        return self.assertRaises(ConfigError, loadKeys, self.config(lines)).problems

    def test_loads(self) -> None:
        """Both key types load, the type read from the PEM file, several keys a domain."""
        edPair, rsaPair = _Keys.get(self, "ed25519"), _Keys.get(self, "rsa")
        keys = loadKeys(
            self.config(
                f"example.org = {rsaPair.selector}:{rsaPair.path} {edPair.selector}:{edPair.path}\n"
            )
        )
        [rsaKey, edKey] = keys["example.org"]
        self.assertEqual((rsaKey.keyType, rsaKey.algorithm), ("rsa", b"rsa-sha256"))
        self.assertEqual((edKey.keyType, edKey.algorithm), ("ed25519", b"ed25519-sha256"))
        self.assertEqual(rsaKey.record(), rsaPair.record)
        self.assertEqual(edKey.record(), edPair.record)
        self.assertNotIn("private", repr(edKey).split("publicKey")[1])

    def test_missingFile(self) -> None:
        """A key file that does not exist."""
        self.assertEqual(
            self.problems("example.org = s1:/nonexistent/key.pem\n"),
            (
                "test.conf: [dkim] example.org: /nonexistent/key.pem: cannot read: "
                "No such file or directory",
            ),
        )

    def writeFile(self, data: bytes, mode: int = 0o640) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        return path

    def test_notPEM(self) -> None:
        """A file that is not a PEM private key (here: a public key, and junk)."""
        public = self.writeFile(
            b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n"
        )
        junk = self.writeFile(b"hello\n")
        problems = self.problems(f"example.org = s1:{public} s2:{junk}\n")
        self.assertEqual(
            problems,
            tuple(
                f"test.conf: [dkim] example.org: {p}: not a PEM private key (RSA or Ed25519)"
                for p in (public, junk)
            ),
        )

    def test_encrypted(self) -> None:
        """A key encrypted with a passphrase cannot be used."""
        path = self.mktemp()
        subprocess.run(
            [
                "openssl",
                "genpkey",
                "-algorithm",
                "ed25519",
                "-aes256",
                "-pass",
                "pass:secret",
                "-out",
                path,
            ],
            check=True,
            capture_output=True,
        )
        os.chmod(path, 0o600)
        self.assertEqual(
            self.problems(f"example.org = s1:{path}\n"),
            (
                f"test.conf: [dkim] example.org: {path}: the key is encrypted; "
                "store it without a passphrase",
            ),
        )

    def test_wrongType(self) -> None:
        """An EC (P-256) key cannot make DKIM signatures."""
        path = self.mktemp()
        subprocess.run(
            [
                "openssl",
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                path,
            ],
            check=True,
            capture_output=True,
        )
        os.chmod(path, 0o600)
        [problem] = self.problems(f"example.org = s1:{path}\n")
        self.assertRegex(
            problem,
            rf"^test\.conf: \[dkim\] example\.org: {re.escape(path)}: "
            r"a \w+ cannot make DKIM signatures \(RSA or Ed25519 only\)$",
        )

    def test_shortRSA(self) -> None:
        """An RSA key under 1024 bits is refused (RFC 8301)."""
        path = self.mktemp()
        subprocess.run(
            [
                "openssl",
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:768",
                "-out",
                path,
            ],
            check=True,
            capture_output=True,
        )
        os.chmod(path, 0o600)
        [problem] = self.problems(f"example.org = s1:{path}\n")
        self.assertIn(": an RSA key of 768 bits is too short to sign", problem)

    def test_unsafeMode(self) -> None:
        """A key file others may read, or the group may change, is refused."""
        pair = _Keys.get(self, "ed25519")
        with open(pair.path, "rb") as f:
            pem = f.read()
        readable = self.writeFile(pem, 0o644)
        writable = self.writeFile(pem, 0o660)
        self.assertEqual(
            self.problems(f"example.org = a:{readable} b:{writable}\n"),
            (
                f"test.conf: [dkim] example.org: {readable}: mode 0644 lets other users read "
                "or change the private key: chmod 0640 it",
                f"test.conf: [dkim] example.org: {writable}: mode 0660 lets other users read "
                "or change the private key: chmod 0640 it",
            ),
        )
        self.assertEqual(loadKey("example.org", "a", self.writeFile(pem, 0o600)).keyType, "ed25519")

    def test_everyProblem(self) -> None:
        """Problems of several domains are reported together."""
        problems = self.problems(
            "example.org = s1:/nonexistent/a\nexample.net = s1:/nonexistent/b\n"
        )
        self.assertEqual(len(problems), 2)


class KeygenTests(unittest.TestCase):
    """C{mailauth dkim keygen}."""

    def run_(self, *argv: str) -> tuple:
        out, err = io.StringIO(), io.StringIO()
        status = main(["dkim", "keygen", *argv], Console(io.BytesIO(), out, err))
        return status, out.getvalue(), err.getvalue()

    def test_fileAndRecord(self) -> None:
        """
        keygen writes DIR/DOMAIN.SELECTOR.pem with mode 0640 whatever the
        umask, creates DIR, and prints the record for SELECTOR._domainkey.DOMAIN.
        """
        keydir = os.path.join(self.mktemp(), "dkim")
        old = os.umask(0o077)
        try:
            status, out, err = self.run_(
                "Example.ORG", "--selector", "Sel1", "--type", "ed25519", "--keydir", keydir
            )
        finally:
            os.umask(old)
        self.assertEqual((status, err), (0, ""))
        path = os.path.join(keydir, "example.org.sel1.pem")
        self.assertEqual(os.listdir(keydir), ["example.org.sel1.pem"])
        self.assertEqual(os.stat(path).st_mode & 0o7777, 0o640)
        lines = out.splitlines()
        self.assertEqual(lines[1], f";   example.org = sel1:{path}")
        self.assertRegex(
            lines[-1],
            r"^sel1\._domainkey\.example\.org\. IN TXT "
            r'"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}="$',
        )
        with open(path, "rb") as f:
            self.assertTrue(f.read().startswith(b"-----BEGIN PRIVATE KEY-----\n"))

    def test_rsaRecordSplit(self) -> None:
        """An RSA-2048 record is longer than 255 octets: it is printed as two strings."""
        status, out, _ = self.run_("example.org", "--keydir", self.mktemp())
        self.assertEqual(status, 0)
        record = out.splitlines()[-1]
        strings = re.findall(r'"([^"]*)"', record)
        self.assertEqual([len(s) for s in strings][0], 255)
        self.assertEqual(len(strings), 2)
        self.assertTrue("".join(strings).startswith("v=DKIM1; k=rsa; p=MIIBIjAN"))

    def test_refusesToOverwrite(self) -> None:
        """An existing key file is left alone, and the command fails saying so."""
        keydir = self.mktemp()
        self.assertEqual(self.run_("example.org", "--selector", "s", "--keydir", keydir)[0], 0)
        path = os.path.join(keydir, "example.org.s.pem")
        with open(path, "rb") as f:
            before = f.read()
        status, out, err = self.run_(
            "example.org", "--selector", "s", "--type", "ed25519", "--keydir", keydir
        )
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(
            err, f"mailauth: {path} exists; not overwritten (choose another --selector)\n"
        )
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_badArguments(self) -> None:
        """A bad domain or selector is one error line; nothing is written."""
        keydir = self.mktemp()
        self.assertEqual(
            self.run_("exa mple.org", "--keydir", keydir),
            (1, "", "mailauth: 'exa mple.org' is not a domain name\n"),
        )
        self.assertEqual(
            self.run_("example.org", "--selector", "_bad", "--keydir", keydir),
            (
                1,
                "",
                "mailauth: '_bad' is not a DKIM selector (letters, digits, hyphens, "
                "dot-separated)\n",
            ),
        )
        self.assertFalse(os.path.exists(keydir))
        self.assertEqual(self.run_("example.org", "--type", "dsa")[0], 2)

    def test_withoutDkimpy(self) -> None:
        """Without dkimpy installed, keygen says what to install."""
        with mock.patch.dict(sys.modules, {"dkim": None}), mock.patch.dict(mailauth.__dict__):
            # Forget the imported module, so that the command imports it again.
            del sys.modules["mailauth.dkimsign"], mailauth.__dict__["dkimsign"]
            status, out, err = self.run_("example.org", "--keydir", self.mktemp())
        self.assertEqual((status, out), (1, ""))
        self.assertIn(
            "DKIM needs the Python package dkimpy (Debian: apt install python3-dkim;", err
        )

    def test_defaultSelector(self) -> None:
        """The default selector names the month, and Ed25519's ends in e."""
        when = 1796083200 + 86400 * 3  # early December 2026
        self.assertEqual(defaultSelector("rsa", when), "mail202612")
        self.assertEqual(defaultSelector("ed25519", when), "mail202612e")
        status, out, _ = self.run_("example.org", "--keydir", self.mktemp())
        self.assertRegex(out.splitlines()[-1], r"^mail\d{6}\._domainkey\.example\.org\. ")
