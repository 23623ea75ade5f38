"""Load clients: Python threads with raw sockets on loopback (recv_into a large buffer for fast reads, a small
SO_RCVBUF for slow readers), and wrk for small requests. Every loop is bounded in count and in time."""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

MiB = 1024 * 1024
HOST = "127.0.0.1"
T = TypeVar("T")


class ClientError(RuntimeError):
    pass


TLS_NAME = "localhost"
"""The server name TLS clients send and verify (bench/tls.py issues the run's certificate for it)."""


def connect(
    port: int, *, rcvbuf: int | None = None, timeout: float = 30.0, tls: ssl.SSLContext | None = None
) -> socket.socket:
    """A connected socket; with `tls`, its handshake done (`tls` verifies the peer as TLS_NAME)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect, so that the window is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    try:
        sock.connect((HOST, port))
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=TLS_NAME)
    except BaseException:
        sock.close()
        raise
    return sock


def abort(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a client that goes away does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


def request(method: str, path: str, port: int, extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUser-Agent: gateway-bench\r\n{extra}\r\n".encode()


@dataclass
class Head:
    status: int
    headers: dict[str, str]
    rest: bytes  # body bytes received with the head

    @property
    def length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None else None

    @property
    def chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()


def read_head(sock: socket.socket) -> Head:
    data = b""
    for _ in range(1000):
        if b"\r\n\r\n" in data:
            break
        chunk = sock.recv(65536)
        if not chunk:
            raise ClientError(f"connection closed before a response head ({data[:200]!r})")
        data += chunk
    else:
        raise ClientError("no end to the response head")
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ClientError(f"bad status line {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Head(int(parts[1]), headers, rest)


def expect_ok(head: Head, what: str) -> None:
    if head.status != 200:
        raise ClientError(f"{what}: status {head.status}")


class Dechunker:
    """Incremental decoder of a chunked body."""

    def __init__(self) -> None:
        self._buf = b""
        self._left = 0  # bytes of chunk data still to come
        self._crlf = False  # the CRLF after a chunk's data is due
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = []
        for _ in range(100_000):
            if self.done:
                break
            if self._left:
                take = self._buf[: self._left]
                out.append(take)
                self._left -= len(take)
                self._buf = self._buf[len(take) :]
                if self._left:
                    break
                self._crlf = True
            if self._crlf:
                if len(self._buf) < 2:
                    break
                self._buf = self._buf[2:]
                self._crlf = False
            line, sep, rest = self._buf.partition(b"\r\n")
            if not sep:
                break
            self._buf = rest
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.done = True
            self._left = size
        return b"".join(out)


@dataclass
class Fetch:
    bytes: int
    started: float
    ended: float


def get(
    port: int, path: str, *, limit: int | None = None, timeout: float = 120.0, tls: ssl.SSLContext | None = None
) -> Fetch:
    """GET `path` and read the body as fast as possible (or only its first `limit` bytes)."""
    started = time.monotonic()
    deadline = started + timeout
    with connect(port, timeout=min(timeout, 30.0), tls=tls) as sock:
        sock.sendall(request("GET", path, port))
        head = read_head(sock)
        expect_ok(head, f"GET {path}")
        length = head.length
        if head.chunked or length is None:
            return _get_framed(sock, head, limit, started, deadline)
        if limit is not None:
            length = min(length, limit)
        got = len(head.rest)
        view = memoryview(bytearray(4 * MiB))
        while got < length:
            if time.monotonic() > deadline:
                raise ClientError(f"GET {path}: {got} of {length} bytes after {timeout:.0f} s")
            n = sock.recv_into(view)
            if not n:
                raise ClientError(f"GET {path}: body cut short at {got} of {length} bytes")
            got += n
        return Fetch(min(got, length), started, time.monotonic())


def _get_framed(sock: socket.socket, head: Head, limit: int | None, started: float, deadline: float) -> Fetch:
    dechunker = Dechunker() if head.chunked else None
    got = 0
    data = head.rest
    while time.monotonic() < deadline:
        if dechunker is not None:
            got += len(dechunker.feed(data))
            if dechunker.done:
                break
        else:
            got += len(data)
        if limit is not None and got >= limit:
            break
        data = sock.recv(1 * MiB)
        if not data:
            if dechunker is not None:
                raise ClientError("chunked body cut short")
            break
    return Fetch(got, started, time.monotonic())


def http_get_json(port: int, path: str) -> Any:
    with connect(port, timeout=10.0) as sock:
        sock.sendall(request("GET", path, port, "Connection: close\r\n"))
        head = read_head(sock)
        body = head.rest
        length = head.length or 0
        for _ in range(1000):
            if len(body) >= length:
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return json.loads(body)


def slow_get(
    port: int,
    path: str,
    *,
    rate: int,
    seconds: float,
    rcvbuf: int = 16 * 1024,
    before_close: Callable[[int], Any] | None = None,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, Any]:
    """GET `path` and read the body at `rate` bytes/s for `seconds`, then hang up.

    Returns the body bytes read, and what `before_close(bytes_read)` returned (called while still connected).
    """
    sock = connect(port, rcvbuf=rcvbuf, timeout=5.0, tls=tls)
    try:
        sock.sendall(request("GET", path, port))
        head = read_head(sock)
        expect_ok(head, f"GET {path}")
        sock.settimeout(0.5)
        got = len(head.rest)
        step = max(1024, rate // 50)
        start = time.monotonic()
        for _ in range(int(seconds * 10_000) + 1000):
            now = time.monotonic()
            if now - start >= seconds:
                break
            ahead = got / rate - (now - start)
            if ahead > 0:
                time.sleep(min(ahead, start + seconds - now))
                continue
            try:
                data = sock.recv(step)
            except TimeoutError:
                continue
            if not data:
                raise ClientError(f"GET {path}: connection closed after {got} body bytes")
            got += len(data)
        extra = before_close(got) if before_close is not None else None
        return got, extra
    finally:
        abort(sock)


@dataclass
class Upload:
    first_body_sent_at: float | None
    sent: int
    error: str | None


def upload(port: int, path: str, *, size: int, seconds: float, tls: ssl.SSLContext | None = None) -> Upload:
    """PUT a `size`-byte body (Content-Length) as fast as it is taken, for `seconds`, then abort (reset)."""
    block = memoryview(bytes(range(256)) * 4096)  # 1 MiB
    sock = connect(port, timeout=5.0, tls=tls)
    sent = 0
    first: float | None = None
    error = None
    try:
        sock.sendall(
            request("PUT", path, port, f"Content-Length: {size}\r\nContent-Type: application/octet-stream\r\n")
        )
        sock.settimeout(0.1)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if sent >= size:
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                continue
            offset = sent % len(block)
            chunk = block[offset : offset + min(len(block) - offset, size - sent)]
            if first is None:
                first = time.monotonic()
            try:
                sent += sock.send(chunk)
            except TimeoutError:
                continue
            except OSError as e:
                error = f"{type(e).__name__} after {sent} bytes sent"
                break
        return Upload(first, sent, error)
    finally:
        abort(sock)


def sse(port: int, path: str, *, seconds: float, tls: ssl.SSLContext | None = None) -> list[float]:
    """Read a server-sent-events stream for `seconds`; each event's latency in seconds (receive time minus the
    origin's send time it carries, both time.monotonic())."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    with connect(port, timeout=seconds, tls=tls) as sock:
        sock.sendall(request("GET", path, port, "Accept: text/event-stream\r\n"))
        try:
            head = read_head(sock)  # a proxy that holds small writes back holds the head back too
        except TimeoutError:
            return latencies
        expect_ok(head, f"GET {path}")
        dechunker = Dechunker() if head.chunked else None
        pending = b""
        data = head.rest
        received = time.monotonic()
        for _ in range(100_000):
            if data:
                pending += dechunker.feed(data) if dechunker is not None else data
                while b"\n\n" in pending:
                    event, _, pending = pending.partition(b"\n\n")
                    m = re.search(rb"^data: ([0-9.]+)$", event, re.MULTILINE)
                    if m:
                        latencies.append(received - float(m.group(1)))
            left = deadline - time.monotonic()
            if left <= 0 or (dechunker is not None and dechunker.done):
                break
            sock.settimeout(min(1.0, left))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                data = b""
                continue
            received = time.monotonic()
            if not data:
                break
    return latencies


