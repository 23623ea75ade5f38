"""The client-facing parser's limits and strictness (`gateway.http1.server.ClientConnection`): 414, 431, 400 for
ambiguous framing, 408 for a slow head, and the connection cap, each answered with problem+json and `Connection: close`,
never forwarded. Mostly in memory on a `MemoryReactorClock` (exact timing); a few over real loopback, where the
point is that the answer survives the close (a FIN after it, not a reset that could destroy it)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.error import ConnectionDone
from twisted.logger import LogEvent, LogLevel, globalLogPublisher

from gateway.http1.server import ClientConnection
from tests.support.clients import Parsed, RawClient, connect, parse_response, within
from tests.support.memory import Client, MemoryGateway
from tests.support.running import gateway_config

UPSTREAM = "http://127.0.0.1:8081"
EPS = 0.25
"""A step of time binary floating point represents exactly, so `advance(t - EPS); advance(EPS)` lands on t."""
OK_0 = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class Gateway(MemoryGateway):
    """A MemoryGateway that remembers its clients, so the fixture can let them all go."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data)
        self.clients: list[Client] = []

    def client(self) -> Client:
        client = super().client()
        client.transport._lenient = True  # a real TCP transport ignores resumeProducing once closing
        self.clients.append(client)
        return client

    def drop(self, client: Client) -> None:
        """The client goes away (as TCP reports it), and is forgotten."""
        client.disconnect()
        self.clients.remove(client)


@pytest.fixture
def gateway() -> Iterator[Callable[..., Gateway]]:
    """Builds in-memory gateways; afterwards every client goes away, the pools close and no timer is left."""
    made: list[Gateway] = []

    def make(**sections: Any) -> Gateway:
        gw = Gateway(gateway_config(UPSTREAM, **sections))
        made.append(gw)
        return gw

    yield make
    for gw in made:
        for client in list(gw.clients):
            gw.drop(client)
        gw.close()
        assert gw.reactor.getDelayedCalls() == []
        assert gw.factory.connections == 0


def get(path: bytes = b"/", *headers: bytes) -> bytes:
    return b"\r\n".join([b"GET " + path + b" HTTP/1.1", b"Host: example.test", *headers]) + b"\r\n\r\n"


def refusal(client: Client, status: int) -> dict[str, Any]:
    """The one response the client got: `status`, problem+json, Connection: close; then the gateway half-closed
    (FIN after the answer) and parses nothing more."""
    parsed = parse_response(client.received())
    assert parsed.status == status, client.received()[:300]
    assert parsed.complete and parsed.rest == b""
    assert parsed.header(b"content-type") == b"application/problem+json"
    assert parsed.header(b"connection") == b"close"
    body: dict[str, Any] = json.loads(parsed.body)
    assert body["status"] == status
    assert parsed.header(b"x-request-id") == body["request_id"].encode()
    assert client.transport.write_closed
    assert isinstance(client.channel, ClientConnection) and client.channel.refused is not None
    return body


def lingers_then_cut(gw: Gateway, client: Client) -> None:
    """After a refusal the rest of what the client sends is read and dropped for exactly lingering_timeout (5 s
    by default), then the connection is cut; nothing more is written."""
    answered = client.received()
    gw.advance(5 - EPS)
    client.send(b"GET /more HTTP/1.1\r\nHost: example.test\r\n\r\n" + b"x" * 100_000)
    assert not client.transport.aborted
    assert client.received() == answered
    gw.advance(EPS)
    assert client.transport.aborted


def test_lingering_after_a_refused_head_is_cut_past_the_discard_bound(gateway: Callable[..., Gateway]) -> None:
    """After a refused head, what the client still sends is dropped up to server.lingering_max_bytes; past that
    the connection is cut, before the lingering deadline."""
    gw = gateway(server={"lingering_max_bytes": 1000})
    client = gw.client()
    client.send(get(b"/x", b"Transfer-Encoding: gzip"))
    refusal(client, 400)
    client.send(b"x" * 1000)
    assert not client.transport.aborted
    client.send(b"x")
    assert client.transport.aborted


# === 414: the request line ==========================================================================================


def test_request_line_over_the_limit_gets_414(gateway: Callable[..., Gateway]) -> None:
    """A request line longer than max_request_line_bytes is answered 414 and never reaches an upstream."""
    gw = gateway(limits={"max_request_line_bytes": 1024})
    client = gw.client()
    client.send(get(b"/" + b"a" * 1100))
    problem = refusal(client, 414)
    assert "1024-byte" in problem["detail"]
    assert gw.pending_connections() == 0
    lingers_then_cut(gw, client)


def test_request_line_exactly_at_the_limit_is_accepted(gateway: Callable[..., Gateway]) -> None:
    """A request line of exactly max_request_line_bytes (CRLF not counted) is read and proxied."""
    gw = gateway(limits={"max_request_line_bytes": 1024})
    client = gw.client()
    path = b"/" + b"a" * (1024 - len(b"GET / HTTP/1.1"))
    assert len(b"GET " + path + b" HTTP/1.1") == 1024
    client.send(get(path))
    assert client.received() == b""
    assert gw.pending_connections() == 1


