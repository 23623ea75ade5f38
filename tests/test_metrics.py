"""The metrics and the admin listener: /healthz, /readyz and /metrics scraped over loopback and parsed with
prometheus_client's own parser; counters move by exactly what each request did, gauges read what is live at the
scrape; and `Metrics` itself with hand-made records."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from gateway.auth.apikeys import hash_key
from gateway.config import parse
from gateway.operations.metrics import Live, Metrics, PoolState
from gateway.operations.service import GatewayService
from tests.support.clients import RawClient, connect, within
from tests.support.faults import get
from tests.support.origin import pattern_bytes
from tests.support.running import RunningGateway, gateway_config
from tests.support.scrape import Scrape, admin_get, admin_port, scrape, scraped_until

MiB = 1024 * 1024
KiB = 1024
ADMIN = {"host": "127.0.0.1", "port": 0}
KEY = "gwk_metrics-key-of-alice-0123456789abcdef"
SOCKET_READ = 256 * KiB
"""What one read of the client socket may add to a request body pipe past its high-water mark."""


def admin_config(origin_url: str, **sections: Any) -> dict[str, Any]:
    """A gateway with an admin listener on a free loopback port and no access log."""
    return gateway_config(origin_url, admin=ADMIN, access_log={"path": ""}, **sections)


def requests_total(s: Scrape, route: str, status: str, ending: str) -> float:
    return s.count("gateway_requests_total", route=route, status=status, ending=ending)


async def exchange(gateway: RunningGateway, request: bytes) -> RawClient:
    client = await connect(gateway.port, keep_all=True)
    client.send(request)
    await within(client.closed, 30)
    return client


# === the probes =======================================================================================================


@pytest_twisted.ensureDeferred
async def test_healthz_is_200_json(origin, gateway_for):
    """/healthz answers 200 with a JSON status, never cached."""
    gateway = gateway_for(admin_config(origin.url))
    response = await admin_get(admin_port(gateway), b"/healthz")
    assert response.status == 200
    assert response.header(b"content-type") == b"application/json"
    assert response.header(b"cache-control") == b"no-store"
    assert json.loads(response.body) == {"status": "ok"}


@pytest_twisted.ensureDeferred
async def test_probes_answer_head_without_a_body(origin, gateway_for):
    """HEAD on a probe answers its status and the length its body would have, without the body."""
    gateway = gateway_for(admin_config(origin.url))
    response = await admin_get(admin_port(gateway), b"/readyz", method=b"HEAD")
    assert (response.status, response.body) == (200, b"")
    assert response.header(b"content-length") == b"%d" % len(b'{"status":"ok"}\n')


@pytest_twisted.ensureDeferred
async def test_readyz_is_200_while_serving_and_503_draining(origin, gateway_for):
    """/readyz answers 200 while the gateway serves, and 503 with reason "draining" once it drains."""
    gateway = gateway_for(admin_config(origin.url))
    port = admin_port(gateway)
    ready = await admin_get(port, b"/readyz")
    assert (ready.status, json.loads(ready.body)) == (200, {"status": "ok"})
    gateway.service.draining = True
    draining = await admin_get(port, b"/readyz")
    assert draining.status == 503
    assert json.loads(draining.body) == {"status": "unavailable", "reason": "draining"}
    assert draining.header(b"content-type") == b"application/json"


@pytest_twisted.ensureDeferred
async def test_readyz_is_503_starting_until_the_service_runs(origin):
    """Before the service has started (its admin port already bound), /readyz answers 503 "starting"; once it
    runs, 200."""
    config = parse(admin_config(origin.url), source="test.toml")
    service = GatewayService(config, reactor)
    admin = service.admin
    assert admin is not None
    try:
        admin.startService()
        assert admin.port is not None
        port = admin.port.getHost().port
        starting = await admin_get(port, b"/readyz")
        assert starting.status == 503
        assert json.loads(starting.body) == {"status": "unavailable", "reason": "starting"}
        service.startService()
        ready = await admin_get(port, b"/readyz")
        assert (ready.status, json.loads(ready.body)) == (200, {"status": "ok"})
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_unknown_admin_path_is_404(origin, gateway_for):
    """A path the admin site does not serve is 404; its root names what it serves."""
    gateway = gateway_for(admin_config(origin.url))
    port = admin_port(gateway)
    root = await admin_get(port, b"/")
    assert root.status == 200 and b"/metrics" in root.body
    assert (await admin_get(port, b"/nothing-here")).status == 404


@pytest_twisted.ensureDeferred
async def test_process_metrics_of_the_one_process(origin, gateway_for):
    """Without workers a scrape carries the process's own metrics (RSS, open fds, CPU seconds, start time), and
    every series is as it always was: no `worker` label anywhere, no gateway_worker_up."""
    gateway = gateway_for(admin_config(origin.url))
    s = await scrape(admin_port(gateway))
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds"):
        assert (s.value(name) or 0) > 0, name
    assert s.types["process_cpu_seconds"] == "counter"
    assert s.value("gateway_draining") == 0
    assert not [labels for _, labels in s.samples if "worker" in dict(labels)]
    assert "gateway_worker_up" not in s.types


# === counters =========================================================================================================


@pytest_twisted.ensureDeferred
async def test_requests_total_moves_by_one_per_request(origin, gateway_for):
    """gateway_requests_total moves by exactly one for each request, under its route, status and ending: a
    completed 200 and a 404 that matched no route."""
    gateway = gateway_for(admin_config(origin.url, route={"path_prefix": "/in", "strip_prefix": True}))
    port = admin_port(gateway)
    before = await scrape(port)
    assert before.types["gateway_requests"] == "counter"
    ok = await exchange(gateway, get(b"/in/status/200"))
    assert ok.response().status == 200

    def counted(s: Scrape) -> bool:
        return requests_total(s, "origin", "200", "completed") > requests_total(before, "origin", "200", "completed")

    after_ok = await scraped_until(port, counted, "the 200 is counted")
    missing = await exchange(gateway, get(b"/elsewhere"))
    assert missing.response().status == 404
    after = await scraped_until(
        port, lambda s: requests_total(s, "", "404", "answered") > 0, 'the 404 is counted under route ""'
    )
    assert (
        requests_total(after_ok, "origin", "200", "completed") - requests_total(before, "origin", "200", "completed")
        == 1
    )
    assert requests_total(after, "origin", "200", "completed") == requests_total(after_ok, "origin", "200", "completed")
    assert requests_total(after, "", "404", "answered") - requests_total(before, "", "404", "answered") == 1
    assert (
        sum(after.labelled("gateway_requests_total").values()) - sum(before.labelled("gateway_requests_total").values())
        == 2
    )


@pytest_twisted.ensureDeferred
async def test_body_byte_counters_move_by_the_body_sizes(origin, gateway_for):
    """The request- and response-body byte counters move by the bytes of an upload and of its answer."""
    size = 2 * MiB + 5
    gateway = gateway_for(admin_config(origin.url))
    port = admin_port(gateway)
    before = await scrape(port)
    client = await connect(gateway.port, keep_all=True)
    client.send(b"POST /sink HTTP/1.1\r\nHost: example.test\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % size)
    client.send_body(size)
    await within(client.closed, 30)
    response = client.response()
    assert response.status == 200 and json.loads(response.body)["bytes"] == size
    download = await exchange(gateway, get(b"/bytes/300000"))
    assert download.response().body == pattern_bytes(0, 300000)
    total_out = len(response.body) + 300000

    def moved(s: Scrape) -> bool:
        return (
            s.count("gateway_response_body_bytes_total", route="origin")
            - before.count("gateway_response_body_bytes_total", route="origin")
            >= total_out
        )

    after = await scraped_until(port, moved, "both responses are counted")
    assert (
        after.count("gateway_request_body_bytes_total", route="origin")
        - before.count("gateway_request_body_bytes_total", route="origin")
        == size
    )
    assert (
        after.count("gateway_response_body_bytes_total", route="origin")
        - before.count("gateway_response_body_bytes_total", route="origin")
        == total_out
    )


@pytest_twisted.ensureDeferred
async def test_latency_histograms_count_each_request(origin, gateway_for):
    """A proxied request adds one observation to the time-to-first-byte and duration histograms of its route;
    a 404 (no upstream response) only to the duration one, under route ""."""
    gateway = gateway_for(admin_config(origin.url, route={"path_prefix": "/in", "strip_prefix": True}))
    port = admin_port(gateway)
    before = await scrape(port)
    assert before.types["gateway_time_to_first_byte_seconds"] == "histogram"
    await exchange(gateway, get(b"/in/bytes/1000"))
    await exchange(gateway, get(b"/elsewhere"))

    def delta(s: Scrape, name: str, route: str) -> float:
        return s.count(name, route=route) - before.count(name, route=route)

    after = await scraped_until(
        port,
        lambda s: (
            delta(s, "gateway_request_duration_seconds_count", "") >= 1
            and delta(s, "gateway_request_duration_seconds_count", "origin") >= 1
        ),
        "both requests are observed",
    )
    assert delta(after, "gateway_request_duration_seconds_count", "origin") == 1
    assert delta(after, "gateway_time_to_first_byte_seconds_count", "origin") == 1
    assert delta(after, "gateway_request_duration_seconds_count", "") == 1
    assert delta(after, "gateway_time_to_first_byte_seconds_count", "") == 0
    assert delta(after, "gateway_request_duration_seconds_sum", "origin") >= delta(
        after, "gateway_time_to_first_byte_seconds_sum", "origin"
    )
    inf = after.value("gateway_request_duration_seconds_bucket", route="origin", le="+Inf")
    assert inf == after.value("gateway_request_duration_seconds_count", route="origin")


@pytest_twisted.ensureDeferred
async def test_admission_denial_is_counted_by_route_and_reason(origin, gateway_for):
    """A request refused 401 for want of credentials moves gateway_admission_denials_total{route,reason} by one."""
    data = admin_config(origin.url, route={"auth": ["keys"]})
    data["auth"] = {"keys": {"type": "api_key"}}
    data["consumers"] = {"alice": {"api_keys": [hash_key(KEY)], "scopes": []}}
    gateway = gateway_for(data)
    port = admin_port(gateway)
    before = await scrape(port)
    client = await exchange(gateway, get(b"/status/200"))
    assert client.response().status == 401
    labels = {"route": "origin", "reason": "missing_credentials"}
    after = await scraped_until(
        port, lambda s: s.count("gateway_admission_denials_total", **labels) >= 1, "the denial is counted"
    )
    assert (
        after.count("gateway_admission_denials_total", **labels)
        - before.count("gateway_admission_denials_total", **labels)
        == 1
    )
    assert requests_total(after, "origin", "401", "answered") - requests_total(before, "origin", "401", "answered") == 1
    allowed = await exchange(gateway, get(b"/status/200", b"X-API-Key: " + KEY.encode()))
    assert allowed.response().status == 200
    final = await scraped_until(
        port, lambda s: requests_total(s, "origin", "200", "completed") >= 1, "the admitted request is counted"
    )
    assert sum(final.labelled("gateway_admission_denials_total").values()) == sum(
        after.labelled("gateway_admission_denials_total").values()
    )


@pytest_twisted.ensureDeferred
async def test_refused_request_line_is_counted_without_a_route(origin, gateway_for):
    """A request line the channel refuses (414) is counted under route "", status 414, ending "refused"."""
    gateway = gateway_for(admin_config(origin.url, limits={"max_request_line_bytes": 1024}))
    port = admin_port(gateway)
    before = await scrape(port)
    client = await exchange(gateway, b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: example.test\r\n\r\n")
    assert client.response().status == 414
    after = await scraped_until(
        port, lambda s: requests_total(s, "", "414", "refused") > requests_total(before, "", "414", "refused"), "414"
    )
    assert requests_total(after, "", "414", "refused") - requests_total(before, "", "414", "refused") == 1


# === gauges: what is live at the scrape ===============================================================================


def _paused(s: Scrape, direction: str) -> float | None:
    return s.value("gateway_streams_paused", direction=direction)


@pytest.mark.parametrize("then", ["reads-again", "leaves"])
@pytest_twisted.ensureDeferred
async def test_client_that_stops_reading_shows_a_paused_response_stream(origin, gateway_for, then):
    """While a client reads nothing of a large download, the stream shows as paused (direction="response"), in
    phase "streaming", on one client connection; once the client has read it all, or left, nothing is paused."""
    size = 64 * MiB
    gateway = gateway_for(admin_config(origin.url))
    port = admin_port(gateway)
    idle = await scrape(port)
    assert _paused(idle, "response") == 0 and _paused(idle, "request") == 0
    assert idle.value("gateway_client_connections") == 0
    client = await connect(gateway.port)
    client.send(get(b"/bytes/%d" % size))
    client.pause()
    seen = await within(origin.request_seen())
    await within(seen.paused)
    paused = await scraped_until(port, lambda s: _paused(s, "response") == 1, "the response stream shows as paused")
    assert paused.value("gateway_requests_in_flight", phase="streaming") == 1
    assert paused.value("gateway_client_connections") == 1
    assert paused.value("gateway_upstream_requests_in_flight", upstream="origin") == 1
    assert _paused(paused, "request") == 0
    if then == "reads-again":
        client.resume()
        await within(client.closed, 60)
        assert client.received > size and client.clean_close
    else:
        client.abort()
        await within(seen.connection_lost)
    after = await scraped_until(
        port,
        lambda s: _paused(s, "response") == 0 and s.value("gateway_client_connections") == 0,
        "nothing is paused and no client is left",
    )
    assert after.labelled("gateway_requests_in_flight") == {}
    assert after.value("gateway_upstream_requests_in_flight", upstream="origin") == 0


@pytest_twisted.ensureDeferred
async def test_slow_upstream_shows_a_paused_upload_with_bounded_buffer(origin, gateway_for):
    """While an upstream reads none of an upload, the client shows as paused (direction="request"), and the
    request-body bytes the gateway holds stay within the route's high-water mark plus one socket read."""
    size = 64 * MiB
    high = 128 * KiB
    gateway = gateway_for(admin_config(origin.url, route={"flow_control": {"high_water": high, "low_water": 32 * KiB}}))
    port = admin_port(gateway)
    client = await connect(gateway.port, keep_all=True)
    client.send(
        b"POST /sink?hold=1 HTTP/1.1\r\nHost: example.test\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % size
    )
    sender = client.send_body(size)
    await within(origin.request_seen())
    paused = await scraped_until(port, lambda s: _paused(s, "request") == 1, "the upload shows as paused")
    assert paused.value("gateway_requests_in_flight", phase="waiting") == 1
    for _ in range(20):
        s = await scrape(port)
        held = s.value("gateway_buffered_bytes", direction="request")
        assert held is not None and held <= high + SOCKET_READ, f"{held} bytes held for a slow upstream"
        assert _paused(s, "request") == 1
    assert sender.written < size
    origin.release()
    await within(client.closed, 60)
    assert json.loads(client.response().body)["bytes"] == size
    after = await scraped_until(port, lambda s: _paused(s, "request") == 0, "the upload is no longer paused")
    assert after.value("gateway_buffered_bytes", direction="request") == 0


