"""Admission over real loopback sockets: credentials checked on the head, refusals answered before a body byte is
read or an upstream contacted, identity passed upstream, and no credential ever leaked."""

from __future__ import annotations

import base64
import json
from typing import Any

import bcrypt
import pytest
import pytest_twisted
from twisted.internet import reactor, task

from gateway.auth.apikeys import hash_key
from tests.e2e.conftest import everything_logged
from tests.support.clients import RawClient, connect, parse_responses, within
from tests.support.running import gateway_config

MiB = 1024 * 1024
KEY = "gwk_e2e-key-of-reports-app-0123456789abcdef"
PASSWORD = "correct horse battery staple"
PASSWORD_HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()


def protected(origin_url: str, **sections: Any) -> dict[str, Any]:
    """A gateway whose catch-all route accepts API keys and Basic, for consumers alice (reports:read) and bob."""
    route = {"auth": ["keys", "login"], **sections.pop("route", {})}
    data = gateway_config(origin_url, route=route, **sections)
    data.setdefault("auth", {}).update({"keys": {"type": "api_key"}, "login": {"type": "basic", "realm": "reports"}})
    consumers = data.setdefault("consumers", {})
    consumers.setdefault("alice", {"api_keys": [hash_key(KEY)], "password": PASSWORD_HASH, "scopes": ["reports:read"]})
    consumers.setdefault("bob", {"scopes": []})
    return data


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def _get(path: bytes, *headers: bytes) -> bytes:
    lines = [b"GET %s HTTP/1.1" % path, b"Host: example.test", *headers, b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _post(path: bytes, length: int, *headers: bytes) -> bytes:
    lines = [b"POST %s HTTP/1.1" % path, b"Host: example.test", b"Content-Length: %d" % length, *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _exchange(port: int, request: bytes) -> RawClient:
    client = await connect(port, keep_all=True)
    client.send(request)
    await within(client.responses_received(1))
    await within(client.closed)
    return client


# === API keys ====================================================================================================


@pytest_twisted.ensureDeferred
async def test_valid_api_key_reaches_the_upstream_with_the_identity_and_without_the_key(origin, gateway_for):
    """A request with a valid key gets through; the upstream sees the consumer's identity headers and not the key."""
    gateway = gateway_for(protected(origin.url))
    client = await _exchange(gateway.port, _get(b"/headers", b"X-API-Key: " + KEY.encode()))
    response = client.response()
    assert response.status == 200
    echoed = json.loads(response.body)["headers"]
    names = {name.lower(): value for name, value in echoed}
    assert names["x-consumer-id"] == "alice"
    assert names["x-consumer-scopes"] == "reports:read"
    assert names["x-auth-method"] == "keys"
    assert "x-api-key" not in names


@pytest.mark.parametrize("route_auth", [["keys", "login"], "anonymous"], ids=["protected", "anonymous"])
@pytest_twisted.ensureDeferred
async def test_spoofed_identity_headers_never_reach_the_upstream(origin, gateway_for, route_auth):
    """Identity headers a client sends itself are removed on protected and anonymous routes alike; the upstream
    sees only the gateway's (in any spelling of the name the client chose)."""
    gateway = gateway_for(protected(origin.url, route={"auth": route_auth}))
    key = [b"X-API-Key: " + KEY.encode()] if route_auth != "anonymous" else []
    forged = [b"X-Consumer-ID: admin", b"x-consumer-scopes: admin:all", b"X-AUTH-METHOD: internal"]
    client = await _exchange(gateway.port, _get(b"/headers", *key, *forged))
    names = [(name.lower(), value) for name, value in json.loads(client.response().body)["headers"]]
    assert ("x-consumer-id", "admin") not in names
    assert ("x-consumer-scopes", "admin:all") not in names
    assert ("x-auth-method", "internal") not in names
    expected = "anonymous" if route_auth == "anonymous" else "keys"
    assert [v for n, v in names if n == "x-auth-method"] == [expected]


@pytest.mark.parametrize(
    ("credential", "status"),
    [
        (b"X-API-Key: gwk_wrong", 401),
        (b"Authorization: Bearer gwk_wrong", 401),
        (b"", 401),
    ],
    ids=["wrong-x-api-key", "wrong-bearer", "missing"],
)
@pytest_twisted.ensureDeferred
async def test_wrong_or_missing_api_key_is_401_and_the_upstream_never_hears_of_it(
    origin, gateway_for, credential, status
):
    """A wrong or missing key gets 401 problem+json with WWW-Authenticate; no upstream connection is made."""
    gateway = gateway_for(protected(origin.url))
    client = await _exchange(gateway.port, _get(b"/headers", *([credential] if credential else [])))
    response = client.response()
    assert response.status == status
    assert response.header(b"content-type") == b"application/problem+json"
    challenges = response.headers_named(b"www-authenticate")
    assert any(c.startswith(b"Bearer realm=") for c in challenges)
    assert b'Basic realm="reports", charset="UTF-8"' in challenges
    problem = json.loads(response.body)
    assert problem["status"] == 401 and problem["request_id"] == response.header(b"x-request-id").decode()
    assert origin.accepted == 0


# === HTTP Basic (bcrypt in threads) ================================================================================


@pytest_twisted.ensureDeferred
async def test_basic_login_is_verified_and_admitted(origin, gateway_for):
    """A correct Basic user and password (checked by bcrypt off the reactor thread) is admitted as that consumer."""
    gateway = gateway_for(protected(origin.url))
    client = await _exchange(gateway.port, _get(b"/headers", b"Authorization: " + basic("alice", PASSWORD)))
    response = client.response()
    assert response.status == 200
    names = {name.lower(): value for name, value in json.loads(response.body)["headers"]}
    assert names["x-consumer-id"] == "alice" and names["x-auth-method"] == "login"
    assert "authorization" not in names


@pytest.mark.parametrize(
    "credential",
    [basic("alice", "wrong"), basic("mallory", PASSWORD), b"Basic !!!not-base64"],
    ids=["wrong-password", "unknown-user", "malformed"],
)
@pytest_twisted.ensureDeferred
async def test_basic_wrong_credentials_are_401(origin, gateway_for, credential):
    """A wrong password, an unknown user and malformed Basic credentials all get 401 with the Basic challenge."""
    gateway = gateway_for(protected(origin.url))
    client = await _exchange(gateway.port, _get(b"/headers", b"Authorization: " + credential))
    response = client.response()
    assert response.status == 401
    assert b'Basic realm="reports", charset="UTF-8"' in response.headers_named(b"www-authenticate")
    assert origin.accepted == 0


# === scopes ===================================================================================================


@pytest.mark.parametrize(
    ("route", "status"),
    [
        ({"scopes_any": ["reports:read", "admin"]}, 200),
        ({"scopes_any": ["admin"]}, 403),
        ({"scopes_all": ["reports:read"]}, 200),
        ({"scopes_all": ["reports:read", "reports:write"]}, 403),
    ],
    ids=["any-held", "any-missing", "all-held", "all-missing-one"],
)
@pytest_twisted.ensureDeferred
async def test_scopes_any_of_and_all_of(origin, gateway_for, route, status):
    """A consumer lacking a required scope gets 403 (with RFC 6750's insufficient_scope for a bearer key)."""
    gateway = gateway_for(protected(origin.url, route=route))
    client = await _exchange(gateway.port, _get(b"/headers", b"Authorization: Bearer " + KEY.encode()))
    response = client.response()
    assert response.status == status
    if status == 403:
        (value,) = response.headers_named(b"www-authenticate")
        assert value.startswith(b'Bearer realm="gateway", error="insufficient_scope", scope="')
        assert origin.accepted == 0


# === uploads refused on the head ==================================================================================


@pytest_twisted.ensureDeferred
async def test_1gib_upload_without_a_valid_key_gets_401_without_continue_or_upstream(origin, gateway_for):
    """A 1 GiB upload with `Expect: 100-continue` and a wrong key gets its 401 at once, never `100 Continue`;
    the upstream is never contacted, and the client is let go without sending a byte of its body."""
    gateway = gateway_for(protected(origin.url, server={"lingering_timeout": 0.5}))
    client = await connect(gateway.port, keep_all=True)
    client.send(_post(b"/sink", 1 << 30, b"Expect: 100-continue", b"X-API-Key: gwk_wrong"))
    await within(client.responses_received(1))
    data = bytes(client.head)
    assert b"100 Continue" not in data
    (response,) = parse_responses(data)
    assert response.status == 401 and response.header(b"connection") == b"close"
    await within(client.closed, 10)
    assert origin.accepted == 0


@pytest_twisted.ensureDeferred
async def test_100mib_upload_without_expect_reading_while_it_sends_gets_its_401_intact(origin, gateway_for):
    """A client that sends a 100 MiB body without waiting, reading as it sends (as curl does), receives the whole
    401 before the gateway cuts the connection at its discard bound; the upstream never hears of it."""
    size = 100 * MiB
    gateway = gateway_for(protected(origin.url, server={"lingering_max_bytes": "4MiB", "lingering_timeout": 10}))
    client = await connect(gateway.port, keep_all=True)
    client.send(_post(b"/sink", size))
    sender = client.send_body(size)
    await within(client.closed, 30)
    (response,) = parse_responses(bytes(client.head))
    assert response.status == 401 and response.complete and response.rest == b""
    assert sender.written < size  # cut well before the end: the gateway did not read 100 MiB to drop it
    assert origin.accepted == 0


@pytest_twisted.ensureDeferred
async def test_refused_client_that_keeps_sending_slowly_is_closed_at_the_lingering_deadline(origin, gateway_for):
    """A refused client trickling its body is read and dropped until server.lingering_timeout, then cut."""
    gateway = gateway_for(protected(origin.url, server={"lingering_timeout": 0.3}))
    client = await connect(gateway.port, keep_all=True)
    client.send(_post(b"/sink", 10 * MiB))
    await within(client.responses_received(1))
    for _ in range(100):  # a byte every 20 ms: never idle, never done; bounded at 2 s
        if client.reason is not None:
            break
        client.send(b"x")
        await task.deferLater(reactor, 0.02, lambda: None)
    assert client.reason is not None, "the connection was not cut at the lingering deadline"
    assert parse_responses(bytes(client.head))[0].status == 401
    assert origin.accepted == 0


# === secrets never leak ==============================================================================================


@pytest.mark.parametrize(
    ("header", "secret"),
    [
        (b"X-API-Key: " + KEY.encode(), KEY),
        (b"Authorization: Bearer " + KEY.encode(), KEY),
        (b"Authorization: " + basic("alice", PASSWORD), PASSWORD),
        (b"X-API-Key: gwk_a-wrong-key-that-must-not-be-logged", "gwk_a-wrong-key-that-must-not-be-logged"),
        (b"Authorization: " + basic("alice", "a wrong password not to log"), "a wrong password not to log"),
    ],
    ids=["key-header", "key-bearer", "basic", "wrong-key", "wrong-password"],
)
@pytest_twisted.ensureDeferred
async def test_a_credential_never_appears_in_logs_answers_or_upstream_headers(
    origin, gateway_for, logged, header, secret
):
    """Whether accepted or refused, a credential appears in no log event, no answer and no upstream header."""
    gateway = gateway_for(protected(origin.url))
    client = await _exchange(gateway.port, _get(b"/headers", header))
    encoded = base64.b64encode(f"alice:{secret}".encode()).decode()
    answer = bytes(client.head).decode("latin-1")
    for text in (secret, encoded):
        assert text not in answer
        assert text not in everything_logged(logged)
        for seen in origin.seen:
            assert all(text.encode() not in value for _, value in seen.headers)


@pytest_twisted.ensureDeferred
async def test_a_denial_is_logged_with_its_reason_and_consumer(origin, gateway_for, logged):
    """The log line of a denial names the status, the reason and the consumer when known."""
    gateway = gateway_for(protected(origin.url, route={"scopes_all": ["admin"]}))
    await _exchange(gateway.port, _get(b"/headers", b"X-API-Key: " + KEY.encode()))
    denials = [e for e in logged if e.get("reason") == "insufficient_scope"]
    assert len(denials) == 1
    assert denials[0]["status"] == 403 and denials[0]["consumer"] == "alice" and denials[0]["route"] == "origin"


# === RateLimit headers on every response of a rate-limited route =========================================


@pytest.mark.parametrize("switch", [True, False], ids=["on", "off"])
@pytest_twisted.ensureDeferred
async def test_a_consumer_under_a_rate_limit_is_told_its_quota_on_every_response(origin, gateway_for, switch):
    """Each admitted response of a rate-limited consumer carries RateLimit-Policy and RateLimit (its quota, what
    is left, seconds until all of it is back), as the 429 does; the route's `rate_limit_headers = false` leaves
    them out (the 429 keeps them)."""
    data = protected(
        origin.url, admission={"rate_limits": {"consumer": {"rate": "3/m"}}}, route={"rate_limit_headers": switch}
    )
    gateway = gateway_for(data)
    seen = []
    for _ in range(4):
        client = await _exchange(gateway.port, _get(b"/status/200", f"X-API-Key: {KEY}".encode()))
        (response,) = parse_responses(bytes(client.head))
        seen.append((response.status, response.header(b"ratelimit-policy"), response.header(b"ratelimit")))
    if switch:
        assert [status for status, _, _ in seen] == [200, 200, 200, 429]
        assert {policy for _, policy, _ in seen} == {b'"consumer";q=3;w=60'}
        assert [left.split(b";")[1] for _, _, left in seen] == [b"r=2", b"r=1", b"r=0", b"r=0"]
    else:
        assert [(status, policy, left) for status, policy, left in seen[:3]] == [(200, None, None)] * 3
        assert seen[3][0] == 429 and seen[3][1] == b'"consumer";q=3;w=60'


@pytest_twisted.ensureDeferred
async def test_an_anonymous_rate_limited_route_tells_the_address_its_quota(origin, gateway_for):
    """An anonymous route under `rate_limits.anonymous` tells each client address its quota on every response;
    a route without a rate limit sends no RateLimit header at all."""
    gateway = gateway_for(gateway_config(origin.url, admission={"rate_limits": {"anonymous": {"rate": "10/m"}}}))
    client = await _exchange(gateway.port, _get(b"/status/200"))
    (response,) = parse_responses(bytes(client.head))
    assert response.header(b"ratelimit-policy") == b'"anonymous";q=10;w=60'
    assert response.header(b"ratelimit").startswith(b'"anonymous";r=9;t=')
    plain = gateway_for(gateway_config(origin.url))
    client = await _exchange(plain.port, _get(b"/status/200"))
    (response,) = parse_responses(bytes(client.head))
    assert response.header(b"ratelimit") is None and response.header(b"ratelimit-policy") is None
