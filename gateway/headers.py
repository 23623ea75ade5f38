"""Headers that cross the gateway: hop-by-hop stripping, forwarding headers, Via and the request id.

Rule: end-to-end headers pass unchanged in both directions; hop-by-hop headers (the fixed list and every name
listed in Connection) never do; framing (Content-Length, Transfer-Encoding) is re-made by whoever writes the
next hop. Pure functions over `Headers`: no I/O, no reactor.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence

from twisted.web.http_headers import Headers

__all__ = [
    "HOP_BY_HOP",
    "client_response_headers",
    "connection_tokens",
    "request_id_of",
    "upstream_request_headers",
]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
"""RFC 9110 §7.6.1 and the classic RFC 2616 §13.5.1 list, plus the non-standard Proxy-Connection."""

# Request headers the gateway itself re-makes for the upstream, so the client's copies are dropped.
_REMADE_UPSTREAM = frozenset(
    {b"host", b"content-length", b"expect", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"}
)
# Response headers re-made for the client: Content-Length comes from the upstream's framing, not its header.
_REMADE_CLIENT = frozenset({b"content-length"})

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,200}")


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """The lower-cased options listed in every Connection header (RFC 9110 §7.6.1: a comma-separated list).

    Twisted splits Connection on spaces only, so "close, TE" would hide "close"; this parses it properly.
    """
    values = headers.getRawHeaders(b"connection")
    if not values:
        return frozenset()
    tokens: set[bytes] = set()
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t").lower()
            if _TOKEN.fullmatch(item):
                tokens.add(item)
    return frozenset(tokens)


def request_id_of(headers: Headers) -> str:
    """The client's X-Request-ID when it is a sane token (visible ASCII, at most 200 bytes), else a new one."""
    values = headers.getRawHeaders(b"x-request-id")
    if values and _REQUEST_ID.fullmatch(values[-1]):
        return values[-1].decode("ascii")
    return uuid.uuid4().hex


def _drop_set(headers: Headers, always: frozenset[bytes]) -> frozenset[bytes]:
    tokens = connection_tokens(headers)
    return HOP_BY_HOP | always | tokens if tokens else HOP_BY_HOP | always


def upstream_request_headers(
    client: Headers,
    *,
    client_ip: str,
    host: bytes,
    client_host: bytes | None,
    proto: bytes,
    via: bytes,
    request_id: str,
    received_version: bytes = b"1.1",
) -> Headers:
    """The headers sent upstream for a client request with headers `client`.

    `host` is the Host to send (the client's or the upstream's, by the route's policy); `client_host` is the
    client's own Host, which also goes out as X-Forwarded-Host. `received_version` is the HTTP version the
    request came in with ("1.0" or "1.1"), as Via records it (RFC 9110 section 7.6.3).
    """
    drop = _drop_set(client, _REMADE_UPSTREAM)
    out = Headers()
    for name, values in client.getAllRawHeaders():
        if name.lower() not in drop:
            out.setRawHeaders(name, values)
    out.setRawHeaders(b"Host", [host])
    forwarded_for = client.getRawHeaders(b"x-forwarded-for")
    ip = client_ip.encode("ascii")
    out.setRawHeaders(b"X-Forwarded-For", [b", ".join([*forwarded_for, ip])] if forwarded_for else [ip])
    out.setRawHeaders(b"X-Forwarded-Proto", [proto])
    if client_host is not None:
        out.setRawHeaders(b"X-Forwarded-Host", [client_host])
    out.setRawHeaders(b"X-Request-ID", [request_id.encode("ascii")])
    if via:
        _add_via(out, client.getRawHeaders(b"via"), received_version + b" " + via)
    return out


def client_response_headers(
    upstream: Headers, target: Headers, *, via: bytes, request_id: str, received_version: bytes = b"1.1"
) -> None:
    """Copy the upstream response headers `upstream` into the client response headers `target`."""
    drop = _drop_set(upstream, _REMADE_CLIENT)
    for name, values in upstream.getAllRawHeaders():
        if name.lower() not in drop:
            target.setRawHeaders(name, values)
    if not target.hasHeader(b"x-request-id"):
        target.setRawHeaders(b"X-Request-ID", [request_id.encode("ascii")])
    if via:
        _add_via(target, upstream.getRawHeaders(b"via"), received_version + b" " + via)


def _add_via(headers: Headers, existing: Sequence[bytes] | None, ours: bytes) -> None:
    headers.setRawHeaders(b"Via", [b", ".join([*existing, ours])] if existing else [ours])
