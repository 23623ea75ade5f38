"""Real WebSocket peers for the tests, over Twisted protocols and `wsproto` (the sans-I/O RFC 6455 implementation):
an origin that echoes, refuses or pushes by path, and a client that connects through the gateway.

The origin's paths: `/echo` accepts and echoes every message whole (text as text, binary as binary) and answers
pings itself (wsproto leaves that to its user); `/push` accepts and sends one message in the same write as its
`101`; `/bye` accepts, then closes (a Close frame, then its end of the connection); `/refuse` answers 403 with a
body instead of switching; `/plain` is not a WebSocket endpoint: any request there gets a 200 with
`Content-Length`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

PUSHED = b"pushed with the 101"

__all__ = ["PUSHED", "WebSocketClient", "WebSocketOrigin", "connect_websocket"]


@dataclass
class Seen:
    """What the origin saw: each handshake's target and headers, each message whole, each connection's end."""

    requests: list[tuple[str, dict[bytes, bytes]]] = field(default_factory=list)
    """Each handshake's target and its header lines as they came (lower-cased names)."""
    messages: list[bytes | str] = field(default_factory=list)
    lost: list[Failure] = field(default_factory=list)
    connections: list[_OriginProtocol] = field(default_factory=list)


class _OriginProtocol(Protocol):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen
        self.ws = WSConnection(ConnectionType.SERVER)
        self.parts: list[Any] = []
        self.gone: defer.Deferred[None] = defer.Deferred()
        self.head = b""

    def connectionMade(self) -> None:
        self.seen.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        if data.startswith(b"GET /plain "):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")
            return
        if b"\r\n\r\n" not in self.head:
            self.head += data
        self.ws.receive_data(data)
        for event in self.ws.events():
            self._event(event)

    def _event(self, event: Event) -> None:
        if isinstance(event, Request):
            lines = self.head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
            headers = {name.lower(): value for name, _, value in (line.partition(b": ") for line in lines)}
            self.seen.requests.append((event.target, headers))
            if event.target == "/refuse":
                self.transport.write(self.ws.send(RejectConnection(status_code=403, has_body=True)))
                self.transport.write(self.ws.send(RejectData(data=b"refused by the origin")))
                return
            accept = AcceptConnection(subprotocol=event.subprotocols[0] if event.subprotocols else None)
            out = self.ws.send(accept)
            if event.target == "/push":
                out += self.ws.send(BytesMessage(data=PUSHED))
            self.transport.write(out)  # the 101 and (for /push) a message, in one write
            if event.target == "/bye":
                self.transport.write(self.ws.send(CloseConnection(code=1001, reason="going away")))
                self.transport.loseConnection()
        elif isinstance(event, Message):
            self.parts.append(event.data)
            if event.message_finished:
                whole = "".join(self.parts) if isinstance(event, TextMessage) else b"".join(self.parts)
                self.parts = []
                self.seen.messages.append(whole)
                reply = TextMessage(data=whole) if isinstance(whole, str) else BytesMessage(data=whole)
                self.transport.write(self.ws.send(reply))
        elif isinstance(event, Ping):
            self.transport.write(self.ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            self.transport.write(self.ws.send(event.response()))
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.seen.lost.append(reason)
        self.gone.callback(None)


class WebSocketOrigin:
    """The WebSocket origin on 127.0.0.1, a free port."""

    def __init__(self) -> None:
        self.seen = Seen()
        self._port: IListeningPort | None = None

    async def start(self) -> WebSocketOrigin:
        factory = Factory.forProtocol(lambda: _OriginProtocol(self.seen))
        self._port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        return self

    @property
    def url(self) -> str:
        assert self._port is not None
        return f"http://127.0.0.1:{self._port.getHost().port}"

    async def stop(self) -> None:
        for connection in self.seen.connections:
            if connection.transport is not None and connection.transport.connected:
                connection.transport.abortConnection()
        if self._port is not None:
            await self._port.stopListening()


class WebSocketClient(Protocol):
    """A WebSocket client: `handshake` fires with the AcceptConnection or RejectConnection (its body in
    `rejected_body`); `messages` keeps every message whole; `next_message` waits for the next one."""

    def __init__(self, target: str, headers: list[tuple[bytes, bytes]], subprotocols: list[str]) -> None:
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.request = Request(host="example.test", target=target, extra_headers=headers, subprotocols=subprotocols)
        self.handshake: defer.Deferred[Event] = defer.Deferred()
        self.rejected_body = b""
        self.rejected: RejectConnection | None = None
        self.messages: list[bytes | str] = []
        self.pongs: list[bytes] = []
        self.closed_with: CloseConnection | None = None
        self.gone: defer.Deferred[None] = defer.Deferred()
        """Fires once the connection is gone; `reason` says how."""
        self.reason: Failure | None = None
        self._parts: list[Any] = []
        self._waiting: list[defer.Deferred[bytes | str]] = []
        self._pong_waiting: list[defer.Deferred[bytes]] = []

    def connectionMade(self) -> None:
        self.transport.write(self.ws.send(self.request))

    def dataReceived(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, AcceptConnection):
                self.handshake.callback(event)
            elif isinstance(event, RejectConnection):
                self.rejected = event
                if not event.has_body:
                    self.handshake.callback(event)
            elif isinstance(event, RejectData):
                self.rejected_body += event.data
                if event.body_finished:
                    self.handshake.callback(self.rejected)  # type: ignore[arg-type]
            elif isinstance(event, Message):
                self._parts.append(event.data)
                if event.message_finished:
                    whole = "".join(self._parts) if isinstance(event, TextMessage) else b"".join(self._parts)
                    self._parts = []
                    self.messages.append(whole)
                    if self._waiting:
                        self._waiting.pop(0).callback(whole)
            elif isinstance(event, Pong):
                self.pongs.append(bytes(event.payload))
                if self._pong_waiting:
                    self._pong_waiting.pop(0).callback(bytes(event.payload))
            elif isinstance(event, CloseConnection):
                self.closed_with = event

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.reason = reason
        self.gone.callback(None)
        for waiting in self._waiting + self._pong_waiting:  # type: ignore[operator]
            waiting.errback(AssertionError("the connection closed first"))
        self._waiting, self._pong_waiting = [], []

    def send(self, event: Event) -> None:
        self.transport.write(self.ws.send(event))

    def next_message(self) -> defer.Deferred[bytes | str]:
        d: defer.Deferred[bytes | str] = defer.Deferred()
        self._waiting.append(d)
        return d

    def next_pong(self) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        self._pong_waiting.append(d)
        return d


async def connect_websocket(
    port: int,
    target: str,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    subprotocols: list[str] | None = None,
    tls: Any = None,
) -> WebSocketClient:
    """A WebSocket client connected to the gateway at 127.0.0.1:`port` (over TLS with `tls`, a client connection
    creator), its handshake sent."""
    client = WebSocketClient(target, headers or [], subprotocols or [])
    endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    await connectProtocol(endpoint, client)
    return client
