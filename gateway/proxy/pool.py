"""One pool per upstream: keep-alive connections of the gateway's own (`gateway.http1.upstream`), a connect timeout,
a concurrency cap and queue.

Rules:
* An upstream never has more than `max_connections` requests in flight, never more than `max_queue` waiting, and
  nobody waits longer than `queue_timeout`.
* Idle connections are kept (at most `max_idle_connections`, most recently used first) and closed after
  `idle_timeout`, before a typical upstream's keep-alive timeout, so a request rarely races the upstream closing
  the connection it was given. A connection is only ever idle after an exchange that ended whole on both sides.
* A request without a body whose method is idempotent, sent on a reused connection that turns out to have been
  closed before any byte of a response came, is sent once more on a new connection (the upstream closed an idle
  connection just as it was reused; it never saw the request).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, DeferredList, DeferredSemaphore, fail
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from gateway.config import Upstream
from gateway.errors import UpstreamSaturated
from gateway.http1.fields import Fields
from gateway.http1.response import Cancellable, ResponseReceiver, UpstreamResponse
from gateway.http1.timers import Watchdog
from gateway.http1.upstream import UpstreamConnection
from gateway.tls.certificates import log_certificate
from gateway.tls.upstream import client_creator

__all__ = ["ConnectTimeout", "UpstreamPool"]

_log = Logger(namespace="gateway.upstream")  # not the module's name: log lines keep the namespace they had

_RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"})
"""Methods sent again on a new connection when a reused one was found closed (RFC 9110 section 9.2.2)."""


class ConnectTimeout(Exception):
    """The TCP connection to the upstream was not open within the route's connect timeout."""


@implementer(IStreamClientEndpoint)
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


class _Attempt:
    """One request through the pool, from its connection (idle, or opened for it) to its response head: the
    receiver the connection answers, which passes the answer on, or sends the request once more on a new
    connection when a reused one turns out to have been closed before any byte of a response came."""

    __slots__ = (
        "body",
        "connect_timeout",
        "headers",
        "method",
        "on_connected",
        "pool",
        "receiver",
        "retry",
        "sending",
        "target",
    )

    def __init__(
        self,
        pool: UpstreamPool,
        method: bytes,
        target: bytes,
        headers: Fields | Headers,
        body: IBodyProducer | None,
        receiver: ResponseReceiver,
        connect_timeout: float,
        on_connected: Callable[[str], None] | None,
    ) -> None:
        self.pool = pool
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.receiver: ResponseReceiver | None = receiver
        """None once it was told, or once the owner gave up."""
        self.connect_timeout = connect_timeout
        self.on_connected = on_connected
        self.retry = False
        self.sending: Cancellable | None = None
        """What is under way: the connect, then the request on its connection."""

    def connect(self) -> None:
        connecting = self.pool._connect(self.connect_timeout)
        self.sending = connecting
        connecting.addCallbacks(self.go, self._connect_failed)

    def go(self, connection: UpstreamConnection) -> None:
        self.sending = None
        if self.receiver is None:
            return  # given up while connecting (the connect could not be stopped in time)
        if self.on_connected is not None:
            self.on_connected(connection.address)
        self.sending = connection.send(self.method, self.target, self.headers, self.body, self)

    def cancel(self) -> None:
        self.receiver = None
        sending, self.sending = self.sending, None
        if sending is not None:
            sending.cancel()

    def _connect_failed(self, reason: Failure) -> None:
        self.sending = None
        if reason.check(CancelledError) and self.receiver is None:
            return
        self.response_failed(reason)

    # --- the connection's answer (ResponseReceiver) -------------------------------------------------------------

    def response_received(self, response: UpstreamResponse) -> None:
        self.sending = None
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            receiver.response_received(response)

    def response_failed(self, reason: Failure) -> None:
        self.sending = None
        if self.retry and self.receiver is not None and reason.check(ResponseNeverReceived):
            self.retry = False
            self.connect()
            return
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            receiver.response_failed(reason)


class _ConnectionFactory(Factory):
    noisy = False  # a "Starting factory" line per upstream connection is noise

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self._pool._returned, self._pool._lost)


