"""One extra worker process: `python -m gateway.operations.worker --config FILE --index N`, started by `WorkerPool`.

Rule: this is a composition root like `gateway.tap` (it names the global reactor). It serves the config the twistd
process that started it read and checked: its bytes come down stdin, a pipe from the parent (each one framed as its
length and a newline, then the bytes: `gateway.operations.workers.config_frame`), first at start, then at every
reload; the file itself is never read here (`--config` names it, for errors and relative paths). It serves on the
same ports (each listener bound with SO_REUSEPORT), has no admin listener (it answers the parent's questions for its
metrics and readiness on the socket at `--channel-fd`: `gateway.operations.fleet`), starts no workers of its own, and
logs as `twistd --logfile=-` does, to the stdout it shares with its parent. SIGTERM drains and stops, SIGUSR1 reopens
the access log (`gateway.operations.signals`); a SIGHUP of its own is ignored (reloads come from the parent). It also
stops when its stdin reaches end of file: the parent is gone, however it died, so no worker outlives it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable

from twisted.internet import fdesc
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import CannotListenError, ConnectionDone, ReactorNotRunning
from twisted.internet.interfaces import IReactorFDSet, IReactorSocket
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure

from gateway import config, logs
from gateway.operations import fleet, signals
from gateway.operations.service import GatewayService
from gateway.operations.workers import ConfigFrames

__all__ = ["first_config", "main"]

_log = Logger(namespace="gateway.worker")


def first_config(fd: int = 0) -> bytes:
    """The first config down the parent pipe, read before the reactor runs (blocking)."""
    found: list[bytes] = []
    frames = ConfigFrames(found.append)
    while not found:
        data = os.read(fd, 65536)
        if not data:
            raise EOFError("the parent closed the pipe before it sent a config")
        frames.feed(data)
    return found[0]


class _ParentPipe(FileDescriptor):
    """Reads stdin: the configs the parent sends for reloads, and its end, which means the parent has exited.

    Not `twisted.internet.stdio`: it would make stdout non-blocking, and stdout is shared with the parent."""

    def __init__(
        self, reactor: IReactorFDSet, on_config: Callable[[bytes], object], on_closed: Callable[[], None]
    ) -> None:
        super().__init__(reactor)
        self._frames = ConfigFrames(on_config)
        self._on_closed = on_closed
        fdesc.setNonBlocking(0)
        self.startReading()

    def fileno(self) -> int:
        return 0

    def doRead(self) -> object:
        return fdesc.readFromFD(0, self._frames.feed)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        if reason.check(ConnectionDone):  # end of file; the reactor's own shutdown is ConnectionLost
            self._on_closed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.operations.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the TOML config file (the one the twistd process loaded)")
    parser.add_argument("--index", type=int, required=True, help="this worker's number, from 1 (for the logs)")
    parser.add_argument("--json-log", action="store_true", help="log JSON lines (as gateway.logs.observer does)")
    parser.add_argument(
        "--inherited", action="append", default=[], help="NAME=FD: a listening socket systemd passed to the parent"
    )
    parser.add_argument("--channel-fd", type=int, help="the socket the parent asks for metrics and readiness on")
    args = parser.parse_args(argv)
    index = args.index
    try:
        cfg = config.load_text(first_config(), source=args.config)
    except (config.ConfigError, EOFError, ValueError) as e:
        for error in e.errors if isinstance(e, config.ConfigError) else (e,):
            print(f"gateway worker {index}: {error}", file=sys.stderr)
        return 1

    from twisted.internet import reactor

    log_observer = logs.observer() if args.json_log else textFileLogObserver(sys.stdout)
    globalLogBeginner.beginLoggingTo([log_observer], redirectStandardIO=False)
    inherited = {name: int(fd) for name, _, fd in (item.partition("=") for item in args.inherited)}
    service = GatewayService(cfg, reactor, worker_index=index, inherited=inherited)
    try:
        service.privilegedStartService()
        service.startService()
    except CannotListenError as e:
        print(f"gateway worker {index}: {e}", file=sys.stderr)
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    # SIGTERM drains and exits 0, SIGUSR1 reopens the access log, SIGHUP is ignored (reloads come down the pipe);
    # systemd hears only from the twistd process (a worker has no NOTIFY_SOCKET).
    reactor.callWhenRunning(signals.install, reactor, service, None, reload_on_hup=False)

    def parent_gone() -> None:
        _log.info(
            "gateway worker {index} (pid {pid}): parent gone (stdin closed), stopping", index=index, pid=os.getpid()
        )
        with contextlib.suppress(ReactorNotRunning):  # already stopping (SIGTERM came first)
            reactor.stop()

    _ParentPipe(reactor, service.reload, parent_gone)
    if args.channel_fd is not None:
        fleet.answer_parent(
            IReactorSocket(reactor), args.channel_fd, service.metrics.registry, service.not_ready, service.upstreams
        )
    # Once running, Twisted's SIGTERM handler is in place (until then SIGTERM kills the process outright).
    reactor.callWhenRunning(_log.info, "gateway worker {index} (pid {pid}) serving", index=index, pid=os.getpid())
    reactor.run()
    _log.info("gateway worker {index} (pid {pid}) stopped", index=index, pid=os.getpid())
    return 0


if __name__ == "__main__":
    sys.exit(main())
