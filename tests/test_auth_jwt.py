"""Tests for gateway.auth.jwt and gateway.auth.jwks: which bearer tokens the JWT method claims, every reason it
refuses one, the key each algorithm may use, the identity a token proves, the verified-token cache, and the JWKS
URL's fetch policy (shared fetches, refetch on an unknown kid at most once per interval, background refetch when
old, stale keys kept, 503 when no keys were ever had, cancellation).

In memory, on a `Clock` with a fetch function whose Deferreds the test fires; a few tests over loopback against
a real JWKS endpoint with the default treq fetcher. Tokens are made at test time with PyJWT; `alg: none` and the
HS256-with-the-public-key forgery are made by hand (PyJWT refuses to make them).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server
from twisted.web.http_headers import Headers

from gateway.auth.credentials import MALFORMED
from gateway.auth.identity import AuthFailure, AuthRequest, Identity
from gateway.auth.jwks import MAX_JWKS_BYTES
from gateway.auth.jwt import JwtAuthenticator
from gateway.auth.settings.model import JwtMethod
from gateway.errors import AuthUnavailable
from tests.support.logs import captured, in_namespace

_sync = SynchronousTestCase()
WAIT = 10
"""The bound on every wait of a loopback test (seconds)."""

ISSUER = "https://id.example.test/"
AUDIENCE = "gateway"
JWKS_URL = "https://id.example.test/.well-known/jwks.json"
SECRET = b"0123456789abcdef0123456789abcdef"
"""32 bytes: the least HS256 takes without PyJWT warning."""

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_P384_KEY = ec.generate_private_key(ec.SECP384R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
WEAK_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)

REQUEST = AuthRequest(method=b"GET", target=b"/reports", headers=Headers(), client_address="192.0.2.1", request_id="r1")

# --- keys, tokens, methods --------------------------------------------------------------------------------------


def pem(private: Any) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk(private: Any, kid: str | None, **members: Any) -> dict[str, Any]:
    """The public JWK of `private`, with `kid` and any other members."""
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        data = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = jwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True)
    if kid is not None:
        data["kid"] = kid
    return {**data, **members}


def claims(**changes: Any) -> dict[str, Any]:
    """A valid claim set for ISSUER and AUDIENCE; a change to None removes that claim."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "svc-reports",
        "iat": now,
        "exp": now + 600,
        "scope": "reports:read",
    }
    payload.update(changes)
    return {name: value for name, value in payload.items() if value is not None}


def token(key: Any = RSA_KEY, alg: str = "RS256", kid: str | None = None, **changes: Any) -> bytes:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**changes), key, algorithm=alg, headers=headers).encode("ascii")


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def crafted(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None = None) -> bytes:
    """A token made by hand: signed with HMAC-SHA256 under `hmac_key`, or with an empty signature."""
    signing_input = _b64(json.dumps(header).encode()) + b"." + _b64(json.dumps(payload).encode())
    signature = hmac.new(hmac_key, signing_input, hashlib.sha256).digest() if hmac_key is not None else b""
    return signing_input + b"." + _b64(signature)


def tampered(valid: bytes) -> bytes:
    """`valid` with one byte of its signature changed (in its first character, whose bits all count)."""
    head, payload, signature = valid.split(b".")
    first = b"B" if signature[:1] != b"B" else b"C"
    return b".".join([head, payload, first + signature[1:]])


def method(**changes: Any) -> JwtMethod:
    """An RS256 method of ISSUER with RSA_KEY's public key, unless `changes` say otherwise."""
    settings: dict[str, Any] = {
        "name": "corp",
        "issuer": ISSUER,
        "audiences": (AUDIENCE,),
        "algorithms": ("RS256",),
        "public_key_pem": pem(RSA_KEY),
    }
    if {"secret", "jwks", "jwks_url"} & changes.keys():
        del settings["public_key_pem"]
    settings.update(changes)
    return JwtMethod(**settings)


def jwks_method(*keys: dict[str, Any], **changes: Any) -> JwtMethod:
    return method(jwks={"keys": list(keys)}, **changes)


def authenticator(m: JwtMethod | None = None, *, clock: Clock | None = None, fetch: Any = None) -> JwtAuthenticator:
    return JwtAuthenticator(m or method(), clock=clock or Clock(), realm="api", fetch=fetch)


def verified(auth: JwtAuthenticator, credential: bytes) -> Identity:
    """The identity `credential` proves, answered at once (not through a Deferred)."""
    result = auth.verify(credential, REQUEST)
    assert isinstance(result, Identity), f"verify answered {result!r}, not an identity at once"
    return result


def refused(auth: JwtAuthenticator, credential: bytes) -> AuthFailure:
    """The AuthFailure `verify` raises at once for `credential`."""
    with pytest.raises(AuthFailure) as caught:
        auth.verify(credential, REQUEST)
    return caught.value


def bearer(*values: bytes) -> Headers:
    return Headers({b"authorization": list(values)})


