"""Operations benchmark: what the access log and the metrics cost the gateway, on loopback, every process
stopped by PID.

O1: small requests (`wrk -t2 -c64 --latency`, the 100-byte response of S5) through one gateway process with
both off (`[access_log] path = ""`, no `[admin]`), and through one with both on: the access log written to a file
(one JSON line per request, flushed) and the admin listener serving metrics, scraped once a second during the
run (Prometheus usually scrapes every 15 s: this is the harsher case). Per case: req/s, p50, p99 and the
gateway's CPU microseconds per request; the on/off ratios. Each repeat starts both processes fresh and
measures them in turn (`--rounds` times each, the order alternating), so that both are compared on the same
machine state.

Run: `.venv/bin/python bench/operations.py [--repeat N] [--seconds S] [--out DIR]` (default out: bench/out/).
It writes DIR/operations.md and DIR/operations.json; progress goes to standard error.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: bench/operations.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import origins, peers, procs, report
from bench.admission import Quiet, expect_status, log, measured_wrk, start_gateway, wrk_run

CASES = ("off", "on")
METRICS = ("req/s", "p50 ms", "p99 ms", "CPU us/req")


def config(case: str, port: int, origin_port: int, workdir: Path, admin_port: int) -> str:
    """The main harness's gateway config; with both on, the access log in `workdir` and the admin listener."""
    if case == "off":
        return peers.gateway_config(port, origin_port)
    text = peers.gateway_config(port, origin_port, access_log=str(workdir / "access.log"))
    return text + f"\n[admin]\nport = {admin_port}\n"


