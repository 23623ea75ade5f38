"""`Exchange`: the lifecycle of one proxied request, in named states per direction (`gateway.proxy.phases`: `Phase` for
the response side, with one transition table, `Body` for the request body).

Rules this module keeps:
* Decisions are made on the head. `begin` runs once the head is complete and before a body byte is read or
  `100 Continue` is sent (which the exchange sends itself, only once the request is admitted).
* The body is never stored: `body_received` feeds the pipe to the upstream; `body_ended` marks its end.
* A response is never presented as complete unless it is: a truncated or stalled stream aborts the client
  connection; the connection's `finish` (which writes the chunked terminator) is only called for a complete
  response.
* `finish` is only called once the request body has been read to its end, so the connection reads the next
  request from where this one ended; while an answer waits for that, the rest of the body is read and dropped
  for at most the lingering timeout, because closing with unread data would reset the connection and could
  destroy the answer.
"""

from __future__ import annotations

from functools import partial
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IAddress, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    PotentialDataLoss,
    ResponseDone,
)
from twisted.web.iweb import UNKNOWN_LENGTH

from gateway.addresses import member_of
from gateway.auth.authorisation import Allow, Verdict
from gateway.auth.identity import AuthRequest
from gateway.config import Listener, Route
from gateway.errors import (
    AuthUnavailable,
    BadRequest,
    BodyTooLarge,
    Denied,
    GatewayError,
    MethodNotAllowed,
    NoRoute,
    UpstreamBroken,
    reason_phrase,
)
from gateway.headers import (
    client_response_headers,
    connection_tokens,
    request_id_of,
    upstream_request_headers,
)
from gateway.http1.fields import Fields
from gateway.http1.server import Message
from gateway.http1.timers import Watchdog
from gateway.http1.upstream import Cancellable, UpstreamResponse
from gateway.proxy.context import Gateway
from gateway.proxy.failures import TIMEOUT_ERRORS, length_too_large, upstream_error
from gateway.proxy.phases import ANSWERED, FORWARDED, TRANSITIONS, Body, Phase
from gateway.proxy.pool import UpstreamPool
from gateway.proxy.records import bounded_field, ms_between
from gateway.proxy.streaming import RequestBodyPipe, ResponseRelay
from gateway.routing.decision import Admit, Reject, RequestHead, decide, https_redirect
from gateway.tls.server import ClientCertificate

__all__ = ["Exchange"]

_log = Logger(namespace="gateway.exchange")  # not the module's name: log lines keep the namespace they had

_NO_BODY_STATUSES = frozenset({204, 304})


def _expects_continue(exchange: Exchange) -> bool:
    """Whether the client waits for `100 Continue` before it sends the body (HTTP/1.1 only)."""
    expect = exchange.requestHeaders.getRawHeaders(b"expect")
    return bool(expect) and expect[0].lower() == b"100-continue" and exchange.clientproto == b"HTTP/1.1"  # type: ignore[index]


class _Drop(Protocol):
    """Takes a response nobody wants any more and closes its connection (it cannot go back to the pool)."""

    def connectionMade(self) -> None:
        IPushProducer(self.transport).stopProducing()


