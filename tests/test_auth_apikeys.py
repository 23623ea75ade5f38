"""Tests for gateway.auth.apikeys: minting and hashing keys, and ApiKeyAuthenticator finding, verifying and
challenging for a key in the configured headers."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from gateway.auth.apikeys import ApiKeyAuthenticator, hash_key, mint_key
from gateway.auth.credentials import MALFORMED, looks_like_jwt
from gateway.auth.identity import AuthFailure, AuthRequest, Identity
from gateway.auth.settings.model import API_KEY_HASH, ApiKeyMethod, Consumer, KeyHeader

KEY = "gwk_alice-key"
OTHER_KEY = "gwk_bob-key"
BEARER = KeyHeader(b"authorization", b"bearer")
X_API_KEY = KeyHeader(b"x-api-key", None)
CONSUMERS = {
    "alice": Consumer(name="alice", scopes=frozenset({"read", "write"}), api_key_hashes=frozenset({hash_key(KEY)})),
    "bob": Consumer(name="bob", api_key_hashes=frozenset({hash_key(OTHER_KEY), hash_key("gwk_bob-old")})),
    "carol": Consumer(name="carol"),
}


def authenticator(*headers: KeyHeader, realm: str = "gateway") -> ApiKeyAuthenticator:
    method = ApiKeyMethod(name="keys", headers=headers) if headers else ApiKeyMethod(name="keys")
    return ApiKeyAuthenticator(method, CONSUMERS, realm=realm)


def headers(*pairs: tuple[bytes, bytes]) -> Headers:
    h = Headers()
    for name, value in pairs:
        h.addRawHeader(name, value)
    return h


def request(h: Headers) -> AuthRequest:
    return AuthRequest(b"GET", b"/api", h, "10.0.0.1", "rid")


def admit(auth: ApiKeyAuthenticator, *pairs: tuple[bytes, bytes]) -> Identity:
    """The identity the method proves for a request with these headers (the credential must be claimed)."""
    h = headers(*pairs)
    credential = auth.credential(h)
    assert credential is not None
    identity = auth.verify(credential, request(h))
    assert isinstance(identity, Identity)
    return identity


def refuse(auth: ApiKeyAuthenticator, *pairs: tuple[bytes, bytes]) -> AuthFailure:
    """The failure the method raises for a request with these headers (the credential must be claimed)."""
    h = headers(*pairs)
    credential = auth.credential(h)
    assert credential is not None
    with pytest.raises(AuthFailure) as info:
        auth.verify(credential, request(h))
    return info.value


# --- mint_key and hash_key -----------------------------------------------------------------------------------


def test_minted_key_format() -> None:
    """A minted key is "gwk_" and 43 base64url characters (256 bits), with no dot, so never JWT-shaped."""
    key = mint_key()
    assert re.fullmatch(r"gwk_[A-Za-z0-9_-]{43}", key)
    assert not looks_like_jwt(key.encode("ascii"))


def test_minted_keys_are_unique() -> None:
    """Keys minted one after another all differ."""
    keys = {mint_key() for _ in range(1000)}
    assert len(keys) == 1000


def test_minted_key_hash_is_accepted_by_the_config() -> None:
    """The hash of a minted key has the form the config stores."""
    assert API_KEY_HASH.fullmatch(hash_key(mint_key()))


@pytest.mark.parametrize("key", [KEY, "", "gwk_x", "a" * 512])
def test_hash_key_is_sha256(key: str) -> None:
    """hash_key is "sha256:" and the hex SHA-256 of the key, for str and bytes alike."""
    expected = "sha256:" + hashlib.sha256(key.encode("ascii")).hexdigest()
    assert hash_key(key) == expected
    assert hash_key(key.encode("ascii")) == expected


def test_hash_key_known_value() -> None:
    """hash_key of "test" is the well-known SHA-256 of "test"."""
    assert hash_key("test") == "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


@given(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64))
def test_hash_key_fits_the_config_pattern(key: str) -> None:
    """Any key's hash matches the config's `sha256:<64 hex>` pattern, and differs from the key."""
    digest = hash_key(key)
    assert API_KEY_HASH.fullmatch(digest)
    assert digest != key


# --- finding the credential ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pairs", "where", "key"),
    [
        ([(b"Authorization", b"Bearer " + KEY.encode())], BEARER, KEY.encode()),
        ([(b"Authorization", b"bearer " + KEY.encode())], BEARER, KEY.encode()),
        ([(b"Authorization", b"  BEARER   " + KEY.encode() + b"  ")], BEARER, KEY.encode()),
        ([(b"X-API-Key", KEY.encode())], X_API_KEY, KEY.encode()),
        ([(b"x-api-key", b" \t" + KEY.encode() + b"\t ")], X_API_KEY, KEY.encode()),
        ([(b"Authorization", b"Basic YTpi"), (b"X-API-Key", KEY.encode())], X_API_KEY, KEY.encode()),
        ([(b"Authorization", b"Bearer a.b.c"), (b"X-API-Key", KEY.encode())], X_API_KEY, KEY.encode()),
        ([(b"Authorization", b"Bearer " + KEY.encode()), (b"X-API-Key", b"other")], BEARER, KEY.encode()),
    ],
)
def test_credential_in_the_default_headers(pairs: list[tuple[bytes, bytes]], where: KeyHeader, key: bytes) -> None:
    """By default a key is read from "Authorization: Bearer", else from X-API-Key (the whole value, stripped)."""
    assert authenticator().credential(headers(*pairs)) == (where, key)


@pytest.mark.parametrize(
    "pairs",
    [
        [],
        [(b"Authorization", b"Basic YWxpY2U6c2VjcmV0")],
        [(b"Authorization", b"Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln")],
        [(b"Authorization", b"Bearer a.b.")],
        [(b"Authorization", b"Digest realm=x")],
        [(b"Authorization", b"(bad scheme")],
        [(b"Authorization", b"")],
        [(b"X-Other-Key", KEY.encode())],
    ],
)
def test_other_credentials_are_not_claimed(pairs: list[tuple[bytes, bytes]]) -> None:
    """No key header, another scheme (Basic), or a JWT-shaped bearer value: the method has no credential (None)."""
    assert authenticator().credential(headers(*pairs)) is None


def test_header_order_as_configured() -> None:
    """With the headers configured X-API-Key first, X-API-Key wins when both are present."""
    auth = authenticator(X_API_KEY, BEARER)
    both = headers((b"Authorization", b"Bearer " + OTHER_KEY.encode()), (b"X-API-Key", KEY.encode()))
    assert auth.credential(both) == (X_API_KEY, KEY.encode())
    only_bearer = headers((b"Authorization", b"Bearer " + OTHER_KEY.encode()))
    assert auth.credential(only_bearer) == (BEARER, OTHER_KEY.encode())


def test_first_present_header_wins_even_if_its_key_is_bad() -> None:
    """The first configured header present decides: a bad key there is refused, not replaced by a later header."""
    auth = authenticator()
    failure = refuse(auth, (b"Authorization", b"Bearer gwk_wrong"), (b"X-API-Key", KEY.encode()))
    assert failure.reason == "invalid_key"


def test_only_the_configured_headers_are_read() -> None:
    """A method configured with one header ignores the others."""
    auth = authenticator(KeyHeader(b"x-key", None))
    assert auth.credential(headers((b"X-API-Key", KEY.encode()))) is None
    assert auth.credential(headers((b"Authorization", b"Bearer " + KEY.encode()))) is None
    assert auth.credential(headers((b"X-Key", KEY.encode()))) == (KeyHeader(b"x-key", None), KEY.encode())


def test_custom_scheme() -> None:
    """A header configured with another scheme ("Authorization: ApiKey") reads only that scheme."""
    where = KeyHeader(b"authorization", b"apikey")
    auth = authenticator(where)
    assert auth.credential(headers((b"Authorization", b"ApiKey " + KEY.encode()))) == (where, KEY.encode())
    assert auth.credential(headers((b"Authorization", b"Bearer " + KEY.encode()))) is None


def test_two_values_of_a_key_header_are_malformed() -> None:
    """A key header sent twice is claimed as MALFORMED, whatever the values."""
    auth = authenticator()
    two = headers((b"X-API-Key", KEY.encode()), (b"X-API-Key", KEY.encode()))
    assert auth.credential(two) == (X_API_KEY, MALFORMED)
    two_auth = headers((b"Authorization", b"Bearer " + KEY.encode()), (b"Authorization", b"Bearer x"))
    assert auth.credential(two_auth) == (BEARER, MALFORMED)


# --- verifying it --------------------------------------------------------------------------------------------


def test_key_in_bearer_admits_its_consumer() -> None:
    """A valid key in Authorization: Bearer proves its consumer, with its scopes, and names that header as the
    credential to remove."""
    identity = admit(authenticator(), (b"Authorization", b"Bearer " + KEY.encode()))
    assert identity == Identity(
        consumer="alice",
        scopes=frozenset({"read", "write"}),
        method="keys",
        headers=(),
        credential_headers=(b"authorization",),
        declared=True,
    )


def test_key_in_x_api_key_admits_its_consumer() -> None:
    """A valid key in X-API-Key proves its consumer and names X-API-Key as the credential header."""
    identity = admit(authenticator(), (b"X-API-Key", KEY.encode()))
    assert identity == Identity(
        consumer="alice",
        scopes=frozenset({"read", "write"}),
        method="keys",
        credential_headers=(b"x-api-key",),
        declared=True,
    )


def test_every_key_of_a_consumer_works() -> None:
    """A consumer with several key hashes (rotation) is admitted by each key."""
    auth = authenticator()
    for key in (OTHER_KEY, "gwk_bob-old"):
        identity = admit(auth, (b"X-API-Key", key.encode()))
        assert (identity.consumer, identity.scopes) == ("bob", frozenset())


def test_identity_method_is_the_method_name() -> None:
    """The identity's method is the configured method's name."""
    auth = ApiKeyAuthenticator(ApiKeyMethod(name="partner-keys"), CONSUMERS, realm="gateway")
    assert auth.name == "partner-keys"
    assert admit(auth, (b"X-API-Key", KEY.encode())).method == "partner-keys"


@pytest.mark.parametrize(
    ("pairs", "bearer_error"),
    [
        ([(b"Authorization", b"Bearer gwk_unknown")], "invalid_token"),
        ([(b"X-API-Key", b"gwk_unknown")], None),
        ([(b"X-API-Key", hash_key(KEY).encode())], None),
        ([(b"X-API-Key", KEY.upper().encode())], None),
        ([(b"X-API-Key", KEY.encode() + b"x")], None),
    ],
)
def test_unknown_key_is_invalid(pairs: list[tuple[bytes, bytes]], bearer_error: str | None) -> None:
    """A key no consumer holds (its hash, another case, one character more) fails with "invalid_key"; as a
    bearer token, with RFC 6750's invalid_token."""
    failure = refuse(authenticator(), *pairs)
    assert failure.reason == "invalid_key"
    assert failure.detail == "the API key is not valid"
    assert failure.bearer_error == bearer_error


