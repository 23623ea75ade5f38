"""Read the TOML config file into frozen, typed objects.

Rule: a config either loads whole or not at all; when it does not, every error in it is reported at once, one per
line, each naming the file, the key path and the reason
(`etc/gateway.toml: routes["events"].timeouts.connect: must be a positive number of seconds, got -1`). Routes are
named in key paths by their name, listeners by their address, upstreams, consumers and methods by their table's
name. Nothing here touches the network or the reactor, so a reload can validate a file before anything changes.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit

from gateway.addresses import Networks
from gateway.auth.settings import (
    ADMISSION_KEYS,
    DEFAULT_ADMISSION,
    NOBODY,
    ROUTE_ADMISSION_KEYS,
    Admission,
    RouteAdmission,
    parse_admission,
    parse_route_admission,
)
from gateway.config.store import LOCAL_STORE, LimitStoreSettings, limit_store
from gateway.config.tls import ListenerTLS, UpstreamTLS, hsts_value, listener_tls, upstream_tls
from gateway.config.values import (
    ConfigError,
    Errors,
    Fields,
    GiB,
    Invalid,
    KiB,
    MiB,
    Table,
    boolean,
    describe,
    nonempty_string,
    positive_int,
    positive_seconds,
    positive_size,
    read_fields,
    string,
)
from gateway.paths import PathRefused, routing_path

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "AccessLog",
    "Admin",
    "Config",
    "ConfigError",
    "FlowControl",
    "GiB",
    "KiB",
    "Limits",
    "Listener",
    "MiB",
    "Route",
    "Server",
    "Timeouts",
    "Upstream",
    "load",
    "load_text",
    "parse",
]

HostHeaderPolicy = Literal["upstream", "client"]

REFUSED_METHODS = ("TRACE", "TRACK")
"""Methods answered 405 unless a route's `allow_methods` names them: TRACE (and TRACK, IIS's name for it) echoes
the request back, credentials and cookies included (cross-site tracing), so nginx and most hardening guides
refuse it. CONNECT is not here: it is refused on every route, because the gateway does not tunnel."""
_D = TypeVar("_D", bound="DataclassInstance")
"""A section's dataclass."""


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


