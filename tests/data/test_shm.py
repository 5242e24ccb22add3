"""Shared-memory segments: naming, creation (0600, exclusive, page-sized), attach, close."""

from __future__ import annotations

import gc
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvla_bus.errors import ResourceError
from dvla_bus.shm import (
    PAGE_SIZE,
    SHM_DIR,
    OwnerStatus,
    Segment,
    SegmentName,
    attach_segment,
    create_segment,
    owner_status,
)

COMPONENT = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", fullmatch=True)


def _mapped(name: str) -> bool:
    """Whether this process still maps the file ``name`` (``/proc/self/maps``)."""
    with open("/proc/self/maps") as f:
        return any(name in line for line in f)


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# --- names ---------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    run=COMPONENT,
    node=COMPONENT,
    name=COMPONENT,
    pid=st.integers(1, 4_194_304),
    start=st.integers(0, 10**15),
)
def test_name_round_trips(run: str, node: str, name: str, pid: int, start: int) -> None:
    parsed = SegmentName(run, node, pid, start, name)
    text = str(parsed)
    assert text == f"dvla.{run}.{node}.{pid}.{start}.{name}"
    assert len(text.encode()) <= 255  # NAME_MAX
    assert SegmentName.parse(text) == parsed


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=80))
def test_parse_accepts_only_canonical_names(text: str) -> None:
    try:
        parsed = SegmentName.parse(text)
    except ResourceError as exc:
        assert repr(text) in str(exc)  # the error names the segment
    else:
        assert str(parsed) == text


