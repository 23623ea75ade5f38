"""Tests for gateway.auth.gatekeeper: the order of the admission checks and the answers each refusal carries,
on a Clock (no reactor, no sockets)."""

from __future__ import annotations

import base64
from typing import Any

import bcrypt
import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from gateway.auth.apikeys import hash_key
from gateway.auth.authorisation import Allow
from gateway.auth.gatekeeper import Gatekeeper
from gateway.auth.identity import AuthFailure, AuthRequest, Identity
from gateway.auth.limits import MemoryLimitStore
from gateway.config import Config, parse
from gateway.errors import AuthServiceDenied, AuthUnavailable, Denied, Forbidden, TooManyRequests, Unauthorized
from tests.support.running import gateway_config

_sync = SynchronousTestCase()
KEY = "gwk_gatekeeper-key"


def config(route: dict[str, Any] | None = None, **sections: Any) -> Config:
    data = gateway_config("http://127.0.0.1:8081", route={"auth": ["keys"], **(route or {})}, **sections)
    data.setdefault("auth", {})["keys"] = {"type": "api_key"}
    data.setdefault("consumers", {}).setdefault("alice", {"api_keys": [hash_key(KEY)], "scopes": ["read"]})
    return parse(data, source="test.toml")


class Counting:
    """A method that admits `X-Test: <consumer>` (or refuses `X-Test: bad`), counting its verifications."""

    name = "test"

    def __init__(self, result: Any = None) -> None:
        self.verified = 0
        self.result = result

    def credential(self, headers: Headers) -> object | None:
        values = headers.getRawHeaders(b"x-test")
        return values[0].decode() if values else None

    def verify(self, credential: object, request: AuthRequest) -> Any:
        self.verified += 1
        if self.result is not None:
            return self.result
        if credential == "bad":
            raise AuthFailure("bad_test", "the test credential is bad")
        return Identity(consumer=str(credential), scopes=frozenset(), method=self.name)

    def challenge(self, failure: AuthFailure | None) -> bytes:
        return b"Test" if failure is None else b'Test error="bad"'

    def upstream_headers(self) -> frozenset[bytes]:
        return frozenset({b"x-test-claim"})

    def close(self) -> None:
        return None


def gatekeeper(cfg: Config, clock: Clock, *extra: Counting) -> tuple[Gatekeeper, MemoryLimitStore]:
    store = MemoryLimitStore(clock)
    base = Gatekeeper(cfg.admission, reactor=clock)._methods.by_name
    authenticators: dict[str, Any] = {**base, **{a.name: a for a in extra}}
    return Gatekeeper(cfg.admission, reactor=clock, store=store, authenticators=authenticators), store


def request(*headers: tuple[bytes, bytes], peer: str = "10.0.0.1") -> AuthRequest:
    h = Headers()
    for name, value in headers:
        h.addRawHeader(name, value)
    return AuthRequest(b"GET", b"/", h, peer, "rid")


def key(value: str = KEY) -> tuple[bytes, bytes]:
    return (b"X-API-Key", value.encode())


def test_anonymous_route_is_admitted_with_the_anonymous_identity() -> None:
    """An anonymous route admits without credentials; upstream it says so in the method header."""
    cfg = config(route={"auth": "anonymous"})
    keeper, _ = gatekeeper(cfg, Clock())
    verdict = keeper.check(cfg.routes[0].admission, request())
    assert isinstance(verdict, Allow)
    assert verdict.identity.consumer is None
    assert (b"X-Auth-Method", b"anonymous") in verdict.upstream_headers


