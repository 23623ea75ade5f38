"""`GatewayResource`: the gateway's proxying as a twisted.web resource, for people who run a twisted.web site of
their own and want one part of it proxied the way the gateway proxies.

The request goes through the same `Exchange` as one read by the gateway's own listener (routing, admission, header
rules, timeouts, error answers, the access log and metrics); only the client end differs: `_RequestEnd` speaks for
the twisted.web request where the exchange expects a client connection (`gateway.http1.server`).

Rules this module keeps:
* Only the response is streamed: twisted.web reads (spools) the whole request body before `render`, so the body
  is fed to the exchange from that spool, 64 KiB at a time, paused whenever the exchange would pause a client
  socket (its pipe's high-water mark, admission pending).
* The body is fed on later reactor turns only, never from within a call of the exchange (which is mid-way
  through a transition then).
* twisted.web adds nothing to a response the exchange did not ask for but the framing (Content-Length when the
  exchange set one, else chunked to an HTTP/1.1 client) and `Connection: close` when the client asked for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    ITCPTransport,
)
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from gateway.config import Listener
from gateway.http1.fields import Fields
from gateway.http1.lifecycle import canonical_peer
from gateway.http1.serving import Message
from gateway.http1.timers import Watchdog
from gateway.http1.transports import IConnectionTransport
from gateway.proxy.context import Gateway
from gateway.proxy.exchange import Exchange
from gateway.tls.server import ClientCertificate, client_certificate, tls_parameters

__all__ = ["GatewayResource"]

CHUNK = 64 * 1024
"""Bytes of the spooled request body read at a time."""
CHUNKS_PER_TURN = 16
"""Chunks fed in one reactor turn at most, so that a fast upstream taking a large body leaves the reactor to others."""


class GatewayResource(Resource):
    """Proxies the requests it is given through a `Gateway` (`gateway.operations.runtime.make_gateway`), as the
    gateway's own listener does.

    Mount it in any twisted.web site::

        gateway = make_gateway(config.load("gateway.toml"), reactor)
        root.putChild(b"api", GatewayResource(gateway))

    Routing is the gateway's, on the request target as the client sent it (the whole path, not the part below
    where the resource is mounted): here the routes would have `path_prefix = "/api/"` (and `strip_prefix = true`
    if the upstream does not expect it). A request no route matches gets the gateway's 404. To serve one route
    only, give the resource a gateway made from a config that has just that route.

    twisted.web spools the whole request body (in memory, or in a temporary file when it is large) before `render`
    is called, so uploads through this resource are not streamed: the upstream only sees the first byte once the
    client has sent the last, and admission (the route's body limit, credentials, rate limits) happens only after
    the whole body has arrived. `100 Continue` is twisted.web's, sent before admission. The response IS streamed
    with backpressure, by the same relay as on the gateway's own listener: a client that reads slowly pauses the
    upstream socket, one that leaves closes the upstream connection, and a response cut short upstream cuts the
    client connection (it never looks complete).

    Header names reach the client in twisted.web's spelling (`Content-Type`), not byte for byte as the upstream
    wrote them. `gateway` may be replaced (a reload): requests under way keep the one they began with.
    """

    isLeaf = True

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.gateway = gateway

    def render(self, request: Request) -> Any:
        request.defaultContentType = None  # no Content-Type but the exchange's
        gateway = self.gateway
        content: IO[bytes] | None = request.content
        size = 0
        if content is not None:
            size = content.seek(0, 2)
            content.seek(0)
        message = _message(request, size)
        body = _SpooledBody(content, gateway.clock)
        end = _RequestEnd(request, body, gateway.clock)
        exchange = Exchange(gateway, end, message, False)
        body.exchange = exchange
        request.notifyFinish().addErrback(end.client_gone, exchange)
        exchange.begin()
        if size:
            body.start()
        elif not end.gone:
            exchange.body_ended()
        return NOT_DONE_YET

    def close(self) -> Deferred[Any]:
        """Close the gateway's idle upstream connections and its admission checks' threads and connections (for a
        site that stops with its gateway); fires once they are closed."""
        gateway = self.gateway
        closing = [pool.close() for pool in gateway.pools.values()]
        closing.append(gateway.gatekeeper.close())
        return DeferredList(closing)


def _message(request: Request, size: int) -> Message:
    """The request as the exchange takes it from the wire layer: twisted.web has de-chunked the body, so its
    length is the spool's, and so is its framing (a Content-Length; the upstream gets its own anyway)."""
    headers = Fields((name, value) for name, values in request.requestHeaders.getAllRawHeaders() for value in values)
    if headers.hasHeader(b"transfer-encoding") or headers.hasHeader(b"content-length"):
        headers.removeHeader(b"transfer-encoding")
        headers.setRawHeaders(b"Content-Length", [b"%d" % size])
    message = Message()
    message.method = request.method
    message.target = request.uri
    message.version = request.clientproto
    message.headers = headers
    message.length = size
    message.keep_alive = request.clientproto == b"HTTP/1.1"
    message.ended = True
    return message


@implementer(IPushProducer)
class _SpooledBody:
    """The request body twisted.web spooled, fed to the exchange a chunk at a time on later reactor turns; a push
    producer, paused by the exchange's request pipe above its high-water mark (as it would pause a client socket)
    and held while admission decides."""

    def __init__(self, content: IO[bytes] | None, clock: IReactorTime) -> None:
        self._content = content
        self._clock = clock
        self.exchange: Exchange | None = None
        self._call: IDelayedCall | None = None
        self._paused = False
        """Paused by the request pipe (IPushProducer)."""
        self._held = False
        """Held while admission decides (the exchange's pause_reading)."""
        self._unwanted = False
        """The exchange has answered and drops the rest: it is not read, only its end reported."""
        self._done = False

    def start(self) -> None:
        self._schedule()

    def hold(self) -> None:
        self._held = True

    def release(self) -> None:
        self._held = False
        self._schedule()

    def skip(self) -> None:
        """The rest of the body is not wanted: report its end (on a later turn) without reading it."""
        self._unwanted = True
        self._schedule()

    def stop(self) -> None:
        """Feed nothing more (the request ended another way)."""
        self._done = True
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.stop()

    def _schedule(self) -> None:
        if self._done or self._call is not None or self.exchange is None:
            return
        if self._unwanted or not (self._paused or self._held):
            self._call = self._clock.callLater(0, self._feed)

    def _feed(self) -> None:
        self._call = None
        exchange = self.exchange
        if self._done or exchange is None:
            return
        if self._unwanted or self._content is None:
            self._done = True
            exchange.body_ended()
            return
        for _ in range(CHUNKS_PER_TURN):
            if self._paused or self._held or self._done or self._unwanted:
                break
            data = self._content.read(CHUNK)
            if not data:
                self._done = True
                exchange.body_ended()
                return
            exchange.body_received(data)
        self._schedule()


class _BodyProducing:
    """What the exchange's request pipe pauses as "the client" is the spooled body, not the socket (twisted.web has
    read the socket already)."""

    body: _SpooledBody

    def pauseProducing(self) -> None:
        self.body.pauseProducing()

    def resumeProducing(self) -> None:
        self.body.resumeProducing()

    def stopProducing(self) -> None:
        self.body.stopProducing()


class _PlainTransport(_BodyProducing, proxyForInterface(ITCPTransport, "original")):  # type: ignore[misc]
    """The request's transport, producing the spooled body."""

    def __init__(self, original: Any, body: _SpooledBody) -> None:
        super().__init__(original)
        self.body = body


class _SecureTransport(_BodyProducing, proxyForInterface(ISSLTransport, "original")):  # type: ignore[misc]
    """The request's TLS transport (the exchange tells TLS by `ISSLTransport`), producing the spooled body."""

    def __init__(self, original: Any, body: _SpooledBody) -> None:
        super().__init__(original)
        self.body = body


def _nothing() -> None:
    """What the timer does before the exchange first gives it a wait."""


class _RequestEnd:
    """The client end the exchange answers through, over a twisted.web request: the members of
    `gateway.http1.server.ClientConnection` the exchange uses, mapped to the request's public API."""

    listener: Listener | None = None
    """No gateway listener (and so no redirect to HTTPS: the site decides that)."""

    def __init__(self, request: Request, body: _SpooledBody, clock: IReactorTime) -> None:
        self._request = request
        self._body = body
        self.timer = Watchdog(clock, 0.0, _nothing)
        """The one timer the exchange and its response relay measure their waits with (see ClientConnection)."""
        self.secure = ISSLTransport.providedBy(request.transport)
        """Whether the client came over TLS."""
        self.transport = (_SecureTransport if self.secure else _PlainTransport)(request.transport, body)
        self.persistent = request.clientproto == b"HTTP/1.1"
        """Whether another request may follow on the connection (twisted.web's own decision stands; this can
        only close the connection after the response)."""
        self.gone = False
        self._finished = False
        self._peer: IAddress | None = None

    @property
    def tls_info(self) -> tuple[str | None, str | None]:
        return tls_parameters(self._request.transport)

    @property
    def client_certificate(self) -> ClientCertificate | None:
        return client_certificate(self._request.transport)

    def getPeer(self) -> IAddress:
        """The client's address, its IP in canonical form (an IPv4 client of an IPv6 socket as IPv4)."""
        if self._peer is None:
            self._peer = canonical_peer(self._request.getClientAddress())
        return self._peer

    def client_gone(self, reason: Failure, exchange: Exchange) -> None:
        """twisted.web reports the connection lost before the response finished."""
        self.gone = True
        self._body.stop()
        exchange.connection_lost(reason)
        self.timer.cancel()

    # --- the response ----------------------------------------------------------------------------------------

    def send_continue(self) -> None:
        """twisted.web has answered `Expect: 100-continue` itself, before the body."""

    def write_head(self, code: int, phrase: bytes, headers: Fields, *, head_request: bool) -> None:
        """The exchange's status and headers, and nothing of twisted.web's but its framing; written now."""
        request = self._request
        request.setResponseCode(code, phrase)
        out = request.responseHeaders
        out.removeHeader(b"date")
        out.removeHeader(b"server")
        for name, values in headers.getAllRawHeaders():
            out.setRawHeaders(name, values)
        request.write(b"")

    def write_body(self, data: bytes) -> None:
        if not self._finished:
            self._request.write(data)

    def end_body(self) -> None:
        """The response is complete: twisted.web writes the last chunk and is done with the request (the rest of
        the body, already spooled, is not needed: see `linger`)."""
        if self._finished or self.gone:
            return
        self._finished = True
        request = self._request
        if not self.persistent and request.channel is not None:
            request.channel.persistent = False  # the exchange said `Connection: close`: twisted.web closes after
        request.finish()

    def finish(self) -> None:
        self.end_body()
        self.timer.cancel()

    def abort(self) -> None:
        """Cut the connection: a response that cannot be completed must not look complete."""
        self.persistent = False
        self._body.stop()
        self.timer.cancel()
        transport = self._request.transport
        if ITCPTransport.providedBy(transport):
            transport.abortConnection()
        elif transport is not None:
            transport.loseConnection()

    def linger(self) -> None:
        """The answer is complete before the exchange took the whole body: the rest is dropped unread (it is
        spooled, so nothing waits on the socket); its end is reported on the next turn."""
        self._body.skip()

    def switch_protocols(self, tunnel: Callable[[bytes], object]) -> tuple[IConnectionTransport, bytes]:
        """Never called: a twisted.web request is never taken for a WebSocket upgrade (its `Message` does not ask
        for one, so its Upgrade header is not passed on), and so never becomes a tunnel."""
        raise NotImplementedError("a twisted.web request does not switch protocols")

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self._request.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if not self.gone and not self._finished:
            self._request.unregisterProducer()

    # --- the request body --------------------------------------------------------------------------------

    def pause_reading(self) -> None:
        self._body.hold()

    def resume_reading(self) -> None:
        self._body.release()