@pytest_twisted.ensureDeferred
async def test_completed_keep_alive_request_leaves_an_idle_upstream_connection(origin, gateway_for):
    """After a completed request, its upstream connection is kept for reuse and shows as idle."""
    gateway = gateway_for(admin_config(origin.url))
    port = admin_port(gateway)
    before = await scrape(port)
    assert before.value("gateway_upstream_idle_connections", upstream="origin") == 0
    await exchange(gateway, get(b"/bytes/1000"))
    after = await scraped_until(
        port,
        lambda s: (s.value("gateway_upstream_idle_connections", upstream="origin") or 0) >= 1,
        "an idle upstream connection",
    )
    assert after.value("gateway_upstream_queue_length", upstream="origin") == 0
    assert origin.accepted == 1


@pytest_twisted.ensureDeferred
async def test_client_connections_gauge_counts_open_connections(origin, gateway_for):
    """gateway_client_connections counts the client connections open at the scrape, idle ones included."""
    gateway = gateway_for(admin_config(origin.url))
    port = admin_port(gateway)
    first = await connect(gateway.port)
    second = await connect(gateway.port)
    await scraped_until(port, lambda s: s.value("gateway_client_connections") == 2, "two client connections")
    first.transport.loseConnection()
    await within(first.closed)
    await scraped_until(port, lambda s: s.value("gateway_client_connections") == 1, "one client connection")
    second.transport.loseConnection()
    await within(second.closed)
    await scraped_until(port, lambda s: s.value("gateway_client_connections") == 0, "no client connection")


