"""
The reference stays complete: every configuration key is in mailauth.conf(5)
and etc/mailauth.conf, every command in mailauth(8), and the pages render.
"""

from __future__ import annotations

import argparse
import configparser
import os
import re
import shlex
import shutil
import subprocess

from twisted.trial import unittest

from mailauth import cli, config, tap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAN5 = os.path.join("man", "mailauth.conf.5")
MAN8 = os.path.join("man", "mailauth.8")
EXAMPLE = os.path.join("etc", "mailauth.conf")
DEBIAN_CONF = os.path.join("debian", "conf", "mailauth.conf")
DEBIAN_CHANGELOG = os.path.join("debian", "changelog")

# The sections whose keys are not those of config._SCHEMA: [dkim] takes
# signing domains, and every [listener:NAME] the keys of "listener".
SPECIAL_SECTIONS = ("[dkim]",)


def read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def heading(kind: str) -> str:
    """The man page's section heading for a schema section: C{[server]}, C{[listener:NAME]}."""
    return "[listener:NAME]" if kind == "listener" else f"[{kind}]"


def plain(text: str) -> str:
    """
    C{text} of a man page line without its escapes: C{\\-} as C{-},
    C{\\e} as C{\\}, font changes and zero-width characters dropped.
    """
    text = re.sub(r"\\f(?:\[[^]]*\]|\(..|.)", "", text)
    text = text.replace("\\&", "").replace("\\%", "").replace("\\e", "\\")
    return text.replace("\\-", "-").replace("\\(aq", "'").replace("\\ ", " ")


def macroText(line: str) -> str:
    """
    What a font macro line (C{.B}, C{.BI}, C{.BR} ...) prints: C{.B} and
    C{.I} join their arguments with spaces, the alternating macros without.
    """
    name, _, rest = line.partition(" ")
    # shlex reads groff's quoting; the backslashes of escapes are doubled to survive it.
    words = [plain(w) for w in shlex.split(rest.replace("\\", "\\\\"))]
    return " ".join(words) if name in (".B", ".I") else "".join(words)


def manSections(text: str) -> dict:
    """
    The man page cut at its C{.SH} headings: heading -> list of its
    C{.TP} entries, each a pair (tag, body), the tag as printed.
    """
    sections: dict = {}
    current: list = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(".SH"):
            title = plain(line[3:].strip().strip('"'))
            current = sections.setdefault(title, [])
        elif line == ".TP" and i + 1 < len(lines):
            tag = lines[i + 1]
            body = []
            for following in lines[i + 2 :]:
                if following.startswith((".TP", ".SH", ".SS", ".PP")):
                    break
                body.append(macroText(following) if following.startswith(".") else plain(following))
            current.append((macroText(tag) if tag.startswith(".") else plain(tag), " ".join(body)))
    return sections


def uncommented(text: str) -> str:
    """
    C{etc/mailauth.conf} with its commented settings in force: C{;[relay]}
    and C{;key = value} lose their C{;} (comments have a space after it).
    """
    return re.sub(r"(?m)^;(?=\[|[A-Za-z0-9_.-]+\s*=)", "", text)


def settingSections(text: str) -> dict:
    """Section name -> its keys, in the order of the file, as configparser reads them."""
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(";", "#"), empty_lines_in_values=False
    )
    parser.read_string(text, source=EXAMPLE)
    return {name: parser[name] for name in parser.sections()}


def commandPaths(parser: argparse.ArgumentParser, prefix: tuple = ()) -> list:
    """
    Every runnable command of C{parser}: (words, parser), such as
    C{(("user", "app-password", "add"), ...)}.
    """
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.extend(commandPaths(sub, prefix + (name,)))
    if prefix and not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        found.append((prefix, parser))
    return found


def optionStrings(parser: argparse.ArgumentParser) -> set:
    return {
        s for action in parser._actions for s in action.option_strings if s not in ("-h", "--help")
    }


