"""The demo's HTTP/1.1 server: requests read by llhttp (`httptools`), answers written in order, one at a time.

Why its own and not twisted.web: twisted.web spools a request's body to a temporary file before any resource
sees the request, and until the body is in, the request's method and target are held only in private attributes
of its channel. An upload sink that hashes a body as it arrives (and paces reading it) needs the head first.

Rules:
* An endpoint is chosen on the head and given the body piece by piece as it is read; nothing keeps a body.
* An answer begins once its request is read whole (as twisted.web's do), and only after the answer before it
  is complete. While a request read whole waits for its turn, nothing more is read from the connection.
* The body of an answer without a length is chunked to an HTTP/1.1 client, delimited by the close to an
  HTTP/1.0 one. Keep-alive is HTTP/1.1's (HTTP/1.0 connections close after one answer, as twisted.web's do).
* Malformed input is answered `400` and the connection closed (cut, when an answer is under way).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol as TypingProtocol
from urllib.parse import parse_qs

import httptools
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime, ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, datetimeToString

__all__ = ["Connection", "Endpoint", "Reading", "Request", "Response", "Route"]

_log = Logger()

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_VERSIONS = {"1.0": b"HTTP/1.0", "1.1": b"HTTP/1.1"}
_TURN = "an earlier answer"
"""Why reading is paused while a request read whole waits for its turn."""


@dataclass(frozen=True)
class Request:
    """A request's head, as read."""

    method: bytes
    target: bytes
    version: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    """Names lower-cased, in the order received."""
    keep_alive: bool
    """Whether another request may follow on the connection (HTTP/1.1 without `Connection: close`)."""

    @property
    def path(self) -> bytes:
        return self.target.partition(b"?")[0]

    @cached_property
    def args(self) -> dict[bytes, list[bytes]]:
        """The query's parameters, as twisted.web's `request.args` had them."""
        query = self.target.partition(b"?")[2].partition(b"#")[0]
        return parse_qs(query, keep_blank_values=True)

    def arg(self, name: bytes) -> bytes | None:
        """The first value of query parameter `name`, if it is there."""
        values = self.args.get(name)
        return values[0] if values else None

    def header(self, name: bytes) -> bytes | None:
        """The first value of header field `name` (lower-case)."""
        return next((value for key, value in self.headers if key == name), None)


class Reading(TypingProtocol):
    """The read side of a connection, which an endpoint may pause (each pause undone by a resume with its reason)."""

    def pause_reading(self, reason: object) -> None: ...

    def resume_reading(self, reason: object) -> None: ...


class Endpoint(TypingProtocol):
    """What serves one request: chosen on its head, given its body as it comes, then asked to answer."""

    def body_received(self, data: bytes) -> None: ...

    def respond(self, response: Response) -> None:
        """The request is read whole and its turn has come: answer it (now or later) through `response`."""

    def stop(self) -> None:
        """The request will not be answered, or its answer not completed (the connection is gone or broken)."""


Route = Callable[[Request, Reading], Endpoint]
"""Picks the endpoint for a request's head."""


