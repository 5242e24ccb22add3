"""``dvla topo validate|show``: check a topology file and print what it places where."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dvla_bus.topology import load_topology
from dvla_nodes.roles import known_roles


def register(sub: Any, name: str, help_text: str) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=__doc__)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    validate = verbs.add_parser("validate", help="check a file; exit 2 naming the bad key")
    validate.add_argument("file", type=Path)
    validate.set_defaults(func=_validate)
    show = verbs.add_parser("show", help="list the nodes a file places on each host")
    show.add_argument("file", type=Path)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=_show)


def _validate(args: argparse.Namespace) -> int:
    topo = load_topology(args.file, known_roles())
    nodes = len(topo.placements())
    print(f"{args.file}: ok ({len(topo.hosts)} host(s), {nodes} node(s))")
    return 0


def _show(args: argparse.Namespace) -> int:
    topo = load_topology(args.file, known_roles())
    if args.json:
        doc = {
            "name": topo.name,
            "control": {"endpoint": topo.control.endpoint, "hosted_by": topo.control.hosted_by},
            "hosts": [
                {
                    "name": h.name,
                    "address": h.address,
                    "nodes": [p.node_id for p in topo.placements(h.name)],
                }
                for h in topo.hosts
            ],
        }
        print(json.dumps(doc, indent=2))
        return 0
    hub = topo.control
    print(f"topology {topo.name}  (control hub: {hub.endpoint}, in the {hub.hosted_by})")
    for h in topo.hosts:
        print(f"  {h.name} ({h.address}): " + ", ".join(p.node_id for p in topo.placements(h.name)))
    return 0
