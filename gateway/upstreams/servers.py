"""`ServerPool`: one server of an upstream and its keep-alive connections of the gateway's own
(`gateway.http1.upstream`), with the connect timeout.

Rules:
* Idle connections are kept (at most the upstream's `max_idle_connections` per server, most recently used first)
  and closed after its `idle_timeout`, before a typical upstream's keep-alive timeout, so a request rarely races
  the server closing the connection it was given. A connection is only ever idle after an exchange that ended
  whole on both sides.
* Every server of an upstream shares its scheme, TLS settings (one client TLS context) and timeouts.
* `active` counts the requests given to the server and not yet ended (the balancers and the per-server cap read
  it); whoever gives one a request ends it, exactly once.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import classImplements

from gateway.config import Upstream, UpstreamServer
from gateway.http1.timers import Watchdog
from gateway.http1.upstream import UpstreamConnection
from gateway.upstreams.ejection import Standing
from gateway.upstreams.health import Verdict

__all__ = ["ConnectTimeout", "ServerPool"]


class ConnectTimeout(Exception):
    """The TCP connection to the upstream was not open within the route's connect timeout."""


class _TimedEndpoint:
    """Connects through `inner` and gives up after `timeout` seconds on `clock`.

    The reactor's own connect timeout does not run on a test `Clock`, and its error does not say which wait
    it was; this one does both.
    """

    def __init__(self, inner: IStreamClientEndpoint, clock: Any, timeout: float) -> None:
        self._inner = inner
        self._clock = clock
        self._timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        connecting = self._inner.connect(protocolFactory)
        timer = self._clock.callLater(self._timeout, connecting.cancel)

        def settled(result: IProtocol | Failure) -> IProtocol | Failure:
            if timer.active():
                timer.cancel()
                return result
            if isinstance(result, Failure):
                raise ConnectTimeout(f"no connection within {self._timeout:g} s")
            return result

        return connecting.addBoth(settled)


classImplements(_TimedEndpoint, IStreamClientEndpoint)


class _ConnectionFactory(Factory):
    noisy = False  # a "Starting factory" line per upstream connection is noise

    def __init__(self, pool: ServerPool) -> None:
        self._pool = pool

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self._pool._returned, self._pool._lost)


