"""
Postfix from Debian in the tests: a private Postfix instance as an SMTP
client that relays through mailauth (its own configuration, queue and log
in a temporary folder), and Postfix's smtp-sink as an upstream relay.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time

MISSING = "Postfix is not installed: apt-get install postfix"
# Postfix's master runs as root and gives its daemons to mail_owner.
NOT_ROOT = (
    "a private Postfix instance needs root (its master starts as root and "
    "drops to the postfix user); run the suite as root, as .ci/run does"
)
# How long Postfix may take to start, or to hand a message on.
TIMEOUT = 30.0

MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def program(name: str) -> str:
    """The path of a Postfix program; fails (never skips) when Postfix is missing."""
    for directory in ("/usr/sbin", "/usr/bin"):
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} not found: {MISSING}")
    return path


class PostfixClient:
    """
    A Postfix instance that sends everything to C{[127.0.0.1]:port} as its
    relayhost, with TLS (STARTTLS, or implicit TLS with wrapper mode), SASL
    PLAIN as C{login}, SMTPUTF8 and DSN; messages are injected with its
    sendmail. Its directories live under C{/tmp} (unix socket paths must
    stay short) and go when it stops.
    """

    def __init__(self, port: int, tls: str, login: str, password: str) -> None:
        if os.geteuid() != 0:
            raise AssertionError(NOT_ROOT)
        self.postfix = program("postfix")
        self.sendmailPath = program("sendmail")
        self.directory = tempfile.mkdtemp(prefix="pf-")
        os.chmod(self.directory, 0o755)
        self.config = os.path.join(self.directory, "conf")
        self.logPath = os.path.join(self.directory, "maillog")
        data = os.path.join(self.directory, "data")
        for path in (self.config, os.path.join(self.directory, "queue"), data):
            os.makedirs(path)
        shutil.chown(data, user="postfix")
        wrapper = "yes" if tls == "implicit" else "no"
        with open(os.path.join(self.config, "main.cf"), "w", encoding="utf-8") as f:
            f.write(f"""\
compatibility_level = 3.6
queue_directory = {self.directory}/queue
data_directory = {data}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {self.logPath}
maillog_file_prefixes = {self.directory}
myhostname = postfix.test
mydomain = postfix.test
myorigin = postfix.test
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
alias_maps =
alias_database =
local_recipient_maps =
biff = no
relayhost = [127.0.0.1]:{port}
smtp_tls_security_level = encrypt
smtp_tls_wrappermode = {wrapper}
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = static:{login}:{password}
smtp_sasl_security_options = noanonymous
smtp_sasl_mechanism_filter = plain
smtputf8_enable = yes
""")
        with open(os.path.join(self.config, "master.cf"), "w") as f:
            f.write(MASTER_CF)

    def _postfix(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.postfix, "-c", self.config, *args], capture_output=True, timeout=TIMEOUT
        )

    def start(self) -> None:
        """(Blocking.) Start the instance and wait until its master runs."""
        result = self._postfix("start")
        pid = os.path.join(self.directory, "queue", "pid", "master.pid")
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(pid):
            if time.monotonic() > deadline or result.returncode:
                raise AssertionError(f"postfix did not start: {result.stderr!r} {self.log()}")
            time.sleep(0.05)

    def send(self, sender: str, recipients: list, message: bytes, *options: str) -> None:
        """(Blocking.) Inject a message with Postfix's sendmail (C{-N}, C{-V}, C{-R}...)."""
        result = subprocess.run(
            [self.sendmailPath, "-C", self.config, "-f", sender, *options, "--", *recipients],
            input=message,
            capture_output=True,
            timeout=TIMEOUT,
        )
        if result.returncode:
            raise AssertionError(f"postfix sendmail failed: {result.stderr!r}")

    def log(self) -> str:
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def waitForLog(self, text: str) -> str:
        """(Blocking.) Wait until C{text} is logged; the log so far."""
        deadline = time.monotonic() + TIMEOUT
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never logged by Postfix:\n{self.log()}")
            time.sleep(0.05)
        return self.log()

    def stop(self) -> None:
        """(Blocking.) Stop this instance (by its own configuration) and remove its files."""
        try:
            master = self._masterPid()
            self._postfix("stop")
            deadline = time.monotonic() + TIMEOUT
            while master is not None and _alive(master) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _masterPid(self) -> int | None:
        """The pid of this instance's master, from its own pid file."""
        try:
            with open(os.path.join(self.directory, "queue", "pid", "master.pid")) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def freePort() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SmtpSink:
    """
    Postfix's smtp-sink on 127.0.0.1: a real upstream that offers DSN and
    neither SMTPUTF8 nor CHUNKING nor TLS, and dumps each transaction (with
    its MAIL and RCPT arguments) to a file.
    """

    def __init__(self) -> None:
        self.binary = program("smtp-sink")
        # Under /tmp: smtp-sink writes as nobody when started by root, and
        # trial's folders are private to root.
        self.directory = tempfile.mkdtemp(prefix="smtp-sink-")
        os.chmod(self.directory, 0o777)
        self.port = freePort()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """(Blocking.) Start it and wait until it accepts connections."""
        argv = [self.binary]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # smtp-sink refuses to run as root
        argv += [
            "-v",
            "-d",
            os.path.join(self.directory, "dump", "%M."),
            f"127.0.0.1:{self.port}",
            "10",
        ]
        self.logPath = os.path.join(self.directory, "smtp-sink.log")
        with open(self.logPath, "wb") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("smtp-sink did not start") from None
                time.sleep(0.05)

    def dumps(self) -> list:
        """The dumped transactions, as bytes, oldest first."""
        out = []
        dumps = glob.glob(os.path.join(self.directory, "dump", "*"))
        for path in sorted(dumps, key=os.path.getmtime):
            with open(path, "rb") as f:
                out.append(f.read())
        return out

    def log(self) -> str:
        """What smtp-sink said (-v: the SMTP conversations)."""
        with open(self.logPath, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        """Stop the process this object started."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=TIMEOUT)
        shutil.rmtree(self.directory, ignore_errors=True)
