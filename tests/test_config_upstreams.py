"""`[upstreams.NAME]` with several servers, balancing, ejection and the retry budget, and `[routes.retries]`: what
they read to, and the errors that name file, key path and reason."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import ConfigError, UpstreamServer, parse
from gateway.config.model import Ejection, HealthCheck, Retries, RetryBudget
from tests.test_config import SOURCE, minimal


def with_upstream(**keys: Any) -> dict[str, Any]:
    data = minimal()
    data["upstreams"]["app"] = keys
    return data


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data, source=SOURCE)
    return [str(problem) for problem in info.value.errors]


THREE = [{"url": "http://10.0.0.1:8081", "weight": 2}, {"url": "http://10.0.0.2:8081"}, {"url": "http://h3:8081"}]


def test_servers_are_read_with_their_weights() -> None:
    upstream = parse(with_upstream(servers=THREE), source=SOURCE).upstreams["app"]
    assert upstream.members == (
        UpstreamServer(host="10.0.0.1", port=8081, weight=2),
        UpstreamServer(host="10.0.0.2", port=8081),
        UpstreamServer(host="h3", port=8081),
    )
    assert (upstream.scheme, upstream.host, upstream.port) == ("http", "10.0.0.1", 8081)


def test_a_url_is_one_server_and_reads_as_before() -> None:
    """A single-URL upstream has no `servers` of its own (it is the one at host and port), with every default."""
    upstream = parse(minimal(), source=SOURCE).upstreams["app"]
    assert upstream.servers == ()
    assert upstream.members == (UpstreamServer(host="127.0.0.1", port=8081),)
    assert upstream.balance == "round_robin"
    assert upstream.ejection == Ejection()
    assert upstream.retry_budget == RetryBudget()
    assert parse(minimal(), source=SOURCE).routes[0].retries == Retries()


def test_one_server_listed_with_weight_one_is_a_url() -> None:
    one = parse(with_upstream(servers=[{"url": "http://127.0.0.1:8081"}]), source=SOURCE).upstreams["app"]
    assert one == parse(minimal(), source=SOURCE).upstreams["app"]


def test_balancing_ejection_and_budget_are_read() -> None:
    data = with_upstream(
        servers=THREE,
        balance="hash",
        hash_on="header:X-Tenant",
        max_requests_per_server=10,
        ejection={"consecutive_failures": 2, "base_time": "1s", "max_time": "5s", "statuses": [503]},
        retry_budget={"percent": 10, "window": "30s", "min_retries": 0},
    )
    data["routes"][0]["retries"] = {"attempts": 1, "unsafe_methods": True, "backoff": "10ms", "max_backoff": "1s"}
    config = parse(data, source=SOURCE)
    upstream = config.upstreams["app"]
    assert (upstream.balance, upstream.hash_on, upstream.max_requests_per_server) == ("hash", "header:x-tenant", 10)
    assert upstream.ejection == Ejection(consecutive_failures=2, base_time=1.0, max_time=5.0, statuses=frozenset({503}))
    assert upstream.retry_budget == RetryBudget(percent=10, window=30.0, min_retries=0)
    assert config.routes[0].retries == Retries(attempts=1, unsafe_methods=True, backoff=0.01, max_backoff=1.0)


def test_health_checks_are_off_by_default_and_read_with_their_units() -> None:
    assert parse(minimal(), source=SOURCE).upstreams["app"].health_check is None
    data = with_upstream(
        url="http://a:1",
        health_check={
            "path": "/healthz?deep=1",
            "method": "HEAD",
            "statuses": [204],
            "interval": "5s",
            "timeout": "500ms",
        },
    )
    check = parse(data, source=SOURCE).upstreams["app"].health_check
    assert check == HealthCheck(
        path=b"/healthz?deep=1", method="HEAD", statuses=frozenset({204}), interval=5.0, timeout=0.5
    )


@pytest.mark.parametrize(
    ("keys", "error"),
    [
        (
            {"url": "http://a:1", "servers": THREE},
            'test.toml: upstreams.app.url: and "servers" exclude each other: give one url, or a list of servers',
        ),
        ({"servers": []}, "test.toml: upstreams.app.servers: must list at least one server"),
        (
            {"servers": [{"url": "http://a:1", "weight": 0}]},
            "test.toml: upstreams.app.servers[0].weight: must be a positive integer (1 to 1000), got 0",
        ),
        (
            {"servers": [{"url": "http://a:1", "weight": 1.5}]},
            "test.toml: upstreams.app.servers[0].weight: must be a positive integer (1 to 1000), got a number",
        ),
        ({"servers": [{"url": "ftp://a"}]}, "test.toml: upstreams.app.servers[0].url: must be an http or https URL"),
        ({"servers": [{"url": "http://a:1", "port": 2}]}, "test.toml: upstreams.app.servers[0].port: unknown key"),
        (
            {"servers": [{"url": "http://a:1"}, {"url": "https://b:1"}]},
            "test.toml: upstreams.app.servers[1].url: must have the scheme and path of the first server",
        ),
        (
            {"servers": [{"url": "http://a:1/x"}, {"url": "http://b:1/y"}]},
            "test.toml: upstreams.app.servers[1].url: must have the scheme and path of the first server",
        ),
        (
            {"servers": [{"url": "http://a:1"}, {"url": "http://a:1/"}]},
            "test.toml: upstreams.app.servers[1].url: names the same host and port as a server before it",
        ),
        ({"url": "http://a:1", "balance": "random"}, 'test.toml: upstreams.app.balance: must be "round_robin"'),
        ({"url": "http://a:1", "hash_on": "query:x"}, 'test.toml: upstreams.app.hash_on: must be "consumer"'),
        ({"url": "http://a:1", "hash_on": "header:"}, 'test.toml: upstreams.app.hash_on: must be "consumer"'),
        (
            {"url": "http://a:1", "ejection": {"max_ejected_percent": 150}},
            "test.toml: upstreams.app.ejection.max_ejected_percent: must be a percentage, an integer from 0 to 100",
        ),
        (
            {"url": "http://a:1", "ejection": {"statuses": [404]}},
            "test.toml: upstreams.app.ejection.statuses: must be server error statuses (500 to 599), got 404",
        ),
        (
            {"url": "http://a:1", "ejection": {"base_time": "1m", "max_time": "10s"}},
            "test.toml: upstreams.app.ejection.max_time: must not be below base_time (10 < 60)",
        ),
        (
            {"url": "http://a:1", "ejection": {"consecutive_failures": -1}},
            "test.toml: upstreams.app.ejection.consecutive_failures: must be an integer, 0 or more, got -1",
        ),
        (
            {"url": "http://a:1", "retry_budget": {"percent": "20%"}},
            "test.toml: upstreams.app.retry_budget.percent: must be a percentage",
        ),
        ({"url": "http://a:1", "retry_budget": {"windows": "1s"}}, "test.toml: upstreams.app.retry_budget.windows: "),
        ({"url": "http://a:1", "health_check": {}}, "test.toml: upstreams.app.health_check.path: is required"),
        (
            {"url": "http://a:1", "health_check": {"path": "healthz"}},
            'test.toml: upstreams.app.health_check.path: must be a path such as "/healthz"',
        ),
        (
            {"url": "http://a:1", "health_check": {"path": "/h", "method": "POST"}},
            'test.toml: upstreams.app.health_check.method: must be "GET", "HEAD" or "OPTIONS"',
        ),
        (
            {"url": "http://a:1", "health_check": {"path": "/h", "statuses": [200, 700]}},
            "test.toml: upstreams.app.health_check.statuses: must be HTTP statuses (100 to 599), got 700",
        ),
        (
            {"url": "http://a:1", "health_check": {"path": "/h", "interval": "1s", "timeout": "2s"}},
            "test.toml: upstreams.app.health_check.timeout: must be below interval (2 >= 1)",
        ),
        (
            {"url": "http://a:1", "health_check": {"path": "/h", "healthy_threshold": 0}},
            "test.toml: upstreams.app.health_check.healthy_threshold: must be",
        ),
    ],
)
def test_upstream_errors_name_file_key_and_reason(keys: dict[str, Any], error: str) -> None:
    errors = errors_of(with_upstream(**keys))
    assert any(e.startswith(error) for e in errors), errors


@pytest.mark.parametrize(
    ("retries", "error"),
    [
        ({"attempts": -1}, 'test.toml: routes["app"].retries.attempts: must be an integer, 0 or more'),
        ({"unsafe_methods": "yes"}, 'test.toml: routes["app"].retries.unsafe_methods: '),
        (
            {"backoff": "1s", "max_backoff": "100ms"},
            'test.toml: routes["app"].retries.max_backoff: must not be below backoff (0.1 < 1)',
        ),
        ({"tries": 3}, 'test.toml: routes["app"].retries.tries: unknown key'),
        (
            {"max_body_bytes": "1MiB"},
            'test.toml: routes["app"].retries.max_body_bytes: must be at most 64KiB (a body kept to be sent again',
        ),
    ],
)
def test_route_retry_errors_name_file_key_and_reason(retries: dict[str, Any], error: str) -> None:
    data = minimal()
    data["routes"][0]["retries"] = retries
    errors = errors_of(data)
    assert any(e.startswith(error) for e in errors), errors
