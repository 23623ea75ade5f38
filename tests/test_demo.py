"""The demo upstream (`gateway.demo`): reports, uploads and events as documented, in this process on 127.0.0.1:0,
and in memory (a `StringTransport` client, time on a `Clock`) where pacing, backpressure and memory are the point."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from collections.abc import AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.demo import make_factory, report_chunks
from tests.support.clients import Parsed, connect, parse_response, parse_responses, within
from tests.support.memory import disconnect

CSV_HEADER = b"id,region,product,amount,status"


@pytest_twisted.async_yield_fixture()
async def demo() -> AsyncIterator[int]:
    """The demo listening on a free loopback port; its port number."""
    port = reactor.listenTCP(0, make_factory(reactor), interface="127.0.0.1")
    yield port.getHost().port
    await port.stopListening()


async def exchange(port: int, request: bytes, *, head_request: bool = False) -> tuple[Parsed, bytes]:
    """Send `request` (which asks for `Connection: close`) and read until the demo closes; the parsed response
    and every byte received."""
    client = await connect(port, keep_all=True)
    client.send(request)
    await within(client.closed)
    assert client.clean_close
    return client.response(head_request=head_request), bytes(client.head)


def get(target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: demo.test\r\nConnection: close\r\n\r\n".encode()


def chunked(body: bytes, size: int) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def upload_body(n: int) -> bytes:
    return hashlib.sha256(b"seed").digest() * (n // 32) + b"x" * (n % 32)


@pytest_twisted.ensureDeferred
async def test_report_has_exact_size_with_content_length(demo: int) -> None:
    """`/report?size=N` sends exactly N bytes of CSV with `Content-Length: N`."""
    response, _ = await exchange(demo, get("/report?size=200003"))
    assert response.status == 200
    assert response.header(b"content-length") == b"200003"
    assert response.header(b"transfer-encoding") is None
    assert response.header(b"content-type") == b"text/csv"
    assert response.complete
    assert len(response.body) == 200003
    assert response.rest == b""


@pytest_twisted.ensureDeferred
async def test_report_starts_with_the_csv_header_line(demo: int) -> None:
    """The report's first line is the CSV header, and the next one a 64-byte data row."""
    response, _ = await exchange(demo, get("/report?size=4096"))
    lines = response.body.split(b"\n")
    assert lines[0].rstrip() == CSV_HEADER
    assert len(lines[0]) + 1 == 64
    assert lines[1].startswith(b"00000001,")
    assert len(lines[1]) + 1 == 64


@pytest_twisted.ensureDeferred
async def test_report_chunked_has_exact_size(demo: int) -> None:
    """`/report?size=N&chunked=1` sends N bytes chunked, without Content-Length, ending with the terminator."""
    response, _ = await exchange(demo, get("/report?size=150001&chunked=1"))
    assert response.status == 200
    assert response.header(b"transfer-encoding") == b"chunked"
    assert response.header(b"content-length") is None
    assert response.complete
    assert len(response.body) == 150001
    assert response.body.startswith(CSV_HEADER)


@pytest.mark.parametrize(
    ("size", "expected"),
    [("2KiB", 2048), ("3kb", 3000), ("1MiB", 1024**2), ("5b", 5), ("777", 777)],
)
@pytest_twisted.ensureDeferred
async def test_report_size_units(demo: int, size: str, expected: int) -> None:
    """A size with a unit (KiB, kb, MiB, b, or none) gives that many bytes."""
    response, _ = await exchange(demo, get(f"/report?size={size}"))
    assert response.status == 200
    assert response.header(b"content-length") == b"%d" % expected
    assert len(response.body) == expected
    assert response.complete


@pytest_twisted.ensureDeferred
async def test_report_default_size_is_one_mib(demo: int) -> None:
    """`/report` without a size sends 1 MiB."""
    response, _ = await exchange(demo, get("/report"))
    assert response.header(b"content-length") == b"1048576"
    assert len(response.body) == 1048576


