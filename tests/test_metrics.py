"""
Metrics: the API moves the numbers, the real web service serves them over
HTTP, C{[metrics]} is validated, and the Grafana dashboard asks only for
metrics that exist.
"""

from __future__ import annotations

import json
import os
import re
import sys
from unittest import mock

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from mailauth import config as configmod
from mailauth import metrics as metricsmod
from mailauth import replies, tap
from mailauth.forward import QueueService
from mailauth.metrics import Metrics, metricsService
from mailauth.relay import RelayReply
from tests.fakes import FakeRelayConnector, RecordingLocalDelivery, runInline
from tests.harness import (
    BOB,
    BOB_PASSWORD,
    PASSWORD,
    SHA512,
    Daemon,
    EndToEndMixin,
    LogWatcher,
    RawClient,
    plain,
    serverConnectionsClosed,
)
from tests.smtpsink import QueueEvents, SMTPSink, makePKI
from tests.support import QueueTestMixin, relayConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(ROOT, "etc", "grafana", "mailauth-dashboard.json")
METRICS = {"metrics": {"endpoint": "tcp:0:interface=127.0.0.1"}}
MINIMAL = """
[listener:submission]
endpoint = tcp:2587
tls = none
auth = optional

[auth]
users = /etc/mailauth/users

[delivery]
local_domains = example.org
maildir = /var/mail/{domain}/{localpart}/Maildir
"""


def withoutPrometheus():
    """While active, C{import prometheus_client} (and its modules) fails as if not installed."""
    hidden = {
        name: None
        for name in sys.modules
        if name == "prometheus_client" or name.startswith("prometheus_client.")
    }
    hidden["prometheus_client"] = None
    return mock.patch.dict(sys.modules, hidden)


