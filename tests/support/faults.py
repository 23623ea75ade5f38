"""Helpers of the loopback fault tests: exact requests, the problem answer check, and the check that a gateway's
upstream pools hold nothing but reusable, reading connections once every request has ended."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor, task

from tests.support.clients import RawClient, parse_responses
from tests.support.running import RunningGateway


def get(path: bytes, *headers: bytes, close: bool = True, method: bytes = b"GET") -> bytes:
    """A request head for `path` (with `Connection: close` unless `close` is false)."""
    lines = [b"%s %s HTTP/1.1" % (method, path), b"Host: example.test", *headers]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def assert_problem(client: RawClient, status: int) -> dict[str, Any]:
    """The client got exactly one response: a complete problem+json answer with `status`, whose request id is
    the one in its X-Request-ID header."""
    responses = parse_responses(bytes(client.head))
    assert [r.status for r in responses] == [status], bytes(client.head)[:500]
    (response,) = responses
    assert response.complete
    assert response.header(b"content-type") == b"application/problem+json"
    problem: dict[str, Any] = json.loads(response.body)
    assert problem["status"] == status
    assert response.header(b"x-request-id") == str(problem["request_id"]).encode()
    return problem


def _pool_problems(gateway: RunningGateway) -> list[str]:
    problems = []
    readers = set(reactor.getReaders())
    for name, pool in gateway.service.gateway.pools.items():
        if pool.in_flight or pool.queued:
            problems.append(f"{name}: {pool.in_flight} in flight, {pool.queued} queued")
        idle = pool.idle_connections()
        if any(set(server._idle_timers) != set(server.idle_connections()) for server in pool.servers):
            problems.append(f"{name}: idle timers do not match the idle connections")
        for connection in idle:
            transport = connection.transport
            if not connection.usable or not transport.connected or transport not in readers:
                problems.append(f"{name}: an idle connection is busy, not reading or closed")
    return problems


async def pools_settled(gateway: RunningGateway, seconds: float = 5.0) -> None:
    """Wait (bounded) until no request holds or waits for an upstream slot and every cached upstream connection
    is idle, open and reading (so a close from the upstream is noticed); fail with what is wrong otherwise.
    Slots are given back a reactor turn or two after the client saw its response end."""
    for _ in range(int(seconds / 0.01)):
        if not _pool_problems(gateway):
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    problems = _pool_problems(gateway)
    assert not problems, problems


def cached_connections(gateway: RunningGateway, name: str = "origin") -> list[Any]:
    """The live idle connections the pool of upstream `name` holds."""
    return [c for c in gateway.pool(name).idle_connections() if c.usable]
