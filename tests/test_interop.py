"""
Real clients against the real service: swaks, msmtp and curl from Debian,
each with every mechanism it supports (PLAIN, LOGIN, CRAM-MD5, SCRAM, and
msmtp's OAUTHBEARER and XOAUTH2), over STARTTLS and over implicit TLS; each
message is found in the Maildir and the log shows the mechanism the client
really used. Then the extensions: swaks's pipelining, smtplib's SMTPUTF8,
Postfix as a relay client (SMTPUTF8 and DSN) and Postfix's smtp-sink as the
upstream relay.

The tools are installed by C{.ci/run}; a missing one fails the test.
"""

from __future__ import annotations

import base64
import configparser
import glob
import json
import os
import re
import shutil
import subprocess

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.harness import (
    BOB_PASSWORD,
    ROOT,
    SHA512,
    VECTORS,
    AttackMixin,
    Daemon,
    RawClient,
    clientContext,
    plain,
    smtpClient,
)
from tests.harness import PASSWORD as DEMO_PASSWORD
from tests.postfixharness import PostfixClient, SmtpSink
from tests.smtpsink import QueueEvents
from tests.support import TokenIssuer

LOGIN = "bob@example.test"
PASSWORD = BOB_PASSWORD.decode()
RECIPIENT = "alice.plain@example.test"
LISTENERS = {"starttls": "submission", "implicit": "submissions"}
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


def program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(
            f"{name} is not installed: apt-get install {name} (.ci/run installs it)"
        )
    return path


def message(subject: str, newline: str) -> bytes:
    return newline.join(
        [
            f"From: {LOGIN}",
            f"To: {RECIPIENT}",
            f"Subject: {subject}",
            "",
            "Sent by a real client.",
            ".a line that starts with a dot",
            "",
        ]
    ).encode()


class ClientTestsMixin(AttackMixin):
    def swaks(self, port: int, tls: str, mechanism: str, subject: str) -> list:
        return [
            program("swaks"),
            "--server",
            f"127.0.0.1:{port}",
            "--tls" if tls == "starttls" else "--tlsc",
            "--auth",
            mechanism,
            "--auth-user",
            LOGIN,
            "--auth-password",
            PASSWORD,
            "--from",
            LOGIN,
            "--to",
            RECIPIENT,
            "--helo",
            "client.example",
            "--header",
            f"Subject: {subject}",
            "--body",
            "Sent by a real client.",
            "--timeout",
            "30",
        ], None

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
        return [
            program("curl"),
            "--silent",
            "--show-error",
            "--insecure",
            "--ssl-reqd",
            "--max-time",
            "30",
            "--url",
            f"{scheme}://127.0.0.1:{port}/client.example",
            "--user",
            f"{LOGIN}:{PASSWORD}",
            "--login-options",
            f"AUTH={mechanism}",
            "--mail-from",
            LOGIN,
            "--mail-rcpt",
            RECIPIENT,
            "--upload-file",
            path,
        ], None

    @defer.inlineCallbacks
    def deliver(self, tool: str, mechanism: str, tls: str):
        subject = f"interop {tool} {mechanism} {tls}"
        port = self.daemon.ports[LISTENERS[tls]]
        argv, stdin = getattr(self, tool)(port, tls, mechanism, subject)
        success = self.log.waitFor(r"auth success: client=\[127\.0\.0\.1\] mechanism=")
        result = yield threads.deferToThread(
            subprocess.run, argv, input=stdin, capture_output=True, timeout=60
        )
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
                test.__doc__ = (
                    f"{tool} delivers over {words} with AUTH {mechanism}; the "
                    "message arrives in the Maildir with our Received header."
                )
                name = (
                    f"test_{tool}{mechanism.title().replace('-', '')}"
                    f"{'StartTLS' if tls == 'starttls' else 'ImplicitTLS'}"
                )
                test.__name__ = name
                setattr(cls, name, test)
    return cls


@_addTests
class ClientTests(ClientTestsMixin, unittest.TestCase):
    """swaks, msmtp and curl, every mechanism, both kinds of TLS."""


