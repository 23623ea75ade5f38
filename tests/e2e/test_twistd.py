"""`twistd gateway` as a real process: discovery, `--check`, config errors, a proxied download and SIGTERM.

Subprocess tier: every process is started with `subprocess.Popen` (`tests.support.processes`), read with
bounded waits and stopped by its PID in teardown (the `spawn` fixture); everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.clients import parse_response
from tests.support.processes import (
    LISTENING,
    START_TIMEOUT,
    STOP_TIMEOUT,
    TWISTD,
    Child,
    fetch,
    free_port,
    run,
    start,
    wait_until_gone,
)

REPO = Path(__file__).resolve().parents[2]


def test_twistd_help_lists_gateway(tmp_path: Path) -> None:
    """`twistd --help` lists `gateway` among its commands."""
    done = run([str(TWISTD), "--help"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\s+gateway\s+Streaming HTTP API gateway", done.stdout, re.MULTILINE), done.stdout


def test_version_prints_the_versions_and_exits_0(tmp_path: Path) -> None:
    """`twistd gateway --version` (a real process) prints the gateway's version first, then Twisted's, Python's
    and OpenSSL's, and its build, and exits 0 without a config file."""
    import gateway

    done = run([str(TWISTD), "gateway", "--version"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"gateway {gateway.__version__}"
    assert [line.split()[0] for line in lines] == ["gateway", "Twisted", "Python", "OpenSSL", "Build:"]
    assert not (tmp_path / "twistd.log").exists()


def test_check_on_example_config_exits_0_and_prints_ok() -> None:
    """`twistd gateway --config etc/gateway.toml --check` prints OK and exits 0 without starting anything."""
    done = run([str(TWISTD), "gateway", "--config", "etc/gateway.toml", "--check"], cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "gateway: etc/gateway.toml: OK\n"
    assert done.stderr == ""


def test_invalid_config_exits_1_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    """An invalid config makes `twistd gateway` exit 1 with `gateway: file: key: reason` and no traceback."""
    path = tmp_path / "bad.toml"
    path.write_text(
        '[[listeners]]\nhost = "127.0.0.1"\nport = 0\n\n'
        '[[routes]]\nname = "all"\nauth = "anonymous"\nupstream = "http://127.0.0.1:1"\n'
        "[routes.timeouts]\nconnect = -1\n"
    )
    done = run([str(TWISTD), "--nodaemon", "--pidfile=", "gateway", "--config", str(path)], cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert (
        done.stderr
        == f'gateway: {path}: routes["all"].timeouts.connect: must be a positive number of seconds, got -1\n'
    )
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "twistd.log").exists()


def test_check_prints_every_error_of_the_file_and_exits_1(tmp_path: Path) -> None:
    """`twistd gateway --check` on a file with three errors in three sections prints the three, one line each,
    and exits 1 without a traceback."""
    path = tmp_path / "bad.toml"
    path.write_text(
        '[server]\nidle_timeout = "soon"\n\n'
        '[[listeners]]\nhost = "127.0.0.1"\nport = 70000\n\n'
        '[[routes]]\nname = "all"\nauth = "anonymous"\nupstream = "http://127.0.0.1:1"\n'
        "[routes.timeouts]\nconect = 1\n"
    )
    done = run([str(TWISTD), "gateway", "--config", str(path), "--check"], cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f'gateway: {path}: server.idle_timeout: must be seconds as a number or a string such as "250ms", '
        '"30s", "2m", got \'soon\'',
        f'gateway: {path}: listeners["127.0.0.1:70000"].port: must be a port number from 0 to 65535, got 70000',
        f'gateway: {path}: routes["all"].timeouts.conect: unknown key; did you mean "connect"?',
    ]


def test_missing_config_exits_1_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    """A config file that does not exist makes `twistd gateway --check` exit 1 with one line and no traceback."""
    path = tmp_path / "absent.toml"
    done = run([str(TWISTD), "gateway", "--config", str(path), "--check"], cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr == f"gateway: {path}: cannot read the file: No such file or directory\n"
    assert "Traceback" not in done.stdout + done.stderr


@pytest.fixture
def served(tmp_path: Path, spawn: list[Child]) -> tuple[Child, int]:
    """The demo upstream and `twistd gateway` in front of it, both on free loopback ports; twistd and its port."""
    demo = start(spawn, [sys.executable, "-m", "gateway.demo", "--port", "0"], tmp_path, "demo")
    address = json.loads(demo.wait_for_line(re.compile(r"^\{.*\}$"), START_TIMEOUT).group(0))
    assert address["host"] == "127.0.0.1"
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[[listeners]]\nhost = "127.0.0.1"\nport = 0\n\n'
        f'[[routes]]\nname = "demo"\nauth = "anonymous"\npath_prefix = "/"\nupstream = "http://127.0.0.1:{address["port"]}"\n'
    )
    twistd = start(
        spawn,
        [str(TWISTD), "--nodaemon", "--pidfile=", "--logfile=-", "gateway", "--config", str(config)],
        tmp_path,
        "twistd",
    )
    port = int(twistd.wait_for_line(LISTENING, START_TIMEOUT).group(1))
    return twistd, port


def test_proxies_a_one_mib_download(served: tuple[Child, int]) -> None:
    """`twistd gateway` in front of the demo serves `/report?size=1048576` whole: status 200 and 1 MiB of CSV."""
    _, port = served
    response = parse_response(fetch(port, "/report?size=1048576"))
    assert response.status == 200
    assert response.header(b"content-length") == b"1048576"
    assert response.complete
    assert len(response.body) == 1048576
    assert response.body.startswith(b"id,region,product,amount,status")


def test_sigterm_stops_twistd_promptly(served: tuple[Child, int]) -> None:
    """On SIGTERM, `twistd gateway` (having served a request) shuts down cleanly within a bounded time."""
    twistd, port = served
    assert parse_response(fetch(port, "/report?size=1000")).status == 200
    os.kill(twistd.proc.pid, signal.SIGTERM)
    try:
        returncode = twistd.proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"twistd still running {STOP_TIMEOUT} s after SIGTERM; {twistd.output()}")
    log = twistd.rest_of_output()
    # twistd re-raises SIGTERM on itself after the orderly stop: -15 (143 in a shell); 0 would also be clean.
    assert returncode in (-signal.SIGTERM, 0), twistd.output()
    assert "Server Shut Down." in log, twistd.output()
    assert "Traceback" not in log + twistd.stderr()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_port_in_use_exits_1_naming_the_address(tmp_path: Path) -> None:
    """A listener on a port that is already taken makes `twistd gateway` exit 1, naming the address in its log."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'[[listeners]]\nhost = "127.0.0.1"\nport = {port}\n\n'
            '[[routes]]\nname = "all"\nauth = "anonymous"\nupstream = "http://127.0.0.1:1"\n'
        )
        done = run(
            [str(TWISTD), "--nodaemon", "--pidfile=", "--logfile=-", "gateway", "--config", str(config)], tmp_path
        )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"Couldn't listen on 127.0.0.1:{port}" in done.stdout + done.stderr


def _demo(spawn: list[Child], tmp_path: Path) -> int:
    demo = start(spawn, [sys.executable, "-m", "gateway.demo", "--port", "0"], tmp_path, "demo")
    return int(json.loads(demo.wait_for_line(re.compile(r"^\{.*\}$"), START_TIMEOUT).group(0))["port"])


def _config(tmp_path: Path, demo_port: int, port: int, extra: str = "") -> Path:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'{extra}[[listeners]]\nhost = "127.0.0.1"\nport = {port}\n\n'
        f'[[routes]]\nname = "demo"\nauth = "anonymous"\npath_prefix = "/"\nupstream = "http://127.0.0.1:{demo_port}"\n'
    )
    return config


def test_a_daemon_writes_the_default_access_log_into_its_log_file(tmp_path: Path, spawn: list[Child]) -> None:
    """`twistd gateway` without --nodaemon detaches and sends its standard output to /dev/null: the access log's
    default path "-" then means twistd's log file, so a request's line is found there (as one JSON line after
    twistd's prefix). The daemon is stopped by the PID its pidfile names."""
    port = free_port()
    config = _config(tmp_path, _demo(spawn, tmp_path), port)
    pidfile, logfile = tmp_path / "twistd.pid", tmp_path / "twistd.log"
    done = run(
        [str(TWISTD), f"--pidfile={pidfile}", f"--logfile={logfile}", "gateway", "--config", str(config)],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    deadline = time.monotonic() + START_TIMEOUT
    while not pidfile.exists() or "listening on" not in (logfile.read_text() if logfile.exists() else ""):
        assert time.monotonic() < deadline, logfile.read_text() if logfile.exists() else "no log file"
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    try:
        assert parse_response(fetch(port, "/report?size=1000")).status == 200
        lines: list[dict[str, object]] = []
        while not lines:
            assert time.monotonic() < deadline + 10, logfile.read_text()
            time.sleep(0.05)
            lines = [
                json.loads(line.partition("] ")[2])
                for line in logfile.read_text().splitlines()
                if "[gateway.access" in line
            ]
        assert [(line["path"], line["status"], line["ending"]) for line in lines] == [("/report", 200, "completed")]
    finally:
        os.kill(pid, signal.SIGTERM)
        assert wait_until_gone(pid, STOP_TIMEOUT)


def test_a_daemon_with_workers_is_refused_saying_what_to_do(tmp_path: Path) -> None:
    """Worker processes log to the standard output they share with twistd, which a daemon discards: started as
    a daemon with server.workers above 1, `twistd gateway` exits 1 with one line that says what to do."""
    config = _config(tmp_path, 1, free_port(), extra="[server]\nworkers = 2\n\n")
    done = run(
        [str(TWISTD), f"--pidfile={tmp_path / 'p.pid'}", "--logfile=-", "gateway", "--config", str(config)],
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "server.workers: 2 worker processes log to the standard output" in done.stderr
    assert "twistd --nodaemon" in done.stderr
    assert not (tmp_path / "p.pid").exists()
