"""CURVE on both buses: key files, admitted and refused peers (counted, nothing delivered),
and a two-host deployment on loopback whose control and data run encrypted."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import stat
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth

from dvla_bus.control import HubConfig, open_control_client, open_control_hub
from dvla_bus.errors import ConfigError, DeadlineExceeded
from dvla_bus.security import generate_keys, load_credentials
from dvla_bus.sockets import open_context
from dvla_bus.transport import open_inbox, open_outbox
from tests.helpers import dvla, members_by_node, spawn, stop, wait_status


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    generate_keys(directory, ["h0", "h1"])
    return directory


def test_key_files_are_private(keys: Path) -> None:
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for secret in keys.glob("*.key_secret"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    creds = load_credentials(keys, "h0")
    assert len(creds.allowed) == 2  # h0 and h1; never the server's own key
    assert "secret" not in repr(creds).lower() or "allowed" in repr(creds)
    (keys / "h1.key_secret").chmod(0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        load_credentials(keys, "h1")
    with pytest.raises(ConfigError, match="missing"):
        load_credentials(keys, "h9")


def test_cli_keys_new(tmp_path: Path) -> None:
    proc = dvla("keys", "new", str(tmp_path / "k"), "--host", "a", "--host", "b", check=True)
    assert "6 file(s)" in proc.stdout
    assert dvla("keys", "new", str(tmp_path / "k2")).returncode == 2


@pytest.mark.asyncio
async def test_hub_admits_listed_keys_and_refuses_others(keys: Path, tmp_path: Path) -> None:
    good = load_credentials(keys, "h0")
    rogue_dir = tmp_path / "rogue"
    generate_keys(rogue_dir, ["h0"])
    rogue = load_credentials(rogue_dir, "h0")  # a well-formed key the deployment never listed
    async with open_control_hub(HubConfig(endpoint="tcp://127.0.0.1:0", credentials=good)) as hub:
        async with open_control_client(hub.endpoint, credentials=good) as client:
            status = await client.query(timeout=5)
            assert status.epoch == hub.epoch
        # Wrong server key / unlisted client key: the handshake fails, no query gets through.
        forged = dataclasses.replace(
            good, client_public=rogue.client_public, client_secret=rogue.client_secret
        )
        async with open_control_client(hub.endpoint, credentials=forged) as client:
            with pytest.raises(DeadlineExceeded):
                await client.query(timeout=1.0)
        # A plain (unencrypted) client: nothing it sends reaches the hub.
        ctx = zmq.Context()
        try:
            raw = ctx.socket(zmq.DEALER)
            raw.linger = 0
            raw.connect(hub.endpoint)
            raw.send_multipart([b"control", b"\x80"])
            assert not raw.poll(500)
            raw.close()
        finally:
            ctx.destroy(linger=0)
        stats = hub.statistics()
        assert stats["zap.refused"] >= 1
        assert stats["zap.accepted"] >= 1
        assert stats.get("received.query", 0) >= 1
        assert "dropped.not_map" not in stats  # the plain client's junk never arrived


@pytest.mark.asyncio
async def test_encrypted_data_path(keys: Path, tmp_path: Path) -> None:
    h0, h1 = load_credentials(keys, "h0"), load_credentials(keys, "h1")
    rogue_dir = tmp_path / "rogue"
    generate_keys(rogue_dir, ["x"])
    async with (
        open_context(credentials=h0) as rx_ctx,
        open_inbox(
            rx_ctx, name="in", host="h0", bind=["tcp://127.0.0.1:0"], credentials=h0
        ) as inbox,
        open_context(credentials=h1) as tx_ctx,
        open_outbox(tx_ctx, name="out", host="h1", credentials=h1) as outbox,
    ):
        await outbox.connect(inbox.endpoint)
        await outbox.wait_ready(timeout=5)
        await outbox.send({"k": 1}, {"x": np.arange(10)})
        got = await inbox.recv(timeout=5)
        np.testing.assert_array_equal(got.arrays["x"], np.arange(10))
        got.release()
        # An outbox presenting a key the deployment does not list never gets credit.
        bad = load_credentials(rogue_dir, "x")
        forged = dataclasses.replace(
            h1, client_public=bad.client_public, client_secret=bad.client_secret
        )
        async with open_outbox(tx_ctx, name="bad", host="h1", credentials=forged) as intruder:
            await intruder.connect(inbox.endpoint)
            with pytest.raises(DeadlineExceeded):
                await intruder.wait_ready(timeout=1.0)
        assert inbox.counters()["zap.refused"] >= 1
        await asyncio.sleep(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_hosts_on_loopback_run_encrypted(keys: Path, short_tmp: Path) -> None:
    port = _free_port()
    topo = short_tmp / "t.toml"
    topo.write_text(
        f"""schema = 1
name = "sec"
[control]
endpoint = "tcp://127.0.0.1:{port}"
heartbeat_interval_s = 0.2
heartbeat_timeout_s = 2.0
[security]
keys = "{keys}"
[[hosts]]
name = "h0"
roles = {{ coordinator = 1, consumer = 1 }}
[[hosts]]
name = "h1"
roles = {{ producer = 1 }}
[roles.producer]
rate_hz = 50.0
image_px = 8
"""
    )
    endpoint = f"tcp://127.0.0.1:{port}"
    ups = [
        spawn(
            [
                "up",
                str(topo),
                "--host",
                host,
                "--run-dir",
                str(short_tmp / host),
                "--status-every",
                "0",
            ],
            short_tmp / f"{host}.out",
        )
        for host in ("h0", "h1")
    ]
    try:
        h0 = load_credentials(keys, "h0")
        status = wait_status(
            endpoint,
            lambda st: (
                members_by_node(st).get("consumer.h0.0") is not None
                and members_by_node(st)["consumer.h0.0"].counters.get("received", 0) > 10
            ),
            what="data flowing from h1 to h0 over encrypted tcp",
            credentials=h0,
        )
        consumer = members_by_node(status)["consumer.h0.0"]
        assert consumer.counters["via_shm"] == 0  # another host: frames over tcp
        assert consumer.counters["zap.accepted"] >= 1
        assert status.counters["zap.accepted"] >= 3  # every node joined with its host key
    finally:
        for up in ups:
            stop(up)


def test_multi_host_topology_without_keys_is_refused(short_tmp: Path) -> None:
    topo = short_tmp / "t.toml"
    topo.write_text(
        """schema = 1
name = "nokeys"
[control]
endpoint = "tcp://127.0.0.1:9"
[[hosts]]
name = "h0"
roles = { coordinator = 1 }
[[hosts]]
name = "h1"
roles = { producer = 1 }
"""
    )
    proc = dvla("up", str(topo), "--host", "h0", "--run-dir", str(short_tmp / "r"))
    assert proc.returncode == 2
    assert "security.keys" in proc.stderr
    assert "dvla keys new" in proc.stderr
