"""``dvla bus`` against a live multi-process deployment: list with topics, echo, hz, bw, lag,
top, record -> info -> replay (byte-identical payloads), trace; taps cost nothing unlisted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dvla_bus import wire
from dvla_bus.bag import BagReader, bag_files
from tests.helpers import Job, dvla, hub_send, members_by_node, spawn, wait_status

ALL = {"coordinator.h.0", "producer.h.0", "producer.h.1", "consumer.h.0"}


@pytest.fixture
def job(short_tmp: Path) -> Iterator[Job]:
    j = Job(short_tmp)
    try:
        for role, index in (("coordinator", 0), ("producer", 0), ("producer", 1), ("consumer", 0)):
            j.start(role, index)
        wait_status(
            j.endpoint,
            lambda st: (
                {m.node for m in st.members if m.state == "running"} == ALL
                and members_by_node(st)["consumer.h.0"].counters.get("received", 0) > 10
            ),
            what="the job running and data flowing",
        )
        yield j
    finally:
        j.close()


def bus(job: Job, *args: str, timeout: float = 60) -> Any:
    proc = dvla("bus", *args, "--control", job.endpoint, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_taps_cost_nothing_until_someone_listens_then_echo_hz_bw(job: Job) -> None:
    status = wait_status(job.endpoint, lambda st: True)
    consumer = members_by_node(status)["consumer.h.0"]
    assert consumer.counters["rx.tap_sent"] == 0  # nobody listened yet: nothing was copied

    lines = bus(job, "echo", "obs", "--count", "5", "--json").stdout.splitlines()
    assert len(lines) == 5
    first = json.loads(lines[0])
    assert first["topic"] == "obs"
    assert first["header"]["sender"].startswith("producer.h.")
    assert first["arrays"]["image"].startswith("uint8[8,8,3]")
    assert first["arrays"]["proprio"].startswith("float32[8]")

    filtered = bus(
        job, "echo", "obs", "--count", "3", "--json", "--filter", "sender=producer.h.1"
    ).stdout.splitlines()
    assert {json.loads(x)["header"]["sender"] for x in filtered} == {"producer.h.1"}

    hz = json.loads(bus(job, "hz", "obs", "--duration", "3", "--json").stdout)
    assert 40 < hz["rate_hz"] < 250  # two producers at 50 Hz; loose on a shared machine
    bw = json.loads(bus(job, "bw", "obs", "--duration", "2", "--json").stdout)
    assert bw["bytes_per_s"] > 0
    assert bw["min_bytes"] > 8 * 8 * 3


def test_list_lag_and_top(job: Job) -> None:
    doc = json.loads(bus(job, "list", "--json").stdout)
    assert doc["topics"]["obs"]["subscribers"] == ["consumer.h.0"]
    assert sorted(doc["topics"]["obs"]["publishers"]) == ["producer.h.0", "producer.h.1"]

    hub_send(job.endpoint, wire.VersionAnnounce(version=3))
    wait_status(
        job.endpoint,
        lambda st: all(m.weight_version == 3 for m in st.members if m.role != "coordinator"),
    )
    lag = json.loads(bus(job, "lag", "--json").stdout)
    assert lag["latest_version"] == 3
    assert {r["node"]: r["lag"] for r in lag["nodes"] if r["role"] != "coordinator"} == {
        "producer.h.0": 0,
        "producer.h.1": 0,
        "consumer.h.0": 0,
    }

    top = json.loads(bus(job, "top", "--once", "--json", "--sort", "rate").stdout)
    assert {r["node"] for r in top["nodes"]} == ALL
    consumer = next(r for r in top["nodes"] if r["node"] == "consumer.h.0")
    assert "consume" in consumer["lanes"]


def test_record_info_replay_byte_identical(job: Job) -> None:
    first = job.root / "rec"
    bus(job, "record", str(first), "obs", "--count", "20")
    info = json.loads(dvla("bus", "info", str(first), "--json", check=True).stdout)
    assert info["messages"] == 20
    # Quiet the live producers so the second recording holds only the replayed messages.
    hub_send(job.endpoint, wire.Command(command="pause", target="role:producer"))
    wait_status(
        job.endpoint,
        lambda st: (
            all(m.state == "paused" for m in st.members if m.role == "producer")
            and tap_topics(st) == 0
        ),
        what="producers paused and the first recorder gone",
    )
    second = job.root / "again"
    recorder = spawn(
        ["bus", "record", str(second), "obs", "--count", "20", "--control", job.endpoint],
        job.root / "recorder.log",
    )
    try:
        # Replay only once the recorder's subscription has reached the consumer's tap.
        wait_status(job.endpoint, lambda st: tap_topics(st) == 1, what="recorder subscribed")
        bus(job, "replay", str(first), "--rate", "0", "--to", "consumer.h.0")
        assert recorder.wait(timeout=30) == 0
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait()
    original = [r.frames[2:] for r in BagReader(bag_files(str(first)))]
    replayed = [r.frames[2:] for r in BagReader(bag_files(str(second)))]
    assert len(replayed) == 20
    assert [[bytes(f) for f in fr] for fr in replayed] == [
        [bytes(f) for f in fr] for fr in original
    ]


def tap_topics(status: Any) -> int:
    return int(members_by_node(status)["consumer.h.0"].counters.get("rx.tap_topics", -1))


def test_trace_collects_lane_intervals(job: Job) -> None:
    out = job.root / "trace.json"
    proc = dvla(
        "bus",
        "trace",
        "--control",
        job.endpoint,
        "--run-dir",
        str(job.root),
        "-o",
        str(out),
        check=True,
    )
    assert "4 node(s)" in proc.stdout
    doc = json.loads(out.read_text())
    names = {e["name"] for e in doc["traceEvents"] if e["ph"] == "X"}
    assert {"produce", "consume"} <= names
