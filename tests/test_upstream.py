"""`gateway.proxy.pool.UpstreamPool` in memory: the concurrency cap, the bounded queue and its timeout, and the
connect timeout, on a `MemoryReactorClock` (no sockets, no resolver thread)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from zope.interface import implementer

from gateway.config import Upstream
from gateway.errors import UpstreamBroken, UpstreamSaturated
from gateway.http1.exchange import MAX_RESPONSE_HEAD
from gateway.proxy.pool import ConnectTimeout, UpstreamPool
from tests.support.requests import request

_sync = SynchronousTestCase()
EPS = 0.25
"""A step of time binary floating point represents exactly."""


def upstream(host: str = "127.0.0.1", **settings: Any) -> Upstream:
    return Upstream(name="origin", scheme="http", host=host, port=8081, base_path=b"", **settings)


def pool_for(reactor: MemoryReactorClock | None = None, **settings: Any) -> tuple[UpstreamPool, MemoryReactorClock]:
    clock = reactor if reactor is not None else MemoryReactorClock()
    return UpstreamPool(upstream(**settings), clock), clock


@implementer(IHostnameResolver)
class RecordingResolver:
    """The reactor's name resolver, noting every name it is asked to resolve."""

    def __init__(self, inner: IHostnameResolver) -> None:
        self.inner = inner
        self.names: list[str] = []

    def resolveHostName(self, receiver: Any, hostName: str, *args: Any, **kwargs: Any) -> Any:
        self.names.append(hostName)
        return self.inner.resolveHostName(receiver, hostName, *args, **kwargs)


# --- the concurrency cap and the queue -------------------------------------------------------------------


def test_acquire_is_immediate_when_a_slot_is_free() -> None:
    """With fewer than max_connections requests in flight, acquire succeeds at once and schedules nothing."""
    pool, clock = pool_for(max_connections=2)
    _sync.successResultOf(pool.acquire())
    _sync.successResultOf(pool.acquire())
    assert pool.in_flight == 2
    assert pool.queued == 0
    assert clock.getDelayedCalls() == []


def test_acquire_beyond_max_connections_waits_in_the_queue() -> None:
    """A request beyond max_connections waits: its Deferred has no result and it is counted as queued."""
    pool, _clock = pool_for(max_connections=1, max_queue=5)
    _sync.successResultOf(pool.acquire())
    waiting = pool.acquire()
    _sync.assertNoResult(waiting)
    assert pool.in_flight == 1
    assert pool.queued == 1


def test_acquire_fails_at_once_when_the_queue_is_full() -> None:
    """With max_queue requests already waiting, the next acquire fails with UpstreamSaturated at once."""
    pool, _clock = pool_for(max_connections=1, max_queue=2)
    _sync.successResultOf(pool.acquire())
    first, second = pool.acquire(), pool.acquire()
    _sync.failureResultOf(pool.acquire(), UpstreamSaturated)
    _sync.assertNoResult(first)
    _sync.assertNoResult(second)
    assert pool.queued == 2


@pytest.mark.parametrize(
    ("inline", "named"), [(False, "upstream origin"), (True, "the upstream")], ids=["named", "url"]
)
def test_saturation_names_the_upstream_by_its_name_never_by_a_url(inline: bool, named: str) -> None:
    """A 503 for a full queue or a queue timeout names a declared upstream by its name; one a route gave as a URL
    (whose name is that URL) by no address, and the request names it by its route (`naming`)."""
    clock = MemoryReactorClock()
    pool = UpstreamPool(
        Upstream(
            name="http://10.1.2.3:8080" if inline else "origin",
            scheme="http",
            host="10.1.2.3",
            port=8080,
            base_path=b"",
            inline=inline,
            max_connections=1,
            max_queue=1,
            queue_timeout=1,
        ),
        clock,
    )
    _sync.successResultOf(pool.acquire())
    waiting = pool.acquire()
    full = _sync.failureResultOf(pool.acquire(), UpstreamSaturated).value
    assert str(full) == f"{named} has 1 requests queued already"
    clock.advance(1)
    timed_out = _sync.failureResultOf(waiting, UpstreamSaturated).value
    assert str(timed_out) == f"no connection to {named} came free within 1 s"
    assert "10.1.2.3" not in str(full) + str(timed_out)
    assert str(full.naming("the upstream of route r")) == "the upstream of route r has 1 requests queued already"


