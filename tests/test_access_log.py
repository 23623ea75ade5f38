"""The access log: one JSON line per request whatever its ending, over real loopback sockets, with its fields;
no secret ever in it; and `AccessLog` and `JsonLinesObserver` themselves."""

from __future__ import annotations

import io
import json
import re
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.failure import Failure

from gateway.auth.apikeys import hash_key
from gateway.logs import ACCESS_NAMESPACE, AccessLog, JsonLinesObserver, observer
from tests.support.clients import RawClient, connect, parse_responses, within
from tests.support.faults import get
from tests.support.logs import captured, in_namespace
from tests.support.origin import pattern_bytes
from tests.support.running import RunningGateway, gateway_config
from tests.support.scrape import line_of, lines_logged, log_lines, until

MiB = 1024 * 1024
UA = b"User-Agent: access-log-test/1.0"
KEY = "gwk_access-log-key-of-alice-0123456789abcdef"
FIELDS = [
    "time",
    "request_id",
    "client",
    "method",
    "host",
    "path",
    "route",
    "upstream",
    "upstream_addr",
    "attempts",
    "consumer",
    "status",
    "bytes_in",
    "bytes_out",
    "decision_ms",
    "queue_ms",
    "connect_ms",
    "ttfb_ms",
    "total_ms",
    "ending",
    "tls_version",
    "tls_cipher",
    "user_agent",
]
DURATIONS = ("decision_ms", "queue_ms", "connect_ms", "ttfb_ms", "total_ms")


def logged_config(origin_url: str, log: Path, **sections: Any) -> dict[str, Any]:
    """A gateway config (see `gateway_config`) whose access log is the file `log` (an absolute path)."""
    return gateway_config(origin_url, access_log={"path": str(log), **sections.pop("access_log", {})}, **sections)


def protected(origin_url: str, log: Path, **sections: Any) -> dict[str, Any]:
    """A logged gateway whose catch-all route takes API keys; consumer alice holds KEY."""
    data = logged_config(origin_url, log, route={"auth": ["keys"]}, **sections)
    data["auth"] = {"keys": {"type": "api_key"}}
    data["consumers"] = {"alice": {"api_keys": [hash_key(KEY)], "scopes": []}}
    return data


def post(path: bytes, length: int, *headers: bytes) -> bytes:
    lines = [b"POST %s HTTP/1.1" % path, b"Host: example.test", b"Content-Length: %d" % length, *headers]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


def request_id(client: RawClient) -> str:
    """The X-Request-ID of the (first) response the client got."""
    value = parse_responses(bytes(client.head))[0].header(b"x-request-id")
    assert value, bytes(client.head)[:300]
    return value.decode("ascii")


def check(line: dict[str, Any], reached: set[str], **expected: Any) -> None:
    """The line has every field in order, the expected values, a number >= 0 for each duration in `reached` and
    null for the others, in an order that holds together."""
    assert list(line) == FIELDS, line
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]), line["time"]
    expected.setdefault("client", "127.0.0.1")
    for key, value in expected.items():
        assert line[key] == value, f"{key}: {line[key]!r} != {value!r} in {line}"
    for key in DURATIONS:
        value = line[key]
        if key in reached:
            assert isinstance(value, int | float) and not isinstance(value, bool), (key, line)
            assert value >= 0, (key, line)
        else:
            assert value is None, (key, line)
    total, ttfb, decision = line["total_ms"], line["ttfb_ms"], line["decision_ms"]
    if ttfb is not None and total is not None:
        assert ttfb <= total, line
    if decision is not None and total is not None:
        assert decision <= total, line
    if decision is not None and ttfb is not None:
        assert decision <= ttfb, line


async def exchange(gateway: RunningGateway, request: bytes) -> RawClient:
    client = await connect(gateway.port, keep_all=True)
    client.send(request)
    await within(client.closed)
    return client


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed): a connection there is refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


# === completed ========================================================================================================


