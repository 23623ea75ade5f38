"""The check both download tests (plain and TLS) make: a client that stops reading holds the upstream back, and
once it reads again the whole body arrives."""

from __future__ import annotations

from twisted.internet import reactor, task

from tests.support.clients import RawClient, within
from tests.support.origin import Seen, pattern_bytes

MiB = 1024 * 1024
HELD_BACK = 16 * MiB
"""At most what the upstream may send to a client that reads nothing: the sockets' and TLS layer's buffers."""


async def held_back_then_whole(client: RawClient, seen: Seen, size: int) -> None:
    """`client` (paused) holds the upstream's `seen` request back; resumed, it gets all `size` body bytes."""
    await within(seen.paused)
    # Without backpressure the gateway would keep reading the upstream into its own memory at loopback speed;
    # give it a second to show it does not (this wait is for something that must not happen).
    await task.deferLater(reactor, 1.0, lambda: None)
    assert seen.events[-1] == "paused", seen.events[-5:]
    assert seen.sent < HELD_BACK, f"the upstream sent {seen.sent} bytes to a client that read (almost) none"
    client.resume()
    await within(client.closed, 60)
    head_length = bytes(client.head).index(b"\r\n\r\n") + 4
    assert client.received - head_length == size
    assert client.tail == pattern_bytes(size - 64, 64)
    assert seen.finished
    assert client.clean_close
