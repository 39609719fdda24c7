"""The configuration loader: every problem named by file, section and key."""

from __future__ import annotations

import ipaddress
import os
import sys
from unittest import mock

from twisted.trial import unittest

from mailauth import config
from mailauth.config import ConfigError, loadText, parseDuration, parseSize

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


class LoadTests(unittest.TestCase):
    def problems(self, text: str) -> tuple:
        e = self.assertRaises(ConfigError, loadText, text, "test.conf")
        return e.problems

    def test_minimal(self) -> None:
        """A minimal file loads, with the documented defaults."""
        cfg = loadText(MINIMAL, "test.conf")
        self.assertEqual(cfg.server.max_message_size, 35 * 1024 * 1024)
        self.assertEqual(cfg.server.timeout, 300.0)
        self.assertEqual(cfg.auth.mechanisms, ("PLAIN", "LOGIN"))
        self.assertTrue(cfg.auth.plaintext_requires_tls)
        self.assertEqual(cfg.delivery.local_domains, frozenset({"example.org"}))
        self.assertIsNone(cfg.relay)
        self.assertIsNone(cfg.tls)
        [listener] = cfg.listeners
        self.assertEqual(
            (listener.name, listener.endpoint, listener.tls, listener.auth),
            ("submission", "tcp:2587", "none", "optional"),
        )

    def test_shippedExampleLoads(self) -> None:
        """etc/mailauth.conf, with every key, is a valid configuration."""
        path = os.path.join(os.path.dirname(__file__), "..", "etc", "mailauth.conf")
        cfg = config.load(path)
        self.assertEqual(len(cfg.listeners), 2)
        self.assertEqual(cfg.server.hostname, "mail.example.org")

    def test_unknownKey(self) -> None:
        """An unknown key (a typo) is an error naming file, section and key."""
        problems = self.problems(MINIMAL + "\n[server]\nmax_mesage_size = 10M\n")
        self.assertEqual(len(problems), 1)
        self.assertTrue(problems[0].startswith("test.conf: [server] max_mesage_size: unknown key"))

    def test_unknownSection(self) -> None:
        """An unknown section is an error."""
        [problem] = self.problems(MINIMAL + "\n[relai]\nhost = x\n")
        self.assertTrue(problem.startswith("test.conf: [relai]: unknown section"), problem)

    def test_everyProblemReported(self) -> None:
        """All problems are reported together, not only the first."""
        text = (
            MINIMAL.replace("tls = none", "tls = maybe").replace(
                "auth = optional", "auth = sometimes"
            )
            + "\n[server]\nmax_recipients = -1\ntimeout = soon\n"
        )
        problems = self.problems(text)
        self.assertEqual(len(problems), 4, problems)
        joined = "\n".join(problems)
        for where in (
            "[listener:submission] tls",
            "[listener:submission] auth",
            "[server] max_recipients",
            "[server] timeout",
        ):
            self.assertIn(where, joined)

    def test_missingRequired(self) -> None:
        """Missing required keys and sections are named."""
        problems = self.problems("[server]\nhostname = x\n")
        joined = "\n".join(problems)
        self.assertIn("[auth]: missing section", joined)
        self.assertIn("[delivery]: missing section", joined)
        self.assertIn("no [listener:NAME] section", joined)

    def test_tlsNeeded(self) -> None:
        """A TLS listener without a [tls] section is an error."""
        [problem] = self.problems(MINIMAL.replace("tls = none", "tls = starttls"))
        self.assertIn("[tls]: missing section", problem)

    def test_unknownMechanism(self) -> None:
        """An unknown SASL mechanism is refused."""
        [problem] = self.problems(MINIMAL.replace("[auth]", "[auth]\nmechanisms = PLAIN GSSAPI"))
        self.assertIn("[auth] mechanisms: unknown mechanism GSSAPI", problem)

    def test_sslEndpointRefused(self) -> None:
        """ssl: endpoints are refused: tls = implicit is the way (TLS 1.2 minimum, reload)."""
        [problem] = self.problems(MINIMAL.replace("tcp:2587", "ssl:465"))
        self.assertIn("use a tcp: endpoint with tls = implicit", problem)

    def test_haproxyRefused(self) -> None:
        """
        haproxy: endpoints are refused: Twisted's wrapper starts the session
        before the PROXY header names the client (D32), so limits would
        count the proxy; the message points at proxy_protocol instead.
        """
        [problem] = self.problems(MINIMAL.replace("tcp:2587", "haproxy:tcp:2587"))
        self.assertIn(
            "haproxy: endpoints are not supported; use a tcp: endpoint with "
            "proxy_protocol = v1 | v2 | any and trusted_proxies",
            problem,
        )

    def test_proxyProtocolOffByDefault(self) -> None:
        """Without proxy_protocol a listener reads no PROXY header and trusts no proxy."""
        [listener] = loadText(MINIMAL, "test.conf").listeners
        self.assertEqual((listener.proxy_protocol, listener.trusted_proxies), ("no", ()))

    def test_proxyProtocol(self) -> None:
        """
        proxy_protocol takes no, v1, v2 or any; trusted_proxies takes IPv4
        and IPv6 addresses and networks, separated by spaces or commas;
        proxy_timeout defaults to 10s.
        """
        for mode in ("no", "v1", "v2", "any"):
            cfg = loadText(
                MINIMAL.replace(
                    "auth = optional",
                    f"auth = optional\nproxy_protocol = {mode}\n"
                    "trusted_proxies = 127.0.0.1 10.0.0.0/8, ::1 2001:db8::/32",
                ),
                "test.conf",
            )
            [listener] = cfg.listeners
            self.assertEqual(listener.proxy_protocol, mode)
            self.assertEqual(
                listener.trusted_proxies,
                tuple(
                    ipaddress.ip_network(n)
                    for n in ("127.0.0.1", "10.0.0.0/8", "::1", "2001:db8::/32")
                ),
            )
            self.assertEqual(listener.proxy_timeout, 10.0)

    def test_proxyProtocolProblems(self) -> None:
        """
        A wrong proxy_protocol, proxy_timeout or trusted_proxies, a missing
        trusted_proxies where a header is expected, or a PROXY header on a
        unix: socket (no client address to trust): each is one problem
        naming the file, the section and the key.
        """

        def problem(keys: str, endpoint: str = "tcp:2587") -> str:
            [found] = self.problems(
                MINIMAL.replace("tcp:2587", endpoint).replace(
                    "auth = optional", "auth = optional\n" + keys
                )
            )
            return found

        where = "test.conf: [listener:submission] "
        self.assertEqual(
            problem("proxy_protocol = yes"),
            where + "proxy_protocol: 'yes' is not one of: no, v1, v2, any",
        )
        self.assertEqual(
            problem("proxy_protocol = v2"),
            where + "trusted_proxies: missing: proxy_protocol = v2 needs the "
            "addresses of the proxies allowed to send the header",
        )
        self.assertEqual(
            problem("proxy_protocol = any\ntrusted_proxies ="),
            where + "trusted_proxies: name at least one address or network",
        )
        self.assertTrue(
            problem("proxy_protocol = v1\ntrusted_proxies = 10.0.0.1/8").startswith(
                where + "trusted_proxies: '10.0.0.1/8' is not an IP address or network ("
            )
        )
        self.assertTrue(
            problem("proxy_protocol = v1\ntrusted_proxies = haproxy.lan").startswith(
                where + "trusted_proxies: 'haproxy.lan' is not an IP address or network ("
            )
        )
        self.assertEqual(
            problem("proxy_protocol = v1\ntrusted_proxies = ::1\nproxy_timeout = 0s"),
            where + "proxy_timeout: must be more than 0",
        )
        self.assertEqual(
            problem("proxy_protocol = v1\ntrusted_proxies = ::1", "unix:/run/mailauth.sock"),
            where + "proxy_protocol: 'unix:/run/mailauth.sock': a unix: endpoint "
            "has no client address to check against trusted_proxies; use tcp:",
        )

    def test_unknownEndpointType(self) -> None:
        """An endpoint type Twisted does not know is an error at load time."""
        [problem] = self.problems(MINIMAL.replace("tcp:2587", "tpc:2587"))
        self.assertIn("unknown endpoint type 'tpc'", problem)

    def test_maildirTemplate(self) -> None:
        """The Maildir template accepts only its placeholders and needs a per-user one."""
        [problem] = self.problems(MINIMAL.replace("{localpart}", "{login}"))
        self.assertIn("[delivery] maildir", problem)
        [problem] = self.problems(MINIMAL.replace("{localpart}/", ""))
        self.assertIn("must contain {localpart} or {user}", problem)

    def test_relayNeedsPasswordFile(self) -> None:
        """A relay username without password_file is an error."""
        [problem] = self.problems(MINIMAL + "\n[relay]\nhost = smtp.example.net\nusername = u\n")
        self.assertIn("[relay] password_file", problem)

    def test_relayDefaults(self) -> None:
        """[relay] defaults: port 587, STARTTLS, retries from 1m doubling to 1h, expiry 5d."""
        cfg = loadText(MINIMAL + "\n[relay]\nhost = smtp.example.net\n")
        r = cfg.relay
        self.assertEqual(
            (r.port, r.tls, r.retry_initial, r.retry_max, r.expire),
            (587, "starttls", 60.0, 3600.0, 5 * 86400.0),
        )
        self.assertTrue(r.verify_certificate)

    def test_relayWaitsMoreThanZero(self) -> None:
        """
        The queue's scan interval and retry waits must be more than zero:
        a queue_interval of 0 kept a CPU and a disk thread busy scanning the
        queue, and retries of 0 tried a relay that is down without pause.
        """
        problems = self.problems(
            MINIMAL + "\n[relay]\nhost = smtp.example.net\nqueue_interval = 0\n"
            "retry_initial = 0s\nretry_max = 0m\n"
        )
        self.assertEqual(
            sorted(problem.split(": ", 1)[1] for problem in problems),
            [
                "[relay] queue_interval: '0' must be more than 0",
                "[relay] retry_initial: '0s' must be more than 0",
                "[relay] retry_max: '0m' must be more than 0",
            ],
        )

    def test_timeoutsMoreThanZero(self) -> None:
        """
        A session's timeouts and the relay's must be more than zero: 0 cut
        every session right after its greeting (or at DATA), and failed
        every relay connection at once.
        """
        problems = self.problems(
            MINIMAL.replace("[auth]", "[server]\ntimeout = 0\ndata_timeout = 0s\n\n[auth]")
            + "\n[relay]\nhost = smtp.example.net\ntimeout = 0m\n"
        )
        self.assertEqual(
            sorted(problem.split(": ", 1)[1] for problem in problems),
            [
                "[relay] timeout: '0m' must be more than 0",
                "[server] data_timeout: '0s' must be more than 0",
                "[server] timeout: '0' must be more than 0",
            ],
        )

    def test_zeroExpireAndDelayWarning(self) -> None:
        """
        [relay] expire = 0 (one attempt, as Postfix's maximal_queue_lifetime
        = 0) and delay_warning = 0 (no delay reports, as Postfix's
        delay_warning_time = 0) are meanings, not mistakes: they load.
        """
        cfg = loadText(
            MINIMAL + "\n[relay]\nhost = smtp.example.net\nexpire = 0\ndelay_warning = 0\n",
            "test.conf",
        )
        self.assertEqual((cfg.relay.expire, cfg.relay.delay_warning), (0.0, 0.0))

    def test_syntaxError(self) -> None:
        """A file configparser cannot read is one clear problem."""
        [problem] = self.problems("key without section\n")
        self.assertTrue(problem.startswith("test.conf: "), problem)

    def test_unreadableFile(self) -> None:
        """A file that cannot be read is reported with its path."""
        e = self.assertRaises(ConfigError, config.load, "/nonexistent/mailauth.conf")
        self.assertEqual(
            e.problems, ("/nonexistent/mailauth.conf: cannot read: No such file or directory",)
        )

    def test_byteOrderMark(self) -> None:
        """A file an editor saved with a byte-order mark loads as without one."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"\xef\xbb\xbf" + MINIMAL.encode("utf-8"))
        self.assertEqual(config.load(path), loadText(MINIMAL, path))

    def test_domainsNormalised(self) -> None:
        """Local domains are lower-cased and lose a trailing dot."""
        cfg = loadText(MINIMAL.replace("example.org", "Example.ORG. other.test"))
        self.assertEqual(cfg.delivery.local_domains, frozenset({"example.org", "other.test"}))


class StateTests(unittest.TestCase):
    def state(self, text: str):
        return loadText(MINIMAL + "\n[state]\n" + text, "test.conf").state

    def problem(self, text: str) -> str:
        e = self.assertRaises(ConfigError, self.state, text)
        [problem] = e.problems
        return problem

    def test_defaults(self) -> None:
        """Without [state], counters live in memory; Redis keys would start with mailauth:."""
        state = loadText(MINIMAL).state
        self.assertEqual((state.backend, state.prefix, state.timeout), ("memory", "mailauth:", 1.0))

    def test_redisURLs(self) -> None:
        """The URL forms redis-py reads are accepted as written."""
        for url in (
            "redis://127.0.0.1:6379/0",
            "redis://redis.example.net",
            "rediss://:pw@h:6380/1",
            "redis://user:pw@[::1]:6379/15?health_check_interval=5",
            "unix:///run/redis/redis-server.sock?db=2",
            "unix://:pw@/run/redis.sock",
        ):
            self.assertEqual(self.state(f"backend = {url}\n").backend, url)
        self.assertEqual(self.state("backend = Memory\n").backend, "memory")
        state = self.state("backend = redis://h/0\nprefix = mx1:\ntimeout = 250\n")
        self.assertEqual((state.prefix, state.timeout), ("mx1:", 250.0))

    def test_badBackend(self) -> None:
        """A backend that is not memory or a well-formed Redis URL is one clear line."""
        cases = {
            "postgresql://h/db": "is not memory or a redis://HOST:6379/0",
            "redis:/h": "name the Redis host",
            "redis://h:6379x/0": "the port is not a number from 1 to 65535",
            "redis://h:0": "the port is not a number from 1 to 65535",
            "redis://h:70000": "the port is not a number from 1 to 65535",
            "redis://h/zero": "the path must be a database number",
            "redis://h/0?db=x": "db= must be a database number",
            "redis://h/0?x": "the query must be NAME=VALUE pairs",
            "unix://run/redis.sock": "name the socket's absolute path",
        }
        for url, message in cases.items():
            problem = self.problem(f"backend = {url}\n")
            self.assertTrue(problem.startswith("test.conf: [state] backend: "), problem)
            self.assertIn(message, problem)

    def test_passwordNotShown(self) -> None:
        """A problem with a URL holding a password shows it as ***."""
        problem = self.problem("backend = redis://user:s3cret@h:port/0\n")
        self.assertIn("'redis://user:***@h:port/0'", problem)
        self.assertNotIn("s3cret", problem)

    def test_badTimeout(self) -> None:
        """A timeout must be more than zero."""
        self.assertIn("[state] timeout: '0s' must be more than 0", self.problem("timeout = 0s\n"))
        self.assertIn("[state] timeout:", self.problem("timeout = soon\n"))

    def test_unknownKey(self) -> None:
        """[state] has no workers key: workers belong to [server]."""
        self.assertIn("[state] workers: unknown key", self.problem("workers = 2\n"))


class ValueTests(unittest.TestCase):
    def test_sizes(self) -> None:
        """Sizes take K/M/G suffixes."""
        self.assertEqual(parseSize("35M"), 35 * 1024**2)
        self.assertEqual(parseSize("512k"), 512 * 1024)
        self.assertEqual(parseSize("1G"), 1024**3)
        self.assertEqual(parseSize("1000"), 1000)
        self.assertRaises(ValueError, parseSize, "big")

    def test_durations(self) -> None:
        """Times take s/m/h/d suffixes."""
        self.assertEqual(parseDuration("30s"), 30)
        self.assertEqual(parseDuration("5m"), 300)
        self.assertEqual(parseDuration("1h"), 3600)
        self.assertEqual(parseDuration("5d"), 432000)
        self.assertEqual(parseDuration("1.5"), 1.5)
        self.assertRaises(ValueError, parseDuration, "5 minutes")


class AutoconfigTests(unittest.TestCase):
    """The optional [autoconfig] section, checked against the listeners."""

    TLS = (
        MINIMAL.replace("tls = none", "tls = starttls")
        + """
