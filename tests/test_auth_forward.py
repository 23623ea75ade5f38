"""Tests for gateway.auth.forward: what the auth service is asked, how each of its answers is taken, and that a
check which times out or is cancelled leaves no connection or timer behind.

Most run over loopback against `tests.support.forward_service.AuthService` (real Agent, real pool, real
sockets); the timer's edges run in memory on a `MemoryReactorClock`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from gateway.auth.forward import ForwardAuthenticator
from gateway.auth.identity import AuthRequest, Identity
from gateway.auth.settings.model import ForwardMethod
from gateway.errors import AuthServiceDenied, AuthTimeout, AuthUnavailable
from tests.support.forward_service import CHALLENGES, DENIAL_BODY, AuthService
from tests.support.logs import captured, in_namespace

_sync = SynchronousTestCase()
WAIT = 10
"""The most any test waits for anything (a bound for a hang, never a measure of speed)."""
EPS = 0.25
"""A step of time binary floating point represents exactly."""
SECRET = b"Bearer secret-token-value"

Make = Callable[..., ForwardAuthenticator]


def method(url: str, **settings: Any) -> ForwardMethod:
    defaults: dict[str, Any] = {
        "consumer_header": b"x-auth-user",
        "scopes_header": b"x-auth-scopes",
        "copy_headers": (b"x-auth-tenant",),
        "max_body": 1024,
    }
    return ForwardMethod(name="fwd", url=url, **{**defaults, **settings})


def client_request(*extra: tuple[bytes, bytes], target: bytes = b"/reports/1?x=1") -> AuthRequest:
    """A client's POST with a credential, a cookie and headers that are none of the auth service's business."""
    headers = Headers()
    for name, value in [
        (b"Host", b"api.example"),
        (b"Authorization", SECRET),
        (b"Cookie", b"session=abc"),
        (b"User-Agent", b"curl/8"),
        (b"Content-Type", b"application/json"),
        (b"Content-Length", b"5"),
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"X-Private", b"no"),
        *extra,
    ]:
        headers.addRawHeader(name, value)
    return AuthRequest(b"POST", target, headers, "10.0.0.7", "rid-1")


@pytest_twisted.async_yield_fixture()
async def service() -> AsyncIterator[AuthService]:
    started = AuthService().start()
    yield started
    await started.stop()


@pytest.fixture
def make(service: AuthService) -> Iterator[Make]:
    """Authenticators asking `service` on a path; each is closed after the test."""
    made: list[ForwardAuthenticator] = []

    def build(path: str = "/allow", **settings: Any) -> ForwardAuthenticator:
        auth = ForwardAuthenticator(method(service.url(path), **settings), reactor=reactor, realm="gateway")
        made.append(auth)
        return auth

    yield build
    for auth in made:
        pytest_twisted.blockon(auth.close())


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    """Events logged by gateway.auth.forward during the test."""
    with captured(in_namespace("gateway.auth.forward")) as seen:
        yield seen


def check(auth: ForwardAuthenticator, request: AuthRequest | None = None) -> Deferred[Identity]:
    request = request or client_request()
    credential = auth.credential(request.headers)
    assert credential is not None
    return auth.verify(credential, request).addTimeout(WAIT, reactor)


async def refusal(auth: ForwardAuthenticator, request: AuthRequest | None = None) -> Exception:
    """The error a check ends with (the test fails if it admits)."""
    try:
        identity = await check(auth, request)
    except Exception as error:
        return error
    raise AssertionError(f"admitted as {identity!r}")


# --- the credential and the method's surface -------------------------------------------------------------


def test_credential_is_the_chosen_headers_the_request_carries(make: Make) -> None:
    """credential() returns only the request_headers present, with all their values; None without any."""
    auth = make()
    headers = client_request((b"Cookie", b"theme=dark")).headers
    assert auth.credential(headers) == [(b"authorization", [SECRET]), (b"cookie", [b"session=abc", b"theme=dark"])]
    assert auth.credential(Headers({b"Host": [b"api.example"], b"X-Private": [b"no"]})) is None
    assert make(request_headers=(b"x-token",)).credential(headers) is None


def test_framing_and_forwarding_headers_are_never_chosen(make: Make) -> None:
    """request_headers naming Host, Content-Length, a hop-by-hop or an X-Forwarded-* header never select it
    (a request carrying only those has no credential for the method)."""
    auth = make(request_headers=(b"host", b"content-length", b"connection", b"x-forwarded-for", b"x-token"))
    assert auth.credential(client_request().headers) is None
    assert auth.credential(client_request((b"X-Token", b"t")).headers) == [(b"x-token", [b"t"])]


def test_challenge_upstream_headers_and_close(make: Make) -> None:
    """No challenge of its own; only the copied headers are set upstream; nothing is cheap to verify (every check
    is a call: its budgets are asked before it); close() gives a Deferred."""
    auth = make(copy_headers=(b"X-Auth-Tenant", b"x-auth-role"))
    assert auth.challenge(None) is None
    assert not auth.verifies_cheaply([(b"authorization", [b"Bearer t"])])
    assert auth.upstream_headers() == frozenset({b"x-auth-tenant", b"x-auth-role"})
    _sync.successResultOf(auth.close())


# --- 2xx: admitted ------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_2xx_admits_with_the_identity_the_answer_names(make: Make) -> None:
    """Consumer, scopes and the copied headers come from the answer; nothing else of it is copied."""
    identity = await check(make())
    assert identity == Identity(
        consumer="alice",
        scopes=frozenset({"read", "write"}),
        method="fwd",
        headers=((b"x-auth-tenant", b"acme"), (b"x-auth-tenant", b"beta")),
        credential_headers=(b"authorization",),
    )


@pytest_twisted.ensureDeferred
async def test_without_identity_headers_configured_a_2xx_admits_nobody_in_particular(make: Make) -> None:
    """No consumer_header or scopes_header: the identity is the method's, with no consumer and no scopes."""
    identity = await check(make(consumer_header=None, scopes_header=None, copy_headers=()))
    assert identity == Identity(consumer=None, scopes=frozenset(), method="fwd", credential_headers=(b"authorization",))


