"""The Deferred view of a request sent with `send` (an upstream connection's or a pool's), for tests that read
its answer with `successResultOf` and friends: the gateway itself is told through a `ResponseReceiver`."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from gateway.http1.response import Cancellable, UpstreamResponse


class DeferredReceiver:
    """Fires `done` with the response, or fails it; cancelling `done` gives the request up."""

    def __init__(self) -> None:
        self.sending: Cancellable | None = None
        self.done: Deferred[UpstreamResponse] = Deferred(self._cancelled)

    def _cancelled(self, _: Deferred[UpstreamResponse]) -> None:
        if self.sending is not None:
            self.sending.cancel()

    def response_received(self, response: UpstreamResponse) -> None:
        self.done.callback(response)

    def response_failed(self, reason: Failure) -> None:
        self.done.errback(reason)


def request(sender: Any, method: bytes, target: bytes, headers: Any, body: Any, **options: Any) -> Deferred[Any]:
    """`sender.send(...)` (an `UpstreamConnection` or an `UpstreamPool`), as a Deferred of the response."""
    receiver = DeferredReceiver()
    receiver.sending = sender.send(method, target, headers, body, receiver, **options)
    return receiver.done
