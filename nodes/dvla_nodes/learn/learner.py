"""The learner: behaviour cloning for the warm start and GRPO updates, on numpy episode
batches. It owns the model, its flat parameter buffer, the optimiser and the policy version.

``update(episodes)`` is the seam for the distributed pipeline: trajectories arrive as numpy
arrays with their behaviour log-probs and the policy version that sampled them; episodes more
than ``max_version_lag`` versions old are rejected (and counted) before anything else.

Devices: ``TrainConfig.device`` places the model, its flat buffer and the optimiser state
(``cpu``, ``cuda``, ``cuda:N``, ``auto``). Every minibatch's inputs are gathered into fixed slabs
on that device (:class:`MinibatchSlabs`, the trajectory half of the dual pool): the slabs hold
the largest padded minibatch (``minibatch`` rounded up to ``minibatch_bucket``) or cloning batch,
so after the first minibatch no input is allocated, on the device or the host. Sampling stays on
the host with CPU generators, so a run draws the same minibatches on any device. Published
weights and checkpoints read the flat buffer through :meth:`Learner.host_flat` (a view on the
CPU, one copy into a preallocated host buffer on a GPU).
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dvla_bus.errors import ConfigError, ResourceError
from dvla_bus.pool import Layout
from dvla_bus.shm import PAGE_SIZE, round_up
from dvla_bus.vram import DeviceBackend, VramSlab, VramSlabPool, backend_from_spec, torch_dtype
from dvla_nodes.learn.config import TrainConfig
from dvla_nodes.learn.grpo import group_advantages, grpo_loss, reference_kl
from dvla_nodes.learn.rollout import Episodes
from dvla_nodes.policy.flat import FlatLayout, flatten
from dvla_nodes.policy.model import VLAPolicy
from dvla_nodes.policy.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MINIBATCH_SLABS = 2
"""Slabs of the learner's pool: a GRPO minibatch and its cloning-anchor rows are live together."""

Take = Mapping[str, tuple[np.ndarray, np.ndarray]]
"""Per field: the source array and the indices of its rows to gather (axis 0)."""


@dataclass(frozen=True, slots=True)
class UpdateStats:
    version: int
    episodes: int
    steps: int
    stale_episodes: int
    groups: int
    skipped_groups: int
    loss: float
    clip_fraction: float
    approx_kl: float
    entropy: float
    grad_norm: float
    seconds: float
    kl_ref: float = 0.0  # mean KL(policy || reference) per token (0 without a reference)


@dataclass(frozen=True, slots=True)
class BCStats:
    steps: int
    epochs: int
    loss: float
    token_accuracy: float
    seconds: float


@dataclass(frozen=True, slots=True)
class LearnerStatistics:
    device: str
    slab_rows: int
    """Rows a minibatch slab holds (0: no slabs yet, or slabs off)."""
    slab_bytes: int
    staging: str
    """How inputs reach the device: ``direct`` (the slabs are host memory), ``pinned``
    (page-locked host staging) or ``pageable (why)``; ``none`` before the first minibatch."""
    acquires: int
    backpressure: int
    """Slab acquires that found no free slab (that minibatch went the ordinary way)."""
    fallbacks: int
    """Minibatches built without a slab although slabs are on (no free slab, too many rows, or
    another shape while a slab was held)."""
    rebuilds: int
    """Slab pools rebuilt for episodes of another shape."""
    allocations: int
    """Device buffers the backend allocated (one per slab pool built)."""


def episode_rewards(ep: Episodes, cfg: TrainConfig) -> np.ndarray:
    """Return of each episode: the sparse success reward plus the shaping return."""
    return (cfg.success_reward * ep.success + cfg.shaping_coef * ep.shaping).astype(np.float32)


