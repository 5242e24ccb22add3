"""The replication tree: every host reached exactly once, every rack entered exactly once, depth
within the bound a k-ary tree promises, out-degree within the fan-out where the rack allows."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvla_bus.errors import ConfigError
from dvla_bus.topology import load_topology
from dvla_bus.tree import ReplicationTree, build_tree, replication_tree
from dvla_nodes.roles import known_roles
from tests.helpers import REPO


def _kary_depth(n: int, k: int) -> int:
    """Depth of a breadth-first k-ary tree of n nodes."""
    if k == 1:
        return n - 1
    depth, capacity, level = 0, 1, 1
    while capacity < n:
        level *= k
        capacity += level
        depth += 1
    return depth


def check_invariants(tree: ReplicationTree, racks: list[tuple[str, list[str]]]) -> None:
    hosts = [h for _, hs in racks for h in hs]
    rack_of = {h: r for r, hs in racks for h in hs}
    nonempty = [r for r, hs in racks if hs]
    # Every host exactly once; parents listed before children.
    assert sorted(tree.nodes) == sorted(hosts)
    seen: set[str] = set()
    for n in tree.nodes.values():
        assert n.rack == rack_of[n.host]
        if n.parent is None:
            assert n.host == tree.root
            assert n.depth == 0
        else:
            assert n.parent in seen
            parent = tree.nodes[n.parent]
            assert n.host in parent.children
            assert n.depth == parent.depth + 1
            assert n.crosses_rack == (parent.rack != n.rack)
        seen.add(n.host)
    children = [c for n in tree.nodes.values() for c in n.children]
    assert Counter(children) == Counter(h for h in hosts if h != tree.root)
    # Each rack is entered exactly once (through its head), the root's rack never.
    entered = Counter(tree.nodes[v].rack for _, v in tree.cross_rack_edges())
    root_rack = rack_of[tree.root]
    assert entered == Counter(r for r in nonempty if r != root_rack)
    assert set(tree.heads) == set(nonempty)
    for rack, head in tree.heads.items():
        node = tree.nodes[head]
        assert node.crosses_rack == (rack != root_rack)
        assert rack_of[head] == rack
    assert tree.heads[root_rack] == tree.root
    # Depth: racks form a rack_fanout-ary tree, each hop between racks leaves from some host of
    # the parent rack (at most its in-rack depth) — so a k-ary bound per level.
    in_rack = max(_kary_depth(len(hs), tree.fanout) for _, hs in racks if hs)
    rack_levels = _kary_depth(len(nonempty), tree.rack_fanout)
    assert tree.depth <= rack_levels * (in_rack + 1) + in_rack
    assert len(list(tree.edges())) == len(hosts) - 1


@st.composite
def rack_layouts(draw: st.DrawFn) -> tuple[list[tuple[str, list[str]]], str, int, int]:
    sizes = draw(st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=9))
    if not any(sizes):
        sizes[0] = 1
    racks = [(f"r{i}", [f"r{i}h{j}" for j in range(n)]) for i, n in enumerate(sizes)]
    hosts = [h for _, hs in racks for h in hs]
    root = draw(st.sampled_from(hosts))
    fanout = draw(st.integers(min_value=1, max_value=5))
    rack_fanout = draw(st.integers(min_value=1, max_value=5))
    return racks, root, fanout, rack_fanout


@settings(max_examples=150, deadline=None)
@given(rack_layouts())
def test_tree_invariants_on_random_layouts(
    layout: tuple[list[tuple[str, list[str]]], str, int, int],
) -> None:
    racks, root, fanout, rack_fanout = layout
    tree = build_tree(racks, root, fanout=fanout, rack_fanout=rack_fanout)
    check_invariants(tree, racks)
    # Out-degree stays within the fan-out wherever the rack has spare slots for its child racks
    # (a rack of n hosts has n * (fanout - 1) + 1 of them).
    child_racks = Counter(tree.nodes[u].rack for u, _ in tree.cross_rack_edges())
    for rack, hosts in racks:
        if hosts and child_racks[rack] <= len(hosts) * (fanout - 1) + 1:
            assert all(len(tree.nodes[h].children) <= fanout for h in hosts)
    # Deterministic: relays on different hosts compute the same tree.
    assert build_tree(racks, root, fanout=fanout, rack_fanout=rack_fanout) == tree


def test_fanout_one_is_a_chain_rack_by_rack() -> None:
    racks = [("a", ["a0", "a1"]), ("b", ["b0", "b1"]), ("c", ["c0"])]
    tree = build_tree(racks, "a0", fanout=1, rack_fanout=1)
    assert tree.path("c0") == ("a0", "a1", "b0", "b1", "c0")
    assert tree.cross_rack_edges() == [("a1", "b0"), ("b1", "c0")]
    assert tree.depth == 4


def test_root_in_the_middle_of_its_rack_is_its_head() -> None:
    racks = [("a", ["a0", "a1", "a2"]), ("b", ["b0", "b1", "b2"])]
    tree = build_tree(racks, "a1", fanout=2, rack_fanout=2)
    assert tree.heads == {"a": "a1", "b": "b0"}
    assert tree.nodes["a1"].children == ("a0", "a2")
    # The root is full, so a leaf of its rack feeds the other rack.
    assert tree.cross_rack_edges() == [("a0", "b0")]
    assert tree.subtree("a0") == ("a0", "b0", "b1", "b2")


def test_large_topology_tree() -> None:
    topo = load_topology(REPO / "topologies" / "large.toml", known_roles())
    tree = replication_tree(topo)
    racks = list(topo.rack_hosts().items())
    check_invariants(tree, racks)
    assert len(tree.cross_rack_edges()) == 63
    assert max(len(n.children) for n in tree.nodes.values()) <= topo.replication.fanout
    # 64 racks in a binary tree: 6 rack levels; 64 hosts in a binary tree: depth 6.
    assert tree.depth <= 6 * 7 + 6


def test_readers_are_the_hosts_nodes_but_the_source() -> None:
    topo = load_topology(REPO / "topologies" / "two-rack.toml", known_roles())
    tree = replication_tree(topo)
    assert tree.root == "h0"
    assert tree.nodes["h0"].readers == ("coordinator.h0.0",)
    assert tree.nodes["h3"].readers == ("consumer.h3.0",)
    assert replication_tree(topo, fanout=1, rack_fanout=1).path("h3") == ("h0", "h1", "h2", "h3")


def test_one_host() -> None:
    topo = load_topology(REPO / "topologies" / "demo.toml", known_roles())
    tree = replication_tree(topo)
    assert tree.depth == 0
    assert list(tree.edges()) == []
    # The source (here the hub's role, the default) writes the pool; the others read it.
    assert tree.nodes["local"].readers == (
        "producer.local.0",
        "producer.local.1",
        "consumer.local.0",
    )


@pytest.mark.parametrize(
    ("root", "fanout", "rack_fanout", "expected"),
    [
        ("a0", 0, 1, "fan-outs must be >= 1"),
        ("a0", 1, 0, "fan-outs must be >= 1"),
        ("zz", 1, 1, "in no rack"),
    ],
)
def test_bad_arguments(root: str, fanout: int, rack_fanout: int, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        build_tree([("a", ["a0"])], root, fanout=fanout, rack_fanout=rack_fanout)


def test_duplicate_host_and_unknown_node() -> None:
    with pytest.raises(ConfigError, match="appears twice"):
        build_tree([("a", ["x"]), ("b", ["x"])], "x", fanout=1, rack_fanout=1)
    tree = build_tree([("a", ["x"])], "x", fanout=1, rack_fanout=1)
    with pytest.raises(ConfigError, match="not in the replication tree"):
        tree.node("y")
