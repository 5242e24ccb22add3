"""The learner: behaviour cloning for the warm start and GRPO updates, on numpy episode
batches. It owns the model, its flat parameter buffer, the optimiser and the policy version.

``update(episodes)`` is the seam for the distributed pipeline: trajectories arrive as numpy
arrays with their behaviour log-probs and the policy version that sampled them; episodes more
than ``max_version_lag`` versions old are rejected (and counted) before anything else.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dvla_nodes.learn.config import TrainConfig
from dvla_nodes.learn.grpo import group_advantages, grpo_loss
from dvla_nodes.learn.rollout import Episodes
from dvla_nodes.policy.flat import FlatLayout, flatten
from dvla_nodes.policy.model import VLAPolicy
from dvla_nodes.policy.tokenizer import Tokenizer


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


@dataclass(frozen=True, slots=True)
class BCStats:
    steps: int
    epochs: int
    loss: float
    token_accuracy: float
    seconds: float


def episode_rewards(ep: Episodes, cfg: TrainConfig) -> np.ndarray:
    """Return of each episode: the sparse success reward plus the shaping return."""
    return (cfg.success_reward * ep.success + cfg.shaping_coef * ep.shaping).astype(np.float32)


def soft_targets(tokens: torch.Tensor, bins: int, sigma: float) -> torch.Tensor:
    """Gaussian label smoothing: (..., bins) distributions centred on ``tokens``."""
    if sigma <= 0:
        return torch.nn.functional.one_hot(tokens, bins).float()
    k = torch.arange(bins, dtype=torch.float32)
    logits = -((k - tokens[..., None].float()) ** 2) / (2.0 * sigma * sigma)
    return torch.softmax(logits, dim=-1)


class Learner:
    """Owns ``model`` (its parameters are moved into one flat buffer) and an AdamW optimiser."""

    def __init__(self, model: VLAPolicy, tokenizer: Tokenizer, cfg: TrainConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.layout: FlatLayout
        self.layout, self.flat = flatten(model)
        self.version = 0
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
        self._gen = torch.Generator().manual_seed(cfg.seed + 17)
        self._anchor: Episodes | None = None

    def _tensors(
        self, ep: Episodes, rows: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = self.tokenizer.encode_batch(ep.instructions)[ep.episode[rows]]
        return (
            torch.from_numpy(ep.images[rows]),
            torch.from_numpy(ep.proprio[rows]),
            torch.from_numpy(ids),
        )

    def _padded(self, rows: np.ndarray) -> tuple[np.ndarray, torch.Tensor | None]:
        """``rows`` padded to a multiple of ``minibatch_bucket`` by repeating its first rows,
        with their weights (1 real, 0 padding); ``None`` weights when no padding is needed."""
        bucket = self.cfg.minibatch_bucket
        n = len(rows)
        size = -(-n // bucket) * bucket if bucket > 0 else n
        if size == n:
            return rows, None
        weight = torch.zeros(size)
        weight[:n] = 1.0
        return np.resize(rows, size), weight

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ------------------------------------------------------------------ warm start

    def _bc_loss(
        self, demos: Episodes, rows: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cloning loss on demonstration ``rows`` (cross-entropy against Gaussian-smoothed
        targets, plus the auxiliary position loss); also returns the logits and tokens."""
        cfg = self.cfg
        images, proprio, ids = self._tensors(demos, rows)
        tokens = torch.from_numpy(demos.tokens[rows])
        logits, aux = self.model.forward_with_aux(images, proprio, ids)
        target = soft_targets(tokens, logits.shape[-1], cfg.bc_label_sigma)
        logp = torch.log_softmax(logits / cfg.temperature, dim=-1)
        loss = -(target * logp).sum(-1).mean()
        if aux is not None and cfg.bc_aux_coef > 0:
            state = torch.from_numpy(demos.state[rows])
            loss = loss + cfg.bc_aux_coef * F.mse_loss(aux, state)
        return loss, logits, tokens

    def set_anchor(self, demos: Episodes | None) -> None:
        """Demonstrations mixed into every GRPO minibatch with weight ``rl_bc_coef`` (a cloning
        anchor, as in DAPG), so skills that rarely succeed yet are not forgotten."""
        self._anchor = demos

    def behaviour_clone(
        self, demos: Episodes, epochs: int | None = None, seconds: float | None = None
    ) -> BCStats:
        """Fit the policy to the demonstrations' action tokens (cross-entropy against
        Gaussian-smoothed targets): ``epochs`` passes of minibatches of ``bc_batch``, or as many
        as fit in ``seconds`` (the learning-rate schedule assumes the epoch count)."""
        cfg = self.cfg
        epochs = cfg.bc_epochs if epochs is None else epochs
        t0 = time.perf_counter()
        self.set_lr(cfg.bc_lr)
        n = demos.num_steps
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
                loss, logits, tokens = self._bc_loss(demos, rows)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                # cosine decay keeps the end of cloning from overshooting
                self.set_lr(cfg.bc_lr * 0.5 * (1 + math.cos(math.pi * steps / total_steps)))
                self.optimizer.step()
                steps += 1
                loss_v = float(loss.detach())
                acc_v = float((logits.argmax(-1) == tokens).float().mean())
        self.set_lr(cfg.lr)
        self.optimizer.state.clear()  # RL starts with fresh moments
        self.version += 1
        return BCStats(steps, done_epochs, loss_v, acc_v, time.perf_counter() - t0)

    # ------------------------------------------------------------------ GRPO

    def update(self, episodes: Episodes) -> UpdateStats:
        """One GRPO update on a batch of complete episodes (grouped by ``episodes.group``)."""
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
        stats = dict(loss=0.0, clip=0.0, kl=0.0, ent=0.0, gn=0.0)
        n_mb = 0
        self.model.train()
        for _ in range(cfg.epochs if len(rows) else 0):
            perm = rows[torch.randperm(len(rows), generator=self._gen).numpy()]
            n_chunks = max(1, math.ceil(len(perm) / cfg.minibatch))
            for real in np.array_split(perm, n_chunks):
                chunk, weight = self._padded(real)
                images, proprio, ids = self._tensors(episodes, chunk)
                logits, aux = self.model.forward_with_aux(images, proprio, ids)
                parts = grpo_loss(
                    logits,
                    torch.from_numpy(episodes.tokens[chunk]),
                    torch.from_numpy(episodes.logp[chunk]),
                    torch.from_numpy(adv.advantage[episodes.episode[chunk]]),
                    temperature=cfg.temperature,
                    clip_low=cfg.clip_low,
                    clip_high=cfg.clip_high,
                    entropy_coef=cfg.entropy_coef,
                    weight=weight,
                )
                loss = parts.loss
                if aux is not None and cfg.rl_aux_coef > 0:
                    state = torch.from_numpy(episodes.state[chunk])
                    if weight is None:
                        aux_loss = F.mse_loss(aux, state)
                    else:
                        per_row = ((aux - state) ** 2).mean(-1)
                        aux_loss = (per_row * weight).sum() / weight.sum().clamp_min(1.0)
                    loss = loss + cfg.rl_aux_coef * aux_loss
                anchor = self._anchor
                if anchor is not None and cfg.rl_bc_coef > 0 and anchor.num_steps:
                    demo_rows = torch.randint(
                        anchor.num_steps, (cfg.rl_bc_batch,), generator=self._gen
                    ).numpy()
                    loss = loss + cfg.rl_bc_coef * self._bc_loss(anchor, demo_rows)[0]
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
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
        )
