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
from dvla_bus.errors import DeadlineExceeded
from dvla_bus.lanes import merge_traces, summarize_trace
from dvla_bus.supervisor import ChildStatus, Supervisor
from dvla_bus.topology import load_topology
from dvla_nodes.roles import known_roles


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
    parser.set_defaults(func=_up)


def _fmt_stats(member: wire.MemberInfo | None) -> str:
    if member is None:
        return ""
    parts = [f"{k}={v:.3g}" for k, v in sorted(member.gauges.items())]
    parts += [
        f"{k}={v}"
        for k, v in sorted(member.counters.items())
        if not k.startswith(("control.", "hub.received", "hub.broadcast"))
    ]
    return " ".join(parts[:8])


def _table(
    rows: list[ChildStatus], status: wire.Status | None, run_dir: Path, started: float
) -> Table:
    members = {m.node: m for m in status.members} if status else {}
    title = f"dvla up — {run_dir.name} — {time.monotonic() - started:.0f}s"
    if status is not None:
        title += f" — latest version {status.latest_version}"
    else:
        title += " — control hub not reachable yet"
    table = Table(title=title, expand=False)
    for col in ("node", "pid", "state", "restarts", "heartbeat", "version"):
        table.add_column(col, no_wrap=True)
    table.add_column("stats")
    for row in rows:
        m = members.get(row.name)
        state = row.state if m is None or row.state != "running" else m.state
        table.add_row(
            row.name,
            str(row.pid or "-"),
            state,
            str(row.restarts),
            f"{m.heartbeat_age:.1f}s" if m else "-",
            str(m.weight_version) if m else "-",
            _fmt_stats(m),
        )
    return table


async def _poll_hub(client: ControlClient, box: list[wire.Status | None]) -> None:
    while True:
        with contextlib.suppress(DeadlineExceeded):
            box[0] = await client.query(timeout=2.0)
        await asyncio.sleep(1.0)


async def _main(args: argparse.Namespace) -> int:
    topology = load_topology(args.file, known_roles())
    host = local_host(topology, args.host)
    if args.run_dir:
        run_dir = args.run_dir.resolve()
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    else:
        run_dir = make_run_dir(topology, name=args.name)
    write_run_config(run_dir, topology, host)
    specs = child_specs(topology, host, run_dir, args.grace)
    live_mode = sys.stdout.isatty()
    console = Console() if live_mode else Console(width=160)
    logging.basicConfig(
        level=logging.INFO,
        filename=run_dir / "logs" / "supervisor.log",
        format="%(asctime)s supervisor %(levelname)s %(name)s: %(message)s",
    )

    def event(line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        console.print(f"[dim]{stamp}[/dim] {line}", highlight=False)

    event(f"run directory {run_dir} (node logs in logs/)")
    supervisor = Supervisor(specs, grace=args.grace, backoff_max=args.backoff_max, on_event=event)
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
