"""`twistd gateway` and its signals, as a real process in front of the real demo upstream: SIGHUP reloads the
config (streams in flight go on; an invalid file changes nothing), SIGTERM drains (readiness 503 at once, no new
connections, requests in flight finish, what outlives `server.drain_timeout` is cut, exit status 0), SIGUSR1
reopens the access log, and systemd hears of each through NOTIFY_SOCKET.

Subprocess tier: every process is started with `subprocess.Popen` (`tests.support.processes`) and stopped by its
PID in teardown (the `spawn` fixture); the clients are blocking sockets on 127.0.0.1 with a deadline on every
read, closed in teardown. Nothing waits for time to pass: a test waits for a log line, a datagram, a metric or an
answer, with a generous bound that only limits how long a failure takes. A "slow" client is one that stops
reading: it holds its request in flight for as long as the test wants.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.demo import report_chunks
from tests.support.clients import Parsed, parse_response
from tests.support.notify import NotifySocket
from tests.support.processes import LISTENING, START_TIMEOUT, STOP_TIMEOUT, TWISTD, Child, fetch, free_port, start

MiB = 1024 * 1024
WAIT = 15.0
"""Bound on each wait for something the gateway should do promptly (a reload, an answer, a metric)."""
ADMIN_LISTENING = re.compile(r"admin listening on 127\.0\.0\.1:(\d+)")
RELOADED = re.compile(r"Reloaded (\S+): (\d+) routes")
REFUSED = re.compile(r"Reload refused, the running config is unchanged: (.*)$")


# --- processes ------------------------------------------------------------------------------------------------


@dataclass
class Gateway:
    twistd: Child
    port: int
    admin: int
    config: Path

    def signal(self, signum: signal.Signals) -> None:
        os.kill(self.twistd.proc.pid, signum)

    def exit_status(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            return self.twistd.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"twistd still running {timeout} s later; {self.twistd.output()}")


@pytest.fixture(autouse=True)
def no_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    """No child talks to a systemd that runs the tests: only `notify_socket` sets NOTIFY_SOCKET."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)


@pytest.fixture
def demo(tmp_path: Path, spawn: list[Child]) -> int:
    """The demo upstream on a free loopback port; its port."""
    child = start(spawn, [sys.executable, "-m", "gateway.demo", "--port", "0"], tmp_path, "demo")
    address = json.loads(child.wait_for_line(re.compile(r"^\{.*\}$"), START_TIMEOUT).group(0))
    assert address["host"] == "127.0.0.1"
    return int(address["port"])


SECOND_ROUTE = (
    '[[routes]]\nname = "second"\nauth = "anonymous"\npath_prefix = "/second"\nstrip_prefix = true\nupstream = "demo"\n'
)
"""A route that only reloaded configs have: /second/report?size=N reaches the demo as /report?size=N."""


def config_text(
    port: int,
    admin: int,
    upstream: int,
    *,
    server: str = "",
    upstream_extra: str = "",
    access_log: str = "-",
    more: str = "",
) -> str:
    """A gateway config: the listener and the admin listener on the given loopback ports, routes /report,
    /upload and /events to the demo on `upstream`, plus `more` (TOML tables appended as they are)."""
    return (
        f"[server]\n{server}\n"
        f'[[listeners]]\nhost = "127.0.0.1"\nport = {port}\n\n'
        f'[admin]\nhost = "127.0.0.1"\nport = {admin}\n\n'
        f'[access_log]\npath = "{access_log}"\n\n'
        f'[upstreams.demo]\nurl = "http://127.0.0.1:{upstream}"\n{upstream_extra}\n'
        '[[routes]]\nname = "reports"\nauth = "anonymous"\npath_prefix = "/report"\nupstream = "demo"\n\n'
        '[[routes]]\nname = "uploads"\nauth = "anonymous"\npath_prefix = "/upload"\nupstream = "demo"\n\n'
        '[[routes]]\nname = "events"\nauth = "anonymous"\npath_prefix = "/events"\nupstream = "demo"\n\n'
        f"{more}"
    )


