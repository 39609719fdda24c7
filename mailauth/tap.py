"""
C{twistd mailauth}: options, and L{makeService}, the one place where the
parts are made and wired together.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any, Callable, Mapping, NoReturn, Optional, cast

import attrs
from twisted.application import internet, service, strports
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.logger import ILogObserver, Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.components import Componentized

from mailauth import apppasswords, sasl, scram, sdnotify
from mailauth import config as configmod
from mailauth.addressmap import AddressMap
from mailauth.checkers import CramMD5Checker, OAuthChecker, PasswordChecker, ScramChecker
from mailauth.checks import Account, checkAll
from mailauth.counters import counterStoreFromConfig, memoryCounterStore
from mailauth.esmtp import SubmissionFactory
from mailauth.forward import QueueService
from mailauth.interfaces import IReloadable, IUserDatabase
from mailauth.limits import LimitOverrides, Limits, SendingLimits
from mailauth.listening import listenProblem
from mailauth.logs import (
    LogFormatError,
    jsonFileObserver,
    textFileObserver,
    twistdLogFile,
    twistdLogsToStandardOutput,
)
from mailauth.maildir import LeftoverCleanup
from mailauth.metrics import Metrics, WorkerFiles, metricsService, workerFiles
from mailauth.ownmail import LocalDelivery
from mailauth.pglookups import PostgreSQLUserDatabase
from mailauth.pgusers import isPostgreSQL
from mailauth.proxy import ProxyFactory
from mailauth.realm import Realm
from mailauth.relay import RelayConnector
from mailauth.reloading import Reloader, SignalReload, ignoreSIGHUP
from mailauth.routing import Router
from mailauth.spool import Queue
from mailauth.threads import ThreadPoolService
from mailauth.throttle import AuthThrottle, ConnectionLimiter
from mailauth.tls import ReloadableTLS
from mailauth.userdb import UserDatabase
from mailauth.userstore import AppPasswordUse, Rehasher, schemesNeededBy, storeFor
from mailauth.workerlink import NodeConnections, NodeCounters
from mailauth.workerproc import Worker
from mailauth.workers import HeldPort, WorkerPool, readConfiguration, workerEnvironment

log = Logger(namespace="mailauth.tap")

# How often the users, aliases and sender map files are checked for changes.
RELOAD_INTERVAL = 2.0
# Threads calling a shared counter store (Redis): its calls are short.
STATE_THREADS = 4


class Options(usage.Options):
    synopsis = "--config PATH"
    longdesc = "Run the mailauth SMTP submission server."
    optParameters = [["config", "c", None, "the configuration file (INI)"]]

    def postOptions(self) -> None:
        """
        Load the configuration and run every check of C{mailauth
        check-config} on it (L{checkAll}), as the user twistd will run as.

        Problems end the process with SystemExit, one line each, before
        twistd forks or logs: twistd 22.4 (Debian bookworm) exits 0 after
        a UsageError, and a bad configuration must stop the daemon with a
        non-zero status.
        """
        # Before anything is read: a SIGHUP must not kill a starting daemon.
        ignoreSIGHUP()
        path = self["config"]
        if not path:
            raise SystemExit("twistd mailauth: --config is required")
        try:
            cfg = configmod.load(path)
        except configmod.ConfigError as e:
            raise SystemExit("\n".join(e.problems)) from None
        runAs = _runAs(self)
        try:
            account = (
                Account.ofProcess()
                if runAs is None
                else Account.lookup(runAs[0], None if runAs[1] == -1 else runAs[1])
            )
        except KeyError as e:
            raise SystemExit(f"twistd mailauth: --uid: {e.args[0]}") from None
        findings = checkAll(cfg, account, chown=runAs is not None, daemon=True)
        if findings.errors:
            raise SystemExit("\n".join(findings.errors))
        self.config = cfg
        self.warnings = findings.warnings


class StartupError(Exception):
    """The daemon cannot start; the message is one line naming what and why."""


def _raise(line: str, short: str) -> NoReturn:
    raise StartupError(line)


class _Daemon(service.MultiService):
    """
    The top service. An endpoint that cannot listen while the daemon starts
    is one logged line naming the configuration key, the endpoint and why,
    then L{exit}: never a traceback.

    @ivar endpoints: for each listening service by name, its section and
        endpoint string.
    @ivar exit: called with the line, and a short form of it, once it is
        logged; must not return. By default it raises L{StartupError};
        under twistd, L{_exitTwistd}.
    @ivar logObserver: the log observer twistd is to use instead of its
        own (C{[server] log_format = json}), or L{None}.
    """

    logObserver: Optional[ILogObserver] = None

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.endpoints: dict[str, tuple[str, str]] = {}
        self._details: dict[str, str] = {}
        self.exit: Callable[[str, str], NoReturn] = _raise

    def setServiceParent(self, parent) -> None:
        # twistd makes the application, adds this service to it, and only
        # then starts its log with the application's ILogObserver, if set.
        if self.logObserver is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.logObserver)
        super().setServiceParent(parent)

    def addEndpoint(
        self, child: service.Service, section: str, description: str, details: str = ""
    ) -> None:
        """
        Add C{child}, which listens on C{description} for C{[section]}.

        @param details: the rest of its line once it listens, e.g.
            C{" tls=starttls auth=required proxy_protocol=no"}.
        """
        child.setServiceParent(self)
        self.endpoints[cast(str, child.name)] = (section, description)
        self._details[cast(str, child.name)] = details

    def privilegedStartService(self) -> None:
        # MultiService.privilegedStartService, with each listener's failure caught.
        service.Service.privilegedStartService(self)
        for child in self:
            try:
                child.privilegedStartService()
            except Exception as e:
                if child.name not in self.endpoints:
                    raise
                section, description = self.endpoints[child.name]
                why = listenProblem(e)
                where = f"{self.path}: [{section}] endpoint: {description!r}"
                log.error("{where}: cannot listen: {why}; mailauth stops", where=where, why=why)
                self.exit(f"{where}: cannot listen: {why}", f"[{section}] {description}: {why}")

    def startService(self) -> None:
        # Once every endpoint could listen: a failed start logs only why.
        super().startService()
        for name in self.endpoints:
            child = self.getServiceNamed(name)
            sdnotify._waitingForPort(child).addCallback(self._listening, name)

    def stopService(self) -> defer.Deferred:
        """
        Stop every service in reverse order, as L{service.MultiService}
        does, but the thread pools only once the others have stopped: the
        queue, the workers and the sessions may still hand them work while
        they stop (the outcome of an aborted relay attempt, written through
        the disk pool), and a stopped pool drops work without a word.
        """
        service.Service.stopService(self)
        children = list(self)[::-1]
        pools = [child for child in children if isinstance(child, ThreadPoolService)]
        d = defer.DeferredList(
            [defer.maybeDeferred(c.stopService) for c in children if c not in pools]
        )
        d.addCallback(
            lambda _: defer.DeferredList([defer.maybeDeferred(p.stopService) for p in pools])
        )
        return d.addCallback(lambda _: None)

    def _listening(self, port, name: str) -> None:
        """Log where C{name} listens, with its configuration, in place of Twisted's line."""
        if not hasattr(port, "getHost"):
            return
        section, description = self.endpoints[name]
        log.info(
            "[{section}] listening on {address}: endpoint={endpoint}{details}",
            section=section,
            address=_addressText(port.getHost()),
            endpoint=description,
            details=self._details[name],
        )


