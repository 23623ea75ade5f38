"""The `twistd gateway` plugin and `gateway.tap`: discovery, option parsing, `--check` and `makeService`."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.scripts.twistd import ServerOptions

from gateway import tap
from gateway.config import Config
from gateway.operations.listeners import ListenerService
from gateway.operations.service import GatewayService
from gateway.operations.workers import WorkerPool

REPO = Path(__file__).resolve().parent.parent

VALID = """\
[[listeners]]
host = "127.0.0.1"
port = 0

[[listeners]]
host = "127.0.0.1"
port = 0
backlog = 17

[[routes]]
name = "all"
auth = "anonymous"
path_prefix = "/"
upstream = "http://127.0.0.1:1"
"""

INVALID = """\
[[listeners]]
host = "127.0.0.1"
port = 70000

[[routes]]
name = "all"
auth = "anonymous"
upstream = "http://127.0.0.1:1"
"""


def write(tmp_path: Path, text: str, name: str = "gateway.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def gateway_makers() -> list[IServiceMaker]:
    return [maker for maker in getPlugins(IServiceMaker) if maker.tapname == "gateway"]


def test_plugin_is_discovered() -> None:
    """`getPlugins(IServiceMaker)` finds exactly one service maker with tapname "gateway"."""
    assert len(gateway_makers()) == 1


def test_plugin_points_at_tap() -> None:
    """The discovered service maker resolves to `gateway.tap`'s `Options` and `makeService`."""
    [maker] = gateway_makers()
    assert maker.options is tap.Options
    assert maker.makeService is tap.makeService


def test_importing_plugin_imports_none_of_the_gateway() -> None:
    """Importing the plugin module (as `twistd --help` does) leaves `gateway.tap` and the rest of `gateway` unloaded."""
    code = (
        "import json, sys\n"
        "import twisted.plugins.gateway_plugin\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'gateway' or m.startswith('gateway.'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "gateway.tap" not in loaded
    assert loaded == []


def test_no_init_files_under_twisted() -> None:
    """The repository ships no `twisted/__init__.py` or `twisted/plugins/__init__.py`, which would hide Twisted."""
    assert (REPO / "twisted" / "plugins" / "gateway_plugin.py").is_file()
    assert not (REPO / "twisted" / "__init__.py").exists()
    assert not (REPO / "twisted" / "plugins" / "__init__.py").exists()


def test_options_load_the_config_file(tmp_path: Path) -> None:
    """`--config FILE` loads and validates FILE into a `Config` on `options.config`."""
    path = write(tmp_path, VALID)
    options = tap.Options()
    options.parseOptions(["--config", str(path)])
    assert isinstance(options.config, Config)
    assert options.config.source == str(path)
    assert [(listener.port, listener.backlog) for listener in options.config.listeners] == [(0, 511), (0, 17)]
    assert [route.name for route in options.config.routes] == ["all"]


def test_short_option_c_loads_the_config_file(tmp_path: Path) -> None:
    """`-c FILE` is the same as `--config FILE`."""
    path = write(tmp_path, VALID)
    options = tap.Options()
    options.parseOptions(["-c", str(path)])
    assert options.config.source == str(path)


def test_check_on_valid_file_prints_ok_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--check` on a valid file prints one "OK" line naming the file and exits with status 0."""
    path = write(tmp_path, VALID)
    with pytest.raises(SystemExit) as exited:
        tap.Options().parseOptions(["--config", str(path), "--check"])
    assert exited.value.code == 0
    out, err = capsys.readouterr()
    assert out == f"gateway: {path}: OK\n"
    assert err == ""


def test_invalid_file_prints_file_key_reason_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid file prints `gateway: <file>: <key>: <reason>` on stderr and exits with status 1."""
    path = write(tmp_path, INVALID)
    with pytest.raises(SystemExit) as exited:
        tap.Options().parseOptions(["--config", str(path)])
    assert exited.value.code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert (
        err == f'gateway: {path}: listeners["127.0.0.1:70000"].port: must be a port number from 0 to 65535, got 70000\n'
    )


def test_check_on_invalid_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--check` on an invalid file exits with status 1 and never prints "OK"."""
    path = write(tmp_path, INVALID)
    with pytest.raises(SystemExit) as exited:
        tap.Options().parseOptions(["--config", str(path), "--check"])
    assert exited.value.code == 1
    out, err = capsys.readouterr()
    assert "OK" not in out
    assert err.startswith(f'gateway: {path}: listeners["127.0.0.1:70000"].port: ')


THREE_ERRORS = """\
[server]
idle_timeout = "soon"

[[listeners]]
host = "127.0.0.1"
port = 70000

[upstreams.api]
urls = "http://127.0.0.1:8081"

[[routes]]
name = "all"
auth = "anonymous"
upstream = "api"
"""


def test_check_on_a_file_with_three_errors_prints_each_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--check` on a file with three errors prints the three, one `gateway: <file>: <key>: <reason>` line each,
    and exits with status 1 (the route naming the refused upstream adds nothing)."""
    path = write(tmp_path, THREE_ERRORS)
    with pytest.raises(SystemExit) as exited:
        tap.Options().parseOptions(["--config", str(path), "--check"])
    assert exited.value.code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f'gateway: {path}: server.idle_timeout: must be seconds as a number or a string such as "250ms", '
        '"30s", "2m", got \'soon\'',
        f'gateway: {path}: listeners["127.0.0.1:70000"].port: must be a port number from 0 to 65535, got 70000',
        f'gateway: {path}: upstreams.api.urls: unknown key; did you mean "url"?',
    ]


