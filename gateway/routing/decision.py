"""The head-time decision: may this request go upstream, and where? Decided before a byte of body is read.

Rule: everything that can refuse a request looks only at its head (method, target, headers, declared length),
so a refused upload is answered without being read, without `100 Continue`, and without touching an upstream.
Routing and the checks of the head's form are made here; who may call (authentication, authorisation, rate
limits) is decided after, on the same head, by `gateway.auth.gatekeeper`, which the exchange asks next.

Second rule: the gateway is a reverse proxy and never a forward one. It contacts only the upstream of the route
the Host header and path select: CONNECT is answered 405 (there is no tunnelling), TRACE and TRACK 405 unless
the route allows them; an absolute-form target ("http://host/path") is taken as its path only when it names
the Host header's host, else 400; a path that could resolve outside its route's prefix is 400 (see
`gateway.routing.router`). Refusals of the request's form (400, 405) also close the connection.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from gateway.config import REFUSED_METHODS, Route
from gateway.errors import (
    BadRequest,
    BodyTooLarge,
    GatewayError,
    HttpsRedirect,
    MethodNotAllowed,
    NoRoute,
    NotSupported,
)
from gateway.http1.fields import HeaderLookup
from gateway.routing.paths import PathRefused, routing_path
from gateway.routing.router import Router, host_without_port, upstream_target

__all__ = ["FORWARDED_METHODS", "Admit", "Reject", "RequestHead", "decide", "https_redirect"]

_TARGET: Final = re.compile(rb"[\x21-\x7e]+")
"""What a request target may contain (RFC 9112 section 3.2): anything else is percent-encoded by a client."""
_ABSOLUTE: Final = re.compile(rb"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)", re.DOTALL)
"""An absolute-form target: scheme, authority, then the path and query (either may be empty)."""
_DEFAULT_PORTS: Final = {b"http": 80, b"https": 443}
_PORT: Final = re.compile(rb"[0-9]{1,5}")
_HOST: Final = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=-]*)(?::[0-9]*)?")
"""A Host value: uri-host [":" port] (RFC 9110 section 7.2); reg-name may be empty, as it is for a URI without one.
Percent-encoding, which a reg-name allows, is refused: "%61dmin.example.com" would be routed as another host than
the one an upstream decodes."""

FORWARDED_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
"""The methods named in a 405's Allow header, with the route's own extras: the standard methods the gateway
forwards (it forwards any other method token too, except those it refuses)."""

_METHOD_NAMES: Final = {method.encode("ascii"): method for method in FORWARDED_METHODS}
"""The common methods' names, without decoding them on each request."""

# RequestHead and Admit, made once per request, are plain classes rather than dataclasses: the compiled build
# (setup.py) compiles a class's own __init__, but a dataclass's is generated at import and stays interpreted.


class RequestHead:
    """What is known of a request when its head is complete."""

    __slots__ = ("declared_length", "headers", "method", "target", "version")

    def __init__(
        self, method: bytes, target: bytes, version: bytes, headers: HeaderLookup, declared_length: int | None
    ) -> None:
        self.method: Final = method
        self.target: Final = target
        self.version: Final = version
        self.headers: Final = headers
        self.declared_length: Final = declared_length
        """The Content-Length, 0 when there is no body, None for a chunked body of unknown length."""


class Admit:
    """Go ahead: send the request to `route`'s upstream with this request target."""

    __slots__ = ("route", "upstream_target")

    def __init__(self, route: Route, upstream_target: bytes) -> None:
        self.route: Final = route
        self.upstream_target: Final = upstream_target

    def __repr__(self) -> str:
        return f"Admit(route={self.route.name!r}, upstream_target={self.upstream_target!r})"


@dataclass(frozen=True, slots=True)
class Reject:
    """Answer the client with `error` and never contact an upstream."""

    error: GatewayError
    route: Route | None = None
    """The route the request matched, when it got that far (for the access log and metrics)."""


def decide(head: RequestHead, router: Router) -> Admit | Reject:
    """Route and check one request head.

    The order matters only for which error a request with several faults gets: the form of the request comes
    first (target bytes, CONNECT, the target's form, Host), then the path, the route, the method and the size.
    """
    if not _TARGET.fullmatch(head.target):
        return Reject(BadRequest("the request target may contain only visible ASCII characters"))
    # Methods are case-sensitive, but an upstream may not be: "connect" is refused as CONNECT is.
    method = _METHOD_NAMES.get(head.method) or head.method.decode("latin-1").upper()
    if method == "CONNECT":
        # Tunnelling is what a forward proxy does; the gateway is not one, whatever the target or route.
        return Reject(MethodNotAllowed("CONNECT is not served: this gateway is not a forward proxy", _allow(None)))
    hosts = head.headers.getRawHeaders(b"host")
    if head.version == b"HTTP/1.1" and (not hosts or len(hosts) != 1):
        return Reject(BadRequest("an HTTP/1.1 request must carry exactly one Host header (RFC 9112 section 3.2)"))
    host = None
    if hosts:
        host = _host_name(hosts)
        if host is None:
            # Two Hosts (HTTP/1.0 too), or one that is no host[:port] ("a, b", a control byte): which one would
            # the upstream, a cache or a log believe? Refused rather than guessed (RFC 9112 section 3.2).
            return Reject(BadRequest("the Host header must be one host name or address, with an optional port"))
    target = head.target
    if not target.startswith(b"/"):  # origin-form (most requests) passes as it is, without a call
        origin = _origin_form(target, hosts[0] if hosts else None, method)
        if isinstance(origin, GatewayError):
            return Reject(origin)
        target = origin
    try:
        path = routing_path(target.partition(b"?")[0])
    except PathRefused as e:
        return Reject(BadRequest(str(e)))
    route = router.match(host, path)
    if route is None:
        return Reject(NoRoute(f"no route matches host {host or '(none)'} and this path"))
    if method in REFUSED_METHODS and method not in route.allow_methods:
        return Reject(MethodNotAllowed(f"{method} is not allowed on this route", _allow(route)), route)
    limit = route.limits.max_request_body_bytes
    if head.declared_length is not None and head.declared_length > limit:
        return Reject(
            BodyTooLarge(f"the request body of {head.declared_length} bytes is over this route's {limit}-byte limit"),
            route,
        )
    return Admit(route, upstream_target(route, target))


