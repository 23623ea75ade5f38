"""Where the gateway listens: `[server]` (the settings every listener shares), `[[listeners]]` and `[admin]`.

Each reader either returns a typed value or raises `ValueError` with the reason (`gateway.config.values`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from gateway.addresses import Networks
from gateway.config.model import Admin, Listener, Server
from gateway.config.tls import listener_tls
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
    string,
)

__all__ = ["SERVER_FIELDS", "header_names", "read_admin", "read_listeners"]


def _port(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ValueError(f"must be a port number from 0 to 65535, got {value!r}")
    return value


def _via_name(value: object) -> str:
    text = string(value)
    if text and not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", text):
        raise ValueError(f"must be a single token (letters, digits, -._~ and the like), got {text!r}")
    return text


def _server_header(value: object) -> str:
    text = string(value)
    if not re.fullmatch(r"[\x21-\x7e]([\x20-\x7e]{0,254}[\x21-\x7e])?|", text):
        raise ValueError(f'must be visible ASCII (such as "gateway"), at most 256 bytes, got {text!r}')
    return text


# Headers that make or frame a response (or that the gateway sets itself): hiding them would break it.
_NEVER_HIDDEN = frozenset({b"content-length", b"transfer-encoding", b"connection", b"content-type", b"x-request-id"})


def header_names(value: object) -> frozenset[bytes]:
    """An array of header names ("X-Powered-By"), kept lower-cased; [] for none."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f'must be an array of header names such as ["Server", "X-Powered-By"], got {describe(value)}')
    names = set()
    for text in value:
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", text):
            raise ValueError(f"{text!r} is not a header name")
        name = text.lower().encode("ascii")
        if name in _NEVER_HIDDEN:
            raise ValueError(f"{text!r} frames or identifies the response and cannot be hidden")
        names.add(name)
    return frozenset(names)


def _interface(value: object) -> str:
    text = nonempty_string(value)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f'must be an IP address such as "127.0.0.1", "0.0.0.0" or "::", got {text!r}') from None
    return text


def _networks(value: object) -> Networks:
    """An array of addresses or networks ("10.0.0.0/8", "::1")."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f'must be an array of addresses or networks such as ["10.0.0.0/8", "::1"], got {value!r}')
    networks = []
    for text in value:
        try:
            networks.append(ipaddress.ip_network(text, strict=True))
        except ValueError as e:
            raise ValueError(f"{text!r} is not an address or network ({e})") from None
    return tuple(networks)


def _redirect_port(value: object) -> int:
    if value is True:
        return 443
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    raise ValueError(f"must be true (https on port 443) or the https port number, got {value!r}")


SERVER_FIELDS: Fields = {
    "idle_timeout": positive_seconds,
    "head_timeout": positive_seconds,
    "max_connections": positive_int,
    "lingering_timeout": positive_seconds,
    "lingering_max_bytes": positive_size,
    "via": _via_name,
    "server_header": lambda value: _server_header(value),
    "hide_response_headers": lambda value: header_names(value),
    "underscores_in_headers": boolean,
    "workers": positive_int,
    "drain_timeout": positive_seconds,
    "trusted_proxies": lambda value: _networks(value),
}


def read_listeners(top: Table, server: Server) -> tuple[Listener, ...]:
    """The listeners, each named in errors by its address (`listeners["127.0.0.1:8080"]`); none listed twice."""
    tables = top.tables("listeners", required=True, name=_listener_name)
    if not tables and top.valid("listeners"):
        top.report("listeners", "at least one listener is needed")
    listeners = []
    seen_addresses: set[tuple[str, int]] = set()
    for table in tables:
        listener = table.attempt(_listener)
        if listener is None:
            continue
        address = (listener.host, listener.port) if not listener.systemd else (listener.systemd, -1)
        if (listener.port or listener.systemd) and address in seen_addresses:
            table.report("", f"{listener.describe()} is listed twice")
        seen_addresses.add(address)
        if server.workers > 1 and not listener.systemd and listener.port == 0:
            table.report(
                "port",
                f"must not be 0 when server.workers is above 1 (it is {server.workers}): each worker process "
                "binds its own socket with SO_REUSEPORT, so port 0 would give each process a different port",
            )
        listeners.append(listener)
    return tuple(listeners)


def _listener_name(data: Mapping[str, Any]) -> str | None:
    """How a listener is named in errors: its address as written ("127.0.0.1:8080", "[::]:443"), or its systemd
    socket ("systemd:http")."""
    host, port, systemd = data.get("host"), data.get("port"), data.get("systemd")
    if isinstance(systemd, str) and systemd:
        return f"systemd:{systemd}"
    if isinstance(host, str) and host and isinstance(port, int) and not isinstance(port, bool):
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return None


_LISTENER_KEYS = (
    "host",
    "port",
    "backlog",
    "systemd",
    "proxy_protocol",
    "proxy_protocol_from",
    "tls",
    "redirect_to_https",
)


def _listener(t: Table) -> Listener:
    t.known(_LISTENER_KEYS)
    proxy_protocol = t.get("proxy_protocol", boolean, False)
    proxy_protocol_from: Networks = t.get("proxy_protocol_from", _networks, ())
    if proxy_protocol_from and not proxy_protocol and t.valid("proxy_protocol"):
        t.report("proxy_protocol_from", "lists who may send a PROXY header; it needs proxy_protocol = true")
    tls_table = t.table("tls")
    tls = listener_tls(tls_table) if tls_table is not None else None
    redirect = 0
    if t.has("redirect_to_https") and t.get("redirect_to_https", lambda v: v) is not False:
        if tls_table is not None:
            t.report("redirect_to_https", "is for a plain HTTP listener; this one serves HTTPS itself")
        else:
            redirect = t.get("redirect_to_https", _redirect_port, 0)
    if t.has("systemd"):
        for key in ("host", "port", "backlog"):
            if t.has(key):
                t.report(key, "a systemd socket's address and backlog are set in its .socket unit, not here")
        name = t.require("systemd", nonempty_string)
        t.finish()
        if name is None:
            raise Invalid()
        return Listener(
            systemd=name,
            proxy_protocol=proxy_protocol,
            proxy_protocol_from=proxy_protocol_from,
            tls=tls,
            redirect_to_https=redirect,
        )
    host = t.require("host", _interface)
    port = t.require("port", _port)
    backlog = t.get("backlog", positive_int, 511)
    t.finish()
    if host is None or port is None:
        raise Invalid()
    return Listener(
        host=host,
        port=port,
        backlog=backlog,
        proxy_protocol=proxy_protocol,
        proxy_protocol_from=proxy_protocol_from,
        tls=tls,
        redirect_to_https=redirect,
    )


def read_admin(t: Table | None) -> Admin | None:
    if t is None:
        return None
    t.known(("host", "port"))
    admin = Admin(host=t.get("host", _interface, "127.0.0.1"), port=t.get("port", _port, 9901))
    t.finish()
    return admin
