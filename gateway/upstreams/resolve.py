"""Re-resolving an upstream given by a host name: its addresses (A and AAAA records) every `interval`, each one
server of the upstream.

Rules:
* Until the first answer the name itself is the one server (resolved at each connect, as an upstream without
  `resolve` is).
* An answer with no address (a failure, NXDOMAIN) changes nothing: the servers stay as they were, and it is
  logged; the same addresses in another order change nothing either; any other answer goes to `on_change`.
* One resolution at a time: the next is scheduled `interval` after the last answer, so a slow resolver never
  piles up lookups. `stop` cancels the timer; an answer that comes after it is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IHostResolution, IResolutionReceiver
from twisted.logger import Logger
from zope.interface import implementer

__all__ = ["Resolver"]

_log = Logger(namespace="gateway.upstream")


@implementer(IResolutionReceiver)
class _Answer:
    """The addresses of one resolution, handed to `done` once it is complete."""

    def __init__(self, done: Callable[[list[str]], None]) -> None:
        self._done = done
        self.addresses: list[str] = []

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        self._done(self.addresses)


class Resolver:
    """Resolves `name` (for `port`) through `reactor.nameResolver` every `interval` while started."""

    def __init__(
        self,
        upstream: str,
        name: str,
        port: int,
        interval: float,
        reactor: Any,
        on_change: Callable[[tuple[str, ...]], None],
    ) -> None:
        self._upstream = upstream
        self._name = name
        self._port = port
        self._interval = interval
        self._reactor = reactor
        self._on_change = on_change
        self.addresses: tuple[str, ...] = ()
        """The addresses of the last answer that had any."""
        self.running = False
        self._timer: IDelayedCall | None = None
        self._empty_logged = False

    def start(self) -> None:
        self.running = True
        self._resolve()

    def _resolve(self) -> None:
        self._timer = None
        if self.running:
            self._reactor.nameResolver.resolveHostName(_Answer(self._resolved), self._name, portNumber=self._port)

    def _resolved(self, addresses: list[str]) -> None:
        if not self.running:
            return
        found = tuple(sorted(set(addresses)))
        if not found:
            if not self._empty_logged:
                _log.warn(
                    "Upstream {upstream}: {name} resolved to no address; its servers stay as they were",
                    upstream=self._upstream,
                    name=self._name,
                )
                self._empty_logged = True
        else:
            self._empty_logged = False
            if found != self.addresses:
                self.addresses = found
                self._on_change(found)
        self._timer = self._reactor.callLater(self._interval, self._resolve)

    def stop(self) -> None:
        self.running = False
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
