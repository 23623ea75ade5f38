"""A forward-auth service on 127.0.0.1:0 for the tests of `gateway.auth.forward`: the path it is asked on picks
its answer, and every question it receives is recorded.

Paths:
* `/allow`: 200 naming consumer `alice` (X-Auth-User), scopes `read write` (X-Auth-Scopes), two X-Auth-Tenant
  values (`acme`, `beta`) and an X-Auth-Secret header nobody copies;
* `/bad/<kind>`: 200 with an invalid identity: `space` (a consumer with a space), `long` (257 characters), `two`
  (two consumer headers), `scope` (a scope with a quote), `nul` (a NUL in a copied header);
* `/deny/401`: 401 with a JSON body and two WWW-Authenticate challenges; `/deny/403`: 403 with a text body;
* `/status/CODE`: CODE with a small body (a 3xx names `/allow` in its Location);
* `/big/CODE`: CODE with a body of `BIG` bytes;
* `/stall`: never answers; `/stall-body`: a 200 head declaring 1000 bytes, then 10 of them, then nothing;
* `/close`: closes the connection on the request head, unanswered;
* `/hold`: answers as `/allow` does, but only when the test calls `release()`.
`AuthService.asked` lists every request as an `Asked`; `AuthService.question(n)` fires with the n-th once its
head has arrived. An `Asked`'s `lost` fires if its connection closed before it was answered, its `closed` when
its connection closed, answered or not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, reactor
from twisted.web import resource, server
from twisted.web.server import NOT_DONE_YET

BIG = 64 * 1024
"""The length of a `/big/CODE` body: more than the tests' `max_body`."""

DENIAL_BODY = json.dumps({"error": "invalid_token", "detail": "the token has expired"}).encode()
CHALLENGES = [b'Bearer realm="auth", error="invalid_token"', b'Basic realm="auth"']


@dataclass
class Asked:
    """One question as the auth service received it."""

    method: bytes
    uri: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    port: int
    """The client port of the connection it came on: the same for two questions on one kept-alive connection."""
    closed: defer.Deferred[None]
    lost: defer.Deferred[None] = field(default_factory=defer.Deferred)

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def names(self) -> set[bytes]:
        return {k.lower() for k, _ in self.headers}


def _identify(request: server.Request) -> None:
    """The identity headers of `/allow`."""
    h = request.responseHeaders
    h.setRawHeaders(b"X-Auth-User", [b"alice"])
    h.setRawHeaders(b"X-Auth-Scopes", [b"read write"])
    h.setRawHeaders(b"X-Auth-Tenant", [b"acme", b"beta"])
    h.setRawHeaders(b"X-Auth-Secret", [b"not for upstream"])


class _Site(server.Site):
    """Tells the service when each connection closes."""

    def __init__(self, service: AuthService) -> None:
        super().__init__(_Answers(service))
        self._service = service

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        closed = self._service.closed(addr.port)
        lost = channel.connectionLost

        def connection_lost(reason: Any) -> None:
            lost(reason)
            closed.callback(None)

        channel.connectionLost = connection_lost
        return channel


