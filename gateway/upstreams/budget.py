"""The retry budget of an upstream, and the wait before a retry.

Rules:
* Retries to an upstream are at most `percent` of its requests over the last `window` seconds, plus
  `min_retries` a window (so an upstream with little traffic can still be retried): a failing upstream gets at
  most that much more load, never three times its load (Envoy's and Finagle's retry budgets).
* The window slides in two halves: the counts of the half before the last are forgotten, so a burst stops
  counting after one to one and a half windows.
* A retry waits a random time up to `backoff` times two to the power of the retries before it, at most
  `max_backoff` (full jitter: retries of many requests do not arrive together).
"""

from __future__ import annotations

import random

from twisted.internet.interfaces import IReactorTime

from gateway.config.model import Retries, RetryBudget

__all__ = ["Budget", "backoff"]


class Budget:
    """Counts of requests and retries to one upstream over a sliding window on `clock`."""

    def __init__(self, settings: RetryBudget, clock: IReactorTime) -> None:
        self.settings = settings
        self._clock = clock
        self._half = settings.window / 2
        self._started = clock.seconds()
        self._requests = [0, 0]
        self._retries = [0, 0]
        """The counts of the previous half window and of this one."""

    def _slide(self) -> None:
        now = self._clock.seconds()
        if now - self._started < self._half:
            return
        if now - self._started < 2 * self._half:
            self._requests = [self._requests[1], 0]
            self._retries = [self._retries[1], 0]
            self._started += self._half
        else:
            self._requests = [0, 0]
            self._retries = [0, 0]
            self._started = now

    def requested(self) -> None:
        """A request (not a retry) went to the upstream."""
        self._slide()
        self._requests[1] += 1

    def try_retry(self) -> bool:
        """Whether one more retry fits the budget; if so it is counted."""
        self._slide()
        allowed = self.settings.min_retries + sum(self._requests) * self.settings.percent / 100
        if sum(self._retries) + 1 > allowed:
            return False
        self._retries[1] += 1
        return True


def backoff(retry: int, settings: Retries, rng: random.Random) -> float:
    """The wait before retry number `retry` (1 for the first)."""
    return rng.uniform(0.0, min(settings.max_backoff, settings.backoff * 2 ** (retry - 1)))
