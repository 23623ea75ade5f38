"""Soak: over ten thousand mixed requests through a real gateway in front of the fault-injecting origin, on
loopback, and afterwards nothing is left behind (issue 4, "Proof").

Thirty-two concurrent clients, each on a keep-alive connection it sometimes replaces with a fresh one, send a
fixed (seeded) mix: small GETs, downloads and uploads of a few hundred KiB (Content-Length and chunked), 404s from
the origin and from the gateway (no route), an invalid upstream status line (502), stalls (504), truncated, reset
and stalled response bodies (a cut client connection), and clients that abort mid-download and mid-upload.
Every request's outcome is checked as it ends; once all have ended and things have settled (a bounded wait):

* no upstream slot is held or queued for, and once the pools' idle connections are closed, the process has the
  same open file descriptors as before the run;
* the reactor has as many pending DelayedCalls as before (the conftest check then wants none at all);
* RSS grew by at most RSS_TOLERANCE between the end of a warm-up batch and the end of the run;
* no failure was logged.

Pass or fail never depends on the machine's speed: the short timeouts are on the stalling behaviours only (which
time out whatever the speed), the others keep their 60 s defaults, and the only time bounds are generous ones on
the whole run and on each request.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import LogEvent, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from tests.support.clients import BodySender
from tests.support.origin import Origin, Seen, pattern_bytes
from tests.support.running import RunningGateway

KiB = 1024
MiB = 1024 * KiB

REQUESTS = 10_000
WARM_UP = 2_000
"""Requests run before RSS is first measured: by then the allocator's free lists and Twisted's caches have grown to
what this load needs (RSS levels off after about 4,000 requests in all)."""
CONCURRENCY = 32
RUN_BOUND = 90.0
"""Seconds the warm-up and the run may take together, however slow the machine (about 20 s is usual)."""
REQUEST_BOUND = 30.0
"""Seconds one request may take before the soak calls it hung."""
SETTLE_BOUND = 10.0
RSS_TOLERANCE = 20 * MiB
BODY = 200 * KiB
"""The size of the bodies downloaded and uploaded whole."""
SHORT = 0.25
"""The response-headers and upstream-idle timeouts of the `/short` route, whose requests stall on purpose."""
PRUNE_EVERY = 500
"""Requests between two clean-ups of what the test origin records about requests that have ended."""


def soak_config(origin_url: str) -> dict[str, Any]:
    """Three routes to the origin, all stripping their prefix: `/o` with the default timeouts, `/short` with a
    SHORT response_headers timeout (for an origin that never answers), `/idle` with a SHORT upstream_idle one
    only (for one that stalls mid-body: its head may be slow on a busy machine, and must not turn into a 504).
    Any other path matches no route."""
    return {
        "listeners": [{"host": "127.0.0.1", "port": 0}],
        "upstreams": {"origin": {"url": origin_url}},
        "routes": [
            {"name": "o", "auth": "anonymous", "path_prefix": "/o", "upstream": "origin", "strip_prefix": True},
            {
                "name": "short",
                "auth": "anonymous",
                "path_prefix": "/short",
                "upstream": "origin",
                "strip_prefix": True,
                "timeouts": {"response_headers": SHORT, "upstream_idle": SHORT},
            },
            {
                "name": "idle",
                "auth": "anonymous",
                "path_prefix": "/idle",
                "upstream": "origin",
                "strip_prefix": True,
                "timeouts": {"upstream_idle": SHORT},
            },
        ],
    }


# === a streaming HTTP/1.1 client: one request at a time, bodies hashed rather than kept ====================


@dataclass
class Response:
    """A response as the client read it; a body is kept only up to 4 KiB, and hashed whole."""

    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    length: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    small: bytearray = field(default_factory=bytearray)
    complete: bool = False
    """Whether its framing says the body is all there."""

    @property
    def body(self) -> bytes:
        return bytes(self.small)

    @property
    def sha256(self) -> str:
        return str(self.digest.hexdigest())

    def __str__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return f"{self.status} ({state}, {self.length} body bytes, {self.headers.get(b'content-type', b'')!r})"


class _Reader:
    """Incremental parser of one response to a request other than HEAD (1xx heads skipped). `feed` returns what
    follows its end."""

    def __init__(self) -> None:
        self.response = Response()
        self._buffer = b""
        self._state = "head"
        self._remaining = 0

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        while not self.response.complete:
            step = getattr(self, "_" + self._state)
            if not step():
                return b""
        rest, self._buffer = self._buffer, b""
        return rest

    def _head(self) -> bool:
        head, sep, rest = self._buffer.partition(b"\r\n\r\n")
        if not sep:
            if len(self._buffer) > 64 * KiB:
                raise ValueError(f"a response head of over 64 KiB: {self._buffer[:200]!r}")
            return False
        self._buffer = rest
        lines = head.split(b"\r\n")
        version, _, status_and_reason = lines[0].partition(b" ")
        if version != b"HTTP/1.1" or not status_and_reason[:3].isdigit():
            raise ValueError(f"not an HTTP/1.1 status line: {lines[0][:100]!r}")
        status = int(status_and_reason[:3])
        if 100 <= status < 200:
            return True  # an interim response: the final one follows
        response = self.response
        response.status = status
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            response.headers[name.strip().lower()] = value.strip()
        if status in (204, 304):
            response.complete = True
        elif response.headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            self._state = "chunk_size"
        elif b"content-length" in response.headers:
            self._remaining = int(response.headers[b"content-length"])
            self._state = "data"
            response.complete = self._remaining == 0
        else:
            self._state = "until_close"
        return True

    def _take(self, n: int) -> None:
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        response = self.response
        response.length += len(data)
        response.digest.update(data)
        if len(response.small) < 4 * KiB:
            response.small += data[: 4 * KiB - len(response.small)]
        self._remaining -= len(data)

    def _data(self) -> bool:
        self._take(self._remaining)
        if self._remaining == 0:
            self.response.complete = True
            return True
        return False

    def _chunk_size(self) -> bool:
        line, sep, rest = self._buffer.partition(b"\r\n")
        if not sep:
            return False
        self._buffer = rest
        self._remaining = int(line.split(b";")[0], 16)
        self._state = "chunk_data" if self._remaining else "trailers"
        return True

    def _chunk_data(self) -> bool:
        self._take(self._remaining)
        if self._remaining or len(self._buffer) < 2:
            return False
        if self._buffer[:2] != b"\r\n":
            raise ValueError("no CRLF after chunk data")
        self._buffer = self._buffer[2:]
        self._state = "chunk_size"
        return True

    def _trailers(self) -> bool:
        line, sep, rest = self._buffer.partition(b"\r\n")
        if not sep:
            return False
        self._buffer = rest
        self.response.complete = not line
        return True

    def _until_close(self) -> bool:
        self._take(len(self._buffer))
        return False


class Connection(Protocol):
    """One client connection: sends a request, reads its response as it streams in, one at a time."""

    def __init__(self, registry: set[Connection]) -> None:
        self._registry = registry
        """The connections still open, this one among them while it is."""
        self._closed: list[Deferred[None]] = []
        self.lost = False
        self.errors: list[str] = []
        """Protocol errors: a response that does not parse, or bytes nobody asked for."""
        self._reader: _Reader | None = None
        self._done: Deferred[Response] | None = None
        self._progress: tuple[int, Deferred[None]] | None = None

    def request(self, data: bytes) -> Deferred[Response]:
        """Send `data`; fires with the response once it is complete, or as far as it got when the connection
        closes first."""
        assert self._done is None, "one request at a time"
        self._reader = _Reader()
        self._done = done = Deferred()
        self.transport.write(data)
        return done

    def body_at_least(self, n: int) -> Deferred[None]:
        """Fires once `n` bytes of the current response's body have arrived, or the connection has closed."""
        d: Deferred[None] = Deferred()
        self._progress = (n, d)
        self._check_progress()
        return d

    @property
    def response(self) -> Response | None:
        return self._reader.response if self._reader is not None else None

    def dataReceived(self, data: bytes) -> None:
        reader = self._reader
        if reader is None or self._done is None:
            self.errors.append(f"unasked-for bytes: {data[:100]!r}")
            self.transport.abortConnection()
            return
        try:
            rest = reader.feed(data)
        except ValueError as e:
            self.errors.append(str(e))
            self.transport.abortConnection()
            return
        self._check_progress()
        if reader.response.complete:
            done, self._done = self._done, None
            if rest:
                self.errors.append(f"bytes after a complete response: {rest[:100]!r}")
                self.transport.abortConnection()
            done.callback(reader.response)

    def _check_progress(self) -> None:
        if self._progress is not None:
            n, d = self._progress
            response = self.response
            if self.lost or (response is not None and response.length >= n):
                self._progress = None
                d.callback(None)

    def connectionMade(self) -> None:
        self._registry.add(self)

    def connectionLost(self, reason: Failure) -> None:
        self.lost = True
        self._registry.discard(self)
        self._check_progress()
        done, self._done = self._done, None
        if done is not None:
            assert self._reader is not None
            done.callback(self._reader.response)
        closed, self._closed = self._closed, []
        for d in closed:
            d.callback(None)

    def closed(self) -> Deferred[None]:
        """Fires once the connection is gone (at once if it is)."""
        d: Deferred[None] = Deferred()
        if self.lost:
            d.callback(None)
        else:
            self._closed.append(d)
        return d

    def close(self) -> None:
        if not self.lost:
            self.transport.loseConnection()

    def abort(self) -> None:
        if not self.lost:
            self.transport.abortConnection()


