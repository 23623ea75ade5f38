"""Headers that cross the gateway: hop-by-hop stripping, forwarding headers, Via and the request id.

Rule: end-to-end headers pass unchanged in both directions; hop-by-hop headers (the fixed list and every name
listed in Connection) never do; framing (Content-Length, Transfer-Encoding) is re-made by whoever writes the
next hop. Names pass as they were spelt; the headers the gateway adds have its own spelling. Pure functions over
`Fields` (`gateway.http1.fields`): no I/O, no reactor.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from typing import Final

from twisted.web.http_headers import Headers

from gateway.http1.fields import Fields

__all__ = [
    "HOP_BY_HOP",
    "canonical_name",
    "client_response_headers",
    "connection_tokens",
    "request_id_of",
    "switched_response_headers",
    "upstream_request_headers",
    "websocket_upgrade",
]

HOP_BY_HOP: Final = frozenset(
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
_REMADE_UPSTREAM: Final = frozenset(
    {b"host", b"content-length", b"expect", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"}
)
# Response headers re-made for the client: Content-Length comes from the upstream's framing, not its header.
_REMADE_CLIENT: Final = frozenset({b"content-length"})

_TOKEN: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_REQUEST_ID: Final = re.compile(rb"[\x21-\x7e]{1,200}")


@functools.lru_cache(maxsize=1024)
def canonical_name(name: bytes) -> bytes:
    """`name` as Twisted's `Headers` stores it (its own capitalisation rules, asked once at import)."""
    headers = Headers()
    headers.addRawHeader(name, b"")
    return next(iter(headers.getAllRawHeaders()))[0]


# How the gateway spells the headers it sets (as Twisted's Headers did, so what upstreams and clients see is
# unchanged); the keys are the lower-cased names.
_CONNECTION: Final = b"connection"
_HOST: Final = b"host"
_VIA: Final = b"via"
_XFF: Final = b"x-forwarded-for"
_XFP: Final = b"x-forwarded-proto"
_XFH: Final = b"x-forwarded-host"
_XRID: Final = b"x-request-id"
_SERVER: Final = b"server"
# What proxies in front of an upstream set about the client and the request as it reached them, besides the
# X-Forwarded-* the gateway makes itself: only a trusted proxy's pass; anyone else's are forged (client-address
# libraries read any of the first group; frameworks build URLs from the second).
_PROXY_SET: Final = frozenset(
    name
    for name in (
        b"forwarded",
        b"x-real-ip",
        b"x-client-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-cluster-client-ip",
        b"x-forwarded",
        b"forwarded-for",
        b"x-original-forwarded-for",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-server",
        b"x-forwarded-scheme",
        b"x-forwarded-ssl",
    )
)
# The forwarding headers the gateway sets or guards, lower-cased: a CGI/WSGI upstream reads "X_Forwarded_For"
# as one of them (only reachable with server.underscores_in_headers = true).
_FORWARDING: Final = frozenset((_XFF, _XFP, _XFH, _XRID, _VIA, *_PROXY_SET))
_DROP_UPSTREAM: Final = HOP_BY_HOP | _REMADE_UPSTREAM
_DROP_CLIENT: Final = HOP_BY_HOP | _REMADE_CLIENT
_SPELLING: Final = {name: canonical_name(name) for name in (_HOST, _VIA, _XFF, _XFP, _XFH, _XRID, _SERVER)}


def _entries(headers: Fields | Headers) -> dict[bytes, tuple[bytes, list[bytes]]]:
    """Lower-cased name -> (name as spelt, values) of `headers` (a Twisted `Headers` is read through its public
    methods: tests and side calls build those)."""
    if isinstance(headers, Fields):
        return headers.entries
    return Fields((name, value) for name, values in headers.getAllRawHeaders() for value in values).entries


def _values(headers: Fields | Headers, name: bytes) -> list[bytes] | None:
    """The values of `name` (lower-cased) in `headers`."""
    entry = _entries(headers).get(name)
    return entry[1] if entry is not None else None


def _set(raw: dict[bytes, tuple[bytes, list[bytes]]], name: bytes, values: list[bytes]) -> None:
    """Set one of the gateway's own headers (`name` lower-cased), in its spelling."""
    raw[name] = (_SPELLING[name], values)


_LOWERED: Final[dict[frozenset[bytes], frozenset[bytes]]] = {}
"""Sets of names from the config (a route's hidden headers, admission's identity headers), lower-cased once per
process. A dict rather than `functools.lru_cache`, whose wrapper costs a compiled caller a generic call on each
message; `_SETS_KEPT` bounds it."""
_SETS_KEPT: Final = 256


def _lowered(names: frozenset[bytes]) -> frozenset[bytes]:
    found = _LOWERED.get(names)
    if found is None:
        found = frozenset(name.lower() for name in names)
        if len(_LOWERED) < _SETS_KEPT:
            _LOWERED[names] = found
    return found


