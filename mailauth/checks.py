"""
What a configuration needs beyond its text: files that load, endpoints that
Twisted parses and can listen on, folders the daemon's user can write,
certificates in date. C{mailauth check-config} and the daemon's start
(L{mailauth.tap.Options.postOptions}) both run L{checkAll}, so the one
predicts the other.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import socket
import ssl
import stat
import time
from typing import Optional, Union

import attrs
from twisted.internet import endpoints
from twisted.internet.abstract import isIPv6Address
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor

from mailauth import config as configmod
from mailauth import scram
from mailauth.addresses import domainKey
from mailauth.addressmap import AddressMap
from mailauth.limits import LimitOverrides
from mailauth.passwords import CRAM_MD5_SCHEMES, PLAINTEXT_SCHEMES
from mailauth.pgusers import checkSetup, isPostgreSQL
from mailauth.relay import RelayError, loadCertificates
from mailauth.tls import ReloadableTLS, TLSError, notAfter
from mailauth.userdb import decodeFile, parseUsers, unenforcedFields

# A certificate that expires sooner than this is warned about.
EXPIRY_WARNING = 30 * 86400
# How long check-config waits for a running daemon to greet on a port in use.
PROBE_TIMEOUT = 3.0

_GREETING = re.compile(rb"220[ -]\S+ ESMTP mailauth\b")

#: The stored schemes each mechanism can verify; a mechanism not named here
#: (PLAIN, LOGIN, OAUTHBEARER...) works whatever the scheme.
MECHANISM_SCHEMES = {
    "CRAM-MD5": CRAM_MD5_SCHEMES,
    **{name: (name.removesuffix("-PLUS"),) for name in scram.MECHANISMS},
}


@attrs.frozen
class Findings:
    """
    What the checks found, each a line ready to print.

    @ivar errors: what stops the daemon from starting.
    @ivar warnings: what it starts with but complains about; each line
        says C{warning:}.
    @ivar notes: what was not checked, and why (check-config only).
    """

    errors: tuple = ()
    warnings: tuple = ()
    notes: tuple = ()

    def __add__(self, other: Findings) -> Findings:
        return Findings(
            self.errors + other.errors, self.warnings + other.warnings, self.notes + other.notes
        )


def _where(cfg: configmod.Config, section: str, key: Optional[str] = None) -> str:
    return f"{cfg.path}: [{section}]" + (f" {key}" if key else "")


# -- whom the daemon runs as ---------------------------------------------------


@attrs.frozen
class Account:
    """
    The user the daemon runs as, for permission checks. The account of this
    process is checked with C{os.access} (which knows ACLs and read-only
    mounts); another user's from the mode bits, owner and groups, as the
    kernel would, without switching user.
    """

    name: str
    uid: int
    gid: int
    groups: frozenset = frozenset()
    isProcess: bool = False

    @classmethod
    def ofProcess(cls) -> Account:
        """This process's effective user."""
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return cls(name, uid, os.getegid(), frozenset(os.getgroups()), True)

    @classmethod
    def lookup(cls, user: Union[str, int], gid: Optional[int] = None) -> Account:
        """
        The user that C{twistd --uid USER [--gid GID]} runs as: a name or a
        number, its primary group unless C{gid} is given, and its
        supplementary groups (twistd calls C{initgroups}).

        @raise KeyError: naming the user, if there is no such user (a
            number without a passwd entry is accepted with a C{gid}).
        """
        text = str(user)
        try:
            entry = pwd.getpwuid(int(text)) if text.isdigit() else pwd.getpwnam(text)
        except KeyError:
            if not text.isdigit() or gid is None:
                raise KeyError(f"no user {text!r}") from None
            return cls(text, int(text), gid, frozenset([gid]))
        primary = entry.pw_gid if gid is None else gid
        return cls(
            entry.pw_name, entry.pw_uid, primary, frozenset(os.getgrouplist(entry.pw_name, primary))
        )

    def describe(self) -> str:
        return f"user {self.name} (uid {self.uid})"

    def may(self, path: str, mode: int) -> bool:
        """Whether this user may read, write or search (C{os.R_OK|W_OK|X_OK}) C{path}."""
        if self.isProcess:
            return os.access(path, mode)
        st = os.stat(path)
        if mode & os.W_OK and os.statvfs(path).f_flag & os.ST_RDONLY:
            return False
        if self.uid == 0:
            return not mode & os.X_OK or stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)
        if st.st_uid == self.uid:
            bits = st.st_mode >> 6
        elif st.st_gid == self.gid or st.st_gid in self.groups:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        return bits & mode & 7 == mode


