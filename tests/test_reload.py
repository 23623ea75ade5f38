"""`GatewayService.reload` in this process, over real loopback sockets: the file is read and checked whole,
an invalid one (or one whose new listener cannot be bound) changes nothing, a valid one applies to new requests
while kept pools and rate-limit counts carry over. (Reload by SIGHUP of a real twistd, with a download in
flight, is in tests/e2e/test_signals.py.)"""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import formatEvent

from gateway.config import load
from gateway.operations.service import GatewayService
from tests.support.clients import connect, within
from tests.support.logs import captured, in_namespace
from tests.support.origin import Origin
from tests.support.processes import free_port
from tests.support.running import gateway_config


def toml(data: dict[str, Any]) -> str:
    """A small TOML writer for the test configs (tables, arrays of tables, strings, numbers, lists)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return str(v)

    lines: list[str] = []

    def table(prefix: str, body: dict[str, Any], array: bool = False) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict) and not _tables(v)}
        lines.append(f"[[{prefix}]]" if array else f"[{prefix}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in body.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}", v)
            elif _tables(v):
                for item in v:
                    table(f"{prefix}.{k}", item, array=True)

    for key, v in data.items():
        if isinstance(v, dict):
            if all(isinstance(x, dict) for x in v.values()) and v:
                for name, inner in v.items():
                    table(f"{key}.{name}", inner)
            else:
                table(key, v)
        elif _tables(v):
            for item in v:
                table(key, item, array=True)
        else:
            lines.insert(0, f"{key} = {value(v)}")
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # the writer's own check
    return text


def _tables(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def start(path: Path, data: dict[str, Any], services: list[GatewayService]) -> GatewayService:
    path.write_text(toml(data))
    service = GatewayService(load(path), reactor)
    service.startService()
    services.append(service)
    return service


def port_of(service: GatewayService, index: int = 0) -> int:
    port = service.listeners[index].port
    assert port is not None
    return port.getHost().port


async def status(port: int, target: str = "/status/200") -> int:
    client = await connect(port, keep_all=True)
    client.send(f"GET {target} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n".encode())
    await within(client.closed)
    return client.response().status


async def refused(port: int) -> None:
    """Connections to `port` are refused, once the port has closed (within a few reactor turns; bounded)."""
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except ConnectionRefusedError:
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"port {port} still accepts connections")


def base(origin: Origin, **sections: Any) -> dict[str, Any]:
    data = gateway_config(origin.url, access_log={"path": ""}, **sections)
    data["routes"][0]["path_prefix"] = "/status"
    return data


@pytest_twisted.ensureDeferred
async def test_a_valid_reload_adds_a_route_and_a_listener_and_keeps_unchanged_pools(
    origin: Origin, tmp_path: Path, running: list[GatewayService]
) -> None:
    """A route and a listener added by the file answer after the reload; the old listener still serves; the
    pool of the unchanged upstream is the same object (its connections stay warm)."""
    path = tmp_path / "gateway.toml"
    first = free_port()  # a fixed port: the new file must name the same listener (port 0 would be a new one)
    data = base(origin, listeners=[{"host": "127.0.0.1", "port": first}])
    service = start(path, data, running)
    assert await status(first, "/headers") == 404
    pool = service.gateway.pools["origin"]
    data["routes"].append({"name": "headers", "auth": "anonymous", "path_prefix": "/headers", "upstream": "origin"})
    added = free_port()
    data["listeners"] = [{"host": "127.0.0.1", "port": first}, {"host": "127.0.0.1", "port": added}]
    path.write_text(toml(data))
    old_gateway = service.gateway
    assert service.reload() is True
    assert service.gateway is not old_gateway
    assert service.gateway.pools["origin"] is pool
    assert [port_of(service, i) for i in range(2)] == [first, added]
    assert await status(first, "/headers") == 200
    assert await status(added, "/status/200") == 200
    assert service.metrics.registry.get_sample_value("gateway_config_reloads_total", {"result": "applied"}) == 1


@pytest_twisted.ensureDeferred
async def test_a_removed_listener_stops_accepting_and_a_changed_upstream_gets_a_new_pool(
    origin: Origin, tmp_path: Path, running: list[GatewayService]
) -> None:
    """A listener the new file leaves out stops accepting (connections refused); an upstream whose settings
    changed gets a new pool, and the old one is retired."""
    path = tmp_path / "gateway.toml"
    one, two = free_port(), free_port()
    data = base(origin, listeners=[{"host": "127.0.0.1", "port": one}, {"host": "127.0.0.1", "port": two}])
    service = start(path, data, running)
    assert await status(two) == 200
    old_pool = service.gateway.pools["origin"]
    data["listeners"] = [{"host": "127.0.0.1", "port": one}]
    data["upstreams"]["origin"]["max_connections"] = 7
    path.write_text(toml(data))
    assert service.reload() is True
    assert service.gateway.pools["origin"] is not old_pool
    assert service.gateway.pools["origin"].upstream.max_connections == 7
    assert old_pool in service._retired_pools
    await refused(two)
    assert await status(one) == 200


@pytest_twisted.ensureDeferred
async def test_a_reload_changes_who_may_send_a_proxy_header_on_a_bound_listener(
    origin: Origin, tmp_path: Path, running: list[GatewayService]
) -> None:
    """proxy_protocol_from applies to the connections that come after a reload, on the same bound socket: this
    test's peer (127.0.0.1) is refused while the file lists only 10.0.0.0/8, and served once it lists 127.0.0.1."""
    path = tmp_path / "gateway.toml"
    port = free_port()
    data = base(
        origin,
        listeners=[{"host": "127.0.0.1", "port": port, "proxy_protocol": True, "proxy_protocol_from": ["10.0.0.0/8"]}],
    )
    service = start(path, data, running)

    async def proxied_status() -> int | None:
        client = await connect(port, keep_all=True)
        client.send(b"PROXY TCP4 203.0.113.9 127.0.0.1 4000 80\r\n")
        client.send(b"GET /status/200 HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n")
        await within(client.closed)
        return client.response().status if client.head else None

    assert await proxied_status() is None
    data["listeners"][0]["proxy_protocol_from"] = ["10.0.0.0/8", "127.0.0.1"]
    path.write_text(toml(data))
    assert service.reload() is True
    assert port_of(service) == port
    assert await proxied_status() == 200


