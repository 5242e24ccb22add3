"""``dvla bench fuzz``: hostile input at every endpoint of a live deployment.

Finds the job through its control hub, then sends ``--count`` malformed, truncated, oversized
and type-confused messages (seeded, reproducible) from raw pyzmq sockets to the hub and to every
node's data inbox. Each message is decoded locally first with the reference decoder, so the
reason the receiver must give is known in advance; afterwards the receivers' counters
(``dropped.<reason>`` at the hub, ``rx.dropped.<reason>`` in each inbox's heartbeat) must match
per reason, every node must still be alive with the same pid, and data must still flow.

Targets: 0 crashes (no node restarted or died), every message counted under its reason.
Tap endpoints (XPUB) are not fuzzed: ZeroMQ itself parses what reaches them (subscriptions).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from typing import Any, Final

import msgspec
import zmq

from dvla_bus import wire
from dvla_bus.control import open_control_client
from dvla_bus.errors import WireError
from dvla_tools.bench._common import machine_info, write_json

SEED: Final = 20261128


def register(sub: Any, name: str, help_text: str) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=__doc__)
    parser.add_argument("--control", required=True, help="the job's control hub endpoint")
    parser.add_argument("--count", type=int, default=100_000, help="messages per endpoint")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--json", help="write results to this file")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for counts")
    parser.set_defaults(func=_main)


def _valid_samples() -> list[list[bytes]]:
    """Well-formed messages of every kind, as mutation seeds."""
    import numpy as np

    msgs: list[tuple[wire.Message, list[Any]]] = [
        (wire.Heartbeat(node="x.h.0", state="running", weight_version=1, counters={"a": 1}), []),
        (wire.Join(node="x.h.0", role="x", host="h", index=0, pid=1, started=1.0), []),
        (wire.Query(), []),
        (wire.Command(command="pause", target="nobody"), []),
        (wire.Data(meta={"step": 1}, names=("a",)), [np.arange(16, dtype=np.float32)]),
        (
            wire.ShmData(
                segment="dvla.r.n.1.1.x",
                slab=0,
                generation=2,
                fields=(wire.ShmField("a", "float32", (4,), 0),),
            ),
            [],
        ),
    ]
    out = []
    for msg, arrays in msgs:
        frames = wire.encode("fuzz", wire.stamp(msg, "fuzzer", 1, 1.7e9), arrays)  # fixed: seeded
        out.append([bytes(f) for f in frames])
    return out


_CONFUSERS: Final[list[Any]] = [None, True, -1, 2**64 - 1, 1.5, "x", b"\xff", [], {}, [1, "a"]]


def mutate(rng: random.Random, seeds: list[list[bytes]]) -> list[bytes]:
    """One hostile message derived from a valid one."""
    frames = list(rng.choice(seeds))
    # Oversized headers are 256 KiB each: keep them to ~2 % so the run stays about the
    # receivers' validation, not about moving bytes.
    op = 6 if rng.random() < 0.02 else rng.choice([0, 1, 2, 3, 4, 5, 7, 8])
    if op == 0:  # truncate the header
        frames[1] = frames[1][: rng.randrange(len(frames[1]))]
    elif op == 1:  # flip bytes in the header
        h = bytearray(frames[1])
        for _ in range(rng.randint(1, 4)):
            h[rng.randrange(len(h))] = rng.randrange(256)
        frames[1] = bytes(h)
    elif op == 2:  # type confusion: one field gets a value of another type
        header = msgspec.msgpack.decode(frames[1])
        key = rng.choice(sorted(header))
        header[key] = rng.choice(_CONFUSERS)
        frames[1] = msgspec.msgpack.encode(header)
    elif op == 3:  # unknown kind or protocol version
        header = msgspec.msgpack.decode(frames[1])
        if rng.random() < 0.5:
            header["kind"] = rng.choice(["launch", "", "DATA", "heartbeat2"])
        else:
            header["v"] = rng.choice([0, 2, 99, -1])
        frames[1] = msgspec.msgpack.encode(header)
    elif op == 4:  # drop or add frames
        cut = frames[: rng.randrange(1, len(frames))] if len(frames) > 1 else frames
        frames = cut if rng.random() < 0.5 else [*frames, b"xx"]
    elif op == 5:  # random garbage header
        frames[1] = rng.randbytes(rng.randrange(1, 64))
    elif op == 6:  # oversized header
        frames[1] = b"\xc4" + b"\x00" * (wire.MAX_HEADER_BYTES + 16)
    elif op == 7:  # payload of the wrong length
        if len(frames) > 2:
            frames[2] = frames[2][: rng.randrange(len(frames[2]))]
        else:
            frames.append(b"\x00")
    else:  # bad topic
        frames[0] = rng.choice([b"\xff\xfe", b"x" * (wire.MAX_TOPIC_BYTES + 1)])
    return frames


def expected_reason(frames: list[bytes], *, hub: bool) -> str | None:
    """The reason a receiver must give (None: the message is valid and would be acted on)."""
    try:
        got = wire.decode(frames)
    except WireError as exc:
        return exc.reason
    if hub:
        return "unexpected" if isinstance(got.msg, wire.Data | wire.ShmData) else None
    return "no_hello" if isinstance(got.msg, wire.Data | wire.ShmData) else "unexpected"


def generate(count: int, seed: int, *, hub: bool) -> tuple[list[list[bytes]], Counter[str]]:
    rng = random.Random(seed)
    seeds = _valid_samples()
    out: list[list[bytes]] = []
    reasons: Counter[str] = Counter()
    while len(out) < count:
        frames = mutate(rng, seeds)
        reason = expected_reason(frames, hub=hub)
        if reason is None:
            continue  # valid by accident: it would act, not drop; the fuzzer wants drops
        out.append(frames)
        reasons[reason] += 1
    return out, reasons


def blast(endpoint: str, messages: list[list[bytes]]) -> float:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.linger = 2000
        sock.sndhwm = 10_000
        sock.sndtimeo = 10_000  # a receiver that died mid-run must not hang the fuzzer
        sock.connect(endpoint)
        t0 = time.perf_counter()
        for frames in messages:
            sock.send_multipart(frames)
        return time.perf_counter() - t0
    finally:
        sock.close()
        ctx.term()


async def _status(control: str) -> wire.Status:
    async with open_control_client(control) as client:
        return await client.query(timeout=10)


def _drops(status: wire.Status) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {"hub": Counter()}
    for k, v in status.counters.items():
        if k.startswith("dropped."):
            out["hub"][k[len("dropped.") :]] = v
    for m in status.members:
        c: Counter[str] = Counter()
        for k, v in m.counters.items():
            if k.startswith("rx.dropped."):
                c[k[len("rx.dropped.") :]] = v
        out[m.node] = c
    return out


def run(control: str, count: int, seed: int, timeout: float) -> dict[str, Any]:
    before = asyncio.run(_status(control))
    pids = {m.node: m.pid for m in before.members if m.state != "dead"}
    received0 = {m.node: m.counters.get("received", 0) for m in before.members}
    base = _drops(before)
    targets: list[tuple[str, str, bool]] = [("hub", control, True)]
    targets += [
        (m.node, m.endpoints["data"], False)
        for m in before.members
        if m.state != "dead" and m.endpoints.get("data")
    ]
    results: list[dict[str, Any]] = []
    expected: dict[str, Counter[str]] = {}
    for i, (name, endpoint, is_hub) in enumerate(targets):
        messages, reasons = generate(count, seed + i, hub=is_hub)
        seconds = blast(endpoint, messages)
        expected[name] = reasons
        results.append(
            {"target": name, "endpoint": endpoint, "sent": len(messages), "send_seconds": seconds}
        )

    def counted(status: wire.Status) -> dict[str, Counter[str]]:
        # Receive-side reasons only: "unroutable" counts the inbox's replies (credit resets)
        # to fuzzing sockets that had already gone, i.e. the receiver's own sends.
        now = _drops(status)
        return {
            n: Counter(
                {
                    k: v
                    for k, v in (now.get(n, Counter()) - base.get(n, Counter())).items()
                    if k != "unroutable"
                }
            )
            for n in expected
        }

    deadline = time.monotonic() + timeout
    status = asyncio.run(_status(control))
    while time.monotonic() < deadline and any(counted(status)[n] != expected[n] for n in expected):
        time.sleep(0.5)
        status = asyncio.run(_status(control))
    got = counted(status)
    alive = {m.node: m.pid for m in status.members if m.state != "dead"}
    crashed = sorted(n for n, pid in pids.items() if alive.get(n) != pid)
    flowing = {
        m.node: m.counters.get("received", 0) - received0.get(m.node, 0)
        for m in status.members
        if "received" in m.counters
    }
    for r in results:
        name = r["target"]
        r["expected"] = dict(expected[name])
        r["counted"] = dict(got[name])
        r["all_counted"] = got[name] == expected[name]
    return {
        "targets": results,
        "crashed_or_restarted": crashed,
        "data_still_flowing": flowing,
        "ok": not crashed and all(r["all_counted"] for r in results),
    }


def _main(args: argparse.Namespace) -> int:
    doc = run(args.control, args.count, args.seed, args.timeout)
    total = sum(r["sent"] for r in doc["targets"])
    for r in doc["targets"]:
        mark = "all counted" if r["all_counted"] else "MISMATCH"
        print(
            f"{r['target']}: {r['sent']} sent in {r['send_seconds']:.2f}s, {mark}: "
            f"{dict(sorted(r['counted'].items()))}"
        )
    print(
        f"{total} hostile messages; crashed or restarted: {doc['crashed_or_restarted'] or 0}; "
        f"data still flowing: {doc['data_still_flowing']}"
    )
    write_json(args.json, {"benchmark": "fuzz", "machine": machine_info(), **doc})
    return 0 if doc["ok"] else 1
