"""The slab pool: layouts, generations and misuse, zero-copy across processes, backpressure,
no allocation in steady state."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import itertools
import json
import os
import sys
import threading
import tracemalloc
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvla_bus.errors import DeadlineExceeded, PoolError, ResourceError
from dvla_bus.pool import (
    FIELD_ALIGNMENT,
    Field,
    Layout,
    SlabDescriptor,
    SlabPool,
    attach_pool,
    create_pool,
)
from dvla_bus.shm import PAGE_SIZE, SHM_DIR, create_segment
from tests.data._procs import Child

TRAJ = Layout.pack(
    [("obs", np.uint8, (4, 16, 16)), ("action", np.int64, (4,)), ("reward", np.float32, (4,))]
)


# --- layouts -------------------------------------------------------------------------------------


def test_pack_aligns_and_normalises() -> None:
    layout = Layout.pack([("a", "float32", (3,)), ("b", np.int16, [2, 2]), ("c", "u1", (5000,))])
    assert [f.offset for f in layout.fields] == [0, 64, PAGE_SIZE]  # big fields page-aligned
    assert layout["a"].dtype == "<f4"
    assert layout["b"].shape == (2, 2)
    assert layout.nbytes == PAGE_SIZE + 5000
    assert Field("a", "float32", (3,), 0) == Field("a", "<f4", (3,), 0)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ((), "1 to"),
        ((Field("a", "f4", (1,), 0), Field("a", "f4", (1,), 64)), "more than once"),
        ((Field("a", "f4", (32,), 0), Field("b", "f4", (1,), 64)), "overlap"),
    ],
)
def test_layout_rejects(fields: tuple[Field, ...], match: str) -> None:
    with pytest.raises(PoolError, match=match):
        Layout(fields)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": ".x"}, "name"),
        ({"name": ""}, "name"),
        ({"dtype": "O"}, "plain number"),
        ({"dtype": "f4,i4"}, "plain number"),
        ({"dtype": ">f4"}, "big-endian"),
        ({"dtype": "nonsense"}, "not a numpy dtype"),
        ({"shape": (-1,)}, "non-negative"),
        ({"shape": (True,)}, "must be an int"),
        ({"shape": "12"}, "tuple of ints"),
        ({"offset": 8}, "multiple of 64"),
        ({"offset": -64}, "multiple of 64"),
    ],
)
def test_field_rejects(kwargs: dict[str, object], match: str) -> None:
    base: dict[str, object] = {"name": "x", "dtype": "f4", "shape": (2,), "offset": 0}
    with pytest.raises(PoolError, match=match):
        Field(**{**base, **kwargs})  # type: ignore[arg-type]


FIELD_SPEC = st.lists(
    st.tuples(
        st.sampled_from(["u1", "i2", "<f4", "f8", "c16", "bool", "V2"]),
        st.lists(st.integers(0, 40), max_size=3),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(spec=FIELD_SPEC, alignment=st.sampled_from([64, 128, 4096]))
def test_packed_layouts_are_valid_disjoint_and_aligned(
    spec: list[tuple[str, list[int]]], alignment: int
) -> None:
    layout = Layout.pack(
        [(f"f{i}", dt, tuple(shape)) for i, (dt, shape) in enumerate(spec)], alignment=alignment
    )
    spans = sorted((f.offset, f.end) for f in layout.fields if f.nbytes)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    assert all(f.offset % alignment == 0 for f in layout.fields)
    # Re-validating the same fields (as a decoder would) accepts them unchanged.
    assert Layout(tuple(layout.fields)) == layout


@settings(max_examples=200, deadline=None)
@given(
    offsets=st.lists(st.integers(0, 40).map(lambda k: k * FIELD_ALIGNMENT), min_size=1, max_size=6),
    sizes=st.lists(st.integers(0, 300), min_size=6, max_size=6),
)
def test_layout_accepts_exactly_the_non_overlapping(offsets: list[int], sizes: list[int]) -> None:
    fields = tuple(Field(f"f{i}", "u1", (sizes[i],), off) for i, off in enumerate(offsets))
    spans = [(f.offset, f.end) for f in fields if f.nbytes]
    overlapping = any(
        a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1 :]
    )
    if overlapping:
        with pytest.raises(PoolError, match="overlap"):
            Layout(fields)
    else:
        assert Layout(fields).nbytes == max(f.end for f in fields)


def test_descriptor_round_trips_through_msgspec() -> None:
    desc = SlabDescriptor("dvla.r.n.1.2.x", 3, 7, TRAJ)
    data = msgspec.msgpack.encode(desc)
    assert msgspec.msgpack.decode(data, type=SlabDescriptor) == desc
    bad = msgspec.msgpack.encode(
        {
            "segment": "s",
            "index": 0,
            "generation": 1,
            "layout": {"fields": [{"name": "a", "dtype": "O", "shape": [1], "offset": 0}]},
        }
    )
    with pytest.raises(PoolError, match="plain number"):  # validation runs on decode too
        msgspec.msgpack.decode(bad, type=SlabDescriptor)


# --- acquire / release / generations -------------------------------------------------------------


def test_pool_geometry_and_statistics(run_id: str) -> None:
    with create_pool(run_id, "n", "p", slab_count=3, slab_size=TRAJ.nbytes) as pool:
        assert pool.owner
        assert pool.slab_count == 3
        assert pool.slab_size == TRAJ.nbytes
        stats = pool.statistics()
        assert (stats.held, stats.free, stats.slab_stride) == (0, 3, PAGE_SIZE)
        handles = [pool.acquire_nowait() for _ in range(2)]
        assert pool.statistics().held == 2
        for h in handles:
            assert h is not None
            base = h.raw().ctypes.data
            assert base % PAGE_SIZE == 0
            h.release()
        stats = pool.statistics()
        assert (stats.acquires, stats.releases, stats.held) == (2, 2, 0)
    assert pool.statistics().closed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"slab_count": 0}, "slab_count"),
        ({"slab_size": 0}, "slab_size"),
        ({"alignment": 100}, "alignment"),
        ({"alignment": 32}, "alignment"),
    ],
)
def test_create_pool_rejects(run_id: str, kwargs: dict[str, int], match: str) -> None:
    args = {"slab_count": 2, "slab_size": 100, "alignment": PAGE_SIZE, **kwargs}
    with pytest.raises(PoolError, match=match):
        create_pool(
            run_id,
            "n",
            "p",
            slab_count=args["slab_count"],
            slab_size=args["slab_size"],
            alignment=args["alignment"],
        )


def test_generation_is_odd_while_held_and_bumps(run_id: str) -> None:
    with create_pool(run_id, "n", "p", slab_count=1, slab_size=64) as pool:
        first = pool.acquire_nowait()
        assert first is not None
        assert first.generation % 2 == 1
        assert first.valid
        first.release()
        assert pool.check(first) is False
        second = pool.acquire_nowait()
        assert second is not None
        assert second.index == first.index
        assert second.generation == first.generation + 2
        second.release()


def test_misuse_raises_pool_error(run_id: str) -> None:
    with (
        create_pool(run_id, "n", "p", slab_count=2, slab_size=TRAJ.nbytes) as pool,
        create_pool(run_id, "n", "other", slab_count=2, slab_size=TRAJ.nbytes) as other,
    ):
        h = pool.acquire_nowait()
        assert h is not None
        desc = h.descriptor(TRAJ)
        h.release()
        with pytest.raises(PoolError, match="double release"):
            h.release()
        with pytest.raises(PoolError, match="use after release"):
            h.view(TRAJ)
        with pytest.raises(PoolError, match="use after release"):
            h.descriptor(TRAJ)
        with pytest.raises(PoolError, match="use after release"):
            pool.release(desc)
        again = pool.acquire_nowait()
        again2 = pool.acquire_nowait()
        assert again is not None
        assert again2 is not None
        reused = again if again.index == h.index else again2
        with pytest.raises(PoolError, match="reacquired since"):
            pool.release_index(h.index, h.generation)
        with pytest.raises(PoolError, match="reacquired since"):
            pool.view(desc)
        assert not pool.check(desc)
        assert pool.check(reused)
        # Foreign handles and descriptors.
        with pytest.raises(PoolError, match="another pool"):
            other.release(again)
        with pytest.raises(PoolError, match="another segment"):
            other.view(reused.descriptor(TRAJ))
        with pytest.raises(PoolError, match="out of range"):
            pool.release_index(5, 1)
        with pytest.raises(PoolError, match="not an acquire generation"):
            pool.release_index(reused.index, reused.generation + 1)
        with pytest.raises(PoolError, match="from the future"):
            pool.release_index(reused.index, reused.generation + 2)
        with pytest.raises(PoolError, match="needs a layout"):
            pool.view(reused)
        too_big = Layout.pack([("x", "u1", (pool.slab_size + 1,))])
        with pytest.raises(PoolError, match="layout needs"):
            reused.view(too_big)
        again.release()
        again2.release()
    with pytest.raises(PoolError, match="after close"):
        pool.acquire_nowait()
    with pytest.raises(PoolError, match="after close"):
        pool.check(desc)


def test_consumer_cannot_acquire_or_release(run_id: str) -> None:
    with create_pool(run_id, "n", "p", slab_count=1, slab_size=64) as pool:
        h = pool.acquire_nowait()
        assert h is not None
        with attach_pool(pool.name) as consumer:
            with pytest.raises(PoolError, match="creating process only"):
                consumer.acquire_nowait()
            with pytest.raises(PoolError, match="creating process only"):
                consumer.release_index(h.index, h.generation)
            assert consumer.statistics().held == 1
        h.release()


def test_attach_refuses_a_segment_that_is_not_a_pool(run_id: str) -> None:
    with (
        create_segment(run_id, "n", "plain", 4096) as seg,
        pytest.raises(PoolError, match="not a dvla pool"),
    ):
        attach_pool(seg.name)
    with pytest.raises(ResourceError, match="does not exist"):
        attach_pool(seg.name)


# --- zero copy -----------------------------------------------------------------------------------


def test_views_are_zero_copy_and_cached(run_id: str) -> None:
    with create_pool(run_id, "n", "p", slab_count=2, slab_size=TRAJ.nbytes) as pool:
        h = pool.acquire_nowait()
        assert h is not None
        views = h.view(TRAJ)
        raw = h.raw()
        for name, arr in views.items():
            assert np.shares_memory(arr, raw)
            assert arr.ctypes.data == raw.ctypes.data + TRAJ[name].offset
            assert arr.flags.c_contiguous
            assert arr.flags.writeable
        assert h.view(TRAJ) is views  # cached: no allocation on the steady-state path
        views["obs"][:] = 5
        assert raw[: views["obs"].nbytes].min() == 5
        with attach_pool(pool.name) as consumer:
            theirs = consumer.view(h.descriptor(TRAJ))
            assert not theirs["obs"].flags.writeable
            assert int(theirs["obs"].sum()) == 5 * views["obs"].size
            views["reward"][2] = 1.5
            assert theirs["reward"][2] == np.float32(1.5)
            del theirs
        del views, raw
        h.release()


_TORCH_CONSUMER = r"""
import json, sys
import msgspec, torch
from dvla_bus.pool import attach_pool, SlabDescriptor

