"""The whole gateway on one admin listener: with `server.workers` above 1 the twistd process (worker 0) serves the
only admin listener, and at each scrape or probe asks every worker for its metrics or its readiness over a
private channel, then answers for all of them.

Why not prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR and its MultiProcessCollector): it adds
up only the values that its own Counter, Gauge and Histogram write to per-process mmap files, and leaves out
every collector. The gateway's request counters and histograms are plain numbers turned into families by a
collector at the scrape (prometheus_client's own types cost some 20 us per request, and in that mode each write
also takes a process-wide lock and writes its file); its gauges are read from the live objects at the scrape
(connections, paused streams, bytes held, pools, certificates), which that mode cannot see at all; and it does
not gather process metrics. Using it would put all of that back on the data path. What it would give that this
does not: the counts of a worker killed outright up to its last request; here they are those of its last answer.

Rules:
* A worker is reached over one end of a socketpair the pool made when it started it (the other end is the
  worker's `--channel-fd`): no file, no port, nothing another process can ask and nothing left behind.
* The parent asks, the worker answers: one answer per question, in order (`Int32StringReceiver` frames). Every
  question is bounded: its answer is waited for at most `ANSWER_TIMEOUT` seconds, and a worker with
  `MAX_UNANSWERED` questions unanswered is not asked more.
* Families merge as `gateway.operations.metrics.merge_kind` says: counters and histograms summed over every process, the
  additive gauges over those that answered, the others per process under a `worker` label ("0" is twistd).
  Totals never go down: a worker that does not answer counts with its last answer, and one that has ended with
  its last answer for ever after (a worker's restart is no reset of the gateway's counters).
* Ready when every process is: twistd (listening, not draining) and each worker, which must say so within the
  bound. Healthy while twistd serves and every worker process runs (one that died counts until its successor
  runs).
"""

from __future__ import annotations

import json
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet import fdesc
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorSocket, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from gateway.operations.metrics import merge_kind
from gateway.operations.waits import within

__all__ = ["ANSWER_TIMEOUT", "Fleet", "WorkerChannel", "answer_parent", "decode", "encode", "merge"]

_log = Logger(namespace="gateway.fleet")  # not the module's name: log lines keep the namespace they had

ANSWER_TIMEOUT = 2.0
"""Seconds a scrape or a readiness probe waits for each worker's answer."""
MAX_UNANSWERED = 4
"""Questions a worker may leave unanswered (a stopped or stuck worker) before it is not asked more."""
MAX_ANSWER_BYTES = 64 * 1024 * 1024
"""The largest answer taken (a worker's metrics as JSON: some tens of bytes a series)."""
METRICS = b"metrics"
"""The question whose answer is the worker's metric families (`encode`)."""
READY = b"ready"
"""The question whose answer is why the worker is not ready, empty when it is."""
UPSTREAMS = b"upstreams"
"""The question whose answer is the worker's view of its upstreams and their servers, as JSON."""


# --- the families, on the wire and merged ---------------------------------------------------------------------


def encode(families: Iterable[Metric]) -> bytes:
    """Metric families as a worker sends them: JSON, each family's name, type, help, unit and samples."""
    return json.dumps(
        [[f.name, f.type, f.documentation, f.unit, [[s.name, s.labels, s.value] for s in f.samples]] for f in families]
    ).encode("utf-8")


def decode(data: bytes) -> list[Metric]:
    """The families `encode` wrote."""
    families = []
    for name, kind, documentation, unit, samples in json.loads(data):
        family = Metric(name, documentation, kind, unit)
        for sample, labels, value in samples:
            family.add_sample(sample, labels, value)
        families.append(family)
    return families


def merge(parts: Iterable[tuple[str | None, Iterable[Metric]]]) -> list[Metric]:
    """One family per name from the families of several processes, each part labelled with its worker ("0",
    "1", ...), or None for the counts of a worker that did not answer or has ended (only its "count" families
    are taken). Summed series are added up sample by sample, but for `_created`, the earliest."""
    merged: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, frozenset[tuple[str, str]]], tuple[dict[str, str], float]]] = {}
    for worker, families in parts:
        for family in families:
            kind = merge_kind(family)
            if worker is None and kind != "count":
                continue
            out = merged.get(family.name)
            if out is None:
                out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            if kind == "each":
                for s in family.samples:
                    out.add_sample(s.name, {**s.labels, "worker": worker or ""}, s.value)
                continue
            table = sums.setdefault(family.name, {})
            for s in family.samples:
                key = (s.name, frozenset(s.labels.items()))
                found = table.get(key)
                if found is None:
                    table[key] = (s.labels, s.value)
                elif s.name.endswith("_created"):
                    table[key] = (found[0], min(found[1], s.value))
                else:
                    table[key] = (found[0], found[1] + s.value)
    for name, table in sums.items():
        for (sample, _), (labels, value) in table.items():
            merged[name].add_sample(sample, labels, value)
    return list(merged.values())


