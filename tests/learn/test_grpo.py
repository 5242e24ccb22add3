"""GRPO: advantages on hand-made groups, the clipped objective, staleness, and a short update
that must raise the log-probability of the better episodes' actions."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from dvla_bus.errors import ConfigError
from dvla_nodes.envs import VectorEnv
from dvla_nodes.learn import (
    Assignment,
    Episodes,
    Learner,
    TrainConfig,
    clipped_objective,
    episode_rewards,
    group_advantages,
    grpo_loss,
    reference_kl,
    run_episodes,
)
from dvla_nodes.policy import PolicyActor, build_policy


def test_group_advantages_hand_made() -> None:
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 1.0])
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    adv = group_advantages(rewards, groups)
    np.testing.assert_allclose(adv.advantage[:4], [1, -1, -1, 1], atol=1e-5)
    np.testing.assert_allclose(adv.advantage[4:8], 0.0)
    np.testing.assert_allclose(adv.advantage[8:], [1, -1], atol=1e-5)
    assert adv.keep.tolist() == [True] * 4 + [False] * 4 + [True] * 2
    assert (adv.groups, adv.skipped_groups) == (3, 1)
    raw = group_advantages(rewards, groups, std_norm=False)
    np.testing.assert_allclose(raw.advantage[:4], [0.5, -0.5, -0.5, 0.5])
    np.testing.assert_allclose(raw.advantage[8:], [1.0, -1.0])
    # within tolerance counts as equal
    near = group_advantages(np.array([1.0, 1.0005]), np.array([7, 7]), equal_tol=1e-3)
    assert near.skipped_groups == 1
    assert not near.keep.any()


def test_advantages_are_zero_mean_unit_std_per_group() -> None:
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=40)
    groups = np.repeat(np.arange(5), 8)
    adv = group_advantages(rewards, groups, eps=0.0)
    for g in range(5):
        a = adv.advantage[groups == g]
        assert abs(a.mean()) < 1e-5
        assert abs(a.std() - 1.0) < 1e-4


def _grad(logp_old: float, logp_new: float, adv: float) -> float:
    new = torch.tensor([[logp_new]], requires_grad=True)
    loss, _ = clipped_objective(
        new, torch.tensor([[logp_old]]), torch.tensor([adv]), clip_low=0.2, clip_high=0.28
    )
    loss.sum().backward()  # type: ignore[no-untyped-call]
    assert new.grad is not None
    return float(new.grad)


def test_clipping_stops_the_gradient_only_on_the_trusted_side() -> None:
    up, down = np.log(1.5), np.log(0.5)
    # positive advantage: ratio above 1 + eps_high is clipped (no push further), below is not
    assert _grad(0.0, up, +1.0) == 0.0
    assert _grad(0.0, down, +1.0) < 0.0
    # negative advantage: ratio below 1 - eps_low is clipped, above is not (pessimism)
    assert _grad(0.0, down, -1.0) == 0.0
    assert _grad(0.0, up, -1.0) > 0.0
    # inside the trust region: gradient of -ratio * A = -A at ratio 1
    assert _grad(-1.0, -1.0, 2.0) == pytest.approx(-2.0)
    # asymmetric: 1.25 is inside [0.8, 1.28]
    assert _grad(0.0, np.log(1.25), 1.0) != 0.0


def test_grpo_loss_equals_manual_computation() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 4, 8, requires_grad=True)
    tokens = torch.randint(0, 8, (6, 4))
    old = torch.log_softmax(torch.randn(6, 4, 8), -1).gather(-1, tokens[..., None])[..., 0]
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0, -0.5])
    parts = grpo_loss(logits, tokens, old, adv, temperature=1.0, clip_low=0.2, clip_high=0.2)
    new = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    ratio = (new - old).exp()
    manual = -torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None]).mean()
    torch.testing.assert_close(parts.loss, manual)
    assert 0.0 <= parts.clip_fraction <= 1.0
    assert parts.entropy > 0.0


def test_zero_weight_rows_change_nothing() -> None:
    # A minibatch padded with zero-weight rows gives the loss, gradient and statistics of the
    # real rows alone.
    torch.manual_seed(1)
    logits = torch.randn(8, 4, 8)
    tokens = torch.randint(0, 8, (8, 4))
    old = torch.log_softmax(torch.randn(8, 4, 8), -1).gather(-1, tokens[..., None])[..., 0]
    adv = torch.randn(8)
    real = logits[:5].clone().requires_grad_(True)
    padded = logits.clone().requires_grad_(True)
    weight = torch.tensor([1.0] * 5 + [0.0] * 3)
    kw = dict(temperature=1.0, clip_low=0.2, clip_high=0.28, entropy_coef=0.01)
    a = grpo_loss(real, tokens[:5], old[:5], adv[:5], **kw, weight=None)
    b = grpo_loss(padded, tokens, old, adv, **kw, weight=weight)
    a.loss.backward()  # type: ignore[no-untyped-call]
    b.loss.backward()  # type: ignore[no-untyped-call]
    torch.testing.assert_close(a.loss, b.loss)
    assert padded.grad is not None
    assert real.grad is not None
    torch.testing.assert_close(padded.grad[:5], real.grad)
    assert float(padded.grad[5:].abs().max()) == 0.0
    for name in ("policy_loss", "clip_fraction", "approx_kl", "entropy"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-5, abs=1e-7)


def test_padded_minibatches_train_exactly_like_unpadded_ones() -> None:
    # minibatch_bucket pads each minibatch to a fixed shape (allocator stability); the update
    # must be the one without padding.
    base = dict(seed=3, bins=32, image_size=32, group_size=4, lr=1e-3, minibatch=50)
    torch.set_num_threads(1)
    results = []
    for bucket in (0, 64):
        cfg = TrainConfig(**base, minibatch_bucket=bucket, torch_threads=1)  # type: ignore[arg-type]
        learner, _, eps = _batch(cfg)
        assert eps.num_steps % 64  # some minibatch really is padded
        start = learner.flat.detach().clone()
        stats = learner.update(eps)
        results.append((learner.flat.detach().clone(), stats))
    (flat0, s0), (flat1, s1) = results
    # Adam's first step is about lr * sign(gradient): parameters whose gradient is ~0 may
    # differ by float rounding; everything else moves by ~lr (1e-3) and must agree.
    torch.testing.assert_close(flat0, flat1, rtol=0, atol=1e-4)
    moved = (flat0 - start).abs().mean()
    assert float((flat0 - flat1).abs().mean()) < 1e-3 * float(moved)
    assert s0.loss == pytest.approx(s1.loss, rel=1e-4, abs=1e-6)
    assert s0.steps == s1.steps


def _small(**kw: object) -> TrainConfig:
    """The GRPO tests' toy configuration (32-px images, 32 bins, groups of 4, one minibatch)."""
    base: dict[str, object] = dict(
        seed=3, bins=32, image_size=32, group_size=4, lr=1e-3, minibatch=4096, torch_threads=1
    )
    return TrainConfig.from_json({**base, **kw})