def test_failure_never_contains_the_key() -> None:
    """Neither the detail nor the message of a failure contains the key sent."""
    secret = "gwk_a-secret-nobody-holds"
    failure = refuse(authenticator(), (b"Authorization", b"Bearer " + secret.encode()))
    assert secret not in failure.detail
    assert secret not in str(failure)


@pytest.mark.parametrize(
    ("pairs", "bearer_error"),
    [
        ([(b"X-API-Key", KEY.encode()), (b"X-API-Key", KEY.encode())], None),
        (
            [(b"Authorization", b"Bearer " + KEY.encode()), (b"Authorization", b"Bearer " + KEY.encode())],
            "invalid_request",
        ),
        ([(b"X-API-Key", b"")], None),
        ([(b"X-API-Key", b"gwk_with space")], None),
        ([(b"X-API-Key", b"gwk_\x00nul")], None),
        ([(b"X-API-Key", b"gwk_\xff")], None),
        ([(b"X-API-Key", b"k" * 513)], None),
        ([(b"Authorization", b"Bearer")], "invalid_request"),
        ([(b"Authorization", b"Bearer two words")], "invalid_request"),
    ],
)
def test_malformed_key(pairs: list[tuple[bytes, bytes]], bearer_error: str | None) -> None:
    """Two key headers, an empty key, a key with spaces, control or non-ASCII bytes, or longer than 512 fail with
    "malformed_key"; as a bearer token, with invalid_request."""
    failure = refuse(authenticator(), *pairs)
    assert failure.reason == "malformed_key"
    assert failure.detail == "the API key header is malformed or sent more than once"
    assert failure.bearer_error == bearer_error


