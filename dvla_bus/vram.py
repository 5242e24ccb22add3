"""VRAM pools: the GPU half of the *dual-pool* design.

Four pieces, each usable alone, all device-agnostic (CPU tensors on a machine without CUDA):

* :class:`PinnedStaging` registers a host's shared-memory weight pool (:mod:`dvla_bus.weights`)
  with the CUDA driver (``cudaHostRegister``), so host -> GPU loads run as DMA from page-locked
  memory (measured on an H200: 9.2 GB/s pageable, 55 GB/s registered; MEASURED.md). Chosen
  automatically when the backend is CUDA; on CPU it registers nothing.
* :class:`VramWeights`: two preallocated device slots (active, staging) per model, laid out by
  the pool's :class:`~dvla_bus.weights.Manifest`. A new version is copied into staging on a
  separate stream (:meth:`~VramWeights.stage`; on CPU a plain synchronous copy) while inference
  keeps reading active; the fence (:meth:`~VramWeights.flip`) makes staging active. A bound
  module's parameters (:meth:`~VramWeights.bind`) are views into the active slot and are
  re-pointed at the other slot by a flip: no parameter is ever re-allocated.
* CUDA IPC readers: other processes on the same GPU (inference replicas, an evaluator) map the
  very same slots (:func:`attach_vram`) instead of each loading a copy. The slots' IPC handles
  travel as a :class:`VramExport` (MessagePack, never pickle); version pins work across
  processes exactly as the shared-memory weight pool's do.
* :class:`VramSlabPool`: fixed device slabs for observation/action batches; acquire, fill a
  view, release; nothing is allocated after construction.
* :class:`VramFollower`: a local reader that follows one owner's slots across the owner's death
  and restart (what an inference replica uses): it attaches what the owner advertises on the
  control bus, detaches promptly when the owner dies, and never waits without a deadline.

The boundary
------------
Every call into the device runtime goes through a :class:`DeviceBackend` (allocate a buffer,
streams and events, ``cudaHostRegister``, IPC export/import). :class:`CudaBackend` is the real one
(``torch.cuda`` and ``torch.cuda.cudart()``), :class:`CpuBackend` the fallback;
:func:`default_backend` picks CUDA when it is available. The pools call :meth:`DeviceBackend.empty`
once per buffer at construction and never again, which is what "no allocator churn" means here
(:attr:`DeviceBackend.allocations` counts it; tests inject a backend that fakes the CUDA calls).
:func:`backend_from_spec` turns a configuration string (``auto``, ``cpu``, ``cuda``, ``cuda:N``
or ``package.module:Class``, a class constructed without arguments) into a backend, which is
how a node process is told which one to use.

Pins and streams (readers see version N or N+1, never a mix)
------------------------------------------------------------
In-process readers (threads) :meth:`~VramWeights.pin` the active slot and read it through
:attr:`VramPin.tensors` (``torch.func.functional_call(module, pin.tensors, ...)``) or through a
bound module. Staging only ever reuses the slot that is *not* active, and waits until no pin holds
it. Device work is asynchronous, so a pin's release also records an event on the releasing
thread's current stream; the copy into that slot later waits for the event on the copy stream (so
kernels enqueued under a pin finish before their memory is overwritten, without a host sync). A
flip waits (host side) for the staging copy to finish. With a bound module a flip also re-points
the module's parameters, which must not happen under a forward pass: it then waits until no pin
holds the old active slot (forward passes hold a pin) and keeps new pins out while it re-points
(writer preference; bounded by a deadline).

Cross-process readers use the control segment (below) and the weight pool's pin protocol
(Dekker's mutual exclusion over shared words, pin ownership by an OFD lock that the kernel drops
when a reader dies; see :mod:`dvla_bus.weights`). A cross-process reader cannot hand the owner an
event, so its :meth:`~VramReader.release` waits for its own current stream first. A reader's
bound module (:meth:`VramReader.bind`) is re-pointed by each pin to the slot it pins.

Finding the slots: the owner advertises its control segment's name on the control bus (as a
member endpoint, e.g. ``endpoints["vram"]``, the way the learner advertises its weight pool) or
sends :meth:`VramExport.encode` bytes in a message; :func:`attach_vram` takes either, and
:func:`find_vram` lists the live ones of a run on this machine.

Control segment layout (``/dev/shm/dvla.<run>.<node>.<pid>.<start>.<name>``; shared
:class:`VramWeights` only; little endian)::

    0     u64 magic "DVLAVRM1", u32 layout 1, u32 reserved, u64 slot bytes W, u64 export offset,
          u64 export length, u64 owner pid
    128   four i64: active slot (-1 none), version of slot 0, of slot 1 (-1 empty, -2 being
          written), flip count
    256   MAX_PINS u64 pin words (0 free, else ``(version + 1) << 1 | slot``), then MAX_PINS
          u64 pin-owner pids; a reader owns word i while it holds the OFD write lock on byte
          2**40 + i of the file
    4096  the VramExport (MessagePack)

Lifetime: the owner's slots live until :meth:`VramWeights.close`, which waits (bounded) for
attached readers to detach. torch's CUDA IPC reference counts keep an exported block from being
reused by the owner's caching allocator while an importer still maps it. A reader must detach when
its owner dies (:meth:`VramReader.owner_alive`; the hub's ``node_dead``).

Thread safety: a :class:`VramWeights` has one writer thread (stage/flip/load/bind/close) and any
number of pinning threads. A :class:`VramReader` belongs to one thread, and so does a
:class:`VramFollower` (except :meth:`~VramFollower.follow_members` and
:meth:`~VramFollower.owner_gone`, which any thread may call). :class:`VramSlabPool` is
thread-safe.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import math
import mmap
import os
import re
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Final, Protocol, Self, TypeAlias

import msgspec
import numpy as np
import torch

from dvla_bus import wire
from dvla_bus.errors import ConfigError, DeadlineExceeded, DvlaError, PoolError, ResourceError
from dvla_bus.pool import Layout
from dvla_bus.shm import (
    PAGE_SIZE,
    SHM_DIR,
    OwnerStatus,
    Segment,
    SegmentName,
    attach_segment,
    create_segment,
    owner_status,
    round_up,
)
from dvla_bus.weights import (
    EMPTY,
    MAX_PINS,
    WRITING,
    Manifest,
    PinnedVersion,
    WeightPool,
    WeightReader,
    acquire_pin,
    claim_pin,
    live_pinners,
    memory_fence,
    open_pin_header,
    pin_lock,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "EXPORT_VERSION",
    "CpuBackend",
    "CudaBackend",
    "DeviceBackend",
    "DeviceEvent",
    "IpcHandle",
    "PinnedStaging",
    "VramExport",
    "VramFollower",
    "VramFollowerStatistics",
    "VramPin",
    "VramReader",
    "VramSlab",
    "VramSlabPool",
    "VramSlabStatistics",
    "VramStatistics",
    "VramWeights",
    "attach_vram",
    "backend_from_spec",
    "check_backend_spec",
    "create_vram_weights",
    "default_backend",
    "find_vram",
    "module_manifest",
    "node_component",
    "torch_dtype",
]

log = logging.getLogger(__name__)

EXPORT_VERSION: Final = 1
"""Layout version of :class:`VramExport` and of the control segment."""

_MAGIC: Final = int.from_bytes(b"DVLAVRM1", "little")
_HEADER = struct.Struct("<QIIQQQQ")  # magic, layout, reserved, W, export off, export len, pid
_CTL_OFFSET: Final = 128
_PINS_OFFSET: Final = 256
_PIDS_OFFSET: Final = _PINS_OFFSET + 8 * MAX_PINS
_EXPORT_OFFSET: Final = PAGE_SIZE

# cudaHostRegister flags (cuda_runtime_api.h).
REGISTER_PORTABLE: Final = 0x01
REGISTER_READ_ONLY: Final = 0x08

_TORCH_DTYPES: Final[Mapping[str, torch.dtype]] = MappingProxyType(
    {
        "bool": torch.bool,
        "int8": torch.int8,
        "uint8": torch.uint8,
        "int16": torch.int16,
        "uint16": torch.uint16,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int32": torch.int32,
        "uint32": torch.uint32,
        "float32": torch.float32,
        "int64": torch.int64,
        "uint64": torch.uint64,
        "float64": torch.float64,
        "complex64": torch.complex64,
        "complex128": torch.complex128,
    }
)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a manifest dtype name (``float32``, ``bfloat16``, ...) or a numpy
    dtype string of a :class:`~dvla_bus.pool.Layout` field (``<f4``; ``V2`` is bfloat16)."""
    found = _TORCH_DTYPES.get(name)
    if found is not None:
        return found
    try:
        dt = np.dtype(name)
    except TypeError:
        raise ConfigError(f"dtype {name!r} is not a numpy or torch dtype name") from None
    if dt.kind == "V" and dt.itemsize == 2:
        return torch.bfloat16
    found = _TORCH_DTYPES.get(dt.name)
    if found is None:
        raise ConfigError(f"dtype {name!r} has no torch equivalent")
    return found


def module_manifest(module: nn.Module, *, buffers: bool = False) -> Manifest:
    """The flat layout of ``module``'s parameters (and, with ``buffers``, its buffers), in
    ``named_parameters`` order: what :meth:`VramWeights.bind` expects."""
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters())
    if buffers:
        tensors.update(module.named_buffers())
    if not tensors:
        raise ConfigError("module_manifest: the module has no parameters")
    return Manifest.from_arrays(tensors)


# --- the boundary --------------------------------------------------------------------------------


