"""`gateway.proxy.streaming` in memory: both pipes and the Watchdog timer they run on (`gateway.http1.timers`), driven
directly on a `Clock`.

The request pipe's client is a `StringTransport` standing for the client socket (an `IPushProducer` whose
`producerState` shows whether the pipe paused it); its upstream is another `StringTransport` standing for the
upstream socket, and the test calls the pipe's `pauseProducing`/`resumeProducing` the way that socket would. The
response relay's upstream is a `StringTransport` too, and its consumer records what the client would be sent.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import UNKNOWN_LENGTH

from gateway.config import FlowControl
from gateway.http1.timers import Watchdog
from gateway.proxy.streaming import ReadSizer, RequestBodyPipe, ResponseRelay

_sync = SynchronousTestCase()
EPS = 0.25
"""A step of time that binary floating point represents exactly, so `advance(t - EPS); advance(EPS)` lands on t."""


class CountingClock(Clock):
    """A Clock that counts how many calls were ever scheduled on it."""

    scheduled = 0

    def callLater(self, delay: float, callable: Any, *args: Any, **kw: Any) -> Any:
        self.scheduled += 1
        return super().callLater(delay, callable, *args, **kw)


# --- Watchdog --------------------------------------------------------------------------------------------


def watchdog(timeout: float = 10.0) -> tuple[Watchdog, CountingClock, list[float]]:
    clock = CountingClock()
    fired: list[float] = []
    return Watchdog(clock, timeout, lambda: fired.append(clock.seconds())), clock, fired


def test_watchdog_fires_after_exactly_its_timeout() -> None:
    """An armed watchdog that sees no progress fires once `timeout` seconds after it was armed, not before."""
    dog, clock, fired = watchdog(10)
    dog.arm()
    clock.advance(10 - EPS)
    assert fired == []
    clock.advance(EPS)
    assert fired == [10]
    assert not dog.armed


def test_watchdog_fires_only_once() -> None:
    """Once it has fired, a watchdog stays quiet and leaves no timer until it is armed again."""
    dog, clock, fired = watchdog(10)
    dog.arm()
    clock.advance(10)
    clock.advance(100)
    assert fired == [10]
    assert clock.getDelayedCalls() == []


def test_watchdog_kick_postpones_the_deadline() -> None:
    """A kick starts the countdown again from the time of the kick."""
    dog, clock, fired = watchdog(10)
    dog.arm()
    clock.advance(6)
    dog.kick()
    clock.advance(10 - EPS)
    assert fired == []
    clock.advance(EPS)
    assert fired == [16]


def test_watchdog_disarm_suppresses_the_expiry() -> None:
    """A disarmed watchdog never fires, however long it waits."""
    dog, clock, fired = watchdog(10)
    dog.arm()
    clock.advance(5)
    dog.disarm()
    clock.advance(100)
    assert fired == []
    assert clock.getDelayedCalls() == []


def test_watchdog_rearm_measures_from_the_rearm_time() -> None:
    """Armed again after a disarm, the watchdog gives the full timeout from the new arming, not the first."""
    dog, clock, fired = watchdog(10)
    dog.arm()
    clock.advance(4)
    dog.disarm()
    clock.advance(3)
    dog.arm()
    clock.advance(10 - EPS)
    assert fired == []
    clock.advance(EPS)
    assert fired == [17]


def test_watchdog_arm_while_armed_keeps_the_original_start() -> None:
    """Arming an already armed watchdog does not postpone it: only a kick counts as progress."""
    dog, clock, fired = watchdog(10)
    dog.arm()
    clock.advance(5)
    dog.arm()
    clock.advance(5)
    assert fired == [10]


def test_watchdog_cancel_leaves_no_delayed_call() -> None:
    """Cancelling a watchdog removes its pending timer from the clock and it never fires."""
    dog, clock, fired = watchdog(10)
    dog.arm()
    dog.cancel()
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert fired == []


def test_watchdog_schedules_one_call_per_period_however_many_kicks() -> None:
    """A thousand kicks within one period cost no extra timer: one DelayedCall is pending and one was scheduled."""
    dog, clock, fired = watchdog(10)
    dog.arm()
    for _ in range(1000):
        clock.advance(0.0078125)  # 1/128 s: a thousand of them stay within the first period
        dog.kick()
        assert len(clock.getDelayedCalls()) == 1
    assert clock.scheduled == 1
    assert fired == []


# --- RequestBodyPipe -------------------------------------------------------------------------------------


class RecordingConsumer(StringTransport):
    """The upstream socket: records every write, including empty ones, and optionally fills up after each."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.pipe: RequestBodyPipe | None = None
        self.full_after_each_write = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)
        if self.full_after_each_write and self.pipe is not None:
            self.pipe.pauseProducing()