def test_request_line_one_byte_over_the_limit_gets_414(gateway: Callable[..., Gateway]) -> None:
    """One byte more than max_request_line_bytes is 414: the limit is exact."""
    gw = gateway(limits={"max_request_line_bytes": 1024})
    client = gw.client()
    client.send(get(b"/" + b"a" * (1025 - len(b"GET / HTTP/1.1"))))
    refusal(client, 414)


def test_overlong_request_line_is_refused_before_it_ends(gateway: Callable[..., Gateway]) -> None:
    """An unterminated request line is refused as soon as it is over the limit, without waiting for its end."""
    gw = gateway(limits={"max_request_line_bytes": 1024})
    client = gw.client()
    client.send(b"GET /" + b"a" * 1019)
    assert client.received() == b""
    client.send(b"a")  # 1025 bytes, and no CRLF: cannot be a request line of 1024 bytes or less
    refusal(client, 414)


def test_request_line_with_two_spaces_is_read_on_word_boundaries(gateway: Callable[..., Gateway]) -> None:
    """Two spaces between method and target are read as one (RFC 9112 section 3 allows parsing on whitespace
    boundaries; llhttp does): the request line the upstream gets is the gateway's own, so nothing is ambiguous."""
    gw = gateway()
    client = gw.client()
    client.send(b"GET  /two HTTP/1.1\r\nHost: example.test\r\n\r\n")
    assert gw.upstream().received().startswith(b"GET /two HTTP/1.1\r\n")


def test_overlong_request_line_fed_byte_by_byte_gets_414(gateway: Callable[..., Gateway]) -> None:
    """Fed one byte at a time, an over-long request line is still refused 414, once."""
    gw = gateway(limits={"max_request_line_bytes": 64})
    client = gw.client()
    for byte in get(b"/" + b"a" * 100):
        client.send(bytes([byte]))
    refusal(client, 414)


def test_default_request_line_limit_is_8_kib(gateway: Callable[..., Gateway]) -> None:
    """With the default limits an 8 KiB request line is accepted and a longer one gets 414 (before the 16 KiB
    the header limit would allow)."""
    gw = gateway()
    ok, long = gw.client(), gw.client()
    filler = 8192 - len(b"GET / HTTP/1.1")
    ok.send(get(b"/" + b"a" * filler))
    assert ok.received() == b""
    long.send(get(b"/" + b"a" * (filler + 1)))
    refusal(long, 414)


# === 431: header lines ==============================================================================================


def test_header_line_over_the_header_limit_gets_431_before_it_ends(gateway: Callable[..., Gateway]) -> None:
    """A single header line that cannot fit in max_header_bytes is refused 431 before its end arrives."""
    gw = gateway(limits={"max_header_bytes": 1024})
    client = gw.client()
    client.send(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 1100)
    refusal(client, 431)
    assert gw.pending_connections() == 0


def test_header_block_exactly_at_the_limit_is_accepted(gateway: Callable[..., Gateway]) -> None:
    """Header lines of exactly max_header_bytes (each counted with its CRLF) are read and proxied."""
    gw = gateway(limits={"max_header_bytes": 256})
    client = gw.client()
    host = b"Host: example.test"  # 18 + 2
    big = b"X-Big: " + b"a" * (256 - 20 - 2 - len(b"X-Big: "))
    client.send(b"GET / HTTP/1.1\r\n" + host + b"\r\n" + big + b"\r\n\r\n")
    assert client.received() == b""
    assert gw.pending_connections() == 1


def test_header_block_one_byte_over_the_limit_gets_431(gateway: Callable[..., Gateway]) -> None:
    """One byte more than max_header_bytes is 431: the limit is exact."""
    gw = gateway(limits={"max_header_bytes": 256})
    client = gw.client()
    big = b"X-Big: " + b"a" * (256 - 20 - 2 - len(b"X-Big: ") + 1)
    client.send(b"GET / HTTP/1.1\r\nHost: example.test\r\n" + big + b"\r\n\r\n")
    refusal(client, 431)


def test_request_line_does_not_count_against_the_header_limit(gateway: Callable[..., Gateway]) -> None:
    """The request line has its own limit: a long one leaves max_header_bytes whole for the header lines."""
    gw = gateway(limits={"max_request_line_bytes": 4096, "max_header_bytes": 1024})
    client = gw.client()
    client.send(get(b"/" + b"p" * 4000, b"X-Big: " + b"a" * 900))
    assert client.received() == b""
    assert gw.pending_connections() == 1


def test_header_count_at_the_limit_is_accepted_and_one_more_gets_431(gateway: Callable[..., Gateway]) -> None:
    """max_header_count header lines are accepted; one more is 431."""
    gw = gateway(limits={"max_header_count": 5})
    ok, over = gw.client(), gw.client()
    ok.send(get(b"/", *(b"X-H%d: v" % i for i in range(4))))  # Host + 4
    assert ok.received() == b""
    over.send(get(b"/", *(b"X-H%d: v" % i for i in range(5))))  # Host + 5
    problem = refusal(over, 431)
    assert "more than 5 header fields" in problem["detail"]


