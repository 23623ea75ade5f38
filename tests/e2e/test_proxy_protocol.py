"""A listener with `proxy_protocol = true`: the client address a PROXY v1 or v2 header carries is the one the
gateway uses for X-Forwarded-For, rate limits and the access log; a connection without a valid header, or from a
peer that `proxy_protocol_from` does not list, is closed unanswered. Real loopback sockets, a real upstream (the
test origin)."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.support.clients import connect, within
from tests.support.logs import captured, in_namespace
from tests.support.origin import Origin
from tests.support.running import RunningGateway, gateway_config

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
GET_HEADERS = b"GET /headers HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n"


def v1(source: str, *, family: str = "TCP4", destination: str = "127.0.0.1", source_port: str = "56324") -> bytes:
    return f"PROXY {family} {source} {destination} {source_port} 8080\r\n".encode("ascii")


def v2(source: str, destination: str = "127.0.0.1") -> bytes:
    """A PROXY v2 header (RFC-like spec of HAProxy, section 2.2): version 2, command PROXY, TCP over IPv4 or
    IPv6, the addresses and ports in network order."""
    if ":" in source:
        family, addresses = (
            0x21,
            socket.inet_pton(socket.AF_INET6, source)
            + socket.inet_pton(socket.AF_INET6, destination if ":" in destination else "::1"),
        )
    else:
        family, addresses = 0x11, socket.inet_aton(source) + socket.inet_aton(destination)
    payload = addresses + struct.pack("!HH", 56324, 8080)
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(payload)) + payload


def config(origin: Origin, tmp_path: Path, *, allowed: list[str] | None = None, **sections: Any) -> dict[str, Any]:
    listener: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "proxy_protocol": True}
    if allowed is not None:
        listener["proxy_protocol_from"] = allowed
    return gateway_config(
        origin.url,
        listeners=[listener],
        access_log={"path": str(tmp_path / "access.log")},
        **sections,
    )


async def exchange(port: int, data: bytes) -> Any:
    client = await connect(port, keep_all=True)
    client.send(data)
    await within(client.closed)
    return client


def access_lines(tmp_path: Path, gateway: Any) -> list[dict[str, Any]]:
    gateway.service.access_log.flush()  # lines wait in the log's buffer for up to FLUSH_INTERVAL
    return [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]


@pytest.mark.parametrize(
    ("header", "carried"),
    [
        (v1("203.0.113.9"), "203.0.113.9"),
        (v1("2001:db8::9", family="TCP6", destination="::1"), "2001:db8::9"),
        (v2("198.51.100.4"), "198.51.100.4"),
        (v2("2001:db8::4"), "2001:db8::4"),
    ],
    ids=["v1-ipv4", "v1-ipv6", "v2-ipv4", "v2-ipv6"],
)
@pytest_twisted.ensureDeferred
async def test_the_carried_address_is_the_client_for_forwarded_for_and_the_access_log(
    origin: Origin, gateway_for: Any, tmp_path: Path, header: bytes, carried: str
) -> None:
    """The upstream sees the carried address as X-Forwarded-For (the client's own X-Forwarded-For replaced: the
    carried client is no trusted proxy) and the access log names it as the client."""
    gateway = gateway_for(config(origin, tmp_path))
    request = GET_HEADERS.replace(b"\r\n\r\n", b"\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
    client = await exchange(gateway.port, header + request)
    response = client.response()
    assert response.status == 200
    echo = json.loads(response.body)
    assert [v for k, v in echo["headers"] if k.lower() == "x-forwarded-for"] == [carried]
    [line] = access_lines(tmp_path, gateway)
    assert (line["client"], line["status"], line["ending"]) == (carried, 200, "completed")


@pytest_twisted.ensureDeferred
async def test_a_trusted_proxy_behind_the_load_balancer_keeps_its_forwarded_for(
    origin: Origin, gateway_for: Any, tmp_path: Path
) -> None:
    """When the carried address is a trusted proxy's, its X-Forwarded-For is kept and appended to."""
    gateway = gateway_for(config(origin, tmp_path, server={"trusted_proxies": ["10.0.0.0/8"]}))
    request = GET_HEADERS.replace(b"\r\n\r\n", b"\r\nX-Forwarded-For: 203.0.113.1\r\n\r\n")
    client = await exchange(gateway.port, v1("10.1.2.3") + request)
    echo = json.loads(client.response().body)
    assert [v for k, v in echo["headers"] if k.lower() == "x-forwarded-for"] == ["203.0.113.1, 10.1.2.3"]