@pytest_twisted.ensureDeferred
async def test_completed_get_logs_one_line_with_every_field(origin, gateway_for, tmp_path):
    """A completed GET leaves one line: its id, client, method, Host, path, route, upstream and the server that
    answered, status, body bytes, every duration, ending "completed", no TLS (a plain listener) and the user
    agent."""
    log = tmp_path / "access.log"
    gateway = gateway_for(logged_config(origin.url, log))
    client = await exchange(gateway, get(b"/bytes/1000", UA))
    assert client.response().body == pattern_bytes(0, 1000)
    (line,) = await lines_logged(log, 1)
    check(
        line,
        set(DURATIONS),
        request_id=request_id(client),
        method="GET",
        path="/bytes/1000",
        host="example.test",
        route="origin",
        upstream="origin",
        upstream_addr=origin.url.removeprefix("http://"),
        consumer=None,
        status=200,
        bytes_in=0,
        bytes_out=1000,
        ending="completed",
        tls_version=None,
        tls_cipher=None,
        user_agent="access-log-test/1.0",
    )


@pytest_twisted.ensureDeferred
async def test_completed_upload_counts_the_body_both_ways(origin, gateway_for, tmp_path):
    """A completed upload's line counts the request body it read and the response body it wrote."""
    log = tmp_path / "access.log"
    size = 3 * MiB + 17
    gateway = gateway_for(logged_config(origin.url, log))
    client = await connect(gateway.port, keep_all=True)
    client.send(post(b"/sink", size, UA))
    client.send_body(size)
    await within(client.closed, 30)
    response = client.response()
    assert response.status == 200 and json.loads(response.body)["bytes"] == size
    (line,) = await lines_logged(log, 1)
    check(
        line,
        set(DURATIONS),
        request_id=request_id(client),
        method="POST",
        path="/sink",
        route="origin",
        upstream="origin",
        status=200,
        bytes_in=size,
        bytes_out=len(response.body),
        ending="completed",
        user_agent="access-log-test/1.0",
    )


@pytest_twisted.ensureDeferred
async def test_each_request_on_a_kept_alive_connection_has_its_line(origin, gateway_for, tmp_path):
    """Two requests on one connection leave two lines, one each, with their own ids and paths."""
    log = tmp_path / "access.log"
    gateway = gateway_for(logged_config(origin.url, log))
    client = await connect(gateway.port, keep_all=True)
    client.send(get(b"/bytes/10", close=False))
    await within(client.responses_received(1))
    client.send(get(b"/status/204"))
    await within(client.closed)
    first, second = parse_responses(bytes(client.head))
    lines = await lines_logged(log, 2)
    assert [(line["request_id"], line["path"], line["status"], line["bytes_out"]) for line in lines] == [
        (first.header(b"x-request-id").decode(), "/bytes/10", 200, 10),
        (second.header(b"x-request-id").decode(), "/status/204", 204, 0),
    ]
    assert {line["ending"] for line in lines} == {"completed"}


@pytest_twisted.ensureDeferred
async def test_api_key_consumer_is_logged(origin, gateway_for, tmp_path):
    """A request admitted by an API key is logged with its consumer's name."""
    log = tmp_path / "access.log"
    gateway = gateway_for(protected(origin.url, log))
    client = await exchange(gateway, get(b"/status/200", b"X-API-Key: " + KEY.encode()))
    assert client.response().status == 200
    (line,) = await lines_logged(log, 1)
    check(
        line,
        set(DURATIONS),
        request_id=request_id(client),
        route="origin",
        upstream="origin",
        consumer="alice",
        status=200,
        ending="completed",
    )


@pytest.mark.parametrize("query", [False, True], ids=["query-left-out", "query-logged"])
@pytest_twisted.ensureDeferred
async def test_query_string_is_logged_only_when_configured(origin, gateway_for, tmp_path, query):
    """The path is logged without its query string, unless `access_log.query` is true."""
    log = tmp_path / "access.log"
    gateway = gateway_for(logged_config(origin.url, log, access_log={"query": query}))
    await exchange(gateway, get(b"/status/200?token=query-secret-42&x=1"))
    (line,) = await lines_logged(log, 1)
    assert line["path"] == ("/status/200?token=query-secret-42&x=1" if query else "/status/200")
    assert ("query-secret-42" in log.read_text()) is query


# === answered by the gateway ==========================================================================================


