"""`gateway.http1.server.ClientConnection` alone, in memory: what it reads, what it writes, and when.

The connection runs over a TCP-like `StringTransport` that keeps each write call apart (so a head can be seen to go
out in one) and records a half-close and an abort. Its owner is a small stand-in for the factory: the config of a
tiny dict parsed by `gateway.config.parse`, a `Clock`, and a record of what the connection told it. Its handler is
a small stand-in for the exchange: it records what the connection tells it, and answers only when the test says so,
through the connection's response methods. No exchange, no upstream, no socket. After every test the client goes
away the way TCP reports it, and no timer may be left behind.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gateway.config import Config, parse
from gateway.errors import GatewayError, TooManyConnections, reason_phrase
from gateway.http1.fields import Fields
from gateway.http1.server import ClientConnection
from gateway.http1.serving import Message
from tests.support.clients import parse_response
from tests.support.memory import AbortableTransport, disconnect
from tests.support.running import gateway_config

EPS = 0.25
"""A step of time binary floating point represents exactly, so `advance(t - EPS); advance(EPS)` lands on t."""
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


def get(target: bytes = b"/", *headers: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return b"\r\n".join([b"GET " + target + b" " + version, b"Host: example.test", *headers]) + b"\r\n\r\n"


def chunked_post(target: bytes = b"/upload", *headers: bytes) -> bytes:
    lines = [b"POST " + target + b" HTTP/1.1", b"Host: example.test", b"Transfer-Encoding: chunked", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# --- the harness --------------------------------------------------------------------------------------------------


class WireTransport(AbortableTransport):
    """A TCP-like StringTransport that keeps every write call apart, so a test can see what went out in one."""

    def __init__(self) -> None:
        # Lenient: a real TCP transport ignores resumeProducing once it is closing; StringTransport raises.
        super().__init__(peerAddress=IPv4Address("TCP", "10.0.0.1", 50000), lenient=True)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        joined = b"".join(data)
        self.writes.append(joined)
        super().write(joined)


class Handler:
    """Serves one request for the test: notes what the connection tells it in the owner's event list, and answers
    only when told to (by the test, or by the owner's `on_begin` / `on_end` from within the connection's call)."""

    def __init__(self, owner: Owner, connection: ClientConnection, message: Message) -> None:
        self.owner = owner
        self.connection = connection
        self.message = message
        self.body = b""
        self.answered = False
        self.lost: Failure | None = None

    def _note(self, *event: object) -> None:
        self.owner.events.append((event[0], self.message.target, *event[1:]))

    # What the connection tells it (gateway.http1.serving.RequestHandler).

    def begin(self) -> None:
        self._note("begin")
        if self.owner.on_begin is not None:
            self.owner.on_begin(self)

    def body_received(self, data: bytes) -> None:
        self.body += data
        self._note("body", data)

    def body_ended(self) -> None:
        self._note("end")
        if self.owner.on_end is not None:
            self.owner.on_end(self)

    def lingered(self, size: int) -> bool:
        return False

    def refused(self, error: GatewayError, request_id: str) -> None:
        self._note("refused", error.status)

    def connection_lost(self, reason: Failure) -> None:
        self.lost = reason
        self._note("lost")

    # Answering, through the connection's response methods.

    def head(self, code: int = 200, *headers: tuple[bytes, bytes]) -> None:
        raw = Fields()
        for name, value in headers:
            raw.addRawHeader(name, value)
        self.connection.write_head(code, reason_phrase(code), raw, head_request=self.message.method == b"HEAD")

    def respond(self, body: bytes = b"ok", *headers: tuple[bytes, bytes], code: int = 200, finish: bool = True) -> None:
        """A whole response with a Content-Length (and `headers`), then `finish` unless told not to."""
        self.head(code, (b"Content-Length", b"%d" % len(body)), *headers)
        self.connection.write_body(body)
        self.connection.end_body()
        self.answered = True
        if finish:
            self.connection.finish()

    def finish(self) -> None:
        self.answered = True
        self.connection.finish()


class Owner:
    """The server a connection belongs to (gateway.http1.serving.ConnectionOwner), for the test."""

    def __init__(self, over_the_cap: GatewayError | None = None, **sections: Any) -> None:
        config = _config(**sections)
        self.clock = Clock()
        self.limits = config.limits
        self.server = config.server
        self.events: list[tuple[object, ...]] = []
        """What every handler was told, in order: (event, target, detail...)."""
        self.handlers: list[Handler] = []
        self.refusals: list[tuple[int, tuple[bytes, bytes] | None]] = []
        """Heads refused before they became requests: (status, request line read whole or None)."""
        self.opened: list[ClientConnection] = []
        self.closed: list[ClientConnection] = []
        self.over_the_cap = over_the_cap
        """What `connection_opened` refuses a connection with (None: it is accepted)."""
        self.on_begin: Callable[[Handler], None] | None = None
        self.on_end: Callable[[Handler], None] | None = None

    def reload(self, **sections: Any) -> None:
        config = _config(**sections)
        self.limits, self.server = config.limits, config.server

    def connection_opened(self, connection: ClientConnection) -> GatewayError | None:
        self.opened.append(connection)
        return self.over_the_cap

    def connection_closed(self, connection: ClientConnection) -> None:
        self.closed.append(connection)

    def handle(self, connection: ClientConnection, message: Message) -> Handler:
        handler = Handler(self, connection, message)
        self.handlers.append(handler)
        return handler

    def head_refused(
        self, connection: ClientConnection, error: GatewayError, request_id: str, line: tuple[bytes, bytes] | None
    ) -> None:
        self.refusals.append((error.status, line))

    def handshake_failed(self, listener: Any, error: Any) -> None:
        raise AssertionError("no TLS here")

    def invalid_peer(self, listener: Any) -> None:
        raise AssertionError("no PROXY header here")


def _config(**sections: Any) -> Config:
    return parse(gateway_config("http://127.0.0.1:8081", **sections), source="wire.toml")


@dataclass
class Wire:
    """One client connection, its transport and its owner."""

    owner: Owner
    connection: ClientConnection
    transport: WireTransport

    def send(self, data: bytes) -> None:
        self.connection.dataReceived(data)

    def received(self) -> bytes:
        return self.transport.value()

    def advance(self, seconds: float) -> None:
        self.owner.clock.advance(seconds)

    @property
    def events(self) -> list[tuple[object, ...]]:
        return self.owner.events

    def handler(self, index: int = -1) -> Handler:
        return self.owner.handlers[index]

    def timers(self) -> int:
        return len(self.owner.clock.getDelayedCalls())


@pytest.fixture
def wire() -> Iterator[Callable[..., Wire]]:
    """Builds connections on config sections; afterwards each client goes away (if the connection did not
    already hear so), the owner must have been told once, and no timer may be left."""
    made: list[Wire] = []

    def make(**sections: Any) -> Wire:
        owner = Owner(**sections)  # over_the_cap= or config sections
        connection = ClientConnection(owner)
        transport = WireTransport()
        connection.makeConnection(transport)
        made.append(Wire(owner, connection, transport))
        return made[-1]

    yield make
    for w in made:
        if not w.owner.closed:
            reason = ConnectionDone("closed") if w.transport.disconnecting else ConnectionLost("left")
            disconnect(w.transport, w.connection, reason)
        assert w.owner.closed == w.owner.opened == [w.connection]
        assert w.owner.clock.getDelayedCalls() == [], "timers left behind"


def refusal(w: Wire, status: int) -> dict[str, Any]:
    """The one response the client got is the connection's own refusal: `status`, problem+json and Connection:
    close, then a half-close (FIN after the answer) with the connection left to linger."""
    parsed = parse_response(w.received())
    assert parsed.status == status, w.received()[:200]
    assert parsed.complete and parsed.rest == b""
    assert parsed.header(b"content-type") == b"application/problem+json"
    assert parsed.header(b"connection") == b"close"
    body: dict[str, Any] = json.loads(parsed.body)
    assert body["status"] == status
    assert w.transport.write_closed and not w.transport.aborted
    assert w.connection.refused is not None and w.connection.refused.status == status
    return body


def lingers_then_cut(w: Wire) -> None:
    """What the client still sends is read and dropped for exactly lingering_timeout (5 s by default), nothing more
    is written or parsed, and then the connection is cut."""
    answered, handlers = w.received(), len(w.owner.handlers)
    w.advance(5 - EPS)
    w.send(get(b"/more") + b"x" * 10_000)
    assert (w.received(), len(w.owner.handlers)) == (answered, handlers)
    assert not w.transport.aborted
    w.advance(EPS)
    assert w.transport.aborted


# === keep-alive and pipelining ======================================================================================


def test_keep_alive_serves_requests_in_order_each_begun_after_the_one_before_finished(
    wire: Callable[..., Wire],
) -> None:
    """Two requests on one connection are answered in order, and the second's handler begins only once the first
    has finished; the connection stays open."""
    w = wire()
    w.send(get(b"/a"))
    assert w.events == [("begin", b"/a"), ("end", b"/a")]
    w.handler().respond()
    w.send(get(b"/b"))
    w.handler().respond(b"bb")
    assert w.events == [("begin", b"/a"), ("end", b"/a"), ("begin", b"/b"), ("end", b"/b")]
    assert w.received() == OK + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nbb"
    assert w.connection.persistent and not w.transport.disconnecting


def test_request_read_while_one_is_served_waits_with_reading_paused(wire: Callable[..., Wire]) -> None:
    """A request whose head arrives (in a later read) while another is served is held, its handler not begun, and
    reading pauses; once the first finishes, it begins and reading resumes."""
    w = wire()
    w.send(get(b"/a"))
    w.send(get(b"/b"))
    assert [h.message.target for h in w.owner.handlers] == [b"/a"]
    assert w.transport.producerState == "paused"
    w.handler(0).respond()
    assert w.events[-2:] == [("begin", b"/b"), ("end", b"/b")]
    assert w.transport.producerState == "producing"
    w.handler(1).respond()
    assert w.received() == OK + OK


def test_pipelined_request_is_held_until_the_one_before_it_finishes(wire: Callable[..., Wire]) -> None:
    """Two requests in one read: the second's head is read and held, its handler not begun and reading paused,
    until the first finishes; then it is served and reading resumes."""
    w = wire()
    w.send(get(b"/a") + get(b"/b"))
    assert w.events == [("begin", b"/a"), ("end", b"/a")]
    assert w.transport.producerState == "paused"
    w.handler(0).respond()
    assert w.events[2:] == [("begin", b"/b"), ("end", b"/b")]
    assert w.transport.producerState == "producing"
    w.handler(1).respond()
    assert w.received() == OK + OK


def test_pipelined_post_body_is_delivered_in_order_once_its_handler_begins(wire: Callable[..., Wire]) -> None:
    """The body of a pipelined POST read with the request before it is held, then given to its handler in order
    as soon as it begins, and the rest of the body follows as it is read."""
    w = wire()
    w.send(get(b"/a") + chunked_post(b"/b") + chunk(b"hel") + chunk(b"lo"))
    assert [e[0] for e in w.events] == ["begin", "end"]
    w.handler(0).respond()
    assert w.events[2:] == [("begin", b"/b"), ("body", b"/b", b"hel"), ("body", b"/b", b"lo")]
    w.send(chunk(b"!") + LAST_CHUNK)
    assert w.events[5:] == [("body", b"/b", b"!"), ("end", b"/b")]
    assert w.handler(1).body == b"hello!"


def test_request_after_a_close_delimited_response_is_not_served(wire: Callable[..., Wire]) -> None:
    """A request pipelined behind one whose response ends with the connection is never begun."""
    w = wire()
    w.send(get(b"/a") + get(b"/b"))
    w.handler(0).head(200)
    w.connection.persistent = False  # as the exchange does when it answers "Connection: close"
    w.handler(0).finish()
    assert len(w.owner.handlers) == 1
    assert w.transport.lost


# === framing of the response ========================================================================================


def test_http_1_0_response_without_length_is_close_delimited(wire: Callable[..., Wire]) -> None:
    """To an HTTP/1.0 client a response without Content-Length is not chunked: its body goes out as is and ends
    with the connection, closed at `finish` (not before)."""
    w = wire()
    w.send(get(b"/", version=b"HTTP/1.0"))
    w.handler().head(200)
    w.connection.write_body(b"hello ")
    w.connection.write_body(b"world")
    assert not w.transport.disconnecting
    w.handler().finish()
    assert w.received() == b"HTTP/1.1 200 OK\r\n\r\nhello world"
    assert w.transport.lost


def test_http_1_0_response_with_length_is_sent_as_is_and_not_kept_alive(wire: Callable[..., Wire]) -> None:
    """To an HTTP/1.0 client a response with Content-Length goes out as written (no header added), and the
    connection closes after it even if the client asked to keep it alive: a request behind it is not served."""
    w = wire()
    w.send(get(b"/a", b"Connection: keep-alive", version=b"HTTP/1.0") + get(b"/b"))
    w.handler().respond()
    assert w.received() == OK
    assert w.transport.lost
    assert len(w.owner.handlers) == 1


def test_http_1_1_response_without_length_is_chunked_and_finish_writes_the_last_chunk(
    wire: Callable[..., Wire],
) -> None:
    """To an HTTP/1.1 client a response without Content-Length is chunked, one chunk per write, and `finish`
    writes the last chunk; the connection stays open for the next request."""
    w = wire()
    w.send(get())
    w.handler().head(200)
    w.connection.write_body(b"hello")
    w.connection.write_body(b"")  # nothing: an empty chunk would end the body
    w.handler().finish()
    assert w.transport.writes == [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", chunk(b"hello"), LAST_CHUNK]
    assert not w.transport.disconnecting


@pytest.mark.parametrize(("method", "code"), [(b"HEAD", 200), (b"GET", 204), (b"GET", 304)])
def test_responses_without_a_body_carry_no_body_bytes(wire: Callable[..., Wire], method: bytes, code: int) -> None:
    """A response to HEAD, a 204 and a 304 have no body: what the handler writes is dropped, there is no chunked
    framing (and no last chunk), and the connection stays persistent."""
    w = wire()
    w.send(get().replace(b"GET", method, 1))
    w.handler().head(code)
    w.connection.write_body(b"dropped")
    w.handler().finish()
    assert w.received() == b"HTTP/1.1 %d %s\r\n\r\n" % (code, reason_phrase(code))
    assert w.connection.sent_length == 0
    w.send(get(b"/next"))
    assert w.events[-2:] == [("begin", b"/next"), ("end", b"/next")]


def test_response_to_head_keeps_its_content_length_without_a_body(wire: Callable[..., Wire]) -> None:
    """A HEAD response's Content-Length is the handler's, kept as is, and the body written is dropped."""
    w = wire()
    w.send(get().replace(b"GET", b"HEAD", 1))
    w.handler().respond(b"hello")
    assert w.received() == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"


def test_response_head_is_one_write(wire: Callable[..., Wire]) -> None:
    """The status line and every header (a repeated one included) go to the transport in one write, the body
    after it in its own."""
    w = wire()
    w.send(get())
    w.handler().respond(b"ok", (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"X-Id", b"7"))
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-Id: 7\r\n\r\n"
    assert w.transport.writes == [head, b"ok"]


# === 100 Continue and Connection: close =============================================================================


def test_100_continue_is_sent_only_when_the_handler_asks(wire: Callable[..., Wire]) -> None:
    """A request that expects 100-continue gets nothing from the connection itself; the handler's `send_continue`
    writes exactly one interim response."""
    w = wire()
    w.send(b"POST / HTTP/1.1\r\nHost: example.test\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert w.received() == b""
    w.connection.send_continue()
    assert w.transport.writes == [CONTINUE]
    w.send(b"hi")
    w.handler().respond()
    assert w.received() == CONTINUE + OK


def test_100_continue_is_not_sent_once_the_response_began(wire: Callable[..., Wire]) -> None:
    """Once the response head is out an interim response cannot follow it: `send_continue` writes nothing."""
    w = wire()
    w.send(b"POST / HTTP/1.1\r\nHost: example.test\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    w.handler().head(200, (b"Content-Length", b"2"))
    w.connection.send_continue()
    assert w.received() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"


def test_connection_close_from_the_client_closes_after_the_response_with_the_handlers_header(
    wire: Callable[..., Wire],
) -> None:
    """A client's Connection: close ends the connection once the response is finished, not before; the handler's
    own Connection header is the only one."""
    w = wire()
    w.send(get(b"/a", b"Connection: close"))
    w.handler().respond(b"ok", (b"Connection", b"close"), finish=False)
    assert not w.transport.disconnecting
    w.handler().finish()
    assert w.received() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    assert w.transport.lost


def test_connection_close_from_the_client_is_announced_when_the_handler_set_no_connection_header(
    wire: Callable[..., Wire],
) -> None:
    """When the handler sets no Connection header, the connection adds `Connection: close` to a response after
    which it closes."""
    w = wire()
    w.send(get(b"/", b"Connection: close"))
    w.handler().respond()
    assert w.received() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    assert w.transport.lost


def test_header_values_lose_the_trailing_whitespace_llhttp_keeps(wire: Callable[..., Wire]) -> None:
    """llhttp drops the whitespace before a value and keeps what follows it: the message's fields hold neither,
    names keep their spelling and values their inner spaces."""
    w = wire()
    w.send(get(b"/", b"X-Pad: a b \t ", b"X-Tab:\tv\t", b"X-Plain: p", b"X-Empty: "))
    headers = w.handler().message.headers
    assert [(name, values) for name, values in headers.getAllRawHeaders() if name.startswith(b"X-")] == [
        (b"X-Pad", [b"a b"]),
        (b"X-Tab", [b"v"]),
        (b"X-Plain", [b"p"]),
        (b"X-Empty", [b""]),
    ]


# === request bodies =================================================================================================


def test_trailers_of_a_chunked_request_are_not_headers_of_its_message(wire: Callable[..., Wire]) -> None:
    """Trailer fields end a chunked body and are dropped: they never join the request's headers."""
    w = wire()
    w.send(chunked_post() + chunk(b"abc") + b"0\r\nX-Checksum: 1234\r\n\r\n")
    assert w.events == [("begin", b"/upload"), ("body", b"/upload", b"abc"), ("end", b"/upload")]
    assert not w.handler().message.headers.hasHeader(b"x-checksum")