@pytest_twisted.ensureDeferred
async def test_draining_gauge(origin, gateway_for):
    """gateway_draining is 0 while the gateway serves and 1 once it drains."""
    gateway = gateway_for(admin_config(origin.url))
    port = admin_port(gateway)
    assert (await scrape(port)).value("gateway_draining") == 0
    gateway.service.draining = True
    assert (await scrape(port)).value("gateway_draining") == 1


# === Metrics itself ===================================================================================================


def _live(**changes: Any) -> Live:
    values: dict[str, Any] = {
        "connections": 0,
        "requests": {},
        "paused_responses": 0,
        "paused_uploads": 0,
        "buffered_upload_bytes": 0,
        "buffered_response_bytes": 0,
        "pools": [],
        "draining": False,
    }
    values.update(changes)
    return Live(**values)


def _record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "request_id": "r-1",
        "client": "127.0.0.1",
        "method": "GET",
        "path": "/x",
        "route": "reports",
        "upstream": "demo",
        "consumer": None,
        "status": 200,
        "bytes_in": 0,
        "bytes_out": 0,
        "decision_ms": None,
        "queue_ms": None,
        "connect_ms": None,
        "ttfb_ms": None,
        "total_ms": None,
        "ending": "completed",
        "user_agent": None,
    }
    record.update(changes)
    return record


