"""Suite shards for the sampler: environments of any suite in worker processes, each worker
under the interpreter that has the suite (its own virtual environment, ``dvla env create``).

A worker is ``python -m dvla_nodes.envs.suites._worker`` run by that interpreter and driven
over :class:`~dvla_nodes.envs.vector.RemoteVectorEnv`'s two pipes (the same framing and the same
commands as the embedded suite's workers); its ``ready`` message carries the
:class:`SuiteSpec`, so the sampler learns the suite's shapes and instructions without importing
the suite. The worker imports neither torch nor dvla's learning code.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from dvla_bus.errors import ConfigError
from dvla_nodes.envs.sim import ACTION_DIM, PROPRIO_DIM, STATE_DIM
from dvla_nodes.envs.suites._interface import (
    SUITES,
    Options,
    Scalar,
    SuiteSpec,
    adapter_class,
    check_options,
    load_suite,
    suite_info,
)
from dvla_nodes.envs.suites._vector import SuiteVectorEnv
from dvla_nodes.envs.tasks import TASK_NAMES, TASKS
from dvla_nodes.envs.vector import RemoteVectorEnv, VectorEnv, is_this_interpreter

WORKER = "dvla_nodes.envs.suites._worker"
WORKER_PROTOCOL = 1
"""Version of what a suite worker says (the ready message's fields, the spec, the config). A
suite environment holds its own dvla install: after an upgrade that changes this, its workers
are refused with the advice to re-run ``dvla env create``."""

AnyShard = VectorEnv | RemoteVectorEnv | SuiteVectorEnv
"""Every shard kind satisfies the sampler's ``Shard`` protocol (split-phase reset/step/expert)."""


class WorkerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a suite worker builds (JSON on its command line)."""

    suite: str
    tasks: tuple[str, ...]
    num_envs: int
    image_size: int
    options: dict[str, Scalar] = {}


# --------------------------------------------------------------------------- interpreters


def envs_root() -> Path:
    """Where ``dvla env create`` puts suite environments by default: ``$DVLA_ENVS``, else
    ``$XDG_DATA_HOME/dvla/envs`` (``~/.local/share/dvla/envs``) — outside any checkout."""
    explicit = os.environ.get("DVLA_ENVS")
    if explicit:
        return Path(explicit)
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "dvla" / "envs"


def default_env(suite: str) -> Path:
    return envs_root() / suite


def env_var(suite: str) -> str:
    """The environment variable that names an interpreter for ``suite``."""
    return f"DVLA_{suite.upper()}_PYTHON"


def suite_python(suite: str) -> str | None:
    """An interpreter for ``suite`` that exists: ``$DVLA_<SUITE>_PYTHON``, else the default
    environment's, else None (it may still not *have* the suite: see :func:`has_suite`)."""
    explicit = os.environ.get(env_var(suite))
    if explicit:
        return explicit
    candidate = default_env(suite) / "bin" / "python"
    return str(candidate) if candidate.exists() else None


@functools.cache
def has_suite(suite: str, python: str | None = None) -> bool:
    """Whether interpreter ``python`` (default: this one) can import ``suite``'s package."""
    name = suite_info(suite).import_name
    if python is None or is_this_interpreter(python):
        return importlib.util.find_spec(name) is not None
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is None)"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def resolve_python(suite: str, python: str | None = None) -> str:
    """The interpreter to run ``suite``'s workers: ``python`` when given; else this one when it
    has the suite; else :func:`suite_python`. A ConfigError says how to get one."""
    info = suite_info(suite)
    if python:
        path = Path(python).expanduser()
        if not (path.exists() and os.access(path, os.X_OK)):
            raise ConfigError(f"suite {suite!r}: interpreter {python} does not exist")
        return str(path)
    if not info.own_env or has_suite(suite):
        return sys.executable
    found = suite_python(suite)
    if found is not None:
        return found
    raise ConfigError(
        f"suite {suite!r} is not installed for {sys.executable} and no environment was created "
        f"for it: run `dvla env create {suite}` (or set {env_var(suite)}, or "
        '[roles.learner] suite_python = ".../bin/python")'
    )


