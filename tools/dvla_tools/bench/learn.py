"""``dvla bench learn``: the learning bar on the embedded suite, measured.

From the behaviour-cloning warm start, GRPO trains on every task (pixels + instruction in) for a
wall-clock budget (default 30 min on this machine, warm start included); the result is the
greedy success on 100 held-out seeds per task, against the warm start's success on the same
seeds. The bar: >= 90 % mean success and >= 20 points over the warm start. The one-demo-per-task
setting (as in SimpleVLA-RL) runs too (``--settings`` picks). Also measured: environment
steps/s with rendering on one core, and the policy's batched inference rate.

Writes JSON (``--json PATH``) with a ``machine`` object, the throughput figures and, per
setting, the configuration, the curves (every evaluation record) and the final numbers; the run
directories keep metrics.jsonl, checkpoints and success.png.

The ``pipeline`` setting reruns the benchmark through the distributed job (issue 7): ``dvla up
TOPOLOGY`` (default ``topologies/local.toml``: coordinator, learner and sampler processes) as a
child process in its own process group, with ``--minutes``, and ``learner.seed``,
``learner.final_eval_seeds``, ``learner.env_workers`` (``--workers``: the samplers read the
learner's table, so it sets their environment processes too) and every ``--set KEY=VALUE`` as
``--set learner.KEY=VALUE``, and the serial trainer's evaluation schedule (``eval_every``,
``eval_seeds``: a quick evaluation every 10 versions on 10 seeds per task), so both settings'
times to the bar are read alike; the topology's other settings (``max_version_lag``) stay.
The learner's ``warmstart`` checkpoint (the cloned policy) is then evaluated here on the final
evaluation's held-out seeds, as for the serial run.
Its time split is the lanes' busy time (``lanes.json``; the lanes overlap). Each setting
reports ``time_to_bar_s``: the training time of its first evaluation with mean success >= 90 %
(a quick evaluation counts; ``None``: never), and ``time_to_bar_sustained_s``: the first time
the mean of the last five evaluations is >= 90 % (five quick evaluations are 400 episodes over
five versions; one is 80, and one version to the next moves by several points); when
``main`` and ``pipeline`` both ran, the result's ``comparison`` sets the two against each
other. The pipeline's clock is the learner's (it starts once the learner's process has set
up); ``job.wall_s`` is the whole ``dvla up``.
``--quick`` (every setting): 1 minute, 10 demonstrations per task, quick evaluations of 4
seeds per task every 5 iterations, at most 10 held-out seeds per task.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from dvla_bus.errors import ConfigError, DeadlineExceeded, DvlaError
from dvla_tools.bench._job import toml_value

if TYPE_CHECKING:
    from dvla_nodes.learn.trainer import EvalResult

BAR_SUCCESS = 0.90
BAR_GAIN = 0.20
BAR_WINDOW = 5  # evaluations averaged for the sustained time to the bar
SETTINGS = ("main", "one-demo", "pipeline")
DEFAULT_TOPOLOGY = Path("topologies/local.toml")
# `dvla up` may run past its training budget by the warm start (when it is longer than the
# budget), process start-up, the final evaluation and the shutdown: the bench waits this long.
JOB_MARGIN_S = 900.0
JOB_SLACK = 1.25
# Not forwarded as learner.KEY: the run's name and live display are the serial trainer's, and
# the budget goes as `dvla up --minutes`.
_SERIAL_ONLY = ("name", "display", "minutes")


def register(sub: Any, name: str, help_text: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=__doc__)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 minute, few seeds, 10 demonstrations per task",
    )
    p.add_argument("--minutes", type=float, default=30.0, help="training budget per setting")
    p.add_argument("--demos-per-task", type=int, help="warm-start demonstrations per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="environment worker processes")
    p.add_argument("--eval-seeds", type=int, default=100, help="held-out seeds per task")
    p.add_argument(
        "--settings",
        default="main,one-demo",
        help="comma-separated: main (the configured warm start), one-demo (1 demo per task), "
        "pipeline (main through the distributed job, `dvla up --topology`)",
    )
    p.add_argument(
        "--topology",
        type=Path,
        default=DEFAULT_TOPOLOGY,
        help="the job the pipeline setting runs (default: %(default)s)",
    )
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig field"
    )
    p.set_defaults(func=run)


def machine() -> dict[str, Any]:
    from dvla_nodes.envs._gl import configure_gl

    configure_gl()  # before mujoco loads: it reads MUJOCO_GL once
    import mujoco
    import numpy
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    with contextlib.suppress(ValueError, OSError):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mujoco": mujoco.__version__,
        "numpy": numpy.__version__,
        "mujoco_gl": os.environ.get("MUJOCO_GL", ""),
    }


def env_throughput(seconds: float = 5.0, num_envs: int = 16) -> dict[str, float]:
    """Env steps/s on one core: physics + 64-px rendering + proprioception, with random actions
    and with the scripted experts; and render-only and physics-only rates."""
    import numpy as np

    from dvla_nodes.envs import TASK_NAMES, VectorEnv

    out: dict[str, float] = {}
    tasks = [TASK_NAMES[i % len(TASK_NAMES)] for i in range(num_envs)]
    rng = np.random.default_rng(0)
    with VectorEnv(num_envs) as env:
        for mode in ("random", "expert"):
            steps, seed = 0, 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                batch = env.reset(tasks, list(range(seed, seed + num_envs)))
                seed += num_envs
                while not batch.done.all():
                    n_active = int((~batch.done).sum())
                    if mode == "random":
                        actions = rng.uniform(-1, 1, (num_envs, 4)).astype(np.float32)
                    else:
                        actions = env.expert_actions()
                    batch = env.step(actions)
                    steps += n_active
            out[f"steps_per_s_{mode}_1core"] = steps / (time.perf_counter() - t0)
        sim = env.sims[0]
        renderer = env._renderer
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            renderer.render(sim.data)
            n += 1
        out["renders_per_s_1core"] = n / (time.perf_counter() - t0)
    return out


def inference_throughput(batch: int = 64, seconds: float = 3.0) -> dict[str, float]:
    import numpy as np
    import torch

    from dvla_nodes.policy import PolicyActor, build_policy

    model, tok = build_policy(stem="patch")
    actor = PolicyActor(model, tok)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (batch, 64, 64, 3), dtype=np.uint8)
    proprio = rng.normal(size=(batch, 7)).astype(np.float32)
    instr = ["push the red block to the green square"] * batch
    out: dict[str, float] = {"params": float(model.num_params)}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        actor.act(images, proprio, instr)
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            actor.act(images, proprio, instr)
            n += batch
        out[f"actions_per_s_batch{batch}_{threads}threads"] = n / (time.perf_counter() - t0)
    return out


QUICK_DEMOS = 10  # --quick: demonstrations per task, so the warm start takes seconds


def train_values(
    args: argparse.Namespace, demos: int | None, overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """The TrainConfig fields a setting sets: seed, budget, environment workers, held-out seeds,
    demonstrations per task; a smoke run's under ``--quick``; then ``--set`` (which wins)."""
    from dvla_nodes.learn.config import TrainConfig

    defaults = TrainConfig()
    values: dict[str, Any] = {
        "seed": args.seed,
        "minutes": args.minutes,
        "env_workers": args.workers,
        "final_eval_seeds": args.eval_seeds,
        # Every setting evaluates on the same schedule (a topology's own would otherwise win
        # in the pipeline setting), so times to the bar compare like with like.
        "eval_every": defaults.eval_every,
        "eval_seeds": defaults.eval_seeds,
    }
    if demos is not None:
        values["demos_per_task"] = demos
    if args.quick:
        values.update(minutes=min(args.minutes, 1.0), eval_seeds=4, eval_every=5)
        values["final_eval_seeds"] = min(args.eval_seeds, 10)
        values["demos_per_task"] = min(QUICK_DEMOS, QUICK_DEMOS if demos is None else demos)
    values.update(overrides)
    return values


