"""Request-rate and concurrency limits, behind a small store interface.

Rule: a rate limit is GCRA (the generic cell rate algorithm, as in ATM networks and redis-cell): one number per
key, the theoretical arrival time of the next request, so a check is O(1) and needs no timer. A request
conforms when it is at most `(burst - 1) * interval` early; each conforming one pushes the time on by one
interval. A concurrency limit is a count per key, taken when a request is admitted and given back when it ends,
however it ends.

The store is in-process (`MemoryLimitStore`): with several worker processes each counts on its own, so a limit
of N is N per process. A shared store (Redis) would implement the same `LimitStore` methods. No library is
used: `limits` and `pyrate-limiter` time with the wall clock and expire keys with threads, neither of which fits
a reactor with an injected clock; GCRA is a dozen lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, Protocol

from twisted.internet.interfaces import IReactorTime

from gateway.auth.settings.model import RateLimit

__all__ = ["LimitStore", "MemoryLimitStore", "RateDecision", "once"]

_SWEEP_EVERY = 4096
"""Rate checks between two sweeps of keys that have fully recovered (and so need no entry)."""
_SLACK = 1e-6
"""Seconds by which a request may be early and still conform: the arrival time is a sum of float intervals
(0.01 added 99 times is 0.9900000000000007), which must not cost "100/s" the hundredth request of its burst, nor
make a client that waited exactly `retry_after` be refused again."""


class RateDecision(NamedTuple):
    """The outcome of one rate check, with what the RateLimit headers say about it. (A named tuple: one is made per
    check, and a frozen dataclass costs a microsecond to make.)"""

    allowed: bool
    remaining: int
    """Requests that would still conform right now."""
    retry_after: float
    """Seconds until a request would conform again (0 when allowed)."""
    reset: float
    """Seconds until the whole burst is available again."""


class LimitStore(Protocol):
    """Where limit counters live."""

    def take(self, key: str, limit: RateLimit) -> RateDecision:
        """Count one request under `key` if it conforms to `limit`."""

    def peek(self, key: str, limit: RateLimit) -> RateDecision:
        """Whether one more request under `key` would conform, without counting it."""

    def acquire(self, key: str, cap: int) -> bool:
        """Take one of `cap` concurrency slots of `key`; False when all are taken."""

    def release(self, key: str) -> None:
        """Give back a slot taken by `acquire`."""


class MemoryLimitStore:
    """Limit counters in this process's memory, timed by an injected clock."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._arrival: dict[str, float] = {}
        """key -> theoretical arrival time of its next request; absent = fully recovered."""
        self._slots: dict[str, int] = {}
        self._checks = 0

    def take(self, key: str, limit: RateLimit) -> RateDecision:
        now = self._clock.seconds()
        self._checks += 1
        if self._checks >= _SWEEP_EVERY:
            self._sweep(now)
        interval = limit.interval
        tolerance = interval * (limit.burst - 1)
        arrival = max(self._arrival.get(key, now), now)
        early = arrival - now
        if early > tolerance + _SLACK:
            return RateDecision(False, 0, early - tolerance, early)
        arrival += interval
        self._arrival[key] = arrival
        return RateDecision(True, _remaining(arrival - now, tolerance, interval), 0.0, arrival - now)

    def peek(self, key: str, limit: RateLimit) -> RateDecision:
        if key not in self._arrival:
            return RateDecision(True, limit.burst, 0.0, 0.0)  # never seen, or fully recovered: the whole burst
        now = self._clock.seconds()
        arrival = max(self._arrival.get(key, now), now)
        early = arrival - now
        tolerance = limit.interval * (limit.burst - 1)
        if early > tolerance + _SLACK:
            return RateDecision(False, 0, early - tolerance, early)
        return RateDecision(True, _remaining(early, tolerance, limit.interval), 0.0, early)

    def acquire(self, key: str, cap: int) -> bool:
        held = self._slots.get(key, 0)
        if held >= cap:
            return False
        self._slots[key] = held + 1
        return True

    def release(self, key: str) -> None:
        held = self._slots.get(key, 0) - 1
        if held > 0:
            self._slots[key] = held
        else:
            self._slots.pop(key, None)

    def held(self, key: str) -> int:
        """Slots of `key` taken now (for tests and metrics)."""
        return self._slots.get(key, 0)

    def _sweep(self, now: float) -> None:
        self._checks = 0
        for key in [key for key, arrival in self._arrival.items() if arrival <= now]:
            del self._arrival[key]


def _remaining(early: float, tolerance: float, interval: float) -> int:
    """Requests that would still conform now, when the next one is due `early` seconds from now."""
    return max(math.floor((tolerance - early + _SLACK) / interval), -1) + 1


def once(release: Callable[[], object]) -> Callable[[], None]:
    """`release`, callable any number of times but acting once: a slot is given back exactly once."""
    done = False

    def release_once() -> None:
        nonlocal done
        if not done:
            done = True
            release()

    return release_once