def test_anonymous_rate_limit_is_per_client_address_with_ratelimit_headers() -> None:
    """Over the anonymous rate an address gets 429 with Retry-After and RateLimit-Policy / RateLimit; another
    address is not affected; after the interval the first is admitted again."""
    clock = Clock()
    cfg = config(route={"auth": "anonymous"}, admission={"rate_limits": {"anonymous": {"rate": "2/s"}}})
    keeper, _ = gatekeeper(cfg, clock)
    route = cfg.routes[0].admission
    assert isinstance(keeper.check(route, request()), Allow)
    assert isinstance(keeper.check(route, request()), Allow)
    refused = keeper.check(route, request())
    assert isinstance(refused, TooManyRequests)
    assert refused.status == 429 and refused.reason == "rate_limited_address"
    assert dict(refused.extra_headers()) == {
        b"Retry-After": b"1",
        b"RateLimit-Policy": b'"anonymous";q=2;w=1',
        b"RateLimit": b'"anonymous";r=0;t=1',
    }
    assert isinstance(keeper.check(route, request(peer="10.0.0.2")), Allow)
    clock.advance(0.5)
    assert isinstance(keeper.check(route, request()), Allow)


def test_missing_and_unaccepted_credentials_are_told_apart() -> None:
    """No credential at all is "missing_credentials"; an Authorization of a kind no method takes is
    "unaccepted_credentials"; both carry the route's challenges."""
    cfg = config()
    keeper, _ = gatekeeper(cfg, Clock())
    route = cfg.routes[0].admission
    missing = keeper.check(route, request())
    assert isinstance(missing, Unauthorized) and missing.reason == "missing_credentials"
    assert missing.extra_headers() == [(b"WWW-Authenticate", b'Bearer realm="gateway"')]
    other = keeper.check(route, request((b"Authorization", b"Digest abc")))
    assert isinstance(other, Unauthorized) and other.reason == "unaccepted_credentials"


def test_failed_authentications_lock_the_address_out_before_verifying() -> None:
    """After `failed_auth.burst` failures an address gets 429 without its credential being verified (a brute
    force costs nothing); other addresses still authenticate; the budget comes back at its rate. (A method that
    names no claimant, as this one, counts per address and method.)"""
    clock = Clock()
    cfg = config(
        route={"auth": ["test"]},
        auth={"test": {"type": "basic"}},
        admission={"rate_limits": {"failed_auth": {"rate": "3/m"}}},
    )
    counting = Counting()
    keeper, _ = gatekeeper(cfg, clock, counting)
    route = cfg.routes[0].admission
    for _ in range(3):
        assert isinstance(keeper.check(route, request((b"X-Test", b"bad"))), Unauthorized)
    locked = keeper.check(route, request((b"X-Test", b"alice")))
    assert isinstance(locked, TooManyRequests) and locked.reason == "too_many_failed_authentications"
    assert dict(locked.extra_headers())[b"Retry-After"] == b"20"
    assert counting.verified == 3
    assert isinstance(keeper.check(route, request((b"X-Test", b"alice"), peer="10.0.0.9")), Allow)
    clock.advance(20)
    assert isinstance(keeper.check(route, request((b"X-Test", b"alice"))), Allow)


def test_a_failure_is_401_with_the_failed_methods_challenge_first_in_its_scheme() -> None:
    """A refused credential gets 401 whose challenge for its own scheme carries the failure's error."""
    cfg = config(route={"auth": ["keys", "test"]}, auth={"test": {"type": "basic"}})
    keeper, _ = gatekeeper(cfg, Clock(), Counting())
    refused = keeper.check(cfg.routes[0].admission, request((b"Authorization", b"Bearer gwk_nope")))
    assert isinstance(refused, Unauthorized) and refused.reason == "invalid_key"
    assert refused.extra_headers() == [
        (
            b"WWW-Authenticate",
            b'Bearer realm="gateway", error="invalid_token", error_description="the API key is not valid"',
        ),
        (b"WWW-Authenticate", b"Test"),
    ]


def test_deferred_verification_goes_through_the_same_checks() -> None:
    """A verification that takes time ends in the same verdicts: scopes, limits, then Allow."""
    cfg = config(route={"auth": ["test"], "scopes_all": ["write"]}, auth={"test": {"type": "basic"}})
    pending: Deferred[Identity] = Deferred()
    keeper, _ = gatekeeper(cfg, Clock(), Counting(result=pending))
    verdict = keeper.check(cfg.routes[0].admission, request((b"X-Test", b"carol")))
    assert isinstance(verdict, Deferred)
    _sync.assertNoResult(verdict)
    pending.callback(Identity(consumer="carol", scopes=frozenset({"read"}), method="test"))
    result = _sync.successResultOf(verdict)
    assert isinstance(result, Forbidden) and result.consumer == "carol"
    assert "write" in result.detail