def start_gateway(spawn: list[Child], tmp_path: Path, text: Callable[[int, int], str]) -> Gateway:
    """`twistd gateway` on the config `text(port, admin_port)`, once it serves: both listeners bound and /readyz
    200, which also means its signal handlers are installed (they are, in the same reactor turn as the service
    starts, before any request is read)."""
    port, admin = free_port(), free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(text(port, admin))
    twistd = start(
        spawn,
        [str(TWISTD), "--nodaemon", "--pidfile=", "--logfile=-", "gateway", "--config", str(config)],
        tmp_path,
        "twistd",
    )
    assert int(twistd.wait_for_line(LISTENING, START_TIMEOUT).group(1)) == port, twistd.output()
    assert int(twistd.wait_for_line(ADMIN_LISTENING, START_TIMEOUT).group(1)) == admin, twistd.output()
    gateway = Gateway(twistd, port, admin, config)
    wait_until(lambda: readyz(gateway)[0] == 200, "/readyz answers 200", START_TIMEOUT)
    return gateway


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


# --- one-shot requests ------------------------------------------------------------------------------------------


def get(port: int, target: str) -> Parsed:
    return parse_response(fetch(port, target, timeout=WAIT))


def readyz(gateway: Gateway) -> tuple[int, bytes]:
    """/readyz on the admin listener: status and body (a refused connection counts as status 0)."""
    try:
        response = get(gateway.admin, "/readyz")
    except ConnectionRefusedError:
        return 0, b""
    return response.status, response.body


def metrics(gateway: Gateway) -> dict[str, float]:
    """Every sample of /metrics on the admin listener, by its name and labels as written
    (`gateway_config_reloads_total{result="applied"}`)."""
    response = get(gateway.admin, "/metrics")
    assert response.status == 200
    samples = {}
    for line in response.body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def reloads(gateway: Gateway, result: str) -> float:
    return metrics(gateway).get(f'gateway_config_reloads_total{{result="{result}"}}', 0.0)


def in_flight(gateway: Gateway, phase: str) -> float:
    return metrics(gateway).get(f'gateway_requests_in_flight{{phase="{phase}"}}', 0.0)


# --- streams read as slowly as the test says ---------------------------------------------------------------------