def test_queue_timeout_fails_a_waiter_after_exactly_queue_timeout() -> None:
    """A request that waits queue_timeout seconds for a slot fails with UpstreamSaturated; not a moment before."""
    pool, clock = pool_for(max_connections=1, max_queue=5, queue_timeout=3)
    _sync.successResultOf(pool.acquire())
    waiting = pool.acquire()
    clock.advance(3 - EPS)
    _sync.assertNoResult(waiting)
    clock.advance(EPS)
    _sync.failureResultOf(waiting, UpstreamSaturated)
    assert pool.queued == 0
    assert pool.in_flight == 1
    assert clock.getDelayedCalls() == []


def test_cancelling_a_queued_acquire_leaves_the_queue() -> None:
    """A cancelled waiter leaves the queue, its timer is gone, and a released slot is not handed to it."""
    pool, clock = pool_for(max_connections=1, max_queue=5)
    _sync.successResultOf(pool.acquire())
    waiting = pool.acquire()
    waiting.cancel()
    _sync.failureResultOf(waiting, CancelledError)
    assert pool.queued == 0
    assert clock.getDelayedCalls() == []
    pool.release()
    assert pool.in_flight == 0


def test_release_hands_the_slot_to_the_next_waiter() -> None:
    """Releasing a slot gives it to the longest waiter at once, which stops that waiter's queue timer."""
    pool, clock = pool_for(max_connections=1, max_queue=5, queue_timeout=3)
    _sync.successResultOf(pool.acquire())
    first, second = pool.acquire(), pool.acquire()
    pool.release()
    _sync.successResultOf(first)
    _sync.assertNoResult(second)
    assert pool.in_flight == 1
    assert pool.queued == 1
    pool.release()
    _sync.successResultOf(second)
    assert clock.getDelayedCalls() == []
    clock.advance(10)  # the granted waiters' queue timeouts are gone: nothing fails late


def test_release_without_waiters_frees_the_slot() -> None:
    """Releasing with nobody waiting returns the slot: in_flight drops and the next acquire is immediate."""
    pool, _clock = pool_for(max_connections=1)
    _sync.successResultOf(pool.acquire())
    pool.release()
    assert pool.in_flight == 0
    _sync.successResultOf(pool.acquire())
    assert pool.in_flight == 1


def test_a_full_queue_accepts_again_once_a_waiter_leaves() -> None:
    """After a waiter times out, the queue has room again: the next acquire waits instead of failing."""
    pool, clock = pool_for(max_connections=1, max_queue=1, queue_timeout=3)
    _sync.successResultOf(pool.acquire())
    leaving = pool.acquire()
    _sync.assertNoResult(leaving)
    _sync.failureResultOf(pool.acquire(), UpstreamSaturated)
    clock.advance(3)
    _sync.failureResultOf(leaving, UpstreamSaturated)  # consumed: not logged as unhandled when collected
    again = pool.acquire()
    _sync.assertNoResult(again)
    assert pool.queued == 1
    again.cancel()
    _sync.failureResultOf(again, CancelledError)


# --- connecting --------------------------------------------------------------------------------------------


def test_connect_timeout_fails_with_connect_timeout_after_exactly_connect_seconds() -> None:
    """A connection that does not open within connect_timeout fails the request with ConnectTimeout, not before."""
    pool, clock = pool_for()
    response = request(pool, b"GET", b"/x", Headers(), None, connect_timeout=5)
    assert len(clock.tcpClients) == 1
    clock.advance(5 - EPS)
    _sync.assertNoResult(response)
    clock.advance(EPS)
    failure = _sync.failureResultOf(response, ConnectTimeout)
    assert "5 s" in failure.getErrorMessage()
    assert clock.getDelayedCalls() == []


