"""
The benchmark suite behind C{bench/run}: mailauth and aiosmtpd doing the
same job on 127.0.0.1, each scenario run against both in turn (each on a
freshly started server), one table at the end with the ratio
mailauth/aiosmtpd and the targets of the performance issue.

Scenarios (C{--scenarios}):

- C{tput}: 10 KB messages, ten per connection, at concurrency 1, 10 and
  50 for C{--time} seconds each, C{--repeat} times alternating the servers;
  the sender's hash is SHA512-CRYPT.
- C{storm}: C{--storm} ARGON2ID logins at once while one logged-in client
  sends a NOOP every 10 ms; that client's NOOP latency.
- C{big}: one C{--big-mb} MB message; ingest rate and the server's peak
  RSS above its RSS after a warm-up (VmHWM reset through clear_refs, and
  VmRSS sampled every 10 ms).
- C{idle}: C{--idle} connections parked after EHLO, STARTTLS and EHLO; the
  server's RSS growth divided by the connections.
- C{dkim}: mailauth alone, the C{tput} load at concurrency 50 with and
  without C{[dkim]} (an Ed25519 key for the sender's domain), C{--repeat}
  times alternating the two; its own table, with the cost of signing as
  the share of throughput lost and the server CPU added per message
  (issue #12's target: under 10% of throughput).
- C{tls} (not in the default run): the C{tput} load at concurrency 50 on
  each server with STARTTLS and with no TLS at all (the load generator and
  both servers in the clear), C{--repeat} times alternating; its own table
  with the server CPU per message that TLS adds to each.
- C{metrics} (not in the default run): mailauth alone, the C{tput} load at
  concurrency 50 with one process and with C{workers = 2} (counters in
  Redis), each without and with C{[metrics]}, C{--repeat} times
  alternating; its own table with what serving metrics costs each (with
  workers, prometheus_client's multiprocess files).
- C{workers} (not in the default run): the C{tput} job at concurrency 50
  (C{--workers-concurrency}) against aiosmtpd, mailauth with one process and
  counters in memory (the default), one process with counters in Redis, and
  C{[server] workers = 2} with counters in Redis, alternating, C{--repeat}
  times; its own table with each one's msgs/s, the ratio to aiosmtpd, and
  the CPU each message cost the server (every process of it), the load
  generator and the whole machine. With 4 CPUs or more the servers run on
  the first half and the load generator on the other (C{--no-pin} to let
  them mix); below that they share every CPU, and the load generator's own
  CPU is what shows how much of the machine it took. Each run waits until
  other processes use at most C{--quiet} CPUs (up to C{--quiet-wait}
  seconds), and is run again (twice at most) when they were busy just
  after it; the table says how many runs were disturbed all the same.

Everything lives in C{--workdir} (default C{var/bench}, git-ignored): a
certificate, a users file, and a folder per run with the server's
configuration, log and Maildirs (the mail is deleted at the end; the rest
and C{results.json} stay). Every wait has a time cap, and both servers
listen on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from mailauth import passwords  # noqa: E402
from tests.support import writeCertificate  # noqa: E402

PYTHON = sys.executable
LOADGEN = os.path.join(HERE, "loadgen.py")
PASSWORD = "bench-password"
# The sender of the throughput, big-message and NOOP clients: SHA512-CRYPT,
# a scheme Dovecot sites still commonly hold; the storm uses ARGON2ID users.
SENDER = "bench@bench.test"
RECIPIENT = "rcpt@bench.test"
STORM_USER = "storm{n}@bench.test"
STORM_USERS = 10
KB = 1024
MB = 1024 * 1024
# The CPUs the load generator runs on (the workers scenario pins it apart
# from the servers where there are enough); None: any.
LOADGEN_CPUS: Optional[set] = None


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# When it creates a file, ext4 passes over every inode deleted less than a
# minute ago (six, while its inode table block is not written back yet):
# after the tens of thousands of messages a run deletes at its end, file
# creation costs several times as much (perf: recently_deleted), and the
# first runs of the next invocation would measure that, not the servers.
SETTLE_S = 360.0


def settle(work: str) -> None:
    """Wait until the mail the last invocation deleted at its end is old enough."""
    try:
        ended = os.path.getmtime(os.path.join(work, "results.json"))
    except OSError:
        return
    wait = ended + SETTLE_S - time.time()
    if wait > 0:
        log(
            f"waiting {wait:.0f} s: the last run deleted its mail {time.time() - ended:.0f} s ago, "
            "and ext4 makes new files slowly for minutes after a large deletion"
        )
        time.sleep(wait)


def prepare(work: str) -> None:
    """The certificate and the users file both servers read."""
    if os.path.exists(work):
        shutil.rmtree(work)
    os.makedirs(work)
    writeCertificate(os.path.join(work, "tls"))
    lines = [
        f"{SENDER}:{passwords.makeHash(PASSWORD.encode(), 'SHA512-CRYPT')}",
        f"{RECIPIENT}:{passwords.makeHash(PASSWORD.encode(), 'SHA512-CRYPT')}",
    ]
    storm = passwords.makeHash(PASSWORD.encode(), "ARGON2ID")
    for n in range(STORM_USERS):
        # One fresh hash each would cost a second of argon2 per user here
        # and change nothing: the server verifies the same work per login.
        lines.append(f"{STORM_USER.format(n=n)}:{storm}")
    with open(os.path.join(work, "users"), "w") as f:
        f.write("\n".join(lines) + "\n")


class Server:
    """One server process: started, probed for its banner, measured through /proc, stopped."""

    def __init__(
        self,
        name: str,
        work: str,
        label: str = "",
        workers: int = 1,
        redis: str = "",
        cpus: Optional[set] = None,
        extra: str = "",
        tls: bool = True,
    ) -> None:
        """
        @param workers: mailauth's C{[server] workers}.
        @param tls: STARTTLS as usual; if false, none (AUTH in the clear).
        @param redis: the URL of a Redis for C{[state] backend} (workers > 1).
        @param cpus: the CPUs the server may run on, or L{None} for any.
        @param extra: configuration added to mailauth's (a C{[dkim]} section).
        """
        self.name = name
        self.work = work
        self.workers = workers
        self.redis = redis
        self.cpus = cpus
        self.extra = extra
        self.tls = tls
        # A folder of its own for every run: deleting a run's mail before
        # the next would leave ext4 thousands of recently deleted inodes to
        # skip over in every file creation of that next run.
        self.dir = os.path.join(work, f"{name}-{label}" if label else name)
        self.port = 0
        self.process: Optional[subprocess.Popen] = None

    def argv(self) -> list:
        tls = os.path.join(self.work, "tls")
        if self.name == "mailauth":
            with open(os.path.join(HERE, "mailauth.conf.in")) as f:
                template = f.read()
            config = os.path.join(self.dir, "mailauth.conf")
            with open(config, "w") as f:
                state = f"[state]\nbackend = {self.redis}\n" if self.redis else ""
                f.write(
                    template.format(
                        dir=self.dir,
                        work=self.work,
                        port=self.port,
                        workers=self.workers,
                        state=state,
                        tls="starttls" if self.tls else "none",
                        plaintext="yes" if self.tls else "no",
                    )
                    + self.extra
                )
            return [
                os.path.join(os.path.dirname(PYTHON), "twistd"),
                "--nodaemon",
                "--pidfile=",
                # As the Debian unit runs it: the log on standard output
                # (there the journal, here server.log).
                "--logfile=-",
                "mailauth",
                "--config",
                config,
            ]
        return [
            PYTHON,
            os.path.join(HERE, "peer.py"),
            "--port",
            str(self.port),
            "--certificate",
            os.path.join(tls, "cert.pem"),
            "--private-key",
            os.path.join(tls, "key.pem"),
            "--users",
            os.path.join(self.work, "users"),
            "--maildir",
            os.path.join(self.dir, "mail", "{domain}", "{localpart}", "Maildir"),
            "--domain",
            "bench.test",
            "--log",
            os.path.join(self.dir, "server.log"),
            *(() if self.tls else ("--no-tls",)),
        ]

    def start(self) -> None:
        if os.path.exists(self.dir):
            shutil.rmtree(self.dir)
        os.makedirs(self.dir)
        self.port = freePort()
        argv = self.argv()
        path = [p for p in (os.environ.get("PYTHONPATH"), ROOT) if p]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        output = "server.log" if self.name == "mailauth" else "stdout.log"
        out = open(os.path.join(self.dir, output), "ab")
        self.process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=pinner(self.cpus),
        )
        out.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}; see {self.dir}/{output}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(100).startswith(b"220") and self.serving():
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer on port {self.port} within 30 s")

    def serving(self) -> bool:
        """Whether every worker has said it serves (the parent's socket answers from the first)."""
        if self.workers == 1:
            return True
        try:
            with open(os.path.join(self.dir, "server.log"), errors="replace") as f:
                return f.read().count(") is serving") >= self.workers
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server; flush the file systems so the next run does not pay for its writes."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        os.sync()

    def status(self, key: str) -> int:
        """A C{/proc/PID/status} value in bytes (VmRSS, VmHWM)."""
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def resetPeak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux 4.0+); L{False} where that is refused."""
        try:
            with open(f"/proc/{self.process.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def cpu(self) -> float:
        """
        User plus system CPU seconds of every thread so far, of the server
        and of its worker processes (their own, and that of workers that
        ended: the parent reaps them).
        """
        total = 0.0
        for pid in [self.process.pid, *descendants(self.process.pid)]:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue  # ended meanwhile
            total += sum(int(x) for x in fields[11:15])
        return total / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list:
    """The process ids of every process below C{pid}."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found += [int(entry), *descendants(int(entry))]
    return found