# -- the extensions of issue 14 with real clients: swaks's pipelining,
# smtplib's SMTPUTF8 option, Postfix as a relay client (SMTPUTF8, DSN) and
# Postfix's smtp-sink as an upstream (DSN, no SMTPUTF8). Postfix's client
# does not implement BDAT (RFC 3030 is not among smtp(8)'s standards), nor
# do swaks 20201014, msmtp, curl or smtplib, so BDAT is tested with raw
# clients (tests.test_standards, tests.test_extensions) and with mailauth's
# own relay client against tests.smtpsink.

INTL_USERS = (
    "bob@example.test:{PLAIN}bob-secret-2\n"
    "zoë@example.test:{PLAIN}zoë-secret\n"
    "jörg@bücher.example:{PLAIN}jörg-secret\n"
)
INTL_SETTINGS = {"delivery": {"local_domains": "example.test bücher.example"}}
UTF8_MESSAGE = (
    "From: Bob <bob@example.test>\r\nTo: Zoë <zoë@example.test>\r\n"
    "Subject: grüße\r\n\r\nHallo Zoë.\r\n"
).encode()


def maildir(daemon, domain: str, local: str) -> list:
    out = []
    pattern = os.path.join(daemon.dir, "mail", domain, local, "Maildir", "new", "*")
    for name in sorted(glob.glob(pattern)):
        with open(name, "rb") as f:
            out.append(f.read())
    return out


def run(argv: list, stdin=None) -> defer.Deferred:
    return threads.deferToThread(subprocess.run, argv, input=stdin, capture_output=True, timeout=60)


class ExtensionClientTests(AttackMixin, unittest.TestCase):
    """swaks and smtplib with the extensions they have, both kinds of TLS."""

    settings = INTL_SETTINGS
    files = {"users": INTL_USERS}

    def swaks(self, tls: str, *extra: str) -> list:
        port = self.daemon.ports[LISTENERS[tls]]
        return [
            program("swaks"),
            "--server",
            f"127.0.0.1:{port}",
            "--tls" if tls == "starttls" else "--tlsc",
            "--auth",
            "PLAIN",
            "--auth-user",
            LOGIN,
            "--auth-password",
            PASSWORD,
            "--helo",
            "client.example",
            "--timeout",
            "30",
            *extra,
        ]

    @defer.inlineCallbacks
    def swaksPipelines(self, tls: str):
        result = yield run(
            self.swaks(
                tls, "--pipeline", "--from", LOGIN, "--to", LOGIN, "--header", "Subject: piped"
            )
        )
        output = (result.stdout + result.stderr).decode(errors="replace")
        self.assertEqual(result.returncode, 0, output)
        # With PIPELINING swaks sends MAIL, RCPT and DATA before any reply.
        self.assertLess(output.index("~> DATA"), output.index("<~  250 2.1.0 Ok"), output)
        [stored] = maildir(self.daemon, "example.test", "bob")
        self.assertIn(b"Subject: piped", stored)

    def test_swaksPipelineStartTLS(self):
        """swaks --pipeline over STARTTLS: MAIL, RCPT and DATA pipelined, mail delivered."""
        return self.swaksPipelines("starttls")

    def test_swaksPipelineImplicitTLS(self):
        """swaks --pipeline over implicit TLS: MAIL, RCPT and DATA pipelined, mail delivered."""
        return self.swaksPipelines("implicit")

    @defer.inlineCallbacks
    def test_swaksUTF8WithoutSMTPUTF8(self):
        """
        swaks 20201014 cannot say SMTPUTF8: its UTF-8 recipient gets 553
        5.6.7 (RFC 6531 3.5) and swaks reports the failure.
        """
        result = yield run(self.swaks("implicit", "--from", LOGIN, "--to", "zoë@example.test"))
        output = (result.stdout + result.stderr).decode(errors="replace")
        self.assertNotEqual(result.returncode, 0, output)
        self.assertIn("553 5.6.7 ", output)
        self.assertEqual(maildir(self.daemon, "example.test", "zoë"), [])

    def smtplibSMTPUTF8(self, tls: str):
        port = self.daemon.ports[LISTENERS[tls]]
        client = smtpClient(port, implicit=tls == "implicit")
        try:
            client.ehlo()
            if tls == "starttls":
                client.starttls(context=clientContext())
                client.ehlo()
            client.login(LOGIN, PASSWORD)
            return client.sendmail(
                LOGIN, ["zoë@example.test"], UTF8_MESSAGE, mail_options=["SMTPUTF8"]
            )
        finally:
            client.quit()

    @defer.inlineCallbacks
    def smtplibDelivers(self, tls: str):
        result = yield threads.deferToThread(self.smtplibSMTPUTF8, tls)
        self.assertEqual(result, {})
        [stored] = maildir(self.daemon, "example.test", "zoë")
        self.assertIn(b" with UTF8SMTPSA id ", stored)
        # Submission adds Date: and Message-ID: to the header; the rest is as sent.
        head, _, body = UTF8_MESSAGE.replace(b"\r\n", b"\n").partition(b"\n\n")
        self.assertIn(head + b"\n", stored)
        self.assertTrue(stored.endswith(b"\n\n" + body), stored)

    def test_smtplibSMTPUTF8StartTLS(self):
        """smtplib's SMTPUTF8 option over STARTTLS: a UTF-8 recipient and header delivered."""
        return self.smtplibDelivers("starttls")

    def test_smtplibSMTPUTF8ImplicitTLS(self):
        """smtplib's SMTPUTF8 option over implicit TLS: a UTF-8 recipient and header delivered."""
        return self.smtplibDelivers("implicit")


