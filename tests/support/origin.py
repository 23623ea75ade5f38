"""A fault-injecting test upstream on 127.0.0.1:0: each test picks a behaviour by path and waits on its events.

Paths (all under the origin's root):
* `GET /bytes/N[?chunked=1]` N bytes of a known pattern, sent with backpressure (events: paused, resumed);
* `GET /headers` a JSON echo of the request line and headers it received;
* `POST|PUT /sink[?hold=1]` reads the body as it comes and answers with its size and SHA-256; with `hold=1`
  it stops reading until the test calls `release()` (a slow upstream; reading nothing, a held origin notices its
  connection closing only once released);
* `GET /stall` never answers; `GET /stall-body/N` sends N of 2N declared bytes, then nothing;
* `GET /truncate/N[?chunked=1][&reset=1]` sends N of 2N declared bytes (or N chunked bytes without the
  terminator), then closes (or resets) the connection;
* `POST /early/STATUS` answers STATUS on the request head, without reading the body, then closes;
* `GET /bad-status` writes an invalid status line and closes;
* `GET /hop-headers` answers with hop-by-hop headers, one only named in its Connection header;
* `GET /stack` answers 200 with the headers that tell its stack (`Server`, `X-Powered-By`, `X-AspNet-Version`);
* `GET /status/CODE` answers CODE with a small body (none for 204/304; Content-Length kept for HEAD);
* `GET /overlong/N[?later=1]` declares N bytes, sends them and then a forged second response (`FORGED`), in the
  same write (or with `later=1` once the test calls `inject_faults()`), and leaves the connection open without
  finishing the request;
* `GET /bad-chunking/N[?later=1][&size=HEX]` sends a chunked head, one valid chunk of N bytes and then an invalid
  chunk-size line, `zz` or the given one, followed by 64 bytes of data (with `later=1` only when the test calls
  `inject_faults()`);
* `GET /content-length?value=V` answers with `Content-Length: V` (and 2 bytes of body), whatever V is;
* `GET /status-line?line=L` answers with the status line L (then `Content-Length: 2` and 2 bytes of body);
* `GET /bad-transfer-coding` declares `Transfer-Encoding: gzip`, which no HTTP/1.1 client can frame;
* `GET /huge-headers/N[?line=1]` answers with about N bytes of headers (1 KiB lines, or one line of N bytes);
* `GET /close-next` answers 200, then closes its connection when the next request arrives on it, unanswered,
  as a server closing an idle keep-alive connection just as the gateway reuses it;
* `GET /close-idle` answers 200 and then closes its (keep-alive) connection on the next reactor turn;
* `GET /events?beats=N&every=S` a server-sent event stream (chunked): a heartbeat comment every S seconds, N
  times, then nothing more, its connection held open (a stream gone quiet).
Every request is recorded as a `Seen`, whose Deferreds tell the test what happened at the origin;
`Origin.request_seen(n)` fires with the n-th one once its head has arrived, `Origin.connections_lost(n)` once n
of its connections have closed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet import defer, reactor
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import http
from zope.interface import implementer

PATTERN = bytes(range(256)) * 256  # 64 KiB
FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Forged: yes\r\n\r\nforged"
"""What `/overlong/N` sends past its declared length: a complete response that must never reach a client."""


def pattern_bytes(start: int, n: int) -> bytes:
    """Bytes `start` to `start + n` of the origin's endless pattern."""
    out = bytearray()
    while n > 0:
        offset = start % len(PATTERN)
        piece = PATTERN[offset : offset + n]
        out += piece
        start += len(piece)
        n -= len(piece)
    return bytes(out)


@dataclass
class Seen:
    """One request as the origin saw it."""

    method: bytes
    uri: bytes
    headers: list[tuple[bytes, bytes]]
    body_bytes: int = 0
    sha256: Any = field(default_factory=hashlib.sha256)
    body_complete: bool = False
    sent: int = 0
    events: list[str] = field(default_factory=list)
    head_received: defer.Deferred[None] = field(default_factory=defer.Deferred)
    paused: defer.Deferred[None] = field(default_factory=defer.Deferred)
    """Fires the first time the origin's sending was paused by backpressure."""
    connection_lost: defer.Deferred[None] = field(default_factory=defer.Deferred)
    """Fires when the connection this request came on closed, or at once if the origin finished it cleanly."""
    finished: bool = False

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@implementer(IPushProducer)
class _PatternProducer:
    def __init__(self, request: OriginRequest, n: int) -> None:
        self._request = request
        self._remaining = n
        self._paused = False
        self._stopped = False

    def resumeProducing(self) -> None:
        seen = self._request.seen
        if self._paused:
            seen.events.append("resumed")
        self._paused = False
        while not self._paused and not self._stopped and self._remaining > 0:
            data = pattern_bytes(seen.sent, min(self._remaining, 65536))
            self._remaining -= len(data)
            seen.sent += len(data)
            self._request.write(data)
        if self._remaining == 0 and not self._stopped:
            self._stopped = True
            self._request.unregisterProducer()
            self._request.finish_cleanly()

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            seen = self._request.seen
            seen.events.append("paused")
            if not seen.paused.called:
                seen.paused.callback(None)

    def stopProducing(self) -> None:
        self._stopped = True


