"""Data-bus transport with credit-based flow control: :class:`Outbox` (sender) and
:class:`Inbox` (receiver).

An inbox binds a ROUTER socket (``ipc://`` and/or ``tcp://``); outboxes connect one DEALER per
inbox. The path is chosen from where the peers are:

* **same host** (the inbox reports the same host identity): the outbox writes the arrays into a
  slab of its own shared-memory :class:`~dvla_bus.pool.SlabPool` and sends only a small
  :class:`~dvla_bus.wire.ShmData` descriptor; the inbox maps the slab and hands the consumer
  read-only numpy views, no copy. Releasing the delivery returns the slab.
* **other host**: a :class:`~dvla_bus.wire.Data` message whose arrays travel as ZeroMQ frames,
  zero-copy from :data:`COPY_THRESHOLD` bytes up (MEASURED.md: copying wins below ~64 KiB).

Flow control rests on credits, never on socket buffers or LINGER: an inbox grants each outbox
``window`` messages; the outbox sends only while it holds credit and gets one back per message
the consumer releases. So an outbox never has more than ``window`` messages unacknowledged per
inbox, and memory on both sides stays bounded however slow the consumer is. When no credit is
left an outbox either waits (``policy="block"``, with a deadline) or keeps the newest
``queue`` messages locally and drops the oldest (``policy="drop_oldest"``). Every drop is
counted by reason in :meth:`Outbox.statistics` / :meth:`Inbox.statistics` (reported on the
control bus by the node), never silent.

An inbox tracks at most ``max_senders`` senders (one entry per connection that said Hello).
A Hello beyond that first forgets senders whose connection is gone (probed with an empty
credit, which ZeroMQ refuses for a vanished peer); if none is gone, the Hello is refused and
counted (``dropped.max_senders``) and gets no answer, so that outbox never gets credit (its
:meth:`Outbox.wait_ready` runs into its deadline, naming the endpoint).

Request/reply (batched inference) uses the same connection: :meth:`Inbox.reply` answers the
outbox a delivery came from, and :meth:`Outbox.recv_reply` receives it; replies travel inline
and are bounded by the requests' credits.

Threading: every method must be called from the event loop that opened the object.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from dvla_bus import wire
from dvla_bus.errors import DeadlineExceeded, DvlaError, PoolError, ResourceError, WireError
from dvla_bus.pool import (
    Field,
    Layout,
    SlabDescriptor,
    SlabHandle,
    SlabPool,
    attach_pool,
    create_pool,
)
from dvla_bus.security import Credentials, zap_statistics
from dvla_bus.shm import OwnerStatus, SegmentName, owner_status
from dvla_bus.sockets import Channel, bound_endpoint, open_socket

__all__ = [
    "COPY_THRESHOLD",
    "DEFAULT_MAX_SENDERS",
    "Delivery",
    "Inbox",
    "InboxStats",
    "Outbox",
    "OutboxStats",
    "Policy",
    "host_identity",
    "open_inbox",
    "open_outbox",
]

COPY_THRESHOLD: Final = 64 * 1024
DATA_MAX_FRAME: Final = 1 << 31
#: Senders an inbox tracks unless told otherwise (see :func:`open_inbox`).
DEFAULT_MAX_SENDERS: Final = 1024
Policy: TypeAlias = Literal["block", "drop_oldest"]
_WIRE_NAME: Final = {dt.str: name for name, dt in wire.DTYPES.items()}


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown-boot"


_BOOT_ID: Final = _boot_id()


def host_identity(host: str) -> str:
    """What peers compare to decide whether shared memory reaches: the topology host name plus
    this machine's boot id (two hosts wrongly given one name never share memory)."""
    return f"{host}@{_BOOT_ID}"


# --- receiving ---------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Delivery:
    """One received message. ``arrays`` are read-only views (shared memory or the received
    frames); they must not be used after :meth:`release` — the sender may reuse the memory.
    Release exactly once (or use the delivery as a context manager)."""

    topic: str
    msg: wire.Data | wire.ShmData
    arrays: Mapping[str, np.ndarray[Any, Any]]
    nbytes: int
    peer: bytes
    _inbox: Inbox | None = field(repr=False)
    _slab: tuple[SlabPool, SlabDescriptor] | None = field(default=None, repr=False)

    @property
    def meta(self) -> Mapping[str, wire.Scalar]:
        return self.msg.meta

    @property
    def via_shm(self) -> bool:
        return self._slab is not None

    def intact(self) -> bool:
        """True if the bytes still belong to this message (the sender has not reused the slab);
        check after reading to validate what was read. Always True for inline messages."""
        if self._slab is None:
            return True
        pool, desc = self._slab
        return not pool.closed and pool.check(desc)

    def release(self) -> None:
        """Hand the message back: returns a credit (and the slab) to the sender."""
        inbox, self._inbox = self._inbox, None
        if inbox is None:
            raise PoolError("delivery released twice")
        inbox._release(self)

    def __enter__(self) -> Delivery:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._inbox is not None:
            self.release()


