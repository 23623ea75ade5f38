"""One exception per failure a client can see, each carrying its status; rendered as problem+json (RFC 9457).

Rule: a client never sees a bare status. Every error the gateway answers itself has a type, a title, a detail
that helps the operator without leaking internals, and the request id that ties it to the logs.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from http import HTTPStatus
from typing import ClassVar

__all__ = [
    "AuthServiceDenied",
    "AuthTimeout",
    "AuthUnavailable",
    "BadRequest",
    "BodyTooLarge",
    "ClientBodyTimeout",
    "CorsRefused",
    "Denied",
    "Forbidden",
    "GatewayError",
    "HeadTimeout",
    "HeadersTooLarge",
    "HttpsRedirect",
    "LimitsUnavailable",
    "MethodNotAllowed",
    "NoRoute",
    "NotSupported",
    "RequestLineTooLong",
    "TooManyConnections",
    "TooManyRequests",
    "Unauthorized",
    "UpgradeRefused",
    "UpstreamBroken",
    "UpstreamSaturated",
    "UpstreamTLSFailed",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "UpstreamUnreachable",
    "problem",
    "reason_phrase",
]

PROBLEM_CONTENT_TYPE = b"application/problem+json"


class GatewayError(Exception):
    """A failure answered by the gateway itself, before any byte of an upstream response was sent."""

    status: int = 500
    title: ClassVar[str] = "Internal gateway error"
    slug: ClassVar[str] = "internal"
    route_cors: ClassVar[bool] = True
    """Whether the answer gets its route's CORS headers (a browser must be able to read a 401 or a 429): not a
    refused preflight's, which must carry none."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    @property
    def type_uri(self) -> str:
        return f"urn:gateway:problem:{self.slug}"

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        """Headers the answer carries besides its framing (Allow, WWW-Authenticate, Retry-After...)."""
        return []

    def render(self, request_id: str) -> tuple[int, bytes, bytes]:
        """The status, content type and body of the answer: problem+json, unless the error says otherwise."""
        return problem(self, request_id)


class Denied(GatewayError):
    """A request refused by admission (authentication, authorisation, limits), or admission that could not
    decide. `reason` is a short code for the log (never a credential); `consumer` is who it was, when known."""

    title = "Denied"
    slug = "denied"

    def __init__(
        self,
        detail: str,
        *,
        reason: str = "",
        consumer: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.reason = reason or self.slug.replace("-", "_")
        self.consumer = consumer
        self.headers = headers or []

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        return self.headers


class Unauthorized(Denied):
    """No valid credential: the answer names in WWW-Authenticate the methods the route accepts."""

    status = 401
    title = "Unauthorized"
    slug = "unauthorized"


class Forbidden(Denied):
    """A known consumer that may not make this request (it lacks a scope the route requires)."""

    status = 403
    title = "Forbidden"
    slug = "forbidden"


class TooManyRequests(Denied):
    """Over a rate or concurrency limit; the answer says when to retry (Retry-After, RateLimit headers)."""

    status = 429
    title = "Too many requests"
    slug = "too-many-requests"


class AuthUnavailable(Denied):
    """Admission could not decide (no keys could be fetched, the auth service failed or is saturated): the
    request is refused, never let through (fail closed)."""

    status = 503
    title = "Authentication unavailable"
    slug = "auth-unavailable"


class LimitsUnavailable(Denied):
    """The shared limit store (Redis) could not answer in time, on a route that fails closed: the request is
    refused rather than let through uncounted."""

    status = 503
    title = "Limits unavailable"
    slug = "limits-unavailable"


class AuthTimeout(Denied):
    """The auth service did not answer in time (fail closed)."""

    status = 504
    title = "Authentication timeout"
    slug = "auth-timeout"


class AuthServiceDenied(Denied):
    """A forward-auth service's own 401 or 403, passed to the client with its body and chosen headers."""

    title = "Denied by the auth service"
    slug = "auth-service-denied"

    def __init__(
        self, status: int, content_type: bytes | None, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        super().__init__(f"the auth service answered {status}", reason=f"auth_service_{status}", headers=headers)
        self.status = status
        self.content_type = content_type
        self.body = body

    def render(self, request_id: str) -> tuple[int, bytes, bytes]:
        if self.content_type is None and not self.body:
            return problem(self, request_id)
        return self.status, self.content_type or b"application/octet-stream", self.body


class CorsRefused(Denied):
    """A CORS preflight the route's policy does not allow (its origin, its method or a header it asks for):
    answered without CORS headers, so the browser does not send the request."""

    status = 403
    title = "CORS preflight refused"
    slug = "cors-refused"
    route_cors = False


class BadRequest(GatewayError):
    status = 400
    title = "Bad request"
    slug = "bad-request"


class NoRoute(GatewayError):
    status = 404
    title = "No route"
    slug = "no-route"


class HeadTimeout(GatewayError):
    status = 408
    title = "Request head timeout"
    slug = "head-timeout"


class MethodNotAllowed(GatewayError):
    """A method the gateway refuses (CONNECT always; TRACE unless the route allows it). `allow` is what the
    Allow header lists (RFC 9110 section 15.5.6). The connection is closed after the answer: a CONNECT client
    may already be sending tunnel bytes, which must never be read as a request."""

    status = 405
    title = "Method not allowed"
    slug = "method-not-allowed"

    def __init__(self, detail: str, allow: tuple[str, ...] = ()) -> None:
        super().__init__(detail)
        self.allow = allow

    @property
    def allow_header(self) -> bytes:
        return ", ".join(self.allow).encode("ascii")

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"Allow", self.allow_header)]