@implementer(IPullProducer)
class _ResetWhenFlushed:
    """Resets a connection once the bytes written to it so far have left Twisted's buffer for the kernel.

    `abortConnection` alone would drop them (Twisted writes on the next reactor turn), and `loseConnection` is
    no reset. Clean closes in this module go through `HTTPChannel.loseConnection`, which unregisters the channel
    from the transport first: a transport with a registered, paused producer never completes a `loseConnection`.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._registered = False
        transport.unregisterProducer()  # the channel
        transport.registerProducer(self, False)  # a pull producer is asked for more once the buffer is empty
        self._registered = True

    def resumeProducing(self) -> None:
        if not self._registered:
            return  # the call made by registerProducer itself, with the bytes still buffered
        self._transport.unregisterProducer()
        self._transport.abortConnection()

    def stopProducing(self) -> None:
        pass


class _Heartbeats:
    """`/events`: a heartbeat comment every `every` seconds, `beats` times, on a stream left open after them."""

    def __init__(self, request: http.Request, beats: int, every: float) -> None:
        self._request = request
        self._left = beats
        self._every = every
        self._call: Any = None
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.write(b"retry: 1000\n\n")
        request.notifyFinish().addBoth(self._stop)
        self._call = reactor.callLater(every, self._beat)

    def _beat(self) -> None:
        self._call = None
        self._request.write(b": heartbeat\n\n")
        self._left -= 1
        if self._left > 0:
            self._call = reactor.callLater(self._every, self._beat)

    def _stop(self, _: object) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class OriginRequest(http.Request):
    """Parses like any Twisted request, but acts on the head and reads bodies as they come."""

    origin: Origin

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        self.method, self.uri, self.clientproto = channel._command, channel._path, channel._version
        self.path, _, query = (self.origin.every_request or self.uri).partition(b"?")
        self.query = dict(p.partition(b"=")[::2] for p in query.split(b"&") if p)
        self.seen = Seen(
            self.method, self.uri, [(k, v) for k, vs in self.requestHeaders.getAllRawHeaders() for v in vs]
        )
        self.origin._note_seen(self.seen)
        self.notifyFinish().addBoth(self._ended)
        self.seen.head_received.callback(None)
        self.dropped = getattr(channel, "close_next", False)
        if self.dropped:
            channel.loseConnection()  # closed as the request arrives: it is never answered
            return
        if self.path.startswith(b"/sink") and self.query.get(b"hold") == b"1":
            self.origin.held.append(self)
            channel.setTimeout(None)
            channel.transport.pauseProducing()
        if self.path.startswith(b"/early/"):
            status = int(self.path.rsplit(b"/", 1)[1])
            body = b'{"early": true}'
            channel.transport.write(
                b"HTTP/1.1 %d Early\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (status, len(body), body)
            )
            channel.loseConnection()

    def handleContentChunk(self, data: bytes) -> None:
        self.seen.body_bytes += len(data)
        self.seen.sha256.update(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self.seen.body_complete = True
        self.process()

    def process(self) -> None:
        path, q = self.path, self.query
        if self.dropped:
            pass
        elif path.startswith(b"/bytes/"):
            n = int(path.rsplit(b"/", 1)[1])
            if q.get(b"chunked") != b"1":
                self.setHeader(b"content-length", b"%d" % n)
            producer = _PatternProducer(self, n)
            self.notifyFinish().addErrback(lambda _: producer.stopProducing())
            self.registerProducer(producer, True)
            producer.resumeProducing()
        elif path == b"/headers":
            body = json.dumps(
                {
                    "method": self.method.decode("latin-1"),
                    "uri": self.uri.decode("latin-1"),
                    "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.seen.headers],
                }
            ).encode()
            self._reply(200, body, b"application/json")
        elif path.startswith(b"/sink"):
            body = json.dumps({"bytes": self.seen.body_bytes, "sha256": self.seen.sha256.hexdigest()}).encode()
            self._reply(200, body, b"application/json")
        elif path.startswith(b"/stall-body/"):
            n = int(path.rsplit(b"/", 1)[1])
            self.setHeader(b"content-length", b"%d" % (2 * n))
            self.write(pattern_bytes(0, n))
            self.seen.sent = n
        elif path.startswith(b"/truncate/"):
            n = int(path.rsplit(b"/", 1)[1])
            if q.get(b"chunked") != b"1":
                self.setHeader(b"content-length", b"%d" % (2 * n))
            self.write(pattern_bytes(0, n))
            self.seen.sent = n
            if q.get(b"reset") == b"1":
                _ResetWhenFlushed(self.channel.transport)
            else:
                self.channel.loseConnection()
        elif path == b"/events":
            _Heartbeats(self, int(q[b"beats"]), float(q[b"every"]))
        elif path == b"/health":
            self._reply(200 if self.origin.healthy else 503, b"health", b"text/plain")
        elif path == b"/reset":
            self.channel.transport.abortConnection()  # a reset before any byte of a response
        elif path == b"/bad-status":
            self.channel.transport.write(b"HTTP/1.1 abc Broken\r\n\r\n")
            self.channel.loseConnection()
        elif path == b"/hop-headers":
            # Hop-by-hop response headers, one of them only by being named in Connection.
            self.setHeader(b"connection", b"X-Hop-Only, keep-alive")
            self.setHeader(b"x-hop-only", b"must not pass")
            self.setHeader(b"keep-alive", b"timeout=5")
            self.setHeader(b"x-end-to-end", b"kept")
            self._reply(200, b"hop", b"text/plain")
        elif path == b"/stack":
            self.setHeader(b"server", b"Apache/2.4.1 (Unix)")
            self.setHeader(b"x-powered-by", b"PHP/5.6.40")
            self.setHeader(b"x-aspnet-version", b"4.0.30319")
            self._reply(200, b"stack", b"text/plain")
        elif path.startswith(b"/status/"):
            code = int(path.rsplit(b"/", 1)[1])
            self._reply(code, b"" if code in (204, 304) else b"status body", b"text/plain")
        elif path.startswith(
            (
                b"/overlong/",
                b"/bad-chunking/",
                b"/bad-transfer-coding",
                b"/huge-headers/",
                b"/content-length",
                b"/status-line",
            )
        ):
            self._misframe(path, q)
        elif path == b"/close-next":
            self.channel.close_next = True
            self._reply(200, b"close-next", b"text/plain")
        elif path == b"/close-idle":
            channel = self.channel
            self._reply(200, b"close-idle", b"text/plain")
            reactor.callLater(0, channel.loseConnection)
        elif path == b"/stall" or path.startswith(b"/early/"):
            pass
        else:
            self._reply(404, b"origin: no such behaviour", b"text/plain")

    def _misframe(self, path: bytes, q: dict[bytes, bytes]) -> None:
        """Responses that break HTTP/1.1 framing, written as raw bytes; the request is never finished, so the
        connection stays open until the gateway closes it."""
        write = self.channel.transport.write
        if path == b"/content-length":
            write(b"HTTP/1.1 200 OK\r\nContent-Length: %s\r\n\r\nok" % unquote_to_bytes(q[b"value"]))
            return
        if path == b"/status-line":
            write(unquote_to_bytes(q[b"line"]) + b"\r\nContent-Length: 2\r\n\r\nok")
            return
        n = int(path.rsplit(b"/", 1)[1]) if path[-1:].isdigit() else 0
        if path.startswith(b"/overlong/"):
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n
            if q.get(b"later") == b"1":
                write(head + pattern_bytes(0, n))
                self.origin.faults.append(lambda: write(FORGED))
            else:
                write(head + pattern_bytes(0, n) + FORGED)
        elif path.startswith(b"/bad-chunking/"):
            write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (n, pattern_bytes(0, n)))
            bad = q.get(b"size", b"zz") + b"\r\n" + pattern_bytes(n, 64)
            if q.get(b"later") == b"1":
                self.origin.faults.append(lambda: write(bad))
            else:
                write(bad)
        elif path == b"/bad-transfer-coding":
            write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nnot gzip")
        else:
            if q.get(b"line") == b"1":
                headers = b"X-Huge: " + b"h" * n + b"\r\n"
            else:
                headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000) for i in range(n // 1024 + 1))
            write(b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 2\r\n\r\nok")
        self.seen.sent = n

    def _reply(self, code: int, body: bytes, content_type: bytes) -> None:
        self.setResponseCode(code)
        self.setHeader(b"content-type", content_type)
        if code not in (204, 304):
            self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish_cleanly()

    def finish_cleanly(self) -> None:
        self.seen.finished = True
        self.finish()

    def _ended(self, result: object) -> None:
        if not self.seen.connection_lost.called:
            self.seen.connection_lost.callback(None)


class _OriginChannel(http.HTTPChannel):
    """Twisted's channel, telling the origin when its connection is gone."""

    origin: Origin
    close_next = False
    """Close the connection when the next request's head arrives (set by `/close-next`)."""

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.origin._note_lost()