@dataclass(frozen=True, slots=True)
class InboxStats:
    """Counters of an inbox (messages, bytes, drops by reason) and gauges (held, peers)."""

    received: int
    received_shm: int
    bytes: int
    held: int
    peers: int
    dropped: dict[str, int]
    torn: int


@dataclass(slots=True)
class _Sender:
    host: str
    granted: int = 0
    releases: list[tuple[int, int]] = field(default_factory=list)
    owed: int = 0  # credits to return at the next flush


class Inbox:
    """The receiving end; create with :func:`open_inbox`."""

    def __init__(
        self,
        channel: Channel,
        host: str,
        window: int,
        endpoints: list[str],
        tap: zmq.asyncio.Socket | None = None,
        *,
        max_senders: int = DEFAULT_MAX_SENDERS,
    ) -> None:
        self.channel = channel
        self.max_senders = max_senders
        self.tap = tap
        self.tap_endpoint = bound_endpoint(tap) if tap is not None else ""
        self._tap_topics: set[bytes] = set()
        self._tap_sent = 0
        self._topics: Counter[str] = Counter()
        self.host = host_identity(host)
        self.window = window
        self.endpoints = endpoints
        self._senders: dict[bytes, _Sender] = {}
        self._pools: dict[str, SlabPool] = {}
        self._layouts: dict[tuple[wire.ShmField, ...], Layout] = {}
        self._held = 0
        self._received = 0
        self._received_shm = 0
        self._bytes = 0
        self._torn = 0
        self._flush_scheduled = False
        self._closed = False
        self._ready: asyncio.Queue[Delivery] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._tap_watcher: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        return self.endpoints[0]

    async def recv(self, timeout: float | None = None) -> Delivery:
        """The next message, waiting at most ``timeout`` seconds (then
        :class:`DeadlineExceeded`). The queue behind it is bounded by the credit granted:
        at most ``window`` messages per sender."""
        if timeout is None:
            return await self._ready.get()
        try:
            return await asyncio.wait_for(self._ready.get(), timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"inbox {self.endpoint}: no message within {timeout:.3f}s"
            ) from None

    def pending(self) -> int:
        """Messages received and not yet taken by :meth:`recv`."""
        return self._ready.qsize()

    async def _read(self) -> None:
        # Runs for the inbox's lifetime so handshakes and credits flow even while the consumer
        # is busy; data waits in ``_ready`` (bounded by credit).
        channel = self.channel
        while True:
            got: tuple[bytes | None, wire.Received] | None = await channel.recv()
            burst = 0
            while got is not None:
                peer, received = got
                assert peer is not None
                delivery = await self._accept(peer, received)
                if delivery is not None:
                    self._topics[delivery.topic] += 1
                    if self._tap_topics:
                        self._publish_tap(delivery, received)
                    self._ready.put_nowait(delivery)
                burst += 1
                # Drain what is already queued without a Future per message (bounded burst,
                # so one busy sender cannot starve the loop).
                got = channel.recv_nowait() if burst < 64 else None

    async def _accept(self, peer: bytes, received: wire.Received) -> Delivery | None:
        msg = received.msg
        sender = self._senders.get(peer)
        match msg:
            case wire.Hello():
                if (
                    sender is None
                    and len(self._senders) >= self.max_senders
                    and not self.forget_gone_senders()
                ):
                    self.channel.count_drop(
                        "max_senders",
                        f"hello from {peer!r} refused: already {len(self._senders)} senders "
                        f"(max_senders={self.max_senders})",
                    )
                    return None
                sender = self._senders[peer] = _Sender(host=msg.host)
                sender.granted = self.window
                await self.channel.send(
                    wire.Credit(grant=self.window, host=self.host), "credit", to=peer, block=False
                )
                return None
            case wire.Data() | wire.ShmData() if sender is None:
                # A sender we do not know (we restarted, or it skipped Hello): tell it to
                # start over instead of silently eating its credit.
                self.channel.count_drop("no_hello", f"data from unknown peer {peer!r}")
                await self.channel.send(
                    wire.Credit(grant=0, host=self.host, reset=True),
                    "credit",
                    to=peer,
                    block=False,
                )
                return None
            case wire.Data():
                assert sender is not None
                if not self._spend(sender):
                    return None
                keys = list(msg.names)
                if len(keys) != len(received.arrays):
                    keys = [str(i) for i in range(len(received.arrays))]
                arrays = dict(zip(keys, received.arrays, strict=True))
                self._count(received.nbytes, shm=False)
                return Delivery(received.topic, msg, arrays, received.nbytes, peer, self)
            case wire.ShmData():
                assert sender is not None
                if not self._spend(sender):
                    return None
                return self._map(peer, sender, received.topic, msg)
            case _:
                self.channel.count_drop(
                    "unexpected", f"an inbox does not accept {type(msg).__name__}"
                )
                return None

    def _spend(self, sender: _Sender) -> bool:
        if sender.granted <= 0:
            # The sender ignored flow control: refuse rather than grow.
            self.channel.count_drop("no_credit", "message beyond the granted window")
            return False
        sender.granted -= 1
        return True

    def _count(self, nbytes: int, *, shm: bool) -> None:
        self._held += 1
        self._received += 1
        self._received_shm += shm
        self._bytes += nbytes

    def _map(self, peer: bytes, sender: _Sender, topic: str, msg: wire.ShmData) -> Delivery | None:
        try:
            pool = self._pools.get(msg.segment)
            if pool is None or pool.closed:
                pool = attach_pool(msg.segment)
                self._pools[msg.segment] = pool
            layout = self._layouts.get(msg.fields)
            if layout is None:
                layout = Layout(
                    tuple(Field(f.name, _dtype(f.dtype), f.shape, f.offset) for f in msg.fields)
                )
                if len(self._layouts) < 1024:
                    self._layouts[msg.fields] = layout
            desc = SlabDescriptor(msg.segment, msg.slab, msg.generation, layout)
            views = pool.view(desc)
        except (DvlaError, ValueError) as exc:
            # Unmappable (owner gone, malformed layout, stale generation): drop, and give the
            # credit back so a live sender is not starved by one bad message.
            reason = "shm_stale" if isinstance(exc, PoolError) else "shm_unmappable"
            self.channel.count_drop(reason, str(exc))
            sender.owed += 1
            self._schedule_flush()
            return None
        nbytes = sum(a.nbytes for a in views.values())
        self._count(nbytes, shm=True)
        return Delivery(topic, msg, views, nbytes, peer, self, (pool, desc))

    def _release(self, delivery: Delivery) -> None:
        self._held -= 1
        sender = self._senders.get(delivery.peer)
        if delivery._slab is not None:
            _, desc = delivery._slab
            if not delivery.intact():
                self._torn += 1
            if sender is not None:
                sender.releases.append((desc.index, desc.generation))
        if sender is not None:
            sender.owed += 1
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and not self._closed:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        # Runs at most once per loop iteration: releases made in one burst travel together.
        self._flush_scheduled = False
        if self._closed:
            return
        for peer, sender in self._senders.items():
            if sender.owed or sender.releases:
                grant, released = sender.owed, tuple(sender.releases)
                sender.owed = 0
                sender.releases.clear()
                sender.granted += grant
                frames = self.channel.frames(wire.Credit(grant=grant, released=released), "credit")
                try:
                    self.channel.send_frames_nowait([peer, *frames])
                except zmq.ZMQError:
                    # The sender is gone (unroutable) or its queue is full: it will get a
                    # reset on its next message, so nothing is lost by dropping this.
                    self.channel.count_drop("unroutable", "credit for a vanished sender")

    async def reply(
        self,
        delivery: Delivery,
        meta: Mapping[str, wire.Scalar],
        arrays: Mapping[str, np.ndarray[Any, Any]] | None = None,
        topic: str = "reply",
    ) -> bool:
        """Answer the outbox ``delivery`` came from (inline frames; small payloads)."""
        items = list((arrays or {}).items())
        return await self.channel.send(
            wire.Data(meta=dict(meta), names=tuple(k for k, _ in items)),
            topic,
            [a for _, a in items],
            to=delivery.peer,
            block=False,
        )

    # --- the tap: a copy of every delivery for inspection tools, only while one listens ------

    async def _watch_tap(self) -> None:
        # XPUB hands us (un)subscriptions: b"\x01" + prefix / b"\x00" + prefix. Without
        # XPUB_VERBOSE, ZeroMQ reports each prefix once while anyone holds it, so a set is exact.
        assert self.tap is not None
        while True:
            event = await self.tap.recv()
            if event[:1] == b"\x01":
                self._tap_topics.add(event[1:])
            elif event[:1] == b"\x00":
                self._tap_topics.discard(event[1:])

    def _publish_tap(self, delivery: Delivery, received: wire.Received) -> None:
        topic = delivery.topic.encode()
        if not any(topic.startswith(prefix) for prefix in self._tap_topics):
            return
        assert self.tap is not None
        msg = delivery.msg
        if isinstance(msg, wire.ShmData):
            # Shared memory is the sender's and is reused after release: the tap gets a copy.
            names = tuple(delivery.arrays)
            arrays = [np.array(a) for a in delivery.arrays.values()]
        else:
            names = msg.names
            arrays = list(received.arrays)
        header = wire.stamp(
            wire.Data(meta=dict(msg.meta), names=names), msg.sender, msg.seq, msg.ts
        )
        try:
            frames = wire.encode(delivery.topic, header, arrays)
            internals: Any = self.tap
            internals._shadow_sock.send_multipart(frames, flags=int(zmq.NOBLOCK), copy=False)
            self._tap_sent += 1
        except zmq.Again:
            # A slow listener never slows the data bus: its copy is dropped and counted.
            self.channel.count_drop("tap_full", f"tap copy of {delivery.topic!r}")

    def counters(self) -> dict[str, int]:
        """Flat counters for heartbeats: per-topic receipts, drops, held and pending."""
        out = {f"rx.topic.{t}": n for t, n in self._topics.items()}
        out.update({f"rx.dropped.{k}": v for k, v in self.channel.dropped.items()})
        out["rx.held"] = self._held
        out["rx.pending"] = self._ready.qsize()
        out.update(zap_statistics(self.channel.sock.context))
        out["rx.tap_sent"] = self._tap_sent
        out["rx.tap_topics"] = len(self._tap_topics)
        return out

    def forget_gone_senders(self) -> int:
        """Forget senders whose connection is gone (their process died or closed the socket);
        returns how many. Each is probed with an empty credit (grant 0: no effect on a live
        outbox), which ZeroMQ refuses at once for a peer it no longer routes to."""
        probe = self.channel.frames(wire.Credit(grant=0), "credit")
        gone = []
        for peer in self._senders:
            try:
                self.channel.send_frames_nowait([peer, *probe])
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    gone.append(peer)
        for peer in gone:
            del self._senders[peer]
        return len(gone)

    def forget_dead_pools(self) -> int:
        """Unmap pools whose owner process is gone (call periodically); returns how many."""
        closed = 0
        for name, pool in list(self._pools.items()):
            status = owner_status(SegmentName.parse(name))
            if status is not OwnerStatus.ALIVE:
                pool.close()
                del self._pools[name]
                closed += 1
        return closed

    def statistics(self) -> InboxStats:
        return InboxStats(
            received=self._received,
            received_shm=self._received_shm,
            bytes=self._bytes,
            held=self._held,
            peers=len(self._senders),
            dropped=dict(self.channel.dropped),
            torn=self._torn,
        )

    async def _close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._reader, self._tap_watcher) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