def _progress(label: str) -> Callable[[Mapping[str, Any]], None]:
    def show(r: Mapping[str, Any]) -> None:
        if r.get("kind") in ("bc", "eval", "final"):
            steps = r.get("env_steps")
            print(
                f"[{label}] {r['kind']:5s} t={r['t'] / 60:5.1f} min"
                + (f"  env_steps={steps:>8,}" if isinstance(steps, int) else "")
                + (f"  success={r['success']:.1%}" if "success" in r else ""),
                flush=True,
            )

    return show


def evaluate_checkpoint(path: Path, seeds: int, workers: int) -> EvalResult:
    """Greedy success of the checkpoint ``path`` (its own configuration builds the policy) on
    the held-out seeds ``EVAL_SEED_BASE + i``, i < ``seeds``, of every task: the seeds of the
    final evaluation when ``seeds`` is ``final_eval_seeds``."""
    import torch

    from dvla_nodes.learn import TrainConfig, evaluate, load_checkpoint, open_shards
    from dvla_nodes.policy import PolicyActor, build_policy
    from dvla_nodes.policy.flat import flatten

    ck = load_checkpoint(path)
    cfg = TrainConfig.from_json(dict(ck.meta["config"]))
    if cfg.suite != "embedded":
        raise ConfigError(f"{path}: suite {cfg.suite!r}; dvla bench learn runs the embedded suite")
    model, tok = build_policy(
        cfg.policy_size, cfg.image_size, cfg.bins, cfg.seed, stem=cfg.policy_stem
    )
    layout, flat = flatten(model)
    if layout.total != ck.layout.total:
        raise ConfigError(
            f"{path}: {ck.layout.total} parameters, the policy its config builds has "
            f"{layout.total}: not this policy's checkpoint"
        )
    flat[: layout.total].copy_(torch.from_numpy(ck.flat))
    n_envs = cfg.group_size * cfg.groups_per_iter
    with open_shards(n_envs, workers, cfg.image_size) as shards:
        return evaluate(
            shards,
            PolicyActor(model, tok, cfg.temperature),
            cfg.tasks,
            seeds,
            greedy=cfg.eval_greedy,
        )