class FakeFetch:
    """A fetch function whose answers the test gives: every call is recorded with the Deferred it returned."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, Deferred[bytes]]] = []

    def __call__(self, url: str, timeout: float) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self.calls.append((url, timeout, d))
        return d

    @property
    def count(self) -> int:
        return len(self.calls)

    def answer(self, *keys: dict[str, Any]) -> None:
        """The latest fetch answers with a key set of `keys`."""
        self.calls[-1][2].callback(json.dumps({"keys": list(keys)}).encode())

    def fail(self) -> None:
        self.calls[-1][2].errback(ConnectionRefusedError("connection refused"))


def remote(clock: Clock, fetch: FakeFetch, **changes: Any) -> JwtAuthenticator:
    """A method whose keys come from JWKS_URL through `fetch`."""
    return authenticator(method(jwks_url=JWKS_URL, **changes), clock=clock, fetch=fetch)


@pytest.fixture
def jwks_log() -> Iterator[list[LogEvent]]:
    """The events gateway.auth.jwks logs during the test."""
    with captured(in_namespace("gateway.auth.jwks")) as seen:
        yield seen


# === credential: which requests carry this method's token ======================================================


def test_credential_is_a_bearer_jwt_of_the_methods_issuer() -> None:
    """A bearer JWT whose (unverified) iss is the method's issuer is this method's credential, whatever the
    scheme's case."""
    auth = authenticator()
    t = token()
    assert auth.credential(bearer(b"Bearer " + t)) == t
    assert auth.credential(bearer(b"bEaReR  " + t)) == t


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(Headers(), id="no Authorization"),
        pytest.param(bearer(b"Basic dXNlcjpwYXNz"), id="another scheme"),
        pytest.param(bearer(b"Bearer gwk_0123456789abcdef"), id="an API key"),
        pytest.param(bearer(b"Bearer " + token(iss="https://other.example.test/")), id="another issuer"),
        pytest.param(bearer(b"Bearer " + token(iss=None)), id="no issuer"),
        pytest.param(bearer(b"Bearer a.b.c d"), id="not token68"),
        pytest.param(bearer(b"Bearer"), id="no token"),
        pytest.param(bearer(b"Bearer eyJ!.eyJ.x"), id="not base64url"),
    ],
)
def test_credential_leaves_what_is_not_its_token_to_other_methods(headers: Headers) -> None:
    """Without a bearer JWT of this issuer, the request carries none of this method's credentials (a non-JWT
    bearer value may be an API key; another issuer's JWT belongs to another method)."""
    assert authenticator().credential(headers) is None


def test_several_authorization_headers_are_a_malformed_credential_refused_as_invalid_request() -> None:
    """Two Authorization headers are MALFORMED (which one would the upstream believe?), and verify refuses that
    with RFC 6750's invalid_request."""
    auth = authenticator()
    credential = auth.credential(bearer(b"Bearer " + token(), b"Bearer " + token()))
    assert credential is MALFORMED
    failure = refused(auth, credential)  # type: ignore[arg-type]
    assert (failure.reason, failure.bearer_error) == ("malformed_credentials", "invalid_request")


# === verify: valid tokens ========================================================================================


def test_rs256_token_from_a_pem_key_proves_its_subject_scopes_and_method() -> None:
    """An RS256 token verified with the configured PEM key proves its `sub`, with the scopes of `scope`, at once."""
    identity = verified(authenticator(), token(scope="reports:read reports:write"))
    assert identity == Identity(
        consumer="svc-reports",
        scopes=frozenset({"reports:read", "reports:write"}),
        method="corp",
        headers=(),
        credential_headers=(b"authorization",),
    )


@pytest.mark.parametrize(
    ("changes", "key", "alg", "kid"),
    [
        pytest.param({"algorithms": ("ES256",), "public_key_pem": pem(EC_KEY)}, EC_KEY, "ES256", None, id="ES256 PEM"),
        pytest.param({"algorithms": ("EdDSA",), "public_key_pem": pem(ED_KEY)}, ED_KEY, "EdDSA", None, id="EdDSA PEM"),
        pytest.param({"algorithms": ("PS256",)}, RSA_KEY, "PS256", None, id="PS256 PEM"),
        pytest.param({"algorithms": ("HS256",), "secret": SECRET}, SECRET, "HS256", None, id="HS256 secret"),
        pytest.param({}, RSA_KEY, "RS256", "any", id="PEM, a kid in the token"),
        pytest.param(
            {"algorithms": ("RS256", "ES256"), "jwks": {"keys": [jwk(RSA_KEY, "r1"), jwk(EC_KEY, "e1")]}},
            EC_KEY,
            "ES256",
            "e1",
            id="ES256 JWKS file",
        ),
        pytest.param(
            {"jwks": {"keys": [jwk(RSA_KEY, "r1", alg="RS256")]}}, RSA_KEY, "RS256", "r1", id="RS256 JWK with alg"
        ),
        pytest.param(
            {"algorithms": ("EdDSA",), "jwks": {"keys": [jwk(ED_KEY, "d1")]}}, ED_KEY, "EdDSA", "d1", id="EdDSA JWKS"
        ),
    ],
)
def test_a_token_verifies_with_the_key_of_its_algorithm(
    changes: dict[str, Any], key: Any, alg: str, kid: str | None
) -> None:
    """Each kind of key source verifies tokens of the algorithms it is for, at once."""
    identity = verified(authenticator(method(**changes)), token(key, alg, kid=kid))
    assert identity.consumer == "svc-reports"


def test_jwks_file_key_is_chosen_by_kid() -> None:
    """With several keys in the set, the token's kid chooses the one its signature is checked with."""
    auth = authenticator(jwks_method(jwk(RSA_KEY, "r1"), jwk(RSA_KEY_2, "r2")))
    assert verified(auth, token(RSA_KEY_2, kid="r2")).consumer == "svc-reports"
    assert verified(auth, token(RSA_KEY, kid="r1")).consumer == "svc-reports"
    assert refused(auth, token(RSA_KEY, kid="r2")).reason == "bad_signature"


def test_token_without_kid_verifies_when_exactly_one_key_fits_its_algorithm() -> None:
    """No kid: the one RSA key of a set that also holds an EC key verifies an RS256 token."""
    auth = authenticator(jwks_method(jwk(RSA_KEY, "r1"), jwk(EC_KEY, "e1")))
    assert verified(auth, token()).consumer == "svc-reports"


@pytest.mark.parametrize(
    "keys",
    [
        pytest.param([jwk(RSA_KEY, "r1"), jwk(RSA_KEY_2, "r2")], id="two with kids"),
        pytest.param([jwk(RSA_KEY, None), jwk(RSA_KEY_2, "r2")], id="one without a kid, one with"),
        pytest.param([jwk(RSA_KEY, None), jwk(RSA_KEY_2, None)], id="two without kids"),
    ],
)
def test_token_without_kid_is_refused_when_several_keys_fit(keys: list[dict[str, Any]]) -> None:
    """No kid and several keys that fit: which one did the issuer mean? Refused as an unknown key, even though
    one of them would verify it."""
    failure = refused(authenticator(jwks_method(*keys)), token())
    assert failure.reason == "unknown_key"


# === verify: every refusal =======================================================================================

_NOW = int(time.time())

