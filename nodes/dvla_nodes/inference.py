"""``inference``: batched policy forward passes for many samplers (the D-VLA *inference* lane),
and :class:`RemotePolicy`, the sampler's client for it.

On the wire (data bus, request/reply over one connection per sampler, see
:meth:`dvla_bus.transport.Inbox.reply`):

* **request** (sampler → inference inbox), topic ``act``: meta ``req`` (int, unique per
  connection), ``instructions`` (the B instruction *strings* joined by U+001F); arrays
  ``images`` uint8 (B, H, W, 3) and ``proprio`` float32 (B, P). Instructions travel as strings,
  not token ids, because the tokenizer belongs to the model: a sampler stays model-agnostic and a
  plugged-in model with another tokenizer needs no change on the samplers (the node caches each
  distinct instruction's encoding, so the cost is one dict lookup per row).
* **reply** (inline), topic ``act``: meta ``req``, ``version`` (the weight version that
  produced every row), ``batch`` (the node's batch sequence number), ``batch_size``
  (observations in that forward pass), ``infer_us`` (its duration) and ``error`` (empty when
  fine); arrays ``actions`` float32 (B, A), ``tokens`` int64 (B, A), ``logp`` float32 (B, A)
  (the behaviour log-probabilities of the sampled tokens). An error reply (``error`` one of
  ``bad_request``, ``no_weights``, ``torn``; detail in ``detail``) has no arrays.

**Batching.** The node takes whatever requests are pending, up to ``max_batch`` observations (a
request is never split; one that does not fit opens the next batch): requests that piled up
during the previous forward pass form the next batch at once. When the node was idle it may wait
up to ``gather_ms`` after the first request for more, and stops waiting as soon as every active
sampler (one heard from within the last second) has a request in the batch.

**Weights.** The policy is built from the topology's ``[roles.learner]`` table
(:func:`dvla_nodes.pipeline.train_config`, as the sampler does) — for a benchmark suite other
than the embedded one, whose policy shapes come from the suite's spec, from the signature the
learner advertises (its ``policy`` endpoint, :mod:`dvla_nodes.learn.suite`): until it has
seen one, requests are answered ``no_weights``. Its parameters are *bound*
to the host's shared-memory weight pool (:mod:`dvla_bus.weights`): no copy of the weights,
ever. The pool is the one a learner on this host advertises (``endpoints["weights"]``), else the
run's pool on this machine (:func:`dvla_bus.weights.find_weights`, e.g. a relay's). Each batch
pins the active version for exactly its forward pass, so a version published mid-stream is
picked up by the next batch, never in the middle of one, and the writer is never held up longer
than one forward pass.

**VRAM** (``weights = "vram"``; :mod:`dvla_bus.vram`). The node's device is the one
``vram_backend`` names (``auto``: CUDA when present, else the CPU, the same code). Once the
policy is known it allocates, once: two weight slots for the flat layout, loaded from the host
pool (pinned staging on CUDA) and flipped between batches (an idle node keeps following the
pool every ~50 ms, so its replicas see new versions too), and a :class:`SlabBatcher`, whose
fixed device slabs receive every batch's images, proprio and instruction ids (nothing is
allocated on the device per batch; a batch that does not fit, e.g. one request larger than
``max_batch``, goes the ordinary way and is counted). When the backend can export the slots
(CUDA) they are *shared*: a control segment holds their CUDA IPC handles, advertised on the
control bus as the member endpoint ``endpoints["vram"]`` (in the Join, so only when the policy
is known before joining, i.e. the embedded suite; otherwise replicas find the segment on the
machine by its node name). On a CPU backend nothing is shared and no ``vram`` endpoint is
advertised.

**Replicas** (``vram_from = "inference.{host}.0"``): a node that is not the one named maps the
named node's slots (:class:`~dvla_bus.vram.VramFollower`: found through the owner's
``endpoints["vram"]``) instead of loading a copy; each forward pass pins the owner's active
version and the parameters are re-pointed when the pinned slot changes. When the owner dies
(the hub's ``node_dead``, or its process is gone) the replica detaches within ~50 ms (answering
``no_weights`` meanwhile) and attaches the slots a restarted owner advertises. The node named
owns the slots (so one role-wide setting serves every host: ``{host}`` is each node's own
host). Only CUDA IPC can map another process's slots: on a CPU backend, or with the owner on
another host, the replica stops at setup with a configuration error (exit 2).

Settings (``[roles.inference]``): ``max_batch`` (observations per forward, default 32),
``gather_ms`` (default 0: on 2 CPU cores waiting only added round-trip time, while the backlog
of a busy node batches by itself; raise it where a forward pass costs about the same at any
batch size, e.g. on a GPU), ``window`` (credits per sampler connection, default 4),
``threads`` (torch threads, default 1), ``weights`` (``pool`` or ``vram``), ``vram_from`` (a
node name, ``{host}`` allowed; needs ``weights = "vram"``), ``vram_backend`` (``auto``,
``cpu``, ``cuda``, ``cuda:N``, or ``package.module:Class``, a
:class:`~dvla_bus.vram.DeviceBackend` constructed without arguments: another device runtime,
or in tests one that fakes the CUDA calls; see :func:`dvla_bus.vram.backend_from_spec`).
TrainConfig keys given here override ``[roles.learner]``'s (e.g. ``seed``).

Lanes: ``inference`` (each forward pass). Counters: ``requests``, ``observations``, ``batches``,
``versions_served`` (distinct versions), ``bad_requests``, ``no_weights``, ``replies_dropped``;
gauges ``mean_batch`` (observations per forward), ``mean_batch_requests``, ``version``,
``forward_ms`` (moving average). In vram mode also counters ``vram.allocations`` (device
buffers the pools allocated: constant after setup), ``vram.stages``, ``vram.flips``,
``vram.stage_timeouts`` (a replica pinned the slot to stage into for over a second: staged
later),
``slabs.acquires``, ``slabs.backpressure``, ``slabs.timeouts``, ``slabs.fallbacks``,
``weights_errors``, and on a replica ``vram.attaches``, ``vram.detaches``,
``vram.owner_deaths``, ``vram.attach_failures``; gauges ``vram.version``, ``vram.readers``
(replicas attached to an owner), ``vram.attached`` (a replica), ``slabs.held``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch
import zmq.asyncio

from dvla_bus import wire
from dvla_bus.errors import ConfigError, DeadlineExceeded, DvlaError
from dvla_bus.node import Node
from dvla_bus.pool import Layout
from dvla_bus.security import Credentials
from dvla_bus.shm import SegmentName
from dvla_bus.topology import load_topology
from dvla_bus.transport import Delivery, Inbox, Outbox, open_outbox
from dvla_bus.vram import (
    DeviceBackend,
    VramFollower,
    VramSlab,
    VramSlabPool,
    VramWeights,
    backend_from_spec,
    check_backend_spec,
    create_vram_weights,
    node_component,
    torch_dtype,
)
from dvla_bus.weights import Manifest, WeightReader, attach_weights, find_weights
from dvla_nodes.learn.suite import (
    POLICY_ENDPOINT,
    policy_from_signature,
    policy_mismatch,
    policy_signature,
    refuse_suite_keys,
)
from dvla_nodes.pipeline import train_config
from dvla_nodes.policy import build_policy
from dvla_nodes.policy.act import ActOutput, PolicyActor
from dvla_nodes.policy.flat import FlatLayout, bind, flatten
from dvla_nodes.policy.model import VLAPolicy
from dvla_nodes.policy.tokenizer import Tokenizer
from dvla_nodes.torch_thread import TorchThread

__all__ = [
    "TOPIC",
    "ActReply",
    "ActRequest",
    "InferenceError",
    "InferenceNode",
    "InferenceSettings",
    "RemoteAct",
    "RemotePolicy",
    "SlabBatcher",
    "open_remote_policy",
    "request_bytes",
]

TOPIC: Final = "act"
SEP: Final = "\x1f"  # unit separator between instructions (never inside one)
_POOL_POLL_S: Final = 0.5
#: A sampler silent this long no longer counts as connected when deciding whether a batch can
#: stop waiting for more requests (the inbox never forgets a sender; samplers come and go).
_PEER_IDLE_S: Final = 1.0
_SWEEP_S: Final = 10.0


class InferenceError(DvlaError):
    """The inference node answered a request with an error (``reason``: ``bad_request``,
    ``no_weights``, ``torn``)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