class PostfixClientTests(AttackMixin, unittest.TestCase):
    """
    Postfix from Debian as a relay client of mailauth (relayhost with SASL
    and TLS): SMTPUTF8 and DSN, over STARTTLS and implicit TLS.
    """

    settings = INTL_SETTINGS
    files = {"users": INTL_USERS}
    timeout = 90

    @defer.inlineCallbacks
    def relayThroughPostfix(self, tls: str):
        client = PostfixClient(
            self.daemon.ports[LISTENERS[tls]], tls, "jörg@bücher.example", "jörg-secret"
        )
        yield threads.deferToThread(client.start)
        self.addCleanup(threads.deferToThread, client.stop)
        accepted = self.log.waitFor("message accepted: .*login=<jörg@bücher.example>")
        reported = self.log.waitFor("delivery report for .* to <jörg@bücher.example>")
        message = (
            "From: Jörg <jörg@bücher.example>\nTo: zoë@example.test\n"
            "Subject: über Postfix\n\nHallo.\n"
        ).encode()
        yield threads.deferToThread(
            client.send,
            "jörg@bücher.example",
            ["zoë@example.test"],
            message,
            "-N",
            "success,failure",
            "-V",
            "postfix-envid",
            "-R",
            "hdrs",
        )
        log = yield threads.deferToThread(client.waitForLog, "status=sent")
        yield accepted
        yield reported
        self.assertIn("to=<zoë@example.test>", log)
        [stored] = maildir(self.daemon, "example.test", "zoë")
        self.assertIn(b"Received: from postfix.test", stored)
        self.assertIn(b" with UTF8SMTPSA id ", stored)
        self.assertIn("(authenticated as jörg@bücher.example)".encode(), stored)
        self.assertIn("Subject: über Postfix".encode(), stored)
        # NOTIFY=SUCCESS and ENVID came through: mailauth reports the delivery.
        [report] = maildir(self.daemon, "xn--bcher-kva.example", "jörg")
        self.assertIn(b"Action: delivered", report)
        self.assertIn(b"Original-Envelope-Id: postfix-envid", report)
        # Postfix gave ORCPT=utf-8;zoë@example.test (RFC 6533), kept as it came.
        self.assertIn("Original-Recipient: utf-8; zoë@example.test".encode(), report)

    def test_postfixStartTLS(self):
        """Postfix relays a SMTPUTF8 message with DSN parameters through STARTTLS and AUTH."""
        return self.relayThroughPostfix("starttls")

    def test_postfixImplicitTLS(self):
        """Postfix relays a SMTPUTF8 message with DSN parameters over implicit TLS and AUTH."""
        return self.relayThroughPostfix("implicit")


