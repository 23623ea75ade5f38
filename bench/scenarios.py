"""The scenarios S1..S8: what each does through a started peer, and the metrics it yields.

A scenario gets a peer already started and warmed up (one small request), and returns its metrics. A metric
that was not reached within its cap (S6's first byte, S7's events, S8's close) is recorded as None and shown as
">cap". RSS is the peer's process tree's, sampled every 100 ms, and its growth is over the RSS just before the
measured request; `direct` has no proxy process, so it has no RSS or CPU figures.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import clients
from bench.measure import RssSampler, cpu_seconds
from bench.origins import Origins
from bench.peers import Running

MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass(frozen=True)
class Settings:
    s3_seconds: float = 15.0
    s4_seconds: float = 15.0
    s5_seconds: float = 10.0
    s6_seconds: float = 15.0
    s7_seconds: float = 10.0
    s8_cap: float = 10.0
    s9_seconds: float = 10.0

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            s3_seconds=5.0, s4_seconds=5.0, s5_seconds=3.0, s6_seconds=5.0, s7_seconds=3.0, s8_cap=5.0, s9_seconds=3.0
        )


@dataclass
class Context:
    origins: Origins
    settings: Settings
    _tags: itertools.count[int] = field(default_factory=itertools.count)

    def tag(self, scenario: str, peer: str) -> str:
        return f"{scenario}-{peer}-{next(self._tags)}-{time.monotonic_ns() % 1_000_000}"


@dataclass
class Measurement:
    metrics: dict[str, float | None] = field(default_factory=dict)
    series: list[tuple[float, float]] | None = None  # RSS growth (MiB) over time (s), for the plots
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Metric:
    name: str
    better: str | None  # "higher", "lower", or None for a figure shown for information
    cap: str | None = None  # how a value over the cap is shown (">10 s"); None: the metric has no cap


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    origin: str  # "files" (nginx, or bench/origin.py without nginx) or "py" (bench/origin.py)
    metrics: tuple[Metric, ...]
    run: Callable[[Context, Running], Measurement]
    measures: str  # one line for the report, formatted with the Settings' fields
    skip: frozenset[str] = frozenset()  # peers left out


class Failed(RuntimeError):
    pass


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _errors(results: list[Any]) -> list[BaseException]:
    return [r for r in results if isinstance(r, BaseException)]


# --- S1, S2: throughput ------------------------------------------------------------------------------------


def s1(ctx: Context, peer: Running) -> Measurement:
    cpu0 = cpu_seconds(peer.pid) if peer.pid else 0.0
    fetch = clients.get(peer.port, "/files/1g.bin", timeout=120, tls=peer.tls)
    cpu = cpu_seconds(peer.pid) - cpu0 if peer.pid else None
    if fetch.bytes != GiB:
        raise Failed(f"read {fetch.bytes} bytes of {GiB}")
    m = Measurement({"MB/s": fetch.bytes / (fetch.ended - fetch.started) / 1e6})
    if cpu is not None:
        m.metrics["CPU s/GiB"] = cpu / (fetch.bytes / GiB)
    return m


def s2(ctx: Context, peer: Running) -> Measurement:
    clients_count, size = 16, 256 * MiB
    cpu0 = cpu_seconds(peer.pid) if peer.pid else 0.0
    results = clients.parallel(
        lambda: clients.get(peer.port, "/files/256m.bin", timeout=180, tls=peer.tls), clients_count, 200
    )
    cpu = cpu_seconds(peer.pid) - cpu0 if peer.pid else None
    if errors := _errors(results):
        raise Failed(f"{len(errors)} of {clients_count} clients failed: {errors[0]}")
    fetches = [r for r in results if isinstance(r, clients.Fetch)]
    total = sum(f.bytes for f in fetches)
    if total != clients_count * size:
        raise Failed(f"read {total} bytes of {clients_count * size}")
    elapsed = max(f.ended for f in fetches) - min(f.started for f in fetches)
    m = Measurement({"MB/s": total / elapsed / 1e6})
    if cpu is not None:
        m.metrics["CPU s/GiB"] = cpu / (total / GiB)
    return m


# --- S3, S4: slow readers ----------------------------------------------------------------------------------


def s3(ctx: Context, peer: Running) -> Measurement:
    tag = ctx.tag("S3", peer.name)
    sampler = RssSampler(peer.pid).start() if peer.pid else None
    got, seen = clients.slow_get(
        peer.port,
        f"/big?tag={tag}",
        rate=1_000_000,
        seconds=ctx.settings.s3_seconds,
        before_close=lambda _got: ctx.origins.py.events(tag),
        tls=peer.tls,
    )
    m = Measurement({"read-ahead MiB": (seen.get("sent", 0) - got) / MiB, "client read MB": got / 1e6})
    if sampler is not None:
        time.sleep(0.1)
        m.metrics["RSS growth MiB"] = sampler.stop() / MiB
        m.series = sampler.growth_series()
    return m


def s4(ctx: Context, peer: Running) -> Measurement:
    count, rate, seconds = 50, 200_000, ctx.settings.s4_seconds
    sampler = RssSampler(peer.pid).start() if peer.pid else None

    def reader() -> int:
        return clients.slow_get(peer.port, "/files/64m.bin", rate=rate, seconds=seconds, tls=peer.tls)[0]

    results = clients.parallel(reader, count, seconds + 30)
    m = Measurement()
    if sampler is not None:
        time.sleep(0.1)
        m.metrics["RSS growth MiB"] = sampler.stop() / MiB
        m.series = sampler.growth_series()
    if errors := _errors(results):
        raise Failed(f"{len(errors)} of {count} clients failed: {errors[0]}")
    m.metrics["client read MB"] = sum(r for r in results if isinstance(r, int)) / 1e6
    return m


# --- S5: small requests ------------------------------------------------------------------------------------


def _wrk_run(
    peer: Running, *, connections: int, seconds: float, per: str, headers: tuple[str, ...] = ()
) -> Measurement:
    """wrk -t2 on the 100-byte response: rate, p50, p99, and the proxy's CPU microseconds per request (`per`
    names what a request is: "req", or "conn" when each is a new connection)."""
    cpu0 = cpu_seconds(peer.pid) if peer.pid else 0.0
    result = clients.wrk(
        peer.port,
        "/small",
        threads=2,
        connections=connections,
        seconds=seconds,
        tls=peer.tls is not None,
        headers=headers,
    )
    cpu = cpu_seconds(peer.pid) - cpu0 if peer.pid else None
    rate = "req/s" if per == "req" else "connections/s"
    m = Measurement({rate: result.requests_per_s, "p50 ms": result.p50_ms, "p99 ms": result.p99_ms})
    if cpu is not None and result.requests:
        # The proxy's own CPU per request: steadier than req/s, which depends on how the two cores are shared
        # with wrk and the origin.
        m.metrics[f"CPU us/{per}"] = cpu / result.requests * 1e6
    if result.errors:
        m.notes.append(f"wrk counted {result.errors} errors (non-2xx answers or socket errors)")
    return m


def s5(ctx: Context, peer: Running) -> Measurement:
    return _wrk_run(peer, connections=64, seconds=ctx.settings.s5_seconds, per="req")


# --- S6: slow upload ---------------------------------------------------------------------------------------


def s6(ctx: Context, peer: Running) -> Measurement:
    tag = ctx.tag("S6", peer.name)
    # Without a proxy there is no RSS to sample: only the first-byte time is measured, which takes a moment.
    seconds = ctx.settings.s6_seconds if peer.pid else min(2.0, ctx.settings.s6_seconds)
    sampler = RssSampler(peer.pid).start() if peer.pid else None
    up = clients.upload(peer.port, f"/sink?rate=5000000&tag={tag}", size=512 * MiB, seconds=seconds, tls=peer.tls)
    m = Measurement({"client sent MB": up.sent / 1e6})
    if sampler is not None:
        time.sleep(0.1)
        m.metrics["RSS growth MiB"] = sampler.stop() / MiB
    if up.error:
        m.notes.append(f"upload: {up.error}")
    seen: dict[str, Any] = {}
    for _ in range(20):  # the origin records it at once; a moment for its thread
        seen = ctx.origins.py.events(tag)
        if "first_body_byte_at" in seen:
            break
        time.sleep(0.05)
    first = seen.get("first_body_byte_at")
    if first is None or up.first_body_sent_at is None:
        m.metrics["first byte ms"] = None
    else:
        m.metrics["first byte ms"] = (first - up.first_body_sent_at) * 1000
    return m


# --- S7: server-sent events --------------------------------------------------------------------------------


def s7(ctx: Context, peer: Running) -> Measurement:
    tag = ctx.tag("S7", peer.name)
    seconds = ctx.settings.s7_seconds
    latencies = clients.sse(
        peer.port, f"/events?interval=0.05&seconds={seconds + 2:g}&tag={tag}", seconds=seconds, tls=peer.tls
    )
    latencies = latencies[1:]  # the first event goes out with the connection being set up
    expected = int(seconds / 0.05) - 1
    m = Measurement()
    if len(latencies) < 2:
        m.metrics.update({"p50 ms": None, "p99 ms": None})
        m.notes.append(f"{len(latencies) + 1} events of {expected + 1} arrived within {seconds:g} s")
        return m
    m.metrics["p50 ms"] = percentile(latencies, 50) * 1000
    m.metrics["p99 ms"] = percentile(latencies, 99) * 1000
    if len(latencies) < expected * 0.9:
        m.notes.append(f"{len(latencies) + 1} events of {expected + 1} arrived within {seconds:g} s")
    return m


def derive_added_latency(records: list[dict[str, Any]]) -> None:
    """S7's added latency: a peer's p50/p99 minus those of `direct` in the same repeat."""
    direct = {r["repeat"]: r["metrics"] for r in records if r["scenario"] == "S7" and r["peer"] == "direct"}
    for r in records:
        base = direct.get(r["repeat"])
        if r["scenario"] != "S7" or r["peer"] == "direct" or not base or r["error"]:
            continue
        for p in ("p50", "p99"):
            mine, theirs = r["metrics"].get(f"{p} ms"), base.get(f"{p} ms")
            if theirs is None:
                continue
            r["metrics"][f"added {p} ms"] = None if mine is None else mine - theirs


# --- S8: client abort --------------------------------------------------------------------------------------


def s8(ctx: Context, peer: Running) -> Measurement:
    tag = ctx.tag("S8", peer.name)
    cap = ctx.settings.s8_cap
    aborted_at, _got = clients.read_then_abort(peer.port, f"/big?tag={tag}", nbytes=10_000_000, tls=peer.tls)
    seen: dict[str, Any] = {}
    for _ in range(int(cap / 0.01) + 10):
        seen = ctx.origins.py.events(tag)
        if "closed_at" in seen or time.monotonic() - aborted_at > cap:
            break
        time.sleep(0.01)
    closed = seen.get("closed_at")
    m = Measurement()
    if closed is None or closed - aborted_at > cap:
        m.metrics["upstream closed ms"] = None
    else:
        m.metrics["upstream closed ms"] = (closed - aborted_at) * 1000
    m.metrics["origin sent MiB"] = seen.get("sent", 0) / MiB
    if seen.get("complete"):
        m.notes.append("the origin had sent the whole 1 GiB body before the connection was closed")
    return m


# --- S9: a new connection for every request ----------------------------------------------------------------


def s9(ctx: Context, peer: Running) -> Measurement:
    """S5 with `Connection: close`: every request opens a connection, and over TLS makes a full handshake (wrk
    resumes no sessions), so its rate is connections (handshakes) per second."""
    return _wrk_run(peer, connections=16, seconds=ctx.settings.s9_seconds, per="conn", headers=("Connection: close",))


SCENARIOS: dict[str, Scenario] = {
    s.key: s
    for s in [
        Scenario(
            "S1",
            "one client GETs 1 GiB",
            "files",
            (Metric("MB/s", "higher"), Metric("CPU s/GiB", "lower")),
            s1,
            "one client GETs a 1 GiB file (Content-Length) as fast as it can: MB/s, and the proxy's CPU seconds "
            "per GiB",
        ),
        Scenario(
            "S2",
            "16 clients GET 256 MiB each",
            "files",
            (Metric("MB/s", "higher"), Metric("CPU s/GiB", "lower")),
            s2,
            "16 concurrent clients GET a 256 MiB file each: aggregate MB/s, and the proxy's CPU seconds per GiB",
        ),
        Scenario(
            "S3",
            "one client reads at 1 MB/s",
            "py",
            (Metric("RSS growth MiB", "lower"), Metric("read-ahead MiB", "lower"), Metric("client read MB", None)),
            s3,
            "one client reads a 1 GiB body at 1 MB/s for {s3_seconds:g} s: the proxy's peak RSS growth, and how far "
            "the proxy read ahead of the client (bytes the origin sent minus bytes the client read, at the end)",
        ),
        Scenario(
            "S4",
            "50 clients read at 200 KB/s",
            "files",
            (Metric("RSS growth MiB", "lower"), Metric("client read MB", None)),
            s4,
            "50 clients read a 64 MiB body at 200 KB/s each for {s4_seconds:g} s: the proxy's peak RSS growth",
            skip=frozenset({"direct"}),  # no proxy process: nothing to measure
        ),
        Scenario(
            "S5",
            "small requests (wrk -t2 -c64)",
            "files",
            (
                Metric("req/s", "higher"),
                Metric("p50 ms", "lower"),
                Metric("p99 ms", "lower"),
                Metric("CPU us/req", "lower"),
            ),
            s5,
            "`wrk -t2 -c64 -d{s5_seconds:g}s --latency` on a 100-byte response: requests/s, latency p50 and p99, "
            "and the proxy's CPU microseconds per request",
        ),
        Scenario(
            "S6",
            "512 MiB upload to an origin reading at 5 MB/s",
            "py",
            (
                Metric("first byte ms", "lower", ">phase"),
                Metric("RSS growth MiB", "lower"),
                Metric("client sent MB", None),
            ),
            s6,
            "a 512 MiB upload (Content-Length) to an origin reading at 5 MB/s, for {s6_seconds:g} s, then aborted: "
            "the time from the client's first body byte sent to the first body byte at the origin, and the proxy's "
            "peak RSS growth",
        ),
        Scenario(
            "S7",
            "server-sent events, one per 50 ms",
            "py",
            (
                Metric("p50 ms", "lower", ">phase"),
                Metric("p99 ms", "lower", ">phase"),
                Metric("added p50 ms", "lower", ">phase"),
                Metric("added p99 ms", "lower", ">phase"),
            ),
            s7,
            "an event stream, one event per 50 ms, read for {s7_seconds:g} s: each event's latency from the origin's "
            "send to the client's receive, p50 and p99, and what the proxy adds to those of `direct` in the same "
            "repeat",
        ),
        Scenario(
            "S8",
            "client aborts after 10 MB",
            "py",
            (Metric("upstream closed ms", "lower", ">cap"), Metric("origin sent MiB", None)),
            s8,
            "a client GETs a 1 GiB body, reads 10 MB and aborts (reset): the time until the origin sees its "
            "connection closed (capped at {s8_cap:g} s)",
        ),
        Scenario(
            "S9",
            "a new connection per request (wrk -t2 -c16, Connection: close)",
            "files",
            (
                Metric("connections/s", "higher"),
                Metric("p50 ms", "lower"),
                Metric("p99 ms", "lower"),
                Metric("CPU us/conn", "lower"),
            ),
            s9,
            "`wrk -t2 -c16 -d{s9_seconds:g}s --latency -H 'Connection: close'` on a 100-byte response: every request "
            "on a new connection (over TLS, a full handshake): connections/s, latency p50 and p99, and the proxy's "
            "CPU microseconds per connection",
        ),
    ]
}


def cap_text(metric: Metric, settings: Settings, scenario: str) -> str:
    """How a value over the cap is shown."""
    if metric.cap is None:
        return "-"
    seconds = {"S6": settings.s6_seconds, "S7": settings.s7_seconds, "S8": settings.s8_cap}.get(scenario, 0.0)
    return f">{seconds:g} s"
