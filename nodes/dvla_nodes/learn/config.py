"""Every knob of a training run, in one frozen dataclass, saved with each checkpoint."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, fields
from typing import Any

from dvla_bus.errors import ConfigError
from dvla_nodes.envs.suites._interface import SUITES
from dvla_nodes.envs.tasks import TASK_NAMES

_DEVICE_RE = re.compile(r"cpu|auto|cuda(?::[0-9]{1,3})?")
"""The forms of :attr:`TrainConfig.device`."""

EVAL_SEED_BASE = 1_000_000  # held-out evaluation seeds start here; training seeds stay below
DEMO_SEED_BASE = 500_000


@dataclass(frozen=True, slots=True)
class TrainConfig:
    name: str = "train"
    seed: int = 0
    # The benchmark suite (dvla_nodes.envs.suites.SUITES) and its tasks. For the embedded suite
    # the names are checked here; another suite's tasks are checked by its adapter, and once
    # its environments are open they are the expanded names (``MT10`` -> its ten tasks).
    suite: str = "embedded"
    tasks: tuple[str, ...] = TASK_NAMES
    image_size: int = 64
    policy_size: str = "tiny"
    policy_stem: str = "patch"
    bins: int = 256
    torch_threads: int = 2
    # Torch threads for the distributed learner's GRPO updates (`dvla up`), which run while
    # samplers may share the host's cores; 0 = auto: torch_threads, capped by the cores the
    # host's samplers (with their env_workers) and inference nodes leave, at least 1
    # (dvla_nodes.pipeline.update_threads). Its warm start (cloning, the samplers still idle)
    # and the serial trainer use torch_threads.
    update_threads: int = 0
    # Where the learner trains: "cpu", "cuda" (the current GPU), "cuda:N", or "auto" (CUDA when
    # available, else the CPU). The model, its flat parameter buffer, the optimiser state and the
    # minibatch slabs live there; published weights and checkpoints are copied to the host.
    device: str = "cpu"
    # Environment processes (0 = step environments in this process). Each holds an equal share.
    env_workers: int = 2

    # Behaviour-cloning warm start
    demos_per_task: int = 100
    # Std of Gaussian noise on the executed expert actions (DART): the demonstrations then show
    # recoveries from the states a clone drifts into. 0.2 (the experts still succeed 91-100 %
    # of the time) cloned 100 demos/task to 63-70 % where 0.1 gave 44-56 %, push 53-71 %
    # where 0.1 gave 2-26 % (BENCHMARKS.md, Learning).
    demo_noise: float = 0.2
    bc_epochs: int = 30
    bc_batch: int = 128
    bc_lr: float = 1e-3
    # Gaussian label smoothing over neighbouring bins (in bins): also sets how widely the cloned
    # policy explores (a near-deterministic warm start gives GRPO groups with equal outcomes).
    bc_label_sigma: float = 12.0
    # Object-position auxiliary loss (privileged simulator state supervises the vision encoder;
    # the policy never sees it): while cloning, and during GRPO.
    bc_aux_coef: float = 20.0
    rl_aux_coef: float = 5.0
    # Cloning anchor during GRPO: weight of the demonstrations' cloning loss added to each GRPO
    # minibatch, and its batch size (0: pure GRPO).
    rl_bc_coef: float = 0.5
    rl_bc_batch: int = 128
    # Weight of the GRPO policy-gradient term (clipped ratio and entropy) in each update; 0
    # keeps every other part of the update (cloning anchor, auxiliary loss, the same minibatches
    # of the same rollouts): the ablation that tells what reinforcement learning adds.
    pg_coef: float = 1.0
    # Weight of the KL divergence KL(policy || reference) per action token, the reference being
    # the warm-start policy frozen when GRPO begins (as in DeepSeekMath's GRPO; computed exactly
    # over the bins, not estimated from the sampled token). 0: no reference model is kept.
    # Restrains drift and forgetting without cloning: it never sees a demonstration.
    rl_kl_coef: float = 0.0

    # GRPO
    group_size: int = 8
    groups_per_iter: int = 8
    lr: float = 3e-4
    clip_low: float = 0.2
    clip_high: float = 0.28
    epochs: int = 1
    minibatch: int = 512
    # Minibatches are padded (with zero-weight rows) to a multiple of this many rows, so the
    # allocator sees a handful of shapes instead of a new one every update (variable shapes
    # fragmented the learner's heap: RSS grew ~25 MiB per update; 0 = no padding).
    minibatch_bucket: int = 64
    entropy_coef: float = 0.0
    temperature: float = 1.0
    success_reward: float = 1.0
    shaping_coef: float = 2.0  # weight of (potential_end - potential_start) in metres
    equal_tol: float = 1e-3  # a group whose rewards span less than this is skipped
    adv_std_norm: bool = True
    max_version_lag: int = 1
    max_grad_norm: float = 1.0
    # Task sampling weight: sqrt(p (1 - p)) + task_floor, p = recent sampled success. A group
    # carries signal when its outcomes differ, most often at p = 1/2; the floor keeps tasks at
    # 0 % or 100 % in the mix (shaping still ranks their episodes).
    task_floor: float = 0.15
    lr_warmup: int = 20  # iterations of linear learning-rate warm-up (fresh Adam moments)
    # Linear learning-rate annealing, as CleanRL's PPO (anneal_lr): the GRPO rate falls by this
    # fraction of lr as the budget is spent (0: constant; 1: to zero at the end). See grpo_lr.
    lr_anneal: float = 0.0

    # Budget and evaluation
    iterations: int = 1_000_000
    minutes: float = 30.0  # wall-clock budget for the whole run, warm start included
    eval_every: int = 10  # iterations between quick evaluations
    eval_seeds: int = 10  # per task, quick evaluation
    final_eval_seeds: int = 100  # per task, held-out
    eval_greedy: bool = True
    checkpoint_every: int = 25
    display: bool = True

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ConfigError(
                f"suite = {self.suite!r}: unknown suite; choose one of: {', '.join(SUITES)}"
            )
        if self.suite == "embedded":
            bad = [t for t in self.tasks if t not in TASK_NAMES]
            if bad:
                raise ConfigError(f"tasks {bad}: unknown; the suite has {', '.join(TASK_NAMES)}")
        elif not self.tasks:
            raise ConfigError(f"suite = {self.suite!r} needs suite_tasks (the job's tasks)")
        if not isinstance(self.device, str) or not _DEVICE_RE.fullmatch(self.device):
            raise ConfigError(
                f"device = {self.device!r}: expected 'cpu', 'cuda', 'cuda:N' or 'auto'"
            )
        if self.minibatch_bucket < 0:
            raise ConfigError(f"minibatch_bucket={self.minibatch_bucket}: must be >= 0")
        if self.group_size < 2:
            raise ConfigError(f"group_size={self.group_size}: GRPO needs at least 2 per group")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature}: must be > 0")
        if self.rl_kl_coef < 0:
            raise ConfigError(f"rl_kl_coef={self.rl_kl_coef}: must be >= 0")
        if not 0.0 <= self.lr_anneal <= 1.0:
            raise ConfigError(f"lr_anneal={self.lr_anneal}: must be in [0, 1]")
        if self.pg_coef < 0:
            raise ConfigError(f"pg_coef={self.pg_coef}: must be >= 0")
        if self.update_threads < 0:
            raise ConfigError(f"update_threads={self.update_threads}: must be >= 0")
        if self.bins < 2:
            raise ConfigError(f"bins={self.bins}: need at least 2")

    def grpo_lr(self, iteration: int, elapsed_s: float) -> float:
        """The learning rate of GRPO update ``iteration`` (1-based) made ``elapsed_s`` into the
        run's clock (the one its ``minutes`` budget is read against): a linear warm-up over
        ``lr_warmup`` updates, then, with ``lr_anneal`` > 0, a linear fall by ``lr_anneal`` x
        ``lr`` as the budget is spent — ``iterations`` or ``minutes``, whichever runs out
        first, so a wall-clock run anneals by time and a run of fixed length by updates."""
        warm = min(1.0, iteration / max(1, self.lr_warmup))
        budget_s = self.minutes * 60.0
        by_time = elapsed_s / budget_s if budget_s > 0 else 1.0
        spent = max(iteration / max(1, self.iterations), by_time)
        return self.lr * warm * (1.0 - self.lr_anneal * min(1.0, max(0.0, spent)))

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tasks"] = list(self.tasks)
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True)

    @staticmethod
    def from_json(obj: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(TrainConfig)}
        unknown = set(obj) - known
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}")
        kw = dict(obj)
        if "tasks" in kw:
            kw["tasks"] = tuple(kw["tasks"])
        return TrainConfig(**kw)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