@pytest.mark.parametrize(
    ("case", "status"),
    [("no-route", 404), ("no-key", 401), ("body-too-large", 413)],
)
@pytest_twisted.ensureDeferred
async def test_head_time_answers_are_logged(origin, gateway_for, tmp_path, case, status):
    """A request answered on its head (no route, no credentials, a declared body over the limit) is logged
    "answered" with its status, the route it matched (if any), no upstream and only the decision's time."""
    log = tmp_path / "access.log"
    if case == "no-route":
        config = logged_config(origin.url, log, route={"path_prefix": "/only"})
        request, route = get(b"/elsewhere", UA), None
    elif case == "no-key":
        config = protected(origin.url, log)
        request, route = get(b"/elsewhere", UA), "origin"
    else:
        config = logged_config(origin.url, log, route={"limits": {"max_request_body_bytes": 1000}})
        request, route = post(b"/elsewhere", 1001, UA) + pattern_bytes(0, 1001), "origin"
    gateway = gateway_for(config)
    client = await exchange(gateway, request)
    assert parse_responses(bytes(client.head))[0].status == status
    (line,) = await lines_logged(log, 1)
    check(
        line,
        {"decision_ms", "total_ms"},
        request_id=request_id(client),
        method=request.split(b" ")[0].decode(),
        path="/elsewhere",
        route=route,
        upstream=None,
        consumer=None,
        status=status,
        bytes_out=len(client.response().body),
        ending="answered",
        user_agent="access-log-test/1.0",
    )
    assert origin.accepted == 0


@pytest_twisted.ensureDeferred
async def test_unreachable_upstream_is_logged_502(gateway_for, tmp_path):
    """A request whose upstream refuses the connection is logged 502 "answered", with its queue time and no
    connect or first-byte time."""
    log = tmp_path / "access.log"
    gateway = gateway_for(logged_config(f"http://127.0.0.1:{_closed_port()}", log))
    client = await exchange(gateway, get(b"/down", UA))
    (line,) = await lines_logged(log, 1)
    check(
        line,
        {"decision_ms", "queue_ms", "total_ms"},
        request_id=request_id(client),
        path="/down",
        route="origin",
        upstream="origin",
        status=502,
        bytes_in=0,
        bytes_out=len(client.response().body),
        ending="answered",
    )


@pytest_twisted.ensureDeferred
async def test_full_upstream_queue_is_logged_503(origin, gateway_for, tmp_path):
    """A request refused because the upstream's queue is full is logged 503 without a queue time (it never got
    a slot); the requests that held and waited for the slot get a line each when their clients leave."""
    log = tmp_path / "access.log"
    gateway = gateway_for(logged_config(origin.url, log, upstream={"max_connections": 1, "max_queue": 1}))
    holding = await connect(gateway.port, keep_all=True)
    holding.send(get(b"/stall", b"X-Request-ID: holding-1"))
    await within(origin.request_seen())
    queued = await connect(gateway.port, keep_all=True)
    queued.send(get(b"/stall", b"X-Request-ID: queued-1"))
    await until(lambda: gateway.pool().queued == 1, "the second request is queued")
    refused = await exchange(gateway, get(b"/stall", b"X-Request-ID: refused-1"))
    assert parse_responses(bytes(refused.head))[0].status == 503
    line = await line_of(log, "refused-1")
    check(
        line,
        {"decision_ms", "total_ms"},
        request_id=request_id(refused),
        route="origin",
        upstream="origin",
        status=503,
        bytes_out=len(refused.response().body),
        ending="answered",
    )
    queued.abort()
    assert (await line_of(log, "queued-1"))["status"] == 499
    holding.abort()
    assert (await line_of(log, "holding-1"))["status"] == 499
    assert len(log_lines(log)) == 3


@pytest_twisted.ensureDeferred
async def test_response_headers_timeout_is_logged_504(origin, gateway_for, tmp_path):
    """A request whose upstream sends no response head in time is logged 504 "answered": it got a slot and went
    out on a connection, but has no first-byte time."""
    log = tmp_path / "access.log"
    gateway = gateway_for(logged_config(origin.url, log, timeouts={"response_headers": 0.2}))
    client = await exchange(gateway, get(b"/stall", UA))
    assert len(origin.seen) == 1, "the request reached the upstream"
    (line,) = await lines_logged(log, 1)
    check(
        line,
        {"decision_ms", "queue_ms", "connect_ms", "total_ms"},
        request_id=request_id(client),
        route="origin",
        upstream="origin",
        status=504,
        bytes_out=len(client.response().body),
        ending="answered",
    )