# --- the messages ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActRequest:
    """B observations to act on (see the module docstring for the wire form)."""

    req: int
    images: np.ndarray[Any, Any]
    proprio: np.ndarray[Any, Any]
    instructions: tuple[str, ...]

    def encode(self) -> tuple[dict[str, wire.Scalar], dict[str, np.ndarray[Any, Any]]]:
        if any(SEP in s for s in self.instructions):
            raise ConfigError("an instruction contains U+001F, the request's separator")
        meta: dict[str, wire.Scalar] = {
            "req": self.req,
            "instructions": SEP.join(self.instructions),
        }
        return meta, {"images": self.images, "proprio": self.proprio}

    @staticmethod
    def decode(
        meta: Mapping[str, wire.Scalar],
        arrays: Mapping[str, np.ndarray[Any, Any]],
        image_size: int,
        proprio_dim: int,
    ) -> ActRequest:
        """Validate a received request against the model's input shapes; the arrays are the
        delivery's views (copy before releasing it). Raises :class:`InferenceError`."""
        req = meta.get("req")
        if type(req) is not int:
            raise InferenceError("bad_request", f"meta 'req' must be an int, got {req!r}")
        images, proprio = arrays.get("images"), arrays.get("proprio")
        if images is None or proprio is None:
            raise InferenceError("bad_request", f"arrays {sorted(arrays)}: need images, proprio")
        b = images.shape[0] if images.ndim == 4 else -1
        if images.dtype != np.uint8 or images.shape[1:] != (image_size, image_size, 3) or b < 1:
            raise InferenceError(
                "bad_request",
                f"images {images.dtype} {images.shape}: expected uint8 (B, {image_size}, "
                f"{image_size}, 3)",
            )
        if proprio.dtype != np.float32 or proprio.shape != (b, proprio_dim):
            raise InferenceError(
                "bad_request",
                f"proprio {proprio.dtype} {proprio.shape}: expected float32 ({b}, {proprio_dim})",
            )
        text = meta.get("instructions")
        if not isinstance(text, str):
            raise InferenceError("bad_request", "meta 'instructions' must be a string")
        instructions = tuple(text.split(SEP))
        if len(instructions) != b:
            raise InferenceError("bad_request", f"{len(instructions)} instructions for {b} images")
        return ActRequest(req, images, proprio, instructions)


@dataclass(frozen=True, slots=True)
class ActReply:
    """The node's answer to one request (arrays empty when ``error`` is set)."""

    req: int
    version: int
    batch: int
    batch_size: int
    infer_us: int
    actions: np.ndarray[Any, Any]
    tokens: np.ndarray[Any, Any]
    logp: np.ndarray[Any, Any]
    error: str = ""
    detail: str = ""

    def encode(self) -> tuple[dict[str, wire.Scalar], dict[str, np.ndarray[Any, Any]]]:
        meta: dict[str, wire.Scalar] = {
            "req": self.req,
            "version": self.version,
            "batch": self.batch,
            "batch_size": self.batch_size,
            "infer_us": self.infer_us,
            "error": self.error,
        }
        if self.error:
            meta["detail"] = self.detail
            return meta, {}
        return meta, {"actions": self.actions, "tokens": self.tokens, "logp": self.logp}

    @staticmethod
    def error_reply(req: int, reason: str, detail: str) -> ActReply:
        empty = np.zeros((0, 0), np.float32)
        return ActReply(req, -1, -1, 0, 0, empty, empty, empty, reason, detail)

    @staticmethod
    def decode(received: wire.Received) -> ActReply:
        """From an outbox's received reply; raises :class:`InferenceError` if malformed."""
        msg = received.msg
        if not isinstance(msg, wire.Data):
            raise InferenceError("bad_reply", f"a reply is Data, got {type(msg).__name__}")
        meta = msg.meta
        try:
            ints = {k: meta[k] for k in ("req", "version", "batch", "batch_size", "infer_us")}
        except KeyError as exc:
            raise InferenceError("bad_reply", f"meta lacks {exc}") from None
        if any(type(v) is not int for v in ints.values()):
            raise InferenceError("bad_reply", f"non-integer meta {ints}")
        error = str(meta.get("error", ""))
        arrays = dict(zip(msg.names, received.arrays, strict=False))
        empty = np.zeros((0, 0), np.float32)
        if error:
            return ActReply(
                int(ints["req"]), -1, -1, 0, 0, empty, empty, empty, error, str(meta.get("detail"))
            )
        if set(arrays) != {"actions", "tokens", "logp"}:
            raise InferenceError("bad_reply", f"arrays {sorted(arrays)}")
        return ActReply(
            int(ints["req"]),
            int(ints["version"]),
            int(ints["batch"]),
            int(ints["batch_size"]),
            int(ints["infer_us"]),
            arrays["actions"],
            arrays["tokens"],
            arrays["logp"],
        )


@dataclass(frozen=True, slots=True)
class RemoteAct(ActOutput):
    """An :class:`ActOutput` from the inference node, with the weight ``version`` that produced
    it, the node's ``batch`` number, ``batch_size`` (observations in that forward pass) and
    ``infer_us`` (its duration, microseconds)."""

    version: int = -1
    batch: int = -1
    batch_size: int = 0
    infer_us: int = 0


# --- the node ----------------------------------------------------------------------------------


#: A node name as ``vram_from`` takes it: ``<role>.<host>.<index>``, ``{host}`` standing for the
#: node's own host.
_NODE_RE: Final = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9_-]*\.(?:[A-Za-z0-9][A-Za-z0-9_-]*|\{host\})\.[0-9]+"
)
_TICK_S: Final = 0.05  # vram mode: how often an idle node follows its weights
_SLABS: Final = 2  # observation slabs: the run loop fills one batch while the previous computes
_STATS_S: Final = 0.2  # gauges from the device pools at most this often


