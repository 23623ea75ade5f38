"""`Tunnel`: the bytes of a connection that switched protocols (WebSocket), copied both ways between the client's
connection and the upstream's once the upstream answered `101 Switching Protocols`.

Rules this module keeps:
* Backpressure both ways: each side's transport is the other's streaming producer, so a side that reads slowly
  pauses the reading of the other, and a tunnel holds at most about a socket buffer each way whatever flows.
* One side's end ends the tunnel, once, and closes the other side: after a clean close the other is closed once
  what was written to it is sent (and cut if that takes longer than `CLOSE_GRACE`); after a reset it is cut at
  once. The gateway's own cuts (idle, lifetime, drain) cut both sides.
* Timed on its own clock: no byte either way for `idle_timeout` ends it; so does `max_lifetime`, when one is set.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from gateway.http1.timers import Watchdog
from gateway.http1.transports import IConnectionTransport

__all__ = ["CLOSE_GRACE", "Tunnel"]

CLOSE_GRACE = 30.0
"""Seconds a side is given, after the other side closed cleanly, to take what was written to it before it is cut
(a peer that stopped reading must not keep a closed tunnel's connection open for ever)."""


class Tunnel:
    """Two transports joined: what one side sends, the other is written. `attach` joins them; `from_client`,
    `from_upstream`, `client_lost` and `upstream_lost` are what each side's protocol reports; `on_end` is told
    once, with how it ended: "client_closed", "upstream_closed", "client_reset", "upstream_reset",
    "idle_timeout", "max_lifetime", or the ending a `cut` gives."""

    __slots__ = (
        "_client",
        "_client_open",
        "_clock",
        "_lifetime",
        "_max_lifetime",
        "_on_end",
        "_timer",
        "_upstream",
        "_upstream_open",
        "down_bytes",
        "ending",
        "up_bytes",
    )

    def __init__(
        self,
        clock: IReactorTime,
        *,
        idle_timeout: float,
        max_lifetime: float,
        on_end: Callable[[str], object],
    ) -> None:
        self._clock = clock
        self._on_end = on_end
        self._client: IConnectionTransport | None = None
        self._upstream: IConnectionTransport | None = None
        self._client_open = self._upstream_open = False
        self._timer = Watchdog(clock, idle_timeout, self._idle_expired)
        self._max_lifetime = max_lifetime
        self._lifetime: IDelayedCall | None = None
        self.up_bytes = 0
        """Bytes the client sent through the tunnel."""
        self.down_bytes = 0
        """Bytes the upstream sent through the tunnel."""
        self.ending = ""
        """How it ended ("" while it is open)."""

    def attach(self, client: IConnectionTransport, upstream: IConnectionTransport) -> None:
        """Join the two transports (each the other's producer) and start the timers."""
        self._client, self._upstream = client, upstream
        self._client_open = self._upstream_open = True
        for side in (client, upstream):
            # A message is a small write, and a peer waits for its answer: none may wait for an ACK (Nagle), as
            # nginx's tcp_nodelay does for upgraded connections. A TLS or PROXY layer passes it to its socket.
            no_delay = getattr(side, "setTcpNoDelay", None)
            if no_delay is not None:
                no_delay(True)
        client.registerProducer(upstream, True)
        upstream.registerProducer(client, True)
        self._timer.arm()
        if self._max_lifetime:
            self._lifetime = self._clock.callLater(self._max_lifetime, self.cut, "max_lifetime")

    # --- what each side reports --------------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self._upstream_open and not self.ending:
            self.up_bytes += len(data)
            self._timer.kick()
            self._upstream.write(data)  # type: ignore[union-attr]  # open: attached

    def from_upstream(self, data: bytes) -> None:
        if self._client_open and not self.ending:
            self.down_bytes += len(data)
            self._timer.kick()
            self._client.write(data)  # type: ignore[union-attr]

    def client_lost(self, reason: Failure) -> None:
        self._client_open = False
        clean = isinstance(reason.value, ConnectionDone)
        self._end("client_closed" if clean else "client_reset", self._upstream, clean=clean)

    def upstream_lost(self, reason: Failure) -> None:
        self._upstream_open = False
        clean = isinstance(reason.value, ConnectionDone)
        self._end("upstream_closed" if clean else "upstream_reset", self._client, clean=clean)

    @property
    def closed(self) -> bool:
        """Whether both sides are gone."""
        return not (self._client_open or self._upstream_open)

    # --- the gateway's own cuts --------------------------------------------------------------------------------

    def cut(self, ending: str) -> None:
        """End the tunnel now (idle, lifetime, drain): both sides are cut."""
        if self.ending:
            return
        self._finish(ending)
        for side, open_ in ((self._client, self._client_open), (self._upstream, self._upstream_open)):
            if open_ and side is not None:
                side.abortConnection()

    def _idle_expired(self) -> None:
        self.cut("idle_timeout")

    # --- ending -------------------------------------------------------------------------------------------------

    def _end(self, ending: str, other: IConnectionTransport | None, *, clean: bool) -> None:
        if self.ending:
            if self.closed:
                self._timer.cancel()  # the side given a grace to close has closed
            return
        self._finish(ending)
        other_open = self._upstream_open if other is self._upstream else self._client_open
        if other is None or not other_open:
            return
        if clean:
            # What was written to the other side is sent, then it is closed; bounded by CLOSE_GRACE.
            other.loseConnection()
            self._timer.restart(CLOSE_GRACE, self._cut_rest)
        else:
            other.abortConnection()

    def _finish(self, ending: str) -> None:
        self.ending = ending
        self._timer.cancel()
        lifetime, self._lifetime = self._lifetime, None
        if lifetime is not None and lifetime.active():
            lifetime.cancel()
        self._on_end(ending)

    def _cut_rest(self) -> None:
        """A side closed cleanly and the other did not finish closing within the grace: it is cut."""
        self._timer.cancel()
        for side, open_ in ((self._client, self._client_open), (self._upstream, self._upstream_open)):
            if open_ and side is not None:
                side.abortConnection()
