"""`twistd gateway` with `workers = 2`: two processes share the port, both serve, no worker outlives twistd, and
one admin listener (twistd's) answers for both.

Subprocess tier: the demo upstream and twistd are started with `subprocess.Popen` and stopped by their PIDs (the
`spawn` fixture); the worker twistd starts is not our child, so it is watched through /proc and, if it is still
running after a test, killed by its PID. Everything listens on 127.0.0.1; every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from gateway.operations.workers import config_frame
from tests.support.certs import Issued, issue, write_ca
from tests.support.clients import Parsed, parse_response
from tests.support.processes import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    TWISTD,
    Child,
    children_of,
    command_line,
    established_on,
    fetch,
    free_port,
    is_alive,
    kill_if_ours,
    listening_ports,
    start,
    wait_until_gone,
)
from tests.support.scrape import Scrape, parse_metrics

LISTENING = re.compile(r"gateway listening on 127\.0\.0\.1:(\d+)(?: for HTTPS)? \(pid (\d+)\)")
WORKER_STARTED = re.compile(r"gateway worker 1 started \(pid (\d+)\)")
ADMIN_LISTENING = re.compile(r"admin listening on 127\.0\.0\.1:(\d+) \(pid (\d+)\)")
CONNECTIONS = 40
"""Connections held open at once: the kernel hashes each to one of the two sockets, so all 40 landing in one
process has a chance of 2 in 2**40."""


@dataclass
class Workers:
    twistd: Child
    port: int
    config: Path
    worker_pid: int
    admin: int


def start_workers(tmp_path: Path, spawn: list[Child], listener: str = "", extra: str = "") -> Workers:
    """The demo upstream and `twistd gateway` with `workers = 2` in front of it, both processes listening and
    serving, with an admin listener; `listener` is TOML added to the listener's table, `extra` at the end of the
    file."""
    demo = start(spawn, [sys.executable, "-m", "gateway.demo", "--port", "0"], tmp_path, "demo")
    upstream = json.loads(demo.wait_for_line(re.compile(r"^\{.*\}$"), START_TIMEOUT).group(0))
    port, admin = free_port(), free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\nworkers = 2\n\n[admin]\nhost = "127.0.0.1"\nport = {admin}\n\n'
        f'[[listeners]]\nhost = "127.0.0.1"\nport = {port}\n{listener}\n'
        f'[[routes]]\nname = "demo"\nauth = "anonymous"\npath_prefix = "/"\nupstream = "http://127.0.0.1:{upstream["port"]}"\n'
        f"{extra}"
    )
    twistd = start(
        spawn,
        # The config path is relative: the worker must still find the same file.
        [str(TWISTD), "--nodaemon", "--pidfile=", "--logfile=-", "gateway", "--config", config.name],
        tmp_path,
        "twistd",
    )
    listening = [twistd.wait_for_line(LISTENING, START_TIMEOUT) for _ in range(2)]
    assert {int(found.group(1)) for found in listening} == {port}, twistd.output()
    started = [m for line in twistd.lines if (m := WORKER_STARTED.search(line))]
    assert len(started) == 1, twistd.output()
    worker_pid = int(started[0].group(1))
    assert {int(found.group(2)) for found in listening} == {twistd.proc.pid, worker_pid}, twistd.output()
    admins = [m.groups() for line in twistd.lines if (m := ADMIN_LISTENING.search(line))]
    assert admins == [(str(admin), str(twistd.proc.pid))], twistd.output()
    # Serving: the worker's reactor runs, so SIGTERM reaches Twisted's handler rather than killing it outright.
    twistd.wait_for_line(re.compile(rf"gateway worker 1 \(pid {worker_pid}\) serving"), START_TIMEOUT)
    return Workers(twistd, port, config, worker_pid, admin)


@pytest.fixture
def workers(tmp_path: Path, spawn: list[Child]) -> Iterator[Workers]:
    started = start_workers(tmp_path, spawn)
    yield started
    kill_if_ours(started.worker_pid, "gateway.operations.worker")


@dataclass
class TLSWorkers:
    workers: Workers
    ca: trustme.CA
    served: Issued
    trust: Path


@pytest.fixture
def tls_workers(tmp_path: Path, spawn: list[Child]) -> Iterator[TLSWorkers]:
    """`workers` with an HTTPS listener, its certificate issued for gateway.test by a CA made now."""
    ca = trustme.CA()
    served = issue(ca, tmp_path / "certs", "gateway.test")
    listener = (
        "\n[listeners.tls]\n\n[[listeners.tls.certificates]]\n"
        f'certificate = "{served.certificate}"\nkey = "{served.key}"\nchain = "{served.chain}"\n'
    )
    started = start_workers(tmp_path, spawn, listener)
    yield TLSWorkers(started, ca, served, write_ca(ca, tmp_path / "trust.pem"))
    kill_if_ours(started.worker_pid, "gateway.operations.worker")


def get_on(sock: socket.socket, target: str, timeout: float = 30.0) -> Parsed:
    """One keep-alive `GET target` on an open connection, read until the response is complete (with a deadline)."""
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: gateway.test\r\n\r\n".encode())
    deadline = time.monotonic() + timeout
    received = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"response not complete within {timeout} s: {bytes(received)!r}")
        sock.settimeout(left)
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"connection closed before the response was complete: {bytes(received)!r}")
        received += data
        try:
            response = parse_response(bytes(received))
        except ValueError:
            continue
        if response.complete:
            return response


def test_two_workers_are_twistd_and_one_child(workers: Workers) -> None:
    """With `workers = 2`, twistd has exactly one child process: `gateway.operations.worker` with index 1 on the same
    config file, given as an absolute path."""
    assert children_of(workers.twistd.proc.pid) == {workers.worker_pid}
    argv = command_line(workers.worker_pid)
    assert argv[1:] == [
        "-m",
        "gateway.operations.worker",
        "--config",
        str(workers.config),
        "--index",
        "1",
        "--channel-fd",
        "3",
    ]
    assert os.path.isabs(argv[4])


def test_connections_are_served_by_both_processes(workers: Workers) -> None:
    """Forty connections held open at once, each answered, are spread by the kernel over both processes."""
    pids = [workers.twistd.proc.pid, workers.worker_pid]
    sockets: list[socket.socket] = []
    try:
        for _ in range(CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", workers.port), timeout=30)
            sockets.append(sock)
            response = get_on(sock, "/report?size=100")
            assert (response.status, len(response.body)) == (200, 100)
        counts = {pid: established_on(pid, workers.port) for pid in pids}
    finally:
        for sock in sockets:
            sock.close()
    assert sum(counts.values()) == CONNECTIONS, counts
    assert all(count > 0 for count in counts.values()), counts


def test_sigterm_stops_twistd_and_its_worker(workers: Workers) -> None:
    """SIGTERM to twistd stops the worker too: twistd exits within a bounded time, after logging the worker's
    clean exit, and leaves no worker behind."""
    twistd = workers.twistd
    os.kill(twistd.proc.pid, signal.SIGTERM)
    try:
        returncode = twistd.proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"twistd still running {STOP_TIMEOUT} s after SIGTERM; {twistd.output()}")
    assert not is_alive(workers.worker_pid)
    log = twistd.rest_of_output()
    assert returncode == 0, twistd.output()  # a graceful stop is a clean exit (gateway.operations.signals)
    assert f"gateway worker 1 (pid {workers.worker_pid}) exited with status 0" in log, twistd.output()
    assert "Server Shut Down." in log, twistd.output()
    assert "Traceback" not in log + twistd.stderr()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", workers.port), timeout=5).close()


def spread(
    port: int,
    pids: list[int],
    target: str = "/report?size=100",
    over: Callable[[socket.socket], socket.socket] = lambda sock: sock,
) -> dict[int, int]:
    """Open `CONNECTIONS` keep-alive connections, each answered 200 on `target`; how many each pid holds.
    `over` makes each connection what the requests go over (a TLS socket, say)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(CONNECTIONS):
            sock = over(socket.create_connection(("127.0.0.1", port), timeout=30))
            sockets.append(sock)
            assert get_on(sock, target).status == 200
        # Read until the counts settle (at most 5 s): on a loaded machine a process's table was seen holding one
        # or two more established sockets on the port for a moment (41 to 43 of 40).
        deadline = time.monotonic() + 5
        while True:
            counts = {pid: established_on(pid, port) for pid in pids}
            if sum(counts.values()) == CONNECTIONS or time.monotonic() > deadline:
                return counts
            time.sleep(0.05)
    finally:
        for sock in sockets:
            sock.close()


