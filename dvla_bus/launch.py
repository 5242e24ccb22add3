"""Cluster launchers: a topology turned into an sbatch script, Kubernetes manifests or a Ray
placement, each running ``dvla up FILE --host H`` once per topology host.

The cluster manager only places and restarts processes; dvla's own buses carry all data and
control (nothing goes through Ray's object store, Slurm's PMI or Kubernetes' API). Everything
here except :func:`run_ray` is a pure function of the topology and its arguments, so the
generated text can be checked line by line without a cluster.

Addresses. A topology names hosts; the cluster decides which machine (Slurm node, Ray node,
Kubernetes pod) each host becomes, so the addresses written in the file are replaced at launch:

* ``$DVLA_CONTROL_ENDPOINT`` (:data:`dvla_bus.deploy.ENV_CONTROL`) carries the control hub's
  endpoint, ``tcp://<address of the hub's machine>:<port of control.endpoint>``; a value already
  set in the launcher's environment wins (the hub lives elsewhere, e.g. behind a fixed name).
* ``$DVLA_HOST_ADDRESS`` (:data:`ENV_ADDRESS`) carries the address of the machine a host landed
  on, for the data endpoints its nodes bind and announce.

Each topology host is one job step (Slurm), one single-replica StatefulSet (Kubernetes) or one
Ray actor owning a ``dvla up`` child process (Ray), so ``dvla up`` keeps supervising the nodes of
its host exactly as on a workstation.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from dvla_bus.deploy import ENV_ADDRESS as _deploy_env_address
from dvla_bus.deploy import ENV_CONTROL
from dvla_bus.errors import ConfigError
from dvla_bus.topology import Topology

__all__ = [
    "ENV_ADDRESS",
    "RAY_HOST_RESOURCE",
    "HostProcess",
    "RayNode",
    "RayPlacement",
    "assign_hosts",
    "control_port",
    "k8s_manifests",
    "parse_map",
    "ray_nodes",
    "ray_placement",
    "run_ray",
    "sbatch_script",
    "to_yaml",
]

#: The address of the machine a topology host was placed on (set by every launcher).
ENV_ADDRESS: Final = _deploy_env_address  # one name for launchers and nodes (deploy.py)
#: A Ray node offering the custom resource ``dvla-host-<name>`` is topology host ``<name>``.
RAY_HOST_RESOURCE: Final = "dvla-host-{host}"
_DNS_LABEL: Final = re.compile(r"[^a-z0-9-]+")


# --------------------------------------------------------------------------------------------
# Mapping topology hosts to cluster machines


def parse_map(items: Sequence[str]) -> dict[str, str]:
    """``["h0=node1", "h1=node2,h2=node3"]`` → ``{"h0": "node1", ...}`` (``--map`` values).
    Raises :class:`ConfigError` on an item without ``=`` or a host given twice."""
    out: dict[str, str] = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            host, sep, target = part.partition("=")
            if not sep or not host.strip() or not target.strip():
                raise ConfigError(f"--map {part!r}: expected HOST=MACHINE, e.g. h0=node017")
            if host.strip() in out:
                raise ConfigError(f"--map: host {host.strip()!r} is mapped twice")
            out[host.strip()] = target.strip()
    return out


def _check_map_hosts(topology: Topology, mapping: Mapping[str, str]) -> None:
    for host in mapping:
        topology.host(host)  # raises TopologyError naming the known hosts


def assign_hosts(
    topology: Topology, machines: Sequence[str], mapping: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Topology host → machine: ``mapping`` first (a machine may take several hosts that way),
    then the remaining hosts, in file order, onto the machines ``mapping`` left unused, in the
    order given. Raises :class:`ConfigError` when there are too few machines."""
    mapping = dict(mapping or {})
    _check_map_hosts(topology, mapping)
    free = [m for m in machines if m not in set(mapping.values())]
    out: dict[str, str] = {}
    unmapped = [h.name for h in topology.hosts if h.name not in mapping]
    if len(unmapped) > len(free):
        raise ConfigError(
            f"{topology.file}: {len(topology.hosts)} hosts but only {len(machines)} machines "
            f"({len(free)} not taken by --map) for {', '.join(unmapped)}; allocate more or map "
            "several hosts onto one machine with --map HOST=MACHINE"
        )
    free_iter = iter(free)
    for h in topology.hosts:
        out[h.name] = mapping[h.name] if h.name in mapping else next(free_iter)
    return out


