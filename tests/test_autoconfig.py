"""
Client autoconfiguration: both documents fetched over real HTTP from the real
service, and read with the rules the mail clients apply to them.
"""

from __future__ import annotations

import ipaddress
import re
import xml.dom.minidom
import xml.etree.ElementTree as ET

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import Agent, ResponseFailed, readBody
from twisted.web.http_headers import Headers

from mailauth import autoconfig
from mailauth.autoconfig import (
    AUTODISCOVER_RESPONSE_NS,
    OUTLOOK_RESPONSE_NS,
    AutodiscoverRequestError,
    ClientSettings,
    authenticationMethods,
    readAutodiscoverRequest,
)
from mailauth.config import loadText
from tests.harness import Daemon, LogWatcher

AUTOCONFIG = """
[autoconfig]
endpoint = tcp:0:interface=127.0.0.1
hostname = mail.example.test
display_name = Example & <Co> "Mail"
ports = submission:587 submissions:465
incoming = imaps://imap.example.test
"""

ADDRESS = "alice@example.test"

# The body Thunderbird posts (ExchangeAutoDiscover.sys.mjs), address filled in.
THUNDERBIRD_REQUEST = f"""<?xml version="1.0" encoding="utf-8"?>
    <Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
      <Request>
        <EMailAddress>{ADDRESS}</EMailAddress>
        <AcceptableResponseSchema>{OUTLOOK_RESPONSE_NS}</AcceptableResponseSchema>
      </Request>
    </Autodiscover>""".encode()

MOBILESYNC = "http://schemas.microsoft.com/exchange/autodiscover/mobilesync/responseschema/2006"


class Rejected(Exception):
    """A client would refuse the document; the message is the client's reason."""


# Thunderbird (comm-central mail/components/accountcreation): FetchHTTP.sys.mjs
# turns a 2xx body into JXON only for these content types; anything else
# reaches readFromXML as a string, which it rejects (no_emailProvider).
XML_TYPES = ("text/xml", "application/xml", "text/rdf")

# Thunderbird's nsMsgSocketType and nsMsgAuthMethod names.
SOCKET_TYPES = {"plain": "plain", "SSL": "SSL", "STARTTLS": "alwaysSTARTTLS"}
OUTGOING_AUTH = {
    "none": "none",
    "client-IP-address": "none",
    "smtp-after-pop": "none",
    "password-cleartext": "passwordCleartext",
    "plain": "passwordCleartext",
    "password-encrypted": "passwordEncrypted",
    "secure": "passwordEncrypted",
    "GSSAPI": "GSSAPI",
    "NTLM": "NTLM",
    "OAuth2": "OAuth2",
}
INCOMING_AUTH = {
    k: v
    for k, v in OUTGOING_AUTH.items()
    if k not in ("none", "client-IP-address", "smtp-after-pop")
}
# OAuth2Providers.sys.mjs knows a fixed list of big providers; a domain of
# our own is never on it, so Thunderbird skips OAuth2 for it.
OAUTH2_PROVIDERS: frozenset = frozenset()

# hostnameUtils.sys.mjs isLegalHostName.
_TB_HOSTNAME = re.compile(
    r"(([a-z0-9]|[a-z0-9][a-z0-9\-]{0,61}[a-z0-9])\.)*"
    r"([a-z0-9]|[a-z0-9][a-z0-9\-]{0,61}[a-z0-9])\.?",
    re.I,
)
_PLACEHOLDER = re.compile(r"[a-zA-Z0-9\-\.]*(%[A-Z0-9]+%[a-zA-Z0-9\-\.]*)+")


def _parseText(text: str):
    """JXON's parseText: booleans and numbers are converted, the rest stays text."""
    if re.fullmatch(r"true|false", text, re.I):
        return text.lower() == "true"
    try:
        number = float(text)
    except ValueError:
        return text
    return number if text.strip() else text


def jxon(node):
    """
    JXON.build at Thunderbird's default verbosity (JXON.sys.mjs) over a DOM
    node: element children by C{nodeName} (prefix included) and as
    C{$name} lists, attributes as C{@name}, a leaf as its parsed text.
    """
    children = [c for c in node.childNodes if c.nodeType == c.ELEMENT_NODE]
    text = "".join(
        c.data for c in node.childNodes if c.nodeType in (c.TEXT_NODE, c.CDATA_SECTION_NODE)
    )
    attributes = node.attributes.items() if node.attributes else []
    if not node.childNodes and not attributes:
        return True
    if not children and not attributes:
        return _parseText(text)
    result = {}
    for child in children:
        name = child.nodeName
        if name in ("value", "attr"):
            name += "_"
        content = jxon(child)
        if name not in result:
            result[name] = content
            result["$" + name] = []
        result["$" + name].append(content)
    for name, value in attributes:
        result["@" + name] = _parseText(value)
    if children and text:
        result["value"] = _parseText(text)
    return result


