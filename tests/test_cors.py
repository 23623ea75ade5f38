"""CORS per route (gateway.routing.cors, gateway.config.cors): the policy read from a route's `cors` table, the
preflight answered by the gateway before admission, and the CORS headers on actual responses, the upstream's and
the gateway's own, in memory (the real gateway on a `MemoryReactorClock`, tests.support.memory)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.error import ConnectionRefusedError
from twisted.logger import LogEvent

from gateway.auth.apikeys import hash_key
from gateway.config import ConfigError, parse
from gateway.http1.fields import Fields
from gateway.operations.metrics import Metrics
from gateway.routing.cors import CorsPolicy, merge_vary
from tests.support.clients import Parsed, parse_response
from tests.support.memory import Client, RecordingFactory
from tests.support.running import gateway_config
from tests.test_request import OK_5, Gateway, closed, problem_of

UPSTREAM = "http://127.0.0.1:8081"
APP = b"https://app.example.com"
KEY = "gwk_the-key-of-reports-app"

CORS = {
    "allow_origins": ["https://app.example.com", "https://*.tenants.example.com", "http://localhost:3000"],
    "allow_methods": ["GET", "PUT", "DELETE"],
    "allow_headers": ["Authorization", "Content-Type", "X-Trace"],
    "expose_headers": ["ETag", "X-Request-ID"],
    "max_age": "10m",
}


def cors_config(cors: dict[str, Any] | None = None, **route: Any) -> dict[str, Any]:
    """One route behind an API key (consumer reports-app, 2 requests a minute), with `cors` as its cors table."""
    data = gateway_config(UPSTREAM, route={"auth": ["keys"], "cors": copy.deepcopy(cors or CORS), **route})
    data["auth"] = {"keys": {"type": "api_key"}}
    data["consumers"] = {"reports-app": {"api_keys": [hash_key(KEY)], "rate_limit": {"rate": "2/m"}}}
    return data


@pytest.fixture
def gateway(failures: list[LogEvent]) -> Iterator[Callable[..., Gateway]]:
    """An in-memory gateway for `cors_config(...)`; afterwards nothing may be left behind."""
    made: list[Gateway] = []

    def make(cors: dict[str, Any] | None = None, **route: Any) -> Gateway:
        gw = Gateway(cors_config(cors, **route))
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.settle()
        assert gw.reactor.getDelayedCalls() == [], "timers left behind"
        assert [u for u in gw.upstreams if not closed(u)] == [], "upstream connections left open"
    assert [e.get("log_format") for e in failures] == [], "unexpected failures were logged"


def request(method: bytes, *headers: bytes, path: bytes = b"/reports") -> bytes:
    return b"\r\n".join([method + b" " + path + b" HTTP/1.1", b"Host: api.example.com", *headers]) + b"\r\n\r\n"


def preflight(origin: bytes = APP, method: bytes = b"PUT", *headers: bytes) -> bytes:
    return request(b"OPTIONS", b"Origin: " + origin, b"Access-Control-Request-Method: " + method, *headers)


def answer(client: Client) -> Parsed:
    return parse_response(client.received())


def cors_headers(parsed: Parsed) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in parsed.headers if k.lower().startswith(b"access-control-")}


def upstream_answers(gw: Gateway, data: bytes = OK_5) -> None:
    """The upstream answers the request just sent: on a new connection, or the pooled one it went out on."""
    (gw.upstream() if gw.pending_connections() else gw.upstreams[-1]).respond(data)


def policy(cors: dict[str, Any]) -> CorsPolicy:
    route = parse(cors_config(cors), source="test.toml").routes[0]
    assert route.cors is not None
    return route.cors


# === the preflight ============================================================================================


def test_an_allowed_preflight_is_answered_204_without_credentials_or_upstream(gateway: Callable[..., Gateway]) -> None:
    """A preflight from an allowed origin, for an allowed method and headers, is answered 204 with the CORS headers
    by the gateway: before authentication (it carries no key) and without an upstream connection."""
    gw = gateway()
    client = gw.client()
    client.send(preflight(APP, b"PUT", b"Access-Control-Request-Headers: content-type, x-trace"))
    parsed = answer(client)
    assert parsed.status == 204
    assert parsed.body == b"" and parsed.header(b"Content-Length") is None
    assert cors_headers(parsed) == {
        b"access-control-allow-origin": APP,
        b"access-control-allow-methods": b"DELETE, GET, PUT",
        b"access-control-allow-headers": b"authorization, content-type, x-trace",
        b"access-control-max-age": b"600",
    }
    assert parsed.header(b"Vary") == b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
    assert parsed.header(b"X-Request-ID")
    assert gw.pending_connections() == 0
    assert client.request.ending == "answered" and not client.transport.disconnecting


def test_a_preflight_for_a_safelisted_method_passes_unlisted(gateway: Callable[..., Gateway]) -> None:
    """POST, GET and HEAD need no listing (the Fetch standard accepts them without Allow-Methods)."""
    gw = gateway()
    client = gw.client()
    client.send(preflight(APP, b"POST"))
    assert answer(client).status == 204


@pytest.mark.parametrize(
    ("origin", "method", "extra", "reason"),
    [
        (b"https://evil.example.com", b"PUT", b"", "cors_origin"),
        (b"https://app.example.com.evil.net", b"PUT", b"", "cors_origin"),
        (b"http://app.example.com", b"PUT", b"", "cors_origin"),
        (b"null", b"PUT", b"", "cors_origin"),
        (APP, b"PATCH", b"", "cors_method"),
        (APP, b"put", b"", "cors_method"),
        (APP, b"PUT", b"Access-Control-Request-Headers: x-trace, x-secret", "cors_headers"),
    ],
)
def test_a_preflight_not_allowed_is_refused_403_without_cors_headers(
    gateway: Callable[..., Gateway], origin: bytes, method: bytes, extra: bytes, reason: str
) -> None:
    """A preflight from another origin, or asking for a method or header not allowed, is refused 403
    (problem+json) without any CORS header, so the browser never sends the request; it reaches no upstream."""
    gw = gateway()
    client = gw.client()
    client.send(preflight(origin, method, *([extra] if extra else [])))
    parsed = answer(client)
    assert parsed.status == 403
    assert problem_of(parsed)["type"] == "urn:gateway:problem:cors-refused"
    assert cors_headers(parsed) == {}
    assert gw.pending_connections() == 0
    assert client.request.error is not None and client.request.error.reason == reason  # type: ignore[attr-defined]


def test_preflights_are_counted_allowed_and_refused(gateway: Callable[..., Gateway]) -> None:
    """An allowed preflight counts as a request answered 204 by the gateway; a refused one also as a denial, with
    what was refused as its reason."""
    gw = gateway()
    metrics = Metrics(lambda: pytest.fail("no scrape here"))
    gw.gateway = dataclasses.replace(gw.gateway, metrics=metrics)
    gw.factory = RecordingFactory(gw.gateway, clock=gw.reactor)
    for origin, method in ((APP, b"PUT"), (b"https://evil.example.com", b"PUT"), (APP, b"PATCH")):
        client = gw.client()
        client.send(preflight(origin, method))
    assert metrics.requests == {("origin", "204", "answered"): 1, ("origin", "403", "answered"): 2}
    denials = metrics.registry.get_sample_value
    assert denials("gateway_admission_denials_total", {"route": "origin", "reason": "cors_origin"}) == 1
    assert denials("gateway_admission_denials_total", {"route": "origin", "reason": "cors_method"}) == 1


def test_a_pattern_allows_subdomains_not_the_bare_domain(gateway: Callable[..., Gateway]) -> None:
    """`https://*.tenants.example.com` allows every subdomain (any depth), not tenants.example.com itself."""
    gw = gateway()
    allowed = policy(CORS)
    assert allowed.allows(b"https://acme.tenants.example.com")
    assert allowed.allows(b"https://eu.acme.tenants.example.com")
    assert allowed.allows(b"HTTPS://Acme.Tenants.Example.com")
    assert not allowed.allows(b"https://tenants.example.com")
    assert not allowed.allows(b"https://acme.tenants.example.com:8443")
    assert not allowed.allows(b"https://acmetenants.example.com")
    client = gw.client()
    client.send(preflight(b"https://acme.tenants.example.com"))
    assert cors_headers(answer(client))[b"access-control-allow-origin"] == b"https://acme.tenants.example.com"


def test_an_options_request_without_request_method_is_no_preflight(gateway: Callable[..., Gateway]) -> None:
    """OPTIONS with Origin but no Access-Control-Request-Method is an actual request: admitted as any (here 401
    without a key, carrying the CORS headers)."""
    gw = gateway()
    client = gw.client()
    client.send(request(b"OPTIONS", b"Origin: " + APP))
    parsed = answer(client)
    assert parsed.status == 401
    assert cors_headers(parsed)[b"access-control-allow-origin"] == APP


def test_a_preflight_with_any_header_names_those_asked_for(gateway: Callable[..., Gateway]) -> None:
    """`allow_headers = ["*"]` allows every header, and the answer names those asked for (with credentials too,
    where a literal * would not count); credentials give Allow-Credentials."""
    gw = gateway({"allow_origins": ["https://app.example.com"], "allow_headers": ["*"], "allow_credentials": True})
    client = gw.client()
    client.send(preflight(APP, b"PATCH", b"Access-Control-Request-Headers: X-One,x-two"))
    parsed = answer(client)
    assert parsed.status == 204
    assert cors_headers(parsed) == {
        b"access-control-allow-origin": APP,
        b"access-control-allow-credentials": b"true",
        b"access-control-allow-methods": b"DELETE, GET, HEAD, PATCH, POST, PUT",
        b"access-control-allow-headers": b"x-one, x-two",
    }


def test_a_route_without_cors_forwards_a_preflight_as_before(gateway: Callable[..., Gateway]) -> None:
    """Without a cors table a preflight is a request like any other: admission answers it (401 here), with no
    CORS header and no Vary."""
    data = cors_config()
    del data["routes"][0]["cors"]
    gw = Gateway(data)
    client = gw.client()
    client.send(preflight())
    parsed = answer(client)
    gw.settle()
    assert parsed.status == 401
    assert cors_headers(parsed) == {} and parsed.header(b"Vary") is None


# === actual responses ===========================================================================================


def test_an_allowed_origin_gets_the_cors_headers_on_the_upstreams_answer(gateway: Callable[..., Gateway]) -> None:
    """The upstream's answer to an allowed origin gets Allow-Origin (the origin), Expose-Headers and Vary: Origin
    merged with the upstream's own Vary; the upstream's own CORS headers are replaced."""
    gw = gateway()
    client = gw.client()
    client.send(request(b"GET", b"Origin: " + APP, b"X-API-Key: " + KEY.encode()))
    up = gw.upstream()
    up.respond(
        b"HTTP/1.1 200 OK\r\nVary: Accept-Encoding\r\nAccess-Control-Allow-Origin: *\r\n"
        b"Access-Control-Allow-Methods: *\r\nContent-Length: 5\r\n\r\nhello"
    )
    parsed = answer(client)
    assert (parsed.status, parsed.body) == (200, b"hello")
    assert cors_headers(parsed) == {
        b"access-control-allow-origin": APP,
        b"access-control-expose-headers": b"ETag, X-Request-ID",
    }
    assert parsed.headers_named(b"Vary") == [b"Accept-Encoding, Origin"]


def test_another_origin_gets_no_cors_headers_but_vary(gateway: Callable[..., Gateway]) -> None:
    """An origin not allowed is answered as usual without CORS headers (the browser keeps the answer from the page),
    and a request without Origin too; both get Vary: Origin, since the answer depends on it."""
    gw = gateway()
    for origin in (b"Origin: https://evil.example.com", b"X-No-Origin: 1"):
        client = gw.client()
        client.send(request(b"GET", origin, b"X-API-Key: " + KEY.encode()))
        upstream_answers(gw)
        parsed = answer(client)
        assert parsed.status == 200
        assert cors_headers(parsed) == {}
        assert parsed.headers_named(b"Vary") == [b"Origin"]


def test_credentials_are_allowed_on_actual_responses(gateway: Callable[..., Gateway]) -> None:
    """With allow_credentials the answer says Allow-Credentials: true, and still names its origin."""
    gw = gateway({"allow_origins": ["https://app.example.com"], "allow_credentials": True})
    client = gw.client()
    client.send(request(b"GET", b"Origin: " + APP, b"X-API-Key: " + KEY.encode()))
    gw.upstream().respond(b"HTTP/1.1 200 OK\r\nVary: *\r\nContent-Length: 5\r\n\r\nhello")
    parsed = answer(client)
    assert cors_headers(parsed) == {
        b"access-control-allow-origin": APP,
        b"access-control-allow-credentials": b"true",
    }
    assert parsed.headers_named(b"Vary") == [b"*"]


def test_any_origin_without_credentials_answers_star_to_everyone(gateway: Callable[..., Gateway]) -> None:
    """`allow_origins = ["*"]`: every response says Allow-Origin: * (also without Origin), without Vary."""
    gw = gateway({"allow_origins": ["*"], "expose_headers": ["*"]})
    for origin in (b"Origin: https://anyone.example", b"X-No-Origin: 1"):
        client = gw.client()
        client.send(request(b"GET", origin, b"X-API-Key: " + KEY.encode()))
        upstream_answers(gw)
        parsed = answer(client)
        assert cors_headers(parsed) == {
            b"access-control-allow-origin": b"*",
            b"access-control-expose-headers": b"*",
        }
        assert parsed.header(b"Vary") is None
    client = gw.client()
    client.send(preflight(b"https://anyone.example"))
    assert cors_headers(answer(client))[b"access-control-allow-origin"] == b"*"


def test_the_gateways_own_401_and_429_carry_the_cors_headers(gateway: Callable[..., Gateway]) -> None:
    """A browser must be able to read the gateway's own refusals: 401 without a key, 429 over the rate."""
    gw = gateway()
    client = gw.client()
    client.send(request(b"GET", b"Origin: " + APP))
    parsed = answer(client)
    assert parsed.status == 401
    assert cors_headers(parsed)[b"access-control-allow-origin"] == APP
    assert parsed.header(b"Vary") == b"Origin"
    statuses = []
    for n in range(3):
        client = gw.client()
        client.send(request(b"GET", b"Origin: " + APP, b"X-API-Key: " + KEY.encode()))
        if n < 2:  # the third is over the rate: it reaches no upstream
            upstream_answers(gw)
        parsed = answer(client)
        statuses.append(parsed.status)
    assert statuses == [200, 200, 429]
    assert cors_headers(parsed) == {
        b"access-control-allow-origin": APP,
        b"access-control-expose-headers": b"ETag, X-Request-ID",
    }