@pytest_twisted.ensureDeferred
async def test_the_auth_service_gets_the_request_head_and_the_chosen_headers_only(
    make: Make, service: AuthService
) -> None:
    """A GET without a body, with X-Forwarded-Proto/Method/Uri/For/Host and X-Request-ID from the request, the
    chosen headers, and its own Host; no other client header (a client's X-Forwarded-For is replaced)."""
    await check(make("/allow?from=gateway"))
    [asked] = service.asked
    assert (asked.method, asked.uri, asked.body) == (b"GET", b"/allow?from=gateway", b"")
    assert asked.names == {
        b"host",
        b"authorization",
        b"cookie",
        b"x-forwarded-proto",
        b"x-forwarded-method",
        b"x-forwarded-uri",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-request-id",
    }
    assert asked.header(b"x-forwarded-proto") == [b"http"]
    assert asked.header(b"x-forwarded-method") == [b"POST"]
    assert asked.header(b"x-forwarded-uri") == [b"/reports/1?x=1"]
    assert asked.header(b"x-forwarded-for") == [b"10.0.0.7"]
    assert asked.header(b"x-forwarded-host") == [b"api.example"]
    assert asked.header(b"x-request-id") == [b"rid-1"]
    assert asked.header(b"authorization") == [SECRET]
    assert asked.header(b"cookie") == [b"session=abc"]
    assert asked.header(b"host") == [service.url("").removeprefix("http://").encode()]


@pytest_twisted.ensureDeferred
async def test_without_a_host_no_x_forwarded_host_is_sent(make: Make, service: AuthService) -> None:
    """X-Forwarded-Host is the client's Host only when it sent one."""
    request = AuthRequest(b"GET", b"/", Headers({b"Authorization": [SECRET]}), "10.0.0.7", "rid-2")
    await check(make(), request)
    assert b"x-forwarded-host" not in service.asked[0].names


@pytest_twisted.ensureDeferred
async def test_a_request_over_tls_is_asked_about_as_https(make: Make, service: AuthService) -> None:
    """X-Forwarded-Proto says https for a request that came over TLS."""
    request = AuthRequest(b"GET", b"/", Headers({b"Authorization": [SECRET]}), "10.0.0.7", "rid-3", secure=True)
    await check(make(), request)
    assert service.asked[0].header(b"x-forwarded-proto") == [b"https"]


@pytest_twisted.ensureDeferred
async def test_two_checks_in_a_row_use_one_kept_alive_connection(make: Make, service: AuthService) -> None:
    """The first answer's body is read to its end, so its connection goes back to the pool for the second."""
    auth = make()
    await check(auth)
    await check(auth)
    first, second = service.asked
    assert first.port == second.port
    assert not first.closed.called


@pytest_twisted.ensureDeferred
async def test_a_check_running_when_the_method_is_closed_ends_and_closes_its_connection(
    make: Make, service: AuthService
) -> None:
    """close() (a reload or stop) lets a running check give its verdict, then closes its connection rather
    than leaving it in the pool."""
    auth = make("/hold")
    pending = check(auth)
    asked = await service.question(1).addTimeout(WAIT, reactor)
    closing = auth.close()
    service.release()
    identity = await pending
    assert identity.consumer == "alice"
    await asked.closed.addTimeout(WAIT, reactor)
    await closing


