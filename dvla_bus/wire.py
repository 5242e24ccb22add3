"""The wire protocol: every dvla message, its encoding, and strict validation on receipt.

A message is a ZeroMQ multipart ``[topic, header, *payload]`` (on a ROUTER socket the routing id
comes first and is not part of the message). ``topic`` is UTF-8 text; ``header`` is a MessagePack
map whose ``kind`` field selects the message type below; each payload frame holds the raw bytes of
one array described by the header's ``arrays`` list (dtype and shape, C order, little endian).
PROTOCOL.md is the normative description for clients written in other languages.

Messages are frozen ``msgspec.Struct`` types (frozen dataclass semantics, but decoded and
validated straight from MessagePack in one pass, several times faster than msgpack + dataclasses
and with the path of the offending field in every error). :func:`decode` never raises anything
but :class:`~dvla_bus.errors.WireError`, whose ``reason`` is one of :data:`DROP_REASONS` — the
counter a receiver increments before dropping the message.

This module depends on nothing of ours except :mod:`dvla_bus.errors` (so a minimal client, e.g. a
sampler running in another Python environment, can vendor the two files).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

import msgspec
import numpy as np

from dvla_bus.errors import WireError

__all__ = [
    "DROP_REASONS",
    "MAX_ARRAYS",
    "MAX_HEADER_BYTES",
    "MAX_TOPIC_BYTES",
    "PROTOCOL_VERSION",
    "Ack",
    "ArraySpec",
    "Command",
    "CommandName",
    "Credit",
    "Data",
    "Frame",
    "Heartbeat",
    "Hello",
    "Join",
    "Leave",
    "MemberInfo",
    "Members",
    "Message",
    "NodeDead",
    "Query",
    "Received",
    "Rejoin",
    "ShmData",
    "ShmField",
    "Status",
    "VersionAnnounce",
    "Welcome",
    "decode",
    "encode",
    "stamp",
]

PROTOCOL_VERSION: Final = 1
MAX_TOPIC_BYTES: Final = 256
MAX_HEADER_BYTES: Final = 256 * 1024
MAX_ARRAYS: Final = 64
MAX_DIMS: Final = 8

#: Every reason :func:`decode` can give, in the order PROTOCOL.md documents them.
DROP_REASONS: Final = (
    "frames",  # fewer than two frames, or payload frame count != len(arrays)
    "topic",  # topic not UTF-8 or longer than MAX_TOPIC_BYTES
    "oversized",  # header longer than MAX_HEADER_BYTES, or too many arrays / dimensions
    "msgpack",  # header is not valid MessagePack
    "not_map",  # header is valid MessagePack but not a map
    "kind",  # missing or unknown ``kind``
    "version",  # ``v`` is not PROTOCOL_VERSION
    "schema",  # a field is missing, unknown or of the wrong type or range
    "arrays",  # a dtype is not allowed or a frame's length disagrees with dtype x shape
)

#: dtypes allowed on the wire (name -> numpy dtype, always little endian). No object dtypes.
DTYPES: Final[dict[str, np.dtype[Any]]] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
}
_DTYPE_NAMES: Final[dict[np.dtype[Any], str]] = {dt: name for name, dt in DTYPES.items()}

Frame: TypeAlias = bytes | memoryview
"""A payload frame as we send it (bytes or a buffer over an array, sent without a copy)."""

Scalar: TypeAlias = str | int | float | bool
CommandName: TypeAlias = Literal["pause", "resume", "checkpoint", "stop", "trace", "dump"]
NodeState: TypeAlias = Literal["starting", "running", "paused", "stopping"]


class ArraySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """dtype and shape of one payload frame."""

    dtype: str
    shape: tuple[int, ...]


class _Base(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="kind",
):
    """Fields every header carries. ``sender``/``seq``/``ts`` are filled in by the sending socket
    (see :func:`stamp`), so code that builds a message leaves them at their defaults."""

    v: int = PROTOCOL_VERSION
    sender: str = ""
    seq: int = 0
    ts: float = 0.0  # seconds since the Unix epoch, sender's clock
    arrays: tuple[ArraySpec, ...] = ()


# --- membership ----------------------------------------------------------------------------


class Join(_Base, frozen=True, tag="join"):
    """Node -> hub: I exist. Sent until a :class:`Welcome` arrives, and again after a
    :class:`Rejoin`. ``node`` is stable across restarts (``role.host.index``); ``pid`` and
    ``started`` tell incarnations apart."""

    node: str
    role: str
    host: str
    index: int
    pid: int
    started: float
    endpoints: dict[str, str] = {}
    weight_version: int = -1


class Welcome(_Base, frozen=True, tag="welcome"):
    """Hub -> node: joined. Carries the hub's incarnation id and heartbeat contract (seconds)."""

    epoch: str
    heartbeat_interval: float
    heartbeat_timeout: float
    latest_version: int