class Stream:
    """One request on a blocking loopback socket. The response head is kept; body bytes (as they come on the
    wire: for a chunked response, with the chunk framing) are counted and hashed, and kept only with `keep`, so a
    256 MiB body is never held in memory. Every read has a deadline."""

    def __init__(self, port: int, head: bytes, *, keep: bool = False) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.sock.sendall(head)
        self.keep = keep
        self.head = b""
        self._pending = b""
        self.body = bytearray()
        self.received = 0
        """Bytes after the response head."""
        self.digest = hashlib.sha256()
        self.ended: str | None = None
        """How the connection ended, once it has: "closed" (FIN) or "reset" (RST)."""

    def send(self, data: bytes) -> None:
        self.sock.settimeout(WAIT)
        self.sock.sendall(data)

    def _take(self, data: bytes) -> None:
        if not self.head:
            self._pending += data
            head, sep, rest = self._pending.partition(b"\r\n\r\n")
            if not sep:
                return
            self.head, self._pending, data = head + sep, b"", rest
        self.received += len(data)
        self.digest.update(data)
        if self.keep:
            self.body += data

    def _read_once(self, deadline: float, what: str) -> bool:
        """Read once; False when the connection has ended."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"not within the deadline: {what} ({self.received} body bytes, head {self.head!r})")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(256 * 1024)
        except ConnectionResetError:
            self.ended = "reset"
            return False
        except TimeoutError:
            return True  # the deadline check above reports it
        if not data:
            self.ended = "closed"
            return False
        self._take(data)
        return True

    def read_until(self, condition: Callable[[Stream], bool], what: str, timeout: float = WAIT) -> None:
        """Read until `condition(self)` holds (fails if the connection ends first)."""
        deadline = time.monotonic() + timeout
        while not condition(self):
            if not self._read_once(deadline, what):
                raise AssertionError(f"the connection {self.ended} before {what}: {self.head!r}, {self.received} B")

    def read_to_end(self, timeout: float = WAIT) -> None:
        """Read until the server closes or resets the connection."""
        deadline = time.monotonic() + timeout
        while self._read_once(deadline, "the end of the connection"):
            pass

    @property
    def response(self) -> Parsed:
        """The response, from the kept head and body (`keep`, or a head alone)."""
        return parse_response(self.head + bytes(self.body))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def streams() -> Iterator[Callable[..., Stream]]:
    """Opens `Stream`s, each closed after the test however it ended."""
    opened: list[Stream] = []

    def open_stream(port: int, head: bytes, **kwargs: Any) -> Stream:
        stream = Stream(port, head, **kwargs)
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        stream.close()


def get_head(target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n".encode()


def report_sha256(size: int) -> str:
    """The SHA-256 of the demo's `/report?size=SIZE`, made from the demo's own report. A shorter report is a
    prefix of a longer one, so this is also the digest of the first SIZE bytes of any report."""
    digest = hashlib.sha256()
    for piece in report_chunks(size):
        digest.update(piece)
    return digest.hexdigest()


def start_download(open_stream: Callable[..., Stream], port: int, size: int, first: int = MiB) -> Stream:
    """A `GET /report?size=SIZE` through the gateway, read as far as its head and `first` body bytes; then it
    stops reading, so it stays in flight (the gateway pauses the upstream) until the test reads on."""
    download = open_stream(port, get_head(f"/report?size={size}"))
    download.read_until(lambda s: s.received >= first, f"the first {first} body bytes")
    response = download.response
    assert response.status == 200, download.head
    assert response.header(b"content-length") == str(size).encode(), download.head
    return download


# --- 1, 2: SIGHUP reload -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reload_adds_a_route_while_a_download_goes_on(
    tmp_path: Path, spawn: list[Child], demo: int, streams: Callable[..., Stream]
) -> None:
    """SIGHUP with a rewritten file (a new route, and new settings for the upstream the download uses, so its
    pool is retired) applies while a 256 MiB download is in flight: the new route answers 200 before the
    download has ended, /readyz stays 200 throughout, the reload is counted as applied, and the download then
    completes byte-exact."""
    size = 256 * MiB
    gateway = start_gateway(spawn, tmp_path, lambda port, admin: config_text(port, admin, demo))
    assert get(gateway.port, "/second/report?size=100").status == 404  # no such route yet
    download = start_download(streams, gateway.port, size)
    wait_until(lambda: in_flight(gateway, "streaming") == 1, "the download is streaming")

    gateway.config.write_text(
        config_text(gateway.port, gateway.admin, demo, upstream_extra="idle_timeout = 3\n", more=SECOND_ROUTE)
    )
    gateway.signal(signal.SIGHUP)
    statuses = []

    def new_route_answers() -> bool:
        statuses.append(readyz(gateway)[0])
        return get(gateway.port, "/second/report?size=100").status == 200

    wait_until(new_route_answers, "the new route answers 200")
    reloaded = gateway.twistd.wait_for_line(RELOADED, WAIT)
    assert reloaded.groups() == (str(gateway.config), "4"), reloaded.string
    assert readyz(gateway)[0] == 200
    assert set(statuses) == {200}, statuses
    assert reloads(gateway, "applied") == 1
    assert reloads(gateway, "invalid") == 0
    # Still in flight: the gateway is still relaying it (it cannot have sent 256 MiB into a client not reading).
    assert in_flight(gateway, "streaming") == 1
    assert download.ended is None

    download.read_to_end(timeout=120)
    assert download.ended == "closed"
    assert download.received == size
    assert download.digest.hexdigest() == report_sha256(size)
    body = parse_response(fetch(gateway.port, "/second/report?size=1000")).body
    assert hashlib.sha256(body).hexdigest() == report_sha256(1000)


@pytest.mark.parametrize(
    ("server", "key", "reason"),
    [
        ('drain_timeout = "soon"', "server.drain_timeout", "must be seconds as a number or a string"),
        ('drain_timout = "5s"', "server.drain_timout", "unknown key"),
    ],
    ids=["bad-duration", "unknown-key"],
)
def test_invalid_reload_changes_nothing_until_the_file_is_fixed(
    tmp_path: Path, spawn: list[Child], demo: int, server: str, key: str, reason: str
) -> None:
    """SIGHUP with an invalid file logs the file, the key and the reason, counts an invalid reload and changes
    nothing: the old routes answer, the route only in the bad file does not. Once the file is fixed, SIGHUP
    applies it."""
    gateway = start_gateway(spawn, tmp_path, lambda port, admin: config_text(port, admin, demo))
    gateway.config.write_text(config_text(gateway.port, gateway.admin, demo, server=server, more=SECOND_ROUTE))
    gateway.signal(signal.SIGHUP)

    line = gateway.twistd.wait_for_line(REFUSED, WAIT).group(1)
    assert line.startswith(f"{gateway.config}: {key}: "), line
    assert reason in line, line
    assert get(gateway.port, "/report?size=100").status == 200
    assert get(gateway.port, "/second/report?size=100").status == 404
    assert readyz(gateway)[0] == 200
    assert reloads(gateway, "invalid") == 1
    assert reloads(gateway, "applied") == 0

    gateway.config.write_text(config_text(gateway.port, gateway.admin, demo, more=SECOND_ROUTE))
    gateway.signal(signal.SIGHUP)
    reloaded = gateway.twistd.wait_for_line(RELOADED, WAIT)
    assert reloaded.groups() == (str(gateway.config), "4"), reloaded.string
    assert get(gateway.port, "/second/report?size=100").status == 200
    assert get(gateway.port, "/report?size=100").status == 200
    assert (reloads(gateway, "applied"), reloads(gateway, "invalid")) == (1, 1)


# --- 3: SIGTERM drain ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_drains_requests_in_flight_and_exits_0(
    tmp_path: Path, spawn: list[Child], demo: int, streams: Callable[..., Stream]
) -> None:
    """SIGTERM with an upload and a download in flight: /readyz turns 503 while both are still running, a new
    connection is refused, both then complete correctly, and twistd exits 0 without cutting anything."""
    drain_timeout = 20
    download_size, upload_size = 64 * MiB, 4 * MiB
    gateway = start_gateway(
        spawn,
        tmp_path,
        lambda port, admin: config_text(port, admin, demo, server=f'drain_timeout = "{drain_timeout}s"'),
    )
    download = start_download(streams, gateway.port, download_size)
    body = random.Random(7).randbytes(upload_size)
    upload = streams(
        gateway.port,
        b"POST /upload?rate=%d HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % (4 * MiB, upload_size),
        keep=True,
    )
    upload.send(body[:MiB])
    wait_until(
        lambda: (in_flight(gateway, "streaming"), in_flight(gateway, "waiting")) == (1, 1),
        "the download streaming and the upload waiting for its answer",
    )

    gateway.signal(signal.SIGTERM)
    wait_until(lambda: readyz(gateway)[0] == 503, "/readyz answers 503")
    assert json.loads(readyz(gateway)[1]) == {"status": "unavailable", "reason": "draining"}
    # Both still in flight: readiness went to 503 before either ended.
    assert (in_flight(gateway, "streaming"), in_flight(gateway, "waiting")) == (1, 1)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", gateway.port), timeout=WAIT).close()

    for offset in range(MiB, upload_size, 256 * 1024):
        upload.send(body[offset : offset + 256 * 1024])
    upload.read_to_end(timeout=60)
    answer = upload.response
    assert (answer.status, answer.complete, upload.ended) == (200, True, "closed"), upload.head
    assert json.loads(answer.body) == {"bytes": upload_size, "sha256": hashlib.sha256(body).hexdigest()}

    download.read_to_end(timeout=60)
    assert (download.received, download.ended) == (download_size, "closed")
    assert download.digest.hexdigest() == report_sha256(download_size)

    assert gateway.exit_status(timeout=drain_timeout + STOP_TIMEOUT) == 0, gateway.twistd.output()
    log = gateway.twistd.rest_of_output()
    assert "Draining 2 client connections" in log, log
    assert "Drain timeout" not in log, log
    assert "Server Shut Down." in log, log
    assert "Traceback" not in log + gateway.twistd.stderr()


@pytest.mark.slow
def test_sigterm_cuts_what_outlives_the_drain_timeout_and_exits_0(
    tmp_path: Path, spawn: list[Child], demo: int, streams: Callable[..., Stream]
) -> None:
    """SIGTERM with an endless event stream and a download whose client stopped reading: both go on during the
    drain, then at `server.drain_timeout` both are cut, neither looking complete (no last chunk; fewer bytes than
    Content-Length), and twistd exits 0 within drain_timeout and a few seconds."""
    drain_timeout, download_size = 2.0, 64 * MiB
    gateway = start_gateway(
        spawn,
        tmp_path,
        lambda port, admin: config_text(port, admin, demo, server=f"drain_timeout = {drain_timeout}"),
    )
    events = streams(gateway.port, get_head("/events?interval=0.05"), keep=True)
    events.read_until(lambda s: s.body.count(b"event: tick") >= 1, "the first event")
    assert events.response.header(b"transfer-encoding") == b"chunked", events.head
    download = start_download(streams, gateway.port, download_size)
    wait_until(lambda: in_flight(gateway, "streaming") == 2, "both streaming")

    gateway.signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_until(lambda: readyz(gateway)[0] == 503, "/readyz answers 503")
    seen = events.body.count(b"event: tick")
    events.read_until(lambda s: s.body.count(b"event: tick") > seen, "an event sent while draining")

    events.read_to_end(timeout=drain_timeout + WAIT)
    download.read_to_end(timeout=drain_timeout + WAIT)
    status = gateway.exit_status(timeout=drain_timeout + STOP_TIMEOUT)
    exited = time.monotonic() - signalled

    assert events.ended is not None
    assert not events.response.complete
    assert not events.body.endswith(b"0\r\n\r\n")
    assert download.ended is not None
    assert download.received < download_size
    assert download.digest.hexdigest() == report_sha256(download.received)  # what came is the right prefix
    assert status == 0, gateway.twistd.output()
    assert exited < drain_timeout + 5, exited
    log = gateway.twistd.rest_of_output()
    assert "Drain timeout (2 s): cut 2 client connections still open" in log, log
    assert "Server Shut Down." in log, log
    assert "Traceback" not in log + gateway.twistd.stderr()


# --- 4: sd_notify ----------------------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    """systemd's notification socket, named in NOTIFY_SOCKET for the processes the test starts."""
    sock = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock.path))
    yield sock
    sock.close()


