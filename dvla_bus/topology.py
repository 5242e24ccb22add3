"""Topology files: which hosts exist, which roles run where, and where the control hub listens.

A topology is TOML (read with :mod:`tomllib`) decoded by msgspec into frozen structs, so a wrong
type is reported with the exact key path; semantic checks (unique names, known roles, one hub)
follow. Every problem raises :class:`~dvla_bus.errors.TopologyError` naming the file and the key
path; the CLI turns it into exit status 2. ``topologies/README.md`` documents the schema.

The schema is versioned (``schema = 1``) and grows by adding optional tables (racks, links,
replication), never by changing the meaning of an existing key.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeAlias

import msgspec

from dvla_bus.errors import TopologyError

__all__ = [
    "ControlSpec",
    "HostSpec",
    "NodePlacement",
    "Topology",
    "load_topology",
    "parse_topology",
]

SCHEMA_VERSION: Final = 1
NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,48}$")
Scalar: TypeAlias = str | int | float | bool


class ControlSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[control]``: the control hub. ``endpoint`` may contain ``{run_dir}``, replaced by the
    run directory when the job starts (for ``ipc://`` on one host)."""

    endpoint: str = "ipc://{run_dir}/control.sock"
    hosted_by: str = "coordinator"
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 5.0


class HostSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[[hosts]]``: one machine and the roles it runs (role name -> number of nodes)."""

    name: str
    address: str = "127.0.0.1"
    roles: dict[str, int] = {}


class _TopologyFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    hosts: list[HostSpec]
    schema: int = SCHEMA_VERSION
    control: ControlSpec = ControlSpec()
    # Per-role settings shared by every node of that role: [roles.<name>] key = value.
    roles: dict[str, dict[str, Scalar]] = {}


@dataclass(frozen=True, slots=True)
class NodePlacement:
    """One node the topology places: ``role`` number ``index`` on ``host``."""

    role: str
    host: str
    index: int

    @property
    def node_id(self) -> str:
        return f"{self.role}.{self.host}.{self.index}"


@dataclass(frozen=True, slots=True)
class Topology:
    """A validated topology. ``file`` is where it came from (for messages)."""

    file: str
    name: str
    control: ControlSpec
    hosts: tuple[HostSpec, ...]
    role_settings: Mapping[str, Mapping[str, Scalar]]

    def host(self, name: str) -> HostSpec:
        for host in self.hosts:
            if host.name == name:
                return host
        known = ", ".join(h.name for h in self.hosts)
        raise TopologyError(self.file, "hosts", f"no host named {name!r} (hosts: {known})")

    def placements(self, host: str | None = None) -> list[NodePlacement]:
        """Every node on ``host`` (all hosts if None), hub host first, then in file order."""
        out = [
            NodePlacement(role, h.name, i)
            for h in self.hosts
            if host is None or h.name == host
            for role, count in h.roles.items()
            for i in range(count)
        ]
        out.sort(key=lambda p: p.role != self.control.hosted_by)
        return out

    def hub_placement(self) -> NodePlacement:
        return next(p for p in self.placements() if p.role == self.control.hosted_by)

    def settings(self, role: str) -> Mapping[str, Scalar]:
        return self.role_settings.get(role, {})


_AT_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def _split_msgspec_error(message: str) -> tuple[str, str]:
    """msgspec says "Expected `int`, got `str` - at `$.hosts[0].roles.x`": split off the path."""
    m = _AT_PATH.search(message)
    if m is None:
        return "", message
    return m.group("path").lstrip("."), message[: m.start()]


# msgspec reports a bad value inside a table of arbitrary keys as ``roles[...]``; these are the
# value types of such tables, used to find the key at fault (error path only).
_TABLE_VALUES: Final[list[tuple[re.Pattern[str], object]]] = [
    (re.compile(r"^hosts\[(\d+)\]\.roles$"), int),
    (re.compile(r"^roles$"), dict[str, Scalar]),
    (re.compile(r"^roles\.([^.\[]+)$"), Scalar),
]


def _resolve_table_key(data: Mapping[str, object], path: str) -> str:
    head, sep, tail = path.partition("[...]")
    if not sep:
        return path
    node: object = data
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", head):
        if part.startswith("["):
            node = node[int(part[1:-1])] if isinstance(node, list) else None
        else:
            node = node.get(part) if isinstance(node, dict) else None
    for pattern, value_type in _TABLE_VALUES:
        if pattern.match(head) and isinstance(node, dict):
            for key, value in node.items():
                try:
                    msgspec.convert(value, value_type, strict=True)
                except msgspec.ValidationError:
                    return _resolve_table_key(data, f"{head}.{key}{tail}")
    return path


def parse_topology(
    data: Mapping[str, object], file: str, known_roles: Iterable[str] | None = None
) -> Topology:
    """Validate an already-parsed TOML document (``file`` is only used in messages)."""
    try:
        raw = msgspec.convert(data, _TopologyFile, strict=True)
    except msgspec.ValidationError as exc:
        path, problem = _split_msgspec_error(str(exc))
        path = _resolve_table_key(data, path)
        raise TopologyError(file, path, problem.replace("Object", "table")) from None

    def fail(path: str, problem: str) -> TopologyError:
        return TopologyError(file, path, problem)

    if raw.schema != SCHEMA_VERSION:
        raise fail(
            "schema", f"schema {raw.schema} is not supported (this dvla reads {SCHEMA_VERSION})"
        )
    if not NAME_RE.match(raw.name):
        raise fail("name", f"{raw.name!r} must be 1-48 characters of A-Z a-z 0-9 _ -")
    if not raw.hosts:
        raise fail("hosts", "at least one [[hosts]] entry is required")
    known = set(known_roles) if known_roles is not None else None
    seen: dict[str, int] = {}
    for i, host in enumerate(raw.hosts):
        where = f"hosts[{i}]"
        if not NAME_RE.match(host.name):
            raise fail(f"{where}.name", f"{host.name!r} must be 1-48 characters of A-Z a-z 0-9 _ -")
        if host.name in seen:
            raise fail(
                f"{where}.name", f"duplicate host {host.name!r} (also hosts[{seen[host.name]}])"
            )
        seen[host.name] = i
        if not host.address:
            raise fail(f"{where}.address", "must not be empty")
        for role, count in host.roles.items():
            if known is not None and role not in known:
                raise fail(
                    f"{where}.roles.{role}",
                    f"unknown role {role!r} (known roles: {', '.join(sorted(known))})",
                )
            if count < 0:
                raise fail(f"{where}.roles.{role}", f"count must be >= 0, got {count}")
    for role in raw.roles:
        if known is not None and role not in known:
            raise fail(f"roles.{role}", f"settings for unknown role {role!r}")

    control = raw.control
    if not control.endpoint.startswith(("tcp://", "ipc://")):
        raise fail(
            "control.endpoint", f"{control.endpoint!r}: expected tcp://HOST:PORT or ipc://PATH"
        )
    if control.endpoint.startswith("ipc://") and len(raw.hosts) > 1:
        raise fail("control.endpoint", "ipc:// reaches one host only; use tcp:// for several hosts")
    if not 0 < control.heartbeat_interval_s < control.heartbeat_timeout_s:
        raise fail(
            "control.heartbeat_timeout_s",
            "need 0 < heartbeat_interval_s < heartbeat_timeout_s, got "
            f"{control.heartbeat_interval_s} and {control.heartbeat_timeout_s}",
        )
    hubs = sum(h.roles.get(control.hosted_by, 0) for h in raw.hosts)
    if hubs != 1:
        raise fail(
            "control.hosted_by",
            f"exactly one node of role {control.hosted_by!r} must host the control hub; "
            f"the hosts place {hubs}",
        )
    return Topology(
        file=file,
        name=raw.name,
        control=control,
        hosts=tuple(raw.hosts),
        role_settings={k: dict(v) for k, v in raw.roles.items()},
    )


def load_topology(path: str | Path, known_roles: Iterable[str] | None = None) -> Topology:
    """Read and validate a topology file; raises :class:`TopologyError` naming file and key."""
    file = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise TopologyError(file, "", f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(file, "", f"not valid TOML: {exc}") from None
    return parse_topology(data, file, known_roles)