def time_to_bar(
    curve: Sequence[Mapping[str, Any]], bar: float = BAR_SUCCESS, window: int = 1
) -> float | None:
    """The training time (``t``, seconds) of the first evaluation (``eval`` or ``final``), in
    the order written, at which the mean success of the last ``window`` evaluations is at least
    ``bar``; None when none is. (Not the smallest ``t``: a restarted learner's clock resumes
    from its checkpoint, so ``t`` can step back.)"""
    if window < 1:
        raise ValueError(f"window={window}: must be >= 1")
    recent: collections.deque[float] = collections.deque(maxlen=window)
    for r in curve:
        if r.get("kind") not in ("eval", "final"):
            continue
        recent.append(float(r.get("success", -1.0)))
        if len(recent) == window and sum(recent) / window >= bar:
            return float(r["t"])
    return None


def _faster(serial: float | None, pipe: float | None) -> str | None:
    if serial is None and pipe is None:
        return None
    if pipe is None:
        return "serial"
    if serial is None:
        return "pipeline"
    return "pipeline" if pipe < serial else "serial" if serial < pipe else "tie"


def comparison(settings: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Time to the bar of the serial trainer (setting ``main``) against the pipeline's, when
    both ran: ``faster`` is ``"serial"``, ``"pipeline"``, ``"tie"`` or None (neither got
    there); the same for the sustained time to the bar (``*_sustained``)."""
    by = {s["setting"]: s for s in settings}
    if "main" not in by or "pipeline" not in by:
        return None
    serial, pipe = by["main"].get("time_to_bar_s"), by["pipeline"].get("time_to_bar_s")
    serial_k = by["main"].get("time_to_bar_sustained_s")
    pipe_k = by["pipeline"].get("time_to_bar_sustained_s")
    return {
        "serial_s": serial,
        "pipeline_s": pipe,
        "faster": _faster(serial, pipe),
        "serial_sustained_s": serial_k,
        "pipeline_sustained_s": pipe_k,
        "faster_sustained": _faster(serial_k, pipe_k),
    }


def _outcome(
    warm_by_task: Mapping[str, float],
    final_success: float,
    final_by_task: Mapping[str, float],
    curve: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """A setting's result against the bar, whichever way it ran: the warm start's and the final
    policy's success (the warm start's mean is taken over its tasks), the gain, whether the bar
    is met, the weakest task, the curve and the time to the bar."""
    warm = float(sum(warm_by_task.values()) / max(1, len(warm_by_task)))
    gain = final_success - warm
    return {
        "warmstart_success": warm,
        "warmstart_success_by_task": dict(warm_by_task),
        "final_success": final_success,
        "final_success_by_task": dict(final_by_task),
        "gain": gain,
        "bar_met": final_success >= BAR_SUCCESS and gain >= BAR_GAIN,
        "min_task_success": min(final_by_task.values()),
        "curve": list(curve),
        "time_to_bar_s": time_to_bar(curve),
        "time_to_bar_sustained_s": time_to_bar(curve, window=BAR_WINDOW),
    }


def _setting(
    args: argparse.Namespace, label: str, demos: int | None, overrides: dict[str, Any]
) -> dict[str, Any]:
    from dvla_nodes.learn import SerialTrainer, TrainConfig, make_run_dir, read_metrics

    values = {"name": f"bench-{label}", "display": False, **train_values(args, demos, overrides)}
    cfg = TrainConfig.from_json(values)
    run_dir = make_run_dir(args.runs_dir, cfg.name)
    res = SerialTrainer(cfg, run_dir, _progress(label)).run()
    # The warm start is evaluated on the same held-out seeds as the final policy.
    warm = evaluate_checkpoint(run_dir / "warmstart.json", cfg.final_eval_seeds, cfg.env_workers)
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    curve = [r for r in records if r["kind"] in ("bc", "eval", "final")]
    return {
        "setting": label,
        "run_dir": str(run_dir),
        "plot": str(run_dir / "success.png"),
        "config": cfg.to_json(),
        **_outcome(warm.success_by_task, res.final.success, res.final.success_by_task, curve),
        "train_seconds": res.train_seconds,
        "bc_seconds": res.bc_seconds,
        "env_steps": res.env_steps,
        "iterations": res.iterations,
        "versions": res.version,
        "rollout_seconds": sum(r["rollout_seconds"] for r in train),
        "update_seconds": sum(r["update_seconds"] for r in train),
        "eval_seconds": sum(r.get("eval_seconds", 0.0) for r in records if r["kind"] == "eval"),
        "skipped_groups": sum(r["skipped_groups"] for r in train),
        "groups": sum(r["groups"] for r in train),
    }


# --- the pipeline setting: `dvla up` as a child process ---------------------------------------


def pipeline_command(topology: Path, run_dir: Path, values: Mapping[str, Any]) -> list[str]:
    """``python -m dvla_tools up TOPOLOGY --run-dir RUN_DIR --minutes M --set learner.K=V ...``
    for a setting's :func:`train_values`."""
    cmd = [
        sys.executable,
        "-m",
        "dvla_tools",
        "up",
        str(topology),
        "--run-dir",
        str(run_dir),
        "--minutes",
        repr(float(values["minutes"])),
        "--status-every",
        "30",
    ]
    learner = {k: v for k, v in values.items() if k not in _SERIAL_ONLY}
    for key, value in learner.items():
        cmd += ["--set", f"learner.{key}={toml_value(value)}"]
    return cmd


