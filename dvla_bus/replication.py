"""Replication: a new weight version streams down the replication tree, chunk by chunk, pipelined.

Every host of the tree (:mod:`dvla_bus.tree`) runs one :class:`Replicator`: the publisher's on
the root, a relay's on every other host. A replicator owns

* the host's :class:`~dvla_bus.weights.WeightPool` (the only writer of it), created when the
  first manifest arrives (and again only if the layout changes);
* an :class:`~dvla_bus.transport.Inbox` on ``tcp://<address>:<[data] port>``, advertised in the
  node's Join as ``endpoints["weights"]``: chunks from the parent and pull requests arrive here;
* one :class:`~dvla_bus.transport.Outbox` per child host (and per pulling host), each fed by its
  own task from a queue of chunk indices.

**Why the data-bus transport.** Chunks are plain named arrays with small scalar metadata, which is
exactly a ``data`` message; the transport already gives credit-based flow control (at most
``window`` chunks in flight per child, so a slow child holds back only its own queue and memory
stays bounded), zero-copy frames from 64 KiB up, reconnection and ``hello``/``reset`` when a
peer restarts, and counted drops. A dedicated DEALER/ROUTER stream would re-implement all of
that. One outbox per child is needed because an outbox balances over its peers.

**The pipeline.** The source publishes version N+1 into its own pool (staging, digest every
chunk, flip), announces it on the control bus — ``version`` with the content digest: the
**fence** — and queues every chunk for every child. A relay, for each chunk it receives: checks
it against the digest that travels with it, copies it into its staging slot, hands the delivery
back (the credit lets the parent send chunk i+1 at once) and queues chunk i for its own children,
whose tasks send it from the staging slot while chunk i+1 is being received. When every chunk of
N+1 is in and verified, the content digest of the staging slot equals the one declared with the
chunks, and the fence for N+1 has been seen on the control bus (the ``version`` announcement, or
the hub's ``latest_version`` after a rejoin), the relay flips staging to active and reports the
new ``weight_version`` in its heartbeat. Local readers pin N or N+1, never a mix
(:mod:`dvla_bus.weights`).

**Torn transfers.** A relay killed mid-way leaves its subtree's staging slots incomplete; their
active slots keep version N (readers are unaffected). A watchdog on every host notices that a
fenced version is not complete and no chunk has arrived for ``stall_s`` seconds and **pulls**:
it asks an ancestor (the parent first, skipping dead ones, up to the root, rotating on each
retry) to stream its active version to it. The host forwards what it receives to its own
children as usual, so its subtree catches up through it. A host that joins late catches up the
same way. Newer versions win: chunks of version M > the one being staged restart staging at M.

Wire use (PROTOCOL.md §4, "weight replication"): ``data`` messages on topics
``weights.manifest``, ``weights.chunk`` and ``weights.pull`` with the meta keys documented there;
the control bus carries only ``version`` (the fence) and the heartbeats' ``weight_version`` and
``weights.*`` counters (progress).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import zmq.asyncio

from dvla_bus import wire
from dvla_bus.control import ControlClient
from dvla_bus.errors import ConfigError, DeadlineExceeded, DvlaError, PoolError, ProtocolError
from dvla_bus.security import Credentials
from dvla_bus.topology import Topology
from dvla_bus.transport import Delivery, Inbox, Outbox, open_inbox, open_outbox
from dvla_bus.tree import ReplicationTree, replication_tree
from dvla_bus.weights import Manifest, WeightPool, create_weight_pool

__all__ = [
    "TOPIC_CHUNK",
    "TOPIC_MANIFEST",
    "TOPIC_PULL",
    "ChunkMeta",
    "ReplicationStats",
    "Replicator",
    "check_encryption",
    "open_replicator",
]

log = logging.getLogger(__name__)

TOPIC_MANIFEST: Final = "weights.manifest"
TOPIC_CHUNK: Final = "weights.chunk"
TOPIC_PULL: Final = "weights.pull"
_MANIFEST: Final = -1  # a forwarding-queue entry that stands for the manifest message


@dataclass(frozen=True, slots=True)
class ChunkMeta:
    """The scalar metadata of a ``weights.chunk`` message (PROTOCOL.md §4): ``version``, chunk
    ``index`` of ``n_chunks``, the checksum ``digest`` of the chunk (hex), the version's
    ``content`` digest and the manifest's ``layout`` digest."""

    version: int
    index: int
    n_chunks: int
    digest: str
    content: str
    layout: str

    def to_meta(self) -> dict[str, wire.Scalar]:
        return {
            "v": self.version,
            "i": self.index,
            "n": self.n_chunks,
            "d": self.digest,
            "c": self.content,
            "l": self.layout,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, wire.Scalar]) -> ChunkMeta:
        """Validate; raises :class:`~dvla_bus.errors.ProtocolError` naming the bad key."""
        try:
            out = cls(
                _get(meta, "v", int),
                _get(meta, "i", int),
                _get(meta, "n", int),
                _get(meta, "d", str),
                _get(meta, "c", str),
                _get(meta, "l", str),
            )
        except KeyError as exc:
            raise ProtocolError(f"weights.chunk: meta key {exc} missing or mistyped") from None
        if not (0 <= out.index < out.n_chunks and out.version >= 0):
            raise ProtocolError(f"weights.chunk: chunk {out.index}/{out.n_chunks} v{out.version}")
        return out


