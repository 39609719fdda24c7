"""
C{make cluster-test}: mailauth as several nodes behind HAProxy on one
machine, with the real engines, and the checks of scaling out.

Started here, unprivileged and in a temporary folder: Redis (the shared
counters), PostgreSQL (the users, when this tree has it; else a users file
that each node reads), three mailauth nodes of two workers each on
127.0.0.11, .12 and .13, all writing into one Maildir root (shared storage),
and HAProxy in front (TCP mode, PROXY v2) for submission (STARTTLS) and
submissions (implicit TLS). Then:

  1. a brute force from one address, spread by HAProxy over the nodes, must
     be refused after C{max_failures_per_address} failures in all, as one
     node alone would refuse it;
  2. load from 127.0.0.21, .22 and .23 through HAProxy
     (C{bench/loadgen.py}), during which one node is killed outright
     (SIGKILL to its parent and its workers);
  3. every message that got a 250 must be in the Maildir, the survivors
     must have served the rest, and the Received headers and the nodes'
     logs must name the real client addresses, not HAProxy's;
  4. each node's C{/metrics} (served by its parent for both its workers)
     must have counted what the node did: the brute force's failures and
     refusals, and every message each survivor stored.

It prints a summary and exits non-zero if any check fails. Not part of the
trial suite (it takes a minute); run it as C{python -m tests.cluster}.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Optional

from mailauth import passwords
from tests.haproxyharness import HAProxy, Route
from tests.harness import TwistdProcess, insecureContext, plain
from tests.redisharness import MISSING as REDIS_MISSING
from tests.redisharness import RedisServer
from tests.support import writeCertificate

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOADGEN = os.path.join(ROOT, "bench", "loadgen.py")

NODES = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
# Each load generator's source address and the frontend it uses.
CLIENTS = (
    ("127.0.0.21", "submission"),
    ("127.0.0.22", "submissions"),
    ("127.0.0.23", "submission"),
)
ATTACKER = "127.0.0.31"
PROXY = "127.0.0.1"
USER = "load@cluster.test"
PASSWORD = "cluster-load-password"
VICTIM = "victim@cluster.test"
MAX_FAILURES = 6

NODE_CONFIG = """\
[server]
hostname = node{n}.cluster.test
state_dir = {dir}/node{n}/state
workers = 2
max_connections_per_address = 500

[tls]
certificate = {dir}/tls/cert.pem
private_key = {dir}/tls/key.pem

[listener:submission]
endpoint = tcp:0:interface={address}
tls = starttls
proxy_protocol = v2
trusted_proxies = {proxy}

[listener:submissions]
endpoint = tcp:0:interface={address}
tls = implicit
proxy_protocol = v2
trusted_proxies = {proxy}

[auth]
users = {users}
max_failures_per_address = {maxFailures}
tarpit_delay = 0.05s
block_time = 10m

[delivery]
local_domains = cluster.test
maildir = {dir}/mail/{{domain}}/{{localpart}}/Maildir

[state]
backend = {redis}

