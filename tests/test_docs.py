"""README, changelog and docs/ are valid reStructuredText, as docutils renders them."""

from __future__ import annotations

import glob
import io
import os

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DocumentTests(unittest.TestCase):
    def test_valid(self) -> None:
        """Every .rst file parses without a warning or an error."""
        try:
            import docutils.core
        except ImportError:
            raise AssertionError("docutils is missing: apt-get install python3-docutils") from None
        paths = [os.path.join(ROOT, "README.rst"), os.path.join(ROOT, "CHANGELOG.rst")]
        paths += sorted(glob.glob(os.path.join(ROOT, "docs", "*.rst")))
        for path in paths:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            messages = io.StringIO()
            docutils.core.publish_doctree(
                text,
                source_path=path,
                settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": messages},
            )
            self.assertEqual(messages.getvalue(), "", path)