@pytest.mark.parametrize(
    ("outcome", "expected", "counted"),
    [
        (AuthFailure("x", "refused"), Unauthorized, True),
        (AuthServiceDenied(401, None, b"", []), AuthServiceDenied, True),
        (AuthServiceDenied(403, None, b"", []), AuthServiceDenied, False),
        (AuthUnavailable("down", reason="auth_service_unreachable"), AuthUnavailable, False),
    ],
    ids=["auth-failure", "service-401", "service-403", "unavailable"],
)
def test_deferred_refusals_and_which_count_as_failed_attempts(
    outcome: Exception, expected: type[Denied], counted: bool
) -> None:
    """A later refusal is the verdict; a 401 (ours or the auth service's) counts against the address, a 403 or an
    unavailable auth service does not (neither is a wrong credential)."""
    cfg = config(
        route={"auth": ["test"]},
        auth={"test": {"type": "basic"}},
        admission={"rate_limits": {"failed_auth": {"rate": "1/m"}}},
    )
    counting = Counting(result=fail(outcome))
    keeper, store = gatekeeper(cfg, Clock(), counting)
    verdict = _sync.successResultOf(keeper.check(cfg.routes[0].admission, request((b"X-Test", b"x"))))
    assert type(verdict) is expected
    ceiling = cfg.admission.rate_limits.failed_auth_per_address
    assert ceiling is not None
    assert store.peek("failed:10.0.0.1", ceiling).remaining == ceiling.burst - counted
    counting.result = None
    again = keeper.check(cfg.routes[0].admission, request((b"X-Test", b"x")))
    assert isinstance(again, TooManyRequests) is counted


def test_consumer_rate_limit_applies_across_requests_of_that_consumer() -> None:
    """A consumer over its own rate gets 429 naming the consumer policy; another consumer is not affected."""
    clock = Clock()
    cfg = config(
        route={"auth": ["keys"]},
        consumers={
            "alice": {"api_keys": [hash_key(KEY)], "rate_limit": {"rate": "1/s", "burst": 1}},
            "bob": {"api_keys": [hash_key("gwk_bob")]},
        },
    )
    keeper, _ = gatekeeper(cfg, clock)
    route = cfg.routes[0].admission
    assert isinstance(keeper.check(route, request(key())), Allow)
    refused = keeper.check(route, request(key()))
    assert isinstance(refused, TooManyRequests) and refused.consumer == "alice"
    assert dict(refused.extra_headers())[b"RateLimit-Policy"] == b'"consumer";q=1;w=1'
    assert isinstance(keeper.check(route, request(key("gwk_bob"))), Allow)


def test_concurrency_slot_is_given_back_once() -> None:
    """The slot of an admitted request comes back when `release` is called, however often it is called."""
    cfg = config(admission={"max_concurrent": 1})
    keeper, store = gatekeeper(cfg, Clock())
    route = cfg.routes[0].admission
    first = keeper.check(route, request(key()))
    assert isinstance(first, Allow) and first.release is not None
    assert isinstance(keeper.check(route, request(key())), TooManyRequests)
    first.release()
    first.release()
    assert store.held("in-flight:alice") == 0
    assert isinstance(keeper.check(route, request(key())), Allow)
    assert store.held("in-flight:alice") == 1


def test_identity_headers_cover_every_method_and_can_be_renamed_or_dropped() -> None:
    """Every header admission may set is in `identity_headers` (so a client's copy is removed); an empty name
    sets none."""
    cfg = config(
        route={"auth": ["test"]},
        auth={"test": {"type": "basic"}},
        admission={"identity_headers": {"consumer": "X-User", "scopes": "", "method": ""}},
    )
    keeper, _ = gatekeeper(cfg, Clock(), Counting())
    assert keeper.identity_headers == {b"X-User", b"X-Test-Claim"}
    verdict = keeper.check(cfg.routes[0].admission, request((b"X-Test", b"dave")))
    assert isinstance(verdict, Allow)
    assert list(verdict.upstream_headers) == [(b"X-User", b"dave")]


