"""The series of upstream pools and their servers, read from the live pools at each scrape (the data path pays
nothing): what each pool holds (`PoolState`, `ServerState`) and the families made of it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["SERVER_STATES", "PoolState", "ServerState", "server_families"]

SERVER_STATES = ("up", "ejected", "unhealthy")


class ServerState(NamedTuple):
    """One server of an upstream, for the per-server series."""

    address: str
    state: str
    """"up", "ejected" or "unhealthy"."""
    active: int
    requests: int
    failures: int
    ejections: int
    checks_passed: int = 0
    checks_failed: int = 0


class PoolState(NamedTuple):
    upstream: str
    in_flight: int
    """Requests holding one of its slots (each on a connection, or opening one)."""
    queued: int
    idle: int
    """Idle keep-alive connections kept for reuse."""
    retries: int = 0
    servers: Sequence[ServerState] = ()


def server_families(pools: Sequence[PoolState]) -> Iterator[Metric]:
    """The series of each upstream's servers, read from the pools at the scrape (the data path pays nothing)."""
    labels = ["upstream", "server"]
    state = GaugeMetricFamily(
        "gateway_upstream_server_state", "1 for the state each upstream server is in.", labels=[*labels, "state"]
    )
    active = GaugeMetricFamily(
        "gateway_upstream_server_requests_in_flight", "Requests given to an upstream server, not ended.", labels=labels
    )
    requests = CounterMetricFamily(
        "gateway_upstream_server_requests", "Tries sent to an upstream server.", labels=labels
    )
    failures = CounterMetricFamily(
        "gateway_upstream_server_failures",
        "Tries to an upstream server that failed (connect failure, reset, a status counted by ejection); counted "
        "for upstreams of several servers.",
        labels=labels,
    )
    ejections = CounterMetricFamily(
        "gateway_upstream_server_ejections", "Times an upstream server was ejected.", labels=labels
    )
    checks = CounterMetricFamily(
        "gateway_upstream_health_checks",
        "Active health checks of an upstream server, by result.",
        labels=[*labels, "result"],
    )
    retries = CounterMetricFamily(
        "gateway_upstream_retries", "Requests sent again to another server of the upstream.", labels=["upstream"]
    )
    for pool in pools:
        retries.add_metric([pool.upstream], pool.retries)
        for server in pool.servers:
            key = [pool.upstream, server.address]
            for name in SERVER_STATES:
                state.add_metric([*key, name], int(server.state == name))
            active.add_metric(key, server.active)
            requests.add_metric(key, server.requests)
            failures.add_metric(key, server.failures)
            ejections.add_metric(key, server.ejections)
            if server.checks_passed or server.checks_failed:
                checks.add_metric([*key, "passed"], server.checks_passed)
                checks.add_metric([*key, "failed"], server.checks_failed)
    yield from (state, active, requests, failures, ejections, checks, retries)
