"""
The whole daemon with C{[server] workers = 2}, as twistd runs it: serving
both listeners, a worker killed under load, the log fail2ban reads,
systemd's readiness, SIGHUP, SIGTERM, a parent killed outright, and
C{--uid}/C{--gid}.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from twisted.trial import unittest

from tests.harness import (
    BOB,
    BOB_PASSWORD,
    ROOT,
    RawClient,
    TwistdProcess,
    clientContext,
    plain,
    processAlive,
    smtpClient,
    writeDaemonDirectory,
)
from tests.redisharness import startRedis
from tests.support import writeCertificate
from tests.test_metrics import parse

FILTER = os.path.join(ROOT, "etc", "fail2ban", "filter.d", "mailauth.conf")


class _Daemon:
    """A daemon's folder with workers = 2, counters in a real Redis, run by twistd."""

    def __init__(
        self,
        test: unittest.TestCase,
        settings=None,
        twistdArgs=(),
        count: int = 2,
        env=None,
        prelude: str = "",
        standardOutput: bool = False,
    ) -> None:
        self.redis = redis = startRedis(test)
        base = {"server": {"workers": str(count)}, "state": {"backend": redis.url}}
        for section, values in (settings or {}).items():
            base.setdefault(section, {}).update(values)
        self.dir = os.path.abspath(test.mktemp())
        self.configPath = writeDaemonDirectory(self.dir, base)
        self.count = count
        self.twistd = TwistdProcess(
            self.configPath,
            os.path.join(self.dir, "mailauth.log"),
            twistdArgs,
            env,
            prelude,
            standardOutput,
        )
        test.addCleanup(self.twistd.stop)

    def start(self) -> None:
        self.twistd.start(workers=self.count)

    def maildir(self, login: str = "bob@example.test") -> str:
        local, domain = login.split("@")
        return os.path.join(self.dir, "mail", domain, local, "Maildir")


def sendOne(port: int, implicit: bool = False, source: str = "127.0.0.1") -> str:
    """One message from bob to bob; the queue ID of its 250 reply."""
    client = smtpClient(port, implicit=implicit, source=source)
    try:
        client.ehlo()
        if not implicit:
            client.starttls(context=clientContext())
            client.ehlo()
        client.login(BOB.decode(), BOB_PASSWORD.decode())
        client.mail(BOB.decode())
        client.rcpt(BOB.decode())
        code, text = client.data(b"Subject: worker test\r\n\r\nhello\r\n")
        if code != 250:
            raise smtplib.SMTPDataError(code, text)
        return re.search(rb"queued as (\S+)", text).group(1).decode()
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()


def deliveredIDs(maildir: str) -> set:
    """The queue IDs in the Received headers of every message in C{maildir}/new."""
    found = set()
    folder = os.path.join(maildir, "new")
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        with open(os.path.join(folder, name), "rb") as f:
            head = f.read(4096)
        m = re.search(rb"with ESMTPSA id (\S+)", head)
        if m:
            found.add(m.group(1).decode())
    return found


