"""Hostile input at the control hub's endpoint, sent with raw pyzmq + msgpack (not our code):
every malformed kind is dropped and counted under its reason, and the hub keeps answering."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from dvla_bus.control import CONTROL_MAX_MESSAGE
from tests.helpers import hub_status, spawn, stop, wait_status, write_topology


@pytest.fixture
def hub(short_tmp: Path) -> Iterator[str]:
    topo = write_topology(short_tmp / "t.toml", "coordinator = 1")
    proc = spawn(
        [
            "node",
            "start",
            "--role",
            "coordinator",
            "--topology",
            str(topo),
            "--host",
            "h",
            "--run-dir",
            str(short_tmp),
        ],
        short_tmp / "hub.log",
    )
    endpoint = f"ipc://{short_tmp}/c.sock"
    try:
        wait_status(endpoint, lambda st: len(st.members) == 1, what="hub up")
        yield endpoint
    finally:
        assert stop(proc) == 0, (short_tmp / "hub.log").read_text()


def header(**fields: Any) -> bytes:
    base: dict[str, Any] = {"kind": "query", "v": 1, "sender": "evil", "seq": 1, "ts": 0.0}
    base.update(fields)
    out = msgpack.packb(base)
    assert isinstance(out, bytes)
    return out


INJECTED: dict[str, list[list[bytes]]] = {
    "frames": [[b"lonely"], [b"t", header(kind="data", arrays=[{"dtype": "uint8", "shape": [1]}])]],
    "topic": [[b"\xff", header()]],
    "oversized": [[b"t", b"\x80" * (300 * 1024)]],
    "msgpack": [[b"t", b"\xc1\xc1"], [b"t", b"\xa5ab"]],
    "not_map": [[b"t", msgpack.packb("hello")]],
    "kind": [[b"t", header(kind="launch_missiles")]],
    "version": [[b"t", header(v=2)]],
    "schema": [[b"t", header(seq="x")], [b"t", header(kind="heartbeat", node=1)]],
    "arrays": [[b"t", header(kind="data", arrays=[{"dtype": "complex128", "shape": [1]}]), b"x"]],
    "unexpected": [[b"t", header(kind="ack", epoch="e", of_seq=1)]],
}


def test_every_malformed_kind_is_counted_and_the_hub_survives(hub: str) -> None:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(hub)
        for messages in INJECTED.values():
            for frames in messages:
                sock.send_multipart(frames)
        # A well-formed query on the same connection is answered: it queued behind the junk.
        sock.send_multipart([b"control", header()])
        assert sock.poll(10_000), "hub did not answer after malformed input"
        reply = sock.recv_multipart()
        status = msgpack.unpackb(reply[1])
        assert status["kind"] == "status"
        counters = status["counters"]
        for reason, messages in INJECTED.items():
            assert counters.get(f"dropped.{reason}") == len(messages), (reason, counters)
        sock.close()
    finally:
        ctx.destroy(linger=0)
    assert hub_status(hub).members[0].state == "running"


def test_frames_beyond_maxmsgsize_cut_the_sender_off_not_the_hub(hub: str) -> None:
    ctx = zmq.Context()
    try:
        big = ctx.socket(zmq.DEALER)
        big.linger = 0
        big.connect(hub)
        big.send_multipart([b"t", b"\x00" * (CONTROL_MAX_MESSAGE + 1)])
        big.close()
    finally:
        ctx.destroy(linger=0)
    status = hub_status(hub)
    assert status.members[0].state == "running"
