"""Connection limits: the control hub admits at most ``max_nodes`` members (a full table
refuses new names with a reason and counts them, evicts dead rows first, and always lets a
known name's new incarnation in), and an inbox tracks at most ``max_senders`` senders (a Hello
beyond that is refused and counted; senders whose connection is gone make room)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from dvla_bus import wire
from dvla_bus.control import REFUSED, ControlClient, HubConfig, JoinInfo, open_control_client
from dvla_bus.control import open_control_hub as open_hub
from dvla_bus.errors import DeadlineExceeded, TopologyError
from dvla_bus.sockets import open_context
from dvla_bus.topology import DEFAULT_MAX_NODES, load_topology, parse_topology
from dvla_bus.transport import Outbox, open_inbox, open_outbox
from tests.helpers import REPO, hub_status, spawn, stop, wait_status

INTERVAL = 0.05


async def until(predicate: object, timeout: float, what: str) -> None:
    """Await ``predicate()`` (a callable) becoming true, with a deadline."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)  # polling granularity


@contextlib.asynccontextmanager
async def member(endpoint: str, name: str) -> AsyncIterator[ControlClient]:
    async with open_control_client(
        endpoint,
        JoinInfo(node=name, role="t", host="h", index=0),
        heartbeat_interval=INTERVAL,
        heartbeat_timeout=2.0,
    ) as client:
        yield client


def join_frames(node: str, pid: int) -> list[wire.Frame]:
    msg = wire.Join(node=node, role="t", host="h", index=0, pid=pid, started=1.0)
    return wire.encode("control", wire.stamp(msg, node, 1, time.time()))


async def raw_join(ctx: zmq.asyncio.Context, endpoint: str, node: str, pid: int) -> wire.Message:
    """Join from a bare socket that never heartbeats; returns the hub's answer: a Welcome, or
    the NodeDead that refuses (fan-out such as Members or "replaced" notices is skipped)."""
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.linger = 0
        sock.connect(endpoint)
        await sock.send_multipart(join_frames(node, pid))
        while True:
            msg = wire.decode(await asyncio.wait_for(sock.recv_multipart(), 5.0)).msg
            if isinstance(msg, wire.Welcome) or (
                isinstance(msg, wire.NodeDead) and msg.reason.startswith(REFUSED)
            ):
                return msg
    finally:
        sock.close()


@pytest.mark.asyncio
async def test_hub_refuses_joins_beyond_max_nodes_until_a_place_frees(short_tmp: Path) -> None:
    config = HubConfig(
        endpoint=f"ipc://{short_tmp}/c.sock",
        heartbeat_interval=INTERVAL,
        heartbeat_timeout=2.0,
        max_nodes=2,
    )
    async with open_hub(config) as hub, contextlib.AsyncExitStack() as first:
        a = await first.enter_async_context(member(hub.endpoint, "a.h.0"))
        async with member(hub.endpoint, "b.h.0") as b:
            await asyncio.wait_for(asyncio.gather(a.joined.wait(), b.joined.wait()), 5.0)
            async with member(hub.endpoint, "c.h.0") as c:
                await until(lambda: c.refused != "", 5.0, "the third member to be refused")
                assert "max_nodes" in c.refused
                assert "2" in c.refused
                assert not c.joined.is_set()
                assert hub.statistics()["joins_refused"] >= 1
                assert {m.node for m in hub.members()} == {"a.h.0", "b.h.0"}
                # The first member leaves: the waiting one is admitted on its next Join.
                await first.aclose()
                await asyncio.wait_for(c.joined.wait(), 5.0)
                assert c.refused == ""
                assert {m.node for m in hub.members()} == {"b.h.0", "c.h.0"}