def test_body_after_a_lingering_answer_is_still_read_then_the_connection_closes(wire: Callable[..., Wire]) -> None:
    """`linger` after a complete early answer half-closes at once; the rest of the body still reaches the handler,
    and `finish` then closes the connection."""
    w = wire()
    w.send(chunked_post() + chunk(b"abc"))
    w.handler().respond(b"no", code=413, finish=False)
    w.connection.linger()
    assert w.transport.write_closed and not w.transport.lost
    w.send(chunk(b"def") + LAST_CHUNK)
    assert w.events[-2:] == [("body", b"/upload", b"def"), ("end", b"/upload")]
    w.handler().finish()
    assert w.transport.lost


# === timers =========================================================================================================


def test_head_timer_answers_408_exactly_head_timeout_after_the_heads_first_byte(wire: Callable[..., Wire]) -> None:
    """A head that keeps trickling in is refused 408 head_timeout after its first byte, not after the last one."""
    w = wire(server={"head_timeout": 4, "idle_timeout": 60})
    w.advance(3)  # idle: only the idle timer runs
    head = get(b"/slow")
    w.send(head[:1])
    for i in range(1, 8):  # a byte every half second: each resets nothing
        w.advance(0.5)
        w.send(head[i : i + 1])
    w.advance(0.5 - EPS)  # head_timeout - EPS after the first byte
    assert w.received() == b""
    w.advance(EPS)
    assert "4 s" in refusal(w, 408)["detail"]
    assert w.owner.refusals == [(408, None)]
    assert w.owner.handlers == []
    lingers_then_cut(w)