REFUSALS = [
    pytest.param(method(), token(exp=_NOW - 100), "token_expired", "the token has expired", id="expired"),
    pytest.param(method(), token(nbf=_NOW + 86400), "token_not_yet_valid", "the token is not valid yet", id="nbf"),
    pytest.param(method(), token(aud="other-service"), "wrong_audience", None, id="wrong audience"),
    pytest.param(method(), token(aud=None), "missing_claim", "the token lacks the aud claim", id="no audience"),
    pytest.param(method(), token(iss="https://other.example.test/"), "wrong_issuer", None, id="wrong issuer"),
    pytest.param(method(), tampered(token()), "bad_signature", None, id="bad signature"),
    pytest.param(method(), token(RSA_KEY_2), "bad_signature", None, id="another key's signature"),
    pytest.param(method(), token(exp=None), "missing_claim", "the token lacks the exp claim", id="no exp"),
    pytest.param(method(), token(sub=None), "missing_claim", "the token lacks the sub claim", id="no sub"),
    pytest.param(method(), token(EC_KEY, "ES256"), "token_algorithm_refused", None, id="algorithm not allowed"),
    pytest.param(method(), b"eyJhbGciOi.eyJpc3MiOi.c2ln", "malformed_token", None, id="unreadable header"),
    pytest.param(
        method(),
        jwt.api_jws.PyJWS().encode(b"not json", RSA_KEY, algorithm="RS256").encode(),
        "malformed_token",
        "the token cannot be read",
        id="signed payload not JSON",
    ),
    pytest.param(method(), token(iat="yesterday"), "invalid_token", "the token is not valid", id="iat not a number"),
]


@pytest.mark.parametrize(("m", "credential", "reason", "detail"), REFUSALS)
def test_a_bad_token_is_refused_with_its_reason_and_a_safe_detail(
    m: JwtMethod, credential: bytes, reason: str, detail: str | None
) -> None:
    """Every bad token raises AuthFailure at once: its reason for the log, RFC 6750's invalid_token, and a short
    English sentence for the client that never holds the token or a part of it."""
    failure = refused(authenticator(m), credential)
    assert (failure.reason, failure.bearer_error) == (reason, "invalid_token")
    if detail is not None:
        assert failure.detail == detail
    assert failure.detail.startswith("the token") and failure.detail.isascii()
    for part in credential.split(b"."):
        assert len(part) < 4 or part.decode() not in failure.detail


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused_although_credential_claims_it(alg: str) -> None:
    """An unsigned token (`alg: none`, empty signature) of the issuer is this method's credential, and is
    refused for its algorithm whatever the spelling."""
    unsigned = crafted({"alg": alg, "typ": "JWT"}, claims())
    auth = authenticator()
    assert auth.credential(bearer(b"Bearer " + unsigned)) == unsigned
    assert refused(auth, unsigned).reason == "token_algorithm_refused"


def test_a_token_without_alg_is_refused() -> None:
    assert refused(authenticator(), crafted({"typ": "JWT"}, claims())).reason == "token_algorithm_refused"


def test_hs256_token_signed_with_the_public_key_is_refused_on_an_rs256_method() -> None:
    """Algorithm confusion: an HS256 token whose HMAC secret is the method's public key PEM (which anyone may
    have) is refused for its algorithm, not verified with the PEM as a secret."""
    forged = crafted({"alg": "HS256", "typ": "JWT"}, claims(), hmac_key=pem(RSA_KEY))
    assert refused(authenticator(), forged).reason == "token_algorithm_refused"


def test_algorithm_confusion_does_not_cost_a_jwks_fetch() -> None:
    """A token of an algorithm the method does not allow is refused before any key is looked for: junk tokens
    never make the gateway fetch the key set."""
    fetch = FakeFetch()
    auth = remote(Clock(), fetch)
    forged = crafted({"alg": "HS256", "kid": "k1"}, claims(), hmac_key=pem(RSA_KEY))
    assert refused(auth, forged).reason == "token_algorithm_refused"
    assert fetch.count == 0


@pytest.mark.parametrize(
    ("m", "credential"),
    [
        pytest.param(jwks_method(jwk(EC_KEY, "e1")), token(kid="e1"), id="RS256 token, kid of an EC key"),
        pytest.param(jwks_method(jwk(EC_KEY, "e1")), token(), id="RS256 token without kid, only an EC key"),
        pytest.param(jwks_method(jwk(RSA_KEY, "r1", alg="PS256")), token(kid="r1"), id="JWK alg says PS256"),
        pytest.param(jwks_method(jwk(RSA_KEY, "r1", use="enc")), token(kid="r1"), id="JWK for encryption"),
        pytest.param(jwks_method(jwk(WEAK_RSA_KEY, "r1")), token(kid="r1"), id="1024-bit RSA JWK"),
        pytest.param(
            jwks_method(jwk(EC_P384_KEY, "e1"), algorithms=("ES256",)),
            token(EC_KEY, "ES256", kid="e1"),
            id="ES256 token, kid of a P-384 key",
        ),
        pytest.param(
            jwks_method({"kty": "oct", "kid": "h1", "k": _b64(SECRET).decode()}, algorithms=("HS256",)),
            token(SECRET, "HS256", kid="h1"),
            id="HMAC secret in a key set",
        ),
        pytest.param(
            jwks_method({"kty": "RSA", "kid": "r1", "n": "AQAB", "e": "not base64!"}),
            token(kid="r1"),
            id="a JWK that cannot be read",
        ),
        pytest.param(jwks_method(jwk(RSA_KEY, "r1")), token(kid="r9"), id="kid not in the set"),
    ],
)
def test_a_key_that_does_not_fit_the_algorithm_is_never_used(m: JwtMethod, credential: bytes) -> None:
    """A key is used only for the algorithm family it belongs to (RSA for RS*, EC of the right curve for ES*,
    never an "oct" key); a JWK whose alg or use says otherwise, or that is too weak or unreadable, is skipped:
    the token's key is unknown."""
    assert refused(authenticator(m), credential).reason == "unknown_key"