def _get(meta: Mapping[str, wire.Scalar], key: str, kind: type[Any]) -> Any:
    value = meta.get(key)
    if type(value) is not kind:
        raise KeyError(key)
    return value


@dataclass(frozen=True, slots=True)
class ReplicationStats:
    """Counters of one replicator (also sent as ``weights.*`` heartbeat counters)."""

    active_version: int
    staging_version: int
    missing_chunks: int
    chunks_received: int
    chunks_forwarded: int
    bad_chunks: int
    duplicate_chunks: int
    stale_chunks: int
    versions_committed: int
    pulls_sent: int
    pulls_served: int
    bytes_received: int
    bytes_sent: int


def _asdict(stats: ReplicationStats) -> dict[str, int]:
    return {name: int(getattr(stats, name)) for name in stats.__dataclass_fields__}


@dataclass(slots=True)
class _Child:
    """One downstream connection: an outbox and its queue of (version, chunk index)."""

    host: str
    endpoint: str
    outbox: Outbox
    queue: asyncio.Queue[tuple[int, int]]
    task: asyncio.Task[None] | None = None
    pull: bool = False  # a one-off connection serving a pull


@dataclass(slots=True)
class _Counters:
    received: int = 0
    forwarded: int = 0
    bad: int = 0
    duplicate: int = 0
    stale: int = 0
    committed: int = 0
    pulls_sent: int = 0
    pulls_served: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0


def check_encryption(
    topology: Topology, tree: ReplicationTree, host: str, credentials: Credentials | None = None
) -> None:
    """Refuse to carry weights in the clear over an edge the topology says must be encrypted
    (``[data] encrypt``) when no CURVE ``credentials`` are given: encryption is never silently
    off (DESIGN.md). With credentials every weight connection of this host is CURVE."""
    if credentials is not None:
        return
    mode = topology.data.encrypt
    node = tree.node(host)
    edges = [(node.parent, host)] if node.parent else []
    edges += [(host, c) for c in node.children]
    for u, v in edges:
        assert u is not None
        cross = topology.host(u).rack != topology.host(v).rack
        if mode == "always" or (mode == "across-racks" and cross):
            raise ConfigError(
                f"{topology.file}: data.encrypt = {mode!r} requires CURVE on the weight edge "
                f"{u} -> {v}, but this node has no keys; set [security] keys (dvla keys new), "
                "or [data] encrypt = 'never' for a trusted network"
            )


