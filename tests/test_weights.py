"""The weight pool: manifests, the slot/pin protocol, and K reader processes hammering the active
slot while the writer swaps versions (they must never see a mix of two versions)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from dvla_bus.errors import ConfigError, DeadlineExceeded, PoolError
from dvla_bus.weights import (
    Manifest,
    WeightPool,
    attach_weights,
    chunk_digester,
    create_weight_pool,
)
from tests.data._procs import Child


@pytest.fixture
def run_id() -> str:
    return "w" + secrets.token_hex(6)


def model(version: int, nbytes: int = 3 << 20) -> dict[str, np.ndarray]:
    """A three-tensor model whose every byte depends on ``version``."""
    base = np.random.default_rng(7).integers(0, 256, nbytes, dtype=np.uint8) ^ np.uint8(version)
    a = base[: nbytes // 2].view(np.float32)
    b = base[nbytes // 2 : nbytes // 2 + 4096].view(np.uint16).reshape(32, 64)
    c = base[nbytes // 2 + 4096 :].copy()
    return {"a": a, "b": b, "c": c}


def model_manifest(nbytes: int = 3 << 20) -> Manifest:
    m = model(0, nbytes)
    return Manifest.from_specs(
        [("a", "float32", m["a"].shape), ("b", "bfloat16", (32, 64)), ("c", "uint8", m["c"].shape)]
    )


@pytest.fixture
def pool(run_id: str) -> Iterator[WeightPool]:
    with create_weight_pool(run_id, "writer", model_manifest(), chunk_bytes=256 << 10) as p:
        yield p


def whole_digest(raw: np.ndarray) -> str:
    return hashlib.blake2b(raw.data, digest_size=16).hexdigest()


# --- manifests -----------------------------------------------------------------------------------


def test_manifest_from_torch_and_numpy_round_trips() -> None:
    arrays = {
        "w": torch.zeros(3, 5, dtype=torch.bfloat16),
        "b": torch.zeros(7, dtype=torch.float32),
        "n": np.zeros((2, 2), dtype=np.int64),
    }
    m = Manifest.from_arrays(arrays)
    assert [(t.name, t.dtype, t.shape) for t in m.tensors] == [
        ("w", "bfloat16", (3, 5)),
        ("b", "float32", (7,)),
        ("n", "int64", (2, 2)),
    ]
    assert all(t.offset % 64 == 0 for t in m.tensors)
    assert m.tensors[0].nbytes == 30
    assert Manifest.decode(m.encode()) == m
    assert Manifest.decode(m.encode()).digest() == m.digest()


def test_manifest_rejects_bad_layouts() -> None:
    with pytest.raises(ConfigError, match="complex64"):
        Manifest.from_specs([("x", "complex64", (2,))])
    with pytest.raises(ConfigError, match="twice"):
        Manifest.from_specs([("x", "uint8", (2,)), ("x", "uint8", (2,))])
    with pytest.raises(PoolError, match="malformed"):
        Manifest.decode(b"\x93junk")


def test_checksums() -> None:
    data = np.arange(1000, dtype=np.uint8)
    for name in ("blake2b", "sha256", "crc32", "none"):
        digest = chunk_digester(name)(data)
        assert len(digest) == 16
    assert chunk_digester("none")(data) == bytes(16)
    with pytest.raises(ConfigError, match="unknown checksum"):
        chunk_digester("md5")


# --- one process -----------------------------------------------------------------------------


def test_publish_and_read_views_without_copy(pool: WeightPool) -> None:
    assert pool.active_version == -1
    digest = pool.publish(1, model(1))
    with attach_weights(pool.name) as reader:
        assert reader.manifest == pool.manifest
        with reader.pin() as pinned:
            assert pinned.version == 1
            assert pinned.digest() == digest
            arrays = pinned.arrays
            np.testing.assert_array_equal(arrays["a"], model(1)["a"])
            assert not arrays["a"].flags.writeable
            tensors = pinned.tensors()
            assert tensors["b"].dtype == torch.bfloat16
            assert tensors["b"].shape == (32, 64)
            # A view, not a copy: the tensor's memory is the pool's.
            assert tensors["a"].data_ptr() == arrays["a"].ctypes.data
            assert reader.verify(pinned.slot)
            # Views are cached: the same objects every time (no allocation in steady state).
            assert pinned.arrays is arrays
        del arrays, tensors


def test_chunks_in_any_order_with_verification(pool: WeightPool, run_id: str) -> None:
    pool.publish(1, model(1))
    with create_weight_pool(run_id, "relay", pool.manifest, chunk_bytes=256 << 10) as dst:
        dst.begin(1)
        order = list(range(pool.n_chunks))[::-1]
        slot = pool.active_slot
        bad = pool.chunk(slot, 0).copy()
        bad[0] ^= 1
        assert not dst.write_chunk(0, bad, pool.chunk_digest(slot, 0))
        assert dst.missing == pool.n_chunks
        for i in order:
            assert dst.write_chunk(i, pool.chunk(slot, i), pool.chunk_digest(slot, i))
        assert dst.write_chunk(3, pool.chunk(slot, 3), pool.chunk_digest(slot, 3))  # duplicate
        assert dst.missing == 0
        assert dst.content_digest(dst.staging_slot) == pool.content_digest(slot)
        dst.commit()
        assert dst.active_version == 1
        with pytest.raises(PoolError, match="not newer"):
            dst.begin(1)


def test_commit_refuses_missing_chunks(pool: WeightPool) -> None:
    pool.begin(1)
    with pytest.raises(PoolError, match="missing"):
        pool.commit()
    pool.abort()
    assert pool.active_version == -1


def test_writer_waits_for_pins_with_a_deadline(pool: WeightPool) -> None:
    pool.publish(1, model(1))
    with attach_weights(pool.name) as reader:
        pinned = reader.pin()
        pool.publish(2, model(2))  # the other slot: no wait
        assert reader.active_version == 2
        assert pinned.version == 1  # still the old bytes, unchanged
        assert whole_digest(pinned.raw()) == whole_digest(_raw(model(1), pool))
        with pytest.raises(DeadlineExceeded, match=f"pinned by reader pid\\(s\\) \\[{os.getpid()}"):
            pool.begin(3, timeout=0.05)
        pinned.release()
        pool.publish(3, model(3), timeout=1.0)
        with reader.pin() as again:
            assert again.version == 3


def test_a_dead_readers_pin_does_not_block_the_writer(pool: WeightPool) -> None:
    pool.publish(1, model(1))
    code = (
        "import sys\n"
        "from dvla_bus.weights import attach_weights\n"
        "r = attach_weights(sys.argv[1]); p = r.pin()\n"
        "print(p.version, flush=True); sys.stdin.readline()\n"
    )
    with Child(code, pool.name) as child:
        assert child.read_line() == "1"
        pool.publish(2, model(2))
        with pytest.raises(DeadlineExceeded, match=str(child.pid)):
            pool.begin(3, timeout=0.05)
        child.proc.send_signal(signal.SIGKILL)
        child.proc.wait(10)
    pool.publish(3, model(3), timeout=2.0)  # the kernel dropped its lock: the pin is stale
    assert pool.active_version == 3


def _raw(arrays: dict[str, np.ndarray], pool: WeightPool) -> np.ndarray:
    out = np.zeros(pool.nbytes, dtype=np.uint8)
    for t in pool.manifest.tensors:
        out[t.offset : t.offset + t.nbytes] = arrays[t.name].reshape(-1).view(np.uint8)
    return out


# --- K reader processes hammering the active slot --------------------------------------------

READER = """
import json, select, sys, hashlib
from dvla_bus.weights import attach_weights
r = attach_weights(sys.argv[1])
print("ready", flush=True)
seen = {}
while not select.select([sys.stdin], [], [], 0)[0]:
    with r.pin(timeout=10) as p:
        seen.setdefault(p.version, set()).add(hashlib.blake2b(p.raw(), digest_size=16).hexdigest())
