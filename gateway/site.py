"""The public HTTP server: a Twisted `HTTPFactory` whose channels make a `GatewayRequest` for every request.

Rule: the factory adds nothing of its own to a response (no `Server`, no `Content-Type`, no `Date`: a proxy is
invisible) and keeps no per-request state; everything a request needs is in the `Gateway` it carries, which a
reload swaps whole.
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.web.http import HTTPChannel, HTTPFactory, Request

from gateway.request import Gateway, GatewayRequest

__all__ = ["GatewayChannel", "GatewayFactory"]


class GatewayChannel(HTTPChannel):
    """Twisted's HTTP/1.1 channel, answering a request line or header line over the size limit with 400 rather
    than closing the connection without a word (LineReceiver's default)."""

    def lineLengthExceeded(self, line: bytes) -> None:
        self._respondToBadRequestAndDisconnect()


class GatewayFactory(HTTPFactory):
    """Builds the client-facing HTTP/1.1 channels: idle timeout and header limits from the config."""

    def __init__(self, gateway: Gateway, *, clock: IReactorTime) -> None:
        super().__init__(timeout=gateway.server.idle_timeout, reactor=clock)
        self.gateway = gateway

    def buildProtocol(self, addr: IAddress | None) -> HTTPChannel:  # type: ignore[override]
        channel = GatewayChannel()
        channel.factory = self
        channel.requestFactory = GatewayRequest
        channel.totalHeadersSize = self.gateway.limits.max_header_bytes
        channel.MAX_LENGTH = self.gateway.limits.max_header_bytes  # one line can be as long as the whole head
        channel.maxHeaders = self.gateway.limits.max_header_count
        # As HTTPFactory.buildProtocol does: the channel's timers run on our clock.
        channel.callLater = self.reactor.callLater
        channel.timeOut = self.timeOut
        return channel

    def startFactory(self) -> None:
        """No combined-log file and no per-second log-date timer: the gateway logs requests itself."""

    def stopFactory(self) -> None:
        """Nothing was started."""

    def log(self, request: Request) -> None:
        """Twisted's combined log line is not written; see `startFactory`."""
