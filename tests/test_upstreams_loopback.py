"""An upstream of several servers over real loopback sockets: a real gateway in front of several origins, some of
them failing (refused, reset, 503, stalled), the others answering.

What each test shows: requests are spread over the servers; a failed try is retried on another server (a connect
failure whatever the method, a reset or a 503 only for an idempotent method without a body); a server that keeps
failing is ejected, with one log line; a request no server can take is a fast 503 with Retry-After naming the
upstream; the same key reaches the same server. Every wait is bounded; nothing depends on speed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest_twisted
from twisted.logger import formatEvent

from tests.support.clients import Parsed, connect, parse_response, within
from tests.support.faults import assert_problem, get, pools_settled
from tests.support.logs import captured
from tests.support.origin import Origin
from tests.support.running import RunningGateway, gateway_config


def several(urls: list[str], *, route: dict[str, Any] | None = None, **upstream: Any) -> dict[str, Any]:
    data = gateway_config(urls[0], route=route or {}, upstream=upstream)
    del data["upstreams"]["origin"]["url"]
    data["upstreams"]["origin"]["servers"] = [{"url": url} for url in urls]
    return data


async def fetch(gateway: RunningGateway, path: bytes, *headers: bytes, method: bytes = b"GET") -> Parsed:
    client = await connect(gateway.port, keep_all=True)
    client.send(get(path, *headers, method=method))
    await within(client.closed)
    return parse_response(bytes(client.head))


def served(origins: list[Origin]) -> list[int]:
    return [len(origin.seen) for origin in origins]


@pytest_twisted.ensureDeferred
async def test_round_robin_spreads_requests_over_every_server(origins, gateway_for):
    """Six requests to an upstream of three servers of equal weight: two reach each."""
    gateway = gateway_for(several([o.url for o in origins]))
    for _ in range(6):
        assert (await fetch(gateway, b"/status/200")).status == 200
    assert served(origins) == [2, 2, 2]
    await pools_settled(gateway)


@pytest_twisted.ensureDeferred
async def test_weights_share_the_requests(origins, gateway_for):
    data = several([o.url for o in origins[:2]])
    data["upstreams"]["origin"]["servers"][0]["weight"] = 3
    gateway = gateway_for(data)
    for _ in range(8):
        assert (await fetch(gateway, b"/status/200")).status == 200
    assert served(origins[:2]) == [6, 2]


@pytest_twisted.ensureDeferred
async def test_a_refused_server_is_retried_on_another_and_ejected(origins, refused_url, gateway_for):
    """Every request sent to a server that refuses connections is retried on another (whatever its method: it
    was never sent) and answered 200; two failures in a row eject it, in one log line, and then it is not tried."""
    gateway = gateway_for(several([refused_url, origins[0].url, origins[1].url], ejection={"consecutive_failures": 2}))
    with captured(lambda e: "ejected" in e.get("log_format", "")) as ejected:
        statuses = [(await fetch(gateway, b"/status/200", method=method)).status for method in [b"GET", b"POST"] * 4]
    assert statuses == [200] * 8
    assert sum(served(origins)) == 8
    assert [formatEvent(e) for e in ejected] == [
        f"Upstream origin: server {refused_url[7:]} ejected for 30 s after failures in a row"
    ]
    assert gateway.pool().retries == 2
    await pools_settled(gateway)


@pytest_twisted.ensureDeferred
async def test_a_503_is_retried_for_an_idempotent_request_only(origins, gateway_for):
    """A server answering 503: a GET it answered is sent to another server and gets its 200; a POST gets the 503
    itself (it may have had an effect), unless the route says its POSTs are safe to repeat."""
    origins[0].every_request = b"/status/503"
    gateway = gateway_for(several([o.url for o in origins[:2]], ejection={"consecutive_failures": 0}))
    assert (await fetch(gateway, b"/status/200")).status == 200  # 503 from the first, then the second's 200
    assert served(origins[:2]) == [1, 1]
    # Two POSTs in a row go one to each server (no retry moves the turn): one gets the first server's 503.
    posts = [await fetch(gateway, b"/status/200", method=b"POST") for _ in range(2)]
    assert sorted(p.status for p in posts) == [200, 503]
    assert b"status body" in [p.body for p in posts if p.status == 503]
    assert served(origins[:2]) == [2, 2]

    safe = gateway_for(
        several(
            [o.url for o in origins[:2]],
            route={"retries": {"unsafe_methods": True}},
            ejection={"consecutive_failures": 0},
        )
    )
    assert (await fetch(safe, b"/status/200", method=b"POST")).status == 200


@pytest_twisted.ensureDeferred
async def test_a_reset_before_the_response_is_retried_for_an_idempotent_request_only(origins, gateway_for):
    origins[0].every_request = b"/reset"
    gateway = gateway_for(several([o.url for o in origins[:2]], ejection={"consecutive_failures": 0}))
    assert (await fetch(gateway, b"/status/200", method=b"GET")).status == 200
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/status/200", method=b"DELETE"))
    await within(client.closed)
    assert parse_response(bytes(client.head)).status == 200  # DELETE is idempotent
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/status/200", method=b"POST"))
    await within(client.closed)
    assert_problem(client, 502)
    await pools_settled(gateway)


@pytest_twisted.ensureDeferred
async def test_retries_stop_at_the_route_count(origins, gateway_for):
    """Three servers all answering 503 and `attempts = 1`: two tries, then the client gets the last 503."""
    for origin in origins:
        origin.every_request = b"/status/503"
    gateway = gateway_for(
        several([o.url for o in origins], route={"retries": {"attempts": 1}}, ejection={"consecutive_failures": 0})
    )
    assert (await fetch(gateway, b"/x")).status == 503
    assert sum(served(origins)) == 2


@pytest_twisted.ensureDeferred
async def test_the_retry_budget_bounds_retries(origins, gateway_for):
    """A budget of no share and no minimum: nothing is retried, the 503 reaches the client."""
    origins[0].every_request = b"/status/503"
    gateway = gateway_for(
        several(
            [o.url for o in origins[:2]],
            retry_budget={"percent": 0, "min_retries": 0},
            ejection={"consecutive_failures": 0},
        )
    )
    assert (await fetch(gateway, b"/x")).status == 503
    assert served(origins[:2]) == [1, 0]


@pytest_twisted.ensureDeferred
async def test_every_server_at_its_cap_is_a_fast_503_with_retry_after(origins, gateway_for):
    """Circuit breaking: with each server holding its one allowed request (stalled), the next request is not
    queued but answered 503 at once, naming the upstream, with Retry-After."""
    gateway = gateway_for(several([o.url for o in origins[:2]], max_requests_per_server=1))
    stalled = []
    for _ in (1, 2):
        client = await connect(gateway.port, keep_all=True)
        client.send(get(b"/stall"))
        stalled.append(client)
    await within(origins[0].request_seen(1))
    await within(origins[1].request_seen(1))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/status/200"))
    await within(client.closed)
    problem = assert_problem(client, 503)
    assert problem["detail"] == "no server of upstream origin can take a request now"
    assert parse_response(bytes(client.head)).header(b"retry-after") == b"1"
    for held in stalled:
        held.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_hashing_on_a_header_keeps_a_key_on_its_server(origins, gateway_for):
    gateway = gateway_for(several([o.url for o in origins], balance="hash", hash_on="header:X-Tenant"))
    for tenant in (b"a", b"b", b"c", b"d"):
        before = served(origins)
        for _ in range(3):
            assert (await fetch(gateway, b"/status/200", b"X-Tenant: " + tenant)).status == 200
        grew = [after - b for after, b in zip(served(origins), before, strict=True)]
        assert sorted(grew) == [0, 0, 3], (tenant, grew)


@pytest_twisted.ensureDeferred
async def test_least_requests_passes_over_a_busy_server(origins, gateway_for):
    """Two servers, one holding a stalled request: every new request goes to the other (one in flight is more
    than none, and with two servers both are always drawn)."""
    gateway = gateway_for(several([o.url for o in origins[:2]], balance="least_requests"))
    held = await connect(gateway.port, keep_all=True)
    held.send(get(b"/stall"))
    first = await within(_first_seen(origins[:2]))
    other = origins[1] if first is origins[0] else origins[0]
    for _ in range(4):
        assert (await fetch(gateway, b"/status/200")).status == 200
    assert len(first.seen) == 1 and len(other.seen) == 4
    held.transport.abortConnection()


def _first_seen(origins: list[Origin]) -> Any:
    from twisted.internet.defer import DeferredList

    return DeferredList([o.request_seen(1) for o in origins], fireOnOneCallback=True).addCallback(
        lambda result: origins[result[1]]
    )


async def upload(gateway: RunningGateway, method: bytes, body: bytes) -> Parsed:
    """`body` sent to /sink, which answers with the byte count and SHA-256 of what it read."""
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/sink", b"Content-Length: %d" % len(body), method=method) + body)
    await within(client.closed)
    return parse_response(bytes(client.head))


@pytest_twisted.ensureDeferred
async def test_a_small_body_is_kept_and_sent_again_to_another_server(origins, gateway_for):
    """A PUT whose first server answers 503 after reading its body: the body, kept as it went, is sent whole to
    the second server, which answers; the client sees that answer only."""
    origins[0].every_request = b"/status/503"
    gateway = gateway_for(several([o.url for o in origins[:2]], ejection={"consecutive_failures": 0}))
    body = bytes(range(256)) * 100  # 25,600 bytes
    response = await upload(gateway, b"PUT", body)
    assert response.status == 200
    assert json.loads(response.body) == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert [len(o.seen) for o in origins[:2]] == [1, 1]
    assert origins[0].seen[0].body_bytes == len(body)


@pytest_twisted.ensureDeferred
async def test_a_body_over_the_limit_or_a_post_is_not_sent_again(origins, gateway_for):
    """A PUT body larger than retries.max_body_bytes, and a POST (not idempotent), get the first server's 503."""
    origins[0].every_request = b"/status/503"
    for origin in origins[1:]:
        origin.every_request = b"/status/503"  # whichever server it reaches first answers 503
    gateway = gateway_for(
        several(
            [o.url for o in origins[:2]],
            route={"retries": {"max_body_bytes": "1KiB"}},
            ejection={"consecutive_failures": 0},
        )
    )
    assert (await upload(gateway, b"PUT", b"x" * 2048)).status == 503
    assert (await upload(gateway, b"POST", b"x" * 100)).status == 503
    assert sum(len(o.seen) for o in origins[:2]) == 2  # one try each
