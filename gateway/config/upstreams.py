"""`[upstreams.NAME]`: where an upstream's servers are, how requests are spread over them, when one is ejected,
and how much retrying it may be given; and a route's `[routes.retries]`.

An upstream is one `url`, or `servers` (each a URL and a weight) that share its scheme and base path (so its TLS
settings and the paths it is sent), never both.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace
from urllib.parse import urlsplit

from gateway.config.model import Balance, Ejection, HealthCheck, Retries, RetryBudget, Upstream, UpstreamServer
from gateway.config.tls import upstream_tls
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

__all__ = ["RETRY_FIELDS", "read_retries", "read_upstream", "upstream_url"]


def upstream_url(t: Table, key: str) -> tuple[str, str, int, bytes]:
    """The scheme, host, port and base path of the http(s) URL at `key`."""
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


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _shown(value: object) -> str:
    """A wrong integer as written; anything else by its type."""
    return repr(value) if isinstance(value, int) and not isinstance(value, bool) else describe(value)


def _weight(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1000:
        raise ValueError(f"must be a positive integer (1 to 1000), got {_shown(value)}")
    return value


def _percent(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100:
        raise ValueError(f"must be a percentage, an integer from 0 to 100, got {_shown(value)}")
    return value


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"must be an integer, 0 or more, got {_shown(value)}")
    return value


def _statuses(value: object) -> frozenset[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"must be an array of status codes such as [502, 503, 504], got {describe(value)}")
    bad = [v for v in value if not 500 <= v <= 599]
    if bad:
        raise ValueError(f"must be server error statuses (500 to 599), got {bad[0]}")
    return frozenset(value)


def _balance(value: object) -> Balance:
    if value == "round_robin":
        return "round_robin"
    if value == "least_requests":
        return "least_requests"
    if value == "hash":
        return "hash"
    raise ValueError(f'must be "round_robin", "least_requests" or "hash", got {describe(value)}')


def _hash_on(value: object) -> str:
    text = nonempty_string(value)
    if text in ("consumer", "client_address"):
        return text
    kind, _, name = text.partition(":")
    if kind in ("header", "cookie") and re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
        return f"{kind}:{name.lower() if kind == 'header' else name}"
    raise ValueError(
        f'must be "consumer", "client_address", "header:NAME" or "cookie:NAME" (a token after the colon), got {text!r}'
    )


MAX_RETRY_BODY = 64 * 1024
"""The most request body kept to be sent again: more would make retries a memory cost of every request."""


def _retry_body(value: object) -> int:
    size = positive_size(value)
    if size > MAX_RETRY_BODY:
        raise ValueError(f"must be at most 64KiB (a body kept to be sent again is held in memory), got {value!r}")
    return size


_EJECTION_FIELDS: Fields = {
    "consecutive_failures": _count,
    "base_time": positive_seconds,
    "max_time": positive_seconds,
    "max_ejected_percent": _percent,
    "statuses": _statuses,
}


def _check_path(value: object) -> bytes:
    text = nonempty_string(value)
    if not text.startswith("/") or not re.fullmatch(r"[!$&'()*+,;=:@/?A-Za-z0-9._~%-]+", text):
        raise ValueError(f'must be a path such as "/healthz" (percent-encode other characters), got {text!r}')
    return text.encode("ascii")


def _check_method(value: object) -> str:
    if value not in ("GET", "HEAD", "OPTIONS"):
        raise ValueError(f'must be "GET", "HEAD" or "OPTIONS" (a check must change nothing), got {describe(value)}')
    return str(value)


def _check_host(value: object) -> str:
    text = nonempty_string(value)
    if not re.fullmatch(r"[A-Za-z0-9.:\[\]-]+", text):
        raise ValueError(f'must be a host name, with a port if need be ("api.internal:8080"), got {text!r}')
    return text


def _check_statuses(value: object) -> frozenset[int]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"must be a non-empty array of statuses such as [200, 204], got {describe(value)}")
    bad = [v for v in value if not 100 <= v <= 599]
    if bad:
        raise ValueError(f"must be HTTP statuses (100 to 599), got {bad[0]}")
    return frozenset(value)


_HEALTH_FIELDS: Fields = {
    "path": _check_path,
    "method": _check_method,
    "host": _check_host,
    "statuses": _check_statuses,
    "interval": positive_seconds,
    "timeout": positive_seconds,
    "healthy_threshold": positive_int,
    "unhealthy_threshold": positive_int,
}


def _health_check(t: Table | None) -> HealthCheck | None:
    """`[upstreams.NAME.health_check]`: off without the table; its `path` is required."""
    if t is None:
        return None
    if not t.has("path"):
        t.report("path", 'is required to check servers (a path such as "/healthz")')
    check = read_fields(t, HealthCheck(), _HEALTH_FIELDS)
    if not t.failed() and check.timeout >= check.interval:
        t.report("timeout", f"must be below interval ({check.timeout:g} >= {check.interval:g})")
    return check


_BUDGET_FIELDS: Fields = {"percent": _percent, "window": positive_seconds, "min_retries": _count}

RETRY_FIELDS: Fields = {
    "attempts": _count,
    "unsafe_methods": boolean,
    "max_body_bytes": _retry_body,
    "backoff": positive_seconds,
    "max_backoff": positive_seconds,
}
"""`[routes.retries]`."""

_UPSTREAM_FIELDS: Fields = {
    "max_connections": positive_int,
    "max_queue": positive_int,
    "queue_timeout": positive_seconds,
    "idle_timeout": positive_seconds,
    "max_idle_connections": positive_int,
    "balance": _balance,
    "hash_on": _hash_on,
    "max_requests_per_server": _count,
    "resolve": positive_seconds,
}

_UPSTREAM_KEYS = ("url", "servers", "tls", "ejection", "retry_budget", "health_check", *_UPSTREAM_FIELDS)


def _servers(t: Table) -> tuple[str, str, int, bytes, tuple[UpstreamServer, ...]]:
    """The servers of `servers`: one scheme and base path for all, each a URL and a weight."""
    tables = t.tables("servers")
    if not tables and not t.failed("servers"):
        raise t.error("servers", "must list at least one server ({ url = ..., weight = ... })")
    read: list[tuple[tuple[str, str, int, bytes], int]] = []
    for server in tables:
        server.known(("url", "weight"))
        weight = server.attempt(lambda s: s.get("weight", _weight, 1))
        where = server.attempt(lambda s: upstream_url(s, "url"))
        server.finish()
        if where is not None and weight is not None:
            read.append((where, weight))
    if len(read) < len(tables):
        raise Invalid()
    scheme, _, _, base = read[0][0]
    for i, ((other_scheme, _, _, other_base), _) in enumerate(read):
        if (other_scheme, other_base) != (scheme, base):
            raise t.error(
                f"servers[{i}].url",
                "must have the scheme and path of the first server (the servers of an upstream share its TLS "
                "settings and the paths it is sent)",
            )
    addresses = [(host, port) for (_, host, port, _), _ in read]
    for i, address in enumerate(addresses):
        if address in addresses[:i]:
            raise t.error(f"servers[{i}].url", "names the same host and port as a server before it")
    members = tuple(UpstreamServer(host=host, port=port, weight=weight) for (_, host, port, _), weight in read)
    return scheme, members[0].host, members[0].port, base, members


def read_upstream(name: str, t: Table) -> Upstream:
    """An `[upstreams.NAME]` table."""
    t.known(_UPSTREAM_KEYS)
    servers: tuple[UpstreamServer, ...] = ()
    where: tuple[str, str, int, bytes] | None = None
    try:
        if t.has("url") and t.has("servers"):
            t.skip("servers")
            raise t.error("url", 'and "servers" exclude each other: give one url, or a list of servers')
        if t.has("servers"):
            scheme, host, port, base, servers = _servers(t)
            where = scheme, host, port, base
        else:
            where = upstream_url(t, "url")
    except Invalid:
        where = None  # refused: the rest is read all the same, for its own errors
    tls_table = t.table("tls")
    if where is not None and where[0] == "http" and tls_table is not None:
        t.report("tls", "is for an https upstream; this one's url is http")
    tls = upstream_tls(tls_table) if where is None or where[0] == "https" else None
    ejection_table = t.table("ejection")
    ejection = read_fields(ejection_table, Ejection(), _EJECTION_FIELDS)
    if ejection.max_time < ejection.base_time and not (ejection_table and ejection_table.failed()):
        t.report("ejection.max_time", f"must not be below base_time ({ejection.max_time:g} < {ejection.base_time:g})")
    budget = read_fields(t.table("retry_budget"), RetryBudget(), _BUDGET_FIELDS)
    health = _health_check(t.table("health_check"))
    pool = read_fields(t, Upstream(name=name, scheme="", host="", port=0, base_path=b""), _UPSTREAM_FIELDS)
    if pool.resolve and not t.failed("resolve"):
        if servers:
            t.report("resolve", "is for an upstream given by one url whose host is a name, not for servers")
        elif where is not None and _is_address(where[1]):
            t.report("resolve", f"needs a url whose host is a name to resolve, not an address ({where[1]})")
    if where is None:
        raise Invalid()
    scheme, host, port, base = where
    return replace(
        pool,
        scheme=scheme,
        host=host,
        port=port,
        base_path=base,
        tls=tls,
        servers=servers if len(servers) > 1 or (servers and servers[0].weight != 1) else (),
        ejection=ejection,
        retry_budget=budget,
        health_check=health,
    )


def read_retries(t: Table | None, base: Retries) -> Retries:
    """A route's `[routes.retries]`."""
    retries = read_fields(t, base, RETRY_FIELDS)
    if t is not None and not t.failed() and retries.max_backoff < retries.backoff:
        t.report("max_backoff", f"must not be below backoff ({retries.max_backoff:g} < {retries.backoff:g})")
    return retries
