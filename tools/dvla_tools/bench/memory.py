"""``dvla bench memory``: node memory while the learner is slowed down — bounded, drops counted.

Starts a real training job (``dvla up`` on a generated one-host topology: coordinator, learner,
``--samplers`` samplers, the small training configuration of ``dvla bench chaos``) and, once it
trains, measures two phases in the same run:

* **baseline** (``--baseline-s``, default 30 s): the learner at full speed;
* **slowed** (``--minutes``, default 5): the learner is slowed artificially by a SIGSTOP /
  SIGCONT duty cycle on its process (stopped ``--stop-s`` of every ``--stop-s + --run-s``
  seconds; default 2.0 of 2.5 s, i.e. 20 % of its speed). The samplers keep producing at full
  speed, so without bounds their output would pile up somewhere.

Why a duty cycle and not a sleep in the learner's gradient lane: it needs no code in the
learner, and it is the harsher case — while stopped, the learner's inbox reads nothing and
returns no credit (a sleep would still let its event loop accept messages up to the credit
window). The stop stays below the heartbeat timeout (5 s here), so the hub never declares the
learner dead.

The RSS of every node process (and of each node's environment workers, and the supervisor) is
sampled every ``--interval`` seconds with psutil. The *initial* RSS is the median over the
first ``--settle-s`` seconds of the slowed phase (warm-up: allocator pools and first-use
buffers; a median, because a learner's RSS swings a few per cent with every update); the
report gives, per process, initial, maximum and final RSS over the rest of the slowed phase,
the growth (max against initial) against the +10 % target and the drift (final against
initial), plus the flow-control and drop counters from the hub's status (credit waits, groups
in flight, stale groups dropped by the learner, inbox drops) in each phase, and the learner's
update rate in both phases.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import psutil

from dvla_bus import wire
from dvla_tools.bench._common import machine_info, write_json
from dvla_tools.bench._job import (
    FAST_TRAINING,
    HubObserver,
    TrainingJob,
    hub_observer,
    write_training_topology,
)

TARGET_GROWTH: Final = 0.10
HEARTBEAT_TIMEOUT_S: Final = 5.0
MAX_IPC_PATH: Final = 100
_COUNTERS: Final = (
    "tx.credit_waits",
    "tx.in_flight",
    "tx.queued",
    "groups_sent",
    "rx.held",
    "rx.pending",
    "admitted_groups",
    "stale_groups",
    "future_groups",
    "iterations",
)


def register(sub: Any, name: str, help_text: str) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=__doc__)
    parser.add_argument("--minutes", type=float, default=5.0, help="length of the slowed phase")
    parser.add_argument(
        "--baseline-s", type=float, default=30.0, help="seconds at full speed first"
    )
    parser.add_argument(
        "--settle-s",
        type=float,
        default=30.0,
        help="seconds into the slowed phase before the initial RSS is taken",
    )
    parser.add_argument("--stop-s", type=float, default=2.0, help="learner stopped per cycle, s")
    parser.add_argument("--run-s", type=float, default=0.5, help="learner running per cycle, s")
    parser.add_argument("--samplers", type=int, default=3, help="sampler nodes (>= 1)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument(
        "--warmup-timeout", type=float, default=300.0, help="seconds allowed for the job to start"
    )
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where the run goes")
    parser.add_argument("--json", help="write results to this file")
    parser.set_defaults(func=_main)


def rss_by_process(job: TrainingJob) -> dict[str, int]:
    """RSS in bytes of every node process, each node's children (``<node>/worker<i>``, its
    environment workers) and the supervisor (``supervisor``)."""
    out: dict[str, int] = {}
    if job.proc is not None:
        with contextlib.suppress(psutil.Error):
            out["supervisor"] = psutil.Process(job.proc.pid).memory_info().rss
    for node, proc in job.nodes().items():
        with contextlib.suppress(psutil.Error):
            out[node] = proc.memory_info().rss
            for i, kid in enumerate(sorted(proc.children(recursive=True), key=lambda p: p.pid)):
                with contextlib.suppress(psutil.Error):
                    out[f"{node}/worker{i}"] = kid.memory_info().rss
    return out


def counters(status: wire.Status | None) -> dict[str, dict[str, int]]:
    """The flow-control and drop counters of every node (``*.dropped.*`` included)."""
    out: dict[str, dict[str, int]] = {}
    for m in status.members if status is not None else ():
        out[m.node] = {
            k: v for k, v in sorted(m.counters.items()) if k in _COUNTERS or ".dropped." in k
        }
    return out


def learner_pid(job: TrainingJob) -> int | None:
    proc = job.nodes().get("learner.h.0")
    return proc.pid if proc is not None else None


async def duty_cycle(job: TrainingJob, stop_s: float, run_s: float, log: list[str]) -> None:
    """SIGSTOP the learner for ``stop_s``, SIGCONT it for ``run_s``, until cancelled; always
    leaves it running. Follows a restarted learner (a new pid)."""
    stopped: int | None = None
    try:
        while True:
            pid = learner_pid(job)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                    stopped = pid
            await asyncio.sleep(stop_s)
            if stopped is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stopped, signal.SIGCONT)
                stopped = None
            await asyncio.sleep(run_s)
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
            log.append(f"learner pid {stopped} continued")


@contextlib.asynccontextmanager
async def slowed_learner(job: TrainingJob, stop_s: float, run_s: float) -> AsyncIterator[list[str]]:
    """Run :func:`duty_cycle` for the duration of the block."""
    log: list[str] = []
    task = asyncio.create_task(duty_cycle(job, stop_s, run_s, log))
    try:
        yield log
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _learner_version(status: wire.Status | None) -> int | None:
    for m in status.members if status is not None else ():
        if m.role == "learner" and m.state != "dead":
            return m.weight_version
    return None


async def _sample_for(
    job: TrainingJob, hub: HubObserver, seconds: float, interval: float, phase: str
) -> list[dict[str, Any]]:
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tick = time.monotonic()
        status = await hub.status(timeout=min(2.0, interval))
        samples.append(
            {
                "t": time.time(),
                "phase": phase,
                "rss": rss_by_process(job),
                "learner_version": _learner_version(status),
            }
        )
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - tick)))
    return samples


def _rate(samples: list[dict[str, Any]]) -> float | None:
    """Learner versions per second over ``samples``."""
    vs = [(s["t"], s["learner_version"]) for s in samples if s["learner_version"] is not None]
    if len(vs) < 2 or vs[-1][0] <= vs[0][0]:
        return None
    return round(float(vs[-1][1] - vs[0][1]) / float(vs[-1][0] - vs[0][0]), 3)


def growth(
    reference: list[dict[str, Any]], measured: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per process: *initial* RSS (the median over ``reference``: a torch process's RSS swings
    a few per cent with every update, so one sample is no baseline), the maximum over
    ``measured``, the *final* level (median of its last quarter), ``growth`` = max / initial - 1
    (the +10 % target) and ``drift`` = final / initial - 1 (a trend, i.e. a leak, shows here)."""
    out: dict[str, dict[str, Any]] = {}
    if not reference or not measured:
        return out
    for name in sorted(reference[-1]["rss"]):
        ref = [s["rss"][name] for s in reference if name in s["rss"]]
        values = [s["rss"][name] for s in measured if name in s["rss"]]
        if not ref or not values:
            continue
        initial = statistics.median(ref)
        peak = max(values)
        final = statistics.median(values[-max(1, len(values) // 4) :])
        g = (peak - initial) / initial if initial else 0.0
        out[name] = {
            "initial_mib": round(initial / 2**20, 1),
            "max_mib": round(peak / 2**20, 1),
            "final_mib": round(final / 2**20, 1),
            "growth": round(g, 4),
            "drift": round((final - initial) / initial if initial else 0.0, 4),
            # peak against the settle window's peak: growth of the working set's high-water
            # mark, insensitive to where the per-update swing of a sample lands
            "peak_growth": round(peak / max(ref) - 1.0, 4),
            "within_target": g <= TARGET_GROWTH,
        }
    return out


def _delta(a: dict[str, dict[str, int]], b: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Counters at the end of a phase, with how much each cumulative one grew in it."""
    out: dict[str, Any] = {}
    gauges = {"tx.in_flight", "tx.queued", "rx.held", "rx.pending"}
    for node, now in b.items():
        before = a.get(node, {})
        out[node] = {
            k: (v if k in gauges else {"end": v, "in_phase": v - before.get(k, 0)})
            for k, v in now.items()
        }
    return out


async def measure(job: TrainingJob, args: argparse.Namespace) -> dict[str, Any]:
    async with hub_observer(job.endpoint) as hub:
        t_start = time.monotonic()

        def warm(st: wire.Status) -> bool:
            rows = [m for m in st.members if m.state != "dead"]
            learner = [m for m in rows if m.role == "learner" and m.weight_version >= 2]
            samplers = [m for m in rows if m.role == "sampler" and m.weight_version >= 1]
            return bool(learner) and len(samplers) == args.samplers

        await hub.wait(warm, args.warmup_timeout, "the learner's first versions")
        warmup_s = time.monotonic() - t_start
        print(f"training after {warmup_s:.1f}s; baseline {args.baseline_s:g}s", flush=True)
        c0 = counters(await hub.status(timeout=2.0))
        base = await _sample_for(job, hub, args.baseline_s, args.interval, "baseline")
        c1 = counters(await hub.status(timeout=2.0))
        pids0 = {n: p.pid for n, p in job.nodes().items()}
        print(
            f"slowing the learner (stopped {args.stop_s:g}s of every "
            f"{args.stop_s + args.run_s:g}s) for {args.minutes:g} min",
            flush=True,
        )
        async with slowed_learner(job, args.stop_s, args.run_s) as log:
            settle = await _sample_for(job, hub, args.settle_s, args.interval, "settle")
            slowed = await _sample_for(job, hub, args.minutes * 60, args.interval, "slowed")
        c2 = counters(await hub.status(timeout=2.0))
        pids1 = {n: p.pid for n, p in job.nodes().items()}
    return {
        "warmup_s": round(warmup_s, 1),
        "learner_versions_per_s": {"baseline": _rate(base), "slowed": _rate(settle + slowed)},
        "rss": growth(settle, slowed),
        "counters_baseline": _delta(c0, c1),
        "counters_slowed": _delta(c1, c2),
        "restarted": sorted(n for n, p in pids0.items() if pids1.get(n) != p),
        "duty_cycle_log": log,
        "samples": [*base, *settle, *slowed],
    }


def _print(doc: dict[str, Any]) -> None:
    print(
        "\n| process | initial MiB | max MiB | growth | peak vs settle peak | final MiB | drift "
        "| within +10 % |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in doc["rss"].items():
        print(
            f"| {name} | {r['initial_mib']} | {r['max_mib']} | {r['growth']:+.1%} | "
            f"{r['peak_growth']:+.1%} | {r['final_mib']} | {r['drift']:+.1%} | "
            f"{'yes' if r['within_target'] else 'NO'} |"
        )
    rate = doc["learner_versions_per_s"]
    print(f"learner versions/s: baseline {rate['baseline']}, slowed {rate['slowed']}")
    print("counters in the slowed phase (cumulative ones: growth in the phase):")
    for node, cs in doc["counters_slowed"].items():
        shown = {k: (v["in_phase"] if isinstance(v, dict) else v) for k, v in cs.items()}
        print(f"  {node}: {shown}")
    if doc["restarted"]:
        print(f"restarted during the run: {doc['restarted']}")


def _main(args: argparse.Namespace) -> int:
    if args.samplers < 1 or args.minutes <= 0 or args.stop_s < 0 or args.run_s <= 0:
        print("dvla bench memory: need --samplers >= 1, --minutes > 0, --run-s > 0")
        return 2
    if args.stop_s >= HEARTBEAT_TIMEOUT_S * 0.8:
        print(f"dvla bench memory: --stop-s must stay below {HEARTBEAT_TIMEOUT_S * 0.8:g}s")
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = (args.runs_dir / f"{stamp}-memory").resolve()
    longest = len(f"ipc://{run_dir}/data-sampler.h.{args.samplers - 1}.sock")
    if longest > MAX_IPC_PATH:
        print(f"dvla bench memory: {run_dir} is too deep for ipc:// paths; use --runs-dir")
        return 2
    (run_dir / "logs").mkdir(parents=True)
    total_min = args.warmup_timeout / 60 + args.baseline_s / 60 + args.settle_s / 60
    learner = {**FAST_TRAINING, "minutes": round(total_min + args.minutes + 10, 1)}
    topology = write_training_topology(
        run_dir,
        samplers=args.samplers,
        learner=learner,
        heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
    )
    print(f"run directory {run_dir}", flush=True)
    with TrainingJob(run_dir, topology) as job:
        result = asyncio.run(measure(job, args))
        job.stop()
    doc = {
        "benchmark": "memory",
        "machine": machine_info(),
        "command": " ".join(["dvla", "bench", "memory", *sys.argv[3:]]),
        "config": {
            "minutes": args.minutes,
            "baseline_s": args.baseline_s,
            "settle_s": args.settle_s,
            "stop_s": args.stop_s,
            "run_s": args.run_s,
            "samplers": args.samplers,
            "training": learner,
            "target_growth": TARGET_GROWTH,
        },
        "run_dir": str(run_dir),
        **result,
        "shm_left_after_stop": job.shm_segments(),
    }
    _print(doc)
    write_json(args.json, doc)
    nodes = {k: v for k, v in doc["rss"].items() if k != "supervisor"}
    ok = bool(nodes) and all(r["within_target"] for r in nodes.values()) and not doc["restarted"]
    return 0 if ok else 1
