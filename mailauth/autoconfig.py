"""Client autoconfiguration (Thunderbird autoconfig, Outlook Autodiscover) from the listeners."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any, Iterable, cast
from xml.parsers import expat

import attrs
from twisted.logger import Logger
from twisted.web import resource, server

from mailauth import config as configmod
from mailauth.httplimits import BoundedSite

log = Logger(namespace="mailauth.autoconfig")

# Thunderbird's <authentication> values, most preferred first, and the SASL
# mechanisms each stands for in its SMTP clients (desktop: PLAIN/LOGIN,
# CRAM-MD5, XOAUTH2; Android: PLAIN/LOGIN, CRAM-MD5, OAUTHBEARER/XOAUTH2).
# Thunderbird uses the first value it accepts, so password-cleartext leads:
# CRAM-MD5 works only for users stored as CRAM-MD5 or PLAIN. OAuth2 comes
# last because Thunderbird accepts it only for providers it knows. SCRAM has
# no name in the format: no client maps password-encrypted to it.
AUTHENTICATION = (
    ("password-cleartext", ("PLAIN", "LOGIN")),
    ("password-encrypted", ("CRAM-MD5",)),
    ("OAuth2", ("OAUTHBEARER", "XOAUTH2")),
)

# Placeholder Thunderbird replaces with the address the user typed; logins
# are full addresses.
USERNAME = "%EMAILADDRESS%"

SOCKET_TYPES = {"implicit": "SSL", "starttls": "STARTTLS"}

AUTODISCOVER_RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_RESPONSE_NS = (
    "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
)
# [MS-OXDSCLI] 2.2.4.1.1.2.6.22: Encryption overrides SSL; TLS means STARTTLS.
ENCRYPTION = {"implicit": "SSL", "starttls": "TLS"}

# An Autodiscover request is a few hundred bytes; a longer body is cut off.
MAX_REQUEST_BODY = 16384

_ADDRESS = re.compile(r"[^@\s]{1,64}@([^@\s]{1,253})")


@attrs.frozen
class Server:
    """One server a mail client is told about."""

    protocol: str
    hostname: str
    port: int
    tls: str
    authentication: tuple


@attrs.frozen
class ClientSettings:
    """What both documents say, worked out once from the configuration."""

    displayName: str
    domains: tuple
    incoming: tuple
    outgoing: tuple

    @classmethod
    def fromConfig(cls, cfg: configmod.Config) -> ClientSettings:
        """
        The advertised submission listeners (implicit TLS first, as RFC 8314
        prefers) and the incoming servers of C{cfg.autoconfig}.
        """
        auto = cfg.autoconfig
        assert auto is not None, "only called with an [autoconfig] section"
        ports = dict(auto.ports)
        methods = authenticationMethods(cfg.auth.mechanisms)
        outgoing = tuple(
            Server(
                "smtp",
                auto.hostname,
                cast(int, ports.get(listener.name) or configmod.endpointPort(listener.endpoint)),
                listener.tls,
                methods,
            )
            for listener in advertised(cfg.listeners)
        )
        incoming = tuple(
            Server(s.protocol, s.hostname, s.port, s.tls, ("password-cleartext",))
            for s in auto.incoming
        )
        return cls(auto.display_name, tuple(sorted(cfg.delivery.local_domains)), incoming, outgoing)


def advertised(listeners: Iterable) -> list:
    """
    The listeners worth telling clients about: AUTH offered over TLS. Plain
    text listeners are never advertised, whatever they allow.
    """
    shown = [
        listener
        for listener in listeners
        if listener.tls in SOCKET_TYPES and listener.auth in ("required", "optional")
    ]
    return sorted(shown, key=lambda listener: listener.tls != "implicit")


def authenticationMethods(mechanisms: Iterable[str]) -> tuple:
    """Thunderbird's C{<authentication>} values for the offered SASL C{mechanisms}."""
    offered = set(mechanisms)
    return tuple(name for name, wanted in AUTHENTICATION if offered.intersection(wanted))


