"""Tests for gateway.auth.shared_limits: the circuit on a Clock, and admission's checks against a real
redis-server: limits shared exactly by two gatekeepers (two processes), one round trip per check (a password or
a token the method remembers included), and both failure modes with Redis silent (SIGSTOP) or stopped mid-run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gateway.auth.authenticators import build_authenticator
from gateway.auth.authorisation import Allow, Verdict
from gateway.auth.gatekeeper import Gatekeeper
from gateway.auth.identity import Authenticator
from gateway.auth.shared_limits import Circuit, SharedLimits, connect_shared_limits
from gateway.config.store import LimitStoreSettings
from gateway.errors import Forbidden, LimitsUnavailable, TooManyRequests
from tests.support.logs import captured
from tests.support.redis import RedisServer
from tests.support.scrape import until
from tests.test_auth_gatekeeper import PASSWORD_HASH, TOO_LONG, basic, config, key, request
from tests.test_auth_jwt import AUDIENCE, ISSUER, SECRET, claims

_sync = SynchronousTestCase()


# --- the circuit ----------------------------------------------------------------------------------------------


def test_circuit_opens_after_failures_in_a_row_and_logs() -> None:
    """Failures in a row open it (a success between resets the count); it is logged once."""
    clock = Clock()
    circuit = Circuit(clock, failures=3, open_for=5.0)
    with captured(lambda e: "circuit" in e.get("log_format", "")) as seen:
        circuit.failed("timeout")
        circuit.failed("timeout")
        circuit.succeeded()
        circuit.failed("timeout")
        circuit.failed("timeout")
        assert circuit.allow() and not circuit.is_open
        circuit.failed("timeout")
        assert circuit.is_open and not circuit.allow()
    assert len(seen) == 1 and "opened" in seen[0]["log_format"]


def test_circuit_half_open_lets_one_through() -> None:
    """After `open_for`, exactly one check is let through; its failure opens the circuit again for `open_for`,
    its success closes it (logged)."""
    clock = Clock()
    circuit = Circuit(clock, failures=1, open_for=4.0)
    circuit.failed("unavailable")
    clock.advance(3.75)
    assert not circuit.allow()
    clock.advance(0.25)
    assert circuit.allow()
    assert not circuit.allow()  # one at a time
    circuit.failed("unavailable")
    clock.advance(3.75)
    assert not circuit.allow()
    clock.advance(0.25)
    assert circuit.allow()
    with captured(lambda e: "circuit" in e.get("log_format", "")) as seen:
        circuit.succeeded()
    assert not circuit.is_open and circuit.allow()
    assert len(seen) == 1 and "closed" in seen[0]["log_format"]


# --- against Redis --------------------------------------------------------------------------------------------


async def verdict_of(result: Verdict | Deferred[Verdict]) -> Verdict:
    if isinstance(result, Deferred):
        return await result.addTimeout(10.0, reactor)
    return result


def settings(server: RedisServer, **kwargs: Any) -> LimitStoreSettings:
    return LimitStoreSettings(type="redis", host="127.0.0.1", port=server.port, prefix="gwtest:", **kwargs)


@pytest_twisted.async_yield_fixture()
async def shared_pair(redis_server: RedisServer) -> AsyncIterator[tuple[SharedLimits, SharedLimits]]:
    """Two shared stores on one Redis, as two worker processes have; a generous timeout (speed is not tested)."""
    made = [connect_shared_limits(settings(redis_server, timeout=5.0), reactor) for _ in range(2)]
    for shared in made:
        shared.start()
    await until(lambda: all(s.redis.client.ready == 2 for s in made), "every store connected")
    yield made[0], made[1]
    for shared in made:
        await shared.close()


ANONYMOUS_3 = {"rate_limits": {"anonymous": {"rate": "3/m"}}}


@pytest_twisted.ensureDeferred
async def test_two_gatekeepers_share_the_anonymous_limit(shared_pair: tuple[SharedLimits, SharedLimits]) -> None:
    """Two gatekeepers (two processes) on one Redis: 3/m for an address is 3 in all, not 3 each."""
    cfg = config(route={"auth": "anonymous"}, admission=ANONYMOUS_3)
    keepers = [Gatekeeper(cfg.admission, reactor=reactor, shared=s) for s in shared_pair]
    route = cfg.routes[0].admission
    verdicts = [await verdict_of(keepers[i % 2].check(route, request())) for i in range(8)]
    assert [isinstance(v, Allow) for v in verdicts] == [True] * 3 + [False] * 5
    refused = verdicts[-1]
    assert isinstance(refused, TooManyRequests) and refused.reason == "rate_limited_address"
    allowed = verdicts[0]
    assert isinstance(allowed, Allow)
    assert (b"RateLimit", b'"anonymous";r=2;t=20') in allowed.response_headers


@pytest_twisted.ensureDeferred
async def test_consumer_slot_and_rate_in_one_round_trip(
    shared_pair: tuple[SharedLimits, SharedLimits], redis_server: RedisServer
) -> None:
    """A consumer's cap and rate are checked together: the cap is shared across gatekeepers and comes back on
    release; the two are one EVALSHA."""
    rates = {"consumer": {"rate": "100/m"}, "failed_auth": False}
    cfg = config(admission={"max_concurrent": 1, "rate_limits": rates})
    a, b = (Gatekeeper(cfg.admission, reactor=reactor, shared=s) for s in shared_pair)
    route = cfg.routes[0].admission
    before = _evalsha_calls(redis_server)
    first = await verdict_of(a.check(route, request(key())))
    assert isinstance(first, Allow) and first.release is not None
    assert _evalsha_calls(redis_server) == before + 1
    second = await verdict_of(b.check(route, request(key())))
    assert isinstance(second, TooManyRequests) and second.reason == "too_many_concurrent"
    first.release()
    await until(lambda: shared_pair[0].redis.leases() == 0, "the lease given back")
    await until(lambda: redis_server.command("EXISTS", "gwtest:in-flight:alice") == 0, "the lease gone from Redis")
    third = await verdict_of(b.check(route, request(key())))
    assert isinstance(third, Allow) and third.release is not None
    third.release()


@pytest_twisted.ensureDeferred
async def test_an_api_key_request_with_failed_auth_budgets_on_is_one_round_trip(
    shared_pair: tuple[SharedLimits, SharedLimits], redis_server: RedisServer
) -> None:
    """With the failed-auth budgets on (the default), an API key (checked cheaply) is checked first, then its
    budgets, its consumer's slot and its rate are one EVALSHA; a wrong key is 401 and counted, and once its budget
    is spent through either gatekeeper it is 429."""
    rates = {"consumer": {"rate": "100/m"}, "failed_auth": {"rate": "2/m"}, "failed_auth_per_address": False}
    cfg = config(admission={"max_concurrent": 5, "rate_limits": rates})
    a, b = (Gatekeeper(cfg.admission, reactor=reactor, shared=s) for s in shared_pair)
    route = cfg.routes[0].admission
    before = _evalsha_calls(redis_server)
    first = await verdict_of(a.check(route, request(key())))
    assert isinstance(first, Allow) and first.release is not None
    assert _evalsha_calls(redis_server) == before + 1
    first.release()
    wrong = key("gw_" + "x" * 40)
    for keeper in (a, b):
        assert (await verdict_of(keeper.check(route, request(wrong)))).status == 401  # type: ignore[union-attr]
    for _ in range(50):  # the failures' counts are answered to nobody: wait for them (bounded)
        refused = await verdict_of(b.check(route, request(wrong)))
        if isinstance(refused, TooManyRequests):
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert isinstance(refused, TooManyRequests) and refused.reason == "too_many_failed_authentications"


# --- a password or a token the method remembers: one round trip ---------------------------------------------

LOGIN_RATES = {
    "consumer": {"rate": "100/m"},
    "failed_auth": {"rate": "5/m"},
    "failed_auth_per_address": {"rate": "2/m"},
}


def login_config(**route: Any) -> Any:
    """A Basic route (alice's and bob's password is "secret") with a consumer rate and both failed-auth budgets."""
    return config(
        route={"auth": ["login"], **route},
        auth={"login": {"type": "basic"}},
        consumers={name: {"password": PASSWORD_HASH} for name in ("alice", "bob")},
        admission={"rate_limits": LOGIN_RATES},
    )


def method_of(cfg: Any, name: str) -> Authenticator:
    """The running form of `cfg`'s method `name`, for a gatekeeper on a shared store (the test closes it)."""
    return build_authenticator(cfg.admission.methods[name], cfg.admission, reactor)


