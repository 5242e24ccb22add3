"""Topology files: racks, hosts, roles, links, replication settings and where the hub listens.

A topology is TOML (read with :mod:`tomllib`) decoded by msgspec into frozen structs, so a wrong
type is reported with the exact key path; semantic checks (unique names, known racks and roles,
one hub, units) follow. Every problem raises :class:`~dvla_bus.errors.TopologyError` naming the
file and the key path; the CLI turns it into exit status 2. ``topologies/README.md`` documents
the schema.

The schema is versioned (``schema = 1``) and grows by adding optional tables and keys (racks,
links, replication, data), never by changing the meaning of an existing key: a file without any
of them describes the same job it always did (every host in one implicit rack,
:data:`DEFAULT_RACK`).

Quantities carry units in the file (``"25Gbit"``, ``"4MiB"``, ``"50us"``) and are stored in SI
base units: bandwidths in **bytes per second**, sizes in **bytes**, latencies in **seconds**.
:func:`parse_bandwidth`, :func:`parse_size` and :func:`parse_duration` are the parsers (also used
for command-line flags); the ``format_*`` functions write values back in a form they accept.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final, TypeAlias

import msgspec

from dvla_bus.errors import ConfigError, TopologyError

__all__ = [
    "CHECKSUMS",
    "DEFAULT_MAX_NODES",
    "DEFAULT_RACK",
    "ENCRYPT_MODES",
    "ControlSpec",
    "DataSpec",
    "HostSpec",
    "LinkSpec",
    "NodePlacement",
    "RackSpec",
    "ReplicationSpec",
    "Topology",
    "format_bandwidth",
    "format_duration",
    "format_size",
    "load_topology",
    "parse_bandwidth",
    "parse_duration",
    "parse_size",
    "parse_topology",
]

SCHEMA_VERSION: Final = 1
#: The control hub admits at least this many members when ``[control] max_nodes`` is not set.
DEFAULT_MAX_NODES: Final = 4096
NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,48}$")
DEFAULT_RACK: Final = "default"
# Names the replication code will accept for per-chunk checksums. xxh3/xxh64 need the `xxhash`
# package; the others are in the standard library (hashlib / zlib).
CHECKSUMS: Final = ("blake2b", "sha256", "crc32", "xxh3", "xxh64", "none")
# Which data-bus connections are CURVE-encrypted (DESIGN.md: a per-deployment choice, never
# silently off; the control bus is always encrypted across hosts).
ENCRYPT_MODES: Final = ("always", "across-racks", "never")
Scalar: TypeAlias = str | int | float | bool
# A quantity as written in the file: a string with a unit. Numbers are accepted by the decoder
# only so that a missing unit gets a precise message instead of a type error.
_Quantity: TypeAlias = str | int | float


# --------------------------------------------------------------------------------------------
# Units


class _Unit:
    """Unit tables. Bit rates use decimal prefixes (networking: 1 Gbit = 10^9 bit); byte units
    take decimal (kB, MB) or binary (KiB, MiB) prefixes as written."""

    DEC: Final = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
    BIN: Final = {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50}

    @classmethod
    def sizes(cls) -> dict[str, float]:
        out = {f"{p}B": f for p, f in cls.DEC.items()}
        out.update({f"{p}B": f for p, f in cls.BIN.items()})
        return out

    @classmethod
    def rates(cls) -> dict[str, float]:
        out: dict[str, float] = {}
        for p, f in cls.DEC.items():
            # The prefix of a bit rate may be lower case ("mbit" as tc writes it): a milli-bit
            # rate means nothing, so there is no ambiguity.
            for prefix in {p, p.lower()}:
                for suffix in ("bit", "bps", "b/s", "bit/s"):
                    out[f"{prefix}{suffix}"] = f / 8.0
            out[f"{p}B/s"] = f
        out.update({f"{p}B/s": f for p, f in cls.BIN.items()})
        return out


_SIZE_UNITS: Final = _Unit.sizes()
_RATE_UNITS: Final = _Unit.rates()
# Divisors (number / divisor is correctly rounded; number * 1e-6 is not: 50us -> 4.9999e-05).
_TIME_UNITS: Final = {"ns": 1e9, "us": 1e6, "µs": 1e6, "ms": 1e3, "s": 1.0}
_QUANTITY_RE: Final = re.compile(
    r"^\s*(?P<num>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*(?P<unit>\S*)\s*$"
)
_RATE_HELP: Final = "e.g. '25Gbit', '10Gbps', '200mbit', '1.5GB/s' or '800MiB/s'"
_SIZE_HELP: Final = "e.g. '4MiB', '512KiB', '1GB' or '4096B'"
_TIME_HELP: Final = "e.g. '50us', '1.5ms' or '0s'"


def _split_quantity(value: _Quantity, kind: str, help_text: str) -> tuple[float, str]:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"expected a {kind} string with a unit ({help_text}), got {value!r}")
    if not isinstance(value, str):
        raise ConfigError(f"{value!r} has no unit; write the {kind} as a string, {help_text}")
    m = _QUANTITY_RE.match(value)
    if m is None:
        raise ConfigError(f"{value!r} is not a {kind}: expected a number and a unit, {help_text}")
    number = float(m.group("num"))
    if not math.isfinite(number):
        raise ConfigError(f"{value!r} is not a finite {kind}")
    if not m.group("unit"):
        raise ConfigError(f"{value!r} has no unit; {help_text}")
    return number, m.group("unit")


def parse_bandwidth(value: _Quantity) -> float:
    """``"25Gbit"`` → bytes per second (3.125e9). Accepts bit rates (``bit``, ``bps``, ``b/s``,
    ``bit/s`` with prefixes k/M/G/T/P, upper or lower case) and byte rates (``B/s`` with decimal
    or binary prefixes: ``GB/s``, ``GiB/s``). Must be > 0. Raises :class:`ConfigError`."""
    number, unit = _split_quantity(value, "bandwidth", _RATE_HELP)
    factor = _RATE_UNITS.get(unit)
    if factor is None:
        if unit in _SIZE_UNITS:
            raise ConfigError(
                f"{value!r} is a size, not a bandwidth; add '/s' ({number:g}{unit}/s) "
                f"or use bits ({_RATE_HELP})"
            )
        raise ConfigError(f"{value!r}: unknown bandwidth unit {unit!r}; {_RATE_HELP}")
    if number <= 0:
        raise ConfigError(f"{value!r}: a bandwidth must be > 0")
    return number * factor


def parse_size(value: _Quantity) -> int:
    """``"4MiB"`` → bytes (4194304). Units ``B``, ``kB``/``KB``, ``MB``, ``GB``, ``TB``, ``PB``
    (powers of 1000) and ``KiB`` … ``PiB`` (powers of 1024). Must be a whole number of bytes
    >= 0 (callers check > 0 where zero makes no sense). Raises :class:`ConfigError`."""
    number, unit = _split_quantity(value, "size", _SIZE_HELP)
    factor = _SIZE_UNITS.get(unit)
    if factor is None:
        if unit in _RATE_UNITS:
            raise ConfigError(
                f"{value!r} is a bandwidth or in bits; a size is in bytes, {_SIZE_HELP}"
            )
        raise ConfigError(f"{value!r}: unknown size unit {unit!r}; {_SIZE_HELP}")
    size = number * factor
    if size < 0:
        raise ConfigError(f"{value!r}: a size must be >= 0")
    whole = round(size)
    if abs(size - whole) > 1e-6 * max(1.0, size):
        raise ConfigError(f"{value!r} is not a whole number of bytes ({size:g})")
    return int(whole)


def parse_duration(value: _Quantity) -> float:
    """``"50us"`` → seconds (5e-05). Units ``ns``, ``us`` (or ``µs``), ``ms``, ``s``; >= 0."""
    number, unit = _split_quantity(value, "duration", _TIME_HELP)
    factor = _TIME_UNITS.get(unit)
    if factor is None:
        raise ConfigError(f"{value!r}: unknown time unit {unit!r}; {_TIME_HELP}")
    if number < 0:
        raise ConfigError(f"{value!r}: a duration must be >= 0")
    return number / factor


def _pick(value: float, units: Iterable[tuple[str, float]]) -> tuple[float, str]:
    chosen = None
    for name, factor in units:
        if chosen is None or value >= factor:
            chosen = (value / factor, name)
    assert chosen is not None
    return chosen


def format_bandwidth(bytes_per_s: float, digits: int = 4) -> str:
    """Bytes/s as a bit rate with the largest fitting decimal prefix (``"25Gbit"``); with
    ``digits=17`` :func:`parse_bandwidth` gives the value back exactly (up to float rounding)."""
    units = [(f"{p}bit", f / 8.0) for p, f in _Unit.DEC.items() if p != "K"]
    number, unit = _pick(bytes_per_s, units)
    return f"{number:.{digits}g}{unit}"


def format_size(n_bytes: float, digits: int = 4) -> str:
    """Bytes with the largest fitting binary prefix (``"4MiB"``); parseable by
    :func:`parse_size` when the result is a whole number of bytes."""
    units = [("B", 1.0), *((f"{p}B", f) for p, f in _Unit.BIN.items())]
    number, unit = _pick(n_bytes, units)
    return f"{number:.{digits}g}{unit}"


def format_duration(seconds: float, digits: int = 4) -> str:
    """Seconds with the largest fitting unit (``"50us"``, ``"1.5ms"``, ``"12.3s"``)."""
    units = [(name, 1.0 / div) for name, div in _TIME_UNITS.items() if name != "µs"]
    number, unit = _pick(seconds, units)
    return f"{number:.{digits}g}{unit}"


# --------------------------------------------------------------------------------------------
# The file as decoded (raw strings) and the validated, resolved values


class ControlSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[control]``: the control hub. ``endpoint`` may contain ``{run_dir}``, replaced by the
    run directory when the job starts (for ``ipc://`` on one host). ``max_nodes`` bounds the
    hub's membership table; in a loaded :class:`Topology` it is always set (when the file
    omits it: :data:`DEFAULT_MAX_NODES` or twice the nodes the topology places, the larger)."""

    endpoint: str = "ipc://{run_dir}/control.sock"
    hosted_by: str = "coordinator"
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 5.0
    max_nodes: int | None = None


