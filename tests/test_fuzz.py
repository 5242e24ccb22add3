"""``dvla bench fuzz`` against a live deployment: thousands of hostile messages at the hub and at
an inbox, every one counted under the reason the reference decoder predicts, nobody crashes,
data keeps flowing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from dvla_tools.bench.fuzz import generate
from tests.helpers import Job, dvla, members_by_node, wait_status


def test_generated_messages_are_all_invalid_and_reproducible() -> None:
    first, reasons = generate(2000, 7, hub=True)
    again, _ = generate(2000, 7, hub=True)
    assert first == again
    assert sum(reasons.values()) == 2000
    assert {"msgpack", "schema", "frames", "kind", "version", "topic"} <= set(reasons)


@pytest.fixture
def job(short_tmp: Path) -> Iterator[Job]:
    j = Job(short_tmp)
    try:
        for role, index in (("coordinator", 0), ("producer", 0), ("consumer", 0)):
            j.start(role, index)
        wait_status(
            j.endpoint,
            lambda st: (
                members_by_node(st).get("consumer.h.0") is not None
                and members_by_node(st)["consumer.h.0"].counters.get("received", 0) > 5
            ),
            what="data flowing",
        )
        yield j
    finally:
        j.close()


def test_fuzzing_a_live_job(job: Job, tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    proc = dvla(
        "bench",
        "fuzz",
        "--control",
        job.endpoint,
        "--count",
        "5000",
        "--json",
        str(out),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["ok"]
    assert doc["crashed_or_restarted"] == []
    assert [t["target"] for t in doc["targets"]] == ["hub", "consumer.h.0"]
    for target in doc["targets"]:
        assert target["sent"] == 5000
        assert target["counted"] == target["expected"]
    assert doc["data_still_flowing"]["consumer.h.0"] > 0
    assert all(p.poll() is None for p in job.procs.values())
