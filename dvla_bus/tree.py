"""The replication tree: how a new weight version travels from the source host to every host.

Shape (DESIGN.md, *topology-aware replication*): the root (the host of the weights' source role)
→ one **head** host per rack → a ``fanout``-ary tree of hosts inside each rack → the local
readers of each host, which map the host's weight pool and never receive bytes over a socket.

* Inside a rack the hosts form a ``fanout``-ary tree in breadth-first order from the head
  (the root is the head of its own rack; elsewhere the head is the rack's first host in file
  order).
* The racks form a ``rack_fanout``-ary tree, the root's rack at the top, the others in file order.
  The edge into a child rack starts at a host of the parent rack that still has spare
  out-degree (fewer than ``fanout`` children), the shallowest first, so no host feeds more than
  ``fanout`` streams where the rack allows it; only when every host of the rack is full does the
  least-loaded one take an extra child. With ``fanout = 1`` the tree is a chain rack by rack.
* Every non-root rack has exactly one incoming edge from outside it (to its head): **weights cross
  each rack boundary exactly once**.

The result is a frozen value, built in O(hosts + racks), and the same for the same input (the
relays of different hosts compute it independently and must agree).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from dvla_bus.errors import ConfigError
from dvla_bus.topology import Topology

__all__ = ["ReplicationTree", "TreeNode", "build_tree", "replication_tree"]


@dataclass(frozen=True, slots=True)
class TreeNode:
    """One host in the tree. ``parent`` is None for the root; ``crosses_rack`` says whether the
    edge parent → host leaves the parent's rack (only rack heads have such an edge);
    ``children`` in sending order; ``depth`` counts hops from the root (root 0); ``readers`` are
    the nodes on this host that read weights from its pool (no network hop)."""

    host: str
    rack: str
    parent: str | None
    children: tuple[str, ...]
    depth: int
    crosses_rack: bool
    readers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReplicationTree:
    """The tree; ``nodes`` is in topological order (every parent before its children), so a
    single pass over it can accumulate anything along root-to-host paths. ``heads`` maps each
    rack to the host weights enter it through (the root for the root's rack)."""

    root: str
    fanout: int
    rack_fanout: int
    nodes: Mapping[str, TreeNode]
    heads: Mapping[str, str]

    def __len__(self) -> int:
        return len(self.nodes)

    def node(self, host: str) -> TreeNode:
        try:
            return self.nodes[host]
        except KeyError:
            raise ConfigError(f"host {host!r} is not in the replication tree") from None

    @property
    def depth(self) -> int:
        """The longest root-to-host path, in hops."""
        return max(n.depth for n in self.nodes.values())

    def edges(self) -> Iterator[tuple[str, str]]:
        """(parent, child) for every hop, parents before children."""
        for n in self.nodes.values():
            if n.parent is not None:
                yield n.parent, n.host

    def cross_rack_edges(self) -> list[tuple[str, str]]:
        return [(n.parent, n.host) for n in self.nodes.values() if n.parent and n.crosses_rack]

    def path(self, host: str) -> tuple[str, ...]:
        """The hosts from the root to ``host``, both included."""
        out = [host]
        parent = self.node(host).parent
        while parent is not None:
            out.append(parent)
            parent = self.nodes[parent].parent
        return tuple(reversed(out))

    def subtree(self, host: str) -> tuple[str, ...]:
        """``host`` and every host that receives weights through it (breadth-first): what a
        relay's death cuts off until its children find another parent."""
        out = [host]
        i = 0
        while i < len(out):
            out.extend(self.nodes[out[i]].children)
            i += 1
        return tuple(out)


def build_tree(
    racks: Sequence[tuple[str, Sequence[str]]],
    root: str,
    *,
    fanout: int,
    rack_fanout: int,
    readers: Mapping[str, Sequence[str]] | None = None,
) -> ReplicationTree:
    """Build the tree over ``racks`` (rack name, its hosts in order) from ``root``.

    Empty racks are skipped. Raises :class:`ConfigError` if a fan-out is < 1, ``root`` is in no
    rack, or a host appears twice. O(hosts + racks) unless every host of some rack is full,
    which only happens when a rack has more child racks than spare out-degree."""
    if fanout < 1 or rack_fanout < 1:
        raise ConfigError(f"fan-outs must be >= 1, got fanout={fanout} rack_fanout={rack_fanout}")
    rack_of: dict[str, str] = {}
    for rack, hosts in racks:
        for h in hosts:
            if h in rack_of:
                raise ConfigError(f"host {h!r} appears twice (racks {rack_of[h]!r}, {rack!r})")
            rack_of[h] = rack
    if root not in rack_of:
        raise ConfigError(f"the root {root!r} is in no rack")
    root_rack = rack_of[root]

    # Racks in tree order (root's first); each rack's hosts in in-rack order (head first).
    ordered: list[tuple[str, list[str]]] = [
        (root_rack, [root, *(h for h in dict(racks)[root_rack] if h != root)])
    ]
    ordered.extend((r, list(hs)) for r, hs in racks if hs and r != root_rack)

    parent: dict[str, str | None] = {root: None}
    children: dict[str, list[str]] = {h: [] for h in rack_of}
    depth: dict[str, int] = {root: 0}
    heads: dict[str, str] = {}
    topo_order: list[str] = []
    spare_ptr = [0] * len(ordered)  # per rack: first host (in-rack order) that may have spare

    for j, (rack, hosts) in enumerate(ordered):
        head = hosts[0]
        heads[rack] = head
        if j > 0:
            p = (j - 1) // rack_fanout
            p_hosts = ordered[p][1]
            while spare_ptr[p] < len(p_hosts) and len(children[p_hosts[spare_ptr[p]]]) >= fanout:
                spare_ptr[p] += 1
            if spare_ptr[p] < len(p_hosts):
                sender = p_hosts[spare_ptr[p]]
            else:  # every host of the parent rack is full: the least loaded takes one more
                sender = min(p_hosts, key=lambda h: len(children[h]))
            children[sender].append(head)
            parent[head] = sender
            depth[head] = depth[sender] + 1
        topo_order.append(head)
        for i in range(1, len(hosts)):
            up = hosts[(i - 1) // fanout]
            h = hosts[i]
            children[up].append(h)
            parent[h] = up
            depth[h] = depth[up] + 1
            topo_order.append(h)

    # topo_order has every parent before its children: a rack's hosts follow their in-rack
    # parents, and a head's sender lives in a parent rack, which was processed earlier.
    readers = readers or {}
    nodes = {
        h: TreeNode(
            host=h,
            rack=rack_of[h],
            parent=parent[h],
            children=tuple(children[h]),
            depth=depth[h],
            crosses_rack=_crosses(parent[h], h, rack_of),
            readers=tuple(readers.get(h, ())),
        )
        for h in topo_order
    }
    return ReplicationTree(
        root=root,
        fanout=fanout,
        rack_fanout=rack_fanout,
        nodes=MappingProxyType(nodes),
        heads=MappingProxyType(heads),
    )


def _crosses(parent: str | None, host: str, rack_of: Mapping[str, str]) -> bool:
    return parent is not None and rack_of[parent] != rack_of[host]


def replication_tree(
    topology: Topology, *, fanout: int | None = None, rack_fanout: int | None = None
) -> ReplicationTree:
    """The tree a topology's ``[replication]`` settings describe (fan-outs overridable, e.g. by
    the planner trying alternatives). Readers are the nodes each host places, except the
    source-role nodes on the root, which write the weights."""
    rep = topology.replication
    root = topology.replication_root()
    readers: dict[str, list[str]] = {}
    for p in topology.placements():
        if p.host == root and p.role == rep.source:
            continue
        readers.setdefault(p.host, []).append(p.node_id)
    return build_tree(
        list(topology.rack_hosts().items()),
        root,
        fanout=rep.fanout if fanout is None else fanout,
        rack_fanout=rep.rack_fanout if rack_fanout is None else rack_fanout,
        readers=readers,
    )
