"""`ResponseWriter`: the response side of a client connection (`gateway.http1.server.ClientConnection`), the ground
floor beneath its life (`gateway.http1.lifecycle`) and its reading of requests.

Rules: nothing is sent that the exchange did not ask for: no `100 Continue` (the exchange sends it after
admission), no Date, Server or Content-Type. A head is one write. The body of a response without Content-Length is
chunked to an HTTP/1.1 client and delimited by the connection's close to an HTTP/1.0 one; a response to HEAD and a
204 or 304 has no body.
"""

from __future__ import annotations

from typing import Final

from twisted.internet.protocol import Protocol

from gateway.errors import GatewayError, problem, reason_phrase
from gateway.http1.fields import Fields
from gateway.http1.heads import CRLF, LAST_CHUNK, chunk
from gateway.http1.transports import IConnectionTransport

__all__ = ["ResponseWriter", "refusal_bytes"]

_NO_BODY_STATUSES: Final = frozenset({204, 304})
_STATUS_LINE_START: Final = b"HTTP/1.1 "
_CODES: Final = {code: b"%d" % code for code in range(100, 600)}
"""Each status code's digits, made once rather than formatted into each response's status line."""


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


class ResponseWriter(Protocol):
    """Writes a client connection's responses, one at a time: the head in one write, then the body framed by the
    head (Content-Length, chunked, or the connection's close). Its state is reset for each request the connection
    serves (`gateway.http1.lifecycle.ConnectionLifecycle`)."""

    transport: IConnectionTransport
    """Set by `makeConnection`, before any other method runs."""

    def __init__(self) -> None:
        self.persistent = True
        """Whether another request may follow the current one."""
        # The response being written.
        self._chunked = False
        self._body_allowed = True
        self.response_started = False
        self.response_ended = False
        self.sent_length = 0
        """Body bytes of the current response written so far."""
        self._version = b"HTTP/1.1"

    def send_continue(self) -> None:
        """`100 Continue`: the exchange admitted a request whose client waits for it before sending the body."""
        if not self.response_started and not self.transport.disconnecting:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def write_head(self, code: int, phrase: bytes, headers: Fields, *, head_request: bool) -> None:
        """The response head, in one write. Its framing is the connection's: a Content-Length the exchange set is
        kept; without one the body is chunked (HTTP/1.1) or ends with the connection (HTTP/1.0); a response to
        HEAD, a 204 or 304, and a `101 Switching Protocols` (after which the connection is a tunnel) have no body."""
        self.response_started = True
        body_allowed = not head_request and code not in _NO_BODY_STATUSES and code >= 200  # 101: none
        parts = [_STATUS_LINE_START, _CODES.get(code) or b"%d" % code, b" ", phrase, CRLF]
        entries = headers.entries
        for name, values in entries.values():
            for value in values:
                parts.append(name)  # as in `gateway.http1.heads.request_head`: no tuple per line
                parts.append(b": ")
                parts.append(value)
                parts.append(CRLF)
        if body_allowed and b"content-length" not in entries:
            if self._version == b"HTTP/1.1":
                self._chunked = True
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.persistent = False  # the end of the body is the end of the connection
        if not self.persistent and self._version == b"HTTP/1.1" and b"connection" not in entries:
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