def test_complete_head_cancels_the_head_timer(wire: Callable[..., Wire]) -> None:
    """A head completed just before head_timeout leaves no timer that fires while its request is served."""
    w = wire(server={"head_timeout": 4})
    head = get(b"/")
    w.send(head[:10])
    w.advance(4 - EPS)
    w.send(head[10:])
    w.advance(100)
    assert w.received() == b"" and w.connection.refused is None
    w.handler().respond()
    assert w.received() == OK


def test_idle_timer_closes_without_an_answer_idle_timeout_after_the_last_response(wire: Callable[..., Wire]) -> None:
    """Between requests the connection closes silently idle_timeout after the last response finished."""
    w = wire(server={"idle_timeout": 12})
    w.advance(11)
    w.send(get())
    w.handler().respond()
    w.advance(12 - EPS)
    assert not w.transport.disconnecting
    w.advance(EPS)
    assert w.transport.lost and not w.transport.write_closed
    assert w.received() == OK


def test_idle_timer_is_not_armed_while_a_request_is_served(wire: Callable[..., Wire]) -> None:
    """While a request is served no connection timer fires, however long it takes; idle counts from its finish."""
    w = wire(server={"idle_timeout": 12})
    w.send(get())
    w.advance(100)
    assert not w.transport.disconnecting
    w.handler().respond()
    w.advance(12 - EPS)
    assert not w.transport.disconnecting
    w.advance(EPS)
    assert w.transport.lost


