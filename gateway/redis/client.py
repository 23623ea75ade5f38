"""A pool of connections to one Redis server: each command goes to the least busy ready connection and is
answered within a timeout or failed.

Rule: a caller never waits longer than `timeout` for a reply, and never waits for a connection: with none ready
the command fails at once with `RedisUnavailable`. Lost connections are made again in the background with a
capped backoff; a connection is ready only once its setup (AUTH, SELECT, SCRIPT LOAD) has succeeded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.redis.protocol import Arg, RedisProtocol, Reply

__all__ = ["RedisClient", "RedisUnavailable", "answered_within"]

_log = Logger()

_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0


class RedisUnavailable(Exception):
    """No connection to Redis is ready: the command was not sent."""


class _Setup(Factory):
    """Builds the protocol of one pool slot."""

    protocol = RedisProtocol


class RedisClient:
    """`pool_size` connections to one Redis server, made through `endpoint` and kept made until `close`."""

    def __init__(
        self,
        clock: IReactorTime,
        endpoint: IStreamClientEndpoint,
        *,
        pool_size: int = 2,
        timeout: float = 0.05,
        connect_timeout: float = 1.0,
        setup: Sequence[Sequence[Arg]] = (),
    ) -> None:
        """`setup`: commands sent first on every new connection (AUTH, SELECT, SCRIPT LOAD); a connection whose
        setup fails is closed and made again later."""
        self._clock = clock
        self._endpoint = endpoint
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._setup = [tuple(command) for command in setup]
        self._ready: list[RedisProtocol | None] = [None] * pool_size
        self._connecting: list[Deferred[Any] | None] = [None] * pool_size
        self._retry: list[IDelayedCall | None] = [None] * pool_size
        self._failures = [0] * pool_size
        self._closed = False
        self.ever_ready = False
        self.failed_attempts = 0
        """Connections that could not be made or set up (for tests and logs)."""

    @property
    def ready(self) -> int:
        """Connections ready now."""
        return sum(1 for p in self._ready if p is not None)

    def start(self) -> None:
        """Begin making every connection (in the background)."""
        for slot in range(len(self._ready)):
            self._connect(slot)

    def execute(self, *command: Arg, timeout: float | None = None) -> Deferred[Reply]:
        """Send one command; its reply, or a failure: `RedisError` (refused), `RedisUnavailable` (not sent),
        `twisted.internet.defer.TimeoutError` (no reply within the timeout) or the connection's loss."""
        ready = [p for p in self._ready if p is not None]
        if not ready:
            return fail(RedisUnavailable("no connection to Redis is ready"))
        protocol = min(ready, key=lambda p: p.pending)
        (d,) = protocol.send([command])
        return answered_within(d, self._timeout if timeout is None else timeout, self._clock)

    def close(self) -> Deferred[Any]:
        """Close every connection and stop making new ones; fires once all are closed."""
        self._closed = True
        for slot, call in enumerate(self._retry):
            if call is not None and call.active():
                call.cancel()
            self._retry[slot] = None
        for connecting in self._connecting:
            if connecting is not None:
                connecting.cancel()
        closing: list[Deferred[Any]] = []
        for slot, protocol in enumerate(self._ready):
            self._ready[slot] = None
            if protocol is not None and not protocol.lost and protocol.transport is not None:
                done: Deferred[None] = Deferred()
                protocol.on_lost = done
                protocol.transport.loseConnection()
                closing.append(done)
        return DeferredList(closing) if closing else succeed(None)

    # --- one slot ---------------------------------------------------------------------------------------------

    def _connect(self, slot: int) -> None:
        self._retry[slot] = None
        if self._closed:
            return
        connecting: Deferred[Any] = self._endpoint.connect(_Setup())
        connecting.addTimeout(self._connect_timeout, self._clock)
        self._connecting[slot] = connecting
        connecting.addCallback(self._set_up, slot)
        connecting.addCallbacks(self._became_ready, self._failed, callbackArgs=(slot,), errbackArgs=(slot,))

    def _set_up(self, protocol: RedisProtocol, slot: int) -> Deferred[RedisProtocol]:
        if not self._setup:
            return succeed(protocol)
        waits = protocol.send(self._setup)
        done = DeferredList(waits, fireOnOneErrback=True, consumeErrors=True).addTimeout(
            self._connect_timeout, self._clock
        )

        def checked(_: object) -> RedisProtocol:
            return protocol

        def refused(reason: Failure) -> Failure:
            if protocol.transport is not None:
                protocol.transport.loseConnection()
            value = reason.value
            first = getattr(value, "subFailure", None)
            return first if isinstance(first, Failure) else reason

        return done.addCallbacks(checked, refused)

    def _became_ready(self, protocol: RedisProtocol, slot: int) -> None:
        self._connecting[slot] = None
        if self._closed or protocol.lost:
            if protocol.transport is not None and not protocol.lost:
                protocol.transport.loseConnection()
            if not self._closed:
                self._later(slot)
            return
        if self._failures[slot]:
            _log.info("Redis connection {slot} made again", slot=slot)
        self._failures[slot] = 0
        self._ready[slot] = protocol
        self.ever_ready = True
        protocol.on_lost = Deferred()
        protocol.on_lost.addCallback(self._lost, slot, protocol)

    def _lost(self, _: object, slot: int, protocol: RedisProtocol) -> None:
        if self._ready[slot] is protocol:
            self._ready[slot] = None
            self._later(slot)

    def _failed(self, reason: Failure, slot: int) -> None:
        self._connecting[slot] = None
        if self._closed:
            return
        self.failed_attempts += 1
        if self._failures[slot] == 0:
            _log.warn("Redis connection {slot} failed: {reason}", slot=slot, reason=reason.getErrorMessage())
        self._later(slot)

    def _later(self, slot: int) -> None:
        if self._closed:
            return
        delay = min(_BACKOFF_FIRST * 2 ** self._failures[slot], _BACKOFF_MAX)
        self._failures[slot] += 1
        self._retry[slot] = self._clock.callLater(delay, self._connect, slot)


def answered_within(d: Deferred[Reply], seconds: float, clock: IReactorTime) -> Deferred[Reply]:
    """`d`, failed with `TimeoutError` when no reply came within `seconds`, judged one reactor turn after the
    deadline: a reactor runs its due timers before it reads its sockets, so on a busy gateway a reply that came in
    time would otherwise lose to its own timeout (a 10 ms timeout then fails most checks under load, measured)."""
    timed_out = False
    timer: IDelayedCall | None = None

    def expired() -> None:
        nonlocal timer
        timer = clock.callLater(0, give_up)  # the next turn, after the reactor has read what has come

    def give_up() -> None:
        nonlocal timed_out
        if not d.called:
            timed_out = True
            d.cancel()

    timer = clock.callLater(seconds, expired)

    def settled(result: Reply | Failure) -> Reply | Failure:
        if timer is not None and timer.active():
            timer.cancel()
        if timed_out and isinstance(result, Failure) and result.check(CancelledError):
            return Failure(TimeoutError(f"no reply from Redis within {seconds:g} s"))
        return result

    return d.addBoth(settled)