@dataclass(frozen=True, slots=True)
class InferenceSettings:
    """``[roles.inference]``: observations per forward pass, the idle gather window
    (milliseconds), credits per sampler connection, torch threads, where the weights live
    (``weights``, ``vram_from``, ``vram_backend``; see the module docstring)."""

    max_batch: int = 32
    gather_ms: float = 0.0
    window: int = 4
    threads: int = 1
    # "pool": parameters are views of the host's shared-memory weight pool (zero copy, CPU).
    # "vram": two preallocated device slots (dvla_bus.vram; CUDA when present, else the same
    # code on CPU memory) loaded from the pool and flipped between batches.
    weights: str = "pool"
    # A node name ("inference.{host}.0"): map that node's VRAM slots (CUDA IPC) instead of
    # loading a copy. The node it names owns the slots ("" : every node owns its own).
    vram_from: str = ""
    # The device backend (dvla_bus.vram.backend_from_spec): auto, cpu, cuda, cuda:N or
    # package.module:Class.
    vram_backend: str = "auto"

    def owner(self, host: str) -> str:
        """The node whose VRAM slots a node on ``host`` maps ("" : none)."""
        return self.vram_from.replace("{host}", host)

    @staticmethod
    def from_settings(settings: Mapping[str, wire.Scalar]) -> InferenceSettings:
        vram_from = settings.get("vram_from", "")
        vram_backend = settings.get("vram_backend", "auto")
        if not isinstance(vram_from, str):
            raise ConfigError(f"roles.inference.vram_from: {vram_from!r} must be a node name")
        if not isinstance(vram_backend, str):
            raise ConfigError(f"roles.inference.vram_backend: {vram_backend!r} must be a string")
        try:
            out = InferenceSettings(
                max_batch=int(settings.get("max_batch", 32)),
                gather_ms=float(settings.get("gather_ms", 0.0)),
                window=int(settings.get("window", 4)),
                threads=int(settings.get("threads", 1)),
                weights=str(settings.get("weights", "pool")),
                vram_from=vram_from,
                vram_backend=vram_backend,
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[roles.inference]: {exc}") from None
        if out.max_batch < 1 or out.window < 1 or out.threads < 1:
            raise ConfigError(f"[roles.inference]: max_batch, window, threads must be >= 1: {out}")
        if out.weights not in ("pool", "vram"):
            raise ConfigError(f"[roles.inference]: weights={out.weights!r}: 'pool' or 'vram'")
        if not (math.isfinite(out.gather_ms) and out.gather_ms >= 0):
            raise ConfigError(f"[roles.inference]: gather_ms={out.gather_ms} must be >= 0")
        if out.vram_from:
            if not _NODE_RE.fullmatch(out.vram_from):
                raise ConfigError(
                    f"roles.inference.vram_from: {out.vram_from!r} is not a node name "
                    '(<role>.<host>.<index>, e.g. "inference.{host}.0"; {host} is each node\'s '
                    "own host)"
                )
            if out.weights != "vram":
                raise ConfigError(
                    f"roles.inference.vram_from = {out.vram_from!r} maps another node's VRAM "
                    f'slots: it needs weights = "vram" (weights is {out.weights!r})'
                )
        try:
            check_backend_spec(out.vram_backend)
        except ConfigError as exc:
            raise ConfigError(f"roles.inference.vram_backend: {exc}") from None
        return out


@dataclass(slots=True)
class _Item:
    delivery: Delivery
    request: ActRequest | None
    error: InferenceError | None


@dataclass(slots=True)
class _Batch:
    """One forward pass's observations: host arrays, or device tensors in a held slab."""

    ins: list[str]
    images: np.ndarray[Any, Any] | None = None
    proprio: np.ndarray[Any, Any] | None = None
    slab: VramSlab | None = None
    tensors: Mapping[str, torch.Tensor] | None = None

    def release(self) -> None:
        slab, self.slab = self.slab, None
        if slab is not None:
            slab.release()


class SlabBatcher:
    """Observation batches assembled in fixed device slabs: the trajectory half of the dual
    pool on an inference node's device (:class:`~dvla_bus.vram.VramSlabPool`).

    Each of ``slabs`` slabs holds ``max_rows`` rows of ``images`` uint8 (R, S, S, 3),
    ``proprio`` float32 (R, P) and instruction ``ids`` int64 (R, L). :meth:`fill` copies the
    requests' rows into a free slab and returns the device tensors of the batch's rows: on the
    CPU straight into the slab, on a GPU through a host staging area of the same layout per
    slab (page-locked when CUDA is there), one host-to-device copy per field. Nothing is
    allocated per batch. A slab's staging area is rewritten only after that slab was released,
    i.e. after its forward pass synchronised (the sampled outputs reach the host).

    The outputs are not slabbed: tokens are sampled on the host with a CPU generator (so runs
    are reproducible on any device) and so are born in host memory, where the reply needs them.

    No free slab (backpressure, counted by the pool), a batch larger than ``max_rows`` or a
    torn request make the caller assemble that batch the ordinary way (:attr:`fallbacks`).
    Thread-safety: :meth:`fill` on one thread; a returned slab may be released on another."""

    def __init__(
        self,
        backend: DeviceBackend,
        max_rows: int,
        image_size: int,
        proprio_dim: int,
        max_tokens: int,
        *,
        slabs: int = _SLABS,
    ) -> None:
        self.backend = backend
        self.max_rows = max_rows
        self.layout = Layout.pack(
            [
                ("images", "uint8", (max_rows, image_size, image_size, 3)),
                ("proprio", "float32", (max_rows, proprio_dim)),
                ("ids", "int64", (max_rows, max_tokens)),
            ]
        )
        self.pool = VramSlabPool(slabs, self.layout.nbytes, backend=backend)
        self.fallbacks = 0
        self._staged = backend.kind != "cpu"
        self._host: list[dict[str, np.ndarray[Any, Any]] | None] = [None] * slabs
        self._staging: list[dict[str, torch.Tensor]] = []
        if self._staged:
            pinned = torch.cuda.is_available()
            for _ in range(slabs):
                buf = torch.empty(self.layout.nbytes, dtype=torch.uint8, pin_memory=pinned)
                self._staging.append(
                    {
                        f.name: buf[f.offset : f.end].view(torch_dtype(f.dtype)).view(f.shape)
                        for f in self.layout.fields
                    }
                )

    def _host_views(self, slab: VramSlab) -> dict[str, np.ndarray[Any, Any]]:
        host = self._host[slab.index]
        if host is None:
            src = self._staging[slab.index] if self._staged else slab.view(self.layout)
            host = self._host[slab.index] = {k: v.numpy() for k, v in src.items()}
        return host

    def fill(
        self, requests: Sequence[ActRequest], tokenizer: Tokenizer
    ) -> tuple[VramSlab, dict[str, torch.Tensor]] | None:
        """Copy ``requests`` into a free slab; returns it (release it after the forward pass)
        and the device tensors of the batch's rows, or None (see :attr:`fallbacks`)."""
        rows = sum(len(r.instructions) for r in requests)
        if rows > self.max_rows:
            self.fallbacks += 1
            return None
        slab = self.pool.acquire_nowait()
        if slab is None:
            self.fallbacks += 1
            return None
        host = self._host_views(slab)
        images, proprio, ids = host["images"], host["proprio"], host["ids"]
        a = 0
        for r in requests:
            b = a + len(r.instructions)
            images[a:b] = r.images
            proprio[a:b] = r.proprio
            for i, text in enumerate(r.instructions):
                ids[a + i] = tokenizer.encode(text)  # cached per distinct instruction
            a = b
        device = slab.view(self.layout)
        if self._staged:
            staging = self._staging[slab.index]
            for name, t in device.items():
                t[:rows].copy_(staging[name][:rows], non_blocking=True)
        return slab, {name: t[:rows] for name, t in device.items()}

    def close(self) -> None:
        self.pool.close()
        self._host = [None] * len(self._host)
        self._staging = []


@torch.inference_mode()
def _buffers_to(model: torch.nn.Module, device: torch.device) -> None:
    """Move ``model``'s buffers (not its parameters, which the weight slots provide) to
    ``device``: a few small allocations, once."""
    if device.type == "cpu":
        return
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)