class ConfigurationReferenceTests(unittest.TestCase):
    """mailauth.conf(5) and etc/mailauth.conf name every key of the schema."""

    def test_everyKeyInManPage(self) -> None:
        """
        Every section of the schema has a C{.SH} heading in mailauth.conf(5),
        and every key of it a C{.TP} entry there.
        """
        sections = manSections(read(MAN5))
        missing = []
        for kind, schema in config._SCHEMA.items():
            title = heading(kind)
            if title not in sections:
                missing.append(
                    f'{MAN5}: no section {title}: add .SH "{title}" with an entry '
                    f"for each of its keys ({', '.join(schema)})"
                )
                continue
            tags = {tag.split()[0] for tag, _ in sections[title] if tag}
            for key in schema:
                if key not in tags:
                    missing.append(
                        f'{MAN5}: {title} {key} is not documented: add ".TP", '
                        f'".B {key}", what it does and "Default: ..." under '
                        f'.SH "{title}"'
                    )
        for title in SPECIAL_SECTIONS:
            if title not in sections:
                missing.append(f'{MAN5}: no section {title}: add .SH "{title}"')
        self.assertEqual(missing, [], "\n".join(missing))

    def test_manPageDefaults(self) -> None:
        """
        Each key's entry in mailauth.conf(5) states its default as the
        schema has it (C{Default: 35M.}), or says that it is required.
        """
        sections = manSections(read(MAN5))
        wrong = []
        for kind, schema in config._SCHEMA.items():
            entries = {tag.split()[0]: body for tag, body in sections.get(heading(kind), []) if tag}
            for key, (_, default) in schema.items():
                body = " ".join(entries.get(key, "").split())
                if key not in entries:
                    continue  # test_everyKeyInManPage names it
                if default is config.REQUIRED:
                    if "Required" not in body:
                        wrong.append(
                            f'{MAN5}: {heading(kind)} {key}: say "Required." '
                            "(the schema has no default)"
                        )
                elif default is not None and not re.search(
                    rf"Default: {re.escape(default)}(?![\w/])", body
                ):
                    wrong.append(
                        f"{MAN5}: {heading(kind)} {key}: the entry must say "
                        f'"Default: {default}." (config._SCHEMA); it says: {body!r}'
                    )
        self.assertEqual(wrong, [], "\n".join(wrong))

    def test_everyKeyInExample(self) -> None:
        """
        Every key of every section is in etc/mailauth.conf, set or commented
        out (C{;key = value}), in its own section; the optional sections
        may be commented out whole, and the first C{[listener:NAME]} shows
        every listener key.
        """
        sections = settingSections(uncommented(read(EXAMPLE)))
        missing = []
        for kind, schema in config._SCHEMA.items():
            if kind == "listener":
                names = [n for n in sections if n.startswith("listener:")]
                name = names[0] if names else "listener:submission"
            else:
                name = kind
            for key in schema:
                if key not in sections.get(name, {}):
                    missing.append(
                        f"{EXAMPLE}: [{name}] {key} is missing: add it with its "
                        f"default, or as ;{key} = EXAMPLE, under a comment saying "
                        "what it does"
                    )
        if "dkim" not in sections:
            missing.append(f"{EXAMPLE}: no [dkim] section (;[dkim] and an example line)")
        self.assertEqual(missing, [], "\n".join(missing))

    def test_exampleShowsDefaults(self) -> None:
        """
        Where etc/mailauth.conf sets a key that has a default, in its first
        section of that kind, the value is the default, as its first line
        promises: a default changed in config.py must be changed there too.
        """
        sections = settingSections(uncommented(read(EXAMPLE)))
        seen = set()
        wrong = []
        for name, values in sections.items():
            kind = "listener" if name.startswith("listener:") else name
            if kind not in config._SCHEMA or kind in seen:
                continue
            seen.add(kind)
            for key, text in values.items():
                parse, default = config._SCHEMA[kind].get(key, (None, None))
                if parse is None or default is None or default is config.REQUIRED:
                    continue
                try:
                    same = parse(text) == parse(default)
                except ValueError as e:
                    same = False
                    text = f"{text} ({e})"
                if not same:
                    wrong.append(
                        f"{EXAMPLE}: [{name}] {key} = {text}, but its default is "
                        f"{default} (config._SCHEMA)"
                    )
        self.assertEqual(wrong, [], "\n".join(wrong))

    def test_exampleLoads(self) -> None:
        """etc/mailauth.conf is a valid configuration as it is."""
        cfg = config.load(os.path.join(ROOT, EXAMPLE))
        self.assertIsNone(cfg.relay)
        self.assertIsNone(cfg.oauth)

    def test_exampleLoadsUncommented(self) -> None:
        """
        etc/mailauth.conf is a valid configuration with every commented
        setting and section in force: what it shows can be copied.
        """
        text = uncommented(read(EXAMPLE))
        try:
            cfg = config.loadText(text, EXAMPLE + " (uncommented)")
        except config.ConfigError as e:
            self.fail("\n".join(e.problems))
        self.assertIsNotNone(cfg.relay)
        self.assertIsNotNone(cfg.autoconfig)
        self.assertIsNotNone(cfg.metrics)
        self.assertIsNotNone(cfg.oauth)
        self.assertTrue(cfg.dkim)
        self.assertIsNotNone(cfg.limits.overrides)

    def test_uncommentedFindsSettingsOnly(self) -> None:
        """
        The uncommenting of the two tests above takes C{;key = value} and
        C{;[section]} lines, never comments, which have a space after C{;}.
        """
        text = "; a comment = not a key\n;[relay]\n;host = x\n; [note]\n"
        self.assertEqual(
            uncommented(text), "; a comment = not a key\n[relay]\nhost = x\n; [note]\n"
        )

    def test_debianConfigurationLoads(self) -> None:
        """
        The configuration the Debian package installs is valid as it is,
        and with its commented examples in force.
        """
        text = read(DEBIAN_CONF)
        self.assertIn("\nusers = /etc/mailauth/users\n", text)
        try:
            cfg = config.loadText(text, DEBIAN_CONF)
            full = config.loadText(uncommented(text), DEBIAN_CONF + " (uncommented)")
        except config.ConfigError as e:
            self.fail("\n".join(e.problems))
        self.assertEqual([listener.endpoint for listener in cfg.listeners], ["tcp:587", "tcp:465"])
        self.assertEqual((cfg.relay, cfg.metrics, dict(cfg.dkim)), (None, None, {}))
        self.assertIsNotNone(full.relay)
        self.assertIsNotNone(full.metrics)
        self.assertEqual(full.limits.suspend_after, 10)
        self.assertEqual(list(full.dkim), ["example.org"])


