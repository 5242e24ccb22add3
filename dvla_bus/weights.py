"""The weight pool: one host's double-buffered shared-memory home for a model's parameters.

Half of the *dual-pool* design (DESIGN.md): per host, one preallocated segment holds two slots
(active, staging) for the model's flat parameter layout, described by a :class:`Manifest`
(name, dtype, shape, byte offset per tensor). One **writer** per host (the relay, or the
publisher on the tree's root) fills the staging slot chunk by chunk, each chunk checked with
the topology's checksum, and flips it to active; any number of **readers** in other processes
(inference, samplers) *pin* the active version and get numpy or torch views of it without a
copy. Nothing is allocated in steady state: the segment is created once, mapped once
(``MAP_POPULATE``: a fresh mapping page-faults, MEASURED.md) and views are cached per slot.

Segment layout (little endian; offsets in bytes; all regions page aligned)::

    page 0     header: magic "DVLAWGT1", layout version, checksum id, payload bytes W,
               slot stride, data offset, manifest offset/length, chunk bytes C, chunk count,
               digest-table offset, writer pid; at 128: active slot (i64, -1 none),
               version of slot 0 and 1 (i64; -1 empty, -2 being written), flip count;
               at 256: MAX_PINS pin words (u64), then MAX_PINS pin-owner pids (u64)
    manifest   msgpack of the Manifest (readers learn the layout from the segment alone)
    digests    2 x n_chunks x 16 bytes: per slot, the checksum of every chunk
    slot 0, 1  W bytes each (stride rounded up to pages)

**Pin protocol** (readers see version N or N+1, never a mix). Each reader claims one pin word
for its lifetime by taking an open-file-description lock on one byte of the segment file
(``F_OFD_SETLK``; the kernel drops it when the reader's process dies, so a crashed reader's pin
is recognisably stale). To pin, a reader reads ``active = s`` and ``version[s] = v``, stores
``pin = (v, s)``, issues a full memory barrier, and re-reads: if ``active`` is still ``s`` and
``version[s]`` still ``v`` the pin holds, otherwise it clears the pin and retries. The writer,
before reusing slot ``s``, stores ``version[s] = WRITING``, issues a barrier, and waits until no
live pin names slot ``s`` (bounded: :class:`~dvla_bus.errors.DeadlineExceeded` naming the
pinning pids). It is Dekker's mutual exclusion: either the reader's re-read sees ``WRITING``
(and retries) or the writer's scan sees the pin (and waits). The flip stores
``version[s] = N+1`` and then ``active = s``; x86 keeps stores in order (TSO), and the barrier
(a locked instruction, via a mutex acquire) orders each side's store before its load — on a
weakly ordered CPU the same code needs a real fence there, which is where it would go.

The protocol's pieces are public (:func:`claim_pin`, :func:`acquire_pin`, :func:`live_pinners`,
:func:`pin_lock`, :func:`pin_word`, :func:`memory_fence`, :func:`open_pin_header`): the VRAM
weight slots (:mod:`dvla_bus.vram`) keep the same control and pin words in their own control
segment and use them unchanged.

A reader may hold one pin at a time; while it holds it, the pinned slot's bytes do not change.
The writer never blocks readers; readers block the writer only for as long as they hold a pin
on the slot it wants to reuse (two versions behind).

Thread safety: a :class:`WeightPool` belongs to its writer's thread (or event loop); a
:class:`WeightReader` to one thread. Processes share only the segment.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import mmap
import os
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Self

import msgspec
import numpy as np
import numpy.typing as npt

from dvla_bus.errors import ConfigError, DeadlineExceeded, PoolError, ResourceError
from dvla_bus.shm import PAGE_SIZE, SHM_DIR, Segment, attach_segment, create_segment, round_up

if TYPE_CHECKING:
    import torch

__all__ = [
    "DIGEST_BYTES",
    "DTYPE_SIZES",
    "EMPTY",
    "MAX_PINS",
    "WRITING",
    "Manifest",
    "PinnedVersion",
    "TensorSpec",
    "WeightPool",
    "WeightReader",
    "acquire_pin",
    "attach_weights",
    "chunk_digester",
    "claim_pin",
    "create_weight_pool",
    "find_weights",
    "live_pinners",
    "memory_fence",
    "open_pin_header",
    "pin_lock",
    "pin_word",
]

MAGIC: Final = int.from_bytes(b"DVLAWGT1", "little")
LAYOUT_VERSION: Final = 1
DIGEST_BYTES: Final = 16
"""Every chunk digest is stored in 16 bytes (shorter ones are zero-padded, longer truncated)."""
MAX_PINS: Final = 128
"""Readers (pin words) per pool, writer's own pin included."""
EMPTY: Final = -1
WRITING: Final = -2
TENSOR_ALIGN: Final = 64
"""Each tensor starts on a cache line; the slot itself is page aligned."""

