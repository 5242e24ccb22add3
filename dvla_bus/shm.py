"""Shared-memory segments: named files under ``/dev/shm``, mapped once, kept mapped.

A thin ``mmap`` layer instead of :mod:`multiprocessing.shared_memory`, whose resource tracker
unlinks segments and prints warnings behind our back when they cross processes.

Naming
------
Every segment dvla creates is called::

    dvla.<run>.<node>.<pid>.<starttime>.<name>

``run``, ``node`` and ``name`` are 1-64 characters from ``[A-Za-z0-9_-]``, starting with a letter
or digit (no dots: the dot is the separator). ``pid`` is the creating process's id and
``starttime`` its start time in clock ticks since boot (field 22 of ``/proc/<pid>/stat``); together
they identify the owner even after the kernel reuses the pid, which is what lets the reaper
(:mod:`dvla_bus.reaper`) remove the segments of a process that is gone - also after ``kill -9`` -
and never those of a live one. Names are at most 231 characters (``NAME_MAX`` is 255).

Lifecycle (ownership)
---------------------
* The **creator owns** the segment. :func:`create_segment` creates it with
  ``O_CREAT | O_EXCL | O_NOFOLLOW``, mode ``0600`` (forced with ``fchmod`` whatever the umask),
  sizes it with ``ftruncate`` rounded up to whole pages, reserves the pages with
  ``posix_fallocate`` (so a full ``/dev/shm`` fails here with an error instead of a ``SIGBUS`` on
  first write later) and maps it once with ``MAP_POPULATE`` (a fresh mapping page-faults; see
  MEASURED.md).
* The name stays in ``/dev/shm`` while the owner's :class:`Segment` is open, because consumers
  attach **by name, lazily** (when the first descriptor naming it arrives) and a restarted
  consumer must be able to attach again. The owner unlinks it in :meth:`Segment.close`, or
  earlier with :meth:`Segment.unlink` when it knows every peer has mapped it (moolib's
  early-unlink; existing mappings stay valid, later attaches fail). A segment the owner forgot
  to close is unlinked when its object is garbage-collected or the interpreter exits normally
  (a ``weakref.finalize``); after ``kill -9``, ``os._exit`` or a crash the reaper removes the
  name. A forked child never unlinks its parent's segment. A segment never outlives its owner
  by design: nothing is meant to persist across processes' lifetimes.
* :func:`attach_segment` maps an existing segment read-only (default) or read-write. It refuses
  segments whose owner is gone (their content is garbage awaiting the reaper). Attaching never
  unlinks.

Closing and live views
----------------------
Arrays from :meth:`Segment.ndarray` view the mapping without copying and keep it alive: a
mapping is never unmapped under a live view (that would turn a later read into a segfault).
:meth:`Segment.close` therefore *releases* the segment's own hold at once - the object is closed,
the owner's name is unlinked - and the pages are unmapped immediately if no view is alive,
otherwise as soon as the last view is garbage-collected (it returns ``False`` in that case).
``close(strict=True)`` instead raises :class:`~dvla_bus.errors.ResourceError` naming the segment
and leaves it open, for callers that want to prove no view leaked.

Thread and process safety: a :class:`Segment` may be shared by threads; ``close`` must not race
with ``ndarray`` on another thread. Cross-process synchronisation of the *contents* is the job of
the layer above (see :mod:`dvla_bus.pool`, which uses per-slab generation counters).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import re
import stat
import threading
import weakref
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dvla_bus.errors import ResourceError

__all__ = [
    "COMPONENT_MAX",
    "PAGE_SIZE",
    "SEGMENT_PREFIX",
    "SHM_DIR",
    "OwnerStatus",
    "Segment",
    "SegmentName",
    "SegmentStatistics",
    "attach_segment",
    "create_segment",
    "owner_status",
    "round_up",
    "validate_component",
]

SHM_DIR = Path("/dev/shm")
"""Where segments live (a tmpfs on Linux)."""

SEGMENT_PREFIX = "dvla."
"""Every segment name starts with this; the reaper ignores everything else."""

PAGE_SIZE = mmap.PAGESIZE
"""Segment sizes are rounded up to this; mappings start on a page boundary."""

COMPONENT_MAX = 64
"""Longest ``run``, ``node`` or ``name`` component, in characters."""

_COMPONENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_PID_RE = re.compile(r"[1-9][0-9]{0,9}")
_START_RE = re.compile(r"0|[1-9][0-9]{0,19}")


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple`` (both positive ints)."""
    return -(-value // multiple) * multiple


def validate_component(kind: str, value: object, segment: str | None = None) -> str:
    """Return ``value`` if it is a valid ``run``/``node``/``name`` component, else raise
    :class:`~dvla_bus.errors.ResourceError` naming ``kind`` (and ``segment`` when given)."""
    if not isinstance(value, str) or not _COMPONENT_RE.fullmatch(value):
        where = f"segment {segment!r}: " if segment is not None else ""
        raise ResourceError(
            f"{where}{kind} {value!r} is not a valid segment name component "
            f"(1-{COMPONENT_MAX} characters from [A-Za-z0-9_-], starting with a letter or digit)"
        )
    return value


# --- the owner's identity ------------------------------------------------------------------------


def _read_proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of ``pid``, or None if there is no such process.

    ``/proc/<pid>/stat`` is ``pid (comm) state ppid ...``; ``comm`` may contain spaces and
    parentheses, so fields are counted from the *last* ``)``. Start time is field 22.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    return rest[0].decode("ascii"), int(rest[19])


