#!/usr/bin/env python3
"""GPU checks of the VRAM pools (``dvla_bus/vram.py``), in one command.

    python3 tools/scripts/gpu_check.py [--json PATH] [--quick] [--no-bench]

Without a CUDA device it prints ``no CUDA device: skipped``, writes ``{"skipped": true, "ok":
true}`` to ``--json`` and exits 0. On a GPU it runs, each check reported PASS/FAIL with its
numbers (exit status 1 if any fails):

1. ``pinned_staging``: the host weight pool (``/dev/shm``) registered with ``cudaHostRegister``:
   the writer's mapping, then a reader's read-only mapping as :class:`~dvla_bus.vram.VramWeights`
   registers it (which path the driver accepted, how long it took); host -> GPU GB/s pageable vs
   registered; the loaded bytes equal the host's.
2. ``slot_flip``: readers on their own CUDA streams hammer the active slot while the writer
   loads ``--versions`` host versions and flips. Every tensor of a version is filled with the
   version number; a reader checks min == max == its pinned version, (a) syncing inside the pin,
   (b) only enqueueing the reads behind a long kernel and releasing the pin *before* they run
   (the copy into that slot must wait for them: the release event), (c) through a bound module.
3. ``ipc``: a second process maps the slots through CUDA IPC (the export travels as MessagePack
   bytes), sees each flip, blocks the owner's staging while it pins (the owner's
   DeadlineExceeded names it), and writes into a buffer the owner exported (the owner sees it).
4. ``replica``: the inference replica path (``[roles.inference] vram_from``) between two
   processes over a real control hub: the owner joins advertising its slots' control segment
   as ``endpoints["vram"]``; the replica (a :class:`~dvla_bus.vram.VramFollower`, as the
   inference role runs it) finds it in the membership table, attaches through CUDA IPC, binds a
   module to the slots and reads version 1, then the version the owner loads from its host
   pool and flips; when the owner leaves (the hub's ``node_dead``) the replica detaches (how
   fast is reported), and it attaches the slots of the owner's next incarnation.
5. ``slab_no_alloc``: 1000 acquire/fill/release cycles of a VRAM slab pool leave torch's
   allocation counter unchanged (the same work with ``torch.empty`` does not).
6. ``learner``: the GRPO learner with ``device = "cuda"`` (its minibatch inputs in VRAM slabs,
   staged through page-locked host memory): updates on synthetic episodes of varying size,
   torch's peak reserved and allocated bytes, and that reserved stops growing once every
   padded minibatch shape has been seen; then one update on the CPU and one on the GPU from the
   same initial weights (TF32 off) agree within float tolerance.
7. ``bench``: ``dvla bench vram`` (``--quick`` with ``--quick``), its JSON embedded.

On the device machine (``device`` tool) the image has torch, numpy, psutil and safetensors
but not msgspec or pyzmq (``dvla_bus`` imports both) nor mujoco and gymnasium (``dvla_nodes``
imports them for the ``learner`` check, which renders nothing: MuJoCo without PyOpenGL and
glfw imports fine; 10 MB of wheels). Here, once (the folder must be git-ignored, see
/work/.library/device/README.md)::

    echo /.whl/ >> .git/info/exclude
    P="--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
    P="$P --platform manylinux_2_26_x86_64 --platform manylinux_2_28_x86_64"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp $P -d .whl msgspec pyzmq mujoco mujoco-core gymnasium \\
        farama-notifications

then one ``run`` with ``carry: [".whl"]`` and ``timeout_s`` 600 (the checks plus the benchmark
take a few minutes)::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 tools/scripts/gpu_check.py --json $OUT/gpu.json

The script puts the repository's packages on ``sys.path`` itself (no install needed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
for _p in (REPO, REPO / "nodes", REPO / "tools"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


def write(path: str | None, doc: dict[str, Any]) -> None:
    if path is None:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, target)


def cuda_available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device"
    return True, torch.cuda.get_device_name(0)


# --- the checks ----------------------------------------------------------------------------------


def fill_host(pool: Any, version: int) -> None:
    """Publish ``version`` into a host weight pool of float32 tensors, every element = version."""
    import numpy as np

    pool.begin(version)
    pool.staging_raw().view(np.float32)[:] = float(version)
    pool.seal_staging()
    pool.commit()


class Dev:
    """The device under test: CUDA, or (``--cpu-smoke``, to test this script without a GPU) the
    CPU backend with the CUDA-only steps left out and the sizes shrunk."""

    def __init__(self, smoke: bool) -> None:
        from dvla_bus.vram import CpuBackend, CudaBackend, DeviceBackend

        self.smoke = smoke
        self.backend: DeviceBackend = CpuBackend() if smoke else CudaBackend()
        self.device = self.backend.device

    def sync(self) -> None:
        if not self.smoke:
            import torch

            torch.cuda.synchronize()

    def new_stream(self) -> Any:
        if self.smoke:
            return None
        import torch

        make: Any = torch.cuda.Stream  # untyped in torch
        return make()

    def on(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        if self.smoke:
            return contextlib.nullcontext()
        import torch

        return torch.cuda.stream(stream)

    def stream_sync(self, stream: Any) -> None:
        if stream is not None:
            stream.synchronize()

    def allocations(self) -> int:
        """torch's count of allocations served so far (-1: not tracked on the CPU)."""
        if self.smoke:
            return -1
        import torch

        self.sync()
        return int(torch.cuda.memory_stats().get("allocation.all.allocated", 0))


