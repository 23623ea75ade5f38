"""Active health checks of an upstream's servers: an HTTP request to each on an interval, and the verdict.

Rules:
* A server is marked unhealthy after `unhealthy_threshold` failed checks in a row (a status not in
  `statuses`, no answer within `timeout`, no connection), and healthy again after `healthy_threshold` passed
  checks in a row; servers start healthy. Each change is told once (`on_change`), for the log.
* Each server is checked `interval` apart, each wait drawn within 10% of it (jitter: the checks of many gateways
  and servers do not fall together); the next check is scheduled only once the last one ended, so checks of a
  server that is down never pile up.
* A check is its own connection, closed after its answer (it never goes to the pool, and the body is not read);
  it has the upstream's TLS settings.
* `stop` cancels every timer and the checks under way.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from gateway.config.model import HealthCheck
from gateway.http1.response import Cancellable, UpstreamResponse
from gateway.http1.upstream import UpstreamConnection

if TYPE_CHECKING:
    from gateway.upstreams.servers import ServerPool

__all__ = ["HealthChecker", "Verdict"]

JITTER = 0.1
"""Each wait between two checks of a server is within this share of the interval."""


@dataclass(slots=True)
class Verdict:
    """The health of one server, from its checks in a row (pure)."""

    healthy: bool = True
    passed_in_row: int = 0
    failed_in_row: int = 0
    passed: int = 0
    failed: int = 0

    def record(self, ok: bool, settings: HealthCheck) -> bool:
        """A check's result; whether the server's health changed."""
        if ok:
            self.passed += 1
            self.passed_in_row += 1
            self.failed_in_row = 0
            if not self.healthy and self.passed_in_row >= settings.healthy_threshold:
                self.healthy = True
                return True
        else:
            self.failed += 1
            self.failed_in_row += 1
            self.passed_in_row = 0
            if self.healthy and self.failed_in_row >= settings.unhealthy_threshold:
                self.healthy = False
                return True
        return False


class _Drop(Protocol):
    def connectionMade(self) -> None:
        IPushProducer(self.transport).stopProducing()


class _Probe:
    """One check of one server: a connection, the request, the status; `done` fires with whether it passed."""

    def __init__(self, server: ServerPool, settings: HealthCheck, host: bytes, clock: IReactorTime) -> None:
        self.done: Deferred[bool] = Deferred()
        self._settings = settings
        self._host = host
        self._connection: UpstreamConnection | None = None
        self._sending: Cancellable | None = None
        self._timer = clock.callLater(settings.timeout, self._timed_out)
        self._connecting: Deferred[UpstreamConnection] | None = server.connect(settings.timeout)
        self._connecting.addCallbacks(self._connected, lambda _: self._end(False))

    def _connected(self, connection: UpstreamConnection) -> None:
        self._connecting = None
        self._connection = connection
        if self.done.called:
            connection.transport.abortConnection()
            return
        headers = Headers({b"Host": [self._host], b"Connection": [b"close"], b"User-Agent": [b"gateway-health"]})
        self._sending = connection.send(self._settings.method.encode("ascii"), self._settings.path, headers, None, self)

    def response_received(self, response: UpstreamResponse) -> None:
        response.deliverBody(_Drop())  # the status is the answer; the connection closes unread
        self._end(response.code in self._settings.statuses)

    def response_failed(self, reason: Failure) -> None:
        self._end(False)

    def _timed_out(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        elif self._sending is not None:
            self._sending.cancel()
        self._end(False)

    def _end(self, ok: bool) -> None:
        if self._timer.active():
            self._timer.cancel()
        self._sending = None
        if not self.done.called:
            self.done.callback(ok)

    def stop(self) -> None:
        if self._timer.active():
            self._timer.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        if self._sending is not None:
            self._sending.cancel()


class HealthChecker:
    """Checks `servers` on `clock` while started; `on_change(server, healthy)` is told each change of health."""

    def __init__(
        self,
        settings: HealthCheck,
        servers: Sequence[ServerPool],
        host: bytes,
        clock: IReactorTime,
        *,
        rng: random.Random | None = None,
        on_change: Callable[[ServerPool, bool], None] | None = None,
    ) -> None:
        self.settings = settings
        self._servers = list(servers)
        self._host = host
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._on_change = on_change
        self._timers: dict[ServerPool, IDelayedCall] = {}
        self._probes: dict[ServerPool, _Probe] = {}
        self.running = False

    def start(self) -> None:
        """The first check of each server within one interval (spread, so they do not all go at once)."""
        self.running = True
        for server in self._servers:
            self._timers[server] = self._clock.callLater(
                self._rng.uniform(0, self.settings.interval), self._check, server
            )

    def _wait(self) -> float:
        interval = self.settings.interval
        return self._rng.uniform(interval * (1 - JITTER), interval * (1 + JITTER))

    def _check(self, server: ServerPool) -> None:
        self._timers.pop(server, None)
        if not self.running:
            return
        probe = self._probes[server] = _Probe(server, self.settings, self._host, self._clock)
        probe.done.addCallback(self._checked, server)

    def _checked(self, ok: bool, server: ServerPool) -> None:
        self._probes.pop(server, None)
        if not self.running or server not in self._servers:
            return
        if server.verdict.record(ok, self.settings) and self._on_change is not None:
            self._on_change(server, server.verdict.healthy)
        self._timers[server] = self._clock.callLater(self._wait(), self._check, server)

    def set_servers(self, servers: Sequence[ServerPool]) -> None:
        """The upstream's servers changed (its name resolved anew): the gone ones are no longer checked, the new
        ones are from now on (their first check within an interval)."""
        for server in [s for s in self._servers if s not in servers]:
            timer = self._timers.pop(server, None)
            if timer is not None and timer.active():
                timer.cancel()
            probe = self._probes.pop(server, None)
            if probe is not None:
                probe.stop()
        added = [s for s in servers if s not in self._servers]
        self._servers = list(servers)
        if self.running:
            for server in added:
                self._timers[server] = self._clock.callLater(
                    self._rng.uniform(0, self.settings.interval), self._check, server
                )

    def stop(self) -> None:
        self.running = False
        timers, self._timers = self._timers, {}
        for timer in timers.values():
            if timer.active():
                timer.cancel()
        probes, self._probes = self._probes, {}
        for probe in probes.values():
            probe.stop()
