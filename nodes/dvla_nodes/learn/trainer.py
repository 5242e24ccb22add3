"""The serial trainer: demonstrations, behaviour cloning, then GRPO, all in one process (plus
environment worker processes), wired top to bottom in :meth:`SerialTrainer.run`.

Run directory ``runs/<time>-<name>/``: ``config.json``, ``metrics.jsonl``, checkpoints
(``warmstart``, ``latest``, ``final``: ``*.safetensors`` + ``*.json``), ``success.png``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dvla_bus.errors import ConfigError
from dvla_nodes.envs.vector import RemoteVectorEnv, VectorEnv
from dvla_nodes.learn.checkpoint import (
    load_checkpoint,
    optimizer_moments,
    restore_moments,
    save_checkpoint,
)
from dvla_nodes.learn.config import DEMO_SEED_BASE, EVAL_SEED_BASE, TrainConfig
from dvla_nodes.learn.learner import Learner, episode_rewards
from dvla_nodes.learn.metrics import MetricsLog, plot_success, read_metrics
from dvla_nodes.learn.rollout import Assignment, Episodes, Shard, run_episodes
from dvla_nodes.policy import build_policy
from dvla_nodes.policy.act import ActOutput, PolicyActor


@dataclass(frozen=True, slots=True)
class EvalResult:
    success: float
    success_by_task: dict[str, float]
    episodes: int
    env_steps: int
    seconds: float


@dataclass(frozen=True, slots=True)
class TrainResult:
    run_dir: Path
    warmstart: EvalResult
    final: EvalResult
    train_seconds: float
    bc_seconds: float
    env_steps: int
    iterations: int
    version: int


@contextlib.contextmanager
def open_shards(num_envs: int, workers: int, image_size: int) -> Iterator[list[Shard]]:
    """``workers`` env processes with ``num_envs`` slots between them (0: one in-process
    :class:`VectorEnv`). Closed, and the processes joined, on exit."""
    with contextlib.ExitStack() as stack:
        if workers <= 0:
            yield [stack.enter_context(VectorEnv(num_envs, image_size))]
            return
        sizes = [num_envs // workers + (1 if i < num_envs % workers else 0) for i in range(workers)]
        yield [stack.enter_context(RemoteVectorEnv(max(1, n), image_size)) for n in sizes]


@contextlib.contextmanager
def rollout_threads(shards: Sequence[Shard]) -> Iterator[None]:
    """One torch thread while environment workers step: they need the other core, and small
    inference batches gain little from a second thread (measured: oversubscribed, it loses)."""
    remote = any(isinstance(s, RemoteVectorEnv) for s in shards)
    before = torch.get_num_threads()
    if remote:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate(
    shards: Sequence[Shard],
    actor: PolicyActor,
    tasks: Sequence[str],
    seeds_per_task: int,
    *,
    greedy: bool = True,
    seed_base: int = EVAL_SEED_BASE,
    generator: torch.Generator | None = None,
    stop: threading.Event | None = None,
) -> EvalResult:
    """Success on held-out seeds ``seed_base + i`` (i < seeds_per_task) of every task
    (``stop``: see :func:`run_episodes`)."""
    t0 = time.perf_counter()
    assignments = [Assignment(t, seed_base + i) for t in tasks for i in range(seeds_per_task)]
    gen = generator if generator is not None else torch.Generator().manual_seed(seed_base)

    def policy(im: np.ndarray, pr: np.ndarray, ins: Sequence[str]) -> ActOutput:
        return actor.act(im, pr, ins, greedy=greedy, generator=gen)

    with rollout_threads(shards):
        eps = run_episodes(shards, assignments, policy, bins=actor.model.cfg.bins, stop=stop)
    by_task = eps.success_by_task()
    return EvalResult(
        success=float(np.mean(list(by_task.values()))),
        success_by_task=by_task,
        episodes=eps.num_episodes,
        env_steps=eps.num_steps,
        seconds=time.perf_counter() - t0,
    )


def collect_demos(
    shards: Sequence[Shard],
    cfg: TrainConfig,
    rng: np.random.Generator,
    stop: threading.Event | None = None,
) -> Episodes:
    """``demos_per_task`` scripted demonstrations of every task (DART noise ``demo_noise``),
    on seeds ``DEMO_SEED_BASE + i``: the warm start's data (serial trainer and learner role;
    ``stop``: see :func:`run_episodes`)."""
    return run_episodes(
        shards,
        [Assignment(t, DEMO_SEED_BASE + i) for t in cfg.tasks for i in range(cfg.demos_per_task)],
        None,
        bins=cfg.bins,
        expert_noise=cfg.demo_noise,
        rng=rng,
        stop=stop,
    )


def checkpoint_learner(
    run_dir: Path,
    learner: Learner,
    name: str,
    step: int,
    metrics: dict[str, Any],
    *,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """``<name>.safetensors`` + ``<name>.json`` (weights, optimiser moments, version, config,
    and ``extra`` metadata such as the suite), atomically: the serial trainer's and the learner
    role's checkpoints."""
    return save_checkpoint(
        run_dir,
        name,
        learner.host_flat(),
        layout=learner.layout,
        meta={
            "version": learner.version,
            "step": step,
            "config": learner.cfg.to_json(),
            "policy": learner.model.cfg.to_json(),
            "metrics": metrics,
            **(extra or {}),
        },
        optimizer=optimizer_moments(learner.optimizer, learner.model, learner.layout),
    )


