"""Logs as JSON lines: the observer for `twistd --logger=gateway.logs.observer`, and the access log.

Rules:
* Every request leaves exactly one access-log line, written once it has ended however it ended (the request's
  terminal transition, or the channel's refusal of a head that never became a request). The line goes through
  `twisted.logger`, but on a publisher of its own: access lines never mix into the service log, and the service
  log's observers never pay for them.
* Secrets never reach a line: no header values but the User-Agent's, and the query string only when the config
  says so (tokens travel in queries).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogPublisher,
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
    return JsonLinesObserver(sys.__stdout__)  # not sys.stdout, which twistd redirects into the log itself


class AccessLog:
    """The access log: one JSON line per request, to stdout or to a file, or nowhere (path "").

    A file is opened for appending and reopened by `reopen` (SIGUSR1), so logrotate can move it away and signal;
    each line is written whole and flushed, so a line is never split between two files or left in a buffer.
    One object lives as long as the process: a reload `configure`s it, and requests still running on the old
    config write through the same object."""

    def __init__(self, path: str = "-", *, include_query: bool = False, clock: IReactorTime | None = None) -> None:
        self.path = ""
        self.include_query = include_query
        self._clock = clock
        self._flush_call: IDelayedCall | None = None
        self._out: IO[str] | None = None
        self._logger = Logger(namespace=ACCESS_NAMESPACE, observer=LogPublisher(self._write))
        self.configure(path, include_query=include_query)

    def configure(self, path: str, *, include_query: bool) -> None:
        """Write to `path` from now on ("-" stdout, "" nowhere); a file that cannot be opened raises OSError
        and leaves the log as it was."""
        if path == self.path:
            self.include_query = include_query
            return
        out = self._open(path)  # may raise: nothing has changed yet
        self.include_query = include_query
        self.flush()
        old, self._out, self.path = self._out, out, path
        self._close(old)

    @staticmethod
    def _open(path: str) -> IO[str] | None:
        if path == "":
            return None
        if path == "-":
            # The process's real stdout: twistd replaces sys.stdout with a file that logs what is written to it.
            return sys.__stdout__
        return open(path, "a", encoding="utf-8")

    @staticmethod
    def _close(out: IO[str] | None) -> None:
        if out is not None and out is not sys.__stdout__:
            out.close()

    @property
    def enabled(self) -> bool:
        return self._out is not None

    def record(self, fields: dict[str, Any]) -> None:
        """Log one request's line; `fields` are its keys in order (the time is added from the event)."""
        if self._out is not None:
            self._logger.info("access", access=fields)

    def _write(self, event: LogEvent) -> None:
        out = self._out
        if out is None:
            return
        fields = {"time": _timestamp(event["log_time"]), **event["access"]}
        out.write(_encode(fields) + "\n")
        if self._clock is None:
            out.flush()
        elif self._flush_call is None:
            # Flushed once the current reactor turn is over: every line of the requests that ended in it goes
            # out in one write (each line whole: a line is at most a few hundred bytes, the buffer 8 KiB).
            self._flush_call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        self._flush_call = None
        if self._out is not None:
            self._out.flush()

    def reopen(self) -> None:
        """Reopen the file (after logrotate moved it away); stdout is left as it is."""
        if self.path in ("", "-"):
            return
        self.flush()
        out = self._open(self.path)
        old, self._out = self._out, out
        self._close(old)

    def close(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self.flush()
        old, self._out = self._out, None
        self._close(old)