class PostfixUpstreamTests(unittest.TestCase):
    """
    Postfix's smtp-sink as mailauth's upstream relay: a real DSN server
    without SMTPUTF8, so the DSN parameters are passed on and a UTF-8
    domain goes as A-labels.
    """

    timeout = 60

    def setUp(self):
        self.sink = SmtpSink()
        self.sink.start()
        self.addCleanup(self.sink.stop)
        self.daemon = Daemon(
            self.mktemp(),
            settings=INTL_SETTINGS,
            files={"users": INTL_USERS},
            extra=f"\n[relay]\nhost = 127.0.0.1\nport = {self.sink.port}\ntls = none\n",
        )
        self.addCleanup(self.daemon.stop)
        self.daemon.start()
        self.events = QueueEvents()
        self.events.start(self)

    @defer.inlineCallbacks
    def test_dsnPassedOnAndDomainsDowngraded(self):
        """
        RET, ENVID, NOTIFY and ORCPT reach smtp-sink; the SMTPUTF8 message
        with an ASCII local part at a UTF-8 domain goes as A-labels,
        without SMTPUTF8.
        """

        def submit():
            client = RawClient(self.daemon.ports["submissions"], tls=True)
            try:
                assert client.reply()[0] == 220
                client.ehlo()
                assert client.command(plain(LOGIN.encode(), PASSWORD.encode()))[0] == 235
                replies = [
                    client.command(b"MAIL FROM:<bob@example.test> SMTPUTF8 RET=HDRS ENVID=E+2B1"),
                    client.command(
                        "RCPT TO:<anna@exämple.org> NOTIFY=FAILURE "
                        "ORCPT=rfc822;anna@xn--exmple-cua.org".encode()
                    ),
                    client.command(b"DATA"),
                    client.command(b"Subject: to smtp-sink\r\n\r\nhi\r\n."),
                ]
                return [code for code, _ in replies]
            finally:
                client.close()

        codes = yield threads.deferToThread(submit)
        self.assertEqual(codes, [250, 250, 354, 250])
        finished = [self.events.wait(kind) for kind in ("sent", "bounced", "deferred")]
        yield defer.DeferredList(finished, fireOnOneCallback=True)
        [first] = self.events.events[:1]
        self.assertEqual(first["queueEvent"], "sent", (first["why"], self.sink.log()))
        yield self.events.wait("removed")
        [dump] = self.sink.dumps()
        self.assertIn(b"\nX-Mail-Args: <bob@example.test> RET=HDRS ENVID=E+2B1\n", dump)
        self.assertNotIn(b"SMTPUTF8", dump)
        self.assertIn(
            b"\nX-Rcpt-Args: <anna@xn--exmple-cua.org> NOTIFY=FAILURE "
            b"ORCPT=rfc822;anna@xn--exmple-cua.org\n",
            dump,
        )
        self.assertIn(b"\nSubject: to smtp-sink\n", dump)


# -- SCRAM: msmtp (GNU SASL) and the gsasl command ---------------------------

SCRAM_USERS = os.path.join(os.path.dirname(__file__), "data", "scram-passwd")
SCRAM_LOGIN = "pencil@example.test"


def _scramUsers() -> str:
    """The daemon's users: the vectors, bob, and the SCRAM users doveadm made."""
    with open(VECTORS) as f, open(SCRAM_USERS) as g:
        return f.read() + "bob@example.test:{PLAIN}bob-secret-2\n" + g.read()


class _StartTLSFront:
    """
    Lets a client that only knows STARTTLS (the gsasl command) reach the
    implicit TLS listener: it answers EHLO and STARTTLS itself, then joins
    the client's socket to the listener's, so the TLS session (and its
    channel binding) runs between the client and the daemon.
    """

    def __init__(self, port: int) -> None:
        import socket

        self.port = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()

    def serve(self) -> None:
        import socket
        import threading

        client, _ = self.listener.accept()
        self.listener.close()
        reader = client.makefile("rb")
        client.sendall(b"220 front ESMTP\r\n")
        while True:
            line = reader.readline()
            if not line:
                return
            if line.upper().startswith(b"STARTTLS"):
                client.sendall(b"220 2.0.0 Ready to start TLS\r\n")
                break
            client.sendall(b"250-front\r\n250 STARTTLS\r\n")
        server = socket.create_connection(("127.0.0.1", self.port))

        def copy(source, target):
            try:
                while data := source.recv(65536):
                    target.sendall(data)
            except OSError:
                pass
            for s in (source, target):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        other = threading.Thread(target=copy, args=(server, client), daemon=True)
        other.start()
        copy(client, server)
        other.join(30)
        client.close()
        server.close()