def _batch(cfg: TrainConfig) -> tuple[Learner, PolicyActor, Episodes]:
    model, tok = build_policy(image_size=cfg.image_size, bins=cfg.bins, seed=cfg.seed)
    learner = Learner(model, tok, cfg)
    actor = PolicyActor(model, tok, cfg.temperature)
    gen = torch.Generator().manual_seed(0)
    assignments = [
        Assignment("reach-red", 40 + g, g) for g in range(3) for _ in range(cfg.group_size)
    ]
    with VectorEnv(len(assignments), image_size=cfg.image_size) as env:
        eps = run_episodes(
            [env],
            assignments,
            lambda im, pr, ins: actor.act(im, pr, ins, generator=gen),
            version=learner.version,
            bins=cfg.bins,
        )
    return learner, actor, eps


def _mean_logp(learner: Learner, eps: Episodes, rows: np.ndarray) -> float:
    with torch.no_grad():
        images, proprio, ids = learner._tensors(eps, rows)
        logits = learner.model(images, proprio, ids)
        lp = torch.log_softmax(logits / learner.cfg.temperature, -1)
        return float(lp.gather(-1, torch.from_numpy(eps.tokens[rows])[..., None]).mean())


def test_update_raises_log_prob_of_better_episodes_and_lowers_worse() -> None:
    cfg = _small(epochs=4, shaping_coef=10.0)
    torch.set_num_threads(1)
    learner, _, eps = _batch(cfg)
    adv = group_advantages(episode_rewards(eps, cfg), eps.group).advantage
    step_adv = adv[eps.episode]
    good, bad = np.flatnonzero(step_adv > 0.5), np.flatnonzero(step_adv < -0.5)
    assert len(good)
    assert len(bad)
    before = (_mean_logp(learner, eps, good), _mean_logp(learner, eps, bad))
    stats = learner.update(eps)
    after = (_mean_logp(learner, eps, good), _mean_logp(learner, eps, bad))
    assert stats.version == 1
    assert stats.steps == eps.num_steps
    assert stats.skipped_groups == 0
    assert after[0] > before[0] + 0.05
    assert after[1] < before[1] - 0.05


