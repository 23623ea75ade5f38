"""The service tree: the listeners, the admin listener, the upstream pools, the worker processes; the graceful
drain on stop and the reload of the config.

Rules:
* Everything the gateway opens it closes on stop, in this order: readiness goes to 503 and the listening ports
  close (no new clients); idle kept-alive connections close; requests in flight go on for at most
  `server.drain_timeout`, then what is left is cut (a cut stream never looks complete); worker processes drain
  the same way at the same time; then the upstream pools, the admission checks and the admin listener close.
* A reload reads and validates the whole file first: an invalid one changes nothing. A valid one applies to new
  requests, while requests in flight keep the `Gateway` they started with (its routes, pools and admission);
  pools no longer used close their idle connections, and rate-limit counts carry over. Listeners are compared
  by their settings: new ones are bound before anything changes (a port that cannot be bound makes the reload
  fail whole), removed ones stop accepting.
* With `server.workers` above 1 every process binds each listener itself with SO_REUSEPORT; the twistd process
  alone binds the admin listener, and answers there for every worker (`gateway.operations.fleet`). The reactor is given,
  never imported.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from typing import Any, cast

from OpenSSL import SSL
from twisted.application.service import MultiService, Service
from twisted.internet import fdesc, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocol, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from gateway import config as config_module
from gateway.addresses import member_of
from gateway.auth.gatekeeper import Gatekeeper
from gateway.auth.shared_limits import connect_shared_limits
from gateway.config import Config, ConfigError, Listener
from gateway.config.tls import ListenerTLS
from gateway.context import Gateway
from gateway.logs import AccessLog
from gateway.operations.admin import OneProcess, admin_site
from gateway.operations.fleet import Fleet
from gateway.operations.metrics import CertificateState, Live, Metrics
from gateway.operations.waits import within
from gateway.operations.workers import WorkerPool, worker_command
from gateway.routing import Router
from gateway.site import GatewayFactory
from gateway.tls.certificates import CertificateSet, log_certificate
from gateway.tls.server import ClientPolicy, ServerContexts, ServerTLSCreator
from gateway.upstream import UpstreamPool

__all__ = ["GatewayService", "ListenerService", "make_gateway"]

_log = Logger(namespace="gateway.service")  # not the module's name: log lines keep the namespace they had

CUT_WAIT = 2.0
"""Seconds the stop waits for connections cut at the drain timeout to be gone."""
_REFUSAL_LOG_INTERVAL = 60.0
"""Seconds between two log lines about peers refused by a listener's proxy_protocol_from."""
RETIRE_DELAY = 120.0
"""Seconds a replaced gatekeeper is kept after a reload, for the checks still under way on it (each has a
timeout well below this), before its threads and connections are closed."""


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
    connections with them), and so are the rate-limit counts and the admission methods whose settings (and
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
            pools[name] = UpstreamPool(route.upstream, reactor)
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
    )


@implementer(IStreamServerEndpoint)
class _BindNow:
    """An endpoint whose `listen` binds at once (an error raises there, not in a Deferred), so that a wrapping
    endpoint (`proxyEndpoint`) keeps binding synchronous, as `privilegedStartService` needs."""

    def __init__(self, listen: Callable[[IProtocolFactory], IListeningPort]) -> None:
        self._listen = listen

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return succeed(self._listen(factory))


def server_contexts(tls: ListenerTLS) -> ServerContexts:
    """The OpenSSL contexts of a listener's TLS settings."""
    return ServerContexts(
        tls.certificates,
        min_version=tls.min_version,
        clients=ClientPolicy(mode=tls.client_certificates, ca=tls.client_ca),
    )


@implementer(IProtocolFactory)
class _ProxySourceGate:
    """The factory of a PROXY protocol listener as the listening socket sees it: a connection from a peer its
    `proxy_protocol_from` does not list is closed before a byte of it is read (no protocol is built, so the
    port closes the socket), since its header could claim any client address. Asked of the listener as it is
    now (a reload may change the list)."""

    def __init__(self, wrapped: IProtocolFactory, service: ListenerService) -> None:
        self._wrapped = wrapped
        self._service = service

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        allowed = self._service.listener.proxy_protocol_from
        host = getattr(addr, "host", "")
        if not allowed or member_of(allowed)(host):
            return self._wrapped.buildProtocol(addr)
        self._service.refused_proxy_peer(host)
        return None

    def doStart(self) -> None:
        self._wrapped.doStart()

    def doStop(self) -> None:
        self._wrapped.doStop()


