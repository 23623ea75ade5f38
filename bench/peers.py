"""The peers the gateway is measured against, their config writers, and how each is started and stopped.

Each peer is started fresh for each scenario run, in front of one origin, from a config written into that run's
temp dir; everything it writes (logs, pid files, temp files) stays in that dir, and it is stopped by PID.

| peer | what |
|---|---|
| `gateway` | this project, under twistd |
| `gateway-2w` | the same with `[server] workers = 2` (only in the scenarios with many connections) |
| `gateway-3s` | an upstream of three servers, round robin (S5 only: the nginx origin on 127.0.0.1, .2, .3) |
| `nginx-stream` | nginx streaming: proxy_buffering off, proxy_request_buffering off, HTTP/1.1 keep-alive upstream |
| `nginx-stream-64k` | the same with proxy_buffer_size 64k, proxy_buffers 4 64k |
| `nginx-buffered` | nginx with its default buffering of responses and request bodies |
| `haproxy` | HAProxy, mode http, one thread, http-reuse safe |
| `twisted-rpr` | Twisted's `twisted.web.proxy.ReverseProxyResource` (bench/rpr.py) |
| `lean` | the small-request ceiling on the Twisted reactor (`../shared/bench/lean_twisted_proxy.py`), S5 only |
| `gateway-baseline` | the gateway installed in the venv `GATEWAY_BASELINE_VENV` names: a change beside its base |
| `direct` | no proxy: the client talks to the origin (the limit) |
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from bench.origins import nginx_argv, nginx_main
from bench.tls import BenchCertificate, gateway_listener_tls, haproxy_bind_tls, nginx_server_tls

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
PACKAGES = ["nginx-light", "haproxy", "wrk"]


@dataclass
class Running:
    """A started peer: where clients connect, its main process (None for `direct`), and, in a TLS run, the
    client context that trusts the run's certificate (set by bench/run.py, the same for every peer)."""

    name: str
    port: int
    proc: procs.Proc | None
    tls: ssl.SSLContext | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def check_alive(self) -> None:
        if self.proc is not None and not self.proc.alive():
            raise RuntimeError(f"{self.name} exited with status {self.proc.popen.returncode}: {self.proc.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


class Peer:
    name = ""
    # The scenarios this peer takes part in (None: all of them).
    only: frozenset[str] | None = None
    # Whether it can serve TLS to the clients (bench/run.py --tls).
    serves_tls = True

    def unavailable(self) -> str | None:
        """Why this peer cannot run here, or None."""
        return None

    def start(self, origin_port: int, workdir: Path, tls: BenchCertificate | None = None) -> Running:
        """Start it in front of the origin; with `tls`, serving TLS with that certificate."""
        raise NotImplementedError


# --- gateway -----------------------------------------------------------------------------------------------


def gateway_config(
    port: int,
    origin_port: int,
    workers: int | None = None,
    access_log: str = "",
    tls: BenchCertificate | None = None,
    servers: int = 1,
) -> str:
    """One listener (serving TLS with `tls`), one route to the origin; the access log off (as nginx's is)
    unless `access_log` names a file. With `servers` above 1, the upstream is that many servers (the origin's
    port on 127.0.0.1, 127.0.0.2 ...), round robin."""
    server = f"[server]\nworkers = {workers}\n\n" if workers else ""
    where = f'url = "http://127.0.0.1:{origin_port}"'
    if servers > 1:
        urls = ", ".join(f'{{ url = "http://127.0.0.{n}:{origin_port}" }}' for n in range(1, servers + 1))
        where = f"servers = [{urls}]"
    return f"""# written by bench/ for one run
{server}[[listeners]]
host = "127.0.0.1"
port = {port}
backlog = 1024
{gateway_listener_tls(tls) if tls else ""}
[limits]
max_request_body_bytes = "8GiB"

[access_log]
path = "{access_log}"  # bench/operations.py measures what it costs

[upstreams.origin]
{where}

[[routes]]
name = "all"
auth = "anonymous"
path_prefix = "/"
upstream = "origin"
"""


class Gateway(Peer):
    def __init__(
        self, name: str = "gateway", workers: int | None = None, venv_bin: Path | None = None, servers: int = 1
    ) -> None:
        self.name = name
        self.workers = workers
        self.servers = servers
        if servers > 1:
            self.only = frozenset({"S5"})
        if workers:
            # A second worker process adds nothing to a single connection: only where there are many.
            self.only = frozenset({"S2", "S5", "S9"})
        self.twistd = (venv_bin or VENV_BIN) / "twistd"
        self._compiled = False

    def unavailable(self) -> str | None:
        if not self.twistd.exists():
            return f"no twistd at {self.twistd} (install the gateway in that venv)"
        return self._check() if self.workers else None

    def _check(self) -> str | None:
        """`twistd gateway --check` on a config with this peer's keys: does this gateway support them?"""
        workdir = Path(os.environ.get("TMPDIR", "/tmp"))
        config = workdir / f"gateway-bench-check-{os.getpid()}.toml"
        config.write_text(gateway_config(procs.free_port(), 9, self.workers))
        try:
            done = subprocess.run(
                [str(self.twistd), "gateway", "--config", str(config), "--check"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"twistd gateway --check failed: {e}"
        finally:
            config.unlink(missing_ok=True)
        if done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip()).splitlines()
            reason = said[-1] if said else f"exit status {done.returncode}"
            return f"this gateway does not support [server] workers = {self.workers} ({reason})"
        return None

    def compile_package(self) -> None:
        """Compile this venv's gateway package to bytecode (`__pycache__` beside its sources), as an installed
        package is. Otherwise, under an editable install with PYTHONDONTWRITEBYTECODE set, every start compiles
        every module from source, and the memory the compiler frees stays in the heap, free and resident, until
        the first streams fill it: S4's RSS growth then depended on the size of the largest modules (0.9 MiB
        less for a tree with three modules of 760 to 930 lines than for one of 93 under 420, at the same RSS at
        the peak)."""
        if self._compiled:
            return
        python = str(self.twistd.parent / "python")
        found = subprocess.run(
            [python, "-I", "-c", "import gateway; print(gateway.__path__[0])"],  # -I: not the one in the cwd
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        subprocess.run([python, "-m", "compileall", "-q", found.stdout.strip()], timeout=300, check=True)
        self._compiled = True

    def start(self, origin_port: int, workdir: Path, tls: BenchCertificate | None = None) -> Running:
        self.compile_package()
        port = procs.free_port()
        config = workdir / "gateway.toml"
        config.write_text(gateway_config(port, origin_port, self.workers, tls=tls, servers=self.servers))
        argv = [
            str(self.twistd),
            "--nodaemon",
            "--pidfile=",
            "--logfile=-",  # standard output, which workers share (their log goes there too)
            "gateway",
            "--config",
            str(config),
        ]
        proc = procs.start(self.name, argv, workdir / "gateway.log")
        procs.wait_listening(port, proc)
        if self.workers:
            _wait_for_workers(proc, port, self.workers)
        return Running(self.name, port, proc)


class BaselineGateway(Gateway):
    """The gateway installed in another venv (`GATEWAY_BASELINE_VENV`, e.g. a checkout of main before a change,
    installed with `pip install -e`): the same config, side by side in the same run, so that a change is judged
    against what it changes rather than against a run on another day."""

    def __init__(self) -> None:
        venv = os.environ.get("GATEWAY_BASELINE_VENV", "")
        super().__init__("gateway-baseline", venv_bin=Path(venv) / "bin" if venv else Path("/nonexistent"))
        self._venv = venv

    def unavailable(self) -> str | None:
        if not self._venv:
            return "GATEWAY_BASELINE_VENV is not set (a venv with the baseline gateway installed)"
        return super().unavailable()


def listening_sockets(port: int) -> int:
    """How many sockets listen on 127.0.0.1:`port` (with SO_REUSEPORT, one per process that bound it)."""
    wanted = f"0100007F:{port:04X}"
    count = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[1] == wanted and fields[3] == "0A":
                count += 1
    return count


def _wait_for_workers(proc: procs.Proc, port: int, workers: int, timeout: float = 10.0) -> None:
    """Wait until `workers` sockets listen on the port (each worker binds it itself), within a bound."""
    deadline = time.monotonic() + timeout
    while listening_sockets(port) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{proc.name}: {listening_sockets(port)} of {workers} workers listening after {timeout:g} s"
            )
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with status {proc.popen.returncode}: {proc.log_tail()}")
        time.sleep(0.05)
    proc.remember_tree()


# --- nginx -------------------------------------------------------------------------------------------------


def nginx_config(workdir: Path, port: int, origin_port: int, mode: str, tls: BenchCertificate | None = None) -> str:
    """mode: "stream", "stream-64k" or "buffered"; with `tls`, the listener serves TLS."""
    if mode == "buffered":
        # nginx's defaults: responses buffered (and spooled to a temp file past its buffers), request bodies
        # read whole before anything is sent upstream, HTTP/1.0 to the upstream without keep-alive.
        upstream = ""
        location = f"proxy_pass http://127.0.0.1:{origin_port};"
    else:
        upstream = f"""
    upstream origin {{
        server 127.0.0.1:{origin_port};
        keepalive 64;
    }}"""
        location = """proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;"""
        if mode == "stream-64k":
            location += """
            proxy_buffer_size 64k;
            proxy_buffers 4 64k;"""
    http = f"""    client_max_body_size 0;
    keepalive_requests 100000000;
    keepalive_timeout 300s;{upstream}
    server {{
        listen 127.0.0.1:{port} backlog=1024{" ssl" if tls else ""};
        {nginx_server_tls(tls) if tls else ""}
        location / {{
            {location}
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }}
    }}"""
    return nginx_main(workdir, http)


class Nginx(Peer):
    def __init__(self, name: str, mode: str) -> None:
        self.name = name
        self.mode = mode

    def unavailable(self) -> str | None:
        return None if shutil.which("nginx") else "nginx is not installed"

    def start(self, origin_port: int, workdir: Path, tls: BenchCertificate | None = None) -> Running:
        port = procs.free_port()
        (workdir / "nginx.conf").write_text(nginx_config(workdir, port, origin_port, self.mode, tls))
        proc = procs.start(self.name, nginx_argv(workdir), workdir / "error.log")
        procs.wait_listening(port, proc)
        return Running(self.name, port, proc)


# --- HAProxy -----------------------------------------------------------------------------------------------


def haproxy_config(port: int, origin_port: int, tls: BenchCertificate | None = None) -> str:
    return f"""# written by bench/ for one run
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-request 60s
    timeout http-keep-alive 300s
    http-reuse safe

frontend fe
    bind 127.0.0.1:{port}{haproxy_bind_tls(tls) if tls else ""}
    default_backend origin

backend origin
    server origin 127.0.0.1:{origin_port}
"""


class Haproxy(Peer):
    name = "haproxy"

    def unavailable(self) -> str | None:
        return None if shutil.which("haproxy") else "haproxy is not installed"

    def start(self, origin_port: int, workdir: Path, tls: BenchCertificate | None = None) -> Running:
        port = procs.free_port()
        config = workdir / "haproxy.cfg"
        config.write_text(haproxy_config(port, origin_port, tls))
        argv = [shutil.which("haproxy") or "haproxy", "-db", "-f", str(config)]
        proc = procs.start(self.name, argv, workdir / "stderr.log", cwd=workdir)
        procs.wait_listening(port, proc)
        return Running(self.name, port, proc)


# --- Twisted's ReverseProxyResource ------------------------------------------------------------------------


class TwistedRpr(Peer):
    name = "twisted-rpr"
    serves_tls = False

    def start(self, origin_port: int, workdir: Path, tls: BenchCertificate | None = None) -> Running:
        argv = [sys.executable, str(HERE / "rpr.py"), "--origin-port", str(origin_port), "--port", "0"]
        proc = procs.start(self.name, argv, workdir / "stderr.log", stdout_pipe=True)
        port = procs.read_port(proc)
        procs.wait_listening(port, proc)
        return Running(self.name, port, proc)


# --- the lean Twisted proxy ---------------------------------------------------------------------------------

LEAN_PROXY = HERE.parent.parent / "shared" / "bench" / "lean_twisted_proxy.py"


class LeanProxy(Peer):
    """The small-request ceiling of a proxy on the Twisted reactor (Twisted protocols and llhttp, no twisted.web),
    the measuring instrument of ../shared/bench: in S5 only, where the gateway's per-request cost is the point."""

    name = "lean"
    serves_tls = False
    only = frozenset({"S5"})

    def unavailable(self) -> str | None:
        if not LEAN_PROXY.exists():
            return f"no {LEAN_PROXY} (the shared bench beside this checkout)"
        try:
            import httptools  # noqa: F401
        except ImportError:
            return "httptools is not installed in this venv (pip install -e '.[bench]')"
        return None

    def start(self, origin_port: int, workdir: Path, tls: BenchCertificate | None = None) -> Running:
        port = procs.free_port()
        argv = [sys.executable, str(LEAN_PROXY), "--listen", str(port), "--upstream", str(origin_port)]
        proc = procs.start(self.name, argv, workdir / "lean.log")
        procs.wait_listening(port, proc)
        return Running(self.name, port, proc)


# --- direct ------------------------------------------------------------------------------------------------


class Direct(Peer):
    name = "direct"
    serves_tls = False  # the origins speak plain HTTP

    def start(self, origin_port: int, workdir: Path, tls: BenchCertificate | None = None) -> Running:
        return Running(self.name, origin_port, None)


ALL: list[Peer] = [
    Gateway(),
    Gateway("gateway-2w", workers=2),
    Gateway("gateway-3s", servers=3),
    Nginx("nginx-stream", "stream"),
    Nginx("nginx-stream-64k", "stream-64k"),
    Nginx("nginx-buffered", "buffered"),
    Haproxy(),
    TwistedRpr(),
    LeanProxy(),
    BaselineGateway(),
    Direct(),
]
BY_NAME = {peer.name: peer for peer in ALL}


def ensure_packages(allowed: bool) -> None:
    """If nginx, HAProxy or wrk is missing, try once to install them from Debian's packages (as root only)."""
    missing = [tool for tool in ("nginx", "haproxy", "wrk") if shutil.which(tool) is None]
    if not missing:
        return
    if not allowed:
        print(f"not installing {', '.join(missing)} (--no-install)", file=sys.stderr)
        return
    if os.geteuid() != 0 or not Path("/etc/debian_version").exists() or shutil.which("apt-get") is None:
        print(f"{', '.join(missing)} missing, and not root on Debian: not installing", file=sys.stderr)
        return
    print(f"{', '.join(missing)} missing: apt-get install -y {' '.join(PACKAGES)}", file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", *PACKAGES]
    try:
        if subprocess.run(install, env=env, timeout=600, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, timeout=600, check=False)
            subprocess.run(install, env=env, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"apt-get failed: {e}", file=sys.stderr)
