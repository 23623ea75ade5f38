"""One listening port, the gateway's or the admin site's: `ListenerService`.

Rules:
* It binds in `privilegedStartService`, before twistd drops privileges, so a port that is taken fails start-up
  with the address in the error; a systemd socket (socket activation) is adopted instead of bound.
* What a connection's first bytes are is the listener's: a PROXY protocol header (read by Twisted's
  `proxyEndpoint`, and refused before a byte is read from a peer `proxy_protocol_from` does not list), then TLS
  (its contexts swapped whole by a reload), then HTTP.
* Every connection is given the listener as it is now: a reload updates it in place (`update`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet import fdesc, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocol, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from gateway.addresses import member_of
from gateway.config import Listener
from gateway.config.tls import ListenerTLS
from gateway.proxy.site import GatewayFactory
from gateway.tls.certificates import log_certificate
from gateway.tls.server import ClientPolicy, ServerContexts, ServerTLSCreator

__all__ = ["ListenerService", "server_contexts"]

_log = Logger(namespace="gateway.service")  # not the module's name: log lines keep the namespace they had

_REFUSAL_LOG_INTERVAL = 60.0
"""Seconds between two log lines about peers refused by a listener's proxy_protocol_from."""


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
