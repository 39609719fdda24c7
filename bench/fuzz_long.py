#!/usr/bin/env python3
"""
The fuzz properties of tests/test_fuzz.py with many more examples, outside
CI (where they run 200 derandomized examples each).

    .venv/bin/python bench/fuzz_long.py                      # all, 20000 examples each
    .venv/bin/python bench/fuzz_long.py -n 100000 required   # one property, longer
    .venv/bin/python bench/fuzz_long.py --seed 1234 sockets  # replay a run

Properties: required, transactions, optional, segmentation (the session on
a StringTransport), sockets (the real service on 127.0.0.1: random bytes
and broken TLS). A failure prints hypothesis's smallest example and the
seed, and the script exits 1.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hypothesis import HealthCheck, given, seed, settings, strategies  # noqa: E402

from tests import test_fuzz as fuzz  # noqa: E402

SESSION_PROPERTIES = {
    "required": ((fuzz.scripts,), lambda s: fuzz.checkScript(s, "required", "implicit")),
    "transactions": (
        (fuzz.transactions,),
        lambda s: fuzz.checkScript(s, "required", "implicit", maxErrors=40),
    ),
    "optional": ((fuzz.scripts,), lambda s: fuzz.checkScript(s, "optional", "starttls")),
    "segmentation": (fuzz.segmentations, fuzz.checkSplitInvariance),
}
PROPERTIES = [*SESSION_PROPERTIES, "sockets"]


def run(name: str, strategyList: tuple, check, examples: int, runSeed: int) -> bool:
    @seed(runSeed)
    @settings(
        max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(strategies.tuples(*strategyList))
    def prop(args):
        check(*args)

    start = time.monotonic()
    try:
        prop()
    except Exception as e:
        text = repr(e)
        if len(text) > 4000:
            text = text[:2000] + " ... " + text[-2000:]
        print(f"{name}: FAILED (seed {runSeed}): {text}", flush=True)
        return False
    print(f"{name}: {examples} examples passed in {time.monotonic() - start:.0f}s", flush=True)
    return True


def runSockets(examples: int, runSeed: int) -> bool:
    """The real-socket property, with the service on the reactor and the examples in a thread."""
    from twisted.internet import defer, reactor, threads

    from tests.test_fuzz import ErrorLog, serverConnectionsClosed, socketExample, sockets
    from tests.test_security import Daemon

    outcome = []

    @defer.inlineCallbacks
    def main():
        daemon = Daemon(
            os.path.join(tempfile.mkdtemp(prefix="fuzz-"), "daemon"),
            {"server": {"max_errors": "1000", "max_connections_per_address": "100"}},
        )
        daemon.start()
        errors = ErrorLog()
        try:
            ok = yield threads.deferToThread(
                run,
                "sockets",
                sockets,
                lambda *args: socketExample(daemon.ports, *args),
                examples,
                runSeed,
            )
            yield serverConnectionsClosed()
        finally:
            failures = [e for e in errors.stop() if "log_failure" in e]
            yield daemon.stop()
        for event in failures:
            print(f"sockets: logged an error: {event['log_failure'].getTraceback()}")
        outcome.append(ok and not failures)
        reactor.stop()

    reactor.callWhenRunning(main)
    reactor.run()
    return bool(outcome and outcome[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--examples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument(
        "properties",
        nargs="*",
        metavar="PROPERTY",
        help=f"any of {', '.join(PROPERTIES)} (default: all)",
    )
    args = parser.parse_args()
    unknown = set(args.properties) - set(PROPERTIES)
    if unknown:
        parser.error(f"unknown property {', '.join(sorted(unknown))}")
    runSeed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"seed {runSeed}", flush=True)
    ok = True
    for name in args.properties or PROPERTIES:
        if name == "sockets":
            # Each socket example costs a TLS handshake: a tenth as many.
            ok &= runSockets(max(1, args.examples // 10), runSeed)
        else:
            strategies, check = SESSION_PROPERTIES[name]
            ok &= run(name, strategies, check, args.examples, runSeed)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
