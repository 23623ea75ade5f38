"""Access-log records: the fields of one request's line, and of a request head refused before it became one."""

from __future__ import annotations

from typing import Any

__all__ = ["bounded_field", "ms_between", "refusal_record"]


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
    return round((end - start) * 1000.0, 3)


_MAX_FIELD = 256


def bounded_field(values: list[bytes] | None) -> str | None:
    """The first value of a header the client sent (Host, User-Agent), bounded and escaped for the log: a refused
    or unchecked one may be anything."""
    if not values:
        return None
    return values[0][:_MAX_FIELD].decode("ascii", "backslashreplace")
