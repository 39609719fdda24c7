#!/usr/bin/env python3
"""
What DKIM signing costs per message: CPU time and messages per second of one
core, for Ed25519 and RSA-2048, printed; nothing is asserted.

    .venv/bin/python bench/signcost.py                 # 10 KB messages, 2 s a case
    .venv/bin/python bench/signcost.py --size 100K --seconds 5

Each case streams a message through mailauth.dkimsign.MessageSigner in the
chunks the session hands on (write: reactor thread; a body up to 64 KiB is
only held there), then makes the signature (signatureHeader, which hashes
the held body: a worker thread in the daemon); the two are timed apart.
For comparison, the last rows sign the same message the way dkimpy's own
dkim.sign does it (whole message in memory, its pure-Python RSA).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dkim  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from mailauth.config import parseSize  # noqa: E402
from mailauth.dkimsign import MessageSigner, keygen, loadKey  # noqa: E402

CHUNK = 16384


class WallClock:
    def seconds(self) -> float:
        return time.time()


def makeMessage(size: int) -> bytes:
    """A plain-text message of about C{size} octets, 72-column lines."""
    header = (
        b"Received: from client.example.net ([192.0.2.7])\r\n"
        b"\t(authenticated as alice@example.org)\r\n"
        b"\tby mail.example.org (mailauth) with ESMTPSA id 5F3A9C21B0D4\r\n"
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n"
        b"\tfor <bob@example.net>; Tue, 01 Dec 2026 10:00:00 +0100\r\n"
        b"From: Alice Example <alice@example.org>\r\n"
        b"To: Bob Example <bob@example.net>\r\n"
        b"Subject: The quarterly report, with the figures we discussed\r\n"
        b"Date: Tue, 01 Dec 2026 10:00:00 +0100\r\n"
        b"Message-ID: <20261201100000.5F3A9C21B0D4@example.org>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
    )
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eius.\r\n"
    body = (line * (size // len(line) + 1))[: max(size - len(header), 0)]
    return header + body.rsplit(b"\r\n", 1)[0] + b"\r\n"


def measure(work, seconds: float, prepare=lambda: None) -> tuple:
    """
    Run C{work(prepare())} for about C{seconds}, timing only C{work}:
    (runs, CPU seconds, wall seconds).
    """
    runs, cpu, wall = 0, 0.0, 0.0
    while wall < seconds:
        inputs = [prepare() for _ in range(10)]
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for item in inputs:
            work(item)
        cpu += time.process_time() - cpu0
        wall += time.perf_counter() - wall0
        runs += 10
    return runs, cpu, wall


def streamed(key, message: bytes):
    clock = WallClock()
    chunks = [message[i : i + CHUNK] for i in range(0, len(message), CHUNK)]

    def write(ignored=None):
        signer = MessageSigner([key], clock)
        for chunk in chunks:
            signer.write(chunk)
        return signer

    def sign(signer):
        # A signer fresh from write (made outside the timing): its body
        # is still held, to be hashed here as in the daemon.
        signer.signatureHeader()

    def both(ignored):
        write().signatureHeader()

    return write, sign, both


def dkimpySign(key, message: bytes):
    private = key.private
    if key.keyType == "rsa":
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

    def sign(ignored):
        dkim.sign(
            message,
            key.selector.encode(),
            key.domain.encode(),
            privkey,
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=key.algorithm,
        )

    return sign


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--size", default="10K", help="message size (default 10K)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per case (default 2)")
    args = parser.parse_args()
    message = makeMessage(parseSize(args.size))

    with tempfile.TemporaryDirectory() as keydir:
        keys = {}
        for keyType in ("ed25519", "rsa"):
            made = keygen("example.org", None, keyType, keydir, time.time())
            keys[keyType] = loadKey("example.org", made.selector, made.path)

        print(
            f"DKIM signing, {len(message)}-octet message, chunks of {CHUNK}, "
            f"{args.seconds:g} s a case; dkimpy from {os.path.dirname(dkim.__file__)}"
        )
        print(f"{'case':<44} {'CPU ms/msg':>11} {'msgs/s (1 core)':>16}")
        for keyType, label in (("ed25519", "ed25519"), ("rsa", "rsa-2048")):
            write, sign, both = streamed(keys[keyType], message)
            for name, work, prepare in (
                (f"{label}: write (reactor)", write, lambda: None),
                (f"{label}: signatureHeader (thread)", sign, write),
                (f"{label}: both", both, lambda: None),
                (
                    f"{label}: dkimpy's dkim.sign, for comparison",
                    dkimpySign(keys[keyType], message),
                    lambda: None,
                ),
            ):
                runs, cpu, wall = measure(work, args.seconds, prepare)
                print(f"{name:<44} {cpu / runs * 1000:>11.3f} {runs / cpu:>16.0f}", flush=True)


if __name__ == "__main__":
    main()
