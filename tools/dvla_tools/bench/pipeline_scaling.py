"""Sampler scaling against one inference node: env steps/s with 1, 4, 16, 64 samplers vs linear.

What runs: ONE real ``inference`` node (its own process under ``dvla up``, with a control hub)
serving a real policy from a real shared-memory weight pool that this process publishes, over
the real data bus; and N *stand-in samplers*. A stand-in sampler is what a sampler looks like
to the inference node — its own :class:`~dvla_nodes.inference.RemotePolicy` (own outbox, own
connection, same-host shared-memory requests) sending ``envs`` observations, awaiting the
actions, then "stepping" its environments by sleeping ``step_latency_s`` (a heavy simulator
on another host: latency without CPU cost on this one). To fit 64 samplers on a 2-core machine,
the stand-ins are asyncio tasks in this one process, not 64 processes; every row says so.

Per sampler count, after a warm-up: env steps/s (``envs`` per reply), the linear reference
(N x the 1-sampler rate measured in the same run, before and after the other rows: their mean,
and their ratio as the drift of the machine's load) and the ideal (N x envs / step latency),
efficiency (measured / linear), observations per forward pass, request round-trip p50/p99, and
who is busy — the inference process's CPU (cores), its forward-pass busy fraction (from the
replies), the stand-ins' process CPU and the whole machine's CPU (other users included). The
first sampler count whose efficiency falls below the target (0.9) is reported as the
saturation point, with the resource that was exhausted there.

Used by ``dvla bench pipeline`` (:func:`run_scaling`); runnable alone:
``python -m dvla_tools.bench.pipeline_scaling [--samplers 1,4,16,64] [--latency-ms 50]
[--seconds 5] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import psutil

from dvla_bus.sockets import open_context
from dvla_bus.weights import Manifest, create_weight_pool
from dvla_tools.bench._common import machine_info, write_json
from dvla_tools.bench._job import HOST, TrainingJob, hub_observer, member, run_id, toml_value

__all__ = ["format_table", "main", "run_scaling"]

NODE: Final = f"inference.{HOST}.0"
STANDIN_NOTE: Final = (
    "stand-in samplers are asyncio tasks in one process (the benchmark's), each with its own "
    "RemotePolicy: own outbox, own connection to the inference node, same-host shared-memory "
    "requests; their environment step is a sleep (latency without CPU cost)"
)


@dataclass(slots=True)
class _Window:
    """What the stand-ins saw while measuring."""

    replies: int = 0
    rtts: list[float] = field(default_factory=list)
    batches: dict[int, tuple[int, int]] = field(default_factory=dict)  # batch -> (size, infer_us)
    versions: set[int] = field(default_factory=set)


def _topology(run_dir: Path, learner: dict[str, Any], inference: dict[str, Any]) -> Path:
    lines = [
        "schema = 1",
        'name = "scaling"',
        "[control]",
        'endpoint = "ipc://{run_dir}/c.sock"',
        "heartbeat_interval_s = 0.5",
        "heartbeat_timeout_s = 10.0",
        "[[hosts]]",
        f'name = "{HOST}"',
        "roles = { coordinator = 1, inference = 1, learner = 0 }",
        "[roles.learner]",
        *(f"{k} = {toml_value(v)}" for k, v in learner.items()),
        "[roles.inference]",
        *(f"{k} = {toml_value(v)}" for k, v in inference.items()),
    ]
    path = run_dir / "topology.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    with contextlib.suppress(psutil.Error):
        t = proc.cpu_times()
        return float(t.user + t.system)
    return 0.0


async def _measure(
    endpoint: str,
    rid: str,
    n: int,
    *,
    envs: int,
    image_size: int,
    step_latency_s: float,
    seconds: float,
    warmup_s: float,
    deadline_s: float,
    inference_proc: psutil.Process | None,
    label: str,
) -> dict[str, Any]:
    from dvla_nodes.envs.tasks import TASKS
    from dvla_nodes.inference import RemotePolicy, open_remote_policy, request_bytes

    specs = list(TASKS.values())
    instructions = [specs[i % len(specs)].instructions[0] for i in range(envs)]
    rng = np.random.default_rng(n)
    win = _Window()
    measuring = False
    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        ctx = await stack.enter_async_context(open_context())
        policies: list[RemotePolicy] = []
        for i in range(n):
            policies.append(
                await stack.enter_async_context(
                    open_remote_policy(
                        ctx,
                        name=f"standin-{label}-{i}",
                        host=HOST,
                        run=rid,
                        deadline_s=deadline_s,
                        slab_size=request_bytes(envs, image_size),
                        slabs=2,
                        endpoints=[endpoint],
                    )
                )
            )
        for p in policies:
            await p.wait_ready(30.0)

        async def standin(policy: RemotePolicy) -> None:
            images = rng.integers(0, 255, (envs, image_size, image_size, 3), dtype=np.uint8)
            proprio = rng.normal(size=(envs, 7)).astype(np.float32)
            # Start out of phase, as independent simulators would.
            await asyncio.sleep(float(rng.uniform(0, step_latency_s)))
            while not stop.is_set():
                t0 = time.perf_counter()
                act = await policy.act_async(images, proprio, instructions)
                if measuring:
                    win.replies += 1
                    win.rtts.append(time.perf_counter() - t0)
                    win.batches[act.batch] = (act.batch_size, act.infer_us)
                    win.versions.add(act.version)
                await asyncio.sleep(step_latency_s)  # the environment steps

        tasks = [asyncio.create_task(standin(p)) for p in policies]
        try:
            await asyncio.sleep(warmup_s)
            me = psutil.Process()
            psutil.cpu_percent(None)
            cpu0, inf0 = _cpu(me), _cpu(inference_proc)
            t0 = time.perf_counter()
            measuring = True
            await asyncio.sleep(seconds)
            measuring = False
            wall = time.perf_counter() - t0
            cpu1, inf1 = _cpu(me), _cpu(inference_proc)
            machine = psutil.cpu_percent(None) / 100.0
        finally:
            stop.set()
            await asyncio.wait(tasks, timeout=deadline_s + step_latency_s + 5)
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        errors = [r for r in failures if not isinstance(r, asyncio.CancelledError)]
        if errors:
            raise errors[0]
    rtts = np.array(win.rtts) if win.rtts else np.zeros(1)
    batches = list(win.batches.values())
    obs = sum(s for s, _ in batches)
    return {
        "samplers": n,
        "env_steps_per_s": win.replies * envs / wall,
        "ideal_steps_per_s": n * envs / step_latency_s,
        "mean_batch": obs / len(batches) if batches else 0.0,
        "batches_per_s": len(batches) / wall,
        "rtt_ms_p50": float(np.percentile(rtts, 50) * 1e3),
        "rtt_ms_p99": float(np.percentile(rtts, 99) * 1e3),
        "inference_forward_busy": sum(us for _, us in batches) / 1e6 / wall,
        "inference_cpu": (inf1 - inf0) / wall,
        "standin_cpu": (cpu1 - cpu0) / wall,
        "machine_cpu": machine,
        "versions": sorted(win.versions),
    }


def run_scaling(
    samplers: Sequence[int] = (1, 4, 16, 64),
    step_latency_s: float = 0.05,
    seconds: float = 5.0,
    *,
    warmup_s: float = 1.5,
    envs: int = 1,
    policy_size: str = "tiny",
    image_size: int = 64,
    max_batch: int = 32,
    gather_ms: float = 0.0,
    threads: int = 1,
    deadline_s: float = 30.0,
    target: float = 0.9,
    log: Any = None,
) -> dict[str, Any]:
    """Run the benchmark (module docstring); returns the JSON document. ``samplers`` should
    start with 1: the linear reference is N x the first row's rate per sampler. ``log`` (a
    callable taking a string) reports progress."""
    import torch

    from dvla_nodes.pipeline import train_config
    from dvla_nodes.policy import build_policy, flatten

    say = log if log is not None else (lambda _msg: None)
    counts = [int(n) for n in samplers]
    if not counts or min(counts) < 1:
        raise ValueError(f"samplers {samplers!r}: need counts >= 1")
    learner: dict[str, Any] = {"policy_size": policy_size, "image_size": image_size, "seed": 0}
    inference = {"max_batch": max_batch, "gather_ms": gather_ms, "threads": threads}
    cfg = train_config(learner)
    torch.set_num_threads(1)
    model, _ = build_policy(
        cfg.policy_size, cfg.image_size, cfg.bins, cfg.seed, stem=cfg.policy_stem
    )
    _, flat = flatten(model)
    run_dir = Path(tempfile.mkdtemp(prefix="dvla-scale-", dir="/tmp"))
    rid = run_id(run_dir)
    rows: list[dict[str, Any]] = []
    again: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    try:
        topo = _topology(run_dir, learner, inference)
        with (
            create_weight_pool(rid, "bench", Manifest.from_arrays({"flat": flat})) as pool,
            TrainingJob(run_dir, topo) as job,
        ):
            pool.publish(1, {"flat": flat})

            async def go() -> None:
                async with hub_observer(job.endpoint) as hub:
                    st = await hub.wait(
                        lambda s: (m := member(s, NODE)) is not None and m.state == "running",
                        timeout=90,
                        what=f"{NODE} to join",
                    )
                    info = member(st, NODE)
                    assert info is not None
                    proc = psutil.Process(info.pid)
                    # The first count again at the end: the linear reference is the mean of
                    # both, and their ratio shows how much the machine's load drifted.
                    for k, n in enumerate([*counts, counts[0]]):
                        say(f"  {n} stand-in sampler(s) ...")
                        row = await _measure(
                            info.endpoints["data"],
                            rid,
                            n,
                            envs=envs,
                            image_size=image_size,
                            step_latency_s=step_latency_s,
                            seconds=seconds,
                            warmup_s=warmup_s,
                            deadline_s=deadline_s,
                            inference_proc=proc,
                            # Outbox names unique for the process's life: a name reused
                            # after close would map the old, unlinked slabs on the inbox.
                            label=f"{k}x{n}",
                        )
                        (rows if k < len(counts) else again).append(row)
                        say(
                            f"    {row['env_steps_per_s']:.0f} env steps/s, batch "
                            f"{row['mean_batch']:.1f}, inference cpu {row['inference_cpu']:.2f}"
                        )

            asyncio.run(go())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    base = (rows[0]["env_steps_per_s"] + again[0]["env_steps_per_s"]) / 2
    per_sampler = base / rows[0]["samplers"]
    for row in rows:
        row["linear_steps_per_s"] = per_sampler * row["samplers"]
        row["efficiency"] = row["env_steps_per_s"] / row["linear_steps_per_s"]
        row["meets_target"] = row["efficiency"] >= target
        row["bound"] = _bound(row)
    saturated = [r for r in rows if r["bound"] == "inference"]
    heaviest = max(rows, key=lambda r: r["inference_cpu"])
    return {
        "bench": "pipeline_scaling",
        "machine": machine_info(),
        "note": STANDIN_NOTE,
        "config": {
            "samplers": counts,
            "step_latency_s": step_latency_s,
            "seconds": seconds,
            "warmup_s": warmup_s,
            "envs_per_sampler": envs,
            "policy_size": policy_size,
            "image_size": image_size,
            "max_batch": max_batch,
            "gather_ms": gather_ms,
            "inference_threads": threads,
            "target": target,
        },
        "rows": rows,
        "baseline_again": again[0],
        "baseline_drift": again[0]["env_steps_per_s"] / rows[0]["env_steps_per_s"],
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        # The first sampler count where the inference node used its whole core (None: never).
        "saturates_at": saturated[0]["samplers"] if saturated else None,
        # Where the target was missed, and what ran out there.
        "below_target": [
            {"samplers": r["samplers"], "efficiency": r["efficiency"], "bound": r["bound"]}
            for r in rows
            if not r["meets_target"]
        ],
        "max_env_steps_per_s": max(r["env_steps_per_s"] for r in rows),
        # Observations/s one inference core would serve at the heaviest row's batch size
        # (its rate divided by the CPU it used): an estimate of the saturation throughput.
        "inference_capacity_est_obs_per_s": (
            heaviest["env_steps_per_s"] / heaviest["inference_cpu"]
            if heaviest["inference_cpu"] > 0
            else None
        ),
    }


BOUNDS: Final = {
    "inference": "the inference node (a whole core busy)",
    "stand-ins": "the stand-in samplers' process (a whole core busy)",
    "machine": "the machine (every core busy, other work included)",
    "latency": "nothing saturated: the round trip grew (queueing, batching)",
    "none": "",
}


def _bound(row: dict[str, Any]) -> str:
    """Which resource limited a row (a key of :data:`BOUNDS`)."""
    if row["inference_cpu"] >= 0.85 or row["inference_forward_busy"] >= 0.85:
        return "inference"
    if row["standin_cpu"] >= 0.85:
        return "stand-ins"
    if row["machine_cpu"] >= 0.9:
        return "machine"
    return "none" if row["meets_target"] else "latency"


def format_table(result: dict[str, Any]) -> str:
    """The result as a text table (for the CLI and BENCHMARKS.md)."""
    c = result["config"]
    lines = [
        f"sampler scaling: 1 inference node ({c['policy_size']} policy, {c['image_size']} px, "
        f"max_batch {c['max_batch']}, gather {c['gather_ms']} ms), env step "
        f"{c['step_latency_s'] * 1e3:.0f} ms, {c['envs_per_sampler']} env(s) per sampler, "
        f"{c['seconds']:.0f} s per row",
        f"note: {result['note']}",
        "",
        f"{'samplers':>8} {'steps/s':>9} {'linear':>9} {'eff':>5} {'ideal':>8} {'batch':>6} "
        f"{'rtt p50':>8} {'p99':>7} {'inf cpu':>7} {'fwd busy':>8} {'stand-in':>8} {'machine':>7}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['samplers']:>8} {r['env_steps_per_s']:>9.1f} {r['linear_steps_per_s']:>9.1f} "
            f"{r['efficiency']:>5.2f} {r['ideal_steps_per_s']:>8.0f} {r['mean_batch']:>6.1f} "
            f"{r['rtt_ms_p50']:>6.1f}ms {r['rtt_ms_p99']:>5.1f}ms {r['inference_cpu']:>7.2f} "
            f"{r['inference_forward_busy']:>8.2f} {r['standin_cpu']:>8.2f} "
            f"{r['machine_cpu']:>7.2f}"
        )
    lines.append(
        f"linear = mean of the {c['samplers'][0]}-sampler rate before and after the rows (drift "
        f"{result['baseline_drift']:.2f}); machine load average "
        f"{result['loadavg_before'][0]:.1f} before, {result['loadavg_after'][0]:.1f} after "
        f"({result['machine']['cores']} cores)"
    )
    sat = result["saturates_at"]
    cap = result["inference_capacity_est_obs_per_s"]
    if sat is None:
        lines.append("inference did not saturate (its process never used a whole core)")
    else:
        lines.append(f"inference saturates at {sat} samplers")
    if cap is not None:
        lines.append(f"inference capacity (estimate, one core): {cap:.0f} observations/s")
    for miss in result["below_target"]:
        lines.append(
            f"below {c['target']} x linear at {miss['samplers']} samplers "
            f"({miss['efficiency']:.2f}): {BOUNDS[miss['bound']]}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dvla_tools.bench.pipeline_scaling", description=__doc__
    )
    parser.add_argument("--samplers", default="1,4,16,64", help="comma-separated counts")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="env step latency")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per count")
    parser.add_argument("--envs", type=int, default=1, help="environments per sampler")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--gather-ms", type=float, default=0.0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--policy-size", default="tiny")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    result = run_scaling(
        tuple(int(s) for s in args.samplers.split(",") if s.strip()),
        args.latency_ms / 1e3,
        args.seconds,
        envs=args.envs,
        max_batch=args.max_batch,
        gather_ms=args.gather_ms,
        image_size=args.image_size,
        policy_size=args.policy_size,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    result["command"] = " ".join(["python -m dvla_tools.bench.pipeline_scaling", *sys.argv[1:]])
    print(format_table(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
