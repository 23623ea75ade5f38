"""Choosing the server of a request among those that may be used now: pure, deterministic given their inputs
(and a seeded random source for the least-requests choice).

Each balancer keeps one rule:
* `SmoothRoundRobin`: over any run of requests, each server's share is its weight's share, spread evenly (nginx's
  smooth weighted round robin: a heavier server is not sent its whole share in a burst).
* `LeastRequests`: the less loaded of two servers drawn at random (power of two choices: nearly as good as
  scanning every server, and no herd on the one that just became least loaded).
* `HashRing`: the same key reaches the same server while the set of servers stays the same, and a server leaving
  moves only its own keys (a consistent-hash ring with virtual nodes, Ketama's layout: points per unit of weight,
  each server's points named by its address so the order of the servers in the file does not matter).
"""

from __future__ import annotations

import random
from bisect import bisect_left
from collections.abc import Sequence
from hashlib import blake2b
from typing import Protocol

__all__ = ["Balancer", "HashRing", "LeastRequests", "SmoothRoundRobin"]


class Balancer(Protocol):
    """Chooses one server (an index) of those `usable`; `active` is each one's requests in flight now; `key` is
    what the request hashes to (None: it has none)."""

    def pick(self, usable: Sequence[bool], active: Sequence[int], key: bytes | None) -> int | None: ...


class SmoothRoundRobin:
    """nginx's smooth weighted round robin: each pick adds every usable server's weight to its running score,
    takes the highest and takes the total off the one taken."""

    def __init__(self, weights: Sequence[int]) -> None:
        self._weights = tuple(weights)
        self._current = [0] * len(weights)

    def pick(self, usable: Sequence[bool], active: Sequence[int], key: bytes | None = None) -> int | None:
        best = -1
        total = 0
        current = self._current
        for i, weight in enumerate(self._weights):
            if not usable[i]:
                continue
            current[i] += weight
            total += weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return best


class LeastRequests:
    """Power of two choices: two usable servers drawn at random, the one with fewer requests in flight per unit
    of weight taken (the first drawn on a tie)."""

    def __init__(self, weights: Sequence[int], rng: random.Random | None = None) -> None:
        self._weights = tuple(weights)
        self._rng = rng if rng is not None else random.Random()

    def pick(self, usable: Sequence[bool], active: Sequence[int], key: bytes | None = None) -> int | None:
        candidates = [i for i, ok in enumerate(usable) if ok]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        a, b = self._rng.sample(candidates, 2)
        weights = self._weights
        # active[a] / weights[a] <= active[b] / weights[b], without division.
        return a if active[a] * weights[b] <= active[b] * weights[a] else b


POINTS_PER_WEIGHT = 160
"""Virtual nodes per unit of weight: Ketama's 160, which keeps each server's share within a few percent."""


def _point(data: bytes) -> int:
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring of the servers (named by `addresses`), `POINTS_PER_WEIGHT` points per unit of
    weight; a key goes to the first point at or after its hash whose server is usable. A request without a key
    is spread by smooth round robin."""

    def __init__(self, addresses: Sequence[str], weights: Sequence[int]) -> None:
        ring = sorted(
            (_point(f"{address}-{n}".encode()), i)
            for i, (address, weight) in enumerate(zip(addresses, weights, strict=True))
            for n in range(weight * POINTS_PER_WEIGHT)
        )
        self._points = [point for point, _ in ring]
        self._owners = [owner for _, owner in ring]
        self._fallback = SmoothRoundRobin(weights)

    def pick(self, usable: Sequence[bool], active: Sequence[int], key: bytes | None) -> int | None:
        if key is None:
            return self._fallback.pick(usable, active)
        owners = self._owners
        count = len(owners)
        start = bisect_left(self._points, _point(key))
        for step in range(count):
            owner = owners[(start + step) % count]
            if usable[owner]:
                return owner
        return None
