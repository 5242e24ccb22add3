"""VRAM pools on CPU: weight slots (stage, flip, pins, bound modules), pinned staging of the host
weight pool, CUDA IPC readers and trajectory slabs.

CUDA itself is faked at the boundary only: :class:`FakeCuda` is a :class:`DeviceBackend` whose
"device memory" is shared-memory segments (so IPC can be imitated across real processes) and
whose ``cudaHostRegister`` records (or refuses) registrations. Everything above the backend is
the real code. The real GPU checks are ``tools/scripts/gpu_check.py``."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import nn

from dvla_bus.errors import ConfigError, DeadlineExceeded, PoolError, ResourceError
from dvla_bus.pool import Layout
from dvla_bus.shm import Segment, attach_segment, create_segment
from dvla_bus.vram import (
    CpuBackend,
    IpcHandle,
    VramExport,
    VramFollower,
    VramPin,
    VramSlab,
    VramSlabPool,
    attach_vram,
    create_vram_weights,
    default_backend,
    find_vram,
    module_manifest,
    node_component,
    torch_dtype,
)
from dvla_bus.weights import Manifest, attach_weights, create_weight_pool
from dvla_bus.wire import MemberInfo
from tests.data._procs import Child
from tests.helpers import REPO, wait_for


class FakeCuda(CpuBackend):
    """The CUDA calls faked at the boundary. Buffers live in shared-memory segments (an IPC
    handle is the segment's name), ``host_register`` records what it was asked and refuses
    when told to (``refuse``: "" nothing, "read-only" read-only registrations, "all")."""

    kind = "cuda"

    def __init__(self, run: str, *, refuse: str = "") -> None:
        super().__init__()
        self.run = run
        self.refuse = refuse
        self.registered: dict[int, tuple[int, bool]] = {}
        self.calls: list[tuple[str, int, int, bool]] = []
        self._owned: list[tuple[Segment, torch.Tensor]] = []
        self._attached: list[Segment] = []

    def device_id(self) -> str:
        return f"fake-gpu-{self.run}"

    def empty(self, nbytes: int) -> torch.Tensor:
        self._allocations += 1
        seg = create_segment(self.run, "gpu", f"buf{self._allocations}", nbytes)
        buf = torch.from_numpy(seg.ndarray(np.uint8, (nbytes,)))
        self._owned.append((seg, buf))
        return buf

    def ipc_export(self, buffer: torch.Tensor) -> IpcHandle:
        for seg, base in self._owned:
            offset = buffer.data_ptr() - base.data_ptr()
            if 0 <= offset < base.numel():
                return IpcHandle(
                    kind="cuda",
                    device=self.device_id(),
                    handle=seg.name.encode(),
                    storage_bytes=base.numel(),
                    storage_offset=0,
                    ref_counter=b"",
                    ref_counter_offset=0,
                    event=b"",
                    event_sync=False,
                    offset=offset,
                    nbytes=buffer.numel(),
                )
        raise ResourceError("fake: not a buffer of this backend")

    def ipc_import(self, handle: IpcHandle) -> torch.Tensor:
        seg = attach_segment(handle.handle.decode(), writable=True)
        self._attached.append(seg)
        return torch.from_numpy(seg.ndarray(np.uint8, (handle.nbytes,), handle.offset))

    def host_register(self, address: int, nbytes: int, *, read_only: bool) -> None:
        self.calls.append(("register", address, nbytes, read_only))
        if self.refuse == "all" or (self.refuse == "read-only" and read_only):
            raise ResourceError(f"fake cudaHostRegister refused (read_only={read_only})")
        assert address not in self.registered
        self.registered[address] = (nbytes, read_only)

    def host_unregister(self, address: int) -> None:
        self.calls.append(("unregister", address, 0, False))
        del self.registered[address]

    def close(self) -> None:
        for seg, _ in self._owned:
            seg.close()
        for seg in self._attached:
            seg.close()
        self._owned = []
        self._attached = []


FAKE_GPU_RUN = "fakegpu"
"""The run component of :class:`NodeFakeCuda`'s buffers (``dvla.fakegpu.gpu.<pid>...``)."""


class NodeFakeCuda(FakeCuda):
    """:class:`FakeCuda` for other processes (node processes, ``gpu_check.py``'s replica):
    constructed without arguments, as ``backend_from_spec("tests.test_vram:NodeFakeCuda")``
    (the ``vram_backend`` setting) makes it; every instance is the same fake GPU, so an owner's
    export maps in a replica's process."""

    def __init__(self) -> None:
        super().__init__(FAKE_GPU_RUN)


@pytest.fixture
def run_id() -> str:
    return "v" + secrets.token_hex(6)


@pytest.fixture
def fake(run_id: str) -> Iterator[FakeCuda]:
    backend = FakeCuda(run_id)
    try:
        yield backend
    finally:
        backend.close()


MANIFEST = Manifest.from_specs(
    [
        ("a", "float32", (64, 48)),
        ("b", "bfloat16", (100,)),
        ("c", "int64", (33,)),
        ("flag", "bool", (5,)),
        ("empty", "float32", (0, 4)),
        ("scalar", "float64", ()),
    ]
)


def filled(manifest: Manifest, value: int) -> dict[str, torch.Tensor]:
    """Every element of every tensor equals ``value`` (bools: its parity)."""
    out = {}
    for t in manifest.tensors:
        dt = torch_dtype(t.dtype)
        fill = bool(value % 2) if dt == torch.bool else value
        out[t.name] = torch.full(t.shape, fill, dtype=dt)
    return out


def values(tensors: Mapping[str, torch.Tensor]) -> set[float]:
    """The distinct values over every non-bool, non-empty tensor."""
    out: set[float] = set()
    for t in tensors.values():
        if t.numel() and t.dtype != torch.bool:
            out.add(float(t.min()))
            out.add(float(t.max()))
    return out


class Model(nn.Module):
    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        self.body = nn.Linear(8, 16, device=device)
        self.head = nn.Linear(16, 4, bias=False, device=device)
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.relu(self.body(x)))
        return out