def check_pinned_staging(dev: Dev, run: str, mib: int) -> dict[str, Any]:
    import torch

    from dvla_bus.vram import PinnedStaging, create_vram_weights
    from dvla_bus.weights import Manifest, attach_weights, create_weight_pool

    n = (mib << 20) // 4
    manifest = Manifest.from_specs([("w", "float32", (n,))])
    backend = dev.backend
    out: dict[str, Any] = {"bytes": manifest.nbytes}
    with create_weight_pool(run, "host", manifest, chunk_bytes=64 << 20, checksum="none") as pool:
        fill_host(pool, 1)
        with PinnedStaging(pool, backend) as writer_side:
            out["writer_path"] = writer_side.path
            out["writer_register_s"] = writer_side.register_s
            out["writer_reason"] = writer_side.reason
        with (
            attach_weights(pool.name) as reader,
            create_vram_weights(manifest, backend=backend) as vram,
        ):
            version = 1
            for mode in ("pageable", "pinned"):
                staging = vram.attach_host(reader, register=mode == "pinned")
                out[f"{mode}_path"] = staging.path
                out[f"{mode}_reason"] = staging.reason
                out[f"{mode}_register_s"] = staging.register_s
                times = []
                for _ in range(4):
                    version += 1
                    fill_host(pool, version)
                    dev.sync()
                    t0 = time.perf_counter()
                    vram.stage_from_host()
                    while not vram.staged():
                        pass
                    times.append(time.perf_counter() - t0)
                    vram.flip()
                    with vram.pin() as pin:
                        w = pin.tensors["w"]
                        lo, hi = (float(x) for x in torch.aminmax(w))
                    if lo != hi or lo != float(version):
                        raise AssertionError(f"loaded {lo}..{hi}, host holds {version}")
                best = sorted(times[1:])[len(times[1:]) // 2]
                out[f"{mode}_gbps"] = manifest.nbytes / best / 1e9
            vram.detach_host()
    out["pinned_over_pageable"] = out["pinned_gbps"] / out["pageable_gbps"]
    if not dev.smoke and not out["pinned_path"].startswith("pinned"):
        raise AssertionError(f"registration failed: {out['pinned_reason']}")
    return out


def check_slot_flip(dev: Dev, run: str, versions: int) -> dict[str, Any]:
    import torch
    from torch import nn

    from dvla_bus.vram import create_vram_weights, module_manifest
    from dvla_bus.weights import attach_weights, create_weight_pool

    rows, busy_n = (64, 128) if dev.smoke else (1024, 4096)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for i in range(8):
                p = torch.empty((rows, 4096), device="meta")
                self.register_parameter(f"w{i}", nn.Parameter(p, requires_grad=False))

    model = Model()
    manifest = module_manifest(model)
    backend = dev.backend
    stop = threading.Event()
    errors: list[str] = []
    reads: dict[str, int] = {"sync": 0, "async": 0, "module": 0}
    seen: dict[str, set[int]] = {k: set() for k in reads}
    pins = dict.fromkeys(reads, 0)  # progress, to interleave the writer with every reader

    def minmax(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.stack(list(torch.aminmax(t))) for t in tensors])

    def reader(mode: str) -> None:
        stream = dev.new_stream()
        busy = torch.randn(busy_n, busy_n, device=dev.device)
        pending: list[tuple[int, torch.Tensor]] = []

        def check_pending() -> None:
            dev.stream_sync(stream)
            for version, result in pending:
                vals = set(result.flatten().tolist())
                if vals != {float(version)}:
                    errors.append(f"async: version {version} read {sorted(vals)}")
                seen[mode].add(version)
            reads[mode] += len(pending)
            pending.clear()

        with dev.on(stream):
            while not stop.is_set():
                if mode == "async":
                    with vram.pin(timeout=30) as pin:
                        _ = busy @ busy  # delays the reads behind real work
                        got = minmax(list(pin.tensors.values()))
                        pending.append((pin.version, got))
                    pins[mode] += 1
                    # Released before the reads ran: the staging copy must wait for them.
                    if len(pending) >= 8:
                        check_pending()
                    continue
                with vram.pin(timeout=30) as pin:
                    tensors: list[torch.Tensor] = (
                        list(model.parameters()) if mode == "module" else list(pin.tensors.values())
                    )
                    vals = set(minmax(tensors).flatten().tolist())  # syncs inside the pin
                    if vals != {float(pin.version)}:
                        errors.append(f"{mode}: version {pin.version} read {sorted(vals)}")
                    seen[mode].add(pin.version)
                pins[mode] += 1
                reads[mode] += 1
            check_pending()

    with (
        create_weight_pool(run, "host", manifest, chunk_bytes=64 << 20, checksum="none") as pool,
        attach_weights(pool.name) as host,
        create_vram_weights(manifest, backend=backend) as vram,
    ):
        staging = vram.attach_host(host)
        fill_host(pool, 1)
        while vram.active_version < 1:
            vram.refresh()
        vram.bind(model)
        threads = [threading.Thread(target=reader, args=(m,)) for m in reads]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        try:
            for v in range(2, versions + 1):
                marks = dict(pins)
                until = time.monotonic() + 10
                while any(pins[m] <= marks[m] for m in pins) and time.monotonic() < until:
                    time.sleep(0.001)  # every reader pins each version at least once
                fill_host(pool, v)
                deadline = time.monotonic() + 30
                while vram.active_version < v:
                    vram.refresh()
                    if time.monotonic() > deadline:
                        raise AssertionError(f"version {v} never became active")
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        wall = time.perf_counter() - t0
        stats = vram.statistics()
    if errors:
        raise AssertionError(f"{len(errors)} mixed reads, e.g. {errors[:3]}")
    for mode, versions_seen in seen.items():
        if len(versions_seen) < 3:
            raise AssertionError(f"reader {mode} saw only versions {sorted(versions_seen)}")
    return {
        "versions": versions,
        "bytes": manifest.nbytes,
        "host_path": staging.path,
        "reads": reads,
        "versions_seen": {k: len(v) for k, v in seen.items()},
        "flips": stats.flips,
        "stage_wait_s": stats.stage_wait_s,
        "drain_wait_s": stats.drain_wait_s,
        "wall_s": wall,
    }


