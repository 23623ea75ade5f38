"""Passive ejection: which servers of an upstream are left out because their requests keep failing.

Rules:
* `consecutive_failures` failures in a row (a connect failure, a reset, a status of `statuses`) eject a server for
  `base_time` times the number of its ejections in a row, at most `max_time`; one success resets the count of
  failures, and a server that stayed in for `max_time` since it came back starts its ejections from one again.
* Never more than `max_ejected_percent` of the servers are ejected at once (the panic threshold): a failure that
  would eject one more is counted but ejects nobody. An upstream of one server is never ejected from at 50%.
* An ejected server comes back on its own once its time is up, seen at the next choice (no timer to cancel).
* Each server's standing is its own object, which a reload that keeps the server hands on to the new upstream.
* Every change of state is told to `on_change(index, ejected, seconds)`, for the log and the metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from gateway.config.model import Ejection

__all__ = ["Ejector", "Standing"]


@dataclass(slots=True)
class Standing:
    """One server's record: what ejects it, and when it comes back."""

    failures: int = 0
    """Failures in a row."""
    streak: int = 0
    """Ejections in a row."""
    until: float | None = None
    """When it comes back, while ejected."""
    back_at: float | None = None
    """When it last came back."""
    ejections: int = 0
    """Ejections since it was added (a counter for the metrics)."""


class Ejector:
    """The ejection state of an upstream's servers (their `standings`), on `clock`."""

    def __init__(
        self,
        settings: Ejection,
        standings: Sequence[Standing],
        clock: IReactorTime,
        on_change: Callable[[int, bool, float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.standings = list(standings)
        self._clock = clock
        self._on_change = on_change
        returns = [s.until for s in self.standings if s.until is not None]
        self.ejected = len(returns)
        self._next_return = min(returns, default=float("inf"))

    def succeeded(self, index: int) -> None:
        self.standings[index].failures = 0

    def failed(self, index: int) -> float:
        """A request to server `index` failed; the seconds it is ejected for, or 0 when it is not."""
        limit = self.settings.consecutive_failures
        standing = self.standings[index]
        standing.failures += 1
        if not limit or standing.failures < limit or standing.until is not None:
            return 0.0
        if (self.ejected + 1) * 100 > self.settings.max_ejected_percent * len(self.standings):
            return 0.0  # the panic threshold: this one stays in
        now = self._clock.seconds()
        if standing.back_at is not None and now - standing.back_at >= self.settings.max_time:
            standing.streak = 0
        standing.streak += 1
        seconds = min(self.settings.base_time * standing.streak, self.settings.max_time)
        standing.until = now + seconds
        standing.failures = 0
        standing.ejections += 1
        self.ejected += 1
        self._next_return = min(self._next_return, now + seconds)
        if self._on_change is not None:
            self._on_change(index, True, seconds)
        return seconds

    def check(self) -> None:
        """Bring back the servers whose time is up (cheap when none is ejected)."""
        if not self.ejected:
            return
        now = self._clock.seconds()
        if now < self._next_return:
            return
        upcoming = float("inf")
        for i, standing in enumerate(self.standings):
            until = standing.until
            if until is None:
                continue
            if until <= now:
                standing.until = None
                standing.back_at = now
                self.ejected -= 1
                if self._on_change is not None:
                    self._on_change(i, False, 0.0)
            else:
                upcoming = min(upcoming, until)
        self._next_return = upcoming

    def is_ejected(self, index: int) -> bool:
        return self.standings[index].until is not None

    def retry_after(self) -> float:
        """Seconds until the first ejected server comes back (0 when none is ejected)."""
        if not self.ejected:
            return 0.0
        return max(0.0, self._next_return - self._clock.seconds())
