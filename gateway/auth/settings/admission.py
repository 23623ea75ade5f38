"""The admission tables of the config file: `parse_admission` reads `[admission]` (identity headers, rate limits,
the realm, the credentials file) with the `[consumers.NAME]` (`consumers`) and `[auth.NAME]` (`methods`) tables,
and `parse_route_admission` the admission keys of one route (`auth` is required: no route is public by accident).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from types import MappingProxyType

from gateway.auth.settings.consumers import read_consumers, read_credentials_file
from gateway.auth.settings.methods import read_method
from gateway.auth.settings.model import (
    ANONYMOUS,
    FAILED_AUTH_ADDRESS_FACTOR,
    GATEWAY_OWNED,
    Admission,
    ApiKeyMethod,
    Consumer,
    ForwardMethod,
    IdentityHeaders,
    JwtMethod,
    Method,
    MtlsMethod,
    RateLimit,
    RateLimits,
    RouteAdmission,
)
from gateway.auth.settings.values import optional_header_name, rate_limit, realm, scope_set
from gateway.config.values import Invalid, Table, boolean, positive_int

__all__ = ["ADMISSION_KEYS", "ROUTE_ADMISSION_KEYS", "parse_admission", "parse_route_admission"]


ADMISSION_KEYS = ("consumers", "auth", "admission")
"""The top-level keys of the config file that `parse_admission` reads."""
_ADMISSION_TABLE_KEYS = ("credentials_file", "identity_headers", "rate_limits", "realm", "max_concurrent")
_RATE_LIMIT_KEYS = ("consumer", "anonymous", "failed_auth", "failed_auth_per_address")
_IDENTITY_FIELDS = ("consumer", "scopes", "method")


def parse_admission(top: Table) -> Admission:
    """The `[admission]`, `[consumers.*]` and `[auth.*]` sections of the config file's top table; what cannot be
    read is reported and left out."""
    consumers: dict[str, Consumer] = {}
    read_consumers(top, consumers)
    methods: dict[str, Method] = {}
    for name, table in top.named_tables("auth"):
        method = table.attempt(partial(read_method, name))
        if method is not None:
            methods[name] = method
    t = top.table("admission")
    if t is None:
        _check_upstream_headers(top, IdentityHeaders(), methods, "admission.identity_headers")
        return Admission(consumers=MappingProxyType(consumers), methods=MappingProxyType(methods))
    t.known(_ADMISSION_TABLE_KEYS)
    if t.has("credentials_file"):
        read_credentials_file(t, consumers)
    identity = IdentityHeaders()
    headers = t.table("identity_headers")
    if headers is not None:
        headers.known(_IDENTITY_FIELDS)
        identity = IdentityHeaders(
            consumer=headers.get("consumer", optional_header_name, identity.consumer),
            scopes=headers.get("scopes", optional_header_name, identity.scopes),
            method=headers.get("method", optional_header_name, identity.method),
        )
        headers.finish()
    refused = [field for field in _IDENTITY_FIELDS if headers is not None and not headers.valid(field)]
    _check_upstream_headers(top, identity, methods, t.path_of("identity_headers"), refused)
    rates = RateLimits()
    limits = t.table("rate_limits")
    if limits is not None:
        limits.known(_RATE_LIMIT_KEYS)
        failed = _optional_rate(limits, "failed_auth", rates.failed_auth)
        rates = RateLimits(
            consumer=_optional_rate(limits, "consumer", None),
            anonymous=_optional_rate(limits, "anonymous", None),
            failed_auth=failed,
            failed_auth_per_address=_optional_rate(limits, "failed_auth_per_address", _address_ceiling(failed)),
        )
        limits.finish()
    admission = Admission(
        realm=t.get("realm", realm, "gateway"),
        consumers=MappingProxyType(consumers),
        methods=MappingProxyType(methods),
        identity=identity,
        rate_limits=rates,
        max_concurrent=t.require("max_concurrent", positive_int) if t.has("max_concurrent") else None,
    )
    t.finish()
    return admission


_CREDENTIALS = frozenset({b"authorization", b"cookie", b"via"})


def _check_upstream_headers(
    top: Table, identity: IdentityHeaders, methods: Mapping[str, Method], key: str, refused: Sequence[str] = ()
) -> None:
    """Headers admission sets upstream are removed from every client request, on every route: none may be one the
    gateway sets itself, a credential, or another identity header (the one would silently overwrite the other).
    The identity headers whose value was `refused` are left out (their default stands in for them)."""
    reserved = set(GATEWAY_OWNED | _CREDENTIALS)
    for method in methods.values():
        if isinstance(method, ApiKeyMethod):
            reserved.update(where.name for where in method.headers)
        elif isinstance(method, ForwardMethod):
            reserved.update(method.request_headers)
    seen: dict[bytes, str] = {}
    named = [(f"{key}.{field}", getattr(identity, field).lower()) for field in _IDENTITY_FIELDS if field not in refused]
    for name, method in methods.items():
        if isinstance(method, JwtMethod):
            named += [(f"auth.{name}.claim_headers.{h.decode()}", h.lower()) for h, _ in method.claim_headers]
        elif isinstance(method, ForwardMethod):
            named += [(f"auth.{name}.copy_headers", h) for h in method.copy_headers]
        elif isinstance(method, MtlsMethod):
            named.append((f"auth.{name}.identity_header", method.identity_header.lower()))
    for where, header in named:
        if not header:
            continue
        if header in reserved:
            top.errors.add(
                top.source,
                where,
                f"{header.decode()} cannot carry identity: a header admission sets is removed from every request, "
                "and this one is the gateway's own or a credential; choose another name",
            )
            continue
        other = seen.get(header)
        if other is not None and not (other.startswith("auth.") and where.startswith("auth.")):
            top.errors.add(top.source, where, f"{header.decode()} is already set by {other}")
            continue
        seen[header] = where


def _address_ceiling(failed: RateLimit | None) -> RateLimit | None:
    """`failed_auth_per_address` when not configured: `FAILED_AUTH_ADDRESS_FACTOR` times `failed_auth` (none
    without it: `failed_auth = false` turns both off)."""
    if failed is None:
        return None
    factor = FAILED_AUTH_ADDRESS_FACTOR
    return RateLimit(requests=failed.requests * factor, period=failed.period, burst=failed.burst * factor)


def _optional_rate(t: Table, key: str, default: RateLimit | None) -> RateLimit | None:
    """A rate-limit table, or `false` for none."""
    if not t.has(key):
        return default
    if t.get(key, lambda v: v) is False:
        return None
    inner = t.table(key)  # None when it is not a table (reported)
    return inner.attempt(rate_limit) if inner is not None else None


ROUTE_ADMISSION_KEYS = (
    "auth",
    "scopes_any",
    "scopes_all",
    "forward_credentials",
    "rate_limit_headers",
    "limit_store_failure",
)
"""The keys of a route that `parse_route_admission` reads."""


def _store_failure(value: object) -> str:
    if value not in ("open", "closed"):
        raise ValueError(f'must be "open" (count in this process) or "closed" (503), got {value!r}')
    assert isinstance(value, str)
    return value


def parse_route_admission(t: Table, admission: Admission) -> RouteAdmission:
    """A route's `auth` (required: "anonymous", or method names), `scopes_any`, `scopes_all`,
    `forward_credentials` and `rate_limit_headers`. A method that is defined but could not be read is not
    reported again here (the route is left out all the same)."""
    rate_headers = t.get("rate_limit_headers", boolean, True)
    fail_closed = t.get("limit_store_failure", _store_failure, "open") == "closed"
    scopes_any: frozenset[str] = t.get("scopes_any", scope_set, frozenset())
    scopes_all: frozenset[str] = t.get("scopes_all", scope_set, frozenset())
    forward = t.get("forward_credentials", boolean, False)
    if not t.has("auth"):
        raise t.error(
            "auth",
            'is required: say auth = "anonymous" for a public route, or name the methods it accepts, such as '
            'auth = ["keys"] (no route is public by accident)',
        )
    value = t.get("auth", lambda v: v)
    if value == "anonymous":
        if scopes_any or scopes_all:
            t.report("scopes_any" if scopes_any else "scopes_all", "an anonymous route has no scopes to check")
        if t.has("forward_credentials") and t.valid("forward_credentials"):
            t.report("forward_credentials", "an anonymous route has no credentials to remove or forward")
        if rate_headers and not fail_closed:
            return ANONYMOUS
        return RouteAdmission(anonymous=True, rate_limit_headers=rate_headers, limits_fail_closed=fail_closed)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise t.error("auth", f'must be "anonymous" or a non-empty array of method names, got {value!r}')
    missing = [name for name in value if name not in admission.methods]
    for name in missing:
        if not t.errors.about(t.source, f"auth.{name}"):
            known = ", ".join(sorted(admission.methods)) or "none are defined"
            t.report("auth", f"no method named {name!r} (define it as [auth.{name}]; known: {known})")
    if len(set(value)) != len(value):
        t.report("auth", "names a method twice")
    issuers: dict[str, str] = {}
    for name in value:
        method = admission.methods.get(name)
        if isinstance(method, JwtMethod):
            if method.issuer in issuers and issuers[method.issuer] != name:
                t.report(
                    "auth",
                    f"{issuers[method.issuer]!r} and {name!r} are JWT methods of the same issuer: the first decides "
                    "every token of that issuer, so the second would never be used",
                )
            issuers[method.issuer] = name
    if missing:
        raise Invalid()
    return RouteAdmission(
        methods=tuple(value),
        scopes_any=scopes_any,
        scopes_all=scopes_all,
        forward_credentials=forward,
        rate_limit_headers=rate_headers,
        limits_fail_closed=fail_closed,
    )
