"""Tests for gateway.config: the example file, defaults, units, merging of route overrides, and error messages."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import config
from gateway.config import (
    Config,
    ConfigError,
    FlowControl,
    Limits,
    Listener,
    Server,
    Timeouts,
    Upstream,
    parse,
)
from gateway.routing.paths import routing_path
from tests.support.mutations import Mutation, delete_at, set_at

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "etc" / "gateway.toml"
SOURCE = "test.toml"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def minimal() -> dict[str, Any]:
    """The smallest valid config: one listener, one named upstream, one catch-all route."""
    return {
        "listeners": [{"host": "127.0.0.1", "port": 8080}],
        "upstreams": {"app": {"url": "http://127.0.0.1:8081"}},
        "routes": [{"name": "app", "auth": "anonymous", "path_prefix": "/", "upstream": "app"}],
    }


def with_(**sections: Any) -> dict[str, Any]:
    """`minimal()` with top-level sections added or replaced."""
    data = minimal()
    data.update(copy.deepcopy(sections))
    return data


def error_of(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(data, source=SOURCE)
    return info.value


@pytest.fixture(scope="module")
def example() -> Config:
    return config.load(EXAMPLE)


# --- the example file ----------------------------------------------------------------------------------------


def test_example_loads_with_its_source(example: Config) -> None:
    """etc/gateway.toml loads and the Config remembers the file it came from."""
    assert example.source == str(EXAMPLE)


def test_example_sections_are_the_defaults(example: Config) -> None:
    """The example shows every top-level section with exactly the documented defaults."""
    assert example.server == Server()
    assert example.limits == Limits()
    assert example.server.idle_timeout == 60.0
    assert example.server.lingering_timeout == 5.0
    assert example.server.via == "gateway"
    assert example.server.workers == 1
    assert example.limits == Limits(max_request_body_bytes=1 * GiB, max_header_bytes=16 * KiB, max_header_count=100)


def test_example_listener(example: Config) -> None:
    """The example listens on 127.0.0.1:8080 with a backlog of 511."""
    assert example.listeners == (Listener(host="127.0.0.1", port=8080, backlog=511),)


def test_example_upstream(example: Config) -> None:
    """The example's named upstream "demo" is the demo on 127.0.0.1:8081 with the default pool settings."""
    demo = example.upstreams["demo"]
    assert demo == Upstream(name="demo", scheme="http", host="127.0.0.1", port=8081, base_path=b"")
    assert demo.max_connections == 256
    assert demo.max_queue == 512
    assert demo.queue_timeout == 10.0
    assert demo.idle_timeout == 4.0
    assert demo.max_idle_connections == 64


def test_example_routes_in_order(example: Config) -> None:
    """The example's routes come out in file order with their prefixes."""
    assert [(r.name, r.path_prefix) for r in example.routes] == [
        ("reports", b"/report"),
        ("events", b"/events"),
        ("uploads", b"/upload"),
        ("demo-api", b"/api"),
    ]


def test_example_route_without_overrides_gets_defaults(example: Config) -> None:
    """The "reports" route has the default timeouts, limits and flow control and names the "demo" upstream."""
    reports = example.routes[0]
    assert reports.upstream is example.upstreams["demo"]
    assert reports.host is None
    assert reports.host_header == "upstream"
    assert reports.strip_prefix is False
    assert reports.timeouts == Timeouts()
    assert reports.limits == Limits()
    assert reports.flow_control == FlowControl(high_water=256 * KiB, low_water=64 * KiB)


def test_example_route_timeout_override(example: Config) -> None:
    """The "events" route overrides upstream_idle to one hour and keeps every other timeout."""
    events = example.routes[1]
    assert events.timeouts == Timeouts(upstream_idle=3600.0)


def test_example_route_limit_override(example: Config) -> None:
    """The "uploads" route allows 4 GiB bodies while the others keep the 1 GiB default."""
    assert example.routes[2].limits.max_request_body_bytes == 4 * GiB
    assert example.routes[3].limits.max_request_body_bytes == 1 * GiB


def test_example_url_route(example: Config) -> None:
    """The "demo-api" route strips its prefix and gets its own upstream, named by its URL."""
    api = example.routes[3]
    assert api.strip_prefix is True
    assert api.upstream.name == "http://127.0.0.1:8081"
    assert api.upstream is example.upstreams["http://127.0.0.1:8081"]
    assert api.upstream is not example.upstreams["demo"]
    assert api.upstream.origin == b"http://127.0.0.1:8081"


# --- defaults ------------------------------------------------------------------------------------------------


def test_absent_sections_take_defaults() -> None:
    """A config without [server], [limits], [timeouts] or [flow_control] gets every default."""
    cfg = parse(minimal(), source=SOURCE)
    assert cfg.server == Server()
    assert cfg.limits == Limits()
    route = cfg.routes[0]
    assert route.timeouts == Timeouts()
    assert route.limits == Limits()
    assert route.flow_control == FlowControl()
    assert cfg.source == SOURCE


def test_absent_route_keys_take_defaults() -> None:
    """A route with only name and upstream matches any host and every path, strips nothing and sends the
    upstream's Host."""
    data = minimal()
    data["routes"] = [{"name": "app", "auth": "anonymous", "upstream": "app"}]
    route = parse(data, source=SOURCE).routes[0]
    assert route.host is None
    assert route.path_prefix == b"/"
    assert route.strip_prefix is False
    assert route.host_header == "upstream"


def test_absent_listener_backlog_is_511() -> None:
    """A listener without backlog gets 511."""
    assert parse(minimal(), source=SOURCE).listeners[0].backlog == 511


def test_route_host_is_lower_cased() -> None:
    """A route's host pattern is stored lower-cased, since host matching ignores case."""
    data = minimal()
    data["routes"][0]["host"] = "*.API.Example.COM"
    assert parse(data, source=SOURCE).routes[0].host == "*.api.example.com"


def test_empty_via_is_allowed() -> None:
    """An empty server.via is valid and means no Via entry is added."""
    assert parse(with_(server={"via": ""}), source=SOURCE).server.via == ""


