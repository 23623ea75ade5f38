"""Forward auth: an auth service decides about each request (nginx's auth_request, Traefik's forwardAuth).

Rules:
* The auth service gets a `GET` with the request's method, target, client address and host in `X-Forwarded-*`
  headers and the chosen credential headers; never the body, never other headers.
* It fails closed: a 2xx admits (as the consumer it names, with the headers it chose copied upstream); a 401 or
  403 is passed to the client with its body; anything else, a broken connection or a slow answer is 503 or 504,
  never a pass. Redirects are not followed.
* Raw `Agent` over a pool of its own: treq would follow redirects and keep a cookie jar, replaying one user's
  auth cookies on another's sub-request. The whole exchange, body included, is bounded by the method's timeout,
  and a cancelled check (the client left) aborts its connection at once.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, PotentialDataLoss, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from gateway.auth.identity import AuthFailure, AuthRequest, Identity
from gateway.auth.settings import ForwardMethod
from gateway.errors import AuthServiceDenied, AuthTimeout, AuthUnavailable, Denied

__all__ = ["ForwardAuthenticator"]

_log = Logger()

_VISIBLE = re.compile(rb"[\x21-\x7e]{1,256}")
_HEADER_VALUE = re.compile(rb"[^\x00\r\n]*")
_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


class _TooLong(Exception):
    pass


class _Collect(Protocol):
    """Reads a response body up to `limit` bytes; over it the connection is closed and `done` fails."""

    def __init__(self, limit: int, done: Deferred[bytes]) -> None:
        self._limit = limit
        self._done = done
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._done is None:
            return
        self._size += len(data)
        if self._size > self._limit:
            done, self._done = self._done, None  # type: ignore[assignment]
            self.transport.stopProducing()
            if done is not None:
                done.errback(_TooLong())
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure) -> None:
        done, self._done = self._done, None  # type: ignore[assignment]
        if done is None:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            done.callback(b"".join(self._parts))
        else:
            done.errback(reason)


class ForwardAuthenticator:
    """Asks the method's auth service whether to admit each request that carries one of its headers."""

    def __init__(self, method: ForwardMethod, *, reactor: Any, realm: str) -> None:
        self.name = method.name
        self._method = method
        self._reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = method.max_connections
        self._pool.cachedConnectionTimeout = 4
        self._agent = Agent(reactor, connectTimeout=method.timeout, pool=self._pool)
        self._url = method.url.encode("ascii")

    def credential(self, headers: Headers) -> list[tuple[bytes, list[bytes]]] | None:
        found = []
        for name in self._method.request_headers:
            values = headers.getRawHeaders(name)
            if values:
                found.append((name, list(values)))
        return found or None

    def verify(self, credential: object, request: AuthRequest) -> Deferred[Identity]:
        asked = Headers()
        for name, values in credential:  # type: ignore[attr-defined]
            asked.setRawHeaders(name, values)
        asked.setRawHeaders(b"X-Forwarded-Method", [request.method])
        asked.setRawHeaders(b"X-Forwarded-Uri", [request.target])
        asked.setRawHeaders(b"X-Forwarded-For", [request.client_address.encode("ascii")])
        host = request.headers.getRawHeaders(b"host")
        if host:
            asked.setRawHeaders(b"X-Forwarded-Host", host[-1:])
        asked.setRawHeaders(b"X-Request-ID", [request.request_id.encode("ascii")])
        timed_out = False

        def on_timeout(result: object, timeout: float) -> object:
            nonlocal timed_out
            timed_out = True
            return result

        sent = self._agent.request(b"GET", self._url, asked)
        answer: Deferred[Identity] = sent.addCallback(self._answered)
        answer.addTimeout(self._method.timeout, self._reactor, onTimeoutCancel=on_timeout)
        return answer.addErrback(self._failed, request, lambda: timed_out)

    def challenge(self, failure: AuthFailure | None) -> bytes | None:
        return None  # the auth service's own WWW-Authenticate comes with its 401

    def upstream_headers(self) -> frozenset[bytes]:
        return frozenset(self._method.copy_headers)

    def close(self) -> Deferred[None]:
        return self._pool.closeCachedConnections()

    # --- the answer -----------------------------------------------------------------------------------------

    def _body(self, response: IResponse) -> Deferred[bytes]:
        done: Deferred[bytes] = Deferred(lambda _: collector.transport.stopProducing())
        collector = _Collect(self._method.max_body, done)
        response.deliverBody(collector)
        return done

    def _answered(self, response: IResponse) -> Deferred[Identity]:
        code = response.code
        if 200 <= code < 300:
            return self._body(response).addCallback(lambda _: self._identity(response.headers))
        if code in (401, 403):
            content_type = response.headers.getRawHeaders(b"content-type")
            challenges = response.headers.getRawHeaders(b"www-authenticate") or []
            headers = [(b"WWW-Authenticate", v) for v in challenges if _HEADER_VALUE.fullmatch(v)]

            def denied(body: bytes) -> Identity:
                raise AuthServiceDenied(code, content_type[-1] if content_type else None, body, headers)

            return self._body(response).addCallback(denied)
        self._body(response).addErrback(lambda _: None)  # read and dropped, so the connection can be reused
        raise AuthUnavailable(f"the auth service answered {code}", reason="auth_service_error")

    def _identity(self, headers: Headers) -> Identity:
        method = self._method
        consumer = None
        if method.consumer_header is not None:
            values = headers.getRawHeaders(method.consumer_header)
            if values:
                if not _VISIBLE.fullmatch(values[-1]):
                    raise AuthUnavailable(
                        "the auth service named no usable consumer", reason="auth_service_bad_identity"
                    )
                consumer = values[-1].decode("ascii")
        scopes: frozenset[str] = frozenset()
        if method.scopes_header is not None:
            values = headers.getRawHeaders(method.scopes_header) or []
            words = b" ".join(values).decode("latin-1").split()
            scopes = frozenset(w for w in words if _SCOPE.fullmatch(w))
        copied = []
        for name in method.copy_headers:
            for value in headers.getRawHeaders(name) or ():
                if _HEADER_VALUE.fullmatch(value):
                    copied.append((name, value))
        return Identity(
            consumer=consumer,
            scopes=scopes,
            method=self.name,
            headers=tuple(copied),
            credential_headers=method.credential_headers,
        )

    def _failed(self, reason: Failure, request: AuthRequest, timed_out: Any) -> Failure | None:
        if reason.check(Denied, AuthFailure):
            return reason
        if reason.check(CancelledError) and not timed_out():
            return reason  # the client left: nobody is waiting
        url = self._method.url
        if timed_out() or reason.check(ConnectTimeoutError):
            _log.warn("Auth service {url} timed out (request {request_id})", url=url, request_id=request.request_id)
            raise AuthTimeout(
                f"the auth service did not answer within {self._method.timeout:g} s", reason="auth_service_timeout"
            )
        if reason.check(_TooLong):
            _log.warn(
                "Auth service {url} sent an answer over {limit} bytes (request {request_id})",
                url=url,
                limit=self._method.max_body,
                request_id=request.request_id,
            )
            raise AuthUnavailable("the auth service's answer was too large", reason="auth_service_bad_answer")
        what = "unreachable" if reason.check(ConnectError, DNSLookupError) else "broken"
        _log.warn(
            "Auth service {url} {what}: {reason} (request {request_id})",
            url=url,
            what=what,
            reason=reason.getErrorMessage(),
            request_id=request.request_id,
        )
        raise AuthUnavailable("the auth service could not be reached", reason="auth_service_unreachable")
