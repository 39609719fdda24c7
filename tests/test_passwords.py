"""Tests for L{mailauth.passwords}."""

from __future__ import annotations

import hmac
import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from mailauth import passwords
from mailauth.passwords import (
    SCHEMES,
    PasswordHash,
    cramMD5Digest,
    dummyVerify,
    makeHash,
    parse,
    verify,
)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

# The password of every user in data/dovecot-passwd (Dovecot 2.3.19's doveadm).
SECRET = b"alice-secret-1"

# The passwords of data/more-passwd, by the first label of the login.
MORE_SECRETS = {
    "utf8": "pässwörd mit Leerzeichen".encode(),
    "long": b"0123456789" * 10,
}


def readVectors(name: str) -> list[tuple[str, str]]:
    """
    @return: C{(login, stored)} for each user line of C{tests/data/NAME}.
    """
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return [
            tuple(line.rstrip("\n").split(":", 1))
            for line in f
            if line.strip() and not line.startswith("#")
        ]


def hmacMD5(key: bytes, challenge: bytes) -> bytes:
    return hmac.new(key, challenge, "md5").hexdigest().encode("ascii")


class DovecotVectorTests(unittest.TestCase):
    """Hashes printed by C{doveadm pw} are accepted as they are."""

    def test_parseVectors(self) -> None:
        """
        Every line of the Dovecot vectors parses to the scheme its login
        names, with the value after the C{{SCHEME}} prefix.
        """
        vectors = readVectors("dovecot-passwd")
        self.assertEqual(len(vectors), 9)
        for login, stored in vectors:
            expected = login.split("@")[0].split(".", 1)[1].upper()
            hashed = parse(stored)
            self.assertEqual(hashed.scheme, expected)
            self.assertEqual(f"{{{hashed.scheme}}}{hashed.value}", stored)

    def test_verifyVectors(self) -> None:
        """
        Every Dovecot vector verifies with its password and no other.
        """
        for login, stored in readVectors("dovecot-passwd"):
            hashed = parse(stored)
            self.assertTrue(verify(hashed, SECRET), login)
            self.assertFalse(verify(hashed, b"alice-secret-2"), login)

    def test_verifyMoreVectors(self) -> None:
        """
        doveadm's hashes of a UTF-8 password and of a 100-byte password, with
        explicit rounds, and bare crypt strings (yescrypt, SHA-512, bcrypt,
        MD5-crypt) made by mkpasswd, all verify.
        """
        vectors = readVectors("more-passwd")
        self.assertEqual(len(vectors), 14)
        for login, stored in vectors:
            self.assertTrue(verify(parse(stored), MORE_SECRETS[login.split(".")[0]]), login)

    def test_cramMD5DigestVectors(self) -> None:
        """
        The CRAM-MD5, PLAIN and CLEAR vectors answer a CRAM-MD5 challenge
        with HMAC-MD5 keyed by the password; the other schemes cannot.
        """
        challenge = b"<1896.697170952@mail.example.org>"
        for login, stored in readVectors("dovecot-passwd"):
            digest = cramMD5Digest(parse(stored), challenge)
            if parse(stored).scheme in ("CRAM-MD5", "PLAIN", "CLEAR"):
                self.assertEqual(digest, hmacMD5(SECRET, challenge), login)
            else:
                self.assertIsNone(digest, login)

    def test_cramMD5DigestMoreVectors(self) -> None:
        """
        Dovecot's CRAM-MD5 context of a UTF-8 password and of one longer
        than an MD5 block (which HMAC hashes first) answer challenges too.
        """
        challenge = b"<42.1234@example.test>"
        for login, stored in readVectors("more-passwd"):
            if login.endswith(".cram-md5@example.test"):
                key = MORE_SECRETS[login.split(".")[0]]
                self.assertEqual(cramMD5Digest(parse(stored), challenge), hmacMD5(key, challenge))

    def test_bcryptUsesFirst72Bytes(self) -> None:
        """
        Like Dovecot and crypt(3), bcrypt checks only the first 72 bytes of
        a longer password.
        """
        stored = parse(dict(readVectors("more-passwd"))["long.blf-crypt@example.test"])
        self.assertTrue(verify(stored, MORE_SECRETS["long"][:72] + b"ignored"))
        self.assertFalse(verify(stored, MORE_SECRETS["long"][:71]))