# --- units ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("64KiB", 64 * KiB),
        ("1GiB", GiB),
        ("2MiB", 2 * MiB),
        ("10MB", 10_000_000),
        ("3kB", 3000),
        ("1GB", 1_000_000_000),
        ("64kib", 64 * KiB),
        ("2 MiB", 2 * MiB),
        ("7B", 7),
        ("512", 512),
        (65536, 65536),
        (1, 1),
    ],
)
def test_size(value: object, expected: int) -> None:
    """A size is an integer of bytes or a string with a binary or decimal unit."""
    cfg = parse(with_(limits={"max_request_body_bytes": value}), source=SOURCE)
    assert cfg.limits.max_request_body_bytes == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("1.5GiB", 'must be bytes as an integer or a string such as "64KiB", "1GiB", got \'1.5GiB\''),
        ("64KB/s", "must be bytes as an integer or a string such as"),
        ("10XB", "must be bytes as an integer or a string such as"),
        ("-1", "must be bytes as an integer or a string such as"),
        ("", "must be bytes as an integer or a string such as"),
        ("0KiB", "must be a positive number of bytes, got '0KiB'"),
        (0, "must be a positive number of bytes, got 0"),
        (-5, "must be a positive number of bytes, got -5"),
        (1.5, "must be a whole number of bytes"),
        (True, "must be a whole number of bytes, got a boolean"),
        ([1], "must be a whole number of bytes, got an array"),
    ],
)
def test_bad_size(value: object, reason: str) -> None:
    """A size that is not a positive whole number of bytes is an error naming the key."""
    error = error_of(with_(limits={"max_request_body_bytes": value}))
    assert error.key == "limits.max_request_body_bytes"
    assert error.reason.startswith(reason)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (" 10 s ", 10.0),
        (5, 5.0),
        (2.5, 2.5),
        (0.001, 0.001),
    ],
)
def test_duration(value: object, expected: float) -> None:
    """A duration is a number of seconds or a string with ms, s, m or h."""
    cfg = parse(with_(timeouts={"connect": value}), source=SOURCE)
    assert cfg.routes[0].timeouts.connect == pytest.approx(expected)
    assert isinstance(cfg.routes[0].timeouts.connect, float)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (0, "must be a positive number of seconds, got 0"),
        (-1, "must be a positive number of seconds, got -1"),
        (-0.5, "must be a positive number of seconds, got -0.5"),
        ("0s", "must be a positive number of seconds, got '0s'"),
        (float("inf"), "must be a positive number of seconds, got inf"),
        (float("nan"), "must be a positive number of seconds, got nan"),
        ("-1s", "must be seconds as a number or a string such as"),
        ("5", "must be seconds as a number or a string such as"),
        ("5 sec", "must be seconds as a number or a string such as"),
        ("", "must be seconds as a number or a string such as"),
        (True, "must be a number of seconds, got a boolean"),
        ([5], "must be a number of seconds, got an array"),
    ],
)
def test_bad_duration(value: object, reason: str) -> None:
    """A duration that is not a positive, finite number of seconds is an error naming the key."""
    error = error_of(with_(timeouts={"connect": value}))
    assert error.key == "timeouts.connect"
    assert error.reason.startswith(reason)


# --- route overrides merge over the top-level defaults -------------------------------------------------------


def test_route_timeouts_merge_key_by_key() -> None:
    """A route's [routes.timeouts] replaces only the keys it names; the rest come from [timeouts]."""
    data = with_(timeouts={"connect": "2s", "response_headers": "20s"})
    data["routes"] = [
        {"name": "plain", "auth": "anonymous", "path_prefix": "/", "upstream": "app"},
        {
            "name": "slow",
            "auth": "anonymous",
            "path_prefix": "/slow",
            "upstream": "app",
            "timeouts": {"response_headers": "10m"},
        },
    ]
    plain, slow = parse(data, source=SOURCE).routes
    assert plain.timeouts == Timeouts(connect=2.0, response_headers=20.0)
    assert slow.timeouts == Timeouts(connect=2.0, response_headers=600.0)


def test_route_limits_merge_key_by_key() -> None:
    """A route's body limit replaces the top-level one; the header limits come from [limits]."""
    data = with_(limits={"max_request_body_bytes": "1MiB", "max_header_bytes": "8KiB", "max_header_count": 50})
    data["routes"][0]["limits"] = {"max_request_body_bytes": "2MiB"}
    cfg = parse(data, source=SOURCE)
    assert cfg.routes[0].limits == Limits(max_request_body_bytes=2 * MiB, max_header_bytes=8 * KiB, max_header_count=50)
    assert cfg.limits.max_request_body_bytes == 1 * MiB


def test_route_flow_control_merges_key_by_key() -> None:
    """A route's [routes.flow_control] replaces only the water mark it names."""
    data = with_(flow_control={"high_water": "1MiB", "low_water": "512KiB"})
    data["routes"][0]["flow_control"] = {"high_water": "2MiB"}
    route = parse(data, source=SOURCE).routes[0]
    assert route.flow_control == FlowControl(high_water=2 * MiB, low_water=512 * KiB)


def test_top_level_flow_control_reaches_routes() -> None:
    """Routes without their own flow control use the top-level water marks."""
    data = with_(flow_control={"high_water": "1MiB", "low_water": "512KiB"})
    route = parse(data, source=SOURCE).routes[0]
    assert route.flow_control == FlowControl(high_water=1 * MiB, low_water=512 * KiB)


# --- upstreams -----------------------------------------------------------------------------------------------


def test_same_url_shares_one_upstream() -> None:
    """Routes that give the same http URL directly share one Upstream object (so one pool)."""
    data = minimal()
    url = "http://127.0.0.1:9000/base"
    data["routes"] = [
        {"name": "a", "auth": "anonymous", "path_prefix": "/a", "upstream": url},
        {"name": "b", "auth": "anonymous", "path_prefix": "/b", "upstream": url},
    ]
    cfg = parse(data, source=SOURCE)
    assert cfg.routes[0].upstream is cfg.routes[1].upstream
    assert cfg.upstreams[url] is cfg.routes[0].upstream
    assert cfg.routes[0].upstream.base_path == b"/base"


def test_different_urls_get_different_upstreams() -> None:
    """Routes that give different http URLs get different Upstream objects."""
    data = minimal()
    data["routes"] = [
        {"name": "a", "auth": "anonymous", "path_prefix": "/a", "upstream": "http://127.0.0.1:9000"},
        {"name": "b", "auth": "anonymous", "path_prefix": "/b", "upstream": "http://127.0.0.1:9001"},
    ]
    a, b = parse(data, source=SOURCE).routes
    assert a.upstream is not b.upstream
    assert (a.upstream.port, b.upstream.port) == (9000, 9001)


def test_routes_naming_one_upstream_share_it() -> None:
    """Routes naming the same upstream share the one Upstream object defined under [upstreams]."""
    data = minimal()
    data["routes"].append({"name": "other", "auth": "anonymous", "path_prefix": "/other", "upstream": "app"})
    cfg = parse(data, source=SOURCE)
    assert cfg.routes[0].upstream is cfg.routes[1].upstream is cfg.upstreams["app"]


@pytest.mark.parametrize(
    ("url", "host", "port", "base_path"),
    [
        ("http://127.0.0.1:8081", "127.0.0.1", 8081, b""),
        ("http://127.0.0.1:8081/", "127.0.0.1", 8081, b""),
        ("http://Backend.Example.COM", "backend.example.com", 80, b""),
        ("http://backend:81/base/", "backend", 81, b"/base"),
        ("http://backend/a/b%20c", "backend", 80, b"/a/b%20c"),
        ("http://[::1]:9000/v1", "::1", 9000, b"/v1"),
    ],
)
def test_upstream_url(url: str, host: str, port: int, base_path: bytes) -> None:
    """An upstream URL gives host (lower-cased), port (80 by default) and a base path without trailing slash."""
    data = minimal()
    data["upstreams"]["app"]["url"] = url
    upstream = parse(data, source=SOURCE).upstreams["app"]
    assert (upstream.scheme, upstream.host, upstream.port, upstream.base_path) == ("http", host, port, base_path)