class UpstreamPool:
    """Connections and concurrency for one upstream; every request to it goes through `acquire` and `request`."""

    def __init__(self, upstream: Upstream, reactor: Any) -> None:
        self.upstream = upstream
        self._reactor = reactor
        self._slots = DeferredSemaphore(upstream.max_connections)
        self._idle: list[UpstreamConnection] = []
        """Connections waiting for a request, the most recently used last."""
        self._idle_timers: dict[UpstreamConnection, Watchdog] = {}
        """Each kept connection's idle timer: armed while it is idle, disarmed (its pending call kept) while it
        serves, so a reused connection costs no timer per request."""
        self._closed = False
        self._closing: list[tuple[UpstreamConnection, Deferred[None]]] = []
        self._factory = _ConnectionFactory(self)
        self._endpoints: dict[float, IStreamClientEndpoint] = {}
        self._named = "the upstream" if upstream.inline else f"upstream {upstream.name}"
        """How its errors name it: an upstream a route gave as a URL by no address (see Upstream.inline); the
        request names it by its route (`UpstreamSaturated.naming`)."""
        self._tls = client_creator(upstream) if upstream.scheme == "https" else None
        if upstream.tls is not None and upstream.tls.client is not None:
            log_certificate(f"upstream {upstream.name}", upstream.tls.client, reactor)
        if upstream.tls is not None and not upstream.tls.verify:
            _log.warn(
                "Upstream {name} ({url}): TLS certificate verification is OFF (verify = false); anyone on the path "
                "can impersonate it",
                name=upstream.name,
                url=upstream.origin.decode("ascii"),
            )

    # --- what a scrape sees -------------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests holding a slot."""
        return self._slots.limit - self._slots.tokens

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._slots.waiting)

    @property
    def idle(self) -> int:
        """Idle keep-alive connections kept for reuse."""
        return len(self._idle)

    def idle_connections(self) -> tuple[UpstreamConnection, ...]:
        """The idle connections, the next to be reused last (for tests and tools)."""
        return tuple(self._idle)

    # --- the concurrency cap and the queue ----------------------------------------------------------------------

    def try_acquire(self) -> bool:
        """Take a free slot at once if there is one: the common case, without a Deferred.

        A free token means nobody is queued (DeferredSemaphore hands a released token to a waiter first), so
        this never jumps the queue. The caller must `release` the slot, exactly once.
        """
        if self._slots.tokens:
            self._slots.tokens -= 1
            return True
        return False

    def acquire(self) -> Deferred[Any]:
        """A slot for one request; fails with `UpstreamSaturated` when the queue is full or the wait too long.

        The caller must `release` a slot it got, exactly once; cancelling the Deferred leaves the queue.
        """
        up = self.upstream
        if self._slots.tokens == 0 and len(self._slots.waiting) >= up.max_queue:
            return fail(
                UpstreamSaturated(f"{{upstream}} has {up.max_queue} requests queued already", upstream=self._named)
            )
        waiting = self._slots.acquire()
        if waiting.called:
            return waiting

        def timed_out(failure: Failure) -> Failure:
            if failure.check(DeferredTimeout):
                raise UpstreamSaturated(
                    f"no connection to {{upstream}} came free within {up.queue_timeout:g} s", upstream=self._named
                )
            return failure

        waiting.addTimeout(up.queue_timeout, self._reactor)
        return waiting.addErrback(timed_out)

    def release(self) -> None:
        self._slots.release()

    # --- requests -----------------------------------------------------------------------------------------------

    def send(
        self,
        method: bytes,
        target: bytes,
        headers: Fields | Headers,
        body: IBodyProducer | None,
        receiver: ResponseReceiver,
        *,
        connect_timeout: float,
        on_connected: Callable[[str], None] | None = None,
    ) -> Cancellable:
        """Send one request over an idle connection, or a new one opened within `connect_timeout`; `receiver` is
        told of the response once its head is read, or of why there is none. `target` goes on the request line
        byte for byte; `on_connected` is told the address of the server the request goes to, once it has a
        connection. What it returns gives the request up wherever it is (connecting, sending, waiting for the
        head)."""
        attempt = _Attempt(self, method, target, headers, body, receiver, connect_timeout, on_connected)
        connection = self._take_idle()
        if connection is not None:
            # A reused connection the upstream closed just as it was taken: a request without a body whose method
            # is idempotent is sent once more, on a new connection.
            attempt.retry = body is None and method in _RETRYABLE
            attempt.go(connection)
        else:
            attempt.connect()
        return attempt

    def _connect(self, connect_timeout: float) -> Deferred[UpstreamConnection]:
        # Typed as any IProtocol: it is what `self._factory` builds.
        return self._endpoint(connect_timeout).connect(self._factory)  # type: ignore[return-value]

    def _endpoint(self, timeout: float) -> IStreamClientEndpoint:
        endpoint = self._endpoints.get(timeout)
        if endpoint is None:
            up = self.upstream
            inner: IStreamClientEndpoint
            backstop = timeout + 1  # the reactor's own per-attempt timeout, a little later than ours
            if isIPAddress(up.host):
                inner = TCP4ClientEndpoint(self._reactor, up.host, up.port, timeout=backstop)
            elif isIPv6Address(up.host):
                inner = TCP6ClientEndpoint(self._reactor, up.host, up.port, timeout=backstop)
            else:
                inner = HostnameEndpoint(self._reactor, up.host, up.port, timeout=backstop)
            endpoint = _TimedEndpoint(inner, self._reactor, timeout)
            if self._tls is not None:
                # The connect timeout bounds the TCP connect; the handshake falls under the response-head one.
                endpoint = wrapClientTLS(self._tls, endpoint)
            self._endpoints[timeout] = endpoint
        return endpoint

    # --- idle connections ---------------------------------------------------------------------------------------

    def _take_idle(self) -> UpstreamConnection | None:
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