def test_longest_key_is_checked() -> None:
    """A key of 512 visible characters is looked up (and, held by no one, is invalid rather than malformed)."""
    assert refuse(authenticator(), (b"X-API-Key", b"k" * 512)).reason == "invalid_key"


def test_no_consumers() -> None:
    """With no consumers declared, every key is invalid."""
    auth = ApiKeyAuthenticator(ApiKeyMethod(name="keys"), {}, realm="gateway")
    h = headers((b"X-API-Key", KEY.encode()))
    with pytest.raises(AuthFailure) as info:
        auth.verify(auth.credential(h), request(h))
    assert info.value.reason == "invalid_key"


# --- challenges and the rest of the interface ----------------------------------------------------------------


def test_bearer_challenge() -> None:
    """With Authorization: Bearer first, the challenge is Bearer with the realm; with a failure, its RFC 6750
    error and description."""
    auth = authenticator(realm="reports")
    assert auth.challenge(None) == b'Bearer realm="reports"'
    invalid = refuse(auth, (b"Authorization", b"Bearer gwk_unknown"))
    assert auth.challenge(invalid) == (
        b'Bearer realm="reports", error="invalid_token", error_description="the API key is not valid"'
    )
    malformed = refuse(auth, (b"Authorization", b"Bearer"))
    assert auth.challenge(malformed) == (
        b'Bearer realm="reports", error="invalid_request", '
        b'error_description="the API key header is malformed or sent more than once"'
    )


