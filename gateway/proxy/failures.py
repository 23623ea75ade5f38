"""What a client is answered when the upstream side fails: each way an upstream exchange can fail before a
response head, as the `GatewayError` it is answered with, and the lengths an upstream may not declare."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

from twisted.internet.error import ConnectError, ConnectionLost, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import UNKNOWN_LENGTH

from gateway.config import Route
from gateway.errors import (
    ClientBodyTimeout,
    GatewayError,
    UpstreamBroken,
    UpstreamSaturated,
    UpstreamTimeout,
    UpstreamTLSFailed,
    UpstreamUnreachable,
)
from gateway.http1.framing import MAX_BODY_LENGTH, body_length
from gateway.http1.response import UpstreamResponse
from gateway.proxy.pool import ConnectTimeout
from gateway.tls.upstream import tls_failure

__all__ = ["TIMEOUT_ERRORS", "length_too_large", "upstream_error", "upstream_in_answers"]

_log = Logger(namespace="gateway.failures")  # not the module's name: log lines keep the namespace they had

# How an upstream connection fails before a response head arrives (`gateway.http1.upstream` reports it in
# twisted.web.client's words).
_UPSTREAM_BROKE: Final = (
    ResponseNeverReceived,
    ResponseFailed,
    RequestTransmissionFailed,
    RequestNotSent,
    ConnectionLost,
)


TIMEOUT_ERRORS: Final[Mapping[str, Callable[[float], GatewayError]]] = {
    "response_headers": lambda t: UpstreamTimeout(f"the upstream sent no response headers within {t:g} s"),
    "upstream_send_stall": lambda t: UpstreamTimeout(f"the upstream stopped reading the request body for {t:g} s"),
    "client_body_idle": lambda t: ClientBodyTimeout(f"no request body bytes arrived for {t:g} s"),
}
"""The answer to each wait of an exchange that ran out before a response head (its seconds given)."""


def upstream_error(failure: Failure, route: Route, request_id: str) -> GatewayError:
    """The answer to a request whose upstream exchange failed before a response head (`failure`), logged with
    `request_id` where the operator needs to know."""
    name = route.upstream.name  # for the log: a URL, when the route gave one
    named = upstream_in_answers(route)
    value = failure.value
    if isinstance(value, UpstreamSaturated):
        return value.naming(named)
    if isinstance(value, GatewayError):
        return value
    for reason in getattr(failure.value, "reasons", ()):
        # A broken response (its head over the limit, a malformed status line...) is wrapped in ResponseFailed.
        if reason.check(GatewayError):
            error: GatewayError = reason.value
            return error
    tls = tls_failure(failure) if route.upstream.scheme == "https" else None
    if tls is not None:
        _log.warn(
            "TLS with upstream {upstream} failed: {reason} ({detail}) (request {request_id})",
            upstream=name,
            reason=tls,
            detail=failure.getErrorMessage(),
            request_id=request_id,
        )
        return UpstreamTLSFailed(f"the TLS handshake with {named} failed: {tls}")
    if failure.check(ConnectTimeout, ConnectTimeoutError):
        return UpstreamTimeout(f"could not connect to {named} within {route.timeouts.connect:g} s")
    if failure.check(ConnectError, DNSLookupError):
        return UpstreamUnreachable(f"could not connect to {named}")
    if failure.check(*_UPSTREAM_BROKE):
        _log.warn(
            "Upstream {upstream} failed before answering: {reason} (request {request_id})",
            upstream=name,
            reason=failure.getErrorMessage(),
            request_id=request_id,
        )
    else:
        _log.failure("Unexpected upstream failure (request {request_id})", failure, request_id=request_id)
    return UpstreamBroken(f"{named} closed the connection without a complete response")


def length_too_large(response: UpstreamResponse) -> str:
    """What is wrong, in words ("" when nothing), with a length an upstream response declares that llhttp took
    (it takes anything within 64 bits): a body length over `MAX_BODY_LENGTH` as its framing, or, for a response
    without a body (HEAD, 304), a relayed Content-Length over it."""
    length = response.length
    if length is not UNKNOWN_LENGTH:
        if length > MAX_BODY_LENGTH:  # type: ignore[operator]
            return f"a Content-Length over {MAX_BODY_LENGTH}"
        if length:
            return ""
    for value in response.headers.getRawHeaders(b"content-length", ()):
        if body_length(value) is None:
            return f"a Content-Length over {MAX_BODY_LENGTH}"
    return ""


def upstream_in_answers(route: Route) -> str:
    """How an answer names a route's upstream: by its config name, or by the route when the route gave a URL
    (the address goes to the log only)."""
    upstream = route.upstream
    return f"the upstream of route {route.name}" if upstream.inline else f"upstream {upstream.name}"
