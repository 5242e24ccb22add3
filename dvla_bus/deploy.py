"""The one wiring function: from a topology to the nodes of a host (configs and command lines).

``dvla up`` (the supervisor), ``dvla node start`` and the cluster launchers all build nodes here,
so a node started by hand is configured exactly like one started by the supervisor."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dvla_bus.errors import ConfigError
from dvla_bus.node import NodeConfig
from dvla_bus.security import Credentials, load_credentials
from dvla_bus.topology import NodePlacement, Scalar, Topology, load_topology

log = logging.getLogger(__name__)

__all__ = [
    "ChildSpec",
    "child_specs",
    "control_endpoint",
    "credentials",
    "load_job_topology",
    "local_host",
    "make_run_dir",
    "node_config",
    "settings_overrides",
]

#: Environment variable through which a launcher overrides the control hub's endpoint.
ENV_CONTROL: str = "DVLA_CONTROL_ENDPOINT"
#: Set by a cluster launcher: the address this host's nodes bind and advertise (overrides the
#: topology's ``address``, e.g. a pod IP or the Slurm node's address).
ENV_ADDRESS: str = "DVLA_HOST_ADDRESS"
#: Set by the supervisor in each child: the child stops when this process is gone.
ENV_SUPERVISOR: str = "DVLA_SUPERVISOR_PID"
#: Set by ``dvla up`` in each child: role settings that override the topology file's
#: (``--minutes``, ``--set``, ``--resume``), as JSON ``{"role": {"key": value}}``.
ENV_SETTINGS: str = "DVLA_SETTINGS"


def settings_overrides() -> dict[str, dict[str, Scalar]]:
    """The role-setting overrides of this job (:data:`ENV_SETTINGS`), validated."""
    raw = os.environ.get(ENV_SETTINGS, "")
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"${ENV_SETTINGS}: not JSON: {exc}") from None
    out: dict[str, dict[str, Scalar]] = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"${ENV_SETTINGS}: expected an object of role tables")
    for role, table in doc.items():
        if not isinstance(table, dict):
            raise ConfigError(f"${ENV_SETTINGS}: {role}: expected an object of settings")
        for key, value in table.items():
            if not isinstance(value, str | int | float | bool):
                raise ConfigError(f"${ENV_SETTINGS}: {role}.{key}: expected a scalar")
        out[str(role)] = dict(table)
    return out


def load_job_topology(path: str | Path, known_roles: Iterable[str] | None = None) -> Topology:
    """The topology as this job sees it: the file plus ``dvla up``'s setting overrides. Nodes
    that read another role's settings (a sampler reading ``[roles.learner]``) use this too."""
    return load_topology(path, known_roles, settings_overrides())


def make_run_dir(topology: Topology, root: Path | None = None, name: str | None = None) -> Path:
    """Create ``runs/<time>-<name>/`` (with ``logs/``) and return its absolute path."""
    base = (root or Path.cwd() / "runs").resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = base / f"{stamp}-{name or topology.name}"
    suffix = 1
    while run.exists():
        suffix += 1
        run = base / f"{stamp}-{name or topology.name}-{suffix}"
    (run / "logs").mkdir(parents=True)
    return run


def control_endpoint(topology: Topology, run_dir: Path) -> str:
    """The hub endpoint: ``$DVLA_CONTROL_ENDPOINT`` if set, else the topology's, with
    ``{run_dir}`` filled in."""
    endpoint = os.environ.get(ENV_CONTROL) or topology.control.endpoint
    return endpoint.replace("{run_dir}", str(run_dir))


def local_host(topology: Topology, requested: str | None) -> str:
    """Which topology host this machine is: ``requested``, else the only host, else the host
    named like this machine."""
    if requested is not None:
        return topology.host(requested).name
    if len(topology.hosts) == 1:
        return topology.hosts[0].name
    me = socket.gethostname()
    for h in topology.hosts:
        if h.name == me or h.name == me.split(".")[0]:
            return h.name
    raise ConfigError(
        f"{topology.file}: several hosts and none is named {me!r}; pass --host "
        f"({', '.join(h.name for h in topology.hosts)})"
    )