def test_the_gateways_own_502_and_504_carry_the_cors_headers(gateway: Callable[..., Gateway]) -> None:
    """An upstream that cannot be reached (502) or does not answer in time (504): the answer is readable."""
    gw = gateway(timeouts={"response_headers": 5})
    client = gw.client()
    client.send(request(b"GET", b"Origin: " + APP, b"X-API-Key: " + KEY.encode()))
    gw.fail_connection(ConnectionRefusedError("refused"))
    parsed = answer(client)
    assert parsed.status == 502
    assert cors_headers(parsed)[b"access-control-allow-origin"] == APP
    client = gw.client()
    client.send(request(b"GET", b"Origin: " + APP, b"X-API-Key: " + KEY.encode()))
    gw.upstream()
    gw.advance(5)
    parsed = answer(client)
    assert parsed.status == 504
    assert cors_headers(parsed)[b"access-control-allow-origin"] == APP


def test_merge_vary_keeps_one_list() -> None:
    """Origin joins the Vary the upstream sent, once; `*` and a present Origin are left alone."""
    cases = [
        ([], [b"Origin"]),
        ([b"Accept-Encoding"], [b"Accept-Encoding, Origin"]),
        ([b"accept, origin"], [b"accept, origin"]),
        ([b"Accept", b"Cookie"], [b"Accept, Cookie, Origin"]),
        ([b"*"], [b"*"]),
    ]
    for before, after in cases:
        headers = Fields((b"Vary", value) for value in before)
        merge_vary(headers, b"Origin")
        assert headers.getRawHeaders(b"vary") == after


