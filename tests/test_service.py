"""`gateway.operations.service` on the global reactor: listeners bind on start (with SO_REUSEPORT when there are worker
processes), and stop closes ports and pooled connections."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol

from gateway.config import parse
from gateway.operations.listeners import ListenerService
from gateway.operations.runtime import make_gateway
from gateway.operations.service import GatewayService
from gateway.operations.workers import WorkerPool
from tests.support.clients import connect, within
from tests.support.origin import Origin
from tests.support.processes import free_port
from tests.support.running import gateway_config

GET_CLOSE = b"GET /status/200 HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"


def two_listeners(upstream_url: str) -> dict[str, Any]:
    return gateway_config(
        upstream_url,
        listeners=[{"host": "127.0.0.1", "port": 0}, {"host": "127.0.0.1", "port": 0, "backlog": 8}],
    )


def bound_port(listener: ListenerService) -> int:
    assert listener.port is not None
    return listener.port.getHost().port


async def fetch_status(port: int) -> int:
    """One request through the gateway listening on `port`; the response status."""
    client = await connect(port, keep_all=True)
    client.send(GET_CLOSE)
    await within(client.closed)
    return client.response().status


def when_lost(channel: Any) -> defer.Deferred[None]:
    """Fires when the origin-side `channel`'s connection closes."""
    lost: defer.Deferred[None] = defer.Deferred()
    connection_lost = channel.connectionLost

    def record(reason: Any) -> None:
        connection_lost(reason)
        if not lost.called:
            lost.callback(None)

    channel.connectionLost = record
    return lost


def test_start_binds_every_listener(origin: Origin, gateway_for: Any) -> None:
    """`startService` binds every configured listener, each port 0 becoming a distinct real port."""
    gateway = gateway_for(two_listeners(origin.url))
    ports = [bound_port(listener) for listener in gateway.service.listeners]
    assert len(ports) == 2
    assert all(port > 0 for port in ports)
    assert ports[0] != ports[1]
    assert [listener.port.getHost().host for listener in gateway.service.listeners] == ["127.0.0.1"] * 2


@pytest_twisted.ensureDeferred
async def test_second_listener_serves_requests(origin: Origin, gateway_for: Any) -> None:
    """A request to the second configured listener is proxied to the upstream like one to the first."""
    gateway = gateway_for(two_listeners(origin.url))
    assert await fetch_status(bound_port(gateway.service.listeners[1])) == 200
    assert [seen.uri for seen in origin.seen] == [b"/status/200"]


@pytest_twisted.ensureDeferred
async def test_stop_closes_the_listening_ports(origin: Origin) -> None:
    """After `stopService` has fired, a connect to any former listening port is refused."""
    service = GatewayService(parse(two_listeners(origin.url), source="test.toml"), reactor)
    service.startService()
    try:
        ports = [bound_port(listener) for listener in service.listeners]
        assert await fetch_status(ports[0]) == 200
    finally:
        await within(service.stopService())
    assert all(listener.port is None for listener in service.listeners)
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            await within(defer.ensureDeferred(connect(port)), 5)


@pytest_twisted.ensureDeferred
async def test_stop_closes_idle_pooled_upstream_connections(origin: Origin) -> None:
    """`stopService` closes the keep-alive connection left idle in the upstream pool (long before its idle timeout)."""
    config = gateway_config(origin.url, upstream={"idle_timeout": "1h"})
    service = GatewayService(parse(config, source="test.toml"), reactor)
    service.startService()
    stopped = False
    try:
        assert await fetch_status(bound_port(service.listeners[0])) == 200
        [channel] = origin.connections
        assert channel.transport.connected, "the upstream connection was not kept in the pool"
        lost = when_lost(channel)
        await within(service.stopService())
        stopped = True
        await within(lost, 5)
        assert not channel.transport.connected
    finally:
        if not stopped:
            await within(service.stopService())


@pytest_twisted.ensureDeferred
async def test_port_in_use_fails_start_naming_the_port(origin: Origin) -> None:
    """`startService` with a listener on a port already in use raises `CannotListenError` naming that port."""
    taken = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    port = taken.getHost().port
    config = gateway_config(origin.url, listeners=[{"host": "127.0.0.1", "port": port}])
    service = GatewayService(parse(config, source="test.toml"), reactor)
    try:
        with pytest.raises(CannotListenError) as failed:
            service.startService()
        assert failed.value.port == port
        assert f"127.0.0.1:{port}" in str(failed.value)
    finally:
        await within(service.stopService())
        await taken.stopListening()


def test_make_gateway_builds_one_pool_per_distinct_upstream() -> None:
    """`make_gateway` makes one pool per upstream some route uses, shared by routes naming the same upstream."""
    config = parse(
        {
            "listeners": [{"host": "127.0.0.1", "port": 0}],
            "upstreams": {
                "a": {"url": "http://127.0.0.1:1001"},
                "b": {"url": "http://127.0.0.1:1002"},
                "unused": {"url": "http://127.0.0.1:1003"},
            },
            "routes": [
                {"name": "a1", "auth": "anonymous", "path_prefix": "/a1", "upstream": "a"},
                {"name": "a2", "auth": "anonymous", "path_prefix": "/a2", "upstream": "a"},
                {"name": "b", "auth": "anonymous", "path_prefix": "/b", "upstream": "b"},
                {"name": "u1", "auth": "anonymous", "path_prefix": "/u1", "upstream": "http://127.0.0.1:1004"},
                {"name": "u2", "auth": "anonymous", "path_prefix": "/u2", "upstream": "http://127.0.0.1:1004"},
            ],
        },
        source="test.toml",
    )
    gateway = make_gateway(config, reactor)
    assert sorted(gateway.pools) == ["a", "b", "http://127.0.0.1:1004"]
    for name, pool in gateway.pools.items():
        assert pool.upstream is config.upstreams[name]
    assert len({id(pool) for pool in gateway.pools.values()}) == 3


