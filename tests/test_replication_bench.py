"""``dvla bench replicate --quick`` runs and writes well-formed JSON. Timings are never asserted
here; BENCHMARKS.md holds the measured numbers."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import dvla


def test_bench_replicate_quick_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "replicate.json"
    proc = dvla(
        "bench", "replicate", "--quick", "--size", str(2 << 20), "--reps", "1",
        "--readers", "1,2", "--no-gloo", "--no-netns", "--json", str(out),
        timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["bench"] == "replicate"
    assert doc["machine"]["cores"] >= 1
    readers = {(c["name"], c["readers"]) for c in doc["cases"]}
    assert readers == {(n, k) for n in ("dvla", "dvla+read") for k in (1, 2)}
    for case in doc["cases"]:
        assert case["payload_bytes"] == 2 << 20
        assert case["median_s"] > 0
    assert doc["ratios"]["same_host_k8_over_k1"] > 0
    assert set(doc["targets"]) >= {"same_host_k8_over_k1", "tree_over_bound", "tree_over_plan"}
    assert doc["skipped"] == {"netns": "--no-netns"}