@pytest.mark.parametrize(
    "broken",
    [
        lambda text: text.replace('path_prefix = "/status"', 'path_prefix = "status"'),
        lambda text: text + "\n[server]\ndrain_timout = 1\n",
        lambda text: text + "\n[[routes\n",
    ],
    ids=["bad-value", "unknown-key", "not-toml"],
)
@pytest_twisted.ensureDeferred
async def test_an_invalid_reload_changes_nothing(
    origin: Origin, tmp_path: Path, running: list[GatewayService], broken: Any
) -> None:
    """An invalid file: reload answers False, the running Gateway, listeners and routes are the same, the
    failure is counted."""
    path = tmp_path / "gateway.toml"
    service = start(path, base(origin), running)
    gateway, listeners = service.gateway, list(service.listeners)
    path.write_text(broken(path.read_text()))
    assert service.reload() is False
    assert service.gateway is gateway and service.listeners == listeners
    assert await status(port_of(service)) == 200
    assert service.metrics.registry.get_sample_value("gateway_config_reloads_total", {"result": "invalid"}) == 1


@pytest_twisted.ensureDeferred
async def test_a_reload_refused_for_three_errors_logs_each_and_keeps_serving(
    origin: Origin, tmp_path: Path, running: list[GatewayService]
) -> None:
    """A file with three errors in three sections: reload answers False, logs one line per error (each with the
    file, the key and the reason, and which of the three it is), counts one invalid reload, and the running
    config goes on serving."""
    path = tmp_path / "gateway.toml"
    data = base(origin)
    service = start(path, data, running)
    gateway = service.gateway
    data["server"] = {"idle_timeout": "soon"}
    data["upstreams"]["origin"]["max_queue"] = 0
    data["routes"][0]["path_prefix"] = "status"
    path.write_text(toml(data))
    with captured(in_namespace("gateway.service")) as events:
        assert service.reload() is False
    assert [formatEvent(event) for event in events] == [
        f"Reload refused, the running config is unchanged (error 1 of 3): {path}: server.idle_timeout: must be "
        'seconds as a number or a string such as "250ms", "30s", "2m", got \'soon\'',
        f"Reload refused, the running config is unchanged (error 2 of 3): {path}: upstreams.origin.max_queue: "
        "must be a positive integer, got 0",
        f'Reload refused, the running config is unchanged (error 3 of 3): {path}: routes["origin"].path_prefix: '
        "must start with \"/\", got 'status'",
    ]
    assert service.gateway is gateway
    assert await status(port_of(service)) == 200
    assert service.metrics.registry.get_sample_value("gateway_config_reloads_total", {"result": "invalid"}) == 1


@pytest_twisted.ensureDeferred
async def test_a_reload_whose_new_listener_cannot_bind_changes_nothing(
    origin: Origin, tmp_path: Path, running: list[GatewayService]
) -> None:
    """Two new listeners, the second on a port that is taken: the reload fails whole, the first new one is
    closed again, and the old config still serves."""
    path = tmp_path / "gateway.toml"
    first = free_port()
    data = base(origin, listeners=[{"host": "127.0.0.1", "port": first}])
    service = start(path, data, running)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    free = free_port()
    try:
        data["listeners"] = [
            {"host": "127.0.0.1", "port": first},
            {"host": "127.0.0.1", "port": free},
            {"host": "127.0.0.1", "port": taken.getsockname()[1]},
        ]
        path.write_text(toml(data))
        gateway = service.gateway
        assert service.reload() is False
    finally:
        taken.close()
    assert service.gateway is gateway and len(service.listeners) == 1
    await refused(free)
    assert await status(first) == 200


