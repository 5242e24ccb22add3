"""``dvla bus ...``: look at a running job over its control bus (like ``ros2 node list``).

The hub is found from ``--control ENDPOINT``, else ``$DVLA_CONTROL_ENDPOINT``, else the
``config.json`` of ``--run-dir`` (default: the newest run under ``runs/``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from dvla_bus import wire
from dvla_bus.control import open_control_client
from dvla_bus.errors import ConfigError
from dvla_bus.reaper import reap
from dvla_bus.security import Credentials, load_credentials
from dvla_tools.bag_cli import add_bag_commands
from dvla_tools.bus_inspect import add_inspect_commands


def register(sub: Any, name: str, help_text: str) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=__doc__)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    lst = verbs.add_parser("list", help="nodes with role, host, pid, state, version, heartbeat")
    _hub_args(lst)
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=_list)

    reap_p = verbs.add_parser("reap", help="remove /dev/shm segments whose owner process is gone")
    reap_p.add_argument("--run", help="only segments of this run id")
    reap_p.add_argument("--dry-run", action="store_true", help="list, remove nothing")
    reap_p.add_argument("--json", action="store_true", help="machine-readable output")
    reap_p.set_defaults(func=_reap)

    add_bag_commands(verbs)
    add_inspect_commands(verbs, _hub_args, hub_endpoint, tool_credentials)


def _hub_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control", help="control hub endpoint")
    parser.add_argument("--keys", help="key directory of a CURVE deployment (or $DVLA_KEYS)")
    parser.add_argument(
        "--key-name", help="which client pair in --keys to present (default: this host's name)"
    )
    parser.add_argument("--run-dir", type=Path, help="run directory (default: newest in runs/)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the hub")


def hub_endpoint(args: argparse.Namespace) -> str:
    if args.control:
        return str(args.control)
    if os.environ.get("DVLA_CONTROL_ENDPOINT"):
        return os.environ["DVLA_CONTROL_ENDPOINT"]
    run_dir: Path | None = args.run_dir
    if run_dir is None:
        runs = sorted(p for p in Path("runs").glob("*/config.json"))
        if not runs:
            raise ConfigError("no --control given and no runs/*/config.json here to find the hub")
        run_dir = max(runs, key=lambda p: p.stat().st_mtime).parent
    config = run_dir / "config.json"
    try:
        endpoint = json.loads(config.read_text())["control_endpoint"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{config}: cannot read the control endpoint ({exc})") from None
    return str(endpoint)


def tool_credentials(args: argparse.Namespace) -> Credentials | None:
    """The credentials a tool presents: ``--keys`` / ``$DVLA_KEYS`` with ``--key-name`` (or
    this machine's short host name)."""
    keys = getattr(args, "keys", None) or os.environ.get("DVLA_KEYS")
    if not keys:
        return None
    name = getattr(args, "key_name", None) or socket.gethostname().split(".")[0]
    return load_credentials(keys, name)


async def query(
    endpoint: str, timeout: float, credentials: Credentials | None = None
) -> wire.Status:
    async with open_control_client(endpoint, credentials=credentials) as client:
        return await client.query(timeout=timeout)


def topics(status: wire.Status) -> dict[str, dict[str, list[str]]]:
    """topic -> publishers and subscribers, from the nodes' ``tx.topic.*`` / ``rx.topic.*``
    counters."""
    out: dict[str, dict[str, list[str]]] = {}
    for m in status.members:
        for key in m.counters:
            for prefix, side in (("tx.topic.", "publishers"), ("rx.topic.", "subscribers")):
                if key.startswith(prefix):
                    entry = out.setdefault(
                        key[len(prefix) :], {"publishers": [], "subscribers": []}
                    )
                    entry[side].append(m.node)
    return out


def _list(args: argparse.Namespace) -> int:
    status = asyncio.run(query(hub_endpoint(args), args.timeout, tool_credentials(args)))
    if args.json:
        doc = msgspec.to_builtins(status)
        doc["topics"] = topics(status)
        print(json.dumps(doc, indent=2))
        return 0
    table = Table(title=f"hub {status.epoch}: latest weight version {status.latest_version}")
    for col in ("node", "role", "host", "pid", "state", "version", "heartbeat", "endpoints"):
        table.add_column(col)
    for m in status.members:
        table.add_row(
            m.node,
            m.role,
            m.host,
            str(m.pid),
            m.state,
            str(m.weight_version),
            f"{m.heartbeat_age:.1f}s",
            " ".join(f"{k}={v}" for k, v in m.endpoints.items()),
        )
    console = Console(width=200)
    console.print(table)
    found = topics(status)
    if found:
        tt = Table(title="topics")
        for col in ("topic", "publishers", "subscribers"):
            tt.add_column(col)
        for name, sides in sorted(found.items()):
            tt.add_row(name, ", ".join(sides["publishers"]), ", ".join(sides["subscribers"]))
        console.print(tt)
    return 0


def _reap(args: argparse.Namespace) -> int:
    report = reap(args.run, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for info in report.removed:
        print(f"{verb} {info.file} ({info.size} bytes, owner {info.status})")
    print(
        f"{verb} {len(report.removed)} segment(s), {report.bytes_freed} bytes; "
        f"kept {len(report.kept)} with live owners"
    )
    return 0