class CommandReferenceTests(unittest.TestCase):
    """mailauth(8) names every command and option of C{mailauth} and C{twistd mailauth}."""

    def test_everyCommandInManPage(self) -> None:
        """
        Every command of the C{mailauth} parser (C{user app-password add},
        C{queue delete}, ...) has a C{.TP} entry under COMMANDS and a line
        in the SYNOPSIS of mailauth(8).
        """
        text = read(MAN8)
        sections = manSections(text)
        tags = [tag for tag, _ in sections.get("COMMANDS", [])]
        synopsis = " ".join(
            plain(macroText(line) if line.startswith(".") else line)
            for line in text.split(".SH SYNOPSIS", 1)[1].split(".SH", 1)[0].splitlines()
        )
        synopsis = " ".join(synopsis.split())
        missing = []
        paths = commandPaths(cli._makeParser(cli.DEFAULT_CONFIG))
        self.assertIn(("user", "app-password", "add"), [words for words, _ in paths])
        for words, _ in paths:
            command = " ".join(words)
            if not any(tag == command or tag.startswith(command + " ") for tag in tags):
                missing.append(
                    f"{MAN8}: the command 'mailauth {command}' has no entry: add "
                    f'.TP and .B "{command}" (with its arguments) under .SH '
                    "COMMANDS"
                )
            if f"mailauth {command}" not in synopsis:
                missing.append(f"{MAN8}: 'mailauth {command}' is not in the SYNOPSIS")
        self.assertEqual(missing, [], "\n".join(missing))

    def test_everyOptionInManPage(self) -> None:
        """
        Every option of every C{mailauth} command, of C{mailauth} itself
        (C{--version}) and of the twistd plugin (C{--config}) is the tag
        of an entry in mailauth(8).
        """
        sections = manSections(read(MAN8))
        tagWords = set()
        for entries in sections.values():
            for tag, _ in entries:
                tagWords.update(w.strip(",") for w in tag.split())
        parser = cli._makeParser(cli.DEFAULT_CONFIG)
        options = {s: "mailauth" for s in optionStrings(parser)}
        for words, sub in commandPaths(parser):
            for s in optionStrings(sub):
                options.setdefault(s, "mailauth " + " ".join(words))
        for long, short, *_ in tap.Options.optParameters + getattr(tap.Options, "optFlags", []):
            options.setdefault(f"--{long}", "twistd mailauth")
            if short:
                options.setdefault(f"-{short}", "twistd mailauth")
        self.assertIn("--keydir", options)
        missing = [
            f"{MAN8}: {where} {option} is not documented: add a .TP entry whose tag names {option}"
            for option, where in sorted(options.items())
            if option not in tagWords
        ]
        self.assertEqual(missing, [], "\n".join(missing))


