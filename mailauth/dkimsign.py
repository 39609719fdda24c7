"""DKIM signatures (RFC 6376, RFC 8463) on submitted mail, the body hashed as it streams in."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import attrs
import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy
from twisted.logger import Logger

from mailauth.addresses import domainKey
from mailauth.config import Config, ConfigError, parseDomain, parseSelector
from mailauth.durable import fsyncDirectory
from mailauth.fromheader import MAX_HEADER, HeaderSection

RSA = "rsa"
ED25519 = "ed25519"
KEY_TYPES = (RSA, ED25519)
RSA_BITS = 2048
# RFC 8301 3.2: verifiers must not accept shorter RSA keys.
RSA_MIN_BITS = 1024

#: Header fields signed as often as they occur: RFC 6376 5.4.1's list (as
#: dkimpy's C{DKIM.SHOULD}), plus List-Unsubscribe-Post (RFC 8058 asks for it).
SIGNED_HEADERS = frozenset(
    name.encode("ascii")
    for name in (
        "from sender reply-to subject date message-id to cc mime-version content-type "
        "content-transfer-encoding content-id content-description resent-date resent-from "
        "resent-sender resent-to resent-cc resent-message-id in-reply-to references list-id "
        "list-help list-unsubscribe list-unsubscribe-post list-subscribe list-post list-owner "
        "list-archive"
    ).split()
)
#: Header fields signed once more than they occur, so that nobody can add
#: one (a second From: that a mail reader might show) without breaking the
#: signature (RFC 6376 8.15), as Debian's OpenDKIM does by default.
OVERSIGNED_HEADERS = (b"from",)
#: The largest header block held for signing (the one limit of the header
#: collector the From: check shares); a message whose header block is
#: larger cannot be signed.
MAX_HEADER_SIZE = MAX_HEADER

_RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
_ALGORITHMS = {RSA: b"rsa-sha256", ED25519: b"ed25519-sha256"}
_FIELD_NAME = b"DKIM-Signature"

log = Logger(namespace="mailauth.dkimsign")
_CRLFS = b"\r\n" * 4096


class SigningError(Exception):
    """
    A message could not be signed (a fault of the key or the signing code);
    it must not go out unsigned: the session answers with a temporary 4xx.
    """


class MessageNotSignable(SigningError):
    """
    The message itself cannot be signed: its header block does not parse or
    is too large. Sending it again will not help.
    """


class KeyFileError(Exception):
    """A key file cannot be used; the message names the file and why."""


@attrs.frozen
class SigningKey:
    """
    A private key of a signing domain, read from its PEM file.

    @ivar domain: the signing domain, C{d=}.
    @ivar selector: C{s=}: the public key is at C{selector._domainkey.domain}.
    @ivar path: the PEM file it was read from.
    @ivar keyType: C{"rsa"} or C{"ed25519"}, the C{k=} of its DNS record.
    @ivar publicKey: the C{p=} of its DNS record (base64).
    @ivar private: the private key, of the C{cryptography} package.
    @ivar pem: the same as PKCS#8 PEM, for the signing process
        (L{mailauth.signerproc}).
    """

    domain: str
    selector: str
    path: str
    keyType: str
    publicKey: str
    private: Any = attrs.field(repr=False, eq=False)
    pem: bytes = attrs.field(repr=False, eq=False, default=b"")

    @property
    def algorithm(self) -> bytes:
        """The C{a=} of its signatures."""
        return _ALGORITHMS[self.keyType]

    def sign(self, digest: bytes) -> bytes:
        """
        Sign the SHA-256 C{digest} of the canonical header fields: RSASSA-
        PKCS1-v1_5 (RFC 6376 3.3.1), or Ed25519 over the digest itself
        (RFC 8463 3). Both are deterministic: the bytes dkimpy's own
        C{RSASSA_PKCS1_v1_5_sign} and PyNaCl's C{SigningKey.sign} give.
        """
        if self.keyType == RSA:
            return self.private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        return self.private.sign(digest)

    def record(self) -> str:
        """The text of the DNS TXT record that publishes the public key."""
        return txtRecord(self.keyType, self.publicKey)

    def zoneLine(self) -> str:
        """That record as a line of a zone file: L{zoneLine}."""
        return zoneLine(self.domain, self.selector, self.record())


def txtRecord(keyType: str, publicKey: str) -> str:
    """The DKIM key record (RFC 6376 3.6.1) of a public key of type C{keyType}."""
    return f"v=DKIM1; k={keyType}; p={publicKey}"


def zoneLine(domain: str, selector: str, record: str) -> str:
    """
    The record as a zone file line: C{selector._domainkey.domain.} IN TXT,
    the text cut into quoted strings of at most 255 octets (RFC 1035 3.3.14;
    a 2048-bit RSA key needs two).
    """
    parts = [record[i : i + 255] for i in range(0, len(record), 255)]
    quoted = " ".join(f'"{part}"' for part in parts)
    return f"{selector}._domainkey.{domain}. IN TXT {quoted}"


def fromPrivateKey(domain: str, selector: str, path: str, key: Any) -> SigningKey:
    """A L{SigningKey} from a key of the C{cryptography} package."""
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < RSA_MIN_BITS:
            raise KeyFileError(
                f"{path}: an RSA key of {key.key_size} bits is too short to sign "
                f"(at least {RSA_MIN_BITS}, {RSA_BITS} recommended)"
            )
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        keyType = RSA
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        # RFC 8463 4.2: p= is the bare 32-octet public key.
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        keyType = ED25519
    else:
        raise KeyFileError(
            f"{path}: a {type(key).__name__.lstrip('_')} cannot make DKIM signatures "
            "(RSA or Ed25519 only)"
        )
    return SigningKey(
        domain=domain,
        selector=selector,
        path=path,
        keyType=keyType,
        publicKey=base64.b64encode(public).decode("ascii"),
        private=key,
        pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def loadKey(domain: str, selector: str, path: str) -> SigningKey:
    """
    Read the private key in the PEM file C{path} (PKCS#8 or PKCS#1, not
    encrypted); its type, RSA or Ed25519, is read from the file.

    @raise KeyFileError: if it cannot be read or parsed, is not an RSA (of
        at least 1024 bits) or Ed25519 key, or is readable by every user
        or writable by others than its owner (as OpenDKIM's
        C{RequireSafeKeys}).
    """
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read: {e.strerror}") from None
    if mode & 0o027:
        raise KeyFileError(
            f"{path}: mode {stat.S_IMODE(mode):04o} lets other users read or change "
            "the private key: chmod 0640 it"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"{path}: the key is encrypted; store it without a passphrase") from None
    except ValueError:
        raise KeyFileError(f"{path}: not a PEM private key (RSA or Ed25519)") from None
    except Exception as e:  # cryptography's UnsupportedAlgorithm, among others
        raise KeyFileError(f"{path}: cannot load the key: {e}") from None
    return fromPrivateKey(domain, selector, path, key)


def loadKeys(config: Config) -> dict:
    """
    Read every key of the configuration's [dkim] section: what
    C{check-config} and the daemon's start call.

    @return: a dict of signing domain to its tuple of L{SigningKey}s.
    @raise ConfigError: with one line per key that cannot be used, naming
        the configuration, the domain and the key file.
    """
    keys: dict = {}
    problems = []
    for domain, entries in config.dkim.items():
        loaded = []
        for entry in entries:
            try:
                loaded.append(loadKey(domain, entry.selector, entry.keyfile))
            except KeyFileError as e:
                problems.append(f"{config.path}: [dkim] {domain}: {e}")
        keys[domain] = tuple(loaded)
    if problems:
        raise ConfigError(problems)
    return keys


class KeyRing:
    """
    The signing keys by domain, and the signers made from them.

    A message is signed when the domain of its envelope sender is one of
    the signing domains, compared exactly (without regard to case or a
    trailing dot): a key for C{example.org} does not sign mail from
    C{lists.example.org}. That is OpenDKIM's default (C{SubDomains no}),
    keeps C{d=} equal to the sender's domain (strict DMARC alignment) and
    never signs for a domain nobody listed.
    """

    def __init__(
        self,
        keys: Mapping[str, Sequence[SigningKey]],
        clock: Any,
        maxHeaderSize: int = MAX_HEADER_SIZE,
        load: Optional[Callable[[], Mapping[str, Sequence[SigningKey]]]] = None,
    ) -> None:
        """
        @param keys: signing domain (lower case, no trailing dot) to its keys.
        @param clock: an C{IReactorTime}, for the C{t=} of signatures.
        @param load: reads the keys again, for L{reload} (L{loadKeys} of the
            configuration), raising L{ConfigError} for a key it cannot use.
        """
        self._keys = self._usable(keys)
        self._clock = clock
        self.maxHeaderSize = maxHeaderSize
        self._load = load

    @staticmethod
    def _usable(keys: Mapping[str, Sequence[SigningKey]]) -> dict:
        return {domain: tuple(found) for domain, found in keys.items() if found}

    def reload(self) -> None:
        """
        On SIGHUP: read every key file again, so that a key replaced in place
        (a rotation under the same selector, or a file fixed) signs from now
        on. If any key cannot be used, log why and go on with every key read
        before: never with some keys missing. Messages being signed keep the
        keys they started with.
        """
        if self._load is None:
            return
        try:
            keys = self._usable(self._load())
        except ConfigError as e:
            for problem in e.problems:
                log.error(
                    "DKIM keys not reloaded, signing with the old ones: {problem}", problem=problem
                )
            return
        self._keys = keys
        log.info(
            "DKIM keys reloaded: {count} key(s) for {domains}",
            count=sum(len(found) for found in keys.values()),
            domains=" ".join(sorted(keys)),
        )

    def keysFor(self, sender: str) -> tuple:
        """
        The keys that sign mail from the envelope sender C{sender}
        (C{local@domain}; an internationalised domain matches its A-label, as
        L{mailauth.addresses.domainKey} writes it).
        """
        local, at, domain = sender.rpartition("@")
        if not at or not local:
            return ()
        # The form every other domain comparison uses (IDNA 2008): Python's
        # "idna" codec (IDNA 2003) would read fa\u00df.de as fass.de.
        return self._keys.get(domainKey(domain), ())

    def signer(self, sender: str) -> Optional[MessageSigner]:
        """
        A new L{MessageSigner} for one message from C{sender}, or L{None}
        if mail from C{sender} is not signed (no key for its domain, or the
        null sender).
        """
        keys = self.keysFor(sender)
        if not keys:
            return None
        return MessageSigner(keys, self._clock, self.maxHeaderSize)


class RelaxedBodyHash:
    """
    The SHA-256 of a message body under relaxed canonicalisation (RFC 6376
    3.4.4), computed over chunks that may split the body anywhere, even
    inside a CRLF or a run of spaces, with the same result as dkimpy's
    C{Relaxed.canonicalize_body} of the whole body.

    Each chunk is worked on with bulk bytes operations. What the next chunk
    may still change is held back: trailing whitespace (kept as a single
    space: a run of any length canonicalises like one), a final CR (maybe
    half a CRLF), and a count of trailing empty lines (dropped if nothing
    but empty lines follows). So memory stays constant whatever the size.

    The input is in SMTP form: a CR or LF outside a CRLF pair is an ordinary
    byte here (the session refuses such messages).
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._tail = b""
        self._emptyLines = 0
        self._midLine = False

    def update(self, chunk: bytes) -> None:
        """Hash the next C{chunk} of the body."""
        data = self._tail + chunk if self._tail else chunk
        last = data[-1:]
        if last in (b" ", b"\t", b"\r"):
            end = len(data) - 1 if last == b"\r" else len(data)
            head = data[:end].rstrip(b" \t")
            self._tail = (b" " if end > len(head) else b"") + (b"\r" if end < len(data) else b"")
        else:
            head, self._tail = data, b""
        if head:
            self._canonical(head)

    def _canonical(self, head: bytes) -> None:
        """Hash C{head}, which ends neither in whitespace nor in CR."""
        # Every run of spaces and tabs becomes one space: a tab is a space,
        # and each pass halves the longer runs (bulk replace beats a regex
        # with a match every few words).
        if b"\t" in head:
            head = head.replace(b"\t", b" ")
        # A chunk without a space (base64, the bulk of most large messages)
        # has nothing to change: a one-byte test (memchr) spares it the two
        # searches for two- and three-byte strings, each several times slower.
        if b" " in head:
            while b"  " in head:
                head = head.replace(b"  ", b" ")
            # Every run is one space now, so this strips all whitespace at ends of lines.
            if b" \r\n" in head:
                head = head.replace(b" \r\n", b"\r\n")
        end, newlines = len(head), 0
        if head.endswith(b"\r\n\r\n"):
            body = head.rstrip(b"\r\n")
            run = len(head) - len(body)
            if head.count(b"\r\n", len(body)) * 2 == run:
                end, newlines = len(body), run // 2
        while head.endswith(b"\r\n", 0, end):
            end -= 2
            newlines += 1
        if end:
            _hashEmptyLines(self._hash, self._emptyLines)
            self._hash.update(memoryview(head)[:end])
            if newlines:
                # The CRLF that ends this line; the ones after it end empty lines.
                self._hash.update(b"\r\n")
            self._emptyLines = max(newlines - 1, 0)
            self._midLine = not newlines
        else:
            if self._midLine:
                self._hash.update(b"\r\n")
                newlines -= 1
                self._midLine = False
            self._emptyLines += newlines

    def digest(self) -> bytes:
        """
        The hash of the body so far, taken as the whole body: trailing empty
        lines dropped, a last line without CRLF given one (an empty body
        hashes as nothing). More may be written afterwards.
        """
        h = self._hash.copy()
        if self._tail:
            _hashEmptyLines(h, self._emptyLines)
            h.update(self._tail + b"\r\n")
        elif self._midLine:
            h.update(b"\r\n")
        return h.digest()