@pytest_twisted.ensureDeferred
async def test_a_2xx_body_over_max_body_is_dropped_and_still_admits(make: Make) -> None:
    """A 2xx's body says nothing the gateway uses: past max_body it is dropped with its connection."""
    identity = await check(make("/big/200", consumer_header=None, scopes_header=None))
    assert identity.method == "fwd"


@pytest.mark.parametrize("kind", ["space", "long", "two", "scope", "nul"])
@pytest_twisted.ensureDeferred
async def test_an_invalid_identity_fails_closed(make: Make, kind: str) -> None:
    """A consumer that is not 1 to 256 visible characters (or named twice), a malformed scope or a copied
    header value with a control character: a broken auth service, 503, never a pass."""
    error = await refusal(make(f"/bad/{kind}"))
    assert isinstance(error, AuthUnavailable)
    assert (error.status, error.reason) == (503, "auth_service_bad_identity")


# --- 401 and 403: the auth service's own refusal --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_401_is_passed_on_with_its_body_content_type_and_challenges(make: Make) -> None:
    """AuthServiceDenied carries the status, Content-Type, body and every WWW-Authenticate of the answer."""
    error = await refusal(make("/deny/401"))
    assert isinstance(error, AuthServiceDenied)
    assert (error.status, error.content_type, error.body) == (401, b"application/json", DENIAL_BODY)
    assert error.headers == [(b"WWW-Authenticate", c) for c in CHALLENGES]
    assert error.render("rid-1") == (401, b"application/json", DENIAL_BODY)


@pytest_twisted.ensureDeferred
async def test_a_403_is_passed_on_with_its_body(make: Make) -> None:
    error = await refusal(make("/deny/403"))
    assert isinstance(error, AuthServiceDenied)
    assert (error.status, error.content_type, error.body, error.headers) == (403, b"text/plain", b"not this one", [])


@pytest_twisted.ensureDeferred
async def test_a_refusal_over_max_body_is_503(make: Make) -> None:
    """A 401 body longer than max_body cannot be passed on whole: the auth service answered badly."""
    error = await refusal(make("/big/401"))
    assert isinstance(error, AuthUnavailable)
    assert error.reason == "auth_service_bad_answer"


# --- anything else: fail closed --------------------------------------------------------------------------


@pytest.mark.parametrize("code", [500, 502, 404, 400, 302, 307])
@pytest_twisted.ensureDeferred
async def test_any_other_status_is_503_and_a_redirect_is_not_followed(
    make: Make, service: AuthService, code: int
) -> None:
    error = await refusal(make(f"/status/{code}"))
    assert isinstance(error, AuthUnavailable)
    assert (error.status, error.reason, error.detail) == (
        503,
        "auth_service_error",
        f"the auth service answered {code}",
    )
    assert [a.uri for a in service.asked] == [f"/status/{code}".encode()]


@pytest_twisted.ensureDeferred
async def test_a_connection_closed_before_an_answer_is_503(make: Make) -> None:
    error = await refusal(make("/close"))
    assert isinstance(error, AuthUnavailable)
    assert error.reason == "auth_service_unreachable"


@pytest_twisted.ensureDeferred
async def test_an_auth_service_that_is_down_is_503() -> None:
    """Nothing listens on the port (it was just closed): connection refused."""
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    auth = ForwardAuthenticator(method(f"http://127.0.0.1:{number}/"), reactor=reactor, realm="gateway")
    try:
        error = await refusal(auth)
    finally:
        await auth.close()
    assert isinstance(error, AuthUnavailable)
    assert (error.status, error.reason) == (503, "auth_service_unreachable")


@pytest_twisted.ensureDeferred
async def test_failures_are_logged_by_reason_and_request_id_without_values(
    make: Make, service: AuthService, logged: list[LogEvent]
) -> None:
    """The log names the auth service, the reason and the request id; never a credential or header value."""
    await refusal(make("/status/500"))
    await refusal(make("/bad/space"))
    assert [(e["reason"], e["request_id"], e["url"]) for e in logged] == [
        ("auth_service_error", "rid-1", service.url("/status/500")),
        ("auth_service_bad_identity", "rid-1", service.url("/bad/space")),
    ]
    assert logged[0]["status"] == 500
    text = " ".join(formatEvent(e) + repr(e) for e in logged)
    assert "secret-token" not in text and "alice smith" not in text