class ParseTests(unittest.TestCase):
    """L{parse} reads the password field of a users file line."""

    def test_schemeCaseInsensitive(self) -> None:
        """
        The scheme may be written in any case; it is kept in upper case.
        """
        self.assertEqual(parse("{cram-md5}" + "ab" * 32), PasswordHash("CRAM-MD5", "ab" * 32))

    def test_clearAliases(self) -> None:
        """
        CLEAR and CLEARTEXT are kept as written, and work as PLAIN.
        """
        for scheme in ("CLEAR", "CLEARTEXT", "PLAIN"):
            hashed = parse(f"{{{scheme.lower()}}}secret")
            self.assertEqual(hashed, PasswordHash(scheme, "secret"))
            self.assertTrue(verify(hashed, b"secret"))
            self.assertFalse(verify(hashed, b"secret2"))
            self.assertEqual(cramMD5Digest(hashed, b"c"), hmacMD5(b"secret", b"c"))

    def test_bareCryptStrings(self) -> None:
        """
        A hash without C{{SCHEME}} is a crypt string, named by its prefix
        where we know a better scheme for it.
        """
        vectors = dict(readVectors("dovecot-passwd"))
        sha512 = vectors["alice.sha512-crypt@example.test"].split("}", 1)[1]
        bcrypt = vectors["alice.blf-crypt@example.test"].split("}", 1)[1]
        argon2 = vectors["alice.argon2id@example.test"].split("}", 1)[1]
        yescrypt = dict(readVectors("more-passwd"))["utf8.bare-yescrypt@example.test"]
        self.assertEqual(parse(sha512), PasswordHash("SHA512-CRYPT", sha512))
        self.assertEqual(parse(bcrypt), PasswordHash("BLF-CRYPT", bcrypt))
        self.assertEqual(parse(argon2), PasswordHash("ARGON2ID", argon2))
        self.assertEqual(parse(yescrypt), PasswordHash("CRYPT", yescrypt))
        self.assertTrue(verify(parse(sha512), SECRET))

    def test_unknownScheme(self) -> None:
        """
        An unknown scheme is a L{ValueError} naming it and the known ones.
        """
        error = self.assertRaises(ValueError, parse, "{SSHA512}abcdef")
        self.assertIn("{SSHA512}", str(error))
        self.assertIn("ARGON2ID", str(error))

    def test_malformed(self) -> None:
        """
        A hash that does not fit its scheme is a L{ValueError}.
        """
        for stored in [
            "{CRAM-MD5}" + "ab" * 31,
            "{CRAM-MD5}" + "ab" * 33,
            "{CRAM-MD5}" + "xy" * 32,
            "{SHA512-CRYPT}$5$asVPx5CccgLd6Jem$3fNTongCSv7/.7KYc2vxnath7E/5zur79mlrjOcsjI8",
            "{SHA256-CRYPT}$5$asVPx5CccgLd6Jem$short",
            "{BLF-CRYPT}$2y$05$tooshort",
            "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$onlysalt",
            "{CRYPT}$argon2id$v=19$m=65536,t=3,p=1$c2FsdA$aGFzaA",
            "{PLAIN}",
            "{ARGON2ID",
            "plaintext-without-scheme",
            "",
        ]:
            self.assertRaises(ValueError, parse, stored)

    def test_errorHidesPassword(self) -> None:
        """
        Neither a parse error nor the C{repr} of a hash shows a plaintext
        password.
        """
        error = self.assertRaises(ValueError, parse, "hunter2-no-scheme")
        self.assertNotIn("hunter2", str(error))
        self.assertNotIn("hunter2", repr(parse("{PLAIN}hunter2")))


class VerifyTests(unittest.TestCase):
    """L{verify} answers yes or no, and never raises for a bad password."""

    def test_nulInCryptPassword(self) -> None:
        """
        A password with a NUL byte, which crypt(3) and bcrypt cannot take,
        is simply wrong.
        """
        for login, stored in readVectors("dovecot-passwd"):
            if "crypt" in login:
                self.assertFalse(verify(parse(stored), SECRET + b"\0"), login)
                self.assertFalse(verify(parse(stored), b"\0" + SECRET), login)

    def test_unusableCryptSetting(self) -> None:
        """
        A crypt string the system's crypt(3) accepts at first sight but
        cannot compute is wrong for every password.
        """
        self.assertFalse(verify(parse("$y$j9T$abc"), SECRET))
        self.assertFalse(verify(parse("{SHA512-CRYPT}$6$sälz$" + "a" * 86), SECRET))

    def test_emptyPassword(self) -> None:
        """
        An empty password is wrong, as any other would be.
        """
        self.assertFalse(verify(parse("{PLAIN}x"), b""))
        self.assertFalse(verify(parse(makeHash(b"x", "SHA256-CRYPT")), b""))

    def test_dummyVerifyCostsAsTheDefault(self) -> None:
        """
        L{dummyVerify} verifies a hash of the default scheme with the
        parameters L{makeHash} uses for new users.
        """
        made = parse(makeHash(b"x"))
        self.assertEqual(passwords._DUMMY.scheme, made.scheme)
        self.assertEqual(passwords._DUMMY.value.split("$")[:4], made.value.split("$")[:4])
        self.assertIsNone(dummyVerify(b"x"))


