"""Where requests go and how: `[timeouts]`, `[limits]` and `[flow_control]` (the defaults of every route),
`[upstreams.NAME]` and `[[routes]]`.

Routes are named in key paths by their name, upstreams by their table's name. A route may give its upstream as a
URL rather than by name: routes naming the same URL share one upstream.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from gateway.auth.settings.admission import ROUTE_ADMISSION_KEYS, parse_route_admission
from gateway.auth.settings.model import Admission, RouteAdmission
from gateway.config.cors import read_cors
from gateway.config.model import (
    REFUSED_METHODS,
    FlowControl,
    HostHeaderPolicy,
    Limits,
    Retries,
    Route,
    Server,
    Timeouts,
    Upstream,
    WebSocket,
)
from gateway.config.server import header_names
from gateway.config.tls import UpstreamTLS, hsts_value
from gateway.config.upstreams import read_retries, read_upstream, upstream_url
from gateway.config.values import (
    Fields,
    Invalid,
    Table,
    boolean,
    describe,
    nonempty_string,
    positive_int,
    positive_seconds,
    positive_size,
    read_fields,
)
from gateway.routing.cors import CORS_RESPONSE_HEADERS
from gateway.routing.paths import PathRefused, routing_path

__all__ = ["FLOW_FIELDS", "LIMIT_FIELDS", "TIMEOUT_FIELDS", "check_flow", "read_route", "read_upstream", "route_name"]


_MIN_REQUEST_LINE = len(b"OPTIONS * HTTP/1.1")


def _request_line_size(value: object) -> int:
    """A request-line limit: one too small for "OPTIONS * HTTP/1.1" would refuse every request with 414."""
    size = positive_size(value)
    if size < _MIN_REQUEST_LINE:
        raise ValueError(f'must be at least {_MIN_REQUEST_LINE} bytes (room for "OPTIONS * HTTP/1.1"), got {value!r}')
    return size


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
    # What requests are refused for (gateway/routing/router.py) a prefix may not have either: no request could match.
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


TIMEOUT_FIELDS: Fields = {f.name: positive_seconds for f in fields(Timeouts)}


LIMIT_FIELDS: Fields = {
    "max_request_body_bytes": positive_size,
    "max_request_line_bytes": _request_line_size,
    "max_header_bytes": positive_size,
    "max_header_count": positive_int,
}


_ROUTE_LIMIT_FIELDS: Fields = {"max_request_body_bytes": positive_size}


def _lifetime(value: object) -> float:
    """A tunnel's longest life in seconds; 0 (the default) is no limit."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
        return 0.0
    try:
        return positive_seconds(value)
    except ValueError as e:
        raise ValueError(f"{e} (or 0 for no limit)") from None


_WEBSOCKET_FIELDS: Fields = {"enabled": boolean, "idle_timeout": positive_seconds, "max_lifetime": _lifetime}


FLOW_FIELDS: Fields = {"high_water": positive_size, "low_water": positive_size}


def check_flow(flow: FlowControl, t: Table, key: str) -> None:
    """low_water below high_water; not checked when a water mark, here or at the top level, was refused (the
    default put in its place would be compared)."""
    if t.failed(key) or t.errors.about(t.source, "flow_control"):
        return
    if flow.low_water >= flow.high_water:
        t.report(f"{key}.low_water", f"must be below high_water ({flow.low_water} >= {flow.high_water})")


def route_name(data: Mapping[str, Any]) -> str | None:
    name = data.get("name")
    return name if isinstance(name, str) and name.strip() else None


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
    "websocket",
    "cors",
    "retries",
    *ROUTE_ADMISSION_KEYS,
)


def read_route(
    t: Table,
    *,
    upstreams: dict[str, Upstream],
    defaults: tuple[Server, Timeouts, Limits, FlowControl, Admission],
) -> Route:
    server, timeouts, limits, flow, admission = defaults
    t.known(_ROUTE_KEYS)
    name = t.require("name", nonempty_string)
    upstream = _route_upstream(t, upstreams)
    route_flow = read_fields(t.table("flow_control"), flow, FLOW_FIELDS)
    check_flow(route_flow, t, "flow_control")
    try:
        route_admission: RouteAdmission | None = parse_route_admission(t, admission)
    except Invalid:
        route_admission = None
    host = t.get("host", _host_pattern) if t.has("host") else None
    path_prefix = t.get("path_prefix", _path_prefix, b"/")
    strip_prefix = t.get("strip_prefix", boolean, False)
    host_header: HostHeaderPolicy = t.get("host_header", _host_header_policy, "upstream")
    allow_methods: frozenset[str] = t.get("allow_methods", _allowed_methods, frozenset())
    route_timeouts = read_fields(t.table("timeouts"), timeouts, TIMEOUT_FIELDS)
    route_limits = read_fields(t.table("limits"), limits, _ROUTE_LIMIT_FIELDS)
    hsts = t.get("strict_transport_security", hsts_value, b"")
    hidden = t.get("hide_response_headers", header_names, server.hide_response_headers)
    websocket = read_fields(t.table("websocket"), WebSocket(), _WEBSOCKET_FIELDS)
    cors_table = t.table("cors")
    cors = read_cors(cors_table) if cors_table is not None else None
    retries = read_retries(t.table("retries"), Retries())
    t.finish()
    if name is None or upstream is None or route_admission is None or (cors_table is not None and cors is None):
        raise Invalid()
    if cors is not None:
        hidden |= CORS_RESPONSE_HEADERS  # the gateway writes a CORS route's CORS headers, never its upstream
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
        websocket=websocket,
        cors=cors,
        retries=retries,
    )


def _route_upstream(t: Table, upstreams: dict[str, Upstream]) -> Upstream | None:
    """The upstream a route names, or gives as a URL; None when there is none (reported, unless the upstream it
    names was itself refused: that is reported already)."""
    target = t.require("upstream", nonempty_string)
    if target is None:
        return None
    if "://" in target:
        try:
            scheme, host, port, base = upstream_url(t, "upstream")
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