@pytest.mark.parametrize(
    ("leeway", "claim", "offset", "accepted"),
    [
        pytest.param(30.0, "exp", -10, True, id="expired 10 s ago, 30 s leeway"),
        pytest.param(0.0, "exp", -10, False, id="expired 10 s ago, no leeway"),
        pytest.param(30.0, "nbf", 10, True, id="valid in 10 s, 30 s leeway"),
        pytest.param(0.0, "nbf", 10, False, id="valid in 10 s, no leeway"),
    ],
)
def test_leeway_is_allowed_on_exp_and_nbf(leeway: float, claim: str, offset: int, accepted: bool) -> None:
    """A token expired or not yet valid by less than the leeway is accepted; without leeway it is not. (The
    times are taken when the test runs, not when the module was imported.)"""
    auth = authenticator(method(leeway=leeway))
    changes = {claim: int(time.time()) + offset}
    if accepted:
        assert verified(auth, token(**changes)).consumer == "svc-reports"
    else:
        assert refused(auth, token(**changes)).reason in ("token_expired", "token_not_yet_valid")


def test_a_configured_key_pyjwt_cannot_use_is_auth_unavailable_not_the_clients_fault() -> None:
    """A secret PyJWT refuses to use as an HMAC key (it looks like a PEM public key) makes the method unable to
    decide: 503, never a 401 blaming the token, and never an uncaught error."""
    secret = pem(RSA_KEY)
    auth = authenticator(method(algorithms=("HS256",), secret=secret))
    with pytest.raises(AuthUnavailable) as caught:
        auth.verify(crafted({"alg": "HS256"}, claims(), hmac_key=secret), REQUEST)
    assert caught.value.reason == "jwt_key_unusable"


def test_a_token_without_exp_is_accepted_when_exp_is_not_required() -> None:
    assert verified(authenticator(method(require_exp=False)), token(exp=None)).consumer == "svc-reports"


# === the identity ================================================================================================


@pytest.mark.parametrize(
    "consumer",
    [
        pytest.param(42, id="a number"),
        pytest.param("", id="empty"),
        pytest.param("svc reports", id="a space"),
        pytest.param("x" * 257, id="257 characters"),
        pytest.param("café", id="non-ASCII"),
        pytest.param(["svc"], id="a list"),
    ],
)
def test_a_consumer_claim_that_is_not_a_visible_ascii_name_is_a_missing_claim(consumer: object) -> None:
    failure = refused(authenticator(method(consumer_claim="client_id")), token(client_id=consumer))
    assert failure.reason == "missing_claim"
    assert failure.detail == "the token lacks a usable client_id claim"


def test_the_consumer_comes_from_the_configured_claim_of_up_to_256_characters() -> None:
    identity = verified(authenticator(method(consumer_claim="client_id")), token(client_id="c" * 256, sub=None))
    assert identity.consumer == "c" * 256


def test_a_missing_consumer_claim_is_a_missing_claim() -> None:
    failure = refused(authenticator(method(consumer_claim="client_id")), token())
    assert (failure.reason, failure.detail) == ("missing_claim", "the token lacks the client_id claim")


@pytest.mark.parametrize(
    ("changes", "scopes"),
    [
        pytest.param({"scope": "a b  c"}, {"a", "b", "c"}, id="scope, space-separated"),
        pytest.param({"scope": None, "scp": ["a", "b"]}, {"a", "b"}, id="scp, a list"),
        pytest.param({"scope": None, "scp": "a"}, {"a"}, id="scp, a string"),
        pytest.param({"scope": "a b", "scp": ["b", "c"]}, {"a", "b", "c"}, id="both, merged"),
        pytest.param({"scope": None, "scp": ["a", 3, "b c", "", None, "d"]}, {"a", "d"}, id="non-scopes dropped"),
        pytest.param({"scope": 7}, set(), id="scope not a string"),
        pytest.param({"scope": None}, set(), id="none"),
    ],
)
def test_scopes_are_the_union_of_scope_and_scp(changes: dict[str, Any], scopes: set[str]) -> None:
    assert verified(authenticator(), token(**changes)).scopes == scopes


def test_only_the_configured_scope_claims_give_scopes() -> None:
    auth = authenticator(method(scope_claims=("roles",)))
    assert verified(auth, token(scope="a", roles=["r1", "r2"])).scopes == {"r1", "r2"}


def test_claim_headers_carry_scalar_claims_and_lists_of_them_as_text() -> None:
    """Each configured (header, claim) whose claim is a string, number, boolean or a list of them is sent as
    text; a claim that is absent, an object, or holds what a header cannot carry (control characters, DEL,
    non-ASCII, over 1024 characters) is left out."""
    pairs = {
        b"X-Tenant": ("tenant", "acme"),
        b"X-Groups": ("groups", ["a", "b", 3, True]),
        b"X-Admin": ("admin", False),
        b"X-Level": ("level", 3),
        b"X-Ratio": ("ratio", 0.5),
        b"X-Exactly-1024": ("exactly", "y" * 1024),
        b"X-Missing": ("missing", None),
        b"X-Object": ("object", {"a": 1}),
        b"X-Mixed": ("mixed", ["a", {"b": 1}]),
        b"X-Newline": ("newline", "a\nb"),
        b"X-Del": ("del", "a\x7fb"),
        b"X-Unicode": ("unicode", "café"),
        b"X-Long": ("long", "x" * 1025),
    }
    auth = authenticator(method(claim_headers=tuple((header, claim) for header, (claim, _) in pairs.items())))
    identity = verified(auth, token(**{claim: value for claim, value in pairs.values()}))
    assert identity.headers == (
        (b"X-Tenant", b"acme"),
        (b"X-Groups", b"a,b,3,true"),
        (b"X-Admin", b"false"),
        (b"X-Level", b"3"),
        (b"X-Ratio", b"0.5"),
        (b"X-Exactly-1024", b"y" * 1024),
    )


def test_upstream_headers_are_the_claim_headers_lower_cased() -> None:
    auth = authenticator(method(claim_headers=((b"X-Tenant", "tenant"), (b"x-groups", "groups"))))
    assert auth.upstream_headers() == {b"x-tenant", b"x-groups"}
    assert authenticator().upstream_headers() == frozenset()


