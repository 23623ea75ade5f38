"""Response direction over real loopback sockets: bodies stream through whole, with backpressure."""

from __future__ import annotations

import hashlib

import pytest_twisted

from tests.support.clients import connect, within
from tests.support.origin import pattern_bytes
from tests.support.running import gateway_config


@pytest_twisted.ensureDeferred
async def test_content_length_body_arrives_whole(origin, gateway_for):
    """A response with Content-Length reaches the client byte for byte, with its Content-Length kept."""
    gateway = gateway_for(gateway_config(origin.url))
    client = await connect(gateway.port, keep_all=True)
    client.send(b"GET /bytes/300000 HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
    await within(client.closed)
    response = client.response()
    assert response.status == 200
    assert response.header(b"content-length") == b"300000"
    assert response.header(b"transfer-encoding") is None
    assert response.complete
    assert hashlib.sha256(response.body).digest() == hashlib.sha256(pattern_bytes(0, 300000)).digest()