class HostSpec(msgspec.Struct, frozen=True):
    """One machine (resolved): the roles it runs (role name -> number of nodes), its rack, its
    NIC bandwidth in bytes/s (None: not given, see :attr:`Topology.links`) and the Python
    interpreter per role where it is not the one running dvla (absolute paths)."""

    name: str
    address: str = "127.0.0.1"
    roles: dict[str, int] = {}
    rack: str = DEFAULT_RACK
    nic_bps: float | None = None
    python: dict[str, str] = {}

    def interpreter(self, role: str) -> str | None:
        """The Python to start ``role`` with on this host; None: the one running dvla."""
        return self.python.get(role)


@dataclass(frozen=True, slots=True)
class RackSpec:
    """A rack: its hosts (file order, see :meth:`Topology.rack_hosts`) share a top-of-rack
    switch whose uplink to the spine has ``uplink_bps`` bytes/s each way (None: not a limit)."""

    name: str
    uplink_bps: float | None = None


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """``[links]``: default bandwidths (bytes/s, each direction; None = not a limit) and one-way
    latencies (seconds) per link class. A hop inside a rack costs ``host_latency_s``; a hop
    between racks costs ``host_latency_s + 2 * uplink_latency_s + spine_latency_s``.
    ``spine_bps`` is the spine's aggregate capacity, shared by all cross-rack streams."""

    host_nic_bps: float | None = None
    rack_uplink_bps: float | None = None
    spine_bps: float | None = None
    host_latency_s: float = 0.0
    uplink_latency_s: float = 0.0
    spine_latency_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ReplicationSpec:
    """``[replication]``: the weight tree's root is the host of the one ``source``-role node
    (default: the hub's role); ``fanout`` children per host inside a rack, ``rack_fanout``
    child racks per rack; weights travel in ``chunk_bytes`` chunks, each checked with
    ``checksum`` (one of :data:`CHECKSUMS`)."""

    source: str = "coordinator"
    fanout: int = 2
    rack_fanout: int = 2
    chunk_bytes: int = 4 << 20
    checksum: str = "blake2b"


