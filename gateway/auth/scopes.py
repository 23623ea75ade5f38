"""Authorisation by scopes: does a consumer's set of scopes satisfy a route's requirements?

Rule: a route may require every scope of `all_of` and at least one of `any_of`; an empty requirement is met by
anyone authenticated. Scopes are compared exactly (case-sensitive, as OAuth defines them); there are no
wildcards or hierarchies, so what a scope grants is what its name says. Pure.
"""

from __future__ import annotations

from collections.abc import Set

__all__ = ["missing_scopes", "scopes_allow"]


def scopes_allow(held: Set[str], *, any_of: Set[str], all_of: Set[str]) -> bool:
    """Whether `held` has every scope of `all_of` and, if `any_of` is not empty, at least one of it."""
    if all_of and not all_of <= held:
        return False
    return not any_of or not any_of.isdisjoint(held)


def missing_scopes(held: Set[str], *, any_of: Set[str], all_of: Set[str]) -> list[str]:
    """The scopes a token would need (for RFC 6750's `scope` parameter): the missing ones of `all_of`, and
    `any_of` when none of it is held; sorted, so the answer is the same every time."""
    needed = set(all_of - held)
    if any_of and any_of.isdisjoint(held):
        needed |= any_of
    return sorted(needed)
