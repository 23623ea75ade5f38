"""The two flow-controlled pipes: request body -> upstream, and upstream response body -> client.

Rule: no pipe holds more than its high-water mark (plus the one socket read that was already under way when
the pause was asked for); every pause is matched by a resume or a stop; every wait is watched by a timer that
only runs while the *other* side is not the one holding things up. Neither pipe knows any policy: they report
"ended", "sent", "stopped" and "timed out" to their owner (`gateway.proxy.exchange`), which decides what it means.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Final
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IConsumer, IProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import classImplements

from gateway.config import FlowControl, KiB, MiB
from gateway.http1.timers import Watchdog

__all__ = ["ReadSizer", "RequestBodyPipe", "ResponseRelay"]


class ReadSizer:
    """How much to read from the upstream socket at a time, following how fast the client drains.

    While the client is slow, each paused response holds about one upstream read in the client's write buffer:
    256 KiB reads held 16.5 MiB for 50 clients at 200 KB/s (bench S4), 16 KiB reads 4.4 MiB. For a fast client
    large reads are what make a big body cheap (about +40% throughput over 64 KiB). So: start small, double (up
    to the maximum) after `GROW_AFTER` bytes taken without a pause and at each resume, and drop to the minimum
    when the client's pace over the last `WINDOW` seconds or more, judged at a resume, is below `SLOW_RATE`.
    Growing waits until the client has taken `KEPT_UP` bytes since it last proved slow (or since the start):
    until the kernel's socket buffers are full (a few MiB on loopback) a client of any speed takes all it is
    given, and growing then would leave the largest reads held by every slow client. The pace is judged over a
    window of many pauses, not one: a fast client's single pause can be long (a collection, a busy reactor)
    without the client being slow.
    """

    MIN: Final = 16 * KiB
    MAX: Final = 1 * MiB
    TLS_MAX: Final = 256 * KiB
    """The largest read for a client over TLS: 1 MiB reads cost a TLS download a third more CPU per byte than
    256 KiB ones (bench S1 over TLS), where a plain one gains a third."""
    GROW_AFTER: Final = 256 * KiB
    KEPT_UP: Final = 16 * MiB
    SLOW_RATE: Final = 4_000_000
    """Bytes per second below which a client counts as slow."""
    WINDOW: Final = 0.1
    """Seconds over which the client's pace is judged."""

    __slots__ = ("_apply", "_clock", "_kept_up", "_max", "_since_pause", "_window_bytes", "_window_start", "size")

    def __init__(self, apply: Callable[[int], object], clock: IReactorTime, *, maximum: int = MAX) -> None:
        self._apply = apply
        self._clock = clock
        self._max = maximum
        self._window_start = clock.seconds()
        self._window_bytes = 0
        self._since_pause = 0
        self._kept_up = 0
        self.size = self.MIN
        apply(self.MIN)

    def relayed(self, length: int) -> None:
        """`length` bytes went to the client."""
        self._kept_up += length
        self._window_bytes += length
        self._since_pause += length
        if self._since_pause >= self.GROW_AFTER:
            self._since_pause = 0
            self._grow()

    def paused(self) -> None:
        self._since_pause = 0

    def resumed(self) -> None:
        now = self._clock.seconds()
        elapsed = now - self._window_start
        if elapsed >= self.WINDOW:
            slow = self._window_bytes < self.SLOW_RATE * elapsed
            self._window_start = now
            self._window_bytes = 0
            if slow:
                self._kept_up = 0
                self._set(self.MIN)
                return
        self._grow()

    def _grow(self) -> None:
        if self.size < self._max and self._kept_up >= self.KEPT_UP:
            self._set(min(self.size * 2, self._max))

    def _set(self, size: int) -> None:
        if size != self.size:
            self.size = size
            self._apply(size)


