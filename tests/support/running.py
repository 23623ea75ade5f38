"""A real gateway on 127.0.0.1:0 in this test process, configured from a dict like the TOML file."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor

from gateway.config import Config, parse
from gateway.operations.service import GatewayService


def gateway_config(upstream_url: str, **sections: Any) -> dict[str, Any]:
    """A config with one listener on a free port and one catch-all route to `upstream_url`.

    Keyword arguments add or replace top-level sections; `route={...}` adds keys to the route.
    """
    route = {
        "name": "origin",
        "auth": "anonymous",
        "path_prefix": "/",
        "upstream": "origin",
        **sections.pop("route", {}),
    }
    data: dict[str, Any] = {
        "listeners": [{"host": "127.0.0.1", "port": 0}],
        "upstreams": {"origin": {"url": upstream_url, **sections.pop("upstream", {})}},
        "routes": [route],
    }
    data.update(copy.deepcopy(sections))
    return data


@dataclass
class RunningGateway:
    config: Config
    service: GatewayService

    @property
    def port(self) -> int:
        port = self.service.listeners[0].port
        assert port is not None
        return port.getHost().port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pool(self, name: str = "origin") -> Any:
        return self.service.gateway.pools[name]


def start_gateway(data: dict[str, Any]) -> RunningGateway:
    config = parse(data, source="test.toml")
    service = GatewayService(config, reactor)
    service.startService()
    return RunningGateway(config, service)