class PipeHarness:
    """A RequestBodyPipe between a client StringTransport and a recording upstream consumer, on a Clock."""

    def __init__(
        self,
        *,
        high: int = 10,
        low: int = 4,
        length: int | None = None,
        client_idle: float = 30.0,
        upstream_stall: float = 20.0,
    ) -> None:
        self.clock = CountingClock()
        self.client = StringTransport()
        self.consumer = RecordingConsumer()
        self.timeouts: list[tuple[str, float]] = []
        self.sent = 0
        self.stopped = 0
        self.pipe = RequestBodyPipe(
            length=length,
            client=self.client,
            clock=self.clock,
            flow=FlowControl(high_water=high, low_water=low),
            client_idle_timeout=client_idle,
            upstream_stall_timeout=upstream_stall,
            on_timeout=lambda which: self.timeouts.append((which, self.clock.seconds())),
            on_sent=self._sent,
            on_stopped=self._stopped,
        )
        self.consumer.pipe = self.pipe

    def _sent(self) -> None:
        self.sent += 1

    def _stopped(self) -> None:
        self.stopped += 1

    def start(self) -> Any:
        return self.pipe.startProducing(self.consumer)


def test_pipe_length_is_the_declared_length_or_unknown() -> None:
    """The pipe reports the client's Content-Length to Agent, and UNKNOWN_LENGTH for a chunked body."""
    assert PipeHarness(length=42).pipe.length == 42
    assert PipeHarness(length=None).pipe.length is UNKNOWN_LENGTH


def test_pipe_writes_straight_through_when_the_upstream_accepts() -> None:
    """With the upstream attached and not paused, each chunk is written at once and nothing is buffered."""
    h = PipeHarness()
    h.start()
    h.pipe.feed(b"abc")
    h.pipe.feed(b"def")
    assert h.consumer.writes == [b"abc", b"def"]
    assert h.pipe.buffered == 0
    assert h.pipe.received == 6


def test_pipe_buffers_before_start_producing() -> None:
    """Chunks fed before Agent calls startProducing are held, then written in order when it does."""
    h = PipeHarness()
    h.pipe.feed(b"abc")
    h.pipe.feed(b"de")
    assert h.pipe.buffered == 5
    h.start()
    assert h.consumer.value() == b"abcde"
    assert h.pipe.buffered == 0


def test_pipe_buffers_while_the_upstream_paused_it() -> None:
    """While the upstream has paused the pipe, chunks are held; its resume writes them in order."""
    h = PipeHarness(high=100, low=10)
    h.start()
    h.pipe.pauseProducing()
    h.pipe.feed(b"abc")
    h.pipe.feed(b"de")
    assert h.consumer.writes == []
    assert h.pipe.buffered == 5
    h.pipe.resumeProducing()
    assert h.consumer.value() == b"abcde"
    assert h.pipe.buffered == 0


def test_pipe_keeps_order_when_a_chunk_arrives_with_others_buffered() -> None:
    """A chunk that arrives while earlier ones are still buffered queues behind them rather than overtaking."""
    h = PipeHarness(high=100, low=10)
    h.pipe.feed(b"first-")
    h.start()
    h.pipe.pauseProducing()
    h.pipe.feed(b"second-")
    h.pipe.resumeProducing()
    h.pipe.feed(b"third")
    assert h.consumer.value() == b"first-second-third"


def test_pipe_pauses_the_client_only_above_the_high_water_mark() -> None:
    """Buffering exactly the high-water mark leaves the client reading; one byte more pauses it."""
    h = PipeHarness(high=10, low=4)
    h.start()
    h.pipe.pauseProducing()
    h.pipe.feed(b"x" * 10)
    assert h.client.producerState == "producing"
    assert not h.pipe.client_paused
    h.pipe.feed(b"x")
    assert h.client.producerState == "paused"
    assert h.pipe.client_paused


