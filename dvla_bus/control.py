"""The control bus: membership, heartbeats, weight versions, commands and statistics.

On the wire (see PROTOCOL.md): the hub binds one ROUTER socket; every node, tool and supervisor
connects one DEALER socket. Everything a node says goes up to the hub; the hub answers the sender
or fans a message out to the members it concerns. The control bus has its own ZeroMQ context (own
I/O thread) and sockets, so data traffic never queues in front of a control message.

* A node sends :class:`~dvla_bus.wire.Join` until it gets a :class:`~dvla_bus.wire.Welcome`, then
  a :class:`~dvla_bus.wire.Heartbeat` every ``heartbeat_interval`` seconds; the hub acknowledges
  each with an :class:`~dvla_bus.wire.Ack`.
* The hub marks a node dead when it has not heard from it for ``heartbeat_timeout`` seconds and
  broadcasts :class:`~dvla_bus.wire.NodeDead` and the new :class:`~dvla_bus.wire.Members` table.
* A node that hears nothing from the hub for ``heartbeat_timeout`` seconds drops its socket,
  opens a new one and joins again; a hub that hears from a node it does not know (it restarted,
  or had declared the node dead) answers :class:`~dvla_bus.wire.Rejoin`. So either side may
  restart at any time.
* :class:`~dvla_bus.wire.VersionAnnounce` and :class:`~dvla_bus.wire.Command` sent to the hub are
  broadcast to their targets; the hub keeps each node's reported weight version and the latest
  announced one.
* :class:`~dvla_bus.wire.Query` needs no membership: the hub answers with a
  :class:`~dvla_bus.wire.Status` (the inspection tools and the supervisor use it).
* The membership table is bounded: the hub admits at most ``max_nodes`` members. A Join under
  a new name when the table is full first evicts the longest-dead member; if none is dead, the
  Join is refused, counted (``joins_refused``) and answered with a
  :class:`~dvla_bus.wire.NodeDead` naming the joiner, its reason starting with
  :data:`REFUSED` (the joiner logs it and keeps
  trying, so it is admitted once a place frees up). A new incarnation of a known name always
  takes its old row.

The hub never blocks on a slow or vanished member: fan-out uses non-blocking sends, and a message
that cannot be queued is dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Final

import psutil
import zmq
import zmq.asyncio

from dvla_bus import wire
from dvla_bus.errors import DeadlineExceeded
from dvla_bus.security import Credentials, client_options, is_remote, zap_statistics
from dvla_bus.sockets import Channel, bound_endpoint, open_context, open_socket

__all__ = [
    "DEFAULT_MAX_NODES",
    "REFUSED",
    "ControlClient",
    "ControlHub",
    "HubConfig",
    "JoinInfo",
    "open_control_client",
    "open_control_hub",
]

log = logging.getLogger(__name__)

#: Largest control message accepted (ZMQ_MAXMSGSIZE): a peer sending a bigger frame is
#: disconnected by ZeroMQ before any of it is buffered.
CONTROL_MAX_MESSAGE: Final = 4 * 1024 * 1024
CONTROL_TOPIC: Final = "control"
HWM: Final = 10_000
#: Members a hub admits unless configured otherwise (``[control] max_nodes``).
DEFAULT_MAX_NODES: Final = 4096
#: How the ``reason`` of a :class:`~dvla_bus.wire.NodeDead` answering a refused Join starts.
REFUSED: Final = "refused:"
#: Seconds between log lines about refused joins (each refusal is counted).
_REFUSAL_LOG_EVERY_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class HubConfig:
    """Where the hub listens, its heartbeat contract (seconds) and how many members it admits
    (rows of the membership table, dead ones included until evicted)."""

    endpoint: str
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 5.0
    credentials: Credentials | None = None  # CURVE on tcp:// endpoints when given
    max_nodes: int = DEFAULT_MAX_NODES

    def __post_init__(self) -> None:
        if self.max_nodes < 1:
            raise ValueError(f"max_nodes must be >= 1, got {self.max_nodes}")


@dataclass(slots=True)
class _Member:
    join: wire.Join
    peer: bytes
    joined: float
    last_seen: float  # monotonic
    state: str
    weight_version: int
    counters: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)

    def info(self, now: float) -> wire.MemberInfo:
        return wire.MemberInfo(
            node=self.join.node,
            role=self.join.role,
            host=self.join.host,
            index=self.join.index,
            pid=self.join.pid,
            state=self.state,
            weight_version=self.weight_version,
            heartbeat_age=max(0.0, now - self.last_seen),
            joined=self.joined,
            endpoints=self.join.endpoints,
            counters=self.counters,
            gauges=self.gauges,
        )


class ControlHub:
    """The membership table and fan-out point of the control bus. Create with
    :func:`open_control_hub`. Single event loop; not thread-safe."""

    def __init__(self, config: HubConfig, channel: Channel) -> None:
        self.config = config
        self.channel = channel
        self.endpoint = bound_endpoint(channel.sock)
        self.epoch = uuid.uuid4().hex[:12]
        self.latest_version = -1
        self.counters: Counter[str] = Counter()
        self._members: dict[str, _Member] = {}
        self._started = time.monotonic()
        self._refusal_logged = -_REFUSAL_LOG_EVERY_S

    # --- queries -------------------------------------------------------------------------

    def members(self) -> tuple[wire.MemberInfo, ...]:
        now = time.monotonic()
        return tuple(m.info(now) for m in sorted(self._members.values(), key=lambda m: m.join.node))

    def versions(self) -> dict[str, int]:
        return {n: m.weight_version for n, m in self._members.items() if m.state != "dead"}

    def statistics(self) -> dict[str, int]:
        stats = dict(self.counters)
        stats.update({f"dropped.{k}": v for k, v in self.channel.dropped.items()})
        stats.update(zap_statistics(self.channel.sock.context))
        stats["members.alive"] = sum(1 for m in self._members.values() if m.state != "dead")
        stats["members.dead"] = sum(1 for m in self._members.values() if m.state == "dead")
        return stats

    # --- serving -------------------------------------------------------------------------

    async def serve(self) -> None:
        """Receive and handle messages forever (cancel to stop)."""
        while True:
            peer, received = await self.channel.recv()
            assert peer is not None
            self.counters[f"received.{received.msg.__struct_config__.tag}"] += 1
            await self._handle(peer, received.msg)

    async def watch(self) -> None:
        """Declare members dead when their heartbeats stop (cancel to stop)."""
        period = min(self.config.heartbeat_interval, self.config.heartbeat_timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for member in list(self._members.values()):
                silent = now - member.last_seen
                if member.state != "dead" and silent > self.config.heartbeat_timeout:
                    await self._declare_dead(member, f"no heartbeat for {silent:.1f}s")

    async def _declare_dead(self, member: _Member, reason: str) -> None:
        member.state = "dead"
        self.counters["deaths"] += 1
        log.warning("hub: %s (pid %d) is dead: %s", member.join.node, member.join.pid, reason)
        await self._broadcast(wire.NodeDead(node=member.join.node, reason=reason))
        await self._broadcast_members()

    async def _handle(self, peer: bytes, msg: wire.Message) -> None:
        now = time.monotonic()
        match msg:
            case wire.Join():
                old = self._members.get(msg.node)
                if old is None and not self._make_room():
                    await self._refuse(peer, msg)
                    return
                self._members[msg.node] = _Member(
                    join=msg,
                    peer=peer,
                    joined=time.time(),
                    last_seen=now,
                    state="running",
                    weight_version=msg.weight_version,
                )
                self.counters["joins"] += 1
                if old is not None and old.join.pid != msg.pid and old.state != "dead":
                    # A new incarnation under the same name: the old one is gone for good.
                    await self._broadcast(wire.NodeDead(node=msg.node, reason="replaced"))
                log.info("hub: %s joined (pid %d, host %s)", msg.node, msg.pid, msg.host)
                await self.channel.send(
                    wire.Welcome(
                        epoch=self.epoch,
                        heartbeat_interval=self.config.heartbeat_interval,
                        heartbeat_timeout=self.config.heartbeat_timeout,
                        latest_version=self.latest_version,
                    ),
                    CONTROL_TOPIC,
                    to=peer,
                    block=False,
                )
                await self._broadcast_members()
            case wire.Heartbeat():
                member = self._members.get(msg.node)
                if member is None or member.state == "dead" or member.peer != peer:
                    self.counters["rejoins_requested"] += 1
                    await self.channel.send(
                        wire.Rejoin(epoch=self.epoch), CONTROL_TOPIC, to=peer, block=False
                    )
                    return
                member.last_seen = now
                member.counters = msg.counters
                member.gauges = msg.gauges
                member.weight_version = msg.weight_version
                member.state = msg.state
                await self.channel.send(
                    wire.Ack(epoch=self.epoch, of_seq=msg.seq), CONTROL_TOPIC, to=peer, block=False
                )
            case wire.Leave():
                member = self._members.pop(msg.node, None)
                if member is not None and member.peer == peer:
                    self.counters["leaves"] += 1
                    log.info("hub: %s left (%s)", msg.node, msg.reason or "no reason given")
                    await self._broadcast(wire.NodeDead(node=msg.node, reason=f"left {msg.reason}"))
                    await self._broadcast_members()
                elif member is not None:
                    self._members[msg.node] = member  # a stale incarnation's goodbye
            case wire.VersionAnnounce():
                self.latest_version = max(self.latest_version, msg.version)
                self.counters["versions"] += 1
                await self._broadcast(msg)
            case wire.Command():
                self.counters[f"commands.{msg.command}"] += 1
                await self._broadcast(msg, target=msg.target)
            case wire.Query():
                await self.channel.send(
                    wire.Status(
                        epoch=self.epoch,
                        latest_version=self.latest_version,
                        members=self.members(),
                        counters=self.statistics(),
                        uptime=now - self._started,
                    ),
                    CONTROL_TOPIC,
                    to=peer,
                    block=False,
                )
            case _:
                self.channel.count_drop("unexpected", f"a hub does not accept {type(msg).__name__}")

    def _make_room(self) -> bool:
        """True when a new member fits: the table has room, or a dead row was evicted (the
        one silent the longest)."""
        if len(self._members) < self.config.max_nodes:
            return True
        dead = [m for m in self._members.values() if m.state == "dead"]
        if not dead:
            return False
        oldest = min(dead, key=lambda m: m.last_seen)
        del self._members[oldest.join.node]
        self.counters["members.evicted"] += 1
        return True

    async def _refuse(self, peer: bytes, join: wire.Join) -> None:
        self.counters["joins_refused"] += 1
        reason = (
            f"{REFUSED} the hub admits at most {self.config.max_nodes} members "
            "([control] max_nodes) and none of them is dead"
        )
        now = time.monotonic()
        if now - self._refusal_logged >= _REFUSAL_LOG_EVERY_S:
            self._refusal_logged = now
            log.warning(
                "hub: %s (pid %d) %s (%d refused so far)",
                join.node,
                join.pid,
                reason,
                self.counters["joins_refused"],
            )
        await self.channel.send(
            wire.NodeDead(node=join.node, reason=reason), CONTROL_TOPIC, to=peer, block=False
        )

    def _targets(self, target: str) -> list[_Member]:
        alive = [m for m in self._members.values() if m.state != "dead"]
        if target == "*":
            return alive
        if target.startswith("role:"):
            return [m for m in alive if m.join.role == target[5:]]
        return [m for m in alive if m.join.node == target]

    async def _broadcast(self, msg: wire.Message, target: str = "*") -> None:
        frames = self.channel.frames(msg, CONTROL_TOPIC)
        for member in self._targets(target):
            try:
                await self.channel.sock.send_multipart([member.peer, *frames], flags=zmq.NOBLOCK)
                self.counters["broadcast.sent"] += 1
            except zmq.Again:
                self.channel.count_drop("send_queue_full", f"broadcast to {member.join.node}")
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                self.channel.count_drop("unroutable", f"broadcast to {member.join.node}")

    async def _broadcast_members(self) -> None:
        await self._broadcast(wire.Members(epoch=self.epoch, members=self.members()))


@contextlib.asynccontextmanager
async def open_control_hub(config: HubConfig, name: str = "hub") -> AsyncIterator[ControlHub]:
    """Bind the hub at ``config.endpoint`` (``tcp://host:0`` picks a free port; read
    :attr:`ControlHub.endpoint`) and serve until the block exits."""
    async with (
        open_context(credentials=config.credentials) as ctx,
        open_socket(
            ctx,
            zmq.ROUTER,
            bind=config.endpoint,
            options={
                zmq.ROUTER_MANDATORY: 1,
                zmq.MAXMSGSIZE: CONTROL_MAX_MESSAGE,
                zmq.SNDHWM: HWM,
                zmq.RCVHWM: HWM,
            },
            credentials=config.credentials,
        ) as sock,
    ):
        hub = ControlHub(config, Channel(sock, name, routed=True))
        tasks = [asyncio.create_task(hub.serve()), asyncio.create_task(hub.watch())]
        try:
            yield hub
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


# --- the node side ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JoinInfo:
    """Who a member is; ``node`` must be stable across restarts."""

    node: str
    role: str
    host: str
    index: int
    endpoints: dict[str, str] = field(default_factory=dict)


StatsFn = Callable[[], tuple[dict[str, int], dict[str, float]]]
MessageFn = Callable[[wire.Message], None]


class ControlClient:
    """A node's (or tool's) connection to the hub. Create with :func:`open_control_client`.

    As a member (``join`` given) it joins, heartbeats and rejoins by itself; messages the hub
    fans out (commands, versions, membership, deaths) are passed to ``on_message``. Without
    ``join`` it is an observer that can only :meth:`query` and :meth:`send`."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str,
        join: JoinInfo | None,
        *,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        on_message: MessageFn | None,
        stats: StatsFn | None,
        credentials: Credentials | None = None,
    ) -> None:
        self._ctx = ctx
        self._credentials = credentials
        self.endpoint = endpoint
        self.join_info = join
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self._on_message = on_message
        self._stats = stats
        self.state: wire.NodeState = "starting"
        self.weight_version = -1
        self.joined = asyncio.Event()
        self.hub_epoch = ""
        self.members: tuple[wire.MemberInfo, ...] = ()
        self.latest_version = -1
        self.reconnects = 0
        #: The hub's reason when it refused to admit this member (empty once welcomed).
        self.refused = ""
        self._refused_logged = -_REFUSAL_LOG_EVERY_S
        self._last_heard = time.monotonic()
        self._sock: zmq.asyncio.Socket | None = None
        self._channel: Channel | None = None
        self._status_waiters: list[asyncio.Future[wire.Status]] = []
        self._wake = asyncio.Event()
        self._dropped: Counter[str] = Counter()

    # --- socket lifecycle ----------------------------------------------------------------

    def _open(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, CONTROL_MAX_MESSAGE)
        sock.setsockopt(zmq.SNDHWM, 1000)
        # Never queue messages for a hub that is not connected: after a hub restart the first
        # thing it hears is our next heartbeat (answered by Rejoin), not a backlog.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        # ZMTP heartbeats tear down a TCP connection whose peer vanished without a FIN, so the
        # socket reconnects instead of waiting on a dead connection.
        sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(self.heartbeat_interval * 1000)))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(self.heartbeat_timeout * 1000)))
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if self._credentials is not None and is_remote(self.endpoint):
            for opt, value in client_options(self._credentials).items():
                sock.setsockopt(opt, value)
        sock.connect(self.endpoint)
        self._sock = sock
        sender = self.join_info.node if self.join_info else f"observer.{os.getpid()}"
        self._channel = Channel(sock, sender)

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    @property
    def channel(self) -> Channel:
        assert self._channel is not None, "control client is closed"
        return self._channel

    # --- public API ----------------------------------------------------------------------

    async def send(self, msg: wire.Message) -> bool:
        """Send a message to the hub (a command or version announcement to fan out)."""
        return await self.channel.send(msg, CONTROL_TOPIC, block=False)

    async def query(self, timeout: float = 5.0) -> wire.Status:
        """Ask the hub for its :class:`~dvla_bus.wire.Status`; raises :class:`DeadlineExceeded`
        naming the endpoint if no answer arrives within ``timeout`` seconds."""
        fut: asyncio.Future[wire.Status] = asyncio.get_running_loop().create_future()
        self._status_waiters.append(fut)
        deadline = time.monotonic() + timeout
        try:
            # Re-ask every second: with IMMEDIATE a query sent before the connection is up is
            # dropped rather than queued.
            while True:
                await self.channel.send(wire.Query(), CONTROL_TOPIC, block=False, count=False)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded(
                        f"control hub at {self.endpoint} did not answer within {timeout:.1f}s"
                    )
                # asyncio.wait, not wait_for: on Python 3.11 wait_for returns the result and
                # drops a cancellation that arrives just as the result does.
                await asyncio.wait({fut}, timeout=min(1.0, remaining))
                if fut.done():
                    return fut.result()
        finally:
            if fut in self._status_waiters:
                self._status_waiters.remove(fut)
            fut.cancel()

    def update(
        self, *, state: wire.NodeState | None = None, weight_version: int | None = None
    ) -> None:
        """Change what the next heartbeat reports; a change is sent at once."""
        changed = False
        if state is not None and state != self.state:
            self.state, changed = state, True
        if weight_version is not None and weight_version != self.weight_version:
            self.weight_version, changed = weight_version, True
        if changed:
            self._wake.set()

    async def leave(self, reason: str = "") -> None:
        if self.join_info is not None and self._channel is not None and self.joined.is_set():
            await self.send(wire.Leave(node=self.join_info.node, reason=reason))

    def statistics(self) -> dict[str, int]:
        stats = {f"control.dropped.{k}": v for k, v in self.channel.dropped.items()}
        stats["control.hub_lost"] = self.reconnects
        return stats

    # --- tasks ---------------------------------------------------------------------------

    async def receive_loop(self) -> None:
        channel = self.channel
        while True:
            _, received = await channel.recv()
            self._last_heard = time.monotonic()
            msg = received.msg
            match msg:
                case wire.Welcome():
                    self.refused = ""
                    self.hub_epoch = msg.epoch
                    self.latest_version = max(self.latest_version, msg.latest_version)
                    self.joined.set()
                    self._wake.set()
                case wire.Rejoin():
                    self.joined.clear()
                    self._wake.set()
                case wire.Ack():
                    pass
                case wire.Status():
                    self.hub_epoch = self.hub_epoch or msg.epoch
                    for fut in self._status_waiters:
                        if not fut.done():
                            fut.set_result(msg)
                case wire.Members():
                    self.members = msg.members
                    self._deliver(msg)
                case wire.VersionAnnounce():
                    self.latest_version = max(self.latest_version, msg.version)
                    self._deliver(msg)
                case wire.NodeDead() if (
                    self.join_info is not None
                    and msg.node == self.join_info.node
                    and msg.reason.startswith(REFUSED)
                    and not self.joined.is_set()
                ):
                    self._on_refused(msg.reason)
                case wire.Command() | wire.NodeDead():
                    self._deliver(msg)
                case _:
                    channel.count_drop("unexpected", f"a node does not accept {type(msg).__name__}")

    def _on_refused(self, reason: str) -> None:
        # The hub answered our Join with a refusal (its table is full); Join is retried every
        # heartbeat interval, so we get in once a place frees up.
        self.refused = reason
        now = time.monotonic()
        if now - self._refused_logged >= _REFUSAL_LOG_EVERY_S:
            self._refused_logged = now
            name = self.join_info.node if self.join_info is not None else "?"
            log.warning("%s: the control hub at %s %s", name, self.endpoint, reason)

    def _deliver(self, msg: wire.Message) -> None:
        if self._on_message is not None:
            self._on_message(msg)

    async def heartbeat_loop(self) -> None:
        """Join, heartbeat, and join again when the hub has gone quiet."""
        info = self.join_info
        assert info is not None
        while True:
            if (
                self.joined.is_set()
                and time.monotonic() - self._last_heard > self.heartbeat_timeout
            ):
                log.warning(
                    "%s: no word from the control hub at %s for %.1fs; joining again",
                    info.node,
                    self.endpoint,
                    self.heartbeat_timeout,
                )
                self.reconnects += 1
                self.joined.clear()
            if not self.joined.is_set():
                await self.channel.send(
                    wire.Join(
                        node=info.node,
                        role=info.role,
                        host=info.host,
                        index=info.index,
                        pid=os.getpid(),
                        started=_process_start_time(),
                        endpoints=info.endpoints,
                        weight_version=self.weight_version,
                    ),
                    CONTROL_TOPIC,
                    block=False,
                    count=False,  # retried every interval until welcomed
                )
            else:
                counters, gauges = self._stats() if self._stats is not None else ({}, {})
                counters = {**counters, **self.statistics()}
                await self.send(
                    wire.Heartbeat(
                        node=info.node,
                        state=self.state,
                        weight_version=self.weight_version,
                        counters=counters,
                        gauges=gauges,
                    )
                )
            self._wake.clear()
            await _wait_event(self._wake, self.heartbeat_interval)


