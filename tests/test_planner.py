"""The planner: sane against the bound and the alternatives, linear in bytes, fast at 1T params x
4096 hosts, and its ``--json`` is a well-formed document."""

from __future__ import annotations

import json
import math
import time
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvla_bus.errors import ConfigError, TopologyError
from dvla_bus.planner import PlanModel, parse_params, plan, weight_bytes
from dvla_bus.topology import Topology, load_topology, parse_topology
from dvla_nodes.roles import known_roles
from dvla_tools.cli import main as cli_main
from tests.helpers import REPO, dvla

TOPOLOGIES = REPO / "topologies"


def _load(name: str) -> Topology:
    return load_topology(TOPOLOGIES / name, known_roles())


def _uniform(racks: int, per: int, fanout: int, nic: str = "1Gbit") -> Topology:
    """``racks`` x ``per`` hosts, every link ``nic``, no checksum, no encryption."""
    doc = f"""
schema = 1
name = "u"
[control]
endpoint = "tcp://10.0.0.1:1"
[links]
host_nic = "{nic}"
rack_uplink = "{nic}"
[replication]
fanout = {fanout}
chunk = "1MiB"
checksum = "none"
[data]
encrypt = "never"
[[hosts]]
name = "root"
rack = "r0"
roles = {{ coordinator = 1 }}
[[racks]]
name = "r{{r}}"
count = {racks}
hosts = {{ name = "r{{r}}h{{h}}", count = {per} }}
"""
    return parse_topology(tomllib.loads(doc), "<uniform>", known_roles())