def test_the_reactor_connect_timeout_is_only_a_later_backstop() -> None:
    """The timeout given to the reactor's connectTCP is later than the gateway's own, so ours always decides."""
    pool, clock = pool_for()
    response = request(pool, b"GET", b"/x", Headers(), None, connect_timeout=5)
    [(_host, _port, _factory, timeout, _bind)] = clock.tcpClients
    assert timeout > 5
    clock.advance(5)
    _sync.failureResultOf(response, ConnectTimeout)


def test_a_connection_opened_in_time_cancels_the_connect_timer() -> None:
    """Once the connection opens the connect timer is gone: the request is written and waits without failing."""
    pool, clock = pool_for()
    response = request(pool, b"GET", b"/x", Headers(), None, connect_timeout=5)
    host, port, factory, _timeout, _bind = clock.tcpClients[0]
    transport = StringTransport()
    factory.buildProtocol(IPv4Address("TCP", host, port)).makeConnection(transport)
    assert transport.value().startswith(b"GET /x HTTP/1.1\r\n")
    assert clock.getDelayedCalls() == []
    clock.advance(60)
    _sync.assertNoResult(response)
    response.cancel()  # aborts the connection; the request fails
    _sync.failureResultOf(response)
    assert transport.disconnecting


def test_the_request_goes_to_the_upstream_origin_with_the_given_target() -> None:
    """`request` connects to the upstream's host and port and sends the method and target it was given."""
    pool, clock = pool_for()
    request(pool, b"DELETE", b"/a/b?c=d", Headers({b"X-Test": [b"1"]}), None, connect_timeout=5)
    host, port, factory, _timeout, _bind = clock.tcpClients[0]
    assert (host, port) == ("127.0.0.1", 8081)
    transport = StringTransport()
    factory.buildProtocol(IPv4Address("TCP", host, port)).makeConnection(transport)
    sent = transport.value()
    assert sent.startswith(b"DELETE /a/b?c=d HTTP/1.1\r\n")
    assert b"X-Test: 1\r\n" in sent
    transport.loseConnection()


def test_ipv4_literal_connects_without_the_resolver() -> None:
    """An IPv4 literal upstream host is connected to directly: no name resolution, the connect starts at once."""
    reactor = MemoryReactorClock()
    resolver = RecordingResolver(reactor.nameResolver)
    reactor.installNameResolver(resolver)
    pool, _ = pool_for(reactor, host="127.0.0.1")
    response = request(pool, b"GET", b"/", Headers(), None, connect_timeout=5)
    assert resolver.names == []
    assert [c[:2] for c in reactor.tcpClients] == [("127.0.0.1", 8081)]
    response.cancel()
    _sync.failureResultOf(response)


def test_ipv6_literal_connects_without_the_resolver() -> None:
    """An IPv6 literal upstream host is connected to directly over TCP6: no name resolution."""
    reactor = MemoryReactorClock()
    resolver = RecordingResolver(reactor.nameResolver)
    reactor.installNameResolver(resolver)
    pool, _ = pool_for(reactor, host="::1")
    response = request(pool, b"GET", b"/", Headers(), None, connect_timeout=5)
    assert resolver.names == []
    assert [c[:2] for c in reactor.tcpClients] == [("::1", 8081)]
    response.cancel()
    _sync.failureResultOf(response)


def test_a_host_name_goes_through_the_resolver() -> None:
    """A host name (not an IP literal) is resolved through the reactor's resolver before connecting."""
    reactor = MemoryReactorClock()
    resolver = RecordingResolver(reactor.nameResolver)
    reactor.installNameResolver(resolver)
    pool, _ = pool_for(reactor, host="localhost")
    response = request(pool, b"GET", b"/", Headers(), None, connect_timeout=5)
    assert resolver.names == ["localhost"]
    response.cancel()
    _sync.failureResultOf(response)
    reactor.advance(10)
    assert reactor.getDelayedCalls() == []