class ServerPool:
    """One server of an upstream: its idle connections, how new ones are opened, and its requests in flight."""

    def __init__(
        self,
        upstream: Upstream,
        server: UpstreamServer,
        reactor: Any,
        tls: IOpenSSLClientConnectionCreator | None,
    ) -> None:
        self.upstream = upstream
        """Its upstream's settings (idle connections, their timeout), replaced when a reload keeps the server."""
        self.server = server
        self.address = server.address
        self.weight = server.weight
        self.standing = Standing()
        """Its record of failures and ejections, kept over a reload."""
        self.verdict = Verdict()
        """Its health by the active checks (healthy without them), kept over a reload."""
        self.requests = 0
        """Tries sent to it (counters for the metrics, kept over a reload)."""
        self.failures = 0
        """Tries that failed (a connect failure, a reset, a status counted by ejection)."""
        self.connecting = 0
        """Requests waiting for a new connection to this server."""
        self._busy: set[UpstreamConnection] = set()
        """Connections serving a request."""
        self._reactor = reactor
        self._tls = tls
        self._idle: list[UpstreamConnection] = []
        """Connections waiting for a request, the most recently used last."""
        self._idle_timers: dict[UpstreamConnection, Watchdog] = {}
        """Each kept connection's idle timer: armed while it is idle, disarmed (its pending call kept) while it
        serves, so a reused connection costs no timer per request."""
        self._closed = False
        self._closing: list[tuple[UpstreamConnection, Deferred[None]]] = []
        self._factory = _ConnectionFactory(self)
        self._endpoints: dict[float, IStreamClientEndpoint] = {}

    @property
    def active(self) -> int:
        """Requests given to this server and not ended: connecting, or on a connection until their exchange ends
        (whole, or with the connection)."""
        return len(self._busy) + self.connecting

    def serving(self, connection: UpstreamConnection) -> None:
        """`connection` was given a request: busy until its exchange ends."""
        self._busy.add(connection)

    @property
    def state(self) -> str:
        """ "up", "ejected" (passive ejection) or "unhealthy" (failing its active health checks)."""
        if not self.verdict.healthy:
            return "unhealthy"
        return "ejected" if self.standing.until is not None else "up"

    def view(self) -> dict[str, object]:
        """What the admin listener shows of it."""
        return {
            "address": self.address,
            "weight": self.weight,
            "state": self.state,
            "ejected_until": self.standing.until,
            "active": self.active,
            "idle": self.idle,
            "requests": self.requests,
            "failures": self.failures,
            "consecutive_failures": self.standing.failures,
            "ejections": self.standing.ejections,
            "checks_passed": self.verdict.passed,
            "checks_failed": self.verdict.failed,
        }

    @property
    def idle(self) -> int:
        """Idle keep-alive connections kept for reuse."""
        return len(self._idle)

    def idle_connections(self) -> tuple[UpstreamConnection, ...]:
        """The idle connections, the next to be reused last (for tests and tools)."""
        return tuple(self._idle)

    def connect(self, connect_timeout: float) -> Deferred[UpstreamConnection]:
        """A new connection to the server, open within `connect_timeout` (`ConnectTimeout` otherwise)."""
        # Typed as any IProtocol: it is what `self._factory` builds.
        return self._endpoint(connect_timeout).connect(self._factory)  # type: ignore[return-value]

    def _endpoint(self, timeout: float) -> IStreamClientEndpoint:
        endpoint = self._endpoints.get(timeout)
        if endpoint is None:
            host, port = self.server.host, self.server.port
            inner: IStreamClientEndpoint
            backstop = timeout + 1  # the reactor's own per-attempt timeout, a little later than ours
            if isIPAddress(host):
                inner = TCP4ClientEndpoint(self._reactor, host, port, timeout=backstop)
            elif isIPv6Address(host):
                inner = TCP6ClientEndpoint(self._reactor, host, port, timeout=backstop)
            else:
                inner = HostnameEndpoint(self._reactor, host, port, timeout=backstop)
            endpoint = _TimedEndpoint(inner, self._reactor, timeout)
            if self._tls is not None:
                # The connect timeout bounds the TCP connect; the handshake falls under the response-head one.
                endpoint = wrapClientTLS(self._tls, endpoint)
            self._endpoints[timeout] = endpoint
        return endpoint

    # --- idle connections ---------------------------------------------------------------------------------------

    def take_idle(self) -> UpstreamConnection | None:
        """An idle connection that can take a request, the most recently used; None when there is none."""
        idle = self._idle
        while idle:
            connection = idle.pop()
            timer = self._idle_timers.get(connection)
            if timer is not None:
                timer.disarm()
            if connection.usable:
                return connection
        return None

    def _returned(self, connection: UpstreamConnection) -> None:
        """An exchange ended whole on `connection`: kept for the next request, or closed."""
        self._busy.discard(connection)
        if self._closed or len(self._idle) >= self.upstream.max_idle_connections:
            connection.transport.loseConnection()
            return
        self._idle.append(connection)
        timer = self._idle_timers.get(connection)
        if timer is None:
            timer = self._idle_timers[connection] = Watchdog(
                self._reactor, self.upstream.idle_timeout, partial(self._expired, connection)
            )
        timer.arm()

    def _expired(self, connection: UpstreamConnection) -> None:
        self._idle_timers.pop(connection, None)
        if connection in self._idle:
            self._idle.remove(connection)
            connection.transport.loseConnection()

    def _lost(self, connection: UpstreamConnection) -> None:
        self._busy.discard(connection)
        timer = self._idle_timers.pop(connection, None)
        if timer is not None:
            timer.cancel()
        if connection in self._idle:
            self._idle.remove(connection)
        for closing in [entry for entry in self._closing if entry[0] is connection]:
            self._closing.remove(closing)
            closing[1].callback(None)

    def close(self) -> Deferred[None]:
        """Close the idle connections (in-flight ones close when their exchange ends); fires once they are gone."""
        self._closed = True
        waits: list[Deferred[None]] = []
        while self._idle:
            connection = self._idle.pop()
            timer = self._idle_timers.pop(connection, None)
            if timer is not None:
                timer.cancel()
            gone: Deferred[None] = Deferred()
            self._closing.append((connection, gone))
            waits.append(gone)
            connection.transport.loseConnection()
        return DeferredList(waits).addCallback(lambda _: None)
