"""The embedded task suite: spaces, seeding, experts, rendering, instructions, vectorised forms."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from dvla_bus.errors import ConfigError
from dvla_nodes.envs import (
    TASK_NAMES,
    TASKS,
    RemoteVectorEnv,
    TabletopEnv,
    VectorEnv,
    vocabulary,
)
from dvla_nodes.envs.experts import expert_action
from dvla_nodes.envs.scene import build_model
from dvla_nodes.envs.sim import TabletopSim


def test_suite_has_eight_tasks_over_at_least_three_skills() -> None:
    assert len(TASKS) >= 8
    assert len({s.skill for s in TASKS.values()}) >= 3


@pytest.mark.parametrize("task", TASK_NAMES)
def test_gymnasium_make_spaces_and_instruction(task: str) -> None:
    env = gym.make(f"dvla/{task}")
    try:
        obs, info = env.reset(seed=5)
        assert env.observation_space.contains(obs)
        space = env.action_space
        assert isinstance(space, gym.spaces.Box)
        assert space.shape == (4,)
        assert env.action_space.dtype == np.float32
        assert np.all(space.low == -1.0)
        assert np.all(space.high == 1.0)
        assert obs["instruction"] in TASKS[task].instructions
        assert info["instruction"] == obs["instruction"]
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)
        assert isinstance(reward, float)
        assert not (terminated and truncated)
    finally:
        env.close()


def test_instructions_name_the_objects_and_have_paraphrases() -> None:
    for spec in TASKS.values():
        texts = spec.instructions
        assert len(set(texts)) >= 3, spec.name
        for text in texts:
            assert spec.block in text.split()
            if spec.target is not None:
                assert spec.target in text.split()
            assert set(text.split()) <= set(vocabulary())


def _rollout(env: TabletopEnv, seed: int, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    obs, _ = env.reset(seed=seed)
    images, proprio = [obs["image"]], [obs["proprio"]]
    for a in actions:
        obs, *_ = env.step(a)
        images.append(obs["image"])
        proprio.append(obs["proprio"])
    return np.stack(images), np.stack(proprio)


def test_same_seed_same_episode_other_seed_other_layout() -> None:
    actions = np.random.default_rng(0).uniform(-1, 1, (15, 4)).astype(np.float32)
    a, b = TabletopEnv("push-red-green"), TabletopEnv("push-red-green")
    try:
        im1, p1 = _rollout(a, 11, actions)
        im2, p2 = _rollout(b, 11, actions)
        np.testing.assert_array_equal(im1, im2)
        np.testing.assert_array_equal(p1, p2)
        im3, _ = _rollout(b, 12, actions)
        assert not np.array_equal(im1[0], im3[0])
    finally:
        a.close()
        b.close()


def test_render_shape_dtype_and_content() -> None:
    for size in (64, 32):
        env = TabletopEnv("reach-blue", image_size=size)
        try:
            env.reset(seed=0)
            img = env.render()
            assert img.shape == (size, size, 3)
            assert img.dtype == np.uint8
            assert img.std() > 5.0  # not a blank frame
            # the red and blue blocks are visible as saturated pixels
            r, g, b = (img[..., i].astype(int) for i in range(3))
            assert ((r > 150) & (g < 80) & (b < 80)).any()
            assert ((b > 150) & (r < 80)).any()
        finally:
            env.close()


def test_every_task_solved_by_its_expert() -> None:
    seeds = 8
    tasks = [t for t in TASK_NAMES for _ in range(seeds)]
    with VectorEnv(len(tasks), image_size=32) as env:
        batch = env.reset(tasks, [1000 + i for i in range(len(tasks))])
        solved = np.zeros(len(tasks), bool)
        while not batch.done.all():
            batch = env.step(env.expert_actions())
            solved |= batch.success
    for task in TASK_NAMES:
        rate = solved[[t == task for t in tasks]].mean()
        assert rate >= 0.95, f"{task}: expert success {rate:.0%}"


def test_experts_tolerate_action_noise() -> None:
    """Demonstrations and cloned policies are imprecise: an expert must still finish its task
    when every action carries Gaussian noise of std 0.2 (1 cm per step). Experts that hovered
    until the gripper was within 5 mm of its goal managed 3-21 % on pick, place and push."""
    model = build_model(32)
    for task in TASK_NAMES:
        spec = TASKS[task]
        sim = TabletopSim(model)
        rng = np.random.default_rng(7)
        solved = 0
        for i in range(24):
            sim.reset(spec, 2000 + i)
            for _ in range(spec.max_steps):
                noisy = expert_action(spec, sim.state()) + rng.normal(0.0, 0.2, 4)
                sim.step(np.clip(noisy, -1.0, 1.0))
                if sim.success():
                    solved += 1
                    break
        assert solved / 24 >= 0.6, f"{task}: {solved}/24 under action noise 0.2"


def test_success_terminates_with_reward_one() -> None:
    env = TabletopEnv("reach-red")
    try:
        env.reset(seed=3)
        from dvla_nodes.envs import expert_action

        for _ in range(TASKS["reach-red"].max_steps):
            _, reward, terminated, truncated, info = env.step(
                expert_action(env.spec_task, env.sim.state())
            )
            if terminated:
                assert reward == 1.0
                assert info["success"]
                assert not truncated
                break
        else:
            pytest.fail("expert never terminated the episode")
    finally:
        env.close()


def test_truncation_at_the_step_limit() -> None:
    env = TabletopEnv("pick-red")
    try:
        env.reset(seed=0)
        up = np.array([0.0, 0.0, 1.0, -1.0], np.float32)
        for i in range(TASKS["pick-red"].max_steps):
            _, reward, terminated, truncated, _ = env.step(up)
            assert reward == 0.0
            assert not terminated
            assert truncated == (i == TASKS["pick-red"].max_steps - 1)
    finally:
        env.close()


def test_vector_env_done_slots_stay_done_and_reset_mask() -> None:
    with VectorEnv(2, image_size=32) as env:
        batch = env.reset(["reach-red", "reach-red"], [0, 0])
        np.testing.assert_array_equal(batch.images[0], batch.images[1])
        assert not batch.done.any()
        limit = TASKS["reach-red"].max_steps
        for _ in range(limit):
            batch = env.step(np.zeros((2, 4), np.float32))
        assert batch.done.all()
        frozen = batch.images.copy()
        batch = env.step(np.ones((2, 4), np.float32))
        np.testing.assert_array_equal(batch.images, frozen)
        assert batch.reward.sum() == 0.0
        batch = env.reset(["pick-blue", "reach-red"], [4, 0], mask=[True, False])
        assert batch.done.tolist() == [False, True]
        with pytest.raises(ConfigError):
            env.reset(["nope", "reach-red"], [0, 0])


def test_remote_vector_env_matches_in_process() -> None:
    tasks = ["push-blue-yellow", "place-red-yellow", "reach-blue"]
    seeds = [7, 8, 9]
    actions = np.random.default_rng(1).uniform(-1, 1, (6, 3, 4)).astype(np.float32)
    with VectorEnv(3, image_size=32) as local, RemoteVectorEnv(3, image_size=32) as remote:
        a, b = local.reset(tasks, seeds), remote.reset(tasks, seeds)
        for act in actions:
            a, b = local.step(act), remote.step(act)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.proprio, b.proprio)
        assert a.instructions == b.instructions
        np.testing.assert_array_equal(local.expert_actions(), remote.expert_actions())


def test_privileged_state_tracks_the_scene() -> None:
    with VectorEnv(1, image_size=32) as env:
        batch = env.reset(["push-red-green"], [21])
        s = env.sims[0].state()
        red = batch.state[0, :3]
        np.testing.assert_allclose(red[:2], s.blocks["red"][:2] / 0.2, atol=1e-6)
        np.testing.assert_allclose(red[2], (s.blocks["red"][2] - 0.1) / 0.1, atol=1e-5)
        np.testing.assert_allclose(batch.state[0, 6:8], s.targets["green"] / 0.2, atol=1e-6)