def test_close_closes_idle_pooled_connections() -> None:
    """`close` closes the connections idling in the pool and cancels their idle timers."""
    pool, clock = pool_for()
    response = request(pool, b"GET", b"/", Headers(), None, connect_timeout=5)
    host, port, factory, _timeout, _bind = clock.tcpClients[0]
    transport = StringTransport()
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    protocol.makeConnection(transport)
    protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    _sync.successResultOf(response)
    assert len(clock.getDelayedCalls()) == 1  # the pooled connection's idle timer
    pool.close()
    assert transport.disconnecting
    assert clock.getDelayedCalls() == []


# --- upstreams that break framing ---------------------------------------------------------------------


def _connected(pool: UpstreamPool, clock: MemoryReactorClock) -> tuple[Any, StringTransport]:
    host, port, factory, _timeout, _bind = clock.tcpClients[-1]
    transport = StringTransport()
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    protocol.makeConnection(transport)
    return protocol, transport


def _head_of(total: int) -> bytes:
    """A 204 response head of exactly `total` (at least 1,100) bytes, padded with 1,000-byte header lines and
    one of 1,000 to 1,999 bytes (all under Agent's 16 KiB line limit)."""
    start, end = b"HTTP/1.1 204 No Content\r\n", b"\r\n"
    pad = total - len(start) - len(end)
    full = pad // 1000 - 1
    sizes = [1000] * full + [pad - 1000 * full]
    head = start + b"".join(b"X-P: " + b"p" * (size - 7) + b"\r\n" for size in sizes) + end
    assert len(head) == total
    return head


def test_a_response_head_of_exactly_max_response_head_bytes_is_taken() -> None:
    """A response head of exactly MAX_RESPONSE_HEAD bytes is accepted whole."""
    pool, clock = pool_for()
    response = request(pool, b"GET", b"/", Headers(), None, connect_timeout=5)
    protocol, _transport = _connected(pool, clock)
    protocol.dataReceived(_head_of(MAX_RESPONSE_HEAD))
    assert _sync.successResultOf(response).code == 204
    pool.close()


def test_a_response_head_one_byte_over_max_response_head_fails_and_closes() -> None:
    """A response head one byte over MAX_RESPONSE_HEAD fails the request with UpstreamBroken (a 502), and the
    connection is closed rather than pooled."""
    pool, clock = pool_for()
    response = request(pool, b"GET", b"/", Headers(), None, connect_timeout=5)
    protocol, transport = _connected(pool, clock)
    protocol.dataReceived(_head_of(MAX_RESPONSE_HEAD + 1))
    failure = _sync.failureResultOf(response, ResponseFailed)
    assert [r.type for r in failure.value.reasons] == [UpstreamBroken]
    assert transport.disconnecting
    assert clock.getDelayedCalls() == []


