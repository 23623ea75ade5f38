"""Tests for gateway.auth.scopes: scopes_allow and missing_scopes against a reference definition, plus named cases."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.auth.scopes import missing_scopes, scopes_allow

# A small alphabet of scopes, so that generated sets overlap often.
scope_sets = st.frozensets(st.sampled_from(["read", "write", "admin", "Read", "reports:read", "a", "b"]), max_size=5)


def reference_allow(held: frozenset[str], any_of: frozenset[str], all_of: frozenset[str]) -> bool:
    """The rule as the module states it: every scope of all_of, and one of any_of when any_of is not empty."""
    return all(s in held for s in all_of) and (not any_of or any(s in held for s in any_of))


@pytest.mark.parametrize(
    ("held", "any_of", "all_of", "allowed", "missing"),
    [
        (set(), set(), set(), True, []),
        ({"read"}, set(), set(), True, []),
        ({"read"}, {"read", "admin"}, set(), True, []),
        ({"write"}, {"read", "admin"}, set(), False, ["admin", "read"]),
        (set(), {"read"}, set(), False, ["read"]),
        ({"read", "write"}, set(), {"read", "write"}, True, []),
        ({"read"}, set(), {"read", "write"}, False, ["write"]),
        ({"read"}, {"admin"}, {"read"}, False, ["admin"]),
        ({"admin"}, {"admin"}, {"read", "write"}, False, ["read", "write"]),
        ({"x"}, {"b", "a"}, {"d", "c"}, False, ["a", "b", "c", "d"]),
        ({"Read"}, {"read"}, set(), False, ["read"]),
        ({"read"}, set(), {"Read"}, False, ["Read"]),
        ({"reports:read"}, {"reports"}, set(), False, ["reports"]),
        ({"reports"}, {"reports:read"}, set(), False, ["reports:read"]),
        ({"read", "admin", "extra"}, {"admin"}, {"read"}, True, []),
    ],
)
def test_named_cases(held: set[str], any_of: set[str], all_of: set[str], allowed: bool, missing: list[str]) -> None:
    """Scopes are compared exactly (case and all), with no hierarchy; the missing ones are listed sorted."""
    assert scopes_allow(frozenset(held), any_of=frozenset(any_of), all_of=frozenset(all_of)) is allowed
    assert missing_scopes(frozenset(held), any_of=frozenset(any_of), all_of=frozenset(all_of)) == missing


def test_plain_sets_work_too() -> None:
    """Both functions take any set type, mutable or frozen."""
    assert scopes_allow({"read"}, any_of={"read"}, all_of=set())
    assert missing_scopes({"read"}, any_of=set(), all_of={"write"}) == ["write"]


@given(scope_sets, scope_sets, scope_sets)
def test_scopes_allow_matches_the_reference(
    held: frozenset[str], any_of: frozenset[str], all_of: frozenset[str]
) -> None:
    """scopes_allow is true exactly when all_of is a subset of held and any_of is empty or meets held."""
    assert scopes_allow(held, any_of=any_of, all_of=all_of) is reference_allow(held, any_of, all_of)


@given(scope_sets, scope_sets, scope_sets)
def test_missing_scopes_is_sorted_and_empty_exactly_when_allowed(
    held: frozenset[str], any_of: frozenset[str], all_of: frozenset[str]
) -> None:
    """missing_scopes is sorted, without duplicates, none of it held, and empty exactly when the scopes allow."""
    missing = missing_scopes(held, any_of=any_of, all_of=all_of)
    assert missing == sorted(set(missing))
    assert not set(missing) & held
    assert set(missing) <= any_of | all_of
    assert (missing == []) is scopes_allow(held, any_of=any_of, all_of=all_of)


@given(scope_sets, scope_sets, scope_sets)
def test_adding_the_missing_scopes_allows(held: frozenset[str], any_of: frozenset[str], all_of: frozenset[str]) -> None:
    """A consumer given the missing scopes is allowed, and then misses none."""
    granted = held | set(missing_scopes(held, any_of=any_of, all_of=all_of))
    assert scopes_allow(granted, any_of=any_of, all_of=all_of)
    assert missing_scopes(granted, any_of=any_of, all_of=all_of) == []


@given(scope_sets, scope_sets, scope_sets)
def test_missing_scopes_names_all_missing_of_all_of(
    held: frozenset[str], any_of: frozenset[str], all_of: frozenset[str]
) -> None:
    """Every scope of all_of not held is missing, and any_of is missing whole when none of it is held."""
    missing = set(missing_scopes(held, any_of=any_of, all_of=all_of))
    assert all_of - held <= missing
    if any_of and not any_of & held:
        assert any_of <= missing
    else:
        assert missing == all_of - held


@given(scope_sets, scope_sets, scope_sets, scope_sets)
def test_holding_more_never_hurts(
    held: frozenset[str], more: frozenset[str], any_of: frozenset[str], all_of: frozenset[str]
) -> None:
    """Holding more scopes never turns an allowed consumer away (no scope denies)."""
    if scopes_allow(held, any_of=any_of, all_of=all_of):
        assert scopes_allow(held | more, any_of=any_of, all_of=all_of)


@given(scope_sets)
def test_no_requirement_allows_anyone(held: frozenset[str]) -> None:
    """Empty any_of and all_of allow any consumer, even one without scopes."""
    assert scopes_allow(held, any_of=frozenset(), all_of=frozenset())
    assert missing_scopes(held, any_of=frozenset(), all_of=frozenset()) == []
