"""The learner's device: ``TrainConfig.device`` is checked naming the field, minibatch inputs are
gathered into fixed slabs (:class:`~dvla_nodes.learn.learner.MinibatchSlabs`) that train exactly
like fresh tensors and allocate nothing after the first minibatch, and on a CUDA backend the
inputs go through host staging that is page-locked at the boundary (``cudaHostRegister``,
faked here: :class:`~tests.test_vram.FakeCuda`). The real GPU run is ``tools/scripts/gpu_check.py``
(check ``learner``)."""

from __future__ import annotations

import secrets
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dvla_bus.errors import ConfigError, ResourceError
from dvla_bus.vram import CpuBackend, DeviceBackend
from dvla_nodes.learn import Episodes, Learner, TrainConfig, load_checkpoint
from dvla_nodes.learn.rollout import synthetic_episodes
from dvla_nodes.learn.trainer import checkpoint_learner
from dvla_nodes.pipeline import train_config
from dvla_nodes.policy import PolicyActor, build_policy
from tests.test_vram import FakeCuda, _allocations

IMAGE = 32
BINS = 16


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def fake() -> Iterator[FakeCuda]:
    backend = FakeCuda("ld" + secrets.token_hex(5))
    try:
        yield backend
    finally:
        backend.close()


def episodes(seed: int, lengths: list[int], *, group_size: int = 4, image: int = IMAGE) -> Episodes:
    return synthetic_episodes(seed, lengths, group_size=group_size, image=image, bins=BINS)


def config(**kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        seed=5,
        image_size=IMAGE,
        bins=BINS,
        torch_threads=1,
        lr=1e-3,
        minibatch=50,
        minibatch_bucket=16,
        epochs=2,
        rl_bc_batch=24,
        bc_batch=40,
        max_version_lag=100,
    )
    base.update(kw)
    return TrainConfig.from_json(base)


def learner(
    cfg: TrainConfig, *, slabs: bool = True, backend: DeviceBackend | None = None
) -> Learner:
    model, tok = build_policy(image_size=cfg.image_size, bins=cfg.bins, seed=cfg.seed)
    return Learner(model, tok, cfg, slabs=slabs, backend=backend)


def train(lrn: Learner, batches: list[Episodes], demos: Episodes) -> list[float]:
    """Cloning, then GRPO updates with the cloning anchor; the losses along the way."""
    losses = [lrn.behaviour_clone(demos, epochs=2).loss]
    lrn.set_anchor(demos)
    losses += [lrn.update(b).loss for b in batches]  # max_version_lag admits them all
    return losses


# --- configuration -------------------------------------------------------------------------


def test_the_device_is_validated_naming_the_field() -> None:
    for good in ("cpu", "cuda", "cuda:0", "cuda:12", "auto"):
        assert TrainConfig(device=good).device == good
    for bad in ("gpu", "cuda:", "cuda:x", "cpu:0", "CUDA", "", "tests.test_vram:FakeCuda", 0):
        with pytest.raises(ConfigError, match=r"device = .*expected 'cpu', 'cuda', 'cuda:N'"):
            TrainConfig(device=bad)  # type: ignore[arg-type]
    assert TrainConfig().device == "cpu"  # the default changes nothing
    old = TrainConfig().to_json()
    del old["device"]  # a checkpoint's config from before the field
    assert TrainConfig.from_json(old).device == "cpu"
    assert train_config({"device": "cuda:1"}).device == "cuda:1"  # [roles.learner] device
    with pytest.raises(ConfigError, match="device"):
        train_config({"device": "tpu"})
    if not torch.cuda.is_available():
        with pytest.raises(ResourceError, match=r"device = 'cuda': no CUDA device"):
            learner(config(device="cuda"))
        lrn = learner(config(device="auto"))
        assert lrn.device == torch.device("cpu")
        assert next(lrn.model.parameters()).device == torch.device("cpu")


# --- slabs on the CPU ----------------------------------------------------------------------