def soft_targets(tokens: torch.Tensor, bins: int, sigma: float) -> torch.Tensor:
    """Gaussian label smoothing: (..., bins) distributions centred on ``tokens`` (on their
    device)."""
    if sigma <= 0:
        return torch.nn.functional.one_hot(tokens, bins).float()
    k = torch.arange(bins, dtype=torch.float32, device=tokens.device)
    logits = -((k - tokens[..., None].float()) ** 2) / (2.0 * sigma * sigma)
    return torch.softmax(logits, dim=-1)


def _unregister(backend: DeviceBackend, address: int, keep: torch.Tensor) -> None:
    """Unpin host memory; ``keep`` (the memory's tensor) stays alive until this ran."""
    backend.host_unregister(address)
    del keep


class MinibatchSlabs:
    """The learner's minibatch inputs in fixed device slabs (a
    :class:`~dvla_bus.vram.VramSlabPool`): the trajectory half of the dual pool, on the
    learner's device.

    Each of ``slabs`` slabs holds ``rows`` rows of every field of ``fields`` (name -> numpy
    dtype string and per-row shape), laid out by a :class:`~dvla_bus.pool.Layout`. :meth:`fill`
    gathers a minibatch's rows (``np.take(..., out=view)``) and returns the device tensors of its
    rows: on the CPU straight into the slab; on a GPU into a host staging area of the same layout
    per slab, page-locked through the backend (``cudaHostRegister``) when the driver allows, then
    one host-to-device copy per field. The device buffer and the staging area are allocated
    once, here; nothing is allocated per minibatch.

    A slab's staging area is rewritten only after the copies out of it finished (an event per
    slab); its device memory is reused only after the stream that read it passed its release
    (the pool's events). No free slab (backpressure) or more rows than a slab holds: :meth:`fill`
    returns None and the caller builds that minibatch the ordinary way. One thread fills and
    releases (the learner's). :meth:`close` unpins the staging area."""

    def __init__(
        self,
        backend: DeviceBackend,
        rows: int,
        fields: Mapping[str, tuple[str, tuple[int, ...]]],
        *,
        slabs: int = MINIBATCH_SLABS,
    ) -> None:
        if rows < 1:
            raise ConfigError(f"minibatch slabs: rows {rows} must be >= 1")
        self.backend = backend
        self.rows = rows
        self.layout = Layout.pack(
            [(name, dtype, (rows, *shape)) for name, (dtype, shape) in fields.items()]
        )
        self.pool = VramSlabPool(slabs, self.layout.nbytes, backend=backend)
        self.staged = backend.kind != "cpu"
        self.staging = "direct"
        self._host: list[dict[str, np.ndarray] | None] = [None] * slabs
        self._sources: list[dict[str, torch.Tensor]] = []
        self._copied = [backend.new_event() for _ in range(slabs)]
        self._pending = [False] * slabs
        self._unpin: weakref.finalize[Any, MinibatchSlabs] | None = None
        if self.staged:
            stride = round_up(self.layout.nbytes, 512)
            span = round_up(stride * slabs, PAGE_SIZE)
            raw = torch.empty(span + PAGE_SIZE, dtype=torch.uint8)
            skip = -raw.data_ptr() % PAGE_SIZE  # page-aligned, for the driver
            buf = raw[skip : skip + span]
            try:
                backend.host_register(buf.data_ptr(), span, read_only=False)
            except ResourceError as exc:
                self.staging = f"pageable ({exc})"
                log.warning("learner minibatch staging stays pageable: %s", exc)
            else:
                self.staging = "pinned"
                self._unpin = weakref.finalize(self, _unregister, backend, buf.data_ptr(), raw)
                self._unpin.atexit = False  # the registration ends with the process
            for i in range(slabs):
                base = buf[i * stride : i * stride + self.layout.nbytes]
                views = {
                    f.name: base[f.offset : f.end].view(torch_dtype(f.dtype)).view(f.shape)
                    for f in self.layout.fields
                }
                self._sources.append(views)
                self._host[i] = {k: v.numpy() for k, v in views.items()}

    @property
    def held(self) -> int:
        return self.pool.statistics().held

    def fill(
        self, n: int, take: Take, *, real: int | None = None
    ) -> tuple[VramSlab, dict[str, torch.Tensor]] | None:
        """Gather rows ``take[name] = (source, indices)`` (``n`` indices each) into a free slab;
        with ``real``, the ``weight`` field is 1 for rows ``[:real]`` and 0 for ``[real:n]``.
        Returns the slab (release it once the step that reads it is enqueued) and the device
        tensors of the ``n`` rows by field, or None (no free slab, or ``n > rows``)."""
        if n > self.rows:
            return None
        slab = self.pool.acquire_nowait()
        if slab is None:
            return None
        try:
            return slab, self._fill(slab, n, take, real)
        except BaseException:
            self.pool.release(slab)  # a failed gather must not hold the slab for good
            raise

    def _fill(
        self, slab: VramSlab, n: int, take: Take, real: int | None
    ) -> dict[str, torch.Tensor]:
        i = slab.index
        device = slab.view(self.layout)
        if self._pending[i]:  # the last copies out of this staging area must be done
            self._copied[i].synchronize()
            self._pending[i] = False
        host = self._host[i]
        if host is None:  # the CPU: gather straight into the slab
            host = self._host[i] = {k: v.numpy() for k, v in device.items()}
        names = list(take)
        for name, (src, idx) in take.items():
            # mode="clip": numpy buffers ``out`` (a temporary) only in the default mode
            np.take(src, idx, axis=0, out=host[name][:n], mode="clip")
        if real is not None:
            weight = host["weight"]
            weight[:real] = 1.0
            weight[real:n] = 0.0
            names.append("weight")
        out: dict[str, torch.Tensor] = {}
        for name in names:
            dst = device[name][:n]
            if self.staged:
                # Into ``.data``: every view of the pool's buffer shares one autograd version
                # counter, so an in-place copy into this slab would flag the other slab's
                # tensors (saved for this step's backward) as modified. They are not: a held
                # slab is never written (the numpy writes on the CPU path bump nothing either).
                self.backend.copy(dst.data, self._sources[i][name][:n], None)
            out[name] = dst
        if self.staged:
            self.backend.record(self._copied[i])
            self._pending[i] = True
        return out

    def close(self) -> None:
        """Wait for copies in flight, drop the device buffer, unpin the staging area
        (idempotent)."""
        for i, pending in enumerate(self._pending):
            if pending:
                self._copied[i].synchronize()
                self._pending[i] = False
        self.pool.close()
        self._host = [None] * len(self._host)
        self._sources = []
        if self._unpin is not None:
            self._unpin()


