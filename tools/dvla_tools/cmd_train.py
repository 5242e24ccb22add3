"""``dvla train --serial``: train a policy in one process (environment workers aside).

Demonstrations from the scripted experts, a behaviour-cloning warm start, then GRPO on the
embedded suite until the iteration or wall-clock budget is spent; then a held-out evaluation.
Writes ``runs/<time>-<name>/`` (config.json, metrics.jsonl, checkpoints, success.png). Every
knob of :class:`dvla_nodes.learn.TrainConfig` can be set with ``--set key=value`` (JSON values)
or from a JSON file with ``--config``. The distributed form of the same training is ``dvla up``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dvla_bus.errors import ConfigError


def register(sub: Any, name: str, help_text: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=__doc__)
    p.add_argument("--serial", action="store_true", help="run every component in this process")
    p.add_argument("--config", type=Path, help="JSON file of TrainConfig fields")
    p.add_argument("--name", help="run name (the run directory's suffix)")
    p.add_argument("--minutes", type=float, help="wall-clock budget, warm start included")
    p.add_argument("--iterations", type=int, help="GRPO iteration limit")
    p.add_argument("--tasks", help="comma-separated task names (default: the whole suite)")
    p.add_argument("--demos-per-task", type=int, help="scripted demonstrations per task")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="environment worker processes (0: in-process)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="parent of run directories")
    p.add_argument("--resume", type=Path, help="a checkpoint .json to start from (skips cloning)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig field"
    )
    p.add_argument("--no-display", action="store_true", help="plain log lines, no live table")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> Any:
    from dvla_nodes.learn.config import TrainConfig

    values: dict[str, Any] = {}
    if args.config is not None:
        try:
            values.update(json.loads(args.config.read_text()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--config {args.config}: {exc}") from exc
    values.update(_parse_sets(args.set))
    flags = {
        "name": args.name,
        "minutes": args.minutes,
        "iterations": args.iterations,
        "demos_per_task": args.demos_per_task,
        "seed": args.seed,
        "env_workers": args.workers,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.tasks:
        values["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.no_display:
        values["display"] = False
    try:
        return TrainConfig.from_json(values)
    except TypeError as exc:
        raise ConfigError(f"train config: {exc}") from exc


def _parse_sets(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict; values parse as JSON, else stay strings."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            values[key.strip().replace("-", "_")] = json.loads(raw)
        except ValueError:
            values[key.strip().replace("-", "_")] = raw
    return values


class LiveDisplay:
    """A rich table of the latest metrics, redrawn on each record (no refresh thread)."""

    def __init__(self, live: Any) -> None:
        self.live = live
        self.last_eval: dict[str, Any] = {}
        self.last_train: dict[str, Any] = {}

    def __call__(self, record: dict[str, Any]) -> None:
        from rich.table import Table

        if record["kind"] in ("eval", "final", "bc"):
            self.last_eval = record if record["kind"] != "bc" else self.last_eval
        if record["kind"] == "train":
            self.last_train = record
        t = Table(title="dvla train --serial", show_header=True)
        t.add_column("metric")
        t.add_column("value", justify="right")
        r = self.last_train
        t.add_row("wall time", f"{record['t'] / 60:.1f} min")
        t.add_row("env steps", f"{record.get('env_steps', 0):,}")
        if r:
            t.add_row("iteration / version", f"{r['iteration']} / {r['version']}")
            t.add_row("rollout success (sampled)", f"{r['success']:.1%}")
            t.add_row("env steps/s (rollout)", f"{r['steps_per_second']:.0f}")
            t.add_row("loss / entropy", f"{r['loss']:+.4f} / {r['entropy']:.2f}")
            t.add_row("groups skipped", f"{r['skipped_groups']} of {r['groups']}")
        if self.last_eval:
            e = self.last_eval
            t.add_row(f"eval success ({e['kind']})", f"{e['success']:.1%}")
            for task, s in e["success_by_task"].items():
                t.add_row(f"  {task}", f"{s:.0%}")
        self.live.update(t, refresh=True)


def _plain(record: dict[str, Any]) -> None:
    keys = ("kind", "t", "iteration", "env_steps", "success", "loss", "steps_per_second")
    parts = []
    for k in keys:
        if k in record:
            v = record[k]
            parts.append(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}")
    print(" ".join(parts), flush=True)


def run(args: argparse.Namespace) -> int:
    if not args.serial:
        raise ConfigError(
            "dvla train runs the serial (one-process) trainer: pass --serial; "
            "the distributed pipeline starts with `dvla up TOPOLOGY`"
        )
    cfg = build_config(args)
    from dvla_nodes.learn.trainer import SerialTrainer, make_run_dir

    run_dir = make_run_dir(args.runs_dir, cfg.name)
    if cfg.display and not args.json:
        from rich.live import Live

        with Live(auto_refresh=False) as live:
            result = SerialTrainer(cfg, run_dir, LiveDisplay(live), resume=args.resume).run()
    else:
        result = SerialTrainer(cfg, run_dir, None if args.json else _plain, args.resume).run()
    summary = {
        "run_dir": str(result.run_dir),
        "warmstart_success": result.warmstart.success,
        "final_success": result.final.success,
        "final_success_by_task": result.final.success_by_task,
        "train_seconds": result.train_seconds,
        "env_steps": result.env_steps,
        "iterations": result.iterations,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"run {result.run_dir}: success {result.warmstart.success:.1%} (warm start, "
            f"{cfg.eval_seeds} seeds/task) -> {result.final.success:.1%} "
            f"({cfg.final_eval_seeds} held-out seeds/task) in {result.train_seconds / 60:.1f} min"
        )
    return 0
