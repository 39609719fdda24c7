"""The C{mailauth} admin command: users, password hashes and configuration checks."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from typing import BinaryIO, Callable, NoReturn, Optional, TextIO

import attrs

from mailauth import apppasswords, spool, userdb
from mailauth.checks import checkFiles, warnings
from mailauth.config import ConfigError, load
from mailauth.passwords import DEFAULT_SCHEME, SCHEMES, makeHash, schemeName
from mailauth.pwquality import (
    BreachedListError,
    PasswordPolicy,
    PasswordRefused,
    checkBreachedList,
)
from mailauth.userstore import UsersFileStore


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
    if args.users is not None:
        return args.users
    return load(args.config).auth.users


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
    path = _usersPath(args)
    userdb.checkLogin(args.login)
    # Fail before asking for a password; addUser checks again under its lock.
    if os.path.exists(path) and userdb.hasUser(path, args.login):
        raise CommandError(f"user {args.login} already exists in {path}")
    policy = _policy(args)
    userdb.addUser(path, args.login, _newPassword(args, console, policy))
    console.stdout.write(f"{args.login}: added to {path}\n")


def _userPasswd(args: argparse.Namespace, console: Console) -> None:
    path = _usersPath(args)
    if not userdb.hasUser(path, args.login):
        raise CommandError(f"no user {args.login} in {path}")
    policy = _policy(args)
    userdb.setPassword(path, args.login, _newPassword(args, console, policy))
    console.stdout.write(f"{args.login}: password changed in {path}\n")


def _userDel(args: argparse.Namespace, console: Console) -> None:
    path = _usersPath(args)
    userdb.deleteUser(path, args.login)
    console.stdout.write(f"{args.login}: deleted from {path}\n")


def _userList(args: argparse.Namespace, console: Console) -> None:
    users = _store(args).listAccounts()
    width = max((len(user.login) for user in users), default=0)
    schemeWidth = max((len(user.password.scheme) for user in users), default=0)
    for user in users:
        extras = ["suspended"] if user.suspended else []
        if user.appPasswords:
            extras.append("app passwords: " + ", ".join(app.label for app in user.appPasswords))
        line = f"{user.login:<{width}}  {user.password.scheme:<{schemeWidth}}  {'  '.join(extras)}"
        console.stdout.write(line.rstrip() + "\n")


def _store(args: argparse.Namespace) -> UsersFileStore:
    """
    The users to edit; app password uses are read from C{--state-dir}, or
    the configuration's C{state_dir}, if either is known.
    """
    stateDir = getattr(args, "state_dir", None)
    if args.config is not None:
        cfg = load(args.config)
        path, stateDir = cfg.auth.users, stateDir or cfg.server.state_dir
    else:
        path = args.users
    lastUsed = os.path.join(stateDir, apppasswords.LAST_USED_FILE) if stateDir else None
    return UsersFileStore(path, lastUsedPath=lastUsed)


def _suspend(args: argparse.Namespace, console: Console) -> None:
    store = _store(args)
    store.setSuspended(args.login, True)
    console.stdout.write(f"{args.login}: suspended in {store.path}\n")


def _resume(args: argparse.Namespace, console: Console) -> None:
    store = _store(args)
    store.setSuspended(args.login, False)
    console.stdout.write(f"{args.login}: resumed in {store.path}\n")


# -- mailauth user app-password ... ------------------------------------------


def _appPasswordAdd(args: argparse.Namespace, console: Console) -> None:
    try:
        apppasswords.checkLabel(args.label)
    except apppasswords.AppPasswordError as e:
        raise CommandError(str(e)) from None
    store = _store(args)
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
        f"{args.login}: app password {args.label} added to {store.path}; it is shown only now:\n"
    )
    console.stdout.write(password + "\n")


def _appPasswordList(args: argparse.Namespace, console: Console) -> None:
    store = _store(args)
    found = store.listAppPasswords(args.login)
    width = max([len("LABEL")] + [len(app.label) for app, _ in found])
    console.stdout.write(f"{'LABEL':<{width}}  {'CREATED':<19}  LAST USED\n")
    for app, used in found:
        if store.lastUsedPath is None:
            shown = "unknown (give --config or --state-dir)"
        else:
            shown = _when(used) if used is not None else "never"
        console.stdout.write(f"{app.label:<{width}}  {_when(app.created)}  {shown}\n")


def _appPasswordDel(args: argparse.Namespace, console: Console) -> None:
    store = _store(args)
    store.deleteAppPassword(args.login, args.label)
    console.stdout.write(f"{args.login}: app password {args.label} deleted from {store.path}\n")


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
    group.add_argument("--users", metavar="FILE", help="the users file")
    group.add_argument("--config", metavar="PATH", help="the configuration naming the users file")
    scheme = _schemeOption()
    quality = _qualityOptions()
    login = argparse.ArgumentParser(add_help=False)
    login.add_argument("login", metavar="LOGIN", help="the full address, like alice@example.org")

    user = commands.add_parser("user", help="manage the users file")
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
    if problems:
        raise ConfigError(problems)
    for warning in warnings(cfg):
        console.stderr.write(f"warning: {warning}\n")
    console.stdout.write(f"{args.config}: OK\n")


def _checkConfigCommand(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser("check-config", help="validate a configuration file")
    command.add_argument("--config", metavar="PATH", required=True)
    command.set_defaults(run=_checkConfigRun)


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


# Each adds one subcommand whose "run" default is called with (args, console).
_COMMANDS = (_userCommand, _hashCommand, _checkConfigCommand, _queueCommand)


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
