"""A running gateway (in this process) with `[limits.store]` in Redis: requests counted there, the store's
metrics on the admin listener, a route that fails closed answering 503 once Redis is stopped, and reloads that
keep or replace the store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest_twisted
from twisted.internet import reactor

from gateway.config import parse
from gateway.operations.runtime import make_gateway
from tests.support.clients import connect, within
from tests.support.origin import Origin
from tests.support.redis import RedisServer
from tests.support.running import RunningGateway, gateway_config
from tests.support.scrape import admin_port, scrape, until


def redis_config(origin: Origin, server: RedisServer, **route: Any) -> dict[str, Any]:
    data = gateway_config(
        origin.url,
        route={"auth": "anonymous", **route},
        admission={"rate_limits": {"anonymous": {"rate": "3/m"}}},
        limits={"store": {"type": "redis", "url": server.url, "timeout": "5s", "prefix": "gwtest:"}},
    )
    data["admin"] = {"host": "127.0.0.1", "port": 0}
    return data


async def status_of(gateway: RunningGateway) -> int:
    client = await connect(gateway.port, keep_all=True)
    client.send(b"GET /bytes/10 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    await within(client.closed, 30)
    return client.response().status


@pytest_twisted.ensureDeferred
async def test_counted_in_redis_with_metrics(
    origin: Origin, redis_server: RedisServer, gateway_for: Callable[[dict[str, Any]], RunningGateway]
) -> None:
    """3/m per address, counted in Redis (its key is there); the store's latency histogram and circuit gauge are
    on /metrics."""
    gateway = gateway_for(redis_config(origin, redis_server))
    shared = gateway.service.gateway.gatekeeper.shared
    assert shared is not None
    await until(lambda: shared.redis.client.ready == 2, "2 connections ready")
    assert [await status_of(gateway) for _ in range(4)] == [200, 200, 200, 429]
    assert redis_server.command("EXISTS", "gwtest:anonymous:127.0.0.1") == 1
    metrics = await scrape(admin_port(gateway))
    assert metrics.count("gateway_limit_store_seconds_count") == 4
    assert metrics.value("gateway_limit_store_circuit_open") == 0


@pytest_twisted.ensureDeferred
async def test_fail_closed_route_answers_503_when_redis_is_gone(
    origin: Origin, redis_server: RedisServer, gateway_for: Callable[[dict[str, Any]], RunningGateway]
) -> None:
    """With Redis stopped mid-run, a route that fails closed answers 503 problem+json; the fallback is counted."""
    gateway = gateway_for(redis_config(origin, redis_server, limit_store_failure="closed"))
    shared = gateway.service.gateway.gatekeeper.shared
    assert shared is not None
    await until(lambda: shared.redis.client.ready == 2, "2 connections ready")
    assert await status_of(gateway) == 200
    redis_server.stop()
    await until(lambda: shared.redis.client.ready == 0, "0 connections ready")
    assert await status_of(gateway) == 503
    metrics = await scrape(admin_port(gateway))
    assert metrics.count("gateway_limit_store_fallbacks_total", mode="closed") == 1
    assert metrics.count("gateway_limit_store_errors_total", kind="unavailable") == 1


@pytest_twisted.ensureDeferred
async def test_reload_keeps_or_replaces_the_store(origin: Origin, redis_server: RedisServer) -> None:
    """A reload with equal store settings keeps the store (connections, leases); other settings make a new one,
    and the old one is the retired gatekeeper's to close; back to local, there is none."""
    first = make_gateway(parse(redis_config(origin, redis_server), source="t.toml"), reactor)
    same = make_gateway(parse(redis_config(origin, redis_server), source="t.toml"), reactor, previous=first)
    other_data = redis_config(origin, redis_server)
    other_data["limits"]["store"]["prefix"] = "other:"
    other = make_gateway(parse(other_data, source="t.toml"), reactor, previous=same)
    local_data = redis_config(origin, redis_server)
    del local_data["limits"]
    local = make_gateway(parse(local_data, source="t.toml"), reactor, previous=other)
    try:
        assert first.gatekeeper.shared is not None
        assert same.gatekeeper.shared is first.gatekeeper.shared
        assert other.gatekeeper.shared is not None and other.gatekeeper.shared is not same.gatekeeper.shared
        assert local.gatekeeper.shared is None
    finally:
        for gateway in (first, same, other, local):
            await gateway.gatekeeper.close()
            for pool in gateway.pools.values():
                pool.close()
