"""`Exchange` through the real channel, factory and Agent, in memory (`tests.support.memory`).

Clients and upstream connections are `StringTransport`s on one `MemoryReactorClock`; the test plays the kernel
(`transport.producer.pauseProducing()` is a full socket buffer) and moves time only with `advance`. After every
test the `gateway` fixture lets every connection go the way TCP would, closes the pools and checks that nothing
is left behind: no DelayedCall, no upstream connection still open, no unexpected failure logged.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IHostnameResolver, IReactorPluggableNameResolver
from twisted.logger import LogEvent
from zope.interface import directlyProvides, implementer

from gateway.operations.metrics import Metrics
from gateway.proxy.exchange import Exchange
from gateway.proxy.phases import Phase
from tests.support.clients import Parsed, parse_response
from tests.support.logs import captured
from tests.support.memory import Client, MemoryGateway, RecordingFactory, Upstream, disconnect
from tests.support.running import gateway_config

UPSTREAM = "http://127.0.0.1:8081"
EPS = 0.25
"""A step of time binary floating point represents exactly, so `advance(t - EPS); advance(EPS)` lands on t."""

GET = b"GET /reports/1?x=y HTTP/1.1\r\nHost: example.test\r\n\r\n"
OK_5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def post(length: int | None, *extra: bytes, path: bytes = b"/upload") -> bytes:
    """A POST head with a Content-Length, or chunked when `length` is None."""
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    lines = [b"POST " + path + b" HTTP/1.1", b"Host: example.test", framing, *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# --- the harness: track every connection, and let them all go at the end ---------------------------------


def _note_loss(transport: Any, protocol: Any) -> None:
    """Mark `transport` once `protocol` has been told its connection is gone."""
    transport.lost_notified = False
    connection_lost = protocol.connectionLost

    def lost(reason: Any) -> None:
        transport.lost_notified = True
        connection_lost(reason)

    protocol.connectionLost = lost


class Gateway(MemoryGateway):
    """MemoryGateway that remembers the clients and upstream connections it made."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data)
        self.clients: list[Client] = []
        self.upstreams: list[Upstream] = []

    def client(self) -> Client:
        client = super().client()
        # A real TCP transport ignores resumeProducing once it is closing; StringTransport raises by default.
        client.transport._lenient = True
        _note_loss(client.transport, client.channel)
        self.clients.append(client)
        return client

    def upstream(self) -> Upstream:
        upstream = super().upstream()
        _note_loss(upstream.transport, upstream.protocol)
        self.upstreams.append(upstream)
        return upstream

    def settle(self) -> None:
        """End everything as the kernel would: deliver the losses of closed connections, let open clients go,
        close the pools."""
        for client in self.clients:
            if not client.transport.lost_notified:
                reason = ConnectionDone("closed") if client.transport.disconnecting else ConnectionLost("left")
                if client.transport.aborted:
                    reason = ConnectionAborted("aborted")
                disconnect(client.transport, client.channel, reason)
        self.close()
        for upstream in self.upstreams:
            if closed(upstream) and not upstream.transport.lost_notified:
                disconnect(upstream.transport, upstream.protocol, ConnectionDone("closed"))


@pytest.fixture
def gateway(failures: list[LogEvent]) -> Iterator[Callable[..., Gateway]]:
    """Make an in-memory gateway from config sections; afterwards check that it left nothing behind."""
    made: list[Gateway] = []

    def make(**sections: Any) -> Gateway:
        gw = Gateway(gateway_config(UPSTREAM, **sections))
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.settle()
        assert gw.reactor.getDelayedCalls() == [], "timers left behind"
        still_open = [u for u in gw.upstreams if not closed(u)]
        assert still_open == [], "upstream connections left open"
    assert [e.get("log_format") for e in failures] == [], "unexpected failures were logged"


def closed(upstream: Upstream) -> bool:
    """Whether the gateway closed (or aborted) this upstream connection.

    Agent's `TransportProxyProducer.stopProducing` reaches the transport as `stopProducing`, which a TCP transport
    implements as `loseConnection`; StringTransport only records it in `producerState`.
    """
    return upstream.transport.disconnecting or upstream.transport.producerState == "stopped"


def response(client: Client, *, head_request: bool = False) -> Parsed:
    """The first response the client received (1xx skipped), parsed."""
    return parse_response(client.received(), head_request=head_request)


def names(parsed: Parsed) -> set[bytes]:
    return {k.lower() for k, _ in parsed.headers}


def problem_of(parsed: Parsed) -> dict[str, Any]:
    assert parsed.header(b"Content-Type") == b"application/problem+json"
    body: dict[str, Any] = json.loads(parsed.body)
    return body


def upstream_body(upstream: Upstream) -> bytes:
    """What the upstream received after the request head."""
    return upstream.received().partition(b"\r\n\r\n")[2]


def start_get(gw: Gateway, request: bytes = GET) -> tuple[Client, Exchange, Upstream]:
    client = gw.client()
    client.send(request)
    req = client.request
    return client, req, gw.upstream()


# === relaying a response =================================================================================


def test_get_relays_status_code_and_reason_phrase(gateway: Callable[..., Gateway]) -> None:
    """The upstream's status code and reason phrase reach the client unchanged."""
    gw = gateway()
    client, _req, up = start_get(gw)
    up.respond(b"HTTP/1.1 299 Quite Unusual Reason\r\nContent-Length: 0\r\n\r\n")
    parsed = response(client)
    assert (parsed.status, parsed.reason) == (299, b"Quite Unusual Reason")


