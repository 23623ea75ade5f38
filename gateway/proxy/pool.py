"""One pool per upstream: its servers (`gateway.upstreams.servers`), each with its keep-alive connections, the
upstream's concurrency cap and queue, and each request's tries: the server chosen for it, and another one when
it may be retried.

Rules:
* An upstream never has more than `max_connections` requests in flight, never more than `max_queue` waiting, and
  nobody waits longer than `queue_timeout`.
* A request goes to a server its upstream's balancer chooses among those not ejected and under their cap
  (`max_requests_per_server`); with none, the answer is a fast 503 (`UpstreamUnavailable`, with Retry-After).
* Each request's tries (`gateway.upstreams.attempts`): a closed keep-alive connection, and with several servers
  a failed try on another server, within the route's retries and this upstream's retry budget.
* An upstream of one server goes the way it always went: no choice, no retry budget, no ejection.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, fail
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer

from gateway.config import Retries, Upstream, UpstreamServer
from gateway.errors import UpstreamSaturated, UpstreamUnavailable
from gateway.http1.fields import Fields
from gateway.http1.response import Cancellable, ResponseReceiver
from gateway.http1.upstream import UpstreamConnection
from gateway.tls.certificates import log_certificate
from gateway.tls.upstream import client_creator
from gateway.upstreams.attempts import Attempt
from gateway.upstreams.balancers import Balancer, HashRing, LeastRequests, SmoothRoundRobin
from gateway.upstreams.budget import Budget
from gateway.upstreams.ejection import Ejector
from gateway.upstreams.health import HealthChecker
from gateway.upstreams.resolve import Resolver
from gateway.upstreams.servers import ConnectTimeout, ServerPool

__all__ = ["ConnectTimeout", "UpstreamPool"]

_log = Logger(namespace="gateway.upstream")  # not the module's name: log lines keep the namespace they had


class UpstreamPool:
    """Servers, connections and concurrency for one upstream; every request to it goes through `acquire` and
    `send`."""

    def __init__(
        self,
        upstream: Upstream,
        reactor: Any,
        *,
        rng: random.Random | None = None,
        previous: UpstreamPool | None = None,
    ) -> None:
        self.upstream = upstream
        self.clock = reactor
        self.rng = rng if rng is not None else random.Random()
        self._slots = DeferredSemaphore(upstream.max_connections)
        self.request_host = _request_host(upstream)
        """The Host header of requests to it when its routes send the upstream's (host_header = "upstream")."""
        self._named = "the upstream" if upstream.inline else f"upstream {upstream.name}"
        """How its errors name it: an upstream a route gave as a URL by no address (see Upstream.inline); the
        request names it by its route (`UpstreamSaturated.naming`)."""
        tls = client_creator(upstream) if upstream.scheme == "https" else None
        if upstream.tls is not None and upstream.tls.client is not None:
            log_certificate(f"upstream {upstream.name}", upstream.tls.client, reactor)
        if upstream.tls is not None and not upstream.tls.verify:
            _log.warn(
                "Upstream {name} ({url}): TLS certificate verification is OFF (verify = false); anyone on the path "
                "can impersonate it",
                name=upstream.name,
                url=upstream.origin.decode("ascii"),
            )
        kept = previous.hand_on(upstream) if previous is not None else {}
        self.servers = [
            kept.get(server.address) or ServerPool(upstream, server, reactor, tls) for server in upstream.members
        ]
        self._handed_on: set[ServerPool] = set()
        """Servers a reload's pool kept: this pool no longer closes them."""
        if upstream.resolve and kept:
            self.servers = list(kept.values())  # the addresses the name last resolved to, until it is again
        self._tls = tls
        self.retries = 0
        """Retries sent to this upstream (a counter for the metrics)."""
        self.index: dict[ServerPool, int] = {}
        self.single: ServerPool | None = None
        """The one server of an upstream that has one (and no health checks, no name re-resolved): no choice to
        make, nothing retried or ejected."""
        self.hashing = False
        self.ejector: Ejector | None = None
        self.budget: Budget | None = None
        self._balancer: Balancer | None = None
        self._everyone: list[bool] = []
        self._everyone_idle: list[int] = []
        self._by_load = False
        """Whether the balancer weighs the servers' requests in flight (least_requests): only then are they
        counted for a choice."""
        self._place(self.servers)
        self.resolver: Resolver | None = None
        if upstream.resolve:
            self.resolver = Resolver(
                upstream.name, upstream.host, upstream.port, upstream.resolve, reactor, self._resolved
            )
        self.checker: HealthChecker | None = None
        if upstream.health_check is not None:
            host = upstream.health_check.host or _host_of(upstream)
            self.checker = HealthChecker(
                upstream.health_check, self.servers, host.encode("ascii"), reactor, on_change=self._health_changed
            )

    def _place(self, servers: list[ServerPool]) -> None:
        """Take `servers` as the upstream's: the choice of a server, ejection and the budget over them."""
        up = self.upstream
        self.servers = servers
        self.index = {server: i for i, server in enumerate(servers)}
        alone = len(servers) == 1 and up.health_check is None and not up.resolve
        self.single = servers[0] if alone else None
        self.hashing = up.balance == "hash" and not alone
        if alone:
            self._balancer = self.ejector = None
            return
        weights = [server.weight for server in servers]
        self._everyone = [True] * len(servers)
        self._everyone_idle = [0] * len(servers)
        self._by_load = up.balance == "least_requests"
        if up.balance == "least_requests":
            self._balancer = LeastRequests(weights, self.rng)
        elif up.balance == "hash":
            self._balancer = HashRing([server.address for server in servers], weights)
        else:
            self._balancer = SmoothRoundRobin(weights)
        standings = [server.standing for server in servers]
        self.ejector = Ejector(up.ejection, standings, self.clock, self._ejection_changed)
        if self.budget is None:
            self.budget = Budget(up.retry_budget, self.clock)

    def _resolved(self, addresses: tuple[str, ...]) -> None:
        """The upstream's name resolved to `addresses`: one server each, those it had kept (their connections
        and standing); the others' idle connections close."""
        up = self.upstream
        current = {server.address: server for server in self.servers}
        members = [UpstreamServer(host=address, port=up.port) for address in addresses]
        servers = [current.get(m.address) or ServerPool(up, m, self.clock, self._tls) for m in members]
        for server in self.servers:
            if server not in servers and server not in self._handed_on:
                server.close()
        self._place(servers)
        if self.checker is not None:
            self.checker.set_servers(servers)
        _log.info(
            "Upstream {upstream}: {name} resolved to {addresses}",
            upstream=up.name,
            name=up.host,
            addresses=", ".join(server.address for server in servers),
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
        """Idle keep-alive connections kept for reuse, to every server."""
        return sum(server.idle for server in self.servers)

    def idle_connections(self) -> tuple[UpstreamConnection, ...]:
        """The idle connections of every server, each server's next to be reused last (for tests and tools)."""
        return tuple(connection for server in self.servers for connection in server.idle_connections())

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

        waiting.addTimeout(up.queue_timeout, self.clock)
        return waiting.addErrback(timed_out)

    def release(self) -> None:
        self._slots.release()

    # --- servers ------------------------------------------------------------------------------------------------

    def choose(self, key: bytes | None, avoid: list[ServerPool] | None = None) -> ServerPool | None:
        """The server for a request with `key` among those that can take one now (but those of `avoid`)."""
        assert self._balancer is not None and self.ejector is not None
        ejector = self.ejector
        ejector.check()
        cap = self.upstream.max_requests_per_server
        servers = self.servers
        if avoid is None and not cap and not ejector.ejected and self.checker is None:
            usable = self._everyone  # the common case: every server may be chosen, nothing to look at
        else:
            usable = [
                server.verdict.healthy
                and not ejector.is_ejected(i)
                and not (cap and server.active >= cap)
                and not (avoid is not None and server in avoid)
                for i, server in enumerate(servers)
            ]
        active = [server.active for server in servers] if self._by_load else self._everyone_idle
        chosen = self._balancer.pick(usable, active, key)
        return None if chosen is None else servers[chosen]

    def failed(self, server: ServerPool) -> None:
        assert self.ejector is not None
        server.failures += 1
        self.ejector.failed(self.index[server])

    def view(self) -> dict[str, object]:
        """What the admin listener shows of this upstream: its balancing, retries and each server's state."""
        return {
            "balance": "single" if self.single is not None else self.upstream.balance,
            "in_flight": self.in_flight,
            "queued": self.queued,
            "retries": self.retries,
            "ejected": self.ejector.ejected if self.ejector is not None else 0,
            "servers": [server.view() for server in self.servers],
        }

    def budget_allows(self) -> bool:
        return self.budget is not None and self.budget.try_retry()

    def unavailable(self) -> UpstreamUnavailable:
        """The fast 503 of an upstream none of whose servers can take a request now."""
        retry_after = self.ejector.retry_after() if self.ejector is not None else 0.0
        if self.checker is not None and not any(server.verdict.healthy for server in self.servers):
            retry_after = max(retry_after, self.checker.settings.interval)
        return UpstreamUnavailable(
            "no server of {upstream} can take a request now", upstream=self._named, retry_after=retry_after or 1.0
        )

    def _health_changed(self, server: ServerPool, healthy: bool) -> None:
        if healthy:
            _log.info(
                "Upstream {upstream}: server {server} passes its health checks again",
                upstream=self.upstream.name,
                server=server.address,
            )
        else:
            _log.warn(
                "Upstream {upstream}: server {server} fails its health checks; no requests until it passes",
                upstream=self.upstream.name,
                server=server.address,
            )

    def start(self) -> None:
        """Start the active health checks and the name's re-resolution, if the upstream has them (once: a pool a
        reload kept runs on)."""
        if self.checker is not None and not self.checker.running:
            self.checker.start()
        if self.resolver is not None and not self.resolver.running:
            self.resolver.start()

    def _ejection_changed(self, index: int, ejected: bool, seconds: float) -> None:
        server = self.servers[index]
        if ejected:
            _log.warn(
                "Upstream {upstream}: server {server} ejected for {seconds:g} s after failures in a row",
                upstream=self.upstream.name,
                server=server.address,
                seconds=seconds,
            )
        else:
            _log.info(
                "Upstream {upstream}: server {server} back in service",
                upstream=self.upstream.name,
                server=server.address,
            )

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
        on_connected: Callable[[str, int], None] | None = None,
        retries: Retries | None = None,
        key: bytes | None = None,
    ) -> Cancellable:
        """Send one request over an idle connection, or a new one opened within `connect_timeout`; `receiver` is
        told of the response once its head is read, or of why there is none. `target` goes on the request line
        byte for byte; `on_connected` is told the address of the server each try goes to, once it has a
        connection, and how many tries it is; `retries` is the route's say on trying again, `key` what the
        request hashes to. What it returns gives the request up wherever it is (connecting, waiting to retry,
        sending, waiting for the head)."""
        attempt = Attempt(self, method, target, headers, body, receiver, connect_timeout, on_connected, retries, key)
        server = self.single
        if server is None:
            server = self.choose(key)
            if server is None:
                attempt.receiver = None
                receiver.response_failed(Failure(self.unavailable()))
                return attempt
            assert self.budget is not None
            self.budget.requested()
        attempt.start(server)
        return attempt

    def hand_on(self, upstream: Upstream) -> dict[str, ServerPool]:
        """The servers of this pool that the pool of `upstream` (a reload's) keeps, by address, with their
        connections and standing: those it still lists, when their connections are still good for it (the same
        scheme and TLS settings). This pool no longer closes them."""
        mine = self.upstream
        if (upstream.scheme, upstream.tls, upstream.base_path) != (mine.scheme, mine.tls, mine.base_path):
            return {}
        wanted = {server.address: server for server in upstream.members}
        if upstream.resolve and (upstream.host, upstream.port, upstream.resolve) == (
            mine.host,
            mine.port,
            mine.resolve,
        ):
            wanted = {server.address: server.server for server in self.servers}  # what the name resolved to
        kept = {}
        for server in self.servers:
            if server.address in wanted:
                server.upstream = upstream
                server.weight = wanted[server.address].weight
                kept[server.address] = server
                self._handed_on.add(server)
        return kept

    def close(self) -> Deferred[None]:
        """Close the idle connections of the servers no reload kept (in-flight ones close when their exchange
        ends); fires once they are gone."""
        if self.checker is not None:
            self.checker.stop()
        if self.resolver is not None:
            self.resolver.stop()
        closing = [server.close() for server in self.servers if server not in self._handed_on]
        return DeferredList(closing).addCallback(lambda _: None)


def _request_host(upstream: Upstream) -> bytes:
    """The upstream's host, with its port unless it is 80."""
    host = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
    return (host if upstream.port == 80 else f"{host}:{upstream.port}").encode("ascii")


def _host_of(upstream: Upstream) -> str:
    """The Host of a health check by default: the upstream's host, with its port unless it is the default."""
    host = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
    default = 443 if upstream.scheme == "https" else 80
    return host if upstream.port == default else f"{host}:{upstream.port}"
