"""`gateway.operations.workers.WorkerPool` on the global reactor, with small Python programs standing in for workers.

Each stand-in writes a "ready" file once it runs (so a test knows its signal disposition is in place) and then
blocks reading stdin, as a real worker watches its pipe from the parent. Every pool is stopped after its test and
any stand-in still running is killed by its PID.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import connectionDone
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from gateway.operations.workers import WorkerPool, worker_command
from tests.support.clients import within
from tests.support.processes import children_of, is_alive, kill_if_ours
from tests.support.scrape import until

WAIT = 15.0

SERVES = "import sys; open(sys.argv[1], 'w').close(); sys.stdin.read()"
"""Runs until SIGTERM (default action) or end of stdin."""
IGNORES_SIGTERM = (
    "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); open(sys.argv[1], 'w').close(); "
    "sys.stdin.read()"
)
EXITS_3 = "import sys; sys.exit(3)"


@pytest.fixture
def worker_log() -> Iterator[list[str]]:
    """The text of every event logged by `gateway.operations.workers` during the test."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "gateway.workers":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def make_pool(tmp_path: Path) -> Iterator[Callable[..., WorkerPool]]:
    """Start a pool of stand-ins running `script`; after the test every pool is stopped and every stand-in still
    running is killed by its PID."""
    pools: list[WorkerPool] = []
    pids: set[int] = set()

    def make(script: str, count: int = 1, **options: Any) -> WorkerPool:
        def command(index: int) -> list[str]:
            return [sys.executable, "-c", script, str(tmp_path / f"ready-{index}")]

        pool = WorkerPool(reactor, count, command, **options)
        pool.startService()
        pools.append(pool)
        pids.update(pool.pids.values())
        return pool

    yield make
    for pool in pools:
        pids.update(pool.pids.values())  # restarted workers too
        if pool.running:
            pytest_twisted.blockon(within(pool.stopService(), WAIT))
    for pid in pids:
        kill_if_ours(pid, str(tmp_path))


async def ready(tmp_path: Path, *indexes: int) -> None:
    await until(lambda: all((tmp_path / f"ready-{i}").exists() for i in indexes), f"workers {indexes} ready")


def test_worker_command_runs_gateway_worker_with_config_and_index() -> None:
    """A worker's command line is this Python running `gateway.operations.worker` with the config path and its index."""
    assert worker_command("/etc/gateway/gateway.toml", 3) == [
        sys.executable,
        "-m",
        "gateway.operations.worker",
        "--config",
        "/etc/gateway/gateway.toml",
        "--index",
        "3",
    ]


@pytest_twisted.ensureDeferred
async def test_start_spawns_one_child_process_per_worker(
    make_pool: Callable[..., WorkerPool], worker_log: list[str], tmp_path: Path
) -> None:
    """`startService` with a count of 2 starts workers 1 and 2 as child processes and logs each with its pid."""
    pool = make_pool(SERVES, count=2)
    await ready(tmp_path, 1, 2)
    pids = pool.pids
    assert sorted(pids) == [1, 2]
    assert set(pids.values()) <= children_of(os.getpid())
    assert worker_log == [f"gateway worker {i} started (pid {pids[i]})" for i in (1, 2)]


@pytest_twisted.ensureDeferred
async def test_stop_sends_sigterm_and_waits_for_every_worker(
    make_pool: Callable[..., WorkerPool], worker_log: list[str], tmp_path: Path
) -> None:
    """`stopService` sends SIGTERM to every worker and fires once each has exited, well before the kill bound."""
    pool = make_pool(SERVES, count=2, stop_timeout=60.0)
    await ready(tmp_path, 1, 2)
    pids = pool.pids
    await within(pool.stopService(), WAIT)
    assert pool.pids == {}
    assert not any(is_alive(pid) for pid in pids.values())
    ended = sorted(line for line in worker_log if "killed" in line)
    assert ended == [f"gateway worker {i} (pid {pids[i]}) was killed by signal 15 (SIGTERM)" for i in (1, 2)]
    assert not [line for line in worker_log if "SIGKILL" in line]


@pytest_twisted.ensureDeferred
async def test_stop_sigkills_a_worker_that_ignores_sigterm(
    make_pool: Callable[..., WorkerPool], worker_log: list[str], tmp_path: Path
) -> None:
    """A worker still running `stop_timeout` seconds after SIGTERM is sent SIGKILL, and the stop then completes."""
    pool = make_pool(IGNORES_SIGTERM, stop_timeout=0.2)
    await ready(tmp_path, 1)
    [pid] = pool.pids.values()
    await within(pool.stopService(), WAIT)
    assert not is_alive(pid)
    assert worker_log[1:] == [
        f"gateway worker 1 (pid {pid}) still running 0.2 s after SIGTERM; sent SIGKILL",
        f"gateway worker 1 (pid {pid}) was killed by signal {signal.SIGKILL.value} (SIGKILL)",
    ]


@pytest_twisted.ensureDeferred
async def test_a_worker_that_keeps_dying_is_restarted_at_once_then_after_a_doubling_delay(
    make_pool: Callable[..., WorkerPool], worker_log: list[str]
) -> None:
    """A worker exiting while the pool runs is logged as an error with its pid and status, and restarted: at
    once the first time, then after 1 s, 2 s... while it keeps dying soon after its start (no busy loop)."""
    pool = make_pool(EXITS_3)
    await until(lambda: pool.restarts >= 3, "three restarts")
    deaths = [line for line in worker_log if "unexpectedly" in line]
    assert all("exited with status 3 unexpectedly after" in line for line in deaths)
    assert [line.rsplit(" in ", 1)[1] for line in deaths[:3]] == ["0 s", "1 s", "2 s"]
    started = [line for line in worker_log if line.startswith("gateway worker 1 started")]
    assert len(started) >= 3


