"""Request direction over real loopback sockets: uploads stream through whole, with backpressure and limits."""

from __future__ import annotations

import hashlib
import json

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from tests.support.clients import RawClient, connect, parse_responses, within
from tests.support.origin import pattern_bytes
from tests.support.running import gateway_config

MiB = 1024 * 1024


def _post(path: bytes, *headers: bytes, length: int | None = None, close: bool = True) -> bytes:
    """A POST head: Content-Length `length`, or chunked when `length` is None."""
    lines = [b"POST %s HTTP/1.1" % path, b"Host: example.test"]
    lines.append(b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length)
    lines += headers
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _pattern_sha256(n: int) -> str:
    digest = hashlib.sha256()
    for start in range(0, n, MiB):
        digest.update(pattern_bytes(start, min(MiB, n - start)))
    return digest.hexdigest()


def _sink_result(client: RawClient) -> dict[str, object]:
    response = client.response()
    assert response.status == 200, response
    assert response.complete
    result: dict[str, object] = json.loads(response.body)
    return result


def _limited(origin_url: str, limit: int, **sections: object) -> dict[str, object]:
    return gateway_config(origin_url, route={"limits": {"max_request_body_bytes": limit}}, **sections)


@pytest_twisted.ensureDeferred
async def test_content_length_upload_arrives_whole(origin, gateway_for):
    """An upload with Content-Length reaches the upstream whole, with the same length and SHA-256."""
    size = 8 * MiB + 123
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(_post(b"/sink", length=size))
    client.send_body(size)
    await within(client.closed, 30)
    assert _sink_result(client) == {"bytes": size, "sha256": _pattern_sha256(size)}
    seen = origin.seen[0]
    assert seen.body_complete
    assert seen.header(b"content-length") == [b"%d" % size]