class Rejoin(_Base, frozen=True, tag="rejoin"):
    """Hub -> node: I do not know you (e.g. the hub restarted); send :class:`Join` again."""

    epoch: str


class Leave(_Base, frozen=True, tag="leave"):
    """Node -> hub: I am stopping on purpose."""

    node: str
    reason: str = ""


class Heartbeat(_Base, frozen=True, tag="heartbeat"):
    """Node -> hub, every ``heartbeat_interval`` seconds (and at once when state or weight
    version changes). Carries the node's statistics for the inspection tools."""

    node: str
    state: NodeState
    weight_version: int
    counters: dict[str, int] = {}
    gauges: dict[str, float] = {}


class Ack(_Base, frozen=True, tag="ack"):
    """Hub -> node: reply to a heartbeat, so a node can tell when the hub is gone."""

    epoch: str
    of_seq: int


class MemberInfo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One row of the hub's membership table."""

    node: str
    role: str
    host: str
    index: int
    pid: int
    state: str  # a NodeState, or "dead"
    weight_version: int
    heartbeat_age: float  # seconds since the hub last heard from the node
    joined: float  # hub clock, seconds since the epoch
    endpoints: dict[str, str] = {}
    counters: dict[str, int] = {}
    gauges: dict[str, float] = {}


class Members(_Base, frozen=True, tag="members"):
    """Hub -> everyone: the membership table, sent on every change (join, leave, death)."""

    epoch: str
    members: tuple[MemberInfo, ...]


class NodeDead(_Base, frozen=True, tag="node_dead"):
    """Hub -> everyone: a node missed its heartbeats for ``heartbeat_timeout`` or left."""

    node: str
    reason: str


# --- weights and commands ------------------------------------------------------------------


class VersionAnnounce(_Base, frozen=True, tag="version"):
    """Publisher of weights -> hub -> everyone: version ``version`` is complete and may be
    activated. ``digest`` is the publisher's checksum of the whole weight buffer (hex)."""

    version: int
    digest: str = ""
    nbytes: int = 0


class Command(_Base, frozen=True, tag="command"):
    """Anyone -> hub -> targets: ``target`` is a node name, a role (``role:NAME``) or ``*``."""

    command: CommandName
    target: str = "*"
    args: dict[str, Scalar] = {}


# --- inspection ----------------------------------------------------------------------------


class Query(_Base, frozen=True, tag="query"):
    """Anyone -> hub: ask for a :class:`Status`. Needs no membership (tools use it)."""

    what: Literal["status"] = "status"


class Status(_Base, frozen=True, tag="status"):
    """Hub -> asker: the membership table, the version table and the hub's own counters."""

    epoch: str
    latest_version: int
    members: tuple[MemberInfo, ...]
    counters: dict[str, int]
    uptime: float


# --- data ----------------------------------------------------------------------------------


class Data(_Base, frozen=True, tag="data"):
    """A data-bus message: arrays in the payload frames plus small scalar metadata. ``names``
    optionally names the arrays (same length as ``arrays`` when given)."""

    meta: dict[str, Scalar] = {}
    names: tuple[str, ...] = ()


