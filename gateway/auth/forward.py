"""Forward auth (nginx `auth_request`, Traefik `forwardAuth`): an auth service is asked over HTTP about each
request, and its answer decides.

Rules:
* Fail closed. Only a 2xx answer admits; a 401 or 403 is passed to the client as the auth service wrote it
  (`AuthServiceDenied`); any other status (a 3xx is never followed), an answer that cannot be read, an invalid
  identity, an unreachable service (503) or one that does not answer within `timeout` (504) refuses the request.
* The auth service learns the request's head, never its body: the scheme, method, target, client address, Host
  and request id in X-Forwarded-* headers, and only the client headers the method names (`request_headers`).
* One bound for the whole exchange, on the reactor's clock: connecting, the head and the body all fit in
  `timeout`, and bodies are read to at most `max_body` bytes (no answer is held without limit).
* Nothing is left behind. An answer's body is read to its end (up to `max_body`), so its connection goes back
  to the pool; a check that times out or is cancelled (the client left) stops its timer and drops its connection
  at once: aborted before the answer's head, closed after it (Agent's proxy of the socket has no abort).
* Raw `Agent` over a pool of its own, not treq: treq's cookie jar would replay one user's cookies on another
  user's check, and it follows redirects.
* Nothing the client or the auth service sent (header values, credentials) goes into an error's detail or a log.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from gateway.auth.identity import AuthFailure, AuthRequest, Identity
from gateway.auth.settings.model import GATEWAY_OWNED, ForwardMethod
from gateway.errors import AuthServiceDenied, AuthTimeout, AuthUnavailable, Denied
from gateway.http1.fields import HeaderLookup

__all__ = ["ForwardAuthenticator", "Selected"]

_log = Logger()

IDLE_TIMEOUT = 4
"""Seconds an idle connection to the auth service stays pooled: below the keep-alive timeout of most servers
(Node 5 s, nginx 75 s), so a check rarely races the auth service closing the connection it was given."""

Selected = list[tuple[bytes, list[bytes]]]
"""A request's credential for this method: the (lower-cased name, values) of each chosen header it carries."""

_CONSUMER = re.compile(rb"[\x21-\x7e]{1,256}")
_SCOPE = re.compile(rb"[\x21\x23-\x5b\x5d-\x7e]+")
"""A scope token (RFC 6749 section 3.3): visible ASCII but space, quote and backslash."""
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
"""A header value that can be written again as it is (RFC 9110 section 5.5): no CR, LF, NUL or other control."""

_DENIALS = (401, 403)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """Endpoints for Agent: an IP literal is connected to directly, without a resolver thread; a name is resolved.

    The reactor's own connect timeout is only a backstop, later than the check's timer (its default, 30 s,
    would turn a slow connect under a longer `timeout` into "unreachable" rather than a timeout).
    """

    def __init__(self, reactor: Any, backstop: float) -> None:
        self._reactor = reactor
        self._backstop = backstop

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        if isIPAddress(host):
            return TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._backstop)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._backstop)
        return HostnameEndpoint(self._reactor, host, uri.port, timeout=self._backstop)


class _Body(Protocol):
    """Reads an answer's body, keeping it (`keep`) or not, up to `limit` bytes; past that it stops reading and
    closes the connection (Agent's proxy of it has no abort, twisted#8227). Calls `ended` once, when the body
    has ended, however it ended."""

    def __init__(self, limit: int, keep: bool, ended: Callable[[_Body, Failure], None]) -> None:
        self._limit = limit
        self._keep = keep
        self._ended = ended
        self._chunks: list[bytes] = []
        self._size = 0
        self.too_long = False

    @property
    def data(self) -> bytes:
        return b"".join(self._chunks)

    def dataReceived(self, data: bytes) -> None:
        if self.too_long:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.too_long = True
            self._chunks.clear()
            self.stop()
        elif self._keep:
            self._chunks.append(data)

    def stop(self) -> None:
        """Stop reading and close the connection (never reused: the rest of the body is still on it)."""
        if self.transport is not None:
            # Agent hands a body protocol a producer as its transport (IResponse.deliverBody).
            cast(IPushProducer, self.transport).stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._ended(self, reason)