class Replicator:
    """One host's replication duty; create with :func:`open_replicator`. Single event loop."""

    def __init__(
        self,
        *,
        topology: Topology,
        tree: ReplicationTree,
        host: str,
        node_id: str,
        run_id: str,
        ctx: zmq.asyncio.Context,
        stack: contextlib.AsyncExitStack,
        inbox: Inbox,
        window: int,
        stall_s: float,
        send_timeout_s: float,
        credentials: Credentials | None = None,
    ) -> None:
        self.credentials = credentials
        self.topology = topology
        self.tree = tree
        self.host = host
        self.node_id = node_id
        self.run_id = run_id
        self._ctx = ctx
        self._stack = stack
        self.inbox = inbox
        self.window = window
        self.stall_s = stall_s
        self.send_timeout_s = send_timeout_s
        self.pool: WeightPool | None = None
        self.control: ControlClient | None = None
        self._manifest_blob: np.ndarray[Any, Any] | None = None
        self._children: dict[str, _Child] = {}  # by endpoint
        self._outboxes: dict[str, Outbox] = {}  # by endpoint, kept across a peer's restarts
        self._peers: dict[str, tuple[str, str]] = {}  # host -> (node, endpoint), live relays
        self._fences: dict[int, str] = {}  # version -> content digest announced
        self._declared: dict[int, str] = {}  # version -> content digest the chunks declared
        self._last_progress = time.monotonic()
        self._pull_attempt = 0
        self._last_pull = 0.0
        self._n = _Counters()
        self._tasks: list[asyncio.Task[None]] = []
        self.committed = asyncio.Event()
        self.commit_time = 0.0  # wall clock (s since the epoch) of the last flip here
        self.commit_version = -1

    # --- state ---------------------------------------------------------------------------

    @property
    def active_version(self) -> int:
        return self.pool.active_version if self.pool is not None else -1

    def statistics(self) -> ReplicationStats:
        pool = self.pool
        n = self._n
        return ReplicationStats(
            active_version=self.active_version,
            staging_version=pool.staging_version if pool else -1,
            missing_chunks=pool.missing if pool and pool.staging_slot >= 0 else 0,
            chunks_received=n.received,
            chunks_forwarded=n.forwarded,
            bad_chunks=n.bad,
            duplicate_chunks=n.duplicate,
            stale_chunks=n.stale,
            versions_committed=n.committed,
            pulls_sent=n.pulls_sent,
            pulls_served=n.pulls_served,
            bytes_received=n.bytes_received,
            bytes_sent=n.bytes_sent,
        )

    def counters(self) -> dict[str, int]:
        return {f"weights.{k}": v for k, v in _asdict(self.statistics()).items()}

    # --- membership and the fence (control bus) --------------------------------------------

    def on_members(self, members: tuple[wire.MemberInfo, ...]) -> None:
        """Track where each host's replicator listens; connect to children, drop dead ones."""
        live: dict[str, tuple[str, str]] = {}
        for m in members:
            endpoint = m.endpoints.get("weights")
            if endpoint and m.state != "dead" and m.node != self.node_id:
                live[m.host] = (m.node, endpoint)
        self._peers = live
        wanted = {live[h][1]: h for h in self.tree.node(self.host).children if h in live}
        for endpoint, child in list(self._children.items()):
            if not child.pull and endpoint not in wanted:
                self._drop_child(endpoint)
        for endpoint, h in wanted.items():
            if endpoint not in self._children:
                self._spawn(self._add_child(h, endpoint, pull=False))

    def on_version(self, announce: wire.VersionAnnounce) -> None:
        """The fence for ``announce.version`` (with its content digest) was seen."""
        self._fences[announce.version] = announce.digest
        if len(self._fences) > 64:
            del self._fences[min(self._fences)]
        self._last_progress = time.monotonic()
        self._try_commit()

    def _latest_fenced(self) -> int:
        latest = max(self._fences, default=-1)
        if self.control is not None:
            latest = max(latest, self.control.latest_version)
        return latest

    # --- children ------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: replication task failed: %r", self.node_id, task.exception())

    async def _add_child(self, host: str, endpoint: str, *, pull: bool) -> _Child:
        existing = self._children.get(endpoint)
        if existing is not None:
            return existing
        outbox = await self._outbox(endpoint)
        child = _Child(host, endpoint, outbox, asyncio.Queue(), pull=pull)
        self._children[endpoint] = child
        child.task = asyncio.get_running_loop().create_task(self._feed(child))
        if not pull:
            # A child that appears while a version is being staged or is active gets it too.
            self._queue_current(child)
        return child

    async def _outbox(self, endpoint: str) -> Outbox:
        """One outbox per peer endpoint for the replicator's life (a restarted peer at the same
        endpoint is handled by the transport's hello/reset)."""
        outbox = self._outboxes.get(endpoint)
        if outbox is None:
            outbox = await self._stack.enter_async_context(
                open_outbox(
                    self._ctx,
                    name=f"{self.node_id}>{endpoint}",
                    host=self.host,
                    credentials=self.credentials,
                )
            )
            await outbox.connect(endpoint)
            self._outboxes[endpoint] = outbox
        return outbox

    def _drop_child(self, endpoint: str) -> None:
        child = self._children.pop(endpoint, None)
        if child is not None and child.task is not None:
            child.task.cancel()

    def _queue_current(self, child: _Child) -> None:
        """Queue what this host has of the newest version it holds (all chunks it has)."""
        pool = self.pool
        if pool is None:
            return
        if pool.staging_slot >= 0:
            v = pool.staging_version
            child.queue.put_nowait((v, _MANIFEST))
            for i in range(pool.n_chunks):
                if pool.has_chunk(i):
                    child.queue.put_nowait((v, i))
        elif pool.active_version >= 0:
            self._queue_version(child, pool.active_version)

    def _queue_version(self, child: _Child, version: int) -> None:
        assert self.pool is not None
        child.queue.put_nowait((version, _MANIFEST))
        for i in range(self.pool.n_chunks):
            child.queue.put_nowait((version, i))

    def _locate(self, version: int, index: int) -> int | None:
        """The slot holding chunk ``index`` of ``version`` now, or None."""
        pool = self.pool
        if pool is None:
            return None
        if pool.staging_version == version:
            return pool.staging_slot if index < 0 or pool.has_chunk(index) else None
        for s in (0, 1):
            if pool.slot_version(s) == version:
                return s
        return None

    async def _feed(self, child: _Child) -> None:
        """Send queued chunks to one child, in order, as its credit allows."""
        out = child.outbox
        try:
            await out.wait_ready(self.send_timeout_s)
            while True:
                version, index = await child.queue.get()
                slot = self._locate(version, index)
                pool = self.pool
                if slot is None or pool is None:
                    continue  # superseded by a newer version before it could be sent
                if index == _MANIFEST:
                    assert self._manifest_blob is not None
                    await out.send(
                        {"v": version, "l": pool.manifest.digest()},
                        {"m": self._manifest_blob},
                        topic=TOPIC_MANIFEST,
                        timeout=self.send_timeout_s,
                    )
                    continue
                chunk = pool.chunk(slot, index)
                meta = ChunkMeta(
                    version,
                    index,
                    pool.n_chunks,
                    pool.chunk_digest(slot, index).hex(),
                    self._declared.get(version, ""),
                    pool.manifest.digest(),
                )
                await out.send(
                    meta.to_meta(), {"c": chunk}, topic=TOPIC_CHUNK, timeout=self.send_timeout_s
                )
                self._n.forwarded += 1
                self._n.bytes_sent += chunk.nbytes
        except DeadlineExceeded as exc:
            log.warning("%s: child %s stopped taking chunks: %s", self.node_id, child.host, exc)
        finally:
            # Forget it, so the next membership change or pull connects it afresh.
            if self._children.get(child.endpoint) is child:
                del self._children[child.endpoint]

    def _forward(self, version: int, index: int) -> None:
        for child in self._children.values():
            if not child.pull:
                child.queue.put_nowait((version, index))

    # --- the source ----------------------------------------------------------------------

    def ensure_pool(self, manifest: Manifest) -> WeightPool:
        """The host's pool for ``manifest``'s layout (created on first use or a layout change)."""
        pool = self.pool
        if pool is not None and pool.manifest.digest() == manifest.digest():
            return pool
        if pool is not None:
            pool.close()
        rep = self.topology.replication
        safe = "".join(c if c.isalnum() or c in "_-" else "-" for c in self.node_id)[:64]
        self.pool = create_weight_pool(
            self.run_id, safe, manifest, chunk_bytes=rep.chunk_bytes, checksum=rep.checksum
        )
        self._manifest_blob = np.frombuffer(manifest.encode(), dtype=np.uint8)
        return self.pool

    async def publish(
        self,
        arrays: Mapping[str, Any],
        version: int | None = None,
        manifest: Manifest | None = None,
    ) -> int:
        """The source's side: stage ``arrays`` as a new version (default: active + 1, the first
        is 1), flip it active here, announce the fence on the control bus and stream it down the
        tree. Returns the version. Waits (asynchronously) for local readers still pinning the slot
        two versions back; :class:`~dvla_bus.errors.DeadlineExceeded` after 10 s. ``manifest``
        defaults to the arrays' own layout (give it when numpy arrays carry raw bfloat16)."""
        pool = self.ensure_pool(manifest or Manifest.from_arrays(arrays))
        v = max(pool.active_version + 1, 1) if version is None else version
        await pool.begin_async(v)
        pool.write_arrays(arrays)
        digest = pool.content_digest(pool.staging_slot)
        pool.commit()
        self._declared[v] = digest
        self._committed(v)
        if self.control is not None:
            # The fence: every host flips v active once it holds all of v, verified.
            await self.control.send(
                wire.VersionAnnounce(version=v, digest=digest, nbytes=pool.nbytes)
            )
        for child in self._children.values():
            if not child.pull:
                self._queue_version(child, v)
        return v

    # --- receiving -----------------------------------------------------------------------

    async def serve(self) -> None:
        """Handle chunks and pulls from the inbox forever (cancel to stop)."""
        while True:
            delivery = await self.inbox.recv()
            try:
                await self._handle(delivery)
            except (DvlaError, ValueError) as exc:
                self._n.bad += 1
                log.warning("%s: dropped a %s message: %s", self.node_id, delivery.topic, exc)
            finally:
                with contextlib.suppress(PoolError):  # _on_chunk hands chunks back early
                    delivery.release()

    async def _handle(self, d: Delivery) -> None:
        match d.topic:
            case "weights.chunk":
                await self._on_chunk(d)
            case "weights.manifest":
                blob = d.arrays.get("m")
                if blob is None:
                    raise ProtocolError("weights.manifest without its 'm' array")
                manifest = Manifest.decode(blob.tobytes())
                if self.pool is None or self.pool.manifest.digest() != manifest.digest():
                    self.ensure_pool(manifest)
            case "weights.pull":
                endpoint = d.meta.get("reply")
                host = d.meta.get("host")
                want = d.meta.get("want", 0)
                if not isinstance(endpoint, str) or not isinstance(host, str):
                    raise ProtocolError("weights.pull needs 'reply' and 'host' strings")
                self._serve_pull(host, endpoint, want if type(want) is int else 0)
            case other:
                raise ProtocolError(f"unexpected topic {other!r} on the weights inbox")

    async def _on_chunk(self, d: Delivery) -> None:
        meta = ChunkMeta.from_meta(d.meta)
        pool = self.pool
        if pool is None or pool.manifest.digest() != meta.layout or pool.n_chunks != meta.n_chunks:
            self._n.stale += 1  # no manifest yet for this layout: a pull will fix it
            return
        self._last_progress = time.monotonic()
        if meta.version <= pool.active_version or meta.version < pool.staging_version:
            self._n.stale += 1
            return
        if meta.version > pool.staging_version:
            await pool.begin_async(meta.version)
            for child in self._children.values():
                if not child.pull:
                    child.queue.put_nowait((meta.version, _MANIFEST))
        if meta.content:
            self._declared[meta.version] = meta.content
            if len(self._declared) > 64:
                del self._declared[min(self._declared)]
        if pool.has_chunk(meta.index):
            self._n.duplicate += 1
            return
        data = d.arrays.get("c")
        if data is None:
            raise ProtocolError("weights.chunk without its 'c' array")
        if not pool.write_chunk(meta.index, data, bytes.fromhex(meta.digest)):
            self._n.bad += 1
            log.warning(
                "%s: chunk %d of v%d failed its checksum", self.node_id, meta.index, meta.version
            )
            return
        self._n.received += 1
        self._n.bytes_received += data.nbytes
        d.release()  # credit back before forwarding: the parent sends chunk i+1 meanwhile
        self._forward(meta.version, meta.index)
        if pool.missing == 0:
            self._try_commit()

    def _try_commit(self) -> None:
        pool = self.pool
        if pool is None or pool.staging_slot < 0 or pool.missing:
            return
        v = pool.staging_version
        digest = pool.content_digest(pool.staging_slot)
        fence = self._fences.get(v)
        declared = self._declared.get(v)
        if (fence is not None and fence != digest) or (declared is not None and declared != digest):
            log.warning(
                "%s: v%d complete but its digest does not match; discarding", self.node_id, v
            )
            self._n.bad += 1
            pool.abort()
            return
        if fence is None and self._latest_fenced() < v:
            return  # wait for the fence
        pool.commit()
        self._committed(v)
        self._pull_attempt = 0

    def _committed(self, v: int) -> None:
        self.commit_time = time.time()
        self.commit_version = v
        self._n.committed += 1
        self.committed.set()
        if self.control is not None:
            self.control.update(weight_version=v)  # heartbeat at once: the progress report

    # --- catching up ---------------------------------------------------------------------

    def _serve_pull(self, host: str, endpoint: str, want: int) -> None:
        """Stream this host's active version to a host that asked for it."""
        pool = self.pool
        if pool is None or pool.active_version < max(0, want):
            return  # nothing newer here: the asker tries another ancestor
        self._n.pulls_served += 1
        version = pool.active_version

        async def go() -> None:
            child = self._children.get(endpoint) or await self._add_child(host, endpoint, pull=True)
            self._queue_version(child, version)

        self._spawn(go())

    async def watchdog(self, period: float = 0.1) -> None:
        """Pull from an ancestor when a fenced version is incomplete and stalled (cancel to
        stop)."""
        while True:
            await asyncio.sleep(period)
            target = self._latest_fenced()
            now = time.monotonic()
            if target <= self.active_version or self.tree.node(self.host).parent is None:
                continue
            if now - self._last_progress < self.stall_s or now - self._last_pull < self.stall_s:
                continue
            self._last_pull = now
            self._spawn(self._pull())

    async def _pull(self) -> None:
        path = [h for h in reversed(self.tree.path(self.host)) if h != self.host]
        candidates = [h for h in path if h in self._peers]
        if not candidates:
            return
        provider = candidates[self._pull_attempt % len(candidates)]
        self._pull_attempt += 1
        _, endpoint = self._peers[provider]
        # Short deadlines: a provider that does not answer at once is skipped next round.
        patience = max(1.0, self.stall_s)
        try:
            outbox = await self._outbox(endpoint)
            await outbox.wait_ready(patience)
            await outbox.send(
                {"host": self.host, "reply": self.inbox.endpoint, "want": self._latest_fenced()},
                {},
                topic=TOPIC_PULL,
                timeout=patience,
            )
            self._n.pulls_sent += 1
            log.info("%s: pulling from %s (%s)", self.node_id, provider, endpoint)
        except DeadlineExceeded as exc:
            log.warning("%s: pull from %s failed: %s", self.node_id, provider, exc)

    # --- lifecycle -----------------------------------------------------------------------

    async def _close(self) -> None:
        for child in self._children.values():
            if child.task is not None:
                child.task.cancel()
        tasks = [c.task for c in self._children.values() if c.task is not None] + self._tasks
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._children.clear()
        if self.pool is not None:
            self.pool.close()
            self.pool = None


