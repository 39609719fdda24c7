"""
aiosmtpd set up to do mailauth's job, as the benchmark's peer.

The same job as the benchmark's mailauth configuration: STARTTLS required
before AUTH, AUTH PLAIN checked against the same users file
(L{mailauth.userdb} reads it, L{mailauth.passwords.verify} checks the
password in a pool of C{--auth-threads} threads, like mailauth's auth pool,
so hashing never blocks the event loop), MAIL FROM must be the login,
recipients must be users of a local domain, and each message is written
once with LF line ends to a Maildir tmp/ file, fsynced, hard-linked into
each recipient's new/ and the new/ folder fsynced, in a pool of
C{--disk-threads} threads, before the 250. aiosmtpd itself is used as
shipped: its own line reader, DATA loop and STARTTLS. Like mailauth it
adds a Received header and logs one line per login and per accepted
message to a file (C{--log}); aiosmtpd's own logger is set to ERROR.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import concurrent.futures
import logging
import os
import secrets
import ssl
from email.utils import formatdate

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword

from mailauth import passwords
from mailauth.durable import fsyncDirectory, writeDurably
from mailauth.userdb import UserDatabase

log = logging.getLogger("peer")


def deliver(maildirs: list, content: bytes, ident: str) -> None:
    """Write C{content} once, fsync it, link it into every Maildir's new/."""
    for maildir in maildirs:
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(maildir, sub), mode=0o700, exist_ok=True)
    data = content.replace(b"\r\n", b"\n")
    name = f"{ident}.{os.getpid()}.bench.test,S={len(data)}"
    tmp = os.path.join(maildirs[0], "tmp", name)
    writeDurably(tmp, data)
    try:
        for maildir in maildirs:
            os.link(tmp, os.path.join(maildir, "new", name))
        for maildir in maildirs:
            fsyncDirectory(os.path.join(maildir, "new"))
    finally:
        os.unlink(tmp)


class MaildirHandler:
    """aiosmtpd handler hooks: AUTH PLAIN, sender and recipient checks, Maildir delivery."""

    def __init__(
        self, users: UserDatabase, template: str, domains: frozenset, authPool, diskPool
    ) -> None:
        self.users = users
        self.template = template
        self.domains = domains
        self.authPool = authPool
        self.diskPool = diskPool

    async def auth_PLAIN(self, server: SMTP, args: list) -> AuthResult:
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1].encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError):
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            return AuthResult(success=False, handled=False)
        login, password = parts[1].decode("utf-8", "replace").lower(), parts[2]
        user = self.users.get(login)
        loop = asyncio.get_running_loop()
        if user is None:
            await loop.run_in_executor(self.authPool, passwords.dummyVerify, password)
            return AuthResult(success=False, handled=False)
        ok = await loop.run_in_executor(self.authPool, passwords.verify, user.password, password)
        if not ok:
            return AuthResult(success=False, handled=False)
        log.info(
            "auth success: client=[%s] mechanism=PLAIN login=<%s>", server.session.peer[0], login
        )
        return AuthResult(success=True, auth_data=LoginPassword(login.encode(), b""))

    async def handle_MAIL(self, server, session, envelope, address, options):
        login = session.auth_data.login.decode() if session.auth_data else None
        if address.lower() != login:
            return f"553 5.7.1 <{address}>: Sender address not owned by user {login}"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, options):
        local, _, domain = address.lower().rpartition("@")
        if domain not in self.domains or not self.users.exists(address):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        maildirs = []
        for rcpt in envelope.rcpt_tos:
            local, _, domain = rcpt.lower().rpartition("@")
            path = self.template.format(domain=domain, localpart=local, user=rcpt.lower())
            if path not in maildirs:
                maildirs.append(path)
        login = session.auth_data.login.decode()
        ident = secrets.token_hex(6).upper()
        cipher = session.ssl.get("cipher") if session.ssl else None
        received = (
            f"Received: from {session.host_name} ([{session.peer[0]}])\r\n"
            f"\t(authenticated as {login})\r\n"
            f"\tby bench.test (aiosmtpd) with ESMTPSA id {ident}\r\n"
            f"\t(using {cipher[1] if cipher else 'TLS'} with cipher "
            f"{cipher[0] if cipher else '-'})\r\n"
            f"\t{formatdate(localtime=True)}\r\n"
        ).encode("ascii")
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                self.diskPool, deliver, maildirs, received + envelope.original_content, ident
            )
        except OSError:
            return "451 4.3.0 Error: local error in processing"
        log.info(
            "message accepted: client=[%s] login=<%s> id=%s from=<%s> recipients=%d size=%d",
            session.peer[0],
            login,
            ident,
            envelope.mail_from,
            len(envelope.rcpt_tos),
            len(envelope.original_content),
        )
        return f"250 2.0.0 Ok: queued as {ident}"


def main() -> None:
    p = argparse.ArgumentParser(description="aiosmtpd as the benchmark's peer")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--certificate", required=True)
    p.add_argument("--private-key", required=True)
    p.add_argument("--users", required=True)
    p.add_argument("--maildir", required=True, help="template with {domain} and {localpart}")
    p.add_argument("--domain", action="append", required=True)
    p.add_argument("--max-message-size", type=int, default=100 * 1024 * 1024)
    p.add_argument("--auth-threads", type=int, default=4)
    p.add_argument("--disk-threads", type=int, default=4)
    p.add_argument("--log", default="/dev/null", help="log file")
    p.add_argument(
        "--no-tls",
        dest="tls",
        action="store_false",
        help="no STARTTLS, AUTH in the clear (the tls scenario's baseline)",
    )
    options = p.parse_args()
    logging.basicConfig(
        filename=options.log,
        level=logging.INFO,
        format="%(asctime)s [%(name)s#%(levelname)s] %(message)s",
    )
    # aiosmtpd 1.4 warns of its own deprecated login_data on every login.
    logging.getLogger("mail.log").setLevel(logging.ERROR)

    users = UserDatabase(options.users)
    users.load()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(options.certificate, options.private_key)
    handler = MaildirHandler(
        users,
        options.maildir,
        frozenset(d.lower() for d in options.domain),
        concurrent.futures.ThreadPoolExecutor(options.auth_threads, "auth"),
        concurrent.futures.ThreadPoolExecutor(options.disk_threads, "disk"),
    )

    async def serve() -> None:
        loop = asyncio.get_running_loop()

        def factory() -> SMTP:
            return SMTP(
                handler,
                hostname="bench.test",
                data_size_limit=options.max_message_size,
                tls_context=ctx if options.tls else None,
                require_starttls=options.tls,
                auth_required=True,
                auth_require_tls=options.tls,
                auth_exclude_mechanism=["LOGIN"],
                loop=loop,
            )

        server = await loop.create_server(factory, options.host, options.port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