def _addressText(address) -> str:
    """C{127.0.0.1:587}, C{[::1]:587}, or a UNIX socket's path."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        name = getattr(address, "name", address)
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _exitTwistd(parent: usage.Options) -> Callable[[str, str], NoReturn]:
    """
    How the daemon under twistd stops at start, once the reason is logged:
    status 1 and that one line, in the foreground and as a daemon.

    As a daemon, twistd's first process waits on a pipe (C{statusPipe}, in
    Twisted 22.4 and since) for the forked daemon to start, and prints what
    comes through it. An exception from starting would put the first 98
    bytes of its class and message through, and its traceback into the
    log; so the short line is written to the pipe here and the process
    exits quietly, removing its pid file as twistd would.

    @param parent: twistd's own options.
    """

    def exit(line: str, short: str) -> NoReturn:
        # The pid file goes first: twistd's first process exits as soon as
        # it reads the pipe, and whoever ran it may look for the file then.
        pidfile = parent.get("pidfile")
        if pidfile:
            try:
                with open(pidfile) as f:
                    ours = f.read().strip() == str(os.getpid())
                if ours:
                    os.unlink(pidfile)
            except OSError:
                pass
        pipe = parent.get("statusPipe")
        if pipe is not None:
            parent["statusPipe"] = None
            os.write(pipe, b"1 " + short.encode("ascii", "backslashreplace")[:98])
            os.close(pipe)
        elif (
            parent.get("logfile") not in (None, "", "-")
            and not parent.get("syslog")
            and sys.__stderr__ is not None
        ):
            # In the foreground, logging to a file: say it on the terminal too.
            sys.__stderr__.write(line + "\n")
        raise SystemExit(1)

    return exit


def stopFailed(reactor, report: Optional[_StartReport] = None) -> Callable[[], None]:
    """
    What stops the daemon once it failed after twistd started it (no
    worker could start): the reactor stops as usual (services stop, twistd
    removes its pid file), then the process exits with status 1, not the 0
    twistd returns whatever stopped its reactor (it has no way for a
    service to choose, Twisted issue 11335). A shell, a container's restart
    policy or systemd then see the failure; as a daemon, so does twistd's
    first process, through C{report}.
    """

    def stop() -> None:
        if report is not None:
            report.failing = True
        atexit.register(_exitWithStatusOne, report)
        reactor.stop()

    return stop


def _exitWithStatusOne(report: Optional[_StartReport] = None) -> None:
    # Registered last, so the first of the interpreter's exit hooks, after
    # twistd has returned; what the others would flush is flushed here.
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    if report is not None:
        report.answer(b"1 no worker could start: see the log")
    os._exit(1)


class _StartReport(service.Service):
    """
    What twistd's first process hears of a daemon with workers. As a
    daemon, twistd forks, and its first process waits on a pipe
    (C{statusPipe}) and exits with what comes through it: twistd writes
    C{0} once every service has started, which for a pool of workers is
    before any of them serves, or fails. This takes the pipe over when
    started and answers C{0} once every worker serves; if the daemon stops
    before that, C{1} and why (twistd prints it and exits with 1): on a
    failure, as the process ends (L{stopFailed}), after twistd has removed
    its pid file.

    @ivar failing: set by L{stopFailed}: the answer is left to its exit hook.
    """

    def __init__(self, twistdOptions: usage.Options, pool: service.IService) -> None:
        # (Not "parent": a service's parent is the service it belongs to.)
        self.twistdOptions = twistdOptions
        self.pool = pool
        self.pipe: Optional[int] = None
        self.failing = False

    def startService(self) -> None:
        super().startService()
        self.pipe = self.twistdOptions.get("statusPipe")
        if self.pipe is not None:
            self.twistdOptions["statusPipe"] = None
            sdnotify._waitingForPort(self.pool).addCallback(self._started)

    def _started(self, serving) -> None:
        if serving:
            self.answer(b"0")

    def stopService(self) -> None:
        super().stopService()
        if not self.failing:
            self.answer(b"1 stopped before every worker served: see the log")

    def answer(self, status: bytes) -> None:
        """Write C{status} to twistd's first process and close the pipe, once."""
        if self.pipe is None:
            return
        pipe, self.pipe = self.pipe, None
        try:
            os.write(pipe, status[:100])
        except OSError:
            pass  # twistd's first process is gone: nobody to tell
        finally:
            os.close(pipe)