def test_slab_minibatches_train_exactly_like_fresh_tensors() -> None:
    # Cloning and GRPO (padded minibatches, several per epoch, the cloning anchor's rows in
    # the second slab): same seed, same data, slabs or not: the same parameters.
    cfg = config()
    demos = episodes(1, [30, 25, 41, 19], group_size=2)
    batches = [episodes(2, [13, 40, 22, 31, 9, 35, 27, 18]), episodes(3, [50, 7, 33, 21])]
    plain, slabbed = learner(cfg, slabs=False), learner(cfg)
    start = plain.flat.detach().clone()
    assert torch.equal(start, slabbed.flat)
    want = train(plain, batches, demos)
    got = train(slabbed, batches, demos)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(slabbed.flat, plain.flat, rtol=0, atol=1e-6)
    assert float((plain.flat - start).abs().mean()) > 1e-4  # it really trained
    st = slabbed.statistics()
    # BC: ceil(115 / 40) = 3 minibatches x 2 epochs; GRPO: (ceil(195 / 50) + ceil(111 / 50))
    # minibatches x 2 epochs, each with the anchor's rows in a second slab.
    assert (st.acquires, st.backpressure, st.fallbacks, st.rebuilds) == (6 + 28, 0, 0, 0)
    assert (st.slab_rows, st.staging, st.device) == (64, "direct", "cpu")
    assert plain.statistics().slab_rows == 0
    assert slabbed._slabs is not None
    assert slabbed._slabs.held == 0


def test_slabs_allocate_once_over_updates_of_varying_size() -> None:
    backend = CpuBackend()
    cfg = config(epochs=1)
    lrn = learner(cfg, backend=backend)
    demos = episodes(9, [20, 20], group_size=2)
    lrn.set_anchor(demos)
    rng = np.random.default_rng(4)
    for i in range(10):
        lengths = [int(n) for n in rng.integers(3, 40, 4 * int(rng.integers(1, 4)))]
        batch = episodes(100 + i, lengths)
        lrn.update(batch)
        assert backend.allocations == 1  # the slab pool's one buffer, built on first use
    st = lrn.statistics()
    assert (st.allocations, st.backpressure, st.fallbacks, st.rebuilds) == (1, 0, 0, 0)
    assert st.slab_bytes > 64 * IMAGE * IMAGE * 3
    slabs = lrn._slabs
    assert slabs is not None
    # The tensors handed to the model are views into the slab: gathering a minibatch allocates
    # nothing in torch's allocator, and on the host only the row indices (the images alone
    # would be rows x 3 KiB if numpy gathered them into a new array).
    batch = episodes(7, [30, 30, 30])
    ids = lrn.tokenizer.encode_batch(batch.instructions)
    adv = np.linspace(-1, 1, batch.num_episodes).astype(np.float32)
    rows = np.arange(5, 69)

    def gather() -> None:
        slab, t = lrn._inputs(batch, rows, ids, advantage=adv, real=50)
        assert slab is not None
        raw = slab.raw()
        lo, hi = raw.data_ptr(), raw.data_ptr() + raw.numel()
        for name, tensor in t.items():
            assert lo <= tensor.data_ptr() < hi, name
            assert tensor.shape[0] == 64, name
        slab.release()

    plain = learner(cfg, slabs=False)  # the ordinary path, for contrast

    def gather_plain() -> None:
        slab, _ = plain._inputs(batch, rows, ids, advantage=adv, real=50)
        assert slab is None

    gather()
    assert _allocations(gather) == 0
    assert _allocations(gather_plain) > 0
    tracemalloc.start()
    try:
        gather()
        _, slab_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        gather_plain()
        _, plain_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert slab_peak < 16 * 1024 < 64 * IMAGE * IMAGE * 3 <= plain_peak
    # The gathered rows are the episodes' rows, the weights mark the padding.
    slab, t = lrn._inputs(batch, rows, ids, advantage=adv, real=50)
    assert slab is not None
    assert torch.equal(t["images"], torch.from_numpy(batch.images[rows]))
    assert torch.equal(t["ids"], torch.from_numpy(ids[batch.episode[rows]]))
    assert torch.equal(t["advantage"], torch.from_numpy(adv[batch.episode[rows]]))
    assert t["weight"].tolist() == [1.0] * 50 + [0.0] * 14
    slab.release()
    lrn.close()
    assert lrn.statistics().slab_rows == 0