def test_upstream_pool_settings() -> None:
    """Pool settings of an upstream are read with their units."""
    data = minimal()
    data["upstreams"]["app"].update(
        max_connections=8, max_queue=16, queue_timeout="500ms", idle_timeout="2s", max_idle_connections=4
    )
    upstream = parse(data, source=SOURCE).upstreams["app"]
    assert (
        upstream.max_connections,
        upstream.max_queue,
        upstream.queue_timeout,
        upstream.idle_timeout,
        upstream.max_idle_connections,
    ) == (8, 16, 0.5, 2.0, 4)


@pytest.mark.parametrize(
    ("host", "port", "origin"),
    [
        ("127.0.0.1", 8081, b"http://127.0.0.1:8081"),
        ("backend.example.com", 80, b"http://backend.example.com:80"),
        ("::1", 9000, b"http://[::1]:9000"),
        ("2001:db8::7", 80, b"http://[2001:db8::7]:80"),
    ],
)
def test_upstream_origin(host: str, port: int, origin: bytes) -> None:
    """Upstream.origin is scheme://host:port as bytes, with IPv6 literals in brackets."""
    upstream = Upstream(name="u", scheme="http", host=host, port=port, base_path=b"/ignored")
    assert upstream.origin == origin


def test_workers_above_one_with_fixed_ports() -> None:
    """server.workers = 4 is accepted when every listener names its port."""
    data = with_(server={"workers": 4}, listeners=[{"host": "127.0.0.1", "port": 8080}, {"host": "::1", "port": 8080}])
    assert parse(data, source=SOURCE).server.workers == 4


def test_workers_above_one_reject_a_listener_on_port_zero() -> None:
    """With server.workers above 1, a listener on port 0 is an error on its port that says why (SO_REUSEPORT)."""
    data = with_(server={"workers": 2}, listeners=[{"host": "127.0.0.1", "port": 8080}, {"host": "::1", "port": 0}])
    error = error_of(data)
    assert error.key == 'listeners["[::1]:0"].port'
    assert error.reason == (
        "must not be 0 when server.workers is above 1 (it is 2): each worker process binds its own socket with "
        "SO_REUSEPORT, so port 0 would give each process a different port"
    )


def test_workers_above_one_take_any_admin_port() -> None:
    """The admin listener is one for the whole gateway (twistd answers for every worker), so with workers above 1
    its port may be 0 or the last one."""
    for port in (0, 65535):
        data = with_(server={"workers": 4}, listeners=[{"host": "127.0.0.1", "port": 8080}], admin={"port": port})
        admin = parse(data, source=SOURCE).admin
        assert admin is not None and admin.port == port


def test_one_worker_allows_port_zero() -> None:
    """server.workers = 1 (the default, said explicitly) keeps port 0 valid."""
    data = with_(server={"workers": 1}, listeners=[{"host": "127.0.0.1", "port": 0}])
    assert parse(data, source=SOURCE).listeners[0].port == 0


def test_two_listeners_on_port_zero_are_allowed() -> None:
    """Two listeners on port 0 of one address are not duplicates: each picks its own free port."""
    data = with_(listeners=[{"host": "127.0.0.1", "port": 0}, {"host": "127.0.0.1", "port": 0}])
    assert len(parse(data, source=SOURCE).listeners) == 2


# --- errors: every error names the file, the key path and the reason -----------------------------------------


def _both(*mutations: Mutation) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        for mutation in mutations:
            mutation(data)

    return mutate


def _add_route(**route: Any) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        data["routes"].append({"auth": "anonymous", **route})

    return mutate


