"""The installed package carries the twistd plugin, so twistd finds it outside a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WheelTests(unittest.TestCase):
    def test_wheelHasPlugin(self) -> None:
        """
        A wheel built from the tree installs twisted/plugins/mailauth_plugin.py
        and no __init__.py in twisted/ or twisted/plugins/ (which would hide
        Twisted's own plugins).
        """
        out = os.path.abspath(self.mktemp())
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "--wheel-dir",
                out,
                ROOT,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        [wheel] = os.listdir(out)
        names = zipfile.ZipFile(os.path.join(out, wheel)).namelist()
        self.assertIn("twisted/plugins/mailauth_plugin.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertIn("mailauth/esmtp.py", names)
        self.assertFalse([n for n in names if n.startswith("tests/")])