def job_timeout(minutes: float) -> float:
    return minutes * 60.0 * JOB_SLACK + JOB_MARGIN_S


@dataclass(frozen=True, slots=True)
class JobOutcome:
    returncode: int | None
    wall_s: float
    timed_out: bool
    leaked_pids: tuple[int, ...]  # processes of the job still alive after it ended (killed)


class _MetricsTail:
    """The records appended to a metrics.jsonl since the last call (whole lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _track(pid: int, seen: dict[int, psutil.Process]) -> None:
    with contextlib.suppress(psutil.Error):
        for kid in psutil.Process(pid).children(recursive=True):
            seen.setdefault(kid.pid, kid)


def run_job(
    cmd: Sequence[str],
    out: Path,
    timeout: float,
    *,
    metrics: Path | None = None,
    on_record: Callable[[Mapping[str, Any]], None] | None = None,
    grace: float = 30.0,
    poll_s: float = 1.0,
    linger: float = 5.0,
) -> JobOutcome:
    """Run ``cmd`` (output appended to ``out``) in a new session — its own process group —
    until it exits or ``timeout`` seconds pass; ``on_record`` sees each record appended to
    ``metrics`` meanwhile. On timeout or interruption: SIGTERM (``dvla up`` stops its nodes),
    ``grace`` seconds, then SIGKILL to the whole group. Afterwards any process of the group, or
    any descendant seen while it ran, still alive ``linger`` seconds later is killed and
    reported."""
    t0 = time.monotonic()
    seen: dict[int, psutil.Process] = {}
    tail = _MetricsTail(metrics) if metrics is not None else None
    with open(out, "ab") as sink:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
    pgid = proc.pid
    timed_out = False
    try:
        while True:
            try:
                proc.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            _track(proc.pid, seen)
            if tail is not None and on_record is not None:
                for record in tail.new():
                    on_record(record)
            if time.monotonic() - t0 > timeout:
                timed_out = True
                break
    finally:
        # Each step in its own try: a second Ctrl-C during the grace period, or a job that
        # outlives SIGKILL's wait, must not skip the kill or the reaping.
        try:
            if proc.poll() is None:  # timed out, or the bench was interrupted
                _track(proc.pid, seen)
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        finally:
            try:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pgid, signal.SIGKILL)
                    proc.wait(timeout=10)
            finally:
                leaked = _reap(pgid, seen, linger)
    if tail is not None and on_record is not None:
        for record in tail.new():
            on_record(record)
    return JobOutcome(proc.returncode, time.monotonic() - t0, timed_out, leaked)


def _group_members(pgid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of process group ``pgid``."""
    if not _group_exists(pgid):
        return []
    out = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(p.pid) == pgid and _alive(p):
                out.append(p)
    return out