ERROR_CASES: list[tuple[str, Mutation, str, str]] = [
    # unknown keys, at every level
    ("unknown-top", set_at("tiemouts", {}), "tiemouts", "unknown key"),
    ("unknown-server", set_at("server.viaa", "x"), "server.viaa", "unknown key"),
    ("unknown-limits", set_at("limits.max_body", 1), "limits.max_body", "unknown key"),
    ("unknown-flow", set_at("flow_control.high", 1), "flow_control.high", "unknown key"),
    ("unknown-timeouts", set_at("timeouts.conect", 1), "timeouts.conect", "unknown key"),
    ("unknown-listener", set_at("listeners.0.hots", "x"), 'listeners["127.0.0.1:8080"].hots', "unknown key"),
    ("unknown-upstream", set_at("upstreams.app.urll", "x"), "upstreams.app.urll", "unknown key"),
    ("unknown-route", set_at("routes.0.pathprefix", "/x"), 'routes["app"].pathprefix', "unknown key"),
    (
        "unknown-route-timeouts",
        _add_route(name="b", path_prefix="/b", upstream="app", timeouts={"conect": "1s"}),
        'routes["b"].timeouts.conect',
        "unknown key",
    ),
    (
        "route-header-limit-not-overridable",
        set_at("routes.0.limits", {"max_header_bytes": 1}),
        'routes["app"].limits.max_header_bytes',
        "unknown key",
    ),
    ("unknown-route-flow", set_at("routes.0.flow_control", {"hi": 1}), 'routes["app"].flow_control.hi', "unknown key"),
    # wrong types
    ("port-bool", set_at("listeners.0.port", True), "listeners[0].port", "must be a port number from 0 to 65535"),
    ("port-string", set_at("listeners.0.port", "8080"), "listeners[0].port", "must be a port number"),
    (
        "backlog-bool",
        set_at("listeners.0.backlog", True),
        'listeners["127.0.0.1:8080"].backlog',
        "must be an integer, got a boolean",
    ),
    ("count-string", set_at("limits.max_header_count", "100"), "limits.max_header_count", "must be an integer, got a"),
    ("count-float", set_at("limits.max_header_count", 1.0), "limits.max_header_count", "must be an integer, got a"),
    ("server-string", set_at("server", "fast"), "server", "must be a table, got a string"),
    ("timeouts-array", set_at("timeouts", [1]), "timeouts", "must be a table, got an array"),
    (
        "route-timeouts-string",
        set_at("routes.0.timeouts", "30s"),
        'routes["app"].timeouts',
        "must be a table, got a str",
    ),
    ("route-limits-int", set_at("routes.0.limits", 5), 'routes["app"].limits', "must be a table, got an integer"),
    ("routes-table", set_at("routes", {"name": "x"}), "routes", "must be an array of tables ([[routes]]), got a table"),
    ("listeners-ints", set_at("listeners", [1]), "listeners", "must be an array of tables ([[listeners]])"),
    ("upstreams-array", set_at("upstreams", []), "upstreams", "must be a table, got an array"),
    ("upstream-string", set_at("upstreams.app", "http://x"), "upstreams.app", "must be a table, got a string"),
    (
        "strip-string",
        set_at("routes.0.strip_prefix", "yes"),
        'routes["app"].strip_prefix',
        "must be true or false, got",
    ),
    ("name-int", set_at("routes.0.name", 5), "routes[0].name", "must be a string, got an integer"),
    ("via-int", set_at("server.via", 1), "server.via", "must be a string, got an integer"),
    ("workers-bool", set_at("server.workers", True), "server.workers", "must be an integer, got a boolean"),
    ("workers-string", set_at("server.workers", "2"), "server.workers", "must be an integer, got a string"),
    ("workers-float", set_at("server.workers", 2.0), "server.workers", "must be an integer, got a number"),
    ("via-spaces", set_at("server.via", "my gateway"), "server.via", "must be a single token"),
    ("host-header", set_at("routes.0.host_header", "origin"), 'routes["app"].host_header', 'must be "upstream"'),
    (
        "listener-hostname",
        set_at("listeners.0.host", "localhost"),
        'listeners["localhost:8080"].host',
        "must be an IP address",
    ),
    ("url-int", set_at("upstreams.app.url", 8081), "upstreams.app.url", "must be a string, got an integer"),
    ("upstream-bool", set_at("routes.0.upstream", True), 'routes["app"].upstream', "must be a string, got a boolean"),
    # impossible values
    ("connect-negative", set_at("timeouts.connect", -1), "timeouts.connect", "must be a positive number of seconds"),
    ("connect-zero", set_at("timeouts.connect", 0), "timeouts.connect", "must be a positive number of seconds"),
    (
        "route-idle-zero",
        set_at("routes.0.timeouts", {"upstream_idle": 0}),
        'routes["app"].timeouts.upstream_idle',
        "must be a positive number of seconds, got 0",
    ),
    ("queue-timeout-zero", set_at("upstreams.app.queue_timeout", "0s"), "upstreams.app.queue_timeout", "must be"),
    ("server-idle-neg", set_at("server.idle_timeout", -3), "server.idle_timeout", "must be a positive number"),
    ("workers-zero", set_at("server.workers", 0), "server.workers", "must be a positive integer, got 0"),
    ("workers-negative", set_at("server.workers", -2), "server.workers", "must be a positive integer, got -2"),
    ("max-conn-zero", set_at("upstreams.app.max_connections", 0), "upstreams.app.max_connections", "must be a pos"),
    (
        "port-70000",
        set_at("listeners.0.port", 70000),
        'listeners["127.0.0.1:70000"].port',
        "must be a port number from 0 to 65535",
    ),
    (
        "port-negative",
        set_at("listeners.0.port", -1),
        'listeners["127.0.0.1:-1"].port',
        "must be a port number from 0 to 65535",
    ),
    (
        "water-equal",
        set_at("flow_control", {"high_water": "64KiB", "low_water": "64KiB"}),
        "flow_control.low_water",
        "must be below high_water (65536 >= 65536)",
    ),
    (
        "water-above",
        set_at("flow_control", {"high_water": 100, "low_water": 200}),
        "flow_control.low_water",
        "must be below high_water (200 >= 100)",
    ),
    (
        "water-default-high",
        set_at("flow_control", {"low_water": "1MiB"}),
        "flow_control.low_water",
        "must be below high_water",
    ),
    (
        "route-water-equal",
        set_at("routes.0.flow_control", {"high_water": 1000, "low_water": 1000}),
        'routes["app"].flow_control.low_water',
        "must be below high_water (1000 >= 1000)",
    ),
    (
        "route-water-inherited-high",
        set_at("routes.0.flow_control", {"low_water": "1MiB"}),
        'routes["app"].flow_control.low_water',
        "must be below high_water",
    ),
    ("prefix-no-slash", set_at("routes.0.path_prefix", "api"), 'routes["app"].path_prefix', 'must start with "/"'),
    ("prefix-empty", set_at("routes.0.path_prefix", ""), 'routes["app"].path_prefix', "must not be empty"),
    ("prefix-space", set_at("routes.0.path_prefix", "/a b"), 'routes["app"].path_prefix', "must contain only URL path"),
    ("host-star", set_at("routes.0.host", "*"), 'routes["app"].host', "must be a host name"),
    ("host-port", set_at("routes.0.host", "api.example.com:80"), 'routes["app"].host', "must be a host name"),
    ("host-underscore", set_at("routes.0.host", "a_b.example.com"), 'routes["app"].host', "must be a host name"),
    ("host-leading-dash", set_at("routes.0.host", "-a.example.com"), 'routes["app"].host', "must be a host name"),
    ("host-empty-label", set_at("routes.0.host", "a..example.com"), 'routes["app"].host', "must be a host name"),
    ("host-double-star", set_at("routes.0.host", "*.*.example.com"), 'routes["app"].host', "must be a host name"),
    ("host-inner-star", set_at("routes.0.host", "api.*.com"), 'routes["app"].host', "must be a host name"),
    ("host-empty", set_at("routes.0.host", ""), 'routes["app"].host', "must not be empty"),
    ("tls-on-http", set_at("upstreams.app.tls", {"verify": False}), "upstreams.app.tls", "is for an https upstream"),
    ("url-ftp", set_at("upstreams.app.url", "ftp://x"), "upstreams.app.url", "must be an http or https URL"),
    ("url-no-host", set_at("upstreams.app.url", "http://"), "upstreams.app.url", "must be an http or https URL"),
    ("url-no-scheme", set_at("upstreams.app.url", "127.0.0.1:8081"), "upstreams.app.url", "must be an http or https"),
    ("url-query", set_at("upstreams.app.url", "http://x/?a=1"), "upstreams.app.url", "must not carry a query"),
    ("url-fragment", set_at("upstreams.app.url", "http://x/#top"), "upstreams.app.url", "must not carry a query"),
    ("url-credentials", set_at("upstreams.app.url", "http://u:p@x/"), "upstreams.app.url", "must not carry a query"),
    ("url-user", set_at("upstreams.app.url", "http://u@x/"), "upstreams.app.url", "must not carry a query"),
    ("url-bad-port", set_at("upstreams.app.url", "http://x:99999"), "upstreams.app.url", "has an invalid port"),
    ("url-empty", set_at("upstreams.app.url", ""), "upstreams.app.url", "must not be empty"),
    (
        "route-url-query",
        set_at("routes.0.upstream", "http://x/?q"),
        'routes["app"].upstream',
        "must not carry a query",
    ),
    ("upstream-name", set_at("upstreams.a b", {"url": "http://x"}), "upstreams.a b", "a name may contain only"),
    # missing, duplicate and empty
    ("no-url", set_at("upstreams.app", {}), "upstreams.app.url", "is required"),
    ("no-route-name", set_at("routes.0", {"auth": "anonymous", "upstream": "app"}), "routes[0].name", "is required"),
    (
        "no-route-upstream",
        set_at("routes.0", {"auth": "anonymous", "name": "app"}),
        'routes["app"].upstream',
        "is required",
    ),
    ("no-listener-port", set_at("listeners.0", {"host": "127.0.0.1"}), "listeners[0].port", "is required"),
    (
        "duplicate-route",
        _add_route(name="app", path_prefix="/other", upstream="app"),
        "routes[1].name",
        "route name 'app' is used twice",
    ),
    (
        "duplicate-listener",
        set_at("listeners", [{"host": "127.0.0.1", "port": 8080}, {"host": "127.0.0.1", "port": 8080}]),
        "listeners[1]",
        "127.0.0.1:8080 is listed twice",
    ),
    ("listeners-missing", delete_at("listeners"), "listeners", "is required (add at least one [[listeners]] table)"),
    ("listeners-empty", set_at("listeners", []), "listeners", "at least one listener is needed"),
    ("routes-missing", delete_at("routes"), "routes", "is required (add at least one [[routes]] table)"),
    ("routes-empty", set_at("routes", []), "routes", "at least one route is needed"),
    # operations: drain, trusted proxies, listeners by systemd or behind PROXY, the access log, the admin listener
    ("drain-negative", set_at("server.drain_timeout", -1), "server.drain_timeout", "must be a positive"),
    ("trusted-not-list", set_at("server.trusted_proxies", "10.0.0.0/8"), "server.trusted_proxies", "must be an array"),
    ("trusted-bad", set_at("server.trusted_proxies", ["10.0.0.1/8"]), "server.trusted_proxies", "'10.0.0.1/8' is not"),
    ("trusted-name", set_at("server.trusted_proxies", ["lb.local"]), "server.trusted_proxies", "'lb.local' is not"),
    (
        "proxy-text",
        set_at("listeners.0.proxy_protocol", "yes"),
        'listeners["127.0.0.1:8080"].proxy_protocol',
        "true or false",
    ),
    ("hide-not-list", set_at("server.hide_response_headers", "Server"), "server.hide_response_headers", "an array"),
    ("rate-headers", set_at("routes.0.rate_limit_headers", "yes"), 'routes["app"].rate_limit_headers', "true or false"),
    (
        "hide-bad-name",
        set_at("routes.0.hide_response_headers", ["X Powered"]),
        'routes["app"].hide_response_headers',
        "'X Powered' is not a header name",
    ),
    (
        "hide-framing",
        set_at("routes.0.hide_response_headers", ["Content-Length"]),
        'routes["app"].hide_response_headers',
        "cannot be hidden",
    ),
    ("server-header-control", set_at("server.server_header", "gw\r\nX: 1"), "server.server_header", "visible ASCII"),
    ("server-header-type", set_at("server.server_header", 1), "server.server_header", "must be a string"),
    (
        "proxy-from-without-proxy",
        set_at("listeners.0.proxy_protocol_from", ["10.0.0.0/8"]),
        'listeners["127.0.0.1:8080"].proxy_protocol_from',
        "needs proxy_protocol = true",
    ),
    (
        "proxy-from-bad",
        lambda d: d["listeners"][0].update(proxy_protocol=True, proxy_protocol_from=["10.0.0.1/8"]),
        'listeners["127.0.0.1:8080"].proxy_protocol_from',
        "'10.0.0.1/8' is not",
    ),
    (
        "systemd-with-port",
        set_at("listeners.0", {"systemd": "http", "port": 8080}),
        'listeners["systemd:http"].port',
        "set in its .socket unit",
    ),
    ("systemd-empty", set_at("listeners.0", {"systemd": ""}), "listeners[0].systemd", "must not be empty"),
    (
        "systemd-twice",
        set_at("listeners", [{"systemd": "http"}, {"systemd": "http"}]),
        "listeners[1]",
        "systemd socket 'http' is listed twice",
    ),
    ("access-log-key", set_at("access_log.file", "x.log"), "access_log.file", "unknown key"),
    ("access-log-dir", set_at("access_log.path", "/nonexistent-dir/a.log"), "access_log.path", "does not exist"),
    ("access-log-query", set_at("access_log.query", 1), "access_log.query", "true or false"),
    ("admin-host", set_at("admin.host", "localhost"), "admin.host", "must be an IP address"),
    ("admin-port", set_at("admin.port", 70000), "admin.port", "from 0 to 65535"),
    ("admin-key", set_at("admin.path", "/metrics"), "admin.path", "unknown key"),
]