def test_sd_notify_ready_reloading_stopping(
    tmp_path: Path, spawn: list[Child], demo: int, notify_socket: NotifySocket
) -> None:
    """With NOTIFY_SOCKET set, systemd is told READY=1 (with a STATUS) once the gateway serves; on SIGHUP,
    RELOADING=1 with the CLOCK_MONOTONIC time of the reload, then READY=1; on SIGTERM, STOPPING=1. Nothing else."""
    gateway = start_gateway(spawn, tmp_path, lambda port, admin: config_text(port, admin, demo))
    ready = notify_socket.receive(WAIT)
    assert ready.keys() == {"READY", "STATUS"} and ready["READY"] == "1", ready
    assert ready["STATUS"], ready
    assert get(gateway.port, "/report?size=100").status == 200

    before = time.monotonic_ns() // 1000
    gateway.signal(signal.SIGHUP)
    reloading = notify_socket.receive(WAIT)
    after = time.monotonic_ns() // 1000
    assert reloading.keys() == {"RELOADING", "MONOTONIC_USEC"} and reloading["RELOADING"] == "1", reloading
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after, (before, reloading, after)
    reloaded = notify_socket.receive(WAIT)
    assert reloaded == {"READY": "1", "STATUS": "config reloaded"}, reloaded

    gateway.signal(signal.SIGTERM)
    # STOPPING=1, and time for the drain (30 s by default) and the workers' stop beyond TimeoutStopSec.
    assert notify_socket.receive(WAIT) == {"STOPPING": "1", "EXTEND_TIMEOUT_USEC": str((30 + 20) * 1_000_000)}
    assert gateway.exit_status() == 0, gateway.twistd.output()
    assert notify_socket.pending() == []


