"""`Exchange`: the lifecycle of one proxied request, in named states per direction (`gateway.proxy.phases`: `Phase`
for the response side, with one transition table, `Body` for the request body). This module is its top floor: what
the client connection calls (the head, the body, the connection's end) and the admission step; beneath it are the
upstream request and the response relay (`gateway.proxy.forwarding`), and the state and the endings
(`gateway.proxy.endings`).

Rules this module keeps:
* Decisions are made on the head. `begin` runs once the head is complete and before a body byte is read or
  `100 Continue` is sent (which the exchange sends itself, only once the request is admitted): the route and the
  checks on the head's form (`gateway.routing`), then the gatekeeper's verdict (`gateway.auth`).
* A verdict that takes time holds back the body and `100 Continue`: at most the socket read that came with the
  head is held (`PendingVerdict`), and the client's socket is paused meanwhile.
* The body is never stored: `body_received` feeds the pipe to the upstream; `body_ended` marks its end.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionAborted
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.auth.authorisation import Allow, Verdict
from gateway.auth.identity import AuthRequest
from gateway.errors import AuthUnavailable, CorsRefused, Denied, GatewayError, NoRoute, UpgradeRefused
from gateway.headers import connection_tokens, request_id_of
from gateway.proxy.forwarding import Forwarding
from gateway.proxy.phases import FORWARDED, TRANSITIONS, Body, Phase
from gateway.routing.cors import Preflight
from gateway.routing.decision import Admit, Reject, RequestHead, decide, https_redirect

__all__ = ["Exchange", "PendingVerdict"]

_log = Logger(namespace="gateway.exchange")  # not the module's name: log lines keep the namespace they had


def _expects_continue(exchange: Exchange) -> bool:
    """Whether the client waits for `100 Continue` before it sends the body (HTTP/1.1 only)."""
    expect = exchange.requestHeaders.getRawHeaders(b"expect")
    return bool(expect) and expect[0].lower() == b"100-continue" and exchange.clientproto == b"HTTP/1.1"  # type: ignore[index]


class PendingVerdict:
    """An admission verdict that takes time (a JWKS fetch, a bcrypt check, forward auth), and what its exchange holds
    meanwhile. Made only then: a request whose verdict comes at once carries none of it."""

    __slots__ = ("continue_owed", "decision", "held", "length", "paused", "verdict")

    def __init__(self, decision: Admit, length: int | None, verdict: Deferred[Verdict], continue_owed: bool) -> None:
        self.decision = decision
        self.length = length
        self.verdict = verdict
        self.held: list[bytes] = []
        """Body bytes that came with the head while the verdict is pending (at most one socket read)."""
        self.paused = False
        """Whether the client's socket was paused to hold them."""
        self.continue_owed = continue_owed
        """The client asked for `100 Continue`, held back until the verdict."""