class _Check:
    """One question to the auth service, from the request sent to the verdict.

    States:
    * "waiting": connecting, or the request is sent and no head has come; cancelling Agent's Deferred stops the
      connection attempt or aborts the connection.
    * "reading": the head has come and its body is being read; stopping the body's transport closes the
      connection.
    * "done": the verdict is given (or nobody wants it any more); the timer is stopped, and late events from
      the connection are ignored.
    """

    def __init__(self, auth: ForwardAuthenticator, headers: HeaderLookup, request: AuthRequest) -> None:
        self._auth = auth
        self._request_id = request.request_id
        self._state = "waiting"
        self._body: _Body | None = None
        self.verdict: Deferred[Identity] = Deferred(self._cancelled)
        self._timer: IDelayedCall = auth.clock.callLater(auth.method.timeout, self._expired)
        self._sent: Deferred[IResponse] = auth.agent.request(b"GET", auth.url, headers)
        self._sent.addCallbacks(self._answered, self._not_answered)

    # --- events -----------------------------------------------------------------------------------------------

    def _answered(self, response: IResponse) -> None:
        if self._state != "waiting":
            # Unreachable (cancelling a sent request drops its response); never leave a connection paused.
            response.deliverBody(_Body(0, False, lambda body, reason: None))
            return
        self._state = "reading"
        keep = response.code in _DENIALS
        self._body = _Body(self._auth.method.max_body, keep, lambda body, reason: self._read(response, body, reason))
        response.deliverBody(self._body)

    def _not_answered(self, reason: Failure) -> None:
        if self._state == "done":
            return  # our own cancellation
        if reason.check(ConnectError, ResponseNeverReceived, RequestNotSent, RequestTransmissionFailed):
            self._fail(AuthUnavailable("the auth service could not be reached", reason="auth_service_unreachable"))
        elif reason.check(ResponseFailed):
            self._fail(AuthUnavailable("the auth service's answer could not be read", reason="auth_service_bad_answer"))
        else:
            _log.failure(
                "Forward auth {method}: asking {url} failed unexpectedly (request {request_id})",
                reason,
                method=self._auth.name,
                url=self._auth.method.url,
                request_id=self._request_id,
            )
            self._fail(AuthUnavailable("the credentials could not be checked", reason="internal_error"), log=False)

    def _read(self, response: IResponse, body: _Body, reason: Failure) -> None:
        if self._state != "reading":
            return  # timed out or cancelled: the verdict is given already
        code = response.code
        complete = body.too_long or reason.check(ResponseDone, PotentialDataLoss) is not None
        if 200 <= code < 300:
            # A 2xx body says nothing the gateway uses: one longer than max_body is dropped (with its
            # connection) and the request admitted all the same. A truncated one is a broken answer.
            if not complete:
                self._fail(_bad_answer("the auth service's answer was cut short"))
                return
            try:
                identity = self._auth.identity_from(response.headers)
            except Denied as denied:
                self._fail(denied)
                return
            self._end(identity)
        elif code in _DENIALS:
            if body.too_long:
                self._fail(_bad_answer("the auth service's refusal was too long to pass on"))
            elif not complete:
                self._fail(_bad_answer("the auth service's refusal was cut short"))
            else:
                self._deny(code, response.headers, body.data)
        else:
            self._fail(AuthUnavailable(f"the auth service answered {code}", reason="auth_service_error"), status=code)

    def _deny(self, code: int, headers: Headers, body: bytes) -> None:
        content_types = headers.getRawHeaders(b"content-type") or []
        challenges = headers.getRawHeaders(b"www-authenticate") or []
        if len(content_types) > 1 or not all(_FIELD_VALUE.fullmatch(v) for v in [*content_types, *challenges]):
            self._fail(_bad_answer("the auth service's refusal has invalid headers"))
            return
        content_type = content_types[0] if content_types else None
        self._end(AuthServiceDenied(code, content_type, body, [(b"WWW-Authenticate", v) for v in challenges]))

    def _expired(self) -> None:
        self._stop()
        timeout = self._auth.method.timeout
        self._fail(AuthTimeout(f"the auth service did not answer within {timeout:g} s", reason="auth_service_timeout"))

    def _cancelled(self, verdict: Deferred[Identity]) -> None:
        """The client left: stop at once. The Deferred then fails with CancelledError by itself."""
        self._stop()
        self._timer.cancel()
        self._auth.settled()

    # --- endings ----------------------------------------------------------------------------------------------

    def _stop(self) -> None:
        """Drop the exchange: abort the connection attempt or the request, or close the connection mid-body."""
        state, self._state = self._state, "done"
        if state == "waiting":
            self._sent.cancel()  # Agent aborts the connection; `_not_answered` sees "done" and ignores it
        elif state == "reading" and self._body is not None:
            self._body.stop()

    def _fail(self, error: Denied, *, log: bool = True, status: int | None = None) -> None:
        """End with `error`, logged as a failure of the auth service (by its reason, never with values it sent)."""
        if log:
            _log.warn(
                "Forward auth {method}: the auth service at {url} failed ({reason}) for request {request_id}",
                method=self._auth.name,
                url=self._auth.method.url,
                reason=error.reason,
                status=status,
                request_id=self._request_id,
            )
        self._end(error)

    def _end(self, outcome: Identity | Denied) -> None:
        """Give the verdict: the only place that fires it, once."""
        self._state = "done"
        if self._timer.active():
            self._timer.cancel()
        self._auth.settled()  # first: whoever the verdict wakes finds the check's place free
        if isinstance(outcome, Identity):
            self.verdict.callback(outcome)
        else:
            self.verdict.errback(outcome)