def _get(path: bytes, *, close: bool = False) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return b"GET %s HTTP/1.1\r\nHost: soak.test\r\n%s\r\n" % (path, extra)


def _post(path: bytes, length: int | None) -> bytes:
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    return b"POST %s HTTP/1.1\r\nHost: soak.test\r\n%s\r\n\r\n" % (path, framing)


def _within(d: Deferred[Any], seconds: float = REQUEST_BOUND) -> Deferred[Any]:
    return d.addTimeout(seconds, reactor)


# === the soak run ===============================================================================================

_EXPECTED_SHA = hashlib.sha256(pattern_bytes(0, BODY)).hexdigest()


@dataclass
class Soak:
    """The shared state of one run: where to connect, what happened, and what the origin saw."""

    gateway: RunningGateway
    origin: Origin
    rng: random.Random
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    done: int = 0
    next_id: int = 0
    connections: set[Connection] = field(default_factory=set)
    """Client connections still open."""
    opened: int = 0
    reused: int = 0
    """Requests sent on a keep-alive connection that had carried one before."""

    async def connect(self) -> Connection:
        self.opened += 1
        connection = Connection(self.connections)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.gateway.port), connection)
        return connection

    def record(self, kind: str, outcome: str, expected: bool, detail: str = "") -> None:
        self.outcomes[(kind, outcome if expected else "UNEXPECTED " + outcome)] += 1
        if not expected and len(self.unexpected) < 20:
            self.unexpected.append(f"{kind}: {outcome} {detail}")
        self.done += 1
        if self.done % PRUNE_EVERY == 0:
            self.prune_origin()

    def unique(self) -> int:
        self.next_id += 1
        return self.next_id

    def prune_origin(self) -> None:
        """Forget what the origin recorded about requests and connections that have ended: it keeps them all,
        which would otherwise read as growth in the RSS check."""
        origin = self.origin
        origin.seen[:] = [s for s in origin.seen if not s.connection_lost.called]
        origin.connections[:] = [c for c in origin.connections if getattr(c.transport, "connected", False)]

    async def seen(self, uri: bytes, *, body_bytes: int = 0) -> Seen | None:
        """The origin's record of the request for `uri`, once it has `body_bytes` of its body (bounded wait)."""
        for _ in range(int(5 / 0.005)):
            for seen in reversed(self.origin.seen):
                if seen.uri == uri and seen.body_bytes >= body_bytes:
                    return seen
            await task.deferLater(reactor, 0.005, lambda: None)
        return None