def fetched(response, body: bytes):
    """What FetchHTTP hands on: JXON for an XML content type, else the text."""
    [contentType] = response.headers.getRawHeaders(b"content-type")
    if not contentType.decode().startswith(XML_TYPES):
        return body.decode()
    return jxon(xml.dom.minidom.parseString(body))


def sanitizeHostname(unchecked) -> str:
    """Sanitizer.hostname: placeholders pass, else an IPv4/IPv6 literal or a legal name."""
    if not unchecked:
        raise Rejected("string_empty.error")
    text = str(unchecked).strip()
    if _PLACEHOLDER.fullmatch(text):
        return text
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if len(text) > 255 or not _TB_HOSTNAME.fullmatch(text):
            raise Rejected(f"hostname_syntax.error: {text!r}") from None
    return text.lower()


def sanitizeInteger(unchecked) -> int:
    """Sanitizer.integer: a number, truncated, or what parseInt reads from text."""
    if isinstance(unchecked, (int, float)) and not isinstance(unchecked, bool):
        return int(unchecked)
    m = re.match(r"\s*[+-]?\d+", str(unchecked))
    if not m:
        raise Rejected(f"no_number.error: {unchecked!r}")
    return int(m.group())


def sanitizeIntegerRange(unchecked, low: int, high: int) -> int:
    value = sanitizeInteger(unchecked)
    if not low <= value <= high:
        raise Rejected(f"number out of range: {value}")
    return value


def translate(unchecked, mapping: dict):
    """Sanitizer.translate: a value must be one of the mapping's keys."""
    for key, value in mapping.items():
        if key == unchecked:
            return value
    raise Rejected(f"allowed_value.error: {unchecked!r}")


def readAuthentication(values, hostname: str, mapping: dict) -> str:
    """readFromXML's readAuthentication: the first value Thunderbird can use."""
    reason = "need proper <authentication> in XML"
    for value in values or []:
        try:
            method = translate(value, mapping)
            if method == "OAuth2" and hostname not in OAUTH2_PROVIDERS:
                raise Rejected(f"Lacking OAuth2 config for {hostname}")
            return method
        except Rejected as e:
            reason = str(e)
    raise Rejected(reason)


def readSocketType(values) -> str:
    reason = "need proper <socketType> in XML"
    for value in values or []:
        try:
            return translate(value, SOCKET_TYPES)
        except Rejected as e:
            reason = str(e)
    raise Rejected(reason)


def readFromXML(clientConfig) -> dict:
    """
    Thunderbird desktop's readFromXML (readFromXML.sys.mjs): the document is
    refused unless it names a provider id, a domain, and at least one usable
    incoming and one usable outgoing server. Servers it cannot use are
    skipped; the first usable one is chosen, the others are alternatives.
    """
    if (
        not isinstance(clientConfig, dict)
        or "clientConfig" not in clientConfig
        or not isinstance(clientConfig["clientConfig"], dict)
        or "emailProvider" not in clientConfig["clientConfig"]
    ):
        raise Rejected("no_emailProvider.error")
    provider = clientConfig["clientConfig"]["emailProvider"]
    result = {
        "id": sanitizeHostname(provider.get("@id")),
        "domains": [],
        "displayName": str(provider.get("displayName")),
        "incoming": [],
        "outgoing": [],
    }
    if "$domain" not in provider:
        raise Rejected("xml.$domain is not iterable")
    for domain in provider["$domain"]:
        try:
            result["domains"].append(sanitizeHostname(domain))
        except Rejected:
            pass
    if not result["domains"]:
        raise Rejected("need proper <domain> in XML")

    reason = "Need proper <incomingServer> in XML file"
    for server in provider.get("$incomingServer", []):
        try:
            kind = translate(
                server.get("@type"), {t: t for t in ("pop3", "imap", "nntp", "exchange")}
            )
            hostname = sanitizeHostname(server.get("hostname"))
            result["incoming"].append(
                {
                    "type": kind,
                    "hostname": hostname,
                    "port": sanitizeIntegerRange(server.get("port"), 1, 65535),
                    "username": str(server.get("username")),
                    "socketType": readSocketType(server.get("$socketType")),
                    "auth": readAuthentication(
                        server.get("$authentication"), hostname, INCOMING_AUTH
                    ),
                }
            )
        except Rejected as e:
            reason = str(e)
    if not result["incoming"]:
        raise Rejected(reason)

    reason = "Need proper <outgoingServer> in XML file"
    for server in provider.get("$outgoingServer", []):
        try:
            if server.get("@type") != "smtp":
                raise Rejected("outgoing_not_smtp.error")
            hostname = sanitizeHostname(server.get("hostname"))
            result["outgoing"].append(
                {
                    "hostname": hostname,
                    "port": sanitizeIntegerRange(server.get("port"), 1, 65535),
                    "socketType": readSocketType(server.get("$socketType")),
                    "auth": readAuthentication(
                        server.get("$authentication"), hostname, OUTGOING_AUTH
                    ),
                    "username": str(server.get("username")),
                }
            )
        except Rejected as e:
            reason = str(e)
    if not result["outgoing"]:
        raise Rejected(reason)
    return result


