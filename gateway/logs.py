"""Logs as JSON lines: the observer for `twistd --logger=gateway.logs.observer`, and the access log.

Rules:
* Every request leaves exactly one access-log line, written once it has ended however it ended (the request's
  terminal transition, or the channel's refusal of a head that never became a request). The line goes through
  `twisted.logger`, but on a publisher of its own: access lines never mix into the service log, and the service
  log's observers never pay for them.
* Secrets never reach a line: no header values but the User-Agent's and the Host, and the query string only when
  the config says so (tokens travel in queries).
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from datetime import UTC, datetime
from typing import IO, Any, cast

import orjson
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    formatEvent,
)
from zope.interface import implementer

__all__ = ["ACCESS_NAMESPACE", "AccessLog", "JsonLinesObserver", "observer"]

ACCESS_NAMESPACE = "gateway.access"


_second: tuple[int, str] = (-1, "")


def _timestamp(seconds: float) -> str:
    """RFC 3339 in UTC with milliseconds: "2026-12-02T16:27:52.380Z" (the second's text made once a second)."""
    global _second
    whole = int(seconds)
    if _second[0] != whole:
        _second = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_second[1]}.{int((seconds - whole) * 1000):03d}Z"


FLUSH_INTERVAL = 0.2
"""Seconds an access-log line may wait in the buffer (with a clock); stdout and files alike."""
FLUSH_BYTES = 64 * 1024
"""Bytes of lines after which the buffer is written at once."""

_encode = json.JSONEncoder(separators=(",", ":")).encode
"""One encoder for every line: `json.dumps` with separators builds a new one per call."""


@implementer(ILogObserver)
class JsonLinesObserver:
    """Writes every event as one JSON object per line: time, level, namespace, the formatted message, and the
    traceback of a logged failure. For the service log (journald reads it from stdout)."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: LogEvent) -> None:
        level = event.get("log_level")
        line: dict[str, Any] = {
            "time": _timestamp(event.get("log_time", 0.0)),
            "level": getattr(level, "name", "info"),
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            line["traceback"] = failure.getTraceback()
        self._out.write(_encode(line) + "\n")
        self._out.flush()


def observer() -> ILogObserver:
    """The service log as JSON lines on stdout: `twistd --logger=gateway.logs.observer gateway ...`."""
    # Not sys.stdout, which twistd redirects into the log itself. (__stdout__ is None only in a process started
    # without one.)
    return JsonLinesObserver(cast(IO[str], sys.__stdout__))


class AccessLog:
    """The access log: one JSON line per request, to stdout or to a file, or nowhere (path "").

    Lines are kept in a buffer of the log's own and written with `os.write` in pieces that end on a line and
    hold at most PIPE_BUF bytes (a line longer than that goes alone): each is one atomic write, so worker
    processes sharing stdout (journald) or the same file (opened O_APPEND by each) never interleave inside a
    line. With a clock, the buffer is written FLUSH_INTERVAL after its first line, or at once past
    FLUSH_BYTES, as nginx's `access_log buffer=`; without one, at every line. A file is reopened by `reopen`
    (SIGUSR1, for logrotate) after the buffer is written, so no line is split between two files. One object
    lives as long as the process: a reload `configure`s it, and requests still running on the old config write
    through the same object."""

    def __init__(
        self,
        path: str = "-",
        *,
        include_query: bool = False,
        clock: IReactorTime | None = None,
        stdout_is_log: bool = False,
    ) -> None:
        self.path = ""
        self.include_query = include_query
        self._stdout_is_log = stdout_is_log
        """"-" means the process's log (twistd's log file) rather than its standard output: a twistd that
        daemonises sends its standard output to /dev/null."""
        self._clock = clock
        self._flush_call: IDelayedCall | None = None
        self._fd: int | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.configure(path, include_query=include_query)

    def configure(self, path: str, *, include_query: bool) -> None:
        """Write to `path` from now on ("-" stdout, "" nowhere); a file that cannot be opened raises OSError
        and leaves the log as it was."""
        if path == self.path:
            self.include_query = include_query
            return
        fd = self._open(path)  # may raise: nothing has changed yet
        self.include_query = include_query
        self.flush()
        old_fd, old_path = self._fd, self.path
        self._fd, self.path = fd, path
        self._close(old_fd, old_path not in ("", "-"))

    def _open(self, path: str) -> int | None:
        if path == "":
            return None
        if path == "-" and self._stdout_is_log:
            return _TO_LOG
        if path == "-":
            # The process's real stdout: twistd replaces sys.stdout with a file that logs what is written to it.
            return sys.__stdout__.fileno() if sys.__stdout__ is not None else 1
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    @staticmethod
    def _close(fd: int | None, owned: bool) -> None:
        if fd is not None and owned:
            os.close(fd)

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    def record(self, fields: dict[str, Any]) -> None:
        """Log one request's line, stamped with the wall time of now; `fields` are its keys in order. Written
        straight into the buffer (a `twisted.logger` event per line, built and published, cost as much as the
        line's JSON)."""
        if self._fd is None:
            return
        body = orjson.dumps(fields)
        # The time first, then the record's own fields: '{"time":"...",' and the record's object less its "{".
        stamp = _timestamp(time.time()).encode("ascii")
        data = b'{"time":"' + stamp + (b'",' if len(body) > 2 else b'"') + body[1:] + b"\n"
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._clock is None or self._pending_bytes >= FLUSH_BYTES:
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self._clock.callLater(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        """Write what the buffer holds, in whole-line pieces of at most PIPE_BUF bytes."""
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        fd = self._fd
        if fd is None or not pending:
            return
        if fd == _TO_LOG:
            for line in pending:
                _DAEMON_LOG.info("{line}", line=line.decode("utf-8").rstrip("\n"))
            return
        piece: list[bytes] = []
        size = 0
        for line in pending:
            if piece and size + len(line) > _PIPE_BUF:
                _write_all(fd, b"".join(piece))
                piece, size = [], 0
            piece.append(line)
            size += len(line)
        _write_all(fd, b"".join(piece))

    def reopen(self) -> None:
        """Reopen the file (after logrotate moved it away); stdout is left as it is."""
        if self.path in ("", "-"):
            return
        self.flush()
        fd = self._open(self.path)
        old, self._fd = self._fd, fd
        self._close(old, True)

    def close(self) -> None:
        self.flush()
        old, self._fd = self._fd, None
        self._close(old, self.path not in ("", "-"))


_TO_LOG = -1
"""The "descriptor" of an access log written into the process's own log (a daemon's log file)."""
_DAEMON_LOG = Logger(namespace=ACCESS_NAMESPACE)
"""Where such lines go: the global log publisher, which twistd's log file observes (and rotates)."""


_PIPE_BUF = select.PIPE_BUF
"""The largest write to a pipe that is atomic (4096 on Linux)."""


def _write_all(fd: int, data: bytes) -> None:
    """All of `data` to `fd`; a log that cannot be written is reported on stderr, never raised into a request."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as e:
        print(f"gateway: the access log cannot be written: {e}", file=sys.stderr)