class _Answers(resource.Resource):
    isLeaf = True

    def __init__(self, service: AuthService) -> None:
        super().__init__()
        self._service = service

    def render(self, request: server.Request) -> Any:
        asked = Asked(
            request.method,
            request.uri,
            [(k, v) for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs],
            request.content.read(),
            request.getClientAddress().port,
            self._service.closed(request.getClientAddress().port),
        )
        request.notifyFinish().addErrback(lambda _: asked.lost.callback(None))
        parts = request.path.strip(b"/").split(b"/")
        kind, arg = parts[0], parts[1] if len(parts) > 1 else b""
        answer = getattr(self, "_" + kind.decode().replace("-", "_"))(request, arg)
        self._service.note(asked, request)  # last: a test waiting for the question goes on from here
        return answer

    def _allow(self, request: server.Request, arg: bytes) -> bytes:
        _identify(request)
        return b"ok"

    def _hold(self, request: server.Request, arg: bytes) -> Any:
        self._service.held.append(request)
        return NOT_DONE_YET

    def _bad(self, request: server.Request, kind: bytes) -> bytes:
        h = request.responseHeaders
        h.setRawHeaders(b"X-Auth-User", [b"alice"])
        if kind == b"space":
            h.setRawHeaders(b"X-Auth-User", [b"alice smith"])
        elif kind == b"long":
            h.setRawHeaders(b"X-Auth-User", [b"a" * 257])
        elif kind == b"two":
            h.setRawHeaders(b"X-Auth-User", [b"alice", b"bob"])
        elif kind == b"scope":
            h.setRawHeaders(b"X-Auth-Scopes", [b'read "write"'])
        elif kind == b"nul":
            h.setRawHeaders(b"X-Auth-Tenant", [b"acme\x00evil"])
        return b"ok"

    def _deny(self, request: server.Request, code: bytes) -> bytes:
        request.setResponseCode(int(code))
        if code == b"401":
            request.setHeader(b"Content-Type", b"application/json")
            request.responseHeaders.setRawHeaders(b"WWW-Authenticate", CHALLENGES)
            return DENIAL_BODY
        request.setHeader(b"Content-Type", b"text/plain")
        return b"not this one"

    def _status(self, request: server.Request, code: bytes) -> bytes:
        request.setResponseCode(int(code))
        if code.startswith(b"3"):
            request.setHeader(b"Location", b"/allow")
        return b"status %s" % code

    def _big(self, request: server.Request, code: bytes) -> bytes:
        request.setResponseCode(int(code))
        request.setHeader(b"Content-Type", b"text/plain")
        return b"x" * BIG

    def _stall(self, request: server.Request, arg: bytes) -> Any:
        return NOT_DONE_YET

    def _stall_body(self, request: server.Request, arg: bytes) -> Any:
        request.setHeader(b"Content-Length", b"1000")
        request.write(b"0123456789")
        return NOT_DONE_YET

    def _close(self, request: server.Request, arg: bytes) -> Any:
        request.channel.transport.abortConnection()
        return NOT_DONE_YET


class AuthService:
    """The auth service: `start()`, ask it at `url(path)`, `await stop()`."""

    def __init__(self) -> None:
        self.asked: list[Asked] = []
        self._open: list[server.Request] = []
        self._waiting: dict[int, list[defer.Deferred[Asked]]] = {}
        self.held: list[server.Request] = []
        self._closed: dict[int, defer.Deferred[None]] = {}
        self._port: Any = None

    def start(self) -> AuthService:
        self._port = reactor.listenTCP(0, _Site(self), interface="127.0.0.1")
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._port.getHost().port}{path}"

    def question(self, n: int) -> defer.Deferred[Asked]:
        """The n-th question (from 1), once its head has arrived."""
        if len(self.asked) >= n:
            return defer.succeed(self.asked[n - 1])
        d: defer.Deferred[Asked] = defer.Deferred()
        self._waiting.setdefault(n, []).append(d)
        return d

    def closed(self, port: int) -> defer.Deferred[None]:
        """Fires when the connection from client port `port` has closed."""
        return self._closed.setdefault(port, defer.Deferred())

    def release(self) -> None:
        """Answer every `/hold` question as `/allow` would."""
        held, self.held = self.held, []
        for request in held:
            _identify(request)
            request.write(b"ok")
            request.finish()

    def note(self, asked: Asked, request: server.Request) -> None:
        self.asked.append(asked)
        self._open.append(request)
        for d in self._waiting.pop(len(self.asked), []):
            d.callback(asked)

    async def stop(self) -> None:
        """Stop listening, and drop the connection of any question left unanswered (a failed test's)."""
        for request in self._open:
            if not request.finished and not request._disconnected:
                request.channel.transport.abortConnection()
        await self._port.stopListening()