def pinner(cpus: Optional[set]):
    """A C{preexec_fn} that keeps a child (and what it starts) on C{cpus}; L{None} for any."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


class PeakSampler(threading.Thread):
    """Polls VmRSS every 10 ms: the peak, even where VmHWM cannot be reset."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, self.server.status("VmRSS"))
            except (OSError, KeyError):
                return
            self.done.wait(0.01)

    def stop(self) -> int:
        self.done.set()
        self.join(5)
        return self.peak


def loadgen(server: Server, *args: str, onStderr=None, cap: float = 300) -> dict:
    """Run the load generator against C{server}; its JSON result."""
    argv = [PYTHON, LOADGEN, "--port", str(server.port), "--password", PASSWORD, *args]
    if not server.tls:
        argv += ["--tls", "none"]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=pinner(LOADGEN_CPUS),
    )
    timer = threading.Timer(cap, proc.kill)
    timer.start()
    try:
        errors = []
        for line in proc.stderr:
            errors.append(line)
            if onStderr is not None:
                onStderr(line)
        out = proc.stdout.read()
        proc.wait()
    finally:
        timer.cancel()
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(
            f"loadgen failed ({proc.returncode}): {''.join(errors)[-2000:]}"
        ) from None


def sendArgs(concurrency: int, messages: int, size: int, seconds: float, total: int = 0) -> list:
    return [
        "--mode",
        "send",
        "--user",
        SENDER,
        "--rcpt",
        RECIPIENT,
        "--concurrency",
        str(concurrency),
        "--messages",
        str(messages),
        "--size",
        str(size),
        "--time",
        str(seconds),
        "--total",
        str(total),
    ]


