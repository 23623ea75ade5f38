"""Response direction over real loopback sockets: bodies stream through whole, with backpressure."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pytest
import pytest_twisted

from tests.support.backpressure import held_back_then_whole
from tests.support.clients import RawClient, connect, parse_responses, within
from tests.support.origin import pattern_bytes
from tests.support.running import gateway_config

MiB = 1024 * 1024


def _get(path: bytes, *headers: bytes, method: bytes = b"GET", close: bool = True) -> bytes:
    """A request head with no body; Host is example.test unless `headers` name another."""
    lines = [b"%s %s HTTP/1.1" % (method, path)]
    if not any(h.lower().startswith(b"host:") for h in headers):
        lines.append(b"Host: example.test")
    lines += headers
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _echoed_headers(port: int, *headers: bytes) -> dict[str, Any]:
    """Send GET /headers with `headers` and return the origin's JSON echo of what it received."""
    client = await connect(port, keep_all=True)
    client.send(_get(b"/headers", *headers))
    await within(client.closed)
    response = client.response()
    assert response.status == 200, response
    assert response.complete
    echo: dict[str, Any] = json.loads(response.body)
    return echo


def _named(echo: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in echo["headers"] if k.lower() == name.lower()]


@pytest_twisted.ensureDeferred
async def test_content_length_body_arrives_whole(origin, gateway_for):
    """A response with Content-Length reaches the client byte for byte, with its Content-Length kept."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(b"GET /bytes/300000 HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
    await within(client.closed)
    response = client.response()
    assert response.status == 200
    assert response.header(b"content-length") == b"300000"
    assert response.header(b"transfer-encoding") is None
    assert response.complete
    assert hashlib.sha256(response.body).digest() == hashlib.sha256(pattern_bytes(0, 300000)).digest()


@pytest_twisted.ensureDeferred
async def test_chunked_body_arrives_chunked_and_whole(origin, gateway_for):
    """A response the upstream sent chunked reaches the client chunked, with its terminator, byte for byte."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(_get(b"/bytes/300000?chunked=1"))
    await within(client.closed)
    response = client.response()
    assert response.status == 200
    assert response.header(b"transfer-encoding") == b"chunked"
    assert response.header(b"content-length") is None
    assert response.complete
    assert response.rest == b""
    assert response.body == pattern_bytes(0, 300000)
    assert client.clean_close


@pytest_twisted.ensureDeferred
async def test_head_keeps_content_length_without_body(origin, gateway_for):
    """A HEAD response keeps the upstream's Content-Length and carries no body, so the next response follows
    its head directly."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(_get(b"/status/200", method=b"HEAD", close=False))
    await within(client.until(lambda c: b"\r\n\r\n" in c.head, "the HEAD response head arrived"))
    client.send(_get(b"/status/200"))
    await within(client.closed)
    data = bytes(client.head)
    head, _, after = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert re.search(rb"\r\ncontent-length: 11\r\n", head + b"\r\n", re.IGNORECASE)
    assert after.startswith(b"HTTP/1.1 200 "), after[:100]
    second = parse_responses(after)
    assert len(second) == 1 and second[0].complete and second[0].body == b"status body"
    assert second[0].rest == b""


@pytest_twisted.ensureDeferred
async def test_no_content_statuses_have_no_body(origin, gateway_for):
    """204 and 304 responses reach the client with neither a body nor body framing, so the connection stays in
    step for the next request."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    for path in (b"/status/204", b"/status/304"):
        client.send(_get(path, close=False))
        count = client.received
        await within(client.until(lambda c, n=count: b"\r\n\r\n" in c.head[n:], f"the {path!r} response arrived"))
    client.send(_get(b"/status/200"))
    await within(client.closed)
    responses = parse_responses(bytes(client.head))
    assert [r.status for r in responses] == [204, 304, 200]
    for r in responses[:2]:
        assert r.body == b""
        assert r.header(b"transfer-encoding") is None
        assert r.header(b"content-length") is None
    assert responses[2].complete and responses[2].body == b"status body" and responses[2].rest == b""