def readLikeThunderbirdAndroid(body: bytes, address: str) -> dict:
    """
    Thunderbird for Android's RealAutoconfigParser: clientConfig and
    emailProvider required, a valid provider id and domain, the first
    C{incomingServer type="imap"} and C{outgoingServer type="smtp"}, each
    with a valid hostname, a port, a username, a socketType of SSL or
    STARTTLS (anything else fails the whole document) and at least one
    known authentication value.
    """
    local, _, domain = address.partition("@")

    def text(e: ET.Element) -> str:
        if len(e):
            raise Rejected(f"Expected text in {e.tag}")
        return (
            (e.text or "")
            .replace("%EMAILDOMAIN%", domain)
            .replace("%EMAILLOCALPART%", local)
            .replace("%EMAILADDRESS%", address)
        )

    def valid(name: str) -> bool:
        try:
            sanitizeHostname(name)
        except Rejected:
            return False
        return True

    def server(e: ET.Element) -> dict:
        found: dict = {"authentication": []}
        for child in e:
            if child.tag == "hostname":
                if not valid(text(child)):
                    raise Rejected(f"Invalid 'hostname' value: {text(child)!r}")
                found["hostname"] = text(child)
            elif child.tag == "port":
                if not re.fullmatch(r"[+-]?\d+", text(child)) or not 0 <= int(text(child)) <= 65535:
                    raise Rejected(f"Invalid 'port' value: {text(child)!r}")
                found["port"] = int(text(child))
            elif child.tag == "username":
                found["username"] = text(child)
            elif child.tag == "authentication":
                if text(child) in ("OAuth2", "password-cleartext", "password-encrypted"):
                    found["authentication"].append(text(child))
            elif child.tag == "socketType":
                found["socketType"] = {"SSL": "TLS", "STARTTLS": "StartTLS"}.get(text(child))
                if found["socketType"] is None:
                    raise Rejected(f"Unknown 'socketType' value: {text(child)!r}")
        for key in ("hostname", "port", "username", "socketType"):
            if key not in found:
                raise Rejected(f"Missing '{key}' element")
        if not found["authentication"]:
            raise Rejected("No usable 'authentication' element found")
        return found

    root = ET.fromstring(body)
    if root.tag != "clientConfig":
        raise Rejected("Missing 'clientConfig' element")
    provider = root.find("emailProvider")
    if provider is None:
        raise Rejected("Missing 'emailProvider' element")
    if not valid(provider.get("id") or ""):
        raise Rejected("Invalid 'emailProvider.id' attribute")
    if not any(valid(text(d)) for d in provider.findall("domain")):
        raise Rejected("Valid 'domain' element required")
    incoming = [server(e) for e in provider.findall("incomingServer") if e.get("type") == "imap"]
    outgoing = [server(e) for e in provider.findall("outgoingServer") if e.get("type") == "smtp"]
    if not incoming:
        raise Rejected("Missing 'incomingServer' element")
    if not outgoing:
        raise Rejected("Missing 'outgoingServer' element")
    return {"incoming": incoming[0], "outgoing": outgoing[0]}