class ClientBodyTimeout(GatewayError):
    status = 408
    title = "Request body timeout"
    slug = "client-body-timeout"


class BodyTooLarge(GatewayError):
    status = 413
    title = "Request body too large"
    slug = "body-too-large"


class RequestLineTooLong(GatewayError):
    status = 414
    title = "Request line too long"
    slug = "request-line-too-long"


class HeadersTooLarge(GatewayError):
    status = 431
    title = "Request header fields too large"
    slug = "headers-too-large"


class TooManyConnections(GatewayError):
    status = 503
    title = "Too many connections"
    slug = "too-many-connections"


class UpstreamUnreachable(GatewayError):
    status = 502
    title = "Upstream unreachable"
    slug = "upstream-unreachable"


class UpstreamBroken(GatewayError):
    status = 502
    title = "Upstream failed"
    slug = "upstream-failed"


class UpstreamTLSFailed(GatewayError):
    """The TLS handshake with an https upstream failed; the detail names its class, never the certificate."""

    status = 502
    title = "Upstream TLS failed"
    slug = "upstream-tls-failed"


class UpstreamSaturated(GatewayError):
    """An upstream's queue is full or its wait too long. The pool that says so serves every route that names it
    (routes giving the same URL share one), so it leaves `{upstream}` in `template` for the request to name."""

    status = 503
    title = "Upstream saturated"
    slug = "upstream-saturated"

    def __init__(self, template: str, *, upstream: str = "the upstream") -> None:
        super().__init__(template.format(upstream=upstream))
        self.template = template

    def naming(self, upstream: str) -> UpstreamSaturated:
        """The same error, its upstream called `upstream` ("upstream billing", "the upstream of route reports")."""
        return UpstreamSaturated(self.template, upstream=upstream)

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        """Over an upstream's cap: a client may try again shortly (a slot frees as soon as a request ends)."""
        return [(b"Retry-After", b"1")]


class UpstreamUnavailable(UpstreamSaturated):
    """No server of an upstream may be given the request now (each is ejected, failing its health checks, or at
    its cap of requests): a fast 503 rather than a wait, with Retry-After (the seconds until the first server is
    expected back, at least 1)."""

    title = "Upstream unavailable"
    slug = "upstream-unavailable"

    def __init__(self, template: str, *, upstream: str = "the upstream", retry_after: float = 1.0) -> None:
        super().__init__(template, upstream=upstream)
        self.retry_after = max(1, math.ceil(retry_after))

    def naming(self, upstream: str) -> UpstreamUnavailable:
        return UpstreamUnavailable(self.template, upstream=upstream, retry_after=self.retry_after)

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"Retry-After", b"%d" % self.retry_after)]


class UpstreamTimeout(GatewayError):
    status = 504
    title = "Upstream timeout"
    slug = "upstream-timeout"


class HttpsRedirect(GatewayError):
    """A redirecting plain listener's answer: the same URL over https. 301 for GET and HEAD; 308 otherwise, so
    that a client repeats the method and body rather than turning them into a GET."""

    title = "Moved to HTTPS"
    slug = "https-redirect"

    def __init__(self, location: bytes, method: bytes) -> None:
        super().__init__(f"this address serves only HTTPS: {location.decode('ascii')}")
        self.location = location
        self.status = 301 if method in (b"GET", b"HEAD") else 308

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"Location", self.location)]


class UpgradeRefused(GatewayError):
    """A WebSocket upgrade on a route that does not allow it (`[routes.websocket] enabled = false`): refused on
    its head, before the upstream sees it (Envoy answers an upgrade its route does not allow the same way). The
    connection is closed after the answer: a client that asked to switch protocols may already send frames."""

    status = 403
    title = "Upgrade refused"
    slug = "upgrade-refused"


class NotSupported(GatewayError):
    """A well-formed request for something the gateway does not do, such as a server-wide "OPTIONS *"."""

    status = 501
    title = "Not implemented"
    slug = "not-implemented"


def problem(error: GatewayError, request_id: str) -> tuple[int, bytes, bytes]:
    """The status, content type and problem+json body that answer `error`."""
    body = json.dumps(
        {
            "type": error.type_uri,
            "title": error.title,
            "status": error.status,
            "detail": error.detail,
            "request_id": request_id,
        },
        separators=(",", ":"),
    ).encode("utf-8")
    return error.status, PROBLEM_CONTENT_TYPE, body


_RFC_9110_PHRASES = {
    413: "Content Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
}
"""Where RFC 9110 renamed a status and Python before 3.13 has the old name ("Request Entity Too Large")."""


@lru_cache(maxsize=64)
def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of a status the gateway answers with itself: RFC 9110's (6585's for 429 and
    431), whatever the Python version. Twisted's own table lacks some (it sends "429 Unknown Status") and has
    RFC 2616's older spellings ("Request Time-out"). An upstream's phrase is never replaced."""
    phrase = _RFC_9110_PHRASES.get(status)
    if phrase is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
    return phrase.encode("ascii")
