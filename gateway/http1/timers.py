"""`Watchdog`: one timer, kicked by progress, that a connection measures its waits with.

A client connection has one (`gateway.http1.server.ClientConnection.timer`): its idle time between requests, and
while a request is served whatever that request's exchange waits for; the proxy's pipes and upstream pools use it
for their own waits. Mechanism only: the caller says how long and what happens at the end.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["Watchdog"]


class Watchdog:
    """Calls `expired` once `timeout` seconds pass without progress while armed.

    `kick` (progress) only records the time, so a stream of a million chunks costs one timer per timeout
    period rather than a cancel and a reschedule per chunk.
    """

    __slots__ = ("_armed", "_call", "_call_at", "_clock", "_expired", "_last", "timeout")

    def __init__(self, clock: IReactorTime, timeout: float, expired: Callable[[], object]) -> None:
        self._clock = clock
        self.timeout = timeout
        self._expired = expired
        self._call: IDelayedCall | None = None
        self._call_at = 0.0
        """When `_call` runs: kept here rather than asked of it (`getTime` is a Python call, on every restart)."""
        self._armed = False
        self._last = 0.0

    @property
    def armed(self) -> bool:
        return self._armed

    def arm(self) -> None:
        """Start measuring from now, unless already measuring."""
        if self._armed:
            return
        self._armed = True
        now = self._last = self._clock.seconds()
        if self._call is None:
            self._call_at = now + self.timeout
            self._call = self._clock.callLater(self.timeout, self._check)

    def kick(self) -> None:
        """Note progress: the countdown starts again from now."""
        self._last = self._clock.seconds()

    def restart(self, timeout: float, expired: Callable[[], object]) -> None:
        """Measure again from now, for `timeout` seconds, calling `expired` at the end: one watchdog serves
        whatever its owner waits for next (a connection's idle time, then a request's response head, then its
        body's gaps) with at most one pending timer, moved earlier only when the new deadline is sooner."""
        self.timeout = timeout
        self._expired = expired
        self._armed = True
        now = self._last = self._clock.seconds()
        call = self._call
        if call is not None and self._call_at > now + timeout:
            call.cancel()
            call = self._call = None
        if call is None:
            self._call_at = now + timeout
            self._call = self._clock.callLater(timeout, self._check)

    def disarm(self) -> None:
        """Stop measuring; a pending timer finds nothing to do (or is cancelled by `cancel`)."""
        self._armed = False

    def cancel(self) -> None:
        """Stop for good and leave no timer behind."""
        self._armed = False
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def _check(self) -> None:
        self._call = None
        if not self._armed:
            return
        now = self._clock.seconds()
        remaining = self._last + self.timeout - now
        if remaining > 0:
            self._call_at = now + remaining
            self._call = self._clock.callLater(remaining, self._check)
        else:
            self._armed = False
            self._expired()
