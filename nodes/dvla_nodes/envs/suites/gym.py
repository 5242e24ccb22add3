"""Any gymnasium environment by id as a dvla suite (tasks are env ids, e.g. ``HalfCheetah-v5``).

* **Observation.** ``proprio`` is the env's observation flattened to float32
  (``gymnasium.spaces.flatten``); ``state`` is empty (``state_dim`` 0). With ``image_size`` > 0
  the env is made with ``render_mode="rgb_array"``; MuJoCo envs render at exactly that size with
  multisampling, shadows and reflections off (~60 times faster on a CPU, same camera), any other env
  renders at its own size and the centre square is resized. ``image_size`` 0 is state only.
* **Instruction.** The template option ``instruction`` (default ``"control the {name}"``), with
  ``{name}`` the id in words (``HalfCheetah-v5`` -> ``half cheetah``) and ``{id}`` the id.
* **Action.** This adapter declares ``action_dim`` = the size of the env's action space, not
  dvla's 4-d end-effector action (a cheetah has no end effector). A policy action
  ``a`` in [-1, 1]^action_dim maps, dimension by dimension (:class:`ActionMap`):
  ``Box`` -> ``low + (a + 1) / 2 * (high - low)`` (unbounded dimensions: ``a`` itself);
  ``Discrete(n, start)`` (action_dim 1) -> ``start + min(floor((a + 1) / 2 * n), n - 1)``;
  ``MultiDiscrete`` the same per dimension; ``MultiBinary`` -> ``a > 0``.
* **Reward.** ``reward`` is the env's reward; ``shaping`` = ``shaping_scale`` * reward
  (default 1: a gymnasium task's return is its objective); ``success`` is ``info["success"]``
  or ``info["is_success"]`` when the env reports one, else never. ``terminated`` or
  ``truncated`` (the env's own time limit) ends the episode; ``max_steps`` (0: the env's
  limit, else 1000) caps it. No scripted expert.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

from dvla_bus.errors import ConfigError
from dvla_nodes.envs.suites._interface import Observation, Options, Outcome, Suite, SuiteSpec
from dvla_nodes.envs.suites._render import fast_flags, resize, tune_model

DEFAULT_MAX_STEPS = 1000


@dataclass(frozen=True, slots=True)
class ActionMap:
    """The explicit map from a policy action in [-1, 1]^dim to one of ``space``'s actions."""

    space: gym.Space[Any]
    dim: int

    @staticmethod
    def of(space: gym.Space[Any]) -> ActionMap:
        if isinstance(space, gym.spaces.Box):
            return ActionMap(space, int(np.prod(space.shape)))
        if isinstance(space, gym.spaces.Discrete):
            return ActionMap(space, 1)
        if isinstance(space, gym.spaces.MultiDiscrete | gym.spaces.MultiBinary):
            return ActionMap(space, int(np.prod(space.shape)))
        raise ConfigError(
            f"action space {space}: the gym adapter maps Box, Discrete, MultiDiscrete and "
            "MultiBinary spaces"
        )

    def __call__(self, action: np.ndarray) -> Any:
        a = np.clip(np.asarray(action, np.float64).reshape(self.dim), -1.0, 1.0)
        space = self.space
        if isinstance(space, gym.spaces.Box):
            low = space.low.reshape(-1).astype(np.float64)
            high = space.high.reshape(-1).astype(np.float64)
            bounded = np.isfinite(low) & np.isfinite(high)
            low = np.where(bounded, low, 0.0)
            span = np.where(bounded, high, 0.0) - low
            out = np.where(bounded, low + (a + 1.0) * 0.5 * span, a)
            return out.reshape(space.shape).astype(space.dtype)
        if isinstance(space, gym.spaces.Discrete):
            n = int(space.n)
            return np.int64(int(space.start) + min(math.floor((a[0] + 1.0) * 0.5 * n), n - 1))
        if isinstance(space, gym.spaces.MultiDiscrete):
            nvec = space.nvec.reshape(-1).astype(np.int64)
            idx = np.minimum(np.floor((a + 1.0) * 0.5 * nvec).astype(np.int64), nvec - 1)
            return (idx + space.start.reshape(-1)).reshape(space.shape).astype(space.dtype)
        assert isinstance(space, gym.spaces.MultiBinary)
        return (a > 0).astype(np.int8).reshape(space.shape)

    def describe(self) -> str:
        space = self.space
        if isinstance(space, gym.spaces.Box):
            return f"[-1,1]^{self.dim} -> Box(low, high) affinely per dimension"
        if isinstance(space, gym.spaces.Discrete):
            return f"a[0] in [-1,1] -> Discrete({space.n}) by equal bins"
        if isinstance(space, gym.spaces.MultiDiscrete):
            return f"[-1,1]^{self.dim} -> MultiDiscrete by equal bins per dimension"
        return f"[-1,1]^{self.dim} -> MultiBinary (a > 0)"


def words_of(env_id: str) -> str:
    """``HalfCheetah-v5`` -> ``half cheetah``; ``ALE/Pong-v5`` -> ``pong``."""
    base = env_id.rsplit("/", 1)[-1]
    base = re.sub(r"-v\d+$", "", base)
    base = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", base)
    return " ".join(re.split(r"[^A-Za-z0-9]+", base)).strip().lower()