def test_two_rack_numbers_follow_the_model() -> None:
    topo = _load("two-rack.toml")
    w = 32 << 20
    p = plan(topo, w // 4, "fp32")
    assert p.weight_bytes == w
    assert p.pool_bytes_per_host == 2 * w
    # The 200 Mbit uplinks bound everything: W / (efficiency * 25 MB/s).
    uplink = PlanModel().efficiency * 200e6 / 8
    assert p.bound_s == pytest.approx(w / uplink)
    assert p.tree.bottleneck.startswith("rack uplink")
    # The flat send pushes two copies through r1's uplink: twice the time.
    assert p.flat.time_s / p.tree.time_s == pytest.approx(2.0, rel=0.06)
    assert p.bound_s <= p.tree.time_s <= 1.05 * p.bound_s
    assert p.tree.cross_rack_bytes == w  # r2 entered once
    assert p.flat.cross_rack_bytes == 2 * w
    links = {ll.link_class: ll for ll in p.tree.links}
    assert links["host_nic"].bytes == 2 * 3 * w  # three hops, egress + ingress
    assert links["spine"].bytes == w


def test_chain_matches_the_textbook_pipeline() -> None:
    """A uniform chain of d hops: (n_chunks + d - 1) chunk times, plus per-hop overhead."""
    topo = _uniform(racks=1, per=4, fanout=1)
    model = PlanModel(hop_overhead_s=0.0)
    p = plan(topo, 64 << 20, "fp8", model=model)
    rate = model.efficiency * 1e9 / 8
    chunk_time = (1 << 20) / rate
    assert p.tree.depth == 4
    assert p.tree.time_s == pytest.approx((64 + 4 - 1) * chunk_time)
    assert p.ring.time_s == pytest.approx(p.tree.time_s)


def test_time_scales_with_bytes() -> None:
    topo = _load("two-rack.toml")
    small = plan(topo, 10**9, "bf16")
    big = plan(topo, 10**10, "bf16")
    assert big.tree.stream_s / small.tree.stream_s == pytest.approx(10.0, rel=0.01)
    assert big.tree.fill_s == pytest.approx(small.tree.fill_s)
    assert (
        plan(topo, 10**9, "fp32").tree.time_s
        > small.tree.time_s
        > plan(topo, 10**9, "fp8").tree.time_s
    )


@settings(max_examples=40, deadline=None)
@given(
    racks=st.integers(min_value=1, max_value=6),
    per=st.integers(min_value=1, max_value=8),
    fanout=st.integers(min_value=1, max_value=4),
    params=st.integers(min_value=1, max_value=10**10),
)
def test_bound_holds_and_pipelining_beats_flat(
    racks: int, per: int, fanout: int, params: int
) -> None:
    topo = _uniform(racks, per, fanout)
    p = plan(topo, params, "bf16")
    for s in (p.tree, p.flat, p.ring):
        assert s.time_s >= p.bound_s * (1 - 1e-9)
        assert math.isfinite(s.time_s)
    # With many chunks per host (bandwidth-bound), a tree of fan-out k needs about k / (N-1) of
    # the flat send's time.
    if p.n_chunks >= 64 * len(topo.hosts):
        assert p.tree.time_s <= p.flat.time_s
    assert p.tree.cross_rack_bytes == (racks - 1) * p.weight_bytes


def test_one_trillion_params_on_4096_hosts_in_well_under_a_second() -> None:
    topo = _load("large.toml")
    start = time.perf_counter()
    p = plan(topo, 10**12, "bf16")
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0  # typically ~0.1 s; generous so a loaded CI machine does not flake
    assert p.hosts == 4096
    assert p.tree.cross_rack_bytes == 63 * 2 * 10**12  # each of the 63 other racks once
    assert p.flat.cross_rack_bytes == 63 * 64 * 2 * 10**12
    assert p.tree.time_s < p.flat.time_s
    assert p.best_fanout_time_s <= p.tree.time_s
    assert p.pool_bytes_per_host >= 4 * 10**12


def test_encryption_and_checksum_can_be_the_bottleneck() -> None:
    topo = _uniform(2, 2, 1, nic="100Gbit")
    assert topo.data.encrypt == "never"
    fast = plan(topo, 10**10, "bf16")
    assert fast.tree.bottleneck.startswith("host NIC")
    slow = plan(topo, 10**10, "bf16", model=PlanModel(checksum_bps={"none": 1e9}))
    assert slow.tree.bottleneck.startswith("checksum")
    curve = _load("two-rack.toml")
    assert curve.data.encrypt == "across-racks"
    capped = plan(curve, 10**9, "bf16", model=PlanModel(curve_bps=1e6))
    assert "CURVE" in capped.tree.bottleneck


def test_a_missing_nic_bandwidth_is_named(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text(
        'schema = 1\nname = "t"\n[control]\nendpoint = "tcp://a:1"\n'
        '[[hosts]]\nname = "a"\nroles = { coordinator = 1 }\n[[hosts]]\nname = "b"\n'
    )
    with pytest.raises(TopologyError, match=r"links\.host_nic: the planner needs a NIC"):
        plan(load_topology(f, known_roles()), 10**9)
    # One host moves nothing over a network: no NIC needed.
    assert plan(_load("local.toml"), 10**9).tree.hops == 0


@pytest.mark.parametrize(
    ("text", "value"),
    [("7e9", 7 * 10**9), ("7B", 7 * 10**9), ("1T", 10**12), ("125M", 125 * 10**6)],
)
def test_parse_params(text: str, value: int) -> None:
    assert parse_params(text) == value


@pytest.mark.parametrize("text", ["seven", "0", "7X", "-1"])
def test_parse_params_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="--params"):
        parse_params(text)


def test_weight_bytes() -> None:
    assert weight_bytes(10, "fp32") == 40
    assert weight_bytes(10, "fp8") == 10
    with pytest.raises(ConfigError, match="unknown dtype"):
        weight_bytes(10, "int3")


def test_plan_json_is_well_formed(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["topo", "plan", str(TOPOLOGIES / "large.toml"), "--params", "1e12", "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["params"] == 10**12
    assert doc["dtype"] == "bf16"
    for name in ("tree", "flat", "ring"):
        s = doc[name]
        assert s["time_s"] > 0
        assert {ll["link_class"] for ll in s["links"]} == {"host_nic", "rack_uplink", "spine"}
    assert doc["tree"]["cross_rack_bytes"] == 63 * doc["weight_bytes"]
    assert doc["model"]["checksum_bps"]["none"] is None


def test_plan_text_and_errors_through_the_real_cli() -> None:
    proc = dvla("topo", "plan", str(TOPOLOGIES / "two-rack.toml"), "--params", "7e9")
    assert proc.returncode == 0, proc.stderr
    assert "lower bound" in proc.stdout
    assert "tree" in proc.stdout
    bad = dvla("topo", "plan", str(TOPOLOGIES / "two-rack.toml"), "--params", "lots")
    assert bad.returncode == 2
    assert "--params 'lots'" in bad.stderr


def test_hop_overhead_flag(capsys: pytest.CaptureFixture[str]) -> None:
    f = str(TOPOLOGIES / "two-rack.toml")
    fill = []
    for overhead in ("0s", "100ms"):
        code = cli_main(["topo", "plan", f, "--params", "1M", "--hop-overhead", overhead, "--json"])
        assert code == 0
        fill.append(json.loads(capsys.readouterr().out)["tree"]["fill_s"])
    assert fill[1] - fill[0] == pytest.approx(2 * 0.1)  # depth 2
    assert cli_main(["topo", "plan", f, "--params", "1M", "--hop-overhead", "soon"]) == 2
    assert "--hop-overhead" in capsys.readouterr().err
