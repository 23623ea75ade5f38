"""Fixtures shared by every test, and the check that no test leaves anything behind.

After each test: no pending DelayedCall on the global reactor and no socket that was not open before it (so no
listening port, client or pooled upstream connection), waited for a bounded while because closes land a
reactor turn or two later.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import ensureDeferred
from twisted.logger import LogEvent

from gateway.operations.service import GatewayService
from tests.support import clients
from tests.support.logs import captured
from tests.support.origin import Origin
from tests.support.redis import RedisServer
from tests.support.running import RunningGateway, start_gateway


def pytest_report_header() -> str:
    """Whether the run tests the request path compiled by mypyc (setup.py) or interpreted."""
    from gateway.operations.about import build

    return "gateway: request path compiled by mypyc" if build() == "compiled" else "gateway: interpreted"


def _sockets() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(f"{fd}:{target}")
    return found


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    before = _sockets()
    yield
    for client in clients.OPEN:
        if client.transport is not None and client.transport.connected:
            client.transport.abortConnection()
    clients.OPEN.clear()

    async def settle() -> None:
        for _ in range(300):
            if not reactor.getDelayedCalls() and _sockets() <= before:
                return
            await task.deferLater(reactor, 0.01, lambda: None)

    pytest_twisted.blockon(ensureDeferred(settle()))
    leaked_calls = reactor.getDelayedCalls()
    assert not leaked_calls, f"pending DelayedCalls left behind: {leaked_calls}"
    leaked_sockets = _sockets() - before
    assert not leaked_sockets, f"sockets left open: {leaked_sockets}"


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, no persistence; stopped by PID after the test."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def failures() -> Iterator[list[LogEvent]]:
    """Failures logged during the test (the gateway logs unexpected ones with `log.failure`)."""
    with captured(lambda event: "log_failure" in event) as seen:
        yield seen


@pytest_twisted.async_yield_fixture()
async def origin() -> AsyncIterator[Origin]:
    started = Origin().start()
    yield started
    await started.stop()


@pytest_twisted.async_yield_fixture()
async def origins() -> AsyncIterator[list[Origin]]:
    """Three origins on loopback (the servers of an upstream of several), stopped after the test."""
    started = [Origin().start() for _ in range(3)]
    yield started
    for origin in started:
        await origin.stop()


@pytest.fixture
def refused_url() -> str:
    """A loopback URL whose port was just bound and closed again: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def gateway_for() -> Iterator[Callable[[dict[str, Any]], RunningGateway]]:
    """Start a gateway from a config dict (see `tests.support.running.gateway_config`); stopped after the test."""
    running: list[RunningGateway] = []

    def start(data: dict[str, Any]) -> RunningGateway:
        gateway = start_gateway(data)
        running.append(gateway)
        return gateway

    yield start
    for gateway in running:
        # What a test left open is cut first: the stop would otherwise drain it for server.drain_timeout.
        gateway.service.factory.cut_all("test_teardown")
        pytest_twisted.blockon(gateway.service.stopService())


@pytest.fixture
def running() -> Iterator[list[GatewayService]]:
    """Services a test starts itself (in this process) and appends here; each is cut and stopped after it."""
    services: list[GatewayService] = []
    yield services
    for service in services:
        if service.running:
            service.factory.cut_all("test_teardown")
            pytest_twisted.blockon(service.stopService())
