"""Admission benchmark: what authentication costs the gateway, on loopback, every process stopped by PID.

* A1: small requests (`wrk -t2 -c64 --latency`, the 100-byte response of S5) through ONE gateway process with
  three routes to the same origin: `/open` (`auth = "anonymous"`), `/key` (an `api_key` method) and `/jwt` (a
  `jwt` method, RS256, one long-lived token, so after its first request the verified-token cache answers).
  Per route: req/s, p50, p99 and the gateway's CPU microseconds per request; key/open and jwt/open ratios.
* A2: the latency of an event stream (S7's measurement: one event per 50 ms, each event's latency from the
  origin's send to the client's receive) through a gateway, without logins and while a load generator (a process
  of its own) makes 50 HTTP Basic logins per second against another route of the same gateway, every login a
  bcrypt check (cost 8, 64 consumers, `cache_ttl = 0`, so the cache never answers); the same with a method of
  one thread; and, as a control, the stream read straight from the origin without and with the same logins.

Run: `.venv/bin/python bench/admission.py [--repeat N] [--quick] [--out DIR]` (default out: bench/out/). It
writes DIR/admission.md and DIR/admission.json; progress goes to standard error, one line per run. See the
"Admission benchmark" section of bench/README.md.

One gateway process is started per repeat for A1 (all three routes served by it, measured in turn, the order
rotating between repeats: the routes are compared on the same process, warmed the same way, while each repeat
starts from a fresh process as the main harness does), and one per repeat for A2 (all five phases, their order
rotating between repeats).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import queue
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: bench/admission.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import clients, origins, peers, procs, report
from bench.measure import CLOCK_TICKS, cpu_seconds
from bench.scenarios import Context, Settings, percentile, s7

HERE = Path(__file__).resolve().parent
TWISTD = peers.VENV_BIN / "twistd"
ROUTES = ("open", "key", "jwt")
GW_QUIET, GW_LOGINS, GW_LOGINS_1T, DIRECT_QUIET, DIRECT_LOGINS = (
    "gateway, no logins",
    "gateway, logins",
    "gateway, logins on a thread per core",
    "direct, no logins",
    "direct, logins",
)
PHASES: dict[str, tuple[bool, str | None]] = {
    # phase: (the stream goes through the gateway?, the route the logins go to, or None)
    GW_QUIET: (True, None),
    GW_LOGINS: (True, "/login/small"),  # the method's default threads: one fewer than the cores
    GW_LOGINS_1T: (True, "/login1/small"),  # a method with a thread per core
    DIRECT_QUIET: (False, None),  # the control: the stream straight from the origin, the same logins
    DIRECT_LOGINS: (False, "/login/small"),
}
ADDED = {  # what the logins add to the stream's latency: (with, without)
    "gateway": (GW_LOGINS, GW_QUIET),
    "gateway, logins on a thread per core": (GW_LOGINS_1T, GW_QUIET),
    "direct (control)": (DIRECT_LOGINS, DIRECT_QUIET),
}
LOGIN_RATE = 50.0  # Basic logins per second in A2
LOGIN_CONSUMERS = 64  # distinct consumers, each with its own bcrypt hash
LOGIN_WORKERS = 8  # connections of the load generator (logins in flight at most)
BCRYPT_COST = 8
ISSUER = "https://id.bench.invalid/"
AUDIENCE = "gateway-bench"
JWT_SUBJECT = "bench-jwt-user"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A precondition of a measurement does not hold: the benchmark stops rather than measure the wrong thing."""


# --- configs -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BenchCredentials:
    """The credentials of a run, and the files the configs point at."""

    api_key: str
    jwt_token: str
    public_key_file: Path
    logins: list[tuple[str, str, str]]  # (consumer, password, bcrypt hash)


def make_secrets(workdir: Path) -> BenchCredentials:
    import bcrypt
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from gateway.auth.apikeys import mint_key

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_key_file = workdir / "jwt-public.pem"
    public_key_file.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    now = int(time.time())
    token = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": JWT_SUBJECT, "iat": now, "nbf": now - 60, "exp": now + 86400},
        private,
        algorithm="RS256",
    )
    logins = []
    for i in range(LOGIN_CONSUMERS):
        password = secrets.token_urlsafe(12)
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=BCRYPT_COST)).decode()
        logins.append((f"login-{i:02d}", password, hashed))
    return BenchCredentials(mint_key(), token, public_key_file, logins)


HEAD = """# written by bench/admission.py for one run
[access_log]
path = ""

[[listeners]]
host = "127.0.0.1"
port = {port}
backlog = 1024
"""


def a1_config(port: int, origin_port: int, s: BenchCredentials, with_jwt: bool) -> str:
    from gateway.auth.apikeys import hash_key

    routes = [("open", '"anonymous"'), ("key", '["keys"]')] + ([("jwt", '["corp"]')] if with_jwt else [])
    text = HEAD.format(port=port) + f'\n[upstreams.origin]\nurl = "http://127.0.0.1:{origin_port}"\n'
    for name, auth in routes:
        text += f"""
[[routes]]
name = "{name}"
auth = {auth}
path_prefix = "/{name}"
strip_prefix = true
upstream = "origin"
"""
    text += f"""
[auth.keys]
type = "api_key"

[consumers.bench-key]
api_keys = ["{hash_key(s.api_key)}"]
scopes = ["bench"]
"""
    if with_jwt:
        text += f"""
[auth.corp]
type = "jwt"
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
algorithms = ["RS256"]
public_key_file = "{s.public_key_file}"
"""
    return text