@pytest_twisted.ensureDeferred
async def test_two_requests_on_one_client_connection(origin, gateway_for):
    """A keep-alive client gets two complete responses, one after the other, on one connection."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(_get(b"/bytes/1000", close=False))
    await within(client.responses_received(1))
    assert not client.closed.called
    client.send(_get(b"/bytes/2000"))
    await within(client.closed)
    first, second = parse_responses(bytes(client.head))
    assert (first.status, first.body) == (200, pattern_bytes(0, 1000))
    assert (second.status, second.body) == (200, pattern_bytes(0, 2000))
    assert second.complete and second.rest == b""
    assert client.clean_close


@pytest_twisted.ensureDeferred
async def test_sequential_requests_reuse_one_upstream_connection(origin, gateway_for):
    """Sequential requests, even from different client connections, go over one pooled upstream connection."""
    gateway = gateway_for(gateway_config(origin.url))
    for n in (1000, 2000, 3000):
        client = await connect(gateway.port, keep_all=True)
        client.send(_get(b"/bytes/%d" % n))
        await within(client.closed)
        assert client.response().body == pattern_bytes(0, n)
    assert len(origin.seen) == 3
    assert origin.accepted == 1


@pytest_twisted.ensureDeferred
async def test_client_that_stops_reading_pauses_the_upstream(origin, gateway_for):
    """A client that stops reading makes the upstream stop sending (its socket is paused, not buffered), and
    once the client reads again the whole body arrives complete."""
    size = 256 * MiB
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port)
    client.send(_get(b"/bytes/%d" % size))
    client.pause()
    seen = await within(origin.request_seen())
    await held_back_then_whole(client, seen, size)


@pytest_twisted.ensureDeferred
async def test_client_disconnect_closes_upstream(origin, gateway_for):
    """A client that goes away mid-download makes the gateway close the upstream connection at once, so the
    upstream stops sending."""
    size = 256 * MiB
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port)
    client.send(_get(b"/bytes/%d" % size))
    await within(client.received_at_least(1 * MiB))
    client.abort()
    seen = origin.seen[0]
    await within(seen.connection_lost, 5)
    assert not seen.finished
    assert seen.sent < size // 4


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_headers_are_not_forwarded(origin, gateway_for):
    """Hop-by-hop request headers, and every header named in Connection, stay at the gateway; end-to-end
    headers reach the upstream unchanged."""
    gateway = gateway_for(gateway_config(origin.url))
    echo = await _echoed_headers(
        gateway.port,
        b"Connection: X-Secret-Hop, keep-alive",
        b"X-Secret-Hop: must not pass",
        b"Keep-Alive: timeout=5",
        b"TE: trailers",
        b"Trailer: X-Checksum",
        b"Upgrade: h2c",
        b"Proxy-Connection: keep-alive",
        b"Proxy-Authorization: Basic dXNlcjpwYXNz",
        b"Authorization: Bearer end-to-end",
        b"X-Custom: kept as is",
        b"Accept: application/json",
    )
    names = {k.lower() for k, _ in echo["headers"]}
    for hop in ("x-secret-hop", "keep-alive", "te", "trailer", "upgrade", "proxy-connection", "proxy-authorization"):
        assert hop not in names, f"{hop} reached the upstream: {echo['headers']}"
    assert all("secret" not in v.lower() for v in _named(echo, "connection"))
    assert _named(echo, "authorization") == ["Bearer end-to-end"]
    assert _named(echo, "x-custom") == ["kept as is"]
    assert _named(echo, "accept") == ["application/json"]


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_response_headers_are_not_passed_on(origin, gateway_for):
    """Hop-by-hop response headers, and every header the upstream names in Connection, stay at the gateway;
    end-to-end response headers reach the client unchanged."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(_get(b"/hop-headers"))
    await within(client.closed)
    response = client.response()
    assert (response.status, response.body) == (200, b"hop")
    assert response.header(b"x-hop-only") is None
    assert response.header(b"keep-alive") is None
    assert response.header(b"x-end-to-end") == b"kept"
    assert all(b"hop" not in v.lower() for v in response.headers_named(b"connection"))


@pytest.mark.parametrize(
    ("trusted", "forwarded_for"),
    [([], "127.0.0.1"), (["127.0.0.0/8"], "203.0.113.7, 127.0.0.1"), (["10.0.0.1", "::1"], "127.0.0.1")],
    ids=["untrusted-replaced", "trusted-appended", "other-proxies-trusted"],
)
@pytest_twisted.ensureDeferred
async def test_forwarding_headers_are_added(origin, gateway_for, trusted, forwarded_for):
    """The upstream sees X-Forwarded-For appended to when the client is a trusted proxy (server.trusted_proxies)
    and replaced by the client's address otherwise, X-Forwarded-Proto and -Host set by the gateway (not the
    client), and the gateway appended to Via; the client sees Via on the response too."""
    gateway = gateway_for(gateway_config(origin.url, server={"trusted_proxies": trusted}))
    client = await connect(gateway.port, keep_all=True)
    client.send(
        _get(
            b"/headers",
            b"Host: client.example:8080",
            b"X-Forwarded-For: 203.0.113.7",
            b"X-Forwarded-Proto: https",
            b"X-Forwarded-Host: spoofed.example",
            b"Via: 1.0 edge",
        )
    )
    await within(client.closed)
    response = client.response()
    echo = json.loads(response.body)
    assert _named(echo, "x-forwarded-for") == [forwarded_for]
    assert _named(echo, "x-forwarded-proto") == ["http"]
    assert _named(echo, "x-forwarded-host") == ["client.example:8080"]
    assert _named(echo, "via") == ["1.0 edge, 1.1 gateway"]
    assert response.header(b"via") == b"1.1 gateway"