def test_pipe_resumes_the_client_at_the_low_water_mark_not_above() -> None:
    """A paused client stays paused while the buffer drains above the low-water mark and resumes once at it."""
    h = PipeHarness(high=10, low=6)
    h.start()
    h.pipe.pauseProducing()
    for _ in range(4):
        h.pipe.feed(b"abc")  # 12 bytes buffered: over the high-water mark
    assert h.client.producerState == "paused"
    h.consumer.full_after_each_write = True  # each resume drains one 3-byte chunk, then the socket is full again
    h.pipe.resumeProducing()
    assert h.pipe.buffered == 9
    assert h.client.producerState == "paused"  # between the marks: hysteresis
    h.pipe.resumeProducing()
    assert h.pipe.buffered == 6
    assert h.client.producerState == "producing"
    assert not h.pipe.client_paused


def test_pipe_repauses_a_client_resumed_behind_its_back() -> None:
    """If HTTPChannel resumes the client while the buffer is over the mark, the next chunk pauses it again."""
    h = PipeHarness(high=10, low=4)
    h.start()
    h.pipe.pauseProducing()
    h.pipe.feed(b"x" * 11)
    assert h.client.producerState == "paused"
    h.client.resumeProducing()  # HTTPChannel.resumeProducing / requestDone, full duplex
    h.pipe.feed(b"y")
    assert h.client.producerState == "paused"


def test_pipe_end_fires_only_after_the_buffer_drained() -> None:
    """`end()` with bytes still buffered leaves the body Deferred pending until they are written upstream."""
    h = PipeHarness(high=100, low=10)
    done = h.start()
    h.pipe.pauseProducing()
    h.pipe.feed(b"tail")
    h.pipe.end()
    _sync.assertNoResult(done)
    assert h.sent == 0
    h.pipe.resumeProducing()
    assert h.consumer.value() == b"tail"
    assert _sync.successResultOf(done) is None
    assert h.sent == 1


def test_pipe_end_before_start_completes_on_start() -> None:
    """A body that ended before the upstream connection opened is written whole and completed by startProducing."""
    h = PipeHarness(high=100, low=10)
    h.pipe.feed(b"all of it")
    h.pipe.end()
    done = h.start()
    assert h.consumer.value() == b"all of it"
    assert isinstance(done, Deferred), f"startProducing must return a Deferred, got {done!r}"
    assert _sync.successResultOf(done) is None
    assert h.sent == 1


def test_pipe_end_leaves_no_timer() -> None:
    """Once the body has ended and been written, neither of the pipe's timers is left on the clock."""
    h = PipeHarness()
    done = h.start()
    h.pipe.feed(b"abc")
    h.pipe.end()
    _sync.successResultOf(done)
    assert h.clock.getDelayedCalls() == []


def test_pipe_fail_errbacks_the_body_and_resumes_the_client() -> None:
    """`fail()` errbacks the body Deferred (so Agent sends no terminator), drops the buffer and resumes the client."""
    h = PipeHarness(high=10, low=4)
    done = h.start()
    h.pipe.pauseProducing()
    h.pipe.feed(b"x" * 11)
    assert h.client.producerState == "paused"
    h.pipe.fail(ValueError("limit crossed"))
    _sync.failureResultOf(done, ValueError)
    assert h.client.producerState == "producing"
    assert h.pipe.buffered == 0
    assert h.clock.getDelayedCalls() == []


def test_pipe_fail_before_start_fails_start_producing() -> None:
    """A pipe failed before the upstream connection opened makes startProducing return that failure."""
    h = PipeHarness()
    h.pipe.feed(b"abc")
    h.pipe.fail(ValueError("client gone"))
    _sync.failureResultOf(h.start(), ValueError)
    assert h.consumer.writes == []


def test_pipe_stop_producing_never_fires_the_body_deferred() -> None:
    """After the upstream calls stopProducing the body Deferred never fires, even when the body then ends."""
    h = PipeHarness()
    done = h.start()
    h.pipe.feed(b"abc")
    h.pipe.stopProducing()
    h.pipe.end()
    h.pipe.fail(ValueError("late"))
    _sync.assertNoResult(done)
    assert h.sent == 0