_own_identity: tuple[int, int] | None = None
_own_identity_lock = threading.Lock()


def _own_pid_and_start() -> tuple[int, int]:
    """This process's (pid, start time); recomputed after a fork."""
    global _own_identity
    pid = os.getpid()
    with _own_identity_lock:
        if _own_identity is None or _own_identity[0] != pid:
            found = _read_proc_stat(pid)
            if found is None:  # pragma: no cover - our own /proc entry always exists on Linux
                raise ResourceError(f"cannot read /proc/{pid}/stat for this process")
            _own_identity = (pid, found[1])
        return _own_identity


class OwnerStatus(StrEnum):
    """Whether the process that created a segment still exists."""

    ALIVE = "alive"
    """The pid exists with the start time in the name: the owner is running. Never reaped."""
    DEAD = "dead"
    """No process with that pid (or only a zombie): the owner is gone."""
    PID_REUSED = "pid-reused"
    """The pid exists but started at another time: the owner is gone, the pid was reused."""
    UNRECOGNISED = "unrecognised"
    """Starts with ``dvla`` but is not a well-formed segment name. Never touched."""
    FOREIGN = "foreign"
    """Well-formed but owned by another user (or not a regular file). Never touched."""


def owner_status(name: SegmentName) -> OwnerStatus:
    """ALIVE, DEAD or PID_REUSED for the process that ``name`` says created the segment.

    Assumes every dvla process sharing ``/dev/shm`` shares this process's pid namespace (a pid
    from another namespace would read as DEAD). A process whose ``/proc`` entry cannot be read for
    another reason counts as ALIVE: when unsure, never reap.
    """
    try:
        found = _read_proc_stat(name.pid)
    except (OSError, ValueError, IndexError):
        return OwnerStatus.ALIVE
    if found is None:
        return OwnerStatus.DEAD
    state, start = found
    if start != name.start_time:
        return OwnerStatus.PID_REUSED
    if state in ("Z", "X"):  # exited, not yet waited for: its mappings are gone
        return OwnerStatus.DEAD
    return OwnerStatus.ALIVE


