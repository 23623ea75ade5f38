"""The public HTTP server: a Twisted `HTTPFactory` whose channels make a `GatewayRequest` for every request.

Rules:
* The factory adds nothing of its own to a response (no `Server`, no `Content-Type`, no `Date`: a proxy is
  invisible) and keeps no per-request state; everything a request needs is in the `Gateway` it carries, which a
  reload swaps whole.
* The channel is strict where Twisted is lenient, and every refusal is an answer: a request head that is too
  long, too slow or ambiguously framed gets a problem+json response with `Connection: close` (never silence),
  and nothing of it reaches an upstream. After the answer the connection is half-closed and what the client
  still sends is read and dropped for at most `server.lingering_timeout`: closing with unread bytes would make
  the kernel reset the connection and could destroy the answer in flight.
* At most `server.max_connections` client connections are open per process: at the cap the listening sockets
  stop accepting (the kernel's backlog holds further clients, as with nginx and HAProxy); a connection accepted
  past the cap anyway (one accept batch takes up to 100) is answered 503.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IListeningPort,
    IReactorTime,
    ITCPTransport,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, HTTPFactory, Request, _ChunkedTransferDecoder
from twisted.web.http_headers import Headers
from zope.interface import implementer

from gateway.addresses import canonical_ip
from gateway.config import Limits, Listener, Server
from gateway.errors import (
    BadRequest,
    GatewayError,
    HeadersTooLarge,
    HeadTimeout,
    RequestLineTooLong,
    TooManyConnections,
    problem,
    reason_phrase,
)
from gateway.framing import MAX_BODY_LENGTH, StrictChunkedDecoder, body_length
from gateway.headers import request_id_of
from gateway.metrics import Live, PoolState
from gateway.request import Gateway, GatewayRequest, Phase, refusal_record
from gateway.tls import ClientCertificate, client_certificate, handshake_failure, tls_parameters

__all__ = ["GatewayChannel", "GatewayFactory"]

_log = Logger()

_CRLF = len(b"\r\n")
_MAX_PORT = 65535
_CAP_LOG_INTERVAL = 60.0
_ANSWERED = frozenset({Phase.SENT, Phase.DONE})
"""Phases of a request whose whole response has been written."""
# HTTPChannel's private "reading the request line" flag (1, or 2 after one stray empty line; 0 within headers).
_FIRST_LINE = "_HTTPChannel__first_line"


def refusal_bytes(error: GatewayError, request_id: str, *, head_request: bool = False, server: str = "") -> bytes:
    """The whole response that refuses a request on the channel: status, problem+json body (none for HEAD, whose
    answer never has one), Connection: close, and the configured Server header if there is one."""
    status, content_type, body = problem(error, request_id)
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\nX-Request-ID: %s\r\n"
    head %= (status, reason_phrase(status), content_type, len(body), request_id.encode("ascii"))
    if server:
        head += b"Server: %s\r\n" % server.encode("ascii")
    head += b"\r\n"
    return head if head_request else head + body


@implementer(IHandshakeListener)
class GatewayChannel(HTTPChannel):
    """Twisted's HTTP/1.1 channel with the gateway's limits on the request head, each refused with its status.

    Twisted counts the head against its own (looser) limits too; this channel counts first, so those never
    fire. What Twisted refuses itself (invalid header names or values, Content-Length with Transfer-Encoding,
    a Content-Length that is not digits or comes twice, bad chunk framing, a bad request line) arrives through
    `_respondToBadRequestAndDisconnect` and is answered the same way, 400."""

    factory: GatewayFactory
    limits: Limits = Limits()
    """The head limits, as the factory had them when the connection opened."""
    server: Server = Server()
    listener: Listener | None = None
    """The listener the connection came in on (None for a channel a test builds without one)."""

    refused: GatewayError | None = None
    """The error the connection was refused with, if it was."""
    _header_bytes = 0
    _header_count = 0
    _counted = False
    _head_timer: IDelayedCall | None = None
    _linger_timer: IDelayedCall | None = None
    _lingered = 0
    _client_certificate: ClientCertificate | bool | None = False
    """False until read (once per connection: the handshake is over before any request arrives)."""
    _handshaken = False

    _tls_info: tuple[str | None, str | None] | None = None

    @property
    def tls_info(self) -> tuple[str | None, str | None]:
        """The TLS version and cipher the handshake agreed on ("TLSv1.3", "TLS_AES_256_GCM_SHA384"), or
        (None, None) on a plain connection; read once per connection."""
        if self._tls_info is None:
            self._tls_info = tls_parameters(self.transport)
        return self._tls_info

    @property
    def client_certificate(self) -> ClientCertificate | None:
        """The client certificate the TLS handshake verified, if one was sent."""
        if self._client_certificate is False:
            self._client_certificate = client_certificate(self.transport)
        return self._client_certificate  # type: ignore[return-value]

    # --- connection -------------------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self._counted = True
        if not self.factory.connection_opened(self):
            self.refuse(TooManyConnections("the gateway is at its client connection limit; try again shortly"))

    def handshakeCompleted(self) -> None:
        """The TLS layer under this channel finished its handshake (IHandshakeListener)."""
        self._handshaken = True

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        # Only the TLS layer ends a connection with an SSL.Error; a client that merely left is not a failure.
        if not self._handshaken and self.listener is not None and reason.check(SSL.Error):
            self.factory.handshake_failed(self.listener, reason.value)
        self._cancel_head_timer()
        if self._linger_timer is not None and self._linger_timer.active():
            self._linger_timer.cancel()
        self._linger_timer = None
        if self._counted:
            self._counted = False
            self.factory.connection_closed(self)
        super().connectionLost(reason)

    # --- the request head ---------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._peer is None and self._invalid_peer():
            return
        if self.refused is not None:
            # Lingering after a refusal: read and dropped, up to server.lingering_max_bytes.
            self._lingered += len(data)
            if self._lingered > self.server.lingering_max_bytes and self._linger_timer is not None:
                self._linger_expired()
            return
        if self._busyReceiving:
            # Called back from within a parse (a request finished and its pipelined successor is replayed):
            # LineReceiver only buffers it, and the outer call parses it and checks what is left.
            super().dataReceived(data)
            return
        super().dataReceived(data)
        if self.refused is not None or not self.line_mode or self.transport.disconnecting:
            return
        # Here, in line mode, LineReceiver's buffer holds only the unfinished line of a request head.
        pending = self._buffer
        if b"\n" in pending:
            # A line break without CR: Twisted splits on CRLF only, so it would wait for ever (RFC 9112 §2.2
            # allows a bare LF to be taken as a line end; a gateway must not guess what the next hop would do).
            self.refuse(BadRequest("a line of the request head ends in a bare LF; lines end in CRLF"))
        elif self._head_timer is None and (pending or not getattr(self, _FIRST_LINE)):
            # A head has begun and is not complete: it has head_timeout from now (no time passes within a call).
            seconds = self.server.head_timeout
            self._head_timer = self.callLater(seconds, self._head_timed_out, seconds)

    def lineReceived(self, line: bytes) -> None:
        if self.refused is not None:
            return
        if getattr(self, _FIRST_LINE):
            gateway = self.factory.gateway
            if gateway.limits is not self.limits:
                # A reload changed the limits since this kept-alive connection's last head: its new head (and
                # what follows) is held to the config of now, as a new connection's is.
                self.limits, self.server = gateway.limits, gateway.server
                self.totalHeadersSize = self.limits.max_request_line_bytes + self.limits.max_header_bytes
                self.maxHeaders = self.limits.max_header_count
            super().lineReceived(line)
            if not getattr(self, _FIRST_LINE):
                self.MAX_LENGTH = self._header_room()  # the request line is in: header lines come next
            return
        if line:
            if line[0] in b" \t":
                self.refuse(BadRequest("obs-fold: a header line begins with whitespace (RFC 9112 §5.2)"))
                return
            self._header_bytes += len(line) + _CRLF
            self._header_count += 1
            limits = self.limits
            if self._header_bytes > limits.max_header_bytes:
                self.refuse(HeadersTooLarge(f"the header fields are over the {limits.max_header_bytes}-byte limit"))
                return
            if self._header_count > limits.max_header_count:
                self.refuse(HeadersTooLarge(f"there are more than {limits.max_header_count} header fields"))
                return
            self.MAX_LENGTH = self._header_room()
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        # Twisted refuses every transfer coding but "chunked", except "identity", which it ignores: the body
        # would then be read as the next request (request smuggling). Only "chunked" alone is framing we know,
        # and only in HTTP/1.1: in an HTTP/1.0 message it is faulty framing (RFC 9112 §6.1).
        if line[:1] in b"Tt" and line[:17].lower() == b"transfer-encoding":
            name, _, value = line.partition(b":")
            if name.lower() == b"transfer-encoding":
                if value.strip(b" \t").lower() != b"chunked":
                    self.refuse(BadRequest('the only transfer coding accepted is "chunked" alone'))
                    return False
                if self._version != b"HTTP/1.1":
                    self.refuse(BadRequest("Transfer-Encoding in an HTTP/1.0 request is faulty framing"))
                    return False
        return bool(super().headerReceived(line))

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        if header == b"Content-Length" and data.isdigit():
            # Twisted takes any number of digits, and raises on more than Python converts (leading zeros
            # included): see gateway.framing. It is given the value without them (the header is kept as sent).
            length = body_length(data)
            if length is None:
                self.refuse(BadRequest(f"the Content-Length is over the largest body length taken ({MAX_BODY_LENGTH})"))
                self.length = None
                return False
            data = b"%d" % length
        chosen = bool(super()._maybeChooseTransferDecoder(header, data))
        if type(self._transferDecoder) is _ChunkedTransferDecoder:
            self._transferDecoder.__class__ = StrictChunkedDecoder  # same state; sizes and trailers checked
        return chosen

    def rawDataReceived(self, data: bytes) -> None:
        requests = self.requests
        if requests and isinstance(requests[-1], GatewayRequest) and requests[-1].lingered(len(data)):
            return  # a refused body past the discard bound: the connection is cut, nothing more is parsed
        super().rawDataReceived(data)
        if self._handlingRequest and self._waitingForTransport:
            # Bytes of the next (pipelined) request, arriving while the client is not reading its answer.
            # Twisted buffers them and pauses the socket above 16 KiB, but not while the client is not reading
            # (its pauseProducing leaves the socket alone during a request): a client that never reads and keeps
            # sending would grow the buffer without bound. Pause now; Twisted resumes the socket once the
            # request is done and the client reads again (requestDone, resumeProducing).
            self._networkProducer.pauseProducing()

    def allHeadersReceived(self) -> None:
        """The head is complete: stop its timer and reset the counts for the next request's head."""
        self._cancel_head_timer()
        self._header_bytes = self._header_count = 0
        self.MAX_LENGTH = self.limits.max_request_line_bytes
        super().allHeadersReceived()

    _peer: IAddress | None = None

    def getPeer(self) -> IAddress:
        """The client's address, asked once per connection, with its IP in canonical form. Behind a PROXY
        protocol listener it is the address the header carried (Twisted's parser keeps its text as sent, an
        IPv6 address uncompressed or not an address at all)."""
        if self._peer is None:
            peer = self.transport.getPeer()
            host = getattr(peer, "host", None)
            if isinstance(host, str) and isinstance(peer, IPv4Address | IPv6Address):
                canonical = canonical_ip(host)
                if canonical is not None and "." in canonical and ":" in host:
                    # An IPv4 client of an IPv6 ("::") listener: "::ffff:192.0.2.1" is 192.0.2.1, for
                    # X-Forwarded-For, the logs and per-address limits alike.
                    peer = IPv4Address(peer.type, canonical, peer.port)  # type: ignore[arg-type]
                elif canonical is not None and canonical != host:
                    peer = type(peer)(peer.type, canonical, peer.port)  # type: ignore[arg-type]
            self._peer = peer
        return self._peer

    def _invalid_peer(self) -> bool:
        """On the first bytes of a connection: a client address that is no IP address or a port outside
        0-65535 (a PROXY header's made-up text: Twisted's parser takes any number) ends the connection,
        unanswered, as an invalid PROXY header does."""
        peer = self.getPeer()
        if not isinstance(peer, IPv4Address | IPv6Address):
            return False
        host, port = peer.host, peer.port
        if canonical_ip(str(host)) is not None and isinstance(port, int) and 0 <= port <= _MAX_PORT:
            return False
        _log.warn(
            "Closing a connection whose PROXY header carried an invalid address: {host!r} port {port!r}",
            host=host,
            port=port,
        )
        metrics = self.factory.gateway.metrics
        if metrics is not None and self.listener is not None:
            metrics.proxy_refused(self.listener.describe(), "invalid_address")
        self.transport.abortConnection()
        return True

    _host: IAddress | None = None

    def getHost(self) -> IAddress:
        """The listening address, asked of the socket once per connection rather than by every request
        (`Request.__init__` asks: a `getsockname` system call each time, 2% of bench S5)."""
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line longer than what is left of its limit: LineReceiver would close without a word."""
        limits = self.limits
        if getattr(self, _FIRST_LINE):
            self.refuse(RequestLineTooLong(f"the request line is over the {limits.max_request_line_bytes}-byte limit"))
        else:
            self.refuse(HeadersTooLarge(f"the header fields are over the {limits.max_header_bytes}-byte limit"))

    def _respondToBadRequestAndDisconnect(self) -> None:
        """What Twisted's own parser refuses; it would answer a bare 400 without a body. The detail says which
        part was at fault, from where the parser is: HTTPChannel clears its first-line flag before it parses the
        request line and sets `_command` only once that line parsed, so a line-mode refusal without `_command`
        is the request line's; out of line mode it is the (chunked) body's; else a header line's."""
        if getattr(self, _FIRST_LINE) or (self.line_mode and getattr(self, "_command", None) is None):
            detail = "the request line is malformed"
        elif not self.line_mode:
            detail = "the chunked request body is malformed"
        else:
            detail = "a header line is malformed"
        self.refuse(BadRequest(detail))

    def _failChooseTransferDecoder(self) -> bool:
        """Twisted refuses the framing headers (a Content-Length that is not digits, a second Content-Length or
        Transfer-Encoding, or the two together) here, before the header is stored; refused with a detail that
        says so. Returns False, as the base class does: the request goes no further."""
        self.refuse(
            BadRequest(
                "Content-Length must be a single decimal number, and cannot be combined with Transfer-Encoding "
                "(which may be sent only once)"
            )
        )
        self.length = None
        return False

    def _header_room(self) -> int:
        """The longest header line (without CRLF) that still fits in max_header_bytes; at least 0, so the empty
        line that ends the head always fits."""
        return max(self.limits.max_header_bytes - self._header_bytes - _CRLF, 0)

    def _head_timed_out(self, seconds: float) -> None:
        self._head_timer = None
        self.refuse(HeadTimeout(f"the request head was not complete within {seconds:g} s"))

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            if self._head_timer.active():
                self._head_timer.cancel()
            self._head_timer = None

    # --- refusing -----------------------------------------------------------------------------------------

    def refuse(self, error: GatewayError) -> None:
        """Answer `error` and end the connection; nothing more of it is parsed, and no request on it goes on.

        If a response has already begun on the connection no answer can follow it: a complete one lingers as if
        the refusal were its own, an incomplete one is cut."""
        if self.refused is not None:
            return
        self.refused = error
        self.clearLineBuffer()  # LineReceiver's loop stops at an empty buffer
        self._cancel_head_timer()
        self.setTimeout(None)
        self.persistent = False
        requests, self.requests = self.requests, []
        started = [request for request in requests if request.startedWriting]
        complete = all(getattr(request, "phase", None) in _ANSWERED for request in started)
        request_id = _request_id(requests)
        # The method, once the request line is read (HTTPChannel drops it when the body is complete).
        method = getattr(self, "_command", None) or (requests[-1].method if requests else None)
        gone = Failure(ConnectionAborted(f"request refused: {error.detail}"))
        # Whose refusal it is: the last request's, unless a new request line was being read (no request yet).
        owner = requests[-1] if requests and not getattr(self, _FIRST_LINE) else None
        if isinstance(owner, GatewayRequest):
            owner.refused(error, request_id, method, getattr(self, "_path", None))
        else:
            self._log_refusal(error, request_id, method)
        for request in requests:
            request.connectionLost(gone)  # stops an admitted request: its upstream exchange is cancelled
        _log.info(
            "Refused a client request with {status}: {detail} (peer {peer}, request {request_id})",
            status=error.status,
            detail=error.detail,
            peer=str(self.getPeer()),
            request_id=request_id,
        )
        if not complete:
            self.transport.abortConnection()
            return
        if not started:
            answer = refusal_bytes(error, request_id, head_request=method == b"HEAD", server=self.server.server_header)
            self.transport.write(answer)
        if ITCPTransport.providedBy(self.transport):
            # Lingering close: FIN after the answer, read and drop what still comes, cut at the deadline.
            self._networkProducer.resumeProducing()
            self.transport.loseWriteConnection()
            self._linger_timer = self.callLater(self.server.lingering_timeout, self._linger_expired)
        else:
            self.loseConnection()

    def _log_refusal(self, error: GatewayError, request_id: str, method: bytes | None) -> None:
        gateway = self.factory.gateway
        if gateway.observed:
            client = getattr(self.getPeer(), "host", "")
            gateway.request_ended(refusal_record(request_id, client, method, error.status, tls=self.tls_info))

    def _linger_expired(self) -> None:
        timer, self._linger_timer = self._linger_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self.transport.abortConnection()


