"""JWT and forward auth through the whole gateway over real loopback sockets: a JWKS endpoint and an auth service
started by fixtures, a real origin, raw clients. What each method decides in detail is tested in
tests/test_auth_jwt.py and tests/test_auth_forward.py; here, that the verdicts reach the client and the origin."""

from __future__ import annotations

import base64
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer, reactor, task
from twisted.web import resource, server

from tests.e2e.conftest import everything_logged
from tests.support.clients import connect, parse_responses, within
from tests.support.running import gateway_config

ISSUER = "https://id.example.test/"
PRIVATE = rsa.generate_private_key(public_exponent=65537, key_size=2048)
JWK = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(PRIVATE.public_key()))


def token(kid: str = "k1", **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": "gateway", "sub": "svc-reports", "exp": now + 600, "scope": "reports:read"}
    payload.update(claims)
    return jwt.encode(payload, PRIVATE, algorithm="RS256", headers={"kid": kid})


class _Jwks(resource.Resource):
    """A JWKS endpoint: serves the keys it holds, counts fetches, can fail."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        self.failing = False

    def render_GET(self, request: server.Request) -> bytes:
        self.fetches += 1
        if self.failing:
            request.setResponseCode(500)
            return b"down"
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"keys": self.keys}).encode()


class _AuthService(resource.Resource):
    """A forward-auth service: admits `Authorization: Token ok`, refuses anything else with its own 401 body,
    never answers `Token slow` (the request is held until the connection closes)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, str]] = []
        self.held_lost: defer.Deferred[None] = defer.Deferred()

    def render_GET(self, request: server.Request) -> bytes | int:
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.seen.append(headers)
        credential = headers.get("authorization", "")
        if credential == "Token slow":
            request.notifyFinish().addBoth(lambda _: self.held_lost.callback(None))
            return server.NOT_DONE_YET
        if credential == "Token ok":
            request.setHeader(b"x-user", b"carol")
            request.setHeader(b"x-team", b"reports")
            return b""
        request.setResponseCode(401)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"www-authenticate", b'Token realm="sso"')
        return b'{"error":"who are you?"}'


@pytest_twisted.async_yield_fixture()
async def jwks() -> AsyncIterator[tuple[_Jwks, str]]:
    site = _Jwks()
    port = reactor.listenTCP(0, server.Site(site), interface="127.0.0.1")
    yield site, f"http://127.0.0.1:{port.getHost().port}/jwks.json"
    await port.stopListening()


@pytest_twisted.async_yield_fixture()
async def auth_service() -> AsyncIterator[tuple[_AuthService, str]]:
    site = _AuthService()
    factory = server.Site(site)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield site, f"http://127.0.0.1:{port.getHost().port}/check"
    await port.stopListening()


def jwt_config(origin_url: str, method: dict[str, Any], **route: Any) -> dict[str, Any]:
    data = gateway_config(origin_url, route={"auth": ["corp"], **route})
    data["auth"] = {
        "corp": {"type": "jwt", "issuer": ISSUER, "audiences": ["gateway"], "algorithms": ["RS256"], **method}
    }
    return data


def _get(path: bytes, *headers: bytes) -> bytes:
    return b"\r\n".join([b"GET %s HTTP/1.1" % path, b"Host: example.test", *headers, b"Connection: close"]) + (
        b"\r\n\r\n"
    )


async def _answer(port: int, request: bytes) -> Any:
    client = await connect(port, keep_all=True)
    client.send(request)
    await within(client.responses_received(1))
    await within(client.closed)
    return client.response()


async def _poll(predicate: Any) -> None:
    for _ in range(500):
        if predicate():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("the condition never held")


def eventually(predicate: Any) -> defer.Deferred[None]:
    """Fires once `predicate()` holds, checked every 10 ms (for events no client reads, such as what an auth
    service received)."""
    return defer.ensureDeferred(_poll(predicate))


def _upstream_headers(response: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in json.loads(response.body)["headers"]}


# === JWT ========================================================================================================


