"""Fixtures of the subprocess tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.logger import LogEvent, formatEvent

from tests.support.logs import captured
from tests.support.processes import Child


@pytest.fixture
def spawn() -> Iterator[list[Child]]:
    """Started children (see `tests.support.processes.start`); each one still running is killed by its PID after
    the test."""
    children: list[Child] = []
    yield children
    for child in reversed(children):
        child.stop()


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    """Every log event emitted during the test."""
    with captured() as seen:
        yield seen


def everything_logged(events: list[LogEvent]) -> str:
    """Each event's text and every field's value, as one string to search for secrets."""
    return "\n".join(formatEvent(e) + repr(sorted((k, repr(v)) for k, v in e.items())) for e in events)
