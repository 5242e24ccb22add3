"""``dvla up``: a real supervisor process with real children. Crash a child -> restarted;
SIGTERM the supervisor -> every child gone within the grace period; SIGKILL the supervisor ->
the children notice and exit by themselves."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import members_by_node, spawn, stop, wait_for, wait_status, write_topology

GRACE = 3.0


class Up:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.topology = write_topology(
            root / "t.toml",
            "coordinator = 1, producer = 1, consumer = 1",
            extra="[roles.producer]\nrate_hz = 20.0\nimage_px = 8\n",
        )
        self.endpoint = f"ipc://{root}/c.sock"
        self.out = root / "up.out"
        self.proc: subprocess.Popen[bytes] = spawn(
            [
                "up",
                str(self.topology),
                "--run-dir",
                str(root),
                "--grace",
                str(GRACE),
                "--status-every",
                "0",
                "--backoff-max",
                "1",
            ],
            self.out,
        )

    def children(self) -> dict[str, psutil.Process]:
        out = {}
        try:
            kids = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return {}
        for child in kids:
            try:
                cmd = child.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "--role" in cmd:
                out[cmd[cmd.index("--role") + 1]] = child
        return out

    def output(self) -> str:
        return self.out.read_text()

    def wait_running(self) -> None:
        wait_status(
            self.endpoint,
            lambda st: len([m for m in st.members if m.state == "running"]) == 3,
            what="three nodes running under the supervisor",
        )


@pytest.fixture
def up(short_tmp: Path) -> Iterator[Up]:
    u = Up(short_tmp)
    try:
        yield u
    finally:
        stop(u.proc, timeout=GRACE + 5)


def test_crashed_child_is_restarted(up: Up) -> None:
    up.wait_running()
    victim = up.children()["producer"]
    old_pid = victim.pid
    wait_for(lambda: _segments_of(old_pid), what="the producer's shared-memory pool")
    victim.send_signal(signal.SIGKILL)

    def replaced() -> bool:
        child = up.children().get("producer")  # one snapshot: it may change between calls
        return child is not None and child.pid != old_pid

    wait_for(replaced, timeout=15, what="a new producer process")
    status = wait_status(
        up.endpoint,
        lambda st: (
            members_by_node(st)["producer.h.0"].pid not in (old_pid,)
            and members_by_node(st)["producer.h.0"].state == "running"
        ),
        what="the restarted producer to rejoin",
    )
    assert members_by_node(status)["producer.h.0"].pid == up.children()["producer"].pid
    assert "producer.h.0 died (signal 9)" in up.output()
    # The dead producer could not clean up; the supervisor's reaper did.
    wait_for(lambda: not _segments_of(old_pid), what="the killed producer's segments reaped")
    assert "reaped" in up.output()


def _segments_of(pid: int) -> list[str]:
    return [
        p.name
        for p in Path("/dev/shm").iterdir()
        if p.name.startswith("dvla.") and p.name.split(".")[3] == str(pid)
    ]


def test_sigterm_stops_every_child_within_the_grace_period(up: Up) -> None:
    up.wait_running()
    kids = list(up.children().values())
    assert len(kids) == 3
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(timeout=GRACE + 5) == 0
    _gone, alive = psutil.wait_procs(kids, timeout=1)
    assert not alive
    assert "stopped" in up.output()
    assert not (up.root / "c.sock").exists()


def test_sigkill_of_the_supervisor_leaves_no_orphans(up: Up) -> None:
    up.wait_running()
    kids = list(up.children().values())
    up.proc.send_signal(signal.SIGKILL)
    up.proc.wait()
    # PR_SET_PDEATHSIG delivers SIGTERM to each child; they shut down on their own.
    _gone, alive = psutil.wait_procs(kids, timeout=GRACE + 5)
    assert not alive, [p.pid for p in alive]


def test_duration_ends_the_job(short_tmp: Path) -> None:
    topo = write_topology(short_tmp / "t.toml", "coordinator = 1, producer = 1, consumer = 1")
    out = short_tmp / "up.out"
    proc = spawn(
        ["up", str(topo), "--run-dir", str(short_tmp), "--duration", "3", "--status-every", "1"],
        out,
    )
    try:
        assert proc.wait(timeout=30) == 0
    finally:
        stop(proc)
    text = out.read_text()
    assert "started coordinator.h.0" in text
    assert "consumer.h.0" in text
    assert (short_tmp / "config.json").exists()
    assert (short_tmp / "logs" / "producer.h.0.log").exists()


def test_node_that_stopped_on_purpose_is_not_restarted_even_if_shutdown_overran(
    short_tmp: Path,
) -> None:
    """A node records that it is stopping on purpose before its teardown; if the teardown then
    overruns the grace period (exit 1, stacks dumped), the supervisor must not restart it: the
    job is over (restarting once failed forever against a control hub that was gone). A crash
    without that record is still restarted."""
    import asyncio
    import sys

    from dvla_bus.deploy import ChildSpec
    from dvla_bus.supervisor import Supervisor

    marker = (
        "import os, sys, pathlib; from dvla_bus.node import mark_deliberate_exit; "
        "mark_deliberate_exit(pathlib.Path(sys.argv[1]), sys.argv[2]); sys.exit(1)"
    )
    specs = [
        ChildSpec(
            "done.h.0",
            "x",
            (sys.executable, "-c", marker, str(short_tmp), "done.h.0"),
            {},
            short_tmp / "done.log",
        ),
        ChildSpec(
            "crash.h.0",
            "x",
            (sys.executable, "-c", "import sys; sys.exit(1)"),
            {},
            short_tmp / "crash.log",
        ),
    ]
    events: list[str] = []
    sup = Supervisor(specs, backoff_max=0.2, on_event=events.append, run_dir=short_tmp)

    async def supervise() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(sup.run(stop))
        deadline = asyncio.get_running_loop().time() + 30
        while asyncio.get_running_loop().time() < deadline:
            by_name = {s.name: s for s in sup.status()}
            if by_name["crash.h.0"].restarts >= 2 and by_name["done.h.0"].state == "done":
                break
            await asyncio.sleep(0.05)
        stop.set()
        await task

    asyncio.run(supervise())
    by_name = {s.name: s for s in sup.status()}
    assert by_name["done.h.0"].restarts == 0
    assert by_name["done.h.0"].last_exit == 1
    assert by_name["crash.h.0"].restarts >= 2
    assert any("stopped on purpose" in e for e in events), events
    assert not list((short_tmp / "exits").iterdir())  # markers are consumed
