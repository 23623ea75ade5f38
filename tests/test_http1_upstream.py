"""`gateway.http1.upstream.UpstreamConnection` in memory: what goes on the wire, how the response and its body
come back (full duplex, HEAD, 1xx, close-delimited), when a connection is reused and when it is closed.

The connection runs over a `StringTransport`; the request body comes from a small `IBodyProducer` the test drives.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import (
    PotentialDataLoss,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from gateway.errors import UpstreamBroken
from gateway.http1.exchange import MAX_RESPONSE_HEAD
from gateway.http1.response import UpstreamResponse
from gateway.http1.upstream import UpstreamConnection
from tests.support.requests import request
from tests.test_upstream import _head_of

_sync = SynchronousTestCase()
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class CountingTransport(StringTransport):
    """A socket that records the pauses and resumes of reading it was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self.calls.append("resume")
        super().resumeProducing()

    def abortConnection(self) -> None:
        self.calls.append("abort")
        self.loseConnection()


class Connection:
    """An `UpstreamConnection` on a transport, with what it told its pool."""

    def __init__(self) -> None:
        self.idle: list[UpstreamConnection] = []
        self.gone: list[UpstreamConnection] = []
        self.protocol = UpstreamConnection(self.idle.append, self.gone.append)
        self.transport = CountingTransport()
        self.protocol.makeConnection(self.transport)

    def sent(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def receive(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lose(self, reason: Exception) -> None:
        self.protocol.connectionLost(Failure(reason))


class Body(Protocol):
    """A response body protocol that keeps what it was given and how it ended."""

    def __init__(self) -> None:
        self.data = b""
        self.ended: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.ended = reason


@implementer(IBodyProducer)
class ManualBody:
    """A request body the test writes piece by piece, then ends (`finish`) or fails (`fail`)."""

    def __init__(self, length: int | object = UNKNOWN_LENGTH) -> None:
        self.length = length
        self.consumer: Any = None
        self.done: Deferred[None] | None = None
        self.events: list[str] = []

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self.consumer = consumer
        self.done = Deferred()
        return self.done

    def write(self, data: bytes) -> None:
        self.consumer.write(data)

    def finish(self) -> None:
        assert self.done is not None
        self.done.callback(None)

    def fail(self, reason: Exception) -> None:
        assert self.done is not None
        self.done.errback(Failure(reason))

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


def get(connection: Connection, method: bytes = b"GET", body: Any = None) -> Deferred[UpstreamResponse]:
    return request(connection.protocol, method, b"/x?y=1", Headers({b"Host": [b"backend"]}), body)


# --- the request on the wire ---------------------------------------------------------------------------------


def test_a_request_goes_out_as_one_write() -> None:
    """The head is one write: the request line, the headers, and the framing of no body."""
    c = Connection()
    get(c)
    assert c.transport.io.getvalue() == b"GET /x?y=1 HTTP/1.1\r\nHost: backend\r\n\r\n"


def test_a_body_of_known_length_goes_out_as_it_comes_and_the_connection_is_reused() -> None:
    """With a length: Content-Length, then the bytes as written, unframed; after the whole exchange the connection
    goes back to the pool."""
    c = Connection()
    body = ManualBody(5)
    response = get(c, b"POST", body)
    assert c.sent().endswith(b"Content-Length: 5\r\n\r\n")
    body.write(b"he")
    body.write(b"llo")
    body.finish()
    assert c.sent() == b"hello"
    c.receive(OK)
    assert _sync.successResultOf(response).code == 200
    assert c.idle == [c.protocol]


def test_a_body_of_unknown_length_is_chunked_and_ended() -> None:
    """Without a length: each piece is a chunk, an empty write is no chunk, and the end is the last chunk."""
    c = Connection()
    body = ManualBody()
    get(c, b"PUT", body)
    assert c.sent().endswith(b"Transfer-Encoding: chunked\r\n\r\n")
    body.write(b"abc")
    body.write(b"")
    body.write(b"x" * 20)
    body.finish()
    assert c.sent() == b"3\r\nabc\r\n14\r\n" + b"x" * 20 + b"\r\n0\r\n\r\n"


def test_a_body_shorter_than_its_length_fails_the_request_and_cuts_the_connection() -> None:
    """A producer that ends short of its declared length cannot be finished on the wire: the connection is cut
    (the upstream sees an unfinished body) and the request fails."""
    c = Connection()
    body = ManualBody(10)
    response = get(c, b"POST", body)
    body.write(b"short")
    body.finish()
    failure = _sync.failureResultOf(response, RequestTransmissionFailed)
    assert failure.value.reasons[0].check(UpstreamBroken)
    assert "abort" in c.transport.calls


def test_a_failed_body_cuts_the_connection_without_a_last_chunk() -> None:
    """A body that fails (the client left) reaches the upstream unfinished: no last chunk, the connection cut."""
    c = Connection()
    body = ManualBody()
    response = get(c, b"POST", body)
    body.write(b"abc")
    body.fail(ConnectionLost("the client went away"))
    assert not c.sent().endswith(b"0\r\n\r\n")
    assert "abort" in c.transport.calls
    _sync.failureResultOf(response, RequestTransmissionFailed)
    assert c.gone == [c.protocol]


def test_the_body_producer_is_paused_by_the_socket() -> None:
    """The body producer is registered on the upstream socket as a streaming producer: a full send buffer pauses
    it, a drained one resumes it; it is unregistered once the body is sent."""
    c = Connection()
    body = ManualBody()
    get(c, b"POST", body)
    assert c.transport.producer is body and c.transport.streaming
    body.finish()
    assert c.transport.producer is None


# --- the response ---------------------------------------------------------------------------------------------


def test_a_response_is_read_without_pausing_the_socket() -> None:
    """A response whose body gets a protocol as soon as its head is read costs no pause and no resume of the
    upstream socket (each is a system call; Agent paused and resumed for every response)."""
    c = Connection()
    response = get(c)

    def deliver(r: UpstreamResponse) -> UpstreamResponse:
        r.deliverBody(Body())
        return r

    response.addCallback(deliver)
    c.receive(OK)
    _sync.successResultOf(response)
    assert c.transport.calls == []


def test_the_response_keeps_every_header_as_sent() -> None:
    """Status, phrase, version and every header (framing ones too, for the owner to drop) come as the upstream
    sent them, without the whitespace around values; the length is the Content-Length."""
    c = Connection()
    response = get(c)
    c.receive(
        b"HTTP/1.0 299 Quite Unusual\r\nX-A: 1\r\nx-a: 2 \t\r\nContent-Length: 3\r\nConnection: keep-alive\r\n"
        b"X-Inner: a  b\t\r\n\r\nabc"
    )
    r = _sync.successResultOf(response)
    assert (r.code, r.phrase, r.version, r.length) == (299, b"Quite Unusual", (b"HTTP", 1, 0), 3)
    assert r.headers.getRawHeaders(b"x-a") == [b"1", b"2"]  # the whitespace after a value, which llhttp keeps, goes
    assert r.headers.getRawHeaders(b"x-inner") == [b"a  b"]
    assert r.headers.getRawHeaders(b"content-length") == [b"3"]
    assert r.headers.getRawHeaders(b"connection") == [b"keep-alive"]


def test_body_bytes_read_before_the_body_has_a_protocol_are_held_and_reading_paused() -> None:
    """Bytes read with the head wait for `deliverBody` (one read at most: reading pauses) and then go first."""
    c = Connection()
    response = get(c)
    c.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
    r = _sync.successResultOf(response)
    assert c.transport.calls == ["pause"]
    body = Body()
    r.deliverBody(body)
    assert body.data == b"abc"
    assert c.transport.calls == ["pause", "resume"]
    c.receive(b"def")
    assert body.data == b"abcdef"
    assert body.ended is not None and body.ended.check(ResponseDone)


def test_full_duplex_an_answer_while_the_body_is_still_going_out_is_handed_over_at_once() -> None:
    """The response head is handed over as soon as it is read, even while the request body is still being sent;
    if the response ends first, the rest of the body is not wanted: the producer is stopped and the connection
    cut (never reused, never closed gracefully behind a body nobody reads)."""
    c = Connection()
    body = ManualBody()
    response = get(c, b"POST", body)
    body.write(b"abc")
    c.receive(b"HTTP/1.1 413 Too Big\r\nContent-Length: 2\r\n\r\n")
    r = _sync.successResultOf(response)
    assert r.code == 413
    got = Body()
    r.deliverBody(got)
    c.receive(b"no")
    assert got.data == b"no" and got.ended is not None and got.ended.check(ResponseDone)
    assert body.events == ["stop"]
    assert "abort" in c.transport.calls
    assert c.idle == []


def test_an_answer_to_head_is_complete_at_its_head_and_the_connection_reused() -> None:
    """llhttp cannot be told that a response to HEAD has no body: the connection ends it at its head, relays its
    Content-Length as a header, and reuses the connection (a new parser for the next exchange)."""
    c = Connection()
    response = get(c, b"HEAD")
    c.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    r = _sync.successResultOf(response)
    assert r.length == 0 and r.headers.getRawHeaders(b"content-length") == [b"1000"]
    body = Body()
    r.deliverBody(body)
    assert body.ended is not None and body.ended.check(ResponseDone)
    assert c.idle == [c.protocol]
    second = get(c)
    c.receive(OK)
    assert _sync.successResultOf(second).code == 200


def test_bytes_after_an_answer_to_head_close_the_connection() -> None:
    """A body sent with an answer to HEAD is one byte too many: the answer stands, the connection is closed."""
    c = Connection()
    response = get(c, b"HEAD")
    c.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    _sync.successResultOf(response)
    assert "abort" in c.transport.calls
    assert c.gone == [c.protocol]


@pytest.mark.parametrize(
    "interim", [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"]
)
def test_interim_answers_are_skipped(interim: bytes) -> None:
    """1xx answers before the final one are not the response."""
    c = Connection()
    response = get(c)
    c.receive(interim)
    _sync.assertNoResult(response)
    c.receive(OK)
    assert _sync.successResultOf(response).code == 200


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "switched protocols",
        ),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched protocols"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc", "transfer coding other than chunked"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", "transfer coding"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", "malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551616\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nX-A: a\r\n  folded\r\n\r\n", "malformed"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "malformed"),
        (b"HTTP/1.1 099 Low\r\n\r\n", "invalid status"),
        (b"HTTP/2.0 200 OK\r\n\r\n", ""),
    ],
    ids=[
        "101-upgrade",
        "101",
        "gzip",
        "gzip-chunked",
        "cl-twice",
        "cl-and-te",
        "cl-overflow",
        "obs-fold",
        "status-4-digits",
        "status-below-100",
        "version-2",
    ],
)
def test_a_broken_response_head_fails_the_request_and_closes(answer: bytes, reason: str) -> None:
    """A head no client could be given as it is fails the request with UpstreamBroken (a 502, its detail saying
    what), before any of it is handed over, and the connection is closed, never pooled."""
    c = Connection()
    response = get(c)
    c.receive(answer)
    failure = _sync.failureResultOf(response, ResponseFailed)
    [cause] = failure.value.reasons
    assert cause.check(UpstreamBroken) and reason in cause.value.detail, cause.value
    assert "abort" in c.transport.calls
    assert c.idle == []