class DeviceEvent(Protocol):
    """A point in a device stream (``torch.cuda.Event``; on CPU always complete)."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class DeviceBackend(Protocol):
    """Every device-runtime call the pools make. Implementations: :class:`CudaBackend`,
    :class:`CpuBackend` (and, in tests, fakes of the CUDA calls). Streams are opaque objects
    (``None``: the calling thread's current stream)."""

    @property
    def kind(self) -> str:
        """``"cuda"`` or ``"cpu"``: what handles and registrations this backend speaks."""
        ...

    @property
    def device(self) -> torch.device: ...

    @property
    def allocations(self) -> int:
        """Buffers :meth:`empty` has allocated so far (the pools' only allocations)."""
        ...

    def device_id(self) -> str:
        """A stable identity of the device across processes (the GPU's UUID)."""
        ...

    def empty(self, nbytes: int) -> torch.Tensor:
        """A new 1-D uint8 buffer of ``nbytes`` on the device."""
        ...

    def new_stream(self) -> Any: ...

    def stream_id(self) -> int:
        """An identity of the calling thread's current stream."""
        ...

    def new_event(self) -> DeviceEvent: ...

    def record(self, event: DeviceEvent, stream: Any = None) -> None:
        """Record ``event`` on ``stream`` (``None``: the current stream)."""
        ...

    def wait(self, event: DeviceEvent, stream: Any = None) -> None:
        """Make ``stream`` (``None``: the current one) wait for ``event``; the host does not
        wait."""
        ...

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        """Enqueue ``dst.copy_(src)`` on ``stream`` (asynchronous where the device allows)."""
        ...

    def host_register(self, address: int, nbytes: int, *, read_only: bool) -> None:
        """Page-lock ``nbytes`` of host memory at ``address`` for DMA (``cudaHostRegister``);
        :class:`~dvla_bus.errors.ResourceError` if the driver refuses."""
        ...

    def host_unregister(self, address: int) -> None: ...

    def ipc_export(self, buffer: torch.Tensor) -> IpcHandle:
        """A handle another process on the same device can map ``buffer`` with."""
        ...

    def ipc_import(self, handle: IpcHandle) -> torch.Tensor:
        """The buffer behind ``handle`` (1-D uint8, ``handle.nbytes`` long), mapped here."""
        ...


@dataclass(slots=True)
class _DoneEvent:
    """CPU work is synchronous: every event is complete when it is recorded."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


class CpuBackend:
    """The CPU fallback: plain tensors, synchronous copies, nothing to register. CUDA IPC does
    not exist here: processes on one CPU host share weights through the host weight pool."""

    kind = "cpu"

    def __init__(self) -> None:
        self._allocations = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def allocations(self) -> int:
        return self._allocations

    def device_id(self) -> str:
        return "cpu"

    def empty(self, nbytes: int) -> torch.Tensor:
        self._allocations += 1
        return torch.zeros(nbytes, dtype=torch.uint8)

    def new_stream(self) -> Any:
        return None

    def stream_id(self) -> int:
        return 0

    def new_event(self) -> DeviceEvent:
        return _DoneEvent()

    def record(self, event: DeviceEvent, stream: Any = None) -> None:
        return None

    def wait(self, event: DeviceEvent, stream: Any = None) -> None:
        return None

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        dst.copy_(src)

    def host_register(self, address: int, nbytes: int, *, read_only: bool) -> None:
        raise ResourceError("no CUDA device: host memory cannot be registered on a CPU backend")

    def host_unregister(self, address: int) -> None:
        return None

    def ipc_export(self, buffer: torch.Tensor) -> IpcHandle:
        raise ResourceError(
            "no CUDA device: CUDA IPC needs one (on a CPU host, readers attach the host weight "
            "pool with dvla_bus.weights.attach_weights)"
        )

    def ipc_import(self, handle: IpcHandle) -> torch.Tensor:
        raise ResourceError(f"no CUDA device: cannot map a {handle.kind!r} IPC handle here")


def _cudart() -> Any:
    """``torch.cuda.cudart()`` (untyped in torch)."""
    return getattr(torch.cuda, "cudart")()  # noqa: B009 - keep mypy off the untyped call


def _clear_cuda_error() -> None:
    """Reset the runtime's sticky last-error after a failed runtime call we handled, so a later
    kernel-launch check in torch does not report it as its own. torch binds no
    ``cudaGetLastError``: call it in the libcudart this process has loaded (best effort)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line}
    except OSError:
        return
    for path in paths:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(path).cudaGetLastError()
            return


class CudaBackend:
    """The real backend: ``torch.cuda`` for buffers, streams, events and IPC (torch's own CUDA
    storage sharing, as ``torch.multiprocessing`` does it); ``torch.cuda.cudart()`` for
    ``cudaHostRegister``. ``index`` picks the device (default: the current one)."""

    kind = "cuda"

    def __init__(self, index: int | None = None) -> None:
        if not torch.cuda.is_available():
            raise ResourceError("no CUDA device: torch.cuda.is_available() is False")
        self._index = torch.cuda.current_device() if index is None else int(index)
        self._device = torch.device("cuda", self._index)
        self._allocations = 0

    @classmethod
    def for_device(cls, device_id: str) -> CudaBackend:
        """The backend of the visible GPU whose UUID is ``device_id`` (what a reader uses to
        map an owner's slots whatever its ``CUDA_VISIBLE_DEVICES`` numbering)."""
        if not torch.cuda.is_available():
            raise ResourceError("no CUDA device: torch.cuda.is_available() is False")
        for i in range(torch.cuda.device_count()):
            if str(torch.cuda.get_device_properties(i).uuid) == device_id:
                return cls(i)
        raise ResourceError(
            f"GPU {device_id} is not visible to this process (check CUDA_VISIBLE_DEVICES)"
        )

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def allocations(self) -> int:
        return self._allocations

    def device_id(self) -> str:
        return str(torch.cuda.get_device_properties(self._index).uuid)

    def empty(self, nbytes: int) -> torch.Tensor:
        self._allocations += 1
        return torch.empty(nbytes, dtype=torch.uint8, device=self._device)

    def new_stream(self) -> Any:
        stream: Any = torch.cuda.Stream  # untyped constructor in torch
        return stream(device=self._device)

    def stream_id(self) -> int:
        return int(torch.cuda.current_stream(self._device).cuda_stream)

    def new_event(self) -> DeviceEvent:
        event: Any = torch.cuda.Event  # untyped constructor in torch
        return event()  # type: ignore[no-any-return]

    def record(self, event: DeviceEvent, stream: Any = None) -> None:
        assert isinstance(event, torch.cuda.Event)
        event.record(stream if stream is not None else torch.cuda.current_stream(self._device))

    def wait(self, event: DeviceEvent, stream: Any = None) -> None:
        assert isinstance(event, torch.cuda.Event)
        target = stream if stream is not None else torch.cuda.current_stream(self._device)
        target.wait_event(event)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def host_register(self, address: int, nbytes: int, *, read_only: bool) -> None:
        cudart = _cudart()
        flags = REGISTER_PORTABLE | (REGISTER_READ_ONLY if read_only else 0)
        result = cudart.cudaHostRegister(address, nbytes, flags)
        if int(result) != 0:
            try:
                why = str(cudart.cudaGetErrorString(result))
            except Exception:  # the binding's signature varies across torch versions
                why = "?"
            _clear_cuda_error()
            raise ResourceError(
                f"cudaHostRegister of {nbytes} B at {address:#x} (flags {flags:#x}) failed: "
                f"error {int(result)} {why}"
            )

    def host_unregister(self, address: int) -> None:
        result = _cudart().cudaHostUnregister(address)
        if int(result) != 0:
            _clear_cuda_error()
            log.warning("cudaHostUnregister at %#x failed: error %d", address, int(result))

    def ipc_export(self, buffer: torch.Tensor) -> IpcHandle:
        storage = buffer.untyped_storage()
        share = getattr(storage, "_share_cuda_")  # noqa: B009 - private torch API, untyped
        (
            _device,
            handle,
            storage_bytes,
            storage_offset,
            ref_counter,
            ref_counter_offset,
            event,
            event_sync,
        ) = share()
        return IpcHandle(
            kind="cuda",
            device=self.device_id(),
            handle=bytes(handle),
            storage_bytes=int(storage_bytes),
            storage_offset=int(storage_offset),
            ref_counter=bytes(ref_counter),
            ref_counter_offset=int(ref_counter_offset),
            event=bytes(event or b""),
            event_sync=bool(event_sync),
            offset=int(buffer.storage_offset()) * buffer.element_size(),
            nbytes=int(buffer.numel()) * buffer.element_size(),
        )

    def ipc_import(self, handle: IpcHandle) -> torch.Tensor:
        if handle.kind != "cuda":
            raise ResourceError(f"cannot map a {handle.kind!r} IPC handle on a CUDA backend")
        if handle.device != self.device_id():
            raise ResourceError(
                f"IPC handle is for GPU {handle.device}, this backend drives {self.device_id()}"
            )
        from torch.multiprocessing import reductions

        # Exactly what torch.multiprocessing does on receipt of a CUDA tensor (it also caches
        # the mapping per handle: CUDA lets a process open a handle only once).
        rebuild = getattr(reductions, "rebuild_cuda_tensor")  # noqa: B009 - untyped in torch
        tensor: torch.Tensor = rebuild(
            torch.Tensor,
            (handle.nbytes,),
            (1,),
            handle.offset,
            torch.storage.TypedStorage,
            torch.uint8,
            self._index,
            handle.handle,
            handle.storage_bytes,
            handle.storage_offset,
            False,
            handle.ref_counter,
            handle.ref_counter_offset,
            handle.event,
            handle.event_sync,
        )
        return tensor


