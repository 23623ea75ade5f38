"""Raw-socket test clients: they send exact bytes, read as slowly as the test says, and report how the
connection ended, so a test can tell a complete response from a truncated one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

KEEP_HEAD = 64 * 1024
OPEN: list[RawClient] = []
"""Every client connected by `connect`; the leak-check fixture aborts any a test left open."""


@dataclass
class Parsed:
    """A response parsed from the bytes a client received."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool
    """Whether the framing says the body is all there (Content-Length met, or the chunked terminator seen)."""
    rest: bytes

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[-1] if values else None

    def headers_named(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def parse_response(data: bytes, *, head_request: bool = False) -> Parsed:
    """Parse one HTTP/1.1 response (skipping 1xx) from `data`; the body is de-chunked."""
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError(f"no complete response head in {data[:200]!r}")
        lines = head.split(b"\r\n")
        _version, code, *reason = lines[0].split(b" ", 2)
        status = int(code)
        headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(b":") for line in lines[1:])]
        if 100 <= status < 200:
            data = rest
            continue
        break
    names = {k.lower(): v for k, v in headers}
    if head_request or status in (204, 304):
        return Parsed(status, reason[0] if reason else b"", headers, b"", True, rest)
    if names.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = bytearray()
        while True:
            size_line, sep, rest2 = rest.partition(b"\r\n")
            if not sep:
                return Parsed(status, reason[0] if reason else b"", headers, bytes(body), False, b"")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                complete = rest2.startswith(b"\r\n")
                return Parsed(status, reason[0] if reason else b"", headers, bytes(body), complete, rest2[2:])
            if len(rest2) < size + 2:
                body += rest2[:size]
                return Parsed(status, reason[0] if reason else b"", headers, bytes(body), False, b"")
            body += rest2[:size]
            rest = rest2[size + 2 :]
    if b"content-length" in names:
        n = int(names[b"content-length"])
        return Parsed(status, reason[0] if reason else b"", headers, rest[:n], len(rest) >= n, rest[n:])
    return Parsed(status, reason[0] if reason else b"", headers, rest, False, b"")


class RawClient(Protocol):
    """Sends what it is told; keeps the first 64 KiB it receives and counts the rest."""

    def __init__(self, *, keep_all: bool = False) -> None:
        self.head = bytearray()
        self.tail = b""
        self.received = 0
        self.keep_all = keep_all
        self.closed: defer.Deferred[None] = defer.Deferred()
        """Fires (with None) when the connection is gone; `reason` says how."""
        self.reason: Failure | None = None
        self._waiters: list[tuple[int, defer.Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.keep_all or len(self.head) < KEEP_HEAD:
            self.head += data if self.keep_all else data[: KEEP_HEAD - len(self.head)]
        self.tail = (self.tail + data)[-64:]
        ready = [w for w in self._waiters if self.received >= w[0]]
        self._waiters = [w for w in self._waiters if self.received < w[0]]
        for _, d in ready:
            d.callback(None)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.reason = reason
        self.closed.callback(None)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def pause(self) -> None:
        self.transport.pauseProducing()

    def resume(self) -> None:
        self.transport.resumeProducing()

    def abort(self) -> None:
        self.transport.abortConnection()

    def received_at_least(self, n: int) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if self.received >= n:
            d.callback(None)
        else:
            self._waiters.append((n, d))
        return d

    @property
    def clean_close(self) -> bool:
        return self.reason is not None and self.reason.check(ConnectionDone) is not None

    def response(self, *, head_request: bool = False) -> Parsed:
        return parse_response(bytes(self.head), head_request=head_request)


async def connect(port: int, **kwargs: Any) -> RawClient:
    client = RawClient(**kwargs)
    OPEN.append(client)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    return client


def within(d: defer.Deferred[Any], seconds: float = 10.0) -> defer.Deferred[Any]:
    """`d`, failing with TimeoutError after `seconds`: every wait in a test is bounded."""
    return d.addTimeout(seconds, reactor)