def credentials(topology: Topology, host: str) -> tuple[Credentials | None, Credentials | None]:
    """(control, data) credentials for nodes on ``host``; raises :class:`ConfigError` when a
    topology spans several hosts with neither keys nor an explicit ``insecure = true``."""
    sec = topology.security
    if sec.keys is None:
        if len(topology.hosts) > 1 and not sec.insecure:
            raise ConfigError(
                f"{topology.file}: security.keys: the topology spans {len(topology.hosts)} "
                "hosts and the control bus is encrypted across hosts; create keys with "
                '`dvla keys new DIR --host <each host>` and set [security] keys = "DIR" '
                "(or insecure = true on a trusted network)"
            )
        if sec.insecure:
            log.warning("%s: [security] insecure = true: CURVE is off on every bus", topology.file)
        return None, None
    creds = load_credentials(sec.keys, host)
    # "across-racks" is served as "always": a socket has one security mode and an inbox
    # serves senders from every rack.
    data = None if topology.data.encrypt == "never" else creds
    return creds, data


def node_config(
    topology: Topology, placement: NodePlacement, run_dir: Path, grace: float = 5.0
) -> NodeConfig:
    host = topology.host(placement.host)
    control_creds, data_creds = credentials(topology, placement.host)
    return NodeConfig(
        role=placement.role,
        host=placement.host,
        index=placement.index,
        run_dir=run_dir,
        control_endpoint=control_endpoint(topology, run_dir),
        address=os.environ.get(ENV_ADDRESS) or host.address,
        heartbeat_interval=topology.control.heartbeat_interval_s,
        heartbeat_timeout=topology.control.heartbeat_timeout_s,
        grace=grace,
        settings=topology.settings(placement.role),
        topology_file=topology.file,
        topology_name=topology.name,
        control_credentials=control_creds,
        data_credentials=data_creds,
        watchdog_s=float(topology.settings(placement.role).get("watchdog_s", 60.0)),
        watchdog_action=str(topology.settings(placement.role).get("watchdog_action", "restart")),
    )


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """How the supervisor starts one node: its name, command line, environment and log file."""

    name: str
    role: str
    argv: tuple[str, ...]
    env: dict[str, str]
    log: Path


def child_specs(
    topology: Topology,
    host: str,
    run_dir: Path,
    grace: float = 5.0,
    *,
    overrides: Mapping[str, Mapping[str, Scalar]] | None = None,
    serial: bool = False,
) -> list[ChildSpec]:
    """One :class:`ChildSpec` per node the topology places on ``host`` (hub first); with
    ``serial``, one process that runs all of them on one event loop (for debugging)."""
    # glibc gives each thread that allocates its own arena (up to 8 per core): a node's
    # executor and torch threads then grow RSS by fragmentation, not by use. Two arenas keep the
    # learner's RSS within the memory bound (dvla bench memory); the user's value wins.
    env = {"PYTHONUNBUFFERED": "1", "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}
    if overrides:
        env[ENV_SETTINGS] = json.dumps(overrides)
    if serial:
        argv: tuple[str, ...] = (
            sys.executable,
            "-m",
            "dvla_tools",
            "node",
            "start",
            "--all",
            "--topology",
            str(Path(topology.file).resolve()),
            "--host",
            host,
            "--run-dir",
            str(run_dir),
            "--grace",
            str(grace),
        )
        name = f"serial.{host}"
        return [ChildSpec(name, "serial", argv, env, run_dir / "logs" / f"{name}.log")]
    specs = []
    for p in topology.placements(host):
        # A role may run under another interpreter (e.g. a simulator's own venv with dvla
        # installed); the command line is the same.
        argv = (
            topology.interpreter(p) or sys.executable,
            "-m",
            "dvla_tools",
            "node",
            "start",
            "--role",
            p.role,
            "--topology",
            str(Path(topology.file).resolve()),
            "--host",
            p.host,
            "--index",
            str(p.index),
            "--run-dir",
            str(run_dir),
            "--grace",
            str(grace),
        )
        specs.append(
            ChildSpec(p.node_id, p.role, argv, dict(env), run_dir / "logs" / f"{p.node_id}.log")
        )
    return specs


def write_run_config(run_dir: Path, topology: Topology, host: str) -> None:
    """Record what was launched (``config.json``), written atomically."""
    doc = {
        "topology_file": str(Path(topology.file).resolve()),
        "topology": topology.name,
        "host": host,
        "control_endpoint": control_endpoint(topology, run_dir),
        "nodes": [p.node_id for p in topology.placements(host)],
        "started": time.time(),
    }
    tmp = run_dir / "config.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, run_dir / "config.json")
