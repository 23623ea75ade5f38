"""Log events captured during a test, for fixtures that check what was (or was not) logged."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from twisted.logger import LogEvent, globalLogPublisher


@contextmanager
def captured(keep: Callable[[LogEvent], bool] = lambda _: True) -> Iterator[list[LogEvent]]:
    """The events published while the block runs for which `keep` is true, in order."""
    seen: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if keep(event):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observe)


def in_namespace(namespace: str) -> Callable[[LogEvent], bool]:
    """A `keep` for the events of one logger namespace (a module's `Logger()`)."""
    return lambda event: event.get("log_namespace") == namespace
