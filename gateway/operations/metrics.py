"""Prometheus metrics of one gateway process, on a registry of its own (served by the admin listener), and how
each family adds up over the worker processes (`merge_kind`; `gateway.operations.fleet` does the adding).

Rules:
* Counters and histograms move once per request, from its access-log record, when it ends (and once per failed
  TLS handshake or refused PROXY connection); what is true *now* (streams in flight, paused by backpressure,
  bytes held, pool connections) is read from the live objects when a scrape comes, so the data path pays nothing
  for it.
* Labels are bounded: route and upstream names and listener addresses from the config, status codes, endings,
  denial reasons and handshake-failure classes from the gateway's own short lists; never a path, a client
  address or a consumer.
* Over workers, counters and histograms are summed; a gauge is summed only where the sum is the gateway's own
  number (connections, requests, streams, bytes held, upstream slots: listed in `SUMMED_GAUGES`); every other
  gauge (a flag, a version, a certificate's expiry) and the process metrics (prometheus_client's
  `ProcessCollector`: RSS, open fds, CPU seconds, start time) are given per process, under a `worker` label.
  A gauge added later is per process until it is listed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final, Literal, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway.operations.about import versions
from gateway.operations.upstream_series import PoolState, ServerState, server_families

__all__ = [
    "SUMMED_GAUGES",
    "CertificateState",
    "LimitStoreState",
    "Live",
    "Metrics",
    "PoolState",
    "ServerState",
    "merge_kind",
]


_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_DURATION_BUCKETS = (*_LATENCY_BUCKETS, 300.0, 1800.0, 3600.0)
"""Total durations run to the hour: a report download or an event stream is one request."""
_STATUS_TEXT: Final = {code: str(code) for code in range(100, 600)}
"""Each status code as the requests counter labels it, made once rather than per request."""


class CertificateState(NamedTuple):
    owner: str
    """What uses it: "listener HOST:PORT" or "upstream NAME" (a client certificate shown to it)."""
    certificate: str
    """The certificate's file."""
    names: str
    """Its DNS names, comma-separated."""
    not_after: float
    """Its expiry, in seconds since the epoch."""
    chain_verified: bool
    """Whether its chain verified when it was loaded: complete, every certificate valid, ending at the system's
    roots or a configured CA file."""


class LimitStoreState(NamedTuple):
    """The shared limit store (Redis) of this process: its checks' latency, errors and fallbacks so far."""

    bounds: Sequence[float]
    latency_counts: Sequence[int]
    """Checks answered, by latency bucket (`bounds`, then +Inf); not cumulative."""
    latency_sum: float
    errors: Mapping[str, int]
    """Checks Redis did not answer, by kind: timeout, unavailable (no connection), error, connection."""
    fallbacks: Mapping[str, int]
    """Checks decided without Redis, by the route's choice: open (counted in this process), closed (503)."""
    circuit_open: bool


class Live(NamedTuple):
    """What is going on in the process at the moment of a scrape."""

    connections: int
    requests: Mapping[str, int]
    """Requests not yet ended, by phase ("admitting", "waiting", "streaming", ...)."""
    paused_responses: int
    """Response bodies whose upstream socket is paused because the client reads slowly."""
    paused_uploads: int
    """Request bodies whose client socket is paused because the upstream reads slowly."""
    buffered_upload_bytes: int
    """Request-body bytes held for slow upstreams."""
    buffered_response_bytes: int
    """Response bytes waiting in client connections' send buffers."""
    pools: Sequence[PoolState]
    draining: bool
    certificates: Sequence[CertificateState] = ()
    """Every certificate loaded now (a reload replaces them)."""
    limit_store: LimitStoreState | None = None
    """None: limits are counted in this process (`[limits.store]` is local)."""


SUMMED_GAUGES: Final = frozenset(
    {
        "gateway_client_connections",
        "gateway_requests_in_flight",
        "gateway_streams_paused",
        "gateway_buffered_bytes",
        "gateway_upstream_requests_in_flight",
        "gateway_upstream_queue_length",
        "gateway_upstream_idle_connections",
        "gateway_upstream_server_requests_in_flight",
    }
)
"""The gauges whose sum over the workers is the gateway's own number; the others are given per worker."""


