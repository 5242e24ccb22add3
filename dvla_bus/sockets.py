"""Owned ZeroMQ contexts and sockets, and the :class:`Channel` that speaks :mod:`dvla_bus.wire`.

Each plane (control, data) gets its own :class:`zmq.asyncio.Context`, hence its own I/O thread:
MEASURED.md shows a shared context's I/O thread becoming the bottleneck that delays control
messages behind bulk data. Contexts and sockets are opened by async context managers and closed
with ``linger=0`` on every path: delivery rests on acknowledgements, never on LINGER.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import zmq
import zmq.asyncio

from dvla_bus import wire
from dvla_bus.errors import ResourceError, WireError
from dvla_bus.security import (
    Credentials,
    client_options,
    is_remote,
    open_zap,
    server_options,
)

__all__ = [
    "Channel",
    "ChannelStats",
    "check_endpoint",
    "open_context",
    "open_socket",
]

log = logging.getLogger(__name__)

_NOBLOCK: Final = int(zmq.NOBLOCK)  # a plain int: IntFlag arithmetic is slow on hot paths
IPC_PATH_MAX: Final = 107  # sun_path is 108 bytes including the terminating NUL
LOG_EVERY_S: Final = 5.0


def check_endpoint(endpoint: str) -> str:
    """Validate an endpoint string; returns it (``tcp://host:0`` is rewritten to ZeroMQ's ``*``)."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        if not path:
            raise ResourceError(f"endpoint {endpoint!r}: empty ipc path")
        if len(path.encode()) > IPC_PATH_MAX:
            raise ResourceError(
                f"endpoint {endpoint!r}: ipc path is {len(path.encode())} bytes, the limit is"
                f" {IPC_PATH_MAX}; use a shorter run directory"
            )
        return endpoint
    if endpoint.startswith("tcp://"):
        host, sep, port = endpoint[len("tcp://") :].rpartition(":")
        if not sep or not host:
            raise ResourceError(f"endpoint {endpoint!r}: expected tcp://HOST:PORT")
        if port == "0":
            return f"tcp://{host}:*"
        if port != "*" and not (port.isdigit() and 0 < int(port) < 65536):
            raise ResourceError(f"endpoint {endpoint!r}: bad port {port!r}")
        return endpoint
    if endpoint.startswith("inproc://"):
        return endpoint
    raise ResourceError(f"endpoint {endpoint!r}: expected tcp://, ipc:// or inproc://")


@contextlib.asynccontextmanager
async def open_context(
    io_threads: int = 1, credentials: Credentials | None = None
) -> AsyncIterator[zmq.asyncio.Context]:
    """A private ZeroMQ context (one per plane); terminated on exit. With ``credentials`` its
    CURVE server sockets admit only the deployment's client keys (a ZAP handler runs on the
    event loop for the context's lifetime)."""
    ctx = zmq.asyncio.Context(io_threads=io_threads)
    try:
        async with open_zap(ctx, credentials):
            yield ctx
    finally:
        ctx.destroy(linger=0)


@contextlib.asynccontextmanager
async def open_socket(
    ctx: zmq.asyncio.Context,
    socket_type: int,
    *,
    bind: str | None = None,
    connect: Sequence[str] = (),
    options: dict[int, Any] | None = None,
    credentials: Credentials | None = None,
    monitor: int = 0,
) -> AsyncIterator[zmq.asyncio.Socket]:
    """A socket bound and/or connected as asked, closed with linger 0 on exit.

    ``monitor``, a mask of ``zmq.EVENT_*``, attaches a monitor *before* binding or connecting
    (so no event is missed); ``sock.get_monitor_socket()`` then returns its PAIR socket, which
    is closed with the socket.

    With ``credentials`` and a ``tcp://`` endpoint the socket speaks CURVE: as a server when
    it binds, as a client when it connects (the context must have been opened with the same
    credentials for its ZAP handler). ``ipc://`` socket files are made private to the user
    (0600) and removed on exit. Errors name the endpoint."""
    sock = ctx.socket(socket_type)
    ipc_file: str | None = None
    mon: zmq.asyncio.Socket | None = None
    try:
        sock.setsockopt(zmq.LINGER, 0)
        opts = dict(options or {})
        if credentials is not None:
            if bind is not None and is_remote(bind):
                opts.update(server_options(credentials))
            elif bind is None and any(is_remote(c) for c in connect):
                opts.update(client_options(credentials))
        for opt, value in opts.items():
            sock.setsockopt(opt, value)
        if monitor:
            mon = sock.get_monitor_socket(monitor)
        if bind is not None:
            endpoint = check_endpoint(bind)
            if endpoint.startswith("ipc://"):
                ipc_file = endpoint[len("ipc://") :]
                os.makedirs(os.path.dirname(ipc_file) or ".", exist_ok=True)
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                ipc_file = None
                raise ResourceError(f"cannot bind {endpoint}: {exc}") from None
            if ipc_file is not None:
                os.chmod(ipc_file, 0o600)
        for target in connect:
            try:
                sock.connect(check_endpoint(target))
            except zmq.ZMQError as exc:
                raise ResourceError(f"cannot connect to {target}: {exc}") from None
        yield sock
    finally:
        if mon is not None:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            mon.close(linger=0)
        sock.close(linger=0)
        if ipc_file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ipc_file)


