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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from dvla_bus.errors import ConfigError

BAR_SUCCESS = 0.90
BAR_GAIN = 0.20


def register(sub: Any, name: str, help_text: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=__doc__)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 minute, few seeds")
    p.add_argument("--minutes", type=float, default=30.0, help="training budget per setting")
    p.add_argument("--demos-per-task", type=int, help="warm-start demonstrations per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="environment worker processes")
    p.add_argument("--eval-seeds", type=int, default=100, help="held-out seeds per task")
    p.add_argument(
        "--settings",
        default="main,one-demo",
        help="comma-separated: main (the configured warm start), one-demo (1 demo per task)",
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


def _setting(
    args: argparse.Namespace, label: str, demos: int | None, overrides: dict[str, Any]
) -> dict[str, Any]:
    from dvla_nodes.learn import SerialTrainer, TrainConfig, make_run_dir, read_metrics

    values: dict[str, Any] = {
        "name": f"bench-{label}",
        "seed": args.seed,
        "minutes": args.minutes,
        "env_workers": args.workers,
        "final_eval_seeds": args.eval_seeds,
        "display": False,
    }
    if demos is not None:
        values["demos_per_task"] = demos
    if args.quick:
        values.update(minutes=min(args.minutes, 1.0), eval_seeds=4, eval_every=5)
        values["final_eval_seeds"] = min(args.eval_seeds, 10)
    values.update(overrides)
    cfg = TrainConfig.from_json(values)
    run_dir = make_run_dir(args.runs_dir, cfg.name)

    def progress(r: dict[str, Any]) -> None:
        if r["kind"] in ("bc", "eval", "final"):
            print(
                f"[{label}] {r['kind']:5s} t={r['t'] / 60:5.1f} min  env_steps={r['env_steps']:>8,}"
                + (f"  success={r['success']:.1%}" if "success" in r else ""),
                flush=True,
            )

    # The warm start is evaluated on the same held-out seeds as the final policy.
    res = SerialTrainer(cfg, run_dir, progress).run()
    from dvla_nodes.learn import evaluate, load_checkpoint, open_shards
    from dvla_nodes.policy import PolicyActor, build_policy

    model, tok = build_policy(
        cfg.policy_size, cfg.image_size, cfg.bins, cfg.seed, stem=cfg.policy_stem
    )
    ck = load_checkpoint(run_dir / "warmstart.json")
    from dvla_nodes.policy.flat import flatten

    _, flat = flatten(model)
    import torch

    flat.copy_(torch.from_numpy(ck.flat))
    n_envs = cfg.group_size * cfg.groups_per_iter
    with open_shards(n_envs, cfg.env_workers, cfg.image_size) as shards:
        warm = evaluate(
            shards, PolicyActor(model, tok, cfg.temperature), cfg.tasks, cfg.final_eval_seeds
        )
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    gain = res.final.success - warm.success
    return {
        "setting": label,
        "run_dir": str(run_dir),
        "plot": str(run_dir / "success.png"),
        "config": cfg.to_json(),
        "warmstart_success": warm.success,
        "warmstart_success_by_task": warm.success_by_task,
        "final_success": res.final.success,
        "final_success_by_task": res.final.success_by_task,
        "gain": gain,
        "bar_met": res.final.success >= BAR_SUCCESS and gain >= BAR_GAIN,
        "min_task_success": min(res.final.success_by_task.values()),
        "train_seconds": res.train_seconds,
        "bc_seconds": res.bc_seconds,
        "env_steps": res.env_steps,
        "iterations": res.iterations,
        "rollout_seconds": sum(r["rollout_seconds"] for r in train),
        "update_seconds": sum(r["update_seconds"] for r in train),
        "eval_seconds": sum(r.get("eval_seconds", 0.0) for r in records if r["kind"] == "eval"),
        "skipped_groups": sum(r["skipped_groups"] for r in train),
        "groups": sum(r["groups"] for r in train),
        "curve": [r for r in records if r["kind"] in ("bc", "eval", "final")],
    }


def markdown(result: dict[str, Any]) -> str:
    """The BENCHMARKS.md tables for a result: final numbers per setting, then each setting's
    curve (every evaluation: wall time, env steps, mean and per-task success)."""
    lines = [
        "| setting | warm start | after GRPO | gain | min task | train time | env steps | bar |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in result.get("settings", []):
        lines.append(
            f"| {s['setting']} | {s['warmstart_success']:.1%} | {s['final_success']:.1%} | "
            f"{s['gain'] * 100:+.1f} pts | {s['min_task_success']:.0%} | "
            f"{s['train_seconds'] / 60:.1f} min | {s['env_steps']:,} | "
            f"{'met' if s['bar_met'] else '**not met**'} |"
        )
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
                f"| {r['kind']} | {r['t'] / 60:.1f} | {r['env_steps']:,} | "
                f"{r['success']:.1%} | {per} |"
            )
        lines += [
            "",
            f"Time split: rollouts {s['rollout_seconds']:.0f} s, GRPO updates "
            f"{s['update_seconds']:.0f} s, evaluations {s['eval_seconds']:.0f} s, warm start "
            f"(demos + cloning) {s['bc_seconds']:.0f} s; groups skipped "
            f"{s['skipped_groups']} of {s['groups']}.",
        ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from dvla_tools.cmd_train import _parse_sets

    overrides = _parse_sets(args.set)
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
    chosen = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(chosen) - {"main", "one-demo"})
    if unknown:
        raise ConfigError(f"--settings: unknown {unknown}; choose from main, one-demo")
    settings = []
    for label in chosen:
        demos = 1 if label == "one-demo" else args.demos_per_task
        settings.append(_setting(args, label, demos, overrides))
        result["settings"] = settings
        if args.json is not None:  # keep what is measured even if a later setting fails
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1, sort_keys=True))
    for s in settings:
        print(
            f"{s['setting']}: warm start {s['warmstart_success']:.1%} -> GRPO "
            f"{s['final_success']:.1%} ({s['gain'] * 100:+.1f} points) in "
            f"{s['train_seconds'] / 60:.1f} min; bar {'MET' if s['bar_met'] else 'NOT met'}"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, sort_keys=True))
        print(f"wrote {args.json}")
    print(markdown(result))
    return 0
