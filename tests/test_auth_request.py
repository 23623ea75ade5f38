"""Tests for admission inside the request lifecycle (gateway.proxy.exchange with gateway.auth.gatekeeper), in memory.

A verdict that takes time is played by `HeldAuthenticator`, a real authenticator whose verifications wait for the
test to settle them; everything else is the real gateway on a `MemoryReactorClock` (tests.support.memory), so
producer states (a paused client socket), what was written (no `100 Continue`), and every ending can be pinned
exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.logger import LogEvent
from twisted.web.http_headers import Headers

from gateway.auth.apikeys import hash_key
from gateway.auth.credentials import challenge
from gateway.auth.gatekeeper import Gatekeeper
from gateway.auth.identity import AuthFailure, AuthRequest, Identity
from gateway.auth.limits import MemoryLimitStore
from gateway.proxy.phases import Phase
from tests.support.clients import Parsed, parse_response
from tests.support.memory import Client, RecordingFactory, Upstream, disconnect
from tests.support.running import gateway_config
from tests.test_request import CONTINUE, EPS, OK_5, Gateway, closed, post, problem_of

UPSTREAM = "http://127.0.0.1:8081"
KEY = "gwk_the-key-of-reports-app"
KEY_HASH = hash_key(KEY)


class HeldAuthenticator:
    """Admits a request carrying `X-Held: <consumer>` once the test calls `allow` (or refuses it with `deny`);
    until then its verification is pending, as a JWKS fetch, a bcrypt check or forward auth would be."""

    name = "held"

    def __init__(self) -> None:
        self.pending: list[Deferred[Identity]] = []
        self.cancelled = 0

    def credential(self, headers: Headers) -> object | None:
        values = headers.getRawHeaders(b"x-held")
        return values[0].decode("ascii") if values else None

    def verify(self, credential: object, request: AuthRequest) -> Deferred[Identity]:
        def cancel(d: Deferred[Identity]) -> None:
            self.cancelled += 1
            self.pending.remove(d)

        d: Deferred[Identity] = Deferred(cancel)
        self.pending.append(d)
        return d

    def allow(self, consumer: str = "held-app", scopes: frozenset[str] = frozenset()) -> None:
        self.pending.pop(0).callback(
            Identity(consumer=consumer, scopes=scopes, method=self.name, credential_headers=(b"x-held",), declared=True)
        )

    def deny(self) -> None:
        self.pending.pop(0).errback(AuthFailure("held_refused", "the held credential is refused"))

    def challenge(self, failure: AuthFailure | None) -> bytes:
        return challenge("Held", realm="test")

    def upstream_headers(self) -> frozenset[bytes]:
        return frozenset({b"x-held-claim"})

    def close(self) -> None:
        return None


class AdmissionGateway(Gateway):
    """The in-memory gateway with the held method added to its gatekeeper."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data)
        self.held = HeldAuthenticator()
        self.store = MemoryLimitStore(self.reactor)
        admission = self.config.admission
        authenticators = {
            name: auth for name, auth in Gatekeeper(admission, reactor=self.reactor)._methods.by_name.items()
        }
        authenticators["held"] = self.held  # type: ignore[assignment]
        gatekeeper = Gatekeeper(admission, reactor=self.reactor, store=self.store, authenticators=authenticators)
        self.gateway = dataclasses.replace(self.gateway, gatekeeper=gatekeeper)
        self.factory = RecordingFactory(self.gateway, clock=self.reactor)


def admission_config(**sections: Any) -> dict[str, Any]:
    """A config whose one route accepts API keys (consumer reports-app) and the held method."""
    sections.setdefault("route", {})
    sections["route"] = {"auth": ["keys", "held"], **sections["route"]}
    data = gateway_config(UPSTREAM, **sections)
    data.setdefault("auth", {})["keys"] = {"type": "api_key"}
    data["auth"]["held"] = {"type": "basic"}  # declared so the config names it; played by HeldAuthenticator
    data.setdefault("consumers", {}).setdefault("reports-app", {"api_keys": [KEY_HASH], "scopes": ["reports:read"]})
    data["consumers"].setdefault("held-app", {})
    return data


