"""`gateway.upstreams.balancers`: the choice of a server, pure and deterministic (the least-requests choice on a
seeded random source)."""

from __future__ import annotations

import random
from collections import Counter

from gateway.upstreams.balancers import HashRing, LeastRequests, SmoothRoundRobin

ALL3 = [True, True, True]
IDLE3 = [0, 0, 0]


def test_round_robin_spreads_by_weight_smoothly() -> None:
    """Weights 5, 1, 1 give nginx's smooth sequence: the heavy server never takes its five in one burst."""
    rr = SmoothRoundRobin([5, 1, 1])
    picks = [rr.pick(ALL3, IDLE3) for _ in range(7)]
    assert picks == [0, 0, 1, 0, 2, 0, 0]


def test_round_robin_equal_weights_take_turns() -> None:
    rr = SmoothRoundRobin([1, 1, 1])
    assert [rr.pick(ALL3, IDLE3) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_round_robin_skips_servers_that_cannot_be_used() -> None:
    """A server left out (ejected, at its cap) is not chosen; the others share its requests by weight."""
    rr = SmoothRoundRobin([1, 2, 1])
    picks = Counter(rr.pick([True, False, True], IDLE3) for _ in range(100))
    assert picks == {0: 50, 2: 50}


def test_round_robin_with_no_usable_server_picks_none() -> None:
    assert SmoothRoundRobin([1, 1]).pick([False, False], [0, 0]) is None


def test_least_requests_takes_the_less_busy_of_two() -> None:
    """Of the two drawn, the one with fewer requests in flight; a server much busier than the rest is chosen only
    when drawn with another as busy (never here: with three servers, any two drawn include an idle one)."""
    lr = LeastRequests([1, 1, 1], random.Random(7))
    picks = Counter(lr.pick(ALL3, [10, 0, 0]) for _ in range(300))
    assert picks[0] == 0
    assert picks[1] > 100 and picks[2] > 100


def test_least_requests_counts_load_per_unit_of_weight() -> None:
    """A server of weight 4 with 3 requests in flight is less loaded than one of weight 1 with 1."""
    lr = LeastRequests([4, 1], random.Random(1))
    assert {lr.pick([True, True], [3, 1]) for _ in range(20)} == {0}


def test_least_requests_is_deterministic_for_a_seed() -> None:
    a = LeastRequests([1, 1, 1, 1], random.Random(42))
    b = LeastRequests([1, 1, 1, 1], random.Random(42))
    usable = [True] * 4
    assert [a.pick(usable, [0, 0, 0, 0]) for _ in range(50)] == [b.pick(usable, [0, 0, 0, 0]) for _ in range(50)]


def test_least_requests_with_one_usable_server_takes_it() -> None:
    lr = LeastRequests([1, 1, 1], random.Random(0))
    assert lr.pick([False, True, False], IDLE3) == 1
    assert lr.pick([False, False, False], IDLE3) is None


ADDRESSES = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]


def test_hash_keeps_a_key_on_its_server() -> None:
    """The same key reaches the same server every time while the set of servers stays the same."""
    ring = HashRing(ADDRESSES, [1, 1, 1])
    for n in range(50):
        key = b"user-%d" % n
        first = ring.pick(ALL3, IDLE3, key)
        assert all(ring.pick(ALL3, IDLE3, key) == first for _ in range(3))


def test_hash_spreads_keys_by_weight() -> None:
    ring = HashRing(ADDRESSES, [1, 1, 2])
    counts = Counter(ring.pick(ALL3, IDLE3, b"k%d" % n) for n in range(4000))
    assert 0.2 < counts[0] / 4000 < 0.3
    assert 0.4 < counts[2] / 4000 < 0.6


def test_hash_moves_only_the_keys_of_a_server_that_leaves() -> None:
    """A server left out moves its own keys to the others; no key of another server moves."""
    ring = HashRing(ADDRESSES, [1, 1, 1])
    keys = [b"k%d" % n for n in range(1000)]
    before = {key: ring.pick(ALL3, IDLE3, key) for key in keys}
    after = {key: ring.pick([True, False, True], IDLE3, key) for key in keys}
    for key in keys:
        if before[key] != 1:
            assert after[key] == before[key]
        else:
            assert after[key] in (0, 2)


def test_hash_does_not_depend_on_the_order_of_the_servers() -> None:
    """Points are named by address: the same servers listed in another order send each key to the same one."""
    ring = HashRing(ADDRESSES, [1, 1, 1])
    reordered = HashRing(list(reversed(ADDRESSES)), [1, 1, 1])
    for n in range(200):
        key = b"k%d" % n
        assert (
            ADDRESSES[ring.pick(ALL3, IDLE3, key) or 0]
            == list(reversed(ADDRESSES))[reordered.pick(ALL3, IDLE3, key) or 0]
        )


def test_hash_without_a_key_is_round_robin() -> None:
    ring = HashRing(ADDRESSES, [1, 1, 1])
    assert [ring.pick(ALL3, IDLE3, None) for _ in range(3)] == [0, 1, 2]