def test_pipe_stop_producing_reports_once_and_drops_what_follows() -> None:
    """stopProducing calls on_stopped once, and later chunks are neither written nor buffered."""
    h = PipeHarness()
    h.start()
    h.pipe.feed(b"abc")
    h.pipe.stopProducing()
    h.pipe.stopProducing()
    h.pipe.feed(b"more")
    assert h.stopped == 1
    assert h.pipe.stopped
    assert h.consumer.writes == [b"abc"]
    assert h.pipe.buffered == 0
    assert h.clock.getDelayedCalls() == []


def test_pipe_stop_producing_resumes_a_paused_client() -> None:
    """A client the pipe had paused is resumed when the upstream stops the pipe, so its body can be drained."""
    h = PipeHarness(high=10, low=4)
    h.start()
    h.pipe.pauseProducing()
    h.pipe.feed(b"x" * 11)
    h.pipe.stopProducing()
    assert h.client.producerState == "producing"


def test_pipe_ignores_empty_chunks() -> None:
    """An empty chunk is never written upstream: on a chunked upstream body it would be the terminator."""
    h = PipeHarness()
    h.start()
    h.pipe.feed(b"")
    h.pipe.feed(b"a")
    h.pipe.feed(b"")
    assert h.consumer.writes == [b"a"]
    assert h.pipe.received == 1


def test_pipe_tolerates_repeated_pause_producing() -> None:
    """The upstream pausing the pipe on every write is harmless: one resume lets everything through."""
    h = PipeHarness(high=100, low=10)
    h.start()
    h.pipe.pauseProducing()
    h.pipe.pauseProducing()
    h.pipe.feed(b"abc")
    h.pipe.pauseProducing()
    h.pipe.resumeProducing()
    assert h.consumer.value() == b"abc"
    h.pipe.feed(b"d")
    assert h.consumer.value() == b"abcd"


def test_pipe_client_idle_fires_after_exactly_its_timeout() -> None:
    """With no body byte for client_body_idle seconds, the pipe reports client_body_idle; not a moment before."""
    h = PipeHarness(client_idle=30, upstream_stall=1000)
    h.start()
    h.clock.advance(30 - EPS)
    assert h.timeouts == []
    h.clock.advance(EPS)
    assert h.timeouts == [("client_body_idle", 30)]


def test_pipe_client_idle_is_reset_by_each_chunk() -> None:
    """Every chunk from the client starts the client_body_idle countdown again."""
    h = PipeHarness(client_idle=30, upstream_stall=1000)
    h.start()
    h.clock.advance(29)
    h.pipe.feed(b"a")
    h.clock.advance(30 - EPS)
    assert h.timeouts == []
    h.clock.advance(EPS)
    assert h.timeouts == [("client_body_idle", 59)]


def test_pipe_client_idle_does_not_run_while_the_pipe_paused_the_client() -> None:
    """Time the pipe itself holds the client paused is not the client's idleness; the countdown restarts on resume."""
    h = PipeHarness(high=10, low=4, client_idle=30, upstream_stall=1000)
    h.start()
    h.pipe.pauseProducing()
    h.pipe.feed(b"x" * 11)
    assert h.pipe.client_paused
    h.clock.advance(300)
    assert h.timeouts == []
    h.pipe.resumeProducing()  # drains: the client is resumed at t=300
    assert h.client.producerState == "producing"
    h.clock.advance(30 - EPS)
    assert h.timeouts == []
    h.clock.advance(EPS)
    assert h.timeouts == [("client_body_idle", 330)]


def test_pipe_client_idle_stops_at_the_end_of_the_body() -> None:
    """Once the body has ended, the client is not idle any more, however long the upstream takes."""
    h = PipeHarness(high=100, low=10, client_idle=30, upstream_stall=1000)
    h.start()
    h.pipe.pauseProducing()
    h.pipe.feed(b"abc")
    h.pipe.end()
    h.clock.advance(100)
    assert h.timeouts == []


def test_pipe_upstream_stall_does_not_run_while_the_upstream_accepts() -> None:
    """The upstream_send_stall countdown only runs while the upstream has paused the pipe."""
    h = PipeHarness(client_idle=1000, upstream_stall=20)
    h.start()
    h.pipe.feed(b"abc")
    h.clock.advance(100)
    assert h.timeouts == []


