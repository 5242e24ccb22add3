"""Topology files: the shipped ones load; every kind of mistake exits 2 naming file and key."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dvla_bus.errors import ConfigError, TopologyError
from dvla_bus.topology import (
    DEFAULT_RACK,
    DataSpec,
    NodePlacement,
    Topology,
    format_bandwidth,
    format_duration,
    format_size,
    load_topology,
    parse_bandwidth,
    parse_duration,
    parse_size,
    parse_topology,
)
from dvla_nodes.inference import InferenceNode
from dvla_nodes.roles import known_roles
from dvla_tools.cli import main as cli_main
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


# --------------------------------------------------------------------------------------------
# Schema v1 extensions: racks, links, replication, data, per-role interpreters, rack templates

RACKS = """
schema = 1
name = "r"
[control]
endpoint = "tcp://10.0.0.1:5555"
[links]
host_nic = "10Gbit"
rack_uplink = "40Gbit"
[replication]
source = "producer"
fanout = 2
chunk = "4MiB"
checksum = "blake2b"
[[racks]]
name = "a"
[[racks]]
name = "b"
uplink = "100Gbit"
[[hosts]]
name = "h0"
rack = "a"
address = "10.0.0.1"
nic = "25Gbit"
roles = { coordinator = 1, producer = 1 }
python = { producer = "/opt/venv/bin/python" }
[[hosts]]
name = "h1"
rack = "b"
address = "10.0.1.1"
roles = { consumer = 1 }
"""

TEMPLATES = """
schema = 1
name = "tpl"
[control]
endpoint = "tcp://10.0.0.1:5555"
[[hosts]]
name = "root"
rack = "r0"
roles = { coordinator = 1 }
[[racks]]
name = "r{r}"
count = 3
hosts = { name = "r{r}h{h}", count = 4, address = "10.0.{r}.{h+1}", roles = { consumer = 1 } }
"""


def _load_text(tmp_path: Path, text: str) -> Topology:
    f = tmp_path / "t.toml"
    f.write_text(text)
    return load_topology(f, known_roles())


def test_racks_links_replication_are_resolved(tmp_path: Path) -> None:
    topo = _load_text(tmp_path, RACKS)
    assert [r.name for r in topo.racks] == ["a", "b"]
    assert topo.host("h0").rack == "a"
    assert topo.nic_bps("h0") == 25e9 / 8  # its own
    assert topo.nic_bps("h1") == 10e9 / 8  # links.host_nic
    assert topo.uplink_bps("a") == 40e9 / 8
    assert topo.uplink_bps("b") == 100e9 / 8
    assert topo.links.spine_bps is None
    rep = topo.replication
    assert (rep.source, rep.fanout, rep.rack_fanout) == ("producer", 2, 2)
    assert rep.chunk_bytes == 4 << 20
    assert topo.replication_root() == "h0"
    assert topo.data == DataSpec(port=0, encrypt="always")
    assert topo.interpreter(NodePlacement("producer", "h0", 0)) == "/opt/venv/bin/python"
    assert topo.interpreter(NodePlacement("coordinator", "h0", 0)) is None
    assert topo.rack_hosts() == {"a": ["h0"], "b": ["h1"]}


def test_a_file_without_the_new_tables_keeps_its_meaning() -> None:
    topo = load_topology(REPO / "topologies" / "demo.toml", known_roles())
    assert [p.node_id for p in topo.placements()] == [
        "coordinator.local.0",
        "producer.local.0",
        "producer.local.1",
        "consumer.local.0",
    ]
    assert [r.name for r in topo.racks] == [DEFAULT_RACK]
    assert topo.host("local").rack == DEFAULT_RACK
    assert topo.replication.source == "coordinator"
    assert topo.replication_root() == "local"


def test_shipped_examples_have_the_promised_shape() -> None:
    two = load_topology(REPO / "topologies" / "two-rack.toml", known_roles())
    assert 4 <= len(two.hosts) <= 8
    assert len(two.racks) == 2
    assert all(h.address.startswith("10.77.") for h in two.hosts)
    large = load_topology(REPO / "topologies" / "large.toml", known_roles())
    assert len(large.racks) == 64
    assert len(large.hosts) == 64 * 64
    assert {len(hs) for hs in large.rack_hosts().values()} == {64}
    assert len({h.address for h in large.hosts}) == len(large.hosts)


def test_rack_templates_expand(tmp_path: Path) -> None:
    topo = _load_text(tmp_path, TEMPLATES)
    assert [r.name for r in topo.racks] == ["r0", "r1", "r2"]
    assert len(topo.hosts) == 13
    assert topo.hosts[0].name == "root"  # [[hosts]] first, then templates rack by rack
    assert topo.host("r2h3").address == "10.0.2.4"
    assert topo.host("r2h3").rack == "r2"
    assert topo.rack_hosts()["r0"] == ["root", "r0h0", "r0h1", "r0h2", "r0h3"]
    assert topo.origins["r1h0"] == "racks[0].hosts"


def test_settings_of_a_switched_off_role_are_allowed(tmp_path: Path) -> None:
    topo = _load_text(
        tmp_path,
        GOOD.replace("producer = 2", "producer = 2, consumer = 0") + "[roles.consumer]\nx = 1\n",
    )
    assert topo.settings("consumer") == {"x": 1}


def _r(old: str, new: str) -> str:
    assert old in RACKS, old
    return RACKS.replace(old, new, 1)


def _t(old: str, new: str) -> str:
    assert old in TEMPLATES, old
    return TEMPLATES.replace(old, new, 1)


BAD_V1: list[tuple[str, str, str]] = [
    ("unknown rack", _r('rack = "b"', 'rack = "c"'), "hosts[1].rack: unknown rack 'c'"),
    ("rack missing", _r('rack = "b"\n', ""), "hosts[1].rack: required when [[racks]]"),
    ("rack without racks", GOOD.replace('name = "h0"', 'name = "h0"\nrack = "x"'), "hosts[0].rack"),
    ("duplicate rack", _r('name = "b"', 'name = "a"'), "racks[1].name: duplicate rack 'a'"),
    ("empty rack", RACKS + '[[racks]]\nname = "c"\n', "racks[2]: rack 'c' has no hosts"),
    ("nic no unit", _r('nic = "25Gbit"', "nic = 25"), "hosts[0].nic: 25 has no unit"),
    ("nic is a size", _r('nic = "25Gbit"', 'nic = "25GB"'), "is a size, not a bandwidth"),
    ("nic unit", _r('nic = "25Gbit"', 'nic = "25Gbits"'), "unknown bandwidth unit 'Gbits'"),
    ("nic not a number", _r('nic = "25Gbit"', 'nic = "fast"'), "hosts[0].nic: 'fast' is not"),
    ("uplink zero", _r('uplink = "100Gbit"', 'uplink = "0Gbit"'), "racks[1].uplink"),
    ("link type", _r('host_nic = "10Gbit"', "host_nic = true"), "links.host_nic: expected a"),
    ("latency", _r("[links]", '[links]\nhost_latency = "5 parsecs"'), "links.host_latency"),
    ("latency < 0", _r("[links]", '[links]\nspine_latency = "-1ms"'), "links.spine_latency"),
    ("unknown link", _r("[links]", '[links]\nbackplane = "1Tbit"'), "backplane"),
    ("fanout 0", _r("fanout = 2", "fanout = 0"), "replication.fanout: must be >= 1"),
    ("rack fanout 0", _r("fanout = 2", "fanout = 2\nrack_fanout = 0"), "replication.rack_fanout"),
    ("chunk 0", _r('chunk = "4MiB"', 'chunk = "0MiB"'), "replication.chunk: '0MiB': the chunk"),
    ("chunk bits", _r('chunk = "4MiB"', 'chunk = "4Mbit"'), "a size is in bytes"),
    ("chunk no unit", _r('chunk = "4MiB"', "chunk = 4194304"), "replication.chunk: 4194304 has"),
    ("chunk fraction", _r('chunk = "4MiB"', 'chunk = "1.5B"'), "not a whole number of bytes"),
    ("checksum", _r('checksum = "blake2b"', 'checksum = "md5"'), "replication.checksum: unknown"),
    ("source nowhere", _r("producer = 1 }", "producer = 0 }"), "replication.source: the weights"),
    (
        "source twice",
        _r("roles = { consumer = 1 }", "roles = { consumer = 1, producer = 1 }"),
        "it runs on 2: h0, h1",
    ),
    ("source unknown", _r('source = "producer"', 'source = "learner"'), "replication.source"),
    ("python relative", _r('"/opt/venv/bin/python"', '"venv/bin/python"'), "absolute path"),
    ("python role", _r("python = { producer", "python = { consumer"), "hosts[0].python.consumer"),
    ("python type", _r('= "/opt/venv/bin/python"', "= 3"), "hosts[0].python.producer"),
    ("settings unplaced", GOOD + "[roles.consumer]\nx = 1\n", "roles.consumer: settings for"),
    ("encrypt", RACKS + '[data]\nencrypt = "sometimes"\n', "data.encrypt: unknown mode"),
    ("port", RACKS + "[data]\nport = 70000\n", "data.port"),
    ("unknown rack key", _r('uplink = "100G', 'uplnk = "100G'), "racks[1]: table contains"),
    ("rack count 0", _t("count = 3", "count = 0"), "racks[0].count: must be >= 1"),
    ("rack name no {r}", _t('name = "r{r}"', 'name = "r"'), "racks[0].name: 'r' must contain {r}"),
    ("host name no {h}", _t('name = "r{r}h{h}"', 'name = "r{r}h"'), "racks[0].hosts.name"),
    ("host name no {r}", _t('name = "r{r}h{h}"', 'name = "h{h}"'), "must contain {r}"),
    ("placeholder", _t('"10.0.{r}.{h+1}"', '"10.0.{x}.1"'), "racks[0].hosts.address: unknown"),
    ("template count", _t("count = 4", "count = 0"), "racks[0].hosts.count: must be >= 1"),
    ("template role", _t("consumer = 1 }", "trainer = 1 }"), "racks[0].hosts.roles.trainer"),
    ("template type", _t("consumer = 1 }", 'consumer = "1" }'), "racks[0].hosts.roles.consumer"),
    (
        "template clash",
        TEMPLATES + '[[hosts]]\nname = "r1h2"\nrack = "r1"\n',
        "racks[0].hosts.name: generated host 'r1h2' already exists (from hosts[1])",
    ),
]


@pytest.mark.parametrize(("case", "text", "expected"), BAD_V1, ids=[b[0] for b in BAD_V1])
def test_v1_mistakes_name_file_and_key(tmp_path: Path, case: str, text: str, expected: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(TopologyError) as err:
        load_topology(f, known_roles())
    message = str(err.value)
    assert message.startswith(f"{f}: "), message
    assert expected in message, message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (_r('rack = "b"', 'rack = "c"'), "hosts[1].rack: unknown rack 'c'"),
        (_r("fanout = 2", "fanout = 0"), "replication.fanout"),
        (_r('nic = "25Gbit"', 'nic = "25GB"'), "hosts[0].nic"),
    ],
)
def test_cli_exits_2_for_v1_mistakes(tmp_path: Path, text: str, expected: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    proc = dvla("topo", "validate", str(f))
    assert proc.returncode == 2, proc.stderr
    assert f"{f}: {expected}" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------
# Units

RATES = [
    ("100Mbit", 100e6 / 8),
    ("10Gbit", 10e9 / 8),
    ("200mbit", 200e6 / 8),
    ("400Gbps", 400e9 / 8),
    ("1.5GB/s", 1.5e9),
    ("800MiB/s", 800 * 2**20),
    ("25 Gbit/s", 25e9 / 8),
    ("1e3Mb/s", 1e9 / 8),
    ("12.8Tbit", 12.8e12 / 8),
]


@pytest.mark.parametrize(("text", "value"), RATES)
def test_parse_bandwidth(text: str, value: float) -> None:
    assert parse_bandwidth(text) == pytest.approx(value)


@pytest.mark.parametrize(
    ("text", "value"),
    [("4MiB", 4 << 20), ("512KiB", 512 << 10), ("1GB", 10**9), ("4096B", 4096), ("1.5KiB", 1536)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    ("text", "value"), [("50us", 50e-6), ("50µs", 50e-6), ("1ms", 1e-3), ("0s", 0.0)]
)
def test_parse_duration(text: str, value: float) -> None:
    assert parse_duration(text) == pytest.approx(value)


@pytest.mark.parametrize(
    ("parse", "text", "expected"),
    [
        (parse_bandwidth, "10", "has no unit"),
        (parse_bandwidth, "10GB", "is a size"),
        (parse_bandwidth, "-1Gbit", "must be > 0"),
        (parse_bandwidth, "inf Gbit", "not a bandwidth"),
        (parse_size, "4Mbit", "in bytes"),
        (parse_size, "4MiB/s", "in bytes"),
        (parse_size, "4 mib", "unknown size unit"),
        (parse_duration, "1 fortnight", "unknown time unit"),
        (parse_duration, "5", "has no unit"),
    ],
)
def test_unit_mistakes(parse: Callable[[str], float], text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse(text)


_BIT_UNITS = ["bit", "kbit", "Mbit", "Gbit", "Tbit", "bps", "Kbps", "Mbps", "Gbps", "mbit"]
_BYTE_RATE_UNITS = ["B/s", "kB/s", "MB/s", "GB/s", "KiB/s", "MiB/s", "GiB/s"]
_numbers = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(number=_numbers, unit=st.sampled_from(_BIT_UNITS + _BYTE_RATE_UNITS))
def test_bandwidth_round_trip(number: float, unit: str) -> None:
    value = parse_bandwidth(f"{number!r}{unit}")
    assert value > 0
    assert parse_bandwidth(format_bandwidth(value, digits=17)) == pytest.approx(value, rel=1e-12)
    # A short form reads back within its rounding.
    assert parse_bandwidth(format_bandwidth(value)) == pytest.approx(value, rel=1e-3)


@given(n_bytes=st.integers(min_value=0, max_value=2**50))
def test_size_round_trip(n_bytes: int) -> None:
    assert parse_size(f"{n_bytes}B") == n_bytes
    text = format_size(n_bytes, digits=17)
    assert parse_size(text) == n_bytes


@given(seconds=st.floats(min_value=0, max_value=1e4, allow_nan=False))
def test_duration_round_trip(seconds: float) -> None:
    back = parse_duration(format_duration(seconds, digits=17))
    assert back == pytest.approx(seconds, rel=1e-12, abs=1e-18)


# --------------------------------------------------------------------------------------------
# dvla topo new / show / render (in-process through the CLI's entry point, one subprocess)


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli_main(["topo", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("compact", [False, True])
def test_new_then_validate_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], compact: bool
) -> None:
    f = tmp_path / "new.toml"
    args = ["new", "-o", str(f), "--name", "n", "--racks", "3", "--hosts-per-rack", "4"]
    args += ["--nic", "25Gbit", "--uplink", "100Gbit", "--spine", "1Tbit", "--latency", "20us"]
    args += ["--fanout", "3", "--chunk", "8MiB", "--checksum", "crc32"]
    code, _, err = _cli(capsys, *args, *(["--compact"] if compact else []))
    assert code == 0, err
    topo = load_topology(f, known_roles())
    assert len(topo.hosts) == 12
    assert [len(hs) for hs in topo.rack_hosts().values()] == [4, 4, 4]
    assert topo.replication_root() == "r0h0"
    assert topo.replication.fanout == 3
    assert topo.replication.chunk_bytes == 8 << 20
    assert topo.nic_bps("r2h3") == 25e9 / 8
    code, out, _ = _cli(capsys, "validate", str(f), "--json")
    assert code == 0
    assert json.loads(out) == {"file": str(f), "ok": True, "hosts": 12, "racks": 3, "nodes": 13}
    # Without --force an existing file is kept.
    code, _, err = _cli(capsys, *args)
    assert code == 2
    assert "exists" in err


def test_new_one_host_is_a_local_job(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "new", "--root-roles", "coordinator=1,producer=2")
    assert code == 0
    topo = parse_topology(tomllib.loads(out), "<stdout>", known_roles())
    assert topo.control.endpoint.startswith("ipc://")
    assert [p.node_id for p in topo.placements()][:1] == ["coordinator.r0h0.0"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--nic", "25"], "--nic: '25' has no unit"),
        (["--chunk", "4Mbit"], "--chunk"),
        (["--racks", "0"], "--racks"),
        (["--roles", "trainer=1"], "unknown role 'trainer'"),
        (["--fanout", "0"], "replication.fanout"),
    ],
)
def test_new_rejects_bad_flags(
    capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    code, _, err = _cli(capsys, "new", "--racks", "2", *flags)
    assert code == 2
    assert expected in err


def test_new_pipes_into_validate(tmp_path: Path) -> None:
    """The real command line: ``dvla topo new > f && dvla topo validate f``."""
    proc = dvla("topo", "new", "--racks", "2", "--hosts-per-rack", "3", "--nic", "10Gbit")
    assert proc.returncode == 0, proc.stderr
    f = tmp_path / "piped.toml"
    f.write_text(proc.stdout)
    check = dvla("topo", "validate", str(f))
    assert check.returncode == 0, check.stderr
    assert "6 host(s), 2 rack(s)" in check.stdout


def test_show_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    f = str(REPO / "topologies" / "two-rack.toml")
    code, out, _ = _cli(capsys, "show", f)
    assert code == 0
    assert "rack r1" in out
    assert "enters rack r2" in out
    code, out, _ = _cli(capsys, "show", f, "--json")
    doc = json.loads(out)
    assert doc["tree"]["root"] == "h0"
    assert [h["name"] for h in doc["hosts"]] == ["h0", "h1", "h2", "h3"]
    assert doc["hosts"][0]["nodes"] == ["coordinator.h0.0", "producer.h0.0"]
    assert sum(n["crosses_rack"] for n in doc["tree"]["nodes"]) == 1


def test_show_large_is_abridged_unless_all(capsys: pytest.CaptureFixture[str]) -> None:
    f = str(REPO / "topologies" / "large.toml")
    code, out, _ = _cli(capsys, "show", f)
    assert code == 0
    assert "--all" in out
    assert len(out.splitlines()) < 300
    code, out, _ = _cli(capsys, "show", f, "--all")
    assert "r63h63" in out


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_render_writes_a_picture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    out_file = tmp_path / f"two{suffix}"
    code, out, err = _cli(
        capsys, "render", str(REPO / "topologies" / "two-rack.toml"), "-o", str(out_file), "--json"
    )
    assert code == 0, err
    assert json.loads(out)["hosts"] == 4
    data = out_file.read_bytes()
    if suffix == ".png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    else:
        assert b"<svg" in data
    assert len(data) > 1000


def test_render_rejects_other_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(
        capsys, "render", str(REPO / "topologies" / "local.toml"), "-o", str(tmp_path / "x.gif")
    )
    assert code == 2
    assert ".svg or .png" in err


def test_readme_examples_are_valid() -> None:
    """The schema reference in topologies/README.md parses (docs do not rot)."""
    text = (REPO / "topologies" / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert len(blocks) == 4
    full = parse_topology(tomllib.loads(blocks[0]), "README.md", known_roles())
    assert full.links.host_latency_s == 50e-6
    head = 'schema = 1\nname = "x"\n[control]\nendpoint = "tcp://a:1"\n'
    head += '[[hosts]]\nname = "root"\nrack = "r1"\nroles = { coordinator = 1 }\n'
    templated = parse_topology(tomllib.loads(head + blocks[1]), "README.md", known_roles())
    assert len(templated.hosts) == 1 + 63 * 64
    # The VRAM replica example: a GPU host of inference nodes sharing one node's slots.
    gpu_head = (
        'schema = 1\nname = "x"\n[security]\ninsecure = true\n[control]\nendpoint = "tcp://c:1"\n'
    )
    gpu_head += '[[hosts]]\nname = "c"\nroles = { coordinator = 1 }\n'
    gpu = parse_topology(tomllib.loads(gpu_head + blocks[2]), "README.md", known_roles())
    assert gpu.settings("inference")["vram_from"] == "inference.{host}.0"
    InferenceNode.check_settings(gpu.settings("inference"))
    one_host = 'schema = 1\nname = "x"\n[[hosts]]\nname = "h"\nroles = { coordinator = 1 }\n'
    secured = parse_topology(tomllib.loads(one_host + blocks[3]), "README.md", known_roles())
    assert secured.security.keys is not None
    assert secured.security.keys.endswith("keys/prod")


def test_large_toml_is_what_new_compact_writes(capsys: pytest.CaptureFixture[str]) -> None:
    """large.toml is `dvla topo new --compact` output with comments and its own addresses: the
    same hosts, racks and roles in the same order (so the same replication tree)."""
    code, out, _ = _cli(
        capsys, "new", "--compact", "--racks", "64", "--hosts-per-rack", "64", "--nic", "100Gbit"
    )
    assert code == 0
    made = parse_topology(tomllib.loads(out), "<new>", known_roles())
    large = load_topology(REPO / "topologies" / "large.toml", known_roles())
    assert [(h.name, h.rack, h.roles) for h in made.hosts] == [
        (h.name, h.rack, h.roles) for h in large.hosts
    ]