[metrics]
endpoint = tcp:0:interface={address}
"""


class ClusterHAProxy(HAProxy):
    """
    tests/haproxyharness.py's HAProxy, and what a cluster adds to it: a
    connection whose node does not answer is retried on another one
    (between a node's death and its third failed health check, HAProxy
    would otherwise hand clients to it and close them).
    """

    def config(self) -> str:
        text = super().config()
        return text.replace(
            "    timeout check 5s\n",
            "    timeout check 5s\n    retries 2\n    option redispatch\n",
            1,
        )


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Check:
    """One named check: passed or not, with what was seen."""

    def __init__(self, name: str, ok: bool, detail: str) -> None:
        self.name, self.ok, self.detail = name, ok, detail


class Cluster:
    """Everything the test starts, in C{self.dir}; L{stop} stops it all."""

    def __init__(self, directory: str, database: str) -> None:
        self.dir = directory
        self.database = database
        self.redis: Optional[RedisServer] = None
        self.postgres = None
        self.nodes: list = []
        self.haproxy: Optional[HAProxy] = None
        self.killed: Optional[int] = None

    # Starting

    def start(self) -> None:
        writeCertificate(os.path.join(self.dir, "tls"))
        binary = shutil.which("redis-server") or shutil.which(
            "redis-server", path="/usr/sbin:/sbin"
        )
        if binary is None:
            raise SystemExit(REDIS_MISSING)
        self.redis = RedisServer(binary, os.path.join(self.dir, "redis"))
        self.redis.start()
        log(f"redis on {self.redis.url}")
        users = self.users()
        for n, address in enumerate(NODES, start=1):
            path = os.path.join(self.dir, f"node{n}.conf")
            os.makedirs(os.path.join(self.dir, f"node{n}"))
            with open(path, "w") as f:
                f.write(
                    NODE_CONFIG.format(
                        n=n,
                        dir=self.dir,
                        address=address,
                        proxy=PROXY,
                        users=users,
                        redis=self.redis.url,
                        maxFailures=MAX_FAILURES,
                    )
                )
            self.nodes.append(TwistdProcess(path, os.path.join(self.dir, f"node{n}.log")))
        if self.postgres is not None:
            self.addUsersToPostgreSQL()
        self._startNodes()
        routes = {
            "submission": Route(
                servers=tuple(
                    (address, node.ports["submission"]) for address, node in zip(NODES, self.nodes)
                ),
                proxy="v2",
                check="smtp",
            ),
            "submissions": Route(
                servers=tuple(
                    (address, node.ports["submissions"]) for address, node in zip(NODES, self.nodes)
                ),
                proxy="v2",
                check="tcp",
            ),
        }
        self.haproxy = ClusterHAProxy(os.path.join(self.dir, "haproxy"), routes, source=PROXY)
        self.haproxy.start()
        self.waitUntilChecked()
        log(
            f"haproxy: submission on {self.haproxy.ports['submission']}, "
            f"submissions on {self.haproxy.ports['submissions']}"
        )

    def _startNodes(self) -> None:
        """Start the nodes together: each takes seconds to import and start its workers."""
        errors: list = []

        def one(node):
            try:
                node.start(workers=2, timeout=120)
            except AssertionError as e:
                errors.append(e)

        threads = [threading.Thread(target=one, args=(node,)) for node in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        for n, node in enumerate(self.nodes, start=1):
            log(f"node{n}: pid {node.process.pid}, workers {node.workerPIDs()}, ports {node.ports}")

    def users(self) -> str:
        """The C{[auth] users} every node reads: PostgreSQL, or one users file."""
        hashed = passwords.makeHash(PASSWORD.encode(), "SHA512-CRYPT")
        victim = passwords.makeHash(b"the victim's own password", "SHA512-CRYPT")
        if self.database == "postgresql":
            from tests import pgharness

            self.postgres = pgharness.PostgreSQLServer()
            self.postgres.start()
            name = self.postgres.createDatabase()
            uri = self.postgres.uri(name, tcp=True)
            log(f"postgresql: {uri}")
            return uri
        path = os.path.join(self.dir, "users")
        with open(path, "w") as f:
            f.write(f"{USER}:{hashed}\n{VICTIM}:{victim}\n")
        return path

    def addUsersToPostgreSQL(self) -> None:
        """C{mailauth db init}, then the users, with the commands an operator uses."""
        config = self.nodes[0].configPath
        mailauth = [sys.executable, "-m", "mailauth.cli"]
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
        )
        subprocess.run([*mailauth, "db", "init", "--config", config], check=True, env=env, cwd=ROOT)
        for login, password in ((USER, PASSWORD), (VICTIM, "the victim's own password")):
            subprocess.run(
                [*mailauth, "user", "add", login, "--scheme", "SHA512-CRYPT", "--config", config],
                input=password + "\n",
                text=True,
                check=True,
                env=env,
                cwd=ROOT,
            )

    def waitUntilChecked(self, timeout: float = 60.0) -> None:
        """Wait until HAProxy has seen every node pass its health check."""
        deadline = time.monotonic() + timeout
        seen: dict = {}
        while time.monotonic() < deadline:
            try:
                seen = {
                    (row["pxname"], row["svname"]): row["check_status"]
                    for row in self.haproxy.stats()
                    if row["svname"].startswith("s")
                }
            except (OSError, ValueError):
                pass
            if len(seen) == 2 * len(NODES) and all(
                status in ("L7OK", "L4OK") for status in seen.values()
            ):
                return
            if self.haproxy.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"haproxy checks not passed: {seen}\n{self.haproxy.output()}")

    def serverStates(self) -> dict:
        """HAProxy's view: C{{(backend, server): status}} (UP, DOWN, ...)."""
        return {
            (row["pxname"], row["svname"]): row["status"]
            for row in self.haproxy.stats()
            if row["svname"].startswith("s")
        }

    # Stopping

    def kill(self, index: int) -> None:
        """Kill node C{index} outright: its parent and its workers, SIGKILL, at once."""
        node = self.nodes[index]
        pids = [node.process.pid, *node.workerPIDs()]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        node.wait()
        self.killed = index
        log(f"killed node{index + 1} (pids {pids})")

    def stop(self) -> None:
        for part in (self.haproxy, *self.nodes):
            if part is not None:
                try:
                    part.stop()
                except Exception as e:  # keep stopping the others
                    log(f"stopping {part}: {e!r}")
        if self.redis is not None:
            self.redis.cleanup()
        if self.postgres is not None:
            self.postgres.destroy()

    # What happened

    def delivered(self) -> dict:
        """
        Every message in the Maildirs: queue ID -> (node host name, client
        address), from its Received header.
        """
        found = {}
        for name in glob.glob(os.path.join(self.dir, "mail", "*", "*", "Maildir", "new", "*")):
            with open(name, "rb") as f:
                head = f.read(4096).decode("utf-8", "replace")
            m = re.search(
                r"Received: from \S+ \(\[([^\]]+)\]\).*?by (\S+) \(mailauth\) "
                r"with ESMTPSA id (\S+)",
                head,
                re.S,
            )
            if m:
                found[m.group(3)] = (m.group(2), m.group(1))
        return found

    def nodeLog(self, index: int) -> str:
        return self.nodes[index].log()

    def nodeMetrics(self, index: int) -> dict:
        """Node C{index}'s /metrics: {(sample name, sorted labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        [port] = re.findall(r"\[metrics\] listening on \S+:(\d+)", self.nodeLog(index))
        with urllib.request.urlopen(f"http://{NODES[index]}:{port}/metrics", timeout=30) as r:
            text = r.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


def total(metrics: dict, name: str, **labels: str) -> float:
    """The sum of the samples named C{name} that carry C{labels}."""
    return sum(
        value
        for (sample, have), value in metrics.items()
        if sample == name and set(labels.items()) <= set(have)
    )


def bruteForce(cluster: Cluster) -> list:
    """
    Failed logins from one address, one per connection, through HAProxy's
    round robin: refused everywhere after MAX_FAILURES failures in all;
    and counted so in the nodes' metrics.
    """
    port = cluster.haproxy.ports["submissions"]
    replies = []
    for _ in range(MAX_FAILURES + 2 * len(NODES)):
        try:
            sock = socket.create_connection(
                ("127.0.0.1", port), timeout=30, source_address=(ATTACKER, 0)
            )
            with insecureContext().wrap_socket(sock) as tls:
                reader = tls.makefile("rb")
                greeting = reader.readline()
                if not greeting.startswith(b"220"):
                    replies.append(greeting[:3].decode() or "closed")
                    continue
                tls.sendall(b"EHLO attacker.example\r\n")
                while reader.readline()[3:4] == b"-":
                    pass
                tls.sendall(plain(VICTIM.encode(), b"guess") + b"\r\n")
                replies.append(reader.readline()[:3].decode() or "closed")
        except (OSError, ssl.SSLError) as e:
            replies.append(f"error {e!r}")
    failures = {}
    for n in range(len(NODES)):
        failures[f"node{n + 1}"] = len(
            re.findall(rf"auth failure: client=\[{re.escape(ATTACKER)}\]", cluster.nodeLog(n))
        )
    expected = ["535"] * (MAX_FAILURES - 1) + ["421"] * (2 * len(NODES) + 1)
    spread = sum(1 for count in failures.values() if count) >= 2
    ok = replies == expected and sum(failures.values()) == MAX_FAILURES and spread
    # The last guess gets its 421 after AUTH; the rest are refused at once.
    metrics = [cluster.nodeMetrics(n) for n in range(len(NODES))]
    counted = {
        "failures": sum(total(m, "mailauth_auth_total", result="failure") for m in metrics),
        "blocked": sum(
            total(m, "mailauth_connections_refused_total", reason="blocked") for m in metrics
        ),
    }
    want = {"failures": MAX_FAILURES, "blocked": 2 * len(NODES)}
    return [
        Check(
            "brute force across nodes blocked at the single-node count",
            ok,
            f"replies {' '.join(replies)} (want {MAX_FAILURES - 1} x 535, then 421); "
            f"failures logged per node {failures} (want {MAX_FAILURES} in all, "
            "on at least 2 nodes)",
        ),
        Check(
            "the nodes' metrics count the brute force",
            counted == want,
            f"failed logins and connections refused as blocked, summed over the nodes' "
            f"/metrics: {counted} (want {want})",
        ),
    ]


def checkMetrics(cluster: Cluster) -> Check:
    """Each survivor's /metrics counted every message it stored, both workers' together."""
    byNode: dict = {}
    for node, _ in cluster.delivered().values():
        byNode[node] = byNode.get(node, 0) + 1
    counted, stored = {}, {}
    for n in range(len(NODES)):
        if n != cluster.killed:
            name = f"node{n + 1}.cluster.test"
            counted[name] = int(total(cluster.nodeMetrics(n), "mailauth_messages_accepted_total"))
            stored[name] = byNode.get(name, 0)
    return Check(
        "each survivor's metrics count the messages it stored",
        counted == stored and all(stored.values()),
        f"mailauth_messages_accepted_total by node {counted}; in the Maildir {stored}",
    )


def runLoad(cluster: Cluster, seconds: float, killAfter: float) -> tuple:
    """
    The load generators from each client address, and node 2 killed after
    C{killAfter} seconds; (accepted {id: (source, time)}, results, kill time).
    """
    processes = []
    for source, listener in CLIENTS:
        ids = os.path.join(cluster.dir, f"ids-{source}")
        argv = [
            sys.executable,
            LOADGEN,
            "--host",
            "127.0.0.1",
            "--port",
            str(cluster.haproxy.ports[listener]),
            "--tls",
            "starttls" if listener == "submission" else "implicit",
            "--source",
            source,
            "--user",
            USER,
            "--password",
            PASSWORD,
            "--rcpt",
            USER,
            "--mode",
            "send",
            "--concurrency",
            "4",
            "--messages",
            "5",
            "--size",
            "4096",
            "--time",
            str(seconds),
            "--timeout",
            "20",
            "--ids",
            ids,
        ]
        out = open(os.path.join(cluster.dir, f"loadgen-{source}.json"), "w")
        processes.append(
            (source, ids, out, subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT))
        )
    time.sleep(killAfter)  # the load runs in the other processes meanwhile
    killedAt = time.time()
    cluster.kill(1)
    accepted, results = {}, {}
    for source, ids, out, process in processes:
        process.wait(seconds + 120)
        out.close()
        with open(out.name) as f:
            results[source] = f.read().strip().splitlines()[-1]
        with open(ids) as f:
            for line in f:
                msgid, when = line.split()
                accepted[msgid] = (source, float(when))
    return accepted, results, killedAt


def checkLoad(cluster: Cluster, accepted: dict, killedAt: float) -> list:
    delivered = cluster.delivered()
    checks = []
    missing = sorted(set(accepted) - set(delivered))
    checks.append(
        Check(
            "no acknowledged message lost",
            not missing and bool(accepted),
            f"{len(accepted)} got 250, {len(accepted) - len(missing)} of them in "
            f"the Maildir" + (f"; missing {missing[:5]}" if missing else ""),
        )
    )
    killedName = f"node{cluster.killed + 1}.cluster.test"
    after = {
        msgid: delivered.get(msgid) for msgid, (_, when) in accepted.items() if when > killedAt + 1
    }
    byNode: dict = {}
    for where in after.values():
        node = where[0] if where else "missing"
        byNode[node] = byNode.get(node, 0) + 1
    survivors = {f"node{n + 1}.cluster.test" for n in range(len(NODES)) if n != cluster.killed}
    checks.append(
        Check(
            "the survivors served the rest",
            bool(after) and set(byNode) == survivors,
            f"after the kill: {len(after)} accepted, by node {byNode} ({killedName} was killed)",
        )
    )
    wrong = [
        (msgid, accepted[msgid][0], where[1])
        for msgid, where in delivered.items()
        if msgid in accepted and where[1] != accepted[msgid][0]
    ]
    checks.append(
        Check(
            "Received headers name the real client address",
            not wrong,
            f"{len(delivered)} messages; wrong: {wrong[:5]}",
        )
    )
    # A survivor's last lines may still be on their way from a worker to
    # its parent's log: read again for a few seconds before calling one lost.
    deadline = time.monotonic() + 5
    while True:
        logs = [cluster.nodeLog(n) for n in range(len(NODES))]
        logged = {}
        for text in logs:
            for client, msgid in re.findall(
                r"message accepted: client=\[([^\]]+)\] login=<[^>]*> id=(\S+)", text
            ):
                logged[msgid] = client
        unlogged = []
        for msgid, (source, when) in accepted.items():
            node = delivered.get(msgid, ("?",))[0]
            # The killed node's last lines may have died with it in its pipes.
            if node == killedName and when > killedAt - 1:
                continue
            if logged.get(msgid) != source:
                unlogged.append((msgid, source, logged.get(msgid)))
        if not unlogged or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # HAProxy's own address belongs only to its health checks (v2 LOCAL
    # headers): sessions that connect, greet and leave without a login.
    proxy = re.escape(PROXY)
    proxies = sum(
        len(re.findall(rf"(?:auth \w+|message accepted): client=\[{proxy}\]", text))
        for text in logs
    )
    checks_ = sum(
        len(re.findall(rf"disconnect: client=\[{proxy}\] login=<> messages=0", text))
        for text in logs
    )
    clients = {client for client in logged.values()}
    checks.append(
        Check(
            "the logs show the real client addresses",
            not unlogged and proxies == 0 and clients == {source for source, _ in CLIENTS},
            f"client addresses logged {sorted(clients)}; logins or messages under "
            f"HAProxy's {PROXY}: {proxies} ({checks_} health checks, as they "
            f"should be); accepted but not logged with their client: "
            f"{unlogged[:5]}",
        )
    )
    return checks


def unprivileged(argv: list) -> None:
    """
    Run as root, start this script again as C{nobody} (every engine and
    node then runs unprivileged), if C{nobody} can run this Python on this
    checkout; else say why, and go on as root.
    """
    nobody = pwd.getpwnam("nobody")
    env = dict(
        os.environ,
        HOME="/tmp",
        PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
    )
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import tests.cluster"],
            cwd="/",
            env=env,
            capture_output=True,
            user=nobody.pw_uid,
            group=nobody.pw_gid,
        )
        why = probe.stderr.decode(errors="replace").strip()[-300:] if probe.returncode else ""
    except OSError as e:
        why = str(e)
    if why:
        log(f"running as root: nobody cannot run {sys.executable} on {ROOT} ({why})")
        return
    log("running as root: starting again as nobody")
    sys.stdout.flush()
    os.execvpe(
        "setpriv",
        [
            "setpriv",
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
            "--",
            sys.executable,
            "-m",
            "tests.cluster",
            "--as-is",
            *argv,
        ],
        env,
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workdir",
        help="keep everything here (default: a temporary folder, removed when every check passed)",
    )
    p.add_argument(
        "--users",
        choices=("auto", "file", "postgresql"),
        default="auto",
        help="where the nodes read users (auto: PostgreSQL when this tree has it)",
    )
    p.add_argument("--time", type=float, default=15.0, help="seconds of load")
    p.add_argument(
        "--as-is",
        action="store_true",
        help="run as the current user, even root (default: root starts again as nobody)",
    )
    options = p.parse_args(argv)
    if os.geteuid() == 0 and not options.as_is:
        if options.workdir:
            os.makedirs(options.workdir, exist_ok=True)
            shutil.chown(options.workdir, "nobody", "nogroup")
        unprivileged(argv)
    database = options.users
    if database == "auto":
        import importlib.util

        have = all(importlib.util.find_spec(m) for m in ("mailauth.pgusers", "tests.pgharness"))
        database = "postgresql" if have else "file"
    directory = os.path.abspath(options.workdir or tempfile.mkdtemp(prefix="mailauth-cluster-"))
    os.makedirs(directory, exist_ok=True)
    log(f"cluster in {directory} (users: {database})")
    cluster = Cluster(directory, database)
    checks: list = []
    started = time.monotonic()
    try:
        cluster.start()
        checks += bruteForce(cluster)
        accepted, results, killedAt = runLoad(cluster, options.time, options.time / 3)
        checks += checkLoad(cluster, accepted, killedAt)
        checks.append(checkMetrics(cluster))
        states = cluster.serverStates()
        down = sorted(
            f"{backend}/{server}" for (backend, server), status in states.items() if status != "UP"
        )
        log(f"haproxy after the kill: not UP: {down}")
        for source, line in results.items():
            log(f"loadgen {source}: {line}")
        cut = {source: json.loads(line).get("failures") for source, line in results.items()}
        log(f"sessions that failed (cut by the kill, or sent to the dead node): {cut}")
    except Exception as e:
        checks.append(Check("the cluster ran", False, f"{type(e).__name__}: {e}"))
    finally:
        cluster.stop()
    failed = [c for c in checks if not c.ok]
    print()
    who = pwd.getpwuid(os.geteuid()).pw_name
    print(
        f"mailauth cluster test: {len(NODES)} nodes x 2 workers behind HAProxy (PROXY v2), "
        f"counters in Redis, users in {database}, run as {who}; "
        f"{time.monotonic() - started:.0f} s"
    )
    for c in checks:
        print(f"  [{'ok' if c.ok else 'FAILED'}] {c.name}: {c.detail}")
    if failed or options.workdir:
        print(f"everything is in {directory}")
    else:
        shutil.rmtree(directory, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