def machineBusy() -> float:
    """CPU seconds this machine's cores have worked (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # Not idle, iowait or steal (time the hypervisor gave to someone else).
    return (sum(fields[:7]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def backgroundLoad(seconds: float = 1.0) -> float:
    """How many CPUs' worth of work other processes do while nothing is benchmarked."""
    busy = machineBusy()
    time.sleep(seconds)
    return (machineBusy() - busy) / seconds


def throughput(server: Server, concurrency: int, seconds: float) -> dict:
    """
    10 KB messages, ten per connection, for C{seconds}; with the CPU each
    message cost the server, the load generator and the whole machine
    (the rest is the kernel's: loopback TCP, the file system's journal).
    """
    cpu, machine = server.cpu(), machineBusy()
    # One client process: its connections are callbacks of one event loop,
    # which at concurrency 50 is a third busy against the fastest server
    # here, so it never sets the pace; two processes cost 25% more client
    # CPU per message (fewer events per wakeup), which the servers then lack
    # on a machine they share.
    r = loadgen(server, *sendArgs(concurrency, 10, 10 * KB, seconds))
    used, machine = server.cpu() - cpu, machineBusy() - machine
    if r["messages"]:
        for key, seconds in (("server", used), ("client", r["client_cpu_s"]), ("machine", machine)):
            r[f"{key}_cpu_ms_per_msg"] = round(seconds / r["messages"] * 1000, 3)
    return r


def storm(server: Server, logins: int) -> dict:
    """ARGON2ID logins all at once while one logged-in client sends NOOPs."""
    sampler = PeakSampler(server)
    base = server.status("VmRSS")
    sampler.start()
    r = loadgen(
        server,
        "--mode",
        "storm",
        "--user",
        STORM_USER,
        "--user-count",
        str(STORM_USERS),
        "--noop-user",
        SENDER,
        "--concurrency",
        str(logins),
        "--time",
        "120",
        "--timeout",
        "100",
    )
    r["rss_growth_mb"] = round((sampler.stop() - base) / MB, 1)
    return r


def warmUp(server: Server) -> None:
    """One login and one message, so code paths and buffers are in place before a baseline."""
    loadgen(server, *sendArgs(1, 1, 10 * KB, 10, total=1))
    loadgen(server, "--mode", "idle", "--user", SENDER, "--concurrency", "10", "--hold", "0")
    time.sleep(0.3)


def bigMessage(server: Server, size: int) -> dict:
    warmUp(server)
    base = server.status("VmRSS")
    reset = server.resetPeak()
    sampler = PeakSampler(server)
    sampler.start()
    r = loadgen(server, *sendArgs(1, 1, size, 120, total=1), "--timeout", "120")
    peak = sampler.stop()
    if reset:
        peak = max(peak, server.status("VmHWM"))
    r["rss_growth_mb"] = round((peak - base) / MB, 1)
    return r


def idle(server: Server, count: int) -> dict:
    warmUp(server)
    base = server.status("VmRSS")
    measured = {}

    def parked(line: str) -> None:
        if line.startswith("parked "):
            time.sleep(0.5)
            measured["rss"] = server.status("VmRSS")
            measured["parked"] = int(line.split()[1])

    r = loadgen(
        server,
        "--mode",
        "idle",
        "--user",
        SENDER,
        "--concurrency",
        str(count),
        "--hold",
        "2",
        "--time",
        "120",
        onStderr=parked,
    )
    if measured.get("parked"):
        r["rss_per_conn_kb"] = round((measured["rss"] - base) / measured["parked"] / KB, 1)
        r["rss_growth_mb"] = round((measured["rss"] - base) / MB, 1)
    return r