def test_limits_start_afresh_for_each_request_on_a_connection(gateway: Callable[..., Gateway]) -> None:
    """Keep-alive requests that are each near the header limits are all accepted: the counts are per request."""
    gw = gateway(limits={"max_header_bytes": 256, "max_header_count": 3})
    client = gw.client()
    head = get(b"/", b"X-A: " + b"a" * 200, b"X-B: b")
    client.send(head)
    up = gw.upstream()
    up.respond(OK_0)
    for _ in range(2):
        client.send(head)
        up.respond(OK_0)  # the pooled connection is reused
    parsed = parse_response(client.received())
    assert parsed.status == 200
    assert client.received().count(b"HTTP/1.1 200 OK") == 3
    assert client.channel.refused is None


def test_refusal_uses_the_clients_request_id(gateway: Callable[..., Gateway]) -> None:
    """A 431 carries the client's X-Request-ID when it came before the limit was crossed."""
    gw = gateway(limits={"max_header_count": 3})
    client = gw.client()
    client.send(get(b"/", b"X-Request-ID: abc-123", b"X-A: 1", b"X-B: 2"))
    assert refusal(client, 431)["request_id"] == "abc-123"


# === 400: ambiguous or malformed framing, never forwarded ===========================================================


def post_with(*headers: bytes, body: bytes = b"") -> bytes:
    """A POST head with these header lines after Host, then `body`."""
    return b"\r\n".join([b"POST / HTTP/1.1", b"Host: example.test", *headers]) + b"\r\n\r\n" + body


TE_CHUNKED = b"Transfer-Encoding: chunked"
LAST_CHUNK = b"0\r\n\r\n"
MALFORMED: list[tuple[str, bytes]] = [
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: example.test\r\nX-A: a\r\n  folded\r\n\r\n"),
    ("obs-fold-tab", b"GET / HTTP/1.1\r\nHost: example.test\r\nX-A: a\r\n\tfolded\r\n\r\n"),
    ("bare-lf-head", b"GET / HTTP/1.1\nHost: example.test\n\n"),
    ("bare-lf-after-crlf", b"GET / HTTP/1.1\r\nHost: example.test\n\n"),
    ("bare-lf-in-value", b"GET / HTTP/1.1\r\nHost: example.test\r\nX-A: a\nX-B: b\r\n\r\n"),
    ("te-identity", post_with(b"Transfer-Encoding: identity", body=b"GET /smuggled HTTP/1.1\r\n\r\n")),
    ("te-identity-with-cl", post_with(b"Transfer-Encoding: identity", b"Content-Length: 3", body=b"abc")),
    ("te-gzip-chunked", post_with(b"Transfer-Encoding: gzip, chunked", body=LAST_CHUNK)),
    ("te-chunked-chunked", post_with(b"Transfer-Encoding: chunked, chunked", body=LAST_CHUNK)),
    ("te-twice", post_with(TE_CHUNKED, TE_CHUNKED, body=LAST_CHUNK)),
    ("te-empty", post_with(b"Transfer-Encoding:")),
    ("te-in-http-1.0", b"POST / HTTP/1.0\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n" + LAST_CHUNK),
    ("cl-then-te", post_with(b"Content-Length: 3", TE_CHUNKED, body=LAST_CHUNK)),
    ("te-then-cl", post_with(TE_CHUNKED, b"Content-Length: 3", body=LAST_CHUNK)),
    ("cl-twice-equal", post_with(b"Content-Length: 3", b"Content-Length: 3", body=b"abc")),
    ("cl-twice-differing", post_with(b"Content-Length: 3", b"Content-Length: 4", body=b"abcd")),
    ("cl-list", post_with(b"Content-Length: 3, 3", body=b"abc")),
    ("cl-plus", post_with(b"Content-Length: +3", body=b"abc")),
    ("cl-negative", post_with(b"Content-Length: -1")),
    ("cl-hex", post_with(b"Content-Length: 0x3", body=b"abc")),
    ("cl-empty", post_with(b"Content-Length:")),
    # Lengths a C parser cannot hold (2^63, and 2^64 + 3, which a 64-bit parser wraps to 3), and more digits
    # than Python converts to an int at all.
    ("cl-2^63", post_with(b"Content-Length: 9223372036854775808", body=b"abc")),
    ("cl-2^64+3", post_with(b"Content-Length: 18446744073709551619", body=b"abc")),
    ("cl-5000-digits", post_with(b"Content-Length: " + b"9" * 5000, body=b"abc")),
    ("cl-leading-zeros-2^63", post_with(b"Content-Length: " + b"0" * 5000 + b"9223372036854775808", body=b"abc")),
    ("space-before-colon", post_with(b"Content-Length : 3", body=b"abc")),
    ("tab-before-colon", b"GET / HTTP/1.1\r\nHost\t: example.test\r\n\r\n"),
    ("no-colon", b"GET / HTTP/1.1\r\nHost: example.test\r\nJustAName\r\n\r\n"),
    ("empty-name", b"GET / HTTP/1.1\r\nHost: example.test\r\n: value\r\n\r\n"),
    ("nul-in-value", b"GET / HTTP/1.1\r\nHost: example.test\r\nX-A: a\x00b\r\n\r\n"),
    ("cr-in-value", b"GET / HTTP/1.1\r\nHost: example.test\r\nX-A: a\rb\r\n\r\n"),
    ("nul-in-name", b"GET / HTTP/1.1\r\nHost: example.test\r\nX-\x00A: a\r\n\r\n"),
    ("http-2-request-line", b"GET / HTTP/2.0\r\nHost: example.test\r\n\r\n"),
    ("space-in-target", b"GET /a b HTTP/1.1\r\nHost: example.test\r\n\r\n"),
]


