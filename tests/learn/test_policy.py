"""The VLA policy: shapes, log-probabilities, action tokens, tokenizer, flat parameter layout."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dvla_bus.errors import ConfigError
from dvla_nodes.envs import TASKS
from dvla_nodes.policy import (
    FlatLayout,
    PolicyActor,
    PolicyConfig,
    Tokenizer,
    VLAPolicy,
    actions_to_tokens,
    bind,
    build_policy,
    flatten,
    token_log_probs,
    tokens_to_actions,
)
from dvla_nodes.policy.flat import flat_grads


def _obs(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)
    proprio = rng.normal(size=(batch, 7)).astype(np.float32)
    names = list(TASKS)
    instr = [TASKS[names[i % len(names)]].instructions[i % 4] for i in range(batch)]
    return images, proprio, instr


def test_forward_and_act_shapes() -> None:
    model, tok = build_policy(bins=64, seed=0)
    images, proprio, instr = _obs(5)
    logits = model(
        torch.from_numpy(images),
        torch.from_numpy(proprio),
        torch.from_numpy(tok.encode_batch(instr)),
    )
    assert logits.shape == (5, 4, 64)
    out = PolicyActor(model, tok).act(
        images, proprio, instr, generator=torch.Generator().manual_seed(0)
    )
    assert out.actions.shape == (5, 4)
    assert out.actions.dtype == np.float32
    assert out.tokens.shape == (5, 4)
    assert out.tokens.dtype == np.int64
    assert out.logp.shape == (5, 4)
    assert out.logp.dtype == np.float32
    assert np.all(np.abs(out.actions) <= 1.0)
    assert np.all(out.logp <= 0.0)
    np.testing.assert_allclose(out.actions, tokens_to_actions(out.tokens, 64))


def test_token_log_probs_match_distribution_and_sum_over_dimensions() -> None:
    # With 3 bins x 4 dims there are 81 joint actions: the per-token log-probs must sum to the
    # joint log-prob, and the joint probabilities over all actions must sum to one.
    model, tok = build_policy(bins=3, seed=1)
    images, proprio, instr = _obs(2, seed=1)
    ids = torch.from_numpy(tok.encode_batch(instr))
    with torch.no_grad():
        logp_all = token_log_probs(
            model(torch.from_numpy(images), torch.from_numpy(proprio), ids), 0.7
        )
    total = torch.zeros(2, dtype=torch.float64)
    for combo in itertools.product(range(3), repeat=4):
        idx = torch.tensor(combo)
        joint = logp_all[:, torch.arange(4), idx].sum(-1).double()
        total += joint.exp()
    torch.testing.assert_close(total, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-5)
    actor = PolicyActor(model, tok, temperature=0.7)
    out = actor.act(images, proprio, instr, generator=torch.Generator().manual_seed(3))
    expect = logp_all.gather(-1, torch.from_numpy(out.tokens)[..., None])[..., 0].numpy()
    np.testing.assert_allclose(out.logp, expect, rtol=1e-5, atol=1e-6)


def test_greedy_takes_the_most_likely_bin() -> None:
    model, tok = build_policy(bins=16, seed=2)
    images, proprio, instr = _obs(3, seed=2)
    actor = PolicyActor(model, tok)
    out = actor.act(images, proprio, instr, greedy=True)
    with torch.no_grad():
        logits = model(
            torch.from_numpy(images),
            torch.from_numpy(proprio),
            torch.from_numpy(tok.encode_batch(instr)),
        )
    np.testing.assert_array_equal(out.tokens, logits.argmax(-1).numpy())


def test_sampling_is_seeded() -> None:
    model, tok = build_policy(bins=32, seed=0)
    images, proprio, instr = _obs(4)
    actor = PolicyActor(model, tok)
    a = actor.act(images, proprio, instr, generator=torch.Generator().manual_seed(9))
    b = actor.act(images, proprio, instr, generator=torch.Generator().manual_seed(9))
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_action_tokens_round_trip() -> None:
    a = np.array([-1.0, -0.999, -0.5, 0.0, 0.3, 0.999, 1.0, 2.0, -3.0])
    for bins in (2, 7, 256):
        t = actions_to_tokens(a, bins)
        assert t.min() >= 0
        assert t.max() <= bins - 1
        back = tokens_to_actions(t, bins)
        assert np.all(np.abs(back - np.clip(a, -1, 1)) <= 1.0 / bins + 1e-6)
        np.testing.assert_array_equal(actions_to_tokens(back, bins), t)


def test_tokenizer() -> None:
    tok = Tokenizer()
    text = "push the red block to the green square"
    ids = tok.encode(text)
    assert ids.shape == (tok.max_tokens,)
    assert ids.dtype == np.int64
    assert tok.decode(ids) == text
    assert (ids[len(text.split()) :] == 0).all()
    assert tok.decode(tok.encode("push the purple block")) == "push the <unk> block"
    for spec in TASKS.values():
        for t in spec.instructions:
            assert tok.decode(tok.encode(t)) == t


def test_flat_layout_round_trip_and_zero_copy_views() -> None:
    model, tok = build_policy(seed=0)
    images, proprio, instr = _obs(2)
    args = (
        torch.from_numpy(images),
        torch.from_numpy(proprio),
        torch.from_numpy(tok.encode_batch(instr)),
    )
    with torch.no_grad():
        before = model(*args)
    layout, flat = flatten(model)
    assert layout.num_params == model.num_params
    assert layout.total >= layout.num_params
    assert layout.nbytes == 4 * layout.total
    for e in layout.entries:
        assert e.offset % 16 == 0
    with torch.no_grad():
        torch.testing.assert_close(model(*args), before)
    # every parameter is a view into the one buffer
    base = flat.data_ptr()
    for (name, p), e in zip(model.named_parameters(), layout.entries, strict=True):
        assert name == e.name
        assert p.data_ptr() == base + 4 * e.offset
    assert FlatLayout.from_json(layout.to_json()) == layout
    # write into an external (numpy) buffer, bind a second model to it: same outputs, no copy
    other, _ = build_policy(seed=123)
    buf = np.zeros(layout.total, np.float32)
    buf[:] = flat.numpy()
    view = bind(other, layout, buf)
    assert view.data_ptr() == buf.ctypes.data
    with torch.no_grad():
        torch.testing.assert_close(other(*args), before)
        buf[:] = 0.0  # the module reads the buffer in place
        assert float(next(other.parameters()).abs().sum()) == 0.0
    grads = flat_grads(model, layout, torch.zeros(layout.total))
    model(*args).sum().backward()
    assert float(grads.abs().sum()) > 0.0


def test_bind_rejects_a_wrong_buffer() -> None:
    model, _ = build_policy(seed=0)
    layout = FlatLayout.of(model)
    with pytest.raises(ConfigError):
        bind(model, layout, np.zeros(layout.total - 1, np.float32))
    with pytest.raises(ConfigError):
        bind(model, layout, np.zeros(layout.total, np.float64))


def test_size_knob_from_tiny_to_a_billion() -> None:
    tok = Tokenizer()
    counts = {}
    for size in ("tiny", "small", "base", "large"):
        cfg = PolicyConfig(size=size, vocab_size=tok.vocab_size, max_tokens=tok.max_tokens)
        with torch.device("meta"):  # count without allocating
            counts[size] = VLAPolicy(cfg).num_params
    assert 2e5 < counts["tiny"] < 2e6
    assert counts["tiny"] < counts["small"] < counts["base"] < counts["large"]
    assert 0.8e9 < counts["large"] < 1.5e9
    with pytest.raises(ConfigError):
        PolicyConfig(size="huge").spec()
