"""`UpstreamExchange`: one request on an upstream connection (`gateway.http1.upstream`), from its head written to its
response's end: what was sent of its body (it is the body's consumer) and what came back of its response (the
parser's callbacks act on it).

Rules:
* Strict on top of llhttp: a transfer coding other than `chunked` alone, a head over `MAX_RESPONSE_HEAD` (1xx heads
  included), a status outside 100-599, a version other than HTTP/1.0 and 1.1 and an upgrade nobody asked for are
  broken responses (`BrokenResponse`, raised from a callback to stop the parse). A `101 Switching Protocols` is
  taken only for a request that asked to switch to WebSocket, and only to WebSocket (RFC 9110 section 7.8: a
  server must not switch to a protocol the client did not ask for; a tunnel opened unasked is a smuggling channel).
* Nothing of one response reaches the next exchange: a response's end is acted on by the connection once its whole
  read is parsed, and a byte past it puts the connection out of step.
* Not one byte of a request body goes out past its declared length (it would be read as the start of the next
  request: request smuggling).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer

from gateway.errors import UpstreamBroken
from gateway.headers import connection_tokens, websocket_upgrade
from gateway.http1.fields import Fields
from gateway.http1.heads import chunk
from gateway.http1.response import ResponseReceiver, UpstreamResponse

if TYPE_CHECKING:
    from gateway.http1.upstream import UpstreamConnection

__all__ = ["MAX_RESPONSE_HEAD", "BrokenResponse", "UpstreamExchange", "head_too_large"]

MAX_RESPONSE_HEAD: Final = 64 * 1024
"""Bytes of response head (status line, headers, and any 1xx heads before them) taken from an upstream; more is
answered 502, like nginx's "upstream sent too big header" (Envoy's default cap is 60 KiB)."""

_NO_BODY: Final = frozenset({204, 304})
_STATUS_LINE_AND_END: Final = len(b"HTTP/1.1 200 \r\n\r\n")
"""The bytes of a head besides its reason phrase and header lines (each counted as it comes)."""
_HTTP_1: Final = frozenset({"1.0", "1.1"})


class BrokenResponse(Exception):
    """Raised from a parser callback to stop the parse: the response is broken (`reason` says how)."""

    def __init__(self, error: UpstreamBroken) -> None:
        super().__init__(error.detail)
        self.error = error


class UpstreamExchange:
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
        "header_entries",
        "length",
        "method",
        "received_any",
        "receiver",
        "request_done",
        "response",
        "response_done",
        "sent",
        "status",
        "switching",
        "trailer_bytes",
        "upgrade",
    )

    def __init__(
        self,
        connection: UpstreamConnection,
        method: bytes,
        body: IBodyProducer | None,
        length: int | None,
        receiver: ResponseReceiver,
        upgrade: bool = False,
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
        self.header_entries: dict[bytes, tuple[bytes, list[bytes]]] = {}
        """The head's fields as `Fields.entries` holds them, filled by the connection as each line is parsed
        (`UpstreamConnection.on_header`): lower-cased name -> (name as spelt, values without trailing whitespace)."""
        self.status = b""
        self.received_any = False
        self.body_seen = 0
        """Body bytes the parser has handed over."""
        self.upgrade = upgrade
        """The request asks to switch to WebSocket: a `101` switching to it is taken."""
        self.switching = False
        """The response is a `101` switching to WebSocket: handed over once the read past its head is known."""
        self.body_left: int | None = None
        """Once a Content-Length body is under way: its bytes still to come, read past the parser (a body's bytes
        need no parsing, and each read is relayed as it came, not sliced by the parser into a copy)."""

    # --- httptools callbacks ------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.response_done:
            raise BrokenResponse(UpstreamBroken("the upstream sent bytes after a complete response"))
        self.header_entries = {}
        self.status = b""

    def on_status(self, status: bytes) -> None:
        self.status += status
        self._count_head(len(status))

    # A header line of the head is taken by the connection itself (`UpstreamConnection.on_header`).

    def on_trailer(self, name: bytes, value: bytes) -> None:
        """A trailer field: counted, never kept (trailers are not relayed), and bounded like a head."""
        self.trailer_bytes += len(name) + len(value) + 4
        if self.trailer_bytes > MAX_RESPONSE_HEAD:
            raise BrokenResponse(UpstreamBroken(f"the upstream sent trailers of more than {MAX_RESPONSE_HEAD} bytes"))

    def _count_head(self, size: int) -> None:
        if self.response is None:
            self.head_bytes += size
            if self.head_bytes > MAX_RESPONSE_HEAD:
                raise BrokenResponse(head_too_large())

    def on_headers_complete(self) -> None:
        self._count_head(_STATUS_LINE_AND_END)
        parser = self.connection.parser
        code = parser.get_status_code()
        if code == 101:
            self._switching()
            return
        if 100 <= code < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): the final one follows
        if not 200 <= code <= 599:
            raise BrokenResponse(UpstreamBroken("the upstream sent an invalid status code"))
        version = parser.get_http_version()
        if version not in _HTTP_1:
            raise BrokenResponse(UpstreamBroken("the upstream sent an invalid HTTP version"))
        headers = Fields()
        entries = headers.entries = self.header_entries
        length: int | None = None
        coding = entries.get(b"transfer-encoding")
        coded = coding is not None
        if coding is not None and (len(coding[1]) != 1 or coding[1][0].lstrip(b" \t").lower() != b"chunked"):
            raise BrokenResponse(UpstreamBroken("the upstream sent a transfer coding other than chunked alone"))
        lengths = entries.get(b"content-length")
        if lengths is not None:
            # llhttp has checked it: digits only, one value, within 64 bits (zeros first may be thousands).
            length = int(lengths[1][-1].lstrip(b" \t").lstrip(b"0") or b"0")
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
            self.connection.response_complete(self, keep_alive=_keeps_alive(version, headers))
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            receiver.response_received(response)

    def _switching(self) -> None:
        """A `101`: the upstream switches protocols. Taken only for a request that asked to switch to WebSocket,
        and only to WebSocket; handed over by the connection once the parse stops after it (llhttp pauses there,
        and what it read past the head is the tunnel's first bytes)."""
        if not self.upgrade:
            raise BrokenResponse(UpstreamBroken("the upstream switched protocols unasked"))
        headers = Fields()
        headers.entries = self.header_entries
        if not websocket_upgrade(headers):
            raise BrokenResponse(UpstreamBroken("the upstream switched to another protocol than WebSocket"))
        version = self.connection.parser.get_http_version()
        if version != "1.1":
            raise BrokenResponse(UpstreamBroken("the upstream switched protocols over HTTP/1.0"))
        response = UpstreamResponse(self.connection, 101, self.status, version, headers)
        response.length = 0
        self.response = response
        self.switching = True

    def on_body(self, data: bytes) -> None:
        response = self.response
        if response is None:
            return
        if self.response_done:
            raise BrokenResponse(UpstreamBroken("the upstream sent a body with its answer to HEAD"))
        self.between_body = 0
        self.body_seen += len(data)
        response.feed(data)

    def on_message_complete(self) -> None:
        if self.response is None or self.response_done:
            return  # the end of an interim (1xx) answer, or of an answer to HEAD (complete at its head)
        self.connection.response_complete(self, keep_alive=self.connection.parser.should_keep_alive())

    def cancel(self) -> None:
        """The owner gives up on this request before its response head: the body (if still going) is stopped and
        the connection closes. Nothing once the head was handed over or the request failed (as cancelling a
        Deferred that has fired does nothing)."""
        if self.receiver is not None and self.connection.exchange is self:
            self.receiver = None
            self.connection.cancelled(self)

    # --- the request body's consumer (IConsumer, for its producer) ----------------------------------------------

    def write(self, data: bytes) -> None:
        """A piece of this exchange's request body: written while it is the connection's exchange and within its
        declared length (a byte past it would be read as the start of the next request: request smuggling)."""
        if self.request_done or not data:
            return
        connection = self.connection
        if connection.exchange is not self:
            return
        if self.length is not None and self.sent + len(data) > self.length:
            over = Failure(UpstreamBroken("the request body is over its declared length"))
            connection.transmission_failed(self, over, stop=True)
            return
        self.sent += len(data)
        if self.chunked:
            connection.transport.writeSequence(chunk(data))
        else:
            connection.transport.write(data)


def _keeps_alive(version: str, headers: Fields) -> bool:
    """Whether a response leaves its connection open (RFC 9112 section 9.3): HTTP/1.1 unless it says close,
    HTTP/1.0 only when it says keep-alive."""
    tokens = connection_tokens(headers)
    return b"close" not in tokens if version == "1.1" else b"keep-alive" in tokens


def head_too_large() -> UpstreamBroken:
    return UpstreamBroken(f"the upstream sent a response head of more than {MAX_RESPONSE_HEAD} bytes")
