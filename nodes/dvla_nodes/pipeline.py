"""The distributed training pipeline: ``learner`` and ``sampler`` roles running the same
learning code as ``dvla train --serial`` (:mod:`dvla_nodes.learn`) as separate processes.

Four swimlanes overlap:

* **sampling** (sampler): environment steps on the sampler's env workers;
* **inference** (sampler): the policy forward pass for a batch of environments, on the sampler's
  local copy of the weights (small models; a remote inference role is not implemented yet);
* **gradient** (learner): GRPO updates on admitted groups;
* **distribution** (learner): publishing each new version into the host's shared-memory weight
  pool (:mod:`dvla_bus.weights`) and announcing it on the control bus. Samplers pick the new
  version up between groups — readers see version N or N+1, never a mix.

A sampler rolls out whole GRPO groups (``group_size`` episodes of one task instance, one policy
version) and sends each as one message to the learner's inbox (shared-memory slab on one host).
The learner admits a group only if its version lags the current one by at most
``max_version_lag``; older groups are dropped and counted (``stale_groups``). Every
``groups_per_iter`` admitted groups make one update and one new version.

The training configuration is ``[roles.learner]`` of the topology (any
:class:`~dvla_nodes.learn.config.TrainConfig` field, and the job's benchmark suite: ``suite``,
``suite_tasks``, ``suite_python``, ``suite_<option>``, see :mod:`dvla_nodes.learn.suite`);
samplers read the same table from the topology file so both sides build the same policy — its
shapes and vocabulary from the suite's spec. The learner runs its own environments of the suite
(a worker process under the suite's interpreter) for the warm start's demonstrations and the
evaluations; a suite without scripted experts starts GRPO from the initial policy. When
``minutes`` (or ``iterations``) run out, the learner evaluates, writes its final checkpoint and
stops the job through the control bus.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import threading
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from dvla_bus import wire
from dvla_bus.deploy import load_job_topology
from dvla_bus.errors import ConfigError, DeadlineExceeded, DvlaError
from dvla_bus.node import Node
from dvla_bus.sockets import open_context
from dvla_bus.transport import Delivery, Inbox, Outbox, open_outbox
from dvla_bus.weights import Manifest, WeightPool, WeightReader, attach_weights, create_weight_pool
from dvla_nodes.learn.checkpoint import (
    Checkpoint,
    find_checkpoint,
    load_checkpoint,
    restore_moments,
)
from dvla_nodes.learn.config import DEMO_SEED_BASE, EVAL_SEED_BASE, TrainConfig
from dvla_nodes.learn.learner import Learner, episode_rewards
from dvla_nodes.learn.metrics import MetricsLog, plot_success, read_metrics
from dvla_nodes.learn.rollout import Assignment, Episodes, Shard, run_episodes
from dvla_nodes.learn.suite import (
    POLICY_ENDPOINT,
    JobShards,
    build_suite_policy,
    check_available,
    check_resume_policy,
    check_resume_suite,
    job_suite,
    no_expert_reason,
    open_job_shards,
    policy_mismatch,
    policy_signature,
    refuse_suite_keys,
    suite_record,
)
from dvla_nodes.learn.trainer import (
    EvalResult,
    checkpoint_learner,
    collect_demos,
    evaluate,
    resume_reference,
    rollout_threads,
)
from dvla_nodes.policy.act import ActOutput, PolicyActor
from dvla_nodes.policy.flat import flatten
from dvla_nodes.torch_thread import TorchThread

if TYPE_CHECKING:
    from dvla_nodes.envs.suites import SuiteSpec
    from dvla_nodes.inference import RemotePolicy
    from dvla_nodes.policy.model import VLAPolicy
    from dvla_nodes.policy.tokenizer import Tokenizer

__all__ = [
    "LearnerNode",
    "SamplerNode",
    "episodes_from_arrays",
    "episodes_to_arrays",
    "train_config",
    "update_threads",
]

TOPIC = "trajectories"
TRAIN_SEED_SPAN = 400_000
assert TRAIN_SEED_SPAN <= DEMO_SEED_BASE < EVAL_SEED_BASE
SEP = "\x1f"  # unit separator: joins task names and instructions in message metadata
T = TypeVar("T")


def inbox_window(cfg: TrainConfig) -> int:
    """The learner's credit per sampler: one update's worth of groups (2-4) per version of lag
    the staleness bound allows, at most 8. Samplers size their slab pools to it."""
    return min(8, max(2, min(4, cfg.groups_per_iter)) * max(1, cfg.max_version_lag))


def train_config(settings: Mapping[str, wire.Scalar]) -> TrainConfig:
    """A :class:`TrainConfig` from a topology's ``[roles.learner]`` table (unknown keys that are
    not TrainConfig fields are ignored: they configure the node, e.g. ``watchdog_s``, or the
    suite's environments, ``suite_<option>``). ``suite_tasks`` names the job's tasks like
    ``tasks`` (give one of them); a suite other than the embedded one needs them."""
    hints = typing.get_type_hints(TrainConfig)
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in settings:
            continue
        value = settings[f.name]
        kind = hints[f.name]
        if kind is int:
            changes[f.name] = int(value)
        elif kind is float:
            changes[f.name] = float(value)
        elif kind is bool:
            changes[f.name] = bool(value)
        elif kind is str:
            changes[f.name] = str(value)
        else:  # tuple[str, ...]: comma-separated
            changes[f.name] = tuple(s.strip() for s in str(value).split(",") if s.strip())
    if "suite_tasks" in settings:
        if "tasks" in settings:
            raise ConfigError("tasks and suite_tasks both given: name the job's tasks once")
        raw = str(settings["suite_tasks"])
        changes["tasks"] = tuple(s.strip() for s in raw.split(",") if s.strip())
    suite = str(changes.get("suite", "embedded"))
    if suite != "embedded" and "tasks" not in changes:
        raise ConfigError(
            f"suite = {suite!r} needs suite_tasks (comma-separated task names of that suite)"
        )
    return dataclasses.replace(TrainConfig(display=False), **changes)


async def enter_in_thread(
    stack: contextlib.AsyncExitStack[Any], cm: contextlib.AbstractContextManager[T]
) -> T:
    """Enter ``cm`` in an executor thread and have ``stack`` exit it. Starting a suite's
    environment workers takes seconds (LIBERO: ~10): the event loop — in ``--serial`` mode
    every node's — keeps running meanwhile. Cancelled while entering, ``cm`` is exited as soon
    as its entry finishes, so no worker is left behind."""
    fut = asyncio.get_running_loop().run_in_executor(None, cm.__enter__)
    try:
        value = await asyncio.shield(fut)
    except asyncio.CancelledError:

        def exit_late(f: asyncio.Future[T]) -> None:
            if not f.cancelled() and f.exception() is None:
                cm.__exit__(None, None, None)

        fut.add_done_callback(exit_late)
        raise
    stack.push(cm.__exit__)
    return value


async def on_shards(
    fn: Callable[[], T],
    stop: threading.Event,
    interrupt: Callable[[], None] | None = None,
    executor: concurrent.futures.Executor | None = None,
) -> T:
    """``fn()`` — which steps a node's environment shards — in an executor thread (``executor``
    or the loop's default: a node's :class:`TorchThread` when ``fn`` runs its policy). If the
    caller is cancelled (the node is stopping), ``stop`` asks the rollout to end (and
    ``interrupt`` ends a remote policy call it may be blocked in) and the call returns only
    once the shards are quiet (within one environment step): a shard must never be read by two
    threads, and teardown closes them right after."""
    fut = asyncio.get_running_loop().run_in_executor(executor, fn)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        stop.set()
        if interrupt is not None:
            interrupt()
        await asyncio.wait([fut])
        if not fut.cancelled():
            fut.exception()  # retrieved: RolloutAborted is the expected end
        raise


def update_threads(t: TrainConfig, host_roles: Mapping[str, int], cpus: int) -> int:
    """Torch threads for the learner's GRPO updates: ``t.update_threads`` when set; else
    (0, auto) ``t.torch_threads`` capped by the cores the host's other busy processes leave —
    each sampler with its ``env_workers`` environment processes, each inference node — and at
    least 1. On 2 cores beside one sampler that is 1 (measured: 40.9 GRPO versions/min against
    29.5 with 2: a second thread's spinning takes CPU the sampler needs; BENCHMARKS.md)."""
    if t.update_threads > 0:
        return t.update_threads
    busy = host_roles.get("sampler", 0) * (1 + max(0, t.env_workers))
    busy += host_roles.get("inference", 0)
    return max(1, min(t.torch_threads, cpus - busy))


def training_seed(run_seed: int, sampler: int, k: int) -> int:
    """The environment seed of sampler ``sampler``'s ``k``-th group: below
    :data:`DEMO_SEED_BASE` (and so far below the held-out :data:`EVAL_SEED_BASE`, never trained
    on); each sampler starts in its own stretch."""
    return (sampler * 100_003 + run_seed * 7_919 + k) % TRAIN_SEED_SPAN


# --- episodes on the wire ----------------------------------------------------------------------

_ARRAY_FIELDS = (
    "images",
    "proprio",
    "state",
    "tokens",
    "logp",
    "episode",
    "seeds",
    "success",
    "length",
    "shaping",
    "version",
    "group",
)


def episodes_to_arrays(ep: Episodes) -> tuple[dict[str, wire.Scalar], dict[str, np.ndarray]]:
    meta: dict[str, wire.Scalar] = {
        "tasks": SEP.join(ep.tasks),
        "instructions": SEP.join(ep.instructions),
        "version": int(ep.version.min()) if len(ep.version) else -1,
    }
    arrays = {}
    for name in _ARRAY_FIELDS:
        a = np.asarray(getattr(ep, name))
        if a.dtype == np.bool_:
            a = a.astype(np.uint8)
        arrays[name] = a
    return meta, arrays


def episodes_from_arrays(
    meta: Mapping[str, wire.Scalar], arrays: Mapping[str, np.ndarray]
) -> Episodes:
    """Copies the arrays (the delivery's memory goes back to the sender on release)."""
    values: dict[str, Any] = {name: np.array(arrays[name]) for name in _ARRAY_FIELDS}
    values["success"] = values["success"].astype(bool)
    tasks = tuple(str(meta["tasks"]).split(SEP)) if meta.get("tasks") else ()
    instructions = tuple(str(meta["instructions"]).split(SEP)) if meta.get("instructions") else ()
    return Episodes(tasks=tasks, instructions=instructions, **values)


# --- the learner -------------------------------------------------------------------------------


class LearnerNode(Node):
    role = "learner"
    description = "GRPO updates on trajectories from the samplers; publishes weight versions"

    inbox: Inbox
    pool: WeightPool

    @classmethod
    def check_settings(cls, settings: Mapping[str, wire.Scalar]) -> None:
        # The suite's name, tasks and options, and an interpreter that has it: everything
        # `dvla up` can refuse (exit 2) before any process starts.
        check_available(job_suite(train_config(settings), settings))

    async def setup(self) -> None:
        cfg = self.config
        self.train = train_config(cfg.settings)
        self.suite = job_suite(self.train, cfg.settings)
        # The learner's own environments (demonstrations, evaluations) in worker processes —
        # rendering never runs on this event loop or the executor thread (an EGL context is
        # bound to the thread that made it). Opened first: the suite's spec shapes the policy.
        # The embedded suite's cheap environments: as many as the serial trainer steps (one
        # iteration's groups) over env_workers processes, so demonstrations and evaluations
        # use both cores as the serial trainer's do (measured, 64 over 2 processes against 8
        # over 1: 800 demonstrations 5.5 s vs 8.4 s, a quick evaluation 1.1 s vs 1.9 s, the
        # final one 12.1 s vs 19.7 s); other suites' (LIBERO: ~1 GiB each): one group's worth
        # in one process.
        t = self.train
        if self.suite.name == "embedded":
            num_envs = max(1, t.group_size * t.groups_per_iter)
            workers = max(1, min(t.env_workers, num_envs))
        else:
            num_envs, workers = max(1, t.group_size), 1
        self._stop_rollouts = threading.Event()
        self.envs: JobShards = await enter_in_thread(
            self.resources, open_job_shards(t, self.suite, num_envs, workers)
        )
        spec = self.envs.spec
        if spec.suite != "embedded":  # MT10 -> its ten tasks: what samplers and evals use
            self.train = self.train.replace(tasks=spec.tasks)
        # Every multi-threaded torch call (building the policy, cloning, updates, evaluations)
        # runs on one thread of its own: with a second OpenMP team on the event-loop thread,
        # cloning ran 1.3x slower (dvla_nodes/torch_thread.py). Shut down (waiting for a call
        # in progress) before the environments close: callbacks run LIFO.
        self.torch = self.resources.enter_context(
            TorchThread(self.train.torch_threads, f"torch-{cfg.node_id}")
        )
        model, tok, self.learner = await self.torch.run(self._build, spec)
        self.resources.callback(self.learner.close)
        self.actor = PolicyActor(model, tok, self.train.temperature)
        # Groups queued here age while the learner updates: a window of about one update's
        # worth (2-4 groups per sampler) per version of lag the bound allows keeps them within
        # it instead of sampling groups only to drop them (dvla bench pipeline saw 18-22 %
        # dropped with 4 groups queued per sampler, 2 per update and max_version_lag 1); with
        # less credit samplers wait instead. A bound of 2 lets samplers run two updates ahead.
        self.inbox = await self.open_inbox(window=inbox_window(self.train))
        flat = self.learner.host_flat()
        self.pool = self.resources.enter_context(
            create_weight_pool(cfg.run_id, "learner", Manifest.from_arrays({"flat": flat}))
        )
        self.endpoints["weights"] = self.pool.name
        self.endpoints[POLICY_ENDPOINT] = policy_signature(spec.suite, model, tok)
        self._suite_record = suite_record(self.suite, spec, tok)
        self.log.info(
            "suite %s: %d task(s) (%s), actions %d-d (%s), proprio %d, state %d, expert %s, "
            "policy %d parameters; %d environment(s) over %d process(es) for demonstrations "
            "and evaluations",
            spec.suite,
            len(spec.tasks),
            ", ".join(spec.tasks[:4]) + (", ..." if len(spec.tasks) > 4 else ""),
            spec.action_dim,
            spec.action_mapping,
            spec.proprio_dim,
            spec.state_dim,
            "yes" if spec.has_expert else "no",
            model.num_params,
            sum(s.num_envs for s in self.envs.shards),
            len(self.envs.shards),
        )
        self.metrics = MetricsLog(cfg.run_dir / "metrics.jsonl")
        self.resources.callback(self.metrics.close)
        host_roles: dict[str, int] = {}
        if cfg.topology_file:
            host_roles = dict(load_job_topology(cfg.topology_file).host(cfg.host).roles)
        self._update_threads = update_threads(self.train, host_roles, len(os.sched_getaffinity(0)))

    def _build(self, spec: SuiteSpec) -> tuple[VLAPolicy, Tokenizer, Learner]:
        torch.manual_seed(self.train.seed)
        model, tok = build_suite_policy(self.train, spec)
        return model, tok, Learner(model, tok, self.train)  # on [roles.learner] device

    def _publish(self) -> None:
        with self.lanes.busy("distribution"):
            digest = self.pool.publish(self.learner.version, {"flat": self.learner.host_flat()})
        self._digest = digest

    def _restore(self) -> Checkpoint | None:
        """The newest checkpoint in the run directory (``latest`` or ``final``), if any: a
        learner the supervisor restarted, or a job started with ``dvla up --resume``."""
        best: Checkpoint | None = None
        for name in ("latest", "final"):
            path = find_checkpoint(self.config.run_dir, name)
            if path is None:
                continue
            ck = load_checkpoint(path)
            key = (int(ck.meta["version"]), int(ck.meta["step"]))
            if best is None or key > (int(best.meta["version"]), int(best.meta["step"])):
                best = ck
        return best

    async def run(self) -> None:
        t = self.train
        spec = self.envs.spec
        shards = self.envs.shards
        t0 = time.perf_counter()
        rng = np.random.default_rng(t.seed)
        ck = self._restore()
        if ck is not None:
            where = f"checkpoint in {self.config.run_dir}"
            check_resume_suite(ck.meta, spec.suite, where)
            check_resume_policy(ck.meta, self.learner.model, self.learner.tokenizer, where)
        offset = float(ck.meta["metrics"].get("elapsed", 0.0)) if ck is not None else 0.0
        iterations = int(ck.meta["step"]) if ck is not None else 0
        env_steps = int(ck.meta["metrics"].get("env_steps", 0)) if ck is not None else 0

        def now() -> float:  # training time, continued across restarts
            return offset + time.perf_counter() - t0

        self._now = now
        # Warm start by behaviour cloning on scripted demonstrations (in this process).
        # Not a swimlane: it runs once, for minutes, before the lanes start (a lane
        # busy that long would rightly trip the hang watchdog). A resumed learner skips the
        # cloning but collects the same demonstrations again for the cloning anchor.
        # A suite without scripted experts has neither: GRPO from the initial policy.
        demos: Episodes | None = None
        if spec.has_expert and (ck is None or t.rl_bc_coef > 0):
            demos = await on_shards(
                lambda: collect_demos(shards, t, rng, self._stop_rollouts), self._stop_rollouts
            )
        if ck is None and demos is None:
            self.learner.version = max(self.learner.version, 1)
            await self.torch.run(self.learner.set_reference)  # the initial policy
            reason = no_expert_reason(spec)
            self.log.info("no warm start: %s", reason)
            self.metrics.write(
                {"kind": "warm_start", "t": now(), "cloned": False, "reason": reason}
            )
        elif ck is None:
            assert demos is not None
            env_steps += demos.num_steps
            bc = await self.torch.run(self.learner.behaviour_clone, demos)
            self.learner.version = max(self.learner.version, 1)
            await self.torch.run(self.learner.set_reference)
            self.metrics.write(
                {
                    "kind": "bc",
                    "t": now(),
                    "demos": demos.num_episodes,
                    "loss": bc.loss,
                    "token_accuracy": bc.token_accuracy,
                }
            )
        else:
            self._load(ck, await self._hub_latest_version())
            ref = await self.torch.run(resume_reference, self.learner, self.config.run_dir)
            if self.train.rl_kl_coef > 0:
                self.log.info("KL reference: %s", ref)
        self.learner.set_anchor(demos if t.rl_bc_coef > 0 else None)
        self._publish()
        await self._announce()
        if ck is None:
            await self._evaluate(shards, "eval", t.eval_seeds, env_steps)
            # The cloned policy, kept apart from ``latest`` (as the serial trainer keeps it):
            # a run can be compared with its own warm start afterwards.
            for name in ("warmstart", "latest"):
                self._checkpoint(name, 0, {"elapsed": now(), "env_steps": env_steps})
        if self._update_threads != self.torch.threads:
            # From here samplers may share the host's cores (update_threads above).
            warm = self.torch.threads
            await asyncio.to_thread(self.torch.set_threads, self._update_threads)
            self.log.info(
                "GRPO updates with %d torch thread(s) (warm start: %d)", self._update_threads, warm
            )
        pending: list[Episodes] = []
        lags: list[int] = []  # of the pending groups
        stale = future = 0
        while iterations < t.iterations and now() < t.minutes * 60:
            await self.wait_unpaused()
            try:
                got: Delivery = await self.inbox.recv(timeout=1.0)
            except TimeoutError:
                continue
            with got:
                eps = episodes_from_arrays(got.meta, got.arrays)
                torn = not got.intact()  # the sender reused the slab while we copied
            if torn:
                self.counters["torn_groups"] = self.counters.get("torn_groups", 0) + 1
                continue
            lag = self.learner.version - int(got.meta.get("version", -1))
            if lag > t.max_version_lag:
                stale += 1
                self.counters["stale_groups"] = stale
                continue
            if lag < 0:  # sampled with a version this learner never made (before a restart)
                future += 1
                self.counters["future_groups"] = future
                continue
            pending.append(eps)
            lags.append(lag)
            self.counters["admitted_groups"] = self.counters.get("admitted_groups", 0) + 1
            if len(pending) < t.groups_per_iter:
                continue
            batch = Episodes.concat(pending)
            lag_max, lag_mean = max(lags), float(np.mean(lags))
            pending, lags = [], []
            iterations += 1
            env_steps += batch.num_steps
            lr = t.grpo_lr(iterations, now())
            self.learner.set_lr(lr)
            before = self.learner.version
            with self.lanes.busy("gradient"):
                up = await self.torch.run(self.learner.update, batch)
            if up.version != before:
                self._publish()
                await self._announce()
            else:  # every group's rewards were equal (sparse success, all failed): no update
                self.counters["no_signal_batches"] = self.counters.get("no_signal_batches", 0) + 1
            self.gauges["success"] = float(batch.success.mean())
            self.counters["iterations"] = iterations
            self.metrics.write(
                {
                    "kind": "train",
                    "t": now(),
                    "iteration": iterations,
                    "version": up.version,
                    "success": float(batch.success.mean()),
                    "success_by_task": batch.success_by_task(),
                    "reward": float(episode_rewards(batch, t).mean()),
                    "loss": up.loss,
                    "lr": lr,
                    "kl_ref": up.kl_ref,
                    # the serial trainer's per-update statistics, for comparing the two
                    "clip_fraction": up.clip_fraction,
                    "approx_kl": up.approx_kl,
                    "entropy": up.entropy,
                    "grad_norm": up.grad_norm,
                    "update_seconds": up.seconds,
                    "trained_steps": up.steps,
                    "groups": up.groups,
                    "skipped_groups": up.skipped_groups,
                    "updated": up.version != before,
                    "stale_groups": stale,
                    "lag_max": int(lag_max),  # over the batch's groups
                    "lag_mean": lag_mean,
                    "env_steps": env_steps,
                }
            )
            if t.eval_every > 0 and iterations % t.eval_every == 0:
                await self._evaluate(shards, "eval", t.eval_seeds, env_steps)
            if t.checkpoint_every > 0 and iterations % t.checkpoint_every == 0:
                self._checkpoint(
                    "latest",
                    iterations,
                    {
                        "success": float(batch.success.mean()),
                        "elapsed": now(),
                        "env_steps": env_steps,
                    },
                )
        train_seconds = now()
        final = await self._evaluate(shards, "final", t.final_eval_seeds, env_steps)
        self._checkpoint(
            "final",
            iterations,
            {"eval_success": final.success, "elapsed": train_seconds, "env_steps": env_steps},
        )
        with contextlib.suppress(OSError, ValueError, KeyError):  # a figure is not worth a crash
            plot_success(
                read_metrics(self.config.run_dir / "metrics.jsonl"),
                self.config.run_dir / "success.png",
                f"dvla up {self.config.topology_name}: held-out success",
            )
        self.log.info("training done: %d iterations, eval success %.2f", iterations, final.success)
        # The job is over: every node writes its lane intervals (dvla up merges them into
        # trace.json), then everyone stops; this node finishes with status 0.
        await self.control.send(wire.Command(command="trace", args={"tag": "final"}))
        self._write_trace("final")
        await asyncio.sleep(1.0)  # let the trace command reach the others before stop
        await self.control.send(wire.Command(command="stop", target="*"))

    async def _hub_latest_version(self) -> int:
        """The newest version the control hub has seen (-1: none). Waits for the join: the
        Welcome carries it, and reading it before then would reuse version numbers."""
        try:
            await asyncio.wait_for(self.control.joined.wait(), timeout=30.0)
            status = await self.control.query(timeout=10.0)
        except (TimeoutError, DvlaError) as exc:
            raise DvlaError(f"cannot learn the hub's latest version to resume: {exc}") from exc
        # A restarted hub forgets announcements; the members still report what they hold.
        held = [m.weight_version for m in status.members]
        return max([status.latest_version, self.control.latest_version, *held])

    def _load(self, ck: Checkpoint, hub_latest: int) -> None:
        """Weights and optimiser moments from ``ck``. Version numbers continue: the checkpoint's,
        or one past the newest the control hub has seen (versions the lost learner published
        after its last checkpoint are never reused for different weights)."""
        learner = self.learner
        if ck.layout.total != learner.layout.total:
            raise ConfigError(
                f"checkpoint has {ck.layout.total} parameters, this policy {learner.layout.total}"
            )
        learner.flat[: ck.layout.total].copy_(torch.from_numpy(ck.flat))
        restore_moments(learner.optimizer, learner.model, learner.layout, ck.optimizer)
        learner.version = max(int(ck.meta["version"]), hub_latest + 1)
        self.counters["resumed_from_version"] = int(ck.meta["version"])
        self.log.info(
            "resumed from checkpoint version %s step %s as version %d",
            ck.meta["version"],
            ck.meta["step"],
            learner.version,
        )

    async def _evaluate(
        self, shards: Sequence[Shard], kind: str, seeds: int, env_steps: int
    ) -> EvalResult:
        t = self.train
        ev = await on_shards(
            lambda: evaluate(
                shards,
                self.actor,
                t.tasks,
                max(1, seeds),
                greedy=t.eval_greedy,
                stop=self._stop_rollouts,
            ),
            self._stop_rollouts,
            executor=self.torch.executor,
        )
        self.gauges["eval_success"] = ev.success
        self.metrics.write(
            {
                "kind": kind,
                "t": self._now(),
                "env_steps": env_steps,
                "version": self.learner.version,
                "success": ev.success,
                "success_by_task": ev.success_by_task,
                "episodes": ev.episodes,
                "eval_seconds": ev.seconds,
            }
        )
        return ev

    def _checkpoint(self, name: str, step: int, metrics: dict[str, Any]) -> None:
        checkpoint_learner(
            self.config.run_dir,
            self.learner,
            name,
            step,
            metrics,
            extra={"suite": self._suite_record},
        )

    async def _announce(self) -> None:
        self.set_weight_version(self.learner.version)
        await self.control.send(
            wire.VersionAnnounce(
                version=self.learner.version, digest=self._digest, nbytes=self.pool.nbytes
            )
        )


# --- the sampler -------------------------------------------------------------------------------


INFERENCE_MODES = ("local", "remote")


class SamplerNode(Node):
    """Settings (``[roles.sampler]``, besides TrainConfig keys that override the learner's):
    ``inference`` — ``"local"`` (default: the policy runs here on a copy of the latest
    weights, best for small models) or ``"remote"`` (observations go to ``inference`` nodes over
    the data bus, :class:`~dvla_nodes.inference.RemotePolicy`); ``inference_deadline_s``
    (default 30) bounds each remote call."""

    role = "sampler"
    description = "rolls out GRPO groups on local environments with the latest weights"

    outbox: Outbox

    @classmethod
    def check_settings(cls, settings: Mapping[str, wire.Scalar]) -> None:
        mode = settings.get("inference", "local")
        if mode not in INFERENCE_MODES:
            raise ConfigError(f"inference={mode!r}: expected one of {', '.join(INFERENCE_MODES)}")
        if float(settings.get("inference_deadline_s", 30.0)) <= 0:
            raise ConfigError("inference_deadline_s must be > 0")
        rollout_groups = settings.get("rollout_groups", 1)
        if not isinstance(rollout_groups, int) or isinstance(rollout_groups, bool):
            raise ConfigError(f"rollout_groups={rollout_groups!r}: an integer >= 1")
        if rollout_groups < 1:
            raise ConfigError(f"rollout_groups={rollout_groups}: must be >= 1")
        refuse_suite_keys("sampler", settings, allowed=("suite_python",))

    async def setup(self) -> None:
        cfg = self.config
        topology = load_job_topology(cfg.topology_file) if cfg.topology_file else None
        learner_settings = topology.settings("learner") if topology else {}
        self.train = train_config({**learner_settings, **cfg.settings})
        self.suite = job_suite(self.train, learner_settings, cfg.settings)
        torch.set_num_threads(1)
        # Groups rolled out together (one batch of inference over all their environments, as
        # the serial trainer does with an iteration's groups): the embedded suite's cheap
        # environments default to up to 4 groups; another suite's (LIBERO ~1 GiB and ~10
        # steps/s each) to one. Up to env_workers processes step them, so one shard steps
        # while the policy acts for the other.
        self.rollout_groups = int(
            cfg.settings.get(
                "rollout_groups",
                min(4, self.train.groups_per_iter) if self.suite.name == "embedded" else 1,
            )
        )
        num_envs = self.rollout_groups * self.train.group_size
        workers = max(1, min(self.train.env_workers, num_envs))
        self._stop_rollouts = threading.Event()
        self.envs: JobShards = await enter_in_thread(
            self.resources, open_job_shards(self.train, self.suite, num_envs, workers)
        )
        spec = self.envs.spec
        if spec.suite != "embedded":
            self.train = self.train.replace(tasks=spec.tasks)
        model, tok = build_suite_policy(self.train, spec)
        self.signature = policy_signature(spec.suite, model, tok)
        self.mismatch = ""  # what differs from the learner's policy (empty: nothing)
        self.model = model
        _, self.flat = flatten(model)
        self.actor = PolicyActor(model, tok, self.train.temperature)
        self.gen = torch.Generator().manual_seed(self.train.seed + 1000 + cfg.index)
        ctx = await self.resources.enter_async_context(
            open_context(credentials=cfg.data_credentials)
        )
        self.outbox = await self.resources.enter_async_context(
            open_outbox(
                ctx,
                name=cfg.node_id,
                host=cfg.host,
                run=cfg.run_id,
                slab_size=self._slab_bytes(),
                # A slab per credit the learner grants: with fewer, a sampler holding credit
                # would roll out groups and then wait for a slab, and they would age.
                slabs=max(4, inbox_window(self.train)),
                policy="block",
                credentials=cfg.data_credentials,
            )
        )
        self.meters.append(self.outbox.counters)
        self.check_settings(cfg.settings)
        self.remote: RemotePolicy | None = None
        if cfg.settings.get("inference", "local") == "remote":
            from dvla_nodes.inference import open_remote_policy, request_bytes

            self.remote = await self.resources.enter_async_context(
                open_remote_policy(
                    ctx,
                    name=f"{cfg.node_id}.act.{os.getpid()}",
                    host=cfg.host,
                    run=cfg.run_id,
                    deadline_s=float(cfg.settings.get("inference_deadline_s", 30.0)),
                    slab_size=request_bytes(num_envs, self.train.image_size, spec.proprio_dim),
                    credentials=cfg.data_credentials,
                )
            )
            self.meters.append(self.remote.counters)
        self.reader: WeightReader | None = None
        self.weights_segment = ""
        self.version = -1
        self.resources.callback(self._close_reader)

    def _close_reader(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def _slab_bytes(self) -> int:
        t, spec = self.train, self.envs.spec
        steps = t.group_size * max(spec.max_steps)  # the longest episodes of the job's tasks
        # image + proprio/state (float32) + tokens (int64) and logp (float32) per action dim
        per_row = 4 * (spec.proprio_dim + spec.state_dim) + 12 * spec.action_dim
        per_step = t.image_size * t.image_size * 3 + max(1024, per_row + 64)
        return steps * per_step + (1 << 20)

    def on_members(self, members: tuple[wire.MemberInfo, ...]) -> None:
        if self.remote is not None:
            self.remote.follow(members)
        for m in members:
            if m.role != "learner" or m.state == "dead":
                continue
            endpoint = m.endpoints.get("data", "")
            if endpoint:
                # A restarted learner binds the same endpoint; the outbox notices the
                # reconnection and starts over with the new inbox (Outbox._watch_connects).
                asyncio.get_running_loop().create_task(self.outbox.connect(endpoint))
            theirs = m.endpoints.get(POLICY_ENDPOINT, "")
            if theirs:
                self.mismatch = policy_mismatch(self.signature, theirs)
            segment = m.endpoints.get("weights", "")
            if segment and segment != self.weights_segment:
                # A (re)started learner has a new pool: follow it, and its version numbers.
                if self.reader is not None:
                    self.reader.close()
                    self.reader = None
                try:
                    self.reader = attach_weights(segment)
                    self.weights_segment = segment
                    self.version = -1
                except (DvlaError, OSError) as exc:  # the learner may still be creating it
                    self.log.info("weights not ready yet: %s", exc)

    def _refresh_weights(self) -> None:
        if self.reader is None or self.reader.active_version <= self.version:
            return
        if self.remote is not None:  # the inference nodes hold the weights; track the version
            self.version = self.reader.active_version
            self.set_weight_version(self.version)
            return
        with self.reader.pin() as pinned:
            flat = pinned.arrays["flat"]
            if flat.shape != tuple(self.flat.shape):
                raise ConfigError(
                    f"the learner's weights are {flat.shape}, this sampler's policy "
                    f"{tuple(self.flat.shape)}: they were built for different suites or settings"
                )
            self.flat.copy_(torch.from_numpy(np.array(flat)))
            self.version = pinned.version
        self.set_weight_version(self.version)

    async def run(self) -> None:
        t = self.train
        rng = np.random.default_rng(t.seed + 7919 * (self.config.index + 1))
        groups = 0
        recent = dict.fromkeys(t.tasks, 0.5)  # recent success per task, this sampler's groups
        shards = self.envs.shards  # the node's: opened in setup, closed at teardown
        while True:
            await self.wait_unpaused()
            if self.mismatch:
                raise ConfigError(
                    f"this sampler's policy differs from the learner's: {self.mismatch}"
                )
            self._refresh_weights()
            ready = self.outbox.statistics().peers and (
                self.remote is None or self.remote.connected
            )
            if self.version < 1 or not ready:
                await asyncio.sleep(0.2)
                continue
            # Sample only what the learner has room for: a group sampled first and then held
            # while its send waits for credit ages by an update or two and arrives stale
            # (dropped). Waiting here instead, the group starts on the newest weights.
            if not await self.outbox.wait_credit(1.0):
                continue
            self._refresh_weights()
            # As many groups as the learner has room for (up to rollout_groups) roll out
            # together: one policy batch over all their environments.
            count = max(1, min(self.rollout_groups, self.outbox.credit()))
            # Tasks whose groups are most likely to differ in outcome are sampled most,
            # as in the serial trainer: sqrt(p (1 - p)) + task_floor.
            weights = np.array(
                [np.sqrt(recent[x] * (1.0 - recent[x])) + t.task_floor for x in t.tasks]
            )
            tasks: list[str] = []
            assignments: list[Assignment] = []
            for g in range(count):
                task = t.tasks[int(rng.choice(len(t.tasks), p=weights / weights.sum()))]
                groups += 1
                seed = training_seed(t.seed, self.config.index, groups)
                tasks.append(task)
                assignments += [Assignment(task, seed, g)] * t.group_size
            version = self.version

            served: list[int] = []  # versions the inference nodes used (remote mode)

            def policy(
                im: np.ndarray, pr: np.ndarray, ins: Sequence[str], served: list[int] = served
            ) -> ActOutput:
                if self.remote is not None:
                    act = self.remote(im, pr, ins)
                    served.append(act.version)
                    return act
                with self.lanes.busy("inference"):
                    return self.actor.act(im, pr, ins, generator=self.gen)

            def roll(
                assignments: list[Assignment] = assignments, version: int = version
            ) -> Episodes:
                with rollout_threads(shards), self.lanes.busy("sampling"):
                    return run_episodes(
                        shards,
                        assignments,
                        policy,
                        version=version,
                        bins=t.bins,
                        stop=self._stop_rollouts,
                    )

            t_roll = time.perf_counter()
            try:
                eps = await on_shards(
                    roll, self._stop_rollouts, self.remote.abort if self.remote else None
                )
            except DeadlineExceeded as exc:  # an inference node died or is restarting
                self.counters["inference_timeouts"] = self.counters.get("inference_timeouts", 0) + 1
                self.log.warning("groups abandoned: %s", exc)
                continue
            if served:
                # Remote inference may switch versions mid-rollout: the groups count as the
                # oldest version that acted in them (the learner's staleness bound stays
                # conservative; the recorded behaviour log-probs stay exact).
                if min(served) != max(served):
                    self.counters["mixed_version_groups"] = (
                        self.counters.get("mixed_version_groups", 0) + count
                    )
                eps = dataclasses.replace(eps, version=np.full_like(eps.version, min(served)))
            self.gauges["env_steps_per_s"] = eps.num_steps / max(1e-9, time.perf_counter() - t_roll)
            self.gauges["success"] = float(eps.success.mean())
            for g, task in enumerate(tasks):  # one message per GRPO group
                part = eps.select(eps.group == g) if count > 1 else eps
                if count > 1:
                    part = dataclasses.replace(part, group=np.zeros_like(part.group))
                meta, arrays = episodes_to_arrays(part)
                try:
                    await self.outbox.send(meta, arrays, topic=TOPIC, timeout=120)
                except DeadlineExceeded as exc:  # the learner stalled (or is restarting)
                    self.counters["send_timeouts"] = self.counters.get("send_timeouts", 0) + 1
                    self.log.warning("group dropped: %s", exc)
                    continue
                self.counters["groups_sent"] = self.counters.get("groups_sent", 0) + 1
                recent[task] = 0.7 * recent[task] + 0.3 * float(part.success.mean())