def test_a_body_framed_by_the_close_ends_as_potential_data_loss_and_says_whether_it_was_reset() -> None:
    """Without Content-Length or chunked framing the body runs to the connection's close: it ends with
    PotentialDataLoss, and `reset` tells a clean close (complete as far as anyone can tell) from a reset."""
    for lost, reset in ((ConnectionDone(), False), (ConnectionLost(), True)):
        c = Connection()
        response = get(c)
        c.receive(b"HTTP/1.1 200 OK\r\n\r\nsome")
        r = _sync.successResultOf(response)
        body = Body()
        r.deliverBody(body)
        c.receive(b" more")
        c.lose(lost)
        assert body.data == b"some more"
        assert body.ended is not None and body.ended.check(PotentialDataLoss)
        assert r.reset is reset


@pytest.mark.parametrize(
    "cut",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    ],
    ids=["short", "no-last-chunk"],
)
def test_a_body_cut_short_ends_failed(cut: bytes) -> None:
    """A body short of its Content-Length, or without its last chunk, ends with ResponseFailed when the connection
    goes, however it goes."""
    c = Connection()
    response = get(c)
    c.receive(cut)
    body = Body()
    _sync.successResultOf(response).deliverBody(body)
    c.lose(ConnectionDone())
    assert body.ended is not None and body.ended.check(ResponseFailed)