def makeService(options: Options, reactor=None) -> service.MultiService:
    """
    Build the whole daemon from validated options; log the warnings of its
    checks (twistd writes them to the log once it starts).
    """
    if reactor is None:
        from twisted.internet import reactor
    for warning in getattr(options, "warnings", ()):
        # Not a field named "warning": legacy log observers (trial's) take
        # an event with one for a Python warning and look for its filename.
        log.warn("{finding}", finding=warning)
    try:
        top = buildService(options.config, reactor, _runAs(options), os.environ)
    except configmod.ConfigError as e:
        # A DKIM key changed since the checks read it.
        raise SystemExit("\n".join(e.problems)) from None
    except OSError as e:
        # Before twistd forks or logs: the line goes to the terminal.
        where = f"{e.filename}: " if e.filename else ""
        raise SystemExit(f"twistd mailauth: cannot start: {where}{e.strerror or e}") from None
    parent = getattr(options, "parent", None)
    if parent is not None:
        top.exit = _exitTwistd(parent)
        pool = next((s for s in top if s.name == "workers"), None)
        if isinstance(pool, WorkerPool):
            report = _StartReport(parent, pool)
            report.setServiceParent(top)
            pool.stopDaemon = stopFailed(reactor, report)
            if twistdLogsToStandardOutput(parent):
                # Before twistd starts its log, which replaces sys.stdout.
                pool.ownLog = _descriptor(sys.stdout)
        if options.config.server.log_format == "json":
            try:
                top.logObserver = jsonFileObserver(twistdLogFile(parent))
            except LogFormatError as e:
                raise SystemExit(f"twistd mailauth: {e}") from None
        elif twistdLogsToStandardOutput(parent):
            # twistd's own lines, for less CPU (a file log, with its
            # rotation, stays twistd's).
            top.logObserver = textFileObserver(sys.stdout)
    return top