CHILD_USAGE = "gpu_check.py --child: reads commands on stdin"


def child_main() -> int:
    """The IPC reader process: commands on stdin, one answer line each."""
    import torch

    from dvla_bus.vram import CudaBackend, IpcHandle, attach_vram

    reader = attach_vram(bytes.fromhex(sys.stdin.readline().strip()))
    print("attached", reader.active_version, flush=True)
    pin = None
    for line in sys.stdin:
        cmd, *arg = line.split()
        if cmd == "pin":
            pin = reader.pin(timeout=30)
            vals = {float(x) for t in pin.tensors.values() for x in torch.aminmax(t)}
            print("pinned", pin.version, sorted(vals), flush=True)
        elif cmd == "release" and pin is not None:
            pin.release()
            print("released", flush=True)
        elif cmd == "wait":
            print("version", reader.wait_version(int(arg[0]), 30), flush=True)
        elif cmd == "write":
            import msgspec

            handle = msgspec.msgpack.decode(bytes.fromhex(arg[0]), type=IpcHandle)
            scratch = CudaBackend.for_device(handle.device).ipc_import(handle)
            scratch.fill_(42)
            torch.cuda.synchronize()
            print("wrote", int(scratch.numel()), flush=True)
            del scratch
    reader.close()
    return 0