class RequestBodyPipe:
    """The request body on its way upstream: an `IBodyProducer` for the upstream connection, fed by the client's
    chunks.

    Chunks are written straight to the upstream while it accepts them; while it does not (it paused us, or the
    connection is not open yet) they queue here, and above the high-water mark the client socket is paused.
    Twisted may resume the client socket behind our back (a response written while the body still arrives), so
    every chunk re-checks the mark and pauses again: the bound holds whoever resumed.
    """

    def __init__(
        self,
        *,
        length: int | None,
        client: IPushProducer,
        clock: IReactorTime,
        flow: FlowControl,
        client_idle_timeout: float,
        upstream_stall_timeout: float,
        on_timeout: Callable[[str], object],
        on_sent: Callable[[], object],
        on_stopped: Callable[[], object],
    ) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        self._client = client
        self._high = flow.high_water
        self._low = flow.low_water
        self._on_sent = on_sent
        self._on_stopped = on_stopped
        self._buffer: deque[bytes] = deque()
        self.buffered = 0
        """Bytes held here, not yet written upstream."""
        self.received = 0
        """Bytes fed by the client so far."""
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] | None = None
        self._eof = False
        self._stopped = False
        self._failure: Failure | None = None
        self._upstream_paused = False
        self.client_paused = False
        self._client_idle = Watchdog(clock, client_idle_timeout, lambda: on_timeout("client_body_idle"))
        self._upstream_stall = Watchdog(clock, upstream_stall_timeout, lambda: on_timeout("upstream_send_stall"))
        self._client_idle.arm()

    # --- the client side ---------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """A chunk of the client's body arrived."""
        if self._stopped or not data:  # an empty write would end a chunked upstream body early
            return
        self.received += len(data)
        self._client_idle.kick()
        if self._consumer is not None and not self._upstream_paused and not self._buffer:
            self._consumer.write(data)
        else:
            self._buffer.append(data)
            self.buffered += len(data)
            if self.buffered > self._high:
                self._pause_client()

    def end(self) -> None:
        """The client's body is complete."""
        self._eof = True
        self._client_idle.cancel()
        if self._consumer is not None and not self._buffer and not self._stopped:
            self._complete()

    def fail(self, reason: Exception) -> None:
        """Abandon the body (client gone, limit crossed, timeout): the upstream must see it incomplete."""
        if self._stopped:
            return
        self._failure = Failure(reason)
        self._shut()
        done, self._done = self._done, None
        if done is not None and not done.called:
            done.errback(self._failure)  # the upstream connection is then cut: no terminator is sent

    def abandon(self) -> None:
        """Stop forwarding without failing the upstream request (it has answered already); drop what comes."""
        if not self._stopped:
            self._shut()

    @property
    def stopped(self) -> bool:
        return self._stopped

    # --- the upstream side (IBodyProducer / IPushProducer, called by the upstream connection and its socket) -

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        if self._failure is not None:
            return fail(self._failure)
        self._consumer = consumer
        done = self._done = Deferred(lambda _: self._shut())
        self._flush()  # may complete (and fire `done`) at once, when the whole body is already here
        return done

    def pauseProducing(self) -> None:
        self._upstream_paused = True
        if not self._stopped:
            self._upstream_stall.arm()

    def resumeProducing(self) -> None:
        self._upstream_paused = False
        self._upstream_stall.disarm()
        self._flush()

    def stopProducing(self) -> None:
        """The upstream will take no more (its connection is gone, or it answered and closed)."""
        if self._stopped:
            return
        self._shut()
        self._done = None  # IBodyProducer: after stopProducing the Deferred must never fire
        self._on_stopped()

    # --- internals -----------------------------------------------------------------------------------------

    def _flush(self) -> None:
        consumer = self._consumer
        while self._buffer and not self._upstream_paused and not self._stopped and consumer is not None:
            data = self._buffer.popleft()
            self.buffered -= len(data)
            consumer.write(data)
        if self.client_paused and self.buffered <= self._low and not self._stopped:
            self._resume_client()
        if self._eof and not self._buffer and not self._stopped and consumer is not None:
            self._complete()

    def _complete(self) -> None:
        self._consumer = None  # all written: the connection's exchange is let go (it holds this pipe)
        done, self._done = self._done, None
        self._upstream_stall.cancel()
        if done is not None and not done.called:
            done.callback(None)
            self._on_sent()

    def _pause_client(self) -> None:
        # Always ask: the transport may have been resumed (an answer written while the body still arrives).
        self.client_paused = True
        self._client_idle.disarm()
        self._client.pauseProducing()

    def _resume_client(self) -> None:
        self.client_paused = False
        if not self._eof:
            self._client_idle.arm()
        self._client.resumeProducing()

    def _shut(self) -> None:
        self._stopped = True
        self._consumer = None
        self._buffer.clear()
        self.buffered = 0
        self._client_idle.cancel()
        self._upstream_stall.cancel()
        if self.client_paused:
            self.client_paused = False
            self._client.resumeProducing()


