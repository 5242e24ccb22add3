"""Chaos, short: a real training job under ``dvla up``; ``kill -9`` of a sampler mid-training.
The supervisor restarts it, it rejoins the hub under a new pid, picks up the learner's current
weight version, the learner keeps publishing versions, and after the job nothing is left in
``/dev/shm`` or the process table. (The long version is ``dvla bench chaos``.)"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from dvla_tools.bench._job import FAST_TRAINING, TrainingJob, write_training_topology
from tests.helpers import members_by_node, wait_for, wait_status

VICTIM = "sampler.h.1"


def _learner_version(status: Any) -> int:
    learner = members_by_node(status).get("learner.h.0")
    return learner.weight_version if learner is not None and learner.state != "dead" else -1


def test_killed_sampler_is_restarted_rejoins_and_catches_up(short_tmp: Path) -> None:
    topology = write_training_topology(
        short_tmp, samplers=2, learner={**FAST_TRAINING, "minutes": 5.0}
    )
    with TrainingJob(short_tmp, topology, grace=3.0, backoff_max=1.0) as job:

        def warm(st: Any) -> bool:
            rows = members_by_node(st)
            return _learner_version(st) >= 2 and all(
                rows.get(f"sampler.h.{i}") is not None
                and rows[f"sampler.h.{i}"].weight_version >= 1
                for i in range(2)
            )

        before = wait_status(job.endpoint, warm, timeout=80, what="training to start")
        old_pid = job.nodes()[VICTIM].pid
        assert members_by_node(before)[VICTIM].pid == old_pid
        version_at_kill = _learner_version(before)
        os.kill(old_pid, signal.SIGKILL)

        # The supervisor starts a new process for the node...
        wait_for(
            lambda: VICTIM in job.nodes() and job.nodes()[VICTIM].pid != old_pid,
            timeout=20,
            what="the supervisor to restart the sampler",
        )
        new_pid = job.nodes()[VICTIM].pid
        # ... which rejoins the hub under its new pid and reports the current weight version,
        # while the learner keeps publishing new ones.
        after = wait_status(
            job.endpoint,
            lambda st: (
                (m := members_by_node(st).get(VICTIM)) is not None
                and m.pid == new_pid
                and m.state == "running"
                and m.weight_version >= version_at_kill
            ),
            timeout=40,
            what="the restarted sampler to rejoin with the current weights",
        )
        assert members_by_node(after)[VICTIM].weight_version >= 1
        wait_status(
            job.endpoint,
            lambda st: _learner_version(st) >= version_at_kill + 3,
            timeout=30,
            what="the learner to keep publishing versions",
        )
        assert job.nodes()["learner.h.0"].pid == members_by_node(before)["learner.h.0"].pid
        job.stop()
    assert f"{VICTIM} died (signal 9)" in job.output()
    assert job.shm_segments() == []
    assert job.orphans() == []
