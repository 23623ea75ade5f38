"""Tests for gateway.auth.basic: HTTP Basic against bcrypt hashes, checked on a thread pool of its own.

The checks that go to a thread run on the global reactor (pytest-twisted), with bcrypt's cheapest cost (4), so
they are fast; everything decided before a thread is needed is checked synchronously on a Clock.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from typing import Any

import bcrypt
import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from gateway.auth import basic as basic_module
from gateway.auth.basic import MAX_PASSWORD_BYTES, BasicAuthenticator
from gateway.auth.credentials import MALFORMED
from gateway.auth.identity import AuthFailure, AuthRequest, Identity
from gateway.auth.settings.model import BasicMethod, Consumer
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
    assert identity == Identity(
        "alice", frozenset({"read"}), "login", credential_headers=(b"authorization",), declared=True
    )
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


@pytest_twisted.ensureDeferred
async def test_a_login_is_cheap_to_verify_only_once_remembered(authenticator: BasicAuthenticator) -> None:
    """Only a login verified right and remembered is cheap to verify (the gatekeeper then asks its budgets after
    the check, with its consumer's limits); a new one, a wrong password, a user without a password and malformed
    credentials are not."""
    login = ("alice", PASSWORD)
    assert not authenticator.verifies_cheaply(login)
    checked = authenticator.verify(login, request(basic("alice", PASSWORD)))
    assert isinstance(checked, Deferred)  # bcrypt, on a thread
    await checked.addTimeout(10, reactor)
    assert authenticator.verifies_cheaply(login)
    assert isinstance(authenticator.verify(login, request(basic("alice", PASSWORD))), Identity)  # at once, as said
    assert not authenticator.verifies_cheaply(("alice", b"wrong"))
    assert not authenticator.verifies_cheaply(("bob", PASSWORD))
    assert not authenticator.verifies_cheaply(("mallory", PASSWORD))
    assert not authenticator.verifies_cheaply(MALFORMED)


def test_a_login_is_no_longer_cheap_to_verify_after_cache_ttl() -> None:
    """A remembered login is cheap to verify until cache_ttl has passed, then no longer (it is checked again)."""
    clock = Clock()
    auth = BasicAuthenticator(BasicMethod(name="login", cache_ttl=30), CONSUMERS, reactor=clock, realm="gw")
    stored = CONSUMERS["alice"].password_hash
    assert stored is not None
    auth._remember(auth._key("alice", PASSWORD, stored))
    clock.advance(29)
    assert auth.verifies_cheaply(("alice", PASSWORD))
    clock.advance(1)
    assert not auth.verifies_cheaply(("alice", PASSWORD))


class _Gate:
    """bcrypt.checkpw held in its thread until the test opens the gate, counting the checks that ran."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ran = 0
        self._real = bcrypt.checkpw

    def __call__(self, password: bytes, stored: bytes) -> bool:
        self.ran += 1
        self.event.wait(10)
        return self._real(password, stored)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Gate]:
    gate = _Gate()
    monkeypatch.setattr(basic_module.bcrypt, "checkpw", gate)
    yield gate
    gate.event.set()


def gated(**method: Any) -> BasicAuthenticator:
    return BasicAuthenticator(BasicMethod(name="login", **method), CONSUMERS, reactor=reactor, realm="gw")


async def _until(predicate: Callable[[], bool]) -> None:
    for _ in range(1000):
        if predicate():
            return
        await task.deferLater(reactor, 0.005, lambda: None)
    raise AssertionError("never happened")


@pytest_twisted.ensureDeferred
async def test_a_cancelled_check_counts_against_max_pending_until_its_thread_is_done(gate: _Gate) -> None:
    """A client that leaves cancels its wait, not the check: the check still holds its place under max_pending
    (so hanging up in a loop cannot queue bcrypt work without end) until its thread has finished it."""
    auth = gated(max_pending=1, threads=1)
    try:
        waiting = auth.verify(("alice", b"guess-1"), request(basic("alice", b"guess-1")))
        assert isinstance(waiting, Deferred)
        waiting.cancel()
        with pytest.raises(CancelledError):
            await waiting
        with pytest.raises(AuthUnavailable):
            auth.verify(("alice", b"guess-2"), request(basic("alice", b"guess-2")))
        gate.event.set()
        await _until(lambda: auth._pending == 0)
        again = auth.verify(("alice", PASSWORD), request(basic("alice", PASSWORD)))
        assert (await again.addTimeout(10, reactor)).consumer == "alice"  # type: ignore[union-attr]
    finally:
        gate.event.set()
        auth.close()


@pytest_twisted.ensureDeferred
async def test_the_same_credentials_in_parallel_cost_one_check(gate: _Gate) -> None:
    """Requests carrying the same user and password while its check is under way wait for that one check."""
    auth = gated(threads=2)
    try:
        waits = [auth.verify(("alice", PASSWORD), request(basic("alice", PASSWORD))) for _ in range(20)]
        assert auth._pending == 1
        gate.event.set()
        identities = [await w.addTimeout(10, reactor) for w in waits]  # type: ignore[union-attr]
        assert {i.consumer for i in identities} == {"alice"}
        assert gate.ran == 1
    finally:
        gate.event.set()
        auth.close()


@pytest_twisted.ensureDeferred
async def test_closing_skips_the_checks_still_queued(gate: _Gate) -> None:
    """Stopping waits for the checks under way only: those still queued are skipped (no bcrypt run for them),
    so a backlog of logins cannot hold the gateway's stop."""
    auth = gated(threads=1)
    waits = [auth.verify((f"user-{i}", b"pw"), request(basic(f"user-{i}", b"pw"))) for i in range(5)]
    for waiter in waits:
        waiter.addErrback(lambda _: None)  # refused, whenever their results arrive
    await _until(lambda: gate.ran == 1)  # the first is under way, the other four queued behind it
    threading.Timer(0.05, gate.event.set).start()  # it finishes while close() joins the thread
    auth.close()
    assert gate.ran == 1


def test_a_check_skipped_because_the_method_closed_is_no_verdict_on_the_password() -> None:
    """A check still queued when its method is closed (the gateway stops, or a reload retired it) is skipped
    and answered as unavailable (503), never as a wrong password (401, counted as a failed login)."""
    auth = BasicAuthenticator(BasicMethod(name="login"), CONSUMERS, reactor=Clock(), realm="gw")
    stored = CONSUMERS["alice"].password_hash
    assert stored is not None
    auth.close()
    with pytest.raises(AuthUnavailable) as info:
        auth._check(PASSWORD, stored)
    assert info.value.reason == "basic_closed"