def resume_reference(learner: Learner, run_dir: Path) -> str:
    """On resume, the KL reference (``rl_kl_coef``) is the run's warm start again: the
    ``warmstart`` checkpoint in ``run_dir`` (both trainers write one after cloning). Without
    one, the resumed weights stand in. Returns what was used, for the log."""
    if learner.cfg.rl_kl_coef <= 0:
        return "none"
    path = run_dir / "warmstart.json"
    if path.exists():
        learner.set_reference(load_checkpoint(path).flat)
        return str(path)
    learner.set_reference()
    return "the resumed weights (no warmstart checkpoint)"


def make_run_dir(root: Path, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{stamp}-{name}"
    n = 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{name}-{n}"
    path.mkdir(parents=True)
    return path


class SerialTrainer:
    """Everything in one process. ``progress`` (optional) receives each metrics record."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        progress: Callable[[dict[str, Any]], None] | None = None,
        resume: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.progress = progress
        self.resume = resume

    def _log(self, log: MetricsLog, record: dict[str, Any]) -> None:
        log.write(record)
        if self.progress is not None:
            self.progress(record)

    def _checkpoint(self, learner: Learner, name: str, step: int, metrics: dict[str, Any]) -> Path:
        return checkpoint_learner(self.run_dir, learner, name, step, metrics)

    def run(self) -> TrainResult:
        cfg = self.cfg
        if cfg.suite != "embedded":
            raise ConfigError(
                f"suite = {cfg.suite!r}: the serial trainer runs the embedded suite only; train "
                "on another suite with `dvla up` (e.g. topologies/metaworld.toml)"
            )
        torch.set_num_threads(cfg.torch_threads)
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(cfg.dumps())
        model, tok = build_policy(
            cfg.policy_size, cfg.image_size, cfg.bins, cfg.seed, stem=cfg.policy_stem
        )
        learner = Learner(model, tok, cfg)
        actor = PolicyActor(model, tok, cfg.temperature)
        sample_gen = torch.Generator().manual_seed(cfg.seed + 1)
        n_envs = cfg.group_size * cfg.groups_per_iter
        log = MetricsLog(self.run_dir / "metrics.jsonl")
        t_start = time.perf_counter()

        def now() -> float:
            return time.perf_counter() - t_start

        env_steps = 0
        try:
            with open_shards(n_envs, cfg.env_workers, cfg.image_size) as shards:
                # ---------------------------------------------------------- warm start
                if self.resume is not None:
                    ck = load_checkpoint(self.resume)
                    learner.flat[: ck.layout.total].copy_(torch.from_numpy(ck.flat))
                    restore_moments(learner.optimizer, model, learner.layout, ck.optimizer)
                    learner.version = int(ck.meta["version"])
                    resume_reference(learner, self.resume.parent)
                    bc_seconds = 0.0
                else:
                    demos = collect_demos(shards, cfg, rng)
                    # Failed noisy demonstrations stay: their labels are still the expert's
                    # action in the states the noise led to (DART).
                    env_steps += demos.num_steps
                    bc = learner.behaviour_clone(demos)
                    learner.set_anchor(demos)
                    learner.set_reference()
                    bc_seconds = now()
                    self._log(
                        log,
                        {
                            "kind": "bc",
                            "t": now(),
                            "env_steps": env_steps,
                            "demos": demos.num_episodes,
                            "demo_success": float(demos.success.mean()),
                            "demo_steps": demos.num_steps,
                            "loss": bc.loss,
                            "token_accuracy": bc.token_accuracy,
                            "bc_seconds": bc.seconds,
                        },
                    )
                warm = evaluate(shards, actor, cfg.tasks, cfg.eval_seeds, greedy=cfg.eval_greedy)
                self._log(log, self._eval_record("eval", warm, now(), env_steps, learner.version))
                self._checkpoint(learner, "warmstart", 0, {"eval": warm.success})

                # ---------------------------------------------------------- GRPO
                recent = {t: warm.success_by_task.get(t, 0.5) for t in cfg.tasks}
                budget = cfg.minutes * 60.0
                it = 0
                train_seed = cfg.seed * 1_000_003 % 400_000
                while it < cfg.iterations and now() < budget:
                    it += 1
                    weights = np.array(
                        [np.sqrt(recent[t] * (1.0 - recent[t])) + cfg.task_floor for t in cfg.tasks]
                    )
                    picks = rng.choice(
                        len(cfg.tasks), size=cfg.groups_per_iter, p=weights / weights.sum()
                    )
                    assignments = []
                    for g, ti in enumerate(picks):
                        train_seed += 1
                        assignments += [Assignment(cfg.tasks[ti], train_seed, g)] * cfg.group_size
                    t_roll = time.perf_counter()

                    def policy(im: np.ndarray, pr: np.ndarray, ins: Sequence[str]) -> ActOutput:
                        return actor.act(im, pr, ins, generator=sample_gen)

                    with rollout_threads(shards):
                        eps = run_episodes(
                            shards, assignments, policy, version=learner.version, bins=cfg.bins
                        )
                    roll_s = time.perf_counter() - t_roll
                    env_steps += eps.num_steps
                    by_task = eps.success_by_task()
                    for t, s in by_task.items():
                        recent[t] = 0.7 * recent[t] + 0.3 * s
                    lr = cfg.grpo_lr(it, now())
                    learner.set_lr(lr)
                    up = learner.update(eps)
                    record = {
                        "kind": "train",
                        "t": now(),
                        "iteration": it,
                        "env_steps": env_steps,
                        "version": up.version,
                        "success": float(eps.success.mean()),
                        "reward": float(episode_rewards(eps, cfg).mean()),
                        "success_by_task": by_task,
                        "rollout_seconds": roll_s,
                        "steps_per_second": eps.num_steps / max(roll_s, 1e-9),
                        "update_seconds": up.seconds,
                        "loss": up.loss,
                        "lr": lr,
                        "clip_fraction": up.clip_fraction,
                        "approx_kl": up.approx_kl,
                        "kl_ref": up.kl_ref,
                        "entropy": up.entropy,
                        "grad_norm": up.grad_norm,
                        "groups": up.groups,
                        "skipped_groups": up.skipped_groups,
                        "stale_episodes": up.stale_episodes,
                        "trained_steps": up.steps,
                    }
                    self._log(log, record)
                    if cfg.eval_every > 0 and it % cfg.eval_every == 0:
                        ev = evaluate(
                            shards, actor, cfg.tasks, cfg.eval_seeds, greedy=cfg.eval_greedy
                        )
                        self._log(
                            log, self._eval_record("eval", ev, now(), env_steps, learner.version)
                        )
                    if cfg.checkpoint_every > 0 and it % cfg.checkpoint_every == 0:
                        self._checkpoint(learner, "latest", it, {"success": record["success"]})
                train_seconds = now()
                self._checkpoint(learner, "final", it, {"train_seconds": train_seconds})
                final = evaluate(
                    shards, actor, cfg.tasks, cfg.final_eval_seeds, greedy=cfg.eval_greedy
                )
                self._log(
                    log,
                    self._eval_record("final", final, train_seconds, env_steps, learner.version),
                )
        finally:
            log.close()
            learner.close()
        plot_success(
            read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "success.png", cfg.name
        )
        return TrainResult(
            run_dir=self.run_dir,
            warmstart=warm,
            final=final,
            train_seconds=train_seconds,
            bc_seconds=bc_seconds,
            env_steps=env_steps,
            iterations=it,
            version=learner.version,
        )

    @staticmethod
    def _eval_record(
        kind: str, ev: EvalResult, t: float, env_steps: int, version: int
    ) -> dict[str, Any]:
        return {
            "kind": kind,
            "t": t,
            "env_steps": env_steps,
            "version": version,
            "success": ev.success,
            "success_by_task": ev.success_by_task,
            "episodes": ev.episodes,
            "eval_seconds": ev.seconds,
        }