class _Families(Collector):
    """Families merged already, for prometheus_client's encoders."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


# --- the worker's end -----------------------------------------------------------------------------------------


class _Answers(Int32StringReceiver):
    """A worker's end of its channel: answers each question of its parent, at once."""

    MAX_LENGTH = 64  # a question is one word

    def __init__(
        self, registry: Collector, not_ready: Callable[[], str | None], upstreams: Callable[[], object]
    ) -> None:
        self._registry = registry
        self._not_ready = not_ready
        self._upstreams = upstreams

    def stringReceived(self, question: bytes) -> None:
        if question == METRICS:
            self.sendString(encode(self._registry.collect()))
        elif question == READY:
            self.sendString((self._not_ready() or "").encode("utf-8"))
        elif question == UPSTREAMS:
            self.sendString(json.dumps(self._upstreams()).encode("utf-8"))
        else:
            self.sendString(b"")  # still one answer per question, so the next ones keep their order


def answer_parent(
    reactor: IReactorSocket,
    fd: int,
    registry: Collector,
    not_ready: Callable[[], str | None],
    upstreams: Callable[[], object] = dict,
) -> None:
    """Answer the parent's questions on the channel it passed at descriptor `fd` (taken over and closed)."""
    fdesc.setNonBlocking(fd)
    factory = Factory.forProtocol(lambda: _Answers(registry, not_ready, upstreams))
    # Twisted annotates the factory as a ServerFactory[...] of its default protocol type; any IProtocolFactory does.
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, factory)  # type: ignore[arg-type]
    os.close(fd)  # the reactor holds a duplicate


# --- the parent's end -----------------------------------------------------------------------------------------