def _make(env_id: str, image_size: int, camera: str) -> gym.Env[Any, Any]:
    if image_size == 0:
        return gym.make(env_id, disable_env_checker=True)
    sized: dict[str, Any] = {"width": image_size, "height": image_size}
    if camera:
        sized["camera_name"] = camera
    try:  # MuJoCo envs render at the size we ask for
        return gym.make(env_id, render_mode="rgb_array", disable_env_checker=True, **sized)
    except TypeError:
        if camera:
            raise ConfigError(f"gym env {env_id!r} takes no camera_name option") from None
        return gym.make(env_id, render_mode="rgb_array", disable_env_checker=True)


class GymEnv:
    """One gymnasium env behind the suite interface (see the module docstring)."""

    def __init__(self, suite: GymSuite, task: str) -> None:
        self.task = task
        self.size = suite.image_size
        self.instruction = suite.spec.instruction(task)
        self.shaping_scale = float(suite.options["shaping_scale"])
        self.env = _make(task, self.size, str(suite.options["camera"]))
        self.actions = ActionMap.of(self.env.action_space)
        self._obs_space = self.env.observation_space
        self._model = getattr(self.env.unwrapped, "model", None)
        if isinstance(self._model, mujoco.MjModel) and self.size:
            tune_model(self._model, self.size)  # before the renderer's GL context exists
        self._tuned = False
        self._empty_state = np.zeros(0, np.float32)

    def _frame(self) -> np.ndarray:
        if not self.size:
            return np.zeros((0, 0, 3), np.uint8)
        image = self.env.render()
        if not self._tuned:  # the viewer exists after the first frame; later frames are fast
            self._tuned = True
            viewer = getattr(getattr(self.env.unwrapped, "mujoco_renderer", None), "viewer", None)
            if viewer is not None and hasattr(viewer, "scn"):
                fast_flags(viewer.scn)
                image = self.env.render()
        frame = np.asarray(image, np.uint8)
        if frame.shape[:2] != (self.size, self.size):
            frame = resize(frame, self.size)
        return frame

    def _observe(self, obs: Any) -> Observation:
        proprio = np.asarray(gym.spaces.flatten(self._obs_space, obs), np.float32)
        return Observation(self._frame(), proprio, self._empty_state, self.instruction)

    def reset(self, seed: int) -> Observation:
        obs, _ = self.env.reset(seed=int(seed))
        return self._observe(obs)

    def step(self, action: np.ndarray) -> tuple[Observation, Outcome]:
        obs, reward, terminated, truncated, info = self.env.step(self.actions(action))
        success = bool(info.get("success", info.get("is_success", False)))
        r = float(reward)
        out = Outcome(r, self.shaping_scale * r, success, bool(terminated or truncated))
        return self._observe(obs), out

    def expert(self) -> np.ndarray:
        raise ConfigError(f"gym env {self.task!r} has no scripted expert")

    def close(self) -> None:
        self.env.close()


class GymSuite(Suite):
    """Tasks are gymnasium ids; all of them must share action and observation sizes."""

    name = "gym"
    OPTIONS = {
        "instruction": "control the {name}",
        "max_steps": 0,
        "shaping_scale": 1.0,
        "camera": "",
    }

    def __init__(self, tasks: Sequence[str], image_size: int, options: Options | None = None):
        super().__init__(tasks, image_size, options)
        template = str(self.options["instruction"])
        instructions, limits, dims = [], [], set()
        mapping = ""
        for env_id in self.requested:
            try:
                spec = gym.spec(env_id)
            except gym.error.Error as exc:
                raise ConfigError(f"gym suite: unknown env id {env_id!r} ({exc})") from None
            env = gym.make(env_id, disable_env_checker=True)
            try:
                amap = ActionMap.of(env.action_space)
                dims.add((amap.dim, int(gym.spaces.flatdim(env.observation_space))))
                mapping = amap.describe()
            finally:
                env.close()
            instructions.append(template.format(name=words_of(env_id), id=env_id))
            own = int(self.options["max_steps"]) or spec.max_episode_steps or DEFAULT_MAX_STEPS
            limits.append(own)
        if len(dims) != 1:
            raise ConfigError(
                f"gym suite: tasks {', '.join(self.requested)} differ in action or observation "
                "size; open one suite per size"
            )
        ((action_dim, proprio_dim),) = dims
        self._spec = SuiteSpec(
            suite=self.name,
            tasks=self.requested,
            instructions=tuple(instructions),
            max_steps=tuple(limits),
            image_size=image_size,
            action_dim=action_dim,
            proprio_dim=proprio_dim,
            state_dim=0,
            has_expert=False,
            action_mapping=mapping,
        )

    @classmethod
    def check_tasks(cls, tasks: Sequence[str]) -> None:
        for env_id in tasks:
            try:
                gym.spec(env_id)
            except gym.error.Error as exc:
                raise ConfigError(f"gym suite: unknown env id {env_id!r} ({exc})") from None

    @property
    def spec(self) -> SuiteSpec:
        return self._spec

    def make(self, task: str) -> GymEnv:
        self._spec.index(task)
        return GymEnv(self, task)