def _reach(account: Account, path: str) -> tuple[Optional[str], str]:
    """
    Walk C{path} from the root as C{account}.

    @return: why it cannot get there (L{None} if it can), and the deepest
        folder of C{path} that exists.
    """
    current = os.sep
    for part in [p for p in os.path.realpath(path).split(os.sep) if p]:
        if not account.may(current, os.X_OK):
            return f"{account.describe()} cannot enter {current}", current
        following = os.path.join(current, part)
        if not os.path.exists(following):
            break
        if not os.path.isdir(following):
            return f"{following} is not a folder", current
        current = following
    return None, current


def folderProblem(account: Account, path: str) -> Optional[str]:
    """
    Why C{account} could not create files in the folder C{path}, making it
    and its missing parents first; L{None} if it could.
    """
    why, deepest = _reach(account, path)
    if why is None and not account.may(deepest, os.W_OK | os.X_OK):
        made = "" if deepest == os.path.realpath(path) else f" to make {path}"
        why = f"{account.describe()} cannot write {deepest}{made}"
    return why


def maildirRoots(template: str, domains: frozenset) -> list[str]:
    """
    The folders in which the daemon makes users' Maildirs: the part of the
    C{[delivery] maildir} template before the first per-user field, for
    each local domain.
    """
    marker = "\0"
    roots: list[str] = []
    for domain in sorted(domains):
        fixed = template.format(domain=domain, localpart=marker, user=marker).split(marker)[0]
        root = os.path.abspath(fixed if fixed.endswith(os.sep) else os.path.dirname(fixed))
        if root not in roots:
            roots.append(root)
    return roots


def checkFolders(cfg: configmod.Config, account: Account, chown: bool) -> Findings:
    """
    The state directory and the Maildir roots can be written by C{account}.

    @param chown: the daemon starts as root and gives the state directory
        to C{account} (C{twistd --uid}), so that user needs only to reach it.
    """
    errors = []
    state = cfg.server.state_dir
    why = _reach(account, state)[0] if chown else folderProblem(account, state)
    if why is not None:
        errors.append(f"{_where(cfg, 'server', 'state_dir')}: {state}: {why}")
    for root in maildirRoots(cfg.delivery.maildir, cfg.delivery.local_domains):
        why = folderProblem(account, root)
        if why is not None:
            errors.append(
                f"{_where(cfg, 'delivery', 'maildir')}: {root}: {why}, "
                "so no new Maildir can be made there"
            )
    return Findings(errors=tuple(errors))


def readProblem(account: Account, path: str) -> Optional[str]:
    """Why C{account} could not read the file C{path}; L{None} if it could."""
    why, _ = _reach(account, os.path.dirname(os.path.realpath(path)))
    if why is None and os.path.exists(path) and not account.may(path, os.R_OK):
        why = f"{account.describe()} cannot read it"
    return why


