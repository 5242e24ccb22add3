"""The sampler: runs whole episodes on environment shards and returns them as numpy arrays.

Shards are :class:`VectorEnv` (in process), :class:`RemoteVectorEnv` (a worker process each) or
any suite's shards (:func:`dvla_nodes.envs.suites.open_suite_shards`); actions have the size the
policy (or the scripted expert) gives, the suite's ``action_dim``.
The loop keeps exactly one command outstanding per shard and serves shards round-robin, so while
one worker steps its environments the policy infers actions for another: with two workers both
cores stay busy. A slot whose episode ends is immediately reset to the next (task, seed) in the
queue, so short tasks do not wait for long ones.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from dvla_bus.errors import DvlaError
from dvla_nodes.envs.sim import ACTION_DIM
from dvla_nodes.envs.vector import StepBatch
from dvla_nodes.policy.act import ActOutput
from dvla_nodes.policy.actions import actions_to_tokens

PolicyFn = Callable[[np.ndarray, np.ndarray, Sequence[str]], ActOutput]


class RolloutAborted(DvlaError):
    """:func:`run_episodes` stopped early because its ``stop`` event was set; every shard was
    left with no command outstanding (so another thread may close it)."""


class Shard(Protocol):
    num_envs: int

    def send_reset(
        self, tasks: Sequence[str], seeds: Sequence[int], mask: Sequence[bool] | None = None
    ) -> None: ...

    def send_step(self, actions: np.ndarray) -> None: ...

    def send_expert(self) -> None: ...

    def recv(self) -> object: ...


@dataclass(frozen=True, slots=True)
class Episodes:
    """Complete episodes, steps concatenated in episode order.

    Per step (T rows): ``images`` uint8 (T, H, W, 3), ``proprio`` float32 (T, P), ``state``
    float32 (T, S) privileged object positions (auxiliary supervision only), ``tokens``
    int64 (T, A) the action tokens taken (for demonstrations: the expert's), ``logp`` float32
    (T, A) their behaviour log-probabilities (0 for demonstrations), ``episode`` int32 (T,) the
    row's episode index. Per episode (E rows): the task, seed, instruction, success, length,
    shaping return (potential at the end minus at the start, metres), sampling policy version
    and group id.
    """

    images: np.ndarray
    proprio: np.ndarray
    state: np.ndarray
    tokens: np.ndarray
    logp: np.ndarray
    episode: np.ndarray
    tasks: tuple[str, ...]
    seeds: np.ndarray
    instructions: tuple[str, ...]
    success: np.ndarray
    length: np.ndarray
    shaping: np.ndarray
    version: np.ndarray
    group: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_episodes(self) -> int:
        return len(self.tasks)

    def success_by_task(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in sorted(set(self.tasks)):
            sel = np.array([x == t for x in self.tasks])
            out[t] = float(self.success[sel].mean())
        return out

    def select(self, keep: np.ndarray) -> Episodes:
        """The episodes where ``keep`` (bool (E,)) is true, renumbered."""
        keep = np.asarray(keep, bool)
        new_index = np.cumsum(keep) - 1
        rows = keep[self.episode]
        return Episodes(
            images=self.images[rows],
            proprio=self.proprio[rows],
            state=self.state[rows],
            tokens=self.tokens[rows],
            logp=self.logp[rows],
            episode=new_index[self.episode[rows]].astype(np.int32),
            tasks=tuple(t for t, k in zip(self.tasks, keep, strict=True) if k),
            seeds=self.seeds[keep],
            instructions=tuple(t for t, k in zip(self.instructions, keep, strict=True) if k),
            success=self.success[keep],
            length=self.length[keep],
            shaping=self.shaping[keep],
            version=self.version[keep],
            group=self.group[keep],
        )

    @staticmethod
    def concat(parts: Sequence[Episodes]) -> Episodes:
        """Episodes of all ``parts``, in order. Group ids stay distinct: each part's groups are
        renumbered past the previous parts' (two samplers' group 0 are two GRPO groups)."""
        offsets = np.cumsum([0, *(p.num_episodes for p in parts)])
        group_offsets = np.cumsum(
            [0, *((int(p.group.max()) + 1 if len(p.group) else 0) for p in parts)]
        )
        return Episodes(
            images=np.concatenate([p.images for p in parts]),
            proprio=np.concatenate([p.proprio for p in parts]),
            state=np.concatenate([p.state for p in parts]),
            tokens=np.concatenate([p.tokens for p in parts]),
            logp=np.concatenate([p.logp for p in parts]),
            episode=np.concatenate([p.episode + o for p, o in zip(parts, offsets, strict=False)]),
            tasks=tuple(t for p in parts for t in p.tasks),
            seeds=np.concatenate([p.seeds for p in parts]),
            instructions=tuple(t for p in parts for t in p.instructions),
            success=np.concatenate([p.success for p in parts]),
            length=np.concatenate([p.length for p in parts]),
            shaping=np.concatenate([p.shaping for p in parts]),
            version=np.concatenate([p.version for p in parts]),
            group=np.concatenate([p.group + o for p, o in zip(parts, group_offsets, strict=False)]),
        )


@dataclass(slots=True)
class _Open:
    index: int
    task: str
    seed: int
    group: int
    instruction: str = ""
    images: list[np.ndarray] = field(default_factory=list)
    proprio: list[np.ndarray] = field(default_factory=list)
    state: list[np.ndarray] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)
    logp: list[np.ndarray] = field(default_factory=list)
    shaping: float = 0.0
    success: bool = False
    noise: np.random.Generator | None = None  # this episode's DART noise stream


@dataclass(frozen=True, slots=True)
class Assignment:
    task: str
    seed: int
    group: int = -1


def synthetic_episodes(
    seed: int,
    lengths: Sequence[int],
    *,
    group_size: int = 4,
    image: int = 64,
    bins: int = 256,
    version: int = 0,
) -> Episodes:
    """Complete episodes of the embedded suite's shape without a simulator: random frames,
    proprioception, state, tokens and behaviour log-probs, random tasks (with their first
    instruction), random success and shaping (so every group carries signal), episode ``i``
    ``lengths[i]`` steps long, groups of ``group_size`` in order, all sampled with ``version``.
    The learner's input for tests, memory measurements and device checks."""
    from dvla_nodes.envs.tasks import TASK_NAMES, TASKS

    rng = np.random.default_rng(seed)
    n, steps = len(lengths), int(sum(lengths))
    names = [TASK_NAMES[int(i)] for i in rng.integers(0, len(TASK_NAMES), n)]
    return Episodes(
        images=rng.integers(0, 256, (steps, image, image, 3), dtype=np.uint8),
        proprio=rng.normal(size=(steps, 7)).astype(np.float32),
        state=rng.normal(size=(steps, 10)).astype(np.float32),
        tokens=rng.integers(0, bins, (steps, ACTION_DIM)).astype(np.int64),
        logp=(np.log(1.0 / bins) + 0.3 * rng.normal(size=(steps, ACTION_DIM))).astype(np.float32),
        episode=np.repeat(np.arange(n, dtype=np.int32), lengths),
        tasks=tuple(names),
        seeds=np.arange(n, dtype=np.int64),
        instructions=tuple(TASKS[t].instructions[0] for t in names),
        success=rng.random(n) < 0.5,
        length=np.array(lengths, np.int64),
        shaping=rng.normal(size=n).astype(np.float32),
        version=np.full(n, version, np.int64),
        group=np.arange(n, dtype=np.int64) // group_size,
    )


