"""The reaper removes dead owners' segments — after ``kill -9`` of a real process, or when the
pid has been reused — and nothing else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from dvla_bus.errors import ResourceError
from dvla_bus.pool import attach_pool, create_pool
from dvla_bus.reaper import list_segments, reap
from dvla_bus.shm import SHM_DIR, OwnerStatus, SegmentName, attach_segment, owner_status
from tests.data._procs import Child
from tests.helpers import wait_for

_PRODUCER = r"""
import sys
from dvla_bus.pool import create_pool
pool = create_pool(sys.argv[1], "sampler-0", "traj", slab_count=4, slab_size=1 << 16)
h = pool.acquire_nowait()
h.raw()[:4] = 1
print(pool.name, flush=True)
sys.stdin.readline()  # parked until the test kills us
"""


def _plant(directory: Path, name: str) -> Path:
    path = directory / name
    path.write_bytes(b"\0" * 64)
    return path


def _my_identity() -> tuple[int, int]:
    me = SegmentName.for_this_process("r", "n", "x")
    return me.pid, me.start_time


def test_kill_9_producer_segments_are_reaped_live_ones_kept(run_id: str) -> None:
    with Child(_PRODUCER, run_id) as live, Child(_PRODUCER, run_id) as victim:
        live_name = live.read_line()
        victim_name = victim.read_line()
        # While both run: listed as alive, nothing removable, a reap keeps both.
        status = {i.file: i.status for i in list_segments(run_id)}
        assert status == {live_name: OwnerStatus.ALIVE, victim_name: OwnerStatus.ALIVE}
        report = reap(run_id)
        assert not report.removed
        assert {i.file for i in report.kept} == {live_name, victim_name}

        # A consumer that mapped the segment keeps reading valid memory after the kill.
        with attach_pool(victim_name) as consumer:
            victim.proc.kill()
            victim.proc.wait(10)
            assert (SHM_DIR / victim_name).exists()  # nobody unlinked it: the owner died
            status = {i.file: i.status for i in list_segments(run_id)}
            assert status[victim_name] is OwnerStatus.DEAD
            assert status[live_name] is OwnerStatus.ALIVE

            dry = reap(run_id, dry_run=True)
            assert dry.dry_run
            assert [i.file for i in dry.removed] == [victim_name]
            assert (SHM_DIR / victim_name).exists()

            report = reap(run_id)
            assert [i.file for i in report.removed] == [victim_name]
            assert report.bytes_freed == report.removed[0].size > 0
            assert [i.file for i in report.kept] == [live_name]
            assert not (SHM_DIR / victim_name).exists()
            assert (SHM_DIR / live_name).exists()
            assert consumer.statistics().held == 1  # its mapping is untouched
        # New attaches refuse the dead owner's name even before a reap would have run.
        with pytest.raises(ResourceError):
            attach_segment(victim_name)
    # The live producer exited normally (stdin closed) without closing its pool: the owner's
    # exit-time finalizer unlinked the segment, no reaper needed.
    assert live.proc.returncode == 0
    assert not list_segments(run_id)


def test_pid_reuse_is_detected(run_id: str, tmp_path: Path) -> None:
    pid, start = _my_identity()
    reused = _plant(tmp_path, f"dvla.{run_id}.n.{pid}.{start + 1}.x")  # our pid, other start
    mine = _plant(tmp_path, f"dvla.{run_id}.n.{pid}.{start}.x")
    infos = {i.file: i.status for i in list_segments(run_id, directory=tmp_path)}
    assert infos == {reused.name: OwnerStatus.PID_REUSED, mine.name: OwnerStatus.ALIVE}
    report = reap(run_id, directory=tmp_path)
    assert [i.file for i in report.removed] == [reused.name]
    assert not reused.exists()
    assert mine.exists()


def test_zombie_owner_counts_as_dead(run_id: str, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        child = psutil.Process(proc.pid)
        start = SegmentName.parse(  # the child's start time, as a segment name would carry it
            f"dvla.r.n.{proc.pid}.{_start_time(proc.pid)}.x"
        ).start_time
        wait_for(lambda: child.status() == psutil.STATUS_ZOMBIE, timeout=10, what="zombie")
        seg = _plant(tmp_path, f"dvla.{run_id}.n.{proc.pid}.{start}.x")
        (info,) = list_segments(run_id, directory=tmp_path)
        assert info.status is OwnerStatus.DEAD
        assert [i.file for i in reap(run_id, directory=tmp_path).removed] == [seg.name]
    finally:
        proc.wait(10)


def _start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[19])


def test_leaves_everything_else_alone(run_id: str, tmp_path: Path) -> None:
    with open("/proc/sys/kernel/pid_max") as f:
        gone = int(f.read()) + 1  # no process can have this pid
    dead = _plant(tmp_path, f"dvla.{run_id}.n.{gone}.5.x")
    other_run = _plant(tmp_path, f"dvla.other{run_id}.n.{gone}.5.x")
    unrecognised = [_plant(tmp_path, n) for n in ("dvla.bad", "dvla-x", f"dvla.{run_id}...")]
    unrelated = _plant(tmp_path, f"notdvla.{run_id}.n.{gone}.5.x")
    link = tmp_path / f"dvla.{run_id}.n.{gone}.6.x"
    link.symlink_to(unrelated)

    everything = list_segments(directory=tmp_path)
    assert unrelated.name not in {i.file for i in everything}
    by_file = {i.file: i for i in everything}
    for path in unrecognised:
        assert by_file[path.name].status is OwnerStatus.UNRECOGNISED
        assert by_file[path.name].segment is None
    assert by_file[link.name].status is OwnerStatus.FOREIGN

    report = reap(run_id, directory=tmp_path)
    assert [i.file for i in report.removed] == [dead.name]
    assert other_run.exists()
    assert unrelated.exists()
    assert link.is_symlink()
    assert all(p.exists() for p in unrecognised)

    listed = json.loads(json.dumps([i.as_dict() for i in everything]))
    assert {d["status"] for d in listed} == {"dead", "unrecognised", "foreign"}

    report = reap(directory=tmp_path)  # every run
    as_json = json.loads(json.dumps(report.as_dict()))
    assert [d["file"] for d in as_json["removed"]] == [other_run.name]
    assert as_json["bytes_freed"] == 64
    assert [i.file for i in report.removed] == [other_run.name]
    assert {i.file for i in report.skipped} == {p.name for p in unrecognised} | {link.name}
    assert all(p.exists() for p in unrecognised)
    assert unrelated.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create another user's file")
def test_other_users_segments_are_foreign(run_id: str, tmp_path: Path) -> None:
    path = _plant(tmp_path, f"dvla.{run_id}.n.{os.getpid()}.1.x")
    os.chown(path, 12345, 12345)
    (info,) = list_segments(run_id, directory=tmp_path)
    assert info.status is OwnerStatus.FOREIGN
    assert info.uid == 12345
    assert not reap(run_id, directory=tmp_path).removed
    assert path.exists()


def test_segment_vanishing_mid_reap_is_reported(
    run_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid, start = _my_identity()
    racing = _plant(tmp_path, f"dvla.{run_id}.n.{pid}.{start + 1}.a")
    stuck = _plant(tmp_path, f"dvla.{run_id}.n.{pid}.{start + 1}.b")
    real_status = owner_status
    real_unlink = os.unlink

    def status_then_vanish(name: SegmentName) -> OwnerStatus:
        if name.name == "a":
            racing.unlink()  # e.g. another reaper got there first
        return real_status(name)

    def unlink(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
        if Path(path) == stuck:
            raise PermissionError(13, "Permission denied")
        real_unlink(path)

    monkeypatch.setattr("dvla_bus.reaper.owner_status", status_then_vanish)
    monkeypatch.setattr(os, "unlink", unlink)
    report = reap(run_id, directory=tmp_path)
    monkeypatch.undo()
    assert report.vanished == (racing.name,)
    assert [f for f, _ in report.failed] == [stuck.name]
    assert "Permission denied" in report.failed[0][1]
    assert not report.removed


def test_own_live_pool_is_kept_and_bad_run_rejected(run_id: str) -> None:
    with create_pool(run_id, "n", "p", slab_count=1, slab_size=64) as pool:
        report = reap(run_id)
        assert [i.file for i in report.kept] == [pool.name]
        assert not report.removed
    assert not list_segments(run_id)
    assert list_segments(run_id, directory=Path("/nonexistent")) == ()
    with pytest.raises(ResourceError, match="run"):
        reap("bad.run")
