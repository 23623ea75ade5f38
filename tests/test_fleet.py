"""`gateway.operations.fleet`: the merge of several processes' families (pure), and `Fleet` asking workers over real
socketpairs on the global reactor, each worker end either the gateway's own (`answer_parent` on a real
`Metrics`) or a stand-in that answers only when the test says so (a stopped or stuck worker). The answer
timeouts run on a `Clock` the test advances once the questions are in, so no test waits for time to pass. The
whole thing with real processes is in tests/e2e/test_workers.py.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.protocols.basic import Int32StringReceiver
from twisted.trial.unittest import SynchronousTestCase

from gateway.operations.admin import OneProcess
from gateway.operations.fleet import (
    ANSWER_TIMEOUT,
    MAX_UNANSWERED,
    METRICS,
    READY,
    Fleet,
    WorkerChannel,
    answer_parent,
    decode,
    encode,
    merge,
)
from gateway.operations.metrics import Live, Metrics, merge_kind
from tests.support.clients import within
from tests.support.scrape import Scrape, until

_sync = SynchronousTestCase()

# --- the merge ----------------------------------------------------------------------------------------------


def samples(families: list[Metric]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in families:
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in found, f"{key} twice"
            found[key] = s.value
    return found


def value(families: list[Metric], name: str, **labels: str) -> float | None:
    return samples(families).get((name, frozenset(labels.items())))


def process_families(requests: int, connections: int, draining: int, rss: float, created: float) -> list[Metric]:
    """What one process reports, in small: a counter (with `_created`), a histogram, an additive gauge, a flag
    and a process metric."""
    counter = CounterMetricFamily("gateway_requests", "Requests.", labels=["route"], created=created)
    counter.add_metric(["a"], requests, created=created)
    histogram = HistogramMetricFamily("gateway_request_duration_seconds", "Durations.", labels=["route"])
    histogram.add_metric(["a"], [("0.1", requests), ("+Inf", requests)], sum_value=requests * 0.05)
    return [
        counter,
        histogram,
        GaugeMetricFamily("gateway_client_connections", "Connections.", connections),
        GaugeMetricFamily("gateway_draining", "Draining.", draining),
        GaugeMetricFamily("process_resident_memory_bytes", "RSS.", rss),
        CounterMetricFamily("process_cpu_seconds", "CPU.", 1.5),
    ]


def test_merge_kinds_follow_the_families() -> None:
    """Counters and histograms are counts, the listed gauges sums, other gauges and every process metric (a
    counter too) per process."""
    kinds = {family.name: merge_kind(family) for family in process_families(1, 1, 0, 1, 1)}
    assert kinds == {
        "gateway_requests": "count",
        "gateway_request_duration_seconds": "count",
        "gateway_client_connections": "sum",
        "gateway_draining": "each",
        "process_resident_memory_bytes": "each",
        "process_cpu_seconds": "each",
    }


def test_merge_sums_counts_and_additive_gauges_and_labels_the_rest() -> None:
    """Two processes: their counters, histogram buckets, counts and sums and additive gauges are added up (the
    earliest `_created` kept), their flags and process metrics given per process under `worker`."""
    merged = merge([("0", process_families(3, 2, 0, 100.0, 50.0)), ("1", process_families(4, 5, 1, 200.0, 40.0))])
    assert [family.name for family in merged] == [family.name for family in process_families(1, 1, 0, 1, 1)]
    assert value(merged, "gateway_requests_total", route="a") == 7
    assert value(merged, "gateway_requests_created", route="a") == 40.0
    assert value(merged, "gateway_request_duration_seconds_bucket", route="a", le="0.1") == 7
    assert value(merged, "gateway_request_duration_seconds_bucket", route="a", le="+Inf") == 7
    assert value(merged, "gateway_request_duration_seconds_count", route="a") == 7
    assert value(merged, "gateway_request_duration_seconds_sum", route="a") == pytest.approx(0.35)
    assert value(merged, "gateway_client_connections") == 7
    assert value(merged, "gateway_draining", worker="0") == 0
    assert value(merged, "gateway_draining", worker="1") == 1
    assert value(merged, "gateway_draining") is None
    assert value(merged, "process_resident_memory_bytes", worker="1") == 200.0
    assert value(merged, "process_cpu_seconds_total", worker="0") == 1.5


def test_merge_takes_only_the_counts_of_a_part_without_a_worker() -> None:
    """A part labelled None (a worker gone, or silent) adds its counts and nothing else; label sets only it
    has are kept."""
    gone = process_families(10, 9, 1, 300.0, 30.0)
    gone[0].add_metric(["b"], 2)
    merged = merge([("0", process_families(3, 2, 0, 100.0, 50.0)), (None, gone)])
    assert value(merged, "gateway_requests_total", route="a") == 13
    assert value(merged, "gateway_requests_total", route="b") == 2
    assert value(merged, "gateway_request_duration_seconds_count", route="a") == 13
    assert value(merged, "gateway_client_connections") == 2
    assert {labels for (name, labels) in samples(merged) if name == "gateway_draining"} == {
        frozenset({("worker", "0")})
    }


def test_families_go_through_the_wire_unchanged() -> None:
    """`decode(encode(families))` gives the same families, infinite bounds and values included."""
    families = process_families(3, 2, 0, math.inf, 50.0)
    back = decode(encode(families))
    assert [(f.name, f.type, f.documentation) for f in back] == [(f.name, f.type, f.documentation) for f in families]
    assert samples(back) == samples(families)


# --- Fleet over real sockets --------------------------------------------------------------------------------


def _live() -> Live:
    return Live(
        connections=1,
        requests={},
        paused_responses=0,
        paused_uploads=0,
        buffered_upload_bytes=0,
        buffered_response_bytes=0,
        pools=[],
        draining=False,
    )


def served(metrics: Metrics, count: int) -> None:
    for _ in range(count):
        metrics.request_ended(
            {
                "route": "a",
                "status": 200,
                "ending": "completed",
                "total_ms": 5.0,
                "ttfb_ms": None,
                "queue_ms": None,
                "upstream": None,
                "bytes_in": 0,
                "bytes_out": 10,
            }
        )


class StandIn(Int32StringReceiver):
    """A worker's end that records each question and leaves it for the test to answer (with `sendString`), or
    answers at once with `prompt`."""

    def __init__(self) -> None:
        self.questions: list[bytes] = []
        self.prompt: Callable[[bytes], bytes] | None = None

    def stringReceived(self, question: bytes) -> None:
        self.questions.append(question)
        if self.prompt is not None:
            self.sendString(self.prompt(question))


def adopt(sock: socket.socket, protocol: Int32StringReceiver) -> None:
    """`protocol` over `sock` (the reactor takes a duplicate of it)."""
    sock.setblocking(False)
    reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: protocol))


class Channels:
    """Socketpairs between a `Fleet` and worker ends; every one closed after the test."""

    def __init__(self) -> None:
        self.opened: list[WorkerChannel] = []

    def connect(self, fleet: Fleet, index: int, worker: Callable[[socket.socket], None]) -> WorkerChannel:
        """A new channel of worker `index`, its worker end given to `worker`."""
        channel = fleet.channel(index)
        ours, theirs = socket.socketpair()
        with ours, theirs:
            adopt(ours, channel)
            worker(theirs)
        self.opened.append(channel)
        return channel

    def gateway_worker(self, fleet: Fleet, index: int, metrics: Metrics, not_ready: Callable[[], str | None]) -> None:
        """Worker `index` answering as a gateway worker does."""
        self.connect(fleet, index, lambda theirs: answer_parent(reactor, theirs.detach(), metrics.registry, not_ready))

    def stand_in(self, fleet: Fleet, index: int) -> StandIn:
        stand_in = StandIn()
        self.connect(fleet, index, lambda theirs: adopt(theirs, stand_in))
        return stand_in


@pytest.fixture
def channels() -> Iterator[Channels]:
    made = Channels()
    yield made
    for channel in made.opened:
        if channel.transport is not None:
            channel.transport.loseConnection()


def fleet_of(own: Metrics, count: int, not_ready: Callable[[], str | None] = lambda: None) -> tuple[Fleet, Clock]:
    """A fleet whose answer timeouts run on a `Clock` of their own: a wait ends on the answers, or when the test
    advances the clock (the answers themselves come over real sockets)."""
    clock = Clock()
    return Fleet(own.registry, not_ready, count, clock), clock


async def collect(fleet: Fleet) -> Scrape:
    families = list((await within(fleet.metrics())).collect())
    return Scrape(samples(families), {family.name: family.type for family in families})


async def waited_out(
    asked: Deferred[Any], clock: Clock, silent: StandIn, questions: int, *answering: WorkerChannel
) -> Any:
    """What `asked` gives once the silent stand-in holds `questions` questions and the `answering` channels have
    their answers: then the timeout passes."""
    await until(
        lambda: len(silent.questions) == questions and not any(channel.unanswered for channel in answering),
        "the questions asked and the others answered",
    )
    clock.advance(ANSWER_TIMEOUT)
    return await within(asked)


async def collect_waited_out(fleet: Fleet, clock: Clock, silent: StandIn, questions: int) -> Scrape:
    collector = await waited_out(fleet.metrics(), clock, silent, questions)
    families = list(collector.collect())
    return Scrape(samples(families), {family.name: family.type for family in families})


def requests(s: Scrape) -> float:
    return s.count("gateway_requests_total", route="a", status="200", ending="completed")


@pytest_twisted.ensureDeferred
async def test_a_scrape_sums_twistd_and_every_worker(channels: Channels) -> None:
    """twistd's own registry (worker 0) and two workers answering on their channels: the counters are summed,
    the per-process gauges labelled, and every worker is up."""
    own, first, second = Metrics(_live), Metrics(_live), Metrics(_live)
    served(own, 1)
    served(first, 2)
    served(second, 4)
    fleet, _ = fleet_of(own, 2)
    channels.gateway_worker(fleet, 1, first, lambda: None)
    channels.gateway_worker(fleet, 2, second, lambda: None)
    s = await collect(fleet)
    assert requests(s) == 7
    assert s.value("gateway_response_body_bytes_total", route="a") == 70
    assert s.value("gateway_request_duration_seconds_count", route="a") == 7
    assert s.value("gateway_client_connections") == 3
    assert {s.value("gateway_draining", worker=w) for w in ("0", "1", "2")} == {0}
    assert {s.value("gateway_worker_up", worker=w) for w in ("0", "1", "2")} == {1}
    assert all(s.value("process_open_fds", worker=w) for w in ("0", "1", "2"))
    assert s.types["gateway_requests"] == "counter"
    assert fleet.unhealthy() is None
    assert await within(fleet.not_ready()) is None


@pytest_twisted.ensureDeferred
async def test_a_worker_that_does_not_answer_counts_with_its_last_answer(channels: Channels) -> None:
    """A worker that answered once and then does not within the timeout (stopped, stuck): the scrape comes
    after the timeout with its counts as last answered, none of its gauges, and it is down; readiness says it
    did not answer. Its late answers still land, in order."""
    own, worker = Metrics(_live), Metrics(_live)
    served(worker, 3)
    fleet, clock = fleet_of(own, 1)
    stand_in = channels.stand_in(fleet, 1)
    stand_in.prompt = lambda question: encode(worker.registry.collect())
    assert requests(await collect(fleet)) == 3
    stand_in.prompt = None
    served(worker, 10)  # not seen: the worker does not answer now
    s = await collect_waited_out(fleet, clock, stand_in, 2)
    assert requests(s) == 3
    assert s.value("gateway_worker_up", worker="1") == 0
    assert s.value("gateway_draining", worker="1") is None
    assert s.value("gateway_draining", worker="0") == 0
    assert await waited_out(fleet.not_ready(), clock, stand_in, 3) == "worker 1 did not answer"
    assert fleet.unhealthy() is None  # it runs
    assert stand_in.questions == [METRICS, METRICS, READY]
    stand_in.sendString(encode(worker.registry.collect()))  # the late answer to the scrape: kept
    stand_in.sendString(b"")
    channel = channels.opened[0]
    await until(lambda: channel.unanswered == 0, "the late answers in")
    assert requests(await collect_waited_out(fleet, clock, stand_in, 4)) == 13


@pytest_twisted.ensureDeferred
async def test_an_ended_worker_keeps_its_counts_in_the_totals(channels: Channels) -> None:
    """A worker whose channel closes (it died): the gateway is unhealthy and not ready until a new worker has a
    channel, and the counts it last answered stay in every total after, added to its successor's."""
    own, old, new = Metrics(_live), Metrics(_live), Metrics(_live)
    served(old, 5)
    served(new, 2)
    fleet, _ = fleet_of(own, 1)
    channels.gateway_worker(fleet, 1, old, lambda: None)
    assert requests(await collect(fleet)) == 5
    channel = channels.opened[0]
    assert channel.transport is not None
    channel.transport.loseConnection()
    await until(lambda: fleet.unhealthy() is not None, "the channel closed")
    assert fleet.unhealthy() == "worker 1 is not running"
    assert await within(fleet.not_ready()) == "worker 1 is not running"
    s = await collect(fleet)
    assert (requests(s), s.value("gateway_worker_up", worker="1")) == (5, 0)
    channels.gateway_worker(fleet, 1, new, lambda: None)
    s = await collect(fleet)
    assert (requests(s), s.value("gateway_worker_up", worker="1")) == (7, 1)
    assert fleet.unhealthy() is None