# === refusals =======================================================================================================


def test_request_line_over_its_limit_is_refused_414_then_lingers_and_is_cut(wire: Callable[..., Wire]) -> None:
    """A request line over max_request_line_bytes is answered 414 before it ends, never handled; the connection
    half-closes, drops what still comes, and is cut at lingering_timeout."""
    w = wire(limits={"max_request_line_bytes": 64})
    w.send(b"GET /" + b"a" * 100)
    assert "64-byte" in refusal(w, 414)["detail"]
    assert w.owner.refusals == [(414, None)]
    assert w.owner.handlers == []
    lingers_then_cut(w)


@pytest.mark.parametrize(
    ("limits", "head"),
    [
        ({"max_header_bytes": 1024}, b"GET / HTTP/1.1\r\nHost: example.test\r\nX-Big: " + b"b" * 1100),
        ({"max_header_count": 3}, get(b"/", b"A: 1", b"B: 2", b"C: 3")),
    ],
    ids=["bytes", "count"],
)
def test_header_fields_over_their_limits_are_refused_431(
    wire: Callable[..., Wire], limits: dict[str, int], head: bytes
) -> None:
    """Header fields over max_header_bytes (even in a head not yet complete) or max_header_count are answered 431,
    never handled, with the request line read named to the owner; then the lingering close."""
    w = wire(limits=limits)
    w.send(head)
    refusal(w, 431)
    assert w.owner.refusals == [(431, (b"GET", b"/"))]
    assert w.owner.handlers == []
    lingers_then_cut(w)