@pytest.fixture
def gateway(failures: list[LogEvent]) -> Iterator[Callable[..., AdmissionGateway]]:
    """An in-memory gateway with admission; afterwards nothing may be left behind."""
    made: list[AdmissionGateway] = []

    def make(**sections: Any) -> AdmissionGateway:
        gw = AdmissionGateway(admission_config(**sections))
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.settle()
        assert gw.reactor.getDelayedCalls() == [], "timers left behind"
        assert [u for u in gw.upstreams if not closed(u)] == [], "upstream connections left open"
    assert [e.get("log_format") for e in failures] == [], "unexpected failures were logged"


def held_post(length: int, *extra: bytes) -> bytes:
    return post(length, b"X-Held: held-app", *extra)


def response(client: Client) -> Parsed:
    return parse_response(client.received())


def headers_at(upstream: Upstream) -> dict[bytes, list[bytes]]:
    head = upstream.received().partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]
    found: dict[bytes, list[bytes]] = {}
    for line in head:
        name, _, value = line.partition(b":")
        found.setdefault(name.strip().lower(), []).append(value.strip())
    return found


# === a verdict that takes time ===============================================================================


def test_pending_verdict_holds_the_body_unread_and_the_upstream_uncontacted(
    gateway: Callable[..., AdmissionGateway],
) -> None:
    """While a verdict is pending, the body bytes that came with the head are held, the client socket is paused
    at once, no `100 Continue` is sent and no upstream connection is asked for."""
    gw = gateway()
    client = gw.client()
    client.send(held_post(10) + b"abcd")
    assert client.request.phase is Phase.ADMITTING
    assert client.transport.producerState == "paused"
    assert client.received() == b""
    assert gw.pending_connections() == 0


def test_allowed_verdict_forwards_the_held_bytes_and_resumes_the_client(
    gateway: Callable[..., AdmissionGateway],
) -> None:
    """Once admitted, the held bytes go upstream first, the client socket reads again, and the rest follows."""
    gw = gateway()
    client = gw.client()
    client.send(held_post(10) + b"abcd")
    request = client.request
    gw.held.allow()
    assert client.transport.producerState == "producing"
    up = gw.upstream()
    client.send(b"efghij")
    assert up.received().endswith(b"\r\n\r\nabcdefghij")
    up.respond(OK_5)
    assert response(client).status == 200
    assert request.phase is Phase.DONE


def test_expect_continue_waits_for_the_verdict(gateway: Callable[..., AdmissionGateway]) -> None:
    """With `Expect: 100-continue`, no `100 Continue` goes out while the verdict is pending (and the socket keeps
    reading, so a client that leaves is noticed); it goes out once the request is admitted."""
    gw = gateway()
    client = gw.client()
    client.send(held_post(5, b"Expect: 100-continue"))
    assert client.received() == b""
    assert client.transport.producerState == "producing"
    gw.held.allow()
    assert client.received() == CONTINUE
    up = gw.upstream()
    assert b"expect" not in up.received().lower()
    client.send(b"hello")
    up.respond(OK_5)
    assert response(client).status == 200


def test_expect_continue_refused_gets_the_final_status_and_no_continue(
    gateway: Callable[..., AdmissionGateway],
) -> None:
    """A refused upload that asked for `100 Continue` gets 401 (with the route's challenges) and never a 100;
    its body is never read into anything, no upstream is contacted, and the connection closes after the answer."""
    gw = gateway()
    client = gw.client()
    client.send(held_post(1 << 30, b"Expect: 100-continue"))
    gw.held.deny()
    received = client.received()
    assert b"100 Continue" not in received
    parsed = response(client)
    assert parsed.status == 401
    assert parsed.header(b"Connection") == b"close"
    assert b'Held realm="test"' in parsed.headers_named(b"WWW-Authenticate")
    assert problem_of(parsed)["request_id"] == parsed.header(b"X-Request-ID").decode()  # type: ignore[union-attr]
    assert client.transport.write_closed  # lingering close: FIN after the answer
    assert gw.pending_connections() == 0


