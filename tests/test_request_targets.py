"""What a gateway must never forward: refused methods, absolute-form targets that disagree with Host, paths that
could escape a route's prefix. Checked at three levels: `decide` on a head, the real channel in memory
(`tests.support.memory`), and over loopback against a real origin, which must never see a refused request.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.web.http_headers import Headers

from gateway.config import Config, parse
from gateway.errors import BadRequest, MethodNotAllowed, NoRoute, NotSupported
from gateway.routing.decision import _HOST, FORWARDED_METHODS, Admit, Reject, RequestHead, decide
from gateway.routing.router import Router, host_without_port
from tests.support.clients import Parsed, connect, parse_response, parse_responses, within
from tests.support.memory import Client, MemoryGateway, disconnect
from tests.support.running import gateway_config

HOST = b"gw.example.com"

CONFIG: dict[str, Any] = {
    "listeners": [{"host": "127.0.0.1", "port": 8080}],
    "upstreams": {"app": {"url": "http://127.0.0.1:8081/base"}, "admin": {"url": "http://127.0.0.1:8082"}},
    "routes": [
        {"name": "root", "auth": "anonymous", "path_prefix": "/", "upstream": "app"},
        {"name": "reports", "auth": "anonymous", "path_prefix": "/reports", "upstream": "app"},
        {"name": "admin", "auth": "anonymous", "path_prefix": "/admin", "upstream": "admin"},
        {"name": "api", "auth": "anonymous", "path_prefix": "/api", "upstream": "app", "strip_prefix": True},
        {"name": "debug", "auth": "anonymous", "path_prefix": "/debug", "upstream": "app", "allow_methods": ["TRACE"]},
        {
            "name": "private",
            "auth": "anonymous",
            "host": "internal.example.com",
            "path_prefix": "/",
            "upstream": "admin",
        },
    ],
}


@pytest.fixture(scope="module")
def config() -> Config:
    return parse(CONFIG, source="test.toml")


@pytest.fixture(scope="module")
def router(config: Config) -> Router:
    return Router(config.routes)


def head(
    target: bytes, *, method: bytes = b"GET", host: bytes | None = HOST, version: bytes = b"HTTP/1.1"
) -> RequestHead:
    headers = Headers()
    if host is not None:
        headers.setRawHeaders(b"Host", [host])
    return RequestHead(method, target, version, headers, 0)


def admitted(decision: Admit | Reject) -> Admit:
    assert isinstance(decision, Admit), decision
    return decision


def refused(decision: Admit | Reject, kind: type[Exception]) -> Any:
    assert isinstance(decision, Reject), decision
    assert isinstance(decision.error, kind), decision.error
    return decision.error


# === methods ==============================================================================================


@pytest.mark.parametrize(
    ("method", "target", "host"),
    [
        (b"CONNECT", b"example.com:443", b"example.com:443"),
        (b"CONNECT", b"127.0.0.1:8081", b"127.0.0.1:8081"),  # the upstream's own address: still no tunnel
        (b"CONNECT", b"/debug", HOST),  # origin-form, on a route that allows TRACE
        (b"connect", b"example.com:443", b"example.com:443"),
        (b"CONNECT", b"example.com:443", None),
    ],
)
def test_connect_is_405_whatever_the_target(router: Router, method: bytes, target: bytes, host: bytes | None) -> None:
    """CONNECT is refused with 405 on every target and route, before the Host or the route are even looked at."""
    error = refused(decide(head(target, method=method, host=host), router), MethodNotAllowed)
    assert error.status == 405
    assert "CONNECT" not in error.allow


@pytest.mark.parametrize("method", [b"TRACE", b"TRACK", b"trace"])
def test_trace_is_405_on_a_route_that_does_not_allow_it(router: Router, method: bytes) -> None:
    """TRACE (and IIS's TRACK, in any case) is refused with 405 where the route does not allow it; Allow lists
    the methods forwarded there."""
    error = refused(decide(head(b"/reports/1", method=method), router), MethodNotAllowed)
    assert error.allow == FORWARDED_METHODS
    assert error.allow_header == b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


def test_trace_is_admitted_where_the_route_allows_it(router: Router) -> None:
    """A route with allow_methods = ["TRACE"] forwards TRACE (and only TRACE: TRACK stays refused there)."""
    assert admitted(decide(head(b"/debug/x", method=b"TRACE"), router)).route.name == "debug"
    error = refused(decide(head(b"/debug/x", method=b"TRACK"), router), MethodNotAllowed)
    assert error.allow == (*FORWARDED_METHODS, "TRACE")


def test_trace_to_no_route_is_404() -> None:
    """Routing comes before the method check: TRACE to a path no route takes is a 404, like any method."""
    refused(decide(head(b"/x", method=b"TRACE"), Router([])), NoRoute)


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"PROPFIND"])
def test_other_methods_pass(router: Router, method: bytes) -> None:
    """Every other method token is forwarded: only the listed ones are refused."""
    assert admitted(decide(head(b"/reports/1", method=method), router)).route.name == "reports"


# === absolute-form and asterisk-form ========================================================================


@pytest.mark.parametrize(
    ("target", "host", "route", "upstream_target"),
    [
        (b"http://gw.example.com/reports/1?x=%20", HOST, "reports", b"/base/reports/1?x=%20"),
        (b"HTTP://GW.Example.COM/reports", HOST, "reports", b"/base/reports"),
        (b"http://gw.example.com:80/reports", HOST, "reports", b"/base/reports"),
        (b"http://gw.example.com/reports", b"GW.example.com:80", "reports", b"/base/reports"),
        (b"https://gw.example.com:443/reports", HOST, "reports", b"/base/reports"),
        (b"http://gw.example.com:8080/reports", b"gw.example.com:8080", "reports", b"/base/reports"),
        (b"http://gw.example.com:/reports", HOST, "reports", b"/base/reports"),
        (b"http://gw.example.com", HOST, "root", b"/base/"),
        (b"http://gw.example.com?q=1", HOST, "root", b"/base/?q=1"),
        (b"http://[::1]:8080/api/v1", b"[::1]:8080", "api", b"/base/v1"),
        (b"http://internal.example.com/x", b"internal.example.com", "private", b"/x"),
    ],
)
def test_absolute_form_naming_the_host_is_routed_as_origin_form(
    router: Router, target: bytes, host: bytes, route: str, upstream_target: bytes
) -> None:
    """An http(s) absolute-form target whose authority is the Host header's (case and default port aside) is
    routed and forwarded as its path and query (RFC 9112 section 3.2.2)."""
    decision = admitted(decide(head(target, host=host), router))
    assert (decision.route.name, decision.upstream_target) == (route, upstream_target)


@pytest.mark.parametrize(
    ("target", "host"),
    [
        (b"http://evil.example.com/reports", HOST),
        (b"http://internal.example.com/x", HOST),  # would reach another host's route
        (b"http://gw.example.com:8080/reports", HOST),
        (b"https://gw.example.com/reports", b"gw.example.com:80"),
        (b"http://gw.example.com/reports", b"gw.example.com:443"),
        (b"http://user@gw.example.com/reports", HOST),
        (b"http://gw.example.com:99999/reports", b"gw.example.com:99999"),
        (b"http://gw.example.com:8o/reports", b"gw.example.com:8o"),
        (b"http:///reports", HOST),
        (b"http://[::1/reports", b"[::1"),
        (b"ftp://gw.example.com/reports", HOST),
        (b"http://gw.example.com/reports", None),  # HTTP/1.0 without Host, below
        (b"http://gw.example.com/reports/../admin", HOST),
    ],
)
def test_absolute_form_that_disagrees_is_400(router: Router, target: bytes, host: bytes | None) -> None:
    """An absolute-form target naming another host or port than Host, with user info, a bad authority, another
    scheme, no Host at all, or a path that is refused anyway, is a 400: never forwarded, never to its host."""
    refused(decide(head(target, host=host, version=b"HTTP/1.0" if host is None else b"HTTP/1.1"), router), BadRequest)


@pytest.mark.parametrize(
    "host", [b"ex\x7fample.test", b"example.test, evil.test", b"a b", b"h:80:80", b"[::1", b"h:8o"]
)
def test_host_that_is_no_host_and_port_is_400(router: Router, host: bytes) -> None:
    """A Host value that is not one host name or address with an optional port is refused with 400."""
    refused(decide(head(b"/reports", host=host), router), BadRequest)


def test_two_hosts_are_400_in_http10_too(router: Router) -> None:
    """Two Host headers are refused in an HTTP/1.0 request as in an HTTP/1.1 one: which would an upstream use?"""
    headers = Headers({b"Host": [HOST, b"evil.example.com"]})
    refused(decide(RequestHead(b"GET", b"/reports", b"HTTP/1.0", headers, 0), router), BadRequest)


@pytest.mark.parametrize("host", [b"[::1]:8080", b"gw.example.com:", b"GW.Example.COM", b"127.0.0.1:80"])
def test_host_forms_that_pass(router: Router, host: bytes) -> None:
    """Names in any case, IP literals and an empty port are valid Host values."""
    assert admitted(decide(head(b"/reports", host=host), router)).route.name == "reports"


def test_options_asterisk_is_501_and_other_asterisks_400(router: Router) -> None:
    """A server-wide OPTIONS * is answered 501 (the gateway has no answer of its own); "*" with another method
    is malformed: 400."""
    assert refused(decide(head(b"*", method=b"OPTIONS"), router), NotSupported).status == 501
    refused(decide(head(b"*", method=b"GET"), router), BadRequest)


@pytest.mark.parametrize("target", [b"example.com:443", b"reports", b"//"])
def test_authority_and_relative_forms_are_400(router: Router, target: bytes) -> None:
    """Authority-form outside CONNECT, and anything neither a path nor an http(s) URL, is a 400 ("//" is a path:
    the root route takes it)."""
    if target == b"//":
        assert admitted(decide(head(target), router)).route.name == "root"
    else:
        refused(decide(head(target), router), BadRequest)


# === paths ==================================================================================================

ESCAPES = [
    b"/reports/../admin",
    b"/reports/%2e%2e/admin",
    b"/reports/%2E%2e/admin",
    b"/reports/.%2E/admin",
    b"/reports/..%2fadmin",
    b"/reports/..%2Fadmin",
    b"/reports/%2E%2E%5Cadmin",
    b"/reports/..\\admin",
    b"/reports\\..\\admin",
    b"/reports%2f..%2fadmin",
    b"/reports/..;jsessionid=1/admin",
    b"/reports/..%3Bx/admin",
    b"/reports/..",
    b"/reports/../",
    b"/reports/.",
    b"/reports/./x",
    b"/reports//..//admin",
    b"/..",
    b"/../reports",
    b"/reports/..?q=1",
    b"http://gw.example.com/reports/%2e%2e/admin",
]


@pytest.mark.parametrize("target", ESCAPES)
def test_dot_segments_in_any_spelling_are_400(router: Router, target: bytes) -> None:
    """A path with a "." or ".." segment, spelt with %2e, %2f, %5c, a backslash or ";params", is refused with
    400: nothing is forwarded that an upstream could resolve outside the prefix it was routed by."""
    error = refused(decide(head(target), router), BadRequest)
    assert '"." or ".."' in error.detail


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (b"/reports/%zz", "malformed percent-escape"),
        (b"/reports/%2", "malformed percent-escape"),
        (b"/reports/%", "malformed percent-escape"),
        (b"/reports/%0g", "malformed percent-escape"),
        (b"/reports/%00", "encoded NUL"),
        (b"/reports/a%00.csv", "encoded NUL"),
        (b"/reports#/../admin", '"#"'),
        (b"/admin#x", '"#"'),
    ],
)
def test_malformed_escapes_nul_and_fragment_in_the_path_are_400(router: Router, target: bytes, reason: str) -> None:
    """A malformed percent-escape (which upstreams decode differently), an encoded NUL (which C code reads as
    the end of the path) or a "#" (where an upstream would cut the path) in the path is refused with 400."""
    assert reason in refused(decide(head(target), router), BadRequest).detail


@pytest.mark.parametrize(
    "target",
    [
        b"/reports/..x",
        b"/reports/x..",
        b"/reports/...",
        b"/reports/%2e%2e%2e",
        b"/reports/.well-known",
        b"/reports/a.b/c",
        b"/reports/x?path=../../admin&nul=%00&bad=%zz",
        b"/reports/caf%C3%A9",
        b"/reports/a%2Fb",
    ],
)
def test_look_alikes_and_queries_pass_byte_for_byte(router: Router, target: bytes) -> None:
    """Names that only contain dots, and anything in the query (the upstream application's business), pass;
    the upstream receives the target exactly as sent."""
    decision = admitted(decide(head(target), router))
    assert decision.route.name == "reports"
    assert decision.upstream_target == b"/base" + target


@pytest.mark.parametrize(
    "target",
    [
        b"/admin/x",
        b"//admin/x",
        b"/%61dmin/x",
        b"/ad%6Din/x",
        b"/admin%2Fx",
        b"/admin%5cx",
        b"/\\admin/x",
        b"/admin;v=1/x",
        b"/admin;v=1",
        b"/%2Fadmin",
    ],
)
def test_every_spelling_of_a_prefix_takes_its_route(router: Router, target: bytes) -> None:
    """A path is routed as an upstream that decodes unreserved escapes, takes %2F, %5C and "\\" as "/", merges
    slashes and drops ";params" would resolve it: no spelling of "/admin/..." slips past the "/admin" route to the
    catch-all. The target still goes out as sent."""
    decision = admitted(decide(head(target), router))
    assert decision.route.name == "admin"
    assert decision.upstream_target == target


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/api/v1?q", b"/v1?q"),
        (b"/%61pi/v1?q", b"/v1?q"),
        (b"//api//v1", b"//v1"),
        (b"/api;x/v1", b"/;x/v1"),
        (b"/api%2Fv1", b"/%2Fv1"),
        (b"/api", b"/"),
    ],
)
def test_strip_prefix_cuts_the_spelling_the_client_used(router: Router, target: bytes, expected: bytes) -> None:
    """strip_prefix cuts exactly the raw bytes that spell the prefix, keeping the rest byte for byte."""
    decision = admitted(decide(head(target), router))
    assert (decision.route.name, decision.upstream_target) == ("api", b"/base" + expected)


def test_prefix_spelt_with_escapes_matches_every_spelling() -> None:
    """A prefix written with lower-case or unreserved escapes matches the paths an upstream resolves the same."""
    data = {
        **CONFIG,
        "routes": [{"name": "cafe", "auth": "anonymous", "path_prefix": "/caf%c3%a9/%6Denu", "upstream": "app"}],
    }
    router = Router(parse(data, source="test.toml").routes)
    for target in (b"/caf%C3%A9/menu/1", b"/caf%c3%a9/%6denu", b"//caf%C3%a9//menu"):
        assert admitted(decide(head(target), router)).upstream_target == b"/base" + target


# --- property: no spelling of a dot-segment is ever admitted ---------------------------------------------

DOT = st.sampled_from([b".", b"%2e", b"%2E"])
SEPARATOR = st.sampled_from([b"/", b"\\", b"%2f", b"%2F", b"%5c", b"%5C", b"//"])
SEGMENT = st.lists(st.sampled_from([b"a", b"x", b"%41", b"~", b"-", b".", b"%25", b"_"]), max_size=3).map(b"".join)


@st.composite
def paths_with_a_dot_segment(draw: st.DrawFn) -> bytes:
    before = draw(st.lists(SEGMENT, max_size=3))
    dots = b"".join(draw(st.lists(DOT, min_size=1, max_size=2)))
    dots += draw(st.sampled_from([b"", b";", b";x=1", b"%3B", b"%3bx"]))
    after = draw(st.lists(SEGMENT, max_size=3))
    first, *rest = [*before, dots, *after]
    path = b"/" + first
    for part in rest:
        path += draw(SEPARATOR) + part
    if draw(st.booleans()):
        path += draw(SEPARATOR)
    return path + draw(st.sampled_from([b"", b"?", b"?a=1"]))


@settings(max_examples=400)
@given(target=paths_with_a_dot_segment(), prefix=st.sampled_from([b"", b"/reports", b"/admin", b"/api"]))
def test_no_dot_segment_spelling_is_ever_admitted(router: Router, target: bytes, prefix: bytes) -> None:
    """Whatever the spelling of "." or ".." and of the separators around it, under whatever route, the request
    is refused with 400."""
    refused(decide(head(prefix + target), router), BadRequest)


# === in memory: the real channel answers, and no upstream connection is asked for ==========================


class Harness(MemoryGateway):
    """MemoryGateway that lets its clients go and checks nothing is left behind."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data)
        self.clients: list[Client] = []

    def client(self) -> Client:
        client = super().client()
        client.transport._lenient = True
        self.clients.append(client)
        return client

    def settle(self) -> None:
        for client in self.clients:
            disconnect(client.transport, client.channel, ConnectionDone("closed"))
        self.close()
        assert self.reactor.getDelayedCalls() == [], "timers left behind"


@pytest.fixture
def memory() -> Iterator[Harness]:
    routes = [
        {"name": "root", "auth": "anonymous", "path_prefix": "/", "upstream": "origin"},
        {
            "name": "debug",
            "auth": "anonymous",
            "path_prefix": "/debug",
            "upstream": "origin",
            "allow_methods": ["TRACE"],
        },
    ]
    gw = Harness(gateway_config("http://127.0.0.1:8081", routes=routes))
    yield gw
    gw.settle()


def problem_of(parsed: Parsed) -> dict[str, Any]:
    assert parsed.header(b"Content-Type") == b"application/problem+json"
    body: dict[str, Any] = json.loads(parsed.body)
    return body


def exchange(gw: Harness, data: bytes) -> tuple[Client, list[Parsed]]:
    client = gw.client()
    client.send(data)
    return client, parse_responses(client.received())


def test_connect_is_answered_405_in_memory_and_its_tunnel_bytes_are_never_read(memory: Harness) -> None:
    """CONNECT gets one 405 with Allow and a problem+json body, the connection closes, and the bytes a client
    sends after it as "tunnel" data (here a request) are never parsed, let alone forwarded."""
    client, responses = exchange(
        memory,
        b"CONNECT 127.0.0.1:8081 HTTP/1.1\r\nHost: 127.0.0.1:8081\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: gw.example.com\r\n\r\n",
    )
    assert [r.status for r in responses] == [405]
    assert responses[0].header(b"Allow") == b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
    assert responses[0].header(b"Connection") == b"close"
    assert problem_of(responses[0])["status"] == 405
    assert client.transport.disconnecting
    assert memory.pending_connections() == 0


def test_trace_is_answered_405_in_memory_unless_the_route_allows_it(memory: Harness) -> None:
    """TRACE gets 405 on a route without allow_methods, and is forwarded as sent on one that allows it."""
    _client, responses = exchange(memory, b"TRACE /x HTTP/1.1\r\nHost: gw.example.com\r\n\r\n")
    assert [r.status for r in responses] == [405]
    assert memory.pending_connections() == 0
    exchange(memory, b"TRACE /debug/x HTTP/1.1\r\nHost: gw.example.com\r\n\r\n")
    upstream = memory.upstream()
    assert upstream.received().startswith(b"TRACE /debug/x HTTP/1.1\r\n")
    upstream.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    upstream.close()


def test_absolute_form_is_forwarded_as_origin_form_in_memory(memory: Harness) -> None:
    """An absolute-form request naming the Host reaches the upstream as origin-form, path and query as sent."""
    exchange(memory, b"GET http://gw.example.com/a/%7Eb?q=%20 HTTP/1.1\r\nHost: gw.example.com\r\n\r\n")
    upstream = memory.upstream()
    assert upstream.received().startswith(b"GET /a/%7Eb?q=%20 HTTP/1.1\r\n")
    upstream.respond(b"HTTP/1.1 204 No Content\r\n\r\n")
    upstream.close()


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"GET http://127.0.0.1:8081/x HTTP/1.1\r\nHost: gw.example.com\r\n\r\n", 400),
        (b"GET /reports/%2e%2e/admin HTTP/1.1\r\nHost: gw.example.com\r\n\r\n", 400),
        (b"GET /x/..%5Cy HTTP/1.1\r\nHost: gw.example.com\r\n\r\n", 400),
        (b"GET /x%00 HTTP/1.1\r\nHost: gw.example.com\r\n\r\n", 400),
        (b"OPTIONS * HTTP/1.1\r\nHost: gw.example.com\r\n\r\n", 501),
    ],
)
def test_refused_targets_are_answered_in_memory_without_an_upstream(
    memory: Harness, request_head: bytes, status: int
) -> None:
    """A refused target gets its status and a problem+json body from the gateway, and no upstream connection is
    asked for; a 400 closes the connection."""
    client, responses = exchange(memory, request_head)
    assert [r.status for r in responses] == [status]
    assert problem_of(responses[0])["status"] == status
    assert client.transport.disconnecting is (status == 400)
    assert memory.pending_connections() == 0


