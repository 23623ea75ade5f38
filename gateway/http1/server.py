"""A client connection: HTTP/1.1 requests read by llhttp (`httptools`), responses written in order.

`ClientConnection` reads the requests; beneath it are its life (`gateway.http1.lifecycle`: serving one request at a
time, refusals, timers) and its responses (`gateway.http1.writer`).

Rules this module keeps:
* Strict: llhttp with no lenient flag (bare LF, obs-fold, CL beside TE, a duplicate Content-Length, control bytes,
  chunk sizes over 64 bits are refused); on top of it the gateway's own: the head limits (request line, header
  bytes, header count; each exact, and a head over one is refused before it ends), a transfer coding other than
  `chunked` alone, chunked framing in HTTP/1.0, a Content-Length or chunk size over 2^63-1, a version other than
  HTTP/1.0 and 1.1, a malformed trailer. Every refusal is an answer, then a lingering close (`refuse`).
* A pipelined request is read (its head parsed, its body held) only from the socket read already under way:
  reading pauses until the request before it is answered, so at most one read is held, whatever the client sends.
* After the client's last request (Connection: close, HTTP/1.0 without keep-alive) nothing more is read as a
  request (RFC 9112 section 9.6).
* After a request that asks to switch to WebSocket nothing is read as a request until it is answered: what came
  after its head is held (reading paused), then given to the tunnel if the upstream switched
  (`switch_protocols`), or read as the next request if it did not.
"""

from __future__ import annotations

from collections import deque
from typing import Final, NoReturn, cast

import httptools
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.addresses import canonical_ip
from gateway.config import Listener
from gateway.errors import BadRequest, GatewayError, HeadersTooLarge, NotSupported, RequestLineTooLong
from gateway.headers import websocket_upgrade
from gateway.http1.fields import read_field
from gateway.http1.framing import MAX_BODY_LENGTH, body_length
from gateway.http1.heads import CRLF
from gateway.http1.lifecycle import ConnectionLifecycle
from gateway.http1.serving import ConnectionOwner, Message

__all__ = ["ClientConnection"]

_log = Logger()

_CRLF: Final = len(CRLF)
_HEADER_LINE: Final = len(b": ") + len(CRLF)
_MAX_PORT: Final = 65535
_VERSIONS: Final = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}
_VERSION_BYTES: Final = len(b" HTTP/1.1")
"""What a request line has after its target (llhttp takes exactly one space and an 'HTTP/x.y' version)."""
_LWS: Final = b" \t"
_FRAMING: Final = (
    "Content-Length must be a single decimal number, and cannot be combined with Transfer-Encoding (which may be "
    "sent only once)"
)


