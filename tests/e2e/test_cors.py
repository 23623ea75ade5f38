"""CORS over real loopback sockets (the unit tests are in tests/test_cors.py): a preflight answered by the gateway
never reaches the upstream, and the upstream's answer to the request that follows carries the route's CORS
headers."""

from __future__ import annotations

import pytest_twisted

from tests.support.clients import connect, parse_responses, within
from tests.support.running import gateway_config

APP = b"https://app.example.com"


@pytest_twisted.ensureDeferred
async def test_a_preflight_then_its_request_on_one_connection(origin, gateway_for):
    """The preflight is answered 204 by the gateway (the origin sees nothing); the GET after it on the same
    connection reaches the origin, and its answer names the page's origin."""
    cors = {"allow_origins": ["https://app.example.com"], "allow_headers": ["X-Trace"], "allow_credentials": True}
    gateway = gateway_for(gateway_config(origin.url, route={"cors": cors}))
    client = await connect(gateway.port, keep_all=True)
    client.send(
        b"OPTIONS /headers HTTP/1.1\r\nHost: api.example.com\r\nOrigin: https://app.example.com\r\n"
        b"Access-Control-Request-Method: GET\r\nAccess-Control-Request-Headers: x-trace\r\n\r\n"
    )
    await within(client.responses_received(1))
    assert origin.seen == []
    client.send(
        b"GET /stack HTTP/1.1\r\nHost: api.example.com\r\nOrigin: https://app.example.com\r\nX-Trace: 1\r\n"
        b"Connection: close\r\n\r\n"
    )
    await within(client.closed)
    preflight, actual = parse_responses(bytes(client.head))
    assert preflight.status == 204
    assert preflight.header(b"Access-Control-Allow-Origin") == APP
    assert preflight.header(b"Access-Control-Allow-Headers") == b"x-trace"
    assert preflight.header(b"Access-Control-Allow-Credentials") == b"true"
    assert actual.status == 200 and actual.complete
    assert actual.header(b"Access-Control-Allow-Origin") == APP
    assert actual.header(b"Access-Control-Allow-Credentials") == b"true"
    assert actual.header(b"Vary") == b"Origin"
    assert [seen.uri for seen in origin.seen] == [b"/stack"]