class ScramClientTests(ClientTestsMixin, unittest.TestCase):
    """
    msmtp (GNU SASL) with SCRAM-SHA-256 and SCRAM-SHA-1, and the gsasl
    command with SCRAM-SHA-256-PLUS on TLS 1.3 (tls-exporter) and TLS 1.2
    (tls-unique), over STARTTLS and implicit TLS.
    """

    settings = {
        "auth": {
            "mechanisms": "PLAIN SCRAM-SHA-256-PLUS SCRAM-SHA-256 SCRAM-SHA-1",
            "users": "{dir}/users",
        },
    }
    files = {"users": _scramUsers()}

    def msmtpScram(self, port: int, tls: str, mechanism: str, login: str, password: str):
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
user {login}
password {password}
from {login}
domain client.example
timeout 30
account default : test
""")
        os.chmod(config, 0o600)
        return [program("msmtp"), "-C", config, RECIPIENT]

    @defer.inlineCallbacks
    def runClient(self, argv, stdin=b"", login=SCRAM_LOGIN, mechanism="SCRAM-SHA-256"):
        success = self.log.waitFor(r"auth success: client=\[127\.0\.0\.1\] mechanism=")
        result = yield threads.deferToThread(
            subprocess.run, argv, input=stdin, capture_output=True, timeout=60
        )
        output = (result.stdout + result.stderr).decode(errors="replace")
        self.assertEqual(result.returncode, 0, output)
        logged = yield success
        self.assertIn(f"mechanism={mechanism} login=<{login}>", logged)
        return output

    @defer.inlineCallbacks
    def msmtpDelivers(self, tls: str, mechanism: str, login: str, password: str):
        subject = f"interop msmtp {mechanism} {tls}"
        argv = self.msmtpScram(self.daemon.ports[LISTENERS[tls]], tls, mechanism, login, password)
        yield self.runClient(
            argv, message(subject, "\n").replace(LOGIN.encode(), login.encode()), login, mechanism
        )
        [(_, content)] = self.daemon.delivered(RECIPIENT)
        self.assertIn(f"Subject: {subject}\n".encode(), content)
        self.assertIn(f"(authenticated as {login})".encode(), content)

    def test_msmtpScramSha256StartTLS(self):
        """msmtp delivers over STARTTLS with AUTH SCRAM-SHA-256 (a doveadm-made hash)."""
        return self.msmtpDelivers("starttls", "SCRAM-SHA-256", SCRAM_LOGIN, "pencil")

    def test_msmtpScramSha256ImplicitTLS(self):
        """msmtp delivers over implicit TLS with AUTH SCRAM-SHA-256."""
        return self.msmtpDelivers("implicit", "SCRAM-SHA-256", SCRAM_LOGIN, "pencil")

    def test_msmtpScramSha1(self):
        """msmtp delivers with AUTH SCRAM-SHA-1 for a user doveadm hashed so."""
        return self.msmtpDelivers("starttls", "SCRAM-SHA-1", "sha1@example.test", "pencil")

    @defer.inlineCallbacks
    def msmtpRefused(self, login: str, password: str):
        argv = self.msmtpScram(
            self.daemon.ports["submission"], "starttls", "SCRAM-SHA-256", login, password
        )
        result = yield threads.deferToThread(
            subprocess.run, argv, input=message("refused", "\n"), capture_output=True, timeout=60
        )
        self.assertNotEqual(result.returncode, 0)
        return (result.stdout + result.stderr).decode(errors="replace")

    @defer.inlineCallbacks
    def test_msmtpWrongPassword(self):
        """A wrong password fails and is logged as a failed login."""
        failure = self.log.waitFor(r"auth failure: client=\[127\.0\.0\.1\] mechanism=SCRAM")
        output = yield self.msmtpRefused(SCRAM_LOGIN, "wrong")
        self.assertIn("authentication failed", output)
        yield failure

    @defer.inlineCallbacks
    def test_msmtpOtherScheme(self):
        """
        bob's password is stored as PLAIN: SCRAM-SHA-256 fails for him even
        with the right password, and is not logged as a failed login.
        """
        unusable = self.log.waitFor(r"auth mechanism unusable: .* login=<bob@example\.test>")
        yield self.msmtpRefused(LOGIN, PASSWORD)
        yield unusable
        self.assertFalse([m for m in self.log.messages if "auth failure" in m])

    def gsasl(
        self, port: int, priority: str = "NORMAL", mechanism: str = "SCRAM-SHA-256-PLUS"
    ) -> list:
        return [
            program("gsasl"),
            "--smtp",
            "--connect",
            f"127.0.0.1:{port}",
            "--starttls",
            "--mechanism",
            mechanism,
            "--authentication-id",
            SCRAM_LOGIN,
            "--password",
            "pencil",
            "--x509-ca-file=",
            "--priority",
            priority,
            "--no-client-first",
            "--verbose",
        ]

    def port(self, tls: str) -> int:
        """The port gsasl (which knows only STARTTLS) connects to for C{tls}."""
        port = self.daemon.ports[LISTENERS[tls]]
        if tls == "implicit":
            front = _StartTLSFront(port)
            threads.deferToThread(front.serve)
            port = front.address[1]
        return port

    @defer.inlineCallbacks
    def gsaslLogsIn(self, tls: str, priority: str, cbType: str):
        argv = self.gsasl(self.port(tls), priority)
        output = yield self.runClient(argv, mechanism="SCRAM-SHA-256-PLUS")
        self.assertIn("Client authentication finished (server trusted)", output)
        # gsasl prints what it sends: its client-first message names the binding.
        sent = [base64.b64decode(w) for w in re.findall(r"^[A-Za-z0-9+/]{16,}=*$", output, re.M)]
        self.assertTrue(sent[0].startswith(f"p={cbType},,n={SCRAM_LOGIN},r=".encode()), sent)

    def test_gsaslPlusTLS13StartTLS(self):
        """gsasl logs in with SCRAM-SHA-256-PLUS (tls-exporter) over STARTTLS, TLS 1.3."""
        return self.gsaslLogsIn("starttls", "NORMAL", "tls-exporter")

    def test_gsaslPlusTLS12StartTLS(self):
        """gsasl logs in with SCRAM-SHA-256-PLUS (tls-unique) over STARTTLS, TLS 1.2."""
        return self.gsaslLogsIn("starttls", "NORMAL:-VERS-TLS1.3", "tls-unique")

    def test_gsaslPlusTLS13Implicit(self):
        """gsasl logs in with SCRAM-SHA-256-PLUS over implicit TLS, TLS 1.3."""
        return self.gsaslLogsIn("implicit", "NORMAL", "tls-exporter")

    def test_gsaslPlusTLS12Implicit(self):
        """gsasl logs in with SCRAM-SHA-256-PLUS over implicit TLS, TLS 1.2."""
        return self.gsaslLogsIn("implicit", "NORMAL:-VERS-TLS1.3", "tls-unique")


class OAuthClientTests(AttackMixin, unittest.TestCase):
    """
    msmtp's OAUTHBEARER and XOAUTH2, the token from C{passwordeval}, over
    both kinds of TLS, against tokens minted here and the issuer's keys in
    the daemon's JWKS file.
    """

    issuer = TokenIssuer("ec", "k1")
    settings = {
        "auth": {"mechanisms": "PLAIN LOGIN OAUTHBEARER XOAUTH2"},
        "oauth": {
            "issuer": TokenIssuer.ISSUER,
            "audience": TokenIssuer.AUDIENCE,
            "jwks": "{dir}/jwks.json",
        },
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
            subprocess.run, argv, input=message(subject, "\n"), capture_output=True, timeout=60
        )
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
        status, output = yield self.send(
            tls, mechanism, self.issuer.mint(LOGIN, lifetime=-300), "refused"
        )
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

            test.__doc__ = (
                f"msmtp delivers over {words} with AUTH {mechanism} and a token "
                "from passwordeval; the message arrives with our Received header."
            )
            test.__name__ = f"test_msmtp{suffix}"
            setattr(cls, test.__name__, test)

            def testRefused(self, mechanism=mechanism, tls=tls):
                return self.refused(mechanism, tls)

            testRefused.__doc__ = (
                f"msmtp with an expired token over {words} and AUTH "
                f"{mechanism} reads the error challenge, answers it, and "
                "fails with our 535; nothing is delivered."
            )
            testRefused.__name__ = f"test_msmtpRefused{suffix}"
            setattr(cls, testRefused.__name__, testRefused)
    return cls


OAuthClientTests = _addOAuthTests(OAuthClientTests)


def demoMechanisms() -> str:
    """The [auth] mechanisms of etc/demo.conf, the configuration C{make run} uses."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    parser.read(os.path.join(ROOT, "etc", "demo.conf"))
    return parser["auth"]["mechanisms"]