def test_challenge_invites_a_bearer_token_and_says_what_was_wrong() -> None:
    auth = authenticator()
    assert auth.challenge(None) == b'Bearer realm="api"'
    failure = refused(auth, token(exp=_NOW - 100))
    assert auth.challenge(failure) == (
        b'Bearer realm="api", error="invalid_token", error_description="the token has expired"'
    )
    assert auth.challenge(AuthFailure("other", "no bearer error")) == b'Bearer realm="api"'


# === the verified-token cache ====================================================================================


def test_a_verified_token_is_answered_from_the_cache_with_the_same_identity() -> None:
    """The second verification of a token returns the identical Identity object, at once: it was not verified
    again (and the gatekeeper's per-identity header cache keeps working)."""
    auth = authenticator()
    t = token()
    first = verified(auth, t)
    assert verified(auth, t) is first
    assert auth.credential(bearer(b"Bearer " + t)) == t


def test_a_token_too_big_to_hold_is_verified_every_time() -> None:
    """A token over 4 KiB is admitted but not remembered, so the cache never holds more than its size bound
    times 4 KiB."""
    auth = authenticator()
    big = token(padding="x" * 5000)
    first = verified(auth, big)
    second = verified(auth, big)
    assert second == first and second is not first


def test_a_cached_token_is_verified_again_once_it_expires() -> None:
    """An entry lasts until the token's exp (by the clock): 90 s later it is still there, past exp it is not,
    and the token is verified again (PyJWT, on the wall clock, still takes it)."""
    clock = Clock()
    auth = authenticator(clock=clock)
    t = token(exp=int(time.time()) + 100)
    first = verified(auth, t)
    clock.advance(90)
    assert verified(auth, t) is first
    clock.advance(11)
    again = verified(auth, t)
    assert again is not first and again == first


def test_a_cached_token_is_verified_again_after_five_minutes_at_most() -> None:
    clock = Clock()
    auth = authenticator(clock=clock)
    t = token(exp=int(time.time()) + 3600)
    first = verified(auth, t)
    clock.advance(299)
    assert verified(auth, t) is first
    clock.advance(2)
    assert verified(auth, t) is not first


def test_a_token_without_exp_is_cached_for_five_minutes() -> None:
    clock = Clock()
    auth = authenticator(method(require_exp=False), clock=clock)
    t = token(exp=None)
    first = verified(auth, t)
    clock.advance(299)
    assert verified(auth, t) is first
    clock.advance(2)
    assert verified(auth, t) is not first


def test_a_token_admitted_only_within_the_leeway_is_not_cached() -> None:
    """Past its exp but within the leeway, a token is admitted, but verified again on every use."""
    auth = authenticator()
    t = token(exp=int(time.time()) - 5)
    first = verified(auth, t)
    assert verified(auth, t) is not first


def test_the_cache_holds_at_most_cache_size_tokens_dropping_the_oldest() -> None:
    auth = authenticator(method(cache_size=2))
    a, b, c = (token(jti=name) for name in "abc")
    first_a, first_b = verified(auth, a), verified(auth, b)
    assert verified(auth, a) is first_a
    first_c = verified(auth, c)  # a was verified first: it goes
    assert verified(auth, b) is first_b
    assert verified(auth, c) is first_c
    assert verified(auth, a) is not first_a


def test_a_token_is_cheap_to_verify_only_while_remembered() -> None:
    """Only a token verified and still remembered is cheap to verify (the gatekeeper then asks its budgets after
    the check, with its subject's limits): not before, not past its exp, not a token too big to hold, not a
    malformed credential."""
    clock = Clock()
    auth = authenticator(clock=clock)
    t = token(exp=int(time.time()) + 100)
    assert not auth.verifies_cheaply(t)
    first = verified(auth, t)
    assert auth.verifies_cheaply(t)
    assert verified(auth, t) is first  # at once, from memory, as said
    big = token(padding="x" * 5000)
    verified(auth, big)
    assert not auth.verifies_cheaply(big)
    assert not auth.verifies_cheaply(MALFORMED)
    clock.advance(101)
    assert not auth.verifies_cheaply(t)


def test_a_refused_token_is_not_cached() -> None:
    """A token refused for an unknown key is verified once the key set has its key (only successes are kept)."""
    clock, fetch = Clock(), FakeFetch()
    auth = remote(clock, fetch, jwks_refresh_interval=10.0)
    first = auth.verify(token(kid="k1"), REQUEST)
    fetch.answer(jwk(RSA_KEY, "k1"))
    _sync.successResultOf(first)
    t = token(RSA_KEY_2, kid="k2")
    assert refused(auth, t).reason == "unknown_key"
    clock.advance(10)
    pending = auth.verify(t, REQUEST)
    fetch.answer(jwk(RSA_KEY, "k1"), jwk(RSA_KEY_2, "k2"))
    assert _sync.successResultOf(pending).consumer == "svc-reports"


# === the JWKS URL ================================================================================================


def test_first_use_fetches_the_key_set_once_for_all_waiting_verifications(jwks_log: list[LogEvent]) -> None:
    """The first verifications wait for one fetch of the URL (bounded by jwks_fetch_timeout); once it is in,
    tokens of a known kid are answered at once. The fetch is logged with the URL and the number of keys."""
    fetch = FakeFetch()
    auth = remote(Clock(), fetch, jwks_fetch_timeout=2.5)
    one, two = auth.verify(token(kid="k1"), REQUEST), auth.verify(token(kid="k1", sub="svc-two"), REQUEST)
    assert isinstance(one, Deferred) and isinstance(two, Deferred)
    _sync.assertNoResult(one)
    assert [(url, timeout) for url, timeout, _ in fetch.calls] == [(JWKS_URL, 2.5)]
    fetch.answer(jwk(RSA_KEY, "k1"), jwk(EC_KEY, "e1"))
    assert _sync.successResultOf(one).consumer == "svc-reports"
    assert _sync.successResultOf(two).consumer == "svc-two"
    assert verified(auth, token(kid="k1", sub="svc-three")).consumer == "svc-three"
    assert fetch.count == 1
    [event] = [e for e in jwks_log if e["log_level"] == LogLevel.info]
    assert (event["url"], event["count"]) == (JWKS_URL, 2)


