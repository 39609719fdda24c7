"""Tests for L{mailauth.passwords}."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import shutil
import subprocess

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from mailauth import legacyschemes, passwords, userdb
from mailauth.passwords import (
    CRAM_MD5_SCHEMES,
    SCHEMES,
    WEAK_SCHEMES,
    PasswordHash,
    cramMD5Digest,
    dummyVerify,
    isWeak,
    makeHash,
    parse,
    schemeName,
    verify,
)
from tests.support import DATA, SECRET

# The passwords of data/more-passwd, by the first label of the login.
MORE_SECRETS = {
    "utf8": "pässwörd mit Leerzeichen".encode(),
    "long": b"0123456789" * 10,
}


# The passwords of data/legacy-passwd, by the first label of the login, and
# for each a wrong one that differs in its first byte (DES-CRYPT reads only 8
# bytes, PLAIN-TRUNC may hold a prefix).
LEGACY_SECRETS = {"alice": SECRET, "utf8": MORE_SECRETS["utf8"]}
LEGACY_WRONG = {"alice": b"Alice-secret-1", "utf8": "Pässwörd mit Leerzeichen".encode()}

# The schemes that issue #15 asks to read, as doveadm pw -l lists them.
LEGACY = (
    "SSHA SSHA256 SSHA512 SHA SHA1 SHA256 SHA512 SMD5 MD5 MD5-CRYPT PLAIN-MD4 PLAIN-MD5"
    " LDAP-MD5 PLAIN-TRUNC DES-CRYPT PBKDF2 HMAC-MD5 DIGEST-MD5"
).split()

# What doveadm pw -s OTP -p alice-secret-1 prints.
OTP = "{OTP}sha1 1024 b777f60da13b0b09 170f6f8bce6b9de1"


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


class LegacyVectorTests(unittest.TestCase):
    """
    The legacy schemes of an old Dovecot passwd-file or an LDAP export, as
    C{doveadm pw} makes them (data/legacy-passwd), are read unchanged.
    """

    def vectors(self) -> list[tuple[str, str, bytes]]:
        """
        @return: C{(login, stored, password)} for each line of
            data/legacy-passwd.
        """
        return [
            (login, stored, LEGACY_SECRETS[login.split(".")[0]])
            for login, stored in readVectors("legacy-passwd")
        ]

    def test_parseLegacyVectors(self) -> None:
        """
        Every line parses, to the scheme and encoding in its braces (a
        bare 13-character string is DES-CRYPT), keeping the value as written;
        together they cover every legacy scheme.
        """
        vectors = self.vectors()
        self.assertEqual(len(vectors), 65)
        seen = set()
        for login, stored, _ in vectors:
            hashed = parse(stored)
            match = re.fullmatch(r"\{([^.}]+)(?:\.([^}]+))?\}(.*)", stored)
            if match is None:
                self.assertEqual(hashed, PasswordHash("DES-CRYPT", stored), login)
            else:
                self.assertEqual(hashed, PasswordHash(*match.group(1, 3, 2)), login)
            seen.add(hashed.scheme)
        self.assertEqual(seen, set(LEGACY) | {"CRAM-MD5"})

    def test_verifyLegacyVectors(self) -> None:
        """
        Every legacy vector verifies with its password and the login it was
        made for, and refuses a wrong password.
        """
        for login, stored, password in self.vectors():
            hashed = parse(stored)
            self.assertTrue(verify(hashed, password, login), login)
            wrong = LEGACY_WRONG[login.split(".")[0]]
            self.assertFalse(verify(hashed, wrong, login), login)

    def test_usersFile(self) -> None:
        """
        data/legacy-passwd is a users file of which every line is a user.
        """
        with open(os.path.join(DATA, "legacy-passwd"), "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape")
        users, problems = userdb.parseUsers(text, "legacy-passwd")
        self.assertEqual(problems, [])
        self.assertEqual(len(users), 65)
        user = users["utf8.ssha512@example.test"]
        self.assertTrue(verify(user.password, LEGACY_SECRETS["utf8"]))

    def test_digestMD5NeedsTheLogin(self) -> None:
        """
        A DIGEST-MD5 hash is MD5(user:realm:password) with the realm after
        the login's last C{@}: it verifies only with the login it was made
        for, and with none, no password is right.
        """
        vectors = dict(readVectors("legacy-passwd"))
        login = "alice.digest-md5@example.test"
        hashed = parse(vectors[login])
        self.assertTrue(verify(hashed, SECRET, login))
        self.assertFalse(verify(hashed, SECRET))
        self.assertFalse(verify(hashed, SECRET, "alice.digest-md5@example.org"))
        self.assertFalse(verify(hashed, SECRET, "alice.digest-md5"))
        digest = hashlib.md5(b"a@b:realm:pw").hexdigest()
        self.assertTrue(verify(parse("{DIGEST-MD5}" + digest), b"pw", "a@b@realm"))
        digest = hashlib.md5(b"a::pw").hexdigest()
        self.assertTrue(verify(parse("{DIGEST-MD5}" + digest), b"pw", "a"))

    def test_hmacMD5AnswersCramMD5(self) -> None:
        """
        HMAC-MD5 is Dovecot's other name for the CRAM-MD5 context: both,
        in any encoding, answer a CRAM-MD5 challenge; no other legacy
        scheme can.
        """
        challenge = b"<1896.697170952@mail.example.org>"
        answered = 0
        for login, stored, password in self.vectors():
            hashed = parse(stored)
            digest = cramMD5Digest(hashed, challenge)
            if hashed.scheme in CRAM_MD5_SCHEMES:
                self.assertEqual(digest, hmacMD5(password, challenge), login)
                answered += 1
            else:
                self.assertIsNone(digest, login)
        self.assertEqual(answered, 6)

    def test_desCryptReadsEightBytes(self) -> None:
        """
        DES-CRYPT, like crypt(3) and Dovecot, reads only the first 8 bytes
        of a password.
        """
        stored = parse(dict(readVectors("legacy-passwd"))["alice.des-crypt@example.test"])
        self.assertTrue(verify(stored, SECRET[:8] + b"anything"))
        self.assertFalse(verify(stored, SECRET[:7]))
        self.assertFalse(verify(stored, SECRET + b"\0"))

    def test_plainTruncPrefix(self) -> None:
        """
        A PLAIN-TRUNC password as long as its length prefix may be a
        truncation: any password starting with it is right. One shorter
        than the prefix says is whole, and must match exactly.
        """
        stored = parse("{PLAIN-TRUNC}5-alice")
        for password in (b"alice", b"alice-secret-1", b"alicex"):
            self.assertTrue(verify(stored, password), password)
        for password in (b"alic", b"Alice-secret-1", b""):
            self.assertFalse(verify(stored, password), password)
        whole = parse("{PLAIN-TRUNC}20-alice")
        self.assertTrue(verify(whole, b"alice"))
        self.assertFalse(verify(whole, b"alicex"))

    def test_md5IsMD5CryptOrPlainMD5(self) -> None:
        """
        Dovecot's MD5 is MD5-crypt when it starts with C{$1$}, else a
        PLAIN-MD5 digest in hex or base64.
        """
        vectors = dict(readVectors("legacy-passwd"))
        for label in ("md5", "md5-plain-hex", "md5-plain-b64"):
            self.assertEqual(parse(vectors[f"alice.{label}@example.test"]).scheme, "MD5")
        self.assertTrue(vectors["alice.md5@example.test"].startswith("{MD5}$1$"))
        error = self.assertRaises(ValueError, parse, "{MD5}abc")
        self.assertEqual(str(error), "not a valid MD5-CRYPT or PLAIN-MD5 password")

    def test_bareMD5Crypt(self) -> None:
        """
        A bare C{$1$} string is MD5-CRYPT, as Dovecot names it.
        """
        stored = dict(readVectors("legacy-passwd"))["alice.md5-crypt@example.test"][11:]
        self.assertEqual(parse(stored), PasswordHash("MD5-CRYPT", stored))
        self.assertTrue(verify(parse(stored), SECRET))

    def test_otpRefused(self) -> None:
        """
        OTP is stateful (each login moves it on), so it is refused with a
        line saying so, when read and when asked for.
        """
        message = "OTP is a one-time-password scheme and cannot be used by mailauth"
        for call, argument in ((parse, OTP), (makeHash, b"x"), (schemeName, "otp")):
            if call is makeHash:
                error = self.assertRaises(ValueError, makeHash, argument, "OTP")
            else:
                error = self.assertRaises(ValueError, call, argument)
            self.assertEqual(str(error), message)
        users, problems = userdb.parseUsers(f"a@example.test:{OTP}\n", "users")
        self.assertEqual(users, {})
        self.assertEqual(problems, [f"users:1: a@example.test: {message}"])

    def test_malformedLegacy(self) -> None:
        """
        A legacy hash that Dovecot could not decode or verify is refused
        with a line naming the problem and the value's length, never any
        of it: it may be a plaintext password.
        """
        sha1 = hashlib.sha1(b"x").digest()
        for stored, message in [
            (
                "{SHA1}" + sha1.hex()[:-4],
                "SHA1: the value of 36 characters is neither 40 hex digits nor",
            ),
            ("{SHA1}" + sha1.hex()[:-2], "nor the base64 of 20 bytes"),
            ("{SHA1.B64}" + sha1.hex()[:-4], "SHA1: the value is 27 bytes long, not 20"),
            ("{SHA1.HEX}" + sha1.hex() + "0", "SHA1: the value of 41 characters is not hex"),
            ("{SHA1.HEX}zz", "SHA1: the value of 2 characters is not hex"),
            (
                "{SHA256}!!!!",
                "SHA256: the value of 4 characters is neither 64 hex digits nor the base64 of 32",
            ),
            (
                "{SHA256}" + "a" * 63 + "=",
                "SHA256: the value of 64 characters is neither 64 hex digits",
            ),
            ("{SHA256.B32}abc", "unknown password scheme {SHA256.B32}"),
            ("{SSHA}" + "QUFBQUFBQUFBQUFBQUFBQUFBQUE=", "SSHA password is too short"),
            ("{SSHA512}abcdef", "SSHA512: the value of 6 characters is not base64"),
            ("{PLAIN-TRUNC}secret", "PLAIN-TRUNC missing length: prefix"),
            ("{PLAIN-TRUNC}0-", "empty PLAIN-TRUNC password"),
            ("{PBKDF2}salt$5000$" + "0" * 40, "a PBKDF2 hash is $1$SALT$ROUNDS$HEX"),
            ("{PBKDF2}$1$salt$5000", "a PBKDF2 hash is $1$SALT$ROUNDS$HEX"),
            ("{PBKDF2}$1$salt$0$" + "0" * 40, "PBKDF2 rounds '0' is not a number from 1"),
            ("{PBKDF2}$1$salt$-1$" + "0" * 40, "PBKDF2 rounds '-1' is not a number from 1"),
            ("{PBKDF2}$1$salt$5000$" + "0" * 39, "PBKDF2 hash not 160bit hex-encoded"),
            ("{MD5-CRYPT}$1$salt", "the value of 7 characters is not an MD5-crypt hash"),
            ("{MD5-CRYPT}$1$123456789$" + "a" * 22, "is not an MD5-crypt hash"),
            (
                "{DES-CRYPT}secret!",
                "the value of 7 characters is not a hash that this system's crypt(3)",
            ),
            (
                "{HMAC-MD5}" + "ab" * 30,
                "HMAC-MD5: the value of 60 characters is neither 64 hex digits",
            ),
            ("{DIGEST-MD5}" + "ab" * 14, "is neither 32 hex digits nor the base64 of 16 bytes"),
            ("{DIGEST-MD5.HEX}" + "ab" * 15, "DIGEST-MD5: the value is 15 bytes long, not 16"),
        ]:
            error = self.assertRaises(ValueError, parse, stored)
            self.assertIn(message, str(error), stored)
            # Not one character of the value: it may be a plaintext password.
            value = stored.partition("}")[2]
            if len(value) >= 5:
                self.assertNotIn(value[:5], str(error), stored)
        error = self.assertRaises(ValueError, parse, "{PLAIN-TRUNC}hunter2")
        self.assertNotIn("hunter2", str(error))

    def test_md4(self) -> None:
        """
        MD4, which OpenSSL 3 keeps out of hashlib by default, gives RFC
        1320's test vectors.
        """
        self.assertEqual(legacyschemes._md4(b"").hex(), "31d6cfe0d16ae931b73c59d7e0c089c0")
        self.assertEqual(legacyschemes._md4(b"abc").hex(), "a448017aaf21d8525fc10ae87aa6729d")
        self.assertEqual(
            legacyschemes._md4(
                b"12345678901234567890123456789012345678901234567890123456789012345678901234567890"
            ).hex(),
            "e33b4ddc9c38f2199c3e7b164fcc0536",
        )


class WeakTests(unittest.TestCase):
    """L{isWeak} names the schemes to warn about and rehash."""

    STRONG = (
        "ARGON2ID",
        "ARGON2I",
        "BLF-CRYPT",
        "SHA512-CRYPT",
        "SHA256-CRYPT",
        "CRYPT",
        "SCRAM-SHA-256",
        "SCRAM-SHA-1",
    )

    def test_everySchemeJudged(self) -> None:
        """
        Every scheme is weak but the slow salted ones; every legacy scheme
        and the password-equivalents are weak, in any case and encoding.
        """
        self.assertEqual(set(SCHEMES), set(WEAK_SCHEMES) | set(self.STRONG))
        for scheme in LEGACY + ["CRAM-MD5", "PLAIN", "CLEAR", "CLEARTEXT"]:
            self.assertTrue(isWeak(scheme), scheme)
            self.assertTrue(isWeak(scheme.lower() + ".hex"), scheme)
        for scheme in self.STRONG:
            self.assertFalse(isWeak(scheme), scheme)
        for login, stored in readVectors("legacy-passwd"):
            self.assertTrue(isWeak(parse(stored)), login)
        for login, stored in readVectors("dovecot-passwd"):
            strong = parse(stored).scheme in self.STRONG
            self.assertEqual(isWeak(parse(stored)), not strong, login)

    def test_cryptByMethod(self) -> None:
        """
        A CRYPT (or DES-CRYPT) hash is judged by the crypt(3) method it
        names: DES and MD5-crypt are weak; bcrypt, SHA-crypt and yescrypt not.
        """
        more = dict(readVectors("more-passwd"))
        des = dict(readVectors("legacy-passwd"))["alice.bare-des-crypt@example.test"]
        self.assertTrue(isWeak(parse("{CRYPT}" + des)))
        self.assertTrue(isWeak(parse("{CRYPT}" + more["utf8.bare-md5crypt@example.test"])))
        for login in ("bare-yescrypt", "bare-sha-512", "bare-bcrypt"):
            stored = more[f"utf8.{login}@example.test"]
            self.assertFalse(isWeak(parse("{CRYPT}" + stored)), login)
            self.assertFalse(isWeak(parse("{DES-CRYPT}" + stored)), login)


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
        error = self.assertRaises(ValueError, parse, "{NTLM}abcdef")
        self.assertIn("{NTLM}", str(error))
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

    def test_costBounded(self) -> None:
        """
        A hash whose parameters ask for more work or memory than mailauth
        verifies is refused when it is read, naming the parameter: each
        guess at its login would otherwise allocate gigabytes (argon2 with
        m=4 GiB, yescrypt with N=2**19 and r=32) or hold an auth thread for
        hours (bcrypt cost 31, SHA-crypt with a billion rounds, the legacy
        crypt(3) methods' iterations). Costly but bounded ones are still
        read.
        """
        argon = (
            "$argon2id$v=19$m=65536,t=3,p=1$vNKqkK8DQa5S4Jc06HUpwg"
            "$x7iCyjA2f/7FGLmp8BlZlHPNy3UXmjy30VTVz5mvJEE"
        )
        sha = "$6$rounds=ROUNDS$salt$" + "a" * 86
        yes = "$y$j9T$cJT0MCwdsCq4Y2u0tkdCj.$" + "a" * 43
        refused = {
            "{ARGON2ID}" + argon.replace("m=65536", "m=4194304"): "m=4194304 KiB",
            argon.replace("m=65536", "m=2097152").replace("t=3", "t=5"): "m=2097152,t=5",
            argon.replace("t=3", "t=4294967295"): "t=4294967295",
            "{ARGON2I}" + argon.replace("argon2id", "argon2i").replace("p=1", "p=255"): "p=255",
            "{BLF-CRYPT}$2y$31$" + "a" * 53: "bcrypt cost 31",
            "$2b$18$" + "a" * 53: "bcrypt cost 18",
            sha.replace("ROUNDS", "999999999"): "rounds=999999999",
            "{CRYPT}" + sha.replace("ROUNDS", "10000001"): "rounds=10000001",
            "{PBKDF2}$1$salt$4294967295$" + "a" * 40: "PBKDF2 rounds '4294967295'",
            # yescrypt's N is 2**18 at libxcrypt's costliest (jFT, 1 GiB).
            yes.replace("j9T", "jHT"): "yescrypt $y$jHT asks for 4096 MiB",
            "{CRYPT}" + yes.replace("$y$j9T", "$gy$jIT"): "$gy$jIT asks for 8192 MiB",
            yes.replace("j9T", "jGT/1"): "$y$jGT/1 asks for more work",
            "$7$Z6..../....SodiumChloride$" + "a" * 43: "scrypt $7$Z6",
            "$sha1$4294967295$saltsalt$" + "a" * 28: "$sha1$4294967295 asks for more",
            "$md5,rounds=20000000$salt$" + "a" * 22: "$md5,rounds=20000000 asks for more",
            "$md5$rounds=4000000000$salt$$" + "a" * 22: "$md5$rounds=4000000000 asks for more",
            # strtoul reads "-1" as the largest count of all.
            "$sha1$-1$saltsalt$" + "a" * 28: "$sha1$-1: the iteration count is not a plain",
            "{CRYPT}$sha1$+99999999999$saltsalt$" + "a" * 28: "is not a plain number",
            "{CRYPT}_zzzzsalt" + "a" * 11: "BSDi DES-crypt count 16777215",
        }
        for stored, named in refused.items():
            error = self.assertRaises(ValueError, parse, stored)
            self.assertIn(named, str(error))
        for stored in (
            argon.replace("m=65536", "m=2097152").replace("t=3", "t=4"),
            argon.replace("p=1", "p=16"),
            "$2y$17$" + "a" * 53,
            sha.replace("ROUNDS", "10000000"),
            "{PBKDF2}$1$salt$10000000$" + "a" * 40,
            yes,
            yes.replace("j9T", "jFT"),
            yes.replace("j9T", "jGT/0"),
            "{CRYPT}" + yes.replace("$y$", "$gy$"),
            "$7$C6..../....SodiumChloride$" + "a" * 43,
            "$sha1$40000$saltsalt$" + "a" * 28,
            "$md5$rounds=5000$salt$$" + "a" * 22,
            "{CRYPT}_J9..salt" + "a" * 11,
        ):
            parse(stored)

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

    # What each scheme's hash of b"correct" looks like; doveadm's bcrypt
    # cost is 5, ours 10; PLAIN-TRUNC has the length that doveadm leaves out.
    B64 = "[A-Za-z0-9+/]"
    CRYPT64 = "[./A-Za-z0-9]"
    FORMATS = {
        "ARGON2ID": rf"\$argon2id\$v=19\$m=65536,t=3,p=1\${B64}{{22}}\${B64}{{43}}",
        "ARGON2I": rf"\$argon2i\$v=19\$m=32768,t=4,p=1\${B64}{{22}}\${B64}{{43}}",
        "BLF-CRYPT": rf"\$2y\$10\${CRYPT64}{{53}}",
        "SHA512-CRYPT": rf"\$6\${CRYPT64}{{16}}\${CRYPT64}{{86}}",
        "SHA256-CRYPT": rf"\$5\${CRYPT64}{{16}}\${CRYPT64}{{43}}",
        "CRYPT": rf"\$2y\$10\${CRYPT64}{{53}}",
        "MD5-CRYPT": rf"\$1\${CRYPT64}{{8}}\${CRYPT64}{{22}}",
        "MD5": rf"\$1\${CRYPT64}{{8}}\${CRYPT64}{{22}}",
        "DES-CRYPT": rf"{CRYPT64}{{13}}",
        "CRAM-MD5": r"[0-9a-f]{64}",
        "HMAC-MD5": r"[0-9a-f]{64}",
        "PLAIN": r"correct",
        "CLEAR": r"correct",
        "CLEARTEXT": r"correct",
        "SHA": rf"{B64}{{27}}=",
        "SHA1": rf"{B64}{{27}}=",
        "SHA256": rf"{B64}{{43}}=",
        "SHA512": rf"{B64}{{86}}==",
        "SSHA": rf"{B64}{{32}}",
        "SSHA256": rf"{B64}{{48}}",
        "SSHA512": rf"{B64}{{91}}=",
        "SMD5": rf"{B64}{{27}}=",
        "PLAIN-MD4": r"[0-9a-f]{32}",
        "PLAIN-MD5": r"[0-9a-f]{32}",
        "LDAP-MD5": rf"{B64}{{22}}==",
        "PLAIN-TRUNC": r"7-correct",
        "PBKDF2": rf"\$1\${CRYPT64}{{16}}\$5000\$[0-9a-f]{{40}}",
        "DIGEST-MD5": r"[0-9a-f]{32}",
        "SCRAM-SHA-256": rf"4096,{B64}{{22}}==,{B64}{{43}}=,{B64}{{43}}=",
        "SCRAM-SHA-1": rf"4096,{B64}{{22}}==,{B64}{{27}}=,{B64}{{27}}=",
    }

    def test_everyScheme(self) -> None:
        """
        Each scheme's hash has doveadm's form and verifies with its password.
        """
        self.assertEqual(set(self.FORMATS), set(SCHEMES))
        for scheme in SCHEMES:
            made = makeHash(b"correct", scheme, login="alice@example.test")
            self.assertRegex(made, "^" + re.escape(f"{{{scheme}}}") + self.FORMATS[scheme] + "$")
            self.assertTrue(verify(parse(made), b"correct", "alice@example.test"), scheme)
            if isWeak(scheme):
                self.assertFalse(verify(parse(made), b"Correct", "alice@example.test"), scheme)

    def test_doveadmVerifiesEveryScheme(self) -> None:
        """
        Dovecot's own C{doveadm pw -t} verifies every scheme's hash as made
        by L{makeHash}, the legacy ones in every encoding.
        """
        doveadm = shutil.which("doveadm") or "/usr/bin/doveadm"
        if not os.path.exists(doveadm):
            self.fail("doveadm is missing: install Debian's dovecot-core")
        for scheme in SCHEMES:
            # The slow schemes once: doveadm verifies argon2 with 64 MiB.
            for suffix in ("", ".B64", ".HEX") if isWeak(scheme) else ("",):
                made = makeHash("pässwö".encode(), scheme + suffix, login="a@example.test")
                result = subprocess.run(
                    [doveadm, "pw", "-u", "a@example.test", "-t", made, "-p", "pässwö"],
                    capture_output=True,
                    text=True,
                )
                self.assertEqual(result.returncode, 0, f"{made}: {result.stderr}")
                self.assertTrue(result.stdout.endswith("(verified)\n"), result.stdout)

    def test_encodingSuffix(self) -> None:
        """
        A C{.B64}, C{.BASE64} or C{.HEX} suffix, in any case, chooses the
        encoding, as doveadm does; it is kept in the scheme's name.
        """
        digest = hashlib.sha256(b"x").digest()
        self.assertEqual(makeHash(b"x", "sha256.hex"), "{SHA256.HEX}" + digest.hex())
        # As doveadm pw -s CRAM-MD5.b64 -p x prints it.
        self.assertEqual(
            makeHash(b"x", "CRAM-MD5.b64"),
            "{CRAM-MD5.B64}RjjHfxpwxv2k3fpvvjTm7gkKDwCI8V2o/tXgpf8rQVI=",
        )
        self.assertEqual(makeHash(b"x", "PLAIN.Base64"), "{PLAIN.BASE64}eA==")
        self.assertEqual(parse("{PLAIN.BASE64}eA=="), PasswordHash("PLAIN", "eA==", "BASE64"))
        self.assertEqual(schemeName("ssha512.hex"), "SSHA512.HEX")
        self.assertRaises(ValueError, schemeName, "SSHA512.B32")

    def test_digestMD5NeedsLogin(self) -> None:
        """
        DIGEST-MD5 is made from the login too (C{doveadm pw -u}): without
        one, L{makeHash} says so.
        """
        error = self.assertRaises(ValueError, makeHash, b"x", "DIGEST-MD5")
        self.assertIn("login", str(error))
        made = makeHash(b"x", "DIGEST-MD5", login="bob@example.test")
        self.assertEqual(made, "{DIGEST-MD5}" + hashlib.md5(b"bob:example.test:x").hexdigest())

    def test_desCryptRefusesLongPasswords(self) -> None:
        """
        DES-CRYPT reads only 8 bytes of a password, so a longer one is
        refused rather than silently cut, as for bcrypt.
        """
        error = self.assertRaises(ValueError, makeHash, b"123456789", "DES-CRYPT")
        self.assertEqual(str(error), "DES-CRYPT uses only the first 8 bytes of a password")
        self.assertRaises(ValueError, makeHash, b"a\0b", "DES-CRYPT")
        self.assertTrue(verify(parse(makeHash(b"12345678", "DES-CRYPT")), b"12345678"))

    def test_defaultScheme(self) -> None:
        """
        New hashes are ARGON2ID unless a scheme is named, in any case.
        """
        self.assertEqual(passwords.DEFAULT_SCHEME, "ARGON2ID")
        self.assertTrue(makeHash(b"x", "sha512-crypt").startswith("{SHA512-CRYPT}$6$"))

    def test_freshSalt(self) -> None:
        """
        Two hashes of one password differ, for every salted scheme.
        """
        for scheme in ("SHA512-CRYPT", "BLF-CRYPT", "SSHA", "SMD5", "PBKDF2", "MD5", "DES-CRYPT"):
            self.assertNotEqual(makeHash(b"x", scheme), makeHash(b"x", scheme), scheme)

    def test_unknownScheme(self) -> None:
        """
        An unknown scheme is a L{ValueError}.
        """
        self.assertRaises(ValueError, makeHash, b"x", "NTLM")
        self.assertRaises(ValueError, makeHash, b"x", "SHA256.B32")

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
        for scheme in ("CRAM-MD5", "HMAC-MD5", "HMAC-MD5.B64"):
            stored = parse(makeHash(password, scheme))
            self.assertEqual(cramMD5Digest(stored, challenge), hmacMD5(password, challenge))
            self.assertTrue(verify(stored, password))