def _dtype(wire_name: str) -> str:
    dt = wire.DTYPES.get(wire_name)
    if dt is None:
        raise ValueError(f"dtype {wire_name!r} is not allowed on the wire")
    return dt.str


@contextlib.asynccontextmanager
async def open_inbox(
    ctx: zmq.asyncio.Context,
    *,
    name: str,
    host: str,
    bind: Sequence[str],
    window: int = 8,
    max_frame: int = DATA_MAX_FRAME,
    tap: str | None = None,
    credentials: Credentials | None = None,
    max_senders: int = DEFAULT_MAX_SENDERS,
) -> AsyncIterator[Inbox]:
    """An inbox bound at every endpoint in ``bind`` (``tcp://HOST:0`` picks a port; read
    :attr:`Inbox.endpoints`). ``window`` is the credit each sender gets; at most
    ``max_senders`` senders are tracked at once (a Hello beyond that is refused and counted,
    after forgetting senders that are gone). With ``tap``, an XPUB
    socket bound there publishes a copy of each delivery on its topic — only while a
    subscriber listens to that topic (``dvla bus echo/hz/bw/record``), dropping and counting
    copies a slow listener cannot take. With ``credentials``, ``tcp://`` binds (data and tap)
    are CURVE servers (``ctx`` must be opened with the same credentials)."""
    if window < 1:
        raise ValueError("window must be >= 1")
    if max_senders < 1:
        raise ValueError("max_senders must be >= 1")
    async with contextlib.AsyncExitStack() as stack:
        sock = await stack.enter_async_context(
            open_socket(
                ctx,
                zmq.ROUTER,
                bind=bind[0],
                options={
                    zmq.ROUTER_MANDATORY: 1,
                    zmq.MAXMSGSIZE: max_frame,
                    # Credits bound what arrives; the HWM only needs headroom above them.
                    zmq.RCVHWM: 0,
                    zmq.SNDHWM: 0,
                },
                credentials=credentials,
            )
        )
        endpoints = [bound_endpoint(sock)]
        for extra in bind[1:]:
            try:
                sock.bind(extra.replace(":0", ":*") if extra.endswith(":0") else extra)
            except zmq.ZMQError as exc:
                raise ResourceError(f"cannot bind {extra}: {exc}") from None
            endpoints.append(bound_endpoint(sock))
        tap_sock = None
        if tap is not None:
            tap_sock = await stack.enter_async_context(
                open_socket(
                    ctx,
                    zmq.XPUB,
                    bind=tap,
                    options={zmq.SNDHWM: 64, zmq.XPUB_NODROP: 1},
                    credentials=credentials,
                )
            )
        inbox = Inbox(
            Channel(sock, name, routed=True),
            host,
            window,
            endpoints,
            tap_sock,
            max_senders=max_senders,
        )
        inbox._reader = asyncio.create_task(inbox._read())
        if tap_sock is not None:
            inbox._tap_watcher = asyncio.create_task(inbox._watch_tap())
        try:
            yield inbox
        finally:
            await inbox._close()