@dataclass(frozen=True, slots=True)
class DataSpec:
    """``[data]``: each host's cross-host data endpoint listens on ``tcp://<address>:<port>``
    (0: any free port, announced on the control bus); ``encrypt`` says which data connections
    use CURVE (one of :data:`ENCRYPT_MODES`)."""

    port: int = 0
    encrypt: str = "always"


@dataclass(frozen=True, slots=True)
class SecuritySpec:
    """``[security]``: ``keys`` is the deployment's key directory (``dvla keys new``; resolved
    relative to the topology file), which turns CURVE on for every ``tcp://`` control connection
    and for data connections as ``[data] encrypt`` says. A topology spanning several hosts
    needs keys unless ``insecure = true`` states, loudly, that the network is trusted."""

    keys: str | None = None
    insecure: bool = False


class _SecurityEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    keys: str | None = None
    insecure: bool = False


class _LinksEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host_nic: _Quantity | None = None
    rack_uplink: _Quantity | None = None
    spine: _Quantity | None = None
    host_latency: _Quantity | None = None
    uplink_latency: _Quantity | None = None
    spine_latency: _Quantity | None = None


class _HostTemplate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    count: int = 1
    address: str = "127.0.0.1"
    roles: dict[str, int] = {}
    nic: _Quantity | None = None
    python: dict[str, str] = {}