def default_backend() -> DeviceBackend:
    """:class:`CudaBackend` (current device) when CUDA is available, else :class:`CpuBackend`."""
    if torch.cuda.is_available():
        return CudaBackend()
    return CpuBackend()


_SPEC_RE: Final = re.compile(
    r"(?P<plain>auto|cpu|cuda)(?::(?P<index>[0-9]{1,3}))?"
    r"|(?P<module>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*):(?P<attr>[A-Za-z_][A-Za-z0-9_]*)"
)
_BACKEND_ATTRS: Final = ("kind", "device", "allocations", "device_id", "empty", "ipc_export")


def check_backend_spec(spec: object) -> str:
    """Check the form of a backend spec without importing anything (see
    :func:`backend_from_spec`); returns it, or raises :class:`~dvla_bus.errors.ConfigError`."""
    m = _SPEC_RE.fullmatch(spec) if isinstance(spec, str) else None
    if m is None or (m["index"] is not None and m["plain"] != "cuda"):
        raise ConfigError(
            f"device backend {spec!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or "
            "'package.module:Class'"
        )
    return str(spec)


def backend_from_spec(spec: str) -> DeviceBackend:
    """The backend a configuration string names: ``auto`` (:func:`default_backend`), ``cpu``,
    ``cuda`` (the current device), ``cuda:N`` (device N), or ``package.module:Class``: a
    :class:`DeviceBackend` class importable in this process, constructed without arguments
    (another device runtime; tests name one that fakes the CUDA calls). Raises
    :class:`~dvla_bus.errors.ConfigError` for a malformed spec or a class that cannot be
    imported or is not a backend, :class:`~dvla_bus.errors.ResourceError` for ``cuda`` without
    a CUDA device."""
    m = _SPEC_RE.fullmatch(check_backend_spec(spec))
    assert m is not None
    if m["plain"] == "auto":
        return default_backend()
    if m["plain"] == "cpu":
        return CpuBackend()
    if m["plain"] == "cuda":
        return CudaBackend(None if m["index"] is None else int(m["index"]))
    try:
        factory = getattr(importlib.import_module(m["module"]), m["attr"])
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"device backend {spec!r}: cannot import it: {exc}") from None
    if not callable(factory):
        raise ConfigError(f"device backend {spec!r}: not a class")
    backend = factory()
    missing = [a for a in _BACKEND_ATTRS if not hasattr(backend, a)]
    if missing or getattr(backend, "kind", None) not in ("cpu", "cuda"):
        raise ConfigError(
            f"device backend {spec!r}: not a DeviceBackend (missing {missing}, kind "
            f"{getattr(backend, 'kind', None)!r})"
        )
    return backend  # type: ignore[no-any-return]


def node_component(node: str) -> str:
    """The segment-name component for node name ``node`` (``inference.h0.1`` ->
    ``inference-h0-1``): what a node passes as ``create_vram_weights(node=...)``, and what
    :class:`VramFollower` looks for when it scans this machine for an owner's slots."""
    safe = "".join(c if c.isalnum() or c in "_-" else "-" for c in node).lstrip("_-")
    return (safe or "node")[:64]


# --- what travels --------------------------------------------------------------------------------

_Bytes = Annotated[bytes, msgspec.Meta(max_length=4096)]
_Text = Annotated[str, msgspec.Meta(max_length=256)]
_NonNeg = Annotated[int, msgspec.Meta(ge=0)]


