"""What the harness measures of a peer's processes: RSS and CPU time from /proc, summed over the process tree."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SAMPLE_EVERY = 0.1  # seconds


def tree(pid: int, _depth: int = 0) -> list[int]:
    """`pid` and its descendants (through /proc/PID/task/TID/children)."""
    pids = [pid]
    if _depth > 8:
        return pids
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                    pids.extend(tree(int(child), _depth + 1))
    return pids


def rss_bytes(pid: int) -> int:
    """Resident set size of the process tree of `pid` (from /proc/PID/statm)."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
    return total


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process tree of `pid` (from /proc/PID/stat)."""
    total = 0.0
    for p in tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


class RssSampler:
    """Samples a process tree's RSS every 100 ms on a thread, from `start()` until `stop()`.

    The baseline is the RSS at `start()`, taken after the peer's warm-up request; the growth is the peak over
    the samples minus that baseline.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = 0
        self.peak = 0
        self.samples: list[tuple[float, int]] = []  # (seconds since start, RSS bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = 0.0

    def start(self) -> RssSampler:
        self._t0 = time.monotonic()
        self.baseline = self.peak = rss_bytes(self.pid)
        self.samples.append((0.0, self.baseline))
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            rss = rss_bytes(self.pid)
            if rss == 0:  # the process is gone
                break
            self.samples.append((time.monotonic() - self._t0, rss))
            self.peak = max(self.peak, rss)

    def stop(self) -> int:
        """Stops sampling; returns the peak growth in bytes."""
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak - self.baseline

    def growth_series(self) -> list[tuple[float, float]]:
        """(seconds, RSS growth in MiB) for the plots."""
        return [(round(t, 2), round((rss - self.baseline) / 2**20, 3)) for t, rss in self.samples]
