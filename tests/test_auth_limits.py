"""Tests for gateway.auth.limits: GCRA rate limits and concurrency slots of MemoryLimitStore, on a Clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from gateway.auth.limits import MemoryLimitStore, RateDecision
from gateway.auth.settings.model import RateLimit

# Intervals that are exact binary fractions (0.25 s, 0.5 s, 6 s...), so that these tests pin the algorithm, not
# floating-point rounding; rounding has tests of its own below.
EXACT_LIMITS = [
    RateLimit(requests=4, period=1.0, burst=4),
    RateLimit(requests=10, period=60.0, burst=10),
    RateLimit(requests=2, period=1.0, burst=5),
    RateLimit(requests=1, period=1.0, burst=1),
    RateLimit(requests=8, period=2.0, burst=3),
    RateLimit(requests=1, period=0.5, burst=16),
]
START_TIMES = [0.0, 0.5, 1000.0, 123456.25]


def store_at(start: float = 0.0) -> tuple[MemoryLimitStore, Clock]:
    clock = Clock()
    clock.advance(start)
    return MemoryLimitStore(clock), clock


def drain(store: MemoryLimitStore, key: str, limit: RateLimit) -> int:
    """Take until refused; the number allowed."""
    allowed = 0
    while store.take(key, limit).allowed:
        allowed += 1
        assert allowed <= 10_000
    return allowed


# --- rates ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start", START_TIMES)
@pytest.mark.parametrize("limit", EXACT_LIMITS, ids=str)
def test_burst_at_once_then_refused(limit: RateLimit, start: float) -> None:
    """A fresh key takes exactly `burst` requests at one instant; the next is refused."""
    store, _ = store_at(start)
    assert drain(store, "k", limit) == limit.burst
    assert not store.take("k", limit).allowed


@pytest.mark.parametrize("start", START_TIMES)
@pytest.mark.parametrize("limit", EXACT_LIMITS, ids=str)
def test_retry_after_is_exact(limit: RateLimit, start: float) -> None:
    """A refusal after the burst says retry after one interval, and it is exact: just before, still refused;
    at it, allowed."""
    store, clock = store_at(start)
    drain(store, "k", limit)
    refused = store.take("k", limit)
    assert refused == RateDecision(
        allowed=False, remaining=0, retry_after=limit.interval, reset=limit.burst * limit.interval
    )
    clock.advance(refused.retry_after - 0.001)
    assert not store.take("k", limit).allowed
    clock.advance(0.001)
    assert store.take("k", limit).allowed
    assert not store.take("k", limit).allowed


@pytest.mark.parametrize("limit", EXACT_LIMITS, ids=str)
def test_recovery_at_the_sustained_rate(limit: RateLimit) -> None:
    """Once the burst is spent, each interval allows exactly one more request."""
    store, clock = store_at(1000.0)
    drain(store, "k", limit)
    for _ in range(25):
        clock.advance(limit.interval)
        assert store.take("k", limit).allowed
        assert not store.take("k", limit).allowed


@pytest.mark.parametrize("limit", EXACT_LIMITS, ids=str)
def test_full_recovery_after_burst_intervals(limit: RateLimit) -> None:
    """After burst intervals without requests the whole burst is available again."""
    store, clock = store_at()
    drain(store, "k", limit)
    clock.advance(limit.burst * limit.interval)
    assert store.peek("k", limit).remaining == limit.burst
    assert drain(store, "k", limit) == limit.burst


def test_waiting_longer_does_not_bank_more_than_the_burst() -> None:
    """An idle hour allows one burst, not an hour's worth of requests."""
    limit = RateLimit(requests=4, period=1.0, burst=4)
    store, clock = store_at()
    drain(store, "k", limit)
    clock.advance(3600)
    assert drain(store, "k", limit) == 4


def test_remaining_counts_down() -> None:
    """Each allowed request reports one fewer remaining, down to 0; a refusal reports 0."""
    limit = RateLimit(requests=4, period=1.0, burst=5)
    store, _ = store_at()
    decisions = [store.take("k", limit) for _ in range(7)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0, 0]
    assert [d.retry_after for d in decisions] == [0.0] * 5 + [0.25, 0.25]
    assert [d.reset for d in decisions] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.25, 1.25]


def test_remaining_recovers_with_time() -> None:
    """Remaining rises by one per interval elapsed, up to the burst."""
    limit = RateLimit(requests=2, period=1.0, burst=4)
    store, clock = store_at()
    drain(store, "k", limit)
    assert store.peek("k", limit).remaining == 0
    for expected in (1, 2, 3, 4, 4):
        clock.advance(0.5)
        assert store.peek("k", limit).remaining == expected


def test_refusals_are_not_counted() -> None:
    """A refused request does not push the next allowed one further away."""
    limit = RateLimit(requests=4, period=1.0, burst=1)
    store, clock = store_at()
    assert store.take("k", limit).allowed
    for _ in range(100):
        assert not store.take("k", limit).allowed
    clock.advance(0.25)
    assert store.take("k", limit).allowed


