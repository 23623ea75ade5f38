"""The shared limit store as admission uses it: Redis when it answers in time, and a per-route choice when it
does not.

Rule: a request never waits on Redis longer than the store's timeout, and never asks a Redis the circuit has
given up on. When a check fails (timeout, error, no connection, circuit open), a route that fails open counts it
in this process (`MemoryLimitStore`, as the local store does: a limit of N becomes N per process for a while) and
a route that fails closed refuses it (503 `LimitsUnavailable`). Every check is one round trip (`RedisLimitStore.run`),
whatever number of limits it applies.

The circuit opens after `failures` checks in a row failed, and stays open `open_for` seconds; then one check is
let through (half open): its success closes the circuit, its failure opens it again. Opening and closing are
logged; latency, errors and fallbacks are counted for the metrics.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple, cast

from OpenSSL import crypto
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust, trustRootFromCertificates
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.auth.limits import MemoryLimitStore, RateDecision, once
from gateway.auth.redis_store import SCRIPT, LimitOp, RedisLimitStore
from gateway.auth.settings.model import RateLimit
from gateway.config.store import LimitStoreSettings
from gateway.errors import LimitsUnavailable
from gateway.redis.client import RedisClient, RedisUnavailable
from gateway.redis.protocol import Arg, RedisError

__all__ = ["LATENCY_BOUNDS", "Admitted", "Circuit", "SharedLimits", "StoreStats", "connect_shared_limits"]

_log = Logger()

_Shared = list[RateDecision | None] | None
"""Redis's decisions, or None: Redis did not answer and the route fails open (decide in this process)."""
LATENCY_BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


class Circuit:
    """Whether to ask Redis now: closed (ask), open (do not, until `open_for` passed), half open (one asks)."""

    def __init__(self, clock: IReactorTime, *, failures: int = 5, open_for: float = 5.0) -> None:
        self._clock = clock
        self._threshold = failures
        self._open_for = open_for
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        """Whether a check may ask Redis now (after `open_for`, one at a time until one succeeds)."""
        if self._opened_at is None:
            return True
        if self._trial or self._clock.seconds() - self._opened_at < self._open_for:
            return False
        self._trial = True
        return True

    def succeeded(self) -> None:
        self._failures = 0
        self._trial = False
        if self._opened_at is not None:
            self._opened_at = None
            _log.info("Limit store circuit closed: Redis answers again; limits are shared again")

    def failed(self, reason: str) -> None:
        self._failures += 1
        if self._trial or (self._opened_at is None and self._failures >= self._threshold):
            if self._opened_at is None:
                _log.warn(
                    "Limit store circuit opened after {failures} failed checks ({reason}): Redis is not asked for "
                    "{open_for} s; routes fail open (counted in this process) or closed (503)",
                    failures=self._failures,
                    reason=reason,
                    open_for=self._open_for,
                )
            self._opened_at = self._clock.seconds()
            self._trial = False


class StoreStats:
    """What the metrics read: checks by latency, errors by kind, fallbacks by mode."""

    def __init__(self) -> None:
        self.latency_buckets = [0] * (len(LATENCY_BOUNDS) + 1)
        self.latency_sum = 0.0
        self.errors: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(LATENCY_BOUNDS):
            if seconds <= bound:
                self.latency_buckets[i] += 1
                break
        else:
            self.latency_buckets[-1] += 1
        self.latency_sum += seconds


class Admitted(NamedTuple):
    """The outcome of a consumer's limits checked together: its slot (None: no cap), its rate decision (None: no
    rate limit), and how to give the slot back."""

    slot: bool | None
    rate: RateDecision | None
    release: Callable[[], None] | None
    budgets: list[RateDecision] | None = None
    """The failed-auth budgets asked in the same call, when any were: one refused means nothing else was taken."""


def _kind(reason: Failure) -> str:
    if reason.check(TimeoutError):
        return "timeout"
    if reason.check(RedisUnavailable):
        return "unavailable"
    if reason.check(RedisError):
        return "error"
    return "connection"