class _RackEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    count: int = 1
    uplink: _Quantity | None = None
    hosts: _HostTemplate | None = None


class _HostEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    address: str = "127.0.0.1"
    roles: dict[str, int] = {}
    rack: str | None = None
    nic: _Quantity | None = None
    python: dict[str, str] = {}


class _ReplicationEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    source: str | None = None
    fanout: int = 2
    rack_fanout: int | None = None
    chunk: _Quantity = "4MiB"
    checksum: str = "blake2b"


class _DataEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    port: int = 0
    encrypt: str = "always"


class _TopologyFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    hosts: list[_HostEntry] = []
    schema: int = SCHEMA_VERSION
    control: ControlSpec = ControlSpec()
    # Per-role settings shared by every node of that role: [roles.<name>] key = value.
    roles: dict[str, dict[str, Scalar]] = {}
    racks: list[_RackEntry] = []
    links: _LinksEntry = _LinksEntry()
    replication: _ReplicationEntry = _ReplicationEntry()
    data: _DataEntry = _DataEntry()
    security: _SecurityEntry = _SecurityEntry()


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
    """A validated topology. ``file`` is where it came from (for messages). ``hosts`` are in
    file order: the ``[[hosts]]`` tables first, then the hosts generated by ``[[racks]]``
    templates, rack by rack. ``racks`` holds :data:`DEFAULT_RACK` alone when the file declares
    none. Lookups by name are O(1)."""

    file: str
    name: str
    control: ControlSpec
    hosts: tuple[HostSpec, ...]
    role_settings: Mapping[str, Mapping[str, Scalar]]
    racks: tuple[RackSpec, ...] = (RackSpec(DEFAULT_RACK),)
    links: LinkSpec = LinkSpec()
    replication: ReplicationSpec = ReplicationSpec()
    data: DataSpec = DataSpec()
    security: SecuritySpec = SecuritySpec()
    # Where each host / rack came from in the file ("hosts[3]", "racks[1].hosts"), for messages.
    origins: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    _host_index: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)
    _rack_index: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)

    def _lookup(self, name: str) -> HostSpec | None:
        i = self._host_index.get(name)
        if i is not None:
            return self.hosts[i]
        # A Topology built by hand has no index.
        return next((h for h in self.hosts if h.name == name), None)

    def host(self, name: str) -> HostSpec:
        found = self._lookup(name)
        if found is not None:
            return found
        shown = ", ".join(h.name for h in self.hosts[:20])
        more = f", ... ({len(self.hosts)} hosts)" if len(self.hosts) > 20 else ""
        raise TopologyError(self.file, "hosts", f"no host named {name!r} (hosts: {shown}{more})")

    def rack(self, name: str) -> RackSpec:
        i = self._rack_index.get(name)
        if i is not None:
            return self.racks[i]
        for rack in self.racks:
            if rack.name == name:
                return rack
        raise TopologyError(self.file, "racks", f"no rack named {name!r}")

    def rack_hosts(self) -> dict[str, list[str]]:
        """Rack name -> its host names in file order, racks in file order."""
        out: dict[str, list[str]] = {r.name: [] for r in self.racks}
        for h in self.hosts:
            out[h.rack].append(h.name)
        return out

    def placements(self, host: str | None = None) -> list[NodePlacement]:
        """Every node on ``host`` (all hosts if None; none for an unknown host), hub host
        first, then in file order."""
        if host is None:
            hosts: Iterable[HostSpec] = self.hosts
        else:
            hosts = [h for h in (self._lookup(host),) if h is not None]
        out = [
            NodePlacement(role, h.name, i)
            for h in hosts
            for role, count in h.roles.items()
            for i in range(count)
        ]
        out.sort(key=lambda p: p.role != self.control.hosted_by)
        return out

    def hub_placement(self) -> NodePlacement:
        return next(p for p in self.placements() if p.role == self.control.hosted_by)

    def settings(self, role: str) -> Mapping[str, Scalar]:
        return self.role_settings.get(role, {})

    def nic_bps(self, host: str) -> float | None:
        """The host's NIC bandwidth in bytes/s (its own, else ``links.host_nic``)."""
        spec = self.host(host)
        return spec.nic_bps if spec.nic_bps is not None else self.links.host_nic_bps

    def uplink_bps(self, rack: str) -> float | None:
        """The rack's uplink bandwidth in bytes/s (its own, else ``links.rack_uplink``)."""
        spec = self.rack(rack)
        return spec.uplink_bps if spec.uplink_bps is not None else self.links.rack_uplink_bps

    def replication_root(self) -> str:
        """The host of the ``replication.source`` role: where new weights come from."""
        role = self.replication.source
        return next(h.name for h in self.hosts if h.roles.get(role, 0) > 0)

    def interpreter(self, placement: NodePlacement) -> str | None:
        """The Python to start this node with (None: the one running dvla)."""
        return self.host(placement.host).interpreter(placement.role)


