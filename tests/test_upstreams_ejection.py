"""`gateway.upstreams.ejection.Ejector` and `gateway.upstreams.budget` on a `Clock`: when a server is ejected,
for how long, the panic threshold, and the retry budget's window."""

from __future__ import annotations

import random

from twisted.internet.task import Clock

from gateway.config.model import Ejection, Retries, RetryBudget
from gateway.upstreams.budget import Budget, backoff
from gateway.upstreams.ejection import Ejector, Standing


def ejector(count: int = 3, **settings: object) -> tuple[Ejector, Clock, list[tuple[int, bool, float]]]:
    clock = Clock()
    changes: list[tuple[int, bool, float]] = []
    values = {"consecutive_failures": 3, "base_time": 10.0, "max_time": 35.0, **settings}
    standings = [Standing() for _ in range(count)]
    return Ejector(Ejection(**values), standings, clock, lambda *c: changes.append(c)), clock, changes  # type: ignore[arg-type]


def test_consecutive_failures_eject_and_a_success_resets_the_count() -> None:
    ej, _, changes = ejector()
    ej.failed(0)
    ej.failed(0)
    ej.succeeded(0)
    ej.failed(0)
    ej.failed(0)
    assert not ej.is_ejected(0)
    assert ej.failed(0) == 10.0
    assert ej.is_ejected(0)
    assert changes == [(0, True, 10.0)]


def test_an_ejected_server_comes_back_on_its_own_once_its_time_is_up() -> None:
    ej, clock, changes = ejector()
    for _ in range(3):
        ej.failed(1)
    clock.advance(9.75)
    ej.check()
    assert ej.is_ejected(1)
    assert ej.retry_after() == 0.25
    clock.advance(0.25)
    ej.check()
    assert not ej.is_ejected(1)
    assert changes == [(1, True, 10.0), (1, False, 0.0)]
    assert clock.getDelayedCalls() == []  # no timer: the return is seen at the next choice


def test_each_ejection_in_a_row_lasts_longer_up_to_max_time() -> None:
    ej, clock, _ = ejector()
    lengths = []
    for _ in range(5):
        for _ in range(3):
            ej.failed(0)
        seconds = ej.standings[0].until
        assert seconds is not None
        lengths.append(seconds - clock.seconds())
        clock.advance(lengths[-1])
        ej.check()
    assert lengths == [10.0, 20.0, 30.0, 35.0, 35.0]
    assert ej.standings[0].ejections == 5


def test_a_server_back_for_max_time_starts_again_from_base_time() -> None:
    ej, clock, _ = ejector()
    for _ in range(3):
        ej.failed(0)
    clock.advance(10)
    ej.check()
    clock.advance(35)
    for _ in range(3):
        ej.failed(0)
    assert ej.standings[0].until == clock.seconds() + 10


def test_the_panic_threshold_never_ejects_more_than_its_share() -> None:
    """At 50% of three servers one may be out; the second's failures eject nobody, and it stays in."""
    ej, _, changes = ejector(max_ejected_percent=50)
    for _ in range(3):
        ej.failed(0)
        ej.failed(1)
    assert ej.is_ejected(0) and not ej.is_ejected(1)
    assert ej.ejected == 1
    assert changes == [(0, True, 10.0)]


def test_a_single_server_is_never_ejected_at_the_default_threshold() -> None:
    ej, _, changes = ejector(count=1)
    for _ in range(10):
        ej.failed(0)
    assert not ej.is_ejected(0)
    assert changes == []


def test_zero_failures_never_ejects() -> None:
    ej, _, _ = ejector(consecutive_failures=0)
    for _ in range(10):
        ej.failed(0)
    assert not ej.is_ejected(0)


# --- the retry budget -----------------------------------------------------------------------------------------


def test_the_budget_allows_min_retries_then_a_share_of_requests() -> None:
    clock = Clock()
    budget = Budget(RetryBudget(percent=20, window=10.0, min_retries=2), clock)
    for _ in range(10):
        budget.requested()
    # 2 + 20% of 10 = 4 retries.
    assert [budget.try_retry() for _ in range(5)] == [True, True, True, True, False]


def test_the_budget_forgets_requests_and_retries_past_its_window() -> None:
    clock = Clock()
    budget = Budget(RetryBudget(percent=0, window=10.0, min_retries=1), clock)
    assert budget.try_retry()
    assert not budget.try_retry()
    clock.advance(5)  # half a window: the retry is still counted
    assert not budget.try_retry()
    clock.advance(5)  # a window on: forgotten
    assert budget.try_retry()
    clock.advance(25)
    assert budget.try_retry()


def test_backoff_is_jittered_and_doubles_up_to_its_cap() -> None:
    rng = random.Random(3)
    policy = Retries(backoff=0.1, max_backoff=0.3)
    waits = [[backoff(n, policy, rng) for _ in range(200)] for n in (1, 2, 3, 4)]
    assert all(0 <= w <= 0.1 for w in waits[0])
    assert all(0 <= w <= 0.2 for w in waits[1])
    assert all(0 <= w <= 0.3 for w in waits[3])
    assert max(waits[3]) > 0.25  # capped, not shrunk
    assert len(set(waits[0])) == 200  # jittered


def test_standings_handed_to_a_new_ejector_keep_their_state() -> None:
    """A reload keeps a server's standing: an ejected server stays ejected, and counts towards the threshold."""
    ej, clock, _ = ejector()
    for _ in range(3):
        ej.failed(0)
    again = Ejector(ej.settings, [ej.standings[0], Standing()], clock)
    assert again.is_ejected(0) and again.ejected == 1
    assert again.retry_after() == 10.0
    clock.advance(10)
    again.check()
    assert not again.is_ejected(0)