class VersionTests(unittest.TestCase):
    """The version is the same wherever it is written."""

    def version(self) -> str:
        parser = configparser.ConfigParser()
        parser.read(os.path.join(ROOT, "setup.cfg"))
        return parser["metadata"]["version"]

    def test_manPageHeaders(self) -> None:
        """The .TH line of each man page names setup.cfg's version."""
        for name in (MAN5, MAN8):
            [th] = [line for line in read(name).splitlines() if line.startswith(".TH ")]
            self.assertIn(f'"mailauth {self.version()}"', th, name)

    def test_debianChangelog(self) -> None:
        """debian/changelog's newest entry is setup.cfg's version."""
        first = read(DEBIAN_CHANGELOG).splitlines()[0]
        self.assertRegex(first, rf"^mailauth \({re.escape(self.version())}(-\d+)?\) ")


class RenderTests(unittest.TestCase):
    """The man pages render without a warning (groff from Debian's groff-base)."""

    def test_groffWarnings(self) -> None:
        """groff -man -Tutf8 -ww prints nothing on standard error for either page."""
        groff = shutil.which("groff")
        if groff is None:
            raise AssertionError("groff is missing: apt-get install groff-base")
        for name in (MAN5, MAN8):
            result = subprocess.run(
                [groff, "-man", "-Tutf8", "-ww", "-z", os.path.join(ROOT, name)],
                capture_output=True,
                text=True,
                timeout=60,
                env=dict(os.environ, LC_ALL="C.UTF-8"),
            )
            self.assertEqual((result.returncode, result.stderr), (0, ""), name)

    def test_groffReportsWarnings(self) -> None:
        """The check above sees a warning when there is one (an unknown macro)."""
        groff = shutil.which("groff")
        if groff is None:
            raise AssertionError("groff is missing: apt-get install groff-base")
        page = self.mktemp()
        with open(page, "w") as f:
            f.write('.TH X 1 "2026-12-02" "x" "x"\n.SH NAME\nx\n.XX unknown\n')
        result = subprocess.run(
            [groff, "-man", "-Tutf8", "-ww", "-z", page], capture_output=True, text=True, timeout=60
        )
        self.assertIn("warning", result.stderr)