def test_a_token_subject_is_not_the_declared_consumer_of_the_same_name() -> None:
    """A JWT (or forward-auth) identity named "alice" does not take the declared alice's limits or slots: it is
    counted apart, under its method, so a partner's token cannot use up alice's concurrency."""
    cfg = config(
        route={"auth": ["keys", "test"]},
        auth={"test": {"type": "basic"}},
        consumers={"alice": {"api_keys": [hash_key(KEY)], "max_concurrent": 1}},
    )
    keeper, store = gatekeeper(cfg, Clock(), Counting())
    route = cfg.routes[0].admission
    token_alice = keeper.check(route, request((b"X-Test", b"alice")))
    assert isinstance(token_alice, Allow) and token_alice.release is None  # no cap of the declared alice
    keyed = keeper.check(route, request(key()))
    assert isinstance(keyed, Allow) and store.held("in-flight:alice") == 1


def test_a_rate_refusal_gives_its_concurrency_slot_back() -> None:
    """A request refused by the consumer's rate limit holds no concurrency slot afterwards, and one refused for
    concurrency spends no rate token."""
    clock = Clock()
    cfg = config(consumers={"alice": {"api_keys": [hash_key(KEY)], "rate_limit": {"rate": "1/m"}, "max_concurrent": 1}})
    keeper, store = gatekeeper(cfg, clock)
    route = cfg.routes[0].admission
    first = keeper.check(route, request(key()))
    assert isinstance(first, Allow)
    busy = keeper.check(route, request(key()))
    assert isinstance(busy, TooManyRequests) and busy.reason == "too_many_concurrent"
    assert first.release is not None
    first.release()
    clock.advance(60)  # one token back; the concurrency refusal above spent none
    again = keeper.check(route, request(key()))
    assert isinstance(again, Allow)
    assert again.release is not None
    again.release()
    over = keeper.check(route, request(key()))
    assert isinstance(over, TooManyRequests) and over.reason == "rate_limited_consumer"
    assert store.held("in-flight:alice") == 0


class Guessable(Counting):
    """A password-like method whose checks all wait (in `pending`) for the test."""

    guessable = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Deferred[Identity]] = []

    def verify(self, credential: object, request: AuthRequest) -> Any:
        self.verified += 1
        d: Deferred[Identity] = Deferred()
        self.pending.append(d)
        return d


def test_concurrent_password_guesses_count_against_the_budget_while_checked() -> None:
    """Distinct passwords being checked for one address count against its failed-auth budget: a burst of
    concurrent guesses is cut at the budget instead of all passing before the first failure is counted; the same
    password sent by many parallel requests counts once."""
    cfg = config(
        route={"auth": ["test"]},
        auth={"test": {"type": "basic"}},
        admission={"rate_limits": {"failed_auth": {"rate": "3/m"}}},
    )
    guessing = Guessable()
    keeper, _ = gatekeeper(cfg, Clock(), guessing)
    route = cfg.routes[0].admission
    for _ in range(5):
        assert isinstance(keeper.check(route, request((b"X-Test", b"same"))), Deferred)
    verdicts = [keeper.check(route, request((b"X-Test", b"guess-%d" % i))) for i in range(4)]
    assert [isinstance(v, Deferred) for v in verdicts] == [True, True, False, False]
    assert isinstance(verdicts[2], TooManyRequests) and verdicts[2].reason == "too_many_failed_authentications"
    assert guessing.verified == 5 + 2
    other = keeper.check(route, request((b"X-Test", b"x"), peer="10.0.0.2"))
    assert isinstance(other, Deferred)
    for d in guessing.pending:
        d.callback(Identity(consumer="c", scopes=frozenset(), method="test"))
    assert keeper._budgets.guessing == {}


