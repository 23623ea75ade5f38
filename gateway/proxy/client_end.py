"""`ClientEnd`: what an exchange asks of the client end it answers through.

Two ends implement it: the gateway's own client connection (`gateway.http1.server.ClientConnection`) and the
twisted.web request of `gateway.proxy.web`. mypy checks both against it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.interfaces import IAddress, IPushProducer

from gateway.config import Listener
from gateway.http1.fields import Fields
from gateway.http1.timers import Watchdog
from gateway.http1.transports import IConnectionTransport
from gateway.tls.server import ClientCertificate

__all__ = ["ClientEnd"]


class ClientEnd(Protocol):
    """What an exchange asks of the client end it answers through: the gateway's own connection
    (`gateway.http1.server.ClientConnection`), or a twisted.web request (`gateway.proxy.web`)."""

    listener: Listener | None
    persistent: bool
    """Whether another request may follow on the connection; the exchange may only clear it."""
    timer: Watchdog
    """The one timer the exchange (and its response relay) measures its waits with."""

    @property
    def transport(self) -> IPushProducer:
        """What reads the request body: paused when the upstream cannot take more (`RequestBodyPipe`)."""

    @property
    def secure(self) -> bool:
        """Whether the client came over TLS."""

    @property
    def tls_info(self) -> tuple[str | None, str | None]: ...

    @property
    def client_certificate(self) -> ClientCertificate | None: ...

    def getPeer(self) -> IAddress: ...

    def send_continue(self) -> None: ...

    def write_head(self, code: int, phrase: bytes, headers: Fields, *, head_request: bool) -> None: ...

    def write_body(self, data: bytes) -> None: ...

    def end_body(self) -> None: ...

    def finish(self) -> None: ...

    def abort(self) -> None: ...

    def linger(self) -> None: ...

    def switch_protocols(self, tunnel: Callable[[bytes], object]) -> tuple[IConnectionTransport, bytes]:
        """The connection becomes a tunnel (the upstream switched to WebSocket): every byte the client sends from
        now on goes to `tunnel`; returns the transport and what came after the request's head."""

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...