def _hashEmptyLines(h: Any, count: int) -> None:
    """Hash C{count} CRLFs, a bounded block at a time."""
    while count > 0:
        h.update(_CRLFS[: 2 * count])
        count -= len(_CRLFS) // 2


#: The bytes a header field name may hold where dkimpy's C{rfc822_parse}
#: reads one: printable ASCII, no space (its first colon ends the name).
_NAME_BYTES = bytes(range(0x21, 0x7F))
_UNPARSEABLE = (
    "cannot sign the message: its header does not parse "
    "(a line that is neither a header field nor the continuation of one)"
)


def parseHeader(block: bytes) -> list:
    """
    The header fields of C{block} (CRLF line ends; it ends at an empty
    line) as C{[name, value]} pairs, top first, each value with its line
    ends: what dkimpy's C{rfc822_parse} makes of it (the tests compare the
    two), with bytes operations rather than a regular expression a line,
    and folded lines joined once, not copied again for each.

    @raise MessageNotSignable: for a line that is neither a field nor the
        continuation of one (an mbox C{From } line is skipped, as dkimpy
        does).
    """
    fields: list = []
    for line in block.split(b"\r\n"):
        if not line:
            break
        if line[0] in (0x09, 0x20):
            if not fields:
                raise MessageNotSignable(_UNPARSEABLE)
            fields[-1][1].append(line)
            continue
        colon = line.find(b":")
        if colon > 0 and not line[:colon].translate(None, _NAME_BYTES):
            fields.append((line[:colon], [line[colon + 1 :]]))
        elif not line.startswith(b"From "):
            raise MessageNotSignable(_UNPARSEABLE)
    return [[name, b"\r\n".join(lines) + b"\r\n"] for name, lines in fields]