_HEADER = struct.Struct("<QIIQQQQQQQQQ")  # magic .. writer pid, from byte 0
_CTL_OFFSET: Final = 128  # active, version[0], version[1], flips (i64 each)
_PINS_OFFSET: Final = 256
_PIDS_OFFSET: Final = _PINS_OFFSET + 8 * MAX_PINS
_LOCK_BASE: Final = 1 << 40  # lock bytes far beyond the file's end (locks need no data there)
_FLOCK = struct.Struct("hh4xqqi4x")  # struct flock on Linux x86-64/aarch64

#: dtype name -> item size. Names are numpy's, plus ``bfloat16``, carried as raw 2-byte words.
DTYPE_SIZES: Final[Mapping[str, int]] = MappingProxyType(
    {
        "bool": 1,
        "int8": 1,
        "uint8": 1,
        "int16": 2,
        "uint16": 2,
        "float16": 2,
        "bfloat16": 2,
        "int32": 4,
        "uint32": 4,
        "float32": 4,
        "int64": 8,
        "uint64": 8,
        "float64": 8,
    }
)
CHECKSUM_IDS: Final[Mapping[str, int]] = MappingProxyType(
    {"none": 0, "blake2b": 1, "sha256": 2, "crc32": 3, "xxh3": 4, "xxh64": 5}
)


def _np_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype a tensor's view uses (bfloat16 -> uint16: raw words)."""
    return np.dtype("<u2") if name == "bfloat16" else np.dtype(name).newbyteorder("<")


# --- the manifest --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor of the flat layout: ``offset`` bytes from the slot start, C order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return DTYPE_SIZES[self.dtype] * math.prod(self.shape)


class _ManifestWire(msgspec.Struct, frozen=True, array_like=True):
    tensors: list[tuple[str, str, tuple[int, ...], int]]
    nbytes: int


@dataclass(frozen=True, slots=True)
class Manifest:
    """A model's flat parameter layout: every tensor's name, dtype, shape and byte offset, and
    the total ``nbytes`` of a slot. Build it with :meth:`from_arrays` (numpy arrays or torch
    tensors) or :meth:`from_specs`; tensors are packed in the given order, each aligned to
    :data:`TENSOR_ALIGN` bytes."""

    tensors: tuple[TensorSpec, ...]
    nbytes: int

    def __post_init__(self) -> None:
        seen: set[str] = set()
        end = 0
        for t in self.tensors:
            if t.dtype not in DTYPE_SIZES:
                raise ConfigError(
                    f"manifest: tensor {t.name!r} has dtype {t.dtype!r} "
                    f"(expected one of: {', '.join(DTYPE_SIZES)})"
                )
            if t.name in seen:
                raise ConfigError(f"manifest: tensor {t.name!r} appears twice")
            if any(type(d) is not int or d < 0 for d in t.shape):
                raise ConfigError(f"manifest: tensor {t.name!r} has a bad shape {t.shape!r}")
            if t.offset < end or t.offset % DTYPE_SIZES[t.dtype]:
                raise ConfigError(f"manifest: tensor {t.name!r} at offset {t.offset} overlaps")
            seen.add(t.name)
            end = t.offset + t.nbytes
        if self.nbytes < end or self.nbytes <= 0:
            raise ConfigError(f"manifest: nbytes {self.nbytes} < the tensors' end {end}")

    @classmethod
    def from_specs(cls, specs: Iterable[tuple[str, str, tuple[int, ...]]]) -> Manifest:
        """Pack ``(name, dtype, shape)`` tensors in order."""
        tensors = []
        offset = 0
        for name, dtype, shape in specs:
            offset = round_up(offset, TENSOR_ALIGN)
            spec = TensorSpec(name, dtype, tuple(int(d) for d in shape), offset)
            if dtype not in DTYPE_SIZES:
                raise ConfigError(f"manifest: tensor {name!r} has unknown dtype {dtype!r}")
            tensors.append(spec)
            offset += spec.nbytes
        return cls(tuple(tensors), max(offset, 1))

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> Manifest:
        """The layout of ``arrays`` (numpy arrays or torch tensors, in mapping order)."""
        return cls.from_specs((name, _dtype_name(a), tuple(a.shape)) for name, a in arrays.items())

    def encode(self) -> bytes:
        """MessagePack ``[[[name, dtype, shape, offset], ...], nbytes]``."""
        wire = _ManifestWire(
            [(t.name, t.dtype, t.shape, t.offset) for t in self.tensors], self.nbytes
        )
        return msgspec.msgpack.encode(wire)

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        try:
            wire = msgspec.msgpack.decode(data, type=_ManifestWire)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise PoolError(f"weight pool manifest is malformed: {exc}") from None
        return cls(tuple(TensorSpec(n, d, tuple(s), o) for n, d, s, o in wire.tensors), wire.nbytes)

    def digest(self) -> str:
        """A short hex identity of the layout (two pools with equal digests are compatible)."""
        return hashlib.blake2b(self.encode(), digest_size=8).hexdigest()


