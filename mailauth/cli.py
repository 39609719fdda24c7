"""The C{mailauth} admin command: users, password hashes and configuration checks."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from typing import Any, BinaryIO, Callable, NoReturn, Optional, TextIO

import attrs

from mailauth import apppasswords, pgusers, spool, userdb
from mailauth.checks import checkFiles, warnings
from mailauth.config import ConfigError, load
from mailauth.passwords import DEFAULT_SCHEME, SCHEMES, makeHash, schemeName
from mailauth.pwquality import (
    BreachedListError,
    PasswordPolicy,
    PasswordRefused,
    checkBreachedList,
)
from mailauth.userstore import describe, storeFor


class CommandError(Exception):
    """A failure the command reports as one line, C{mailauth: message}, exiting 1."""


class _UsageError(Exception):
    """The command line is wrong; the message is argparse's usage and error text."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Raise rather than exit, so main() writes to its console and returns.
        raise _UsageError(f"{self.format_usage()}{self.prog}: error: {message}\n")


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


def _usersPath(args: argparse.Namespace) -> str:
    """The users file or PostgreSQL URI the command works on."""
    users = args.users if args.users is not None else load(args.config).auth.users
    if pgusers.isPostgreSQL(users):
        try:
            pgusers.checkURI(users)
        except ValueError as e:
            raise CommandError(str(e)) from None
    return users


def _hash(password: bytes, scheme: str, login: Optional[str] = None) -> str:
    try:
        return makeHash(password, scheme, login)
    except ValueError as e:
        raise CommandError(str(e)) from None


def _policy(args: argparse.Namespace) -> PasswordPolicy:
    """
    The options, else the configuration's [auth] keys, else the defaults;
    a breached list that cannot be searched fails here, before a password
    is asked for.
    """
    policy = PasswordPolicy()
    if args.config is not None:
        auth = load(args.config).auth
        policy = PasswordPolicy(auth.password_min_length, auth.breached_passwords)
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
    users = _usersPath(args)
    store = storeFor(users, creating=True)
    userdb.checkLogin(args.login)
    # Fail before asking for a password; addUser checks again.
    if store.hasUser(args.login):
        raise CommandError(f"user {args.login} already exists in {describe(users)}")
    policy = _policy(args)
    store.addUser(args.login, _newPassword(args, console, policy))
    console.stdout.write(f"{args.login}: added to {describe(users)}\n")


def _userPasswd(args: argparse.Namespace, console: Console) -> None:
    users = _usersPath(args)
    store = storeFor(users)
    if not store.hasUser(args.login):
        raise CommandError(f"no user {args.login} in {describe(users)}")
    policy = _policy(args)
    store.setPassword(args.login, _newPassword(args, console, policy))
    console.stdout.write(f"{args.login}: password changed in {describe(users)}\n")


def _userDel(args: argparse.Namespace, console: Console) -> None:
    users = _usersPath(args)
    storeFor(users).deleteUser(args.login)
    console.stdout.write(f"{args.login}: deleted from {describe(users)}\n")


def _userList(args: argparse.Namespace, console: Console) -> None:
    store = _store(args)[0]
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


def _store(args: argparse.Namespace) -> tuple[Any, str]:
    """
    The store to edit (an C{IUserStore} and C{IAccountStore}), and how to
    name it; a users file's app password uses are read from C{--state-dir},
    or the configuration's C{state_dir}, if either is known.
    """
    users = _usersPath(args)
    stateDir = getattr(args, "state_dir", None)
    if stateDir is None and args.config is not None:
        stateDir = load(args.config).server.state_dir
    lastUsed = os.path.join(stateDir, apppasswords.LAST_USED_FILE) if stateDir else None
    return storeFor(users, lastUsedPath=lastUsed), describe(users)


def _suspend(args: argparse.Namespace, console: Console) -> None:
    store, where = _store(args)
    store.setSuspended(args.login, True)
    console.stdout.write(f"{args.login}: suspended in {where}\n")


def _resume(args: argparse.Namespace, console: Console) -> None:
    store, where = _store(args)
    store.setSuspended(args.login, False)
    console.stdout.write(f"{args.login}: resumed in {where}\n")


# -- mailauth user app-password ... ------------------------------------------


def _appPasswordAdd(args: argparse.Namespace, console: Console) -> None:
    try:
        apppasswords.checkLabel(args.label)
    except apppasswords.AppPasswordError as e:
        raise CommandError(str(e)) from None
    store, where = _store(args)
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
    store, _ = _store(args)
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
    store, where = _store(args)
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
        "app-password", help="passwords for one application each, beside the user's own"
    )
    subcommands = command.add_subparsers(dest="appAction", metavar="ACTION", required=True)
    for name, run, parents, text in [
        ("add", _appPasswordAdd, [login, label, where],
         "make an app password and print it (only this once)"),
        ("list", _appPasswordList, [login, where, stateDir],
         "list a user's app passwords: label, created, last used"),
        ("del", _appPasswordDel, [login, label, where], "revoke one app password"),
    ]:
        subcommands.add_parser(name, parents=parents, help=text).set_defaults(run=run)