_SMALL = b'{"small": "json body"}'


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: %d\r\n\r\n%s" % (len(_SMALL), _SMALL),
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(_SMALL), _SMALL),
    ],
    ids=["content-length", "chunked"],
)
@pytest_twisted.ensureDeferred
async def test_small_upload_sent_with_its_head_arrives_whole(origin, gateway_for, framing):
    """A small body that arrives with its head, complete before the upstream connection is even open, reaches
    the upstream whole."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(b"POST /sink HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n" + framing)
    await within(client.closed, 5)
    assert _sink_result(client) == {"bytes": len(_SMALL), "sha256": hashlib.sha256(_SMALL).hexdigest()}
    assert origin.seen[0].body_complete


@pytest_twisted.ensureDeferred
async def test_chunked_upload_arrives_whole(origin, gateway_for):
    """A chunked upload of chunks of many sizes reaches the upstream whole, with the same length and SHA-256."""
    sizes = [1, 10, 4095, 65536, 65537, MiB, 3 * MiB + 7, 2]
    body = pattern_bytes(0, sum(sizes))
    framed = bytearray()
    offset = 0
    for n in sizes:
        framed += b"%x\r\n%s\r\n" % (n, body[offset : offset + n])
        offset += n
    framed += b"0\r\n\r\n"
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(_post(b"/sink", length=None))
    client.send(bytes(framed))
    await within(client.closed, 30)
    assert _sink_result(client) == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert origin.seen[0].body_complete


@pytest_twisted.ensureDeferred
async def test_expect_100_continue_gets_continue_then_final_response(origin, gateway_for):
    """A client that sends `Expect: 100-continue` and waits gets `100 Continue`, then, after its body, the final
    response; the upstream never sees the Expect header."""
    size = 2 * MiB
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(_post(b"/sink", b"Expect: 100-continue", length=size))
    await within(client.until(lambda c: b"\r\n\r\n" in c.head, "an interim response arrived"))
    assert bytes(client.head).startswith(b"HTTP/1.1 100 Continue\r\n"), bytes(client.head)
    client.send_body(size)
    await within(client.closed, 30)
    assert _sink_result(client) == {"bytes": size, "sha256": _pattern_sha256(size)}
    assert origin.seen[0].header(b"expect") == []


@pytest_twisted.ensureDeferred
async def test_slow_upstream_stops_reading_the_client(origin, gateway_for):
    """An upstream that stops reading makes the gateway stop reading the client, so the bytes held in between
    stay bounded; once the upstream reads again the whole body arrives intact."""
    size = 64 * MiB
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(_post(b"/sink?hold=1", length=size))
    sender = client.send_body(size)
    seen = await within(origin.request_seen())
    # Without backpressure the gateway would read the whole body off the client into its memory at loopback
    # speed; give it a second to show that it does not (this wait is for something that must not happen).
    await task.deferLater(reactor, 1.0, lambda: None)
    assert sender.paused, "the client could still write: nothing pushed back"
    assert sender.written < 16 * MiB, f"the client got {sender.written} bytes away to a held upstream"
    assert seen.body_bytes < 1 * MiB
    assert not client.closed.called
    origin.release()
    await within(client.closed, 60)
    assert _sink_result(client) == {"bytes": size, "sha256": _pattern_sha256(size)}
    assert sender.written == size


@pytest_twisted.ensureDeferred
async def test_held_upload_outlives_the_idle_timeout(origin, gateway_for):
    """While the gateway holds a client's upload back for a slow upstream, the server's idle timeout does not
    close the client connection."""
    size = 16 * MiB
    gateway = gateway_for(gateway_config(origin.url, server={"idle_timeout": 0.3}))
    client = await connect(gateway.port, keep_all=True)
    client.send(_post(b"/sink?hold=1", length=size))
    sender = client.send_body(size)
    await within(origin.request_seen())
    await task.deferLater(reactor, 1.0, lambda: None)  # well past the idle timeout: nothing must happen
    assert sender.paused
    assert not client.closed.called, f"the client connection was closed: {client.reason}"
    origin.release()
    await within(client.closed, 30)
    assert _sink_result(client) == {"bytes": size, "sha256": _pattern_sha256(size)}


@pytest_twisted.ensureDeferred
async def test_declared_body_over_limit_gets_413_without_continue(origin, gateway_for):
    """A Content-Length over the route's limit is answered 413 at once, without `100 Continue`, and the upstream
    never hears of the request."""
    gateway = gateway_for(_limited(origin.url, MiB))
    client = await connect(gateway.port, keep_all=True)
    client.send(_post(b"/sink", b"Expect: 100-continue", b"X-Request-ID: too-big-1", length=10 * MiB))
    await within(client.responses_received(1))
    data = bytes(client.head)
    assert not data.startswith(b"HTTP/1.1 100"), data
    (response,) = parse_responses(data)
    assert response.status == 413
    assert response.header(b"content-type") == b"application/problem+json"
    assert response.header(b"connection") == b"close"
    problem = json.loads(response.body)
    assert problem["status"] == 413 and problem["request_id"] == "too-big-1"
    assert response.rest == b""
    assert origin.seen == [] and origin.accepted == 0
    client.transport.loseConnection()
    await within(client.closed)


@pytest_twisted.ensureDeferred
async def test_rejected_client_that_sends_no_body_is_let_go_after_lingering(origin, gateway_for):
    """A client answered 413 on its head that neither sends its body nor closes is disconnected once the
    lingering timeout is over, after the whole answer reached it."""
    gateway = gateway_for(_limited(origin.url, MiB, server={"lingering_timeout": 0.3}))
    client = await connect(gateway.port, keep_all=True)
    client.send(_post(b"/sink", b"Expect: 100-continue", length=10 * MiB, close=False))
    await within(client.responses_received(1))
    await within(client.closed, 5)
    (response,) = parse_responses(bytes(client.head))
    assert response.status == 413 and response.complete and response.rest == b""
    assert origin.seen == []


@pytest_twisted.ensureDeferred
async def test_declared_body_over_limit_sent_anyway_is_discarded_and_closed_cleanly(origin, gateway_for):
    """A client that sends an over-limit body without waiting reads the whole 413, then a clean close (no reset),
    and the upstream never hears of the request."""
    size = 16 * MiB
    gateway = gateway_for(_limited(origin.url, MiB))
    client = await connect(gateway.port, keep_all=True)
    client.send(_post(b"/sink", length=size))
    sender = client.send_body(size)
    await within(client.closed, 30)
    (response,) = parse_responses(bytes(client.head))
    assert response.status == 413 and response.complete and response.rest == b""
    assert client.clean_close, client.reason
    # The gateway half-closed after its answer (lingering close), so the client could stop sending early.
    assert 0 < sender.written <= size
    assert origin.seen == [] and origin.accepted == 0


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_limit_gets_413_and_upstream_sees_it_cut(origin, gateway_for):
    """A chunked body that crosses the body limit mid-stream gets 413, and the upstream sees its request body
    end unfinished and its connection closed."""
    limit = MiB
    gateway = gateway_for(_limited(origin.url, limit))
    client = await connect(gateway.port, keep_all=True)
    client.send(_post(b"/sink", length=None))
    seen = await within(origin.request_seen())  # the upstream request is under way before any body byte
    client.send_body(8 * MiB, chunked=True)
    await within(client.responses_received(1), 30)
    (response,) = parse_responses(bytes(client.head))
    assert response.status == 413
    assert response.header(b"connection") == b"close"
    await within(seen.connection_lost, 5)
    assert not seen.body_complete
    assert seen.body_bytes <= limit
    await within(client.closed, 30)
    assert parse_responses(bytes(client.head))[0].rest == b""


@pytest_twisted.ensureDeferred
async def test_client_abort_mid_upload_closes_upstream(origin, gateway_for):
    """A client that goes away mid-upload makes the gateway close the upstream connection at once, with the
    request body unfinished."""
    size = 64 * MiB
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port)
    client.send(_post(b"/sink", length=size))
    sender = client.send_body(size)
    seen = await within(origin.request_seen())
    await within(sender.written_at_least(4 * MiB))
    client.abort()
    await within(seen.connection_lost, 5)
    assert not seen.body_complete
    assert 0 < seen.body_bytes < size
