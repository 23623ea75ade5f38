"""A demo upstream to put behind the gateway: `python -m gateway.demo [--host H] [--port P]`.

Endpoints, each streaming with flat memory of its own:
* `GET /report?size=BYTES[&chunked=1]` a generated CSV report of exactly BYTES bytes (default 1 MiB; units such
  as `1GiB` allowed), sent with Content-Length, or chunked with `chunked=1`;
* `GET /events?interval=SECONDS[&count=N]` server-sent events, one every interval (default 1 s, for ever);
* `POST|PUT /upload[?rate=BYTES_PER_SECOND]` an upload sink that reads the body as it comes (as slowly as
  `rate` says, if given) and answers with its byte count and SHA-256.
Rule: it is a separate program and imports nothing of the gateway's.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from functools import partial
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from gateway.demo.wire import Connection, Endpoint, Reading, Request, Response

__all__ = ["make_factory", "report_chunks"]

_CHUNK = 64 * 1024
_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3}
_TEXT = b"text/plain; charset=utf-8"


def _size(text: bytes | None, default: int) -> int:
    """A size such as `1048576`, `64KiB` or `1GB`; ValueError for anything else."""
    if text is None:
        return default
    m = re.fullmatch(r"(\d+)([a-zA-Z]*)", text.decode("ascii", "replace"))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _report_block() -> bytes:
    """Fixed-width CSV rows (64 bytes each) filling one 64 KiB block, repeated to any size."""
    regions = ["emea", "apac", "amer", "latam"]
    rows = []
    for i in range(_CHUNK // 64):
        row = f"{i:08d},{regions[i % 4]},widget-{i % 97:02d},{(i * 7919) % 100000 / 100:10.2f},ok"
        rows.append(row.ljust(63) + "\n")
    block = "".join(rows).encode("ascii")
    assert len(block) == _CHUNK
    return block


_BLOCK = _report_block()
_HEADER = b"id,region,product,amount,status".ljust(63) + b"\n"
_FIRST = _HEADER + _BLOCK[len(_HEADER) :]


def report_chunks(size: int) -> Iterator[bytes]:
    """The report of `size` bytes in pieces of at most 64 KiB: the CSV header line first, then fixed-width rows.
    A shorter report is a prefix of a longer one."""
    block = _FIRST
    while size > 0:
        piece = block[:size]
        size -= len(piece)
        yield piece
        block = _BLOCK


class _Fixed:
    """A whole answer known from the head (the index, a refusal); a body sent with the request is dropped."""

    def __init__(self, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self._status = status
        self._body = body
        self._headers = headers

    def body_received(self, data: bytes) -> None:
        pass

    def respond(self, response: Response) -> None:
        response.answer(self._status, _TEXT, self._body, self._headers)

    def stop(self) -> None:
        pass


@implementer(IPushProducer)
class _ReportProducer:
    """Writes the report while the client's socket takes it; stops when the client goes."""

    def __init__(self, response: Response, size: int) -> None:
        self._response = response
        self._chunks = report_chunks(size)
        self._paused = False
        self._stopped = False

    def resumeProducing(self) -> None:
        self._paused = False
        while not self._paused and not self._stopped:
            chunk = next(self._chunks, None)
            if chunk is None:
                self._stopped = True
                self._response.finish()
                return
            self._response.write(chunk)

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._stopped = True


class _Report:
    """`/report`: its length known from the query, so HEAD gets it too; its body written by `_ReportProducer`."""

    def __init__(self, size: int, chunked: bool) -> None:
        self._size = size
        self._chunked = chunked
        self._producer: _ReportProducer | None = None

    def body_received(self, data: bytes) -> None:
        pass

    def respond(self, response: Response) -> None:
        head_only = response.request.method == b"HEAD"
        length = None if self._chunked and not head_only else self._size
        response.start(200, [(b"Content-Type", b"text/csv")], length)
        if head_only:
            response.finish()
            return
        self._producer = _ReportProducer(response, self._size)
        response.register_producer(self._producer)
        self._producer.resumeProducing()

    def stop(self) -> None:
        if self._producer is not None:
            self._producer.stopProducing()