def readAutoDiscoverXML(document) -> dict:
    """
    Thunderbird's readAutoDiscoverXML (ExchangeAutoDiscover.sys.mjs) for
    POP3, IMAP and SMTP protocols: C{SSL off} or C{Encryption None} is
    plain, otherwise the port decides between STARTTLS (25, 110, 143, 587)
    and TLS; C{SPA on} means NTLM/Kerberos; C{LoginName} is the username.
    The result must be complete (an incoming and an outgoing server).
    """
    try:
        account = document["Autodiscover"]["Response"]["Account"]
        account["Protocol"]
    except (KeyError, TypeError):
        raise Rejected("no_autodiscover.error") from None
    result: dict = {"incoming": [], "outgoing": []}
    for protocol in account.get("$Protocol", []):
        kind = protocol.get("Type") if protocol.get("Type") in ("POP3", "IMAP", "SMTP") else None
        if kind is None:
            continue
        port = sanitizeInteger(protocol.get("Port"))
        plain = (
            str(protocol.get("SSL", "")).lower() == "off"
            or str(protocol.get("Encryption", "")).lower() == "none"
        )
        socketType = (
            "plain" if plain else "alwaysSTARTTLS" if port in (143, 110, 25, 587) else "SSL"
        )
        spa = str(protocol.get("SPA", "")).lower() == "on"
        if "LoginName" in protocol and not protocol["LoginName"]:
            raise Rejected("string_empty.error")
        result["outgoing" if kind == "SMTP" else "incoming"].append(
            {
                "type": kind.lower(),
                "hostname": sanitizeHostname(protocol.get("Server")),
                "port": port,
                "socketType": socketType,
                "auth": "secure" if spa else "passwordCleartext",
                "username": str(protocol.get("LoginName", "%EMAILADDRESS%")),
            }
        )
    if not result["incoming"] or not result["outgoing"]:
        raise Rejected("Only an incomplete config found")
    return result


# The POX Protocol element's children as Microsoft documents them (Protocol
# (POX), and [MS-OXDSCLI] 2.2.4.1.1.2.6 for Encryption); the on/off ones.
PROTOCOL_CHILDREN = {
    "Type",
    "Internal",
    "External",
    "TTL",
    "Server",
    "ServerDN",
    "ServerVersion",
    "MdbDN",
    "PublicFolderServer",
    "AD",
    "Port",
    "DirectoryPort",
    "ReferralPort",
    "ASUrl",
    "EwsUrl",
    "OOFUrl",
    "OABUrl",
    "UMUrl",
    "LoginName",
    "DomainRequired",
    "DomainName",
    "SPA",
    "AuthPackage",
    "CertPrincipalName",
    "SSL",
    "AuthRequired",
    "UsePOPAuth",
    "SMTPLast",
    "NetworkRequirements",
    "Encryption",
}
ON_OFF = ("DomainRequired", "SPA", "SSL", "AuthRequired", "UsePOPAuth", "SMTPLast")


def checkAutodiscoverSchema(test: unittest.TestCase, body: bytes, address: str) -> list:
    """
    The response against Microsoft's POX elements: Autodiscover in the
    response namespace, Response in the Outlook 2006a namespace, an email
    Account with Action settings, Protocols of known children. Returns the
    Protocols as dicts.
    """
    outer, inner = f"{{{AUTODISCOVER_RESPONSE_NS}}}", f"{{{OUTLOOK_RESPONSE_NS}}}"
    root = ET.fromstring(body)
    test.assertEqual(root.tag, outer + "Autodiscover")
    [response] = root
    test.assertEqual(response.tag, inner + "Response")
    [account] = response
    test.assertEqual(account.tag, inner + "Account")
    test.assertEqual(account.findtext(inner + "AccountType"), "email")
    test.assertEqual(account.findtext(inner + "Action"), "settings")
    protocols = []
    for protocol in account.findall(inner + "Protocol"):
        fields = {child.tag[len(inner) :]: child.text for child in protocol}
        test.assertTrue(set(fields) <= PROTOCOL_CHILDREN, sorted(fields))
        test.assertIn(fields["Type"], ("IMAP", "POP3", "SMTP"))
        sanitizeHostname(fields["Server"])
        test.assertTrue(1 <= int(fields["Port"]) <= 65535)
        test.assertEqual(fields["LoginName"], address)
        for name in ON_OFF:
            if name in fields:
                test.assertIn(fields[name], ("on", "off"), name)
        # SPA and SSL default to on when absent: both are always written.
        test.assertEqual(
            (fields["SPA"], fields["SSL"], fields["AuthRequired"]), ("off", "on", "on")
        )
        test.assertIn(fields["Encryption"], ("None", "SSL", "TLS", "Auto"))
        protocols.append(fields)
    test.assertEqual(len(account), 2 + len(protocols))
    return protocols