class _Child:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float = 60.0) -> str:
        assert self.proc.stdout is not None
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()))  # type: ignore[union-attr]
        t.start()
        t.join(timeout)
        if not box or not box[0]:
            raise AssertionError(f"IPC child said nothing within {timeout}s")
        return box[0].strip()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def check_ipc(run: str) -> dict[str, Any]:
    import msgspec
    import torch

    from dvla_bus.errors import DeadlineExceeded
    from dvla_bus.vram import CudaBackend, create_vram_weights
    from dvla_bus.weights import Manifest

    manifest = Manifest.from_specs(
        [("a", "float32", (2048, 2048)), ("b", "bfloat16", (4096, 1024)), ("c", "int32", (999,))]
    )
    backend = CudaBackend()

    def version(v: int) -> dict[str, torch.Tensor]:
        from dvla_bus.vram import torch_dtype

        return {
            t.name: torch.full(t.shape, v, dtype=torch_dtype(t.dtype), device="cuda")
            for t in manifest.tensors
        }

    out: dict[str, Any] = {}
    with create_vram_weights(manifest, backend=backend, run=run, node="gpucheck") as vram:
        vram.load(1, version(1))
        export = vram.export().encode()
        out["export_bytes"] = len(export)
        child = _Child()
        try:
            t0 = time.perf_counter()
            child.send(export.hex())
            line = child.read()
            out["attach_s"] = time.perf_counter() - t0
            assert line == "attached 1", line
            assert vram.readers() == [child.proc.pid], vram.readers()
            child.send("pin")
            assert child.read() == "pinned 1 [1.0]"
            vram.load(2, version(2))
            try:
                vram.stage(3, version(3), timeout=0.2)
            except DeadlineExceeded as exc:
                assert str(child.proc.pid) in str(exc), exc
                out["blocked_by_reader"] = True
            else:
                raise AssertionError("staging did not wait for the reader's pin")
            child.send("release")
            assert child.read() == "released"
            vram.load(3, version(3), timeout=5)
            child.send("wait 3")
            assert child.read() == "version 3"
            child.send("pin")
            assert child.read() == "pinned 3 [3.0]"
            child.send("release")
            assert child.read() == "released"
            scratch = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda")
            torch.cuda.synchronize()
            handle = msgspec.msgpack.encode(backend.ipc_export(scratch)).hex()
            child.send(f"write {handle}")
            assert child.read() == f"wrote {1 << 20}"
            got = (int(scratch.min()), int(scratch.max()))
            assert got == (42, 42), f"owner sees {got} after the reader's write"
            out["write_visible"] = True
        finally:
            child.close()
        out["child_exit"] = child.proc.returncode
        assert child.proc.returncode == 0, f"child exited {child.proc.returncode}"
        assert vram.readers() == []
    return out


REPLICA_NODE = "inference.g.1"
OWNER_NODE = "inference.g.0"


def replica_child_main(endpoint: str, spec: str) -> int:
    """The replica process (``--replica-child ENDPOINT SPEC``): joins the control hub, follows
    :data:`OWNER_NODE`'s advertised slots with a :class:`~dvla_bus.vram.VramFollower`; one
    command per stdin line, one answer line each (``attached SEGMENT``, ``read V VALUES``,
    ``detached WHY``)."""
    import asyncio

    return asyncio.run(_replica_child(endpoint, spec))


async def _replica_child(endpoint: str, spec: str) -> int:
    import asyncio

    import torch
    from torch import nn

    from dvla_bus import wire
    from dvla_bus.control import JoinInfo, open_control_client
    from dvla_bus.vram import VramFollower, VramReader, backend_from_spec

    # On a GPU the follower maps each export on the export's own GPU (by UUID).
    backend = None if spec in ("auto", "cuda") else backend_from_spec(spec)
    follower = VramFollower(OWNER_NODE, backend=backend, host="g")

    def on_message(msg: wire.Message) -> None:
        if isinstance(msg, wire.Members):
            follower.follow_members(msg.members)
        elif isinstance(msg, wire.NodeDead):
            follower.owner_gone(msg.node)

    loop = asyncio.get_running_loop()
    join = JoinInfo(node=REPLICA_NODE, role="inference", host="g", index=1)
    module: nn.Module | None = None
    bound: VramReader | None = None

    async def until(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = check()
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"replica: no {what} within {timeout}s ({follower.why})")
            await asyncio.sleep(0.002)

    def read(at_least: int) -> str:
        nonlocal module, bound
        reader = follower.maintain()
        if reader is None or reader.active_version < at_least:
            return ""
        if bound is not reader:  # a new attachment: bind the module to its slots
            (spec_,) = reader.manifest.tensors
            module = nn.Module()
            meta = torch.empty(spec_.shape, device="meta")
            module.register_parameter(spec_.name, nn.Parameter(meta, requires_grad=False))
            reader.bind(module)
            bound = reader
        assert module is not None
        with reader.pin(timeout=30) as pin, torch.no_grad():
            (param,) = module.parameters()  # re-pointed at the pinned slot by the pin
            vals = sorted({float(x) for x in torch.aminmax(param)})
            return f"read {pin.version} {vals}"

    async with open_control_client(
        endpoint, join, heartbeat_interval=0.2, heartbeat_timeout=3.0, on_message=on_message
    ):
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            cmd, *arg = line.split() or ["quit"]
            if cmd == "quit":
                break
            if cmd == "attached":  # attached to slots other than arg (if any)
                old = arg[0] if arg else ""

                def attached(old: str = old) -> str:
                    r = follower.maintain()
                    return r.export.segment if r is not None and r.export.segment != old else ""

                print("attached", await until("attachment", attached), flush=True)
            elif cmd == "read":
                want = int(arg[0])

                def version(want: int = want) -> str:
                    return read(want)

                print(await until(f"version {want}", version), flush=True)
            elif cmd == "detached":
                await until("detach", lambda: follower.maintain() is None)
                bound = module = None  # drop the last views of the old slots
                print("detached", follower.why, flush=True)
    follower.close()
    return 0