def test_refused_after_body_bytes_arrived_resumes_the_socket_to_linger(
    gateway: Callable[..., AdmissionGateway],
) -> None:
    """A refusal after the socket was paused for the verdict resumes it, so the rest of the body is read and dropped
    (bounded by the lingering deadline) instead of being left in the kernel to reset the connection."""
    gw = gateway(server={"lingering_timeout": 5})
    client = gw.client()
    client.send(held_post(100) + b"x" * 10)
    assert client.transport.producerState == "paused"
    gw.held.deny()
    assert response(client).status == 401
    assert client.transport.producerState == "producing"
    client.send(b"y" * 90)
    assert client.transport.disconnecting and not client.transport.aborted
    assert gw.pending_connections() == 0


def test_client_leaving_cancels_the_pending_check(gateway: Callable[..., AdmissionGateway]) -> None:
    """A client that hangs up while its verdict is pending cancels the check; nothing goes upstream."""
    gw = gateway()
    client = gw.client()
    client.send(b"GET /reports HTTP/1.1\r\nHost: example.test\r\nX-Held: held-app\r\n\r\n")
    request = client.request
    disconnect(client.transport, client.channel, ConnectionLost("left"))
    assert gw.held.cancelled == 1
    assert request.phase is Phase.CLIENT_GONE
    assert gw.pending_connections() == 0


def test_client_leaving_before_the_verdict_takes_no_slot(gateway: Callable[..., AdmissionGateway]) -> None:
    """A consumer whose request was abandoned while its verdict was pending has its whole concurrency cap for the
    next request: the abandoned check took no slot, and the next request of the same consumer is admitted."""
    gw = gateway(admission={"max_concurrent": 1})
    client = gw.client()
    client.send(b"GET /reports HTTP/1.1\r\nHost: example.test\r\nX-Held: held-app\r\n\r\n")
    disconnect(client.transport, client.channel, ConnectionLost("left"))
    assert gw.store.held("in-flight:held-app") == 0
    again = gw.client()
    again.send(b"GET /reports HTTP/1.1\r\nHost: example.test\r\nX-Held: held-app\r\n\r\n")
    gw.held.allow()
    assert gw.store.held("in-flight:held-app") == 1
    up = gw.upstream()
    up.respond(OK_5)
    assert response(again).status == 200
    assert gw.store.held("in-flight:held-app") == 0


def test_get_admitted_later_goes_upstream(gateway: Callable[..., AdmissionGateway]) -> None:
    """A request without a body whose verdict comes later (after the channel saw its end) is forwarded then."""
    gw = gateway()
    client = gw.client()
    client.send(b"GET /reports HTTP/1.1\r\nHost: example.test\r\nX-Held: held-app\r\n\r\n")
    assert gw.pending_connections() == 0
    gw.held.allow()
    up = gw.upstream()
    assert up.received().startswith(b"GET /reports HTTP/1.1\r\n")
    up.respond(OK_5)
    assert response(client).status == 200


def test_a_verdict_that_fails_unexpectedly_is_503(
    gateway: Callable[..., AdmissionGateway], failures: list[LogEvent]
) -> None:
    """A check that fails with an unexpected error is logged and answered 503 (fail closed), never admitted."""
    gw = gateway()
    client = gw.client()
    client.send(b"GET /reports HTTP/1.1\r\nHost: example.test\r\nX-Held: held-app\r\n\r\n")
    gw.held.pending.pop(0).errback(RuntimeError("bug"))
    assert response(client).status == 503
    assert problem_of(response(client))["type"] == "urn:gateway:problem:auth-unavailable"
    assert gw.pending_connections() == 0
    assert len(failures) == 1
    failures.clear()


# === identity upstream ========================================================================================


def test_identity_headers_replace_spoofed_ones_and_the_credential_is_removed(
    gateway: Callable[..., AdmissionGateway],
) -> None:
    """The upstream gets the consumer, its scopes and the method in the identity headers; the client's own
    copies of those (and of every header a method sets) are removed first, and so is the API key."""
    gw = gateway()
    client = gw.client()
    client.send(
        b"GET /reports HTTP/1.1\r\nHost: example.test\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\n"
        b"X-Consumer-ID: admin\r\nx-consumer-scopes: everything\r\nX-Auth-Method: none\r\nX-Held-Claim: forged\r\n\r\n"
    )
    up = gw.upstream()
    seen = headers_at(up)
    assert seen[b"x-consumer-id"] == [b"reports-app"]
    assert seen[b"x-consumer-scopes"] == [b"reports:read"]
    assert seen[b"x-auth-method"] == [b"keys"]
    assert b"x-held-claim" not in seen
    assert b"authorization" not in seen
    assert KEY.encode() not in up.received()
    up.respond(OK_5)