def _reap(pgid: int, seen: Mapping[int, psutil.Process], linger: float) -> tuple[int, ...]:
    """Kill what is left of a finished job: members of its process group and descendants seen
    while it ran still alive ``linger`` seconds after it ended; returns their pids."""
    deadline = time.monotonic() + linger
    while True:
        alive = {p.pid: p for p in seen.values() if _alive(p)}
        alive.update((p.pid, p) for p in _group_members(pgid))
        if not alive:
            return ()
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    for p in alive.values():
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(list(alive.values()), timeout=5)
    return tuple(sorted(alive))


def _leftover_segments(run_dir: Path, topology: Path) -> list[str]:
    """The run's ``/dev/shm`` segments still there after the job (unlinked here)."""
    from dvla_bus.shm import SHM_DIR
    from dvla_tools.bench._job import TrainingJob

    names = TrainingJob(run_dir, topology).shm_segments()
    for name in names:
        (SHM_DIR / name).unlink(missing_ok=True)
    return names


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DvlaError(f"{path}: cannot read the {what}: {exc}") from None
    if not isinstance(doc, dict):
        raise DvlaError(f"{path}: the {what} is not a JSON object")
    return doc


def _lane_seconds(lanes: Mapping[str, Any] | None, lane: str) -> float | None:
    """A lane's busy seconds over the traced span (summed over processes), from lanes.json."""
    if lanes is None or lane not in lanes.get("utilisation", {}):
        return None
    return float(lanes["utilisation"][lane]) * float(lanes["span_s"])


