"""`twistd gateway`: the command line (`--config`, `--check`) and `makeService`; nothing else.

Rule: this is the composition root, the one module that names the global reactor (with `gateway.operations.worker`, the
same root for the extra worker processes); everything below takes a reactor as a parameter. An invalid config
prints every error in it, one per line as `gateway: file: key: reason`, and exits non-zero before anything starts,
so `twistd gateway --config F --check` works like `nginx -t`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.python import usage

from gateway import config
from gateway.logs import observer
from gateway.operations import signals
from gateway.operations.about import versions
from gateway.operations.sdnotify import Notifier, child_environment
from gateway.operations.service import GatewayService

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    """The command line of `twistd gateway`."""

    synopsis = "[--config FILE] [--check] [--version]"
    longdesc = "Run the streaming HTTP API gateway with the TOML config FILE."
    optParameters = [["config", "c", "/etc/gateway/gateway.toml", "The TOML config file."]]
    optFlags = [["check", None, "Validate the config file, print the verdict and exit (0 valid, 1 not)."]]

    def opt_version(self) -> None:
        """Print the gateway's version, those of Twisted, Python and OpenSSL, and its build, and exit."""
        about = versions()
        print(f"gateway {about['version']}")
        print(f"Twisted {about['twisted']}")
        print(f"Python {about['python']}")
        print(f"{about['openssl']} (pyOpenSSL {about['pyopenssl']})")
        print(f"Build: request path {about['build']}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            self.config = config.load(self["config"])
        except config.ConfigError as e:
            # Not a UsageError: twistd would print its whole help text before the lines that matter.
            for error in e.errors:
                print(f"gateway: {error}", file=sys.stderr)
            raise SystemExit(1) from None
        if self["check"]:
            print(f"gateway: {self['config']}: OK")
            raise SystemExit(0)


class _TwistdService(GatewayService):
    """Under twistd, an address that cannot be bound ends start-up with one line, not a traceback."""

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(f"gateway: {e}") from None


def systemd_sockets(reactor: Any, cfg: config.Config) -> dict[str, int]:
    """The descriptors of the listening sockets systemd passed for the config's `systemd = NAME` listeners
    (socket activation), found through Twisted's `systemd:` endpoint (which reads LISTEN_FDS, LISTEN_FDNAMES and
    LISTEN_PID once, when twisted.internet.endpoints is imported). A name systemd did not pass ends start-up."""
    found: dict[str, int] = {}
    for listener in cfg.listeners:
        if not listener.systemd:
            continue
        try:
            endpoint = serverFromString(reactor, f"systemd:domain=INET:name={listener.systemd}")
        except (KeyError, ValueError):
            passed = os.environ.get("LISTEN_FDNAMES", "").replace(":", ", ") or "none"
            raise SystemExit(
                f"gateway: {cfg.source}: listeners: systemd passed no socket named {listener.systemd!r} "
                f"(names passed: {passed}; is the .socket unit's FileDescriptorName the same?)"
            ) from None
        found[listener.systemd] = endpoint.fileno
    return found


def logs_json(twistd: Mapping[str, Any]) -> bool:
    """Whether twistd logs JSON lines (`--logger=gateway.logs.observer`), so that its workers do too. By the time a
    plugin's service is made, twistd has imported the option's name into the observer factory itself."""
    return twistd.get("logger") is observer


def makeService(options: Options) -> IService:
    """The gateway; with `server.workers` above 1 the twistd process is worker 0 and starts the others. Once
    the reactor runs, the signals are wired (`gateway.operations.signals`) and systemd, if it asked, is told READY=1."""
    from twisted.internet import reactor

    twistd = getattr(options, "parent", None)  # twistd's own options, when run by twistd
    json_log = twistd is not None and logs_json(twistd)
    daemon = twistd is not None and not twistd.get("nodaemon")
    workers = options.config.server.workers
    if daemon and workers > 1:
        raise SystemExit(
            f"gateway: {options.config.source}: server.workers: {workers} worker processes log to the standard "
            "output they share with twistd, which a daemonised twistd discards: run twistd --nodaemon (as the "
            "systemd unit does), or set server.workers = 1"
        )
    service = _TwistdService(
        options.config,
        reactor,
        spawn_workers=True,
        worker_environment=child_environment,
        worker_json_log=json_log,
        inherited=systemd_sockets(reactor, options.config),
        daemon=daemon,
    )
    reactor.callWhenRunning(signals.install, reactor, service, Notifier.from_environment())
    return service
