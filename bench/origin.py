"""Benchmark origins that are never the bottleneck: stdlib only, one thread per connection.

* `GET /file` answers with the file given by --file, sent with `socket.sendfile` (no copy through user space),
  with Content-Length, on keep-alive connections.
* `POST|PUT /sink?rate=BYTES_PER_SECOND` reads a Content-Length body no faster than `rate`, writes the time its
  first body byte arrived to --events (one JSON line per request), and answers 200 with the byte count.

Run: `python bench/origin.py --file /dev/shm/body --port 0 --events FILE`; prints {"port": N} on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import socketserver
import sys
import threading
import time
from typing import Any


class Handler(socketserver.BaseRequestHandler):
    server: Server

    def handle(self) -> None:
        # A proxy that hangs up mid-body (a benchmark client that left) is normal here, not an error.
        with contextlib.suppress(ConnectionError):
            self._serve()

    def _serve(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffered = b""
        while True:
            while b"\r\n\r\n" not in buffered:
                data = sock.recv(65536)
                if not data:
                    return
                buffered += data
            head, _, buffered = buffered.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, target, _version = lines[0].split(b" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            close = headers.get(b"connection", b"").lower() == b"close"
            path, _, query = target.partition(b"?")
            if method in (b"POST", b"PUT"):
                buffered = self._sink(sock, headers, query, buffered)
            elif path == b"/file":
                self._file(sock, method)
            else:
                sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            if close:
                return

    def _file(self, sock: socket.socket, method: bytes) -> None:
        size = self.server.file_size
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % size)
        if method == b"HEAD":
            return
        with open(self.server.file_path, "rb") as f:
            sock.sendfile(f)

    def _sink(self, sock: socket.socket, headers: dict[bytes, bytes], query: bytes, buffered: bytes) -> bytes:
        length = int(headers.get(b"content-length", b"0"))
        rate = 0
        for part in query.split(b"&"):
            if part.startswith(b"rate="):
                rate = int(part[5:])
        started = time.monotonic()
        first_byte_at: float | None = None
        received = 0
        if buffered:
            first_byte_at = time.time()
            self.server.record({"first_body_byte_at": first_byte_at, "length": length})
            received = min(len(buffered), length)
            buffered = buffered[received:]
        if rate:
            # A small receive buffer, so that reading slowly really holds the sender back.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        while received < length:
            want = min(65536, length - received)
            if rate:
                ahead = received / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
                want = min(want, max(4096, rate // 50))
            try:
                data = sock.recv(want)
            except ConnectionError:
                break
            if not data:
                break
            if first_byte_at is None:
                first_byte_at = time.time()
                self.server.record({"first_body_byte_at": first_byte_at, "length": length})
            received += len(data)
        body = b"%d\n" % received
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        return buffered


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], file_path: str, events: str | None) -> None:
        super().__init__(address, Handler)
        self.file_path = file_path
        self.file_size = os.path.getsize(file_path) if file_path else 0
        self._events = events
        self._lock = threading.Lock()

    def record(self, event: dict[str, Any]) -> None:
        if not self._events:
            return
        with self._lock, open(self._events, "a") as f:
            f.write(json.dumps(event) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--file", default="")
    parser.add_argument("--events", default=None)
    args = parser.parse_args()
    server = Server(("127.0.0.1", args.port), args.file, args.events)
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    sys.exit(0)


if __name__ == "__main__":
    main()
