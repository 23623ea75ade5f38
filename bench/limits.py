"""Limits benchmark: what a shared limit store (Redis) costs beside the local one, on loopback, every process
stopped by PID.

L1: S5's load (`wrk -t2 -c64 --latency`, the 100-byte response) on a rate-limited route (anonymous, with
`[admission.rate_limits] anonymous` far above what the run can reach, so no request is refused: every answer must
be 200) through two gateway processes configured identically except `[limits.store]`: `local` (counts in the
process) and `redis` (one redis-server started by the bench on a free loopback port, without persistence; every
check one `EVALSHA` round trip). Per case: req/s, p50, p99, the gateway's CPU microseconds per request and
redis-server's; the redis/local ratios. For the redis case it also reports what the gateway's own metrics say
(checks Redis answered, their mean round trip, errors and fallbacks to the local count) and how many `EVALSHA`
calls redis-server counted, so that a run whose checks did not reach Redis is seen as one.

Each repeat starts both gateways fresh and measures them in turn (`--rounds` times each, the order alternating),
so that both are compared on the same machine state; redis-server is started once per run.

Run: `.venv/bin/python bench/limits.py [--repeat N] [--rounds N] [--seconds S] [--out DIR]` (default out:
bench/out/). It writes DIR/limits.md and DIR/limits.json; progress goes to standard error.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: bench/limits.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import origins, peers, procs, report
from bench.admission import BenchError, OtherCpu, Quiet, log, start_gateway, status_of, wrk_run
from bench.measure import cpu_seconds

CASES = ("local", "redis")
METRICS = ("req/s", "p50 ms", "p99 ms", "CPU us/req", "redis CPU us/req")
RATE = '{ rate = "1000000/s", burst = 1000000 }'  # far above what one loopback gateway serves: nothing refused
# The store's default timeout (10 ms) is about what a reply waits behind the other 63 connections' work in a
# saturated gateway: under S5's load a few percent of the checks time out and are counted in the process, which is
# not what is measured here. `--store-timeout 10ms` shows it.
STORE_TIMEOUT = "1s"
MAX_FALLBACKS = 0.01  # a redis run with more of its checks decided without Redis is an error


def config(
    case: str, port: int, origin_port: int, admin_port: int, redis_port: int, store_timeout: str = STORE_TIMEOUT
) -> str:
    """The main harness's gateway config with an anonymous rate limit on its route, an admin listener (scraped
    only before and after each run, for the store's series), and the store of `case` (Redis's with the store's
    defaults but `timeout`)."""
    text = peers.gateway_config(port, origin_port)
    text += f"""
[admin]
port = {admin_port}

[admission.rate_limits]
anonymous = {RATE}
"""
    if case == "redis":
        text += f"""
[limits.store]
type = "redis"
url = "redis://127.0.0.1:{redis_port}/0"
timeout = "{store_timeout}"
"""
    else:
        text += '\n[limits.store]\ntype = "local"\n'
    return text


# --- redis-server --------------------------------------------------------------------------------------------


class Redis:
    """One redis-server on 127.0.0.1, a free port, no persistence; registered with `procs` (stopped by PID)."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise BenchError("redis-server is not installed (Debian's redis-server package)")
        self.port = procs.free_port()
        argv = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(workdir), "--daemonize", "no", "--loglevel", "warning"]
        self.proc = procs.start("redis-server", argv, workdir / "redis.log", cwd=workdir)
        deadline = time.monotonic() + 10.0
        while self.command("PING") != "PONG":
            if not self.proc.alive() or time.monotonic() > deadline:
                raise BenchError(f"redis-server did not answer PING: {self.proc.log_tail()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def command(self, *args: str) -> Any:
        """One command over a blocking socket: its reply (None if Redis does not answer)."""
        from gateway.redis.protocol import RespParser, encode

        parser = RespParser()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5.0) as sock:
                sock.sendall(encode(*args))
                for _ in range(1000):
                    data = sock.recv(1 << 16)
                    if not data:
                        return None
                    if replies := parser.feed(data):
                        reply = replies[0]
                        return reply.decode() if isinstance(reply, bytes) else reply
        except OSError:
            return None
        return None

    def evalsha_calls(self) -> int:
        """`EVALSHA` calls so far (INFO commandstats)."""
        m = re.search(r"cmdstat_evalsha:calls=(\d+)", str(self.command("INFO", "commandstats") or ""))
        return int(m.group(1)) if m else 0

    def stop(self) -> None:
        self.proc.stop()


