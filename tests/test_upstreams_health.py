"""Active health checks (`gateway.upstreams.health`): the verdict of checks in a row (pure), the checker on a
`MemoryReactorClock` (its schedule, its timeout, no pile-up for a server that is down), and over loopback a
flapping health endpoint taking a server out and bringing it back."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
from twisted.internet.testing import MemoryReactorClock

from gateway.config import Upstream, UpstreamServer
from gateway.config.model import HealthCheck
from gateway.proxy.pool import UpstreamPool
from gateway.upstreams.health import Verdict
from tests.support.clients import connect, parse_response, within
from tests.support.faults import assert_problem, get
from tests.support.origin import Origin
from tests.support.running import RunningGateway, gateway_config
from tests.support.scrape import until

SETTINGS = HealthCheck(path=b"/health", interval=10.0, timeout=2.0, healthy_threshold=2, unhealthy_threshold=3)


def test_a_server_is_unhealthy_after_failed_checks_in_a_row_and_back_after_passed_ones() -> None:
    verdict = Verdict()
    assert [verdict.record(ok, SETTINGS) for ok in (False, False, True, False, False)] == [False] * 5
    assert verdict.healthy
    assert verdict.record(False, SETTINGS) is True  # the third failure in a row
    assert not verdict.healthy
    assert [verdict.record(ok, SETTINGS) for ok in (True, False, True)] == [False, False, False]
    assert verdict.record(True, SETTINGS) is True
    assert verdict.healthy
    assert (verdict.passed, verdict.failed) == (4, 6)


def pool_with_checks(**settings: Any) -> tuple[UpstreamPool, MemoryReactorClock]:
    clock = MemoryReactorClock()
    upstream = Upstream(
        name="app",
        scheme="http",
        host="127.0.0.1",
        port=8081,
        base_path=b"",
        servers=(UpstreamServer(host="127.0.0.1", port=8081), UpstreamServer(host="127.0.0.2", port=8081)),
        health_check=HealthCheck(path=b"/health", **settings),
    )
    return UpstreamPool(upstream, clock, rng=random.Random(5)), clock


def test_checks_of_a_server_that_is_down_never_pile_up() -> None:
    """Connections that never open (a server down): each check ends at its timeout, and the next is scheduled
    only then, so over 100 s of 1 s intervals and 5 s timeouts each server has at most one check under way and
    about one every 6 s, not one a second."""
    pool, clock = pool_with_checks(interval=1.0, timeout=0.5, unhealthy_threshold=2)
    pool.start()
    assert pool.checker is not None
    for _ in range(400):
        clock.advance(0.25)
        under_way = pool.checker._probes
        assert len(under_way) <= 2
    connects = len(clock.tcpClients)
    assert 100 / 1.6 <= connects <= 2 * 100 / 1.4 + 2  # one check per (interval + timeout) per server, jittered
    assert [server.state for server in pool.servers] == ["unhealthy", "unhealthy"]
    pool.close()
    assert clock.getDelayedCalls() == []


def test_every_server_unhealthy_is_a_fast_503_with_retry_after_the_interval() -> None:
    pool, _ = pool_with_checks(interval=7.0, timeout=1.0, unhealthy_threshold=1)
    for server in pool.servers:
        server.verdict.record(False, pool.upstream.health_check)  # type: ignore[arg-type]
    assert pool.choose(None) is None
    error = pool.unavailable()
    assert error.extra_headers() == [(b"Retry-After", b"7")]
    pool.close()


def test_stopping_the_checker_cancels_everything() -> None:
    pool, clock = pool_with_checks(interval=1.0, timeout=0.5)
    pool.start()
    clock.advance(1.0)  # the first checks are under way
    pool.close()
    assert clock.getDelayedCalls() == []


# --- over loopback ---------------------------------------------------------------------------------------------


@pytest_twisted.async_yield_fixture()
async def two() -> AsyncIterator[list[Origin]]:
    started = [Origin().start() for _ in range(2)]
    yield started
    for origin in started:
        await origin.stop()


def checked(origins: list[Origin]) -> dict[str, Any]:
    data = gateway_config(origins[0].url)
    upstream = data["upstreams"]["origin"]
    del upstream["url"]
    upstream["servers"] = [{"url": o.url} for o in origins]
    upstream["health_check"] = {
        "path": "/health",
        "interval": "50ms",
        "timeout": "40ms",
        "healthy_threshold": 1,
        "unhealthy_threshold": 1,
    }
    return data


async def fetch_status(gateway: RunningGateway) -> int:
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/status/200"))
    await within(client.closed)
    return parse_response(bytes(client.head)).status


def non_health(origin: Origin) -> int:
    return sum(1 for seen in origin.seen if seen.uri != b"/health")


@pytest_twisted.ensureDeferred
async def test_a_flapping_health_endpoint_takes_its_server_out_and_back(two, gateway_for):
    """A server whose health endpoint answers 503 gets no requests once a check saw it; back at 200, it gets
    its share again."""
    gateway = gateway_for(checked(two))
    pool = gateway.pool()
    await until(lambda: all(s.verdict.passed for s in pool.servers), "a passed check of each server")
    two[0].healthy = False
    await until(lambda: pool.servers[0].state == "unhealthy", "server 0 unhealthy")
    before = non_health(two[0])
    for _ in range(4):
        assert await fetch_status(gateway) == 200
    assert non_health(two[0]) == before
    two[0].healthy = True
    await until(lambda: pool.servers[0].state == "up", "server 0 back")
    for _ in range(4):
        assert await fetch_status(gateway) == 200
    assert non_health(two[0]) == before + 2


@pytest_twisted.ensureDeferred
async def test_every_server_failing_its_checks_is_a_fast_503(two, gateway_for):
    gateway = gateway_for(checked(two))
    pool = gateway.pool()
    for origin in two:
        origin.healthy = False
    await until(lambda: all(s.state == "unhealthy" for s in pool.servers), "both unhealthy")
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/status/200"))
    await within(client.closed)
    problem = assert_problem(client, 503)
    assert problem["detail"] == "no server of upstream origin can take a request now"