@pytest_twisted.ensureDeferred
async def test_rate_limit_counts_carry_over_a_reload(
    origin: Origin, tmp_path: Path, running: list[GatewayService]
) -> None:
    """A client that used its one request a minute before the reload is still limited after it: the new
    gatekeeper counts in the old one's store."""
    path = tmp_path / "gateway.toml"
    service = start(path, base(origin, admission={"rate_limits": {"anonymous": {"rate": "1/m"}}}), running)
    port = port_of(service)
    assert await status(port) == 200
    assert await status(port) == 429
    old = service.gateway.gatekeeper
    assert service.reload() is True
    assert service.gateway.gatekeeper is not old
    assert service.gateway.gatekeeper.store is old.store
    assert await status(port) == 429


@pytest_twisted.ensureDeferred
async def test_a_reload_keeps_the_admission_methods_whose_settings_did_not_change(
    origin: Origin, tmp_path: Path, running: list[GatewayService]
) -> None:
    """A reload of a file whose [auth.*] tables did not change keeps their methods (a JWKS fetched stays, verified
    passwords stay verified); one whose settings changed is built anew. The old gatekeeper's close, once retired,
    leaves the kept methods alone."""
    path = tmp_path / "gateway.toml"
    jwt = {
        "type": "jwt",
        "issuer": "https://id.example.com/",
        "audiences": ["gateway"],
        "algorithms": ["RS256"],
        "jwks_url": "https://id.example.com/jwks",
    }
    data = base(origin, auth={"corp": jwt, "sso": {**jwt, "issuer": "https://sso.example.com/"}})
    data["routes"][0]["auth"] = ["corp", "sso"]
    service = start(path, data, running)
    old = service.gateway.gatekeeper
    corp, sso = old._methods.by_name["corp"], old._methods.by_name["sso"]
    data["auth"]["sso"]["leeway"] = "5s"
    path.write_text(toml(data))
    assert service.reload() is True
    new = service.gateway.gatekeeper
    assert new is not old
    assert new._methods.by_name["corp"] is corp
    assert new._methods.by_name["sso"] is not sso
    old.close()
    assert not corp.keys._closed


@pytest_twisted.ensureDeferred
async def test_a_reload_while_draining_is_ignored(
    origin: Origin, tmp_path: Path, running: list[GatewayService]
) -> None:
    """Once the stop has begun, a reload changes nothing."""
    path = tmp_path / "gateway.toml"
    service = start(path, base(origin), running)
    gateway = service.gateway
    stopping = service.stopService()
    assert service.reload() is False
    assert service.gateway is gateway
    await stopping


@pytest_twisted.ensureDeferred
async def test_a_listener_whose_backlog_changes_keeps_its_socket(
    origin: Origin, tmp_path: Path, running: list[GatewayService]
) -> None:
    """A listener whose address stays and whose backlog changes is kept as it is (its socket cannot be bound
    twice): the reload applies, with a warning, and the port never stops answering."""
    path = tmp_path / "gateway.toml"
    port = free_port()
    data = base(origin, listeners=[{"host": "127.0.0.1", "port": port}])
    service = start(path, data, running)
    before = service.listeners[0]
    data["listeners"] = [{"host": "127.0.0.1", "port": port, "backlog": 16}]
    path.write_text(toml(data))
    assert service.reload() is True
    assert service.listeners == [before]
    assert await status(port) == 200


@pytest_twisted.ensureDeferred
async def test_a_kept_alive_connection_reads_its_next_head_with_the_new_limits(
    origin: Origin, tmp_path: Path, running: list[GatewayService]
) -> None:
    """After a reload lowers max_header_bytes, the next request on a connection opened before it is held to the
    new limit (431), as a new connection's is."""
    path = tmp_path / "gateway.toml"
    data = base(origin)
    service = start(path, data, running)
    client = await connect(port_of(service), keep_all=True)
    big = b"X-Big: " + b"a" * 3000 + b"\r\n"
    client.send(b"GET /status/200 HTTP/1.1\r\nHost: gateway.test\r\n" + big + b"\r\n")
    await within(client.responses_received(1))
    data["limits"] = {"max_header_bytes": 1024}
    path.write_text(toml(data))
    assert service.reload() is True
    client.send(b"GET /status/200 HTTP/1.1\r\nHost: gateway.test\r\n" + big + b"\r\n")
    await within(client.closed)
    assert b"431" in bytes(client.head).split(b"\r\n\r\n", 1)[1]


@pytest_twisted.ensureDeferred
async def test_turning_proxy_protocol_on_for_a_bound_listener_refuses_the_reload(
    origin: Origin, tmp_path: Path, running: list[GatewayService]
) -> None:
    """What a connection's first bytes mean cannot change under a bound socket: the reload is refused (not half
    applied), and the listener goes on as it was."""
    path = tmp_path / "gateway.toml"
    port = free_port()
    data = base(origin, listeners=[{"host": "127.0.0.1", "port": port}])
    service = start(path, data, running)
    data["listeners"] = [{"host": "127.0.0.1", "port": port, "proxy_protocol": True}]
    path.write_text(toml(data))
    gateway = service.gateway
    assert service.reload() is False
    assert service.gateway is gateway
    assert await status(port) == 200
