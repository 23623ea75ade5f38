"""Reading what a running gateway reports: its access-log file, line by line, and its admin listener (/metrics
parsed with prometheus_client's own parser), with bounded polls for both, since a request's line and its
metrics land when it ends, which may be a reactor turn after its client saw the last byte."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, task

from tests.support.clients import Parsed, connect, within
from tests.support.running import RunningGateway

WAIT = 10.0


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll `condition` every 10 ms until it holds; fail naming `what` after `timeout` seconds."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"not within {timeout} s: {what}")


# --- the access log -----------------------------------------------------------------------------------------


def log_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of an access-log file, each parsed as one JSON object (a line that is not one fails)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), f"the last line is unfinished: {text[-200:]!r}"
    return [json.loads(line) for line in text.splitlines()]


async def lines_logged(path: Path, count: int, timeout: float = WAIT) -> list[dict[str, Any]]:
    """The file's lines once there are at least `count` of them (bounded wait)."""
    await until(lambda: len(log_lines(path)) >= count, f"{count} access-log line(s) in {path}", timeout)
    return log_lines(path)


async def line_of(path: Path, request_id: str, timeout: float = WAIT) -> dict[str, Any]:
    """The one line logged for `request_id` (waited for); fails if there are two."""
    await until(
        lambda: any(line["request_id"] == request_id for line in log_lines(path)),
        f"a line for request {request_id}",
        timeout,
    )
    found = [line for line in log_lines(path) if line["request_id"] == request_id]
    assert len(found) == 1, found
    return found[0]


# --- the admin listener ---------------------------------------------------------------------------------------


def admin_port(gateway: RunningGateway) -> int:
    admin = gateway.service.admin
    assert admin is not None and admin.port is not None
    return int(admin.port.getHost().port)


async def admin_get(port: int, path: bytes, method: bytes = b"GET") -> Parsed:
    """One request to an admin listener on its own connection (closed once the response is in)."""
    client = await connect(port, keep_all=True)
    client.send(b"%s %s HTTP/1.1\r\nHost: admin.test\r\nConnection: close\r\n\r\n" % (method, path))
    await within(client.closed)
    return client.response(head_request=method == b"HEAD")


@dataclass(frozen=True)
class Scrape:
    """One /metrics scrape: every sample by name and labels."""

    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float]
    types: Mapping[str, str]
    """Each family's type, by family name."""

    def value(self, name: str, **labels: str) -> float | None:
        """The sample `name` with exactly these labels, or None if the scrape has none."""
        return self.samples.get((name, frozenset(labels.items())))

    def count(self, name: str, **labels: str) -> float:
        """A counter's (or histogram count's) value, 0 where the labelled child does not exist yet."""
        value = self.value(name, **labels)
        return 0.0 if value is None else value

    def labelled(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: value for (n, labels), value in self.samples.items() if n == name}


def parse_metrics(text: str) -> Scrape:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"sample {key} appears twice"
            samples[key] = sample.value
    return Scrape(samples, types)


async def scrape(port: int) -> Scrape:
    response = await admin_get(port, b"/metrics")
    assert response.status == 200, response
    assert response.complete
    assert (response.header(b"content-type") or b"").startswith(b"text/plain"), response.header(b"content-type")
    return parse_metrics(response.body.decode("utf-8"))


async def scraped_until(port: int, condition: Callable[[Scrape], bool], what: str, timeout: float = WAIT) -> Scrape:
    """Scrape every 10 ms until `condition` holds of a scrape, and return that one (bounded in count and time)."""
    deadline = reactor.seconds() + timeout
    current = await scrape(port)
    for _ in range(int(timeout / 0.01)):
        if condition(current) or reactor.seconds() > deadline:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
        current = await scrape(port)
    if condition(current):
        return current
    raise AssertionError(f"not within {timeout} s: {what}; last scrape: {dict(current.samples)}")
