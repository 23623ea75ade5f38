"""`twistd gateway` with `[limits.store]` in a real redis-server: two worker processes share one limit exactly,
and the concurrency slot of a gateway that is killed comes free once its lease expires.

Subprocess tier: every process is started with `subprocess.Popen` and stopped by its PID (redis-server by the
`redis_server` fixture); every wait has a deadline.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import sys
import time
from pathlib import Path

from gateway.auth.apikeys import hash_key
from tests.e2e.test_workers import LISTENING, start_workers
from tests.support.clients import parse_response
from tests.support.processes import START_TIMEOUT, TWISTD, Child, fetch, free_port, kill_if_ours, start
from tests.support.redis import RedisServer

KEY = "gwk_redis-e2e-key"


def store_toml(server: RedisServer, **extra: str) -> str:
    lines = ['type = "redis"', f'url = "{server.url}"', 'timeout = "1s"', 'prefix = "e2e:"']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "[limits.store]\n" + "\n".join(lines) + "\n"


def status(port: int, target: str = "/report?size=10", key: str | None = None) -> int:
    data = fetch_with(port, target, key)
    return parse_response(data).status


def fetch_with(port: int, target: str, key: str | None) -> bytes:
    if key is None:
        return fetch(port, target)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n".encode())
        received = bytearray()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            received += data
        return bytes(received)


def test_two_workers_share_one_limit_exactly(tmp_path: Path, spawn: list[Child], redis_server: RedisServer) -> None:
    """workers = 2 and an anonymous rate of 20 a minute: 40 requests on 40 connections (the kernel spreads them
    over both processes) get exactly 20 answers and 20 refusals; both processes are Redis's clients."""
    extra = '[admission.rate_limits]\nanonymous = { rate = "20/m" }\n\n' + store_toml(redis_server)
    workers = start_workers(tmp_path, spawn, extra=extra)
    try:
        wait_for_clients(redis_server, 4)  # both processes' pools of 2
        statuses = [status(workers.port) for _ in range(40)]
        assert statuses.count(200) == 20 and statuses.count(429) == 20, statuses
    finally:
        kill_if_ours(workers.worker_pid, "gateway.operations.worker")


def wait_for_clients(server: RedisServer, count: int) -> None:
    """Until `count` connections (besides the one asking) are Redis's clients: every gateway's pool is made, so no
    check falls back to counting in its process (bounded)."""
    clients = b""
    for _ in range(500):
        clients = server.command("CLIENT", "LIST")  # type: ignore[assignment]
        assert isinstance(clients, bytes)
        if len(clients.splitlines()) >= count + 1:
            return
        time.sleep(0.02)
    raise AssertionError(f"fewer than {count} Redis clients: {clients!r}")


def _gateway(tmp_path: Path, spawn: list[Child], name: str, upstream: int, server: RedisServer) -> tuple[Child, int]:
    port = free_port()
    config = tmp_path / f"{name}.toml"
    config.write_text(
        f'[[listeners]]\nhost = "127.0.0.1"\nport = {port}\n\n'
        f'[[routes]]\nname = "demo"\nauth = ["keys"]\npath_prefix = "/"\nupstream = "http://127.0.0.1:{upstream}"\n\n'
        '[admission]\nmax_concurrent = 1\n\n[auth.keys]\ntype = "api_key"\nheaders = ["X-API-Key"]\n\n'
        f'[consumers.app]\napi_keys = ["{hash_key(KEY)}"]\n\n' + store_toml(server, lease_ttl='"2s"')
    )
    child = start(
        spawn,
        [str(TWISTD), "--nodaemon", "--pidfile=", "--logfile=-", "gateway", "--config", config.name],
        tmp_path,
        name,
    )
    child.wait_for_line(LISTENING, START_TIMEOUT)
    return child, port


def test_killed_gateways_slot_comes_free(tmp_path: Path, spawn: list[Child], redis_server: RedisServer) -> None:
    """A consumer capped at 1 request in flight holds its slot through gateway A; gateway B refuses it (429); A is
    killed (SIGKILL: no release); B admits the consumer again once A's lease expired (2 s), not before."""
    demo = start(spawn, [sys.executable, "-m", "gateway.demo", "--port", "0"], tmp_path, "demo")
    upstream = json.loads(demo.wait_for_line(re.compile(r"^\{.*\}$"), START_TIMEOUT).group(0))["port"]
    a, port_a = _gateway(tmp_path, spawn, "a", upstream, redis_server)
    b, port_b = _gateway(tmp_path, spawn, "b", upstream, redis_server)
    wait_for_clients(redis_server, 4)
    held = socket.create_connection(("127.0.0.1", port_a), timeout=30)
    try:
        held.sendall(f"GET /events?interval=0.1 HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\n\r\n".encode())
        assert held.recv(65536).startswith(b"HTTP/1.1 200"), "the held request was not admitted"
        assert status(port_b, key=KEY) == 429
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(30)
        admitted = False
        for _ in range(200):  # bounded: 2 s lease, 20 s at most
            if status(port_b, key=KEY) == 200:
                admitted = True
                break
            time.sleep(0.1)
        assert admitted, "the killed gateway's slot never came free"
    finally:
        held.close()
        b.stop()