@pytest_twisted.ensureDeferred
async def test_head_report_gives_content_length_without_body(demo: int) -> None:
    """`HEAD /report?size=N` answers with `Content-Length: N` and no body bytes at all."""
    request = b"HEAD /report?size=3MiB HTTP/1.1\r\nHost: demo.test\r\nConnection: close\r\n\r\n"
    response, raw = await exchange(demo, request, head_request=True)
    assert response.status == 200
    assert response.header(b"content-length") == b"%d" % (3 * 1024**2)
    assert raw.endswith(b"\r\n\r\n")
    assert response.rest == b""


@pytest.mark.parametrize("size", ["abc", "5XB", "-1", "1.5KiB"])
@pytest_twisted.ensureDeferred
async def test_report_bad_size_is_400(demo: int, size: str) -> None:
    """A size that is not a number with a known unit is answered 400."""
    response, _ = await exchange(demo, get(f"/report?size={size}"))
    assert response.status == 400
    assert response.header(b"content-type") != b"text/csv"


@pytest_twisted.ensureDeferred
async def test_upload_with_content_length_reports_count_and_sha256(demo: int) -> None:
    """`POST /upload` with Content-Length answers with the body's byte count and SHA-256."""
    body = upload_body(300_017)
    head = b"POST /upload HTTP/1.1\r\nHost: demo.test\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
    response, _ = await exchange(demo, head + body)
    assert response.status == 200
    assert response.header(b"content-type") == b"application/json"
    assert json.loads(response.body) == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


@pytest_twisted.ensureDeferred
async def test_upload_chunked_reports_count_and_sha256(demo: int) -> None:
    """`PUT /upload` with a chunked body answers with the de-chunked body's byte count and SHA-256."""
    body = upload_body(200_003)
    head = b"PUT /upload HTTP/1.1\r\nHost: demo.test\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    response, _ = await exchange(demo, head + chunked(body, 7000))
    assert response.status == 200
    assert json.loads(response.body) == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


@pytest_twisted.ensureDeferred
async def test_empty_upload_reports_zero_bytes(demo: int) -> None:
    """`POST /upload` with an empty body answers with 0 bytes and the SHA-256 of nothing."""
    head = b"POST /upload HTTP/1.1\r\nHost: demo.test\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    response, _ = await exchange(demo, head)
    assert response.status == 200
    assert json.loads(response.body) == {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}


@pytest_twisted.ensureDeferred
async def test_events_sends_count_events_then_ends(demo: int) -> None:
    """`/events?interval=0.01&count=3` sends three `tick` events numbered 1 to 3, then ends the response."""
    response, _ = await exchange(demo, get("/events?interval=0.01&count=3"))
    assert response.status == 200
    assert response.header(b"content-type") == b"text/event-stream"
    assert response.complete
    blocks = [block for block in response.body.split(b"\n\n") if block]
    assert blocks[0] == b": stream open"
    events = [dict(line.split(b": ", 1) for line in block.split(b"\n")) for block in blocks[1:]]
    assert [event[b"id"] for event in events] == [b"1", b"2", b"3"]
    assert {event[b"event"] for event in events} == {b"tick"}
    assert [json.loads(event[b"data"])["seq"] for event in events] == [1, 2, 3]


@pytest_twisted.ensureDeferred
async def test_head_report_bad_size_is_400(demo: int) -> None:
    """`HEAD /report` with a bad size is answered 400, as the same GET is."""
    request = b"HEAD /report?size=abc HTTP/1.1\r\nHost: demo.test\r\nConnection: close\r\n\r\n"
    response, _ = await exchange(demo, request, head_request=True)
    assert response.status == 400