# --------------------------------------------------------------------------- topology settings


@dataclass(frozen=True, slots=True)
class SuiteSettings:
    """A job's suite, from a topology table (the learner's: the suite is a job-wide choice, see
    :mod:`dvla_nodes.learn.suite`)::

    suite = "metaworld"           # embedded (default) | gym | metaworld | libero
    suite_tasks = "MT10"          # comma-separated (default: every embedded task)
    suite_python = "/path/bin/python"   # optional; see resolve_python
    suite_camera = "corner2"      # any other suite_<option>: the adapter's options
    """

    suite: str = "embedded"
    tasks: tuple[str, ...] = TASK_NAMES
    python: str | None = None
    options: dict[str, Scalar] = field(default_factory=dict)


def suite_options(settings: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """The adapter options of a table: every ``suite_<option>`` key but ``suite_tasks`` and
    ``suite_python``, without the prefix (unchecked: see :func:`check_suite`)."""
    return {
        k.removeprefix("suite_"): v
        for k, v in settings.items()
        if k.startswith("suite_") and k not in ("suite_tasks", "suite_python")
    }


def check_suite(suite: str, tasks: Sequence[str], options: Options | None = None) -> None:
    """Everything about a suite choice that can be checked without the suite installed: the
    name, the options (known, of the right type) and the task names (as far as the adapter can
    tell). A ConfigError names the key (``suite``, ``suite_tasks``, ``suite_<option>``)."""
    if suite not in SUITES:
        raise ConfigError(
            f"suite = {suite!r}: unknown suite {suite!r}; choose one of: {', '.join(SUITES)}"
        )
    if not tasks:
        raise ConfigError(f"suite = {suite!r} needs suite_tasks (comma-separated task names)")
    opts = dict(options or {})
    if suite == "embedded":
        if opts:
            keys = ", ".join(f"suite_{k}" for k in sorted(opts))
            raise ConfigError(f"{keys}: the embedded suite takes no options")
        embedded_spec(tasks, 0)
        return
    cls = adapter_class(suite)
    try:
        check_options(suite, cls.OPTIONS, opts)
    except ConfigError as exc:
        raise ConfigError(f"suite_<option>: {exc}") from None
    try:
        cls.check_tasks(tasks)
    except ConfigError as exc:
        raise ConfigError(f"suite_tasks: {exc}") from None


def suite_settings(settings: Mapping[str, Scalar]) -> SuiteSettings:
    """The suite keys of a topology table, checked with :func:`check_suite`."""
    suite = str(settings.get("suite", "embedded"))
    if suite not in SUITES:
        check_suite(suite, ())  # the ConfigError naming the key and the choices
    raw = settings.get("suite_tasks")
    tasks = (
        tuple(t.strip() for t in str(raw).split(",") if t.strip())
        if raw is not None
        else (TASK_NAMES if suite == "embedded" else ())
    )
    python = settings.get("suite_python")
    options = suite_options(settings)
    check_suite(suite, tasks, options)
    return SuiteSettings(suite, tasks, str(python) if python else None, options)


# --------------------------------------------------------------------------- shards


def embedded_spec(tasks: Sequence[str], image_size: int) -> SuiteSpec:
    for t in tasks:
        if t not in TASKS:
            raise ConfigError(f"unknown task {t!r}; the embedded suite has: {', '.join(TASKS)}")
    return SuiteSpec(
        suite="embedded",
        tasks=tuple(tasks),
        instructions=tuple(TASKS[t].instructions[0] for t in tasks),
        max_steps=tuple(TASKS[t].max_steps for t in tasks),
        image_size=image_size,
        action_dim=ACTION_DIM,
        proprio_dim=PROPRIO_DIM,
        state_dim=STATE_DIM,
        has_expert=True,
        action_mapping="native: [dx, dy, dz] 1.0 = 5 cm, grip > 0 closes",
    )


@dataclass(frozen=True, slots=True)
class OpenSuite:
    """Open shards of one suite: ``shards`` go to ``run_episodes``; ``spec`` says the shapes,
    tasks and instructions; ``info`` is each worker's ready message (pid, interpreter,
    versions; empty for in-process shards)."""

    spec: SuiteSpec
    shards: list[AnyShard]
    info: list[dict[str, Any]]

    @property
    def num_envs(self) -> int:
        return sum(s.num_envs for s in self.shards)


def split(num_envs: int, workers: int) -> list[int]:
    """``num_envs`` slots over ``workers`` shards, as even as can be (each >= 1)."""
    w = max(1, workers)
    return [max(1, num_envs // w + (1 if i < num_envs % w else 0)) for i in range(w)]


@contextlib.contextmanager
def open_suite_shards(
    suite: str,
    tasks: Sequence[str],
    num_envs: int,
    image_size: int,
    *,
    workers: int = 1,
    python: str | None = None,
    options: Options | None = None,
    start_timeout: float = 120.0,
) -> Iterator[OpenSuite]:
    """``num_envs`` environments of ``suite`` on ``tasks`` over ``workers`` worker processes
    (0: one in-process shard, which needs the suite in this interpreter). Workers run under
    :func:`resolve_python` (``python``). Everything is closed and every worker reaped on exit.
    """
    info = suite_info(suite)
    opts = dict(options or {})
    with contextlib.ExitStack() as stack:
        if suite == "embedded":
            if opts:
                raise ConfigError(f"the embedded suite takes no options (got {', '.join(opts)})")
            spec = embedded_spec(tasks, image_size)
            if workers <= 0:
                yield OpenSuite(spec, [stack.enter_context(VectorEnv(num_envs, image_size))], [])
                return
            interp = resolve_python(suite, python)
            embedded = [
                stack.enter_context(RemoteVectorEnv(n, image_size, python=interp))
                for n in split(num_envs, workers)
            ]
            yield OpenSuite(
                spec, list(embedded), [{"pid": s.pid, "python": interp} for s in embedded]
            )
            return
        if workers <= 0:
            adapter = load_suite(suite, tasks, image_size, opts)
            env = stack.enter_context(SuiteVectorEnv(adapter, num_envs))
            yield OpenSuite(env.spec, [env], [])
            return
        interp = resolve_python(suite, python)
        remotes: list[RemoteVectorEnv] = []
        for n in split(num_envs, workers):
            config = WorkerConfig(info.name, tuple(tasks), n, image_size, opts)
            remote = RemoteVectorEnv(
                n,
                image_size,
                start_timeout,
                python=interp,
                worker=WORKER,
                worker_args=[msgspec.json.encode(config).decode()],
            )
            remotes.append(stack.enter_context(remote))
            theirs = remote.info.get("protocol")
            if theirs != WORKER_PROTOCOL:
                source = remote.info.get("source")
                raise ConfigError(
                    f"suite {suite!r}: the worker under {interp} speaks protocol {theirs}, this "
                    f"dvla {WORKER_PROTOCOL} (its dvla install is from {source}): "
                    f"re-run `dvla env create {suite}`"
                )
        specs = [SuiteSpec.from_meta(r.info["spec"]) for r in remotes]
        if any(s != specs[0] for s in specs[1:]):
            raise ConfigError(f"suite {suite!r}: workers disagree on the suite spec")
        yield OpenSuite(specs[0], list(remotes), [dict(r.info) for r in remotes])


def available_suites() -> dict[str, str | None]:
    """Suite -> an interpreter that has it (this one first), or None."""
    out: dict[str, str | None] = {}
    for name in SUITES:
        if has_suite(name):
            out[name] = sys.executable
            continue
        candidate = suite_python(name)
        out[name] = candidate if candidate is not None and has_suite(name, candidate) else None
    return out
