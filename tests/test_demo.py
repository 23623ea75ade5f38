"""The demo upstream (`gateway.demo`) in this process on 127.0.0.1:0: reports, uploads and events as documented."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import reactor

from gateway.demo import make_site
from tests.support.clients import Parsed, connect, within

CSV_HEADER = b"id,region,product,amount,status"


@pytest_twisted.async_yield_fixture()
async def demo() -> AsyncIterator[int]:
    """The demo's site listening on a free loopback port; its port number."""
    port = reactor.listenTCP(0, make_site(), interface="127.0.0.1")
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