def test_a_connection_lost_before_any_answer_is_response_never_received() -> None:
    """Lost before a byte of the response: ResponseNeverReceived (which the pool may retry on a new connection);
    after some of the head: ResponseFailed."""
    c = Connection()
    response = get(c)
    c.lose(ConnectionDone())
    _sync.failureResultOf(response, ResponseNeverReceived)
    c = Connection()
    response = get(c)
    c.receive(b"HTTP/1.1 200")
    c.lose(ConnectionDone())
    _sync.failureResultOf(response, ResponseFailed)


def test_the_connection_is_back_in_the_pool_before_the_body_is_told_it_ended() -> None:
    """The owner, told the body ended, may send its next request at once (a pipelined one): the connection must
    be idle by then, so that it is the one reused."""
    c = Connection()
    response = get(c)
    idle_when_ended: list[bool] = []

    class Next(Body):
        def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
            idle_when_ended.append(c.idle == [c.protocol] and c.protocol.usable)

    response.addCallback(lambda r: r.deliverBody(Next()))
    c.receive(OK)
    assert idle_when_ended == [True]


def test_bytes_with_no_request_outstanding_close_the_connection() -> None:
    """An idle connection that receives bytes is out of step with the gateway: closed, never reused."""
    c = Connection()
    get(c)
    c.receive(OK)
    assert c.idle == [c.protocol]
    c.receive(b"HTTP/1.1 200 OK\r\n")
    assert "abort" in c.transport.calls
    assert not c.protocol.usable


