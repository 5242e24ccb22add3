"""The embedded, language-conditioned MuJoCo task suite (no downloads).

Eight tabletop tasks over four skills (reach, push, pick, place) in one scene; each has several
instruction paraphrases and a scripted expert. Importing this package registers every task with
gymnasium as ``dvla/<task>``, e.g. ``gymnasium.make("dvla/push-red-green")``.
"""

from __future__ import annotations

# First: MuJoCo reads MUJOCO_GL at import time.
from dvla_nodes.envs._gl import configure_gl  # isort: skip

import gymnasium as gym

from dvla_nodes.envs.env import TabletopEnv, action_space, observation_space
from dvla_nodes.envs.experts import expert_action
from dvla_nodes.envs.sim import (
    ACTION_DIM,
    PROPRIO_DIM,
    STATE_DIM,
    SceneRenderer,
    SceneState,
    TabletopSim,
)
from dvla_nodes.envs.tasks import TASK_NAMES, TASKS, TaskSpec, max_instruction_words, vocabulary
from dvla_nodes.envs.vector import RemoteVectorEnv, StepBatch, VectorEnv

__all__ = [
    "ACTION_DIM",
    "PROPRIO_DIM",
    "STATE_DIM",
    "TASKS",
    "TASK_NAMES",
    "RemoteVectorEnv",
    "SceneRenderer",
    "SceneState",
    "StepBatch",
    "TabletopEnv",
    "TabletopSim",
    "TaskSpec",
    "VectorEnv",
    "action_space",
    "configure_gl",
    "expert_action",
    "max_instruction_words",
    "observation_space",
    "register_envs",
    "vocabulary",
]


def register_envs() -> None:
    """Register ``dvla/<task>`` for every task (idempotent)."""
    for name in TASK_NAMES:
        env_id = f"dvla/{name}"
        if env_id not in gym.registry:
            gym.register(
                id=env_id,
                entry_point="dvla_nodes.envs.env:TabletopEnv",
                kwargs={"task": name},
                max_episode_steps=None,
            )


register_envs()