@pytest.mark.parametrize("data", [case for _, case in MALFORMED], ids=[name for name, _ in MALFORMED])
def test_malformed_head_gets_400_and_is_never_forwarded(gateway: Callable[..., Gateway], data: bytes) -> None:
    """Each ambiguous or malformed head is answered 400 problem+json and nothing is sent upstream."""
    gw = gateway()
    client = gw.client()
    client.send(data)
    refusal(client, 400)
    assert gw.pending_connections() == 0


@pytest.mark.parametrize("data", [case for _, case in MALFORMED], ids=[name for name, _ in MALFORMED])
def test_malformed_head_fed_byte_by_byte_gets_400(gateway: Callable[..., Gateway], data: bytes) -> None:
    """Fed one byte at a time, each malformed head still gets exactly one 400 and nothing goes upstream."""
    gw = gateway()
    client = gw.client()
    for byte in data:
        client.send(bytes([byte]))
    refusal(client, 400)
    assert gw.pending_connections() == 0


FRAMING_DETAIL = "Content-Length must be a single decimal number, and cannot be combined with Transfer-Encoding"
TWISTED_REFUSALS: list[tuple[str, str]] = [
    ("te-twice", FRAMING_DETAIL),
    ("cl-then-te", FRAMING_DETAIL),
    ("te-then-cl", FRAMING_DETAIL),
    ("cl-twice-equal", FRAMING_DETAIL),
    ("cl-twice-differing", FRAMING_DETAIL),
    ("cl-list", FRAMING_DETAIL),
    ("cl-plus", FRAMING_DETAIL),
    ("cl-negative", FRAMING_DETAIL),
    ("cl-hex", FRAMING_DETAIL),
    ("cl-empty", FRAMING_DETAIL),
    ("space-before-colon", "a header line is malformed"),
    ("tab-before-colon", "a header line is malformed"),
    ("no-colon", "a header line is malformed"),
    ("empty-name", "a header line is malformed"),
    ("nul-in-value", "a header line is malformed"),
    ("cr-in-value", "a header line is malformed"),
    ("nul-in-name", "a header line is malformed"),
    ("http-2-request-line", "the request line is malformed"),
    ("space-in-target", "the request line is malformed"),
]
"""Malformed heads that Twisted's own parser refuses, and the detail the answer gives for each."""


@pytest.mark.parametrize(("name", "detail"), TWISTED_REFUSALS, ids=[name for name, _ in TWISTED_REFUSALS])
@pytest.mark.parametrize("byte_by_byte", [False, True], ids=["whole", "byte-by-byte"])
def test_what_twisted_refuses_is_answered_with_the_part_at_fault(
    gateway: Callable[..., Gateway], name: str, detail: str, byte_by_byte: bool
) -> None:
    """What Twisted's parser refuses is answered 400 with a detail naming the part at fault: the request line, a
    header line, or the Content-Length/Transfer-Encoding framing, however the bytes arrive."""
    data = dict(MALFORMED)[name]
    gw = gateway()
    client = gw.client()
    for piece in [bytes([byte]) for byte in data] if byte_by_byte else [data]:
        client.send(piece)
    assert refusal(client, 400)["detail"].startswith(detail)


def test_a_malformed_request_line_after_a_served_request_names_the_request_line(
    gateway: Callable[..., Gateway],
) -> None:
    """The second request line on a keep-alive connection is still a request line: its refusal says so."""
    gw = gateway()
    client = gw.client()
    client.send(get(b"/first"))
    gw.upstream().respond(OK_0)
    client.send(b"GET /sec ond HTTP/1.1\r\nHost: example.test\r\n\r\n")
    parsed = parse_response(client.received())
    assert parsed.status == 200
    problem = json.loads(parse_response(parsed.rest).body)
    assert problem["status"] == 400 and problem["detail"] == "the request line is malformed"


def test_refused_head_request_gets_no_body(gateway: Callable[..., Gateway]) -> None:
    """A refused HEAD request is answered with the problem's headers only: a response to HEAD has no body."""
    gw = gateway()
    client = gw.client()
    client.send(b"HEAD / HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloX\r\n")
    parsed = parse_response(client.received(), head_request=True)
    assert parsed.status == 400
    assert parsed.header(b"content-type") == b"application/problem+json"
    assert int(parsed.header(b"content-length") or b"0") > 0
    assert parsed.body == b"" and parsed.rest == b""
    assert client.transport.write_closed


def test_transfer_encoding_chunked_in_any_case_is_accepted(gateway: Callable[..., Gateway]) -> None:
    """The transfer coding is case-insensitive: `Transfer-Encoding: Chunked` is ordinary chunked framing."""
    gw = gateway()
    client = gw.client()
    client.send(post_with(b"Transfer-Encoding: Chunked", body=b"3\r\nabc\r\n" + LAST_CHUNK))
    up = gw.upstream()
    assert b"abc" in up.received()
    up.respond(OK_0)
    assert parse_response(client.received()).status == 200


