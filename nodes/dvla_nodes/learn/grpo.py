"""GRPO: group-relative advantages and the PPO-style clipped objective on action-token
log-probabilities, with no value network.

A *group* is G episodes of one task instance (task + seed) sampled with one policy version. Each
episode's reward is normalised within its group; groups whose rewards are all equal carry no
signal and are skipped (and counted). Every step of an episode shares its advantage; the loss is
the mean over action tokens of ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` with
``r = exp(logp_new - logp_behaviour)`` per token (asymmetric clip as in DAPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class Advantages:
    advantage: np.ndarray  # float32 (E,)
    keep: np.ndarray  # bool (E,) episodes in groups with signal
    groups: int
    skipped_groups: int


def group_advantages(
    rewards: np.ndarray,
    groups: np.ndarray,
    *,
    equal_tol: float = 1e-6,
    std_norm: bool = True,
    eps: float = 1e-6,
) -> Advantages:
    """Per-episode advantages ``(r - mean_g) / (std_g + eps)`` (or without the division when
    ``std_norm`` is false); groups whose rewards span less than ``equal_tol`` get advantage 0 and
    ``keep`` false."""
    rewards = np.asarray(rewards, np.float64)
    groups = np.asarray(groups)
    adv = np.zeros(len(rewards), np.float64)
    keep = np.zeros(len(rewards), bool)
    ids = np.unique(groups)
    skipped = 0
    for g in ids:
        sel = groups == g
        r = rewards[sel]
        if r.max() - r.min() < equal_tol:
            skipped += 1
            continue
        a = r - r.mean()
        if std_norm:
            a = a / (r.std() + eps)
        adv[sel] = a
        keep[sel] = True
    return Advantages(adv.astype(np.float32), keep, len(ids), skipped)


@dataclass(frozen=True, slots=True)
class LossParts:
    loss: torch.Tensor
    policy_loss: float
    clip_fraction: float
    approx_kl: float
    entropy: float


def token_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-token ``values`` (T, A) over the rows whose ``weight`` (T,) is 1 (all rows
    when ``weight`` is None): how every GRPO loss term and statistic skips padding rows."""
    if weight is None:
        return values.mean()
    w = weight.to(values.dtype)[:, None]
    return (values * w).sum() / (w.sum() * values.shape[1]).clamp_min(1.0)


def clipped_objective(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantage: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token surrogate loss (T, A) and the clipped mask, for token log-probs (T, A) and
    per-step advantages (T,)."""
    ratio = torch.exp(logp_new - logp_old)
    adv = advantage[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    was_clipped = (unclipped != torch.minimum(unclipped, clipped)) & (clipped != unclipped)
    return loss, was_clipped


def grpo_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    logp_old: torch.Tensor,
    advantage: torch.Tensor,
    *,
    temperature: float,
    clip_low: float,
    clip_high: float,
    entropy_coef: float = 0.0,
    weight: torch.Tensor | None = None,
) -> LossParts:
    """The GRPO loss for logits (T, A, bins), taken tokens (T, A), behaviour log-probs (T, A)
    and per-step advantages (T,): token-mean clipped surrogate minus an entropy bonus.

    ``weight`` (T,), 0 or 1, marks the rows that count: a minibatch padded to a fixed shape
    (so the allocator sees the same sizes every update) passes 0 for its padding rows, which
    then contribute nothing to the loss, its gradient or the statistics."""
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    logp_new = logp_all.gather(-1, tokens[..., None])[..., 0]
    per_token, was_clipped = clipped_objective(
        logp_new, logp_old, advantage, clip_low=clip_low, clip_high=clip_high
    )
    ent_rows = -(logp_all.exp() * logp_all).sum(-1)  # (T, A)
    with torch.no_grad():
        log_ratio = logp_new - logp_old
        kl_rows = (log_ratio.exp() - 1.0) - log_ratio
    policy_loss = token_mean(per_token, weight)
    entropy = token_mean(ent_rows, weight)
    approx_kl = token_mean(kl_rows, weight)
    clip_fraction = token_mean(was_clipped.float(), weight)
    loss = policy_loss - entropy_coef * entropy
    return LossParts(
        loss=loss,
        policy_loss=float(policy_loss.detach()),
        clip_fraction=float(clip_fraction),
        approx_kl=float(approx_kl),
        entropy=float(entropy.detach()),
    )


def reference_kl(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    temperature: float,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over action tokens of the exact ``KL(pi || pi_ref)`` between the policy's bin
    distributions (logits (T, A, bins), at ``temperature``) and a reference's (the same shape,
    no gradient needed); ``weight`` (T,) as in :func:`grpo_loss`."""
    logp = torch.log_softmax(logits / temperature, dim=-1)
    logq = torch.log_softmax(ref_logits / temperature, dim=-1)
    return token_mean((logp.exp() * (logp - logq)).sum(-1), weight)
