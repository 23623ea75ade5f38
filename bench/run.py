"""Benchmarks of the gateway side by side with nginx, HAProxy, Twisted's ReverseProxyResource and a direct
connection, on loopback: the command line and the orchestration.

Run: `.venv/bin/python bench/run.py [--repeat 3] [--scenarios S1,S3] [--peers gateway,nginx-stream] [--out DIR]
[--quick] [--tls]`. See bench/README.md for what each scenario measures.

Each scenario run starts its peer fresh from a config written into a temp dir, warms it up with one small request,
measures, and stops it by PID. Within each repeat, every scenario is run through each peer in turn (the peers'
order rotates from one repeat to the next). The origins are started once and stopped at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import clients, origins, peers, procs, report
from bench.scenarios import SCENARIOS, Context, Settings, derive_added_latency
from bench.tls import BenchCertificate, make_certificate

HERE = Path(__file__).resolve().parent


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _names(text: str, known: list[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--repeat", type=int, default=None, help="repeats of every scenario (default 3, 1 with --quick)"
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, e.g. S1,S3")
    parser.add_argument("--peers", default=",".join(p.name for p in peers.ALL), help="comma-separated")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="directory for the results and plots")
    parser.add_argument("--quick", action="store_true", help="1 repeat and shorter phases, for a smoke test")
    parser.add_argument("--no-install", action="store_true", help="never try to apt-get install nginx, haproxy, wrk")
    parser.add_argument(
        "--tls", action="store_true", help="the peers serve TLS to the clients (one certificate, the same ciphers)"
    )
    args = parser.parse_args(argv)
    args.scenarios = _names(args.scenarios, list(SCENARIOS), "scenarios")
    args.peers = _names(args.peers, [p.name for p in peers.ALL], "peers")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    return args


def run_one(
    ctx: Context,
    scenario: str,
    peer: peers.Peer,
    repeat: int,
    workdir: Path,
    origin_port: int,
    tls: BenchCertificate | None,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "scenario": scenario,
        "peer": peer.name,
        "repeat": repeat,
        "metrics": {},
        "series": None,
        "notes": [],
        "error": None,
    }
    started = time.monotonic()
    running = None
    try:
        running = peer.start(origin_port, workdir, tls)
        if tls is not None:
            running.tls = tls.client_context()
        clients.get(running.port, "/small", timeout=10, tls=running.tls)  # warm-up
        time.sleep(0.2)
        measured = SCENARIOS[scenario].run(ctx, running)
        running.check_alive()
        record.update(metrics=measured.metrics, series=measured.series, notes=measured.notes)
    except Exception as e:
        record["error"] = f"{type(e).__name__}: {e}"
        if not isinstance(e, (clients.ClientError, RuntimeError, OSError)):
            traceback.print_exc()
    finally:
        if running is not None:
            running.stop()
    record["seconds"] = round(time.monotonic() - started, 2)
    return record


def _line(record: dict[str, Any]) -> str:
    if record["error"]:
        return f"FAILED {record['error']}"
    parts = [f"{k} {report.fmt(v, 'over the cap')}" for k, v in record["metrics"].items()]
    parts += record["notes"]
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop children on the way out, as on Ctrl-C

    peers.ensure_packages(not args.no_install)
    chosen: list[peers.Peer] = []
    skipped: dict[str, str] = {}
    for name in args.peers:
        peer = peers.BY_NAME[name]
        why = peer.unavailable() or (None if peer.serves_tls or not args.tls else "it serves no TLS (--tls)")
        if why:
            skipped[name] = why
            log(f"skipping {name}: {why}")
        else:
            chosen.append(peer)
    if peers.BY_NAME["gateway"] not in chosen:
        log("note: without the gateway peer there are no gateway/peer ratios")
    for wrk_scenario in ("S5", "S9"):
        if wrk_scenario in args.scenarios and shutil.which("wrk") is None:
            log(f"skipping {wrk_scenario}: wrk is not installed")
            args.scenarios.remove(wrk_scenario)
    settings = Settings.quick() if args.quick else Settings()
    use_nginx = shutil.which("nginx") is not None
    if not use_nginx:
        log("nginx is not installed: bench/origin.py serves the fixed bodies too")

    plan = []
    for repeat in range(args.repeat):
        shift = repeat % max(1, len(chosen))
        order = chosen[shift:] + chosen[:shift]
        for scenario in args.scenarios:
            for peer in order:
                if peer.name in SCENARIOS[scenario].skip or (peer.only is not None and scenario not in peer.only):
                    continue
                plan.append((repeat, scenario, peer))
    log(f"{len(plan)} runs: {len(args.scenarios)} scenarios x {len(chosen)} peers x {args.repeat} repeat(s)")

    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        workdir = Path(tmp)
        try:
            started = origins.start(workdir, use_nginx)
            log(f"origins: {started.files.kind} on {started.files.port}, origin.py on {started.py.port}")
            ctx = Context(started, settings)
            tls = make_certificate(workdir) if args.tls else None
            try:
                for i, (repeat, scenario, peer) in enumerate(plan, 1):
                    rundir = workdir / f"{scenario}-{peer.name}-{repeat}"
                    rundir.mkdir()
                    prefix = f"[{i}/{len(plan)}] repeat {repeat + 1} {scenario} {peer.name}"
                    origin = started.of(SCENARIOS[scenario].origin)
                    record = run_one(ctx, scenario, peer, repeat, rundir, origin.port, tls)
                    records.append(record)
                    log(f"{prefix}: {_line(record)} ({record['seconds']:.1f} s)")
                    if not origin.proc.alive():
                        raise RuntimeError(f"the {origin.kind} origin died: {origin.proc.log_tail()}")
            finally:
                started.stop()
        finally:
            procs.stop_all()

    derive_added_latency(records)
    names = [p.name for p in chosen]
    summary = report.summarize(records, names)
    total = time.monotonic() - began
    result = {
        "machine": report.machine(),
        "command": shlex.join([Path(sys.executable).name, "bench/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "repeat": args.repeat,
        "quick": args.quick,
        "tls": args.tls,
        "settings": dataclasses.asdict(settings),
        "peers": names,
        "skipped": skipped,
        "total_seconds": round(total, 1),
        "summary": summary,
        "targets": report.targets(summary),
        "runs": records,
    }
    text = report.write(result, args.out)
    print(text)
    log(f"results in {args.out} ({total / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