class SharedLimits:
    """Admission's limit checks against Redis, with the circuit, the fallback and the stats."""

    def __init__(
        self,
        redis: RedisLimitStore,
        clock: IReactorTime,
        *,
        circuit: Circuit | None = None,
        settings: LimitStoreSettings | None = None,
        stats: StoreStats | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        """What it was made from: a reload with equal settings keeps it (its connections and leases)."""
        self.local = MemoryLimitStore(clock)
        """The fallback of routes that fail open, and what their counts are while Redis does not answer."""
        self._clock = clock
        self.circuit = circuit or Circuit(clock)
        self.stats = stats if stats is not None else StoreStats()
        """Kept over a reload that replaces the store, so the metrics' counters never go down."""

    def start(self) -> None:
        self.redis.start()

    def close(self) -> Deferred[object]:
        return self.redis.close()

    # --- the checks -------------------------------------------------------------------------------------------

    def take(self, key: str, limit: RateLimit, *, fail_closed: bool) -> Deferred[RateDecision]:
        """Count one request under `key` (anonymous rates)."""

        def decided(decisions: _Shared) -> RateDecision:
            return self.local.take(key, limit) if decisions is None else _first(decisions)

        return self._run([self.redis.take_op(key, limit)], False, fail_closed).addCallback(decided)

    def peek(self, checks: Sequence[tuple[str, RateLimit]], *, fail_closed: bool) -> Deferred[list[RateDecision]]:
        """Whether one more request would conform under each key, in one round trip (failed-auth budgets)."""

        def decided(decisions: _Shared) -> list[RateDecision]:
            if decisions is None:
                return [self.local.peek(key, limit) for key, limit in checks]
            return [d for d in decisions if d is not None]

        ops = [self.redis.peek_op(key, limit) for key, limit in checks]
        return self._run(ops, False, fail_closed).addCallback(decided)

    def count(self, checks: Sequence[tuple[str, RateLimit]]) -> None:
        """Count a failure under each key, in one round trip, answered to nobody (failed authentications); when
        Redis does not answer, counted in this process."""

        def decided(decisions: _Shared) -> None:
            if decisions is None:
                for key, limit in checks:
                    self.local.take(key, limit)

        ops = [self.redis.take_op(key, limit) for key, limit in checks]
        self._run(ops, False, False).addCallback(decided)

    def admit(
        self,
        slot: tuple[str, int] | None,
        rate: tuple[str, RateLimit] | None,
        *,
        fail_closed: bool,
        budgets: Sequence[tuple[str, RateLimit]] = (),
    ) -> Deferred[Admitted]:
        """A consumer's concurrency slot and rate checked together, in one round trip: a refused rate gives the
        slot back in the same call. With `budgets` (failed-auth budgets of a credential already checked), they are
        peeked first in the same call, and one that is spent stops it before anything is taken."""
        ops: list[LimitOp] = [self.redis.peek_op(key, limit) for key, limit in budgets]
        peeked = len(ops)
        acquire = None
        if slot is not None:
            acquire = self.redis.acquire_op(*slot)
            ops.append(acquire)
        if rate is not None:
            ops.append(self.redis.take_op(*rate))

        def locally() -> Admitted:
            peeks: list[RateDecision] | None = None
            if budgets:
                peeks = [self.local.peek(key, limit) for key, limit in budgets]
                if not all(p.allowed for p in peeks):
                    return Admitted(None, None, None, peeks)
            release = None
            if slot is not None:
                if not self.local.acquire(*slot):
                    return Admitted(False, None, None)
                release = once(partial(self.local.release, slot[0]))
            decision = self.local.take(*rate) if rate is not None else None
            if decision is not None and not decision.allowed and release is not None:
                release()
                release = None
            return Admitted(True if slot is not None else None, decision, release, peeks)

        def decided(decisions: _Shared) -> Admitted:
            if decisions is None:
                return locally()
            spent = None
            if peeked:
                budget_decisions = [d for d in decisions[:peeked] if d is not None]
                if len(budget_decisions) < peeked or not all(d.allowed for d in budget_decisions):
                    return Admitted(None, None, None, budget_decisions)  # stopped there: nothing was taken
                spent = budget_decisions
                decisions = decisions[peeked:]
            got = decisions[0] if acquire is not None else None
            decision = decisions[-1] if rate is not None else None
            release = None
            if acquire is not None and got is not None and got.allowed and (decision is None or decision.allowed):
                self.redis.held(acquire)
                release = once(partial(self.redis.release, acquire.key))
            return Admitted(None if acquire is None else bool(got and got.allowed), decision, release, spent)

        return self._run(ops, True, fail_closed).addCallback(decided)

    # --- one round trip ---------------------------------------------------------------------------------------

    def _run(self, ops: list[LimitOp], all_or_nothing: bool, fail_closed: bool) -> Deferred[_Shared]:
        """Redis's decisions; None when it did not answer and the route fails open (decide locally); failing with
        `LimitsUnavailable` when the route fails closed."""
        if not self.circuit.allow():
            return self._fallback(fail_closed)
        started = self._clock.seconds()

        def answered(decisions: list[RateDecision | None]) -> _Shared:
            self.stats.observe(self._clock.seconds() - started)
            self.circuit.succeeded()
            return decisions

        def failed(reason: Failure) -> Deferred[_Shared] | Failure:
            if reason.check(CancelledError):
                # The request stopped waiting (its client left): not Redis's failure, and nothing to decide.
                return reason
            kind = _kind(reason)
            self.stats.errors[kind] += 1
            self.circuit.failed(kind)
            return self._fallback(fail_closed)

        # An errback that returns a Deferred or a Failure: Twisted's overloads take one or the other.
        return cast(
            Deferred[_Shared], self.redis.run(ops, all_or_nothing=all_or_nothing).addCallbacks(answered, failed)
        )

    def _fallback(self, fail_closed: bool) -> Deferred[_Shared]:
        if fail_closed:
            self.stats.fallbacks["closed"] += 1
            return fail(LimitsUnavailable("rate limits cannot be checked now", reason="limits_unavailable"))
        self.stats.fallbacks["open"] += 1
        return succeed(None)


def connect_shared_limits(
    settings: LimitStoreSettings, reactor: Any, *, stats: StoreStats | None = None
) -> SharedLimits:
    """The shared store `settings` describe, connecting in the background (checks fail over until it is ready)."""
    endpoint: IStreamClientEndpoint = HostnameEndpoint(
        reactor, settings.host, settings.port, timeout=max(1, math.ceil(settings.connect_timeout))
    )
    if settings.tls:
        trust = (
            trustRootFromCertificates([Certificate(crypto.X509.from_cryptography(c)) for c in settings.ca])
            if settings.ca
            else platformTrust()
        )
        endpoint = wrapClientTLS(optionsForClientTLS(settings.host, trust), endpoint)
    setup: list[tuple[Arg, ...]] = []
    if settings.password:
        setup.append(
            ("AUTH", settings.username, settings.password) if settings.username else ("AUTH", settings.password)
        )
    if settings.db:
        setup.append(("SELECT", settings.db))
    setup.append(("SCRIPT", "LOAD", SCRIPT))
    client = RedisClient(
        reactor,
        endpoint,
        pool_size=settings.pool_size,
        timeout=settings.timeout,
        connect_timeout=settings.connect_timeout,
        setup=setup,
    )
    store = RedisLimitStore(client, reactor, prefix=settings.prefix, lease_ttl=settings.lease_ttl)
    return SharedLimits(store, reactor, settings=settings, stats=stats)


def _first(decisions: list[RateDecision | None]) -> RateDecision:
    decision = decisions[0]
    assert decision is not None
    return decision
