"""An upstream given by a name re-resolved on an interval (`gateway.upstreams.resolve`), in memory: each address
one server, a server kept while its address stays, an empty answer changing nothing, and the config's checks."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from gateway.config import ConfigError, Upstream, parse
from gateway.proxy.pool import UpstreamPool
from tests.test_config import SOURCE, minimal


@implementer(IHostnameResolver)
class Answers:
    """A resolver answering each name at once with the addresses the test set for it."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.asked = 0

    def resolveHostName(self, receiver: IResolutionReceiver, hostName: str, *args: Any, **kwargs: Any) -> Any:
        self.asked += 1
        receiver.resolutionBegan(None)
        for address in self.addresses:
            receiver.addressResolved(IPv4Address("TCP", address, kwargs.get("portNumber", 0)))
        receiver.resolutionComplete()
        return None


def resolving() -> tuple[UpstreamPool, MemoryReactorClock, Answers]:
    clock = MemoryReactorClock()
    answers = Answers()
    clock.installNameResolver(answers)
    upstream = Upstream(name="search", scheme="http", host="search.internal", port=9200, base_path=b"", resolve=30.0)
    return UpstreamPool(upstream, clock), clock, answers


def addresses(pool: UpstreamPool) -> list[str]:
    return [server.address for server in pool.servers]


def test_each_address_is_a_server_and_a_kept_address_keeps_its_server() -> None:
    pool, clock, answers = resolving()
    assert addresses(pool) == ["search.internal:9200"]  # until the first answer: the name, resolved at connect
    answers.addresses = ["10.0.0.2", "10.0.0.1", "10.0.0.2"]
    pool.start()
    assert addresses(pool) == ["10.0.0.1:9200", "10.0.0.2:9200"]
    second = pool.servers[1]
    assert {pool.choose(None), pool.choose(None)} == set(pool.servers)
    answers.addresses = ["10.0.0.3", "10.0.0.2"]
    clock.advance(29.5)
    assert answers.asked == 1
    clock.advance(0.5)
    assert addresses(pool) == ["10.0.0.2:9200", "10.0.0.3:9200"]
    assert pool.servers[0] is second
    pool.close()
    assert clock.getDelayedCalls() == []


def test_an_empty_answer_keeps_the_servers() -> None:
    pool, clock, answers = resolving()
    answers.addresses = ["10.0.0.1"]
    pool.start()
    kept = list(pool.servers)
    answers.addresses = []
    clock.advance(30)
    assert pool.servers == kept
    assert answers.asked == 2
    pool.close()


def test_a_reload_keeps_what_the_name_resolved_to() -> None:
    pool, clock, answers = resolving()
    answers.addresses = ["10.0.0.1", "10.0.0.2"]
    pool.start()
    again = UpstreamPool(pool.upstream, clock, previous=pool)
    assert again.servers == pool.servers
    pool.close()
    assert not any(server._closed for server in again.servers)
    again.close()


def with_upstream(**keys: Any) -> dict[str, Any]:
    data = minimal()
    data["upstreams"]["app"] = keys
    return data


def test_resolve_is_read() -> None:
    upstream = parse(with_upstream(url="http://search.internal:9200", resolve="30s"), source=SOURCE).upstreams["app"]
    assert upstream.resolve == 30.0


@pytest.mark.parametrize(
    ("keys", "error"),
    [
        (
            {"url": "http://10.0.0.1:9200", "resolve": "30s"},
            "test.toml: upstreams.app.resolve: needs a url whose host is a name to resolve, not an address (10.0.0.1)",
        ),
        (
            {"servers": [{"url": "http://a:1"}, {"url": "http://b:1"}], "resolve": "30s"},
            "test.toml: upstreams.app.resolve: is for an upstream given by one url whose host is a name",
        ),
        ({"url": "http://a:1", "resolve": 0}, "test.toml: upstreams.app.resolve: must be a positive number of seconds"),
    ],
)
def test_resolve_errors(keys: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(with_upstream(**keys), source=SOURCE)
    assert any(str(problem).startswith(error) for problem in info.value.errors), info.value.errors
