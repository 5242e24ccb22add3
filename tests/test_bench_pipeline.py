"""``dvla bench pipeline``: the window and lane arithmetic on known inputs, the HalfCheetah roles
training through a real ``dvla up`` job, the bare-environment ceiling, and the whole command
end to end on a tiny configuration (both modes, real processes)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dvla_bus.errors import ConfigError
from dvla_nodes.cheetah import NumpyPolicy, cheetah_config
from dvla_tools.bench.cheetah import ceiling, job_summary, read_records, run_job, write_topology
from dvla_tools.bench.pipeline import lane_stats, trace_window, window_rates
from tests.helpers import dvla


def _x(pid: int, lane: str, start: float, end: float) -> dict[str, Any]:
    return {"ph": "X", "name": lane, "pid": pid, "tid": 1, "ts": start, "dur": end - start}


TRACE: dict[str, Any] = {
    "traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "sampler.h.0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "learner.h.0"}},
        _x(1, "sampling", 0, 10),
        _x(1, "inference", 2, 4),  # nested in sampling: the same process, not overlap
        _x(2, "gradient", 5, 8),
        _x(2, "distribution", 8, 9),
        _x(2, "gradient", 12, 14),
    ]
}


def test_lane_stats_counts_overlap_between_processes_not_nesting() -> None:
    s = lane_stats(TRACE, 0.0, 10.0)
    u = s["utilisation"]
    assert u["sampling"] == pytest.approx(1.0)
    assert u["inference"] == pytest.approx(0.2)
    assert u["gradient"] == pytest.approx(0.3)
    assert u["distribution"] == pytest.approx(0.1)
    assert s["process_busy"] == {"learner.h.0": pytest.approx(0.4), "sampler.h.0": 1.0}
    assert s["overlap"] == pytest.approx(0.4)  # 5..9: both processes busy
    assert s["gradient_during_sampling"] == pytest.approx(1.0)
    # Clipped to 6..14: sampling 6..10, gradient 6..8 and 12..14, distribution 8..9.
    c = lane_stats(TRACE, 6.0, 14.0)
    assert c["utilisation"]["sampling"] == pytest.approx(0.5)
    assert c["utilisation"]["gradient"] == pytest.approx(0.5)
    assert c["overlap"] == pytest.approx(3 / 8)  # 6..9
    assert c["gradient_during_sampling"] == pytest.approx(0.5)  # 6..8 of 6..8 + 12..14


def test_trace_window_runs_from_first_to_last_update_end() -> None:
    assert trace_window(TRACE) == (8, 14)
    assert trace_window({"traceEvents": [_x(2, "gradient", 0, 1)]}) is None


def test_window_rates_count_from_the_first_update() -> None:
    records = [
        {"kind": "bc", "t": 5.0},
        {"kind": "eval", "t": 6.0, "env_steps": 100},
        {"kind": "train", "t": 10.0, "env_steps": 600, "version": 2, "success": 0.5},
        {"kind": "train", "t": 12.0, "env_steps": 1100, "version": 3, "success": 0.0},
        {"kind": "train", "t": 14.0, "env_steps": 1400, "version": 4, "success": 1.0},
        {"kind": "final", "t": 20.0, "env_steps": 1400},
    ]
    w = window_rates(records)
    assert w["window_s"] == 4.0
    assert w["updates"] == 2
    assert w["env_steps"] == 800
    assert w["env_steps_per_s"] == 200.0
    assert w["updates_per_s"] == 0.5
    assert (w["version_first"], w["version_last"]) == (2, 4)
    with pytest.raises(RuntimeError, match="at least 2"):
        window_rates(records[:3])


def test_numpy_policy_log_probs_match_torch_normal() -> None:
    rng = np.random.default_rng(0)
    d, h, a = 5, 7, 3
    arrays = {
        "obs_mean": rng.normal(size=d).astype(np.float32),
        "obs_std": rng.uniform(0.5, 2, size=d).astype(np.float32),
        "log_std": rng.normal(-0.5, 0.2, size=a).astype(np.float32),
    }
    for name, (o, i) in zip(("pi.0", "pi.2", "pi.4"), ((h, d), (h, h), (a, h)), strict=True):
        arrays[f"{name}.weight"] = rng.normal(size=(o, i)).astype(np.float32)
        arrays[f"{name}.bias"] = rng.normal(size=o).astype(np.float32)
    obs = rng.normal(size=(4, d))
    act, logp = NumpyPolicy(arrays, version=3).act(obs, np.random.default_rng(1))
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    x = ((torch.from_numpy(obs) - t["obs_mean"]) / t["obs_std"]).clamp(-10, 10).float()
    x = torch.tanh(x @ t["pi.0.weight"].T + t["pi.0.bias"])
    x = torch.tanh(x @ t["pi.2.weight"].T + t["pi.2.bias"])
    mu = x @ t["pi.4.weight"].T + t["pi.4.bias"]
    # The Gaussian density of the returned actions around the torch mean (the sampler derives
    # its log-probs from the noise it drew instead).
    std = t["log_std"].exp()
    ref = (
        -((torch.from_numpy(act) - mu) ** 2) / (2 * std**2)
        - std.log()
        - 0.5 * math.log(2 * math.pi)
    )
    np.testing.assert_allclose(logp, ref.sum(-1).numpy(), rtol=1e-4, atol=1e-4)
    assert act.shape == (4, a)
    assert logp.dtype == np.float32


def test_cheetah_config_rejects_bad_settings() -> None:
    assert cheetah_config({"envs": 4, "watchdog_s": 5.0}).envs == 4
    with pytest.raises(ConfigError, match="rollout"):
        cheetah_config({"rollout": 0})
    with pytest.raises(ConfigError, match="lr"):
        cheetah_config({"lr": "fast"})


def test_cheetah_learner_and_sampler_train_through_the_bus(short_tmp: Path) -> None:
    learner = {
        "envs": 2,
        "rollout": 32,
        "batch_frames": 128,
        "minibatch": 64,
        "epochs": 1,
        "hidden": 16,
        "seconds": 4.0,
        "max_version_lag": 2,
    }
    topo = write_topology(short_tmp / "c.toml", samplers=1, learner=learner)
    code, output, cpu = run_job(topo, short_tmp / "run", timeout=90)
    assert code == 0, output[-3000:]
    assert cpu["timed_out"] is False  # the learner ended the job
    assert cpu["wall_s"] > 0  # CPU read at the first and the last update
    assert 0 < cpu["cores_used"] <= cpu["machine_cores_busy"] + 0.5
    records = read_records(short_tmp / "run")
    assert records[0]["kind"] == "start"
    assert records[-1]["kind"] == "final"
    ups = [r for r in records if r["kind"] == "update"]
    assert len(ups) >= 3, records
    versions = [r["version"] for r in ups]
    assert versions == sorted(set(versions))  # one new version per update
    # Admitted blocks were acted on by versions at most 2 behind: the sampler kept picking up
    # the learner's new weights from the pool as they were published.
    assert all(0 <= r["lag_max"] <= 2 for r in ups)
    assert all(b["frames"] - a["frames"] >= 128 for a, b in itertools.pairwise(ups))
    summary = job_summary(records)
    assert summary["frames_per_s"] > 0
    assert summary["updates"] == len(ups)
    lanes = json.loads((short_tmp / "run" / "lanes.json").read_text())
    assert {"sampling", "gradient", "distribution"} <= set(lanes["utilisation"])


def test_bare_ceiling_steps_the_same_vector_env() -> None:
    c = ceiling(envs=2, procs=1, seconds=0.5)
    assert c["frames"] > 0
    assert c["frames"] % 32 == 0  # 16 steps of 2 envs at a time
    assert c["frames_per_s"] == pytest.approx(c["frames"] / c["seconds"])
    assert c["frames_per_cpu_s"] >= c["frames_per_s"] * 0.9  # one process: at most one core


def test_bench_pipeline_command_measures_both_modes(short_tmp: Path) -> None:
    out = short_tmp / "r.json"
    proc = dvla(
        "bench",
        "pipeline",
        "--no-cheetah",
        "--runs-dir",
        str(short_tmp),
        "--json",
        str(out),
        "--minutes",
        "1",
        "--set",
        "tasks=reach-red",
        "--set",
        "demos_per_task=1",
        "--set",
        "bc_epochs=1",
        "--set",
        "group_size=2",
        "--set",
        "groups_per_iter=1",
        "--set",
        "iterations=3",
        "--set",
        "env_workers=1",
        timeout=110,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["config"]["tasks"] == "reach-red"
    e = doc["embedded"]
    (ser,) = e["runs"]["serialized"]
    (asy,) = e["runs"]["async"]
    for r in (ser, asy):
        assert r["updates"] == 2  # 3 updates: the window runs from the first to the last
        assert r["env_steps_per_s"] > 0
    assert ser["lanes"]["overlap"] == 0.0
    assert ser["cpu"]["cores_used"] > 0
    assert asy["exit_status"] == 0
    assert {"sampling", "gradient"} <= set(asy["lanes"]["utilisation"])
    assert 0.0 <= asy["lanes"]["overlap"] <= 1.0
    assert math.isclose(e["ratio_env_steps_per_s"], asy["env_steps_per_s"] / ser["env_steps_per_s"])
    assert doc["cheetah"] == {"skipped": "--no-cheetah"}
    assert "async ÷ serialized" in proc.stdout


def test_bench_pipeline_rounds_zero_skips_the_embedded_comparison(short_tmp: Path) -> None:
    out = short_tmp / "r.json"
    args = ("bench", "pipeline", "--no-cheetah", "--runs-dir", str(short_tmp), "--json", str(out))
    proc = dvla(*args, "--rounds", "0", timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["embedded"] == {"skipped": "--rounds 0"}
    assert "async ÷ serialized" not in proc.stdout
    bad = dvla(*args, "--rounds", "-1", timeout=60)
    assert bad.returncode == 2
    assert "--rounds -1" in bad.stderr
