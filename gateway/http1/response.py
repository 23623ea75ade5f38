"""`UpstreamResponse`: a response as read from an upstream server (`gateway.http1.upstream`), its body handed to
the protocol its owner gives it; and what a request sent on an upstream connection answers to (`ResponseReceiver`)
and returns (`Cancellable`).

Rules:
* The response and its body speak Twisted's client vocabulary (`IResponse`-like attributes, a body `IProtocol`
  that ends with `ResponseDone`, `PotentialDataLoss` for a body framed by the connection's close, or
  `ResponseFailed`), which is what the gateway's request path consumes today.
* Its body is relayed as it is read, never held beyond one socket read (reading pauses until the body has a
  protocol).
* The body's transport is cut off when the body ends: a late pause or stop never reaches a connection that went
  back to the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING
from typing import Protocol as TypingProtocol

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol, IPushProducer
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import classImplements

from gateway.http1.fields import Fields
from gateway.http1.transports import IConnectionTransport

if TYPE_CHECKING:
    from gateway.http1.upstream import UpstreamConnection

__all__ = ["Cancellable", "ResponseReceiver", "UpstreamResponse"]


class _BodyTransport:
    """What a response's body protocol sees as its transport: pauses, resumes and stops reading from the upstream
    socket, for as long as the response is being read. Cut off (`detach`) when it ends, so that a late pause
    or stop can never reach a connection that has gone back to the pool."""

    def __init__(self, connection: UpstreamConnection) -> None:
        self._connection: UpstreamConnection | None = connection

    def detach(self) -> None:
        self._connection = None

    def pauseProducing(self) -> None:
        if self._connection is not None:
            self._connection.pause_reading()

    def resumeProducing(self) -> None:
        if self._connection is not None:
            self._connection.resume_reading()

    def stopProducing(self) -> None:
        """The body is not wanted any more (the client left, or the gateway cut the stream): the connection
        closes, never to be reused."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abandon()


classImplements(_BodyTransport, IPushProducer)


class ResponseReceiver(TypingProtocol):
    """Who a request sent with `UpstreamConnection.send` answers to."""

    def response_received(self, response: UpstreamResponse) -> None:
        """The response head is read; its body follows (`UpstreamResponse.deliverBody`)."""

    def response_failed(self, reason: Failure) -> None:
        """There is no response: `reason` is one of `twisted.web.client`'s `ResponseNeverReceived`,
        `ResponseFailed`, `RequestTransmissionFailed` (with the cause among its reasons), or a connect error."""


class Cancellable(TypingProtocol):
    """A request under way, which its owner may give up."""

    def cancel(self) -> None: ...


class UpstreamResponse:
    """A response as read from an upstream: its status line and headers (all of them, framing ones included, as
    sent), its body length (`UNKNOWN_LENGTH` unless a Content-Length framed it; 0 for HEAD, 204 and 304), and its
    body, delivered to the protocol `deliverBody` is given."""

    def __init__(self, connection: UpstreamConnection, code: int, phrase: bytes, version: str, headers: Fields):
        self._connection = connection
        self.code = code
        self.phrase = phrase
        self.version = (b"HTTP", 1, 1) if version == "1.1" else (b"HTTP", 1, 0)
        self.headers = headers
        self.length: int | object = UNKNOWN_LENGTH
        self.close_delimited = False
        """Its body runs to the connection's close (neither Content-Length nor chunked framing)."""
        self._protocol: IProtocol | None = None
        self._held: list[bytes] = []
        self._ended: Failure | None = None
        self._transport = _BodyTransport(connection)
        self.tunnel_rest = b""
        """For a `101` switching to WebSocket: what the upstream sent after the head (the tunnel's first bytes)."""

    def switch_protocols(
        self, tunnel: Callable[[bytes], object], lost: Callable[[Failure], object]
    ) -> IConnectionTransport:
        """Make a tunnel of a `101` switching to WebSocket: every byte the upstream sends from now on goes to
        `tunnel` (`tunnel_rest` first, which the caller passes on), and its connection's end to `lost`. Returns
        the upstream's transport, for the tunnel to write to."""
        self._transport.detach()
        return self._connection.switch_protocols(tunnel, lost)

    @property
    def reset(self) -> bool:
        """Whether the upstream connection was lost other than by a clean close (a body framed by the connection's
        close is complete only if it was closed, not reset)."""
        reason = self._connection.lost_reason
        return reason is not None and not reason.check(ConnectionDone)

    def set_read_size(self, size: int) -> None:
        """Read the rest of this response's body from the upstream socket `size` bytes at a time."""
        self._connection.set_read_size(size)

    def deliverBody(self, protocol: IProtocol) -> None:
        """Give the body to `protocol`: what was read already, then the rest as it comes, then `connectionLost`
        with `ResponseDone`, `PotentialDataLoss` or `ResponseFailed`."""
        self._protocol = protocol
        # A body protocol's transport is a producer (IResponse.deliverBody), which ITransport does not describe.
        protocol.makeConnection(self._transport)  # type: ignore[arg-type]
        held, self._held = self._held, []
        for data in held:
            protocol.dataReceived(data)
        if self._ended is not None:
            self._protocol = None
            protocol.connectionLost(self._ended)
        elif held:
            self._connection.resume_reading()  # held back until the body had a protocol

    # --- fed by the connection -------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is not None:
            protocol.dataReceived(data)
        else:
            self._held.append(data)  # one read at most: reading pauses until the body has a protocol
            self._connection.pause_reading()

    def end(self, reason: Failure) -> None:
        if self._ended is not None:
            return
        self._ended = reason
        self._transport.detach()  # from now on the connection may serve another exchange
        protocol, self._protocol = self._protocol, None  # (the protocol may hold this response: no cycle left)
        if protocol is not None:
            protocol.connectionLost(reason)
