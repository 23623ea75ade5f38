"""`twistd gateway` with `workers = 2`: two processes share the port, both serve, and no worker outlives twistd.

Subprocess tier: the demo upstream and twistd are started with `subprocess.Popen` and stopped by their PIDs (the
`spawn` fixture); the worker twistd starts is not our child, so it is watched through /proc and, if it is still
running after a test, killed by its PID. Everything listens on 127.0.0.1; every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.clients import Parsed, parse_response
from tests.support.processes import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    TWISTD,
    Child,
    children_of,
    command_line,
    established_on,
    free_port,
    is_alive,
    kill_if_ours,
    run,
    start,
    wait_until_gone,
)

LISTENING = re.compile(r"gateway listening on 127\.0\.0\.1:(\d+) \(pid (\d+)\)")
WORKER_STARTED = re.compile(r"gateway worker 1 started \(pid (\d+)\)")
CONNECTIONS = 40
"""Connections held open at once: the kernel hashes each to one of the two sockets, so all 40 landing in one
process has a chance of 2 in 2**40."""


@dataclass
class Workers:
    twistd: Child
    port: int
    config: Path
    worker_pid: int


@pytest.fixture
def workers(tmp_path: Path, spawn: list[Child]) -> Iterator[Workers]:
    """The demo upstream and `twistd gateway` with `workers = 2` in front of it, both processes listening."""
    demo = start(spawn, [sys.executable, "-m", "gateway.demo", "--port", "0"], tmp_path, "demo")
    upstream = json.loads(demo.wait_for_line(re.compile(r"^\{.*\}$"), START_TIMEOUT).group(0))
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\nworkers = 2\n\n[[listeners]]\nhost = "127.0.0.1"\nport = {port}\n\n'
        f'[[routes]]\nname = "demo"\nauth = "anonymous"\npath_prefix = "/"\nupstream = "http://127.0.0.1:{upstream["port"]}"\n'
    )
    twistd = start(
        spawn,
        # The config path is relative: the worker must still find the same file.
        [str(TWISTD), "--nodaemon", "--pidfile=", "--logfile=-", "gateway", "--config", config.name],
        tmp_path,
        "twistd",
    )
    listening = [twistd.wait_for_line(LISTENING, START_TIMEOUT) for _ in range(2)]
    assert {int(found.group(1)) for found in listening} == {port}, twistd.output()
    started = [m for line in twistd.lines if (m := WORKER_STARTED.search(line))]
    assert len(started) == 1, twistd.output()
    worker_pid = int(started[0].group(1))
    assert {int(found.group(2)) for found in listening} == {twistd.proc.pid, worker_pid}, twistd.output()
    # Serving: the worker's reactor runs, so SIGTERM reaches Twisted's handler rather than killing it outright.
    twistd.wait_for_line(re.compile(rf"gateway worker 1 \(pid {worker_pid}\) serving"), START_TIMEOUT)
    yield Workers(twistd, port, config, worker_pid)
    kill_if_ours(worker_pid, "gateway.worker")


def get_on(sock: socket.socket, target: str, timeout: float = 30.0) -> Parsed:
    """One keep-alive `GET target` on an open connection, read until the response is complete (with a deadline)."""
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: gateway.test\r\n\r\n".encode())
    deadline = time.monotonic() + timeout
    received = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"response not complete within {timeout} s: {bytes(received)!r}")
        sock.settimeout(left)
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"connection closed before the response was complete: {bytes(received)!r}")
        received += data
        try:
            response = parse_response(bytes(received))
        except ValueError:
            continue
        if response.complete:
            return response


def test_two_workers_are_twistd_and_one_child(workers: Workers) -> None:
    """With `workers = 2`, twistd has exactly one child process: `gateway.worker` with index 1 on the same config
    file, given as an absolute path."""
    assert children_of(workers.twistd.proc.pid) == {workers.worker_pid}
    argv = command_line(workers.worker_pid)
    assert argv[1:] == ["-m", "gateway.worker", "--config", str(workers.config), "--index", "1"]
    assert os.path.isabs(argv[4])


def test_connections_are_served_by_both_processes(workers: Workers) -> None:
    """Forty connections held open at once, each answered, are spread by the kernel over both processes."""
    pids = [workers.twistd.proc.pid, workers.worker_pid]
    sockets: list[socket.socket] = []
    try:
        for _ in range(CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", workers.port), timeout=30)
            sockets.append(sock)
            response = get_on(sock, "/report?size=100")
            assert (response.status, len(response.body)) == (200, 100)
        counts = {pid: established_on(pid, workers.port) for pid in pids}
    finally:
        for sock in sockets:
            sock.close()
    assert sum(counts.values()) == CONNECTIONS, counts
    assert all(count > 0 for count in counts.values()), counts


def test_sigterm_stops_twistd_and_its_worker(workers: Workers) -> None:
    """SIGTERM to twistd stops the worker too: twistd exits within a bounded time, after logging the worker's
    clean exit, and leaves no worker behind."""
    twistd = workers.twistd
    os.kill(twistd.proc.pid, signal.SIGTERM)
    try:
        returncode = twistd.proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"twistd still running {STOP_TIMEOUT} s after SIGTERM; {twistd.output()}")
    assert not is_alive(workers.worker_pid)
    log = twistd.rest_of_output()
    assert returncode in (-signal.SIGTERM, 0), twistd.output()
    assert f"gateway worker 1 (pid {workers.worker_pid}) exited with status 0" in log, twistd.output()
    assert "Server Shut Down." in log, twistd.output()
    assert "Traceback" not in log + twistd.stderr()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", workers.port), timeout=5).close()


def test_worker_exits_when_twistd_is_killed(workers: Workers) -> None:
    """SIGKILL to twistd (no chance to stop anything) still ends the worker: its stdin pipe from twistd closes."""
    twistd = workers.twistd
    os.kill(twistd.proc.pid, signal.SIGKILL)
    twistd.proc.wait(timeout=STOP_TIMEOUT)
    assert wait_until_gone(workers.worker_pid, STOP_TIMEOUT), "the worker outlived twistd"
    log = twistd.rest_of_output()
    assert f"gateway worker 1 (pid {workers.worker_pid}): parent gone (stdin closed), stopping" in log, log
    assert "Traceback" not in log + twistd.stderr()


def test_worker_with_an_invalid_config_exits_1_with_one_line(tmp_path: Path) -> None:
    """`python -m gateway.worker` on an invalid config exits 1 with `gateway worker N: file: key: reason`."""
    config = tmp_path / "bad.toml"
    config.write_text('[server]\nworkers = 0\n\n[[listeners]]\nhost = "127.0.0.1"\nport = 1\n')
    done = run([sys.executable, "-m", "gateway.worker", "--config", str(config), "--index", "1"], cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr == f"gateway worker 1: {config}: server.workers: must be a positive integer, got 0\n"
    assert done.stdout == ""