@pytest.mark.parametrize(
    ("mutate", "key", "reason"), [case[1:] for case in ERROR_CASES], ids=[case[0] for case in ERROR_CASES]
)
def test_error_names_file_key_and_reason(mutate: Mutation, key: str, reason: str) -> None:
    """Every invalid config raises a ConfigError naming the file, the key path and why."""
    data = minimal()
    mutate(data)
    error = error_of(data)
    assert (error.source, error.key) == (SOURCE, key)
    assert reason in error.reason
    assert str(error) == f"{SOURCE}: {key}: {error.reason}"


def test_upstream_url_with_port_zero_is_an_error() -> None:
    """An upstream URL with port 0 is an error about its port rather than silently becoming port 80."""
    data = minimal()
    data["upstreams"]["app"]["url"] = "http://127.0.0.1:0"
    error = error_of(data)
    assert error.key == "upstreams.app.url"
    assert "port" in error.reason


def test_unknown_upstream_lists_known_names() -> None:
    """A route naming an unknown upstream is an error that lists the names that do exist."""
    data = with_(upstreams={"billing": {"url": "http://10.0.0.1"}, "accounts": {"url": "http://10.0.0.2"}})
    data["routes"][0]["upstream"] = "biling"
    error = error_of(data)
    assert str(error) == (
        f'{SOURCE}: routes["app"].upstream: '
        "no upstream named 'biling' (known: accounts, billing); give a name or a URL"
    )


def test_unknown_upstream_with_none_defined() -> None:
    """A route naming an upstream when none are defined says so."""
    data = minimal()
    del data["upstreams"]
    error = error_of(data)
    assert error.key == 'routes["app"].upstream'
    assert "(known: none are defined)" in error.reason


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            with_(routes=[{"name": "a", "auth": "anonymous", "upstream": "app", "timeouts": {"connect": -1}}]),
            'test.toml: routes["a"].timeouts.connect: must be a positive number of seconds, got -1',
        ),
        (
            with_(listeners=[{"host": "127.0.0.1", "port": 70000}]),
            'test.toml: listeners["127.0.0.1:70000"].port: must be a port number from 0 to 65535, got 70000',
        ),
        (
            with_(routes=[{"name": "a", "auth": "anonymous", "upstream": "app", "path_prefix": "api"}]),
            'test.toml: routes["a"].path_prefix: must start with "/", got \'api\'',
        ),
        (
            with_(server={"idle_timeout": "60s", "viaa": "x"}),
            'test.toml: server.viaa: unknown key; did you mean "via"?',
        ),
    ],
)
def test_error_message_format(data: dict[str, Any], message: str) -> None:
    """str(ConfigError) reads "source: key: reason"."""
    assert str(error_of(data)) == message


def test_error_without_key_reads_source_and_reason() -> None:
    """A ConfigError without a key prints as "source: reason"."""
    assert str(ConfigError("x.toml", "", "broken")) == "x.toml: broken"


# --- every error at once: one load reports them all, each item named by its name ------------------------------

IDLE_SOON = 'must be seconds as a number or a string such as "250ms", "30s", "2m", got \'soon\''


def messages(data: dict[str, Any]) -> list[str]:
    """Every error of `data`, one string each, as `str(ConfigError)` lists them one per line."""
    error = error_of(data)
    assert str(error) == "\n".join(str(e) for e in error.errors)
    return [str(e) for e in error.errors]