def test_stale_episodes_are_rejected_and_counted() -> None:
    cfg = TrainConfig(
        seed=0, bins=16, image_size=32, group_size=2, max_version_lag=1, torch_threads=1
    )
    torch.set_num_threads(1)
    learner, _, eps = _batch(cfg)
    learner.version = 5  # the batch was sampled with version 0
    stats = learner.update(eps)
    assert stats.stale_episodes == eps.num_episodes
    assert stats.steps == 0
    assert stats.version == 5  # nothing trained, no new version


def test_behaviour_cloning_fits_the_demonstrations() -> None:
    cfg = TrainConfig(
        seed=1, bins=16, image_size=32, bc_batch=64, bc_lr=2e-3, bc_label_sigma=0.5, torch_threads=1
    )
    torch.set_num_threads(1)
    model, tok = build_policy(image_size=32, bins=16, seed=1)
    learner = Learner(model, tok, cfg)
    with VectorEnv(4, image_size=32) as env:
        demos = run_episodes(
            [env], [Assignment("reach-red", 7 + i) for i in range(4)], None, bins=16
        )
    assert demos.success.all()
    rows = np.arange(demos.num_steps)
    before = _mean_logp(learner, demos, rows)
    stats = learner.behaviour_clone(demos, epochs=15)
    assert stats.epochs == 15
    assert learner.version == 1
    assert _mean_logp(learner, demos, rows) > before + 0.5


def test_cloning_anchor_pulls_towards_the_demonstrations() -> None:
    # Same GRPO batch, same seed: with the anchor the demonstrations' actions end up more likely.
    cfg = TrainConfig(
        seed=3,
        bins=32,
        image_size=32,
        group_size=4,
        lr=1e-3,
        epochs=2,
        minibatch=4096,
        torch_threads=1,
        rl_bc_batch=64,
        bc_label_sigma=0.5,
    )
    torch.set_num_threads(1)
    learner, _, eps = _batch(cfg)
    with VectorEnv(4, image_size=32) as env:
        demos = run_episodes(
            [env], [Assignment("reach-red", 90 + i) for i in range(4)], None, bins=32
        )
    rows = np.arange(demos.num_steps)
    start = learner.flat.clone()
    learner.update(eps)
    plain = _mean_logp(learner, demos, rows)
    learner.flat.copy_(start)
    learner.optimizer.state.clear()
    learner.cfg = cfg.replace(rl_bc_coef=1.0)
    learner.set_anchor(demos)
    learner.update(eps)
    assert _mean_logp(learner, demos, rows) > plain + 0.1


def test_noisy_demonstrations_do_not_depend_on_the_environment_layout() -> None:
    # The serial trainer collects its demonstrations over two env workers, a learner role over
    # one: with DART noise drawn per episode both get the same data from the same seed.
    jobs = [Assignment(t, 30 + i) for t in ("reach-red", "push-red-green") for i in range(3)]

    def collect(sizes: list[int], noise: float = 0.3) -> Episodes:
        with contextlib.ExitStack() as stack:
            shards = [stack.enter_context(VectorEnv(n, image_size=32)) for n in sizes]
            return run_episodes(
                shards, jobs, None, bins=32, expert_noise=noise, rng=np.random.default_rng(5)
            )

    one, two = collect([6]), collect([2, 1])
    np.testing.assert_array_equal(one.length, two.length)
    np.testing.assert_array_equal(one.tokens, two.tokens)
    np.testing.assert_array_equal(one.images, two.images)
    np.testing.assert_array_equal(one.shaping, two.shaping)
    # the noise is there: without it the same episodes run otherwise
    plain = collect([6], noise=0.0)
    assert not np.array_equal(plain.images, one.images)


