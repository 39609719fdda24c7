"""
Tests that a password in a PostgreSQL URI (L{mailauth.pgusers}) is never
shown, however it is written: in the user part, in the query, with
characters that should have been percent-encoded, or in a part libpq
quotes when it refuses the URI.
"""

from __future__ import annotations

from twisted.trial import unittest

from mailauth.pgusers import checkSetup, checkURI, redact, scrub

# (URI, its secret, what redact shows).
_URIS = (
    ("postgresql://u:s3cret@h/db", "s3cret", "postgresql://u:***@h/db"),
    ("postgresql://u:qz/xk@h/db", "qz/xk", "postgresql://u:***@h/db"),
    ("postgresql://u:p@ss@h/db", "p@ss", "postgresql://u:***@h/db"),
    ("postgresql://u:p?ss@h/db", "p?ss", "postgresql://u:***@h/db"),
    ("postgresql://u:p#ss@h/db", "p#ss", "postgresql://u:***@h/db"),
    ("postgresql://u:50%off@h/db", "50%off", "postgresql://u:***@h/db"),
    ("postgresql://u:ab%zzcd@h/db", "ab%zzcd", "postgresql://u:***@h/db"),
    ("postgresql://h/db?PASSWORD=s3cret", "s3cret", "postgresql://h/db?PASSWORD=***"),
    ("postgresql://h/db?password=ab%zzcd", "ab%zzcd", "postgresql://h/db?password=***"),
    (
        "postgresql://u@h/db?sslpassword=keysecret&sslmode=require",
        "keysecret",
        "postgresql://u@h/db?sslpassword=***&sslmode=require",
    ),
    ("postgresql://u:s3cret@[::1/db", "s3cret", "postgresql://u:***@[::1/db"),
)


class RedactTests(unittest.TestCase):
    def test_redact(self) -> None:
        """
        C{redact} hides the password wherever it is and whatever it holds,
        and keeps the rest.
        """
        for uri, _, shown in _URIS:
            self.assertEqual(redact(uri), shown, uri)

    def test_keepsTheRest(self) -> None:
        """
        An C{@} in the query (a user name there) is not a user part.
        """
        for uri in (
            "postgresql://db.example/mail?user=a@b.example",
            "postgresql:///mail?host=/run/postgresql",
            "postgresql://mail@db.example/mail",
            "postgres://",
        ):
            self.assertEqual(redact(uri), uri)

    def test_checkURI(self) -> None:
        """
        C{checkURI} never shows the password in its message; a user part
        with characters that libpq would split it at is refused, naming
        the percent-encoding.
        """
        for uri, secret, _ in _URIS:
            try:
                checkURI(uri)
            except ValueError as e:
                self.assertNotIn(secret, str(e), uri)
                self.assertNotIn(secret[:2], str(e).replace("postgresql", ""), uri)
        for uri, *_ in _URIS[1:7]:
            with self.assertRaises(ValueError, msg=uri) as caught:
                checkURI(uri)
            self.assertIn("percent-encode", str(caught.exception))

    def test_libpqMessages(self) -> None:
        """
        libpq's own messages (C{checkSetup}, which the daemon and
        check-config show) quote the URI or the part it could not parse;
        neither shows the password.
        """
        for uri, secret, _ in _URIS:
            problem = checkSetup(uri) or ""
            self.assertNotIn(secret, problem, uri)
        self.assertEqual(
            checkSetup("postgresql://u:ab%zzcd@h/db"),
            'postgresql://u:***@h/db: invalid percent-encoded token: "***"',
        )

    def test_scrubParts(self) -> None:
        """
        A quoted part of a password (libpq taking it for a port) is hidden.
        """
        self.assertEqual(
            scrub("postgresql://u:qz/xk@h/db", 'invalid port "qz" in "postgresql://u:qz/xk@h/db"'),
            'invalid port "***" in "postgresql://u:***@h/db"',
        )
