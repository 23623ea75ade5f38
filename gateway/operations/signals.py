"""What each Unix signal does to a running gateway process, and what systemd is told about it.

Rule: a signal handler does nothing but schedule the work on the reactor thread (`callFromThread`); the work
itself runs between two reactor iterations, never inside a request. Installed once the reactor runs (after
Twisted's own handlers, which it replaces):

* SIGHUP: reload the config (`GatewayService.reload`): RELOADING=1, then READY=1 with the outcome as STATUS.
  Without a handler SIGHUP would kill twistd.
* SIGTERM: graceful stop: STOPPING=1, then the reactor stops, which drains (`GatewayService.stopService`), and
  the process exits 0, as systemd expects of a clean stop. (Twisted's own handler would make twistd re-raise
  SIGTERM on itself at the end: exit status 143.)
* SIGUSR1: reopen the access-log file (logrotate), then whatever was installed before (twistd rotates its own
  log file on SIGUSR1).
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any

from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from gateway.operations.sdnotify import Notifier
from gateway.operations.service import GatewayService

__all__ = ["install"]

_log = Logger(namespace="gateway.signals")  # not the module's name: log lines keep the namespace they had


def install(reactor: Any, service: GatewayService, notifier: Notifier | None, *, reload_on_hup: bool = True) -> None:
    """Install the handlers for `service`; tell systemd the process is ready. Without `reload_on_hup` (a worker,
    whose reloads come from the twistd process) SIGHUP is logged and ignored."""

    def reload() -> None:
        if not reload_on_hup:
            _log.info("SIGHUP ignored: a worker reloads with the config its twistd process sends")
            return
        if service.draining:
            service.reload()  # logs that it is ignored; systemd, told STOPPING=1, hears nothing more
            return
        if notifier is not None:
            notifier.reloading()
        applied = service.reload()
        if notifier is not None:
            notifier.ready("config reloaded" if applied else "reload refused, the config is unchanged (see the log)")

    def stop() -> None:
        drain = service.config.server.drain_timeout
        _log.info("SIGTERM: stopping gracefully (drain for at most {timeout:g} s)", timeout=drain)
        if notifier is not None:
            # Asks systemd for the drain and the workers' stop beyond TimeoutStopSec, if it is shorter.
            notifier.notify("STOPPING=1", f"EXTEND_TIMEOUT_USEC={int((drain + 20) * 1_000_000)}")
        with contextlib.suppress(ReactorNotRunning):
            reactor.stop()

    previous_usr1 = signal.getsignal(signal.SIGUSR1)

    def reopen() -> None:
        service.access_log.reopen()
        if service.workers is not None:
            service.workers.signal_all("USR1")  # each worker writes the access log itself

    def on_usr1(signum: int, frame: Any) -> None:
        reactor.callFromThread(reopen)
        if callable(previous_usr1):
            previous_usr1(signum, frame)

    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload))
    signal.signal(signal.SIGTERM, lambda signum, frame: reactor.callFromThread(stop))
    signal.signal(signal.SIGUSR1, on_usr1)
    if notifier is not None:
        notifier.ready("serving")