# --- the timeout and cancellation ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_no_answer_within_the_timeout_is_504_and_the_connection_is_closed(
    make: Make, service: AuthService
) -> None:
    error = await refusal(make("/stall", timeout=0.2))
    assert isinstance(error, AuthTimeout)
    assert (error.status, error.reason, error.detail) == (
        504,
        "auth_service_timeout",
        "the auth service did not answer within 0.2 s",
    )
    await service.asked[0].lost.addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_a_body_that_stalls_runs_into_the_timeout_too(make: Make, service: AuthService) -> None:
    """The timeout covers the whole exchange: a head that came in time does not stop it."""
    error = await refusal(make("/stall-body", timeout=0.2))
    assert isinstance(error, AuthTimeout)
    await service.asked[0].lost.addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_cancelling_a_pending_check_closes_its_connection(make: Make, service: AuthService) -> None:
    """The client left: the Deferred fails with CancelledError at once and the auth service sees the
    connection close (the timer is gone too: the leak check after each test would see it)."""
    request = client_request()
    auth = make("/stall")
    pending = auth.verify(auth.credential(request.headers), request)
    asked = await service.question(1).addTimeout(WAIT, reactor)
    pending.cancel()
    with pytest.raises(CancelledError):
        await pending
    await asked.lost.addTimeout(WAIT, reactor)


# --- the timer's edges, in memory ------------------------------------------------------------------------


def memory_check(clock: MemoryReactorClock, timeout: float = 2.0) -> Deferred[Identity]:
    auth = ForwardAuthenticator(method("http://127.0.0.1:9/check", timeout=timeout), reactor=clock, realm="gw")
    request = client_request()
    return auth.verify(auth.credential(request.headers), request)


def test_the_timeout_fires_at_its_time_while_connecting() -> None:
    """Nothing just before the timeout; at it, 504, the connection attempt stopped and no timer left."""
    clock = MemoryReactorClock()
    pending = memory_check(clock)
    clock.advance(2.0 - EPS)
    _sync.assertNoResult(pending)
    clock.advance(EPS)
    error = _sync.failureResultOf(pending, AuthTimeout).value
    assert error.reason == "auth_service_timeout"
    assert [c.stoppedConnecting for c in clock.connectors] == [True]
    assert clock.getDelayedCalls() == []


def test_the_timeout_covers_the_body_and_closes_the_connection() -> None:
    """A head in time, then a body that stalls: at the timeout, 504 and the connection stopped."""
    clock = MemoryReactorClock()
    pending = memory_check(clock)
    [(_, _, factory, _, _)] = clock.tcpClients
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert transport.value().startswith(b"GET /check HTTP/1.1\r\n")
    clock.advance(1.0)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    clock.advance(1.0 - EPS)
    _sync.assertNoResult(pending)
    assert transport.producerState == "producing"
    clock.advance(EPS)
    _sync.failureResultOf(pending, AuthTimeout)
    # Stopped through Agent's proxy of the socket, which has no abort: a real TCP transport closes on it.
    assert transport.producerState == "stopped"
    assert clock.getDelayedCalls() == []


def test_cancelling_while_connecting_stops_the_attempt_and_the_timer() -> None:
    clock = MemoryReactorClock()
    pending = memory_check(clock)
    pending.cancel()
    _sync.failureResultOf(pending, CancelledError)
    assert [c.stoppedConnecting for c in clock.connectors] == [True]
    assert clock.getDelayedCalls() == []


def test_cancelling_while_waiting_for_the_head_aborts_the_connection() -> None:
    clock = MemoryReactorClock()
    pending = memory_check(clock)
    [(_, _, factory, _, _)] = clock.tcpClients
    transport = StringTransport()
    factory.buildProtocol(None).makeConnection(transport)
    pending.cancel()
    _sync.failureResultOf(pending, CancelledError)
    assert transport.disconnecting
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_checks_in_flight_are_capped_at_max_connections(make: Make, service: AuthService) -> None:
    """At most `max_connections` checks are under way at once; one more is 503 at once (fail closed), and a check
    that ends (answered or cancelled) frees its place."""
    auth = make("/hold", max_connections=2)
    first, second = check(auth), check(auth)
    with pytest.raises(AuthUnavailable) as info:
        check(auth)
    assert info.value.reason == "auth_service_saturated"
    first.cancel()
    with pytest.raises(CancelledError):
        await first
    third = check(auth)
    assert auth.in_flight == 2
    for _ in range(1000):  # both held at the service (the cancelled first may never have got there)
        if len(service.held) == 2:
            break
        await task.deferLater(reactor, 0.005, lambda: None)
    service.release()
    assert [(await d).consumer for d in (second, third)] == ["alice", "alice"]
    assert auth.in_flight == 0
