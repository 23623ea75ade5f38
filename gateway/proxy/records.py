"""Access-log records: the fields of one request's line, and of a request head refused before it became one; the end
of a request, told to the access log and the metrics."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from gateway.proxy.endings import Endings

__all__ = [
    "access_record",
    "bounded_field",
    "ended_status",
    "milliseconds",
    "ms_between",
    "refusal_record",
    "request_ended",
]


def refusal_record(
    request_id: str,
    client: str,
    method: bytes | None,
    status: int,
    *,
    tls: tuple[str | None, str | None] = (None, None),
    path: bytes | None = None,
) -> dict[str, Any]:
    """The access-log record of a request head the connection refused before it became a request (a request line
    too long, slow or malformed, a connection over the cap): the same fields, most of them null."""
    return {
        "request_id": request_id,
        "client": client,
        "method": method.decode("ascii", "backslashreplace") if method else None,
        "host": None,
        "path": path.decode("ascii", "backslashreplace") if path else None,
        "route": None,
        "upstream": None,
        "upstream_addr": None,
        "attempts": None,
        "consumer": None,
        "status": status,
        "bytes_in": 0,
        "bytes_out": 0,
        "decision_ms": None,
        "queue_ms": None,
        "connect_ms": None,
        "ttfb_ms": None,
        "total_ms": None,
        "ending": "refused",
        "tls_version": tls[0],
        "tls_cipher": tls[1],
        "user_agent": None,
    }


def ms_between(end: float | None, start: float | None) -> float | None:
    if end is None or start is None:
        return None
    return milliseconds(end - start)


def milliseconds(seconds: float) -> float:
    """`seconds` in milliseconds to the microsecond, as the access log gives durations: what `round(ms, 3)` gives
    but for a tie's direction, without its cost (a correctly rounded decimal conversion: some 2,000 instructions,
    five times a logged request)."""
    return math.floor(seconds * 1_000_000.0 + 0.5) / 1000.0


_MAX_FIELD: Final = 256


def bounded_field(values: list[bytes] | None) -> str | None:
    """The first value of a header the client sent (Host, User-Agent), bounded and escaped for the log: a refused
    or unchecked one may be anything."""
    if not values:
        return None
    return values[0][:_MAX_FIELD].decode("ascii", "backslashreplace")


def request_ended(exchange: Endings) -> None:
    """The request has ended: its one access-log record goes to the log and the metrics (which, without an
    access log, are told the few figures they count and no record is built)."""
    gateway = exchange.gateway
    if gateway.access_log is not None:
        gateway.request_ended(access_record(exchange))
    elif gateway.metrics is not None:
        began = exchange.began
        route = exchange.route
        response_at, slot_at, queued_at = exchange.response_at, exchange.slot_at, exchange.queued_at
        gateway.metrics.observe_request(
            route.name if route is not None else "",
            route.upstream.name if route is not None and exchange.pool is not None else "",
            ended_status(exchange),
            exchange.ending or "client_gone",
            total=gateway.clock.seconds() - began,
            ttfb=None if response_at is None else response_at - began,
            queue=None if slot_at is None or queued_at is None else slot_at - queued_at,
            bytes_in=exchange.body_bytes,
            bytes_out=exchange.sentLength,
        )


def ended_status(exchange: Endings) -> int | None:
    """The status the request ended with, as its record says it."""
    if exchange.startedWriting:
        return exchange.code
    if exchange.refusal is not None:
        return exchange.refusal.status
    if exchange.ending == "client_gone":
        return 499  # nginx's "client closed request"
    return None  # nothing was sent (cut by the gateway before a response began)


def access_record(exchange: Endings) -> dict[str, Any]:
    """The request's access-log fields, in the order of the line. Durations are milliseconds from the start
    of the request head: the admission decision, the wait for an upstream slot, the upstream connection
    (from the slot to the request going out on a connection, new or reused), the response head (time to
    first byte) and the whole request; null where the request never got there."""
    began = exchange.began
    now = exchange.gateway.clock.seconds()
    route = exchange.route
    log = exchange.gateway.access_log
    path = exchange.uri if log is not None and log.include_query else exchange.path
    status = ended_status(exchange)
    tls_version, tls_cipher = exchange.tls_info
    return {
        "request_id": exchange.request_id,
        "client": getattr(exchange.client, "host", ""),
        "method": exchange.method.decode("ascii", "backslashreplace"),
        "host": bounded_field(exchange.requestHeaders.getRawHeaders(b"host")),
        "path": path.decode("ascii", "backslashreplace") if path else None,
        "route": route.name if route is not None else None,
        "upstream": route.upstream.name if route is not None and exchange.pool is not None else None,
        "upstream_addr": exchange.upstream_address,
        "attempts": exchange.attempts or None,
        "consumer": exchange.consumer,
        "status": status,
        "bytes_in": exchange.body_bytes,
        "bytes_out": exchange.sentLength,
        "decision_ms": ms_between(exchange.decided_at, began),
        "queue_ms": ms_between(exchange.slot_at, exchange.queued_at),
        "connect_ms": ms_between(exchange.sent_at, exchange.slot_at),
        "ttfb_ms": ms_between(exchange.response_at, began),
        "total_ms": milliseconds(now - began),
        "ending": exchange.ending or "client_gone",
        "tls_version": tls_version,
        "tls_cipher": tls_cipher,
        "user_agent": bounded_field(exchange.requestHeaders.getRawHeaders(b"user-agent")),
    }