class Exchange(Forwarding):
    """One client request, proxied: made by the client connection (`gateway.http1.server`) once the request's head
    is read, told of its body as it comes, answering through the connection (`gateway.proxy.client_end`)."""

    __slots__ = ()

    # --- what the client connection calls ------------------------------------------------------------------

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
        if self.method == b"OPTIONS" and decision.route.cors is not None:
            preflight = decision.route.cors.preflight(self.requestHeaders)
            if preflight is not None:  # answered here, before admission: a browser sends it without credentials
                self._answer_preflight(preflight)
                return
        if self._upgrade and not decision.route.websocket.enabled:
            self._answer(UpgradeRefused("WebSocket is not enabled on this route"))
            self._maybe_finish()
            return
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
        self.body_bytes += len(data)
        pipe = self._pipe
        if pipe is not None and self.body in FORWARDED:
            limit = self.route.limits.max_request_body_bytes if self.route is not None else 0
            if pipe.received + len(data) > limit:
                self._body_too_large(limit)  # checked first: not one byte past the limit goes upstream
                return
            pipe.feed(data)
        elif self.phase is Phase.ADMITTING and self._pending is not None:
            # Came with the head, or was sent without waiting for 100 Continue: held, and nothing more is read
            # until the verdict.
            self._pending.held.append(data)
            self._pending.paused = True
            self._connection.pause_reading()

    def body_ended(self) -> None:
        """The request body is complete (or there was none)."""
        previous, self.body = self.body, Body.READ
        if previous is Body.LINGERING:
            self._cancel_timer()
        elif previous is Body.EXPECTED and self._pipe is not None:
            self._pipe.end()
        self._maybe_finish()

    def refused(self, error: GatewayError, request_id: str) -> None:
        """The connection refused this request (its body's framing) with `error`, in an answer it wrote itself
        with `request_id`: remembered for the access log."""
        self.refusal = error
        if not self.request_id:
            self.request_id = request_id

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

    def cut(self, ending: str) -> None:
        """The gateway cuts this request's connection now (the drain timeout passed): the request ends here, as
        `ending`, and what was under way is never finished as if complete."""
        if not TRANSITIONS[self.phase]:
            return
        if self._tunnel is not None:
            self._tunnel.cut(ending)
        elif Phase.ABORTED in TRANSITIONS[self.phase]:
            self._abort_client(ending)
        else:
            self.cut_by = ending
            self.connection_lost(Failure(ConnectionAborted(ending)))

    def connection_lost(self, reason: Failure) -> None:
        """The client connection is gone (or refused this request): whatever is under way stops."""
        self._disconnected = True
        if self._tunnel is not None:
            self._tunnel.client_lost(reason)  # however the request ended: the tunnel lets its timers go
            return
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
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.verdict.cancel()  # nobody waits for it any more: the check stops where it can
        if self._relay is not None:
            self._relay.stopProducing()
        self._cancel_upstream(ConnectionAborted("the client went away"))
        self._let_go()

    # --- admission ----------------------------------------------------------------------------------------

    def _answer_preflight(self, answer: Preflight | CorsRefused) -> None:
        """Answer a CORS preflight (`gateway.routing.cors`): it never reaches the upstream."""
        if isinstance(answer, CorsRefused):
            self._refuse(answer)
        else:
            self._answer_bodiless(204, answer)
            self._maybe_finish()

    def _await_verdict(self, decision: Admit, length: int | None, verdict: Deferred[Verdict]) -> None:
        """The verdict takes time: hold back `100 Continue` and the body until it comes."""
        self._enter(Phase.ADMITTING)
        self._pending = PendingVerdict(decision, length, verdict, self._has_body and _expects_continue(self))
        verdict.addCallbacks(self._got_verdict, self._verdict_failed)

    def _got_verdict(self, verdict: Verdict) -> None:
        pending, self._pending = self._pending, None
        if self.phase is not Phase.ADMITTING or pending is None:
            if isinstance(verdict, Allow) and verdict.release is not None:
                verdict.release()  # admitted after the client left
            return
        held = pending.held
        if not isinstance(verdict, Allow):
            self._refuse(verdict, resume=pending.paused)
            return
        self._start(pending.decision, pending.length, verdict)
        for data in held:
            self.body_received(data)
        if self.body is Body.READ and self._pipe is not None:
            self._pipe.end()  # the whole body came while admission decided
        if pending.paused and (self._pipe is None or not self._pipe.client_paused):
            self._connection.resume_reading()
        if pending.continue_owed and not held and self.body is not Body.READ and self._waiting_for_upstream():
            self._connection.send_continue()

    def _waiting_for_upstream(self) -> bool:
        return self.phase is Phase.WAITING  # a call: mypy keeps `phase` narrowed to ADMITTING otherwise

    def _verdict_failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) or self.phase is not Phase.ADMITTING:
            return
        _log.failure("Admission verdict failed (request {request_id})", failure, request_id=self.request_id)
        self._got_verdict(AuthUnavailable("the request could not be checked", reason="internal_error"))

    def _refuse(self, denied: Denied, *, resume: bool = False) -> None:
        """Answer a request admission refused; its body (if any) is never forwarded, only dropped while lingering
        (`resume`: the client's socket was paused while the verdict was pending)."""
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
        if resume:
            self._connection.resume_reading()  # lingering reads and drops what the client still sends
        self._maybe_finish()