class ClientConnection(ConnectionLifecycle):
    """One client connection, from accept to close: reads its requests and hands each to a handler its owner makes
    (`gateway.http1.serving.ConnectionOwner.handle`)."""

    def __init__(self, owner: ConnectionOwner, listener: Listener | None = None) -> None:
        super().__init__(owner, listener)
        self._parser = httptools.HttpRequestParser(self)
        self._head_bytes = 0
        self._header_count = 0
        self._head_raw = 0
        self._lingered = 0
        """Bytes read and dropped while lingering after a refusal."""
        self._begun = 0
        """Messages begun within the current read."""
        self._last_read = False
        """The latest request was the connection's last (Connection: close, HTTP/1.0 without keep-alive, or the
        gateway closes after it): what follows is not read (RFC 9112 section 9.6)."""
        self._body_progress = False
        self._framing_raw = 0
        """Bytes of a chunked body's reads that carried no body (size lines, extensions, trailers)."""

    # --- reading ---------------------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel(data)
            return
        if self._peer is None and self._invalid_peer():
            return
        if self._upgrade_rest is not None:
            # A request that asks to switch protocols waits for its answer: nothing is read as a request meanwhile.
            self._upgrade_rest += data
            self.transport.pauseProducing()
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
            # llhttp stops after a request that asks to upgrade (or CONNECT). A WebSocket request not answered
            # yet holds what follows until its answer; any other upgrade is not passed on (the request went
            # upstream without it), so what follows is read as the next request, by a new parser.
            self._parser = httptools.HttpRequestParser(self)
            rest = data[int(str(upgrade.args[0])) :] if upgrade.args else b""
            if self._upgrade_wait or any(message.upgrade for message in self._queued):
                self._upgrade_rest = rest
                self.transport.pauseProducing()
                return
            if rest and self.refused is None and self.persistent and not self.transport.disconnecting:
                self.dataReceived(rest)
            return
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if not isinstance(cause, _Refused):
                # Not a refusal: a bug under a callback (the exchange's `begin`, say). llhttp hides it as a
                # callback error; unseen, the client would wait for an answer until a timeout.
                _log.failure(
                    "Serving a request failed (peer {peer})",
                    Failure(cause, type(cause), cause.__traceback__) if cause is not None else None,
                    peer=str(self.getPeer()),
                )
                self.refuse(GatewayError("the gateway failed while serving this request"))
            return
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
            if not self._check_partial_head() and self.handler is None and not self._queued:
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
        return len(message.method) + 1 + sum(map(len, message.target_parts)) + _VERSION_BYTES + _CRLF

    def _known_head(self) -> int:
        return self._line_bytes() + self._head_bytes

    def _check_partial_head(self) -> bool:
        """Past the request line, all that was read of an incomplete head is header lines (one may be partial:
        llhttp holds it until its end). Says whether it refused the head: a caller that tested `self.refused`
        before would not see it change (mypy keeps the narrowing, and compiled code trusts it)."""
        limits = self.limits
        if self._head_raw - self._line_bytes() > limits.max_header_bytes:
            self.refuse(HeadersTooLarge(f"the header fields are over the {limits.max_header_bytes}-byte limit"))
            return True
        return False

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
        message.target_parts.append(url)
        length = len(message.method) + 1 + sum(map(len, message.target_parts))
        if length > self.limits.max_request_line_bytes:
            self._refuse_in_parse(
                RequestLineTooLong(f"the request line is over the {self.limits.max_request_line_bytes}-byte limit")
            )

    def _request_line_done(self) -> None:
        message = self._message
        assert message is not None
        self._line_done = True
        message.target = b"".join(message.target_parts)
        line = len(message.method) + 1 + len(message.target) + _VERSION_BYTES
        if line > self.limits.max_request_line_bytes:
            self._refuse_in_parse(
                RequestLineTooLong(f"the request line is over the {self.limits.max_request_line_bytes}-byte limit")
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            # A trailer field (llhttp checked its syntax): not forwarded, as the body's framing is re-made.
            return
        if not self._line_done:
            self._request_line_done()
        limits = self.limits
        head_bytes = self._head_bytes = self._head_bytes + len(name) + len(value) + _HEADER_LINE
        count = self._header_count = self._header_count + 1
        if head_bytes > limits.max_header_bytes:
            self._refuse_in_parse(
                HeadersTooLarge(f"the header fields are over the {limits.max_header_bytes}-byte limit")
            )
        if count > limits.max_header_count:
            self._refuse_in_parse(HeadersTooLarge(f"there are more than {limits.max_header_count} header fields"))
        read_field(cast(Message, self._message).headers.entries, name, value)  # set by on_message_begin

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
        entries = headers.entries
        coding = entries.get(b"transfer-encoding")
        if coding is not None:
            framing = coding[1]
            if len(framing) != 1:
                self._refuse_in_parse(BadRequest(_FRAMING))
            if framing[0].strip(_LWS).lower() != b"chunked":
                self._refuse_in_parse(BadRequest('the only transfer coding accepted is "chunked" alone'))
            if version != b"HTTP/1.1":
                self._refuse_in_parse(BadRequest("Transfer-Encoding in an HTTP/1.0 request is faulty framing"))
            message.length = None
        else:
            content_length = entries.get(b"content-length")
            if content_length is not None:
                lengths = content_length[1]
                length = body_length(lengths[0])
                if length is None:
                    self._refuse_in_parse(
                        BadRequest(f"the Content-Length is over the largest body length taken ({MAX_BODY_LENGTH})")
                        if lengths[0].strip(_LWS).isdigit()
                        else BadRequest(_FRAMING)
                    )
                message.length = length
        message.keep_alive = parser.should_keep_alive()
        if message.length == 0 and version == b"HTTP/1.1" and message.method == b"GET" and websocket_upgrade(headers):
            message.upgrade = True
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

    # --- refusing, and what is refused on reading -------------------------------------------------------------

    def _refuse_in_parse(self, error: GatewayError) -> NoReturn:
        """Refuse from within a parser callback, and stop the parse."""
        self.refuse(error)
        raise _Refused(error.detail)

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


class _Refused(Exception):
    """Raised from a parser callback to stop the parse once the connection has refused the request."""
