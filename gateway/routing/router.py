"""Match a request's host and path to a route, and compute the path the upstream receives.

Rule: the most specific route wins, the same way every time. A route naming the request's host beats a
wildcard host (and a longer wildcard suffix, "*.eu.example.com", beats a shorter one, "*.example.com"), which
beats a route for any host; only when a more specific host group has no route for the path is the next one
tried. Within a group the longest path prefix wins; on a tie, the route listed first wins. A prefix matches
whole path segments: "/reports" matches "/reports" and "/reports/x", never "/reportsx".

Second rule: a request is routed by the path an upstream would resolve, and forwarded as the bytes the client
sent. `routing_path` gives the path routed on: percent-encoded unreserved characters decoded ("%61dmin" is
"admin") and other escapes upper-cased, "%2F", "%5C" and "\\" taken as "/", runs of "/" as one, and path
parameters (";v=1", as Tomcat and Spring read them) dropped from each segment. So "//admin", "/%61dmin",
"/admin%2Fx" and "/admin;x/y" all take the "/admin" route, as an upstream that decodes or merges them would
resolve them. A path an upstream could resolve outside the prefix it was routed by is refused instead
(`PathRefused`, answered 400): a "." or ".." segment in any spelling ("%2e%2E", "..%2f", "..\\", "..;x"), a
malformed escape ("%zz", which upstreams decode differently), an encoded NUL ("%00", which C code takes as
the end of the string) and a "#" (no valid target has one; an upstream that sees a fragment cuts the path
there). Nothing is rewritten: normalising "/reports/../admin" would forward a path other than the one the
client sent, while refusing it costs a legitimate client nothing (clients resolve dot-segments before sending,
RFC 3986 section 5.2). The path functions themselves are in `gateway.routing.paths` (config checks prefixes
with them), each a C-speed operation over the whole path.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

from gateway.config import Route
from gateway.routing.paths import prefix_end, routing_path

__all__ = ["Router", "host_without_port", "prefix_matches", "upstream_target"]


def host_without_port(host: bytes) -> str:
    """The lower-cased host name of a Host header value, without its port ("[::1]:80" -> "[::1]") or the trailing
    dot of a fully qualified name ("example.com." is "example.com" to DNS, to upstreams and to nginx)."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        end = text.find("]")
        return text[: end + 1] if end != -1 else text
    name = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    return name[:-1] if name.endswith(".") else name


def prefix_matches(prefix: bytes, path: bytes) -> bool:
    """Whether `path` lies under `prefix`, matching whole segments."""
    if not path.startswith(prefix):
        return False
    return prefix.endswith(b"/") or len(path) == len(prefix) or path[len(prefix)] == 0x2F  # "/"


@functools.lru_cache(maxsize=4096)
def _route_prefix(prefix: bytes) -> bytes:
    """A route's prefix as a routing path (config has checked it can be one)."""
    return routing_path(prefix)


def upstream_target(route: Route, target: bytes) -> bytes:
    """The request target sent upstream: the upstream's base path, then the client's path (minus the route's
    prefix when it strips it), then the query, all byte for byte. `target` is in origin-form."""
    path, sep, query = target.partition(b"?")
    if route.strip_prefix:
        rest = path[prefix_end(path, _route_prefix(route.path_prefix)) :]
        if not rest.startswith(b"/"):
            rest = b"/" + rest
        path = rest
    return route.upstream.base_path + path + sep + query


_Group = list[tuple[bytes, Route]]
"""Routes of one host class, each with its prefix as a routing path, longest prefix first."""


class Router:
    """Routes grouped by host once, so a lookup scans only the routes that could match."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self._exact: dict[str, _Group] = {}
        self._wildcard: list[tuple[str, _Group]] = []
        self._any: _Group = []
        wildcard: dict[str, _Group] = {}
        for route in routes:
            entry = (_route_prefix(route.path_prefix), route)
            if route.host is None:
                self._any.append(entry)
            elif route.host.startswith("*."):
                wildcard.setdefault(route.host[1:], []).append(entry)
            else:
                self._exact.setdefault(route.host, []).append(entry)
        # Longer suffixes are more specific: "*.eu.example.com" before "*.example.com".
        self._wildcard = sorted(wildcard.items(), key=lambda item: -len(item[0]))
        for group in [*self._exact.values(), *(g for _, g in self._wildcard), self._any]:
            group.sort(key=lambda entry: -len(entry[0]))  # stable: the first listed wins a tie

    def match(self, host: str | None, path: bytes) -> Route | None:
        """The route for a request to `host` (lower-case, no port; None when absent) and `path`, if any.

        `path` is a routing path (`routing_path`); prefixes are compared in the same form."""
        if host is not None:
            exact = self._exact.get(host)
            if exact is not None:  # (no call for a host without routes of its own)
                found = _longest_prefix(exact, path)
                if found is not None:
                    return found
            for suffix, group in self._wildcard:
                if host.endswith(suffix) and len(host) > len(suffix):
                    found = _longest_prefix(group, path)
                    if found is not None:
                        return found
        return _longest_prefix(self._any, path)


def _longest_prefix(group: Sequence[tuple[bytes, Route]], path: bytes) -> Route | None:
    for prefix, route in group:
        if prefix_matches(prefix, path):
            return route
    return None