# === over loopback: a real origin never sees a refused request ============================================


def _head(method: bytes, target: bytes, host: bytes = b"example.test") -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (method, target, host)


async def _answer(port: int, data: bytes) -> Parsed:
    client = await connect(port, keep_all=True)
    client.send(data)
    await within(client.closed)
    return parse_response(bytes(client.head))


REFUSED_OVER_LOOPBACK = [
    (b"CONNECT", b"127.0.0.1:1", b"127.0.0.1:1", 405),
    (b"TRACE", b"/only/headers", b"example.test", 405),
    (b"GET", b"http://127.0.0.1:1/headers", b"example.test", 400),
    (b"GET", b"/only/../headers", b"example.test", 400),
    (b"GET", b"/only/%2E%2E%5Cheaders", b"example.test", 400),
    (b"GET", b"/only/..%2fheaders", b"example.test", 400),
    (b"GET", b"/headers", b"example.test", 404),
    (b"GET", b"/%6Fnlyx", b"example.test", 404),
]


@pytest_twisted.ensureDeferred
async def test_refused_requests_never_reach_the_origin(origin, gateway_for):
    """Over real sockets, CONNECT, TRACE, an absolute-form target naming another host, dot-segment paths and a
    path no route takes are each answered by the gateway with its status, and the origin accepts no connection;
    an admitted absolute-form request afterwards proves the origin was reachable all along."""
    gateway = gateway_for(gateway_config(origin.url, route={"path_prefix": "/only", "strip_prefix": True}))
    for method, target, host, status in REFUSED_OVER_LOOPBACK:
        response = await _answer(gateway.port, _head(method, target, host))
        assert (target, response.status) == (target, status)
        assert response.header(b"Content-Type") == b"application/problem+json"
        if status == 405:
            assert response.header(b"Allow") == b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
    assert (origin.accepted, origin.seen) == (0, [])

    response = await _answer(gateway.port, _head(b"GET", b"http://example.test/%6Fnly/headers?x=1"))
    assert response.status == 200
    assert json.loads(response.body)["uri"] == "/headers?x=1"
    assert [s.uri for s in origin.seen] == [b"/headers?x=1"]


@pytest.mark.parametrize("host", [b"admin.example.com.", b"admin.example.com.:80", b"ADMIN.example.com."])
def test_a_trailing_dot_in_host_takes_the_same_route(host: bytes) -> None:
    """ "admin.example.com." names the same host as "admin.example.com" (DNS, upstreams and nginx agree), so it
    takes that host's route, never a catch-all with other limits."""
    assert host_without_port(host) == "admin.example.com"


def test_percent_encoding_in_host_is_refused() -> None:
    """A percent-encoded Host ("%61dmin.example.com") would route as a host other than the one an upstream
    decodes: 400."""
    assert _HOST.fullmatch(b"%61dmin.example.com") is None
    assert _HOST.fullmatch(b"admin.example.com:8080") is not None