def test_connection_close_from_the_upstream_is_not_reused() -> None:
    """A response saying Connection: close (or an HTTP/1.0 one without keep-alive) ends the connection."""
    for answer in (
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ):
        c = Connection()
        response = get(c)
        c.receive(answer)
        _sync.successResultOf(response).deliverBody(Body())
        assert c.idle == []
        assert c.transport.disconnecting


def test_cancelling_before_the_head_closes_the_connection() -> None:
    """An owner that gives up (a timeout, the client gone) cancels: the connection is cut, never reused."""
    c = Connection()
    response = get(c)
    response.cancel()
    assert "abort" in c.transport.calls
    assert c.gone == [c.protocol]
    _sync.failureResultOf(response)


def test_stopping_the_body_closes_the_connection() -> None:
    """The body protocol's transport stops reading for good (the client left): the connection is cut; a late
    pause or stop after the body ended reaches nothing."""
    c = Connection()
    response = get(c)
    c.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
    r = _sync.successResultOf(response)
    body = Body()
    r.deliverBody(body)
    body.transport.stopProducing()
    assert "abort" in c.transport.calls
    c2 = Connection()
    response = get(c2)
    c2.receive(OK)
    r2 = _sync.successResultOf(response)
    late = Body()
    r2.deliverBody(late)
    calls = list(c2.transport.calls)
    late.transport.pauseProducing()
    late.transport.stopProducing()
    assert c2.transport.calls == calls
    assert c2.idle == [c2.protocol] and c2.protocol.usable


