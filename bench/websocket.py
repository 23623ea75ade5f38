"""WebSocket benchmark: tunnels through the gateway beside nginx (its WebSocket proxying: `proxy_http_version 1.1`,
`Upgrade` and `Connection: upgrade` passed), on loopback, every process stopped by PID.

W1 messages: one client sends a 32-byte message and waits for its echo, again and again (round trips/s).
W2 bytes: one client reads an endless stream of 64 KiB messages the origin pushes (MB/s).
W3 idle: 1,000 tunnels opened and left idle: the proxy's RSS growth, and per tunnel (KiB).
W4 slow reader: one client reads the endless stream at 1 MB/s for `--seconds`: the proxy's peak RSS growth (its
   memory must not follow what the origin would send: the origin's socket is paused).

The origin (this file, `--origin PORT`) is asyncio: it answers the handshake (RFC 6455 section 4.2.2), then echoes
bytes as they come (/echo), pushes a server frame of 64 KiB as fast as the socket takes it (/stream), or holds the
connection (/idle). Neither proxy reads the frames, so the echo returns the client's masked frames unchanged.
Every figure is the median over `--repeat` rounds, the peers in turn (the order alternating), each started fresh.

Run: `.venv/bin/python bench/websocket.py [--repeat N] [--seconds S] [--tunnels N] [--out DIR]`; it prints a
markdown table and writes DIR/websocket.md and DIR/websocket.json (default out: bench/out/).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: bench/websocket.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import origins, peers, procs
from bench.measure import RssSampler, rss_bytes

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65"
STREAM_FRAME = b"\x82\x7f" + struct.pack("!Q", 65536) + b"s" * 65536
METRICS = ("round trips/s", "MB/s", "idle RSS MiB", "idle KiB/tunnel", "slow reader RSS MiB")
MiB = 1024 * 1024


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the origin ---------------------------------------------------------------------------------------------


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ", 2)[1]
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        if path == b"/echo":
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        elif path == b"/stream":
            while True:
                writer.write(STREAM_FRAME)
                await writer.drain()
        else:
            await reader.read()  # /idle: until the client goes
    except (ConnectionError, asyncio.IncompleteReadError, StopIteration):
        pass
    finally:
        writer.close()


def run_origin(port: int) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_serve, "127.0.0.1", port, backlog=2048)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# --- the client ---------------------------------------------------------------------------------------------


def handshake(port: int, path: str, timeout: float = 10.0) -> socket.socket:
    """A connection to the proxy at `port`, switched to WebSocket on `path` (the 101 read, nothing past it)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: bench.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(1)  # one byte at a time: nothing past the head is taken from the socket
        if not data:
            raise RuntimeError(f"closed during the handshake: {head!r}")
        head += data
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"no switch: {head[:200]!r}")
    return sock


def _frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x82, 0x80 | len(payload)]) + mask + masked


def round_trips(port: int, seconds: float) -> float:
    sock = handshake(port, "/echo")
    frame = _frame(b"m" * 32)
    count = 0
    started = time.monotonic()
    deadline = started + seconds
    with sock:
        while time.monotonic() < deadline:
            sock.sendall(frame)
            got = 0
            while got < len(frame):
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError("the echo connection closed")
                got += len(data)
            count += 1
    return count / (time.monotonic() - started)


def stream_rate(port: int, seconds: float, rate: float | None = None) -> float:
    """MB/s read from /stream for `seconds` (at most `rate` bytes/s when given)."""
    sock = handshake(port, "/stream")
    with sock:
        if rate is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        got = 0
        started = time.monotonic()
        deadline = started + seconds
        while (now := time.monotonic()) < deadline:
            if rate is not None and got > rate * (now - started):
                time.sleep(0.01)
                continue
            data = sock.recv(16384 if rate is not None else 1 << 20)
            if not data:
                raise RuntimeError("the stream closed")
            got += len(data)
        return got / (time.monotonic() - started) / 1e6


