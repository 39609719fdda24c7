"""
What a configuration is once read: L{Config} and the value object of each
section, frozen, and L{ConfigError}. L{mailauth.config} reads the file into
them (and re-exports them).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Iterable, Mapping, Optional

import attrs


class ConfigError(Exception):
    """
    The configuration is wrong; C{problems} holds one line per problem, each
    naming the file, the section and the key.
    """

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


@attrs.frozen
class ServerConfig:
    hostname: str
    state_dir: str
    max_message_size: int
    max_recipients: int
    max_connections: int
    max_connections_per_address: int
    timeout: float
    data_timeout: float
    max_errors: int
    auth_threads: int
    disk_threads: int
    # The whole of one DATA, however slowly it trickles in.
    max_data_time: float = 1800.0
    # NOOP, RSET, VRFY, HELP, repeated HELO or EHLO and RCPT past
    # max_recipients between messages before each is an error too.
    junk_command_limit: int = 100
    # text (twistd's lines) or json (one object a line, mailauth.logs).
    log_format: str = "text"
    #: processes serving the listeners (L{mailauth.workers}); 1 is one process doing all.
    workers: int = 1
    #: seconds a serving worker may say nothing before it is taken to hang; 0: never.
    worker_timeout: float = 30.0


@attrs.frozen
class TLSConfig:
    certificate: str
    private_key: str


@attrs.frozen
class ListenerConfig:
    name: str
    endpoint: str
    tls: str
    auth: str
    proxy_protocol: str = "no"
    trusted_proxies: tuple = ()
    proxy_timeout: float = 10.0


@attrs.frozen
class AuthConfig:
    mechanisms: tuple
    users: str
    plaintext_requires_tls: bool
    failure_window: float
    max_failures_per_address: int
    max_failures_per_login: int
    tarpit_delay: float
    block_time: float
    max_tracked: int
    failures_per_session: int
    password_min_length: int
    breached_passwords: Optional[str]
    rehash: bool = False


@attrs.frozen
class DeliveryConfig:
    local_domains: frozenset
    maildir: str
    aliases: Optional[str]
    sender_map: Optional[str]
    sender_login_match: bool
    # Where postmaster@ each local domain and <Postmaster> go, when no user
    # or alias of that exact address takes them.
    postmaster: Optional[str] = None
    # Every From:/Sender: address of an authenticated submission must be one
    # the login may use as MAIL FROM.
    header_from_match: bool = False


@attrs.frozen
class LimitsConfig:
    """C{[limits]}: sending limits per authenticated login (0: none)."""

    messages_per_hour: int = 0
    recipients_per_hour: int = 0
    messages_per_day: int = 0
    recipients_per_day: int = 0
    suspend_after: int = 0
    overrides: Optional[str] = None


@attrs.frozen
class RelayConfig:
    host: str
    port: int
    tls: str
    username: Optional[str]
    password_file: Optional[str]
    ca_file: Optional[str]
    verify_certificate: bool
    retry_initial: float
    retry_max: float
    expire: float
    max_connections: int
    timeout: float
    queue_interval: float
    delay_warning: float = 4 * 3600.0


@attrs.frozen
class AutoconfigConfig:
    """
    The optional C{[autoconfig]} section, defaults resolved: C{hostname}
    from C{[server]}, C{display_name} from the local domains.
    """

    endpoint: str
    hostname: str
    display_name: str
    ports: tuple
    incoming: tuple


@attrs.frozen
class MetricsConfig:
    endpoint: str


@attrs.frozen
class OAuthConfig:
    """
    The optional C{[oauth]} section: who issues the tokens OAUTHBEARER and
    XOAUTH2 accept, where its keys are, and how to ask about opaque tokens.
    """

    issuer: str
    audience: str
    jwks: Optional[str]
    login_claim: str
    introspection_url: Optional[str]
    introspection_client_id: Optional[str]
    introspection_secret_file: Optional[str]
    introspection_timeout: float
    leeway: float


@attrs.frozen
class StateConfig:
    backend: str
    prefix: str
    timeout: float


@attrs.frozen
class DKIMKeyConfig:
    """One signing key of a domain, its public half published at C{selector._domainkey.domain}."""

    selector: str
    keyfile: str


@attrs.frozen
class Config:
    path: str
    server: ServerConfig
    tls: Optional[TLSConfig]
    listeners: tuple
    auth: AuthConfig
    delivery: DeliveryConfig
    relay: Optional[RelayConfig]
    state: StateConfig
    autoconfig: Optional[AutoconfigConfig] = None
    metrics: Optional[MetricsConfig] = None
    #: [dkim]: signing domain -> its keys (a tuple of L{DKIMKeyConfig}), read-only.
    dkim: Mapping[str, tuple] = MappingProxyType({})
    oauth: Optional[OAuthConfig] = None
    limits: LimitsConfig = LimitsConfig()