async def _wait_event(event: asyncio.Event, timeout: float) -> None:
    """Wait until ``event`` is set, at most ``timeout`` seconds. Not ``asyncio.wait_for``: on
    Python 3.11 that swallows a cancellation arriving as the event fires, and this loop would
    then outlive its owner (seen as a hang on closing a client)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()


def _process_start_time() -> float:
    return float(psutil.Process().create_time())


@contextlib.asynccontextmanager
async def open_control_client(
    endpoint: str,
    join: JoinInfo | None = None,
    *,
    heartbeat_interval: float = 0.5,
    heartbeat_timeout: float = 5.0,
    on_message: MessageFn | None = None,
    stats: StatsFn | None = None,
    credentials: Credentials | None = None,
) -> AsyncIterator[ControlClient]:
    """Connect to the hub at ``endpoint`` in a private context. As a member, joining starts at
    once (await ``client.joined.wait()`` to know it is done); on exit the member says
    :class:`~dvla_bus.wire.Leave` and everything is closed."""
    async with open_context() as ctx:
        client = ControlClient(
            ctx,
            endpoint,
            join,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            on_message=on_message,
            stats=stats,
            credentials=credentials,
        )
        client._open()
        tasks = [asyncio.create_task(client.receive_loop())]
        if join is not None:
            tasks.append(asyncio.create_task(client.heartbeat_loop()))
        try:
            yield client
            with contextlib.suppress(Exception):
                await client.leave("stopping")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            client._close()