@pytest_twisted.ensureDeferred
async def test_rate_limits_count_by_the_carried_address(origin: Origin, gateway_for: Any, tmp_path: Path) -> None:
    """An anonymous rate limit of one request counts each carried address apart, although every connection
    comes from 127.0.0.1: a second address passes, a second request of the first is 429."""
    gateway = gateway_for(config(origin, tmp_path, admission={"rate_limits": {"anonymous": {"rate": "1/m"}}}))
    statuses = []
    for source in ("203.0.113.1", "203.0.113.2", "203.0.113.1"):
        client = await exchange(gateway.port, v1(source) + GET_HEADERS)
        statuses.append(client.response().status)
    assert statuses == [200, 200, 429]
    assert [line["client"] for line in access_lines(tmp_path, gateway)] == ["203.0.113.1", "203.0.113.2", "203.0.113.1"]


@pytest.mark.parametrize(
    "data",
    [GET_HEADERS, b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\n" + GET_HEADERS],
    ids=["no-header", "bad-header"],
)
@pytest_twisted.ensureDeferred
async def test_a_connection_without_a_valid_header_is_closed_unanswered(
    origin: Origin, gateway_for: Any, tmp_path: Path, data: bytes
) -> None:
    """Without a valid PROXY header nothing is parsed as a request: the connection is closed without a byte,
    and nothing reaches the upstream."""
    gateway = gateway_for(config(origin, tmp_path))
    client = await exchange(gateway.port, data)
    assert bytes(client.head) == b""
    assert origin.seen == []


@pytest_twisted.ensureDeferred
async def test_proxy_unknown_falls_back_to_the_connections_own_address(
    origin: Origin, gateway_for: Any, tmp_path: Path
) -> None:
    """`PROXY UNKNOWN` (a connection the load balancer cannot describe) carries no address: the connection's own
    one is used. (Twisted's parser wants something after UNKNOWN; the bare `PROXY UNKNOWN\\r\\n` is closed.)"""
    gateway = gateway_for(config(origin, tmp_path))
    client = await exchange(gateway.port, b"PROXY UNKNOWN ::1 ::1 1 2\r\n" + GET_HEADERS)
    echo = json.loads(client.response().body)
    assert [v for k, v in echo["headers"] if k.lower() == "x-forwarded-for"] == ["127.0.0.1"]


@pytest_twisted.ensureDeferred
async def test_an_ipv4_client_of_an_ipv6_listener_is_its_ipv4_address(
    origin: Origin, gateway_for: Any, tmp_path: Path
) -> None:
    """On a "::" listener an IPv4 client's address arrives as "::ffff:127.0.0.1": X-Forwarded-For, the access
    log and per-address limits all take it as 127.0.0.1 (else every IPv4 client would share one IPv6 /64)."""
    data = gateway_config(
        origin.url, listeners=[{"host": "::", "port": 0}], access_log={"path": str(tmp_path / "access.log")}
    )
    gateway = gateway_for(data)
    client = await exchange(gateway.port, GET_HEADERS)
    echo = json.loads(client.response().body)
    assert [v for k, v in echo["headers"] if k.lower() == "x-forwarded-for"] == ["127.0.0.1"]
    assert [line["client"] for line in access_lines(tmp_path, gateway)] == ["127.0.0.1"]


def refusals(gateway: RunningGateway, reason: str) -> float:
    registry = gateway.service.metrics.registry
    value = registry.get_sample_value(
        "gateway_proxy_protocol_refused_connections_total",
        {"listener": gateway.config.listeners[0].describe(), "reason": reason},
    )
    return value or 0.0


@pytest.mark.parametrize(
    "header",
    [v1("10.9.9.9"), v2("10.9.9.9"), b""],
    ids=["v1", "v2", "no-header"],
)
@pytest_twisted.ensureDeferred
async def test_a_peer_outside_proxy_protocol_from_is_closed_before_its_header_is_read(
    origin: Origin, gateway_for: Any, tmp_path: Path, header: bytes
) -> None:
    """With `proxy_protocol_from = ["10.0.0.0/8"]`, this test's connection (from 127.0.0.1) is closed without
    a byte of answer whatever its header claims (here an allowed address), nothing reaches the upstream or the
    access log, and the refusal is counted by listener and reason, and logged with the peer."""
    gateway = gateway_for(config(origin, tmp_path, allowed=["10.0.0.0/8"]))
    with captured(in_namespace("gateway.service")) as events:
        client = await exchange(gateway.port, header + GET_HEADERS)
    assert bytes(client.head) == b""
    assert origin.seen == []
    assert access_lines(tmp_path, gateway) == []
    assert refusals(gateway, "peer_not_allowed") == 1
    [event] = [e for e in events if "proxy_protocol_from" in e["log_format"]]
    assert event["peer"] == "127.0.0.1"


@pytest_twisted.ensureDeferred
async def test_refusals_are_logged_at_most_once_a_minute_and_all_counted(
    origin: Origin, gateway_for: Any, tmp_path: Path
) -> None:
    """A scan of a PROXY listener does not flood the log: three refused peers are three in the counter and one
    line in the log (the next line, a minute later at the earliest, says how many it did not name)."""
    gateway = gateway_for(config(origin, tmp_path, allowed=["10.0.0.0/8"]))
    with captured(in_namespace("gateway.service")) as events:
        for _ in range(3):
            await exchange(gateway.port, v1("10.9.9.9") + GET_HEADERS)
    assert refusals(gateway, "peer_not_allowed") == 3
    assert len([e for e in events if "proxy_protocol_from" in e["log_format"]]) == 1


@pytest.mark.parametrize(
    ("host", "allowed"),
    [("127.0.0.1", ["127.0.0.0/8"]), ("127.0.0.1", ["10.0.0.0/8", "127.0.0.1"]), ("::", ["127.0.0.1"])],
    ids=["network", "address", "ipv4-client-of-an-ipv6-listener"],
)
@pytest_twisted.ensureDeferred
async def test_a_peer_in_proxy_protocol_from_is_served_with_the_address_it_carries(
    origin: Origin, gateway_for: Any, tmp_path: Path, host: str, allowed: list[str]
) -> None:
    """A listed peer (by network or by address; on a "::" listener an IPv4 peer, which arrives as
    "::ffff:127.0.0.1", by its IPv4 address) is a load balancer: its header is read and the address it carries
    is the client's. Nothing is counted and no warning is given at start."""
    data = config(origin, tmp_path, allowed=allowed)
    data["listeners"][0]["host"] = host
    with captured(in_namespace("gateway.service")) as events:
        gateway = gateway_for(data)
    client = await exchange(gateway.port, v1("203.0.113.9") + GET_HEADERS)
    echo = json.loads(client.response().body)
    assert [v for k, v in echo["headers"] if k.lower() == "x-forwarded-for"] == ["203.0.113.9"]
    assert refusals(gateway, "peer_not_allowed") == 0
    assert not [e for e in events if "from any peer" in e["log_format"]]


def test_a_proxy_protocol_listener_open_to_any_peer_is_warned_about_at_start(
    origin: Origin, gateway_for: Any, tmp_path: Path
) -> None:
    """Without proxy_protocol_from the listener takes a header from anyone: a warning at start says so, naming
    the listener and what to set."""
    with captured(in_namespace("gateway.service")) as events:
        gateway = gateway_for(config(origin, tmp_path))
    [warning] = [e for e in events if "from any peer" in e["log_format"]]
    assert warning["log_level"].name == "warn"
    assert warning["listener"] == gateway.config.listeners[0].describe()
    assert "proxy_protocol_from" in warning["log_format"]


@pytest.mark.parametrize(
    "port",
    ["65536", "99999", "18446744073709551696", "-1"],
    ids=["65536", "99999", "2^64+80", "negative"],
)
@pytest_twisted.ensureDeferred
async def test_a_header_whose_source_port_is_no_port_is_closed_unanswered(
    origin: Origin, gateway_for: Any, tmp_path: Path, port: str
) -> None:
    """A port outside 0-65535 (2^64 + 80 is 80 to a parser that wraps around) is an invalid header: the
    connection is closed unanswered, counted as invalid_address, and nothing reaches the upstream."""
    gateway = gateway_for(config(origin, tmp_path))
    client = await exchange(gateway.port, v1("203.0.113.9", source_port=port) + GET_HEADERS)
    assert bytes(client.head) == b""
    assert origin.seen == []
    assert refusals(gateway, "invalid_address") == 1
