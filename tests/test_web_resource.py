"""`gateway.proxy.web.GatewayResource` mounted in a twisted.web `Site` of the test's own, over real loopback sockets:
relaying, streaming with backpressure, the spooled request body, admission, and both ways a stream breaks."""

from __future__ import annotations

import hashlib
import json
from base64 import b64encode
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import bcrypt
import pytest
import pytest_twisted
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor, task
from twisted.internet.ssl import CertificateOptions
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from gateway.auth.apikeys import hash_key
from gateway.config import parse
from gateway.operations.runtime import make_gateway
from gateway.proxy.web import GatewayResource
from tests.support.certs import client_options
from tests.support.clients import RawClient, connect, parse_response, parse_responses, within
from tests.support.faults import assert_problem, get
from tests.support.logs import captured
from tests.support.origin import Origin, pattern_bytes
from tests.support.running import gateway_config

MiB = 1024 * 1024
KEY = "gwk_web-resource-key-of-alice-0123456789"
PASSWORD_HASH = bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4)).decode("ascii")


@dataclass
class Served:
    """A twisted.web site on 127.0.0.1:0 with the resource at /api (anonymous), /keys (API keys) and /login
    (HTTP Basic, checked on a thread), and a page of its own at /local."""

    port: int
    resource: GatewayResource
    origin: Origin
    requests: list[Request]
    """The requests rendered at /api."""
    site: Site

    async def request(self, data: bytes, **kwargs: Any) -> RawClient:
        """Send `data` on a new connection and wait (bounded) for the site to close it."""
        client = await connect(self.port, keep_all=True, **kwargs)
        client.send(data)
        await within(client.closed)
        return client


class Page(Resource):
    """A page of the site's own, beside the gateway."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"the site's own page"


class Recording(Resource):
    """Renders with `inner`, keeping each request (for its spooled body)."""

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self.inner = inner
        self.requests: list[Request] = []

    def render(self, request: Request) -> Any:
        self.requests.append(request)
        return self.inner.render(request)


@pytest_twisted.async_yield_fixture()
async def served(origin: Origin) -> AsyncIterator[Served]:
    data = gateway_config(origin.url, route={"name": "api", "path_prefix": "/api/", "strip_prefix": True})
    data["routes"].append(
        {"name": "keys", "path_prefix": "/keys/", "strip_prefix": True, "upstream": "origin", "auth": ["keys"]}
    )
    data["routes"].append(
        {"name": "login", "path_prefix": "/login/", "strip_prefix": True, "upstream": "origin", "auth": ["login"]}
    )
    data["auth"] = {"keys": {"type": "api_key"}, "login": {"type": "basic"}}
    data["consumers"] = {"alice": {"api_keys": [hash_key(KEY)], "password": PASSWORD_HASH, "scopes": []}}
    resource = GatewayResource(make_gateway(parse(data, source="test.toml"), reactor))
    root = Resource()
    recording = Recording(resource)
    root.putChild(b"api", recording)
    root.putChild(b"keys", resource)
    root.putChild(b"login", resource)
    root.putChild(b"local", Page())
    site = Site(root)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    with captured(lambda event: "log_failure" in event) as failures:
        yield Served(port.getHost().port, resource, origin, recording.requests, site)
    await port.stopListening()
    await resource.close()
    assert failures == [], "failures logged (twisted.web's or the gateway's)"


async def test_get_is_relayed_with_status_headers_and_body(served: Served) -> None:
    """A GET reaches the upstream under the route's target and comes back byte for byte, with the upstream's
    status and headers and the gateway's, and none of twisted.web's own (Date, Server, a default Content-Type)."""
    client = await served.request(get(b"/api/bytes/70000?x=1"))
    response = client.response()
    assert response.complete and client.clean_close
    assert response.status == 200 and response.reason == b"OK"
    assert response.body == pattern_bytes(0, 70000)
    assert response.header(b"content-length") == b"70000"
    assert response.header(b"transfer-encoding") is None
    assert response.header(b"via") == b"1.1 gateway"
    assert response.header(b"x-request-id")
    for name in (b"date", b"server", b"content-type"):
        assert response.header(name) is None, name
    (seen,) = served.origin.seen
    assert seen.uri == b"/bytes/70000?x=1"
    assert seen.header(b"x-forwarded-for") == [b"127.0.0.1"]

    echoed = await served.request(get(b"/api/status/201"))
    response = echoed.response()
    assert (response.status, response.body) == (201, b"status body")
    assert response.header(b"content-type") == b"text/plain"
    local = parse_response(bytes((await served.request(get(b"/local"))).head))
    assert (local.status, local.body) == (200, b"the site's own page")


async def test_head_gets_the_upstreams_head_only(served: Served) -> None:
    """A HEAD is answered with the upstream's head (its Content-Length kept) and no body."""
    client = await served.request(get(b"/api/bytes/5000", method=b"HEAD"))
    response = client.response(head_request=True)
    assert response.status == 200 and response.header(b"content-length") == b"5000"
    assert response.body == b"" and response.rest == b""