def _userCommand(commands: argparse._SubParsersAction) -> None:
    where = argparse.ArgumentParser(add_help=False)
    group = where.add_mutually_exclusive_group(required=True)
    group.add_argument("--users", metavar="FILE|URI",
                       help="the users file, or a postgresql:// user database")
    group.add_argument("--config", metavar="PATH",
                       help="the configuration naming the users file or database")
    scheme = _schemeOption()
    quality = _qualityOptions()
    login = argparse.ArgumentParser(add_help=False)
    login.add_argument("login", metavar="LOGIN", help="the full address, like alice@example.org")

    user = commands.add_parser("user", help="manage the users file or database")
    actions = user.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, run, parents, text in [
        ("add", _userAdd, [login, scheme, quality, where], "add a user; the password is read"),
        ("passwd", _userPasswd, [login, scheme, quality, where], "set a user's password"),
        ("del", _userDel, [login, where], "delete a user"),
        ("list", _userList, [where],
         "list the users, their password schemes, suspensions and app passwords"),
        ("suspend", _suspend, [login, where], "refuse a user's logins until resumed"),
        ("resume", _resume, [login, where], "lift a user's suspension"),
    ]:
        actions.add_parser(name, parents=parents, help=text).set_defaults(run=run)
    _appPasswordCommand(actions, where, login)


# -- mailauth hash ------------------------------------------------------------


def _hashRun(args: argparse.Namespace, console: Console) -> None:
    console.stdout.write(_hash(console.readPassword(), args.scheme, args.user) + "\n")


def _hashCommand(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "hash", parents=[_schemeOption()], help="print a password hash, like doveadm pw"
    )
    command.add_argument(
        "-u", "--user", metavar="LOGIN", help="the login the hash is for (DIGEST-MD5 needs it)"
    )
    command.set_defaults(run=_hashRun)


# -- mailauth check-config ----------------------------------------------------


def _checkConfigRun(args: argparse.Namespace, console: Console) -> None:
    cfg = load(args.config)
    problems = checkFiles(cfg)
    if not problems and pgusers.isPostgreSQL(cfg.auth.users):
        problem = pgusers.checkDatabase(cfg.auth.users)
        if problem is not None:
            problems.append(f"{cfg.path}: [auth] users: {problem}")
    if problems:
        raise ConfigError(problems)
    for warning in warnings(cfg):
        console.stderr.write(f"warning: {warning}\n")
    console.stdout.write(f"{args.config}: OK\n")


def _checkConfigCommand(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser("check-config", help="validate a configuration file")
    command.add_argument("--config", metavar="PATH", required=True)
    command.set_defaults(run=_checkConfigRun)


# -- mailauth db init ---------------------------------------------------------


def _dbInit(args: argparse.Namespace, console: Console) -> None:
    users = load(args.config).auth.users
    if not pgusers.isPostgreSQL(users):
        raise CommandError(
            f"{args.config}: [auth] users is a file ({users}), not a postgresql:// URI:"
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
    command = commands.add_parser("db", help="manage the PostgreSQL user database")
    actions = command.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = actions.add_parser(
        "init", help="create or upgrade the schema that users = postgresql://... reads"
    )
    init.add_argument("--config", metavar="PATH", required=True)
    init.set_defaults(run=_dbInit)


# -- mailauth queue -----------------------------------------------------------

DEFAULT_CONFIG = "/etc/mailauth/mailauth.conf"


def _queueDirectory(args: argparse.Namespace) -> str:
    stateDir = args.state_dir or load(args.config or DEFAULT_CONFIG).server.state_dir
    return os.path.join(stateDir, "queue")


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
    group.add_argument("--state-dir", metavar="DIR", help="the daemon's state_dir")
    command = commands.add_parser("queue", help="inspect and drive the forward queue")
    actions = command.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", parents=[where], help="list queued messages").set_defaults(
        run=_queueList
    )
    actions.add_parser("flush", parents=[where], help="retry every message now").set_defaults(
        run=_queueFlush
    )
    delete = actions.add_parser("delete", parents=[where], help="delete a queued message")
    delete.add_argument("id", metavar="ID")
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
    command = commands.add_parser("dkim", help="DKIM signing keys")
    actions = command.add_subparsers(dest="action", metavar="ACTION", required=True)
    keygen = actions.add_parser(
        "keygen", help="write a new key as DIR/DOMAIN.SELECTOR.pem and print its DNS record"
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
_COMMANDS = (_userCommand, _hashCommand, _checkConfigCommand, _dbCommand, _queueCommand,
             _dkimCommand)


def _makeParser() -> argparse.ArgumentParser:
    """The C{mailauth} command line, one subcommand per L{_COMMANDS} entry."""
    parser = _Parser(prog="mailauth", description="Administer mailauth.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(commands)
    return parser


def main(argv: Optional[list[str]] = None, console: Optional[Console] = None) -> int:
    """
    Run the C{mailauth} command.

    @param argv: the arguments after the program name; default C{sys.argv}.
    @param console: where to read and write; default the process's own.
    @return: the exit status: 0, 1 for an error (reported as one line
        C{mailauth: message}, or one line per configuration problem) or 2 for
        a wrong command line.
    """
    if console is None:
        console = Console(sys.stdin.buffer, sys.stdout, sys.stderr)
    try:
        args = _makeParser().parse_args(argv)
    except _UsageError as e:
        console.stderr.write(str(e))
        return 2
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