def learner_backend(spec: str) -> DeviceBackend:
    """The device backend of ``TrainConfig.device``; a :class:`~dvla_bus.errors.ResourceError`
    naming the field when it asks for CUDA on a machine without it."""
    try:
        return backend_from_spec(spec)
    except ResourceError as exc:
        raise ResourceError(
            f"device = {spec!r}: {exc} (train with device = 'cpu', or 'auto' to use a GPU only "
            "where there is one)"
        ) from None


class Learner:
    """Owns ``model`` (moved to ``cfg.device``; its parameters are moved into one flat buffer
    there) and an AdamW optimiser. ``backend`` overrides the device backend ``cfg.device``
    names (tests pass one that fakes the CUDA calls); ``slabs=False`` builds every minibatch the
    ordinary way (a fresh tensor per field) instead of in :class:`MinibatchSlabs`. One thread
    uses a learner at a time; :meth:`close` releases the slabs."""

    def __init__(
        self,
        model: VLAPolicy,
        tokenizer: Tokenizer,
        cfg: TrainConfig,
        *,
        backend: DeviceBackend | None = None,
        slabs: bool = True,
    ) -> None:
        self.backend = backend if backend is not None else learner_backend(cfg.device)
        self.device = self.backend.device
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.layout: FlatLayout
        self.layout, self.flat = flatten(model)
        self.version = 0
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
        self._gen = torch.Generator().manual_seed(cfg.seed + 17)
        self._anchor: Episodes | None = None
        self._anchor_ids: np.ndarray | None = None
        self._reference: VLAPolicy | None = None
        self._use_slabs = slabs
        self._slabs: MinibatchSlabs | None = None
        self._busy = threading.Lock()  # held by update and cloning; close waits for it
        self._slab_key: tuple[tuple[str, str, tuple[int, ...]], ...] = ()
        self._old = (0, 0)  # acquires and backpressure of slab pools closed since
        self._fallbacks = 0
        self._rebuilds = 0
        self._host_flat: torch.Tensor | None = None

    # ------------------------------------------------------------------ device plumbing

    def host_flat(self) -> np.ndarray:
        """The flat parameters in host memory, for publishing and checkpoints: on the CPU a
        view of :attr:`flat` (no copy); on a device one copy into a host buffer allocated
        once (page-locked where CUDA is), valid until the next call. Not concurrently with
        :meth:`update`."""
        flat = self.flat.detach()
        if flat.device.type == "cpu":
            return flat.numpy()
        if self._host_flat is None:
            pinned = flat.device.type == "cuda" and torch.cuda.is_available()
            self._host_flat = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=pinned)
        self._host_flat.copy_(flat)  # synchronous: the host reads it next
        return self._host_flat.numpy()

    def slab_rows(self) -> int:
        """Rows of a minibatch slab: the largest padded GRPO minibatch or cloning batch."""
        cfg = self.cfg
        bucket = cfg.minibatch_bucket
        grpo = round_up(cfg.minibatch, bucket) if bucket > 0 else cfg.minibatch
        return max(grpo, cfg.rl_bc_batch, cfg.bc_batch, 1)

    def _slabs_for(self, ep: Episodes, ids: np.ndarray) -> MinibatchSlabs | None:
        """The slabs for ``ep``'s fields (built on first use; rebuilt for another shape when
        no slab is held), or None (slabs off, or another shape while one is held)."""
        if not self._use_slabs:
            return None
        arrays = (
            ("images", ep.images),
            ("proprio", ep.proprio),
            ("state", ep.state),
            ("tokens", ep.tokens),
            ("logp", ep.logp),
            ("ids", ids),
        )
        key = tuple((name, a.dtype.str, tuple(a.shape[1:])) for name, a in arrays)
        slabs = self._slabs
        if slabs is not None and key == self._slab_key:
            return slabs
        if slabs is not None:
            if slabs.held:
                return None
            self._close_slabs()
            self._rebuilds += 1
        fields = {name: (dtype, shape) for name, dtype, shape in key}
        fields["advantage"] = ("<f4", ())
        fields["weight"] = ("<f4", ())
        self._slabs = MinibatchSlabs(self.backend, self.slab_rows(), fields)
        self._slab_key = key
        return self._slabs

    def _close_slabs(self) -> None:
        slabs, self._slabs = self._slabs, None
        if slabs is not None:
            st = slabs.pool.statistics()
            self._old = (self._old[0] + st.acquires, self._old[1] + st.backpressure)
            slabs.close()

    def _inputs(
        self,
        ep: Episodes,
        rows: np.ndarray,
        ids: np.ndarray,
        *,
        advantage: np.ndarray | None = None,
        real: int | None = None,
    ) -> tuple[VramSlab | None, dict[str, torch.Tensor]]:
        """The device tensors of ``ep``'s ``rows`` (``ids``: the episodes' instruction ids;
        with ``advantage`` (per episode) also ``logp`` and ``advantage``; with ``real`` also
        ``weight``, see :meth:`MinibatchSlabs.fill`), in a slab when one is free (release it
        after the optimiser step), else as fresh tensors (slab None)."""
        episode = ep.episode[rows]
        take: dict[str, tuple[np.ndarray, np.ndarray]] = {
            "images": (ep.images, rows),
            "proprio": (ep.proprio, rows),
            "state": (ep.state, rows),
            "tokens": (ep.tokens, rows),
            "ids": (ids, episode),
        }
        if advantage is not None:
            take["logp"] = (ep.logp, rows)
            take["advantage"] = (advantage, episode)
        slabs = self._slabs_for(ep, ids)
        if slabs is not None:
            got = slabs.fill(len(rows), take, real=real)
            if got is not None:
                return got
        if self._use_slabs:
            self._fallbacks += 1
        out = {
            name: torch.from_numpy(src[idx]).to(self.device) for name, (src, idx) in take.items()
        }
        if real is not None:
            weight = torch.zeros(len(rows))
            weight[:real] = 1.0
            out["weight"] = weight.to(self.device)
        return None, out

    def _tensors(
        self, ep: Episodes, rows: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images, proprio and instruction ids of ``ep``'s ``rows`` as fresh tensors on the
        learner's device (for evaluating the model outside an update)."""
        ids = self.tokenizer.encode_batch(ep.instructions)[ep.episode[rows]]
        return (
            torch.from_numpy(ep.images[rows]).to(self.device),
            torch.from_numpy(ep.proprio[rows]).to(self.device),
            torch.from_numpy(ids).to(self.device),
        )

    def _padded(self, rows: np.ndarray) -> tuple[np.ndarray, int | None]:
        """``rows`` padded to a multiple of ``minibatch_bucket`` by repeating its first rows,
        and how many rows are real (weight 1; the padding weighs 0); ``None`` when no padding
        is needed."""
        bucket = self.cfg.minibatch_bucket
        n = len(rows)
        size = -(-n // bucket) * bucket if bucket > 0 else n
        if size == n:
            return rows, None
        return np.resize(rows, size), n

    def statistics(self) -> LearnerStatistics:
        slabs = self._slabs
        st = slabs.pool.statistics() if slabs is not None else None
        return LearnerStatistics(
            device=str(self.device),
            slab_rows=slabs.rows if slabs is not None else 0,
            slab_bytes=slabs.layout.nbytes if slabs is not None else 0,
            staging=slabs.staging if slabs is not None else "none",
            acquires=self._old[0] + (st.acquires if st is not None else 0),
            backpressure=self._old[1] + (st.backpressure if st is not None else 0),
            fallbacks=self._fallbacks,
            rebuilds=self._rebuilds,
            allocations=self.backend.allocations,
        )

    def close(self, timeout: float = 10.0) -> None:
        """Release the minibatch slabs (idempotent; a later update builds them again). An
        update or cloning run still going on another thread (its node was stopped under it)
        is waited for up to ``timeout`` seconds; past that the slabs are left to the process's
        exit rather than freed (or, on CUDA, unpinned) under a copy that may still read them."""
        if not self._busy.acquire(timeout=timeout):
            return
        try:
            self._close_slabs()
        finally:
            self._busy.release()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ------------------------------------------------------------------ warm start

    def _bc_loss(self, t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cloning loss on demonstration rows ``t`` (images, proprio, ids, tokens, state):
        cross-entropy against Gaussian-smoothed targets, plus the auxiliary position loss;
        also returns the logits."""
        cfg = self.cfg
        logits, aux = self.model.forward_with_aux(t["images"], t["proprio"], t["ids"])
        target = soft_targets(t["tokens"], logits.shape[-1], cfg.bc_label_sigma)
        logp = torch.log_softmax(logits / cfg.temperature, dim=-1)
        loss = -(target * logp).sum(-1).mean()
        if aux is not None and cfg.bc_aux_coef > 0:
            loss = loss + cfg.bc_aux_coef * F.mse_loss(aux, t["state"])
        return loss, logits

    def set_anchor(self, demos: Episodes | None) -> None:
        """Demonstrations mixed into every GRPO minibatch with weight ``rl_bc_coef`` (a cloning
        anchor, as in DAPG), so skills that rarely succeed yet are not forgotten."""
        self._anchor = demos
        self._anchor_ids = (
            None if demos is None else self.tokenizer.encode_batch(demos.instructions)
        )

    def set_reference(self, flat: np.ndarray | None = None) -> None:
        """Freeze the policy's current weights (or ``flat``, in the layout's order: a run's
        warm-start checkpoint when it resumes) as the reference of the ``rl_kl_coef`` term.
        A no-op when ``rl_kl_coef`` is 0, so no second model is held."""
        if self.cfg.rl_kl_coef <= 0:
            self._reference = None
            return
        with self._busy:
            ref = copy.deepcopy(self.model)
            _, ref_flat = flatten(ref)  # its own buffer, on the policy's device
            if flat is not None:
                if flat.shape != (self.layout.total,):
                    raise ConfigError(
                        f"reference weights have {flat.size} parameters, "
                        f"this policy {self.layout.total}"
                    )
                ref_flat.copy_(torch.from_numpy(np.ascontiguousarray(flat)))  # casts
            ref.requires_grad_(False)
            ref.eval()
            self._reference = ref

    @property
    def has_reference(self) -> bool:
        return self._reference is not None

    def behaviour_clone(
        self, demos: Episodes, epochs: int | None = None, seconds: float | None = None
    ) -> BCStats:
        """Fit the policy to the demonstrations' action tokens (cross-entropy against
        Gaussian-smoothed targets): ``epochs`` passes of minibatches of ``bc_batch``, or as many
        as fit in ``seconds`` (the learning-rate schedule assumes the epoch count)."""
        with self._busy:
            return self._behaviour_clone(demos, epochs, seconds)

    def _behaviour_clone(
        self, demos: Episodes, epochs: int | None, seconds: float | None
    ) -> BCStats:
        cfg = self.cfg
        epochs = cfg.bc_epochs if epochs is None else epochs
        t0 = time.perf_counter()
        self.set_lr(cfg.bc_lr)
        n = demos.num_steps
        ids = self.tokenizer.encode_batch(demos.instructions)
        steps = 0
        total_steps = max(1, epochs * math.ceil(n / cfg.bc_batch))
        loss_v, acc_v = 0.0, 0.0
        self.model.train()
        done_epochs = 0
        for _ in range(epochs):
            if seconds is not None and time.perf_counter() - t0 > seconds:
                break
            done_epochs += 1
            perm = torch.randperm(n, generator=self._gen).numpy()
            for start in range(0, n, cfg.bc_batch):
                rows = perm[start : start + cfg.bc_batch]
                slab, t = self._inputs(demos, rows, ids)
                try:
                    loss, logits = self._bc_loss(t)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()  # type: ignore[no-untyped-call]
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    # cosine decay keeps the end of cloning from overshooting
                    self.set_lr(cfg.bc_lr * 0.5 * (1 + math.cos(math.pi * steps / total_steps)))
                    self.optimizer.step()
                    steps += 1
                    loss_v = float(loss.detach())
                    acc_v = float((logits.argmax(-1) == t["tokens"]).float().mean())
                finally:
                    if slab is not None:
                        slab.release()
        self.set_lr(cfg.lr)
        self.optimizer.state.clear()  # RL starts with fresh moments
        self.version += 1
        return BCStats(steps, done_epochs, loss_v, acc_v, time.perf_counter() - t0)

    # ------------------------------------------------------------------ GRPO

    def update(self, episodes: Episodes) -> UpdateStats:
        """One GRPO update on a batch of complete episodes (grouped by ``episodes.group``)."""
        with self._busy:
            return self._update(episodes)

    def _update(self, episodes: Episodes) -> UpdateStats:
        cfg = self.cfg
        t0 = time.perf_counter()
        fresh = episodes.version >= self.version - cfg.max_version_lag
        stale = int((~fresh).sum())
        if stale:
            episodes = episodes.select(fresh)
        adv = group_advantages(
            episode_rewards(episodes, cfg),
            episodes.group,
            equal_tol=cfg.equal_tol,
            std_norm=cfg.adv_std_norm,
        )
        rows = np.flatnonzero(adv.keep[episodes.episode])
        ids = self.tokenizer.encode_batch(episodes.instructions)
        stats = dict(loss=0.0, clip=0.0, kl=0.0, ent=0.0, gn=0.0, kl_ref=0.0)
        n_mb = 0
        self.model.train()
        for _ in range(cfg.epochs if len(rows) else 0):
            perm = rows[torch.randperm(len(rows), generator=self._gen).numpy()]
            n_chunks = max(1, math.ceil(len(perm) / cfg.minibatch))
            for real_rows in np.array_split(perm, n_chunks):
                chunk, real = self._padded(real_rows)
                held: list[VramSlab] = []
                try:
                    slab, t = self._inputs(episodes, chunk, ids, advantage=adv.advantage, real=real)
                    if slab is not None:
                        held.append(slab)
                    weight = t.get("weight")
                    logits, aux = self.model.forward_with_aux(t["images"], t["proprio"], t["ids"])
                    parts = grpo_loss(
                        logits,
                        t["tokens"],
                        t["logp"],
                        t["advantage"],
                        temperature=cfg.temperature,
                        clip_low=cfg.clip_low,
                        clip_high=cfg.clip_high,
                        entropy_coef=cfg.entropy_coef,
                        weight=weight,
                    )
                    loss = cfg.pg_coef * parts.loss
                    reference = self._reference
                    if reference is not None and cfg.rl_kl_coef > 0:
                        with torch.no_grad():
                            ref_logits = reference(t["images"], t["proprio"], t["ids"])
                        kl_ref = reference_kl(
                            logits, ref_logits, temperature=cfg.temperature, weight=weight
                        )
                        loss = loss + cfg.rl_kl_coef * kl_ref
                        stats["kl_ref"] += float(kl_ref.detach())
                    if aux is not None and cfg.rl_aux_coef > 0:
                        state = t["state"]
                        if weight is None:
                            aux_loss = F.mse_loss(aux, state)
                        else:
                            per_row = ((aux - state) ** 2).mean(-1)
                            aux_loss = (per_row * weight).sum() / weight.sum().clamp_min(1.0)
                        loss = loss + cfg.rl_aux_coef * aux_loss
                    anchor, anchor_ids = self._anchor, self._anchor_ids
                    if (
                        anchor is not None
                        and anchor_ids is not None
                        and cfg.rl_bc_coef > 0
                        and anchor.num_steps
                    ):
                        demo_rows = torch.randint(
                            anchor.num_steps, (cfg.rl_bc_batch,), generator=self._gen
                        ).numpy()
                        demo_slab, demo = self._inputs(anchor, demo_rows, anchor_ids)
                        if demo_slab is not None:
                            held.append(demo_slab)
                        loss = loss + cfg.rl_bc_coef * self._bc_loss(demo)[0]
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()  # type: ignore[no-untyped-call]
                    gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                finally:
                    for s in held:
                        s.release()
                n_mb += 1
                stats["loss"] += parts.policy_loss
                stats["clip"] += parts.clip_fraction
                stats["kl"] += parts.approx_kl
                stats["ent"] += parts.entropy
                stats["gn"] += float(gn)
        if n_mb:
            self.version += 1
        d = max(n_mb, 1)
        return UpdateStats(
            version=self.version,
            episodes=episodes.num_episodes,
            steps=len(rows),
            stale_episodes=stale,
            groups=adv.groups,
            skipped_groups=adv.skipped_groups,
            loss=stats["loss"] / d,
            clip_fraction=stats["clip"] / d,
            approx_kl=stats["kl"] / d,
            entropy=stats["ent"] / d,
            grad_norm=stats["gn"] / d,
            seconds=time.perf_counter() - t0,
            kl_ref=stats["kl_ref"] / d,
        )