def test_three_errors_in_three_sections_are_reported_in_one_error() -> None:
    """Three independent errors (the server, a listener, a route) make one ConfigError listing all three, one per
    line, in the order the file is read; `errors` carries each, and source, key and reason are the first's."""
    data = with_(server={"idle_timeout": "soon"})
    data["listeners"][0]["port"] = 70000
    data["routes"][0]["path_prefix"] = "api"
    error = error_of(data)
    assert str(error) == (
        f"test.toml: server.idle_timeout: {IDLE_SOON}\n"
        'test.toml: listeners["127.0.0.1:70000"].port: must be a port number from 0 to 65535, got 70000\n'
        'test.toml: routes["app"].path_prefix: must start with "/", got \'api\''
    )
    assert [(e.source, e.key) for e in error.errors] == [
        (SOURCE, "server.idle_timeout"),
        (SOURCE, 'listeners["127.0.0.1:70000"].port'),
        (SOURCE, 'routes["app"].path_prefix'),
    ]
    assert (error.source, error.key, error.reason) == (SOURCE, "server.idle_timeout", IDLE_SOON)


def test_every_error_of_one_item_and_of_every_item() -> None:
    """Two bad values in one route, and two routes with an error each: all four are reported (a bad value does
    not stop the reading of its table, nor of the tables after it)."""
    data = minimal()
    data["routes"][0].update(strip_prefix="yes", timeouts={"connect": 0})
    data["routes"].append({"name": "b", "auth": "anonymous", "upstream": "app", "path_prefix": "/b", "hots": "x"})
    data["routes"].append({"name": "c", "auth": "anonymous", "upstream": "app", "path_prefix": "c"})
    assert messages(data) == [
        'test.toml: routes["app"].strip_prefix: must be true or false, got a string',
        'test.toml: routes["app"].timeouts.connect: must be a positive number of seconds, got 0',
        'test.toml: routes["b"].hots: unknown key; did you mean "host"?',
        'test.toml: routes["c"].path_prefix: must start with "/", got \'c\'',
    ]


def test_every_unknown_key_of_a_table_is_reported() -> None:
    """Two typos in one table are two errors, not the first of them."""
    assert messages(with_(server={"viaa": "x", "drain_timout": 1})) == [
        'test.toml: server.drain_timout: unknown key; did you mean "drain_timeout"?',
        'test.toml: server.viaa: unknown key; did you mean "via"?',
    ]


def test_an_unknown_key_close_to_a_known_one_names_it() -> None:
    """An unknown key that is a misspelling of a key the table knows (and does not have) says which."""
    data = minimal()
    data["routes"][0]["timeouts"] = {"conect": "1s"}
    assert messages(data) == ['test.toml: routes["app"].timeouts.conect: unknown key; did you mean "connect"?']
    assert messages(with_(tiemouts={})) == ['test.toml: tiemouts: unknown key; did you mean "timeouts"?']


def test_an_unknown_key_close_to_nothing_suggests_nothing() -> None:
    """An unknown key like no known key gets the plain advice, no guess."""
    assert messages(with_(server={"colour": "blue"})) == [
        "test.toml: server.colour: unknown key (check its spelling and the section it is in)"
    ]
    assert "did you mean" not in error_of(with_(zebra=1)).reason


def test_a_misspelt_required_key_is_one_error_naming_what_was_written() -> None:
    """`urls` for an upstream's required `url` is one error about `urls` that suggests `url`, not a second one
    saying `url` is missing; a route naming that upstream says nothing more."""
    data = minimal()
    data["upstreams"]["api"] = {"urls": "http://127.0.0.1:8082"}
    data["routes"][0]["upstream"] = "api"
    assert messages(data) == ['test.toml: upstreams.api.urls: unknown key; did you mean "url"?']
    data = minimal()
    data["listeners"][0] = {"host": "127.0.0.1", "prot": 8080}
    assert messages(data) == ['test.toml: listeners[0].prot: unknown key; did you mean "port"?']
    data = minimal()
    data["listener"] = data.pop("listeners")
    assert messages(data) == ['test.toml: listener: unknown key; did you mean "listeners"?']


def test_a_required_key_missing_beside_a_known_key_like_it_is_missing() -> None:
    """A key the table knows is never taken for a misspelling of a missing one: a TLS table with
    client_certificates but no certificates lacks certificates."""
    data = minimal()
    data["listeners"][0]["tls"] = {"client_certificates": "none"}
    assert messages(data) == [
        'test.toml: listeners["127.0.0.1:8080"].tls.certificates: is required (add at least one [[certificates]] table)'
    ]


@pytest.mark.parametrize(
    ("listener", "key"),
    [
        ({"host": "127.0.0.1", "port": 8080, "backlog": 0}, 'listeners["127.0.0.1:8080"].backlog'),
        ({"host": "::1", "port": 8443, "backlog": 0}, 'listeners["[::1]:8443"].backlog'),
        ({"systemd": "http", "backlog": 0}, 'listeners["systemd:http"].backlog'),
        ({"host": "127.0.0.1", "port": "80", "backlog": 0}, "listeners[0].backlog"),
    ],
    ids=["ipv4", "ipv6", "systemd", "no-address"],
)
def test_a_listener_is_named_by_its_address(listener: dict[str, Any], key: str) -> None:
    """A listener is named in errors by the address written in it (IPv6 in brackets), or its systemd socket;
    by its index when it has no address to be named by."""
    assert key in [e.key for e in error_of(with_(listeners=[listener])).errors]


def test_items_are_named_by_their_names_and_by_index_when_they_share_one() -> None:
    """A route is named by its name, an upstream by its table's; two routes with one name are named by their
    index, so each error points at one of them."""
    data = with_(upstreams={"billing": {"url": "http://10.0.0.1", "max_queue": 0}})
    data["routes"] = [
        {"name": "reports", "auth": "anonymous", "upstream": "billing", "host_header": "x"},
        {"name": "twice", "auth": "anonymous", "upstream": "billing", "path_prefix": "/a"},
        {"name": "twice", "auth": "anonymous", "upstream": "billing", "path_prefix": "b"},
    ]
    assert [e.key for e in error_of(data).errors] == [
        "upstreams.billing.max_queue",
        'routes["reports"].host_header',
        "routes[2].path_prefix",
        "routes[2].name",
    ]


def test_a_name_that_looks_like_a_path_is_quoted() -> None:
    """A route name is quoted as a JSON string, so no name can read as more of the path."""
    data = minimal()
    data["routes"][0].update(name='a"].b', strip_prefix=1)
    assert error_of(data).key == 'routes["a\\"].b"].strip_prefix'


def test_no_error_follows_from_a_refused_value() -> None:
    """A check that depends on a refused value is not made: no flow-control comparison with a refused water mark
    (here or inherited), no "needs proxy_protocol" when proxy_protocol was refused, no "no upstream named" for a
    route naming an upstream that could not be read."""
    data = with_(flow_control={"low_water": "lots", "high_water": "1KiB"})
    data["routes"][0]["flow_control"] = {"high_water": "512B"}
    data["listeners"][0].update(proxy_protocol="yes", proxy_protocol_from=["10.0.0.0/8"])
    data["upstreams"]["broken"] = {"url": "ftp://x"}
    data["routes"].append({"name": "b", "auth": "anonymous", "upstream": "broken", "path_prefix": "/b"})
    assert [e.key for e in error_of(data).errors] == [
        "flow_control.low_water",
        'listeners["127.0.0.1:8080"].proxy_protocol',
        "upstreams.broken.url",
    ]


