"""The demo's HTTP/1.1 server (`gateway.demo.wire`) in memory: a `Connection` over a `StringTransport`, with a
route of the test's own whose endpoints record what they are given and answer when the test says."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.demo.wire import Connection, Endpoint, Reading, Request, Response
from tests.support.clients import parse_response, parse_responses
from tests.support.memory import disconnect


class Recorder:
    """An endpoint that keeps what it is given; it answers `200 <the body it read>` when `respond` is called,
    or, when held, only once the test calls `release`."""

    def __init__(self, request: Request, *, held: bool = False) -> None:
        self.request = request
        self.pieces: list[bytes] = []
        self.held = held
        self.response: Response | None = None
        self.stopped = False

    def body_received(self, data: bytes) -> None:
        self.pieces.append(data)

    def respond(self, response: Response) -> None:
        self.response = response
        if not self.held:
            self.release()

    def release(self) -> None:
        assert self.response is not None
        self.response.answer(200, b"text/plain", b"".join(self.pieces) or self.request.path)

    def stop(self) -> None:
        self.stopped = True


class Memory:
    """One connection in memory, and every endpoint its route made (in order)."""

    def __init__(self, *, held: frozenset[bytes] = frozenset()) -> None:
        self.endpoints: list[Recorder] = []
        self.held = held
        """Paths whose endpoints hold their answers until released."""
        self.clock = Clock()
        self.transport = StringTransport()
        self.connection = Connection(self.route, self.clock)
        self.connection.makeConnection(self.transport)

    def route(self, request: Request, reading: Reading) -> Endpoint:
        endpoint = Recorder(request, held=request.path in self.held)
        self.endpoints.append(endpoint)
        return endpoint

    def send(self, data: bytes) -> None:
        self.connection.dataReceived(data)


def get(path: bytes, *, close: bool = False) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: demo.test\r\n%s\r\n" % (path, b"Connection: close\r\n" if close else b"")


def test_body_pieces_reach_the_endpoint_as_they_are_read() -> None:
    """Each piece of a body goes to the endpoint when it is read; the answer begins once the body has ended."""
    memory = Memory()
    memory.send(b"POST /sink HTTP/1.1\r\nHost: demo.test\r\nContent-Length: 10\r\n\r\nhello")
    [endpoint] = memory.endpoints
    assert endpoint.pieces == [b"hello"]
    assert endpoint.response is None
    assert memory.transport.value() == b""
    memory.send(b"world")
    assert endpoint.pieces == [b"hello", b"world"]
    response = parse_response(memory.transport.value())
    assert (response.status, response.body, response.complete) == (200, b"helloworld", True)


def test_two_requests_on_one_connection() -> None:
    """An HTTP/1.1 connection stays open after an answer; a request with `Connection: close` is its last."""
    memory = Memory()
    memory.send(get(b"/first"))
    first = parse_response(memory.transport.value())
    assert (first.status, first.body, first.header(b"connection")) == (200, b"/first", None)
    assert not memory.transport.disconnecting
    memory.transport.clear()
    memory.send(get(b"/second", close=True))
    second = parse_response(memory.transport.value())
    assert (second.status, second.body, second.header(b"connection")) == (200, b"/second", b"close")
    assert memory.transport.disconnecting


def test_chunked_body_fed_one_byte_at_a_time() -> None:
    """A chunked body (with a trailer field) fed a byte at a time reaches the endpoint whole and de-chunked, and
    the request after it is read as a request."""
    memory = Memory()
    data = (
        b"PUT /sink HTTP/1.1\r\nHost: demo.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: yes\r\n\r\n" + get(b"/after", close=True)
    )
    for i in range(len(data)):
        memory.send(data[i : i + 1])
    sink, after = memory.endpoints
    assert after.request.path == b"/after"
    assert b"".join(sink.pieces) == b"hello world"
    assert (b"x-trailer", b"yes") not in sink.request.headers
    assert [(r.status, r.body) for r in parse_responses(memory.transport.value())] == [
        (200, b"hello world"),
        (200, b"/after"),
    ]
    assert memory.transport.disconnecting


def test_a_pipelined_request_waits_for_the_answer_before_it() -> None:
    """A request read while the one before it is answered waits its turn, with reading paused meanwhile; the
    answers go out in request order."""
    memory = Memory(held=frozenset({b"/slow"}))
    memory.send(get(b"/slow") + get(b"/next"))
    slow, following = memory.endpoints
    assert following.response is None
    assert memory.transport.producerState == "paused"
    slow.release()
    assert [r.body for r in parse_responses(memory.transport.value())] == [b"/slow", b"/next"]
    assert memory.transport.producerState == "producing"
    assert not memory.transport.disconnecting


def test_expect_100_continue_is_answered_before_the_body() -> None:
    """`Expect: 100-continue` gets `100 Continue` at once when no answer is under way."""
    memory = Memory()
    memory.send(b"POST /sink HTTP/1.1\r\nHost: demo.test\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert memory.transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    memory.send(b"ok")
    assert parse_response(memory.transport.value()).body == b"ok"


def test_100_continue_waits_for_the_answer_under_way() -> None:
    """`100 Continue` for a request read while an earlier answer is under way is sent once that answer is
    complete, not in the middle of it."""
    memory = Memory(held=frozenset({b"/slow"}))
    memory.send(get(b"/slow"))
    memory.send(b"POST /sink HTTP/1.1\r\nHost: demo.test\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert memory.transport.value() == b""
    memory.endpoints[0].release()
    assert memory.transport.value().endswith(b"/slowHTTP/1.1 100 Continue\r\n\r\n")


def test_http10_answer_without_length_ends_with_the_connection() -> None:
    """An answer of unknown length to HTTP/1.0 is neither chunked nor kept alive: the close ends it."""
    memory = Memory(held=frozenset({b"/stream"}))
    memory.send(b"GET /stream HTTP/1.0\r\n\r\n")
    response = memory.endpoints[0].response
    assert response is not None
    response.start(200, [(b"Content-Type", b"text/plain")])
    response.write(b"abc")
    response.finish()
    assert memory.transport.value().startswith(b"HTTP/1.0 200 OK\r\n")
    assert memory.transport.value().endswith(b"\r\n\r\nabc")
    assert b"Transfer-Encoding" not in memory.transport.value()
    assert memory.transport.disconnecting


def test_http11_answer_without_length_is_chunked() -> None:
    """An answer of unknown length to HTTP/1.1 is chunked, and the connection stays open after it."""
    memory = Memory(held=frozenset({b"/stream"}))
    memory.send(get(b"/stream"))
    response = memory.endpoints[0].response
    assert response is not None
    response.start(200)
    response.write(b"abc")
    response.write(b"")
    response.finish()
    parsed = parse_response(memory.transport.value())
    assert (parsed.header(b"transfer-encoding"), parsed.body, parsed.complete) == (b"chunked", b"abc", True)
    assert not memory.transport.disconnecting


def test_head_answer_has_no_body() -> None:
    """What an endpoint writes in answer to HEAD is not sent."""
    memory = Memory()
    memory.send(b"HEAD /x HTTP/1.1\r\nHost: demo.test\r\n\r\n")
    assert memory.transport.value().endswith(b"Content-Length: 2\r\n\r\n")


def test_malformed_request_is_400_and_closed() -> None:
    """Input that is no HTTP/1.1 request is answered 400 and the connection closed; nothing more is read."""
    memory = Memory()
    memory.send(b"garbage\r\n\r\n")
    assert memory.transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert memory.transport.disconnecting
    memory.send(get(b"/more"))
    assert memory.endpoints == []


def test_an_unknown_http_version_is_400() -> None:
    """A request of a version other than HTTP/1.0 and 1.1 is refused."""
    memory = Memory()
    memory.send(b"GET / HTTP/2.0\r\n\r\n")
    assert memory.transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert memory.endpoints == []


def test_malformed_body_stops_its_endpoint() -> None:
    """A broken chunked body is answered 400, and the endpoint that was reading it is stopped."""
    memory = Memory()
    memory.send(b"POST /sink HTTP/1.1\r\nHost: demo.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX")
    [endpoint] = memory.endpoints
    assert endpoint.stopped
    assert memory.transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n")


def test_requests_after_the_last_are_dropped() -> None:
    """What follows a request with `Connection: close` is never read as a request."""
    memory = Memory()
    memory.send(get(b"/last", close=True) + get(b"/never"))
    assert [endpoint.request.path for endpoint in memory.endpoints] == [b"/last"]
    assert memory.transport.disconnecting


def test_connection_lost_stops_every_endpoint() -> None:
    """When the client goes, the endpoint answering, those waiting and the one being read are all stopped."""
    memory = Memory(held=frozenset({b"/slow"}))
    memory.send(
        get(b"/slow") + get(b"/waiting") + b"POST /sink HTTP/1.1\r\nHost: demo.test\r\nContent-Length: 9\r\n\r\n"
    )
    disconnect(memory.transport, memory.connection)
    assert [endpoint.stopped for endpoint in memory.endpoints] == [True, True, True]