class MakeHashTests(unittest.TestCase):
    """L{makeHash} prints what C{doveadm pw -s SCHEME} would."""

    # What each scheme's hash looks like; doveadm's bcrypt cost is 5, ours 10.
    FORMATS = {
        "ARGON2ID": r"\{ARGON2ID\}\$argon2id\$v=19\$m=65536,t=3,p=1\$[A-Za-z0-9+/]{22}\$"
        r"[A-Za-z0-9+/]{43}",
        "ARGON2I": r"\{ARGON2I\}\$argon2i\$v=19\$m=32768,t=4,p=1\$[A-Za-z0-9+/]{22}\$"
        r"[A-Za-z0-9+/]{43}",
        "BLF-CRYPT": r"\{BLF-CRYPT\}\$2y\$10\$[./A-Za-z0-9]{53}",
        "SHA512-CRYPT": r"\{SHA512-CRYPT\}\$6\$[./A-Za-z0-9]{16}\$[./A-Za-z0-9]{86}",
        "SHA256-CRYPT": r"\{SHA256-CRYPT\}\$5\$[./A-Za-z0-9]{16}\$[./A-Za-z0-9]{43}",
        "CRYPT": r"\{CRYPT\}\$2y\$10\$[./A-Za-z0-9]{53}",
        "CRAM-MD5": r"\{CRAM-MD5\}[0-9a-f]{64}",
        "PLAIN": r"\{PLAIN\}correct horse",
        "CLEAR": r"\{CLEAR\}correct horse",
        "CLEARTEXT": r"\{CLEARTEXT\}correct horse",
    }

    def test_everyScheme(self) -> None:
        """
        Each scheme's hash has doveadm's form and verifies with its password.
        """
        self.assertEqual(set(self.FORMATS), set(SCHEMES))
        for scheme in SCHEMES:
            made = makeHash(b"correct horse", scheme)
            self.assertRegex(made, "^" + self.FORMATS[scheme] + "$")
            self.assertTrue(verify(parse(made), b"correct horse"), scheme)

    def test_defaultScheme(self) -> None:
        """
        New hashes are ARGON2ID unless a scheme is named, in any case.
        """
        self.assertEqual(passwords.DEFAULT_SCHEME, "ARGON2ID")
        self.assertTrue(makeHash(b"x", "sha512-crypt").startswith("{SHA512-CRYPT}$6$"))

    def test_freshSalt(self) -> None:
        """
        Two hashes of one password differ.
        """
        self.assertNotEqual(makeHash(b"x", "SHA512-CRYPT"), makeHash(b"x", "SHA512-CRYPT"))
        self.assertNotEqual(makeHash(b"x", "BLF-CRYPT"), makeHash(b"x", "BLF-CRYPT"))

    def test_unknownScheme(self) -> None:
        """
        An unknown scheme is a L{ValueError}.
        """
        self.assertRaises(ValueError, makeHash, b"x", "MD5")

    def test_refusedPasswords(self) -> None:
        """
        crypt and bcrypt refuse a NUL byte, and bcrypt a password longer
        than the 72 bytes it would use, rather than hash something else.
        """
        for scheme in ("SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "CRYPT"):
            self.assertRaises(ValueError, makeHash, b"a\0b", scheme)
        self.assertRaises(ValueError, makeHash, b"x" * 73, "BLF-CRYPT")
        self.assertTrue(verify(parse(makeHash(b"x" * 72, "BLF-CRYPT")), b"x" * 72))

    def test_plainKeepsBytes(self) -> None:
        """
        A plaintext hash of a password that is not UTF-8 still verifies.
        """
        hashed = parse(makeHash(b"\xff\xfe", "PLAIN"))
        self.assertTrue(verify(hashed, b"\xff\xfe"))
        self.assertEqual(cramMD5Digest(hashed, b"c"), hmacMD5(b"\xff\xfe", b"c"))

    @given(password=st.binary(max_size=200), challenge=st.binary(max_size=300))
    def test_cramMD5MatchesHMAC(self, password: bytes, challenge: bytes) -> None:
        """
        For any password and challenge, the answer computed from a stored
        CRAM-MD5 context is HMAC-MD5 of the challenge keyed with the password.
        """
        stored = parse(makeHash(password, "CRAM-MD5"))
        self.assertEqual(cramMD5Digest(stored, challenge), hmacMD5(password, challenge))
        self.assertTrue(verify(stored, password))