_TOKENS_OF: Final[dict[bytes, frozenset[bytes]]] = {}
"""The tokens of Connection values seen (a few, as a rule: "keep-alive", "close"), parsed once per process."""
_TOKENS_KEPT: Final = 64
"""How many values `_TOKENS_OF` keeps: values a client makes up are parsed each time, never kept."""


def _tokens(values: Sequence[bytes] | None) -> frozenset[bytes]:
    if not values:
        return frozenset()
    if len(values) == 1:
        found = _TOKENS_OF.get(values[0])
        if found is not None:
            return found
    tokens: set[bytes] = set()
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t").lower()
            if _TOKEN.fullmatch(item):
                tokens.add(item)
    parsed = frozenset(tokens)
    if len(values) == 1 and len(_TOKENS_OF) < _TOKENS_KEPT:
        _TOKENS_OF[values[0]] = parsed
    return parsed


def connection_tokens(headers: Fields | Headers) -> frozenset[bytes]:
    """The lower-cased options listed in every Connection header (RFC 9110 §7.6.1: a comma-separated list).

    Twisted splits Connection on spaces only, so "close, TE" would hide "close"; this parses it properly.
    """
    return _tokens(_values(headers, _CONNECTION))


_WEBSOCKET: Final = b"websocket"
_UPGRADE: Final = b"upgrade"
_UPGRADE_SPELT: Final = (b"Upgrade", [b"websocket"])
_CONNECTION_UPGRADE: Final = (b"Connection", [b"Upgrade"])


def websocket_upgrade(headers: Fields | Headers) -> bool:
    """Whether a message asks to switch to WebSocket, or (a 101) says it switched: "websocket" among the
    protocols of Upgrade (RFC 9110 section 7.8: a comma-separated list, names case-insensitive, a version after
    "/") and "upgrade" among the Connection options."""
    values = _values(headers, _UPGRADE)
    if not values:
        return False
    for value in values:
        for item in value.split(b","):
            if item.strip(b" \t").lower() == _WEBSOCKET:
                return _UPGRADE in connection_tokens(headers)
    return False


def request_id_of(headers: Fields | Headers) -> str:
    """The client's X-Request-ID when it is a sane token (visible ASCII, at most 200 bytes), else a new one."""
    values = _values(headers, _XRID)
    if values and _REQUEST_ID.fullmatch(values[-1]):
        return values[-1].decode("ascii")
    # 128 random bits, as unlikely to repeat as uuid4().hex, from the process's PRNG (seeded by the OS when
    # each process starts; workers are started, not forked) rather than os.urandom, a system call per request
    # (3% of the CPU of small requests, bench S5). An id is a label, not a secret. What `random.randbytes(16)`
    # returns, without its Python frame.
    return _random_bits(128).to_bytes(16, "little").hex()


_random_bits: Final = random.getrandbits
"""The process's PRNG, bound once: a compiled module reads a plain module global from its dict on each use."""


_Entries = dict[bytes, tuple[bytes, list[bytes]]]
_NONE: Final[frozenset[bytes]] = frozenset()
_UNDERSCORE: Final = ord("_")
"""Looked for in a name as a byte's value: `b"_" in name` first tries its needle as an integer, and a bytes
needle makes that raise and clear a TypeError (about 250 ns, for each header of each message)."""


def _end_to_end(source: _Entries, drop: frozenset[bytes], *, underscores: bool = True) -> _Entries:
    """The headers of `source` that may cross: none of `drop`, none named in its Connection header, and unless
    `underscores` none with "_" in its name."""
    connection = source.get(_CONNECTION)
    named = _tokens(connection[1]) if connection is not None else _NONE
    # Two lookups rather than one in `drop | named`: that union would be a new set for each message with a
    # Connection header ("keep-alive" in most responses).
    return {
        key: entry  # shared, not copied: see `Fields.entries`
        for key, entry in source.items()
        if key not in drop and key not in named and (underscores or _UNDERSCORE not in key)
    }


