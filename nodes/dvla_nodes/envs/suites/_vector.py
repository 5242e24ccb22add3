"""N environments of one suite stepped as one batch, with :class:`VectorEnv`'s semantics.

Slot i is reset to its own (task, seed); a slot whose episode ended (success, the suite's own
termination, or the task's step limit) stays done — not stepped, reward 0 — until the next
``reset``, so rollouts are whole episodes. A slot keeps its environment while its task stays
the same and rebuilds it when the task changes (cheap for Meta-World and gymnasium, seconds
for LIBERO, whose GRPO groups keep one task per slot anyway).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import numpy as np

from dvla_bus.errors import ConfigError, ResourceError
from dvla_nodes.envs.suites._interface import Observation, Suite, SuiteEnv, SuiteSpec
from dvla_nodes.envs.vector import StepBatch


class SuiteVectorEnv:
    """``num_envs`` environments of ``suite`` in this process; owns the suite (closes it).

    Same API as :class:`~dvla_nodes.envs.vector.VectorEnv` (``reset``/``step``/
    ``expert_actions``, and the split-phase ``send_*``/``recv``), so it runs in-process as a
    sampler shard or inside a worker process behind :class:`RemoteVectorEnv`. Not thread-safe.
    """

    def __init__(self, suite: Suite, num_envs: int) -> None:
        if num_envs < 1:
            raise ConfigError(f"num_envs={num_envs}: need at least one environment")
        self.suite = suite
        self.spec: SuiteSpec = suite.spec
        self.num_envs = num_envs
        self.image_size = self.spec.image_size
        s, n = self.spec.image_size, num_envs
        self._envs: list[SuiteEnv | None] = [None] * n
        self._tasks: list[str] = [""] * n
        self._steps = np.zeros(n, np.int64)
        self._limit = np.zeros(n, np.int64)
        self._images = np.zeros((n, s, s, 3), np.uint8)
        self._proprio = np.zeros((n, self.spec.proprio_dim), np.float32)
        self._state = np.zeros((n, self.spec.state_dim), np.float32)
        self._instructions = [""] * n
        self._done = np.ones(n, bool)
        self._pending: StepBatch | np.ndarray | None = None

    def _put(self, i: int, obs: Observation) -> None:
        if self.image_size:
            self._images[i] = obs.image
        self._proprio[i] = obs.proprio
        self._state[i] = obs.state
        self._instructions[i] = obs.instruction

    def _batch(self, reward: np.ndarray, shaping: np.ndarray, success: np.ndarray) -> StepBatch:
        return StepBatch(
            images=self._images.copy(),
            proprio=self._proprio.copy(),
            state=self._state.copy(),
            instructions=tuple(self._instructions),
            reward=reward,
            shaping=shaping,
            success=success,
            done=self._done.copy(),
        )

    def reset(
        self, tasks: Sequence[str], seeds: Sequence[int], mask: Sequence[bool] | None = None
    ) -> StepBatch:
        """Start slot i on ``tasks[i]`` with episode seed ``seeds[i]``; with ``mask``, only the
        slots where it is true (the others keep their episode; their entries are ignored)."""
        n = self.num_envs
        if len(tasks) != n or len(seeds) != n:
            raise ConfigError(f"reset needs {n} tasks and seeds, got {len(tasks)} and {len(seeds)}")
        for i, (task, seed) in enumerate(zip(tasks, seeds, strict=True)):
            if mask is not None and not mask[i]:
                continue
            limit = self.spec.steps_limit(task)  # ConfigError for a task not opened
            env = self._envs[i]
            if env is None or self._tasks[i] != task:
                if env is not None:
                    env.close()
                    self._envs[i] = None
                env = self._envs[i] = self.suite.make(task)
                self._tasks[i] = task
            self._put(i, env.reset(int(seed)))
            self._steps[i] = 0
            self._limit[i] = limit
            self._done[i] = False
        return self._batch(np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, bool))

    def step(self, actions: np.ndarray) -> StepBatch:
        """Step every slot not yet done with its row of ``actions`` (float (N, action_dim))."""
        actions = np.asarray(actions, np.float32)
        n, dim = self.num_envs, self.spec.action_dim
        if actions.shape != (n, dim):
            raise ConfigError(
                f"suite {self.spec.suite!r}: actions shape {actions.shape}, expected ({n}, {dim})"
            )
        reward = np.zeros(n, np.float32)
        shaping = np.zeros(n, np.float32)
        success = np.zeros(n, bool)
        for i, env in enumerate(self._envs):
            if self._done[i] or env is None:
                continue
            obs, out = env.step(np.clip(actions[i], -1.0, 1.0))
            self._steps[i] += 1
            self._put(i, obs)
            reward[i] = out.reward
            shaping[i] = out.shaping
            success[i] = out.success
            if out.success or out.terminated or self._steps[i] >= self._limit[i]:
                self._done[i] = True
        return self._batch(reward, shaping, success)

    def expert_actions(self) -> np.ndarray:
        """The scripted experts' actions, float32 (N, action_dim); zeros for idle slots."""
        if not self.spec.has_expert:
            raise ConfigError(f"suite {self.spec.suite!r} has no scripted expert")
        out = np.zeros((self.num_envs, self.spec.action_dim), np.float32)
        for i, env in enumerate(self._envs):
            if env is not None and not self._done[i]:
                out[i] = env.expert()
        return out

    # split-phase API, same as VectorEnv (computed at send, returned by recv)
    def send_reset(
        self, tasks: Sequence[str], seeds: Sequence[int], mask: Sequence[bool] | None = None
    ) -> None:
        self._pending = self.reset(tasks, seeds, mask)

    def send_step(self, actions: np.ndarray) -> None:
        self._pending = self.step(actions)

    def send_expert(self) -> None:
        self._pending = self.expert_actions()

    def recv(self) -> Any:
        out, self._pending = self._pending, None
        if out is None:
            raise ResourceError("SuiteVectorEnv.recv() without a pending send_*()")
        return out

    def close(self) -> None:
        for i, env in enumerate(self._envs):
            if env is not None:
                with contextlib.suppress(Exception):  # one broken env must not leak the rest
                    env.close()
                self._envs[i] = None
        self.suite.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class DriveResult:
    """What :func:`drive` did: ``steps`` environment transitions (a done slot is not counted)
    and ``episodes`` finished, in ``seconds`` of wall time (resets included)."""

    steps: int
    episodes: int
    seconds: float
    cpu_s: float | None = None

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0

    @property
    def steps_per_cpu_s(self) -> float | None:
        """Steps per CPU-second of the processes ``cpu`` counted: robust to other load."""
        return self.steps / self.cpu_s if self.cpu_s else None