@pytest.mark.parametrize(
    ("trusted", "kept"),
    [([], False), (["127.0.0.0/8"], True), (["10.0.0.1", "::1"], False)],
    ids=["untrusted-removed", "trusted-kept", "other-proxies-trusted"],
)
@pytest_twisted.ensureDeferred
async def test_forwarded_and_x_real_ip_reach_the_upstream_only_from_a_trusted_proxy(origin, gateway_for, trusted, kept):
    """A client that is not a trusted proxy cannot make an upstream believe a forged address through RFC 7239's
    Forwarded or through X-Real-IP: both are removed, as its X-Forwarded-For is replaced. A trusted proxy's pass
    unchanged, every value of them."""
    gateway = gateway_for(gateway_config(origin.url, server={"trusted_proxies": trusted}))
    client = await connect(gateway.port, keep_all=True)
    client.send(
        _get(
            b"/headers",
            b'Forwarded: for=203.0.113.7;proto=https, for="[2001:db8::7]"',
            b"forwarded: for=198.51.100.1",
            b"X-Real-IP: 203.0.113.7",
        )
    )
    await within(client.closed)
    echo = json.loads(client.response().body)
    if kept:
        assert _named(echo, "forwarded") == ['for=203.0.113.7;proto=https, for="[2001:db8::7]"', "for=198.51.100.1"]
        assert _named(echo, "x-real-ip") == ["203.0.113.7"]
    else:
        assert _named(echo, "forwarded") == []
        assert _named(echo, "x-real-ip") == []
    assert _named(echo, "x-forwarded-for") == ["127.0.0.1"]


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({}, {"x-aspnet-version": b"4.0.30319"}),
        (
            {"route": {"hide_response_headers": []}},
            {"server": b"Apache/2.4.1 (Unix)", "x-powered-by": b"PHP/5.6.40", "x-aspnet-version": b"4.0.30319"},
        ),
        (
            {"server": {"hide_response_headers": ["X-AspNet-Version", "X-Powered-By"]}},
            {"server": b"Apache/2.4.1 (Unix)"},
        ),
        ({"server": {"server_header": "gateway"}}, {"server": b"gateway", "x-aspnet-version": b"4.0.30319"}),
    ],
    ids=["default-hides-server-and-powered-by", "route-hides-nothing", "server-list", "own-server-header"],
)
@pytest_twisted.ensureDeferred
async def test_upstream_identity_headers_are_hidden(origin, gateway_for, sections, expected):
    """An upstream's Server and X-Powered-By (its stack and version) do not reach clients by default; a route's
    (or the server's) hide_response_headers says which headers are hidden instead, [] none; with
    server.server_header the gateway's own Server replaces the upstream's. Other headers pass unchanged."""
    gateway = gateway_for(gateway_config(origin.url, **sections))
    client = await connect(gateway.port, keep_all=True)
    client.send(_get(b"/stack"))
    await within(client.closed)
    response = client.response()
    assert response.status == 200
    shown = {name: response.header(name.encode()) for name in ("server", "x-powered-by", "x-aspnet-version")}
    assert {name: value for name, value in shown.items() if value is not None} == expected