@dataclass(frozen=True, slots=True)
class SegmentName:
    """The parsed form of ``dvla.<run>.<node>.<pid>.<starttime>.<name>``.

    Constructing one validates every component (:class:`~dvla_bus.errors.ResourceError` naming the
    segment otherwise); ``str()`` gives the file name under ``/dev/shm`` and
    ``SegmentName.parse(str(n)) == n``.
    """

    run: str
    node: str
    pid: int
    start_time: int
    """Owner's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22)."""
    name: str

    def __post_init__(self) -> None:
        shown = self._shown()
        validate_component("run", self.run, shown)
        validate_component("node", self.node, shown)
        validate_component("name", self.name, shown)
        if type(self.pid) is not int or not 0 < self.pid < 10**10:
            raise ResourceError(f"segment {shown!r}: pid {self.pid!r} must be a positive int")
        if type(self.start_time) is not int or not 0 <= self.start_time < 10**20:
            raise ResourceError(
                f"segment {shown!r}: start time {self.start_time!r} must be a non-negative int"
            )

    def _shown(self) -> str:
        return f"{SEGMENT_PREFIX}{self.run}.{self.node}.{self.pid}.{self.start_time}.{self.name}"

    def __str__(self) -> str:
        return self._shown()

    @property
    def path(self) -> Path:
        """The segment's file: ``/dev/shm/<str(self)>``."""
        return SHM_DIR / str(self)

    @classmethod
    def parse(cls, text: str) -> SegmentName:
        """Parse a segment file name; :class:`~dvla_bus.errors.ResourceError` if malformed."""
        parts = text.split(".")
        if len(parts) != 6 or parts[0] + "." != SEGMENT_PREFIX:
            raise ResourceError(
                f"segment {text!r}: not a dvla segment name "
                f"(expected {SEGMENT_PREFIX}<run>.<node>.<pid>.<starttime>.<name>)"
            )
        _, run, node, pid, start, name = parts
        if not _PID_RE.fullmatch(pid):
            raise ResourceError(f"segment {text!r}: pid {pid!r} is not a positive decimal int")
        if not _START_RE.fullmatch(start):
            raise ResourceError(
                f"segment {text!r}: start time {start!r} is not a canonical decimal int"
            )
        for kind, value in (("run", run), ("node", node), ("name", name)):
            validate_component(kind, value, text)
        return cls(run, node, int(pid), int(start), name)

    @classmethod
    def for_this_process(cls, run: str, node: str, name: str) -> SegmentName:
        """The name a segment created now by this process gets."""
        pid, start = _own_pid_and_start()
        return cls(run, node, pid, start, name)


# --- segments ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmentStatistics:
    """A snapshot of one :class:`Segment`. Sizes in bytes."""

    name: str
    size: int
    """Mapped size: the requested size rounded up to whole pages."""
    requested_size: int
    owner: bool
    """True in the process that created it (and unlinks it)."""
    writable: bool
    closed: bool
    unlinked: bool
    """The owner has removed the name (always False for an attacher)."""