class MechanismChoiceMixin(AttackMixin):
    """
    A user stored as ARGON2ID (the default, as the demo's user is), with
    the right password, sending eight times from one address. The clock
    stands still, so a tarpitted reply would never come and the client
    would time out.
    """

    clocked = True
    login = SHA512.replace("sha512-crypt", "argon2id")

    def execute(self, argv):
        return threads.deferToThread(subprocess.run, argv, capture_output=True, timeout=60)

    def curl(self, subject: str, *extra: str) -> list:
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(message(subject, "\r\n").replace(LOGIN.encode(), self.login.encode()))
        return [
            program("curl"),
            "--silent",
            "--show-error",
            "--insecure",
            "--max-time",
            "20",
            "--url",
            f"smtps://127.0.0.1:{self.daemon.ports['submissions']}/client.example",
            "--user",
            f"{self.login}:{DEMO_PASSWORD}",
            *extra,
            "--mail-from",
            self.login,
            "--mail-rcpt",
            RECIPIENT,
            "--upload-file",
            path,
        ]

    def swaks(self, subject: str) -> list:
        """swaks with no mechanism named: it tries those offered, CRAM-MD5 first."""
        return [
            program("swaks"),
            "--server",
            f"127.0.0.1:{self.daemon.ports['submissions']}",
            "--tlsc",
            "--auth",
            "--auth-user",
            self.login,
            "--auth-password",
            DEMO_PASSWORD,
            "--from",
            self.login,
            "--to",
            RECIPIENT,
            "--helo",
            "client.example",
            "--header",
            f"Subject: {subject}",
            "--timeout",
            "20",
        ]

    def authLines(self, kind: str) -> list:
        return self.log.matching(rf"^auth {kind}: client=\[127\.0\.0\.1\]")