def test_anonymous_route_removes_spoofed_identity_headers_too(gateway: Callable[..., AdmissionGateway]) -> None:
    """On an anonymous route a client-sent identity header is removed as well: no route trusts one."""
    gw = gateway(route={"auth": "anonymous"})
    client = gw.client()
    client.send(b"GET /reports HTTP/1.1\r\nHost: example.test\r\nX-Consumer-ID: admin\r\n\r\n")
    up = gw.upstream()
    seen = headers_at(up)
    assert b"x-consumer-id" not in seen
    assert seen[b"x-auth-method"] == [b"anonymous"]
    up.respond(OK_5)


def test_forward_credentials_keeps_the_credential_header(gateway: Callable[..., AdmissionGateway]) -> None:
    """A route with `forward_credentials = true` sends the credential header upstream as the client sent it."""
    gw = gateway(route={"forward_credentials": True})
    client = gw.client()
    client.send(b"GET /reports HTTP/1.1\r\nHost: example.test\r\nX-API-Key: " + KEY.encode() + b"\r\n\r\n")
    up = gw.upstream()
    assert headers_at(up)[b"x-api-key"] == [KEY.encode()]
    up.respond(OK_5)


# === concurrency slots: given back by every ending ===========================================================

KEYED_GET = b"GET /reports HTTP/1.1\r\nHost: example.test\r\nX-API-Key: " + KEY.encode() + b"\r\n\r\n"
SLOT = "in-flight:reports-app"


def second_is_refused(gw: AdmissionGateway) -> None:
    other = gw.client()
    other.send(KEYED_GET)
    parsed = response(other)
    assert parsed.status == 429
    assert parsed.header(b"Retry-After") == b"1"
    assert problem_of(parsed)["type"] == "urn:gateway:problem:too-many-requests"


def test_slot_is_held_while_streaming_and_given_back_at_completion(gateway: Callable[..., AdmissionGateway]) -> None:
    """A consumer at its concurrency cap gets 429 for another request while its stream runs; the slot comes back
    when the response completes."""
    gw = gateway(consumers={"reports-app": {"api_keys": [KEY_HASH], "max_concurrent": 1}})
    client = gw.client()
    client.send(KEYED_GET)
    request = client.request
    up = gw.upstream()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
    assert gw.store.held(SLOT) == 1
    second_is_refused(gw)
    up.respond(b"llo")
    assert request.phase is Phase.DONE
    assert gw.store.held(SLOT) == 0


def test_slot_is_given_back_when_the_client_aborts(gateway: Callable[..., AdmissionGateway]) -> None:
    """A client that leaves mid-stream gives its slot back."""
    gw = gateway(consumers={"reports-app": {"api_keys": [KEY_HASH], "max_concurrent": 1}})
    client = gw.client()
    client.send(KEYED_GET)
    up = gw.upstream()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
    disconnect(client.transport, client.channel, ConnectionLost("left"))
    assert gw.store.held(SLOT) == 0


def test_slot_is_given_back_when_the_upstream_fails(gateway: Callable[..., AdmissionGateway]) -> None:
    """An upstream that cannot be reached (502) and one that breaks mid-body (client cut) both give the slot back."""
    gw = gateway(consumers={"reports-app": {"api_keys": [KEY_HASH], "max_concurrent": 1}})
    client = gw.client()
    client.send(KEYED_GET)
    gw.fail_connection(ConnectionRefusedError())
    assert response(client).status == 502
    assert gw.store.held(SLOT) == 0
    client2 = gw.client()
    client2.send(KEYED_GET)
    up = gw.upstream()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
    up.close(ConnectionLost("reset"))
    assert client2.transport.aborted
    assert gw.store.held(SLOT) == 0


