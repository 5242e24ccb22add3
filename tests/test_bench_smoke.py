"""Benchmarks run and write well-formed JSON (``--quick``). Timings are never asserted here;
BENCHMARKS.md holds the measured numbers."""

from __future__ import annotations

import json
from pathlib import Path

from dvla_tools.bench.bus import CASES
from tests.helpers import dvla


def test_bench_bus_quick_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bus.json"
    proc = dvla("bench", "bus", "--quick", "--sizes", "64,1048576", "--json", str(out), timeout=180)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["machine"]["cores"] >= 1
    names = {(c["name"], c["payload_bytes"]) for c in doc["cases"]}
    assert names == {(case, size) for case in CASES for size in (64, 1048576)}
    for case in doc["cases"]:
        assert set(case) >= {"name", "transport", "payload_bytes", "gbps", "msgs_per_s"}
        assert case["gbps"] > 0
        assert case["msgs_per_s"] > 0
    assert set(doc["ratios"]) == set(doc["targets"])


def test_bench_control_quick_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "control.json"
    proc = dvla("bench", "control", "--pings", "50", "--json", str(out), timeout=180)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert [c["name"] for c in doc["cases"]] == [
        "idle",
        "dvla-shm-load",
        "dvla-tcp-load",
        "same-socket",
    ]
    for case in doc["cases"]:
        assert case["pings"] == 50
        assert 0 < case["p50_ms"] <= case["p99_ms"] <= case["max_ms"]
    assert set(doc["checks"]) >= set(doc["targets"])
