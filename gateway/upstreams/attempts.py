"""`Attempt`: one request through an upstream's pool, from the server chosen for it to its response head, with
the tries it may be given.

Rules:
* A request without a body whose method is idempotent, sent on a reused connection that turns out to have been
  closed before any byte of a response came, is sent once more on a new connection (the upstream closed an idle
  connection just as it was reused; it never saw the request).
* With several servers, a try that fails is retried on another server, within the route's `retries` and the
  upstream's retry budget, after a jittered backoff, and only before the response head was handed on (no byte of
  a response has reached the client): a connect failure always (nothing was sent); a reset or a status of
  `ejection.statuses` only for an idempotent method (or a route that says its other methods are safe) whose
  body, if it has one, was all sent and kept (`gateway.upstreams.replay`: at most `retries.max_body_bytes`).
* With several servers, each try's outcome counts towards its server's ejection (`gateway.upstreams.ejection`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import RequestNotSent, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer

from gateway.config import Retries
from gateway.http1.fields import Fields
from gateway.http1.response import Cancellable, ResponseReceiver, UpstreamResponse
from gateway.http1.upstream import UpstreamConnection
from gateway.upstreams.budget import backoff
from gateway.upstreams.replay import Kept, Replay
from gateway.upstreams.servers import ConnectTimeout, ServerPool

if TYPE_CHECKING:
    from gateway.proxy.pool import UpstreamPool

__all__ = ["Attempt"]

_RETRYABLE: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"})
"""Methods sent again on a new connection when a reused one was found closed (RFC 9110 section 9.2.2)."""

_IDEMPOTENT: Final = _RETRYABLE | {b"PUT"}
"""Methods retried on another server after the request was sent (RFC 9110 section 9.2.2)."""

_NOT_SENT: Final = (ConnectError, ConnectTimeout, DNSLookupError, RequestNotSent)
"""Failures before the server saw a byte of the request: retried on another server whatever the method."""


class _Drop(Protocol):
    """Takes a response that is retried instead, and closes its connection (its body is not read)."""

    def connectionMade(self) -> None:
        IPushProducer(self.transport).stopProducing()


class Attempt:
    """One request through the pool, from its server and connection (idle, or opened for it) to its response
    head: the receiver each connection answers, which passes the answer on, or tries once more."""

    __slots__ = (
        "body",
        "connect_timeout",
        "headers",
        "kept",
        "key",
        "method",
        "on_connected",
        "policy",
        "pool",
        "receiver",
        "retry",
        "sending",
        "server",
        "target",
        "tried",
        "waiting",
    )

    def __init__(
        self,
        pool: UpstreamPool,
        method: bytes,
        target: bytes,
        headers: Fields | Headers,
        body: IBodyProducer | None,
        receiver: ResponseReceiver,
        connect_timeout: float,
        on_connected: Callable[[str, int], None] | None,
        policy: Retries | None,
        key: bytes | None,
    ) -> None:
        self.pool = pool
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.kept: Kept | None = None
        """The body as it went to the first server, kept when it may be sent again (see `go`)."""
        self.receiver: ResponseReceiver | None = receiver
        """None once it was told, or once the owner gave up."""
        self.connect_timeout = connect_timeout
        self.on_connected = on_connected
        self.policy = policy
        self.key = key
        self.retry = False
        self.sending: Cancellable | None = None
        """What is under way: the connect, then the request on its connection."""
        self.server: ServerPool | None = None
        self.tried: list[ServerPool] = []
        """The servers tried, in order."""
        self.waiting: IDelayedCall | None = None
        """The backoff before the next try."""

    def start(self, server: ServerPool) -> None:
        self.server = server
        self.tried.append(server)
        server.requests += 1
        connection = server.take_idle()
        if connection is not None:
            # A reused connection the upstream closed just as it was taken: a request without a body whose method
            # is idempotent is sent once more, on a new connection.
            self.retry = self.body is None and self.method in _RETRYABLE
            self.go(connection)
        else:
            self.connect()

    def connect(self) -> None:
        server = self.server
        assert server is not None
        server.connecting += 1
        connecting = server.connect(self.connect_timeout)
        self.sending = connecting
        connecting.addCallbacks(self._connected, self._connect_failed, callbackArgs=(server,), errbackArgs=(server,))

    def _connected(self, connection: UpstreamConnection, server: ServerPool) -> None:
        server.connecting -= 1
        self.go(connection)

    def go(self, connection: UpstreamConnection) -> None:
        self.sending = None
        if self.receiver is None:
            return  # given up while connecting (the connect could not be stopped in time)
        if self.on_connected is not None:
            self.on_connected(connection.address, len(self.tried))
        assert self.server is not None
        self.server.serving(connection)
        body = self.body
        policy = self.policy
        if (
            body is not None
            and self.kept is None
            and self.pool.single is None
            and policy is not None
            and policy.attempts
            and (policy.unsafe_methods or self.method in _IDEMPOTENT)
            and (body.length is UNKNOWN_LENGTH or body.length <= policy.max_body_bytes)
        ):
            # A body that may be sent again to another server: kept as it goes (up to the route's limit).
            body = self.kept = Kept(body, policy.max_body_bytes)
        self.sending = connection.send(self.method, self.target, self.headers, body, self)

    def cancel(self) -> None:
        self.receiver = None
        waiting, self.waiting = self.waiting, None
        if waiting is not None and waiting.active():
            waiting.cancel()
        sending, self.sending = self.sending, None
        if sending is not None:
            sending.cancel()

    def _connect_failed(self, reason: Failure, server: ServerPool) -> None:
        server.connecting -= 1
        self.sending = None
        if reason.check(CancelledError) and self.receiver is None:
            return
        self.response_failed(reason)

    # --- the connection's answer (ResponseReceiver) -------------------------------------------------------------

    def response_received(self, response: UpstreamResponse) -> None:
        self.sending = None
        pool = self.pool
        if pool.ejector is not None and self.server is not None:
            if response.code in pool.ejector.settings.statuses:
                pool.failed(self.server)
                if self.receiver is not None and self._may_retry(sent=True):
                    response.deliverBody(_Drop())
                    return
            else:
                pool.ejector.succeeded(pool.index[self.server])
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            receiver.response_received(response)

    def response_failed(self, reason: Failure) -> None:
        self.sending = None
        if self.receiver is None:
            return
        if self.retry and reason.check(ResponseNeverReceived):
            self.retry = False
            self.connect()
            return
        pool = self.pool
        if pool.ejector is not None and self.server is not None and not reason.check(CancelledError):
            pool.failed(self.server)
            broke = reason.check(ResponseNeverReceived) is not None  # no byte of a response came
            if (reason.check(*_NOT_SENT) or broke) and self._may_retry(sent=not reason.check(*_NOT_SENT)):
                return
        receiver, self.receiver = self.receiver, None
        receiver.response_failed(reason)

    # --- retries ------------------------------------------------------------------------------------------------

    def _may_retry(self, *, sent: bool) -> bool:
        """Whether the request is tried again (on another server, after a backoff): the route allows one more
        try, the request can be sent again, another server can take it and the budget has room."""
        policy = self.policy
        pool = self.pool
        if policy is None or len(self.tried) > policy.attempts:
            return False
        if sent and not (policy.unsafe_methods or self.method in _IDEMPOTENT):
            return False
        if sent and self.body is not None and (self.kept is None or self.kept.whole is None):
            return False  # its body was not all sent, or is too large to have been kept
        if pool.choose(self.key, avoid=self.tried) is None or not pool.budget_allows():
            return False
        pool.retries += 1
        delay = backoff(len(self.tried), policy, pool.rng)
        self.waiting = pool.clock.callLater(delay, self._again)
        return True

    def _again(self) -> None:
        self.waiting = None
        if self.receiver is None:
            return
        server = self.pool.choose(self.key, avoid=self.tried)
        if server is None:
            server = self.pool.choose(self.key)
        if server is None:
            receiver, self.receiver = self.receiver, None
            receiver.response_failed(Failure(self.pool.unavailable()))
            return
        self.retry = False
        if self.kept is not None and self.kept.whole is not None:
            self.body = Replay(self.kept.whole)
        self.start(server)