class _ListenerFactory(Factory):
    """The gateway's factory as one listener sees it: each channel knows the listener it came in on (whether
    it redirects to https), as the listener is now (a reload may change it)."""

    def __init__(self, factory: GatewayFactory, service: ListenerService) -> None:
        self._factory = factory
        self._service = service

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        return self._factory.buildProtocol(addr, self._service.listener)

    def doStart(self) -> None:
        self._factory.doStart()

    def doStop(self) -> None:
        self._factory.doStop()


class ListenerService(Service):
    """One listening TCP port. It binds in `privilegedStartService` (before twistd drops privileges), so a port
    that is taken fails start-up with the address in the error rather than later and quietly.

    With `reuse_port` the socket has SO_REUSEPORT, so the worker processes each bind the same address and the
    kernel spreads new connections across them. The gateway's own factory also pauses the port at its
    connection cap."""

    def __init__(
        self,
        listener: Listener,
        factory: IProtocolFactory,
        reactor: Any,
        *,
        reuse_port: bool = False,
        what: str = "gateway",
        inherited: Mapping[str, int] | None = None,
    ) -> None:
        self.listener = listener
        self.reuse_port = reuse_port
        self._factory = factory
        self._reactor = reactor
        self._what = what
        self._inherited = inherited or {}
        self.port: IListeningPort | None = None
        self.tls = ServerTLSCreator(server_contexts(listener.tls)) if listener.tls is not None else None
        """What the listener's TLS connections are made with; `update` swaps in a reload's certificates."""
        self._proxy_refusal_logged_at: float | None = None
        self._proxy_refusals_unlogged = 0

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.bind()

    def startService(self) -> None:
        super().startService()
        self.bind()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        port, self.port = self.port, None
        if port is not None and isinstance(self._factory, GatewayFactory):
            self._factory.remove_port(port)
        return maybeDeferred(port.stopListening) if port is not None else succeed(None)

    def update(self, listener: Listener, contexts: ServerContexts | None) -> None:
        """A reload's settings for this bound listener (same address): new connections get them, and new
        handshakes `contexts` (its certificates, checked and built already); open connections keep theirs."""
        self.listener = listener
        if self.tls is not None and contexts is not None:
            self.tls.update(contexts)
            self._log_certificates()
        self._warn_open_proxy_protocol()

    def _log_certificates(self) -> None:
        if self.tls is not None:
            for certificate_set in self.tls.contexts.certificates:
                log_certificate(f"listener {self.listener.describe()}", certificate_set, self._reactor)

    def bind(self) -> None:
        if self.port is not None:
            return
        listener = self.listener
        factory = self._factory
        if isinstance(factory, GatewayFactory):
            factory = _ListenerFactory(factory, self)
        if self.tls is not None:
            # TLS is read under the PROXY header (which comes first on the wire) and over the socket.
            factory = TLSMemoryBIOFactory(self.tls, False, factory)
        if listener.proxy_protocol:
            # Twisted's PROXY protocol support, through its public `proxyEndpoint` (what the `haproxy:` endpoint
            # string builds): the header is read and taken off before the channel sees a byte, and getPeer()
            # answers the address it carried. A connection without a valid header is closed.
            bound: list[IListeningPort] = []
            gated = _BindNow(lambda wrapped: self._listen(_ProxySourceGate(wrapped, self)))
            proxyEndpoint(gated).listen(factory).addCallback(bound.append)
            self.port = bound[0]
        else:
            self.port = self._listen(factory)
        if isinstance(self._factory, GatewayFactory):
            self._factory.add_port(self.port)  # paused at the connection cap (server.max_connections)
        address = cast(IPv4Address | IPv6Address, self.port.getHost())  # a TCP port's
        _log.info(
            "{what} listening on {host}:{port}{how} (pid {pid})",
            what=self._what,
            host=address.host,
            port=address.port,
            how=(f" (systemd socket {listener.systemd!r})" if listener.systemd else "")
            + (" with the PROXY protocol" if listener.proxy_protocol else "")
            + (" for HTTPS" if listener.tls is not None else "")
            + (f" (redirecting to https port {listener.redirect_to_https})" if listener.redirect_to_https else ""),
            pid=os.getpid(),
        )
        self._log_certificates()
        self._warn_open_proxy_protocol()

    def refused_proxy_peer(self, host: str) -> None:
        """A peer outside `proxy_protocol_from` connected to this PROXY protocol listener and was refused:
        counted, and logged at most once a minute (with how many more since), as a scan would flood the log."""
        listener = self.listener.describe()
        factory = self._factory
        metrics = factory.gateway.metrics if isinstance(factory, GatewayFactory) else None
        if metrics is not None:
            metrics.proxy_refused(listener, "peer_not_allowed")
        now = self._reactor.seconds()
        if self._proxy_refusal_logged_at is not None and now - self._proxy_refusal_logged_at < _REFUSAL_LOG_INTERVAL:
            self._proxy_refusals_unlogged += 1
            return
        _log.warn(
            "Refused a connection to PROXY protocol listener {listener} from {peer}, which proxy_protocol_from does "
            "not list{more}",
            listener=listener,
            peer=host,
            more=f" ({self._proxy_refusals_unlogged} more refused since the last line)"
            if self._proxy_refusals_unlogged
            else "",
        )
        self._proxy_refusal_logged_at = now
        self._proxy_refusals_unlogged = 0

    def _warn_open_proxy_protocol(self) -> None:
        listener = self.listener
        if listener.proxy_protocol and not listener.proxy_protocol_from:
            _log.warn(
                "Listener {listener} takes a PROXY header from any peer, so anyone who can reach it can claim any "
                "client address: it must be reachable only from the load balancer. List the load balancers' "
                "addresses in proxy_protocol_from to refuse everyone else.",
                listener=listener.describe(),
            )

    def _listen(self, factory: IProtocolFactory) -> IListeningPort:
        """Bind (or adopt) the listener's socket for `factory`, at once: a port that is taken raises here."""
        listener = self.listener
        if listener.systemd:
            return self._adopt(listener, factory)
        if self.reuse_port:
            # interface= must repeat the binding's address: Port picks IPv6 from it (tcp._constructTCPPort).
            binding = tcp.makeBinding(listener.host, listener.port, reuseAddress=True, reusePort=True)
            port: IListeningPort = self._reactor.listenTCP(
                binding, factory, backlog=listener.backlog, interface=listener.host
            )
        else:
            port = self._reactor.listenTCP(listener.port, factory, backlog=listener.backlog, interface=listener.host)
        return port

    def _adopt(self, listener: Listener, factory: IProtocolFactory) -> IListeningPort:
        """The listening socket systemd passed under `listener.systemd` (socket activation). The reactor adopts
        a duplicate of it, so the original stays open for a reload or a worker."""
        fd = self._inherited.get(listener.systemd)
        if fd is None:
            names = ", ".join(sorted(self._inherited)) or "none"
            raise CannotListenError(
                None, listener.systemd, f"systemd passed no socket named {listener.systemd!r} (it passed: {names})"
            )
        probe = socket.socket(fileno=fd)  # only to learn the socket's family
        family = probe.family
        probe.detach()
        # systemd passes blocking sockets (unless NonBlocking=yes); the reactor's accept loop needs one that
        # is not, or its last accept() of a batch would block the process.
        fdesc.setNonBlocking(fd)
        port: IListeningPort = self._reactor.adoptStreamPort(fd, family, factory)
        return port