@pytest_twisted.ensureDeferred
async def test_ready_only_when_every_process_is(channels: Channels) -> None:
    """Ready only when twistd and every worker are: twistd's own reason comes first (no worker asked), then a
    worker's, named; a worker that never answered is starting."""
    reasons: dict[str, str | None] = {"twistd": None, "worker": "draining"}
    fleet, clock = fleet_of(Metrics(_live), 2, lambda: reasons["twistd"])
    assert await within(fleet.not_ready()) == "worker 1 is not running"
    channels.gateway_worker(fleet, 1, Metrics(_live), lambda: reasons["worker"])
    first = channels.opened[0]
    silent = channels.stand_in(fleet, 2)
    assert await waited_out(fleet.not_ready(), clock, silent, 1, first) == "worker 1: draining"
    reasons["worker"] = None
    assert await waited_out(fleet.not_ready(), clock, silent, 2, first) == "worker 2 is starting"
    for _ in silent.questions:  # the answers to the questions so far, late: answers come in the order asked
        silent.sendString(b"")
    silent.prompt = lambda question: b""
    assert await within(fleet.not_ready()) is None
    reasons["twistd"] = "draining"
    asked = len(silent.questions)
    assert await within(fleet.not_ready()) == "draining"
    assert len(silent.questions) == asked