class ShmField(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """One array inside a shared-memory slab: ``[name, dtype, shape, offset]`` (offset in bytes
    from the slab start; dtype as in ``arrays``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int


class ShmData(_Base, frozen=True, tag="shm"):
    """A data-bus message whose arrays live in the sender's shared-memory slab pool (same host
    only): segment name, slab index and the generation it was acquired under. No payload
    frames. The receiver maps the slab, and returns it with a :class:`Credit`."""

    segment: str
    slab: int
    generation: int
    fields: tuple[ShmField, ...]
    meta: dict[str, Scalar] = {}


class Hello(_Base, frozen=True, tag="hello"):
    """Data sender -> receiver, first message on a connection: who and where I am."""

    host: str  # host identity: topology host name + "@" + kernel boot id


class Credit(_Base, frozen=True, tag="credit"):
    """Data receiver -> sender: ``grant`` more messages may be sent; ``released`` hands back
    shared-memory slabs as ``[index, generation]`` pairs. ``host`` is the receiver's host
    identity (so the sender can tell whether shared memory reaches it)."""

    grant: int
    host: str = ""
    released: tuple[tuple[int, int], ...] = ()
    reset: bool = False  # "I do not know you": drop your credit state and send Hello again


Message: TypeAlias = (
    Join
    | Welcome
    | Rejoin
    | Leave
    | Heartbeat
    | Ack
    | Members
    | NodeDead
    | VersionAnnounce
    | Command
    | Query
    | Status
    | Data
    | ShmData
    | Hello
    | Credit
)

_MESSAGE_TYPES: Final = (
    Join,
    Welcome,
    Rejoin,
    Leave,
    Heartbeat,
    Ack,
    Members,
    NodeDead,
    VersionAnnounce,
    Command,
    Query,
    Status,
    Data,
    ShmData,
    Hello,
    Credit,
)
_KINDS: Final[frozenset[str]] = frozenset(str(t.__struct_config__.tag) for t in _MESSAGE_TYPES)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


@dataclass(frozen=True, slots=True)
class Received:
    """A decoded message: its topic, header and the arrays (read-only views over the received
    frames: no copy; they stay valid as long as the Received object is referenced)."""

    topic: str
    msg: Message
    arrays: tuple[np.ndarray[Any, Any], ...] = ()
    nbytes: int = 0  # header + payload bytes on the wire


def stamp(msg: Message, sender: str, seq: int, ts: float) -> Message:
    """Return ``msg`` with the sending socket's fields filled in."""
    return msgspec.structs.replace(msg, sender=sender, seq=seq, ts=ts)


def _spec(array: np.ndarray[Any, Any]) -> ArraySpec:
    dt = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    name = _DTYPE_NAMES.get(dt)
    if name is None:
        raise WireError("arrays", f"dtype {array.dtype} cannot travel on the wire")
    return ArraySpec(dtype=name, shape=tuple(int(n) for n in array.shape))


def encode(topic: str, msg: Message, arrays: Sequence[np.ndarray[Any, Any]] = ()) -> list[Frame]:
    """Frames for ``msg`` on ``topic``; array payloads are zero-copy views when contiguous and
    little endian (the caller must not modify them until ZeroMQ has sent them)."""
    topic_b = topic.encode()
    if len(topic_b) > MAX_TOPIC_BYTES:
        raise WireError("topic", f"topic {topic[:40]!r}... is longer than {MAX_TOPIC_BYTES} bytes")
    if len(arrays) > MAX_ARRAYS:
        raise WireError("oversized", f"{len(arrays)} arrays > {MAX_ARRAYS}")
    frames: list[Frame] = [topic_b, b""]
    if arrays:
        specs = []
        for given in arrays:
            a = given
            if a.dtype.byteorder == ">" or not a.flags.c_contiguous:
                a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
            specs.append(_spec(a))
            frames.append(a.data.cast("B") if a.nbytes else b"")
        msg = msgspec.structs.replace(msg, arrays=tuple(specs))
    header = _encoder.encode(msg)
    if len(header) > MAX_HEADER_BYTES:
        raise WireError("oversized", f"header of {len(header)} bytes > {MAX_HEADER_BYTES}")
    frames[1] = header
    return frames


# What decoding hostile bytes can raise besides ValidationError: bad MessagePack, invalid UTF-8 in
# a string (UnicodeDecodeError), absurd nesting.
_UNDECODABLE: Final = (msgspec.DecodeError, ValueError, RecursionError, OverflowError)


