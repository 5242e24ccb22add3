"""The pieces of ``dvla bench learn`` that run in seconds (the learning run itself is the
benchmark, not a test)."""

from __future__ import annotations

from dvla_tools.bench.learn import env_throughput, machine


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