# === cut short ========================================================================================================


@pytest_twisted.ensureDeferred
async def test_client_gone_mid_download_keeps_the_upstream_status(origin, gateway_for, tmp_path):
    """A client that leaves mid-download is logged "client_gone" with the upstream's status and the body bytes
    written so far."""
    log = tmp_path / "access.log"
    size = 256 * MiB
    gateway = gateway_for(logged_config(origin.url, log))
    client = await connect(gateway.port, keep_all=False)
    client.send(get(b"/bytes/%d" % size, UA))
    await within(client.received_at_least(1 * MiB))
    given = parse_responses(bytes(client.head))[0].header(b"x-request-id").decode()
    client.abort()
    (line,) = await lines_logged(log, 1)
    check(
        line,
        set(DURATIONS),
        request_id=given,
        route="origin",
        upstream="origin",
        status=200,
        ending="client_gone",
    )
    assert 1 * MiB - 1000 < line["bytes_out"] < size


@pytest_twisted.ensureDeferred
async def test_client_gone_before_the_response_is_logged_499(origin, gateway_for, tmp_path):
    """A client that leaves while the upstream has not answered is logged 499 "client_gone" (nothing was sent);
    the request went out on a connection but has no first-byte time."""
    log = tmp_path / "access.log"
    gateway = gateway_for(logged_config(origin.url, log))
    client = await connect(gateway.port)
    client.send(get(b"/stall", UA, b"X-Request-ID: gone-before-head"))
    await within(origin.request_seen())
    client.abort()
    (line,) = await lines_logged(log, 1)
    check(
        line,
        {"decision_ms", "queue_ms", "connect_ms", "total_ms"},
        request_id="gone-before-head",
        route="origin",
        upstream="origin",
        status=499,
        bytes_out=0,
        ending="client_gone",
    )


@pytest_twisted.ensureDeferred
async def test_truncated_upstream_body_is_logged_upstream_truncated(origin, gateway_for, tmp_path):
    """An upstream body cut short is logged "upstream_truncated", with the upstream's status."""
    log = tmp_path / "access.log"
    n = 100_000
    gateway = gateway_for(logged_config(origin.url, log))
    client = await exchange(gateway, get(b"/truncate/%d" % n, close=False))
    (line,) = await lines_logged(log, 1)
    check(
        line,
        set(DURATIONS),
        request_id=request_id(client),
        route="origin",
        upstream="origin",
        status=200,
        ending="upstream_truncated",
    )
    assert 0 < line["bytes_out"] <= n


@pytest_twisted.ensureDeferred
async def test_upstream_idle_timeout_is_logged_with_its_name(origin, gateway_for, tmp_path):
    """A stream cut by the upstream idle timeout is logged with the timeout's name as its ending."""
    log = tmp_path / "access.log"
    gateway = gateway_for(logged_config(origin.url, log, timeouts={"upstream_idle": 0.2}))
    client = await exchange(gateway, get(b"/stall-body/1000", close=False))
    (line,) = await lines_logged(log, 1)
    check(
        line,
        set(DURATIONS),
        request_id=request_id(client),
        route="origin",
        upstream="origin",
        status=200,
        bytes_out=1000,
        ending="upstream_idle",
    )


@pytest_twisted.ensureDeferred
async def test_drain_timeout_cut_is_logged_drain_timeout(origin, gateway_for, tmp_path):
    """A download still running when the drain times out is logged "drain_timeout", with the upstream's status."""
    log = tmp_path / "access.log"
    size = 256 * MiB
    gateway = gateway_for(logged_config(origin.url, log))
    client = await connect(gateway.port, keep_all=False)
    client.send(get(b"/bytes/%d" % size))
    await within(client.received_at_least(64 * 1024))
    given = parse_responses(bytes(client.head))[0].header(b"x-request-id").decode()
    client.pause()
    factory = gateway.service.factory
    drained = factory.drain()
    assert not drained.called
    assert factory.cut_all("drain_timeout") == 1
    await within(drained)
    (line,) = await lines_logged(log, 1)
    check(line, set(DURATIONS), request_id=given, route="origin", status=200, ending="drain_timeout")
    assert 0 < line["bytes_out"] < size
    client.resume()  # a paused socket only notices it was cut once it reads
    await within(client.closed)


