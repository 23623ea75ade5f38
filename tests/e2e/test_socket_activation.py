"""systemd socket activation: a listener `systemd = "http"` serves on the listening socket passed in at fd 3
(LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID, as systemd passes it), worker processes serve it too, and a restart
refuses no connection: the socket outlives the gateway process, so a client that connects between two gateway
processes waits in the backlog and is answered by the next one.

Subprocess tier: this test plays systemd. It holds the listening socket, starts twistd through `sh -c 'exec'`
(so LISTEN_PID can name the process that runs twistd), and stops every process by its PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.clients import parse_response
from tests.support.processes import START_TIMEOUT, STOP_TIMEOUT, TWISTD, Child, command_line, kill_if_ours, start

LISTENING = re.compile(r"gateway listening on 127\.0\.0\.1:(\d+) \(systemd socket 'http'\) \(pid (\d+)\)")
WORKER_STARTED = re.compile(r"gateway worker 1 started \(pid (\d+)\)")


def start_activated(children: list[Child], tmp_path: Path, config: Path, listening: socket.socket) -> Child:
    """`twistd gateway` on `config` with `listening` passed as systemd's socket "http" (fd 3)."""
    fd = listening.fileno()
    argv = [
        "/bin/sh",
        "-c",
        'export LISTEN_PID=$$; exec "$0" "$@"',  # $$: the shell's pid, which exec hands on to twistd
        str(TWISTD),
        "--nodaemon",
        "--pidfile=",
        "--logfile=-",
        "gateway",
        "--config",
        str(config),
    ]
    child = Child(
        argv,
        cwd=tmp_path,
        stderr_path=tmp_path / f"twistd-{len(children)}.stderr",
        env={**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"},
        pass_fds=(3,),
        preexec_fn=lambda: os.dup2(fd, 3),  # the child's fd 3, where systemd puts its first socket
    )
    children.append(child)
    return child


def get(port: int, target: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n".encode())
        received = bytearray()
        while data := sock.recv(65536):
            received += data
    response = parse_response(bytes(received))
    return response.status, response.body


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    """The listening socket systemd would hold for the .socket unit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock
    sock.close()


def write_config(tmp_path: Path, upstream_port: int, workers: int) -> Path:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\nworkers = {workers}\ndrain_timeout = "5s"\n\n[[listeners]]\nsystemd = "http"\n\n'
        f'[[routes]]\nname = "demo"\nauth = "anonymous"\npath_prefix = "/"\n'
        f'upstream = "http://127.0.0.1:{upstream_port}"\n'
    )
    return config


def demo(spawn: list[Child], tmp_path: Path) -> int:
    child = start(spawn, [sys.executable, "-m", "gateway.demo", "--port", "0"], tmp_path, "demo")
    return int(json.loads(child.wait_for_line(re.compile(r"^\{.*\}$"), START_TIMEOUT).group(0))["port"])


def test_the_systemd_socket_is_served_by_twistd_and_its_worker(
    tmp_path: Path, spawn: list[Child], listening: socket.socket
) -> None:
    """With `workers = 2`, twistd and its worker both adopt the socket systemd passed (the worker gets it at the
    same descriptor and its name on the command line), and requests on it are answered."""
    config = write_config(tmp_path, demo(spawn, tmp_path), workers=2)
    port = listening.getsockname()[1]
    twistd = start_activated(spawn, tmp_path, config, listening)
    adopted = [twistd.wait_for_line(LISTENING, START_TIMEOUT) for _ in range(2)]
    worker_pid = int(next(m.group(1) for line in twistd.lines if (m := WORKER_STARTED.search(line))))
    try:
        assert {int(m.group(1)) for m in adopted} == {port}
        assert {int(m.group(2)) for m in adopted} == {twistd.proc.pid, worker_pid}
        # Its channel to twistd's admin listener comes after the sockets systemd passed.
        assert command_line(worker_pid)[-4:] == ["--inherited", "http=3", "--channel-fd", "4"]
        for _ in range(10):
            assert get(port, "/report?size=100")[0] == 200
    finally:
        os.kill(twistd.proc.pid, signal.SIGTERM)
        twistd.proc.wait(timeout=STOP_TIMEOUT)
        kill_if_ours(worker_pid, "gateway.operations.worker")
    assert twistd.proc.returncode == 0, twistd.output()


def test_a_restart_refuses_no_connection(tmp_path: Path, spawn: list[Child], listening: socket.socket) -> None:
    """Between one gateway process and the next, the socket (held by systemd, here by the test) still takes
    connections into its backlog: a client that connects while no gateway runs is answered by the next one."""
    config = write_config(tmp_path, demo(spawn, tmp_path), workers=1)
    port = listening.getsockname()[1]
    first = start_activated(spawn, tmp_path, config, listening)
    first.wait_for_line(LISTENING, START_TIMEOUT)
    assert get(port, "/report?size=10")[0] == 200
    os.kill(first.proc.pid, signal.SIGTERM)
    assert first.proc.wait(timeout=STOP_TIMEOUT) == 0, first.output()
    # No gateway runs now. The connection is accepted by the kernel, not refused.
    waiting = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        waiting.sendall(b"GET /report?size=10 HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n")
        second = start_activated(spawn, tmp_path, config, listening)
        second.wait_for_line(LISTENING, START_TIMEOUT)
        received = bytearray()
        waiting.settimeout(30)
        while data := waiting.recv(65536):
            received += data
    finally:
        waiting.close()
    response = parse_response(bytes(received))
    assert (response.status, len(response.body)) == (200, 10)
