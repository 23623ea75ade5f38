"""The service tree: a listener per configured address, the upstream pools, the worker processes, and their
orderly stop.

Rule: everything the gateway opens it closes on stop: listening ports first (no new clients), then the idle
pooled upstream connections; worker processes are told to stop at the same time and waited for (bounded). With
`server.workers` above 1 every process binds each listener itself with SO_REUSEPORT. The reactor is given, never
imported.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import tcp
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from gateway.auth.gatekeeper import Gatekeeper
from gateway.config import Config, Listener
from gateway.request import Gateway
from gateway.routing import Router
from gateway.site import GatewayFactory
from gateway.upstream import UpstreamPool
from gateway.workers import WorkerPool, worker_command

__all__ = ["GatewayService", "make_gateway"]

_log = Logger()


def make_gateway(config: Config, reactor: Any) -> Gateway:
    """The runtime objects for `config`: a router, one pool per upstream that some route uses, and the
    admission checks (with their own threads and connections, started lazily)."""
    pools = {route.upstream.name: UpstreamPool(route.upstream, reactor) for route in config.routes}
    return Gateway(
        server=config.server,
        limits=config.limits,
        router=Router(config.routes),
        pools=pools,
        clock=reactor,
        gatekeeper=Gatekeeper(config.admission, reactor=reactor),
    )


class ListenerService(Service):
    """One listening TCP port. It binds in `privilegedStartService` (before twistd drops privileges), so a port
    that is taken fails start-up with the address in the error rather than later and quietly.

    With `reuse_port` the socket has SO_REUSEPORT, so the worker processes each bind the same address and the
    kernel spreads new connections across them."""

    def __init__(self, listener: Listener, factory: GatewayFactory, reactor: Any, *, reuse_port: bool = False) -> None:
        self.listener = listener
        self.reuse_port = reuse_port
        self._factory = factory
        self._reactor = reactor
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._bind()

    def startService(self) -> None:
        super().startService()
        self._bind()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            self._factory.remove_port(port)
        return maybeDeferred(port.stopListening) if port is not None else succeed(None)

    def _bind(self) -> None:
        if self.port is not None:
            return
        listener = self.listener
        if self.reuse_port:
            # interface= must repeat the binding's address: Port picks IPv6 from it (tcp._constructTCPPort).
            binding = tcp.makeBinding(listener.host, listener.port, reuseAddress=True, reusePort=True)
            self.port = self._reactor.listenTCP(
                binding, self._factory, backlog=listener.backlog, interface=listener.host
            )
        else:
            self.port = self._reactor.listenTCP(
                listener.port, self._factory, backlog=listener.backlog, interface=listener.host
            )
        self._factory.add_port(self.port)  # paused at the connection cap (server.max_connections)
        address = self.port.getHost()
        _log.info(
            "gateway listening on {host}:{port} (pid {pid})", host=address.host, port=address.port, pid=os.getpid()
        )


class GatewayService(MultiService):
    """The whole gateway as one `IService`, for `twistd`, for a worker process or for tests.

    With `spawn_workers` (the twistd process) and `server.workers` above 1, it is worker 0 and also starts and
    stops workers 1..N-1 (`self.workers`), each running `gateway.worker` on the same config file. Without it,
    it only serves (a worker process, or a test binding the same port twice in one process)."""

    def __init__(self, config: Config, reactor: Any, *, spawn_workers: bool = False) -> None:
        super().__init__()
        self.config = config
        self.gateway = make_gateway(config, reactor)
        self.factory = GatewayFactory(self.gateway, clock=reactor)
        reuse_port = config.server.workers > 1
        self.listeners = [
            ListenerService(listener, self.factory, reactor, reuse_port=reuse_port) for listener in config.listeners
        ]
        for service in self.listeners:
            service.setServiceParent(self)
        self.workers: WorkerPool | None = None
        if spawn_workers and config.server.workers > 1:
            # Absolute now: twistd may change directory (--rundir) before the workers start.
            command = partial(worker_command, os.path.abspath(config.source))
            self.workers = WorkerPool(reactor, config.server.workers - 1, command)
            # After the listeners: twistd's own sockets are bound before any worker starts.
            self.workers.setServiceParent(self)

    def stopService(self) -> Deferred[Any]:
        stopped = super().stopService()

        def close_pools(_: object) -> Deferred[Any]:
            closing = [pool.close() for pool in self.gateway.pools.values()]
            return DeferredList([*closing, self.gateway.gatekeeper.close()])

        return stopped.addBoth(close_pools)