def _descriptor(stream: Any) -> Optional[int]:
    """The file descriptor under C{stream}, or L{None} if it has none."""
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        # (io.UnsupportedOperation is both an OSError and a ValueError.)
        return None


def _runAs(options: usage.Options) -> Optional[tuple]:
    """
    The (uid, gid) twistd will switch to after binding (C{--uid}/C{--gid}),
    when we run as root now, else L{None}.
    """
    parent = getattr(options, "parent", None)
    if parent is None or os.geteuid() != 0 or parent.get("uid") is None:
        return None
    gid = parent.get("gid")
    return (parent["uid"], gid if gid is not None else -1)


def _workerEnvironment(cfg: configmod.Config, environ: Optional[Mapping[str, str]]) -> dict:
    """
    The environment the parent gives its workers: its own, and with
    C{[metrics]} the folder where prometheus_client keeps their metrics.
    """
    env = dict(os.environ if environ is None else environ)
    if cfg.metrics is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = workerFiles(cfg)
    return env


def _chownTree(path: str, owner: tuple) -> None:
    """Give C{path} and everything under it to C{owner} (uid, gid)."""
    os.chown(path, *owner)
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(top, name), *owner, follow_symlinks=False)


def _keyRing(cfg: configmod.Config, reactor) -> Any:
    """
    The DKIM keys of C{[dkim]}, read now (as root under C{--uid}, before
    privileges are dropped) and again on SIGHUP (as the daemon's user: the
    key files must be readable by its group), or L{None} without C{[dkim]}:
    only then is dkimpy imported.

    @raise configmod.ConfigError: for a key that cannot be used (the
        checks before start report it first).
    """
    if not cfg.dkim:
        return None
    from mailauth import dkimsign

    return dkimsign.KeyRing(dkimsign.loadKeys(cfg), reactor, load=lambda: dkimsign.loadKeys(cfg))


def _statePool(cfg: configmod.Config, reactor, top: service.MultiService) -> Any:
    """
    The runner of a shared counter store's blocking calls: a small thread
    pool of its own, so that a slow Redis never holds up password checks or
    disk writes; L{None} for counters in memory.
    """
    if cfg.state.backend == "memory":
        return None
    # Each call waits at most [state] timeout; one per session is in flight.
    pool = ThreadPoolService(
        reactor, "mailauth-state", STATE_THREADS, maxQueued=cfg.server.max_connections * 2
    )
    pool.setServiceParent(top)
    return pool.run


