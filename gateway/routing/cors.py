"""A route's CORS policy (the Fetch standard's CORS protocol, https://fetch.spec.whatwg.org/#http-cors-protocol),
compiled once when the config is read and applied to a request's head and to the head of each answer.

Rules this module keeps:
* A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is answered by the gateway, before
  authentication and rate limits (a browser sends it without credentials) and without reaching the upstream: 204
  with the CORS headers when the origin, the method and every requested header are allowed; otherwise 403
  problem+json without CORS headers (the browser then refuses the real request, as it should).
* An actual response, the upstream's or the gateway's own (401, 429, 502 ...), gets `Access-Control-Allow-Origin`
  naming the request's origin when that origin is allowed, and `*` only when every origin is allowed without
  credentials (a credentialed response must name its origin). Its `Vary` gains `Origin` whenever the answer depends
  on the origin, merged with what the upstream put there; with `*` it does not depend on it, and every response
  carries the same headers, as the standard advises for caches.
* The policy is frozen; a request without `Origin` costs one header lookup, and a route without a policy nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.errors import CorsRefused
from gateway.http1.fields import Fields, HeaderLookup

__all__ = ["SAFELISTED_METHODS", "CorsPolicy", "Preflight", "merge_vary"]

SAFELISTED_METHODS = frozenset({b"GET", b"HEAD", b"POST"})
"""The CORS-safelisted methods: a preflight asking for one of them passes whatever the route lists (Fetch's
CORS-preflight fetch accepts them without `Access-Control-Allow-Methods`)."""

Preflight = tuple[tuple[bytes, bytes], ...]
"""The headers of the gateway's 204 to an allowed preflight (it has no body)."""

ALLOW_ORIGIN = b"Access-Control-Allow-Origin"
ALLOW_CREDENTIALS = b"Access-Control-Allow-Credentials"
ALLOW_METHODS = b"Access-Control-Allow-Methods"
ALLOW_HEADERS = b"Access-Control-Allow-Headers"
EXPOSE_HEADERS = b"Access-Control-Expose-Headers"
MAX_AGE = b"Access-Control-Max-Age"

CORS_RESPONSE_HEADERS = frozenset(
    name.lower() for name in (ALLOW_ORIGIN, ALLOW_CREDENTIALS, ALLOW_METHODS, ALLOW_HEADERS, EXPOSE_HEADERS, MAX_AGE)
)
"""The CORS headers of a response (lower-cased): on a CORS route the gateway alone writes them, an upstream's are
dropped (as Envoy's cors filter does), so no upstream can widen the route's policy."""

_PREFLIGHT_VARY = b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
"""What a preflight's answer depends on."""


def merge_vary(headers: Fields, token: bytes) -> None:
    """Add `token` to the response's `Vary`, as one list with the values already there (the upstream's): nothing
    when it is there already or `Vary` is `*` (varies on everything)."""
    values = headers.getRawHeaders(b"vary")
    if not values:
        headers.setRawHeaders(b"Vary", [token])
        return
    wanted = token.lower()
    for value in values:
        for member in value.split(b","):
            member = member.strip().lower()
            if member == wanted or member == b"*":
                return
    headers.setRawHeaders(b"Vary", [b", ".join([*values, token])])