# --- 5: SIGUSR1 ------------------------------------------------------------------------------------------------


def access_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sigusr1_reopens_the_access_log(tmp_path: Path, spawn: list[Child], demo: int) -> None:
    """After logrotate's move and SIGUSR1, the access log is written to a new file at its path: the line of the
    request before the signal is in the moved file, that of the request after it in the new one."""
    log, moved = tmp_path / "access.log", tmp_path / "access.log.1"
    gateway = start_gateway(
        spawn, tmp_path, lambda port, admin: config_text(port, admin, demo, access_log="access.log")
    )
    assert get(gateway.port, "/report/first?size=10").status == 200
    wait_until(lambda: len(access_lines(log)) == 1, "the first request's access-log line")
    log.rename(moved)

    gateway.signal(signal.SIGUSR1)
    wait_until(log.exists, "a new access-log file at the path")
    assert get(gateway.port, "/report/second?size=10").status == 200
    wait_until(lambda: len(access_lines(log)) == 1, "the second request's access-log line")

    assert [line["path"] for line in access_lines(moved)] == ["/report/first"]
    assert [line["path"] for line in access_lines(log)] == ["/report/second"]
    assert readyz(gateway)[0] == 200
    gateway.signal(signal.SIGTERM)
    assert gateway.exit_status() == 0, gateway.twistd.output()