def load(path: Path | str) -> Config:
    """Read and validate the TOML file at `path`."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read the file: {e.strerror or e}") from None
    return load_text(text, source=path)


def load_text(text: bytes, *, source: Path | str) -> Config:
    """Validate the bytes of a TOML config file read from `source` (which names it in errors, and which relative
    paths in it are relative to)."""
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(source, "", f"not valid UTF-8: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "", f"not valid TOML: {e}") from None
    return replace(parse(data, source=source), text=text)


def parse(data: Mapping[str, Any], *, source: Path | str) -> Config:
    """Validate an already-decoded config mapping; pure, so tests feed it dicts. Every error is reported, in one
    `ConfigError`."""
    top = Table(data, "", source, Errors())
    top.known(_TOP_KEYS)
    server = _section(top, "server", Server, _SERVER_FIELDS)
    timeouts = _section(top, "timeouts", Timeouts, _TIMEOUT_FIELDS)
    limits_table = top.table("limits")
    store = LOCAL_STORE
    if limits_table is not None:
        limits_table.known(("store",))
        store = limit_store(limits_table.table("store"), source)
    limits = read_fields(limits_table, Limits(), _LIMIT_FIELDS)
    flow = _section(top, "flow_control", FlowControl, _FLOW_FIELDS)
    _check_flow(flow, top, "flow_control")
    listeners = _listeners(top, server)

    upstreams: dict[str, Upstream] = {}
    for name, table in top.named_tables("upstreams"):
        upstream = table.attempt(partial(_upstream, name))
        if upstream is not None:
            upstreams[name] = upstream

    admission = parse_admission(top)
    routes: list[Route] = []
    names: set[str] = set()
    tables = top.tables("routes", required=True, name=_route_name)
    if not tables and top.valid("routes"):
        top.report("routes", "at least one route is needed")
    for table in tables:
        route = table.attempt(
            partial(_route, upstreams=upstreams, defaults=(server, timeouts, limits, flow, admission))
        )
        if route is not None and route.name in names:
            table.report("name", f"route name {route.name!r} is used twice")
        elif route is not None:
            names.add(route.name)
            routes.append(route)
    access_log = _access_log(top.table("access_log"), source)
    admin = _admin(top.table("admin"))
    top.finish()
    top.errors.check()
    return Config(
        source=str(source),
        server=server,
        limits=limits,
        limit_store=store,
        listeners=listeners,
        upstreams=MappingProxyType(upstreams),
        routes=tuple(routes),
        admission=admission,
        access_log=access_log,
        admin=admin,
    )


_TOP_KEYS = (
    "server",
    "timeouts",
    "limits",
    "flow_control",
    "listeners",
    "upstreams",
    "routes",
    "access_log",
    "admin",
    *ADMISSION_KEYS,
)


def _listeners(top: Table, server: Server) -> tuple[Listener, ...]:
    """The listeners, each named in errors by its address (`listeners["127.0.0.1:8080"]`); none listed twice."""
    tables = top.tables("listeners", required=True, name=_listener_name)
    if not tables and top.valid("listeners"):
        top.report("listeners", "at least one listener is needed")
    listeners = []
    seen_addresses: set[tuple[str, int]] = set()
    for table in tables:
        listener = table.attempt(_listener)
        if listener is None:
            continue
        address = (listener.host, listener.port) if not listener.systemd else (listener.systemd, -1)
        if (listener.port or listener.systemd) and address in seen_addresses:
            table.report("", f"{listener.describe()} is listed twice")
        seen_addresses.add(address)
        if server.workers > 1 and not listener.systemd and listener.port == 0:
            table.report(
                "port",
                f"must not be 0 when server.workers is above 1 (it is {server.workers}): each worker process "
                "binds its own socket with SO_REUSEPORT, so port 0 would give each process a different port",
            )
        listeners.append(listener)
    return tuple(listeners)


def _listener_name(data: Mapping[str, Any]) -> str | None:
    """How a listener is named in errors: its address as written ("127.0.0.1:8080", "[::]:443"), or its systemd
    socket ("systemd:http")."""
    host, port, systemd = data.get("host"), data.get("port"), data.get("systemd")
    if isinstance(systemd, str) and systemd:
        return f"systemd:{systemd}"
    if isinstance(host, str) and host and isinstance(port, int) and not isinstance(port, bool):
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return None


def _route_name(data: Mapping[str, Any]) -> str | None:
    name = data.get("name")
    return name if isinstance(name, str) and name.strip() else None


# --- value readers: each turns one raw TOML value into a typed value or says why it cannot ---------------


_MIN_REQUEST_LINE = len(b"OPTIONS * HTTP/1.1")


def _request_line_size(value: object) -> int:
    """A request-line limit: one too small for "OPTIONS * HTTP/1.1" would refuse every request with 414."""
    size = positive_size(value)
    if size < _MIN_REQUEST_LINE:
        raise ValueError(f'must be at least {_MIN_REQUEST_LINE} bytes (room for "OPTIONS * HTTP/1.1"), got {value!r}')
    return size


def _port(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ValueError(f"must be a port number from 0 to 65535, got {value!r}")
    return value


def _via_name(value: object) -> str:
    text = string(value)
    if text and not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", text):
        raise ValueError(f"must be a single token (letters, digits, -._~ and the like), got {text!r}")
    return text


def _server_header(value: object) -> str:
    text = string(value)
    if not re.fullmatch(r"[\x21-\x7e]([\x20-\x7e]{0,254}[\x21-\x7e])?|", text):
        raise ValueError(f'must be visible ASCII (such as "gateway"), at most 256 bytes, got {text!r}')
    return text


# Headers that make or frame a response (or that the gateway sets itself): hiding them would break it.
_NEVER_HIDDEN = frozenset({b"content-length", b"transfer-encoding", b"connection", b"content-type", b"x-request-id"})


def _header_names(value: object) -> frozenset[bytes]:
    """An array of header names ("X-Powered-By"), kept lower-cased; [] for none."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f'must be an array of header names such as ["Server", "X-Powered-By"], got {describe(value)}')
    names = set()
    for text in value:
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", text):
            raise ValueError(f"{text!r} is not a header name")
        name = text.lower().encode("ascii")
        if name in _NEVER_HIDDEN:
            raise ValueError(f"{text!r} frames or identifies the response and cannot be hidden")
        names.add(name)
    return frozenset(names)


def _interface(value: object) -> str:
    text = nonempty_string(value)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f'must be an IP address such as "127.0.0.1", "0.0.0.0" or "::", got {text!r}') from None
    return text