def sample(m: Metrics, name: str, **labels) -> float:
    value = m.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def parse(text: str) -> dict:
    """A scrape as C{{(sample name, ((label, value), ...)): value}}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class MetricsTests(unittest.TestCase):
    """The API, read back through prometheus_client's registry."""

    def test_eachMethodMovesItsMetric(self) -> None:
        """Every method of the API moves the series it names, and only that one."""
        m = Metrics.prometheus()
        m.connectionAccepted("submission")
        m.connectionAccepted("submission")
        m.connectionClosed("submission")
        m.connectionRefused("submissions", "blocked")
        m.authResult("PLAIN", "failure")
        m.authResult("PLAIN", "failure")
        m.authResult("CRAM-MD5", "success")
        m.messageAccepted(3, 0.02)
        m.messageRefused("relay_denied")
        m.relayAttempt("deferred", 4.0)
        m.addressBlocked()
        m.limitHit("messages_per_hour")
        m.counterStoreFallback()
        m.dkimSigned("process")
        m.dkimSigned("process")
        m.dkimSigned("thread")
        expected = [
            ("mailauth_connections_total", {"listener": "submission"}, 2),
            ("mailauth_connections_open", {"listener": "submission"}, 1),
            ("mailauth_connections_total", {"listener": "submissions"}, 1),
            ("mailauth_connections_open", {"listener": "submissions"}, 0),
            (
                "mailauth_connections_refused_total",
                {"listener": "submissions", "reason": "blocked"},
                1,
            ),
            ("mailauth_auth_total", {"mechanism": "PLAIN", "result": "failure"}, 2),
            ("mailauth_auth_total", {"mechanism": "PLAIN", "result": "success"}, 0),
            ("mailauth_auth_total", {"mechanism": "CRAM-MD5", "result": "success"}, 1),
            ("mailauth_messages_accepted_total", {}, 1),
            ("mailauth_recipients_accepted_total", {}, 3),
            ("mailauth_delivery_seconds_count", {}, 1),
            ("mailauth_delivery_seconds_sum", {}, 0.02),
            ("mailauth_delivery_seconds_bucket", {"le": "0.025"}, 1),
            ("mailauth_delivery_seconds_bucket", {"le": "0.01"}, 0),
            ("mailauth_messages_refused_total", {"reason": "relay_denied"}, 1),
            ("mailauth_messages_refused_total", {"reason": "unknown_user"}, 0),
            ("mailauth_relay_attempts_total", {"outcome": "deferred"}, 1),
            ("mailauth_relay_seconds_count", {}, 1),
            ("mailauth_relay_seconds_bucket", {"le": "5.0"}, 1),
            ("mailauth_relay_seconds_bucket", {"le": "2.5"}, 0),
            ("mailauth_throttle_blocks_total", {}, 1),
            ("mailauth_limit_hits_total", {"limit": "messages_per_hour"}, 1),
            ("mailauth_counter_store_fallbacks_total", {}, 1),
            ("mailauth_dkim_signed_total", {"by": "process"}, 2),
            ("mailauth_dkim_signed_total", {"by": "thread"}, 1),
        ]
        for name, labels, value in expected:
            self.assertEqual(sample(m, name, **labels), value, (name, labels))

    def test_seriesStartAtZero(self) -> None:
        """
        The series of the configured listeners and mechanisms, and of every
        fixed reason and outcome, exist at zero before the first event, so
        that rate() counts the first one.
        """
        m = Metrics.prometheus(listeners=["submission"], mechanisms=["LOGIN"])
        for name, labels in [
            ("mailauth_connections_total", {"listener": "submission"}),
            ("mailauth_connections_open", {"listener": "submission"}),
            (
                "mailauth_connections_refused_total",
                {"listener": "submission", "reason": "too_many"},
            ),
            ("mailauth_auth_total", {"mechanism": "LOGIN", "result": "unavailable"}),
            ("mailauth_messages_refused_total", {"reason": "bare_newline"}),
            ("mailauth_relay_attempts_total", {"outcome": "error"}),
            ("mailauth_limit_hits_total", {"limit": "recipients_per_day"}),
            ("mailauth_dkim_signed_total", {"by": "thread"}),
        ]:
            self.assertEqual(m.registry.get_sample_value(name, labels), 0.0, (name, labels))
        self.assertIsNone(
            m.registry.get_sample_value(
                "mailauth_auth_total", {"mechanism": "PLAIN", "result": "success"}
            )
        )

    def test_unknownLabelValuesRaise(self) -> None:
        """
        A reason, result, outcome or limit outside the fixed set is a bug at
        the call site: ValueError, served or not, and nothing is counted.
        """
        for m in (Metrics(), Metrics.prometheus()):
            self.assertRaises(ValueError, m.authResult, "PLAIN", "maybe")
            self.assertRaises(ValueError, m.messageRefused, "bored")
            self.assertRaises(ValueError, m.connectionRefused, "submission", "tired")
            self.assertRaises(ValueError, m.relayAttempt, "lost", 1.0)
            self.assertRaises(ValueError, m.limitHit, "messages_per_week")
            self.assertRaises(ValueError, m.dkimSigned, "elsewhere")
        self.assertEqual(sample(m, "mailauth_auth_total", mechanism="PLAIN", result="maybe"), 0)

    def test_privateRegistry(self) -> None:
        """
        Each Metrics has a registry of its own: two in one process do not
        collide, and prometheus_client's global registry stays untouched.
        """
        a, b = Metrics.prometheus(), Metrics.prometheus()
        a.messageAccepted(1, 0.0)
        self.assertEqual(sample(a, "mailauth_messages_accepted_total"), 1)
        self.assertEqual(sample(b, "mailauth_messages_accepted_total"), 0)
        self.assertIsNone(REGISTRY.get_sample_value("mailauth_messages_accepted_total"))

    def test_queueAskedAtScrape(self) -> None:
        """The queue gauges come from the probe, asked anew at each scrape; none without one."""
        m = Metrics.prometheus()
        self.assertIsNone(m.registry.get_sample_value("mailauth_queue_messages"))
        state = [(0, 0.0)]
        m.watchQueue(lambda: state[0])
        self.assertEqual(sample(m, "mailauth_queue_messages"), 0)
        state[0] = (7, 3600.5)
        self.assertEqual(sample(m, "mailauth_queue_messages"), 7)
        self.assertEqual(sample(m, "mailauth_queue_oldest_age_seconds"), 3600.5)

    def test_disabledNeedsNoPrometheus(self) -> None:
        """
        Without [metrics], Metrics works with prometheus_client not
        installed: every method is callable and nothing is kept.
        """
        cfg = configmod.loadText(MINIMAL)
        with withoutPrometheus():
            self.assertRaises(ImportError, __import__, "prometheus_client")
            m = Metrics.fromConfig(cfg)
            m.connectionAccepted("submission")
            m.connectionClosed("submission")
            m.connectionRefused("submission", "too_many")
            m.authResult("PLAIN", "success")
            m.messageAccepted(1, 0.1)
            m.messageRefused("nul")
            m.relayAttempt("sent", 1.0)
            m.watchQueue(lambda: (0, 0.0))
            m.addressBlocked()
            m.limitHit("messages_per_day")
            m.counterStoreFallback()
        self.assertIsNone(m.registry)
        self.assertRaises(ValueError, metricsService, "tcp:0", m, reactor)

    def test_fromConfig(self) -> None:
        """With [metrics], the series of the configured listeners and mechanisms exist."""
        cfg = configmod.loadText(MINIMAL + "[metrics]\nendpoint = tcp:9587\n")
        m = Metrics.fromConfig(cfg)
        self.assertEqual(sample(m, "mailauth_connections_total", listener="submission"), 0)
        self.assertEqual(
            m.registry.get_sample_value(
                "mailauth_auth_total", {"mechanism": "LOGIN", "result": "failure"}
            ),
            0.0,
        )