classImplements(RequestBodyPipe, IBodyProducer, IPushProducer)


class ResponseConsumer(TypingProtocol):
    """What the relay writes to: the client request (a `twisted.web.http.Request`)."""

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def write(self, data: bytes) -> None: ...


class ResponseRelay:
    """The upstream response body on its way to the client: the response's body protocol and the client's
    producer.

    A full client socket pauses the upstream socket (through the response's transport proxy); a drained one
    resumes it. Holds nothing itself: each chunk read from the upstream is written to the client at once. Given
    `read_size` (sets the upstream socket's read size), it reads in pieces that follow the client's pace
    (`ReadSizer`).
    """

    def __init__(
        self,
        consumer: ResponseConsumer,
        clock: IReactorTime,
        *,
        upstream_idle_timeout: float,
        client_stall_timeout: float,
        on_end: Callable[[Failure], object],
        on_timeout: Callable[[str], object],
        read_size: Callable[[int], object] | None = None,
        largest_read: int = ReadSizer.MAX,
        timer: Watchdog | None = None,
    ) -> None:
        self._consumer = consumer
        self._on_end = on_end
        self._sizer = None if read_size is None else ReadSizer(read_size, clock, maximum=largest_read)
        # One watchdog for both waits, which never overlap: the upstream's silence while the client reads, the
        # client's stall while it does not. Given `timer` (the client connection's), the relay borrows it.
        self._idle_timeout = upstream_idle_timeout
        self._stall_timeout = client_stall_timeout
        self._idle_expired = partial(on_timeout, "upstream_idle")
        self._stall_expired = partial(on_timeout, "client_send_stall")
        self._owns_timer = timer is None
        self._timer = timer if timer is not None else Watchdog(clock, upstream_idle_timeout, self._idle_expired)
        self.paused = False
        self.stopped = False
        self.received = 0
        """Bytes of response body relayed so far."""
        self.transport: IPushProducer | None = None
        """The upstream response's producer (pauses, resumes and stops reading its socket), once delivered."""

    # IResponse.deliverBody gives its body protocol a producer for transport, which IProtocol's ITransport does
    # not describe.
    def makeConnection(self, transport: IPushProducer) -> None:  # type: ignore[override]
        """The response hands over its body (`deliverBody`): `transport` reads it."""
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        self._consumer.registerProducer(self, True)
        if not self.paused:
            self._timer.restart(self._idle_timeout, self._idle_expired)

    def dataReceived(self, data: bytes) -> None:
        if self.stopped:  # the rest of a read that was under way when the relay was cut
            return
        self.received += len(data)
        if not self.paused:
            self._timer.kick()
        if self._sizer is not None:
            self._sizer.relayed(len(data))
        self._consumer.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        self._on_end(reason)

    def _stop_timer(self) -> None:
        if self._owns_timer:
            self._timer.cancel()
        else:
            self._timer.disarm()  # the connection's: its pending call serves its next wait

    def pauseProducing(self) -> None:
        # Called on every write while the client's buffer is full. The timers change once; the upstream socket
        # is paused every time, since whoever resumed it behind our back (deliverBody does) must not
        # leave it reading into a full client buffer.
        if self.stopped:
            return
        if not self.paused:
            self.paused = True
            self._timer.restart(self._stall_timeout, self._stall_expired)
            if self._sizer is not None:
                self._sizer.paused()
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self.paused or self.stopped:
            return
        self.paused = False
        self._timer.restart(self._idle_timeout, self._idle_expired)
        if self._sizer is not None:
            self._sizer.resumed()
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The client is gone, or the relay was cut: close the upstream connection now."""
        if self.stopped:
            return
        self.stopped = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.stopProducing()


classImplements(ResponseRelay, IProtocol, IPushProducer)
