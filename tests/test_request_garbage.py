"""A finished request leaves no reference cycle behind.

Each request's objects (its exchange, the upstream response, the relay, the parser state) must be freed by
reference counting as the request ends. A cycle among them leaves each request's objects to Python's cyclic
garbage collector instead: a collection every dozen or so small requests, which cost 12% of a small request's CPU
(bench S5) before these cycles were broken. Each test drives one kind of request on a real factory, client
connection and upstream pool over in-memory transports, then asks the collector what it had to free.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway.config import parse
from gateway.logs import AccessLog
from gateway.operations.metrics import Live, Metrics
from gateway.operations.runtime import make_gateway
from gateway.proxy.site import GatewayFactory

GET = b"GET /small?x=1 HTTP/1.1\r\nHost: example.test\r\nUser-Agent: t\r\n\r\n"
LENGTH_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED_RESPONSE = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
POST = b"POST /up HTTP/1.1\r\nHost: example.test\r\nContent-Length: 4\r\n\r\nbody"
NO_ROUTE = b"GET /nowhere HTTP/1.1\r\nHost: other.test\r\n\r\n"


class Proxy:
    """One client connection and one pooled upstream connection, each request answered by the test."""

    def __init__(self, access_log: Path | None) -> None:
        self.reactor = MemoryReactorClock()
        config = {
            "listeners": [{"host": "127.0.0.1", "port": 0}],
            "routes": [
                {
                    "name": "all",
                    "host": "example.test",
                    "path_prefix": "/",
                    "auth": "anonymous",
                    "upstream": "http://10.0.0.2:8080",
                }
            ],
        }
        gateway = make_gateway(
            parse(config, source="test"),
            self.reactor,
            access_log=AccessLog(str(access_log), clock=self.reactor) if access_log is not None else None,
            metrics=Metrics(lambda: Live(0, {}, 0, 0, 0, 0)),
        )
        factory = GatewayFactory(gateway, clock=self.reactor)
        self.channel = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 50000))
        self.client = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 50000))
        self.channel.makeConnection(self.client)
        self.upstream: Any = None
        self.upstream_transport = StringTransport()

    def exchange(self, request: bytes, response: bytes | None) -> bytes:
        """Send `request`, answer it upstream with `response` (None: the gateway answers it itself)."""
        self.client.clear()
        self.channel.dataReceived(request)
        if response is not None:
            if self.upstream is None:
                _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[0]
                self.upstream = factory.buildProtocol(None)
                self.upstream.makeConnection(self.upstream_transport)
            self.upstream_transport.clear()
            self.upstream.dataReceived(response)
        return self.client.value()


@pytest.fixture
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("access_log", [False, True], ids=["no-access-log", "access-log"])
@pytest.mark.parametrize(
    ("request_bytes", "response"),
    [(GET, LENGTH_RESPONSE), (GET, CHUNKED_RESPONSE), (POST, LENGTH_RESPONSE), (NO_ROUTE, None)],
    ids=["content-length", "chunked", "post", "gateway-answer"],
)
def test_a_finished_request_leaves_no_reference_cycle(
    collector_off: None, tmp_path: Path, access_log: bool, request_bytes: bytes, response: bytes | None
) -> None:
    proxy = Proxy(tmp_path / "access.log" if access_log else None)
    for _ in range(3):  # the first requests make what the connection and the pool keep (the pooled connection)
        proxy.exchange(request_bytes, response)
    gc.collect()
    answers = [proxy.exchange(request_bytes, response) for _ in range(20)]
    assert all(answer.startswith(b"HTTP/1.1 ") for answer in answers), answers[-1]
    assert proxy.channel.persistent or response is None
    assert gc.collect() == 0
