"""The wire protocol: round trips, and strict validation that never raises anything but
WireError, whatever bytes arrive."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dvla_bus import wire
from dvla_bus.errors import WireError

EXAMPLES: list[wire.Message] = [
    wire.Join(node="a.h.0", role="a", host="h", index=0, pid=1, started=2.5, endpoints={"d": "x"}),
    wire.Welcome(epoch="e", heartbeat_interval=0.5, heartbeat_timeout=5.0, latest_version=3),
    wire.Rejoin(epoch="e"),
    wire.Leave(node="a.h.0", reason="bye"),
    wire.Heartbeat(
        node="a.h.0", state="running", weight_version=2, counters={"x": 1}, gauges={"y": 0.5}
    ),
    wire.Ack(epoch="e", of_seq=7),
    wire.Members(epoch="e", members=()),
    wire.NodeDead(node="a.h.0", reason="timeout"),
    wire.VersionAnnounce(version=4, digest="ab", nbytes=10),
    wire.Command(command="pause", target="role:sampler", args={"k": 1.5}),
    wire.Query(),
    wire.Status(epoch="e", latest_version=1, members=(), counters={"a": 1}, uptime=1.0),
    wire.Data(meta={"step": 3, "ok": True, "s": "x"}),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_kind_round_trips(msg: wire.Message) -> None:
    stamped = wire.stamp(msg, "sender.h.0", 42, 1.25)
    got = wire.decode(wire.encode("topic", stamped))
    assert got.topic == "topic"
    assert got.msg == stamped
    assert got.arrays == ()


def test_header_is_plain_msgpack_a_foreign_client_can_read() -> None:
    frames = wire.encode("t", wire.stamp(wire.Query(), "x", 1, 2.0))
    header = msgpack.unpackb(frames[1])
    assert header == {
        "kind": "query",
        "v": wire.PROTOCOL_VERSION,
        "sender": "x",
        "seq": 1,
        "ts": 2.0,
        "arrays": [],
        "what": "status",
    }


def test_foreign_client_message_is_accepted() -> None:
    header = msgpack.packb(
        {
            "kind": "data",
            "v": 1,
            "sender": "c",
            "seq": 1,
            "ts": 0.0,
            "meta": {},
            "arrays": [{"dtype": "float32", "shape": [2, 2]}],
        }
    )
    got = wire.decode([b"obs", header, np.eye(2, dtype="<f4").tobytes()])
    np.testing.assert_array_equal(got.arrays[0], np.eye(2))


def test_arrays_are_zero_copy_views_of_the_frames() -> None:
    payload = bytearray(np.arange(16, dtype=np.float32).tobytes())
    frames = wire.encode("t", wire.Data(), [np.zeros(16, np.float32)])
    got = wire.decode([frames[0], frames[1], payload])
    payload[0:4] = np.float32(99).tobytes()
    assert got.arrays[0][0] == 99  # a view, not a copy
    assert not got.arrays[0].flags.writeable


def test_big_endian_and_non_contiguous_arrays_arrive_correct() -> None:
    a = np.arange(12, dtype=">i4").reshape(3, 4)
    b = np.arange(20, dtype=np.float64).reshape(4, 5)[:, ::2]
    got = wire.decode(wire.encode("t", wire.Data(), [a, b]))
    np.testing.assert_array_equal(got.arrays[0], a)
    np.testing.assert_array_equal(got.arrays[1], b)


def test_object_arrays_cannot_be_sent() -> None:
    with pytest.raises(WireError) as err:
        wire.encode("t", wire.Data(), [np.array([object()])])
    assert err.value.reason == "arrays"


def _header(**fields: Any) -> bytes:
    base: dict[str, Any] = {"kind": "query", "v": 1, "sender": "x", "seq": 1, "ts": 0.0}
    base.update(fields)
    out = msgpack.packb(base)
    assert isinstance(out, bytes)
    return out


MALFORMED: list[tuple[str, list[bytes]]] = [
    ("frames", [b"only-topic"]),
    ("topic", [b"\xff\xfe", _header()]),
    ("topic", [b"x" * (wire.MAX_TOPIC_BYTES + 1), _header()]),
    ("oversized", [b"t", b"\x00" * (wire.MAX_HEADER_BYTES + 1)]),
    ("msgpack", [b"t", b"\xc1"]),
    ("msgpack", [b"t", b""]),
    ("not_map", [b"t", msgpack.packb([1, 2, 3])]),
    ("kind", [b"t", _header(kind="no_such_kind")]),
    ("kind", [b"t", msgpack.packb({"v": 1})]),
    ("version", [b"t", _header(v=99)]),
    ("schema", [b"t", _header(seq="one")]),
    ("schema", [b"t", _header(unexpected=1)]),
    ("schema", [b"t", _header(kind="join", node="x")]),
    ("schema", [b"t", _header(seq=-1)]),
    ("schema", [b"t", _header(ts=float("nan"))]),
    ("frames", [b"t", _header(kind="data", arrays=[{"dtype": "uint8", "shape": [1]}])]),
    ("arrays", [b"t", _header(kind="data", arrays=[{"dtype": "object", "shape": [1]}]), b"x"]),
    ("arrays", [b"t", _header(kind="data", arrays=[{"dtype": "uint8", "shape": [3]}]), b"xy"]),
    ("arrays", [b"t", _header(kind="data", arrays=[{"dtype": "uint8", "shape": [-1]}]), b""]),
]


@pytest.mark.parametrize(("reason", "frames"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_messages_are_rejected_with_their_reason(
    reason: str, frames: list[bytes]
) -> None:
    with pytest.raises(WireError) as err:
        wire.decode(frames)
    assert err.value.reason == reason
    assert err.value.reason in wire.DROP_REASONS


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=5))
def test_decode_of_arbitrary_bytes_raises_only_wire_error(frames: list[bytes]) -> None:
    try:
        wire.decode(frames)
    except WireError as exc:
        assert exc.reason in wire.DROP_REASONS


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(wire._KINDS)), st.dictionaries(st.text(max_size=10), msgpack_values))
def test_decode_of_arbitrary_maps_raises_only_wire_error(kind: str, fields: dict[str, Any]) -> None:
    header = msgpack.packb({"kind": kind, "v": 1, **fields})
    try:
        wire.decode([b"t", header])
    except WireError as exc:
        assert exc.reason in wire.DROP_REASONS


scalars = st.one_of(
    st.text(max_size=20),
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.floats(allow_nan=False),
)
wire_dtypes = st.sampled_from(sorted(wire.DTYPES))


@settings(max_examples=150, deadline=None)
@given(
    topic=st.text(max_size=30),
    meta=st.dictionaries(st.text(max_size=10), scalars, max_size=5),
    arrays=st.lists(
        wire_dtypes.flatmap(
            lambda dt: hnp.arrays(
                wire.DTYPES[dt], hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
            )
        ),
        max_size=4,
    ),
    seq=st.integers(0, 2**63 - 1),
)
def test_data_round_trips(
    topic: str, meta: dict[str, wire.Scalar], arrays: list[np.ndarray[Any, Any]], seq: int
) -> None:
    msg = wire.stamp(wire.Data(meta=meta), "s", seq, 1.0)
    frames = [bytes(f) for f in wire.encode(topic, msg, arrays)]
    got = wire.decode(frames)
    assert got.topic == topic
    assert isinstance(got.msg, wire.Data)
    assert got.msg.meta == meta
    assert got.msg.seq == seq
    assert len(got.arrays) == len(arrays)
    for sent, received in zip(arrays, got.arrays, strict=True):
        assert received.shape == sent.shape
        assert received.dtype == sent.dtype.newbyteorder("<")
        np.testing.assert_array_equal(received, sent)
