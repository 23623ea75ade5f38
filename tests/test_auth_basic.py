"""Tests for gateway.auth.basic: HTTP Basic against bcrypt hashes, checked on a thread pool of its own.

The checks that go to a thread run on the global reactor (pytest-twisted), with bcrypt's cheapest cost (4), so
they are fast; everything decided before a thread is needed is checked synchronously on a Clock.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import bcrypt
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from gateway.auth.basic import MAX_PASSWORD_BYTES, BasicAuthenticator
from gateway.auth.credentials import MALFORMED
from gateway.auth.identity import AuthFailure, AuthRequest, Identity
from gateway.auth.settings import BasicMethod, Consumer
from gateway.errors import AuthUnavailable

PASSWORD = b"s3cret password"
CONSUMERS = {
    "alice": Consumer(
        name="alice", scopes=frozenset({"read"}), password_hash=bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4))
    ),
    "bob": Consumer(name="bob"),
}


def headers(value: bytes | None) -> Headers:
    h = Headers()
    if value is not None:
        h.setRawHeaders(b"authorization", [value])
    return h


def basic(user: str, password: bytes) -> bytes:
    return b"Basic " + base64.b64encode(user.encode() + b":" + password)


def request(value: bytes) -> AuthRequest:
    return AuthRequest(b"GET", b"/", headers(value), "10.0.0.1", "rid")


@pytest.fixture
def authenticator() -> Iterator[BasicAuthenticator]:
    auth = BasicAuthenticator(BasicMethod(name="login", cache_ttl=30), CONSUMERS, reactor=reactor, realm="gw")
    yield auth
    auth.close()


def test_credential_is_only_a_basic_authorization() -> None:
    """Only `Authorization: Basic` is this method's; a malformed one is still claimed (to be refused)."""
    auth = BasicAuthenticator(BasicMethod(name="login"), CONSUMERS, reactor=Clock(), realm="gw")
    assert auth.credential(headers(None)) is None
    assert auth.credential(headers(b"Bearer abc")) is None
    assert auth.credential(headers(basic("alice", PASSWORD))) == ("alice", PASSWORD)
    assert auth.credential(headers(b"Basic !!!")) is MALFORMED
    assert auth.challenge(None) == b'Basic realm="gw", charset="UTF-8"'


def test_a_password_longer_than_bcrypt_takes_is_refused_without_a_thread() -> None:
    """A password over 72 bytes (bcrypt's limit) can match no hash: refused at once, as a wrong one."""
    auth = BasicAuthenticator(BasicMethod(name="login"), CONSUMERS, reactor=Clock(), realm="gw")
    long = b"x" * (MAX_PASSWORD_BYTES + 1)
    with pytest.raises(AuthFailure) as info:
        auth.verify(("alice", long), request(basic("alice", long)))
    assert info.value.reason == "invalid_password"
    assert auth._pool is None  # no thread was started


def test_too_many_checks_waiting_is_503_at_once() -> None:
    """Beyond `max_pending` checks waiting for a thread, a login is answered 503 at once (never queued)."""
    auth = BasicAuthenticator(BasicMethod(name="login", max_pending=1), CONSUMERS, reactor=Clock(), realm="gw")
    auth._pending = 1
    with pytest.raises(AuthUnavailable) as info:
        auth.verify(("alice", PASSWORD), request(basic("alice", PASSWORD)))
    assert info.value.reason == "basic_saturated"


def test_malformed_credentials_are_refused() -> None:
    """Malformed Basic credentials are a 401 failure."""
    auth = BasicAuthenticator(BasicMethod(name="login"), CONSUMERS, reactor=Clock(), realm="gw")
    with pytest.raises(AuthFailure) as info:
        auth.verify(MALFORMED, request(b"Basic !!!"))
    assert info.value.reason == "malformed_credentials"


@pytest_twisted.ensureDeferred
async def test_correct_password_is_verified_in_a_thread_then_cached(authenticator: BasicAuthenticator) -> None:
    """The first check goes to a thread (a Deferred); the same credentials again are answered from the cache."""
    first = authenticator.verify(("alice", PASSWORD), request(basic("alice", PASSWORD)))
    assert isinstance(first, Deferred)
    identity = await first.addTimeout(10, reactor)
    assert identity == Identity("alice", frozenset({"read"}), "login", credential_headers=(b"authorization",))
    again = authenticator.verify(("alice", PASSWORD), request(basic("alice", PASSWORD)))
    assert again == identity  # synchronous: no thread, no Deferred


@pytest.mark.parametrize(
    ("user", "password"),
    [("alice", b"wrong"), ("mallory", PASSWORD), ("bob", PASSWORD)],
    ids=["wrong-password", "unknown-user", "user-without-password"],
)
@pytest_twisted.ensureDeferred
async def test_wrong_credentials_fail_after_a_check(
    authenticator: BasicAuthenticator, user: str, password: bytes
) -> None:
    """A wrong password, an unknown user and a user without a password all fail the same way, after a check
    (an unknown user is checked against a dummy hash, so timing does not tell which names exist); a failure is
    not cached."""
    checked = authenticator.verify((user, password), request(basic(user, password)))
    assert isinstance(checked, Deferred)
    with pytest.raises(AuthFailure) as info:
        await checked.addTimeout(10, reactor)
    assert info.value.reason == "invalid_password"
    assert isinstance(authenticator.verify((user, password), request(basic(user, password))), Deferred)
    with pytest.raises(AuthFailure):
        await authenticator.verify((user, password), request(basic(user, password))).addTimeout(10, reactor)


def test_a_cached_success_expires_after_cache_ttl() -> None:
    """A remembered success is used until cache_ttl has passed, then the password is checked again."""
    clock = Clock()
    auth = BasicAuthenticator(BasicMethod(name="login", cache_ttl=30), CONSUMERS, reactor=clock, realm="gw")
    key_entry = ("alice", PASSWORD)
    stored = CONSUMERS["alice"].password_hash
    assert stored is not None
    auth._remember(auth._key("alice", PASSWORD, stored))
    clock.advance(29)
    assert isinstance(auth.verify(key_entry, request(basic("alice", PASSWORD))), Identity)
    clock.advance(1)
    auth._pending = auth._method.max_pending  # a check is needed now: it is refused, showing it was asked for
    with pytest.raises(AuthUnavailable):
        auth.verify(key_entry, request(basic("alice", PASSWORD)))
