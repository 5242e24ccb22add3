"""The gymnasium face of one task: ``gymnasium.make("dvla/<task>")``.

Observation: ``{"image": uint8 (H, W, 3), "proprio": float32 (7,), "instruction": str}``.
Action: float32 (4,) in [-1, 1]: end-effector displacement (x, y, z; 1.0 = 5 cm) and gripper
(> 0 closes). Reward: 1.0 on the step the task succeeds (the episode then terminates), plus,
when ``shaping > 0``, ``shaping * (potential(t+1) - potential(t))`` (potential-based, metres).
Episodes are truncated at the task's step limit.
"""

from __future__ import annotations

import string
from typing import Any

import gymnasium as gym
import numpy as np

from dvla_bus.errors import ConfigError
from dvla_nodes.envs.scene import build_model
from dvla_nodes.envs.sim import ACTION_DIM, PROPRIO_DIM, SceneRenderer, TabletopSim
from dvla_nodes.envs.tasks import TASKS

INSTRUCTION_CHARSET = frozenset(string.ascii_lowercase + " ")
INSTRUCTION_MAX_CHARS = 96


def task_spec(task: str) -> Any:
    """The :class:`TaskSpec` named ``task``; a ConfigError naming the choices otherwise."""
    try:
        return TASKS[task]
    except KeyError:
        raise ConfigError(f"unknown task {task!r}; the suite has: {', '.join(TASKS)}") from None


def observation_space(image_size: int) -> gym.spaces.Dict:
    return gym.spaces.Dict(
        {
            "image": gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
            "proprio": gym.spaces.Box(-1.5, 1.5, (PROPRIO_DIM,), np.float32),
            "instruction": gym.spaces.Text(
                INSTRUCTION_MAX_CHARS, min_length=1, charset=INSTRUCTION_CHARSET
            ),
        }
    )


def action_space() -> gym.spaces.Box:
    return gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)


class TabletopEnv(gym.Env[dict[str, Any], np.ndarray]):
    """One task of the suite as a gymnasium env. Owns its model and renderer; call ``close``."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        task: str = "reach-red",
        image_size: int = 64,
        shaping: float = 0.0,
        render_mode: str | None = "rgb_array",
    ) -> None:
        if image_size < 16:
            raise ConfigError(f"image_size={image_size}: must be at least 16 pixels")
        self.spec_task = task_spec(task)
        self.image_size = image_size
        self.shaping = shaping
        self.render_mode = render_mode
        self.observation_space = observation_space(image_size)
        self.action_space = action_space()
        self._model = build_model(image_size)
        self._sim = TabletopSim(self._model)
        self._renderer: SceneRenderer | None = None
        self._potential = 0.0

    @property
    def sim(self) -> TabletopSim:
        """The underlying simulation (privileged state for experts and tests)."""
        return self._sim

    def _obs(self) -> dict[str, Any]:
        return {
            "image": self.render(),
            "proprio": self._sim.proprio(),
            "instruction": self._sim.instruction,
        }

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        super().reset(seed=seed)
        episode_seed = int(self.np_random.integers(2**31 - 1)) if seed is None else int(seed)
        self._sim.reset(self.spec_task, episode_seed)
        self._potential = self._sim.potential()
        return self._obs(), {"task": self.spec_task.name, "instruction": self._sim.instruction}

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        self._sim.step(action)
        success = self._sim.success()
        reward = 1.0 if success else 0.0
        if self.shaping > 0.0:
            potential = self._sim.potential()
            reward += self.shaping * (potential - self._potential)
            self._potential = potential
        truncated = not success and self._sim.steps >= self.spec_task.max_steps
        return self._obs(), reward, success, truncated, {"success": success}

    def render(self) -> np.ndarray:
        if self._renderer is None:
            self._renderer = SceneRenderer(self._model, self.image_size)
        return self._renderer.render(self._sim.data)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
