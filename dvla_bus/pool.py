"""The slab pool: N preallocated fixed-size slabs in one shared-memory segment.

One class serves both halves of the dual-pool design: the *trajectory pool* (many slabs, one per
rollout/observation batch in flight) and the *weight pool* (two slabs - active and staging - each
holding the model's flat parameter layout). The pool moves no bytes by itself; it hands out
zero-copy numpy views and keeps the bookkeeping that makes reuse safe.

Segment layout (all integers little-endian; offsets in bytes)::

    0    u64  magic  b"DVLAPOOL"       written last, so an attacher never sees a half-built header
    8    u32  header version (1)
    12   u32  reserved (0)
    16   u64  slab_count N
    24   u64  slab_size   usable bytes per slab (what a Layout must fit in)
    32   u64  slab_stride slab_size rounded up to the alignment (a page by default)
    40   u64  data_offset first slab; a multiple of the page size
    48   16 B reserved
    64   u64  generation[N]
    data_offset + i * slab_stride: slab i

Generations
-----------
Each slab has a 64-bit generation in the header, written only by the owner. It is **odd while
the slab is held** and even while it is free: :meth:`SlabPool.acquire_nowait` bumps it to an odd
value and stamps the handle with it, :meth:`SlabPool.release` bumps it to even. A handle or
descriptor is valid exactly while the slab's generation equals its own, so use-after-release,
double release, a release racing a reuse and descriptors of another pool all raise
:class:`~dvla_bus.errors.PoolError` instead of silently reading someone else's data. Generations
start at a random even value per pool, so a descriptor from an earlier pool that happened to
have the same name cannot match by accident. Treat them as opaque (they stay below 2**53, so any
msgpack/JSON client can carry them).

A consumer in another process validates with :meth:`SlabPool.check` *before and after* reading
(a seqlock-style read): the producer bumps the generation before it rewrites a slab, so an
unchanged generation after the read proves the bytes read were the ones described. This relies
on x86-64's ordered stores and loads (the header and data are plain memory; Python exposes no
fences); on weakly ordered CPUs the check is best-effort.

Ownership and processes
-----------------------
The creating process owns the segment and the **free list** (in its own memory, a preallocated
ring of slab indices): only it acquires and releases. A consumer (:func:`attach_pool`) maps the
same segment by name, read-only by default, builds views for descriptors it receives and checks
generations; it hands a slab back by telling the producer (a credit/acknowledgement on the data
bus), which calls :meth:`SlabPool.release` with the descriptor or :meth:`SlabPool.release_index`.

Backpressure: when every slab is held, :meth:`~SlabPool.acquire_nowait` returns ``None``,
:meth:`~SlabPool.acquire` (threads) and :meth:`~SlabPool.acquire_async` (asyncio) wait up to a
deadline and then raise :class:`~dvla_bus.errors.DeadlineExceeded`. The pool never grows.

Allocation: the payload memory is allocated once at creation; views are cached per slab (the
same mapping of numpy arrays is returned for the same layout), the free list is a fixed ring of
ints. The steady-state acquire/view/release cycle creates only a small handle object that is
freed again on release: no net allocation (see the tracemalloc test).

Thread safety: acquire/release/close are thread-safe (one lock); ``view``/``check`` are lock-free
and may run on any thread. Views stay valid memory after release and after close (the mapping
lives until the last view is dropped, see :mod:`dvla_bus.shm`), but after release their content
belongs to the next holder: drop them or re-check the generation.

Devices: views are plain numpy arrays over shared memory; ``torch.from_numpy(view)`` shares the
memory (torch warns for read-only arrays: attach ``writable=True`` where torch tensors are
needed). Registering the segment as pinned memory for CUDA is the weight pool's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import re
import secrets
import struct
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from dvla_bus.errors import DeadlineExceeded, PoolError
from dvla_bus.shm import (
    PAGE_SIZE,
    Segment,
    attach_segment,
    create_segment,
    round_up,
)

__all__ = [
    "FIELD_ALIGNMENT",
    "MAX_FIELDS",
    "MAX_SLABS",
    "POOL_VERSION",
    "Field",
    "Layout",
    "PoolStatistics",
    "SlabDescriptor",
    "SlabHandle",
    "SlabPool",
    "attach_pool",
    "create_pool",
]

FIELD_ALIGNMENT: Final = 64
"""Every field offset is a multiple of this (a cache line; covers every dtype's alignment)."""

MAX_FIELDS: Final = 1 << 16
"""Most fields a layout may have (a weight manifest has one field per tensor)."""

MAX_SLABS: Final = 1 << 20
"""Most slabs a pool may have."""

POOL_VERSION: Final = 1
"""Header layout version written into and checked on every pool segment."""

_MAGIC: Final = int.from_bytes(b"DVLAPOOL", "little")
_HEADER: Final = struct.Struct("<QIIQQQQ")  # magic, version, reserved, count, size, stride, data
_GEN_OFFSET: Final = 64
_GEN_BITS: Final = 52  # random base below 2**53: safe in JSON/JavaScript numbers
_MAX_NDIM: Final = 32
_FIELD_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,255}")
_DTYPE_KINDS: Final = "biufcV"


