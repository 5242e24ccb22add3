"""``dvla bench vram``: the GPU dual pools against the naive allocation pattern, in one run.

GPU only: without CUDA it prints ``skipped: no CUDA device`` and exits 0 (with ``--json`` the file
says ``"skipped": true``). Cases, each doing the same work both ways:

* ``swap`` (for 1 B and 7 B bf16 parameters, a llama-shaped layout): how long inference stalls
  when a new version arrives. The new version's bytes are already on the GPU (landed from the
  host or produced by a learner on the same GPU).

  - naive: allocate new parameter tensors, copy the version in, re-point the module at them
    (what ``load_state_dict`` into fresh tensors does); also ``copy-in-place`` (copy into the
    live parameters: no allocation, but the model is unusable while it runs).
  - pools: :class:`dvla_bus.vram.VramWeights`: the copy into the staging slot runs on its own
    stream (``stage``, overlapped with inference, timed separately) and the stall is the flip,
    which re-points the bound module's parameters.

* ``fragmentation``: ``--versions`` weight versions of the 1 B layout, each followed by
  ``--steps`` rollout batches of random size (16..256 samples: 128x128 RGB observation, 7
  actions, 64 tokens, log-prob), 8 batches in flight. Naive: new parameter tensors per version
  and ``torch.empty`` per batch; pools: two weight slots and fixed slabs
  (:class:`dvla_bus.vram.VramSlabPool`). Reported: peak reserved / peak allocated bytes of
  torch's caching allocator (the fragmentation overhead), the peaks themselves, and how many
  allocations the allocator served (``allocation.all.allocated``) after the first version.

* ``h2d``: host -> GPU loading from the host weight pool in ``/dev/shm`` (``--h2d-mib``), as
  :class:`~dvla_bus.vram.VramWeights` loads it: pageable, then registered with
  ``cudaHostRegister`` (:class:`~dvla_bus.vram.PinnedStaging`; the registration time is
  reported), and a ``torch.empty(pin_memory=True)`` buffer as the ceiling. GB/s = 10^9 B/s.

Times are medians of ``--reps`` repetitions after a warm-up, measured with the device
synchronised. Sized to run in about two minutes on an H200 (7 B bf16 needs ~45 GB of GPU memory
at the peak).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from dvla_tools.bench._common import machine_info, write_json

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dvla_bus.vram import DeviceBackend
    from dvla_bus.weights import Manifest

PARAMS: Final = (1.0e9, 7.0e9)
VOCAB: Final = 32_000
OBS: Final = (3, 128, 128)
BATCH: Final = (16, 256)
IN_FLIGHT: Final = 8


def register(sub: Any, name: str, help_text: str) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=__doc__)
    parser.add_argument("--json", help="write results to this file")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument(
        "--params", help="comma-separated parameter counts in billions for 'swap' (default 1,7)"
    )
    parser.add_argument("--reps", type=int, default=0, help="timed repetitions (default 5)")
    parser.add_argument("--versions", type=int, default=0, help="fragmentation: versions (8)")
    parser.add_argument("--steps", type=int, default=0, help="fragmentation: batches per version")
    parser.add_argument("--h2d-mib", type=int, default=0, help="h2d: MiB per load (1024)")
    # Runs the same code on the CPU with tiny sizes, to test the benchmark itself (numbers
    # meaningless; no allocator statistics). Not for users.
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(func=_main)


# --- the model ---------------------------------------------------------------------------------


def layer_shapes(params: float) -> tuple[int, int, int]:
    """(d_model, d_ff, layers) of a llama-shaped model with about ``params`` parameters."""
    d = 64 if params < 1e7 else 2048 if params < 3e9 else 4096
    ff = -(-(8 * d // 3) // 256) * 256
    per_layer = 4 * d * d + 3 * d * ff + 2 * d
    layers = max(1, round((params - 2 * VOCAB * d) / per_layer))
    return d, ff, layers


def build_model(params: float, device: str) -> nn.Module:
    """A llama-shaped stack of bf16 parameters (no forward pass: the benches move weights)."""
    import torch
    from torch import nn

    d, ff, layers = layer_shapes(params)

    def p(*shape: int) -> nn.Parameter:
        return nn.Parameter(
            torch.empty(shape, dtype=torch.bfloat16, device=device), requires_grad=False
        )

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = p(d, d), p(d, d), p(d, d), p(d, d)
            self.gate, self.up, self.down = p(ff, d), p(ff, d), p(d, ff)
            self.norm1, self.norm2 = p(d), p(d)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = p(VOCAB, d)
            self.layers = nn.ModuleList(Layer() for _ in range(layers))
            self.norm = p(d)
            self.head = p(VOCAB, d)

    return Model()


# --- helpers -----------------------------------------------------------------------------------


class _Clock:
    """Wall time with the device synchronised at both ends (CPU: plain wall time)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _free(cuda: bool) -> None:
    import gc

    gc.collect()
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _stats(cuda: bool) -> dict[str, int]:
    if not cuda:
        return {}
    import torch

    s = torch.cuda.memory_stats()
    return {
        "allocations": int(s.get("allocation.all.allocated", 0)),
        "device_allocs": int(s.get("num_device_alloc", 0)),
        "retries": int(s.get("num_alloc_retries", 0)),
    }