# --- one run -------------------------------------------------------------------------------------------------


def store_series(admin_port: int) -> dict[str, float]:
    """The gateway's `gateway_limit_store_*` series, each summed over its labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gateway_limit_store_"):
            name, _, value = line.rpartition(" ")
            if name.startswith("gateway_limit_store_errors_total{"):
                out[name] = out.get(name, 0.0) + float(value)  # by kind, too
            name = name.split("{", 1)[0]
            if name.endswith(("_count", "_sum", "_total")):
                out[name] = out.get(name, 0.0) + float(value)
    return out


def measure(
    gw: peers.Running, case: str, admin_port: int, redis: Redis, origin_pids: list[int], seconds: float, **tags: int
) -> dict[str, Any]:
    """One wrk run against `gw`: the figures, every answer a 200, and (redis) the checks reaching Redis."""
    record: dict[str, Any] = {"test": "L1", "case": case, **tags, "metrics": {}, "notes": [], "error": None}
    began = time.monotonic()
    try:
        series0, evalsha0 = store_series(admin_port), redis.evalsha_calls()
        other = OtherCpu([gw.pid, redis.pid, *origin_pids])  # type: ignore[list-item]
        cpu0, rcpu0 = cpu_seconds(gw.pid), cpu_seconds(redis.pid)  # type: ignore[arg-type]
        result = wrk_run(gw.port, "/small", None, seconds)
        cpu, rcpu = cpu_seconds(gw.pid) - cpu0, cpu_seconds(redis.pid) - rcpu0  # type: ignore[arg-type]
        other_percent, steal_percent = other.percent()
        gw.check_alive()
        n = result.requests
        record["metrics"] = {
            "req/s": result.requests_per_s,
            "p50 ms": result.p50_ms,
            "p99 ms": result.p99_ms,
            "CPU us/req": cpu / n * 1e6 if n else None,
            "redis CPU us/req": rcpu / n * 1e6 if n else None,
            "other CPU %": other_percent,
            "steal %": steal_percent,
        }
        series = {k: v - series0.get(k, 0.0) for k, v in store_series(admin_port).items()}
        evalsha = redis.evalsha_calls() - evalsha0
        answered = series.get("gateway_limit_store_seconds_count", 0.0)
        errors = series.get("gateway_limit_store_errors_total", 0.0)
        fallbacks = series.get("gateway_limit_store_fallbacks_total", 0.0)
        record["requests"] = n
        kinds = {
            k.split('"')[1]: v for k, v in series.items() if k.startswith("gateway_limit_store_errors_total{") and v
        }
        record["store"] = {"answered": answered, "errors": errors, "fallbacks": fallbacks, "evalsha": evalsha}
        record["store"]["errors by kind"] = kinds
        if answered:
            mean = series.get("gateway_limit_store_seconds_sum", 0.0) / answered * 1e3
            record["store"]["mean round trip ms"] = mean
        non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", result.output)
        record["non-200"] = int(non2xx.group(1)) if non2xx else 0
        if record["non-200"]:
            record["error"] = f"wrk saw {record['non-200']} non-2xx answers of {n}"
        if result.errors:
            record["notes"].append(f"wrk counted {result.errors} socket errors")
        if case == "redis":
            note = f"{answered:.0f} checks answered by Redis for {n} requests, {evalsha} EVALSHA"
            if answered:
                note += f", mean round trip {record['store']['mean round trip ms']:.2f} ms"
            by_kind = " (" + ", ".join(f"{k} {v:.0f}" for k, v in kinds.items()) + ")" if kinds else ""
            record["notes"].append(note + f", {errors:.0f} errors{by_kind}, {fallbacks:.0f} fallbacks")
            if fallbacks > MAX_FALLBACKS * n:
                record["error"] = f"{fallbacks:.0f} of {n} checks decided without Redis (timeouts or circuit open)"
            elif answered + fallbacks < n:  # wrk's count leaves out requests in flight at its end: never fewer
                record["error"] = f"only {answered + fallbacks:.0f} limit checks for {n} requests"
        elif evalsha or answered:
            record["error"] = f"the local store sent {evalsha} EVALSHA to Redis"
    except Exception as e:
        record["error"] = f"{type(e).__name__}: {e}"
    record["seconds"] = round(time.monotonic() - began, 2)
    return record


def circuit_closed(gw: peers.Running, admin_port: int, case: str, timeout: float = 20.0) -> None:
    """Wait until the gateway asks Redis again: a warm-up whose first checks came before the store's connections
    were up (or timed out) opens the circuit for 5 s, after which one request closes it."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as answer:
            m = re.search(r"^gateway_limit_store_circuit_open(?:\{[^}]*\})? (\S+)$", answer.read().decode(), re.M)
        if m is None or float(m.group(1)) == 0:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"L1 {case}: the limit store's circuit stayed open for {timeout:g} s after the warm-up")
        time.sleep(0.5)
        check_route(gw.port, f"L1 {case}")


