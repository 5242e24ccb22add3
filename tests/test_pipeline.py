"""The distributed training pipeline: learner and sampler as separate processes under
``dvla up``; versions advance through the weight pool, stale groups are dropped and counted,
the learner ends the job, and the lanes' trace is merged with utilisation and overlap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dvla_nodes.learn.rollout import Episodes
from dvla_nodes.pipeline import episodes_from_arrays, episodes_to_arrays, train_config
from tests.helpers import spawn, stop


def test_episodes_round_trip_through_message_arrays() -> None:
    rng = np.random.default_rng(0)
    t, e = 7, 2
    ep = Episodes(
        images=rng.integers(0, 255, (t, 8, 8, 3), dtype=np.uint8),
        proprio=rng.random((t, 5), dtype=np.float32),
        state=rng.random((t, 6), dtype=np.float32),
        tokens=rng.integers(0, 255, (t, 4)),
        logp=rng.random((t, 4), dtype=np.float32),
        episode=np.array([0, 0, 0, 1, 1, 1, 1], dtype=np.int32),
        tasks=("reach-red", "push-blue-yellow"),
        seeds=np.array([3, 4]),
        instructions=("reach the red block", "push the blue block to the yellow square"),
        success=np.array([True, False]),
        length=np.array([3, 4]),
        shaping=np.array([0.1, -0.2], dtype=np.float32),
        version=np.array([5, 5]),
        group=np.array([0, 0]),
    )
    meta, arrays = episodes_to_arrays(ep)
    assert meta["version"] == 5
    back = episodes_from_arrays(meta, arrays)
    assert back.tasks == ep.tasks
    assert back.instructions == ep.instructions
    assert back.success.dtype == np.bool_
    for name in ("images", "proprio", "tokens", "logp", "episode", "seeds", "version"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ep, name))
    assert e == back.num_episodes


def test_train_config_from_topology_settings() -> None:
    cfg = train_config(
        {"group_size": 4, "minutes": "0.5", "tasks": "reach-red, reach-blue", "watchdog_s": 30.0}
    )
    assert cfg.group_size == 4
    assert cfg.minutes == 0.5
    assert cfg.tasks == ("reach-red", "reach-blue")


def test_learner_and_sampler_train_as_separate_processes(short_tmp: Path) -> None:
    topo = short_tmp / "t.toml"
    topo.write_text(
        f"""schema = 1
name = "pipe"
[control]
endpoint = "ipc://{short_tmp}/c.sock"
heartbeat_timeout_s = 10.0
[[hosts]]
name = "h"
roles = {{ coordinator = 1, learner = 1, sampler = 1 }}
[roles.learner]
tasks = "reach-red,reach-blue"
demos_per_task = 2
bc_epochs = 1
group_size = 4
groups_per_iter = 1
minutes = 0.4
eval_seeds = 1
max_version_lag = 1
"""
    )
    up = spawn(
        ["up", str(topo), "--run-dir", str(short_tmp), "--status-every", "0"], short_tmp / "up.out"
    )
    try:
        assert up.wait(timeout=150) == 0, (short_tmp / "up.out").read_text()[-3000:]
    finally:
        stop(up)
    out = (short_tmp / "up.out").read_text()
    assert "learner.h.0 finished" in out
    assert "sampler.h.0 finished" in out
    records = [json.loads(line) for line in (short_tmp / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) >= 2, records
    assert train[-1]["version"] > train[0]["version"] >= 2
    assert all(r["lag_max"] <= 1 for r in train)  # admitted groups respect the staleness bound
    assert records[-1]["kind"] == "final"
    lanes = json.loads((short_tmp / "lanes.json").read_text())
    assert {"gradient", "distribution", "sampling", "inference"} <= set(lanes["utilisation"])
    assert 0.0 <= lanes["overlap"] <= 1.0
    assert (short_tmp / "trace.json").exists()
    json.loads((short_tmp / "final.json").read_text())  # checkpoint metadata is JSON
    assert (short_tmp / "final.safetensors").exists()
    assert "trace.json written" in out