class WorkerChannel(Int32StringReceiver):
    """The parent's end of one worker's channel: questions out, answers back in the order asked."""

    MAX_LENGTH = MAX_ANSWER_BYTES

    def __init__(self, index: int, lost: Callable[[WorkerChannel], None]) -> None:
        self.index = index
        self.open = False
        self.answered = False
        """Whether the worker has answered once (until then it is starting)."""
        self._lost = lost
        self._waiting: deque[Deferred[bytes | None]] = deque()

    @property
    def unanswered(self) -> int:
        """Questions asked and not answered yet."""
        return len(self._waiting)

    def connectionMade(self) -> None:
        self.open = True

    def ask(self, question: bytes) -> Deferred[bytes | None]:
        """The worker's answer; None at once if the channel is closed or the worker has too many questions
        unanswered, or when the channel closes before it answers."""
        if not self.open or len(self._waiting) >= MAX_UNANSWERED:
            return succeed(None)
        answer: Deferred[bytes | None] = Deferred()
        self._waiting.append(answer)
        self.sendString(question)
        return answer

    def stringReceived(self, answer: bytes) -> None:
        self.answered = True
        if self._waiting:
            self._waiting.popleft().callback(answer)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The worker has gone (or broke the framing): nothing more will be answered."""
        self.open = False
        self._lost(self)
        waiting, self._waiting = self._waiting, deque()
        for answer in waiting:
            answer.callback(None)


class Fleet:
    """What the admin listener answers for the whole gateway: twistd's own registry and readiness (worker 0)
    and those of workers 1..`count`, each asked over the channel `channel` makes for the pool."""

    def __init__(
        self,
        registry: Collector,
        not_ready: Callable[[], str | None],
        count: int,
        clock: IReactorTime,
        *,
        timeout: float = ANSWER_TIMEOUT,
        upstreams: Callable[[], object] = dict,
    ) -> None:
        self._registry = registry
        self._not_ready = not_ready
        self._upstreams = upstreams
        self._clock = clock
        self.timeout = timeout
        self._current: dict[int, WorkerChannel | None] = dict.fromkeys(range(1, count + 1))
        """Each worker's open channel (None while it has none: not started yet, or gone)."""
        self._last: dict[WorkerChannel, list[Metric]] = {}
        """The counts each open channel's worker last answered with."""
        self._ended: list[Metric] = []
        """The counts of every worker that has ended, added up."""

    def channel(self, index: int) -> WorkerChannel:
        """The parent's end of the channel of a new worker `index` (the pool asks at each start)."""
        channel = WorkerChannel(index, self._channel_lost)
        self._current[index] = channel
        return channel

    def _channel_lost(self, channel: WorkerChannel) -> None:
        counts = self._last.pop(channel, None)
        if counts:
            self._ended = merge([(None, self._ended), (None, counts)])
        if self._current.get(channel.index) is channel:
            self._current[channel.index] = None

    # --- what the admin site asks -------------------------------------------------------------------------------

    def metrics(self) -> Deferred[Collector]:
        """Every process's families, merged (see the module's rules), and `gateway_worker_up`."""
        return Deferred.fromCoroutine(self._metrics())

    def not_ready(self) -> Deferred[str | None]:
        """Why the gateway should get no traffic now (None: it should): twistd's reason, or the first worker's."""
        own = self._not_ready()
        if own is not None:
            return succeed(own)
        return Deferred.fromCoroutine(self._workers_not_ready())

    def upstreams(self) -> Deferred[object]:
        """Every process's view of its upstreams (each process has its own pools, ejections and health checks),
        by process: `{"workers": {"0": twistd's, "1": ...}}`, null for a worker that did not answer in time."""
        return Deferred.fromCoroutine(self._every_upstreams())

    def unhealthy(self) -> str | None:
        """A worker process that does not run (None: every one does)."""
        for index, channel in self._current.items():
            if channel is None:
                return f"worker {index} is not running"
        return None

    async def _metrics(self) -> Collector:
        answered: dict[WorkerChannel, list[Metric]] = {}

        def got(answer: bytes, channel: WorkerChannel) -> None:
            families = decode(answer)
            self._last[channel] = [family for family in families if merge_kind(family) == "count"]
            answered[channel] = families

        await self._ask_everyone(METRICS, got)
        # A worker that answered and has ended since: its counts are in those of the ended ones now.
        answered = {channel: families for channel, families in answered.items() if channel.open}
        parts: list[tuple[str | None, Iterable[Metric]]] = [("0", self._registry.collect())]
        for channel, families in sorted(answered.items(), key=lambda item: item[0].index):
            parts.append((str(channel.index), families))
        parts += [(None, counts) for channel, counts in self._last.items() if channel not in answered]
        parts.append((None, self._ended))
        up = GaugeMetricFamily(
            "gateway_worker_up",
            "1 when the process answered this scrape; 0 when it did not (not running, or no answer within "
            f"{self.timeout:g} s): its gauges are missing and its counts are those of its last answer.",
            labels=["worker"],
        )
        up.add_metric(["0"], 1)
        for index, current in self._current.items():
            up.add_metric([str(index)], int(current in answered))
        return _Families([*merge(parts), up])

    async def _every_upstreams(self) -> object:
        views: dict[str, object] = {"0": self._upstreams()}
        views.update((str(index), None) for index in self._current)

        def got(answer: bytes, channel: WorkerChannel) -> None:
            views[str(channel.index)] = json.loads(answer)

        await self._ask_everyone(UPSTREAMS, got)
        return {"workers": views}

    async def _workers_not_ready(self) -> str | None:
        answers: dict[WorkerChannel, bytes] = {}

        def got(answer: bytes, channel: WorkerChannel) -> None:
            answers[channel] = answer

        await self._ask_everyone(READY, got)
        for index, channel in self._current.items():
            if channel is None:
                return f"worker {index} is not running"
            answer = answers.get(channel)
            if answer is None:
                return f"worker {index} did not answer" if channel.answered else f"worker {index} is starting"
            if answer:
                return f"worker {index}: {answer.decode('utf-8', 'replace')}"
        return None

    async def _ask_everyone(self, question: bytes, got: Callable[[bytes, WorkerChannel], Any]) -> None:
        """Ask every worker with an open channel; `got` takes each answer that comes (a late one too: the
        wait is bounded, the answers are not dropped)."""
        asked = []
        for channel in self._current.values():
            if channel is not None:
                asked.append(channel.ask(question).addCallback(self._answered, got, channel))
        await within(self._clock, DeferredList(asked), self.timeout)

    def _answered(
        self, answer: bytes | None, got: Callable[[bytes, WorkerChannel], Any], channel: WorkerChannel
    ) -> None:
        if answer is None:
            return
        try:
            got(answer, channel)
        except (ValueError, TypeError):  # not JSON, or not families: a worker of another version?
            _log.failure("Unreadable answer from gateway worker {index}", index=channel.index)
