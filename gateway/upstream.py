"""One pool per upstream: Agent over a persistent connection pool, a connect timeout, a concurrency cap and queue.

Rule: an upstream never has more than `max_connections` requests in flight, never more than `max_queue`
waiting, and nobody waits longer than `queue_timeout` (`HTTPConnectionPool.maxPersistentPerHost` caps only idle
connections, twisted#7614). Idle pooled connections close after `idle_timeout`, before a typical upstream's
keep-alive timeout, so a request rarely races the upstream closing the connection it was given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, DeferredSemaphore, fail
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol, HTTPClientParser, TransportProxyProducer
from twisted.web.client import URI, Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from gateway.certificates import log_certificate
from gateway.config import Upstream
from gateway.errors import UpstreamBroken, UpstreamSaturated
from gateway.framing import StrictChunkedDecoder
from gateway.upstream_tls import client_creator

__all__ = ["ConnectTimeout", "UpstreamPool", "UpstreamResponse"]


_log = Logger()

UPSTREAM_BUFFER_SIZE = 256 * 1024
"""An upstream socket's write-buffer size above which an upload is paused, and its read size until a response
body's relay sets one that follows the client (`gateway.streaming.ReadSizer`)."""


MAX_RESPONSE_HEAD = 64 * 1024
"""Bytes of response head (status line, headers, and any 1xx heads before them) taken from an upstream; more is
answered 502, like nginx's "upstream sent too big header" (Envoy's default cap is 60 KiB). Agent caps only one
line (16 KiB), so without this an upstream could send headers without end, all held in memory and relayed."""


_STRICT_DECODERS = {b"chunked": StrictChunkedDecoder}


class ConnectTimeout(Exception):
    """The TCP connection to the upstream was not open within the route's connect timeout."""


class UpstreamResponse(proxyForInterface(IResponse)):  # type: ignore[misc]
    """An Agent response with what Agent keeps to itself put back: the Connection header (its options are
    hop-by-hop names to strip), a 304's Content-Length, and whether the connection ended in a reset."""

    def __init__(self, original: IResponse, connection: _ClientProtocol) -> None:
        super().__init__(original)
        self._connection = connection

    @property
    def reset(self) -> bool:
        """Whether the upstream connection was lost other than by a clean close. Agent reports a body framed
        by the connection's close as complete (PotentialDataLoss) however the connection ended."""
        reason = self._connection.lost_reason
        return reason is not None and not reason.check(ConnectionDone)

    def set_read_size(self, size: int) -> None:
        """Read the rest of this response's body from the upstream socket `size` bytes at a time."""
        transport = self._connection.transport
        if transport is not None:
            transport.bufferSize = size


class _ReadGate(TransportProxyProducer):
    """Agent's proxy of the upstream socket for one request, settling pauses and resumes asked for while a read
    is parsed only once the read is done.

    Agent pauses the socket when a response head is complete and resumes it when the body is given a protocol,
    which the gateway does at once, in the same read: two `epoll_ctl` calls per request for nothing (6% of the
    CPU of small requests, bench S5). Between reads a pause or resume passes through at once, as in Agent.
    """

    def __init__(self, producer: Any) -> None:
        super().__init__(producer)
        self.parsing = False
        self._wanted_paused = False
        self._paused = False
        """Whether this proxy has paused the socket (a new request finds it reading: Agent resumes it when a
        response ends)."""

    def pauseProducing(self) -> None:
        self._wanted_paused = True
        if not self.parsing:
            self.settle()

    def resumeProducing(self) -> None:
        self._wanted_paused = False
        if not self.parsing:
            self.settle()

    def settle(self) -> None:
        """Pause or resume the socket if that is what was last asked for and it is not so yet."""
        self.parsing = False
        if self._producer is not None and self._wanted_paused != self._paused:
            self._paused = self._wanted_paused
            if self._paused:
                self._producer.pauseProducing()
            else:
                self._producer.resumeProducing()


