"""Read the TOML config file into a `Config` (`gateway.config.model`): `load`, `load_text` and `parse`, which read
its tables in order, each with the module that knows it (`server`, `routes`, `store`, `tls`, and
`gateway.auth.settings` for admission).

Rule: a config either loads whole or not at all; when it does not, every error in it is reported at once, one per
line, each naming the file, the key path and the reason
(`etc/gateway.toml: routes["events"].timeouts.connect: must be a positive number of seconds, got -1`). Routes are
named in key paths by their name, listeners by their address, upstreams, consumers and methods by their table's
name. Nothing here touches the network or the reactor, so a reload can validate a file before anything changes.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.auth.settings.admission import ADMISSION_KEYS, parse_admission
from gateway.config.model import AccessLog, Config, FlowControl, Limits, Route, Server, Timeouts, Upstream
from gateway.config.routes import (
    FLOW_FIELDS,
    LIMIT_FIELDS,
    TIMEOUT_FIELDS,
    check_flow,
    read_route,
    read_upstream,
    route_name,
)
from gateway.config.server import SERVER_FIELDS, read_admin, read_listeners
from gateway.config.store import LOCAL_STORE, limit_store
from gateway.config.values import ConfigError, Errors, Fields, Table, boolean, read_fields, string

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["load", "load_text", "parse"]

_D = TypeVar("_D", bound="DataclassInstance")
"""A section's dataclass."""


def load(path: Path | str) -> Config:
    """Read and validate the TOML file at `path`."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read the file: {e.strerror or e}") from None
    return load_text(text, source=path)


def load_text(text: bytes, *, source: Path | str) -> Config:
    """Validate the bytes of a TOML config file read from `source` (which names it in errors, and which relative
    paths in it are relative to)."""
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(source, "", f"not valid UTF-8: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "", f"not valid TOML: {e}") from None
    return replace(parse(data, source=source), text=text)


def parse(data: Mapping[str, Any], *, source: Path | str) -> Config:
    """Validate an already-decoded config mapping; pure, so tests feed it dicts. Every error is reported, in one
    `ConfigError`."""
    top = Table(data, "", source, Errors())
    top.known(_TOP_KEYS)
    server = _section(top, "server", Server, SERVER_FIELDS)
    timeouts = _section(top, "timeouts", Timeouts, TIMEOUT_FIELDS)
    limits_table = top.table("limits")
    store = LOCAL_STORE
    if limits_table is not None:
        limits_table.known(("store",))
        store = limit_store(limits_table.table("store"), source)
    limits = read_fields(limits_table, Limits(), LIMIT_FIELDS)
    flow = _section(top, "flow_control", FlowControl, FLOW_FIELDS)
    check_flow(flow, top, "flow_control")
    listeners = read_listeners(top, server)

    upstreams: dict[str, Upstream] = {}
    for name, table in top.named_tables("upstreams"):
        upstream = table.attempt(partial(read_upstream, name))
        if upstream is not None:
            upstreams[name] = upstream

    admission = parse_admission(top)
    routes: list[Route] = []
    names: set[str] = set()
    tables = top.tables("routes", required=True, name=route_name)
    if not tables and top.valid("routes"):
        top.report("routes", "at least one route is needed")
    for table in tables:
        route = table.attempt(
            partial(read_route, upstreams=upstreams, defaults=(server, timeouts, limits, flow, admission))
        )
        if route is not None and route.name in names:
            table.report("name", f"route name {route.name!r} is used twice")
        elif route is not None:
            names.add(route.name)
            routes.append(route)
    access_log = _access_log(top.table("access_log"), source)
    admin = read_admin(top.table("admin"))
    top.finish()
    top.errors.check()
    return Config(
        source=str(source),
        server=server,
        limits=limits,
        limit_store=store,
        listeners=listeners,
        upstreams=MappingProxyType(upstreams),
        routes=tuple(routes),
        admission=admission,
        access_log=access_log,
        admin=admin,
    )


_TOP_KEYS = (
    "server",
    "timeouts",
    "limits",
    "flow_control",
    "listeners",
    "upstreams",
    "routes",
    "access_log",
    "admin",
    *ADMISSION_KEYS,
)


def _section(top: Table, key: str, kind: type[_D], readers: Fields) -> _D:
    return read_fields(top.table(key), kind(), readers)


def _access_log(t: Table | None, source: Path | str) -> AccessLog:
    if t is None:
        return AccessLog()
    t.known(("path", "query"))
    path = t.get("path", string, "-")
    if path not in ("-", ""):
        # Relative to the config file, as the credentials file is: the service's directory is not the config's.
        path = str(Path(source).parent / path)
        if not Path(path).parent.is_dir():
            t.report("path", f"the directory of {path!r} does not exist")
        elif Path(path).is_dir():
            t.report("path", f"{path!r} is a directory; name a file in it")
        elif not (os.access(path, os.W_OK) if Path(path).exists() else os.access(Path(path).parent, os.W_OK)):
            t.report("path", f"{path!r} cannot be written by this user")
    log = AccessLog(path=path, query=t.get("query", boolean, False))
    t.finish()
    return log
