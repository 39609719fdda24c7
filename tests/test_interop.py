"""
Real clients against the real service: swaks, msmtp and curl from Debian,
each with every mechanism it supports (PLAIN, LOGIN, CRAM-MD5, and msmtp's
OAUTHBEARER and XOAUTH2), over STARTTLS and over implicit TLS; each
message is found in the Maildir and the log shows the mechanism the client
really used.

The tools are installed by C{.ci/run}; a missing one fails the test.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.harness import BOB_PASSWORD, AttackMixin
from tests.support import TokenIssuer

LOGIN = "bob@example.test"
PASSWORD = BOB_PASSWORD.decode()
RECIPIENT = "alice.plain@example.test"
LISTENERS = {"starttls": "submission", "implicit": "submissions"}
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


def program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is not installed: apt-get install {name} "
                             "(.ci/run installs it)")
    return path


def message(subject: str, newline: str) -> bytes:
    return newline.join([
        f"From: {LOGIN}", f"To: {RECIPIENT}", f"Subject: {subject}", "",
        "Sent by a real client.", ".a line that starts with a dot", "",
    ]).encode()


class ClientTestsMixin(AttackMixin):
    def swaks(self, port: int, tls: str, mechanism: str, subject: str) -> list:
        return [program("swaks"), "--server", f"127.0.0.1:{port}",
                "--tls" if tls == "starttls" else "--tlsc",
                "--auth", mechanism, "--auth-user", LOGIN, "--auth-password", PASSWORD,
                "--from", LOGIN, "--to", RECIPIENT, "--helo", "client.example",
                "--header", f"Subject: {subject}", "--body", "Sent by a real client.",
                "--timeout", "30"], None

    def msmtp(self, port: int, tls: str, mechanism: str, subject: str) -> list:
        config = os.path.abspath(self.mktemp())
        with open(config, "w") as f:
            f.write(f"""\
account test
host 127.0.0.1
port {port}
tls on
tls_starttls {"on" if tls == "starttls" else "off"}
tls_certcheck off
auth {mechanism.lower()}
user {LOGIN}
password {PASSWORD}
from {LOGIN}
domain client.example
timeout 30
account default : test
""")
        os.chmod(config, 0o600)
        return [program("msmtp"), "-C", config, RECIPIENT], message(subject, "\n")

    def curl(self, port: int, tls: str, mechanism: str, subject: str) -> list:
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(message(subject, "\r\n"))
        scheme = "smtp" if tls == "starttls" else "smtps"
        return [program("curl"), "--silent", "--show-error", "--insecure", "--ssl-reqd",
                "--max-time", "30", "--url", f"{scheme}://127.0.0.1:{port}/client.example",
                "--user", f"{LOGIN}:{PASSWORD}", "--login-options", f"AUTH={mechanism}",
                "--mail-from", LOGIN, "--mail-rcpt", RECIPIENT, "--upload-file", path], None

    @defer.inlineCallbacks
    def deliver(self, tool: str, mechanism: str, tls: str):
        subject = f"interop {tool} {mechanism} {tls}"
        port = self.daemon.ports[LISTENERS[tls]]
        argv, stdin = getattr(self, tool)(port, tls, mechanism, subject)
        success = self.log.waitFor(r"auth success: client=\[127\.0\.0\.1\] mechanism=")
        result = yield threads.deferToThread(
            subprocess.run, argv, input=stdin, capture_output=True, timeout=60)
        output = (result.stdout + result.stderr).decode(errors="replace")
        self.assertEqual(result.returncode, 0, output)
        logged = yield success
        self.assertIn(f"mechanism={mechanism} login=<{LOGIN}>", logged)
        [(_, content)] = self.daemon.delivered(RECIPIENT)
        self.assertIn(f"Subject: {subject}\n".encode(), content)
        self.assertIn(b" with ESMTPSA id ", content)
        self.assertIn(f"(authenticated as {LOGIN})".encode(), content)
        if tool != "swaks":
            self.assertTrue(content.endswith(b"\n.a line that starts with a dot\n"), content)


def _addTests(cls):
    for tool in ("swaks", "msmtp", "curl"):
        for mechanism in MECHANISMS:
            for tls in LISTENERS:
                def test(self, tool=tool, mechanism=mechanism, tls=tls):
                    return self.deliver(tool, mechanism, tls)

                words = "STARTTLS" if tls == "starttls" else "implicit TLS"
                test.__doc__ = (f"{tool} delivers over {words} with AUTH {mechanism}; the "
                                "message arrives in the Maildir with our Received header.")
                name = f"test_{tool}{mechanism.title().replace('-', '')}" \
                       f"{'StartTLS' if tls == 'starttls' else 'ImplicitTLS'}"
                test.__name__ = name
                setattr(cls, name, test)
    return cls


@_addTests
class ClientTests(ClientTestsMixin, unittest.TestCase):
    """swaks, msmtp and curl, every mechanism, both kinds of TLS."""


class OAuthClientTests(AttackMixin, unittest.TestCase):
    """
    msmtp's OAUTHBEARER and XOAUTH2, the token from C{passwordeval}, over
    both kinds of TLS, against tokens minted here and the issuer's keys in
    the daemon's JWKS file.
    """

    issuer = TokenIssuer("ec", "k1")
    settings = {
        "auth": {"mechanisms": "PLAIN LOGIN OAUTHBEARER XOAUTH2"},
        "oauth": {"issuer": TokenIssuer.ISSUER, "audience": TokenIssuer.AUDIENCE,
                  "jwks": "{dir}/jwks.json"},
    }
    files = {"jwks.json": issuer.jwks()}

    def msmtp(self, tls: str, mechanism: str, token: str, subject: str) -> list:
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        tokenFile = os.path.join(directory, "token")
        with open(tokenFile, "w") as f:
            f.write(token + "\n")
        config = os.path.join(directory, "msmtprc")
        with open(config, "w") as f:
            f.write(f"""\
