"""The server's TLS context: TLS 1.2 or newer, modern ciphers, reloadable."""

from __future__ import annotations

import calendar
import re
import time
from typing import Any, Callable, cast

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import Logger
from zope.interface import implementer

log = Logger(namespace="mailauth.tls")

# Forward-secret AEAD suites only for TLS 1.2; TLS 1.3 suites are OpenSSL's
# defaults, all of them modern.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)
_PEM_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")


class TLSError(Exception):
    """The certificate or key cannot be used; the message says why."""


class _Encrypted(Exception):
    """Raised by the passphrase callback: the key wants a passphrase we never have."""


def _noPassphrase(*args: object) -> bytes:
    # Without a callback, OpenSSL asks for the passphrase on the terminal.
    raise _Encrypted()


def _loadKey(keyPath: str, keyData: bytes) -> crypto.PKey:
    """
    Load a PEM private key that is not encrypted.

    @raise TLSError: if it is encrypted (never prompting for a passphrase)
        or is not a key.
    """
    if not _PEM_KEY.search(keyData):
        raise TLSError(f"{keyPath}: no PEM private key in it")
    try:
        return crypto.load_privatekey(crypto.FILETYPE_PEM, keyData, passphrase=_noPassphrase)
    except _Encrypted:
        raise TLSError(
            f"{keyPath}: the private key is encrypted with a passphrase, which mailauth "
            "cannot ask for: store it decrypted (openssl pkey -in KEY -out NEWKEY), "
            "readable only by root and the daemon's group"
        ) from None
    except crypto.Error as e:
        raise TLSError(f"{keyPath}: bad private key: {_openSSLReason(e)}") from None


def _openSSLReason(error: Exception) -> str:
    """
    The reasons in an OpenSSL error list, without the library and function
    names: C{[('PEM routines', '', 'no start line')]} becomes
    C{no start line}.
    """
    reasons = []
    for entry in error.args[0] if error.args and isinstance(error.args[0], list) else ():
        if isinstance(entry, tuple) and entry and entry[-1] not in reasons:
            reasons.append(str(entry[-1]))
    return "; ".join(reasons) or str(error)


#: A certificate that expires sooner than this is warned about (check-config,
#: and a reload that loads it).
EXPIRY_WARNING = 30 * 86400


def expiryDate(expires: float) -> str:
    """A certificate's expiry, as the log and check-config write it."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires))


def notAfter(certificatePath: str) -> float:
    """
    When the first (leaf) certificate in C{certificatePath} expires.

    @return: a POSIX time.
    @raise TLSError: if the file cannot be read or holds no certificate.
    """
    try:
        with open(certificatePath, "rb") as f:
            pems = _PEM_CERT.findall(f.read())
    except OSError as e:
        raise TLSError(f"{certificatePath}: cannot read certificate: {e.strerror}") from None
    if not pems:
        raise TLSError(f"{certificatePath}: no PEM certificate in it")
    try:
        certificate = crypto.load_certificate(crypto.FILETYPE_PEM, pems[0])
    except crypto.Error as e:
        raise TLSError(f"{certificatePath}: bad certificate: {_openSSLReason(e)}") from None
    return _expiry(certificate, certificatePath)


def _expiry(certificate: crypto.X509, certificatePath: str) -> float:
    """When C{certificate} (from C{certificatePath}) expires, as a POSIX time."""
    stamp = certificate.get_notAfter()
    if stamp is None:
        raise TLSError(f"{certificatePath}: the certificate has no expiry date")
    return float(calendar.timegm(time.strptime(stamp.decode("ascii"), "%Y%m%d%H%M%SZ")))


def loadOptions(certificatePath: str, keyPath: str) -> ssl.CertificateOptions:
    """
    Build L{ssl.CertificateOptions} from a certificate file (the leaf first,
    then any intermediates, as in Let's Encrypt's C{fullchain.pem}) and a
    key file.

    @raise TLSError: naming the file that is wrong.
    """
    try:
        with open(certificatePath, "rb") as f:
            certData = f.read()
    except OSError as e:
        raise TLSError(f"{certificatePath}: cannot read certificate: {e.strerror}") from None
    try:
        with open(keyPath, "rb") as f:
            keyData = f.read()
    except OSError as e:
        raise TLSError(f"{keyPath}: cannot read private key: {e.strerror}") from None
    pems = _PEM_CERT.findall(certData)
    if not pems:
        raise TLSError(f"{certificatePath}: no PEM certificate in it")
    try:
        chain = [crypto.load_certificate(crypto.FILETYPE_PEM, pem) for pem in pems]
    except crypto.Error as e:
        raise TLSError(f"{certificatePath}: bad certificate: {_openSSLReason(e)}") from None
    key = _loadKey(keyPath, keyData)
    options = ssl.CertificateOptions(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(CIPHERS),
    )
    try:
        options.getContext()
    except SSL.Error as e:
        if "key values mismatch" in str(e):
            raise TLSError(f"{keyPath}: private key does not match {certificatePath}") from None
        raise TLSError(f"{certificatePath}, {keyPath}: unusable: {_openSSLReason(e)}") from None
    except Exception as e:
        raise TLSError(f"{certificatePath}, {keyPath}: unusable: {e}") from None
    return options


@implementer(IOpenSSLContextFactory)
class ReloadableTLS:
    """
    An old-style context factory (C{getContext}) whose certificate can be
    replaced while running: connections made after L{reload} use the new
    one, connections already open keep theirs.
    """

    def __init__(
        self, certificatePath: str, keyPath: str, now: Callable[[], float] = time.time
    ) -> None:
        """
        @param now: the time, to tell a certificate that has expired.
        """
        self.certificatePath = certificatePath
        self.keyPath = keyPath
        self.now = now
        self._options = loadOptions(certificatePath, keyPath)

    def reload(self) -> bool:
        """
        Load the files again; on failure keep the current certificate and
        log why. A certificate that has expired is such a failure, as it
        is at start (check-config's error): most likely the wrong file,
        which no client would take; one that expires within
        L{EXPIRY_WARNING} is loaded, with a warning.
        """
        try:
            options = loadOptions(self.certificatePath, self.keyPath)
            # The certificate loaded, not the file again (it may have been
            # replaced in between).
            expires = _expiry(cast(Any, options).certificate, self.certificatePath)
        except TLSError as e:
            log.error("TLS certificate not reloaded, keeping the old one: {why}", why=e)
            return False
        left = expires - self.now()
        if left <= 0:
            log.error(
                "TLS certificate not reloaded, keeping the old one: {why}",
                why=f"{self.certificatePath}: expired on {expiryDate(expires)}: renew it",
            )
            return False
        self._options = options
        log.info("TLS certificate reloaded from {path}", path=self.certificatePath)
        if left < EXPIRY_WARNING:
            log.warn(
                "TLS certificate {path} expires on {date}, in {days} day(s): renew it",
                path=self.certificatePath,
                date=expiryDate(expires),
                days=int(left // 86400),
            )
        return True

    def getContext(self):
        return self._options.getContext()
