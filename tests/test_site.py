"""`gateway.proxy.site.GatewayFactory` in memory: the connections it builds, what it schedules, and the exchanges they
make, on a `MemoryReactorClock` with clients over `StringTransport`."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock

from gateway.http1.server import ClientConnection
from gateway.proxy.exchange import Exchange
from gateway.proxy.site import GatewayFactory
from tests.support.memory import MemoryGateway
from tests.support.running import gateway_config

UPSTREAM = "http://127.0.0.1:8081"
EPS = 0.25


def memory_gateway(**sections: Any) -> MemoryGateway:
    return MemoryGateway(gateway_config(UPSTREAM, **sections))


def test_build_protocol_makes_a_connection_with_the_configured_limits() -> None:
    """Each connection is a client connection holding the configured head limits and server settings."""
    gw = memory_gateway(
        limits={"max_header_bytes": 4096, "max_header_count": 17},
        server={"idle_timeout": 12},
    )
    channel = gw.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 50000))
    assert isinstance(channel, ClientConnection)
    assert channel.limits.max_header_bytes == 4096
    assert channel.limits.max_header_count == 17
    assert channel.server.idle_timeout == 12
    assert channel.owner is gw.factory


def test_every_request_is_served_by_an_exchange_of_the_factorys_gateway() -> None:
    """Every request a connection reads is served by an Exchange, carrying the factory's Gateway."""
    gw = memory_gateway()
    client = gw.client()
    client.send(b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n")
    assert isinstance(client.request, Exchange)
    assert client.channel.handler is client.request
    assert client.request.gateway is gw.gateway
    client.disconnect()
    gw.close()


def test_channel_timers_run_on_the_injected_clock() -> None:
    """The channel's idle timer is scheduled on the clock given to the factory, not on the global reactor."""
    gw = memory_gateway(server={"idle_timeout": 12})
    client = gw.client()
    [call] = gw.reactor.getDelayedCalls()
    assert call.getTime() == 12
    client.disconnect()
    assert gw.reactor.getDelayedCalls() == []


def test_start_factory_schedules_no_delayed_call() -> None:
    """Starting the factory schedules nothing: no per-second log-date timer, no log file."""
    clock = MemoryReactorClock()
    gw = memory_gateway()
    factory = GatewayFactory(gw.gateway, clock=clock)
    factory.doStart()
    assert clock.getDelayedCalls() == []
    assert gw.reactor.getDelayedCalls() == []
    factory.doStop()
    assert clock.getDelayedCalls() == []


def test_idle_connection_is_closed_after_exactly_the_idle_timeout() -> None:
    """A connection that sends nothing is closed server.idle_timeout seconds after it opened; not before."""
    gw = memory_gateway(server={"idle_timeout": 12})
    client = gw.client()
    gw.advance(12 - EPS)
    assert not client.transport.disconnecting
    gw.advance(EPS)
    assert client.transport.disconnecting
    assert client.received() == b""
    client.disconnect()
    assert gw.reactor.getDelayedCalls() == []


def test_header_block_over_max_header_bytes_gets_431_and_close() -> None:
    """A header block larger than max_header_bytes is refused with 431 and the connection half-closed."""
    gw = memory_gateway(limits={"max_header_bytes": 1024})
    client = gw.client()
    client.send(b"GET / HTTP/1.1\r\nHost: example.test\r\nX-Big: " + b"a" * 1100 + b"\r\n\r\n")
    assert client.received().startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert client.transport.write_closed
    assert gw.pending_connections() == 0
    client.disconnect()
    assert gw.reactor.getDelayedCalls() == []


def test_header_block_at_max_header_bytes_is_accepted() -> None:
    """A request head just under max_header_bytes is read and proxied, so the limit is not off by much."""
    gw = memory_gateway(limits={"max_header_bytes": 1024})
    client = gw.client()
    head = b"GET / HTTP/1.1\r\nHost: example.test\r\nX-Big: "
    client.send(head + b"a" * (1000 - len(head)) + b"\r\n\r\n")
    assert client.received() == b""
    assert gw.pending_connections() == 1
    client.disconnect()
    gw.close()
    assert gw.reactor.getDelayedCalls() == []


def test_more_headers_than_max_header_count_gets_431_and_close() -> None:
    """A request with more header lines than max_header_count is refused with 431 and the connection half-closed."""
    gw = memory_gateway(limits={"max_header_count": 5})
    client = gw.client()
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(6))
    client.send(b"GET / HTTP/1.1\r\nHost: example.test\r\n" + headers + b"\r\n")
    assert client.received().startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert client.transport.write_closed
    assert gw.pending_connections() == 0
    client.disconnect()
    assert gw.reactor.getDelayedCalls() == []