class TwistdWorkersTests(unittest.TestCase):
    """The whole daemon with two workers, as twistd runs it."""

    def test_workersServeBothListeners(self):
        """
        Two worker processes serve STARTTLS and implicit TLS from the
        sockets their parent bound; the parent serves none itself.
        """
        daemon = _Daemon(self)
        daemon.start()
        pids = daemon.twistd.workerPIDs()
        self.assertEqual(len(pids), 2)
        ids = [sendOne(daemon.twistd.ports["submission"]) for _ in range(4)]
        ids += [sendOne(daemon.twistd.ports["submissions"], implicit=True) for _ in range(4)]
        self.assertEqual(deliveredIDs(daemon.maildir()), set(ids))
        for pid in pids:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                self.assertIn(b"mailauth.workers", f.read())
            # Logging to a file, the parent writes the workers' lines.
            self.assertTrue(os.readlink(f"/proc/{pid}/fd/1").startswith("pipe:"))

    def test_systemdToldOnceAllServe(self):
        """
        Under systemd (C{Type=notify}) the parent sends C{READY=1} once,
        when every worker serves; the workers never speak to systemd.
        """
        folder = tempfile.mkdtemp(prefix="notify-")  # a socket path holds ~100 bytes
        self.addCleanup(shutil.rmtree, folder)
        systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(systemd.close)
        systemd.bind(os.path.join(folder, "notify"))
        systemd.settimeout(60)
        daemon = _Daemon(self, env=dict(os.environ, NOTIFY_SOCKET=systemd.getsockname()))
        starting = threading.Thread(target=daemon.start)
        starting.start()
        message = systemd.recv(4096).decode()
        serving = daemon.twistd.log().count(") is serving")
        starting.join(60)
        self.assertEqual(message.splitlines(), ["READY=1", "STATUS=listening: workers"])
        self.assertEqual(serving, 2)
        systemd.settimeout(1.0)  # nothing more is coming: a second is plenty to show it
        self.assertRaises(TimeoutError, systemd.recv, 4096)

    def acceptedInJSON(self, daemon: _Daemon) -> tuple:
        """
        Start C{daemon} (JSON log), send a message, and check its line: a
        worker's, with its fields. Its queue ID and that line's event.
        """
        daemon.start()
        queued = sendOne(daemon.twistd.ports["submission"])
        [line] = daemon.twistd.waitForLog(rf'"id": "{queued}"')
        event = json.loads(line)
        self.assertEqual(
            (event["log_namespace"], event["client"], event["login"]),
            ("mailauth.esmtp", "127.0.0.1", BOB.decode()),
        )
        self.assertIn(event["log_worker"], (1, 2))
        return queued, event

    def test_jsonLog(self):
        """
        With C{[server] log_format = json}, what a worker logs reaches the
        daemon's log as JSON with its fields, the worker's number added.
        """
        queued, event = self.acceptedInJSON(_Daemon(self, {"server": {"log_format": "json"}}))
        self.assertIn(
            f"message accepted: client=[127.0.0.1] login=<{BOB.decode()}> id={queued}",
            event["log_text"],
        )

    def test_workersWriteTheirOwnLinesToStandardOutput(self):
        """
        Logging as under systemd (C{twistd --logfile=-}: standard output is
        the journal), each worker writes its lines to that output itself,
        not through its parent: one log, the parent's lines and the
        workers', each line whole and its bracket naming the worker.
        """
        daemon = _Daemon(self, standardOutput=True)
        daemon.start()
        pids = daemon.twistd.workerPIDs()
        self.assertEqual(len(pids), 2)
        for pid in pids:
            self.assertTrue(
                os.path.samestat(os.stat(f"/proc/{pid}/fd/1"), os.stat(daemon.twistd.logPath))
            )
        ids = [sendOne(daemon.twistd.ports["submission"]) for _ in range(4)]
        ids += [sendOne(daemon.twistd.ports["submissions"], implicit=True) for _ in range(4)]
        for queued in ids:
            daemon.twistd.waitForLog(
                r"^\S+ \[mailauth\.esmtp#info worker=[12]\] message accepted: "
                rf"client=\[127\.0\.0\.1\] login=<{BOB.decode()}> id={queued} "
            )
        lines = daemon.twistd.log().splitlines()
        self.assertEqual(
            [line for line in lines if not re.match(r"(\d{4}-\d\d-\d\dT\S+ \[[^]]+\] |\t)", line)],
            [],
        )
        self.assertEqual(len([line for line in lines if ") is serving" in line]), 2)

    def test_jsonLogOnStandardOutput(self):
        """
        With C{[server] log_format = json} and C{twistd --logfile=-}, the
        workers' own lines are the same JSON as the parent's, with
        C{log_worker}; every line of the output is one whole JSON object.
        """
        daemon = _Daemon(self, {"server": {"log_format": "json"}}, standardOutput=True)
        self.acceptedInJSON(daemon)
        events = [json.loads(line) for line in daemon.twistd.log().splitlines()]
        self.assertEqual(sorted({e.get("log_worker") for e in events}, key=str), [1, 2, None])

    def test_failuresLoggedForFail2ban(self):
        """
        A failed login in a worker reaches the daemon's log as the one line
        fail2ban's shipped filter matches, with the client's address; the
        line names the worker that wrote it.
        """
        daemon = _Daemon(self)
        daemon.start()
        client = RawClient(daemon.twistd.ports["submissions"], source="127.0.0.9", tls=True)
        self.addCleanup(client.close)
        self.assertEqual(client.reply()[0], 220)
        client.ehlo()
        self.assertEqual(client.command(plain(BOB, b"wrong"))[0], 535)
        daemon.twistd.waitForLog(
            r"\[mailauth\.esmtp#info worker=[12]\] auth failure: client=\[127\.0\.0\.9\]"
        )
        logPath = daemon.twistd.logPath
        try:
            result = subprocess.run(
                ["fail2ban-regex", "--out", "ip", logPath, FILTER],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except FileNotFoundError:
            self.fail("fail2ban-regex is missing: apt-get install fail2ban")
        self.assertEqual(result.stdout.split(), ["127.0.0.9"], result.stderr)

    def test_killedWorkerLosesNothing(self):
        """
        SIGKILL of a worker under load: every message that got a 250 is in
        the Maildir, the other worker goes on serving, and the parent starts
        a new worker that serves too.
        """
        daemon = _Daemon(self)
        daemon.start()
        port = daemon.twistd.ports["submission"]
        accepted: list = []
        failed: list = []
        stop = threading.Event()

        def sender():
            while not stop.is_set():
                try:
                    accepted.append(sendOne(port))
                except (smtplib.SMTPException, OSError, ssl.SSLError) as e:
                    failed.append(e)

        threads = [threading.Thread(target=sender) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 60
            while len(accepted) < 20 and time.monotonic() < deadline:
                time.sleep(0.01)
            victim = daemon.twistd.workerPIDs()[0]
            os.kill(victim, signal.SIGKILL)
            before = len(accepted)
            daemon.twistd.waitForLog(r"was killed by SIGKILL; starting it again")
            daemon.twistd.waitForLog(r"is serving", count=3)
            while len(accepted) < before + 40 and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        self.assertGreaterEqual(len(accepted), before + 40, failed[:3])
        self.assertNotIn(victim, daemon.twistd.workerPIDs())
        self.assertEqual(len(daemon.twistd.workerPIDs()), 2)
        delivered = deliveredIDs(daemon.maildir())
        self.assertEqual(set(accepted) - delivered, set())
        # Only the sessions the dead worker had open failed.
        self.assertLessEqual(len(failed), 6)

    def test_connectionLimitsHoldForTheNode(self):
        """
        C{max_connections_per_address} counts every worker's connections:
        while one connection from an address is open, each other one from
        it is refused with 421, whichever worker takes it. When the worker
        that holds the open one is killed, its place is free again.
        """
        daemon = _Daemon(
            self, {"server": {"max_connections_per_address": "1", "log_format": "json"}}
        )
        daemon.start()
        port = daemon.twistd.ports["submission"]

        def events(pattern: str) -> list:
            return [json.loads(line) for line in daemon.twistd.waitForLog(pattern)]

        held = RawClient(port)
        self.addCleanup(held.close)
        self.assertEqual(held.reply()[0], 220)
        holder = events(r'"log_format": "connect: ')[0]["log_worker"]
        refusedBy: set = set()
        tried = 0
        # Until each worker has refused one (which takes which is the kernel's choice).
        while len(refusedBy) < 2 and tried < 400:
            for _ in range(20):
                tried += 1
                client = RawClient(port)
                try:
                    self.assertEqual(
                        client.reply(),
                        (421, [b"4.7.0 Error: too many connections from your address"]),
                    )
                finally:
                    client.close()
            refusedBy = {
                e["log_worker"]
                for e in events(r"reason=too_many_from_address")
                if e["log_namespace"] == "mailauth.esmtp"
            }
        self.assertEqual(refusedBy, {1, 2}, f"after {tried} connections")
        [started] = [
            e for e in events(r'"log_format": "worker \{index\} started') if e["index"] == holder
        ][-1:]
        os.kill(started["pid"], signal.SIGKILL)
        daemon.twistd.waitForLog(r"was killed by SIGKILL; starting it again")
        client = RawClient(port)
        self.addCleanup(client.close)
        self.assertEqual(client.reply()[0], 220)

    def test_bruteForceInOutageBlockedForTheNode(self):
        """
        With Redis down, the failed logins of an address are counted for
        the node, not for each worker: failures made in turn on the two
        workers block the address at C{max_failures_per_address}, logged
        once, and both workers then refuse it, a right password included
        (docs/counters.rst).
        """
        daemon = _Daemon(
            self,
            {
                "server": {"log_format": "json", "max_connections_per_address": "100"},
                "auth": {"max_failures_per_address": "4", "tarpit_delay": "0s"},
            },
        )
        daemon.start()
        port = daemon.twistd.ports["submissions"]
        daemon.redis.stop()

        def events(pattern: str, count: int = 1) -> list:
            lines = daemon.twistd.waitForLog(pattern, count=count)
            return [json.loads(line) for line in lines]

        # Connections, and the worker each went to (the kernel's choice):
        # three on each worker, two to fail on and one to try again.
        byWorker: dict = {1: [], 2: []}
        opened = 0
        while min(len(c) for c in byWorker.values()) < 3 and opened < 60:
            client = RawClient(port, tls=True)
            self.addCleanup(client.close)
            self.assertEqual(client.reply()[0], 220)
            opened += 1
            worker = events(r'"log_format": "connect: ', opened)[opened - 1]["log_worker"]
            byWorker[worker].append(client)
        self.assertTrue(all(len(c) >= 3 for c in byWorker.values()), f"{opened} connections")
        daemon.twistd.waitForLog(r"state backend .* failed")

        # Two failures on each worker: the fourth reaches the limit, and
        # its answer is the block's 421 (counted by each worker alone, all
        # four would be 535).
        answers = []
        for worker in (1, 2, 1, 2):
            client = byWorker[worker].pop()
            client.ehlo()
            answers.append(client.command(plain(BOB, b"wrong"))[0])
        self.assertEqual(answers, [535, 535, 535, 421])
        [blocked] = events(r'"log_format": "address blocked: ')
        self.assertEqual(blocked["failures"], 4)
        for worker in (1, 2):
            client = byWorker[worker].pop()
            client.ehlo()
            self.assertEqual(client.command(plain(BOB, BOB_PASSWORD))[0], 421, f"worker {worker}")
        failures = events(r'"log_format": "auth failure: ', 4)
        # (In the order the parent read the two workers' pipes.)
        self.assertEqual(sorted(e["log_worker"] for e in failures), [1, 1, 2, 2])
        self.assertEqual(len(events(r'"log_format": "address blocked: ')), 1)

    def test_metricsOfEveryWorker(self):
        """
        With [metrics], the parent serves what every worker counts: the
        messages each accepted add up, the sessions each has open add up,
        and a killed worker takes its open sessions with it, not its counts.
        """
        metrics = {"endpoint": "tcp:0:interface=127.0.0.1"}
        daemon = _Daemon(self, {"server": {"log_format": "json"}, "metrics": metrics})
        daemon.start()
        port = daemon.twistd.ports["submission"]
        [metricsPort] = re.findall(r"\[metrics\] listening on \S+:(\d+)", daemon.twistd.log())

        def scrape() -> dict:
            with urllib.request.urlopen(f"http://127.0.0.1:{metricsPort}/metrics", timeout=30) as r:
                text = r.read().decode()
            # Each family once: the parent's and the workers' do not overlap.
            families = re.findall(r"^# TYPE (\S+)", text, re.MULTILINE)
            self.assertEqual(len(families), len(set(families)), text)
            return parse(text)

        def workersOf(pattern: str) -> list:
            return [
                json.loads(line)["log_worker"]
                for line in daemon.twistd.log().splitlines()
                if re.search(pattern, line) and '"log_worker"' in line
            ]

        accepted = 0
        # Until each worker has accepted one (which takes which is the kernel's choice).
        while len(set(workersOf(r"message accepted: "))) < 2 and accepted < 200:
            sendOne(port)
            accepted += 1
            daemon.twistd.waitForLog(r"message accepted: ", count=accepted)
        held = []
        # Open sessions, from addresses of their own, until each worker has one.
        while len(set(workersOf(r'"log_format": "connect: ')[accepted:])) < 2:
            self.assertLess(len(held), 100)
            client = RawClient(port, source=f"127.0.0.{10 + len(held)}")
            self.addCleanup(client.close)
            self.assertEqual(client.reply()[0], 220)
            held.append(client)
            daemon.twistd.waitForLog(r'"log_format": "connect: ', count=accepted + len(held))
        byWorker = workersOf(r'"log_format": "connect: ')[accepted:]
        victim = byWorker[-1]
        before = scrape()
        total = ("mailauth_messages_accepted_total", ())
        opened = ("mailauth_connections_open", (("listener", "submission"),))
        self.assertEqual((before[total], before[opened]), (accepted, len(held)))
        [started] = [
            json.loads(line)
            for line in daemon.twistd.log().splitlines()
            if '"log_format": "worker {index} started' in line
            and json.loads(line)["index"] == victim
        ][-1:]
        os.kill(started["pid"], signal.SIGKILL)
        daemon.twistd.waitForLog(r"was killed by SIGKILL; starting it again")
        after = scrape()
        self.assertEqual(
            (after[total], after[opened]), (accepted, len(held) - byWorker.count(victim))
        )
        # Its counts were folded into the ended workers' file, its own gone.
        files = os.listdir(os.path.join(daemon.dir, "state", "metrics"))
        self.assertNotIn(f"counter_{started['pid']}.db", files)
        self.assertIn("counter_ended.db", files)
        # The relay's and the process's metrics are the parent's.
        self.assertEqual(after[("mailauth_relay_attempts_total", (("outcome", "sent"),))], 0)
        self.assertIn(("process_open_fds", ()), after)

    def test_hungWorkerAbortedAndReplaced(self):
        """
        A worker whose event loop stops (SIGSTOP here) is noticed after
        C{worker_timeout}: one error line, SIGABRT, on which it writes its
        threads' stacks (once it runs again), which the parent logs; a new
        worker takes its place and serves, and the other served throughout.
        """
        daemon = _Daemon(self, {"server": {"worker_timeout": "3s"}})
        daemon.start()
        port = daemon.twistd.ports["submission"]
        victim, other = daemon.twistd.workerPIDs()
        os.kill(victim, signal.SIGSTOP)
        self.addCleanup(lambda: processAlive(victim) and os.kill(victim, signal.SIGKILL))
        [line] = daemon.twistd.waitForLog(r"has said nothing for")
        self.assertRegex(
            line,
            rf"\[mailauth\.workers#error\] worker [12] \(pid {victim}\) has said nothing for "
            r"[345] s: its event loop hangs; aborting it \(SIGABRT: its threads' stacks follow\)",
        )
        # The hang ends and the SIGABRT it was sent lands: the stacks,
        # then the death the parent reports as any other.
        os.kill(victim, signal.SIGCONT)
        daemon.twistd.waitForLog(rf"\(pid {victim}\) was killed by SIGABRT; starting it again")
        stacks = [line for line in daemon.twistd.log().splitlines() if f"(pid {victim}): " in line]
        self.assertTrue(any("most recent call first" in line for line in stacks), stacks)
        # The event loop's thread is among them (in epoll's wait, or between
        # two of its turns, wherever SIGSTOP found it), whole: the signal
        # went to that thread (tgkill), which wrote the stacks, so its own
        # held still. Sent to the process, it could land in a pool thread
        # and the loop's stack come out cut short, running on.
        dump = [line.split("): ", 1)[1] for line in stacks]
        current = dump.index(next(line for line in dump if line.startswith("Current thread")))
        loop = []
        for line in dump[current + 1 :]:
            if not line.startswith("  File "):
                break
            loop.append(line)
        self.assertTrue(any(" in mainLoop" in line for line in loop), dump)
        self.assertTrue(any(" in _run_module_as_main" in line for line in loop), dump)
        daemon.twistd.waitForLog(r"is serving", count=3)
        workers = daemon.twistd.workerPIDs()
        self.assertNotIn(victim, workers)
        self.assertIn(other, workers)
        self.assertNotIn("did not end", daemon.twistd.log())
        for _ in range(4):
            sendOne(port)

    def test_sighupReloadsEveryWorker(self):
        """
        SIGHUP to the parent reloads it and reaches every worker: each logs
        its reload, and every new connection gets the new certificate.
        """
        daemon = _Daemon(self)
        daemon.start()
        port = daemon.twistd.ports["submissions"]
        old = _peerCertificate(port)
        writeCertificate(os.path.join(daemon.dir, "tls"), name="renewed.example.test")
        daemon.twistd.signal(signal.SIGHUP)
        daemon.twistd.waitForLog(r"SIGHUP: reloading", count=3)
        seen = {_peerCertificate(port) for _ in range(8)}
        self.assertEqual(len(seen), 1)
        self.assertNotEqual(seen, {old})

    def test_sigtermStopsEverything(self):
        """
        SIGTERM to the parent stops every worker, then the parent, which
        ends as twistd does with one process: by the same signal.
        """
        daemon = _Daemon(self)
        daemon.start()
        pids = daemon.twistd.workerPIDs()
        daemon.twistd.signal(signal.SIGTERM)
        self.assertEqual(daemon.twistd.wait(), -signal.SIGTERM)
        self.assertEqual([pid for pid in pids if processAlive(pid)], [])
        daemon.twistd.waitForLog(r"worker \d \(pid \d+\) stopped: exited with 0", count=2)

    def test_workersEndWithTheirParent(self):
        """A parent killed outright leaves no worker behind: each sees its pipe close."""
        daemon = _Daemon(self)
        daemon.start()
        pids = daemon.twistd.workerPIDs()
        daemon.twistd.signal(signal.SIGKILL)
        daemon.twistd.wait()
        deadline = time.monotonic() + 30
        while any(processAlive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual([pid for pid in pids if processAlive(pid)], [])

    def test_hungWorkerEndsWithItsParent(self):
        """
        A worker whose event loop hangs (here: stopped) never reads the end
        of its pipe; the kernel ends it when its parent is killed outright
        (C{PR_SET_PDEATHSIG}), so it cannot keep the ports from the next
        daemon.
        """
        daemon = _Daemon(self)
        daemon.start()
        pids = daemon.twistd.workerPIDs()
        os.kill(pids[0], signal.SIGSTOP)
        daemon.twistd.signal(signal.SIGKILL)
        daemon.twistd.wait()
        deadline = time.monotonic() + 30
        while any(processAlive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = [pid for pid in pids if processAlive(pid)]
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        self.assertEqual(alive, [])

    def test_workersThatCannotStartEndTwistdWithStatusOne(self):
        """
        When no worker can start, twistd stops and exits with status 1, so
        that whatever ran it (a shell, a container's restart policy) sees
        the failure. The parent's own Python runs; the workers' Python,
        given the parent's environment, refuses to start.
        """
        daemon = _Daemon(self, prelude="import os; os.environ['PYTHONMALLOC'] = 'bogus'; ")
        daemon.twistd.spawn()
        self.assertEqual(daemon.twistd.wait(60), 1, daemon.twistd.log()[-3000:])
        log = daemon.twistd.log()
        self.assertIn("PYTHONMALLOC", log)
        self.assertRegex(log, r"worker \d \(pid \d+\) exited with 1 before it could serve")
        self.assertEqual(daemon.twistd.workerPIDs(), [])

    def test_daemonStartedOnceWorkersServe(self):
        """
        As a daemon, twistd's first process exits 0 only once both workers
        serve (twistd alone would say so as soon as the services started);
        SIGTERM then stops the daemon, which removes its pid file.
        """
        daemon = _Daemon(self)
        pidfile = os.path.join(daemon.dir, "twistd.pid")
        result = daemon.twistd.daemonize(pidfile)
        self.assertEqual(result.returncode, 0, result.stderr)
        with open(pidfile) as f:
            pid = int(f.read())
        self.addCleanup(lambda: processAlive(pid) and os.kill(pid, signal.SIGKILL))
        serving = re.findall(r"worker \d \(pid \d+\) is serving", daemon.twistd.log())
        self.assertEqual(len(serving), 2, daemon.twistd.log()[-3000:])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while processAlive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(processAlive(pid))
        self.assertFalse(os.path.exists(pidfile))

    def test_daemonReportsWorkersThatCannotStart(self):
        """
        As a daemon whose workers cannot start, twistd's first process exits
        1 and says why, once the daemon has ended and removed its pid file.
        """
        daemon = _Daemon(self, prelude="import os; os.environ['PYTHONMALLOC'] = 'bogus'; ")
        pidfile = os.path.join(daemon.dir, "twistd.pid")
        result = daemon.twistd.daemonize(pidfile)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("no worker could start: see the log", result.stderr)
        self.assertFalse(os.path.exists(pidfile))
        self.assertRegex(
            daemon.twistd.log(), r"worker \d \(pid \d+\) exited with 1 before it could serve"
        )


def _peerCertificate(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with clientContext().wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)


def _privilegedPort() -> int:
    """A port below 1024 free on 127.0.0.1 (as root), from a random place in the range."""
    for port in random.sample(range(600, 1024), 424):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise AssertionError("no free port below 1024")


class PrivilegeTests(unittest.TestCase):
    """twistd's C{--uid}/C{--gid} with workers (needs root, as they do)."""

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("--uid and --gid need root")
        self.nobody = pwd.getpwnam("nobody")

    def daemon(self, keyMode: int, port: int = 0, settings=None):
        daemon = _Daemon(
            self,
            {
                "listener:submissions": {"endpoint": f"tcp:{port}:interface=127.0.0.1"},
                **(settings or {}),
            },
            twistdArgs=["--uid", str(self.nobody.pw_uid), "--gid", str(self.nobody.pw_gid)],
        )
        # What the workers read and write as nobody, as an operator would set it up.
        for folder in (daemon.dir, os.path.dirname(daemon.dir)):  # mktemp's parent is 0700
            os.chmod(folder, 0o755)
        os.chmod(os.path.join(daemon.dir, "tls", "key.pem"), keyMode)
        os.chmod(os.path.join(daemon.dir, "users"), 0o644)
        os.makedirs(os.path.join(daemon.dir, "mail"))
        shutil.chown(os.path.join(daemon.dir, "mail"), self.nobody.pw_uid, self.nobody.pw_gid)
        return daemon

    def test_workersDropPrivileges(self):
        """
        The parent binds a port below 1024 as root; then it and its
        workers run as the C{--uid}/C{--gid} user and serve mail, and
        count it in the metrics the parent serves.
        """
        # The workers are this Python running this checkout, as nobody.
        try:
            probe = subprocess.run(
                [sys.executable, "-c", "import mailauth.workers"],
                cwd="/",
                env=dict(os.environ, PYTHONPATH=ROOT),
                capture_output=True,
                user=self.nobody.pw_uid,
                group=self.nobody.pw_gid,
            )
            why = probe.stderr.decode(errors="replace").strip()[-300:] if probe.returncode else ""
        except OSError as e:
            why = str(e)
        if why:
            raise unittest.SkipTest(
                f"nobody cannot run {sys.executable} on {ROOT} (a virtualenv under /root?); "
                f".ci/run runs this on Debian's python3 too: {why}"
            )
        port = _privilegedPort()
        daemon = self.daemon(0o644, port, {"metrics": {"endpoint": "tcp:0:interface=127.0.0.1"}})
        daemon.start()
        self.assertEqual(daemon.twistd.ports["submissions"], port)
        for pid in [daemon.twistd.process.pid, *daemon.twistd.workerPIDs()]:
            with open(f"/proc/{pid}/status") as f:
                status = f.read()
            uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
            gids = re.search(r"^Gid:\s+(.*)$", status, re.M).group(1).split()
            self.assertEqual(set(uids), {str(self.nobody.pw_uid)})
            self.assertEqual(set(gids), {str(self.nobody.pw_gid)})
        queued = sendOne(port, implicit=True)
        self.assertEqual(deliveredIDs(daemon.maildir()), {queued})
        [metricsPort] = re.findall(r"\[metrics\] listening on \S+:(\d+)", daemon.twistd.log())
        with urllib.request.urlopen(f"http://127.0.0.1:{metricsPort}/metrics", timeout=30) as r:
            scraped = parse(r.read().decode())
        self.assertEqual(scraped[("mailauth_messages_accepted_total", ())], 1)

    def test_keyTheWorkersCannotRead(self):
        """
        A key the C{--uid} user cannot read stops twistd before it starts,
        in one line: the workers would read it as that user (one process
        reads it as root, and only warns that SIGHUP could not).
        """
        daemon = self.daemon(0o600)
        with self.assertRaises(AssertionError):
            daemon.start()
        self.assertEqual(daemon.twistd.wait(), 1)
        key = os.path.join(daemon.dir, "tls", "key.pem")
        self.assertEqual(
            daemon.twistd.output().strip().splitlines(),
            [
                f"{daemon.configPath}: [tls] private_key: {key}: user nobody (uid "
                f"{self.nobody.pw_uid}) cannot read it, and the workers ([server] workers = 2) "
                "read it as that user"
            ],
        )
        self.assertEqual(daemon.twistd.workerPIDs(), [])
