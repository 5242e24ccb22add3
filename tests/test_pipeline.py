"""The distributed training pipeline: learner and sampler as separate processes under
``dvla up``; versions advance through the weight pool, stale groups are dropped and counted,
the learner ends the job, and the lanes' trace is merged with utilisation and overlap."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dvla_bus.errors import ConfigError
from dvla_nodes.learn.config import TrainConfig
from dvla_nodes.learn.rollout import Episodes
from dvla_nodes.pipeline import (
    episodes_from_arrays,
    episodes_to_arrays,
    train_config,
    training_seed,
    update_threads,
)
from tests.helpers import dvla, hub_status, members_by_node, spawn, stop, wait_for

CHEETAH = "HalfCheetah-v5"


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


def test_groups_from_different_samplers_stay_separate_groups() -> None:
    """The learner concatenates groups that each sampler numbered 0: GRPO must still normalise
    advantages within each group, never across tasks (a bug once made 8 groups one)."""

    def group(task: str, n: int) -> Episodes:
        return Episodes(
            images=np.zeros((n, 2, 2, 3), np.uint8),
            proprio=np.zeros((n, 1), np.float32),
            state=np.zeros((n, 1), np.float32),
            tokens=np.zeros((n, 4), np.int64),
            logp=np.zeros((n, 4), np.float32),
            episode=np.arange(n, dtype=np.int32),
            tasks=(task,) * n,
            seeds=np.zeros(n, np.int64),
            instructions=(task,) * n,
            success=np.zeros(n, bool),
            length=np.ones(n, np.int64),
            shaping=np.zeros(n, np.float32),
            version=np.ones(n, np.int64),
            group=np.zeros(n, np.int64),
        )

    batch = Episodes.concat([group("reach-red", 3), group("push-blue-yellow", 2), group("a", 1)])
    assert batch.group.tolist() == [0, 0, 0, 1, 1, 2]
    assert batch.episode.tolist() == [0, 1, 2, 3, 4, 5]


def test_sampler_training_seeds_never_reach_demo_or_held_out_seeds() -> None:
    from dvla_nodes.learn.config import DEMO_SEED_BASE

    seeds = {
        training_seed(s, i, k) for s in (0, 7) for i in range(64) for k in range(0, 10**6, 997)
    }
    assert max(seeds) < DEMO_SEED_BASE
    assert training_seed(0, 0, 1) != training_seed(0, 1, 1)


def test_train_config_from_topology_settings() -> None:
    cfg = train_config(
        {"group_size": 4, "minutes": "0.5", "tasks": "reach-red, reach-blue", "watchdog_s": 30.0}
    )
    assert cfg.group_size == 4
    assert cfg.minutes == 0.5
    assert cfg.tasks == ("reach-red", "reach-blue")


def _write_topology(tmp: Path, name: str, roles: str, tables: str) -> Path:
    """A one-host job topology ``tmp/<name>.toml``: control over ipc in ``tmp``, then
    ``tables`` (the roles' settings)."""
    topo = tmp / f"{name}.toml"
    topo.write_text(
        f"""schema = 1
name = "{name}"
[control]
endpoint = "ipc://{tmp}/c.sock"
heartbeat_timeout_s = 10.0
[[hosts]]
name = "h"
roles = {{ {roles} }}
{tables}
"""
    )
    return topo


def _pipeline_topology(
    tmp: Path, extra: str = "", roles: str = "coordinator = 1, learner = 1, sampler = 1"
) -> Path:
    return _write_topology(
        tmp,
        "pipe",
        roles,
        f"""[roles.learner]
tasks = "reach-red,reach-blue"
demos_per_task = 2
bc_epochs = 1
group_size = 4
groups_per_iter = 1
eval_seeds = 1
final_eval_seeds = 1
max_version_lag = 1
{extra}""",
    )


def test_learner_and_sampler_train_as_separate_processes(short_tmp: Path) -> None:
    # The sampler rolls out two groups together (one policy batch) and sends each on its own;
    # the learner clones with 2 torch threads and updates with 1.
    topo = _pipeline_topology(
        short_tmp,
        "minutes = 0.4\neval_every = 3\nupdate_threads = 1\n[roles.sampler]\nrollout_groups = 2",
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
    # The learner's demonstrations and evaluations: one iteration's groups (4 x 1) over
    # env_workers (default 2) processes, as the serial trainer steps them.
    log = (short_tmp / "logs" / "learner.h.0.log").read_text()
    assert "4 environment(s) over 2 process(es) for demonstrations" in log, log[-3000:]
    assert "GRPO updates with 1 torch thread(s) (warm start: 2)" in log, log[-3000:]
    records = [json.loads(line) for line in (short_tmp / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) >= 2, records
    assert train[-1]["version"] > train[0]["version"] >= 2
    assert all(r["lag_max"] <= 1 for r in train)  # admitted groups respect the staleness bound
    assert all(0 <= r["lag_mean"] <= r["lag_max"] for r in train)
    # the serial trainer's per-update statistics, so the two trainers can be compared
    assert all(
        0.0 <= r["clip_fraction"] <= 1.0 and r["trained_steps"] > 0 for r in train if r["updated"]
    )
    assert all(r["groups"] == 1 for r in train)  # groups_per_iter = 1: one group per message
    assert records[-1]["kind"] == "final"
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals
    assert evals[0]["version"] == 1  # the warm start's evaluation
    assert (short_tmp / "success.png").stat().st_size > 1000
    lanes = json.loads((short_tmp / "lanes.json").read_text())
    assert {"gradient", "distribution", "sampling", "inference"} <= set(lanes["utilisation"])
    assert 0.0 <= lanes["overlap"] <= 1.0
    assert (short_tmp / "trace.json").exists()
    json.loads((short_tmp / "final.json").read_text())  # checkpoint metadata is JSON
    assert (short_tmp / "final.safetensors").exists()
    warm = json.loads((short_tmp / "warmstart.json").read_text())  # the cloned policy, kept
    assert (warm["step"], warm["version"]) == (0, 1)
    assert "trace.json written" in out


def _evidence(run_dir: Path, endpoint: str) -> str:
    """What a hung job's failure message shows: the hub's members (if it still answers), the
    supervisor's output and every node log's tail."""
    try:
        hub: object = members_by_node(hub_status(endpoint, timeout=3.0))
    except Exception as exc:  # the hub may be gone: report that, not a second error
        hub = f"no answer ({exc})"
    parts = [f"hub: {hub}"]
    for path in [run_dir / "up.out", *sorted((run_dir / "logs").glob("*.log"))]:
        with contextlib.suppress(OSError):
            parts.append(f"--- {path.name} ---\n{path.read_text()[-2500:]}")
    return "\n".join(parts)


def test_killed_learner_resumes_from_its_last_checkpoint(short_tmp: Path) -> None:
    """kill -9 the learner mid-run: the supervisor restarts it, it loads ``latest`` (no second
    warm start), version numbers keep rising past every version published before the kill,
    and the job still ends with a final checkpoint."""
    topo = _pipeline_topology(
        short_tmp, "minutes = 5.0\niterations = 12\ncheckpoint_every = 1\neval_every = 0"
    )
    up = spawn(
        ["up", str(topo), "--run-dir", str(short_tmp), "--status-every", "0", "--backoff-max", "1"],
        short_tmp / "up.out",
    )
    endpoint = f"ipc://{short_tmp}/c.sock"
    try:

        def trained_twice() -> bool:
            path = short_tmp / "latest.json"
            return path.exists() and json.loads(path.read_text())["step"] >= 2

        wait_for(trained_twice, timeout=90, what="two GRPO iterations checkpointed")
        status = hub_status(endpoint)
        learner = members_by_node(status)["learner.h.0"]
        before = status.latest_version
        os.kill(learner.pid, signal.SIGKILL)

        def restarted() -> bool:
            m = members_by_node(hub_status(endpoint)).get("learner.h.0")
            return m is not None and m.pid != learner.pid and m.state == "running"

        wait_for(restarted, timeout=60, what="the learner restarted and rejoined")
        try:
            code = up.wait(timeout=45)  # ~10 s normally; fail with the evidence, not a timeout
        except subprocess.TimeoutExpired:
            evidence = _evidence(short_tmp, endpoint)
            pytest.fail(f"the job did not finish after the learner's restart\n{evidence}")
        assert code == 0, (short_tmp / "up.out").read_text()[-3000:]
    finally:
        stop(up)
    log = (short_tmp / "logs" / "learner.h.0.log").read_text()
    assert "resumed from checkpoint" in log
    records = [json.loads(line) for line in (short_tmp / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["kind"] == "bc"]) == 1  # cloned once, not again
    train = [r for r in records if r["kind"] == "train"]
    after = [r for r in train if r["version"] > before]
    assert after, (before, [r["version"] for r in train])
    # iterations continue from the checkpoint rather than restarting at 1
    assert after[0]["iteration"] >= 3
    assert records[-1]["kind"] == "final"
    assert json.loads((short_tmp / "final.json").read_text())["version"] > before


def test_a_learner_that_cannot_resume_ends_the_job_with_an_error(short_tmp: Path) -> None:
    """``--resume`` from a checkpoint whose weights are corrupt: the learner exits 2 naming the
    file, the supervisor does not restart it, and ``dvla up`` stops the coordinator and the
    sampler and exits non-zero instead of leaving them waiting for a learner that never comes."""
    from dvla_nodes.learn.checkpoint import save_checkpoint
    from dvla_nodes.policy.flat import FlatLayout, ParamEntry

    n = 64
    layout = FlatLayout((ParamEntry("w", "float32", (n,), 0, n),), n)
    meta = {"version": 3, "step": 2, "config": TrainConfig().to_json(), "metrics": {"elapsed": 1.0}}
    save_checkpoint(short_tmp, "latest", np.ones(n, np.float32), layout=layout, meta=meta)
    weights = short_tmp / "latest.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the tensor data: the header still reads
    weights.write_bytes(bytes(data))
    topo = _pipeline_topology(short_tmp, "minutes = 1.0\neval_every = 0")
    up = spawn(
        ["up", str(topo), "--resume", str(short_tmp), "--status-every", "0"], short_tmp / "up.out"
    )
    try:
        code = up.wait(timeout=90)
    finally:
        stop(up)
    out = (short_tmp / "up.out").read_text()
    assert code == 1, out[-3000:]
    assert "learner.h.0 exited 2 (configuration error)" in out, out[-3000:]
    assert "stopping the job: learner.h.0 cannot run" in out, out[-3000:]
    log = (short_tmp / "logs" / "learner.h.0.log").read_text()
    assert "latest.safetensors: checksum" in log, log[-3000:]


def test_serial_mode_then_resume_continues_versions(short_tmp: Path) -> None:
    """``dvla up --serial`` runs every node in one process from the same code and topology;
    ``dvla up --resume RUN_DIR --minutes N`` then continues that run in separate processes from
    its final checkpoint: no second warm start, versions continue, and the KL reference is the
    run's warm start again."""
    topo = _pipeline_topology(
        short_tmp, "minutes = 5.0\neval_every = 0\nrl_kl_coef = 0.5\nlr_anneal = 0.5"
    )
    args = ["up", str(topo), "--run-dir", str(short_tmp), "--status-every", "0", "--serial"]
    up = spawn([*args, "--minutes", "0.3"], short_tmp / "up.out")
    try:
        assert up.wait(timeout=150) == 0, (short_tmp / "up.out").read_text()[-3000:]
    finally:
        stop(up)
    logs = sorted(p.name for p in (short_tmp / "logs").glob("*.log"))
    assert logs == ["serial.h.log", "supervisor.log"], logs  # one process for every node
    first = json.loads((short_tmp / "final.json").read_text())
    assert first["step"] >= 1
    assert first["config"]["minutes"] == 0.3  # --minutes reached the learner

    up = spawn(
        ["up", str(topo), "--resume", str(short_tmp), "--minutes", "0.25", "--status-every", "0"],
        short_tmp / "up2.out",
    )
    try:
        assert up.wait(timeout=150) == 0, (short_tmp / "up2.out").read_text()[-3000:]
    finally:
        stop(up)
    out = (short_tmp / "up2.out").read_text()
    assert "held-out evaluation" in out
    records = [json.loads(line) for line in (short_tmp / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["kind"] == "bc"]) == 1
    finals = [r for r in records if r["kind"] == "final"]
    assert len(finals) == 2
    second = json.loads((short_tmp / "final.json").read_text())
    assert second["version"] > first["version"]
    assert second["step"] > first["step"]
    resumed = [r for r in records if r["kind"] == "train" and r["version"] > first["version"]]
    assert resumed
    assert resumed[0]["iteration"] == first["step"] + 1
    assert all("kl_ref" in r for r in records if r["kind"] == "train")
    # The learning rate anneals with the learner's clock: below the warm-up's, by at most half.
    cfg = TrainConfig.from_json(second["config"])
    for r in (r for r in records if r["kind"] == "train"):
        share = r["lr"] / (cfg.lr * min(1.0, r["iteration"] / cfg.lr_warmup))
        assert 0.5 - 1e-9 <= share < 1.0, r
    log = (short_tmp / "logs" / "learner.h.0.log").read_text()
    assert f"KL reference: {short_tmp / 'warmstart.json'}" in log, log[-3000:]


def test_up_rejects_bad_overrides_and_resume_without_checkpoint(short_tmp: Path) -> None:
    topo = _pipeline_topology(short_tmp)
    bad = dvla("up", str(topo), "--set", "learner.minutes")
    assert bad.returncode == 2
    assert "ROLE.KEY=VALUE" in bad.stderr
    empty = short_tmp / "empty"
    empty.mkdir()
    none = dvla("up", str(topo), "--resume", str(empty))
    assert none.returncode == 2
    assert "no latest.json or final.json" in none.stderr
    # A setting the role rejects stops the launch before any process starts, naming the key.
    wrong = dvla("up", str(topo), "--set", "learner.group_size=1")
    assert wrong.returncode == 2
    assert "roles.learner" in wrong.stderr
    assert "group_size=1" in wrong.stderr
    rollout = dvla("up", str(topo), "--set", "sampler.rollout_groups=0")
    assert rollout.returncode == 2
    assert "roles.sampler" in rollout.stderr
    assert "rollout_groups=0" in rollout.stderr


def test_parse_overrides_reads_toml_values() -> None:
    from dvla_tools.cmd_up import parse_overrides

    got = parse_overrides(["learner.minutes=2.5", "learner.tasks=reach-red", "sampler.x=true"])
    assert got == {"learner": {"minutes": 2.5, "tasks": "reach-red"}, "sampler": {"x": True}}


def test_samplers_act_through_a_remote_inference_node(short_tmp: Path) -> None:
    """``[roles.sampler] inference = "remote"``: the sampler's observations go to an
    ``inference`` node over the data bus; that node serves the learner's versions — here
    through its two preallocated weight slots (``weights = "vram"``: CUDA when present, the same
    code on CPU memory here) loaded from the shared weight pool and flipped between batches —
    and training proceeds as with local inference. (The zero-copy ``pool`` mode is covered by
    tests/test_inference.py.)"""
    topo = _pipeline_topology(
        short_tmp,
        'minutes = 0.4\neval_every = 0\n[roles.sampler]\ninference = "remote"\n'
        '[roles.inference]\nweights = "vram"',
        roles="coordinator = 1, learner = 1, inference = 1, sampler = 1",
    )
    up = spawn(
        ["up", str(topo), "--run-dir", str(short_tmp), "--status-every", "0"], short_tmp / "up.out"
    )
    try:
        assert up.wait(timeout=150) == 0, (short_tmp / "up.out").read_text()[-3000:]
    finally:
        stop(up)
    records = [json.loads(line) for line in (short_tmp / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) >= 2, records
    assert train[-1]["version"] > train[0]["version"]
    # The forward passes ran on the inference node, not in the sampler.
    lanes = {
        name: {e["name"] for e in json.loads(p.read_text())["events"] if e.get("ph") == "X"}
        for name, p in ((p.stem, p) for p in (short_tmp / "trace").glob("*.json"))
    }
    assert "inference" in lanes["inference.h.0"]
    assert "inference" not in lanes["sampler.h.0"]
    assert "sampling" in lanes["sampler.h.0"]
    log = (short_tmp / "logs" / "inference.h.0.log").read_text()
    assert "VRAM slots on cpu" in log


# --- the job's benchmark suite -------------------------------------------------------------


def _suite_topology(
    tmp: Path,
    learner: dict[str, Any],
    sampler: str = "",
    roles: str = "coordinator = 1, learner = 1, sampler = 1",
) -> Path:
    """A learner and a sampler (``roles``); ``learner`` overrides tiny GRPO settings."""
    table = {
        "group_size": 4,
        "groups_per_iter": 1,
        "eval_every": 0,
        "eval_seeds": 1,
        "final_eval_seeds": 1,
        "max_version_lag": 1,
        **learner,
    }
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in table.items())
    return _write_topology(
        tmp, "suite", roles, f"[roles.learner]\n{lines}\n[roles.sampler]\n{sampler}"
    )


def _run_up(topo: Path, run_dir: Path, *extra: str) -> list[dict[str, Any]]:
    up = spawn(
        ["up", str(topo), "--run-dir", str(run_dir), "--status-every", "0", *extra],
        run_dir / "up.out",
    )
    try:
        assert up.wait(timeout=150) == 0, (run_dir / "up.out").read_text()[-3000:]
    finally:
        stop(up)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_metaworld_job_trains_on_meta_world(short_tmp: Path) -> None:
    """``suite = "metaworld"`` in ``[roles.learner]``: the learner's demonstrations, the
    sampler's groups and the evaluations are Meta-World episodes (in workers under Meta-World's
    own interpreter), and the policy is shaped by Meta-World's spec."""
    from dvla_nodes.envs.suites import has_suite, suite_python

    python = suite_python("metaworld")
    if python is None or not has_suite("metaworld", python):
        pytest.skip("metaworld is not installed: run `dvla env create metaworld`")
    topo = _suite_topology(
        short_tmp,
        {
            "suite": "metaworld",
            "suite_tasks": "reach-v3",
            "suite_max_steps": 25,
            "suite_shaping_scale": 0.01,  # dense reward: groups differ, versions advance
            "suite_camera": "corner2",
            "image_size": 32,
            "demos_per_task": 2,
            "bc_epochs": 1,
            "iterations": 3,  # the job ends after three GRPO updates (minutes: a backstop)
            "minutes": 1.5,
        },
    )
    records = _run_up(topo, short_tmp)
    bc = [r for r in records if r["kind"] == "bc"]
    assert len(bc) == 1
    assert bc[0]["demos"] == 1 * 2  # one task, two scripted demonstrations
    train = [r for r in records if r["kind"] == "train"]
    assert [r["version"] for r in train] == [2, 3, 4], records  # three GRPO versions
    assert all(r["success_by_task"] == {"reach-v3": r["success"]} for r in train)
    final = records[-1]
    assert final["kind"] == "final"
    assert set(final["success_by_task"]) == {"reach-v3"}
    ck = json.loads((short_tmp / "final.json").read_text())
    assert ck["suite"]["name"] == "metaworld"
    assert ck["suite"]["tasks"] == ["reach-v3"]
    assert ck["suite"]["options"]["camera"] == "corner2"
    assert (ck["policy"]["proprio_dim"], ck["policy"]["action_dim"]) == (5, 4)
    assert ck["policy"]["aux_dim"] == 9  # Meta-World's object and goal positions
    log = (short_tmp / "logs" / "learner.h.0.log").read_text()
    assert "suite metaworld: 1 task(s) (reach-v3)" in log
    # The run's checkpoints refuse a resume on another suite, before anything starts.
    embedded = _pipeline_topology(short_tmp)
    refused = dvla("up", str(embedded), "--resume", str(short_tmp))
    assert refused.returncode == 2
    assert "trained on suite 'metaworld', this job's suite is 'embedded'" in refused.stderr


def test_a_suite_without_experts_starts_grpo_from_the_initial_policy(short_tmp: Path) -> None:
    """The gym suite (in dvla's own environment, so this runs everywhere) has no scripted
    experts: no cloning, the learner says so, and GRPO trains the initial policy on 6-d
    HalfCheetah actions. The sampler acts through an inference node, which builds the policy
    the learner advertises (it has no environments to learn the suite's shapes from).
    ``--serial``: every node in one process (one event loop, while the suite's workers
    start)."""
    topo = _suite_topology(
        short_tmp,
        {
            "suite": "gym",
            "suite_tasks": CHEETAH,
            "suite_max_steps": 6,
            "image_size": 16,
            "policy_stem": "patch",
            "group_size": 2,
            "iterations": 3,
            "minutes": 1.5,
        },
        sampler='inference = "remote"',
        roles="coordinator = 1, learner = 1, inference = 1, sampler = 1",
    )
    records = _run_up(topo, short_tmp, "--serial")
    assert not [r for r in records if r["kind"] == "bc"]
    (warm,) = [r for r in records if r["kind"] == "warm_start"]
    assert warm["cloned"] is False
    assert "no scripted expert" in str(warm["reason"])
    train = [r for r in records if r["kind"] == "train"]
    assert [r["version"] for r in train] == [2, 3, 4], records  # from version 1: the initial
    assert records[-1]["kind"] == "final"
    assert records[-1]["success_by_task"] == {CHEETAH: 0.0}  # HalfCheetah reports no success
    ck = json.loads((short_tmp / "final.json").read_text())
    assert (ck["policy"]["action_dim"], ck["policy"]["proprio_dim"]) == (6, 17)
    assert ck["suite"]["has_expert"] is False
    log = (short_tmp / "logs" / "serial.h.log").read_text()
    assert "no warm start" in log
    assert "built the learner's policy for suite gym" in log


def test_up_refuses_a_bad_suite_choice_before_starting(short_tmp: Path) -> None:
    """A job trains on the suite it names or does not start: exit 2 naming the key."""
    unknown = dvla("up", str(_suite_topology(short_tmp, {"suite": "atari", "suite_tasks": "pg"})))
    assert unknown.returncode == 2
    assert "roles.learner: suite = 'atari': unknown suite" in unknown.stderr
    assert not (short_tmp / "runs").exists()
    # suite keys in the sampler's table would give the sampler another policy than the learner
    misplaced = dvla(
        "up", str(_suite_topology(short_tmp, {}, 'suite = "metaworld"\nsuite_tasks = "MT10"'))
    )
    assert misplaced.returncode == 2
    assert "roles.sampler: suite, suite_tasks: the suite is a job-wide choice" in misplaced.stderr
    assert "[roles.learner]" in misplaced.stderr
    table = {"suite": "gym", "suite_tasks": CHEETAH, "suite_cam": "x"}
    option = dvla("up", str(_suite_topology(short_tmp, table)))
    assert option.returncode == 2
    assert "unknown option 'cam'" in option.stderr


def test_configuration_error_inside_a_node_exits_2(short_tmp: Path) -> None:
    """A ConfigError raised while a node runs (here: a setting only the node itself checks,
    reached by starting it by hand) is exit status 2 — which the supervisor does not restart —
    with the message in the log, not a traceback and a restart loop."""
    topo = _pipeline_topology(short_tmp, '[roles.sampler]\ninference = "bogus"')
    proc = dvla(
        "node",
        "start",
        "--role",
        "sampler",
        "--topology",
        str(topo),
        "--host",
        "h",
        "--run-dir",
        str(short_tmp),
        timeout=90,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "configuration error" in proc.stderr
    assert "inference='bogus'" in proc.stderr


def test_update_threads_leave_the_samplers_their_cores() -> None:
    t = train_config({})  # torch_threads 2, env_workers 2, update_threads 0 (auto)
    one_sampler = {"coordinator": 1, "learner": 1, "sampler": 1}
    assert update_threads(t, one_sampler, cpus=2) == 1  # this machine: measured 1.39x
    assert update_threads(t, one_sampler, cpus=16) == 2  # cores to spare: torch_threads
    assert update_threads(t, {"learner": 1}, cpus=2) == 2  # a host of its own
    assert update_threads(t, {"learner": 1, "sampler": 1, "inference": 1}, cpus=5) == 1
    assert update_threads(t, {"learner": 1, "sampler": 1, "inference": 1}, cpus=6) == 2
    assert update_threads(t.replace(update_threads=3), one_sampler, cpus=2) == 3  # explicit
    with pytest.raises(ConfigError, match="update_threads"):
        train_config({"update_threads": -1})
