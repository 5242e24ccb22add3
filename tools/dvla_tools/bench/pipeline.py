"""``dvla bench pipeline``: the training pipeline with its lanes serialized against the async
swimlanes, on the same GRPO work; and the same bus machinery on HalfCheetah against the bare
environment ceiling (the comparison with established frameworks), in one run.

**Serialized vs async** (embedded suite, one :class:`~dvla_nodes.learn.TrainConfig` for both:
:data:`BENCH_CONFIG` plus ``--set``, ``--minutes`` each; no evaluations during training):

* *serialized* — ``dvla train --serial`` (:class:`~dvla_nodes.learn.SerialTrainer`): each
  iteration samples its groups (environment workers stepping while the policy infers), then
  makes the GRPO update, then the next iteration acts with the new weights; nothing overlaps
  the update.
* *async* — a real ``dvla up`` job: coordinator, learner and ``--samplers`` sampler processes
  (:mod:`dvla_nodes.pipeline`): samplers keep sampling while the learner updates and publishes
  versions through the weight pool (staleness bound ``max_version_lag``).

Both write ``metrics.jsonl`` with one ``train`` record per update (time ``t``, cumulative
trained ``env_steps``). Time is counted the same way in both: from the first update's record
to the last one's, so the warm start (demonstrations, cloning, first evaluation) and the final
evaluation are outside the window. Env steps/s are the steps of the episodes trained on in that
window (groups the async learner dropped as stale do not count); updates/s likewise. Lanes:
for the async job, from its ``trace.json`` clipped to the same window (from the end of the first
update to the end of the last): per-lane busy fraction (summed over processes), the share of
the window in which two or more processes were busy at once (``overlap``), and the share of the
learner's gradient time during which some sampler was sampling. For the serialized run, from
its per-iteration ``rollout_seconds`` / ``update_seconds``; its overlap is 0 by construction.
``--rounds N`` alternates the two modes (ABBA order), since the machine may be shared.
Target on 2 cores: async >= 1.5 x serialized env steps/s.

**HalfCheetah** (:mod:`dvla_tools.bench.cheetah`, skipped with ``--no-cheetah``): frames/s
through a ``dvla up`` job of PPO samplers and a learner ÷ 2 bare processes stepping the same
vectorised environments. Target ≥ 0.5; Sample Factory 2.1.1 reached 0.17 here (MEASURED.md).

**Sampler scaling** (``--scaling``): :func:`dvla_tools.bench.pipeline_scaling.run_scaling`.

Writes ``--json PATH``: machine, load averages around every run, the configuration, every run's
window figures and lanes, the ratios and their targets; run directories stay under
``--runs-dir`` (trace.json, lanes.json, metrics.jsonl, logs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

from dvla_bus import wire
from dvla_bus.errors import ConfigError
from dvla_tools.bench._common import machine_info, write_json
from dvla_tools.bench._job import toml_value
from dvla_tools.bench.cheetah import run_job, watch

__all__ = [
    "BENCH_CONFIG",
    "TARGET",
    "async_run",
    "lane_stats",
    "markdown",
    "register",
    "serial_lane_stats",
    "serialized_run",
    "window_rates",
]

TARGET: Final = 1.5
#: The GRPO work both modes do: a short warm start (outside the measured window), then GRPO
#: with the suite's default groups, no evaluations or checkpoints while training. One torch
#: thread: on two cores shared with other work, two threads made the serial trainer's updates
#: 10-20x slower (7-17 s instead of 0.3-1.5 s per update, measured side by side), which would
#: flatter the async pipeline; with one thread the serialized baseline is at its strongest.
BENCH_CONFIG: Final[dict[str, wire.Scalar]] = {
    "torch_threads": 1,
    "demos_per_task": 4,
    "bc_epochs": 2,
    "group_size": 8,
    "groups_per_iter": 2,
    "eval_every": 0,
    "eval_seeds": 1,
    "final_eval_seeds": 1,
    "checkpoint_every": 0,
    # As topologies/local.toml ships it (the main job): samplers may run two updates ahead.
    # With 1 the learner waits on the sampler a quarter of the time (BENCHMARKS.md).
    "max_version_lag": 2,
}


def register(sub: Any, name: str, help_text: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=__doc__)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--quick", action="store_true", help="a smoke run: short budgets")
    p.add_argument(
        "--minutes", type=float, default=2.0, help="training budget of each embedded-suite run"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="serialized/async pairs (ABBA order); 0 skips them (HalfCheetah and scaling only)",
    )
    p.add_argument("--samplers", type=int, default=1, help="sampler processes in the async job")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig field"
    )
    p.add_argument("--no-cheetah", action="store_true", help="skip the HalfCheetah comparison")
    p.add_argument("--cheetah-seconds", type=float, default=60.0, help="HalfCheetah training time")
    p.add_argument("--cheetah-samplers", type=int, default=2)
    p.add_argument("--cheetah-envs", type=int, default=8, help="environments per process")
    p.add_argument("--scaling", action="store_true", help="also run the sampler-scaling bench")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.set_defaults(func=run)


# --- measuring ---------------------------------------------------------------------------------


def window_rates(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Env steps/s and updates/s between the first and the last ``train`` record."""
    train = [r for r in records if r.get("kind") == "train"]
    if len(train) < 2:
        raise RuntimeError(f"{len(train)} update(s) recorded; the window needs at least 2")
    first, last = train[0], train[-1]
    window = float(last["t"] - first["t"])
    steps = int(last["env_steps"] - first["env_steps"])
    return {
        "window_s": window,
        "window_start_s": float(first["t"]),
        "updates": len(train) - 1,
        "env_steps": steps,
        "env_steps_per_s": steps / window,
        "updates_per_s": (len(train) - 1) / window,
        "version_first": first.get("version"),
        "version_last": last.get("version"),
        "stale_groups": int(last.get("stale_groups", 0)),
        "sampled_success": statistics.fmean(float(r.get("success", 0.0)) for r in train),
    }


