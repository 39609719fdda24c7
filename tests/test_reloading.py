"""
SIGHUP and the configuration file: what the running daemon says when the
file was edited, or broken, since it started, and that it keeps serving.
"""

from __future__ import annotations

import os
import signal

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.harness import Daemon, LogWatcher, TwistdProcess, smtpClient, writeDaemonDirectory


class ConfigurationOnSIGHUPTests(unittest.TestCase):
    """The real daemon in this process, sent SIGHUP after its file was edited."""

    def setUp(self) -> None:
        self.daemon = Daemon(self.mktemp())
        self.addCleanup(self.daemon.stop)
        self.daemon.start()
        self.log = LogWatcher()
        self.addCleanup(self.log.stop)
        with open(self.daemon.configPath, encoding="utf-8") as f:
            self.original = f.read()

    def edit(self, text: str) -> None:
        with open(self.daemon.configPath, "w", encoding="utf-8") as f:
            f.write(text)

    @defer.inlineCallbacks
    def sighup(self):
        """SIGHUP to this process; fires once the daemon has reloaded."""
        watcher = LogWatcher()
        d = watcher.waitFor("SIGHUP: reloading")
        os.kill(os.getpid(), signal.SIGHUP)
        try:
            yield d
        finally:
            watcher.stop()
        # The whole reload runs in one reactor turn, after the first line.
        yield threads.deferToThread(lambda: None)

    def greeting(self) -> defer.Deferred:
        def run() -> int:
            client = smtpClient(self.daemon.ports["submission"])
            try:
                return client.noop()[0]
            finally:
                client.quit()

        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def test_unchanged(self):
        """An unchanged file (a SIGHUP for new certificates) gets no word about it."""
        yield self.sighup()
        self.assertEqual(self.log.matching("SIGHUP: .*(changed|wrong|cannot read)"), [])

    @defer.inlineCallbacks
    def test_changedWaitsForARestart(self):
        """
        An edited file is named, with the fact that its change waits for a
        restart: SIGHUP reloads files and keys, never the configuration.
        """
        self.edit(self.original.replace("max_message_size = 1M", "max_message_size = 2M"))
        yield self.sighup()
        [line] = self.log.matching("has changed since mailauth started")
        self.assertIn(self.daemon.configPath, line)
        self.assertIn("take effect at the next restart", line)
        self.assertEqual(self.daemon.config.server.max_message_size, 1024 * 1024)

    @defer.inlineCallbacks
    def test_brokenKeepsServing(self):
        """
        A file broken since the start is reported, one line per problem
        naming its section and key, and the daemon goes on serving as it
        started.
        """
        self.edit(self.original.replace("auth = required", "auth = sometimes", 1))
        yield self.sighup()
        [line] = self.log.matching("the configuration file is wrong")
        self.assertIn("[listener:submission] auth", line)
        self.assertIn("still serving", line)
        self.assertEqual(self.log.matching("has changed since"), [])
        code = yield self.greeting()
        self.assertEqual(code, 250)

    @defer.inlineCallbacks
    def test_gone(self):
        """A file that cannot be read any more is said to be so; the daemon serves on."""
        os.remove(self.daemon.configPath)
        yield self.sighup()
        [line] = self.log.matching("SIGHUP: cannot read")
        self.assertIn("No such file or directory", line)
        code = yield self.greeting()
        self.assertEqual(code, 250)


def _sendsSIGHUP(module: str, owner: str, name: str) -> str:
    """A prelude for L{TwistdProcess}: C{module.owner.name} sends SIGHUP to the daemon first."""
    target = f"m.{owner}" if owner else "m"
    return (
        f"import os, signal, {module} as m; _f = {target}.{name}; "
        f"{target}.{name} = lambda *a, **k: (os.kill(os.getpid(), signal.SIGHUP), _f(*a, **k))[1]; "
    )


class SIGHUPOutsideServiceTests(unittest.TestCase):
    """
    twistd mailauth, sent SIGHUP before its handler is set and after it is
    taken away: SIGHUP's default action would kill it there.
    """

    def setUp(self) -> None:
        # Each daemon starts with SIGHUP's default action, as systemd starts
        # it: one spawned from this process would inherit SIG_IGN once an
        # earlier test's daemon, stopping here, left SIGHUP ignored
        # (mailauth.reloading), and these tests would then prove nothing.
        previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)

    def twistd(self, prelude: str) -> TwistdProcess:
        directory = os.path.abspath(self.mktemp())
        twistd = TwistdProcess(
            writeDaemonDirectory(directory),
            os.path.join(directory, "mailauth.log"),
            prelude=prelude,
        )
        self.addCleanup(twistd.stop)
        return twistd

    def test_whileStarting(self):
        """A SIGHUP while the daemon builds itself does not stop it from starting."""
        twistd = self.twistd(_sendsSIGHUP("mailauth.tap", "", "buildService"))
        twistd.start()
        twistd.signal(signal.SIGTERM)
        self.assertEqual(twistd.wait(), -signal.SIGTERM)

    def test_whileStopping(self):
        """
        A SIGHUP while the daemon stops (its thread pools stop last) lets it
        stop as it would: twistd's last line, then the end by SIGTERM.
        """
        twistd = self.twistd(_sendsSIGHUP("mailauth.threads", "ThreadPoolService", "stopService"))
        twistd.start()
        twistd.signal(signal.SIGTERM)
        self.assertEqual(twistd.wait(), -signal.SIGTERM)
        self.assertIn("Server Shut Down.", twistd.log())
