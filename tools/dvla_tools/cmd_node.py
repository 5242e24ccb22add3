"""``dvla node start|roles``: run one node process (what the supervisor, Slurm ``srun`` or a
Kubernetes pod starts on each host).

``dvla node start --role ROLE --topology FILE --host NAME [--index I]`` builds the node's
configuration from the topology exactly as ``dvla up`` does, joins the control hub named there
(or ``$DVLA_CONTROL_ENDPOINT``, or ``--control``) and runs until stopped. Exit status: 0 clean
stop, 1 the role failed or its shutdown overran the grace period (stacks dumped to the log),
2 bad command line or topology.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from dvla_bus.deploy import ENV_SUPERVISOR, load_job_topology, node_config
from dvla_bus.errors import ConfigError
from dvla_bus.node import run_nodes, set_parent_death_signal
from dvla_bus.reaper import reap
from dvla_bus.topology import NodePlacement
from dvla_nodes.roles import ROLES, known_roles, load_role


def register(sub: Any, name: str, help_text: str) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=__doc__)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    start = verbs.add_parser("start", help="start one node and run it until stopped")
    which = start.add_mutually_exclusive_group(required=True)
    which.add_argument("--role", help=f"one of: {', '.join(known_roles())}")
    which.add_argument(
        "--all",
        action="store_true",
        help="every node the topology places on --host, in this one process (dvla up --serial)",
    )
    start.add_argument("--topology", required=True, type=Path, help="topology TOML file")
    start.add_argument("--host", required=True, help="this machine's host name in the topology")
    start.add_argument("--index", type=int, default=0, help="which node of this role (default 0)")
    start.add_argument("--run-dir", type=Path, help="run directory (default: runs/adhoc-<host>)")
    start.add_argument("--control", help="control hub endpoint (overrides the topology)")
    start.add_argument("--grace", type=float, default=5.0, help="shutdown grace period, seconds")
    start.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    start.set_defaults(func=_start)

    roles = verbs.add_parser("roles", help="list the known roles")
    roles.set_defaults(func=_roles)


def _roles(args: argparse.Namespace) -> int:
    for role in known_roles():
        cls = load_role(role)
        print(f"{role:14s} {cls.description}")
    return 0


def _start(args: argparse.Namespace) -> int:
    supervisor = os.environ.get(ENV_SUPERVISOR)
    parent = int(supervisor) if supervisor else None
    if parent is not None and not set_parent_death_signal(parent):
        return 0  # the supervisor died before we got going
    if args.role is not None and args.role not in ROLES:
        raise ConfigError(f"unknown role {args.role!r}; known roles: {', '.join(known_roles())}")
    topology = load_job_topology(args.topology, known_roles())
    host = topology.host(args.host)
    if args.all:
        placements = topology.placements(host.name)
    else:
        count = host.roles.get(args.role, 0)
        if not 0 <= args.index < max(count, 1):
            raise ConfigError(
                f"{topology.file}: host {host.name!r} runs {count} {args.role!r} node(s); "
                f"--index {args.index} is out of range"
            )
        placements = [NodePlacement(args.role, host.name, args.index)]
    run_dir = (args.run_dir or Path("runs") / f"adhoc-{host.name}").resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    if args.control:
        os.environ["DVLA_CONTROL_ENDPOINT"] = args.control
    configs = [node_config(topology, p, run_dir, args.grace) for p in placements]
    label = configs[0].node_id if len(configs) == 1 else f"serial.{host.name}"
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s {label} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Clean up after any earlier incarnation killed with SIGKILL before taking new memory.
    reap()
    nodes = [load_role(cfg.role)(cfg) for cfg in configs]
    return run_nodes(nodes, parent=parent)