[tls]
certificate = /c
private_key = /k
"""
    )

    def problems(self, text: str) -> tuple:
        return self.assertRaises(ConfigError, loadText, text, "test.conf").problems

    def test_defaults(self) -> None:
        """
        The public host name defaults to [server] hostname, the display name
        to the first local domain; ports come from the endpoints.
        """
        cfg = loadText(
            self.TLS + "\n[server]\nhostname = Mail.Example.ORG\n"
            "\n[autoconfig]\nendpoint = tcp:8080:interface=127.0.0.1\n"
        )
        self.assertEqual(
            cfg.autoconfig,
            config.AutoconfigConfig(
                endpoint="tcp:8080:interface=127.0.0.1",
                hostname="mail.example.org",
                display_name="example.org",
                ports=(),
                incoming=(),
            ),
        )
        self.assertIsNone(loadText(self.TLS).autoconfig)

    def test_everyKey(self) -> None:
        """hostname, display_name, ports and incoming (imaps/imap/pop3s/pop3 URLs) are read."""
        cfg = loadText(
            self.TLS
            + """
[autoconfig]
endpoint = unix:/run/mailauth-autoconfig.sock
hostname = smtp.example.org.
display_name = Example Mail
ports = submission:587
incoming = imaps://imap.example.org imap://imap.example.org:1143, pop3s://pop.example.org
"""
        )
        a = cfg.autoconfig
        self.assertEqual(
            (a.hostname, a.display_name, a.ports),
            ("smtp.example.org", "Example Mail", (("submission", 587),)),
        )
        self.assertEqual(
            a.incoming,
            (
                config.MailServer("imap", "imap.example.org", 993, "implicit"),
                config.MailServer("imap", "imap.example.org", 1143, "starttls"),
                config.MailServer("pop3", "pop.example.org", 995, "implicit"),
            ),
        )

    def test_endpointChecked(self) -> None:
        """The endpoint is checked like a listener's; ssl: points at the web server in front."""
        [problem] = self.problems(self.TLS + "\n[autoconfig]\nendpoint = tpc:8080\n")
        self.assertEqual(
            problem, "test.conf: [autoconfig] endpoint: 'tpc:8080': unknown endpoint type 'tpc'"
        )
        [problem] = self.problems(self.TLS + "\n[autoconfig]\nendpoint = ssl:443\n")
        self.assertIn("use a tcp: endpoint behind a web server that does TLS", problem)
        [problem] = self.problems(self.TLS + "\n[autoconfig]\nhostname = x\n")
        self.assertEqual(
            problem, "test.conf: [autoconfig] endpoint: missing (this key is required)"
        )

    def test_portNeeded(self) -> None:
        """An advertised listener whose endpoint names no usable port needs ports = NAME:PORT."""
        text = self.TLS.replace("tcp:2587", "systemd:domain=INET:index=0")
        [problem] = self.problems(text + "\n[autoconfig]\nendpoint = tcp:8080\n")
        self.assertEqual(
            problem,
            "test.conf: [autoconfig] ports: [listener:submission] "
            "endpoint 'systemd:domain=INET:index=0' names no port clients "
            "can reach: add submission:PORT",
        )
        cfg = loadText(text + "\n[autoconfig]\nendpoint = tcp:8080\nports = submission:587\n")
        self.assertEqual(cfg.autoconfig.ports, (("submission", 587),))

    def test_portsChecked(self) -> None:
        """ports must name advertised listeners, each as NAME:PORT."""
        text = (
            self.TLS + "\n[listener:mx]\nendpoint = tcp:25\nauth = none\n[autoconfig]\n"
            "endpoint = tcp:8080\nports = PORTS\n"
        )
        [problem] = self.problems(text.replace("PORTS", "submision:587"))
        self.assertEqual(problem, "test.conf: [autoconfig] ports: there is no [listener:submision]")
        [problem] = self.problems(text.replace("PORTS", "mx:25"))
        self.assertIn("[autoconfig] ports: [listener:mx] is not advertised", problem)
        [problem] = self.problems(text.replace("PORTS", "submission"))
        self.assertIn("'submission' is not LISTENER:PORT", problem)
        [problem] = self.problems(text.replace("PORTS", "submission:99999"))
        self.assertIn("'99999' is not a port number", problem)

    def test_nothingToAdvertise(self) -> None:
        """Without a TLS listener offering AUTH there is nothing to advertise: an error."""
        [problem] = self.problems(MINIMAL + "\n[autoconfig]\nendpoint = tcp:8080\n")
        self.assertIn("[autoconfig]: no listener has tls = starttls or implicit", problem)

    def test_badValues(self) -> None:
        """Bad incoming URLs, host names and display names are named one line each."""
        problems = self.problems(
            self.TLS
            + """
[autoconfig]
endpoint = tcp:8080
hostname = -mail.example.org
display_name = a\x07b
incoming = https://imap.example.org
"""
        )
        self.assertEqual(len(problems), 3, problems)
        joined = "\n".join(problems)
        self.assertIn("[autoconfig] hostname: '-mail.example.org' is not a host name", joined)
        self.assertIn("[autoconfig] display_name: 'a\\x07b' has control characters", joined)
        self.assertIn(
            "[autoconfig] incoming: 'https://imap.example.org' is not imaps://HOST[:PORT]", joined
        )

    def test_serverHostnameUnusable(self) -> None:
        """A [server] hostname clients would refuse must be replaced by a public one."""
        [problem] = self.problems(
            self.TLS + "\n[server]\nhostname = mail..example\n\n[autoconfig]\nendpoint = tcp:8080\n"
        )
        self.assertIn(
            "[autoconfig] hostname: the [server] hostname 'mail..example' is not", problem
        )

    def test_mechanismsWithoutClientName(self) -> None:
        """
        Mechanisms that no client can be told to use (SCRAM alone) leave
        nothing to advertise: an error. (SCRAM is patched into the known
        mechanisms until it is implemented.)
        """
        self.patch(config, "KNOWN_MECHANISMS", config.KNOWN_MECHANISMS + ("SCRAM-SHA-256",))
        text = (
            self.TLS.replace("[auth]", "[auth]\nmechanisms = MECHANISMS")
            + "\n[autoconfig]\nendpoint = tcp:8080\n"
        )
        [problem] = self.problems(text.replace("MECHANISMS", "SCRAM-SHA-256"))
        self.assertEqual(
            problem,
            "test.conf: [autoconfig]: none of the [auth] mechanisms "
            "(SCRAM-SHA-256) is one mail clients can be told to use "
            "(PLAIN or LOGIN, CRAM-MD5, OAUTHBEARER or XOAUTH2)",
        )
        loadText(text.replace("MECHANISMS", "SCRAM-SHA-256 PLAIN"))

    def test_endpointPort(self) -> None:
        """endpointPort reads tcp:/tcp6: ports, positional or port=, and nothing else."""
        self.assertEqual(config.endpointPort("tcp:587"), 587)
        self.assertEqual(config.endpointPort("tcp:interface=127.0.0.1:port=2587"), 2587)
        self.assertEqual(config.endpointPort("tcp6:465:interface=\\:\\:1"), 465)
        for description in (
            "tcp:0",
            "tcp:abc",
            "unix:/run/x.sock",
            "systemd:domain=INET:index=0",
            "tcp:70000",
        ):
            self.assertIsNone(config.endpointPort(description), description)


