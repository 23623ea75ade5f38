"""A connection to an upstream server: one request at a time, its response read by llhttp (`httptools`).

Rules:
* Full duplex: the response (`gateway.http1.response`) is handed over as soon as its head is read, while the
  request body may still be going out; its body is relayed as it is read, never held beyond one socket read.
* Strict: llhttp with no lenient flag (it refuses chunk sizes and lengths that overflow, Content-Length beside
  Transfer-Encoding, bare CR, obs-fold...), and the gateway's own checks on top of it (`gateway.http1.exchange`).
  A broken response fails the request before any of it is relayed, or cuts the body (the owner then cuts the
  client: a truncated body never looks complete).
* A connection is reused only after an exchange that ended whole on both sides, with keep-alive, and nothing
  after the response; otherwise it is closed (aborted when the request body was not all sent: a graceful close
  would wait behind a body the upstream no longer reads).
* A connection that switched protocols (WebSocket) leaves its pool for good: its bytes go to the tunnel the owner
  makes of it (`switch_protocols`), never to a parser again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, cast

import httptools
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

from gateway.errors import UpstreamBroken
from gateway.http1.exchange import MAX_RESPONSE_HEAD, BrokenResponse, UpstreamExchange, head_too_large
from gateway.http1.fields import Fields, read_field
from gateway.http1.heads import LAST_CHUNK, request_head
from gateway.http1.response import Cancellable, ResponseReceiver
from gateway.http1.transports import IConnectionTransport

__all__ = ["UPSTREAM_BUFFER_SIZE", "UpstreamConnection"]

_log = Logger()

UPSTREAM_BUFFER_SIZE: Final = 256 * 1024
"""An upstream socket's read size until a response body's relay sets one that follows the client
(`gateway.proxy.streaming.ReadSizer`); larger reads than Twisted's 64 KiB make a big body cheaper."""

