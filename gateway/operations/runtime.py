"""The running gateway of a config (`gateway.proxy.context.Gateway`): its router, one pool per upstream and its
admission checks; what a reload keeps of the one before it.
"""

from __future__ import annotations

from typing import Any

from gateway.auth.gatekeeper import Gatekeeper
from gateway.auth.shared_limits import connect_shared_limits
from gateway.config import Config
from gateway.logs import AccessLog
from gateway.operations.metrics import Metrics
from gateway.proxy.context import Gateway
from gateway.proxy.pool import UpstreamPool
from gateway.routing.router import Router
from gateway.tls.certificates import log_certificate

__all__ = ["make_gateway"]


def make_gateway(
    config: Config,
    reactor: Any,
    *,
    access_log: AccessLog | None = None,
    metrics: Metrics | None = None,
    previous: Gateway | None = None,
) -> Gateway:
    """The runtime objects for `config`: a router, one pool per upstream that some route uses, and the
    admission checks (with their own threads and connections, started lazily).

    With `previous` (a reload), the pools of upstreams whose settings did not change are kept (their warm
    connections with them), and an upstream whose settings changed keeps the servers it still lists (their
    connections and ejection standing), and so are the rate-limit counts and the admission methods whose settings (and
    consumers) did not change, with their caches (keys fetched, passwords verified) and connections."""
    pools: dict[str, UpstreamPool] = {}
    for route in config.routes:
        name = route.upstream.name
        if name in pools:
            continue
        old = previous.pools.get(name) if previous is not None else None
        if old is not None and old.upstream == route.upstream:
            pools[name] = old
            client = route.upstream.tls.client if route.upstream.tls is not None else None
            if client is not None:  # read again by this reload (a new pool logs its own)
                log_certificate(f"upstream {name}", client, reactor)
        else:
            # Servers it still lists keep their connections and standing (`UpstreamPool.hand_on`).
            pools[name] = UpstreamPool(route.upstream, reactor, previous=old)
    store = previous.gatekeeper.store if previous is not None else None
    old_gatekeeper = previous.gatekeeper if previous is not None else None
    shared = None
    if config.limit_store.shared:
        shared = old_gatekeeper.hand_on_shared(config.limit_store) if old_gatekeeper is not None else None
        if shared is None:
            kept = old_gatekeeper.shared if old_gatekeeper is not None else None
            shared = connect_shared_limits(config.limit_store, reactor, stats=kept.stats if kept else None)
            shared.start()
    return Gateway(
        server=config.server,
        limits=config.limits,
        router=Router(config.routes),
        pools=pools,
        clock=reactor,
        gatekeeper=Gatekeeper(config.admission, reactor=reactor, store=store, shared=shared, previous=old_gatekeeper),
        access_log=access_log if access_log is not None and access_log.enabled else None,
        metrics=metrics,
        via=config.server.via.encode("ascii"),
        server_header=config.server.server_header.encode("ascii"),
    )