def test_1xx_heads_count_towards_max_response_head() -> None:
    """Interim (1xx) heads, which Agent skips, count towards the limit: an upstream cannot send them for ever."""
    pool, clock = pool_for()
    response = request(pool, b"GET", b"/", Headers(), None, connect_timeout=5)
    protocol, transport = _connected(pool, clock)
    interim = b"HTTP/1.1 102 Processing\r\n\r\n"
    for _ in range(MAX_RESPONSE_HEAD // len(interim) + 1):
        if transport.disconnecting:
            break
        protocol.dataReceived(interim)
    _sync.failureResultOf(response, ResponseFailed)
    assert transport.disconnecting


def test_bytes_after_a_complete_response_close_the_connection() -> None:
    """Bytes past a response's Content-Length leave the response as declared, and close the connection rather
    than pool it: they could be read as the answer to the next request."""
    pool, clock = pool_for()
    response = request(pool, b"GET", b"/", Headers(), None, connect_timeout=5)
    protocol, transport = _connected(pool, clock)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n")
    assert _sync.successResultOf(response).length == 2
    assert transport.disconnecting
    assert clock.getDelayedCalls() == []  # no idle timer: the connection is not in the pool


# --- idle connections and the retry of a stale one -------------------------------------------------------


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _answered(pool: UpstreamPool, clock: MemoryReactorClock) -> tuple[Any, StringTransport]:
    """One GET sent on a new connection and answered whole: the connection is idle in the pool."""
    response = request(pool, b"GET", b"/", Headers({b"Host": [b"h"]}), None, connect_timeout=5)
    protocol, transport = _connected(pool, clock)
    protocol.dataReceived(OK)
    _sync.successResultOf(response)
    transport.clear()
    return protocol, transport


def test_an_idle_connection_is_reused_and_closed_after_idle_timeout() -> None:
    """A connection that ended its exchange whole is reused by the next request (no new connection); one left
    idle for idle_timeout is closed, not a moment before."""
    pool, clock = pool_for(idle_timeout=4)
    protocol, transport = _answered(pool, clock)
    assert pool.idle == 1
    second = request(pool, b"GET", b"/2", Headers({b"Host": [b"h"]}), None, connect_timeout=5)
    assert len(clock.tcpClients) == 1
    assert transport.value().startswith(b"GET /2 HTTP/1.1\r\n")
    protocol.dataReceived(OK)
    _sync.successResultOf(second)
    clock.advance(4 - EPS)
    assert not transport.disconnecting
    clock.advance(EPS)
    assert transport.disconnecting
    assert pool.idle == 0


def test_at_most_max_idle_connections_are_kept() -> None:
    """Past max_idle_connections, a connection whose exchange ended is closed rather than kept."""
    pool, clock = pool_for(max_idle_connections=1)
    first = [request(pool, b"GET", b"/", Headers({b"Host": [b"h"]}), None, connect_timeout=5) for _ in range(2)]
    connections = [_connected_at(pool, clock, index) for index in range(2)]
    for protocol, _transport in connections:
        protocol.dataReceived(OK)
    for response in first:
        _sync.successResultOf(response)
    assert pool.idle == 1
    assert [transport.disconnecting for _protocol, transport in connections] == [False, True]


def _connected_at(pool: UpstreamPool, clock: MemoryReactorClock, index: int) -> tuple[Any, StringTransport]:
    host, port, factory, _timeout, _bind = clock.tcpClients[index]
    transport = StringTransport()
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    protocol.makeConnection(transport)
    return protocol, transport


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"DELETE", b"OPTIONS"])
def test_a_reused_connection_found_closed_is_retried_once_on_a_new_one(method: bytes) -> None:
    """An idempotent request without a body, sent on a reused connection that is lost before any byte of an
    answer (the upstream closed it idle just then), goes out once more on a new connection."""
    pool, clock = pool_for()
    protocol, _transport = _answered(pool, clock)
    response = request(pool, method, b"/again", Headers({b"Host": [b"h"]}), None, connect_timeout=5)
    protocol.connectionLost(Failure(ConnectionDone()))
    _sync.assertNoResult(response)
    assert len(clock.tcpClients) == 2
    retried, transport = _connected(pool, clock)
    assert transport.value().startswith(method + b" /again HTTP/1.1\r\n")
    retried.dataReceived(OK if method != b"HEAD" else b"HTTP/1.1 200 OK\r\n\r\n")
    assert _sync.successResultOf(response).code == 200


def test_a_request_with_a_body_or_a_post_is_never_retried() -> None:
    """A POST, or any request with a body, may have been acted on: its failure is reported, not repeated."""
    pool, clock = pool_for()
    protocol, _transport = _answered(pool, clock)
    response = request(pool, b"POST", b"/", Headers({b"Host": [b"h"]}), None, connect_timeout=5)
    protocol.connectionLost(Failure(ConnectionDone()))
    _sync.failureResultOf(response, ResponseNeverReceived)
    assert len(clock.tcpClients) == 1


def test_a_new_connection_is_never_retried() -> None:
    """Only a reused connection can have been closed under the request: on a new one the failure is the answer."""
    pool, clock = pool_for()
    response = request(pool, b"GET", b"/", Headers({b"Host": [b"h"]}), None, connect_timeout=5)
    protocol, _transport = _connected(pool, clock)
    protocol.connectionLost(Failure(ConnectionDone()))
    _sync.failureResultOf(response, ResponseNeverReceived)
    assert len(clock.tcpClients) == 1