def _request_id(requests: list[Any]) -> str:
    """The id of the request being refused: the one the gateway gave it, or one from what was read of it."""
    if not requests:
        return request_id_of(Headers())
    request = requests[-1]
    given = getattr(request, "request_id", "")
    return given if isinstance(given, str) and given else request_id_of(request.requestHeaders)


class GatewayFactory(HTTPFactory):
    """Builds the client-facing HTTP/1.1 channels (idle and head timeouts and head limits from the config),
    and keeps the count of open client connections under server.max_connections."""

    noisy = False  # no "Starting factory" lines: the service logs what it listens on

    def __init__(self, gateway: Gateway, *, clock: IReactorTime) -> None:
        super().__init__(timeout=gateway.server.idle_timeout, reactor=clock)
        self.gateway = gateway
        self.connections = 0
        """Client connections open now."""
        self.channels: set[GatewayChannel] = set()
        self.draining = False
        """Stopping: no new requests on kept-alive connections (each closes after its response)."""
        self.accepting = True
        """Whether the listening ports accept; false at the connection cap."""
        self._ports: list[IListeningPort] = []
        self._cap_logged_at: float | None = None
        self._drained: Deferred[None] | None = None

    def buildProtocol(self, addr: IAddress | None) -> HTTPChannel:  # type: ignore[override]
        channel = GatewayChannel()
        channel.factory = self
        channel.requestFactory = GatewayRequest
        limits = channel.limits = self.gateway.limits
        channel.server = self.gateway.server
        channel.MAX_LENGTH = limits.max_request_line_bytes  # the first line; header lines get their own room
        # Twisted's own counts are a backstop the channel's stricter ones always beat (see GatewayChannel).
        channel.totalHeadersSize = limits.max_request_line_bytes + limits.max_header_bytes
        channel.maxHeaders = limits.max_header_count
        # As HTTPFactory.buildProtocol does: the channel's timers run on our clock.
        channel.callLater = self.reactor.callLater
        channel.timeOut = self.timeOut
        return channel

    # --- the connection cap -------------------------------------------------------------------------------

    def add_port(self, port: IListeningPort) -> None:
        """A listening port serving this factory: paused and resumed with the connection cap."""
        self._ports.append(port)
        if not self.accepting:
            _set_reading(port, False)

    def remove_port(self, port: IListeningPort) -> None:
        """A port about to stop listening: it must not be resumed any more."""
        if port in self._ports:
            self._ports.remove(port)

    def connection_opened(self, channel: GatewayChannel) -> bool:
        """Count a new client connection; false if it is over the cap (and must be refused)."""
        self.connections += 1
        self.channels.add(channel)
        cap = self.gateway.server.max_connections
        if self.connections >= cap and self.accepting:
            self.accepting = False
            now = self.reactor.seconds()
            if self._cap_logged_at is None or now - self._cap_logged_at >= _CAP_LOG_INTERVAL:
                # Once a minute at most: a gateway held at its cap pauses and resumes on every connection.
                self._cap_logged_at = now
                _log.warn("At {cap} client connections: no more are accepted until one closes", cap=cap)
            for port in self._ports:
                _set_reading(port, False)
        return self.connections <= cap

    def connection_closed(self, channel: GatewayChannel) -> None:
        self.connections -= 1
        self.channels.discard(channel)
        if not self.channels and self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)
        if self.connections < self.gateway.server.max_connections and not self.accepting:
            self.accepting = True
            for port in self._ports:
                _set_reading(port, True)

    def handshake_failed(self, listener: Listener, error: SSL.Error) -> None:
        """A client's TLS handshake failed: counted by listener and reason class, not logged (a listener on the
        internet sees scanners and old clients all day; the count shows a trend, a log line each would drown
        the rest)."""
        metrics = self.gateway.metrics
        if metrics is not None:
            metrics.handshake_failed(listener.describe(), handshake_failure(error))

    def reconfigure(self, gateway: Gateway) -> None:
        """A reload: new connections and new requests get `gateway`; requests under way keep theirs."""
        self.gateway = gateway
        self.timeOut = gateway.server.idle_timeout

    # --- graceful drain ---------------------------------------------------------------------------------------

    def drain(self) -> Deferred[None]:
        """Let the requests in flight finish, and close every connection as soon as it has no request: idle
        kept-alive ones now, the others after their response (announced with `Connection: close`). Fires once
        no client connection is left. The listening ports must have stopped accepting already."""
        self.draining = True
        for channel in list(self.channels):
            requests = channel.requests
            if channel.refused is not None:
                continue  # answered and lingering: its timer closes it (closing now could reset the answer)
            if not requests:
                channel.transport.loseConnection()  # idle between requests: nothing is lost
                continue
            channel.persistent = False
            for request in requests:
                if isinstance(request, GatewayRequest) and not request.startedWriting:
                    request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        if not self.channels:
            return succeed(None)
        if self._drained is None:
            self._drained = Deferred()
        return self._drained

    def cut_all(self, ending: str) -> int:
        """Cut every client connection still open (the drain timeout passed): a response under way is never
        finished as if complete. Returns how many were cut."""
        channels = list(self.channels)
        for channel in channels:
            for request in list(channel.requests):
                if isinstance(request, GatewayRequest):
                    request.cut(ending)
            channel.transport.abortConnection()
        return len(channels)

    # --- what a scrape sees -------------------------------------------------------------------------------

    def live(self, draining: bool) -> Live:
        """The process's state now, for the metrics: requests by phase, streams paused by backpressure in each
        direction, body bytes held, and the upstream pools of the current config."""
        phases: dict[str, int] = {}
        paused_responses = paused_uploads = buffered_uploads = buffered_responses = 0
        for channel in self.channels:
            transport = channel.transport
            if isinstance(transport, TLSMemoryBIOProtocol):
                transport = transport.transport  # the socket's buffer, under the TLS layer's (at most a record)
            # FileDescriptor's send buffer: the joined part past its offset, and the list not yet joined.
            buffered_responses += len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
            buffered_responses += getattr(transport, "_tempDataLen", 0)
            for request in channel.requests:
                if not isinstance(request, GatewayRequest):
                    continue
                name = request.phase.value
                phases[name] = phases.get(name, 0) + 1
                relay, pipe = request._relay, request._pipe
                if relay is not None and relay.paused:
                    paused_responses += 1
                if pipe is not None:
                    buffered_uploads += pipe.buffered
                    if pipe.client_paused:
                        paused_uploads += 1
        pools = [PoolState(name, pool.in_flight, pool.queued, pool.idle) for name, pool in self.gateway.pools.items()]
        return Live(
            connections=self.connections,
            requests=phases,
            paused_responses=paused_responses,
            paused_uploads=paused_uploads,
            buffered_upload_bytes=buffered_uploads,
            buffered_response_bytes=buffered_responses,
            pools=pools,
            draining=draining,
        )

    # --- no logging of Twisted's own --------------------------------------------------------------------------

    def startFactory(self) -> None:
        """No combined-log file and no per-second log-date timer: the gateway logs requests itself."""

    def stopFactory(self) -> None:
        """Nothing was started."""

    def log(self, request: Request) -> None:
        """Twisted's combined log line is not written; see `startFactory`."""


def _set_reading(port: IListeningPort, reading: bool) -> None:
    """Start or stop accepting on a listening port (`tcp.Port` is a FileDescriptor); a port that cannot be
    paused keeps accepting, and the channel answers what is over the cap with 503."""
    method = getattr(port, "startReading" if reading else "stopReading", None)
    if method is not None:
        method()
