"""Tests for gateway.routing.decision: the decision taken on a request head, and the purity of the decision
modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.web.http_headers import Headers

from gateway.config import Config, parse
from gateway.errors import BadRequest, BodyTooLarge, NoRoute
from gateway.routing.decision import Admit, Reject, RequestHead, decide
from gateway.routing.router import Router

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024

CONFIG: dict[str, Any] = {
    "listeners": [{"host": "127.0.0.1", "port": 8080}],
    "limits": {"max_request_body_bytes": "1MiB"},
    "upstreams": {"app": {"url": "http://127.0.0.1:8081/base"}},
    "routes": [
        {"name": "reports", "auth": "anonymous", "path_prefix": "/reports", "upstream": "app"},
        {
            "name": "uploads",
            "auth": "anonymous",
            "path_prefix": "/upload",
            "upstream": "app",
            "limits": {"max_request_body_bytes": "4MiB"},
        },
        {
            "name": "api",
            "auth": "anonymous",
            "path_prefix": "/api",
            "upstream": "http://127.0.0.1:9000",
            "strip_prefix": True,
        },
        {"name": "private", "auth": "anonymous", "host": "internal.example.com", "path_prefix": "/", "upstream": "app"},
        {
            "name": "tenants",
            "auth": "anonymous",
            "host": "*.tenants.example.com",
            "path_prefix": "/",
            "upstream": "app",
        },
        {"name": "public", "auth": "anonymous", "path_prefix": "/public", "upstream": "app"},
    ],
}


@pytest.fixture(scope="module")
def config() -> Config:
    return parse(CONFIG, source="test.toml")


@pytest.fixture(scope="module")
def router(config: Config) -> Router:
    return Router(config.routes)


def head(
    target: bytes,
    *,
    host: bytes | None = b"gw.example.com",
    method: bytes = b"GET",
    declared_length: int | None = 0,
    version: bytes = b"HTTP/1.1",
    hosts: list[bytes] | None = None,
) -> RequestHead:
    hdrs = Headers()
    if hosts is not None:
        hdrs.setRawHeaders(b"Host", hosts)
    elif host is not None:
        hdrs.setRawHeaders(b"Host", [host])
    return RequestHead(method, target, version, hdrs, declared_length)


def admitted(decision: Admit | Reject) -> Admit:
    assert isinstance(decision, Admit), decision
    return decision


def rejected(decision: Admit | Reject) -> Reject:
    assert isinstance(decision, Reject), decision
    return decision


def test_admit_gives_route_and_target(config: Config, router: Router) -> None:
    """An admitted request carries its route and the target for the upstream (base path, path and query)."""
    decision = admitted(decide(head(b"/reports/7?format=csv"), router))
    assert decision.route is config.routes[0]
    assert decision.upstream_target == b"/base/reports/7?format=csv"


def test_admit_strips_prefix(router: Router) -> None:
    """A route with strip_prefix sends the path without its prefix, keeping the query byte for byte."""
    decision = admitted(decide(head(b"/api/v1/a%2Fb?q=%20x"), router))
    assert decision.route.name == "api"
    assert decision.upstream_target == b"/v1/a%2Fb?q=%20x"


def test_query_does_not_take_part_in_routing(router: Router) -> None:
    """The query is not part of the path matched: "/reports?x" goes to the "/reports" route."""
    decision = admitted(decide(head(b"/reports?x=1"), router))
    assert decision.route.name == "reports"
    assert decision.upstream_target == b"/base/reports?x=1"


def test_host_is_matched_without_port_and_case(router: Router) -> None:
    """The Host header is matched lower-cased and without its port."""
    decision = admitted(decide(head(b"/anything", host=b"Internal.EXAMPLE.com:8443"), router))
    assert decision.route.name == "private"


def test_wildcard_host(router: Router) -> None:
    """A host below a wildcard route's domain goes to that route."""
    assert admitted(decide(head(b"/x", host=b"acme.tenants.example.com"), router)).route.name == "tenants"


@pytest.mark.parametrize(
    ("target", "host"),
    [(b"/nothing", b"gw.example.com"), (b"/reportsx", b"gw.example.com"), (b"/", b"tenants.example.com")],
)
def test_no_route_is_404(router: Router, target: bytes, host: bytes) -> None:
    """A request that matches no route is rejected with NoRoute, status 404."""
    decision = rejected(decide(head(target, host=host), router))
    assert isinstance(decision.error, NoRoute)
    assert decision.error.status == 404


def test_body_over_limit_is_413(router: Router) -> None:
    """A declared body one byte over the route's limit is rejected with BodyTooLarge, status 413."""
    decision = rejected(decide(head(b"/reports", method=b"POST", declared_length=MiB + 1), router))
    assert isinstance(decision.error, BodyTooLarge)
    assert decision.error.status == 413


