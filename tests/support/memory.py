"""An in-memory gateway: the real factory, client connections, exchanges and upstream pools on a
`MemoryReactorClock`.

Clients are `StringTransport`s fed with `dataReceived`; upstream connections are taken from the reactor's
`tcpClients` and answered by the test over another `StringTransport`. Nothing touches a socket, and time moves
only when the test calls `advance`, so producer states and every timer can be pinned exactly.

The test plays the kernel's part: `client.producer.pauseProducing()` is a full client socket buffer,
`upstream.producer.pauseProducing()` a full upstream one (see ../shared/style.md §4.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.config import parse
from gateway.http1.server import ClientConnection
from gateway.http1.serving import Message
from gateway.operations.runtime import make_gateway
from gateway.proxy.exchange import Exchange
from gateway.proxy.site import GatewayFactory


def disconnect(transport: StringTransport, protocol: Any, reason: Exception | None = None) -> None:
    """Lose a connection in the order a real TCP transport does: stop its producer, then tell the protocol."""
    failure = Failure(reason if reason is not None else ConnectionLost("gone"))
    transport.disconnecting = True
    if transport.producer is not None:
        transport.producer.stopProducing()
    protocol.connectionLost(failure)


@implementer(ITCPTransport)
class AbortableTransport(StringTransport):
    """A StringTransport that records an abort, a close and a half-close, as a real TCP transport offers them."""

    aborted = False
    lost = False
    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keep_alive = enabled

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def loseConnection(self) -> None:
        self.lost = True
        super().loseConnection()


@dataclass
class Upstream:
    """One upstream connection the gateway opened, answered by the test."""

    protocol: Any
    transport: AbortableTransport

    def received(self) -> bytes:
        return self.transport.value()

    def respond(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def close(self, reason: Exception | None = None) -> None:
        disconnect(self.transport, self.protocol, reason or ConnectionDone("upstream closed"))


@dataclass
class Client:
    """One client connection to the gateway."""

    channel: ClientConnection
    transport: AbortableTransport

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def received(self) -> bytes:
        return self.transport.value()

    @property
    def exchanges(self) -> list[Exchange]:
        """Every exchange made on this connection, in order."""
        owner = self.channel.owner
        assert isinstance(owner, RecordingFactory)
        return owner.exchanges.setdefault(self.channel, [])

    @property
    def request(self) -> Exchange:
        """The latest request's exchange (it stays here once it has ended)."""
        return self.exchanges[-1]

    def disconnect(self) -> None:
        disconnect(self.transport, self.channel, ConnectionLost("client went away"))


class RecordingFactory(GatewayFactory):
    """The gateway's factory, keeping every exchange it makes (by connection) for the test to look at."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.exchanges: dict[ClientConnection, list[Exchange]] = {}

    def handle(self, connection: ClientConnection, message: Message) -> Exchange:
        exchange = super().handle(connection, message)
        self.exchanges.setdefault(connection, []).append(exchange)
        return exchange


class MemoryGateway:
    """The gateway for one config dict, on a `MemoryReactorClock`."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.reactor = MemoryReactorClock()
        self.config = parse(data, source="memory.toml")
        self.gateway = make_gateway(self.config, self.reactor)
        self.factory = RecordingFactory(self.gateway, clock=self.reactor)
        self._taken = 0

    def client(self) -> Client:
        channel = self.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 50000))
        transport = AbortableTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 50000))
        channel.makeConnection(transport)
        return Client(channel, transport)

    def pending_connections(self) -> int:
        """Upstream connections asked for and not yet taken by `upstream()`."""
        return len(self.reactor.tcpClients) - self._taken

    def upstream(self) -> Upstream:
        """Complete the next connection the gateway asked for, and return it."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[self._taken]
        self._taken += 1
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = AbortableTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol.makeConnection(transport)
        return Upstream(protocol, transport)

    def fail_connection(self, reason: Exception) -> None:
        """Fail the next connection the gateway asked for."""
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[self._taken]
        self._taken += 1
        connector = self.reactor.connectors[self._taken - 1]
        factory.clientConnectionFailed(connector, Failure(reason))

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)

    def close(self) -> None:
        """Close the pools (their idle timers included), as the service does on stop."""
        for pool in self.gateway.pools.values():
            pool.close()
