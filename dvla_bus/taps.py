"""Listening to a running job's data bus through the nodes' taps (what ``dvla bus echo / hz /
bw / record`` use).

Every inbox may bind a tap (an XPUB socket, advertised as ``endpoints["tap"]`` in its Join).
:func:`open_tap` asks the control hub for the membership table, connects one SUB socket to every
live tap and subscribes to the requested topics; the inbox publishes copies only for topics
somebody subscribed to, so a job nobody inspects pays nothing. The tap subscriber's queue is
bounded (``RCVHWM``): a slow tool loses copies (counted at the tap), it never slows the job.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from dvla_bus import wire
from dvla_bus.control import open_control_client
from dvla_bus.errors import DeadlineExceeded, WireError
from dvla_bus.security import Credentials, client_options, is_remote
from dvla_bus.sockets import open_context

__all__ = ["Tap", "TapMessage", "open_tap", "tap_endpoints"]


def tap_endpoints(status: wire.Status) -> dict[str, str]:
    """node -> tap endpoint for every live member that has a tap."""
    return {
        m.node: m.endpoints["tap"]
        for m in status.members
        if m.state != "dead" and m.endpoints.get("tap")
    }


@dataclass(frozen=True, slots=True)
class TapMessage:
    """One copied message: the raw frames (for recording) and their decoded form."""

    frames: tuple[bytes, ...]
    received: wire.Received
    nbytes: int


@dataclass(slots=True)
class Tap:
    """A SUB socket on every tap of the job. Not thread-safe."""

    sock: zmq.asyncio.Socket
    endpoints: dict[str, str]
    malformed: int = 0
    _seen: set[str] = field(default_factory=set)

    async def recv(self) -> TapMessage:
        while True:
            raw = await self.sock.recv_multipart()
            frames = tuple(bytes(f) for f in raw)
            try:
                received = wire.decode(frames)
            except WireError:
                self.malformed += 1
                continue
            return TapMessage(frames, received, sum(len(f) for f in frames))


@contextlib.asynccontextmanager
async def open_tap(
    control_endpoint: str,
    topics: Sequence[str] = ("",),
    timeout: float = 5.0,
    hwm: int = 1000,
    credentials: Credentials | None = None,
) -> AsyncIterator[Tap]:
    """Subscribe to ``topics`` (prefixes; ``""`` is everything) on every tap of the job whose
    hub is at ``control_endpoint``. Raises :class:`DeadlineExceeded` if the hub does not answer
    and :class:`~dvla_bus.errors.ConfigError`-like :class:`DeadlineExceeded` if no node has a
    tap."""
    async with open_control_client(control_endpoint, credentials=credentials) as client:
        status = await client.query(timeout=timeout)
    endpoints = tap_endpoints(status)
    if not endpoints:
        raise DeadlineExceeded(
            f"no node of the job at {control_endpoint} has a data tap (no inbox is running)"
        )
    async with open_context() as ctx:
        sock = ctx.socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, hwm)
            for topic in topics:
                sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
            remote = [e for e in endpoints.values() if is_remote(e)]
            if credentials is not None and remote:
                for opt, value in client_options(credentials).items():
                    sock.setsockopt(opt, value)
            for endpoint in endpoints.values():
                sock.connect(endpoint)
            yield Tap(sock, endpoints)
        finally:
            sock.close(linger=0)


def summarize(array: Any) -> str:
    """``dtype[shape] min=.. max=.. mean=..`` for an array (empty arrays: no statistics)."""
    shape = ",".join(str(n) for n in array.shape)
    text = f"{array.dtype}[{shape}]"
    if array.size and array.dtype.kind in "biuf":
        text += f" min={array.min():.4g} max={array.max():.4g} mean={array.mean():.4g}"
    return text