class IpcHandle(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """How another process maps one device buffer: the CUDA allocation's IPC handle, where the
    buffer lies in it, torch's IPC reference counter and event. MessagePack array
    ``[kind, device, handle, storage_bytes, storage_offset, ref_counter, ref_counter_offset,
    event, event_sync, offset, nbytes]``."""

    kind: _Text
    device: _Text
    handle: _Bytes
    storage_bytes: _NonNeg
    storage_offset: _NonNeg
    ref_counter: _Bytes
    ref_counter_offset: _NonNeg
    event: _Bytes
    event_sync: bool
    offset: _NonNeg
    """The buffer's first byte within the storage."""
    nbytes: _NonNeg


class VramExport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything a local reader needs to map an owner's two VRAM weight slots: the control
    segment (pins, active slot), the device, the owner's pid, the manifest (MessagePack, as in
    :meth:`~dvla_bus.weights.Manifest.encode`) and one :class:`IpcHandle` per slot. Encoded as a
    MessagePack map (:meth:`encode`); small enough for a control message (a few hundred bytes
    plus the manifest)."""

    layout: int
    segment: _Text
    kind: _Text
    device: _Text
    owner_pid: _NonNeg
    nbytes: _NonNeg
    manifest: bytes
    slots: tuple[IpcHandle, IpcHandle]

    def encode(self) -> bytes:
        return msgspec.msgpack.encode(self)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> VramExport:
        """Validate and decode; :class:`~dvla_bus.errors.PoolError` (with the bad field's path)
        on anything malformed."""
        try:
            export = msgspec.msgpack.decode(data, type=cls)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise PoolError(f"VRAM export is malformed: {exc}") from None
        if export.layout != EXPORT_VERSION:
            raise PoolError(f"VRAM export layout {export.layout}, this code reads {EXPORT_VERSION}")
        return export


# --- pinned staging ------------------------------------------------------------------------------


class PinnedStaging:
    """A host weight pool's two slots, page-locked for DMA (``cudaHostRegister``).

    ``enable=None`` registers when the backend is CUDA. A writer's mapping is registered as it
    is; a reader's mapping is read-only, so it is registered with ``cudaHostRegisterReadOnly``
    and, where the driver refuses that, through a private writable mapping of the same segment
    (only ever read). If registration fails the loads stay pageable (:attr:`path` and
    :attr:`reason` say why, and a warning is logged). :meth:`host_bytes` is what to copy from.
    Close it (or the :class:`VramWeights` that made it) before the pool."""

    def __init__(
        self,
        pool: WeightPool | WeightReader,
        backend: DeviceBackend,
        *,
        enable: bool | None = None,
    ) -> None:
        self.pool = pool
        self.backend = backend
        geo = pool.geometry
        self.nbytes = geo.stride + geo.nbytes  # slot 0's start to slot 1's end, one range
        self.path = "pageable"
        self.reason = ""
        self.register_s = 0.0
        self._alias: Segment | None = None
        self._address = 0
        base = pool.raw(0)
        if pool.raw(1).ctypes.data != base.ctypes.data + geo.stride:
            raise PoolError(f"weight pool {pool.name}: slots are not one contiguous range")
        self._hosts: list[np.ndarray[Any, np.dtype[np.uint8]]] = [pool.raw(0), pool.raw(1)]
        if enable is False:
            self.reason = "registration disabled"
        elif backend.kind != "cuda":
            self.reason = f"no CUDA device ({backend.kind} backend)"
        else:
            self._register(isinstance(pool, WeightReader))
        with warnings.catch_warnings():
            # torch warns that it cannot mark a read-only numpy view read-only itself.
            warnings.simplefilter("ignore", UserWarning)
            self._tensors = [torch.from_numpy(h) for h in self._hosts]

    def _register(self, read_only: bool) -> None:
        base = self._hosts[0]
        t0 = time.perf_counter()
        try:
            self.backend.host_register(base.ctypes.data, self.nbytes, read_only=read_only)
            self._address = base.ctypes.data
            self.path = "pinned-read-only" if read_only else "pinned"
        except ResourceError as exc:
            if not read_only:
                self.reason = str(exc)
            else:
                self._register_alias(exc)
        self.register_s = time.perf_counter() - t0
        if not self._address:
            log.warning(
                "weight pool %s stays pageable for host->GPU loads: %s", self.pool.name, self.reason
            )

    def _register_alias(self, first: ResourceError) -> None:
        geo = self.pool.geometry
        try:
            alias = attach_segment(self.pool.name, writable=True)
        except ResourceError as exc:
            self.reason = f"{first}; no writable alias: {exc}"
            return
        span = alias.ndarray(np.uint8, (self.nbytes,), geo.data)
        try:
            self.backend.host_register(span.ctypes.data, self.nbytes, read_only=False)
        except ResourceError as exc:
            del span
            alias.close()
            self.reason = f"{first}; writable alias: {exc}"
            return
        self._alias = alias
        self._address = span.ctypes.data
        self._hosts = [span[: geo.nbytes], span[geo.stride : geo.stride + geo.nbytes]]
        self.path = "pinned-alias"

    @property
    def registered(self) -> bool:
        return bool(self._address)

    def host_bytes(self, slot: int) -> torch.Tensor:
        """Host slot ``slot`` as a CPU uint8 tensor over the registered range (no copy; only
        ever read)."""
        return self._tensors[slot]

    def close(self) -> None:
        """Unregister (idempotent); the pool itself stays open."""
        if self._address:
            self.backend.host_unregister(self._address)
            self._address = 0
        self._tensors = []
        self._hosts = []
        if self._alias is not None:
            self._alias.close()
            self._alias = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the control block ---------------------------------------------------------------------------


class _Control:
    """Active slot, slot versions and cross-process pin words: in a shared segment (exportable
    slots) or in private memory (in-process readers only)."""

    def __init__(self, segment: Segment | None, header: mmap.mmap | None, fd: int) -> None:
        self.segment = segment
        self._header = header
        self.fd = fd
        if header is not None:
            self.ctl: np.ndarray[Any, np.dtype[np.int64]] = np.frombuffer(
                header, "<i8", 4, _CTL_OFFSET
            )
            self.pins: np.ndarray[Any, np.dtype[np.uint64]] = np.frombuffer(
                header, "<u8", MAX_PINS, _PINS_OFFSET
            )
            self.pids: np.ndarray[Any, np.dtype[np.uint64]] = np.frombuffer(
                header, "<u8", MAX_PINS, _PIDS_OFFSET
            )
        else:
            self.ctl = np.array([-1, EMPTY, EMPTY, 0], dtype="<i8")
            self.pins = np.zeros(MAX_PINS, "<u8")
            self.pids = np.zeros(MAX_PINS, "<u8")

    @property
    def shared(self) -> bool:
        return self.segment is not None

    def pinners(self, slot: int) -> list[int]:
        """Pids of live cross-process readers pinning ``slot`` (stale pins are cleared)."""
        if self._header is None:
            return []
        return live_pinners(self.fd, self.pins, self.pids, slot)

    def readers(self) -> list[int]:
        """Pids of attached cross-process readers (alive: holding their word's lock)."""
        if self._header is None:
            return []
        return [
            int(self.pids[i])
            for i in np.flatnonzero(self.pids.copy()).tolist()
            if not pin_lock(self.fd, i, test=True)
        ]

    def close(self) -> None:
        if self._header is None:
            return
        del self.ctl, self.pins, self.pids
        with contextlib.suppress(BufferError):
            self._header.close()
        self._header = None
        os.close(self.fd)
        if self.segment is not None:
            self.segment.close()


# --- pins ----------------------------------------------------------------------------------------


class _PinOwner(Protocol):
    def tensors(self, slot: int) -> Mapping[str, torch.Tensor]: ...

    def raw(self, slot: int) -> torch.Tensor: ...

    def _unpin(self, pin: VramPin) -> None: ...


@dataclass(eq=False, slots=True)
class VramPin:
    """A pinned version in a VRAM slot: ``version``, its ``slot`` and the device tensors. The
    slot's bytes do not change until :meth:`release` (or the ``with`` block ends); device work
    enqueued before the release is waited for before the slot is rewritten."""

    owner: _PinOwner
    version: int
    slot: int
    released: bool = False

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        """Device tensors by manifest name (views into the slot; never write through them)."""
        return self.owner.tensors(self.slot)

    def raw(self) -> torch.Tensor:
        return self.owner.raw(self.slot)

    def release(self) -> None:
        self.owner._unpin(self)

    def __enter__(self) -> VramPin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _slot_views(manifest: Manifest, buffer: torch.Tensor) -> Mapping[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for t in manifest.tensors:
        flat = buffer[t.offset : t.offset + t.nbytes].view(torch_dtype(t.dtype))
        out[t.name] = flat.view(t.shape)
    return MappingProxyType(out)


def _bindable(manifest: Manifest, module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s tensors by manifest name, checked against the manifest."""
    names = {t.name for t in manifest.tensors}
    params = dict(module.named_parameters())
    missing = sorted(set(params) - names)
    if missing:
        raise ConfigError(
            f"VRAM weights: parameter(s) {missing[:5]} of the module are not in the manifest "
            "(build it with module_manifest(module))"
        )
    found: dict[str, torch.Tensor] = {**dict(module.named_buffers()), **params}
    absent = sorted(names - set(found))
    if absent:
        raise ConfigError(f"VRAM weights: manifest tensor(s) {absent[:5]} are not in the module")
    for t in manifest.tensors:
        have = found[t.name]
        if tuple(have.shape) != t.shape or have.dtype != torch_dtype(t.dtype):
            raise ConfigError(
                f"VRAM weights: {t.name!r} is {have.dtype}{list(have.shape)} in the module, "
                f"{t.dtype}{list(t.shape)} in the manifest"
            )
    return found


def _point_all(
    manifest: Manifest,
    module: nn.Module,
    found: Mapping[str, torch.Tensor],
    views: Mapping[str, torch.Tensor],
) -> list[tuple[torch.Tensor, str]]:
    """Point every manifest tensor of ``module`` at ``views``; returns the tensors to re-point
    at each flip (a meta tensor is replaced by a new one viewing the slot: never by the cached
    view itself, which a later re-point would corrupt)."""
    entries = []
    for t in manifest.tensors:
        tensor, view = found[t.name], views[t.name]
        if not tensor.is_meta:
            tensor.data = view
            entries.append((tensor, t.name))
            continue
        owner_name, _, attr = t.name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if isinstance(tensor, torch.nn.Parameter):
            param = torch.nn.Parameter(view, requires_grad=tensor.requires_grad)
            owner._parameters[attr] = param
            entries.append((param, t.name))
        else:
            buffer = view.detach()  # a tensor of its own over the same memory
            owner._buffers[attr] = buffer
            entries.append((buffer, t.name))
    return entries


def _repoint(entries: list[tuple[torch.Tensor, str]], views: Mapping[str, torch.Tensor]) -> None:
    for tensor, name in entries:
        tensor.data = views[name]


StageSource: TypeAlias = PinnedVersion | Mapping[str, torch.Tensor] | torch.Tensor
"""What :meth:`VramWeights.stage` copies from: a pinned host weight-pool version (released by
the :class:`VramWeights` once copied), tensors by manifest name (any device), or the flat layout
as one uint8 tensor of ``manifest.nbytes``."""


@dataclass(frozen=True, slots=True)
class VramStatistics:
    """A snapshot of one :class:`VramWeights`. Times in seconds, sizes in bytes."""

    kind: str
    device: str
    nbytes: int
    segment: str
    """The control segment ("" when not shared)."""
    active_version: int
    active_slot: int
    staging_version: int
    stages: int
    flips: int
    pins: int
    """In-process pins held now."""
    readers: int
    """Cross-process readers attached now."""
    stage_wait_s: float
    """Total time :meth:`VramWeights.stage` waited for pins on the staging slot."""
    drain_wait_s: float
    """Total time flips waited for forward passes on a bound module."""
    bound_tensors: int
    allocations: int
    """Device buffers allocated (2, at construction)."""
    host_path: str
    """How host versions are loaded: pinned, pinned-read-only, pinned-alias, pageable, none."""


# --- the weight slots ----------------------------------------------------------------------------


class VramWeights:
    """Two preallocated device slots for one model (create with :func:`create_vram_weights`).

    Writer: :meth:`stage` (copy a version into the slot that is not active; asynchronous on
    CUDA), :meth:`staged`, :meth:`flip` (the fence), or :meth:`load` for both; with a host
    weight pool attached (:meth:`attach_host`), :meth:`refresh` between forward passes does it
    all. Readers: :meth:`pin` (threads), :meth:`bind` (a module whose parameters follow the
    active slot), :func:`attach_vram` (other processes, via :meth:`export`)."""

    def __init__(
        self, manifest: Manifest, backend: DeviceBackend, *, run: str | None, node: str, name: str
    ) -> None:
        self.manifest = manifest
        self.backend = backend
        self._bufs = [backend.empty(manifest.nbytes) for _ in (0, 1)]  # the only allocations
        self._views = [_slot_views(manifest, b) for b in self._bufs]
        self._stream = backend.new_stream()
        self._done = backend.new_event()  # the staging copy has finished
        self._ready = backend.new_event()  # the caller's stream when staging started
        # Per slot: stream id -> event recorded there by the latest pin release.
        self._marks: list[dict[int, DeviceEvent]] = [{}, {}]
        self._cond = threading.Condition()
        self._writer = threading.RLock()
        self._pins = [0, 0]
        self._active = -1
        self._versions = [EMPTY, EMPTY]
        self._staging = -1
        self._staging_version = -1
        self._source: StageSource | None = None
        self._host: PinnedStaging | None = None
        self._bound: list[tuple[nn.Module, list[tuple[torch.Tensor, str]]]] = []
        self._draining = False
        self._closed = False
        self._stages = 0
        self._flips = 0
        self._stage_wait = 0.0
        self._drain_wait = 0.0
        self._export: VramExport | None = None
        if run is None:
            self._control = _Control(None, None, -1)
        else:
            self._control = self._create_control(run, node, name)

    def _create_control(self, run: str, node: str, name: str) -> _Control:
        handles = (
            self.backend.ipc_export(self._bufs[0]),
            self.backend.ipc_export(self._bufs[1]),
        )
        blob = self.manifest.encode()

        def export(segment: str) -> VramExport:
            return VramExport(
                layout=EXPORT_VERSION,
                segment=segment,
                kind=self.backend.kind,
                device=self.backend.device_id(),
                owner_pid=os.getpid(),
                nbytes=self.manifest.nbytes,
                manifest=blob,
                slots=handles,
            )

        # The export names the segment, whose size depends on the export: size it for the
        # longest name (231 characters, dvla_bus.shm) and then write the real one.
        room = len(export("x" * 256).encode())
        seg = create_segment(run, node, name, _EXPORT_OFFSET + room)
        try:
            self._export = export(seg.name)
            data = self._export.encode()
            mm = seg.mapping()
            mm[_EXPORT_OFFSET : _EXPORT_OFFSET + len(data)] = data
            ctl = np.frombuffer(mm, "<i8", 4, _CTL_OFFSET)
            ctl[:] = (-1, EMPTY, EMPTY, 0)
            del ctl
            _HEADER.pack_into(
                mm,
                0,
                0,
                EXPORT_VERSION,
                0,
                self.manifest.nbytes,
                _EXPORT_OFFSET,
                len(data),
                os.getpid(),
            )
            struct.pack_into("<Q", mm, 0, _MAGIC)  # last: a reader seeing it sees the rest
            header, fd = open_pin_header(seg.name)
        except BaseException:
            seg.close()
            raise
        return _Control(seg, header, fd)

    # -- state -----------------------------------------------------------------------------------

    @property
    def segment(self) -> str:
        """The control segment's name ("" for slots that are not shared)."""
        return self._control.segment.name if self._control.segment is not None else ""

    @property
    def nbytes(self) -> int:
        return self.manifest.nbytes

    @property
    def active_slot(self) -> int:
        return self._active

    @property
    def active_version(self) -> int:
        """The version pins get now (-1: none loaded yet)."""
        return self._versions[self._active] if self._active >= 0 else -1

    @property
    def staging_version(self) -> int:
        """The version being staged (-1: none)."""
        return self._staging_version

    @property
    def host(self) -> PinnedStaging | None:
        """The attached host weight pool's staging (see :meth:`attach_host`)."""
        return self._host

    def tensors(self, slot: int) -> Mapping[str, torch.Tensor]:
        """Device tensors of ``slot`` by manifest name (cached views; pin before reading)."""
        return self._views[slot]

    def raw(self, slot: int) -> torch.Tensor:
        """Slot ``slot`` as one uint8 device tensor."""
        return self._bufs[slot]

    def statistics(self) -> VramStatistics:
        with self._cond:
            pins = sum(self._pins)
        return VramStatistics(
            kind=self.backend.kind,
            device=str(self.backend.device),
            nbytes=self.nbytes,
            segment=self.segment,
            active_version=self.active_version,
            active_slot=self._active,
            staging_version=self._staging_version,
            stages=self._stages,
            flips=self._flips,
            pins=pins,
            readers=len(self._control.readers()) if not self._closed else 0,
            stage_wait_s=self._stage_wait,
            drain_wait_s=self._drain_wait,
            bound_tensors=sum(len(entries) for _, entries in self._bound),
            allocations=len(self._bufs) if not self._closed else 0,
            host_path=self._host.path if self._host is not None else "none",
        )

    def _check_open(self) -> None:
        if self._closed:
            raise PoolError("VRAM weights: used after close()")

    # -- writer ----------------------------------------------------------------------------------

    def stage(self, version: int, source: StageSource, *, timeout: float = 10.0) -> int:
        """Start copying ``version`` from ``source`` into the slot that is not active, on the
        copy stream (the host does not wait on CUDA; on CPU the copy is done on return). Waits
        up to ``timeout`` seconds for pins on that slot to be released, then
        :class:`~dvla_bus.errors.DeadlineExceeded` naming them. A version already being staged
        is abandoned. Takes ownership of a :class:`~dvla_bus.weights.PinnedVersion` source (it
        is released once copied). Returns the slot."""
        with self._writer:
            try:
                self._check_open()
                if version <= self.active_version:
                    raise PoolError(
                        f"VRAM weights: version {version} is not newer than the active "
                        f"{self.active_version}"
                    )
                self._check_source(source)
            except BaseException:
                if isinstance(source, PinnedVersion):
                    source.release()
                raise
            self._abandon()
            s = -1
            try:
                s = self._claim(timeout)
                for event in self._marks[s].values():  # device work read it under a pin
                    self.backend.wait(event, self._stream)
                self.backend.record(self._ready)  # the source's producers, on this thread
                self.backend.wait(self._ready, self._stream)
                self._enqueue(s, source)
                self.backend.record(self._done, self._stream)
            except BaseException:
                if s >= 0:
                    self._done.synchronize()  # whatever was enqueued, before the slot is reused
                    with self._cond:
                        self._versions[s] = EMPTY
                    self._control.ctl[1 + s] = EMPTY
                if isinstance(source, PinnedVersion):
                    source.release()
                raise
            self._staging = s
            self._staging_version = version
            self._source = source
            self._stages += 1
            return s

    def _check_source(self, source: StageSource) -> None:
        if isinstance(source, PinnedVersion):
            if source.pool.manifest.digest() != self.manifest.digest():
                raise PoolError(
                    f"VRAM weights: host pool {source.pool.name} has another layout "
                    f"({source.pool.manifest.digest()} != {self.manifest.digest()})"
                )
        elif isinstance(source, torch.Tensor):
            if source.dtype != torch.uint8 or source.dim() != 1 or not source.is_contiguous():
                raise PoolError("VRAM weights: a flat source must be a contiguous 1-D uint8 tensor")
            if source.numel() != self.nbytes:
                raise PoolError(
                    f"VRAM weights: flat source has {source.numel()} B, the manifest {self.nbytes}"
                )
        else:
            for t in self.manifest.tensors:
                src = source.get(t.name)
                if src is None:
                    raise PoolError(f"VRAM weights: tensor {t.name!r} missing from the source")
                if tuple(src.shape) != t.shape or src.dtype != torch_dtype(t.dtype):
                    raise PoolError(
                        f"VRAM weights: tensor {t.name!r} is {src.dtype}{list(src.shape)}, the "
                        f"manifest says {t.dtype}{list(t.shape)}"
                    )

    def _claim(self, timeout: float) -> int:
        """Mark the non-active slot WRITING and wait until nobody pins it; returns it."""
        with self._cond:
            s = 0 if self._active < 0 else 1 - self._active
            self._versions[s] = WRITING
        ctl = self._control.ctl
        ctl[1 + s] = WRITING
        memory_fence()  # the store above before the pin scan below (see dvla_bus.weights)
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            with self._cond:
                local = self._pins[s]
            remote = self._control.pinners(s)
            if not local and not remote:
                break
            if time.monotonic() >= deadline:
                self._stage_wait += time.monotonic() - t0
                with self._cond:
                    self._versions[s] = EMPTY
                ctl[1 + s] = EMPTY
                who = []
                if local:
                    who.append(f"{local} in-process pin(s)")
                if remote:
                    who.append(f"reader pid(s) {sorted(set(remote))}")
                raise DeadlineExceeded(
                    f"VRAM weights: slot {s} is still pinned by {' and '.join(who)} after "
                    f"{timeout:.1f}s; a reader holds an old version too long (release pins "
                    "between forward passes)"
                )
            with self._cond:  # a release notifies; remote pins are polled
                self._cond.wait(0.0005)
        self._stage_wait += time.monotonic() - t0
        return s

    def _enqueue(self, slot: int, source: StageSource) -> None:
        dst = self._bufs[slot]
        if isinstance(source, PinnedVersion):
            host = self._host
            if host is not None and source.pool is host.pool:
                src = host.host_bytes(source.slot)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # read-only numpy view
                    src = torch.from_numpy(source.raw())
            self.backend.copy(dst, src, self._stream)
        elif isinstance(source, torch.Tensor):
            self.backend.copy(dst, source, self._stream)
        else:
            views = self._views[slot]
            for t in self.manifest.tensors:
                self.backend.copy(views[t.name], source[t.name], self._stream)

    def staged(self) -> bool:
        """True when a staged version's copy has finished (a flip will not wait)."""
        return self._staging >= 0 and self._done.query()

    def flip(self, *, timeout: float = 10.0) -> int:
        """The fence: the staged version becomes active for every pin from now on (waits for
        its copy to finish first). With bound modules it waits up to ``timeout`` seconds for
        forward passes (pins) on the old slot to end, then re-points their parameters. Returns
        the new active version."""
        with self._writer:
            self._check_open()
            s = self._staging
            if s < 0:
                raise PoolError("VRAM weights: flip() with nothing staged (stage() first)")
            self._done.synchronize()
            self._release_source()
            version = self._staging_version
            with self._cond:
                old = self._active
                if self._bound and old >= 0:
                    self._draining = True
                    t0 = time.monotonic()
                    deadline = t0 + timeout
                    try:
                        while self._pins[old]:
                            remaining = deadline - time.monotonic()
                            if remaining <= 0:
                                raise DeadlineExceeded(
                                    f"VRAM weights: {self._pins[old]} pin(s) on the active slot "
                                    f"did not end within {timeout:.1f}s; a bound module cannot "
                                    "be re-pointed under a forward pass (release the pin first; "
                                    "never flip on a thread that holds one)"
                                )
                            self._cond.wait(remaining)
                    finally:
                        self._draining = False
                        self._drain_wait += time.monotonic() - t0
                        self._cond.notify_all()
                self._versions[s] = version
                ctl = self._control.ctl
                ctl[1 + s] = version  # version first, then the pointer (the pin protocol)
                ctl[0] = s
                ctl[3] += 1
                self._active = s
                for _, entries in self._bound:
                    _repoint(entries, self._views[s])
                self._cond.notify_all()
            self._staging = -1
            self._staging_version = -1
            self._flips += 1
            return version

    def load(self, version: int, source: StageSource, *, timeout: float = 10.0) -> int:
        """:meth:`stage` then :meth:`flip`; returns the slot now active."""
        self.stage(version, source, timeout=timeout)
        self.flip(timeout=timeout)
        return self._active

    def abort(self) -> None:
        """Abandon the version being staged (its slot reads as empty)."""
        with self._writer:
            self._abandon()

    def _abandon(self) -> None:
        s = self._staging
        if s < 0:
            return
        self._done.synchronize()
        self._release_source()
        with self._cond:
            self._versions[s] = EMPTY
        self._control.ctl[1 + s] = EMPTY
        self._staging = -1
        self._staging_version = -1

    def _release_source(self) -> None:
        source, self._source = self._source, None
        if isinstance(source, PinnedVersion):
            source.release()

    # -- the host weight pool --------------------------------------------------------------------

    def attach_host(
        self, pool: WeightPool | WeightReader, *, register: bool | None = None
    ) -> PinnedStaging:
        """Load new versions from ``pool`` (this host's weight pool, same manifest). Its slots
        are registered with the driver when the backend is CUDA (``register=None``), see
        :class:`PinnedStaging`. Replaces an earlier host pool."""
        with self._writer:
            self._check_open()
            if pool.manifest.digest() != self.manifest.digest():
                raise PoolError(
                    f"VRAM weights: host pool {pool.name} has another layout "
                    f"({pool.manifest.digest()} != {self.manifest.digest()})"
                )
            self._abandon()
            self.detach_host()
            self._host = PinnedStaging(pool, self.backend, enable=register)
            return self._host

    def detach_host(self) -> None:
        """Stop loading from the host pool and unregister it."""
        with self._writer:
            self._abandon()
            if self._host is not None:
                self._host.close()
                self._host = None

    def stage_from_host(self, *, timeout: float = 10.0) -> int | None:
        """Stage the host pool's active version if it is newer than what is active or being
        staged; returns it (None: nothing newer). The host version stays pinned in the pool
        until its copy is done."""
        with self._writer:
            host = self._host
            if host is None:
                raise PoolError("VRAM weights: no host pool attached (attach_host() first)")
            have = max(self.active_version, self._staging_version)
            if host.pool.active_version <= have:
                return None
            self._abandon()  # a newer version replaces it (and frees the host pin it holds)
            have = self.active_version
            pinned = host.pool.pin(timeout)
            if pinned.version <= have:
                pinned.release()
                return None
            self.stage(pinned.version, pinned, timeout=timeout)
            return pinned.version

    def refresh(self, *, timeout: float = 10.0) -> bool:
        """The inference loop's call between forward passes: flip a staged version whose copy
        has finished, then start staging the host pool's newer version (if a host pool is
        attached). Never waits for a copy; it waits only while pins still hold the old version
        in the slot it stages into (other threads' forward passes). Returns True if it
        flipped."""
        with self._writer:
            flipped = False
            if self.staged():
                self.flip(timeout=timeout)
                flipped = True
            if self._staging < 0 and self._host is not None:
                self.stage_from_host(timeout=timeout)
            return flipped

    # -- in-process readers ----------------------------------------------------------------------

    def pin(self, timeout: float = 5.0) -> VramPin:
        """Pin the active version (any thread; several pins may be held). Waits up to
        ``timeout`` seconds for a first version or for a flip that is re-pointing bound
        modules; then :class:`~dvla_bus.errors.DeadlineExceeded`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._draining or self._active < 0:
                self._check_open()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    what = "a flip to finish" if self._draining else "a first version"
                    raise DeadlineExceeded(f"VRAM weights: waited {timeout:.1f}s for {what}")
                self._cond.wait(remaining)
            self._check_open()
            s = self._active
            self._pins[s] += 1
            return VramPin(self, self._versions[s], s)

    def _unpin(self, pin: VramPin) -> None:
        with self._cond:
            if pin.released:
                return
            pin.released = True
            marks = self._marks[pin.slot]
            sid = self.backend.stream_id()
            event = marks.get(sid)
            if event is None:  # once per (slot, stream): no allocation in steady state
                event = marks[sid] = self.backend.new_event()
            self.backend.record(event)
            self._pins[pin.slot] -= 1
            self._cond.notify_all()

    def bind(self, module: nn.Module) -> None:
        """Make ``module``'s parameters (and any buffers the manifest names) views into the
        active slot; every later flip re-points them, so forward passes must run under a
        :meth:`pin`. Each parameter keeps its identity (its storage is dropped once); meta
        parameters (a module built on ``torch.device("meta")``) are replaced by parameters
        viewing the slot. Needs a loaded version. Do not move the module afterwards
        (``.to()`` would re-allocate)."""
        with self._writer:
            self._check_open()
            found = _bindable(self.manifest, module)
            with self._cond:
                if self._active < 0:
                    raise PoolError("VRAM weights: bind() before a first version (load() one)")
                entries = _point_all(self.manifest, module, found, self._views[self._active])
                self._bound.append((module, entries))

    def unbind(self, module: nn.Module) -> None:
        """Stop re-pointing ``module`` (its parameters keep viewing the slot they view now)."""
        with self._writer, self._cond:
            self._bound = [(m, e) for m, e in self._bound if m is not module]

    # -- cross-process readers -------------------------------------------------------------------

    def export(self) -> VramExport:
        """The handles local readers map the slots with (:func:`attach_vram`). Only for slots
        created with ``run``/``node`` (shared); the same export is also stored in the control
        segment, so a reader that knows the segment name needs nothing else."""
        self._check_open()
        if self._export is None:
            raise PoolError(
                "VRAM weights: not shared (create_vram_weights(..., run=, node=) to export)"
            )
        return self._export

    def readers(self) -> list[int]:
        """Pids of the cross-process readers attached now."""
        return self._control.readers()

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self, *, reader_timeout: float = 5.0) -> None:
        """Abandon staging, unregister the host pool, wait up to ``reader_timeout`` seconds for
        cross-process readers to detach (then warn and go on), drop the slots and the control
        segment. Bound modules keep the memory they view alive. Idempotent."""
        with self._writer:
            if self._closed:
                return
            self._abandon()
            self.detach_host()
            deadline = time.monotonic() + reader_timeout
            while (left := self._control.readers()) and time.monotonic() < deadline:
                time.sleep(0.005)
            if left:
                log.warning(
                    "VRAM weights %s: closing with reader pid(s) %s still attached",
                    self.segment,
                    left,
                )
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            for marks in self._marks:
                for event in marks.values():
                    event.synchronize()  # device reads under released pins end first
            self._bound = []
            self._marks = [{}, {}]
            self._views = []
            self._bufs = []
            self._control.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_vram_weights(
    manifest: Manifest,
    *,
    backend: DeviceBackend | None = None,
    run: str | None = None,
    node: str = "",
    name: str = "vram",
) -> VramWeights:
    """Allocate the two device slots for ``manifest`` (all device memory is allocated here).
    With ``run`` and ``node`` the slots are shared: a control segment
    ``dvla.<run>.<node>.<pid>.<start>.<name>`` holds the pins and the :class:`VramExport` that
    local readers attach by (needs a backend with IPC: CUDA). Use as a context manager."""
    backend = backend if backend is not None else default_backend()
    if run is not None and not node:
        raise ConfigError("create_vram_weights: a shared pool (run=...) needs a node name")
    return VramWeights(manifest, backend, run=run, node=node, name=name)


class VramReader:
    """Another process's view of shared VRAM weight slots (see :func:`attach_vram`): pin the
    active version, read its device tensors, release. One pin at a time."""

    def __init__(
        self,
        export: VramExport,
        backend: DeviceBackend,
        header: mmap.mmap,
        fd: int,
    ) -> None:
        self.export = export
        self.backend = backend
        self.manifest = Manifest.decode(export.manifest)
        self._header: mmap.mmap | None = header
        self._fd = fd
        self._ctl: np.ndarray[Any, np.dtype[np.int64]] | None = np.frombuffer(
            header, "<i8", 4, _CTL_OFFSET
        )
        self._pins: np.ndarray[Any, np.dtype[np.uint64]] | None = np.frombuffer(
            header, "<u8", MAX_PINS, _PINS_OFFSET
        )
        self._pids: np.ndarray[Any, np.dtype[np.uint64]] | None = np.frombuffer(
            header, "<u8", MAX_PINS, _PIDS_OFFSET
        )
        self._index = self._claim()
        self._closed = False
        self._pinned: VramPin | None = None
        self._bound: list[list[tuple[torch.Tensor, str]]] = []
        self._bound_slot = -1
        self._event = backend.new_event()
        try:
            self._bufs = [backend.ipc_import(h) for h in export.slots]
            for b in self._bufs:
                if b.numel() != self.manifest.nbytes:
                    raise PoolError(
                        f"VRAM export {export.segment}: a slot maps {b.numel()} B, the manifest "
                        f"says {self.manifest.nbytes}"
                    )
            self._views = [_slot_views(self.manifest, b) for b in self._bufs]
        except BaseException:
            self.close()
            raise

    def _claim(self) -> int:
        assert self._pins is not None
        assert self._pids is not None
        i = claim_pin(self._fd, self._pins, self._pids)
        if i < 0:
            raise ResourceError(
                f"VRAM weights {self.export.segment}: all {MAX_PINS} reader slots taken"
            )
        return i

    def _ctl_words(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        if self._ctl is None:
            raise PoolError(f"VRAM reader {self.export.segment}: used after close()")
        return self._ctl

    @property
    def active_version(self) -> int:
        ctl = self._ctl_words()
        s = int(ctl[0])
        return -1 if s < 0 else int(ctl[1 + s])

    def tensors(self, slot: int) -> Mapping[str, torch.Tensor]:
        return self._views[slot]

    def raw(self, slot: int) -> torch.Tensor:
        return self._bufs[slot]

    def owner_alive(self) -> bool:
        """False once the owner process is gone (its slots must not be used any more)."""
        return owner_status(SegmentName.parse(self.export.segment)) is OwnerStatus.ALIVE

    def pin(self, timeout: float = 5.0) -> VramPin:
        """Pin the active version (see :meth:`dvla_bus.weights.WeightReader.pin`)."""
        if self._pinned is not None:
            raise PoolError(f"VRAM reader {self.export.segment}: already pinned (release first)")
        ctl = self._ctl_words()
        pins = self._pins
        assert pins is not None
        what = f"VRAM reader {self.export.segment}: no version"
        v, s = acquire_pin(ctl, pins, self._index, timeout, what)
        if self._bound and s != self._bound_slot:
            for entries in self._bound:
                _repoint(entries, self._views[s])
            self._bound_slot = s
        self._pinned = VramPin(self, v, s)
        return self._pinned

    def bind(self, module: nn.Module) -> None:
        """Make ``module``'s parameters views into the slots (as :meth:`VramWeights.bind`);
        each :meth:`pin` points them at the slot it pins, so run forward passes under a pin.
        No pin may be held while binding."""
        if self._pinned is not None:
            raise PoolError(f"VRAM reader {self.export.segment}: bind() while pinned")
        found = _bindable(self.manifest, module)
        slot = max(int(self._ctl_words()[0]), 0)
        self._bound.append(_point_all(self.manifest, module, found, self._views[slot]))
        if self._bound_slot != slot:
            for entries in self._bound:
                _repoint(entries, self._views[slot])
            self._bound_slot = slot

    def _unpin(self, pin: VramPin) -> None:
        if self._pinned is not pin or pin.released:
            return
        # The owner cannot wait for our stream: finish the work that read the slot first.
        self.backend.record(self._event)
        self._event.synchronize()
        pin.released = True
        self._pinned = None
        if self._pins is not None:
            self._pins[self._index] = 0

    def wait_version(self, at_least: int, timeout: float) -> int:
        """Poll until the active version is >= ``at_least``; returns it, or raises
        :class:`~dvla_bus.errors.DeadlineExceeded` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (v := self.active_version) < at_least:
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    f"VRAM reader {self.export.segment}: version {at_least} not active within "
                    f"{timeout:.1f}s (active: {v})"
                )
            time.sleep(0.001)
        return v

    def close(self) -> None:
        """Release the pin and the reader slot, drop the mapped slots. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._pinned is not None:
            self._unpin(self._pinned)
        if self._pins is not None and self._pids is not None:
            self._pins[self._index] = 0
            self._pids[self._index] = 0
        self._ctl = self._pins = self._pids = None
        self._bound = []
        self._views = []
        self._bufs = []
        if self._header is not None:
            with contextlib.suppress(BufferError):
                self._header.close()
            self._header = None
        os.close(self._fd)  # drops the OFD lock: the reader slot is free

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_export(segment: str) -> VramExport:
    seg = attach_segment(segment, writable=False)
    try:
        mm = seg.mapping()
        if len(mm) < _EXPORT_OFFSET:
            raise PoolError(f"segment {segment}: too small for VRAM weights")
        magic, layout, _, nbytes, off, length, _pid = _HEADER.unpack_from(mm, 0)
        if magic != _MAGIC or layout != EXPORT_VERSION:
            raise PoolError(f"segment {segment}: not a VRAM weights segment (layout 1)")
        if off + length > len(mm):
            raise PoolError(f"segment {segment}: export lies outside the segment")
        export = VramExport.decode(bytes(mm[off : off + length]))
        if export.nbytes != nbytes or export.segment != segment:
            raise PoolError(f"segment {segment}: export disagrees with the header")
        return export
    finally:
        seg.close()


def attach_vram(
    source: VramExport | bytes | str, *, backend: DeviceBackend | None = None
) -> VramReader:
    """Map an owner's shared VRAM weight slots in this process: ``source`` is its
    :class:`VramExport`, the export's MessagePack bytes (as received on the control bus) or the
    control segment's name. The default backend drives the export's GPU (by UUID). Raises
    :class:`~dvla_bus.errors.PoolError` for a malformed or mismatched export and
    :class:`~dvla_bus.errors.ResourceError` if the owner is gone or the device cannot map it."""
    if isinstance(source, str):
        export = _read_export(source)
    elif isinstance(source, bytes | bytearray | memoryview):
        export = VramExport.decode(bytes(source))
    else:
        export = source
    if backend is None:
        if export.kind != "cuda":
            raise PoolError(f"VRAM export of kind {export.kind!r}: pass the backend to map it")
        backend = CudaBackend.for_device(export.device)
    if backend.kind != export.kind:
        raise PoolError(
            f"VRAM export {export.segment} is {export.kind!r} memory; a {backend.kind!r} "
            "backend cannot map it"
        )
    if backend.device_id() != export.device:
        raise PoolError(
            f"VRAM export {export.segment} lives on {export.device}; this backend drives "
            f"{backend.device_id()}"
        )
    stored = _read_export(export.segment)
    if stored != export:
        raise PoolError(f"VRAM export {export.segment}: stale (the segment holds another one)")
    try:
        header, fd = open_pin_header(export.segment)
    except OSError as exc:
        raise ResourceError(f"segment {export.segment}: cannot open: {exc}") from exc
    return VramReader(export, backend, header, fd)


def find_vram(run: str, name: str = "vram") -> list[str]:
    """Control segments of live shared VRAM weight slots of run ``run`` on this machine."""
    found = []
    for path in sorted(SHM_DIR.glob(f"dvla.{run}.*")):
        try:
            parsed = SegmentName.parse(path.name)
        except ResourceError:
            continue
        if parsed.run == run and parsed.name == name and owner_status(parsed) is OwnerStatus.ALIVE:
            found.append(path.name)
    return found


# --- following an owner (replicas) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VramFollowerStatistics:
    """A snapshot of one :class:`VramFollower`."""

    owner: str
    segment: str
    """The control segment attached now ("" when not attached)."""
    version: int
    """The attached slots' active version (-1: none, or not attached)."""
    attaches: int
    detaches: int
    owner_deaths: int
    """Detaches because the owner died or left."""
    failures: int
    """Attach attempts that failed (retried after ``retry_s``)."""
    why: str
    """Why it is not attached ("" when attached)."""


class VramFollower:
    """Follows one owner's shared VRAM weight slots on this host, across the owner's death and
    restart: the replica side of :func:`attach_vram`.

    ``owner`` is the owning node's name. Where its slots are comes from the control bus: the
    owner's member endpoint ``endpoints[key]`` in the hub's membership table
    (:meth:`follow_members`); an owner that made its slots after it joined advertises none, so
    with ``run`` the follower also looks for them on this machine (:func:`find_vram` segments
    whose node component is :func:`node_component` of ``owner``, at most every ``scan_s``
    seconds). An advertisement from another host than ``host`` is ignored (CUDA IPC maps
    memory of one machine's GPUs only).

    :meth:`maintain` is the call between forward passes: it detaches when the owner is dead
    (the hub's ``node_dead`` passed to :meth:`owner_gone`, or :meth:`VramReader.owner_alive`
    false) or advertises other slots, and attaches the advertised ones. It never waits: an
    attach that fails (the owner still creating its slots, or already gone) is counted and
    retried after ``retry_s``; a segment whose owner died is never attached again. Pin the
    slots through :attr:`reader` (None: not attached; :attr:`why` says why); a pin never
    sees a half-written slot (the owner's pin protocol).

    Thread safety: :meth:`follow_members` and :meth:`owner_gone` from any thread (they record
    what is wanted); everything else on the reader's thread."""

    def __init__(
        self,
        owner: str,
        *,
        backend: DeviceBackend | None = None,
        run: str = "",
        host: str = "",
        key: str = "vram",
        scan_s: float = 0.5,
        retry_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not owner:
            raise ConfigError("VramFollower: the owner's node name is empty")
        self.owner = owner
        self.backend = backend
        self.run = run
        self.host = host
        self.key = key
        self.scan_s = scan_s
        self.retry_s = retry_s
        self._clock = clock
        self._component = node_component(owner)
        self._lock = threading.Lock()
        self._wanted = ""  # advertised on the control bus
        self._gone: list[str] = []  # owner deaths reported since the last maintain()
        self._dead: list[str] = []  # segments never to attach again (bounded)
        self._scanned = ""
        self._scan_at = -math.inf
        self._failed = ""
        self._retry_at = -math.inf
        self._reader: VramReader | None = None
        self._why = f"{owner} advertises no VRAM slots (yet)"
        self._attaches = 0
        self._detaches = 0
        self._deaths = 0
        self._failures = 0
        self._closed = False

    # -- what the control bus says (any thread) --------------------------------------------------

    def follow_members(self, members: Iterable[wire.MemberInfo]) -> None:
        """Record the slots the owner advertises in the membership table (``Members``)."""
        wanted, why = "", f"{self.owner} is not a live member of the control bus"
        for m in members:
            if m.node != self.owner or m.state == "dead":
                continue
            segment = m.endpoints.get(self.key, "")
            if not segment:
                why = f"{self.owner} advertises no {self.key!r} endpoint (no shareable slots)"
            elif self.host and m.host != self.host:
                why = (
                    f"{self.owner} is on host {m.host}, this reader on {self.host}: CUDA IPC "
                    "maps slots on one host only"
                )
            else:
                wanted, why = segment, ""
        with self._lock:
            self._wanted = wanted
            if not wanted and self._reader is None:
                self._why = why

    def owner_gone(self, node: str) -> None:
        """The hub's ``node_dead`` for ``node``: if it is the owner, what it advertised is
        dead; the next :meth:`maintain` detaches."""
        if node != self.owner:
            return
        with self._lock:
            self._gone.append(self._wanted)
            self._wanted = ""

    # -- the reader's thread ---------------------------------------------------------------------

    @property
    def reader(self) -> VramReader | None:
        return self._reader

    @property
    def why(self) -> str:
        """Why :attr:`reader` is None ("" when attached)."""
        return "" if self._reader is not None else self._why

    def _mark_dead(self, segment: str) -> None:
        if segment and segment not in self._dead:
            self._dead.append(segment)
            del self._dead[:-16]

    def _detach(self, why: str, *, death: bool) -> None:
        reader, self._reader = self._reader, None
        if reader is None:
            return
        segment = reader.export.segment
        reader.close()
        self._detaches += 1
        if death:
            self._deaths += 1
            self._mark_dead(segment)
        self._why = why
        log.info("VRAM follower of %s: detached from %s: %s", self.owner, segment, why)

    def _scan(self, now: float) -> str:
        if now < self._scan_at:
            return self._scanned
        self._scan_at = now + self.scan_s
        best, start = "", -1
        for name in find_vram(self.run):
            parsed = SegmentName.parse(name)
            mine = parsed.node == self._component and name not in self._dead
            if mine and parsed.start_time > start:
                best, start = name, parsed.start_time
        self._scanned = best
        return best

    def maintain(self) -> VramReader | None:
        """Detach from dead or superseded slots, attach the owner's current ones; returns
        :attr:`reader`. Never waits."""
        if self._closed:
            raise PoolError(f"VRAM follower of {self.owner}: used after close()")
        with self._lock:
            wanted, gone, self._gone = self._wanted, self._gone, []
        for segment in gone:
            self._mark_dead(segment)
        reader = self._reader
        if reader is not None:
            segment = reader.export.segment
            if gone and (segment in gone or "" in gone):
                self._detach(f"{self.owner} died or left (node_dead)", death=True)
            elif not reader.owner_alive():
                self._detach(f"{self.owner}'s process is gone", death=True)
            elif wanted and wanted != segment:
                self._detach(f"{self.owner} advertises {wanted} now", death=False)
            else:
                return reader
        now = self._clock()
        target = wanted
        if not target and self.run:
            target = self._scan(now)
        if not target:
            if gone:
                self._why = f"{self.owner} died or left; waiting for it to advertise new slots"
            return None
        if target in self._dead:
            self._why = f"{self.owner}'s slots {target} belong to a dead process"
            return None
        if target == self._failed and now < self._retry_at:
            return None
        try:
            reader = attach_vram(target, backend=self.backend)
        except (DvlaError, OSError) as exc:
            self._failures += 1
            self._failed, self._retry_at = target, now + self.retry_s
            self._why = f"cannot attach {target}: {exc}"
            log.info("VRAM follower of %s: %s", self.owner, self._why)
            return None
        self._reader = reader
        self._failed = ""
        self._attaches += 1
        self._why = ""
        log.info("VRAM follower of %s: attached %s", self.owner, target)
        return reader

    def statistics(self) -> VramFollowerStatistics:
        reader = self._reader
        version = -1
        if reader is not None:
            with contextlib.suppress(PoolError):
                version = reader.active_version
        return VramFollowerStatistics(
            owner=self.owner,
            segment=reader.export.segment if reader is not None else "",
            version=version,
            attaches=self._attaches,
            detaches=self._detaches,
            owner_deaths=self._deaths,
            failures=self._failures,
            why=self.why,
        )

    def close(self) -> None:
        """Detach (idempotent)."""
        if self._closed:
            return
        self._detach("closed", death=False)
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- trajectory slabs ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VramSlabStatistics:
    slab_count: int
    slab_size: int
    held: int
    acquires: int
    releases: int
    backpressure: int
    """Acquires that found no free slab."""
    timeouts: int
    allocations: int
    """Device buffers allocated (1, at construction)."""


@dataclass(frozen=True, slots=True, eq=False)
class VramSlab:
    """A held slab: ``index`` and the generation it was acquired under. Valid until
    released."""

    pool: VramSlabPool
    index: int
    generation: int

    def view(self, layout: Layout) -> Mapping[str, torch.Tensor]:
        return self.pool.view(self, layout)

    def raw(self) -> torch.Tensor:
        return self.pool.raw(self)

    def release(self) -> None:
        self.pool.release(self)


class VramSlabPool:
    """``slab_count`` fixed device slabs of ``slab_size`` bytes in one buffer, for observation
    and action batches (the trajectory half of the dual pool, on the device).

    :meth:`acquire` a slab, fill :meth:`view` (tensors by :class:`~dvla_bus.pool.Layout` field;
    slice rows for a smaller batch), hand it to the consumer, :meth:`release` it. Views are
    cached per slab and layout: after construction nothing is allocated. No free slab is
    backpressure (:meth:`acquire_nowait` returns None, :meth:`acquire` waits up to a deadline).
    A release records an event on the releasing thread's stream; the next acquirer's stream
    waits for it, so a slab is not overwritten under a kernel still reading it. Thread-safe;
    in-process (other processes share weights, not slabs)."""

    def __init__(
        self,
        slab_count: int,
        slab_size: int,
        *,
        backend: DeviceBackend | None = None,
        alignment: int = 512,
    ) -> None:
        if type(slab_count) is not int or slab_count < 1:
            raise ConfigError(f"VRAM slab pool: slab_count {slab_count!r} must be an int >= 1")
        if type(slab_size) is not int or slab_size < 1:
            raise ConfigError(f"VRAM slab pool: slab_size {slab_size!r} must be an int >= 1")
        if alignment < 64 or alignment & (alignment - 1):
            raise ConfigError(f"VRAM slab pool: alignment {alignment} must be a power of 2 >= 64")
        self.backend = backend if backend is not None else default_backend()
        self._count = slab_count
        self._size = slab_size
        self._stride = round_up(slab_size, alignment)
        self._buf: torch.Tensor | None = self.backend.empty(slab_count * self._stride)
        self._slabs = [
            self._buf[i * self._stride : i * self._stride + slab_size] for i in range(slab_count)
        ]
        self._marks = [self.backend.new_event() for _ in range(slab_count)]
        self._marked = [False] * slab_count
        self._gens = [0] * slab_count  # even: free, odd: held
        self._free = list(range(slab_count))  # a ring of free indices
        self._head = 0
        self._nfree = slab_count
        self._cache: list[tuple[Layout, Mapping[str, torch.Tensor]] | None] = [None] * slab_count
        self._cond = threading.Condition()
        self._closed = False
        self._acquires = 0
        self._releases = 0
        self._backpressure = 0
        self._timeouts = 0

    @property
    def slab_count(self) -> int:
        return self._count

    @property
    def slab_size(self) -> int:
        return self._size

    def _take(self) -> VramSlab | None:
        if self._closed:
            raise PoolError("VRAM slab pool: used after close()")
        if not self._nfree:
            return None
        i = self._free[self._head]
        self._head = (self._head + 1) % self._count
        self._nfree -= 1
        self._gens[i] += 1
        self._acquires += 1
        if self._marked[i]:  # the last holder's device work on it comes first
            self.backend.wait(self._marks[i])
        return VramSlab(self, i, self._gens[i])

    def acquire_nowait(self) -> VramSlab | None:
        """A free slab, or None (backpressure)."""
        with self._cond:
            slab = self._take()
            if slab is None:
                self._backpressure += 1
            return slab

    def acquire(self, timeout: float) -> VramSlab:
        """A free slab, waiting up to ``timeout`` seconds for a release on another thread; then
        :class:`~dvla_bus.errors.DeadlineExceeded`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            slab = self._take()
            if slab is not None:
                return slab
            self._backpressure += 1
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._timeouts += 1
                    raise DeadlineExceeded(
                        f"VRAM slab pool: no free slab within {timeout:.3f}s (all "
                        f"{self._count} held: consumers are not releasing; backpressure)"
                    )
                self._cond.wait(remaining)
                slab = self._take()
                if slab is not None:
                    return slab

    def _verify(self, slab: VramSlab) -> None:
        if slab.pool is not self:
            raise PoolError("VRAM slab pool: slab belongs to another pool")
        if self._closed:
            raise PoolError("VRAM slab pool: used after close()")
        if self._gens[slab.index] != slab.generation:
            raise PoolError(
                f"VRAM slab pool: slab {slab.index} generation {slab.generation} was released "
                f"(now {self._gens[slab.index]}): use after release or double release"
            )

    def release(self, slab: VramSlab) -> None:
        """Hand the slab back (records where the releasing thread's stream is)."""
        with self._cond:
            self._verify(slab)
            i = slab.index
            self.backend.record(self._marks[i])
            self._marked[i] = True
            self._gens[i] += 1
            self._free[(self._head + self._nfree) % self._count] = i
            self._nfree += 1
            self._releases += 1
            self._cond.notify()

    def view(self, slab: VramSlab, layout: Layout) -> Mapping[str, torch.Tensor]:
        """Device tensors by field over the slab (cached per slab and layout)."""
        self._verify(slab)
        cached = self._cache[slab.index]
        if cached is not None and (cached[0] is layout or cached[0] == layout):
            return cached[1]
        layout.check_fits(self._size, "VRAM slab pool")
        base = self._slabs[slab.index]
        out: dict[str, torch.Tensor] = {}
        for f in layout.fields:
            out[f.name] = base[f.offset : f.end].view(torch_dtype(f.dtype)).view(f.shape)
        views: Mapping[str, torch.Tensor] = MappingProxyType(out)
        self._cache[slab.index] = (layout, views)
        return views

    def raw(self, slab: VramSlab) -> torch.Tensor:
        self._verify(slab)
        return self._slabs[slab.index]

    def statistics(self) -> VramSlabStatistics:
        with self._cond:
            return VramSlabStatistics(
                slab_count=self._count,
                slab_size=self._size,
                held=self._count - self._nfree,
                acquires=self._acquires,
                releases=self._releases,
                backpressure=self._backpressure,
                timeouts=self._timeouts,
                allocations=0 if self._buf is None else 1,
            )

    def close(self) -> None:
        """Drop the buffer (views handed out keep it alive); waiters get PoolError."""
        with self._cond:
            self._closed = True
            self._cache = [None] * self._count
            self._slabs = []
            self._buf = None
            self._cond.notify_all()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