async def spend_the_address_budget(keeper: Gatekeeper, route: Any) -> None:
    """carol (no such consumer) fails at 10.0.0.1 until its per-address budget is spent: each failure is counted
    answered to nobody, so this asks again until one is refused (bounded)."""
    for _ in range(50):
        refused = await verdict_of(keeper.check(route, request(basic("carol", TOO_LONG))))
        if isinstance(refused, TooManyRequests):
            assert refused.reason == "too_many_failed_authentications_address"
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("the per-address budget was never spent")


@pytest_twisted.ensureDeferred
async def test_a_password_the_method_remembers_is_one_round_trip(
    shared_pair: tuple[SharedLimits, SharedLimits], redis_server: RedisServer
) -> None:
    """A password's first request has its budgets peeked before bcrypt (one EVALSHA), then its consumer's rate
    (another); the same password again is remembered (no bcrypt), so its budgets, slot and rate are one EVALSHA."""
    cfg = login_config()
    login = method_of(cfg, "login")
    keeper = Gatekeeper(cfg.admission, reactor=reactor, shared=shared_pair[0], authenticators={"login": login})
    route = cfg.routes[0].admission
    try:
        before = _evalsha_calls(redis_server)
        first = await verdict_of(keeper.check(route, request(basic("alice", "secret"))))
        assert isinstance(first, Allow) and first.identity.consumer == "alice"
        assert _evalsha_calls(redis_server) == before + 2
        second = await verdict_of(keeper.check(route, request(basic("alice", "secret"))))
        assert isinstance(second, Allow) and second.identity.consumer == "alice"
        assert _evalsha_calls(redis_server) == before + 3
    finally:
        login.close()