def test_pipe_upstream_stall_fires_after_exactly_its_timeout_while_paused() -> None:
    """An upstream that keeps the pipe paused for upstream_send_stall seconds is reported; not a moment before."""
    h = PipeHarness(client_idle=1000, upstream_stall=20)
    h.start()
    h.clock.advance(5)
    h.pipe.pauseProducing()
    h.clock.advance(20 - EPS)
    assert h.timeouts == []
    h.clock.advance(EPS)
    assert h.timeouts == [("upstream_send_stall", 25)]


def test_pipe_upstream_stall_is_measured_from_the_first_of_repeated_pauses() -> None:
    """A pause repeated while already paused does not postpone the upstream_send_stall deadline."""
    h = PipeHarness(client_idle=1000, upstream_stall=20)
    h.start()
    h.pipe.pauseProducing()
    h.clock.advance(10)
    h.pipe.pauseProducing()
    h.clock.advance(10)
    assert h.timeouts == [("upstream_send_stall", 20)]


def test_pipe_upstream_stall_is_cleared_by_a_resume() -> None:
    """A resume before the deadline cancels the stall; a later pause gets the full timeout again."""
    h = PipeHarness(client_idle=1000, upstream_stall=20)
    h.start()
    h.pipe.pauseProducing()
    h.clock.advance(15)
    h.pipe.resumeProducing()
    h.clock.advance(15)
    assert h.timeouts == []
    h.pipe.pauseProducing()  # t=30
    h.clock.advance(20 - EPS)
    assert h.timeouts == []
    h.clock.advance(EPS)
    assert h.timeouts == [("upstream_send_stall", 50)]


def test_pipe_abandon_drops_the_rest_without_failing() -> None:
    """`abandon()` stops forwarding and leaves the body Deferred alone (the upstream already answered)."""
    h = PipeHarness(high=10, low=4)
    done = h.start()
    h.pipe.feed(b"abc")
    h.pipe.abandon()
    h.pipe.feed(b"def")
    h.pipe.end()
    assert h.consumer.value() == b"abc"
    _sync.assertNoResult(done)
    assert h.clock.getDelayedCalls() == []


# --- ResponseRelay ---------------------------------------------------------------------------------------


class ClientRequest:
    """The relay's consumer: what the client request would be sent, and which producer it registered."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.producer: Any = None
        self.streaming: bool | None = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        self.streaming = streaming

    def write(self, data: bytes) -> None:
        self.data.append(data)


class PausingTransport(StringTransport):
    """An upstream socket that counts the pauses it is asked for; pausing a paused socket is harmless, as
    `stopReading` is on a real one."""

    pauses = 0

    def pauseProducing(self) -> None:
        self.pauses += 1
        self.producerState = "paused"


class RelayHarness:
    def __init__(self, *, idle: float = 30.0, stall: float = 20.0, sized: bool = False) -> None:
        self.clock = Clock()
        self.read_sizes: list[int] = []
        self.consumer = ClientRequest()
        self.upstream = PausingTransport()
        self.ended: list[Failure] = []
        self.timeouts: list[tuple[str, float]] = []
        self.relay = ResponseRelay(
            self.consumer,
            self.clock,
            upstream_idle_timeout=idle,
            client_stall_timeout=stall,
            on_end=self.ended.append,
            on_timeout=lambda which: self.timeouts.append((which, self.clock.seconds())),
            read_size=self.read_sizes.append if sized else None,
        )
        self.relay.makeConnection(self.upstream)


def test_relay_registers_itself_as_a_streaming_producer() -> None:
    """On connection the relay registers itself with the client request as a streaming (push) producer."""
    h = RelayHarness()
    assert h.consumer.producer is h.relay
    assert h.consumer.streaming is True


def test_relay_writes_each_chunk_through_at_once() -> None:
    """Each chunk read from the upstream is written to the client as it comes, and counted."""
    h = RelayHarness()
    h.relay.dataReceived(b"abc")
    h.relay.dataReceived(b"de")
    assert h.consumer.data == [b"abc", b"de"]
    assert h.relay.received == 5


def test_relay_client_pause_pauses_the_upstream_and_resume_resumes_it() -> None:
    """A paused client pauses the upstream socket; its resume resumes it."""
    h = RelayHarness()
    h.relay.pauseProducing()
    assert h.upstream.producerState == "paused"
    h.relay.resumeProducing()
    assert h.upstream.producerState == "producing"


def test_relay_tolerates_repeated_pauses() -> None:
    """The client pausing on every write while its buffer is full is harmless: the upstream stays paused and
    one resume resumes it."""
    h = RelayHarness()
    h.relay.pauseProducing()
    h.relay.pauseProducing()
    h.relay.pauseProducing()
    assert h.upstream.producerState == "paused"
    h.relay.resumeProducing()
    h.relay.resumeProducing()
    assert h.upstream.producerState == "producing"
    h.relay.pauseProducing()
    assert h.upstream.producerState == "paused"


def test_relay_pauses_again_an_upstream_resumed_behind_its_back() -> None:
    """A pause asked for while the relay is already paused still pauses the upstream socket: Agent's deliverBody
    resumes it behind the relay's back, and it must not go on reading into a full client buffer."""
    h = RelayHarness()
    h.relay.pauseProducing()
    h.upstream.resumeProducing()  # as Response._deliverBody_INITIAL does
    h.relay.pauseProducing()
    assert h.upstream.producerState == "paused"


