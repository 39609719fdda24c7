"""
The metric files of workers that ended (L{mailauth.metrics.foldEnded}):
written by real processes through prometheus_client's multiprocess mode,
and read back as the parent's C{/metrics} reads them.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import types

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial import unittest

from mailauth import metrics
from mailauth.metrics import (
    FIRST_SIZE,
    QUEUE_FAMILIES,
    WORKER_FILE_KINDS,
    Metrics,
    foldEnded,
)
from tests.harness import ROOT, LogWatcher

# A worker: counts what it is told, in the folder it is given, and ends.
_WORKER = """
import sys
from prometheus_client import Counter, Histogram
done = Counter("t_done", "done", ["how"])
took = Histogram("t_took", "took", buckets=(1, 10))
for how in sys.argv[1].split(","):
    done.labels(how).inc()
    took.observe(len(how))
print(__import__("os").getpid())
"""


#: The line of a file not folded.
NOT_FOLDED = r"^metrics of ended worker \(pid \d+\) not folded"


class FoldEndedTests(unittest.TestCase):
    def setUp(self) -> None:
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)

    def worker(self, counts: str) -> int:
        """Run a worker that counts C{counts} (comma-separated labels); its pid."""
        out = subprocess.run(
            [sys.executable, "-c", _WORKER, counts],
            env=dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self.folder, PYTHONPATH=ROOT),
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return int(out.stdout)

    def totals(self) -> dict:
        """Every sample, as the parent's scrape sums the folder's files."""
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.folder)
        text = generate_latest(registry).decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def test_totalsKeptFilesGone(self) -> None:
        """
        Each ended worker's counts are added to the files of the ended
        ones and its own files removed: the totals a scrape reads stay
        exactly as they were. A worker that died again and again left two
        files a death, each read by every scrape.
        """
        first = self.worker("ok,ok,bad")
        second = self.worker("ok,slowest-one")
        before = self.totals()
        self.assertEqual(before[("t_done_total", (("how", "ok"),))], 3.0)
        self.assertEqual(before[("t_took_count", ())], 5.0)
        foldEnded(self.folder, first)
        self.assertEqual(self.totals(), before)
        Metrics.prometheus(
            process=False, families=QUEUE_FAMILIES, workerFiles=self.folder
        ).workerEnded(second)
        self.assertEqual(self.totals(), before)
        self.assertEqual(
            sorted(os.listdir(self.folder)), ["counter_ended.db", "histogram_ended.db"]
        )
        third = self.worker("bad")
        foldEnded(self.folder, third)
        after = self.totals()
        self.assertEqual(after[("t_done_total", (("how", "bad"),))], 2.0)
        self.assertEqual(after[("t_took_count", ())], 6.0)

    def test_emptyAndBrokenFiles(self) -> None:
        """
        An empty file (a worker killed as it made it) holds no counts: it
        goes. One that cannot be read is kept, with an error line.
        """
        log = LogWatcher()
        self.addCleanup(log.stop)
        open(os.path.join(self.folder, "counter_7.db"), "wb").close()
        with open(os.path.join(self.folder, "histogram_7.db"), "wb") as f:
            f.write(b"\xff\xff\x00\x00 not a metrics file")
        foldEnded(self.folder, 7)
        self.assertEqual(os.listdir(self.folder), ["histogram_7.db"])
        [line] = log.matching(NOT_FOLDED)
        self.assertIn("metrics of ended worker (pid 7) not folded, its file kept: ", line)
        # The ended workers' own file broken: the worker's is kept too.
        pid = self.worker("ok")
        with open(os.path.join(self.folder, "counter_ended.db"), "wb") as f:
            f.write(b"\xff\xff\x00\x00 not a metrics file")
        foldEnded(self.folder, pid)
        self.assertIn(f"counter_{pid}.db", os.listdir(self.folder))
        self.assertEqual(len(log.matching(NOT_FOLDED)), 2)

    def test_notFoldedKept(self) -> None:
        """
        A worker's file that cannot be folded (here the target is not a
        file; on a full disk, its space cannot be had) is kept as it is,
        with an error line: its counts stay in the totals, once.
        """
        log = LogWatcher()
        self.addCleanup(log.stop)
        pid = self.worker("ok")
        before = self.totals()
        os.mkdir(os.path.join(self.folder, "counter_ended.db"))
        foldEnded(self.folder, pid)
        self.assertIn(f"counter_{pid}.db", os.listdir(self.folder))
        self.assertNotIn(f"histogram_{pid}.db", os.listdir(self.folder))
        os.rmdir(os.path.join(self.folder, "counter_ended.db"))
        self.assertEqual(self.totals(), before)
        [line] = log.matching(NOT_FOLDED)
        self.assertTrue(
            line.startswith(f"metrics of ended worker (pid {pid}) not folded, its file kept: "),
            line,
        )


# A worker as mailauth starts one: its metrics made by Metrics.fromConfig
# (which reserves the files first), one connection and one message counted.
_MAILAUTH_WORKER = """
import os, types
from mailauth.metrics import Metrics
cfg = types.SimpleNamespace(
    metrics=object(),
    listeners=[types.SimpleNamespace(name="submission")],
    auth=types.SimpleNamespace(mechanisms=["PLAIN"]),
)
metrics = Metrics.fromConfig(cfg, "worker")
metrics.connectionAccepted("submission")
metrics.messageAccepted(2, 0.25)
print(os.getpid())
"""


class WorkerFilesTests(unittest.TestCase):
    """A worker's own metric files (L{mailauth.metrics.reserveWorkerFiles})."""

    def setUp(self) -> None:
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)

    def test_reservedBeforeWritten(self) -> None:
        """
        A worker's files are made with every block of prometheus_client's
        first size allocated before it writes them through its memory map
        (which makes them sparse: a block a full disk could not give then
        killed the worker with SIGBUS), and prometheus_client takes them
        as new: the parent's scrape reads what the worker counted.
        """
        out = subprocess.run(
            [sys.executable, "-c", _MAILAUTH_WORKER],
            env=dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self.folder, PYTHONPATH=ROOT),
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        pid = int(out.stdout)
        for kind in WORKER_FILE_KINDS:
            info = os.stat(os.path.join(self.folder, f"{kind}_{pid}.db"))
            self.assertGreaterEqual(info.st_size, FIRST_SIZE, kind)
            self.assertGreaterEqual(info.st_blocks * 512, info.st_size, f"{kind}: sparse")
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.folder)
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for sample in family.samples
        }
        listener = (("listener", "submission"),)
        self.assertEqual(samples[("mailauth_connections_total", listener)], 1.0)
        self.assertEqual(samples[("mailauth_connections_open", listener)], 1.0)
        self.assertEqual(samples[("mailauth_messages_accepted_total", ())], 1.0)
        self.assertEqual(samples[("mailauth_recipients_accepted_total", ())], 2.0)

    def test_noRoom(self) -> None:
        """
        With no room on the disk for its files, a worker serves without
        metrics, says so in an error line, and leaves no file behind; it
        does not die at its first count.
        """
        log = LogWatcher()
        self.addCleanup(log.stop)

        def full(fd: int, offset: int, length: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(metrics.os, "posix_fallocate", full)
        self.patch(os, "environ", dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self.folder))
        cfg = types.SimpleNamespace(
            metrics=object(),
            listeners=[types.SimpleNamespace(name="submission")],
            auth=types.SimpleNamespace(mechanisms=["PLAIN"]),
        )
        worker = metrics.Metrics.fromConfig(cfg, "worker")
        self.assertIsNone(worker.registry)
        worker.connectionAccepted("submission")
        self.assertEqual(os.listdir(self.folder), [])
        [line] = log.matching(r"^metrics off in this worker")
        self.assertEqual(
            line,
            f"metrics off in this worker: cannot reserve its files in {self.folder}: "
            "No space left on device",
        )
