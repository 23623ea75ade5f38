"""A real `redis-server` (Debian's package) for the tests: on a free loopback port, without persistence, started
and stopped by PID, with every wait bounded.

`pause()`/`resume()` (SIGSTOP/SIGCONT) make it a Redis that is there but silent; `stop()` then `start()` make it a
Redis that went away and came back on the same port.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from gateway.redis.protocol import Reply, RespParser, encode
from tests.support.processes import free_port

SERVER = shutil.which("redis-server")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class RedisServer:
    """One redis-server process on 127.0.0.1:`port`."""

    def __init__(self, workdir: Path, *, password: str | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def _log_path(self) -> Path:
        return self.workdir / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert SERVER is not None, "redis-server is not installed (.ci/run installs it)"
        argv = [SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.workdir), "--daemonize", "no", "--loglevel", "warning"]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        log = self._log_path.open("ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.proc.poll() is None, f"redis-server exited: {self._log_path.read_text()}"
            if self._answers():
                return self
            assert time.monotonic() < deadline, "redis-server did not answer PING in time"
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                if self.password is not None:
                    sock.sendall(b"AUTH %s\r\n" % self.password.encode())
                    sock.recv(64)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> Reply:
        """One command over a blocking socket (for checks from outside the code under test): its reply."""
        commands = [("AUTH", self.password)] if self.password is not None else []
        commands.append(args)
        parser = RespParser()
        replies: list[Reply] = []
        with socket.create_connection(("127.0.0.1", self.port), timeout=5.0) as sock:
            sock.sendall(b"".join(encode(*command) for command in commands))
            for _ in range(1000):
                data = sock.recv(1 << 16)
                assert data, "redis-server closed the connection"
                replies += parser.feed(data)
                if len(replies) == len(commands):
                    return replies[-1]
        raise AssertionError("no reply from redis-server")

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop it by PID (a paused one is resumed first so it can exit)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