def test_peek_does_not_count() -> None:
    """peek says what take would, without taking: any number of peeks leaves the whole burst."""
    limit = RateLimit(requests=4, period=1.0, burst=3)
    store, _ = store_at()
    for _ in range(10):
        assert store.peek("k", limit) == RateDecision(allowed=True, remaining=3, retry_after=0.0, reset=0.0)
    first = store.take("k", limit)
    assert first.remaining == 2
    assert store.peek("k", limit) == RateDecision(allowed=True, remaining=2, retry_after=0.0, reset=0.25)
    store.take("k", limit)
    store.take("k", limit)
    refused_peek = store.peek("k", limit)
    refused_take = store.take("k", limit)
    assert refused_peek == refused_take == RateDecision(allowed=False, remaining=0, retry_after=0.25, reset=0.75)


@pytest.mark.parametrize("limit", EXACT_LIMITS, ids=str)
def test_peek_remaining_matches_what_take_allows(limit: RateLimit) -> None:
    """The remaining count peek reports is exactly how many takes are then allowed."""
    store, clock = store_at()
    for step in range(limit.burst + 2):
        promised = store.peek("k", limit).remaining
        allowed = drain(store, "k", limit)
        assert allowed == promised
        clock.advance(limit.interval * (step % 3))


def test_keys_are_independent() -> None:
    """Spending one key's burst leaves every other key's whole."""
    limit = RateLimit(requests=4, period=1.0, burst=2)
    store, _ = store_at()
    assert drain(store, "alice", limit) == 2
    assert store.peek("bob", limit).remaining == 2
    assert drain(store, "bob", limit) == 2
    assert not store.take("alice", limit).allowed


def test_a_key_is_judged_by_the_limit_given() -> None:
    """The same key under a looser limit (its own, say) is judged by that limit's tolerance."""
    tight = RateLimit(requests=1, period=1.0, burst=1)
    loose = RateLimit(requests=1, period=1.0, burst=3)
    store, _ = store_at()
    assert store.take("k", tight).allowed
    assert not store.take("k", tight).allowed
    assert store.take("k", loose).allowed
    assert store.take("k", loose).allowed
    assert not store.take("k", loose).allowed


def test_sweep_drops_only_recovered_keys() -> None:
    """After more than 4096 checks the store holds entries only for keys still limited; swept keys start fresh
    and limited keys stay limited."""
    limit = RateLimit(requests=1, period=1.0, burst=1)
    slow = RateLimit(requests=1, period=3600.0, burst=1)
    store, clock = store_at()
    assert store.take("slow", slow).allowed
    for i in range(5000):
        assert store.take(f"old-{i}", limit).allowed
    clock.advance(10)
    for _ in range(5000):
        store.take("live", limit)
    assert set(store._arrival) == {"slow", "live"}
    assert store.take("old-0", limit) == RateDecision(allowed=True, remaining=0, retry_after=0.0, reset=1.0)
    assert not store.take("slow", slow).allowed
    assert not store.take("live", limit).allowed


@settings(max_examples=60)
@given(
    requests=st.integers(min_value=1, max_value=20),
    period=st.sampled_from([0.1, 0.5, 1.0, 2.0, 10.0, 60.0]),
    burst=st.integers(min_value=1, max_value=10),
    start_ms=st.integers(min_value=0, max_value=10**9),
    steps_ms=st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=80),
)
def test_no_window_allows_more_than_the_burst_plus_the_rate(
    requests: int, period: float, burst: int, start_ms: int, steps_ms: list[int]
) -> None:
    """Over any takes at non-decreasing times, a window of T seconds holds at most burst + ⌈T / interval⌉
    allowed requests."""
    limit = RateLimit(requests=requests, period=period, burst=burst)
    store, clock = store_at(start_ms / 1000)
    allowed: list[float] = []
    for step in steps_ms:
        clock.advance(step / 1000)
        if store.take("k", limit).allowed:
            allowed.append(clock.seconds())
    for i, first in enumerate(allowed):
        for j in range(i, len(allowed)):
            window = allowed[j] - first
            assert j - i + 1 <= limit.burst + math.ceil(window / limit.interval)


@settings(max_examples=60)
@given(
    requests=st.integers(min_value=1, max_value=20),
    period=st.sampled_from([0.5, 1.0, 2.0, 60.0]),
    burst=st.integers(min_value=1, max_value=10),
    steps_ms=st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=60),
)
def test_refusals_carry_a_wait_and_allowances_none(
    requests: int, period: float, burst: int, steps_ms: list[int]
) -> None:
    """Every allowed decision has retry_after 0 and remaining within the burst; every refusal remaining 0 and a
    retry_after in (0, interval], before a reset no later than burst intervals."""
    limit = RateLimit(requests=requests, period=period, burst=burst)
    store, clock = store_at()
    for step in steps_ms:
        clock.advance(step / 1000)
        d = store.take("k", limit)
        assert 0 < d.reset <= limit.burst * limit.interval + 1e-9
        if d.allowed:
            assert d.retry_after == 0.0
            assert 0 <= d.remaining < limit.burst
        else:
            assert d.remaining == 0
            assert 0 < d.retry_after <= limit.interval + 1e-9
            assert d.retry_after <= d.reset