_RESPONSE_DONE: Final = Failure(ResponseDone())
"""How every complete body ends, one object for all (as `twisted.internet.protocol.connectionDone` is for every
clean close): a Failure per response costs more than the rest of ending it."""


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
        self.exchange: UpstreamExchange | None = None
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
        reading a small response); its callbacks go to the exchange whose response it reads (`_parsing`, set before
        every parse: the callbacks cast it rather than test it, so that compiled they call the exchange directly)."""
        self.parser_spent = False
        """The parser read a response to HEAD, after which it expects a body that is not coming: not reused."""
        self._parsing: UpstreamExchange | None = None
        self._tunnel: Callable[[bytes], object] | None = None
        """Once the connection switched protocols: where every byte the upstream sends goes."""
        self._tunnel_lost: Callable[[Failure], object] | None = None

    # --- the parser's callbacks, for the exchange whose response is being read ----------------------------------

    def on_message_begin(self) -> None:
        cast(UpstreamExchange, self._parsing).on_message_begin()

    def on_status(self, status: bytes) -> None:
        cast(UpstreamExchange, self._parsing).on_status(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self._parsing
        assert exchange is not None
        if exchange.response is not None:
            exchange.on_trailer(name, value)
            return
        # The exchange's header line, here rather than in a call of its own (the commonest callback).
        exchange.head_bytes += len(name) + len(value) + 4
        if exchange.head_bytes > MAX_RESPONSE_HEAD:
            raise BrokenResponse(head_too_large())
        read_field(exchange.header_entries, name, value)

    def on_headers_complete(self) -> None:
        cast(UpstreamExchange, self._parsing).on_headers_complete()

    def on_body(self, data: bytes) -> None:
        cast(UpstreamExchange, self._parsing).on_body(data)

    def on_message_complete(self) -> None:
        cast(UpstreamExchange, self._parsing).on_message_complete()

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
        return self.exchange is None and self.lost_reason is None and not self._closing and bool(self.connected)

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
        # Only a WebSocket request the proxy passes on carries Upgrade (every other one is stripped).
        upgrade = headers.hasHeader(b"upgrade")
        exchange = self.exchange = UpstreamExchange(self, method, body, length, receiver, upgrade)
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

    def _body_sent(self, _: object, exchange: UpstreamExchange) -> None:
        if exchange is not self.exchange or exchange.request_done:
            return
        self._unregister_body()
        if exchange.length is not None and exchange.sent != exchange.length:
            self.transmission_failed(exchange, Failure(UpstreamBroken("the request body was not its declared length")))
            return
        if exchange.chunked:
            self.transport.write(LAST_CHUNK)
        exchange.request_done = True
        self._maybe_idle(exchange)

    def _body_failed(self, reason: Failure, exchange: UpstreamExchange) -> None:
        if exchange is not self.exchange or exchange.request_done:
            return
        self.transmission_failed(exchange, reason)

    def transmission_failed(self, exchange: UpstreamExchange, reason: Failure, *, stop: bool = False) -> None:
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

    def cancelled(self, exchange: UpstreamExchange) -> None:
        """The owner gave up on the request before its response head: the body (if still going) is stopped, once,
        and the connection closes."""
        self._stop_body(exchange)
        self.abandon()

    def _stop_body(self, exchange: UpstreamExchange) -> None:
        """The rest of the request body is not wanted (the exchange is over): its producer is stopped, once."""
        if not exchange.request_done:
            exchange.request_done = True
            self._unregister_body()
            if exchange.body is not None:
                exchange.body.stopProducing()

    def _fail_head(self, exchange: UpstreamExchange, error: Exception) -> None:
        receiver, exchange.receiver = exchange.receiver, None
        if receiver is not None:
            receiver.response_failed(Failure(error))

    # --- the response -------------------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None or exchange.response_done:
            if self._tunnel is not None:
                self._tunnel(data)
                return
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
        except httptools.HttpParserUpgrade as upgrade:
            if exchange.switching:
                self._switched(exchange, data[int(str(upgrade.args[0])) :] if upgrade.args else b"")
            else:
                self._broken(exchange, UpstreamBroken("the upstream switched protocols unasked"))
            return
        except httptools.HttpParserError as error:
            if exchange.complete is not None:
                self._out_of_step(exchange)
                return
            cause = error.__context__
            if isinstance(cause, BrokenResponse):
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
                self._broken(exchange, head_too_large())
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

    def _switched(self, exchange: UpstreamExchange, rest: bytes) -> None:
        """The upstream switched to WebSocket: the connection leaves the pool for good (told as if lost: it is
        none of the pool's any more), and the response goes to its receiver, who makes a tunnel of it
        (`switch_protocols`) or drops it (the connection closes). `rest` is what came after the head."""
        response = exchange.response
        assert response is not None
        self.exchange = None
        exchange.complete = None
        exchange.request_done = True
        self._closing = True  # never reused, whatever happens next
        self.parser_spent = True
        self._on_lost(self)
        response.tunnel_rest = rest
        receiver, exchange.receiver = exchange.receiver, None
        if receiver is None:
            self.abandon()  # nobody waits for it any more
            return
        receiver.response_received(response)  # which takes the tunnel, or drops the response (and so the connection)

    def switch_protocols(
        self, tunnel: Callable[[bytes], object], lost: Callable[[Failure], object]
    ) -> IConnectionTransport:
        """From now on every byte the upstream sends goes to `tunnel`, and its connection's end to `lost`; returns
        the transport (what the tunnel writes to)."""
        self._tunnel = tunnel
        self._tunnel_lost = lost
        self.resume_reading()
        return self.transport

    def _body_read(self, exchange: UpstreamExchange, data: bytes) -> None:
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
            response.feed(data)
        if exchange.body_left or self.exchange is not exchange or exchange.response_done:
            return  # more to come, or the relay ended the exchange meanwhile (its client went away)
        exchange.body_left = None
        self.response_complete(exchange, keep_alive=self.parser.should_keep_alive())
        if extra > 0:
            self._out_of_step(exchange)
            return
        self._read_complete(exchange)

    def _out_of_step(self, exchange: UpstreamExchange) -> None:
        """The response ended within a read and more came after it: the response stands, and the connection, out
        of step with us, is closed rather than reused."""
        _log.warn("Upstream sent bytes after a complete response; closing its connection")
        exchange.complete = None
        self._closing = True
        self._end_response(exchange)
        self.abandon()

    def _read_complete(self, exchange: UpstreamExchange) -> None:
        """The response ended within the read just handled: its end is acted on now."""
        keep_alive, exchange.complete = exchange.complete, None
        if not keep_alive:
            self._closing = True
        self._end_response(exchange)

    def response_complete(self, exchange: UpstreamExchange, *, keep_alive: bool) -> None:
        """The response ended (within a parse): acted on once the whole read is parsed, so that a byte past it is
        seen before the connection can go back to the pool and on to another request."""
        exchange.response_done = True
        exchange.complete = keep_alive

    def _end_response(self, exchange: UpstreamExchange) -> None:
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
        response.end(_RESPONSE_DONE)

    def _maybe_idle(self, exchange: UpstreamExchange) -> None:
        """The exchange is over on both sides: the connection goes back to the pool, or closes."""
        if exchange is not self.exchange or not (exchange.request_done and exchange.response_done):
            return
        self.exchange = None
        self.resume_reading()
        if self._closing or self.lost_reason is not None:
            if self.lost_reason is None:
                self.transport.loseConnection()
            return
        self._on_idle(self)

    def _broken(self, exchange: UpstreamExchange, error: UpstreamBroken) -> None:
        """The response is broken: before its head was handed over the request fails with `error` (502); after
        it, the body ends in failure (the owner cuts the client). The connection closes either way."""
        _log.warn("Upstream response broken: {reason}; closing its connection", reason=error.detail)
        response = exchange.response
        if exchange.receiver is not None:
            self._fail_head(exchange, ResponseFailed([Failure(error)]))
        elif response is not None:
            response.end(Failure(ResponseFailed([Failure(error)], response)))
        exchange.response_done = True
        exchange.complete = None
        self._stop_body(exchange)
        self.abandon()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost_reason = reason
        lost, self._tunnel_lost = self._tunnel_lost, None
        if lost is not None:
            self._tunnel = None
            lost(reason)
            return
        self._body_registered = False  # the transport lets its producer go itself
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            self._stop_body(exchange)
            response = exchange.response
            if exchange.complete is not None and response is not None:
                exchange.complete = None
                response.end(_RESPONSE_DONE)  # it ended whole before the connection did
            elif exchange.receiver is not None:
                error = ResponseFailed([reason]) if exchange.received_any else ResponseNeverReceived([reason])
                self._fail_head(exchange, error)
            elif response is not None and not exchange.response_done:
                if response.close_delimited and not self._closing:
                    # A body framed by the connection's close: complete as far as anyone can tell (the owner
                    # tells a close from a reset by `reset`).
                    response.end(Failure(PotentialDataLoss()))
                else:
                    response.end(Failure(ResponseFailed([reason], response)))
        self._on_lost(self)