@pytest.mark.parametrize("server_header", ["", "gateway"])
@pytest_twisted.ensureDeferred
async def test_the_gateways_own_answers_carry_a_server_header_only_when_configured(origin, gateway_for, server_header):
    """The gateway's own answers (a 404 of a request, a 400 refusal of the channel) carry no Server header unless
    server.server_header sets one."""
    gateway = gateway_for(
        gateway_config(origin.url, route={"path_prefix": "/status"}, server={"server_header": server_header})
    )
    servers = []
    for request in (_get(b"/elsewhere"), b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"):
        client = await connect(gateway.port, keep_all=True)
        client.send(request)
        await within(client.closed)
        response = client.response()
        assert response.status in (400, 404)
        servers.append(response.header(b"server"))
    assert servers == [server_header.encode() or None] * 2


@pytest_twisted.ensureDeferred
async def test_request_id_is_propagated(origin, gateway_for):
    """A client's X-Request-ID reaches the upstream once, unchanged, and comes back on the response."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(_get(b"/headers", b"X-Request-ID: req-42.abc"))
    await within(client.closed)
    response = client.response()
    assert _named(json.loads(response.body), "x-request-id") == ["req-42.abc"]
    assert response.headers_named(b"x-request-id") == [b"req-42.abc"]


@pytest_twisted.ensureDeferred
async def test_request_id_is_generated(origin, gateway_for):
    """A request without X-Request-ID gets one from the gateway, the same at the upstream and on the response."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(_get(b"/headers"))
    await within(client.closed)
    response = client.response()
    upstream_ids = _named(json.loads(response.body), "x-request-id")
    assert len(upstream_ids) == 1 and re.fullmatch(r"[0-9a-f]{32}", upstream_ids[0]), upstream_ids
    assert response.headers_named(b"x-request-id") == [upstream_ids[0].encode()]


@pytest_twisted.ensureDeferred
async def test_host_header_is_the_upstreams_by_default(origin, gateway_for):
    """By default the upstream receives its own address as Host, and the client's Host as X-Forwarded-Host."""
    gateway = gateway_for(gateway_config(origin.url))
    echo = await _echoed_headers(gateway.port, b"Host: client.example")
    host, port = origin.address
    assert _named(echo, "host") == [f"{host}:{port}"]
    assert _named(echo, "x-forwarded-host") == ["client.example"]


@pytest_twisted.ensureDeferred
async def test_host_header_is_the_clients_when_configured(origin, gateway_for):
    """With host_header = "client" the upstream receives the client's Host unchanged."""
    gateway = gateway_for(gateway_config(origin.url, route={"host_header": "client"}))
    echo = await _echoed_headers(gateway.port, b"Host: Client.Example:8080")
    assert _named(echo, "host") == ["Client.Example:8080"]


@pytest_twisted.ensureDeferred
async def test_path_and_query_reach_upstream_byte_for_byte(origin, gateway_for):
    """The request target reaches the upstream exactly as sent: percent-encodings, empty and odd query
    parameters, repeated slashes and dotted names that are no dot-segments (those are refused) untouched."""
    target = b"/a%2Fb//c/.d/..x/%7Euser/caf%C3%A9%20x;p=1?q=%2F%20x&&a=1&a=2&e=&plus=a+b&raw=%zz&u=%C3%A9"
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(_get(target))
    await within(client.closed)
    assert [s.uri for s in origin.seen] == [target]


@pytest_twisted.ensureDeferred
async def test_strip_prefix_removes_the_route_prefix(origin, gateway_for):
    """A route with strip_prefix sends the path without its prefix, query kept, and "/" for the bare prefix."""
    gateway = gateway_for(gateway_config(origin.url, route={"path_prefix": "/api", "strip_prefix": True}))
    for target in (b"/api/v1/items?q=%41", b"/api"):
        client = await connect(gateway.port, keep_all=True)
        client.send(_get(target))
        await within(client.closed)
    assert [s.uri for s in origin.seen] == [b"/v1/items?q=%41", b"/"]


@pytest_twisted.ensureDeferred
async def test_upstream_base_path_is_prepended(origin, gateway_for):
    """An upstream URL with a path puts that path in front of every request target."""
    gateway = gateway_for(gateway_config(origin.url + "/base/v2"))
    client = await connect(gateway.port, keep_all=True)
    client.send(_get(b"/items?x=1"))
    await within(client.closed)
    assert [s.uri for s in origin.seen] == [b"/base/v2/items?x=1"]


@pytest_twisted.ensureDeferred
async def test_response_head_and_first_bytes_arrive_while_stream_is_open(origin, gateway_for):
    """A slow stream (server-sent-event style) reaches the client head and bytes as they come, not at the end."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(_get(b"/stall-body/10"))

    def first_bytes_in(c: RawClient) -> bool:
        responses = parse_responses(bytes(c.head))
        return bool(responses) and len(responses[0].body) >= 10

    await within(client.until(first_bytes_in, "the head and the first 10 bytes arrived"))
    response = client.response()
    assert response.status == 200
    assert response.header(b"content-length") == b"20"
    assert response.body == pattern_bytes(0, 10)
    assert not response.complete
    assert not client.closed.called
    client.abort()
    await within(origin.seen[0].connection_lost, 5)