# === config ===================================================================================================


def error_of(cors: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse(cors_config(cors), source="test.toml")
    return str(info.value)


@pytest.mark.parametrize(
    ("cors", "key", "reason"),
    [
        ({"allow_origins": ["*"], "allow_credentials": True}, "allow_origins", "allow_credentials = true"),
        ({"allow_origins": ["*", "https://a.example"]}, "allow_origins", "cannot be listed with others"),
        ({"allow_origins": []}, "allow_origins", "at least one origin"),
        ({"allow_origins": ["https://a.example/"]}, "allow_origins", "has no path"),
        ({"allow_origins": ["a.example"]}, "allow_origins", "scheme, host"),
        ({"allow_origins": ["ftp://a.example"]}, "allow_origins", "scheme, host"),
        ({"allow_origins": ["https://a.*.example"]}, "allow_origins", "scheme, host"),
        ({"allow_origins": ["null"]}, "allow_origins", "sandboxed"),
        ({"allow_origins": ["https://a.example:70000"]}, "allow_origins", "port out of range"),
        ({"allow_origins": "https://a.example"}, "allow_origins", "array"),
        ({"allow_methods": ["GET", "BAD METHOD"]}, "allow_methods", "not a method"),
        ({"allow_methods": ["*"]}, "allow_methods", "list the methods"),
        ({"allow_methods": ["CONNECT"]}, "allow_methods", "forbidden"),
        ({"allow_headers": ["X:Y"]}, "allow_headers", "not a header name"),
        ({"expose_headers": ["*"], "allow_credentials": True}, "expose_headers", "list the headers"),
        ({"max_age": "250ms"}, "max_age", "at least one second"),
        ({"allow_credential": True}, "allow_credential", "did you mean"),
    ],
)
def test_config_errors_name_file_key_and_reason(cors: dict[str, Any], key: str, reason: str) -> None:
    """A policy browsers would refuse, or an origin that is not one, is an error naming file, key and reason."""
    cors = {"allow_origins": ["https://app.example.com"], **cors}
    message = error_of(cors)
    assert f'test.toml: routes["origin"].cors.{key}: ' in message
    assert reason in message


def test_config_reads_origins_as_browsers_send_them() -> None:
    """Origins are kept lower-cased and without their scheme's default port; max_age takes a duration; the
    upstream's CORS headers are hidden on the route."""
    read = policy({"allow_origins": ["HTTPS://App.Example.com:443", "http://localhost:3000"], "max_age": "2h"})
    assert read.origins == frozenset({b"https://app.example.com", b"http://localhost:3000"})
    assert read.max_age == 7200 and read.methods == frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE"})
    route = parse(cors_config(), source="test.toml").routes[0]
    assert b"access-control-allow-origin" in route.hide_response_headers
    assert b"server" in route.hide_response_headers


def test_a_route_without_cors_has_no_policy() -> None:
    data = cors_config()
    del data["routes"][0]["cors"]
    assert parse(data, source="test.toml").routes[0].cors is None
