"""The pieces of ``dvla bench learn`` that run in seconds (the learning run itself is the
benchmark, not a test)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest

from dvla_bus.errors import ConfigError, DvlaError
from dvla_tools.bench.learn import (
    comparison,
    comparison_line,
    env_throughput,
    machine,
    markdown,
    pipeline_command,
    pipeline_result,
    run_job,
    time_to_bar,
    train_values,
)
from tests.helpers import wait_for


def test_machine_description() -> None:
    m = machine()
    assert m["cores"] >= 1
    assert m["mujoco_gl"] in ("egl", "osmesa", "glfw")
    assert m["torch"]


def test_env_throughput_measures_positive_rates() -> None:
    rates = env_throughput(seconds=0.2, num_envs=4)
    assert set(rates) == {
        "steps_per_s_random_1core",
        "steps_per_s_expert_1core",
        "renders_per_s_1core",
    }
    assert all(v > 0 for v in rates.values())


def test_markdown_tables() -> None:
    from dvla_tools.bench.learn import markdown

    curve = [
        {"kind": "bc", "t": 10.0, "env_steps": 100},
        {
            "kind": "eval",
            "t": 12.0,
            "env_steps": 100,
            "success": 0.25,
            "success_by_task": {"reach-red": 0.5, "pick-red": 0.0},
        },
        {
            "kind": "final",
            "t": 60.0,
            "env_steps": 900,
            "success": 0.75,
            "success_by_task": {"reach-red": 1.0, "pick-red": 0.5},
        },
    ]
    setting = {
        "setting": "main",
        "warmstart_success": 0.25,
        "final_success": 0.75,
        "gain": 0.5,
        "min_task_success": 0.5,
        "train_seconds": 60.0,
        "env_steps": 900,
        "bar_met": False,
        "final_success_by_task": {"reach-red": 1.0, "pick-red": 0.5},
        "config": {"final_eval_seeds": 100, "eval_seeds": 10},
        "curve": curve,
        "rollout_seconds": 20.0,
        "update_seconds": 20.0,
        "eval_seconds": 5.0,
        "bc_seconds": 10.0,
        "skipped_groups": 1,
        "groups": 8,
    }
    text = markdown({"settings": [setting]})
    assert "| main | 25.0% | 75.0% | +50.0 pts | 50% | 1.0 min | 900 | **not met** |" in text
    assert "| final | 1.0 | 900 | 75.0% | 50% | 100% |" in text


# --- the pipeline setting (issue 7): its pure pieces, and the child-process handling ----------

TASKS = {"reach-red": 1.0, "pick-red": 0.5}


def _curve_record(kind: str, t: float, success: float) -> dict[str, Any]:
    return {
        "kind": kind,
        "t": t,
        "env_steps": int(t * 100),
        "version": int(t),
        "success": success,
        "success_by_task": {"reach-red": success, "pick-red": success},
        "episodes": 20,
        "eval_seconds": 2.0,
    }


def test_time_to_bar_is_the_first_evaluation_at_the_bar() -> None:
    curve = [
        {"kind": "bc", "t": 10.0, "success": 0.99},  # not an evaluation
        _curve_record("eval", 12.0, 0.5),
        {"kind": "train", "t": 50.0, "success": 1.0},  # a training batch, not an evaluation
        _curve_record("eval", 90.0, 0.9),
        _curve_record("eval", 120.0, 0.85),
        _curve_record("final", 300.0, 0.95),
    ]
    assert time_to_bar(curve) == 90.0
    assert time_to_bar(curve, bar=0.95) == 300.0
    assert time_to_bar(curve[:3]) is None
    assert time_to_bar([]) is None
    # A restarted learner's clock resumes from its checkpoint: the first record written is
    # the first crossing, even when a later record carries a smaller t.
    restarted = [_curve_record("eval", 200.0, 0.92), _curve_record("eval", 150.0, 0.95)]
    assert time_to_bar(restarted) == 200.0


def test_sustained_time_to_bar_averages_the_last_evaluations() -> None:
    # One lucky evaluation is not the bar sustained: the mean of the last `window` must be.
    success = [0.5, 0.92, 0.8, 0.88, 0.9, 0.93, 0.95, 0.91]
    curve = [_curve_record("eval", 10.0 * (i + 1), v) for i, v in enumerate(success)]
    curve.insert(3, {"kind": "train", "t": 35.0, "success": 0.0})  # not an evaluation
    assert time_to_bar(curve) == 20.0
    assert time_to_bar(curve, window=3) == 60.0  # (0.88 + 0.9 + 0.93) / 3 >= 0.9
    # at 70 s the last five average 0.892; at 80 s, 0.914
    assert time_to_bar(curve, window=5) == 80.0
    assert time_to_bar(curve[:5], window=5) is None  # fewer evaluations than the window
    with pytest.raises(ValueError, match="window"):
        time_to_bar(curve, window=0)


def test_comparison_of_serial_and_pipeline() -> None:
    def s(label: str, ttb: float | None, sustained: float | None = None) -> dict[str, Any]:
        return {"setting": label, "time_to_bar_s": ttb, "time_to_bar_sustained_s": sustained}

    assert comparison([s("main", 600.0)]) is None
    assert comparison([s("one-demo", 60.0), s("pipeline", 30.0)]) is None
    assert comparison([s("main", 600.0, 900.0), s("pipeline", 400.0, 1000.0)]) == {
        "serial_s": 600.0,
        "pipeline_s": 400.0,
        "faster": "pipeline",
        "serial_sustained_s": 900.0,
        "pipeline_sustained_s": 1000.0,
        "faster_sustained": "serial",
    }

    def faster(serial: float | None, pipeline: float | None) -> object:
        cmp = comparison([s("pipeline", pipeline), s("main", serial)])
        assert cmp is not None
        return cmp["faster"]

    assert faster(600.0, None) == "serial"
    assert faster(None, 1.0) == "pipeline"
    assert faster(None, None) is None
    assert faster(5.0, 5.0) == "tie"


def _args(**kw: Any) -> argparse.Namespace:
    base: dict[str, Any] = {
        "seed": 3,
        "minutes": 30.0,
        "workers": 2,
        "eval_seeds": 100,
        "quick": False,
        "demos_per_task": None,
    }
    return argparse.Namespace(**{**base, **kw})


def _sets(cmd: list[str]) -> list[str]:
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--set"]


def test_pipeline_command_forwards_the_settings_to_the_learner(tmp_path: Path) -> None:
    values = train_values(_args(), 100, {"lr": 1e-4, "tasks": ["reach-red", "pick-red"]})
    cmd = pipeline_command(Path("topologies/local.toml"), tmp_path, values)
    assert cmd[:5] == [sys.executable, "-m", "dvla_tools", "up", "topologies/local.toml"]
    assert cmd[cmd.index("--run-dir") + 1] == str(tmp_path)
    assert cmd[cmd.index("--minutes") + 1] == "30.0"
    sets = _sets(cmd)
    assert sets == [
        "learner.seed=3",
        "learner.env_workers=2",
        "learner.final_eval_seeds=100",
        "learner.eval_every=10",
        "learner.eval_seeds=10",
        "learner.demos_per_task=100",
        "learner.lr=0.0001",
        'learner.tasks="reach-red,pick-red"',
    ]
    # What `dvla up` makes of them: the learner's TrainConfig.
    from dvla_bus.topology import load_topology
    from dvla_nodes.pipeline import train_config
    from dvla_nodes.roles import known_roles
    from dvla_tools.cmd_up import parse_overrides

    topology = load_topology(Path("topologies/local.toml"), known_roles(), parse_overrides(sets))
    cfg = train_config(topology.settings("learner"))
    assert (cfg.seed, cfg.env_workers, cfg.final_eval_seeds, cfg.lr) == (3, 2, 100, 1e-4)
    assert cfg.tasks == ("reach-red", "pick-red")
    assert (cfg.eval_every, cfg.eval_seeds) == (10, 10)  # the serial trainer's schedule
    assert cfg.max_version_lag == 2  # the topology's own settings stay


def test_pipeline_command_quick_and_overrides() -> None:
    values = train_values(
        _args(quick=True, eval_seeds=50),
        None,
        {"minutes": 2, "name": "x", "display": True, "checkpoint_every": 5, "adv_std_norm": False},
    )
    cmd = pipeline_command(Path("t.toml"), Path("/r"), values)
    assert cmd[cmd.index("--minutes") + 1] == "2.0"  # --set minutes wins over --quick's 1
    sets = _sets(cmd)
    for expected in (
        "learner.final_eval_seeds=10",
        "learner.eval_seeds=4",
        "learner.eval_every=5",
        "learner.demos_per_task=10",
        "learner.adv_std_norm=false",
        "learner.checkpoint_every=5",
    ):
        assert expected in sets
    assert not [s for s in sets if s.split("=")[0] in ("learner.name", "learner.display")]
    assert train_values(_args(quick=True), 1, {})["demos_per_task"] == 1  # one-demo stays 1
    with pytest.raises(ConfigError):
        pipeline_command(Path("t.toml"), Path("/r"), {"minutes": 1, "tasks": [1, 2]})


def _write_run_dir(run_dir: Path, *, lanes: bool) -> None:
    records = [
        {"kind": "bc", "t": 40.0, "demos": 80, "loss": 3.9, "token_accuracy": 0.3},
        _curve_record("eval", 42.0, 0.5),
        {
            "kind": "train",
            "t": 50.0,
            "iteration": 1,
            "version": 2,
            "success": 0.5,
            "groups": 8,
            "skipped_groups": 1,
            "stale_groups": 0,
            "env_steps": 6000,
        },
        {
            "kind": "train",
            "t": 60.0,
            "iteration": 2,
            "version": 3,
            "success": 0.6,
            "groups": 8,
            "skipped_groups": 2,
            "stale_groups": 1,
            "env_steps": 7000,
        },
        _curve_record("eval", 70.0, 0.92),
        {**_curve_record("final", 95.0, 0.75), "success_by_task": TASKS, "episodes": 200},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    meta = {
        "version": 3,
        "step": 2,
        "config": {"final_eval_seeds": 100, "eval_seeds": 12},
        "metrics": {"elapsed": 90.0, "env_steps": 7000, "eval_success": 0.75},
    }
    (run_dir / "final.json").write_text(json.dumps(meta))
    if lanes:
        summary = {
            "span_s": 50.0,
            "utilisation": {"sampling": 0.8, "inference": 0.3, "gradient": 0.5},
            "overlap": 0.6,
        }
        (run_dir / "lanes.json").write_text(json.dumps(summary))


def test_pipeline_result_from_a_run_directory(tmp_path: Path) -> None:
    _write_run_dir(tmp_path, lanes=True)
    res = pipeline_result(tmp_path, {"reach-red": 0.5, "pick-red": 0.0}, warm_episodes=200)
    assert res["setting"] == "pipeline"
    assert res["warmstart_success"] == 0.25
    assert res["final_success"] == 0.75
    assert res["final_success_by_task"] == TASKS
    assert res["gain"] == 0.5
    assert res["min_task_success"] == 0.5
    assert res["bar_met"] is False  # 75 % < 90 %
    assert (res["train_seconds"], res["bc_seconds"], res["env_steps"]) == (90.0, 40.0, 7000)
    assert (res["iterations"], res["versions"]) == (2, 3)
    assert res["rollout_seconds"] == 40.0
    assert res["update_seconds"] == 25.0
    assert res["inference_seconds"] == 15.0
    assert res["distribution_seconds"] is None
    assert res["lane_overlap"] == 0.6
    assert res["eval_seconds"] == 4.0  # the two quick evaluations, not the final one
    assert (res["groups"], res["skipped_groups"], res["stale_groups"]) == (16, 3, 1)
    assert [r["kind"] for r in res["curve"]] == ["bc", "eval", "eval", "final"]
    assert res["time_to_bar_s"] == 70.0  # a quick evaluation reached 92 %
    assert res["time_to_bar_sustained_s"] is None  # three evaluations, fewer than five
    assert res["config"]["final_eval_seeds"] == 100


def test_pipeline_result_refuses_what_does_not_compare(tmp_path: Path) -> None:
    _write_run_dir(tmp_path, lanes=False)
    with pytest.raises(DvlaError, match="not the same held-out seeds"):
        pipeline_result(tmp_path, TASKS, warm_episodes=80)
    res = pipeline_result(tmp_path, TASKS)
    assert res["rollout_seconds"] is None
    assert res["lane_overlap"] is None
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # no final record
    with pytest.raises(DvlaError, match="no final evaluation"):
        pipeline_result(tmp_path, TASKS)


def test_markdown_with_the_pipeline_and_the_comparison(tmp_path: Path) -> None:
    _write_run_dir(tmp_path, lanes=False)
    pipe = {**pipeline_result(tmp_path, {"reach-red": 0.5, "pick-red": 0.0}), "job": {}}
    serial = {
        **pipe,
        "setting": "main",
        "rollout_seconds": 30.0,
        "update_seconds": 20.0,
        "time_to_bar_s": None,
    }
    del serial["lane_overlap"]
    result = {"settings": [serial, pipe], "comparison": comparison([serial, pipe])}
    text = markdown(result)
    assert (
        "| pipeline | 25.0% | 75.0% | +50.0 pts | 50% | 1.5 min | 7,000 | **not met** | 1.2 min | "
        "not reached |" in text
    )
    assert (
        "| main | 25.0% | 75.0% | +50.0 pts | 50% | 1.5 min | 7,000 | **not met** | not reached | "
        "not reached |" in text
    )
    assert (
        "Time to the bar (first evaluation with >= 90% mean success): serial trainer (main) "
        "not reached, pipeline 1.2 min: only the pipeline reached it. Sustained (mean of the "
        "last 5 evaluations >= 90%): serial trainer (main) not reached, pipeline not reached: "
        "neither reached it." in text
    )
    assert "Time split: rollouts 30 s, GRPO updates 20 s, evaluations 4 s" in text
    assert "Time split (lane busy time): sampling n/a, inference n/a, GRPO updates n/a" in text
    assert "| bc |" not in text  # the bc record has no success to show
    both = comparison_line(
        {
            "serial_s": 600.0,
            "pipeline_s": 300.0,
            "faster": "pipeline",
            "serial_sustained_s": 900.0,
            "pipeline_sustained_s": None,
            "faster_sustained": "serial",
        }
    )
    assert "serial trainer (main) 10.0 min, pipeline 5.0 min: pipeline faster (2.00x)." in both


def _pid_file_script(pid_file: Path, *, ignore_term: bool, parent_exits: bool) -> str:
    """A parent that starts a grandchild-to-be (which waits for a signal; the parent writes its
    pid), then waits for a signal itself or exits."""
    return (
        "import signal, subprocess, sys\n"
        + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
        + "kid = subprocess.Popen([sys.executable, '-c', 'import signal; signal.pause()'])\n"
        + f"open({str(pid_file)!r}, 'w').write(str(kid.pid))\n"
        + ("" if parent_exits else "signal.pause()\n")
    )


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_run_job_stops_the_whole_group_on_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "kid.pid"
    script = _pid_file_script(pid_file, ignore_term=True, parent_exits=False)
    t0 = time.monotonic()
    out = run_job(
        [sys.executable, "-c", script], tmp_path / "out", timeout=3.0, grace=0.5, poll_s=0.1
    )
    assert out.timed_out
    assert out.returncode == -9
    assert _dead(int(pid_file.read_text()))
    assert out.leaked_pids == ()
    assert time.monotonic() - t0 < 8


def test_run_job_kills_and_reports_what_a_finished_job_left(tmp_path: Path) -> None:
    pid_file = tmp_path / "kid.pid"
    records = tmp_path / "metrics.jsonl"
    records.write_text(json.dumps({"kind": "eval", "t": 1.0}) + "\n" + '{"kind": "tr')
    seen: list[Mapping[str, Any]] = []
    script = _pid_file_script(pid_file, ignore_term=False, parent_exits=True)
    out = run_job(
        [sys.executable, "-c", script],
        tmp_path / "out",
        timeout=30.0,
        metrics=records,
        on_record=seen.append,
        linger=0.3,
    )
    kid = int(pid_file.read_text())
    assert not out.timed_out
    assert out.returncode == 0
    assert out.leaked_pids == (kid,)
    assert _dead(kid)
    assert seen == [{"kind": "eval", "t": 1.0}]  # the torn last line is not a record yet


def test_sigterm_stops_a_benchmark_and_the_job_it_started(tmp_path: Path) -> None:
    """`kill <bench>` must not orphan the `dvla up` it runs in its own session (found when a
    stopped `dvla bench learn --settings pipeline` left its job training for 20 more minutes)."""
    import signal
    import subprocess

    pid_file = tmp_path / "kid.pid"
    job = _pid_file_script(pid_file, ignore_term=False, parent_exits=False)
    bench = (
        "import sys\n"
        "from pathlib import Path\n"
        "from dvla_tools.bench.learn import run_job\n"
        "from dvla_tools.cmd_bench import _sigterm_as_interrupt\n"
        "def bench(args):\n"
        f"    run_job([sys.executable, '-c', {job!r}], Path({str(tmp_path / 'out')!r}),\n"
        "            timeout=300.0, grace=5.0, poll_s=0.1, linger=0.5)\n"
        "    return 0\n"
        "try:\n"
        "    _sigterm_as_interrupt(bench)(None)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", bench])
    try:
        wait_for(
            lambda: proc.poll() is not None or (pid_file.exists() and pid_file.read_text()),
            timeout=30,
            what="the job's child to start",
        )
        assert proc.poll() is None, "the benchmark ended before its job started"
        kid = int(pid_file.read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 130
        assert _dead(kid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
