"""Output of a harness run: medians and gateway/peer ratios, the targets, results.md, results.json, and the PNG plots
of RSS over time in S3 and S4."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.scenarios import SCENARIOS, Settings, cap_text

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = "gateway"

Summary = dict[str, dict[str, dict[str, dict[str, Any]]]]  # scenario -> peer -> metric -> figures


# --- figures -----------------------------------------------------------------------------------------------


def _median(values: list[float | None]) -> float | None:
    """Median, a None (over the cap) counting as larger than any value; None if the median is over the cap."""
    ordered = sorted(math.inf if v is None else v for v in values)
    m = statistics.median(ordered)
    return None if math.isinf(m) else m


def summarize(records: list[dict[str, Any]], peers: list[str]) -> Summary:
    summary: Summary = {}
    for key, scenario in SCENARIOS.items():
        for peer in peers:
            runs = [r for r in records if r["scenario"] == key and r["peer"] == peer and not r["error"]]
            for metric in scenario.metrics:
                values = [r["metrics"][metric.name] for r in runs if metric.name in r["metrics"]]
                if not values:
                    continue
                summary.setdefault(key, {}).setdefault(peer, {})[metric.name] = {
                    "median": _median(values),
                    "runs": values,
                }
    for by_peer in summary.values():
        mine = by_peer.get(GATEWAY, {})
        for figures in by_peer.values():
            for name, fig in figures.items():
                g = mine.get(name, {}).get("median")
                p = fig["median"]
                fig["ratio"] = g / p if g is not None and p is not None and g > 0 and p > 0 else None
    return summary


def fmt(value: float | None, over: str = "-") -> str:
    if value is None:
        return over
    a = abs(value)
    if a >= 100:
        return f"{value:,.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _median_of(summary: Summary, scenario: str, peer: str, metric: str) -> float | None:
    return summary.get(scenario, {}).get(peer, {}).get(metric, {}).get("median")


def _measured(summary: Summary, scenario: str, peer: str, metric: str) -> bool:
    return metric in summary.get(scenario, {}).get(peer, {})


# --- targets (issue 3) -------------------------------------------------------------------------------------


def _at_most(scenario: str, metric: str, limit: float, unit: str, peer: str = GATEWAY) -> Callable[[Summary], Any]:
    def check(s: Summary) -> tuple[str, bool | None]:
        if not _measured(s, scenario, peer, metric):
            return "not measured", None
        v = _median_of(s, scenario, peer, metric)
        return (f"over the cap ({peer})", False) if v is None else (f"{fmt(v)} {unit}", v <= limit)

    return check


def _at_least_ratio(scenario: str, metric: str, other: str, ratio: float) -> Callable[[Summary], Any]:
    def check(s: Summary) -> tuple[str, bool | None]:
        g, o = _median_of(s, scenario, GATEWAY, metric), _median_of(s, scenario, other, metric)
        if g is None or o is None or o == 0:
            return f"not measured (needs {GATEWAY} and {other})", None
        return f"{fmt(g)} / {fmt(o)} {metric} = {g / o:.2f}x", g >= ratio * o

    return check


def _at_most_ratio(scenario: str, metric: str, other: str, ratio: float) -> Callable[[Summary], Any]:
    def check(s: Summary) -> tuple[str, bool | None]:
        g, o = _median_of(s, scenario, GATEWAY, metric), _median_of(s, scenario, other, metric)
        if g is None or o is None or o == 0:
            return f"not measured (needs {GATEWAY} and {other})", None
        return f"{fmt(g)} / {fmt(o)} {metric} = {g / o:.2f}x", g <= ratio * o

    return check


def _at_least(scenario: str, metric: str, limit: float, peer: str) -> Callable[[Summary], Any]:
    def check(s: Summary) -> tuple[str, bool | None]:
        v = _median_of(s, scenario, peer, metric)
        if v is None:
            return f"not measured ({peer})", None
        return f"{fmt(v)} {metric} ({peer})", v >= limit

    return check


TARGETS: list[tuple[str, Callable[[Summary], tuple[str, bool | None]]]] = [
    ("S3 RSS growth <= 2 MiB", _at_most("S3", "RSS growth MiB", 2, "MiB")),
    ("S4 RSS growth <= 10 MiB", _at_most("S4", "RSS growth MiB", 10, "MiB")),
    ("S6 first byte at the origin <= 50 ms", _at_most("S6", "first byte ms", 50, "ms")),
    ("S6 RSS growth <= 2 MiB", _at_most("S6", "RSS growth MiB", 2, "MiB")),
    ("S1 >= 0.8x nginx-stream-64k", _at_least_ratio("S1", "MB/s", "nginx-stream-64k", 0.8)),
    ("S2 >= 0.8x nginx-stream-64k", _at_least_ratio("S2", "MB/s", "nginx-stream-64k", 0.8)),
    ("S5 >= 2x twisted-rpr req/s (one process)", _at_least_ratio("S5", "req/s", "twisted-rpr", 2)),
    (
        "S5 CPU per request <= 0.5x twisted-rpr (the same target read as one process's capacity)",
        _at_most_ratio("S5", "CPU us/req", "twisted-rpr", 0.5),
    ),
    ("S5 with workers = 2 >= 10,000 req/s", _at_least("S5", "req/s", 10_000, "gateway-2w")),
    ("S7 added latency p99 <= 1 ms", _at_most("S7", "added p99 ms", 1, "ms")),
    ("S8 upstream closed <= 20 ms", _at_most("S8", "upstream closed ms", 20, "ms")),
]


def targets(summary: Summary) -> list[dict[str, Any]]:
    out = []
    for name, check in TARGETS:
        figure, met = check(summary)
        out.append({"target": name, "figure": figure, "met": met})
    return out


# --- machine -----------------------------------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def machine() -> dict[str, Any]:
    cpuinfo = meminfo = ""
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
        meminfo = Path("/proc/meminfo").read_text()
    cpu = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    mem = re.search(r"MemTotal:\s*(\d+) kB", meminfo)
    distro = "unknown"
    with contextlib.suppress(OSError):
        m = re.search(r'PRETTY_NAME="([^"]+)"', Path("/etc/os-release").read_text())
        distro = m.group(1) if m else distro
    import twisted

    commit = _first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=12"])
    gateway_version = "unknown"
    with contextlib.suppress(Exception):
        import gateway

        gateway_version = gateway.__version__
    return {
        "cpu": cpu.group(1).strip() if cpu else platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "ram": f"{int(mem.group(1)) / 2**20:.1f} GiB" if mem else "unknown",
        "os": distro,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "gateway": f"{gateway_version} ({commit})",
        "nginx": _first_line(["nginx", "-v"]).removeprefix("nginx version: "),
        "haproxy": _first_line(["haproxy", "-v"]),
        "wrk": _first_line(["wrk", "-v"]).split(" [")[0],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# --- output ------------------------------------------------------------------------------------------------


def _ratio(fig: dict[str, Any] | None) -> str:
    if not fig or fig.get("ratio") is None:
        return "-"
    ratio = fig["ratio"]
    return f"{ratio:.2f}" if ratio >= 0.095 else f"{ratio:.2g}"


def markdown(report: dict[str, Any]) -> str:
    summary: Summary = report["summary"]
    settings = Settings(**report["settings"])
    peers: list[str] = report["peers"]
    out = ["# Benchmark results", ""]
    out += [f"- {k}: {v}" for k, v in report["machine"].items()]
    out += [
        f"- run: {report['repeat']} repeat(s){' (--quick)' if report['quick'] else ''}, peers interleaved in each "
        f"repeat, each peer started fresh for each scenario; {report['total_seconds'] / 60:.1f} min in all",
        f"- command: `{report['command']}`",
        *(
            ["- TLS: every peer serves TLS 1.2/1.3 with one ECDSA P-256 certificate and the gateway's ciphers"]
            if report.get("tls")
            else []
        ),
        "",
        "Medians over the repeats. `gw/peer` is the gateway's median divided by the peer's, for every metric "
        "(above 1 is better for the gateway where higher is better, below 1 where lower is better). RSS is summed "
        "over the proxy's process tree, sampled every 100 ms; its growth is over the RSS right after a warm-up "
        "request. `direct` (no proxy) has no RSS or CPU figures.",
        "",
    ]
    if report.get("tls"):
        out += ["The targets of issue 3 are for plain HTTP: a TLS run is read by its ratios."]
    else:
        out += ["## Targets (issue 3)", "", "| target | figure | met |", "|---|---|---|"]
        for t in report["targets"]:
            verdict = {True: "yes", False: "**no**", None: "-"}[t["met"]]
            out.append(f"| {t['target']} | {t['figure']} | {verdict} |")
    for key, scenario in SCENARIOS.items():
        by_peer = summary.get(key)
        if not by_peer:
            continue
        measures = scenario.measures.format(**report["settings"])
        out += ["", f"## {key}: {scenario.title}", "", measures[0].upper() + measures[1:] + ".", ""]
        header, rule = ["peer"], ["---"]
        for metric in scenario.metrics:
            arrow = {"higher": " (higher is better)", "lower": " (lower is better)"}.get(metric.better or "", "")
            header.append(metric.name + arrow)
            rule.append("--:")
            if metric.better:
                header.append("gw/peer")
                rule.append("--:")
        out += ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
        for peer in peers:
            if peer not in by_peer:
                continue
            row = [peer]
            for metric in scenario.metrics:
                fig = by_peer[peer].get(metric.name)
                over = cap_text(metric, settings, key)
                row.append(fmt(fig["median"], over) if fig else "-")
                if metric.better:
                    row.append("" if peer == GATEWAY else _ratio(fig))
            out.append("| " + " | ".join(row) + " |")
        plot = report.get("plots", {}).get(key)
        if plot:
            out += ["", f"![RSS over time in {key}]({plot})"]
    if report["skipped"]:
        out += ["", "## Peers skipped", ""]
        out += [f"- {name}: {why}" for name, why in report["skipped"].items()]
    problems = [r for r in report["runs"] if r["error"] or r["notes"]]
    if problems:
        out += ["", "## Failures and notes", ""]
        for r in problems:
            text = f"failed: {r['error']}" if r["error"] else "; ".join(r["notes"])
            out.append(f"- {r['scenario']} {r['peer']} (repeat {r['repeat'] + 1}): {text}")
    out += ["", "## Every run", "", "| scenario | peer | metric | runs |", "|---|---|---|---|"]
    for key, by_peer in summary.items():
        for peer in peers:
            for name, fig in by_peer.get(peer, {}).items():
                metric = next(m for m in SCENARIOS[key].metrics if m.name == name)
                over = cap_text(metric, settings, key)
                out.append(f"| {key} | {peer} | {name} | {', '.join(fmt(v, over) for v in fig['runs'])} |")
    return "\n".join(out) + "\n"


def plot_rss(report: dict[str, Any], out: Path) -> dict[str, str]:
    """rss-S3.png and rss-S4.png: RSS growth over time, one line per peer (its run with the median growth)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("skipping the RSS plots: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return {}
    made = {}
    for key in ("S3", "S4"):
        lines = []
        for peer in report["peers"]:
            runs = [
                r
                for r in report["runs"]
                if r["scenario"] == key and r["peer"] == peer and r["series"] and "RSS growth MiB" in r["metrics"]
            ]
            if not runs:
                continue
            runs.sort(key=lambda r: r["metrics"]["RSS growth MiB"])
            lines.append((peer, runs[len(runs) // 2]["series"]))
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
        for peer, series in lines:
            ax.plot([t for t, _ in series], [v for _, v in series], label=peer, linewidth=2 if peer == GATEWAY else 1.2)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel("seconds since the measured request(s) started")
        ax.set_ylabel("RSS growth, MiB (linear below 1, log above)")
        ax.set_title(f"{key}: {SCENARIOS[key].title}: the proxy's RSS over its baseline")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
        fig.tight_layout()
        name = f"rss-{key}.png"
        fig.savefig(out / name)
        plt.close(fig)
        made[key] = name
    return made


def write(report: dict[str, Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = plot_rss(report, out)
    text = markdown(report)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    return text
