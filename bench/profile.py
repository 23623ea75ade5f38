"""Where the gateway's CPU goes in one benchmark scenario: py-spy samples of the gateway process, summed by kind.

Runs `bench/run.py --scenarios S --peers gateway --repeat 1` in a child process, attaches py-spy to the gateway
once it has started, and sorts every sample taken while the reactor was handling a socket event into: system
calls (send, recv, epoll_ctl, epoll_wait: the line that makes the call), the gateway's own code, twisted.web
(HTTP server, Agent, headers), Deferreds, and the rest of the reactor (timers, logging context). Then prints
that split and the hottest lines. This is the profile the closing notes of the performance pass quote; samples
outside socket events (start-up imports, idle waits) are left out.

Run: `.venv/bin/python bench/profile.py S5 [--seconds 5] [--tls]` (py-spy is in the `bench` extra).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SYSCALL_FRAMES = {
    "untilConcludes": "send",
    "Connection.writeSomeData": "send",
    "Connection.doRead": "recv",
    "EPollReactor._add": "epoll_ctl",
    "EPollReactor._remove": "epoll_ctl",
    "EPollReactor.doPoll": "epoll_wait",
}


def kind_of(name: str, path: str) -> str:
    """The kind of work a sampled innermost frame is doing."""
    if name in SYSCALL_FRAMES:
        return f"system calls ({SYSCALL_FRAMES[name]})"
    if path.startswith("gateway/") or "/gateway/" in path:
        return "gateway code"
    if "twisted/web/" in path:
        return "twisted.web (HTTP server, Agent, headers)"
    if path.endswith("twisted/internet/defer.py"):
        return "Deferreds"
    if "twisted/" in path:
        return "reactor, timers, logging context, LineReceiver"
    return "other"


def summarize(raw: Path, top: int = 15) -> str:
    """The split by kind and the hottest lines of a py-spy raw (collapsed stacks) file."""
    kinds: collections.Counter[str] = collections.Counter()
    lines: collections.Counter[str] = collections.Counter()
    total = 0
    for text in raw.read_text().splitlines():
        stack, _, count = text.rpartition(" ")
        if "_doReadOrWrite" not in stack:
            continue  # start-up, idle waits, timers
        n = int(count)
        total += n
        frame = stack.split(";")[-1]
        name, _, where = frame.partition(" (")
        path = where.rstrip(")")
        kinds[kind_of(name, path.rsplit(":", 1)[0])] += n
        lines[f"{name} ({path.split('site-packages/')[-1]})"] += n
    if total == 0:
        return "no samples taken during socket events: did the scenario run?"
    out = [f"{total} samples during socket events", ""]
    out += [f"{100 * n / total:5.1f}%  {kind}" for kind, n in kinds.most_common()]
    out += ["", "hottest lines:"]
    out += [f"{100 * n / total:5.1f}%  {line}" for line, n in lines.most_common(top)]
    out += ["", "gateway functions, inclusive (the samples under each, counted once per stack):"]
    out += [f"{100 * n / total:5.1f}%  {name}" for name, n in inclusive(raw).most_common(2 * top)]
    return "\n".join(out)


def inclusive(raw: Path) -> collections.Counter[str]:
    """Samples under each of the gateway's functions (a frame's own time and its callees'), counted once per stack
    however deep the recursion: what each step of the request path costs with everything it calls."""
    under: collections.Counter[str] = collections.Counter()
    for text in raw.read_text().splitlines():
        stack, _, count = text.rpartition(" ")
        if "_doReadOrWrite" not in stack:
            continue
        seen = set()
        for frame in stack.split(";"):
            name, _, where = frame.partition(" (")
            if "gateway/" in where and name not in seen:
                seen.add(name)
                under[f"{name} ({where.rstrip(')').split('gateway/')[-1].rsplit(':', 1)[0]})"] += int(count)
    return under


def find_gateway(scenario: str, timeout: float = 30.0) -> int:
    """The PID of the gateway the harness started for `scenario`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = subprocess.run(
            ["pgrep", "-f", f"twistd --nodaemon.*{scenario}-gateway"], capture_output=True, text=True
        ).stdout.split()
        if found:
            return int(found[0])
        time.sleep(0.05)
    raise SystemExit(f"no gateway process for {scenario} within {timeout:g} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("scenario", help="S1 to S9")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long to sample (the run may end first)")
    parser.add_argument("--tls", action="store_true", help="the scenario over TLS (bench/run.py --tls)")
    parser.add_argument("--save", type=Path, help="keep py-spy's raw (collapsed stacks) file here")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.raw"
        harness = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "run.py"),
                *("--scenarios", args.scenario, "--peers", "gateway"),
                *("--repeat", "1", "--out", tmp),
                *(["--tls"] if args.tls else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            pid = find_gateway(args.scenario)
            subprocess.run(
                [
                    py_spy,
                    "record",
                    "-p",
                    str(pid),
                    "-d",
                    str(int(args.seconds)),
                    "-r",
                    "500",
                    "-f",
                    "raw",
                    "-o",
                    str(raw),
                ],
                capture_output=True,
                check=False,
            )
            _, errors = harness.communicate(timeout=600)
        finally:
            if harness.poll() is None:
                harness.kill()
                harness.wait()
        print("\n".join(line for line in errors.splitlines() if "] repeat" in line))
        print(summarize(raw) if raw.exists() else "py-spy wrote nothing (is it installed? may it ptrace?)")
        if args.save is not None and raw.exists():
            shutil.copyfile(raw, args.save)


if __name__ == "__main__":
    main()
