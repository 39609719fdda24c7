"""
Instructions a message costs mailauth (one process), counted by valgrind's
callgrind: a number that does not move with the machine's load.

On a shared machine msgs/s and CPU seconds move 10-20% from one run to the
next (bench/run's tables say so); instruction counts move by well under 1%
between runs of the same code, so a change of 1-2% of the work per message
can be seen. They count user space only: what the kernel does (fsync,
sockets, waking threads) is not in them, and bench/run is still what tells
throughput.

The server runs under callgrind (50 times slower) with the bench's
configuration, one process, counters in memory (C{--redis}: in a Redis of
its own); the load generator logs in and sends C{--messages} 10 KB messages
at concurrency 1, ten per connection, after a warm-up that is not counted;
lock step keeps the event loop's turns, and so the count, the same from run
to run. C{--tree} runs a checkout other than this one (its C{mailauth} is
imported first), once per C{--tree} given, in turn, C{--repeat} times: the
way to compare two versions.

Needs valgrind (Debian: valgrind) and the bench's users and certificate
(made on first use, as bench/run makes them).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import suite  # noqa: E402


def started(server: suite.Server, process: subprocess.Popen, cap: float) -> None:
    """Wait (up to C{cap} seconds: callgrind starts Python slowly) for the banner."""
    deadline = time.monotonic() + cap
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"mailauth exited with {process.returncode}; see {server.dir}")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
                if s.recv(100).startswith(b"220"):
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"mailauth did not answer within {cap:g} s; see {server.dir}")


def measure(tree: str, work: str, messages: int, tls: bool, redisURL: str) -> tuple:
    """Instructions per message of the checkout at C{tree}, and the messages counted."""
    server = suite.Server(
        "mailauth", work, f"instructions{time.time_ns()}", tls=tls, redis=redisURL
    )
    os.makedirs(server.dir)
    server.port = suite.freePort()
    out = os.path.join(server.dir, "callgrind.out")
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", suite.PYTHON]
    env = dict(os.environ, PYTHONPATH=tree)
    with open(os.path.join(server.dir, "server.log"), "ab") as log:
        process = subprocess.Popen(
            argv + server.argv(),
            cwd=tree,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        started(server, process, 600)
        timeout = ("--timeout", "300")
        suite.loadgen(server, *suite.sendArgs(2, 5, 10 * suite.KB, 600, total=20), *timeout)
        control = {"check": True, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        subprocess.run(["callgrind_control", "--zero", str(process.pid)], **control)
        result = suite.loadgen(
            server, *suite.sendArgs(1, 10, 10 * suite.KB, 3600, total=messages), *timeout, cap=3600
        )
        subprocess.run(["callgrind_control", "--dump=load", str(process.pid)], **control)
    finally:
        process.terminate()
        process.wait(120)
    if result["failures"] or not result["messages"]:
        raise SystemExit(f"the load failed: {result}; see {server.dir}")
    for path in glob.glob(out + "*"):
        with open(path, errors="replace") as f:
            text = f.read()
        summary = re.search(r"^summary: (\d+)", text, re.M)
        if summary and re.search(r"^desc: Trigger: dump load$", text, re.M):
            shutil.rmtree(server.dir, ignore_errors=True)
            return int(summary.group(1)) / result["messages"], result["messages"]
    raise SystemExit(f"no callgrind dump of the load in {server.dir}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--messages", type=int, default=200, help="messages counted (default 200)")
    p.add_argument(
        "--tree",
        action="append",
        help="a mailauth checkout to measure (repeat to compare; default: this one)",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs of each tree, in turn")
    p.add_argument("--no-tls", action="store_true", help="no STARTTLS, AUTH in the clear")
    p.add_argument("--redis", action="store_true", help="counters in a Redis of its own")
    p.add_argument("--workdir", default=os.path.join(suite.ROOT, "var", "bench"))
    options = p.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    trees = [os.path.abspath(t) for t in options.tree or [suite.ROOT]]
    work = os.path.abspath(options.workdir)
    if not os.path.exists(os.path.join(work, "users")):
        suite.prepare(work)
    redis = suite.startRedis(work) if options.redis else None
    counts: dict = {tree: [] for tree in trees}
    try:
        for _ in range(options.repeat):
            for tree in trees:
                perMessage, n = measure(
                    tree, work, options.messages, not options.no_tls, redis.url if redis else ""
                )
                counts[tree].append(perMessage)
                print(f"{tree}: {perMessage:,.0f} instructions a message ({n} messages)")
    finally:
        if redis is not None:
            redis.cleanup()
    if len(trees) > 1 or options.repeat > 1:
        first = min(counts[trees[0]])
        for tree in trees:
            best = min(counts[tree])
            print(f"{tree}: least {best:,.0f} ({best / first - 1:+.1%} against {trees[0]})")


if __name__ == "__main__":
    main()