def test_a_killed_worker_is_restarted_and_serves_again(workers: Workers) -> None:
    """A worker killed outright is replaced at once by a new worker process, which serves: connections are
    spread over twistd and the new worker."""
    twistd = workers.twistd
    os.kill(workers.worker_pid, signal.SIGKILL)
    found = twistd.wait_for_line(WORKER_STARTED, START_TIMEOUT)
    new_pid = int(found.group(1))
    try:
        assert new_pid != workers.worker_pid
        twistd.wait_for_line(re.compile(rf"gateway worker 1 \(pid {new_pid}\) serving"), START_TIMEOUT)
        assert children_of(twistd.proc.pid) == {new_pid}
        log = "".join(twistd.lines)
        assert f"gateway worker 1 (pid {workers.worker_pid}) was killed by signal 9 (SIGKILL) unexpectedly" in log
        counts = spread(workers.port, [twistd.proc.pid, new_pid])
        assert sum(counts.values()) == CONNECTIONS and all(counts.values()), counts
    finally:
        kill_if_ours(new_pid, "gateway.operations.worker")


def test_a_worker_serves_the_config_twistd_read_not_the_file_as_it_is_now(workers: Workers) -> None:
    """The config is read once, by twistd: a file edited since (not reloaded) changes no process, not even a
    worker started after the edit (one killed and restarted gets the bytes twistd read and checked), and a
    SIGHUP then gives every worker the bytes twistd read for the reload."""
    twistd = workers.twistd
    text = workers.config.read_text()
    workers.config.write_text(text.replace('path_prefix = "/"', 'path_prefix = "/elsewhere"'))
    os.kill(workers.worker_pid, signal.SIGKILL)
    new_pid = int(twistd.wait_for_line(WORKER_STARTED, START_TIMEOUT).group(1))
    try:
        twistd.wait_for_line(re.compile(rf"gateway worker 1 \(pid {new_pid}\) serving"), START_TIMEOUT)
        counts = spread(workers.port, [twistd.proc.pid, new_pid])  # every connection: 200 on /report
        assert sum(counts.values()) == CONNECTIONS and all(counts.values()), counts
        workers.config.write_text(text.replace('path_prefix = "/"', 'path_prefix = "/report"'))
        os.kill(twistd.proc.pid, signal.SIGHUP)
        reloaded = re.compile(r"Reloaded .*gateway\.toml: 1 routes, 1 listeners \(pid (\d+)\)")
        pids = {int(twistd.wait_for_line(reloaded, START_TIMEOUT).group(1)) for _ in range(2)}
        assert pids == {twistd.proc.pid, new_pid}, twistd.output()
        workers.config.write_text(text.replace('path_prefix = "/"', 'path_prefix = "/elsewhere"'))  # not read
        counts = spread(workers.port, sorted(pids), "/report?size=100")
        assert sum(counts.values()) == CONNECTIONS and all(counts.values()), counts
    finally:
        kill_if_ours(new_pid, "gateway.operations.worker")