def test_the_default_backend_without_cuda_is_the_cpu_fallback() -> None:
    backend = default_backend()
    assert backend.kind == "cpu"
    assert backend.device == torch.device("cpu")
    with pytest.raises(ResourceError, match="no CUDA device"):
        backend.ipc_export(torch.zeros(4, dtype=torch.uint8))
    assert torch_dtype("bfloat16") == torch.bfloat16
    assert torch_dtype("V2") == torch.bfloat16
    assert torch_dtype("<f4") == torch.float32
    with pytest.raises(ConfigError):
        torch_dtype("object")


# --- weight slots in one process -----------------------------------------------------------


def test_load_flip_and_pin_alternate_slots() -> None:
    backend = CpuBackend()
    with create_vram_weights(MANIFEST, backend=backend) as vram:
        assert vram.active_version == -1
        with pytest.raises(DeadlineExceeded, match="first version"):
            vram.pin(timeout=0.01)
        assert vram.load(1, filled(MANIFEST, 1)) == 0
        with vram.pin() as pin:
            assert (pin.version, pin.slot) == (1, 0)
            assert values(pin.tensors) == {1.0}
            assert pin.tensors["b"].dtype == torch.bfloat16
            assert pin.tensors["empty"].shape == (0, 4)
            assert pin.tensors["scalar"].shape == ()
            assert bool(pin.tensors["flag"].all())
            # Views into the slot: no copy.
            assert pin.tensors["a"].data_ptr() == pin.raw().data_ptr()
        # From a flat uint8 buffer (what a host slot or a learner's flat buffer is).
        flat = torch.zeros(MANIFEST.nbytes, dtype=torch.uint8)
        for name, t in filled(MANIFEST, 2).items():
            spec = next(s for s in MANIFEST.tensors if s.name == name)
            flat[spec.offset : spec.offset + spec.nbytes] = t.reshape(-1).view(torch.uint8)
        assert vram.stage(2, flat) == 1
        assert vram.staged()
        with vram.pin() as pin:
            assert pin.version == 1  # staged, not flipped: readers still get 1
        assert vram.flip() == 2
        with vram.pin() as pin:
            assert (pin.version, pin.slot) == (2, 1)
            assert values(pin.tensors) == {2.0}
            assert not bool(pin.tensors["flag"].any())
        with pytest.raises(PoolError, match="not newer"):
            vram.stage(2, flat)
        with pytest.raises(PoolError, match="missing"):
            vram.stage(3, {"a": torch.zeros(64, 48)})
        with pytest.raises(PoolError, match="manifest says"):
            vram.stage(3, {**filled(MANIFEST, 3), "a": torch.zeros(48, 64)})
        with pytest.raises(PoolError, match="nothing staged"):
            vram.flip()
        stats = vram.statistics()
        assert (stats.flips, stats.stages, stats.allocations) == (2, 2, 2)
        assert backend.allocations == 2
    with pytest.raises(PoolError, match="after close"):
        vram.stage(9, flat)


def test_staging_waits_for_pins_on_its_slot_with_a_deadline() -> None:
    with create_vram_weights(MANIFEST, backend=CpuBackend()) as vram:
        vram.load(1, filled(MANIFEST, 1))
        old = vram.pin()  # version 1 in slot 0
        vram.load(2, filled(MANIFEST, 2))  # slot 1: no wait
        with pytest.raises(DeadlineExceeded, match="1 in-process pin"):
            vram.stage(3, filled(MANIFEST, 3), timeout=0.05)
        assert values(old.tensors) == {1.0}  # the pinned bytes never changed
        old.release()
        old.release()  # idempotent
        vram.load(3, filled(MANIFEST, 3), timeout=1.0)
        with vram.pin() as pin:
            assert (pin.version, pin.slot) == (3, 0)


