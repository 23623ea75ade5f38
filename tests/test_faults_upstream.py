"""Upstreams that misbehave, over real loopback sockets: a real gateway in front of the fault-injecting origin.

Each fault ends in a defined state: a 502/504 problem before the response head was sent, or a cut client
connection (never a clean end, never a chunked terminator) after it; and afterwards no request holds an upstream
slot and the pool holds only idle, reading connections (the autouse fixture checks sockets and DelayedCalls).
Timeouts are set in milliseconds so the tests finish quickly; every assertion is about what happened, never how
fast, and every wait is bounded.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted

from tests.support.clients import RawClient, connect, parse_response, parse_responses, within
from tests.support.faults import assert_problem, cached_connections, get, pools_settled
from tests.support.origin import FORGED, pattern_bytes
from tests.support.running import gateway_config
from tests.support.scrape import lines_logged


def _assert_cut(client: RawClient, status: int = 200) -> bytes:
    """The client got the head of a `status` response and part of its body, then a cut connection: nothing
    that could pass for a complete response. Returns the body bytes received."""
    responses = parse_responses(bytes(client.head))
    assert [r.status for r in responses] == [status], bytes(client.head)[:300]
    (response,) = responses
    assert not response.complete
    assert not bytes(client.head).endswith(b"0\r\n\r\n")
    assert not client.clean_close, "a cut response must not end like a complete one"
    return response.body


@pytest.fixture
def refused_port() -> int:
    """A loopback port that was just bound and closed again: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest_twisted.ensureDeferred
async def test_upstream_refusing_the_connection_gets_502(refused_port, gateway_for):
    """An upstream that refuses the TCP connection gets the client a 502 problem, whose request id is the one
    generated for the request, and leaves no slot held."""
    gateway = gateway_for(gateway_config(f"http://127.0.0.1:{refused_port}"))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/anything"))
    await within(client.closed)
    problem = assert_problem(client, 502)
    assert "could not connect" in problem["detail"]
    assert len(str(problem["request_id"])) == 32
    await pools_settled(gateway)


@pytest_twisted.ensureDeferred
async def test_an_upstream_given_as_a_url_is_named_by_its_route_in_answers_and_by_its_address_in_the_log(
    refused_port, gateway_for, tmp_path
):
    """A route that gives its upstream as a URL: the 502 names the route, never the address (it would tell a
    client the inner network's layout); the access log names the address for the operator."""
    url = f"http://127.0.0.1:{refused_port}"
    data = gateway_config(url, route={"name": "reports", "upstream": url}, access_log={"path": str(tmp_path / "a")})
    del data["upstreams"]
    gateway = gateway_for(data)
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/anything"))
    await within(client.closed)
    problem = assert_problem(client, 502)
    assert problem["detail"] == "could not connect to the upstream of route reports"
    assert str(refused_port).encode() not in bytes(client.head)
    [line] = await lines_logged(tmp_path / "a", 1)
    assert (line["route"], line["upstream"], line["status"]) == ("reports", url, 502)
    await pools_settled(gateway)


@pytest_twisted.ensureDeferred
async def test_a_named_upstream_is_named_in_answers(refused_port, gateway_for):
    """An upstream declared by name is named by that name in answers (the operator chose it; it is no address)."""
    gateway = gateway_for(gateway_config(f"http://127.0.0.1:{refused_port}"))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/anything"))
    await within(client.closed)
    assert assert_problem(client, 502)["detail"] == "could not connect to upstream origin"
    await pools_settled(gateway)


@pytest_twisted.ensureDeferred
async def test_upstream_accepting_and_never_answering_gets_504(origin, gateway_for):
    """An upstream that accepts the request and never answers gets the client a 504 once the response-headers
    timeout passes, and its connection is closed rather than pooled."""
    gateway = gateway_for(gateway_config(origin.url, timeouts={"response_headers": "200ms"}))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/stall", close=False))
    await within(client.responses_received(1))
    problem = assert_problem(client, 504)
    assert "no response headers" in problem["detail"]
    await within(origin.connections_lost(1))
    await pools_settled(gateway)
    assert cached_connections(gateway) == []


@pytest_twisted.ensureDeferred
async def test_upstream_stalling_after_its_head_cuts_the_client(origin, gateway_for):
    """An upstream that sends its head and part of the body, then nothing, gets the client connection cut once
    the upstream-idle timeout passes (never a clean end), and the upstream connection closed."""
    gateway = gateway_for(gateway_config(origin.url, timeouts={"upstream_idle": "200ms"}))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/stall-body/1000", close=False))
    await within(client.closed)
    assert _assert_cut(client) == pattern_bytes(0, 1000)
    await within(origin.connections_lost(1))
    await pools_settled(gateway)


