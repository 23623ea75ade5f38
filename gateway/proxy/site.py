"""The public HTTP server: a factory of client connections (`gateway.http1.server`), each serving its requests
with an `Exchange`.

Rules:
* The factory adds nothing of its own to a response (no `Server`, no `Content-Type`, no `Date`: a proxy is
  invisible) and keeps no per-request state; everything a request needs is in the `Gateway` it carries, which a
  reload swaps whole.
* At most `server.max_connections` client connections are open per process: at the cap the listening sockets
  stop accepting (the kernel's backlog holds further clients, as with nginx and HAProxy); a connection accepted
  past the cap anyway (one accept batch takes up to 100) is answered 503.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IListeningPort, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol

from gateway.auth.shared_limits import LATENCY_BOUNDS
from gateway.config import Limits, Listener, Server
from gateway.errors import GatewayError, TooManyConnections
from gateway.http1.lifecycle import ConnectionLifecycle
from gateway.http1.server import ClientConnection
from gateway.http1.serving import Message
from gateway.operations.metrics import LimitStoreState, Live, PoolState, ServerState
from gateway.proxy.context import Gateway
from gateway.proxy.exchange import Exchange
from gateway.proxy.records import milliseconds, refusal_record
from gateway.tls.server import handshake_failure

__all__ = ["GatewayFactory"]

_log = Logger(namespace="gateway.site")  # not the module's name: log lines keep the namespace they had

_CAP_LOG_INTERVAL = 60.0


class GatewayFactory(Factory):
    """Builds the client connections, and keeps the count of open ones under server.max_connections."""

    noisy = False  # no "Starting factory" lines: the service logs what it listens on

    def __init__(self, gateway: Gateway, *, clock: IReactorTime) -> None:
        self.gateway = gateway
        self.clock = clock
        self.connections = 0
        """Client connections open now."""
        self.channels: set[ConnectionLifecycle] = set()
        self.draining = False
        """Stopping: no new requests on kept-alive connections (each closes after its response)."""
        self.accepting = True
        """Whether the listening ports accept; false at the connection cap."""
        self._ports: list[IListeningPort] = []
        self._cap_logged_at: float | None = None
        self._drained: Deferred[None] | None = None

    def buildProtocol(self, addr: IAddress | None, listener: Listener | None = None) -> ClientConnection:
        return ClientConnection(self, listener)

    # --- what a connection asks (gateway.http1.serving.ConnectionOwner) ----------------------------------------

    @property
    def limits(self) -> Limits:
        return self.gateway.limits

    @property
    def server(self) -> Server:
        return self.gateway.server

    def handle(self, connection: ConnectionLifecycle, message: Message) -> Exchange:
        """A request's head is read: the exchange that serves it, on the config of now."""
        return Exchange(self.gateway, connection, message, self.draining)

    def head_refused(
        self, connection: ConnectionLifecycle, error: GatewayError, request_id: str, line: tuple[bytes, bytes] | None
    ) -> None:
        """A request head refused before it became a request: its access record, with the method and target of
        its request line when that was read whole."""
        gateway = self.gateway
        if gateway.observed:
            client = getattr(connection.getPeer(), "host", "")
            method, target = line if line is not None else (None, None)
            log = gateway.access_log
            if target is not None and not (log is not None and log.include_query):
                target = target.partition(b"?")[0]
            record = refusal_record(request_id, client, method, error.status, tls=connection.tls_info, path=target)
            if line is not None:
                record["total_ms"] = milliseconds(self.clock.seconds() - connection.head_began)
            gateway.request_ended(record)

    def invalid_peer(self, listener: Listener | None) -> None:
        metrics = self.gateway.metrics
        if metrics is not None and listener is not None:
            metrics.proxy_refused(listener.describe(), "invalid_address")

    # --- the connection cap -------------------------------------------------------------------------------

    def add_port(self, port: IListeningPort) -> None:
        """A listening port serving this factory: paused and resumed with the connection cap."""
        self._ports.append(port)
        if not self.accepting:
            _set_reading(port, False)

    def remove_port(self, port: IListeningPort) -> None:
        """A port about to stop listening: it must not be resumed any more."""
        if port in self._ports:
            self._ports.remove(port)

    def connection_opened(self, channel: ConnectionLifecycle) -> GatewayError | None:
        """Count a new client connection; the error to refuse it with if it is over the cap."""
        self.connections += 1
        self.channels.add(channel)
        cap = self.gateway.server.max_connections
        if self.connections >= cap and self.accepting:
            self.accepting = False
            now = self.clock.seconds()
            if self._cap_logged_at is None or now - self._cap_logged_at >= _CAP_LOG_INTERVAL:
                # Once a minute at most: a gateway held at its cap pauses and resumes on every connection.
                self._cap_logged_at = now
                _log.warn("At {cap} client connections: no more are accepted until one closes", cap=cap)
            for port in self._ports:
                _set_reading(port, False)
        if self.connections > cap:
            return TooManyConnections("the gateway is at its client connection limit; try again shortly")
        return None

    def connection_closed(self, channel: ConnectionLifecycle) -> None:
        self.connections -= 1
        self.channels.discard(channel)
        if not self.channels and self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)
        if self.connections < self.gateway.server.max_connections and not self.accepting:
            self.accepting = True
            for port in self._ports:
                _set_reading(port, True)

    def handshake_failed(self, listener: Listener, error: SSL.Error) -> None:
        """A client's TLS handshake failed: counted by listener and reason class, not logged (a listener on the
        internet sees scanners and old clients all day; the count shows a trend, a log line each would drown
        the rest)."""
        metrics = self.gateway.metrics
        if metrics is not None:
            metrics.handshake_failed(listener.describe(), handshake_failure(error))

    def reconfigure(self, gateway: Gateway) -> None:
        """A reload: new connections and new requests get `gateway`; requests under way keep theirs."""
        self.gateway = gateway

    # --- graceful drain ---------------------------------------------------------------------------------------

    def drain(self) -> Deferred[None]:
        """Let the requests in flight finish, and close every connection as soon as it has no request: idle
        kept-alive ones now, the others after their response (announced with `Connection: close`). Fires once
        no client connection is left. The listening ports must have stopped accepting already."""
        self.draining = True
        for channel in list(self.channels):
            if channel.refused is not None:
                continue  # answered and lingering: its timer closes it (closing now could reset the answer)
            if channel.close_when_idle():
                continue  # idle between requests: nothing is lost
            request = channel.handler
            if isinstance(request, Exchange) and not request.startedWriting:
                request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        if not self.channels:
            return succeed(None)
        if self._drained is None:
            self._drained = Deferred()
        return self._drained

    def cut_all(self, ending: str) -> int:
        """Cut every client connection still open (the drain timeout passed): a response under way is never
        finished as if complete. Returns how many were cut."""
        channels = list(self.channels)
        for channel in channels:
            request = channel.handler
            if isinstance(request, Exchange):
                request.cut(ending)
            channel.transport.abortConnection()
        return len(channels)

    # --- what a scrape sees -------------------------------------------------------------------------------

    def live(self, draining: bool) -> Live:
        """The process's state now, for the metrics: requests by phase, streams paused by backpressure in each
        direction, body bytes held, and the upstream pools of the current config."""
        phases: dict[str, int] = {}
        paused_responses = paused_uploads = buffered_uploads = buffered_responses = 0
        for channel in self.channels:
            transport: object = channel.transport
            if isinstance(transport, TLSMemoryBIOProtocol):
                transport = transport.transport  # the socket's buffer, under the TLS layer's (at most a record)
            # FileDescriptor's send buffer past its offset (what the last write attempt left; writes since then
            # are joined to it at the next one).
            buffered_responses += len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
            request = channel.handler
            if isinstance(request, Exchange):
                name = request.phase.value
                phases[name] = phases.get(name, 0) + 1
                relay, pipe = request.relay, request.pipe
                if relay is not None and relay.paused:
                    paused_responses += 1
                if pipe is not None:
                    buffered_uploads += pipe.buffered
                    if pipe.client_paused:
                        paused_uploads += 1
        pools = [
            PoolState(
                name,
                pool.in_flight,
                pool.queued,
                pool.idle,
                pool.retries,
                [
                    ServerState(
                        s.address,
                        s.state,
                        s.active,
                        s.requests,
                        s.failures,
                        s.standing.ejections,
                        s.verdict.passed,
                        s.verdict.failed,
                    )
                    for s in pool.servers
                ],
            )
            for name, pool in self.gateway.pools.items()
        ]
        shared = self.gateway.gatekeeper.shared
        store = None
        if shared is not None:
            stats = shared.stats
            store = LimitStoreState(
                LATENCY_BOUNDS,
                tuple(stats.latency_buckets),
                stats.latency_sum,
                dict(stats.errors),
                dict(stats.fallbacks),
                shared.circuit.is_open,
            )
        return Live(
            connections=self.connections,
            requests=phases,
            paused_responses=paused_responses,
            paused_uploads=paused_uploads,
            buffered_upload_bytes=buffered_uploads,
            buffered_response_bytes=buffered_responses,
            pools=pools,
            draining=draining,
            limit_store=store,
        )


def _set_reading(port: IListeningPort, reading: bool) -> None:
    """Start or stop accepting on a listening port (`tcp.Port` is a FileDescriptor); a port that cannot be
    paused keeps accepting, and the channel answers what is over the cap with 503."""
    method = getattr(port, "startReading" if reading else "stopReading", None)
    if method is not None:
        method()
