"""
The endpoints of a configuration (L{mailauth.checks}): parsed as Twisted
will parse them, and tried: a port already in use is an error, unless the
running mailauth holds it.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import ssl
import stat
from typing import Optional

import attrs
from twisted.internet import endpoints
from twisted.internet.abstract import isIPv6Address
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor

from mailauth import config as configmod
from mailauth.findings import Findings, place

# How long check-config waits for a running daemon to greet on a port in use.
PROBE_TIMEOUT = 3.0

_GREETING = re.compile(rb"220[ -]\S+ ESMTP mailauth\b")


# The options of the endpoint types Twisted parses itself.
_OPTIONS = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "interface", "backlog"),
    "unix": ("address", "mode", "backlog", "lockfile"),
    "systemd": ("domain", "index", "name"),
}


@attrs.frozen
class Endpoint:
    """
    One endpoint of the configuration, as parsed.

    @ivar section: C{listener:NAME}, C{metrics} or C{autoconfig}.
    @ivar tcp: for a TCP endpoint, the (interface, port) it binds.
    @ivar smtpTLS: for an SMTP listener without PROXY protocol, whether it
        speaks TLS at once (for recognising a running mailauth), else
        L{None}.
    """

    section: str
    description: str
    tcp: Optional[tuple] = None
    smtpTLS: Optional[bool] = None

    def where(self, cfg: configmod.Config) -> str:
        return f"{place(cfg, self.section, 'endpoint')}: {self.description!r}"


def listenProblem(error: BaseException) -> str:
    """The reason an endpoint could not listen, in words: C{Address already in use}."""
    reason = getattr(error, "socketError", error)
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _parserMessage(kind: str, error: Exception) -> str:
    """Twisted's endpoint parser errors, said in the configuration's terms."""
    text = str(error)
    known = ", ".join(_OPTIONS.get(kind, ()))
    m = re.search(r"unexpected keyword argument '(\w+)'", text)
    if m and m.group(1) in _OPTIONS.get(kind, ()):
        return f"option {m.group(1)!r} needs a newer Twisted"
    if m:
        return f"unknown option {m.group(1)!r}" + (f" (known: {known})" if known else "")
    m = re.search(r"missing \d+ required positional argument: '(\w+)'", text)
    if m:
        return f"the {m.group(1)} is missing"
    if re.search(r"takes .* positional arguments? but \d+ were given", text):
        return "too many ':'-separated values" + (f" (options: {known})" if known else "")
    m = re.fullmatch(r"invalid literal for int\(\) with base (\d+): (.*)", text)
    if m:
        return f"{m.group(2)} is not a{'n octal' if m.group(1) == '8' else ' whole'} number"
    return text


def _systemdSyntax(description: str) -> Optional[str]:
    """Check a C{systemd:} endpoint's options without the sockets systemd passes."""
    options = dict(part.partition("=")[::2] for part in description.split(":")[1:])
    unknown = [key for key in options if key not in _OPTIONS["systemd"]]
    if unknown:
        return f"unknown option {unknown[0]!r} (known: {', '.join(_OPTIONS['systemd'])})"
    if options.get("domain") not in ("INET", "INET6", "UNIX"):
        return "domain= must be INET, INET6 or UNIX"
    if ("index" in options) == ("name" in options):
        return "give exactly one of index= and name="
    if "index" in options and not options["index"].isdigit():
        return f"index={options['index']} is not a whole number"
    return None


def parseEndpoint(
    cfg: configmod.Config, section: str, description: str, daemon: bool
) -> tuple[Optional[str], Optional[Endpoint]]:
    """
    Parse C{description} with Twisted's own C{serverFromString}, listening
    on a L{MemoryReactor} (which listens on nothing), then check what the
    parser accepts but listening would refuse.

    @param daemon: the daemon is starting: a C{systemd:} endpoint must name
        a socket systemd passed (check-config, not started by systemd,
        checks its options only).
    @return: an error line, or the parsed L{Endpoint}.
    """
    kind = description.split(":", 1)[0]
    where = f"{place(cfg, section, 'endpoint')}: {description!r}"
    if kind != kind.lower():
        return f"{where}: write the endpoint type in lower case: {kind.lower()}:", None
    if kind == "systemd":
        why = _systemdSyntax(description)
        if why is not None:
            return f"{where}: {why}", None
        if not daemon:
            return None, Endpoint(section, description)
    reactor = MemoryReactor()
    try:
        endpoints.serverFromString(reactor, description).listen(Factory())
    except (IndexError, KeyError):
        return (
            f"{where}: systemd passed no such socket: start mailauth through its "
            "socket unit, or use a tcp: endpoint"
        ), None
    except Exception as e:
        return f"{where}: {_parserMessage(kind, e)}", None
    tcp = None
    if reactor.tcpServers:
        port, _, _, interface = reactor.tcpServers[0]
        if not 0 <= port <= 65535:
            return f"{where}: {port} is not a port number (0 to 65535)", None
        tcp = (interface, port)
    if reactor.unixServers:
        address = os.path.abspath(reactor.unixServers[0][0])
        folder = os.path.dirname(address)
        if not os.path.isdir(folder):
            return f"{where}: cannot listen: {folder}: no such folder", None
        if os.path.exists(address) and not stat.S_ISSOCK(os.stat(address).st_mode):
            return f"{where}: cannot listen: {address} exists and is not a socket", None
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"{where}: cannot listen: {folder}: permission denied", None
    smtpTLS = None
    listener = next((x for x in cfg.listeners if f"listener:{x.name}" == section), None)
    if listener is not None and listener.proxy_protocol == "no":
        smtpTLS = listener.tls == "implicit"
    return None, Endpoint(section, description, tcp, smtpTLS)