def average(runs: list) -> dict:
    """The mean of every number over C{runs}; failures added up; each run kept."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[-1]
    if len(good) == 1:
        return good[0]
    out = dict(good[-1])
    for key in good[-1]:
        values = [r.get(key) for r in good]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = round(sum(values) / len(values), 3)
    failures: dict = {}
    for r in good:
        for code, count in r.get("failures", {}).items():
            failures[code] = failures.get(code, 0) + count
    out["failures"] = failures
    out["runs"] = [
        {k: r.get(k) for k in ("msgs_per_s", "login_p50_ms", "message_p99_ms")} for r in good
    ]
    return out


def dkimSection(work: str) -> str:
    """
    A C{[dkim]} section signing mail from the benchmark's domain with a new
    Ed25519 key, made by C{mailauth dkim keygen} as an operator makes it.
    """
    domain, selector, keydir = SENDER.partition("@")[2], "bench", os.path.join(work, "dkim")
    subprocess.run(
        [
            os.path.join(os.path.dirname(PYTHON), "mailauth"),
            "dkim",
            "keygen",
            domain,
            "--type",
            "ed25519",
            "--selector",
            selector,
            "--keydir",
            keydir,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return f"\n[dkim]\n{domain} = {selector}:{os.path.join(keydir, f'{domain}.{selector}.pem')}\n"


def dkimCost(work: str, seconds: float, repeat: int) -> dict:
    """
    The C{tput} load at concurrency 50 on mailauth without and with
    C{[dkim]}, alternating, C{repeat} times each; the averages and the cost.
    """
    variants = {"unsigned": "", "ed25519": dkimSection(work)}
    runs: dict = {name: [] for name in variants}
    for attempt in range(repeat):
        for name, extra in variants.items():
            server = Server("mailauth", work, f"dkim-{name}-{attempt + 1}", extra=extra)
            log(f"dkim: mailauth {name} ({attempt + 1}/{repeat}) ...")
            try:
                server.start()
                r = throughput(server, 50, seconds)
                r["signed"] = signedShare(server)
                runs[name].append(r)
            except RuntimeError as e:
                runs[name].append({"error": str(e)})
                log(f"  {name} failed: {e}")
            finally:
                server.stop()
            log(f"  {json.dumps(runs[name][-1])}")
    out = {name: average(r) for name, r in runs.items()}
    plain, signed = out["unsigned"], out["ed25519"]
    if plain.get("msgs_per_s") and signed.get("msgs_per_s"):
        out["throughput_cost"] = round(1 - signed["msgs_per_s"] / plain["msgs_per_s"], 4)
    out["server_cpu_ms_added"] = cpuAdded(plain, signed)
    return out


def cpuAdded(without: dict, withIt: dict) -> Optional[float]:
    """The server CPU per message (ms) a run C{withIt} took beyond one C{without}, if both ran."""
    if "server_cpu_ms_per_msg" in without and "server_cpu_ms_per_msg" in withIt:
        return round(withIt["server_cpu_ms_per_msg"] - without["server_cpu_ms_per_msg"], 3)
    return None


def costTable(title: str, columns: tuple, rows: list) -> str:
    """
    A table of runs in two variants (C{columns}: their names, e.g. TLS and
    plain): msgs/s and server CPU per message of each, and what the one
    costs beyond the other. C{rows}: (name, first, second, CPU added).
    """
    first, second = columns
    header = (
        f"{title:26} {'msgs/s ' + first:>14} {second:>8} "
        f"{'server CPU ms/msg ' + first:>26} {second:>8} {'adds':>6}"
    )
    out = [header, "-" * len(header)]
    for name, a, b, added in rows:
        out.append(
            f"{name:26} {fmt(a.get('msgs_per_s')):>14} {fmt(b.get('msgs_per_s')):>8} "
            f"{fmt(a.get('server_cpu_ms_per_msg'), 2):>26} "
            f"{fmt(b.get('server_cpu_ms_per_msg'), 2):>8} {fmt(added, 3):>6}"
        )
    return "\n".join(out)


# The tls scenario's runs: (server name, STARTTLS or not).
TLS_VARIANTS = (("aiosmtpd", True), ("aiosmtpd", False), ("mailauth", True), ("mailauth", False))


def tlsCost(work: str, seconds: float, repeat: int) -> dict:
    """
    The C{tput} load at concurrency 50 on each server with STARTTLS (as in
    every other scenario) and with no TLS at all (AUTH PLAIN in the clear),
    alternating, C{repeat} times each: what TLS costs each server per
    message. Results by C{"NAME tls"} and C{"NAME plain"}, and C{"NAME"}
    for the server CPU per message that TLS adds.
    """
    runs: dict = {f"{name} {'tls' if tls else 'plain'}": [] for name, tls in TLS_VARIANTS}
    for attempt in range(repeat):
        for name, tls in TLS_VARIANTS:
            key = f"{name} {'tls' if tls else 'plain'}"
            log(f"tls: {key} ({attempt + 1}/{repeat}) ...")
            server = Server(name, work, f"tls-{key.replace(' ', '-')}-{attempt + 1}", tls=tls)
            runs[key].append(freshThroughput(server, 50, seconds))
            log(f"  {json.dumps(runs[key][-1])}")
    out = {key: average(r) for key, r in runs.items()}
    for name in ("aiosmtpd", "mailauth"):
        out[name] = cpuAdded(out[f"{name} plain"], out[f"{name} tls"])
    return out


def tlsTable(r: dict) -> str:
    """The tls scenario's table: each server with and without TLS, and the CPU TLS adds."""
    rows = [
        (name, r.get(f"{name} tls", {}), r.get(f"{name} plain", {}), r.get(name))
        for name in ("aiosmtpd", "mailauth")
    ]
    return costTable("TLS cost (c=50, 10 KB)", ("TLS", "plain"), rows)