@pytest_twisted.ensureDeferred
async def test_a_stuck_worker_is_asked_a_bounded_number_of_questions(channels: Channels) -> None:
    """Past `MAX_UNANSWERED` questions unanswered, a worker is not asked more: the answer is None at once; the
    answers to the others come in the order asked."""
    fleet, _ = fleet_of(Metrics(_live), 1)
    stuck = channels.stand_in(fleet, 1)
    channel = channels.opened[0]
    waiting = [channel.ask(READY) for _ in range(MAX_UNANSWERED)]
    assert await channel.ask(READY) is None
    assert channel.unanswered == MAX_UNANSWERED
    await until(lambda: len(stuck.questions) == MAX_UNANSWERED, "the questions arrive")
    for answer in (b"a", b"b", b"c", b"d"):
        stuck.sendString(answer)
    assert await within(DeferredList(waiting)) == [(True, answer) for answer in (b"a", b"b", b"c", b"d")]
    assert len(stuck.questions) == MAX_UNANSWERED


@pytest_twisted.ensureDeferred
async def test_an_unreadable_answer_is_logged_and_counts_as_none(channels: Channels, failures: list[Any]) -> None:
    """An answer to a scrape that is not families is logged and the worker counts as down."""
    fleet, _ = fleet_of(Metrics(_live), 1)
    stand_in = channels.stand_in(fleet, 1)
    stand_in.prompt = lambda question: b"not json"
    s = await collect(fleet)
    assert s.value("gateway_worker_up", worker="1") == 0
    assert len(failures) == 1