def test_lingering_past_lingering_max_bytes_is_cut_at_once(wire: Callable[..., Wire]) -> None:
    """After a refusal, what the client sends is dropped up to lingering_max_bytes; one byte more cuts it."""
    w = wire(limits={"max_request_line_bytes": 64}, server={"lingering_max_bytes": 1000})
    w.send(b"GET /" + b"a" * 100)
    refusal(w, 414)
    w.send(b"x" * 1000)
    assert not w.transport.aborted
    w.send(b"x")
    assert w.transport.aborted


def test_connection_over_the_cap_is_answered_with_the_owners_error(wire: Callable[..., Wire]) -> None:
    """A connection the owner refuses as it opens gets that error as its only answer, then the lingering close."""
    w = wire(over_the_cap=TooManyConnections("the gateway is at its client connection limit"))
    refusal(w, 503)
    assert w.owner.refusals == [(503, None)]
    lingers_then_cut(w)


def test_malformed_chunk_before_any_response_is_answered_400_and_the_handler_told(wire: Callable[..., Wire]) -> None:
    """A chunked body that turns malformed once its handler began: the handler hears `refused` then
    `connection_lost`, the connection answers 400 itself, and the lingering close follows."""
    w = wire()
    w.send(chunked_post() + chunk(b"abc"))
    w.send(b"zz\r\n")
    assert w.events == [
        ("begin", b"/upload"),
        ("body", b"/upload", b"abc"),
        ("refused", b"/upload", 400),
        ("lost", b"/upload"),
    ]
    assert refusal(w, 400)["detail"] == "the chunked request body is malformed"
    assert w.owner.refusals == []
    lingers_then_cut(w)


