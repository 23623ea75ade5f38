"""Benchmark origin for what nginx cannot do (and for fixed bodies when nginx is missing): stdlib only, one thread
per connection, never the bottleneck of a Python proxy.

Endpoints (the `tag` query parameter names a measurement; what the origin saw of it is kept in memory):
* `GET /small`: a 100-byte body.
* `GET /files/NAME`: the file NAME of --dir, with Content-Length, sent with sendfile.
* `GET /big?tag=T`: the file --big, sent with sendfile in steps of at most 1 MiB; records the bytes handed to the
  kernel so far (`sent`), and when the connection was seen closed or reset (`closed_at`, time.monotonic(), which
  is system-wide on Linux) and whether the whole body had been sent by then (`complete`).
* `PUT|POST /sink?rate=BYTES_PER_SECOND&tag=T`: reads a Content-Length body no faster than `rate` (with a small
  receive buffer, so that reading slowly holds the sender back), records when its first body byte arrived
  (`first_body_byte_at`, monotonic) and the bytes read, and answers 200 with the byte count.
* `GET /events?interval=0.05&seconds=S&tag=T`: server-sent events, one every `interval` for `seconds`, each
  carrying its send time (`data: <time.monotonic()>`); chunked for HTTP/1.1, close-delimited for HTTP/1.0.
* `GET /_events?tag=T`: what was recorded for T, as JSON ({} if nothing yet).

HTTP/1.0 requests (nginx's default upstream protocol, ReverseProxyResource's) are answered and closed unless
they ask for keep-alive. An idle connection is closed after 300 s.

Run: `python bench/origin.py [--port 0] [--dir DIR] [--big FILE]`; prints {"port": N} on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

MiB = 1024 * 1024
STEP = MiB  # at most this much per sendfile call, so that progress is recorded as it goes
IDLE = 300.0
SMALL = b"x" * 99 + b"\n"


class Closed(Exception):
    """The peer closed or reset the connection."""


class Handler(socketserver.BaseRequestHandler):
    server: Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(IDLE)
        self.tag: str | None = None  # the last request's tag on this connection
        self.watch_close = False
        try:
            self._serve(sock)
        except (Closed, OSError):
            pass
        finally:
            if self.watch_close and self.tag is not None:
                self.server.update(self.tag, closed_at=time.monotonic())

    def _serve(self, sock: socket.socket) -> None:
        buffered = b""
        for _ in range(10_000_000):  # requests per connection, bounded
            while b"\r\n\r\n" not in buffered:
                if len(buffered) > 65536:
                    raise Closed
                data = sock.recv(65536)
                if not data:
                    raise Closed
                buffered += data
            head, _, buffered = buffered.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, target, version = lines[0].split(b" ", 2)
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            connection = headers.get(b"connection", b"").lower()
            http10 = version.strip() == b"HTTP/1.0"
            keep = connection == b"keep-alive" if http10 else connection != b"close"
            path, _, query = target.decode("latin-1").partition("?")
            params = {k: v[-1] for k, v in parse_qs(query).items()}
            if "tag" in params:
                self.tag = params["tag"]
            self.watch_close = path == "/big"
            conn = b"" if keep else b"Connection: close\r\n"
            if method in (b"POST", b"PUT"):
                buffered = self._sink(sock, headers, params, buffered, conn)
            elif path == "/small":
                sock.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n%s\r\n" % conn + SMALL
                )
            elif path == "/big" and self.server.big:
                self._send_file(sock, Path(self.server.big), method, conn, self.tag)
            elif path.startswith("/files/") and self.server.dir:
                name = unquote(path[len("/files/") :])
                file = Path(self.server.dir) / name
                if "/" in name or not file.is_file():
                    sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n%s\r\n" % conn)
                else:
                    self._send_file(sock, file, method, conn, None)
            elif path == "/events":
                self._events(sock, params, http10)
                return
            elif path == "/_events":
                body = json.dumps(self.server.get(params.get("tag", ""))).encode()
                sock.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                    % (len(body), conn, body)
                )
            else:
                sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n%s\r\n" % conn)
            if not keep:
                return

    def _send_file(self, sock: socket.socket, file: Path, method: bytes, conn: bytes, tag: str | None) -> None:
        size = file.stat().st_size
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n%s\r\n" % (size, conn)
        )
        if method == b"HEAD":
            return
        if tag is not None:
            self.server.update(tag, sent=0, length=size, complete=False)
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        out = sock.fileno()
        offset = 0
        with open(file, "rb") as f:
            while offset < size:
                try:
                    n = os.sendfile(out, f.fileno(), offset, min(STEP, size - offset))
                except BlockingIOError:
                    n = 0
                except OSError as e:
                    raise Closed from e
                if n == 0:
                    events = poller.poll(IDLE * 1000)
                    if not events:
                        raise Closed
                    if events[0][1] & (select.POLLERR | select.POLLHUP):
                        raise Closed
                    continue
                offset += n
                if tag is not None:
                    self.server.update(tag, sent=offset)
        if tag is not None:
            self.server.update(tag, complete=True)

    def _sink(
        self, sock: socket.socket, headers: dict[bytes, bytes], params: dict[str, str], buffered: bytes, conn: bytes
    ) -> bytes:
        length = int(headers.get(b"content-length", b"0"))
        rate = int(params.get("rate", "0"))
        tag = params.get("tag")
        if rate:
            # A small receive buffer, so that reading slowly really holds the sender back.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        started = time.monotonic()
        received = 0
        first = True

        def got(n: int) -> None:
            nonlocal received, first
            if first and n and tag is not None:
                self.server.update(tag, first_body_byte_at=time.monotonic(), length=length)
            first = False
            received += n

        if buffered:
            take = min(len(buffered), length)
            got(take)
            buffered = buffered[take:]
        last_report = 0
        while received < length:
            want = min(65536, length - received)
            if rate:
                ahead = received / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(min(ahead, 1.0))
                    continue
                want = min(want, max(4096, rate // 50))
            data = sock.recv(want)
            if not data:
                raise Closed
            got(len(data))
            if tag is not None and received - last_report >= MiB:
                self.server.update(tag, received=received)
                last_report = received
        if tag is not None:
            self.server.update(tag, received=received)
        body = b"%d\n" % received
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), conn, body))
        return buffered

    def _events(self, sock: socket.socket, params: dict[str, str], http10: bool) -> None:
        interval = float(params.get("interval", "0.05"))
        seconds = min(float(params.get("seconds", "10")), 600.0)
        chunked = not http10
        framing = b"Transfer-Encoding: chunked\r\n" if chunked else b""
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Connection: close\r\n%s\r\n" % framing
        )
        start = time.monotonic()
        count = int(seconds / interval)
        for i in range(count):
            delay = start + (i + 1) * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            event = b"data: %r\n\n" % time.monotonic()
            sock.sendall(b"%x\r\n%s\r\n" % (len(event), event) if chunked else event)
        if chunked:
            sock.sendall(b"0\r\n\r\n")


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 4096

    def __init__(self, address: tuple[str, int], directory: str, big: str) -> None:
        super().__init__(address, Handler)
        self.dir = directory
        self.big = big
        self._lock = threading.Lock()
        self._tags: dict[str, dict[str, Any]] = {}

    def update(self, tag: str, **fields: Any) -> None:
        with self._lock:
            self._tags.setdefault(tag, {}).update(fields)

    def get(self, tag: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._tags.get(tag, {}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dir", default="", help="the directory served under /files/")
    parser.add_argument("--big", default="", help="the file served at /big")
    args = parser.parse_args()
    server = Server(("127.0.0.1", args.port), args.dir, args.big)
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    sys.exit(0)


if __name__ == "__main__":
    main()
