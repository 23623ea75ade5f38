"""A connection to an upstream server: one request at a time, its response read by llhttp (`httptools`).

Rules:
* Full duplex: the response is handed over as soon as its head is read, while the request body may still be going
  out; its body is relayed as it is read, never held beyond one socket read.
* Strict: llhttp with no lenient flag (it refuses chunk sizes and lengths that overflow, Content-Length beside
  Transfer-Encoding, bare CR, obs-fold...); on top of it a transfer coding other than `chunked` alone, a head over
  `MAX_RESPONSE_HEAD` (1xx heads included), a status outside 100-599, a version other than HTTP/1.0 and 1.1 and an
  upgrade nobody asked for are broken responses. Each fails the request before any of it is relayed, or cuts the
  body (the owner then cuts the client: a truncated body never looks complete).
* A connection is reused only after an exchange that ended whole on both sides, with keep-alive, and nothing
  after the response; otherwise it is closed (aborted when the request body was not all sent: a graceful close
  would wait behind a body the upstream no longer reads).
* The response and its body speak Twisted's client vocabulary (`IResponse`-like attributes, a body `IProtocol`
  that ends with `ResponseDone`, `PotentialDataLoss` for a body framed by the connection's close, or
  `ResponseFailed`), which is what the gateway's request path consumes today.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol as TypingProtocol

import httptools
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    PotentialDataLoss,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from gateway.errors import UpstreamBroken
from gateway.headers import connection_tokens
from gateway.http1.fields import Fields
from gateway.http1.heads import LAST_CHUNK, chunk, request_head
from gateway.http1.transports import IConnectionTransport

__all__ = [
    "MAX_RESPONSE_HEAD",
    "UPSTREAM_BUFFER_SIZE",
    "Cancellable",
    "DeferredReceiver",
    "ResponseReceiver",
    "UpstreamConnection",
    "UpstreamResponse",
]

_log = Logger()

UPSTREAM_BUFFER_SIZE = 256 * 1024
"""An upstream socket's read size until a response body's relay sets one that follows the client
(`gateway.proxy.streaming.ReadSizer`); larger reads than Twisted's 64 KiB make a big body cheaper."""

MAX_RESPONSE_HEAD = 64 * 1024
"""Bytes of response head (status line, headers, and any 1xx heads before them) taken from an upstream; more is
answered 502, like nginx's "upstream sent too big header" (Envoy's default cap is 60 KiB)."""

_NO_BODY = frozenset({204, 304})
_STATUS_LINE_AND_END = len(b"HTTP/1.1 200 \r\n\r\n")
"""The bytes of a head besides its reason phrase and header lines (each counted as it comes)."""
_HTTP_1 = frozenset({"1.0", "1.1"})
_RESPONSE_DONE = Failure(ResponseDone())
"""How every complete body ends, one object for all (as `twisted.internet.protocol.connectionDone` is for every
clean close): a Failure per response costs more than the rest of ending it."""


class _Broken(Exception):
    """Raised from a parser callback to stop the parse: the response is broken (`reason` says how)."""

    def __init__(self, error: UpstreamBroken) -> None:
        super().__init__(error.detail)
        self.error = error


