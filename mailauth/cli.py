"""
The C{mailauth} admin command: users, password hashes, configuration
checks, the forward queue, the PostgreSQL schema and DKIM keys.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import getpass
import importlib.metadata
import os
import sys
import time
from typing import Any, BinaryIO, Callable, NoReturn, Optional, TextIO

import attrs

from mailauth import apppasswords, pgusers, spool, userdb
from mailauth.checks import Account, Findings, checkAll
from mailauth.config import Config, ConfigError, load, parseInt
from mailauth.passwords import DEFAULT_SCHEME, SCHEMES, makeHash, schemeName
from mailauth.pwquality import (
    BreachedListError,
    PasswordPolicy,
    PasswordRefused,
    checkBreachedList,
)
from mailauth.userstore import describe, storeFor

DEFAULT_CONFIG = "/etc/mailauth/mailauth.conf"
# The version in setup.cfg, for a tree that is not installed (a test keeps
# the two equal).
SOURCE_VERSION = "0.2.0"


def version() -> str:
    """The installed package's version, else L{SOURCE_VERSION}."""
    try:
        return importlib.metadata.version("mailauth")
    except importlib.metadata.PackageNotFoundError:
        return SOURCE_VERSION


class CommandError(Exception):
    """A failure the command reports as one line, C{mailauth: message}, exiting 1."""


class _UsageError(Exception):
    """The command line is wrong; the message is argparse's usage and error text."""


class _Formatter(argparse.HelpFormatter):
    """Wraps each line of a description as a paragraph; keeps indented lines (examples)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line if line.startswith(" ") else
                         super(_Formatter, self)._fill_text(line, width, indent)
                         for line in text.split("\n"))


class _Parser(argparse.ArgumentParser):
    """The command line parser of every (sub)command: L{_Formatter}, errors raised."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        # Raise rather than exit, so main() writes to its console and returns.
        raise _UsageError(f"{self.format_usage()}{self.prog}: error: {message}\n")


def _configOption(what: str) -> argparse.ArgumentParser:
    """C{--config PATH}, defaulting to L{DEFAULT_CONFIG}: the configuration naming C{what}."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--config", metavar="PATH",
                        help=f"the configuration naming {what} (default {DEFAULT_CONFIG})")
    return parent


def configPath(args: argparse.Namespace) -> str:
    """C{--config}, else the default configuration (see L{main})."""
    return args.config or args.defaultConfig


def loadConfig(args: argparse.Namespace) -> Config:
    """
    Load the configuration that C{--config} names, else the default one.

    @raise ConfigError: if it is wrong.
    @raise CommandError: if there is no C{--config} and no default one.
    """
    if args.config is None and not os.path.exists(args.defaultConfig):
        raise CommandError(f"{args.defaultConfig}: no such file; name the configuration"
                           " with --config PATH")
    return load(configPath(args))


@attrs.frozen
class Console:
    """
    Where a command reads passwords and writes its output.

    @ivar stdin: binary standard input, read for a password unless it is a
        terminal.
    @ivar getpass: reads a password from the terminal without echo.
    """

    stdin: BinaryIO
    stdout: TextIO
    stderr: TextIO
    getpass: Callable[[str], str] = getpass.getpass

    def warn(self, message: str) -> None:
        """Say C{mailauth: warning: message} on standard error."""
        self.stderr.write(f"mailauth: warning: {message}\n")

    def readPassword(self) -> bytes:
        """
        Read a new password: from the terminal, asked twice, when standard
        input is one; else one line of standard input, without its line
        ending (nothing else is stripped: spaces may be part of a password).

        @raise CommandError: if the two differ or the password is empty.
        """
        if self.stdin.isatty():
            first = self.getpass("New password: ")
            if self.getpass("Retype new password: ") != first:
                raise CommandError("the passwords do not match")
            password = first.encode("utf-8", "surrogateescape")
        else:
            password = self.stdin.readline()
            if password.endswith(b"\n"):
                password = password[:-1].removesuffix(b"\r")
        if not password:
            raise CommandError("empty password refused")
        return password


def _scheme(text: str) -> str:
    try:
        return schemeName(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _schemeOption() -> argparse.ArgumentParser:
    """C{-s/--scheme}, for the commands that hash a password."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "-s",
        "--scheme",
        type=_scheme,
        default=DEFAULT_SCHEME,
        help=f"password scheme (default {DEFAULT_SCHEME}; known: {' '.join(SCHEMES)};"
        " add .B64 or .HEX for that encoding)",
    )
    return parent