def test_ipv6_clients_are_limited_by_their_64_bit_prefix() -> None:
    """Per-address limits count an IPv6 client by its /64: a client rotating addresses within it shares one
    budget; another /64 has its own."""
    cfg = config(route={"auth": "anonymous"}, admission={"rate_limits": {"anonymous": {"rate": "2/m"}}})
    keeper, _ = gatekeeper(cfg, Clock())
    route = cfg.routes[0].admission
    assert isinstance(keeper.check(route, request(peer="2001:db8:1:2::1")), Allow)
    assert isinstance(keeper.check(route, request(peer="2001:db8:1:2:ffff::9")), Allow)
    assert isinstance(keeper.check(route, request(peer="2001:db8:1:2::abcd")), TooManyRequests)
    assert isinstance(keeper.check(route, request(peer="2001:db8:1:3::1")), Allow)


# --- failed logins behind one address (a NAT): counted per claimant, with a ceiling per address ----------------

PASSWORD_HASH = bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4)).decode("ascii")
TOO_LONG = "x" * 73
"""A password bcrypt never checks: refused at once (a failure without a thread), so these tests need no pool."""


def basic(user: str, password: str = TOO_LONG) -> tuple[bytes, bytes]:
    return (b"Authorization", b"Basic " + base64.b64encode(f"{user}:{password}".encode()))


def basic_config(**rate_limits: Any) -> Config:
    return config(
        route={"auth": ["login"]},
        auth={"login": {"type": "basic"}},
        consumers={name: {"password": PASSWORD_HASH} for name in ("alice", "bob")},
        admission={"rate_limits": rate_limits},
    )


def test_one_user_failing_behind_a_nat_locks_out_only_that_user() -> None:
    """Basic failures count per address and user name: alice failing three times at an address is refused 429
    there (before her password is checked), while bob at the same address is still checked, and alice at
    another address too."""
    clock = Clock()
    cfg = basic_config(failed_auth={"rate": "3/m"})
    keeper, _ = gatekeeper(cfg, clock)
    route = cfg.routes[0].admission
    for _ in range(3):
        failed = keeper.check(route, request(basic("alice")))
        assert isinstance(failed, Unauthorized) and failed.reason == "invalid_password"
    locked = keeper.check(route, request(basic("alice")))
    assert isinstance(locked, TooManyRequests) and locked.reason == "too_many_failed_authentications"
    assert dict(locked.extra_headers())[b"RateLimit-Policy"] == b'"failed-auth";q=3;w=60'
    bob = keeper.check(route, request(basic("bob")))
    assert isinstance(bob, Unauthorized) and bob.reason == "invalid_password"  # checked, not refused
    elsewhere = keeper.check(route, request(basic("alice"), peer="10.0.0.2"))
    assert isinstance(elsewhere, Unauthorized)
    clock.advance(20)
    assert isinstance(keeper.check(route, request(basic("alice"))), Unauthorized)


def test_the_per_address_ceiling_locks_out_everyone_behind_the_address() -> None:
    """Failures of any user count against the address's ceiling too: once it is spent, every user at that
    address gets 429 (its own reason and policy), other addresses none; when both budgets are spent the answer
    names the one to wait longest for."""
    clock = Clock()
    cfg = basic_config(failed_auth={"rate": "2/m"}, failed_auth_per_address={"rate": "3/m"})
    keeper, _ = gatekeeper(cfg, clock)
    route = cfg.routes[0].admission
    for user in ("alice", "alice", "carol"):
        assert isinstance(keeper.check(route, request(basic(user))), Unauthorized)
    locked = keeper.check(route, request(basic("bob")))
    assert isinstance(locked, TooManyRequests) and locked.reason == "too_many_failed_authentications_address"
    assert dict(locked.extra_headers()) == {
        b"Retry-After": b"20",
        b"RateLimit-Policy": b'"failed-auth-address";q=3;w=60',
        b"RateLimit": b'"failed-auth-address";r=0;t=20',
    }
    assert isinstance(keeper.check(route, request(basic("bob"), peer="10.0.0.2")), Unauthorized)
    both = keeper.check(route, request(basic("alice")))
    assert isinstance(both, TooManyRequests) and both.reason == "too_many_failed_authentications"
    assert dict(both.extra_headers())[b"Retry-After"] == b"30"
    clock.advance(20)
    assert isinstance(keeper.check(route, request(basic("bob"))), Unauthorized)
    assert isinstance(keeper.check(route, request(basic("alice"))), TooManyRequests)