@implementer(IPushProducer)
class _BodyTransport:
    """What a response's body protocol sees as its transport: pauses, resumes and stops reading from the upstream
    socket, for as long as the response is being read. Cut off (`detach`) when it ends, so that a late pause
    or stop can never reach a connection that has gone back to the pool."""

    def __init__(self, connection: UpstreamConnection) -> None:
        self._connection: UpstreamConnection | None = connection

    def detach(self) -> None:
        self._connection = None

    def pauseProducing(self) -> None:
        if self._connection is not None:
            self._connection.pause_reading()

    def resumeProducing(self) -> None:
        if self._connection is not None:
            self._connection.resume_reading()

    def stopProducing(self) -> None:
        """The body is not wanted any more (the client left, or the gateway cut the stream): the connection
        closes, never to be reused."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abandon()


class ResponseReceiver(TypingProtocol):
    """Who a request sent with `UpstreamConnection.send` answers to."""

    def response_received(self, response: UpstreamResponse) -> None:
        """The response head is read; its body follows (`UpstreamResponse.deliverBody`)."""

    def response_failed(self, reason: Failure) -> None:
        """There is no response: `reason` is one of `twisted.web.client`'s `ResponseNeverReceived`,
        `ResponseFailed`, `RequestTransmissionFailed` (with the cause among its reasons), or a connect error."""


class Cancellable(TypingProtocol):
    """A request under way, which its owner may give up."""

    def cancel(self) -> None: ...


class DeferredReceiver:
    """A receiver that fires a Deferred with the response: the Deferred API over `send` (cancelling the Deferred
    gives the request up, through `cancel` once it is set)."""

    __slots__ = ("cancel", "done")

    def __init__(self) -> None:
        self.cancel: Callable[[], object] | None = None
        self.done: Deferred[UpstreamResponse] = Deferred(self._cancelled)

    def _cancelled(self, _: Deferred[UpstreamResponse]) -> None:
        if self.cancel is not None:
            self.cancel()

    def response_received(self, response: UpstreamResponse) -> None:
        self.done.callback(response)

    def response_failed(self, reason: Failure) -> None:
        self.done.errback(reason)


class UpstreamResponse:
    """A response as read from an upstream: its status line and headers (all of them, framing ones included, as
    sent), its body length (`UNKNOWN_LENGTH` unless a Content-Length framed it; 0 for HEAD, 204 and 304), and its
    body, delivered to the protocol `deliverBody` is given."""

    def __init__(self, connection: UpstreamConnection, code: int, phrase: bytes, version: str, headers: Fields):
        self._connection = connection
        self.code = code
        self.phrase = phrase
        self.version = (b"HTTP", 1, 1) if version == "1.1" else (b"HTTP", 1, 0)
        self.headers = headers
        self.length: int | object = UNKNOWN_LENGTH
        self.close_delimited = False
        """Its body runs to the connection's close (neither Content-Length nor chunked framing)."""
        self._protocol: IProtocol | None = None
        self._held: list[bytes] = []
        self._ended: Failure | None = None
        self._transport = _BodyTransport(connection)

    @property
    def reset(self) -> bool:
        """Whether the upstream connection was lost other than by a clean close (a body framed by the connection's
        close is complete only if it was closed, not reset)."""
        reason = self._connection.lost_reason
        return reason is not None and not reason.check(ConnectionDone)

    def set_read_size(self, size: int) -> None:
        """Read the rest of this response's body from the upstream socket `size` bytes at a time."""
        self._connection.set_read_size(size)

    def deliverBody(self, protocol: IProtocol) -> None:
        """Give the body to `protocol`: what was read already, then the rest as it comes, then `connectionLost`
        with `ResponseDone`, `PotentialDataLoss` or `ResponseFailed`."""
        self._protocol = protocol
        # A body protocol's transport is a producer (IResponse.deliverBody), which ITransport does not describe.
        protocol.makeConnection(self._transport)  # type: ignore[arg-type]
        held, self._held = self._held, []
        for data in held:
            protocol.dataReceived(data)
        if self._ended is not None:
            self._protocol = None
            protocol.connectionLost(self._ended)
        elif held:
            self._connection.resume_reading()  # held back until the body had a protocol

    # --- fed by the connection -------------------------------------------------------------------------------

    def _body(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is not None:
            protocol.dataReceived(data)
        else:
            self._held.append(data)  # one read at most: reading pauses until the body has a protocol
            self._connection.pause_reading()

    def _end(self, reason: Failure) -> None:
        if self._ended is not None:
            return
        self._ended = reason
        self._transport.detach()  # from now on the connection may serve another exchange
        protocol, self._protocol = self._protocol, None  # (the protocol may hold this response: no cycle left)
        if protocol is not None:
            protocol.connectionLost(reason)


class _Exchange:
    """One request on a connection: what was sent of it and what came back of its response.

    The connection's parser reads every response on it; its callbacks act on the exchange under way, which only
    changes between reads (a response's end is acted on once its whole read is parsed), so nothing of one
    response can reach the next exchange."""

    __slots__ = (
        "between_body",
        "body",
        "body_left",
        "body_seen",
        "chunked",
        "complete",
        "connection",
        "head_bytes",
        "head_read",
        "headers",
        "length",
        "method",
        "received_any",
        "receiver",
        "request_done",
        "response",
        "response_done",
        "sent",
        "status",
        "trailer_bytes",
    )

    def __init__(
        self,
        connection: UpstreamConnection,
        method: bytes,
        body: IBodyProducer | None,
        length: int | None,
        receiver: ResponseReceiver,
    ):
        self.connection = connection
        self.receiver: ResponseReceiver | None = receiver
        """Told of the response head, or of why there is none; None once told (or once the owner gave up)."""
        self.method = method
        self.body = body
        self.length = length
        self.chunked = body is not None and length is None
        self.sent = 0
        self.response: UpstreamResponse | None = None
        self.request_done = body is None
        self.response_done = False
        self.head_bytes = 0
        """Bytes of the head's whole lines, as the parser reports them."""
        self.head_read = 0
        """Bytes of the reads that ended before the head was complete (all head)."""
        self.trailer_bytes = 0
        self.between_body = 0
        """Bytes read since the last body byte, once the head is in (chunk framing, trailers)."""
        self.complete: bool | None = None
        """The response ended within the read being parsed: whether its connection may be kept (acted on once the
        whole read is parsed)."""
        self.headers: list[tuple[bytes, bytes]] = []
        self.status = b""
        self.received_any = False
        self.body_seen = 0
        """Body bytes the parser has handed over."""
        self.body_left: int | None = None
        """Once a Content-Length body is under way: its bytes still to come, read past the parser (a body's bytes
        need no parsing, and each read is relayed as it came, not sliced by the parser into a copy)."""

    # --- httptools callbacks ------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.response_done:
            raise _Broken(UpstreamBroken("the upstream sent bytes after a complete response"))
        self.headers = []
        self.status = b""

    def on_status(self, status: bytes) -> None:
        self.status += status
        self._count_head(len(status))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            # A trailer field: counted, never kept (trailers are not relayed), and bounded like a head.
            self.trailer_bytes += len(name) + len(value) + 4
            if self.trailer_bytes > MAX_RESPONSE_HEAD:
                raise _Broken(UpstreamBroken(f"the upstream sent trailers of more than {MAX_RESPONSE_HEAD} bytes"))
            return
        self.headers.append((name, value))
        self._count_head(len(name) + len(value) + 4)

    def _count_head(self, size: int) -> None:
        if self.response is None:
            self.head_bytes += size
            if self.head_bytes > MAX_RESPONSE_HEAD:
                raise _Broken(_head_too_large())

    def on_headers_complete(self) -> None:
        self._count_head(_STATUS_LINE_AND_END)
        parser = self.connection.parser
        code = parser.get_status_code()
        if code == 101:
            raise _Broken(UpstreamBroken("the upstream switched protocols unasked"))
        if 100 <= code < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): the final one follows
        if not 200 <= code <= 599:
            raise _Broken(UpstreamBroken("the upstream sent an invalid status code"))
        version = parser.get_http_version()
        if version not in _HTTP_1:
            raise _Broken(UpstreamBroken("the upstream sent an invalid HTTP version"))
        headers = Fields()
        length: int | None = None
        coded = False
        for name, value in self.headers:
            headers.addRawHeader(name, value.rstrip(b" \t"))  # llhttp keeps trailing whitespace
            lowered = name.lower()
            if lowered == b"transfer-encoding":
                if coded or value.strip(b" \t").lower() != b"chunked":
                    raise _Broken(UpstreamBroken("the upstream sent a transfer coding other than chunked alone"))
                coded = True
            elif lowered == b"content-length":
                # llhttp has checked it: digits only, one value, within 64 bits (zeros first may be thousands).
                length = int(value.strip(b" \t").lstrip(b"0") or b"0")
        response = UpstreamResponse(self.connection, code, self.status, version, headers)
        if self.method == b"HEAD" or code in _NO_BODY:
            response.length = 0
        elif coded:
            pass  # chunked: the length is known at the last chunk
        elif length is not None:
            response.length = length
        else:
            response.close_delimited = True
        self.response = response
        if self.method == b"HEAD":
            # llhttp cannot be told that a response to HEAD has no body: it is complete here, and any byte the
            # parser still takes for this exchange is one too many. The parser, left expecting a body, is not
            # used again (`UpstreamConnection.request` makes a new one).
            self.connection.parser_spent = True
            self.connection._response_complete(self, keep_alive=_keeps_alive(version, headers))
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            receiver.response_received(response)

    def on_body(self, data: bytes) -> None:
        response = self.response
        if response is None:
            return
        if self.response_done:
            raise _Broken(UpstreamBroken("the upstream sent a body with its answer to HEAD"))
        self.between_body = 0
        self.body_seen += len(data)
        response._body(data)

    def on_message_complete(self) -> None:
        if self.response is None or self.response_done:
            return  # the end of an interim (1xx) answer, or of an answer to HEAD (complete at its head)
        self.connection._response_complete(self, keep_alive=self.connection.parser.should_keep_alive())

    def cancel(self) -> None:
        """The owner gives up on this request before its response head: the body (if still going) is stopped and
        the connection closes. Nothing once the head was handed over or the request failed (as cancelling a
        Deferred that has fired does nothing)."""
        if self.receiver is not None and self.connection._exchange is self:
            self.receiver = None
            self.connection._cancelled(self)

    # --- the request body's consumer (IConsumer, for its producer) ----------------------------------------------

    def write(self, data: bytes) -> None:
        """A piece of this exchange's request body: written while it is the connection's exchange and within its
        declared length (a byte past it would be read as the start of the next request: request smuggling)."""
        if self.request_done or not data:
            return
        connection = self.connection
        if connection._exchange is not self:
            return
        if self.length is not None and self.sent + len(data) > self.length:
            over = Failure(UpstreamBroken("the request body is over its declared length"))
            connection._transmission_failed(self, over, stop=True)
            return
        self.sent += len(data)
        if self.chunked:
            connection.transport.writeSequence(chunk(data))
        else:
            connection.transport.write(data)