def test_an_upstream_that_is_not_a_table_is_its_one_error() -> None:
    """`upstreams` given as something else than a table is reported once; the routes naming upstreams say
    nothing more."""
    assert messages(with_(upstreams=["app"])) == ["test.toml: upstreams: must be a table, got an array"]


def test_load_reports_every_error_of_the_file(tmp_path: Path) -> None:
    """`load` reads the file whole: its three errors are one ConfigError, each naming the file."""
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[server]\nidle_timeout = "soon"\n'
        '[[listeners]]\nhost = "127.0.0.1"\nport = 8080\n'
        '[upstreams.api]\nurls = "http://127.0.0.1:8081"\n'
        '[[routes]]\nname = "events"\nauth = "anonymous"\nupstream = "api"\n[routes.timeouts]\nconnect = -1\n'
    )
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value).splitlines() == [
        f"{path}: server.idle_timeout: {IDLE_SOON}",
        f'{path}: upstreams.api.urls: unknown key; did you mean "url"?',
        f'{path}: routes["events"].timeouts.connect: must be a positive number of seconds, got -1',
    ]


# --- load: reading the file ----------------------------------------------------------------------------------


def test_load_missing_file(tmp_path: Path) -> None:
    """A file that cannot be read is a ConfigError naming the file."""
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: cannot read the file: ")


def test_load_directory(tmp_path: Path) -> None:
    """A directory given as the config file is a ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: cannot read the file: ")


def test_load_invalid_toml(tmp_path: Path) -> None:
    """A file that is not valid TOML is a ConfigError naming the file."""
    path = tmp_path / "broken.toml"
    path.write_text("[[routes]\nname = 'x'\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value).startswith(f"{path}: not valid TOML: ")


def test_load_validation_error_names_the_file(tmp_path: Path) -> None:
    """A validation error from load names the file it read."""
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[[listeners]]\nhost = "127.0.0.1"\nport = 8080\n'
        '[[routes]]\nname = "a"\nauth = "anonymous"\nupstream = "http://127.0.0.1:8081"\n'
        '[routes.timeouts]\nconnect = "soon"\n'
    )
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value).startswith(f'{path}: routes["a"].timeouts.connect: must be seconds')


def test_load_accepts_a_string_path(tmp_path: Path) -> None:
    """load takes a str path as well as a Path."""
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[[listeners]]\nhost = "::"\nport = 0\n[[routes]]\nname = "a"\nauth = "anonymous"\nupstream = "http://127.0.0.1:8081"\n'
    )
    cfg = config.load(str(path))
    assert cfg.listeners == (Listener(host="::", port=0),)
    assert cfg.source == str(path)


# --- client limits: head timeout, connection cap, request-line limit ------------------------------------------


def test_example_shows_the_client_limit_defaults(example: Config) -> None:
    """etc/gateway.toml carries the head timeout, the connection cap and the request-line limit at their defaults."""
    assert example.server.head_timeout == 10.0
    assert example.server.max_connections == 10000
    assert example.limits.max_request_line_bytes == 8 * KiB


def test_client_limit_keys_are_read_with_units() -> None:
    """head_timeout takes a duration, max_connections an integer and max_request_line_bytes a size."""
    cfg = parse(
        with_(
            server={"head_timeout": "250ms", "max_connections": 3},
            limits={"max_request_line_bytes": "2KiB"},
        ),
        source=SOURCE,
    )
    assert cfg.server.head_timeout == 0.25
    assert cfg.server.max_connections == 3
    assert cfg.limits.max_request_line_bytes == 2 * KiB


def test_request_line_limit_may_be_exactly_the_shortest_request_line() -> None:
    """18 bytes ("OPTIONS * HTTP/1.1") is the smallest request-line limit accepted."""
    cfg = parse(with_(limits={"max_request_line_bytes": 18}), source=SOURCE)
    assert cfg.limits.max_request_line_bytes == 18


CLIENT_LIMIT_ERRORS: list[tuple[str, Mutation, str, str]] = [
    ("head-timeout-zero", set_at("server.head_timeout", 0), "server.head_timeout", "must be a positive number of sec"),
    ("head-timeout-word", set_at("server.head_timeout", "soon"), "server.head_timeout", "must be seconds as a number"),
    ("head-timeout-bool", set_at("server.head_timeout", True), "server.head_timeout", "must be a number of seconds"),
    ("max-conns-zero", set_at("server.max_connections", 0), "server.max_connections", "must be a positive integer"),
    ("max-conns-neg", set_at("server.max_connections", -5), "server.max_connections", "must be a positive integer"),
    ("max-conns-float", set_at("server.max_connections", 1e4), "server.max_connections", "must be an integer, got a n"),
    ("max-conns-str", set_at("server.max_connections", "10k"), "server.max_connections", "must be an integer, got a s"),
    (
        "line-too-small",
        set_at("limits.max_request_line_bytes", 17),
        "limits.max_request_line_bytes",
        'must be at least 18 bytes (room for "OPTIONS * HTTP/1.1"), got 17',
    ),
    ("line-zero", set_at("limits.max_request_line_bytes", 0), "limits.max_request_line_bytes", "must be a positive"),
    ("line-unit", set_at("limits.max_request_line_bytes", "8 lines"), "limits.max_request_line_bytes", "must be bytes"),
    ("line-float", set_at("limits.max_request_line_bytes", 8.5), "limits.max_request_line_bytes", "must be a whole"),
    (
        "route-line-limit-not-overridable",
        set_at("routes.0.limits", {"max_request_line_bytes": 1024}),
        'routes["app"].limits.max_request_line_bytes',
        "unknown key",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "key", "reason"),
    [case[1:] for case in CLIENT_LIMIT_ERRORS],
    ids=[case[0] for case in CLIENT_LIMIT_ERRORS],
)
def test_client_limit_errors_name_file_key_and_reason(mutate: Mutation, key: str, reason: str) -> None:
    """A wrong type or an impossible value for a client limit is a ConfigError naming the file, key and reason."""
    data = minimal()
    mutate(data)
    error = error_of(data)
    assert error.source == SOURCE
    assert error.key == key
    assert reason in error.reason
    assert str(error).startswith(f"{SOURCE}: {key}: ")


# --- routes: allow_methods, and prefixes every request could match (tests/test_request_targets.py) -----------


def test_allow_methods_defaults_to_none_and_takes_any_case(example: Config) -> None:
    """A route allows no extra method unless told (the example's routes neither); names are taken in any case."""
    assert {r.allow_methods for r in example.routes} == {frozenset()}
    data = minimal()
    data["routes"][0]["allow_methods"] = ["trace", "TRACK"]
    assert parse(data, source=SOURCE).routes[0].allow_methods == frozenset({"TRACE", "TRACK"})


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (["CONNECT"], "CONNECT cannot be allowed: the gateway does not tunnel"),
        (["connect"], "CONNECT cannot be allowed"),
        (["GET"], 'may name only methods refused by default ("TRACE", "TRACK")'),
        (["TRACE", "PROPFIND"], "may name only methods refused by default"),
        ("TRACE", "must be an array of method names"),
        ([1], "must be an array of method names"),
    ],
)
def test_allow_methods_errors_name_file_key_and_reason(value: object, reason: str) -> None:
    """allow_methods may name only TRACE and TRACK: CONNECT, and methods forwarded anyway, are config errors."""
    data = minimal()
    data["routes"][0]["allow_methods"] = value
    error = error_of(data)
    assert (error.source, error.key) == (SOURCE, 'routes["app"].allow_methods')
    assert reason in error.reason


