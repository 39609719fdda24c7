"""
The C{mailauth} admin command: users, password hashes, configuration
checks, the forward queue, the PostgreSQL schema and DKIM keys.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import sys
import time
from typing import Optional

from mailauth import pgusers, queueadmin, userdb
from mailauth.checks import Account, Findings, checkAll
from mailauth.cliusers import hashPassword, userCommand
from mailauth.commandline import (  # noqa: F401 (Console and CommandError are the API)
    DEFAULT_CONFIG,
    CommandError,
    Console,
    Parser,
    UsageError,
    configOption,
    configPath,
    loadConfig,
    schemeOption,
    when,
)
from mailauth.config import ConfigError

# The version in setup.cfg, for a tree that is not installed (a test keeps
# the two equal).
SOURCE_VERSION = "0.2.0"


def version() -> str:
    """The installed package's version, else L{SOURCE_VERSION}."""
    try:
        return importlib.metadata.version("mailauth")
    except importlib.metadata.PackageNotFoundError:
        return SOURCE_VERSION


# -- mailauth hash ------------------------------------------------------------


def _hashRun(args: argparse.Namespace, console: Console) -> None:
    console.stdout.write(hashPassword(console.readPassword(), args.scheme, args.user) + "\n")


def _hashCommand(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "hash",
        parents=[schemeOption()],
        help="print a password hash, like doveadm pw",
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
        "check-config",
        parents=[configOption("everything")],
        help="check a configuration as the daemon would at start",
        description="Check a configuration and what it names as twistd mailauth would at "
        "start: the files load, the endpoints parse and their ports are free, the "
        "certificate is in date, the key is not encrypted, the daemon's user can write "
        "state_dir and the Maildirs. Prints one line per problem and exits 1 on errors; "
        "warnings say 'warning' and exit 0. A port held by a running mailauth (its greeting "
        "says so) is not an error.",
    )
    command.add_argument(
        "--uid",
        metavar="USER",
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

    def say(line: str) -> None:
        console.stdout.write(f"{pgusers.redact(users)}: {line}\n")

    before, after = pgusers.initSchema(users, say=say)
    if before == after:
        done = f"the mailauth schema is up to date (version {after})"
    elif before == 0:
        done = f"created the mailauth schema (version {after})"
    else:
        done = f"upgraded the mailauth schema from version {before} to {after}"
    console.stdout.write(f"{pgusers.redact(users)}: {done}\n")


def _dbCommand(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "db",
        help="manage the PostgreSQL user database",
        description="Manage the PostgreSQL database that [auth] users = postgresql://... names.",
    )
    actions = command.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = actions.add_parser(
        "init",
        parents=[configOption("the database")],
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
            raise CommandError(
                f"{cfg.path}: no [relay] section, so mail for other domains is "
                "refused and nothing is ever queued"
            )
        stateDir = cfg.server.state_dir
    if not os.path.isdir(stateDir):
        raise CommandError(f"{stateDir}: no such folder (is it the daemon's state_dir?)")
    directory = os.path.join(stateDir, "queue")
    if not os.path.isdir(directory):
        raise CommandError(
            f"{directory}: no such folder: the daemon makes it when it "
            "starts with a [relay] section"
        )
    return directory


def _queueList(args: argparse.Namespace, console: Console) -> None:
    messages, unreadable = queueadmin.readQueue(_queueDirectory(args))
    for m in messages:
        console.stdout.write(
            f"{m['id']}  {m['size']:>9}  {when(m['arrival'])}  <{m['sender']}>"
            f"  attempts={m['attempts']} next={when(m['next_attempt'])}\n"
        )
        for r in m["recipients"]:
            why = r["error"] or r["reply"] or ""
            console.stdout.write(f"    {r['state']:<9} <{r['address']}>  {why}".rstrip() + "\n")
    for msgid, why in unreadable:
        console.stdout.write(f"{msgid}  not sent: {why}\n")
    if unreadable:
        console.stdout.write(
            f"-- {len(messages)} message(s) in the queue; {len(unreadable)} cannot be sent"
            " ('mailauth queue delete ID' removes one)\n"
        )
    else:
        console.stdout.write(f"-- {len(messages)} message(s) in the queue\n")


def _queueFlush(args: argparse.Namespace, console: Console) -> None:
    count = queueadmin.flushQueue(_queueDirectory(args))
    console.stdout.write(f"{count} message(s) due now; the daemon sends them shortly\n")


def _queueDelete(args: argparse.Namespace, console: Console) -> None:
    if not queueadmin.deleteMessage(_queueDirectory(args), args.id):
        raise CommandError(f"no message {args.id} in the queue")
    console.stdout.write(f"{args.id}: deleted\n")


def _queueCommand(commands: argparse._SubParsersAction) -> None:
    where = argparse.ArgumentParser(add_help=False)
    group = where.add_mutually_exclusive_group()
    group.add_argument(
        "--config",
        metavar="PATH",
        help=f"the configuration naming state_dir (default {DEFAULT_CONFIG})",
    )
    group.add_argument(
        "--state-dir", metavar="DIR", help="the daemon's state_dir, instead of the configuration's"
    )
    command = commands.add_parser(
        "queue",
        help="inspect and drive the forward queue",
        description="Inspect and drive the queue of mail for other domains, which the daemon "
        "forwards to [relay]. Works beside the running daemon.",
    )
    actions = command.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, run, text in [
        ("list", _queueList, "list queued messages, their recipients and last errors"),
        ("flush", _queueFlush, "make every message due now; the daemon retries them shortly"),
    ]:
        actions.add_parser(
            name, parents=[where], help=text, description=text[:1].upper() + text[1:] + "."
        ).set_defaults(run=run)
    delete = actions.add_parser(
        "delete",
        parents=[where],
        help="delete a queued message, without a bounce",
        description="Delete a queued message, without a bounce.",
    )
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
        "dkim",
        help="DKIM signing keys",
        description="Make the keys that [dkim] signs outgoing mail with.",
    )
    actions = command.add_subparsers(dest="action", metavar="ACTION", required=True)
    keygen = actions.add_parser(
        "keygen",
        help="write a new key as DIR/DOMAIN.SELECTOR.pem and print its DNS record",
        description="Write a new signing key as DIR/DOMAIN.SELECTOR.pem (mode 0640) and print "
        "the DNS TXT record to publish and the [dkim] line to add.",
    )
    keygen.add_argument("domain", metavar="DOMAIN", help="the signing domain, like example.org")
    keygen.add_argument(
        "--selector",
        metavar="S",
        help="default: mailYYYYMM (this month; with an e added for ed25519)",
    )
    keygen.add_argument(
        "--type",
        choices=("rsa", "ed25519"),
        default="rsa",
        help="rsa (2048 bits, the default: every receiver verifies it) or "
        "ed25519 (RFC 8463: many receivers ignore it, so sign with both)",
    )
    keygen.add_argument(
        "--keydir",
        metavar="DIR",
        default="/etc/mailauth/dkim",
        help="where to write the key (default /etc/mailauth/dkim)",
    )
    keygen.set_defaults(run=_dkimKeygen)


# Each adds one subcommand whose "run" default is called with (args, console).
# A command that reads the configuration takes --config from configOption()
# (or _usersOptions()) and reads it with loadConfig(args), so that every
# command defaults to DEFAULT_CONFIG alike; every command, option and argument
# has a help line and every command a description (tests.test_cli.HelpTests).
_COMMANDS = (
    userCommand,
    _hashCommand,
    _checkConfigCommand,
    _dbCommand,
    _queueCommand,
    _dkimCommand,
)


def _makeParser(defaultConfig: str) -> argparse.ArgumentParser:
    """The C{mailauth} command line, one subcommand per L{_COMMANDS} entry."""
    parser = Parser(
        prog="mailauth",
        description="Administer mailauth, the SMTP submission server: its users, its "
        "configuration and its forward queue. The daemon itself runs as twistd mailauth "
        "--config PATH.",
        epilog=f"The commands that read the configuration read {DEFAULT_CONFIG} unless"
        " given --config PATH.\n"
        "Run 'mailauth COMMAND --help' for a command's options.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"mailauth {version()}",
        help="print the version and exit",
    )
    parser.set_defaults(defaultConfig=defaultConfig)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(commands)
    return parser


def main(
    argv: Optional[list[str]] = None,
    console: Optional[Console] = None,
    defaultConfig: str = DEFAULT_CONFIG,
) -> int:
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
    except UsageError as e:
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