def check_route(port: int, what: str) -> None:
    """The route answers 200 and says it is rate-limited (RateLimit-Policy), or the benchmark stops."""
    status, headers = status_of(port, "/small")
    if status != 200 or "ratelimit-policy" not in headers:
        raise BenchError(f"{what}: GET /small answered {status} {headers}: not a 200 of a rate-limited route")


def run_repeat(
    repeat: int,
    started: origins.Origins,
    redis: Redis,
    workdir: Path,
    seconds: float,
    rounds: int,
    quiet: Quiet,
    store_timeout: str = STORE_TIMEOUT,
) -> list[dict[str, Any]]:
    """Both gateways started fresh, warmed, then measured in turn `rounds` times (the order alternating)."""
    origin_pids = sorted({started.files.proc.pid, started.py.proc.pid})
    running: dict[str, tuple[peers.Running, int]] = {}
    records: list[dict[str, Any]] = []
    try:
        for case in CASES:
            rundir = workdir / f"{case}-{repeat}"
            rundir.mkdir()
            admin_port = procs.free_port()
            text = config(case, procs.free_port(), started.files.port, admin_port, redis.port, store_timeout)
            gw = start_gateway(f"L1-{case}-{repeat}", text, rundir)
            running[case] = (gw, admin_port)
            check_route(gw.port, f"L1 {case}")
            wrk_run(gw.port, "/small", None, 1.0)  # warm-up: the pools (upstream, Redis), the code paths
        time.sleep(0.3)
        for case, (gw, admin_port) in running.items():
            circuit_closed(gw, admin_port, case)
        for round_ in range(rounds):
            order = CASES if (repeat + round_) % 2 == 0 else CASES[::-1]
            for case in order:
                gw, admin_port = running[case]
                circuit_closed(gw, admin_port, case)  # a client gone during a check counts as a failed check
                record = quiet.measure(
                    lambda gw=gw, case=case, admin_port=admin_port, round_=round_: measure(
                        gw, case, admin_port, redis, origin_pids, seconds, repeat=repeat, round=round_
                    ),
                    [gw.pid, redis.pid, *origin_pids],  # type: ignore[list-item]
                )
                records.append(record)
                log(f"repeat {repeat + 1} round {round_ + 1} {case}: {record['metrics']} {record['notes']}")
                if record["error"]:
                    log(f"  ERROR {record['error']}")
    finally:
        for gw, _ in running.values():
            gw.stop()
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for case in CASES:
        runs = [r for r in records if r["case"] == case and not r["error"]]
        out[case] = {
            m: statistics.median(v)
            if (v := [r["metrics"][m] for r in runs if r["metrics"].get(m) is not None])
            else None
            for m in METRICS
        }
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        "# Limits benchmark: the Redis limit store beside the local one",
        "",
        f"Machine: {result['machine']}. Command: `{result['command']}`. Repeats: {result['repeat']} x "
        f"{result['rounds']} rounds, {result['seconds']:g} s per wrk run (`wrk -t2 -c64 --latency`, the 100-byte "
        f"response), medians. The route is anonymous with `[admission.rate_limits] anonymous = {RATE}`: every "
        "request is checked, none refused. The two gateways differ only in `[limits.store]`: `local`, or `redis` "
        "at one redis-server on loopback (no persistence) with the store's defaults (`pool_size = 2`) but "
        f'`timeout = "{result["store_timeout"]}"`: the default 10 ms is about what a reply waits behind the '
        "other connections' work in a saturated gateway, so some checks would fall back to the local count. "
        "`redis CPU us/req` is redis-server's CPU time per request (a few idle ticks in the local case).",
        "",
        "| metric | local | redis | redis/local |",
        "|---|---|---|---|",
    ]
    for m in METRICS:
        local, redis = s["local"][m], s["redis"][m]
        ratio = f"{redis / local:.3f}" if redis and local and m != "redis CPU us/req" else "-"
        lines.append(f"| {m} | {_fmt(local)} | {_fmt(redis)} | {ratio} |")
    non200 = sum(r.get("non-200", 0) for r in result["runs"])
    stores = [r["store"] for r in result["runs"] if r["case"] == "redis" and r.get("store")]
    if stores:
        trips = [x["mean round trip ms"] for x in stores if x.get("mean round trip ms")]
        trip = _fmt(statistics.median(trips) if trips else None)
        lines += [
            "",
            f"Redis case, over its {len(stores)} runs: {sum(x['answered'] for x in stores):.0f} checks answered by "
            f"Redis ({sum(x['evalsha'] for x in stores)} EVALSHA counted by redis-server), "
            f"{sum(x['errors'] for x in stores):.0f} errors, {sum(x['fallbacks'] for x in stores):.0f} checks "
            "decided in the process; the round trip as the gateway sees it (from the check sent to its reply "
            f"handled, so including the wait behind the reactor's other work): {trip} ms "
            "(median of the runs' means).",
        ]
    lines += [
        "",
        f"Answers other than 200 over every run: {non200}. Runs with an error: "
        f"{sum(1 for r in result['runs'] if r['error'])}.",
        "",
        "## Every run",
        "",
    ]
    for r in result["runs"]:
        metrics = ", ".join(f"{k} {v:.2f}" for k, v in r["metrics"].items() if isinstance(v, float | int))
        extra = "; ".join(r["notes"]) + (f"; ERROR {r['error']}" if r["error"] else "")
        lines.append(f"- repeat {r['repeat'] + 1} round {r['round'] + 1} {r['case']}: {metrics} ({extra})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each case per repeat, alternating")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--store-timeout", default=STORE_TIMEOUT, help="the Redis store's `timeout`")
    parser.add_argument("--max-other-cpu", type=float, default=10.0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if shutil.which("wrk") is None or shutil.which("nginx") is None:
        peers.ensure_packages(True)
    quiet = Quiet(max_other=args.max_other_cpu)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gateway-limits-") as tmp:
        workdir = Path(tmp)
        started = None
        try:
            redis = Redis(workdir)
            log(
                f"redis-server {redis.command('INFO', 'server').split('redis_version:')[1].split()[0]} "
                f"on port {redis.port}, pid {redis.pid}"
            )
            started = origins.start(workdir, shutil.which("nginx") is not None)
            for repeat in range(args.repeat):
                records += run_repeat(
                    repeat, started, redis, workdir, args.seconds, args.rounds, quiet, args.store_timeout
                )
        finally:
            if started is not None:
                started.stop()
            procs.stop_all()  # redis-server among them, by its PID
    summary = summarize(records)
    result = {
        "machine": report.machine(),
        "command": shlex.join([Path(sys.executable).name, "bench/limits.py", *(argv or sys.argv[1:])]),
        "repeat": args.repeat,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "rate_limit": RATE,
        "store_timeout": args.store_timeout,
        "summary": summary,
        "runs": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    (args.out / "limits.md").write_text(text)
    (args.out / "limits.json").write_text(json.dumps(result, indent=1) + "\n")
    print(text)
    return 1 if any(r["error"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