@pytest.mark.parametrize("query", [b"reset=1", b"chunked=1&reset=1"], ids=["content-length", "chunked"])
@pytest_twisted.ensureDeferred
async def test_upstream_resetting_mid_body_cuts_the_client(origin, gateway_for, query):
    """An upstream connection reset in the middle of the body gets the client connection cut, with what was
    relayed a correct prefix of the body."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/truncate/100000?" + query, close=False))
    await within(client.closed)
    body = _assert_cut(client)
    assert body == pattern_bytes(0, len(body))
    await pools_settled(gateway)
    assert cached_connections(gateway) == []


@pytest.mark.parametrize("query", [b"", b"?chunked=1"], ids=["content-length", "chunked"])
@pytest_twisted.ensureDeferred
async def test_upstream_sending_fewer_bytes_then_closing_cuts_the_client(origin, gateway_for, query):
    """An upstream that closes before its body is complete (fewer bytes than its Content-Length, or no chunked
    terminator) gets the client connection cut, and the client never sees a chunked terminator."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/truncate/100000" + query, close=False))
    await within(client.closed)
    body = _assert_cut(client)
    assert len(body) <= 100_000
    assert body == pattern_bytes(0, len(body))
    await pools_settled(gateway)
    assert cached_connections(gateway) == []


@pytest.mark.parametrize("late", [False, True], ids=["same-write", "while-pooled"])
@pytest_twisted.ensureDeferred
async def test_upstream_sending_more_than_its_content_length_is_not_reused(origin, gateway_for, late):
    """Bytes an upstream sends past its Content-Length (here a whole forged response) never reach the client and
    are never taken as the answer to a later request: the client gets exactly the declared body, the upstream
    connection is closed rather than pooled, and the next request goes over a new connection."""
    n = 1000
    # Idle pooled connections are kept far longer than the test's waits: only the gateway's noticing the
    # extra bytes can close this one.
    gateway = gateway_for(gateway_config(origin.url, upstream={"idle_timeout": "10m"}))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/overlong/%d%s" % (n, b"?later=1" if late else b""), close=False))
    await within(client.responses_received(1))
    if late:
        await pools_settled(gateway)
        assert len(cached_connections(gateway)) == 1  # idle in the pool when the extra bytes come
        origin.inject_faults()
    await within(origin.connections_lost(1), 5)  # the gateway closed the out-of-step connection
    client.send(get(b"/status/200"))
    await within(client.closed)
    first, second = parse_responses(bytes(client.head))
    assert (first.status, first.body, first.complete) == (200, pattern_bytes(0, n), True)
    assert (second.status, second.body, second.complete) == (200, b"status body", True)
    assert second.header(b"x-forged") is None and second.rest == b""
    assert FORGED not in bytes(client.head)
    assert origin.accepted == 2
    await pools_settled(gateway)


@pytest_twisted.ensureDeferred
async def test_upstream_sending_an_invalid_status_line_gets_502(origin, gateway_for):
    """An upstream answering with an invalid status line gets the client a 502, and its connection closed."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/bad-status"))
    await within(client.closed)
    assert_problem(client, 502)
    await within(origin.connections_lost(1))
    await pools_settled(gateway)


@pytest.mark.parametrize(
    "size", [b"zz", b"10000000000000003", b"1" + b"0" * 40], ids=["not-hex", "17-digits", "41-digits"]
)
@pytest_twisted.ensureDeferred
async def test_upstream_invalid_chunking_after_the_head_was_relayed_cuts_the_client(origin, gateway_for, size):
    """An invalid chunk-size line arriving after the response head and a first chunk reached the client gets
    the client connection cut at once (that chunk relayed, no terminator), and the upstream connection closed.
    A size no 64-bit parser holds is invalid too (llhttp's check): the data after it is not relayed as if it were
    that chunk, nor is the connection left open until the upstream idle timeout."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/bad-chunking/1000?later=1&size=" + size, close=False))
    await within(client.until(lambda c: len(parse_responses(bytes(c.head))) == 1, "the head and first chunk came"))
    await within(client.until(lambda c: c.response().body == pattern_bytes(0, 1000), "the first chunk came"))
    origin.inject_faults()
    await within(client.closed)
    assert _assert_cut(client) == pattern_bytes(0, 1000)
    await within(origin.connections_lost(1))
    await pools_settled(gateway)


