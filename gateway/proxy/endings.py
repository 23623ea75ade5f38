"""`Endings`: the ground floor of an `Exchange` (`gateway.proxy.exchange`): its state, declared here once for all
of it, what it writes back through the client end, and every way it ends.

Rules this module keeps:
* A response is never presented as complete unless it is: a truncated or stalled stream aborts the client
  connection; the connection's `finish` (which writes the chunked terminator) is only called for a complete
  response.
* `finish` is only called once the request body has been read to its end, so the connection reads the next
  request from where this one ended; while an answer waits for that, the rest of the body is read and dropped
  for at most the lingering timeout, because closing with unread data would reset the connection and could
  destroy the answer.
* A request ends once (its phase has no way out): its concurrency slot is given back and its record goes to the
  access log and the metrics (`gateway.proxy.records`).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger

from gateway.config import Route
from gateway.errors import BadRequest, BodyTooLarge, GatewayError, MethodNotAllowed, UpgradeRefused, reason_phrase
from gateway.http1.fields import Fields
from gateway.http1.response import Cancellable, UpstreamResponse
from gateway.http1.serving import Message
from gateway.proxy.client_end import ClientEnd
from gateway.proxy.context import Gateway
from gateway.proxy.failures import TIMEOUT_ERRORS
from gateway.proxy.phases import ANSWERED, TRANSITIONS, Body, Phase
from gateway.proxy.pool import UpstreamPool
from gateway.proxy.records import request_ended
from gateway.proxy.streaming import RequestBodyPipe, ResponseRelay
from gateway.proxy.tunnel import Tunnel

if TYPE_CHECKING:
    from gateway.proxy.exchange import PendingVerdict

__all__ = ["Endings"]

_log = Logger(namespace="gateway.exchange")  # not the module's name: log lines keep the namespace they had


class Endings:
    """The state of one proxied request and the ways it ends: the base of `Exchange`, which adds how the request
    gets there (`gateway.proxy.forwarding.Forwarding`: the upstream request and the response relay; then the
    head's admission and what the client connection reports). Nothing here calls those: the layers above call down.
    """

    __slots__ = (
        "_admitted_headers",
        "_clock",
        "_connection",
        "_disconnected",
        "_draining",
        "_has_body",
        "_length",
        "_lingered",
        "_pending",
        "_phrase",
        "_pipe",
        "_relay",
        "_release",
        "_response",
        "_slot_held",
        "_target",
        "_timing",
        "_tls",
        "_tunnel",
        "_upgrade",
        "_upstream_headers",
        "_upstream_request",
        "_waiting",
        "attempts",
        "began",
        "body",
        "body_bytes",
        "client",
        "clientproto",
        "code",
        "consumer",
        "cut_by",
        "decided_at",
        "ending",
        "error",
        "gateway",
        "method",
        "path",
        "phase",
        "pool",
        "queued_at",
        "refusal",
        "requestHeaders",
        "request_id",
        "responseHeaders",
        "response_at",
        "route",
        "sentLength",
        "sent_at",
        "slot_at",
        "startedWriting",
        "tls_info",
        "upstream_address",
        "uri",
    )

    def __init__(self, gateway: Gateway, connection: ClientEnd, message: Message, draining: bool) -> None:
        self.gateway = gateway
        self._clock = gateway.clock
        self._connection = connection
        self._tls = connection.secure
        self.method = message.method
        self.uri = message.target
        self.clientproto = message.version
        self.path = self.uri.partition(b"?")[0]
        self.requestHeaders = message.headers
        self._length = message.length
        self._draining = draining
        self._upgrade = message.upgrade
        """The request asks to switch to WebSocket."""
        self._tunnel: Tunnel | None = None
        """Once the upstream switched: the tunnel the two connections are (phase TUNNEL)."""
        self.client = connection.getPeer()
        self.code = 200
        self._phrase = b"OK"
        self.responseHeaders = Fields()
        self.startedWriting = False
        self.sentLength = 0
        """Body bytes of the response written to the client."""
        self._disconnected = False
        self.phase = Phase.HEAD
        self.ending = ""
        """How the request ended, for logs and tests: "completed", "answered", "client_gone", or why it was cut."""
        self.error: GatewayError | None = None
        """The error the gateway answered with itself, if any."""
        self.request_id = ""
        self.route: Route | None = None
        self._has_body = False
        self.body = Body.EXPECTED
        """The request side's state (a request without a body has one of no bytes, read when its head ends)."""
        self._timing = False
        """Whether the connection's timer measures a wait of this exchange (see `_arm_timer`)."""
        self.pool: UpstreamPool | None = None
        """The pool of the route's upstream, once the request was admitted."""
        self._slot_held = False
        self._waiting: Deferred[Any] | None = None
        self._upstream_request: Cancellable | None = None
        """The upstream request under way until its response head (or its failure) came."""
        self._pipe: RequestBodyPipe | None = None
        self._relay: ResponseRelay | None = None
        self._response: UpstreamResponse | None = None
        self._target = b""
        self._pending: PendingVerdict | None = None
        """The admission verdict being waited for, and what is held meanwhile (phase ADMITTING)."""
        self._lingered = 0
        """Body bytes read and dropped while lingering."""
        self._release: Any = None
        """Gives back the consumer's concurrency slot; called once, when the request ends however it ends."""
        self._admitted_headers: Any = ()
        """Headers admission gives every response to this request (its rate limit)."""
        self.upstream_address: str | None = None
        """The server the request went to (for the access log), once it had a connection."""
        self.attempts = 0
        """Tries of the upstream request, up to the one whose connection answered (retries add to it)."""
        self.tls_info: tuple[str | None, str | None] = connection.tls_info if self._tls else (None, None)
        """The TLS version and cipher of the connection (its handshake is over before a request's first byte)."""
        # For the access log: when the head began, was decided, got an upstream slot and its response head.
        self.began = self._clock.seconds()
        self.decided_at: float | None = None
        self.queued_at: float | None = None
        self.slot_at: float | None = None
        self.sent_at: float | None = None
        self.response_at: float | None = None
        self.body_bytes = 0
        """Body bytes of the request read from the client."""
        self.consumer: str | None = None
        self.refusal: GatewayError | None = None
        """The error the connection refused this request's body with (it then closes the connection)."""
        self.cut_by: str | None = None
        """Why the gateway is about to cut the connection under this request ("drain_timeout")."""

    @property
    def relay(self) -> ResponseRelay | None:
        """The response body's relay while it streams (for the metrics: is it paused)."""
        return self._relay

    @property
    def pipe(self) -> RequestBodyPipe | None:
        """The request body's pipe while it flows (for the metrics: what it holds)."""
        return self._pipe

    @property
    def answered(self) -> bool:
        """Whether the whole response has been written."""
        return self.phase in ANSWERED

    # --- the response, written through the client end -----------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write response body bytes (the head first, once): what the relay writes to."""
        if not self.startedWriting:
            self.startedWriting = True
            self._connection.write_head(
                self.code, self._phrase, self.responseHeaders, head_request=self.method == b"HEAD"
            )
        if data:
            self.sentLength += len(data)
            self._connection.write_body(data)

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self._connection.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._connection.unregisterProducer()

    def _set_status(self, code: int, phrase: bytes) -> None:
        self.code, self._phrase = code, phrase

    def _close_after_response(self) -> None:
        self._connection.persistent = False
        self.responseHeaders.setRawHeaders(b"Connection", [b"close"])

    # --- the gateway's own answers, and the ways a request ends ------------------------------------------------

    def _fail_before_response(self, error: GatewayError) -> None:
        self._answer(error)  # first: what cancelling the upstream reports back now finds the request answered
        self._cancel_upstream(error)
        self._maybe_finish()

    def _answer(self, error: GatewayError) -> None:
        """Write the gateway's own answer: a problem+json response."""
        self.error = error
        status, content_type, body = error.render(self.request_id)
        if (self._has_body and self.body is not Body.READ) or isinstance(
            error, BadRequest | MethodNotAllowed | UpgradeRefused
        ):
            self._close_after_response()  # what follows on this connection cannot be trusted to be a request
        headers = self.responseHeaders
        for name, value in error.extra_headers():
            headers.addRawHeader(name, value)
        for name, value in self._admitted_headers:
            headers.addRawHeader(name, value)
        headers.setRawHeaders(b"Content-Type", [content_type])
        headers.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        route = self.route
        if route is not None and route.cors is not None and error.route_cors:
            route.cors.respond(self.requestHeaders, headers)
        self._write_answer(status, body)

    def _answer_bodiless(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Write an answer of the gateway's own that is no error and has no body (an allowed CORS preflight's 204)."""
        if self._has_body and self.body is not Body.READ:
            self._close_after_response()
        for name, value in headers:
            self.responseHeaders.addRawHeader(name, value)
        self._write_answer(status, b"")

    def _write_answer(self, status: int, body: bytes) -> None:
        if self.decided_at is None:
            self.decided_at = self._clock.seconds()
        self._set_status(status, reason_phrase(status))
        headers = self.responseHeaders
        headers.setRawHeaders(b"X-Request-ID", [self.request_id.encode("ascii")])
        if self.gateway.server_header:
            headers.setRawHeaders(b"Server", [self.gateway.server_header])
        if self.route is not None and self.route.strict_transport_security and self._tls:
            headers.setRawHeaders(b"Strict-Transport-Security", [self.route.strict_transport_security])
        self._enter(Phase.SENT, "answered")
        self.write(body)

    def _maybe_finish(self) -> None:
        """Finish once the response is written and the body read; until the body is in, drop it (lingering)."""
        if self.phase is not Phase.SENT:
            return
        if self.body is Body.READ:
            if self._pipe is not None:
                self._pipe.abandon()  # the answer is complete: what the upstream did not take, it never will
            if not self._disconnected:
                self._cancel_timer()
                self._enter(Phase.DONE)
                self._connection.finish()
                self._let_go()
        elif self._has_body and self.body is not Body.LINGERING:
            self.body = Body.LINGERING
            # The response is complete: say so now (its last chunk), as finish() will only run once the body is
            # in. Lingering close, as nginx does it: send FIN once the answer is out (a client that will not send
            # its body can see the answer is all there and hang up), keep reading and dropping the body, and
            # cut the connection only at the deadline.
            self._connection.end_body()
            self._connection.linger()
            self._arm_timer(self.gateway.server.lingering_timeout, "lingering")
            if self._pipe is not None:
                # Last: it may resume the client, and a connection may then hand over the body's end at once.
                self._pipe.abandon()  # the upstream has answered; it gets nothing more

    def _abort_client(self, ending: str) -> None:
        """Cut the client connection: the response cannot be completed, and must not look complete."""
        self._enter(Phase.ABORTED, ending)
        self._cancel_timer()
        if self._relay is not None:
            self._relay.stopProducing()
        self._cancel_upstream(ConnectionAborted(ending))
        self._connection.abort()
        self._let_go()

    def _let_go(self) -> None:
        """The request has ended and everything under way was stopped: its parts are let go (each holds callbacks
        of this exchange, a reference cycle that would leave the request's objects to the cyclic collector)."""
        self._response = self._pipe = self._relay = None

    def _cancel_upstream(self, reason: Exception) -> None:
        """Abandon the upstream request, wherever it is: an unfinished body must reach it as unfinished."""
        if self._pipe is not None:
            self._pipe.fail(reason)
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.cancel()  # the wait for a slot (a no-op once it has fired)
        sending, self._upstream_request = self._upstream_request, None
        if sending is not None:
            sending.cancel()  # the request gives up wherever it is; its receiver (this) is told nothing more
            self._release_slot()

    def _release_slot(self) -> None:
        if self._slot_held:
            self._slot_held = False
            assert self.pool is not None
            self.pool.release()

    def _enter(self, phase: Phase, ending: str = "") -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise RuntimeError(f"request {self.request_id}: no transition from {self.phase.name} to {phase.name}")
        self.phase = phase
        if ending:
            self.ending = ending
        if not TRANSITIONS[phase]:
            if self._release is not None:
                release, self._release = self._release, None
                release()
            request_ended(self)

    # --- timers and limits --------------------------------------------------------------------------------

    def _timed_out(self, which: str) -> None:
        if self.phase is Phase.WAITING:
            assert self.route is not None
            seconds = getattr(self.route.timeouts, which)
            self._fail_before_response(TIMEOUT_ERRORS[which](seconds))
        elif self.phase is Phase.STREAMING:
            _log.info(
                "Stream cut by the {which} timeout (request {request_id})",
                which=which,
                request_id=self.request_id,
            )
            self._abort_client(which)

    def _body_too_large(self, limit: int) -> None:
        if self.phase is Phase.WAITING:
            self._fail_before_response(BodyTooLarge(f"the request body went over this route's {limit}-byte limit"))
        elif self.phase is Phase.STREAMING:
            # An answer the upstream began mid-upload is being relayed: it cannot become a 413, and the upstream
            # must not get a body past the limit, nor its end. Both ends are cut (the answer never looks complete).
            _log.info(
                "Request body over the {limit}-byte limit while the answer streams; cutting the stream (request "
                "{request_id})",
                limit=limit,
                request_id=self.request_id,
            )
            self._abort_client("body_too_large")

    def _arm_timer(self, seconds: float, which: str) -> None:
        """Measure a wait on the connection's one timer (the connection's idle time meanwhile is not counted:
        a request is under way)."""
        self._timing = True
        self._connection.timer.restart(seconds, partial(self._timer_expired, which))

    def _timer_expired(self, which: str) -> None:
        self._timing = False
        if which == "lingering":
            self._lingering_expired()
        else:
            self._timed_out(which)

    def _lingering_expired(self) -> None:
        if self.phase is Phase.SENT:
            self._abort_client("lingering_timeout")

    def _cancel_timer(self) -> None:
        if self._timing:
            self._timing = False
            self._connection.timer.disarm()