def test_malformed_chunk_after_a_complete_response_lingers_without_a_second_answer(
    wire: Callable[..., Wire],
) -> None:
    """When the handler's response is complete (the body still being read), a malformed chunk adds no answer: the
    connection half-closes and lingers as if the refusal were the response's own."""
    w = wire()
    w.send(chunked_post() + chunk(b"abc"))
    w.handler().respond(b"early", finish=False)
    answered = w.received()
    w.send(b"zz\r\n")
    assert [e[0] for e in w.events[-2:]] == ["refused", "lost"]
    assert w.received() == answered
    assert w.transport.write_closed and not w.transport.aborted
    lingers_then_cut(w)


def test_malformed_chunk_during_an_incomplete_response_cuts_the_connection(wire: Callable[..., Wire]) -> None:
    """When the handler's response has begun and is not complete, a malformed chunk cuts the connection at once:
    no last chunk, no second status line, nothing that would make the response look complete."""
    w = wire()
    w.send(chunked_post() + chunk(b"abc"))
    w.handler().head(200)
    w.connection.write_body(b"part")
    w.send(b"zz\r\n")
    assert [e[0] for e in w.events[-2:]] == ["refused", "lost"]
    assert w.transport.aborted
    assert w.received() == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"part")


# === Upgrade and CONNECT ============================================================================================