@pytest_twisted.ensureDeferred
async def test_two_requests_on_one_keep_alive_connection(demo: int) -> None:
    """A report and then a chunked upload on one connection: both answered in order, the connection kept open
    after the first and closed after the second (which asks for it)."""
    body = upload_body(70_001)
    client = await connect(demo, keep_all=True)
    client.send(b"GET /report?size=100000 HTTP/1.1\r\nHost: demo.test\r\n\r\n")
    await within(client.responses_received(1))
    assert client.reason is None
    head = b"PUT /upload HTTP/1.1\r\nHost: demo.test\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    client.send(head + chunked(body, 4096))
    await within(client.closed)
    assert client.clean_close
    report, upload = parse_responses(bytes(client.head))
    assert (report.status, len(report.body), report.header(b"connection")) == (200, 100000, None)
    assert upload.header(b"connection") == b"close"
    assert json.loads(upload.body) == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert upload.rest == b""


@pytest_twisted.ensureDeferred
async def test_index_describes_the_endpoints(demo: int) -> None:
    """`GET /` answers with the demo's usage text, which names every endpoint."""
    response, _ = await exchange(demo, get("/"))
    assert response.status == 200
    assert response.header(b"content-type") == b"text/plain; charset=utf-8"
    assert response.body.startswith(b"A demo upstream to put behind the gateway")
    assert all(name in response.body for name in (b"/report", b"/events", b"/upload"))


@pytest_twisted.ensureDeferred
async def test_report_below_its_path_is_the_report(demo: int) -> None:
    """`/report/anything`, `//report` and `/%72eport` are the report, as under twisted.web's traversal (a
    gateway route with a longer prefix may forward such paths)."""
    for target in ("/report/first?size=10", "//report?size=10", "/%72eport?size=10"):
        response, _ = await exchange(demo, get(target))
        assert (response.status, response.body) == (200, b"id,region,"), target


