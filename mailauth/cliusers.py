"""
C{mailauth user ...}: users, their passwords, suspension and app passwords,
in the users file or in PostgreSQL.
"""

from __future__ import annotations

import argparse
import configparser
import os
import time
from typing import Any, Optional

import attrs

from mailauth import apppasswords, pgusers, userdb
from mailauth.commandline import (
    DEFAULT_CONFIG,
    CommandError,
    Console,
    configPath,
    loadConfig,
    qualityOptions,
    schemeOption,
    when,
)
from mailauth.config import ConfigError, parseInt
from mailauth.passwords import makeHash
from mailauth.pwquality import (
    BreachedListError,
    PasswordPolicy,
    PasswordRefused,
    checkBreachedList,
)
from mailauth.userstore import describe, storeFor

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
    return UserSettings(
        users,
        path,
        PasswordPolicy(minLength, breached),
        frozenset(d.lower().rstrip(".") for d in domains) or None,
    )


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
                cfg.auth.users,
                path,
                PasswordPolicy(cfg.auth.password_min_length, cfg.auth.breached_passwords),
                cfg.delivery.local_domains,
            )
    if pgusers.isPostgreSQL(settings.users):
        try:
            pgusers.checkURI(settings.users)
        except ValueError as e:
            raise CommandError(str(e)) from None
    return settings


def hashPassword(password: bytes, scheme: str, login: Optional[str] = None) -> str:
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
    return hashPassword(password, args.scheme, args.login)


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
        if account is not None and account.allowNets is not None:
            extras.append(f"allow_nets={account.allowNets}")
        if account is not None and account.allowRealNets is not None:
            extras.append(f"allow_real_nets={account.allowRealNets}")
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
    hashString = hashPassword(normalised, apppasswords.SCHEME)
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
            shown = when(used) if used is not None else "never"
        console.stdout.write(f"{app.label:<{width}}  {when(app.created)}  {shown}\n")


def _appPasswordDel(args: argparse.Namespace, console: Console) -> None:
    store, where = _store(args, console)
    store.deleteAppPassword(args.login, args.label)
    console.stdout.write(f"{args.login}: app password {args.label} deleted from {where}\n")


def _appPasswordCommand(actions: argparse._SubParsersAction, where, login) -> None:
    label = argparse.ArgumentParser(add_help=False)
    label.add_argument(
        "label", metavar="LABEL", help="names the app password (letters, digits, '.', '_', '-')"
    )
    stateDir = argparse.ArgumentParser(add_help=False)
    stateDir.add_argument(
        "--state-dir",
        metavar="DIR",
        help="the daemon's state_dir, where last uses are kept (default: the configuration's)",
    )
    command = actions.add_parser(
        "app-password",
        help="passwords for one application each, beside the user's own",
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
        (
            "add",
            _appPasswordAdd,
            [login, label, where],
            "make an app password and print it, this once only",
        ),
        (
            "list",
            _appPasswordList,
            [login, where, stateDir],
            "list a user's app passwords: label, created, last used",
        ),
        ("del", _appPasswordDel, [login, label, where], "revoke one app password"),
    ]:
        subcommands.add_parser(
            name, parents=parents, help=text, description=text[:1].upper() + text[1:] + "."
        ).set_defaults(run=run)


def _usersOptions() -> argparse.ArgumentParser:
    """C{--users FILE} or C{--config PATH}, for the commands on the users file."""
    where = argparse.ArgumentParser(add_help=False)
    group = where.add_mutually_exclusive_group()
    group.add_argument(
        "--users",
        metavar="FILE|URI",
        help="the users file, or a postgresql:// user database, instead of the configuration's",
    )
    group.add_argument(
        "--config",
        metavar="PATH",
        help=f"the configuration naming the users file or database (default {DEFAULT_CONFIG})",
    )
    return where


def _utf8Login(text: str) -> str:
    """A login argument: bytes that are not UTF-8 (which no client could send) are refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not UTF-8") from None
    return text


def _loginArgument() -> argparse.ArgumentParser:
    login = argparse.ArgumentParser(add_help=False)
    login.add_argument(
        "login",
        metavar="LOGIN",
        type=_utf8Login,
        help="the full address, like alice@example.org",
    )
    return login


def userCommand(commands: argparse._SubParsersAction) -> None:
    where = _usersOptions()
    scheme = schemeOption()
    quality = qualityOptions()
    login = _loginArgument()
    user = commands.add_parser(
        "user",
        help="add, change, delete, list, suspend users; their app passwords",
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
        (
            "add",
            _userAdd,
            [login, scheme, quality, where],
            "add a user; the password is read from the terminal or standard input",
        ),
        ("passwd", _userPasswd, [login, scheme, quality, where], "set a user's password"),
        ("del", _userDel, [login, where], "delete a user"),
        (
            "list",
            _userList,
            [where],
            "list the users, their password schemes, suspensions and app passwords",
        ),
        ("suspend", _suspend, [login, where], "refuse a user's logins until resumed"),
        ("resume", _resume, [login, where], "lift a user's suspension"),
    ]:
        actions.add_parser(
            name, parents=parents, help=text, description=text[:1].upper() + text[1:] + "."
        ).set_defaults(run=run)
    _appPasswordCommand(actions, where, login)