def test_bare_lf_in_a_pipelined_body_is_not_mistaken_for_a_head(gateway: Callable[..., Gateway]) -> None:
    """Only head lines are checked for bare LF: a pipelined request's body containing LF is forwarded intact."""
    gw = gateway()
    client = gw.client()
    client.send(get(b"/first") + b"POST /upload HTTP/1.1\r\nHost: example.test\r\nContent-Length: 5\r\n\r\nab\ncd")
    up = gw.upstream()
    up.respond(OK_0)  # the second request is parsed now, from the channel's buffer
    assert up.received().endswith(b"ab\ncd")
    up.respond(OK_0)
    assert client.received().count(b"HTTP/1.1 200 OK") == 2
    assert client.channel.refused is None


BAD_CHUNKS: list[tuple[str, bytes]] = [
    ("size-not-hex", b"zz\r\nabc\r\n0\r\n\r\n"),
    ("size-0x", b"0x3\r\nabc\r\n0\r\n\r\n"),
    ("size-negative", b"-3\r\nabc\r\n0\r\n\r\n"),
    ("size-empty", b"\r\nabc\r\n0\r\n\r\n"),
    ("no-crlf-after-data", b"3\r\nabcX\r\n0\r\n\r\n"),
    ("extension-bad-byte", b"3;a\x00b\r\nabc\r\n0\r\n\r\n"),
    # Sizes a C parser cannot hold: 2^64, and one of 17 digits that a 64-bit parser wraps to 3.
    ("size-2^64", b"10000000000000000\r\nabc\r\n0\r\n\r\n"),
    ("size-17-digits", b"10000000000000003\r\nabc\r\n0\r\n\r\n"),
    ("size-64-digits", b"f" * 64 + b"\r\nabc\r\n0\r\n\r\n"),
    # A trailer line that is no field: Twisted would take the next request's lines as trailers too.
    ("trailer-without-colon", b"3\r\nabc\r\n0\r\nX\r\n"),
    ("trailer-obs-fold", b"3\r\nabc\r\n0\r\nA: 1\r\n folded\r\n\r\n"),
    ("trailer-bad-name", b"3\r\nabc\r\n0\r\nA B: 1\r\n\r\n"),
]


@pytest.mark.parametrize("body", [case for _, case in BAD_CHUNKS], ids=[name for name, _ in BAD_CHUNKS])
def test_invalid_chunk_gets_400_and_the_upstream_never_gets_a_whole_body(
    gateway: Callable[..., Gateway], body: bytes
) -> None:
    """An invalid chunk is answered 400; the upstream request it had begun is cut, so its body is never complete
    (no last chunk reaches it) and nothing after the bad chunk is parsed as a request."""
    gw = gateway()
    client = gw.client()
    client.send(b"POST /upload HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n")
    up = gw.upstream()
    request = client.request
    client.send(body + b"GET /smuggled HTTP/1.1\r\nHost: example.test\r\n\r\n")
    assert refusal(client, 400)["detail"] == "the chunked request body is malformed"
    assert request.ending == "refused"
    assert up.transport.disconnecting or up.transport.aborted
    assert not up.received().endswith(b"0\r\n\r\n")
    assert b"smuggled" not in up.received()
    assert gw.pending_connections() == 0


def test_well_formed_trailers_end_the_body_and_are_not_forwarded(gateway: Callable[..., Gateway]) -> None:
    """Trailer fields that are well-formed end a chunked body as usual (and are dropped, as Twisted drops them):
    the strict trailer check refuses only lines that are no field."""
    gw = gateway()
    client = gw.client()
    client.send(b"POST /upload HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n")
    up = gw.upstream()
    client.send(b"3\r\nabc\r\n0\r\nChecksum: 1234\r\nX-Empty:\r\n\r\n")
    assert up.received().endswith(b"3\r\nabc\r\n0\r\n\r\n")
    assert b"Checksum" not in up.received()
    assert client.channel.refused is None


def test_chunk_sizes_up_to_2_63_minus_1_are_taken_whatever_their_leading_zeros(
    gateway: Callable[..., Gateway],
) -> None:
    """What counts is the value, not the digits: 17 digits with leading zeros are a size of 3 (as nginx, HAProxy
    and llhttp read them), and the largest size taken, 2^63 - 1, is a chunk the body limit then bounds."""
    gw = gateway()
    client = gw.client()
    client.send(b"POST /upload HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n")
    up = gw.upstream()
    client.send(b"00000000000000003\r\nabc\r\n" + b"7fffffffffffffff\r\ndef")
    assert client.channel.refused is None
    assert up.received().endswith(b"3\r\nabc\r\n3\r\ndef\r\n")


def test_content_length_with_thousands_of_leading_zeros_is_its_value(gateway: Callable[..., Gateway]) -> None:
    """5,000 zeros and a 3 is a body of 3 bytes (Twisted alone would raise converting 5,001 digits): the
    request is forwarded with Content-Length 3, and its body follows."""
    gw = gateway()
    client = gw.client()
    client.send(post_with(b"Content-Length: " + b"0" * 5000 + b"3", body=b"abc"))
    up = gw.upstream()
    assert client.channel.refused is None
    assert b"\r\nContent-Length: 3\r\n" in up.received()
    assert up.received().endswith(b"\r\n\r\nabc")
    up.respond(OK_0)
    assert parse_response(client.received()).status == 200