# The metrics scenario's runs: (label, workers, with [metrics]).
METRICS_VARIANTS = (
    ("1 process", 1, False),
    ("1 process, metrics", 1, True),
    ("workers = 2", 2, False),
    ("workers = 2, metrics", 2, True),
)
METRICS_SECTION = "\n[metrics]\nendpoint = tcp:0:interface=127.0.0.1\n"


def metricsCost(work: str, seconds: float, repeat: int) -> dict:
    """
    The C{tput} load at concurrency 50 on mailauth with one process and with
    two workers (counters in Redis), each without and with C{[metrics]},
    alternating, C{repeat} times each; results by label, and by C{"1
    process"} and C{"workers = 2"} the server CPU per message metrics add.
    """
    redis = startRedis(work)
    runs: dict = {label: [] for label, *_ in METRICS_VARIANTS}
    try:
        for attempt in range(repeat):
            for label, workers, served in METRICS_VARIANTS:
                log(f"metrics: {label} ({attempt + 1}/{repeat}) ...")
                server = Server(
                    "mailauth",
                    work,
                    f"metrics-w{workers}{'m' if served else ''}-{attempt + 1}",
                    workers=workers,
                    redis=redis.url if workers > 1 else "",
                    extra=METRICS_SECTION if served else "",
                )
                runs[label].append(freshThroughput(server, 50, seconds))
                log(f"  {json.dumps(runs[label][-1])}")
    finally:
        redis.cleanup()
    out = {label: average(r) for label, r in runs.items()}
    for label in ("1 process", "workers = 2"):
        out[f"{label} adds"] = cpuAdded(out[label], out[f"{label}, metrics"])
    return out


def metricsTable(r: dict) -> str:
    """The metrics scenario's table: without and with [metrics], and the CPU they add."""
    rows = [
        (f"mailauth, {x}", r.get(x, {}), r.get(f"{x}, metrics", {}), r.get(f"{x} adds"))
        for x in ("1 process", "workers = 2")
    ]
    return costTable("metrics cost (c=50, 10 KB)", ("none", "metrics"), rows)


def signedShare(server: Server) -> float:
    """The share of the messages delivered to C{server}'s recipient that carry a signature."""
    local, _, domain = RECIPIENT.partition("@")
    new = os.path.join(server.dir, "mail", domain, local, "Maildir", "new")
    names = os.listdir(new) if os.path.isdir(new) else []
    signed = 0
    for name in names:
        with open(os.path.join(new, name), "rb") as f:
            # Return-Path, then the signature.
            signed += f.read(200).split(b"\n")[1].startswith(b"DKIM-Signature: ")
    return round(signed / len(names), 3) if names else 0.0


def dkimTable(r: dict) -> str:
    """The signing cost: each measure without and with [dkim], and the verdict."""
    plain, signed = r.get("unsigned", {}), r.get("ed25519", {})
    rows = [
        ("10 KB msgs/s, concurrency 50", "msgs_per_s"),
        ("  message p50 ms", "message_p50_ms"),
        ("  message p99 ms", "message_p99_ms"),
        ("  server CPU ms/msg", "server_cpu_ms_per_msg"),
        ("  machine CPU ms/msg", "machine_cpu_ms_per_msg"),
        ("  share of messages signed", "signed"),
    ]
    header = f"{'DKIM signing (mailauth only)':40} {'unsigned':>10} {'ed25519':>10} {'ratio':>7}"
    out = [header, "-" * len(header)]
    for label, key in rows:
        x, y = plain.get(key), signed.get(key)
        ratio = f"{y / x:.2f}" if isinstance(y, (int, float)) and x else "-"
        out.append(f"{label:40} {fmt(x):>10} {fmt(y):>10} {ratio:>7}")
    cost = r.get("throughput_cost")
    if cost is not None:
        verdict = "met" if cost < 0.10 else "NOT MET"
        out.append(
            f"throughput lost to signing: {cost:.1%} (target < 10%: {verdict}); "
            f"server CPU added: {fmt(r.get('server_cpu_ms_added'), 3)} ms/msg"
        )
        runs = [
            (a.get("msgs_per_s"), b.get("msgs_per_s"))
            for a, b in zip(plain.get("runs", [plain]), signed.get("runs", [signed]))
        ]
        out.append(
            "  each run, unsigned/ed25519 msgs/s: "
            + ", ".join(f"{fmt(a)}/{fmt(b)}" for a, b in runs)
        )
    for name, side in (("unsigned", plain), ("ed25519", signed)):
        if side.get("failures"):
            out.append(f"  failed replies {name}: {side['failures']}")
    return "\n".join(out)