@pytest_twisted.ensureDeferred
async def test_upstream_invalid_chunking_in_its_first_read_cuts_the_client(origin, gateway_for):
    """An invalid chunk-size line in the same write as the response head: the gateway has begun its response
    by then, so the client connection is cut (with at most a head and part of the body), never ended cleanly;
    the upstream connection is closed."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/bad-chunking/1000", close=False))
    await within(client.closed)
    assert not client.clean_close
    responses = parse_responses(bytes(client.head))
    assert [(r.status, r.complete) for r in responses] in ([], [(200, False)])
    await within(origin.connections_lost(1))
    await pools_settled(gateway)


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
@pytest.mark.parametrize(
    "value",
    [
        b"9223372036854775808",
        b"18446744073709551619",
        b"9" * 30,
        b"9" * 5000,
        b"0" * 5000 + b"9223372036854775808",
        b"1234567890,%201234567",
        b"7,%207",
        b"12345678901234567x",
    ],
    ids=["2^63", "2^64+3", "30-digits", "5000-digits", "leading-zeros-2^63", "list-differing", "list", "not-digits"],
)
@pytest_twisted.ensureDeferred
async def test_upstream_content_length_that_is_no_64_bit_length_gets_502(origin, gateway_for, value, method):
    """A response Content-Length over 2^63 - 1 or not a length at all is a broken upstream: 502 before anything
    is relayed (a client would read it its own way), the upstream connection closed and its slot given back. So
    it is for a HEAD response, whose Content-Length frames nothing but is relayed (and which Agent never reads)."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/content-length?value=" + value, method=method))
    await within(client.closed)
    if method == b"HEAD":
        assert parse_response(bytes(client.head), head_request=True).status == 502
    else:
        assert_problem(client, 502)
    await within(origin.connections_lost(1))
    await pools_settled(gateway)


@pytest.mark.parametrize(
    ("method", "value", "length"),
    [
        (b"GET", b"0" * 5000 + b"2", b"2"),
        (b"HEAD", b"0" * 5000 + b"2", b"0" * 5000 + b"2"),
        (b"HEAD", b"9223372036854775807", b"9223372036854775807"),
    ],
    ids=["leading-zeros", "leading-zeros-head", "2^63-1-head"],
)
@pytest_twisted.ensureDeferred
async def test_upstream_content_length_that_is_a_length_is_relayed(origin, gateway_for, method, value, length):
    """What is a length up to 2^63 - 1 passes: 5,000 zeros and a 2 is a body of 2 bytes (relayed with its
    framing, "2"); a HEAD answer relays the upstream's Content-Length as sent, leading zeros or the largest length
    taken (a list, even of one value repeated, is refused: llhttp takes none)."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/content-length?value=" + value, method=method))
    await within(client.closed)
    response = parse_response(bytes(client.head), head_request=method == b"HEAD")
    assert (response.status, response.header(b"content-length")) == (200, length)
    assert response.body == (b"" if method == b"HEAD" else b"ok")


@pytest.mark.parametrize(
    "line",
    [
        b"HTTP/1.1 -1 OK",
        b"HTTP/1.1 +20 OK",
        b"HTTP/1.1 099 OK",
        b"HTTP/1.1 1000 OK",
        b"HTTP/1.18446744073709551617 200 OK",
    ],
    ids=["negative", "plus", "below-100", "four-digits", "version-overflow"],
)
@pytest_twisted.ensureDeferred
async def test_upstream_status_line_a_client_would_read_otherwise_gets_502(origin, gateway_for, line):
    """Agent takes a status of "-1", "+20" or "1000" and a version of any size; the gateway would write them
    back to the client (the status line, Via). A broken upstream: 502, its connection closed."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/status-line?line=" + line.replace(b" ", b"%20").replace(b"+", b"%2B")))
    await within(client.closed)
    assert_problem(client, 502)
    await within(origin.connections_lost(1))
    await pools_settled(gateway)


@pytest_twisted.ensureDeferred
async def test_upstream_transfer_coding_nobody_can_frame_gets_502(origin, gateway_for):
    """An upstream response whose transfer coding cannot be framed (gzip without chunked), found before the
    response head was relayed, gets the client a 502 and the upstream connection closed."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/bad-transfer-coding"))
    await within(client.closed)
    assert_problem(client, 502)
    await within(origin.connections_lost(1))
    await pools_settled(gateway)


@pytest.mark.parametrize("path", [b"/huge-headers/1048576", b"/huge-headers/65536?line=1"], ids=["many", "one-line"])
@pytest_twisted.ensureDeferred
async def test_upstream_huge_response_headers_get_502(origin, gateway_for, path):
    """An upstream response head far over any sane size (1 MiB of header lines, or one 64 KiB line) gets the
    client a 502 without relaying any of it, and the upstream connection closed."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(path))
    await within(client.closed)
    problem = assert_problem(client, 502)
    assert b"X-Filler" not in bytes(client.head) and b"X-Huge" not in bytes(client.head)
    assert problem["status"] == 502
    await within(origin.connections_lost(1))
    await pools_settled(gateway)


