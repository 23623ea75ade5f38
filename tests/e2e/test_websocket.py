"""WebSocket through the gateway over real loopback sockets, between real WebSocket peers (`wsproto` on both ends,
`tests.support.websocket`): messages both ways byte for byte, the handshake's headers, admission refusing an upgrade,
answers other than `101`, and the close and abort of either side.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
import trustme
from twisted.internet.error import ConnectionDone
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, RejectConnection, TextMessage

from gateway.auth.apikeys import hash_key
from tests.support.certs import client_options, issue
from tests.support.clients import within
from tests.support.logs import captured
from tests.support.running import gateway_config
from tests.support.websocket import PUSHED, WebSocketOrigin, connect_websocket

KEY = "gwk_e2e-key-of-live-app-0123456789abcdef"


@pytest_twisted.async_yield_fixture()
async def ws_origin() -> AsyncIterator[WebSocketOrigin]:
    origin = await WebSocketOrigin().start()
    yield origin
    await origin.stop()


def _ended(events: list[Any]) -> list[Any]:
    return [e for e in events if "WebSocket tunnel ended" in e.get("log_format", "")]


@pytest_twisted.ensureDeferred
async def test_messages_cross_byte_exact_both_ways(ws_origin: WebSocketOrigin, gateway_for: Any) -> None:
    gateway = gateway_for(gateway_config(ws_origin.url))
    client = await connect_websocket(gateway.port, "/echo", subprotocols=["chat"], headers=[(b"X-Trace", b"t-1")])
    accepted = await within(client.handshake)
    assert isinstance(accepted, AcceptConnection) and accepted.subprotocol == "chat"
    target, headers = ws_origin.seen.requests[0]
    assert target == "/echo"
    assert headers[b"upgrade"] == b"websocket" and headers[b"connection"].lower() == b"upgrade"
    assert headers[b"sec-websocket-protocol"] == b"chat" and headers[b"x-trace"] == b"t-1"
    assert b"x-forwarded-for" in headers and b"x-request-id" in headers

    client.send(TextMessage(data="héllo, tunnel"))
    assert await within(client.next_message()) == "héllo, tunnel"

    big = os.urandom(1024 * 1024 + 7)
    client.send(BytesMessage(data=big))
    assert await within(client.next_message(), 30) == big

    pieces = [b"frag-1;", b"frag-2;", b"frag-3"]
    reply = client.next_message()
    for i, piece in enumerate(pieces):
        client.send(BytesMessage(data=piece, message_finished=i == len(pieces) - 1))
    assert await within(reply) == b"".join(pieces)
    assert ws_origin.seen.messages[-1] == b"".join(pieces), "the fragments arrived as one message"

    pong = client.next_pong()
    client.send(Ping(payload=b"are you there"))
    assert await within(pong) == b"are you there"

    client.transport.loseConnection()
    await within(client.gone)
    await within(ws_origin.seen.connections[0].gone)


@pytest_twisted.ensureDeferred
async def test_a_message_sent_with_the_101_reaches_the_client(ws_origin: WebSocketOrigin, gateway_for: Any) -> None:
    gateway = gateway_for(gateway_config(ws_origin.url))
    client = await connect_websocket(gateway.port, "/push")
    message = client.next_message()
    assert isinstance(await within(client.handshake), AcceptConnection)
    assert await within(message) == PUSHED
    client.transport.loseConnection()
    await within(client.gone)
    await within(ws_origin.seen.connections[0].gone)


@pytest_twisted.ensureDeferred
async def test_the_close_handshake_closes_both_connections_and_is_logged_once(
    ws_origin: WebSocketOrigin, gateway_for: Any
) -> None:
    gateway = gateway_for(gateway_config(ws_origin.url))
    with captured() as events:
        client = await connect_websocket(gateway.port, "/echo")
        await within(client.handshake)
        client.send(TextMessage(data="bye"))
        assert await within(client.next_message()) == "bye"
        client.send(CloseConnection(code=1000, reason="done"))
        await within(client.gone)
        await within(ws_origin.seen.connections[0].gone)
    assert client.closed_with is not None and client.closed_with.code == 1000
    assert client.reason is not None and client.reason.check(ConnectionDone), "closed cleanly by the gateway"
    ended = _ended(events)
    assert len(ended) == 1
    assert ended[0]["ending"] in ("upstream_closed", "client_closed")
    assert ended[0]["up"] > 0 and ended[0]["down"] > 0


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_closes_first_closes_the_client_cleanly(
    ws_origin: WebSocketOrigin, gateway_for: Any
) -> None:
    gateway = gateway_for(gateway_config(ws_origin.url))
    with captured() as events:
        client = await connect_websocket(gateway.port, "/bye")
        await within(client.handshake)
        await within(client.gone)
    assert client.closed_with is not None and client.closed_with.code == 1001, "the Close frame came through"
    assert client.reason is not None and client.reason.check(ConnectionDone)
    assert [e["ending"] for e in _ended(events)] == ["upstream_closed"]


@pytest_twisted.ensureDeferred
async def test_a_client_that_vanishes_closes_the_upstream(ws_origin: WebSocketOrigin, gateway_for: Any) -> None:
    gateway = gateway_for(gateway_config(ws_origin.url))
    client = await connect_websocket(gateway.port, "/echo")
    await within(client.handshake)
    client.transport.abortConnection()
    await within(ws_origin.seen.connections[0].gone, 2)
    await within(client.gone)


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_vanishes_closes_the_client(ws_origin: WebSocketOrigin, gateway_for: Any) -> None:
    gateway = gateway_for(gateway_config(ws_origin.url))
    client = await connect_websocket(gateway.port, "/echo")
    await within(client.handshake)
    ws_origin.seen.connections[0].transport.abortConnection()
    await within(client.gone, 2)
    assert client.reason is not None and not client.reason.check(ConnectionDone), "a reset upstream cuts the client"


@pytest_twisted.ensureDeferred
async def test_admission_refuses_an_upgrade_before_the_origin_hears_of_it(
    ws_origin: WebSocketOrigin, gateway_for: Any
) -> None:
    data = gateway_config(ws_origin.url, route={"auth": ["keys"]})
    data["auth"] = {"keys": {"type": "api_key"}}
    data["consumers"] = {"live": {"api_keys": [hash_key(KEY)]}}
    gateway = gateway_for(data)

    refused = await connect_websocket(gateway.port, "/echo")
    answer = await within(refused.handshake)
    assert isinstance(answer, RejectConnection) and answer.status_code == 401
    assert ws_origin.seen.requests == []
    refused.transport.loseConnection()
    await within(refused.gone)

    admitted = await connect_websocket(gateway.port, "/echo", headers=[(b"X-API-Key", KEY.encode())])
    assert isinstance(await within(admitted.handshake), AcceptConnection)
    _target, headers = ws_origin.seen.requests[0]
    assert b"x-api-key" not in headers and headers[b"x-consumer-id"] == b"live"
    admitted.transport.loseConnection()
    await within(admitted.gone)
    await within(ws_origin.seen.connections[0].gone)


@pytest_twisted.ensureDeferred
async def test_an_origin_that_refuses_to_switch_is_relayed(ws_origin: WebSocketOrigin, gateway_for: Any) -> None:
    gateway = gateway_for(gateway_config(ws_origin.url))
    client = await connect_websocket(gateway.port, "/refuse")
    answer = await within(client.handshake)
    assert isinstance(answer, RejectConnection) and answer.status_code == 403
    assert client.rejected_body == b"refused by the origin"
    client.transport.loseConnection()
    await within(client.gone)


@pytest_twisted.ensureDeferred
async def test_a_route_with_websocket_off_refuses_the_upgrade(ws_origin: WebSocketOrigin, gateway_for: Any) -> None:
    gateway = gateway_for(gateway_config(ws_origin.url, route={"websocket": {"enabled": False}}))
    client = await connect_websocket(gateway.port, "/echo")
    answer = await within(client.handshake)
    assert isinstance(answer, RejectConnection) and answer.status_code == 403
    assert b"upgrade-refused" in client.rejected_body
    assert ws_origin.seen.requests == []
    await within(client.gone)  # the gateway closes after refusing a switch


@pytest_twisted.ensureDeferred
async def test_a_tunnel_over_tls(tmp_path: Path, ws_origin: WebSocketOrigin, gateway_for: Any) -> None:
    """A client over TLS: the tunnel joins the TLS layer (its producer and consumer) to the upstream's socket."""
    ca = trustme.CA()
    data = gateway_config(ws_origin.url)
    data["listeners"][0]["tls"] = {"certificates": [issue(ca, tmp_path, "api.example.com").table()]}
    gateway = gateway_for(data)
    client = await connect_websocket(gateway.port, "/echo", tls=client_options(ca, "api.example.com"))
    assert isinstance(await within(client.handshake), AcceptConnection)
    big = os.urandom(3 * 1024 * 1024)
    client.send(BytesMessage(data=big))
    assert await within(client.next_message(), 30) == big
    client.send(CloseConnection(code=1000))
    await within(client.gone)
    await within(ws_origin.seen.connections[0].gone)
