"""Match a request's host and path to a route, and compute the path the upstream receives.

Rule: the most specific route wins, the same way every time. A route naming the request's host beats a
wildcard host (and a longer wildcard suffix, "*.eu.example.com", beats a shorter one, "*.example.com"), which
beats a route for any host; only when a more specific host group has no route for the path is the next one
tried. Within a group the longest path prefix wins; on a tie, the route listed first wins. A prefix matches
whole path segments: "/reports" matches "/reports" and "/reports/x", never "/reportsx". Paths are compared as
the bytes the client sent, never decoded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from gateway.config import Route

__all__ = ["Router", "host_without_port", "prefix_matches", "upstream_target"]


def host_without_port(host: bytes) -> str:
    """The lower-cased host name of a Host header value, without its port ("[::1]:80" -> "[::1]")."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        end = text.find("]")
        return text[: end + 1] if end != -1 else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def prefix_matches(prefix: bytes, path: bytes) -> bool:
    """Whether `path` lies under `prefix`, matching whole segments."""
    if not path.startswith(prefix):
        return False
    return prefix.endswith(b"/") or len(path) == len(prefix) or path[len(prefix)] == 0x2F  # "/"


def upstream_target(route: Route, target: bytes) -> bytes:
    """The request target sent upstream: the upstream's base path, then the client's path (minus the route's
    prefix when it strips it), then the query, all byte for byte."""
    path, sep, query = target.partition(b"?")
    if route.strip_prefix:
        rest = path[len(route.path_prefix) :]
        if not rest.startswith(b"/"):
            rest = b"/" + rest
        path = rest
    return route.upstream.base_path + path + sep + query


class Router:
    """Routes grouped by host once, so a lookup scans only the routes that could match."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self._exact: dict[str, list[Route]] = {}
        self._wildcard: list[tuple[str, list[Route]]] = []
        self._any: list[Route] = []
        wildcard: dict[str, list[Route]] = {}
        for route in routes:
            if route.host is None:
                self._any.append(route)
            elif route.host.startswith("*."):
                wildcard.setdefault(route.host[1:], []).append(route)
            else:
                self._exact.setdefault(route.host, []).append(route)
        # Longer suffixes are more specific: "*.eu.example.com" before "*.example.com".
        self._wildcard = sorted(wildcard.items(), key=lambda item: -len(item[0]))
        for group in [*self._exact.values(), *(g for _, g in self._wildcard), self._any]:
            group.sort(key=lambda r: -len(r.path_prefix))  # stable: the first listed wins a tie

    def match(self, host: str | None, path: bytes) -> Route | None:
        """The route for a request to `host` (lower-case, no port; None when absent) and `path`, if any."""
        if host is not None:
            found = _longest_prefix(self._exact.get(host, ()), path)
            if found is not None:
                return found
            for suffix, group in self._wildcard:
                if host.endswith(suffix) and len(host) > len(suffix):
                    found = _longest_prefix(group, path)
                    if found is not None:
                        return found
        return _longest_prefix(self._any, path)


def _longest_prefix(routes: Sequence[Route], path: bytes) -> Route | None:
    for route in routes:
        if prefix_matches(route.path_prefix, path):
            return route
    return None