r.close()
print(json.dumps({v: sorted(d) for v, d in seen.items()}), flush=True)
"""


@pytest.mark.parametrize("readers", [1, 2, 4, 8])
def test_readers_never_see_a_mixed_version(run_id: str, readers: int) -> None:
    size = 1 << 20  # two slots: a 2 MiB pool
    with create_weight_pool(run_id, "w", model_manifest(size), chunk_bytes=64 << 10) as pool:
        _hammer(pool, readers, size)


def _hammer(pool: WeightPool, readers: int, size: int) -> None:
    expected: dict[int, str] = {}
    pool.publish(1, model(1, size))
    expected[1] = whole_digest(pool.raw(pool.active_slot))
    children = [Child(READER, pool.name) for _ in range(readers)]
    try:
        for c in children:
            assert c.read_line(30) == "ready"
        # Swap versions as fast as the readers' pins allow, until each reader has certainly
        # been reading across several swaps.
        version = 1
        while version < 24:
            version += 1
            pool.publish(version, model(version, size), timeout=10)
            expected[version] = whole_digest(pool.raw(pool.active_slot))
        for c in children:
            c.send("stop")
        reports = [json.loads(c.read_line(30)) for c in children]
    finally:
        for c in children:
            c.finish()
    for seen in reports:
        assert seen, "a reader pinned nothing"
        for v, digests in seen.items():
            # One digest per version, and it is the one the writer published: never a mix.
            assert digests == [expected[int(v)]], f"version {v}: {digests}"
    assert len({v for seen in reports for v in seen}) >= 2