def test_relay_repeated_pauses_do_not_restart_the_stall_countdown() -> None:
    """Only the first of a run of pauses starts the client_send_stall countdown; the later ones do not reset it."""
    h = RelayHarness(idle=1000, stall=10)
    h.relay.pauseProducing()
    h.clock.advance(6)
    h.relay.pauseProducing()
    h.clock.advance(4 - EPS)
    assert h.timeouts == []
    h.clock.advance(EPS)
    assert h.timeouts == [("client_send_stall", 10)]


def test_relay_upstream_idle_fires_after_exactly_its_timeout() -> None:
    """An upstream silent for upstream_idle seconds is reported; not a moment before."""
    h = RelayHarness(idle=30, stall=1000)
    h.clock.advance(30 - EPS)
    assert h.timeouts == []
    h.clock.advance(EPS)
    assert h.timeouts == [("upstream_idle", 30)]


def test_relay_upstream_idle_is_reset_by_data() -> None:
    """Each chunk from the upstream starts the upstream_idle countdown again."""
    h = RelayHarness(idle=30, stall=1000)
    h.clock.advance(20)
    h.relay.dataReceived(b"x")
    h.clock.advance(30 - EPS)
    assert h.timeouts == []
    h.clock.advance(EPS)
    assert h.timeouts == [("upstream_idle", 50)]


def test_relay_upstream_idle_is_suspended_while_the_client_paused_it() -> None:
    """Time the client makes the relay wait is not upstream idleness; the countdown restarts on resume."""
    h = RelayHarness(idle=30, stall=1000)
    h.clock.advance(10)
    h.relay.pauseProducing()
    h.clock.advance(500)
    assert h.timeouts == []
    h.relay.resumeProducing()  # t=510
    h.clock.advance(30 - EPS)
    assert h.timeouts == []
    h.clock.advance(EPS)
    assert h.timeouts == [("upstream_idle", 540)]


def test_relay_client_stall_fires_after_exactly_its_timeout_while_paused() -> None:
    """A client that keeps the relay paused for client_send_stall seconds is reported; not a moment before."""
    h = RelayHarness(idle=1000, stall=20)
    h.clock.advance(3)
    h.relay.pauseProducing()
    h.clock.advance(20 - EPS)
    assert h.timeouts == []
    h.clock.advance(EPS)
    assert h.timeouts == [("client_send_stall", 23)]


def test_relay_client_stall_counts_only_a_continuous_pause() -> None:
    """Pauses that each end before client_send_stall do not add up; the deadline counts from the latest pause."""
    h = RelayHarness(idle=1000, stall=20)
    h.relay.pauseProducing()
    h.clock.advance(20 - EPS)
    h.relay.resumeProducing()
    h.relay.pauseProducing()  # t=19.75
    h.clock.advance(20 - EPS)
    assert h.timeouts == []
    h.clock.advance(EPS)
    assert h.timeouts == [("client_send_stall", 39.75)]


