"""``dvla up FILE [--host H]``: launch and supervise every node the topology places on this
host, with a live status table; the one command that runs a job.

Ctrl-C or SIGTERM stops the job (children: SIGTERM, grace period, SIGKILL). The table merges
what the supervisor knows (pid, restarts) with what the control hub knows (state, heartbeat age,
weight version, the node's own statistics). On a terminal it is a live full-screen table;
otherwise a plain snapshot is printed every ``--status-every`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from dvla_bus import wire
from dvla_bus.control import ControlClient, open_control_client
from dvla_bus.deploy import (
    child_specs,
    control_endpoint,
    credentials,
    local_host,
    make_run_dir,
    write_run_config,
)
from dvla_bus.errors import ConfigError, DeadlineExceeded
from dvla_bus.lanes import merge_traces, summarize_trace
from dvla_bus.supervisor import ChildStatus, Supervisor
from dvla_bus.topology import load_topology
from dvla_nodes.roles import known_roles, load_role


def register(sub: Any, name: str, help_text: str) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=__doc__)
    parser.add_argument("file", type=Path, help="topology TOML file")
    parser.add_argument("--host", help="this machine's host in the topology (default: inferred)")
    parser.add_argument("--run-dir", type=Path, help="use this run directory instead of a new one")
    parser.add_argument("--name", help="run name (default: the topology's name)")
    parser.add_argument("--duration", type=float, help="stop the job after this many seconds")
    parser.add_argument("--grace", type=float, default=5.0, help="SIGTERM grace period, seconds")
    parser.add_argument(
        "--status-every", type=float, default=5.0, help="seconds between plain status prints"
    )
    parser.add_argument("--backoff-max", type=float, default=10.0, help="restart backoff cap, s")
    parser.add_argument(
        "--minutes",
        type=float,
        help="training budget in minutes (the learner's `minutes`; with --resume: minutes more)",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its newest checkpoint, version numbers intact",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ROLE.KEY=VALUE",
        help="override a [roles.ROLE] setting (VALUE in TOML syntax; bare words are strings)",
    )
    parser.add_argument(
        "--serial",
        action="store_true",
        help="run every node of this host in one process, one event loop (for debugging)",
    )
    parser.set_defaults(func=_up)


def parse_overrides(items: list[str]) -> dict[str, dict[str, wire.Scalar]]:
    """``["learner.minutes=5", "learner.suite=metaworld"]`` -> role -> key -> value."""
    out: dict[str, dict[str, wire.Scalar]] = {}
    for item in items:
        target, eq, text = item.partition("=")
        role, dot, key = target.partition(".")
        if not (eq and dot and role and key):
            raise ConfigError(f"--set {item!r}: expected ROLE.KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        if not isinstance(value, str | int | float | bool):
            raise ConfigError(f"--set {item!r}: VALUE must be a string, number or boolean")
        out.setdefault(role, {})[key] = value
    return out


def _resume_point(run_dir: Path) -> dict[str, Any]:
    """The metadata of the newest checkpoint in ``run_dir`` (exit 2 if there is none)."""
    from dvla_nodes.learn.checkpoint import checkpoint_meta, find_checkpoint

    best: dict[str, Any] | None = None
    for name in ("latest", "final"):
        path = find_checkpoint(run_dir, name)
        if path is None:
            continue
        try:
            meta = checkpoint_meta(path)
            key = (int(meta["version"]), int(meta["step"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: not a dvla checkpoint: {exc}") from None
        if best is None or key > (int(best["version"]), int(best["step"])):
            best = meta
    if best is None:
        raise ConfigError(f"--resume {run_dir}: no latest.json or final.json checkpoint there")
    return best


_LANE_ABBREV = {"sampling": "samp", "inference": "inf", "gradient": "grad", "distribution": "dist"}


def _lanes(member: wire.MemberInfo) -> str:
    parts = []
    for key, frac in sorted(member.gauges.items()):
        if key.startswith("lane.") and key.endswith(".busy"):
            lane = key[len("lane.") : -len(".busy")]
            parts.append(f"{_LANE_ABBREV.get(lane, lane)} {frac:.0%}")
    return " ".join(parts)


def _drops(member: wire.MemberInfo) -> str:
    c = member.counters
    dropped = sum(v for k, v in c.items() if "drop" in k and not k.startswith("control."))
    stale = c.get("stale_groups", 0) + c.get("future_groups", 0)
    return f"{dropped}/{stale}" if dropped or stale else "-"


def _gauge(member: wire.MemberInfo | None, key: str, fmt: str) -> str:
    if member is None or key not in member.gauges:
        return "-"
    return format(member.gauges[key], fmt)


def _table(
    rows: list[ChildStatus], status: wire.Status | None, run_dir: Path, started: float
) -> Table:
    """One row per supervised process and per hub member not supervised here (the nodes of a
    ``--serial`` process, nodes on other hosts): version and its lag behind the newest, rolling
    (``success``) and evaluation success, environment steps/s, lane utilisation, and
    drops/stale groups."""
    members = {m.node: m for m in status.members} if status else {}
    latest = status.latest_version if status else -1
    title = f"dvla up — {run_dir.name} — {time.monotonic() - started:.0f}s"
    if status is not None:
        title += f" — latest version {latest}"
    else:
        title += " — control hub not reachable yet"
    table = Table(title=title, expand=False)
    for col in ("node", "pid", "state", "restarts", "heartbeat", "version", "lag"):
        table.add_column(col, no_wrap=True)
    for col in ("success", "eval", "steps/s", "lanes busy", "drops/stale"):
        table.add_column(col, no_wrap=True)
    listed: list[tuple[str, ChildStatus | None]] = [(row.name, row) for row in rows]
    listed += [(name, None) for name in sorted(members) if name not in {r.name for r in rows}]
    for name, row in listed:
        m = members.get(name)
        if row is not None:
            state = row.state if m is None or row.state != "running" else m.state
            pid, restarts = str(row.pid or "-"), str(row.restarts)
        else:
            assert m is not None
            state, pid, restarts = m.state, str(m.pid), "-"
        version = m.weight_version if m else -1
        table.add_row(
            name,
            pid,
            state,
            restarts,
            f"{m.heartbeat_age:.1f}s" if m else "-",
            str(version) if m and version >= 0 else "-",
            str(latest - version) if m and version >= 0 and latest >= 0 else "-",
            _gauge(m, "success", ".0%"),
            _gauge(m, "eval_success", ".0%"),
            _gauge(m, "env_steps_per_s", ".0f"),
            _lanes(m) if m else "",
            _drops(m) if m else "-",
        )
    return table


def _final_table(run_dir: Path) -> Table | None:
    """The held-out evaluation at the end of training (``metrics.jsonl``'s final record)."""
    path = run_dir / "metrics.jsonl"
    final: dict[str, Any] | None = None
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("kind") == "final":
                    final = record
    if final is None:
        return None
    table = Table(
        title="held-out evaluation",
        caption=f"version {final.get('version')}, {final.get('episodes', '?')} episodes",
        expand=False,
    )
    table.add_column("task")
    table.add_column("success", justify="right")
    for task, value in sorted(final.get("success_by_task", {}).items()):
        table.add_row(task, f"{value:.0%}")
    table.add_row("[bold]mean[/bold]", f"[bold]{final.get('success', 0.0):.1%}[/bold]")
    return table


async def _poll_hub(client: ControlClient, box: list[wire.Status | None]) -> None:
    while True:
        with contextlib.suppress(DeadlineExceeded):
            box[0] = await client.query(timeout=2.0)
        await asyncio.sleep(1.0)


async def _main(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set)
    point: dict[str, Any] | None = None  # the checkpoint --resume continues from
    if args.resume is not None:
        if args.run_dir is not None:
            raise ConfigError("--resume RUN_DIR already names the run directory; drop --run-dir")
        args.run_dir = args.resume
        point = _resume_point(args.resume.resolve())
        elapsed = float(point.get("metrics", {}).get("elapsed", 0.0))
        if args.minutes is not None:  # minutes more, on top of the training time so far
            overrides.setdefault("learner", {})["minutes"] = elapsed / 60.0 + args.minutes
    elif args.minutes is not None:
        overrides.setdefault("learner", {})["minutes"] = args.minutes
    topology = load_topology(args.file, known_roles(), overrides)
    if point is not None:  # a policy does not carry over to another benchmark suite
        from dvla_nodes.learn.suite import check_resume_suite

        suite = str(topology.settings("learner").get("suite", "embedded"))
        check_resume_suite(point, suite, f"--resume {args.resume}")
    host = local_host(topology, args.host)
    for role in sorted({p.role for p in topology.placements(host)}):
        try:
            load_role(role).check_settings(topology.settings(role))
        except (ConfigError, ValueError, TypeError) as exc:
            raise ConfigError(f"{topology.file}: roles.{role}: {exc}") from None
    if args.run_dir:
        run_dir = args.run_dir.resolve()
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    else:
        run_dir = make_run_dir(topology, name=args.name)
    write_run_config(run_dir, topology, host)
    specs = child_specs(
        topology, host, run_dir, args.grace, overrides=overrides, serial=args.serial
    )
    live_mode = sys.stdout.isatty()
    console = Console() if live_mode else Console(width=200)
    logging.basicConfig(
        level=logging.INFO,
        filename=run_dir / "logs" / "supervisor.log",
        format="%(asctime)s supervisor %(levelname)s %(name)s: %(message)s",
    )

    def event(line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        console.print(f"[dim]{stamp}[/dim] {line}", highlight=False)

    event(f"run directory {run_dir} (node logs in logs/)")
    supervisor = Supervisor(
        specs, grace=args.grace, backoff_max=args.backoff_max, on_event=event, run_dir=run_dir
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.duration is not None:
        loop.call_later(args.duration, stop.set)

    started = time.monotonic()
    box: list[wire.Status | None] = [None]
    control_creds, _ = credentials(topology, host)
    async with open_control_client(
        control_endpoint(topology, run_dir), credentials=control_creds
    ) as client:
        poller = asyncio.create_task(_poll_hub(client, box))
        sup_task = asyncio.create_task(supervisor.run(stop))
        try:
            if live_mode:
                with Live(console=console, refresh_per_second=2) as live:
                    while not sup_task.done():
                        live.update(_table(supervisor.status(), box[0], run_dir, started))
                        await asyncio.wait([sup_task], timeout=0.5)
            else:
                every = args.status_every
                while not sup_task.done():
                    await asyncio.wait([sup_task], timeout=every if every > 0 else None)
                    if every > 0 and not sup_task.done():
                        console.print(_table(supervisor.status(), box[0], run_dir, started))
            code = await sup_task
        finally:
            poller.cancel()
            sup_task.cancel()
            await asyncio.gather(poller, sup_task, return_exceptions=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    console.print(_table(supervisor.status(), box[0], run_dir, started))
    _collect_trace(run_dir, event)
    final = _final_table(run_dir)
    if final is not None:
        console.print(final)
        if (run_dir / "success.png").exists():
            event(f"success curve: {run_dir / 'success.png'}")
    event("stopped")
    return code


def _collect_trace(run_dir: Path, event: Any) -> None:
    """Merge the nodes' lane traces (written on a ``trace`` command, e.g. by the learner at the
    end of training) into ``trace.json`` and report lane utilisation and overlap."""
    parts = []
    for path in sorted((run_dir / "trace").glob("*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            parts.append(json.loads(path.read_text())["events"])
    if not parts:
        return
    doc = merge_traces(parts)
    (run_dir / "trace.json").write_text(json.dumps(doc))
    summary = summarize_trace(doc)
    (run_dir / "lanes.json").write_text(json.dumps(summary, indent=2))
    util = ", ".join(f"{k} {v:.0%}" for k, v in summary["utilisation"].items())
    event(
        f"trace.json written ({len(parts)} node(s)); lanes busy: {util}; "
        f"overlap {summary['overlap']:.0%} of {summary['span_s']:.0f}s"
    )


def _up(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))
