"""Tests for gateway.auth.shared_limits: the circuit on a Clock, and admission's checks against a real
redis-server: limits shared exactly by two gatekeepers (two processes), one round trip per check, and both
failure modes with Redis silent (SIGSTOP) or stopped mid-run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gateway.auth.gatekeeper import Allow, Gatekeeper, Verdict
from gateway.auth.shared_limits import Circuit, SharedLimits, connect_shared_limits
from gateway.config_store import LimitStoreSettings
from gateway.errors import LimitsUnavailable, TooManyRequests
from tests.support.logs import captured
from tests.support.redis import RedisServer
from tests.support.scrape import until
from tests.test_auth_gatekeeper import config, key, request

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