def idle_tunnels(port: int, pid: int, count: int) -> tuple[float, float]:
    """RSS growth (MiB) of the proxy with `count` idle tunnels open, and KiB per tunnel."""
    before = rss_bytes(pid)
    sockets = []
    try:
        for _ in range(count):
            sockets.append(handshake(port, "/idle"))
        time.sleep(1.0)
        growth = rss_bytes(pid) - before
    finally:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
    return growth / MiB, growth / 1024 / count


def slow_reader(port: int, pid: int, seconds: float) -> float:
    sampler = RssSampler(pid).start()
    try:
        stream_rate(port, seconds, rate=1_000_000)
    finally:
        growth = sampler.stop()
    return growth / MiB


# --- the peers ----------------------------------------------------------------------------------------------


def nginx_conf(workdir: Path, port: int, origin_port: int) -> str:
    http = f"""    upstream origin {{
        server 127.0.0.1:{origin_port};
    }}
    server {{
        listen 127.0.0.1:{port} backlog=2048;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}"""
    return origins.nginx_main(workdir, http)


def start_peer(name: str, origin_port: int, workdir: Path) -> peers.Running:
    if name == "gateway":
        return peers.Gateway().start(origin_port, workdir)
    port = procs.free_port()
    (workdir / "nginx.conf").write_text(nginx_conf(workdir, port, origin_port))
    proc = procs.start(name, origins.nginx_argv(workdir), workdir / "error.log")
    procs.wait_listening(port, proc)
    return peers.Running(name, port, proc)


def measure(name: str, origin_port: int, workdir: Path, args: argparse.Namespace) -> dict[str, float]:
    running = start_peer(name, origin_port, workdir)
    pid = running.pid
    assert pid is not None
    try:
        round_trips(running.port, 0.5)  # warm-up
        figures = {"round trips/s": round_trips(running.port, args.seconds)}
        figures["MB/s"] = stream_rate(running.port, args.seconds)
        figures["idle RSS MiB"], figures["idle KiB/tunnel"] = idle_tunnels(running.port, pid, args.tunnels)
        figures["slow reader RSS MiB"] = slow_reader(running.port, pid, args.seconds)
        running.check_alive()
        return figures
    finally:
        running.stop()


def table(results: dict[str, list[dict[str, float]]]) -> str:
    medians = {peer: {m: statistics.median(r[m] for r in runs) for m in METRICS} for peer, runs in results.items()}
    lines = ["| metric | gateway | nginx | gateway/nginx |", "|---|--:|--:|--:|"]
    for metric in METRICS:
        g, n = medians["gateway"][metric], medians["nginx"][metric]
        ratio = f"{g / n:.2f}x" if n else "-"
        lines.append(f"| {metric} | {g:,.2f} | {n:,.2f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--origin", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--tunnels", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args(argv)
    if args.origin is not None:
        run_origin(args.origin)
        return 0
    if not shutil.which("nginx"):
        log("nginx is not installed (apt-get install nginx-light)")
        return 1
    results: dict[str, list[dict[str, float]]] = {"gateway": [], "nginx": []}
    with tempfile.TemporaryDirectory(prefix="gateway-ws-bench-") as tmp:
        workdir = Path(tmp)
        origin_port = procs.free_port()
        origin = procs.start("origin", [sys.executable, __file__, "--origin", str(origin_port)], workdir / "origin.log")
        try:
            procs.wait_listening(origin_port, origin)
            for repeat in range(args.repeat):
                order = ["gateway", "nginx"] if repeat % 2 == 0 else ["nginx", "gateway"]
                for name in order:
                    peer_dir = workdir / f"{name}-{repeat}"
                    peer_dir.mkdir()
                    figures = measure(name, origin_port, peer_dir, args)
                    results[name].append(figures)
                    log(f"repeat {repeat + 1} {name}: " + ", ".join(f"{k} {v:,.2f}" for k, v in figures.items()))
        finally:
            procs.stop_all()
    text = table(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "websocket.md").write_text(
        f"# WebSocket (bench/websocket.py, {args.repeat} repeats, {args.seconds:g} s phases, {args.tunnels} idle "
        f"tunnels; medians)\n\n{text}\n"
    )
    (args.out / "websocket.json").write_text(
        json.dumps({"settings": vars(args) | {"out": str(args.out)}, "runs": results}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