def test_relay_client_stall_does_not_run_while_the_client_reads() -> None:
    """A client that never pauses the relay is never reported as stalled."""
    h = RelayHarness(idle=1000, stall=20)
    for _ in range(10):
        h.clock.advance(10)
        h.relay.dataReceived(b"x")
    assert h.timeouts == []


def test_relay_stop_producing_stops_the_upstream_and_its_timers() -> None:
    """stopProducing (client gone) stops the upstream socket and leaves no timer behind."""
    h = RelayHarness()
    h.relay.pauseProducing()
    h.relay.stopProducing()
    assert h.upstream.producerState == "stopped"
    assert h.relay.stopped
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(1000)
    assert h.timeouts == []


def test_relay_ignores_data_after_stop() -> None:
    """The rest of a read that was under way when the relay was stopped is not written to the client."""
    h = RelayHarness()
    h.relay.dataReceived(b"abc")
    h.relay.stopProducing()
    h.relay.dataReceived(b"late")
    assert h.consumer.data == [b"abc"]
    assert h.relay.received == 3


def test_relay_pause_and_resume_after_stop_do_nothing() -> None:
    """A stopped relay ignores pause and resume: the upstream stays stopped and no timer starts."""
    h = RelayHarness()
    h.relay.stopProducing()
    h.relay.pauseProducing()
    h.relay.resumeProducing()
    assert h.upstream.producerState == "stopped"
    assert h.clock.getDelayedCalls() == []


@pytest.mark.parametrize("reason", [ConnectionDone("done"), ConnectionLost("cut")])
def test_relay_connection_lost_reports_the_reason_and_cancels_timers(reason: Exception) -> None:
    """The end of the upstream body reaches on_end with its reason, and the relay's timers are cancelled."""
    h = RelayHarness()
    h.relay.pauseProducing()
    h.relay.connectionLost(Failure(reason))
    assert len(h.ended) == 1
    assert h.ended[0].value is reason
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(1000)
    assert h.timeouts == []


MiB = 1024 * 1024


def sizer() -> tuple[ReadSizer, Clock, list[int]]:
    clock = Clock()
    applied: list[int] = []
    return ReadSizer(applied.append, clock), clock, applied