def test_sighup_to_a_worker_is_ignored(workers: Workers) -> None:
    """A worker's reloads come from twistd: a SIGHUP sent to the worker itself is logged and changes nothing."""
    os.kill(workers.worker_pid, signal.SIGHUP)
    workers.twistd.wait_for_line(re.compile(r"SIGHUP ignored: a worker reloads with the config"), START_TIMEOUT)
    assert is_alive(workers.worker_pid)


def test_sighup_reloads_every_process(workers: Workers) -> None:
    """SIGHUP to twistd reloads it and its worker: both log the reload, and a route the new file adds answers
    on every connection, whichever process takes it."""
    twistd = workers.twistd
    text = workers.config.read_text()
    upstream = re.search(r'upstream = "([^"]+)"', text)
    assert upstream is not None
    workers.config.write_text(
        text.replace('path_prefix = "/"', 'path_prefix = "/report"')
        + f'\n[[routes]]\nname = "added"\nauth = "anonymous"\npath_prefix = "/added"\nstrip_prefix = true\n'
        f'upstream = "{upstream.group(1)}"\n'
    )
    os.kill(twistd.proc.pid, signal.SIGHUP)
    reloaded = re.compile(r"Reloaded .*gateway\.toml: 2 routes, 1 listeners \(pid (\d+)\)")
    pids = {int(twistd.wait_for_line(reloaded, START_TIMEOUT).group(1)) for _ in range(2)}
    assert pids == {twistd.proc.pid, workers.worker_pid}, twistd.output()
    counts = spread(workers.port, sorted(pids), "/added/report?size=100")
    assert sum(counts.values()) == CONNECTIONS and all(counts.values()), counts