def test_bound_module_parameters_follow_the_active_slot_without_reallocation() -> None:
    backend = CpuBackend()
    model = Model()
    manifest = module_manifest(model, buffers=True)
    assert [t.name for t in manifest.tensors] == [
        "body.weight",
        "body.bias",
        "head.weight",
        "steps",
    ]
    reference = Model()
    x = torch.randn(5, 8)
    with create_vram_weights(manifest, backend=backend) as vram:
        with pytest.raises(PoolError, match="before a first version"):
            vram.bind(model)
        v1 = {k: v.detach().clone() for k, v in reference.state_dict().items()}
        vram.load(1, v1)
        params = dict(model.named_parameters())
        vram.bind(model)
        slots = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in (vram.raw(0), vram.raw(1))]

        def slot_of(t: torch.Tensor) -> int:
            return next(i for i, (lo, hi) in enumerate(slots) if lo <= t.data_ptr() < hi)

        with vram.pin() as pin, torch.no_grad():
            torch.testing.assert_close(model(x), reference(x))
            assert {slot_of(p) for p in model.parameters()} == {pin.slot}
        v2 = {k: v + 1 for k, v in v1.items()}
        for version in range(2, 8):
            vram.load(version, v2 if version % 2 == 0 else v1)
            with vram.pin() as pin, torch.no_grad():
                # The same Parameter objects, now viewing the other slot.
                assert dict(model.named_parameters()) == params
                assert all(p is params[n] for n, p in model.named_parameters())
                assert {slot_of(p) for p in model.parameters()} == {pin.slot}
                assert slot_of(model.get_buffer("steps")) == pin.slot
                expected = v2 if version % 2 == 0 else v1
                torch.testing.assert_close(model.body.bias, expected["body.bias"])
                out = torch.func.functional_call(reference, dict(pin.tensors), (x,))
                torch.testing.assert_close(model(x), out)
        assert backend.allocations == 2  # the two slots, nothing since
        assert vram.statistics().bound_tensors == 4


def test_bind_refuses_mismatched_modules_and_accepts_meta_modules() -> None:
    model = Model()
    manifest = module_manifest(model)  # parameters only: the buffer is not in it
    with create_vram_weights(manifest, backend=CpuBackend()) as vram:
        vram.load(1, dict(model.named_parameters()))
        with pytest.raises(ConfigError, match="not in the manifest"):
            vram.bind(nn.Linear(3, 3))
        wrong = Model()
        wrong.body.weight = nn.Parameter(torch.zeros(16, 9))
        with pytest.raises(ConfigError, match="in the module"):
            vram.bind(wrong)
        # A module built on the meta device costs no memory; bind gives it the slot's.
        ghost = Model(device="meta")
        vram.bind(ghost)
        assert all(not p.is_meta for p in ghost.parameters())
        with vram.pin(), torch.no_grad():
            x = torch.randn(2, 8)
            torch.testing.assert_close(ghost(x), model(x))
        vram.load(2, {n: p.detach() * 2 for n, p in model.named_parameters()})
        with vram.pin():
            torch.testing.assert_close(ghost.head.weight, model.head.weight * 2)
    # Meta buffers too; re-pointing them never disturbs the slots' own views.
    manifest = module_manifest(model, buffers=True)
    with create_vram_weights(manifest, backend=CpuBackend()) as vram:
        vram.load(1, filled(manifest, 1))
        ghost = Model(device="meta")
        vram.bind(ghost)
        ptrs = [[v.data_ptr() for v in vram.tensors(s).values()] for s in (0, 1)]
        for version in (2, 3, 4):
            vram.load(version, filled(manifest, version))
            with vram.pin() as pin:
                assert int(ghost.get_buffer("steps")[0]) == version
                assert ghost.get_buffer("steps").data_ptr() == pin.tensors["steps"].data_ptr()
        assert [[v.data_ptr() for v in vram.tensors(s).values()] for s in (0, 1)] == ptrs