@dataclass(frozen=True, slots=True, kw_only=True)
class CorsPolicy:
    """A route's CORS policy, as `gateway.config.cors` reads it from the route's `cors` table."""

    origins: frozenset[bytes] = frozenset()
    """Allowed origins, exactly (lower-cased serialised origins: "https://app.example.com:8443")."""
    origin_pattern: re.Pattern[bytes] | None = None
    """Allowed origins by pattern (the `https://*.example.com` entries, as one regular expression), or None."""
    any_origin: bool = False
    """Every origin is allowed (`allow_origins = ["*"]`; never with credentials)."""
    credentials: bool = False
    """Whether responses say `Access-Control-Allow-Credentials: true` (cookies, HTTP auth, client certificates)."""
    methods: frozenset[bytes] = frozenset()
    """Methods a preflight may ask for (compared case-sensitively, as methods are), besides the safelisted ones."""
    request_headers: frozenset[bytes] = frozenset()
    """Request headers a preflight may ask for (lower-cased)."""
    any_request_header: bool = False
    """Every request header may be asked for (`allow_headers = ["*"]`): the answer names those asked for."""
    expose_headers: bytes = b""
    """The `Access-Control-Expose-Headers` value; empty sends none."""
    max_age: int | None = None
    """Seconds a browser may cache a preflight's answer; None sends no `Access-Control-Max-Age`."""

    def allows(self, origin: bytes) -> bool:
        """Whether `origin` (an `Origin` header's value) is allowed."""
        if self.any_origin:
            return True
        origin = origin.lower()
        if origin in self.origins:
            return True
        return self.origin_pattern is not None and self.origin_pattern.fullmatch(origin) is not None

    def preflight(self, headers: HeaderLookup) -> Preflight | CorsRefused | None:
        """The answer to an `OPTIONS` request with these headers: None when it is no preflight (it goes on like any
        request), the headers of its 204 when it is allowed, `CorsRefused` (403) when it is not."""
        origins = headers.getRawHeaders(b"origin")
        requested = headers.getRawHeaders(b"access-control-request-method")
        if origins is None or requested is None:
            return None
        vary = [(b"Vary", _PREFLIGHT_VARY)]
        if len(origins) != 1 or not self.allows(origins[0]):
            return CorsRefused("this origin may not call this route from a browser", reason="cors_origin", headers=vary)
        method = requested[0]
        if len(requested) != 1 or not (method in self.methods or method in SAFELISTED_METHODS):
            return CorsRefused(
                "this route does not allow that method from a browser on another origin",
                reason="cors_method",
                headers=vary,
            )
        asked = _header_list(headers.getRawHeaders(b"access-control-request-headers"))
        if not self.any_request_header and not asked.issubset(self.request_headers):
            return CorsRefused(
                "this route does not allow those request headers from a browser on another origin",
                reason="cors_headers",
                headers=vary,
            )
        answer = [(ALLOW_ORIGIN, b"*" if self.any_origin and not self.credentials else origins[0])]
        if self.credentials:
            answer.append((ALLOW_CREDENTIALS, b"true"))
        if self.methods:
            answer.append((ALLOW_METHODS, b", ".join(sorted(self.methods))))
        if self.any_request_header:
            if asked:
                answer.append((ALLOW_HEADERS, b", ".join(sorted(asked))))
        elif self.request_headers:
            answer.append((ALLOW_HEADERS, b", ".join(sorted(self.request_headers))))
        if self.max_age is not None:
            answer.append((MAX_AGE, b"%d" % self.max_age))
        answer += vary
        return tuple(answer)

    def respond(self, request: HeaderLookup, response: Fields) -> None:
        """Give an actual response (the upstream's, or the gateway's own answer) its CORS headers."""
        if self.any_origin:
            # The same answer for every origin (and for requests without one): nothing varies.
            response.setRawHeaders(ALLOW_ORIGIN, [b"*"])
            if self.expose_headers:
                response.setRawHeaders(EXPOSE_HEADERS, [self.expose_headers])
            return
        merge_vary(response, b"Origin")
        origins = request.getRawHeaders(b"origin")
        if origins is None or len(origins) != 1 or not self.allows(origins[0]):
            return
        response.setRawHeaders(ALLOW_ORIGIN, [origins[0]])
        if self.credentials:
            response.setRawHeaders(ALLOW_CREDENTIALS, [b"true"])
        if self.expose_headers:
            response.setRawHeaders(EXPOSE_HEADERS, [self.expose_headers])


def _header_list(values: Sequence[bytes] | None) -> frozenset[bytes]:
    """The header names of `Access-Control-Request-Headers` (a comma-separated list, maybe over several lines)."""
    if not values:
        return frozenset()
    return frozenset(name for value in values for name in (part.strip().lower() for part in value.split(b",")) if name)
