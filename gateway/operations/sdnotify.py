"""The sd_notify protocol: telling systemd (`Type=notify`) that the gateway is ready, reloading or stopping.

Rule: a notification never fails the gateway. systemd gives the main process the address of a datagram socket in
NOTIFY_SOCKET (a path, or "@name" for a Linux abstract socket); each notification is one datagram of
newline-separated `KEY=value` assignments. A send that fails (systemd gone, its queue full) is logged as a warning,
once per errno, and dropped: serving requests matters more than systemd's view of them. NOTIFY_SOCKET stays in this
process's environment, but worker processes must not see it (with `NotifyAccess=main` systemd would ignore them
anyway, and a worker must never claim the service's state): spawn them with `child_environment`.

Stdlib only, no reactor: sending a datagram to a local socket does not block (the socket is non-blocking).
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Mapping

from twisted.logger import Logger

__all__ = ["NOTIFY_SOCKET", "Notifier", "child_environment"]

_log = Logger(namespace="gateway.sdnotify")  # not the module's name: log lines keep the namespace they had

NOTIFY_SOCKET = "NOTIFY_SOCKET"
"""The environment variable in which systemd passes the notification socket's address."""


def _one_line(text: str) -> str:
    """`text` with its newlines made spaces: a newline would end the assignment and start another."""
    return text.replace("\n", " ")


def child_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """A copy of `environ` for a worker process: everything but NOTIFY_SOCKET."""
    return {key: value for key, value in environ.items() if key != NOTIFY_SOCKET}


class Notifier:
    """Notifications to the systemd socket at `address` (a path, or "\\0name" for an abstract socket).

    The socket is opened on the first notification and kept until `close()`; a notification after `close()`
    opens a new one.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self._socket: socket.socket | None = None
        self._warned: set[int] = set()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier | None:
        """The notifier systemd asked for in NOTIFY_SOCKET, or None when not run by systemd with `Type=notify`
        (unset or empty) or when the address is of a kind this module does not speak (e.g. "vsock:...")."""
        value = environ.get(NOTIFY_SOCKET, "")
        if not value:
            return None
        if value.startswith("@"):
            return cls("\0" + value[1:])
        if value.startswith("/"):
            return cls(value)
        _log.warn(
            "NOTIFY_SOCKET={address!r} is neither an absolute path nor an abstract socket name (@name);"
            " not notifying systemd",
            address=value,
        )
        return None

    @property
    def display_address(self) -> str:
        """The address as systemd writes it: "@name" for an abstract socket."""
        return "@" + self.address[1:] if self.address.startswith("\0") else self.address

    def ready(self, status: str = "") -> None:
        """Start-up is over (the listeners are bound), or a reload is; with `status`, also say so in words."""
        if status:
            self.notify("READY=1", f"STATUS={status}")
        else:
            self.notify("READY=1")

    def reloading(self) -> None:
        """A reload has begun; `ready()` ends it. systemd 253 and later require MONOTONIC_USEC with it (the
        CLOCK_MONOTONIC time of the reload, which `time.monotonic_ns` reads); older ones ignore it."""
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> None:
        """The gateway has begun to stop (draining)."""
        self.notify("STOPPING=1")

    def status(self, text: str) -> None:
        """A one-line description of the current state, shown by `systemctl status`."""
        self.notify(f"STATUS={text}")

    def notify(self, *assignments: str) -> None:
        """Send `KEY=value` assignments in one datagram (newlines inside them become spaces); logs instead of
        raising if it cannot be sent."""
        for assignment in assignments:
            if "=" not in assignment:
                raise ValueError(f"not a KEY=value assignment: {assignment!r}")
        if not assignments:
            return
        message = "\n".join(_one_line(a) for a in assignments).encode("utf-8")
        try:
            if self._socket is None:
                # Non-blocking, and close-on-exec as every Python socket is (PEP 446): workers never inherit it.
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(message, self.address)
        except OSError as e:
            self._warn(e)

    def close(self) -> None:
        """Close the socket, if open."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _warn(self, error: OSError) -> None:
        """Log a failed send, the first time its errno is seen: systemd gone stays gone, and a status update per
        request would otherwise flood the log."""
        code = error.errno if error.errno is not None else -1
        if code in self._warned:
            return
        self._warned.add(code)
        _log.warn(
            "Could not notify systemd at {address}: {error} (further {errno_name} errors are not logged)",
            address=self.display_address,
            error=error,
            errno_name=errno.errorcode.get(code, str(code)),
        )