def check_replica(run: str, spec: str, mib: int) -> dict[str, Any]:
    import asyncio

    return asyncio.run(_check_replica(run, spec, mib))


async def _check_replica(run: str, spec: str, mib: int) -> dict[str, Any]:
    import asyncio
    import tempfile

    from dvla_bus.control import HubConfig, JoinInfo, open_control_client, open_control_hub
    from dvla_bus.vram import backend_from_spec, create_vram_weights, node_component
    from dvla_bus.weights import Manifest, attach_weights, create_weight_pool

    backend = backend_from_spec(spec)
    manifest = Manifest.from_specs([("flat", "float32", ((mib << 20) // 4,))])
    out: dict[str, Any] = {"backend": spec, "bytes": manifest.nbytes}
    tmp = tempfile.mkdtemp(prefix="dvla-gc-", dir="/tmp")
    endpoint = f"ipc://{tmp}/c.sock"
    beat, silence = 0.2, 3.0  # heartbeat interval and timeout, seconds
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--replica-child",
        endpoint,
        spec,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )

    async def ask(line: str, timeout: float = 90.0) -> str:
        assert child.stdin is not None
        assert child.stdout is not None
        child.stdin.write(line.encode() + b"\n")
        await child.stdin.drain()
        answer = await asyncio.wait_for(child.stdout.readline(), timeout)
        if not answer:
            raise AssertionError(f"replica exited {await child.wait()} after {line!r}")
        return answer.decode().strip()

    def load(vram: Any, version: int, pool: Any) -> None:
        fill_host(pool, version)
        deadline = time.monotonic() + 30
        while vram.active_version < version:  # stage from the pinned host pool, then flip
            vram.refresh()
            if time.monotonic() > deadline:
                raise AssertionError(f"version {version} never became active")

    try:
        async with open_control_hub(HubConfig(endpoint, beat, silence)):
            with (
                create_weight_pool(
                    run, "rhost", manifest, chunk_bytes=64 << 20, checksum="none"
                ) as pool,
                attach_weights(pool.name) as host,
            ):
                segments = []
                for incarnation, first in ((1, 1), (2, 3)):
                    # A restarted owner is another process; here the same one makes new
                    # slots under another segment name.
                    with create_vram_weights(
                        manifest,
                        backend=backend,
                        run=run,
                        node=node_component(OWNER_NODE),
                        name=f"vram{incarnation}",
                    ) as vram:
                        vram.attach_host(host)
                        load(vram, first, pool)
                        segments.append(vram.segment)
                        join = JoinInfo(
                            node=OWNER_NODE,
                            role="inference",
                            host="g",
                            index=0,
                            endpoints={"vram": vram.segment},
                        )
                        async with open_control_client(
                            endpoint, join, heartbeat_interval=beat, heartbeat_timeout=silence
                        ):
                            t0 = time.perf_counter()
                            got = await ask(f"attached {segments[0] if incarnation > 1 else ''}")
                            out[f"attach_s.{incarnation}"] = round(time.perf_counter() - t0, 3)
                            if got != f"attached {vram.segment}":
                                raise AssertionError(f"replica: {got!r}, owner: {vram.segment}")
                            got = await ask(f"read {first}")
                            if got != f"read {first} [{float(first)}]":
                                raise AssertionError(f"replica read {got!r}, expected {first}")
                            if vram.readers() != [child.pid]:
                                raise AssertionError(f"owner's readers: {vram.readers()}")
                            load(vram, first + 1, pool)  # the owner flips; the replica sees it
                            got = await ask(f"read {first + 1}")
                            if got != f"read {first + 1} [{float(first + 1)}]":
                                raise AssertionError(f"replica read {got!r} after the flip")
                            out[f"versions.{incarnation}"] = [first, first + 1]
                            t0 = time.perf_counter()
                        # Left: the hub's node_dead reaches the replica, which detaches.
                        got = await ask("detached")
                        if not got.startswith("detached"):
                            raise AssertionError(f"replica: {got!r}")
                        deadline = time.monotonic() + 10
                        while vram.readers() and time.monotonic() < deadline:
                            await asyncio.sleep(0.002)
                        if vram.readers():
                            raise AssertionError(f"still attached: {vram.readers()}")
                        out[f"detach_s.{incarnation}"] = round(time.perf_counter() - t0, 3)
                        out[f"detach_why.{incarnation}"] = got.split(" ", 1)[1]
            if child.stdin is not None:  # the replica's cue to leave, while the hub listens
                child.stdin.close()
                await asyncio.wait_for(child.wait(), 30)
    finally:
        if child.returncode is None and child.stdin is not None:
            child.stdin.close()
            try:
                await asyncio.wait_for(child.wait(), 30)
            except TimeoutError:
                child.kill()
                await child.wait()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        close = getattr(backend, "close", None)
        if callable(close):  # a test backend that owns segments
            close()
    out["replica_exit"] = child.returncode
    if child.returncode != 0:
        raise AssertionError(f"replica exited {child.returncode}")
    return out


def check_slab_no_alloc(dev: Dev) -> dict[str, Any]:
    import torch

    from dvla_bus.pool import Layout
    from dvla_bus.vram import VramSlabPool

    cycles, rows = (40, 16) if dev.smoke else (1000, 256)
    layout = Layout.pack(
        [
            ("obs", "uint8", (rows, 3, 128, 128)),
            ("act", "float32", (rows, 7)),
            ("h", "V2", (rows, 64)),
        ]
    )
    count = dev.allocations

    with VramSlabPool(9, layout.nbytes, backend=dev.backend) as pool:
        held = []

        def cycle(i: int) -> None:
            slab = pool.acquire(timeout=10)
            n = 1 + (i * 37) % rows
            for t in slab.view(layout).values():
                t[:n].fill_(i % 7)
            held.append(slab)
            if len(held) > 8:
                held.pop(0).release()

        for i in range(50):  # warm the view caches
            cycle(i)
        before = count()
        for i in range(cycles):
            cycle(i)
        pooled = count() - before
        keep = []
        before = count()
        for i in range(100):
            n = 1 + (i * 37) % rows
            keep.append(torch.empty((n, 3, 128, 128), dtype=torch.uint8, device=dev.device))
            if len(keep) > 8:
                keep.pop(0)
        naive = count() - before
        for s in held:
            s.release()
    if dev.smoke:
        return {"pooled_allocations": "not tracked on the CPU"}
    if pooled != 0:
        raise AssertionError(f"{pooled} allocations in {cycles} slab cycles")
    if naive == 0:
        raise AssertionError("the allocation counter did not see torch.empty")
    return {"pooled_allocations": pooled, "naive_allocations_100": naive}


def synthetic_episodes(seed: int, lengths: list[int], image: int, bins: int) -> Any:
    """The learner's input without simulators (:func:`dvla_nodes.learn.rollout.synthetic_episodes`,
    groups of 4)."""
    from dvla_nodes.learn.rollout import synthetic_episodes as make

    return make(seed, lengths, image=image, bins=bins)


def check_learner(dev: Dev) -> dict[str, Any]:
    import numpy as np
    import torch

    from dvla_nodes.learn import Learner, TrainConfig
    from dvla_nodes.policy import build_policy

    smoke = dev.smoke
    device = "cpu" if smoke else str(dev.device)
    size, image, bins = ("tiny", 32, 32) if smoke else ("small", 64, 256)
    cfg = TrainConfig(
        seed=3,
        device=device,
        policy_size=size,
        image_size=image,
        bins=bins,
        minibatch=64 if smoke else 512,
        minibatch_bucket=32 if smoke else 64,
        rl_bc_batch=16 if smoke else 128,
        max_version_lag=1 << 30,
    )
    bucket, mb = cfg.minibatch_bucket, cfg.minibatch
    rng = np.random.default_rng(0)

    def batch(seed: int, steps: int) -> Any:
        """Eight episodes (two groups) of ``steps`` steps in all."""
        cuts = np.sort(rng.choice(np.arange(1, steps), 7, replace=False))
        lengths = [int(x) for x in np.diff([0, *cuts, steps])]
        return synthetic_episodes(seed, lengths, image, bins)

    def make(on: str, slabs: bool = True) -> Learner:
        model, tok = build_policy(size, image, bins, cfg.seed)
        return Learner(model, tok, cfg.replace(device=on), slabs=slabs)

    def stat(name: str) -> int:
        if smoke:
            return -1
        torch.cuda.synchronize()
        return int(torch.cuda.memory_stats().get(name, 0))

    out: dict[str, Any] = {"device": device, "policy": size, "image": image}
    demos = synthetic_episodes(99, [10 if smoke else 40] * 8, image, bins)
    if not smoke:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    learner = make(device)
    learner.set_anchor(demos)
    out["parameters"] = learner.layout.num_params
    # Warm-up: one batch per padded minibatch shape (a single minibatch of about k buckets),
    # then batches of several minibatches; after that, reserved memory must stay put.
    warm = [k * bucket - bucket // 2 for k in range(1, mb // bucket + 1)] + [2 * mb, 3 * mb]
    steady = [int(x) for x in rng.integers(bucket // 2, 3 * mb, 2 if smoke else 16)]
    reserved: list[int] = []
    seconds: list[float] = []
    steps_seen: list[int] = []
    for i, steps in enumerate(warm + steady):
        eps = batch(i, steps)
        t0 = time.perf_counter()
        up = learner.update(eps)
        seconds.append(time.perf_counter() - t0)
        steps_seen.append(up.steps)
        reserved.append(stat("reserved_bytes.all.current"))
    st = learner.statistics()
    host_a = learner.host_flat()
    host_b = learner.host_flat()
    same_host = host_a.ctypes.data == host_b.ctypes.data
    flat_ok = bool(np.array_equal(host_b, learner.flat.detach().cpu().numpy()))
    learner.close()
    out.update(
        updates=len(reserved),
        steps_per_update=[min(steps_seen), max(steps_seen)],
        update_ms_median=round(1e3 * sorted(seconds[len(warm) :])[len(steady) // 2], 2),
        staging=st.staging,
        slab_rows=st.slab_rows,
        slab_mib=round(st.slab_bytes / 2**20, 2),
        slab_acquires=st.acquires,
        slab_fallbacks=st.fallbacks,
        slab_allocations=st.allocations,
        host_flat_reused=same_host,
    )
    if not flat_ok:
        raise AssertionError("host_flat() differs from the device's flat buffer")
    if st.fallbacks or st.allocations != 1 or st.backpressure:
        raise AssertionError(f"slabs: {st}")
    if not smoke:
        growth = reserved[-1] - reserved[len(warm) - 1]
        out.update(
            max_memory_reserved_mib=round(torch.cuda.max_memory_reserved() / 2**20, 1),
            max_memory_allocated_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1),
            reserved_mib_per_update=[round(r / 2**20, 1) for r in reserved],
            reserved_growth_after_warmup_bytes=growth,
            reserved_stable=growth == 0,
        )
        if st.staging != "pinned":
            raise AssertionError(f"minibatch staging is {st.staging}")
        if not same_host:
            raise AssertionError("host_flat() allocated a new host buffer")
        if growth > (2 << 20) + reserved[len(warm) - 1] // 50:
            raise AssertionError(f"reserved grew by {growth} B after the warm-up")
    # One update from the same weights on the CPU and on the device (on the CPU smoke run:
    # the ordinary path against the slabs), full float32 precision on the GPU.
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        eps = batch(1000, 100 if smoke else 700)
        results = []
        for on, slabs in (("cpu", not smoke), (device, True)):
            lrn = make(on, slabs)
            lrn.set_anchor(demos)
            start = lrn.flat.detach().cpu().clone()
            rows = np.arange(min(64, eps.num_steps))
            with torch.no_grad():
                logits = lrn.model(*lrn._tensors(eps, rows)).cpu()
            up = lrn.update(eps)
            results.append((start, logits, up.loss, lrn.flat.detach().cpu().clone()))
            lrn.close()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    (start, logits_a, loss_a, flat_a), (start_b, logits_b, loss_b, flat_b) = results
    if not torch.equal(start, start_b):
        raise AssertionError("the two learners started from different weights")
    moved = float((flat_a - start).abs().mean())
    diff = (flat_a - flat_b).abs()
    out.update(
        logits_max_abs_diff=float((logits_a - logits_b).abs().max()),
        loss_cpu=loss_a,
        loss_device=loss_b,
        params_mean_abs_diff_over_mean_step=float(diff.mean()) / moved,
        params_max_abs_diff=float(diff.max()),
        lr=cfg.lr,
    )
    if out["logits_max_abs_diff"] > 1e-3:
        raise AssertionError(f"logits differ by {out['logits_max_abs_diff']}")
    if abs(loss_a - loss_b) > 1e-3 * max(1.0, abs(loss_a)):
        raise AssertionError(f"loss {loss_a} on the CPU, {loss_b} on {device}")
    # Adam's first step is about lr * sign(gradient): a parameter whose gradient is ~0 may
    # step the other way (2 lr apart); the rest must agree.
    if out["params_mean_abs_diff_over_mean_step"] > 0.05 or diff.max() > 2.5 * cfg.lr:
        raise AssertionError(f"updated parameters differ: {out}")
    return out


def run_bench(dev: Dev, quick: bool, tmp: Path) -> dict[str, Any]:
    from dvla_tools.bench.vram import _main

    out = tmp / "bench_vram.json"
    args = argparse.Namespace(
        json=str(out),
        quick=quick,
        params=None,
        reps=0,
        versions=0,
        steps=0,
        h2d_mib=0,
        cpu_smoke=dev.smoke,
    )
    rc = _main(args)
    doc: dict[str, Any] = json.loads(out.read_text())  # partial results when a case failed
    if rc != 0 and not doc.get("errors"):
        doc["errors"] = [f"bench exited {rc}"]
    return doc


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, quick bench")
    parser.add_argument("--no-bench", action="store_true", help="skip dvla bench vram")
    parser.add_argument("--versions", type=int, default=40, help="slot_flip: versions to load")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--replica-child", nargs=2, help=argparse.SUPPRESS)
    # The backend of the replica check (dvla_bus.vram.backend_from_spec); with --cpu-smoke a
    # fake of the CUDA calls (tests.test_vram:NodeFakeCuda) runs the check without a GPU.
    parser.add_argument("--replica-backend", default="", help=argparse.SUPPRESS)
    # The checks' own code on the CPU, shrunk, without the CUDA-only steps (tests this script).
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main()
    if args.replica_child:
        return replica_child_main(*args.replica_child)
    ok, what = cuda_available()
    if args.cpu_smoke:
        ok, what = True, "cpu (smoke run of the script itself)"
    if not ok:
        print(f"no CUDA device: skipped ({what})")
        write(args.json, {"skipped": True, "ok": True, "reason": what})
        return 0
    import tempfile

    import torch

    run = "gc" + secrets.token_hex(4)
    dev = Dev(args.cpu_smoke)
    small = args.quick or args.cpu_smoke
    report: dict[str, Any] = {
        "skipped": False,
        "smoke": args.cpu_smoke,
        "gpu": what,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "checks": {},
    }
    print(f"GPU checks on {what} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    checks: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("pinned_staging", lambda: check_pinned_staging(dev, run, 8 if small else 1024)),
        ("slot_flip", lambda: check_slot_flip(dev, run, 8 if small else args.versions)),
        ("slab_no_alloc", lambda: check_slab_no_alloc(dev)),
        ("learner", lambda: check_learner(dev)),
    ]
    replica = args.replica_backend or ("" if args.cpu_smoke else "cuda")
    if replica:  # CUDA IPC needs CUDA (or its fake)
        checks.insert(2, ("replica", lambda: check_replica(run, replica, 1 if small else 64)))
    if not args.cpu_smoke:
        checks.insert(2, ("ipc", lambda: check_ipc(run)))
    with tempfile.TemporaryDirectory(prefix="dvla-gpu-") as tmp:
        if not args.no_bench:
            checks.append(("bench", lambda: run_bench(dev, args.quick, Path(tmp))))
        for name, fn in checks:
            t0 = time.perf_counter()
            try:
                result = fn()
                status = "FAIL" if result.get("errors") else "PASS"
            except Exception as exc:
                result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
                status = "FAIL"
            result["status"] = status
            result["seconds"] = round(time.perf_counter() - t0, 2)
            report["checks"][name] = result
            shown = {k: v for k, v in result.items() if k not in ("trace", "cases", "machine")}
            print(f"{status} {name}: {json.dumps(shown, default=str)}", flush=True)
            if "trace" in result:
                print(result["trace"], file=sys.stderr, flush=True)
    report["ok"] = all(c["status"] == "PASS" for c in report["checks"].values())
    write(args.json, report)
    print("all checks passed" if report["ok"] else "SOME CHECKS FAILED")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