@pytest_twisted.ensureDeferred
async def test_a_killed_worker_is_restarted_with_a_new_pid(
    make_pool: Callable[..., WorkerPool], tmp_path: Path, worker_log: list[str]
) -> None:
    """A serving worker killed outright (SIGKILL) is replaced at once by a new process that serves."""
    pool = make_pool(SERVES)
    await ready(tmp_path, 1)
    [old] = pool.pids.values()
    (tmp_path / "ready-1").unlink()
    os.kill(old, signal.SIGKILL)
    await until(lambda: pool.pids.get(1) not in (None, old), "a new worker 1")
    await ready(tmp_path, 1)
    assert is_alive(pool.pids[1])
    assert pool.restarts == 1
    assert f"gateway worker 1 (pid {old}) was killed by signal 9 (SIGKILL) unexpectedly" in "\n".join(worker_log)


RECORDS = (
    "import sys\n"
    "from gateway.operations.workers import ConfigFrames\n"
    "out = open(sys.argv[1] + '.configs', 'ab', buffering=0)\n"
    "frames = ConfigFrames(lambda text: out.write(text + b'\\n--\\n'))\n"
    "open(sys.argv[1], 'w').close()\n"
    "while data := sys.stdin.buffer.read1(65536):\n"
    "    frames.feed(data)\n"
)
"""A stand-in that writes every config it is given down its stdin to a file, each followed by a separator."""


@pytest_twisted.ensureDeferred
async def test_every_worker_is_given_the_config_bytes_at_start_and_at_each_reload(
    make_pool: Callable[..., WorkerPool], tmp_path: Path
) -> None:
    """A worker gets the config as bytes down its stdin when it starts, and again at each `send_config`; a worker
    started after a reload begins with the latest bytes."""
    pool = make_pool(RECORDS, count=2, config_text=b"first = 1\n")
    await ready(tmp_path, 1, 2)
    pool.send_config(b"second = 2\n")
    configs = [tmp_path / f"ready-{i}.configs" for i in (1, 2)]
    await until(lambda: all(b"second" in c.read_bytes() for c in configs if c.exists()), "the reload's bytes")
    for recorded in configs:
        assert recorded.read_bytes() == b"first = 1\n\n--\nsecond = 2\n\n--\n"
    pid = pool.pids[1]
    os.kill(pid, signal.SIGKILL)
    await until(lambda: pool.pids.get(1, pid) != pid, "worker 1 restarted")
    await until(lambda: configs[0].read_bytes().endswith(b"second = 2\n\n--\nsecond = 2\n\n--\n"), "restart's bytes")


def test_config_frames_are_found_whatever_the_pieces() -> None:
    """What comes down the pipe is split into configs by their length, fed a byte at a time or all at once."""
    from gateway.operations.workers import ConfigFrames, config_frame

    stream = config_frame(b"a = 1\n") + config_frame(b"") + config_frame(b"x" * 70_000)
    for step in (1, 7, len(stream)):
        found: list[bytes] = []
        frames = ConfigFrames(found.append)
        for start in range(0, len(stream), step):
            frames.feed(stream[start : start + step])
        assert found == [b"a = 1\n", b"", b"x" * 70_000]
    with pytest.raises(ValueError):
        ConfigFrames(found.append).feed(b"not a frame\n")


SAYS_HELLO = (
    "import os, struct, sys\n"
    "fd = int(sys.argv[sys.argv.index('--channel-fd') + 1])\n"
    "os.write(fd, struct.pack('!I', 5) + b'hello')\n"
    "open(sys.argv[1], 'w').close()\n"
    "sys.stdin.read()\n"
)
"""A stand-in that says one framed word on the channel the pool gave it, then serves."""


class Heard(Int32StringReceiver):
    def __init__(self, index: int, heard: list[tuple[int, bytes]], lost: list[int]) -> None:
        self.index, self._heard, self._lost = index, heard, lost

    def stringReceived(self, data: bytes) -> None:
        self._heard.append((self.index, data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost.append(self.index)


@pytest_twisted.ensureDeferred
async def test_each_worker_gets_a_channel_of_its_own_after_the_inherited_sockets(
    make_pool: Callable[..., WorkerPool], tmp_path: Path
) -> None:
    """With `channel`, each worker finds one end of a socketpair at `--channel-fd` (the first descriptor after
    stdio and the inherited ones), and `channel(index)`'s protocol has the other: it hears the worker, and
    hears it go."""
    heard: list[tuple[int, bytes]] = []
    lost: list[int] = []
    pool = make_pool(SAYS_HELLO, count=2, channel=lambda index: Heard(index, heard, lost))
    assert pool.channel_fd == 3
    await ready(tmp_path, 1, 2)
    await until(lambda: len(heard) == 2, "both workers heard")
    assert sorted(heard) == [(1, b"hello"), (2, b"hello")]
    await within(pool.stopService(), WAIT)
    await until(lambda: sorted(lost) == [1, 2], "both channels closed")
    later = WorkerPool(reactor, 1, list, inherited_fds=(3, 4), channel=lambda index: Heard(index, heard, lost))
    assert later.channel_fd == 5
