"""The established-framework comparison of ``dvla bench pipeline``: HalfCheetah through dvla.

Two measurements in one run, on the same environment construction
(:func:`dvla_nodes.cheetah.make_vector_env`: one gymnasium ``SyncVectorEnv`` of ``envs``
HalfCheetah-v5 copies per process):

* **bare ceiling** — ``procs`` processes (default 2, one per core) step their vector with
  pre-drawn random actions and nothing else, started together behind a barrier; frames/s is the
  sum over processes (also measured with one process, for reference).
* **through dvla** — a real ``dvla up`` job: a coordinator, a ``cheetah_learner`` and
  ``samplers`` ``cheetah_sampler`` processes (:mod:`dvla_nodes.cheetah`). Samplers run the
  Gaussian MLP policy locally (numpy) and send 64-step blocks over the data bus (shared-memory
  slabs, credit flow control) to the learner, which makes a PPO update every 4096 frames
  (2 epochs of 1024-frame minibatches, as in Sample Factory's MuJoCo example) and publishes each
  version through its weight pool; samplers pick new versions up between blocks. Frames/s are
  the frames the learner admitted for training between its first and its last update
  (``metrics.jsonl``), so start-up is excluded and dropped (stale) blocks do not count.

The figure of merit is frames/s through dvla ÷ the bare ceiling (target >= 0.5; Sample Factory
2.1.1 reached 0.17 on this machine, MEASURED.md).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import psutil

from dvla_bus import wire
from dvla_tools.bench._job import toml_value

__all__ = [
    "TARGET",
    "ceiling",
    "cheetah_case",
    "run_job",
    "watch",
    "write_topology",
]

TARGET: Final = 0.5
SAMPLE_FACTORY_RATIO: Final = 0.17
ENV_ID: Final = "HalfCheetah-v5"


# --- the bare ceiling --------------------------------------------------------------------------


def bare_main() -> None:
    """A bare-environment worker process: ``python -c '...bare_main()' ENV_ID ENVS SECONDS
    SEED``. Builds the vector, warms it up, prints ``ready``, waits for a line on stdin, steps
    with pre-drawn random actions for SECONDS and prints a JSON line: frames, seconds, cpu_s."""
    from gymnasium.spaces import Box

    from dvla_nodes.cheetah import make_vector_env

    env_id, envs, seconds, seed = (
        sys.argv[1],
        int(sys.argv[2]),
        float(sys.argv[3]),
        int(sys.argv[4]),
    )
    vec = make_vector_env(env_id, envs)
    try:
        vec.reset(seed=seed)
        space = vec.single_action_space
        assert isinstance(space, Box)
        rng = np.random.default_rng(seed)
        actions = rng.uniform(space.low, space.high, (256, envs, *space.shape)).astype(np.float32)
        for i in range(50):  # warm up (first steps allocate)
            vec.step(actions[i % 256])
        print("ready", flush=True)
        sys.stdin.readline()
        frames, i = 0, 0
        t0, c0 = time.perf_counter(), time.process_time()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            for _ in range(16):
                vec.step(actions[i % 256])
                i += 1
            frames += 16 * envs
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(json.dumps({"frames": frames, "seconds": wall, "cpu_s": cpu}), flush=True)
    finally:
        vec.close()


def ceiling(
    env_id: str = ENV_ID, envs: int = 8, procs: int = 2, seconds: float = 10.0
) -> dict[str, Any]:
    """Frames/s of ``procs`` processes stepping ``envs`` environments each with no policy,
    started together once every one is built and warm."""
    code = "from dvla_tools.bench.cheetah import bare_main; bare_main()"
    workers: list[subprocess.Popen[str]] = []
    try:
        for k in range(procs):
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-c", code, env_id, str(envs), str(seconds), str(100 + k)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,  # MuJoCo's compiler warnings
                    text=True,
                )
            )
        for w in workers:
            assert w.stdout is not None
            if w.stdout.readline().strip() != "ready":
                raise RuntimeError(f"bare-environment worker {w.pid} failed to start")
        busy0, t0 = _machine_busy(), time.monotonic()
        for w in workers:
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        results = []
        for w in workers:
            out, _ = w.communicate(timeout=seconds + 60)
            results.append(json.loads(out.strip().splitlines()[-1]))
        machine = (_machine_busy() - busy0) / (time.monotonic() - t0)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.wait(5)
    frames = sum(int(r["frames"]) for r in results)
    wall = max(float(r["seconds"]) for r in results)
    cpu = sum(float(r["cpu_s"]) for r in results)
    return {
        "procs": procs,
        "envs_per_proc": envs,
        "seconds": wall,
        "frames": frames,
        "frames_per_s": frames / wall,
        "per_proc_frames_per_s": [r["frames"] / r["seconds"] for r in results],
        "cores_used": cpu / wall,
        "frames_per_cpu_s": frames / cpu,
        "machine_cores_busy": machine,
    }


# --- through dvla ------------------------------------------------------------------------------


def write_topology(
    path: Path, *, samplers: int, learner: Mapping[str, wire.Scalar], name: str = "cheetah"
) -> Path:
    """A one-host topology: coordinator, one ``cheetah_learner``, ``samplers`` samplers."""
    lines = [
        "schema = 1",
        f'name = "{name}"',
        "[control]",
        'endpoint = "ipc://{run_dir}/c.sock"',
        "heartbeat_interval_s = 0.5",
        "heartbeat_timeout_s = 10.0",
        "[[hosts]]",
        'name = "h"',
        'address = "127.0.0.1"',
        f"roles = {{ coordinator = 1, cheetah_learner = 1, cheetah_sampler = {samplers} }}",
        "[roles.cheetah_learner]",
        *(f"{k} = {toml_value(v)}" for k, v in learner.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` and its live descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores, everyone's work)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def watch(
    proc: subprocess.Popen[Any],
    metrics: Callable[[], Path | None],
    timeout: float,
    kinds: tuple[str, ...] = ("train", "update"),
) -> dict[str, Any]:
    """Wait up to ``timeout`` seconds for ``proc`` to end while following its ``metrics.jsonl``
    (``metrics()`` names it once it exists): at the first record of ``kinds`` and at every
    later one the CPU time of ``proc``'s process tree and of the whole machine is read. Returns
    ``timed_out`` (the caller stops the process) and, between the first and the last such
    record (the measured window), ``wall_s``, ``cores_used`` (ours) and ``machine_cores_busy``
    (everyone's, other users' work included) — those three only with two records or more."""
    marks: list[tuple[float, float, float]] = []
    deadline = time.monotonic() + timeout
    offset, partial = 0, ""
    timed_out = False
    while proc.poll() is None:
        if time.monotonic() > deadline:
            timed_out = True
            break
        path = metrics()
        if path is not None and path.exists():
            with open(path, encoding="utf-8") as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
            lines = (partial + chunk).split("\n")
            partial = lines.pop()
            for line in lines:
                with contextlib.suppress(ValueError, AttributeError):
                    if json.loads(line).get("kind") in kinds:
                        marks.append((time.monotonic(), _tree_cpu(proc.pid), _machine_busy()))
        time.sleep(0.1)
    if len(marks) < 2:
        return {"timed_out": timed_out}
    (w0, c0, m0), (w1, c1, m1) = marks[0], marks[-1]
    wall = max(w1 - w0, 1e-9)
    return {
        "timed_out": timed_out,
        "wall_s": wall,
        "cores_used": (c1 - c0) / wall,
        "machine_cores_busy": (m1 - m0) / wall,
    }


def run_job(
    topology: Path, run_dir: Path, timeout: float, grace: float = 10.0
) -> tuple[int | None, str, dict[str, Any]]:
    """Run ``dvla up TOPOLOGY`` in ``run_dir`` until it ends by itself (the learner stops the
    job) or ``timeout`` seconds pass (then it is stopped: SIGTERM, ``grace``, SIGKILL); returns
    its exit status, its output and the CPU figures of the measured window (:func:`watch`)."""
    from dvla_tools.bench._job import TrainingJob

    run_dir.mkdir(parents=True, exist_ok=True)
    job = TrainingJob(run_dir, topology, grace=grace)
    with job:  # leaving stops what is still running
        assert job.proc is not None
        cpu = watch(job.proc, lambda: run_dir / "metrics.jsonl", timeout)
    return job.proc.returncode, job.output(), cpu


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def job_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Frames/s and updates/s between the first and the last update record."""
    ups = [r for r in records if r.get("kind") == "update"]
    if len(ups) < 2:
        raise RuntimeError(f"the cheetah job made {len(ups)} update(s); need at least 2")
    first, last = ups[0], ups[-1]
    window = last["t"] - first["t"]
    returns = [(r["t"], r["return"]) for r in ups if "return" in r]
    head = [v for _, v in returns[: max(1, len(returns) // 10)]]
    tail = [v for _, v in returns[-max(1, len(returns) // 10) :]]
    return {
        "window_s": window,
        "updates": len(ups),
        "frames": last["frames"] - first["frames"],
        "frames_per_s": (last["frames"] - first["frames"]) / window,
        "frames_received_per_s": (last["frames_received"] - first["frames_received"]) / window,
        "updates_per_s": (len(ups) - 1) / window,
        "stale_blocks": last["stale_blocks"],
        "update_seconds_mean": float(np.mean([r["update_seconds"] for r in ups])),
        "version": last["version"],
        "return_first_decile": float(np.mean(head)) if returns else None,
        "return_last_decile": float(np.mean(tail)) if returns else None,
        "returns": returns,
    }


def cheetah_case(
    root: Path,
    *,
    seconds: float = 60.0,
    samplers: int = 2,
    envs: int = 8,
    ceiling_seconds: float = 10.0,
    settings: dict[str, wire.Scalar] | None = None,
    progress: Any = print,
) -> dict[str, Any]:
    """The whole comparison (ceilings first, then the job); returns its JSON record."""
    progress(f"bare HalfCheetah: 2 processes x SyncVectorEnv({envs}), {ceiling_seconds:.0f} s")
    before = ceiling(ENV_ID, envs, 2, ceiling_seconds)
    progress(f"  {before['frames_per_s']:,.0f} frames/s; 1 process ...")
    bare1 = ceiling(ENV_ID, envs, 1, ceiling_seconds / 2)
    progress(f"  {bare1['frames_per_s']:,.0f} frames/s")
    learner: dict[str, wire.Scalar] = {
        "env_id": ENV_ID,
        "envs": envs,
        "seconds": seconds,
        "watchdog_s": 60.0,
        **(settings or {}),
    }
    run_dir = root / "cheetah"
    topology = write_topology(root / "cheetah.toml", samplers=samplers, learner=learner)
    progress(f"dvla job: learner + {samplers} samplers x {envs} envs, PPO on, {seconds:.0f} s ...")
    code, output, cpu = run_job(topology, run_dir, timeout=seconds + 120)
    records = read_records(run_dir)
    try:
        job = job_summary(records)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{exc}; dvla up exited {code}; output tail:\n{output[-3000:]}"
        ) from None
    progress(f"bare HalfCheetah again (the machine is shared): {ceiling_seconds:.0f} s")
    after = ceiling(ENV_ID, envs, 2, ceiling_seconds)
    # The ceiling is the higher of the two: a busy moment never flatters the ratio.
    top = max(before["frames_per_s"], after["frames_per_s"])
    ratio = job["frames_per_s"] / top
    # Per CPU-second, which other users' load does not move: what dvla's processes get out of
    # each second of CPU they use, against the bare loop's (the same ratio as the wall-clock one
    # on an idle machine where both use every core).
    bare_per_cpu = max(before["frames_per_cpu_s"], after["frames_per_cpu_s"])
    cores = cpu.get("cores_used", 0.0)
    per_cpu = job["frames_per_s"] / cores if cores > 0 else None
    lanes_path = run_dir / "lanes.json"
    progress(
        f"  {after['frames_per_s']:,.0f} frames/s; dvla {job['frames_per_s']:,.0f} frames/s "
        f"trained, {job['updates_per_s']:.2f} updates/s, return {job['return_first_decile']} -> "
        f"{job['return_last_decile']}; / ceiling {top:,.0f} = {ratio:.2f} (target >= {TARGET}, "
        f"Sample Factory {SAMPLE_FACTORY_RATIO}); per CPU-second "
        + (f"{per_cpu / bare_per_cpu:.2f}" if per_cpu else "n/a")
    )
    return {
        "env_id": ENV_ID,
        "run_dir": str(run_dir),
        "exit_status": code,
        "samplers": samplers,
        "envs_per_sampler": envs,
        "settings": learner,
        "ceiling_2proc_before": before,
        "ceiling_2proc_after": after,
        "ceiling_frames_per_s": top,
        "ceiling_1proc": bare1,
        "job": job,
        "job_cpu": cpu,
        "frames_per_cpu_s": per_cpu,
        "bare_frames_per_cpu_s": bare_per_cpu,
        "ratio_per_cpu_s": per_cpu / bare_per_cpu if per_cpu else None,
        "lanes": json.loads(lanes_path.read_text()) if lanes_path.exists() else None,
        "ratio_to_ceiling": ratio,
        "target": TARGET,
        "sample_factory_ratio": SAMPLE_FACTORY_RATIO,
    }
