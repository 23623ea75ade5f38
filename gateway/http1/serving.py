"""What serving a client connection's requests involves: a request as the connection reads it (`Message`), what
serves it (`RequestHandler`, the exchange of `gateway.proxy.exchange`), and the server the connection belongs to
(`ConnectionOwner`, `gateway.proxy.site.GatewayFactory`).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING
from typing import Protocol as TypingProtocol

from OpenSSL import SSL
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from gateway.config import Limits, Listener, Server
from gateway.errors import GatewayError
from gateway.http1.fields import Fields

if TYPE_CHECKING:
    from gateway.http1.lifecycle import ConnectionLifecycle

__all__ = ["ConnectionOwner", "Message", "RequestHandler"]


class Message:
    """A request as read: its head once complete, then whether its body has ended. Held while pipelined."""

    __slots__ = (
        "body",
        "ended",
        "headers",
        "keep_alive",
        "length",
        "method",
        "target",
        "target_parts",
        "upgrade",
        "version",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target_parts: list[bytes] = []
        """The target as llhttp hands it over, in pieces (a long one comes in several), until the line is read."""
        self.target = b""
        self.version = b""
        self.headers = Fields()
        self.length: int | None = 0
        """The Content-Length, 0 without a body, None for a chunked body."""
        self.keep_alive = False
        self.body: deque[bytes] | None = None
        """Body chunks read while the message waits its turn (pipelined)."""
        self.ended = False
        self.upgrade = False
        """It asks to switch to WebSocket (RFC 6455 section 4.1: a GET of HTTP/1.1 without a body, with
        `Upgrade: websocket` and `Connection: Upgrade`); other upgrades are not passed on."""


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
    """What a connection asks of the server it belongs to (`gateway.proxy.site.GatewayFactory`), giving itself as its
    life (`gateway.http1.lifecycle.ConnectionLifecycle`): what an owner may use of a connection."""

    clock: IReactorTime

    @property
    def limits(self) -> Limits: ...

    @property
    def server(self) -> Server: ...

    def connection_opened(self, connection: ConnectionLifecycle) -> GatewayError | None: ...

    def connection_closed(self, connection: ConnectionLifecycle) -> None: ...

    def handle(self, connection: ConnectionLifecycle, message: Message) -> RequestHandler: ...

    def head_refused(
        self, connection: ConnectionLifecycle, error: GatewayError, request_id: str, line: tuple[bytes, bytes] | None
    ) -> None: ...

    def handshake_failed(self, listener: Listener, error: SSL.Error) -> None: ...

    def invalid_peer(self, listener: Listener | None) -> None: ...
