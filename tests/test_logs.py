"""
docs/logs.rst lists every line the daemon logs: checked against the code,
both ways, so the reference cannot fall behind.
"""

from __future__ import annotations

import ast
import glob
import os
import re

import attrs
from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "logs.rst")

# The methods of twisted.logger.Logger, and the level each logs at.
LEVELS = {"debug": "debug", "info": "info", "warn": "warn", "error": "error",
          "critical": "critical", "failure": "critical, with a traceback"}

HOW_TO_ADD = """\
docs/logs.rst must list every line the daemon logs. Add this one under the
heading ``{namespace}`` (make the heading if it is missing: the namespace as
an inline literal, underlined with '-'), as the format string exactly as in
the code, then an indented line that starts with its level:

``{format}``
    *{level}*. What it means, its fields, and what an operator does about it.
"""


@attrs.frozen
class Line:
    namespace: str
    level: str
    format: str
    where: str = ""


def loggedLines() -> list[Line]:
    """
    Every C{NAME.LEVEL("format", ...)} call in mailauth/ on a module-level
    C{NAME = Logger(namespace=...)}, with its namespace and level.
    """
    lines = []
    for path in sorted(glob.glob(os.path.join(ROOT, "mailauth", "*.py"))):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        loggers = {}
        for node in tree.body:
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                    and getattr(node.value.func, "id", None) == "Logger"):
                namespace = next((k.value.value for k in node.value.keywords
                                  if k.arg == "namespace"), "?")
                for target in node.targets:
                    loggers[getattr(target, "id", None)] = namespace
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LEVELS and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in loggers):
                where = f"{os.path.relpath(path, ROOT)}:{node.lineno}"
                first = node.args[0] if node.args else None
                if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                    raise AssertionError(f"{where}: the format of a log line must be a string "
                                         "literal, so that docs/logs.rst can list it")
                lines.append(Line(loggers[node.func.value.id], LEVELS[node.func.attr],
                                  first.value, where))
    return lines


def documentedLines() -> list[Line]:
    """
    The entries of docs/logs.rst: under a heading that is a namespace
    (C{``mailauth.x``} underlined with '-'), a line that is one inline
    literal (the format), then an indented line starting with C{*level*}.
    """
    with open(DOCS, encoding="utf-8") as f:
        text = f.read().split("\n")
    lines = []
    namespace = None
    for number, line in enumerate(text):
        following = text[number + 1] if number + 1 < len(text) else ""
        literal = re.fullmatch(r"``(.+)``", line)
        if re.fullmatch(r"[-=]{3,}", following):
            namespace = literal.group(1) if literal and following[0] == "-" else None
        elif literal and namespace is not None:
            level = re.match(r"\s+\*([^*]+)\*", following)
            lines.append(Line(namespace, level.group(1) if level else "(none)",
                              literal.group(1), f"docs/logs.rst:{number + 1}"))
    return lines


class LogReferenceTests(unittest.TestCase):
    def test_everyLineDocumented(self) -> None:
        """Every line mailauth logs is in docs/logs.rst, under its namespace, with its level."""
        documented = {(x.namespace, x.format): x.level for x in documentedLines()}
        for line in loggedLines():
            message = (f"{line.where} logs a line docs/logs.rst does not list.\n"
                       + HOW_TO_ADD.format(**attrs.asdict(line)))
            self.assertIn((line.namespace, line.format), documented, message)
            self.assertEqual(documented[(line.namespace, line.format)], line.level,
                             f"{line.where}: docs/logs.rst gives this line the wrong level\n"
                             + HOW_TO_ADD.format(**attrs.asdict(line)))

    def test_everyDocumentedLineLogged(self) -> None:
        """Every line docs/logs.rst lists is still logged, so the reference never lies."""
        logged = {(x.namespace, x.format) for x in loggedLines()}
        for line in documentedLines():
            self.assertIn((line.namespace, line.format), logged,
                          f"{line.where} lists ``{line.format}`` under ``{line.namespace}``, "
                          "which mailauth no longer logs there: change or remove the entry")

    def test_parsers(self) -> None:
        """The two readers above find the lines they are meant to."""
        logged = loggedLines()
        self.assertIn(Line("mailauth.esmtp", "info",
                           "auth failure: client=[{client}] mechanism={mechanism} "
                           "login=<{login}> session={session}"),
                      [attrs.evolve(x, where="") for x in logged])
        self.assertIn("critical, with a traceback", {x.level for x in logged})
        self.assertGreater(len(logged), 40)
        self.assertEqual(len(documentedLines()), len({(x.namespace, x.format) for x in logged}))