def machine() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "missing"

    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": version("twisted"),
        "aiosmtpd": version("aiosmtpd"),
        "openssl": ssl.OPENSSL_VERSION,
    }


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(results: dict, options) -> str:
    """The comparison table; ratio is mailauth/aiosmtpd."""
    a, b = results.get("mailauth", {}), results.get("aiosmtpd", {})

    def get(side: dict, scenario: str, key: str):
        return side.get(scenario, {}).get(key)

    rows = []
    for c in (1, 10, 50):
        rows.append(
            (
                f"10 KB msgs/s, concurrency {c}",
                f"tput{c}",
                "msgs_per_s",
                "higher",
                "ratio >= 1.5" if c == 50 else "",
            )
        )
    rows += [
        ("  message p50 ms, concurrency 50", "tput50", "message_p50_ms", "lower", ""),
        ("  message p99 ms, concurrency 50", "tput50", "message_p99_ms", "lower", ""),
        ("  server CPU ms/msg, concurrency 50", "tput50", "server_cpu_ms_per_msg", "lower", ""),
        ("  client CPU ms/msg, concurrency 50", "tput50", "client_cpu_ms_per_msg", "lower", ""),
        ("  machine CPU ms/msg, concurrency 50", "tput50", "machine_cpu_ms_per_msg", "lower", ""),
        ("connect+STARTTLS+AUTH p50 ms, c=1", "tput1", "login_p50_ms", "lower", "< 10"),
        ("connect+STARTTLS+AUTH p99 ms, c=1", "tput1", "login_p99_ms", "lower", ""),
        (
            f"auth storm ({options.storm} ARGON2ID): NOOP p50 ms",
            "storm",
            "noop_p50_ms",
            "lower",
            "",
        ),
        ("auth storm: NOOP p99 ms", "storm", "noop_p99_ms", "lower", "< 50"),
        ("auth storm: seconds for all logins", "storm", "storm_s", "lower", ""),
        ("auth storm: logins ok", "storm", "logins", "higher", ""),
        ("auth storm: peak RSS growth MB", "storm", "rss_growth_mb", "lower", ""),
        (f"{options.big_mb} MB message: ingest MB/s", "big", "mb_per_s", "higher", ""),
        (
            f"{options.big_mb} MB message: peak RSS growth MB",
            "big",
            "rss_growth_mb",
            "lower",
            "< 16",
        ),
        (
            f"idle ({options.idle} TLS conns): RSS KB/conn",
            "idle",
            "rss_per_conn_kb",
            "lower",
            "< 64",
        ),
    ]
    checks = {
        ("tput50", "msgs_per_s"): lambda x, y: y and x / y >= 1.5,
        ("tput1", "login_p50_ms"): lambda x, y: x < 10,
        ("storm", "noop_p99_ms"): lambda x, y: x < 50,
        ("big", "rss_growth_mb"): lambda x, y: x < 16,
        ("idle", "rss_per_conn_kb"): lambda x, y: x < 64,
    }
    header = (
        f"{'scenario (ratio = mailauth/aiosmtpd)':40} {'mailauth':>10} {'aiosmtpd':>10} "
        f"{'ratio':>7}  target"
    )
    out = [header, "-" * len(header)]
    for label, scenario, key, better, target in rows:
        if scenario not in a and scenario not in b:
            continue
        x, y = get(a, scenario, key), get(b, scenario, key)
        ratio = f"{x / y:.2f}" if isinstance(x, (int, float)) and y else "-"
        verdict = ""
        check = checks.get((scenario, key))
        if target and check and x is not None:
            verdict = "met" if check(x, y) else "NOT MET"
        mark = "(higher is better)" if better == "higher" and not target else ""
        out.append(
            f"{label:40} {fmt(x):>10} {fmt(y):>10} {ratio:>7}  "
            f"{(target + ' ' + verdict).strip() or mark}"
        )
    failures = []
    for name, side in results.items():
        for scenario, r in side.items():
            if isinstance(r, dict) and r.get("failures"):
                failures.append(f"  {name} {scenario}: {r['failures']}")
    if failures:
        out.append("failed replies (by code):")
        out.extend(failures)
    return "\n".join(out)


# The servers of the workers scenario: (label, server name, workers, counters in Redis).
WORKER_SETUPS = (
    ("aiosmtpd", "aiosmtpd", 1, False),
    ("mailauth, 1 process", "mailauth", 1, False),
    ("mailauth, 1 process, Redis", "mailauth", 1, True),
    ("mailauth, workers = 2, Redis", "mailauth", 2, True),
)


def startRedis(work: str):
    """A private redis-server for the counters (tests/redisharness.py's), or an error."""
    from tests.redisharness import MISSING, RedisServer

    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/sbin")
    if binary is None:
        raise SystemExit(f"the workers scenario needs Redis: {MISSING}")
    redis = RedisServer(binary, os.path.join(work, "redis"))
    redis.start()
    return redis


