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

import argparse
import hashlib
import json
import re
import sys
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer

__all__ = ["main", "make_site"]

_log = Logger()

_CHUNK = 64 * 1024
_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3}


def _size(text: bytes | None, default: int) -> int:
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


@implementer(IPushProducer)
class _ReportProducer:
    """Writes the report while the client's socket takes it; stops when the client goes."""

    def __init__(self, request: server.Request, size: int) -> None:
        self._request = request
        self._remaining = size
        self._first = True
        self._paused = False
        self._stopped = False

    def resumeProducing(self) -> None:
        self._paused = False
        request = self._request
        while not self._paused and not self._stopped and self._remaining > 0:
            data = (_HEADER + _BLOCK[len(_HEADER) :]) if self._first else _BLOCK
            self._first = False
            data = data[: self._remaining]
            self._remaining -= len(data)
            request.write(data)
        if self._remaining == 0 and not self._stopped:
            self._stopped = True
            request.unregisterProducer()
            request.finish()

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._stopped = True


class Report(Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> Any:
        args = request.args or {}
        try:
            size = _size((args.get(b"size") or [None])[0], 1024**2)
        except ValueError as e:
            request.setResponseCode(400)
            return f"{e}\n".encode()
        request.setHeader(b"content-type", b"text/csv")
        if (args.get(b"chunked") or [b"0"])[0] not in (b"1", b"yes", b"true"):
            request.setHeader(b"content-length", b"%d" % size)
        producer = _ReportProducer(request, size)
        request.notifyFinish().addErrback(lambda _: producer.stopProducing())
        request.registerProducer(producer, True)
        producer.resumeProducing()
        return server.NOT_DONE_YET

    def render_HEAD(self, request: server.Request) -> Any:
        args = request.args or {}
        try:
            size = _size((args.get(b"size") or [None])[0], 1024**2)
        except ValueError:
            request.setResponseCode(400)
            return b""
        request.setHeader(b"content-type", b"text/csv")
        request.setHeader(b"content-length", b"%d" % size)
        return b""


class Events(Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> Any:
        args = request.args or {}
        interval = float((args.get(b"interval") or [b"1"])[0])
        count = int((args.get(b"count") or [b"0"])[0])  # 0: for ever
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        sequence = iter(range(1, count + 1)) if count else _forever()

        def send() -> None:
            n = next(sequence, None)
            if n is None:
                loop.stop()
                request.finish()
                return
            payload = json.dumps({"seq": n, "time": reactor.seconds()})
            request.write(f"id: {n}\nevent: tick\ndata: {payload}\n\n".encode())

        loop = task.LoopingCall(send)
        request.notifyFinish().addErrback(lambda _: loop.stop() if loop.running else None)
        request.write(b": stream open\n\n")
        loop.start(interval, now=False)
        return server.NOT_DONE_YET


def _forever() -> Any:
    n = 0
    while True:
        n += 1
        yield n


class Index(Resource):
    isLeaf = False

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (__doc__ or "").encode()

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        if path == b"":
            return self
        return Resource.getChild(self, path, request)


class DemoRequest(server.Request):
    """A `Request` that hashes `/upload` bodies as they arrive instead of spooling them to a temporary file."""

    _sink: Any = None

    def gotLength(self, length: int | None) -> None:
        path = self.channel._path.split(b"?", 1)[0]
        if self.channel._command in (b"POST", b"PUT") and path == b"/upload":
            query = self.channel._path.partition(b"?")[2]
            rate = re.search(rb"(?:^|&)rate=(\d+)", query)
            self._sink = _UploadSink(self, int(rate.group(1)) if rate else 0)
            self.content = _Empty()
        else:
            super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink.feed(data)
        else:
            super().handleContentChunk(data)

    def process(self) -> None:
        if self._sink is None:
            super().process()
            return
        self._sink.close()
        body = json.dumps({"bytes": self._sink.count, "sha256": self._sink.digest.hexdigest()}).encode() + b"\n"
        self.setHeader(b"content-type", b"application/json")
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()


class _Empty:
    """Stands in for `request.content`: the sink keeps only a count and a hash."""

    def tell(self) -> int:
        return 0

    def seek(self, *args: object) -> int:
        return 0

    def read(self, *args: object) -> bytes:
        return b""

    def close(self) -> None:
        pass


class _UploadSink:
    """Counts and hashes a body; with a rate, pauses the socket to read no faster than `rate` bytes/s."""

    def __init__(self, request: DemoRequest, rate: int) -> None:
        self._transport = request.channel.transport
        self._rate = rate
        self._start = reactor.seconds()
        self._resume: Any = None
        self.count = 0
        self.digest = hashlib.sha256()

    def feed(self, data: bytes) -> None:
        self.count += len(data)
        self.digest.update(data)
        if self._rate:
            ahead = self.count / self._rate - (reactor.seconds() - self._start)
            if ahead > 0.005 and self._resume is None:
                self._transport.pauseProducing()
                self._resume = reactor.callLater(ahead, self._go_on)

    def _go_on(self) -> None:
        self._resume = None
        self._transport.resumeProducing()

    def close(self) -> None:
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None


def make_site() -> server.Site:
    root = Index()
    root.putChild(b"report", Report())
    root.putChild(b"events", Events())
    site = server.Site(root, requestFactory=DemoRequest)
    site.displayTracebacks = False
    return site


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8081, help="port to listen on; 0 picks a free one (default 8081)")
    args = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    port = reactor.listenTCP(args.port, make_site(), interface=args.host)
    address = port.getHost()
    # One line on stdout with the address, for whoever started us (tests, benchmarks) to read.
    print(json.dumps({"host": address.host, "port": address.port}), flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