def pipeline_result(
    run_dir: Path, warm_by_task: Mapping[str, float], warm_episodes: int | None = None
) -> dict[str, Any]:
    """The ``pipeline`` setting's result from a finished job's run directory (metrics.jsonl,
    final.json, lanes.json if the lanes were traced) and the warm start's success per task on
    the final evaluation's seeds (``warm_episodes``: how many episodes that took, checked
    against the final evaluation's)."""
    from dvla_nodes.learn import read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise DvlaError(f"{path}: missing; the job wrote no metrics (see up.out and logs/)")
    records = read_metrics(path)
    finals = [r for r in records if r.get("kind") == "final"]
    if not finals:
        raise DvlaError(f"{path}: no final evaluation; the job did not finish training")
    final = finals[-1]
    if warm_episodes is not None and final.get("episodes") not in (None, warm_episodes):
        raise DvlaError(
            f"{run_dir}: the final evaluation ran {final['episodes']} episodes, the warm start's "
            f"{warm_episodes}: not the same held-out seeds"
        )
    meta = _read_json(run_dir / "final.json", "final checkpoint's metadata")
    ck_metrics = meta.get("metrics", {})
    lanes_path = run_dir / "lanes.json"
    lanes = _read_json(lanes_path, "lane summary") if lanes_path.exists() else None
    train = [r for r in records if r.get("kind") == "train"]
    bc = [r for r in records if r.get("kind") == "bc"]
    curve = [r for r in records if r.get("kind") in ("bc", "eval", "final")]
    by_task = {str(k): float(v) for k, v in final["success_by_task"].items()}
    return {
        "setting": "pipeline",
        "run_dir": str(run_dir),
        "plot": str(run_dir / "success.png"),
        "config": meta["config"],
        **_outcome(warm_by_task, float(final["success"]), by_task, curve),
        "train_seconds": float(ck_metrics.get("elapsed", final["t"])),
        "bc_seconds": float(bc[-1]["t"]) if bc else 0.0,
        "env_steps": int(ck_metrics.get("env_steps", final.get("env_steps", 0))),
        "iterations": int(meta["step"]),
        "versions": int(meta["version"]),
        # Lane busy time: the lanes run at once, so these add up to more than the wall time.
        "rollout_seconds": _lane_seconds(lanes, "sampling"),
        "inference_seconds": _lane_seconds(lanes, "inference"),
        "update_seconds": _lane_seconds(lanes, "gradient"),
        "distribution_seconds": _lane_seconds(lanes, "distribution"),
        "lane_overlap": float(lanes["overlap"]) if lanes and "overlap" in lanes else None,
        "eval_seconds": sum(r.get("eval_seconds", 0.0) for r in records if r["kind"] == "eval"),
        "skipped_groups": sum(int(r.get("skipped_groups", 0)) for r in train),
        "groups": sum(int(r.get("groups", 0)) for r in train),
        "stale_groups": int(train[-1].get("stale_groups", 0)) if train else 0,
    }


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _pipeline_setting(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    from dvla_nodes.learn import TrainConfig, make_run_dir

    values = train_values(args, args.demos_per_task, overrides)
    try:  # refused here (unknown keys, bad values), not by a learner minutes from now
        TrainConfig.from_json({**values, "display": False})
    except TypeError as exc:
        raise ConfigError(f"--set: {exc}") from None
    topology = args.topology
    if not topology.is_file():
        raise ConfigError(f"--topology {topology}: no such file")
    pipeline_command(topology, Path("run"), values)  # refuses bad values before a run dir
    run_dir = make_run_dir(args.runs_dir, "bench-pipeline").resolve()
    cmd = pipeline_command(topology, run_dir, values)
    timeout = job_timeout(float(values["minutes"]))
    out = run_dir / "up.out"
    print(f"[pipeline] {shlex.join(cmd)}", flush=True)
    print(f"[pipeline] output in {out}; waiting up to {timeout / 60:.0f} min", flush=True)
    outcome = run_job(
        cmd, out, timeout, metrics=run_dir / "metrics.jsonl", on_record=_progress("pipeline")
    )
    job: dict[str, Any] = {
        "command": cmd,
        "topology": str(topology),
        "exit_status": outcome.returncode,
        "wall_s": outcome.wall_s,
        "timeout_s": timeout,
        "timed_out": outcome.timed_out,
        "leaked_pids": list(outcome.leaked_pids),
        "leaked_shm": _leftover_segments(run_dir, topology),
        "leftover_sockets": sorted(str(p) for p in run_dir.rglob("*.sock")),
    }
    if job["leaked_pids"] or job["leaked_shm"] or job["leftover_sockets"]:
        print(
            f"[pipeline] WARNING: the job left processes {job['leaked_pids']} (killed), "
            f"segments {job['leaked_shm']} (unlinked), sockets {job['leftover_sockets']}",
            flush=True,
        )
    if outcome.timed_out:
        raise DeadlineExceeded(
            f"pipeline: `dvla up` did not finish within {timeout:.0f} s and was stopped "
            f"(SIGTERM, then SIGKILL to its process group); see {out} and {run_dir / 'logs'}"
        )
    if outcome.returncode != 0:
        raise DvlaError(
            f"pipeline: `dvla up` exited {outcome.returncode}; see {out} and "
            f"{run_dir / 'logs'}:\n{_tail(out)}"
        )
    warm_path = run_dir / "warmstart.json"
    step = _read_json(warm_path, "warm-start checkpoint's metadata").get("step")
    if str(step) != "0":
        raise DvlaError(f"{warm_path}: step {step}, not the warm start (step 0)")
    print("[pipeline] evaluating the warm start on the final evaluation's seeds ...", flush=True)
    warm = evaluate_checkpoint(
        warm_path, int(values["final_eval_seeds"]), int(values["env_workers"])
    )
    result = pipeline_result(run_dir, warm.success_by_task, warm.episodes)
    result["job"] = job
    return result


# --- report ------------------------------------------------------------------------------------


def _secs(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} s"


def _mins(value: float | None) -> str:
    return "not reached" if value is None else f"{value / 60:.1f} min"


def comparison_line(cmp: Mapping[str, Any]) -> str:
    return (
        f"Time to the bar (first evaluation with >= {BAR_SUCCESS:.0%} mean success): "
        + _verdict(cmp["serial_s"], cmp["pipeline_s"], cmp["faster"])
        + f" Sustained (mean of the last {BAR_WINDOW} evaluations >= {BAR_SUCCESS:.0%}): "
        + _verdict(cmp["serial_sustained_s"], cmp["pipeline_sustained_s"], cmp["faster_sustained"])
    )


def _verdict(serial: float | None, pipe: float | None, faster: str | None) -> str:
    if faster is None:
        verdict = "neither reached it"
    elif faster == "tie":
        verdict = "a tie"
    elif serial is not None and pipe is not None:
        slow, fast = (serial, pipe) if faster == "pipeline" else (pipe, serial)
        verdict = f"{faster} faster ({slow / max(fast, 1e-9):.2f}x)"
    else:
        verdict = f"only the {faster} reached it"
    return f"serial trainer (main) {_mins(serial)}, pipeline {_mins(pipe)}: {verdict}."


def markdown(result: dict[str, Any]) -> str:
    """The BENCHMARKS.md tables for a result: final numbers per setting (and the serial trainer
    against the pipeline, when both ran), then each setting's curve (every evaluation: wall
    time, env steps, mean and per-task success) and time split."""
    lines = [
        "| setting | warm start | after GRPO | gain | min task | train time | env steps | bar "
        f"| time to bar | sustained (last {BAR_WINDOW}) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result.get("settings", []):
        lines.append(
            f"| {s['setting']} | {s['warmstart_success']:.1%} | {s['final_success']:.1%} | "
            f"{s['gain'] * 100:+.1f} pts | {s['min_task_success']:.0%} | "
            f"{s['train_seconds'] / 60:.1f} min | {s['env_steps']:,} | "
            f"{'met' if s['bar_met'] else '**not met**'} | {_mins(s.get('time_to_bar_s'))} | "
            f"{_mins(s.get('time_to_bar_sustained_s'))} |"
        )
    if result.get("comparison"):
        lines += ["", comparison_line(result["comparison"])]
    for s in result.get("settings", []):
        tasks = sorted(s["final_success_by_task"])
        lines += [
            "",
            f"Curve, setting `{s['setting']}` (greedy success; `final` = "
            f"{s['config']['final_eval_seeds']} held-out seeds/task, others "
            f"{s['config']['eval_seeds']}):",
            "",
            "| kind | wall min | env steps | mean | " + " | ".join(tasks) + " |",
            "|---|---|---|---|" + "---|" * len(tasks),
        ]
        for r in s["curve"]:
            if "success_by_task" not in r:
                continue
            per = " | ".join(f"{r['success_by_task'].get(t, float('nan')):.0%}" for t in tasks)
            lines.append(
                f"| {r['kind']} | {r['t'] / 60:.1f} | {r.get('env_steps', 0):,} | "
                f"{r['success']:.1%} | {per} |"
            )
        if "lane_overlap" in s:  # the pipeline: lanes run at once
            overlap = s["lane_overlap"]
            job = s.get("job", {})
            lines += [
                "",
                "Time split (lane busy time"
                + ("" if overlap is None else f"; lanes overlap {overlap:.0%} of the traced span")
                + f"): sampling {_secs(s['rollout_seconds'])}, inference "
                f"{_secs(s.get('inference_seconds'))}, GRPO updates "
                f"{_secs(s['update_seconds'])}, weight distribution "
                f"{_secs(s.get('distribution_seconds'))}, evaluations "
                f"{_secs(s['eval_seconds'])}, warm start (demos + cloning) "
                f"{_secs(s['bc_seconds'])}; {s.get('versions', '?')} versions; groups skipped "
                f"{s['skipped_groups']} of {s['groups']}, stale {s.get('stale_groups', 0)}; "
                f"`dvla up` wall time {_secs(job.get('wall_s'))}.",
            ]
        else:
            lines += [
                "",
                f"Time split: rollouts {_secs(s['rollout_seconds'])}, GRPO updates "
                f"{_secs(s['update_seconds'])}, evaluations {_secs(s['eval_seconds'])}, warm "
                f"start (demos + cloning) {_secs(s['bc_seconds'])}; groups skipped "
                f"{s['skipped_groups']} of {s['groups']}.",
            ]
    return "\n".join(lines)


def _write(path: Path | None, result: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, sort_keys=True))


def run(args: argparse.Namespace) -> int:
    from dvla_tools.cmd_train import _parse_sets

    overrides = _parse_sets(args.set)
    chosen = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"--settings: unknown {unknown}; choose from {', '.join(SETTINGS)}")
    if "pipeline" in chosen and not args.topology.is_file():
        raise ConfigError(f"--topology {args.topology}: no such file")
    result: dict[str, Any] = {
        "bench": "learn",
        "command": "dvla bench learn" + (" --quick" if args.quick else ""),
        "machine": machine(),
        "bar": {"success": BAR_SUCCESS, "gain": BAR_GAIN, "minutes": args.minutes},
    }
    print("measuring environment and inference throughput ...", flush=True)
    result["env_throughput"] = env_throughput(1.0 if args.quick else 5.0)
    result["inference"] = inference_throughput(seconds=1.0 if args.quick else 3.0)
    print(json.dumps({**result["env_throughput"], **result["inference"]}, indent=1), flush=True)
    settings: list[dict[str, Any]] = []
    for label in chosen:
        if label == "pipeline":
            settings.append(_pipeline_setting(args, overrides))
        else:
            demos = 1 if label == "one-demo" else args.demos_per_task
            settings.append(_setting(args, label, demos, overrides))
        result["settings"] = settings
        cmp = comparison(settings)
        if cmp is not None:
            result["comparison"] = cmp
        _write(args.json, result)  # keep what is measured even if a later setting fails
    for s in settings:
        print(
            f"{s['setting']}: warm start {s['warmstart_success']:.1%} -> GRPO "
            f"{s['final_success']:.1%} ({s['gain'] * 100:+.1f} points) in "
            f"{s['train_seconds'] / 60:.1f} min; bar {'MET' if s['bar_met'] else 'NOT met'}; "
            f"time to {BAR_SUCCESS:.0%}: {_mins(s['time_to_bar_s'])} (sustained over "
            f"{BAR_WINDOW} evaluations: {_mins(s.get('time_to_bar_sustained_s'))})"
        )
    if "comparison" in result:
        print(comparison_line(result["comparison"]))
    if args.json is not None:
        _write(args.json, result)
        print(f"wrote {args.json}")
    print(markdown(result))
    return 0