def test_sigterm_drains_both_processes(workers: Workers) -> None:
    """SIGTERM with downloads in flight on both processes: new connections are refused at once, every download
    completes whole, and twistd and its worker exit 0."""
    twistd = workers.twistd
    pids = [twistd.proc.pid, workers.worker_pid]
    size = 4 * 1024 * 1024
    sockets: list[socket.socket] = []
    try:
        # Downloads begun (head read) but not read further, until both processes hold at least one.
        for _ in range(CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", workers.port), timeout=30)
            sockets.append(sock)
            sock.sendall(f"GET /report?size={size} HTTP/1.1\r\nHost: gateway.test\r\n\r\n".encode())
            if all(established_on(pid, workers.port) for pid in pids):
                break
        assert all(established_on(pid, workers.port) for pid in pids)
        os.kill(twistd.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while True:  # the listening sockets close at once (both processes' sockets, bounded wait)
            try:
                socket.create_connection(("127.0.0.1", workers.port), timeout=5).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() < deadline, "still accepting after SIGTERM"
            time.sleep(0.05)
        for sock in sockets:
            received = bytearray()
            sock.settimeout(30)
            while data := sock.recv(1 << 20):
                received += data
            # Read to the end of the connection: after its response, a draining gateway closes it.
            response = parse_response(bytes(received))
            assert (response.status, len(response.body), response.complete) == (200, size, True)
        returncode = twistd.proc.wait(timeout=STOP_TIMEOUT)
    finally:
        for sock in sockets:
            sock.close()
    assert returncode == 0, twistd.output()
    assert wait_until_gone(workers.worker_pid, STOP_TIMEOUT)
    assert f"gateway worker 1 (pid {workers.worker_pid}) exited with status 0" in twistd.rest_of_output()


def test_worker_exits_when_twistd_is_killed(workers: Workers) -> None:
    """SIGKILL to twistd (no chance to stop anything) still ends the worker: its stdin pipe from twistd closes."""
    twistd = workers.twistd
    os.kill(twistd.proc.pid, signal.SIGKILL)
    twistd.proc.wait(timeout=STOP_TIMEOUT)
    assert wait_until_gone(workers.worker_pid, STOP_TIMEOUT), "the worker outlived twistd"
    log = twistd.rest_of_output()
    assert f"gateway worker 1 (pid {workers.worker_pid}): parent gone (stdin closed), stopping" in log, log
    assert "Traceback" not in log + twistd.stderr()


def _worker(config: Path, stdin: bytes, tmp_path: Path) -> subprocess.CompletedProcess[bytes]:
    argv = [sys.executable, "-m", "gateway.operations.worker", "--config", str(config), "--index", "1"]
    return subprocess.run(argv, cwd=tmp_path, input=stdin, capture_output=True, timeout=60, check=False)


def test_worker_with_an_invalid_config_exits_1_with_one_line(tmp_path: Path) -> None:
    """`python -m gateway.operations.worker` given an invalid config exits 1 with `gateway worker N: file: key: reason`:
    the file named by --config, the reason from the bytes that came down its stdin (the file itself is not read:
    here it holds a valid config)."""
    config = tmp_path / "bad.toml"
    route = '[[routes]]\nname = "all"\nauth = "anonymous"\nupstream = "http://127.0.0.1:1"\n'
    config.write_text('[[listeners]]\nhost = "127.0.0.1"\nport = 1\n' + route)
    invalid = b'[server]\nworkers = 0\n\n[[listeners]]\nhost = "127.0.0.1"\nport = 1\n' + route.encode()
    done = _worker(config, config_frame(invalid), tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.decode() == f"gateway worker 1: {config}: server.workers: must be a positive integer, got 0\n"
    assert done.stdout == b""


def test_worker_with_several_config_errors_prints_one_line_each(tmp_path: Path) -> None:
    """A worker given bytes with two errors prints both, each on its own `gateway worker N: file: key: reason`
    line, and exits 1."""
    config = tmp_path / "bad.toml"
    invalid = b'[server]\nworkers = 0\n\n[[listeners]]\nhost = "127.0.0.1"\nport = 1\n'
    done = _worker(config, config_frame(invalid), tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.decode().splitlines() == [
        f"gateway worker 1: {config}: server.workers: must be a positive integer, got 0",
        f"gateway worker 1: {config}: routes: is required (add at least one [[routes]] table)",
    ]


def test_worker_whose_parent_sends_no_config_exits_1_with_one_line(tmp_path: Path) -> None:
    """A worker whose stdin ends before a config came (its parent died at once) exits 1 saying so."""
    config = tmp_path / "gateway.toml"
    config.write_text('[[listeners]]\nhost = "127.0.0.1"\nport = 1\n')
    done = _worker(config, b"12\nhalf", tmp_path)
    assert done.returncode == 1
    assert done.stderr.decode() == "gateway worker 1: the parent closed the pipe before it sent a config\n"


def tls_spread(port: int, pids: list[int], trust: Path) -> tuple[dict[int, int], set[int]]:
    """`spread` over TLS (verifying gateway.test against `trust`): how many connections each pid holds, and the
    serial numbers of the certificates the handshakes showed."""
    context = ssl.create_default_context(cafile=str(trust))
    serials: set[int] = set()

    def handshake(raw: socket.socket) -> socket.socket:
        sock = context.wrap_socket(raw, server_hostname="gateway.test")
        der = sock.getpeercert(binary_form=True)
        assert der is not None
        serials.add(x509.load_der_x509_certificate(der).serial_number)
        return sock

    return spread(port, pids, over=handshake), serials


def test_tls_in_every_worker_and_a_renewed_certificate_everywhere_after_sighup(tls_workers: TLSWorkers) -> None:
    """An HTTPS listener with two processes: both serve TLS with the certificate; renewed files and SIGHUP make
    new handshakes in both processes show the renewed certificate."""
    workers = tls_workers.workers
    twistd = workers.twistd
    pids = [twistd.proc.pid, workers.worker_pid]
    counts, serials = tls_spread(workers.port, pids, tls_workers.trust)
    assert sum(counts.values()) == CONNECTIONS and all(counts.values()), counts
    assert serials == {tls_workers.served.serial()}
    renewed = issue(tls_workers.ca, tls_workers.served.certificate.parent, "gateway.test")  # the same files
    os.kill(twistd.proc.pid, signal.SIGHUP)
    reloaded = re.compile(r"Reloaded .*gateway\.toml: 1 routes, 1 listeners \(pid (\d+)\)")
    assert {int(twistd.wait_for_line(reloaded, START_TIMEOUT).group(1)) for _ in range(2)} == set(pids)
    counts, serials = tls_spread(workers.port, pids, tls_workers.trust)
    assert sum(counts.values()) == CONNECTIONS and all(counts.values()), counts
    assert serials == {renewed.serial()} != {tls_workers.served.serial()}


# --- one admin listener for the whole gateway --------------------------------------------------------------------

SERVED = 'gateway_requests_total{route="demo",status="200",ending="completed"}'


def admin_get(workers: Workers, target: str) -> Parsed:
    response = parse_response(fetch(workers.admin, target, timeout=30))
    assert response.complete, response
    return response


def scrape(workers: Workers) -> Scrape:
    response = admin_get(workers, "/metrics")
    assert response.status == 200, response
    return parse_metrics(response.body.decode())


def sample(scraped: Scrape, written: str) -> float | None:
    """The sample written as `name{label="value",...}` (labels in any order), or None."""
    name, _, labels = written.partition("{")
    pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    return scraped.value(name, **pairs)


def scraped_until(workers: Workers, condition: Callable[[Scrape], bool], what: str) -> Scrape:
    """Scrape every 50 ms until `condition` holds of a scrape (a request is counted once it has ended, which
    may be a moment after its client read the last byte), for at most 30 s."""
    deadline = time.monotonic() + 30
    while True:
        scraped = scrape(workers)
        if condition(scraped):
            return scraped
        assert time.monotonic() < deadline, f"not within 30 s: {what}; last scrape: {dict(scraped.samples)}"
        time.sleep(0.05)


def served(scraped: Scrape) -> float:
    return sample(scraped, SERVED) or 0.0


def worker_answered(scraped: Scrape) -> bool:
    return sample(scraped, 'gateway_worker_up{worker="1"}') == 1


def test_upstreams_shows_every_process_s_servers(workers: Workers) -> None:
    """Each process has its own pools and standing of its servers: the admin listener's /upstreams gives twistd's
    view (worker 0) and the worker's (1), each with the route's upstream (named by its URL) and its one server."""
    response = admin_get(workers, "/upstreams")
    assert response.status == 200, response
    views = json.loads(response.body)["workers"]
    assert set(views) == {"0", "1"}, views
    assert list(views["0"]) == list(views["1"]) and len(views["0"]) == 1, views
    for view in views.values():
        (upstream,) = view.values()
        assert len(upstream["servers"]) == 1, view


def test_one_admin_listener_sums_both_processes(workers: Workers) -> None:
    """With `workers = 2` only twistd listens on the admin port (the worker on the public port alone): one
    scrape of it counts every request whichever process served it (40 connections, each with one request,
    spread over both), gives per-process gauges and process metrics under a `worker` label, and the probes
    answer for both."""
    twistd = workers.twistd
    assert listening_ports(twistd.proc.pid) == {workers.port, workers.admin}
    assert listening_ports(workers.worker_pid) == {workers.port}
    counts = spread(workers.port, [twistd.proc.pid, workers.worker_pid])
    assert sum(counts.values()) == CONNECTIONS and all(counts.values()), counts

    scraped = scraped_until(workers, lambda s: served(s) >= CONNECTIONS and worker_answered(s), "every request counted")
    assert served(scraped) == CONNECTIONS
    assert sample(scraped, 'gateway_request_duration_seconds_count{route="demo"}') == CONNECTIONS
    assert sample(scraped, 'gateway_response_body_bytes_total{route="demo"}') == CONNECTIONS * 100
    assert scraped.types["gateway_requests"] == "counter"
    # Summed gauges carry no worker label; per-process ones carry one for each process.
    assert sample(scraped, "gateway_client_connections") is not None
    for worker in ("0", "1"):
        assert sample(scraped, f'gateway_draining{{worker="{worker}"}}') == 0
        assert sample(scraped, f'gateway_worker_up{{worker="{worker}"}}') == 1
        for name in ("process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds"):
            assert (sample(scraped, f'{name}{{worker="{worker}"}}') or 0) > 0, (name, worker)
        assert sample(scraped, f'process_cpu_seconds_total{{worker="{worker}"}}') is not None
    assert {dict(labels)["worker"] for labels in scraped.labelled("gateway_build_info")} == {"0", "1"}

    for probe in ("/healthz", "/readyz"):
        response = admin_get(workers, probe)
        assert (response.status, json.loads(response.body)) == (200, {"status": "ok"}), probe


def test_a_restarted_worker_leaves_the_totals_as_they_were(workers: Workers) -> None:
    """A worker killed outright and restarted is no reset of the gateway's counters: its counts as it last
    answered stay in the totals, which go on from there; its process metrics are the new process's."""
    twistd = workers.twistd
    counts = spread(workers.port, [twistd.proc.pid, workers.worker_pid])
    assert all(counts.values()), counts
    before = scraped_until(workers, lambda s: served(s) >= CONNECTIONS and worker_answered(s), "40 counted")
    assert served(before) == CONNECTIONS
    started = sample(before, 'process_start_time_seconds{worker="1"}')

    os.kill(workers.worker_pid, signal.SIGKILL)
    new_pid = int(twistd.wait_for_line(WORKER_STARTED, START_TIMEOUT).group(1))
    try:
        twistd.wait_for_line(re.compile(rf"gateway worker 1 \(pid {new_pid}\) serving"), START_TIMEOUT)
        after = scraped_until(workers, worker_answered, "the new worker answers")
        assert served(after) == CONNECTIONS
        assert sample(after, 'process_start_time_seconds{worker="1"}') != started
        counts = spread(workers.port, [twistd.proc.pid, new_pid])
        assert all(counts.values()), counts
        again = scraped_until(workers, lambda s: served(s) >= 2 * CONNECTIONS, "80 counted")
        assert served(again) == 2 * CONNECTIONS
        assert admin_get(workers, "/readyz").status == 200
    finally:
        kill_if_ours(new_pid, "gateway.operations.worker")