def a2_config(port: int, events_port: int, small_port: int, s: BenchCredentials) -> str:
    text = (
        HEAD.format(port=port)
        + f"""
[upstreams.events]
url = "http://127.0.0.1:{events_port}"

[upstreams.small]
url = "http://127.0.0.1:{small_port}"

[[routes]]
name = "events"
auth = "anonymous"
path_prefix = "/events"
upstream = "events"

[[routes]]
name = "login"
auth = ["login"]
path_prefix = "/login"
strip_prefix = true
upstream = "small"

[[routes]]
name = "login1"
auth = ["login1"]
path_prefix = "/login1"
strip_prefix = true
upstream = "small"

[auth.login]
type = "basic"
cache_ttl = 0  # every login is a bcrypt check (64 consumers as well: no two logins in a row are the same)

[auth.login1]
type = "basic"
cache_ttl = 0
threads = {os.cpu_count() or 2}
"""
    )
    for name, _password, hashed in s.logins:
        text += f'\n[consumers.{name}]\npassword = "{hashed}"\n'
    return text


def check_config(config: Path) -> str | None:
    """`twistd gateway --config F --check`: None if the gateway accepts the config, else what it said."""
    try:
        done = subprocess.run(
            [str(TWISTD), "gateway", "--config", str(config), "--check"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"twistd gateway --check failed: {e}"
    if done.returncode == 0:
        return None
    said = (done.stderr.strip() or done.stdout.strip()).splitlines()
    return said[-1] if said else f"exit status {done.returncode}"


def start_gateway(name: str, text: str, workdir: Path) -> peers.Running:
    """A gateway under twistd on `text` (its port is in it), as the main harness starts its `gateway` peer."""
    port = int(re.search(r"^port = (\d+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    config = workdir / "gateway.toml"
    config.write_text(text)
    if why := check_config(config):
        raise BenchError(f"the gateway rejects the {name} config: {why}")
    argv = [str(TWISTD), "--nodaemon", "--pidfile=", "--logfile=-", "gateway", "--config", str(config)]
    proc = procs.start(name, argv, workdir / "gateway.log")
    procs.wait_listening(port, proc)
    return peers.Running(name, port, proc)


# --- one request, and the status checks --------------------------------------------------------------------


def status_of(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    """The status and headers of a GET (its body read and dropped)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + "Connection: close\r\n"
    with clients.connect(port, timeout=10.0) as sock:
        sock.sendall(clients.request("GET", path, port, extra))
        head = clients.read_head(sock)
        with contextlib.suppress(OSError):
            for _ in range(1000):
                if not sock.recv(65536):
                    break
    return head.status, head.headers


def expect_status(port: int, path: str, want: int, headers: dict[str, str] | None, what: str) -> None:
    got, answer = status_of(port, path, headers)
    if got != want:
        raise BenchError(f"{what}: GET {path} answered {got}, not {want} ({answer}): nothing worth measuring")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _machine_seconds() -> tuple[float, float]:
    """CPU time of the whole machine so far (/proc/stat, every core): (user + system, stolen by the hypervisor)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(fields[0:3]) / CLOCK_TICKS, fields[7] / CLOCK_TICKS
    return 0.0, 0.0


class OtherCpu:
    """How busy processes outside the benchmark kept the machine during a measurement: the machine's user and
    system time minus that of `pids` (the gateway, the origins, the login generator: their trees), this process and
    its finished children (wrk), in percent of one core (a few percent is accounting slop); and the time the
    hypervisor took from this machine's cores (steal), in percent of one core."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self._start = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        t = os.times()
        known = sum(cpu_seconds(pid) for pid in self.pids) + t.user + t.system + t.children_user + t.children_system
        busy, steal = _machine_seconds()
        return time.monotonic(), busy, known, steal

    def percent(self) -> tuple[float, float]:
        """(other processes, steal), each in percent of one core, since this was made."""
        end = self._read()
        elapsed = end[0] - self._start[0]
        if elapsed <= 0:
            return 0.0, 0.0
        other = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return max(0.0, other / elapsed * 100), (end[3] - self._start[3]) / elapsed * 100


@dataclasses.dataclass
class Quiet:
    """The machine is shared: each run starts once processes outside the benchmark and the hypervisor's steal
    take less than `max_other` percent of a core (waiting at most `wait` seconds), and a run during which they
    took more is done again, up to `tries` times in all (the last attempt is kept, with a note). `max_other` 0
    turns this off."""

    max_other: float = 10.0
    tries: int = 3
    wait: float = 120.0

    def settle(self, ours: list[int]) -> float | None:
        """Seconds waited for a quiet second, or None if the machine stayed busy for `wait` seconds."""
        began = time.monotonic()
        while True:
            other = OtherCpu(ours)
            time.sleep(1.0)
            if sum(other.percent()) < self.max_other:
                return time.monotonic() - began
            if time.monotonic() - began > self.wait:
                return None

    def measure(self, run: Callable[[], dict[str, Any]], ours: list[int]) -> dict[str, Any]:
        if not self.max_other:
            return run()
        busy: list[float] = []
        for attempt in range(1, self.tries + 1):
            if self.settle(ours) is None:
                log(f"  processes outside the benchmark kept over {self.max_other:g}% of a core for {self.wait:g} s")
            record = run()
            other = record["metrics"].get("other CPU %")
            if record["error"] or other is None or other + record["metrics"].get("steal %", 0.0) <= self.max_other:
                break
            other += record["metrics"].get("steal %", 0.0)
            busy.append(other)
            if attempt < self.tries:
                log(
                    f"  again: {record['test']} {record['case']} ran while processes outside the benchmark (or the "
                    f"hypervisor) took {other:.0f}% of a core"
                )
        record["attempts"] = attempt
        if busy:
            record["notes"].append(
                f"attempt {attempt}; processes outside the benchmark (or the hypervisor) took "
                + ", ".join(f"{v:.0f}%" for v in busy)
                + f" of a core during the attempt(s) over {self.max_other:g}%"
            )
        return record


# --- A1: small requests --------------------------------------------------------------------------------------


def wrk_run(port: int, path: str, header: str | None, seconds: float, connections: int = 64) -> clients.Wrk:
    """clients.wrk with one request header (`-H`)."""
    exe = shutil.which("wrk")
    if exe is None:
        raise clients.ClientError("wrk is not installed")
    argv = [exe, "-t2", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "5s"]
    if header:
        argv += ["-H", header]
    argv.append(f"http://{clients.HOST}:{port}{path}")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if done.returncode != 0:
        raise clients.ClientError(f"wrk exited with {done.returncode}: {done.stderr.strip()[-300:]}")
    return clients.parse_wrk(done.stdout)


def a1_headers(s: BenchCredentials) -> dict[str, dict[str, str]]:
    return {
        "open": {},
        "key": {"Authorization": f"Bearer {s.api_key}"},
        "jwt": {"Authorization": f"Bearer {s.jwt_token}"},
    }


def a1_check(port: int, routes: list[str], s: BenchCredentials) -> None:
    """Each route answers 200 with its credential, 401 without one and with a wrong one (the open route 200)."""
    creds = a1_headers(s)
    expect_status(port, "/open/small", 200, None, "A1 open")
    for route in routes:
        if route == "open":
            continue
        expect_status(port, f"/{route}/small", 200, creds[route], f"A1 {route} with its credential")
        expect_status(port, f"/{route}/small", 401, None, f"A1 {route} without a credential")
    if "key" in routes:
        expect_status(port, "/key/small", 401, {"Authorization": "Bearer gwk_not-a-key"}, "A1 key, a wrong key")
    if "jwt" in routes:
        head, payload, sig = s.jwt_token.split(".")
        forged = f"{head}.{payload}.{sig[:-4]}{'AAAA' if sig[-4:] != 'AAAA' else 'BBBB'}"
        expect_status(port, "/jwt/small", 401, {"Authorization": f"Bearer {forged}"}, "A1 jwt, a bad signature")


def measured_wrk(
    gw: peers.Running, path: str, header: str | None, seconds: float, origin_pids: list[int]
) -> tuple[clients.Wrk, dict[str, float | None]]:
    """One wrk run against `path` of `gw`, and its figures: req/s, p50, p99, the gateway's CPU microseconds per
    request, and the CPU share taken meanwhile by processes outside the benchmark and by the hypervisor."""
    other = OtherCpu([gw.pid, *origin_pids])  # type: ignore[list-item]
    cpu0 = cpu_seconds(gw.pid)  # type: ignore[arg-type]
    result = wrk_run(gw.port, path, header, seconds)
    cpu = cpu_seconds(gw.pid) - cpu0  # type: ignore[arg-type]
    other_percent, steal_percent = other.percent()
    gw.check_alive()
    return result, {
        "req/s": result.requests_per_s,
        "p50 ms": result.p50_ms,
        "p99 ms": result.p99_ms,
        "CPU us/req": cpu / result.requests * 1e6 if result.requests else None,
        "other CPU %": other_percent,
        "steal %": steal_percent,
    }


def a1_run(
    gw: peers.Running, route: str, header: str | None, seconds: float, origin_pids: list[int], repeat: int
) -> dict[str, Any]:
    """One wrk run against one route: req/s, p50, p99, the gateway's CPU per request."""
    record: dict[str, Any] = {"test": "A1", "case": route, "repeat": repeat, "metrics": {}, "notes": [], "error": None}
    started = time.monotonic()
    try:
        result, record["metrics"] = measured_wrk(gw, f"/{route}/small", header, seconds, origin_pids)
        non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", result.output)
        if non2xx:
            record["error"] = f"wrk saw {non2xx.group(1)} non-2xx answers of {result.requests}"
        elif result.errors:
            record["notes"].append(f"wrk counted {result.errors} socket errors")
    except Exception as e:
        record["error"] = f"{type(e).__name__}: {e}"
    record["seconds"] = round(time.monotonic() - started, 2)
    return record


def a1_repeat(
    repeat: int,
    routes: list[str],
    s: BenchCredentials,
    started: origins.Origins,
    workdir: Path,
    seconds: float,
    quiet: Quiet,
    progress: Any,
) -> list[dict[str, Any]]:
    origin_port = started.files.port
    origin_pids = sorted({started.files.proc.pid, started.py.proc.pid})
    order = routes[repeat % len(routes) :] + routes[: repeat % len(routes)]
    creds = a1_headers(s)
    text = a1_config(procs.free_port(), origin_port, s, "jwt" in routes)
    gw = start_gateway(f"A1-gateway-{repeat}", text, workdir)
    records = []
    try:
        a1_check(gw.port, routes, s)
        for route in order:  # warm-up: the upstream pool, the token cache, the code paths of each route
            header = next((f"{k}: {v}" for k, v in creds[route].items()), None)
            wrk_run(gw.port, f"/{route}/small", header, 1.0)
        time.sleep(0.3)
        for route in order:
            header = next((f"{k}: {v}" for k, v in creds[route].items()), None)
            record = quiet.measure(
                lambda route=route, header=header: a1_run(gw, route, header, seconds, origin_pids, repeat),
                [gw.pid, *origin_pids],  # type: ignore[list-item]
            )
            records.append(record)
            progress(record)
        time.sleep(0.2)
        a1_check(gw.port, routes, s)  # still admitting and refusing as at the start
    finally:
        gw.stop()
    return records


# --- A2: event-stream latency while Basic logins are checked -------------------------------------------------


def login_load(spec_file: Path) -> int:
    """The load generator of A2 (run as a process of its own, so it shares no GIL with the event-stream reader):
    Basic logins at a fixed rate (open loop: login i is due at t0 + i / rate), each by the next consumer in turn,
    on LOGIN_WORKERS keep-alive connections, until the stop file appears or the time bound passes. Writes every
    login (due, sent, done, status) as JSON to the spec's `out`."""
    spec = json.loads(spec_file.read_text())
    port, path, rate, bound = spec["port"], spec["path"], spec["rate"], spec["max_seconds"]
    users: list[list[str]] = spec["users"]
    stop_file = Path(spec["stop"])
    jobs: queue.Queue[tuple[int, float] | None] = queue.Queue()
    done: list[tuple[float, float, float, int]] = []
    lock = threading.Lock()

    def worker() -> None:
        sock: socket.socket | None = None
        while True:
            job = jobs.get()
            if job is None:
                break
            i, due = job
            user, password = users[i % len(users)]
            sent = time.monotonic()
            status = 0
            try:
                if sock is None:
                    sock = clients.connect(port, timeout=10.0)
                sock.sendall(clients.request("GET", path, port, f"Authorization: {basic(user, password)}\r\n"))
                head = clients.read_head(sock)
                status = head.status
                body = len(head.rest)
                for _ in range(1000):
                    if body >= (head.length or 0):
                        break
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    body += len(chunk)
                if head.length is None or head.headers.get("connection", "").lower() == "close":
                    sock.close()
                    sock = None
            except (OSError, clients.ClientError):
                status = -1  # a socket error
                if sock is not None:
                    sock.close()
                sock = None
            with lock:
                done.append((due, sent, time.monotonic(), status))
        if sock is not None:
            sock.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(LOGIN_WORKERS)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    i = 0
    while not stop_file.exists() and time.monotonic() - t0 < bound:
        due = t0 + i / rate
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, 0.05))
            continue
        jobs.put((i, due))
        i += 1
    for _ in threads:
        jobs.put(None)
    for t in threads:
        t.join(timeout=15)
    with lock:
        result = {"t0": t0, "scheduled": i, "logins": sorted(done)}
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


def a2_check(port: int, s: BenchCredentials) -> None:
    """Each login route answers 200 to a right password, 401 without one and to a wrong one."""
    user, password, _ = s.logins[0]
    for path in ("/login/small", "/login1/small"):
        expect_status(port, path, 200, {"Authorization": basic(user, password)}, "A2 login, right password")
        expect_status(port, path, 401, None, "A2 login without credentials")
        expect_status(port, path, 401, {"Authorization": basic(user, password + "x")}, "A2 login, wrong password")
    expect_status(port, "/events?interval=0.05&seconds=0.1", 200, None, "A2 event stream")


def a2_phase(
    ctx: Context, gw: peers.Running, phase: str, s: BenchCredentials, workdir: Path, repeat: int
) -> dict[str, Any]:
    record: dict[str, Any] = {"test": "A2", "case": phase, "repeat": repeat, "metrics": {}, "notes": [], "error": None}
    started = time.monotonic()
    load = None
    via_gateway, login_path = PHASES[phase]
    rundir = Path(tempfile.mkdtemp(prefix=re.sub(r"[^a-z0-9]+", "-", phase) + "-", dir=workdir))
    try:
        if login_path is not None:
            spec = {
                "port": gw.port,
                "path": login_path,
                "rate": LOGIN_RATE,
                "max_seconds": ctx.settings.s7_seconds + 30,
                "users": [[u, p] for u, p, _ in s.logins],
                "stop": str(rundir / "stop"),
                "out": str(rundir / "logins.json"),
            }
            (rundir / "spec.json").write_text(json.dumps(spec))
            argv = [sys.executable, str(Path(__file__).resolve()), "--login-load", str(rundir / "spec.json")]
            load = procs.start(f"A2-logins-{repeat}", argv, rundir / "logins.log")
            time.sleep(1.5)  # the generator's start-up, and the first second of logins
            if not load.alive():
                raise BenchError(f"the login generator exited: {load.log_tail()}")
        origin_pids = sorted({ctx.origins.files.proc.pid, ctx.origins.py.proc.pid})
        other = OtherCpu([gw.pid, *origin_pids, *([load.pid] if load else [])])  # type: ignore[list-item]
        cpu0 = cpu_seconds(gw.pid)  # type: ignore[arg-type]
        window0 = time.monotonic()
        measured = s7(ctx, gw if via_gateway else peers.Running("direct", ctx.origins.py.port, None))
        window1 = time.monotonic()
        cpu = cpu_seconds(gw.pid) - cpu0  # type: ignore[arg-type]
        other_percent, steal_percent = other.percent()
        gw.check_alive()
        record["metrics"] = dict(measured.metrics)
        record["notes"] += measured.notes
        record["metrics"]["gateway CPU s"] = cpu
        record["metrics"]["other CPU %"] = other_percent
        record["metrics"]["steal %"] = steal_percent
        if load is not None:
            (rundir / "stop").touch()
            load.popen.wait(timeout=30)
            out = rundir / "logins.json"
            if not out.exists():
                raise BenchError(f"the login generator wrote nothing: {load.log_tail()}")
            logins = json.loads(out.read_text())["logins"]
            inside = [x for x in logins if window0 <= x[2] <= window1]
            statuses = Counter(x[3] for x in logins)
            record["metrics"]["logins/s"] = len(inside) / (window1 - window0)
            waits = [x[2] - x[1] for x in logins]
            lags = [x[1] - x[0] for x in logins]
            if waits:
                record["metrics"]["login p50 ms"] = percentile(waits, 50) * 1000
                record["metrics"]["login p99 ms"] = percentile(waits, 99) * 1000
                record["metrics"]["login start lag p99 ms"] = percentile(lags, 99) * 1000
            if inside:
                record["metrics"]["gateway CPU ms/login"] = cpu / len(inside) * 1000  # minus the stream's share
            record["statuses"] = {str(k): v for k, v in sorted(statuses.items())}
            record["notes"].append(
                f"{len(logins)} logins, statuses "
                + ", ".join(f"{'socket error' if k == -1 else k}: {v}" for k, v in sorted(statuses.items()))
            )
            if set(statuses) != {200}:
                record["error"] = f"logins not all 200: {record['statuses']}"
    except Exception as e:
        record["error"] = f"{type(e).__name__}: {e}"
        if not isinstance(e, (BenchError, clients.ClientError, RuntimeError, OSError)):
            traceback.print_exc()
    finally:
        if load is not None:
            load.stop()
    record["seconds"] = round(time.monotonic() - started, 2)
    return record


def a2_repeat(
    repeat: int, ctx: Context, s: BenchCredentials, workdir: Path, quiet: Quiet, progress: Any
) -> list[dict[str, Any]]:
    phases = list(PHASES)
    shift = repeat % len(phases)
    order = phases[shift:] + phases[:shift]
    text = a2_config(procs.free_port(), ctx.origins.py.port, ctx.origins.files.port, s)
    gw = start_gateway(f"A2-gateway-{repeat}", text, workdir)
    records = []
    try:
        a2_check(gw.port, s)
        clients.get(gw.port, "/events?interval=0.05&seconds=0.2&tag=warm-up", timeout=10)
        time.sleep(0.3)
        ours = [gw.pid, ctx.origins.files.proc.pid, ctx.origins.py.proc.pid]
        for phase in order:
            record = quiet.measure(lambda phase=phase: a2_phase(ctx, gw, phase, s, workdir, repeat), ours)  # type: ignore[misc]
            records.append(record)
            progress(record)
            time.sleep(0.5)
    finally:
        gw.stop()
    return records


# --- summary and report --------------------------------------------------------------------------------------


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"A1": {}, "A2": {}, "A1 ratios": {}, "A2 added": {}}
    for r in records:
        if r["error"]:
            continue
        for name, value in r["metrics"].items():
            fig = summary[r["test"]].setdefault(r["case"], {}).setdefault(name, {"runs": []})
            fig["runs"].append(value)
    for by_case in (summary["A1"], summary["A2"]):
        for figures in by_case.values():
            for fig in figures.values():
                fig["median"] = _median(fig["runs"])
    a1 = summary["A1"]
    for route in ("key", "jwt"):
        for metric in ("req/s", "CPU us/req", "p50 ms", "p99 ms"):
            mine = a1.get(route, {}).get(metric, {}).get("median")
            base = a1.get("open", {}).get(metric, {}).get("median")
            per_repeat = []
            for rep in sorted({r["repeat"] for r in records}):
                pair = {
                    r["case"]: r["metrics"].get(metric)
                    for r in records
                    if r["test"] == "A1" and r["repeat"] == rep and not r["error"]
                }
                if pair.get(route) and pair.get("open"):
                    per_repeat.append(pair[route] / pair["open"])
            summary["A1 ratios"][f"{route}/open {metric}"] = {
                "median": mine / base if mine and base else None,
                "runs": per_repeat,
            }
    for label, (with_, without) in ADDED.items():
        for p in ("p50", "p99"):
            per_repeat = []
            for rep in sorted({r["repeat"] for r in records}):
                by_phase = {
                    r["case"]: r["metrics"].get(f"{p} ms")
                    for r in records
                    if r["test"] == "A2" and r["repeat"] == rep and not r["error"]
                }
                if by_phase.get(with_) is not None and by_phase.get(without) is not None:
                    per_repeat.append(by_phase[with_] - by_phase[without])
            summary["A2 added"][f"{label}: added {p} ms"] = {"median": _median(per_repeat), "runs": per_repeat}  # type: ignore[arg-type]
    return summary


def targets(summary: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for route in ("key", "jwt"):
        v = summary["A1 ratios"].get(f"{route}/open req/s", {}).get("median")
        cpu = summary["A1 ratios"].get(f"{route}/open CPU us/req", {}).get("median")
        out.append(
            {
                "target": f"A1 {route}/open req/s >= 0.90",
                "figure": "not measured" if v is None else f"{v:.3f} (CPU per request: {cpu:.3f}x)",
                "met": None if v is None else v >= 0.90,
            }
        )
    added = summary["A2 added"].get("gateway: added p99 ms", {}).get("median")
    out.append(
        {
            "target": f"A2 p99(with {LOGIN_RATE:g} logins/s) - p99(without) <= 1 ms "
            "(the method's default threads: cores - 1)",
            "figure": "not measured" if added is None else f"{added:+.3f} ms",
            "met": None if added is None else added <= 1.0,
        }
    )
    runs = [r for r in records if r["test"] == "A2" and PHASES.get(r["case"], (None, None))[1]]
    statuses: Counter[str] = Counter()
    for r in runs:
        statuses.update(r.get("statuses", {}))
    rates = [r["metrics"].get("logins/s") for r in runs if not r["error"]]
    low = min((v for v in rates if v is not None), default=None)
    out.append(
        {
            "target": f"A2 logins: at least {0.95 * LOGIN_RATE:g}/s (of {LOGIN_RATE:g}/s) in every run, all 200",
            "figure": "not measured"
            if low is None
            else f"lowest {low:.1f}/s; answers " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
            "met": None
            if low is None
            else low >= 0.95 * LOGIN_RATE and set(statuses) == {"200"} and len(rates) == len(runs),
        }
    )
    return out


A1_METRICS = ("req/s", "p50 ms", "p99 ms", "CPU us/req", "other CPU %", "steal %")
A2_METRICS = (
    "p50 ms",
    "p99 ms",
    "logins/s",
    "login p50 ms",
    "login p99 ms",
    "login start lag p99 ms",
    "gateway CPU s",
    "gateway CPU ms/login",
    "other CPU %",
    "steal %",
)


def markdown(res: dict[str, Any]) -> str:
    summary = res["summary"]
    st = res["settings"]
    out = ["# Admission benchmark results", ""]
    out += [f"- {k}: {v}" for k, v in res["machine"].items()]
    out += [
        f"- run: {res['repeat']} repeat(s){' (--quick)' if res['quick'] else ''}; {res['total_seconds'] / 60:.1f} "
        "min in all",
        f"- command: `{res['command']}`",
        "",
        "Medians over the repeats; every run's values at the end. On loopback, every process stopped by PID; the "
        "machine's cores are shared by wrk (or the stream reader and the login generator), the origins and the "
        "gateway, hence the gateway's CPU per request next to req/s. `other CPU %` is what processes outside the "
        "benchmark used during a run, in percent of one core (the machine's user and system time minus the "
        "benchmark's processes'; a few percent is accounting slop), `steal %` the time the hypervisor took from the "
        "machine's cores, likewise"
        + (
            f"; each run started after a second in which the two came to less than {res['quiet']['max_other']:g}%, "
            f"and a run during which they came to more was done again (at most {res['quiet']['tries']} attempts, "
            "the last kept; see the notes)."
            if res["quiet"]["max_other"]
            else "."
        ),
        "",
        "## Targets",
        "",
        "| target | figure | met |",
        "|---|---|---|",
    ]
    for t in res["targets"]:
        verdict = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        out.append(f"| {t['target']} | {t['figure']} | {verdict} |")
    out += [
        "",
        "## A1: small requests with and without auth",
        "",
        f"`wrk -t2 -c64 -d{st['s5_seconds']:g}s --latency` on the 100-byte response ({res['origin']} origin), "
        'through one gateway process per repeat with three routes to it: `/open` (`auth = "anonymous"`), `/key` '
        "(`api_key`, `Authorization: Bearer gwk_...`, one consumer with the key's SHA-256) and `/jwt` (`jwt`, RS256, "
        "`public_key_file`, issuer and audience checked; one token valid for a day, so after its first request the "
        "verified-token cache answers). The routes are measured in turn on the same process, the order rotating "
        "between repeats, after a 1 s wrk warm-up of each; before and after, each route answered 200 with its "
        "credential and 401 without one and with a wrong one. CPU is the gateway process's user + system time "
        "over the wrk run divided by the requests wrk completed.",
        "",
        "| route | " + " | ".join(A1_METRICS) + " |",
        "|---|" + "--:|" * len(A1_METRICS),
    ]
    for route in ROUTES:
        figs = summary["A1"].get(route)
        if figs:
            out.append(
                f"| {route} | " + " | ".join(report.fmt(figs.get(m, {}).get("median")) for m in A1_METRICS) + " |"
            )
    out += ["", "| ratio | of medians | per repeat |", "|---|--:|---|"]
    for name, fig in summary["A1 ratios"].items():
        if fig["median"] is None:
            continue
        out.append(f"| {name} | {fig['median']:.3f} | {', '.join(f'{v:.3f}' for v in fig['runs'])} |")
    out += [
        "",
        "## A2: event-stream latency while Basic logins are verified",
        "",
        f"S7's measurement (one event per 50 ms, read for {st['s7_seconds']:g} s, each event's latency from the "
        "origin's send to the client's receive, the first event left out), through an anonymous `/events` route of "
        "one gateway, in five phases whose order rotates between repeats (one gateway per repeat):",
        "",
        f"- `{GW_QUIET}`: the stream through the gateway, nothing else;",
        f"- `{GW_LOGINS}`: the same while a load generator (a process of its own) makes {LOGIN_RATE:g} HTTP Basic "
        f"logins per second (open loop, {LOGIN_WORKERS} keep-alive connections) to `/login` of the same gateway "
        "(`basic`, the method's default `threads`, one fewer than the cores, `cache_ttl = 0`), each login by the "
        "next of "
        f"{LOGIN_CONSUMERS} consumers with their own hash, so no check is answered from a cache: **the target**;",
        f"- `{GW_LOGINS_1T}`: the same logins to `/login1`, a `basic` method with a thread per core "
        f"(`threads = {os.cpu_count() or 2}`);",
        f"- `{DIRECT_QUIET}` and `{DIRECT_LOGINS}`: the control, the stream read straight from the origin (no "
        "gateway on its path) without and with the same logins through the gateway: what the machine's cores "
        "being busy with bcrypt does to a stream that the gateway's reactor never touches.",
        "",
        f"The hashes are bcrypt of cost {BCRYPT_COST} (about 15 ms of CPU per check here), not the usual 12: a cost "
        "12 check is about 0.25 s of CPU, so 50 logins/s would need 12 cores; the point measured is that the checks "
        "run off the reactor thread (on the method's own thread pool; bcrypt releases the GIL), not how many checks "
        "a core can do. `logins/s` counts the logins completed within the stream's window; `login p50/p99` is each "
        "login's time from its request sent to its answer read; `start lag` how late the generator sent a login "
        "after it was due; `gateway CPU ms/login` is the gateway's CPU over the window divided by those logins (the "
        "stream's own share included); `other CPU %` is the CPU used by processes outside the benchmark during the "
        "window, in percent of one core.",
        "",
        "| phase | " + " | ".join(A2_METRICS) + " |",
        "|---|" + "--:|" * len(A2_METRICS),
    ]
    for phase in PHASES:
        figs = summary["A2"].get(phase)
        if figs:
            out.append(
                f"| {phase} | " + " | ".join(report.fmt(figs.get(m, {}).get("median")) for m in A2_METRICS) + " |"
            )
    out += [
        "",
        "What the logins add to the stream's latency, per repeat (with logins minus without, same repeat), and the "
        "median of those:",
        "",
        "| stream | added p50 ms | added p99 ms | p99 per repeat |",
        "|---|--:|--:|---|",
    ]
    for label in ADDED:
        p50 = summary["A2 added"].get(f"{label}: added p50 ms", {})
        p99 = summary["A2 added"].get(f"{label}: added p99 ms", {})
        if p99.get("median") is None:
            continue
        out.append(
            f"| {label} | {p50['median']:+.3f} | {p99['median']:+.3f} | "
            + ", ".join(f"{v:+.3f}" for v in p99["runs"])
            + " |"
        )
    statuses: Counter[str] = Counter()
    for r in res["runs"]:
        statuses.update(r.get("statuses", {}))
    if statuses:
        out += ["", "Login answers over every run: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))]
    notes = res["notes"] + [
        f"{r['test']} {r['case']} (repeat {r['repeat'] + 1}): "
        + (f"failed: {r['error']}" if r["error"] else "; ".join(r["notes"]))
        for r in res["runs"]
        if r["error"] or (r["notes"] and r["test"] == "A1") or r.get("attempts", 1) > 1
    ]
    if notes:
        out += ["", "## Notes and failures", ""] + [f"- {n}" for n in notes]
    out += ["", "## Every run", "", "| test | case | metric | runs |", "|---|---|---|---|"]
    for test, cases, metrics in (("A1", ROUTES, A1_METRICS), ("A2", PHASES, A2_METRICS)):
        for case in cases:
            for m in metrics:
                fig = summary[test].get(case, {}).get(m)
                if fig:
                    out.append(f"| {test} | {case} | {m} | {', '.join(report.fmt(v) for v in fig['runs'])} |")
    return "\n".join(out) + "\n"


# --- profile (not part of the measured run) ------------------------------------------------------------------


def _inclusive(raw: Path, top: int = 20) -> str:
    """The gateway's functions by inclusive share of the samples taken during socket events (a function counts
    once per sample that has it anywhere on its stack), to see which part of a request's path costs what."""
    totals: Counter[str] = Counter()
    total = 0
    for text in raw.read_text().splitlines():
        stack, _, count = text.rpartition(" ")
        if "_doReadOrWrite" not in stack:
            continue
        n = int(count)
        total += n
        seen = set()
        for frame in stack.split(";"):
            name, _, where = frame.partition(" (")
            path = where.rstrip(")").rsplit(":", 1)[0]
            if "gateway/" in path and "site-packages" not in path:
                seen.add(f"{name} ({path[path.index('gateway/') :]})")
        for key in seen:
            totals[key] += n
    if not total:
        return "no samples"
    return "\n".join(f"{100 * n / total:5.1f}%  {key}" for key, n in totals.most_common(top))


def profile_routes(names: list[str], settings: Settings, use_nginx: bool, out: Path) -> int:
    """Each A1 route under wrk for the A1 duration while py-spy samples the gateway (500 Hz, raw stacks into
    OUT/profile-ROUTE.raw): bench/profile.py's split by kind and hottest lines, then the gateway's functions by
    inclusive share. One gateway serves every route profiled, as in A1."""
    from bench.profile import summarize as by_kind

    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is not installed (.venv/bin/pip install py-spy)")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gateway-admission-") as tmp:
        workdir = Path(tmp)
        try:
            creds = make_secrets(workdir)
            started = origins.start(workdir, use_nginx)
            try:
                gw = start_gateway(
                    "A1-gateway-profile", a1_config(procs.free_port(), started.files.port, creds, True), workdir
                )
                try:
                    a1_check(gw.port, list(ROUTES), creds)
                    for route in names:
                        header = next((f"{k}: {v}" for k, v in a1_headers(creds)[route].items()), None)
                        wrk_run(gw.port, f"/{route}/small", header, 1.0)
                        raw = out / f"profile-{route}.raw"
                        argv = [py_spy, "record", "-p", str(gw.pid), "-d", f"{int(settings.s5_seconds)}"]
                        argv += ["-r", "500", "-f", "raw", "-o", str(raw)]
                        spy = procs.start(f"py-spy-{route}", argv, workdir / f"py-spy-{route}.log")
                        time.sleep(0.5)
                        result = wrk_run(gw.port, f"/{route}/small", header, settings.s5_seconds - 1)
                        spy.popen.wait(timeout=settings.s5_seconds + 30)
                        spy.stop()
                        print(f"== {route}: {result.requests_per_s:,.0f} req/s under py-spy", flush=True)
                        print(by_kind(raw) if raw.exists() else f"py-spy wrote nothing: {spy.log_tail()}")
                        if raw.exists():
                            print("\ngateway functions, inclusive:\n" + _inclusive(raw) + "\n", flush=True)
                finally:
                    gw.stop()
            finally:
                started.stop()
        finally:
            procs.stop_all()
    return 0


# --- main ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=None, help="repeats (default 3, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="1 repeat and 3 s phases, for a smoke test")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="directory for admission.md and .json")
    parser.add_argument("--only", choices=("A1", "A2"), help="run one of the two")
    parser.add_argument(
        "--max-other-cpu",
        type=float,
        default=10.0,
        help="redo a run during which other processes used more than this %% of a core (default 10; 0: never)",
    )
    parser.add_argument("--no-install", action="store_true", help="never try to apt-get install nginx, wrk")
    parser.add_argument(
        "--profile", metavar="ROUTES", help="instead of the benchmark: profile A1 routes (e.g. open,key) with py-spy"
    )
    parser.add_argument("--login-load", type=Path, help=argparse.SUPPRESS)  # the A2 load generator's own mode
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    return args


def _line(record: dict[str, Any]) -> str:
    if record["error"]:
        return f"FAILED {record['error']}"
    parts = [f"{k} {report.fmt(v)}" for k, v in record["metrics"].items()]
    return ", ".join(parts + record["notes"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.login_load is not None:
        return login_load(args.login_load)
    if args.profile:
        names = [n.strip() for n in args.profile.split(",") if n.strip()]
        if unknown := [n for n in names if n not in ROUTES]:
            raise SystemExit(f"unknown routes: {', '.join(unknown)} (known: {', '.join(ROUTES)})")
        settings = Settings.quick() if args.quick else Settings()
        return profile_routes(names, settings, shutil.which("nginx") is not None, args.out)
    began = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop children on the way out, as on Ctrl-C
    if not TWISTD.exists():
        raise SystemExit(f"no twistd next to {sys.executable}: install the gateway in this venv")
    if shutil.which("wrk") is None or shutil.which("nginx") is None:
        peers.ensure_packages(not args.no_install)
    tests = [args.only] if args.only else ["A1", "A2"]
    notes: list[str] = []
    if "A1" in tests and shutil.which("wrk") is None:
        log("skipping A1: wrk is not installed")
        notes.append("A1 skipped: wrk is not installed")
        tests.remove("A1")
    settings = Settings.quick() if args.quick else Settings()
    quiet = Quiet(max_other=args.max_other_cpu)
    use_nginx = shutil.which("nginx") is not None
    if not use_nginx:
        log("nginx is not installed: bench/origin.py serves the 100-byte response")

    records: list[dict[str, Any]] = []
    routes = list(ROUTES)
    counter = {"done": 0}
    total_runs = args.repeat * (len(ROUTES) * ("A1" in tests) + len(PHASES) * ("A2" in tests))

    def progress(record: dict[str, Any]) -> None:
        counter["done"] += 1
        log(
            f"[{counter['done']}/{total_runs}] repeat {record['repeat'] + 1} {record['test']} {record['case']}: "
            f"{_line(record)} ({record['seconds']:.1f} s)"
        )

    with tempfile.TemporaryDirectory(prefix="gateway-admission-") as tmp:
        workdir = Path(tmp)
        try:
            t = time.monotonic()
            creds = make_secrets(workdir)
            log(
                f"credentials: an API key, an RS256 token, {LOGIN_CONSUMERS} bcrypt hashes of cost {BCRYPT_COST} "
                f"({time.monotonic() - t:.1f} s)"
            )
            if "A1" in tests:
                probe = workdir / "jwt-check.toml"
                probe.write_text(a1_config(procs.free_port(), 9, creds, True))
                if why := check_config(probe):
                    log(f"the gateway rejects the jwt method's config ({why}): A1 runs without the jwt route")
                    notes.append(f"A1 without the jwt route: `twistd gateway --check` rejected its config: {why}")
                    routes.remove("jwt")
                    total_runs -= args.repeat
            started = origins.start(workdir, use_nginx)
            log(f"origins: {started.files.kind} on {started.files.port}, origin.py on {started.py.port}")
            ctx = Context(started, settings)
            try:
                for repeat in range(args.repeat):
                    if "A1" in tests:
                        rundir = workdir / f"A1-{repeat}"
                        rundir.mkdir()
                        records += a1_repeat(
                            repeat, routes, creds, started, rundir, settings.s5_seconds, quiet, progress
                        )
                    if "A2" in tests:
                        rundir = workdir / f"A2-{repeat}"
                        rundir.mkdir()
                        records += a2_repeat(repeat, ctx, creds, rundir, quiet, progress)
                    for origin in (started.files, started.py):
                        if not origin.proc.alive():
                            raise RuntimeError(f"the {origin.kind} origin died: {origin.proc.log_tail()}")
            finally:
                started.stop()
        except BenchError as e:
            log(f"admission benchmark stopped: {e}")
            return 2
        finally:
            procs.stop_all()

    summary = summarize(records)
    total = time.monotonic() - began
    result = {
        "machine": report.machine(),
        "command": shlex.join(
            [Path(sys.executable).name, "bench/admission.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "repeat": args.repeat,
        "quick": args.quick,
        "settings": dataclasses.asdict(settings),
        "origin": "nginx" if use_nginx else "bench/origin.py",
        "routes": routes,
        "login": {
            "rate": LOGIN_RATE,
            "consumers": LOGIN_CONSUMERS,
            "bcrypt_cost": BCRYPT_COST,
            "connections": LOGIN_WORKERS,
        },
        "notes": notes,
        "quiet": dataclasses.asdict(quiet),
        "total_seconds": round(total, 1),
        "summary": summary,
        "targets": targets(summary, records),
        "runs": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    (args.out / "admission.md").write_text(text)
    (args.out / "admission.json").write_text(json.dumps(result, indent=1) + "\n")
    print(text)
    log(f"results in {args.out} ({total / 60:.1f} min)")
    failed = [r for r in records if r["error"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
