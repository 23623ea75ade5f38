"""In-memory cost of one small proxied request: the gateway's Python work alone, without sockets or a kernel.

A real GatewayFactory, client connection, Exchange and upstream pool run on a MemoryReactorClock; one client
connection (or `--connections`) and its pooled upstream connection are StringTransports; each round trip sends a
GET, answers it with a 100-byte response and reads the client's bytes. Reports microseconds of the process's CPU
time per request (`time.process_time`, so that other processes on the machine count only through the caches they
share; the best of several batches). Used to measure the effect of each change in the performance pass; not a
substitute for the loopback benchmarks in `bench/run.py`.

Run: `.venv/bin/python bench/micro.py [--requests 20000] [--auth anonymous,key,jwt] [--connections 64] [--count]
[--access-log FILE]`. `--auth` compares the route without authentication with an API-key route and a (cached)
RS256 JWT route, in the same run. `--access-log` turns the JSON access log on (buffered, as under twistd).
`--connections` keeps that many requests in flight, each on its own client and upstream connection, and answers
them in turn: the objects of many requests are live at once, as on sockets, where one connection keeps them all
in the caches. `--count` counts Python bytecodes and calls per request instead (under `sys.settrace`: the
same figures on every run, which CPU time on a shared machine is not).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway.auth.apikeys import hash_key, mint_key
from gateway.config import parse
from gateway.logs import AccessLog
from gateway.operations.metrics import Live, Metrics
from gateway.operations.runtime import make_gateway
from gateway.proxy.site import GatewayFactory

REQUEST = b"GET /small?x=1 HTTP/1.1\r\nHost: example.test\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 25 Nov 2026 10:00:00 GMT\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 100\r\nConnection: keep-alive\r\n\r\n" + b"x" * 100
)


KEY = mint_key()
PRIVATE = rsa.generate_private_key(public_exponent=65537, key_size=2048)
TOKEN = jwt.encode(
    {"iss": "https://id.example/", "aud": "gateway", "sub": "svc", "exp": int(time.time()) + 86400, "scope": "a b"},
    PRIVATE,
    algorithm="RS256",
)
CREDENTIALS = {
    "anonymous": b"",
    "key": b"X-API-Key: " + KEY.encode(),
    "jwt": b"Authorization: Bearer " + TOKEN.encode(),
}


def _config(auth: str, directory: Path) -> dict[str, Any]:
    pem = directory / "jwt.pem"
    pem.write_bytes(
        PRIVATE.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return {
        "listeners": [{"host": "127.0.0.1", "port": 0}],
        "auth": {
            "key": {"type": "api_key"},
            "jwt": {
                "type": "jwt",
                "issuer": "https://id.example/",
                "audiences": ["gateway"],
                "algorithms": ["RS256"],
                "public_key_file": str(pem),
            },
        },
        "consumers": {"svc": {"api_keys": [hash_key(KEY)]}},
        "routes": [
            {
                "name": "all",
                "auth": "anonymous" if auth == "anonymous" else [auth],
                "path_prefix": "/",
                "upstream": "http://10.0.0.2:8080",
            }
        ],
    }


def run(requests: int, auth: str = "anonymous", connections: int = 1, access_log: str = "") -> float:
    reactor = MemoryReactorClock()
    with tempfile.TemporaryDirectory() as directory:
        config = parse(_config(auth, Path(directory)), source="micro")
    credential = CREDENTIALS[auth]
    request = REQUEST if not credential else REQUEST[:-2] + credential + b"\r\n\r\n"
    metrics = Metrics(lambda: Live(0, {}, 0, 0, 0, 0))  # on, as in a running gateway (the access log is off)
    log = AccessLog(access_log, clock=reactor) if access_log else None  # buffered, as under twistd
    factory = GatewayFactory(make_gateway(config, reactor, metrics=metrics, access_log=log), clock=reactor)
    ends = []
    for n in range(connections):
        # Each client connection's first request opens an upstream connection of its own: `connections`
        # requests are in flight, as under wrk's load, and each is answered in turn.
        peer = IPv4Address("TCP", "10.0.0.1", 50000 + n)
        channel = factory.buildProtocol(peer)
        client = StringTransport(peerAddress=peer)
        channel.makeConnection(client)
        channel.dataReceived(request)
        _host, _port, upstream_factory, _timeout, _bind = reactor.tcpClients[n]
        upstream = upstream_factory.buildProtocol(None)
        upstream_transport = StringTransport()
        upstream.makeConnection(upstream_transport)
        ends.append((channel, client, upstream, upstream_transport))
    # Every connection then serves request after request, kept alive, reusing its pooled upstream connection.
    started = time.process_time()
    for turn in range(requests):
        channel, client, upstream, upstream_transport = ends[turn % connections]
        upstream.dataReceived(RESPONSE)
        assert client.value().endswith(b"x" * 100), client.value()[-200:]
        client.clear()
        upstream_transport.clear()
        channel.dataReceived(request)
    elapsed = time.process_time() - started
    assert len(reactor.tcpClients) == connections, "a pooled connection was not reused"
    return elapsed / requests * 1e6


def count(auth: str, requests: int = 500) -> tuple[float, float]:
    """Python bytecodes and Python function calls per request, counted under `sys.settrace`: the same on every run
    and every machine, where time is not (a proxy for the interpreter's work; C functions count as one call's
    bytecodes at their Python caller). The difference between `requests` and 100 requests, so the set-up is out."""
    counted = {"ops": 0, "calls": 0}

    def trace(frame: FrameType, event: str, arg: object) -> Callable[..., object] | None:
        if event == "call":
            counted["calls"] += 1
            frame.f_trace_opcodes = True
        elif event == "opcode":
            counted["ops"] += 1
        return trace

    def traced(n: int) -> tuple[int, int]:
        counted["ops"] = counted["calls"] = 0
        sys.settrace(trace)
        try:
            run(n, auth)
        finally:
            sys.settrace(None)
        return counted["ops"], counted["calls"]

    few, many = traced(100), traced(requests)
    return (many[0] - few[0]) / (requests - 100), (many[1] - few[1]) / (requests - 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--auth", default="anonymous", help="comma-separated: anonymous, key, jwt")
    parser.add_argument(
        "--connections",
        type=int,
        default=1,
        help="client connections with a request in flight each, answered in turn (wrk's S5 has 64): the objects "
        "of many requests are live at once, as on sockets",
    )
    parser.add_argument("--count", action="store_true", help="count bytecodes and calls per request instead of timing")
    parser.add_argument("--access-log", default="", help="write the JSON access log to this file (off by default)")
    args = parser.parse_args()
    kinds = args.auth.split(",")
    if args.count:
        for kind in kinds:
            ops, calls = count(kind)
            print(f"{kind}: {ops:,.0f} Python bytecodes and {calls:,.0f} Python calls per request")
        return
    best = {kind: float("inf") for kind in kinds}
    for _ in range(args.batches):  # interleaved, so that a noisy moment costs every kind alike
        for kind in kinds:
            best[kind] = min(best[kind], run(args.requests, kind, args.connections, args.access_log))
    for kind in kinds:
        ratio = f" ({best[kind] / best[kinds[0]]:.2f}x {kinds[0]})" if kind != kinds[0] else ""
        batches = f"best of {args.batches} batches of {args.requests}, {args.connections} connection(s)"
        print(f"{kind}: {best[kind]:.1f} us per request{ratio} ({batches})")


if __name__ == "__main__":
    main()