class Response:
    """The answer to one request: `start` once, `write` any number of times, `finish` once."""

    def __init__(self, connection: Connection, request: Request, clock: IReactorTime) -> None:
        self.request = request
        self.persistent = request.keep_alive
        """Whether the connection stays open after this answer."""
        self._connection = connection
        self._clock = clock
        self._head_only = request.method == b"HEAD"
        self._chunked = False
        self._producing = False
        self._status = 0
        self._sent = 0

    def start(self, status: int, headers: Sequence[tuple[bytes, bytes]] = (), length: int | None = None) -> None:
        """Send the head; without a `length`, the body is chunked (HTTP/1.1) or ends with the connection."""
        version = self.request.version
        self._status = status
        lines = [b"%s %d %s" % (version, status, RESPONSES.get(status, b"Unknown"))]
        lines += [b"Server: gateway-demo", b"Date: " + datetimeToString(self._clock.seconds())]
        lines += [name + b": " + value for name, value in headers]
        if length is not None:
            lines.append(b"Content-Length: %d" % length)
        elif self._head_only:
            pass  # no body follows, so it needs no framing
        elif version == b"HTTP/1.1":
            self._chunked = True
            lines.append(b"Transfer-Encoding: chunked")
        else:
            self.persistent = False  # the close ends the body
        if not self.persistent and version == b"HTTP/1.1":
            lines.append(b"Connection: close")
        self._connection.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")

    def write(self, data: bytes) -> None:
        """Send body bytes (none in answer to HEAD)."""
        if self._head_only or not data:
            return
        self._sent += len(data)
        transport = self._connection.transport
        if self._chunked:
            transport.writeSequence([b"%x\r\n" % len(data), data, b"\r\n"])
        else:
            transport.write(data)

    def register_producer(self, producer: IPushProducer) -> None:
        """Let the client's socket pause and resume `producer` (until `finish`)."""
        self._producing = True
        self._connection.transport.registerProducer(producer, True)

    def finish(self) -> None:
        """End the body; the connection goes on to the next request, or closes."""
        transport = self._connection.transport
        if self._chunked:
            transport.write(b"0\r\n\r\n")
        if self._producing:
            self._producing = False
            transport.unregisterProducer()
        request = self.request
        _log.info(
            '"{method} {target} {version}" {status} {length}',
            method=request.method.decode("ascii", "replace"),
            target=request.target.decode("ascii", "replace"),
            version=request.version.decode("ascii"),
            status=self._status,
            length=self._sent,
        )
        self._connection.answered(self)

    def answer(
        self, status: int, content_type: bytes, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """A whole answer in one go."""
        self.start(status, [(b"Content-Type", content_type), *headers], len(body))
        self.write(body)
        self.finish()


class _Stop(Exception):
    """Raised in a parser callback to stop parsing what the connection received."""


class _ITransport(ITransport, IPushProducer, IConsumer):
    """What a connection uses of its transport (a TCP one provides all of it, but no Twisted interface names it
    whole). For annotations only: nothing declares it."""

    def abortConnection() -> None:
        """Close the connection at once (as `ITCPTransport.abortConnection`)."""


class Connection(Protocol):
    """One client connection: requests parsed as they come, each answered in turn."""

    transport: _ITransport
    """Set by `makeConnection`."""

    def __init__(self, route: Route, clock: IReactorTime) -> None:
        self._route = route
        self._clock = clock
        self._parser = httptools.HttpRequestParser(self)
        self._target: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._reading: tuple[Request, Endpoint] | None = None
        """The request whose head is read and whose body is being read."""
        self._waiting: deque[tuple[Request, Endpoint]] = deque()
        """Requests read whole, waiting for their turn to be answered."""
        self._answering: Endpoint | None = None
        self._accepting = True
        """Whether another request may be read (not after a request that ends the connection, nor malformed input)."""
        self._continue_owed = False
        """The request being read asked for `100 Continue` while an earlier answer was under way."""
        self._holds: set[object] = set()
        self._advancing = False
        self._closing = False

    # --- reading --------------------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if not self._accepting:
            return  # after the last request: read and dropped
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._accepting = False  # an Upgrade or CONNECT request is answered as any other, and is the last
            self._advance()
        except httptools.HttpParserCallbackError as error:
            if not isinstance(error.__context__, _Stop):
                _log.failure("The demo failed a request", Failure(error.__context__))
                self._abort()
        except httptools.HttpParserError:
            if self._accepting:
                self._malformed()

    def pause_reading(self, reason: object) -> None:
        """Read nothing more until every reason given here is resumed."""
        if not self._holds:
            self.transport.pauseProducing()
        self._holds.add(reason)

    def resume_reading(self, reason: object) -> None:
        if reason in self._holds:
            self._holds.discard(reason)
            if not self._holds and not self._closing:
                self.transport.resumeProducing()

    def _malformed(self) -> None:
        self._accepting = False
        if self._reading is not None:
            self._reading[1].stop()
            self._reading = None
        if self._answering is None and not self._waiting:
            self.transport.write(_BAD_REQUEST)
            self._advance()  # nothing is left to answer: closes
        else:
            self._abort()

    def _abort(self) -> None:
        self._accepting = False
        self._closing = True
        self.transport.abortConnection()

    # llhttp's callbacks (httptools calls them by these names).

    def on_message_begin(self) -> None:
        if not self._accepting:
            raise _Stop()
        self._target.clear()
        self._headers.clear()

    def on_url(self, url: bytes) -> None:
        self._target.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._reading is None:  # not a trailer field (those are dropped)
            self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        version = _VERSIONS.get(self._parser.get_http_version())
        if version is None:
            self._malformed()
            raise _Stop()
        keep_alive = version == b"HTTP/1.1" and self._parser.should_keep_alive()
        request = Request(self._parser.get_method(), b"".join(self._target), version, tuple(self._headers), keep_alive)
        self._reading = (request, self._route(request, self))
        expect = request.header(b"expect")
        if version == b"HTTP/1.1" and expect is not None and expect.lower() == b"100-continue":
            if self._answering is None and not self._waiting:
                self.transport.write(_CONTINUE)
            else:
                self._continue_owed = True

    def on_body(self, body: bytes) -> None:
        assert self._reading is not None
        self._continue_owed = False
        self._reading[1].body_received(body)

    def on_message_complete(self) -> None:
        assert self._reading is not None
        request, endpoint = self._reading
        self._reading = None
        self._continue_owed = False
        if not request.keep_alive:
            self._accepting = False
        self._waiting.append((request, endpoint))
        self._advance()

    # --- answering, in turn ---------------------------------------------------------------------------------

    def _advance(self) -> None:
        """Begin the next answer once the one before it is complete; close once nothing is left to answer."""
        if self._advancing:
            return  # an answer completed within `respond`: the loop below goes on
        self._advancing = True
        try:
            while self._answering is None and self._waiting and not self._closing:
                request, endpoint = self._waiting.popleft()
                self._answering = endpoint
                endpoint.respond(Response(self, request, self._clock))
        finally:
            self._advancing = False
        if self._closing:
            return
        if self._waiting:
            self.pause_reading(_TURN)
        elif self._answering is None and not self._accepting:
            self._closing = True
            self.transport.loseConnection()
        else:
            self.resume_reading(_TURN)
            if self._answering is None and self._continue_owed:
                self._continue_owed = False
                self.transport.write(_CONTINUE)

    def answered(self, response: Response) -> None:
        """`response` is complete: on to the next request, or close."""
        self._answering = None
        if not response.persistent:
            self._accepting = False
            self._waiting.clear()
        self._advance()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._accepting = False
        self._closing = True
        endpoints = [endpoint for _, endpoint in self._waiting]
        if self._reading is not None:
            endpoints.append(self._reading[1])
        if self._answering is not None:
            endpoints.append(self._answering)
        self._reading = self._answering = None
        self._waiting.clear()
        for endpoint in endpoints:
            endpoint.stop()