# --- worker processes: SO_REUSEPORT and the pool ---------------------------------------------------------------


def reuse_port_of(listener: ListenerService) -> int:
    """The SO_REUSEPORT option of the listener's bound socket (0 when off)."""
    assert listener.port is not None
    return int(listener.port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))  # type: ignore[attr-defined]


def test_one_worker_binds_without_so_reuseport(origin: Origin, gateway_for: Any) -> None:
    """With the default `workers = 1` a listener's socket does not have SO_REUSEPORT (the port stays exclusive)."""
    gateway = gateway_for(gateway_config(origin.url))
    assert reuse_port_of(gateway.service.listeners[0]) == 0


def test_workers_bind_every_listener_with_so_reuseport(origin: Origin, gateway_for: Any) -> None:
    """With `workers = 2` every listener's socket is bound with SO_REUSEPORT, on its configured port."""
    ports = [free_port(), free_port()]
    gateway = gateway_for(
        gateway_config(
            origin.url, server={"workers": 2}, listeners=[{"host": "127.0.0.1", "port": port} for port in ports]
        )
    )
    assert [bound_port(listener) for listener in gateway.service.listeners] == ports
    assert all(reuse_port_of(listener) != 0 for listener in gateway.service.listeners)


def test_workers_bind_an_ipv6_listener_as_ipv6(origin: Origin, gateway_for: Any) -> None:
    """With `workers = 2` an IPv6 listener is bound as IPv6 on its address, with SO_REUSEPORT."""
    try:
        port = free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    gateway = gateway_for(gateway_config(origin.url, server={"workers": 2}, listeners=[{"host": "::1", "port": port}]))
    [listener] = gateway.service.listeners
    assert listener.port is not None
    assert (listener.port.getHost().type, listener.port.getHost().host, bound_port(listener)) == ("TCP", "::1", port)
    assert listener.port.socket.family == socket.AF_INET6  # type: ignore[attr-defined]
    assert reuse_port_of(listener) != 0


@pytest_twisted.ensureDeferred
async def test_two_services_with_workers_share_one_port(origin: Origin, gateway_for: Any) -> None:
    """Two `GatewayService`s with `workers = 2` in one process both bind the same port, and requests to it are
    served."""
    config = gateway_config(origin.url, server={"workers": 2}, listeners=[{"host": "127.0.0.1", "port": free_port()}])
    first, second = gateway_for(config), gateway_for(config)
    assert first.port == second.port
    assert first.service.listeners[0].port is not second.service.listeners[0].port
    for _ in range(3):
        assert await fetch_status(first.port) == 200


def test_workers_without_spawn_start_no_worker_pool(origin: Origin) -> None:
    """A `GatewayService` made without `spawn_workers` (a worker process, a test) has no pool, whatever the
    config's `workers`."""
    config = gateway_config(origin.url, server={"workers": 3}, listeners=[{"host": "127.0.0.1", "port": 8080}])
    service = GatewayService(parse(config, source="test.toml"), reactor)
    assert service.workers is None
    assert list(service) == service.listeners


def test_spawn_workers_with_one_worker_starts_no_pool(origin: Origin) -> None:
    """With `spawn_workers` but `workers = 1` there is no pool: the twistd process serves alone."""
    service = GatewayService(parse(gateway_config(origin.url), source="test.toml"), reactor, spawn_workers=True)
    assert service.workers is None


def test_spawn_workers_owns_a_pool_of_the_other_workers(origin: Origin) -> None:
    """With `spawn_workers` and `workers = 3`, the service owns a stopped pool of workers 1 and 2, added after the
    listeners, each running `gateway.operations.worker` on the config file's absolute path."""
    config = gateway_config(origin.url, server={"workers": 3}, listeners=[{"host": "127.0.0.1", "port": 8080}])
    service = GatewayService(parse(config, source="gateway.toml"), reactor, spawn_workers=True)
    pool = service.workers
    assert isinstance(pool, WorkerPool)
    assert list(service) == [*service.listeners, pool]
    assert not pool.running
    assert pool.count == 2
    assert list(pool.command(2)) == [
        sys.executable,
        "-m",
        "gateway.operations.worker",
        "--config",
        os.path.abspath("gateway.toml"),
        "--index",
        "2",
    ]


def test_only_the_twistd_process_has_an_admin_listener(origin: Origin) -> None:
    """With workers, twistd's admin listener answers for all of them (its `fleet` knows workers 1 and 2, and the
    pool connects each one's channel to it); a worker process has no admin listener of its own."""
    config = parse(
        gateway_config(
            origin.url,
            server={"workers": 3},
            listeners=[{"host": "127.0.0.1", "port": 8080}],
            admin={"host": "127.0.0.1", "port": 0},
        ),
        source="gateway.toml",
    )
    twistd = GatewayService(config, reactor, spawn_workers=True)
    assert twistd.admin is not None and twistd.fleet is not None
    assert twistd.fleet.unhealthy() == "worker 1 is not running"  # not started yet
    assert list(twistd) == [*twistd.listeners, twistd.admin, twistd.workers]
    worker = GatewayService(config, reactor, worker_index=1)
    assert worker.admin is None and worker.fleet is None
    alone = GatewayService(config, reactor)
    assert alone.admin is not None and alone.fleet is None