@pytest.mark.asyncio
async def test_full_hub_evicts_dead_rows_and_admits_new_incarnations(short_tmp: Path) -> None:
    config = HubConfig(
        endpoint=f"ipc://{short_tmp}/c.sock",
        heartbeat_interval=INTERVAL,
        heartbeat_timeout=0.3,
        max_nodes=2,
    )
    async with (
        open_hub(config) as hub,
        open_context() as ctx,
        member(hub.endpoint, "a.h.0") as a,
    ):
        await asyncio.wait_for(a.joined.wait(), 5.0)
        # A member that never heartbeats fills the table, then is declared dead.
        assert isinstance(await raw_join(ctx, hub.endpoint, "ghost.h.0", 4242), wire.Welcome)
        # A new incarnation of a known name takes its row even while the table is full.
        assert isinstance(await raw_join(ctx, hub.endpoint, "ghost.h.0", 4343), wire.Welcome)
        assert len(hub.members()) == 2
        await until(
            lambda: {m.node: m.state for m in hub.members()}.get("ghost.h.0") == "dead",
            5.0,
            "the silent member to be declared dead",
        )
        # A new name: the dead row is evicted to make room.
        async with member(hub.endpoint, "new.h.0") as new:
            await asyncio.wait_for(new.joined.wait(), 5.0)
        assert hub.statistics()["members.evicted"] == 1
        assert hub.statistics().get("joins_refused", 0) == 0
        assert "ghost.h.0" not in {m.node for m in hub.members()}


def test_coordinator_takes_max_nodes_from_the_topology(short_tmp: Path) -> None:
    topo = short_tmp / "t.toml"
    topo.write_text(
        f"""schema = 1
name = "t"
[control]
endpoint = "ipc://{short_tmp}/c.sock"
heartbeat_interval_s = 0.2
heartbeat_timeout_s = 1.5
max_nodes = 2
[[hosts]]
name = "h"
roles = {{ coordinator = 1, producer = 1 }}
"""
    )
    endpoint = f"ipc://{short_tmp}/c.sock"
    node = spawn(
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
        short_tmp / "coordinator.log",
    )
    try:
        wait_status(endpoint, lambda st: len(st.members) == 1, what="the coordinator to join")

        async def joins() -> tuple[wire.Message, wire.Message]:
            async with open_context() as ctx:
                first = await raw_join(ctx, endpoint, "x.h.0", 11)
                second = await raw_join(ctx, endpoint, "y.h.0", 12)
                return first, second

        first, second = asyncio.run(joins())
        assert isinstance(first, wire.Welcome)
        assert isinstance(second, wire.NodeDead)
        assert second.node == "y.h.0"
        assert "at most 2 members" in second.reason
        status = hub_status(endpoint)
        assert status.counters["joins_refused"] == 1
        assert {m.node for m in status.members} == {"coordinator.h.0", "x.h.0"}
    finally:
        stop(node)


def test_max_nodes_in_topologies() -> None:
    def topo(control: dict[str, object], roles: dict[str, int]) -> dict[str, object]:
        return {
            "name": "t",
            "control": {"endpoint": "ipc:///tmp/x.sock", **control},
            "hosts": [{"name": "h", "roles": roles}],
        }

    plain = parse_topology(topo({}, {"coordinator": 1, "producer": 2}), "t.toml")
    assert plain.control.max_nodes == DEFAULT_MAX_NODES
    given = parse_topology(topo({"max_nodes": 3}, {"coordinator": 1, "producer": 2}), "t.toml")
    assert given.control.max_nodes == 3
    with pytest.raises(TopologyError) as err:
        parse_topology(topo({"max_nodes": 2}, {"coordinator": 1, "producer": 2}), "bad.toml")
    assert "bad.toml" in str(err.value)
    assert "control.max_nodes" in str(err.value)
    assert "3 nodes" in str(err.value)
    with pytest.raises(TopologyError, match=r"control\.max_nodes"):
        parse_topology(topo({"max_nodes": "many"}, {"coordinator": 1}), "bad.toml")
    # 4096 hosts: the default grows with the deployment instead of refusing its own nodes.
    large = load_topology(REPO / "topologies" / "large.toml")
    placed = sum(n for h in large.hosts for n in h.roles.values())
    assert placed > DEFAULT_MAX_NODES
    assert large.control.max_nodes == 2 * placed