def test_request_ended_without_status_or_duration():
    """A record with no status counts under status "", and one with no total time observes no duration."""
    metrics = Metrics(_live)
    metrics.request_ended(_record(status=None, ending="drain_timeout"))
    registry = metrics.registry
    assert (
        registry.get_sample_value(
            "gateway_requests_total", {"route": "reports", "status": "", "ending": "drain_timeout"}
        )
        == 1
    )
    assert registry.get_sample_value("gateway_request_duration_seconds_count", {"route": "reports"}) is None
    assert registry.get_sample_value("gateway_time_to_first_byte_seconds_count", {"route": "reports"}) is None
    assert registry.get_sample_value("gateway_upstream_queue_wait_seconds_count", {"upstream": "demo"}) is None
    assert registry.get_sample_value("gateway_request_body_bytes_total", {"route": "reports"}) is None


def test_request_ended_observes_times_in_seconds_and_counts_bytes():
    """A full record moves each counter by its bytes and observes its times, converted to seconds."""
    metrics = Metrics(_live)
    registry = metrics.registry
    for _ in range(2):
        metrics.request_ended(
            _record(bytes_in=10, bytes_out=2000, queue_ms=5.0, ttfb_ms=250.0, total_ms=1500.0, route=None)
        )
    assert (
        registry.get_sample_value("gateway_requests_total", {"route": "", "status": "200", "ending": "completed"}) == 2
    )
    assert registry.get_sample_value("gateway_request_duration_seconds_count", {"route": ""}) == 2
    assert registry.get_sample_value("gateway_request_duration_seconds_sum", {"route": ""}) == pytest.approx(3.0)
    assert registry.get_sample_value("gateway_request_duration_seconds_bucket", {"route": "", "le": "1.0"}) == 0
    assert registry.get_sample_value("gateway_request_duration_seconds_bucket", {"route": "", "le": "2.5"}) == 2
    assert registry.get_sample_value("gateway_time_to_first_byte_seconds_sum", {"route": ""}) == pytest.approx(0.5)
    assert registry.get_sample_value("gateway_upstream_queue_wait_seconds_sum", {"upstream": "demo"}) == pytest.approx(
        0.01
    )
    assert registry.get_sample_value("gateway_request_body_bytes_total", {"route": ""}) == 20
    assert registry.get_sample_value("gateway_response_body_bytes_total", {"route": ""}) == 4000