def configuredEndpoints(cfg: configmod.Config) -> list[tuple[str, str]]:
    """Every (section, endpoint string) the daemon listens on."""
    found = [(f"listener:{x.name}", x.endpoint) for x in cfg.listeners]
    if cfg.metrics is not None:
        found.append(("metrics", cfg.metrics.endpoint))
    if cfg.autoconfig is not None:
        found.append(("autoconfig", cfg.autoconfig.endpoint))
    return found


def _tryBind(interface: str, port: int) -> socket.socket:
    """
    Bind and listen on (C{interface}, C{port}) as Twisted's C{listenTCP}
    would (the address family from the interface, C{SO_REUSEADDR}).

    @raise OSError: as Twisted's listening would.
    """
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((interface, port))
        # Listening too, so that two endpoints of this configuration on one
        # port collide here as they would in the daemon.
        s.listen(1)
    except BaseException:
        s.close()
        raise
    return s


def greetsAsMailauth(
    interface: str, port: int, useTLS: bool, timeout: float = PROBE_TIMEOUT
) -> bool:
    """
    Whether a mailauth daemon answers on (C{interface}, C{port}): its
    greeting is C{220 HOSTNAME ESMTP mailauth}, over TLS at once for an
    implicit TLS listener.
    """
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(interface, interface)
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            conn: socket.socket = raw
            if useTLS:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                conn = context.wrap_socket(raw)
            greeting = conn.recv(512)
            conn.sendall(b"QUIT\r\n")
    except (OSError, ssl.SSLError):
        return False
    return _GREETING.match(greeting) is not None


def checkListening(cfg: configmod.Config, daemon: bool) -> Findings:
    """
    Parse every endpoint, and bind every TCP port for a moment on its
    interface.

    @param daemon: the daemon is starting, so a port in use is an error
        even when a running mailauth holds it, and so is a port this user
        may not bind. For check-config a port held by a running mailauth
        (its greeting on one of the listeners says so) is a note: the
        daemon restarting frees it. A port below 1024 it may not bind is
        a warning: the daemon may run as root or with
        CAP_NET_BIND_SERVICE.
    """
    errors: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []
    parsed: list[tuple[Endpoint, str, int]] = []
    for section, description in configuredEndpoints(cfg):
        error, endpoint = parseEndpoint(cfg, section, description, daemon)
        if error is not None:
            errors.append(error)
        elif endpoint is not None and endpoint.tcp is not None and endpoint.tcp[1] != 0:
            parsed.append((endpoint, *endpoint.tcp))
    held: list[socket.socket] = []
    inUse: list[tuple[Endpoint, str, int, str]] = []
    try:
        for endpoint, interface, port in parsed:
            try:
                held.append(_tryBind(interface, port))
            except OSError as e:
                why = f"{endpoint.where(cfg)}: cannot listen: {listenProblem(e)}"
                if e.errno == errno.EADDRINUSE:
                    inUse.append((endpoint, interface, port, why))
                elif e.errno == errno.EACCES and not daemon:
                    warnings.append(
                        f"{endpoint.where(cfg)}: warning: could not try it: "
                        f"{listenProblem(e)} (the daemon needs root or "
                        "CAP_NET_BIND_SERVICE to listen there)"
                    )
                else:
                    errors.append(why)
    finally:
        for s in held:
            s.close()
    running = None
    if inUse and not daemon:
        running = next(
            (
                e
                for e, interface, port, _ in inUse
                if e.smtpTLS is not None and greetsAsMailauth(interface, port, e.smtpTLS)
            ),
            None,
        )
    for endpoint, _, _, why in inUse:
        if running is None:
            errors.append(why)
        else:
            notes.append(
                f"{endpoint.where(cfg)}: in use, by the running mailauth (it answers "
                f"on [{running.section}]): not tried"
            )
    return Findings(tuple(errors), tuple(warnings), tuple(notes))