class GatewayService(MultiService):
    """The whole gateway as one `IService`, for `twistd`, for a worker process or for tests.

    With `spawn_workers` (the twistd process) and `server.workers` above 1, it is worker 0 and also starts and stops
    workers 1..N-1 (`self.workers`), each running `gateway.operations.worker` on the same config file, and its admin
    listener answers for all of them (`self.fleet`). Without it, it only serves (a worker process, or a test binding
    the same port twice in one process). `worker_index` is this process's number: a worker (above 0) has no admin
    listener, it answers its parent instead."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        spawn_workers: bool = False,
        worker_index: int = 0,
        worker_environment: Callable[[], dict[str, str]] | None = None,
        worker_json_log: bool = False,
        inherited: Mapping[str, int] | None = None,
        daemon: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.worker_index = worker_index
        self.inherited = dict(inherited or {})
        """Listening sockets passed in by systemd (socket activation): name -> file descriptor."""
        self._reactor = reactor
        self.draining = False
        # A daemonised twistd sends its standard output to /dev/null: "-" then means its log file.
        self.access_log = AccessLog(
            config.access_log.path, include_query=config.access_log.query, clock=reactor, stdout_is_log=daemon
        )
        self.metrics = Metrics(self._live)
        self.gateway = make_gateway(config, reactor, access_log=self.access_log, metrics=self.metrics)
        self.factory = GatewayFactory(self.gateway, clock=reactor)
        self._retired_pools: list[UpstreamPool] = []
        self._retired_gatekeepers: list[Gatekeeper] = []
        self._retire_calls: dict[int, Any] = {}
        self.listeners = [self._listener_service(listener, config) for listener in config.listeners]
        for service in self.listeners:
            service.setServiceParent(self)
        self.workers: WorkerPool | None = None
        self.fleet: Fleet | None = None
        """With workers: what the admin listener answers for all of them."""
        if spawn_workers and config.server.workers > 1:
            self.fleet = Fleet(self.metrics.registry, self.not_ready, config.server.workers - 1, reactor)
        self.admin = self._admin_service(config)
        if self.admin is not None:
            self.admin.setServiceParent(self)
        if self.fleet is not None:
            # Absolute now: twistd may change directory (--rundir) before the workers start.
            command = partial(
                worker_command, os.path.abspath(config.source), json_log=worker_json_log, inherited=self.inherited
            )
            self.workers = WorkerPool(
                reactor,
                config.server.workers - 1,
                command,
                config_text=_config_text(config),
                stop_timeout=config.server.drain_timeout + 10.0,
                environment=worker_environment,
                inherited_fds=tuple(self.inherited.values()),
                channel=self.fleet.channel,
            )
            # After the listeners: twistd's own sockets are bound before any worker starts.
            self.workers.setServiceParent(self)

    def _listener_service(self, listener: Listener, config: Config) -> ListenerService:
        return ListenerService(
            listener, self.factory, self._reactor, reuse_port=config.server.workers > 1, inherited=self.inherited
        )

    def _admin_service(self, config: Config) -> ListenerService | None:
        if config.admin is None or self.worker_index > 0:
            return None
        address = Listener(host=config.admin.host, port=config.admin.port, backlog=64)
        view = self.fleet if self.fleet is not None else OneProcess(self.metrics.registry, self.not_ready)
        return ListenerService(address, admin_site(view), self._reactor, what="admin")

    # --- readiness and metrics --------------------------------------------------------------------------------

    def not_ready(self) -> str | None:
        """Why the process should get no traffic now (None: it should)."""
        if self.draining:
            return "draining"
        if not self.running or any(service.port is None for service in self.listeners):
            return "starting"
        return None

    def _live(self) -> Live:
        return self.factory.live(self.draining)._replace(certificates=self.certificates())

    def certificates(self) -> list[CertificateState]:
        """Every certificate in use now: the listeners' (as last loaded) and the client certificates shown to
        upstreams."""
        states = []
        for service in self.listeners:
            if service.tls is not None:
                for certificate_set in service.tls.contexts.certificates:
                    states.append(_state(f"listener {service.listener.describe()}", certificate_set))
        # The routes' upstreams (those with a pool), as the last load read them: a pool a reload kept holds the
        # upstream read before, whose chain was checked then.
        upstreams = {route.upstream.name: route.upstream for route in self.config.routes}
        for name, upstream in upstreams.items():
            if upstream.tls is not None and upstream.tls.client is not None:
                states.append(_state(f"upstream {name}", upstream.tls.client))
        return states

    # --- reload -------------------------------------------------------------------------------------------

    def reload(self, text: bytes | None = None) -> bool:
        """Read the config file again (or take `text`, its bytes as the twistd process read them, in a worker) and
        apply it to new requests; False (and nothing changed) if it is invalid or a new listener cannot be bound.
        The worker processes are given the very bytes this process read and checked."""
        if self.draining:
            _log.warn("Reload ignored: the gateway is stopping")
            return False
        source = self.config.source
        try:
            new = config_module.load(source) if text is None else config_module.load_text(text, source=source)
        except ConfigError as e:
            # One line per error, each whole (file, key, reason): several say which of how many they are.
            count = len(e.errors)
            for number, error in enumerate(e.errors, 1):
                _log.error(
                    "Reload refused, the running config is unchanged{which}: {error}",
                    which=f" (error {number} of {count})" if count > 1 else "",
                    error=str(error),
                )
            self.metrics.reloaded("invalid")
            return False
        old = self.config
        if new.server.workers != old.server.workers:
            _log.warn(
                "Reload: server.workers changed from {old} to {new}; that takes a restart (kept at {old})",
                old=old.server.workers,
                new=new.server.workers,
            )
            new = _with_workers(new, old.server.workers)
        kept = {_address(service.listener): service for service in self.listeners}
        added: list[ListenerService] = []
        admin = self.admin
        for listener in new.listeners:
            running = kept.get(_address(listener))
            # What a connection's first bytes are cannot change under a bound socket: refused, not ignored
            # (ignoring a PROXY change would leave client addresses spoofable, or break every request).
            unchangeable = None
            if running is not None and running.listener.proxy_protocol != listener.proxy_protocol:
                unchangeable = "proxy_protocol changes only on a restart"
            elif running is not None and (running.listener.tls is None) != (listener.tls is None):
                unchangeable = "turning TLS on or off changes only on a restart (certificates reload)"
            if unchangeable is not None:
                _log.error(
                    "Reload refused, the running config is unchanged: {source}: listener {address}: {reason}",
                    source=source,
                    address=listener.describe(),
                    reason=unchangeable,
                )
                self.metrics.reloaded("invalid")
                return False
            if running is not None and running.listener.backlog != listener.backlog:
                # Its socket is bound: a new one on the same address could not be bound beside it.
                _log.warn("Reload: listener {address} keeps its backlog until a restart", address=listener.describe())
        updates: list[tuple[ListenerService, Listener, ServerContexts | None]] = []
        try:
            for listener in new.listeners:
                running = kept.get(_address(listener))
                if running is not None:
                    contexts = server_contexts(listener.tls) if listener.tls is not None else None
                    updates.append((running, listener, contexts))
            for listener in new.listeners:
                if _address(listener) not in kept:
                    service = self._listener_service(listener, new)
                    service.bind()
                    added.append(service)
            if _admin_changed(old, new):
                admin = self._admin_service(new)
                if admin is not None:
                    admin.bind()
            self.access_log.configure(new.access_log.path, include_query=new.access_log.query)
        except (CannotListenError, OSError, ValueError, SSL.Error) as e:
            for service in added:
                service.stopService()
            if admin is not self.admin and admin is not None:
                admin.stopService()
            _log.error("Reload refused, the running config is unchanged: {source}: {error}", source=source, error=e)
            self.metrics.reloaded("invalid")
            return False
        # Valid and bound: from here nothing fails. New requests get the new Gateway.
        previous = self.gateway
        self.gateway = make_gateway(
            new, self._reactor, access_log=self.access_log, metrics=self.metrics, previous=previous
        )
        self.factory.reconfigure(self.gateway)
        self.config = new
        for service, listener, contexts in updates:
            service.update(listener, contexts)
        wanted = {_address(listener) for listener in new.listeners}
        for service in list(self.listeners):
            if _address(service.listener) not in wanted:
                service.disownServiceParent()  # stops accepting; its connections go on
        for service in added:
            service.setServiceParent(self)
        self.listeners = [service for service in self.listeners if _address(service.listener) in wanted] + added
        if _admin_changed(old, new):
            if self.admin is not None:
                self.admin.disownServiceParent()
            self.admin = admin
            if admin is not None:
                admin.setServiceParent(self)
        self._retire(previous)
        if self.workers is not None:
            self.workers.stop_timeout = new.server.drain_timeout + 10.0  # they drain on the new timeout
            self.workers.send_config(_config_text(new))
        self.metrics.reloaded("applied")
        _log.info(
            "Reloaded {source}: {routes} routes, {listeners} listeners (pid {pid})",
            source=source,
            routes=len(new.routes),
            listeners=len(new.listeners),
            pid=os.getpid(),
        )
        return True

    def _retire(self, previous: Gateway) -> None:
        """What the new Gateway no longer uses: pools close their idle connections now (those still in use close
        as their exchange ends: a closed pool keeps none); the old gatekeeper closes once the checks still under
        way on it have had their time."""
        # Retired pools that carry nothing any more are dropped (closed again: a connection may have come back).
        for pool in [pool for pool in self._retired_pools if not pool.in_flight and not pool.queued]:
            pool.close()
            self._retired_pools.remove(pool)
        in_use = set(map(id, self.gateway.pools.values()))
        for pool in previous.pools.values():
            if id(pool) not in in_use:
                pool.close()
                self._retired_pools.append(pool)
        gatekeeper = previous.gatekeeper
        self._retired_gatekeepers.append(gatekeeper)

        def close() -> None:
            self._retire_calls.pop(id(gatekeeper), None)
            if gatekeeper in self._retired_gatekeepers:
                self._retired_gatekeepers.remove(gatekeeper)
                gatekeeper.close()

        self._retire_calls[id(gatekeeper)] = self._reactor.callLater(RETIRE_DELAY, close)

    # --- stop -------------------------------------------------------------------------------------------------

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.draining = True  # readiness: 503 from now on
        await DeferredList([maybeDeferred(service.stopService) for service in self.listeners])
        workers = self.workers.stopService() if self.workers is not None else succeed(None)
        drained = self.factory.drain()
        if not drained.called:
            timeout = self.config.server.drain_timeout
            _log.info(
                "Draining {count} client connections for at most {timeout:g} s",
                count=len(self.factory.channels),
                timeout=timeout,
            )
            if not await within(self._reactor, drained, timeout):
                cut = self.factory.cut_all("drain_timeout")
                _log.warn(
                    "Drain timeout ({timeout:g} s): cut {count} client connections still open",
                    timeout=timeout,
                    count=cut,
                )
                # The aborted connections are lost on the reactor's next turns: wait for them (bounded), so
                # that what they report still finds the pools and the access log open.
                await within(self._reactor, drained, CUT_WAIT)
        await workers
        closing = [pool.close() for pool in (*self.gateway.pools.values(), *self._retired_pools)]
        closing += [gatekeeper.close() for gatekeeper in (self.gateway.gatekeeper, *self._retired_gatekeepers)]
        self._retired_gatekeepers.clear()
        for call in self._retire_calls.values():
            call.cancel()
        self._retire_calls.clear()
        await DeferredList(closing)
        if self.admin is not None:
            await maybeDeferred(self.admin.stopService)
        self.access_log.close()


def _config_text(config: Config) -> bytes:
    """The bytes the worker processes are given: those `config` was read from. A config built from a mapping (in
    tests) has none: its file, if there is one, is read once here; without one the workers are given nothing,
    and refuse it naming the file."""
    if config.text:
        return config.text
    try:
        with open(config.source, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _state(owner: str, certificate_set: CertificateSet) -> CertificateState:
    return CertificateState(
        owner,
        certificate_set.certificate_path,
        ",".join(certificate_set.names),
        certificate_set.not_after.timestamp(),
        certificate_set.chain_verified,
    )


def _address(listener: Listener) -> tuple[str, int, str]:
    """What identifies a listener across a reload: its address, or its systemd socket's name."""
    return (listener.host, listener.port, listener.systemd)


def _admin_changed(old: Config, new: Config) -> bool:
    return old.admin != new.admin


def _with_workers(config: Config, workers: int) -> Config:
    return replace(config, server=replace(config.server, workers=workers))
