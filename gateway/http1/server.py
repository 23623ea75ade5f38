"""A client connection: HTTP/1.1 requests read by llhttp (`httptools`), responses written in order.

Rules:
* Strict: llhttp with no lenient flag (bare LF, obs-fold, CL beside TE, a duplicate Content-Length, control bytes,
  chunk sizes over 64 bits are refused); on top of it the gateway's own: the head limits (request line, header
  bytes, header count; each exact, and a head over one is refused before it ends), a transfer coding other than
  `chunked` alone, chunked framing in HTTP/1.0, a Content-Length or chunk size over 2^63-1, a version other than
  HTTP/1.0 and 1.1, a malformed trailer. Every refusal is an answer (problem+json, `Connection: close`), then a
  lingering close: FIN, and what the client still sends is read and dropped for at most
  `server.lingering_timeout` (closing with unread bytes would reset the connection and could destroy the answer).
* One request is served at a time. A pipelined request is read (its head parsed, its body held) only from the
  socket read already under way: reading pauses until the request before it is answered, so at most one read is
  held, whatever the client sends.
* Nothing is sent that the exchange did not ask for: no `100 Continue` (the exchange sends it after admission),
  no Date, Server or Content-Type. A head is one write. The body of a response without Content-Length is chunked
  to an HTTP/1.1 client and delimited by the connection's close to an HTTP/1.0 one.
* Timers: the head timer runs from a head's first byte to its end; the idle timer only while no request is under
  way (a request's body and response have their own timeouts, the exchange's).
"""

from __future__ import annotations

from collections import deque
from typing import Any, NoReturn
from typing import Protocol as TypingProtocol

import httptools
from OpenSSL import SSL
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
    ISSLTransport,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.addresses import canonical_ip
from gateway.config import Limits, Listener, Server
from gateway.errors import (
    BadRequest,
    GatewayError,
    HeadersTooLarge,
    HeadTimeout,
    NotSupported,
    RequestLineTooLong,
    problem,
    reason_phrase,
)
from gateway.headers import request_id_of
from gateway.http1.fields import Fields
from gateway.http1.framing import MAX_BODY_LENGTH, body_length
from gateway.http1.heads import CRLF, LAST_CHUNK, chunk
from gateway.http1.timers import Watchdog
from gateway.http1.transports import IConnectionTransport
from gateway.tls.server import ClientCertificate, client_certificate, tls_parameters

__all__ = ["ClientConnection", "ConnectionOwner", "Message", "RequestHandler", "canonical_peer", "refusal_bytes"]

_log = Logger()

_CRLF = len(CRLF)
_MAX_PORT = 65535
_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}
_NO_BODY_STATUSES = frozenset({204, 304})
_VERSION_BYTES = len(b" HTTP/1.1")
"""What a request line has after its target (llhttp takes exactly one space and an 'HTTP/x.y' version)."""
_LWS = b" \t"
_SEND_LIMIT = 1024 * 1024
"""The most a client socket's `send` is given at once (the public `SEND_LIMIT` of Twisted's `FileDescriptor`,
128 KiB by default): one of the largest upstream reads (`gateway.proxy.streaming.ReadSizer.MAX`) goes out in one call,
where 128 KiB at a time took eight, each a turn of the reactor, and copied what was left after each (bench S1:
+15% throughput at 256 KiB, +30% with 1 MiB reads)."""
_FRAMING = (
    "Content-Length must be a single decimal number, and cannot be combined with Transfer-Encoding (which may be "
    "sent only once)"
)


def refusal_bytes(error: GatewayError, request_id: str, *, head_request: bool = False, server: str = "") -> bytes:
    """The whole response that refuses a request on the connection: status, problem+json body (none for HEAD,
    whose answer never has one), Connection: close, and the configured Server header if there is one."""
    status, content_type, body = problem(error, request_id)
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\nX-Request-ID: %s\r\n"
    head %= (status, reason_phrase(status), content_type, len(body), request_id.encode("ascii"))
    if server:
        head += b"Server: %s\r\n" % server.encode("ascii")
    head += b"\r\n"
    return head if head_request else head + body