class Scraper(threading.Thread):
    """GETs /metrics once a second until stopped; counts the scrapes and their failures."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.scrapes = 0
        self.failures = 0
        self.size = 0
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(1.0):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as answer:
                    self.size = len(answer.read())
                self.scrapes += 1
            except OSError:
                self.failures += 1

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=10)


def measure(
    gw: peers.Running, case: str, admin_port: int, rundir: Path, origin_pids: list[int], seconds: float, **tags: int
) -> dict[str, Any]:
    """One wrk run against `gw` (with a scraper on the admin port when metrics are on)."""
    record: dict[str, Any] = {"test": "O1", "case": case, **tags, "metrics": {}, "notes": [], "error": None}
    began = time.monotonic()
    lines_before = _lines(rundir / "access.log")
    scraper = Scraper(admin_port) if case == "on" else None
    try:
        if scraper is not None:
            scraper.start()
        try:
            result, record["metrics"] = measured_wrk(gw, "/small", None, seconds, origin_pids)
        finally:
            if scraper is not None:
                scraper.stop()
        if scraper is not None:
            record["notes"].append(f"{scraper.scrapes} scrapes of {scraper.size} bytes, {scraper.failures} failed")
            if scraper.failures or not scraper.scrapes:
                record["error"] = f"metrics scrapes failed: {scraper.failures} of {scraper.scrapes}"
            time.sleep(0.2)  # the last lines flushed
            lines = _lines(rundir / "access.log") - lines_before
            record["notes"].append(f"{lines} access-log lines for {result.requests} requests")
            if lines < result.requests:
                record["error"] = f"{lines} access-log lines for {result.requests} requests"
        if result.errors:
            record["notes"].append(f"wrk counted {result.errors} socket errors")
    except Exception as e:
        record["error"] = f"{type(e).__name__}: {e}"
    record["seconds"] = round(time.monotonic() - began, 2)
    return record


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def run_repeat(
    repeat: int, started: origins.Origins, workdir: Path, seconds: float, rounds: int, quiet: Quiet
) -> list[dict[str, Any]]:
    """Both gateways started fresh, warmed, then measured in turn `rounds` times (the order alternating)."""
    origin_pids = sorted({started.files.proc.pid, started.py.proc.pid})
    running: dict[str, tuple[peers.Running, int, Path]] = {}
    records: list[dict[str, Any]] = []
    try:
        for case in CASES:
            rundir = workdir / f"{case}-{repeat}"
            rundir.mkdir()
            admin_port = procs.free_port()
            text = config(case, procs.free_port(), started.files.port, rundir, admin_port)
            gw = start_gateway(f"O1-{case}-{repeat}", text, rundir)
            running[case] = (gw, admin_port, rundir)
            expect_status(gw.port, "/small", 200, None, f"O1 {case}")
            wrk_run(gw.port, "/small", None, 1.0)  # warm-up: the pool, the code paths
        time.sleep(0.3)
        for round_ in range(rounds):
            order = CASES if (repeat + round_) % 2 == 0 else CASES[::-1]
            for case in order:
                gw, admin_port, rundir = running[case]
                record = quiet.measure(
                    lambda gw=gw, case=case, admin_port=admin_port, rundir=rundir, round_=round_: measure(
                        gw, case, admin_port, rundir, origin_pids, seconds, repeat=repeat, round=round_
                    ),
                    [gw.pid, *origin_pids],  # type: ignore[list-item]
                )
                records.append(record)
                log(f"repeat {repeat + 1} round {round_ + 1} {case}: {record['metrics']} {record['notes']}")
    finally:
        for gw, _, _ in running.values():
            gw.stop()
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for case in CASES:
        runs = [r for r in records if r["case"] == case and not r["error"]]
        out[case] = {
            m: statistics.median(v) if (v := [r["metrics"][m] for r in runs if r["metrics"].get(m)]) else None
            for m in METRICS
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        "# Operations benchmark: access log and metrics on vs off",
        "",
        f"Machine: {result['machine']}. Command: `{result['command']}`. Repeats: {result['repeat']}, "
        f"{result['seconds']:g} s per wrk run; medians.",
        "",
        "| metric | off | on | on/off |",
        "|---|---|---|---|",
    ]
    for m in METRICS:
        off, on = s["off"][m], s["on"][m]
        ratio = f"{on / off:.3f}" if on and off else "-"
        lines.append(
            f"| {m} | {off if off is None else f'{off:.2f}'} | {on if on is None else f'{on:.2f}'} | {ratio} |"
        )
    lines += ["", f"Target: on/off req/s at least 0.90: **{result['verdict']}**.", "", "## Every run", ""]
    for r in result["runs"]:
        metrics = ", ".join(f"{k} {v:.2f}" for k, v in r["metrics"].items() if isinstance(v, float | int))
        extra = "; ".join(r["notes"]) + (f"; ERROR {r['error']}" if r["error"] else "")
        lines.append(f"- repeat {r['repeat'] + 1} round {r['round'] + 1} {r['case']}: {metrics} ({extra})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each case per repeat, alternating")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--max-other-cpu", type=float, default=10.0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if shutil.which("wrk") is None or shutil.which("nginx") is None:
        peers.ensure_packages(True)
    quiet = Quiet(max_other=args.max_other_cpu)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gateway-operations-") as tmp:
        workdir = Path(tmp)
        started = origins.start(workdir, shutil.which("nginx") is not None)
        try:
            for repeat in range(args.repeat):
                records += run_repeat(repeat, started, workdir, args.seconds, args.rounds, quiet)
        finally:
            started.stop()
            procs.stop_all()
    summary = summarize(records)
    off, on = summary["off"]["req/s"], summary["on"]["req/s"]
    verdict = "no figures" if not (off and on) else f"{on / off:.3f} ({'met' if on / off >= 0.9 else 'MISSED'})"
    result = {
        "machine": report.machine(),
        "command": shlex.join([Path(sys.executable).name, "bench/operations.py", *(argv or sys.argv[1:])]),
        "repeat": args.repeat,
        "seconds": args.seconds,
        "summary": summary,
        "verdict": verdict,
        "runs": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    (args.out / "operations.md").write_text(text)
    (args.out / "operations.json").write_text(json.dumps(result, indent=1) + "\n")
    print(text)
    return 1 if any(r["error"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