def test_an_unknown_kid_refetches_at_most_once_per_refresh_interval() -> None:
    """A token of an unknown kid makes the method fetch again, but not before jwks_refresh_interval has passed
    since the last fetch: two made-up kids within the interval cost one fetch, and are refused at once."""
    clock, fetch = Clock(), FakeFetch()
    auth = remote(clock, fetch, jwks_refresh_interval=60.0)
    first = auth.verify(token(kid="k1"), REQUEST)
    fetch.answer(jwk(RSA_KEY, "k1"))
    _sync.successResultOf(first)

    clock.advance(59)
    assert refused(auth, token(kid="made-up-1")).reason == "unknown_key"
    assert fetch.count == 1

    clock.advance(1)
    one, two = auth.verify(token(kid="made-up-2"), REQUEST), auth.verify(token(kid="made-up-3"), REQUEST)
    assert fetch.count == 2  # the second joined the first one's fetch
    fetch.answer(jwk(RSA_KEY, "k1"))
    assert _sync.failureResultOf(one, AuthFailure).value.reason == "unknown_key"
    assert _sync.failureResultOf(two, AuthFailure).value.reason == "unknown_key"
    assert refused(auth, token(kid="made-up-4")).reason == "unknown_key"
    assert fetch.count == 2


def test_a_rotated_key_is_found_by_refetching() -> None:
    clock, fetch = Clock(), FakeFetch()
    auth = remote(clock, fetch, jwks_refresh_interval=60.0)
    first = auth.verify(token(kid="k1"), REQUEST)
    fetch.answer(jwk(RSA_KEY, "k1"))
    _sync.successResultOf(first)
    clock.advance(60)
    pending = auth.verify(token(RSA_KEY_2, kid="k2"), REQUEST)
    fetch.answer(jwk(RSA_KEY_2, "k2"))
    assert _sync.successResultOf(pending).consumer == "svc-reports"


def test_keys_older_than_max_age_are_refetched_in_the_background() -> None:
    """Once the keys are jwks_max_age old, the next verification starts a fetch but is answered at once with
    the old keys; the new set replaces them when it arrives."""
    clock, fetch = Clock(), FakeFetch()
    auth = remote(clock, fetch, jwks_max_age=3600.0, jwks_refresh_interval=60.0)
    first = auth.verify(token(kid="k1"), REQUEST)
    fetch.answer(jwk(RSA_KEY, "k1"))
    _sync.successResultOf(first)

    clock.advance(3599)
    verified(auth, token(kid="k1", sub="a"))
    assert fetch.count == 1
    clock.advance(1)
    assert verified(auth, token(kid="k1", sub="b")).consumer == "b"
    assert fetch.count == 2
    assert verified(auth, token(kid="k1", sub="c")).consumer == "c"  # old keys, while the fetch is under way
    assert fetch.count == 2
    fetch.answer(jwk(RSA_KEY_2, "k2"))  # k1 was rotated out
    assert verified(auth, token(RSA_KEY_2, kid="k2")).consumer == "svc-reports"
    assert refused(auth, token(kid="k1", sub="d")).reason == "unknown_key"


def test_a_failed_fetch_keeps_the_keys_fetched_before(jwks_log: list[LogEvent]) -> None:
    """When the endpoint fails after a first success, the stale keys stay in use and a warning says so; the
    next attempt waits for the refresh interval."""
    clock, fetch = Clock(), FakeFetch()
    auth = remote(clock, fetch, jwks_max_age=3600.0, jwks_refresh_interval=60.0)
    first = auth.verify(token(kid="k1"), REQUEST)
    fetch.answer(jwk(RSA_KEY, "k1"))
    _sync.successResultOf(first)

    clock.advance(3600)
    verified(auth, token(kid="k1", sub="a"))
    fetch.fail()
    assert verified(auth, token(kid="k1", sub="b")).consumer == "b"
    clock.advance(59)
    verified(auth, token(kid="k1", sub="c"))
    assert fetch.count == 2
    clock.advance(1)
    verified(auth, token(kid="k1", sub="d"))
    assert fetch.count == 3
    [warning] = [e for e in jwks_log if e["log_level"] == LogLevel.warn]
    assert warning["url"] == JWKS_URL
    assert "the keys fetched before stay in use" in formatEvent(warning)


@pytest.mark.parametrize("keys", [[], [{"kty": "oct", "k": "c2VjcmV0", "kid": "k1"}]], ids=["empty", "no-signing-key"])
def test_a_refetch_without_a_signing_key_keeps_the_keys_fetched_before(
    jwks_log: list[LogEvent], keys: list[dict[str, Any]]
) -> None:
    """A refetch that answers a set with no key that could verify a signature (empty, or only an HMAC secret) is
    taken as a broken endpoint: the keys fetched before stay in use, and a warning says so."""
    clock, fetch = Clock(), FakeFetch()
    auth = remote(clock, fetch, jwks_max_age=3600.0)
    first = auth.verify(token(kid="k1"), REQUEST)
    fetch.answer(jwk(RSA_KEY, "k1"))
    _sync.successResultOf(first)
    clock.advance(3600)
    verified(auth, token(kid="k1", sub="a"))  # old enough: a background refetch starts
    fetch.answer(*keys)
    assert verified(auth, token(kid="k1", sub="b")).consumer == "b"
    [warning] = [e for e in jwks_log if e["log_level"] == LogLevel.warn]
    assert "no signing key" in formatEvent(warning)


def test_no_keys_ever_fetched_is_auth_unavailable_until_a_fetch_succeeds() -> None:
    """When the first fetch fails, the waiting verification is answered 503 (AuthUnavailable: not the client's
    fault), as is every verification until the refresh interval allows another attempt, which may succeed."""
    clock, fetch = Clock(), FakeFetch()
    auth = remote(clock, fetch, jwks_refresh_interval=60.0)
    t = token(kid="k1")
    pending = auth.verify(t, REQUEST)
    fetch.fail()
    unavailable = _sync.failureResultOf(pending, AuthUnavailable).value
    assert (unavailable.status, unavailable.reason) == (503, "jwks_unavailable")
    assert unavailable.detail == "the token's keys could not be fetched"

    clock.advance(59)
    with pytest.raises(AuthUnavailable):
        auth.verify(t, REQUEST)
    assert fetch.count == 1

    clock.advance(1)
    pending = auth.verify(t, REQUEST)
    fetch.answer(jwk(RSA_KEY, "k1"))
    assert _sync.successResultOf(pending).consumer == "svc-reports"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"<html>not found</html>", id="not JSON"),
        pytest.param(b'{"keys": {}}', id="keys not an array"),
        pytest.param(b"[" * 100_000, id="nested too deep"),
        pytest.param(b"\xff\xfe", id="not UTF-8"),
    ],
)
def test_a_body_that_is_not_a_key_set_is_a_failed_fetch(body: bytes, jwks_log: list[LogEvent]) -> None:
    fetch = FakeFetch()
    pending = remote(Clock(), fetch).verify(token(kid="k1"), REQUEST)
    fetch.calls[-1][2].callback(body)
    _sync.failureResultOf(pending, AuthUnavailable)
    assert [e["log_level"] for e in jwks_log] == [LogLevel.warn]


