"""A reload of an upstream of several servers (`gateway.operations.runtime.make_gateway` with the gateway before
it), in memory: a server it still lists keeps its pool and its standing; a removed server's pool is closed."""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock

from gateway.config import parse
from gateway.operations.runtime import make_gateway


def config(servers: list[dict[str, Any]], **upstream: Any) -> Any:
    return parse(
        {
            "listeners": [{"host": "127.0.0.1", "port": 0}],
            "upstreams": {"app": {"servers": servers, **upstream}},
            "routes": [{"name": "app", "auth": "anonymous", "upstream": "app"}],
        },
        source="test.toml",
    )


A, B, C = "http://10.0.0.1:80", "http://10.0.0.2:80", "http://10.0.0.3:80"


def test_a_reload_keeps_the_servers_it_still_lists_with_their_standing() -> None:
    clock = MemoryReactorClock()
    before = make_gateway(config([{"url": A}, {"url": B}, {"url": C}], ejection={"consecutive_failures": 1}), clock)
    old = before.pools["app"]
    a, b, c = old.servers
    old.failed(b)  # ejected for 30 s
    assert b.standing.until == 30.0
    after = make_gateway(
        config([{"url": B, "weight": 3}, {"url": A}, {"url": "http://10.0.0.4:80"}]), clock, previous=before
    )
    new = after.pools["app"]
    assert new is not old
    assert new.servers[0] is b and new.servers[1] is a
    assert new.servers[2] not in old.servers
    assert b.weight == 3
    assert new.ejector is not None and new.ejector.is_ejected(0) and new.ejector.ejected == 1
    assert new.choose(None) is a  # b is still out, the new one is chosen next
    # The old pool closes only what no new pool kept: C.
    old.close()
    assert c._closed and not a._closed and not b._closed


def test_a_reload_that_changes_the_scheme_keeps_no_server() -> None:
    clock = MemoryReactorClock()
    before = make_gateway(config([{"url": A}, {"url": B}]), clock)
    after = make_gateway(
        config([{"url": "https://10.0.0.1:80"}, {"url": "https://10.0.0.2:80"}]), clock, previous=before
    )
    assert not set(after.pools["app"].servers) & set(before.pools["app"].servers)


def test_a_reload_that_changes_nothing_keeps_the_pool() -> None:
    clock = MemoryReactorClock()
    before = make_gateway(config([{"url": A}, {"url": B}]), clock)
    after = make_gateway(config([{"url": A}, {"url": B}]), clock, previous=before)
    assert after.pools["app"] is before.pools["app"]