class ClientEnd(TypingProtocol):
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

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Exchange:
    """One client request, proxied: made by the client connection (`gateway.http1.server`) once the request's head
    is read, told of its body as it comes, answering through the connection."""

    __slots__ = (
        "_admitted_headers",
        "_admitting",
        "_began",
        "_body_bytes",
        "_clock",
        "_connection",
        "_continue_owed",
        "_decided_at",
        "_disconnected",
        "_draining",
        "_has_body",
        "_held",
        "_length",
        "_lingered",
        "_paused_for_verdict",
        "_phrase",
        "_pipe",
        "_pool",
        "_queued_at",
        "_relay",
        "_release",
        "_response",
        "_response_at",
        "_sent_at",
        "_slot_at",
        "_slot_held",
        "_target",
        "_timing",
        "_tls",
        "_tls_info",
        "_upstream_address",
        "_upstream_headers",
        "_upstream_request",
        "_verdict",
        "_waiting",
        "body",
        "client",
        "clientproto",
        "code",
        "consumer",
        "cut_by",
        "ending",
        "error",
        "gateway",
        "method",
        "path",
        "phase",
        "refusal",
        "requestHeaders",
        "request_id",
        "responseHeaders",
        "route",
        "sentLength",
        "startedWriting",
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
        self._pool: UpstreamPool | None = None
        self._slot_held = False
        self._waiting: Deferred[Any] | None = None
        self._upstream_request: Cancellable | None = None
        """The upstream request under way until its response head (or its failure) came."""
        self._pipe: RequestBodyPipe | None = None
        self._relay: ResponseRelay | None = None
        self._response: UpstreamResponse | None = None
        self._target = b""
        self._verdict: Deferred[Verdict] | None = None
        """The pending admission verdict (phase ADMITTING)."""
        self._admitting: tuple[Admit, int | None] | None = None
        self._held: list[bytes] = []
        """Body bytes that came with the head while the verdict is pending (at most one socket read)."""
        self._paused_for_verdict = False
        self._continue_owed = False
        """The client asked for `100 Continue`, held back until the verdict."""
        self._lingered = 0
        """Body bytes read and dropped while lingering."""
        self._release: Any = None
        """Gives back the consumer's concurrency slot; called once, when the request ends however it ends."""
        self._admitted_headers: Any = ()
        """Headers admission gives every response to this request (its rate limit)."""
        self._upstream_address: str | None = None
        """The server the request went to (for the access log), once it had a connection."""
        self._tls_info: tuple[str | None, str | None] = connection.tls_info if self._tls else (None, None)
        """The TLS version and cipher of the connection (its handshake is over before a request's first byte)."""
        # For the access log: when the head began, was decided, got an upstream slot and its response head.
        self._began = self._clock.seconds()
        self._decided_at: float | None = None
        self._queued_at: float | None = None
        self._slot_at: float | None = None
        self._sent_at: float | None = None
        self._response_at: float | None = None
        self._body_bytes = 0
        self.consumer: str | None = None
        self.refusal: GatewayError | None = None
        """The error the connection refused this request's body with (it then closes the connection)."""
        self.cut_by: str | None = None
        """Why the gateway is about to cut the connection under this request ("drain_timeout")."""

    # --- what the client connection calls ------------------------------------------------------------------

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

    def begin(self) -> None:
        """The head is complete: decide, and start the upstream request before any body byte is read."""
        length = self._length
        connection = self._connection
        self._has_body = length != 0
        self.request_id = request_id_of(self.requestHeaders)
        if connection.persistent and (b"close" in connection_tokens(self.requestHeaders) or self._draining):
            # "close" among other options ("Connection: close, TE"); a draining gateway takes no next request.
            self._close_after_response()
        decision = decide(
            RequestHead(self.method, self.uri, self.clientproto, self.requestHeaders, length),
            self.gateway.router,
        )
        redirect_port = connection.listener.redirect_to_https if connection.listener is not None else 0
        if redirect_port and (isinstance(decision, Admit) or isinstance(decision.error, NoRoute)):
            decision = Reject(https_redirect(self.method, self.uri, self.requestHeaders, redirect_port))
        if isinstance(decision, Reject):
            self.route = decision.route
            self._answer(decision.error)
            self._maybe_finish()
            return
        self.route = decision.route
        gatekeeper = self.gateway.gatekeeper
        admission = decision.route.admission
        verdict: Verdict | Deferred[Verdict] | None = gatekeeper.public(admission)
        if verdict is None:
            verdict = gatekeeper.check(
                admission,
                AuthRequest(
                    self.method,
                    self.uri,
                    self.requestHeaders,
                    getattr(self.client, "host", ""),
                    self.request_id,
                    connection.client_certificate if self._tls else None,
                    self._tls,
                ),
            )
        if isinstance(verdict, Allow):
            self._start(decision, length, verdict)
            if self.phase is Phase.WAITING and self._has_body and _expects_continue(self):
                connection.send_continue()
        elif isinstance(verdict, Deferred):
            self._await_verdict(decision, length, verdict)
        else:
            self._refuse(verdict)

    def body_received(self, data: bytes) -> None:
        self._body_bytes += len(data)
        pipe = self._pipe
        if pipe is not None and self.body in FORWARDED:
            limit = self.route.limits.max_request_body_bytes if self.route is not None else 0
            if pipe.received + len(data) > limit:
                self._body_too_large(limit)  # checked first: not one byte past the limit goes upstream
                return
            pipe.feed(data)
        elif self.phase is Phase.ADMITTING:
            # Came with the head, or was sent without waiting for 100 Continue: held, and nothing more is read
            # until the verdict.
            self._held.append(data)
            self._paused_for_verdict = True
            self._connection.pause_reading()

    # --- the response, written through the connection ----------------------------------------------------

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

    def _waiting_for_upstream(self) -> bool:
        return self.phase is Phase.WAITING

    def _set_status(self, code: int, phrase: bytes) -> None:
        self.code, self._phrase = code, phrase

    def refused(self, error: GatewayError, request_id: str) -> None:
        """The connection refused this request (its body's framing) with `error`, in an answer it wrote itself
        with `request_id`: remembered for the access log."""
        self.refusal = error
        if not self.request_id:
            self.request_id = request_id

    def cut(self, ending: str) -> None:
        """The gateway cuts this request's connection now (the drain timeout passed): the request ends here, as
        `ending`, and what was under way is never finished as if complete."""
        if not TRANSITIONS[self.phase]:
            return
        if Phase.ABORTED in TRANSITIONS[self.phase]:
            self._abort_client(ending)
        else:
            self.cut_by = ending
            self.connection_lost(Failure(ConnectionAborted(ending)))

    def lingered(self, size: int) -> bool:
        """`size` bytes arrived on the connection (framing included) while the answer waits for the body's end:
        past server.lingering_max_bytes the connection is cut. Returns whether it was."""
        if self.body is not Body.LINGERING or self.phase is not Phase.SENT:
            return False
        self._lingered += size
        if self._lingered > self.gateway.server.lingering_max_bytes:
            self._abort_client("lingering_limit")
            return True
        return False

    def body_ended(self) -> None:
        """The request body is complete (or there was none)."""
        previous, self.body = self.body, Body.READ
        if previous is Body.LINGERING:
            self._cancel_timer()
        elif previous is Body.EXPECTED and self._pipe is not None:
            self._pipe.end()
        self._maybe_finish()

    def connection_lost(self, reason: Failure) -> None:
        """The client connection is gone (or refused this request): whatever is under way stops."""
        self._disconnected = True
        if not TRANSITIONS[self.phase]:
            return
        # A client that hangs up after the whole response was written (while we lingered) was answered.
        if self.cut_by is not None:
            ending = self.cut_by
        elif self.refusal is not None:
            ending = "refused"
        else:
            ending = "" if self.phase is Phase.SENT else "client_gone"
        self._enter(Phase.CLIENT_GONE, ending)
        self._cancel_timer()
        verdict, self._verdict = self._verdict, None
        if verdict is not None:
            verdict.cancel()  # nobody waits for it any more: the check stops where it can
        if self._relay is not None:
            self._relay.stopProducing()
        self._cancel_upstream(ConnectionAborted("the client went away"))
        self._let_go()

    # --- admission ----------------------------------------------------------------------------------------

    def _await_verdict(self, decision: Admit, length: int | None, verdict: Deferred[Verdict]) -> None:
        """The verdict takes time: hold back `100 Continue` and the body until it comes."""
        self._enter(Phase.ADMITTING)
        self._admitting = (decision, length)
        if self._has_body and _expects_continue(self):
            self._continue_owed = True
        self._verdict = verdict
        verdict.addCallbacks(self._got_verdict, self._verdict_failed)

    def _got_verdict(self, verdict: Verdict) -> None:
        self._verdict = None
        if self.phase is not Phase.ADMITTING:
            if isinstance(verdict, Allow) and verdict.release is not None:
                verdict.release()  # admitted after the client left
            return
        held, self._held = self._held, []
        if not isinstance(verdict, Allow):
            self._refuse(verdict)
            return
        assert self._admitting is not None
        decision, length = self._admitting
        self._admitting = None
        self._start(decision, length, verdict)
        for data in held:
            self.body_received(data)
        if self.body is Body.READ and self._pipe is not None:
            self._pipe.end()  # the whole body came while admission decided
        if self._paused_for_verdict:
            self._paused_for_verdict = False
            if self._pipe is None or not self._pipe.client_paused:
                self._connection.resume_reading()
        if self._continue_owed and not held and self.body is not Body.READ and self._waiting_for_upstream():
            self._connection.send_continue()

    def _verdict_failed(self, failure: Failure) -> None:
        self._verdict = None
        if failure.check(CancelledError) or self.phase is not Phase.ADMITTING:
            return
        _log.failure("Admission verdict failed (request {request_id})", failure, request_id=self.request_id)
        self._got_verdict(AuthUnavailable("the request could not be checked", reason="internal_error"))

    def _refuse(self, denied: Denied) -> None:
        """Answer a request admission refused; its body (if any) is never forwarded, only dropped while lingering."""
        self.consumer = denied.consumer
        metrics = self.gateway.metrics
        if metrics is not None:
            metrics.denied(self.route.name if self.route is not None else "", denied.reason)
        _log.info(
            "Admission refused a request with {status} ({reason}): route {route}, consumer {consumer}, "
            "client {client}, request {request_id}",
            status=denied.status,
            reason=denied.reason,
            route=self.route.name if self.route is not None else None,
            consumer=denied.consumer,
            client=getattr(self.client, "host", ""),
            request_id=self.request_id,
        )
        self._answer(denied)
        if self._paused_for_verdict:
            self._paused_for_verdict = False
            self._connection.resume_reading()  # lingering reads and drops what the client still sends
        self._maybe_finish()

    # --- admitted: the upstream exchange -----------------------------------------------------------------

    def _start(self, decision: Admit, length: int | None, allow: Allow) -> None:
        route = self.route = decision.route
        gateway = self.gateway
        self._target = decision.upstream_target
        self._pool = gateway.pools[route.upstream.name]
        self._release = allow.release
        self._admitted_headers = allow.response_headers
        self.consumer = allow.identity.consumer
        self._decided_at = self._clock.seconds()
        if self._has_body:
            self._pipe = RequestBodyPipe(
                length=length,
                client=self._connection.transport,
                clock=self._clock,
                flow=route.flow_control,
                client_idle_timeout=route.timeouts.client_body_idle,
                upstream_stall_timeout=route.timeouts.upstream_send_stall,
                on_timeout=self._timed_out,
                on_sent=self._body_sent,
                on_stopped=self._body_refused,
            )
        client_host = self.requestHeaders.getRawHeaders(b"host")
        via = gateway.server.via.encode("ascii")
        client_ip = getattr(self.client, "host", "unknown")
        trusted = gateway.server.trusted_proxies
        self._upstream_headers = upstream_request_headers(
            self.requestHeaders,
            client_ip=client_ip,
            keep_forwarded_for=bool(trusted) and member_of(trusted)(client_ip),
            host=client_host[0] if client_host and route.host_header == "client" else _host_value(route),
            client_host=client_host[0] if client_host else None,
            proto=b"https" if self._tls else b"http",
            via=via,
            request_id=self.request_id,
            received_version=self.clientproto.rpartition(b"/")[2],
            underscores=gateway.server.underscores_in_headers,
            remove=allow.remove,
            add=allow.upstream_headers,
        )
        self._enter(Phase.WAITING)
        self._queued_at = self._decided_at
        if self._pool.try_acquire():
            self._got_slot(None)
            return
        self._waiting = self._pool.acquire()
        self._waiting.addCallbacks(self._got_slot, self.response_failed)

    def _got_slot(self, _: object) -> None:
        self._waiting = None
        self._slot_held = True
        self._slot_at = self._clock.seconds()
        if self.phase is not Phase.WAITING:
            self._release_slot()
            return
        route = self.route
        assert route is not None and self._pool is not None
        if self._pipe is None:
            # Armed first: the pool may answer at once (a connect that fails straight away).
            self._arm_timer(route.timeouts.response_headers, "response_headers")
        try:
            self._upstream_request = self._pool.send(
                self.method,
                self._target,
                self._upstream_headers,
                self._pipe,
                self,
                connect_timeout=route.timeouts.connect,
                on_connected=self._connected,
            )
        except Exception:
            self.response_failed(Failure())

    def _connected(self, address: str) -> None:
        """The request is going out on an upstream connection (new or reused) to the server at `address`."""
        self._sent_at = self._clock.seconds()
        self._upstream_address = address

    def _body_sent(self) -> None:
        """The whole body is with the upstream: now it owes us a response head."""
        if self.phase is Phase.WAITING and self.route is not None:
            self._arm_timer(self.route.timeouts.response_headers, "response_headers")

    def _body_refused(self) -> None:
        """The upstream will take no more of the body (it closed, or answered early and closed)."""
        if self.body is Body.EXPECTED:
            self.body = Body.DROPPED  # the rest is read and dropped; the upstream end reports the failure, if any

    # --- the upstream's answer (gateway.proxy.pool.ResponseReceiver) --------------------------------------------

    def response_received(self, response: UpstreamResponse) -> None:
        """The upstream response head is read: relayed, its body streaming after it."""
        self._upstream_request = None
        self._response_at = self._clock.seconds()
        self._cancel_timer()
        if self.phase is not Phase.WAITING:
            self._release_slot()
            response.deliverBody(_Drop())
            return
        route = self.route
        assert route is not None
        broken = length_too_large(response)
        if broken:
            # A length a client's parser would read its own way (gateway.http1.framing): a broken upstream, whose
            # connection is closed unread (the response never began).
            _log.warn(
                "Upstream {upstream} sent {what}; closing its connection (request {request_id})",
                upstream=route.upstream.name,
                what=broken,
                request_id=self.request_id,
            )
            response.deliverBody(_Drop())
            self.response_failed(Failure(UpstreamBroken(f"the upstream sent {broken}")))
            return
        self._set_status(response.code, response.phrase)
        server = self.gateway.server
        client_response_headers(
            response.headers,
            self.responseHeaders,
            via=server.via.encode("ascii"),
            request_id=self.request_id,
            received_version=b"%d.%d" % response.version[1:],
            hidden=route.hide_response_headers,
            server=server.server_header.encode("ascii"),
        )
        if route.strict_transport_security and self._tls:
            self.responseHeaders.setRawHeaders(b"Strict-Transport-Security", [route.strict_transport_security])
        for name, value in self._admitted_headers:
            self.responseHeaders.addRawHeader(name, value)
        if self.method == b"HEAD" or response.code == 304:
            # No body follows, but Content-Length still describes the representation: it is relayed as sent.
            length = response.headers.getRawHeaders(b"content-length")
            if length:
                self.responseHeaders.setRawHeaders(b"Content-Length", length[-1:])
        elif response.length is not UNKNOWN_LENGTH and response.code not in _NO_BODY_STATUSES:
            # Keep the upstream's framing when it had one (its Content-Length header is dropped with the rest of the
            # framing: the connection writes its own).
            self.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % response.length])  # type: ignore[str-format]  # an int: not UNKNOWN_LENGTH
        if self._has_body and self.body is not Body.READ:
            self._close_after_response()  # an early answer: the rest of the body must not be read as a request
        self._enter(Phase.STREAMING)
        self.write(b"")  # the head goes out now, even if the body is slow to come (server-sent events)
        self._response = response
        self._relay = ResponseRelay(
            self,
            self._clock,
            upstream_idle_timeout=route.timeouts.upstream_idle,
            client_stall_timeout=route.timeouts.client_send_stall,
            on_end=self._response_ended,
            on_timeout=self._timed_out,
            read_size=response.set_read_size,
            timer=self._connection.timer,
        )
        relay = self._relay
        response.deliverBody(relay)
        if relay.paused and not relay.stopped and relay.transport is not None:
            # deliverBody resumes the upstream socket after handing over what was read before it, even when that
            # filled the client's buffer and the relay paused it: pause it again.
            relay.transport.pauseProducing()

    def _response_ended(self, reason: Failure) -> None:
        self._relay = None
        if not self._disconnected:
            self.unregisterProducer()
        self._release_slot()
        if self.phase is not Phase.STREAMING:
            return
        # isinstance rather than Failure.check, which builds class names (a per-request cost in bench S5).
        value = reason.value
        complete = isinstance(value, ResponseDone) or (
            # A body framed by the connection's close is complete if the upstream closed, not if it reset.
            isinstance(value, PotentialDataLoss) and not self._response_reset()
        )
        if complete:
            self._enter(Phase.SENT, "completed")
            self._maybe_finish()
        else:
            _log.info(
                "Upstream response cut short; cutting the client connection: {reason} (request {request_id})",
                reason=reason.getErrorMessage(),
                request_id=self.request_id,
            )
            self._abort_client("upstream_truncated")

    def _response_reset(self) -> bool:
        return self._response is not None and self._response.reset

    def response_failed(self, failure: Failure) -> None:
        """No response came (or no slot, or no connection): answered with the error it maps to."""
        self._waiting = None
        self._upstream_request = None
        self._release_slot()
        if self.phase is not Phase.WAITING:
            return
        assert self.route is not None
        self._fail_before_response(upstream_error(failure, self.route, self.request_id))

    # --- timers, limits and endings ----------------------------------------------------------------------

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

    def _fail_before_response(self, error: GatewayError) -> None:
        self._answer(error)  # first: what cancelling the upstream reports back now finds the request answered
        self._cancel_upstream(error)
        self._maybe_finish()

    def _answer(self, error: GatewayError) -> None:
        """Write the gateway's own answer: a problem+json response."""
        self.error = error
        if self._decided_at is None:
            self._decided_at = self._clock.seconds()
        status, content_type, body = error.render(self.request_id)
        if (self._has_body and self.body is not Body.READ) or isinstance(error, BadRequest | MethodNotAllowed):
            self._close_after_response()  # what follows on this connection cannot be trusted to be a request
        self._set_status(status, reason_phrase(status))
        headers = self.responseHeaders
        for name, value in error.extra_headers():
            headers.addRawHeader(name, value)
        for name, value in self._admitted_headers:
            headers.addRawHeader(name, value)
        headers.setRawHeaders(b"Content-Type", [content_type])
        headers.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        headers.setRawHeaders(b"X-Request-ID", [self.request_id.encode("ascii")])
        if self.gateway.server.server_header:
            headers.setRawHeaders(b"Server", [self.gateway.server.server_header.encode("ascii")])
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

    def _close_after_response(self) -> None:
        self._connection.persistent = False
        self.responseHeaders.setRawHeaders(b"Connection", [b"close"])

    def _release_slot(self) -> None:
        if self._slot_held:
            self._slot_held = False
            assert self._pool is not None
            self._pool.release()

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
            self._ended()

    def _ended(self) -> None:
        """The request has ended: its one access-log record goes to the log and the metrics (which, without an
        access log, are told the few figures they count and no record is built)."""
        gateway = self.gateway
        if gateway.access_log is not None:
            gateway.request_ended(self.access_record())
        elif gateway.metrics is not None:
            began = self._began
            route = self.route
            response_at, slot_at, queued_at = self._response_at, self._slot_at, self._queued_at
            gateway.metrics.observe_request(
                route.name if route is not None else "",
                route.upstream.name if route is not None and self._pool is not None else "",
                self._status(),
                self.ending or "client_gone",
                total=self._clock.seconds() - began,
                ttfb=None if response_at is None else response_at - began,
                queue=None if slot_at is None or queued_at is None else slot_at - queued_at,
                bytes_in=self._body_bytes,
                bytes_out=self.sentLength,
            )

    def _status(self) -> int | None:
        """The status the request ended with, as its record says it."""
        if self.startedWriting:
            return self.code
        if self.refusal is not None:
            return self.refusal.status
        if self.ending == "client_gone":
            return 499  # nginx's "client closed request"
        return None  # nothing was sent (cut by the gateway before a response began)

    def access_record(self) -> dict[str, Any]:
        """The request's access-log fields, in the order of the line. Durations are milliseconds from the start
        of the request head: the admission decision, the wait for an upstream slot, the upstream connection
        (from the slot to the request going out on a connection, new or reused), the response head (time to
        first byte) and the whole request; null where the request never got there."""
        began = self._began
        now = self._clock.seconds()
        route = self.route
        log = self.gateway.access_log
        path = self.uri if log is not None and log.include_query else self.path
        status = self._status()
        tls_version, tls_cipher = self._tls_info
        return {
            "request_id": self.request_id,
            "client": getattr(self.client, "host", ""),
            "method": self.method.decode("ascii", "backslashreplace"),
            "host": bounded_field(self.requestHeaders.getRawHeaders(b"host")),
            "path": path.decode("ascii", "backslashreplace") if path else None,
            "route": route.name if route is not None else None,
            "upstream": route.upstream.name if route is not None and self._pool is not None else None,
            "upstream_addr": self._upstream_address,
            "consumer": self.consumer,
            "status": status,
            "bytes_in": self._body_bytes,
            "bytes_out": self.sentLength,
            "decision_ms": ms_between(self._decided_at, began),
            "queue_ms": ms_between(self._slot_at, self._queued_at),
            "connect_ms": ms_between(self._sent_at, self._slot_at),
            "ttfb_ms": ms_between(self._response_at, began),
            "total_ms": round((now - began) * 1000.0, 3),
            "ending": self.ending or "client_gone",
            "tls_version": tls_version,
            "tls_cipher": tls_cipher,
            "user_agent": bounded_field(self.requestHeaders.getRawHeaders(b"user-agent")),
        }


def _host_value(route: Route) -> bytes:
    up = route.upstream
    host = f"[{up.host}]" if ":" in up.host else up.host
    return (host if up.port == 80 else f"{host}:{up.port}").encode("ascii")