def autodiscoverRequest(address: str = ADDRESS, schema: str = OUTLOOK_RESPONSE_NS) -> bytes:
    request = ET.Element(
        "Autodiscover",
        xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006",
    )
    inner = ET.SubElement(request, "Request")
    ET.SubElement(inner, "EMailAddress").text = address
    ET.SubElement(inner, "AcceptableResponseSchema").text = schema
    return ET.tostring(request, encoding="utf-8", xml_declaration=True)


class _Body:
    """An IBodyProducer for a request body held in memory."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class HTTPMixin:
    extra = AUTOCONFIG

    def setUp(self):
        self.log = LogWatcher()
        self.addCleanup(self.log.stop)
        self.daemon = Daemon(self.mktemp(), extra=self.extra)
        self.addCleanup(self.daemon.stop)
        self.daemon.start()
        found = []
        svc = self.daemon.service.getServiceNamed("autoconfig")
        svc._waitingForPort.addCallback(lambda port: found.append(port) or port)
        self.base = f"http://127.0.0.1:{found[0].getHost().port}"
        self.agent = Agent(reactor)

    @defer.inlineCallbacks
    def fetch(
        self,
        path: str,
        method: bytes = b"GET",
        body: bytes = None,
        contentType: bytes = b"text/xml; charset=utf-8",
    ):
        headers = Headers({b"content-type": [contentType]}) if body is not None else None
        response = yield self.agent.request(
            method, (self.base + path).encode(), headers, _Body(body) if body is not None else None
        )
        data = yield readBody(response)
        return response, data


class ThunderbirdTests(HTTPMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_thunderbirdAcceptsIt(self):
        """
        Thunderbird desktop reads the served document: implicit TLS on 465
        first with a normal password, STARTTLS on 587 as the alternative,
        the IMAP server for reading, the full address as the username.
        """
        response, body = yield self.fetch("/mail/config-v1.1.xml?emailaddress=alice%40example.test")
        self.assertEqual(response.code, 200)
        config = readFromXML(fetched(response, body))
        self.assertEqual(config["domains"], ["example.test"])
        self.assertEqual(config["displayName"], 'Example & <Co> "Mail"')
        self.assertEqual(
            config["incoming"],
            [
                {
                    "type": "imap",
                    "hostname": "imap.example.test",
                    "port": 993,
                    "username": "%EMAILADDRESS%",
                    "socketType": "SSL",
                    "auth": "passwordCleartext",
                }
            ],
        )
        self.assertEqual(
            config["outgoing"],
            [
                {
                    "hostname": "mail.example.test",
                    "port": 465,
                    "socketType": "SSL",
                    "auth": "passwordCleartext",
                    "username": "%EMAILADDRESS%",
                },
                {
                    "hostname": "mail.example.test",
                    "port": 587,
                    "socketType": "alwaysSTARTTLS",
                    "auth": "passwordCleartext",
                    "username": "%EMAILADDRESS%",
                },
            ],
        )

    @defer.inlineCallbacks
    def test_everyAuthenticationValueKnown(self):
        """
        Every server lists only authentication values Thunderbird knows:
        PLAIN/LOGIN as password-cleartext, CRAM-MD5 as password-encrypted.
        """
        response, body = yield self.fetch("/mail/config-v1.1.xml")
        root = ET.fromstring(body)
        for server in root.iter("outgoingServer"):
            self.assertEqual(
                [e.text for e in server.findall("authentication")],
                ["password-cleartext", "password-encrypted"],
            )
            for e in server.findall("authentication"):
                translate(e.text, OUTGOING_AUTH)

    @defer.inlineCallbacks
    def test_thunderbirdAndroidAcceptsIt(self):
        """Thunderbird for Android reads the same document: IMAP in, SMTP on 465 out."""
        response, body = yield self.fetch("/mail/config-v1.1.xml")
        settings = readLikeThunderbirdAndroid(body, ADDRESS)
        self.assertEqual(
            settings["outgoing"],
            {
                "hostname": "mail.example.test",
                "port": 465,
                "username": ADDRESS,
                "socketType": "TLS",
                "authentication": ["password-cleartext", "password-encrypted"],
            },
        )
        self.assertEqual(settings["incoming"]["port"], 993)

    @defer.inlineCallbacks
    def test_wellKnownPath(self):
        """The .well-known URL Thunderbird tries on the mail domain serves the same bytes."""
        _, first = yield self.fetch("/mail/config-v1.1.xml")
        response, second = yield self.fetch(
            "/.well-known/autoconfig/mail/config-v1.1.xml?emailaddress=alice%40example.test"
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(second, first)

    @defer.inlineCallbacks
    def test_userTextEscaped(self):
        """A display name with markup characters arrives as text, escaped by the serializer."""
        _, body = yield self.fetch("/mail/config-v1.1.xml")
        self.assertIn(b'Example &amp; &lt;Co&gt; "Mail"', body)
        self.assertEqual(
            ET.fromstring(body).findtext("emailProvider/displayName"), 'Example & <Co> "Mail"'
        )

    @defer.inlineCallbacks
    def test_otherMethodsRefused(self):
        """POST to the document is 405; an unknown path is 404."""
        response, _ = yield self.fetch("/mail/config-v1.1.xml", b"POST", b"x")
        self.assertEqual(response.code, 405)
        response, _ = yield self.fetch("/mail/config-v1.2.xml")
        self.assertEqual(response.code, 404)
        response, _ = yield self.fetch("/")
        self.assertEqual(response.code, 404)


class WithoutIncomingTests(HTTPMixin, unittest.TestCase):
    extra = AUTOCONFIG.replace("incoming = imaps://imap.example.test\n", "")

    @defer.inlineCallbacks
    def test_thunderbirdRefusesSubmissionOnly(self):
        """
        Without [autoconfig] incoming the document honestly lists only
        submission, and Thunderbird (desktop and Android) refuses it, as the
        warning logged at start says.
        """
        self.assertTrue(self.log.matching("incoming is not set"))
        response, body = yield self.fetch("/mail/config-v1.1.xml")
        self.assertEqual(len(ET.fromstring(body).findall("emailProvider/outgoingServer")), 2)
        e = self.assertRaises(Rejected, readFromXML, fetched(response, body))
        self.assertEqual(str(e), "Need proper <incomingServer> in XML file")
        e = self.assertRaises(Rejected, readLikeThunderbirdAndroid, body, ADDRESS)
        self.assertEqual(str(e), "Missing 'incomingServer' element")
        response, body = yield self.fetch(
            "/autodiscover/autodiscover.xml", b"POST", THUNDERBIRD_REQUEST
        )
        e = self.assertRaises(Rejected, readAutoDiscoverXML, fetched(response, body))
        self.assertEqual(str(e), "Only an incomplete config found")


class AutodiscoverTests(HTTPMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_microsoftSchema(self):
        """
        The answer to Thunderbird's own request follows Microsoft's POX
        schema: IMAP, then SMTP on 465 (Encryption SSL) and 587 (Encryption
        TLS, i.e. STARTTLS), each logging in as the requested address.
        """
        response, body = yield self.fetch(
            "/autodiscover/autodiscover.xml", b"POST", THUNDERBIRD_REQUEST
        )
        self.assertEqual(response.code, 200)
        protocols = checkAutodiscoverSchema(self, body, ADDRESS)
        self.assertEqual(
            [(p["Type"], p["Server"], p["Port"], p["Encryption"]) for p in protocols],
            [
                ("IMAP", "imap.example.test", "993", "SSL"),
                ("SMTP", "mail.example.test", "465", "SSL"),
                ("SMTP", "mail.example.test", "587", "TLS"),
            ],
        )

    @defer.inlineCallbacks
    def test_thunderbirdReadsIt(self):
        """Thunderbird's Autodiscover reader gets the same servers and the address as login."""
        response, body = yield self.fetch(
            "/autodiscover/autodiscover.xml", b"POST", THUNDERBIRD_REQUEST
        )
        config = readAutoDiscoverXML(fetched(response, body))
        self.assertEqual(
            [
                (s["hostname"], s["port"], s["socketType"], s["auth"], s["username"])
                for s in config["outgoing"]
            ],
            [
                ("mail.example.test", 465, "SSL", "passwordCleartext", ADDRESS),
                ("mail.example.test", 587, "alwaysSTARTTLS", "passwordCleartext", ADDRESS),
            ],
        )
        self.assertEqual(config["incoming"][0]["socketType"], "SSL")

    @defer.inlineCallbacks
    def test_outlookPathCase(self):
        """Outlook's capitalised /Autodiscover/Autodiscover.xml is the same service."""
        response, body = yield self.fetch(
            "/Autodiscover/Autodiscover.xml", b"POST", autodiscoverRequest("bob@example.test")
        )
        self.assertEqual(response.code, 200)
        checkAutodiscoverSchema(self, body, "bob@example.test")

    @defer.inlineCallbacks
    def checkInvalid(self, body: bytes, debug: str):
        response, answer = yield self.fetch("/autodiscover/autodiscover.xml", b"POST", body)
        self.assertEqual(response.code, 400)
        ns = f"{{{AUTODISCOVER_RESPONSE_NS}}}"
        error = ET.fromstring(answer).find(f"{ns}Response/{ns}Error")
        self.assertEqual(
            (error.findtext(f"{ns}ErrorCode"), error.findtext(f"{ns}Message")),
            ("600", "Invalid Request"),
        )
        self.assertEqual(error.findtext(f"{ns}DebugData"), debug)

    def test_notXML(self):
        """A body that is not XML gets error 600 naming the parser's complaint."""
        return self.checkInvalid(
            b"EMailAddress=alice@example.test", "not XML: not well-formed (invalid token)"
        )

    def test_noAddress(self):
        """A request without EMailAddress gets error 600."""
        return self.checkInvalid(autodiscoverRequest("  "), "Request has no EMailAddress")

    def test_badAddress(self):
        """An EMailAddress that is not an address gets error 600 quoting it."""
        return self.checkInvalid(
            autodiscoverRequest("alice@exa mple"),
            "EMailAddress 'alice@exa mple' is not an e-mail address",
        )

    def test_entitiesRefused(self):
        """A DOCTYPE (entity expansion, billion laughs) is refused before any expansion."""
        body = (
            b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xxxxxxxx">]>'
            b"<Autodiscover><Request><EMailAddress>&x;@example.test</EMailAddress>"
            b"</Request></Autodiscover>"
        )
        return self.checkInvalid(body, "a document type declaration is not allowed")

    @defer.inlineCallbacks
    def test_mobilesyncSchema(self):
        """An ActiveSync client asking for the mobilesync schema gets error 601."""
        response, answer = yield self.fetch(
            "/autodiscover/autodiscover.xml", b"POST", autodiscoverRequest(schema=MOBILESYNC)
        )
        self.assertEqual(response.code, 200)
        ns = f"{{{AUTODISCOVER_RESPONSE_NS}}}"
        self.assertEqual(
            ET.fromstring(answer).findtext(f"{ns}Response/{ns}Error/{ns}ErrorCode"), "601"
        )

    @defer.inlineCallbacks
    def test_getRefused(self):
        """Autodiscover answers POST only."""
        response, _ = yield self.fetch("/autodiscover/autodiscover.xml")
        self.assertEqual(response.code, 405)

    @defer.inlineCallbacks
    def test_bodyTooLong(self):
        """A body over the limit is not read: the connection is dropped without an answer."""
        body = autodiscoverRequest() + b" " * (autoconfig.MAX_REQUEST_BODY * 4)
        try:
            response, _ = yield self.fetch("/autodiscover/autodiscover.xml", b"POST", body)
        except ResponseFailed as e:
            self.assertTrue(all(isinstance(r, Failure) for r in e.reasons))
            self.assertTrue(
                any(r.check(ConnectionDone, ConnectionLost) for r in e.reasons), e.reasons
            )
        else:
            self.fail(f"answered {response.code}")
        self.assertTrue(self.log.matching("request body over 16384 bytes"))