@contextlib.asynccontextmanager
async def open_replicator(
    ctx: zmq.asyncio.Context,
    topology: Topology,
    *,
    host: str,
    node_id: str,
    run_id: str,
    bind: str | None = None,
    window: int = 4,
    stall_s: float = 1.0,
    send_timeout_s: float = 30.0,
    credentials: Credentials | None = None,
) -> AsyncIterator[Replicator]:
    """This host's replicator: binds the weights inbox (``bind``, default
    ``tcp://<address>:<[data] port>``), serves it and runs the catch-up watchdog until the block
    exits. With ``credentials`` (the node's data-plane CURVE keys; ``ctx`` opened with them)
    every weight connection is encrypted. Raises :class:`~dvla_bus.errors.ConfigError` if an
    edge must be encrypted and no credentials are given."""
    tree = replication_tree(topology)
    check_encryption(topology, tree, host, credentials)
    address = topology.host(host).address
    endpoint = bind or f"tcp://{address}:{topology.data.port}"
    async with contextlib.AsyncExitStack() as stack:
        inbox = await stack.enter_async_context(
            open_inbox(
                ctx,
                name=f"{node_id}.weights",
                host=host,
                bind=[endpoint],
                window=window,
                credentials=credentials,
            )
        )
        rep = Replicator(
            topology=topology,
            tree=tree,
            host=host,
            node_id=node_id,
            run_id=run_id,
            ctx=ctx,
            stack=stack,
            inbox=inbox,
            window=window,
            stall_s=stall_s,
            send_timeout_s=send_timeout_s,
            credentials=credentials,
        )
        tasks = [asyncio.create_task(rep.serve()), asyncio.create_task(rep.watchdog())]
        try:
            yield rep
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await rep._close()