def test_pg_coef_zero_leaves_an_update_blind_to_rewards() -> None:
    # The ablation knob: without the policy-gradient term the update (anchor and auxiliary loss
    # still on) is the same whatever the rewards; with it, inverted rewards move it elsewhere.
    cfg = _small()
    torch.set_num_threads(1)
    learner, _, eps = _batch(cfg)
    with VectorEnv(4, image_size=32) as env:
        demos = run_episodes(
            [env], [Assignment("reach-red", 90 + i) for i in range(4)], None, bins=32
        )
    learner.set_anchor(demos)
    flipped = dataclasses.replace(eps, success=~eps.success, shaping=-eps.shaping)
    start, gen = learner.flat.clone(), learner._gen.get_state()

    def after(batch: Episodes, pg_coef: float) -> torch.Tensor:
        learner.flat.copy_(start)
        learner.optimizer.state.clear()
        learner._gen.set_state(gen)
        learner.version = 0
        learner.cfg = cfg.replace(pg_coef=pg_coef)
        learner.update(batch)
        return learner.flat.clone()

    assert torch.equal(after(eps, 0.0), after(flipped, 0.0))
    assert not torch.equal(after(eps, 0.0), start)  # the anchor still trains
    assert not torch.allclose(after(eps, 1.0), after(flipped, 1.0))
    with pytest.raises(ConfigError, match="pg_coef"):
        TrainConfig(pg_coef=-1.0)


def test_reference_kl_is_the_exact_divergence_over_bins() -> None:
    torch.manual_seed(2)
    logits, ref = torch.randn(6, 3, 10), torch.randn(6, 3, 10)
    assert float(reference_kl(ref, ref, temperature=1.3)) == pytest.approx(0.0, abs=1e-6)
    p = torch.softmax(logits / 0.7, -1)
    q = torch.softmax(ref / 0.7, -1)
    manual = (p * (p.log() - q.log())).sum(-1)  # (6, 3)
    torch.testing.assert_close(reference_kl(logits, ref, temperature=0.7), manual.mean())
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(
        reference_kl(logits, ref, temperature=0.7, weight=weight), manual[[0, 1, 3]].mean()
    )
    assert float(reference_kl(logits, ref, temperature=0.7)) > 0


def test_kl_to_the_reference_pulls_a_drifted_policy_back() -> None:
    # Only the KL term trains (no policy gradient, no auxiliary loss): a policy pushed away
    # from its frozen reference moves back towards it, update after update.
    cfg = _small(pg_coef=0.0, rl_aux_coef=0.0, rl_kl_coef=1.0, max_version_lag=100)
    torch.set_num_threads(1)
    learner, _, eps = _batch(cfg)
    learner.set_reference()
    assert learner.has_reference
    with torch.no_grad():
        learner.flat.add_(0.05 * torch.randn(learner.flat.shape, generator=torch.Generator()))
    kls = [learner.update(eps).kl_ref for _ in range(6)]
    assert kls[0] > 0.01
    assert kls[-1] < 0.5 * kls[0], kls
    # Without the coefficient no reference is kept, and the term is absent.
    plain = Learner(*build_policy(image_size=32, bins=32, seed=3), cfg.replace(rl_kl_coef=0.0))
    plain.set_reference()
    assert not plain.has_reference
    assert plain.update(eps).kl_ref == 0.0
    with pytest.raises(ConfigError, match="rl_kl_coef"):
        TrainConfig(rl_kl_coef=-0.1)


def test_grpo_lr_warms_up_then_anneals_as_the_budget_is_spent() -> None:
    flat = TrainConfig(lr=1e-3, lr_warmup=4, minutes=10.0, iterations=1000)
    assert flat.grpo_lr(1, 0.0) == pytest.approx(2.5e-4)  # warm-up: 1/4
    assert flat.grpo_lr(4, 0.0) == pytest.approx(1e-3)
    assert flat.grpo_lr(900, 590.0) == pytest.approx(1e-3)  # lr_anneal 0: constant
    cfg = flat.replace(lr_anneal=0.9)
    assert cfg.grpo_lr(4, 0.0) == pytest.approx(1e-3 * (1 - 0.9 * 0.004))  # 4 of 1000 updates
    assert cfg.grpo_lr(10, 300.0) == pytest.approx(1e-3 * (1 - 0.9 * 0.5))  # half the minutes
    assert cfg.grpo_lr(750, 60.0) == pytest.approx(1e-3 * (1 - 0.9 * 0.75))  # or the updates
    assert cfg.grpo_lr(10, 6000.0) == pytest.approx(1e-4)  # past the budget: lr x (1 - 0.9)
    assert flat.replace(lr_anneal=1.0).grpo_lr(1000, 0.0) == 0.0
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="lr_anneal"):
            TrainConfig(lr_anneal=bad)
