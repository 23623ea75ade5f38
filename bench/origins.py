"""The origins behind the peers, started once per harness run and never the bottleneck.

* `files`: nginx (one process) serving fixed files from /dev/shm with sendfile (`/files/1g.bin`,
  `/files/256m.bin`, `/files/64m.bin`) and a 100-byte `/small`; bench/origin.py serves the same paths when nginx
  is missing.
* `py`: bench/origin.py, for what nginx cannot do: `/big` (the 1 GiB file, recording the bytes sent and when the
  connection was closed), `/sink` (a slow upload reader), `/events` (server-sent events), `/_events` (what it saw).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procs
from bench.clients import http_get_json

HERE = Path(__file__).resolve().parent
MiB = 1024 * 1024
GiB = 1024 * MiB
FILES = {"1g.bin": GiB, "256m.bin": 256 * MiB, "64m.bin": 64 * MiB}
SMALL = "x" * 99  # nginx adds nothing: `return 200 "...\n"` makes it 100 bytes


def nginx_temp_paths(workdir: Path) -> str:
    """nginx's temp paths inside `workdir` (the compiled-in ones are under /var/lib/nginx)."""
    lines = []
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        path = workdir / f"{name}_temp"
        path.mkdir(exist_ok=True)
        lines.append(f"{name}_temp_path {path};")
    return "\n    ".join(lines)


def nginx_argv(workdir: Path) -> list[str]:
    """One nginx process in the foreground, everything it writes inside `workdir`."""
    return [
        shutil.which("nginx") or "nginx",
        "-p",
        f"{workdir}/",
        "-c",
        str(workdir / "nginx.conf"),
        "-e",
        str(workdir / "error.log"),
        "-g",
        "daemon off; master_process off;",
    ]


def nginx_main(workdir: Path, http: str) -> str:
    return f"""# written by bench/ for one run
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{
    worker_connections 8192;
    multi_accept on;
}}
http {{
    access_log off;
    {nginx_temp_paths(workdir)}
{http}
}}
"""


@dataclass
class Origin:
    kind: str  # "nginx" or "python"
    proc: procs.Proc
    port: int

    def events(self, tag: str) -> dict[str, Any]:
        return http_get_json(self.port, f"/_events?tag={tag}")


@dataclass
class Origins:
    files: Origin
    py: Origin
    shm: Path

    def of(self, which: str) -> Origin:
        return self.files if which == "files" else self.py

    def stop(self) -> None:
        for origin in (self.files, self.py):
            origin.proc.stop()
        shutil.rmtree(self.shm, ignore_errors=True)


def make_files(shm: Path) -> None:
    (shm / "files").mkdir(parents=True, exist_ok=True)
    block = os.urandom(MiB)
    for name, size in FILES.items():
        with open(shm / "files" / name, "wb") as f:
            for _ in range(size // MiB):
                f.write(block)


def start_python_origin(workdir: Path, shm: Path) -> Origin:
    proc = procs.start(
        "origin.py",
        [sys.executable, str(HERE / "origin.py"), "--dir", str(shm / "files"), "--big", str(shm / "files" / "1g.bin")],
        workdir / "origin-py.log",
        stdout_pipe=True,
    )
    port = procs.read_port(proc)
    procs.wait_listening(port, proc)
    return Origin("python", proc, port)


def start_nginx_origin(workdir: Path, shm: Path) -> Origin:
    port = procs.free_port()
    http = f"""
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        listen 127.0.0.2:{port} backlog=4096;  # three servers for the gateway-3s peer (same files)
        listen 127.0.0.3:{port} backlog=4096;
        location /files/ {{ alias {shm}/files/; }}
        location = /small {{ default_type text/plain; return 200 "{SMALL}\\n"; }}
    }}"""
    (workdir / "nginx.conf").write_text(nginx_main(workdir, http))
    proc = procs.start("origin-nginx", nginx_argv(workdir), workdir / "error.log")
    procs.wait_listening(port, proc)
    return Origin("nginx", proc, port)


def start(workdir: Path, use_nginx: bool) -> Origins:
    shm_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    shm = Path(tempfile.mkdtemp(prefix="gateway-bench-", dir=shm_root))
    shm.chmod(0o755)
    try:
        make_files(shm)
        py = start_python_origin(_mkdir(workdir / "origin-py"), shm)
        files = start_nginx_origin(_mkdir(workdir / "origin-nginx"), shm) if use_nginx else py
        origins = Origins(files, py, shm)
        _check(origins)
        return origins
    except BaseException:
        procs.stop_all()
        shutil.rmtree(shm, ignore_errors=True)
        raise


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check(origins: Origins) -> None:
    """Each origin answers /small with 100 bytes."""
    for origin in {id(o): o for o in (origins.files, origins.py)}.values():
        with socket.create_connection(("127.0.0.1", origin.port), timeout=5) as sock:
            sock.sendall(b"GET /small HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n")
            data = b""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") or len(body) != 100:
            raise RuntimeError(f"origin {origin.kind} answers /small with {data[:200]!r}")