def test_a_fetch_function_that_raises_is_a_failed_fetch() -> None:
    def broken(url: str, timeout: float) -> Deferred[bytes]:
        raise OSError("no route to host")

    pending = authenticator(method(jwks_url=JWKS_URL), fetch=broken).verify(token(kid="k1"), REQUEST)
    _sync.failureResultOf(pending, AuthUnavailable)


def test_cancelling_a_waiting_verification_leaves_the_fetch_to_the_others() -> None:
    """A client that leaves cancels its verification: that Deferred fails with CancelledError and is forgotten,
    while the shared fetch goes on for the other waiter (and for the next verifications)."""
    fetch = FakeFetch()
    auth = remote(Clock(), fetch)
    leaving, staying = auth.verify(token(kid="k1"), REQUEST), auth.verify(token(kid="k1", sub="b"), REQUEST)
    assert auth.keys.waiting == 2
    leaving.cancel()
    _sync.failureResultOf(leaving, CancelledError)
    assert auth.keys.waiting == 1
    assert not fetch.calls[0][2].called
    fetch.answer(jwk(RSA_KEY, "k1"))
    assert _sync.successResultOf(staying).consumer == "b"
    assert auth.keys.waiting == 0


def test_cancelling_the_only_waiting_verification_does_not_stop_the_fetch() -> None:
    fetch = FakeFetch()
    auth = remote(Clock(), fetch)
    leaving = auth.verify(token(kid="k1"), REQUEST)
    leaving.cancel()
    _sync.failureResultOf(leaving, CancelledError)
    assert auth.keys.waiting == 0 and not fetch.calls[0][2].called
    fetch.answer(jwk(RSA_KEY, "k1"))
    assert verified(auth, token(kid="k1")).consumer == "svc-reports"
    assert fetch.count == 1


def test_close_stops_the_fetch_under_way_and_starts_no_other(jwks_log: list[LogEvent]) -> None:
    """close() cancels the fetch (its waiters are answered, not left hanging), logs no failure for it, and no
    verification fetches afterwards; with an injected fetch there is no pool to close."""
    clock, fetch = Clock(), FakeFetch()
    auth = remote(clock, fetch, jwks_refresh_interval=0.0)
    pending = auth.verify(token(kid="k1"), REQUEST)
    assert auth.close() is None
    assert fetch.calls[0][2].called  # cancelled
    _sync.failureResultOf(pending, AuthUnavailable)
    with pytest.raises(AuthUnavailable):
        auth.verify(token(kid="k1"), REQUEST)
    assert fetch.count == 1
    assert jwks_log == []
    assert clock.getDelayedCalls() == []


def test_nothing_about_a_token_is_logged(jwks_log: list[LogEvent]) -> None:
    clock, fetch = Clock(), FakeFetch()
    auth = remote(clock, fetch, jwks_refresh_interval=0.0)
    t = token(kid="k1")
    pending = auth.verify(t, REQUEST)
    fetch.fail()
    _sync.failureResultOf(pending, AuthUnavailable)
    pending = auth.verify(t, REQUEST)
    fetch.answer(jwk(RSA_KEY, "k1"))
    _sync.successResultOf(pending)
    assert len(jwks_log) == 2
    for event in jwks_log:
        text = formatEvent(event) + repr(event)
        assert all(part.decode() not in text for part in t.split(b"."))


# === loopback: the default treq fetcher against a real JWKS endpoint =============================================