class UpstreamConnection(Protocol):
    """An HTTP/1.1 client connection to one upstream server, one exchange at a time.

    `request` sends a request (its body from an `IBodyProducer`, flow-controlled by the socket) and returns a
    Deferred of the response, which fires as soon as the response head is read. `on_idle` is called when the
    exchange ended whole and the connection may be reused; `on_lost` when the connection is gone."""

    transport: IConnectionTransport
    """Set by `makeConnection` (None before it, which the methods that may run first check)."""

    def __init__(
        self, on_idle: Callable[[UpstreamConnection], object], on_lost: Callable[[UpstreamConnection], object]
    ):
        self._on_idle = on_idle
        self._on_lost = on_lost
        self._exchange: _Exchange | None = None
        self._reading_paused = False
        self.lost_reason: Failure | None = None
        """How the connection ended (None while it is open)."""
        self.reused = False
        """Whether an exchange has been carried on this connection already."""
        self._closing = False
        self._body_registered = False
        self._address: str | None = None
        self.parser = httptools.HttpResponseParser(self)
        """Reads every response on the connection (one per connection: making one costs more than the rest of
        reading a small response); its callbacks go to the exchange whose response it reads (`_parsing`)."""
        self.parser_spent = False
        """The parser read a response to HEAD, after which it expects a body that is not coming: not reused."""
        self._parsing: _Exchange | None = None

    # --- the parser's callbacks, for the exchange whose response is being read ----------------------------------

    def on_message_begin(self) -> None:
        self._parsing.on_message_begin()  # type: ignore[union-attr]  # set before every parse

    def on_status(self, status: bytes) -> None:
        self._parsing.on_status(status)  # type: ignore[union-attr]

    def on_header(self, name: bytes, value: bytes) -> None:
        self._parsing.on_header(name, value)  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        self._parsing.on_headers_complete()  # type: ignore[union-attr]

    def on_body(self, data: bytes) -> None:
        self._parsing.on_body(data)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        self._parsing.on_message_complete()  # type: ignore[union-attr]

    # --- the socket ---------------------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.set_read_size(UPSTREAM_BUFFER_SIZE)

    @property
    def address(self) -> str:
        """The upstream server's address, `host:port` (`[host]:port` for IPv6), as the access log names it."""
        if self._address is None:
            peer = self.transport.getPeer() if self.transport is not None else None
            host, port = getattr(peer, "host", ""), getattr(peer, "port", 0)
            self._address = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        return self._address

    @property
    def usable(self) -> bool:
        """Whether a new request may go out on this connection now."""
        return self._exchange is None and self.lost_reason is None and not self._closing and bool(self.connected)

    def set_read_size(self, size: int) -> None:
        transport = self.transport
        if transport is not None and hasattr(transport, "bufferSize"):
            transport.bufferSize = size

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resumeProducing()

    def abandon(self) -> None:
        """Close the connection now, whatever it was doing (the response is not wanted any more, or broke); the
        pool forgets it at once."""
        self._closing = True
        if self.transport is not None:
            self.transport.abortConnection()
        self._on_lost(self)

    # --- a request ----------------------------------------------------------------------------------------------

    def request(
        self, method: bytes, target: bytes, headers: Fields | Headers, body: IBodyProducer | None
    ) -> Deferred[UpstreamResponse]:
        """Send one request; the Deferred fires with the response once its head is read, or fails (the
        exceptions of `twisted.web.client`: `ResponseNeverReceived`, `ResponseFailed`, `RequestTransmissionFailed`,
        with the cause among their reasons). Cancelling it closes the connection."""
        receiver = DeferredReceiver()
        receiver.cancel = self.send(method, target, headers, body, receiver).cancel
        return receiver.done

    def send(
        self,
        method: bytes,
        target: bytes,
        headers: Fields | Headers,
        body: IBodyProducer | None,
        receiver: ResponseReceiver,
    ) -> Cancellable:
        """Send one request; `receiver` is told of the response once its head is read, or of why there is none
        (as `request`'s Deferred would be). What it returns gives the request up (`cancel`)."""
        assert self.usable, "one exchange at a time, on an open connection"
        length = None if body is None or body.length is UNKNOWN_LENGTH else int(body.length)
        exchange = self._exchange = _Exchange(self, method, body, length, receiver)
        if self.reused:
            self.set_read_size(UPSTREAM_BUFFER_SIZE)  # undo the read size the last response's relay set
        if self.parser_spent:
            self.parser_spent = False
            self.parser = httptools.HttpResponseParser(self)
        self.resume_reading()  # an idle connection reads (to see a close); nothing may have left it paused
        self.reused = True
        self.transport.write(
            request_head(method, target, headers.getAllRawHeaders(), length=length, has_body=body is not None)
        )
        if body is not None:
            self.transport.registerProducer(body, True)
            self._body_registered = True
            producing = body.startProducing(exchange)
            producing.addCallbacks(
                self._body_sent, self._body_failed, callbackArgs=(exchange,), errbackArgs=(exchange,)
            )
        return exchange

    def _body_sent(self, _: object, exchange: _Exchange) -> None:
        if exchange is not self._exchange or exchange.request_done:
            return
        self._unregister_body()
        if exchange.length is not None and exchange.sent != exchange.length:
            self._transmission_failed(exchange, Failure(UpstreamBroken("the request body was not its declared length")))
            return
        if exchange.chunked:
            self.transport.write(LAST_CHUNK)
        exchange.request_done = True
        self._maybe_idle(exchange)

    def _body_failed(self, reason: Failure, exchange: _Exchange) -> None:
        if exchange is not self._exchange or exchange.request_done:
            return
        self._transmission_failed(exchange, reason)

    def _transmission_failed(self, exchange: _Exchange, reason: Failure, *, stop: bool = False) -> None:
        """The request body cannot be sent whole: the upstream must see it unfinished, so the connection is cut;
        with `stop`, its producer (still producing) is stopped."""
        if stop:
            self._stop_body(exchange)
        exchange.request_done = True
        self._unregister_body()
        self._fail_head(exchange, RequestTransmissionFailed([reason]))
        self.abandon()

    def _unregister_body(self) -> None:
        """The request body's producer stops being the socket's (sent, failed or not wanted any more)."""
        if self._body_registered:
            self._body_registered = False
            if self.transport is not None:
                self.transport.unregisterProducer()

    def _cancelled(self, exchange: _Exchange) -> None:
        """The owner gave up on the request before its response head: the body (if still going) is stopped, once,
        and the connection closes."""
        self._stop_body(exchange)
        self.abandon()

    def _stop_body(self, exchange: _Exchange) -> None:
        """The rest of the request body is not wanted (the exchange is over): its producer is stopped, once."""
        if not exchange.request_done:
            exchange.request_done = True
            self._unregister_body()
            if exchange.body is not None:
                exchange.body.stopProducing()

    def _fail_head(self, exchange: _Exchange, error: Exception) -> None:
        receiver, exchange.receiver = exchange.receiver, None
        if receiver is not None:
            receiver.response_failed(Failure(error))

    # --- the response -------------------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None or exchange.response_done:
            if data and not self._closing:
                # Bytes with no request to answer: the upstream is out of step with us, and they could be taken
                # as the answer to the next request on this connection.
                _log.warn(
                    "Upstream sent {count} bytes with no request outstanding; closing its connection", count=len(data)
                )
                self.abandon()
            return
        exchange.received_any = True
        if exchange.body_left is not None:
            self._body_read(exchange, data)
            return
        try:
            self._parsing = exchange
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            if exchange.complete is not None:
                self._out_of_step(exchange)
                return
            cause = error.__context__
            if isinstance(error, httptools.HttpParserUpgrade):
                self._broken(exchange, UpstreamBroken("the upstream switched protocols unasked"))
            elif isinstance(cause, _Broken):
                self._broken(exchange, cause.error)
            else:
                if cause is not None:
                    _log.failure("Relaying an upstream response failed", Failure(cause))
                self._broken(exchange, UpstreamBroken(f"the upstream sent a malformed response ({error})"))
            return
        if exchange.complete is not None:
            self._read_complete(exchange)
        elif exchange.response is None:
            # A read that ends before the head is complete is all head: counted on its own (the callbacks count
            # whole lines apart: each count is at most the head's size).
            exchange.head_read += len(data)
            if exchange.head_read > MAX_RESPONSE_HEAD:
                self._broken(exchange, _head_too_large())
        else:
            response = exchange.response
            length = response.length
            if isinstance(length, int) and length and exchange.method != b"HEAD":
                # A Content-Length body under way: the rest is counted here and relayed read by read (the
                # parser, left expecting it, is not used again).
                exchange.body_left = length - exchange.body_seen
                self.parser_spent = True
                return
            # Bytes with no body byte in them (chunk framing, a trailer that never ends) are bounded too.
            exchange.between_body += len(data)
            if exchange.between_body > MAX_RESPONSE_HEAD + UPSTREAM_BUFFER_SIZE:
                self._broken(exchange, UpstreamBroken("the upstream sent too many bytes without a body byte"))

    def _body_read(self, exchange: _Exchange, data: bytes) -> None:
        """A read of a Content-Length body past its head: relayed whole; at the body's end the response is
        complete, and a byte past it puts the connection out of step (closed, the response standing)."""
        response = exchange.response
        assert response is not None and exchange.body_left is not None
        left = exchange.body_left
        extra = len(data) - left
        if extra > 0:
            data = data[:left]
        exchange.body_left = left - len(data)
        if data:
            response._body(data)
        if exchange.body_left or self._exchange is not exchange or exchange.response_done:
            return  # more to come, or the relay ended the exchange meanwhile (its client went away)
        exchange.body_left = None
        self._response_complete(exchange, keep_alive=self.parser.should_keep_alive())
        if extra > 0:
            self._out_of_step(exchange)
            return
        self._read_complete(exchange)

    def _out_of_step(self, exchange: _Exchange) -> None:
        """The response ended within a read and more came after it: the response stands, and the connection, out
        of step with us, is closed rather than reused."""
        _log.warn("Upstream sent bytes after a complete response; closing its connection")
        exchange.complete = None
        self._closing = True
        self._end_response(exchange)
        self.abandon()

    def _read_complete(self, exchange: _Exchange) -> None:
        """The response ended within the read just handled: its end is acted on now."""
        keep_alive, exchange.complete = exchange.complete, None
        if not keep_alive:
            self._closing = True
        self._end_response(exchange)

    def _response_complete(self, exchange: _Exchange, *, keep_alive: bool) -> None:
        """The response ended (within a parse): acted on once the whole read is parsed, so that a byte past it is
        seen before the connection can go back to the pool and on to another request."""
        exchange.response_done = True
        exchange.complete = keep_alive

    def _end_response(self, exchange: _Exchange) -> None:
        response = exchange.response
        assert response is not None
        if not exchange.request_done:
            # An answer that ended before the request body was all sent: the connection cannot be reused, and the
            # rest of the body is not wanted. Abort: a graceful close would wait behind a body nobody reads.
            self._stop_body(exchange)
            self.abandon()
        # Back to the pool first: the owner, told the response ended, may start its next request at once (a
        # pipelined one, or one queued for this upstream), which should find this connection.
        self._maybe_idle(exchange)
        response._end(_RESPONSE_DONE)

    def _maybe_idle(self, exchange: _Exchange) -> None:
        """The exchange is over on both sides: the connection goes back to the pool, or closes."""
        if exchange is not self._exchange or not (exchange.request_done and exchange.response_done):
            return
        self._exchange = None
        self.resume_reading()
        if self._closing or self.lost_reason is not None:
            if self.lost_reason is None:
                self.transport.loseConnection()
            return
        self._on_idle(self)

    def _broken(self, exchange: _Exchange, error: UpstreamBroken) -> None:
        """The response is broken: before its head was handed over the request fails with `error` (502); after
        it, the body ends in failure (the owner cuts the client). The connection closes either way."""
        _log.warn("Upstream response broken: {reason}; closing its connection", reason=error.detail)
        response = exchange.response
        if exchange.receiver is not None:
            self._fail_head(exchange, ResponseFailed([Failure(error)]))
        elif response is not None:
            response._end(Failure(ResponseFailed([Failure(error)], response)))
        exchange.response_done = True
        exchange.complete = None
        self._stop_body(exchange)
        self.abandon()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost_reason = reason
        self._body_registered = False  # the transport lets its producer go itself
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            self._stop_body(exchange)
            response = exchange.response
            if exchange.complete is not None and response is not None:
                exchange.complete = None
                response._end(_RESPONSE_DONE)  # it ended whole before the connection did
            elif exchange.receiver is not None:
                error = ResponseFailed([reason]) if exchange.received_any else ResponseNeverReceived([reason])
                self._fail_head(exchange, error)
            elif response is not None and not exchange.response_done:
                if response.close_delimited and not self._closing:
                    # A body framed by the connection's close: complete as far as anyone can tell (the owner
                    # tells a close from a reset by `reset`).
                    response._end(Failure(PotentialDataLoss()))
                else:
                    response._end(Failure(ResponseFailed([reason], response)))
        self._on_lost(self)


def _keeps_alive(version: str, headers: Fields) -> bool:
    """Whether a response leaves its connection open (RFC 9112 section 9.3): HTTP/1.1 unless it says close,
    HTTP/1.0 only when it says keep-alive."""
    tokens = connection_tokens(headers)
    return b"close" not in tokens if version == "1.1" else b"keep-alive" in tokens


def _head_too_large() -> UpstreamBroken:
    return UpstreamBroken(f"the upstream sent a response head of more than {MAX_RESPONSE_HEAD} bytes")