account test
host 127.0.0.1
port {self.daemon.ports[LISTENERS[tls]]}
tls on
tls_starttls {"on" if tls == "starttls" else "off"}
tls_certcheck off
auth {mechanism.lower()}
user {LOGIN}
passwordeval cat {tokenFile}
from {LOGIN}
domain client.example
timeout 30
account default : test
""")
        os.chmod(config, 0o600)
        return [program("msmtp"), "-C", config, RECIPIENT]

    @defer.inlineCallbacks
    def send(self, tls: str, mechanism: str, token: str, subject: str):
        # --debug prints the exchange: the replies as msmtp read them.
        argv = self.msmtp(tls, mechanism, token, subject) + ["--debug"]
        result = yield threads.deferToThread(
            subprocess.run, argv, input=message(subject, "\n"), capture_output=True, timeout=60)
        return result.returncode, (result.stdout + result.stderr).decode(errors="replace")

    @defer.inlineCallbacks
    def deliver(self, mechanism: str, tls: str):
        subject = f"interop msmtp {mechanism} {tls}"
        success = self.log.waitFor(r"auth success: client=\[127\.0\.0\.1\] mechanism=")
        status, output = yield self.send(tls, mechanism, self.issuer.mint(LOGIN), subject)
        self.assertEqual(status, 0, output)
        logged = yield success
        self.assertIn(f"mechanism={mechanism} login=<{LOGIN}>", logged)
        [(_, content)] = self.daemon.delivered(RECIPIENT)
        self.assertIn(f"Subject: {subject}\n".encode(), content)
        self.assertIn(f"(authenticated as {LOGIN})".encode(), content)

    @defer.inlineCallbacks
    def refused(self, mechanism: str, tls: str):
        failure = self.log.waitFor(r"auth failure: client=\[127\.0\.0\.1\] mechanism=")
        status, output = yield self.send(tls, mechanism, self.issuer.mint(LOGIN, lifetime=-300),
                                         "refused")
        self.assertNotEqual(status, 0, output)
        # msmtp read the error challenge, answered it, and got the 535 after it.
        self.assertIn(f"authentication failed (method {mechanism})", output)
        challenge = re.search(r"<-- 334 ([A-Za-z0-9+/=]+)\r?\n--> \r?\n<-- 535 5\.7\.8 ", output)
        self.assertIsNotNone(challenge, output)
        status = json.loads(base64.b64decode(challenge.group(1)))["status"]
        self.assertEqual(status, "invalid_token" if mechanism == "OAUTHBEARER" else "401")
        self.assertIn(f"mechanism={mechanism} login=<{LOGIN}>", (yield failure))
        self.assertEqual(self.daemon.delivered(RECIPIENT), [])


def _addOAuthTests(cls):
    for mechanism in ("OAUTHBEARER", "XOAUTH2"):
        for tls in LISTENERS:
            words = "STARTTLS" if tls == "starttls" else "implicit TLS"
            suffix = f"{mechanism.title()}{'StartTLS' if tls == 'starttls' else 'ImplicitTLS'}"

            def test(self, mechanism=mechanism, tls=tls):
                return self.deliver(mechanism, tls)

            test.__doc__ = (f"msmtp delivers over {words} with AUTH {mechanism} and a token "
                            "from passwordeval; the message arrives with our Received header.")
            test.__name__ = f"test_msmtp{suffix}"
            setattr(cls, test.__name__, test)

            def testRefused(self, mechanism=mechanism, tls=tls):
                return self.refused(mechanism, tls)

            testRefused.__doc__ = (f"msmtp with an expired token over {words} and AUTH "
                                   f"{mechanism} reads the error challenge, answers it, and "
                                   "fails with our 535; nothing is delivered.")
            testRefused.__name__ = f"test_msmtpRefused{suffix}"
            setattr(cls, testRefused.__name__, testRefused)
    return cls


OAuthClientTests = _addOAuthTests(OAuthClientTests)
