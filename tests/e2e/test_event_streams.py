"""Endless responses over real loopback sockets: a server-sent event stream lives as long as its upstream sends a
byte within the route's `timeouts.upstream_idle` (no total-time limit), and is cut, never finished as if complete,
once it goes quiet for longer."""

from __future__ import annotations

import pytest_twisted

from tests.support.clients import connect, parse_responses, within
from tests.support.running import gateway_config

BEATS = 25
EVERY = 0.1
IDLE = 1.0
"""Heartbeats every 0.1 s against a 1 s idle timeout: the stream runs 2.5 s, past the timeout twice over, with a
tenfold margin for a slow machine; then it goes quiet and is cut a second later."""


@pytest_twisted.ensureDeferred
async def test_an_event_stream_with_heartbeats_outlives_its_idle_timeout_then_is_cut_when_quiet(origin, gateway_for):
    """Every heartbeat reaches the client as it is sent, for longer than the idle timeout; once the upstream stops
    sending, the client connection is cut (no chunked terminator) and the upstream connection closed."""
    gateway = gateway_for(gateway_config(origin.url, route={"timeouts": {"upstream_idle": IDLE}}))
    client = await connect(gateway.port, keep_all=True)
    client.send(b"GET /events?beats=%d&every=%g HTTP/1.1\r\nHost: example.test\r\n\r\n" % (BEATS, EVERY))
    seen = await within(origin.request_seen())
    await within(client.until(lambda c: bytes(c.head).count(b": heartbeat") == BEATS, "every heartbeat came"), 30)
    assert client.reason is None, "the stream was cut while its upstream was still sending"
    await within(client.closed, 10)
    (response,) = parse_responses(bytes(client.head))
    assert response.status == 200
    assert response.header(b"Content-Type") == b"text/event-stream"
    assert response.body == b"retry: 1000\n\n" + b": heartbeat\n\n" * BEATS
    assert not response.complete, "a stream cut by the idle timeout must not look finished"
    assert not client.clean_close
    await within(seen.connection_lost, 5)
