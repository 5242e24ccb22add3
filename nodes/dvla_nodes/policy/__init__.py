"""The VLA policy: tokenizer, model (size knob ``tiny`` .. ``large``), discretised action tokens,
batched acting, and the flat parameter layout used by the weight pool."""

from __future__ import annotations

from dvla_nodes.policy.act import ActOutput, PolicyActor, token_log_probs
from dvla_nodes.policy.actions import actions_to_tokens, tokens_to_actions
from dvla_nodes.policy.flat import FlatLayout, ParamEntry, bind, flat_grads, flatten
from dvla_nodes.policy.model import SIZES, PolicyConfig, SizeSpec, VLAPolicy, init_weights
from dvla_nodes.policy.tokenizer import Tokenizer

__all__ = [
    "SIZES",
    "ActOutput",
    "FlatLayout",
    "ParamEntry",
    "PolicyActor",
    "PolicyConfig",
    "SizeSpec",
    "Tokenizer",
    "VLAPolicy",
    "actions_to_tokens",
    "bind",
    "build_policy",
    "flat_grads",
    "flatten",
    "init_weights",
    "token_log_probs",
    "tokens_to_actions",
]


def build_policy(
    size: str = "tiny",
    image_size: int = 64,
    bins: int = 256,
    seed: int = 0,
    stem: str = "conv",
    *,
    tokenizer: Tokenizer | None = None,
    proprio_dim: int = 7,
    action_dim: int = 4,
    aux_dim: int = 10,
) -> tuple[VLAPolicy, Tokenizer]:
    """A freshly initialised policy with its tokenizer. The defaults are the embedded suite's
    (its vocabulary, 7-d proprioception, 4-d actions, 10 auxiliary targets); another suite
    passes its own (:func:`dvla_nodes.learn.suite.build_suite_policy` does, from the suite's
    spec)."""
    tok = tokenizer if tokenizer is not None else Tokenizer()
    cfg = PolicyConfig(
        size=size,
        image_size=image_size,
        proprio_dim=proprio_dim,
        action_dim=action_dim,
        bins=bins,
        vocab_size=tok.vocab_size,
        max_tokens=tok.max_tokens,
        aux_dim=aux_dim,
        stem=stem,
    )
    model = VLAPolicy(cfg)
    init_weights(model, seed)
    return model, tok
