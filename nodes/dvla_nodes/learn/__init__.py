"""Learning: behaviour-cloning warm start, GRPO, the sampler, the learner, the serial trainer,
checkpoints and metrics. The sampler (:func:`run_episodes`), the actor
(:class:`dvla_nodes.policy.PolicyActor`) and the learner (:class:`Learner`) exchange only numpy
arrays, so the distributed pipeline runs the same objects as separate roles."""

from __future__ import annotations

from dvla_nodes.learn.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from dvla_nodes.learn.config import DEMO_SEED_BASE, EVAL_SEED_BASE, TrainConfig
from dvla_nodes.learn.grpo import (
    Advantages,
    clipped_objective,
    group_advantages,
    grpo_loss,
    reference_kl,
)
from dvla_nodes.learn.learner import BCStats, Learner, UpdateStats, episode_rewards
from dvla_nodes.learn.metrics import MetricsLog, plot_success, read_metrics
from dvla_nodes.learn.rollout import Assignment, Episodes, RolloutAborted, run_episodes
from dvla_nodes.learn.trainer import (
    EvalResult,
    SerialTrainer,
    TrainResult,
    evaluate,
    make_run_dir,
    open_shards,
    resume_reference,
)

__all__ = [
    "DEMO_SEED_BASE",
    "EVAL_SEED_BASE",
    "Advantages",
    "Assignment",
    "BCStats",
    "Checkpoint",
    "Episodes",
    "EvalResult",
    "Learner",
    "MetricsLog",
    "RolloutAborted",
    "SerialTrainer",
    "TrainConfig",
    "TrainResult",
    "UpdateStats",
    "clipped_objective",
    "episode_rewards",
    "evaluate",
    "group_advantages",
    "grpo_loss",
    "load_checkpoint",
    "make_run_dir",
    "open_shards",
    "plot_success",
    "read_metrics",
    "reference_kl",
    "resume_reference",
    "run_episodes",
    "save_checkpoint",
]