def _classify(header: bytes, exc: msgspec.ValidationError) -> WireError:
    """Tell apart why a header failed validation (error path only, so decoding twice is fine)."""
    try:
        raw = msgspec.msgpack.decode(header)
    except _UNDECODABLE as bad:
        return WireError("msgpack", f"header is not MessagePack: {bad}")
    if not isinstance(raw, dict):
        return WireError("not_map", f"header is a {type(raw).__name__}, not a map")
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in _KINDS:
        return WireError("kind", f"unknown message kind {kind!r}")
    if raw.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        return WireError(
            "version", f"protocol version {raw.get('v')!r}, this node speaks {PROTOCOL_VERSION}"
        )
    return WireError("schema", f"{kind}: {exc}")


def _buffer(frame: Any) -> memoryview:
    # zmq.Frame exposes .buffer; bytes and memoryview are buffers themselves.
    buf = getattr(frame, "buffer", frame)
    return memoryview(buf)


def decode(frames: Sequence[Any]) -> Received:
    """Validate and decode ``[topic, header, *payload]`` (bytes, memoryviews or ``zmq.Frame``).

    Raises :class:`WireError` (and nothing else) when the message must be dropped."""
    if len(frames) < 2:
        raise WireError("frames", f"{len(frames)} frame(s); a message has at least 2")
    topic_buf = _buffer(frames[0])
    if topic_buf.nbytes > MAX_TOPIC_BYTES:
        raise WireError("topic", f"topic of {topic_buf.nbytes} bytes > {MAX_TOPIC_BYTES}")
    try:
        topic = bytes(topic_buf).decode()
    except UnicodeDecodeError as exc:
        raise WireError("topic", f"topic is not UTF-8: {exc}") from None
    header_buf = _buffer(frames[1])
    if header_buf.nbytes > MAX_HEADER_BYTES:  # checked before copying a hostile frame
        raise WireError("oversized", f"header of {header_buf.nbytes} bytes > {MAX_HEADER_BYTES}")
    header = bytes(header_buf)
    try:
        msg = _decoder.decode(header)
    except msgspec.ValidationError as exc:
        raise _classify(header, exc) from None
    except _UNDECODABLE as exc:
        raise WireError("msgpack", f"header is not MessagePack: {exc}") from None
    if msg.v != PROTOCOL_VERSION:
        raise WireError("version", f"protocol version {msg.v}, this node speaks {PROTOCOL_VERSION}")
    if not (msg.seq >= 0 and math.isfinite(msg.ts)):
        raise WireError("schema", f"{type(msg).__name__}: seq must be >= 0 and ts finite")
    payload = frames[2:]
    if len(msg.arrays) > MAX_ARRAYS:
        raise WireError("oversized", f"{len(msg.arrays)} arrays > {MAX_ARRAYS}")
    if len(payload) != len(msg.arrays):
        raise WireError(
            "frames", f"{len(payload)} payload frame(s) for {len(msg.arrays)} array spec(s)"
        )
    nbytes = len(header)
    arrays: list[np.ndarray[Any, Any]] = []
    for i, (spec, frame) in enumerate(zip(msg.arrays, payload, strict=True)):
        dtype = DTYPES.get(spec.dtype)
        if dtype is None:
            raise WireError("arrays", f"array {i}: dtype {spec.dtype!r} is not allowed")
        if len(spec.shape) > MAX_DIMS or any(n < 0 for n in spec.shape):
            raise WireError("arrays", f"array {i}: bad shape {spec.shape}")
        buf = _buffer(frame)
        expected = dtype.itemsize * math.prod(spec.shape)
        if buf.nbytes != expected:
            raise WireError(
                "arrays",
                f"array {i}: {buf.nbytes} bytes for {spec.dtype}{list(spec.shape)}"
                f" (expected {expected})",
            )
        arr = (
            np.frombuffer(buf, dtype=dtype).reshape(spec.shape)
            if expected
            else np.empty(spec.shape, dtype)
        )
        arr.flags.writeable = False
        arrays.append(arr)
        nbytes += expected
    return Received(topic=topic, msg=msg, arrays=tuple(arrays), nbytes=nbytes)