def serial_lane_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The serial trainer's lanes in the window: rollouts (sampling with inference inside)
    and updates, from its per-iteration timings; nothing overlaps."""
    train = [r for r in records if r.get("kind") == "train"]
    window = float(train[-1]["t"] - train[0]["t"])
    rollout = sum(float(r.get("rollout_seconds", 0.0)) for r in train[1:])
    update = sum(float(r.get("update_seconds", 0.0)) for r in train[1:])
    return {
        "utilisation": {
            "sampling+inference": rollout / window,
            "gradient": update / window,
            "distribution": 0.0,
        },
        "overlap": 0.0,
        "gradient_during_sampling": 0.0,
        "note": "weights are updated in place (no distribution); lanes run one after another",
    }


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _covered(intervals: list[tuple[float, float]], min_count: int) -> float:
    """Length of the time covered by at least ``min_count`` of ``intervals``."""
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    total, depth, last = 0.0, 0, 0.0
    for t, delta in points:
        if depth >= min_count:
            total += t - last
        depth += delta
        last = t
    return total


def trace_window(doc: dict[str, Any]) -> tuple[float, float] | None:
    """From the end of the first ``gradient`` interval to the end of the last (trace time, µs):
    the span between the first and the last update's record."""
    ends = sorted(
        e["ts"] + e["dur"]
        for e in doc.get("traceEvents", [])
        if e.get("ph") == "X" and e.get("name") == "gradient"
    )
    return (ends[0], ends[-1]) if len(ends) >= 2 else None