class DKIMSectionTests(unittest.TestCase):
    """[dkim]: one signing domain a line, C{domain = selector:keyfile}."""

    def problems(self, lines: str) -> tuple:
        e = self.assertRaises(ConfigError, loadText, MINIMAL + "[dkim]\n" + lines, "test.conf")
        return e.problems

    def test_absent(self) -> None:
        """Without [dkim] nothing is signed: the mapping is empty."""
        self.assertEqual(dict(loadText(MINIMAL).dkim), {})

    def test_domains(self) -> None:
        """
        Each key is a domain (lower-cased, without a trailing dot) and its
        value one or more selector:keyfile; the mapping is read-only.
        """
        cfg = loadText(
            MINIMAL + "[dkim]\n"
            "Example.ORG. = Mail2026:/etc/dkim/example.org.pem\n"
            "example.net = a:/k/a.pem  b.sub:/k/b.pem ; RSA and Ed25519\n"
        )
        self.assertEqual(
            dict(cfg.dkim),
            {
                "example.org": (config.DKIMKeyConfig("mail2026", "/etc/dkim/example.org.pem"),),
                "example.net": (
                    config.DKIMKeyConfig("a", "/k/a.pem"),
                    config.DKIMKeyConfig("b.sub", "/k/b.pem"),
                ),
            },
        )

        def change() -> None:
            cfg.dkim["x.org"] = ()

        self.assertRaises(TypeError, change)

    def test_badDomain(self) -> None:
        """A key that is not a domain name is an error naming it."""
        self.assertEqual(
            self.problems("exa_mple.org = s:/k.pem\n"),
            (
                "test.conf: [dkim] exa_mple.org: 'exa_mple.org' is not a domain name: "
                "each key in [dkim] is a signing domain",
            ),
        )

    def test_badValues(self) -> None:
        """A value that is not selector:keyfile, a bad selector, or no value at all."""
        self.assertEqual(
            self.problems(
                "a.org = /etc/key.pem\nb.org = :/k.pem\nc.org = s:\n"
                "d.org = bad_selector:/k.pem\ne.org =\n"
            ),
            (
                "test.conf: [dkim] a.org: '/etc/key.pem' is not selector:keyfile",
                "test.conf: [dkim] b.org: ':/k.pem' is not selector:keyfile",
                "test.conf: [dkim] c.org: 's:' is not selector:keyfile",
                "test.conf: [dkim] d.org: 'bad_selector' is not a DKIM selector "
                "(letters, digits, hyphens, dot-separated)",
                "test.conf: [dkim] e.org: missing selector:keyfile",
            ),
        )

    def test_duplicates(self) -> None:
        """A selector twice for one domain, or one domain written twice, is an error."""
        self.assertEqual(
            self.problems("a.org = s:/k1.pem s:/k2.pem\nb.org = s:/k.pem\nb.org. = t:/k.pem\n"),
            (
                "test.conf: [dkim] a.org: selector s is listed twice",
                "test.conf: [dkim] b.org.: b.org is listed twice",
            ),
        )

    def test_withoutDkimpy(self) -> None:
        """[dkim] without dkimpy installed is one clear line."""
        with mock.patch.dict(sys.modules, {"dkim": None}):
            self.assertEqual(
                self.problems("a.org = s:/k.pem\n"),
                (
                    "test.conf: [dkim]: needs the Python package dkimpy (Debian: apt install "
                    "python3-dkim; pip: pip install 'mailauth[dkim]')",
                ),
            )

    def test_unknownSectionNamesDkim(self) -> None:
        """The list of known sections in the unknown-section error includes [dkim]."""
        e = self.assertRaises(ConfigError, loadText, MINIMAL + "[dkm]\n", "test.conf")
        self.assertIn("[dkim]", e.problems[0])