def _bad_answer(detail: str) -> AuthUnavailable:
    return AuthUnavailable(detail, reason="auth_service_bad_answer")


def _bad_identity(detail: str) -> AuthUnavailable:
    return AuthUnavailable(detail, reason="auth_service_bad_identity")


class ForwardAuthenticator:
    """Admits a request carrying one of `method.request_headers` when the auth service at `method.url` answers
    2xx to a GET with those headers and the request's head in X-Forwarded-* headers; the identity is what the
    answer's `consumer_header`, `scopes_header` and `copy_headers` say.

    `reactor` provides IReactorTCP and IReactorTime; it is also the clock that bounds each check.
    """

    guessable = False  # what it sends the auth service is not known to be a password

    def claimant(self, credential: object) -> None:
        """None: failures are counted under the method."""
        return None

    def verifies_cheaply(self, credential: object) -> bool:
        """False: every check is a call to the auth service (its answers are not remembered)."""
        return False

    def __init__(self, method: ForwardMethod, *, reactor: Any, realm: str) -> None:
        self.name = method.name
        self.method = method
        self.clock: IReactorTime = reactor
        """Times each check (`method.timeout`)."""
        try:
            self.url = method.url.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"forward auth {method.name}: the url must be ASCII (punycode a host name)") from None
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = method.max_connections
        self._pool.cachedConnectionTimeout = IDLE_TIMEOUT
        self.agent = Agent.usingEndpointFactory(reactor, _Endpoints(reactor, method.timeout + 1), pool=self._pool)
        self._selected = tuple(n.lower() for n in method.request_headers if n.lower() not in GATEWAY_OWNED)
        self._copied = tuple(n.lower() for n in method.copy_headers)
        self._closed = False
        self.in_flight = 0
        """Checks under way (each has a connection to the auth service)."""

    def credential(self, headers: HeaderLookup) -> Selected | None:
        """The chosen headers the request carries, or None without any (the method does not apply)."""
        selected = []
        for name in self._selected:
            values = headers.getRawHeaders(name)
            if values:
                selected.append((name, list(values)))
        return selected or None

    def verify(self, credential: object, request: AuthRequest) -> Deferred[Identity]:
        """Ask the auth service; the Deferred may be cancelled (the connection to it is then aborted). At most
        `max_connections` checks are under way at once: one more is answered 503 at once (fail closed), as a
        saturated upstream is; a queue would only make every check later."""
        if self.in_flight >= self.method.max_connections:
            raise AuthUnavailable("the auth service is saturated; try again shortly", reason="auth_service_saturated")
        self.in_flight += 1
        selected = cast(Selected, credential)  # what `credential` returned: the gatekeeper hands it back as it was
        return _Check(self, self._question(selected, request), request).verdict

    def challenge(self, failure: AuthFailure | None) -> bytes | None:
        """None: the auth service's own WWW-Authenticate reaches the client through `AuthServiceDenied`."""
        return None

    def upstream_headers(self) -> frozenset[bytes]:
        """The copied headers (the gateway sets the consumer and scopes headers itself)."""
        return frozenset(self._copied)

    def close(self) -> Deferred[None]:
        """Close the idle connections; a check still running ends by itself (within `timeout`), and its
        connection is closed then rather than pooled."""
        self._closed = True
        closed: Deferred[None] = self._pool.closeCachedConnections()  # unannotated in Twisted
        return closed

    # --- for `_Check` -----------------------------------------------------------------------------------------

    def settled(self) -> None:
        """A check has ended: after `close`, its connection (pooled again by now) is closed too."""
        self.in_flight -= 1
        if self._closed:
            self._pool.closeCachedConnections()

    def identity_from(self, headers: HeaderLookup) -> Identity:
        """The identity a 2xx answer's headers give; `AuthUnavailable` when they are invalid (a broken auth
        service must not smuggle bad values into upstream headers)."""
        method = self.method
        consumer = None
        if method.consumer_header is not None:
            values = headers.getRawHeaders(method.consumer_header)
            if values:
                if len(values) != 1 or not _CONSUMER.fullmatch(values[0]):
                    raise _bad_identity("the auth service named the consumer invalidly")
                consumer = values[0].decode("ascii")
        scopes: frozenset[str] = frozenset()
        if method.scopes_header is not None:
            tokens = [t for v in headers.getRawHeaders(method.scopes_header) or [] for t in v.split()]
            if not all(_SCOPE.fullmatch(t) for t in tokens):
                raise _bad_identity("the auth service gave invalid scopes")
            scopes = frozenset(t.decode("ascii") for t in tokens)
        copied = []
        for name in self._copied:
            for value in headers.getRawHeaders(name) or []:
                if not _FIELD_VALUE.fullmatch(value):
                    raise _bad_identity("the auth service gave an invalid header value")
                copied.append((name, value))
        return Identity(
            consumer=consumer,
            scopes=scopes,
            method=self.name,
            headers=tuple(copied),
            credential_headers=method.credential_headers,
        )

    def _question(self, selected: Sequence[tuple[bytes, Sequence[bytes]]], request: AuthRequest) -> Headers:
        """The headers of the GET to the auth service (Agent adds its Host)."""
        headers = Headers()
        for name, values in selected:
            headers.setRawHeaders(name, list(values))
        headers.setRawHeaders(b"x-forwarded-proto", [b"https" if request.secure else b"http"])
        headers.setRawHeaders(b"x-forwarded-method", [request.method])
        headers.setRawHeaders(b"x-forwarded-uri", [request.target])
        headers.setRawHeaders(b"x-forwarded-for", [request.client_address.encode("ascii", "replace")])
        host = request.headers.getRawHeaders(b"host")
        if host:
            headers.setRawHeaders(b"x-forwarded-host", [host[0]])
        headers.setRawHeaders(b"x-request-id", [request.request_id.encode("ascii", "replace")])
        return headers