def test_content_length_of_2_63_minus_1_is_a_length_and_gets_413(gateway: Callable[..., Gateway]) -> None:
    """The largest Content-Length taken is a length like any other: over the route's body limit, 413."""
    gw = gateway()
    client = gw.client()
    client.send(post_with(b"Content-Length: 0009223372036854775807"))
    parsed = parse_response(client.received())
    assert (parsed.status, parsed.complete) == (413, True)
    assert gw.pending_connections() == 0


def test_invalid_chunk_after_a_complete_early_answer_keeps_lingering(gateway: Callable[..., Gateway]) -> None:
    """An upload the upstream answered early (the answer complete, the rest of the body being read and dropped)
    that then sends an invalid chunk gets no second status line, and is not cut before the lingering deadline:
    a reset could destroy the answer it was given."""
    gw = gateway()
    client = gw.client()
    client.send(b"POST /upload HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n")
    up = gw.upstream()
    client.send(b"3\r\nabc\r\n")
    up.respond(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig!")
    answer = client.received()
    assert parse_response(answer).status == 413 and parse_response(answer).complete
    client.send(b"zz\r\n")
    assert client.channel.refused is not None
    assert not client.transport.aborted
    assert client.received() == answer
    lingers_then_cut(gw, client)


# === 408: the head timeout (slowloris) ==============================================================================


def test_head_trickling_in_is_answered_408_exactly_head_timeout_after_its_first_byte(
    gateway: Callable[..., Gateway],
) -> None:
    """A head that keeps arriving, a byte at a time but never completes, gets 408 head_timeout seconds after its
    first byte; bytes arriving do not extend it (the idle timeout they do reset is longer)."""
    gw = gateway(server={"head_timeout": 10, "idle_timeout": 60})
    client = gw.client()
    gw.advance(3)  # an idle connection: only the idle timeout runs
    head = get(b"/slow")
    client.send(head[:1])
    for i in range(1, 11):
        gw.advance(1 - EPS if i == 10 else 1)  # 9.75 s after the first byte
        client.send(head[i : i + 1])
    assert client.received() == b""
    gw.advance(EPS)
    problem = refusal(client, 408)
    assert "10 s" in problem["detail"]
    assert gw.pending_connections() == 0
    lingers_then_cut(gw, client)


def test_idle_connection_gets_no_408(gateway: Callable[..., Gateway]) -> None:
    """A connection that sends nothing is not a slow head: it is closed silently at idle_timeout, not 408'd."""
    gw = gateway(server={"head_timeout": 2, "idle_timeout": 12})
    client = gw.client()
    gw.advance(12 - EPS)
    assert client.received() == b""
    assert not client.transport.disconnecting
    gw.advance(EPS)
    assert client.transport.disconnecting
    assert client.received() == b""


def test_complete_head_stops_the_head_timer(gateway: Callable[..., Gateway]) -> None:
    """Once the head is complete the head timeout no longer applies: a slow upstream is not a slow client."""
    gw = gateway(server={"head_timeout": 2})
    client = gw.client()
    client.send(get(b"/"))
    up = gw.upstream()
    gw.advance(30)
    assert client.received() == b""
    up.respond(OK_0)
    assert parse_response(client.received()).status == 200


def test_head_split_across_reads_within_the_timeout_is_served(gateway: Callable[..., Gateway]) -> None:
    """A head completed just before head_timeout is served normally."""
    gw = gateway(server={"head_timeout": 2})
    client = gw.client()
    head = get(b"/")
    client.send(head[:10])
    gw.advance(2 - EPS)
    client.send(head[10:])
    up = gw.upstream()
    gw.advance(10)
    up.respond(OK_0)
    assert parse_response(client.received()).status == 200
    assert client.channel.refused is None


def test_each_keep_alive_request_gets_its_own_head_timeout(gateway: Callable[..., Gateway]) -> None:
    """After a response, the next head's timer starts at its own first byte, not at the previous request's."""
    gw = gateway(server={"head_timeout": 4, "idle_timeout": 60})
    client = gw.client()
    client.send(get(b"/first"))
    gw.upstream().respond(OK_0)
    first = client.received()
    gw.advance(30)  # idle between requests
    client.send(b"GET /second HT")
    gw.advance(4 - EPS)
    assert client.received() == first
    gw.advance(EPS)
    assert client.received().startswith(first + b"HTTP/1.1 408 Request Timeout\r\n")


def test_pipelined_partial_head_is_timed_once_it_is_read(gateway: Callable[..., Gateway]) -> None:
    """A partial head sent behind a complete request is timed from when the channel turns to it (after the first
    response), and gets 408 if it does not complete in time."""
    gw = gateway(server={"head_timeout": 4, "idle_timeout": 60})
    client = gw.client()
    client.send(get(b"/first") + b"GET /second HT")
    up = gw.upstream()
    gw.advance(10)  # the first request waits for its upstream; the second head is only buffered
    up.respond(OK_0)
    first = client.received()
    assert parse_response(first).status == 200
    gw.advance(4 - EPS)
    assert client.received() == first
    gw.advance(EPS)
    assert client.received().startswith(first + b"HTTP/1.1 408 Request Timeout\r\n")


def test_client_leaving_during_a_head_cancels_the_head_timer(gateway: Callable[..., Gateway]) -> None:
    """A client that goes away mid-head leaves no timer behind."""
    gw = gateway(server={"head_timeout": 4})
    client = gw.client()
    client.send(b"GET / HTTP/1.1\r\nHo")
    gw.drop(client)
    assert gw.reactor.getDelayedCalls() == []


def test_client_closing_while_lingering_cancels_the_lingering_timer(gateway: Callable[..., Gateway]) -> None:
    """A refused client that closes its side (as it does on seeing our FIN) ends the lingering at once."""
    gw = gateway(limits={"max_request_line_bytes": 64})
    client = gw.client()
    client.send(get(b"/" + b"a" * 100))
    refusal(client, 414)
    assert gw.reactor.getDelayedCalls() != []
    gw.drop(client)
    assert gw.reactor.getDelayedCalls() == []


# === the connection cap =============================================================================================


class FakePort:
    """A listening port as the factory sees it: records whether it accepts."""

    def __init__(self) -> None:
        self.reading = True
        self.calls: list[str] = []

    def stopReading(self) -> None:
        self.reading = False
        self.calls.append("stop")

    def startReading(self) -> None:
        self.reading = True
        self.calls.append("start")


def test_ports_stop_accepting_at_the_cap_and_resume_below_it(gateway: Callable[..., Gateway]) -> None:
    """At max_connections every listening port stops accepting (the kernel backlog holds further clients); once
    a connection closes they accept again."""
    gw = gateway(server={"max_connections": 2})
    first, second = FakePort(), FakePort()
    gw.factory.add_port(first)
    gw.factory.add_port(second)
    a = gw.client()
    assert first.reading and gw.factory.accepting
    b = gw.client()
    assert not first.reading and not second.reading and not gw.factory.accepting
    assert gw.factory.connections == 2
    gw.drop(a)
    assert first.reading and second.reading and gw.factory.accepting
    assert first.calls == ["stop", "start"]
    late = FakePort()
    c = gw.client()
    gw.factory.add_port(late)  # a port added at the cap is paused at once
    assert late.calls == ["stop"]
    gw.factory.remove_port(late)
    gw.drop(b)
    assert late.calls == ["stop"]  # a removed (stopping) port is never resumed
    assert first.reading
    assert c.channel.refused is None


def test_connection_accepted_past_the_cap_gets_503(gateway: Callable[..., Gateway]) -> None:
    """A connection accepted over the cap anyway (a port that cannot pause, or one accept batch) is answered
    503 problem+json at once, lingers, and does not count once gone."""
    gw = gateway(server={"max_connections": 2})
    a, b = gw.client(), gw.client()
    over = gw.client()
    problem = refusal(over, 503)
    assert "connection limit" in problem["detail"]
    assert gw.factory.connections == 3
    over.send(get(b"/"))
    assert gw.pending_connections() == 0
    lingers_then_cut(gw, over)
    gw.drop(over)
    assert gw.factory.connections == 2
    a.send(get(b"/"))
    gw.upstream().respond(OK_0)
    assert parse_response(a.received()).status == 200
    assert b.received() == b""


def test_reaching_the_cap_is_logged_at_most_once_a_minute(gateway: Callable[..., Gateway]) -> None:
    """A gateway held at its cap pauses and resumes on every connection; the warning comes once a minute."""
    events: list[LogEvent] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    try:
        gw = gateway(server={"max_connections": 1})

        def churn() -> None:
            client = gw.client()
            gw.drop(client)

        churn()
        churn()
        gw.advance(60 - EPS)
        churn()
        gw.advance(EPS)
        churn()
    finally:
        globalLogPublisher.removeObserver(observer)
    warnings = [e for e in events if e.get("log_format", "").startswith("At {cap} client connections")]
    assert [w["log_level"] for w in warnings] == [LogLevel.warn, LogLevel.warn]


# === over real loopback ============================================================================================


def _assert_refused_over_tcp(client: RawClient, status: int) -> Parsed:
    parsed = client.response()
    assert parsed.status == status
    assert parsed.complete
    assert parsed.header(b"connection") == b"close"
    assert json.loads(parsed.body)["status"] == status
    assert client.reason is not None and client.reason.check(ConnectionDone), client.reason  # FIN, not RST
    return parsed


@pytest_twisted.ensureDeferred
async def test_loopback_overlong_request_line_gets_414_not_reset(gateway_for: Any) -> None:
    """Over TCP, a client still sending a 4 MiB request line when the gateway refuses it is answered 414, and
    the connection ends with a FIN the client sees after the whole answer, not a reset (closing with the rest
    of the line unread would reset it)."""
    gateway = gateway_for(gateway_config(UPSTREAM))
    client = await connect(gateway.port)
    client.send(b"GET /" + b"a" * (4 * 1024 * 1024))
    await within(client.closed)
    _assert_refused_over_tcp(client, 414)


@pytest_twisted.ensureDeferred
async def test_loopback_oversized_headers_get_431(gateway_for: Any) -> None:
    """Over TCP, 64 KiB of header lines against the 16 KiB default is answered 431 and closed cleanly."""
    gateway = gateway_for(gateway_config(UPSTREAM))
    client = await connect(gateway.port)
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 1000) for i in range(64))
    client.send(b"GET / HTTP/1.1\r\nHost: example.test\r\n" + headers + b"\r\n")
    await within(client.closed)
    _assert_refused_over_tcp(client, 431)


