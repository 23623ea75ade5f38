"""Failures over real loopback sockets: every broken upstream or client gets a status, or a cut connection that
cannot be mistaken for a complete response, and nothing is left open."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList

from tests.support.clients import RawClient, connect, parse_responses, within
from tests.support.faults import assert_problem
from tests.support.origin import pattern_bytes
from tests.support.running import gateway_config

MiB = 1024 * 1024


def _get(path: bytes, *headers: bytes, close: bool = True) -> bytes:
    lines = [b"GET %s HTTP/1.1" % path, b"Host: example.test", *headers]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A loopback port whose listener never accepts and whose accept queue is full, so that the kernel drops
    further SYNs: a connection attempt there neither succeeds nor fails, as with a black-holed host."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            fillers.append(filler)
            assert filler.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS)
        yield port
    finally:
        for s in [*fillers, listener]:
            s.close()


@pytest_twisted.ensureDeferred
async def test_connect_timeout_gets_504(unanswered_port, gateway_for):
    """An upstream whose connection does not open within the connect timeout gets the client a 504."""
    config = gateway_config(f"http://127.0.0.1:{unanswered_port}", timeouts={"connect": 0.2})
    gateway = gateway_for(config)
    client = await connect(gateway.port, keep_all=True)
    client.send(_get(b"/anything"))
    await within(client.closed, 5)
    problem = assert_problem(client, 504)
    assert "could not connect" in str(problem["detail"])


@pytest_twisted.ensureDeferred
async def test_response_headers_timeout_gets_504_and_closes_upstream(origin, gateway_for):
    """An upstream that sends no response head within the response-headers timeout gets the client a 504, and
    its connection is closed."""
    gateway = gateway_for(gateway_config(origin.url, timeouts={"response_headers": 0.3}))
    client = await connect(gateway.port, keep_all=True)
    client.send(_get(b"/stall"))
    seen = await within(origin.request_seen())
    await within(client.closed, 5)
    assert_problem(client, 504)
    await within(seen.connection_lost, 5)


@pytest_twisted.ensureDeferred
async def test_response_headers_timeout_gives_the_upstream_slot_back(origin, gateway_for):
    """A request answered 504 for want of response headers frees its upstream slot, so the next request to a
    one-connection upstream is served rather than queued until it too is refused."""
    config = gateway_config(
        origin.url,
        timeouts={"response_headers": 0.3},
        upstream={"max_connections": 1, "max_queue": 1, "queue_timeout": 2},
    )
    gateway = gateway_for(config)
    first = await connect(gateway.port, keep_all=True)
    first.send(_get(b"/stall"))
    await within(first.closed, 5)
    assert_problem(first, 504)
    second = await connect(gateway.port, keep_all=True)
    second.send(_get(b"/status/200"))
    await within(second.closed, 5)
    (response,) = parse_responses(bytes(second.head))
    assert (response.status, response.body) == (200, b"status body")


@pytest_twisted.ensureDeferred
async def test_client_gone_before_response_head_closes_upstream(origin, gateway_for):
    """A client that goes away while the upstream has not answered yet makes the gateway close the upstream
    connection at once."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port)
    client.send(_get(b"/stall"))
    seen = await within(origin.request_seen())
    client.abort()
    await within(seen.connection_lost, 5)


@pytest_twisted.ensureDeferred
async def test_upstream_that_stops_reading_the_body_gets_504(origin, gateway_for):
    """An upstream that takes no more of the request body for longer than the upstream send-stall timeout gets
    the client a 504, and the upstream connection is closed with the body unfinished."""
    size = 64 * MiB
    gateway = gateway_for(gateway_config(origin.url, timeouts={"upstream_send_stall": 0.3}))
    client = await connect(gateway.port, keep_all=True)
    client.send(b"POST /sink?hold=1 HTTP/1.1\r\nHost: example.test\r\nContent-Length: %d\r\n\r\n" % size)
    client.send_body(size)
    seen = await within(origin.request_seen())
    await within(client.responses_received(1), 5)
    problem = assert_problem(client, 504)
    assert "stopped reading" in str(problem["detail"])
    origin.release()  # a held origin reads nothing, so it only notices its connection is gone once it reads
    await within(seen.connection_lost, 5)
    assert not seen.body_complete
    await within(client.closed, 10)


