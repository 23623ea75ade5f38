"""The config as frozen, typed objects: what `gateway.config.loader` makes of the file, and what the rest of the
gateway is given. Pure data with its defaults; nothing here reads a file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from gateway.addresses import Networks
from gateway.auth.settings.model import DEFAULT_ADMISSION, NOBODY, Admission, RouteAdmission
from gateway.config.store import LOCAL_STORE, LimitStoreSettings
from gateway.config.tls import ListenerTLS, UpstreamTLS
from gateway.config.values import GiB, KiB, MiB
from gateway.routing.cors import CorsPolicy

__all__ = [
    "DEFAULT_HIDDEN_RESPONSE_HEADERS",
    "REFUSED_METHODS",
    "AccessLog",
    "Admin",
    "Balance",
    "Config",
    "Ejection",
    "FlowControl",
    "HealthCheck",
    "HostHeaderPolicy",
    "Limits",
    "Listener",
    "Retries",
    "RetryBudget",
    "Route",
    "Server",
    "Timeouts",
    "Upstream",
    "UpstreamServer",
]

HostHeaderPolicy = Literal["upstream", "client"]

REFUSED_METHODS = ("TRACE", "TRACK")
"""Methods answered 405 unless a route's `allow_methods` names them: TRACE (and TRACK, IIS's name for it) echoes
the request back, credentials and cookies included (cross-site tracing), so nginx and most hardening guides
refuse it. CONNECT is not here: it is refused on every route, because the gateway does not tunnel."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Every wait of one proxied request, in seconds; each bounds one thing, so each has its own name."""

    connect: float = 5.0
    """Opening a TCP connection to the upstream."""
    response_headers: float = 60.0
    """Until the upstream's response headers arrive: counted from the end of the request body sent upstream, or
    for a request without a body from its dispatch (so it includes the connect time, itself bounded by connect)."""
    upstream_idle: float = 60.0
    """Between two bytes of the upstream's response body, not counting time the client made us wait."""
    upstream_send_stall: float = 60.0
    """The upstream not draining the gateway's send buffer of request body (256 KiB) for this long."""
    client_body_idle: float = 60.0
    """Between two bytes of the client's request body, not counting time the upstream made us wait."""
    client_send_stall: float = 60.0
    """The client not draining the gateway's send buffer of response (64 KiB) for this long (nginx's
    send_timeout)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Size limits on what a client may send."""

    max_request_body_bytes: int = 1 * GiB
    max_request_line_bytes: int = 8 * KiB
    """The request line (method, target, version), not counting its CRLF; beyond it 414 (nginx's
    large_client_header_buffers default, 8k, is the common size URLs are kept under)."""
    max_header_bytes: int = 16 * KiB
    """The header lines together, each counted with its CRLF (the request line is not counted: it has its own
    limit); beyond it 431."""
    max_header_count: int = 100
    """Header lines in one request; beyond it 431."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowControl:
    """Water marks of the request-body pipe: above high the client socket is paused, below low it resumes."""

    high_water: int = 256 * KiB
    low_water: int = 64 * KiB


@dataclass(frozen=True, slots=True, kw_only=True)
class WebSocket:
    """WebSocket on a route: whether an `Upgrade: websocket` request may become a tunnel, and how long one lives."""

    enabled: bool = True
    """Off: such a request is answered 403 (problem+json) and never reaches the upstream."""
    idle_timeout: float = 3600.0
    """Seconds without a byte either way after which an open tunnel is closed."""
    max_lifetime: float = 0.0
    """Seconds after which a tunnel is closed whatever flows through it; 0: no limit."""


DEFAULT_HIDDEN_RESPONSE_HEADERS = frozenset({b"server", b"x-powered-by"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Server:
    """Settings of the client-facing HTTP server, shared by every listener."""

    idle_timeout: float = 60.0
    """Idle time allowed while reading a request head and between keep-alive requests."""
    head_timeout: float = 10.0
    """A request head must be complete this long after its first byte, however steadily it trickles in
    (slowloris); beyond it 408. HAProxy's usual `timeout http-request 10s`: a real client sends its head in one
    round trip, and 10 s still covers a slow mobile link while bounding how long a trickler holds a connection."""
    max_connections: int = 10000
    """Client connections open at once, per process. At the cap the listening sockets stop accepting, so further
    clients wait in the kernel's backlog (as with nginx and HAProxy); one accepted past the cap anyway (in the
    same accept batch) is answered 503."""
    lingering_timeout: float = 5.0
    """How long a rejected request body is read and discarded before the connection is cut (nginx's
    lingering_time): closing with unread data would reset the connection and could destroy the answer."""
    lingering_max_bytes: int = 16 * MiB
    """How much of a rejected request body is read and discarded at most before the connection is cut: a client
    that reads while it sends has its answer long before, and one that never stops sending is cut early."""
    trusted_proxies: Networks = ()
    """Client addresses (networks) whose X-Forwarded-For is kept and appended to; every other client's is
    replaced by its own address, so a client cannot make up the addresses upstreams and logs see."""
    via: str = "gateway"
    """The pseudonym this gateway adds to Via headers; empty adds none."""
    underscores_in_headers: bool = False
    """Whether request headers with an underscore in their name are forwarded. Off, as in nginx: CGI and WSGI
    upstreams read "X_Forwarded_For" and "X-Forwarded-For" as one header, so a client could otherwise spoof a
    header the gateway sets."""
    workers: int = 1
    """Processes serving the listeners: the twistd process and `workers - 1` it starts. Above 1, each process
    binds every listener itself with SO_REUSEPORT and the kernel spreads new connections across them."""
    drain_timeout: float = 30.0
    """On SIGTERM, how long requests in flight may go on once the listeners have stopped accepting; those still
    running then are cut (never finished as if complete)."""
    server_header: str = ""
    """The Server header of every response, the gateway's own answers and relayed ones (replacing the upstream's),
    as nginx sends its own; empty: the gateway sends none of its own."""
    hide_response_headers: frozenset[bytes] = DEFAULT_HIDDEN_RESPONSE_HEADERS
    """Upstream response headers never relayed to clients (lower-cased names; routes may say otherwise): by
    default Server and X-Powered-By, which tell clients the inner stack and its version."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessLog:
    """Where the one JSON line per request goes, and what it may contain."""

    path: str = "-"
    """"-" for stdout (journald under systemd), a file (absolute, or relative to the config file's directory,
    reopened on SIGUSR1 for logrotate), or "" for no access log."""
    query: bool = False
    """Whether query strings are logged: they often carry tokens, so they are left out unless asked for."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Admin:
    """The admin listener: /metrics, /healthz and /readyz, on an address of its own (loopback by default)."""

    host: str = "127.0.0.1"
    port: int = 9901
    """One listener for the whole gateway, whatever `server.workers`: the twistd process answers there for
    every worker."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Listener:
    """One address the gateway accepts clients on: bound by the gateway (host and port), or a listening socket
    systemd passed in (socket activation, by its FileDescriptorName)."""

    host: str = ""
    port: int = 0
    backlog: int = 511
    systemd: str = ""
    """The name of a socket passed by systemd (`FileDescriptorName=` of the .socket unit); "" for host/port."""
    proxy_protocol: bool = False
    """Every connection begins with a PROXY protocol header (v1 or v2, from HAProxy or an L4 load balancer): the
    client address it carries is the one used for X-Forwarded-For, limits and logs. A connection without a
    valid header is closed."""
    proxy_protocol_from: Networks = ()
    """The peers (load balancers) allowed to send a PROXY header; a connection from any other address is closed
    before a byte of it is read. Empty: any peer (with a warning at every start)."""
    tls: ListenerTLS | None = None
    """HTTPS: its certificates and settings; None for plain HTTP."""
    redirect_to_https: int = 0
    """A plain listener that answers every request with a redirect to https on this port (0: it serves)."""

    def describe(self) -> str:
        return f"systemd socket {self.systemd!r}" if self.systemd else f"{self.host}:{self.port}"