def test_missing_file_prints_file_and_reason_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config file that does not exist prints `gateway: <file>: <reason>` on stderr and exits with status 1."""
    path = tmp_path / "absent.toml"
    with pytest.raises(SystemExit) as exited:
        tap.Options().parseOptions(["--config", str(path)])
    assert exited.value.code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"gateway: {path}: cannot read the file: No such file or directory\n"


@pytest.mark.parametrize(("logger", "json"), [(["--logger=gateway.logs.observer"], True), ([], False)])
def test_workers_log_json_when_twistd_does(tmp_path: Path, logger: list[str], json: bool) -> None:
    """twistd has imported `--logger` into the observer factory by the time the service is made: the gateway
    tells that its own JSON observer is the one (and its workers then log JSON too) from the factory itself."""
    twistd = ServerOptions()
    twistd.parseOptions(["--nodaemon", *logger, "gateway", "--config", str(write(tmp_path, VALID))])
    assert tap.logs_json(twistd) is json


def test_make_service_builds_a_listener_service_per_listener(tmp_path: Path) -> None:
    """`makeService` returns a stopped `GatewayService` with one unbound `ListenerService` per listener, in order."""
    options = tap.Options()
    options.parseOptions(["--config", str(write(tmp_path, VALID))])
    service = tap.makeService(options)
    assert isinstance(service, GatewayService)
    assert not service.running
    assert service.config is options.config
    assert all(isinstance(child, ListenerService) for child in service.listeners)
    assert [child.listener for child in service.listeners] == list(options.config.listeners)
    assert list(service) == service.listeners
    assert all(child.port is None for child in service.listeners)


def test_make_service_with_workers_owns_a_worker_pool(tmp_path: Path) -> None:
    """With `workers = 2` in the file, `makeService` gives the twistd process a pool of one worker, not started."""
    text = VALID.replace("port = 0", "port = 8080", 1).replace("port = 0", "port = 8081", 1)
    options = tap.Options()
    options.parseOptions(["--config", str(write(tmp_path, "[server]\nworkers = 2\n\n" + text))])
    service = tap.makeService(options)
    assert isinstance(service, GatewayService)
    assert isinstance(service.workers, WorkerPool)
    assert service.workers.count == 1
    assert not service.workers.running


def test_version_prints_the_gateway_twisted_python_and_openssl_versions(capsys: pytest.CaptureFixture[str]) -> None:
    """`twistd gateway --version` prints the gateway's version (from the package metadata: pyproject.toml is the
    one place it is written), then Twisted's, Python's and OpenSSL's, and exits 0 without reading a config."""
    import platform

    import gateway
    import twisted

    with pytest.raises(SystemExit) as done:
        tap.Options().parseOptions(["--config", "/nonexistent.toml", "--version"])
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"gateway {gateway.__version__}"
    assert lines[1:3] == [f"Twisted {twisted.__version__}", f"Python {platform.python_version()}"]
    assert lines[3].startswith("OpenSSL ") and "(pyOpenSSL " in lines[3]
    assert lines[4] in ("Build: request path compiled", "Build: request path interpreted")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert gateway.__version__ == declared