def test_bearer_challenge_for_a_failure_without_bearer_error() -> None:
    """A failure of the X-API-Key header (no bearer error) gives the plain Bearer challenge."""
    auth = authenticator()
    failure = refuse(auth, (b"X-API-Key", b"gwk_unknown"))
    assert auth.challenge(failure) == b'Bearer realm="gateway"'


def test_x_api_key_challenge() -> None:
    """With X-API-Key first, the challenge is ApiKey naming the realm and the header, failure or not."""
    auth = authenticator(X_API_KEY, BEARER, realm="api")
    assert auth.challenge(None) == b'ApiKey realm="api", header="x-api-key"'
    failure = refuse(auth, (b"X-API-Key", b"gwk_unknown"))
    assert auth.challenge(failure) == b'ApiKey realm="api", header="x-api-key"'


def test_custom_scheme_challenge() -> None:
    """A header with another scheme challenges with that scheme, capitalised."""
    auth = authenticator(KeyHeader(b"authorization", b"apikey"))
    assert auth.challenge(None) == b'Apikey realm="gateway"'


def test_every_key_is_cheap_to_verify() -> None:
    """A key is one digest looked up, known or not, well-formed or not: always cheap to verify (the gatekeeper asks
    its budgets after the check, with its consumer's limits)."""
    auth = authenticator()
    for credential in ((X_API_KEY, KEY.encode()), (X_API_KEY, b"gwk_unknown"), (X_API_KEY, MALFORMED)):
        assert auth.verifies_cheaply(credential)


def test_sets_no_upstream_headers_and_holds_nothing() -> None:
    """The method sets no upstream header of its own and has nothing to release."""
    auth = authenticator()
    assert auth.upstream_headers() == frozenset()
    assert auth.close() is None