def test_one_process_reports_its_own_registry() -> None:
    """Without workers the admin site reports the process's registry and readiness as they are."""
    registry = CollectorRegistry()
    view = OneProcess(registry, lambda: "starting")
    assert _sync.successResultOf(view.metrics()) is registry
    assert _sync.successResultOf(view.not_ready()) == "starting"
    assert view.unhealthy() is None


@pytest_twisted.ensureDeferred
async def test_upstreams_are_each_process_s_own(channels: Channels) -> None:
    """Each process has its own pools, ejections and health checks: `/upstreams` with workers gives every
    process's view under its index, twistd's as "0", null for a worker that did not answer in time."""
    clock = Clock()
    fleet = Fleet(Metrics(_live).registry, lambda: None, 2, clock, upstreams=lambda: {"api": {"servers": ["0"]}})
    worker = Metrics(_live)
    channels.connect(
        fleet,
        1,
        lambda theirs: answer_parent(
            reactor, theirs.detach(), worker.registry, lambda: None, lambda: {"api": {"servers": ["1"]}}
        ),
    )
    first = channels.opened[0]
    silent = channels.stand_in(fleet, 2)
    views = await waited_out(fleet.upstreams(), clock, silent, 1, first)
    assert views == {"workers": {"0": {"api": {"servers": ["0"]}}, "1": {"api": {"servers": ["1"]}}, "2": None}}


def test_one_process_reports_its_own_upstreams() -> None:
    view = OneProcess(CollectorRegistry(), lambda: None, lambda: {"api": {"servers": []}})
    assert _sync.successResultOf(view.upstreams()) == {"api": {"servers": []}}