def _flat_source(manifest: Manifest, device: torch.device) -> torch.Tensor:
    import torch

    src = torch.empty(manifest.nbytes, dtype=torch.uint8, device=device)
    src.fill_(0x3C)  # bf16 1.0-ish everywhere: any bytes do
    return src


def _views(manifest: Manifest, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    from dvla_bus.vram import torch_dtype

    return {
        t.name: flat[t.offset : t.offset + t.nbytes].view(torch_dtype(t.dtype)).view(t.shape)
        for t in manifest.tensors
    }


# --- swap --------------------------------------------------------------------------------------


def swap_case(params: float, backend: DeviceBackend, reps: int) -> dict[str, Any]:
    import torch

    from dvla_bus.vram import create_vram_weights, module_manifest

    cuda = backend.kind == "cuda"
    clock = _Clock(cuda)
    device = backend.device
    ghost = build_model(params, "meta")
    manifest = module_manifest(ghost)
    n_params = sum(t.nbytes // 2 for t in manifest.tensors)
    src = _flat_source(manifest, device)
    rec: dict[str, Any] = {
        "name": "swap",
        "params": n_params,
        "bytes": manifest.nbytes,
        "tensors": len(manifest.tensors),
    }

    # Pools: stage (overlapped with inference, on the copy stream) + flip (the stall).
    with create_vram_weights(manifest, backend=backend) as vram:
        vram.load(0, src)
        vram.bind(ghost)
        stage_s: list[float] = []
        flip_s: list[float] = []
        for v in range(1, reps + 2):
            clock.sync()
            t0 = time.perf_counter()
            vram.stage(v, src)
            while not vram.staged():
                pass
            t1 = time.perf_counter()
            vram.flip()
            t2 = time.perf_counter()
            if v > 1:  # the first is the warm-up
                stage_s.append(t1 - t0)
                flip_s.append(t2 - t1)
        assert next(iter(ghost.parameters())).data_ptr() == vram.raw(vram.active_slot).data_ptr()
    del ghost  # its parameters hold the slots
    _free(cuda)

    # Naive: new parameter tensors per version; and copying into the live parameters.
    views = _views(manifest, src)
    model = build_model(params, str(device))
    named = dict(model.named_parameters())
    naive_s: list[float] = []
    in_place_s: list[float] = []

    def naive_swap() -> None:
        for name, p in named.items():
            fresh = torch.empty_like(p)
            fresh.copy_(views[name])
            p.data = fresh  # the old tensor goes back to the caching allocator

    def copy_in_place() -> None:
        for name, p in named.items():
            p.data.copy_(views[name])

    for i in range(reps + 1):
        a = clock.time(naive_swap)
        b = clock.time(copy_in_place)
        if i:
            naive_s.append(a)
            in_place_s.append(b)
    rec.update(
        {
            "pool_stage_s": _median(stage_s),
            "pool_flip_s": _median(flip_s),
            "naive_swap_s": _median(naive_s),
            "copy_in_place_s": _median(in_place_s),
            "stage_gbps": manifest.nbytes / _median(stage_s) / 1e9,
        }
    )
    return rec


# --- fragmentation -----------------------------------------------------------------------------


def frag_case(
    params: float,
    backend: DeviceBackend,
    versions: int,
    steps: int,
    *,
    batch: tuple[int, int] = BATCH,
    seed: int = 0,
) -> list[dict[str, Any]]:
    import numpy as np
    import torch

    from dvla_bus.pool import Layout
    from dvla_bus.vram import VramSlabPool, create_vram_weights, module_manifest

    cuda = backend.kind == "cuda"
    device = backend.device
    manifest = module_manifest(build_model(params, "meta"))
    rng = np.random.default_rng(seed)
    sizes = [int(n) for n in rng.integers(batch[0], batch[1] + 1, versions * steps)]
    bmax = batch[1]
    layout = Layout.pack(
        [
            ("obs", "uint8", (bmax, *OBS)),
            ("act", "float32", (bmax, 7)),
            ("tokens", "int64", (bmax, 64)),
            ("logp", "float32", (bmax,)),
        ]
    )
    out: list[dict[str, Any]] = []

    def measure(name: str, run: Callable[[Callable[[], None]], None]) -> None:
        _free(cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        marks: dict[str, dict[str, int]] = {}

        def mark() -> None:  # after the first version: the steady state
            marks["steady"] = _stats(cuda)

        t0 = time.perf_counter()
        run(mark)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        end = _stats(cuda)
        rec: dict[str, Any] = {
            "name": f"fragmentation.{name}",
            "params_bytes": manifest.nbytes,
            "versions": versions,
            "batches": len(sizes),
            "wall_s": wall,
        }
        if cuda:
            reserved = int(torch.cuda.max_memory_reserved())
            allocated = int(torch.cuda.max_memory_allocated())
            steady = marks.get("steady", end)
            rec.update(
                {
                    "peak_reserved_bytes": reserved,
                    "peak_allocated_bytes": allocated,
                    "reserved_over_allocated": reserved / max(allocated, 1),
                    "steady_allocations": end["allocations"] - steady["allocations"],
                    "steady_device_allocs": end["device_allocs"] - steady["device_allocs"],
                    "alloc_retries": end["retries"],
                }
            )
        out.append(rec)

    src = _flat_source(manifest, device)
    views = _views(manifest, src)

    def naive(mark: Callable[[], None]) -> None:
        params_now: dict[str, torch.Tensor] = {}
        flight: deque[tuple[torch.Tensor, ...]] = deque()
        for v in range(versions):
            fresh = {}
            for name, view in views.items():
                fresh[name] = torch.empty_like(view)
                fresh[name].copy_(view)
            params_now = fresh  # the old version's tensors are freed here
            for i in range(steps):
                n = sizes[v * steps + i]
                batch = (
                    torch.empty((n, *OBS), dtype=torch.uint8, device=device),
                    torch.empty((n, 7), dtype=torch.float32, device=device),
                    torch.empty((n, 64), dtype=torch.int64, device=device),
                    torch.empty((n,), dtype=torch.float32, device=device),
                )
                for t in batch:
                    t.fill_(i % 7)
                flight.append(batch)
                if len(flight) > IN_FLIGHT:
                    flight.popleft()
            if v == 0:
                mark()
        del params_now, flight

    def pooled(mark: Callable[[], None]) -> None:
        with (
            create_vram_weights(manifest, backend=backend) as vram,
            VramSlabPool(IN_FLIGHT + 1, layout.nbytes, backend=backend) as slabs,
        ):
            flight: deque[Any] = deque()
            for v in range(versions):
                vram.load(v, src)
                for i in range(steps):
                    n = sizes[v * steps + i]
                    slab = slabs.acquire(timeout=10)
                    for t in slab.view(layout).values():
                        t[:n].fill_(i % 7)
                    flight.append(slab)
                    if len(flight) > IN_FLIGHT:
                        flight.popleft().release()
                if v == 0:
                    mark()
            while flight:
                flight.popleft().release()

    measure("naive", naive)
    measure("pools", pooled)
    return out


# --- h2d ---------------------------------------------------------------------------------------


def h2d_case(nbytes: int, backend: DeviceBackend, reps: int) -> list[dict[str, Any]]:
    import torch

    from dvla_bus.vram import create_vram_weights
    from dvla_bus.weights import Manifest, attach_weights, create_weight_pool

    cuda = backend.kind == "cuda"
    clock = _Clock(cuda)
    manifest = Manifest.from_specs([("w", "uint8", (nbytes,))])
    run = "bv" + secrets.token_hex(4)
    out: list[dict[str, Any]] = []
    version = 0

    def publish(pool: Any) -> None:
        nonlocal version
        version += 1
        pool.begin(version)
        pool.seal_staging()  # checksum "none": the bytes stay as filled
        pool.commit()

    with create_weight_pool(run, "bench", manifest, chunk_bytes=64 << 20, checksum="none") as pool:
        for s in (0, 1):
            pool.raw(s)[:] = 0x5A  # touch every page once
        with (
            attach_weights(pool.name) as reader,
            create_vram_weights(manifest, backend=backend) as vram,
        ):
            for mode in ("pageable", "pinned"):
                staging = vram.attach_host(reader, register=mode == "pinned")
                times: list[float] = []
                for i in range(reps + 1):
                    publish(pool)
                    clock.sync()
                    t0 = time.perf_counter()
                    vram.stage_from_host()
                    while not vram.staged():
                        pass
                    dt = time.perf_counter() - t0
                    vram.flip()
                    if i:
                        times.append(dt)
                out.append(
                    {
                        "name": f"h2d.{mode}",
                        "bytes": nbytes,
                        "path": staging.path,
                        "reason": staging.reason,
                        "register_s": staging.register_s,
                        "median_s": _median(times),
                        "gbps": nbytes / _median(times) / 1e9,
                    }
                )
            vram.detach_host()
    if cuda:  # the ceiling: torch's own pinned buffer
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=backend.device)
        times = [clock.time(lambda: dev.copy_(host, non_blocking=True)) for _ in range(reps + 1)]
        out.append(
            {
                "name": "h2d.torch-pinned",
                "bytes": nbytes,
                "median_s": _median(times[1:]),
                "gbps": nbytes / _median(times[1:]) / 1e9,
            }
        )
        del host, dev
        _free(cuda)
    return out


# --- main --------------------------------------------------------------------------------------


def _main(args: argparse.Namespace) -> int:
    import torch

    smoke = bool(args.cpu_smoke)
    if not torch.cuda.is_available() and not smoke:
        print("skipped: no CUDA device (dvla bench vram needs a GPU)")
        doc = {
            "bench": "vram",
            "skipped": True,
            "reason": "no CUDA device",
            "machine": machine_info(),
        }
        write_json(args.json, doc)
        return 0
    from dvla_bus.vram import CpuBackend, CudaBackend

    backend: DeviceBackend = CpuBackend() if smoke else CudaBackend()
    quick = bool(args.quick) or smoke
    reps = args.reps or (2 if quick else 5)
    if args.params:
        sizes = [float(x) * 1e9 for x in args.params.split(",")]
    else:
        sizes = [2e6] if smoke else [0.25e9, 1e9] if quick else list(PARAMS)
    frag_params = 2e6 if smoke else 0.25e9 if quick else 1e9
    versions = args.versions or (2 if smoke else 3 if quick else 8)
    steps = args.steps or (4 if smoke else 10 if quick else 40)
    h2d = (args.h2d_mib or (8 if smoke else 256 if quick else 1024)) << 20

    gpu: dict[str, Any] = {"device": "cpu (smoke run: numbers are meaningless)"}
    if backend.kind == "cuda":
        props = torch.cuda.get_device_properties(backend.device)
        gpu = {
            "device": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        }
    print(f"dvla bench vram on {gpu['device']}", flush=True)
    cases: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    errors: list[str] = []

    def attempt(name: str, fn: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        # One case failing (say out of memory) must not cost the others' numbers.
        try:
            return fn()
        except Exception as exc:
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"{name} FAILED: {type(exc).__name__}: {exc}", flush=True)
            return []
        finally:
            _free(backend.kind == "cuda")  # the case's tensors are gone with its frame

    for p in sizes:

        def one_swap(p: float = p) -> list[dict[str, Any]]:
            return [swap_case(p, backend, reps)]

        for rec in attempt(f"swap {p / 1e9:g}B", one_swap):
            cases.append(rec)
            print(
                f"swap {rec['params'] / 1e9:5.2f} B params ({rec['bytes'] / 2**30:5.1f} GiB, "
                f"{rec['tensors']} tensors): naive {rec['naive_swap_s'] * 1e3:8.2f} ms, "
                f"copy in place {rec['copy_in_place_s'] * 1e3:8.2f} ms, "
                f"pools: stage {rec['pool_stage_s'] * 1e3:8.2f} ms (overlapped) + "
                f"flip {rec['pool_flip_s'] * 1e6:8.1f} us",
                flush=True,
            )
    batch = (2, 16) if smoke else BATCH
    frag = attempt(
        "fragmentation",
        lambda: frag_case(frag_params, backend, versions, steps, batch=batch),
    )
    for rec in frag:
        cases.append(rec)
        if "reserved_over_allocated" in rec:
            print(
                f"{rec['name']:24s} peak reserved {rec['peak_reserved_bytes'] / 2**30:6.2f} GiB"
                f" / allocated {rec['peak_allocated_bytes'] / 2**30:6.2f} GiB = "
                f"{rec['reserved_over_allocated']:5.3f}; allocations after version 1: "
                f"{rec['steady_allocations']}",
                flush=True,
            )
        else:
            print(f"{rec['name']:24s} ran ({rec['wall_s']:.2f} s; no allocator statistics)")
    for rec in attempt("h2d", lambda: h2d_case(h2d, backend, reps)):
        cases.append(rec)
        extra = f" [{rec['path']}]" if "path" in rec else ""
        print(
            f"{rec['name']:24s} {rec['gbps']:7.2f} GB/s ({rec['bytes'] >> 20} MiB){extra}",
            flush=True,
        )
    by_name = {c["name"]: c for c in cases if c["name"] != "swap"}
    ratios: dict[str, float] = {}
    for c in cases:
        if c["name"] == "swap":
            tag = f"{c['params'] / 1e9:.2f}B"
            ratios[f"swap.naive_over_flip.{tag}"] = c["naive_swap_s"] / c["pool_flip_s"]
    naive_f = by_name.get("fragmentation.naive", {})
    pools_f = by_name.get("fragmentation.pools", {})
    if "reserved_over_allocated" in naive_f and "reserved_over_allocated" in pools_f:
        ratios["fragmentation.naive"] = naive_f["reserved_over_allocated"]
        ratios["fragmentation.pools"] = pools_f["reserved_over_allocated"]
    pinned, pageable = by_name.get("h2d.pinned", {}), by_name.get("h2d.pageable", {})
    if pinned and pageable:
        ratios["h2d.pinned_over_pageable"] = pinned["gbps"] / pageable["gbps"]
    doc = {
        "bench": "vram",
        "skipped": False,
        "smoke": smoke,
        "quick": quick,
        "gpu": gpu,
        "machine": machine_info(),
        "pid": os.getpid(),
        "wall_s": time.perf_counter() - t_start,
        "cases": cases,
        "ratios": ratios,
        "errors": errors,
    }
    write_json(args.json, doc)
    for key, value in ratios.items():
        print(f"{key:36s} {value:10.3f}")
    return 1 if errors else 0