class BodyLimitTests(unittest.TestCase):
    def test_bodyTooLongInPieces(self) -> None:
        """
        A body over the limit that arrives in several reads is not answered
        either (it was, from its first 16 KiB, when the rest came in a read
        of its own): the connection is dropped.
        """
        cfg = loadText(DocumentTests.BASE.format(mechanisms="PLAIN"))
        channel = autoconfig.makeSite(cfg, reactor).buildProtocol(
            IPv4Address("TCP", "127.0.0.1", 40000)
        )
        transport = StringTransport()
        channel.makeConnection(transport)
        body = autodiscoverRequest()
        body += b" " * (autoconfig.MAX_REQUEST_BODY + 4096 - len(body))
        channel.dataReceived(
            b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: a\r\n"
            b"Content-Type: text/xml\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        channel.dataReceived(body[:16000])
        channel.dataReceived(body[16000:])
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        channel.connectionLost(Failure(ConnectionLost()))


class DocumentTests(unittest.TestCase):
    """What the documents say, from configurations alone (no network)."""

    BASE = """
[server]
hostname = mx.example.test
[tls]
certificate = /c
private_key = /k
[listener:mx]
endpoint = tcp:25
tls = starttls
auth = none
[listener:plain]
endpoint = tcp:2525
tls = none
auth = optional
[listener:submission]
endpoint = tcp:2587:interface=192.0.2.1
[listener:submissions]
endpoint = tcp6:port=2465:interface=\\:\\:
tls = implicit
[auth]
users = /u
mechanisms = {mechanisms}
plaintext_requires_tls = no
[delivery]
local_domains = example.test example.net
maildir = /m/{{domain}}/{{localpart}}
[autoconfig]
endpoint = tcp:8080
"""

    def settings(self, mechanisms: str = "PLAIN LOGIN") -> ClientSettings:
        return ClientSettings.fromConfig(loadText(self.BASE.format(mechanisms=mechanisms)))

    def test_onlyTLSWithAuth(self):
        """
        Only listeners offering AUTH over TLS are advertised, implicit TLS
        first, at the ports their endpoints bind; the MX and the plain-text
        listener are left out.
        """
        servers = self.settings().outgoing
        self.assertEqual(
            [(s.hostname, s.port, s.tls) for s in servers],
            [("mx.example.test", 2465, "implicit"), ("mx.example.test", 2587, "starttls")],
        )

    def test_cramOnly(self):
        """With CRAM-MD5 alone Thunderbird is told to use its encrypted password."""
        document = autoconfig.thunderbirdConfig(self.settings("CRAM-MD5"))
        root = ET.fromstring(document)
        self.assertEqual({e.text for e in root.iter("authentication")}, {"password-encrypted"})

    def test_defaults(self):
        """The public host name defaults to [server] hostname, the display name to a domain."""
        cfg = loadText(self.BASE.format(mechanisms="PLAIN"))
        self.assertEqual(
            (cfg.autoconfig.hostname, cfg.autoconfig.display_name),
            ("mx.example.test", "example.net"),
        )
        root = ET.fromstring(autoconfig.thunderbirdConfig(self.settings()))
        self.assertEqual(root.find("emailProvider").get("id"), "example.net")
        self.assertEqual([e.text for e in root.iter("domain")], ["example.net", "example.test"])

    def test_authenticationMethods(self):
        """
        Mechanisms map to Thunderbird's names, cleartext first; SCRAM has
        no name in the format (Thunderbird's encrypted password is CRAM-MD5).
        """
        self.assertEqual(
            authenticationMethods(["CRAM-MD5", "LOGIN"]),
            ("password-cleartext", "password-encrypted"),
        )
        self.assertEqual(
            authenticationMethods(["XOAUTH2", "PLAIN"]), ("password-cleartext", "OAuth2")
        )
        self.assertEqual(authenticationMethods(["OAUTHBEARER"]), ("OAuth2",))
        self.assertEqual(authenticationMethods(["SCRAM-SHA-256"]), ())

    def test_oauthSkippedByThunderbird(self):
        """
        OAuth2 comes after the password methods: Thunderbird skips it for a
        provider it does not know and takes the next value.
        """
        methods = authenticationMethods(["XOAUTH2", "PLAIN"])
        self.assertEqual(
            readAuthentication(list(methods), "mail.example.test", OUTGOING_AUTH),
            "passwordCleartext",
        )
        self.assertRaises(
            Rejected, readAuthentication, ["OAuth2"], "mail.example.test", OUTGOING_AUTH
        )

    def test_requestReader(self):
        """The request reader takes namespaced or bare elements and defaults the schema."""
        self.assertEqual(
            readAutodiscoverRequest(THUNDERBIRD_REQUEST), (ADDRESS, OUTLOOK_RESPONSE_NS)
        )
        self.assertEqual(
            readAutodiscoverRequest(
                b"<Autodiscover><Request><EMailAddress> a@b.example "
                b"</EMailAddress></Request></Autodiscover>"
            ),
            ("a@b.example", OUTLOOK_RESPONSE_NS),
        )
        e = self.assertRaises(
            AutodiscoverRequestError, readAutodiscoverRequest, b"<Other><Request/></Other>"
        )
        self.assertEqual(str(e), "the root element is Other, not Autodiscover")
