"""``dvla bench envs``: environment steps/s with rendering — bare, through dvla's env workers,
and through a whole dvla job (sampler + inference over the bus).

For one suite (``--suite embedded|gym|metaworld|libero``), with frames rendered at
``--image-size`` on every step, all in one run:

* ``bare`` — the suite's environments stepped with uniform random actions in a plain loop
  inside one process of the suite's own interpreter (``python -m
  dvla_nodes.envs.suites._worker --bare``): the ceiling of one core, no pipe, no second process;
* ``shards-1`` — the same environments in one worker process driven from this process over
  the pipe protocol the sampler uses (split-phase reset/step, numpy frames), the access
  pattern of :func:`~dvla_nodes.learn.rollout.run_episodes`; target >= 0.9 of bare;
* ``shards-W`` — W workers (default: one per core) driven round-robin: total and per core;
* ``dvla`` (``--dvla-seconds``, 0 skips it) — a real job under ``dvla up`` (coordinator,
  learner, one sampler with ``inference = "remote"``, one inference node; the suite's
  environments in one env worker of the sampler, under the suite's own interpreter as the job
  runs them): the sampler rolls out GRPO groups of ``--num-envs`` episodes, sends every step's
  observations over the data bus to the inference node and steps with the actions it gets back,
  while the learner admits the groups and makes GRPO updates. Env steps are counted *as the
  sampler stepped them*: the inference node's ``observations`` counter (one observation per
  live environment per step, only this sampler asks it), read from the heartbeats the control
  hub holds, each dated by its heartbeat age. The window opens ``--dvla-warmup`` seconds after
  the learner's first evaluation (so the warm start — demonstrations, cloning, first version —
  and that evaluation are outside it) and lasts ``--dvla-seconds``. Its CPU is that of the whole
  job's process tree (``dvla up``, every node, every env worker), also split by role. The
  reference is the mean of the bare run just before the job and one just after it (their ratio
  is reported as the drift of the machine's load); target through dvla >= 0.9 x bare.

  The job's settings (:data:`JOB_SETTINGS`): a token warm start (1 demonstration per task, 1
  cloning epoch), GRPO groups of ``--num-envs`` (so the sampler has exactly the bare loop's
  environments, in one worker), no evaluations or checkpoints during the window, one torch
  thread; ``--set ROLE.KEY=VALUE`` overrides any role's setting (as ``dvla up --set``). The
  sampler's loop differs from the bare one as a sampler's must: each step waits for the policy's
  actions; a group's environments that finish early wait for the others (a group is one policy
  version); between groups the trajectories are sent to the learner. The learner's GRPO updates
  share the machine.

Every case but ``dvla`` also counts the CPU seconds of the processes it uses (the bare process;
this process plus its workers, all threads) and reports steps per CPU-second: on a machine
shared with other work, wall-clock rates swing with the load (reported as ``load_average``),
the cost per step much less.

Memory per environment: RSS (psutil) of the process that steps the environments divided by
the environments in it — the bare process, the ``shards-1`` worker and the dvla sampler's env
worker(s); and the bare loop's process measured with N environments and with one, the marginal
cost of an environment being the difference over N - 1.

The env-worker cases run ``--repeat`` times (default 2), interleaved, and report medians.
Writes JSON (``--json PATH``): the machine, the configuration, the versions the workers
report, every case (median steps/s, per core, per CPU-second, and each run), the memory
figures, the through-dvla job's window (steps, CPU by role, memory, inference batching), the
load average and the ratios, checked against their target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import psutil

from dvla_bus import wire
from dvla_bus.errors import ConfigError, DeadlineExceeded
from dvla_tools.bench._common import machine_info, write_json
from dvla_tools.bench._job import HOST, TrainingJob, hub_observer, member, toml_value
from dvla_tools.cmd_env import run_bare_loop

TARGET_SHARDS_VS_BARE = 0.9
TARGET_DVLA_VS_BARE = 0.9
DEFAULT_TASKS = {
    "embedded": "reach-red,reach-blue,push-red-green,push-blue-yellow,pick-red,pick-blue,"
    "place-red-yellow,place-blue-green",
    "gym": "HalfCheetah-v5",
    "metaworld": "reach-v3,push-v3,pick-place-v3,door-open-v3",
    "libero": "libero_spatial/0",
}
# At least 2: a GRPO group (the through-dvla job's unit of work) has at least two episodes.
DEFAULT_NUM_ENVS = {"embedded": 8, "gym": 8, "metaworld": 4, "libero": 2}
#: Suite options of the shipped topologies (topologies/<suite>.toml), for every case alike:
#: the job's episode limit decides how often a group ends, so the bare loop gets it too.
DEFAULT_OPTIONS: Final[dict[str, dict[str, str]]] = {"metaworld": {"max_steps": "200"}}

#: The through-dvla job's training settings (``[roles.learner]``): a token warm start outside
#: the window, no evaluations or checkpoints inside it, one torch thread (two cores are shared).
JOB_SETTINGS: Final[dict[str, wire.Scalar]] = {
    "torch_threads": 1,
    "demos_per_task": 1,
    "bc_epochs": 1,
    "groups_per_iter": 2,
    "max_version_lag": 1,
    "eval_every": 0,
    "eval_seeds": 1,
    "final_eval_seeds": 1,
    "checkpoint_every": 0,
    "minutes": 60.0,
}
NODES: Final = {role: f"{role}.{HOST}.0" for role in ("learner", "sampler", "inference")}
ENV_WORKER_MARK: Final = "dvla_nodes.envs."  # in an env worker's command line (-m ...)


def register(sub: Any, name: str, help_text: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--suite", default="embedded", choices=tuple(DEFAULT_TASKS))
    p.add_argument("--tasks", help="comma-separated (default: a few of the suite's)")
    p.add_argument("--num-envs", type=int, help="environments per process (default per suite)")
    p.add_argument("--image-size", type=int, default=64, help="frame size; 0 = state only")
    p.add_argument("--seconds", type=float, default=8.0, help="measured time per env-worker case")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="for shards-W")
    p.add_argument("--python", help="the suite's interpreter (default: found as the sampler does)")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a suite option, for every case (default: the shipped topology's)",
    )
    p.add_argument(
        "--repeat", type=int, default=2, help="runs of every env-worker case, interleaved"
    )
    p.add_argument(
        "--dvla-seconds",
        type=float,
        default=30.0,
        help="measured window of the through-dvla job (0: no job)",
    )
    p.add_argument(
        "--dvla-warmup",
        type=float,
        default=3.0,
        help="seconds after the learner's first evaluation before the window opens",
    )
    p.add_argument(
        "--dvla-start-timeout",
        type=float,
        default=600.0,
        help="seconds the job may take to reach its window (warm start, first evaluation)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ROLE.KEY=VALUE",
        help="override a setting of the through-dvla job (as dvla up --set)",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 s per case, one run")
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=run)


def _options(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--option {pair!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _bare(python: str, config: Any, seconds: float) -> dict[str, Any]:
    return run_bare_loop(python, config, seconds, what="bare loop", timeout=900)


# --- through dvla: a real job ------------------------------------------------------------------


def job_settings(
    suite: str,
    tasks: tuple[str, ...],
    *,
    num_envs: int,
    image_size: int,
    python: str | None,
    options: dict[str, Any],
    overrides: dict[str, dict[str, wire.Scalar]] | None = None,
) -> dict[str, dict[str, wire.Scalar]]:
    """The job's role tables: :data:`JOB_SETTINGS`, the suite (tasks, options, interpreter)
    and a group of ``num_envs`` episodes in one env worker; then ``overrides`` (role -> key ->
    value)."""
    if num_envs < 2:
        raise ConfigError(
            f"--num-envs {num_envs}: the through-dvla job needs at least 2 (a GRPO group has "
            "two episodes or more); --dvla-seconds 0 skips it"
        )
    learner: dict[str, wire.Scalar] = {
        **JOB_SETTINGS,
        "suite": suite,
        "suite_tasks": ",".join(tasks),
        "image_size": image_size,
        "group_size": num_envs,
        "env_workers": 1,
        **{f"suite_{k}": v for k, v in options.items()},
    }
    if python is not None and suite != "embedded":
        learner["suite_python"] = python
    roles: dict[str, dict[str, wire.Scalar]] = {
        "learner": learner,
        "sampler": {"inference": "remote"},
        "inference": {},
    }
    for role, table in (overrides or {}).items():
        if role not in roles:
            raise ConfigError(f"--set {role}.*: the job's roles are {', '.join(roles)}")
        roles[role].update(table)
    return roles


def write_job_topology(run_dir: Path, roles: dict[str, dict[str, wire.Scalar]]) -> Path:
    """``run_dir/topology.toml``: coordinator, learner, one sampler and one inference node on
    host :data:`HOST`, the control hub on an ``ipc://`` socket in the run directory."""
    lines = [
        "schema = 1",
        'name = "bench-envs"',
        "[control]",
        'endpoint = "ipc://{run_dir}/c.sock"',
        "heartbeat_interval_s = 0.5",
        "heartbeat_timeout_s = 10.0",
        "[[hosts]]",
        f'name = "{HOST}"',
        "roles = { coordinator = 1, learner = 1, sampler = 1, inference = 1 }",
    ]
    for role, table in roles.items():
        lines.append(f"[roles.{role}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path = run_dir / "topology.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def _is_env_worker(proc: psutil.Process) -> bool:
    try:
        return any(ENV_WORKER_MARK in arg for arg in proc.cmdline())
    except psutil.Error:
        return False


def _rss_mib(procs: list[psutil.Process]) -> float:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 2**20


def _machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores, everyone's work)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


@dataclass(frozen=True, slots=True)
class _Mark:
    """One reading of the job: the inference node's counters (dated by its heartbeat), the
    sampler's and learner's counters, CPU seconds (whole tree, per role) and the machine's."""

    t: float  # when the counters were current (monotonic)
    observations: int
    batches: int
    groups_sent: int
    admitted_groups: int
    iterations: int
    cpu_job: float
    cpu_roles: dict[str, float]
    machine: float
    pids: dict[str, int]
    gauges: dict[str, dict[str, float]]


async def _mark(hub: Any, job: TrainingJob) -> _Mark:
    """Read the job once the inference node's latest heartbeat is fresh (at most 0.1 s old, or
    whatever it is after 3 s), so its counters and the CPU times belong to one moment."""
    deadline = time.monotonic() + 3.0
    while True:
        st = await hub.status(timeout=2.0)
        now = time.monotonic()
        inf = member(st, NODES["inference"])
        if st is not None and inf is not None and (inf.heartbeat_age <= 0.1 or now > deadline):
            break
        if now > deadline + 10.0:
            raise DeadlineExceeded(f"{NODES['inference']}: no status from the hub")
        await asyncio.sleep(0.02)
    assert job.proc is not None
    nodes = job.nodes()
    supervisor = psutil.Process(job.proc.pid)
    cpu_roles = {"supervisor": _cpu([supervisor])}
    for name, proc in nodes.items():
        role = name.split(".")[0]
        cpu_roles[role] = _cpu([proc])
        kids = _tree(proc)[1:]  # a sampler's or the learner's env workers
        if kids:
            cpu_roles[f"{role}-envs"] = _cpu(kids)
    cpu_job = _cpu(_tree(supervisor))
    machine = _machine_busy()
    members = {m.node: m for m in st.members}

    def counter(node: str, key: str) -> int:
        m = members.get(NODES[node])
        return int(m.counters.get(key, 0)) if m is not None else 0

    return _Mark(
        t=now - inf.heartbeat_age,
        observations=int(inf.counters.get("observations", 0)),
        batches=int(inf.counters.get("batches", 0)),
        groups_sent=counter("sampler", "groups_sent"),
        admitted_groups=counter("learner", "admitted_groups"),
        iterations=counter("learner", "iterations"),
        cpu_job=cpu_job,
        cpu_roles=cpu_roles,
        machine=machine,
        pids={name: p.pid for name, p in nodes.items()},
        gauges={n: dict(m.gauges) for n, m in members.items() if n in NODES.values()},
    )


def _job_memory(job: TrainingJob, num_envs: int) -> dict[str, Any]:
    """RSS of every node (its own process; env workers apart), of the sampler's env workers
    per environment, and of the whole job (a sum of RSS: shared pages counted per process)."""
    assert job.proc is not None
    nodes = job.nodes()
    by_role: dict[str, float] = {}
    workers: dict[str, list[float]] = {}
    for name, proc in nodes.items():
        role = name.split(".")[0]
        by_role[role] = _rss_mib([proc])
        kids = [k for k in _tree(proc)[1:] if _is_env_worker(k)]
        workers[role] = [_rss_mib([k]) for k in kids]
    sampler = workers.get("sampler", [])
    per_worker = num_envs / len(sampler) if sampler else 0
    return {
        "node_rss_mib": by_role,
        "env_worker_rss_mib": workers,
        "sampler_envs_per_worker": per_worker,
        "per_env_rss_mib": sum(sampler) / num_envs if sampler else None,
        "job_rss_mib": _rss_mib(_tree(psutil.Process(job.proc.pid))),
    }


def _metrics_kinds(run_dir: Path) -> set[str]:
    path = run_dir / "metrics.jsonl"
    kinds: set[str] = set()
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                kinds.add(str(json.loads(line).get("kind")))
    return kinds


def through_dvla(
    suite: str,
    tasks: tuple[str, ...],
    *,
    num_envs: int,
    image_size: int,
    seconds: float,
    warmup_s: float,
    start_timeout: float,
    python: str | None,
    options: dict[str, Any],
    overrides: dict[str, dict[str, wire.Scalar]] | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Start the job, wait for its window, measure it, stop the job (module docstring)."""
    say = log if log is not None else (lambda _msg: None)
    roles = job_settings(
        suite,
        tasks,
        num_envs=num_envs,
        image_size=image_size,
        python=python,
        options=options,
        overrides=overrides,
    )
    run_dir = Path(tempfile.mkdtemp(prefix="dvla-envs-", dir="/tmp"))
    t_start = time.monotonic()
    try:
        topo = write_job_topology(run_dir, roles)
        job = TrainingJob(run_dir, topo, grace=5.0)
        with job:

            def alive() -> None:
                assert job.proc is not None
                if job.proc.poll() is not None:
                    tail = "\n".join(job.output().strip().splitlines()[-25:])
                    raise RuntimeError(f"the job stopped (exit {job.proc.returncode}):\n{tail}")

            async def go() -> tuple[_Mark, _Mark, dict[str, Any], float]:
                async with hub_observer(job.endpoint) as hub:
                    deadline = time.monotonic() + start_timeout
                    say("  through dvla: waiting for the warm start and first evaluation ...")
                    while True:
                        alive()
                        st = await hub.status()
                        inf = member(st, NODES["inference"])
                        stepping = inf is not None and inf.counters.get("observations", 0) > 0
                        if stepping and "eval" in _metrics_kinds(run_dir):
                            break
                        if time.monotonic() > deadline:
                            raise DeadlineExceeded(
                                f"the job did not reach its window in {start_timeout:.0f}s "
                                f"(run directory {run_dir}):\n"
                                + "\n".join(job.output().strip().splitlines()[-25:])
                            )
                        await asyncio.sleep(0.25)
                    started = time.monotonic() - t_start
                    await asyncio.sleep(warmup_s)
                    alive()
                    say(f"  through dvla: measuring {seconds:.0f} s ...")
                    m0 = await _mark(hub, job)
                    await asyncio.sleep(seconds)
                    m1 = await _mark(hub, job)
                    alive()
                    memory = _job_memory(job, num_envs)
                    return m0, m1, memory, started

            m0, m1, memory, started = asyncio.run(go())
            status = job.stop()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    if m0.pids != m1.pids:
        raise RuntimeError(f"a node restarted during the window: {m0.pids} -> {m1.pids}")
    window = max(m1.t - m0.t, 1e-9)
    steps = m1.observations - m0.observations
    cpu_job = m1.cpu_job - m0.cpu_job
    cpu_roles = {k: m1.cpu_roles[k] - m0.cpu_roles.get(k, 0.0) for k in m1.cpu_roles}
    path = sum(cpu_roles.get(k, 0.0) for k in ("sampler", "sampler-envs", "inference"))
    batches = m1.batches - m0.batches
    sampler_gauges = m1.gauges.get(NODES["sampler"], {})
    inference_gauges = m1.gauges.get(NODES["inference"], {})
    forward_ms = inference_gauges.get("forward_ms")
    return {
        "roles": roles,
        "start_s": started,
        "warmup_s": warmup_s,
        "window_s": window,
        "env_steps": steps,
        "steps_per_s": steps / window,
        "cpu_s": cpu_job,
        "cores_used": cpu_job / window,
        "cores_by_role": {k: v / window for k, v in cpu_roles.items()},
        "machine_cores_busy": (m1.machine - m0.machine) / window,
        "steps_per_cpu_s": steps / cpu_job if cpu_job > 0 else None,
        # The sampler (its process and env worker) and the inference node: the path an env
        # step takes, without the learner's updates, the hub and the supervisor.
        "steps_per_cpu_s_sampling_path": steps / path if path > 0 else None,
        "groups_sent": m1.groups_sent - m0.groups_sent,
        "admitted_groups": m1.admitted_groups - m0.admitted_groups,
        "updates": m1.iterations - m0.iterations,
        "inference_batches": batches,
        "mean_batch": steps / batches if batches else None,
        "inference_forward_ms": forward_ms,
        # the policy's forward passes (moving-average duration x batches): work the bare
        # loop, with its random actions, does not do
        "policy_forward_cores": forward_ms * batches / 1e3 / window if forward_ms else None,
        "ms_per_step": 1e3 * window / batches if batches else None,
        "sampler_lane_busy": {
            k.split(".")[1]: v for k, v in sampler_gauges.items() if k.startswith("lane.")
        },
        "inference_lane_busy": inference_gauges.get("lane.inference.busy"),
        "memory": memory,
        "exit_status": status,
        "processes": len(m1.pids) + 1 + sum(len(v) for v in memory["env_worker_rss_mib"].values()),
    }


# --- the whole benchmark -----------------------------------------------------------------------


def measure(
    suite: str,
    tasks: tuple[str, ...],
    *,
    num_envs: int,
    image_size: int,
    seconds: float,
    workers: int,
    repeat: int = 1,
    python: str | None = None,
    options: dict[str, str] | None = None,
    dvla_seconds: float = 0.0,
    dvla_warmup: float = 3.0,
    dvla_start_timeout: float = 600.0,
    overrides: dict[str, dict[str, wire.Scalar]] | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Every case of the benchmark; the JSON document without the machine."""
    from dvla_nodes.envs.suites import WorkerConfig, drive, open_suite_shards, resolve_python

    say = log if log is not None else (lambda _msg: None)
    interp = resolve_python(suite, python)
    load = {"before": os.getloadavg()[0]}
    opts: dict[str, Any] = dict(options or {})
    if dvla_seconds > 0:  # refuse a job it cannot start before the other cases run
        job_settings(
            suite,
            tasks,
            num_envs=num_envs,
            image_size=image_size,
            python=python,
            options=opts,
            overrides=overrides,
        )
    cores = os.cpu_count() or 1
    config = WorkerConfig(suite, tasks, num_envs, image_size, opts)
    one = _bare(interp, WorkerConfig(suite, tasks, 1, image_size, opts), min(seconds, 1.0))
    counts = sorted({1, max(1, workers)})
    samples: dict[str, list[dict[str, Any]]] = {"bare": []}
    samples.update({f"shards-{w}": [] for w in counts})
    worker_rss: list[float] = []
    bare: dict[str, Any] = {}
    last_bare: dict[str, Any] = {}
    keys = ("steps_per_s", "steps_per_cpu_s", "episodes", "seconds")
    for rep in range(max(1, repeat)):  # cases interleaved: a drifting load hits them alike
        say(f"  run {rep + 1}: bare, {', '.join(f'shards-{w}' for w in counts)} ...")
        last_bare = _bare(interp, config, seconds)
        bare = bare or last_bare
        samples["bare"].append({k: last_bare[k] for k in keys})
        for w in counts:
            with open_suite_shards(
                suite, tasks, num_envs * w, image_size, workers=w, python=interp, options=opts
            ) as opened:
                procs = [psutil.Process(int(i["pid"])) for i in opened.info if "pid" in i]

                def cpu(procs: list[psutil.Process] = procs) -> float:
                    # this process (actions, frames off the pipes) + its workers, all threads
                    times = [p.cpu_times() for p in procs]
                    return time.process_time() + sum(t.user + t.system for t in times)

                result = drive(opened.shards, opened.spec, seconds, cpu=cpu)
                if w == 1 and rep == 0:
                    worker_rss = [p.memory_info().rss / 2**20 for p in procs]
            samples[f"shards-{w}"].append(
                {
                    "steps_per_s": result.steps_per_s,
                    "steps_per_cpu_s": result.steps_per_cpu_s,
                    "episodes": result.episodes,
                    "seconds": result.seconds,
                }
            )
    cases: list[dict[str, Any]] = []
    for name, runs in samples.items():
        procs_n = 1 if name == "bare" else int(name.split("-")[1])
        rate = statistics.median(r["steps_per_s"] for r in runs)
        per_cpu = [r["steps_per_cpu_s"] for r in runs if r["steps_per_cpu_s"]]
        cases.append(
            {
                "name": name,
                "processes": procs_n,
                "envs": num_envs * procs_n,
                "steps_per_s": rate,
                "steps_per_s_per_core": rate / min(procs_n, cores),
                "steps_per_cpu_s": statistics.median(per_cpu) if per_cpu else None,
                "episodes": sum(r["episodes"] for r in runs),
                "runs": runs,
            }
        )
    dvla: dict[str, Any] | None = None
    if dvla_seconds > 0:
        job = through_dvla(
            suite,
            tasks,
            num_envs=num_envs,
            image_size=image_size,
            seconds=dvla_seconds,
            warmup_s=dvla_warmup,
            start_timeout=dvla_start_timeout,
            python=interp if python else None,
            options=opts,
            overrides=overrides,
            log=say,
        )
        say("  bare again, after the job ...")
        after = _bare(interp, config, seconds)
        before_rate, after_rate = last_bare["steps_per_s"], after["steps_per_s"]
        ref_rate = (before_rate + after_rate) / 2
        cpu_pair = (last_bare["steps_per_cpu_s"], after["steps_per_cpu_s"])
        ref_cpu = sum(cpu_pair) / 2 if all(cpu_pair) else None
        job["bare_reference"] = {
            "used": "mean of the bare run just before the job and the one just after it",
            "before": {k: last_bare[k] for k in keys},
            "after": {k: after[k] for k in keys},
            "steps_per_s": ref_rate,
            "steps_per_cpu_s": ref_cpu,
            "drift": after_rate / before_rate if before_rate else None,
        }
        job["steps_per_s_vs_bare"] = job["steps_per_s"] / ref_rate if ref_rate else 0.0
        job["steps_per_cpu_s_vs_bare"] = (
            job["steps_per_cpu_s"] / ref_cpu if ref_cpu and job["steps_per_cpu_s"] else None
        )
        job["sampling_path_per_cpu_s_vs_bare"] = (
            job["steps_per_cpu_s_sampling_path"] / ref_cpu
            if ref_cpu and job["steps_per_cpu_s_sampling_path"]
            else None
        )
        dvla = job
    load["after"] = os.getloadavg()[0]
    n = num_envs
    rss_n, rss_1 = bare["memory"]["rss_mib"], one["memory"]["rss_mib"]
    uss_n, uss_1 = bare["memory"]["uss_mib"], one["memory"]["uss_mib"]
    memory = {
        "process_rss_mib": {"1_env": rss_1, f"{n}_envs": rss_n},
        "process_uss_mib": {"1_env": uss_1, f"{n}_envs": uss_n},
        "per_env_rss_mib": (rss_n - rss_1) / (n - 1) if n > 1 else None,
        "per_env_uss_mib": (uss_n - uss_1) / (n - 1) if n > 1 else None,
        "one_env_process_rss_mib": rss_1,
        "shard_worker_rss_mib": worker_rss,
        # RSS of the process stepping the environments / the environments in it
        "rss_per_env_mib": {
            "bare": rss_n / n,
            "shards-1": sum(worker_rss) / n if worker_rss else None,
            "dvla": dvla["memory"]["per_env_rss_mib"] if dvla else None,
        },
    }
    ratio = cases[1]["steps_per_s"] / cases[0]["steps_per_s"] if cases[0]["steps_per_s"] else 0.0
    cpu_ratio = (
        cases[1]["steps_per_cpu_s"] / cases[0]["steps_per_cpu_s"]
        if cases[0]["steps_per_cpu_s"] and cases[1]["steps_per_cpu_s"]
        else None
    )
    ratios: dict[str, float | None] = {
        "shards_1_vs_bare": ratio,
        "shards_1_vs_bare_per_cpu_s": cpu_ratio,
    }
    targets = {"shards_1_vs_bare": TARGET_SHARDS_VS_BARE}
    checks = {"shards_1_vs_bare": ratio >= TARGET_SHARDS_VS_BARE}
    if dvla is not None:
        ratios["dvla_vs_bare"] = dvla["steps_per_s_vs_bare"]
        ratios["dvla_vs_bare_per_cpu_s"] = dvla["steps_per_cpu_s_vs_bare"]
        ratios["dvla_sampling_path_vs_bare_per_cpu_s"] = dvla["sampling_path_per_cpu_s_vs_bare"]
        targets["dvla_vs_bare"] = TARGET_DVLA_VS_BARE
        checks["dvla_vs_bare"] = dvla["steps_per_s_vs_bare"] >= TARGET_DVLA_VS_BARE
        per_cpu = dvla["steps_per_cpu_s_vs_bare"]
        checks["dvla_vs_bare_per_cpu_s"] = per_cpu is not None and per_cpu >= TARGET_DVLA_VS_BARE
    return {
        "suite": suite,
        "config": {
            "tasks": list(tasks),
            "num_envs_per_process": num_envs,
            "image_size": image_size,
            "seconds_per_case": seconds,
            "repeat": repeat,
            "workers": workers,
            "options": opts,
            "dvla_seconds": dvla_seconds,
            "dvla_warmup_s": dvla_warmup,
        },
        "python": interp,
        "versions": bare["versions"],
        "cases": cases,
        "memory": memory,
        "through_dvla": dvla,
        "load_average": load,
        "ratios": ratios,
        "targets": targets,
        "checks": checks,
    }


def _print(doc: dict[str, Any], tasks: tuple[str, ...]) -> None:
    c = doc["config"]
    versions = ", ".join(f"{k} {v}" for k, v in doc["versions"].items())
    print(f"suite {doc['suite']} ({versions}); {c['image_size']} px frames; {', '.join(tasks)}")
    print(
        f"{'case':<10} {'procs':>5} {'envs':>5} {'steps/s':>10} {'per core':>10} {'per cpu-s':>10}"
    )
    for case in doc["cases"]:
        print(
            f"{case['name']:<10} {case['processes']:>5} {case['envs']:>5} "
            f"{case['steps_per_s']:>10.0f} {case['steps_per_s_per_core']:>10.0f} "
            f"{case['steps_per_cpu_s'] or 0:>10.0f}"
        )
    d = doc["through_dvla"]
    if d is not None:
        print(
            f"{'dvla':<10} {d['processes']:>5} {c['num_envs_per_process']:>5} "
            f"{d['steps_per_s']:>10.0f} {'-':>10} {d['steps_per_cpu_s'] or 0:>10.0f}"
        )
    m = doc["memory"]
    per_env, per_uss = m["per_env_rss_mib"], m["per_env_uss_mib"]
    extra = (
        f", {per_env:.1f} MiB RSS ({per_uss:.1f} MiB USS) per further env"
        if per_env is not None
        else ""
    )
    print(f"memory: {m['one_env_process_rss_mib']:.0f} MiB RSS with one env{extra}")
    per = m["rss_per_env_mib"]
    print(
        "RSS of the stepping process per env: "
        + ", ".join(f"{k} {v:.1f} MiB" for k, v in per.items() if v is not None)
    )
    r = doc["ratios"]["shards_1_vs_bare"]
    rc = doc["ratios"]["shards_1_vs_bare_per_cpu_s"] or 0.0
    print(
        f"shards-1 / bare = {r:.2f} in steps/s, {rc:.2f} in steps per CPU-second "
        f"(target >= {TARGET_SHARDS_VS_BARE})"
    )
    if d is not None:
        ref = d["bare_reference"]
        roles = ", ".join(f"{k} {v:.2f}" for k, v in sorted(d["cores_by_role"].items()))
        fwd = d["policy_forward_cores"] or 0.0
        print(
            f"through dvla (dvla up: sampler + inference over the bus, learner updating): "
            f"{d['env_steps']} env steps in {d['window_s']:.1f} s after a {d['start_s']:.0f} s "
            f"start + {d['warmup_s']:.0f} s; {d['groups_sent']} groups sent, {d['updates']} "
            f"updates; mean batch {d['mean_batch'] or 0:.1f}"
        )
        print(
            f"  cores used: job {d['cores_used']:.2f} ({roles}); machine "
            f"{d['machine_cores_busy']:.2f} busy; policy forward passes {fwd:.2f} cores, "
            f"{d['inference_forward_ms'] or 0:.1f} ms each, one every {d['ms_per_step'] or 0:.1f}"
            " ms"
        )
        rcpu = d["steps_per_cpu_s_vs_bare"] or 0.0
        rpath = d["sampling_path_per_cpu_s_vs_bare"] or 0.0
        print(
            f"dvla / bare = {d['steps_per_s_vs_bare']:.2f} in steps/s, {rcpu:.2f} per "
            f"CPU-second of the whole job, {rpath:.2f} per CPU-second of sampler + inference "
            f"(target >= {TARGET_DVLA_VS_BARE}); bare = {ref['steps_per_s']:.0f} steps/s, "
            f"{ref['used']} (drift {ref['drift'] or 0:.2f})"
        )
    print(
        f"load average {doc['load_average']['before']:.1f} -> "
        f"{doc['load_average']['after']:.1f} on {os.cpu_count()} cores"
    )


def run(args: argparse.Namespace) -> int:
    from dvla_tools.cmd_up import parse_overrides

    tasks = tuple(t.strip() for t in (args.tasks or DEFAULT_TASKS[args.suite]).split(",") if t)
    num_envs = args.num_envs or DEFAULT_NUM_ENVS[args.suite]
    seconds = 2.0 if args.quick else args.seconds
    options = {**DEFAULT_OPTIONS.get(args.suite, {}), **_options(args.option)}
    dvla_seconds = min(args.dvla_seconds, 5.0) if args.quick else args.dvla_seconds
    doc = measure(
        args.suite,
        tasks,
        num_envs=num_envs,
        image_size=args.image_size,
        seconds=seconds,
        workers=args.workers,
        repeat=1 if args.quick else args.repeat,
        python=args.python,
        options=options,
        dvla_seconds=dvla_seconds,
        dvla_warmup=args.dvla_warmup,
        dvla_start_timeout=args.dvla_start_timeout,
        overrides=parse_overrides(args.set),
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    doc = {"bench": "envs", "machine": machine_info(), **doc}
    _print(doc, tasks)
    write_json(args.json, doc)
    if args.json:
        print(f"wrote {Path(args.json)}")
    return 0
