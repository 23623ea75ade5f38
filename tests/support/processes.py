"""Real processes for the subprocess tier: children read with bounded waits, and what /proc says about processes
that are not ours to reap (the worker processes `twistd gateway` starts).

Every child is started with `subprocess.Popen` and stopped by its PID (see the `spawn` fixture in
`tests/e2e/conftest.py`); every wait here has a deadline.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
LISTENING = re.compile(r"gateway listening on 127\.0\.0\.1:(\d+)")


class Child:
    """A child process whose stdout lines are read by a helper thread, so every wait can have a deadline."""

    def __init__(self, argv: list[str], *, cwd: Path, stderr_path: Path, **popen: Any) -> None:
        """`popen`: more arguments for `subprocess.Popen` (env, pass_fds, ...)."""
        self.argv = argv
        self.stderr_path = stderr_path
        self._stderr = stderr_path.open("wb")
        self.proc = subprocess.Popen(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr, text=True, **popen
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"stdout of {argv[0]}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first stdout line matching `pattern`, waiting at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {pattern.pattern!r} within {timeout} s; {self.output()}")
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=STOP_TIMEOUT)
                raise AssertionError(f"exited ({self.proc.returncode}) before {pattern.pattern!r}; {self.output()}")
            self.lines.append(line)
            found = pattern.search(line)
            if found:
                return found

    def rest_of_output(self) -> str:
        """Every stdout line up to the end of the output, once the process has exited (bounded)."""
        deadline = time.monotonic() + STOP_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                self._queue.put(None)
                break
            self.lines.append(line)
        return "".join(self.lines)

    def output(self) -> str:
        return f"stdout: {''.join(self.lines)!r}, stderr: {self.stderr()!r}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        """Kill the process by its PID if it still runs, reap it and close its pipes (bounded)."""
        try:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT)
        finally:
            self._reader.join(timeout=STOP_TIMEOUT)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._stderr.close()


def start(children: list[Child], argv: list[str], tmp_path: Path, name: str) -> Child:
    """Start `argv` in `tmp_path` as a `Child` recorded in `children` (the `spawn` fixture's list)."""
    child = Child(argv, cwd=tmp_path, stderr_path=tmp_path / f"{name}.stderr")
    children.append(child)
    return child


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def fetch(port: int, target: str, timeout: float = 30.0) -> bytes:
    """Every byte of the answer to one `GET target` with `Connection: close`, read with a deadline."""
    deadline = time.monotonic() + timeout
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n".encode())
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"response not complete within {timeout} s ({len(received)} bytes)")
            sock.settimeout(left)
            data = sock.recv(256 * 1024)
            if not data:
                return bytes(received)
            received += data


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that was free a moment ago (for configs that cannot say port 0)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


# --- /proc: processes that are not our children ---------------------------------------------------------------


def children_of(pid: int) -> set[int]:
    """The PIDs of the live child processes of `pid` (every thread's list in /proc/PID/task/*/children)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(child) for child in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def command_line(pid: int) -> list[str]:
    """The argv of process `pid`, or [] if it has gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_alive(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie waiting for its reaper counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_until_gone(pid: int, timeout: float) -> bool:
    """Poll until process `pid` has exited; False if it still runs after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while is_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def kill_if_ours(pid: int, marker: str) -> None:
    """SIGKILL process `pid` if it is alive and its command line contains `marker` (a PID can be reused), then
    wait (bounded) for it to exit."""
    if is_alive(pid) and any(marker in part for part in command_line(pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        wait_until_gone(pid, STOP_TIMEOUT)


def _tcp_sockets(pid: int) -> list[tuple[int, str]]:
    """The local port and state (hex, as the kernel writes it: "01" established, "0A" listening) of every TCP
    socket process `pid` holds (its fds matched by inode against /proc/PID/net/tcp and tcp6)."""
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return []
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[9] in inodes:
                found.append((int(fields[1].rpartition(":")[2], 16), fields[3]))
    return found


def established_on(pid: int, port: int) -> int:
    """How many established TCP connections to local `port` process `pid` holds: the client connections it has
    accepted."""
    return sum(1 for local_port, state in _tcp_sockets(pid) if local_port == port and state == "01")


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on."""
    return {local_port for local_port, state in _tcp_sockets(pid) if state == "0A"}
