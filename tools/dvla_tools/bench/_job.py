"""A real training job under ``dvla up``, for the fault and memory benchmarks and their tests.

:func:`write_training_topology` writes a one-host topology (coordinator, learner, N samplers,
control hub on an ``ipc://`` socket in the run directory) with a small, fast training
configuration; :class:`TrainingJob` starts ``dvla up`` on it as a child process, finds the nodes'
processes (the supervisor's children, by node name), asks the control hub for its status as an
observer, and after the job has stopped lists what it left behind in ``/dev/shm`` and in the
process table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psutil

from dvla_bus import wire
from dvla_bus.control import ControlClient, open_control_client
from dvla_bus.errors import ConfigError, DeadlineExceeded, ResourceError
from dvla_bus.shm import SEGMENT_PREFIX, SHM_DIR, SegmentName
from dvla_bus.supervisor import kill_tree

__all__ = [
    "FAST_TRAINING",
    "HOST",
    "TrainingJob",
    "hub_observer",
    "member",
    "run_id",
    "toml_value",
    "write_training_topology",
]

HOST: Final = "h"

#: A training configuration that starts in seconds and makes a new version every few seconds on
#: two shared cores: two reach tasks, a token warm start, small groups, frequent checkpoints.
FAST_TRAINING: Final[dict[str, wire.Scalar]] = {
    "tasks": "reach-red,reach-blue",
    "demos_per_task": 4,
    "bc_epochs": 2,
    "group_size": 4,
    "groups_per_iter": 2,
    "eval_seeds": 1,
    "max_version_lag": 2,
    "checkpoint_every": 5,
    "lr_warmup": 5,
}


def toml_value(value: Any) -> str:
    """``value`` in TOML syntax, for a topology table or ``dvla up --set``: a scalar, or a list
    of names (``tasks``) as the comma-separated string a topology takes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return json.dumps(",".join(value))
    raise ConfigError(f"{value!r}: not a setting value (a scalar or a list of names)")


def write_training_topology(
    root: Path,
    *,
    samplers: int,
    learner: dict[str, wire.Scalar],
    name: str = "job",
    heartbeat_interval_s: float = 0.5,
    heartbeat_timeout_s: float = 3.0,
) -> Path:
    """``root/topology.toml``: coordinator, learner and ``samplers`` samplers on host
    :data:`HOST`; ``learner`` is the ``[roles.learner]`` table (TrainConfig fields and node
    settings such as ``watchdog_s``)."""
    lines = [
        "schema = 1",
        f'name = "{name}"',
        "[control]",
        'endpoint = "ipc://{run_dir}/c.sock"',
        f"heartbeat_interval_s = {heartbeat_interval_s}",
        f"heartbeat_timeout_s = {heartbeat_timeout_s}",
        "[[hosts]]",
        f'name = "{HOST}"',
        f"roles = {{ coordinator = 1, learner = 1, sampler = {samplers} }}",
        "[roles.learner]",
        *(f"{k} = {toml_value(v)}" for k, v in learner.items()),
    ]
    path = root / "topology.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_id(run_dir: Path) -> str:
    """The run component of the job's shared-memory names (as :class:`NodeConfig` makes it)."""
    safe = "".join(c if c.isalnum() or c in "_-" else "-" for c in run_dir.name)
    return (safe.lstrip("_-") or "run")[:64]


@dataclass(slots=True)
class TrainingJob:
    """``dvla up TOPOLOGY --run-dir RUN_DIR`` as a child process; output in ``up.out``.

    Use as a context manager: leaving it stops the job (SIGTERM to ``dvla up``: its nodes get
    SIGTERM, the grace period, then SIGKILL) and, if ``dvla up`` itself does not stop, kills the
    whole process tree."""

    run_dir: Path
    topology: Path
    grace: float = 3.0
    backoff_max: float = 2.0
    proc: subprocess.Popen[bytes] | None = None
    seen_pids: set[int] = field(default_factory=set)

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.run_dir}/c.sock"

    @property
    def out(self) -> Path:
        return self.run_dir / "up.out"

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dvla_tools",
                    "up",
                    str(self.topology),
                    "--run-dir",
                    str(self.run_dir),
                    "--status-every",
                    "0",
                    "--grace",
                    str(self.grace),
                    "--backoff-max",
                    str(self.backoff_max),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def __enter__(self) -> TrainingJob:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def nodes(self) -> dict[str, psutil.Process]:
        """The node processes now running under the supervisor, by node name."""
        found: dict[str, psutil.Process] = {}
        if self.proc is None:
            return found
        try:
            kids = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return found
        for kid in kids:
            try:
                cmd = kid.cmdline()
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            if "--role" in cmd and "--index" in cmd:
                role = cmd[cmd.index("--role") + 1]
                index = cmd[cmd.index("--index") + 1]
                found[f"{role}.{HOST}.{index}"] = kid
                self.seen_pids.add(kid.pid)
                with contextlib.suppress(psutil.Error):
                    self.seen_pids.update(c.pid for c in kid.children(recursive=True))
        return found

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop the job (idempotent); returns ``dvla up``'s exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            self.nodes()  # remember the last generation of pids for the orphan check
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout if timeout is not None else self.grace + 15)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                proc.wait(timeout=5)
        return proc.returncode

    def orphans(self) -> list[int]:
        """Pids of any node or environment worker seen during the run still alive now."""
        alive = []
        for pid in sorted(self.seen_pids):
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        return alive

    def shm_segments(self) -> list[str]:
        """This run's ``/dev/shm`` segments that exist now."""
        rid = run_id(self.run_dir)
        left = []
        with contextlib.suppress(OSError):
            for entry in SHM_DIR.iterdir():
                if not entry.name.startswith(SEGMENT_PREFIX):
                    continue
                try:
                    name = SegmentName.parse(entry.name)
                except ResourceError:
                    continue
                if name.run == rid:
                    left.append(entry.name)
        return sorted(left)

    def metrics(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def checkpoint_version(self, name: str = "latest") -> int | None:
        """The version of checkpoint ``<name>`` in the run directory, None when there is none."""
        from dvla_nodes.learn.checkpoint import checkpoint_meta, find_checkpoint

        path = find_checkpoint(self.run_dir, name)
        with contextlib.suppress(ConfigError, ValueError, KeyError, TypeError):
            return None if path is None else int(checkpoint_meta(path)["version"])
        return None

    def output(self) -> str:
        try:
            return self.out.read_text()
        except OSError:
            return ""


class HubObserver:
    """An observer connection to the job's hub; survives hub restarts (the socket reconnects)."""

    def __init__(self, client: ControlClient) -> None:
        self.client = client

    async def status(self, timeout: float = 1.0) -> wire.Status | None:
        """The hub's status, or None when it does not answer within ``timeout`` seconds."""
        with contextlib.suppress(DeadlineExceeded):
            return await self.client.query(timeout=timeout)
        return None

    async def wait(
        self, predicate: Any, timeout: float, what: str, interval: float = 0.25
    ) -> wire.Status:
        """Poll until ``predicate(status)`` holds; :class:`DeadlineExceeded` naming ``what``."""
        deadline = time.monotonic() + timeout
        while True:
            st = await self.status(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            if st is not None and predicate(st):
                return st
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"timed out after {timeout:.0f}s waiting for {what}")
            await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def hub_observer(endpoint: str) -> AsyncIterator[HubObserver]:
    async with open_control_client(endpoint) as client:
        yield HubObserver(client)


def member(status: wire.Status | None, node: str) -> wire.MemberInfo | None:
    if status is None:
        return None
    return next((m for m in status.members if m.node == node), None)