def _element(parent: ET.Element, tag: str, text: object) -> ET.Element:
    e = ET.SubElement(parent, tag)
    e.text = str(text)
    return e


def _serialize(root: ET.Element) -> bytes:
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def thunderbirdConfig(settings: ClientSettings) -> bytes:
    """
    The autoconfig document (Thunderbird's config-v1.1.xml format): one
    C{outgoingServer} per advertised listener, preferred first.
    """
    root = ET.Element("clientConfig", version="1.1")
    provider = ET.SubElement(root, "emailProvider", id=settings.domains[0])
    for domain in settings.domains:
        _element(provider, "domain", domain)
    _element(provider, "displayName", settings.displayName)
    for tag, servers in (
        ("incomingServer", settings.incoming),
        ("outgoingServer", settings.outgoing),
    ):
        for s in servers:
            e = ET.SubElement(provider, tag, type=s.protocol)
            _element(e, "hostname", s.hostname)
            _element(e, "port", s.port)
            _element(e, "socketType", SOCKET_TYPES[s.tls])
            _element(e, "username", USERNAME)
            for method in s.authentication:
                _element(e, "authentication", method)
    return _serialize(root)


def autodiscoverResponse(settings: ClientSettings, emailAddress: str) -> bytes:
    """
    The Outlook POX Autodiscover answer for C{emailAddress}: an C{email}
    account with one C{Protocol} per server, logging in as the address.
    """
    # Two default namespaces, one inside the other: ElementTree would invent
    # ns0: prefixes, which Thunderbird's reader (it matches node names) and
    # Outlook do not take, so the declarations are written as attributes.
    root = ET.Element("Autodiscover", xmlns=AUTODISCOVER_RESPONSE_NS)
    response = ET.SubElement(root, "Response", xmlns=OUTLOOK_RESPONSE_NS)
    account = ET.SubElement(response, "Account")
    _element(account, "AccountType", "email")
    _element(account, "Action", "settings")
    for s in settings.incoming + settings.outgoing:
        protocol = ET.SubElement(account, "Protocol")
        _element(protocol, "Type", s.protocol.upper())
        _element(protocol, "Server", s.hostname)
        _element(protocol, "Port", s.port)
        _element(protocol, "LoginName", emailAddress)
        _element(protocol, "DomainRequired", "off")
        # SPA is NTLM/Kerberos, which mailauth does not offer; it is "on"
        # when left out.
        _element(protocol, "SPA", "off")
        _element(protocol, "SSL", "on")
        _element(protocol, "Encryption", ENCRYPTION[s.tls])
        _element(protocol, "AuthRequired", "on")
    return _serialize(root)


def autodiscoverError(code: int, message: str, detail: str = "") -> bytes:
    """An Autodiscover C{Error} answer (600: invalid request, 601: schema not provided)."""
    root = ET.Element("Autodiscover", xmlns=AUTODISCOVER_RESPONSE_NS)
    error = ET.SubElement(ET.SubElement(root, "Response"), "Error")
    _element(error, "ErrorCode", code)
    _element(error, "Message", message)
    _element(error, "DebugData", detail)
    return _serialize(root)


class AutodiscoverRequestError(Exception):
    """The request body is not an Autodiscover request we can answer; the message says why."""


