"""The shared-memory reaper: removes ``/dev/shm`` segments whose owner process is gone.

A segment's name carries its creator's pid and start time (:class:`dvla_bus.shm.SegmentName`),
so the reaper can tell, from the name and ``/proc`` alone, whether the owner is still running —
also when the kernel has since given the pid to another process. It removes a segment only when
the owner is gone (:attr:`~dvla_bus.shm.OwnerStatus.DEAD` or
:attr:`~dvla_bus.shm.OwnerStatus.PID_REUSED`), the name is well-formed and the file is a regular
file owned by this user. Everything else — live owners' segments, names it cannot parse, other
users' files, anything not starting with ``dvla.`` — is left alone.

Removing a segment only removes its name: processes that still map it keep valid memory until
they unmap it. A dead owner cannot come back under the same (pid, start time), so deciding
"dead" and then unlinking has no race with the owner; a segment that disappears meanwhile (the
owner's own close, another reaper) is reported as *vanished*, not as an error.

Used by ``dvla bus list`` / ``dvla bus reap [--dry-run]``, by the supervisor periodically and at
node start-up. Safe to run concurrently from several processes.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from dvla_bus.errors import ResourceError
from dvla_bus.shm import (
    SEGMENT_PREFIX,
    SHM_DIR,
    OwnerStatus,
    SegmentName,
    owner_status,
    validate_component,
)

__all__ = ["ReapReport", "SegmentInfo", "list_segments", "reap"]


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """One entry of ``/dev/shm`` that looks like a dvla segment, with its owner's status."""

    file: str
    """The file name under the directory listed."""
    segment: SegmentName | None
    """The parsed name; None when :attr:`status` is UNRECOGNISED."""
    size: int
    """Bytes the file occupies (its length; tmpfs pages are reserved by the creator)."""
    uid: int
    status: OwnerStatus

    @property
    def removable(self) -> bool:
        """True when the reaper would remove it: the owner is gone."""
        return self.status in (OwnerStatus.DEAD, OwnerStatus.PID_REUSED)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (for ``dvla bus list --json``)."""
        seg = self.segment
        return {
            "file": self.file,
            "run": seg.run if seg else None,
            "node": seg.node if seg else None,
            "pid": seg.pid if seg else None,
            "start_time": seg.start_time if seg else None,
            "name": seg.name if seg else None,
            "size": self.size,
            "uid": self.uid,
            "status": str(self.status),
            "removable": self.removable,
        }


@dataclass(frozen=True, slots=True)
class ReapReport:
    """What one :func:`reap` call did (or, with ``dry_run``, would do)."""

    dry_run: bool
    removed: tuple[SegmentInfo, ...]
    """Segments of gone owners that were removed (dry run: that would be removed)."""
    kept: tuple[SegmentInfo, ...]
    """Segments of live owners (never touched)."""
    skipped: tuple[SegmentInfo, ...]
    """Unrecognised names and other users' files (never touched)."""
    vanished: tuple[str, ...]
    """Listed, then gone before the reaper got to them (removed by someone else)."""
    failed: tuple[tuple[str, str], ...]
    """(file, reason) for segments that could not be removed."""

    @property
    def bytes_freed(self) -> int:
        """Total size of :attr:`removed` (dry run: that would be freed)."""
        return sum(info.size for info in self.removed)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (for ``dvla bus reap --json``)."""
        return {
            "dry_run": self.dry_run,
            "removed": [i.as_dict() for i in self.removed],
            "kept": [i.as_dict() for i in self.kept],
            "skipped": [i.as_dict() for i in self.skipped],
            "vanished": list(self.vanished),
            "failed": [{"file": f, "reason": r} for f, r in self.failed],
            "bytes_freed": self.bytes_freed,
        }


def _inspect(directory: Path, file: str) -> SegmentInfo | None:
    """Classify one directory entry; None if it vanished or is not a file at all."""
    try:
        st = os.lstat(directory / file)
    except FileNotFoundError:
        return None
    try:
        parsed = SegmentName.parse(file)
    except ResourceError:
        return SegmentInfo(file, None, st.st_size, st.st_uid, OwnerStatus.UNRECOGNISED)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        return SegmentInfo(file, parsed, st.st_size, st.st_uid, OwnerStatus.FOREIGN)
    return SegmentInfo(file, parsed, st.st_size, st.st_uid, owner_status(parsed))


def list_segments(run: str | None = None, *, directory: Path = SHM_DIR) -> tuple[SegmentInfo, ...]:
    """Every entry of ``directory`` whose name starts with ``dvla``, sorted by file name, with
    its owner's status. With ``run``, only well-formed segments of that run. Touches nothing.

    ``directory`` is for tests; segments always live in ``/dev/shm``. A malformed ``run`` raises
    :class:`~dvla_bus.errors.ResourceError` (it could never match).
    """
    if run is not None:
        validate_component("run", run)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return ()
    found: list[SegmentInfo] = []
    for file in names:
        if not file.startswith(SEGMENT_PREFIX[:-1]):
            continue
        info = _inspect(directory, file)
        if info is None:
            continue
        if run is not None and (info.segment is None or info.segment.run != run):
            continue
        found.append(info)
    return tuple(found)


def reap(run: str | None = None, *, dry_run: bool = False, directory: Path = SHM_DIR) -> ReapReport:
    """Remove the segments (of ``run``, or of every run) whose owner process is gone.

    Never removes a live owner's segment, an unrecognised name or another user's file. With
    ``dry_run`` nothing is removed and :attr:`ReapReport.removed` lists what would be. Never
    raises for a single segment: failures are listed in :attr:`ReapReport.failed`.
    """
    removed: list[SegmentInfo] = []
    kept: list[SegmentInfo] = []
    skipped: list[SegmentInfo] = []
    vanished: list[str] = []
    failed: list[tuple[str, str]] = []
    for info in list_segments(run, directory=directory):
        if info.status is OwnerStatus.ALIVE:
            kept.append(info)
            continue
        if not info.removable:
            skipped.append(info)
            continue
        if dry_run:
            removed.append(info)
            continue
        try:
            os.unlink(directory / info.file)
        except FileNotFoundError:
            vanished.append(info.file)
        except OSError as exc:
            failed.append((info.file, f"{type(exc).__name__}: {exc.strerror or exc}"))
        else:
            removed.append(info)
    return ReapReport(
        dry_run=dry_run,
        removed=tuple(removed),
        kept=tuple(kept),
        skipped=tuple(skipped),
        vanished=tuple(vanished),
        failed=tuple(failed),
    )
