"""A small request body kept as it goes upstream, so that the request can be sent again to another server.

Rules:
* What the body's producer writes is passed on unchanged and at once (the pipe's flow control is untouched: the
  copy is taken from what is written, never read ahead), and a copy is kept while it stays within `limit` bytes
  (the route's `retries.max_body_bytes`, at most 64 KiB); past it the copy is dropped and the body cannot be
  replayed.
* The body can be replayed only once it was all sent (its producer's Deferred fired): a part of a body is never
  sent as if it were all of it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

__all__ = ["Kept", "Replay"]


@implementer(IConsumer)
class _Copying:
    """The consumer the body's producer writes to: the connection's, with a copy kept."""

    def __init__(self, consumer: IConsumer, kept: Kept) -> None:
        self._consumer = consumer
        self._kept = kept

    def write(self, data: bytes) -> None:
        self._kept.copy(data)
        self._consumer.write(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._consumer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._consumer.unregisterProducer()


@implementer(IBodyProducer, IPushProducer)
class Kept:
    """`body` as it goes to the first server, a copy of it kept (`whole` once all of it was sent and kept)."""

    def __init__(self, body: IBodyProducer, limit: int) -> None:
        self._body = body
        self._limit = limit
        self.length = body.length
        self._pieces: list[bytes] | None = []
        self._size = 0
        self.whole: bytes | None = None
        """The whole body, once it was all sent within the limit; None before, or when it is too large."""

    def copy(self, data: bytes) -> None:
        if self._pieces is None:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._pieces = None  # too large to be sent again
        else:
            self._pieces.append(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        sending: Deferred[None] = self._body.startProducing(_Copying(consumer, self))

        def sent(result: None) -> None:
            if self._pieces is not None:
                self.whole = b"".join(self._pieces)
            self._pieces = None
            return result

        return sending.addCallback(sent)

    def pauseProducing(self) -> None:
        self._body.pauseProducing()

    def resumeProducing(self) -> None:
        IPushProducer(self._body).resumeProducing()

    def stopProducing(self) -> None:
        self._body.stopProducing()


@implementer(IBodyProducer, IPushProducer)
class Replay:
    """A kept body sent again: all of it, at once (it is at most 64 KiB)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        if self._body:
            consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass
