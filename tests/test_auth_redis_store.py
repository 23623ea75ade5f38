"""Tests for gateway.auth.redis_store against a real redis-server: GCRA in one round trip, shared exactly by two
stores; leases that expire when their holder dies and are renewed while it lives; TTLs on every key; the script
loaded again after a SCRIPT FLUSH."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock

from gateway.auth.redis_store import SCRIPT, RedisLimitStore
from gateway.auth.settings.model import RateLimit
from gateway.redis.client import RedisClient
from tests.support.redis import RedisServer
from tests.support.scrape import until

MINUTE = RateLimit(requests=10, period=60.0, burst=10)


async def started(server: RedisServer, *, clock: object = reactor, lease_ttl: float = 30.0) -> RedisLimitStore:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
    client = RedisClient(reactor, endpoint, timeout=5.0, setup=[("SCRIPT", "LOAD", SCRIPT)])
    store = RedisLimitStore(client, clock, prefix="gwtest:", lease_ttl=lease_ttl)  # type: ignore[arg-type]
    store.start()
    await until(lambda: client.ready == 2, "2 connections ready")
    return store


@pytest_twisted.async_yield_fixture()
async def stores(redis_server: RedisServer) -> AsyncIterator[tuple[RedisLimitStore, RedisLimitStore]]:
    """Two stores on two pools of the same Redis: two gateways."""
    a = await started(redis_server)
    b = await started(redis_server)
    yield a, b
    await a.close()
    await b.close()


@pytest_twisted.ensureDeferred
async def test_burst_then_refused_with_retry_after(stores: tuple[RedisLimitStore, RedisLimitStore]) -> None:
    """A fresh key takes exactly `burst` requests; the next is refused with Retry-After about one interval."""
    store, _ = stores
    decisions = [await store.take("consumer:a", MINUTE) for _ in range(MINUTE.burst)]
    assert all(d.allowed for d in decisions)
    assert [d.remaining for d in decisions] == list(range(MINUTE.burst - 1, -1, -1))
    refused = await store.take("consumer:a", MINUTE)
    assert not refused.allowed and refused.remaining == 0
    assert 5.0 < refused.retry_after <= 6.0  # one interval (6 s), less the time the takes took
    assert 59.0 < refused.reset <= 60.0


@pytest_twisted.ensureDeferred
async def test_peek_does_not_count(stores: tuple[RedisLimitStore, RedisLimitStore]) -> None:
    """A peek says what a take would, and counts nothing."""
    store, _ = stores
    fresh = await store.peek("failed:x", MINUTE)
    assert fresh.allowed and fresh.remaining == MINUTE.burst
    for _ in range(3):
        await store.peek("failed:x", MINUTE)
    assert (await store.take("failed:x", MINUTE)).remaining == MINUTE.burst - 1
    assert (await store.peek("failed:x", MINUTE)).remaining == MINUTE.burst - 1


@pytest_twisted.ensureDeferred
async def test_two_stores_share_one_limit_exactly(stores: tuple[RedisLimitStore, RedisLimitStore]) -> None:
    """Takes from two gateways at once, interleaved: exactly `burst` of them are allowed in all."""
    a, b = stores
    limit = RateLimit(requests=25, period=60.0, burst=25)
    waits = [(a if i % 2 else b).take("consumer:shared", limit) for i in range(60)]
    results = await DeferredList(waits, fireOnOneErrback=True)
    assert sum(1 for _, decision in results if decision.allowed) == 25


@pytest_twisted.ensureDeferred
async def test_every_key_has_a_ttl(stores: tuple[RedisLimitStore, RedisLimitStore], redis_server: RedisServer) -> None:
    """Rate keys and lease sets all expire; all are under the prefix."""
    store, _ = stores
    await store.take("consumer:t", MINUTE)
    await store.take("anonymous:127.0.0.1", RateLimit(requests=1, period=1.0, burst=1))
    assert await store.acquire("in-flight:t", 2)
    keys = redis_server.command("KEYS", "*")
    assert isinstance(keys, list) and sorted(keys) == [
        b"gwtest:anonymous:127.0.0.1",
        b"gwtest:consumer:t",
        b"gwtest:in-flight:t",
    ]
    for key in keys:
        assert isinstance(key, bytes)
        ttl = redis_server.command("PTTL", key.decode())
        assert isinstance(ttl, int) and 0 < ttl <= 61_000, (key, ttl)
    await store.release("in-flight:t")


@pytest_twisted.ensureDeferred
async def test_leases_cap_and_release(stores: tuple[RedisLimitStore, RedisLimitStore]) -> None:
    """Two gateways share a cap of 2: a third acquire is refused until one is released."""
    a, b = stores
    assert await a.acquire("in-flight:c", 2)
    assert await b.acquire("in-flight:c", 2)
    assert not await a.acquire("in-flight:c", 2)
    assert a.leases() == 1
    await b.release("in-flight:c")
    assert b.leases() == 0
    assert await a.acquire("in-flight:c", 2)
    await a.release("in-flight:c")
    await a.release("in-flight:c")


@pytest_twisted.ensureDeferred
async def test_all_or_nothing_gives_the_slot_back(stores: tuple[RedisLimitStore, RedisLimitStore]) -> None:
    """A slot and a rate checked together in one call: the rate's refusal gives the slot back in the same call."""
    store, _ = stores
    one = RateLimit(requests=1, period=60.0, burst=1)
    assert (await store.take("consumer:r", one)).allowed
    acquire = store.acquire_op("in-flight:r", 1)
    slot, rate = await store.run([acquire, store.take_op("consumer:r", one)], all_or_nothing=True)
    assert slot is not None and slot.allowed
    assert rate is not None and not rate.allowed
    assert await store.acquire("in-flight:r", 1)  # the slot came back
    await store.release("in-flight:r")


