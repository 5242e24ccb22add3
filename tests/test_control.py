"""The control bus with real node processes started through the CLI: membership, heartbeats,
death detection after kill -9, command broadcast, the version table and hub restarts."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dvla_bus import wire
from tests.helpers import (
    Job,
    dvla,
    hub_send,
    members_by_node,
    wait_status,
)


@pytest.fixture
def job(short_tmp: Path) -> Iterator[Job]:
    j = Job(short_tmp)
    try:
        yield j
    finally:
        j.close()


ALL = {"coordinator.h.0", "producer.h.0", "producer.h.1", "consumer.h.0"}


def start_all(job: Job) -> Any:
    job.start("coordinator")
    job.start("producer", 0)
    job.start("producer", 1)
    job.start("consumer")
    return wait_status(
        job.endpoint,
        lambda st: {m.node for m in st.members if m.state == "running"} == ALL,
        what="all four nodes running",
    )


def test_membership_heartbeats_and_data_flow(job: Job) -> None:
    status = start_all(job)
    members = members_by_node(status)
    assert members["producer.h.1"].pid == job.procs["producer.h.1"].pid
    assert members["consumer.h.0"].endpoints["data"].startswith("ipc://")
    # Heartbeats keep coming and carry the nodes' statistics: data flows producer -> consumer.
    status = wait_status(
        job.endpoint,
        lambda st: members_by_node(st)["consumer.h.0"].counters.get("received", 0) > 20,
        what="consumer receiving",
    )
    consumer = members_by_node(status)["consumer.h.0"]
    assert consumer.counters["bad"] == 0
    assert consumer.counters["producers"] == 2
    assert consumer.counters["via_shm"] == consumer.counters["received"]  # one host: shm path
    assert all(m.heartbeat_age < 1.5 for m in status.members)


def test_kill_9_is_detected_and_announced(job: Job) -> None:
    start_all(job)
    job.procs["producer.h.1"].send_signal(signal.SIGKILL)
    job.procs["producer.h.1"].wait()
    status = wait_status(
        job.endpoint,
        lambda st: members_by_node(st)["producer.h.1"].state == "dead",
        what="hub to declare producer.h.1 dead",
    )
    assert status.counters["deaths"] == 1
    others = {m.node: m.state for m in status.members if m.node != "producer.h.1"}
    assert set(others.values()) == {"running"}
    # The restarted node rejoins under its stable name.
    job.start("producer", 1)
    wait_status(
        job.endpoint,
        lambda st: members_by_node(st)["producer.h.1"].state == "running",
        what="producer.h.1 to rejoin",
    )


def test_commands_reach_their_targets(job: Job) -> None:
    start_all(job)
    hub_send(job.endpoint, wire.Command(command="pause", target="role:producer"))
    wait_status(
        job.endpoint,
        lambda st: (
            {m.node: m.state for m in st.members}
            == {
                "coordinator.h.0": "running",
                "consumer.h.0": "running",
                "producer.h.0": "paused",
                "producer.h.1": "paused",
            }
        ),
        what="producers paused, others running",
    )
    hub_send(job.endpoint, wire.Command(command="resume"))
    wait_status(
        job.endpoint,
        lambda st: all(m.state == "running" for m in st.members),
        what="all running after resume",
    )
    hub_send(job.endpoint, wire.Command(command="stop", target="consumer.h.0"))
    assert job.procs["consumer.h.0"].wait(timeout=10) == 0
    status = wait_status(
        job.endpoint,
        lambda st: "consumer.h.0" not in members_by_node(st),
        what="consumer to leave",
    )
    assert status.counters["leaves"] == 1
    assert "stop command" in job.log("consumer.h.0")


def test_version_announcements_fill_the_version_table(job: Job) -> None:
    start_all(job)
    hub_send(job.endpoint, wire.VersionAnnounce(version=7, digest="00", nbytes=1))
    status = wait_status(
        job.endpoint,
        lambda st: (
            {m.node: m.weight_version for m in st.members if m.role != "coordinator"}
            == {"producer.h.0": 7, "producer.h.1": 7, "consumer.h.0": 7}
        ),
        what="every data node reporting version 7",
    )
    assert status.latest_version == 7


def test_nodes_rejoin_a_restarted_hub(job: Job) -> None:
    first = start_all(job)
    hub = job.procs["coordinator.h.0"]
    hub.send_signal(signal.SIGKILL)
    hub.wait()
    job.start("coordinator")
    status = wait_status(
        job.endpoint,
        lambda st: (
            st.epoch != first.epoch and {m.node for m in st.members if m.state == "running"} == ALL
        ),
        what="every node rejoined the new hub",
    )
    assert status.counters["joins"] >= 4
    # The nodes never stopped: same pids as before the hub died.
    assert all(job.procs[m.node].poll() is None for m in status.members)


def test_bus_list_shows_the_nodes(job: Job) -> None:
    start_all(job)
    proc = dvla("bus", "list", "--control", job.endpoint, "--json", check=True)
    doc = json.loads(proc.stdout)
    assert {m["node"] for m in doc["members"]} == ALL
    table = dvla("bus", "list", "--control", job.endpoint, check=True).stdout
    assert "producer.h.1" in table
    assert "running" in table


def test_sigterm_stops_a_node_cleanly(job: Job) -> None:
    start_all(job)
    job.procs["producer.h.0"].send_signal(signal.SIGTERM)
    assert job.procs["producer.h.0"].wait(timeout=10) == 0
    wait_status(
        job.endpoint,
        lambda st: "producer.h.0" not in members_by_node(st),
        what="producer.h.0 to leave",
    )