def control_port(topology: Topology) -> int | None:
    """The TCP port of ``control.endpoint`` (None for ``ipc://``, which only a one-host topology
    may use). Raises :class:`ConfigError` for port 0: other machines could not find the hub."""
    endpoint = topology.control.endpoint
    if endpoint.startswith("ipc://"):
        return None
    _, _, port = endpoint.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"{topology.file}: control.endpoint {endpoint!r}: a launcher needs a fixed port "
            "(tcp://HOST:PORT with PORT 1-65535) so every host can reach the hub"
        )
    return int(port)


def _hub_host(topology: Topology) -> str:
    return topology.hub_placement().host


def _hub_endpoint(topology: Topology, address: str) -> str:
    port = control_port(topology)
    if port is None:
        return topology.control.endpoint
    return f"tcp://{address}:{port}"


# --------------------------------------------------------------------------------------------
# Slurm


def sbatch_script(
    topology: Topology,
    *,
    mapping: Mapping[str, str] | None = None,
    dvla: str = "dvla",
    job_name: str | None = None,
    time_limit: str | None = None,
    partition: str | None = None,
    account: str | None = None,
    cpus_per_task: int | None = None,
    sbatch_args: Sequence[str] = (),
    run_dir: str | None = None,
    duration: float | None = None,
) -> str:
    """The sbatch script for ``topology`` (its ``file`` must be reachable at the same absolute
    path on every node, as the script itself is). One ``srun --nodes=1 --ntasks=1 -w NODE``
    step per topology host runs ``dvla up FILE --host H``. Hosts without an entry in
    ``mapping`` take the allocation's nodes (``scontrol show hostnames $SLURM_JOB_NODELIST``)
    in file order; ``mapping`` values are Slurm node names. ``dvla`` is the command that runs
    dvla on the nodes (shell words). The first step to end ends the job (its exit status is
    the job's); ``scancel`` reaches every step. ``cpus_per_task`` defaults to the most nodes any
    host runs (one process each)."""
    mapping = dict(mapping or {})
    _check_map_hosts(topology, mapping)
    hosts = topology.hosts
    name = job_name or f"dvla-{topology.name}"
    mapped_nodes = sorted(set(mapping.values()))
    unmapped = [h.name for h in hosts if h.name not in mapping]
    n_nodes = len(unmapped) + len(mapped_nodes)
    cpus = cpus_per_task or max(1, *(sum(h.roles.values()) for h in hosts))
    file = str(Path(topology.file).resolve())
    hub = _hub_host(topology)
    port = control_port(topology)
    q = shlex.quote

    lines = [
        "#!/bin/bash",
        f"# Generated by `dvla launch slurm {topology.file}`: one job step per topology host,",
        "# each running `dvla up FILE --host H`; dvla's buses carry all data and control.",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={n_nodes}",
        f"#SBATCH --ntasks={len(hosts)}",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --output={name}-%j.out",
    ]
    if time_limit:
        lines.append(f"#SBATCH --time={time_limit}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    lines += [f"#SBATCH {arg}" for arg in sbatch_args]
    lines += [
        "set -euo pipefail",
        "",
        f"TOPOLOGY={q(file)}",
        f"DVLA=${{DVLA:-{q(dvla)}}}",
        'RUN_DIR="${DVLA_RUN_DIR:-'
        + (run_dir if run_dir else "$PWD/runs/slurm-$SLURM_JOB_ID-" + topology.name)
        + '}"',
        'mkdir -p "$RUN_DIR"',
        "",
        "# The IPv4 address of Slurm node $1 (its NodeAddr, resolved).",
        "node_addr() {",
        "  local addr",
        "  addr=$(scontrol show node \"$1\" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')",
        "  getent ahostsv4 \"${addr:-$1}\" | awk 'NR == 1 { print $1 }'",
        "}",
        "",
        "# Topology host -> allocated node: "
        + ("--map, then " if mapping else "")
        + "the allocation's nodes in order.",
        'mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
    ]
    if unmapped:
        need = len(unmapped)
        free_test = (
            "FREE=()",
            'for n in "${NODES[@]}"; do',
            '  case " ' + " ".join(mapped_nodes) + ' " in *" $n "*) ;; *) FREE+=("$n") ;; esac',
            "done",
        )
        lines += list(free_test) if mapped_nodes else ['FREE=("${NODES[@]}")']
        lines += [
            f'if [ "${{#FREE[@]}}" -lt {need} ]; then',
            f'  echo "dvla: {need} nodes needed for hosts {" ".join(unmapped)},'
            ' got ${#FREE[@]}: ${FREE[*]:-none}" >&2',
            "  exit 2",
            "fi",
        ]
    free_i = 0
    for h in hosts:
        if h.name in mapping:
            lines.append(f"NODE_{_shell_name(h.name)}={q(mapping[h.name])}")
        else:
            lines.append(f'NODE_{_shell_name(h.name)}="${{FREE[{free_i}]}}"')
            free_i += 1
    hub_var = f"NODE_{_shell_name(hub)}"
    lines += [
        "",
        f"# The control hub runs on {hub}; every node finds it through $DVLA_CONTROL_ENDPOINT.",
    ]
    if port is None:
        lines.append(f"export DVLA_CONTROL_ENDPOINT={q(topology.control.endpoint)}")
    else:
        lines.append(
            "export DVLA_CONTROL_ENDPOINT="
            f'"${{DVLA_CONTROL_ENDPOINT:-tcp://$(node_addr "${hub_var}"):{port}}}"'
        )
    lines += [
        'echo "dvla: control hub $DVLA_CONTROL_ENDPOINT, run directory $RUN_DIR"',
        "",
        "PIDS=()",
        'stop_all() { kill -TERM "${PIDS[@]}" 2>/dev/null || true; }',
        "trap stop_all TERM INT",
    ]
    extra = f" --duration {duration:g}" if duration is not None else ""
    # Hosts mapped onto one node run as parallel steps there. Without --overlap the first step
    # takes every CPU the job has on that node and the others wait for it forever ("step
    # creation temporarily disabled, retrying (Requested nodes are busy)", Slurm 22.05).
    shared = {node for node in mapped_nodes if list(mapping.values()).count(node) > 1}
    for h in hosts:
        var = f"NODE_{_shell_name(h.name)}"
        roles = ", ".join(f"{r} x{n}" for r, n in h.roles.items() if n > 0) or "no nodes"
        node = mapping.get(h.name)
        overlap = " --overlap" if node in shared else ""
        lines += [
            f"# {h.name} (rack {h.rack}): {roles}"
            + (f"; shares node {node} with other hosts (--overlap)" if overlap else ""),
            f'{ENV_ADDRESS}="$(node_addr "${var}")" \\',
            f'  srun --nodes=1 --ntasks=1{overlap} -w "${var}" '
            f"--job-name={q(f'{name}-{h.name}')} \\",
            f'  --output="$RUN_DIR/{h.name}.out" \\',
            f'  $DVLA up "$TOPOLOGY" --host {q(h.name)} --run-dir "$RUN_DIR/{h.name}"{extra} &',
            'PIDS+=("$!")',
        ]
    lines += [
        "",
        "# The first step to end (done, or failed for good) ends the job.",
        "status=0",
        "wait -n || status=$?",
        "stop_all",
        "wait || true",
        'echo "dvla: job ended with status $status"',
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def _shell_name(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", host)


# --------------------------------------------------------------------------------------------
# Kubernetes


def _dns(name: str) -> str:
    """A DNS-1123 label from a topology name (lower case, ``_`` → ``-``)."""
    label = _DNS_LABEL.sub("-", name.lower()).strip("-")
    return label[:63] or "x"


def k8s_manifests(
    topology: Topology,
    *,
    image: str,
    topology_text: str,
    namespace: str | None = None,
    rack_label: str = "dvla.io/rack",
    rack_affinity: str = "required",
    cpu_per_node: float = 1.0,
    dvla: Sequence[str] = ("dvla",),
) -> list[dict[str, Any]]:
    """Kubernetes objects for ``topology``: a ConfigMap holding the topology file
    (``topology_text``), a headless Service giving every pod a stable DNS name, and per topology
    host one StatefulSet of one replica (so a pod lost with its machine is recreated, with the
    same name) running ``dvla up /etc/dvla/topology.toml --host H``.

    Pods carry ``dvla.io/host`` and ``dvla.io/rack`` labels; ``rack_affinity`` ("required",
    "preferred" or "none") pins each pod to Kubernetes nodes whose ``rack_label`` equals its
    rack, and a topology-spread constraint keeps two hosts off one machine. The hub pod binds
    the control endpoint on its pod IP; the others reach it by DNS name. CPU requests are
    ``cpu_per_node`` times the host's node count; ``/dev/shm`` is a memory-backed volume (the
    container default of 64 MiB is too small for the data pools)."""
    if rack_affinity not in ("required", "preferred", "none"):
        raise ConfigError(f"rack affinity {rack_affinity!r}: expected required, preferred or none")
    app = _dns(f"dvla-{topology.name}")
    port = control_port(topology)
    hub = _hub_host(topology)
    base_labels = {"app.kubernetes.io/name": "dvla", "app.kubernetes.io/instance": app}
    meta_ns = {"namespace": namespace} if namespace else {}

    def pod_name(host: str) -> str:
        return f"{_dns(f'{app}-{host}')}-0"

    ports: list[dict[str, Any]] = []
    if port is not None:
        ports.append({"name": "control", "port": port, "protocol": "TCP"})
    if topology.data.port:
        ports.append({"name": "data", "port": topology.data.port, "protocol": "TCP"})
    objects: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{app}-topology", **meta_ns, "labels": dict(base_labels)},
            "data": {"topology.toml": topology_text},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": app, **meta_ns, "labels": dict(base_labels)},
            "spec": {
                "clusterIP": "None",
                # DNS names must resolve before the hub is ready: the nodes retry on their own.
                "publishNotReadyAddresses": True,
                "selector": dict(base_labels),
                "ports": ports or [{"name": "none", "port": 1, "protocol": "TCP"}],
            },
        },
    ]
    for h in topology.hosts:
        sts = _dns(f"{app}-{h.name}")
        # Topology names are valid label values as they are ([A-Za-z0-9_-], at most 48).
        labels = {**base_labels, "dvla.io/host": h.name, "dvla.io/rack": h.rack}
        n_nodes = sum(h.roles.values())
        if h.name == hub:
            control = f"tcp://$({ENV_ADDRESS}):{port}" if port else topology.control.endpoint
        else:
            control = f"tcp://{pod_name(hub)}.{app}:{port}" if port else ""
        env: list[dict[str, Any]] = [
            {"name": ENV_ADDRESS, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": ENV_CONTROL, "value": control},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ]
        container_ports = []
        if h.name == hub and port is not None:
            container_ports.append({"name": "control", "containerPort": port})
        if topology.data.port:
            container_ports.append({"name": "data", "containerPort": topology.data.port})
        cpu = f"{max(1, round(cpu_per_node * max(n_nodes, 1) * 1000))}m"
        container: dict[str, Any] = {
            "name": "dvla",
            "image": image,
            "command": [
                *dvla,
                "up",
                "/etc/dvla/topology.toml",
                "--host",
                h.name,
                "--run-dir",
                "/var/run/dvla",
            ],
            "env": env,
            "resources": {"requests": {"cpu": cpu}},
            "volumeMounts": [
                {"name": "topology", "mountPath": "/etc/dvla", "readOnly": True},
                {"name": "run", "mountPath": "/var/run/dvla"},
                {"name": "shm", "mountPath": "/dev/shm"},
            ],
        }
        if container_ports:
            container["ports"] = container_ports
        pod_spec: dict[str, Any] = {
            # dvla up stops its nodes within the grace period (5 s) after SIGTERM.
            "terminationGracePeriodSeconds": 30,
            "containers": [container],
            "volumes": [
                {"name": "topology", "configMap": {"name": f"{app}-topology"}},
                {"name": "run", "emptyDir": {}},
                {"name": "shm", "emptyDir": {"medium": "Memory"}},
            ],
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "kubernetes.io/hostname",
                    "whenUnsatisfiable": "DoNotSchedule",
                    "labelSelector": {"matchLabels": dict(base_labels)},
                }
            ],
        }
        term = {"matchExpressions": [{"key": rack_label, "operator": "In", "values": [h.rack]}]}
        if rack_affinity == "required":
            pod_spec["affinity"] = {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
                }
            }
        elif rack_affinity == "preferred":
            pod_spec["affinity"] = {
                "nodeAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 100, "preference": term}
                    ]
                }
            }
        objects.append(
            {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": {"name": sts, **meta_ns, "labels": labels},
                "spec": {
                    "serviceName": app,
                    "replicas": 1,
                    "podManagementPolicy": "Parallel",
                    "selector": {"matchLabels": labels},
                    "template": {"metadata": {"labels": labels}, "spec": pod_spec},
                },
            }
        )
    return objects