def test_a_flip_waits_for_forward_passes_on_a_bound_module() -> None:
    model = Model()
    with create_vram_weights(module_manifest(model), backend=CpuBackend()) as vram:
        vram.load(1, {n: torch.full_like(p, 1.0) for n, p in model.named_parameters()})
        vram.bind(model)
        forward = vram.pin()  # a forward pass in flight on version 1
        vram.stage(2, {n: torch.full_like(p, 2.0) for n, p in model.named_parameters()})
        with pytest.raises(DeadlineExceeded, match="under a forward pass"):
            vram.flip(timeout=0.05)
        assert float(model.body.bias.detach()[0]) == 1.0  # not re-pointed under the forward pass

        flipped: list[int] = []
        later: list[int] = []
        flipper = threading.Thread(target=lambda: flipped.append(vram.flip(timeout=10)))
        flipper.start()
        wait_for(lambda: vram._draining, what="the flip to start draining")
        # A pin asked for while the flip drains waits for it (writer preference) and so
        # gets the new version, not the old one.
        pinner = threading.Thread(target=lambda: later.append(vram.pin(timeout=10).version))
        pinner.start()
        forward.release()
        flipper.join(10)
        pinner.join(10)
        assert flipped == [2]
        assert later == [2]
        assert float(model.body.bias.detach()[0]) == 2.0
        assert vram.statistics().drain_wait_s > 0


@pytest.mark.parametrize("bound", [False, True], ids=["pinned-views", "bound-module"])
def test_threads_hammering_the_active_slot_never_see_a_mix_of_versions(bound: bool) -> None:
    model = Model()
    manifest = module_manifest(model, buffers=True)
    with create_vram_weights(manifest, backend=CpuBackend()) as vram:
        vram.load(1, filled(manifest, 1))
        if bound:
            vram.bind(model)
        stop = threading.Event()
        errors: list[str] = []
        reads = [0, 0, 0]
        seen: list[set[int]] = [set(), set(), set()]

        def read(k: int, pin: VramPin) -> set[float]:
            if bound and k > 0:  # through the bound module, as a forward pass reads it
                return values(model.state_dict())
            return values(pin.tensors)

        def reader(k: int) -> None:
            while not stop.is_set():
                with vram.pin(timeout=10) as pin, torch.no_grad():
                    got = read(k, pin)
                    # A long forward pass: the writer would swap twice meanwhile if it could.
                    time.sleep(0.002)
                    got |= read(k, pin)
                    if got != {float(pin.version)}:
                        errors.append(f"reader {k}: version {pin.version} read {sorted(got)}")
                    seen[k].add(pin.version)
                reads[k] += 1

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        try:
            for version in range(2, 61):
                vram.load(version, filled(manifest, version), timeout=10)
                if version % 20 == 0:  # let every reader read across the swaps
                    marks = list(reads)

                    def moved(marks: list[int] = marks) -> bool:
                        return all(r > m for r, m in zip(reads, marks, strict=True))

                    wait_for(moved, what="every reader to read")
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert not errors, errors[:5]
        assert all(len(s) >= 3 for s in seen), seen
        assert vram.statistics().flips == 60


# --- the host weight pool: pinned staging ----------------------------------------------------