@pytest_twisted.ensureDeferred
async def test_loopback_answers_carry_standard_reason_phrases(origin: Any, gateway_for: Any) -> None:
    """Over TCP, the status lines the gateway writes itself carry their standard phrases, on both paths that
    write them (the channel's refusals and a request's answers): "431 Request Header Fields Too Large" and
    "429 Too Many Requests", never Twisted's "Unknown Status"; an upstream's own phrase passes unchanged."""
    gateway = gateway_for(gateway_config(origin.url, admission={"rate_limits": {"anonymous": {"rate": "1/m"}}}))
    lines = []
    for request in (
        b"GET / HTTP/1.1\r\nHost: example.test\r\nX-Big: " + b"v" * 20_000 + b"\r\n\r\n",
        b"GET /status/200 HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n",
        b"GET /status/200 HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n",
    ):
        client = await connect(gateway.port, keep_all=True)
        client.send(request)
        await within(client.closed)
        lines.append(bytes(client.head).partition(b"\r\n")[0])
    assert lines == [
        b"HTTP/1.1 431 Request Header Fields Too Large",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 429 Too Many Requests",
    ]


@pytest_twisted.ensureDeferred
async def test_loopback_slow_head_gets_408(gateway_for: Any) -> None:
    """Over TCP, a head left incomplete is answered 408 once head_timeout (200 ms here) has passed, and closed."""
    gateway = gateway_for(gateway_config(UPSTREAM, server={"head_timeout": "200ms"}))
    client = await connect(gateway.port)
    client.send(b"GET / HTTP/1.1\r\nHost: exa")
    await within(client.closed)
    _assert_refused_over_tcp(client, 408)