def _unlink_if_owner(path: str, owner_pid: int) -> None:
    # Runs from Segment.close/unlink and, as a weakref finalizer, if a Segment is garbage
    # collected (or the interpreter exits) without being closed. A forked child inherits the
    # object but not the ownership: it must not remove its parent's segment.
    if os.getpid() != owner_pid:
        return
    # Already removed: by an earlier unlink, or by a reaper that judged us dead.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class Segment:
    """One mapped shared-memory segment. Create with :func:`create_segment` (owner) or
    :func:`attach_segment`; use as a context manager (``with ... as seg``) or call :meth:`close`.

    Mapping is page-aligned and stays mapped until closed. See the module docstring for the
    lifecycle, for what happens to live views on close, and for thread safety.
    """

    __slots__ = (
        "__weakref__",
        "_finalizer",
        "_lock",
        "_mm",
        "_name",
        "_owner",
        "_owner_pid",
        "_requested",
        "_size",
        "_unlinked",
        "_writable",
    )

    def __init__(
        self,
        name: str,
        mm: mmap.mmap,
        *,
        requested_size: int,
        owner: bool,
        writable: bool,
    ) -> None:
        """Internal: use :func:`create_segment` or :func:`attach_segment`."""
        self._name = name
        self._mm: mmap.mmap | None = mm
        self._size = len(mm)
        self._requested = requested_size
        self._owner = owner
        self._owner_pid = os.getpid()
        self._writable = writable
        self._unlinked = False
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize[[str, int], Segment] | None = (
            weakref.finalize(self, _unlink_if_owner, str(SHM_DIR / name), self._owner_pid)
            if owner
            else None
        )

    # -- properties ------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The file name under ``/dev/shm`` (what a consumer passes to :func:`attach_segment`)."""
        return self._name

    @property
    def size(self) -> int:
        """Mapped size in bytes (a multiple of :data:`PAGE_SIZE`)."""
        return self._size

    @property
    def owner(self) -> bool:
        return self._owner

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def closed(self) -> bool:
        return self._mm is None

    def statistics(self) -> SegmentStatistics:
        return SegmentStatistics(
            name=self._name,
            size=self._size,
            requested_size=self._requested,
            owner=self._owner,
            writable=self._writable,
            closed=self._mm is None,
            unlinked=self._unlinked,
        )

    def __repr__(self) -> str:
        state = "closed" if self._mm is None else ("rw" if self._writable else "ro")
        role = "owner" if self._owner else "attached"
        return f"<Segment {self._name} {self._size} B {role} {state}>"

    # -- access ----------------------------------------------------------------------------------

    def mapping(self) -> mmap.mmap:
        """The underlying ``mmap`` (for ``struct.pack_into`` and the like; do not close it)."""
        mm = self._mm
        if mm is None:
            raise ResourceError(f"segment {self._name}: used after close()")
        return mm

    def ndarray(
        self, dtype: npt.DTypeLike, shape: tuple[int, ...], offset: int = 0
    ) -> npt.NDArray[Any]:
        """A C-contiguous numpy view of ``shape`` x ``dtype`` at byte ``offset``, no copy.

        Read-only if the segment was attached read-only. ``offset`` must be a multiple of the
        dtype's alignment and the view must lie inside the segment. The view keeps the mapping
        alive (see the module docstring); ``torch.from_numpy`` of a writable view shares memory.
        """
        mm = self.mapping()
        dt = np.dtype(dtype)
        if dt.hasobject or dt.itemsize == 0:
            raise ResourceError(f"segment {self._name}: dtype {dt} cannot live in shared memory")
        # A negative dimension would reach frombuffer as count=-1, "the whole buffer".
        if any(type(d) is not int or d < 0 for d in shape):
            raise ResourceError(f"segment {self._name}: shape {shape!r} must be non-negative ints")
        count = math.prod(shape)
        nbytes = count * dt.itemsize
        if offset < 0 or offset + nbytes > self._size:
            raise ResourceError(
                f"segment {self._name}: view of {nbytes} B at offset {offset} does not fit "
                f"in {self._size} B"
            )
        if offset % dt.alignment:
            raise ResourceError(
                f"segment {self._name}: offset {offset} is not aligned for dtype {dt.str} "
                f"(alignment {dt.alignment})"
            )
        flat = np.frombuffer(mm, dtype=dt, count=count, offset=offset)
        return flat.reshape(shape)

    # -- lifecycle -------------------------------------------------------------------------------

    def unlink(self) -> None:
        """Owner only: remove the name now (peers that have mapped it keep their mapping; later
        attaches fail). Idempotent; :meth:`close` does it too."""
        if not self._owner:
            raise ResourceError(
                f"segment {self._name}: only the creating process unlinks it (this one attached)"
            )
        with self._lock:
            if not self._unlinked:
                self._unlinked = True
                if self._finalizer is not None:
                    self._finalizer()  # runs _unlink_if_owner once, then is dead

    def close(self, *, strict: bool = False) -> bool:
        """Unlink (owner) and release the mapping. Idempotent.

        Returns True if the pages were unmapped now, False if live numpy views still hold them
        (they are unmapped when the last view is garbage-collected; the views stay valid until
        then). With ``strict=True`` live views raise :class:`~dvla_bus.errors.ResourceError`
        instead and the segment stays open (the owner's name is still unlinked).
        """
        if self._owner:
            self.unlink()
        with self._lock:
            mm = self._mm
            if mm is None:
                return True
            try:
                mm.close()
            except BufferError:
                # Not even our own frame may pin the mapping: a traceback keeps frames alive.
                del mm
                if strict:
                    raise ResourceError(
                        f"segment {self._name}: numpy views of it are still alive; "
                        "drop them (del) before close(strict=True)"
                    ) from None
                # Drop our reference only: the views' buffer exports keep the mmap object
                # alive and its deallocation unmaps it once the last view is gone.
                self._mm = None
                return False
            self._mm = None
            return True

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_size(segment: str, size: object) -> int:
    if type(size) is not int or size <= 0:
        raise ResourceError(f"segment {segment}: size {size!r} must be a positive int (bytes)")
    return size