def read_then_abort(
    port: int, path: str, *, nbytes: int, timeout: float = 30.0, tls: ssl.SSLContext | None = None
) -> tuple[float, int]:
    """GET `path`, read `nbytes` of its body, then abort (reset); returns (time.monotonic() of the abort, bytes)."""
    sock = connect(port, timeout=timeout, tls=tls)
    aborted = False
    try:
        sock.sendall(request("GET", path, port))
        head = read_head(sock)
        expect_ok(head, f"GET {path}")
        got = len(head.rest)
        view = memoryview(bytearray(MiB))
        deadline = time.monotonic() + timeout
        while got < nbytes and time.monotonic() < deadline:
            n = sock.recv_into(view, min(len(view), nbytes - got))
            if not n:
                raise ClientError(f"GET {path}: connection closed after {got} body bytes")
            got += n
        at = time.monotonic()
        abort(sock)
        aborted = True
        return at, got
    finally:
        if not aborted:
            abort(sock)


def parallel(fn: Callable[[], T], count: int, timeout: float) -> list[T | BaseException]:
    """Run `fn` on `count` threads at once; each thread's result, or the exception it raised."""
    results: list[T | BaseException] = [ClientError("did not finish")] * count
    barrier = threading.Barrier(count + 1)

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = fn()
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    barrier.wait(timeout=30)
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    return results


@dataclass
class Wrk:
    requests_per_s: float
    requests: int
    """Requests completed in the whole run."""
    p50_ms: float
    p99_ms: float
    errors: int
    output: str


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if not m:
        raise ClientError(f"wrk: cannot read the duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(output: str) -> Wrk:
    rps = re.search(r"Requests/sec:\s*([0-9.]+)", output)
    p50 = re.search(r"^\s*50(?:\.0+)?%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s*99(?:\.0+)?%\s+(\S+)", output, re.MULTILINE)
    total = re.search(r"^\s*(\d+) requests in ", output, re.MULTILINE)
    if not (rps and total and p50 and p99):
        raise ClientError(f"wrk: no results in its output: {output[-500:]!r}")
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if m:
        errors += sum(int(g) for g in m.groups())
    return Wrk(float(rps.group(1)), int(total.group(1)), _ms(p50.group(1)), _ms(p99.group(1)), errors, output)


def wrk(
    port: int,
    path: str,
    *,
    threads: int,
    connections: int,
    seconds: float,
    tls: bool = False,
    headers: tuple[str, ...] = (),
) -> Wrk:
    """wrk's figures; `tls` makes it speak https (wrk verifies no certificate), `headers` are sent on every
    request (`Connection: close` makes every request a new connection, and a new handshake over TLS)."""
    exe = shutil.which("wrk")
    if exe is None:
        raise ClientError("wrk is not installed")
    argv = [
        exe,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--latency",
        "--timeout",
        "5s",
        *(arg for header in headers for arg in ("-H", header)),
        f"{'https' if tls else 'http'}://{HOST}:{port}{path}",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if done.returncode != 0:
        raise ClientError(f"wrk exited with {done.returncode}: {done.stderr.strip()[-300:]}")
    return parse_wrk(done.stdout)