# --------------------------------------------------------------------------------------------
# Decoding errors


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
    (re.compile(r"^hosts\[(\d+)\]\.python$"), str),
    (re.compile(r"^racks\[(\d+)\]\.hosts\.roles$"), int),
    (re.compile(r"^racks\[(\d+)\]\.hosts\.python$"), str),
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


# --------------------------------------------------------------------------------------------
# Validation


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_PLACEHOLDER_BODY = re.compile(r"^(?P<var>[rh])(?:\+(?P<offset>\d+))?$")


def _expand(pattern: str, values: Mapping[str, int]) -> str:
    """Replace ``{r}``, ``{h}``, ``{r+1}`` … (already checked by :func:`_check_pattern`)."""

    def sub(m: re.Match[str]) -> str:
        body = _PLACEHOLDER_BODY.match(m.group(1))
        assert body is not None
        return str(values[body.group("var")] + int(body.group("offset") or 0))

    return _PLACEHOLDER.sub(sub, pattern)


class _Checker:
    """One validation pass over a decoded file; ``fail`` makes the error to raise."""

    def __init__(self, raw: _TopologyFile, file: str, known_roles: set[str] | None) -> None:
        self.raw = raw
        self.file = file
        self.known = known_roles

    def fail(self, path: str, problem: str) -> TopologyError:
        return TopologyError(self.file, path, problem)

    def _security(
        self, entry: _SecurityEntry, fail: Callable[[str, str], TopologyError]
    ) -> SecuritySpec:
        keys = entry.keys
        if keys is not None:
            if not keys:
                raise fail("security.keys", "must not be empty (a key directory)")
            path = Path(keys)
            if not path.is_absolute():
                path = (Path(self.file).resolve().parent / path).resolve()
            keys = str(path)
        return SecuritySpec(keys=keys, insecure=entry.insecure)

    def quantity(self, path: str, value: _Quantity, parse: Callable[[_Quantity], float]) -> float:
        try:
            return parse(value)
        except ConfigError as exc:
            raise self.fail(path, str(exc)) from None

    def bandwidth(self, path: str, value: _Quantity | None) -> float | None:
        return None if value is None else self.quantity(path, value, parse_bandwidth)

    def duration(self, path: str, value: _Quantity | None) -> float:
        return 0.0 if value is None else self.quantity(path, value, parse_duration)

    def name(self, path: str, value: str, what: str) -> None:
        if not NAME_RE.match(value):
            raise self.fail(path, f"{what} {value!r} must be 1-48 characters of A-Z a-z 0-9 _ -")

    def pattern(self, path: str, value: str, allowed: str, count_var: str | None) -> None:
        """A name/address template: only ``{r}``/``{h}`` (with ``+N``) from ``allowed``; when
        ``count_var`` is set (count > 1) that variable must appear or all names would clash."""
        used = set()
        for m in _PLACEHOLDER.finditer(value):
            body = _PLACEHOLDER_BODY.match(m.group(1))
            if body is None or body.group("var") not in allowed:
                vars_ = " and ".join(f"{{{v}}}" for v in allowed) or "none"
                raise self.fail(
                    path,
                    f"unknown placeholder {m.group(0)!r} in {value!r} "
                    f"(allowed here: {vars_}, optionally +N as in {{{allowed[0]}+1}})"
                    if allowed
                    else f"no placeholders are allowed here, found {m.group(0)!r}",
                )
            used.add(body.group("var"))
        if count_var is not None and count_var not in used:
            raise self.fail(
                path,
                f"{value!r} must contain {{{count_var}}} (count > 1 would repeat the same name)",
            )

    def roles(self, path: str, roles: Mapping[str, int], python: Mapping[str, str]) -> None:
        for role, count in roles.items():
            if self.known is not None and role not in self.known:
                raise self.fail(
                    f"{path}.roles.{role}",
                    f"unknown role {role!r} (known roles: {', '.join(sorted(self.known))})",
                )
            if count < 0:
                raise self.fail(f"{path}.roles.{role}", f"count must be >= 0, got {count}")
        for role, exe in python.items():
            if role not in roles:
                raise self.fail(
                    f"{path}.python.{role}",
                    f"an interpreter for role {role!r}, which this host does not run "
                    f"(its roles: {', '.join(roles) or 'none'})",
                )
            if not exe.startswith("/"):
                raise self.fail(
                    f"{path}.python.{role}",
                    f"{exe!r}: expected an absolute path to a Python interpreter "
                    "(e.g. '/opt/venv/bin/python'), because it is resolved on that host",
                )

    def run(self) -> Topology:
        raw = self.raw
        fail = self.fail
        if raw.schema != SCHEMA_VERSION:
            raise fail(
                "schema", f"schema {raw.schema} is not supported (this dvla reads {SCHEMA_VERSION})"
            )
        self.name("name", raw.name, "name")

        links = raw.links
        link_spec = LinkSpec(
            host_nic_bps=self.bandwidth("links.host_nic", links.host_nic),
            rack_uplink_bps=self.bandwidth("links.rack_uplink", links.rack_uplink),
            spine_bps=self.bandwidth("links.spine", links.spine),
            host_latency_s=self.duration("links.host_latency", links.host_latency),
            uplink_latency_s=self.duration("links.uplink_latency", links.uplink_latency),
            spine_latency_s=self.duration("links.spine_latency", links.spine_latency),
        )

        # Racks (expanding `count`), then the hosts each rack's template generates.
        racks: list[RackSpec] = []
        rack_origin: dict[str, str] = {}
        generated: list[tuple[str, HostSpec]] = []  # (origin path, host)
        for i, rack_entry in enumerate(raw.racks):
            where = f"racks[{i}]"
            if rack_entry.count < 1:
                raise fail(f"{where}.count", f"must be >= 1, got {rack_entry.count}")
            self.pattern(
                f"{where}.name", rack_entry.name, "r", "r" if rack_entry.count > 1 else None
            )
            uplink = self.bandwidth(f"{where}.uplink", rack_entry.uplink)
            tpl = rack_entry.hosts
            if tpl is not None:
                tw = f"{where}.hosts"
                if tpl.count < 1:
                    raise fail(f"{tw}.count", f"must be >= 1, got {tpl.count}")
                self.pattern(f"{tw}.name", tpl.name, "rh", "h" if tpl.count > 1 else None)
                if rack_entry.count > 1 and "{r" not in tpl.name:
                    raise fail(
                        f"{tw}.name",
                        f"{tpl.name!r} must contain {{r}}: the {rack_entry.count} racks of this "
                        "entry would otherwise generate the same host names",
                    )
                self.pattern(f"{tw}.address", tpl.address, "rh", None)
                self.roles(tw, tpl.roles, tpl.python)
                nic = self.bandwidth(f"{tw}.nic", tpl.nic)
            for r in range(rack_entry.count):
                rack_name = _expand(rack_entry.name, {"r": r})
                self.name(f"{where}.name", rack_name, "rack name")
                if rack_name in rack_origin:
                    raise fail(
                        f"{where}.name",
                        f"duplicate rack {rack_name!r} (also {rack_origin[rack_name]})",
                    )
                rack_origin[rack_name] = where
                racks.append(RackSpec(rack_name, uplink))
                if tpl is None:
                    continue
                for h in range(tpl.count):
                    values = {"r": r, "h": h}
                    generated.append(
                        (
                            f"{where}.hosts",
                            HostSpec(
                                name=_expand(tpl.name, values),
                                address=_expand(tpl.address, values),
                                roles=dict(tpl.roles),
                                rack=rack_name,
                                nic_bps=nic,
                                python=dict(tpl.python),
                            ),
                        )
                    )

        hosts: list[tuple[str, HostSpec]] = []
        for i, host_entry in enumerate(raw.hosts):
            where = f"hosts[{i}]"
            self.name(f"{where}.name", host_entry.name, "host name")
            if not host_entry.address:
                raise fail(f"{where}.address", "must not be empty")
            self.pattern(f"{where}.address", host_entry.address, "", None)
            self.roles(where, host_entry.roles, host_entry.python)
            if host_entry.rack is None:
                if racks:
                    raise fail(
                        f"{where}.rack",
                        "required when [[racks]] are declared "
                        f"(racks: {', '.join(r.name for r in racks[:10])}"
                        f"{', ...' if len(racks) > 10 else ''})",
                    )
                rack = DEFAULT_RACK
            else:
                if host_entry.rack not in rack_origin:
                    declared = ", ".join(r.name for r in racks[:10]) or "none declared"
                    raise fail(
                        f"{where}.rack",
                        f"unknown rack {host_entry.rack!r} (racks: {declared}"
                        f"{', ...' if len(racks) > 10 else ''}; add a [[racks]] table)",
                    )
                rack = host_entry.rack
            hosts.append(
                (
                    where,
                    HostSpec(
                        name=host_entry.name,
                        address=host_entry.address,
                        roles=dict(host_entry.roles),
                        rack=rack,
                        nic_bps=self.bandwidth(f"{where}.nic", host_entry.nic),
                        python=dict(host_entry.python),
                    ),
                )
            )
        hosts.extend(generated)
        if not hosts:
            raise fail("hosts", "at least one [[hosts]] entry (or a [[racks]] hosts template)")
        if not racks:
            racks.append(RackSpec(DEFAULT_RACK))

        host_index: dict[str, int] = {}
        origins: dict[str, str] = {}
        used_racks: set[str] = set()
        for n, (where, host) in enumerate(hosts):
            if host.name in host_index:
                path = f"{where}.name"
                raise fail(
                    path,
                    f"duplicate host {host.name!r} (also {origins[host.name]})"
                    if where.startswith("hosts[")
                    else f"generated host {host.name!r} already exists (from {origins[host.name]})",
                )
            if not where.startswith("hosts["):
                self.name(f"{where}.name", host.name, "generated host name")
            host_index[host.name] = n
            origins[host.name] = where
            used_racks.add(host.rack)
        for i, rack_spec in enumerate(racks):
            if rack_spec.name not in used_racks:
                raise fail(
                    rack_origin.get(rack_spec.name, f"racks[{i}]"),
                    f"rack {rack_spec.name!r} has no hosts (give it a hosts template or set "
                    "rack = ... on some [[hosts]], or remove it)",
                )

        # Roles: settings for known roles that no host lists are a leftover or a typo. A role
        # listed with count 0 is deliberately switched off and may keep its settings.
        listed = {role for _, h in hosts for role in h.roles}
        for role in raw.roles:
            if self.known is not None and role not in self.known:
                raise fail(f"roles.{role}", f"settings for unknown role {role!r}")
            if role not in listed:
                raise fail(
                    f"roles.{role}",
                    f"settings for role {role!r}, but no host runs it (add it to some host's "
                    f"roles, with count 0 to switch it off, or remove [roles.{role}])",
                )

        control = raw.control
        if not control.endpoint.startswith(("tcp://", "ipc://")):
            raise fail(
                "control.endpoint", f"{control.endpoint!r}: expected tcp://HOST:PORT or ipc://PATH"
            )
        if control.endpoint.startswith("ipc://") and len(hosts) > 1:
            raise fail(
                "control.endpoint", "ipc:// reaches one host only; use tcp:// for several hosts"
            )
        if not 0 < control.heartbeat_interval_s < control.heartbeat_timeout_s:
            raise fail(
                "control.heartbeat_timeout_s",
                "need 0 < heartbeat_interval_s < heartbeat_timeout_s, got "
                f"{control.heartbeat_interval_s} and {control.heartbeat_timeout_s}",
            )
        placed = sum(n for _, h in hosts for n in h.roles.values())
        if control.max_nodes is None:
            control = msgspec.structs.replace(control, max_nodes=max(DEFAULT_MAX_NODES, 2 * placed))
        elif control.max_nodes < max(1, placed):
            raise fail(
                "control.max_nodes",
                f"{control.max_nodes} is less than the {placed} nodes the topology places "
                "(the hub would refuse some of them); raise it or leave it out "
                f"(default: {DEFAULT_MAX_NODES} or twice the nodes placed)",
            )
        hubs = sum(h.roles.get(control.hosted_by, 0) for _, h in hosts)
        if hubs != 1:
            raise fail(
                "control.hosted_by",
                f"exactly one node of role {control.hosted_by!r} must host the control hub; "
                f"the hosts place {hubs}",
            )

        rep = raw.replication
        source = rep.source if rep.source is not None else control.hosted_by
        if self.known is not None and source not in self.known:
            raise fail(
                "replication.source",
                f"unknown role {source!r} (known roles: {', '.join(sorted(self.known))})",
            )
        source_hosts = [h.name for _, h in hosts if h.roles.get(source, 0) > 0]
        if len(source_hosts) != 1:
            raise fail(
                "replication.source",
                f"the weights' source role {source!r} must run on exactly one host "
                f"(the tree's root); it runs on {len(source_hosts)}"
                + (f": {', '.join(source_hosts[:5])}" if source_hosts else ""),
            )
        if rep.fanout < 1:
            raise fail("replication.fanout", f"must be >= 1 (1 = a chain), got {rep.fanout}")
        rack_fanout = rep.rack_fanout if rep.rack_fanout is not None else rep.fanout
        if rack_fanout < 1:
            raise fail("replication.rack_fanout", f"must be >= 1, got {rack_fanout}")
        chunk = int(self.quantity("replication.chunk", rep.chunk, parse_size))
        if chunk <= 0:
            raise fail("replication.chunk", f"{rep.chunk!r}: the chunk size must be > 0")
        if rep.checksum not in CHECKSUMS:
            raise fail(
                "replication.checksum",
                f"unknown checksum {rep.checksum!r} (expected one of: {', '.join(CHECKSUMS)})",
            )

        data = raw.data
        if not 0 <= data.port <= 65535:
            raise fail("data.port", f"expected 0 (any free port) or 1-65535, got {data.port}")
        if data.encrypt not in ENCRYPT_MODES:
            raise fail(
                "data.encrypt",
                f"unknown mode {data.encrypt!r} (expected one of: {', '.join(ENCRYPT_MODES)})",
            )

        return Topology(
            file=self.file,
            name=raw.name,
            control=control,
            hosts=tuple(h for _, h in hosts),
            role_settings={k: dict(v) for k, v in raw.roles.items()},
            racks=tuple(racks),
            links=link_spec,
            replication=ReplicationSpec(
                source=source,
                fanout=rep.fanout,
                rack_fanout=rack_fanout,
                chunk_bytes=chunk,
                checksum=rep.checksum,
            ),
            data=DataSpec(port=data.port, encrypt=data.encrypt),
            security=self._security(raw.security, fail),
            origins=MappingProxyType(origins),
            _host_index=MappingProxyType(host_index),
            _rack_index=MappingProxyType({r.name: i for i, r in enumerate(racks)}),
        )


