"""Upstreams that answer while the upload is still coming, over real loopback sockets: the answer reaches the
client with memory bounded, and no upstream socket is left behind."""

from __future__ import annotations

import gc
import socket
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from gateway.http1.server import ClientConnection
from gateway.http1.upstream import UpstreamConnection
from gateway.proxy.site import GatewayFactory
from tests.support.clients import connect, parse_responses, within
from tests.support.running import gateway_config

MiB = 1024 * 1024


@implementer(IPushProducer)
class _StreamsWhileReading(Protocol):
    """A full-duplex upstream: on the first bytes of a request it answers 200 with `size` bytes (written with
    backpressure) while it goes on reading and dropping the request body."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0
        self.paused = False
        self.started = False

    def dataReceived(self, data: bytes) -> None:
        if not self.started:
            self.started = True
            self.transport.registerProducer(self, True)
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.size)
            self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < self.size:
            n = min(256 * 1024, self.size - self.sent)
            self.sent += n
            self.transport.write(b"z" * n)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True


def _open_gateway_upstreams() -> list[UpstreamConnection]:
    """The gateway's upstream protocols whose TCP connection is still open (in-memory tests' ones excluded)."""
    return [
        obj
        for obj in gc.get_objects()
        if isinstance(obj, UpstreamConnection) and hasattr(obj.transport, "socket") and obj.transport.connected
    ]


def _abort_gateway_upstreams() -> None:
    for protocol in _open_gateway_upstreams():
        protocol.transport.abortConnection()


def _gateway_client_sockets() -> list[Any]:
    return [
        obj.transport.socket
        for obj in gc.get_objects()
        if isinstance(obj, ClientConnection)
        and isinstance(getattr(obj, "owner", None), GatewayFactory)
        and hasattr(obj.transport, "socket")
        and obj.transport.connected
    ]


@pytest_twisted.ensureDeferred
async def test_full_duplex_response_to_a_client_that_reads_nothing_is_not_buffered_without_bound(gateway_for):
    """A client that reads nothing (its socket buffers shrunk, standing for a slow client whose kernel buffers
    are full) and gets an answer the upstream began while it was still reading the upload: the gateway stops
    reading the upstream once the client's buffer is full, as it does for a GET."""
    made: list[_StreamsWhileReading] = []

    def build() -> _StreamsWhileReading:
        p = _StreamsWhileReading(64 * MiB)
        made.append(p)
        return p

    port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
    try:
        gateway = gateway_for(gateway_config(f"http://127.0.0.1:{port.getHost().port}"))
        client = await connect(gateway.port)
        client.pause()
        client.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await task.deferLater(reactor, 0.05, lambda: None)
        for sock in _gateway_client_sockets():
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.send(b"POST /x HTTP/1.1\r\nHost: example.test\r\nContent-Length: %d\r\n\r\n" % MiB)
        await task.deferLater(reactor, 0.2, lambda: None)
        client.send(b"b" * MiB)
        await task.deferLater(reactor, 2.0, lambda: None)
        (upstream,) = made
        assert upstream.sent < 16 * MiB, f"the gateway took {upstream.sent} bytes for a client that reads nothing"
    finally:
        for p in made:
            if p.transport is not None and p.transport.connected:
                p.transport.abortConnection()
        _abort_gateway_upstreams()
        await port.stopListening()
        await task.deferLater(reactor, 0.1, lambda: None)


class _AnswersThenStopsReading(Protocol):
    """An upstream that reads `threshold` bytes of an upload, stops reading while it decides, answers 403 with
    Connection: close, then reads (and drops) what it was sent and closes its end once nothing more comes, as a
    server with a lingering close (nginx) does."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.received = 0
        self.answered = False
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if not self.answered and self.received >= self.threshold:
            self.answered = True
            self.transport.pauseProducing()
            reactor.callLater(0.5, self._answer)

    def _answer(self) -> None:
        self.transport.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno")
        reactor.callLater(1.0, self._close)

    def _close(self) -> None:
        self.transport.resumeProducing()
        reactor.callLater(0.5, self.transport.loseConnection)

    def connectionLost(self, reason: object) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_upstream_connection_is_closed_after_an_early_answer_to_an_upload_it_had_paused(gateway_for):
    """An upstream that answers 403 while it holds the upload paused (then closes) leaves no socket open in the
    gateway: a connection whose answer came before its request body was sent is aborted, not closed gracefully
    (which would wait for ever to write a body the upstream does not read)."""
    made: list[_AnswersThenStopsReading] = []

    def build() -> _AnswersThenStopsReading:
        p = _AnswersThenStopsReading(MiB)
        made.append(p)
        return p

    port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
    try:
        gateway = gateway_for(
            gateway_config(f"http://127.0.0.1:{port.getHost().port}", server={"lingering_timeout": 0.5})
        )
        client = await connect(gateway.port, keep_all=True)
        size = 256 * MiB
        client.send(b"POST /up HTTP/1.1\r\nHost: example.test\r\nContent-Length: %d\r\n\r\n" % size)
        client.send_body(size)
        await within(client.responses_received(1), 10)
        assert parse_responses(bytes(client.head))[0].status == 403
        (upstream,) = made
        await within(upstream.lost, 10)  # the upstream has closed its end
        await task.deferLater(reactor, 2.0, lambda: None)
        still_open = [
            (p.usable, p.transport.disconnecting, type(p.transport.producer).__name__)
            for p in _open_gateway_upstreams()
        ]
        assert still_open == [], f"gateway-side upstream sockets still open 2 s after the upstream closed: {still_open}"
    finally:
        for p in made:
            if p.transport is not None and p.transport.connected:
                p.transport.abortConnection()
        _abort_gateway_upstreams()
        await port.stopListening()
        await task.deferLater(reactor, 0.1, lambda: None)