@pytest_twisted.ensureDeferred
async def test_client_that_stops_sending_its_body_gets_408(origin, gateway_for):
    """A client that sends no body bytes for longer than the client body-idle timeout gets a 408, and the
    upstream connection is closed with the body unfinished."""
    gateway = gateway_for(
        gateway_config(origin.url, timeouts={"client_body_idle": 0.3}, server={"lingering_timeout": 0.3})
    )
    client = await connect(gateway.port, keep_all=True)
    client.send(b"POST /sink HTTP/1.1\r\nHost: example.test\r\nContent-Length: 100000\r\n\r\n")
    client.send(pattern_bytes(0, 1000))
    seen = await within(origin.request_seen())
    await within(client.responses_received(1), 5)
    assert_problem(client, 408)
    await within(seen.connection_lost, 5)
    assert not seen.body_complete
    assert seen.body_bytes <= 1000
    await within(client.closed, 5)


@pytest_twisted.ensureDeferred
async def test_invalid_status_line_gets_502(origin, gateway_for):
    """An upstream answering with an invalid status line gets the client a 502."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(_get(b"/bad-status"))
    await within(client.closed, 5)
    assert_problem(client, 502)


@pytest_twisted.ensureDeferred
async def test_truncated_content_length_body_cuts_the_client(origin, gateway_for):
    """An upstream body cut short of its Content-Length makes the gateway cut the (keep-alive) client
    connection, so the response can never look complete and the connection is not reused."""
    n = 100_000
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(_get(b"/truncate/%d" % n, close=False))
    await within(client.closed, 5)
    (response,) = parse_responses(bytes(client.head))
    assert response.status == 200
    assert response.header(b"content-length") == b"%d" % (2 * n)
    assert len(response.body) < 2 * n
    assert response.body == pattern_bytes(0, len(response.body))
    assert not response.complete
    assert not client.clean_close, "a cut response must not end like a complete one"


@pytest_twisted.ensureDeferred
async def test_truncated_chunked_body_gets_no_terminator(origin, gateway_for):
    """An upstream chunked body that ends without its terminator reaches the client without one either, and the
    client connection is cut."""
    n = 100_000
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(_get(b"/truncate/%d?chunked=1" % n, close=False))
    await within(client.closed, 5)
    (response,) = parse_responses(bytes(client.head))
    assert response.status == 200
    assert response.header(b"transfer-encoding") == b"chunked"
    assert not response.complete
    assert response.body == pattern_bytes(0, len(response.body))
    assert not bytes(client.head).endswith(b"0\r\n\r\n")
    assert not client.clean_close


@pytest.mark.parametrize("query", [b"reset=1", b"chunked=1&reset=1"], ids=["content-length", "chunked"])
@pytest_twisted.ensureDeferred
async def test_upstream_reset_mid_body_cuts_the_client(origin, gateway_for, query):
    """An upstream connection reset mid-body makes the gateway cut the client connection, the response
    incomplete."""
    n = 100_000
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(_get(b"/truncate/%d?%s" % (n, query), close=False))
    await within(client.closed, 5)
    (response,) = parse_responses(bytes(client.head))
    assert response.status == 200
    assert not response.complete
    assert response.body == pattern_bytes(0, len(response.body))
    assert not client.clean_close


@pytest_twisted.ensureDeferred
async def test_upstream_stalling_mid_body_cuts_the_client(origin, gateway_for):
    """An upstream that stops sending mid-body for longer than the upstream idle timeout makes the gateway cut
    the client connection and close the upstream one."""
    gateway = gateway_for(gateway_config(origin.url, timeouts={"upstream_idle": 0.3}))
    client = await connect(gateway.port, keep_all=True)
    client.send(_get(b"/stall-body/1000", close=False))
    seen = await within(origin.request_seen())
    await within(client.closed, 5)
    (response,) = parse_responses(bytes(client.head))
    assert response.status == 200
    assert response.body == pattern_bytes(0, 1000)
    assert not response.complete
    assert not client.clean_close
    await within(seen.connection_lost, 5)


@pytest_twisted.ensureDeferred
async def test_client_that_stops_reading_too_long_is_dropped(origin, gateway_for):
    """A client that reads nothing for longer than the client send-stall timeout is dropped, and the upstream
    connection is closed."""
    size = 256 * MiB
    gateway = gateway_for(gateway_config(origin.url, timeouts={"client_send_stall": 0.3}))
    client = await connect(gateway.port)
    client.send(_get(b"/bytes/%d" % size))
    client.pause()
    seen = await within(origin.request_seen())
    await within(seen.connection_lost, 5)
    assert not seen.finished
    client.resume()  # a paused socket does not notice it was cut until it reads
    await within(client.closed, 10)
    assert client.received < size
    assert not client.clean_close


@pytest_twisted.ensureDeferred
async def test_full_queue_gets_503_at_once(origin, gateway_for):
    """With every upstream connection busy and the queue full, one more request gets 503 at once, while the
    queued one keeps waiting."""
    gateway = gateway_for(gateway_config(origin.url, upstream={"max_connections": 1, "max_queue": 1}))
    first = await connect(gateway.port, keep_all=True)
    first.send(_get(b"/stall"))
    await within(origin.request_seen())
    second = await connect(gateway.port, keep_all=True)
    third = await connect(gateway.port, keep_all=True)
    second.send(_get(b"/stall"))
    third.send(_get(b"/stall"))
    # Which of the two is queued depends on which the gateway reads first; the other is refused.
    answered = await within(_first_to_answer(second, third), 5)
    waiting = third if answered is second else second
    assert_problem(answered, 503)
    assert waiting.received == 0
    assert gateway.pool().queued == 1
    assert len(origin.seen) == 1
    assert first.received == 0


def _first_to_answer(*clients: RawClient) -> Deferred[RawClient]:
    """Fires with whichever of `clients` first has a complete response."""
    waits = [c.responses_received(1) for c in clients]

    def first(result: tuple[object, int]) -> RawClient:
        for w in waits:
            if not w.called:
                w.cancel()
        return clients[result[1]]

    both = DeferredList(waits, fireOnOneCallback=True, fireOnOneErrback=True, consumeErrors=True)
    return both.addCallback(first)


@pytest_twisted.ensureDeferred
async def test_early_upstream_answer_during_upload_ends_cleanly(origin, gateway_for):
    """An upstream that answers while the client is still uploading gets that answer to the client complete,
    with Connection: close and nothing after it, and the connection ends without a reset."""
    size = 64 * MiB
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(b"POST /early/413 HTTP/1.1\r\nHost: example.test\r\nContent-Length: %d\r\n\r\n" % size)
    sender = client.send_body(size)
    await within(client.closed, 30)
    responses = parse_responses(bytes(client.head))
    assert [r.status for r in responses] == [413], bytes(client.head)[:500]
    (response,) = responses
    assert response.complete and response.body == b'{"early": true}'
    assert response.header(b"connection") == b"close"
    assert response.rest == b""
    assert client.clean_close, client.reason
    # The gateway half-closed after its answer (lingering close), so the client could stop uploading early.
    assert 0 < sender.written <= size


@pytest_twisted.ensureDeferred
async def test_no_route_gets_404_and_upstream_sees_nothing(origin, gateway_for):
    """A request that matches no route gets a 404 problem, and the upstream never hears of it."""
    gateway = gateway_for(gateway_config(origin.url, route={"path_prefix": "/only"}))
    client = await connect(gateway.port, keep_all=True)
    client.send(_get(b"/elsewhere/only"))
    await within(client.closed, 5)
    assert_problem(client, 404)
    assert origin.seen == [] and origin.accepted == 0