@pytest_twisted.ensureDeferred
async def test_loopback_connection_cap_holds_clients_in_the_backlog(origin: Any, gateway_for: Any) -> None:
    """With max_connections = 1 a second client waits in the kernel's backlog, unaccepted and unanswered, until
    the first leaves; then it is served the request it had already sent."""
    gateway = gateway_for(gateway_config(origin.url, server={"max_connections": 1}))
    factory = gateway.service.factory
    first = await connect(gateway.port)
    for _ in range(500):  # bounded (5 s): the gateway accepts within a few reactor turns
        if factory.connections == 1:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert factory.connections == 1 and not factory.accepting
    second = await connect(gateway.port)  # the kernel completes the handshake from the backlog
    second.send(b"GET /status/200 HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
    for _ in range(20):  # reactor turns in which a listening port that still read would accept it
        await task.deferLater(reactor, 0, lambda: None)
    assert factory.connections == 1
    assert second.received == 0
    first.abort()
    await within(second.closed)
    assert second.response().status == 200
    assert factory.accepting


@pytest_twisted.ensureDeferred
async def test_loopback_chunk_size_over_64_bits_gets_400_at_once(origin: Any, gateway_for: Any) -> None:
    """Over TCP, in front of a real origin: a chunk size of 17 hex digits is answered 400 as soon as its line
    arrives (not 408 once the client gives up waiting for the rest of a body that big), and the origin never
    gets a complete body: its connection is closed with the body unfinished."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port)
    client.send(b"POST /sink HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    seen = await within(origin.request_seen(1))
    client.send(b"10000000000000003\r\nabc\r\n0\r\n\r\n")
    await within(client.closed)
    parsed = _assert_refused_over_tcp(client, 400)
    assert json.loads(parsed.body)["detail"] == "the chunked request body is malformed"
    await within(seen.connection_lost)
    assert not seen.body_complete


@pytest.mark.parametrize("data", [case for _, case in MALFORMED], ids=[name for name, _ in MALFORMED])
@pytest_twisted.ensureDeferred
async def test_loopback_malformed_head_gets_400_and_never_reaches_the_origin(
    origin: Any, gateway_for: Any, data: bytes
) -> None:
    """Over TCP, in front of a real origin, each ambiguous or malformed head is answered 400 problem+json and
    closed with a FIN, and the origin never accepts a connection; a well-formed request afterwards reaches it,
    so the origin was there to be reached."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port)
    client.send(data)
    await within(client.closed)
    _assert_refused_over_tcp(client, 400)
    assert origin.accepted == 0
    control = await connect(gateway.port)
    control.send(b"GET /status/200 HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
    await within(control.closed)
    assert control.response().status == 200
    assert origin.accepted == 1


@pytest.mark.parametrize("method", [b"FOO", b"get", b"BREW"])
def test_a_method_llhttp_does_not_know_gets_501(gateway: Callable[..., Gateway], method: bytes) -> None:
    """A method token outside llhttp's list (the registered methods) is answered 501 and never forwarded: the
    wire layer cannot frame what follows it."""
    gw = gateway()
    client = gw.client()
    client.send(method + b" / HTTP/1.1\r\nHost: example.test\r\n\r\n")
    assert "method" in refusal(client, 501)["detail"]
    assert gw.pending_connections() == 0
