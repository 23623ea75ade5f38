"""A stand-in for systemd's notification socket (sd_notify): an AF_UNIX datagram socket bound at a path, whose
datagrams are read with deadlines and parsed into their `KEY=value` assignments."""

from __future__ import annotations

import socket
from pathlib import Path

MAX_PATH = 107
"""The longest path an AF_UNIX address holds (sun_path is 108 bytes, with its NUL)."""


class NotifySocket:
    """Bound at `path` until `close()`; `receive` waits for one datagram, at most `timeout` seconds."""

    def __init__(self, path: Path) -> None:
        if len(str(path).encode()) > MAX_PATH:
            raise ValueError(f"{path} is too long for an AF_UNIX address")
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self.received: list[dict[str, str]] = []
        """Every datagram received so far, in order."""

    def receive(self, timeout: float) -> dict[str, str]:
        """The next datagram's assignments (in the order sent), or AssertionError after `timeout` seconds."""
        self._socket.settimeout(timeout)
        try:
            data = self._socket.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no notification within {timeout} s; received so far: {self.received}") from None
        assignments = dict(line.split("=", 1) for line in data.decode("utf-8").split("\n") if line)
        self.received.append(assignments)
        return assignments

    def pending(self) -> list[dict[str, str]]:
        """The datagrams already queued, without waiting."""
        found = []
        self._socket.setblocking(False)
        try:
            while True:
                try:
                    data = self._socket.recv(65536)
                except BlockingIOError:
                    return found
                found.append(dict(line.split("=", 1) for line in data.decode("utf-8").split("\n") if line))
        finally:
            self._socket.setblocking(True)
            self.received.extend(found)

    def close(self) -> None:
        self._socket.close()
        self.path.unlink(missing_ok=True)