class Origin(http.HTTPFactory):
    """The test upstream. `start()` binds it to 127.0.0.1:0; `stop()` closes it and every connection."""

    def __init__(self) -> None:
        super().__init__(timeout=None)
        self.seen: list[Seen] = []
        self.held: list[OriginRequest] = []
        self.port: Any = None
        self.connections: list[http.HTTPChannel] = []
        self.accepted = 0
        self._seen_waiters: list[tuple[int, defer.Deferred[Seen]]] = []
        self.faults: list[Callable[[], object]] = []
        """Misbehaviour held back until the test calls `inject_faults()`."""
        self.lost = 0
        """Connections to the origin that have closed."""
        self._lost_waiters: list[tuple[int, defer.Deferred[None]]] = []

    def request_seen(self, count: int = 1) -> defer.Deferred[Seen]:
        """Fires with the `count`-th request's `Seen` once the origin has its head (at once if it has)."""
        d: defer.Deferred[Seen] = defer.Deferred()
        if len(self.seen) >= count:
            d.callback(self.seen[count - 1])
        else:
            self._seen_waiters.append((count, d))
        return d

    def _note_seen(self, seen: Seen) -> None:
        self.seen.append(seen)
        ready = [w for w in self._seen_waiters if len(self.seen) >= w[0]]
        self._seen_waiters = [w for w in self._seen_waiters if len(self.seen) < w[0]]
        for count, d in ready:
            d.callback(self.seen[count - 1])

    def connections_lost(self, count: int = 1) -> defer.Deferred[None]:
        """Fires once `count` connections to the origin have closed (at once if they have)."""
        d: defer.Deferred[None] = defer.Deferred()
        if self.lost >= count:
            d.callback(None)
        else:
            self._lost_waiters.append((count, d))
        return d

    def _note_lost(self) -> None:
        self.lost += 1
        ready = [w for w in self._lost_waiters if self.lost >= w[0]]
        self._lost_waiters = [w for w in self._lost_waiters if self.lost < w[0]]
        for _, d in ready:
            d.callback(None)

    def buildProtocol(self, addr: Any) -> http.HTTPChannel:
        channel = _OriginChannel()
        channel.origin = self
        channel.factory = self
        origin = self

        class _Request(OriginRequest):
            pass

        _Request.origin = origin
        channel.requestFactory = _Request
        channel.timeOut = None
        self.accepted += 1
        self.connections.append(channel)
        return channel

    def startFactory(self) -> None:
        pass

    def stopFactory(self) -> None:
        pass

    def log(self, request: Any) -> None:
        pass

    @property
    def address(self) -> tuple[str, int]:
        host = self.port.getHost()
        return host.host, host.port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    tls: Any = None
    healthy = True
    """What /health answers: 200, or 503 (a flapping health endpoint, as the test sets it)."""
    every_request: bytes | None = None
    """A target every request is answered as, whatever it asked for (b"/status/503", b"/reset"...): a server
    that fails everything, among others that do not."""

    def start(self, tls: Any = None) -> Origin:
        """Listen on 127.0.0.1:0; with `tls` (server connection creator, such as `CertificateOptions`), HTTPS."""
        self.tls = tls
        factory: Any = self if tls is None else TLSMemoryBIOFactory(tls, False, self)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        return self

    def inject_faults(self) -> None:
        """Send what the behaviours held back (see `faults`)."""
        faults, self.faults = self.faults, []
        for fault in faults:
            fault()

    def release(self) -> None:
        """Let held sinks read again."""
        for request in self.held:
            if request.channel is not None:
                request.channel.transport.resumeProducing()
        self.held.clear()

    async def stop(self) -> None:
        for channel in self.connections:
            if channel.transport is not None and channel.transport.connected:
                channel.transport.abortConnection()
        if self.port is not None:
            await self.port.stopListening()
            self.port = None