# --- layouts -------------------------------------------------------------------------------------


def _as_int(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise PoolError(f"{what} must be an int, got {value!r}")
    return int(value)


@dataclass(frozen=True, slots=True)
class Field:
    """One named array inside a slab: ``shape`` x ``dtype`` at byte ``offset`` from the slab
    start, C-contiguous.

    ``dtype`` is any numpy dtype string of a plain number type (bool, int, uint, float, complex)
    or unstructured raw bytes (``"V2"`` carries bfloat16, which numpy lacks); it is stored in
    canonical form (``"float32"`` becomes ``"<f4"``). Big-endian and structured dtypes are
    refused. ``offset`` must be a multiple of :data:`FIELD_ALIGNMENT`. Invalid values raise
    :class:`~dvla_bus.errors.PoolError` naming the field. Plain fields, so msgspec encodes it.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _FIELD_NAME_RE.fullmatch(self.name):
            raise PoolError(
                f"layout field {self.name!r}: name must be 1-256 characters from "
                "[A-Za-z0-9_.:/-], not starting with '.', ':', '/' or '-'"
            )
        where = f"layout field {self.name!r}"
        if not isinstance(self.dtype, str):
            raise PoolError(f"{where}: dtype must be a string, got {self.dtype!r}")
        try:
            dt = np.dtype(self.dtype)
        except TypeError as exc:
            raise PoolError(f"{where}: dtype {self.dtype!r} is not a numpy dtype") from exc
        if (
            dt.kind not in _DTYPE_KINDS
            or dt.fields is not None
            or dt.subdtype is not None
            or dt.itemsize == 0
        ):
            raise PoolError(
                f"{where}: dtype {self.dtype!r} is not a plain number type or raw bytes "
                "(bool/int/uint/float/complex or 'V<n>')"
            )
        if dt.byteorder == ">":
            raise PoolError(f"{where}: dtype {self.dtype!r} is big-endian; use little-endian")
        if not isinstance(self.shape, tuple | list):
            raise PoolError(f"{where}: shape must be a tuple of ints, got {self.shape!r}")
        shape = tuple(_as_int(f"{where}: shape entry", d) for d in self.shape)
        if len(shape) > _MAX_NDIM or any(d < 0 for d in shape):
            raise PoolError(
                f"{where}: shape {shape} must have at most {_MAX_NDIM} non-negative dimensions"
            )
        offset = _as_int(f"{where}: offset", self.offset)
        if offset < 0 or offset % FIELD_ALIGNMENT:
            raise PoolError(
                f"{where}: offset {offset} must be a non-negative multiple of {FIELD_ALIGNMENT}"
            )
        # Normalise so equal layouts compare equal (and hit the view cache).
        object.__setattr__(self, "dtype", dt.str)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "offset", offset)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def end(self) -> int:
        """One past the field's last byte, from the slab start."""
        return self.offset + self.nbytes


@dataclass(frozen=True, slots=True)
class Layout:
    """The ordered fields of a slab. Validated on construction: 1 to :data:`MAX_FIELDS` fields,
    unique names, no two non-empty fields overlapping (:class:`~dvla_bus.errors.PoolError`
    otherwise). Whether it fits a given slab is checked when a view is built. Build one with
    :meth:`pack` unless the offsets come from elsewhere (a weight manifest, the wire)."""

    fields: tuple[Field, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.fields, tuple | list) or not all(
            isinstance(f, Field) for f in self.fields
        ):
            raise PoolError(f"layout: fields must be a tuple of Field, got {self.fields!r}")
        fields = tuple(self.fields)
        if not 1 <= len(fields) <= MAX_FIELDS:
            raise PoolError(f"layout: needs 1 to {MAX_FIELDS} fields, got {len(fields)}")
        seen: set[str] = set()
        for f in fields:
            if f.name in seen:
                raise PoolError(f"layout: field name {f.name!r} appears more than once")
            seen.add(f.name)
        spans = sorted((f.offset, f.end, f.name) for f in fields if f.nbytes)
        for (_, end, name), (start, _, other) in itertools.pairwise(spans):
            if start < end:
                raise PoolError(
                    f"layout: fields {name!r} and {other!r} overlap "
                    f"({name!r} ends at byte {end}, {other!r} starts at {start})"
                )
        object.__setattr__(self, "fields", fields)

    @property
    def nbytes(self) -> int:
        """Bytes a slab needs for this layout: the end of the last field."""
        return max(f.end for f in self.fields)

    def __getitem__(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def check_fits(self, slab_size: int, where: str = "layout") -> None:
        """Raise :class:`~dvla_bus.errors.PoolError` if the layout needs more than
        ``slab_size`` bytes."""
        need = self.nbytes
        if need > slab_size:
            raise PoolError(f"{where}: layout needs {need} B but a slab holds {slab_size} B")

    @classmethod
    def pack(
        cls,
        spec: Iterable[tuple[str, npt.DTypeLike, Sequence[int]]],
        *,
        alignment: int = FIELD_ALIGNMENT,
    ) -> Layout:
        """Lay out ``(name, dtype, shape)`` in order, each field at the next multiple of
        ``alignment`` bytes (a power of two >= :data:`FIELD_ALIGNMENT`); fields of a page or more
        start on a page boundary (unaligned large copies run ~10x slower, see MEASURED.md)."""
        if alignment < FIELD_ALIGNMENT or alignment & (alignment - 1):
            raise PoolError(
                f"layout: alignment {alignment} must be a power of two >= {FIELD_ALIGNMENT}"
            )
        fields: list[Field] = []
        cursor = 0
        for name, dtype, shape in spec:
            try:
                dt = np.dtype(dtype)
            except TypeError as exc:
                raise PoolError(f"layout field {name!r}: dtype {dtype!r} is not valid") from exc
            shape_t = tuple(_as_int(f"layout field {name!r}: shape entry", d) for d in shape)
            nbytes = math.prod(shape_t) * dt.itemsize
            align = max(alignment, PAGE_SIZE) if nbytes >= PAGE_SIZE else alignment
            offset = round_up(cursor, align)
            fields.append(Field(name, dt.str, shape_t, offset))
            cursor = offset + nbytes
        return cls(tuple(fields))


# --- handles and descriptors ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlabDescriptor:
    """What travels on the data bus instead of the bytes: which slab of which segment, under
    which acquisition, laid out how. Plain fields only (str/int/tuples of plain dataclasses), so
    the wire layer can encode it with msgspec. A receiver passes it to :meth:`SlabPool.view`."""

    segment: str
    """Full segment name (:attr:`SlabPool.name`), for :func:`attach_pool`."""
    index: int
    generation: int
    layout: Layout


@dataclass(frozen=True, slots=True, eq=False)
class SlabHandle:
    """The producer's in-process token for one acquired slab (index + the generation it was
    acquired under). Valid until released; every use checks the generation."""

    pool: SlabPool = field(repr=False)
    index: int
    generation: int

    def view(self, layout: Layout) -> Mapping[str, npt.NDArray[Any]]:
        """See :meth:`SlabPool.view`."""
        return self.pool.view(self, layout)

    def raw(self) -> npt.NDArray[np.uint8]:
        """See :meth:`SlabPool.raw`."""
        return self.pool.raw(self)

    def descriptor(self, layout: Layout) -> SlabDescriptor:
        """The descriptor to send to a consumer (checks the handle is still held)."""
        self.pool.verify(self)
        return SlabDescriptor(self.pool.name, self.index, self.generation, layout)

    def release(self) -> None:
        """See :meth:`SlabPool.release`."""
        self.pool.release(self)

    @property
    def valid(self) -> bool:
        """True while the slab is still held under this handle's generation."""
        return self.pool.check(self)


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of one pool. Sizes in bytes; counters since the pool was opened (in this
    process: an attached pool counts nothing but reports held/free from the shared header)."""

    segment: str
    owner: bool
    slab_count: int
    slab_size: int
    slab_stride: int
    held: int
    free: int
    acquires: int
    releases: int
    backpressure: int
    """Acquire calls that found no free slab (returned None, waited, or timed out)."""
    timeouts: int
    """Blocking acquires that hit their deadline."""
    closed: bool


# --- the pool ------------------------------------------------------------------------------------


# Pools owned by this process. A forked child inherits a copy of the owner's free list; if it
# acquired from it, parent and child would hand out the same slabs. The child therefore loses
# ownership at fork (it may still view and check, like an attached consumer).
_owned_pools: weakref.WeakSet[SlabPool] = weakref.WeakSet()


def _disown_after_fork() -> None:
    for pool in list(_owned_pools):
        pool._forked = True
    _owned_pools.clear()


os.register_at_fork(after_in_child=_disown_after_fork)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


SlabRef = SlabHandle | SlabDescriptor


class SlabPool:
    """N fixed-size slabs in one shared-memory segment. Open with :func:`create_pool` (owner:
    acquires and releases) or :func:`attach_pool` (consumer: views and checks). A context
    manager; see the module docstring for generations, ownership, backpressure and threads."""

    def __init__(self, segment: Segment, *, owner: bool) -> None:
        """Internal: use :func:`create_pool` / :func:`attach_pool`."""
        self._segment = segment
        self._name = segment.name
        self._owner = owner
        mm = segment.mapping()
        magic, version, _, count, size, stride, data = _HEADER.unpack_from(mm, 0)
        where = f"pool {self._name}"
        if magic != _MAGIC:
            raise PoolError(f"{where}: not a dvla pool segment (or its creator has not finished)")
        if version != POOL_VERSION:
            raise PoolError(f"{where}: header version {version}, this code reads {POOL_VERSION}")
        if not (
            1 <= count <= MAX_SLABS
            and 0 < size <= stride
            and data >= _GEN_OFFSET + 8 * count
            and data + count * stride <= segment.size
        ):
            raise PoolError(f"{where}: corrupt header (count {count}, size {size}, ...)")
        self._count: int = count
        self._slab_size: int = size
        self._stride: int = stride
        self._data: int = data
        # One memoryview over the generation words; released explicitly in close() so the
        # mapping can be unmapped.
        self._mv: memoryview | None = memoryview(mm)
        self._shm_gens: memoryview | None = self._mv[_GEN_OFFSET : _GEN_OFFSET + 8 * count].cast(
            "Q"
        )
        self._view_cache: list[tuple[Layout, Mapping[str, npt.NDArray[Any]]] | None] = [
            None
        ] * count
        self._raw_cache: list[npt.NDArray[np.uint8] | None] = [None] * count
        self._closed = False
        self._forked = False
        # Owner state (unused when attached).
        self._gens: list[int] = list(self._shm_gens) if owner else []
        self._free: list[int] = list(range(count)) if owner else []
        self._free_head = 0
        self._free_count = count if owner else 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sync_waiters = 0
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._acquires = 0
        self._releases = 0
        self._backpressure = 0
        self._timeouts = 0
        if owner:
            _owned_pools.add(self)

    # -- properties ------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The segment name consumers attach by (also in every descriptor)."""
        return self._name

    @property
    def owner(self) -> bool:
        return self._owner

    @property
    def slab_count(self) -> int:
        return self._count

    @property
    def slab_size(self) -> int:
        """Usable bytes per slab (what a layout must fit in)."""
        return self._slab_size

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def segment(self) -> Segment:
        return self._segment

    def __repr__(self) -> str:
        role = "owner" if self._owner else "attached"
        state = " closed" if self._closed else ""
        return f"<SlabPool {self._name} {self._count}x{self._slab_size} B {role}{state}>"

    def statistics(self) -> PoolStatistics:
        with self._lock:
            if self._owner:
                free = self._free_count
            elif self._shm_gens is not None:
                free = sum(1 for g in self._shm_gens if not g & 1)
            else:
                free = self._count  # closed consumer: it no longer sees the header
            return PoolStatistics(
                segment=self._name,
                owner=self._owner,
                slab_count=self._count,
                slab_size=self._slab_size,
                slab_stride=self._stride,
                held=self._count - free,
                free=free,
                acquires=self._acquires,
                releases=self._releases,
                backpressure=self._backpressure,
                timeouts=self._timeouts,
                closed=self._closed,
            )

    # -- internal checks -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PoolError(f"pool {self._name}: used after close()")

    def _require_owner(self, what: str) -> None:
        self._check_open()
        if self._forked:
            raise PoolError(
                f"pool {self._name}: {what} in a forked child; only the creating process owns "
                "the free list (attach_pool() in the child to view slabs)"
            )
        if not self._owner:
            raise PoolError(
                f"pool {self._name}: {what} is for the creating process only; a consumer hands "
                "a slab back by acknowledging its descriptor to the producer"
            )

    def _resolve(self, ref: SlabRef) -> tuple[int, int]:
        """(index, generation) of ``ref`` after checking it belongs to this pool."""
        if isinstance(ref, SlabHandle):
            if ref.pool is not self:
                raise PoolError(
                    f"pool {self._name}: handle belongs to another pool ({ref.pool.name})"
                )
        elif isinstance(ref, SlabDescriptor):
            if ref.segment != self._name:
                raise PoolError(
                    f"pool {self._name}: descriptor names another segment ({ref.segment})"
                )
        else:
            raise PoolError(f"pool {self._name}: expected a SlabHandle or SlabDescriptor: {ref!r}")
        self._check_index(ref.index)
        return ref.index, ref.generation

    def _check_index(self, index: int) -> None:
        if type(index) is not int or not 0 <= index < self._count:
            raise PoolError(
                f"pool {self._name}: slab index {index!r} out of range 0..{self._count - 1}"
            )

    def _current(self, index: int) -> int:
        if self._owner:
            return self._gens[index]
        gens = self._shm_gens
        if gens is None:
            raise PoolError(f"pool {self._name}: used after close()")
        return int(gens[index])

    def _stale(self, index: int, generation: int, current: int) -> PoolError:
        if not generation & 1:
            why = "is not an acquire generation (foreign or corrupt descriptor)"
        elif current == generation + 1:
            why = "was released (use after release, or double release)"
        elif current > generation:
            why = f"was released and reacquired since (now generation {current})"
        else:
            why = f"is from the future (slab is at generation {current}): foreign pool?"
        return PoolError(f"pool {self._name}: slab {index} generation {generation} {why}")

    # -- acquire / release (owner) ---------------------------------------------------------------

    def _try_acquire_locked(self) -> SlabHandle | None:
        self._check_open()  # again under the lock: close() may have run on another thread
        if self._free_count == 0:
            return None
        index = self._free[self._free_head]
        self._free_head = (self._free_head + 1) % self._count
        self._free_count -= 1
        gen = self._gens[index] + 1
        self._gens[index] = gen
        # Bump before anyone writes the slab again: a consumer's check() after its read sees
        # the change (seqlock-style).
        assert self._shm_gens is not None
        self._shm_gens[index] = gen
        self._acquires += 1
        return SlabHandle(self, index, gen)

    def acquire_nowait(self) -> SlabHandle | None:
        """A free slab, or None when all are held (backpressure). Owner only; thread-safe."""
        self._require_owner("acquire")
        with self._lock:
            handle = self._try_acquire_locked()
            if handle is None:
                self._backpressure += 1
            return handle

    def acquire(self, timeout: float) -> SlabHandle:
        """A free slab, waiting up to ``timeout`` seconds for a release on another thread; then
        :class:`~dvla_bus.errors.DeadlineExceeded`. Owner only. Do not call it on the thread that
        would release (an event loop: use :meth:`acquire_async`)."""
        self._require_owner("acquire")
        deadline = time.monotonic() + timeout
        with self._cond:
            handle = self._try_acquire_locked()
            if handle is not None:
                return handle
            self._backpressure += 1
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._timeouts += 1
                    raise self._deadline(timeout)
                self._sync_waiters += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._sync_waiters -= 1
                self._check_open()
                handle = self._try_acquire_locked()
                if handle is not None:
                    return handle

    async def acquire_async(self, timeout: float) -> SlabHandle:
        """Like :meth:`acquire` but awaits instead of blocking the event loop; a release on any
        thread wakes it. Cancellation-safe (a cancelled waiter holds no slab)."""
        self._require_owner("acquire")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        counted = False
        while True:
            with self._lock:
                handle = self._try_acquire_locked()
                if handle is not None:
                    return handle
                if not counted:
                    self._backpressure += 1
                    counted = True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self._timeouts += 1
                    raise self._deadline(timeout)
                waiter = (loop, loop.create_future())
                self._async_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter[1], remaining)
            except TimeoutError:
                pass  # loop round: a slab freed right at the deadline still counts
            finally:
                with self._lock:
                    if waiter in self._async_waiters:
                        self._async_waiters.remove(waiter)
            self._check_open()

    def _deadline(self, timeout: float) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"pool {self._name}: no free slab within {timeout:.3f} s "
            f"(all {self._count} held: consumers are not releasing; backpressure)"
        )

    def release(self, ref: SlabRef) -> None:
        """Return a slab to the free list, by its handle or the descriptor a consumer
        acknowledged. Owner only; thread-safe. Raises :class:`~dvla_bus.errors.PoolError` for a
        double release, a stale or foreign handle/descriptor."""
        self._require_owner("release")
        index, gen = self._resolve(ref)
        self._release(index, gen)

    def release_index(self, index: int, generation: int) -> None:
        """:meth:`release` by plain ints (e.g. straight from an acknowledgement message)."""
        self._require_owner("release")
        self._check_index(index)
        self._release(index, generation)

    def _release(self, index: int, generation: int) -> None:
        with self._lock:
            self._check_open()
            current = self._gens[index]
            if current != generation or not generation & 1:
                raise self._stale(index, generation, current)
            self._gens[index] = generation + 1
            assert self._shm_gens is not None
            self._shm_gens[index] = generation + 1
            tail = (self._free_head + self._free_count) % self._count
            self._free[tail] = index
            self._free_count += 1
            self._releases += 1
            if self._sync_waiters:
                self._cond.notify()
            if self._async_waiters:
                self._wake_async_locked()

    def _wake_async_locked(self) -> None:
        # Wake every async waiter (they re-check under the lock): waking only one could hand
        # the wake-up to a waiter that is being cancelled and strand the others.
        for loop, fut in self._async_waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed; its waiter is gone
                loop.call_soon_threadsafe(_wake, fut)
        self._async_waiters.clear()

    # -- views (owner and consumers) -------------------------------------------------------------

    def check(self, ref: SlabRef) -> bool:
        """True while the slab is still held under ``ref``'s generation, i.e. the producer has
        neither released nor reused it. Call after reading to validate what was read. Raises
        :class:`~dvla_bus.errors.PoolError` only for a foreign ``ref`` or a closed pool."""
        self._check_open()
        index, gen = self._resolve(ref)
        return self._current(index) == gen

    def verify(self, ref: SlabRef) -> None:
        """:meth:`check`, raising :class:`~dvla_bus.errors.PoolError` (saying why) if stale."""
        self._check_open()
        index, gen = self._resolve(ref)
        current = self._current(index)
        if current != gen or not gen & 1:
            raise self._stale(index, gen, current)

    def view(self, ref: SlabRef, layout: Layout | None = None) -> Mapping[str, npt.NDArray[Any]]:
        """Zero-copy numpy arrays, by field name, over the slab ``ref`` names.

        ``layout`` defaults to the descriptor's. Verifies the generation first
        (:class:`~dvla_bus.errors.PoolError` if stale) and that the layout fits the slab. Arrays
        are read-only for a read-only attachment. The same mapping object is returned again for
        the same slab and layout (cached: no allocation in steady state); do not keep arrays
        past the release of the slab.
        """
        self.verify(ref)
        if layout is None:
            if not isinstance(ref, SlabDescriptor):
                raise PoolError(f"pool {self._name}: view of a handle needs a layout")
            layout = ref.layout
        index = ref.index
        cached = self._view_cache[index]
        if cached is not None and (cached[0] is layout or cached[0] == layout):
            return cached[1]
        layout.check_fits(self._slab_size, f"pool {self._name}")
        base = self._data + index * self._stride
        arrays = {
            f.name: self._segment.ndarray(f.dtype, f.shape, base + f.offset) for f in layout.fields
        }
        views: Mapping[str, npt.NDArray[Any]] = MappingProxyType(arrays)
        self._view_cache[index] = (layout, views)
        return views

    def raw(self, ref: SlabRef) -> npt.NDArray[np.uint8]:
        """The whole slab as ``slab_size`` bytes (uint8), zero-copy; verifies the generation.
        For byte-level transfers such as weight chunks."""
        self.verify(ref)
        index = ref.index
        cached = self._raw_cache[index]
        if cached is None:
            base = self._data + index * self._stride
            cached = self._segment.ndarray(np.uint8, (self._slab_size,), base)
            self._raw_cache[index] = cached
        return cached

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self, *, strict: bool = False) -> bool:
        """Release the pool: waiters get :class:`~dvla_bus.errors.PoolError`, the view caches
        are dropped, the owner unlinks the segment, the mapping is released (deferred while
        user-held views are alive; ``strict=True`` raises instead - see
        :meth:`dvla_bus.shm.Segment.close`). Returns True if unmapped now. Idempotent.

        Consumers that are still attached keep their mapping; a producer closing with slabs
        still out means their descriptors will no longer attach (the name is gone)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._cond.notify_all()
                self._wake_async_locked()
                self._view_cache = [None] * self._count
                self._raw_cache = [None] * self._count
                if self._shm_gens is not None:
                    self._shm_gens.release()
                    self._shm_gens = None
                if self._mv is not None:
                    self._mv.release()
                    self._mv = None
        return self._segment.close(strict=strict)

    def __enter__(self) -> SlabPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_pool(
    run: str,
    node: str,
    name: str,
    *,
    slab_count: int,
    slab_size: int,
    alignment: int = PAGE_SIZE,
    populate: bool = True,
) -> SlabPool:
    """Create a pool of ``slab_count`` slabs of ``slab_size`` bytes in a new segment owned by
    this process (name: see :mod:`dvla_bus.shm`). Each slab starts on a multiple of
    ``alignment`` (a power of two >= :data:`FIELD_ALIGNMENT`, default a page). All memory is
    allocated here, zeroed; it never grows. Use as a context manager."""
    where = f"pool {run}/{node}/{name}"
    if type(slab_count) is not int or not 1 <= slab_count <= MAX_SLABS:
        raise PoolError(f"{where}: slab_count {slab_count!r} must be an int in 1..{MAX_SLABS}")
    if type(slab_size) is not int or slab_size <= 0:
        raise PoolError(f"{where}: slab_size {slab_size!r} must be a positive int (bytes)")
    if (
        type(alignment) is not int
        or alignment < FIELD_ALIGNMENT
        or alignment & (alignment - 1)
        or alignment > PAGE_SIZE
    ):
        raise PoolError(
            f"{where}: alignment {alignment!r} must be a power of two in "
            f"{FIELD_ALIGNMENT}..{PAGE_SIZE}"
        )
    stride = round_up(slab_size, alignment)
    data = round_up(_GEN_OFFSET + 8 * slab_count, PAGE_SIZE)
    segment = create_segment(run, node, name, data + slab_count * stride, populate=populate)
    try:
        mm = segment.mapping()
        gens = np.frombuffer(mm, dtype="<u8", count=slab_count, offset=_GEN_OFFSET)
        gens[:] = secrets.randbits(_GEN_BITS) & ~1  # even: every slab starts free
        del gens  # drop the export, or close() could not unmap
        _HEADER.pack_into(mm, 0, 0, POOL_VERSION, 0, slab_count, slab_size, stride, data)
        # Magic last: an attacher that sees it sees a complete header (x86 store order).
        struct.pack_into("<Q", mm, 0, _MAGIC)
        return SlabPool(segment, owner=True)
    except BaseException:
        segment.close()
        raise


def attach_pool(segment: str, *, writable: bool = False, populate: bool = True) -> SlabPool:
    """Attach the pool in segment ``segment`` (a descriptor's ``segment``), read-only unless
    ``writable`` (a consumer that writes results into the slab, or wants torch tensors). Raises
    :class:`~dvla_bus.errors.ResourceError` if the segment cannot be mapped (gone, owner dead)
    and :class:`~dvla_bus.errors.PoolError` if it is not a pool. Use as a context manager."""
    seg = attach_segment(segment, writable=writable, populate=populate)
    try:
        return SlabPool(seg, owner=False)
    except BaseException:
        seg.close()
        raise
