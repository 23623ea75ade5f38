"""The service tree of one process, `GatewayService`: the listeners (`ListenerService`, in
`gateway.operations.listeners`), the admin listener, the running gateway with its upstream pools
(`gateway.operations.runtime`), the worker processes; the graceful drain on stop and the reload of the config.

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
  alone binds the admin listener, and answers there for every worker (`gateway.operations.fleet`). The reactor is
  given, never imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from typing import Any

from OpenSSL import SSL
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from gateway import config as config_module
from gateway.auth.gatekeeper import Gatekeeper
from gateway.config import Config, ConfigError, Listener
from gateway.logs import AccessLog
from gateway.operations.admin import AdminView, OneProcess, admin_site
from gateway.operations.fleet import Fleet
from gateway.operations.listeners import ListenerService, server_contexts
from gateway.operations.metrics import CertificateState, Live, Metrics
from gateway.operations.runtime import make_gateway
from gateway.operations.waits import within
from gateway.operations.workers import WorkerPool, worker_command
from gateway.proxy.context import Gateway
from gateway.proxy.pool import UpstreamPool
from gateway.proxy.site import GatewayFactory
from gateway.tls.certificates import CertificateSet
from gateway.tls.server import ServerContexts

__all__ = ["GatewayService"]

_log = Logger(namespace="gateway.service")  # not the module's name: log lines keep the namespace they had

CUT_WAIT = 2.0
"""Seconds the stop waits for connections cut at the drain timeout to be gone."""
RETIRE_DELAY = 120.0
"""Seconds a replaced gatekeeper is kept after a reload, for the checks still under way on it (each has a
timeout well below this), before its threads and connections are closed."""


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
            self.fleet = Fleet(
                self.metrics.registry, self.not_ready, config.server.workers - 1, reactor, upstreams=self.upstreams
            )
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
        view: AdminView = (
            self.fleet if self.fleet is not None else OneProcess(self.metrics.registry, self.not_ready, self.upstreams)
        )
        return ListenerService(address, admin_site(view), self._reactor, what="admin")

    # --- readiness and metrics --------------------------------------------------------------------------------

    def _start_checks(self) -> None:
        """The active health checks of every upstream now (those of a pool kept over a reload run on)."""
        for pool in self.gateway.pools.values():
            pool.start()

    def upstreams(self) -> dict[str, object]:
        """Every upstream of the config now, with its servers and their states (the admin listener's view)."""
        return {name: pool.view() for name, pool in self.gateway.pools.items()}

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
        self._start_checks()
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

    def startService(self) -> None:
        super().startService()
        self._start_checks()

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
