"""Replication in one process over real loopback sockets: a chain of replicators streams versions
chunk by chunk, every host ends with the publisher's bytes, a torn transfer leaves readers on the
old version and the subtree catches up from an ancestor."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest

from dvla_bus import wire
from dvla_bus.errors import ConfigError, ProtocolError
from dvla_bus.replication import ChunkMeta, Replicator, open_replicator
from dvla_bus.sockets import open_context
from dvla_bus.topology import Topology, parse_topology
from dvla_bus.weights import attach_weights
from dvla_nodes.publisher import SyntheticModel

pytestmark = pytest.mark.asyncio


def chain_topology(encrypt: str = "never", racks: bool = False) -> Topology:
    """a -> b -> c on loopback (fanout 1), 64 KiB chunks."""
    hosts: list[dict[str, object]] = [
        {"name": "a", "roles": {"coordinator": 1, "publisher": 1}},
        {"name": "b", "roles": {"relay": 1}},
        {"name": "c", "roles": {"relay": 1}},
    ]
    doc: dict[str, object] = {
        "name": "chain",
        "control": {"endpoint": "tcp://127.0.0.1:1", "hosted_by": "coordinator"},
        "replication": {"source": "publisher", "fanout": 1, "chunk": "64KiB"},
        "data": {"port": 0, "encrypt": encrypt},
        "hosts": hosts,
    }
    if racks:
        doc["racks"] = [{"name": "r1"}, {"name": "r2"}]
        for h, r in zip(hosts, ("r1", "r1", "r2"), strict=True):
            h["rack"] = r
    return parse_topology(doc, "chain.toml")


def members(reps: dict[str, Replicator], dead: tuple[str, ...] = ()) -> tuple[wire.MemberInfo, ...]:
    return tuple(
        wire.MemberInfo(
            node=r.node_id,
            role="relay",
            host=h,
            index=0,
            pid=1,
            state="dead" if h in dead else "running",
            weight_version=r.active_version,
            heartbeat_age=0.0,
            joined=0.0,
            endpoints={"weights": r.inbox.endpoint},
        )
        for h, r in reps.items()
    )


@contextlib.asynccontextmanager
async def chain(run: str, window: int = 4) -> AsyncIterator[dict[str, Replicator]]:
    topo = chain_topology()
    async with open_context() as ctx, contextlib.AsyncExitStack() as stack:
        reps = {}
        for h in ("a", "b", "c"):
            reps[h] = await stack.enter_async_context(
                open_replicator(
                    ctx,
                    topo,
                    host=h,
                    node_id=f"relay.{h}.0",
                    run_id=run,
                    bind="tcp://127.0.0.1:0",
                    window=window,
                    stall_s=0.3,
                    send_timeout_s=5.0,
                )
            )
        table = members(reps)
        for r in reps.values():
            r.on_members(table)
        yield reps


async def until(pred: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def all_at(reps: dict[str, Replicator], v: int) -> Callable[[], bool]:
    return lambda: all(r.active_version == v for r in reps.values())


def fence(reps: dict[str, Replicator], v: int, digest: str, hosts: str = "bc") -> None:
    for h in hosts:
        reps[h].on_version(wire.VersionAnnounce(version=v, digest=digest))


async def test_chunk_meta_round_trip_and_validation() -> None:
    meta = ChunkMeta(3, 1, 4, "ab" * 16, "cd" * 16, "ef" * 8)
    assert ChunkMeta.from_meta(meta.to_meta()) == meta
    with pytest.raises(ProtocolError, match="'i'"):
        ChunkMeta.from_meta({**meta.to_meta(), "i": "1"})
    with pytest.raises(ProtocolError, match="chunk 4/4"):
        ChunkMeta.from_meta({**meta.to_meta(), "i": 4})


async def test_encryption_is_never_silently_off() -> None:
    from dvla_bus.replication import check_encryption
    from dvla_bus.tree import replication_tree

    topo = chain_topology(encrypt="always")
    with pytest.raises(ConfigError, match="CURVE"):
        check_encryption(topo, replication_tree(topo), "b")
    topo = chain_topology(encrypt="across-racks", racks=True)
    check_encryption(topo, replication_tree(topo), "a")  # a -> b stays in rack r1
    with pytest.raises(ConfigError, match="b -> c"):
        check_encryption(topo, replication_tree(topo), "c")


async def test_versions_stream_down_a_chain() -> None:
    run = "r" + secrets.token_hex(5)
    model = SyntheticModel(300_000, "bf16", tensors=3)  # 600 KB: 10 chunks of 64 KiB
    async with chain(run) as reps:
        for version in (1, 2, 3):
            v = await reps["a"].publish(model.arrays(version), manifest=model.manifest)
            assert v == version
            assert reps["a"].pool is not None
            digest = reps["a"].pool.content_digest(reps["a"].pool.active_slot)
            fence(reps, v, digest)
            await until(all_at(reps, v), f"v{v} everywhere")
            for r in reps.values():
                assert r.pool is not None
                assert r.pool.content_digest(r.pool.active_slot) == digest
                assert r.pool.verify(r.pool.active_slot)
        b = reps["b"].statistics()
        assert b.chunks_received == 3 * reps["a"].pool.n_chunks  # type: ignore[union-attr]
        assert b.chunks_forwarded == b.chunks_received
        assert b.bad_chunks == 0
        # A local reader of host c sees the publisher's bytes, as torch tensors, no copy.
        pool_c = reps["c"].pool
        assert pool_c is not None
        with attach_weights(pool_c.name) as reader, reader.pin() as pinned:
            expected = model.arrays(3)
            for name, arr in pinned.arrays.items():
                np.testing.assert_array_equal(arr, expected[name])
            assert str(pinned.tensors()["layer0.weight"].dtype) == "torch.bfloat16"


async def test_a_version_waits_for_its_fence() -> None:
    run = "r" + secrets.token_hex(5)
    model = SyntheticModel(50_000, "fp32", tensors=2)
    async with chain(run) as reps:
        await reps["a"].publish(model.arrays(1))
        pool_b = reps["b"]
        await until(lambda: pool_b.pool is not None and pool_b.pool.missing == 0, "all chunks")
        assert pool_b.pool is not None
        await until(lambda: pool_b.pool is not None and pool_b.pool.staging_slot >= 0, "staged")
        assert reps["b"].active_version == -1  # complete, verified, but not fenced yet
        assert reps["a"].pool is not None
        fence(reps, 1, reps["a"].pool.content_digest(reps["a"].pool.active_slot), "b")
        assert reps["b"].active_version == 1
        fence(reps, 1, "0" * 32, "c")  # a fence with another digest: c refuses the bytes
        await until(lambda: reps["c"].statistics().bad_chunks >= 1, "c discards")
        assert reps["c"].active_version == -1


async def test_torn_transfer_keeps_readers_on_n_and_the_subtree_catches_up() -> None:
    run = "r" + secrets.token_hex(5)
    model = SyntheticModel(2_000_000, "fp32", tensors=4)  # 8 MB: 123 chunks of 64 KiB
    async with open_context() as ctx, chain(run, window=2) as reps:
        del ctx
        a, b, c = reps["a"], reps["b"], reps["c"]
        await a.publish(model.arrays(1))
        assert a.pool is not None
        d1 = a.pool.content_digest(a.pool.active_slot)
        fence(reps, 1, d1)
        await until(lambda: c.active_version == 1, "v1 on c")
        assert c.pool is not None
        with attach_weights(c.pool.name) as reader:
            pinned = reader.pin()  # a local reader on c holds version 1 throughout
            await a.publish(model.arrays(2))
            d2 = a.pool.content_digest(a.pool.active_slot)
            fence(reps, 2, d2)
            n1 = c.statistics().chunks_received
            await until(lambda: c.statistics().chunks_received >= n1 + 4, "c streaming v2")
            # Relay b dies mid-way: with a window of 2, c holds at most a handful of chunks.
            await b._close()
            b.inbox.channel.sock.close(linger=0)
            assert c.pool.missing > 0
            assert reader.active_version == 1
            assert pinned.version == 1
            assert pinned.digest() == d1
            assert reader.verify(pinned.slot)
            pinned.release()
            # The hub declares b dead: c pulls from the next ancestor, the root.
            table = members({"a": a, "c": c})
            c.on_members(table)
            a.on_members(table)
            await until(lambda: c.active_version == 2, "c catches up from a")
            assert c.statistics().pulls_sent >= 1
            assert a.statistics().pulls_served >= 1
            with reader.pin() as now:
                assert now.version == 2
                assert now.digest() == d2
                assert reader.verify(now.slot)