@pytest_twisted.ensureDeferred
async def test_a_token_the_method_remembers_is_one_round_trip(
    shared_pair: tuple[SharedLimits, SharedLimits], redis_server: RedisServer, tmp_path: Path
) -> None:
    """A JWT's first request has its budgets peeked before its signature is checked, then its subject's rate: two
    EVALSHAs; the same token again is remembered, so its budgets and its subject's rate are one EVALSHA."""
    secret = tmp_path / "jwt.secret"
    secret.write_bytes(SECRET)
    corp = {"type": "jwt", "issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["HS256"]}
    cfg = config(
        route={"auth": ["corp"]},
        auth={"corp": {**corp, "secret_file": str(secret)}},
        admission={"rate_limits": LOGIN_RATES},
    )
    keeper = Gatekeeper(
        cfg.admission, reactor=reactor, shared=shared_pair[0], authenticators={"corp": method_of(cfg, "corp")}
    )
    route = cfg.routes[0].admission
    bearer = (b"Authorization", b"Bearer " + jwt.encode(claims(), SECRET, algorithm="HS256").encode())
    before = _evalsha_calls(redis_server)
    first = await verdict_of(keeper.check(route, request(bearer)))
    assert isinstance(first, Allow) and first.identity.consumer == "svc-reports"
    assert _evalsha_calls(redis_server) == before + 2
    second = await verdict_of(keeper.check(route, request(bearer)))
    assert isinstance(second, Allow) and second.identity.consumer == "svc-reports"
    assert _evalsha_calls(redis_server) == before + 3


@pytest.mark.parametrize("scopes_any", [None, ["admin"]], ids=["no-scopes", "a-scope-alice-lacks"])
@pytest_twisted.ensureDeferred
async def test_a_remembered_password_on_a_spent_budget_is_429(
    shared_pair: tuple[SharedLimits, SharedLimits], redis_server: RedisServer, scopes_any: list[str] | None
) -> None:
    """alice's password, remembered, from an address whose budget others spent: 429 in one EVALSHA, as it would
    be before it is checked, and nothing taken of her rate. On a route needing a scope she lacks it is 429 too,
    not 403: a 403 would tell whoever guessed the password right despite the spent budget."""
    cfg = login_config(**({"scopes_any": scopes_any} if scopes_any else {}))
    login = method_of(cfg, "login")
    keeper = Gatekeeper(cfg.admission, reactor=reactor, shared=shared_pair[0], authenticators={"login": login})
    route = cfg.routes[0].admission
    try:
        remembered = await verdict_of(keeper.check(route, request(basic("alice", "secret"), peer="10.0.0.2")))
        assert isinstance(remembered, Forbidden if scopes_any else Allow)
        await spend_the_address_budget(keeper, route)
        rate = redis_server.command("GET", "gwtest:consumer:alice")
        before = _evalsha_calls(redis_server)
        refused = await verdict_of(keeper.check(route, request(basic("alice", "secret"))))
        assert isinstance(refused, TooManyRequests) and refused.reason == "too_many_failed_authentications_address"
        assert _evalsha_calls(redis_server) == before + 1
        assert redis_server.command("GET", "gwtest:consumer:alice") == rate
    finally:
        login.close()


@pytest_twisted.ensureDeferred
async def test_a_new_password_on_a_spent_budget_is_429_before_bcrypt(
    shared_pair: tuple[SharedLimits, SharedLimits], redis_server: RedisServer
) -> None:
    """bob's right password, never sent before, from an address whose budget is spent: its budgets are peeked
    first (one EVALSHA) and it is refused 429 without being checked (so it is not remembered afterwards)."""
    cfg = login_config()
    login = method_of(cfg, "login")
    keeper = Gatekeeper(cfg.admission, reactor=reactor, shared=shared_pair[0], authenticators={"login": login})
    route = cfg.routes[0].admission
    try:
        await spend_the_address_budget(keeper, route)
        before = _evalsha_calls(redis_server)
        refused = await verdict_of(keeper.check(route, request(basic("bob", "secret"))))
        assert isinstance(refused, TooManyRequests) and refused.reason == "too_many_failed_authentications_address"
        assert _evalsha_calls(redis_server) == before + 1
        elsewhere = await verdict_of(keeper.check(route, request(basic("bob", "secret"), peer="10.0.0.2")))
        assert isinstance(elsewhere, Allow)
        assert _evalsha_calls(redis_server) == before + 3  # checked (bcrypt) only now: peeked, then its rate
    finally:
        login.close()


def _evalsha_calls(server: RedisServer) -> int:
    info = server.command("INFO", "commandstats")
    assert isinstance(info, bytes)
    for line in info.decode().splitlines():
        if line.startswith("cmdstat_evalsha:"):
            return int(line.split("calls=", 1)[1].split(",", 1)[0])
    return 0


@pytest.mark.parametrize("fail_closed", [False, True])
@pytest_twisted.ensureDeferred
async def test_silent_redis(redis_server: RedisServer, fail_closed: bool) -> None:
    """Redis stopped with SIGSTOP: each check gives up after the timeout and the route decides (open: counted in
    this process; closed: 503). After `failures` in a row the circuit opens and checks no longer wait at all."""
    shared = connect_shared_limits(settings(redis_server, timeout=0.05), reactor)
    shared.start()
    cfg = config(
        route={"auth": "anonymous", "limit_store_failure": "closed" if fail_closed else "open"}, admission=ANONYMOUS_3
    )
    keeper = Gatekeeper(cfg.admission, reactor=reactor, shared=shared)
    route = cfg.routes[0].admission
    try:
        await until(lambda: shared.redis.client.ready == 2, "2 connections ready")
        redis_server.pause()
        verdicts = []
        for _ in range(5):  # the circuit's default threshold
            verdicts.append(await verdict_of(keeper.check(route, request())))
        assert shared.stats.errors["timeout"] == 5 and shared.circuit.is_open
        waited = keeper.check(route, request())
        assert isinstance(waited, Deferred) and waited.called  # the circuit is open: no wait on Redis
        verdicts.append(await verdict_of(waited))
        if fail_closed:
            assert all(isinstance(v, LimitsUnavailable) and v.status == 503 for v in verdicts)
            assert shared.stats.fallbacks["closed"] == 6
        else:
            # counted in this process meanwhile: 3/m still holds here
            assert [isinstance(v, Allow) for v in verdicts] == [True] * 3 + [False] * 3
            assert shared.stats.fallbacks["open"] == 6
    finally:
        redis_server.resume()
        await shared.close()


@pytest_twisted.ensureDeferred
async def test_a_check_its_request_gave_up_on_is_no_failure_of_redis(redis_server: RedisServer) -> None:
    """A check cancelled because its client left (the exchange cancels the verdict) is neither an error of the
    store nor a step towards opening the circuit: clients hanging up must not cut a gateway off from Redis."""
    shared = connect_shared_limits(settings(redis_server, timeout=5.0), reactor)
    shared.start()
    cfg = config(route={"auth": "anonymous", "limit_store_failure": "closed"}, admission=ANONYMOUS_3)
    keeper = Gatekeeper(cfg.admission, reactor=reactor, shared=shared)
    route = cfg.routes[0].admission
    try:
        await until(lambda: shared.redis.client.ready == 2, "2 connections ready")
        redis_server.pause()  # the checks wait for Redis's answer...
        for _ in range(6):  # ...and their clients leave first: more than the circuit's threshold
            waiting = keeper.check(route, request())
            assert isinstance(waiting, Deferred) and not waiting.called
            waiting.cancel()
            waiting.addErrback(lambda _: None)
        assert sum(shared.stats.errors.values()) == 0
        assert not shared.circuit.is_open and shared.stats.fallbacks["closed"] == 0
    finally:
        redis_server.resume()
        await shared.close()


@pytest.mark.parametrize("fail_closed", [False, True])
@pytest_twisted.ensureDeferred
async def test_redis_stopped_mid_run(redis_server: RedisServer, fail_closed: bool) -> None:
    """Redis stopped (and its connections gone) mid-run: checks fail at once and the route decides; when Redis is
    back, the circuit's trial closes it and limits are shared again."""
    shared = connect_shared_limits(settings(redis_server, timeout=5.0), reactor)
    shared.start()
    shared.circuit = Circuit(reactor, failures=1, open_for=0.2)
    cfg = config(
        route={"auth": "anonymous", "limit_store_failure": "closed" if fail_closed else "open"}, admission=ANONYMOUS_3
    )
    keeper = Gatekeeper(cfg.admission, reactor=reactor, shared=shared)
    route = cfg.routes[0].admission
    try:
        await until(lambda: shared.redis.client.ready == 2, "2 connections ready")
        assert isinstance(await verdict_of(keeper.check(route, request())), Allow)
        redis_server.stop()
        await until(lambda: shared.redis.client.ready == 0, "0 connections ready")
        during = await verdict_of(keeper.check(route, request()))
        assert isinstance(during, LimitsUnavailable if fail_closed else Allow)
        assert shared.circuit.is_open
        redis_server.start()
        await until(lambda: shared.redis.client.ready == 2, "2 connections ready")
        for _ in range(500):  # bounded: the circuit lets a trial through 0.2 s after it opened
            if not shared.circuit.is_open:
                break
            await verdict_of(keeper.check(route, request()))
            await task.deferLater(reactor, 0.01, lambda: None)
        assert not shared.circuit.is_open
        # the new Redis is empty: 3 more in all
        after = [await verdict_of(keeper.check(route, request(peer="10.9.9.9"))) for _ in range(4)]
        assert [isinstance(v, Allow) for v in after] == [True, True, True, False]
    finally:
        await shared.close()


@pytest_twisted.ensureDeferred
async def test_failed_authentications_counted_in_redis(shared_pair: tuple[SharedLimits, SharedLimits]) -> None:
    """Failed authentications through either gatekeeper count against one budget: once it is spent, both refuse
    with 429 before verifying."""
    rates = {"failed_auth": {"rate": "2/m"}, "failed_auth_per_address": False}
    cfg = config(admission={"rate_limits": rates})
    a, b = (Gatekeeper(cfg.admission, reactor=reactor, shared=s) for s in shared_pair)
    route = cfg.routes[0].admission
    wrong = key("gw_" + "x" * 40)
    assert (await verdict_of(a.check(route, request(wrong)))).status == 401  # type: ignore[union-attr]
    assert (await verdict_of(b.check(route, request(wrong)))).status == 401  # type: ignore[union-attr]
    for keeper in (a, b):
        for _ in range(50):  # the second failure's count is answered to nobody: wait for it (bounded)
            refused = await verdict_of(keeper.check(route, request(wrong)))
            if isinstance(refused, TooManyRequests):
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        assert isinstance(refused, TooManyRequests) and refused.reason == "too_many_failed_authentications"
