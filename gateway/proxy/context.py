"""`Gateway`: what a request needs of the running gateway, replaced whole by a reload."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

from gateway.auth.gatekeeper import Gatekeeper
from gateway.config import Limits, Server
from gateway.logs import AccessLog
from gateway.operations.metrics import Metrics
from gateway.proxy.pool import UpstreamPool
from gateway.routing.router import Router

__all__ = ["Gateway"]


@dataclass(frozen=True, slots=True)
class Gateway:
    """What a request needs of the running gateway. A reload replaces it whole; requests keep the one they began
    with, so in-flight streams finish on the routes and pools they started on."""

    server: Server
    limits: Limits
    router: Router
    pools: Mapping[str, UpstreamPool]
    clock: IReactorTime
    gatekeeper: Gatekeeper
    access_log: AccessLog | None = None
    metrics: Metrics | None = None
    via: bytes = b""
    """`server.via` as the Via headers carry it (empty: none), encoded once rather than for each message."""
    server_header: bytes = b""
    """`server.server_header`, encoded once: the Server header of responses (empty: the upstream's, if shown)."""

    @property
    def observed(self) -> bool:
        """Whether anything takes the records of finished requests (else none is built)."""
        return self.access_log is not None or self.metrics is not None

    def request_ended(self, record: dict[str, Any]) -> None:
        """A request has ended: its one record goes to the access log and the metrics."""
        if self.access_log is not None:
            self.access_log.record(record)
        if self.metrics is not None:
            self.metrics.request_ended(record)