class Worker:
    """One of the concurrent clients: it keeps at most one idle keep-alive connection for its next request."""

    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self.idle: Connection | None = None

    async def connection(self) -> Connection:
        """The idle keep-alive connection (most of the time), or a new one."""
        idle, self.idle = self.idle, None
        if idle is not None and not idle.lost and self.soak.rng.random() < 0.7:
            self.soak.reused += 1
            return idle
        if idle is not None:
            idle.close()
        return await self.soak.connect()

    def done_with(self, connection: Connection, response: Response) -> None:
        """Keep `connection` for the next request if it can carry one."""
        if connection.lost or not response.complete or response.headers.get(b"connection") == b"close":
            connection.close()
            return
        if self.idle is not None:
            self.idle.close()
        self.idle = connection

    async def exchange(self, data: bytes) -> tuple[Connection, Response]:
        connection = await self.connection()
        response = await _within(connection.request(data))
        self.done_with(connection, response)
        return connection, response

    def close(self) -> None:
        idle, self.idle = self.idle, None
        if idle is not None:
            idle.close()


# --- the kinds of request, each checking its own outcome -------------------------------------------------------


def _problem(response: Response, status: int) -> bool:
    if not (response.complete and response.status == status):
        return False
    return response.headers.get(b"content-type") == b"application/problem+json"


