"""Swimlane busy intervals: each lane (sampling, inference, gradient, distribution, ...) records
when it is busy, so utilisation and overlap can be measured and drawn as a Perfetto trace.

A :class:`Lanes` recorder keeps the last ``capacity`` intervals per process in a preallocated
ring (no allocation per interval beyond the float pair) and cumulative busy time per lane.
``with lanes.busy("inference"):`` marks an interval; :meth:`Lanes.chrome_trace` returns Chrome
trace-event JSON (the format Perfetto and ``chrome://tracing`` open). Times are
``time.time()`` seconds, so traces from several processes on synchronised clocks line up.
Not thread-safe across threads writing the same lane (one lane per thread or task is the model).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["LaneStats", "Lanes", "merge_traces", "summarize_trace"]


@dataclass(frozen=True, slots=True)
class LaneStats:
    """Busy seconds per lane since start, and the fraction of wall time each was busy."""

    wall: float
    busy: dict[str, float]

    def utilisation(self) -> dict[str, float]:
        return {k: (v / self.wall if self.wall > 0 else 0.0) for k, v in self.busy.items()}


class Lanes:
    """Busy-interval recorder for one process (see the module docstring)."""

    def __init__(self, process: str, capacity: int = 100_000) -> None:
        self.process = process
        self.capacity = capacity
        self._lane: list[str] = [""] * capacity
        self._start = [0.0] * capacity
        self._end = [0.0] * capacity
        self._next = 0
        self._count = 0
        self._busy: dict[str, float] = {}
        self._t0 = time.time()
        # Lanes inside a busy interval right now -> when it began (read by the watchdog thread;
        # single dict operations are atomic under the GIL).
        self.open: dict[str, float] = {}

    def record(self, lane: str, start: float, end: float) -> None:
        i = self._next
        self._lane[i], self._start[i], self._end[i] = lane, start, end
        self._next = (i + 1) % self.capacity
        self._count = min(self._count + 1, self.capacity)
        self._busy[lane] = self._busy.get(lane, 0.0) + (end - start)

    @contextlib.contextmanager
    def busy(self, lane: str) -> Iterator[None]:
        start = time.time()
        self.open[lane] = start
        try:
            yield
        finally:
            self.open.pop(lane, None)
            self.record(lane, start, time.time())

    def stuck(self, limit: float, now: float | None = None) -> list[tuple[str, float]]:
        """Lanes busy without a break for more than ``limit`` seconds: (lane, seconds)."""
        t = time.time() if now is None else now
        return [(lane, t - since) for lane, since in list(self.open.items()) if t - since > limit]

    def statistics(self) -> LaneStats:
        return LaneStats(wall=time.time() - self._t0, busy=dict(self._busy))

    def intervals(self) -> list[tuple[str, float, float]]:
        """Recorded intervals, oldest first (at most ``capacity``)."""
        start = (self._next - self._count) % self.capacity
        idx = [(start + k) % self.capacity for k in range(self._count)]
        return [(self._lane[i], self._start[i], self._end[i]) for i in idx]

    def chrome_trace(self) -> list[dict[str, Any]]:
        """Chrome trace events: one complete ("X") event per interval, one thread per lane."""
        pid = os.getpid()
        lanes = sorted({lane for lane, _, _ in self.intervals()} | set(self._busy))
        tid = {lane: k + 1 for k, lane in enumerate(lanes)}
        events: list[dict[str, Any]] = [
            {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": self.process}}
        ]
        events += [
            {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid[lane], "args": {"name": lane}}
            for lane in lanes
        ]
        events += [
            {
                "ph": "X",
                "name": lane,
                "pid": pid,
                "tid": tid[lane],
                "ts": start * 1e6,
                "dur": (end - start) * 1e6,
            }
            for lane, start, end in self.intervals()
        ]
        return events


def merge_traces(parts: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """One Perfetto-loadable document from several processes' events."""
    return {"traceEvents": [e for part in parts for e in part], "displayTimeUnit": "ms"}


def summarize_trace(doc: dict[str, Any]) -> dict[str, Any]:
    """Per-lane utilisation (busy fraction of the traced span) and the overlap fraction: the
    share of the span during which lanes of two or more *processes* were busy at once (a
    sampler's inference runs nested inside its sampling lane, so same-process nesting is not
    counted as overlap)."""
    events = [e for e in doc.get("traceEvents", []) if e.get("ph") == "X"]
    if not events:
        return {"span_s": 0.0, "utilisation": {}, "overlap": 0.0}
    start = min(e["ts"] for e in events)
    end = max(e["ts"] + e["dur"] for e in events)
    span = max(end - start, 1e-9)
    busy: dict[str, float] = {}
    for e in events:
        busy[e["name"]] = busy.get(e["name"], 0.0) + e["dur"]
    # Sweep the interval end points: time with >= 2 *processes* having an open interval.
    points = sorted(
        [(e["ts"], 1, e.get("pid", 0)) for e in events]
        + [(e["ts"] + e["dur"], -1, e.get("pid", 0)) for e in events]
    )
    open_by_process: dict[int, int] = {}
    overlap = 0.0
    last = start
    for t, delta, pid in points:
        if sum(1 for n in open_by_process.values() if n > 0) >= 2:
            overlap += t - last
        last = t
        open_by_process[pid] = open_by_process.get(pid, 0) + delta
    return {
        "span_s": span / 1e6,
        "utilisation": {k: v / span for k, v in sorted(busy.items())},
        "overlap": overlap / span,
    }
