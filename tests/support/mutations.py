"""Changes to a config dict, for table-driven tests of config errors: each case says what to change."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

Mutation = Callable[[dict[str, Any]], None]


def set_at(path: str, value: object) -> Mutation:
    """A mutation that sets a copy of `value` at a dotted path (integer parts index arrays; tables are created)."""

    def mutate(data: dict[str, Any]) -> None:
        parts = path.split(".")
        node: Any = data
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        last = parts[-1]
        node[int(last) if last.isdigit() else last] = copy.deepcopy(value)

    return mutate


def delete_at(path: str) -> Mutation:
    """A mutation that removes the key (or array item) at a dotted path."""

    def mutate(data: dict[str, Any]) -> None:
        parts = path.split(".")
        node: Any = data
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node[part]
        del node[int(parts[-1]) if parts[-1].isdigit() else parts[-1]]

    return mutate