class _ClientProtocol(HTTP11ClientProtocol):
    """Agent's HTTP/1.1 client protocol, with three changes for a proxy:
    it reads in larger pieces; it hands out `UpstreamResponse`s; and it aborts a connection whose response
    ended before the request body was sent, rather than closing it gracefully: such a connection is never
    reused, and a graceful close would wait for the rest of the body to be written, which the upstream (having
    answered) may never read, leaving the socket open for good."""

    lost_reason: Failure | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        # Larger pieces than Twisted's 64 KiB: an upload is paused less often, and a head with the start of its
        # body costs one read. The client side keeps 64 KiB: its write buffer is what pauses the upstream, and a
        # larger one only adds copying.
        self.transport.bufferSize = UPSTREAM_BUFFER_SIZE

    def request(self, request: Any) -> Deferred[IResponse]:
        if self.transport is not None:
            self.transport.bufferSize = UPSTREAM_BUFFER_SIZE  # undo the read size the last response's relay set
        sent = super().request(request)
        parser = self._parser
        if parser is None:
            return sent
        gate = _ReadGate(self.transport)
        self._transportProxy = parser.transport = gate
        _limit_head(parser)
        # Where Agent looks up its decoders: chunk sizes over 2^63 - 1 refused (see gateway.framing).
        parser._transferDecoders = _STRICT_DECODERS  # type: ignore[attr-defined]

        def wrap(response: IResponse) -> IResponse:
            hidden = parser.connHeaders
            options = hidden.getRawHeaders(b"connection")
            if options:
                response.headers.setRawHeaders(b"connection", options)
            if response.code == 304 and hidden.hasHeader(b"content-length"):
                response.headers.setRawHeaders(b"content-length", hidden.getRawHeaders(b"content-length"))
            return UpstreamResponse(response, self)

        return sent.addCallback(wrap)

    def dataReceived(self, bytes: bytes) -> None:
        gate = self._transportProxy
        if gate is None:
            super().dataReceived(bytes)
            return
        gate.parsing = True
        try:
            super().dataReceived(bytes)
        finally:
            gate.settle()

    def _finishResponse_WAITING(self, rest: bytes) -> None:
        if rest and self._currentRequest is not None:
            # Bytes past the response's framing: the upstream is out of step with us, and what it sent could
            # be taken as the answer to the next request on this connection. Agent drops them and pools the
            # connection; close it instead.
            _log.warn("Upstream sent {count} bytes after a complete response; closing its connection", count=len(rest))
            self._currentRequest.persistent = False
        super()._finishResponse_WAITING(rest)

    def _giveUp(self, reason: Failure) -> None:
        if self._state == "TRANSMITTING":
            # The response broke (an invalid or oversized head) while the request body was still being sent.
            # Agent would drop its request Deferred here (it is chained to the response only once the body is
            # sent) and crash when the connection is then lost: the request would never end. Do what Agent does
            # for a response that ends mid-upload: hand the failure to the request, stop the body, and abort
            # (a graceful close would wait behind the body's producer).
            self._state = "TRANSMITTING_AFTER_RECEIVING_RESPONSE"
            self._responseDeferred.chainDeferred(self._finishedRequest)
            self._currentRequest.stopWriting()
            self.transport.abortConnection()
            self._disconnectParser(reason)
            return
        super()._giveUp(reason)

    def _finishResponse_TRANSMITTING(self, rest: bytes) -> None:
        transport = self.transport
        super()._finishResponse_TRANSMITTING(rest)
        transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost_reason = reason
        super().connectionLost(reason)


