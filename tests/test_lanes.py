"""Lane traces: utilisation per lane and the overlap fraction across processes."""

from __future__ import annotations

from typing import Any

import pytest

from dvla_bus.lanes import merge_traces, summarize_trace


def _x(pid: int, name: str, start_s: float, dur_s: float) -> dict[str, Any]:
    return {"ph": "X", "name": name, "pid": pid, "tid": 1, "ts": start_s * 1e6, "dur": dur_s * 1e6}


def test_overlap_counts_processes_not_nested_lanes() -> None:
    sampler = [_x(1, "sampling", 0.0, 10.0), _x(1, "inference", 1.0, 2.0)]  # nested: same process
    learner = [_x(2, "gradient", 8.0, 4.0)]  # 8..12, overlaps sampling on 8..10
    doc = merge_traces([sampler, learner])
    summary = summarize_trace(doc)
    assert summary["span_s"] == pytest.approx(12.0)
    assert summary["overlap"] == pytest.approx(2.0 / 12.0)
    assert summary["utilisation"]["sampling"] == pytest.approx(10.0 / 12.0)
    assert summary["utilisation"]["inference"] == pytest.approx(2.0 / 12.0)


def test_empty_trace() -> None:
    assert summarize_trace({"traceEvents": []})["overlap"] == 0.0
