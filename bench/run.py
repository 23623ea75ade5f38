"""First benchmark of the gateway, side by side with Twisted's ReverseProxyResource, on loopback.

Scenarios (each proxy is started fresh for each run; the origin serves a file from /dev/shm with sendfile, so it
is not the bottleneck):
* `throughput`: one client GETs a 1 GiB body as fast as it can: MB/s, and the proxy's CPU seconds per GiB;
* `slow_download`: one client reads a 1 GiB body at 1 MB/s for 15 s: the proxy's peak RSS growth;
* `slow_upload`: one client uploads a 1 GiB body to an origin reading at 5 MB/s, for 15 s: the proxy's peak RSS
  growth, and how long the first body byte took to reach the origin.
RSS is sampled every 100 ms from /proc (summed over the proxy's process tree) and compared to its value just
before the measured request, after a warm-up request. Medians over `--repeat` runs, peers interleaved.

Run: `.venv/bin/python bench/run.py [--repeat 3] [--seconds 15] [--size 1GiB] [--out bench/results]`
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MiB = 1024 * 1024
GiB = 1024 * MiB
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- processes ---------------------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)


def _read_port(popen: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """The port a child announces as a JSON line {"port": N} on its stdout."""
    assert popen.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = popen.stdout.readline()
        if not line:
            break
        with contextlib.suppress(ValueError):
            return int(json.loads(line)["port"])
    raise RuntimeError(f"child {popen.args} did not announce its port")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, popen: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"{popen.args} exited with {popen.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def start_origin(body: Path, events: Path) -> Proc:
    popen = subprocess.Popen(
        [sys.executable, str(HERE / "origin.py"), "--file", str(body), "--events", str(events)],
        stdout=subprocess.PIPE,
    )
    return Proc("origin", popen, _read_port(popen))


def start_gateway(origin_port: int, workdir: Path) -> Proc:
    port = _free_port()
    config = workdir / "gateway.toml"
    config.write_text(
        f"""
[[listeners]]
host = "127.0.0.1"
port = {port}

[upstreams.origin]
url = "http://127.0.0.1:{origin_port}"

[[routes]]
name = "all"
path_prefix = "/"
upstream = "origin"
[routes.limits]
max_request_body_bytes = "8GiB"
"""
    )
    twistd = Path(sys.executable).parent / "twistd"
    popen = subprocess.Popen(
        [
            str(twistd),
            "--nodaemon",
            "--pidfile=",
            f"--logfile={workdir / 'gateway.log'}",
            "gateway",
            "--config",
            str(config),
        ],
        stdout=subprocess.DEVNULL,
    )
    _wait_listening(port, popen)
    return Proc("gateway", popen, port)


def start_rpr(origin_port: int, workdir: Path) -> Proc:
    popen = subprocess.Popen(
        [sys.executable, str(HERE / "rpr.py"), "--origin-port", str(origin_port)],
        stdout=subprocess.PIPE,
        stderr=open(workdir / "rpr.log", "wb"),  # noqa: SIM115
    )
    return Proc("twisted-rpr", popen, _read_port(popen))


# --- measurements ------------------------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
            for child in children:
                pids.extend(_tree(int(child)))
    return pids


def rss_bytes(pid: int) -> int:
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{p}/status").read_text())
            if m:
                total += int(m.group(1)) * 1024
    return total


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


class RssSampler:
    """Samples a process tree's RSS every 100 ms on a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = rss_bytes(pid)
        self.peak = self.baseline
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.monotonic()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = rss_bytes(self.pid)
            self.samples.append((time.monotonic() - self._start, rss))
            self.peak = max(self.peak, rss)
            self._stop.wait(0.1)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.baseline


