"""The distribution planner: how long a weight version takes to reach every host, from the file.

Given a :class:`~dvla_bus.topology.Topology` and a model size, :func:`plan` predicts the time of
one weight distribution and the bytes it puts on each link class, for three strategies:

``tree``
    The replication tree of :mod:`dvla_bus.tree`, chunks **pipelined** (a relay forwards chunk
    i while it receives chunk i+1).
``flat``
    The root sends the whole model to every other host itself, all streams at once (what a
    hand-written "send to each" or a parameter-server pull does).
``ring``
    A pipelined chain through every host, rack by rack (what a ring broadcast does).

**The model** (units: bytes, seconds, bytes/s). ``W`` = weight bytes, ``C`` = min(chunk, W).
Every link is full-duplex; a host's NIC and a rack's uplink have their bandwidth in each
direction; the spine has an aggregate bandwidth; a missing uplink/spine bandwidth is not a
limit. Only ``efficiency`` (TCP/IP, Ethernet and ZeroMQ framing) of a link carries payload.

1. *Loads.* Every edge of a strategy carries W. A stream through a resource gets an equal share
   of it: ``rate(e) = min over the resources e uses of efficiency * bandwidth / streams``, where
   an edge uses its sender's NIC (out), its receiver's NIC (in) and, when it leaves a rack, the
   two racks' uplinks (out, in) and the spine; also, when the data bus encrypts the edge
   (``[data] encrypt``), the per-connection CURVE ceiling.
2. *Streaming.* The pipeline moves at its slowest edge, and every host verifies every byte with
   the checksum: ``r_b = min(min_e rate(e), checksum rate)``; streaming takes ``(W - C) / r_b``.
3. *Fill.* The last chunk still has to travel down the deepest path: along the critical path
   each hop adds ``C / rate(e) + latency(e) + hop_overhead`` (the latency of a hop inside a rack
   is ``links.host_latency``; across racks ``host + 2 * uplink + spine`` latency), and the last
   host verifies the last chunk, ``C / checksum rate``.

   ``time = (W - C) / r_b + max over root-to-host paths of sum(C / rate(e) + latency(e) +
   hop_overhead) + C / checksum rate``

   For a uniform chain of d hops this is the textbook ``(n_chunks + d - 1) * chunk time``; for
   ``flat`` (one hop, but N - 1 streams through the root's NIC) it is ``(N - 1) W / NIC``.
4. *Bound.* No strategy can beat ``bound_s``: the root must send W, every other host and rack
   must receive W, the spine must carry W for every rack but the root's, every host must hash W.

``pool_bytes_per_host`` is the double-buffered weight pool: two slots of W rounded up to pages.

Cost: O(hosts + racks) per strategy; :func:`plan` also tries a few fan-outs (``best_fanout``),
so 4096 hosts take tens of milliseconds.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any, Final

from dvla_bus.errors import ConfigError, TopologyError
from dvla_bus.topology import Topology
from dvla_bus.tree import ReplicationTree, replication_tree

__all__ = [
    "DTYPE_BYTES",
    "LinkLoad",
    "Plan",
    "PlanModel",
    "StrategyPlan",
    "parse_params",
    "plan",
    "weight_bytes",
]

DTYPE_BYTES: Final[Mapping[str, int]] = MappingProxyType(
    {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
)
PAGE: Final = 4096
# Fan-outs :func:`plan` tries besides the file's, to suggest the fastest tree.
FANOUTS_TRIED: Final = (1, 2, 3, 4, 8)

# Single-core hashing rates in bytes/s. blake2b, sha256 and crc32 measured with hashlib/zlib on
# 64 MiB on the 2-vCPU EPYC dev machine (MEASURED.md's); xxh3/xxh64 are the xxhash package's
# published figures, not measured here. None: no checksum, no limit.
_CHECKSUM_BPS: Final[Mapping[str, float | None]] = MappingProxyType(
    {
        "blake2b": 1.36e9,
        "sha256": 2.0e9,
        "crc32": 4.8e9,
        "xxh3": 10e9,
        "xxh64": 8e9,
        "none": None,
    }
)


@dataclass(frozen=True, slots=True)
class PlanModel:
    """The planner's constants (see the module docstring for where each enters).

    ``efficiency``: payload share of a link; 0.956 = 1.342 s / 1.403 s, the bound without and
    with frame headers in MEASURED.md's netns experiment. ``hop_overhead_s``: what a relay adds
    per hop besides the chunk time (Python receive → forward); ``curve_bps``: the per-connection
    CURVE ceiling (MEASURED.md: 0.57-0.74 GB/s); ``checksum_bps``: hashing rate per algorithm."""

    efficiency: float = 0.956
    hop_overhead_s: float = 1e-3
    curve_bps: float = 0.58e9
    checksum_bps: Mapping[str, float | None] = field(default_factory=lambda: dict(_CHECKSUM_BPS))


@dataclass(frozen=True, slots=True)
class LinkLoad:
    """Bytes one distribution puts on a link class (``host_nic``, ``rack_uplink``, ``spine``).
    ``bytes`` sums over every link of the class and both directions (a hop inside a rack puts W
    on two NICs: the sender's egress and the receiver's ingress); ``max_link_bytes`` is the
    busiest single link in one direction, named by ``busiest``."""

    link_class: str
    bytes: int
    max_link_bytes: int
    busiest: str


@dataclass(frozen=True, slots=True)
class StrategyPlan:
    """The prediction for one strategy; times in seconds, rates in bytes/s."""

    strategy: str
    time_s: float
    stream_s: float
    fill_s: float
    bottleneck: str
    bottleneck_bps: float
    depth: int
    hops: int
    max_streams_per_host: int
    cross_rack_bytes: int
    links: tuple[LinkLoad, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """A whole prediction; :meth:`to_dict` is the ``--json`` document."""

    file: str
    topology: str
    params: int
    dtype: str
    weight_bytes: int
    chunk_bytes: int
    n_chunks: int
    checksum: str
    encrypt: str
    hosts: int
    racks: int
    fanout: int
    rack_fanout: int
    pool_bytes_per_host: int
    bound_s: float
    bound_by: str
    tree: StrategyPlan
    flat: StrategyPlan
    ring: StrategyPlan
    best_fanout: int
    best_fanout_time_s: float
    model: PlanModel

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_PARAMS_RE: Final = re.compile(
    r"^\s*(?P<num>\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+)\s*(?P<suf>[kKMBGT]?)\s*$"
)
_PARAMS_SUFFIX: Final = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_params(text: str) -> int:
    """A parameter count: ``"7e9"``, ``"7B"``, ``"1T"``, ``"125M"`` → int (>= 1)."""
    m = _PARAMS_RE.match(text)
    if m is None:
        raise ConfigError(f"--params {text!r}: expected a count like 7e9, 7B, 1T or 125M")
    n = round(float(m.group("num")) * _PARAMS_SUFFIX[m.group("suf")])
    if n < 1:
        raise ConfigError(f"--params {text!r}: must be at least 1")
    return n


def weight_bytes(params: int, dtype: str) -> int:
    """Bytes of a flat parameter buffer of ``params`` elements of ``dtype``."""
    try:
        return params * DTYPE_BYTES[dtype]
    except KeyError:
        raise ConfigError(
            f"unknown dtype {dtype!r} (expected one of: {', '.join(DTYPE_BYTES)})"
        ) from None


class _Net:
    """Per-host and per-rack bandwidths and latencies, looked up once (O(1) per edge)."""

    def __init__(self, topology: Topology, model: PlanModel) -> None:
        self.topology = topology
        self.model = model
        links = topology.links
        self.rack = {h.name: h.rack for h in topology.hosts}
        self.nic: dict[str, float | None] = {
            h.name: topology.nic_bps(h.name) for h in topology.hosts
        }
        self.uplink: dict[str, float | None] = {
            r.name: topology.uplink_bps(r.name) for r in topology.racks
        }
        self.spine = links.spine_bps
        self.lat_in = links.host_latency_s
        self.lat_cross = links.host_latency_s + 2 * links.uplink_latency_s + links.spine_latency_s
        checksum = topology.replication.checksum
        self.hash_bps = model.checksum_bps.get(checksum)
        self.encrypt = topology.data.encrypt

    def nic_of(self, host: str) -> float:
        bw = self.nic[host]
        if bw is None:
            where = self.topology.origins.get(host, "hosts")
            raise TopologyError(
                self.topology.file,
                "links.host_nic",
                f"the planner needs a NIC bandwidth for host {host!r} ({where}): set "
                "links.host_nic, or nic on the host",
            )
        return bw

    def encrypted(self, cross: bool) -> bool:
        return self.encrypt == "always" or (self.encrypt == "across-racks" and cross)


def _evaluate(
    name: str, edges: Sequence[tuple[str, str]], root: str, net: _Net, *, w: int, chunk: int
) -> StrategyPlan:
    """Apply the module's model to one strategy. ``edges`` (parent, child) must list every
    parent's incoming edge before its outgoing ones (topological order)."""
    eff = net.model.efficiency
    rack = net.rack
    out_load: dict[str, int] = {}
    up_out: dict[str, int] = {}
    up_in: dict[str, int] = {}
    cross_edges = 0
    for u, v in edges:
        out_load[u] = out_load.get(u, 0) + 1
        if rack[u] != rack[v]:
            cross_edges += 1
            up_out[rack[u]] = up_out.get(rack[u], 0) + 1
            up_in[rack[v]] = up_in.get(rack[v], 0) + 1

    c = min(chunk, w)
    inf = math.inf
    best_rate = inf
    best_what = "nothing (one host)"
    arrival: dict[str, float] = {root: 0.0}
    depth: dict[str, int] = {root: 0}
    for u, v in edges:
        # (rate, what) of every resource the edge uses; the slowest sets the edge's rate.
        nic_u = eff * net.nic_of(u) / out_load[u]
        rate, what = nic_u, f"host NIC {u} out ({out_load[u]} stream(s))"
        nic_v = eff * net.nic_of(v)
        if nic_v < rate:
            rate, what = nic_v, f"host NIC {v} in"
        cross = rack[u] != rack[v]
        if cross:
            ru, rv = rack[u], rack[v]
            bu, bv = net.uplink[ru], net.uplink[rv]
            if bu is not None and eff * bu / up_out[ru] < rate:
                rate, what = eff * bu / up_out[ru], f"rack uplink {ru} out ({up_out[ru]} stream(s))"
            if bv is not None and eff * bv / up_in[rv] < rate:
                rate, what = eff * bv / up_in[rv], f"rack uplink {rv} in ({up_in[rv]} stream(s))"
            if net.spine is not None and eff * net.spine / cross_edges < rate:
                rate, what = eff * net.spine / cross_edges, f"spine ({cross_edges} stream(s))"
        if net.encrypted(cross) and net.model.curve_bps < rate:
            rate, what = net.model.curve_bps, f"CURVE encryption ({net.encrypt}), per connection"
        if rate < best_rate:
            best_rate, best_what = rate, what
        latency = net.lat_cross if cross else net.lat_in
        arrival[v] = arrival[u] + c / rate + latency + net.model.hop_overhead_s
        depth[v] = depth[u] + 1

    hash_bps = net.hash_bps
    if hash_bps is not None and hash_bps < best_rate:
        best_rate = hash_bps
        best_what = f"checksum {net.topology.replication.checksum} ({hash_bps / 1e9:g} GB/s a core)"
    verify = c / hash_bps if hash_bps is not None else 0.0
    # One host: nothing moves but the root still hashes W (inf: no checksum either).
    stream = 0.0 if best_rate == inf else (w - c if edges else w) / best_rate
    fill = max(arrival.values()) + (verify if edges else 0.0)

    nic_bytes = 2 * len(edges) * w
    busiest_host = max(out_load, key=out_load.__getitem__, default=root)
    nic_max = max(out_load.get(busiest_host, 0), 1 if edges else 0) * w
    links = [
        LinkLoad(
            "host_nic",
            nic_bytes,
            nic_max,
            f"{busiest_host} out" if out_load else "-",
        )
    ]
    up_all = {
        **{(r, "out"): n for r, n in up_out.items()},
        **{(r, "in"): n for r, n in up_in.items()},
    }
    busiest_up = max(up_all, key=up_all.__getitem__, default=None)
    links.append(
        LinkLoad(
            "rack_uplink",
            2 * cross_edges * w,
            up_all[busiest_up] * w if busiest_up else 0,
            f"{busiest_up[0]} {busiest_up[1]}" if busiest_up else "-",
        )
    )
    links.append(
        LinkLoad("spine", cross_edges * w, cross_edges * w, "spine" if cross_edges else "-")
    )
    return StrategyPlan(
        strategy=name,
        time_s=stream + fill,
        stream_s=stream,
        fill_s=fill,
        bottleneck=best_what,
        bottleneck_bps=best_rate if best_rate != inf else 0.0,
        depth=max(depth.values()),
        hops=len(edges),
        max_streams_per_host=max(out_load.values(), default=0),
        cross_rack_bytes=cross_edges * w,
        links=tuple(links),
    )