def run_episodes(
    shards: Sequence[Shard],
    assignments: Sequence[Assignment],
    policy: PolicyFn | None,
    *,
    version: int = 0,
    bins: int = 256,
    expert_noise: float = 0.0,
    rng: np.random.Generator | None = None,
    stop: threading.Event | None = None,
) -> Episodes:
    """Run one episode per assignment and return them in assignment order.

    ``policy`` maps (images, proprio, instructions) of the slots that need an action to an
    :class:`ActOutput`; with ``policy=None`` the scripted experts act (demonstrations): the
    recorded tokens are the expert's action, the executed action adds Gaussian noise of std
    ``expert_noise`` (DART). Each episode draws its noise from its own stream, seeded by one
    draw from ``rng`` and the episode's place in ``assignments``, so the demonstrations are
    the same however the environments are laid out over shards (the serial trainer's two env
    workers, a learner role's one). When ``stop`` is set (by another thread) the
    outstanding commands are received and :class:`RolloutAborted` is raised: within one
    environment step per shard.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    noise_base = int(rng.integers(2**63)) if policy is None and expert_noise > 0 else None
    queue = list(enumerate(assignments))
    queue.reverse()
    finished: dict[int, _Open] = {}
    slot_ep: list[list[_Open | None]] = [[None] * s.num_envs for s in shards]
    phase = ["idle"] * len(shards)  # what each shard's outstanding command is

    def start_resets(k: int) -> bool:
        shard = shards[k]
        mask = [False] * shard.num_envs
        tasks = [""] * shard.num_envs
        seeds = [0] * shard.num_envs
        for i in range(shard.num_envs):
            if slot_ep[k][i] is None and queue:
                idx, a = queue.pop()
                slot_ep[k][i] = _Open(
                    idx,
                    a.task,
                    a.seed,
                    a.group,
                    noise=None if noise_base is None else np.random.default_rng([noise_base, idx]),
                )
                mask[i], tasks[i], seeds[i] = True, a.task, a.seed
        if any(mask):
            shard.send_reset(tasks, seeds, mask)
            phase[k] = "reset"
            return True
        return False

    def start_step(k: int, batch: StepBatch) -> None:
        shard = shards[k]
        active = [i for i, ep in enumerate(slot_ep[k]) if ep is not None]
        sel = np.array(active)
        # The action size is the policy's (or the expert's): the suite's spec.action_dim, which
        # the policy was built with; idle slots get zeros (a done slot is not stepped).
        if policy is not None:
            out = policy(
                batch.images[sel], batch.proprio[sel], [batch.instructions[i] for i in active]
            )
            actions = np.zeros((shard.num_envs, out.actions.shape[1]), np.float32)
            actions[sel] = out.actions
            toks, logps = out.tokens, out.logp
        else:
            assert isinstance(batch, _ExpertView)
            expert = batch.expert[sel]
            toks = actions_to_tokens(expert, bins)
            logps = np.zeros_like(expert, dtype=np.float32)
            noisy = expert.copy()
            for j, i in enumerate(active):
                ep = slot_ep[k][i]
                if ep is not None and ep.noise is not None:
                    noisy[j] += ep.noise.normal(0.0, expert_noise, expert.shape[1])
            actions = np.zeros((shard.num_envs, expert.shape[1]), np.float32)
            actions[sel] = np.clip(noisy, -1.0, 1.0)
        for j, i in enumerate(active):
            ep = slot_ep[k][i]
            assert ep is not None
            ep.images.append(batch.images[i])
            ep.proprio.append(batch.proprio[i])
            ep.state.append(batch.state[i])
            ep.tokens.append(toks[j])
            ep.logp.append(logps[j])
        shard.send_step(actions)
        phase[k] = "step"

    last: list[StepBatch | None] = [None] * len(shards)
    for k in range(len(shards)):
        if not start_resets(k):
            phase[k] = "idle"
    while any(p != "idle" for p in phase):
        if stop is not None and stop.is_set():
            for k, shard in enumerate(shards):
                if phase[k] != "idle":
                    phase[k] = "idle"
                    with contextlib.suppress(DvlaError):  # a failed command is answered too
                        shard.recv()
            raise RolloutAborted(f"rollout stopped with {len(finished)} of {len(assignments)} done")
        for k, shard in enumerate(shards):
            if phase[k] == "idle":
                continue
            result = shard.recv()
            if phase[k] == "expert":
                prev = last[k]
                assert prev is not None
                start_step(k, _ExpertView.of(prev, np.asarray(result)))
                continue
            assert isinstance(result, StepBatch)
            batch = result
            if phase[k] == "reset":
                for i, ep in enumerate(slot_ep[k]):
                    if ep is not None and not ep.images:
                        ep.instruction = batch.instructions[i]
            else:
                for i, ep in enumerate(slot_ep[k]):
                    if ep is None:
                        continue
                    ep.shaping += float(batch.shaping[i])
                    ep.success = ep.success or bool(batch.success[i])
                    if batch.done[i]:
                        finished[ep.index] = ep
                        slot_ep[k][i] = None
            last[k] = batch
            if start_resets(k):
                continue
            if any(ep is not None for ep in slot_ep[k]):
                if policy is None:
                    shard.send_expert()
                    phase[k] = "expert"
                else:
                    start_step(k, batch)
            else:
                phase[k] = "idle"
    return _assemble([finished[i] for i in range(len(assignments))], version)


@dataclass(frozen=True, slots=True)
class _ExpertView(StepBatch):
    expert: np.ndarray = field(default_factory=lambda: np.zeros((0, ACTION_DIM), np.float32))

    @staticmethod
    def of(b: StepBatch, expert: np.ndarray) -> _ExpertView:
        return _ExpertView(
            images=b.images,
            proprio=b.proprio,
            state=b.state,
            instructions=b.instructions,
            reward=b.reward,
            shaping=b.shaping,
            success=b.success,
            done=b.done,
            expert=expert,
        )


def _assemble(eps: Sequence[_Open], version: int) -> Episodes:
    lengths = np.array([len(e.images) for e in eps], np.int32)
    return Episodes(
        images=np.stack([im for e in eps for im in e.images]),
        proprio=np.stack([p for e in eps for p in e.proprio]).astype(np.float32),
        state=np.stack([p for e in eps for p in e.state]).astype(np.float32),
        tokens=np.stack([t for e in eps for t in e.tokens]).astype(np.int64),
        logp=np.stack([lp for e in eps for lp in e.logp]).astype(np.float32),
        episode=np.repeat(np.arange(len(eps), dtype=np.int32), lengths),
        tasks=tuple(e.task for e in eps),
        seeds=np.array([e.seed for e in eps], np.int64),
        instructions=tuple(e.instruction for e in eps),
        success=np.array([e.success for e in eps], bool),
        length=lengths,
        shaping=np.array([e.shaping for e in eps], np.float32),
        version=np.full(len(eps), version, np.int64),
        group=np.array([e.group for e in eps], np.int64),
    )
