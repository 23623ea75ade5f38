"""Worker processes: the extra processes that serve the same listeners as the twistd process, and their stop.

Rule: every worker the pool starts, it also ends, within a bound. A worker (`python -m gateway.operations.worker`)
serves the config the twistd process read and checked, given as its very bytes over the worker's stdin (a pipe from
the parent; a reload sends the new bytes the same way), so a file edited between two reads can never make two
processes serve different configs; it binds every listener itself with SO_REUSEPORT, so the kernel spreads new
connections across the twistd process (worker 0) and workers 1..N-1. Workers share the parent's stdout and stderr:
they exit on SIGTERM, or when the stdin pipe closes because the parent is gone, even killed outright. Stopping the
pool sends SIGTERM to every worker and waits for each to exit; after `stop_timeout` seconds it sends SIGKILL. A
worker that dies on its own is restarted: at once the first time, then after a delay that doubles (to at most a
minute) while it keeps dying within a minute of its start, so a worker that cannot start does not spin. `signal_all`
reaches every worker (SIGUSR1 to reopen the access log). With `channel`, each worker started also gets one end of a
socketpair at `--channel-fd`, and the pool hands the other to `channel(index)`'s protocol: how the admin listener
asks the worker for its metrics and readiness (`gateway.operations.fleet`). The reactor is given, never imported.
"""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.operations.waits import within

__all__ = ["KILL_TIMEOUT", "STOP_TIMEOUT", "ConfigFrames", "WorkerPool", "config_frame", "worker_command"]

_log = Logger(namespace="gateway.workers")  # not the module's name: log lines keep the namespace they had

STOP_TIMEOUT = 10.0
"""Seconds a worker is given to exit after SIGTERM before it is sent SIGKILL."""
KILL_TIMEOUT = 5.0
"""Seconds to wait for a worker to be reaped after SIGKILL before the stop gives up on it (and says so)."""
RESTART_MAX_DELAY = 60.0
"""The longest wait before restarting a worker that keeps dying."""
STABLE_AFTER = 60.0
"""A worker that ran this long before dying is restarted at once (its failure was not at start-up)."""


def worker_command(
    config_path: str, index: int, *, json_log: bool = False, inherited: Mapping[str, int] | None = None
) -> list[str]:
    """The command line of worker `index`: this Python running `gateway.operations.worker` on the config file at
    `config_path`, which should be absolute (twistd may change directory before the workers start). With
    `json_log` the worker logs JSON lines, as twistd does with `--logger=gateway.logs.observer`; `inherited`
    names the systemd sockets it gets at the same descriptor numbers."""
    command = [sys.executable, "-m", "gateway.operations.worker", "--config", config_path, "--index", str(index)]
    if json_log:
        command.append("--json-log")
    for name, fd in (inherited or {}).items():
        command += ["--inherited", f"{name}={fd}"]
    return command


def config_frame(text: bytes) -> bytes:
    """A config's bytes as they go down a worker's stdin: their length in decimal and a newline, then them."""
    return b"%d\n%s" % (len(text), text)


class ConfigFrames:
    """Splits what comes down a worker's stdin into configs (framed by `config_frame`): each complete one is
    handed to `received`, whatever the pieces it came in."""

    def __init__(self, received: Callable[[bytes], object]) -> None:
        self._received = received
        self._buffer = b""

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while True:
            size, newline, rest = self._buffer.partition(b"\n")
            if not newline:
                return
            if not size.isdigit():
                raise ValueError(f"not a config frame: {self._buffer[:40]!r}")
            if len(rest) < int(size):
                return
            text, self._buffer = rest[: int(size)], rest[int(size) :]
            self._received(text)


def _describe_exit(reason: Failure) -> str:
    """How a process ended, in words: "exited with status 3", "was killed by signal 15 (SIGTERM)"."""
    value = reason.value
    if isinstance(value, ProcessTerminated) and value.signal is not None:
        try:
            name = f" ({signal.Signals(value.signal).name})"
        except ValueError:
            name = ""
        return f"was killed by signal {value.signal}{name}"
    if isinstance(value, ProcessDone | ProcessTerminated):
        return f"exited with status {value.exitCode}"
    return f"ended: {value}"


class _Worker(ProcessProtocol):
    """One worker process as the pool sees it: its index, its pid, and whether it has ended."""

    def __init__(self, index: int, on_ended: Callable[[_Worker, Failure], None]) -> None:
        self.index = index
        self.pid = 0
        self.started_at = 0.0
        self.ended = False
        self._on_ended = on_ended
        self._waiting: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]  # makeConnection set it before calling this

    def processEnded(self, reason: Failure) -> None:
        """The process has exited, been reaped, and its stdin pipe is closed."""
        self.ended = True
        self._on_ended(self, reason)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def when_ended(self) -> Deferred[None]:
        """A Deferred that fires once the process has ended (at once if it has)."""
        if self.ended:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def send(self, data: bytes) -> None:
        """Write `data` down the worker's stdin (unless it has ended)."""
        if not self.ended and self.transport is not None:
            self.transport.write(data)

    def signal(self, name: str) -> bool:
        """Send signal `name` ("TERM", "KILL", "HUP"); False if the process had already exited."""
        if self.ended or self.transport is None:
            return False
        try:
            self.transport.signalProcess(name)
        except ProcessExitedAlready:
            return False
        return True


