"""What an operator sees of an upstream of several servers, over loopback: the access log's server and attempts,
the per-server series on /metrics, the admin listener's /upstreams JSON, and one log line per state change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.support.clients import connect, parse_response, within
from tests.support.faults import get
from tests.support.origin import Origin
from tests.support.running import RunningGateway, gateway_config
from tests.support.scrape import admin_get, admin_port, lines_logged, scrape


@pytest.fixture
def origin_pair(origins: list[Origin]) -> list[Origin]:
    return origins[:2]


def config(urls: list[str], log: Path | None = None, **upstream: Any) -> dict[str, Any]:
    data = gateway_config(
        urls[0],
        admin={"host": "127.0.0.1", "port": 0},
        access_log={"path": str(log) if log is not None else ""},
        upstream=upstream,
    )
    del data["upstreams"]["origin"]["url"]
    data["upstreams"]["origin"]["servers"] = [{"url": url} for url in urls]
    return data


async def fetch(gateway: RunningGateway, path: bytes = b"/status/200") -> int:
    client = await connect(gateway.port, keep_all=True)
    client.send(get(path))
    await within(client.closed)
    return parse_response(bytes(client.head)).status


@pytest_twisted.ensureDeferred
async def test_the_access_log_names_the_server_that_answered_and_the_attempts(
    origin_pair, refused_url, gateway_for, tmp_path
):
    """A request tried first on a refusing server, then on an answering one: its line names the second and two
    attempts; the next request, straight to the answering server, one."""
    log = tmp_path / "access.log"
    gateway = gateway_for(config([refused_url, origin_pair[0].url], log))
    assert await fetch(gateway) == 200
    assert await fetch(gateway) == 200
    first, second = await lines_logged(log, 2)
    answering = origin_pair[0].url.removeprefix("http://")
    assert (first["upstream_addr"], first["attempts"]) == (answering, 2)
    assert (second["upstream_addr"], second["attempts"]) == (answering, 1)


@pytest_twisted.ensureDeferred
async def test_metrics_and_the_admin_view_show_each_server(origin_pair, refused_url, gateway_for):
    gateway = gateway_for(config([refused_url, *[o.url for o in origin_pair]], ejection={"consecutive_failures": 1}))
    for _ in range(4):
        assert await fetch(gateway) == 200
    refused = refused_url.removeprefix("http://")
    port = admin_port(gateway)
    s = await scrape(port)
    assert s.value("gateway_upstream_server_state", upstream="origin", server=refused, state="ejected") == 1
    assert s.value("gateway_upstream_server_state", upstream="origin", server=refused, state="up") == 0
    assert s.count("gateway_upstream_server_ejections_total", upstream="origin", server=refused) == 1
    assert s.count("gateway_upstream_server_failures_total", upstream="origin", server=refused) == 1
    assert s.count("gateway_upstream_retries_total", upstream="origin") == 1
    answered = sum(
        s.count("gateway_upstream_server_requests_total", upstream="origin", server=o.url.removeprefix("http://"))
        for o in origin_pair
    )
    assert answered == 4
    assert s.count("gateway_upstream_response_seconds_count", upstream="origin") == 4

    response = await admin_get(port, b"/upstreams")
    assert response.status == 200 and response.header(b"content-type") == b"application/json"
    view = json.loads(response.body)["origin"]
    assert (view["balance"], view["retries"], view["ejected"]) == ("round_robin", 1, 1)
    states = {server["address"]: server["state"] for server in view["servers"]}
    assert states[refused] == "ejected"
    assert [states[o.url.removeprefix("http://")] for o in origin_pair] == ["up", "up"]