def host_arrays(manifest: Manifest, value: int) -> dict[str, np.ndarray]:
    return {
        n: (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
        for n, t in filled(manifest, value).items()
    }


def test_pinned_staging_registers_the_host_pool_when_cuda_is_there(run_id: str) -> None:
    with create_weight_pool(run_id, "relay", MANIFEST, chunk_bytes=4096) as pool:
        pool.publish(1, host_arrays(MANIFEST, 1))
        geo = pool.geometry
        span = geo.stride + geo.nbytes
        base = pool.raw(0).ctypes.data

        # The writer's own mapping: registered as it is.
        backend = FakeCuda(run_id)
        try:
            with create_vram_weights(MANIFEST, backend=backend) as vram:
                staging = vram.attach_host(pool)
                assert (staging.path, staging.registered) == ("pinned", True)
                assert backend.registered == {base: (span, False)}
                assert vram.stage_from_host() == 1
                assert vram.stage_from_host() is None  # nothing newer
                vram.flip()
                with vram.pin() as pin:
                    assert values(pin.tensors) == {1.0}
            assert backend.registered == {}  # unregistered on close, before the pool goes
            assert [c[0] for c in backend.calls] == ["register", "unregister"]
        finally:
            backend.close()

        with attach_weights(pool.name) as reader:
            # A reader's mapping is read-only: registered with the read-only flag...
            backend = FakeCuda(run_id)
            try:
                with create_vram_weights(MANIFEST, backend=backend) as vram:
                    assert vram.attach_host(reader).path == "pinned-read-only"
                    assert backend.registered == {reader.raw(0).ctypes.data: (span, True)}
                assert backend.registered == {}
            finally:
                backend.close()
            # ...or, where the driver refuses that, through a writable alias of the segment.
            backend = FakeCuda(run_id, refuse="read-only")
            try:
                with create_vram_weights(MANIFEST, backend=backend) as vram:
                    staging = vram.attach_host(reader)
                    assert staging.path == "pinned-alias"
                    ((address, (nbytes, read_only)),) = backend.registered.items()
                    assert (nbytes, read_only) == (span, False)
                    assert address != reader.raw(0).ctypes.data
                    pool.publish(2, host_arrays(MANIFEST, 2))
                    assert vram.stage_from_host() == 2
                    vram.flip()
                    with vram.pin() as pin:
                        assert values(pin.tensors) == {2.0}  # copied from the alias
                assert backend.registered == {}
            finally:
                backend.close()
            # A driver that refuses everything: loads stay pageable, and still work.
            backend = FakeCuda(run_id, refuse="all")
            try:
                with create_vram_weights(MANIFEST, backend=backend) as vram:
                    staging = vram.attach_host(reader)
                    assert (staging.path, staging.registered) == ("pageable", False)
                    assert "refused" in staging.reason
                    vram.stage_from_host()
                    vram.flip()
                    with vram.pin() as pin:
                        assert values(pin.tensors) == {2.0}
            finally:
                backend.close()
            # No CUDA at all: nothing is registered.
            with create_vram_weights(MANIFEST, backend=CpuBackend()) as vram:
                staging = vram.attach_host(reader)
                assert staging.path == "pageable"
                assert "no CUDA device" in staging.reason
                assert vram.statistics().host_path == "pageable"
            backend = FakeCuda(run_id)
            try:
                with create_vram_weights(MANIFEST, backend=backend) as vram:
                    staging = vram.attach_host(reader, register=False)
                    assert staging.reason == "registration disabled"
                    assert backend.calls == []
            finally:
                backend.close()
        other = Manifest.from_specs([("a", "float32", (3,))])
        with (
            create_vram_weights(other, backend=CpuBackend()) as vram,
            pytest.raises(PoolError, match="another layout"),
        ):
            vram.attach_host(pool)


def test_refresh_loads_host_versions_and_holds_the_host_pin_until_copied(run_id: str) -> None:
    with (
        create_weight_pool(run_id, "relay", MANIFEST, chunk_bytes=4096) as pool,
        attach_weights(pool.name) as reader,
        create_vram_weights(MANIFEST, backend=CpuBackend()) as vram,
    ):
        vram.attach_host(reader)
        assert not vram.refresh()  # nothing published yet
        pool.publish(1, host_arrays(MANIFEST, 1))
        assert not vram.refresh()  # staged (the copy of version 1 is under way)
        assert vram.staging_version == 1
        # The staged host version stays pinned until the flip: the relay cannot reuse it.
        pool.publish(2, host_arrays(MANIFEST, 2))
        with pytest.raises(DeadlineExceeded, match=str(os.getpid())):
            pool.begin(3, timeout=0.05)
        assert vram.refresh()  # flips 1, then stages 2
        assert (vram.active_version, vram.staging_version) == (1, 2)
        pool.publish(3, host_arrays(MANIFEST, 3), timeout=1.0)  # version 1's pin is gone
        assert vram.stage_from_host() == 3  # a newer host version replaces the staged one
        assert vram.refresh()  # flips 3
        with vram.pin() as pin:
            assert (pin.version, values(pin.tensors)) == (3, {3.0})
        pool.publish(4, host_arrays(MANIFEST, 4), timeout=1.0)  # no pin left in the pool


# --- exports and cross-process readers -----------------------------------------------------


def test_exports_are_validated_msgpack_not_pickle(fake: FakeCuda, run_id: str) -> None:
    with create_vram_weights(MANIFEST, backend=fake, run=run_id, node="infer") as vram:
        export = vram.export()
        data = export.encode()
        assert data[:1] != b"\x80"  # not a pickle
        assert VramExport.decode(data) == export
        assert Manifest.decode(export.manifest) == MANIFEST
        assert export.segment == vram.segment
        assert find_vram(run_id) == [vram.segment]
        import msgspec

        raw = msgspec.msgpack.decode(data)
        assert raw["slots"][0][0] == "cuda"  # plain MessagePack any client can read
        with pytest.raises(PoolError, match="malformed"):
            VramExport.decode(data[:-3])
        with pytest.raises(PoolError, match="malformed"):
            VramExport.decode(msgspec.msgpack.encode({**raw, "extra": 1}))
        with pytest.raises(PoolError, match="layout"):
            VramExport.decode(msgspec.msgpack.encode({**raw, "layout": 9}))
        # The handles say which memory they are: a CPU backend refuses CUDA memory, another
        # GPU refuses this GPU's.
        with pytest.raises(PoolError, match="cannot map"):
            attach_vram(data, backend=CpuBackend())
        with pytest.raises(PoolError, match="lives on"):
            attach_vram(data, backend=FakeCuda("elsewhere"))
    assert find_vram(run_id) == []
    with pytest.raises(ResourceError, match="no CUDA device"):
        create_vram_weights(MANIFEST, backend=CpuBackend(), run=run_id, node="infer")
    with (
        create_vram_weights(MANIFEST, backend=CpuBackend()) as private,
        pytest.raises(PoolError, match="not shared"),
    ):
        private.export()


def test_same_process_reader_by_segment_name(fake: FakeCuda, run_id: str) -> None:
    with create_vram_weights(MANIFEST, backend=fake, run=run_id, node="infer") as vram:
        vram.load(1, filled(MANIFEST, 1))
        with attach_vram(vram.segment, backend=FakeCuda(run_id)) as reader:
            assert vram.readers() == [os.getpid()]
            assert reader.owner_alive()
            with reader.pin() as pin:
                assert values(pin.tensors) == {1.0}
                with pytest.raises(PoolError, match="already pinned"):
                    reader.pin()
                vram.load(2, filled(MANIFEST, 2))
                with pytest.raises(DeadlineExceeded, match=f"reader pid\\(s\\) \\[{os.getpid()}"):
                    vram.stage(3, filled(MANIFEST, 3), timeout=0.05)
                assert values(pin.tensors) == {1.0}
            assert reader.wait_version(2, 1.0) == 2
            vram.load(3, filled(MANIFEST, 3), timeout=1.0)
            with reader.pin() as pin:
                assert (pin.version, values(pin.tensors)) == (3, {3.0})
        assert vram.readers() == []


def test_a_reader_binds_a_module_that_follows_its_pins(fake: FakeCuda, run_id: str) -> None:
    manifest = module_manifest(Model(), buffers=True)
    with create_vram_weights(manifest, backend=fake, run=run_id, node="infer") as vram:
        vram.load(1, filled(manifest, 1))
        with attach_vram(vram.export(), backend=FakeCuda(run_id)) as reader:
            replica = Model(device="meta")
            reader.bind(replica)
            x = torch.ones(1, 8)
            for version in (2, 3, 4):
                with reader.pin() as pin, torch.no_grad():
                    assert pin.version == version - 1
                    assert replica.body.bias.data_ptr() == pin.tensors["body.bias"].data_ptr()
                    assert values(replica.state_dict()) == {float(pin.version)}
                    out = torch.func.functional_call(Model(), dict(pin.tensors), (x,))
                    torch.testing.assert_close(replica(x), out)
                    with pytest.raises(PoolError, match="while pinned"):
                        reader.bind(Model(device="meta"))
                vram.load(version, filled(manifest, version))


READER = """
import sys
from tests.test_vram import FakeCuda, values
from dvla_bus.vram import attach_vram
backend = FakeCuda(sys.argv[1])
reader = attach_vram(bytes.fromhex(sys.stdin.readline().strip()), backend=backend)
print("attached", reader.active_version, flush=True)
pin = None
for line in sys.stdin:
    cmd, *arg = line.split()
    if cmd == "pin":
        pin = reader.pin(timeout=10)
        print("pinned", pin.version, sorted(values(pin.tensors)), flush=True)
    elif cmd == "release":
        pin.release()
        print("released", flush=True)
    elif cmd == "wait":
        print("version", reader.wait_version(int(arg[0]), 10), flush=True)
    elif cmd == "write":  # a reader's write lands in the owner's memory (shared, not copied)
        reader.raw(int(arg[0]))[-1] = 77
        print("wrote", flush=True)
reader.close()
backend.close()
"""


def test_a_reader_process_maps_the_slots_and_pins_across_processes(
    fake: FakeCuda, run_id: str
) -> None:
    with create_vram_weights(MANIFEST, backend=fake, run=run_id, node="infer") as vram:
        vram.load(1, filled(MANIFEST, 1))
        with Child(READER, run_id) as child:
            child.send(vram.export().encode().hex())  # the bytes a control message would carry
            assert child.read_line() == "attached 1"
            assert vram.readers() == [child.pid]
            child.send("pin")
            assert child.read_line() == "pinned 1 [1.0]"
            vram.load(2, filled(MANIFEST, 2))  # the other slot
            with pytest.raises(DeadlineExceeded, match=str(child.pid)):
                vram.stage(3, filled(MANIFEST, 3), timeout=0.05)
            child.send("release")
            assert child.read_line() == "released"
            vram.stage(3, filled(MANIFEST, 3), timeout=2.0)
            child.send("pin")
            assert child.read_line() == "pinned 2 [2.0]"  # staged is not active
            child.send("release")
            assert child.read_line() == "released"
            vram.flip()
            child.send("wait 3")
            assert child.read_line() == "version 3"
            child.send("pin")
            assert child.read_line() == "pinned 3 [3.0]"
            child.send("write 0")
            assert child.read_line() == "wrote"
            assert int(vram.raw(0)[-1]) == 77
            # The reader dies holding its pin: the kernel drops its lock, the owner goes on.
            child.proc.send_signal(signal.SIGKILL)
            child.proc.wait(10)
        vram.load(4, filled(MANIFEST, 4), timeout=2.0)
        vram.load(5, filled(MANIFEST, 5), timeout=2.0)
        assert vram.readers() == []


# --- following an owner ----------------------------------------------------------------------


def member(node: str, segment: str = "", *, host: str = "h", state: str = "running") -> MemberInfo:
    endpoints = {"vram": segment} if segment else {}
    return MemberInfo(
        node=node,
        role="inference",
        host=host,
        index=0,
        pid=1,
        state=state,
        weight_version=-1,
        heartbeat_age=0.0,
        joined=0.0,
        endpoints=endpoints,
    )


def test_a_follower_attaches_what_the_owner_advertises_and_drops_dead_slots(
    fake: FakeCuda, run_id: str
) -> None:
    now = [0.0]
    owner = "inference.h.0"
    with (
        create_vram_weights(MANIFEST, backend=fake, run=run_id, node=node_component(owner)) as a,
        create_vram_weights(
            MANIFEST, backend=fake, run=run_id, node=node_component(owner), name="again"
        ) as b,
        VramFollower(owner, backend=FakeCuda(run_id), host="h", clock=lambda: now[0]) as follower,
    ):
        a.load(1, filled(MANIFEST, 1))
        b.load(7, filled(MANIFEST, 7))
        assert follower.maintain() is None
        assert "advertises no VRAM slots" in follower.why
        # Not the owner, the owner dead, or on another host: nothing to attach.
        follower.follow_members([member("inference.h.1", a.segment)])
        assert follower.maintain() is None
        follower.follow_members([member(owner, a.segment, state="dead")])
        assert follower.maintain() is None
        follower.follow_members([member(owner, a.segment, host="h2")])
        assert follower.maintain() is None
        assert "CUDA IPC maps slots on one host only" in follower.why
        follower.follow_members([member(owner)])
        assert "no 'vram' endpoint" in follower.why
        # Advertised: attached, and kept while nothing changes.
        follower.follow_members([member(owner, a.segment), member("learner.h.0")])
        reader = follower.maintain()
        assert reader is not None
        assert follower.maintain() is reader
        assert a.readers() == [os.getpid()]
        with reader.pin() as pin:
            assert (pin.version, values(pin.tensors)) == (1, {1.0})
        # node_dead: detached at once, and those slots are never attached again.
        follower.owner_gone("learner.h.0")  # someone else
        assert follower.maintain() is reader
        follower.owner_gone(owner)
        assert follower.maintain() is None
        assert a.readers() == []
        follower.follow_members([member(owner, a.segment)])  # a stale table
        assert follower.maintain() is None
        assert "dead process" in follower.why
        # The restarted owner advertises other slots: attached.
        follower.follow_members([member(owner, b.segment)])
        reader = follower.maintain()
        assert reader is not None
        assert reader.export.segment == b.segment
        assert reader.active_version == 7
        stats = follower.statistics()
        assert (stats.attaches, stats.detaches, stats.owner_deaths) == (2, 1, 1)
        assert (stats.segment, stats.version, stats.why) == (b.segment, 7, "")
    assert b.readers() == []  # closing the follower detached it


def test_a_follower_finds_unadvertised_slots_and_retries_failed_attaches(
    fake: FakeCuda, run_id: str
) -> None:
    now = [0.0]
    owner = "inference.h.3"
    with VramFollower(
        owner, backend=FakeCuda(run_id), run=run_id, clock=lambda: now[0], scan_s=1.0
    ) as follower:
        assert follower.maintain() is None
        with create_vram_weights(
            MANIFEST, backend=fake, run=run_id, node=node_component(owner)
        ) as vram:
            assert vram.segment.split(".")[2] == "inference-h-3"
            assert follower.maintain() is None  # the last scan is fresh: no rescan yet
            now[0] += 1.0
            reader = follower.maintain()  # found on the machine by its node name
            assert reader is not None
            assert reader.export.segment == vram.segment
            follower.owner_gone(owner)  # left: the scanned slots count as dead
            assert follower.maintain() is None
            assert vram.readers() == []
        # An advertised segment that cannot be attached: counted, retried after retry_s.
        follower.follow_members([member(owner, f"dvla.{run_id}.x.1.1.vram")])
        assert follower.maintain() is None
        assert follower.maintain() is None
        assert follower.statistics().failures == 1
        assert "cannot attach" in follower.why
        now[0] += 1.0
        assert follower.maintain() is None
        assert follower.statistics().failures == 2
    with pytest.raises(PoolError, match="after close"):
        follower.maintain()


# --- trajectory slabs ----------------------------------------------------------------------

LAYOUT = Layout.pack(
    [("obs", "uint8", (32, 3, 16, 16)), ("act", "float32", (32, 7)), ("h", "V2", (32, 8))]
)


def _allocations(fn: Callable[[], None]) -> int:
    """Events with allocator traffic while ``fn`` runs (torch's profiler, CPU memory)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(1 for e in prof.events() if e.cpu_memory_usage != 0 or e.name == "[memory]")


def test_slabs_are_reused_without_allocating() -> None:
    backend = CpuBackend()
    with VramSlabPool(4, LAYOUT.nbytes, backend=backend) as pool:
        rng = np.random.default_rng(3)
        sizes = [int(n) for n in rng.integers(1, 33, 300)]
        fills = [torch.full((32, 7), float(i)) for i in range(300)]
        held: list[VramSlab] = []

        def pooled() -> None:
            for i, n in enumerate(sizes):  # variable-size batches, three in flight
                slab = pool.acquire(timeout=1.0)
                views = slab.view(LAYOUT)
                views["obs"][:n].fill_(i % 256)
                views["act"][:n].copy_(fills[i][:n])
                held.append(slab)
                if len(held) == 3:
                    held.pop(0).release()

        def naive() -> None:
            keep = []
            for i, n in enumerate(sizes[:50]):
                obs = torch.empty((n, 3, 16, 16), dtype=torch.uint8)
                obs.fill_(i % 256)
                keep.append(obs)
                if len(keep) == 3:
                    keep.pop(0)

        pooled()  # warm the view caches
        before = backend.allocations
        assert _allocations(pooled) == 0
        assert _allocations(naive) > 0  # the detector does see allocations
        assert backend.allocations == before == 1
        slab = pool.acquire(timeout=1.0)
        assert slab.view(LAYOUT) is slab.view(LAYOUT)  # cached
        assert slab.view(LAYOUT)["h"].dtype == torch.bfloat16
        for s in held:
            s.release()
        stats = pool.statistics()
        assert (stats.held, stats.allocations, stats.slab_count) == (1, 1, 4)
        slab.release()


def test_slab_backpressure_and_stale_handles() -> None:
    with VramSlabPool(2, 1024, backend=CpuBackend()) as pool:
        a = pool.acquire_nowait()
        b = pool.acquire_nowait()
        assert a is not None
        assert b is not None
        assert pool.acquire_nowait() is None
        with pytest.raises(DeadlineExceeded, match="backpressure"):
            pool.acquire(timeout=0.02)
        got: list[int] = []
        waiter = threading.Thread(target=lambda: got.append(pool.acquire(timeout=10).index))
        waiter.start()
        a.release()
        waiter.join(10)
        assert got == [a.index]
        with pytest.raises(PoolError, match="released"):
            a.release()
        with pytest.raises(PoolError, match="released"):
            a.view(LAYOUT)
        with pytest.raises(PoolError, match="slab holds"):
            b.view(LAYOUT)  # 1 KiB slabs cannot hold it
        stats = pool.statistics()
        assert stats.backpressure >= 2  # the waiter's too, if it came before the release
        assert stats.timeouts == 1
    with pytest.raises(PoolError, match="after close"):
        pool.acquire_nowait()
    with pytest.raises(ConfigError):
        VramSlabPool(0, 10)


# --- the GPU benchmark and check on a machine without one ----------------------------------


def test_bench_vram_skips_cleanly_without_cuda(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dvla_tools.cli import main

    out = tmp_path / "vram.json"
    assert main(["bench", "vram", "--json", str(out)]) == 0
    assert "skipped: no CUDA device" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["bench"] == "vram"
    assert doc["skipped"] is True
    assert doc["machine"]["cores"] >= 1


def _gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools/scripts/gpu_check.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_skips_cleanly_without_cuda_and_its_code_runs_on_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    check = _gpu_check()
    out = tmp_path / "check.json"
    assert check.main(["--json", str(out)]) == 0
    assert "no CUDA device: skipped" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert (doc["skipped"], doc["ok"]) == (True, True)
    # The same checks (and the benchmark) on the CPU backend, shrunk: the script's own code
    # is exercised here; only the CUDA-only steps (IPC, allocator counters) wait for a GPU.
    # The replica check (two processes, a real control hub) runs on CUDA faked at the boundary.
    fake = f"{__name__}:NodeFakeCuda"
    argv = ["--cpu-smoke", "--replica-backend", fake, "--json", str(out)]
    assert check.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["ok"] is True
    assert set(doc["checks"]) == {
        "pinned_staging",
        "slot_flip",
        "replica",
        "slab_no_alloc",
        "learner",
        "bench",
    }
    assert doc["checks"]["slot_flip"]["flips"] == 8
    replica = doc["checks"]["replica"]
    assert (replica["versions.1"], replica["versions.2"]) == ([1, 2], [3, 4])
    assert "died or left" in replica["detach_why.1"]
    assert replica["replica_exit"] == 0
    bench = doc["checks"]["bench"]
    assert [c["name"] for c in bench["cases"]] == [
        "swap",
        "fragmentation.naive",
        "fragmentation.pools",
        "h2d.pageable",
        "h2d.pinned",
    ]
