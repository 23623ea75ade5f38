"""The admin site: `/metrics` for Prometheus, `/healthz` (the gateway serves) and `/readyz` (config loaded,
listeners bound, not draining), `/upstreams` (every upstream's servers and their states, as each process sees
them), on a listener of its own, never the public one. It answers for the whole
gateway: one process (`OneProcess`), or twistd and its workers (`gateway.operations.fleet.Fleet`), which takes asking.

Rule: the admin site only reads; nothing here changes the gateway. The metrics are rendered on the reactor
thread (prometheus_client's `MetricsResource` would hand each scrape to a thread of the global reactor's pool,
for a render that takes about a millisecond).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Protocol

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

__all__ = ["AdminView", "OneProcess", "admin_site"]

_log = Logger(namespace="gateway.admin")  # not the module's name: log lines keep the namespace they had


class AdminView(Protocol):
    """What the admin site reports, for however many processes the gateway is."""

    def metrics(self) -> Deferred[Collector]:
        """Every family to render."""

    def not_ready(self) -> Deferred[str | None]:
        """Why the gateway should get no traffic now (None: it should)."""

    def unhealthy(self) -> str | None:
        """What is wrong enough to restart the gateway for (None: nothing)."""

    def upstreams(self) -> Deferred[object]:
        """The upstreams and their servers' states, as JSON-ready data."""


class OneProcess:
    """The gateway as one process: its registry, its own readiness and upstreams; healthy while it answers."""

    def __init__(
        self, registry: Collector, not_ready: Callable[[], str | None], upstreams: Callable[[], object] = dict
    ) -> None:
        self._registry = registry
        self._not_ready = not_ready
        self._upstreams = upstreams

    def upstreams(self) -> Deferred[object]:
        return succeed(self._upstreams())

    def metrics(self) -> Deferred[Collector]:
        return succeed(self._registry)

    def not_ready(self) -> Deferred[str | None]:
        return succeed(self._not_ready())

    def unhealthy(self) -> str | None:
        return None


def _answer(request: Request, body: Deferred[bytes]) -> int:
    """Write `body` once it comes (unless the client has gone by then); 500 if it fails."""
    gone: list[Failure] = []
    request.notifyFinish().addErrback(gone.append)

    def write(data: bytes) -> None:
        if not gone:
            request.setHeader(b"Content-Length", b"%d" % len(data))
            request.write(data)
            request.finish()

    def failed(failure: Failure) -> None:
        _log.failure("The admin site could not answer {path}", failure, path=request.path)
        if not gone:
            request.setResponseCode(500)
            write(b"")

    body.addCallback(write).addErrback(failed)
    return NOT_DONE_YET


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, view: AdminView) -> None:
        super().__init__()
        self._view = view

    def render_GET(self, request: Request) -> int:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return _answer(request, self._view.metrics().addCallback(encoder))


class _Probe(Resource):
    """200 while `check` gives None, else 503 with the reason; JSON either way."""

    isLeaf = True

    def __init__(self, check: Callable[[], Deferred[str | None]]) -> None:
        super().__init__()
        self._check = check

    def render_GET(self, request: Request) -> int:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")

        def body(reason: str | None) -> bytes:
            if reason is None:
                return b'{"status":"ok"}\n'
            request.setResponseCode(503)
            return json.dumps({"status": "unavailable", "reason": reason}).encode("utf-8") + b"\n"

        return _answer(request, self._check().addCallback(body))

    render_HEAD = render_GET


class _Upstreams(Resource):
    """The upstreams of the config, each with its servers and their states, as JSON: one process's, or every
    process's by worker (`Fleet.upstreams`)."""

    isLeaf = True

    def __init__(self, view: AdminView) -> None:
        super().__init__()
        self._view = view

    def render_GET(self, request: Request) -> int:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return _answer(request, self._view.upstreams().addCallback(_json))


def _json(data: object) -> bytes:
    return json.dumps(data, indent=1).encode("utf-8") + b"\n"


class _Root(Resource):
    def getChild(self, path: bytes, request: Request) -> IResource:
        return self if path == b"" else notFound()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"gateway admin: /metrics /healthz /readyz /upstreams\n"


def admin_site(view: AdminView) -> Site:
    """The admin site, answering what `view` reports."""
    root = _Root()
    root.putChild(b"upstreams", _Upstreams(view))
    root.putChild(b"metrics", _Metrics(view))
    root.putChild(b"healthz", _Probe(lambda: succeed(view.unhealthy())))
    root.putChild(b"readyz", _Probe(view.not_ready))
    site = Site(root)
    site.noisy = False
    site.displayTracebacks = False
    site.log = lambda request: None  # type: ignore[method-assign] # scrapes and probes are not requests to log
    return site
