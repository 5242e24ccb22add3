"""``dvla launch ray`` on a real two-node Ray cluster started by the test (two ``ray start``
daemons on this machine, the second with its own node address 127.0.0.2): the coordinator and
producer land on one Ray node, the consumer on the other, and data flows between them over
dvla's data bus. Skipped when Ray is not installed (``pip install ray``)."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import members_by_node, spawn, stop, wait_for, wait_status

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="Ray is not installed (pip install 'dvla[ray]' or pip install ray)",
)

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill_ray(temp_dir: Path) -> None:
    """Kill exactly the Ray processes of this test's cluster (their command lines name its temp
    dir) and their children (workers, agents, the dvla processes they started)."""
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        if any(str(temp_dir) in arg for arg in p.info["cmdline"] or ()):
            roots.append(p)
    procs = set(roots)
    for p in roots:
        try:
            procs.update(p.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(list(procs), timeout=10)


@pytest.fixture
def ray_cluster(short_tmp: Path) -> Iterator[str]:
    temp = short_tmp / "ray"
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run(
            [
                RAY,
                "start",
                "--head",
                f"--port={port}",
                "--node-ip-address=127.0.0.1",
                '--resources={"dvla-host-a": 1}',
                f"--temp-dir={temp}",
                "--include-dashboard=false",
                *common,
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        subprocess.run(
            [
                RAY,
                "start",
                f"--address=127.0.0.1:{port}",
                "--node-ip-address=127.0.0.2",
                *common,
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield f"127.0.0.1:{port}"
    finally:
        _kill_ray(temp)


@pytest.mark.timeout(110)
def test_launch_ray_two_nodes(ray_cluster: str, short_tmp: Path) -> None:
    control_port = _free_port()
    topo = short_tmp / "ray.toml"
    topo.write_text(
        f"""schema = 1
name = "rayt"
[control]
endpoint = "tcp://127.0.0.1:{control_port}"
heartbeat_interval_s = 0.2
heartbeat_timeout_s = 2.0
[[hosts]]
name = "a"
address = "127.0.0.1"
roles = {{ coordinator = 1, producer = 1 }}
[[hosts]]
name = "b"
address = "127.0.0.2"
roles = {{ consumer = 1 }}
[roles.producer]
rate_hz = 50.0
image_px = 16
[security]
insecure = true  # loopback only
"""
    )
    log = short_tmp / "launch.log"
    # Host a is placed by its custom resource; b takes the one node left (127.0.0.2).
    proc = spawn(
        [
            "launch",
            "ray",
            str(topo),
            "--address",
            ray_cluster,
            "--run-dir",
            str(short_tmp / "run"),
            "--grace",
            "5",
        ],
        log,
        env={"RAY_USAGE_STATS_ENABLED": "0"},
    )
    try:
        wait_for(
            lambda: log.read_text().count("dvla up pid") == 2,
            timeout=60,
            what=f"both hosts started (log: {log})",
        )
        text = log.read_text()
        endpoint = re.search(r"control hub (tcp://\S+)", text)
        assert endpoint is not None, text
        assert endpoint.group(1).endswith(f":{control_port}")
        started = re.findall(r"host (\w+): dvla up pid \d+ on Ray node (\w+) \(([\d.]+)\)", text)
        hosts = {h: (node, addr) for h, node, addr in started}
        assert set(hosts) == {"a", "b"}
        assert hosts["a"][0] != hosts["b"][0], "both hosts on one Ray node"
        assert hosts["b"][1] == "127.0.0.2"

        def flowing(st: object) -> bool:
            members = members_by_node(st)
            consumer = members.get("consumer.b.0")
            return (
                {"coordinator.a.0", "producer.a.0", "consumer.b.0"} <= set(members)
                and consumer is not None
                and consumer.counters.get("received", 0) > 0
            )

        status = wait_status(endpoint.group(1), flowing, timeout=40, what="data from a to b")
        members = members_by_node(status)
        assert members["consumer.b.0"].host == "b"
        assert members["producer.a.0"].state != "dead"
    finally:
        code = stop(proc, timeout=30)
    assert code == 0, log.read_text()
    assert "stopped (a=" in log.read_text()