@pytest_twisted.ensureDeferred
async def test_the_stop_logs_what_it_cuts_at_the_drain_timeout(origin, gateway_for, tmp_path):
    """A stream still running when the stop's drain timeout passes is logged "drain_timeout" by the stop itself
    (before it closes the access log), and the stop ends."""
    log = tmp_path / "access.log"
    gateway = gateway_for(logged_config(origin.url, log, server={"drain_timeout": 0.2}))
    client = await connect(gateway.port, keep_all=False)
    client.send(get(b"/bytes/%d" % (256 * MiB)))
    await within(client.received_at_least(64 * 1024))
    client.pause()
    await within(gateway.service.stopService())
    (line,) = log_lines(log)
    assert (line["status"], line["ending"]) == (200, "drain_timeout")
    client.resume()
    await within(client.closed)


# === refused by the channel ===========================================================================================


@pytest_twisted.ensureDeferred
async def test_headers_too_large_is_logged_refused_431(origin, gateway_for, tmp_path):
    """A head whose header fields are over the limit is logged "refused" 431, under the id the client got back,
    with the method and path of its request line, and no route, upstream or time but the total."""
    log = tmp_path / "access.log"
    gateway = gateway_for(logged_config(origin.url, log, limits={"max_header_bytes": 1024}))
    client = await exchange(
        gateway,
        b"GET /too-many-headers HTTP/1.1\r\nHost: example.test\r\n%s\r\nX-Filler: %s\r\n\r\n" % (UA, b"f" * 2000),
    )
    assert parse_responses(bytes(client.head))[0].status == 431
    (line,) = await lines_logged(log, 1)
    check(
        line,
        {"total_ms"},
        request_id=request_id(client),
        method="GET",
        path="/too-many-headers",
        route=None,
        upstream=None,
        consumer=None,
        status=431,
        bytes_in=0,
        bytes_out=0,
        ending="refused",
    )
    assert origin.accepted == 0


