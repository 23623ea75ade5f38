"""`ConnectionLifecycle`: the life of a client connection (`gateway.http1.server.ClientConnection`), from accept to
close, over its response side (`gateway.http1.writer`) and beneath its reading of requests.

Rules:
* One request is served at a time: a request's handler (`gateway.http1.serving.RequestHandler`) is made once its
  head is read, and the next request is only served once it has finished.
* Every refusal is an answer (problem+json, `Connection: close`), then a lingering close: FIN, and what the client
  still sends is read and dropped for at most `server.lingering_timeout` (closing with unread bytes would reset the
  connection and could destroy the answer). A refusal of a head pipelined behind a request is answered once that
  request has finished.
* Timers: the head timer runs from a head's first byte to its end; the idle timer only while no request is under
  way (a request's body and response have their own timeouts, the exchange's, measured on the same `timer`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Final

from OpenSSL import SSL
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IAddress, IDelayedCall, IHandshakeListener, ISSLTransport, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import classImplements

from gateway.addresses import canonical_ip
from gateway.config import Listener
from gateway.errors import GatewayError, HeadTimeout
from gateway.headers import request_id_of
from gateway.http1.fields import Fields
from gateway.http1.serving import ConnectionOwner, Message, RequestHandler
from gateway.http1.timers import Watchdog
from gateway.http1.transports import IConnectionTransport
from gateway.http1.writer import ResponseWriter, refusal_bytes
from gateway.tls.server import ClientCertificate, client_certificate, tls_parameters

__all__ = ["ConnectionLifecycle", "canonical_peer"]

_log = Logger(namespace="gateway.http1.server")  # not the module's name: log lines keep the namespace they had

_SEND_LIMIT: Final = 1024 * 1024
"""The most a plain client socket's `send` is given at once (the public `SEND_LIMIT` of Twisted's
`FileDescriptor`, 128 KiB by default): one of the largest upstream reads (`gateway.proxy.streaming.ReadSizer.MAX`)
goes out in one call, where 128 KiB at a time took eight, each a turn of the reactor (bench S1: +15% throughput
with 256 KiB reads, about +30% with 1 MiB reads)."""


def canonical_peer(peer: IAddress) -> IAddress:
    """A connection's peer address with its IP in canonical form: an IPv4 client of an IPv6 ("::") socket as IPv4
    ("::ffff:192.0.2.1" is 192.0.2.1, for X-Forwarded-For, the logs and per-address limits alike), an IPv6 address
    compressed. Behind a PROXY protocol listener the address is the header's text as sent, which may be no
    address at all: then it is returned as it is."""
    if not isinstance(peer, IPv4Address | IPv6Address):
        return peer
    host = peer.host
    canonical = canonical_ip(host)
    if canonical is None or canonical == host:
        return peer
    if "." in canonical and ":" in host:
        return IPv4Address(peer.type, canonical, peer.port)
    return type(peer)(peer.type, canonical, peer.port)


def _raise_send_limit(transport: object) -> None:
    """Set `_SEND_LIMIT` on the socket's transport under a plain connection: its own, or the one under a wrapping
    layer (each layer's `transport`, a few at most: a PROXY protocol header). A wrapper answers for the attributes
    of what it wraps (`ProtocolWrapper.__getattr__`), so the socket's is told by its class. Not under TLS: the TLS
    layer writes a response in records of 16 KiB, and Twisted joins what is left unsent with what came since
    whenever less than the limit is left, so a larger limit copies more at each turn (bench S1 over TLS)."""
    for _ in range(3):
        if isinstance(transport, FileDescriptor):
            transport.SEND_LIMIT = _SEND_LIMIT
            return
        transport = getattr(transport, "transport", None)


class ConnectionLifecycle(ResponseWriter):
    """A client connection's life: what the exchange asks of it, the requests it serves one at a time, its
    refusals and its timers. The base of `ClientConnection`, which reads the requests; nothing here calls that."""

    def __init__(self, owner: ConnectionOwner, listener: Listener | None = None) -> None:
        super().__init__()
        self.owner = owner
        self.listener = listener
        """The listener the connection came in on (None for one a test builds without one)."""
        self._clock = owner.clock
        self.limits = owner.limits
        """The head limits, as the server had them when the connection's current head began."""
        self.server = owner.server
        self.refused: GatewayError | None = None
        """The error the connection was refused with, if it was."""
        self.handler: RequestHandler | None = None
        """The request being served (at most one)."""
        self._message: Message | None = None
        """The message being read (its head, then its body)."""
        self._queued: deque[Message] = deque()
        """Pipelined messages read before the one before them was answered."""
        self._line_done = False
        self._in_head = False
        """Between a message's first byte and the end of its head."""
        self.head_began = 0.0
        """When the latest request head began (for the access record of a refused one)."""
        self._head_timer: IDelayedCall | None = None
        self.timer = Watchdog(self._clock, self.server.idle_timeout, self._idle_expired)
        """The connection's one timer: its idle time between requests, and while a request is served whatever
        that request's exchange waits for (the response head, the gaps in the response body, the lingering
        deadline). Re-targeted with `restart`, so a request costs no timer of its own (one pending call at most,
        moved only when a deadline comes sooner)."""
        self._idle = False
        """Whether the timer measures the connection's idle time."""
        self._linger_timer: IDelayedCall | None = None
        self._refuse_after: GatewayError | None = None
        """A refusal of a later head, answered once the request under way has finished."""
        self._counted = False
        self._handshaken = False
        self._peer: IAddress | None = None
        self._host: IAddress | None = None
        self._tls_info: tuple[str | None, str | None] | None = None
        self._client_certificate: ClientCertificate | bool | None = False
        self._secure: bool | None = None
        self._upgrade_wait = False
        """The request being served asks to switch to WebSocket, and is not answered yet."""
        self._upgrade_rest: bytes | None = None
        """What the client sent after the head of a request that asks to switch protocols, held (reading paused)
        until that request is answered."""
        self._tunnel: Callable[[bytes], object] | None = None
        """Once the connection is a tunnel (`switch_protocols`): where every byte the client sends goes."""

    # --- what the exchange asks of the connection -------------------------------------------------------------

    @property
    def tls_info(self) -> tuple[str | None, str | None]:
        """The TLS version and cipher the handshake agreed on, or (None, None) on a plain connection."""
        if self._tls_info is None:
            self._tls_info = tls_parameters(self.transport)
        return self._tls_info

    @property
    def secure(self) -> bool:
        """Whether the client came over TLS (asked once per connection)."""
        if self._secure is None:
            self._secure = bool(ISSLTransport.providedBy(self.transport))
        return self._secure

    @property
    def client_certificate(self) -> ClientCertificate | None:
        """The client certificate the TLS handshake verified, if one was sent (read once per connection)."""
        if self._client_certificate is False:
            self._client_certificate = client_certificate(self.transport)
        return self._client_certificate  # type: ignore[return-value]

    def getPeer(self) -> IAddress:
        """The client's address, asked once per connection, with its IP in canonical form. Behind a PROXY
        protocol listener it is the address the header carried (Twisted's parser keeps its text as sent, an
        IPv6 address uncompressed or not an address at all)."""
        if self._peer is None:
            self._peer = canonical_peer(self.transport.getPeer())
        return self._peer

    def getHost(self) -> IAddress:
        """The listening address, asked of the socket once per connection."""
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    def finish(self) -> None:
        """The request is served (its response complete, its body read): the next request may be read."""
        self.end_body()
        self.handler = None
        if self._refuse_after is not None:
            error, self._refuse_after = self._refuse_after, None
            if self.persistent and not self.transport.disconnecting:
                self.refuse(error)
            else:
                self.transport.loseConnection()
            return
        if self.refused is not None:
            return
        if not self.persistent or self.transport.disconnecting:
            self.transport.loseConnection()
            return
        self._next()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def pause_reading(self) -> None:
        self.transport.pauseProducing()

    def resume_reading(self) -> None:
        """Read from the client again, unless a pipelined request waits (then the next request resumes it)."""
        if not self._queued:
            self.transport.resumeProducing()

    def abort(self) -> None:
        """Cut the connection: a response that cannot be completed must not look complete."""
        self.persistent = False
        self._cancel_timers()
        self.transport.abortConnection()

    def linger(self) -> None:
        """The answer is complete and the request body still comes: FIN now, read and drop the rest."""
        self.persistent = False
        if ITCPTransport.providedBy(self.transport):
            self.transport.loseWriteConnection()

    # --- connection -----------------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        if not self.secure:
            _raise_send_limit(self.transport)
        self._counted = True
        refusal = self.owner.connection_opened(self)
        if refusal is not None:
            self.refuse(refusal)
            return
        self._arm_idle()

    def handshakeCompleted(self) -> None:
        """The TLS layer under this connection finished its handshake (IHandshakeListener)."""
        self._handshaken = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Only the TLS layer ends a connection with an SSL.Error; a client that merely left is not a failure.
        if not self._handshaken and self.listener is not None and isinstance(reason.value, SSL.Error):
            self.owner.handshake_failed(self.listener, reason.value)
        self._cancel_timers()
        handler, self.handler = self.handler, None
        self._queued.clear()
        if handler is not None:
            handler.connection_lost(reason)
        if self._counted:
            self._counted = False
            self.owner.connection_closed(self)

    # --- serving, one request at a time ----------------------------------------------------------------------

    def _serve(self, message: Message) -> None:
        self._upgrade_wait = message.upgrade
        self._version = message.version
        self.persistent = self.persistent and message.keep_alive and message.version == b"HTTP/1.1"
        self._chunked = False
        self._body_allowed = True
        self.response_started = self.response_ended = False
        self.sent_length = 0
        self.handler = handler = self.owner.handle(self, message)
        handler.begin()
        if message.body is not None:
            body, message.body = message.body, None
            while body and self.handler is handler:
                handler.body_received(body.popleft())
        if message.ended and self.handler is handler:
            handler.body_ended()

    def _next(self) -> None:
        self._upgrade_wait = False
        rest, self._upgrade_rest = self._upgrade_rest, None
        self._next_request()
        if rest and self.refused is None and self.persistent and not self.transport.disconnecting:
            # What came after a request that asked to switch protocols, answered without switching.
            self.dataReceived(rest)

    def _next_request(self) -> None:
        if self._queued:
            message = self._queued.popleft()
            if not self._queued:
                self.transport.resumeProducing()  # first: a pause the handler asks for as it begins then holds
            self._serve(message)
        else:
            self.transport.resumeProducing()
            if self._message is None:
                self._arm_idle()
            elif self._in_head:
                self._start_head_timer()

    def switch_protocols(self, tunnel: Callable[[bytes], object]) -> tuple[IConnectionTransport, bytes]:
        """The upstream switched protocols (WebSocket): from now on this connection is a tunnel, and every byte the
        client sends goes to `tunnel`, without a timer of the connection's (the tunnel has its own). Returns the
        transport and what the client sent after the request's head (to be passed on first)."""
        self._tunnel = tunnel
        self._upgrade_wait = False
        self.persistent = False
        self._cancel_timers()
        rest, self._upgrade_rest = self._upgrade_rest, None
        self.transport.resumeProducing()
        return self.transport, rest or b""

    # --- refusing --------------------------------------------------------------------------------------------

    def refuse(self, error: GatewayError) -> None:
        """Answer `error` and end the connection; nothing more of it is parsed, and no request on it goes on.

        If a response has already begun on the connection no answer can follow it: a complete one lingers as if
        the refusal were its own, an incomplete one is cut."""
        if self.refused is not None or self._refuse_after is not None:
            return
        message = self._message
        own = not self._queued and message is not None and not self._in_head
        if self.handler is not None and not own:
            # A later head is refused while a request is served: its answer follows that request's response.
            self._refuse_after = error
            self._queued.clear()
            self.transport.pauseProducing()
            return
        self.refused = error
        self._cancel_timers()
        self.persistent = False
        handler, self.handler = self.handler, None
        request_id = request_id_of(message.headers if message is not None else Fields())
        method = message.method if message is not None else b""
        line = (method, message.target) if message is not None and self._line_done else None
        # Whose refusal it is: the request being read's (its body's framing failed), unless a new head was
        # being read (no request yet) or pipelined.
        owner_handler = handler if handler is not None and not self._queued and message is not None else None
        if owner_handler is not None:
            owner_handler.refused(error, request_id)
        else:
            self.owner.head_refused(self, error, request_id, line)
        # A response begun: the served request's, or a request's answered before its body ended.
        started = self.response_started and (handler is not None or (message is not None and not self._in_head))
        complete = handler is None or handler.answered
        if handler is not None:
            handler.connection_lost(Failure(ConnectionAborted(f"request refused: {error.detail}")))
        self._queued.clear()
        _log.info(
            "Refused a client request with {status}: {detail} (peer {peer}, request {request_id})",
            status=error.status,
            detail=error.detail,
            peer=str(self.getPeer()),
            request_id=request_id,
        )
        if started and not complete:
            self.transport.abortConnection()
            return
        if not started:
            server = self.server.server_header
            self.transport.write(refusal_bytes(error, request_id, head_request=method == b"HEAD", server=server))
        tcp = self.transport
        if ITCPTransport.providedBy(tcp):
            # Lingering close: FIN after the answer, read and drop what still comes, cut at the deadline.
            self.transport.resumeProducing()
            tcp.loseWriteConnection()
            self._linger_timer = self._clock.callLater(self.server.lingering_timeout, self._linger_expired)
        else:
            self.transport.loseConnection()

    def _linger_expired(self) -> None:
        timer, self._linger_timer = self._linger_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self.transport.abortConnection()

    # --- timers ----------------------------------------------------------------------------------------------

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            seconds = self.server.head_timeout
            self._head_timer = self._clock.callLater(seconds, self._head_timed_out, seconds)

    def _head_timed_out(self, seconds: float) -> None:
        self._head_timer = None
        self.refuse(HeadTimeout(f"the request head was not complete within {seconds:g} s"))

    def _cancel_head_timer(self) -> None:
        timer, self._head_timer = self._head_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _arm_idle(self) -> None:
        if self.server.idle_timeout:
            self._idle = True
            self.timer.restart(self.server.idle_timeout, self._idle_expired)  # a reload may have changed it

    def _idle_expired(self) -> None:
        """No request for server.idle_timeout: the connection closes, as a kept-alive one does (no answer)."""
        self._idle = False
        if self.handler is None and self._message is None:
            self.transport.loseConnection()

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        self.timer.cancel()
        timer, self._linger_timer = self._linger_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def close_when_idle(self) -> bool:
        """Close now if no request is under way (a drain); returns whether it did."""
        if self.handler is None and self._message is None and self.refused is None:
            self.transport.loseConnection()
            return True
        self.persistent = False
        return False


classImplements(ConnectionLifecycle, IHandshakeListener)