def _host_pattern(value: object) -> str:
    text = nonempty_string(value).lower()
    body = text[2:] if text.startswith("*.") else text
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", body):
        raise ValueError(f'must be a host name such as "api.example.com" or "*.example.com", got {value!r}')
    return text


def _path_prefix(value: object) -> bytes:
    text = nonempty_string(value)
    if not text.startswith("/"):
        raise ValueError(f'must start with "/", got {text!r}')
    if not re.fullmatch(r"[!$&'()*+,;=:@/A-Za-z0-9._~%-]+", text):
        raise ValueError(f"must contain only URL path characters (percent-encode the rest), got {text!r}")
    # What requests are refused for (gateway/routing.py) a prefix may not have either: no request could match.
    if re.search(r"%(?![0-9A-Fa-f]{2})|%00", text):
        raise ValueError(f'must have only "%" escapes of two hex digits, and no %00, got {text!r}')
    if ";" in text:
        raise ValueError(f'must not contain ";" (path parameters are not part of the path routed on), got {text!r}')
    spelt = re.sub(r"%2[eE]", ".", re.sub(r"%(2[fF]|5[cC])", "/", text))
    if any(segment in (".", "..") for segment in spelt.split("/")):
        raise ValueError(f'must not have a "." or ".." segment, got {text!r}')
    prefix = text.encode("ascii")
    try:
        routing_path(prefix)  # the router's own check, which the ones above spell out for the usual mistakes
    except PathRefused as e:
        reason = str(e).split("; ")[0]  # without the advice to clients
        raise ValueError(f"must be a path requests could be routed by, but {reason}, got {text!r}") from None
    return prefix


_EXTRA_METHODS = ", ".join(f'"{m}"' for m in REFUSED_METHODS)


def _allowed_methods(value: object) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f'must be an array of method names such as ["TRACE"], got {describe(value)}')
    for method in value:
        if method.upper() == "CONNECT":
            raise ValueError(
                "CONNECT cannot be allowed: the gateway does not tunnel (it is not a forward proxy), so CONNECT "
                "is answered 405 on every route"
            )
        if method.upper() not in REFUSED_METHODS:
            raise ValueError(
                f"may name only methods refused by default ({_EXTRA_METHODS}); every other method is "
                f"forwarded already, got {method!r}"
            )
    return frozenset(m.upper() for m in value)


def _host_header_policy(value: object) -> HostHeaderPolicy:
    if value == "upstream":
        return "upstream"
    if value == "client":
        return "client"
    raise ValueError(f'must be "upstream" (send the upstream\'s host) or "client" (pass the client\'s), got {value!r}')


_SERVER_FIELDS: Fields = {
    "idle_timeout": positive_seconds,
    "head_timeout": positive_seconds,
    "max_connections": positive_int,
    "lingering_timeout": positive_seconds,
    "lingering_max_bytes": positive_size,
    "via": _via_name,
    "server_header": lambda value: _server_header(value),
    "hide_response_headers": lambda value: _header_names(value),
    "underscores_in_headers": boolean,
    "workers": positive_int,
    "drain_timeout": positive_seconds,
    "trusted_proxies": lambda value: _networks(value),
}
_TIMEOUT_FIELDS: Fields = {f.name: positive_seconds for f in fields(Timeouts)}
_LIMIT_FIELDS: Fields = {
    "max_request_body_bytes": positive_size,
    "max_request_line_bytes": _request_line_size,
    "max_header_bytes": positive_size,
    "max_header_count": positive_int,
}
_ROUTE_LIMIT_FIELDS: Fields = {"max_request_body_bytes": positive_size}
_FLOW_FIELDS: Fields = {"high_water": positive_size, "low_water": positive_size}
_UPSTREAM_FIELDS: Fields = {
    "max_connections": positive_int,
    "max_queue": positive_int,
    "queue_timeout": positive_seconds,
    "idle_timeout": positive_seconds,
    "max_idle_connections": positive_int,
}


def _section(top: Table, key: str, kind: type[_D], readers: Fields) -> _D:
    return read_fields(top.table(key), kind(), readers)


def _check_flow(flow: FlowControl, t: Table, key: str) -> None:
    """low_water below high_water; not checked when a water mark, here or at the top level, was refused (the
    default put in its place would be compared)."""
    if t.failed(key) or t.errors.about(t.source, "flow_control"):
        return
    if flow.low_water >= flow.high_water:
        t.report(f"{key}.low_water", f"must be below high_water ({flow.low_water} >= {flow.high_water})")