def lane_stats(doc: dict[str, Any], start: float, end: float) -> dict[str, Any]:
    """Lane figures of a Chrome trace clipped to ``[start, end]`` (µs): per-lane busy fraction
    (summed over processes, so N samplers can reach N), per-process busy fraction, ``overlap``
    (share of the window in which two or more processes were busy at once; a lane nested in
    another of the same process, as inference in sampling, is not overlap) and
    ``gradient_during_sampling`` (share of gradient time during which some process sampled)."""
    span = max(end - start, 1e-9)
    names = {
        e["pid"]: e.get("args", {}).get("name", str(e["pid"]))
        for e in doc.get("traceEvents", [])
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    lanes: dict[str, list[tuple[float, float]]] = {}
    procs: dict[Any, list[tuple[float, float]]] = {}
    for e in doc.get("traceEvents", []):
        if e.get("ph") != "X":
            continue
        s, t = max(float(e["ts"]), start), min(float(e["ts"] + e["dur"]), end)
        if t <= s:
            continue
        lanes.setdefault(e["name"], []).append((s, t))
        procs.setdefault(e["pid"], []).append((s, t))
    busy_by_process = {pid: _merge(iv) for pid, iv in procs.items()}
    all_busy = [iv for ivs in busy_by_process.values() for iv in ivs]
    sampling = _merge(lanes.get("sampling", []))
    gradient = _merge(lanes.get("gradient", []))
    grad_time = sum(t - s for s, t in gradient)
    grad_with_sampling = _covered(gradient + sampling, 2) if grad_time else 0.0
    return {
        "window_s": span / 1e6,
        "utilisation": {k: sum(t - s for s, t in v) / span for k, v in sorted(lanes.items())},
        "process_busy": {
            names.get(pid, str(pid)): sum(t - s for s, t in iv) / span
            for pid, iv in sorted(busy_by_process.items(), key=lambda kv: str(names.get(kv[0])))
        },
        "overlap": _covered(all_busy, 2) / span,
        "gradient_during_sampling": grad_with_sampling / grad_time if grad_time else 0.0,
    }


def _as_json(config: dict[str, wire.Scalar]) -> dict[str, Any]:
    """Topology-style settings (``tasks`` comma-separated) as TrainConfig JSON (a list)."""
    out: dict[str, Any] = dict(config)
    if isinstance(out.get("tasks"), str):
        out["tasks"] = [t.strip() for t in out["tasks"].split(",") if t.strip()]
    return out


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def serialized_run(root: Path, config: dict[str, wire.Scalar], tag: str) -> dict[str, Any]:
    """``dvla train --serial`` with ``config``; returns its window figures and lanes."""
    root.mkdir(parents=True, exist_ok=True)
    cfg_path = root / f"{tag}.config.json"
    cfg_path.write_text(json.dumps({**_as_json(config), "name": tag, "display": False}))
    load_before = _loadavg()
    t0 = time.monotonic()
    out_path, err_path = root / f"{tag}.out", root / f"{tag}.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dvla_tools",
                "train",
                "--serial",
                "--config",
                str(cfg_path),
                "--runs-dir",
                str(root),
                "--json",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            cpu = watch(
                proc,
                lambda: next(iter(root.glob(f"*-{tag}/metrics.jsonl")), None),
                float(config.get("minutes", 30.0)) * 60 + 300,
            )
        finally:
            if proc.poll() is None:  # timed out (or interrupted): its env workers die with it
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(
            f"dvla train --serial exited {proc.returncode}:\n{err_path.read_text()[-3000:]}"
        )
    text = out_path.read_text()
    summary = json.loads(text[text.index("{") :])
    run_dir = Path(summary["run_dir"])
    from dvla_nodes.learn.metrics import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    return {
        "mode": "serialized",
        "run_dir": str(run_dir),
        "wall_s": time.monotonic() - t0,
        "load_before": load_before,
        "load_after": _loadavg(),
        "cpu": cpu,
        **window_rates(records),
        "lanes": serial_lane_stats(records),
    }


def _topology(path: Path, samplers: int, config: dict[str, wire.Scalar]) -> Path:
    lines = [
        "schema = 1",
        'name = "bench-pipeline"',
        "[control]",
        'endpoint = "ipc://{run_dir}/c.sock"',
        "heartbeat_interval_s = 0.5",
        "heartbeat_timeout_s = 10.0",
        "[[hosts]]",
        'name = "h"',
        'address = "127.0.0.1"',
        f"roles = {{ coordinator = 1, learner = 1, sampler = {samplers} }}",
        "[roles.learner]",
        *(f"{k} = {toml_value(v)}" for k, v in config.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def async_run(
    root: Path, config: dict[str, wire.Scalar], tag: str, samplers: int
) -> dict[str, Any]:
    """A ``dvla up`` job (coordinator, learner, ``samplers`` samplers) with ``config``."""
    from dvla_nodes.learn.metrics import read_metrics

    run_dir = root / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    topology = _topology(root / f"{tag}.toml", samplers, config)
    load_before = _loadavg()
    t0 = time.monotonic()
    code, output, cpu = run_job(
        topology, run_dir, timeout=float(config.get("minutes", 30.0)) * 60 + 300
    )
    metrics = run_dir / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.exists() else []
    try:
        rates = window_rates(records)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; dvla up exited {code}:\n{output[-3000:]}") from None
    trace_path = run_dir / "trace.json"
    lanes: dict[str, Any] | None = None
    if trace_path.exists():
        doc = json.loads(trace_path.read_text())
        window = trace_window(doc)
        if window is not None:
            lanes = lane_stats(doc, *window)
    summary_path = run_dir / "lanes.json"
    return {
        "mode": "async",
        "run_dir": str(run_dir),
        "exit_status": code,
        "samplers": samplers,
        "wall_s": time.monotonic() - t0,
        "load_before": load_before,
        "load_after": _loadavg(),
        "cpu": cpu,
        **rates,
        "lanes": lanes,
        "lanes_whole_run": json.loads(summary_path.read_text()) if summary_path.exists() else None,
    }


# --- the command -------------------------------------------------------------------------------


def bench_config(args: argparse.Namespace) -> dict[str, wire.Scalar]:
    """:data:`BENCH_CONFIG` + ``--minutes`` + ``--set``, checked as a TrainConfig."""
    from dvla_nodes.learn.config import TrainConfig
    from dvla_tools.cmd_train import _parse_sets

    config: dict[str, wire.Scalar] = {**BENCH_CONFIG, "minutes": args.minutes}
    if args.quick:
        config["minutes"] = min(args.minutes, 0.75)
    for key, raw in _parse_sets(args.set).items():
        # tasks=["a","b"]: the topology takes a comma-separated string
        value = ",".join(str(v) for v in raw) if isinstance(raw, list) else raw
        if not isinstance(value, str | int | float | bool):
            raise ConfigError(f"--set {key}: expected a string, number or boolean")
        config[key] = value
    try:
        TrainConfig.from_json(_as_json(config))
    except TypeError as exc:
        raise ConfigError(f"--set: {exc}") from None
    return config


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in runs)


def run(args: argparse.Namespace) -> int:
    if args.rounds < 0:
        raise ConfigError(f"--rounds {args.rounds}: expected 0 or more")
    config = bench_config(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = (args.runs_dir / f"{stamp}-bench-pipeline").resolve()
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "bench": "pipeline",
        "command": "dvla bench pipeline " + " ".join(sys.argv[3:]),
        "machine": machine_info(),
        "root": str(root),
        "config": config,
        "samplers": args.samplers,
        "target": TARGET,
    }
    print(f"run directories under {root}", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {"serialized": [], "async": []}
    for k in range(args.rounds):
        order = ("serialized", "async") if k % 2 == 0 else ("async", "serialized")
        for mode in order:
            print(f"round {k + 1}: {mode} ({config['minutes']} min budget) ...", flush=True)
            tag = f"{mode}-{k + 1}"
            rec = (
                serialized_run(root, config, tag)
                if mode == "serialized"
                else async_run(root, config, tag, args.samplers)
            )
            runs[mode].append(rec)
            if rec.get("exit_status", 0) != 0 or (rec.get("cpu") or {}).get("timed_out"):
                print(
                    f"  warning: the job exited {rec.get('exit_status')} (timed out: "
                    f"{(rec.get('cpu') or {}).get('timed_out')}); its logs: {rec['run_dir']}",
                    flush=True,
                )
            cpu = rec.get("cpu") or {}
            print(
                f"  {rec['env_steps_per_s']:.1f} env steps/s, {rec['updates_per_s']:.3f} "
                f"updates/s over {rec['window_s']:.0f} s ({rec['updates']} updates); cores used "
                f"{cpu.get('cores_used', float('nan')):.2f} of the machine's "
                f"{cpu.get('machine_cores_busy', float('nan')):.2f} busy; "
                f"load {rec['load_before']} -> {rec['load_after']}",
                flush=True,
            )
    if args.rounds == 0:
        result["embedded"] = {"skipped": "--rounds 0"}
    else:
        result["embedded"] = _embedded_summary(runs)
    write_json(str(args.json) if args.json else None, result)  # partial results survive
    if args.no_cheetah:
        result["cheetah"] = {"skipped": "--no-cheetah"}
    else:
        from dvla_tools.bench.cheetah import cheetah_case

        seconds = min(args.cheetah_seconds, 15.0) if args.quick else args.cheetah_seconds
        result["cheetah"] = cheetah_case(
            root,
            seconds=seconds,
            samplers=args.cheetah_samplers,
            envs=args.cheetah_envs,
            ceiling_seconds=4.0 if args.quick else 10.0,
            progress=lambda line: print(line, flush=True),
        )
    if args.scaling:
        from dvla_tools.bench.pipeline_scaling import format_table, run_scaling

        scaling = run_scaling(
            seconds=2.0 if args.quick else 5.0, log=lambda line: print(line, flush=True)
        )
        print(format_table(scaling), flush=True)
        result["scaling"] = scaling
    else:
        result["scaling"] = {"skipped": "pass --scaling"}
    write_json(str(args.json) if args.json else None, result)
    print()
    print(markdown(result))
    return 0


def _embedded_summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians of the rounds of each mode and the async ÷ serialized ratios (printed)."""
    embedded: dict[str, Any] = {"runs": runs}
    for key in ("env_steps_per_s", "updates_per_s"):
        ser, asy = _median(runs["serialized"], key), _median(runs["async"], key)
        embedded[f"serialized_{key}"] = ser
        embedded[f"async_{key}"] = asy
        embedded[f"ratio_{key}"] = asy / ser
    per_cpu = {
        mode: [r["env_steps_per_s"] / r["cpu"]["cores_used"] for r in rs if _cores_used(r) > 0]
        for mode, rs in runs.items()
    }
    if per_cpu["serialized"] and per_cpu["async"]:
        # Not moved by other users' load: the work each mode gets out of a CPU-second.
        embedded["ratio_env_steps_per_cpu_s"] = statistics.median(
            per_cpu["async"]
        ) / statistics.median(per_cpu["serialized"])
    print(
        f"async ÷ serialized: env steps/s {embedded['ratio_env_steps_per_s']:.2f}, updates/s "
        f"{embedded['ratio_updates_per_s']:.2f} (target >= {TARGET})",
        flush=True,
    )
    return embedded


def _cores_used(run: dict[str, Any]) -> float:
    return float((run.get("cpu") or {}).get("cores_used", 0.0))


def _cores(cpu: dict[str, Any] | None) -> str:
    if not cpu or "cores_used" not in cpu:
        return "n/a"
    return f"{cpu['cores_used']:.2f} / {cpu['machine_cores_busy']:.2f}"


def _per_cpu(run: dict[str, Any]) -> str:
    cores = _cores_used(run)
    return f"{run['env_steps_per_s'] / cores:.0f}" if cores > 0 else "n/a"


def _embedded_markdown(e: dict[str, Any], target: float) -> list[str]:
    """The serialized/async table and the ratio line."""
    lines = [
        "| mode | env steps/s | updates/s | window | sampling (+inference) busy | gradient busy "
        "| distribution busy | overlap | gradient ∥ sampling | stale groups | cores used "
        "(ours / whole machine) | env steps per CPU-s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("serialized", "async"):
        for r in e["runs"][mode]:
            lanes = r.get("lanes") or {}
            u = lanes.get("utilisation", {})
            sampling = u.get("sampling+inference", u.get("sampling", float("nan")))
            lines.append(
                f"| {mode} | {r['env_steps_per_s']:.0f} | {r['updates_per_s']:.3f} | "
                f"{r['window_s']:.0f} s, {r['updates']} updates | {sampling:.0%} | "
                f"{u.get('gradient', float('nan')):.0%} | "
                f"{u.get('distribution', float('nan')):.1%} | "
                f"{lanes.get('overlap', float('nan')):.0%} | "
                f"{lanes.get('gradient_during_sampling', float('nan')):.0%} | "
                f"{r.get('stale_groups', 0)} | {_cores(r.get('cpu'))} | {_per_cpu(r)} |"
            )
    lines += [
        "",
        f"async ÷ serialized (median of rounds): env steps/s **{e['ratio_env_steps_per_s']:.2f}**,"
        f" updates/s **{e['ratio_updates_per_s']:.2f}** (target ≥ {target})"
        + (
            f"; env steps per CPU-second {e['ratio_env_steps_per_cpu_s']:.2f}."
            if "ratio_env_steps_per_cpu_s" in e
            else "."
        ),
    ]
    return lines


def markdown(result: dict[str, Any]) -> str:
    """Draft BENCHMARKS.md tables for a result."""
    e = result["embedded"]
    lines: list[str] = []
    if "runs" in e:
        lines += _embedded_markdown(e, result["target"])
    c = result.get("cheetah", {})
    if "job" in c:
        j = c["job"]
        ret = ""
        if j.get("return_first_decile") is not None:
            ret = f", return {j['return_first_decile']:.0f} → {j['return_last_decile']:.0f}"
        n = c["envs_per_sampler"]
        lines += [
            "",
            "| HalfCheetah-v5, state obs, 2 cores | env frames/s | ÷ bare ceiling |",
            "|---|---|---|",
            f"| bare, 1 process x SyncVectorEnv({n}) | "
            f"{c['ceiling_1proc']['frames_per_s']:,.0f} | |",
            f"| bare ceiling, 2 processes x SyncVectorEnv({n}) (higher of before/after) | "
            f"{c['ceiling_frames_per_s']:,.0f} | 1.00 |",
            f"| dvla: {c['samplers']} sampler processes x {n} envs + learner (PPO on, "
            f"{j['updates_per_s']:.1f} updates/s{ret}) | {j['frames_per_s']:,.0f} | "
            f"**{c['ratio_to_ceiling']:.2f}** |",
            f"| Sample Factory 2.1.1, best configuration (MEASURED.md; HalfCheetah-v4) | "
            f"~2,750 | {c['sample_factory_ratio']} |",
            "",
            f"Per CPU-second (not moved by other users' load): bare "
            f"{c['bare_frames_per_cpu_s']:,.0f} frames/CPU-s, dvla "
            + (
                f"{c['frames_per_cpu_s']:,.0f} frames/CPU-s = **{c['ratio_per_cpu_s']:.2f}** of "
                f"bare (dvla's processes used {_cores(c.get('job_cpu'))} cores, ours / whole "
                "machine)."
                if c.get("frames_per_cpu_s")
                else "n/a."
            ),
        ]
    return "\n".join(lines)