# --- rates as configured: decimal intervals on a clock far from zero -----------------------------------------

HUNDRED_A_SECOND = RateLimit(requests=100, period=1.0, burst=100)
TEN_A_SECOND = RateLimit(requests=10, period=1.0, burst=10)
THREE_A_SECOND = RateLimit(requests=3, period=1.0, burst=3)
SEVEN_PER_TEN_SECONDS = RateLimit(requests=7, period=10.0, burst=7)


@pytest.mark.parametrize(
    ("limit", "start"),
    [(HUNDRED_A_SECOND, 0.0), (TEN_A_SECOND, 12345.678), (THREE_A_SECOND, 1.7), (SEVEN_PER_TEN_SECONDS, 1.7)],
    ids=["100/s@0", "10/s@12345.678", "3/s@1.7", "7/10s@1.7"],
)
def test_decimal_rates_allow_the_whole_burst(limit: RateLimit, start: float) -> None:
    """A rate such as "100/s" (an interval of 0.01 s, not exact in binary) allows its whole burst at once,
    whatever the clock reads."""
    store, _ = store_at(start)
    assert drain(store, "k", limit) == limit.burst


@pytest.mark.parametrize(
    ("limit", "start"),
    [(TEN_A_SECOND, 0.3), (THREE_A_SECOND, 99.99), (SEVEN_PER_TEN_SECONDS, 1_000_000.1)],
    ids=["10/s@0.3", "3/s@99.99", "7/10s@1000000.1"],
)
def test_decimal_rates_retry_after_is_enough(limit: RateLimit, start: float) -> None:
    """Waiting the retry_after of a refusal is enough for the next request to conform, whatever the clock reads."""
    store, clock = store_at(start)
    while True:
        decision = store.take("k", limit)
        if not decision.allowed:
            break
    clock.advance(decision.retry_after)
    assert store.take("k", limit).allowed


@pytest.mark.parametrize(
    ("limit", "start"),
    [(HUNDRED_A_SECOND, 0.0), (TEN_A_SECOND, 12345.678)],
    ids=["100/s@0", "10/s@12345.678"],
)
def test_decimal_rates_remaining_is_truthful(limit: RateLimit, start: float) -> None:
    """An allowed request reporting `remaining` = n is followed, at the same instant, by exactly n more allowed."""
    store, _ = store_at(start)
    first = store.take("k", limit)
    assert first.allowed
    assert drain(store, "k", limit) == first.remaining


# --- concurrency ---------------------------------------------------------------------------------------------


def test_acquire_up_to_the_cap() -> None:
    """acquire takes slots up to the cap, then refuses; held counts them."""
    store, _ = store_at()
    assert store.held("k") == 0
    assert [store.acquire("k", 3) for _ in range(5)] == [True, True, True, False, False]
    assert store.held("k") == 3


def test_release_gives_a_slot_back() -> None:
    """A released slot can be taken again; releasing every slot leaves none held."""
    store, _ = store_at()
    for _ in range(2):
        store.acquire("k", 2)
    store.release("k")
    assert store.held("k") == 1
    assert store.acquire("k", 2)
    assert not store.acquire("k", 2)
    store.release("k")
    store.release("k")
    assert store.held("k") == 0
    assert store.acquire("k", 2)


def test_extra_release_gives_no_extra_slot() -> None:
    """Releasing more than was acquired never lets more than the cap in."""
    store, _ = store_at()
    store.release("k")
    store.release("k")
    assert store.held("k") == 0
    assert [store.acquire("k", 1) for _ in range(3)] == [True, False, False]


def test_slots_per_key_are_independent() -> None:
    """Each key has its own slots."""
    store, _ = store_at()
    assert store.acquire("alice", 1)
    assert not store.acquire("alice", 1)
    assert store.acquire("bob", 1)
    assert (store.held("alice"), store.held("bob")) == (1, 1)
    store.release("alice")
    assert (store.held("alice"), store.held("bob")) == (0, 1)


def test_cap_is_read_on_each_acquire() -> None:
    """A lower cap (after a reload, say) refuses while more than it are held; a higher one admits more."""
    store, _ = store_at()
    for _ in range(3):
        assert store.acquire("k", 3)
    assert not store.acquire("k", 2)
    assert store.acquire("k", 4)
    assert store.held("k") == 4


def test_concurrency_ignores_time_and_rates() -> None:
    """Slots are not timed: held slots stay held however long, and rate checks of the key do not touch them."""
    store, clock = store_at()
    store.acquire("k", 1)
    clock.advance(86400)
    store.take("k", RateLimit(requests=1, period=1.0, burst=1))
    assert store.held("k") == 1
    assert not store.acquire("k", 1)