desc = msgspec.json.decode(sys.argv[1], type=SlabDescriptor)
with attach_pool(desc.segment, writable=True) as pool:
    views = pool.view(desc)
    tensor = torch.from_numpy(views["reward"])
    tensor += 2.0
    same = tensor.data_ptr() == views["reward"].ctypes.data
    print(json.dumps({"same_memory": same}), flush=True)
    del tensor, views
"""


def test_torch_tensors_share_the_slab(run_id: str) -> None:
    # torch runs in a child: importing it here would leave objects behind whose attribute
    # access warns, which the suite-wide leak fixture (warnings as errors) trips over.
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    with create_pool(run_id, "n", "w", slab_count=2, slab_size=TRAJ.nbytes) as pool:
        h = pool.acquire_nowait()
        assert h is not None
        views = h.view(TRAJ)
        with Child(_TORCH_CONSUMER, msgspec.json.encode(h.descriptor(TRAJ)).decode()) as child:
            assert json.loads(child.read_line(timeout=60)) == {"same_memory": True}
        assert child.proc.returncode == 0
        assert views["reward"].tolist() == [2.0] * 4
        del views
        h.release()


_CONSUMER = r"""
import json, sys
import numpy as np
from dvla_bus.pool import attach_pool, Layout, SlabDescriptor
import msgspec

