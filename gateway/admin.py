"""The admin site: `/metrics` for Prometheus, `/healthz` (the process serves) and `/readyz` (config loaded,
listeners bound, not draining), on a listener of its own, never the public one.

Rule: the admin site only reads; nothing here changes the gateway. The metrics are rendered on the reactor
thread from the process's own registry (prometheus_client's `MetricsResource` would hand each scrape to a
thread of the global reactor's pool, for a render that takes about a millisecond).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

__all__ = ["admin_site"]


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else None)
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return encoder(self._registry)  # type: ignore[no-any-return]


class _Probe(Resource):
    """200 while `check` returns None, else 503 with the reason; JSON either way."""

    isLeaf = True

    def __init__(self, check: Callable[[], str | None]) -> None:
        super().__init__()
        self._check = check

    def render_GET(self, request: Request) -> bytes:
        reason = self._check()
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        if reason is None:
            return b'{"status":"ok"}\n'
        request.setResponseCode(503)
        return json.dumps({"status": "unavailable", "reason": reason}).encode("utf-8") + b"\n"

    render_HEAD = render_GET


class _Root(Resource):
    def getChild(self, path: bytes, request: Request) -> Resource:
        return self if path == b"" else notFound()  # type: ignore[no-any-return]

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"gateway admin: /metrics /healthz /readyz\n"


def admin_site(registry: CollectorRegistry, not_ready: Callable[[], str | None]) -> Site:
    """The admin site. `not_ready` says why the process is not ready (None when it is)."""
    root = _Root()
    root.putChild(b"metrics", _Metrics(registry))
    root.putChild(b"healthz", _Probe(lambda: None))
    root.putChild(b"readyz", _Probe(not_ready))
    site = Site(root)
    site.noisy = False
    site.displayTracebacks = False
    site.log = lambda request: None  # type: ignore[method-assign] # scrapes and probes are not requests to log
    return site