def _dtype_name(a: Any) -> str:
    mod = type(a).__module__
    if mod.startswith("torch"):
        return str(a.dtype).removeprefix("torch.")
    dt = np.dtype(a.dtype)
    if dt.hasobject:
        raise ConfigError(f"manifest: dtype {dt} cannot be a weight")
    return str(dt.name)


def _flat_bytes(a: Any) -> npt.NDArray[np.uint8]:
    """A tensor or array as contiguous uint8, without a copy where it already is contiguous."""
    if type(a).__module__.startswith("torch"):
        t = a.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16: carry the raw words
            import torch

            t = t.view(torch.int16)
        arr: npt.NDArray[Any] = t.numpy()
    else:
        arr = np.ascontiguousarray(a)
    return arr.reshape(-1).view(np.uint8)


# --- checksums -----------------------------------------------------------------------------------


def chunk_digester(name: str) -> Callable[[Any], bytes]:
    """The per-chunk digest function for checksum ``name`` (topology ``[replication]
    checksum``): bytes-like -> :data:`DIGEST_BYTES` bytes. ``none`` gives zeros (no check)."""
    if name == "blake2b":
        return lambda b: hashlib.blake2b(b, digest_size=DIGEST_BYTES).digest()
    if name == "sha256":
        return lambda b: hashlib.sha256(b).digest()[:DIGEST_BYTES]
    if name == "crc32":
        return lambda b: zlib.crc32(b).to_bytes(4, "little") + bytes(DIGEST_BYTES - 4)
    if name == "none":
        zero = bytes(DIGEST_BYTES)
        return lambda b: zero
    if name in ("xxh3", "xxh64"):
        try:
            import xxhash  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError(
                f"checksum {name!r} needs the 'xxhash' package (pip install xxhash), or set "
                "[replication] checksum = 'blake2b'"
            ) from None
        fn = xxhash.xxh3_128 if name == "xxh3" else xxhash.xxh64
        return lambda b: fn(b).digest().ljust(DIGEST_BYTES, b"\0")[:DIGEST_BYTES]
    raise ConfigError(f"unknown checksum {name!r} (expected one of: {', '.join(CHECKSUM_IDS)})")


# --- the pin protocol ----------------------------------------------------------------------------
#
# Public because the VRAM weight slots (dvla_bus.vram) keep the same control words (active slot
# and slot versions at byte 128, MAX_PINS pin words and pin-owner pids at 256) in their own
# control segment and speak exactly this protocol with their cross-process readers.

_FENCE = threading.Lock()


def memory_fence() -> None:
    """A full memory barrier: acquiring a mutex is a locked instruction on x86 (and a barrier
    on every CPU CPython supports), which orders the store before it with the load after it."""
    with _FENCE:
        pass


def pin_word(version: int, slot: int) -> int:
    """The pin word naming ``version`` in ``slot`` (never 0, which means "no pin")."""
    return ((version + 1) << 1) | slot


def pin_lock(fd: int, index: int, *, test: bool = False) -> bool:
    """Take (or, ``test``, probe) the OFD write lock on pin byte ``index`` of the segment open
    as ``fd``. True: taken (or, probing, nobody holds it: a set pin word is stale). The kernel
    drops the lock when the process holding it dies."""
    arg = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _LOCK_BASE + index, 1, 0)
    if test:
        out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, arg)
        return bool(_FLOCK.unpack(out)[0] == fcntl.F_UNLCK)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, arg)
    except OSError:
        return False
    return True


def open_pin_header(name: str) -> tuple[mmap.mmap, int]:
    """A read-write mapping of segment ``name``'s header page (control and pin words) and an
    fd for the pin locks; the caller closes both."""
    fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return mmap.mmap(fd, PAGE_SIZE, flags=mmap.MAP_SHARED), fd
    except BaseException:
        os.close(fd)
        raise