class ConfigTests(unittest.TestCase):
    """The [metrics] section."""

    def problems(self, text: str) -> tuple:
        return self.assertRaises(
            configmod.ConfigError, configmod.loadText, text, "test.conf"
        ).problems

    def test_absentByDefault(self) -> None:
        """Without the section there are no metrics."""
        self.assertIsNone(configmod.loadText(MINIMAL).metrics)

    def test_endpoint(self) -> None:
        """The endpoint is read as given."""
        cfg = configmod.loadText(MINIMAL + "[metrics]\nendpoint = tcp:9587:interface=127.0.0.1\n")
        self.assertEqual(cfg.metrics.endpoint, "tcp:9587:interface=127.0.0.1")

    def test_endpointRequired(self) -> None:
        """The section without an endpoint is an error."""
        self.assertEqual(
            self.problems(MINIMAL + "[metrics]\n"),
            ("test.conf: [metrics] endpoint: missing (this key is required)",),
        )

    def test_unknownKey(self) -> None:
        """A typo in the section is named."""
        [problem] = self.problems(MINIMAL + "[metrics]\nendpoint = tcp:9587\npath = /m\n")
        self.assertTrue(problem.startswith("test.conf: [metrics] path: unknown key"), problem)

    def test_badEndpoint(self) -> None:
        """An endpoint type Twisted does not know is named, as for listeners."""
        self.assertEqual(
            self.problems(MINIMAL + "[metrics]\nendpoint = tpc:9587\n"),
            ("test.conf: [metrics] endpoint: 'tpc:9587': unknown endpoint type 'tpc'",),
        )

    def test_tlsEndpoint(self) -> None:
        """An ssl: endpoint is refused with the reason, not with the listeners' advice."""
        [problem] = self.problems(MINIMAL + "[metrics]\nendpoint = ssl:9587\n")
        self.assertTrue(
            problem.startswith(
                "test.conf: [metrics] endpoint: 'ssl:9587': not for "
                "metrics (SIGHUP would not reload"
            ),
            problem,
        )

    def test_withoutPrometheus(self) -> None:
        """[metrics] without prometheus_client installed is one clear line."""
        with withoutPrometheus():
            problems = self.problems(MINIMAL + "[metrics]\nendpoint = tcp:9587\n")
        self.assertEqual(
            problems,
            (
                "test.conf: [metrics]: needs the Python package prometheus_client (Debian: apt "
                "install python3-prometheus-client; pip: pip install 'mailauth[metrics]')",
            ),
        )

    def test_twistdWithoutPrometheus(self) -> None:
        """twistd mailauth exits with that line, not a traceback."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(MINIMAL + "[metrics]\nendpoint = tcp:9587\n")
        with withoutPrometheus():
            e = self.assertRaises(SystemExit, tap.Options().parseOptions, ["--config", path])
        self.assertIn("[metrics]: needs the Python package prometheus_client", str(e.code))

    def test_shippedExample(self) -> None:
        """The commented [metrics] section of etc/mailauth.conf works once uncommented."""
        with open(os.path.join(ROOT, "etc", "mailauth.conf")) as f:
            text = f.read()
        self.assertIn(";[metrics]\n;endpoint = ", text)
        cfg = configmod.loadText(text.replace(";[metrics]\n;endpoint", "[metrics]\nendpoint"))
        self.assertEqual(cfg.metrics.endpoint, "tcp:9587:interface=127.0.0.1")


class Scraper:
    """Fetches pages from a service over real HTTP with twisted.web's Agent."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.agent = Agent(reactor)

    @defer.inlineCallbacks
    def get(self, path: str = "/metrics", method: bytes = b"GET", accept: bytes = None):
        """@return: a Deferred of (status code, content type, body text)."""
        headers = Headers({b"accept": [accept]} if accept else {})
        response = yield self.agent.request(method, (self.base + path).encode(), headers)
        body = yield readBody(response)
        [contentType] = response.headers.getRawHeaders(b"content-type", [b""])
        return response.code, contentType.decode(), body.decode()

    @defer.inlineCallbacks
    def scrape(self):
        code, _, body = yield self.get()
        assert code == 200, (code, body)
        return parse(body)