@pytest.mark.parametrize(
    ("prefix", "reason"),
    [
        ("/a/../b", '"." or ".."'),
        ("/a/%2e%2E", '"." or ".."'),
        ("/a%2F..", '"." or ".."'),
        ("/a%5c.", '"." or ".."'),
        ("/a/.", '"." or ".."'),
        ("/a%zz", '"%" escapes of two hex digits'),
        ("/a%2", '"%" escapes of two hex digits'),
        ("/a%00", "no %00"),
        ("/a;b", 'must not contain ";"'),
        ("/..%3Bx", 'the path has a "." or ".." segment'),
        ("/a/.%3b", 'the path has a "." or ".." segment'),
        ("/a/%2E%2e%3B", 'the path has a "." or ".." segment'),
        ("/a%2F.%3Bv=1/b", 'the path has a "." or ".." segment'),
    ],
)
def test_path_prefix_no_request_could_match_is_an_error(prefix: str, reason: str) -> None:
    """A path_prefix with a dot-segment, a malformed escape, %00 or ";" is refused when the config loads, as
    every request that could match it would be refused."""
    data = minimal()
    data["routes"][0]["path_prefix"] = prefix
    error = error_of(data)
    assert (error.source, error.key) == (SOURCE, 'routes["app"].path_prefix')
    assert reason in error.reason


@pytest.mark.parametrize("prefix", ["/..%3Bx", "/a/.%3b"])
def test_path_prefix_with_a_dot_segment_before_encoded_parameters_fails_loading_not_make_gateway(
    tmp_path: Path, prefix: str
) -> None:
    """A prefix the router would refuse ("..%3Bx" is ".." to upstreams that cut parameters at an encoded ";")
    fails `load` with an error naming the file, the key and the reason; it never reaches `make_gateway`."""
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[[listeners]]\nhost = "127.0.0.1"\nport = 8080\n[upstreams.app]\nurl = "http://127.0.0.1:8081"\n'
        f'[[routes]]\nname = "app"\nauth = "anonymous"\npath_prefix = "{prefix}"\nupstream = "app"\n'
    )
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value).startswith(f'{path}: routes["app"].path_prefix: must be a path requests could be routed by')
    assert '"." or ".." segment' in info.value.reason and prefix in info.value.reason


@settings(max_examples=300)
@given(prefix=st.text(alphabet="/a.%2eEfF5cC0;~-3bB", min_size=1, max_size=10).map(lambda s: "/" + s))
def test_every_accepted_prefix_is_a_routing_path(prefix: str) -> None:
    """Any path_prefix the config accepts can be routed on (the router never meets a prefix it would refuse),
    and any it refuses is refused as routes["app"].path_prefix."""
    data = minimal()
    data["routes"][0]["path_prefix"] = prefix
    try:
        cfg = parse(data, source=SOURCE)
    except ConfigError as e:
        assert e.key == 'routes["app"].path_prefix'
        return
    routing_path(cfg.routes[0].path_prefix)


def test_underscores_in_headers_is_off_by_default_and_must_be_a_boolean() -> None:
    """Off unless said (nginx's default); anything but true/false is an error naming the key."""
    assert parse(minimal(), source="t.toml").server.underscores_in_headers is False
    data = minimal()
    data["server"] = {"underscores_in_headers": True}
    assert parse(data, source="t.toml").server.underscores_in_headers is True
    data["server"] = {"underscores_in_headers": "yes"}
    with pytest.raises(ConfigError) as caught:
        parse(data, source="t.toml")
    assert caught.value.key == "server.underscores_in_headers"


def test_response_header_keys() -> None:
    """By default Server and X-Powered-By are hidden on every route and the gateway sends no Server of its own;
    server.hide_response_headers changes the default, a route's own list (names in any case, [] for none)
    overrides it for that route."""
    cfg = parse(minimal(), source=SOURCE)
    assert cfg.server.server_header == ""
    assert cfg.routes[0].hide_response_headers == {b"server", b"x-powered-by"}
    data = with_(server={"server_header": "edge gateway", "hide_response_headers": ["X-AspNet-Version"]})
    data["routes"].append(
        {"name": "raw", "auth": "anonymous", "path_prefix": "/raw", "upstream": "app", "hide_response_headers": []}
    )
    data["routes"].append(
        {
            "name": "php",
            "auth": "anonymous",
            "path_prefix": "/php",
            "upstream": "app",
            "hide_response_headers": ["x-POWERED-by"],
        }
    )
    cfg = parse(data, source=SOURCE)
    assert cfg.server.server_header == "edge gateway"
    assert [route.hide_response_headers for route in cfg.routes] == [
        {b"x-aspnet-version"},
        frozenset(),
        {b"x-powered-by"},
    ]


def test_operations_defaults() -> None:
    """Without the operations keys: a 30 s drain, no trusted proxies, the access log on stdout without query
    strings, no admin listener, listeners bound by the gateway without the PROXY protocol."""
    cfg = parse(minimal(), source=SOURCE)
    assert (cfg.server.drain_timeout, cfg.server.trusted_proxies) == (30.0, ())
    assert (cfg.access_log.path, cfg.access_log.query) == ("-", False)
    assert cfg.admin is None
    assert (cfg.listeners[0].systemd, cfg.listeners[0].proxy_protocol) == ("", False)


def test_operations_keys_are_read(tmp_path: Path) -> None:
    """The keys of operations as given: networks parsed (an address is a /32 or /128), a systemd listener by
    name, a PROXY listener, an access-log path relative to the config file's directory, the admin address."""
    data = with_(
        server={"drain_timeout": "5s", "trusted_proxies": ["10.0.0.0/8", "192.0.2.1", "::1"]},
        listeners=[
            {"systemd": "http", "proxy_protocol": True, "proxy_protocol_from": ["10.1.0.0/16", "fd00::1"]},
            {"host": "::", "port": 8443},
        ],
        access_log={"path": "logs/access.log", "query": True},
        admin={"port": 9100},
    )
    (tmp_path / "logs").mkdir()
    cfg = parse(data, source=tmp_path / "gateway.toml")
    assert cfg.server.drain_timeout == 5.0
    assert [str(n) for n in cfg.server.trusted_proxies] == ["10.0.0.0/8", "192.0.2.1/32", "::1/128"]
    assert cfg.listeners == (
        Listener(
            systemd="http",
            proxy_protocol=True,
            proxy_protocol_from=(ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00::1/128")),
        ),
        Listener(host="::", port=8443),
    )
    assert (cfg.access_log.path, cfg.access_log.query) == (str(tmp_path / "logs" / "access.log"), True)
    assert cfg.admin is not None and (cfg.admin.host, cfg.admin.port) == ("127.0.0.1", 9100)
    assert parse(with_(access_log={"path": ""}), source=SOURCE).access_log.path == ""