def feed(s: ReadSizer, total: int, chunk: int) -> None:
    """Relay `total` bytes in reads of `chunk`, without a pause."""
    for _ in range(total // chunk):
        s.relayed(chunk)


def test_sizer_starts_at_the_minimum_and_applies_it() -> None:
    """The first read size is the smallest, applied at once."""
    s, _, applied = sizer()
    assert s.size == ReadSizer.MIN
    assert applied == [ReadSizer.MIN]


def test_sizer_does_not_grow_before_the_client_kept_up_long_enough() -> None:
    """However fast, a client that has taken less than KEPT_UP (what socket buffers absorb) gets small reads."""
    s, clock, applied = sizer()
    feed(s, ReadSizer.KEPT_UP - ReadSizer.MIN, ReadSizer.MIN)
    for _ in range(10):
        s.paused()
        clock.advance(0.001)
        s.resumed()
    assert applied == [ReadSizer.MIN]


def test_sizer_doubles_up_to_the_maximum_for_a_client_that_keeps_up() -> None:
    """Past KEPT_UP, each GROW_AFTER bytes without a pause doubles the read size, up to MAX and no further."""
    s, _, applied = sizer()
    feed(s, ReadSizer.KEPT_UP, ReadSizer.MIN)
    assert s.size == 2 * ReadSizer.MIN
    feed(s, 8 * ReadSizer.GROW_AFTER, ReadSizer.MIN)
    assert applied == [16 * 1024, 32 * 1024, 64 * 1024, 128 * 1024, 256 * 1024, 512 * 1024, 1024 * 1024]
    assert s.size == ReadSizer.MAX


def test_sizer_stops_at_a_smaller_maximum_for_a_client_over_tls() -> None:
    """Given a maximum (TLS_MAX for a client over TLS), growing stops there."""
    applied: list[int] = []
    s = ReadSizer(applied.append, Clock(), maximum=ReadSizer.TLS_MAX)
    feed(s, ReadSizer.KEPT_UP + 8 * ReadSizer.GROW_AFTER, ReadSizer.MIN)
    assert applied == [16 * 1024, 32 * 1024, 64 * 1024, 128 * 1024, 256 * 1024]
    assert s.size == ReadSizer.TLS_MAX


def test_sizer_grows_at_each_resume_of_a_fast_client() -> None:
    """A fast client that pauses often still grows the read size: each resume doubles it."""
    s, clock, applied = sizer()
    feed(s, ReadSizer.KEPT_UP, 4096)
    start = s.size
    s.paused()
    clock.advance(0.001)
    s.resumed()
    assert s.size == 2 * start
    assert applied[-1] == 2 * start


def test_sizer_drops_to_the_minimum_when_the_client_proves_slow() -> None:
    """At a resume after a window in which the client took less than SLOW_RATE, reads go back to MIN, and
    growing again waits for another KEPT_UP."""
    s, clock, applied = sizer()
    feed(s, ReadSizer.KEPT_UP + 8 * ReadSizer.GROW_AFTER, ReadSizer.MIN)
    assert s.size == ReadSizer.MAX
    clock.advance(ReadSizer.WINDOW)  # the window the fast bytes above fell in
    s.resumed()
    s.paused()
    s.relayed(200_000)
    clock.advance(1.0)  # 200 KB in a second: a slow client
    s.resumed()
    assert s.size == ReadSizer.MIN
    assert applied[-1] == ReadSizer.MIN
    feed(s, ReadSizer.KEPT_UP - ReadSizer.MIN, ReadSizer.MIN)
    assert s.size == ReadSizer.MIN


def test_sizer_judges_the_pace_over_a_window_not_one_pause() -> None:
    """One long pause of a fast client, shorter than WINDOW and inside a window of fast progress, is not taken
    for a slow client."""
    s, clock, _ = sizer()
    feed(s, ReadSizer.KEPT_UP + 8 * ReadSizer.GROW_AFTER, ReadSizer.MIN)
    clock.advance(ReadSizer.WINDOW)
    s.resumed()  # a new window starts here
    feed(s, 2 * MiB, ReadSizer.MAX)
    s.paused()
    clock.advance(ReadSizer.WINDOW / 2)  # a long stall of the client, but 2 MiB in 50 ms is 40 MB/s
    s.resumed()
    assert s.size == ReadSizer.MAX


def test_sizer_at_the_exact_slow_rate_counts_as_keeping_up() -> None:
    """SLOW_RATE itself is not slow: only less is."""
    s, clock, _ = sizer()
    feed(s, ReadSizer.KEPT_UP + 8 * ReadSizer.GROW_AFTER, ReadSizer.MIN)
    clock.advance(ReadSizer.WINDOW)
    s.resumed()
    s.relayed(ReadSizer.SLOW_RATE)
    clock.advance(1.0)
    s.resumed()
    assert s.size == ReadSizer.MAX


def test_relay_without_read_size_sets_none() -> None:
    """Without `read_size` (an upstream that is not a pooled socket) the relay sizes nothing."""
    h = RelayHarness()
    h.relay.dataReceived(b"x" * 1000)
    h.relay.pauseProducing()
    h.relay.resumeProducing()
    assert h.read_sizes == []


def test_relay_sets_a_small_read_size_at_once_and_drops_back_for_a_slow_client() -> None:
    """The relay starts the upstream at the smallest read size, grows it while the client keeps up, and drops
    it back when the client's pace, measured between its resumes on the relay's clock, is slow."""
    h = RelayHarness(sized=True)
    assert h.read_sizes == [ReadSizer.MIN]
    for _ in range((ReadSizer.KEPT_UP + 8 * ReadSizer.GROW_AFTER) // ReadSizer.MIN):
        h.relay.dataReceived(b"x" * ReadSizer.MIN)
    assert h.read_sizes[-1] == ReadSizer.MAX
    h.clock.advance(ReadSizer.WINDOW)
    h.relay.pauseProducing()
    h.relay.resumeProducing()
    h.relay.dataReceived(b"x" * 1000)
    h.relay.pauseProducing()
    h.clock.advance(1.0)
    h.relay.resumeProducing()
    assert h.read_sizes[-1] == ReadSizer.MIN