class _Relaxed:
    """
    dkimpy's relaxed header canonicalisation (RFC 6376 3.4.2: name in lower
    case, value unfolded, runs of spaces and tabs made one space, stripped)
    with bytes operations: two regular expression substitutions a field
    were a third of the cost of a signature. C{hash_headers} takes it in
    place of dkimpy's; the tests compare the two.
    """

    @staticmethod
    def canonicalize_headers(headers: Sequence) -> list:
        return [(name.lower().rstrip(), _relaxedValue(value)) for name, value in headers]


def _relaxedValue(value: bytes) -> bytes:
    # dkimpy unfolds CRLF and bare LF alike.
    value = value.replace(b"\r\n", b"")
    if b"\n" in value:
        value = value.replace(b"\n", b"")
    if b"\t" in value:
        value = value.replace(b"\t", b" ")
    # Splitting at single spaces leaves an empty word for every space more
    # in a run and at either end: dropping them compresses and strips.
    return b" ".join([word for word in value.split(b" ") if word]).strip() + b"\r\n"


def signatureField(
    key: SigningKey, headers: Sequence, include: Sequence[bytes], bodyHash: bytes, timestamp: int
) -> bytes:
    """
    The C{DKIM-Signature} field, built as dkimpy's C{DKIM.sign} and
    C{gen_header} build it: the same tags in the same order and folding,
    the header fields selected by dkimpy's own C{select_headers} and
    hashed as its C{hash_headers} hashes them (canonicalised by
    L{_Relaxed}, which does what dkimpy's does). The
    private-key operation is not dkimpy's: its RSA is pure Python (about 5
    ms of CPU a signature, holding the GIL, against 0.25 ms for OpenSSL's),
    so L{SigningKey.sign} asks OpenSSL through C{cryptography} for the same
    bytes.

    @param headers: the message's C{(name, value)} pairs that may be signed,
        top first, as L{parseHeader} returns them, then canonicalised
        (relaxed).
    @param include: the C{h=} list, lower case.
    @param bodyHash: the C{bh=} value (base64).
    @return: the folded field, ending in CRLF.
    """
    domain = key.domain.encode("ascii")
    fields = [
        (b"v", b"1"),
        (b"a", key.algorithm),
        (b"c", _RELAXED.to_c_value()),
        (b"d", domain),
        (b"i", b"@" + domain),
        (b"q", b"dns/txt"),
        (b"s", key.selector.encode("ascii")),
        (b"t", str(timestamp).encode("ascii")),
        (b"h", b" : ".join(include)),
        (b"bh", bodyHash),
        # As dkimpy does: b= folds onto its own line.
        (b"b", b"0" * 60),
    ]
    value = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(_FIELD_NAME))
    # What dkimpy's hash_headers hashes, in one update instead of three a
    # field: the selected fields, then this field with the b= value taken
    # out, relaxed, without its final CRLF. The b= tag is the last one and
    # holds only the placeholder, so taking it out is cutting the value
    # after "b=": what dkimpy's RE_BTAG does, which takes longer (about 6
    # microseconds) than the rest of the hashing.
    end = value.rindex(b"b=") + 2
    if value[end:].translate(None, b"0 \t\r\n"):
        raise SigningError(f"unexpected b= tag in {value!r}")
    unsigned = b" " + value[:end]
    selected = dkim.select_headers(headers, list(include))
    h = hashlib.sha256(
        b"".join([name + b":" + text for name, text in selected])
        + _FIELD_NAME.lower()
        + b":"
        + _relaxedValue(unsigned).rstrip()
    )
    fields[-1] = (b"b", base64.b64encode(key.sign(h.digest())))
    value = b"; ".join(b"=".join(f) for f in fields) + b"\r\n"
    return _FIELD_NAME + b": " + dkim.fold(value, namelen=len(_FIELD_NAME))


