"""gateway.operations.sdnotify against real AF_UNIX datagram sockets standing in for systemd's: the kernel is the
point."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.logger import LogLevel, formatEvent

from gateway.operations.sdnotify import Notifier, child_environment
from tests.support.logs import captured, in_namespace

_ours = in_namespace("gateway.sdnotify")


def _receiver(address: str) -> socket.socket:
    """A bound datagram socket that fails a test (not hangs it) when nothing arrives."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[socket.socket]:
    """systemd's notification socket, at a path."""
    sock = _receiver(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


@pytest.fixture
def notifier(systemd: socket.socket) -> Iterator[Notifier]:
    n = Notifier(systemd.getsockname())
    yield n
    n.close()


def test_ready(notifier: Notifier, systemd: socket.socket) -> None:
    notifier.ready()
    assert systemd.recv(4096) == b"READY=1"


def test_ready_with_status(notifier: Notifier, systemd: socket.socket) -> None:
    notifier.ready("listening on 127.0.0.1:8080")
    assert systemd.recv(4096) == b"READY=1\nSTATUS=listening on 127.0.0.1:8080"


def test_reloading_carries_the_monotonic_time_in_microseconds(notifier: Notifier, systemd: socket.socket) -> None:
    before = time.monotonic_ns() // 1000
    notifier.reloading()
    after = time.monotonic_ns() // 1000
    first, second = systemd.recv(4096).split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_stopping(notifier: Notifier, systemd: socket.socket) -> None:
    notifier.stopping()
    assert systemd.recv(4096) == b"STOPPING=1"


def test_status(notifier: Notifier, systemd: socket.socket) -> None:
    notifier.status("draining: 3 requests left")
    assert systemd.recv(4096) == b"STATUS=draining: 3 requests left"


def test_newlines_in_a_status_become_spaces(notifier: Notifier, systemd: socket.socket) -> None:
    """Otherwise "x\\nREADY=1" in a status would be a second assignment."""
    notifier.status("reload failed:\nREADY=1")
    notifier.ready("a\nb")
    assert systemd.recv(4096) == b"STATUS=reload failed: READY=1"
    assert systemd.recv(4096) == b"READY=1\nSTATUS=a b"


def test_notify_sends_every_assignment_in_one_datagram(notifier: Notifier, systemd: socket.socket) -> None:
    notifier.notify("EXTEND_TIMEOUT_USEC=5000000", "STATUS=still draining", "ÉTAT=ünïcode")
    assert systemd.recv(4096) == "EXTEND_TIMEOUT_USEC=5000000\nSTATUS=still draining\nÉTAT=ünïcode".encode()


def test_notify_with_nothing_sends_nothing(notifier: Notifier, systemd: socket.socket) -> None:
    notifier.notify()
    notifier.notify("A=1")
    assert systemd.recv(4096) == b"A=1"


def test_notify_refuses_what_is_not_an_assignment(notifier: Notifier, systemd: socket.socket) -> None:
    with pytest.raises(ValueError, match="READY"):
        notifier.notify("STATUS=ok", "READY")
    notifier.notify("A=1")
    assert systemd.recv(4096) == b"A=1"


def test_a_notification_after_close_opens_a_new_socket(notifier: Notifier, systemd: socket.socket) -> None:
    notifier.ready()
    notifier.close()
    notifier.close()
    notifier.stopping()
    assert systemd.recv(4096) == b"READY=1"
    assert systemd.recv(4096) == b"STOPPING=1"


def test_abstract_socket() -> None:
    name = f"gateway-test-{os.getpid()}-{uuid.uuid4().hex}"
    sock = _receiver("\0" + name)
    n = Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
    try:
        assert n is not None
        assert n.display_address == "@" + name
        n.ready("ok")
        assert sock.recv(4096) == b"READY=1\nSTATUS=ok"
    finally:
        if n is not None:
            n.close()
        sock.close()


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"HOME": "/root"}])
def test_from_environment_without_systemd(environ: dict[str, str]) -> None:
    with captured(_ours) as events:
        assert Notifier.from_environment(environ) is None
    assert events == []


@pytest.mark.parametrize("value", ["run/systemd/notify", "vsock:2:1234", "notify.sock"])
def test_from_environment_refuses_other_addresses_and_says_so_once(value: str) -> None:
    with captured(_ours) as events:
        assert Notifier.from_environment({"NOTIFY_SOCKET": value}) is None
    assert len(events) == 1
    assert events[0]["log_level"] == LogLevel.warn
    assert events[0]["address"] == value
    assert repr(value) in formatEvent(events[0])


def test_from_environment_with_a_path() -> None:
    n = Notifier.from_environment({"NOTIFY_SOCKET": "/run/systemd/notify"})
    assert n is not None
    assert n.address == "/run/systemd/notify"
    assert n.display_address == "/run/systemd/notify"


def test_from_environment_with_an_abstract_name() -> None:
    n = Notifier.from_environment({"NOTIFY_SOCKET": "@/org/freedesktop/systemd1/notify/123"})
    assert n is not None
    assert n.address == "\0/org/freedesktop/systemd1/notify/123"


def test_from_environment_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    n = Notifier.from_environment()
    assert n is not None
    assert n.address == str(tmp_path / "notify.sock")


def test_a_socket_that_is_gone_is_logged_once_and_never_raises(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    _receiver(str(path)).close()
    path.unlink()
    n = Notifier(str(path))
    try:
        with captured(_ours) as events:
            n.ready()
            n.status("still here")
            n.stopping()
    finally:
        n.close()
    assert len(events) == 1
    assert events[0]["log_level"] == LogLevel.warn
    assert events[0]["address"] == str(path)
    assert events[0]["errno_name"] == "ENOENT"
    assert str(path) in formatEvent(events[0])


def test_each_distinct_errno_is_logged_once(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    _receiver(str(path)).close()  # the file stays, nobody reads it: ECONNREFUSED
    n = Notifier(str(path))
    try:
        with captured(_ours) as events:
            n.ready()
            n.ready()
            path.unlink()  # now ENOENT
            n.stopping()
            n.stopping()
    finally:
        n.close()
    assert [e["errno_name"] for e in events] == ["ECONNREFUSED", "ENOENT"]


def test_child_environment_drops_notify_socket_only() -> None:
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "PATH": "/usr/bin", "LANG": "C.UTF-8"}
    child = child_environment(environ)
    assert child == {"PATH": "/usr/bin", "LANG": "C.UTF-8"}
    assert environ["NOTIFY_SOCKET"] == "/run/systemd/notify"
    child["PATH"] = "/bin"
    assert environ["PATH"] == "/usr/bin"


def test_child_environment_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("GATEWAY_TEST_MARKER", "1")
    child = child_environment()
    assert "NOTIFY_SOCKET" not in child
    assert child["GATEWAY_TEST_MARKER"] == "1"
    assert os.environ["NOTIFY_SOCKET"] == "/run/systemd/notify"
