"""Meta-World v3 (PyPI ``metaworld``) as a dvla suite. Runs in its own environment
(``dvla env create metaworld``): Meta-World pins its own mujoco.

* **Tasks.** Meta-World env names (``reach-v3``, ``pick-place-v3``, ... 50 of them); ``MT10``
  and ``MT50`` expand to their benchmark's tasks. The seed fully determines an episode: it seeds
  the env's generator, which draws the object and goal positions (as Meta-World's
  ``goal_observable`` envs do), so a GRPO group (one task, one seed) starts identically.
* **Instruction.** One sentence per task, after the task descriptions of the Meta-World paper.
* **Action (identity).** dvla's action is already Meta-World's: ``[dx, dy, dz, grip]`` in
  [-1, 1], ``dx..dz`` the end-effector (mocap) displacement (Meta-World scales 1.0 to 1 cm per
  step, where the embedded suite uses 5 cm), ``grip`` > 0 closes the gripper. ``action_dim`` 4.
* **Observation.** Frames from camera ``camera`` (default ``corner``: the workspace fills the
  frame; the ``corner`` cameras are mounted upside down in the model, so their frames are turned
  180 degrees). ``proprio`` (5): hand xyz
  (centred on (0, 0.6, 0.2) m and divided by (0.5, 0.4, 0.3) m), gripper opening (2d - 1,
  d in [0, 1]) and the elapsed fraction of the episode (2t/T - 1). ``state`` (9): the two
  object positions and the goal, scaled like the hand (privileged; auxiliary targets only).
* **Reward.** ``reward`` is Meta-World's dense v3 reward (0-10 per step); ``shaping`` =
  ``shaping_scale`` * that reward (default 0: success only, as in VLA RL on LIBERO);
  ``success`` is Meta-World's ``info["success"]``; an episode ends on success or after
  ``max_steps`` (default 500, Meta-World's ``max_path_length``).
* **Expert.** Meta-World's scripted policies (``metaworld.policies``), clipped to [-1, 1].
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from dvla_bus.errors import ConfigError
from dvla_nodes.envs.suites._interface import (
    Observation,
    Options,
    Outcome,
    Suite,
    SuiteSpec,
    require,
)
from dvla_nodes.envs.suites._render import FastRenderer

MAX_PATH_LENGTH = 500
PROPRIO_DIM = 5
STATE_DIM = 9
_CENTRE = np.array([0.0, 0.6, 0.2])
_SCALE = np.array([0.5, 0.4, 0.3])

MT10: tuple[str, ...] = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)

INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "pick up the nut and place it onto the peg",
    "basketball-v3": "pick up the ball and dunk it into the basket",
    "bin-picking-v3": "grasp the puck from one bin and place it into the other bin",
    "box-close-v3": "grasp the cover and close the box with it",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button from the top behind the wall",
    "button-press-v3": "press the button",
    "button-press-wall-v3": "press the button behind the wall",
    "coffee-button-v3": "push the button on the coffee machine",
    "coffee-pull-v3": "pull the mug from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "rotate the dial",
    "disassemble-v3": "pick the nut off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by turning the lock clockwise",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by turning the lock counterclockwise",
    "hand-insert-v3": "insert the gripper into the hole",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "open the drawer",
    "faucet-open-v3": "turn the faucet counterclockwise",
    "faucet-close-v3": "turn the faucet clockwise",
    "hammer-v3": "hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the puck up out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the cabinet",
    "plate-slide-side-v3": "slide the plate into the cabinet from the side",
    "plate-slide-back-v3": "slide the plate out of the cabinet",
    "plate-slide-back-side-v3": "slide the plate out of the cabinet to the side",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg to the side",
    "soccer-v3": "kick the ball into the goal",
    "stick-push-v3": "grasp the stick and push the box with it",
    "stick-pull-v3": "grasp the stick and pull the box with it",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck to the goal behind the wall",
    "push-back-v3": "push the puck back to the goal",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach the goal position behind the wall",
    "shelf-place-v3": "pick up the puck and place it onto the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
"""Task -> instruction for all 50 Meta-World v3 tasks (MT50 is this list, in this order)."""

MT50: tuple[str, ...] = tuple(INSTRUCTIONS)
BENCHMARKS: dict[str, tuple[str, ...]] = {"MT10": MT10, "MT50": MT50}


def expand(tasks: Sequence[str]) -> tuple[str, ...]:
    """Task names with benchmark names (``MT10``, ``MT50``) replaced by their tasks, in order,
    without duplicates; a ConfigError names an unknown task."""
    out: list[str] = []
    for t in tasks:
        for name in BENCHMARKS.get(t, (t,)):
            if name not in INSTRUCTIONS:
                raise ConfigError(
                    f"metaworld: unknown task {name!r}; use MT10, MT50 or a task such as "
                    f"reach-v3 (all: {', '.join(MT50)})"
                )
            if name not in out:
                out.append(name)
    return tuple(out)


def _scaled(p: np.ndarray) -> np.ndarray:
    out: np.ndarray = (np.asarray(p, np.float64) - _CENTRE) / _SCALE
    return out


class MetaWorldEnv:
    """One Meta-World task (see the module docstring)."""

    def __init__(self, suite: MetaWorldSuite, task: str) -> None:
        env_dict = suite.mw_envs
        self.task = task
        self.instruction = INSTRUCTIONS[task]
        self.limit = suite.spec.steps_limit(task)
        self.shaping_scale = float(suite.options["shaping_scale"])
        env = env_dict.ALL_V3_ENVIRONMENTS[task]()
        # What Meta-World's goal-observable variants do: the goal is in the state observation
        # (the scripted experts read it) and each reset draws a fresh layout from the env's
        # seeded generator.
        env._partially_observable = False
        env.__dict__.pop("sawyer_observation_space", None)  # a cached property: recompute
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env._set_task_called = True
        env.max_path_length = max(MAX_PATH_LENGTH, self.limit)
        self.env = env
        self.policy = suite.mw_policies.ENV_POLICY_MAP[task]()
        camera = str(suite.options["camera"])
        size = suite.image_size
        self.renderer = (
            FastRenderer(env.model, size, camera, rotate=camera.startswith("corner"))
            if size
            else None
        )
        self.size = size
        self._obs = np.zeros(39)
        self._t = 0

    def _observe(self) -> Observation:
        o = self._obs
        proprio = np.empty(PROPRIO_DIM, np.float32)
        proprio[:3] = _scaled(o[0:3])
        proprio[3] = 2.0 * o[3] - 1.0
        proprio[4] = 2.0 * self._t / self.limit - 1.0
        state = np.concatenate([_scaled(o[4:7]), _scaled(o[11:14]), _scaled(o[36:39])])
        image = (
            self.renderer.render(self.env.data)
            if self.renderer is not None
            else np.zeros((0, 0, 3), np.uint8)
        )
        return Observation(image, proprio, state.astype(np.float32), self.instruction)

    def reset(self, seed: int) -> Observation:
        self.env.seed(int(seed))
        obs, _ = self.env.reset()
        self._obs = np.asarray(obs, np.float64)
        self._t = 0
        return self._observe()

    def step(self, action: np.ndarray) -> tuple[Observation, Outcome]:
        a = np.clip(np.asarray(action, np.float32).reshape(4), -1.0, 1.0)
        obs, reward, _, truncated, info = self.env.step(a)
        self._obs = np.asarray(obs, np.float64)
        self._t += 1
        r = float(reward)
        success = bool(info.get("success", 0.0) > 0)
        return self._observe(), Outcome(r, self.shaping_scale * r, success, bool(truncated))

    def expert(self) -> np.ndarray:
        with warnings.catch_warnings():  # "Constant(s) may be too high": the env clips anyway
            warnings.simplefilter("ignore")
            a = np.asarray(self.policy.get_action(self._obs), np.float32)
        out: np.ndarray = np.clip(a, -1.0, 1.0)
        return out

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None
        self.env.close()


class MetaWorldSuite(Suite):
    name = "metaworld"
    OPTIONS = {"camera": "corner", "max_steps": MAX_PATH_LENGTH, "shaping_scale": 0.0}

    def __init__(self, tasks: Sequence[str], image_size: int, options: Options | None = None):
        super().__init__(tasks, image_size, options)
        tasks = expand(self.requested)
        require(self.name, "metaworld")
        self.mw_envs: Any = require(self.name, "metaworld.env_dict")
        self.mw_policies: Any = require(self.name, "metaworld.policies")
        limit = int(self.options["max_steps"])
        if limit < 1:
            raise ConfigError(f"metaworld: max_steps={limit} must be >= 1")
        self._spec = SuiteSpec(
            suite=self.name,
            tasks=tasks,
            instructions=tuple(INSTRUCTIONS[t] for t in tasks),
            max_steps=(limit,) * len(tasks),
            image_size=image_size,
            action_dim=4,
            proprio_dim=PROPRIO_DIM,
            state_dim=STATE_DIM,
            has_expert=True,
            action_mapping="identity: [dx, dy, dz] 1.0 = 1 cm mocap step, grip > 0 closes",
        )

    @classmethod
    def check_tasks(cls, tasks: Sequence[str]) -> None:
        expand(tasks)

    @property
    def spec(self) -> SuiteSpec:
        return self._spec

    def make(self, task: str) -> MetaWorldEnv:
        self._spec.index(task)
        return MetaWorldEnv(self, task)
