"""Topology files: the shipped ones load; every kind of mistake exits 2 naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dvla_bus.errors import TopologyError
from dvla_bus.topology import load_topology
from dvla_nodes.roles import known_roles
from tests.helpers import REPO, dvla

GOOD = """
schema = 1
name = "t"
[control]
endpoint = "ipc://{run_dir}/c.sock"
[[hosts]]
name = "h0"
roles = { coordinator = 1, producer = 2 }
[roles.producer]
rate_hz = 10.0
"""


def test_shipped_topologies_load() -> None:
    files = sorted((REPO / "topologies").glob("*.toml"))
    assert files
    for f in files:
        topo = load_topology(f, known_roles())
        assert topo.placements()


def test_placements_put_the_hub_first(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text(GOOD.replace("coordinator = 1, producer = 2", "producer = 2, coordinator = 1"))
    topo = load_topology(f, known_roles())
    assert [p.node_id for p in topo.placements()] == [
        "coordinator.h0.0",
        "producer.h0.0",
        "producer.h0.1",
    ]
    assert topo.settings("producer") == {"rate_hz": 10.0}


BAD: list[tuple[str, str, str]] = [
    ("not toml", "name = ", "not valid TOML"),
    ("missing name", GOOD.replace('name = "t"', ""), "missing required field `name`"),
    ("wrong type", GOOD.replace("producer = 2", 'producer = "two"'), "hosts[0].roles.producer"),
    ("unknown key", GOOD.replace('name = "h0"', 'name = "h0"\nadress = "x"'), "adress"),
    ("unknown role", GOOD.replace("producer = 2", "trainer = 2"), "hosts[0].roles.trainer"),
    ("negative count", GOOD.replace("producer = 2", "producer = -1"), "hosts[0].roles.producer"),
    (
        "duplicate host",
        GOOD + '[[hosts]]\nname = "h0"\nroles = {}\n',
        "hosts[1].name: duplicate host 'h0'",
    ),
    ("bad host name", GOOD.replace('name = "h0"', 'name = "h 0"'), "hosts[0].name"),
    ("no hub", GOOD.replace("coordinator = 1, ", ""), "control.hosted_by"),
    ("two hubs", GOOD.replace("coordinator = 1", "coordinator = 2"), "control.hosted_by"),
    ("bad endpoint", GOOD.replace("ipc://{run_dir}/c.sock", "udp://x"), "control.endpoint"),
    (
        "ipc across hosts",
        GOOD + '[[hosts]]\nname = "h1"\nroles = { producer = 1 }\n',
        "control.endpoint: ipc:// reaches one host only",
    ),
    (
        "heartbeat",
        GOOD.replace("[control]", "[control]\nheartbeat_timeout_s = 0.1"),
        "control.heartbeat_timeout_s",
    ),
    ("unknown role settings", GOOD + "[roles.nobody]\nx = 1\n", "roles.nobody"),
    ("schema", GOOD.replace("schema = 1", "schema = 7"), "schema 7 is not supported"),
    ("no hosts", 'schema = 1\nname = "t"\nhosts = []\n', "hosts: at least one"),
]


@pytest.mark.parametrize(("case", "text", "expected"), BAD, ids=[b[0] for b in BAD])
def test_mistakes_name_file_and_key(tmp_path: Path, case: str, text: str, expected: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(TopologyError) as err:
        load_topology(f, known_roles())
    message = str(err.value)
    assert message.startswith(str(f)), message
    assert expected in message, message


def test_cli_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(GOOD.replace("producer = 2", 'producer = "two"'))
    for args in (("topo", "validate", str(f)), ("up", str(f))):
        proc = dvla(*args)
        assert proc.returncode == 2, proc.stderr
        assert str(f) in proc.stderr
        assert "hosts[0].roles.producer" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_missing_file_exits_2(tmp_path: Path) -> None:
    proc = dvla("topo", "validate", str(tmp_path / "nope.toml"))
    assert proc.returncode == 2
    assert "nope.toml" in proc.stderr
