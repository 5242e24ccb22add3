"""The command line: help everywhere, aliases, clear errors for unknown roles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dvla_nodes.roles import known_roles
from tests.helpers import REPO, dvla

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("up",),
        ("node",),
        ("node", "start"),
        ("node", "roles"),
        ("topo",),
        ("topo", "show"),
        ("bus",),
        ("bus", "list"),
        ("bench",),
    ],
)
def test_help_everywhere(args: tuple[str, ...]) -> None:
    proc = dvla(*args, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


@pytest.mark.parametrize(
    ("alias", "group"), [("dvla-node", "node"), ("dvla-topo", "topo"), ("dvla-bus", "bus")]
)
def test_console_script_aliases(alias: str, group: str) -> None:
    exe = BIN / alias
    assert exe.exists(), f"{alias} is not installed next to {sys.executable}"
    proc = subprocess.run(
        [str(exe), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0
    assert f"dvla {group}" in proc.stdout


def test_unknown_role_exits_2_listing_known_roles() -> None:
    proc = dvla(
        "node",
        "start",
        "--role",
        "wizard",
        "--topology",
        "topologies/local.toml",
        "--host",
        "local",
    )
    assert proc.returncode == 2
    assert "unknown role 'wizard'" in proc.stderr
    for role in known_roles():
        assert role in proc.stderr


def test_unknown_host_exits_2() -> None:
    proc = dvla(
        "node", "start", "--role", "producer", "--topology", "topologies/local.toml", "--host", "x"
    )
    assert proc.returncode == 2
    assert "no host named 'x'" in proc.stderr


def test_roles_lists_every_role() -> None:
    proc = dvla("node", "roles", check=True)
    for role in known_roles():
        assert role in proc.stdout


def test_topo_show_json() -> None:
    import json

    proc = dvla("topo", "show", "--json", str(REPO / "topologies" / "local.toml"), check=True)
    doc = json.loads(proc.stdout)
    assert doc["hosts"][0]["nodes"][0] == "coordinator.local.0"
