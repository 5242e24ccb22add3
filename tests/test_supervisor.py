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
    def __init__(self, root: Path, grace: float = GRACE) -> None:
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
                str(grace),
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


def test_a_stop_for_everyone_ends_the_job_and_the_hub_outlives_its_members(
    short_tmp: Path,
) -> None:
    """``stop`` to ``*`` (how a learner ends its job) reaches the coordinator too. Its hub must
    stay up until the others have left: a hub that closed at once could drop the copies still
    queued for them, and a node that missed the stop would hold the job open without a hub.
    Here a member that is slow to leave still finds the hub answering after every other node
    has exited, and its leave is logged."""
    import asyncio

    from dvla_bus import wire
    from dvla_bus.control import JoinInfo, open_control_client

    up = Up(short_tmp, grace=10.0)
    try:
        up.wait_running()
        nodes = up.children()
        others = [nodes["producer"], nodes["consumer"]]

        async def slow_member() -> None:
            got_stop = asyncio.Event()

            def on_message(msg: wire.Message) -> None:
                if isinstance(msg, wire.Command) and msg.command == "stop":
                    got_stop.set()

            join = JoinInfo(node="slow.h.0", role="observer", host="h", index=0)
            async with open_control_client(up.endpoint, join, on_message=on_message) as client:
                await asyncio.wait_for(client.joined.wait(), 10)
                assert await client.send(wire.Command(command="stop", target="*"))
                await asyncio.wait_for(got_stop.wait(), 10)
                _gone, alive = await asyncio.to_thread(psutil.wait_procs, others, timeout=8)
                assert not alive, "the producer and consumer did not stop"
                status = await client.query(timeout=3.0)  # the hub waits for this member
                assert "slow.h.0" in {m.node for m in status.members}

        asyncio.run(slow_member())
        assert up.proc.wait(timeout=20) == 0, up.output()[-3000:]
    finally:
        stop(up.proc, timeout=15)
    log = (short_tmp / "logs" / "coordinator.h.0.log").read_text()
    for node in ("producer.h.0", "consumer.h.0", "slow.h.0"):
        assert f"hub: {node} left" in log, log[-3000:]
    assert "still hold" not in log


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


def test_a_node_that_fails_for_good_stops_the_job(short_tmp: Path) -> None:
    """A child that exits 2 (configuration error) is not restarted, and the supervisor then
    stops the others and returns 1 instead of supervising a job that cannot go on (the
    samplers of a learner that cannot start would wait forever)."""
    import asyncio
    import sys

    from dvla_bus.deploy import ChildSpec
    from dvla_bus.supervisor import Supervisor

    waiter = "import signal; signal.pause()"  # runs until signalled
    specs = [
        ChildSpec(
            "bad.h.0",
            "x",
            (sys.executable, "-c", "import sys; sys.exit(2)"),
            {},
            short_tmp / "bad.log",
        ),
        ChildSpec("wait.h.0", "y", (sys.executable, "-c", waiter), {}, short_tmp / "wait.log"),
    ]
    events: list[str] = []
    sup = Supervisor(specs, grace=2.0, on_event=events.append, run_dir=short_tmp)

    async def supervise() -> int:
        stop = asyncio.Event()
        task = asyncio.create_task(sup.run(stop))
        done, _ = await asyncio.wait([task], timeout=30)
        if not done:  # the bug: supervising on without the failed node
            stop.set()
            await task
            pytest.fail(f"the supervisor kept the job running: {events}")
        return task.result()

    assert asyncio.run(supervise()) == 1
    by_name = {s.name: s for s in sup.status()}
    assert (by_name["bad.h.0"].state, by_name["bad.h.0"].restarts) == ("failed", 0)
    assert by_name["wait.h.0"].state == "stopped"
    assert by_name["wait.h.0"].pid is None
    assert any("stopping the job: bad.h.0 cannot run" in e and "wait.h.0" in e for e in events)
