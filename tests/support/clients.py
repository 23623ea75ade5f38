"""Raw-socket test clients: they send exact bytes, read as slowly as the test says, and report how the
connection ended, so a test can tell a complete response from a truncated one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.support.origin import pattern_bytes

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
        self._conditions: list[tuple[Callable[[RawClient], bool], str, defer.Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.keep_all or len(self.head) < KEEP_HEAD:
            self.head += data if self.keep_all else data[: KEEP_HEAD - len(self.head)]
        self.tail = (self.tail + data)[-64:]
        ready = [w for w in self._waiters if self.received >= w[0]]
        self._waiters = [w for w in self._waiters if self.received < w[0]]
        for _, d in ready:
            d.callback(None)
        self._check_conditions()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.reason = reason
        self._check_conditions(closing=True)
        self.closed.callback(None)

    def _check_conditions(self, *, closing: bool = False) -> None:
        pending = []
        for condition in self._conditions:
            predicate, what, d = condition
            if d.called:  # cancelled by the test
                continue
            if predicate(self):
                d.callback(None)
            elif closing:
                d.errback(AssertionError(f"the connection closed before {what}: received {bytes(self.head[:300])!r}"))
            else:
                pending.append(condition)
        self._conditions = pending

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

    def until(self, predicate: Callable[[RawClient], bool], what: str = "the condition held") -> defer.Deferred[None]:
        """Fires once `predicate(self)` is true (checked now and on every read); fails if the connection closes
        first, so a test learns at once that what it waits for will never come."""
        d: defer.Deferred[None] = defer.Deferred()
        if predicate(self):
            d.callback(None)
        elif self.reason is not None:
            d.errback(AssertionError(f"the connection is closed, so {what} never will"))
        else:
            self._conditions.append((predicate, what, d))
        return d

    def responses_received(self, count: int = 1, *, head_request: bool = False) -> defer.Deferred[None]:
        """Fires once `count` complete responses (1xx skipped) are among the kept bytes (see `parse_responses`)."""

        def enough(client: RawClient) -> bool:
            parsed = parse_responses(bytes(client.head), head_request=head_request)
            return len(parsed) >= count and parsed[count - 1].complete

        return self.until(enough, f"{count} complete response(s) arrived")

    def send_body(self, total: int, *, chunked: bool = False, piece: int = 65536) -> BodySender:
        """Stream `total` bytes of the origin's pattern as a request body (chunked framing if asked), as fast as
        the connection takes them: the transport pauses the sender when its buffer is full."""
        return BodySender(self.transport, total, chunked=chunked, piece=piece)

    @property
    def clean_close(self) -> bool:
        return self.reason is not None and self.reason.check(ConnectionDone) is not None

    def response(self, *, head_request: bool = False) -> Parsed:
        return parse_response(bytes(self.head), head_request=head_request)


def parse_responses(data: bytes, *, head_request: bool = False) -> list[Parsed]:
    """Every response in `data`, in order; the last may be incomplete. Stops at bytes that are no response."""
    out: list[Parsed] = []
    while data:
        try:
            parsed = parse_response(data, head_request=head_request)
        except ValueError:
            break
        out.append(parsed)
        if not parsed.complete:
            break
        data = parsed.rest
    return out


@implementer(IPushProducer)
class BodySender:
    """Writes a request body of `total` pattern bytes into a transport, `piece` bytes at a time, while the
    transport accepts them: a full write buffer pauses it, a drained one resumes it (Twisted's flow control), so
    `written` stays within one buffer of what the kernel has taken."""

    def __init__(self, transport: Any, total: int, *, chunked: bool = False, piece: int = 65536) -> None:
        self._transport = transport
        self.total = total
        self.chunked = chunked
        self._piece = piece
        self.written = 0
        """Body bytes handed to the transport so far (framing not counted)."""
        self.paused = False
        self.stopped = False
        self.done: defer.Deferred[bool] = defer.Deferred()
        """Fires True once the whole body (and the chunked terminator) is written, False if stopped first."""
        self._waiters: list[tuple[int, defer.Deferred[None]]] = []
        transport.registerProducer(self, True)
        self.resumeProducing()

    def written_at_least(self, n: int) -> defer.Deferred[None]:
        """Fires once `n` body bytes have been handed to the transport."""
        d: defer.Deferred[None] = defer.Deferred()
        if self.written >= n:
            d.callback(None)
        else:
            self._waiters.append((n, d))
        return d

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.stopped and self.written < self.total:
            n = min(self._piece, self.total - self.written)
            data = pattern_bytes(self.written, n)
            self.written += n
            self._transport.write(b"%x\r\n%s\r\n" % (n, data) if self.chunked else data)
            ready = [w for w in self._waiters if self.written >= w[0]]
            self._waiters = [w for w in self._waiters if self.written < w[0]]
            for _, d in ready:
                d.callback(None)
        if self.written >= self.total and not self.stopped:
            self.stopped = True
            if self.chunked:
                self._transport.write(b"0\r\n\r\n")
            self._transport.unregisterProducer()
            self.done.callback(True)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        """The connection is gone."""
        if not self.stopped:
            self.stopped = True
            self.done.callback(False)


async def connect(port: int, *, tls: Any = None, **kwargs: Any) -> RawClient:
    """A raw client connected to 127.0.0.1:`port`; with `tls` (client connection creator), over TLS (the
    handshake runs when the first bytes are sent; its failure is the connection's `reason`)."""
    client = RawClient(**kwargs)
    OPEN.append(client)
    endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    await connectProtocol(endpoint, client)
    return client


def within(d: defer.Deferred[Any], seconds: float = 10.0) -> defer.Deferred[Any]:
    """`d`, failing with TimeoutError after `seconds`: every wait in a test is bounded."""
    return d.addTimeout(seconds, reactor)