def test_the_default_ceiling_is_ten_times_failed_auth() -> None:
    """Without failed_auth_per_address, ten users behind one address may each fail failed_auth's burst; the
    eleventh is refused by the ceiling before it fails once."""
    cfg = basic_config(failed_auth={"rate": "2/m"})
    keeper, _ = gatekeeper(cfg, Clock())
    route = cfg.routes[0].admission
    for i in range(10):
        for _ in range(2):
            assert isinstance(keeper.check(route, request(basic(f"user{i}"))), Unauthorized)
    refused = keeper.check(route, request(basic("user10")))
    assert isinstance(refused, TooManyRequests) and refused.reason == "too_many_failed_authentications_address"


def test_the_ceiling_bounds_the_limit_keys_of_one_address() -> None:
    """A client trying a new user name on every request makes at most the ceiling's burst of keys in the limit
    store: past it every attempt is refused before it is counted. The keys hold no user name."""
    cfg = basic_config(failed_auth={"rate": "3/m"}, failed_auth_per_address={"rate": "5/m"})
    keeper, store = gatekeeper(cfg, Clock())
    route = cfg.routes[0].admission
    for i in range(100):
        keeper.check(route, request(basic(f"name{i}")))
    keys = [key for key in store._arrival if key.startswith("failed:10.0.0.1")]
    assert len(keys) == 5 + 1  # five claimants and the address
    assert not any("name" in key for key in keys)


def test_api_keys_count_by_their_first_characters() -> None:
    """API key failures count per address and key prefix (its first 8 characters): a client sending a revoked
    key is locked out alone; alice's key, with another prefix, is admitted from the same address; a key that
    shares the revoked one's prefix shares its budget. No key material is kept in the limit store."""
    cfg = config(admission={"rate_limits": {"failed_auth": {"rate": "2/m"}}})
    keeper, store = gatekeeper(cfg, Clock())
    route = cfg.routes[0].admission
    revoked = "gwk_REVOKED-key-of-someone-else"
    for _ in range(2):
        assert isinstance(keeper.check(route, request(key(revoked))), Unauthorized)
    locked = keeper.check(route, request(key(revoked)))
    assert isinstance(locked, TooManyRequests) and locked.reason == "too_many_failed_authentications"
    assert isinstance(keeper.check(route, request(key("gwk_REVOanother-key"))), TooManyRequests)
    assert isinstance(keeper.check(route, request(key())), Allow)
    assert isinstance(keeper.check(route, request(key("gwk_OTHER-wrong-key"))), Unauthorized)
    assert not any("gwk_" in k or "REVO" in k for k in store._arrival)


def _three_methods(**consumer_changes: Any) -> Config:
    consumers = {"alice": {"password": PASSWORD_HASH, "api_keys": [hash_key("gwk_alicekey")]}}
    consumers["alice"].update(consumer_changes)
    return parse(
        {
            **gateway_config("http://127.0.0.1:8081", route={"auth": ["keys", "login", "corp"]}),
            "auth": {
                "keys": {"type": "api_key"},
                "login": {"type": "basic"},
                "corp": {
                    "type": "jwt",
                    "issuer": "https://id.example.com/",
                    "audiences": ["gateway"],
                    "algorithms": ["RS256"],
                    "jwks_url": "https://id.example.com/jwks",
                },
            },
            "consumers": consumers,
        },
        source="test.toml",
    )


