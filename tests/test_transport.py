"""The data-bus transport: shared-memory path on one host, frames across hosts, credit flow
control (block and drop-oldest), slab return, request/reply and peer restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from dvla_bus import wire
from dvla_bus.errors import DeadlineExceeded
from dvla_bus.sockets import Channel, open_context, open_socket
from dvla_bus.transport import Inbox, Outbox, Policy, open_inbox, open_outbox

pytestmark = pytest.mark.asyncio

MiB = 1 << 20


class Pair:
    def __init__(self, inbox: Inbox, outbox: Outbox) -> None:
        self.inbox = inbox
        self.outbox = outbox


def pair(
    short_tmp: Path,
    *,
    same_host: bool = True,
    window: int = 4,
    policy: Policy = "block",
    queue: int = 4,
    slabs: int = 8,
    tcp: bool = False,
) -> AsyncIterator[Pair]:
    async def gen() -> AsyncIterator[Pair]:
        bind = ["tcp://127.0.0.1:0"] if tcp else [f"ipc://{short_tmp}/in.sock"]
        async with (
            open_context() as ctx,
            open_inbox(ctx, name="in", host="a", bind=bind, window=window) as inbox,
            open_outbox(
                ctx,
                name="out",
                host="a" if same_host else "b",
                run="t",
                slab_size=MiB,
                slabs=slabs,
                policy=policy,
                queue=queue,
            ) as outbox,
        ):
            await outbox.connect(inbox.endpoint)
            await outbox.wait_ready()
            yield Pair(inbox, outbox)

    return gen()


async def test_same_host_goes_through_shared_memory_without_copies(short_tmp: Path) -> None:
    async for p in pair(short_tmp):
        image = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)
        await p.outbox.send({"step": 1}, {"image": image, "reward": np.array([0.5], np.float32)})
        d = await p.inbox.recv(timeout=5)
        assert d.via_shm
        assert d.meta == {"step": 1}
        np.testing.assert_array_equal(d.arrays["image"], image)
        assert d.arrays["reward"][0] == np.float32(0.5)
        # The consumer's array is a view of the sender's segment, not a copy: a byte written
        # through the sender's mapping shows up in it.
        pool = p.outbox.pool
        assert pool is not None
        mine = p.inbox._pools[pool.name].segment.ndarray(np.uint8, (pool.segment.size,), 0)
        offset = _address(d.arrays["image"]) - _address(mine)
        assert 0 <= offset < pool.segment.size
        theirs = pool.segment.ndarray(np.uint8, (pool.segment.size,), 0)
        theirs[offset] = 201
        assert d.arrays["image"][0, 0, 0] == 201
        del mine, theirs
        assert not d.arrays["image"].flags.writeable
        assert d.intact()
        d.release()
        await _until(lambda o=p.outbox: o.statistics().in_flight == 0)
        assert pool.statistics().held == 0


def _address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


async def _until(cond: object, timeout: float = 5.0) -> None:
    assert callable(cond)
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_other_host_goes_inline_over_tcp(short_tmp: Path) -> None:
    async for p in pair(short_tmp, same_host=False, tcp=True):
        big = np.random.default_rng(0).random(200_000)
        await p.outbox.send({"k": "v"}, {"big": big, "small": np.arange(3)})
        d = await p.inbox.recv(timeout=5)
        assert not d.via_shm
        np.testing.assert_array_equal(d.arrays["big"], big)
        np.testing.assert_array_equal(d.arrays["small"], [0, 1, 2])
        d.release()
        assert p.outbox.statistics().sent_shm == 0


async def test_block_policy_never_exceeds_the_window(short_tmp: Path) -> None:
    async for p in pair(short_tmp, window=2):
        for i in range(2):
            await p.outbox.send({"i": i}, {"x": np.zeros(10)})
        with pytest.raises(DeadlineExceeded, match="no credit"):
            await p.outbox.send({"i": 2}, {"x": np.zeros(10)}, timeout=0.2)
        held = [await p.inbox.recv(timeout=5) for _ in range(2)]
        assert p.inbox.pending() == 0
        held[0].release()
        await p.outbox.send({"i": 3}, {"x": np.zeros(10)}, timeout=5)
        d = await p.inbox.recv(timeout=5)
        assert d.meta["i"] == 3
        d.release()
        held[1].release()
        assert p.outbox.statistics().credit_waits >= 1


async def test_wait_credit_reports_credit_without_spending_it(short_tmp: Path) -> None:
    async for p in pair(short_tmp, window=1):
        assert await p.outbox.wait_credit(5)
        assert await p.outbox.wait_credit(0.05)  # still there: waiting spent nothing
        await p.outbox.send({"i": 0}, {"x": np.zeros(10)})
        waits = p.outbox.statistics().credit_waits
        assert not await p.outbox.wait_credit(0.1)  # the one credit is in flight
        assert p.outbox.statistics().credit_waits == waits + 1
        held = await p.inbox.recv(timeout=5)
        waiter = asyncio.create_task(p.outbox.wait_credit(5))
        done, _ = await asyncio.wait({waiter}, timeout=0.05)  # it must still be waiting
        assert not done
        held.release()  # the inbox grants the credit back: the waiter wakes
        assert await waiter
        await p.outbox.send({"i": 1}, {"x": np.zeros(10)}, timeout=0.5)
        (await p.inbox.recv(timeout=5)).release()


async def test_drop_oldest_keeps_the_newest_and_counts(short_tmp: Path) -> None:
    async for p in pair(short_tmp, window=1, policy="drop_oldest", queue=2):
        for i in range(6):
            assert await p.outbox.send({"i": i}, {"x": np.full(4, i)})
        stats = p.outbox.statistics()
        assert stats.dropped["drop_oldest"] == 3  # 1 in flight, 2 queued, 3 dropped
        assert stats.queued == 2
        got = []
        for _ in range(3):
            d = await p.inbox.recv(timeout=5)
            got.append(d.meta["i"])
            d.release()
        assert got == [0, 4, 5]


async def test_stalled_consumer_bounds_the_pool(short_tmp: Path) -> None:
    async for p in pair(short_tmp, window=3, slabs=3):
        for i in range(3):
            await p.outbox.send({"i": i}, {"x": np.zeros(1000)})
        pool = p.outbox.pool
        assert pool is not None
        assert pool.statistics().held == 3
        with pytest.raises(DeadlineExceeded):
            await p.outbox.send({"i": 9}, {"x": np.zeros(1000)}, timeout=0.1)
        assert pool.statistics().held == 3  # never grows


async def test_request_reply(short_tmp: Path) -> None:
    async for p in pair(short_tmp):
        await p.outbox.send({"req": 1}, {"obs": np.ones((2, 3), np.float32)})
        d = await p.inbox.recv(timeout=5)
        await p.inbox.reply(d, {"req": 1}, {"action": d.arrays["obs"].sum(axis=1)})
        d.release()
        reply = await p.outbox.recv_reply(timeout=5)
        np.testing.assert_array_equal(reply.arrays[0], [3.0, 3.0])
        assert reply.msg.meta == {"req": 1}  # type: ignore[union-attr]


async def test_double_release_is_an_error(short_tmp: Path) -> None:
    from dvla_bus.errors import PoolError

    async for p in pair(short_tmp):
        await p.outbox.send({}, {"x": np.zeros(1)})
        d = await p.inbox.recv(timeout=5)
        d.release()
        with pytest.raises(PoolError):
            d.release()


async def test_a_restarted_inbox_gets_a_fresh_start_even_without_credit(short_tmp: Path) -> None:
    # The sender spent its whole window on an inbox that then died holding it: no credit will
    # ever come back from that one, and the sender has nothing it may send to learn about the
    # new inbox. The reconnection itself must start it over (reset, new Hello, fresh window).
    endpoint = f"ipc://{short_tmp}/in.sock"
    async with (
        open_context() as ctx,
        open_outbox(ctx, name="out", host="a", run="t", slab_size=MiB, slabs=4) as outbox,
    ):
        async with open_inbox(ctx, name="in", host="a", bind=[endpoint], window=1) as first:
            await outbox.connect(endpoint)
            await outbox.wait_ready()
            await outbox.send({"i": 0}, {"x": np.zeros(8)})
            await first.recv(timeout=5)  # never released: the inbox dies holding it
        assert not await outbox.wait_credit(0.1)
        async with open_inbox(ctx, name="in", host="a", bind=[endpoint], window=1) as second:
            assert await outbox.wait_credit(5)
            assert outbox.reconnects == 1
            assert outbox.statistics().dropped["lost_in_flight"] == 1
            assert outbox.pool is not None
            assert outbox.pool.statistics().held == 0  # the dead inbox's slab came back
            await outbox.send({"i": 1}, {"x": np.zeros(8)}, timeout=5)
            d = await second.recv(timeout=5)
            assert d.meta["i"] == 1
            d.release()
            assert outbox.counters()["tx.reconnects"] == 1


async def test_a_restart_with_credit_left_still_grants_one_window(short_tmp: Path) -> None:
    # The sender still had credit when the inbox died and sent into the gap: the new inbox
    # answers that message with a reset while the reconnection's Hello is on its way. The
    # sender must end up with one window, not one per Hello (the extra would be refused).
    endpoint = f"ipc://{short_tmp}/in.sock"
    async with (
        open_context() as ctx,
        open_outbox(ctx, name="out", host="a", run="t", slab_size=MiB, slabs=4) as outbox,
    ):
        async with open_inbox(ctx, name="in", host="a", bind=[endpoint], window=2):
            await outbox.connect(endpoint)
            await outbox.wait_ready()
        await outbox.send({"i": 0}, {"x": np.zeros(8)}, timeout=5)  # into the gap
        async with open_inbox(ctx, name="in", host="a", bind=[endpoint], window=2) as second:
            peer = outbox._peers[0]
            # Every Hello answered: one window, however many Hellos went out.
            await _until(lambda: outbox.reconnects == 1 and peer.ready and not peer.hello_pending)
            assert outbox.credit() == 2
            for i in (1, 2):
                await outbox.send({"i": i}, {"x": np.zeros(8)}, timeout=5)
            got = [await second.recv(timeout=5) for _ in range(2)]
            assert [d.meta["i"] for d in got] == [1, 2]
            assert not await outbox.wait_credit(0.2)  # both credits are in flight
            assert second.statistics().dropped.get("no_credit", 0) == 0
            for d in got:
                d.release()


async def test_data_without_hello_is_refused_with_a_reset(short_tmp: Path) -> None:
    endpoint = f"ipc://{short_tmp}/in.sock"
    async with (
        open_context() as ctx,
        open_inbox(ctx, name="in", host="a", bind=[endpoint], window=2) as inbox,
        open_socket(ctx, zmq.DEALER, connect=[endpoint]) as sock,
    ):
        channel = Channel(sock, "rogue")
        await channel.send(wire.Data(meta={"i": 0}), "data")
        _, got = await asyncio.wait_for(channel.recv(), 5)
        assert isinstance(got.msg, wire.Credit)
        assert got.msg.reset
        assert got.msg.grant == 0
        assert inbox.statistics().dropped["no_hello"] == 1
        assert inbox.pending() == 0
