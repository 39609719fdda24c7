"""
What the HTTP endpoints (C{[metrics]}, C{[autoconfig]}) let a client send,
and for how long: bounds Twisted's web server does not set by itself.

Twisted's server drops a connection only when it has been idle for its
timeout, so a client that sends a byte every few seconds keeps a
connection (a file descriptor of the daemon, which with one process also
serves SMTP) for as long as it likes; it writes a request body of any
length to a temporary file; and it takes any number of connections. Here a
request must arrive whole within L{REQUEST_TIME} of its first byte (as
nginx's C{client_header_timeout} and C{client_body_timeout}, 60 s each), a
body is held in memory up to the site's limit and the connection dropped
past it, and a site serves at most L{MAX_CONNECTIONS} connections at once.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, Optional, cast

from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

log = Logger(namespace="mailauth.httplimits")

#: Seconds from the first byte of a request to its last (line, headers, body).
REQUEST_TIME = 30.0
#: Seconds a connection may stay idle between requests (Twisted's default).
IDLE_TIMEOUT = 60
#: Connections a site serves at once; more are closed as they come.
MAX_CONNECTIONS = 64


class BoundedRequest(server.Request):
    """
    A request whose body may not exceed its site's C{maxBody}: the body is
    kept in memory, never in a temporary file, and once it is over the
    limit (or its declared length is) the connection is dropped, and the
    request, whose body would end with the bytes that came before, is
    never answered.

    A HEAD request is answered as its GET, without Twisted's warning that
    the body it drops was rendered.
    """

    _received = 0
    _refused = False

    def _limit(self) -> int:
        return cast(Any, self.channel).site.maxBody

    def gotLength(self, length: Optional[int]) -> None:
        self.content = BytesIO()
        if length is not None and length > self._limit():
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        self._refused = True
        log.info(
            "{site}: request body over {limit} bytes from {client}: dropped",
            site=cast(Any, self.channel).site.name,
            limit=self._limit(),
            client=_host(self.getClientAddress()),
        )
        cast(Any, self.channel.transport).abortConnection()

    def process(self) -> None:
        if self._refused:
            return
        super().process()

    def render(self, resrc: resource.IResource) -> None:
        super().render(cast(Any, _HeadOf(resrc)) if self.method == b"HEAD" else resrc)


class _HeadOf:
    """A resource rendered for HEAD: its GET answer's length, without the body."""

    def __init__(self, resrc: resource.IResource) -> None:
        self.resrc = resrc

    def render(self, request: server.Request) -> Any:
        body = self.resrc.render(request)
        if isinstance(body, bytes):
            request.setHeader(b"content-length", b"%d" % len(body))
            return b""
        return body


class BoundedChannel(http.HTTPChannel):
    """
    An HTTP/1.1 connection on which each request must arrive whole within
    L{REQUEST_TIME} of its first byte; one that does not is dropped.
    """

    _deadline: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        cast(Any, self).site.connectionOpened()

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is None and data:
            self._deadline = cast(Any, self).callLater(REQUEST_TIME, self._tooSlow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._cancelDeadline()
        super().allContentReceived()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelDeadline()
        cast(Any, self).site.connectionClosed()
        super().connectionLost(reason)

    def _cancelDeadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _tooSlow(self) -> None:
        self._deadline = None
        log.info(
            "{site}: no whole request from {client} within {seconds:g} s: dropped",
            site=cast(Any, self).site.name,
            client=_host(cast(Any, self.transport).getPeer()),
            seconds=REQUEST_TIME,
        )
        cast(Any, self.transport).abortConnection()


def _host(address: Any) -> str:
    """The client's IP address, or C{local} (a UNIX socket)."""
    host = getattr(address, "host", None)
    return host if host is not None else "local"


class BoundedSite(server.Site):
    """
    A web site with the bounds of this module: L{BoundedRequest} bodies up
    to C{maxBody}, L{BoundedChannel} connections, at most
    C{maxConnections} of them at once. No tracebacks in error pages.

    @ivar name: how its log lines name it (C{metrics}, C{autoconfig}).
    """

    # (Twisted's annotation names its private wrapper, which adds HTTP/2:
    # not spoken here, without TLS.)
    protocol = cast(Any, BoundedChannel)
    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        root: resource.IResource,
        name: str,
        maxBody: int,
        reactor,
        maxConnections: int = MAX_CONNECTIONS,
    ) -> None:
        super().__init__(root, requestFactory=BoundedRequest, timeout=IDLE_TIMEOUT, reactor=reactor)
        self.name = name
        self.maxBody = maxBody
        self.maxConnections = maxConnections
        self.open = 0
        self._full = False

    def buildProtocol(self, addr) -> Any:
        if self.open >= self.maxConnections:
            if not self._full:
                self._full = True
                log.warn(
                    "{site}: {count} connections open: refusing new ones until some close",
                    site=self.name,
                    count=self.open,
                )
            return None
        return super().buildProtocol(addr)

    def connectionOpened(self) -> None:
        """A L{BoundedChannel} of this site is connected."""
        self.open += 1

    def connectionClosed(self) -> None:
        """A L{BoundedChannel} of this site has lost its connection."""
        self.open -= 1
        self._full = False

    def logPrefix(self) -> str:
        """How Twisted names it in its C{... starting on PORT} line."""
        return self.name