def create_segment(run: str, node: str, name: str, size: int, *, populate: bool = True) -> Segment:
    """Create, size and map a new segment owned by this process (see the module docstring).

    ``size`` in bytes is rounded up to whole pages; the contents start zeroed. ``populate``
    pre-faults the page tables (``MAP_POPULATE``) so the first write runs at full speed.
    Raises :class:`~dvla_bus.errors.ResourceError` naming the segment if the name is invalid or
    taken, or ``/dev/shm`` cannot hold it.
    """
    seg_name = str(SegmentName.for_this_process(run, node, name))
    requested = _check_size(seg_name, size)
    mapped = round_up(requested, PAGE_SIZE)
    path = SHM_DIR / seg_name
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ResourceError(
            f"segment {seg_name}: already exists (this process created it and has not "
            "closed it; pick another name)"
        ) from None
    except OSError as exc:
        raise ResourceError(f"segment {seg_name}: cannot create {path}: {exc}") from exc
    mm: mmap.mmap | None = None
    try:
        os.fchmod(fd, 0o600)  # the umask may have narrowed it; never wider than the user
        os.ftruncate(fd, mapped)
        # Reserve the pages now: on tmpfs an unreserved page that cannot be allocated later is
        # a SIGBUS on first touch, which no Python code can catch.
        os.posix_fallocate(fd, 0, mapped)
        mflags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        mm = mmap.mmap(fd, mapped, flags=mflags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise ResourceError(
            f"segment {seg_name}: cannot size/map {mapped} B in {SHM_DIR}: {exc} "
            "(is /dev/shm full? `df -h /dev/shm`; `dvla bus reap` frees dead owners' segments)"
        ) from exc
    os.close(fd)  # the mapping holds its own reference to the file
    return Segment(seg_name, mm, requested_size=requested, owner=True, writable=True)


def attach_segment(segment: str, *, writable: bool = False, populate: bool = True) -> Segment:
    """Map an existing segment by its full name (``Segment.name`` of the owner).

    Read-only by default (writes through a view raise ``ValueError``). Raises
    :class:`~dvla_bus.errors.ResourceError` naming the segment if the name is malformed, the
    segment does not exist (never created, or already unlinked by its owner or the reaper), its
    owner process is gone, it is not a regular file owned by this user, or it is empty.
    """
    parsed = SegmentName.parse(segment)
    status = owner_status(parsed)
    if status is not OwnerStatus.ALIVE:
        raise ResourceError(
            f"segment {segment}: owner pid {parsed.pid} is gone ({status}); "
            "its contents are stale and `dvla bus reap` will remove it"
        )
    path = SHM_DIR / segment
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ResourceError(
            f"segment {segment}: does not exist in {SHM_DIR} (never created, or already "
            "unlinked by its owner)"
        ) from None
    except OSError as exc:
        raise ResourceError(f"segment {segment}: cannot open {path}: {exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise ResourceError(
                f"segment {segment}: not a regular file owned by uid {os.geteuid()}; refusing"
            )
        if st.st_size <= 0:
            raise ResourceError(f"segment {segment}: is empty (owner still creating it?)")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mflags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        try:
            mm = mmap.mmap(fd, st.st_size, flags=mflags, prot=prot)
        except OSError as exc:
            raise ResourceError(f"segment {segment}: cannot map {st.st_size} B: {exc}") from exc
    finally:
        os.close(fd)
    return Segment(segment, mm, requested_size=st.st_size, owner=False, writable=writable)
