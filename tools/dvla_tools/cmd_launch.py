"""``dvla launch slurm|ray|k8s FILE``: start a multi-host deployment on a cluster manager the
user already has. Each topology host becomes one ``dvla up FILE --host H`` (a Slurm job step, a
Ray actor's child process, a Kubernetes pod); the control hub's endpoint reaches every node
through ``$DVLA_CONTROL_ENDPOINT`` and each machine's own address through
``$DVLA_HOST_ADDRESS``. The cluster manager places and restarts processes; dvla's buses carry
all data and control.

* ``slurm``: writes an sbatch script; ``--dry-run`` prints it, ``-o DIR`` writes it without
  submitting, otherwise it is submitted with ``sbatch``.
* ``ray``: connects to a Ray cluster (``--address``, else ``$RAY_ADDRESS``), places each host on
  a Ray node and runs until stopped (Ctrl-C, SIGTERM, ``--duration``); ``--dry-run`` prints the
  placement only.
* ``k8s``: writes Kubernetes manifests (YAML, or JSON with ``--json``) to stdout or
  ``-o DIR``; apply them with ``kubectl apply -f``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dvla_bus.errors import ConfigError
from dvla_bus.launch import (
    k8s_manifests,
    parse_map,
    ray_nodes,
    ray_placement,
    run_ray,
    sbatch_script,
    to_yaml,
)
from dvla_bus.topology import Topology, load_topology
from dvla_nodes.roles import known_roles


def register(sub: Any, name: str, help_text: str) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=__doc__)
    kinds = parser.add_subparsers(dest="manager", metavar="MANAGER", required=True)

    slurm = kinds.add_parser(
        "slurm", help="an sbatch script, one srun step per topology host", description=__doc__
    )
    _common(slurm)
    slurm.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    slurm.add_argument("--json", action="store_true", help="with --dry-run: script as JSON")
    slurm.add_argument("-o", "--output", type=Path, help="write DIR/<job>.sbatch, submit nothing")
    slurm.add_argument("--job-name", help="job name (default dvla-<topology name>)")
    slurm.add_argument("--time", help="#SBATCH --time (e.g. 01:00:00)")
    slurm.add_argument("--partition", help="#SBATCH --partition")
    slurm.add_argument("--account", help="#SBATCH --account")
    slurm.add_argument(
        "--cpus-per-task", type=int, help="CPUs per host step (default: the most nodes per host)"
    )
    slurm.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra #SBATCH line, e.g. --sbatch-arg=--gres=gpu:8 (repeatable)",
    )
    slurm.add_argument(
        "--dvla", default="dvla", help="command that runs dvla on the nodes (default: dvla)"
    )
    slurm.add_argument("--run-dir", help="run directory (default $PWD/runs/slurm-<jobid>-<name>)")
    slurm.set_defaults(func=_slurm)

    ray = kinds.add_parser(
        "ray", help="run on a Ray cluster: one actor per topology host", description=__doc__
    )
    _common(ray)
    ray.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS or local)")
    ray.add_argument("--dry-run", action="store_true", help="print the placement, start nothing")
    ray.add_argument("--json", action="store_true", help="with --dry-run: placement as JSON")
    ray.add_argument("--run-dir", help="run directory on every Ray node (default runs/<time>-ray)")
    ray.add_argument("--grace", type=float, default=10.0, help="stop grace period per host, s")
    ray.add_argument(
        "--max-restarts", type=int, default=3, help="restarts of a host's dvla up (default 3)"
    )
    ray.set_defaults(func=_ray)

    k8s = kinds.add_parser(
        "k8s", help="Kubernetes manifests: one StatefulSet pod per host", description=__doc__
    )
    _common(k8s, duration=False)
    k8s.add_argument("--image", required=True, help="container image with dvla installed")
    k8s.add_argument("--namespace", help="metadata.namespace of every object (default: none)")
    k8s.add_argument("-o", "--output", type=Path, help="write DIR/<name>.yaml (or .json)")
    k8s.add_argument("--json", action="store_true", help="a JSON List instead of YAML")
    k8s.add_argument(
        "--rack-label",
        default="dvla.io/rack",
        help="node label that holds a Kubernetes node's rack (default dvla.io/rack)",
    )
    k8s.add_argument(
        "--rack-affinity",
        choices=("required", "preferred", "none"),
        default="required",
        help="pin pods to nodes of their rack (default required)",
    )
    k8s.add_argument("--cpu-per-node", type=float, default=1.0, help="CPU request per dvla node")
    k8s.add_argument(
        "--dvla", default="dvla", help="command that runs dvla in the image (default: dvla)"
    )
    k8s.set_defaults(func=_k8s)


def _common(parser: argparse.ArgumentParser, duration: bool = True) -> None:
    parser.add_argument("file", type=Path, help="topology TOML file")
    if duration:
        parser.add_argument(
            "--map",
            action="append",
            default=[],
            metavar="HOST=MACHINE",
            help="place topology HOST on MACHINE (repeatable or comma-separated)",
        )
        parser.add_argument("--duration", type=float, help="stop every host after S seconds")


def _load(path: Path) -> Topology:
    return load_topology(path, known_roles())


def _slurm(args: argparse.Namespace) -> int:
    topology = _load(args.file)
    script = sbatch_script(
        topology,
        mapping=parse_map(args.map),
        dvla=args.dvla,
        job_name=args.job_name,
        time_limit=args.time,
        partition=args.partition,
        account=args.account,
        cpus_per_task=args.cpus_per_task,
        sbatch_args=args.sbatch_arg,
        run_dir=args.run_dir,
        duration=args.duration,
    )
    if args.dry_run:
        if args.json:
            print(json.dumps({"script": script}))
        else:
            print(script, end="")
        return 0
    name = args.job_name or f"dvla-{topology.name}"
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        path = args.output / f"{name}.sbatch"
        path.write_text(script)
        print(f"wrote {path}; submit with: sbatch {shlex.quote(str(path))}")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError("sbatch not found on PATH; use --dry-run or -o DIR to get the script")
    proc = subprocess.run(
        [sbatch, "--parsable"], input=script, text=True, capture_output=True, check=False
    )
    if proc.returncode != 0:
        raise ConfigError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    print(f"submitted job {proc.stdout.strip().split(';')[0]} ({name})")
    return 0


def _ray(args: argparse.Namespace) -> int:
    topology = _load(args.file)
    mapping = parse_map(args.map)
    if args.dry_run:
        try:
            ray: Any = importlib.import_module("ray")
        except ModuleNotFoundError:
            raise ConfigError("dvla launch ray needs Ray: pip install 'dvla[ray]'") from None
        ray.init(address=args.address, log_to_driver=False, logging_level="WARNING")
        try:
            placement = ray_placement(topology, ray_nodes(ray.nodes()), mapping)
        finally:
            ray.shutdown()
        if args.json:
            print(json.dumps(placement.to_json()))
        else:
            print(f"control hub {placement.control_endpoint}")
            for host, node in placement.hosts.items():
                print(f"{host:16s} Ray node {node.node_id} ({node.address})")
        return 0
    run_dir = args.run_dir or str(
        (Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{topology.name}-ray").resolve()
    )
    return run_ray(
        topology,
        address=args.address,
        mapping=mapping,
        run_dir=run_dir,
        duration=args.duration,
        grace=args.grace,
        max_restarts=args.max_restarts,
        on_event=lambda line: print(f"{time.strftime('%H:%M:%S')} {line}", flush=True),
    )


def _k8s(args: argparse.Namespace) -> int:
    topology = _load(args.file)
    objects = k8s_manifests(
        topology,
        image=args.image,
        topology_text=args.file.read_text(),
        namespace=args.namespace,
        rack_label=args.rack_label,
        rack_affinity=args.rack_affinity,
        cpu_per_node=args.cpu_per_node,
        dvla=shlex.split(args.dvla),
    )
    if args.json:
        text = json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2) + "\n"
    else:
        text = to_yaml(objects)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"dvla-{topology.name}.{'json' if args.json else 'yaml'}"
    path.write_text(text)
    print(f"wrote {path}; apply with: kubectl apply -f {shlex.quote(str(path))}")
    return 0
