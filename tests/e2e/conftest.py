"""Fixtures of the subprocess tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.processes import Child


@pytest.fixture
def spawn() -> Iterator[list[Child]]:
    """Started children (see `tests.support.processes.start`); each one still running is killed by its PID after
    the test."""
    children: list[Child] = []
    yield children
    for child in reversed(children):
        child.stop()