def canonical_peer(peer: IAddress) -> IAddress:
    """A connection's peer address with its IP in canonical form: an IPv4 client of an IPv6 ("::") socket as IPv4
    ("::ffff:192.0.2.1" is 192.0.2.1, for X-Forwarded-For, the logs and per-address limits alike), an IPv6 address
    compressed. Behind a PROXY protocol listener the address is the header's text as sent, which may be no
    address at all: then it is returned as it is."""
    if not isinstance(peer, IPv4Address | IPv6Address):
        return peer
    host = peer.host
    canonical = canonical_ip(host)
    if canonical is None or canonical == host:
        return peer
    if "." in canonical and ":" in host:
        return IPv4Address(peer.type, canonical, peer.port)
    return type(peer)(peer.type, canonical, peer.port)


class Message:
    """A request as read: its head once complete, then whether its body has ended. Held while pipelined."""

    __slots__ = ("_target", "body", "ended", "headers", "keep_alive", "length", "method", "target", "version")

    def __init__(self) -> None:
        self.method = b""
        self._target: list[bytes] = []
        self.target = b""
        self.version = b""
        self.headers = Fields()
        self.length: int | None = 0
        """The Content-Length, 0 without a body, None for a chunked body."""
        self.keep_alive = False
        self.body: deque[bytes] | None = None
        """Body chunks read while the message waits its turn (pipelined)."""
        self.ended = False


class RequestHandler(TypingProtocol):
    """What serves one request: the exchange (`gateway.proxy.exchange`). Told of the body and of the connection's end;
    it answers through the connection's response methods and calls `finish` when it is done."""

    def begin(self) -> None: ...

    def body_received(self, data: bytes) -> None: ...

    def body_ended(self) -> None: ...

    def lingered(self, size: int) -> bool: ...

    def refused(self, error: GatewayError, request_id: str) -> None: ...

    def connection_lost(self, reason: Failure) -> None: ...

    @property
    def answered(self) -> bool:
        """Whether the whole response has been written."""
        ...


class ConnectionOwner(TypingProtocol):
    """What a connection asks of the server it belongs to (`gateway.proxy.site.GatewayFactory`)."""

    clock: IReactorTime

    @property
    def limits(self) -> Limits: ...

    @property
    def server(self) -> Server: ...

    def connection_opened(self, connection: ClientConnection) -> GatewayError | None: ...

    def connection_closed(self, connection: ClientConnection) -> None: ...

    def handle(self, connection: ClientConnection, message: Message) -> RequestHandler: ...

    def head_refused(
        self, connection: ClientConnection, error: GatewayError, request_id: str, line: tuple[bytes, bytes] | None
    ) -> None: ...

    def handshake_failed(self, listener: Listener, error: SSL.Error) -> None: ...

    def invalid_peer(self, listener: Listener | None) -> None: ...


@implementer(IHandshakeListener)
def _raise_send_limit(transport: object) -> None:
    """Set `_SEND_LIMIT` on the socket's transport under a connection: its own, or the one under its TLS layer
    (each wrapping layer's `transport`, a few at most: TLS, a PROXY protocol header). A wrapper answers for the
    attributes of what it wraps (`ProtocolWrapper.__getattr__`), so the socket's is told by its class."""
    for _ in range(3):
        if isinstance(transport, FileDescriptor):
            transport.SEND_LIMIT = _SEND_LIMIT
            return
        transport = getattr(transport, "transport", None)