@pytest.mark.parametrize(("size", "chunked"), [(8 * MiB, False), (2 * MiB, True)])
async def test_large_response_arrives_complete(served: Served, size: int, chunked: bool) -> None:
    """A large response streams through whole, with the upstream's Content-Length or, without one, chunked by
    twisted.web."""
    query = b"?chunked=1" if chunked else b""
    client = await connect(served.port, keep_all=True)
    client.send(get(b"/api/bytes/%d%s" % (size, query)))
    await within(client.closed, 30)
    response = client.response()
    assert response.complete and client.clean_close
    assert response.header(b"transfer-encoding") == (b"chunked" if chunked else None)
    assert len(response.body) == size and response.body == pattern_bytes(0, size)


@pytest.mark.parametrize("chunked", [False, True])
async def test_post_body_is_forwarded(served: Served, chunked: bool) -> None:
    """A request body (spooled by twisted.web; above 100 kB in a temporary file) reaches the upstream whole,
    with its length as framing, however the client framed it."""
    size = 3 * MiB + 123
    client = await connect(served.port, keep_all=True)
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
    client.send(b"POST /api/sink HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n%s\r\n\r\n" % framing)
    sender = client.send_body(size, chunked=chunked)
    assert await within(sender.done)
    await within(client.closed)
    response = client.response()
    assert response.status == 200 and response.complete
    answer = json.loads(response.body)
    body = pattern_bytes(0, size)
    assert answer == {"bytes": size, "sha256": hashlib.sha256(body).hexdigest()}
    (seen,) = served.origin.seen
    assert seen.header(b"content-length") == [b"%d" % size]
    assert seen.header(b"transfer-encoding") == []


async def test_upload_goes_up_no_faster_than_the_upstream_reads(served: Served) -> None:
    """While the upstream reads nothing, the spooled body stays mostly in the spool (the request pipe pauses it
    at its high-water mark, as it would pause a client socket); once the upstream reads again, all of it arrives."""
    size = 32 * MiB
    client = await connect(served.port, keep_all=True)
    client.send(b"POST /api/sink?hold=1 HTTP/1.1\r\nHost: example.test\r\nContent-Length: %d\r\n\r\n" % size)
    assert await within(client.send_body(size).done)
    await within(served.origin.request_seen())
    positions: list[int] = []
    for _ in range(400):
        if served.requests:
            positions.append(served.requests[0].content.tell())
            if len(positions) > 10 and positions[-1] == positions[-10]:
                break
        await task.deferLater(reactor, 0.02, lambda: None)
    assert positions and positions[-1] == positions[-10], positions
    assert positions[-1] < size // 2
    served.origin.release()
    await within(client.responses_received())
    answer = json.loads(client.response().body)
    assert answer == {"bytes": size, "sha256": hashlib.sha256(pattern_bytes(0, size)).hexdigest()}