def splitCPUs(pin: bool) -> tuple:
    """
    (server CPUs, load generator CPUs): halves of this process's CPUs when
    there are 4 or more and C{pin}, else (L{None}, L{None}): all shared.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 4:
        return None, None
    half = len(cpus) // 2
    return set(cpus[:half]), set(cpus[half:])


def freshThroughput(server: Server, concurrency: int, seconds: float) -> dict:
    """L{throughput} on C{server} freshly started, then stopped; or the error."""
    try:
        server.start()
        return throughput(server, concurrency, seconds)
    except RuntimeError as e:
        return {"error": str(e)}
    finally:
        server.stop()


def waitQuiet(limit: float, patience: float) -> float:
    """
    Wait until other processes use at most C{limit} CPUs (sampled over a
    second), for at most C{patience} seconds; the last sample.
    """
    deadline = time.monotonic() + patience
    while True:
        load = backgroundLoad()
        if load <= limit or time.monotonic() > deadline:
            return load
        log(f"  waiting: other processes keep {load:.2f} CPUs busy (want <= {limit})")
        time.sleep(4)


def quietRun(options, run) -> dict:
    """
    C{run()} on a quiet machine: each attempt waits for quiet first, and
    is done again (at most twice more) when other processes were busy just
    after it, as they probably were during it. Its result says how busy.
    """
    for _ in range(3):
        before = waitQuiet(options.quiet, options.quiet_wait)
        result = run()
        after = backgroundLoad()
        result.update(
            background_before=round(before, 2),
            background_after=round(after, 2),
            disturbed=max(before, after) > options.quiet,
        )
        if not result["disturbed"] or "error" in result:
            return result
        log(
            f"  disturbed (other processes: {before:.2f} before, {after:.2f} after): "
            "running it again"
        )
    return result


def workersScenario(work: str, options) -> dict:
    """
    The throughput job against each of L{WORKER_SETUPS}, alternating,
    C{options.repeat} times per concurrency, each on a quiet machine where
    it can be (L{quietRun}); results by concurrency, then label.
    """
    global LOADGEN_CPUS
    serverCPUs, LOADGEN_CPUS = splitCPUs(options.pin)
    redis = startRedis(work)
    results: dict = {
        "pinned": serverCPUs is not None,
        "server_cpus": sorted(serverCPUs) if serverCPUs else None,
        "loadgen_cpus": sorted(LOADGEN_CPUS) if LOADGEN_CPUS else None,
    }
    try:
        for c in options.workers_concurrency:
            runs: dict = {label: [] for label, *_ in WORKER_SETUPS}
            for attempt in range(options.repeat):
                for label, name, workers, shared in WORKER_SETUPS:
                    server = Server(
                        name,
                        work,
                        f"w{workers}{'r' if shared else ''}-c{c}-{attempt + 1}",
                        workers=workers,
                        redis=redis.url if shared else "",
                        cpus=serverCPUs,
                    )
                    log(f"workers c={c}: {label} ({attempt + 1}/{options.repeat}) ...")
                    runs[label].append(
                        quietRun(
                            options, functools.partial(freshThroughput, server, c, options.time)
                        )
                    )
                    log(f"  {json.dumps(runs[label][-1])}")
            # Runs others disturbed only count where every run was disturbed.
            results[f"c{c}"] = {
                label: average([x for x in r if not x.get("disturbed")] or r)
                for label, r in runs.items()
            }
            for label, r in runs.items():
                results[f"c{c}"][label]["all_runs"] = [
                    {k: x.get(k) for k in ("msgs_per_s", "disturbed")} for x in r
                ]
    finally:
        redis.cleanup()
        LOADGEN_CPUS = None
    return results


def workersTable(results: dict) -> str:
    """The workers scenario's table: one block per concurrency, ratio to aiosmtpd."""
    pinned = (
        f"servers on CPUs {results['server_cpus']}, load generator on {results['loadgen_cpus']}"
        if results.get("pinned")
        else "servers and load generator share every CPU (fewer than 4, or --no-pin)"
    )
    out = [f"workers scenario ({pinned}); 10 KB messages, ten per connection"]
    header = (
        f"{'server':30} {'msgs/s':>8} {'x aiosmtpd':>10} {'p99 ms':>7} "
        f"{'server':>7} {'loadgen':>7} {'machine':>7}  CPU ms/msg"
    )
    for key, block in results.items():
        if not key.startswith("c") or not isinstance(block, dict):
            continue
        out += ["", f"concurrency {key[1:]}", header, "-" * len(header)]
        base = block.get("aiosmtpd", {}).get("msgs_per_s")
        for label, r in block.items():
            rate = r.get("msgs_per_s")
            ratio = f"{rate / base:.2f}" if rate and base else "-"
            target = ""
            if "workers = 2" in label and rate and base:
                target = "  >= 1.5 " + ("met" if rate / base >= 1.5 else "NOT MET")
            out.append(
                f"{label:30} {fmt(rate):>8} {ratio:>10} {fmt(r.get('message_p99_ms')):>7} "
                f"{fmt(r.get('server_cpu_ms_per_msg'), 2):>7} "
                f"{fmt(r.get('client_cpu_ms_per_msg'), 2):>7} "
                f"{fmt(r.get('machine_cpu_ms_per_msg'), 2):>7}{target}"
            )
            if r.get("failures"):
                out.append(f"  failed replies: {r['failures']}")
            if r.get("error"):
                out.append(f"  error: {r['error']}")
            runs = r.get("all_runs", [r])
            rates = " ".join(
                fmt(x.get("msgs_per_s")) + ("*" if x.get("disturbed") else "") for x in runs
            )
            disturbed = sum(1 for x in runs if x.get("disturbed"))
            out.append(
                f"  runs: {rates} msgs/s"
                + (
                    " (* other processes busy around it: left out of the mean unless all were)"
                    if disturbed
                    else ""
                )
            )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description="mailauth beside aiosmtpd, one table")
    p.add_argument("--workdir", default=os.path.join(ROOT, "var", "bench"))
    p.add_argument("--servers", default="mailauth,aiosmtpd")
    p.add_argument("--scenarios", default="tput,storm,big,idle,dkim")
    p.add_argument("--time", type=float, default=6.0, help="seconds per throughput run")
    p.add_argument("--repeat", type=int, default=3, help="runs of each throughput scenario")
    p.add_argument("--storm", type=int, default=200, help="logins in the auth storm")
    p.add_argument("--big-mb", type=int, default=50)
    p.add_argument("--idle", type=int, default=2000, help="parked connections")
    p.add_argument("--json", help="also write every result to this file")
    p.add_argument(
        "--workers-concurrency",
        default="50",
        type=lambda text: [int(x) for x in text.split(",")],
        help="workers scenario: the concurrencies, comma-separated",
    )
    p.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="workers scenario: never pin servers and load generator apart",
    )
    p.add_argument(
        "--quiet",
        type=float,
        default=0.25,
        help="workers scenario: the CPUs other processes may use around a run",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=600,
        help="workers scenario: seconds to wait for that before each run",
    )
    options = p.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < options.idle + 200:
        want = (
            options.idle + 200 if hard == resource.RLIM_INFINITY else min(hard, options.idle + 200)
        )
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        if want < options.idle + 200:
            options.idle = max(10, want - 200)
            log(f"open files limited to {want}: parking only {options.idle} connections")

    servers = [name.strip() for name in options.servers.split(",") if name.strip()]
    scenarios = [name.strip() for name in options.scenarios.split(",") if name.strip()]
    work = os.path.abspath(options.workdir)
    log(f"preparing {work}")
    settle(work)
    prepare(work)
    results: dict = {name: {} for name in servers}
    plan = []
    for scenario in scenarios:
        if scenario == "tput":
            for c in (1, 10, 50):
                plan.append((f"tput{c}", lambda s, c=c: throughput(s, c, options.time)))
        elif scenario == "storm":
            plan.append(("storm", lambda s: storm(s, options.storm)))
        elif scenario == "big":
            plan.append(("big", lambda s: bigMessage(s, options.big_mb * MB)))
        elif scenario == "idle":
            plan.append(("idle", lambda s: idle(s, options.idle)))
        elif scenario == "dkim":
            pass  # mailauth alone, after the others: dkimCost
        elif scenario == "tls":
            pass  # its own servers and table, after the others: tlsCost
        elif scenario == "metrics":
            pass  # mailauth alone, its own table, after the others: metricsCost
        elif scenario == "workers":
            continue  # its own servers and table, after the others
        else:
            p.error(f"unknown scenario {scenario!r}")
    quiet = backgroundLoad()
    if quiet > 0.1:
        log(f"warning: other processes keep {quiet:.0%} of a CPU busy; expect noisy numbers")
    started = time.monotonic()
    for label, run in plan:
        # Throughput runs are repeated, alternating the servers, and
        # averaged: the disk's fsync latency drifts from minute to minute.
        repeats = options.repeat if label.startswith("tput") else 1
        runs: dict = {name: [] for name in servers}
        for attempt in range(repeats):
            for name in servers:
                server = Server(name, work, f"{label}-{attempt + 1}")
                log(f"{label}: {name} ({attempt + 1}/{repeats}) ...")
                try:
                    server.start()
                    runs[name].append(run(server))
                except RuntimeError as e:
                    runs[name].append({"error": str(e)})
                    log(f"  {name} {label} failed: {e}")
                finally:
                    server.stop()
                log(f"  {json.dumps(runs[name][-1])}")
        for name in servers:
            results[name][label] = average(runs[name])
    if "dkim" in scenarios:
        results["dkim"] = dkimCost(work, options.time, options.repeat)
    if "tls" in scenarios:
        results["tls"] = tlsCost(work, options.time, options.repeat)
    if "metrics" in scenarios:
        results["metrics"] = metricsCost(work, options.time, options.repeat)
    if "workers" in scenarios:
        results["workers"] = workersScenario(work, options)
    info = machine()
    info["background_cpu_before"] = round(quiet, 2)
    info["background_cpu_after"] = round(backgroundLoad(), 2)
    results["machine"] = info
    print()
    print(
        f"machine: {info['cpus']} x {info['cpu']}, Linux {info['kernel']}, "
        f"Python {info['python']}, Twisted {info['twisted']}, aiosmtpd {info['aiosmtpd']}, "
        f"{info['openssl']}"
    )
    if plan:
        print(table(results, options))
    if "dkim" in results:
        print(dkimTable(results["dkim"]))
    if "tls" in results:
        print(tlsTable(results["tls"]))
    if "metrics" in results:
        print(metricsTable(results["metrics"]))
    if "workers" in results:
        if plan:
            print()
        print(workersTable(results["workers"]))
    print(
        f"background load before/after: {info['background_cpu_before']:.2f}/"
        f"{info['background_cpu_after']:.2f} CPUs "
        f"({time.monotonic() - started:.0f} s; details in {work})"
    )
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    for name in os.listdir(work):
        shutil.rmtree(os.path.join(work, name, "mail"), ignore_errors=True)
    if options.json:
        with open(options.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