def test_body_at_limit_is_admitted(router: Router) -> None:
    """A declared body exactly at the route's limit is admitted."""
    assert admitted(decide(head(b"/reports", method=b"POST", declared_length=MiB), router)).route.name == "reports"


def test_route_limit_override(router: Router) -> None:
    """A route's own body limit is the one applied: 2 MiB passes on "/upload" and not on "/reports"."""
    assert admitted(decide(head(b"/upload", method=b"PUT", declared_length=2 * MiB), router)).route.name == "uploads"
    rejected(decide(head(b"/reports", method=b"PUT", declared_length=2 * MiB), router))


def test_route_limit_override_upper_edge(router: Router) -> None:
    """A declared body over the overriding route limit is rejected with 413."""
    decision = rejected(decide(head(b"/upload", method=b"PUT", declared_length=4 * MiB + 1), router))
    assert isinstance(decision.error, BodyTooLarge)


def test_chunked_body_is_admitted(router: Router) -> None:
    """A body of unknown length (chunked) is admitted on the head; its size is checked as it arrives."""
    assert admitted(decide(head(b"/reports", method=b"POST", declared_length=None), router)).route.name == "reports"


@pytest.mark.parametrize(
    "target",
    [b"http://x/y", b"ftp://gw.example.com/reports", b"*", b"example.com:443", b"reports/1", b""],
)
def test_non_origin_form_is_400(router: Router, target: bytes) -> None:
    """A target that is not a path, nor an http(s) URL naming the Host (absolute form naming another host or
    scheme, asterisk form with GET, authority form) is rejected with BadRequest, 400."""
    decision = rejected(decide(head(target), router))
    assert isinstance(decision.error, BadRequest)
    assert decision.error.status == 400


def test_non_origin_form_is_400_even_with_catch_all() -> None:
    """A non-path target is rejected even when a catch-all route would match anything."""
    data = {**CONFIG, "routes": [{"name": "all", "auth": "anonymous", "path_prefix": "/", "upstream": "app"}]}
    router = Router(parse(data, source="test.toml").routes)
    assert isinstance(rejected(decide(head(b"http://x/"), router)).error, BadRequest)


def test_bad_request_checked_before_size(router: Router) -> None:
    """A non-path target is a 400 even when its declared body is also too large."""
    decision = rejected(decide(head(b"*", method=b"POST", declared_length=10 * MiB), router))
    assert isinstance(decision.error, BadRequest)


def test_http10_request_without_host_uses_hostless_routes(router: Router) -> None:
    """An HTTP/1.0 request without Host (allowed in 1.0) can reach a route without a host."""
    assert admitted(decide(head(b"/public/x", host=None, version=b"HTTP/1.0"), router)).route.name == "public"


def test_http10_request_without_host_never_reaches_host_routes(router: Router) -> None:
    """An HTTP/1.0 request without Host never reaches a route that names a host."""
    decision = rejected(decide(head(b"/anything", host=None, version=b"HTTP/1.0"), router))
    assert isinstance(decision.error, NoRoute)


@pytest.mark.parametrize("hosts", [[], [b"gw.example.com", b"gw.example.com"], [b"a.example", b"b.example"]])
def test_http11_request_without_exactly_one_host_is_bad(router: Router, hosts: list[bytes]) -> None:
    """An HTTP/1.1 request with no Host or with several gets 400 (RFC 9112 section 3.2), never a route."""
    decision = rejected(decide(head(b"/public/x", hosts=hosts), router))
    assert isinstance(decision.error, BadRequest)
    assert decision.error.status == 400


@pytest.mark.parametrize("target", [b"/caf\xe9", b"/a\x7fb", b"/a\x80"])
def test_target_with_bytes_outside_visible_ascii_is_bad(router: Router, target: bytes) -> None:
    """A request target with a byte outside visible ASCII gets 400 (Twisted's parser lets some through)."""
    decision = rejected(decide(head(target), router))
    assert isinstance(decision.error, BadRequest)


def test_rejection_detail_names_the_limit(router: Router) -> None:
    """The 413 detail states the declared size and the route's limit."""
    decision = rejected(decide(head(b"/reports", declared_length=MiB + 1), router))
    assert str(MiB + 1) in decision.error.detail
    assert str(MiB) in decision.error.detail


def test_pure_modules_do_not_import_twisted_internet() -> None:
    """Importing config, errors, routing (the router and the decision) and headers loads no twisted.internet module."""
    code = (
        "import json, sys\n"
        "import gateway.config, gateway.errors, gateway.routing.router, gateway.headers, gateway.routing.decision\n"
        "print(json.dumps(sorted(m for m in sys.modules"
        " if m == 'twisted.internet' or m.startswith('twisted.internet.'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
