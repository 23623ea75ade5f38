"""The service tree: a listener per configured address, the upstream pools, and their orderly stop.

Rule: everything the gateway opens it closes on stop: listening ports first (no new clients), then the idle
pooled upstream connections. The reactor is given, never imported.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from gateway.config import Config, Listener
from gateway.request import Gateway
from gateway.routing import Router
from gateway.site import GatewayFactory
from gateway.upstream import UpstreamPool

__all__ = ["GatewayService", "make_gateway"]

_log = Logger()


def make_gateway(config: Config, reactor: Any) -> Gateway:
    """The runtime objects for `config`: a router and one pool per upstream that some route uses."""
    pools = {route.upstream.name: UpstreamPool(route.upstream, reactor) for route in config.routes}
    return Gateway(
        server=config.server,
        limits=config.limits,
        router=Router(config.routes),
        pools=pools,
        clock=reactor,
    )


class ListenerService(Service):
    """One listening TCP port. It binds in `privilegedStartService` (before twistd drops privileges), so a port
    that is taken fails start-up with the address in the error rather than later and quietly."""

    def __init__(self, listener: Listener, factory: GatewayFactory, reactor: Any) -> None:
        self.listener = listener
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
        return maybeDeferred(port.stopListening) if port is not None else succeed(None)

    def _bind(self) -> None:
        if self.port is not None:
            return
        listener = self.listener
        self.port = self._reactor.listenTCP(
            listener.port, self._factory, backlog=listener.backlog, interface=listener.host
        )
        address = self.port.getHost()
        _log.info("gateway listening on {host}:{port}", host=address.host, port=address.port)


class GatewayService(MultiService):
    """The whole gateway as one `IService`, for `twistd` or for tests."""

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.gateway = make_gateway(config, reactor)
        self.factory = GatewayFactory(self.gateway, clock=reactor)
        self.listeners = [ListenerService(listener, self.factory, reactor) for listener in config.listeners]
        for service in self.listeners:
            service.setServiceParent(self)

    def stopService(self) -> Deferred[Any]:
        stopped = super().stopService()

        def close_pools(_: object) -> Deferred[Any]:
            return DeferredList([pool.close() for pool in self.gateway.pools.values()])

        return stopped.addBoth(close_pools)
