"""The config file: TOML read into frozen, typed objects, every error naming the file, the key path and the reason.

`load(path)` reads and validates a file, `parse(mapping, source=...)` a mapping already decoded; both give a
`Config` or raise one `ConfigError` listing every error in it. Pure: nothing here touches the network or the
reactor, so `--check` and a reload validate a file before anything changes.

`model` is the `Config` and its parts; `loader` reads the file, table by table: `server` where the gateway listens
(`[server]`, `[[listeners]]`, `[admin]`), `routes` where requests go (`[upstreams.NAME]`, `[[routes]]` and their
defaults), `tls` the TLS tables, `store` the `[limits.store]` table, and `gateway.auth.settings` the admission
tables; `values` is how any table is read.
"""

from gateway.config.loader import load, load_text, parse
from gateway.config.model import (
    REFUSED_METHODS,
    AccessLog,
    Admin,
    Config,
    FlowControl,
    Limits,
    Listener,
    Retries,
    Route,
    Server,
    Timeouts,
    Upstream,
    UpstreamServer,
    WebSocket,
)
from gateway.config.values import ConfigError, GiB, KiB, MiB

__all__ = [
    "REFUSED_METHODS",
    "AccessLog",
    "Admin",
    "Config",
    "ConfigError",
    "FlowControl",
    "GiB",
    "KiB",
    "Limits",
    "Listener",
    "MiB",
    "Retries",
    "Route",
    "Server",
    "Timeouts",
    "Upstream",
    "UpstreamServer",
    "WebSocket",
    "load",
    "load_text",
    "parse",
]