_HOST_NAMES: Final[dict[bytes, str]] = {}
"""Host values seen, each checked once per process -> the host name they are routed by (a gateway sees a few)."""
_HOST_NAMES_KEPT: Final = 1024
"""How many `_HOST_NAMES` keeps: the Host values a client makes up are checked each time, never kept."""


def _host_name(hosts: Sequence[bytes]) -> str | None:
    """The host name one Host header names, to route by; None when there are several or it is no host[:port]."""
    if len(hosts) != 1:
        return None
    value = hosts[0]
    name = _HOST_NAMES.get(value)
    if name is None:
        if not _HOST.fullmatch(value):
            return None
        name = host_without_port(value)
        if len(_HOST_NAMES) < _HOST_NAMES_KEPT:
            _HOST_NAMES[value] = name
    return name


def _allow(route: Route | None) -> tuple[str, ...]:
    extras = () if route is None else tuple(m for m in REFUSED_METHODS if m in route.allow_methods)
    return FORWARDED_METHODS + extras


def _origin_form(target: bytes, host: bytes | None, method: str) -> bytes | GatewayError:
    """The target in origin-form ("/path?query"), or the error that refuses it.

    Origin-form passes as it is. Absolute-form ("http://host/path", RFC 9112 section 3.2.2, which a server
    must accept) passes as its path and query when its authority is the Host header's: the request is routed
    and forwarded by Host as any other, never to the host the target names. Asterisk-form ("OPTIONS *") asks
    about the gateway itself, which has nothing to say: 501 (with another method it is malformed: 400, as
    nginx answers). Authority-form (for CONNECT, refused before) and anything else: 400.
    """
    if target.startswith(b"/"):
        return target
    if target == b"*" and method == "OPTIONS":
        return NotSupported("a server-wide OPTIONS * is not supported; ask OPTIONS of a path")
    absolute = _ABSOLUTE.fullmatch(target)
    if absolute is None:
        return BadRequest("the request target must be a path (origin-form), such as /reports/1")
    scheme, authority, rest = absolute.groups()
    default_port = _DEFAULT_PORTS.get(scheme.lower())
    if default_port is None:
        return BadRequest("an absolute request target must be an http or https URL")
    if host is None:
        return BadRequest("an absolute request target needs a Host header naming the same host")
    target_authority = _authority(authority, default_port)
    if target_authority is None or target_authority != _authority(host.strip(), default_port):
        return BadRequest("the host in the absolute request target differs from the Host header")
    if rest.startswith(b"#"):
        rest = b""
    return rest if rest.startswith(b"/") else b"/" + rest


def _authority(value: bytes, default_port: int) -> tuple[bytes, int] | None:
    """(lower-cased host, port) of an authority, the scheme's default port when none is given; None if it is
    not one (empty, with user info, or with a bad port)."""
    if not value or b"@" in value:
        return None
    if value.startswith(b"["):
        end = value.find(b"]")
        if end == -1:
            return None
        name, port = value[: end + 1], value[end + 1 :]
        if port and not port.startswith(b":"):
            return None
        port = port[1:]
    else:
        name, _, port = value.partition(b":")
    if not name or (port and (not _PORT.fullmatch(port) or int(port) > 65535)):
        return None
    return name.lower(), int(port) if port else default_port


def https_redirect(method: bytes, target: bytes, headers: HeaderLookup, port: int) -> GatewayError:
    """The redirect of a plain listener: the Host's name (its port replaced), then the target as sent."""
    hosts = headers.getRawHeaders(b"host")
    if not hosts:
        return BadRequest("a request to an HTTPS-only address needs a Host header to be redirected")
    host = host_without_port(hosts[0]).encode("ascii")  # checked by `decide`; an IPv6 literal keeps its brackets
    if not host:
        return BadRequest("a request to an HTTPS-only address needs a Host header to be redirected")
    authority = host if port == 443 else b"%s:%d" % (host, port)
    path = target if target.startswith(b"/") else b"/"
    return HttpsRedirect(b"https://" + authority + path, method)