def signedHeaderNames(headers: Sequence) -> list:
    """
    The C{h=} list for a message with C{headers} (C{(name, value)} pairs, top
    first): each field of L{SIGNED_HEADERS} as often as it occurs, in the
    message's order, then each of L{OVERSIGNED_HEADERS} once more.
    """
    names = [name.lower() for name, _ in headers if name.lower() in SIGNED_HEADERS]
    return names + list(OVERSIGNED_HEADERS)


#: The most body bytes a L{MessageSigner} holds for hashing in the signing
#: thread; whenever more are held they are hashed there and then (on the
#: reactor), so memory does not grow with the message (as
#: L{mailauth.maildir.SPOOL}).
HELD_BODY = 64 * 1024


class MessageSigner:
    """
    Signs one message while it streams through: L{write} (on the reactor
    thread, cheap) keeps the header block and the body; once the message is
    complete, L{signatureHeader} (CPU work: call it in a thread) hashes the
    body and makes the C{DKIM-Signature} field(s) to put on top of it.

    The body is held (references to the chunks, no copy) and hashed in
    L{signatureHeader}, off the reactor; whenever more than L{HELD_BODY}
    bytes are held, they are hashed at once, so a large message is hashed
    as it streams in, in bounded memory.

    @ivar header: the header block, as far as it is kept: the one copy of
        it, which others that need the header section (the C{From:}
        check) read rather than keep their own.
    """

    def __init__(
        self,
        keys: Sequence[SigningKey],
        clock: Any,
        maxHeaderSize: int = MAX_HEADER_SIZE,
        holdBody: int = HELD_BODY,
    ) -> None:
        """
        @param holdBody: the most body bytes held for L{signatureHeader} to
            hash (L{HELD_BODY}); 0 hashes every chunk as it comes.
        """
        self.keys = tuple(keys)
        self._holdBody = holdBody
        self._clock = clock
        self.header = HeaderSection(maxHeaderSize)
        self.maxHeaderSize = maxHeaderSize
        self._body = RelaxedBodyHash()
        self._held: list = []
        self._heldSize = 0
        self._hashed = False

    def write(self, chunk: bytes) -> None:
        """
        Take the next chunk of the message, in canonical SMTP form (CRLF line
        ends, dot-stuffing undone); chunks may end anywhere. Never raises: a
        message that cannot be signed is reported by L{signatureHeader}.
        """
        body = self.header.write(chunk)
        if body:
            self._held.append(body)
            self._heldSize += len(body)
            if self._heldSize > self._holdBody:
                self._hashHeld()

    def _hashHeld(self) -> None:
        """Hash the body held so far, chunk by chunk (joining them would copy them)."""
        held, self._held, self._heldSize = self._held, [], 0
        self._hashed = self._hashed or bool(held)
        for chunk in held:
            self._body.update(chunk)

    def heldMessage(self) -> Optional[bytes]:
        """
        The message as written so far, which a new signer given it in one
        L{write} signs alike; or L{None} when part of the body is hashed
        already (past L{HELD_BODY}) or the header is too large to sign.
        """
        if self._hashed or self.header.tooLong:
            return None
        head = self.header.value()
        if self.header.complete:
            head += b"\r\n"
        return b"".join([head, *self._held])

    def signatureHeader(self) -> bytes:
        """
        Blocking (CPU): the C{DKIM-Signature:} header field of each key,
        folded, each ending in CRLF, to be put on top of the message. Call it
        after the last L{write}, never while writing.

        @raise MessageNotSignable: if the header block is too large or does
            not parse (a line that is neither a field nor its continuation).
        @raise SigningError: if the key fails to sign.
        """
        if self.header.tooLong:
            raise MessageNotSignable(
                f"cannot sign the message: its header is larger than {self.maxHeaderSize} bytes"
            )
        # Without an empty line, the whole message is its header.
        self._hashHeld()
        headers = parseHeader(self.header.value())
        bodyHash = base64.b64encode(self._body.digest())
        include = signedHeaderNames(headers)
        # Only the fields that may be signed: selecting from them picks what
        # selecting from all would, and canonicalising the rest is wasted.
        canonical = _Relaxed.canonicalize_headers(
            [field for field in headers if field[0].lower() in SIGNED_HEADERS]
        )
        timestamp = int(self._clock.seconds())
        fields = []
        for key in self.keys:
            try:
                fields.append(signatureField(key, canonical, include, bodyHash, timestamp))
            except Exception as e:
                raise SigningError(f"cannot sign with {key.path}: {e!r}") from e
        return b"".join(fields)