def claim_pin(fd: int, pins: npt.NDArray[np.uint64], pids: npt.NDArray[np.uint64]) -> int:
    """Claim a reader's pin word for this process's lifetime (its OFD lock); returns its
    index, or -1 when all :data:`MAX_PINS` are taken."""
    for i in range(MAX_PINS):
        if pin_lock(fd, i):
            pins[i] = 0
            pids[i] = os.getpid()
            return i
    return -1


def acquire_pin(
    ctl: npt.NDArray[np.int64],
    pins: npt.NDArray[np.uint64],
    index: int,
    timeout: float,
    what: str,
) -> tuple[int, int]:
    """The reader's side of the pin protocol on pin word ``index``: returns ``(version,
    slot)`` of the active version, pinned; polls up to ``timeout`` seconds while none is
    published, then raises :class:`~dvla_bus.errors.DeadlineExceeded`
    (``"<what> within <timeout>s"``). Clear the word to release."""
    deadline = time.monotonic() + timeout
    while True:
        s = int(ctl[0])
        if s >= 0:
            v = int(ctl[1 + s])
            if v >= 0:
                pins[index] = pin_word(v, s)
                memory_fence()
                if int(ctl[0]) == s and int(ctl[1 + s]) == v:
                    return v, s
                pins[index] = 0
                continue
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"{what} within {timeout:.1f}s")
        time.sleep(0.001)  # nothing published yet: poll


def live_pinners(
    fd: int,
    pins: npt.NDArray[np.uint64],
    pids: npt.NDArray[np.uint64],
    slot: int,
    *,
    own: int = -1,
) -> list[int]:
    """The writer's side: pids of live readers pinning ``slot`` (stale pins of dead readers
    are cleared). ``own`` is the caller's own pin word, which is not probed (our own lock
    never conflicts with us)."""
    out = []
    # Readers in other processes change the pin words while we look: scan a private snapshot
    # (numpy refuses to count non-zeros in memory that changes under it).
    snapshot = pins.copy()
    for i in np.flatnonzero(snapshot).tolist():
        word = int(pins[i])
        if word == 0 or word & 1 != slot:
            continue
        if i != own and pin_lock(fd, i, test=True):  # nobody holds the word: its reader died
            pins[i] = 0
            continue
        out.append(int(pids[i]))
    return out


@dataclass(frozen=True, slots=True)
class _Geometry:
    nbytes: int
    stride: int
    data: int
    manifest_off: int
    manifest_len: int
    chunk: int
    n_chunks: int
    digests: int
    checksum: str