def checkReadable(cfg: configmod.Config, account: Account, chown: bool) -> Findings:
    """
    Under twistd --uid the daemon reads its files at start as root, then
    as C{account}: the relay's password and CA files when it relays
    (errors), the others when they change or on SIGHUP (warnings; errors
    with C{[server] workers} above 1, whose workers start as C{account}).
    Without --uid, L{checkFiles} checks them as the user who runs the daemon.
    """
    if not chown:
        return Findings()
    errors, warnings = [], []
    later = [
        ("auth", "users", None if isPostgreSQL(cfg.auth.users) else cfg.auth.users),
        ("delivery", "aliases", cfg.delivery.aliases),
        ("delivery", "sender_map", cfg.delivery.sender_map),
    ]
    if cfg.tls is not None:
        later += [
            ("tls", "certificate", cfg.tls.certificate),
            ("tls", "private_key", cfg.tls.private_key),
        ]
    for section, key, path in later:
        why = readProblem(account, path) if path is not None else None
        if why is not None and cfg.server.workers > 1:
            errors.append(
                f"{_where(cfg, section, key)}: {path}: {why}, and the workers "
                f"([server] workers = {cfg.server.workers}) read it as that user"
            )
        elif why is not None:
            warnings.append(
                f"{_where(cfg, section, key)}: warning: {path}: {why}, so the "
                "daemon cannot read it again when it changes or on SIGHUP"
            )
    if cfg.relay is not None:
        for key in ("password_file", "ca_file"):
            path = getattr(cfg.relay, key)
            why = readProblem(account, path) if path is not None else None
            if why is not None:
                errors.append(
                    f"{_where(cfg, 'relay', key)}: {path}: {why}, so the daemon cannot relay"
                )
    return Findings(tuple(errors), tuple(warnings))


# -- files -------------------------------------------------------------------


def checkFiles(cfg: configmod.Config) -> list:
    """
    What L{configmod.load} cannot see from the text alone: the certificate
    and key load and match, the users file and maps are readable, the
    relay's CA file holds certificates, every DKIM key can sign.

    @return: one line per problem.
    """
    problems = []
    if cfg.tls is not None:
        try:
            ReloadableTLS(cfg.tls.certificate, cfg.tls.private_key)
        except TLSError as e:
            problems.append(f"{cfg.path}: [tls]: {e}")
    usersFile = None if isPostgreSQL(cfg.auth.users) else cfg.auth.users
    if usersFile is None and (problem := checkSetup(cfg.auth.users)) is not None:
        problems.append(f"{cfg.path}: [auth] users: {problem}")
    files = [
        ("auth", "users", usersFile),
        ("delivery", "aliases", cfg.delivery.aliases),
        ("delivery", "sender_map", cfg.delivery.sender_map),
        ("limits", "overrides", cfg.limits.overrides),
    ]
    if cfg.relay is not None:
        files.append(("relay", "password_file", cfg.relay.password_file))
        files.append(("relay", "ca_file", cfg.relay.ca_file))
    if cfg.oauth is not None:
        files.append(("oauth", "jwks", cfg.oauth.jwks))
        files.append(("oauth", "introspection_secret_file", cfg.oauth.introspection_secret_file))
    for section, key, path in files:
        if path is not None and (why := _notAFile(path)) is not None:
            problems.append(f"{cfg.path}: [{section}] {key}: {path}: {why}")
        elif key == "ca_file" and path is not None:
            try:
                loadCertificates(path)
            except RelayError as e:
                problems.append(f"{cfg.path}: [relay] ca_file: {e}")
        elif (section, key) == ("oauth", "jwks") and path is not None:
            problems.extend(f"{cfg.path}: [oauth] jwks: {p}" for p in _jwksProblems(path))
    if cfg.dkim:
        # Only with [dkim]: it needs dkimpy, which config.load checked for.
        from mailauth import dkimsign

        try:
            dkimsign.loadKeys(cfg)
        except configmod.ConfigError as e:
            problems.extend(e.problems)
    for listener in cfg.listeners:
        needsTLS = cfg.auth.plaintext_requires_tls
        if listener.tls == "none" and listener.auth == "required" and needsTLS:
            problems.append(
                f"{cfg.path}: [listener:{listener.name}] auth: required, but with tls = none "
                "and plaintext_requires_tls = yes nobody could log in"
            )
    return problems


def _jwksProblems(path: str) -> list:
    """Why the JWKS file at C{path} gives no key to check tokens with, if it does not."""
    from mailauth.oauth import parseJWKS

    try:
        with open(path, "rb") as f:
            parseJWKS(f.read())
    except (OSError, ValueError) as e:
        return [f"{path}: {e.strerror if isinstance(e, OSError) else e}"]
    return []