async def _disconnected(monitor: zmq.asyncio.Socket, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("the inbox never saw the sender disconnect")
        event = parse_monitor_message(await asyncio.wait_for(monitor.recv_multipart(), remaining))
        if event["event"] == zmq.EVENT_DISCONNECTED:
            return


@pytest.mark.asyncio
async def test_inbox_refuses_hellos_beyond_max_senders(short_tmp: Path) -> None:
    async with (
        open_context() as ctx,
        open_inbox(
            ctx, name="in", host="a", bind=[f"ipc://{short_tmp}/in.sock"], max_senders=2
        ) as inbox,
        contextlib.AsyncExitStack() as stack,
    ):

        async def sender(name: str) -> tuple[Outbox, contextlib.AsyncExitStack]:
            own = contextlib.AsyncExitStack()
            out = await own.enter_async_context(open_outbox(ctx, name=name, host="a"))
            await out.connect(inbox.endpoint)
            stack.push_async_callback(own.aclose)
            return out, own

        a, _ = await sender("a")
        b, b_stack = await sender("b")
        await a.wait_ready(5.0)
        await b.wait_ready(5.0)
        c, _ = await sender("c")
        with pytest.raises(DeadlineExceeded, match=r"in\.sock"):
            await c.wait_ready(0.5)
        stats = inbox.statistics()
        assert stats.dropped.get("max_senders") == 1
        assert stats.peers == 2
        # b goes away; the next newcomer's Hello first forgets it, then is admitted.
        monitor = inbox.channel.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            await b_stack.aclose()
            await _disconnected(monitor, 5.0)
        finally:
            inbox.channel.sock.disable_monitor()
            monitor.close(linger=0)
        d, _ = await sender("d")
        await d.wait_ready(5.0)
        assert await d.send({"who": "d"}, {"x": np.arange(4, dtype=np.int32)}, timeout=5.0)
        got = await inbox.recv(timeout=5.0)
        with got:
            assert got.meta["who"] == "d"
        assert inbox.statistics().peers == 2
        assert inbox.statistics().dropped.get("max_senders") == 1
        # A known sender saying Hello again (it restarted its credit state) is not a newcomer.
        assert await a.send({"who": "a"}, {"x": np.arange(4, dtype=np.int32)}, timeout=5.0)
        got = await inbox.recv(timeout=5.0)
        with got:
            assert got.meta["who"] == "a"


@pytest.mark.asyncio
async def test_forget_gone_senders_keeps_live_ones(short_tmp: Path) -> None:
    async with (
        open_context() as ctx,
        open_inbox(ctx, name="in", host="a", bind=[f"ipc://{short_tmp}/in.sock"]) as inbox,
        open_outbox(ctx, name="live", host="a") as live,
    ):
        await live.connect(inbox.endpoint)
        await live.wait_ready(5.0)
        monitor = inbox.channel.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            async with open_outbox(ctx, name="brief", host="a") as brief:
                await brief.connect(inbox.endpoint)
                await brief.wait_ready(5.0)
                assert inbox.statistics().peers == 2
            await _disconnected(monitor, 5.0)
        finally:
            inbox.channel.sock.disable_monitor()
            monitor.close(linger=0)
        await until(lambda: inbox.forget_gone_senders() == 1, 5.0, "the gone sender")
        assert inbox.statistics().peers == 1
        # The live sender got the empty probe and still sends normally.
        assert await live.send({}, {"x": np.zeros(2, np.uint8)}, timeout=5.0)
        got = await inbox.recv(timeout=5.0)
        got.release()
        assert inbox.forget_gone_senders() == 0


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_nodes"):
        HubConfig(endpoint="ipc:///tmp/x", max_nodes=0)

    async def bad_inbox() -> None:
        async with (
            open_context() as ctx,
            open_inbox(
                ctx, name="in", host="a", bind=[f"ipc:///tmp/x-{os.getpid()}"], max_senders=0
            ),
        ):
            pass

    with pytest.raises(ValueError, match="max_senders"):
        asyncio.run(bad_inbox())