class InferenceNode(Node):
    role = "inference"
    description = "batches observations from many samplers; actions from the active weights"

    inbox: Inbox

    @classmethod
    def check_settings(cls, settings: Mapping[str, wire.Scalar]) -> None:
        InferenceSettings.from_settings(settings)
        refuse_suite_keys("inference", settings)

    async def setup(self) -> None:
        cfg = self.config
        topology = load_topology(cfg.topology_file) if cfg.topology_file else None
        learner_settings = topology.settings("learner") if topology else {}
        self.train = train_config({**learner_settings, **cfg.settings})
        self.settings = InferenceSettings.from_settings(cfg.settings)
        # Forward passes run on one thread with ``threads`` torch threads; this (event-loop)
        # thread keeps one, so the process has one OpenMP team (dvla_nodes/torch_thread.py).
        self._torch = self.resources.enter_context(TorchThread(self.settings.threads, cfg.node_id))
        self._pool = self._torch.executor
        self.model: VLAPolicy | None = None
        self.layout: FlatLayout | None = None
        self.actor: PolicyActor | None = None
        self.proprio_dim = -1
        self.signature = ""
        self.reader: WeightReader | None = None
        # vram mode: the device, this node's own slots or (a replica) the owner's, the slabs.
        self.backend: DeviceBackend | None = None
        self.vram: VramWeights | None = None
        self.follower: VramFollower | None = None
        self.batcher: SlabBatcher | None = None
        self._placeholder: torch.Tensor | None = None
        self.resources.callback(self._close_all)
        if self.settings.weights == "vram":
            self.backend = self._make_backend()
            owner = self.settings.owner(cfg.host)
            if owner and owner != cfg.node_id:
                self._check_replica(owner, self.backend)
                self.follower = VramFollower(
                    owner, backend=self.backend, run=cfg.run_id, host=cfg.host
                )
        if self.train.suite == "embedded":  # its policy needs no environment to build
            model, tok = build_policy(
                self.train.policy_size,
                self.train.image_size,
                self.train.bins,
                self.train.seed,
                stem=self.train.policy_stem,
            )
            self._adopt(model, tok)
            # Before joining: slots made now are advertised in the Join (endpoints["vram"]).
            self._device_pools(advertise=True)
        self.gen = torch.Generator().manual_seed(self.train.seed + 5000 + cfg.index)
        # One thread runs every forward pass and all weight following: it pins and reads the
        # pool or slots (a reader belongs to one thread) while the event loop keeps receiving
        # and granting credit. Shut down (waiting for a forward in progress) before the
        # readers close: callbacks run LIFO (closed here, and again, a no-op, at the end).
        self.resources.callback(self._torch.close)
        self.inbox = await self.open_inbox(window=self.settings.window)
        self._reader_gen = 0
        # What the parameters view: ("pool", reader generation, slot), ("vram", 0, slot) or
        # ("replica", attach count, slot).
        self._bound: tuple[str, int, int] | None = None
        self._learner_segment = ""  # a learner on this host advertises its pool
        self._last_scan = 0.0
        self._stale_warned = -1
        self._stage_timeouts = 0  # stagings deferred because a reader held the slot too long
        self._carry: Delivery | None = None
        self._seen: dict[bytes, float] = {}  # sampler connection -> last request (monotonic)
        self._pruned = 0.0
        self._swept = time.monotonic()
        self._stats_at = 0.0
        self._errors_logged = -math.inf
        self._versions: set[int] = set()
        self._batch = 0
        self._forward_ms = 0.0
        for key in ("requests", "observations", "batches", "versions_served", "bad_requests"):
            self.counters[key] = 0
        self.meters.append(self._device_counters)

    def _make_backend(self) -> DeviceBackend:
        spec = self.settings.vram_backend
        try:
            return backend_from_spec(spec)
        except DvlaError as exc:
            raise ConfigError(f"roles.inference.vram_backend = {spec!r}: {exc}") from None

    def _check_replica(self, owner: str, backend: DeviceBackend) -> None:
        """A replica maps ``owner``'s slots: only through CUDA IPC, only on one host."""
        cfg, given = self.config, self.settings.vram_from
        host = owner.split(".")[1]
        if host != cfg.host:
            raise ConfigError(
                f"roles.inference.vram_from = {given!r}: {owner} would be on host {host}, this "
                f"node is on {cfg.host}; CUDA IPC shares GPU memory between processes of one "
                'host only (write "inference.{host}.0" for each host\'s first node)'
            )
        if backend.kind != "cuda":
            raise ConfigError(
                f"roles.inference.vram_from = {given!r}: mapping {owner}'s VRAM slots needs "
                f"CUDA IPC, but this node's device backend is {backend.kind!r} (no CUDA device; "
                f"vram_backend = {self.settings.vram_backend!r}); leave vram_from out (every "
                'node loads its own slots) or use weights = "pool" on a CPU host'
            )

    # --- the weights (between batches only, on the inference thread) --------------------------

    def _close_reader(self) -> None:
        """Stop following the host's weight pool (VRAM slots, if any, stay)."""
        if self.vram is not None:
            self.vram.detach_host()
        if self.reader is not None:
            self.reader.close()
            self.reader = None
            if self._bound is not None and self._bound[0] == "pool":
                self._bound = None

    def _close_all(self) -> None:
        self._close_reader()
        if self.vram is not None:
            # Replicas detach on the hub's node_dead for us (we left before this runs).
            self.vram.close(reader_timeout=min(2.0, self.config.grace / 2))
            self.vram = None
        if self.follower is not None:
            self.follower.close()
        if self.batcher is not None:
            self.batcher.close()

    def _adopt(self, model: VLAPolicy, tok: Tokenizer) -> None:
        self.model = model
        self.layout, _ = flatten(model)
        self.proprio_dim = int(model.cfg.proprio_dim)
        self.signature = policy_signature(self.train.suite, model, tok)
        # Last: the inference thread takes a set actor to mean the rest is there too.
        self.actor = PolicyActor(model, tok, self.train.temperature)

    def _device_pools(self, *, advertise: bool) -> None:
        """vram mode, once the policy is known: the observation slabs and (unless this node is
        a replica) the two weight slots, shared with local replicas when the backend can
        export them (CUDA). All of this node's device memory is allocated here, once."""
        backend, model, layout, actor = self.backend, self.model, self.layout, self.actor
        if backend is None or model is None or layout is None or actor is None:
            return
        if self.batcher is not None:
            return
        cfg = self.config
        _buffers_to(model, backend.device)
        self._placeholder = torch.zeros((), dtype=torch.float32, device=backend.device)
        self.batcher = SlabBatcher(
            backend,
            self.settings.max_batch,
            int(model.cfg.image_size),
            self.proprio_dim,
            actor.tokenizer.max_tokens,
        )
        if self.follower is not None:
            return
        share = backend.kind == "cuda"
        self.vram = create_vram_weights(
            Manifest.from_specs([("flat", "float32", (layout.total,))]),
            backend=backend,
            run=cfg.run_id if share else None,
            node=node_component(cfg.node_id),
        )
        if share and advertise:
            self.endpoints["vram"] = self.vram.segment
        self.log.info(
            "VRAM slots on %s (%s)%s",
            backend.kind,
            backend.device,
            f", shared as {self.vram.segment}" if share else "",
        )

    def _follow_policy(self, theirs: str) -> None:
        """The learner's policy signature: build it (a suite other than the embedded one) or
        check ours against it."""
        if self.model is not None:
            diff = policy_mismatch(self.signature, theirs)
            if diff and not self.counters.get("policy_mismatch"):
                self.log.error("this node's policy differs from the learner's: %s", diff)
            self.counters["policy_mismatch"] = int(bool(diff))
            return
        try:
            model, tok = policy_from_signature(theirs, self.train.seed)
        except ConfigError as exc:
            self.counters["policy_mismatch"] = 1
            self.log.error("%s", exc)
            return
        if model.cfg.image_size != self.train.image_size:
            self.log.error(
                "the learner's policy takes %d-pixel images, [roles.learner] says %d",
                model.cfg.image_size,
                self.train.image_size,
            )
        self._adopt(model, tok)
        self.log.info(
            "built the learner's policy for suite %s: %d parameters, proprio %d, actions %d",
            self.train.suite,
            model.num_params,
            model.cfg.proprio_dim,
            model.cfg.action_dim,
        )

    def on_members(self, members: tuple[wire.MemberInfo, ...]) -> None:
        for m in members:
            if m.role == "learner" and m.state != "dead" and m.endpoints.get(POLICY_ENDPOINT):
                self._follow_policy(m.endpoints[POLICY_ENDPOINT])
            segment = m.endpoints.get("weights", "")
            if m.role == "learner" and m.host == self.config.host and m.state != "dead" and segment:
                self._learner_segment = segment
        if self.follower is not None:
            self.follower.follow_members(members)

    def on_node_dead(self, dead: wire.NodeDead) -> None:
        if self.follower is not None:
            self.follower.owner_gone(dead.node)

    def _wanted_segment(self) -> str:
        if self._learner_segment:
            return self._learner_segment
        now = time.monotonic()
        if self.reader is not None and now - self._last_scan < _POOL_POLL_S:
            return self.reader.name
        self._last_scan = now
        found = find_weights(self.config.run_id)
        if not found:
            return self.reader.name if self.reader is not None else ""
        return max(found, key=lambda n: SegmentName.parse(n).start_time)

    def _follow_pool(self) -> None:
        if self.layout is None:  # no policy yet: nothing to bind weights to
            return
        segment = self._wanted_segment()
        if not segment or (self.reader is not None and self.reader.name == segment):
            return
        self._close_reader()
        try:
            reader = attach_weights(segment)
        except (DvlaError, OSError) as exc:  # the writer may still be creating it
            self.log.info("weight pool %s not ready: %s", segment, exc)
            return
        specs = reader.manifest.tensors
        if len(specs) != 1 or specs[0].dtype != "float32" or specs[0].shape != (self.layout.total,):
            reader.close()
            self.counters["weights_mismatch"] = self.counters.get("weights_mismatch", 0) + 1
            self.log.error(
                "weight pool %s holds %s, but [roles.learner] (policy_size=%s, image_size=%d) "
                "builds a flat float32 (%d,): the inference node and the learner disagree",
                segment,
                [(t.name, t.dtype, t.shape) for t in specs],
                self.train.policy_size,
                self.train.image_size,
                self.layout.total,
            )
            return
        self.reader = reader
        self._reader_gen += 1
        if self.vram is not None:
            # Loaded from the pool (pinned staging on CUDA) into the slots made once.
            self.vram.attach_host(reader)
        self.log.info("following weight pool %s", segment)

    def _unbind(self) -> None:
        """Point every parameter at a one-element placeholder (expanded to its shape):
        nothing keeps detached slots mapped (a dead owner's GPU memory is freed once no
        process maps it)."""
        model, placeholder = self.model, self._placeholder
        if model is not None and placeholder is not None:
            for p in model.parameters():
                p.data = placeholder.expand(p.shape)
        self._bound = None

    def _maintain(self) -> None:
        """In the inference thread, between forward passes: follow the weights. A replica
        attaches / detaches its owner's slots; an owner of VRAM slots follows the host's pool
        and flips to (then starts staging) newer versions; a pool reader follows the pool."""
        if self.actor is None:  # no policy yet: nothing to bind weights to
            return
        if self.backend is not None and self.batcher is None:
            self._device_pools(advertise=False)  # the policy came after joining
        if self.follower is not None:
            if self.follower.maintain() is None and self._bound is not None:
                self._unbind()
            return
        self._follow_pool()
        vram = self.vram
        if vram is not None and vram.host is not None:
            try:
                # Briefly: this runs before every forward pass, and a replica that keeps a pin
                # on the slot to stage into must not cost every batch a long wait.
                vram.refresh(timeout=0.05)
            except DeadlineExceeded as exc:
                # A replica's forward pass still pins the slot to stage into: serve the
                # active version and stage again next time (nothing was half-written).
                self._stage_timeouts += 1
                self.log.debug("staging deferred: %s", exc)
            host = vram.host.pool.active_version
            if 0 <= host < vram.active_version and host != self._stale_warned:
                self._stale_warned = host
                self.log.warning(
                    "weight pool %s restarted its versions at %d, below the active %d: its "
                    "versions load once they pass it",
                    vram.host.pool.name,
                    host,
                    vram.active_version,
                )

    # --- batching ------------------------------------------------------------------------------

    @staticmethod
    def _rows(d: Delivery) -> int:
        images = d.arrays.get("images")
        return int(images.shape[0]) if images is not None and images.ndim == 4 else 0

    async def _gather(self) -> list[Delivery]:
        inbox, limit = self.inbox, self.settings.max_batch
        if self._carry is not None:
            first, self._carry = self._carry, None
            backlog = True
        else:
            backlog = inbox.pending() > 0
            first = await inbox.recv()
        batch, rows = [first], self._rows(first)
        peers = {first.peer}
        now = time.monotonic()
        self._seen[first.peer] = now
        if now - self._pruned > 0.1:
            self._pruned = now
            self._seen = {p: t for p, t in self._seen.items() if now - t < _PEER_IDLE_S}
        deadline = now + (0.0 if backlog else self.settings.gather_ms / 1e3)
        while rows < limit:
            if inbox.pending() > 0:
                nxt = await inbox.recv()
                self._seen[nxt.peer] = time.monotonic()
            else:
                # Every active sampler already waits on this batch: nobody else will come.
                remaining = deadline - time.monotonic()
                if remaining <= 0 or peers.issuperset(self._seen):
                    break
                try:
                    nxt = await inbox.recv(timeout=remaining)
                except DeadlineExceeded:
                    break
                self._seen[nxt.peer] = time.monotonic()
            n = self._rows(nxt)
            if rows + n > limit:
                self._carry = nxt  # never split a request: it opens the next batch
                break
            batch.append(nxt)
            peers.add(nxt.peer)
            rows += n
        return batch

    def _decode(self, batch: list[Delivery]) -> list[_Item]:
        items = []
        for d in batch:
            if self.actor is None:
                why = f"waiting for the learner's policy for suite {self.train.suite!r}"
                items.append(_Item(d, None, InferenceError("no_weights", why)))
                continue
            try:
                req = ActRequest.decode(d.meta, d.arrays, self.train.image_size, self.proprio_dim)
                items.append(_Item(d, req, None))
            except InferenceError as exc:
                items.append(_Item(d, None, exc))
        return items

    def _forward(self, batch: _Batch) -> tuple[ActOutput, int, float]:
        """In the inference thread: follow the weights, then pin the active version for
        exactly this forward pass. Raises :class:`InferenceError` (``no_weights``) when there
        is nothing to compute with."""
        try:
            self._maintain()
            if self.follower is not None:
                return self._forward_replica(self.follower, batch)
            if self.reader is None or self.reader.active_version < 0:
                raise InferenceError("no_weights", "no weight version published yet")
            if self.vram is not None:
                return self._forward_vram(self.vram, batch)
            return self._forward_pool(self.reader, batch)
        except InferenceError:
            raise
        except DvlaError as exc:  # the pool went away under us (its writer died), ...
            self.log.warning("forward pass failed, re-attaching the weights: %s", exc)
            if self.follower is None:
                self._close_reader()
            raise InferenceError("no_weights", str(exc)) from None
        finally:
            batch.release()

    def _act(self, batch: _Batch) -> tuple[ActOutput, float]:
        actor = self.actor
        assert actor is not None
        t0 = time.perf_counter()
        if batch.tensors is not None:
            t = batch.tensors
            out = actor.act_tensors(t["images"], t["proprio"], t["ids"], generator=self.gen)
        else:
            assert batch.images is not None
            assert batch.proprio is not None
            out = actor.act(batch.images, batch.proprio, batch.ins, generator=self.gen)
        return out, time.perf_counter() - t0

    def _bind(self, key: tuple[str, int, int], flat: torch.Tensor) -> None:
        if self._bound != key:
            # Parameters become views of the pinned slot: zero copy, and while the pin is
            # held the writer cannot reuse that slot.
            assert self.model is not None
            assert self.layout is not None
            bind(self.model, self.layout, flat)
            self._bound = key

    def _forward_pool(self, reader: WeightReader, batch: _Batch) -> tuple[ActOutput, int, float]:
        with reader.pin(timeout=1.0) as pinned:
            self._bind(("pool", self._reader_gen, pinned.slot), pinned.tensors()["flat"])
            out, seconds = self._act(batch)
            return out, pinned.version, seconds

    def _forward_vram(self, vram: VramWeights, batch: _Batch) -> tuple[ActOutput, int, float]:
        """On this node's VRAM slots: :meth:`_maintain` flipped to a staged version and
        started staging a newer one from the host pool (never waiting for a copy, except for
        the very first version); the forward pass runs under a pin of the active slot, and the
        parameters are views of that slot (re-pointed only when the slot changes)."""
        deadline = time.monotonic() + 5.0
        while vram.active_version < 0 and time.monotonic() < deadline:
            time.sleep(0.001)  # the first version's copy; later ones overlap with batches
            vram.refresh(timeout=1.0)
        with vram.pin(timeout=1.0) as pinned:
            self._bind(("vram", 0, pinned.slot), pinned.tensors["flat"])
            out, seconds = self._act(batch)
            return out, pinned.version, seconds

    def _forward_replica(
        self, follower: VramFollower, batch: _Batch
    ) -> tuple[ActOutput, int, float]:
        """On the owner's slots, mapped through CUDA IPC: each pass pins the owner's active
        version (the owner cannot rewrite it meanwhile) and re-points the parameters when the
        pinned slot (or the attachment) changed."""
        reader = follower.reader
        if reader is None:
            raise InferenceError("no_weights", f"no VRAM slots to read: {follower.why}")
        if reader.active_version < 0:
            raise InferenceError("no_weights", f"{follower.owner}'s VRAM slots hold no version")
        generation = follower.statistics().attaches
        with reader.pin(timeout=1.0) as pinned:
            self._bind(("replica", generation, pinned.slot), pinned.tensors["flat"])
            out, seconds = self._act(batch)
            return out, pinned.version, seconds

    async def _follow_weights(self) -> None:
        """vram mode: follow the weights while no request comes (an owner loads new versions
        for its replicas; a replica detaches from a dead owner promptly)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_TICK_S)
            try:
                await loop.run_in_executor(self._pool, self._maintain)
            except Exception as exc:  # never let this task die silently; forwards retry
                self.counters["weights_errors"] = self.counters.get("weights_errors", 0) + 1
                now = time.monotonic()
                if now - self._errors_logged > 10.0:
                    self._errors_logged = now
                    self.log.warning(
                        "following the weights: %s", exc, exc_info=not isinstance(exc, DvlaError)
                    )
            self._publish_gauges()

    def _device_counters(self) -> dict[str, int]:
        """Counters of the device pools, for the heartbeats (``Node.meters``)."""
        out: dict[str, int] = {}
        if self.backend is not None:
            out["vram.allocations"] = self.backend.allocations
        vram = self.vram
        if vram is not None:
            st = vram.statistics()
            out["vram.stages"] = st.stages
            out["vram.flips"] = st.flips
            out["vram.stage_timeouts"] = self._stage_timeouts
        follower = self.follower
        if follower is not None:
            fs = follower.statistics()
            out["vram.attaches"] = fs.attaches
            out["vram.detaches"] = fs.detaches
            out["vram.owner_deaths"] = fs.owner_deaths
            out["vram.attach_failures"] = fs.failures
        batcher = self.batcher
        if batcher is not None:
            ss = batcher.pool.statistics()
            out["slabs.acquires"] = ss.acquires
            out["slabs.backpressure"] = ss.backpressure
            out["slabs.timeouts"] = ss.timeouts
            out["slabs.fallbacks"] = batcher.fallbacks
        return out

    def _publish_gauges(self) -> None:
        now = time.monotonic()
        if now - self._stats_at < _STATS_S:
            return
        self._stats_at = now
        g = self.gauges
        vram = self.vram
        if vram is not None:
            g["vram.readers"] = float(len(vram.readers()))
            g["vram.version"] = float(vram.active_version)
        follower = self.follower
        if follower is not None:
            fs = follower.statistics()
            g["vram.attached"] = float(bool(fs.segment))
            g["vram.version"] = float(fs.version)
        batcher = self.batcher
        if batcher is not None:
            g["slabs.held"] = float(batcher.pool.statistics().held)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        follow = None
        if self.backend is not None:
            follow = asyncio.create_task(self._follow_weights(), name="follow-weights")
        try:
            await self._serve(loop)
        finally:
            if follow is not None:
                follow.cancel()
                await asyncio.gather(follow, return_exceptions=True)

    async def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            await self.wait_unpaused()
            items = self._decode(await self._gather())
            now = time.monotonic()
            if now - self._swept > _SWEEP_S:
                # Samplers come and go: unmap the request slabs of those whose process is gone.
                self._swept = now
                self.inbox.forget_dead_pools()
            good = [it for it in items if it.request is not None]
            batch = self._assemble(good)
            # The batch is copied out: give the credits (and slabs) back before computing.
            for it in items:
                it.delivery.release()
            for it in items:
                if it.error is not None:
                    await self._refuse(it.delivery, it.error)
            if batch is None:
                continue
            good = [it for it in good if it.request is not None]
            try:
                with self.lanes.busy("inference"):
                    out, version, seconds = await loop.run_in_executor(
                        self._pool, self._forward, batch
                    )
            except InferenceError as exc:
                self.counters["no_weights"] = self.counters.get("no_weights", 0) + len(good)
                for it in good:
                    await self._refuse(it.delivery, exc)
                continue
            finally:
                self._publish_gauges()
            await self._answer(good, out, version, seconds)

    def _assemble(self, good: list[_Item]) -> _Batch | None:
        """The batch from the valid requests: into a device slab (vram mode), else stacked on
        the host (a copy either way: the deliveries are released next)."""
        batcher, actor = self.batcher, self.actor
        reqs = [it.request for it in good if it.request is not None]
        if batcher is not None and actor is not None and reqs:
            filled = batcher.fill(reqs, actor.tokenizer)
            if filled is not None:
                slab, tensors = filled
                if all(it.delivery.intact() for it in good):
                    ins = [s for r in reqs for s in r.instructions]
                    return _Batch(ins, slab=slab, tensors=tensors)
                slab.release()  # a request's slab was reused while read: the slow path
                batcher.fallbacks += 1
        stacked = self._stack(good)
        if stacked is None:
            return None
        images, proprio, ins = stacked
        return _Batch(ins, images=images, proprio=proprio)

    @staticmethod
    def _stack(
        good: list[_Item],
    ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], list[str]] | None:
        """One batch from the valid requests (a copy), minus any whose slab was reused while
        it was read (marked ``torn``)."""
        reqs = [it.request for it in good if it.request is not None]
        if not reqs:
            return None
        images = np.concatenate([r.images for r in reqs])
        proprio = np.concatenate([r.proprio for r in reqs])
        intact = [it.delivery.intact() for it in good]
        if not all(intact):
            mask = np.repeat(intact, [len(r.instructions) for r in reqs])
            images, proprio = images[mask], proprio[mask]
            for it, ok in zip(good, intact, strict=True):
                if not ok:
                    it.error, it.request = InferenceError("torn", "slab reused while read"), None
            reqs = [it.request for it in good if it.request is not None]
            if not reqs:
                return None
        return images, proprio, [s for r in reqs for s in r.instructions]

    async def _refuse(self, delivery: Delivery, error: InferenceError) -> None:
        if error.reason == "bad_request":
            self.counters["bad_requests"] += 1
            self.log.debug("bad request from %s: %s", delivery.msg.sender, error)
        req = delivery.meta.get("req")
        reply = ActReply.error_reply(req if type(req) is int else -1, error.reason, str(error))
        await self._reply(delivery, reply)

    async def _answer(
        self, good: list[_Item], out: ActOutput, version: int, seconds: float
    ) -> None:
        self._batch += 1
        rows = len(out.actions)
        infer_us = int(seconds * 1e6)
        start = 0
        for it in good:
            assert it.request is not None
            n = len(it.request.instructions)
            sl = slice(start, start + n)
            start += n
            await self._reply(
                it.delivery,
                ActReply(
                    it.request.req,
                    version,
                    self._batch,
                    rows,
                    infer_us,
                    out.actions[sl],
                    out.tokens[sl],
                    out.logp[sl],
                ),
            )
        c = self.counters
        c["requests"] += len(good)
        c["observations"] += rows
        c["batches"] += 1
        if version not in self._versions:
            self._versions.add(version)
            c["versions_served"] = len(self._versions)
            self.set_weight_version(version)
        self.gauges["version"] = float(version)
        self.gauges["mean_batch"] = c["observations"] / c["batches"]
        self.gauges["mean_batch_requests"] = c["requests"] / c["batches"]
        ms = seconds * 1e3
        self._forward_ms = ms if c["batches"] == 1 else 0.9 * self._forward_ms + 0.1 * ms
        self.gauges["forward_ms"] = self._forward_ms

    async def _reply(self, delivery: Delivery, reply: ActReply) -> None:
        meta, arrays = reply.encode()
        if not await self.inbox.reply(delivery, meta, arrays, topic=TOPIC):
            self.counters["replies_dropped"] = self.counters.get("replies_dropped", 0) + 1


def request_bytes(rows: int, image_size: int, proprio_dim: int = 7) -> int:
    """Slab bytes one request of ``rows`` observations needs (``slab_size`` for
    :func:`open_remote_policy`): the arrays with their alignment padding."""
    image = rows * image_size * image_size * 3
    return image + rows * proprio_dim * 4 + 2 * 4096


# --- the client --------------------------------------------------------------------------------


@dataclass(slots=True)
class _ClientStats:
    calls: int = 0
    replies: int = 0
    deadlines: int = 0
    errors: int = 0
    late_replies: int = 0
    bad_replies: int = 0


class RemotePolicy:
    """A :data:`~dvla_nodes.learn.rollout.PolicyFn` served by ``inference`` nodes.

    Create with :func:`open_remote_policy` on the event loop that will carry its traffic (the
    node's loop); then call it from any *other* thread — e.g. the executor thread a sampler's
    rollouts run in — like a local policy: ``policy(images, proprio, instructions)`` returns a
    :class:`RemoteAct` (an :class:`ActOutput` plus the weight version used). On the loop itself
    use ``await policy.act_async(...)``. Each call sends one request over this client's own
    :class:`~dvla_bus.transport.Outbox` (requests are spread over every connected inference
    node) and waits for the reply at most ``deadline_s`` seconds, sending included; then it
    raises :class:`~dvla_bus.errors.DeadlineExceeded` naming the endpoints — a dead inference node
    never hangs a sampler. An error reply raises :class:`InferenceError`.

    Thread-safety: ``__call__`` from any number of threads other than the loop's; everything
    else on the loop."""

    def __init__(self, outbox: Outbox, loop: asyncio.AbstractEventLoop, deadline_s: float) -> None:
        self.outbox = outbox
        self.deadline_s = deadline_s
        self._loop = loop
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[ActReply]] = {}
        self._endpoints: list[str] = []
        self.stats = _ClientStats()
        self._reader: asyncio.Task[None] | None = None
        self._calls: set[concurrent.futures.Future[RemoteAct]] = set()
        self._calls_lock = threading.Lock()
        self._aborted = False

    # --- peers ---------------------------------------------------------------------------------

    async def connect(self, endpoint: str) -> None:
        """Send requests to the inference inbox at ``endpoint`` too (idempotent)."""
        await self.outbox.connect(endpoint)
        if endpoint not in self._endpoints:
            self._endpoints.append(endpoint)

    async def disconnect(self, endpoint: str) -> None:
        await self.outbox.disconnect(endpoint)
        with contextlib.suppress(ValueError):
            self._endpoints.remove(endpoint)

    def follow(self, members: Sequence[wire.MemberInfo]) -> None:
        """Track the membership table (call from ``Node.on_members``): connect to every live
        ``inference`` node's data inbox, disconnect from dead ones."""
        for m in members:
            endpoint = m.endpoints.get("data", "")
            if m.role != "inference" or not endpoint:
                continue
            if m.state == "dead":
                self._loop.create_task(self.disconnect(endpoint))
            elif endpoint not in self._endpoints:
                self._loop.create_task(self.connect(endpoint))

    @property
    def connected(self) -> int:
        """Inference inboxes that have granted credit."""
        return self.outbox.statistics().peers if self._endpoints else 0

    async def wait_ready(self, timeout: float = 10.0) -> None:
        await self.outbox.wait_ready(timeout)

    # --- acting --------------------------------------------------------------------------------

    def __call__(
        self,
        images: np.ndarray[Any, Any],
        proprio: np.ndarray[Any, Any],
        instructions: Sequence[str],
    ) -> RemoteAct:
        if _on_loop_thread(self._loop):
            raise DvlaError(
                "RemotePolicy called on its own event loop's thread (it would deadlock): "
                "call it from an executor thread, or await act_async() on the loop"
            )
        if self._aborted:
            raise DvlaError("RemotePolicy: aborted (its node is stopping)")
        coro = self.act_async(images, proprio, instructions)
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError:  # the loop is closed: the node is shutting down
            coro.close()
            raise DeadlineExceeded("RemotePolicy: its event loop is closed") from None
        with self._calls_lock:
            self._calls.add(fut)
        try:
            # act_async keeps its own deadline; this one only guards a stopped loop.
            return fut.result(timeout=self.deadline_s + 1.0)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise DeadlineExceeded(
                f"RemotePolicy: no answer within {self.deadline_s:.1f}s from {self._endpoints} "
                "(its event loop is not running?)"
            ) from None
        except concurrent.futures.CancelledError:
            raise DvlaError("RemotePolicy: aborted (its node is stopping)") from None
        finally:
            with self._calls_lock:
                self._calls.discard(fut)

    def abort(self) -> None:
        """End every call in flight now, and refuse new ones (:class:`DvlaError`): a stopping
        node's rollout thread must finish before its environments close, and the inference
        node it waits on may already be gone. Thread-safe."""
        self._aborted = True
        with self._calls_lock:
            calls = list(self._calls)
        for fut in calls:
            fut.cancel()

    async def act_async(
        self,
        images: np.ndarray[Any, Any],
        proprio: np.ndarray[Any, Any],
        instructions: Sequence[str],
    ) -> RemoteAct:
        """One request, awaited on the loop (see the class docstring)."""
        self.stats.calls += 1
        deadline = time.monotonic() + self.deadline_s
        req = next(self._ids)
        meta, arrays = ActRequest(
            req,
            images,
            np.asarray(proprio, dtype=np.float32),
            tuple(instructions),
        ).encode()
        fut: asyncio.Future[ActReply] = self._loop.create_future()
        self._waiting[req] = fut
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._late(req)
                try:
                    sent = await self.outbox.send(meta, arrays, topic=TOPIC, timeout=remaining)
                except DeadlineExceeded:
                    raise self._late(req) from None
                if sent:
                    break
                # Dropped (no live peer behind the connection): retry until the deadline, so
                # a restarting inference node is picked up again.
                await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            try:
                reply = await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise self._late(req) from None
        finally:
            self._waiting.pop(req, None)
        if reply.error:
            self.stats.errors += 1
            raise InferenceError(reply.error, reply.detail)
        return RemoteAct(
            actions=np.array(reply.actions),
            tokens=np.array(reply.tokens),
            logp=np.array(reply.logp),
            version=reply.version,
            batch=reply.batch,
            batch_size=reply.batch_size,
            infer_us=reply.infer_us,
        )

    def _late(self, req: int) -> DeadlineExceeded:
        self.stats.deadlines += 1
        return DeadlineExceeded(
            f"RemotePolicy {self.outbox.name}: request {req} got no answer within "
            f"{self.deadline_s:.1f}s from inference node(s) {self._endpoints or '(none connected)'}"
        )

    async def _read_replies(self) -> None:
        while True:
            received = await self.outbox.recv_reply()
            try:
                reply = ActReply.decode(received)
            except InferenceError:
                self.stats.bad_replies += 1
                continue
            fut = self._waiting.get(reply.req)
            if fut is None or fut.done():
                self.stats.late_replies += 1  # its caller gave up (deadline)
                continue
            self.stats.replies += 1
            fut.set_result(reply)

    def counters(self) -> dict[str, int]:
        """Flat counters for a node's heartbeat (``Node.meters``)."""
        s = self.stats
        return {
            "remote.calls": s.calls,
            "remote.replies": s.replies,
            "remote.deadlines": s.deadlines,
            "remote.errors": s.errors,
            "remote.late_replies": s.late_replies,
        }


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


@contextlib.asynccontextmanager
async def open_remote_policy(
    ctx: zmq.asyncio.Context,
    *,
    name: str,
    host: str,
    run: str = "",
    deadline_s: float = 10.0,
    slab_size: int = 0,
    slabs: int = 4,
    endpoints: Sequence[str] = (),
    credentials: Credentials | None = None,
) -> AsyncIterator[RemotePolicy]:
    """A :class:`RemotePolicy` with its own outbox. ``name`` must be unique for the process's
    whole life: it names the outbox's shared-memory segment, and an inference node keeps the
    segments it has mapped by name, so a name reused after close would be read through the old
    mapping (the requests are dropped as stale and run into the deadline). ``slab_size > 0``
    sends same-host requests through ``slabs`` shared-memory slabs of that many bytes (see
    :func:`request_bytes`; a larger request travels inline); ``endpoints`` are connected at
    once (more via :meth:`RemotePolicy.connect` / :meth:`RemotePolicy.follow`). Must be entered
    on the loop that carries the traffic; closed with it."""
    if not deadline_s > 0:
        raise ConfigError(f"RemotePolicy deadline_s={deadline_s} must be > 0")
    async with open_outbox(
        ctx,
        name=name,
        host=host,
        run=run,
        slab_size=slab_size,
        slabs=slabs,
        policy="block",
        credentials=credentials,
    ) as outbox:
        policy = RemotePolicy(outbox, asyncio.get_running_loop(), deadline_s)
        reader = asyncio.create_task(policy._read_replies(), name=f"{name}.replies")
        try:
            for endpoint in endpoints:
                await policy.connect(endpoint)
            yield policy
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            for fut in policy._waiting.values():
                fut.cancel()