def readAutodiscoverRequest(body: bytes) -> tuple:
    """
    Read C{EMailAddress} and C{AcceptableResponseSchema} (the Outlook schema
    when absent) from an Autodiscover request. Elements are matched by local
    name. A document type declaration is refused, so no entity is ever
    expanded.

    @return: C{(emailAddress, schema)}
    @raise AutodiscoverRequestError: naming what is wrong.
    """
    parser = expat.ParserCreate(namespace_separator=" ")
    path: list = []
    fields: dict = {}

    def start(name: str, attributes: dict) -> None:
        path.append(name.rpartition(" ")[2])
        if path[0] != "Autodiscover":
            raise AutodiscoverRequestError(f"the root element is {path[0]}, not Autodiscover")

    def end(name: str) -> None:
        path.pop()

    def text(data: str) -> None:
        if len(path) == 3 and path[1] == "Request":
            fields[path[2]] = fields.get(path[2], "") + data

    def refuse(*args: object) -> None:
        raise AutodiscoverRequestError("a document type declaration is not allowed")

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    try:
        parser.Parse(body, True)
    except expat.ExpatError as e:
        raise AutodiscoverRequestError(f"not XML: {expat.ErrorString(e.code)}") from None

    address = fields.get("EMailAddress", "").strip()
    if not address:
        raise AutodiscoverRequestError("Request has no EMailAddress")
    m = _ADDRESS.fullmatch(address)
    if not m or not address.isprintable() or not configmod.HOSTNAME.fullmatch(m.group(1)):
        raise AutodiscoverRequestError(f"EMailAddress {address[:100]!r} is not an e-mail address")
    return address, fields.get("AcceptableResponseSchema", OUTLOOK_RESPONSE_NS).strip()


def _xml(request: server.Request, body: bytes, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/xml; charset=utf-8")
    return body


class ThunderbirdConfig(resource.Resource):
    """C{GET /mail/config-v1.1.xml}; the C{emailaddress} parameter is accepted and not needed."""

    isLeaf = True

    def __init__(self, settings: ClientSettings) -> None:
        super().__init__()
        self.document = thunderbirdConfig(settings)

    def render_GET(self, request: server.Request) -> bytes:
        return _xml(request, self.document)


class Autodiscover(resource.Resource):
    """C{POST /autodiscover/autodiscover.xml}: the Outlook POX Autodiscover service."""

    isLeaf = True

    def __init__(self, settings: ClientSettings) -> None:
        super().__init__()
        self.settings = settings

    def render_POST(self, request: server.Request) -> bytes:
        try:
            address, schema = readAutodiscoverRequest(cast(Any, request.content).read())
        except AutodiscoverRequestError as e:
            return _xml(request, autodiscoverError(600, "Invalid Request", str(e)), 400)
        if schema != OUTLOOK_RESPONSE_NS:
            # ActiveSync (mobilesync) clients ask for a schema mailauth cannot serve.
            return _xml(
                request,
                autodiscoverError(
                    601, "Provider is not available for requested schema", schema[:200]
                ),
            )
        return _xml(request, autodiscoverResponse(self.settings, address))


class _Folder(resource.Resource):
    """A path segment matched without regard to case (Outlook asks for /Autodiscover/...)."""

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return self.children.get(path.lower(), resource.NoResource())

    def render(self, request: server.Request) -> bytes:
        return resource.NoResource().render(request)


def makeSite(cfg: configmod.Config, reactor) -> server.Site:
    """
    The web site for C{[autoconfig] endpoint}: the Thunderbird document at
    C{/mail/config-v1.1.xml} and C{/.well-known/autoconfig/mail/config-v1.1.xml},
    Autodiscover at C{/autodiscover/autodiscover.xml}; with the limits of
    L{mailauth.httplimits}, a body up to L{MAX_REQUEST_BODY}.
    """
    settings = ClientSettings.fromConfig(cfg)
    if not settings.incoming:
        log.warn(
            "autoconfig: [autoconfig] incoming is not set: Thunderbird and Outlook "
            "discard a setup that names no IMAP or POP3 server"
        )
    mail = _Folder()
    mail.putChild(b"config-v1.1.xml", ThunderbirdConfig(settings))
    wellKnown, autoconfig, autodiscover = _Folder(), _Folder(), _Folder()
    autoconfig.putChild(b"mail", mail)
    wellKnown.putChild(b"autoconfig", autoconfig)
    autodiscover.putChild(b"autodiscover.xml", Autodiscover(settings))
    root = _Folder()
    root.putChild(b"mail", mail)
    root.putChild(b".well-known", wellKnown)
    root.putChild(b"autodiscover", autodiscover)
    return BoundedSite(root, "autoconfig", MAX_REQUEST_BODY, reactor)