@pytest_twisted.ensureDeferred
async def test_request_line_too_long_is_logged_refused_414(origin, gateway_for, tmp_path):
    """A request line over max_request_line_bytes, which never becomes a request, is still logged: "refused"
    414 from the channel, under the id the client got back, with method, path and every time null."""
    log = tmp_path / "access.log"
    gateway = gateway_for(logged_config(origin.url, log, limits={"max_request_line_bytes": 1024}))
    client = await exchange(gateway, b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: example.test\r\n\r\n")
    assert parse_responses(bytes(client.head))[0].status == 414
    (line,) = await lines_logged(log, 1)
    check(
        line,
        set(),
        request_id=request_id(client),
        method=None,
        path=None,
        route=None,
        upstream=None,
        consumer=None,
        status=414,
        bytes_in=0,
        bytes_out=0,
        ending="refused",
        user_agent=None,
    )
    assert origin.accepted == 0


# === secrets ==========================================================================================================


@pytest_twisted.ensureDeferred
async def test_no_credential_or_cookie_reaches_the_log(origin, gateway_for, tmp_path):
    """Neither an API key (valid or not), an Authorization value, a Cookie value nor a query token (by default)
    appears anywhere in the access log, whatever the request's ending."""
    log = tmp_path / "access.log"
    wrong_key = "gwk_wrong-key-never-logged-9876543210"
    bearer = "bearer-token-never-logged-24680"
    cookie = "cookie-value-never-logged-13579"
    gateway = gateway_for(protected(origin.url, log))
    requests = [
        get(b"/headers", b"X-API-Key: " + KEY.encode(), b"Cookie: session=" + cookie.encode()),
        get(b"/headers?api_key=" + KEY.encode(), b"X-API-Key: " + KEY.encode()),
        get(b"/headers", b"X-API-Key: " + wrong_key.encode(), b"Cookie: session=" + cookie.encode()),
        get(b"/headers", b"Authorization: Bearer " + bearer.encode()),
        get(b"/headers", b"Authorization: Bearer " + KEY.encode(), b"Cookie: " + cookie.encode()),
    ]
    for request in requests:
        await exchange(gateway, request)
    lines = await lines_logged(log, len(requests))
    assert [line["status"] for line in lines] == [200, 200, 401, 401, 200]
    text = log.read_text()
    for secret in (KEY, wrong_key, bearer, cookie, "Bearer", "session="):
        assert secret not in text, f"{secret!r} is in the access log"


# === AccessLog itself =================================================================================================


def _record(n: int) -> dict[str, Any]:
    return {"request_id": f"req-{n}", "status": 200, "padding": "x" * 1000}


def test_reopen_after_rename_writes_to_a_new_file_losing_nothing(tmp_path):
    """After logrotate renames the file, lines go on to the renamed file until `reopen`, then to a new file at
    the path; every line is whole and none is lost or written twice."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    try:
        for n in range(3):
            log.record(_record(n))
        path.rename(tmp_path / "access.log.1")
        for n in range(3, 5):
            log.record(_record(n))  # still the open file, now renamed
        assert not path.exists()
        log.reopen()
        for n in range(5, 8):
            log.record(_record(n))
    finally:
        log.close()
    rotated, current = log_lines(tmp_path / "access.log.1"), log_lines(path)
    assert [line["request_id"] for line in rotated] == [f"req-{n}" for n in range(5)]
    assert [line["request_id"] for line in current] == [f"req-{n}" for n in range(5, 8)]
    assert all(list(line) == ["time", "request_id", "status", "padding"] for line in rotated + current)


def test_a_failed_configure_changes_nothing(tmp_path):
    """`configure` to a path that cannot be opened raises and changes nothing, not even whether queries are
    logged (a refused reload must not start logging tokens)."""
    log = AccessLog(str(tmp_path / "a.log"), include_query=False)
    with pytest.raises(OSError):
        log.configure(str(tmp_path), include_query=True)  # a directory
    assert (log.path, log.include_query) == (str(tmp_path / "a.log"), False)
    log.close()


def test_empty_path_writes_nothing(tmp_path):
    """`configure(path="")` turns the log off: nothing more is written, and the log says it is disabled."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    try:
        log.record(_record(1))
        log.configure("", include_query=False)
        assert not log.enabled
        log.record(_record(2))
    finally:
        log.close()
    assert [line["request_id"] for line in log_lines(path)] == ["req-1"]
    off = AccessLog("")
    off.record(_record(3))
    assert not off.enabled and sorted(p.name for p in tmp_path.iterdir()) == ["access.log"]


def test_unopenable_path_raises_and_keeps_the_old_file(tmp_path):
    """`configure` to a path that cannot be opened raises OSError and leaves the log writing to its old file."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    try:
        log.record(_record(1))
        with pytest.raises(OSError):
            log.configure(str(tmp_path / "no-such-dir" / "access.log"), include_query=False)
        assert log.path == str(path) and log.enabled
        log.record(_record(2))
    finally:
        log.close()
    assert [line["request_id"] for line in log_lines(path)] == ["req-1", "req-2"]


def test_stdout_path_writes_lines_to_the_process_stdout(capfd):
    """With path "-" each line goes to the process's stdout, whole."""
    log = AccessLog("-")
    log.record(_record(1))
    log.close()
    out = capfd.readouterr().out
    assert [json.loads(line)["request_id"] for line in out.splitlines()] == ["req-1"]


def test_access_lines_stay_off_the_service_log(tmp_path):
    """An access line goes to its own publisher only: the global log observers never see it."""
    log = AccessLog(str(tmp_path / "access.log"))
    try:
        with captured(in_namespace(ACCESS_NAMESPACE)) as seen, captured(lambda e: "access" in e) as any_access:
            log.record(_record(1))
    finally:
        log.close()
    assert seen == [] and any_access == []
    assert len(log_lines(tmp_path / "access.log")) == 1


# === JsonLinesObserver ================================================================================================


def test_json_lines_observer_writes_one_object_per_event():
    """Every event is one JSON line with its time, level, namespace and formatted message."""
    out = io.StringIO()
    logger = Logger(namespace="gateway.test", observer=JsonLinesObserver(out))
    logger.info("listening on {port}", port=8080)
    logger.warn("second {what}", what="event")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first == {
        "time": first["time"],
        "level": "info",
        "namespace": "gateway.test",
        "message": "listening on 8080",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert (second["level"], second["message"]) == ("warn", "second event")


def test_json_lines_observer_adds_the_traceback_of_a_logged_failure():
    """A logged failure's line carries its traceback, and stays one line."""
    out = io.StringIO()
    logger = Logger(namespace="gateway.test", observer=JsonLinesObserver(out))
    try:
        raise ValueError("broken on purpose")
    except ValueError:
        logger.failure("it failed (request {request_id})", request_id="r-1")
    (line,) = out.getvalue().splitlines()
    event = json.loads(line)
    assert event["level"] == LogLevel.critical.name
    assert event["message"] == "it failed (request r-1)"
    assert "ValueError: broken on purpose" in event["traceback"]
    assert "Traceback" in event["traceback"]


def test_json_lines_observer_takes_captured_events():
    """Events captured from the global publisher (as twistd's observer gets them) are written the same way."""
    logger = Logger(namespace="gateway.test.captured")
    with captured(in_namespace("gateway.test.captured")) as seen:
        logger.error("bad {thing}", thing="news", log_failure=Failure(RuntimeError("boom")))
    out = io.StringIO()
    write = JsonLinesObserver(out)
    for event in seen:
        write(event)
    (line,) = (json.loads(text) for text in out.getvalue().splitlines())
    assert (line["level"], line["namespace"], line["message"]) == ("error", "gateway.test.captured", "bad news")
    assert "RuntimeError: boom" in line["traceback"]


def test_observer_factory_writes_to_the_real_stdout():
    """`observer()` (for `twistd --logger`) is a JSON-lines log observer on the process's real stdout."""
    made = observer()
    assert ILogObserver.providedBy(made) and isinstance(made, JsonLinesObserver)
    assert made._out is sys.__stdout__


def test_lines_are_written_together_after_the_flush_interval(tmp_path: Path) -> None:
    """With a clock, lines wait in the log's buffer and are written FLUSH_INTERVAL after the first of them (one
    write for the lines of many requests), at once past FLUSH_BYTES, and by `close`; whole lines only."""
    from twisted.internet.task import Clock

    from gateway.logs import FLUSH_BYTES, FLUSH_INTERVAL

    clock = Clock()
    path = tmp_path / "access.log"
    log = AccessLog(str(path), clock=clock)
    log.record({"request_id": "a"})
    log.record({"request_id": "b"})
    clock.advance(FLUSH_INTERVAL / 2)
    assert path.read_text() == ""  # in the buffer, not yet written
    clock.advance(FLUSH_INTERVAL / 2)
    assert [json.loads(line)["request_id"] for line in path.read_text().splitlines()] == ["a", "b"]
    big = "x" * 1000
    for i in range(FLUSH_BYTES // 1000 + 1):
        log.record({"request_id": str(i), "user_agent": big})
    assert len(path.read_bytes()) >= FLUSH_BYTES  # written at once, before the interval
    assert all(json.loads(line) for line in path.read_text().splitlines())
    log.record({"request_id": "c"})
    log.close()
    assert json.loads(path.read_text().splitlines()[-1])["request_id"] == "c"
    assert not clock.getDelayedCalls()


def test_lines_are_written_in_whole_line_pieces_of_at_most_pipe_buf(tmp_path: Path, monkeypatch: Any) -> None:
    """Each write holds whole lines and at most PIPE_BUF bytes (one line longer than that alone): atomic on a
    pipe shared by worker processes, so their lines never interleave."""
    import os
    import select

    from gateway import logs

    writes: list[bytes] = []
    real_write = os.write

    def recording(fd: int, data: Any) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(logs.os, "write", recording)
    log = AccessLog(str(tmp_path / "access.log"), clock=None)
    log._clock = object()  # buffer without a timer: flushed by hand below
    log._flush_call = object()  # type: ignore[assignment]
    for i in range(50):
        log.record({"request_id": str(i), "user_agent": "y" * 200})
    log.record({"request_id": "long", "user_agent": "z" * (2 * select.PIPE_BUF)})
    log._flush_call = None
    log.flush()
    assert len(writes) > 1
    for data in writes:
        assert data.endswith(b"\n")
        assert len(data) <= select.PIPE_BUF or data.count(b"\n") == 1
    assert b"".join(writes).count(b"\n") == 51
    log.close()
