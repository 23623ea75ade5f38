"""Child processes of the harness: start, wait until listening, stop by PID (SIGTERM, then SIGKILL after a bound).

Every process the harness starts is registered here, so that `stop_all()` (called on the way out, whatever
happened) stops the ones still running, each by its own PID and its process tree as it was seen last.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import tree

STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL

_running: list[Proc] = []


@dataclass
class Proc:
    """One child process (and whatever processes it starts itself)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path | None = None
    _seen: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def remember_tree(self) -> None:
        """Note the PIDs of the process tree, so that orphans left by the main process can be stopped too."""
        if self.alive():
            self._seen.update(tree(self.pid))

    def stop(self) -> None:
        self.remember_tree()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=STOP_GRACE)
        # Children of the main process (worker processes) that outlived it: by their PIDs, as seen while it ran.
        for pid in self._seen - {self.pid}:
            if _is_running(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._seen.clear()
        with contextlib.suppress(ValueError):
            _running.remove(self)

    def log_tail(self, lines: int = 5) -> str:
        if self.log is None or not self.log.exists():
            return ""
        text = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])


def _is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def start(name: str, argv: list[str], log: Path, *, stdout_pipe: bool = False, cwd: Path | None = None) -> Proc:
    """Start `argv`; its stderr (and stdout unless piped) goes to `log`."""
    with open(log, "ab") as logf:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else logf,
            stderr=logf,
            cwd=cwd,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the harness only, which stops them itself
        )
    proc = Proc(name, popen, log)
    _running.append(proc)
    return proc


def stop_all() -> None:
    for proc in list(_running):
        with contextlib.suppress(Exception):
            proc.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_port(proc: Proc, timeout: float = 15.0) -> int:
    """The port a child announces as a JSON line {"port": N} on its stdout."""
    assert proc.popen.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.popen.stdout.readline()
        if not line:
            break
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return int(json.loads(line)["port"])
    raise RuntimeError(f"{proc.name} did not announce its port: {proc.log_tail()}")


def wait_listening(port: int, proc: Proc, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with status {proc.popen.returncode}: {proc.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{proc.name}: nothing listening on port {port} after {timeout:.0f} s")