def test_denials_and_reloads_are_counted():
    """`denied` counts by route and reason, `reloaded` by result."""
    metrics = Metrics(_live)
    metrics.denied("reports", "missing_credentials")
    metrics.denied("reports", "missing_credentials")
    metrics.reloaded("invalid")
    registry = metrics.registry
    assert (
        registry.get_sample_value(
            "gateway_admission_denials_total", {"route": "reports", "reason": "missing_credentials"}
        )
        == 2
    )
    assert registry.get_sample_value("gateway_config_reloads_total", {"result": "invalid"}) == 1
    assert registry.get_sample_value("gateway_config_reloads_total", {"result": "applied"}) is None


def test_live_gauges_are_read_at_each_collection():
    """The live gauges report what `read_live` returns at the moment of each collection."""
    current = [_live()]
    metrics = Metrics(lambda: current[0])
    registry = metrics.registry
    assert registry.get_sample_value("gateway_client_connections") == 0
    assert registry.get_sample_value("gateway_upstream_idle_connections", {"upstream": "demo"}) is None
    current[0] = _live(
        connections=3,
        requests={"streaming": 2, "waiting": 1},
        paused_responses=1,
        paused_uploads=2,
        buffered_upload_bytes=100,
        buffered_response_bytes=200,
        pools=[PoolState("demo", in_flight=4, queued=5, idle=6)],
        draining=True,
    )
    expected = {
        ("gateway_client_connections", ()): 3,
        ("gateway_requests_in_flight", (("phase", "streaming"),)): 2,
        ("gateway_requests_in_flight", (("phase", "waiting"),)): 1,
        ("gateway_streams_paused", (("direction", "response"),)): 1,
        ("gateway_streams_paused", (("direction", "request"),)): 2,
        ("gateway_buffered_bytes", (("direction", "request"),)): 100,
        ("gateway_buffered_bytes", (("direction", "response"),)): 200,
        ("gateway_upstream_requests_in_flight", (("upstream", "demo"),)): 4,
        ("gateway_upstream_queue_length", (("upstream", "demo"),)): 5,
        ("gateway_upstream_idle_connections", (("upstream", "demo"),)): 6,
        ("gateway_draining", ()): 1,
    }
    for (name, labels), value in expected.items():
        assert registry.get_sample_value(name, dict(labels)) == value, name


def test_build_info_carries_the_versions():
    """gateway_build_info is 1 with the gateway's, Twisted's, Python's and OpenSSL's versions and the build
    (compiled or interpreted) as labels: what `twistd gateway --version` prints."""
    from gateway.operations.about import versions

    metrics = Metrics(_live)
    about = versions()
    assert metrics.registry.get_sample_value("gateway_build_info", about) == 1
    assert about["version"] and about["twisted"] and about["python"] and about["openssl"].startswith("OpenSSL")
    assert about["build"] in ("compiled", "interpreted")