def _bound(net: _Net, tree: ReplicationTree, w: int) -> tuple[float, str]:
    """The lower bound any strategy obeys (module docstring, point 4) and what sets it."""
    eff = net.model.efficiency
    candidates: list[tuple[float, str]] = [(0.0, "nothing (one host)")]
    if len(tree) > 1:
        root = tree.root
        candidates.append((w / (eff * net.nic_of(root)), f"host NIC {root} out"))
        slowest = min((h for h in tree.nodes if h != root), key=net.nic_of)
        candidates.append((w / (eff * net.nic_of(slowest)), f"host NIC {slowest} in"))
        other_racks = [r for r in tree.heads if r != net.rack[root]]
        for r in other_racks:
            bw = net.uplink[r]
            if bw is not None:
                candidates.append((w / (eff * bw), f"rack uplink {r} in"))
        root_up = net.uplink[net.rack[root]]
        if root_up is not None and other_racks:
            candidates.append((w / (eff * root_up), f"rack uplink {net.rack[root]} out"))
        if net.spine is not None and other_racks:
            candidates.append(
                (len(other_racks) * w / (eff * net.spine), f"spine ({len(other_racks)} racks)")
            )
    if net.hash_bps is not None:
        candidates.append((w / net.hash_bps, f"checksum {net.topology.replication.checksum}"))
    return max(candidates)