class _Events:
    """`/events`: a tick every interval on the clock, `count` of them or for ever; the timer stops with the client."""

    def __init__(self, clock: IReactorTime, interval: float, count: int) -> None:
        self._clock = clock
        self._interval = interval
        self._count = count  # 0: for ever
        self._sent = 0
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._response: Response | None = None

    def body_received(self, data: bytes) -> None:
        pass

    def respond(self, response: Response) -> None:
        response.start(200, [(b"Content-Type", b"text/event-stream"), (b"Cache-Control", b"no-cache")])
        if response.request.method == b"HEAD":
            response.finish()
            return
        self._response = response
        response.write(b": stream open\n\n")
        self._loop.start(self._interval, now=False)

    def _tick(self) -> None:
        assert self._response is not None
        if self._count and self._sent == self._count:
            self._loop.stop()
            self._response.finish()
            return
        self._sent += 1
        payload = json.dumps({"seq": self._sent, "time": self._clock.seconds()})
        self._response.write(f"id: {self._sent}\nevent: tick\ndata: {payload}\n\n".encode())

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()


class _Upload:
    """Counts and hashes a body as it is read; with a rate, pauses reading to take no more than `rate` bytes/s."""

    def __init__(self, clock: IReactorTime, reading: Reading, rate: int) -> None:
        self._clock = clock
        self._reading = reading
        self._rate = rate
        self._start = clock.seconds()
        self._resume: IDelayedCall | None = None
        self.count = 0
        self.digest = hashlib.sha256()

    def body_received(self, data: bytes) -> None:
        self.count += len(data)
        self.digest.update(data)
        if self._rate and self._resume is None:
            ahead = self.count / self._rate - (self._clock.seconds() - self._start)
            if ahead > 0.005:
                self._reading.pause_reading(self)
                self._resume = self._clock.callLater(ahead, self._go_on)

    def _go_on(self) -> None:
        self._resume = None
        self._reading.resume_reading(self)

    def respond(self, response: Response) -> None:
        self.stop()
        body = json.dumps({"bytes": self.count, "sha256": self.digest.hexdigest()}).encode() + b"\n"
        response.answer(200, b"application/json", body)

    def stop(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._go_on()


_ALLOWED = {
    b"": (b"GET", b"HEAD"),
    b"report": (b"GET", b"HEAD"),
    b"events": (b"GET", b"HEAD"),
    b"upload": (b"POST", b"PUT"),
}


def _endpoint_name(path: bytes) -> bytes | None:
    """The endpoint a path names, found as twisted.web's traversal found it: segments percent-decoded, empty ones
    before the first other skipped, the segments below an endpoint its own ("/report/x" is the report); b"" for
    the index, None for no endpoint."""
    if not path.startswith(b"/"):
        return None
    segments = [unquote_to_bytes(segment) for segment in path[1:].split(b"/")]
    name = next((segment for segment in segments if segment), b"")
    return name if name in _ALLOWED else None


def route(request: Request, reading: Reading, *, clock: IReactorTime) -> Endpoint:
    """The endpoint for a request's head, or the refusal (404, 405, 400) that answers it."""
    name = _endpoint_name(request.path)
    if name is None:
        return _Fixed(404, b"No such resource.\n")
    allowed = _ALLOWED[name]
    if request.method not in allowed:
        return _Fixed(405, b"Method not allowed.\n", ((b"Allow", b", ".join(allowed)),))
    try:
        if name == b"report":
            return _Report(_size(request.arg(b"size"), 1024**2), request.arg(b"chunked") in (b"1", b"yes", b"true"))
        if name == b"events":
            interval = float(request.arg(b"interval") or b"1")
            count = int(request.arg(b"count") or b"0")
            if not math.isfinite(interval) or interval < 0 or count < 0:
                raise ValueError(f"not an interval and a count: {interval}, {count}")
            return _Events(clock, interval, count)
        if name == b"upload":
            rate = request.arg(b"rate") or b"0"
            if not rate.isdigit():
                raise ValueError(f"not a rate: {rate!r}")
            return _Upload(clock, reading, int(rate))
    except ValueError as e:
        return _Fixed(400, f"{e}\n".encode())
    return _Fixed(200, (__doc__ or "").encode())


def make_factory(clock: IReactorTime) -> Factory:
    """The demo's server factory; `clock` times the events and paces the uploads."""
    return Factory.forProtocol(partial(Connection, partial(route, clock=clock), clock))