def parse_topology(
    data: Mapping[str, object], file: str, known_roles: Iterable[str] | None = None
) -> Topology:
    """Validate an already-parsed TOML document (``file`` is only used in messages)."""
    try:
        raw = msgspec.convert(data, _TopologyFile, strict=True)
    except msgspec.ValidationError as exc:
        path, problem = _split_msgspec_error(str(exc))
        path = _resolve_table_key(data, path)
        problem = problem.replace("Object", "table")
        if problem.startswith("Expected `int | float | str"):
            problem = "expected a string with a unit, e.g. '25Gbit', '4MiB' or '50us'"
        raise TopologyError(file, path, problem) from None
    known = set(known_roles) if known_roles is not None else None
    return _Checker(raw, file, known).run()


def load_topology(
    path: str | Path,
    known_roles: Iterable[str] | None = None,
    overrides: Mapping[str, Mapping[str, Scalar]] | None = None,
) -> Topology:
    """Read and validate a topology file; raises :class:`TopologyError` naming file and key.

    ``overrides`` (role -> key -> value, e.g. from ``dvla up --minutes``) replace or add
    ``[roles.<role>]`` settings before validation, so they are checked like the file's own."""
    file = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise TopologyError(file, "", f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(file, "", f"not valid TOML: {exc}") from None
    if overrides:
        roles = data.setdefault("roles", {})
        if not isinstance(roles, dict):
            raise TopologyError(file, "roles", "must be a table of role settings")
        for role, settings in overrides.items():
            table = roles.setdefault(role, {})
            if not isinstance(table, dict):
                raise TopologyError(file, f"roles.{role}", "must be a table")
            table.update(settings)
    return parse_topology(data, file, known_roles)