def test_upgrade_request_that_stays_persistent_lets_the_next_request_in_the_read_be_served(
    wire: Callable[..., Wire],
) -> None:
    """llhttp stops after a request asking to upgrade; the gateway upgrades nothing, so the bytes after it are
    read as the next request: held while the first is served, then served."""
    w = wire()
    upgrade = get(b"/ws", b"Connection: Upgrade", b"Upgrade: websocket")
    w.send(upgrade + get(b"/next"))
    assert w.events == [("begin", b"/ws"), ("end", b"/ws")]
    assert w.transport.producerState == "paused"
    w.handler().respond()
    assert w.events[2:] == [("begin", b"/next"), ("end", b"/next")]
    assert w.transport.producerState == "producing"
    w.handler().respond()
    assert w.received() == OK + OK


def test_connect_refused_with_close_ends_the_parse(wire: Callable[..., Wire]) -> None:
    """A CONNECT answered at once with Connection: close: the bytes after it in the same read are never parsed,
    no other request is handled or refused, and the connection closes after the answer."""
    w = wire()

    def refuse_with_close(handler: Handler) -> None:
        handler.connection.persistent = False
        handler.respond(b"no", (b"Connection", b"close"), code=405)

    w.owner.on_begin = refuse_with_close
    w.send(b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n" + get(b"/next") + b"\x00junk")
    assert [h.message.target for h in w.owner.handlers] == [b"example.test:443"]
    assert w.owner.refusals == [] and w.connection.refused is None
    assert w.received() == b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno"
    assert w.transport.lost


# === reloads and the connection's end ===============================================================================


def test_reload_applies_from_the_next_head_of_a_kept_alive_connection(wire: Callable[..., Wire]) -> None:
    """Limits changed by a reload hold the next head of a connection already open, as they hold a new one's."""
    w = wire()
    long_target = b"/" + b"a" * 100
    w.send(get(long_target))
    w.handler().respond()
    w.owner.reload(limits={"max_request_line_bytes": 64})
    w.send(get(long_target))
    assert len(w.owner.handlers) == 1
    assert w.received().startswith(OK + b"HTTP/1.1 414 ")


def test_head_begun_before_a_reload_keeps_the_limits_it_began_under(wire: Callable[..., Wire]) -> None:
    """A head already under way when the limits change is read under the limits it began with."""
    w = wire()
    head = get(b"/" + b"a" * 100)
    w.send(head[:10])
    w.owner.reload(limits={"max_request_line_bytes": 64})
    w.send(head[10:])
    assert w.events == [("begin", b"/" + b"a" * 100), ("end", b"/" + b"a" * 100)]
    assert w.connection.refused is None


def test_client_leaving_mid_request_tells_the_handler_and_the_owner(wire: Callable[..., Wire]) -> None:
    """A client gone while its request is served: the handler hears `connection_lost` with the reason, the owner
    `connection_closed`, once, and no timer is left."""
    w = wire()
    w.send(chunked_post() + chunk(b"abc"))
    disconnect(w.transport, w.connection, ConnectionLost("client went away"))
    assert w.events[-1] == ("lost", b"/upload")
    lost = w.handler().lost
    assert lost is not None and lost.check(ConnectionLost)
    assert w.owner.closed == [w.connection]
    assert w.timers() == 0


def test_abort_cuts_the_connection_and_stops_its_timers(wire: Callable[..., Wire]) -> None:
    """`abort` (a response that cannot be completed) cuts the connection at once, with no last chunk."""
    w = wire()
    w.send(get())
    w.handler().head(200)
    w.connection.write_body(b"part")
    w.connection.abort()
    assert w.transport.aborted and not w.connection.persistent
    assert w.received().endswith(chunk(b"part"))
    disconnect(w.transport, w.connection, ConnectionAborted("aborted"))
    assert w.timers() == 0


# === found by these tests, and fixed =======================================================================


def test_bytes_after_a_connection_close_request_are_ignored(wire: Callable[..., Wire]) -> None:
    """A request with Connection: close followed by more bytes (same read) is answered normally, and the
    bytes after it are not processed (RFC 9112 9.6)."""
    w = wire()
    w.send(get(b"/a", b"Connection: close") + get(b"/b"))
    assert w.connection.refused is None
    w.handler().respond()
    assert w.received() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    assert w.transport.lost


def test_bytes_after_a_connection_close_request_in_a_later_read_are_ignored(wire: Callable[..., Wire]) -> None:
    """The same when the next bytes come in a read of their own while the request is served."""
    w = wire()
    w.send(get(b"/a", b"Connection: close"))
    w.send(get(b"/b"))
    assert w.handler().lost is None
    w.handler().respond()
    assert parse_response(w.received()).status == 200


def test_http_1_0_request_followed_by_more_bytes_is_answered(wire: Callable[..., Wire]) -> None:
    """The request is answered, what follows is dropped."""
    w = wire()
    w.send(get(b"/a", version=b"HTTP/1.0") + get(b"/b"))
    w.handler().respond()
    assert w.received() == OK


def test_idle_timer_is_not_armed_while_a_pipelined_request_is_served(wire: Callable[..., Wire]) -> None:
    """A request answered at its end (as the exchange answers a 404) with another pipelined behind it in
    the same read: no timer fires while the second is served, and idle counts from its finish."""
    w = wire(server={"idle_timeout": 60})
    w.owner.on_end = lambda h: h.respond() if h.message.target == b"/a" else None
    w.send(get(b"/a") + get(b"/b"))
    w.advance(50)
    w.handler().respond()
    w.advance(60 - EPS)
    assert not w.transport.disconnecting
    w.advance(EPS)
    assert w.transport.lost


EPS = 0.25


def test_a_handlers_pause_in_begin_holds_for_a_pipelined_request(wire: Callable[..., Wire]) -> None:
    """A pipelined request whose handler pauses reading as it begins (the exchange waiting for a verdict)
    stays paused: the connection does not resume reading behind its back."""
    w = wire()
    w.owner.on_begin = lambda h: h.connection.pause_reading() if h.message.target == b"/upload" else None
    w.send(get(b"/a") + chunked_post() + chunk(b"abc"))
    w.handler(0).respond()
    assert w.events[-1] == ("body", b"/upload", b"abc")
    assert w.transport.producerState == "paused"


def test_new_head_refused_while_a_request_is_served_is_the_heads_refusal(wire: Callable[..., Wire]) -> None:
    """A new head over its limit, read while an earlier request is served, is that head's refusal: the
    served request is not told it was refused nor cut, and the 414 follows its response (the owner hears
    head_refused)."""
    w = wire(limits={"max_request_line_bytes": 64})
    w.send(get(b"/a"))
    w.send(b"GET /" + b"x" * 100)
    assert w.received() == b""  # nothing may go out as if it were /a's answer
    assert w.events == [("begin", b"/a"), ("end", b"/a")]
    w.handler().respond()
    assert w.owner.refusals == [(414, None)]
    assert w.received().startswith(OK + b"HTTP/1.1 414 ")


def test_malformed_chunk_after_an_early_finish_gets_no_second_answer(wire: Callable[..., Wire]) -> None:
    """A request finished before its body ended (on_message_complete's "answered before its end
    was read" path), whose body then turns malformed: no answer follows the complete response."""
    w = wire()
    w.send(chunked_post() + chunk(b"abc"))
    w.handler().respond()
    answered = w.received()
    w.send(b"zz\r\n")
    assert w.received() == answered


def test_trailer_section_is_held_to_the_header_limit(wire: Callable[..., Wire]) -> None:
    """A trailer field that never ends is refused past max_header_bytes, as a head's would be (httptools
    otherwise accumulates it in memory without bound)."""
    w = wire(limits={"max_header_bytes": 1024})
    w.send(chunked_post() + chunk(b"abc") + b"0\r\nX-T: ")
    for _ in range(10):
        w.send(b"a" * 100_000)
    assert w.connection.refused is not None