def bound_endpoint(sock: zmq.asyncio.Socket) -> str:
    """The endpoint a socket actually bound (resolves ``tcp://host:*`` to the chosen port)."""
    value = sock.getsockopt(zmq.LAST_ENDPOINT)
    assert isinstance(value, bytes)
    return value.decode()


@dataclass(frozen=True, slots=True)
class ChannelStats:
    """Counters of one channel: messages and bytes each way, and drops by reason."""

    sent: int
    received: int
    bytes_sent: int
    bytes_received: int
    dropped: dict[str, int]


class Channel:
    """A socket that sends and receives :mod:`dvla_bus.wire` messages.

    Sending stamps sender, sequence number and time. Receiving validates every message; a
    malformed one is dropped, counted under its reason and logged at most once per
    ``LOG_EVERY_S`` per reason, and the channel keeps going. Not thread-safe (one event loop)."""

    def __init__(self, sock: zmq.asyncio.Socket, sender: str, *, routed: bool = False) -> None:
        self.sock = sock
        self.sender = sender
        self.routed = routed  # ROUTER socket: frames are prefixed with the peer's routing id
        self._seq = 0
        self._sent = 0
        self._received = 0
        self._bytes_sent = 0
        self._bytes_received = 0
        self.dropped: Counter[str] = Counter()
        self._last_log: dict[str, float] = {}

    def count_drop(self, reason: str, detail: str) -> None:
        """Count a dropped message and log it, rate-limited per reason."""
        self.dropped[reason] += 1
        now = time.monotonic()
        if now - self._last_log.get(reason, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last_log[reason] = now
            log.warning(
                "%s: dropped message (%s, %d so far): %s",
                self.sender,
                reason,
                self.dropped[reason],
                detail,
            )

    def frames(
        self, msg: wire.Message, topic: str = "", arrays: Sequence[np.ndarray[Any, Any]] = ()
    ) -> list[wire.Frame]:
        self._seq += 1
        return wire.encode(topic, wire.stamp(msg, self.sender, self._seq, time.time()), arrays)

    async def send(
        self,
        msg: wire.Message,
        topic: str = "",
        arrays: Sequence[np.ndarray[Any, Any]] = (),
        *,
        to: bytes | None = None,
        block: bool = True,
        count: bool = True,
    ) -> bool:
        """Send one message; with ``block=False`` a full queue or an unknown peer counts a drop
        (``send_queue_full`` / ``unroutable``; not counted with ``count=False``, for messages
        that are retried anyway) and returns False instead of waiting."""
        frames: list[Any] = self.frames(msg, topic, arrays)
        if self.routed:
            if to is None:
                raise ValueError("a routed channel needs the peer's routing id")
            frames.insert(0, to)
        flags = 0 if block else zmq.NOBLOCK
        try:
            await self.sock.send_multipart(frames, flags=flags, copy=False)
        except zmq.Again:
            if count:
                self.count_drop("send_queue_full", f"{type(msg).__name__} not sent")
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self.count_drop("unroutable", f"{type(msg).__name__}: peer gone")
                return False
            raise
        self._sent += 1
        self._bytes_sent += sum(len(f) if isinstance(f, bytes) else f.nbytes for f in frames)
        return True

    def send_frames_nowait(self, frames: list[Any]) -> None:
        """Send already-encoded frames without creating a Future (raises ``zmq.Again`` when the
        queue is full). This is pyzmq's own short-circuit for a send that can complete at once
        (``zmq._future._AsyncSocket._add_send_event``), minus the Future: on the hot path of
        small data messages the Future machinery costs more than the send."""
        internals: Any = self.sock  # pyzmq's private async-socket state, typed loosely
        internals._shadow_sock.send_multipart(frames, flags=_NOBLOCK, copy=False)
        if internals._recv_futures:
            # A send can consume the edge-triggered FD's readiness; let pending receivers
            # re-check, exactly as pyzmq does after its own short-circuit send.
            internals._schedule_remaining_events()
        self._sent += 1

    def recv_nowait(self) -> tuple[bytes | None, wire.Received] | None:
        """The next valid message if one is already queued, else None (no Future, no wait).
        Used to drain a burst after an awaited :meth:`recv`."""
        internals: Any = self.sock
        shadow = internals._shadow_sock
        while True:
            try:
                frames = shadow.recv_multipart(flags=_NOBLOCK, copy=False)
            except zmq.Again:
                return None
            got = self._accept(frames)
            if got is not None:
                return got

    async def recv(self) -> tuple[bytes | None, wire.Received]:
        """The next valid message (and the peer's routing id on a routed channel)."""
        while True:
            got = self._accept(await self.sock.recv_multipart(copy=False))
            if got is not None:
                return got

    def _accept(self, frames: list[Any]) -> tuple[bytes | None, wire.Received] | None:
        """Validate one multipart message; a bad one is counted and dropped (None)."""
        peer: bytes | None = None
        if self.routed:
            peer = frames[0].bytes
            frames = frames[1:]
        try:
            received = wire.decode(frames)
        except WireError as exc:
            self.count_drop(exc.reason, exc.detail)
            return None
        self._received += 1
        self._bytes_received += received.nbytes
        return peer, received

    def statistics(self) -> ChannelStats:
        return ChannelStats(
            sent=self._sent,
            received=self._received,
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
            dropped=dict(self.dropped),
        )