def _limit_head(parser: HTTPClientParser) -> None:
    """Make `parser` fail once the response head (1xx heads included) goes over `MAX_RESPONSE_HEAD` bytes.

    Agent builds the parser itself, so its line handler is wrapped here. Raising from it makes Agent give up:
    the connection is closed and the request fails before any of the head is relayed.
    """
    line_received = parser.lineReceived
    taken = 0

    def counted(line: bytes) -> None:
        nonlocal taken
        taken += len(line) + 1
        if taken > MAX_RESPONSE_HEAD:
            _log.warn("Upstream response head over {limit} bytes; closing its connection", limit=MAX_RESPONSE_HEAD)
            raise UpstreamBroken(f"the upstream sent a response head of more than {MAX_RESPONSE_HEAD} bytes")
        line_received(line)

    parser.lineReceived = counted  # type: ignore[method-assign]


class _ClientFactory(_HTTP11ClientFactory):
    noisy = False  # a "Starting factory" line per upstream connection is noise

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _ClientProtocol(self._quiescentCallback)


class _ConnectionPool(HTTPConnectionPool):
    """A persistent pool whose connections speak `_ClientProtocol`, and which tells the request that asked
    for a connection once it has one (`on_connected`, for the access log's connect time)."""

    _factory = _ClientFactory
    on_connected: Callable[[], None] | None = None
    """Set by `UpstreamPool.request` for the `getConnection` call Agent makes within it (at once, in the same
    call), and taken by it."""

    def getConnection(self, key: Any, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        connecting = super().getConnection(key, endpoint)
        callback, self.on_connected = self.on_connected, None
        if callback is not None:

            def connected(protocol: Any) -> Any:
                callback()
                return protocol

            connecting.addCallback(connected)
        return connecting

    @property
    def idle(self) -> int:
        """Idle connections kept for reuse."""
        return sum(len(connections) for connections in self._connections.values())


@implementer(IStreamClientEndpoint)
class _TimedEndpoint:
    """Connects through `inner` and gives up after `timeout` seconds on `clock`.

    The reactor's own connect timeout does not run on a test `Clock`, and its error does not say which wait
    it was; this one does both.
    """

    def __init__(self, inner: IStreamClientEndpoint, clock: Any, timeout: float) -> None:
        self._inner = inner
        self._clock = clock
        self._timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        connecting = self._inner.connect(protocolFactory)
        timer = self._clock.callLater(self._timeout, connecting.cancel)

        def settled(result: IProtocol | Failure) -> IProtocol | Failure:
            if timer.active():
                timer.cancel()
                return result
            if isinstance(result, Failure):
                raise ConnectTimeout(f"no connection within {self._timeout:g} s")
            return result

        return connecting.addBoth(settled)


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    """Endpoints for Agent: IP literals connect directly (no resolver thread), names go through the resolver;
    with `tls`, TLS runs over the TCP connection."""

    def __init__(self, reactor: Any, timeout: float, tls: IOpenSSLClientConnectionCreator | None = None) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._tls = tls
        self._endpoints: dict[tuple[bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            host = uri.host.decode("ascii")
            inner: IStreamClientEndpoint
            # The reactor's own per-attempt timeout is a backstop a little later than ours.
            backstop = self._timeout + 1
            if isIPAddress(host):
                inner = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=backstop)
            elif isIPv6Address(host):
                inner = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=backstop)
            else:
                inner = HostnameEndpoint(self._reactor, host, uri.port, timeout=backstop)
            endpoint = _TimedEndpoint(inner, self._reactor, self._timeout)
            if self._tls is not None:
                # The connect timeout bounds the TCP connect; the handshake falls under the response-head one.
                endpoint = wrapClientTLS(self._tls, endpoint)
            self._endpoints[key] = endpoint
        return endpoint


class UpstreamPool:
    """Connections and concurrency for one upstream; every request to it goes through `acquire` and `request`."""

    def __init__(self, upstream: Upstream, reactor: Any) -> None:
        self.upstream = upstream
        self._reactor = reactor
        self._named = "the upstream" if upstream.inline else f"upstream {upstream.name}"
        """How its errors name it: an upstream a route gave as a URL by no address (see Upstream.inline); the
        request names it by its route (`UpstreamSaturated.naming`)."""
        self._pool = _ConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = upstream.max_idle_connections
        self._pool.cachedConnectionTimeout = upstream.idle_timeout
        self._slots = DeferredSemaphore(upstream.max_connections)
        # Parsed once: Agent.request would parse the URI of every request again.
        self._uri = URI.fromBytes(upstream.origin)
        self._key = (self._uri.scheme, self._uri.host, self._uri.port)
        self._agents: dict[float, tuple[Agent, IStreamClientEndpoint]] = {}
        self._tls = client_creator(upstream) if upstream.scheme == "https" else None
        if upstream.tls is not None and upstream.tls.client is not None:
            log_certificate(f"upstream {upstream.name}", upstream.tls.client, reactor)
        if upstream.tls is not None and not upstream.tls.verify:
            _log.warn(
                "Upstream {name} ({url}): TLS certificate verification is OFF (verify = false); anyone on the path "
                "can impersonate it",
                name=upstream.name,
                url=upstream.origin.decode("ascii"),
            )

    @property
    def in_flight(self) -> int:
        """Requests holding a slot."""
        return self._slots.limit - self._slots.tokens

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._slots.waiting)

    @property
    def idle(self) -> int:
        """Idle keep-alive connections kept for reuse."""
        return self._pool.idle

    def try_acquire(self) -> bool:
        """Take a free slot at once if there is one: the common case, without a Deferred.

        A free token means nobody is queued (DeferredSemaphore hands a released token to a waiter first), so
        this never jumps the queue. The caller must `release` the slot, exactly once.
        """
        if self._slots.tokens:
            self._slots.tokens -= 1
            return True
        return False

    def acquire(self) -> Deferred[Any]:
        """A slot for one request; fails with `UpstreamSaturated` when the queue is full or the wait too long.

        The caller must `release` a slot it got, exactly once; cancelling the Deferred leaves the queue.
        """
        up = self.upstream
        if self._slots.tokens == 0 and len(self._slots.waiting) >= up.max_queue:
            return fail(
                UpstreamSaturated(f"{{upstream}} has {up.max_queue} requests queued already", upstream=self._named)
            )
        waiting = self._slots.acquire()
        if waiting.called:
            return waiting

        def timed_out(failure: Failure) -> Failure:
            if failure.check(DeferredTimeout):
                raise UpstreamSaturated(
                    f"no connection to {{upstream}} came free within {up.queue_timeout:g} s", upstream=self._named
                )
            return failure

        waiting.addTimeout(up.queue_timeout, self._reactor)
        return waiting.addErrback(timed_out)

    def release(self) -> None:
        self._slots.release()

    def request(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: IBodyProducer | None,
        *,
        connect_timeout: float,
        on_connected: Callable[[], None] | None = None,
    ) -> Deferred[IResponse]:
        """Send one request over a pooled connection (opened within `connect_timeout` if none is idle).

        `target` goes on the request line byte for byte: `Agent.request` would parse it out of a URI and
        serialise it again, dropping an empty query ("/x?") or empty parameters ("/x;") and costing a URL
        parse per request; `_requestWithEndpoint` (what `ProxyAgent` uses too) takes it as it is.
        """
        pair = self._agents.get(connect_timeout)
        if pair is None:
            factory = _EndpointFactory(self._reactor, connect_timeout, self._tls)
            agent = Agent.usingEndpointFactory(self._reactor, factory, self._pool)
            pair = self._agents[connect_timeout] = (agent, factory.endpointForURI(self._uri))
        agent, endpoint = pair
        self._pool.on_connected = on_connected  # Agent asks the pool for a connection within this call
        return agent._requestWithEndpoint(self._key, endpoint, method, self._uri, headers, body, target)

    def close(self) -> Deferred[None]:
        """Close the idle pooled connections (in-flight ones close when their response ends)."""
        return self._pool.closeCachedConnections()