def _minLength(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def _qualityOptions() -> argparse.ArgumentParser:
    """C{--min-length} and C{--breached}, for the commands that store a new password."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--min-length",
        metavar="N",
        type=_minLength,
        help="refuse passwords of fewer characters (default: [auth] password_min_length"
        " with --config, else 8)",
    )
    parent.add_argument(
        "--breached",
        metavar="PATH",
        help="refuse passwords in this Have I Been Pwned SHA-1 list: the file ordered by"
        " hash, or a directory of range files (default: [auth] breached_passwords)",
    )
    return parent


# -- mailauth user ... --------------------------------------------------------


@attrs.frozen
class UserSettings:
    """
    What the user commands read from the command line and the configuration.

    @ivar users: the users file, or a PostgreSQL URI.
    @ivar config: the configuration it came from, if any.
    @ivar policy: the password policy of the configuration's C{[auth]}.
    @ivar localDomains: the configuration's C{[delivery] local_domains}, if known.
    """

    users: str
    config: Optional[str] = None
    policy: PasswordPolicy = PasswordPolicy()
    localDomains: Optional[frozenset] = None


def _lenientSettings(path: str, error: ConfigError, console: Console) -> UserSettings:
    """
    Read only what the user commands need from a configuration that does
    not load: C{[auth] users}, its password policy and C{[delivery]
    local_domains}, so that a mistake in another section does not lock the
    admin out of the users file. The configuration's problems become
    warnings.

    @raise ConfigError: C{error}, if those keys cannot be read either.
    """
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(";", "#"), empty_lines_in_values=False
    )
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=path)
        users = parser.get("auth", "users", fallback="").strip()
        minLength = parseInt(parser.get("auth", "password_min_length", fallback="8"))
    except (OSError, UnicodeDecodeError, configparser.Error, ValueError):
        raise error from None
    if not users:
        raise error
    breached = parser.get("auth", "breached_passwords", fallback="").strip() or None
    domains = parser.get("delivery", "local_domains", fallback="").replace(",", " ").split()
    for problem in error.problems:
        console.warn(problem)
    console.warn(f"{path} has the problems above; using its [auth] users = {users} anyway")
    return UserSettings(users, path, PasswordPolicy(minLength, breached),
                        frozenset(d.lower().rstrip(".") for d in domains) or None)


def _userSettings(args: argparse.Namespace, console: Console) -> UserSettings:
    """
    The users file or PostgreSQL URI, and the policy: from C{--users}, else
    from the configuration.
    """
    if args.users is not None:
        settings = UserSettings(args.users)
    else:
        path = configPath(args)
        try:
            cfg = loadConfig(args)
        except ConfigError as e:
            settings = _lenientSettings(path, e, console)
        else:
            settings = UserSettings(
                cfg.auth.users, path,
                PasswordPolicy(cfg.auth.password_min_length, cfg.auth.breached_passwords),
                cfg.delivery.local_domains)
    if pgusers.isPostgreSQL(settings.users):
        try:
            pgusers.checkURI(settings.users)
        except ValueError as e:
            raise CommandError(str(e)) from None
    return settings


def _hash(password: bytes, scheme: str, login: Optional[str] = None) -> str:
    try:
        return makeHash(password, scheme, login)
    except ValueError as e:
        raise CommandError(str(e)) from None


def _policy(args: argparse.Namespace, settings: UserSettings) -> PasswordPolicy:
    """
    The options, else the configuration's [auth] keys, else the defaults;
    a breached list that cannot be searched fails here, before a password
    is asked for.
    """
    policy = settings.policy
    if args.min_length is not None:
        policy = attrs.evolve(policy, minLength=args.min_length)
    if args.breached is not None:
        policy = attrs.evolve(policy, breached=args.breached)
    if policy.breached is not None:
        try:
            checkBreachedList(policy.breached)
        except BreachedListError as e:
            raise CommandError(str(e)) from None
    return policy


def _newPassword(args: argparse.Namespace, console: Console, policy: PasswordPolicy) -> str:
    """Read a new password, check it against C{policy}, and hash it."""
    password = console.readPassword()
    try:
        policy.check(password)
    except (PasswordRefused, BreachedListError) as e:
        raise CommandError(str(e)) from None
    return _hash(password, args.scheme, args.login)


def _userAdd(args: argparse.Namespace, console: Console) -> None:
    userdb.checkLogin(args.login)
    settings = _userSettings(args, console)
    users = settings.users
    store = storeFor(users, creating=True)
    domain = args.login.rpartition("@")[2].lower()
    if settings.localDomains is not None and domain not in settings.localDomains:
        console.warn(
            f"{domain} is not one of the local_domains of {settings.config} "
            f"({' '.join(sorted(settings.localDomains))}): {args.login} can log in and send, "
            "but mail to it is not delivered here"
        )
    # Fail before asking for a password; addUser checks again.
    if store.hasUser(args.login):
        raise CommandError(f"user {args.login} already exists in {describe(users)}")
    policy = _policy(args, settings)
    store.addUser(args.login, _newPassword(args, console, policy))
    console.stdout.write(f"{args.login}: added to {describe(users)}\n")


def _userPasswd(args: argparse.Namespace, console: Console) -> None:
    settings = _userSettings(args, console)
    users = settings.users
    store = storeFor(users)
    if not store.hasUser(args.login):
        raise CommandError(f"no user {args.login} in {describe(users)}")
    policy = _policy(args, settings)
    store.setPassword(args.login, _newPassword(args, console, policy))
    console.stdout.write(f"{args.login}: password changed in {describe(users)}\n")


def _userDel(args: argparse.Namespace, console: Console) -> None:
    users = _userSettings(args, console).users
    storeFor(users).deleteUser(args.login)
    console.stdout.write(f"{args.login}: deleted from {describe(users)}\n")


def _userList(args: argparse.Namespace, console: Console) -> None:
    store = _store(args, console)[0]
    users = store.listUsers()
    accounts = {user.login: user for user in store.listAccounts()}
    width = max((len(login) for login, _ in users), default=0)
    schemeWidth = max((len(scheme) for _, scheme in users), default=0)
    for login, scheme in users:
        extras = []
        account = accounts.get(login)
        if account is not None and account.suspended:
            extras.append("suspended")
        if account is not None and account.appPasswords:
            labels = ", ".join(app.label for app in account.appPasswords)
            extras.append(f"app passwords: {labels}")
        line = f"{login:<{width}}  {scheme:<{schemeWidth}}  {'  '.join(extras)}"
        console.stdout.write(line.rstrip() + "\n")


def _store(args: argparse.Namespace, console: Console) -> tuple[Any, str]:
    """
    The store to edit (an C{IUserStore} and C{IAccountStore}), and how to
    name it; a users file's app password uses are read from C{--state-dir},
    or the configuration's C{state_dir}, if either is known.
    """
    settings = _userSettings(args, console)
    stateDir = getattr(args, "state_dir", None)
    if stateDir is None and settings.config is not None:
        try:
            stateDir = loadConfig(args).server.state_dir
        except ConfigError:
            stateDir = None  # _userSettings has warned about the configuration
    lastUsed = os.path.join(stateDir, apppasswords.LAST_USED_FILE) if stateDir else None
    return storeFor(settings.users, lastUsedPath=lastUsed), describe(settings.users)


def _suspend(args: argparse.Namespace, console: Console) -> None:
    store, where = _store(args, console)
    store.setSuspended(args.login, True)
    console.stdout.write(f"{args.login}: suspended in {where}\n")


def _resume(args: argparse.Namespace, console: Console) -> None:
    store, where = _store(args, console)
    store.setSuspended(args.login, False)
    console.stdout.write(f"{args.login}: resumed in {where}\n")


# -- mailauth user app-password ... ------------------------------------------


def _appPasswordAdd(args: argparse.Namespace, console: Console) -> None:
    try:
        apppasswords.checkLabel(args.label)
    except apppasswords.AppPasswordError as e:
        raise CommandError(str(e)) from None
    store, where = _store(args, console)
    taken = {app.prefix for app, _ in store.listAppPasswords(args.login)}
    while True:
        password = apppasswords.generate()
        normalised = apppasswords.normalise(password.encode("ascii"))
        assert normalised is not None, "generate() makes what normalise() reads"
        prefix = apppasswords.prefixOf(normalised)
        if prefix not in taken:
            break
    hashString = _hash(normalised, apppasswords.SCHEME)
    store.addAppPassword(args.login, args.label, hashString, int(time.time()), prefix)
    console.stderr.write(
        f"{args.login}: app password {args.label} added to {where}; it is shown only now:\n"
    )
    console.stdout.write(password + "\n")


def _appPasswordList(args: argparse.Namespace, console: Console) -> None:
    store, _ = _store(args, console)
    found = store.listAppPasswords(args.login)
    width = max([len("LABEL")] + [len(app.label) for app, _ in found])
    console.stdout.write(f"{'LABEL':<{width}}  {'CREATED':<19}  LAST USED\n")
    for app, used in found:
        if not store.usesKnown:
            shown = "unknown (give --config or --state-dir)"
        else:
            shown = _when(used) if used is not None else "never"
        console.stdout.write(f"{app.label:<{width}}  {_when(app.created)}  {shown}\n")


def _appPasswordDel(args: argparse.Namespace, console: Console) -> None:
    store, where = _store(args, console)
    store.deleteAppPassword(args.login, args.label)
    console.stdout.write(f"{args.login}: app password {args.label} deleted from {where}\n")


def _appPasswordCommand(actions: argparse._SubParsersAction, where, login) -> None:
    label = argparse.ArgumentParser(add_help=False)
    label.add_argument("label", metavar="LABEL",
                       help="names the app password (letters, digits, '.', '_', '-')")
    stateDir = argparse.ArgumentParser(add_help=False)
    stateDir.add_argument("--state-dir", metavar="DIR",
                          help="the daemon's state_dir, where last uses are kept"
                          " (default: the configuration's)")
    command = actions.add_parser(
        "app-password", help="passwords for one application each, beside the user's own",
        description="App passwords: generated passwords that log a user in with PLAIN or "
        "LOGIN beside its own, each named by a label (shown in the log and the Received "
        "header) and revoked alone. See docs/accounts.rst.",
        epilog="examples:\n"
        "  mailauth user app-password add alice@example.org phone\n"
        "  mailauth user app-password list alice@example.org\n"
        "  mailauth user app-password del alice@example.org phone",
    )
    subcommands = command.add_subparsers(dest="appAction", metavar="ACTION", required=True)
    for name, run, parents, text in [
        ("add", _appPasswordAdd, [login, label, where],
         "make an app password and print it, this once only"),
        ("list", _appPasswordList, [login, where, stateDir],
         "list a user's app passwords: label, created, last used"),
        ("del", _appPasswordDel, [login, label, where], "revoke one app password"),
    ]:
        subcommands.add_parser(name, parents=parents, help=text, description=text[:1].upper()
                               + text[1:] + ".").set_defaults(run=run)


def _usersOptions() -> argparse.ArgumentParser:
    """C{--users FILE} or C{--config PATH}, for the commands on the users file."""
    where = argparse.ArgumentParser(add_help=False)
    group = where.add_mutually_exclusive_group()
    group.add_argument("--users", metavar="FILE|URI", help="the users file, or a "
                       "postgresql:// user database, instead of the configuration's")
    group.add_argument("--config", metavar="PATH", help="the configuration naming the users "
                       f"file or database (default {DEFAULT_CONFIG})")
    return where


def _loginArgument() -> argparse.ArgumentParser:
    login = argparse.ArgumentParser(add_help=False)
    login.add_argument("login", metavar="LOGIN", help="the full address, like alice@example.org")
    return login


def _userCommand(commands: argparse._SubParsersAction) -> None:
    where = _usersOptions()
    scheme = _schemeOption()
    quality = _qualityOptions()
    login = _loginArgument()
    user = commands.add_parser(
        "user", help="add, change, delete, list, suspend users; their app passwords",
        description="Manage the users that [auth] users names: a file in Dovecot's "
        "passwd-file format, or a PostgreSQL database. A new password is read from the "
        "terminal, asked twice, or as one line of standard input.",
        epilog="examples:\n"
        "  mailauth user add alice@example.org\n"
        "  echo 'a long password' | mailauth user passwd alice@example.org\n"
        "  mailauth user list --users /etc/mailauth/users\n"
        "  mailauth user suspend alice@example.org\n"
        "  mailauth user app-password add alice@example.org phone",
    )
    actions = user.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, run, parents, text in [
        ("add", _userAdd, [login, scheme, quality, where],
         "add a user; the password is read from the terminal or standard input"),
        ("passwd", _userPasswd, [login, scheme, quality, where], "set a user's password"),
        ("del", _userDel, [login, where], "delete a user"),
        ("list", _userList, [where],
         "list the users, their password schemes, suspensions and app passwords"),
        ("suspend", _suspend, [login, where], "refuse a user's logins until resumed"),
        ("resume", _resume, [login, where], "lift a user's suspension"),
    ]:
        actions.add_parser(name, parents=parents, help=text, description=text[:1].upper()
                           + text[1:] + ".").set_defaults(run=run)
    _appPasswordCommand(actions, where, login)


# -- mailauth hash ------------------------------------------------------------


def _hashRun(args: argparse.Namespace, console: Console) -> None:
    console.stdout.write(_hash(console.readPassword(), args.scheme, args.user) + "\n")


def _hashCommand(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "hash", parents=[_schemeOption()], help="print a password hash, like doveadm pw",
        description="Print the hash of a password read from standard input (or the"
        " terminal), for a users file line or a PostgreSQL users table.",
    )
    command.add_argument(
        "-u", "--user", metavar="LOGIN", help="the login the hash is for (DIGEST-MD5 needs it)"
    )
    command.set_defaults(run=_hashRun)


# -- mailauth check-config ----------------------------------------------------


def _checkConfigRun(args: argparse.Namespace, console: Console) -> None:
    cfg = loadConfig(args)
    if args.uid is None:
        account = Account.ofProcess()
    else:
        try:
            account = Account.lookup(args.uid)
        except KeyError as e:
            raise CommandError(f"--uid: {e.args[0]}") from None
    findings = checkAll(cfg, account, chown=args.uid is not None)
    if not findings.errors and pgusers.isPostgreSQL(cfg.auth.users):
        problem = pgusers.checkDatabase(cfg.auth.users)
        if problem is not None:
            findings += Findings(errors=(f"{cfg.path}: [auth] users: {problem}",))
    for note in findings.notes:
        console.stdout.write(note + "\n")
    for line in findings.errors + findings.warnings:
        console.stderr.write(line + "\n")
    if findings.errors:
        raise ConfigError(())
    warned = f", with {len(findings.warnings)} warning(s)" if findings.warnings else ""
    console.stdout.write(f"{cfg.path}: OK{warned}\n")


def _checkConfigCommand(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "check-config", parents=[_configOption("everything")],
        help="check a configuration as the daemon would at start",
        description="Check a configuration and what it names as twistd mailauth would at "
        "start: the files load, the endpoints parse and their ports are free, the "
        "certificate is in date, the key is not encrypted, the daemon's user can write "
        "state_dir and the Maildirs. Prints one line per problem and exits 1 on errors; "
        "warnings say 'warning' and exit 0. A port held by a running mailauth (its greeting "
        "says so) is not an error.",
    )
    command.add_argument(
        "--uid", metavar="USER",
        help="the user the daemon runs as (twistd --uid USER, started as root): check "
        "that it can reach state_dir, make Maildirs, and read the files it reads again "
        "later (default: the user running this)",
    )
    command.set_defaults(run=_checkConfigRun)


# -- mailauth db init ---------------------------------------------------------


def _dbInit(args: argparse.Namespace, console: Console) -> None:
    cfg = loadConfig(args)
    users = cfg.auth.users
    if not pgusers.isPostgreSQL(users):
        raise CommandError(
            f"{cfg.path}: [auth] users is a file ({users}), not a postgresql:// URI:"
            " there is no database to initialise"
        )
    before, after = pgusers.initSchema(users)
    if before == after:
        done = f"the mailauth schema is up to date (version {after})"
    elif before == 0:
        done = f"created the mailauth schema (version {after})"
    else:
        done = f"upgraded the mailauth schema from version {before} to {after}"
    console.stdout.write(f"{pgusers.redact(users)}: {done}\n")


def _dbCommand(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "db", help="manage the PostgreSQL user database",
        description="Manage the PostgreSQL database that [auth] users = postgresql://... names.",
    )
    actions = command.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = actions.add_parser(
        "init", parents=[_configOption("the database")],
        help="create or upgrade the schema that users = postgresql://... reads",
        description="Create the mailauth tables in the database, or upgrade them to this "
        "version's schema; the user commands then work on it.",
    )
    init.set_defaults(run=_dbInit)


# -- mailauth queue -----------------------------------------------------------


def _queueDirectory(args: argparse.Namespace) -> str:
    """
    The queue folder under the state directory that C{--state-dir} or the
    configuration names.

    @raise CommandError: if there is none, rather than calling it empty.
    """
    if args.state_dir is not None:
        stateDir = args.state_dir
    else:
        cfg = loadConfig(args)
        if cfg.relay is None:
            raise CommandError(f"{cfg.path}: no [relay] section, so mail for other domains is "
                               "refused and nothing is ever queued")
        stateDir = cfg.server.state_dir
    if not os.path.isdir(stateDir):
        raise CommandError(f"{stateDir}: no such folder (is it the daemon's state_dir?)")
    directory = os.path.join(stateDir, "queue")
    if not os.path.isdir(directory):
        raise CommandError(f"{directory}: no such folder: the daemon makes it when it "
                           "starts with a [relay] section")
    return directory


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def _queueList(args: argparse.Namespace, console: Console) -> None:
    messages = spool.listQueue(_queueDirectory(args))
    for m in messages:
        console.stdout.write(
            f"{m['id']}  {m['size']:>9}  {_when(m['arrival'])}  <{m['sender']}>"
            f"  attempts={m['attempts']} next={_when(m['next_attempt'])}\n"
        )
        for r in m["recipients"]:
            why = r["error"] or r["reply"] or ""
            console.stdout.write(f"    {r['state']:<9} <{r['address']}>  {why}".rstrip() + "\n")
    console.stdout.write(f"-- {len(messages)} message(s) in the queue\n")


def _queueFlush(args: argparse.Namespace, console: Console) -> None:
    count = spool.flushQueue(_queueDirectory(args))
    console.stdout.write(f"{count} message(s) due now; the daemon sends them shortly\n")


def _queueDelete(args: argparse.Namespace, console: Console) -> None:
    if not spool.deleteMessage(_queueDirectory(args), args.id):
        raise CommandError(f"no message {args.id} in the queue")
    console.stdout.write(f"{args.id}: deleted\n")


def _queueCommand(commands: argparse._SubParsersAction) -> None:
    where = argparse.ArgumentParser(add_help=False)
    group = where.add_mutually_exclusive_group()
    group.add_argument("--config", metavar="PATH",
                       help=f"the configuration naming state_dir (default {DEFAULT_CONFIG})")
    group.add_argument("--state-dir", metavar="DIR",
                       help="the daemon's state_dir, instead of the configuration's")
    command = commands.add_parser(
        "queue", help="inspect and drive the forward queue",
        description="Inspect and drive the queue of mail for other domains, which the daemon "
        "forwards to [relay]. Works beside the running daemon.",
    )
    actions = command.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, run, text in [
        ("list", _queueList, "list queued messages, their recipients and last errors"),
        ("flush", _queueFlush, "make every message due now; the daemon retries them shortly"),
    ]:
        actions.add_parser(name, parents=[where], help=text,
                           description=text[:1].upper() + text[1:] + ".").set_defaults(run=run)
    delete = actions.add_parser("delete", parents=[where],
                                help="delete a queued message, without a bounce",
                                description="Delete a queued message, without a bounce.")
    delete.add_argument("id", metavar="ID", help="the message's ID, as queue list shows it")
    delete.set_defaults(run=_queueDelete)


# -- mailauth dkim ------------------------------------------------------------


def _dkimKeygen(args: argparse.Namespace, console: Console) -> None:
    try:
        from mailauth import dkimsign
    except ImportError as e:
        raise CommandError(
            f"{e}: DKIM needs the Python package dkimpy (Debian: apt install python3-dkim; "
            "pip: pip install 'mailauth[dkim]')"
        ) from None
    try:
        key = dkimsign.keygen(args.domain, args.selector, args.type, args.keydir, time.time())
    except ValueError as e:
        raise CommandError(str(e)) from None
    except FileExistsError as e:
        raise CommandError(
            f"{e.filename} exists; not overwritten (choose another --selector)"
        ) from None
    # Zone-file comments (;) around the record, so that it can be pasted as it is.
    console.stdout.write(
        f"; wrote {key.path}; to sign with it, add to [dkim]:\n"
        f";   {key.domain} = {key.selector}:{key.path}\n"
        f"; and publish in DNS:\n{key.zoneLine()}\n"
    )


def _dkimCommand(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "dkim", help="DKIM signing keys",
        description="Make the keys that [dkim] signs outgoing mail with.",
    )
    actions = command.add_subparsers(dest="action", metavar="ACTION", required=True)
    keygen = actions.add_parser(
        "keygen", help="write a new key as DIR/DOMAIN.SELECTOR.pem and print its DNS record",
        description="Write a new signing key as DIR/DOMAIN.SELECTOR.pem (mode 0640) and print "
        "the DNS TXT record to publish and the [dkim] line to add.",
    )
    keygen.add_argument("domain", metavar="DOMAIN", help="the signing domain, like example.org")
    keygen.add_argument("--selector", metavar="S",
                        help="default: mailYYYYMM (this month; with an e added for ed25519)")
    keygen.add_argument("--type", choices=("rsa", "ed25519"), default="rsa",
                        help="rsa (2048 bits, the default: every receiver verifies it) or "
                        "ed25519 (RFC 8463: many receivers ignore it, so sign with both)")
    keygen.add_argument("--keydir", metavar="DIR", default="/etc/mailauth/dkim",
                        help="where to write the key (default /etc/mailauth/dkim)")
    keygen.set_defaults(run=_dkimKeygen)


# Each adds one subcommand whose "run" default is called with (args, console).
# A command that reads the configuration takes --config from _configOption()
# (or _usersOptions()) and reads it with loadConfig(args), so that every
# command defaults to DEFAULT_CONFIG alike; every command, option and argument
# has a help line and every command a description (tests.test_cli.HelpTests).
_COMMANDS = (_userCommand, _hashCommand, _checkConfigCommand, _dbCommand, _queueCommand,
             _dkimCommand)


def _makeParser(defaultConfig: str) -> argparse.ArgumentParser:
    """The C{mailauth} command line, one subcommand per L{_COMMANDS} entry."""
    parser = _Parser(
        prog="mailauth",
        description="Administer mailauth, the SMTP submission server: its users, its "
        "configuration and its forward queue. The daemon itself runs as twistd mailauth "
        "--config PATH.",
        epilog=f"The commands that read the configuration read {DEFAULT_CONFIG} unless"
        " given --config PATH.\n"
        "Run 'mailauth COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"mailauth {version()}",
                        help="print the version and exit")
    parser.set_defaults(defaultConfig=defaultConfig)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(commands)
    return parser


def main(argv: Optional[list[str]] = None, console: Optional[Console] = None,
         defaultConfig: str = DEFAULT_CONFIG) -> int:
    """
    Run the C{mailauth} command.

    @param argv: the arguments after the program name; default C{sys.argv}.
    @param console: where to read and write; default the process's own.
    @param defaultConfig: the configuration read without C{--config}.
    @return: the exit status: 0, 1 for an error (reported as one line
        C{mailauth: message}, or one line per configuration problem) or 2 for
        a wrong command line.
    """
    if console is None:
        console = Console(sys.stdin.buffer, sys.stdout, sys.stderr)
    try:
        # argparse prints --help and --version on sys.stdout, then exits.
        with contextlib.redirect_stdout(console.stdout):
            args = _makeParser(defaultConfig).parse_args(argv)
    except _UsageError as e:
        console.stderr.write(str(e))
        return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    try:
        args.run(args, console)
    except ConfigError as e:
        for problem in e.problems:
            console.stderr.write(problem + "\n")
        return 1
    except (CommandError, userdb.UserDatabaseError) as e:
        console.stderr.write(f"mailauth: {e}\n")
        return 1
    except OSError as e:
        console.stderr.write(f"mailauth: {e}\n")
        return 1
    except KeyboardInterrupt:
        console.stderr.write("\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
