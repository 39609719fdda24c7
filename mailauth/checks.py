"""
What a configuration needs beyond its text: files that load, endpoints that
Twisted parses and can listen on (L{mailauth.listening}), folders the
daemon's user can write, certificates in date. C{mailauth check-config} and the daemon's start
(L{mailauth.tap.Options.postOptions}) both run L{checkAll}, so the one
predicts the other.
"""

from __future__ import annotations

import os
import pwd
import stat
import time
from typing import Optional, Union

import attrs

from mailauth import config as configmod
from mailauth import scram
from mailauth.addresses import domainKey
from mailauth.addressmap import AddressMap
from mailauth.findings import Findings, place
from mailauth.limits import LimitOverrides
from mailauth.listening import checkListening
from mailauth.passwords import CRAM_MD5_SCHEMES, PLAINTEXT_SCHEMES
from mailauth.pgusers import checkSetup, isPostgreSQL
from mailauth.relay import RelayError, loadCertificates
from mailauth.tls import EXPIRY_WARNING, ReloadableTLS, TLSError, expiryDate, notAfter
from mailauth.userdb import decodeFile, parseUsers

#: The stored schemes each mechanism can verify; a mechanism not named here
#: (PLAIN, LOGIN, OAUTHBEARER...) works whatever the scheme.
MECHANISM_SCHEMES = {
    "CRAM-MD5": CRAM_MD5_SCHEMES,
    **{name: (name.removesuffix("-PLUS"),) for name in scram.MECHANISMS},
}


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
        errors.append(f"{place(cfg, 'server', 'state_dir')}: {state}: {why}")
    for root in maildirRoots(cfg.delivery.maildir, cfg.delivery.local_domains):
        why = folderProblem(account, root)
        if why is not None:
            errors.append(
                f"{place(cfg, 'delivery', 'maildir')}: {root}: {why}, "
                "so no new Maildir can be made there"
            )
    return Findings(errors=tuple(errors))


def checkRelativePaths(cfg: configmod.Config) -> Findings:
    """
    A relative C{state_dir} or C{maildir} template is found from the folder
    the daemon happens to start in: the checkout for C{make run}, C{/} for a
    systemd unit without C{WorkingDirectory=}, and C{mailauth queue} or
    C{user app-password list} run from another shell look for the state in
    yet another place. Postfix can insist on an absolute C{queue_directory},
    as its daemons change into it; mailauth stays in the folder it was
    started in, so a relative path has a meaning (C{make run}'s demo runs
    from the checkout), just a fragile one: a warning, naming where it
    leads from here, not a refusal.
    """
    warnings = []
    for section, key, path in (
        ("server", "state_dir", cfg.server.state_dir),
        ("delivery", "maildir", cfg.delivery.maildir),
    ):
        if not os.path.isabs(path):
            warnings.append(
                f"{place(cfg, section, key)}: warning: {path} is relative to the folder each "
                f"process starts in ({os.path.abspath(path)} from this one, under / for a "
                "systemd unit): use an absolute path"
            )
    return Findings(warnings=tuple(warnings))


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
                f"{place(cfg, section, key)}: {path}: {why}, and the workers "
                f"([server] workers = {cfg.server.workers}) read it as that user"
            )
        elif why is not None:
            warnings.append(
                f"{place(cfg, section, key)}: warning: {path}: {why}, so the "
                "daemon cannot read it again when it changes or on SIGHUP"
            )
    if cfg.relay is not None:
        for key in ("password_file", "ca_file"):
            path = getattr(cfg.relay, key)
            why = readProblem(account, path) if path is not None else None
            if why is not None:
                errors.append(
                    f"{place(cfg, 'relay', key)}: {path}: {why}, so the daemon cannot relay"
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
            f"{place(cfg, 'auth', 'rehash')}: warning: {why}, so no password can be rehashed;"
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
    date = expiryDate(expires)
    where = place(cfg, "tls", "certificate")
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
            if path == cfg.delivery.aliases:
                warnings.extend(_deadAliases(cfg, loaded))
    path = cfg.limits.overrides
    if path is not None and _notAFile(path) is None:
        warnings.extend(_skipped(problem) for problem in LimitOverrides(path).problems)
    if cfg.autoconfig is not None and not cfg.autoconfig.incoming:
        warnings.append(
            f"{place(cfg, 'autoconfig', 'incoming')}: warning: not set: Thunderbird and "
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


def _deadAliases(cfg: configmod.Config, aliases: AddressMap) -> list[str]:
    """
    With a users file: aliases that never apply because their address is a
    user's (the user's Maildir wins), and local targets that are no user
    and no alias, whose share of the mail goes nowhere (the RCPT is
    accepted for the alias's other targets, so nobody is told).
    """
    parsed = _usersFile(cfg)
    if parsed is None:
        return []
    users = parsed[0]
    local = {domainKey(domain) for domain in cfg.delivery.local_domains}
    path = cfg.delivery.aliases
    warnings = [
        f"{path}: warning: {key} is a user: this alias is never used "
        "(mail to a user goes to their Maildir)"
        for key, _ in aliases.items()
        if key in users
    ]
    for key, targets in aliases.items():
        for target in targets:
            domain = target.rpartition("@")[2]
            if domain not in local or target in users or aliases.get(target):
                continue
            if target.startswith("postmaster@") and cfg.delivery.postmaster:
                continue
            warnings.append(
                f"{path}: warning: {key}: {target} is no user and no alias: mail for it is dropped"
            )
    return warnings


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
    The users file parsed as the daemon parses it: C{(users, problems)}, or
    L{None} for a PostgreSQL user database or a file that cannot be read
    (L{checkFiles} says why).
    """
    path = cfg.auth.users
    if isPostgreSQL(path):
        return None
    try:
        with open(path, "rb") as f:
            text = decodeFile(f.read())
    except OSError:
        return None
    return parseUsers(text, path)


def checkUsers(cfg: configmod.Config) -> Findings:
    """
    The lines of the users file the daemon would skip, and its plaintext
    passwords: both warnings, which the daemon logs when it loads the file.
    """
    parsed = _usersFile(cfg)
    if parsed is None:
        return Findings()
    users, problems = parsed
    path = cfg.auth.users
    warnings = [_skipped(problem) for problem in problems]
    plaintext = [u.login for u in users.values() if u.password.scheme in PLAINTEXT_SCHEMES]
    if plaintext:
        warnings.append(
            f"{place(cfg, 'auth', 'users')}: warning: {path}: {len(plaintext)} user(s) with "
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
                f"{place(cfg, 'auth', 'mechanisms')}: warning: {mechanism} is offered but "
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
    users, _ = parsed
    found = [(user.login, user.password.scheme) for user in users.values()]
    return Findings(warnings=tuple(mechanismWarnings(cfg, found)))


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
    findings += checkRelativePaths(cfg)
    findings += checkFolders(cfg, account, chown)
    findings += checkReadable(cfg, account, chown)
    findings += checkRehash(cfg, account)
    findings += checkMechanisms(cfg)
    if not daemon:
        findings += checkLines(cfg)
    return findings