async def test_api_key_route_refuses_without_key_and_admits_with_it(served: Served) -> None:
    """On a route that takes API keys, a request without one gets the gateway's 401 problem+json and never
    reaches the upstream; with alice's key it is relayed."""
    refused = await served.request(get(b"/keys/status/200"))
    problem = assert_problem(refused, 401)
    assert problem["status"] == 401
    assert parse_response(bytes(refused.head)).header(b"www-authenticate")
    assert served.origin.seen == []

    posted = await served.request(
        b"POST /keys/sink HTTP/1.1\r\nHost: example.test\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    )
    assert_problem(posted, 401)
    assert served.origin.seen == []

    admitted = await served.request(get(b"/keys/status/200", b"X-API-Key: " + KEY.encode()))
    response = admitted.response()
    assert (response.status, response.body) == (200, b"status body")
    (seen,) = served.origin.seen
    assert seen.header(b"x-consumer-id") == [b"alice"]
    assert seen.header(b"x-api-key") == []


@pytest.mark.parametrize("chunked", [False, True])
async def test_upstream_dying_mid_body_cuts_the_client(served: Served, chunked: bool) -> None:
    """An upstream that closes half-way through its body gets the client connection cut: the response never
    looks complete (no chunked terminator, a short body with Content-Length)."""
    query = b"?chunked=1" if chunked else b""
    client = await served.request(get(b"/api/truncate/100000%s" % query))
    response = client.response()
    assert response.status == 200
    assert not response.complete
    assert len(response.body) <= 100000
    assert response.header(b"content-length") == (None if chunked else b"200000")


async def test_slow_client_pauses_the_upstream_and_leaving_closes_it(served: Served) -> None:
    """A client that stops reading pauses the upstream's sending (backpressure through the resource); when it
    leaves mid-response, the upstream connection is closed."""
    client = await connect(served.port)
    client.send(get(b"/api/bytes/%d" % (256 * MiB)))
    await within(client.received_at_least(1 * MiB))
    client.pause()
    seen = await within(served.origin.request_seen())
    await within(seen.paused)
    assert seen.sent < 256 * MiB
    client.abort()
    await within(served.origin.connections_lost(1))
    await within(client.closed)
    assert not client.response().complete


@pytest.mark.parametrize(("password", "status"), [(b"secret", 200), (b"wrong", 401)])
async def test_body_waits_for_a_verdict_that_takes_time(served: Served, password: bytes, status: int) -> None:
    """A verdict that takes time (bcrypt on a thread) holds the spooled body back: admitted, the whole body goes
    up; refused, the gateway's 401 answers and the upstream never hears of the request."""
    size = MiB + 7
    credentials = b"Basic " + b64encode(b"alice:" + password)
    client = await connect(served.port, keep_all=True)
    client.send(
        b"POST /login/sink HTTP/1.1\r\nHost: example.test\r\nAuthorization: %s\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % (credentials, size)
    )
    assert await within(client.send_body(size).done)
    await within(client.closed)
    if status == 401:
        assert_problem(client, 401)
        assert served.origin.seen == []
        return
    response = client.response()
    assert response.status == 200 and response.complete
    assert json.loads(response.body) == {"bytes": size, "sha256": hashlib.sha256(pattern_bytes(0, size)).hexdigest()}


async def test_client_leaving_during_the_upload_cuts_the_upstream_request(served: Served) -> None:
    """A client that leaves while its spooled body is still going up leaves the upstream an unfinished body, on
    a connection that is closed."""
    size = 32 * MiB
    client = await connect(served.port)
    client.send(b"POST /api/sink?hold=1 HTTP/1.1\r\nHost: example.test\r\nContent-Length: %d\r\n\r\n" % size)
    assert await within(client.send_body(size).done)
    seen = await within(served.origin.request_seen())
    for _ in range(500):
        if served.requests:
            break
        await task.deferLater(reactor, 0.02, lambda: None)
    assert served.requests
    client.abort()
    await within(client.closed)
    served.origin.release()
    await within(served.origin.connections_lost(1))
    assert not seen.body_complete and seen.body_bytes < size


async def test_keep_alive_until_the_exchange_says_close(served: Served) -> None:
    """Requests follow one another on a keep-alive connection; a response the exchange marks `Connection: close`
    (a refusal before the body was taken) is the connection's last."""
    client = await connect(served.port, keep_all=True)
    client.send(get(b"/api/status/200", close=False))
    await within(client.responses_received(1))
    client.send(get(b"/api/bytes/10", close=False))
    await within(client.responses_received(2))
    assert client.reason is None
    client.send(b"POST /keys/sink HTTP/1.1\r\nHost: example.test\r\nContent-Length: 5\r\n\r\nhello")
    await within(client.closed)
    responses = parse_responses(bytes(client.head))
    assert [r.status for r in responses] == [200, 200, 401]
    assert responses[2].complete and responses[2].header(b"connection") == b"close"
    assert client.clean_close


async def test_over_tls_the_upstream_is_told_https(served: Served) -> None:
    """Served over TLS by the site, the request goes up with `X-Forwarded-Proto: https` (the exchange sees the
    TLS transport under the request)."""
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    options = CertificateOptions(
        privateKey=serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None),
        certificate=x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()),
    )
    port = reactor.listenSSL(0, served.site, options, interface="127.0.0.1")
    try:
        client = await connect(port.getHost().port, tls=client_options(ca, "localhost"), keep_all=True)
        client.send(get(b"/api/headers"))
        await within(client.closed)
        response = client.response()
        assert response.status == 200 and response.complete
        headers = {name.lower(): value for name, value in json.loads(response.body)["headers"]}
        assert headers["x-forwarded-proto"] == "https"
    finally:
        await port.stopListening()


async def test_http10_client_gets_a_body_ended_by_the_close(served: Served) -> None:
    """To an HTTP/1.0 client a response without Content-Length is delimited by the connection's close, which
    twisted.web makes once the exchange finished it."""
    client = await served.request(b"GET /api/bytes/100000?chunked=1 HTTP/1.0\r\nHost: example.test\r\n\r\n")
    response = client.response()
    assert response.status == 200 and client.clean_close
    assert response.header(b"transfer-encoding") is None and response.header(b"content-length") is None
    assert response.body == pattern_bytes(0, 100000)
