"""
The benchmark scripts start: a script runs with C{bench/} first on
C{sys.path}, so a file there named as a module of the standard library or of
a dependency hides it from every script of the folder (C{bench/queue.py} once
broke C{bench/run} by hiding the standard library's C{queue}).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")

# Scripts that import the bench extra (aiosmtpd), which the test
# environments do not install: their names are still checked.
NEEDS_BENCH_EXTRA = {"peer"}


def scripts() -> list[str]:
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(BENCH, "*.py")))


class BenchScriptTests(unittest.TestCase):
    def test_foundScripts(self) -> None:
        """The checks below have scripts to check."""
        self.assertIn("suite", scripts())
        self.assertIn("loadgen", scripts())

    def test_noHiddenModule(self) -> None:
        """No script has the name of a module the scripts could import."""
        stdlib = getattr(sys, "stdlib_module_names", frozenset())
        for name in scripts():
            self.assertNotIn(name, stdlib, f"bench/{name}.py hides the standard library's {name}")
            spec = importlib.util.find_spec(name)
            self.assertIsNone(
                spec, f"bench/{name}.py hides {name} ({spec and spec.origin}) from the scripts"
            )

    def test_helpRuns(self) -> None:
        """Each script imports what it needs and prints its usage."""
        for name in scripts():
            if name in NEEDS_BENCH_EXTRA:
                continue
            result = subprocess.run(
                [sys.executable, os.path.join(BENCH, f"{name}.py"), "--help"],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
            )
            self.assertEqual(result.returncode, 0, f"bench/{name}.py --help: {result.stderr}")
            self.assertIn("usage:", result.stdout, name)
