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
    size: str = "tiny", image_size: int = 64, bins: int = 256, seed: int = 0, stem: str = "conv"
) -> tuple[VLAPolicy, Tokenizer]:
    """A freshly initialised policy for the embedded suite, with its tokenizer."""
    tok = Tokenizer()
    cfg = PolicyConfig(
        size=size,
        image_size=image_size,
        bins=bins,
        vocab_size=tok.vocab_size,
        max_tokens=tok.max_tokens,
        stem=stem,
    )
    model = VLAPolicy(cfg)
    init_weights(model, seed)
    return model, tok