class ClientConnection(Protocol):
    """One client connection, from accept to close."""

    transport: IConnectionTransport
    """Set by `makeConnection`, before any other method runs."""

    def __init__(self, owner: ConnectionOwner, listener: Listener | None = None) -> None:
        self.owner = owner
        self.listener = listener
        """The listener the connection came in on (None for one a test builds without one)."""
        self._clock = owner.clock
        self.limits = owner.limits
        """The head limits, as the server had them when the connection's current head began."""
        self.server = owner.server
        self.persistent = True
        """Whether another request may follow the current one."""
        self.refused: GatewayError | None = None
        """The error the connection was refused with, if it was."""
        self.handler: RequestHandler | None = None
        """The request being served (at most one)."""
        self._parser = httptools.HttpRequestParser(self)
        self._message: Message | None = None
        """The message being read (its head, then its body)."""
        self._queued: deque[Message] = deque()
        """Pipelined messages read before the one before them was answered."""
        self._head_bytes = 0
        self._header_count = 0
        self._line_done = False
        self._in_head = False
        """Between a message's first byte and the end of its head."""
        self._head_raw = 0
        self.head_began = 0.0
        """When the latest request head began (for the access record of a refused one)."""
        self._begun = 0
        """Messages begun within the current read."""
        self._head_timer: IDelayedCall | None = None
        self.timer = Watchdog(self._clock, self.server.idle_timeout, self._idle_expired)
        """The connection's one timer: its idle time between requests, and while a request is served whatever
        that request's exchange waits for (the response head, the gaps in the response body, the lingering
        deadline). Re-targeted with `restart`, so a request costs no timer of its own (one pending call at most,
        moved only when a deadline comes sooner)."""
        self._idle = False
        """Whether the timer measures the connection's idle time."""
        self._linger_timer: IDelayedCall | None = None
        self._lingered = 0
        self._reading_paused = False
        self._last_read = False
        """The latest request was the connection's last (Connection: close, HTTP/1.0 without keep-alive, or the
        gateway closes after it): what follows is not read (RFC 9112 section 9.6)."""
        self._body_progress = False
        self._framing_raw = 0
        """Bytes of a chunked body's reads that carried no body (size lines, extensions, trailers)."""
        self._refuse_after: GatewayError | None = None
        """A refusal of a later head, answered once the request under way has finished."""
        self._counted = False
        self._handshaken = False
        self._peer: IAddress | None = None
        self._host: IAddress | None = None
        self._tls_info: tuple[str | None, str | None] | None = None
        self._client_certificate: ClientCertificate | bool | None = False
        self._secure: bool | None = None
        # The response being written.
        self._chunked = False
        self._body_allowed = True
        self.response_started = False
        self.response_ended = False
        self.sent_length = 0
        """Body bytes of the current response written so far."""
        self._version = b"HTTP/1.1"

    # --- what the exchange asks of the connection -------------------------------------------------------------

    @property
    def tls_info(self) -> tuple[str | None, str | None]:
        """The TLS version and cipher the handshake agreed on, or (None, None) on a plain connection."""
        if self._tls_info is None:
            self._tls_info = tls_parameters(self.transport)
        return self._tls_info

    @property
    def secure(self) -> bool:
        """Whether the client came over TLS (asked once per connection)."""
        if self._secure is None:
            self._secure = bool(ISSLTransport.providedBy(self.transport))
        return self._secure

    @property
    def client_certificate(self) -> ClientCertificate | None:
        """The client certificate the TLS handshake verified, if one was sent (read once per connection)."""
        if self._client_certificate is False:
            self._client_certificate = client_certificate(self.transport)
        return self._client_certificate  # type: ignore[return-value]

    def getPeer(self) -> IAddress:
        """The client's address, asked once per connection, with its IP in canonical form. Behind a PROXY
        protocol listener it is the address the header carried (Twisted's parser keeps its text as sent, an
        IPv6 address uncompressed or not an address at all)."""
        if self._peer is None:
            self._peer = canonical_peer(self.transport.getPeer())
        return self._peer

    def getHost(self) -> IAddress:
        """The listening address, asked of the socket once per connection."""
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    def send_continue(self) -> None:
        """`100 Continue`: the exchange admitted a request whose client waits for it before sending the body."""
        if not self.response_started and not self.transport.disconnecting:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def write_head(self, code: int, phrase: bytes, headers: Fields, *, head_request: bool) -> None:
        """The response head, in one write. Its framing is the connection's: a Content-Length the exchange set is
        kept; without one the body is chunked (HTTP/1.1) or ends with the connection (HTTP/1.0); a response to
        HEAD and a 204 or 304 has no body."""
        self.response_started = True
        body_allowed = not head_request and code not in _NO_BODY_STATUSES
        parts = [b"HTTP/1.1 %d %s\r\n" % (code, phrase)]
        has_length = False
        for key, (name, values) in headers.entries.items():
            if key == b"content-length":
                has_length = True
            for value in values:
                parts += (name, b": ", value, CRLF)
        if body_allowed and not has_length:
            if self._version == b"HTTP/1.1":
                self._chunked = True
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.persistent = False  # the end of the body is the end of the connection
        if not self.persistent and self._version == b"HTTP/1.1" and not headers.hasHeader(b"connection"):
            parts.append(b"Connection: close\r\n")
        parts.append(CRLF)
        self._body_allowed = body_allowed
        self.transport.write(b"".join(parts))

    def write_body(self, data: bytes) -> None:
        """Body bytes of the response (dropped for a response that has no body: HEAD, 204, 304)."""
        if not data or not self._body_allowed or self.response_ended:
            return
        self.sent_length += len(data)
        if self._chunked:
            self.transport.writeSequence(chunk(data))
        else:
            self.transport.write(data)

    def end_body(self) -> None:
        """The response body is complete (the last chunk is written); the request may still be being read."""
        if not self.response_ended:
            self.response_ended = True
            if self._chunked:
                self._chunked = False
                self.transport.write(LAST_CHUNK)

    def finish(self) -> None:
        """The request is served (its response complete, its body read): the next request may be read."""
        self.end_body()
        self.handler = None
        if self._refuse_after is not None:
            error, self._refuse_after = self._refuse_after, None
            if self.persistent and not self.transport.disconnecting:
                self.refuse(error)
            else:
                self.transport.loseConnection()
            return
        if self.refused is not None:
            return
        if not self.persistent or self.transport.disconnecting:
            self.transport.loseConnection()
            return
        self._next()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def pause_reading(self) -> None:
        self.transport.pauseProducing()

    def resume_reading(self) -> None:
        """Read from the client again, unless a pipelined request waits (then the next request resumes it)."""
        if not self._queued:
            self.transport.resumeProducing()

    def abort(self) -> None:
        """Cut the connection: a response that cannot be completed must not look complete."""
        self.persistent = False
        self._cancel_timers()
        self.transport.abortConnection()

    def linger(self) -> None:
        """The answer is complete and the request body still comes: FIN now, read and drop the rest."""
        self.persistent = False
        if ITCPTransport.providedBy(self.transport):
            self.transport.loseWriteConnection()

    # --- connection -----------------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        _raise_send_limit(self.transport)
        self._counted = True
        refusal = self.owner.connection_opened(self)
        if refusal is not None:
            self.refuse(refusal)
            return
        self._arm_idle()

    def handshakeCompleted(self) -> None:
        """The TLS layer under this connection finished its handshake (IHandshakeListener)."""
        self._handshaken = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Only the TLS layer ends a connection with an SSL.Error; a client that merely left is not a failure.
        if not self._handshaken and self.listener is not None and isinstance(reason.value, SSL.Error):
            self.owner.handshake_failed(self.listener, reason.value)
        self._cancel_timers()
        handler, self.handler = self.handler, None
        self._queued.clear()
        if handler is not None:
            handler.connection_lost(reason)
        if self._counted:
            self._counted = False
            self.owner.connection_closed(self)

    # --- reading ---------------------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._peer is None and self._invalid_peer():
            return
        if self.refused is not None:
            # Lingering after a refusal: read and dropped, up to server.lingering_max_bytes.
            self._lingered += len(data)
            if self._lingered > self.server.lingering_max_bytes and self._linger_timer is not None:
                self._linger_expired()
            return
        if self._last_read or self._refuse_after is not None:
            return  # after the client's last request, or a refused head waiting its turn: nothing more is a request
        handler = self.handler
        if handler is not None and not self._queued and handler.lingered(len(data)):
            return  # an answered request's body past the discard bound: the connection is cut
        within = self._message if self._in_head else None
        idle = self._message is None and self.handler is None and not self._queued
        self._begun = 0
        self._body_progress = False
        if self._idle:
            self._idle = False
            self.timer.disarm()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # llhttp stops after a request that asks to upgrade (or CONNECT): the gateway upgrades nothing
            # yet, so what follows is read as the next request, by a new parser.
            self._parser = httptools.HttpRequestParser(self)
            rest = data[int(str(upgrade.args[0])) :] if upgrade.args else b""
            if rest and self.refused is None and self.persistent and not self.transport.disconnecting:
                self.dataReceived(rest)
            return
        except httptools.HttpParserCallbackError:
            return  # a callback refused the request (see `refuse`)
        except httptools.HttpParserInvalidMethodError:
            self.refuse(NotSupported("the request method is not one this gateway knows"))
            return
        except httptools.HttpParserError as error:
            self.refuse(BadRequest(self._malformed(str(error))))
            return
        if self.refused is not None:
            return
        message = self._message
        if message is not None and self._in_head:
            # The head is still incomplete. When it began before this read, or with it on an idle connection,
            # every byte of the read is its own: a head line over its limit is refused before it ends. A head
            # that began within the read after another request is counted from the next read on.
            if message is within and not self._begun:
                self._head_raw += len(data)
            elif idle and self._begun == 1:
                self._head_raw = len(data)
            else:
                self._head_raw = self._known_head()
            self._check_partial_head()
            if self.refused is None and self.handler is None and not self._queued:
                # Timed from its first byte, which came within this read or before (no time passes in a call); a
                # head complete within one read, as most are, costs no timer. A pipelined head is timed once the
                # requests before it are answered.
                self._start_head_timer()
        elif message is not None and message.length is None:
            # A chunked body: reads without body bytes are framing or trailers, which httptools accumulates
            # (a trailer field whole); past the header limit they are refused as a head's would be.
            self._framing_raw = 0 if self._body_progress else self._framing_raw + len(data)
            if self._framing_raw > self.limits.max_header_bytes:
                self.refuse(
                    HeadersTooLarge(f"the trailer fields are over the {self.limits.max_header_bytes}-byte limit")
                )
                return
        if self._queued:
            self.transport.pauseProducing()  # a pipelined request waits its turn: read nothing more meanwhile

    def _line_bytes(self) -> int:
        """The request line's bytes with its CRLF (as far as it was read, when it is not complete)."""
        message = self._message
        assert message is not None
        return len(message.method) + 1 + sum(map(len, message._target)) + _VERSION_BYTES + _CRLF

    def _known_head(self) -> int:
        return self._line_bytes() + self._head_bytes

    def _check_partial_head(self) -> None:
        """Past the request line, all that was read of an incomplete head is header lines (one may be partial:
        llhttp holds it until its end)."""
        limits = self.limits
        if self._head_raw - self._line_bytes() > limits.max_header_bytes:
            self.refuse(HeadersTooLarge(f"the header fields are over the {limits.max_header_bytes}-byte limit"))

    # llhttp's callbacks (httptools calls them by these names).

    def on_message_begin(self) -> None:
        if self.handler is None and not self._queued:
            limits = self.owner.limits
            if limits is not self.limits:
                # A reload changed the limits since this kept-alive connection's last head: its new head is held
                # to the config of now, as a new connection's is.
                self.limits, self.server = limits, self.owner.server
        self._begun += 1
        if self._idle:  # a head under way: no longer idle
            self._idle = False
            self.timer.disarm()
        self.head_began = self._clock.seconds()
        self._message = Message()
        self._head_bytes = self._header_count = self._head_raw = 0
        self._line_done = False
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        message = self._message
        assert message is not None
        if not message.method:
            message.method = self._parser.get_method()
        message._target.append(url)
        length = len(message.method) + 1 + sum(map(len, message._target))
        if length > self.limits.max_request_line_bytes:
            self._refuse_in_parse(
                RequestLineTooLong(f"the request line is over the {self.limits.max_request_line_bytes}-byte limit")
            )

    def _request_line_done(self) -> None:
        message = self._message
        assert message is not None
        self._line_done = True
        message.target = b"".join(message._target)
        line = len(message.method) + 1 + len(message.target) + _VERSION_BYTES
        if line > self.limits.max_request_line_bytes:
            self._refuse_in_parse(
                RequestLineTooLong(f"the request line is over the {self.limits.max_request_line_bytes}-byte limit")
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        message = self._message
        assert message is not None
        if not self._in_head:
            # A trailer field (llhttp checked its syntax): not forwarded, as the body's framing is re-made.
            return
        if not self._line_done:
            self._request_line_done()
        limits = self.limits
        self._head_bytes += len(name) + 2 + len(value) + _CRLF
        self._header_count += 1
        if self._head_bytes > limits.max_header_bytes:
            self._refuse_in_parse(
                HeadersTooLarge(f"the header fields are over the {limits.max_header_bytes}-byte limit")
            )
        if self._header_count > limits.max_header_count:
            self._refuse_in_parse(HeadersTooLarge(f"there are more than {limits.max_header_count} header fields"))
        message.headers.addRawHeader(name, value.rstrip(_LWS))

    def on_headers_complete(self) -> None:
        message = self._message
        assert message is not None
        if not self._line_done:
            self._request_line_done()
        self._in_head = False
        self._cancel_head_timer()
        parser = self._parser
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            self._refuse_in_parse(BadRequest("the request line is malformed: its version is not HTTP/1.0 or 1.1"))
        message.version = version
        headers = message.headers
        framing = headers.getRawHeaders(b"transfer-encoding")
        if framing is not None:
            if len(framing) != 1:
                self._refuse_in_parse(BadRequest(_FRAMING))
            if framing[0].strip(_LWS).lower() != b"chunked":
                self._refuse_in_parse(BadRequest('the only transfer coding accepted is "chunked" alone'))
            if version != b"HTTP/1.1":
                self._refuse_in_parse(BadRequest("Transfer-Encoding in an HTTP/1.0 request is faulty framing"))
            message.length = None
        else:
            lengths = headers.getRawHeaders(b"content-length")
            if lengths is not None:
                length = body_length(lengths[0])
                if length is None:
                    self._refuse_in_parse(
                        BadRequest(f"the Content-Length is over the largest body length taken ({MAX_BODY_LENGTH})")
                        if lengths[0].strip(_LWS).isdigit()
                        else BadRequest(_FRAMING)
                    )
                message.length = length
        message.keep_alive = parser.should_keep_alive()
        if self.handler is None and not self._queued:
            self._serve(message)
        else:
            message.body = deque()
            self._queued.append(message)

    def on_chunk_complete(self) -> None:
        self._body_progress = True

    def on_body(self, body: bytes) -> None:
        self._body_progress = True
        message = self._message
        assert message is not None
        if message.body is not None:
            message.body.append(body)
        elif self.handler is not None:
            self.handler.body_received(body)

    def on_message_complete(self) -> None:
        message, self._message = self._message, None
        assert message is not None
        message.ended = True
        if message.body is None:  # served (or being served), not pipelined
            if self.handler is not None:
                self.handler.body_ended()
            elif not self._queued and self.refused is None:
                self._arm_idle()  # answered before its end was read: idle from here
        if not (message.keep_alive and self.persistent):
            self._last_read = True
            raise _Refused("the client's last request")  # stops the parse: what follows is not read (RFC 9112 9.6)

    # --- serving, one request at a time ----------------------------------------------------------------------

    def _serve(self, message: Message) -> None:
        self._version = message.version
        self.persistent = self.persistent and message.keep_alive and message.version == b"HTTP/1.1"
        self._chunked = False
        self._body_allowed = True
        self.response_started = self.response_ended = False
        self.sent_length = 0
        self.handler = handler = self.owner.handle(self, message)
        handler.begin()
        if message.body is not None:
            body, message.body = message.body, None
            while body and self.handler is handler:
                handler.body_received(body.popleft())
        if message.ended and self.handler is handler:
            handler.body_ended()

    def _next(self) -> None:
        if self._queued:
            message = self._queued.popleft()
            if not self._queued:
                self.transport.resumeProducing()  # first: a pause the handler asks for as it begins then holds
            self._serve(message)
        else:
            self.transport.resumeProducing()
            if self._message is None:
                self._arm_idle()
            elif self._in_head:
                self._start_head_timer()

    # --- refusing --------------------------------------------------------------------------------------------

    def _refuse_in_parse(self, error: GatewayError) -> NoReturn:
        """Refuse from within a parser callback, and stop the parse."""
        self.refuse(error)
        raise _Refused(error.detail)

    def refuse(self, error: GatewayError) -> None:
        """Answer `error` and end the connection; nothing more of it is parsed, and no request on it goes on.

        If a response has already begun on the connection no answer can follow it: a complete one lingers as if
        the refusal were its own, an incomplete one is cut."""
        if self.refused is not None or self._refuse_after is not None:
            return
        message = self._message
        own = not self._queued and message is not None and not self._in_head
        if self.handler is not None and not own:
            # A later head is refused while a request is served: its answer follows that request's response.
            self._refuse_after = error
            self._queued.clear()
            self.transport.pauseProducing()
            return
        self.refused = error
        self._cancel_timers()
        self.persistent = False
        handler, self.handler = self.handler, None
        request_id = request_id_of(message.headers if message is not None else Fields())
        method = message.method if message is not None else b""
        line = (method, message.target) if message is not None and self._line_done else None
        # Whose refusal it is: the request being read's (its body's framing failed), unless a new head was
        # being read (no request yet) or pipelined.
        owner_handler = handler if handler is not None and not self._queued and message is not None else None
        if owner_handler is not None:
            owner_handler.refused(error, request_id)
        else:
            self.owner.head_refused(self, error, request_id, line)
        # A response begun: the served request's, or a request's answered before its body ended.
        started = self.response_started and (handler is not None or (message is not None and not self._in_head))
        complete = handler is None or handler.answered
        if handler is not None:
            handler.connection_lost(Failure(ConnectionAborted(f"request refused: {error.detail}")))
        self._queued.clear()
        _log.info(
            "Refused a client request with {status}: {detail} (peer {peer}, request {request_id})",
            status=error.status,
            detail=error.detail,
            peer=str(self.getPeer()),
            request_id=request_id,
        )
        if started and not complete:
            self.transport.abortConnection()
            return
        if not started:
            server = self.server.server_header
            self.transport.write(refusal_bytes(error, request_id, head_request=method == b"HEAD", server=server))
        tcp = self.transport
        if ITCPTransport.providedBy(tcp):
            # Lingering close: FIN after the answer, read and drop what still comes, cut at the deadline.
            self.transport.resumeProducing()
            tcp.loseWriteConnection()
            self._linger_timer = self._clock.callLater(self.server.lingering_timeout, self._linger_expired)
        else:
            self.transport.loseConnection()

    def _malformed(self, reason: str) -> str:
        """Which part of the request llhttp found malformed, in words."""
        lowered = reason.lower()
        if "content-length" in lowered or "transfer-encoding" in lowered:
            return _FRAMING
        if self._message is not None and not self._in_head:
            return "the chunked request body is malformed"
        if self._line_done or "header" in lowered:
            return "a header line is malformed"
        return "the request line is malformed"

    def _linger_expired(self) -> None:
        timer, self._linger_timer = self._linger_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self.transport.abortConnection()

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
        self.owner.invalid_peer(self.listener)
        self.transport.abortConnection()
        return True

    # --- timers ----------------------------------------------------------------------------------------------

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            seconds = self.server.head_timeout
            self._head_timer = self._clock.callLater(seconds, self._head_timed_out, seconds)

    def _head_timed_out(self, seconds: float) -> None:
        self._head_timer = None
        self.refuse(HeadTimeout(f"the request head was not complete within {seconds:g} s"))

    def _cancel_head_timer(self) -> None:
        timer, self._head_timer = self._head_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _arm_idle(self) -> None:
        if self.server.idle_timeout:
            self._idle = True
            self.timer.restart(self.server.idle_timeout, self._idle_expired)  # a reload may have changed it

    def _idle_expired(self) -> None:
        """No request for server.idle_timeout: the connection closes, as a kept-alive one does (no answer)."""
        self._idle = False
        if self.handler is None and self._message is None:
            self.transport.loseConnection()

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        self.timer.cancel()
        timer, self._linger_timer = self._linger_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def close_when_idle(self) -> bool:
        """Close now if no request is under way (a drain); returns whether it did."""
        if self.handler is None and self._message is None and self.refused is None:
            self.transport.loseConnection()
            return True
        self.persistent = False
        return False


class _Refused(Exception):
    """Raised from a parser callback to stop the parse once the connection has refused the request."""