def _geometry(manifest_len: int, nbytes: int, chunk: int, checksum: str) -> _Geometry:
    n_chunks = max(1, -(-nbytes // chunk))
    manifest_off = PAGE_SIZE
    digests = manifest_off + round_up(manifest_len, PAGE_SIZE)
    data = digests + round_up(2 * n_chunks * DIGEST_BYTES, PAGE_SIZE)
    return _Geometry(
        nbytes,
        round_up(nbytes, PAGE_SIZE),
        data,
        manifest_off,
        manifest_len,
        chunk,
        n_chunks,
        digests,
        checksum,
    )


class _Base:
    """What writer and reader share: the mapping, control words, pin words, views."""

    def __init__(
        self, segment: Segment, header: mmap.mmap, fd: int, geo: _Geometry, manifest: Manifest
    ) -> None:
        self._segment = segment
        self._header = header
        self._fd = fd
        self.geometry = geo
        self.manifest = manifest
        self._ctl: npt.NDArray[np.int64] | None = np.frombuffer(header, "<i8", 4, _CTL_OFFSET)
        self._pins: npt.NDArray[np.uint64] | None = np.frombuffer(
            header, "<u8", MAX_PINS, _PINS_OFFSET
        )
        self._pids: npt.NDArray[np.uint64] | None = np.frombuffer(
            header, "<u8", MAX_PINS, _PIDS_OFFSET
        )
        dt = segment.ndarray(np.uint8, (2, geo.n_chunks, DIGEST_BYTES), geo.digests)
        self._digests = dt
        self._slots = [
            segment.ndarray(np.uint8, (geo.nbytes,), geo.data + s * geo.stride) for s in (0, 1)
        ]
        self._views: list[Mapping[str, npt.NDArray[Any]] | None] = [None, None]
        self._tensors: list[Mapping[str, Any] | None] = [None, None]
        self._pin_index = self._claim_pin()
        self._pinned: PinnedVersion | None = None
        self._closed = False

    @property
    def name(self) -> str:
        """The segment's name (what readers pass to :func:`attach_weights`)."""
        return self._segment.name

    @property
    def chunk_bytes(self) -> int:
        return self.geometry.chunk

    @property
    def n_chunks(self) -> int:
        return self.geometry.n_chunks

    @property
    def nbytes(self) -> int:
        return self.geometry.nbytes

    def _claim_pin(self) -> int:
        assert self._pins is not None
        assert self._pids is not None
        i = claim_pin(self._fd, self._pins, self._pids)
        if i < 0:
            raise ResourceError(f"weight pool {self.name}: all {MAX_PINS} reader slots are taken")
        return i

    def ctl(self) -> npt.NDArray[np.int64]:
        if self._ctl is None:
            raise PoolError(f"weight pool {self.name}: used after close()")
        return self._ctl

    @property
    def active_slot(self) -> int:
        return int(self.ctl()[0])

    @property
    def active_version(self) -> int:
        """The version readers get now (-1: none published yet)."""
        ctl = self.ctl()
        s = int(ctl[0])
        return -1 if s < 0 else int(ctl[1 + s])

    def slot_version(self, slot: int) -> int:
        return int(self.ctl()[1 + slot])

    def views(self, slot: int) -> Mapping[str, npt.NDArray[Any]]:
        """Read-only numpy views of every tensor of ``slot`` (cached; bfloat16 as uint16)."""
        cached = self._views[slot]
        if cached is None:
            base = self._slots[slot]
            out: dict[str, npt.NDArray[Any]] = {}
            for t in self.manifest.tensors:
                a = base[t.offset : t.offset + t.nbytes].view(_np_dtype(t.dtype)).reshape(t.shape)
                a.flags.writeable = False
                out[t.name] = a
            cached = self._views[slot] = MappingProxyType(out)
        return cached

    def tensors(self, slot: int) -> Mapping[str, torch.Tensor]:
        """Torch tensors viewing ``slot`` (cached; no copy). They share the pool's memory:
        never write through them."""
        cached = self._tensors[slot]
        if cached is None:
            import torch

            out = {}
            with warnings.catch_warnings():
                # torch warns that it cannot mark the (read-only) view read-only itself.
                warnings.simplefilter("ignore", UserWarning)
                for t in self.manifest.tensors:
                    tensor = torch.from_numpy(self.views(slot)[t.name])
                    if t.dtype == "bfloat16":
                        tensor = tensor.view(torch.bfloat16)
                    out[t.name] = tensor
            cached = self._tensors[slot] = MappingProxyType(out)
        return cached

    def raw(self, slot: int) -> npt.NDArray[np.uint8]:
        """The whole slot as bytes (read-only for readers)."""
        return self._slots[slot]

    def chunk(self, slot: int, index: int) -> npt.NDArray[np.uint8]:
        """Chunk ``index`` of ``slot`` (the last one may be short)."""
        c = self.geometry.chunk
        return self._slots[slot][index * c : (index + 1) * c]

    def chunk_digest(self, slot: int, index: int) -> bytes:
        return bytes(self._digests[slot, index].tobytes())

    def content_digest(self, slot: int) -> str:
        """The version's identity: BLAKE2b (hex, 16 bytes) over the layout digest and every chunk
        digest of ``slot`` in order; what the publisher announces with the version."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.manifest.digest().encode())
        h.update(self._digests[slot].tobytes())
        return h.hexdigest()

    def verify(self, slot: int) -> bool:
        """Recompute every chunk digest of ``slot`` and compare with the stored ones (a reader's
        end-to-end check; costs one pass over the bytes)."""
        if self.geometry.checksum == "none":
            return True
        fn = chunk_digester(self.geometry.checksum)
        return all(
            fn(self.chunk(slot, i)) == self.chunk_digest(slot, i) for i in range(self.n_chunks)
        )

    # -- pinning (readers, and a writer that serves its active version) --------------------------

    def pin(self, timeout: float = 5.0) -> PinnedVersion:
        """Pin the active version: its bytes do not change until :meth:`PinnedVersion.release`.
        Waits (polling) up to ``timeout`` seconds for a first version to be published; then
        :class:`~dvla_bus.errors.DeadlineExceeded`. One pin at a time per reader."""
        if self._pinned is not None:
            raise PoolError(f"weight pool {self.name}: already pinned (release it first)")
        ctl = self.ctl()
        pins = self._pins
        assert pins is not None
        what = f"weight pool {self.name}: no version published"
        v, s = acquire_pin(ctl, pins, self._pin_index, timeout, what)
        pinned = PinnedVersion(self, v, s)
        self._pinned = pinned
        return pinned

    def _unpin(self, pinned: PinnedVersion) -> None:
        if self._pinned is pinned:
            self._pinned = None
            if self._pins is not None:
                self._pins[self._pin_index] = 0

    def wait_version(self, at_least: int, timeout: float) -> int:
        """Poll until the active version is >= ``at_least``; returns it, or raises
        :class:`~dvla_bus.errors.DeadlineExceeded` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            v = self.active_version
            if v >= at_least:
                return v
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    f"weight pool {self.name}: version {at_least} not active within "
                    f"{timeout:.1f}s (active: {v})"
                )
            time.sleep(0.001)

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the pin, the reader slot and the mapping (idempotent). Views handed out keep the
        data mapping alive until they are garbage-collected (see :mod:`dvla_bus.shm`)."""
        if self._closed:
            return
        self._closed = True
        if self._pins is not None:
            self._pins[self._pin_index] = 0
            self._pids[self._pin_index] = 0  # type: ignore[index]
        self._pinned = None
        self._ctl = self._pins = self._pids = None
        self._views = [None, None]
        self._tensors = [None, None]
        self._slots = []
        del self._digests
        with contextlib.suppress(BufferError):
            self._header.close()
        os.close(self._fd)  # releases the OFD lock: the pin slot is free again
        self._segment.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(eq=False, slots=True)
class PinnedVersion:
    """A pinned version: ``version``, the ``slot`` it lives in, and zero-copy views of it. The
    bytes stay unchanged until :meth:`release` (or the ``with`` block ends); do not use the
    views afterwards."""

    pool: _Base
    version: int
    slot: int

    @property
    def arrays(self) -> Mapping[str, npt.NDArray[Any]]:
        return self.pool.views(self.slot)

    def tensors(self) -> Mapping[str, torch.Tensor]:
        return self.pool.tensors(self.slot)

    def raw(self) -> npt.NDArray[np.uint8]:
        return self.pool.raw(self.slot)

    def digest(self) -> str:
        """The version's content digest (see :meth:`WeightPool.content_digest`)."""
        return self.pool.content_digest(self.slot)

    def release(self) -> None:
        self.pool._unpin(self)

    def __enter__(self) -> PinnedVersion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class WeightReader(_Base):
    """A read-only attachment (see :func:`attach_weights`)."""


class WeightPool(_Base):
    """The writer's side of a host's weight pool (create with :func:`create_weight_pool`).

    Filling a version: :meth:`begin` (claims the staging slot, waiting for readers to let go),
    then :meth:`write_chunk` for every chunk in any order (or :meth:`write_arrays` for a whole
    model), then :meth:`commit` (the fence: staging becomes active). :meth:`abort` gives the
    slot up. :meth:`publish` does all of it for a learner holding the tensors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._digest = chunk_digester(self.geometry.checksum)
        self._have = bytearray(self.geometry.n_chunks)
        self._missing = 0
        self._staging = -1  # slot being written, -1 none
        self._staging_version = -1

    @property
    def staging_version(self) -> int:
        """The version being written (-1: none)."""
        return self._staging_version

    @property
    def staging_slot(self) -> int:
        return self._staging

    @property
    def missing(self) -> int:
        """Chunks of the staging version not yet written and verified."""
        return self._missing

    def has_chunk(self, index: int) -> bool:
        return self._staging >= 0 and bool(self._have[index])

    def _reuse(self) -> int:
        """Mark the non-active slot WRITING; returns it."""
        ctl = self.ctl()
        active = int(ctl[0])
        s = 0 if active < 0 else 1 - active
        ctl[1 + s] = WRITING
        memory_fence()
        return s

    def _pinners(self, slot: int) -> list[int]:
        """Pids of live readers pinning ``slot`` (stale pins of dead readers are cleared)."""
        assert self._pins is not None
        assert self._pids is not None
        return live_pinners(self._fd, self._pins, self._pids, slot, own=self._pin_index)

    def _start(self, version: int, slot: int) -> None:
        self._staging = slot
        self._staging_version = version
        self._have[:] = bytes(len(self._have))
        self._missing = self.geometry.n_chunks
        self._digests[slot] = 0

    def begin(self, version: int, timeout: float = 10.0) -> int:
        """Claim the staging slot for ``version`` (> the active one), abandoning any version
        being staged. Blocks (polling) until no reader pins the slot, at most ``timeout``
        seconds, then raises :class:`~dvla_bus.errors.DeadlineExceeded` naming the readers.
        Returns the slot index."""
        self._check_version(version)
        s = self._reuse()
        deadline = time.monotonic() + timeout
        while pinners := self._pinners(s):
            if time.monotonic() >= deadline:
                raise self._pinned_error(s, pinners, timeout)
            time.sleep(0.0005)
        self._start(version, s)
        return s

    async def begin_async(self, version: int, timeout: float = 10.0) -> int:
        """:meth:`begin` for an event loop (awaits instead of blocking it)."""
        import asyncio

        self._check_version(version)
        s = self._reuse()
        deadline = time.monotonic() + timeout
        while pinners := self._pinners(s):
            if time.monotonic() >= deadline:
                raise self._pinned_error(s, pinners, timeout)
            await asyncio.sleep(0.001)
        self._start(version, s)
        return s

    def _check_version(self, version: int) -> None:
        if version <= self.active_version:
            raise PoolError(
                f"weight pool {self.name}: version {version} is not newer than the active "
                f"{self.active_version}"
            )

    def _pinned_error(self, slot: int, pids: list[int], timeout: float) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"weight pool {self.name}: slot {slot} is still pinned by reader pid(s) "
            f"{sorted(set(pids))} after {timeout:.1f}s; a reader holds an old version too long "
            "(release pins between uses)"
        )

    def write_chunk(self, index: int, data: Any, digest: bytes | None = None) -> bool:
        """Copy chunk ``index`` (bytes-like, the chunk's exact length) into staging and check
        it. With ``digest`` (from the sender) a mismatch returns False and the chunk stays
        missing; without, the digest is computed and stored. Returns True when written (also
        for a duplicate, which is ignored)."""
        s = self._staging
        if s < 0:
            raise PoolError(f"weight pool {self.name}: write_chunk() before begin()")
        if not 0 <= index < self.geometry.n_chunks:
            raise PoolError(f"weight pool {self.name}: chunk {index} out of range")
        if self._have[index]:
            return True
        dst = self.chunk(s, index)
        src = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        if src.nbytes != dst.nbytes:
            raise PoolError(
                f"weight pool {self.name}: chunk {index} has {src.nbytes} B, expected {dst.nbytes}"
            )
        np.copyto(dst, src.reshape(-1).view(np.uint8), casting="no")
        got = self._digest(dst)
        if digest is not None and self.geometry.checksum != "none" and got != digest:
            return False
        self._digests[s, index] = np.frombuffer(got, np.uint8)
        self._have[index] = 1
        self._missing -= 1
        return True

    def write_arrays(self, arrays: Mapping[str, Any]) -> None:
        """Copy a whole model (names and shapes as in the manifest) into staging and compute
        every chunk digest."""
        s = self._staging
        if s < 0:
            raise PoolError(f"weight pool {self.name}: write_arrays() before begin()")
        slot = self._slots[s]
        for t in self.manifest.tensors:
            if t.name not in arrays:
                raise PoolError(f"weight pool {self.name}: tensor {t.name!r} missing")
            src = _flat_bytes(arrays[t.name])
            if src.nbytes != t.nbytes:
                raise PoolError(
                    f"weight pool {self.name}: tensor {t.name!r} has {src.nbytes} B, "
                    f"the manifest says {t.nbytes}"
                )
            np.copyto(slot[t.offset : t.offset + t.nbytes], src)
        self.seal_staging()

    def seal_staging(self) -> None:
        """Digest every chunk of staging as it stands (after filling :meth:`staging_raw`)."""
        s = self._staging
        for i in range(self.geometry.n_chunks):
            self._digests[s, i] = np.frombuffer(self._digest(self.chunk(s, i)), np.uint8)
        self._have[:] = b"\x01" * len(self._have)
        self._missing = 0

    def staging_raw(self) -> npt.NDArray[np.uint8]:
        """The staging slot's bytes, writable (fill, then :meth:`seal_staging`)."""
        if self._staging < 0:
            raise PoolError(f"weight pool {self.name}: no staging slot (call begin())")
        return self._slots[self._staging]

    def commit(self) -> int:
        """The fence: every chunk is in and verified, so staging becomes active (version N+1)
        for every reader that pins from now on. Returns the slot."""
        s = self._staging
        if s < 0 or self._missing:
            raise PoolError(
                f"weight pool {self.name}: commit with {self._missing} chunk(s) missing"
            )
        ctl = self.ctl()
        ctl[1 + s] = self._staging_version  # version first, then the pointer (TSO order)
        ctl[0] = s
        ctl[3] += 1
        self._staging = -1
        self._staging_version = -1
        return s

    def abort(self) -> None:
        """Give up the version being staged; the slot reads as empty."""
        if self._staging >= 0:
            self.ctl()[1 + self._staging] = EMPTY
        self._staging = -1
        self._staging_version = -1

    def publish(self, version: int, arrays: Mapping[str, Any], timeout: float = 10.0) -> str:
        """Stage ``arrays`` as ``version`` and flip it active at once (the source host);
        returns the content digest."""
        self.begin(version, timeout)
        self.write_arrays(arrays)
        digest = self.content_digest(self._staging)
        self.commit()
        return digest


def create_weight_pool(
    run: str,
    node: str,
    manifest: Manifest,
    *,
    name: str = "weights",
    chunk_bytes: int = 4 << 20,
    checksum: str = "blake2b",
) -> WeightPool:
    """Create this host's weight pool (owned by the calling process: the host's writer).
    All memory is allocated here; ``chunk_bytes`` and ``checksum`` come from the topology's
    ``[replication]``. Use as a context manager."""
    if checksum not in CHECKSUM_IDS:
        raise ConfigError(
            f"unknown checksum {checksum!r} (expected one of: {', '.join(CHECKSUM_IDS)})"
        )
    chunk_digester(checksum)  # fail now if it needs a missing package
    if type(chunk_bytes) is not int or chunk_bytes <= 0:
        raise ConfigError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    blob = manifest.encode()
    geo = _geometry(len(blob), manifest.nbytes, chunk_bytes, checksum)
    seg = create_segment(run, node, name, geo.data + 2 * geo.stride)
    try:
        mm = seg.mapping()
        mm[geo.manifest_off : geo.manifest_off + len(blob)] = blob
        ctl = np.frombuffer(mm, "<i8", 4, _CTL_OFFSET)
        ctl[:] = (-1, EMPTY, EMPTY, 0)
        del ctl
        _HEADER.pack_into(
            mm,
            0,
            0,
            LAYOUT_VERSION,
            CHECKSUM_IDS[checksum],
            geo.nbytes,
            geo.stride,
            geo.data,
            geo.manifest_off,
            len(blob),
            geo.chunk,
            geo.n_chunks,
            geo.digests,
            os.getpid(),
        )
        struct.pack_into("<Q", mm, 0, MAGIC)  # last: a reader seeing it sees a whole header
        return WeightPool(seg, *open_pin_header(seg.name), geo, manifest)
    except BaseException:
        seg.close()
        raise


def attach_weights(segment: str) -> WeightReader:
    """Attach a host's weight pool by segment name (advertised by its writer). The payload is
    mapped read-only, once; only the header page (pin words) is writable. Raises
    :class:`~dvla_bus.errors.ResourceError` if it cannot be mapped and
    :class:`~dvla_bus.errors.PoolError` if it is not a weight pool."""
    seg = attach_segment(segment, writable=False)
    try:
        mm = seg.mapping()
        if len(mm) < PAGE_SIZE:
            raise PoolError(f"segment {segment}: too small for a weight pool")
        fields = _HEADER.unpack_from(mm, 0)
        (
            magic,
            layout,
            checksum_id,
            nbytes,
            stride,
            data,
            m_off,
            m_len,
            chunk,
            n_chunks,
            digests,
            _,
        ) = fields
        if magic != MAGIC or layout != LAYOUT_VERSION:
            raise PoolError(f"segment {segment}: not a weight pool (layout {LAYOUT_VERSION})")
        checksum = next(k for k, v in CHECKSUM_IDS.items() if v == checksum_id)
        manifest = Manifest.decode(bytes(mm[m_off : m_off + m_len]))
        geo = _Geometry(nbytes, stride, data, m_off, m_len, chunk, n_chunks, digests, checksum)
        if data + 2 * stride > len(mm) or manifest.nbytes != nbytes:
            raise PoolError(f"segment {segment}: weight pool header disagrees with its size")
        return WeightReader(seg, *open_pin_header(segment), geo, manifest)
    except BaseException:
        seg.close()
        raise


def find_weights(run: str) -> list[str]:
    """Names of the live weight pools of run ``run`` on this machine (a local reader's way to
    find its host's pool: the relay creates it when the first manifest arrives)."""
    from dvla_bus.shm import OwnerStatus, SegmentName, owner_status

    found = []
    for path in sorted(SHM_DIR.glob(f"dvla.{run}.*")):
        try:
            name = SegmentName.parse(path.name)
        except ResourceError:
            continue
        if name.run == run and name.name == "weights" and owner_status(name) is OwnerStatus.ALIVE:
            found.append(path.name)
    return found
