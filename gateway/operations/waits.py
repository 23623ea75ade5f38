"""Bounded waits: every wait of the gateway's own has a timeout, and this is the one way it is written.

Rule: the waited-for Deferred is left alone (never cancelled), so whoever else holds it still gets its result,
and whatever it fires with later still lands where it should.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

__all__ = ["within"]


def within(clock: IReactorTime, waited: Deferred[Any], timeout: float) -> Deferred[bool]:
    """True once `waited` fires, False if `timeout` seconds pass first."""
    result: Deferred[bool] = Deferred()
    timer = clock.callLater(timeout, result.callback, False)

    def fired(value: object) -> object:
        if timer.active():
            timer.cancel()
            result.callback(True)
        return value

    waited.addBoth(fired)
    return result