async def small_get(w: Worker) -> tuple[str, bool, str]:
    connection, r = await w.exchange(_get(b"/o/status/200"))
    return str(r.status), r.complete and r.status == 200 and r.body == b"status body" and not connection.errors, str(r)


async def download(w: Worker, *, chunked: bool = False) -> tuple[str, bool, str]:
    connection, r = await w.exchange(_get(b"/o/bytes/%d%s" % (BODY, b"?chunked=1" if chunked else b"")))
    whole = r.complete and r.status == 200 and r.length == BODY and r.sha256 == _EXPECTED_SHA
    framed = (r.headers.get(b"transfer-encoding") == b"chunked") is chunked
    return str(r.status), whole and framed and not connection.errors, str(r)


async def download_chunked(w: Worker) -> tuple[str, bool, str]:
    return await download(w, chunked=True)


async def upload(w: Worker, *, chunked: bool = False) -> tuple[str, bool, str]:
    connection = await w.connection()
    answered = connection.request(_post(b"/o/sink", None if chunked else BODY))
    sender = BodySender(connection.transport, BODY, chunked=chunked, piece=16 * KiB)
    r = await _within(answered)
    w.done_with(connection, r)
    if not r.complete or r.status != 200:
        return str(r.status), False, f"{r}; {sender.written} body bytes written"
    sink = json.loads(r.body)
    return "200", sink == {"bytes": BODY, "sha256": _EXPECTED_SHA} and not connection.errors, str(sink)


async def upload_chunked(w: Worker) -> tuple[str, bool, str]:
    return await upload(w, chunked=True)


async def origin_404(w: Worker) -> tuple[str, bool, str]:
    _, r = await w.exchange(_get(b"/o/status/404"))
    return str(r.status), r.complete and r.status == 404 and r.body == b"status body", str(r)


async def no_route(w: Worker) -> tuple[str, bool, str]:
    _, r = await w.exchange(_get(b"/nowhere/%d" % w.soak.unique()))
    return str(r.status), _problem(r, 404), str(r)


async def bad_status(w: Worker) -> tuple[str, bool, str]:
    _, r = await w.exchange(_get(b"/o/bad-status"))
    return str(r.status), _problem(r, 502), str(r)


async def stall(w: Worker) -> tuple[str, bool, str]:
    _, r = await w.exchange(_get(b"/short/stall"))
    return str(r.status), _problem(r, 504), str(r)


async def _cut(w: Worker, path: bytes) -> tuple[str, bool, str]:
    """A request whose response starts and is then cut short: the client connection ends with it incomplete.

    How much of it the client sees depends on timing (cutting a connection drops what the gateway had not yet
    handed to the kernel, the head included), so only that it is not complete is checked.
    """
    r = await _one_shot(w, path)
    return f"{r.status or 'nothing'}, cut", r.status in (0, 200) and not r.complete, str(r)