def upstream_request_headers(
    client: Fields | Headers,
    *,
    client_ip: str,
    host: bytes,
    client_host: bytes | None,
    proto: bytes,
    via: bytes,
    request_id: str,
    received_version: bytes = b"1.1",
    underscores: bool = False,
    remove: frozenset[bytes] = frozenset(),
    add: Sequence[tuple[bytes, bytes]] = (),
    keep_forwarded_for: bool = True,
    websocket: bool = False,
) -> Fields:
    """The headers sent upstream for a client request with headers `client`.

    `host` is the Host to send (the client's or the upstream's, by the route's policy); `client_host` is the
    client's own Host, which also goes out as X-Forwarded-Host. `received_version` is the HTTP version the
    request came in with ("1.0" or "1.1"), as Via records it (RFC 9110 section 7.6.3). Unless `underscores`,
    a header with "_" in its name is dropped (see `gateway.config.Server.underscores_in_headers`).
    Headers named in `remove` (canonical names: credentials, and every identity header admission sets) are
    dropped, then those of `add` set: a client cannot send an identity header of its own. With
    `keep_forwarded_for` (the peer is a trusted proxy) the client's X-Forwarded-For is appended to and what else
    proxies set (Forwarded, X-Real-IP, True-Client-IP, X-Forwarded-Port...) is kept; from anyone else
    X-Forwarded-For is replaced and the others removed, so no upstream reads a forged client address or URL.
    With `websocket` (the request asks to switch to WebSocket and its route allows it) the upgrade is asked of the
    upstream in turn: `Upgrade: websocket` and `Connection: Upgrade`, the only hop-by-hop headers that cross.
    """
    source = _entries(client)
    out = Fields()
    raw = out.entries = _end_to_end(source, _DROP_UPSTREAM, underscores=underscores)
    removed = _lowered(remove) if remove else frozenset()
    for name in removed:
        raw.pop(name, None)
    if not keep_forwarded_for and not _PROXY_SET.isdisjoint(raw):
        for name in _PROXY_SET.intersection(raw):
            del raw[name]
    if underscores:
        # With underscores allowed, "X_Consumer_ID" reaches a CGI/WSGI upstream as X-Consumer-ID, and
        # "X_Forwarded_For" as X-Forwarded-For: such a spelling of a removed or forwarding header is removed too.
        guarded = _FORWARDING | removed
        for name in [name for name in raw if _UNDERSCORE in name and name.replace(b"_", b"-") in guarded]:
            del raw[name]
    for name, value in add:
        out.addRawHeader(name, value)  # the client's copies are gone: every value here is ours
    _set(raw, _HOST, [host])
    forwarded_for = source.get(_XFF) if keep_forwarded_for else None
    ip = client_ip.encode("ascii")
    _set(raw, _XFF, [b", ".join([*forwarded_for[1], ip])] if forwarded_for else [ip])
    _set(raw, _XFP, [proto])
    if client_host is not None:
        _set(raw, _XFH, [client_host])
    _set(raw, _XRID, [request_id.encode("ascii")])
    if via:
        _add_via(raw, source.get(_VIA), received_version + b" " + via)
    if websocket:
        raw[_UPGRADE] = (_UPGRADE_SPELT[0], list(_UPGRADE_SPELT[1]))
        raw[_CONNECTION] = (_CONNECTION_UPGRADE[0], list(_CONNECTION_UPGRADE[1]))
    return out


def switched_response_headers(upstream: Fields | Headers, target: Fields) -> None:
    """The hop-by-hop headers of a `101 Switching Protocols` to WebSocket, which the client must see for the switch
    (RFC 6455 section 4.2.2): `Upgrade` as the upstream sent it, and `Connection: Upgrade`."""
    upgrade = _values(upstream, _UPGRADE)
    target.entries[_UPGRADE] = (_UPGRADE_SPELT[0], list(upgrade) if upgrade else list(_UPGRADE_SPELT[1]))
    target.entries[_CONNECTION] = (_CONNECTION_UPGRADE[0], list(_CONNECTION_UPGRADE[1]))


_CLIENT_DROP: Final[dict[frozenset[bytes], frozenset[bytes]]] = {}


def _client_drop(hidden: frozenset[bytes]) -> frozenset[bytes]:
    """What is not relayed to a client: the hop-by-hop headers, and a route's hidden ones (lower-cased names;
    a frozenset caches its hash, so this costs one lookup per response)."""
    found = _CLIENT_DROP.get(hidden)
    if found is None:
        found = _DROP_CLIENT | _lowered(hidden)
        if len(_CLIENT_DROP) < _SETS_KEPT:
            _CLIENT_DROP[hidden] = found
    return found


def client_response_headers(
    upstream: Fields | Headers,
    target: Fields,
    *,
    via: bytes,
    request_id: str,
    received_version: bytes = b"1.1",
    hidden: frozenset[bytes] = frozenset(),
    server: bytes = b"",
) -> None:
    """Copy the upstream response headers `upstream` into the client response headers `target`, without the
    `hidden` ones (lower-cased names: by default Server and X-Powered-By, which tell clients the inner stack);
    with `server`, the gateway's own Server header replaces the upstream's."""
    source = _entries(upstream)
    kept = _end_to_end(source, _client_drop(hidden) if hidden else _DROP_CLIENT)
    raw = target.entries
    if raw:
        raw.update(kept)
    else:
        raw = target.entries = kept  # the commonest case: nothing set yet, no second dict
    if _XRID not in raw:
        _set(raw, _XRID, [request_id.encode("ascii")])
    if via:
        _add_via(raw, source.get(_VIA), received_version + b" " + via)
    if server:
        _set(raw, _SERVER, [server])


def _add_via(raw: _Entries, existing: tuple[bytes, list[bytes]] | None, ours: bytes) -> None:
    if existing is not None:
        raw[_VIA] = (existing[0], [b", ".join([*existing[1], ours])])
    else:
        _set(raw, _VIA, [ours])