def _request_head(method: str, path: str, port: int, extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode()


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError(f"connection closed before a response head: {data[:200]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def fetch(port: int, path: str, *, limit: int | None = None) -> int:
    """GET `path` and read the body as fast as possible (or only `limit` bytes); returns the bytes read."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(_request_head("GET", path, port, "Connection: close\r\n"))
        head, rest = _read_head(sock)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected response {head[:100]!r}")
        m = re.search(rb"(?i)content-length:\s*(\d+)", head)
        length = int(m.group(1)) if m else 0
        if limit is not None:
            length = min(length, limit)
        got = len(rest)
        buf = bytearray(4 * MiB)
        view = memoryview(buf)
        while got < length:
            n = sock.recv_into(view)
            if not n:
                raise RuntimeError(f"body cut short at {got} of {length} bytes")
            got += n
        return got


def slow_read(port: int, path: str, rate: int, seconds: float) -> int:
    """GET `path` and read at `rate` bytes/s for `seconds`, then hang up; returns the bytes read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(_request_head("GET", path, port))
        _head, rest = _read_head(sock)
        got = len(rest)
        step = rate // 50
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            ahead = got / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
            data = sock.recv(step)
            if not data:
                break
            got += len(data)
        return got
    finally:
        sock.close()


def upload(port: int, path: str, size: int, seconds: float) -> tuple[float, int]:
    """PUT a `size`-byte body as fast as accepted for `seconds`, then hang up; returns (start time, bytes sent)."""
    sock = socket.socket()
    sock.connect(("127.0.0.1", port))
    sock.settimeout(0.5)
    block = os.urandom(MiB)
    sent = 0
    started = time.time()
    try:
        sock.sendall(_request_head("PUT", path, port, f"Content-Length: {size}\r\n"))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and sent < size:
            try:
                sent += sock.send(block[: min(len(block), size - sent)])
            except TimeoutError:
                continue
        return started, sent
    finally:
        sock.close()


# --- scenarios ---------------------------------------------------------------------------------------------


@dataclass
class Bench:
    size: int
    seconds: float
    workdir: Path
    body: Path
    events: Path
    results: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def record(self, scenario: str, metric: str, value: float) -> None:
        self.results.setdefault(f"{scenario}", {}).setdefault(metric, []).append(value)

    @contextlib.contextmanager
    def peer(self, name: str) -> Iterator[tuple[Proc, Proc]]:
        self.events.write_text("")
        origin = start_origin(self.body, self.events)
        proxy: Proc | None = None
        try:
            if name == "gateway":
                proxy = start_gateway(origin.port, self.workdir)
            elif name == "twisted-rpr":
                proxy = start_rpr(origin.port, self.workdir)
            else:
                proxy = origin
            yield origin, proxy
        finally:
            if proxy is not None and proxy is not origin:
                proxy.stop()
            origin.stop()

    def warm_up(self, proxy: Proc) -> None:
        fetch(proxy.port, "/file", limit=4 * MiB)
        time.sleep(0.3)

    def throughput(self, name: str) -> None:
        with self.peer(name) as (_origin, proxy):
            self.warm_up(proxy)
            cpu0 = cpu_seconds(proxy.pid)
            t0 = time.monotonic()
            got = fetch(proxy.port, "/file")
            elapsed = time.monotonic() - t0
            cpu = cpu_seconds(proxy.pid) - cpu0
            self.record(f"throughput/{name}", "MB/s", got / elapsed / 1e6)
            self.record(f"throughput/{name}", "CPU s/GiB", cpu / (got / GiB))

    def slow_download(self, name: str) -> None:
        with self.peer(name) as (_origin, proxy):
            self.warm_up(proxy)
            sampler = RssSampler(proxy.pid)
            got = slow_read(proxy.port, "/file", 1_000_000, self.seconds)
            time.sleep(0.2)
            growth = sampler.stop()
            self.record(f"slow_download/{name}", "RSS growth MiB", growth / MiB)
            self.record(f"slow_download/{name}", "client read MB", got / 1e6)

    def slow_upload(self, name: str) -> None:
        with self.peer(name) as (_origin, proxy):
            self.warm_up(proxy)
            sampler = RssSampler(proxy.pid)
            started, sent = upload(proxy.port, "/sink?rate=5000000", self.size, self.seconds)
            time.sleep(0.2)
            growth = sampler.stop()
            self.record(f"slow_upload/{name}", "RSS growth MiB", growth / MiB)
            self.record(f"slow_upload/{name}", "client sent MB", sent / 1e6)
            first = _first_body_byte(self.events, timeout=5)
            if first is not None:
                self.record(f"slow_upload/{name}", "first byte at origin ms", (first - started) * 1000)


def _first_body_byte(events: Path, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in events.read_text().splitlines():
            event = json.loads(line)
            if event.get("length", 0) > MiB and event.get("first_body_byte_at"):
                return float(event["first_body_byte_at"])
        time.sleep(0.1)
    return None


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1) if m else cpu
    import twisted

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def table(results: dict[str, dict[str, list[float]]]) -> str:
    lines = ["| scenario | peer | metric | median | runs |", "|---|---|---|---:|---|"]
    for key, metrics in results.items():
        scenario, peer = key.split("/")
        for metric, values in metrics.items():
            runs = ", ".join(f"{v:.1f}" for v in values)
            lines.append(f"| {scenario} | {peer} | {metric} | {statistics.median(values):.1f} | {runs} |")
    return "\n".join(lines)


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+)(GiB|MiB|)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text}")
    return int(m.group(1)) * {"GiB": GiB, "MiB": MiB, "": 1}[m.group(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--size", type=_size, default=GiB)
    parser.add_argument("--scenarios", default="throughput,slow_download,slow_upload")
    parser.add_argument("--peers", default="gateway,twisted-rpr,direct")
    parser.add_argument("--out", type=Path, default=None, help="directory for results.md and results.json")
    args = parser.parse_args()

    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        body = shm / f"gateway-bench-{os.getpid()}.bin"
        try:
            with open(body, "wb") as f:
                block = os.urandom(MiB)
                for _ in range(args.size // MiB):
                    f.write(block)
            bench = Bench(args.size, args.seconds, Path(tmp), body, Path(tmp) / "events.jsonl")
            peers = args.peers.split(",")
            plan: list[tuple[str, Callable[[str], None], str]] = []
            for scenario in args.scenarios.split(","):
                run = getattr(bench, scenario)
                # Uploads through ReverseProxyResource are spooled to a temporary file before anything is sent
                # upstream; the comparison that matters there is against the target, not that peer.
                scenario_peers = [p for p in peers if not (scenario == "slow_upload" and p == "twisted-rpr")]
                for _ in range(args.repeat):
                    plan.extend((scenario, run, p) for p in scenario_peers)
            for scenario, run, peer in plan:
                print(f"... {scenario} via {peer}", file=sys.stderr, flush=True)
                run(peer)
        finally:
            body.unlink(missing_ok=True)

    report = {"machine": machine(), "size": args.size, "seconds": args.seconds, "results": bench.results}
    text = table(bench.results)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        described = "\n".join(f"- {k}: {v}" for k, v in report["machine"].items())
        (args.out / "results.md").write_text(f"# Benchmark results\n\n{described}\n\n{text}\n")


if __name__ == "__main__":
    main()