Balance = Literal["round_robin", "least_requests", "hash"]


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamServer:
    """One server of an upstream: its address and its share of the requests (its upstream's scheme, base path,
    TLS and timeouts are its own)."""

    host: str
    port: int
    weight: int = 1

    @property
    def address(self) -> str:
        """`host:port`, as logs, metrics and the admin view name it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Ejection:
    """Passive ejection: a server that fails `consecutive_failures` requests in a row is left out for a while,
    longer each time it is ejected again, never leaving fewer than (100 - max_ejected_percent)% of the servers."""

    consecutive_failures: int = 5
    """Failures in a row (connect failure, reset, or a status of `statuses`) that eject a server; 0: never."""
    base_time: float = 30.0
    """The first ejection lasts this; the n-th in a row n times this."""
    max_time: float = 300.0
    """The longest an ejection lasts."""
    max_ejected_percent: int = 50
    """The panic threshold: never more than this share of the servers ejected at once (so one server is never
    ejected: a bad deploy does not leave zero servers)."""
    statuses: frozenset[int] = frozenset({502, 503, 504})
    """Response statuses counted as failures of the server."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheck:
    """Active health checks: a request to each server every `interval`; `unhealthy_threshold` failed checks in
    a row take it out, `healthy_threshold` passed ones bring it back."""

    path: bytes = b"/"
    method: str = "GET"
    host: str = ""
    """The Host header of a check; "": the upstream's (its first server's host and port)."""
    statuses: frozenset[int] = frozenset(range(200, 400))
    interval: float = 10.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryBudget:
    """Retries to one upstream are at most `percent` of its requests over the last `window` seconds (plus
    `min_retries` a window), so a failing upstream is not sent three times its load."""

    percent: int = 20
    window: float = 10.0
    min_retries: int = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class Retries:
    """When a route's request is sent again to another server of its upstream."""

    attempts: int = 2
    """Retries after the first try (0: none)."""
    unsafe_methods: bool = False
    """Whether a 502/503/504 or a reset after the request was sent is retried for methods that are not
    idempotent (POST, PATCH): only for a route whose upstream makes them safe to repeat."""
    max_body_bytes: int = 64 * 1024
    """A request body up to this size is kept as it is sent, to be sent again; a larger one is not retried once
    sent."""
    backoff: float = 0.025
    """The first retry waits up to this (full jitter), each next one twice as long, up to max_backoff."""
    max_backoff: float = 0.25


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    """One upstream service: where it is, and how many connections it may be given."""

    name: str
    scheme: str
    host: str
    port: int
    base_path: bytes
    """Prepended to the path of every request sent to this upstream (no trailing slash; may be empty)."""
    max_connections: int = 256
    """Requests in flight to this upstream at once; more wait in a queue."""
    max_queue: int = 512
    """Requests allowed to wait for a connection; more are answered 503 at once."""
    queue_timeout: float = 10.0
    """How long a request may wait in the queue before it is answered 503."""
    idle_timeout: float = 4.0
    """Idle pooled connections are closed after this, before a typical upstream keep-alive timeout (5 s)."""
    max_idle_connections: int = 64
    """Idle keep-alive connections kept open to this upstream."""
    tls: UpstreamTLS | None = None
    """For an https upstream: how its certificate is verified; None for http."""
    inline: bool = False
    """Given by a route as a URL rather than by name: its name is then that URL, which goes to logs and metrics
    but never into an answer (it would tell clients the inner network's addresses)."""
    servers: tuple[UpstreamServer, ...] = ()
    """Its servers; empty: the one at `host` and `port` (an upstream given by one `url`). `host` and `port` are
    the first server's otherwise (the Host header sent upstream)."""
    balance: Balance = "round_robin"
    hash_on: str = "client_address"
    """What `balance = "hash"` hashes: "consumer", "client_address", "header:NAME" or "cookie:NAME"."""
    max_requests_per_server: int = 0
    """Circuit breaking: requests in flight to one server at once; at the cap it is passed over, and with every
    server at its cap the answer is a fast 503. 0: no cap but the upstream's `max_connections`."""
    ejection: Ejection = Ejection()
    retry_budget: RetryBudget = RetryBudget()
    health_check: HealthCheck | None = None
    """Active health checks; None: off."""
    resolve: float = 0.0
    """Seconds between two resolutions of the `url`'s host name, each address one server; 0: the name is one
    server, resolved at each connect."""

    @property
    def members(self) -> tuple[UpstreamServer, ...]:
        """Every server of the upstream (one, for an upstream given by a `url`)."""
        return self.servers or (UpstreamServer(host=self.host, port=self.port),)

    @property
    def origin(self) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}".encode("ascii")


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """Requests whose host and path match go to one upstream, with these timeouts and limits."""

    name: str
    host: str | None
    """Exact host name (case-insensitive, port ignored) or `*.suffix`; None matches any host."""
    path_prefix: bytes
    upstream: Upstream
    strip_prefix: bool = False
    host_header: HostHeaderPolicy = "upstream"
    allow_methods: frozenset[str] = frozenset()
    """Methods of REFUSED_METHODS this route forwards all the same (other methods always pass; CONNECT never)."""
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    flow_control: FlowControl = FlowControl()
    admission: RouteAdmission = NOBODY
    """Who may use the route; the default (for routes built in code) admits nobody."""
    strict_transport_security: bytes = b""
    """The Strict-Transport-Security header added to its responses over TLS (never over plain HTTP, RFC 6797);
    empty adds none (an upstream's own passes through)."""
    hide_response_headers: frozenset[bytes] = DEFAULT_HIDDEN_RESPONSE_HEADERS
    """Upstream response headers not relayed on this route (lower-cased names); empty relays them all."""
    websocket: WebSocket = WebSocket()
    cors: CorsPolicy | None = None
    """The route's CORS policy (`[routes.cors]`); None answers no preflight and adds no CORS header."""
    retries: Retries = Retries()


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """A whole, validated gateway configuration."""

    source: str
    server: Server
    limits: Limits
    listeners: tuple[Listener, ...]
    upstreams: Mapping[str, Upstream]
    routes: tuple[Route, ...]
    admission: Admission = DEFAULT_ADMISSION
    access_log: AccessLog = AccessLog()
    admin: Admin | None = None
    """None: no admin listener (no [admin] table in the file)."""
    limit_store: LimitStoreSettings = LOCAL_STORE
    """Where rate and concurrency counts live (`[limits.store]`)."""
    text: bytes = field(default=b"", repr=False, compare=False)
    """The file's bytes this config was read from (b"" for one built from a mapping): what the worker processes
    are given, so that every process serves exactly what the twistd process read and checked."""