class JwksEndpoint(resource.Resource):
    """A JWKS endpoint: serves `keys` (or `body`) with `status`, counts the requests, can hold them unanswered
    or stream a body without a length."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        self.status = 200
        self.body: bytes | None = None
        self.chunked = False
        self.hold = False

    def render_GET(self, request: server.Request) -> bytes | int:
        self.fetches += 1
        if self.hold:
            return server.NOT_DONE_YET  # answered never: the fetch's timeout ends it
        request.setResponseCode(self.status)
        if self.status in (301, 302):
            request.setHeader(b"location", b"/elsewhere.json")
        request.setHeader(b"content-type", b"application/json")
        body = self.body if self.body is not None else json.dumps({"keys": self.keys}).encode()
        if not self.chunked:
            return body
        for start in range(0, len(body), 64 * 1024):
            request.write(body[start : start + 64 * 1024])
        request.finish()
        return server.NOT_DONE_YET


class Endpoint:
    """A running JwksEndpoint on 127.0.0.1."""

    def __init__(self) -> None:
        self.resource = JwksEndpoint()
        self.port = reactor.listenTCP(0, server.Site(self.resource), interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/.well-known/jwks.json"
        self.listening = True

    async def stop(self) -> None:
        if self.listening:
            self.listening = False
            await self.port.stopListening()


@pytest_twisted.async_yield_fixture()
async def endpoint() -> AsyncIterator[Endpoint]:
    running = Endpoint()
    yield running
    await running.stop()


@pytest.fixture
def loopback() -> Iterator[Callable[..., JwtAuthenticator]]:
    """Makes JWT methods whose default fetcher runs on the global reactor; closes them (their pools) after the
    test. Bookkeeping runs on `clock` when one is given, so a test can pass the refresh interval at once."""
    made: list[JwtAuthenticator] = []

    def make(url: str, clock: Any = None, **changes: Any) -> JwtAuthenticator:
        auth = JwtAuthenticator(method(jwks_url=url, **changes), clock=clock or reactor, reactor=reactor, realm="api")
        made.append(auth)
        return auth

    yield make
    for auth in made:
        closed = auth.close()
        assert closed is not None
        pytest_twisted.blockon(closed)


async def _result(d: Identity | Deferred[Identity]) -> Identity:
    assert isinstance(d, Deferred), "the first verification waits for the key set"
    return await d.addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_loopback_first_verification_fetches_the_key_set(
    endpoint: Endpoint, loopback: Callable[..., JwtAuthenticator]
) -> None:
    endpoint.resource.keys = [jwk(RSA_KEY, "k1")]
    auth = loopback(endpoint.url)
    identity = await _result(auth.verify(token(kid="k1"), REQUEST))
    assert identity.consumer == "svc-reports"
    assert verified(auth, token(kid="k1", sub="again")).consumer == "again"
    assert endpoint.resource.fetches == 1


@pytest_twisted.ensureDeferred
async def test_loopback_unknown_kid_refetches_after_the_refresh_interval(
    endpoint: Endpoint, loopback: Callable[..., JwtAuthenticator]
) -> None:
    """A new kid within the refresh interval is refused without a request; once the interval has passed (on
    the method's clock), it makes one more request and verifies."""
    clock = Clock()
    endpoint.resource.keys = [jwk(RSA_KEY, "k1")]
    auth = loopback(endpoint.url, clock=clock, jwks_refresh_interval=60.0)
    await _result(auth.verify(token(kid="k1"), REQUEST))
    endpoint.resource.keys = [jwk(RSA_KEY, "k1"), jwk(RSA_KEY_2, "k2")]
    assert refused(auth, token(RSA_KEY_2, kid="k2")).reason == "unknown_key"
    assert endpoint.resource.fetches == 1
    clock.advance(60)
    identity = await _result(auth.verify(token(RSA_KEY_2, kid="k2"), REQUEST))
    assert identity.consumer == "svc-reports"
    assert endpoint.resource.fetches == 2


@pytest_twisted.ensureDeferred
async def test_loopback_endpoint_down_and_nothing_fetched_is_503(
    endpoint: Endpoint, loopback: Callable[..., JwtAuthenticator]
) -> None:
    await endpoint.stop()
    auth = loopback(endpoint.url)
    with pytest.raises(AuthUnavailable) as caught:
        await _result(auth.verify(token(kid="k1"), REQUEST))
    assert caught.value.status == 503


@pytest.mark.parametrize("status", [500, 404, 302])
@pytest_twisted.ensureDeferred
async def test_loopback_an_answer_other_than_200_is_a_failed_fetch(
    status: int, endpoint: Endpoint, loopback: Callable[..., JwtAuthenticator]
) -> None:
    """A 500, a 404 and a redirect (never followed) are each one failed request: 503 with no keys."""
    endpoint.resource.keys = [jwk(RSA_KEY, "k1")]
    endpoint.resource.status = status
    auth = loopback(endpoint.url)
    with pytest.raises(AuthUnavailable):
        await _result(auth.verify(token(kid="k1"), REQUEST))
    assert endpoint.resource.fetches == 1


@pytest.mark.parametrize("chunked", [False, True], ids=["with a length", "chunked"])
@pytest_twisted.ensureDeferred
async def test_loopback_a_key_set_over_1_mib_is_a_failed_fetch(
    chunked: bool, endpoint: Endpoint, loopback: Callable[..., JwtAuthenticator]
) -> None:
    keys = json.dumps({"keys": [jwk(RSA_KEY, "k1")]}).encode()
    endpoint.resource.body = keys[:-1] + b', "padding": "' + b"x" * MAX_JWKS_BYTES + b'"}'
    endpoint.resource.chunked = chunked
    auth = loopback(endpoint.url)
    with pytest.raises(AuthUnavailable):
        await _result(auth.verify(token(kid="k1"), REQUEST))


@pytest_twisted.ensureDeferred
async def test_loopback_a_key_set_of_exactly_1_mib_is_taken(
    endpoint: Endpoint, loopback: Callable[..., JwtAuthenticator]
) -> None:
    keys = json.dumps({"keys": [jwk(RSA_KEY, "k1")]}).encode()
    head = keys[:-1] + b', "padding": "'
    endpoint.resource.body = head + b"x" * (MAX_JWKS_BYTES - len(head) - 2) + b'"}'
    assert len(endpoint.resource.body) == MAX_JWKS_BYTES
    endpoint.resource.chunked = True
    auth = loopback(endpoint.url)
    assert (await _result(auth.verify(token(kid="k1"), REQUEST))).consumer == "svc-reports"


@pytest_twisted.ensureDeferred
async def test_loopback_an_endpoint_that_never_answers_is_bounded_by_the_fetch_timeout(
    endpoint: Endpoint, loopback: Callable[..., JwtAuthenticator]
) -> None:
    """The request is held unanswered; after jwks_fetch_timeout (50 ms) the fetch gives up and drops its
    connection, and the verification is 503."""
    endpoint.resource.hold = True
    auth = loopback(endpoint.url, jwks_fetch_timeout=0.05)
    with pytest.raises(AuthUnavailable):
        await _result(auth.verify(token(kid="k1"), REQUEST))
    assert endpoint.resource.fetches == 1


def test_a_plain_http_jwks_url_is_warned_about(jwt_log: list[LogEvent]) -> None:
    """Keys fetched over plain http can be swapped by whoever sits on the path: the method says so when it is
    made; an https URL draws no warning."""
    authenticator(method(jwks_url="http://id.example.test/jwks.json"), clock=Clock(), fetch=FakeFetch())
    authenticator(method(jwks_url=JWKS_URL), clock=Clock(), fetch=FakeFetch())
    warnings = [e for e in jwt_log if e["log_level"] == LogLevel.warn]
    assert [e["url"] for e in warnings] == ["http://id.example.test/jwks.json"]


@pytest.fixture
def jwt_log() -> Iterator[list[LogEvent]]:
    """The events gateway.auth.jwt logs during the test."""
    with captured(in_namespace("gateway.auth.jwt")) as seen:
        yield seen