def test_slot_is_given_back_on_a_timeout(gateway: Callable[..., AdmissionGateway]) -> None:
    """A request that times out waiting for the response head (504) gives its slot back."""
    gw = gateway(
        consumers={"reports-app": {"api_keys": [KEY_HASH], "max_concurrent": 1}},
        timeouts={"response_headers": 2},
    )
    client = gw.client()
    client.send(KEYED_GET)
    gw.upstream()
    gw.advance(2 - EPS)
    assert gw.store.held(SLOT) == 1
    gw.advance(EPS)
    assert response(client).status == 504
    assert gw.store.held(SLOT) == 0


# === lingering bounds ==========================================================================================


def test_refused_upload_that_keeps_sending_is_cut_past_the_discard_bound(
    gateway: Callable[..., AdmissionGateway],
) -> None:
    """A refused upload whose client keeps sending is read and dropped up to server.lingering_max_bytes, then cut
    (its answer went out first); below the bound it is not."""
    gw = gateway(server={"lingering_max_bytes": 1000, "lingering_timeout": 60})
    client = gw.client()
    client.send(post(1 << 30))  # no credential: 401 at once
    request = client.request
    assert response(client).status == 401
    client.send(b"x" * 1000)
    assert not client.transport.disconnecting
    client.send(b"x")
    assert client.transport.aborted
    assert request.ending == "lingering_limit"


def test_missing_credentials_get_every_challenge_of_the_route(gateway: Callable[..., AdmissionGateway]) -> None:
    """A request without credentials gets 401 with a WWW-Authenticate challenge per method of its route."""
    gw = gateway()
    client = gw.client()
    client.send(b"GET /reports HTTP/1.1\r\nHost: example.test\r\n\r\n")
    parsed = response(client)
    assert parsed.status == 401
    assert parsed.headers_named(b"WWW-Authenticate") == [b'Bearer realm="gateway"', b'Held realm="test"']
    assert problem_of(parsed)["detail"] == "this route requires credentials"
    assert client.channel.persistent  # a refusal of a request without a body keeps the connection


def test_a_socket_resumed_by_the_channel_is_paused_again_by_the_next_held_chunk(
    gateway: Callable[..., AdmissionGateway],
) -> None:
    """HTTPChannel resumes the client socket when an earlier answer on the connection drains; the next body chunk
    that arrives while the verdict is pending pauses it again, so at most one read per drain is held."""
    gw = gateway()
    client = gw.client()
    client.send(held_post(1 << 20) + b"a" * 100)
    request = client.request
    assert client.transport.producerState == "paused"
    client.transport.resumeProducing()  # as HTTPChannel.resumeProducing does after a drain
    client.send(b"b" * 65536)
    assert client.transport.producerState == "paused"
    assert request._pending is not None
    assert sum(map(len, request._pending.held)) == 100 + 65536
    gw.held.deny()


def test_lingering_bound_counts_chunk_framing_too(gateway: Callable[..., AdmissionGateway]) -> None:
    """The discard bound counts what arrives on the connection, framing included: one-byte chunks with long
    chunk extensions cannot stretch it."""
    gw = gateway(server={"lingering_max_bytes": 1024, "lingering_timeout": 60})
    client = gw.client()
    client.send(post(None, b"X-Held: held-app") + b"1\r\nx\r\n")
    request = client.request
    gw.held.deny()
    assert response(client).status == 401
    piece = b"1;" + b"e" * 500 + b"\r\nx\r\n"
    client.send(piece)
    assert not client.transport.aborted
    client.send(piece + piece)
    assert client.transport.aborted
    assert request.ending == "lingering_limit"


def test_expect_continue_without_a_body_gets_no_continue_while_pending(
    gateway: Callable[..., AdmissionGateway],
) -> None:
    """A request without a body that (wrongly) asks for 100 Continue gets none while its verdict is pending, and
    its final answer once refused."""
    gw = gateway()
    client = gw.client()
    client.send(b"GET /reports HTTP/1.1\r\nHost: example.test\r\nX-Held: x\r\nExpect: 100-continue\r\n\r\n")
    assert client.received() == b""
    gw.held.deny()
    assert b"100 Continue" not in client.received()
    assert response(client).status == 401
