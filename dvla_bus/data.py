"""The data bus: high-bandwidth messages (observations, actions, trajectories, weight chunks).

It has its own ZeroMQ context (own I/O thread), separate from the control bus, so bulk bytes
never queue in front of control messages (plane decoupling). This module holds the socket-level
transport; same-host payloads in shared memory and credit-based flow control build on it.

A :class:`Publisher` binds and fans out round-robin to connected subscribers (PUSH); a
:class:`Subscriber` connects to any number of publishers (PULL) and receives validated
:class:`~dvla_bus.wire.Received` messages whose arrays are zero-copy views of the frames.
Sending never blocks the node forever: with ``block=False`` a full queue is a counted drop.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import numpy as np
import zmq
import zmq.asyncio

from dvla_bus import wire
from dvla_bus.sockets import Channel, ChannelStats, bound_endpoint, open_context, open_socket

__all__ = ["DataBus", "Publisher", "Subscriber", "open_data_bus"]

#: Largest data message accepted per frame (ZMQ_MAXMSGSIZE), bytes.
DATA_MAX_FRAME: Final = 1 << 31
#: Payloads at least this big are sent without a copy (MEASURED.md: zero-copy loses below
#: ~64 KiB because of the per-frame bookkeeping, wins ~2x from 1 MiB).
COPY_THRESHOLD: Final = 64 * 1024


class Publisher:
    """A bound data socket. Not thread-safe."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.endpoint = bound_endpoint(channel.sock)

    async def send(
        self,
        msg: wire.Message,
        topic: str,
        arrays: Sequence[np.ndarray[Any, Any]] = (),
        *,
        block: bool = False,
    ) -> bool:
        return await self.channel.send(msg, topic, arrays, block=block)

    def statistics(self) -> ChannelStats:
        return self.channel.statistics()


class Subscriber:
    """A data socket that connects to publishers as they are discovered. Not thread-safe."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.connected: set[str] = set()

    def connect(self, endpoint: str) -> None:
        if endpoint not in self.connected:
            self.channel.sock.connect(endpoint)
            self.connected.add(endpoint)

    def disconnect(self, endpoint: str) -> None:
        if endpoint in self.connected:
            with contextlib.suppress(zmq.ZMQError):
                self.channel.sock.disconnect(endpoint)
            self.connected.discard(endpoint)

    async def recv(self) -> wire.Received:
        _, received = await self.channel.recv()
        return received

    def statistics(self) -> ChannelStats:
        return self.channel.statistics()


class DataBus:
    """The data plane of one node: a private context plus the sockets opened on it."""

    def __init__(self, ctx: zmq.asyncio.Context, stack: contextlib.AsyncExitStack, name: str):
        self._ctx = ctx
        self._stack = stack
        self.name = name

    async def publisher(self, bind: str, hwm: int = 64) -> Publisher:
        sock = await self._stack.enter_async_context(
            open_socket(
                self._ctx,
                zmq.PUSH,
                bind=bind,
                options={zmq.SNDHWM: hwm},
            )
        )
        sock.copy_threshold = COPY_THRESHOLD
        return Publisher(Channel(sock, self.name))

    async def subscriber(self, hwm: int = 64, max_frame: int = DATA_MAX_FRAME) -> Subscriber:
        sock = await self._stack.enter_async_context(
            open_socket(
                self._ctx,
                zmq.PULL,
                options={zmq.RCVHWM: hwm, zmq.MAXMSGSIZE: max_frame},
            )
        )
        return Subscriber(Channel(sock, self.name))


@contextlib.asynccontextmanager
async def open_data_bus(name: str) -> AsyncIterator[DataBus]:
    """The data plane's context; every socket opened through it is closed on exit."""
    async with open_context() as ctx, contextlib.AsyncExitStack() as stack:
        yield DataBus(ctx, stack, name)
