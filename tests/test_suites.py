"""Benchmark-suite adapters: the interface, the gymnasium adapter (always: gymnasium and mujoco
are dvla dependencies), suite workers under their own interpreter, and — when an interpreter
has them — Meta-World and LIBERO (``dvla env create metaworld|libero``; the tests say why they
skip otherwise)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import psutil
import pytest

from dvla_bus.errors import ConfigError, ResourceError
from dvla_nodes.envs.suites import (
    SUITES,
    Scalar,
    SuiteSpec,
    drive,
    has_suite,
    open_suite_shards,
    resolve_python,
    suite_python,
    suite_settings,
)
from dvla_nodes.envs.suites._interface import check_options
from dvla_nodes.envs.suites._render import resize
from dvla_nodes.envs.suites.gym import ActionMap, words_of
from dvla_nodes.envs.tasks import TASK_NAMES
from tests.helpers import REPO, dvla

CHEETAH = "HalfCheetah-v5"


@pytest.fixture(autouse=True)
def _mujoco_log_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # MuJoCo appends its warnings (mujoco 4 warns about HalfCheetah's settotalmass) to
    # MUJOCO_LOG.TXT in the working directory: keep it out of the checkout.
    monkeypatch.chdir(tmp_path)


def _interpreter(suite: str) -> str:
    """An interpreter that has ``suite``, or skip saying how to get one."""
    python = suite_python(suite)
    if python is not None and has_suite(suite, python):
        return python
    if has_suite(suite):
        return sys.executable
    pytest.skip(
        f"{suite} is not installed: run `dvla env create {suite}` (or set "
        f"DVLA_{suite.upper()}_PYTHON to an interpreter that has it)"
    )


# --------------------------------------------------------------------------- interface


def test_spec_round_trips_through_the_ready_message() -> None:
    spec = SuiteSpec("gym", ("A-v0",), ("control the a",), (10,), 32, 6, 17, 0, False, "affine")
    assert SuiteSpec.from_meta(json.loads(json.dumps(spec.to_meta()))) == spec
    assert spec.vocabulary() == ("a", "control", "the")
    assert spec.steps_limit("A-v0") == 10
    with pytest.raises(ConfigError, match="action_dim"):
        SuiteSpec.from_meta({**spec.to_meta(), "action_dim": "six"})
    with pytest.raises(ConfigError, match="without task 'B-v0'"):
        spec.index("B-v0")


def test_options_are_typed_and_unknown_ones_named() -> None:
    known: dict[str, Scalar] = {
        "camera": "corner",
        "max_steps": 500,
        "scale": 0.0,
        "rotation": False,
    }
    got = check_options("x", known, {"max_steps": "150", "scale": 2, "rotation": "true"})
    assert got == {"camera": "corner", "max_steps": 150, "scale": 2.0, "rotation": True}
    with pytest.raises(ConfigError, match=r"unknown option 'cam'.*camera"):
        check_options("x", known, {"cam": "top"})
    with pytest.raises(ConfigError, match="not a int"):
        check_options("x", known, {"max_steps": "many"})


def test_sampler_settings_from_the_topology_table() -> None:
    s = suite_settings(
        {"suite": "metaworld", "suite_tasks": "MT10, push-v3", "suite_camera": "corner3"}
    )
    assert (s.suite, s.tasks, s.python, s.options) == (
        "metaworld",
        ("MT10", "push-v3"),
        None,
        {"camera": "corner3"},
    )
    assert suite_settings({}).tasks == TASK_NAMES
    with pytest.raises(ConfigError, match="needs suite_tasks"):
        suite_settings({"suite": "gym"})
    with pytest.raises(ConfigError, match="unknown suite 'atari'"):
        suite_settings({"suite": "atari"})


def test_cli_names_the_registry() -> None:
    from dvla_tools.cmd_env import OWN_ENV, SUITE_NAMES, client_requirements

    assert tuple(SUITES) == SUITE_NAMES
    assert tuple(n for n, i in SUITES.items() if i.own_env) == OWN_ENV
    reqs = client_requirements()
    names = {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0] for r in reqs}
    assert {"pyzmq", "msgspec", "numpy", "psutil", "gymnasium"} <= names
    assert not any(r.startswith(("torch", "mujoco", "matplotlib")) for r in reqs)


def test_an_absent_suite_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if has_suite("libero"):
        pytest.skip("libero is installed in this interpreter")
    monkeypatch.setenv("DVLA_ENVS", str(tmp_path))
    monkeypatch.delenv("DVLA_LIBERO_PYTHON", raising=False)
    with pytest.raises(ConfigError, match="dvla env create libero"):
        resolve_python("libero")
    # forced onto an interpreter without it, the worker reports the same advice
    with (
        pytest.raises(ResourceError, match="dvla env create libero"),
        open_suite_shards("libero", ["libero_spatial/0"], 1, 32, python=sys.executable),
    ):
        pass


def test_the_worker_imports_no_torch_and_no_learning_code() -> None:
    probe = (
        "import sys, dvla_nodes.envs.suites._worker, dvla_nodes.envs.suites.gym;"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'torch' or "
        "m.startswith(('dvla_nodes.learn', 'dvla_nodes.policy', 'dvla_tools'))];"
        "print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- gymnasium


def test_action_map_box_is_affine_per_dimension() -> None:
    low, high = np.array([-2, 0, -np.inf], np.float32), np.array([2, 10, np.inf], np.float32)
    space = gym.spaces.Box(low, high)
    amap = ActionMap.of(space)
    assert amap.dim == 3
    np.testing.assert_allclose(amap(np.array([-1.0, -1.0, 0.3])), [-2.0, 0.0, 0.3])
    np.testing.assert_allclose(amap(np.array([1.0, 1.0, -0.7])), [2.0, 10.0, -0.7])
    np.testing.assert_allclose(amap(np.array([0.0, 0.5, 5.0])), [0.0, 7.5, 1.0])  # clipped
    assert amap(np.zeros(3)).dtype == space.dtype


def test_action_map_discrete_spaces_by_equal_bins() -> None:
    d = ActionMap.of(gym.spaces.Discrete(3, start=1))
    assert d.dim == 1
    assert [int(d(np.array([a]))) for a in (-1.0, -0.34, -0.33, 0.0, 0.34, 1.0)] == [
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    md = ActionMap.of(gym.spaces.MultiDiscrete([2, 5]))
    assert md(np.array([0.1, -1.0])).tolist() == [1, 0]
    assert md(np.array([-0.1, 1.0])).tolist() == [0, 4]
    mb = ActionMap.of(gym.spaces.MultiBinary(3))
    assert mb(np.array([-0.5, 0.0, 0.5])).tolist() == [0, 0, 1]
    with pytest.raises(ConfigError, match="maps Box"):
        ActionMap.of(gym.spaces.Text(4))


def test_words_and_resize() -> None:
    assert words_of("HalfCheetah-v5") == "half cheetah"
    assert words_of("ALE/Pong-v5") == "pong"
    img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    assert resize(img, 2).shape == (2, 2, 3)
    np.testing.assert_array_equal(resize(img, 4), img[:, 1:5])
    assert resize(img, 3).shape == (3, 3, 3)


def test_gym_adapter_pixels_steps_the_env_with_the_mapped_action() -> None:
    with open_suite_shards(
        "gym", [CHEETAH], 2, 64, workers=0, options={"instruction": "run like a {name}"}
    ) as s:
        spec = s.spec
        assert (spec.action_dim, spec.proprio_dim, spec.state_dim) == (6, 17, 0)
        assert spec.instructions == ("run like a half cheetah",)
        assert spec.max_steps == (1000,)
        assert not spec.has_expert
        env = s.shards[0]
        b = env.reset([CHEETAH, CHEETAH], [3, 3])
        assert b.images.shape == (2, 64, 64, 3)
        assert b.images.dtype == np.uint8
        assert b.images.std() > 5  # a picture, not a blank frame
        np.testing.assert_array_equal(b.images[0], b.images[1])  # same seed, same start
        assert b.instructions == ("run like a half cheetah",) * 2
        # the same seed and the same mapped action on a raw gymnasium env: the same state
        raw = gym.make(CHEETAH)
        obs, _ = raw.reset(seed=3)
        np.testing.assert_allclose(b.proprio[0], obs, rtol=1e-6)
        action = np.array([[0.5, -0.5, 1.0, -1.0, 0.0, 0.25]] * 2, np.float32)
        b2 = env.step(action)
        obs, reward, *_ = raw.step(action[0])  # HalfCheetah's Box is [-1, 1]: the identity
        raw.close()
        np.testing.assert_allclose(b2.proprio[0], obs, rtol=1e-5, atol=1e-6)
        assert b2.reward[0] == pytest.approx(reward, rel=1e-5)
        np.testing.assert_array_equal(b2.shaping, b2.reward)  # shaping_scale 1
        assert b2.images[0].tobytes() != b.images[0].tobytes()
        with pytest.raises(ConfigError, match="expected"):
            env.step(np.zeros((2, 4), np.float32))
        with pytest.raises(ConfigError, match="no scripted expert"):
            env.expert_actions()


def test_gym_state_only_with_a_step_limit() -> None:
    with open_suite_shards(
        "gym", [CHEETAH], 2, 0, workers=0, options={"max_steps": 3, "shaping_scale": 0.0}
    ) as s:
        env = s.shards[0]
        b = env.reset([CHEETAH, CHEETAH], [0, 1])
        assert b.images.shape == (2, 0, 0, 3)
        assert b.proprio.shape == (2, 17)
        assert not np.array_equal(b.proprio[0], b.proprio[1])
        for t in range(3):
            b = env.step(np.zeros((2, 6), np.float32))
            assert b.done.all() == (t == 2)
        assert not b.shaping.any()
        frozen = b.proprio.copy()
        b = env.step(np.ones((2, 6), np.float32))  # done slots stay done and still
        np.testing.assert_array_equal(b.proprio, frozen)
        assert b.reward.sum() == 0.0
        b = env.reset([CHEETAH, CHEETAH], [5, 0], mask=[True, False])
        assert b.done.tolist() == [False, True]


def test_gym_worker_process_matches_in_process() -> None:
    rng = np.random.default_rng(4)
    actions = rng.uniform(-1, 1, (5, 3, 6)).astype(np.float32)
    with (
        open_suite_shards("gym", [CHEETAH], 3, 32, workers=0) as local,
        open_suite_shards("gym", [CHEETAH], 3, 32, workers=1) as remote,
    ):
        assert remote.spec == local.spec
        (info,) = remote.info
        assert info["python"] == sys.executable
        assert info["source"] == str(REPO)
        assert "torch" not in info["versions"]
        pid = int(info["pid"])
        assert psutil.pid_exists(pid)
        a = local.shards[0].reset([CHEETAH] * 3, [1, 2, 3])
        remote.shards[0].send_reset([CHEETAH] * 3, [1, 2, 3])
        b = remote.shards[0].recv()
        for act in actions:
            a = local.shards[0].step(act)
            remote.shards[0].send_step(act)
            b = remote.shards[0].recv()
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.proprio, b.proprio)
        np.testing.assert_array_equal(a.reward, b.reward)
        assert a.instructions == b.instructions
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_worker_errors_reach_the_caller_and_the_worker_keeps_serving() -> None:
    with open_suite_shards("gym", [CHEETAH], 2, 0, workers=1) as s:
        shard = s.shards[0]
        shard.send_reset(["Nope-v0", CHEETAH], [0, 0])
        with pytest.raises(ResourceError, match="without task 'Nope-v0'"):
            shard.recv()
        shard.send_reset([CHEETAH, CHEETAH], [0, 0])
        assert shard.recv().proprio.shape == (2, 17)
    with pytest.raises(ConfigError, match="unknown env id"):
        open_suite_shards("gym", ["Nope-v0"], 1, 0, workers=0).__enter__()


def test_a_worker_of_another_protocol_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from dvla_nodes.envs.suites import _shards

    monkeypatch.setattr(_shards, "WORKER_PROTOCOL", _shards.WORKER_PROTOCOL + 1)
    with (
        pytest.raises(ConfigError, match="re-run `dvla env create gym`"),
        open_suite_shards("gym", [CHEETAH], 1, 0, workers=1),
    ):
        pass


def test_drive_two_workers_and_the_embedded_suite() -> None:
    with open_suite_shards("embedded", ["reach-red", "pick-blue"], 4, 32, workers=2) as s:
        assert [sh.num_envs for sh in s.shards] == [2, 2]
        assert s.spec.action_dim == 4
        assert s.spec.instructions[0] == "reach the red block"
        result = drive(s.shards, s.spec, seconds=0.5)
        assert result.steps > 0
        assert result.steps % 2 == 0


def test_bench_envs_quick_writes_json(tmp_path: Path) -> None:
    # The embedded suite, its env workers and a short through-dvla job (dvla up: learner,
    # sampler with remote inference, inference node) in one run.
    out = tmp_path / "envs.json"
    proc = dvla(
        "bench",
        "envs",
        "--suite",
        "embedded",
        "--tasks",
        "reach-red,reach-blue",
        "--num-envs",
        "2",
        "--image-size",
        "32",
        "--seconds",
        "0.5",
        "--workers",
        "1",
        "--repeat",
        "1",
        "--dvla-seconds",
        "2",
        "--dvla-warmup",
        "0.5",
        "--json",
        str(out),
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert [c["name"] for c in doc["cases"]] == ["bare", "shards-1"]
    assert all(c["steps_per_s"] > 0 for c in doc["cases"])
    assert doc["memory"]["per_env_rss_mib"] is not None
    assert doc["memory"]["one_env_process_rss_mib"] > 0
    assert set(doc["targets"]) == {"shards_1_vs_bare", "dvla_vs_bare"}
    assert all(c["steps_per_cpu_s"] > 0 for c in doc["cases"])
    d = doc["through_dvla"]
    assert d["roles"]["sampler"]["inference"] == "remote"
    assert d["roles"]["learner"]["group_size"] == 2
    assert d["exit_status"] == 0  # the job stopped cleanly when asked
    assert 1.5 <= d["window_s"] <= 10.0
    assert d["env_steps"] > 0
    assert d["steps_per_s"] == pytest.approx(d["env_steps"] / d["window_s"])
    # every observation the inference node answered came from the sampler's 2 environments
    assert 1.0 <= d["mean_batch"] <= 2.0
    assert d["cpu_s"] > 0
    assert d["steps_per_cpu_s"] == pytest.approx(d["env_steps"] / d["cpu_s"])
    assert {"learner", "sampler", "sampler-envs", "inference", "supervisor"} <= set(
        d["cores_by_role"]
    )
    assert d["cores_by_role"]["sampler-envs"] > 0
    assert 0 < d["cores_used"] <= (psutil.cpu_count() or 1) + 0.5
    mem = d["memory"]
    assert len(mem["env_worker_rss_mib"]["sampler"]) == 1
    assert mem["sampler_envs_per_worker"] == 2
    assert mem["per_env_rss_mib"] == pytest.approx(mem["env_worker_rss_mib"]["sampler"][0] / 2)
    assert mem["job_rss_mib"] > mem["node_rss_mib"]["learner"] > 0
    per_env = doc["memory"]["rss_per_env_mib"]
    assert set(per_env) == {"bare", "shards-1", "dvla"}
    assert all(10 < v < 1000 for v in per_env.values())
    ref = d["bare_reference"]
    assert ref["steps_per_s"] == pytest.approx(
        (ref["before"]["steps_per_s"] + ref["after"]["steps_per_s"]) / 2
    )
    r = doc["ratios"]
    assert r["dvla_vs_bare"] == pytest.approx(d["steps_per_s"] / ref["steps_per_s"])
    assert r["dvla_vs_bare_per_cpu_s"] == pytest.approx(
        d["steps_per_cpu_s"] / ref["steps_per_cpu_s"]
    )
    assert 0 < r["dvla_vs_bare"] < 2
    assert 0 < r["dvla_sampling_path_vs_bare_per_cpu_s"] < 2
    assert doc["checks"]["dvla_vs_bare"] == (r["dvla_vs_bare"] >= 0.9)
    assert "dvla / bare" in proc.stdout


# --------------------------------------------------------------------------- Meta-World


@pytest.fixture(scope="module")
def metaworld_python() -> str:
    return _interpreter("metaworld")


def test_metaworld_adapter(metaworld_python: str) -> None:
    with open_suite_shards(
        "metaworld", ["MT10", "reach-v3"], 2, 32, workers=1, python=metaworld_python
    ) as s:
        spec = s.spec
        assert len(spec.tasks) == 10
        assert spec.tasks[0] == "reach-v3"
        assert (spec.action_dim, spec.proprio_dim, spec.state_dim) == (4, 5, 9)
        assert spec.has_expert
        assert spec.instruction("pick-place-v3") == "pick up the puck and place it at the goal"
        assert "metaworld" in s.info[0]["versions"]
        shard = s.shards[0]
        shard.send_reset(["pick-place-v3"] * 2, [7, 7])
        b0 = shard.recv()
        assert b0.images.shape == (2, 32, 32, 3)
        np.testing.assert_array_equal(b0.images[0], b0.images[1])
        np.testing.assert_array_equal(b0.state[0], b0.state[1])
        shard.send_reset(["pick-place-v3", "pick-place-v3"], [7, 8], [False, True])
        assert not np.array_equal(shard.recv().state[1], b0.state[0])  # a new seed moves things
        # identity mapping: +x moves the hand +x, grip > 0 closes the fingers
        shard.send_reset(["reach-v3"] * 2, [1, 1])
        start = shard.recv()
        act = np.zeros((2, 4), np.float32)
        act[0] = [1.0, 0.0, 0.0, 1.0]
        act[1] = [-1.0, 0.0, 0.0, -1.0]
        for _ in range(5):
            shard.send_step(act)
            moved = shard.recv()
        dx = moved.proprio[:, 0] - start.proprio[:, 0]
        assert dx[0] > 0.02 > -0.02 > dx[1]
        assert moved.proprio[0, 3] < moved.proprio[1, 3]  # closed vs open
        assert moved.proprio[0, 4] > start.proprio[0, 4]  # elapsed fraction


def test_metaworld_scripted_experts_succeed(metaworld_python: str) -> None:
    tasks = ["reach-v3", "pick-place-v3"]
    with open_suite_shards(
        "metaworld", tasks, 2, 0, workers=1, python=metaworld_python, options={"max_steps": 150}
    ) as s:
        shard = s.shards[0]
        shard.send_reset(tasks, [3, 3])
        batch = shard.recv()
        success = np.zeros(2, bool)
        steps = 0
        while not batch.done.all():
            shard.send_expert()
            expert = shard.recv()
            assert expert.shape == (2, 4)
            assert np.abs(expert).max() <= 1.0
            shard.send_step(expert)
            batch = shard.recv()
            success |= batch.success
            steps += 1
        assert success.all(), f"experts failed within {steps} steps"


# --------------------------------------------------------------------------- LIBERO


def test_libero_adapter() -> None:
    python = _interpreter("libero")
    with open_suite_shards(
        "libero", ["libero_spatial/0"], 1, 32, workers=1, python=python, start_timeout=120
    ) as s:
        spec = s.spec
        assert (spec.action_dim, spec.proprio_dim, spec.state_dim) == (4, 8, 0)
        assert spec.max_steps == (220,)
        assert spec.instructions[0].startswith("pick up the black bowl")
        shard = s.shards[0]
        shard.send_reset(["libero_spatial/0"], [0])
        start = shard.recv()
        assert start.images.shape == (1, 32, 32, 3)
        assert start.images.std() > 5
        for _ in range(8):  # up and close: [dx, dy, dz, grip] -> OSC [dx, dy, dz, 0, 0, 0, grip]
            shard.send_step(np.array([[0.0, 0.0, 1.0, 1.0]], np.float32))
            moved = shard.recv()
        assert moved.proprio[0, 2] - start.proprio[0, 2] > 0.03  # eef z rose (m)
        assert moved.proprio[0, 6] < start.proprio[0, 6]  # finger joint closed in
        assert not moved.done[0]


def test_a_suite_interpreter_runs_this_checkouts_dvla(tmp_path: Path) -> None:
    """A suite's venv is shared by every checkout and holds an editable install of the one that
    made it; its workers must import *this* process's dvla (else: another version of the
    worker protocol, or no dvla at all once that checkout is gone)."""
    import os
    import shutil

    import dvla_bus
    import dvla_nodes
    from dvla_nodes.envs.vector import worker_environ

    assert worker_environ(None) is None
    assert worker_environ(sys.executable) is None
    other = shutil.which("python3", path="/usr/bin:/bin")
    if other is None or os.path.realpath(other) == os.path.realpath(sys.executable):
        pytest.skip("needs a second interpreter (/usr/bin/python3) besides this venv's")
    # A plain interpreter with no dvla installed, run where the checkout is not importable.
    # (find_spec: where each package would load from, without running dvla_bus's imports)
    probe = (
        "import importlib.util as u; "
        "print(u.find_spec('dvla_nodes').origin); print(u.find_spec('dvla_bus').origin)"
    )
    plain = subprocess.run(
        [other, "-I", "-c", "import dvla_nodes"], capture_output=True, cwd=tmp_path, check=False
    )
    assert plain.returncode != 0  # -I: isolated, no dvla
    env = worker_environ(other)
    assert env is not None
    out = subprocess.run(
        [other, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=True,
        timeout=30,
    )
    nodes_file, bus_file = out.stdout.split()
    assert Path(nodes_file).parent == Path(next(iter(dvla_nodes.__path__))).resolve()
    assert Path(bus_file).parent == Path(next(iter(dvla_bus.__path__))).resolve()