def test_header_names_pass_byte_exact_both_ways(gateway: Callable[..., Gateway]) -> None:
    """Header names reach the next hop spelt as they were sent (no re-casing), values unchanged, each in one head;
    the headers the gateway adds have its own spelling."""
    gw = gateway()
    client = gw.client()
    client.send(b"GET / HTTP/1.1\r\nHost: example.test\r\nx-lower-case: a\r\nX-MiXeD: b c\r\n\r\n")
    up = gw.upstream()
    head = up.received()
    assert b"\r\nx-lower-case: a\r\n" in head and b"\r\nX-MiXeD: b c\r\n" in head
    assert b"\r\nX-Forwarded-For: 10.0.0.1\r\n" in head
    up.respond(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-UPSTREAM: 1\r\nContent-Length: 0\r\n\r\n")
    answer = client.received()
    assert b"\r\ncontent-type: text/plain\r\n" in answer and b"\r\nx-UPSTREAM: 1\r\n" in answer


def test_get_sends_method_path_and_query_unchanged(gateway: Callable[..., Gateway]) -> None:
    """The upstream receives the client's method, path and query bytes as they were sent."""
    gw = gateway()
    client = gw.client()
    client.send(b"GET /a%2Fb/c;p?q=1&q=%20 HTTP/1.1\r\nHost: example.test\r\n\r\n")
    up = gw.upstream()
    assert up.received().startswith(b"GET /a%2Fb/c;p?q=1&q=%20 HTTP/1.1\r\n")
    up.respond(OK_5)


def test_get_relays_the_body_and_end_to_end_headers(gateway: Callable[..., Gateway]) -> None:
    """End-to-end response headers, repeated ones included, and the body reach the client unchanged."""
    gw = gateway()
    client, _req, up = start_get(gw)
    up.respond(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/csv\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        b'ETag: "v1"\r\nContent-Length: 5\r\n\r\nhello'
    )
    parsed = response(client)
    assert parsed.header(b"Content-Type") == b"text/csv"
    assert parsed.headers_named(b"Set-Cookie") == [b"a=1", b"b=2"]
    assert parsed.header(b"ETag") == b'"v1"'
    assert (parsed.body, parsed.complete) == (b"hello", True)


def test_get_strips_hop_by_hop_response_headers(gateway: Callable[..., Gateway]) -> None:
    """Hop-by-hop response headers (the fixed list) do not reach the client."""
    gw = gateway()
    client, _req, up = start_get(gw)
    up.respond(
        b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nTrailer: X-Sum\r\n"
        b"Upgrade: h2c\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
    )
    assert names(response(client)).isdisjoint(
        {b"keep-alive", b"proxy-authenticate", b"trailer", b"upgrade", b"connection"}
    )


def test_get_strips_response_headers_named_in_connection(gateway: Callable[..., Gateway]) -> None:
    """A response header the upstream names in its Connection header is hop-by-hop and does not reach the client."""
    gw = gateway()
    client, _req, up = start_get(gw)
    up.respond(b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: secret\r\nX-Kept: 1\r\nContent-Length: 0\r\n\r\n")
    parsed = response(client)
    assert parsed.header(b"X-Kept") == b"1"
    assert parsed.header(b"X-Hop") is None


def test_get_strips_hop_by_hop_request_headers(gateway: Callable[..., Gateway]) -> None:
    """Hop-by-hop request headers, and those the client names in Connection, do not reach the upstream."""
    gw = gateway()
    client = gw.client()
    client.send(
        b"GET / HTTP/1.1\r\nHost: example.test\r\nConnection: X-Client-Hop\r\nX-Client-Hop: 1\r\nTE: trailers\r\n"
        b"Keep-Alive: 300\r\nProxy-Authorization: Basic eA==\r\nX-Kept: 1\r\n\r\n"
    )
    up = gw.upstream()
    head = up.received().lower()
    assert b"\r\nx-kept: 1\r\n" in head
    for name in (b"x-client-hop", b"te", b"keep-alive", b"proxy-authorization"):
        assert b"\r\n" + name + b":" not in head
    up.respond(OK_5)


def test_get_adds_via_and_request_id(gateway: Callable[..., Gateway]) -> None:
    """The client response gets Via (appended to the upstream's) and the same X-Request-ID the upstream was sent."""
    gw = gateway()
    client, _req, up = start_get(gw)
    sent_id = [line for line in up.received().split(b"\r\n") if line.startswith(b"X-Request-Id: ")]
    assert len(sent_id) == 1
    up.respond(b"HTTP/1.1 200 OK\r\nVia: 1.0 cache\r\nContent-Length: 0\r\n\r\n")
    parsed = response(client)
    assert parsed.header(b"Via") == b"1.0 cache, 1.1 gateway"
    assert b"X-Request-Id: " + parsed.header(b"X-Request-ID") == sent_id[0]  # type: ignore[operator]


def test_get_keeps_the_clients_request_id(gateway: Callable[..., Gateway]) -> None:
    """A sane X-Request-ID from the client is used for the upstream request and the response."""
    gw = gateway()
    client, _req, up = start_get(gw, b"GET / HTTP/1.1\r\nHost: example.test\r\nX-Request-ID: abc-123\r\n\r\n")
    assert b"\r\nX-Request-Id: abc-123\r\n" in up.received()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert response(client).header(b"X-Request-ID") == b"abc-123"


def test_get_keeps_the_upstreams_content_length(gateway: Callable[..., Gateway]) -> None:
    """A response with a Content-Length keeps it (no switch to chunked)."""
    gw = gateway()
    client, _req, up = start_get(gw)
    up.respond(OK_5)
    parsed = response(client)
    assert parsed.header(b"Content-Length") == b"5"
    assert parsed.header(b"Transfer-Encoding") is None
    assert (parsed.body, parsed.complete, parsed.rest) == (b"hello", True, b"")


def test_get_without_content_length_is_relayed_chunked(gateway: Callable[..., Gateway]) -> None:
    """A chunked upstream response reaches the client chunked, with its terminator once the upstream's came."""
    gw = gateway()
    client, req, up = start_get(gw)
    up.respond(CHUNKED_HEAD + chunk(b"abc") + chunk(b"defg"))
    assert not response(client).complete
    up.respond(b"0\r\n\r\n")
    parsed = response(client)
    assert parsed.header(b"Transfer-Encoding") == b"chunked"
    assert parsed.header(b"Content-Length") is None
    assert (parsed.body, parsed.complete) == (b"abcdefg", True)
    assert req.phase is Phase.DONE


def test_close_delimited_upstream_body_is_relayed_chunked_and_completed(gateway: Callable[..., Gateway]) -> None:
    """A body the upstream delimits by closing is relayed chunked, and completed when the upstream closes."""
    gw = gateway()
    client, req, up = start_get(gw)
    up.respond(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nsome data")
    up.close()
    parsed = response(client)
    assert (parsed.body, parsed.complete) == (b"some data", True)
    assert req.ending == "completed"


def test_head_keeps_content_length_without_a_body(gateway: Callable[..., Gateway]) -> None:
    """A HEAD response keeps the upstream's Content-Length and carries no body."""
    gw = gateway()
    client, req, up = start_get(gw, b"HEAD /r HTTP/1.1\r\nHost: example.test\r\n\r\n")
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    parsed = response(client, head_request=True)
    assert parsed.header(b"Content-Length") == b"1234"
    assert parsed.header(b"Transfer-Encoding") is None
    assert client.received().endswith(b"\r\n\r\n")
    assert parsed.rest == b""
    assert req.phase is Phase.DONE
    assert not client.transport.disconnecting


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
def test_no_body_statuses_have_no_body(gateway: Callable[..., Gateway], status: bytes) -> None:
    """204 and 304 responses are relayed with no body and no framing of one (no chunked terminator)."""
    gw = gateway()
    client, req, up = start_get(gw)
    up.respond(b"HTTP/1.1 " + status + b'\r\nETag: "v1"\r\n\r\n')
    received = client.received()
    assert received.startswith(b"HTTP/1.1 " + status + b"\r\n")
    assert received.endswith(b"\r\n\r\n")
    assert received.count(b"\r\n\r\n") == 1
    assert b"transfer-encoding" not in received.lower()
    assert req.phase is Phase.DONE
    assert not client.transport.disconnecting


def test_no_headers_are_invented(gateway: Callable[..., Gateway]) -> None:
    """The gateway adds no Content-Type, Server or Date the upstream did not send; only Via and X-Request-ID."""
    gw = gateway()
    client, _req, up = start_get(gw)
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert names(response(client)) == {b"content-length", b"via", b"x-request-id"}


def test_response_head_is_written_before_any_body_byte(gateway: Callable[..., Gateway]) -> None:
    """The response head goes out as soon as it arrives, and each event after it as it comes (server-sent events)."""
    gw = gateway()
    client, _req, up = start_get(gw)
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    head = client.received()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head.endswith(b"\r\n\r\n")
    up.respond(chunk(b"data: 1\n\n"))
    assert client.received() == head + chunk(b"data: 1\n\n")
    up.respond(b"0\r\n\r\n")


def test_keep_alive_connection_serves_a_second_request(gateway: Callable[..., Gateway]) -> None:
    """After a complete response the client connection stays open and its next request is proxied too."""
    gw = gateway()
    client, _req, up = start_get(gw)
    up.respond(OK_5)
    assert not client.transport.disconnecting
    client.transport.clear()
    client.send(b"GET /second HTTP/1.1\r\nHost: example.test\r\n\r\n")
    assert up.received().count(b"GET /second HTTP/1.1") == 1  # the pooled connection is reused
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
    assert response(client).body == b"two"


def test_pipelined_requests_are_answered_in_order(gateway: Callable[..., Gateway]) -> None:
    """Two requests sent at once are answered in the order they were sent, each with its own response."""
    gw = gateway()
    client = gw.client()
    client.send(b"GET /first HTTP/1.1\r\nHost: example.test\r\n\r\nGET /second HTTP/1.1\r\nHost: example.test\r\n\r\n")
    up = gw.upstream()
    assert b"/second" not in up.received()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
    assert b"GET /second HTTP/1.1" in up.received()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
    first = response(client)
    second = parse_response(first.rest)
    assert (first.body, second.body) == (b"first", b"second")
    assert second.rest == b""


def test_connection_close_with_other_tokens_is_honoured(gateway: Callable[..., Gateway]) -> None:
    """A client's "Connection: close, TE" closes the connection after the response (Twisted alone misses it)."""
    gw = gateway()
    client, _req, up = start_get(gw, b"GET / HTTP/1.1\r\nHost: example.test\r\nConnection: close, TE\r\n\r\n")
    up.respond(OK_5)
    parsed = response(client)
    assert parsed.header(b"Connection") == b"close"
    assert parsed.body == b"hello"
    assert client.transport.disconnecting
    assert not client.transport.aborted


# === backpressure ===========================================================================================


def test_slow_client_pauses_the_upstream_socket(gateway: Callable[..., Gateway]) -> None:
    """A full client socket pauses the upstream socket, and its draining resumes it."""
    gw = gateway()
    client, _req, up = start_get(gw)
    up.respond(CHUNKED_HEAD + chunk(b"x" * 100))
    assert up.transport.producerState == "producing"
    client.transport.producer.pauseProducing()
    assert up.transport.producerState == "paused"
    client.transport.producer.pauseProducing()  # Twisted pauses again on every write while full
    assert up.transport.producerState == "paused"
    client.transport.producer.resumeProducing()
    assert up.transport.producerState == "producing"
    up.respond(b"0\r\n\r\n")
    assert response(client).complete


def test_slow_upstream_pauses_the_client_socket(gateway: Callable[..., Gateway]) -> None:
    """An upstream that stops reading makes the gateway stop reading the client once the high-water mark is passed."""
    gw = gateway(flow_control={"high_water": 100, "low_water": 50})
    client = gw.client()
    client.send(post(1000))
    up = gw.upstream()
    up.transport.producer.pauseProducing()  # the upstream socket buffer is full
    client.send(b"a" * 100)
    assert client.transport.producerState == "producing"
    client.send(b"b")
    assert client.transport.producerState == "paused"


def test_upload_resumes_the_client_when_the_upstream_drains(gateway: Callable[..., Gateway]) -> None:
    """Once the upstream takes the buffered body, the client is read again and every byte arrives in order."""
    gw = gateway(flow_control={"high_water": 100, "low_water": 50})
    client = gw.client()
    client.send(post(300))
    up = gw.upstream()
    pipe = up.transport.producer
    pipe.pauseProducing()
    client.send(b"a" * 150)
    assert client.transport.producerState == "paused"
    pipe.resumeProducing()
    assert client.transport.producerState == "producing"
    client.send(b"b" * 150)
    assert upstream_body(up) == b"a" * 150 + b"b" * 150
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert response(client).status == 200


def test_upload_is_repaused_when_the_channel_resumes_the_client(gateway: Callable[..., Gateway]) -> None:
    """If the channel resumes a client the pipe paused, the next chunk pauses it again: the bound holds."""
    gw = gateway(flow_control={"high_water": 100, "low_water": 50})
    client = gw.client()
    client.send(post(1000))
    up = gw.upstream()
    up.transport.producer.pauseProducing()
    client.send(b"a" * 101)
    assert client.transport.producerState == "paused"
    client.transport.resumeProducing()  # e.g. HTTPChannel.resumeProducing while the body still arrives
    client.send(b"b")
    assert client.transport.producerState == "paused"


# === request bodies ============================================================================================


def test_content_length_body_is_forwarded_as_it_arrives(gateway: Callable[..., Gateway]) -> None:
    """Each piece of a Content-Length body reaches the upstream as soon as it arrives, under the same length."""
    gw = gateway()
    client = gw.client()
    client.send(post(6))
    up = gw.upstream()
    assert b"\r\nContent-Length: 6\r\n" in up.received()
    client.send(b"abc")
    assert upstream_body(up) == b"abc"
    client.send(b"def")
    assert upstream_body(up) == b"abcdef"
    up.respond(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert response(client).status == 201


def test_chunked_body_is_forwarded_chunked_as_it_arrives(gateway: Callable[..., Gateway]) -> None:
    """Each chunk of a chunked body reaches the upstream at once; the terminator follows the client's."""
    gw = gateway()
    client = gw.client()
    client.send(post(None))
    up = gw.upstream()
    assert b"\r\nTransfer-Encoding: chunked\r\n" in up.received()
    client.send(chunk(b"abc"))
    assert upstream_body(up) == chunk(b"abc")
    client.send(chunk(b"defgh"))
    assert upstream_body(up) == chunk(b"abc") + chunk(b"defgh")
    client.send(b"0\r\n\r\n")
    assert upstream_body(up) == chunk(b"abc") + chunk(b"defgh") + b"0\r\n\r\n"
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert response(client).status == 200


def test_body_received_before_the_upstream_connection_opens_is_forwarded(gateway: Callable[..., Gateway]) -> None:
    """A small body that arrives with its head, before the upstream connection is open, is sent once it opens."""
    gw = gateway()
    client = gw.client()
    client.send(post(5) + b"hello")
    up = gw.upstream()
    assert upstream_body(up) == b"hello"
    assert not closed(up)
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert response(client).status == 200


def test_chunked_body_received_before_the_connection_opens_is_forwarded(gateway: Callable[..., Gateway]) -> None:
    """A whole chunked body that arrives before the upstream connection opens is sent, terminated, once it opens."""
    gw = gateway()
    client = gw.client()
    client.send(post(None) + chunk(b"hello") + b"0\r\n\r\n")
    up = gw.upstream()
    assert upstream_body(up) == chunk(b"hello") + b"0\r\n\r\n"
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert response(client).status == 200


def test_expect_continue_is_answered_when_admitted(gateway: Callable[..., Gateway]) -> None:
    """An admitted upload with Expect: 100-continue gets "100 Continue", and Expect is not sent upstream."""
    gw = gateway()
    client = gw.client()
    client.send(post(5, b"Expect: 100-continue"))
    assert client.received() == CONTINUE
    up = gw.upstream()
    assert b"expect" not in up.received().lower()
    client.send(b"hello")
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert response(client).status == 200


# --- a declared length over the limit: rejected on the head ------------------------------------------------


def test_declared_length_over_limit_gets_413_without_continue_or_upstream(gateway: Callable[..., Gateway]) -> None:
    """A Content-Length over the limit is answered 413 at once: no 100 Continue, no upstream connection asked for."""
    gw = gateway(limits={"max_request_body_bytes": 10})
    client = gw.client()
    client.send(post(11, b"Expect: 100-continue"))
    assert not client.received().startswith(CONTINUE)
    assert b"100 Continue" not in client.received()
    parsed = response(client)
    assert parsed.status == 413
    assert parsed.header(b"Connection") == b"close"
    assert problem_of(parsed)["status"] == 413
    assert gw.pending_connections() == 0
    client.send(b"x" * 11)


def test_rejected_upload_body_is_discarded_then_the_connection_closes(gateway: Callable[..., Gateway]) -> None:
    """The body of a rejected upload is read and dropped (never parsed as a request); the close follows its end."""
    gw = gateway(limits={"max_request_body_bytes": 10})
    client = gw.client()
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: example.test\r\n\r\n"
    client.send(post(len(smuggled) + 4))
    req = client.request
    answer = client.received()
    assert not client.transport.disconnecting  # closing with unread data would reset the connection
    client.send(smuggled)
    assert not client.transport.disconnecting
    client.send(b"tail")
    assert client.received() == answer
    assert client.transport.disconnecting
    assert not client.transport.aborted
    assert req.phase is Phase.DONE
    assert gw.pending_connections() == 0


def test_rejected_upload_answer_is_followed_by_a_half_close(gateway: Callable[..., Gateway]) -> None:
    """Once the answer to a rejected upload is written, the gateway half-closes (lingering close): the client
    learns the answer is all there while the rest of its body is still read and dropped."""
    gw = gateway(limits={"max_request_body_bytes": 10})
    client = gw.client()
    client.send(post(100))
    assert response(client).status == 413
    assert client.transport.write_closed
    assert not client.transport.disconnecting
    client.send(b"x" * 100)
    assert client.transport.disconnecting and not client.transport.aborted


def test_rejected_upload_lingering_timeout_aborts_the_client(gateway: Callable[..., Gateway]) -> None:
    """A rejected upload whose body never ends is cut after exactly server.lingering_timeout; not before."""
    gw = gateway(limits={"max_request_body_bytes": 10}, server={"lingering_timeout": 5})
    client = gw.client()
    client.send(post(100))
    req = client.request
    client.send(b"x" * 20)
    gw.advance(5 - EPS)
    assert not client.transport.disconnecting
    gw.advance(EPS)
    assert client.transport.aborted
    assert req.ending == "lingering_timeout"
    assert response(client).status == 413


# --- a chunked body crossing the limit ---------------------------------------------------------------------


def test_declared_length_at_the_limit_is_admitted(gateway: Callable[..., Gateway]) -> None:
    """A Content-Length of exactly the limit is admitted and forwarded."""
    gw = gateway(limits={"max_request_body_bytes": 10})
    client = gw.client()
    client.send(post(10, b"Expect: 100-continue"))
    assert client.received() == CONTINUE
    up = gw.upstream()
    client.send(b"x" * 10)
    assert upstream_body(up) == b"x" * 10
    up.respond(OK_5)
    assert response(client).status == 200


def test_chunked_body_of_exactly_the_limit_is_forwarded_whole(gateway: Callable[..., Gateway]) -> None:
    """A chunked body of exactly the limit is forwarded, terminator included, and answered by the upstream."""
    gw = gateway(limits={"max_request_body_bytes": 10})
    client = gw.client()
    client.send(post(None))
    up = gw.upstream()
    client.send(chunk(b"a" * 6) + chunk(b"b" * 4) + b"0\r\n\r\n")
    assert upstream_body(up) == chunk(b"a" * 6) + chunk(b"b" * 4) + b"0\r\n\r\n"
    up.respond(OK_5)
    assert response(client).status == 200


def test_chunked_body_over_limit_aborts_the_upstream_and_answers_413(gateway: Callable[..., Gateway]) -> None:
    """A chunked body crossing the limit aborts the upstream request (no terminator) and gets 413 with a close."""
    gw = gateway(limits={"max_request_body_bytes": 10})
    client = gw.client()
    client.send(post(None))
    up = gw.upstream()
    client.send(chunk(b"a" * 8))
    assert client.received() == b""
    client.send(chunk(b"b" * 8))
    assert closed(up)
    assert not upstream_body(up).endswith(b"0\r\n\r\n")
    parsed = response(client)
    assert parsed.status == 413
    assert parsed.header(b"Connection") == b"close"
    client.send(chunk(b"c" * 8) + b"0\r\n\r\n")  # read and dropped; then the connection closes
    assert client.transport.disconnecting
    assert not client.transport.aborted


def test_an_answer_mid_upload_is_relayed_at_once_and_a_body_then_over_the_limit_cuts_both_ends(
    gateway: Callable[..., Gateway],
) -> None:
    """Full duplex: an upstream head that comes mid-upload is relayed at once, its body as it comes. A request body
    that then crosses the limit can no longer be answered 413 (a response has begun): both connections are cut,
    so the response does not look complete and the upstream never gets a terminator."""
    gw = gateway(limits={"max_request_body_bytes": 10})
    client = gw.client()
    client.send(post(None))
    req = client.request
    up = gw.upstream()
    client.send(chunk(b"a" * 8))
    up.respond(CHUNKED_HEAD + chunk(b"early"))
    assert client.received().startswith(b"HTTP/1.1 200 OK\r\n")
    assert client.received().endswith(b"5\r\nearly\r\n")
    client.send(chunk(b"b" * 8))
    assert req.ending == "body_too_large"
    assert client.transport.aborted
    assert closed(up)
    assert not upstream_body(up).endswith(b"0\r\n\r\n")
    assert b"b" not in upstream_body(up)


# --- routing ----------------------------------------------------------------------------------------------------


def test_no_route_gets_404_without_an_upstream_connection(gateway: Callable[..., Gateway]) -> None:
    """A request no route matches is answered 404 problem+json, and no upstream connection is asked for."""
    gw = gateway(route={"path_prefix": "/api"})
    client = gw.client()
    client.send(b"GET /other HTTP/1.1\r\nHost: example.test\r\nX-Request-ID: rid-404\r\n\r\n")
    parsed = response(client)
    assert parsed.status == 404
    body = problem_of(parsed)
    assert (body["status"], body["request_id"]) == (404, "rid-404")
    assert parsed.header(b"X-Request-ID") == b"rid-404"
    assert gw.pending_connections() == 0
    assert not client.transport.disconnecting  # a body-less request keeps the connection


# === timeouts ========================================================================================================


def test_connect_timeout_gets_504_after_exactly_connect_seconds(gateway: Callable[..., Gateway]) -> None:
    """An upstream connection that does not open within timeouts.connect is answered 504; not a moment before."""
    gw = gateway(timeouts={"connect": 3})
    client = gw.client()
    client.send(GET)
    assert len(gw.reactor.tcpClients) == 1
    gw.advance(3 - EPS)
    assert client.received() == b""
    gw.advance(EPS)
    parsed = response(client)
    assert parsed.status == 504
    assert "connect" in problem_of(parsed)["detail"]


def test_response_headers_timeout_gets_504_after_exactly_its_time(gateway: Callable[..., Gateway]) -> None:
    """An upstream that sends no response head within timeouts.response_headers is answered 504 and cut off."""
    gw = gateway(timeouts={"response_headers": 7})
    client, req, up = start_get(gw)
    gw.advance(7 - EPS)
    assert client.received() == b""
    gw.advance(EPS)
    assert response(client).status == 504
    assert closed(up)
    assert req.phase is Phase.DONE


def test_response_headers_timeout_starts_after_the_body_was_sent(gateway: Callable[..., Gateway]) -> None:
    """For an upload, the wait for the response head is measured from the last body byte handed to the upstream."""
    gw = gateway(timeouts={"response_headers": 7, "client_body_idle": 1000})
    client = gw.client()
    client.send(post(10))
    up = gw.upstream()
    client.send(b"12345")
    gw.advance(100)
    assert client.received() == b""
    client.send(b"67890")
    gw.advance(7 - EPS)
    assert client.received() == b""
    gw.advance(EPS)
    assert response(client).status == 504
    assert closed(up)


def test_upstream_idle_mid_body_aborts_the_client(gateway: Callable[..., Gateway]) -> None:
    """An upstream silent for timeouts.upstream_idle mid-body cuts the client without a chunked terminator."""
    gw = gateway(timeouts={"upstream_idle": 9})
    client, req, up = start_get(gw)
    up.respond(CHUNKED_HEAD + chunk(b"part"))
    gw.advance(9 - EPS)
    assert not client.transport.disconnecting
    gw.advance(EPS)
    assert client.transport.aborted
    assert not client.received().endswith(b"0\r\n\r\n")
    assert not response(client).complete
    assert req.ending == "upstream_idle"
    assert closed(up)


def test_an_event_stream_with_heartbeats_lives_past_upstream_idle_until_it_goes_quiet(
    gateway: Callable[..., Gateway],
) -> None:
    """A route's upstream_idle bounds the silence between body bytes, never the stream's length: an event stream
    whose heartbeat comes within it lives on (here 100 heartbeats, 900 s against 10 s), and is cut once it does not."""
    gw = gateway(route={"timeouts": {"upstream_idle": 10}})
    metrics = Metrics(lambda: pytest.fail("no scrape here"))
    gw.gateway = dataclasses.replace(gw.gateway, metrics=metrics)
    gw.factory = RecordingFactory(gw.gateway, clock=gw.reactor)
    client, req, up = start_get(gw)
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(100):
        gw.advance(9)
        up.respond(chunk(b": heartbeat\n\n"))
    assert req.phase is Phase.STREAMING and not client.transport.disconnecting
    assert response(client).body == b": heartbeat\n\n" * 100
    gw.advance(10 - EPS)
    assert not client.transport.disconnecting
    gw.advance(EPS)
    assert client.transport.aborted and not response(client).complete
    assert req.ending == "upstream_idle"
    assert metrics.requests == {("origin", "200", "upstream_idle"): 1}
    assert closed(up)


def test_upstream_idle_does_not_count_while_the_client_is_slow(gateway: Callable[..., Gateway]) -> None:
    """Time the client keeps the relay paused is not upstream idleness: the stream survives past upstream_idle."""
    gw = gateway(timeouts={"upstream_idle": 9, "client_send_stall": 1000})
    client, _req, up = start_get(gw)
    up.respond(CHUNKED_HEAD + chunk(b"part"))
    client.transport.producer.pauseProducing()
    gw.advance(100)
    assert not client.transport.disconnecting
    client.transport.producer.resumeProducing()
    up.respond(b"0\r\n\r\n")
    assert response(client).complete


def test_client_send_stall_aborts_the_client_and_closes_the_upstream(gateway: Callable[..., Gateway]) -> None:
    """A client that accepts nothing for timeouts.client_send_stall is cut, and the upstream connection closed."""
    gw = gateway(timeouts={"client_send_stall": 8})
    client, req, up = start_get(gw)
    up.respond(CHUNKED_HEAD + chunk(b"part"))
    client.transport.producer.pauseProducing()
    gw.advance(8 - EPS)
    assert not client.transport.disconnecting
    gw.advance(EPS)
    assert client.transport.aborted
    assert req.ending == "client_send_stall"
    assert closed(up)


def test_client_body_idle_gets_408_before_the_response(gateway: Callable[..., Gateway]) -> None:
    """A client that sends no body byte for timeouts.client_body_idle is answered 408; not a moment before."""
    gw = gateway(timeouts={"client_body_idle": 6})
    client = gw.client()
    client.send(post(10))
    up = gw.upstream()
    client.send(b"abc")
    gw.advance(6 - EPS)
    assert client.received() == b""
    gw.advance(EPS)
    parsed = response(client)
    assert parsed.status == 408
    assert parsed.header(b"Connection") == b"close"
    assert closed(up)
    assert not upstream_body(up).endswith(b"\r\n0\r\n\r\n")


def test_client_body_idle_does_not_count_while_the_pipe_paused_the_client(gateway: Callable[..., Gateway]) -> None:
    """Time the gateway holds the client paused for a slow upstream is not client idleness."""
    gw = gateway(
        timeouts={"client_body_idle": 6, "upstream_send_stall": 1000},
        flow_control={"high_water": 100, "low_water": 50},
    )
    client = gw.client()
    client.send(post(1000))
    up = gw.upstream()
    up.transport.producer.pauseProducing()
    client.send(b"a" * 101)
    assert client.transport.producerState == "paused"
    gw.advance(60)
    assert client.received() == b""
    up.transport.producer.resumeProducing()
    gw.advance(6 - EPS)
    assert client.received() == b""
    gw.advance(EPS)
    assert response(client).status == 408


def test_upstream_send_stall_gets_504(gateway: Callable[..., Gateway]) -> None:
    """An upstream that accepts none of the body for timeouts.upstream_send_stall is answered 504; not before."""
    gw = gateway(timeouts={"upstream_send_stall": 4, "client_body_idle": 1000})
    client = gw.client()
    client.send(post(1000))
    up = gw.upstream()
    client.send(b"a" * 10)
    up.transport.producer.pauseProducing()
    client.send(b"b" * 10)
    gw.advance(4 - EPS)
    assert client.received() == b""
    gw.advance(EPS)
    parsed = response(client)
    assert parsed.status == 504
    assert "reading the request body" in problem_of(parsed)["detail"]
    assert closed(up)


def test_idle_timeout_does_not_cut_an_upload_paused_for_the_upstream(gateway: Callable[..., Gateway]) -> None:
    """Twisted's channel idle timeout does not close a client the gateway holds paused for a slow upstream."""
    gw = gateway(
        server={"idle_timeout": 10},
        timeouts={"upstream_send_stall": 1000, "client_body_idle": 1000},
        flow_control={"high_water": 100, "low_water": 50},
    )
    client = gw.client()
    client.send(post(200))
    up = gw.upstream()
    up.transport.producer.pauseProducing()
    client.send(b"a" * 101)
    gw.advance(100)
    assert not client.transport.disconnecting
    up.transport.producer.resumeProducing()
    client.send(b"b" * 99)
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert response(client).status == 200


def test_keep_alive_idle_timeout_is_restored_after_an_upload(gateway: Callable[..., Gateway]) -> None:
    """After an upload's response, an idle keep-alive connection is closed after exactly server.idle_timeout again."""
    gw = gateway(server={"idle_timeout": 10})
    client = gw.client()
    client.send(post(5))
    up = gw.upstream()
    client.send(b"hello")
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert response(client).status == 200
    gw.advance(10 - EPS)
    assert not client.transport.disconnecting
    gw.advance(EPS)
    assert client.transport.disconnecting


def test_keep_alive_idle_timeout_is_restored_after_a_get(gateway: Callable[..., Gateway]) -> None:
    """After a GET's response, an idle keep-alive connection is closed after exactly server.idle_timeout."""
    gw = gateway(server={"idle_timeout": 10})
    client, _req, up = start_get(gw)
    up.respond(OK_5)
    gw.advance(10 - EPS)
    assert not client.transport.disconnecting
    gw.advance(EPS)
    assert client.transport.disconnecting


# === upstream failures ===============================================================================================


def test_connection_refused_gets_502(gateway: Callable[..., Gateway]) -> None:
    """An upstream that refuses the connection is answered 502 problem+json."""
    gw = gateway()
    client = gw.client()
    client.send(GET)
    gw.fail_connection(ConnectionRefusedError())
    parsed = response(client)
    assert parsed.status == 502
    assert problem_of(parsed)["status"] == 502


@implementer(IHostnameResolver)
class _NoSuchHost:
    """A name resolver that finds no address for any name (an unresolvable upstream)."""

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0, **kwargs: Any) -> Any:
        receiver.resolutionBegan(None)
        receiver.resolutionComplete()


def test_unresolvable_upstream_gets_502(failures: list[LogEvent]) -> None:
    """An upstream whose host name does not resolve is answered 502, without waiting for any timeout."""
    gw = Gateway(gateway_config("http://upstream.invalid:8000"))
    directlyProvides(gw.reactor, IReactorPluggableNameResolver)
    gw.reactor.nameResolver = _NoSuchHost()
    client = gw.client()
    client.send(GET)
    parsed = response(client)
    assert parsed.status == 502
    assert problem_of(parsed)["title"] == "Upstream unreachable"
    gw.settle()
    assert gw.reactor.getDelayedCalls() == []
    assert failures == []


def test_upstream_closing_before_answering_gets_502(gateway: Callable[..., Gateway]) -> None:
    """An upstream that closes the connection without a response head is answered 502."""
    gw = gateway()
    client, req, up = start_get(gw)
    up.close()
    assert response(client).status == 502
    assert req.phase is Phase.DONE


def test_upstream_closing_during_an_upload_gets_502_and_a_bounded_linger(gateway: Callable[..., Gateway]) -> None:
    """An upstream that closes while the body is still coming (its socket stops the pipe before Agent reports
    the failure, as real TCP orders it) gets the client a 502, and the rest of the body is dropped for at most
    server.lingering_timeout."""
    gw = gateway(server={"lingering_timeout": 5})
    client = gw.client()
    client.send(post(None))
    req = client.request
    client.send(chunk(b"hello"))
    up = gw.upstream()
    up.close(ConnectionLost("upstream went away"))
    parsed = response(client)
    assert parsed.status == 502
    assert parsed.header(b"connection") == b"close"
    client.send(chunk(b"more"))
    gw.advance(5 - EPS)
    assert not client.transport.disconnecting
    gw.advance(EPS)
    assert client.transport.aborted
    assert req.ending == "lingering_timeout"


def test_upstream_truncating_a_content_length_body_aborts_the_client(gateway: Callable[..., Gateway]) -> None:
    """An upstream that closes before its Content-Length is met makes the gateway abort the client, never finish."""
    gw = gateway()
    client, req, up = start_get(gw)
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    up.close(ConnectionLost("cut"))
    assert client.transport.aborted
    assert req.phase is Phase.ABORTED
    assert req.ending == "upstream_truncated"
    assert not response(client).complete
    assert not client.channel.response_ended  # no last chunk, no end: the body never looks complete


def test_upstream_truncating_a_chunked_body_aborts_the_client(gateway: Callable[..., Gateway]) -> None:
    """An upstream that closes a chunked body without its terminator makes the gateway abort the client."""
    gw = gateway()
    client, req, up = start_get(gw)
    up.respond(CHUNKED_HEAD + chunk(b"hello"))
    up.close()
    assert client.transport.aborted
    assert not client.received().endswith(b"0\r\n\r\n")
    assert req.ending == "upstream_truncated"
    assert not client.channel.response_ended  # no last chunk, no end: the body never looks complete


# === the client going away ===========================================================================================


def test_client_leaving_while_connecting_abandons_the_connection_attempt(gateway: Callable[..., Gateway]) -> None:
    """A client that leaves before the upstream connection opened cancels the attempt and its connect timer."""
    gw = gateway()
    client = gw.client()
    client.send(GET)
    req = client.request
    client.disconnect()
    assert req.phase is Phase.CLIENT_GONE
    assert gw.reactor.getDelayedCalls() == []


def test_client_leaving_while_waiting_for_the_head_closes_the_upstream(gateway: Callable[..., Gateway]) -> None:
    """A client that leaves while the upstream prepares its answer makes the gateway close that connection at once."""
    gw = gateway()
    client, req, up = start_get(gw)
    client.disconnect()
    assert closed(up)
    assert req.phase is Phase.CLIENT_GONE


def test_client_leaving_mid_response_closes_the_upstream(gateway: Callable[..., Gateway]) -> None:
    """A client that leaves mid-response makes the gateway close the upstream connection at once."""
    gw = gateway()
    client, req, up = start_get(gw)
    up.respond(CHUNKED_HEAD + chunk(b"part"))
    client.disconnect()
    assert closed(up)
    assert req.phase is Phase.CLIENT_GONE
    up.respond(chunk(b"late"))  # the rest of a read already under way goes nowhere
    assert client.received().count(b"late") == 0


def test_client_leaving_mid_upload_aborts_the_upstream_request(gateway: Callable[..., Gateway]) -> None:
    """A client that leaves mid-upload makes the gateway abort the upstream request, which never sees a body end."""
    gw = gateway()
    client = gw.client()
    client.send(post(None))
    req = client.request
    up = gw.upstream()
    client.send(chunk(b"abc"))
    client.disconnect()
    assert closed(up)
    assert not upstream_body(up).endswith(b"0\r\n\r\n")
    assert req.phase is Phase.CLIENT_GONE


def test_client_leaving_mid_upload_while_paused_aborts_the_upstream(gateway: Callable[..., Gateway]) -> None:
    """A client that leaves while the gateway holds it paused for a slow upstream still aborts the upstream request."""
    gw = gateway(flow_control={"high_water": 100, "low_water": 50})
    client = gw.client()
    client.send(post(1000))
    up = gw.upstream()
    up.transport.producer.pauseProducing()
    client.send(b"a" * 101)
    assert client.transport.producerState == "paused"
    client.disconnect()
    assert closed(up)
    assert len(upstream_body(up)) < 1000


# === the upstream queue ==============================================================================================


def queue_gateway(gateway: Callable[..., Gateway]) -> Gateway:
    return gateway(upstream={"max_connections": 1, "max_queue": 1, "queue_timeout": 3})


def test_full_queue_gets_503_at_once(gateway: Callable[..., Gateway]) -> None:
    """With one request in flight and one queued, a third is answered 503 at once, without a connection."""
    gw = queue_gateway(gateway)
    first, _req, up = start_get(gw)
    second = gw.client()
    second.send(GET)
    third = gw.client()
    third.send(GET)
    assert response(third).status == 503
    assert second.received() == b""
    assert gw.pending_connections() == 0
    up.respond(OK_5)
    second_up = gw.upstreams[0]  # the slot and the pooled connection go to the queued request
    second_up.respond(OK_5)
    assert response(first).body == b"hello"
    assert response(second).body == b"hello"


def test_queued_request_gets_503_after_exactly_queue_timeout(gateway: Callable[..., Gateway]) -> None:
    """A request that waits queue_timeout seconds for a free connection is answered 503; not a moment before."""
    gw = queue_gateway(gateway)
    first, _req, up = start_get(gw)
    second = gw.client()
    second.send(GET)
    gw.advance(3 - EPS)
    assert second.received() == b""
    gw.advance(EPS)
    assert response(second).status == 503
    assert first.received() == b""
    up.respond(OK_5)
    assert response(first).status == 200


def test_a_saturated_upstream_given_as_a_url_is_named_by_the_route(gateway: Callable[..., Gateway]) -> None:
    """An upstream a route gives as a URL has the default caps (256 in flight); the 503 of a request that waited
    its queue_timeout (10 s) names the route, never the URL (its pool serves every route naming that URL)."""
    gw = gateway(route={"name": "reports", "upstream": UPSTREAM})
    in_flight = [start_get(gw) for _ in range(256)]
    waiting = gw.client()
    waiting.send(GET)
    gw.advance(10)
    parsed = response(waiting)
    assert parsed.status == 503
    detail = json.loads(parsed.body)["detail"]
    assert detail == "no connection to the upstream of route reports came free within 10 s"
    for client, _req, up in in_flight:
        up.respond(OK_5)
        assert response(client).status == 200


def test_released_slot_goes_to_the_next_waiter(gateway: Callable[..., Gateway]) -> None:
    """When the request in flight ends, the queued one is sent upstream and answered."""
    gw = queue_gateway(gateway)
    first, _req, up = start_get(gw)
    second = gw.client()
    second.send(b"GET /second HTTP/1.1\r\nHost: example.test\r\n\r\n")
    assert b"/second" not in up.received()
    up.respond(OK_5)
    assert response(first).body == b"hello"
    assert b"GET /second HTTP/1.1" in up.received()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
    assert response(second).body == b"second"
    gw.advance(3)  # the granted waiter's queue timeout is gone
    assert response(second).status == 200


def test_client_leaving_the_queue_frees_its_place(gateway: Callable[..., Gateway]) -> None:
    """A queued client that leaves gives up its place: the next request is queued instead of refused."""
    gw = queue_gateway(gateway)
    _first, _req, up = start_get(gw)
    second = gw.client()
    second.send(GET)
    second.disconnect()
    third = gw.client()
    third.send(GET)
    assert third.received() == b""
    up.respond(OK_5)
    up.respond(OK_5)
    assert response(third).status == 200


def test_client_leaving_while_waiting_for_the_head_frees_the_slot(gateway: Callable[..., Gateway]) -> None:
    """A client that leaves while its upstream has not answered gives its connection slot to the next request."""
    gw = queue_gateway(gateway)
    first, _req, _up = start_get(gw)
    first.disconnect()
    second = gw.client()
    second.send(GET)
    assert gw.pending_connections() == 1
    gw.upstream().respond(OK_5)
    assert response(second).status == 200


def test_response_headers_timeout_frees_the_slot(gateway: Callable[..., Gateway]) -> None:
    """After a 504 for a silent upstream, its connection slot goes to the next request at once."""
    gw = gateway(upstream={"max_connections": 1, "max_queue": 1}, timeouts={"response_headers": 7})
    first, _req, _up = start_get(gw)
    gw.advance(7)
    assert response(first).status == 504
    second = gw.client()
    second.send(GET)
    assert gw.pending_connections() == 1
    gw.upstream().respond(OK_5)
    assert response(second).status == 200


def test_client_leaving_mid_response_frees_the_slot(gateway: Callable[..., Gateway]) -> None:
    """A client that leaves mid-response has its upstream connection closed and its slot given to the next request."""
    gw = queue_gateway(gateway)
    first, _req, up = start_get(gw)
    up.respond(CHUNKED_HEAD + chunk(b"part"))
    first.disconnect()
    up.close()  # the closed connection's loss arrives, as the kernel reports it
    second = gw.client()
    second.send(GET)
    assert gw.pending_connections() == 1
    gw.upstream().respond(OK_5)
    assert response(second).status == 200


# === an upstream answering before the upload ended ===================================================================


def test_early_upstream_answer_is_relayed_with_connection_close(gateway: Callable[..., Gateway]) -> None:
    """An upstream answering mid-upload has its answer relayed with Connection: close."""
    gw = gateway()
    client = gw.client()
    client.send(post(1000))
    up = gw.upstream()
    client.send(b"a" * 100)
    up.respond(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbig")
    parsed = response(client)
    assert (parsed.status, parsed.body) == (413, b"big")
    assert parsed.header(b"Connection") == b"close"
    assert not client.transport.disconnecting
    client.send(b"b" * 900)


def test_early_upstream_answer_rest_of_body_is_not_parsed_as_a_request(gateway: Callable[..., Gateway]) -> None:
    """After an early answer, the rest of the upload is dropped, never read as a request; the close follows its end."""
    gw = gateway()
    client = gw.client()
    client.send(post(1000))
    up = gw.upstream()
    client.send(b"a" * 100)
    up.respond(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbig")
    answer = client.received()
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: example.test\r\n\r\n"
    client.send(smuggled + b"z" * (900 - len(smuggled)))
    assert client.received() == answer
    assert b" 400 " not in client.received()
    assert client.transport.disconnecting
    assert not client.transport.aborted
    assert len(gw.reactor.tcpClients) == 1


def test_early_upstream_answer_lingering_timeout(gateway: Callable[..., Gateway]) -> None:
    """After an early answer, a body that never ends is cut after exactly server.lingering_timeout."""
    gw = gateway(server={"lingering_timeout": 5})
    client = gw.client()
    client.send(post(1000))
    up = gw.upstream()
    client.send(b"a" * 100)
    up.respond(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
    gw.advance(5 - EPS)
    assert not client.transport.disconnecting
    gw.advance(EPS)
    assert client.transport.aborted
    assert response(client).status == 403


def test_early_chunked_upstream_answer_is_terminated_before_the_body_ends(gateway: Callable[..., Gateway]) -> None:
    """A complete chunked early answer gets its terminator at once, not only when the client's body ends."""
    gw = gateway()
    client = gw.client()
    client.send(post(1000))
    up = gw.upstream()
    client.send(b"a" * 100)
    up.respond(b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"who?") + b"0\r\n\r\n")
    parsed = response(client)
    assert (parsed.status, parsed.body, parsed.complete) == (401, b"who?", True)
    client.send(b"b" * 900)
    assert client.transport.disconnecting


def _pausing_like_tcp(client: Client) -> None:
    """Make the client's transport ask its producer to pause on every write while more than 64 KiB is unsent,
    as Twisted's TCP transport does (`FileDescriptor._maybePauseProducer`); this client reads nothing."""
    transport = client.transport
    write = transport.write

    def write_and_maybe_pause(data: bytes) -> None:
        write(data)
        if len(transport.value()) > 64 * 1024 and transport.producer is not None:
            transport.producer.pauseProducing()

    transport.write = write_and_maybe_pause  # type: ignore[method-assign]
    transport.writeSequence = lambda seq: write_and_maybe_pause(b"".join(seq))  # type: ignore[method-assign]


def test_response_handed_over_after_the_upload_keeps_the_upstream_paused_for_a_full_client(
    gateway: Callable[..., Gateway],
) -> None:
    """An answer Agent held until the upload ended (its head and 100 KB of body came in one read) fills the
    client's buffer when it is handed over; the upstream socket stays paused, although Agent's deliverBody
    resumes it after handing the buffered bytes over."""
    gw = gateway()
    client = gw.client()
    _pausing_like_tcp(client)
    client.send(post(10))
    up = gw.upstream()
    client.send(b"12345")
    up.respond(CHUNKED_HEAD + chunk(b"x" * 100_000))
    client.send(b"67890")  # the body ends: Agent hands the response over, with the 100 KB it buffered
    assert len(client.received()) > 64 * 1024
    assert up.transport.producerState == "paused"


def test_body_pipe_is_let_go_when_the_answer_completes_before_the_body_was_forwarded(
    gateway: Callable[..., Gateway],
) -> None:
    """When the upstream stops reading, then answers completely while the whole body (already read from the
    client) waits in the pipe, the request finishes with no body timer left behind and the upstream connection
    aborted (it cannot be reused, and a graceful close would wait for a body the upstream will not read)."""
    gw = gateway(timeouts={"upstream_send_stall": 30})
    client = gw.client()
    client.send(post(300))
    req = client.request
    up = gw.upstream()
    up.transport.producer.pauseProducing()  # the upstream stops reading
    client.send(b"a" * 300)  # the whole body is read from the client and held in the pipe
    up.respond(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
    assert response(client).status == 403
    assert req.phase is Phase.DONE and not client.transport.disconnecting
    # The body's timers are gone (the connection's one timer, now measuring idle time, is the only one left).
    assert [c.func for c in gw.reactor.getDelayedCalls()] == [client.channel.timer._check]
    assert up.transport.aborted


def test_reset_of_a_close_delimited_upstream_body_aborts_the_client(gateway: Callable[..., Gateway]) -> None:
    """An upstream body framed by the connection's close is complete when the upstream closes, but cut short
    when the connection is reset: the client is then aborted, with no chunked terminator."""
    gw = gateway()
    client, req, up = start_get(gw)
    up.respond(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart")
    up.close(ConnectionLost("Connection reset by peer"))
    assert not response(client).complete
    assert client.transport.aborted
    assert req.ending == "upstream_truncated"


def test_target_with_a_byte_agent_refuses_gets_400_and_logs_no_failure(
    gateway: Callable[..., Gateway], failures: list[LogEvent]
) -> None:
    """A target byte that Twisted's server accepts but Agent refuses (0x7F-0xB0) gets 400 on the head, without an
    upstream connection and without a failure in the log."""
    gw = gateway()
    client = gw.client()
    client.send(b"GET /caf\xa9 HTTP/1.1\r\nHost: example.test\r\n\r\n")
    assert response(client).status == 400
    assert gw.pending_connections() == 0


def test_no_100_continue_follows_a_final_answer_given_on_the_head(gateway: Callable[..., Gateway]) -> None:
    """A body-less request with Expect: 100-continue refused on its head gets its answer and no interim
    `100 Continue` after it."""
    gw = gateway(route={"path_prefix": "/api"})
    client = gw.client()
    client.send(b"POST /nope HTTP/1.1\r\nHost: example.test\r\nContent-Length: 0\r\nExpect: 100-continue\r\n\r\n")
    assert response(client).status == 404
    assert b"100 Continue" not in client.received()


@pytest.mark.parametrize(
    "head",
    [b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"],
    ids=["two-hosts", "no-host"],
)
def test_http11_request_without_exactly_one_host_gets_400_and_close(
    gateway: Callable[..., Gateway], head: bytes
) -> None:
    """An HTTP/1.1 request with no Host or several (RFC 9112 section 3.2) gets 400 and the connection closed,
    without an upstream connection."""
    gw = gateway()
    client = gw.client()
    client.send(head)
    parsed = response(client)
    assert parsed.status == 400
    assert parsed.header(b"Connection") == b"close"
    assert client.transport.disconnecting
    assert gw.pending_connections() == 0


def test_header_line_within_max_header_bytes_is_accepted(gateway: Callable[..., Gateway]) -> None:
    """A header line longer than Twisted's default 16 KiB line limit, within max_header_bytes, is read and
    proxied."""
    gw = gateway(limits={"max_header_bytes": 65536})
    client = gw.client()
    client.send(b"GET / HTTP/1.1\r\nHost: example.test\r\nX-Big: " + b"x" * 20000 + b"\r\n\r\n")
    assert not client.transport.disconnecting
    assert gw.pending_connections() == 1


def test_304_keeps_the_upstreams_content_length(gateway: Callable[..., Gateway]) -> None:
    """A 304's Content-Length (the selected representation's, RFC 9110 section 8.6) reaches the client, with no
    body."""
    gw = gateway()
    client, _req, up = start_get(gw)
    up.respond(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n\r\n')
    parsed = response(client)
    assert parsed.header(b"Content-Length") == b"1234"
    assert client.received().endswith(b"\r\n\r\n")


def test_via_records_the_protocol_version_each_message_came_in_with(gateway: Callable[..., Gateway]) -> None:
    """Via says 1.0 for a request that came in as HTTP/1.0, and the upstream's version on its response."""
    gw = gateway()
    client = gw.client()
    client.send(b"GET /x HTTP/1.0\r\nHost: example.test\r\n\r\n")
    up = gw.upstream()
    assert b"\r\nVia: 1.0 gateway\r\n" in up.received()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert response(client).header(b"Via") == b"1.1 gateway"


@pytest.mark.parametrize("target", [b"/x?", b"/x;", b"/a//b/%2e%2Ex/c?q=%20&&r", b"/x?a=1;b=2#", b"/x?../%2e%00"])
def test_request_target_reaches_the_upstream_byte_for_byte(gateway: Callable[..., Gateway], target: bytes) -> None:
    """The request target reaches the upstream exactly as the client sent it (no URL re-serialisation)."""
    gw = gateway()
    client = gw.client()
    client.send(b"GET " + target + b" HTTP/1.1\r\nHost: example.test\r\n\r\n")
    up = gw.upstream()
    assert up.received().split(b"\r\n", 1)[0] == b"GET " + target + b" HTTP/1.1"
    up.respond(b"HTTP/1.1 204 No Content\r\n\r\n")


def test_pipelined_bytes_from_a_client_not_reading_pause_its_socket(gateway: Callable[..., Gateway]) -> None:
    """A client that stops reading its answer and keeps sending (pipelined requests) has its socket paused at
    once, so what it sends is not buffered without bound; once the answer is done and it reads again, its
    socket resumes and the pipelined request is served."""
    gw = gateway()
    client, _req, up = start_get(gw)
    up.respond(CHUNKED_HEAD + chunk(b"x" * 100))
    client.transport.producer.pauseProducing()  # the client's socket buffer is full
    client.send(GET)  # the next request, pipelined
    assert client.transport.producerState == "paused"
    client.transport.producer.resumeProducing()
    up.respond(b"0\r\n\r\n")
    assert client.transport.producerState == "producing"
    assert up.received().count(b"GET /reports/1") == 2  # the pipelined request went out on the pooled connection
    up.respond(OK_5)
    assert client.received().endswith(b"hello")


@pytest.mark.parametrize("head", [b"garbage\r\n", b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"v" * 1000 + b"\r\n"])
def test_upstream_breaking_its_head_during_an_upload_then_resetting_never_hangs(
    gateway: Callable[..., Gateway], head: bytes
) -> None:
    """An upstream that sends a broken head (an invalid status line, or a head over the 64 KiB cap) while the
    upload is still going, then resets: the client gets 502 at once and the upstream slot is freed. (Agent
    itself lets its request Deferred go when it gives up mid-upload, and crashes on the reset: the request
    would hang for ever.)"""
    gw = gateway(timeouts={"response_headers": 30})
    client = gw.client()
    client.send(post(1000))
    req = client.request
    client.send(b"x" * 100)
    up = gw.upstream()
    up.respond(head * (1 if head.startswith(b"garbage") else 70))
    assert up.transport.aborted  # not a graceful close, which would wait behind the upload
    up.close(ConnectionLost("upstream reset"))
    parsed = response(client)
    assert parsed.status == 502
    assert req.pool is not None and req.pool.in_flight == 0


@pytest.mark.parametrize(("allowed", "forwarded"), [(False, False), (True, True)])
def test_request_headers_with_underscores_follow_underscores_in_headers(
    gateway: Callable[..., Gateway], allowed: bool, forwarded: bool
) -> None:
    """A header named with an underscore (X_Custom, which CGI/WSGI upstreams read as X-Custom) is dropped unless
    server.underscores_in_headers allows it; X_Forwarded_For (read as X-Forwarded-For beside the gateway's own)
    never passes, and the gateway's own X-Forwarded-For is sent."""
    gw = gateway(server={"underscores_in_headers": allowed})
    client = gw.client()
    client.send(
        b"GET / HTTP/1.1\r\nHost: example.test\r\nX_Forwarded_For: 10.6.6.6\r\nX_Custom: 2\r\nX-Kept: 1\r\n\r\n"
    )
    up = gw.upstream()
    head = up.received().lower()
    assert b"\r\nx-kept: 1\r\n" in head
    assert b"x-forwarded-for: " in head
    assert (b"\r\nx_custom: 2\r\n" in head) is forwarded
    assert b"x_forwarded_for" not in head
    up.respond(OK_5)


def test_a_bug_under_a_parser_callback_is_logged_and_answered_500(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception out of the exchange's `begin` (a bug) reaches the connection as llhttp's callback error: it is
    logged as a failure and the client gets a 500 at once, not a wait until a timeout."""

    def broken(self: Exchange) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Exchange, "begin", broken)
    memory = MemoryGateway(gateway_config(UPSTREAM))
    client = memory.client()
    with captured(lambda event: "log_failure" in event) as failures:
        client.send(GET)
    response = parse_response(client.received())
    assert response.status == 500
    assert json.loads(response.body)["type"] == "urn:gateway:problem:internal"
    assert [event["log_failure"].value.args for event in failures] == [("a bug",)]
    assert memory.pending_connections() == 0
    client.disconnect()
    memory.close()