class WorkerPool(Service):
    """Workers 1..`count` of one gateway (the twistd process is worker 0), started with the service and stopped
    with it. `command(index)` is the worker's command line (see `worker_command`)."""

    def __init__(
        self,
        reactor: Any,
        count: int,
        command: Callable[[int], Sequence[str]],
        *,
        config_text: bytes = b"",
        stop_timeout: float = STOP_TIMEOUT,
        kill_timeout: float = KILL_TIMEOUT,
        environment: Callable[[], dict[str, str]] | None = None,
        inherited_fds: Sequence[int] = (),
        channel: Callable[[int], Protocol] | None = None,
    ) -> None:
        self.count = count
        self.command = command
        self.config_text = config_text
        """The bytes of the config every worker serves (each new one is given them first)."""
        self.stop_timeout = stop_timeout
        self.kill_timeout = kill_timeout
        self.restarts = 0
        """Workers restarted after dying, since start."""
        self._environment = environment
        self._inherited_fds = tuple(inherited_fds)
        self._channel = channel
        self.channel_fd = max((2, *self._inherited_fds)) + 1
        """The descriptor a worker finds its channel at: the first after stdio and systemd's sockets."""
        self._reactor = reactor
        self._workers: dict[int, _Worker] = {}
        self._delays: dict[int, float] = {}
        self._pending: dict[int, Any] = {}

    @property
    def pids(self) -> dict[int, int]:
        """The pid of every worker still running, by index."""
        return {index: worker.pid for index, worker in self._workers.items() if not worker.ended}

    def startService(self) -> None:
        super().startService()
        for index in range(1, self.count + 1):
            self.spawn(index)

    def spawn(self, index: int) -> None:
        """Start worker `index`, with stdin a pipe from this process and stdout and stderr shared with it (and
        its channel, with `channel`)."""
        self._pending.pop(index, None)
        argv = list(self.command(index))
        worker = _Worker(index, self._ended)
        # env=None: the worker inherits this process's environment (PYTHONPATH, locale, ...); `environment`
        # may give a copy without what is this process's alone (systemd's NOTIFY_SOCKET).
        env = self._environment() if self._environment is not None else None
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        child_fds.update({fd: fd for fd in self._inherited_fds})  # systemd's listening sockets, same numbers
        if self._channel is None:
            self._reactor.spawnProcess(worker, argv[0], argv, env=env, childFDs=child_fds)
        else:
            ours, theirs = socket.socketpair()
            with ours, theirs:  # the worker has its end once started; the reactor adopts a duplicate of ours
                child_fds[self.channel_fd] = theirs.fileno()
                argv += ["--channel-fd", str(self.channel_fd)]
                self._reactor.spawnProcess(worker, argv[0], argv, env=env, childFDs=child_fds)
                ours.setblocking(False)
                factory = Factory.forProtocol(partial(self._channel, index))
                self._reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
        worker.send(config_frame(self.config_text))
        worker.started_at = self._reactor.seconds()
        self._workers[index] = worker
        _log.info("gateway worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def send_config(self, text: bytes) -> None:
        """A reload: every running worker is given `text` (the config's bytes) to reload with; workers started
        from now on begin with it."""
        self.config_text = text
        for worker in self._workers.values():
            worker.send(config_frame(text))

    def signal_all(self, name: str) -> None:
        """Send signal `name` to every running worker."""
        for worker in self._workers.values():
            worker.signal(name)

    def worker_died(self, index: int, pid: int, reason: Failure) -> None:
        """Worker `index` ended while the pool was running: logged, and restarted (see the module's rule)."""
        worker = self._workers[index]
        ran = self._reactor.seconds() - worker.started_at
        if ran >= STABLE_AFTER:
            delay = 0.0
        else:
            previous = self._delays.get(index)
            delay = min(RESTART_MAX_DELAY, previous * 2 if previous else 1.0) if previous is not None else 0.0
        self._delays[index] = delay
        _log.error(
            "gateway worker {index} (pid {pid}) {how} unexpectedly after {ran:.1f} s; restarting it in {delay:g} s",
            index=index,
            pid=pid,
            how=_describe_exit(reason),
            ran=ran,
            delay=delay,
        )
        self.restarts += 1
        self._pending[index] = self._reactor.callLater(delay, self.spawn, index)

    def stopService(self) -> Deferred[None]:
        """SIGTERM to every worker, then wait for all of them to exit: SIGKILL to any still running after
        `stop_timeout` seconds, and give up on it (logged) `kill_timeout` seconds later."""
        super().stopService()
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        running = [worker for worker in self._workers.values() if not worker.ended]
        for worker in running:
            worker.signal("TERM")
        ended = DeferredList([worker.when_ended() for worker in running])
        if await within(self._reactor, ended, self.stop_timeout):
            return
        for worker in running:
            if worker.signal("KILL"):
                _log.warn(
                    "gateway worker {index} (pid {pid}) still running {timeout} s after SIGTERM; sent SIGKILL",
                    index=worker.index,
                    pid=worker.pid,
                    timeout=self.stop_timeout,
                )
        if await within(self._reactor, ended, self.kill_timeout):
            return
        for worker in running:
            if not worker.ended:
                _log.error(
                    "gateway worker {index} (pid {pid}) still running {timeout} s after SIGKILL; not waiting longer",
                    index=worker.index,
                    pid=worker.pid,
                    timeout=self.kill_timeout,
                )

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self.running:
            self.worker_died(worker.index, worker.pid, reason)
        else:
            _log.info(
                "gateway worker {index} (pid {pid}) {how}",
                index=worker.index,
                pid=worker.pid,
                how=_describe_exit(reason),
            )