def test_a_shape_change_rebuilds_the_slabs_but_never_under_a_held_slab() -> None:
    backend = CpuBackend()
    lrn = learner(config(), backend=backend)
    a, b = episodes(1, [10, 10]), episodes(2, [10, 10], image=16)
    ids = lrn.tokenizer.encode_batch(a.instructions)
    rows = np.arange(8)
    held, _ = lrn._inputs(a, rows, ids)
    assert held is not None
    # Another image size while a slab is held: that minibatch the ordinary way.
    other, t = lrn._inputs(b, rows, ids)
    assert other is None
    assert t["images"].shape == (8, 16, 16, 3)
    assert lrn.statistics().fallbacks == 1
    # Both slabs held (the pool's backpressure): the ordinary way too.
    second, _ = lrn._inputs(a, rows, ids)
    assert second is not None
    third, _ = lrn._inputs(a, rows, ids)
    assert third is None
    held.release()
    second.release()
    # Nothing held: rebuilt for the new shape (one more device buffer).
    again, t = lrn._inputs(b, rows, ids)
    assert again is not None
    again.release()
    st = lrn.statistics()
    assert (st.rebuilds, st.allocations, st.fallbacks, st.backpressure) == (1, 2, 2, 1)
    assert st.acquires == 3
    lrn.close()


def test_host_flat_is_a_view_on_the_cpu() -> None:
    lrn = learner(config())
    host = lrn.host_flat()
    assert host.ctypes.data == lrn.flat.data_ptr()  # no copy
    assert host.shape == (lrn.layout.total,)


# --- CUDA faked at the boundary ------------------------------------------------------------


@pytest.mark.parametrize("refuse", ["", "all"], ids=["pinned", "driver-refuses"])
def test_on_a_cuda_backend_inputs_go_through_pinned_host_staging(
    fake: FakeCuda, refuse: str
) -> None:
    fake.refuse = refuse
    cfg = config(epochs=1)
    demos = episodes(1, [30, 25], group_size=2)
    batches = [episodes(2, [13, 40, 22, 31]), episodes(3, [5, 7, 33, 21])]
    plain = learner(cfg, slabs=False)
    staged = learner(cfg, backend=fake)
    want = train(plain, batches, demos)
    got = train(staged, batches, demos)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(staged.flat, plain.flat, rtol=0, atol=1e-6)
    slabs = staged._slabs
    assert slabs is not None
    assert slabs.staged
    registers = [c for c in fake.calls if c[0] == "register"]
    assert len(registers) == 1  # the staging area of every slab, once
    _, address, nbytes, read_only = registers[0]
    assert not read_only
    assert address % 4096 == 0
    assert nbytes >= 2 * slabs.layout.nbytes
    st = staged.statistics()
    assert (st.allocations, st.fallbacks, st.backpressure) == (1, 0, 0)
    if refuse:
        assert st.staging.startswith("pageable (fake cudaHostRegister refused")
        assert fake.registered == {}
    else:
        assert st.staging == "pinned"
        assert fake.registered == {address: (nbytes, False)}
        # The device slab holds the staged rows (one host-to-device copy per field).
        batch = batches[0]
        ids = staged.tokenizer.encode_batch(batch.instructions)
        rows = np.arange(3, 40)
        slab, t = staged._inputs(batch, rows, ids)
        assert slab is not None
        raw = slab.raw()
        assert raw.data_ptr() <= t["proprio"].data_ptr() < raw.data_ptr() + raw.numel()
        assert torch.equal(t["proprio"], torch.from_numpy(batch.proprio[rows]))
        slab.release()
    staged.close()
    assert fake.registered == {}
    assert [c[:2] for c in fake.calls if c[0] == "unregister"] == (
        [] if refuse else [("unregister", address)]
    )
    staged.close()  # idempotent


def test_checkpoints_and_acting_work_with_the_learners_model(
    fake: FakeCuda, tmp_path: Path
) -> None:
    cfg = config(epochs=1)
    lrn = learner(cfg, backend=fake)
    lrn.update(episodes(4, [10, 12, 14, 9]))
    path = checkpoint_learner(tmp_path, lrn, "t", 1, {})
    ck = load_checkpoint(path)
    np.testing.assert_array_equal(ck.flat, lrn.host_flat()[: lrn.layout.total])
    assert "exp_avg" in ck.optimizer
    actor = PolicyActor(lrn.model, lrn.tokenizer, cfg.temperature)
    batch = episodes(5, [3])
    out = actor.act(batch.images, batch.proprio, list(batch.instructions) * 3)
    assert out.tokens.shape == (3, 4)
    lrn.close()