@pytest_twisted.ensureDeferred
async def test_dead_gateways_leases_expire(redis_server: RedisServer) -> None:
    """A gateway that stops without giving its slot back (as one that is killed) holds it only until its lease's
    TTL: another gateway is refused at first, then gets the slot."""
    dead = await started(redis_server, lease_ttl=2.0)
    alive = await started(redis_server, lease_ttl=2.0)
    try:
        assert await dead.acquire("in-flight:d", 1)
        await dead.close()  # no release, no more renewals
        assert not await alive.acquire("in-flight:d", 1)
        got = False
        for _ in range(200):  # bounded: at most ~10 s for a 2 s lease
            if await alive.acquire("in-flight:d", 1):
                got = True
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        assert got
        await alive.release("in-flight:d")
    finally:
        await dead.close()
        await alive.close()


@pytest_twisted.ensureDeferred
async def test_held_leases_are_renewed(redis_server: RedisServer) -> None:
    """Every third of the TTL (on the store's clock) a held lease's expiry moves on; a released one is not
    brought back."""
    clock = Clock()
    store = await started(redis_server, clock=clock, lease_ttl=30.0)
    try:
        assert await store.acquire("in-flight:n", 5)
        assert await store.acquire("in-flight:n", 5)
        await store.release("in-flight:n")
        (member, score) = _members(redis_server, "gwtest:in-flight:n")
        clock.advance(10.0)
        await until(lambda: _members(redis_server, "gwtest:in-flight:n")[1] > score, "the lease renewed")
        assert _members(redis_server, "gwtest:in-flight:n")[0] == member
    finally:
        await store.close()


def _members(server: RedisServer, key: str) -> tuple[bytes, float]:
    reply = server.command("ZRANGE", key, "0", "-1", "WITHSCORES")
    assert isinstance(reply, list) and len(reply) == 2, reply
    member, score = reply
    assert isinstance(member, bytes) and isinstance(score, bytes)
    return member, float(score)


@pytest_twisted.ensureDeferred
async def test_script_loaded_again_after_flush(
    stores: tuple[RedisLimitStore, RedisLimitStore], redis_server: RedisServer
) -> None:
    """After SCRIPT FLUSH (as after a Redis restart) the next check still works: EVAL after NOSCRIPT."""
    store, _ = stores
    assert redis_server.command("SCRIPT", "FLUSH") == "OK"
    assert (await store.take("consumer:f", MINUTE)).allowed
    assert (await store.take("consumer:f", MINUTE)).remaining == MINUTE.burst - 2


@pytest.mark.parametrize("requests", [3, 7])
@pytest_twisted.ensureDeferred
async def test_fractional_intervals(stores: tuple[RedisLimitStore, RedisLimitStore], requests: int) -> None:
    """Intervals that are not whole microseconds (1/3 s) still give the whole burst."""
    store, _ = stores
    limit = RateLimit(requests=requests, period=1.0, burst=requests)
    allowed = [(await store.take(f"consumer:q{requests}", limit)).allowed for _ in range(requests)]
    assert all(allowed)