# --- found in review: bytes past a response, split heads, trailers, late pauses, cancels, lengths ---------------


def test_bytes_after_a_response_in_the_same_read_never_let_the_connection_be_reused() -> None:
    """A response that ends within a read followed by more bytes stands (its body ends complete), but the
    connection is never offered to the next request, not even for a moment: the bytes are seen before it could
    go back to the pool (a queued request given it would be cut by them)."""
    c = Connection()
    response = get(c)
    seen_idle: list[bool] = []

    class Watch(Body):
        def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
            seen_idle.append(bool(c.idle))
            super().connectionLost(reason)

    body = Watch()
    response.addCallback(lambda r: r.deliverBody(body))
    c.receive(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")
    assert body.data == b"ok" and body.ended is not None and body.ended.check(ResponseDone)
    assert seen_idle == [False]
    assert c.idle == [] and "abort" in c.transport.calls


def test_a_head_split_across_reads_counts_once() -> None:
    """A head that comes in many reads (a TLS record at a time) is held to MAX_RESPONSE_HEAD as a whole, not to
    half of it: its lines are counted once, whatever the reads."""

    for size, taken in ((MAX_RESPONSE_HEAD, True), (MAX_RESPONSE_HEAD + 1, False)):
        c = Connection()
        response = get(c)
        head = _head_of(size)
        for start in range(0, len(head), 1000):
            if "abort" in c.transport.calls:
                break
            c.receive(head[start : start + 1000])
        if taken:
            assert _sync.successResultOf(response).code == 204
        else:
            _sync.failureResultOf(response, ResponseFailed)


def test_trailers_are_bounded_and_not_kept() -> None:
    """Trailers are counted like a head (64 KiB at most, then the body ends failed and the connection closes)
    and never kept: they are not relayed."""
    c = Connection()
    response = get(c)
    c.receive(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n")
    r = _sync.successResultOf(response)
    body = Body()
    r.deliverBody(body)
    line = b"X-T: " + b"t" * 1000 + b"\r\n"
    for _ in range(80):
        if body.ended is not None:
            break
        c.receive(line)
    assert body.data == b"abc"
    assert body.ended is not None and body.ended.check(ResponseFailed)
    assert r.headers.getRawHeaders(b"x-t") is None
    assert "abort" in c.transport.calls


def test_a_trailer_that_never_ends_is_bounded() -> None:
    """Bytes with no body byte in them (a trailer line that never ends, held by the parser) are bounded too."""
    c = Connection()
    response = get(c)
    c.receive(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: ")
    body = Body()
    _sync.successResultOf(response).deliverBody(body)
    for _ in range(100):
        if body.ended is not None:
            break
        c.receive(b"t" * 16384)
    assert body.ended is not None and body.ended.check(ResponseFailed)


def test_a_body_delivered_after_the_response_ended_cannot_pause_the_pooled_connection() -> None:
    """A response read whole before its body had a protocol is already over (its connection may be pooled): the
    protocol then gets a transport cut off from the connection."""
    c = Connection()
    response = get(c)
    c.receive(OK)
    r = _sync.successResultOf(response)
    assert c.idle == [c.protocol]
    body = Body()
    r.deliverBody(body)
    calls = list(c.transport.calls)
    body.transport.pauseProducing()
    body.transport.stopProducing()
    assert c.transport.calls == calls
    assert body.data == b"ok" and c.protocol.usable


def test_cancelling_stops_and_unregisters_the_body_once() -> None:
    """A cancel while the body is still going stops its producer once and lets it go from the socket."""
    c = Connection()
    body = ManualBody()
    response = get(c, b"POST", body)
    response.cancel()
    assert body.events == ["stop"]
    assert c.transport.producer is None
    c.lose(ConnectionDone())
    assert body.events == ["stop"]
    _sync.failureResultOf(response)


def test_a_body_past_its_declared_length_is_never_written() -> None:
    """A producer writing past its declared length (the rest would be read as the next request) has that write
    dropped, is stopped, and the connection cut: the request fails."""
    c = Connection()
    body = ManualBody(3)
    response = get(c, b"POST", body)
    c.sent()
    body.write(b"ab")
    body.write(b"cd")
    assert c.sent() == b"ab"
    assert body.events == ["stop"]
    assert "abort" in c.transport.calls
    failure = _sync.failureResultOf(response, RequestTransmissionFailed)
    assert failure.value.reasons[0].check(UpstreamBroken)


def test_an_http_1_0_answer_to_head_with_keep_alive_keeps_the_connection() -> None:
    """An HTTP/1.0 upstream that says keep-alive keeps its connection after an answer to HEAD; without it, not."""
    for answer, kept in (
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n", True),
        (b"HTTP/1.0 200 OK\r\n\r\n", False),
    ):
        c = Connection()
        response = get(c, b"HEAD")
        c.receive(answer)
        _sync.successResultOf(response).deliverBody(Body())
        assert (c.idle == [c.protocol]) is kept


# --- a Content-Length body past its first read -----------------------------------------------------------------


def test_a_content_length_body_after_its_first_read_is_relayed_read_by_read_and_the_connection_reused() -> None:
    """Past the read that completed its head, a Content-Length body's reads go to the body protocol as they came
    (not re-sliced by the parser), the response ends whole at its last byte, and the connection is reused."""
    c = Connection()
    response = get(c)
    body = Body()
    response.addCallback(lambda r: r.deliverBody(body))
    pieces: list[bytes] = []
    original = body.dataReceived

    def keep(data: bytes) -> None:
        pieces.append(data)
        original(data)

    body.dataReceived = keep  # type: ignore[method-assign]
    c.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
    c.receive(b"cdef")
    assert body.ended is None and c.idle == []
    c.receive(b"ghij")
    assert pieces == [b"ab", b"cdef", b"ghij"] and body.data == b"abcdefghij"
    assert body.ended is not None and body.ended.check(ResponseDone)
    assert c.idle == [c.protocol]
    second = get(c)  # the connection serves the next request as a fresh one
    c.receive(OK)
    assert _sync.successResultOf(second).code == 200


def test_bytes_past_a_content_length_body_read_after_its_head_close_the_connection() -> None:
    """A read that ends the body and carries more bytes: the response stands, whole, but the connection is out of
    step and closed, never reused."""
    c = Connection()
    response = get(c)
    body = Body()
    response.addCallback(lambda r: r.deliverBody(body))
    c.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nab")
    c.receive(b"cdefHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")
    assert body.data == b"abcdef" and body.ended is not None and body.ended.check(ResponseDone)
    assert c.idle == [] and "abort" in c.transport.calls


def test_a_content_length_body_cut_after_its_first_read_ends_failed() -> None:
    """The connection lost before a Content-Length body's last byte, reads after its head: ResponseFailed."""
    c = Connection()
    response = get(c)
    body = Body()
    response.addCallback(lambda r: r.deliverBody(body))
    c.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
    c.receive(b"cd")
    c.lose(ConnectionDone())
    assert body.data == b"abcd" and body.ended is not None and body.ended.check(ResponseFailed)


def test_an_answer_with_connection_close_ends_its_connection_after_a_body_read_past_its_head() -> None:
    """`Connection: close` still holds when the body's end came in a read past its head: not reused."""
    c = Connection()
    response = get(c)
    body = Body()
    response.addCallback(lambda r: r.deliverBody(body))
    c.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nab")
    c.receive(b"cd")
    assert body.ended is not None and body.ended.check(ResponseDone)
    assert c.idle == []