# -- mailauth dkim keygen -----------------------------------------------------


def defaultSelector(keyType: str, now: float) -> str:
    """
    C{mailYYYYMM} (the month C{now} falls in, local time), with C{e} added
    for Ed25519, so that both keys of a month can sit side by side.
    """
    return time.strftime("mail%Y%m", time.localtime(now)) + ("e" if keyType == ED25519 else "")


def generateKey(keyType: str) -> Any:
    """A new private key of the C{cryptography} package: RSA-2048 or Ed25519."""
    if keyType == RSA:
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    if keyType == ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {keyType!r} (known: {', '.join(KEY_TYPES)})")


def keygen(
    domain: str, selector: Optional[str], keyType: str, keydir: str, now: float
) -> SigningKey:
    """
    Make a key for C{domain}: write C{keydir/domain.selector.pem} (PKCS#8
    PEM, mode 0640, never over an existing file), creating C{keydir} (mode
    0750) if it is missing.

    @param selector: the selector, or L{None} for L{defaultSelector}.
    @param now: the time, for the default selector.
    @return: the new key; its L{SigningKey.zoneLine} is what to publish.
    @raise ValueError: for a bad domain, selector or type.
    @raise FileExistsError: if the file exists.
    @raise OSError: if it cannot be written.
    """
    domain = parseDomain(domain)
    selector = parseSelector(selector if selector is not None else defaultSelector(keyType, now))
    key = generateKey(keyType)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if not os.path.isdir(keydir):
        os.makedirs(keydir, mode=0o750)
    path = os.path.join(keydir, f"{domain}.{selector}.pem")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            # Whatever the umask: the daemon's group may read it, nobody else.
            os.fchmod(fd, 0o640)
            view = memoryview(pem)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        fsyncDirectory(keydir)
    except BaseException:
        os.unlink(path)
        raise
    return fromPrivateKey(domain, selector, path, key)