async def _one_shot(w: Worker, path: bytes) -> Response:
    """GET `path` on a new connection, closed once the response is in (if the gateway has not cut it: an answer
    given before the response started, such as a 502, may leave it open for another request)."""
    connection = await w.soak.connect()
    r = await _within(connection.request(_get(path)))
    connection.close()
    return r


async def stall_body(w: Worker) -> tuple[str, bool, str]:
    return await _cut(w, b"/idle/stall-body/4096")


async def truncate(w: Worker) -> tuple[str, bool, str]:
    return await _cut(w, b"/o/truncate/65536")


async def reset(w: Worker) -> tuple[str, bool, str]:
    """An upstream reset: a 502 if it came before the response head was read, else a cut response."""
    r = await _one_shot(w, b"/o/truncate/65536?reset=1")
    if r.status == 502:
        return "502", _problem(r, 502), str(r)
    return f"{r.status or 'nothing'}, cut", r.status in (0, 200) and not r.complete, str(r)


async def abort_download(w: Worker) -> tuple[str, bool, str]:
    """The client hangs up part-way through a long download: the origin's connection is closed too."""
    uri = b"/bytes/%d?id=%d" % (64 * MiB, w.soak.unique())
    connection = await w.soak.connect()
    answered = connection.request(_get(b"/o" + uri))
    await _within(connection.body_at_least(128 * KiB))
    seen = await w.soak.seen(uri)
    r = connection.response
    connection.abort()
    await _within(answered)
    if seen is None:
        return "aborted, never seen", False, str(r)
    await _within(seen.connection_lost)
    got = r is not None and r.status == 200 and r.length >= 128 * KiB
    return "aborted", got and seen.sent < 64 * MiB, f"{r}; origin sent {seen.sent}"


async def abort_upload(w: Worker) -> tuple[str, bool, str]:
    """The client hangs up part-way through a chunked upload: the origin sees its connection close with the body
    unfinished (never a terminating chunk)."""
    uri = b"/sink?id=%d" % w.soak.unique()
    connection = await w.soak.connect()
    answered = connection.request(_post(b"/o" + uri, None))
    for start in range(0, 64 * KiB, 16 * KiB):  # four chunks, and never the last chunk
        connection.transport.write(b"%x\r\n%s\r\n" % (16 * KiB, pattern_bytes(start, 16 * KiB)))
    seen = await w.soak.seen(uri, body_bytes=1)
    connection.abort()
    r = await _within(answered)
    if seen is None:
        return "aborted, never seen", False, str(r)
    await _within(seen.connection_lost)
    return "aborted", r.status == 0 and not seen.body_complete, f"{r}; origin read {seen.body_bytes} bytes"


KINDS: dict[str, tuple[int, Callable[[Worker], Awaitable[tuple[str, bool, str]]]]] = {
    "small_get": (34, small_get),
    "download": (6, download),
    "download_chunked": (4, download_chunked),
    "upload": (5, upload),
    "upload_chunked": (4, upload_chunked),
    "origin_404": (8, origin_404),
    "no_route": (8, no_route),
    "bad_status": (3, bad_status),
    "stall": (3, stall),
    "stall_body": (3, stall_body),
    "truncate": (4, truncate),
    "reset": (4, reset),
    "abort_download": (4, abort_download),
    "abort_upload": (4, abort_upload),
}
"""Each kind of request: its weight in the mix, and what runs and checks it."""


async def run_batch(soak: Soak, count: int, deadline: float) -> None:
    """`count` requests of the mix, CONCURRENCY at a time; fails if the run goes past `deadline`."""
    names = list(KINDS)
    plan = iter(soak.rng.choices(names, weights=[KINDS[n][0] for n in names], k=count))
    workers = [Worker(soak) for _ in range(CONCURRENCY)]

    async def work(worker: Worker) -> None:
        for kind in plan:
            if time.monotonic() > deadline:
                return
            try:
                outcome, expected, detail = await KINDS[kind][1](worker)
            except Exception as e:  # a hung or failed request is an outcome to report, not a crash
                outcome, expected, detail = type(e).__name__, False, str(e)
            soak.record(kind, outcome, expected, detail)

    await DeferredList([ensureDeferred(work(w)) for w in workers])
    for worker in workers:
        worker.close()
    for connection in list(soak.connections):  # only after a request went wrong: it was reported
        connection.abort()
    closed = await settle(lambda: not soak.connections)
    assert closed, f"client connections still open: {len(soak.connections)}\n{_report(soak)}"
    assert time.monotonic() <= deadline, f"the soak took over {RUN_BOUND:g} s ({soak.done} done)\n{_report(soak)}"


