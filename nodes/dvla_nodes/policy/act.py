"""Acting with the policy, without the learner: numpy observations in, numpy actions and the
behaviour log-probabilities of their tokens out. The sampler side of a deployment needs only
this (plus the weights)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dvla_nodes.policy.actions import tokens_to_actions
from dvla_nodes.policy.model import VLAPolicy
from dvla_nodes.policy.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class ActOutput:
    actions: np.ndarray  # float32 (B, A) continuous actions (bin centres)
    tokens: np.ndarray  # int64 (B, A) action tokens
    logp: np.ndarray  # float32 (B, A) log-probability of each token under the sampling policy


def token_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-softmax over bins of the tempered logits: the sampling distribution's log-probs."""
    return torch.log_softmax(logits / temperature, dim=-1)


class PolicyActor:
    """Batched inference for a :class:`VLAPolicy`. ``temperature`` defines the sampling policy
    (the learner must use the same value); ``greedy`` picks each dimension's most likely bin."""

    def __init__(self, model: VLAPolicy, tokenizer: Tokenizer, temperature: float = 1.0) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.temperature = temperature

    @torch.inference_mode()
    def act(
        self,
        images: np.ndarray,
        proprio: np.ndarray,
        instructions: Sequence[str] | np.ndarray,
        *,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> ActOutput:
        """``instructions``: strings, or token ids int64 (B, L) already encoded."""
        if isinstance(instructions, np.ndarray):
            ids = instructions
        else:
            ids = self.tokenizer.encode_batch(list(instructions))
        # Device-agnostic: inputs go where the parameters are (e.g. VRAM weight slots).
        device = next(self.model.parameters()).device
        return self.act_tensors(
            torch.from_numpy(np.ascontiguousarray(images)).to(device),
            torch.from_numpy(np.ascontiguousarray(proprio, dtype=np.float32)).to(device),
            torch.from_numpy(ids).to(device),
            greedy=greedy,
            generator=generator,
        )

    @torch.inference_mode()
    def act_tensors(
        self,
        images: torch.Tensor,
        proprio: torch.Tensor,
        ids: torch.Tensor,
        *,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> ActOutput:
        """:meth:`act` on tensors already on the parameters' device (e.g. a device slab's
        views): the forward pass there, the sampling on the host, so a CPU generator keeps runs
        reproducible."""
        was_training = self.model.training
        self.model.eval()
        logits = self.model(images, proprio, ids)
        self.model.train(was_training)
        logp_all = token_log_probs(logits, self.temperature).float().cpu()  # (B, A, bins)
        if greedy:
            tokens = logp_all.argmax(-1)
        else:
            b, a, k = logp_all.shape
            tokens = torch.multinomial(
                logp_all.exp().reshape(b * a, k), 1, generator=generator
            ).reshape(b, a)
        logp = logp_all.gather(-1, tokens[..., None])[..., 0]
        tok = tokens.numpy()
        return ActOutput(
            actions=tokens_to_actions(tok, logits.shape[-1]),
            tokens=tok.astype(np.int64),
            logp=logp.numpy().astype(np.float32),
        )
