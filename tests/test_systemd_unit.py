"""etc/gateway.service and etc/gateway.socket: systemd accepts them, and they say what the docs promise.

`systemd-analyze verify` parses the units as systemd would, without a running systemd. It reports unknown keys and
unparsable values on stderr but still exits 0, so stderr is checked as well as the exit status.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config
from gateway.operations import workers

ETC = Path(__file__).resolve().parent.parent / "etc"
SERVICE = ETC / "gateway.service"
SOCKET = ETC / "gateway.socket"
INSTALLED_TWISTD = "/opt/gateway/bin/twistd"

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Each section's `(key, value)` assignments, in order and repeats kept (systemd allows both); comments
    and blank lines dropped, backslash-continued lines joined as systemd joins them."""
    unit: Unit = {}
    section: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":  # also between continued lines, which systemd skips too
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], [])
            continue
        assert section is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        section.append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def value(unit: Unit, section: str, key: str) -> str:
    """The one value of `key` (a test of a setting that is given more than once would be ambiguous)."""
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}: expected one assignment, found {found}"
    return found[0]


def seconds(span: str) -> float:
    """A systemd time span of the plain kinds the unit uses: "45", "45s", "1min 30s"."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts and "".join(n + u for n, u in parts) == span.replace(" ", ""), f"unsupported time span {span!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def service() -> Unit:
    return parse_unit(SERVICE.read_text())


@pytest.fixture(scope="module")
def socket_unit() -> Unit:
    return parse_unit(SOCKET.read_text())


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        message = "systemd-analyze is not on PATH: install Debian's `systemd` package to verify the unit files"
        if os.environ.get("GATEWAY_REQUIRE_SYSTEMD_ANALYZE") == "1":
            pytest.fail(message + " (GATEWAY_REQUIRE_SYSTEMD_ANALYZE=1)")
        pytest.skip(message)
    # verify checks that every Exec command exists: point them at this venv's twistd instead of /opt/gateway's.
    twistd = Path(sys.executable).parent / "twistd"
    assert twistd.is_file(), f"{twistd} is missing: the venv has no twistd"
    units = []
    for source in (SERVICE, SOCKET):
        copy = tmp_path / source.name
        copy.write_text(source.read_text().replace(INSTALLED_TWISTD, str(twistd)))
        units.append(copy)
    command = [analyze, "verify", "--man=no", *map(str, units)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    output = (
        f"$ {shlex.join(command)}\nexit status {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    assert result.returncode == 0, output
    # Only lines about our units count: without a running systemd (a container, a build machine) verify may also
    # complain about the machine itself, which says nothing about these files.
    about_units = [
        line for line in result.stderr.splitlines() if str(tmp_path) in line or any(unit.name in line for unit in units)
    ]
    assert about_units == [], output


def test_the_twistd_path_is_replaced_everywhere(service: Unit) -> None:
    """The verify test rewrites /opt/gateway/bin/twistd; every Exec line must use exactly that path."""
    for key in ("ExecStartPre", "ExecStart"):
        for line in values(service, "Service", key):
            assert shlex.split(line)[0] == INSTALLED_TWISTD, f"{key}={line}"


def test_readiness_is_notified_by_the_main_process(service: Unit) -> None:
    assert value(service, "Service", "Type") == "notify"
    assert value(service, "Service", "NotifyAccess") == "main"


def test_exec_start_runs_in_the_foreground_with_the_gateway_logger(service: Unit) -> None:
    argv = shlex.split(value(service, "Service", "ExecStart"))
    twistd_options, plugin = argv[1 : argv.index("gateway")], argv[argv.index("gateway") :]
    assert "--nodaemon" in twistd_options
    assert "--pidfile=" in twistd_options
    assert "--logger=gateway.logs.observer" in twistd_options
    assert plugin == ["gateway", "--config", "/etc/gateway/gateway.toml"]


def test_the_config_is_checked_before_start(service: Unit) -> None:
    argv = shlex.split(value(service, "Service", "ExecStartPre"))
    assert argv[1:] == ["gateway", "--config", "/etc/gateway/gateway.toml", "--check"]


def test_reload_sends_sighup_to_the_main_process(service: Unit) -> None:
    assert shlex.split(value(service, "Service", "ExecReload")) == ["/bin/kill", "-HUP", "$MAINPID"]


def test_stop_leaves_time_to_drain(service: Unit) -> None:
    assert value(service, "Service", "KillMode") == "mixed"
    assert value(service, "Service", "KillSignal") == "SIGTERM"
    timeout = seconds(value(service, "Service", "TimeoutStopSec"))
    assert timeout > 30
    # Workers drain alongside the main process and get SIGKILL drain_timeout + 10 s + KILL_TIMEOUT after SIGTERM.
    assert timeout > config.Server().drain_timeout + 10 + workers.KILL_TIMEOUT


def test_restart_and_limits(service: Unit) -> None:
    assert value(service, "Service", "Restart") == "on-failure"
    assert int(value(service, "Service", "LimitNOFILE")) >= 65536


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("RestrictNamespaces", "yes"),
        ("LogsDirectory", "gateway"),
        ("ConfigurationDirectory", "gateway"),
    ],
)
def test_sandboxing(service: Unit, key: str, expected: str) -> None:
    assert value(service, "Service", key) == expected


def test_the_only_capability_is_binding_low_ports(service: Unit) -> None:
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert " ".join(values(service, "Service", key)).split() == ["CAP_NET_BIND_SERVICE"], key


def test_address_families(service: Unit) -> None:
    families = " ".join(values(service, "Service", "RestrictAddressFamilies")).split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]


def test_memory_deny_write_execute_stays_off(service: Unit) -> None:
    """pyOpenSSL's callbacks (cffi's ffi.callback) need writable and executable memory: with it, TLS fails."""
    assert values(service, "Service", "MemoryDenyWriteExecute") in ([], ["no"])


def test_socket_activation_is_optional(service: Unit) -> None:
    for section in service.values():
        for key, v in section:
            assert "gateway.socket" not in v, f"{key}={v}"
    assert value(service, "Install", "WantedBy") == "multi-user.target"


def test_socket_unit(socket_unit: Unit) -> None:
    assert value(socket_unit, "Socket", "ListenStream") == "8080"
    assert value(socket_unit, "Socket", "FileDescriptorName") == "http"
    assert value(socket_unit, "Socket", "Service") == "gateway.service"
    assert value(socket_unit, "Install", "WantedBy") == "sockets.target"


def test_parse_unit_keeps_repeats_and_joins_continuations() -> None:
    unit = parse_unit("# c\n[A]\nX=1\n; c\nX=2\nY=a \\\n# c\n  b\n")
    assert unit == {"A": [("X", "1"), ("X", "2"), ("Y", "a b")]}