# --- measuring what is left --------------------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss() -> int:
    """Resident memory, after a full collection and after giving free heap memory back to the system.

    `malloc_trim` (glibc) makes RSS measure the memory held rather than what the allocator keeps on its free
    lists after the last burst of large buffers; without glibc the measure is only noisier.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def settle(predicate: Callable[[], bool]) -> bool:
    """Wait (at most SETTLE_BOUND) until `predicate()` holds: closes land a reactor turn or more later."""
    for _ in range(int(SETTLE_BOUND / 0.01)):
        if predicate():
            return True
        await task.deferLater(reactor, 0.01, lambda: None)
    return predicate()


def _report(soak: Soak) -> str:
    lines = [f"{kind:18} {outcome:28} {n}" for (kind, outcome), n in sorted(soak.outcomes.items())]
    return "\n".join(["outcomes:", *lines, "first unexpected:", *soak.unexpected])


@pytest.mark.soak
@pytest.mark.timeout(RUN_BOUND + 6 * SETTLE_BOUND)
@pytest_twisted.ensureDeferred
async def test_soak_mixed_requests_leave_nothing_behind(origin: Origin, gateway_for: Any) -> None:
    """Ten thousand mixed requests, with faulty upstreams and aborting clients, each end as they should; after
    them the pools hold no busy connection, and open file descriptors, pending DelayedCalls and RSS are back to
    where they started (RSS within RSS_TOLERANCE)."""
    failures: list[str] = []

    def observe(event: LogEvent) -> None:
        if "log_failure" in event or event.get("log_level") in (LogLevel.error, LogLevel.critical):
            failures.append(f"{event.get('log_format')}: {event.get('log_failure')}")

    gateway = gateway_for(soak_config(origin.url))
    pool = gateway.pool("origin")
    fds_before = open_fds()
    calls_before = len(reactor.getDelayedCalls())
    soak = Soak(gateway, origin, random.Random(4))
    deadline = time.monotonic() + RUN_BOUND
    globalLogPublisher.addObserver(observe)
    try:
        await run_batch(soak, WARM_UP, deadline)
        assert await settle(lambda: pool.in_flight == 0 and pool.queued == 0)
        soak.prune_origin()
        rss_before = rss()
        soak.outcomes.clear()
        soak.opened = soak.reused = 0
        await run_batch(soak, REQUESTS, deadline)
        slots_free = await settle(lambda: pool.in_flight == 0 and pool.queued == 0)
        soak.prune_origin()
        rss_after = rss()
        await pool.close()
        await settle(lambda: open_fds() == fds_before)
        fds_after = open_fds()
        await settle(lambda: len(reactor.getDelayedCalls()) == calls_before)
        calls_after = reactor.getDelayedCalls()
    finally:
        globalLogPublisher.removeObserver(observe)

    report = _report(soak)
    assert soak.unexpected == [], report
    assert {kind for kind, _ in soak.outcomes} == set(KINDS), report
    assert sum(soak.outcomes.values()) == REQUESTS
    assert soak.reused > REQUESTS / 4 and soak.opened > REQUESTS / 4, (soak.reused, soak.opened)
    assert slots_free, f"upstream slots still held: {pool.in_flight} in flight, {pool.queued} queued"
    assert fds_after == fds_before, f"open file descriptors: {fds_after}, {fds_before} before"
    assert len(calls_after) == calls_before, f"pending DelayedCalls: {calls_after}, {calls_before} before"
    assert rss_after - rss_before <= RSS_TOLERANCE, f"RSS grew by {(rss_after - rss_before) / MiB:.1f} MiB"
    assert failures == []
