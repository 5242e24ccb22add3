"""The ``inference`` role in vram mode: settings, observation batches in fixed device slabs
(allocation counts constant over many batches), what a node advertises on the control bus, and
replicas that map an owner's VRAM slots (``vram_from``) across the owner's death and restart.

No GPU here: the replica path runs in real node processes with the CUDA calls faked at the
boundary (:class:`NodeFakeCuda`, named by the documented ``vram_backend`` setting); the real
CUDA run of the same path is ``tools/scripts/gpu_check.py`` (check ``replica``)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dvla_bus.errors import ConfigError, ResourceError
from dvla_bus.node import NodeConfig
from dvla_bus.reaper import reap
from dvla_bus.sockets import open_context
from dvla_bus.vram import CpuBackend, backend_from_spec
from dvla_bus.weights import Manifest, create_weight_pool
from dvla_nodes.inference import (
    ActRequest,
    InferenceError,
    InferenceNode,
    InferenceSettings,
    RemoteAct,
    RemotePolicy,
    SlabBatcher,
    open_remote_policy,
)
from dvla_nodes.policy import build_policy
from dvla_nodes.policy.act import PolicyActor
from tests.helpers import members_by_node, spawn, stop, wait_status, write_topology
from tests.test_inference import IMAGE, Reference, _flat_version, _obs
from tests.test_vram import FAKE_GPU_RUN, FakeCuda, NodeFakeCuda, _allocations

FAKE_BACKEND = "tests.test_vram:NodeFakeCuda"


# --- settings ------------------------------------------------------------------------------


def test_vram_settings_are_checked_naming_the_key() -> None:
    ok = InferenceSettings.from_settings(
        {"weights": "vram", "vram_from": "inference.{host}.0", "vram_backend": "cuda:1"}
    )
    assert ok.owner("h7") == "inference.h7.0"
    assert InferenceSettings.from_settings({}).owner("h") == ""
    bad: list[tuple[dict[str, Any], str]] = [
        ({"weights": "vram", "vram_from": "inference"}, "roles.inference.vram_from: .* not a node"),
        ({"weights": "vram", "vram_from": "a.b.c"}, "roles.inference.vram_from"),
        ({"weights": "vram", "vram_from": "inference.{hst}.0"}, "roles.inference.vram_from"),
        ({"weights": "vram", "vram_from": 3}, "roles.inference.vram_from"),
        ({"vram_from": "inference.h.0"}, 'roles.inference.vram_from .*needs weights = "vram"'),
        ({"weights": "vram", "vram_backend": "gpu"}, "roles.inference.vram_backend"),
        ({"weights": "vram", "vram_backend": "cpu:1"}, "roles.inference.vram_backend"),
        ({"weights": "vram", "vram_backend": 1}, "roles.inference.vram_backend"),
    ]
    for settings, match in bad:
        with pytest.raises(ConfigError, match=match):
            InferenceNode.check_settings(settings)


def test_backend_specs_name_a_backend() -> None:
    assert backend_from_spec("auto").kind == "cpu"  # no CUDA here
    assert isinstance(backend_from_spec("cpu"), CpuBackend)
    with pytest.raises(ResourceError, match="no CUDA device"):
        backend_from_spec("cuda:0")
    fake = backend_from_spec(FAKE_BACKEND)
    assert isinstance(fake, NodeFakeCuda)
    assert (fake.kind, fake.device_id()) == ("cuda", f"fake-gpu-{FAKE_GPU_RUN}")
    with pytest.raises(ConfigError, match="cannot import"):
        backend_from_spec("tests.no_such_module:Backend")
    with pytest.raises(ConfigError, match="not a DeviceBackend"):
        backend_from_spec("collections:OrderedDict")


# --- slabs in one process ------------------------------------------------------------------


def _requests(seed: int, sizes: list[int]) -> list[ActRequest]:
    out = []
    for k, n in enumerate(sizes):
        images, proprio, ins = _obs(seed + k, n)
        images.flags.writeable = False  # as a delivery's view of a sampler's slab
        out.append(ActRequest(k, images, proprio, tuple(ins)))
    return out


@pytest.mark.parametrize("staged", [False, True], ids=["cpu", "fake-cuda-staging"])
def test_slab_batches_allocate_nothing_and_act_like_the_policy(staged: bool) -> None:
    model, tok = build_policy("tiny", IMAGE, 256, 0, stem="patch")
    actor = PolicyActor(model, tok)
    backend: CpuBackend = NodeFakeCuda() if staged else CpuBackend()
    try:
        batcher = SlabBatcher(backend, 8, IMAGE, 7, tok.max_tokens)
        assert backend.allocations == 1
        rng = np.random.default_rng(1)
        batches = [
            _requests(i, [int(n) for n in rng.integers(1, 4, rng.integers(1, 3))])
            for i in range(120)
        ]

        def run_all() -> None:
            for reqs in batches:
                filled = batcher.fill(reqs, tok)
                assert filled is not None
                slab, _ = filled
                slab.release()

        run_all()  # warm the per-slab view caches
        assert _allocations(run_all) == 0
        assert backend.allocations == 1
        # The slab holds exactly the requests' rows, and the forward pass on it is the
        # policy's own (same inputs, same sampling).
        reqs = _requests(500, [3, 2, 1])
        filled = batcher.fill(reqs, tok)
        assert filled is not None
        slab, tensors = filled
        images = np.concatenate([r.images for r in reqs])
        proprio = np.concatenate([r.proprio for r in reqs])
        ins = [s for r in reqs for s in r.instructions]
        assert torch.equal(tensors["images"], torch.from_numpy(images))
        assert torch.equal(tensors["proprio"], torch.from_numpy(proprio))
        assert torch.equal(tensors["ids"], torch.from_numpy(tok.encode_batch(ins)))
        got = actor.act_tensors(
            tensors["images"],
            tensors["proprio"],
            tensors["ids"],
            generator=torch.Generator().manual_seed(9),
        )
        want = actor.act(images, proprio, ins, generator=torch.Generator().manual_seed(9))
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_allclose(got.logp, want.logp, rtol=0, atol=1e-6)
        # Too many rows for a slab, or no free slab: the caller assembles it the old way.
        assert batcher.fill(_requests(0, [5, 4]), tok) is None
        other = batcher.fill(_requests(1, [1]), tok)
        assert other is not None
        assert batcher.fill(_requests(2, [1]), tok) is None  # both slabs held
        stats = batcher.pool.statistics()
        assert (stats.backpressure, stats.held, batcher.fallbacks) == (1, 2, 2)
        slab.release()
        other[0].release()
        batcher.close()
        assert backend.allocations == 1
    finally:
        if isinstance(backend, FakeCuda):
            backend.close()


# --- real nodes ----------------------------------------------------------------------------


def _start(
    topo: Path, run_dir: Path, role: str, index: int = 0, tag: str = ""
) -> subprocess.Popen[bytes]:
    args = ["node", "start", "--role", role, "--topology", str(topo), "--host", "h"]
    args += ["--index", str(index), "--run-dir", str(run_dir), "--grace", "3"]
    return spawn(args, run_dir / f"{role}.{index}{tag}.log")


def _topology(path: Path, inference: str) -> Path:
    return write_topology(
        path,
        "coordinator = 1, inference = 2, learner = 0",
        extra=(
            f'[roles.learner]\npolicy_size = "tiny"\nimage_size = {IMAGE}\nseed = 0\n'
            'policy_stem = "patch"\n'
            f'[roles.inference]\nmax_batch = 8\nweights = "vram"\n{inference}'
        ),
    )


def _member(control: str, node: str, check: Callable[[Any], object], what: str) -> Any:
    """``node``'s row of the membership table once ``check`` holds for it (the last row seen
    is in the error otherwise)."""
    last: list[Any] = []

    def ok(status: Any) -> bool:
        row = members_by_node(status).get(node)
        last[:] = [row]
        return row is not None and bool(check(row))

    try:
        status = wait_status(control, ok, timeout=40, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {last}") from None
    return members_by_node(status)[node]


@contextlib.asynccontextmanager
async def _client(endpoint: str, name: str) -> AsyncIterator[RemotePolicy]:
    async with (
        open_context() as ctx,
        open_remote_policy(
            ctx,
            name=name,
            host="h",
            run="infvram",
            deadline_s=15.0,
            slab_size=1 << 16,
            endpoints=[endpoint],
        ) as policy,
    ):
        await policy.wait_ready(15.0)
        yield policy


async def _act(policy: RemotePolicy, seed: int, rows: int = 2) -> RemoteAct:
    images, proprio, ins = _obs(seed, rows)
    return await policy.act_async(images, proprio, ins)


def _check_logp(ref: Reference, weights: np.ndarray, seed: int, act: RemoteAct) -> None:
    images, proprio, ins = _obs(seed, len(act.tokens))
    expect = ref.logp(weights, images, proprio, ins, act.tokens)
    np.testing.assert_allclose(act.logp, expect, atol=2e-4)


def test_cpu_vram_node_serves_from_slabs_advertises_nothing_and_refuses_replicas(
    short_tmp: Path,
) -> None:
    """On a CPU backend: batches go through the slabs with a constant allocation count, the
    node advertises no ``vram`` endpoint (CPU slots cannot be exported), and a replica
    (``vram_from``) stops at setup with a configuration error (exit 2), not a hang."""
    topo = _topology(short_tmp / "t.toml", 'vram_from = "inference.{host}.0"\n')
    control = f"ipc://{short_tmp}/c.sock"
    ref = Reference()
    weights = {v: _flat_version(ref.flat, v) for v in (3, 4)}
    run_id = NodeConfig("x", "h", 0, short_tmp, control).run_id
    procs: list[subprocess.Popen[bytes]] = []
    with create_weight_pool(run_id, "test", Manifest.from_arrays({"flat": ref.flat})) as pool:
        try:
            procs.append(_start(topo, short_tmp, "coordinator"))
            procs.append(_start(topo, short_tmp, "inference", 0))
            replica = _start(topo, short_tmp, "inference", 1)
            procs.append(replica)
            owner = _member(control, "inference.h.0", lambda m: m.state == "running", "owner")
            assert "vram" not in owner.endpoints  # nothing shareable on a CPU backend
            pool.publish(3, {"flat": weights[3]})

            async def drive() -> list[RemoteAct]:
                acts = []
                async with _client(owner.endpoints["data"], "cpu-req") as policy:
                    for i in range(24):
                        if i == 12:
                            await asyncio.get_running_loop().run_in_executor(
                                None, pool.publish, 4, {"flat": weights[4]}
                            )
                        acts.append(await _act(policy, i, rows=1 + i % 3))
                return acts

            acts = asyncio.run(drive())
            assert replica.wait(timeout=40) == 2
            log = (short_tmp / "inference.1.log").read_text()
            assert "roles.inference.vram_from" in log
            assert "needs CUDA IPC" in log
            served = len(acts)
            final = _member(
                control,
                "inference.h.0",
                lambda m: m.counters.get("requests", 0) >= served,
                "the owner's counters",
            )
        finally:
            for proc in reversed(procs):
                stop(proc)
    versions = [a.version for a in acts]
    assert versions == sorted(versions)
    assert versions[0] == 3
    assert 4 in versions
    for i, act in enumerate(acts):
        if i % 5 == 0 or i == len(acts) - 1:
            _check_logp(ref, weights[act.version], i, act)
    c = final.counters
    # Two weight slots and one slab pool, allocated at setup; none since, over every batch
    # and both versions.
    assert c["vram.allocations"] == 3
    assert c["slabs.acquires"] >= c["batches"] >= 1
    assert c["slabs.fallbacks"] == 0
    assert c["vram.flips"] >= 2


def test_a_replica_maps_the_owner_slots_and_follows_its_death_and_restart(
    short_tmp: Path,
) -> None:
    """With the CUDA calls faked at the boundary: the owner advertises ``endpoints["vram"]``,
    the replica maps those slots (allocating no weight slots of its own) and serves the
    owner's versions; when the owner is killed the replica detaches and answers
    ``no_weights``, and it attaches the slots of the restarted owner."""
    topo = _topology(
        short_tmp / "t.toml",
        f'vram_from = "inference.{{host}}.0"\nvram_backend = "{FAKE_BACKEND}"\n',
    )
    control = f"ipc://{short_tmp}/c.sock"
    ref = Reference()
    weights = {v: _flat_version(ref.flat, v) for v in (3, 4)}
    run_id = NodeConfig("x", "h", 0, short_tmp, control).run_id
    started: list[subprocess.Popen[bytes]] = []  # stopped in reverse: owners, replica, hub
    try:
        with create_weight_pool(run_id, "test", Manifest.from_arrays({"flat": ref.flat})) as pool:
            try:
                started.append(_start(topo, short_tmp, "coordinator"))
                started.append(_start(topo, short_tmp, "inference", 1))
                owner_proc = _start(topo, short_tmp, "inference", 0)
                started.append(owner_proc)
                owner = _member(control, "inference.h.0", lambda m: m.state == "running", "owner")
                segment = owner.endpoints["vram"]
                assert segment.startswith(f"dvla.{run_id}.inference-h-0.")
                pool.publish(3, {"flat": weights[3]})
                replica = _member(
                    control,
                    "inference.h.1",
                    lambda m: m.gauges.get("vram.version") == 3.0,
                    "the replica attached to version 3",
                )
                assert "vram" not in replica.endpoints
                endpoint = replica.endpoints["data"]

                async def serve(seeds: range) -> list[RemoteAct]:
                    async with _client(endpoint, f"rep-{seeds.start}") as policy:
                        return [await _act(policy, s) for s in seeds]

                first = asyncio.run(serve(range(0, 6)))
                assert {a.version for a in first} == {3}
                for i, act in enumerate(first):
                    _check_logp(ref, weights[3], i, act)
                # An idle owner still loads new versions for its replicas.
                pool.publish(4, {"flat": weights[4]})
                _member(
                    control,
                    "inference.h.1",
                    lambda m: m.gauges.get("vram.version") == 4.0,
                    "the replica saw version 4",
                )
                owner = _member(
                    control,
                    "inference.h.0",
                    lambda m: m.gauges.get("vram.readers") == 1.0,
                    "the owner counts its reader",
                )
                assert owner.counters["vram.allocations"] == 3  # 2 slots + 1 slab pool
                second = asyncio.run(serve(range(10, 14)))
                assert {a.version for a in second} == {4}
                _check_logp(ref, weights[4], 10, second[0])

                owner_proc.kill()
                owner_proc.wait(10)
                _member(
                    control,
                    "inference.h.1",
                    lambda m: (
                        m.counters.get("vram.owner_deaths") == 1
                        and m.gauges.get("vram.attached") == 0.0
                    ),
                    "the replica detached from the dead owner",
                )

                async def refused() -> None:
                    async with _client(endpoint, "rep-dead") as policy:
                        with pytest.raises(InferenceError, match="no_weights"):
                            await _act(policy, 0)

                asyncio.run(refused())

                started.append(_start(topo, short_tmp, "inference", 0, tag=".again"))
                owner = _member(
                    control,
                    "inference.h.0",
                    lambda m: m.state == "running" and m.endpoints.get("vram", segment) != segment,
                    "the restarted owner advertises new slots",
                )
                replica = _member(
                    control,
                    "inference.h.1",
                    lambda m: (
                        m.counters.get("vram.attaches") == 2 and m.gauges.get("vram.version") == 4.0
                    ),
                    "the replica attached the restarted owner's slots",
                )
                third = asyncio.run(serve(range(20, 23)))
                assert {a.version for a in third} == {4}
                _check_logp(ref, weights[4], 20, third[0])
                c = replica.counters
                # The replica allocated its slab pool and no weight slots: it maps the owner's.
                assert c["vram.allocations"] == 1
                assert c["slabs.fallbacks"] == 0
                assert c["vram.detaches"] == 1
            finally:
                for proc in reversed(started):
                    stop(proc)
    finally:
        # The killed owner could not remove its control segment and fake GPU buffers.
        reap(run_id)
        reap(FAKE_GPU_RUN)