def _sendingLimits(
    cfg: configmod.Config, store, users: IUserDatabase, realm: Realm, runBlocking, metrics: Metrics
) -> SendingLimits:
    """
    The C{[limits]} of every login, counted in C{store}. A login that keeps
    hitting them is suspended in the user store C{[auth] users} names (its
    edits block, so they run through C{runBlocking}), and the C{[delivery]
    postmaster}, if any, gets a notice through the realm.
    """
    values = attrs.asdict(cfg.limits)
    overrides = LimitOverrides(values.pop("overrides"))
    userStore = storeFor(cfg.auth.users)
    return SendingLimits(
        store=store,
        defaults=Limits(**values),
        overrides=overrides,
        users=users,
        suspend=lambda login: runBlocking(userStore.setSuspended, login, True),
        postmaster=cfg.delivery.postmaster,
        deliver=realm.deliverNotice,
        hostname=cfg.server.hostname,
        clock=realm.clock,
        metrics=metrics,
    )


def buildService(
    cfg: configmod.Config,
    reactor,
    runAs: Optional[tuple] = None,
    environ: Optional[Mapping[str, str]] = None,
    worker: Optional[Worker] = None,
) -> _Daemon:
    """
    Make and wire every part of the daemon.

    With C{[server] workers} above 1 this is the parent, which binds the
    listeners for its L{WorkerPool} and runs the queue, and each worker
    (C{worker} given) serves the sessions; see L{mailauth.workers}.

    @param runAs: (uid, gid) the process will run as once the ports are
        bound (twistd's C{--uid}/C{--gid}): the state directory made here,
        while still root, is given to it.
    @param environ: the process environment, for systemd's C{NOTIFY_SOCKET}.
    @param worker: build one worker process: serve its inherited sockets,
        and leave the queue's runner, autoconfig and systemd to the parent.
    """
    top = _Daemon(cfg.path)
    os.makedirs(cfg.server.state_dir, mode=0o750, exist_ok=True)
    role = "one" if cfg.server.workers == 1 else "parent" if worker is None else "worker"
    metricsFiles = None
    if role == "parent" and cfg.metrics is not None:
        metricsFiles = WorkerFiles(workerFiles(cfg))
    metrics = Metrics.fromConfig(cfg, role)

    aliases = AddressMap(cfg.delivery.aliases)
    senderMap = AddressMap(cfg.delivery.sender_map)
    users: IUserDatabase
    if isPostgreSQL(cfg.auth.users):
        users = PostgreSQLUserDatabase(cfg.auth.users, reactor, connections=cfg.server.auth_threads)
        users.setServiceParent(top)
        reloadable: list[IReloadable] = [aliases, senderMap]
    else:
        users = UserDatabase(cfg.auth.users)
        users.load()
        reloadable = [users, aliases, senderMap]

    # A session waits for one login at a time, so max_connections already
    # bounds the logins waiting here; a lower bound would only answer a
    # burst of honest logins (clients reconnecting after a restart) with 454.
    authPool = ThreadPoolService(
        reactor, "mailauth-auth", cfg.server.auth_threads, maxQueued=cfg.server.max_connections
    )
    diskPool = ThreadPoolService(
        reactor, "mailauth-disk", cfg.server.disk_threads, maxQueued=cfg.server.max_connections * 2
    )
    authPool.setServiceParent(top)
    diskPool.setServiceParent(top)
    # After the disk pool, which it runs in: tmp/ files of a killed process.
    LeftoverCleanup(
        cfg.delivery.maildir, cfg.server.hostname, diskPool.run, reactor
    ).setServiceParent(top)

    router = Router(
        localDomains=cfg.delivery.local_domains,
        maildirTemplate=cfg.delivery.maildir,
        users=users,
        aliases=aliases,
        senderMap=senderMap,
        senderLoginMatch=cfg.delivery.sender_login_match,
        postmaster=cfg.delivery.postmaster,
        headerFromMatch=cfg.delivery.header_from_match,
    )
    queue = queueService = None
    if cfg.relay is not None:
        queue = Queue(os.path.join(cfg.server.state_dir, "queue"), reactor, cfg.server.hostname)
        queueService = QueueService(
            queue,
            cfg.relay,
            reactor,
            LocalDelivery(router, cfg.server.hostname, diskPool.run),
            runBlocking=diskPool.run,
            connector=RelayConnector(cfg.relay, reactor, cfg.server.hostname),
            metrics=metrics,
        )
        metrics.watchQueue(queueService.probe)
        if worker is None:
            queueService.setServiceParent(top)
    saslTable = dict(sasl.MECHANISMS)
    scramOffered = any(name.startswith("SCRAM-") for name in cfg.auth.mechanisms)
    if scramOffered:
        # The key of the fake salts given to logins that do not exist.
        secret = scram.loadSecret(os.path.join(cfg.server.state_dir, "scram-secret"))
        saslTable.update(scram.mechanisms(users, secret))
    if runAs is not None:
        _chownTree(cfg.server.state_dir, runAs)
    realm = Realm(
        router=router,
        hostname=cfg.server.hostname,
        runBlocking=diskPool.run,
        queue=queue,
        wakeQueue=(
            worker.wakeQueue
            if worker is not None
            else queueService.wake
            if queueService is not None
            else (lambda: None)
        ),
        clock=reactor,
        keyRing=_keyRing(cfg, reactor),
        metrics=metrics,
    )
    if realm.keyRing is not None:
        from mailauth.signerproc import SigningProcess

        realm.signingProcess = SigningProcess(reactor, workerEnvironment(os.environ))
        realm.signingProcess.setServiceParent(top)
    # The throttle and the sending limits count here.
    counterStore = counterStoreFromConfig(
        cfg,
        reactor,
        _statePool(cfg, reactor, top),
        onFallback=metrics.counterStoreFallback,
        node=worker.counters if worker is not None else None,
    )
    realm.limits = _sendingLimits(cfg, counterStore, users, realm, diskPool.run, metrics)
    reloadable.append(realm.limits.overrides)
    portal = Portal(realm)
    # The daemon's own edits of the users: app password uses (in state_dir
    # for a users file) and, with [auth] rehash, outdated hashes replaced.
    store = storeFor(
        cfg.auth.users,
        lastUsedPath=os.path.join(cfg.server.state_dir, apppasswords.LAST_USED_FILE),
    )
    rehasher = None
    if cfg.auth.rehash:
        rehasher = Rehasher(store, diskPool.run, schemesNeededBy(cfg.auth.mechanisms))
    portal.registerChecker(
        PasswordChecker(users, authPool.run, AppPasswordUse(store, diskPool.run, reactor), rehasher)
    )
    if "CRAM-MD5" in cfg.auth.mechanisms:
        portal.registerChecker(CramMD5Checker(users, authPool.run))
    if scramOffered:
        portal.registerChecker(ScramChecker(users))
    if cfg.oauth is not None:
        from mailauth.oauth import TokenVerifier

        tokens = TokenVerifier.fromConfig(cfg.oauth, reactor, authPool.run)
        portal.registerChecker(OAuthChecker(users, tokens))
        if tokens.keys is not None:
            reloadable.append(tokens.keys)

    tls = ReloadableTLS(cfg.tls.certificate, cfg.tls.private_key) if cfg.tls else None
    throttle = AuthThrottle.fromConfig(
        reactor, cfg.auth, counterStore, onBlock=metrics.addressBlocked
    )
    # One count for the node: with workers, the parent keeps it and the
    # workers ask it (mailauth.workerlink).
    limiter = ConnectionLimiter(cfg.server.max_connections, cfg.server.max_connections_per_address)
    connections: Any = limiter
    if worker is not None and worker.connections is not None:
        connections = worker.connections
    anonymous = realm.anonymous()
    postmasterDomain = sorted(cfg.delivery.local_domains)[0]
    pool = None
    if cfg.server.workers > 1 and worker is None:
        # The parent: it binds the sockets, and its workers serve them.
        held = []
        for listener in cfg.listeners:
            port = HeldPort(reactor, listener.name, listener.endpoint)
            top.addEndpoint(
                port,
                f"listener:{listener.name}",
                listener.endpoint,
                f" tls={listener.tls} auth={listener.auth} "
                f"proxy_protocol={listener.proxy_protocol} "
                f"workers={cfg.server.workers}",
            )
            held.append(port)
        pool = WorkerPool(
            reactor,
            cfg.server.workers,
            held,
            cfg.path,
            readConfiguration(cfg.path, cfg),
            wakeQueue=queueService.wake if queueService is not None else (lambda: None),
            environ=_workerEnvironment(cfg, environ),
            hangTimeout=cfg.server.worker_timeout,
            connections=NodeConnections(limiter),
            workerEnded=metrics.workerEnded,
            # While Redis is down, the workers count here together.
            counters=NodeCounters(memoryCounterStore(cfg, reactor)),
        )
        if metricsFiles is not None:
            metricsFiles.setServiceParent(top)
        pool.setServiceParent(top)
    for listener in cfg.listeners if pool is None else ():
        factory = SubmissionFactory(
            settings=cfg.server,
            portal=portal,
            anonymous=anonymous,
            mechanisms=cfg.auth.mechanisms,
            authMode=listener.auth,
            tlsMode=listener.tls,
            tlsContext=tls,
            plaintextRequiresTLS=cfg.auth.plaintext_requires_tls,
            throttle=throttle,
            connections=connections,
            failuresPerSession=cfg.auth.failures_per_session,
            postmasterDomain=postmasterDomain,
            reactor=reactor,
            saslTable=saslTable,
            metrics=metrics,
            name=listener.name,
        )
        wrapped: Any = factory
        if listener.tls == "implicit":
            assert tls is not None, "config.loadText demands [tls] for a TLS listener"
            wrapped = TLSMemoryBIOFactory(cast(Any, tls), False, factory)
        if listener.proxy_protocol != "no":
            # Under TLS too: HAProxy in TCP mode sends the header in the clear.
            wrapped = ProxyFactory(
                wrapped,
                listener.proxy_protocol,
                listener.trusted_proxies,
                reactor,
                listener.proxy_timeout,
            )
            wrapped.noisy = False
        if worker is not None:
            worker.listen(listener.name, wrapped, reactor).setServiceParent(top)
            continue
        listening = strports.service(listener.endpoint, wrapped, reactor=reactor)
        listening.setName(f"listener:{listener.name}")
        top.addEndpoint(
            listening,
            f"listener:{listener.name}",
            listener.endpoint,
            f" tls={listener.tls} auth={listener.auth} proxy_protocol={listener.proxy_protocol}",
        )
    if cfg.autoconfig is not None and worker is None:
        from mailauth.autoconfig import makeSite

        web = strports.service(cfg.autoconfig.endpoint, makeSite(cfg, reactor), reactor=reactor)
        web.setName("autoconfig")
        top.addEndpoint(web, "autoconfig", cfg.autoconfig.endpoint)

    reloader = Reloader(
        reloadable, tls, realm.keyRing, pool, config=cfg if worker is None else None
    )
    timer = internet.TimerService(RELOAD_INTERVAL, reloader.reloadFiles)
    timer.clock = reactor
    timer.setServiceParent(top)
    SignalReload(reactor, reloader.reloadAll).setServiceParent(top)
    if cfg.metrics is not None and worker is None:
        top.addEndpoint(
            metricsService(cfg.metrics.endpoint, metrics, reactor), "metrics", cfg.metrics.endpoint
        )
    # Last, so that it starts after every port listens and stops first.
    ports: list[service.IService] = [
        s for s in top if isinstance(s, internet.StreamServerEndpointService)
    ]
    if pool is not None:
        ports.append(pool)
    # A worker never speaks to systemd: the parent does, for all of them.
    notifier = sdnotify.fromEnvironment((environ or {}) if worker is None else {}, reactor, ports)
    if notifier is not None:
        notifier.setServiceParent(top)
    return top
