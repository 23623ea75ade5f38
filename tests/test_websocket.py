"""WebSocket through the gateway, in memory (`tests.support.memory`): the upgrade request, the `101`, the tunnel the
two connections become, and every way it ends, with the clock moved by hand.

The end-to-end tests over loopback with a real WebSocket peer are in tests/e2e/test_websocket.py.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from gateway.config import parse
from gateway.operations.runtime import make_gateway
from gateway.proxy.phases import Phase
from gateway.proxy.tunnel import CLOSE_GRACE, Tunnel
from tests.support.clients import parse_response
from tests.support.logs import captured
from tests.support.memory import AbortableTransport, Client, MemoryGateway, Upstream
from tests.support.running import gateway_config

UPSTREAM = "http://127.0.0.1:8081"

UPGRADE = (
    b"GET /live HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: chat\r\n\r\n"
)
SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n\r\n"
)
GET = b"GET /plain HTTP/1.1\r\nHost: example.test\r\n\r\n"
OK_5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def gateway(**route: Any) -> MemoryGateway:
    return MemoryGateway(gateway_config(UPSTREAM, route=route))


def upstream_head(upstream: Upstream) -> dict[bytes, list[bytes]]:
    """The header lines of the request the upstream received (lower-cased names)."""
    head = upstream.received().split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    found: dict[bytes, list[bytes]] = {}
    for line in head:
        name, _, value = line.partition(b": ")
        found.setdefault(name.lower(), []).append(value)
    return found


def open_tunnel(memory: MemoryGateway, *, first: bytes = b"", server_first: bytes = b"") -> tuple[Client, Upstream]:
    client = memory.client()
    client.send(UPGRADE + first)
    upstream = memory.upstream()
    upstream.transport.clear()
    upstream.respond(SWITCHED + server_first)
    return client, upstream


def test_an_upgrade_goes_upstream_with_its_headers_and_the_101_comes_back() -> None:
    memory = gateway()
    client = memory.client()
    client.send(UPGRADE)
    upstream = memory.upstream()
    headers = upstream_head(upstream)
    assert headers[b"upgrade"] == [b"websocket"]
    assert headers[b"connection"] == [b"Upgrade"]
    assert headers[b"sec-websocket-key"] == [b"dGhlIHNhbXBsZSBub25jZQ=="]
    assert headers[b"sec-websocket-version"] == [b"13"]
    assert headers[b"sec-websocket-protocol"] == [b"chat"]
    upstream.respond(SWITCHED)
    head = client.received()
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert head.endswith(b"\r\n\r\n"), "nothing follows the 101's head: no body, no chunked framing"
    assert b"Upgrade: websocket\r\n" in head and b"Connection: Upgrade\r\n" in head
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head
    assert b"Transfer-Encoding" not in head and b"Content-Length" not in head
    assert client.request.phase is Phase.TUNNEL
    assert memory.gateway.pools["origin"].in_flight == 0, "the tunnel holds no slot of the pool"


def test_the_tunnel_copies_bytes_both_ways_with_what_came_with_the_heads() -> None:
    memory = gateway()
    client, upstream = open_tunnel(memory, first=b"\x81\x85early", server_first=b"\x81\x05hello")
    assert upstream.received() == b"\x81\x85early", "what the client sent after its head goes first"
    assert client.received().endswith(b"\r\n\r\n\x81\x05hello"), "what the upstream sent after its 101"
    upstream.transport.clear()
    client.transport.clear()
    client.send(b"frame-up")
    upstream.respond(b"frame-down")
    assert upstream.received() == b"frame-up"
    assert client.received() == b"frame-down"
    # Each side's transport is the other's streaming producer: a full buffer on one side pauses the other.
    assert client.transport.producer is upstream.transport and client.transport.streaming
    assert upstream.transport.producer is client.transport and upstream.transport.streaming
    # Small messages waiting for answers: no side holds one back for an ACK (Nagle).
    assert client.transport.no_delay and upstream.transport.no_delay


def test_a_clean_close_on_one_side_closes_the_other_and_ends_the_request_once() -> None:
    memory = gateway()
    client, upstream = open_tunnel(memory)
    client.send(b"12345")
    upstream.respond(b"abc")
    with captured() as events:
        upstream.close(ConnectionDone("closed"))
    exchange = client.request
    assert exchange.phase is Phase.DONE and exchange.ending == "upstream_closed"
    assert client.transport.lost and not client.transport.aborted, "closed once what was written is sent"
    assert (exchange.body_bytes, exchange.sentLength) == (5, 3)
    lines = [e for e in events if "WebSocket tunnel ended" in e.get("log_format", "")]
    assert len(lines) == 1 and lines[0]["ending"] == "upstream_closed"
    assert (lines[0]["up"], lines[0]["down"]) == (5, 3)
    client.disconnect()
    assert exchange.phase is Phase.DONE


def test_a_side_that_does_not_finish_closing_is_cut_after_the_grace() -> None:
    memory = gateway()
    client, upstream = open_tunnel(memory)
    disconnect_clean(client)
    assert upstream.transport.lost and not upstream.transport.aborted
    memory.advance(CLOSE_GRACE - 1)
    assert not upstream.transport.aborted
    memory.advance(1)
    assert upstream.transport.aborted


def disconnect_clean(client: Client) -> None:
    client.transport.disconnecting = True
    client.channel.connectionLost(Failure(ConnectionDone("client closed")))


def test_a_reset_on_one_side_cuts_the_other_at_once() -> None:
    memory = gateway()
    client, upstream = open_tunnel(memory)
    client.disconnect()  # ConnectionLost: a reset
    assert upstream.transport.aborted
    assert client.request.phase is Phase.CLIENT_GONE and client.request.ending == "client_reset"

    client, upstream = open_tunnel(memory)
    upstream.close(ConnectionLost("reset"))
    assert client.transport.aborted
    assert client.request.phase is Phase.ABORTED and client.request.ending == "upstream_reset"


def test_no_byte_either_way_for_the_idle_timeout_closes_the_tunnel() -> None:
    memory = gateway(websocket={"idle_timeout": 100})
    client, upstream = open_tunnel(memory)
    memory.advance(60)
    client.send(b"ping")  # progress: the countdown starts again
    memory.advance(60)
    upstream.respond(b"pong")
    memory.advance(99)
    assert not client.transport.aborted and not upstream.transport.aborted
    memory.advance(1)
    assert client.transport.aborted and upstream.transport.aborted
    assert client.request.phase is Phase.ABORTED and client.request.ending == "idle_timeout"


def test_max_lifetime_closes_a_busy_tunnel() -> None:
    memory = gateway(websocket={"max_lifetime": 30})
    client, upstream = open_tunnel(memory)
    for _ in range(29):
        memory.advance(1)
        client.send(b"x")
    assert not client.transport.aborted
    memory.advance(1)
    assert client.transport.aborted and upstream.transport.aborted
    assert client.request.ending == "max_lifetime"


def test_a_drain_cut_ends_the_tunnel() -> None:
    memory = gateway()
    client, upstream = open_tunnel(memory)
    assert memory.factory.live(draining=False).requests == {"tunnel": 1}
    memory.factory.drain()
    assert not client.transport.aborted, "a tunnel gets the drain timeout"
    memory.factory.cut_all("drain_timeout")
    assert client.transport.aborted and upstream.transport.aborted
    assert client.request.ending == "drain_timeout"


def test_a_reload_leaves_open_tunnels_open() -> None:
    memory = gateway()
    client, upstream = open_tunnel(memory)
    memory.factory.reconfigure(
        make_gateway(parse(gateway_config("http://127.0.0.1:9999"), source="new.toml"), memory.reactor)
    )
    client.send(b"still here")
    upstream.respond(b"so am I")
    assert upstream.received() == b"still here"
    assert client.received().endswith(b"so am I")
    assert client.request.phase is Phase.TUNNEL


def test_an_upgrade_on_a_route_that_disallows_it_is_refused_before_the_upstream() -> None:
    memory = gateway(websocket={"enabled": False})
    client = memory.client()
    client.send(UPGRADE)
    response = parse_response(client.received())
    assert response.status == 403
    assert b"upgrade-refused" in response.body
    assert memory.pending_connections() == 0, "the upstream never saw it"


def test_an_answer_other_than_101_is_relayed_and_the_connection_goes_on_as_http() -> None:
    memory = gateway()
    client = memory.client()
    client.send(UPGRADE + GET)  # a pipelined request behind the upgrade: held until the upgrade is answered
    upstream = memory.upstream()
    assert upstream.received().count(b"\r\n\r\n") == 1, "nothing after the upgrade is read meanwhile"
    upstream.transport.clear()
    upstream.respond(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 2\r\n\r\nno")
    assert client.received().startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert upstream.received().startswith(b"GET /plain HTTP/1.1\r\n"), "then the held request is read"
    assert b"upgrade" not in upstream.received().lower()
    upstream.respond(OK_5)
    assert client.received().endswith(b"hello")


def test_other_upgrades_are_not_passed() -> None:
    memory = gateway()
    client = memory.client()
    client.send(
        b"GET /h2 HTTP/1.1\r\nHost: example.test\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n"
    )
    upstream = memory.upstream()
    assert b"upgrade" not in upstream.received().lower()
    upstream.respond(OK_5)
    assert client.received().endswith(b"hello")


@pytest.mark.parametrize(
    "request_head",
    [
        UPGRADE.replace(b"GET", b"POST", 1),
        UPGRADE.replace(b"HTTP/1.1", b"HTTP/1.0", 1),
        UPGRADE.replace(b"Connection: Upgrade", b"Connection: keep-alive", 1),
    ],
    ids=["post", "http-1.0", "no-connection-upgrade"],
)
def test_a_request_that_is_not_a_websocket_handshake_is_not_upgraded(request_head: bytes) -> None:
    memory = gateway()
    client = memory.client()
    client.send(request_head)
    upstream = memory.upstream()
    assert b"upgrade: " not in upstream.received().lower()


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (SWITCHED.replace(b"Upgrade: websocket", b"Upgrade: h2c"), "another protocol"),
        (SWITCHED.replace(b"Connection: Upgrade\r\n", b""), "no Connection: Upgrade"),
    ],
)
def test_a_switch_to_something_else_is_a_broken_upstream(answer: bytes, why: str) -> None:
    memory = gateway()
    client = memory.client()
    client.send(UPGRADE)
    upstream = memory.upstream()
    upstream.respond(answer)
    assert parse_response(client.received()).status == 502, why
    assert upstream.transport.aborted or upstream.transport.lost


def test_a_101_to_a_request_that_did_not_ask_is_a_broken_upstream() -> None:
    memory = gateway()
    client = memory.client()
    client.send(GET)
    upstream = memory.upstream()
    upstream.respond(SWITCHED)
    assert parse_response(client.received()).status == 502


def test_the_client_leaving_before_the_101_drops_the_upstream_connection() -> None:
    memory = gateway()
    client = memory.client()
    client.send(UPGRADE)
    upstream = memory.upstream()
    client.disconnect()
    upstream.respond(SWITCHED + b"late")
    assert upstream.transport.aborted
    assert memory.gateway.pools["origin"].idle == 0


# --- the tunnel on its own ----------------------------------------------------------------------------------


def test_a_tunnel_ends_once_however_many_ways_it_is_told() -> None:
    clock = MemoryReactorClock()
    endings: list[str] = []
    tunnel = Tunnel(clock, idle_timeout=10, max_lifetime=0, on_end=endings.append)
    client, upstream = AbortableTransport(), AbortableTransport()
    tunnel.attach(client, upstream)
    tunnel.client_lost(Failure(ConnectionLost("reset")))
    tunnel.cut("drain_timeout")
    tunnel.upstream_lost(Failure(ConnectionDone("closed")))
    assert endings == ["client_reset"]
    assert tunnel.closed
    tunnel.from_client(b"late")
    tunnel.from_upstream(b"late")
    assert upstream.value() == b"" and client.value() == b""
    assert not clock.getDelayedCalls() or not any(call.active() for call in clock.getDelayedCalls())


# --- what follows an upgrade's head, in any pieces ------------------------------------------------------------


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(cut, 0), len(data)) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=len(UPGRADE) + 60), max_size=6),
    frames=st.binary(min_size=1, max_size=60),
    switch=st.booleans(),
)
def test_what_follows_an_upgrade_goes_to_the_tunnel_or_is_read_as_http(
    cuts: list[int], frames: bytes, switch: bool
) -> None:
    """Sent in any pieces, what follows an upgrade's head is held until the answer: every byte of it reaches the
    upstream's tunnel in order after a 101; after any other answer it is read as the next request (a GET here)."""
    memory = gateway()
    client = memory.client()
    after = frames if switch else GET
    for piece in _pieces(UPGRADE + after, cuts):
        client.send(piece)
    upstream = memory.upstream()
    assert upstream.received().count(b"\r\n\r\n") == 1, "nothing after the upgrade's head is read meanwhile"
    upstream.transport.clear()
    if switch:
        upstream.respond(SWITCHED)
        assert upstream.received() == frames
        client.send(b"more")
        assert upstream.received() == frames + b"more"
    else:
        upstream.respond(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
        assert upstream.received().startswith(b"GET /plain HTTP/1.1\r\n")
        upstream.respond(OK_5)
        responses = client.received()
        assert responses.startswith(b"HTTP/1.1 403 Forbidden\r\n") and responses.endswith(b"hello")
