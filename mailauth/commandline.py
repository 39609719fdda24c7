"""
What every C{mailauth} command shares: the console it reads passwords from
and writes to, its errors, its argument parser, and the options several
commands take (C{--config}, C{--scheme}, the password quality options).
"""

from __future__ import annotations

import argparse
import getpass
import os
import time
from typing import BinaryIO, Callable, NoReturn, TextIO

import attrs

from mailauth.config import Config, load
from mailauth.passwords import DEFAULT_SCHEME, SCHEMES, schemeName

DEFAULT_CONFIG = "/etc/mailauth/mailauth.conf"


class CommandError(Exception):
    """A failure the command reports as one line, C{mailauth: message}, exiting 1."""


class UsageError(Exception):
    """The command line is wrong; the message is argparse's usage and error text."""


class Formatter(argparse.HelpFormatter):
    """Wraps each line of a description as a paragraph; keeps indented lines (examples)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(
            indent + line
            if line.startswith(" ")
            else super(Formatter, self)._fill_text(line, width, indent)
            for line in text.split("\n")
        )


class Parser(argparse.ArgumentParser):
    """The command line parser of every (sub)command: L{Formatter}, errors raised."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        # Raise rather than exit, so main() writes to its console and returns.
        raise UsageError(f"{self.format_usage()}{self.prog}: error: {message}\n")


def configOption(what: str) -> argparse.ArgumentParser:
    """C{--config PATH}, defaulting to L{DEFAULT_CONFIG}: the configuration naming C{what}."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--config",
        metavar="PATH",
        help=f"the configuration naming {what} (default {DEFAULT_CONFIG})",
    )
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
        raise CommandError(
            f"{args.defaultConfig}: no such file; name the configuration with --config PATH"
        )
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


def parseScheme(text: str) -> str:
    try:
        return schemeName(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def schemeOption() -> argparse.ArgumentParser:
    """C{-s/--scheme}, for the commands that hash a password."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "-s",
        "--scheme",
        type=parseScheme,
        default=DEFAULT_SCHEME,
        help=f"password scheme (default {DEFAULT_SCHEME}; known: {' '.join(SCHEMES)};"
        " add .B64 or .HEX for that encoding)",
    )
    return parent


def parseMinLength(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def qualityOptions() -> argparse.ArgumentParser:
    """C{--min-length} and C{--breached}, for the commands that store a new password."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--min-length",
        metavar="N",
        type=parseMinLength,
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


def when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"