class MechanismChoiceTests(MechanismChoiceMixin, unittest.TestCase):
    """Behind a configuration that offers CRAM-MD5 as well (as the demo once did)."""

    settings = {"auth": {"mechanisms": "PLAIN LOGIN CRAM-MD5"}}

    @defer.inlineCallbacks
    def test_curlPicksCramMD5NeverLockedOut(self):
        """
        curl picks CRAM-MD5 when offered, and fails (535, exit 67) for a
        user stored as ARGON2ID; eight such sends from one address are each
        answered at once, logged as an unusable mechanism and not as a
        failure, and counted nowhere: the ninth, with AUTH=PLAIN, delivers.
        """
        for n in range(8):
            result = yield self.execute(self.curl(f"try {n}"))
            self.assertEqual(result.returncode, 67, result.stderr)
        unusable = self.authLines("mechanism unusable")
        self.assertEqual(len(unusable), 8)
        self.assertIn(f"mechanism=CRAM-MD5 login=<{self.login}>", unusable[0])
        self.assertEqual(self.authLines("failure"), [])
        result = yield self.execute(self.curl("sent", "--login-options", "AUTH=PLAIN"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(len(self.daemon.delivered(RECIPIENT)), 1)

    @defer.inlineCallbacks
    def test_swaksFallsBackEightTimes(self):
        """
        swaks tries CRAM-MD5 first, then falls back to another mechanism:
        eight messages from one address all arrive, and no failed guess is
        logged or counted.
        """
        for n in range(8):
            result = yield self.execute(self.swaks(f"fallback {n}"))
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(len(self.daemon.delivered(RECIPIENT)), 8)
        self.assertEqual(len(self.authLines("mechanism unusable")), 8)
        self.assertEqual(self.authLines("failure"), [])


class DemoMechanismsTests(MechanismChoiceMixin, unittest.TestCase):
    """Behind the demo's own mechanisms (etc/demo.conf)."""

    settings = {"auth": {"mechanisms": demoMechanisms()}}

    @defer.inlineCallbacks
    def test_curlSendsEightTimes(self):
        """The demo offers no CRAM-MD5: curl sends eight times from one address, all delivered."""
        for n in range(8):
            result = yield self.execute(self.curl(f"try {n}"))
            self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(len(self.daemon.delivered(RECIPIENT)), 8)
        self.assertEqual(len(self.authLines("success")), 8)
        self.assertEqual(self.authLines("mechanism unusable") + self.authLines("failure"), [])