@pytest.mark.parametrize(
    ("request_line", "status", "allow"),
    [
        ("GET /nowhere", 404, None),
        ("POST /report", 405, b"GET, HEAD"),
        ("DELETE /events", 405, b"GET, HEAD"),
        ("GET /upload", 405, b"POST, PUT"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_unknown_paths_and_methods_are_refused(
    demo: int, request_line: str, status: int, allow: bytes | None
) -> None:
    """A path that names no endpoint is 404; a method an endpoint does not take is 405 with `Allow`."""
    response, _ = await exchange(
        demo, f"{request_line} HTTP/1.1\r\nHost: demo.test\r\nConnection: close\r\n\r\n".encode()
    )
    assert (response.status, response.header(b"allow")) == (status, allow)


@pytest.mark.parametrize("query", ["interval=x", "count=-1", "interval=nan"])
@pytest_twisted.ensureDeferred
async def test_events_bad_parameters_are_400(demo: int, query: str) -> None:
    """An interval that is not a number of seconds, or a negative count, is answered 400."""
    response, _ = await exchange(demo, get(f"/events?{query}"))
    assert response.status == 400


# --- in memory: the demo's connection over a StringTransport, time on a Clock --------------------------------


class SocketBuffer(StringTransport):
    """A client socket whose send buffer fills: past `limit` bytes unread, it pauses the registered producer, as
    a real transport does; `drain` reads what it holds and resumes it."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.full = False
        self.taken = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        if not self.full and self.producer is not None and len(self.value()) > self.limit:
            self.full = True
            self.producer.pauseProducing()

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def drain(self) -> bytes:
        data = self.value()
        self.taken += len(data)
        self.clear()
        if self.full:
            self.full = False
            if self.producer is not None:
                self.producer.resumeProducing()
        return data


def in_memory(clock: Clock, transport: StringTransport | None = None) -> tuple[Protocol, StringTransport]:
    """A demo connection made by the demo's factory, over `transport` (a new `StringTransport` by default)."""
    transport = transport if transport is not None else StringTransport()
    protocol = make_factory(clock).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert protocol is not None
    protocol.makeConnection(transport)
    return protocol, transport


def test_upload_rate_paces_reading() -> None:
    """With `rate=R`, reading pauses as soon as the bytes read are ahead of R per second, and resumes when the
    time for them has come; the answer counts and hashes every byte."""
    clock = Clock()
    protocol, transport = in_memory(clock)
    body = upload_body(4000)
    protocol.dataReceived(b"POST /upload?rate=1000 HTTP/1.1\r\nHost: demo.test\r\nContent-Length: 6000\r\n\r\n")
    protocol.dataReceived(body)
    assert transport.producerState == "paused"
    clock.advance(3.99)
    assert transport.producerState == "paused"
    clock.advance(0.01)
    assert transport.producerState == "producing"
    clock.advance(2)
    rest = upload_body(2000)
    protocol.dataReceived(rest)  # on time: no pause owed, and the body is complete
    response = parse_response(transport.value())
    assert json.loads(response.body) == {"bytes": 6000, "sha256": hashlib.sha256(body + rest).hexdigest()}
    assert transport.producerState == "producing"
    assert clock.getDelayedCalls() == []


def test_upload_answered_while_paced_resumes_reading() -> None:
    """An upload whose last bytes came early is answered at once; its pacing timer goes, and reading resumes for
    the next request."""
    clock = Clock()
    protocol, transport = in_memory(clock)
    protocol.dataReceived(
        b"PUT /upload?rate=10 HTTP/1.1\r\nHost: demo.test\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
    )
    assert json.loads(parse_response(transport.value()).body)["bytes"] == 100
    assert transport.producerState == "producing"
    assert clock.getDelayedCalls() == []


def test_upload_is_hashed_as_it_arrives_never_held_whole() -> None:
    """A 32 MiB upload fed 64 KiB at a time is counted and hashed as it comes: memory stays far below its size."""
    clock = Clock()
    protocol, transport = in_memory(clock)
    piece = upload_body(64 * 1024)
    pieces = 512
    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        protocol.dataReceived(
            b"POST /upload HTTP/1.1\r\nHost: demo.test\r\nContent-Length: %d\r\n\r\n" % (len(piece) * pieces)
        )
        for _ in range(pieces):
            protocol.dataReceived(piece)
            digest.update(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024
    assert json.loads(parse_response(transport.value()).body) == {"bytes": 32 * 1024**2, "sha256": digest.hexdigest()}


def test_report_pauses_while_the_client_socket_is_full() -> None:
    """The report is written only while the client's socket takes it: a full buffer stops it, a drained one lets
    it go on, to exactly the size asked for."""
    clock = Clock()
    transport = SocketBuffer(limit=256 * 1024)
    protocol, _ = in_memory(clock, transport)
    protocol.dataReceived(get("/report?size=2MiB").replace(b"Connection: close\r\n", b""))
    received = transport.drain()
    assert transport.taken < 256 * 1024 + 2 * 64 * 1024  # it stopped at the buffer's limit, not at 2 MiB
    while transport.producer is not None:
        received += transport.drain()
    received += transport.drain()
    response = parse_response(received)
    assert (response.status, len(response.body), response.complete, response.rest) == (200, 2 * 1024**2, True, b"")
    assert hashlib.sha256(response.body).hexdigest() == hashlib.sha256(b"".join(report_chunks(2 * 1024**2))).hexdigest()
    assert not transport.disconnecting


def test_events_stop_when_the_client_goes() -> None:
    """An endless event stream stops its timer when the client goes: nothing is left on the clock."""
    clock = Clock()
    protocol, transport = in_memory(clock)
    protocol.dataReceived(get("/events?interval=5"))
    clock.advance(5)
    clock.advance(5)
    assert transport.value().count(b"event: tick") == 2
    disconnect(transport, protocol)
    assert clock.getDelayedCalls() == []


def test_report_chunks_make_the_report_of_any_size() -> None:
    """`report_chunks(n)` gives n bytes in pieces of at most 64 KiB, and a shorter report is a prefix of a longer."""
    for size in (0, 1, 63, 64, 65536, 65537, 200003):
        pieces = list(report_chunks(size))
        assert sum(map(len, pieces)) == size
        assert all(0 < len(piece) <= 65536 for piece in pieces)
    assert b"".join(report_chunks(200003)).startswith(b"".join(report_chunks(70000)))