# --- sending -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Counters of an outbox: messages and bytes sent per path, waits for credit, drops."""

    sent: int
    sent_shm: int
    bytes: int
    credit_waits: int
    queued: int
    in_flight: int
    peers: int
    dropped: dict[str, int]


@dataclass(slots=True)
class _Peer:
    endpoint: str
    channel: Channel
    credits: int = 0
    host: str = ""
    ready: bool = False
    hello_pending: bool = False  # a Hello is unanswered: a reset must not send a second one
    hello_at: float = 0.0  # when it was sent (monotonic)
    in_flight: dict[int, SlabHandle] = field(default_factory=dict)  # slab index -> handle


@dataclass(slots=True)
class _Pending:
    topic: str
    meta: dict[str, wire.Scalar]
    arrays: list[tuple[str, np.ndarray[Any, Any]]]
    handle: SlabHandle | None
    fields: tuple[wire.ShmField, ...]


#: An unanswered Hello older than this is taken as lost when the inbox asks for one again.
HELLO_RETRY_S: Final = 2.0


class Outbox:
    """The sending end; create with :func:`open_outbox`."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        stack: contextlib.AsyncExitStack,
        *,
        name: str,
        host: str,
        pool: SlabPool | None,
        policy: Policy,
        queue: int,
        credentials: Credentials | None = None,
    ) -> None:
        self._ctx = ctx
        self._credentials = credentials
        self._stack = stack
        self.name = name
        self.host = host_identity(host)
        self.pool = pool
        self.policy = policy
        self._peers: list[_Peer] = []
        self._rr = itertools.count()
        self._credit = asyncio.Event()
        self._replies: asyncio.Queue[wire.Received] = asyncio.Queue(maxsize=1024)
        self._pending: deque[_Pending] = deque()
        self._queue_cap = queue
        self._tasks: list[asyncio.Task[None]] = []
        self._sent = 0
        self._sent_shm = 0
        self._bytes = 0
        self._credit_waits = 0
        self.reconnects = 0  # inboxes that came back on the same endpoint (restarted nodes)
        self._topics: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()

    # --- peers ---------------------------------------------------------------------------

    async def connect(self, endpoint: str) -> None:
        """Add an inbox; messages go to it once it has granted credit."""
        if any(p.endpoint == endpoint for p in self._peers):
            return
        sock = await self._stack.enter_async_context(
            open_socket(
                self._ctx,
                zmq.DEALER,
                connect=[endpoint],
                options={zmq.SNDHWM: 0, zmq.RCVHWM: 0, zmq.MAXMSGSIZE: DATA_MAX_FRAME},
                credentials=self._credentials,
                monitor=zmq.EVENT_CONNECTED,
            )
        )
        sock.copy_threshold = COPY_THRESHOLD
        peer = _Peer(endpoint, Channel(sock, self.name))
        self._peers.append(peer)
        await self._hello(peer)
        self._tasks.append(asyncio.create_task(self._listen(peer)))
        self._tasks.append(asyncio.create_task(self._watch_connects(peer)))

    async def _watch_connects(self, peer: _Peer) -> None:
        """Start over with an inbox that comes back on the same endpoint (its node restarted):
        the credit and slabs the old one held died with it, and an outbox left without credit
        would otherwise never send again, so nothing would ever tell it. ZeroMQ reconnects by
        itself; its monitor says when, and each connection after the first gets a reset and a
        new Hello (the new inbox grants a fresh window). A reconnection to the *same* inbox
        after a network blip is treated alike: what was in flight on the broken connection is
        counted lost."""
        monitor = peer.channel.sock.get_monitor_socket()
        connections = 0
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] != zmq.EVENT_CONNECTED:
                continue
            connections += 1
            if connections == 1 or peer not in self._peers:
                continue
            self.reconnects += 1
            self._reset(peer)
            await self._hello(peer)  # on a new connection: an earlier Hello may have been lost

    async def _hello(self, peer: _Peer) -> None:
        peer.hello_pending = True
        peer.hello_at = time.monotonic()
        await peer.channel.send(wire.Hello(host=self.host), "hello")

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until every connected inbox has answered (granted credit)."""
        deadline = time.monotonic() + timeout
        while not all(p.ready for p in self._peers):
            if time.monotonic() >= deadline:
                missing = [p.endpoint for p in self._peers if not p.ready]
                raise DeadlineExceeded(f"outbox {self.name}: no answer from {missing}")
            self._credit.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._credit.wait(), 0.05)

    async def _listen(self, peer: _Peer) -> None:
        while True:
            _, received = await peer.channel.recv()
            await self._on_peer_message(peer, received)
            for _ in range(64):
                more = peer.channel.recv_nowait()
                if more is None:
                    break
                await self._on_peer_message(peer, more[1])

    async def _on_peer_message(self, peer: _Peer, received: wire.Received) -> None:
        msg = received.msg
        match msg:
            case wire.Credit() if msg.reset:
                self._reset(peer)
                # One Hello at a time: if one is already on its way (the reconnection sent it),
                # its answer brings the window; a second would be granted a second window. One
                # unanswered for seconds was lost (its connection broke): say it again.
                if not peer.hello_pending or time.monotonic() - peer.hello_at > HELLO_RETRY_S:
                    await self._hello(peer)
            case wire.Credit():
                if msg.host:  # the answer to a Hello: the whole window, not an increment
                    peer.host = msg.host
                    peer.ready = True
                    peer.hello_pending = False
                    peer.credits = msg.grant
                else:
                    peer.credits += msg.grant
                for index, generation in msg.released:
                    handle = peer.in_flight.pop(index, None)
                    if handle is None or handle.generation != generation or self.pool is None:
                        peer.channel.count_drop("bad_release", f"slab {index}/{generation}")
                        continue
                    self.pool.release(handle)
                self._credit.set()
                await self._pump()
            case wire.Data():
                if self._replies.full():
                    peer.channel.count_drop("reply_queue_full", "reply dropped")
                else:
                    self._replies.put_nowait(received)
            case _:
                peer.channel.count_drop("unexpected", type(msg).__name__)

    def _reset(self, peer: _Peer) -> None:
        """Forget a peer's credit and take back the slabs it held (it restarted or died)."""
        peer.credits = 0
        peer.ready = False
        if self.pool is not None:
            for handle in peer.in_flight.values():
                self.pool.release(handle)
        self.dropped["lost_in_flight"] += len(peer.in_flight)
        peer.in_flight.clear()

    async def disconnect(self, endpoint: str) -> None:
        """Stop sending to an inbox (e.g. its node died): its slabs come back to the pool."""
        for peer in list(self._peers):
            if peer.endpoint == endpoint:
                self._reset(peer)
                self._peers.remove(peer)
                with contextlib.suppress(zmq.ZMQError):
                    peer.channel.sock.disconnect(endpoint)

    def _pick(self) -> _Peer | None:
        ready = [p for p in self._peers if p.ready and p.credits > 0]
        if not ready:
            return None
        return ready[next(self._rr) % len(ready)]

    # --- sending -------------------------------------------------------------------------

    async def send(
        self,
        meta: Mapping[str, wire.Scalar],
        arrays: Mapping[str, np.ndarray[Any, Any]],
        *,
        topic: str = "data",
        timeout: float = 30.0,
    ) -> bool:
        """Send named arrays. Returns False when the message was dropped (counted).

        Same host, the arrays are copied into a shared-memory slab and may be reused at once.
        Across hosts, arrays of :data:`COPY_THRESHOLD` bytes or more are sent without a copy:
        they are *borrowed* until ZeroMQ has written them, so do not modify them in place after
        sending (build a new array per message, as environment steps do).

        ``block`` policy: waits up to ``timeout`` seconds for credit (and a free slab), then
        raises :class:`DeadlineExceeded` naming the inboxes. ``drop_oldest``: never waits; the
        message is queued when no credit is free, and the oldest queued one is dropped when the
        queue is full."""
        items = list(arrays.items())
        entry = _Pending(topic, dict(meta), items, None, ())
        if self.policy == "drop_oldest":
            self._pending.append(entry)
            while len(self._pending) > self._queue_cap:
                old = self._pending.popleft()
                self._drop(old, "drop_oldest")
            await self._pump()
            return True
        deadline = time.monotonic() + timeout
        while True:
            peer = self._pick()
            if peer is not None:
                return await self._send_to(peer, entry, deadline)
            self._credit_waits += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(
                    f"outbox {self.name}: no credit from {[p.endpoint for p in self._peers]} "
                    f"within {timeout:.1f}s (consumers stalled?)"
                )
            self._credit.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._credit.wait(), remaining)

    def credit(self) -> int:
        """Messages that may be sent now without waiting (credit over the ready inboxes)."""
        return sum(p.credits for p in self._peers if p.ready and p.credits > 0)

    async def wait_credit(self, timeout: float) -> bool:
        """Wait (up to ``timeout`` seconds) until some inbox has credit for one message, without
        spending it; True when there is credit. A producer whose data ages (rollouts carry a
        policy version) calls this *before* producing, so what it then sends goes out fresh
        instead of waiting, already produced, for credit. Waits are counted like a blocked
        :meth:`send`'s."""
        deadline = time.monotonic() + timeout
        waited = False
        while self._pick() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if not waited:
                self._credit_waits += 1
                waited = True
            self._credit.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._credit.wait(), remaining)
        return True

    def _drop(self, entry: _Pending, reason: str) -> None:
        self.dropped[reason] += 1
        if entry.handle is not None and self.pool is not None:
            self.pool.release(entry.handle)

    async def _pump(self) -> None:
        """Send queued messages (drop_oldest policy) while credit lasts."""
        while self._pending:
            peer = self._pick()
            if peer is None:
                return
            entry = self._pending.popleft()
            peer.credits -= 1
            await self._dispatch(peer, entry)

    async def _send_to(self, peer: _Peer, entry: _Pending, deadline: float) -> bool:
        peer.credits -= 1
        if self._shm_reaches(peer):
            assert self.pool is not None
            nbytes = _layout_bytes(entry.arrays)
            if nbytes <= self.pool.slab_size:
                remaining = max(0.0, deadline - time.monotonic())
                try:
                    entry.handle = await self.pool.acquire_async(remaining)
                except DeadlineExceeded:
                    peer.credits += 1  # nothing was sent: the credit is still ours
                    raise
        return await self._dispatch(peer, entry)

    def _shm_reaches(self, peer: _Peer) -> bool:
        return self.pool is not None and peer.host == self.host

    async def _dispatch(self, peer: _Peer, entry: _Pending) -> bool:
        """Put one message on the wire to ``peer`` (credit already taken)."""
        if entry.handle is None and self._shm_reaches(peer):
            assert self.pool is not None
            if _layout_bytes(entry.arrays) <= self.pool.slab_size:
                entry.handle = self.pool.acquire_nowait()
                if entry.handle is None:
                    peer.credits += 1
                    self.dropped["no_slab"] += 1
                    return False
        if entry.handle is not None:
            msg: wire.Message = self._fill_slab(entry)
            frames = peer.channel.frames(msg, entry.topic)
            peer.in_flight[entry.handle.index] = entry.handle
            self._sent_shm += 1
            arrays_out: list[np.ndarray[Any, Any]] = []
        else:
            msg = wire.Data(meta=entry.meta, names=tuple(k for k, _ in entry.arrays))
            arrays_out = [a for _, a in entry.arrays]
            frames = peer.channel.frames(msg, entry.topic, arrays_out)
        try:
            peer.channel.send_frames_nowait(frames)
        except zmq.ZMQError as exc:
            # Unlimited HWM: only a closed socket lands here. Return the slab and the credit.
            if entry.handle is not None and self.pool is not None:
                peer.in_flight.pop(entry.handle.index, None)
                self.pool.release(entry.handle)
            peer.credits += 1
            self.dropped[f"send_error.{exc.errno}"] += 1
            return False
        self._sent += 1
        self._topics[entry.topic] += 1
        self._bytes += sum(a.nbytes for _, a in entry.arrays)
        return True

    def _fill_slab(self, entry: _Pending) -> wire.ShmData:
        assert entry.handle is not None
        raw = entry.handle.raw()
        fields = []
        offset = 0
        for name, array in entry.arrays:
            a = np.ascontiguousarray(array)
            offset = _align(offset, a.nbytes)
            dtype = _WIRE_NAME.get(
                a.dtype.newbyteorder("<").str if a.dtype.byteorder == ">" else a.dtype.str
            )
            if dtype is None:
                raise WireError("arrays", f"dtype {a.dtype} cannot travel on the wire")
            if a.nbytes:
                raw[offset : offset + a.nbytes] = a.reshape(-1).view(np.uint8)
            fields.append(wire.ShmField(name, dtype, tuple(a.shape), offset))
            offset += a.nbytes
        return wire.ShmData(
            segment=self.pool.name if self.pool else "",
            slab=entry.handle.index,
            generation=entry.handle.generation,
            fields=tuple(fields),
            meta=entry.meta,
        )

    async def recv_reply(self, timeout: float | None = None) -> wire.Received:
        """The next reply from any inbox (see :meth:`Inbox.reply`)."""
        if timeout is None:
            return await self._replies.get()
        try:
            return await asyncio.wait_for(self._replies.get(), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"outbox {self.name}: no reply within {timeout:.3f}s") from None

    def counters(self) -> dict[str, int]:
        """Flat counters for heartbeats: per-topic sends, drops, in flight, queued, waits."""
        stats = self.statistics()
        out = {f"tx.topic.{t}": n for t, n in self._topics.items()}
        out.update({f"tx.dropped.{k}": v for k, v in stats.dropped.items()})
        out["tx.in_flight"] = stats.in_flight
        out["tx.queued"] = stats.queued
        out["tx.credit_waits"] = stats.credit_waits
        out["tx.reconnects"] = self.reconnects
        return out

    def statistics(self) -> OutboxStats:
        dropped = Counter(self.dropped)
        for p in self._peers:
            dropped.update(p.channel.dropped)
        return OutboxStats(
            sent=self._sent,
            sent_shm=self._sent_shm,
            bytes=self._bytes,
            credit_waits=self._credit_waits,
            queued=len(self._pending),
            in_flight=sum(len(p.in_flight) for p in self._peers),
            peers=len(self._peers),
            dropped=dict(dropped),
        )

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._pending:
            self._drop(self._pending.popleft(), "closed")