def merge_kind(family: Metric) -> Literal["count", "sum", "each"]:
    """How `family` adds up over the worker processes: "count" (summed, and kept once a worker has gone, so that
    no total ever goes down), "sum" (summed over the processes that answer) or "each" (one series per process,
    labelled with its worker)."""
    if family.name.startswith("process_"):
        return "each"
    if family.type in ("counter", "histogram", "summary"):
        return "count"
    return "sum" if family.name in SUMMED_GAUGES else "each"


class _LiveCollector(Collector):
    def __init__(self, read: Callable[[], Live]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        live = self._read()
        yield GaugeMetricFamily("gateway_client_connections", "Client connections open.", live.connections)
        phases = GaugeMetricFamily("gateway_requests_in_flight", "Requests not yet ended, by phase.", labels=["phase"])
        for phase, count in sorted(live.requests.items()):
            phases.add_metric([phase], count)
        yield phases
        paused = GaugeMetricFamily(
            "gateway_streams_paused",
            "Streams paused by backpressure: direction=response is an upstream paused for a slow client, "
            "direction=request a client paused for a slow upstream.",
            labels=["direction"],
        )
        paused.add_metric(["response"], live.paused_responses)
        paused.add_metric(["request"], live.paused_uploads)
        yield paused
        buffered = GaugeMetricFamily(
            "gateway_buffered_bytes",
            "Body bytes held in the gateway: request bodies waiting for upstreams, responses in client send "
            "buffers. Bounded by the flow-control marks, whatever the body sizes.",
            labels=["direction"],
        )
        buffered.add_metric(["request"], live.buffered_upload_bytes)
        buffered.add_metric(["response"], live.buffered_response_bytes)
        yield buffered
        in_flight = GaugeMetricFamily(
            "gateway_upstream_requests_in_flight", "Requests holding an upstream slot.", labels=["upstream"]
        )
        queued = GaugeMetricFamily(
            "gateway_upstream_queue_length", "Requests waiting for an upstream slot.", labels=["upstream"]
        )
        idle = GaugeMetricFamily(
            "gateway_upstream_idle_connections", "Idle keep-alive connections to an upstream.", labels=["upstream"]
        )
        for pool in live.pools:
            in_flight.add_metric([pool.upstream], pool.in_flight)
            queued.add_metric([pool.upstream], pool.queued)
            idle.add_metric([pool.upstream], pool.idle)
        yield in_flight
        yield queued
        yield idle
        yield from server_families(live.pools)
        yield GaugeMetricFamily("gateway_draining", "1 while the process drains before it stops.", int(live.draining))
        expiry = GaugeMetricFamily(
            "gateway_tls_certificate_expiry_timestamp_seconds",
            "When each loaded certificate expires (seconds since the epoch); alert on it minus time().",
            labels=["owner", "certificate", "names"],
        )
        verified = GaugeMetricFamily(
            "gateway_tls_certificate_chain_verified",
            "1 when each loaded certificate's chain verified when it was loaded (complete, every certificate valid, "
            "ending at the system's roots or a configured CA file); 0 when it is used as given, with a warning.",
            labels=["owner", "certificate", "names"],
        )
        for state in live.certificates:
            expiry.add_metric([state.owner, state.certificate, state.names], state.not_after)
            verified.add_metric([state.owner, state.certificate, state.names], int(state.chain_verified))
        yield expiry
        yield verified
        if live.limit_store is not None:
            yield from _limit_store_families(live.limit_store)


def _limit_store_families(state: LimitStoreState) -> Iterator[Metric]:
    latency = HistogramMetricFamily(
        "gateway_limit_store_seconds", "Round trips of limit checks to the shared store (Redis) that it answered."
    )
    buckets: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip((*state.bounds, math.inf), state.latency_counts, strict=True):
        total += count
        buckets.append((floatToGoString(bound), total))
    latency.add_metric([], buckets, sum_value=state.latency_sum)
    yield latency
    errors = CounterMetricFamily(
        "gateway_limit_store_errors",
        "Limit checks the shared store (Redis) did not answer, by kind (timeout, unavailable, error, connection).",
        labels=["kind"],
    )
    for kind, count in sorted(state.errors.items()):
        errors.add_metric([kind], count)
    yield errors
    fallbacks = CounterMetricFamily(
        "gateway_limit_store_fallbacks",
        "Limit checks decided without the shared store, by the route's choice: open (counted in this process), "
        "closed (503).",
        labels=["mode"],
    )
    for mode, count in sorted(state.fallbacks.items()):
        fallbacks.add_metric([mode], count)
    yield fallbacks
    yield GaugeMetricFamily(
        "gateway_limit_store_circuit_open",
        "1 while the circuit to the shared store is open (Redis is not asked).",
        int(state.circuit_open),
    )


def _bucket(bounds: tuple[float, ...], value: float) -> int:
    """The bucket of `value`: the first bound it is not over (`bisect.bisect_left`), found by a scan that compiles
    to a native loop over a score of bounds, where `bisect_left` is a generic call and a Python comparison per step;
    most values are small, and found in the first few."""
    for index, bound in enumerate(bounds):
        if value <= bound:
            return index
    return len(bounds)


class _Histogram:
    """One histogram's buckets and sum, as plain numbers: counted on the reactor thread, read at a scrape."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            out.append((floatToGoString(bound), total))
        return out


class _Histograms:
    def __init__(self, name: str, documentation: str, label: str, bounds: tuple[float, ...]) -> None:
        self.name, self.documentation, self.label, self.bounds = name, documentation, label, bounds
        self.by_label: dict[str, _Histogram] = {}

    def observe(self, label: str, value: float) -> None:
        """One observation in `label`'s histogram (made at its first): one call, as it is made four times a
        request."""
        histogram = self.by_label.get(label)
        if histogram is None:
            histogram = self.by_label[label] = _Histogram(self.bounds)
        histogram.counts[_bucket(self.bounds, value)] += 1
        histogram.sum += value

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, histogram in sorted(self.by_label.items()):
            family.add_metric([value], histogram.buckets(), sum_value=histogram.sum)
        return family


class _RequestCollector(Collector):
    """The per-request series, kept by `Metrics` as plain dicts and numbers (no lock, no object per sample:
    prometheus_client's own Counter and Histogram cost some 20 us per request between them) and turned into
    metric families when a scrape comes."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        requests = CounterMetricFamily(
            "gateway_requests",
            "Requests ended, by route, status and how they ended.",
            labels=["route", "status", "ending"],
        )
        for labels, count in sorted(m.requests.items()):
            requests.add_metric(list(labels), count)
        yield requests
        yield m.ttfb.family()
        yield m.duration.family()
        yield m.queue_wait.family()
        yield m.upstream_ttfb.family()
        for name, documentation, counts in (
            ("gateway_request_body_bytes", "Request-body bytes read from clients.", m.bytes_in),
            ("gateway_response_body_bytes", "Response-body bytes written to clients.", m.bytes_out),
        ):
            family = CounterMetricFamily(name, documentation, labels=["route"])
            for route, count in sorted(counts.items()):
                family.add_metric([route], count)
            yield family


class Metrics:
    """The process's metrics. `request_ended` takes a request's access-log record; `read_live` is called at
    every scrape."""

    def __init__(self, read_live: Callable[[], Live]) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests: dict[tuple[str, str, str], int] = {}
        self.bytes_in: dict[str, int] = {}
        self.bytes_out: dict[str, int] = {}
        self.ttfb = _Histograms(
            "gateway_time_to_first_byte_seconds",
            "From the start of the request head to the upstream's response head.",
            "route",
            _LATENCY_BUCKETS,
        )
        self.duration = _Histograms(
            "gateway_request_duration_seconds",
            "From the start of the request head to the request's end (the whole stream).",
            "route",
            _DURATION_BUCKETS,
        )
        self.upstream_ttfb = _Histograms(
            "gateway_upstream_response_seconds",
            "From the start of the request head to its upstream's response head, by upstream.",
            "upstream",
            _LATENCY_BUCKETS,
        )
        self.queue_wait = _Histograms(
            "gateway_upstream_queue_wait_seconds",
            "Time admitted requests waited for an upstream slot.",
            "upstream",
            _LATENCY_BUCKETS,
        )
        self._denials = Counter(
            "gateway_admission_denials",
            "Requests refused by admission, by route and reason.",
            ["route", "reason"],
            registry=registry,
        )
        self._handshake_failures = Counter(
            "gateway_tls_handshake_failures",
            "Client TLS handshakes that failed, by listener and reason class.",
            ["listener", "reason"],
            registry=registry,
        )
        self._proxy_refusals = Counter(
            "gateway_proxy_protocol_refused_connections",
            "Connections of a PROXY protocol listener closed unread: from a peer its proxy_protocol_from does not "
            "list (peer_not_allowed), or whose header claimed an address or port that is none (invalid_address).",
            ["listener", "reason"],
            registry=registry,
        )
        self._reloads = Counter("gateway_config_reloads", "Config reloads, by result.", ["result"], registry=registry)
        build = Gauge(
            "gateway_build_info",
            "Always 1: the gateway's version and those of Twisted, Python and OpenSSL, as labels.",
            list(versions()),
            registry=registry,
        )
        build.labels(**versions()).set(1)
        registry.register(_RequestCollector(self))
        registry.register(_LiveCollector(read_live))
        ProcessCollector(registry=registry)  # read from /proc at each scrape (none elsewhere)

    def request_ended(self, record: Mapping[str, Any]) -> None:
        """A request ended, told by its access-log record (durations in milliseconds)."""
        total, ttfb, queue = record["total_ms"], record["ttfb_ms"], record["queue_ms"]
        self.observe_request(
            record["route"] or "",
            record["upstream"] or "",
            record["status"],
            record["ending"],
            total=None if total is None else total / 1000.0,
            ttfb=None if ttfb is None else ttfb / 1000.0,
            queue=None if queue is None else queue / 1000.0,
            bytes_in=record["bytes_in"],
            bytes_out=record["bytes_out"],
        )

    def observe_request(
        self,
        route: str,
        upstream: str,
        status: int | None,
        ending: str,
        *,
        total: float | None,
        ttfb: float | None,
        queue: float | None,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        """A request ended (durations in seconds): what `request_ended` takes from a record, for a request whose
        record is not built (no access log)."""
        key = (route, "" if status is None else _STATUS_TEXT.get(status) or str(status), ending)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        if total is not None:
            self.duration.observe(route, total)
        if ttfb is not None:
            self.ttfb.observe(route, ttfb)
            self.upstream_ttfb.observe(upstream, ttfb)
        if queue is not None:
            self.queue_wait.observe(upstream, queue)
        if bytes_in:
            self.bytes_in[route] = self.bytes_in.get(route, 0) + bytes_in
        if bytes_out:
            self.bytes_out[route] = self.bytes_out.get(route, 0) + bytes_out

    def denied(self, route: str, reason: str) -> None:
        self._denials.labels(route, reason).inc()

    def handshake_failed(self, listener: str, reason: str) -> None:
        """A client's TLS handshake failed; `reason` is one of `gateway.tls.server.handshake_failure`'s classes."""
        self._handshake_failures.labels(listener, reason).inc()

    def proxy_refused(self, listener: str, reason: str) -> None:
        """A PROXY protocol listener closed a connection: "peer_not_allowed" or "invalid_address"."""
        self._proxy_refusals.labels(listener, reason).inc()

    def reloaded(self, result: str) -> None:
        """A reload ended: "applied" or "invalid"."""
        self._reloads.labels(result).inc()