desc = msgspec.json.decode(sys.argv[1], type=SlabDescriptor)
with attach_pool(desc.segment, writable=True) as pool:
    views = pool.view(desc)
    ok_before = pool.check(desc)
    total = int(views["obs"].sum())
    views["action"][:] = [7, 8, 9, 10]          # written by the consumer, seen by the producer
    print(json.dumps({"total": total, "ok": ok_before and pool.check(desc)}), flush=True)
    sys.stdin.readline()                        # the producer releases and reuses the slab now
    print(json.dumps({"still_valid": pool.check(desc)}), flush=True)
    del views
"""


def test_another_process_sees_the_same_bytes(run_id: str) -> None:
    with create_pool(run_id, "n", "p", slab_count=1, slab_size=TRAJ.nbytes) as pool:
        h = pool.acquire_nowait()
        assert h is not None
        views = h.view(TRAJ)
        views["obs"][:] = 3
        desc = h.descriptor(TRAJ)
        with Child(_CONSUMER, msgspec.json.encode(desc).decode()) as child:
            first = json.loads(child.read_line())
            assert first == {"total": 3 * views["obs"].size, "ok": True}
            assert views["action"].tolist() == [7, 8, 9, 10]
            h.release()
            reused = pool.acquire_nowait()
            assert reused is not None
            assert reused.index == h.index
            child.send("go")
            assert json.loads(child.read_line()) == {"still_valid": False}
            reused.release()
        assert child.proc.returncode == 0
        del views


# --- backpressure --------------------------------------------------------------------------------


def test_no_free_slab_is_backpressure_never_growth(run_id: str) -> None:
    with create_pool(run_id, "n", "p", slab_count=2, slab_size=256) as pool:
        size = (SHM_DIR / pool.name).stat().st_size
        held = [pool.acquire_nowait(), pool.acquire_nowait()]
        assert pool.acquire_nowait() is None
        with pytest.raises(DeadlineExceeded, match="no free slab") as info:
            pool.acquire(timeout=0.05)
        assert pool.name in str(info.value)
        stats = pool.statistics()
        assert (stats.held, stats.backpressure, stats.timeouts) == (2, 2, 1)
        assert (SHM_DIR / pool.name).stat().st_size == size
        for h in held:
            assert h is not None
            h.release()


def test_blocking_acquire_wakes_on_release_from_another_thread(run_id: str) -> None:
    with create_pool(run_id, "n", "p", slab_count=1, slab_size=64) as pool:
        h = pool.acquire_nowait()
        assert h is not None
        got: list[object] = []
        waiting = threading.Event()

        def waiter() -> None:
            waiting.set()
            got.append(pool.acquire(timeout=20))

        t = threading.Thread(target=waiter)
        t.start()
        assert waiting.wait(10)
        h.release()
        t.join(20)
        assert not t.is_alive()
        (handle,) = got
        assert pool.check(handle)  # type: ignore[arg-type]
        pool.release(handle)  # type: ignore[arg-type]


def test_acquire_async_waits_and_times_out(run_id: str) -> None:
    async def scenario(pool: SlabPool) -> None:
        h = pool.acquire_nowait()
        assert h is not None
        with pytest.raises(DeadlineExceeded):
            await pool.acquire_async(timeout=0.05)
        task = asyncio.create_task(pool.acquire_async(timeout=20))
        await asyncio.sleep(0)  # let it register as a waiter (a scheduling step, not a wait)
        assert not task.done()
        # Released from another thread: the loop is woken thread-safely.
        releaser = threading.Thread(target=h.release)
        releaser.start()
        got = await asyncio.wait_for(task, 20)
        releaser.join(20)
        assert got.index == h.index
        assert pool.check(got)
        # A cancelled waiter holds no slab.
        cancelled = asyncio.create_task(pool.acquire_async(timeout=20))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        got.release()
        assert pool.statistics().free == 1

    with create_pool(run_id, "n", "p", slab_count=1, slab_size=64) as pool:
        asyncio.run(scenario(pool))


def test_close_wakes_waiters(run_id: str) -> None:
    pool = create_pool(run_id, "n", "p", slab_count=1, slab_size=64)
    assert pool.acquire_nowait() is not None
    errors: list[BaseException] = []
    waiting = threading.Event()

    def waiter() -> None:
        waiting.set()
        try:
            pool.acquire(timeout=20)
        except PoolError as exc:
            errors.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    assert waiting.wait(10)
    # The waiter may not be inside wait() yet; close() is still seen once it gets the lock.
    pool.close()
    t.join(20)
    assert not t.is_alive()
    assert len(errors) == 1
    assert "after close" in str(errors[0])


# --- steady state --------------------------------------------------------------------------------


def test_steady_state_allocates_nothing(run_id: str) -> None:
    with create_pool(run_id, "n", "p", slab_count=4, slab_size=TRAJ.nbytes) as pool:

        def cycle() -> None:
            h = pool.acquire_nowait()
            assert h is not None
            h.view(TRAJ)["action"][0] = h.index
            pool.release(h)

        for _ in range(50):  # warm: fill the view cache for every slab
            cycle()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            for _ in range(5000):
                cycle()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        ours = [
            tracemalloc.Filter(True, str(Path(__file__).resolve().parents[2] / "dvla_bus" / "*"))
        ]
        grown = [
            s
            for s in after.filter_traces(ours).compare_to(before.filter_traces(ours), "lineno")
            if s.size_diff > 0
        ]
        assert sum(s.size_diff for s in grown) < 1024, grown[:5]
        assert pool.statistics().acquires == 5050


def test_frozen_value_types(run_id: str) -> None:
    with create_pool(run_id, "n", "p", slab_count=1, slab_size=64) as pool:
        stats = pool.statistics()
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.held = 3  # type: ignore[misc]
    assert sys.getrefcount(pool) > 0


def test_forked_child_neither_acquires_nor_unlinks(run_id: str) -> None:
    with create_pool(run_id, "n", "p", slab_count=2, slab_size=64) as pool:
        pid = os.fork()
        if pid == 0:  # the child: report through the exit code only, never return into pytest
            code = 3
            try:
                try:
                    pool.acquire_nowait()
                    code = 1
                except PoolError:
                    pool.close()  # must not unlink the parent's segment
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert (SHM_DIR / pool.name).exists()
        h = pool.acquire_nowait()
        assert h is not None
        h.release()
