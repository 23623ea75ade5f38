"""What a refusal of the gatekeeper tells the client besides its status: the WWW-Authenticate challenges of a 401,
and of a 403 for a missing scope; the Retry-After and RateLimit headers of a 429 (the RateLimit headers of
draft-ietf-httpapi-ratelimit-headers, which an admitted request is told too). Pure: functions of the methods, the
settings and a limit's decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from twisted.python.failure import Failure

from gateway.auth.credentials import challenge
from gateway.auth.identity import Authenticator, AuthFailure, Identity
from gateway.auth.limits import RateDecision
from gateway.auth.scopes import missing_scopes
from gateway.auth.settings.model import RateLimit, RouteAdmission
from gateway.errors import Denied, Forbidden, TooManyRequests

__all__ = ["as_verdict", "challenges", "forbidden", "rate_headers", "too_many", "too_many_concurrent"]


def challenges(
    chain: Sequence[Authenticator], failed: Authenticator | None = None, failure: AuthFailure | None = None
) -> list[tuple[bytes, bytes]]:
    """WWW-Authenticate for every method of the route, one per scheme (the failed method's, with its error, wins
    its scheme: API keys and JWTs both invite a Bearer token)."""
    by_scheme: dict[bytes, bytes] = {}
    for auth in chain:
        value = auth.challenge(failure if auth is failed else None)
        if value is None:
            continue
        scheme = value.split(b" ", 1)[0].lower()
        if scheme not in by_scheme or auth is failed:
            by_scheme[scheme] = value
    return [(b"WWW-Authenticate", value) for value in by_scheme.values()]


def forbidden(identity: Identity, admission: RouteAdmission, chain: Sequence[Authenticator], realm: str) -> Denied:
    """403 for an identity without the scopes the route needs; a Bearer method's challenge says which (RFC 6750)."""
    needed = missing_scopes(identity.scopes, any_of=admission.scopes_any, all_of=admission.scopes_all)
    headers = []
    auth = next((a for a in chain if a.name == identity.method), None)
    offered = auth.challenge(None) if auth is not None else None
    if offered is not None and offered.startswith(b"Bearer"):
        # RFC 6750 section 3.1: a token without the scope the resource needs.
        value = challenge("Bearer", realm=realm, error="insufficient_scope", scope=" ".join(needed))
        headers.append((b"WWW-Authenticate", value))
    return Forbidden(
        f"this route requires the scope{'s' if len(needed) > 1 else ''} {', '.join(needed)}",
        reason="insufficient_scope",
        consumer=identity.consumer,
        headers=headers,
    )


def too_many(name: str, limit: RateLimit, decision: RateDecision, reason: str, consumer: str | None) -> TooManyRequests:
    """429 with Retry-After and the RateLimit-Policy / RateLimit headers (draft-ietf-httpapi-ratelimit-headers)."""
    retry = max(1, math.ceil(decision.retry_after))
    return TooManyRequests(
        f"over the {name} rate limit of {limit.requests} requests per {limit.period:g} s; retry in {retry} s",
        reason=reason,
        consumer=consumer,
        headers=[
            (b"Retry-After", b"%d" % retry),
            (b"RateLimit-Policy", _policy(name, limit)),
            (b"RateLimit", b'"%s";r=0;t=%d' % (name.encode("ascii"), retry)),
        ],
    )


def too_many_concurrent(cap: int, consumer: str) -> TooManyRequests:
    """429 for a consumer already at its cap of requests in flight."""
    return TooManyRequests(
        f"this consumer already has {cap} requests in flight",
        reason="too_many_concurrent",
        consumer=consumer,
        headers=[(b"Retry-After", b"1")],
    )


def as_verdict(reason: Failure) -> Denied | Failure:
    """A shared store's refusal to decide (`LimitsUnavailable`, on a route that fails closed) as a verdict."""
    return reason.value if isinstance(reason.value, Denied) else reason


def _policy(name: str, limit: RateLimit) -> bytes:
    return b'"%s";q=%d;w=%d' % (name.encode("ascii"), limit.requests, max(1, math.ceil(limit.period)))


def rate_headers(name: str, limit: RateLimit, decision: RateDecision) -> list[tuple[bytes, bytes]]:
    """The RateLimit-Policy and RateLimit headers of an admitted request (draft-ietf-httpapi-ratelimit-headers):
    the policy it was counted against, the requests left now and the seconds until the whole quota is back."""
    return [
        (b"RateLimit-Policy", _policy(name, limit)),
        (b"RateLimit", b'"%s";r=%d;t=%d' % (name.encode("ascii"), decision.remaining, math.ceil(decision.reset))),
    ]
