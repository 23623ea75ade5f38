"""The head-time decision: may this request go upstream, and where? Decided before a byte of body is read.

Rule: everything that can refuse a request looks only at its head (method, target, headers, declared length),
so a refused upload is answered without being read, without `100 Continue`, and without touching an upstream.
This is the one place such decisions are made: authentication, authorisation and rate limits join here, as
further checks that return a `Reject`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from twisted.web.http_headers import Headers

from gateway.config import Route
from gateway.errors import BadRequest, BodyTooLarge, GatewayError, NoRoute
from gateway.routing import Router, host_without_port, upstream_target

__all__ = ["Admit", "Reject", "RequestHead", "decide"]

_TARGET = re.compile(rb"[\x21-\x7e]+")
"""What a request target may contain (RFC 9112 section 3.2): anything else is percent-encoded by a client."""


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What is known of a request when its head is complete."""

    method: bytes
    target: bytes
    version: bytes
    headers: Headers
    declared_length: int | None
    """The Content-Length, 0 when there is no body, None for a chunked body of unknown length."""


@dataclass(frozen=True, slots=True)
class Admit:
    """Go ahead: send the request to `route`'s upstream with this request target."""

    route: Route
    upstream_target: bytes


@dataclass(frozen=True, slots=True)
class Reject:
    """Answer the client with `error` and never contact an upstream."""

    error: GatewayError


def decide(head: RequestHead, router: Router) -> Admit | Reject:
    """Route and check one request head."""
    if not head.target.startswith(b"/"):
        # Absolute-form and authority-form targets are what a forward proxy takes; the gateway is not one.
        return Reject(BadRequest("the request target must be a path (origin-form), such as /reports/1"))
    if not _TARGET.fullmatch(head.target):
        return Reject(BadRequest("the request target may contain only visible ASCII characters"))
    hosts = head.headers.getRawHeaders(b"host")
    if head.version == b"HTTP/1.1" and (not hosts or len(hosts) != 1):
        return Reject(BadRequest("an HTTP/1.1 request must carry exactly one Host header (RFC 9112 section 3.2)"))
    host = host_without_port(hosts[0]) if hosts else None
    path = head.target.partition(b"?")[0]
    route = router.match(host, path)
    if route is None:
        return Reject(NoRoute(f"no route matches host {host or '(none)'} and this path"))
    limit = route.limits.max_request_body_bytes
    if head.declared_length is not None and head.declared_length > limit:
        return Reject(
            BodyTooLarge(f"the request body of {head.declared_length} bytes is over this route's {limit}-byte limit")
        )
    return Admit(route, upstream_target(route, head.target))