_PLAIN_KEY: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]*$")
_RESERVED: Final = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"})


def _yaml_key(key: str) -> str:
    if _PLAIN_KEY.match(key) and key.lower() not in _RESERVED:
        return key
    return json.dumps(key)


def _yaml_scalar(value: object, indent: int) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    text = str(value)
    # A file's text reads best as a literal block; anything unusual falls back to a JSON
    # string, which is also a valid YAML double-quoted scalar.
    if (
        "\n" in text.rstrip("\n")
        and text.endswith("\n")
        and not text.endswith("\n\n")
        and not text.startswith((" ", "\n"))
        and all(c == "\n" or (c.isprintable() and c != "\t") for c in text)
    ):
        pad = " " * (indent + 2)
        body = "\n".join(pad + line if line else "" for line in text[:-1].split("\n"))
        return "|\n" + body
    return json.dumps(text, ensure_ascii=True)


def _is_leaf(value: object) -> bool:
    return not isinstance(value, (dict, list)) or not value


def _yaml_lines(value: object, indent: int) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict) and value:
        lines = []
        for key, item in value.items():
            if _is_leaf(item):
                lines.append(f"{pad}{_yaml_key(str(key))}: {_yaml_scalar(item, indent)}")
            else:
                lines.append(f"{pad}{_yaml_key(str(key))}:")
                lines.extend(_yaml_lines(item, indent + 2))
        return lines
    if isinstance(value, list) and value:
        lines = []
        for item in value:
            if _is_leaf(item):
                lines.append(f"{pad}- {_yaml_scalar(item, indent)}")
            else:
                sub = _yaml_lines(item, indent + 2)
                lines.append(f"{pad}- {sub[0][indent + 2 :]}")
                lines.extend(sub[1:])
        return lines
    return [pad + _yaml_scalar(value, indent)]