def _ring_edges(tree: ReplicationTree, topology: Topology) -> list[tuple[str, str]]:
    """A chain through every host: the root's rack first (root first), then rack by rack."""
    root_rack = tree.nodes[tree.root].rack
    by_rack = topology.rack_hosts()
    order = [tree.root, *(h for h in by_rack[root_rack] if h != tree.root)]
    for rack, hosts in by_rack.items():
        if rack != root_rack:
            order.extend(hosts)
    return list(itertools.pairwise(order))


def plan(
    topology: Topology,
    params: int,
    dtype: str = "bf16",
    *,
    model: PlanModel | None = None,
    fanout: int | None = None,
    rack_fanout: int | None = None,
) -> Plan:
    """Predict one weight distribution of ``params`` parameters of ``dtype`` over ``topology``
    (fan-outs default to the file's ``[replication]``). Raises :class:`ConfigError` for a bad
    size or dtype and :class:`TopologyError` when a host has no NIC bandwidth. Pure: reads
    nothing but its arguments."""
    if params < 1:
        raise ConfigError(f"params must be >= 1, got {params}")
    model = model or PlanModel()
    w = weight_bytes(params, dtype)
    rep = topology.replication
    chunk = rep.chunk_bytes
    net = _Net(topology, model)
    tree = replication_tree(topology, fanout=fanout, rack_fanout=rack_fanout)
    tree_plan = _evaluate("tree", list(tree.edges()), tree.root, net, w=w, chunk=chunk)
    flat_edges = [(tree.root, h.name) for h in topology.hosts if h.name != tree.root]
    flat_plan = _evaluate("flat", flat_edges, tree.root, net, w=w, chunk=chunk)
    ring_plan = _evaluate("ring", _ring_edges(tree, topology), tree.root, net, w=w, chunk=chunk)
    best = (tree_plan.time_s, tree.fanout)
    for k in FANOUTS_TRIED:
        if k == tree.fanout:
            continue
        alt = replication_tree(topology, fanout=k, rack_fanout=k)
        t = _evaluate("tree", list(alt.edges()), alt.root, net, w=w, chunk=chunk).time_s
        if t < best[0] * (1 - 1e-6):  # the file's fan-out wins ties
            best = (t, k)
    bound, bound_by = _bound(net, tree, w)
    return Plan(
        file=topology.file,
        topology=topology.name,
        params=params,
        dtype=dtype,
        weight_bytes=w,
        chunk_bytes=chunk,
        n_chunks=max(1, math.ceil(w / chunk)),
        checksum=rep.checksum,
        encrypt=topology.data.encrypt,
        hosts=len(topology.hosts),
        racks=len(tree.heads),
        fanout=tree.fanout,
        rack_fanout=tree.rack_fanout,
        pool_bytes_per_host=2 * (-(-w // PAGE) * PAGE),
        bound_s=bound,
        bound_by=bound_by,
        tree=tree_plan,
        flat=flat_plan,
        ring=ring_plan,
        best_fanout=best[1],
        best_fanout_time_s=best[0],
        model=model,
    )