def _align(offset: int, nbytes: int) -> int:
    # Page-align big arrays (unaligned copies are ~10x slower, MEASURED.md), cache-line the rest.
    align = 4096 if nbytes >= 4096 else 64
    return (offset + align - 1) // align * align


def _layout_bytes(arrays: Sequence[tuple[str, np.ndarray[Any, Any]]]) -> int:
    offset = 0
    for _, a in arrays:
        offset = _align(offset, a.nbytes) + a.nbytes
    return offset


@contextlib.asynccontextmanager
async def open_outbox(
    ctx: zmq.asyncio.Context,
    *,
    name: str,
    host: str,
    run: str = "",
    slab_size: int = 0,
    slabs: int = 16,
    policy: Policy = "block",
    queue: int = 16,
    credentials: Credentials | None = None,
) -> AsyncIterator[Outbox]:
    """An outbox. With ``slab_size > 0`` it owns a pool of ``slabs`` shared-memory slabs of that
    many bytes (segment named after ``run`` and ``name``) used for same-host inboxes; without,
    every message travels inline."""
    async with contextlib.AsyncExitStack() as stack:
        pool = None
        if slab_size > 0:
            pool = stack.enter_context(
                create_pool(
                    run or "run", _shm_safe(name), "outbox", slab_count=slabs, slab_size=slab_size
                )
            )
        outbox = Outbox(
            ctx,
            stack,
            name=name,
            host=host,
            pool=pool,
            policy=policy,
            queue=queue,
            credentials=credentials,
        )
        try:
            yield outbox
        finally:
            await outbox._close()


def _shm_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "-" for c in name)[:64]