def to_yaml(documents: Sequence[object]) -> str:
    """A YAML stream, one ``---`` document per object (dicts, lists, str, int, float, bool,
    None). Strings are JSON-quoted (or literal blocks for file texts), so no value changes
    type when read back (``"on"`` stays a string under YAML 1.1 and 1.2)."""
    return "".join("---\n" + "\n".join(_yaml_lines(doc, 0)) + "\n" for doc in documents)


# --------------------------------------------------------------------------------------------
# Ray


@dataclass(frozen=True, slots=True)
class RayNode:
    """A live Ray node as ``ray.nodes()`` describes it."""

    node_id: str
    address: str
    resources: Mapping[str, float]
    is_head: bool = False


@dataclass(frozen=True, slots=True)
class RayPlacement:
    """Where each topology host runs: host → Ray node, and the control hub's endpoint."""

    hosts: Mapping[str, RayNode]
    control_endpoint: str

    def to_json(self) -> dict[str, Any]:
        return {
            "control_endpoint": self.control_endpoint,
            "hosts": {
                h: {"node_id": n.node_id, "address": n.address} for h, n in self.hosts.items()
            },
        }


def ray_nodes(raw: Sequence[Mapping[str, Any]]) -> list[RayNode]:
    """The alive nodes of ``ray.nodes()``, head first, then by address and id."""
    nodes = [
        RayNode(
            node_id=str(n["NodeID"]),
            address=str(n["NodeManagerAddress"]),
            resources=dict(n.get("Resources", {})),
            is_head="node:__internal_head__" in n.get("Resources", {}),
        )
        for n in raw
        if n.get("Alive", False)
    ]
    return sorted(nodes, key=lambda n: (not n.is_head, n.address, n.node_id))