def _redirect_port(value: object) -> int:
    if value is True:
        return 443
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    raise ValueError(f"must be true (https on port 443) or the https port number, got {value!r}")


_LISTENER_KEYS = (
    "host",
    "port",
    "backlog",
    "systemd",
    "proxy_protocol",
    "proxy_protocol_from",
    "tls",
    "redirect_to_https",
)


def _listener(t: Table) -> Listener:
    t.known(_LISTENER_KEYS)
    proxy_protocol = t.get("proxy_protocol", boolean, False)
    proxy_protocol_from: Networks = t.get("proxy_protocol_from", _networks, ())
    if proxy_protocol_from and not proxy_protocol and t.valid("proxy_protocol"):
        t.report("proxy_protocol_from", "lists who may send a PROXY header; it needs proxy_protocol = true")
    tls_table = t.table("tls")
    tls = listener_tls(tls_table) if tls_table is not None else None
    redirect = 0
    if t.has("redirect_to_https") and t.get("redirect_to_https", lambda v: v) is not False:
        if tls_table is not None:
            t.report("redirect_to_https", "is for a plain HTTP listener; this one serves HTTPS itself")
        else:
            redirect = t.get("redirect_to_https", _redirect_port, 0)
    if t.has("systemd"):
        for key in ("host", "port", "backlog"):
            if t.has(key):
                t.report(key, "a systemd socket's address and backlog are set in its .socket unit, not here")
        name = t.require("systemd", nonempty_string)
        t.finish()
        if name is None:
            raise Invalid()
        return Listener(
            systemd=name,
            proxy_protocol=proxy_protocol,
            proxy_protocol_from=proxy_protocol_from,
            tls=tls,
            redirect_to_https=redirect,
        )
    host = t.require("host", _interface)
    port = t.require("port", _port)
    backlog = t.get("backlog", positive_int, 511)
    t.finish()
    if host is None or port is None:
        raise Invalid()
    return Listener(
        host=host,
        port=port,
        backlog=backlog,
        proxy_protocol=proxy_protocol,
        proxy_protocol_from=proxy_protocol_from,
        tls=tls,
        redirect_to_https=redirect,
    )