def drive(
    shards: Sequence[Any],
    spec: SuiteSpec,
    seconds: float,
    seed: int = 0,
    *,
    warmup: int = 2,
    cpu: Callable[[], float] | None = None,
) -> DriveResult:
    """Step ``shards`` with uniform random actions for ``seconds`` (after ``warmup`` steps per
    shard), one command outstanding per shard, round-robin — the sampler's access pattern
    without a policy. Done slots are reset (slot i always to task i of ``spec``, modulo the
    number of tasks) with fresh seeds.
    The same loop measures an in-process shard (the bare loop) and worker-process shards.
    ``cpu`` (CPU seconds of the processes involved, e.g. ``time.process_time``) is read when
    the measurement starts and ends."""
    rng = np.random.default_rng(seed)
    counter = [seed * 1_000_003]

    def send_reset(shard: Any, mask: Sequence[bool]) -> None:
        # slot i keeps task i (mod the task list), as a GRPO group keeps its task: no slot
        # rebuilds its environment for a new task mid-measurement
        tasks = [spec.tasks[i % len(spec.tasks)] for i in range(len(mask))]
        seeds = [counter[0] + i for i in range(len(mask))]
        counter[0] += len(mask)
        shard.send_reset(tasks, seeds, list(mask))

    def send_step(shard: Any) -> None:
        shard.send_step(rng.uniform(-1.0, 1.0, (shard.num_envs, spec.action_dim)))

    phase = ["reset"] * len(shards)
    for shard in shards:
        send_reset(shard, [True] * shard.num_envs)
    warm = [0] * len(shards)  # step results seen per shard
    steps = episodes = 0
    t0: float | None = None
    cpu0 = 0.0
    while t0 is None or time.perf_counter() - t0 < seconds:
        for k, shard in enumerate(shards):
            batch: StepBatch = shard.recv()
            if phase[k] == "step":  # every slot was live: drive resets done slots at once
                warm[k] += 1
                steps += shard.num_envs
                episodes += int(np.count_nonzero(batch.done))
            if batch.done.any():
                send_reset(shard, batch.done.tolist())
                phase[k] = "reset"
            else:
                send_step(shard)
                phase[k] = "step"
        if t0 is None and min(warm) >= warmup:
            t0, steps, episodes = time.perf_counter(), 0, 0
            cpu0 = cpu() if cpu is not None else 0.0
    assert t0 is not None
    elapsed = time.perf_counter() - t0
    cpu_s = cpu() - cpu0 if cpu is not None else None
    for shard in shards:  # leave no command outstanding
        shard.recv()
    return DriveResult(steps, episodes, elapsed, cpu_s)