@pytest.mark.parametrize(
    "text",
    [
        "dvla.run.node.12.34",  # too few parts
        "dvla.run.node.12.34.name.x",  # too many
        "dvlx.run.node.12.34.name",
        "dvla.run.node.012.34.name",  # non-canonical pid
        "dvla.run.node.0.34.name",
        "dvla.run.node.12.034.name",
        "dvla.run.node.-1.34.name",
        "dvla..node.12.34.name",
        "dvla.run.-node.12.34.name",
        "dvla.run.node.12.34.na/me",
        "dvla.run.node.12.34." + "n" * 65,
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ResourceError, match="segment"):
        SegmentName.parse(text)


def test_invalid_components_raise_naming_the_segment(run_id: str) -> None:
    with pytest.raises(ResourceError, match=r"node 'a\.b'"):
        create_segment(run_id, "a.b", "x", 10)
    with pytest.raises(ResourceError, match="name"):
        SegmentName(run_id, "n", 1, 0, "")
    with pytest.raises(ResourceError, match="pid"):
        SegmentName(run_id, "n", 0, 0, "x")
    with pytest.raises(ResourceError, match="size"):
        create_segment(run_id, "n", "x", 0)


def test_owner_status_of_this_process() -> None:
    me = SegmentName.for_this_process("r", "n", "x")
    assert me.pid == os.getpid()
    assert owner_status(me) is OwnerStatus.ALIVE
    reused = SegmentName("r", "n", me.pid, me.start_time + 1, "x")
    assert owner_status(reused) is OwnerStatus.PID_REUSED
    with open("/proc/sys/kernel/pid_max") as f:
        never = int(f.read()) + 1
    assert owner_status(SegmentName("r", "n", never, 0, "x")) is OwnerStatus.DEAD


# --- create / attach -----------------------------------------------------------------------------


def test_create_is_private_page_sized_and_zeroed(run_id: str) -> None:
    with _umask(0o277), create_segment(run_id, "node", "seg", 5000) as seg:
        st_ = os.stat(SHM_DIR / seg.name)
        assert stat.S_IMODE(st_.st_mode) == 0o600  # forced, even against a narrowing umask
        assert st_.st_uid == os.geteuid()
        assert seg.size == 2 * PAGE_SIZE == st_.st_size
        assert seg.statistics().requested_size == 5000
        arr = seg.ndarray(np.uint8, (seg.size,))
        assert arr.ctypes.data % PAGE_SIZE == 0
        assert not arr.any()
        del arr
    with _umask(0), create_segment(run_id, "node", "wide", 10) as seg:
        assert stat.S_IMODE(os.stat(SHM_DIR / seg.name).st_mode) == 0o600


def test_create_is_exclusive(run_id: str) -> None:
    with create_segment(run_id, "n", "x", 100) as seg:
        with pytest.raises(ResourceError, match="already exists") as info:
            create_segment(run_id, "n", "x", 100)
        assert seg.name in str(info.value)
    # Closing unlinked it, so the name is free again.
    with create_segment(run_id, "n", "x", 100):
        pass


def test_attach_sees_writes_both_ways_and_read_only_is_enforced(run_id: str) -> None:
    with create_segment(run_id, "n", "x", 4096) as owner:
        mine = owner.ndarray(np.int64, (8,), 64)
        mine[:] = np.arange(8)
        with attach_segment(owner.name) as ro, attach_segment(owner.name, writable=True) as rw:
            theirs = ro.ndarray(np.int64, (8,), 64)
            assert theirs.tolist() == list(range(8))
            assert not theirs.flags.writeable
            with pytest.raises(ValueError, match="read-only"):
                theirs[0] = 1
            rw.ndarray(np.int64, (8,), 64)[3] = 42
            assert mine[3] == 42
            assert theirs[3] == 42
            # Same physical pages, different mappings of them.
            assert theirs.ctypes.data != mine.ctypes.data
            assert not ro.owner
            assert ro.statistics().requested_size == owner.size
            del theirs
        del mine


def test_attach_errors_name_the_segment(run_id: str) -> None:
    missing = str(SegmentName.for_this_process(run_id, "n", "missing"))
    with pytest.raises(ResourceError, match="does not exist") as info:
        attach_segment(missing)
    assert missing in str(info.value)
    with pytest.raises(ResourceError, match="not a dvla segment name"):
        attach_segment("not-a-segment")
    with (
        create_segment(run_id, "n", "x", 10) as seg,
        attach_segment(seg.name) as other,
        pytest.raises(ResourceError, match="only the creating process"),
    ):
        other.unlink()


def test_attach_refuses_a_dead_owners_segment(run_id: str) -> None:
    me = SegmentName.for_this_process(run_id, "n", "stale")
    stale = SegmentName(run_id, "n", me.pid, me.start_time + 1, "stale")  # pid reused
    path = SHM_DIR / str(stale)
    path.write_bytes(b"\0" * 16)
    try:
        with pytest.raises(ResourceError, match=r"owner pid \d+ is gone"):
            attach_segment(str(stale))
    finally:
        path.unlink()


def test_views_reject_out_of_bounds_and_misaligned(run_id: str) -> None:
    with create_segment(run_id, "n", "x", PAGE_SIZE) as seg:
        with pytest.raises(ResourceError, match="does not fit"):
            seg.ndarray(np.float64, (PAGE_SIZE // 8 + 1,))
        with pytest.raises(ResourceError, match="not aligned"):
            seg.ndarray(np.float64, (2,), 4)
        with pytest.raises(ResourceError, match="non-negative"):
            seg.ndarray(np.uint8, (-1,))
        with pytest.raises(ResourceError, match="cannot live in shared memory"):
            seg.ndarray(object, (1,))
        assert seg.ndarray(np.float32, (0,), PAGE_SIZE).size == 0


# --- close ---------------------------------------------------------------------------------------


def test_close_unmaps_and_unlinks(run_id: str) -> None:
    seg = create_segment(run_id, "n", "x", 100)
    name = seg.name
    assert _mapped(name)
    assert seg.close() is True
    assert seg.closed
    assert seg.statistics().unlinked
    assert not (SHM_DIR / name).exists()
    assert not _mapped(name)
    assert seg.close() is True  # idempotent
    with pytest.raises(ResourceError, match="used after close"):
        seg.ndarray(np.uint8, (1,))


def test_close_with_live_views_defers_the_unmap(run_id: str) -> None:
    seg = create_segment(run_id, "n", "x", 100)
    name = seg.name
    view = seg.ndarray(np.uint8, (100,))
    view[:] = 7
    with pytest.raises(ResourceError, match="views of it are still alive") as info:
        seg.close(strict=True)
    assert name in str(info.value)
    assert not seg.closed  # strict close leaves it usable...
    assert not (SHM_DIR / name).exists()  # ...but the owner's name is gone either way
    assert seg.close() is False  # deferred: the view keeps the pages
    assert seg.statistics().closed
    assert int(view.sum()) == 700  # still valid memory, no segfault
    del view
    gc.collect()
    assert not _mapped(name)


def test_garbage_collected_owner_unlinks(run_id: str) -> None:
    seg = create_segment(run_id, "n", "x", 100)
    path = SHM_DIR / seg.name
    assert path.exists()
    del seg
    gc.collect()
    assert not path.exists()


def test_early_unlink_keeps_the_mapping(run_id: str) -> None:
    with create_segment(run_id, "n", "x", 100) as seg:
        with attach_segment(seg.name, writable=True) as peer:
            seg.unlink()
            seg.unlink()  # idempotent
            assert not (SHM_DIR / seg.name).exists()
            peer.ndarray(np.uint8, (4,))[:] = 9
            assert seg.ndarray(np.uint8, (4,)).tolist() == [9, 9, 9, 9]
        with pytest.raises(ResourceError, match="does not exist"):
            attach_segment(seg.name)


def test_statistics_is_a_frozen_snapshot(run_id: str) -> None:
    import dataclasses

    with create_segment(run_id, "n", "x", 100) as seg:
        stats = seg.statistics()
    assert stats.owner
    assert stats.writable
    assert not stats.closed
    assert seg.statistics().closed
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.size = 1  # type: ignore[misc]
    assert isinstance(seg, Segment)