def checkRehash(cfg: configmod.Config, account: Account) -> Findings:
    """
    C{[auth] rehash = yes} with a users file in a folder that C{account}
    cannot write (the Debian unit mounts /etc read-only): the daemon runs,
    but can rehash no password. A warning.
    """
    if not cfg.auth.rehash or isPostgreSQL(cfg.auth.users):
        return Findings()
    folder = os.path.dirname(os.path.abspath(cfg.auth.users))
    why = folderProblem(account, folder)
    if why is None:
        return Findings()
    return Findings(
        warnings=(
            f"{_where(cfg, 'auth', 'rehash')}: warning: {why}, so no password can be rehashed;"
            " keep the users file where the daemon may write (e.g. /var/lib/mailauth/users)",
        )
    )


def checkCertificate(cfg: configmod.Config, now: float) -> Findings:
    """An expired certificate is an error; one that expires within 30 days a warning."""
    if cfg.tls is None:
        return Findings()
    path = cfg.tls.certificate
    try:
        expires = notAfter(path)
    except TLSError:
        return Findings()  # checkFiles says why
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires))
    where = _where(cfg, "tls", "certificate")
    if expires <= now:
        return Findings(errors=(f"{where}: {path}: expired on {date}: renew it",))
    if expires - now < EXPIRY_WARNING:
        days = int((expires - now) // 86400)
        return Findings(
            warnings=(f"{where}: warning: {path}: expires on {date}, in {days} day(s): renew it",)
        )
    return Findings()


def _skipped(problem: str) -> str:
    """C{PATH:LINENO: message} as a warning line."""
    location, _, message = problem.partition(": ")
    return f"{location}: warning: {message}; the daemon skips this line"


def checkLines(cfg: configmod.Config) -> Findings:
    """
    The lines of the users file, aliases, sender map and sending limit
    overrides that the daemon would skip, the users with plaintext passwords, an [autoconfig] that
    names no server to read mail from: all warnings, which the daemon logs
    itself when it loads them.
    """
    warnings: list[str] = []
    for path in (cfg.delivery.aliases, cfg.delivery.sender_map):
        if path is not None and _notAFile(path) is None:
            loaded = AddressMap(path)
            warnings.extend(_skipped(problem) for problem in loaded.problems)
            if path == cfg.delivery.aliases and cfg.relay is None:
                warnings.extend(_unforwardable(path, loaded, cfg.delivery.local_domains))
    path = cfg.limits.overrides
    if path is not None and _notAFile(path) is None:
        warnings.extend(_skipped(problem) for problem in LimitOverrides(path).problems)
    if cfg.autoconfig is not None and not cfg.autoconfig.incoming:
        warnings.append(
            f"{_where(cfg, 'autoconfig', 'incoming')}: warning: not set: Thunderbird and "
            "Outlook discard a setup that names no IMAP or POP3 server"
        )
    return checkUsers(cfg) + Findings(warnings=tuple(warnings))


def _unforwardable(path: str, aliases: AddressMap, localDomains) -> list[str]:
    """
    Aliases whose targets are in other domains, without a C{[relay]} to
    forward to: mail for them gets 451 at every RCPT, and senders retry for
    days. A warning, as the daemon only finds out per message.
    """
    local = {domainKey(domain) for domain in localDomains}
    return [
        f"{path}: warning: {key}: {target} is in another domain and there is no [relay]: "
        f"mail to {key} gets 451 4.3.0"
        for key, targets in aliases.items()
        for target in targets
        if target.rpartition("@")[2] not in local
    ]


def _notAFile(path: str) -> Optional[str]:
    """
    Why C{path} cannot be read as a file (a directory passed C{os.access}
    and left the daemon half working), or L{None}. Nothing is opened: a
    FIFO would block. A device reads as a file (C{/dev/null}: no users, for
    a node whose logins are all OAuth).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "cannot be read"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "is a FIFO or socket, not a file (reading it would wait for a writer)"
    return None if os.access(path, os.R_OK) else "cannot be read"


def _usersFile(cfg: configmod.Config) -> Optional[tuple]:
    """
    The users file parsed as the daemon parses it: C{(users, problems,
    text)}, or L{None} for a PostgreSQL user database or a file that cannot
    be read (L{checkFiles} says why).
    """
    path = cfg.auth.users
    if isPostgreSQL(path):
        return None
    try:
        with open(path, "rb") as f:
            text = decodeFile(f.read())
    except OSError:
        return None
    return (*parseUsers(text, path), text)


def checkUsers(cfg: configmod.Config) -> Findings:
    """
    The lines of the users file the daemon would skip, and its plaintext
    passwords: both warnings, which the daemon logs when it loads the file.
    """
    parsed = _usersFile(cfg)
    if parsed is None:
        return Findings()
    users, problems, text = parsed
    path = cfg.auth.users
    warnings = [_skipped(problem) for problem in problems]
    for note in unenforcedFields(text, path):
        location, _, message = note.partition(": ")
        warnings.append(f"{location}: warning: {message}")
    plaintext = [u.login for u in users.values() if u.password.scheme in PLAINTEXT_SCHEMES]
    if plaintext:
        warnings.append(
            f"{_where(cfg, 'auth', 'users')}: warning: {path}: {len(plaintext)} user(s) with "
            f"plaintext passwords: {' '.join(plaintext)}; set a hashed one with "
            "'mailauth user passwd'"
        )
    return Findings(warnings=tuple(warnings))


def mechanismWarnings(cfg: configmod.Config, users: list) -> list:
    """
    One line for each offered mechanism that some users cannot use: their
    clients may pick it (curl picks CRAM-MD5 when offered) and then fail,
    although their password is right.

    @param users: C{(login, scheme)} of every user.
    """
    warnings = []
    for mechanism in cfg.auth.mechanisms:
        schemes = MECHANISM_SCHEMES.get(mechanism)
        if schemes is None:
            continue
        unable = [scheme for _, scheme in users if scheme not in schemes]
        if unable:
            warnings.append(
                f"{_where(cfg, 'auth', 'mechanisms')}: warning: {mechanism} is offered but "
                f"{len(unable)} of {len(users)} users cannot use it (stored as "
                f"{', '.join(sorted(set(unable)))}), so clients that pick it fail for them; "
                f"offer it only if every user is stored as {', '.join(schemes)}"
            )
    return warnings


def checkMechanisms(cfg: configmod.Config) -> Findings:
    """
    The mechanisms offered that some users of the users file cannot use,
    as warnings (a PostgreSQL user database is not read for this).
    """
    parsed = _usersFile(cfg)
    if parsed is None:
        return Findings()
    users = parsed[0]
    found = [(user.login, user.password.scheme) for user in users.values()]
    return Findings(warnings=tuple(mechanismWarnings(cfg, found)))


# -- endpoints -----------------------------------------------------------------

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
        return f"{_where(cfg, self.section, 'endpoint')}: {self.description!r}"


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
    where = f"{_where(cfg, section, 'endpoint')}: {description!r}"
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


def checkAll(
    cfg: configmod.Config,
    account: Account,
    *,
    chown: bool = False,
    daemon: bool = False,
    now: Optional[float] = None,
) -> Findings:
    """
    Everything the daemon would refuse or warn about at start.

    @param account: the user the daemon runs as once its ports are bound.
    @param chown: the daemon starts as root and gives its state directory
        to C{account}.
    @param daemon: the daemon itself is starting: what it logs on its own
        when it loads the users file is left out, and see
        L{checkListening}.
    @param now: the time to check certificates against (default: now).
    """
    findings = Findings(errors=tuple(checkFiles(cfg)))
    findings += checkCertificate(cfg, time.time() if now is None else now)
    findings += checkListening(cfg, daemon)
    findings += checkFolders(cfg, account, chown)
    findings += checkReadable(cfg, account, chown)
    findings += checkRehash(cfg, account)
    findings += checkMechanisms(cfg)
    if not daemon:
        findings += checkLines(cfg)
    return findings