def ray_placement(
    topology: Topology,
    nodes: Sequence[RayNode],
    mapping: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> RayPlacement:
    """Place every topology host on a Ray node. In this order: ``mapping`` (host → node id, id
    prefix of 8+ characters, or address), then a node offering the custom resource
    ``dvla-host-<host>`` (:data:`RAY_HOST_RESOURCE`), then the remaining nodes in the order of
    :func:`ray_nodes`, one host each. The hub endpoint is ``$DVLA_CONTROL_ENDPOINT`` from
    ``env`` if set, else the hub host's node address with the topology's control port."""
    mapping = dict(mapping or {})
    _check_map_hosts(topology, mapping)
    env = os.environ if env is None else env

    def find(target: str) -> RayNode:
        hits = [
            n
            for n in nodes
            if target in (n.node_id, n.address)
            or (len(target) >= 8 and n.node_id.startswith(target))
        ]
        if len(hits) != 1:
            shown = ", ".join(f"{n.node_id[:12]} ({n.address})" for n in nodes)
            problem = "matches no" if not hits else f"matches {len(hits)}"
            raise ConfigError(
                f"--map target {target!r} {problem} live Ray node (nodes: {shown}); "
                "give a node id (or its first 8+ characters) or a unique address"
            )
        return hits[0]

    placed: dict[str, RayNode] = {}
    for h in topology.hosts:
        if h.name in mapping:
            placed[h.name] = find(mapping[h.name])
            continue
        resource = RAY_HOST_RESOURCE.format(host=h.name)
        offering = [n for n in nodes if n.resources.get(resource, 0) > 0]
        if len(offering) > 1:
            raise ConfigError(
                f"{len(offering)} Ray nodes offer the resource {resource!r}; host {h.name!r} "
                "must be one node"
            )
        if offering:
            placed[h.name] = offering[0]
    taken = {n.node_id for n in placed.values()}
    # Nodes that name a host of their own are never given another one by order.
    named = {
        n.node_id
        for n in nodes
        for r in n.resources
        if r.startswith(RAY_HOST_RESOURCE.format(host=""))
    }
    free = [n for n in nodes if n.node_id not in taken and n.node_id not in named]
    left = [h.name for h in topology.hosts if h.name not in placed]
    if len(left) > len(free):
        raise ConfigError(
            f"{topology.file}: {len(left)} hosts ({', '.join(left)}) need a Ray node but only "
            f"{len(free)} are free of {len(nodes)} alive; add nodes, or map hosts with --map "
            f"HOST=NODE or a {RAY_HOST_RESOURCE.format(host='HOST')!r} resource on a node"
        )
    for host, node in zip(left, free, strict=False):
        placed[host] = node
    ordered = {h.name: placed[h.name] for h in topology.hosts}
    endpoint = env.get(ENV_CONTROL) or _hub_endpoint(topology, ordered[_hub_host(topology)].address)
    return RayPlacement(ordered, endpoint)


# A wrapper that ties the child's life to the actor process: Linux sends SIGTERM to the child
# when the actor's worker dies (PR_SET_PDEATHSIG), so a killed actor leaves no orphan.
_PDEATH_EXEC: Final = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(0)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class HostProcess:
    """Runs one topology host's ``dvla up`` as a child process (the body of a Ray actor; plain
    Python otherwise). The topology text is written into ``run_dir`` first, so Ray nodes need
    no shared filesystem. Not thread-safe: one caller (the actor's task loop)."""

    def __init__(
        self,
        host: str,
        topology_text: str,
        run_dir: str,
        env: Mapping[str, str],
        *,
        dvla: Sequence[str] | None = None,
        duration: float | None = None,
    ) -> None:
        self.host = host
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.topology_file = self.run_dir / "topology.toml"
        self.topology_file.write_text(topology_text)
        self.env = {**os.environ, **env}
        self.dvla = list(dvla or (sys.executable, "-m", "dvla_tools"))
        self.duration = duration
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> dict[str, Any]:
        """Start (or restart) ``dvla up``; returns where it runs (pid, node id, address)."""
        argv = [*self.dvla, "up", str(self.topology_file), "--host", self.host]
        argv += ["--run-dir", str(self.run_dir), "--status-every", "0"]
        if self.duration is not None:
            argv += ["--duration", str(self.duration)]
        with open(self.run_dir / "up.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _PDEATH_EXEC, str(os.getpid()), *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        self.starts += 1
        return self.where()

    def where(self) -> dict[str, Any]:
        node_id = ""
        with contextlib.suppress(Exception):
            ray: Any = importlib.import_module("ray")
            node_id = ray.get_runtime_context().get_node_id()
        return {
            "host": self.host,
            "pid": self.proc.pid if self.proc else None,
            "node_id": node_id,
            "address": self.env.get(ENV_ADDRESS, ""),
            "starts": self.starts,
            "run_dir": str(self.run_dir),
        }

    def poll(self) -> int | None:
        """None while ``dvla up`` runs, else its exit status."""
        return None if self.proc is None else self.proc.poll()

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait ``grace`` seconds, SIGKILL; returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        return proc.returncode


def run_ray(
    topology: Topology,
    *,
    address: str | None,
    mapping: Mapping[str, str] | None = None,
    run_dir: str,
    duration: float | None = None,
    dvla: Sequence[str] | None = None,
    grace: float = 10.0,
    max_restarts: int = 3,
    on_event: Callable[[str], None] = print,
    should_stop: Callable[[], bool] = lambda: False,
) -> int:
    """Connect to the Ray cluster at ``address`` (None: ``$RAY_ADDRESS`` or a local one), place
    each topology host on a Ray node (:func:`ray_placement`) and run its ``dvla up`` there in a
    :class:`HostProcess` actor pinned to that node (hard node affinity, ``num_cpus=0``: the
    processes are dvla's, not Ray tasks). Ray restarts an actor whose worker dies; this
    function restarts a ``dvla up`` that exits early, up to ``max_restarts`` times per host.
    Returns when every host's ``dvla up`` ended (after ``duration``), when one exits 2 (a
    configuration error) or fails for good, on SIGTERM/SIGINT (handled here while connected;
    call from the main thread) or when ``should_stop()`` turns true; then stops
    every host (SIGTERM, ``grace``, SIGKILL) and disconnects. Exit status: 0 or the failure's.
    Only actor method calls go through Ray; no data ever enters its object store."""
    try:
        ray: Any = importlib.import_module("ray")
    except ModuleNotFoundError:
        raise ConfigError(
            "dvla launch ray needs Ray: pip install 'dvla[ray]' (or pip install ray)"
        ) from None
    strategies: Any = importlib.import_module("ray.util.scheduling_strategies")
    text = Path(topology.file).read_text()
    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    # ray.init installs its own SIGTERM handler (it exits at once); ours stops the hosts first.
    signalled = [False]

    def on_signal(signum: int, frame: object) -> None:
        signalled[0] = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    stopping = should_stop
    should_stop = lambda: signalled[0] or stopping()  # noqa: E731
    try:
        placement = ray_placement(topology, ray_nodes(ray.nodes()), mapping)
        on_event(f"control hub {placement.control_endpoint}")
        remote = ray.remote(HostProcess)
        actors: dict[str, Any] = {}
        for host, node in placement.hosts.items():
            env = {ENV_CONTROL: placement.control_endpoint, ENV_ADDRESS: node.address}
            actors[host] = remote.options(
                name=f"dvla-{topology.name}-{host}-{os.getpid()}",
                num_cpus=0,
                max_restarts=-1,
                scheduling_strategy=strategies.NodeAffinitySchedulingStrategy(
                    node_id=node.node_id, soft=False
                ),
            ).remote(host, text, f"{run_dir}/{host}", env, dvla=dvla, duration=duration)
        for host, info in zip(
            actors, ray.get([a.start.remote() for a in actors.values()], timeout=120), strict=True
        ):
            on_event(
                f"host {host}: dvla up pid {info['pid']} on Ray node {info['node_id']} "
                f"({info['address']}), run directory {info['run_dir']}"
            )
        restarts = dict.fromkeys(actors, 0)
        status = 0
        done: set[str] = set()
        while not should_stop():
            codes = ray.get([a.poll.remote() for a in actors.values()], timeout=60)
            for host, code in zip(actors, codes, strict=True):
                if code is None or host in done:
                    continue
                if code == 0 and duration is not None:
                    done.add(host)
                    continue
                if code == 2 or restarts[host] >= max_restarts:
                    on_event(f"host {host}: dvla up exited {code}; stopping the job")
                    status = code or 1
                    break
                restarts[host] += 1
                on_event(f"host {host}: dvla up exited {code}; restart {restarts[host]}")
                ray.get(actors[host].start.remote(), timeout=60)
            else:
                if len(done) == len(actors):
                    break
                time.sleep(0.5)
                continue
            break
        codes = ray.get([a.stop.remote(grace) for a in actors.values()], timeout=grace + 30)
        for a in actors.values():
            ray.kill(a)
        on_event(f"stopped ({', '.join(f'{h}={c}' for h, c in zip(actors, codes, strict=True))})")
        return status
    finally:
        ray.shutdown()
        for s, handler in previous.items():
            signal.signal(s, handler)
