"""Clients that misbehave, over real loopback sockets: raw-socket clients in front of a real gateway and the
fault-injecting origin.

Each ends in a defined state: the upstream exchange is cut as soon as the client is known to be gone, a client
that reads nothing is dropped after the send-stall timeout, odd but legal requests are served, and afterwards no
request holds an upstream slot (the autouse fixture checks sockets and DelayedCalls). Timeouts are set in
milliseconds so the tests finish quickly; every assertion is about what happened, never how fast.
"""

from __future__ import annotations

import hashlib
import json

import pytest_twisted

from tests.support.clients import connect, parse_responses, within
from tests.support.faults import assert_problem, cached_connections, get, pools_settled
from tests.support.origin import pattern_bytes
from tests.support.running import gateway_config

MiB = 1024 * 1024


def _post(path: bytes, length: int, *headers: bytes) -> bytes:
    return b"\r\n".join(
        [b"POST %s HTTP/1.1" % path, b"Host: example.test", b"Content-Length: %d" % length, *headers, b"", b""]
    )


@pytest_twisted.ensureDeferred
async def test_client_aborting_mid_upload_aborts_the_upstream_request(origin, gateway_for):
    """A client that resets its connection in the middle of an upload gets the upstream request abandoned: the
    origin sees its connection closed with the body unfinished, and never answers."""
    size = 64 * MiB
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port)
    client.send(_post(b"/sink", size))
    sender = client.send_body(size)
    seen = await within(origin.request_seen())
    await within(sender.written_at_least(MiB))
    client.abort()
    await within(origin.connections_lost(1))
    assert not seen.body_complete and not seen.finished
    assert 0 < seen.body_bytes < size
    await pools_settled(gateway)
    assert cached_connections(gateway) == []


@pytest_twisted.ensureDeferred
async def test_client_aborting_mid_download_closes_the_upstream_connection(origin, gateway_for):
    """A client that resets its connection in the middle of a large download gets the upstream connection
    closed (not pooled, not read to its end)."""
    size = 256 * MiB
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port)
    client.send(get(b"/bytes/%d" % size, close=False))
    seen = await within(origin.request_seen())
    await within(client.received_at_least(MiB))
    client.abort()
    await within(origin.connections_lost(1))
    assert not seen.finished
    assert seen.sent < size
    await pools_settled(gateway)
    assert cached_connections(gateway) == []


@pytest_twisted.ensureDeferred
async def test_client_that_stops_reading_for_ever_is_dropped_with_its_upstream(origin, gateway_for):
    """A client that stops reading a download for longer than the client send-stall timeout has its connection
    cut, and the upstream connection is closed too."""
    size = 256 * MiB
    gateway = gateway_for(gateway_config(origin.url, timeouts={"client_send_stall": "200ms"}))
    client = await connect(gateway.port)
    client.send(get(b"/bytes/%d" % size, close=False))
    seen = await within(origin.request_seen())
    await within(client.received_at_least(64 * 1024))
    client.pause()
    await within(origin.connections_lost(1))
    assert not seen.finished
    client.resume()  # a socket that reads nothing does not notice it was cut until it reads
    await within(client.closed)
    assert client.received < size
    assert not client.clean_close
    await pools_settled(gateway)


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_are_answered_in_order(origin, gateway_for):
    """Several requests sent in one write, the first with the largest answer, are answered in the order they
    were sent, each complete, over one client connection."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(
        get(b"/bytes/300000", close=False)
        + get(b"/status/201", close=False)
        + _post(b"/sink", 5)
        + b"hello"
        + get(b"/status/202", close=True)
    )
    await within(client.closed)
    responses = parse_responses(bytes(client.head))
    assert [r.status for r in responses] == [200, 201, 200, 202]
    assert all(r.complete for r in responses)
    assert responses[0].body == pattern_bytes(0, 300000)
    assert json.loads(responses[2].body) == {"bytes": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}
    assert responses[-1].rest == b""
    assert client.clean_close
    assert [s.uri for s in origin.seen] == [b"/bytes/300000", b"/status/201", b"/sink", b"/status/202"]
    await pools_settled(gateway)


@pytest_twisted.ensureDeferred
async def test_body_on_a_get_is_forwarded_and_the_connection_stays_in_step(origin, gateway_for):
    """A GET with a body (legal, if unusual) has the body forwarded to the upstream with its length, and the
    next request on the same connection is answered normally: the body is never read as a request."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    smuggled = b"GET /status/418 HTTP/1.1\r\nHost: example.test\r\n\r\n"
    client.send(get(b"/headers", b"Content-Length: %d" % len(smuggled), close=False) + smuggled)
    client.send(get(b"/status/200"))
    await within(client.closed)
    first, second = parse_responses(bytes(client.head))
    assert first.status == 200
    echo = json.loads(first.body)
    assert echo["method"] == "GET"
    assert ["Content-Length", str(len(smuggled))] in echo["headers"]
    assert (second.status, second.body) == (200, b"status body")
    assert [s.uri for s in origin.seen] == [b"/headers", b"/status/200"]
    assert origin.seen[0].body_bytes == len(smuggled) and origin.seen[0].body_complete
    assert origin.seen[0].sha256.hexdigest() == hashlib.sha256(smuggled).hexdigest()
    await pools_settled(gateway)


@pytest_twisted.ensureDeferred
async def test_expect_continue_with_the_body_sent_at_once_works(origin, gateway_for):
    """A client that sends `Expect: 100-continue` and then its body without waiting for the 100 gets its upload
    forwarded whole and answered; the Expect header is not passed upstream."""
    body = pattern_bytes(0, 300_000)
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(_post(b"/sink", len(body), b"Expect: 100-continue", b"Connection: close") + body)
    await within(client.closed)
    (response,) = parse_responses(bytes(client.head))
    assert response.status == 200 and response.complete
    assert json.loads(response.body) == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert bytes(client.head).count(b"HTTP/1.1 100") <= 1
    assert origin.seen[0].header(b"expect") == []
    await pools_settled(gateway)


@pytest_twisted.ensureDeferred
async def test_expect_continue_without_ever_sending_the_body_gets_408(origin, gateway_for):
    """A client that sends `Expect: 100-continue` and then never sends its body gets a 100, then a 408 once the
    client body-idle timeout passes; the upstream request is abandoned unfinished and both connections close."""
    gateway = gateway_for(
        gateway_config(origin.url, timeouts={"client_body_idle": "200ms"}, server={"lingering_timeout": "200ms"})
    )
    client = await connect(gateway.port, keep_all=True)
    client.send(_post(b"/sink", 1000, b"Expect: 100-continue"))
    seen = await within(origin.request_seen())
    await within(client.responses_received(1))
    assert bytes(client.head).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    problem = assert_problem(client, 408)
    assert "no request body bytes" in problem["detail"]
    await within(origin.connections_lost(1))
    assert not seen.body_complete and seen.body_bytes == 0
    await within(client.closed)
    await pools_settled(gateway)