def listeningPort(service) -> int:
    found = []
    service._waitingForPort.addCallback(lambda port: found.append(port) or port)
    return found[0].getHost().port


class ScrapeTests(unittest.TestCase):
    """The metrics web service, started alone on 127.0.0.1 port 0."""

    def setUp(self) -> None:
        self.metrics = Metrics.prometheus(listeners=["submission"], mechanisms=["PLAIN"])
        self.service = metricsService("tcp:0:interface=127.0.0.1", self.metrics, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.scraper = Scraper(listeningPort(self.service))

    @defer.inlineCallbacks
    def test_countersMove(self) -> None:
        """A scrape after a failed AUTH and a delivery shows both counted."""
        before = yield self.scraper.scrape()
        self.metrics.authResult("PLAIN", "failure")
        self.metrics.messageAccepted(2, 0.003)
        after = yield self.scraper.scrape()
        failures = ("mailauth_auth_total", (("mechanism", "PLAIN"), ("result", "failure")))
        self.assertEqual((before[failures], after[failures]), (0, 1))
        accepted = ("mailauth_messages_accepted_total", ())
        self.assertEqual((before[accepted], after[accepted]), (0, 1))
        recipients = ("mailauth_recipients_accepted_total", ())
        self.assertEqual(after[recipients], 2)
        bucket = ("mailauth_delivery_seconds_bucket", (("le", "0.005"),))
        self.assertEqual((before[bucket], after[bucket]), (0, 1))

    @defer.inlineCallbacks
    def test_queueGaugesAtScrape(self) -> None:
        """The queue probe is asked when Prometheus scrapes."""
        sizes = iter([(4, 120.0), (1, 30.0)])
        self.metrics.watchQueue(lambda: next(sizes))
        first = yield self.scraper.scrape()
        second = yield self.scraper.scrape()
        self.assertEqual(first[("mailauth_queue_messages", ())], 4)
        self.assertEqual(first[("mailauth_queue_oldest_age_seconds", ())], 120)
        self.assertEqual(second[("mailauth_queue_messages", ())], 1)

    @defer.inlineCallbacks
    def test_textFormat(self) -> None:
        """Without an Accept header the page is Prometheus text format 0.0.4."""
        code, contentType, body = yield self.scraper.get()
        self.assertEqual((code, contentType), (200, "text/plain; version=0.0.4; charset=utf-8"))
        self.assertIn("# TYPE mailauth_auth_total counter\n", body)
        self.assertIn("# TYPE mailauth_delivery_seconds histogram\n", body)

    @defer.inlineCallbacks
    def test_openMetrics(self) -> None:
        """A scraper that asks for OpenMetrics gets it, with its content type."""
        code, contentType, body = yield self.scraper.get(
            accept=b"application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )
        self.assertEqual(code, 200)
        self.assertTrue(
            contentType.startswith("application/openmetrics-text; version="), contentType
        )
        self.assertTrue(body.endswith("# EOF\n"), body[-40:])

    @defer.inlineCallbacks
    def test_otherPaths(self) -> None:
        """Only /metrics is served, and only to GET (and HEAD)."""
        code, _, _ = yield self.scraper.get("/")
        self.assertEqual(code, 404)
        code, _, _ = yield self.scraper.get("/metrics/more")
        self.assertEqual(code, 404)
        code, _, _ = yield self.scraper.get(method=b"POST")
        self.assertEqual(code, 405)
        code, _, body = yield self.scraper.get(method=b"HEAD")
        self.assertEqual((code, body), (200, ""))

    @defer.inlineCallbacks
    def test_scrapesNotLogged(self) -> None:
        """A scrape every few seconds writes no access-log line."""
        watcher = LogWatcher()
        self.addCleanup(watcher.stop)
        yield self.scraper.scrape()
        self.assertEqual(watcher.matching("GET /metrics"), [])


class ServiceTests(unittest.TestCase):
    """The metrics server in the real daemon that tap.buildService makes."""

    @defer.inlineCallbacks
    def test_servedWithSection(self) -> None:
        """
        With [metrics], the daemon serves /metrics, with the series of its
        own listeners and mechanisms.
        """
        daemon = Daemon(self.mktemp(), settings=METRICS)
        daemon.start()
        self.addCleanup(daemon.stop)
        scraped = yield Scraper(listeningPort(daemon.service.getServiceNamed("metrics"))).scrape()
        for listener in ("submission", "submissions"):
            self.assertEqual(scraped[("mailauth_connections_open", (("listener", listener),))], 0)
        key = ("mailauth_auth_total", (("mechanism", "CRAM-MD5"), ("result", "success")))
        self.assertEqual(scraped[key], 0)
        self.assertIn(("process_open_fds", ()), scraped)

    def test_runsWithoutPrometheus(self) -> None:
        """Without [metrics] the daemon is built and listens with prometheus_client absent."""
        with withoutPrometheus():
            daemon = Daemon(self.mktemp())
            daemon.start()
        self.addCleanup(daemon.stop)
        self.assertEqual(sorted(daemon.ports), ["submission", "submissions"])

    def test_notServedWithoutSection(self) -> None:
        """Without [metrics] nothing more listens."""
        daemon = Daemon(self.mktemp())
        self.assertRaises(KeyError, daemon.service.getServiceNamed, "metrics")


class DashboardTests(unittest.TestCase):
    """etc/grafana/mailauth-dashboard.json."""

    def setUp(self) -> None:
        with open(DASHBOARD, encoding="utf-8") as f:
            self.dashboard = json.load(f)
        self.panels = [p for p in self.dashboard["panels"] if p["type"] != "row"]

    def test_importable(self) -> None:
        """
        Grafana can import it: the data source is the input DS_PROMETHEUS,
        used by every panel and query, and panel ids are unique.
        """
        [source] = self.dashboard["__inputs"]
        self.assertEqual(
            (source["name"], source["type"], source["pluginId"]),
            ("DS_PROMETHEUS", "datasource", "prometheus"),
        )
        self.assertIsNone(self.dashboard["id"])
        wanted = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        for panel in self.panels:
            self.assertEqual(panel["datasource"], wanted, panel["title"])
            self.assertTrue(panel["targets"], panel["title"])
            for target in panel["targets"]:
                self.assertEqual(target["datasource"], wanted, panel["title"])
        ids = [p["id"] for p in self.dashboard["panels"]]
        self.assertEqual(len(ids), len(set(ids)))

    def test_metricsExist(self) -> None:
        """
        Every metric name the dashboard queries is one a fully used
        Metrics serves; and every mailauth metric has a panel.
        """
        m = Metrics.prometheus(listeners=["submission"], mechanisms=["PLAIN"])
        m.watchQueue(lambda: (1, 1.0))
        served = {
            name
            for name, _ in parse(
                __import__("prometheus_client").generate_latest(m.registry).decode()
            )
        }
        queried = set()
        for panel in self.panels:
            for target in panel["targets"]:
                queried |= set(re.findall(r"\b(?:mailauth|process)_[a-z_]+\b", target["expr"]))
        self.assertTrue(queried)
        self.assertEqual(queried - served, set())
        defined = {d.name for d in metricsmod._DEFINITIONS.values()}
        defined |= {metricsmod.QUEUE_SIZE, metricsmod.QUEUE_OLDEST_AGE}
        unshown = {n for n in defined if not any(q == n or q.startswith(n + "_") for q in queried)}
        self.assertEqual(unshown, set())


def delta(before: dict, after: dict, name: str, **labels) -> float:
    """How much the sample C{name} with C{labels} moved between two scrapes."""
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


class RefusalReplyTests(unittest.TestCase):
    """The replies that refuse a transaction carry the reason they are counted under."""

    def test_everyReasonHasItsReply(self) -> None:
        """
        Each refusal reason of the metrics is the C{metric} of a named reply, every
        C{metric} is a reason, and it survives C{format} and C{error}.
        """
        named = [v for v in vars(replies).values() if isinstance(v, replies.Reply)]
        used = {reply.metric for reply in named if reply.metric is not None}
        self.assertEqual(used - set(metricsmod.REFUSAL_REASONS), set())
        self.assertEqual(set(metricsmod.REFUSAL_REASONS) - used, set())
        reply = replies.RELAY_DENIED.format(address="x@remote.example")
        self.assertEqual(reply.metric, "relay_denied")
        self.assertEqual(replies.UNKNOWN_RECIPIENT.error(address="x@y").metric, "unknown_user")
        self.assertIsNone(replies.AUTH_FAILED.error().metric)

    def test_documented(self) -> None:
        """docs/replies.rst's Counted refusals table names every counted reply and its reason."""
        with open(os.path.join(ROOT, "docs", "replies.rst"), encoding="utf-8") as f:
            table = f.read().split("Counted refusals\n")[1]
        documented = dict(re.findall(r"^``(\w+)``\s+``(\w+)``$", table, re.MULTILINE))
        counted = {
            name: value.metric
            for name, value in vars(replies).items()
            if isinstance(value, replies.Reply) and value.metric is not None
        }
        self.assertEqual(documented, counted)


class RelayMetricsTests(QueueTestMixin, unittest.TestCase):
    """The forwarder's relay attempts and queue gauges, on a clock with a fake relay."""

    def setUp(self):
        super().setUp()
        self.relay = FakeRelayConnector(self.reactor)
        self.metrics = Metrics.prometheus(process=False)
        self.service = QueueService(
            self.queue,
            relayConfig(),
            self.reactor,
            RecordingLocalDelivery(["example.org"]),
            runBlocking=runInline,
            connector=self.relay,
            metrics=self.metrics,
        )
        self.metrics.watchQueue(self.service.probe)

    def start(self):
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def submit(self, msgid, **kwargs):
        self.enqueue(msgid, **kwargs)
        self.service.wake()
        self.reactor.advance(0)

    def test_outcomes(self) -> None:
        """
        Each message handed to the relay is counted once by its outcome:
        sent, deferred (a 4xx), bounced (a 5xx), error (the session failed).
        """
        self.relay.replies = {
            "later@remote.example": [RelayReply(451, ("451 4.3.0 later",))],
            "gone@remote.example": [RelayReply(550, ("550 5.1.1 unknown",))],
        }
        self.start()
        self.submit("m1")
        self.submit("m2", recipients=("later@remote.example",))
        self.submit("m3", recipients=("gone@remote.example",))
        self.relay.down = True
        self.submit("m4")
        counts = {
            outcome: sample(self.metrics, "mailauth_relay_attempts_total", outcome=outcome)
            for outcome in metricsmod.RELAY_OUTCOMES
        }
        self.assertEqual(counts, {"sent": 1, "deferred": 1, "bounced": 1, "error": 1})
        self.assertEqual(sample(self.metrics, "mailauth_relay_seconds_count"), 4)

    def test_secondsIncludeConnecting(self) -> None:
        """An attempt is timed from before the connection to the relay's last reply."""
        self.relay.paused = True
        self.start()
        self.submit("m1")
        self.reactor.advance(3)
        [(waiter, session)] = self.relay.waiting
        waiter.callback(session)
        self.assertEqual(sample(self.metrics, "mailauth_relay_seconds_sum"), 3)
        self.assertEqual(sample(self.metrics, "mailauth_relay_seconds_bucket", le="2.5"), 0)
        self.assertEqual(sample(self.metrics, "mailauth_relay_seconds_bucket", le="5.0"), 1)

    def test_queueGauges(self) -> None:
        """
        The queue gauges come from the forwarder's index, without reading
        the disk: how many messages it holds, and the age of the oldest.
        """
        self.relay.down = True
        self.enqueue("m1")
        self.reactor.advance(50)
        self.enqueue("m2")
        self.start()
        self.reactor.advance(100)
        self.assertEqual(self.service.probe(), (2, 150.0))
        self.assertEqual(sample(self.metrics, "mailauth_queue_messages"), 2)
        self.assertEqual(sample(self.metrics, "mailauth_queue_oldest_age_seconds"), 150)
        self.relay.down = False
        self.reactor.advance(3600)
        self.assertEqual(self.service.probe(), (0, 0.0))
        self.assertEqual(sample(self.metrics, "mailauth_queue_messages"), 0)


def submitWithRefusal(port: int) -> tuple:
    """
    (Blocking.) On the implicit TLS listener: a failed AUTH, then a login
    whose transaction has one recipient refused (unknown) and one
    accepted, and a message that is delivered.

    @return: the reply codes.
    """
    failed = RawClient(port, tls=True)
    codes = [failed.reply()[0], failed.ehlo()[0], failed.command(plain(BOB, b"wrong"))[0]]
    failed.command(b"QUIT")
    failed.close()
    client = RawClient(port, tls=True)
    codes += [client.reply()[0], client.ehlo()[0], client.command(plain(BOB, BOB_PASSWORD))[0]]
    for line in (
        b"MAIL FROM:<bob@example.test>",
        b"RCPT TO:<nobody@example.test>",
        b"RCPT TO:<alice.plain@example.test>",
        b"DATA",
    ):
        codes.append(client.command(line)[0])
    codes.append(client.command(b"Subject: hello\r\n\r\nhello\r\n.")[0])
    codes.append(client.command(b"QUIT")[0])
    client.close()
    return tuple(codes)


class DaemonScrapeTests(unittest.TestCase):
    """
    The real daemon with [metrics]: /metrics scraped over HTTP before and
    after what the metrics count, from the sessions to the relay.
    """

    timeout = 30

    def startDaemon(self, settings=None, extra: str = "") -> Daemon:
        daemon = Daemon(self.mktemp(), settings=dict(METRICS, **(settings or {})), extra=extra)
        daemon.start()
        self.addCleanup(daemon.stop)
        self.scraper = Scraper(listeningPort(daemon.service.getServiceNamed("metrics")))
        return daemon

    @defer.inlineCallbacks
    def test_sessionCountersMove(self) -> None:
        """
        A failed AUTH, a refused RCPT and a delivery move the AUTH, refusal,
        message, recipient, delivery time and connection counters, and the
        open connections gauge comes back to zero once the clients leave.
        """
        daemon = self.startDaemon()
        before = yield self.scraper.scrape()
        codes = yield threads.deferToThread(submitWithRefusal, daemon.ports["submissions"])
        self.assertEqual(codes, (220, 250, 535, 220, 250, 235, 250, 550, 250, 354, 250, 221))
        yield serverConnectionsClosed()
        after = yield self.scraper.scrape()
        moved = {
            "failed PLAIN": delta(
                before, after, "mailauth_auth_total", mechanism="PLAIN", result="failure"
            ),
            "PLAIN logins": delta(
                before, after, "mailauth_auth_total", mechanism="PLAIN", result="success"
            ),
            "unknown users": delta(
                before, after, "mailauth_messages_refused_total", reason="unknown_user"
            ),
            "relay denied": delta(
                before, after, "mailauth_messages_refused_total", reason="relay_denied"
            ),
            "messages": delta(before, after, "mailauth_messages_accepted_total"),
            "recipients": delta(before, after, "mailauth_recipients_accepted_total"),
            "stored": delta(before, after, "mailauth_delivery_seconds_count"),
            "connections": delta(
                before, after, "mailauth_connections_total", listener="submissions"
            ),
            "open": after[("mailauth_connections_open", (("listener", "submissions"),))],
        }
        self.assertEqual(
            moved,
            {
                "failed PLAIN": 1,
                "PLAIN logins": 1,
                "unknown users": 1,
                "relay denied": 0,
                "messages": 1,
                "recipients": 1,
                "stored": 1,
                "connections": 2,
                "open": 0,
            },
        )

    @defer.inlineCallbacks
    def test_headerFromCounted(self) -> None:
        """
        With C{header_from_match}, a From: the login may not use is counted
        once under C{header_from}, as the session sends its 550.
        """
        daemon = self.startDaemon({"delivery": {"header_from_match": "yes"}})
        before = yield self.scraper.scrape()

        def spoof() -> list:
            client = RawClient(daemon.ports["submissions"], tls=True)
            codes = [
                client.reply()[0],
                client.ehlo()[0],
                client.command(plain(BOB, BOB_PASSWORD))[0],
            ]
            for line in (
                b"MAIL FROM:<bob@example.test>",
                b"RCPT TO:<alice.plain@example.test>",
                b"DATA",
                b"From: alice.plain@example.test\r\n\r\nhello\r\n.",
            ):
                codes.append(client.command(line)[0])
            client.command(b"QUIT")
            client.close()
            return codes

        codes = yield threads.deferToThread(spoof)
        self.assertEqual(codes, [220, 250, 235, 250, 250, 354, 550])
        after = yield self.scraper.scrape()
        self.assertEqual(
            delta(before, after, "mailauth_messages_refused_total", reason="header_from"), 1
        )
        self.assertEqual(delta(before, after, "mailauth_messages_accepted_total"), 0)

    @defer.inlineCallbacks
    def test_openGauge(self) -> None:
        """Sessions open now are counted while they last."""
        daemon = self.startDaemon()
        client = yield threads.deferToThread(RawClient, daemon.ports["submission"])
        self.addCleanup(client.close)
        yield threads.deferToThread(client.reply)
        scraped = yield self.scraper.scrape()
        self.assertEqual(scraped[("mailauth_connections_open", (("listener", "submission"),))], 1)

    @defer.inlineCallbacks
    def test_refusedConnectionsCounted(self) -> None:
        """A connection refused before the greeting is counted by listener and reason."""
        daemon = self.startDaemon({"server": {"max_connections_per_address": "1"}})
        port = daemon.ports["submission"]
        first = yield threads.deferToThread(RawClient, port)
        self.addCleanup(first.close)
        self.assertEqual((yield threads.deferToThread(first.reply))[0], 220)
        second = yield threads.deferToThread(RawClient, port)
        self.addCleanup(second.close)
        self.assertEqual((yield threads.deferToThread(second.reply))[0], 421)
        scraped = yield self.scraper.scrape()
        refused = (
            "mailauth_connections_refused_total",
            (("listener", "submission"), ("reason", "too_many_from_address")),
        )
        self.assertEqual(scraped[refused], 1)
        self.assertEqual(scraped[("mailauth_connections_total", (("listener", "submission"),))], 2)

    @defer.inlineCallbacks
    def test_relayAgainstSink(self) -> None:
        """
        With [relay] to a real SMTP server: a message relayed is counted as
        sent and timed; one the relay defers is counted as deferred and
        stays in the queue gauges.
        """
        events = QueueEvents()
        events.start(self)
        pki = makePKI()
        sink = SMTPSink(reactor, pki)
        yield sink.start()
        self.addCleanup(sink.stop)
        sink.rcptReplies["later@remote.example"] = [b"451 4.3.0 try again later"]
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        with open(os.path.join(base, "ca.pem"), "wb") as f:
            f.write(pki.caPEM)
        with open(os.path.join(base, "relay-password"), "w") as f:
            f.write("relay secret\n")
        daemon = self.startDaemon(
            extra=(
                f"\n[relay]\nhost = 127.0.0.1\nport = {sink.port}\ntls = starttls\n"
                f"username = relay-user\npassword_file = {base}/relay-password\n"
                f"ca_file = {base}/ca.pem\n"
            )
        )
        before = yield self.scraper.scrape()
        self.assertEqual(before[("mailauth_queue_messages", ())], 0)
        submitter = EndToEndMixin()
        submitter.daemon = daemon
        submitter.inThread = threads.deferToThread
        yield submitter.submit(
            "submission", "PLAIN", SHA512, PASSWORD, recipients=("bob@remote.example",)
        )
        yield events.wait("removed")
        yield submitter.submit(
            "submission", "PLAIN", SHA512, PASSWORD, recipients=("later@remote.example",)
        )
        yield events.wait("deferred")
        after = yield self.scraper.scrape()
        self.assertEqual(
            [
                delta(before, after, "mailauth_relay_attempts_total", outcome=outcome)
                for outcome in ("sent", "deferred", "bounced", "error")
            ],
            [1, 1, 0, 0],
        )
        self.assertEqual(delta(before, after, "mailauth_relay_seconds_count"), 2)
        self.assertEqual(after[("mailauth_queue_messages", ())], 1)
        self.assertGreaterEqual(after[("mailauth_queue_oldest_age_seconds", ())], 0)