def _networks(value: object) -> Networks:
    """An array of addresses or networks ("10.0.0.0/8", "::1")."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f'must be an array of addresses or networks such as ["10.0.0.0/8", "::1"], got {value!r}')
    networks = []
    for text in value:
        try:
            networks.append(ipaddress.ip_network(text, strict=True))
        except ValueError as e:
            raise ValueError(f"{text!r} is not an address or network ({e})") from None
    return tuple(networks)


def _access_log(t: Table | None, source: Path | str) -> AccessLog:
    if t is None:
        return AccessLog()
    t.known(("path", "query"))
    path = t.get("path", string, "-")
    if path not in ("-", ""):
        # Relative to the config file, as the credentials file is: the service's directory is not the config's.
        path = str(Path(source).parent / path)
        if not Path(path).parent.is_dir():
            t.report("path", f"the directory of {path!r} does not exist")
        elif Path(path).is_dir():
            t.report("path", f"{path!r} is a directory; name a file in it")
        elif not (os.access(path, os.W_OK) if Path(path).exists() else os.access(Path(path).parent, os.W_OK)):
            t.report("path", f"{path!r} cannot be written by this user")
    log = AccessLog(path=path, query=t.get("query", boolean, False))
    t.finish()
    return log


def _admin(t: Table | None) -> Admin | None:
    if t is None:
        return None
    t.known(("host", "port"))
    admin = Admin(host=t.get("host", _interface, "127.0.0.1"), port=t.get("port", _port, 9901))
    t.finish()
    return admin


def _upstream_url(t: Table, key: str) -> tuple[str, str, int, bytes]:
    text = t.get(key, nonempty_string)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise t.error(key, f'must be an http or https URL such as "http://127.0.0.1:8081", got {text!r}')
    if parts.query or parts.fragment or parts.username or parts.password:
        raise t.error(key, f"must not carry a query, fragment or credentials, got {text!r}")
    try:
        port = (443 if parts.scheme == "https" else 80) if parts.port is None else parts.port
    except ValueError:
        raise t.error(key, f"has an invalid port, got {text!r}") from None
    if port == 0:
        raise t.error(key, f"must name a port from 1 to 65535, got {text!r}")
    base = parts.path.rstrip("/")
    if base and not re.fullmatch(r"[!$&'()*+,;=:@/A-Za-z0-9._~%-]+", base):
        raise t.error(key, f"has a path with characters that must be percent-encoded, got {text!r}")
    return parts.scheme, parts.hostname, port, base.encode("ascii")


_UPSTREAM_KEYS = ("url", "tls", *_UPSTREAM_FIELDS)


def _upstream(name: str, t: Table) -> Upstream:
    t.known(_UPSTREAM_KEYS)
    try:
        where: tuple[str, str, int, bytes] | None = _upstream_url(t, "url")
    except Invalid:
        where = None  # refused: the rest is read all the same, for its own errors
    tls_table = t.table("tls")
    if where is not None and where[0] == "http" and tls_table is not None:
        t.report("tls", "is for an https upstream; this one's url is http")
    tls = upstream_tls(tls_table) if where is None or where[0] == "https" else None
    pool = read_fields(t, Upstream(name=name, scheme="", host="", port=0, base_path=b""), _UPSTREAM_FIELDS)
    if where is None:
        raise Invalid()
    scheme, host, port, base = where
    return replace(pool, scheme=scheme, host=host, port=port, base_path=base, tls=tls)


_ROUTE_KEYS = (
    "name",
    "upstream",
    "host",
    "path_prefix",
    "strip_prefix",
    "host_header",
    "allow_methods",
    "timeouts",
    "limits",
    "flow_control",
    "strict_transport_security",
    "hide_response_headers",
    *ROUTE_ADMISSION_KEYS,
)


def _route(
    t: Table,
    *,
    upstreams: dict[str, Upstream],
    defaults: tuple[Server, Timeouts, Limits, FlowControl, Admission],
) -> Route:
    server, timeouts, limits, flow, admission = defaults
    t.known(_ROUTE_KEYS)
    name = t.require("name", nonempty_string)
    upstream = _route_upstream(t, upstreams)
    route_flow = read_fields(t.table("flow_control"), flow, _FLOW_FIELDS)
    _check_flow(route_flow, t, "flow_control")
    try:
        route_admission: RouteAdmission | None = parse_route_admission(t, admission)
    except Invalid:
        route_admission = None
    host = t.get("host", _host_pattern) if t.has("host") else None
    path_prefix = t.get("path_prefix", _path_prefix, b"/")
    strip_prefix = t.get("strip_prefix", boolean, False)
    host_header: HostHeaderPolicy = t.get("host_header", _host_header_policy, "upstream")
    allow_methods: frozenset[str] = t.get("allow_methods", _allowed_methods, frozenset())
    route_timeouts = read_fields(t.table("timeouts"), timeouts, _TIMEOUT_FIELDS)
    route_limits = read_fields(t.table("limits"), limits, _ROUTE_LIMIT_FIELDS)
    hsts = t.get("strict_transport_security", hsts_value, b"")
    hidden = t.get("hide_response_headers", _header_names, server.hide_response_headers)
    t.finish()
    if name is None or upstream is None or route_admission is None:
        raise Invalid()
    return Route(
        name=name,
        host=host,
        path_prefix=path_prefix,
        upstream=upstream,
        strip_prefix=strip_prefix,
        host_header=host_header,
        allow_methods=allow_methods,
        timeouts=route_timeouts,
        limits=route_limits,
        flow_control=route_flow,
        admission=route_admission,
        strict_transport_security=hsts,
        hide_response_headers=hidden,
    )


def _route_upstream(t: Table, upstreams: dict[str, Upstream]) -> Upstream | None:
    """The upstream a route names, or gives as a URL; None when there is none (reported, unless the upstream it
    names was itself refused: that is reported already)."""
    target = t.require("upstream", nonempty_string)
    if target is None:
        return None
    if "://" in target:
        try:
            scheme, host, port, base = _upstream_url(t, "upstream")
        except Invalid:
            return None
        # Routes naming the same URL share one upstream (one pool); the URL is its name.
        return upstreams.setdefault(
            target,
            Upstream(
                name=target,
                scheme=scheme,
                host=host,
                port=port,
                base_path=base,
                tls=UpstreamTLS() if scheme == "https" else None,
                inline=True,
            ),
        )
    if target in upstreams:
        return upstreams[target]
    if not t.errors.about(t.source, f"upstreams.{target}"):
        known = ", ".join(sorted(upstreams)) or "none are defined"
        t.report("upstream", f"no upstream named {target!r} (known: {known}); give a name or a URL")
    return None