@pytest_twisted.ensureDeferred
async def test_jwt_from_a_pem_key_admits_the_subject_with_its_scopes_and_claims(origin, gateway_for, tmp_path):
    """A valid RS256 token verified with a PEM key reaches the upstream as its subject, with its scopes and the
    claims chosen for headers, and without the token."""
    pem = tmp_path / "corp.pem"
    pem.write_bytes(
        PRIVATE.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    method = {"public_key_file": str(pem), "claim_headers": {"X-User-Email": "email"}}
    gateway = gateway_for(jwt_config(origin.url, method, scopes_any=["reports:read"]))
    signed = token(email="reports@example.test")
    response = await _answer(gateway.port, _get(b"/headers", b"Authorization: Bearer " + signed.encode()))
    assert response.status == 200
    seen = _upstream_headers(response)
    assert seen["x-consumer-id"] == "svc-reports"
    assert seen["x-consumer-scopes"] == "reports:read"
    assert seen["x-user-email"] == "reports@example.test"
    assert "authorization" not in seen


PUBLIC_PEM = PRIVATE.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _crafted(alg: str, secret: bytes | None, **claims: Any) -> str:
    """A token made by hand: `alg` in its header, HMAC-SHA256 with `secret` as its signature (none without)."""
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": "gateway", "sub": "svc-reports", "exp": now + 600, **claims}
    signing_input = f"{_b64(json.dumps({'alg': alg, 'typ': 'JWT'}).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = _b64(hmac.digest(secret, signing_input.encode(), "sha256")) if secret is not None else ""
    return f"{signing_input}.{signature}"


REFUSED_TOKENS: list[tuple[str, Callable[[], str], str, bytes]] = [
    ("expired", lambda: token(exp=int(time.time()) - 3600), "token_expired", b'error="invalid_token"'),
    ("not-yet-valid", lambda: token(nbf=int(time.time()) + 3600), "token_not_yet_valid", b'error="invalid_token"'),
    ("wrong-audience", lambda: token(aud="another-service"), "wrong_audience", b'error="invalid_token"'),
    ("bad-signature", lambda: token()[:-8] + "AAAAAAAA", "bad_signature", b'error="invalid_token"'),
    ("alg-none", lambda: _crafted("none", None), "token_algorithm_refused", b'error="invalid_token"'),
    # Algorithm confusion: HS256 keyed with the RSA public key's PEM (which anyone has), on an RS256 method.
    (
        "hs256-keyed-with-the-public-key",
        lambda: _crafted("HS256", PUBLIC_PEM),
        "token_algorithm_refused",
        b'error="invalid_token"',
    ),
    # Another issuer's token is no method's credential here: 401, and not even read as a JWT of this issuer.
    ("wrong-issuer", lambda: token(iss="https://evil.example/"), "unaccepted_credentials", b'Bearer realm="gateway"'),
    ("missing", lambda: "", "missing_credentials", b'Bearer realm="gateway"'),
]


@pytest.mark.parametrize(
    ("make", "reason", "challenge"), [case[1:] for case in REFUSED_TOKENS], ids=[case[0] for case in REFUSED_TOKENS]
)
@pytest_twisted.ensureDeferred
async def test_jwt_refused_is_401_with_an_rfc6750_challenge(
    origin, gateway_for, tmp_path, logged, make, reason, challenge
):
    """An expired, not-yet-valid, wrongly addressed, wrongly signed, unsigned (`alg: none`), algorithm-confused,
    foreign or missing token gets 401 with a Bearer challenge (`error="invalid_token"` when a token was refused),
    the denial is logged with its reason, and the upstream never hears of it."""
    pem = tmp_path / "corp.pem"
    pem.write_bytes(PUBLIC_PEM)
    gateway = gateway_for(jwt_config(origin.url, {"public_key_file": str(pem)}))
    signed = make()
    headers = [b"Authorization: Bearer " + signed.encode()] if signed else []
    response = await _answer(gateway.port, _get(b"/headers", *headers))
    assert response.status == 401
    (offered,) = response.headers_named(b"www-authenticate")
    assert offered.startswith(b'Bearer realm="gateway"') and challenge in offered
    assert origin.accepted == 0
    assert [e["reason"] for e in logged if "reason" in e and e.get("status") == 401] == [reason]
    if signed:
        assert signed not in everything_logged(logged)


@pytest_twisted.ensureDeferred
async def test_jwks_url_is_fetched_once_then_refetched_for_an_unknown_kid(origin, gateway_for, jwks):
    """Keys come from the JWKS URL on first use and stay cached; a token with a new kid (a rotated key) makes the
    gateway fetch again, and it is admitted."""
    site, url = jwks
    site.keys = [{**JWK, "kid": "k1"}]
    gateway = gateway_for(jwt_config(origin.url, {"jwks_url": url, "jwks_refresh_interval": "10ms"}))
    for _ in range(2):
        response = await _answer(gateway.port, _get(b"/headers", b"Authorization: Bearer " + token().encode()))
        assert response.status == 200
    assert site.fetches == 1
    site.keys = [{**JWK, "kid": "k1"}, {**JWK, "kid": "k2"}]
    await task.deferLater(reactor, 0.02, lambda: None)  # past the refresh interval
    response = await _answer(gateway.port, _get(b"/headers", b"Authorization: Bearer " + token("k2").encode()))
    assert response.status == 200
    assert site.fetches == 2


@pytest_twisted.ensureDeferred
async def test_jwks_never_fetched_is_503_and_stale_keys_stay_in_use(origin, gateway_for, jwks):
    """When the JWKS endpoint fails before any fetch succeeded, admission fails closed with 503; once keys were
    fetched, a failing endpoint leaves them in use."""
    site, url = jwks
    site.keys = [{**JWK, "kid": "k1"}]
    site.failing = True
    gateway = gateway_for(jwt_config(origin.url, {"jwks_url": url, "jwks_refresh_interval": "10ms"}))
    response = await _answer(gateway.port, _get(b"/headers", b"Authorization: Bearer " + token().encode()))
    assert response.status == 503
    assert json.loads(response.body)["type"] == "urn:gateway:problem:auth-unavailable"
    site.failing = False
    await task.deferLater(reactor, 0.02, lambda: None)  # past the refresh interval
    response = await _answer(gateway.port, _get(b"/headers", b"Authorization: Bearer " + token().encode()))
    assert response.status == 200
    site.failing = True
    await task.deferLater(reactor, 0.02, lambda: None)
    response = await _answer(gateway.port, _get(b"/headers", b"Authorization: Bearer " + token("k-unknown").encode()))
    assert response.status == 401  # refetch failed: the stale keys still decide, and they do not know the kid
    response = await _answer(gateway.port, _get(b"/headers", b"Authorization: Bearer " + token().encode()))
    assert response.status == 200


@pytest_twisted.ensureDeferred
async def test_upload_waiting_for_the_jwks_gets_no_continue_until_admitted(origin, gateway_for, jwks):
    """An upload whose token needs the keys fetched gets `100 Continue` only once the verdict is in, then streams."""
    site, url = jwks
    site.keys = [{**JWK, "kid": "k1"}]
    gateway = gateway_for(jwt_config(origin.url, {"jwks_url": url}))
    client = await connect(gateway.port, keep_all=True)
    body = b"x" * 1000
    client.send(
        b"POST /sink HTTP/1.1\r\nHost: example.test\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n"
        b"Connection: close\r\nAuthorization: Bearer " + token().encode() + b"\r\n\r\n"
    )
    await within(client.until(lambda c: b"100 Continue" in bytes(c.head), "100 Continue arrived"))
    assert site.fetches == 1
    client.send(body)
    await within(client.responses_received(1))
    (response,) = parse_responses(bytes(client.head))
    assert response.status == 200 and json.loads(response.body)["bytes"] == 1000


# === forward auth ===============================================================================================


def forward_config(origin_url: str, url: str, **method: Any) -> dict[str, Any]:
    data = gateway_config(origin_url, route={"auth": ["sso"]})
    data["auth"] = {
        "sso": {
            "type": "forward",
            "url": url,
            "copy_headers": ["X-Team"],
            "consumer_header": "X-User",
            **method,
        }
    }
    return data


@pytest_twisted.ensureDeferred
async def test_forward_auth_admits_with_the_services_identity(origin, gateway_for, auth_service):
    """An auth service's 2xx admits the request as the consumer it names, with the headers it chose copied
    upstream; the service saw the method and target but no body."""
    site, url = auth_service
    gateway = gateway_for(forward_config(origin.url, url))
    response = await _answer(gateway.port, _get(b"/headers?x=1", b"Authorization: Token ok", b"X-Team: forged"))
    assert response.status == 200
    seen = _upstream_headers(response)
    assert seen["x-consumer-id"] == "carol" and seen["x-team"] == "reports"
    assert "authorization" not in seen
    (asked,) = site.seen
    assert asked["x-forwarded-method"] == "GET" and asked["x-forwarded-uri"] == "/headers?x=1"


@pytest_twisted.ensureDeferred
async def test_forward_auth_denial_is_passed_to_the_client_with_its_body(origin, gateway_for, auth_service):
    """The auth service's 401, its body and its WWW-Authenticate reach the client; the upstream never hears of it."""
    _, url = auth_service
    gateway = gateway_for(forward_config(origin.url, url))
    response = await _answer(gateway.port, _get(b"/headers", b"Authorization: Token nope"))
    assert response.status == 401
    assert response.body == b'{"error":"who are you?"}'
    assert response.headers_named(b"www-authenticate") == [b'Token realm="sso"']
    assert origin.accepted == 0


@pytest_twisted.ensureDeferred
async def test_forward_auth_timeout_fails_closed_with_504(origin, gateway_for, auth_service):
    """An auth service slower than the method's timeout gets the request 504, never admitted."""
    site, url = auth_service
    gateway = gateway_for(forward_config(origin.url, url, timeout="200ms"))
    response = await _answer(gateway.port, _get(b"/headers", b"Authorization: Token slow"))
    assert response.status == 504
    await within(site.held_lost)
    assert origin.accepted == 0


@pytest_twisted.ensureDeferred
async def test_client_leaving_during_forward_auth_cancels_the_check(origin, gateway_for, auth_service):
    """A client that hangs up while the auth service is still deciding makes the gateway drop the sub-request:
    the auth service sees its connection close."""
    site, url = auth_service
    gateway = gateway_for(forward_config(origin.url, url, timeout="30s"))
    client = await connect(gateway.port)
    client.send(_get(b"/headers", b"Authorization: Token slow"))
    await within(eventually(lambda: len(site.seen) == 1))
    client.transport.loseConnection()
    await within(site.held_lost)
    assert origin.accepted == 0


# === secrets never leak ==========================================================================================


@pytest_twisted.ensureDeferred
async def test_a_token_never_appears_in_logs_answers_or_upstream_headers(origin, gateway_for, tmp_path, logged):
    """Neither an accepted nor a refused JWT appears in a log event, an answer or a header the upstream got."""
    pem = tmp_path / "corp.pem"
    pem.write_bytes(PUBLIC_PEM)
    gateway = gateway_for(jwt_config(origin.url, {"public_key_file": str(pem)}))
    good, expired = token(), token(exp=int(time.time()) - 3600)
    answers = []
    for signed in (good, expired):
        client = await connect(gateway.port, keep_all=True)
        client.send(_get(b"/headers", b"Authorization: Bearer " + signed.encode()))
        await within(client.closed)
        answers.append(bytes(client.head))
    assert parse_responses(answers[0])[0].status == 200 and parse_responses(answers[1])[0].status == 401
    for signed in (good, expired):
        for part in signed.split("."):  # no part of it either (a signature alone is a secret's fingerprint)
            assert all(part.encode() not in answer for answer in answers)
            assert part not in everything_logged(logged)
            assert all(part.encode() not in value for seen in origin.seen for _, value in seen.headers)


@pytest_twisted.ensureDeferred
async def test_a_forward_auth_credential_reaches_only_the_auth_service(origin, gateway_for, auth_service, logged):
    """The credential a forward-auth method sends to its auth service goes nowhere else: not upstream, not into an
    answer, not into a log event, whether admitted or refused."""
    site, url = auth_service
    gateway = gateway_for(forward_config(origin.url, url))
    answers = []
    for credential in (b"Token ok", b"Token nope"):
        client = await connect(gateway.port, keep_all=True)
        client.send(_get(b"/headers", b"Authorization: " + credential))
        await within(client.closed)
        answers.append(bytes(client.head))
    assert [parse_responses(a)[0].status for a in answers] == [200, 401]
    assert [seen["authorization"] for seen in site.seen] == ["Token ok", "Token nope"]
    for secret in (b"Token ok", b"Token nope"):
        assert all(secret not in answer for answer in answers)
        assert secret.decode() not in everything_logged(logged)
        assert all(secret not in value for seen in origin.seen for _, value in seen.headers)