def test_what_each_method_claims() -> None:
    """Basic claims its user name, an API key its first 8 characters (never more than half the key), a JWT its
    signature; a malformed credential claims nothing (counted under the method)."""
    cfg = _three_methods()
    methods = Gatekeeper(cfg.admission, reactor=Clock())._methods.by_name
    keys, login, corp = methods["keys"], methods["login"], methods["corp"]

    def claimant(auth: Any, *headers: tuple[bytes, bytes]) -> bytes | None:
        return auth.claimant(auth.credential(request(*headers).headers))

    assert claimant(keys, key("gwk_abcdefghijklmnop")) == b"api_key\0gwk_abcd"
    assert claimant(keys, key("abcdef")) == b"api_key\0abc"
    assert claimant(keys, (b"X-API-Key", b"a"), (b"X-API-Key", b"b")) is None
    assert claimant(login, basic("alice", "pw")) == b"basic\0alice"
    assert claimant(login, (b"Authorization", b"Basic !!!")) is None
    token = b"eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJodHRwczovL2lkLmV4YW1wbGUuY29tLyJ9.c2lnbmF0dXJl"
    assert claimant(corp, (b"Authorization", b"Bearer " + token)) == b"jwt\0c2lnbmF0dXJl"


class GuessableUsers(Guessable):
    """A password-like method whose credentials are "user:password", claiming the user."""

    def claimant(self, credential: object) -> bytes:
        return str(credential).partition(":")[0].encode()


def test_concurrent_guesses_count_against_the_user_and_the_address() -> None:
    """Passwords being checked count against their user's budget (alice's guesses are cut at 3) and against the
    address's ceiling (bob's at 5 for the address), so concurrent guesses overtake neither."""
    cfg = config(
        route={"auth": ["test"]},
        auth={"test": {"type": "basic"}},
        admission={"rate_limits": {"failed_auth": {"rate": "3/m"}, "failed_auth_per_address": {"rate": "5/m"}}},
    )
    guessing = GuessableUsers()
    keeper, _ = gatekeeper(cfg, Clock(), guessing)
    route = cfg.routes[0].admission
    alice = [keeper.check(route, request((b"X-Test", b"alice:%d" % i))) for i in range(4)]
    assert [isinstance(v, Deferred) for v in alice] == [True, True, True, False]
    assert isinstance(alice[3], TooManyRequests) and alice[3].reason == "too_many_failed_authentications"
    bob = [keeper.check(route, request((b"X-Test", b"bob:%d" % i))) for i in range(3)]
    assert [isinstance(v, Deferred) for v in bob] == [True, True, False]
    assert isinstance(bob[2], TooManyRequests) and bob[2].reason == "too_many_failed_authentications_address"
    assert isinstance(keeper.check(route, request((b"X-Test", b"bob:0"))), Deferred)  # the same guess: counted once
    for d in guessing.pending:
        d.errback(AuthFailure("bad_test", "wrong"))
    assert keeper._budgets.guessing == {}
    assert isinstance(keeper.check(route, request((b"X-Test", b"carol:1"))), TooManyRequests)  # 5 failures counted


# --- a reload keeps the methods whose settings did not change -----------------------------------------------


def test_a_reload_keeps_the_methods_whose_settings_did_not_change() -> None:
    """A reload's gatekeeper takes over each method built from the same settings (and, for methods that look up
    consumers, the same consumers), caches and connections with it: a JWKS is not fetched again, verified
    passwords stay verified. Closing the old gatekeeper then leaves what it handed on alone."""
    clock = Clock()
    old = Gatekeeper(_three_methods().admission, reactor=clock)
    same = Gatekeeper(_three_methods().admission, reactor=clock, previous=old)
    assert all(same._methods.by_name[name] is old._methods.by_name[name] for name in ("keys", "login", "corp"))
    # A consumer's password changed: the methods that look consumers up are new; the JWT method is kept.
    other = bcrypt.hashpw(b"other", bcrypt.gensalt(rounds=4)).decode("ascii")
    changed = Gatekeeper(_three_methods(password=other).admission, reactor=clock, previous=same)
    assert changed._methods.by_name["corp"] is same._methods.by_name["corp"]
    assert changed._methods.by_name["keys"] is not same._methods.by_name["keys"]
    assert changed._methods.by_name["login"] is not same._methods.by_name["login"]
    old.close()  # everything it had was handed on: nothing of it is closed
    assert not same._methods.by_name["login"]._closed
    same.close()  # its login method was not handed on (the consumers changed): closed; the kept ones are not
    assert same._methods.by_name["login"]._closed
    assert not changed._methods.by_name["login"]._closed