@pytest_twisted.ensureDeferred
async def test_response_headers_of_ordinary_size_are_relayed(origin, gateway_for):
    """A response head of a few KiB (the size real services send) is relayed whole: the head limit is not a
    trap for ordinary responses."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/huge-headers/8192"))
    await within(client.closed)
    (response,) = parse_responses(bytes(client.head))
    assert (response.status, response.body, response.complete) == (200, b"ok", True)
    assert len([k for k, _ in response.headers if k.startswith(b"X-Filler")]) == 9


@pytest_twisted.ensureDeferred
async def test_pooled_connection_the_upstream_closed_while_idle_is_not_used(origin, gateway_for):
    """A keep-alive connection the upstream closes while it sits idle in the pool is dropped from it: the next
    request gets its answer over a new connection."""
    gateway = gateway_for(gateway_config(origin.url))
    first = await connect(gateway.port, keep_all=True)
    first.send(get(b"/close-idle"))
    await within(first.closed)
    assert parse_responses(bytes(first.head))[0].body == b"close-idle"
    await within(origin.connections_lost(1))
    second = await connect(gateway.port, keep_all=True)
    second.send(get(b"/status/200"))
    await within(second.closed)
    (response,) = parse_responses(bytes(second.head))
    assert (response.status, response.body) == (200, b"status body")
    assert origin.accepted == 2
    await pools_settled(gateway)


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"DELETE"])
@pytest_twisted.ensureDeferred
async def test_pooled_connection_closed_as_it_is_reused_is_retried_for_an_idempotent_request(
    origin, gateway_for, method
):
    """A pooled keep-alive connection the upstream closes just as a body-less idempotent request arrives on it
    (the request never answered) is retried once over a new connection, as Agent's pool does: the client gets
    the answer, not an error."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/close-next", close=False))
    await within(client.responses_received(1))
    await pools_settled(gateway)
    assert len(cached_connections(gateway)) == 1
    client.send(get(b"/status/200", method=method))
    await within(client.closed)
    first = parse_response(bytes(client.head))
    second = parse_response(first.rest, head_request=method == b"HEAD")
    assert (first.status, first.body) == (200, b"close-next")
    assert (second.status, second.complete, second.rest) == (200, True, b"")
    assert second.body == (b"" if method == b"HEAD" else b"status body")
    assert [s.uri for s in origin.seen] == [b"/close-next", b"/status/200", b"/status/200"]
    assert origin.accepted == 2
    await pools_settled(gateway)


@pytest_twisted.ensureDeferred
async def test_pooled_connection_closed_as_it_is_reused_gets_502_for_an_upload(origin, gateway_for):
    """A pooled keep-alive connection the upstream closes just as a request with a body arrives on it is not
    retried (the body may have been consumed): the client gets a 502, and the upstream sees the request only
    once."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/close-next", close=False))
    await within(client.responses_received(1))
    await pools_settled(gateway)
    client.send(b"POST /sink HTTP/1.1\r\nHost: example.test\r\nContent-Length: 5\r\n\r\nhello")
    await within(client.responses_received(2))
    first, second = parse_responses(bytes(client.head))
    assert first.status == 200
    assert second.status == 502 and second.complete
    assert second.header(b"content-type") == b"application/problem+json"
    assert [s.uri for s in origin.seen] == [b"/close-next", b"/sink"]
    await pools_settled(gateway)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest_twisted.ensureDeferred
async def test_upstream_answering_before_reading_the_upload_is_relayed_with_close(origin, gateway_for, chunked):
    """An upstream that answers on the request head, without reading the upload, has its answer relayed
    complete with Connection: close; nothing follows it, the connection ends cleanly, and the upstream
    connection is not pooled."""
    size = 16 * 1024 * 1024
    gateway = gateway_for(gateway_config(origin.url, server={"lingering_timeout": "2s"}))
    client = await connect(gateway.port, keep_all=True)
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
    client.send(b"POST /early/413 HTTP/1.1\r\nHost: example.test\r\n%s\r\n\r\n" % framing)
    client.send_body(size, chunked=chunked)
    await within(client.closed, 30)
    responses = parse_responses(bytes(client.head))
    assert [r.status for r in responses] == [413], bytes(client.head)[:500]
    (response,) = responses
    assert response.complete and response.body == b'{"early": true}'
    assert response.header(b"connection") == b"close"
    assert response.rest == b""
    assert client.clean_close, client.reason
    await within(origin.connections_lost(1))
    await pools_settled(gateway)
    assert cached_connections(gateway) == []
