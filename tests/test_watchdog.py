"""Hang detection: a stuck lane or a blocked event loop is named, every node's stacks land in
the run directory, and the hung node is restarted instead of hanging silently."""

from __future__ import annotations

import time
from pathlib import Path

from dvla_bus.lanes import Lanes
from dvla_bus.watchdog import Watchdog
from tests.helpers import members_by_node, spawn, stop, wait_for, wait_status, write_topology


def test_check_names_the_stuck_lane_and_the_blocked_loop(tmp_path: Path) -> None:
    lanes = Lanes("n")
    dog = Watchdog("n", tmp_path, lanes, limit=5.0, action="dump")
    assert dog.check() is None
    lanes.open["inference"] = time.time() - 10  # inside one busy interval for 10 s
    assert "lane 'inference'" in (dog.check() or "")
    lanes.open.clear()
    dog.loop_beat = time.monotonic() - 10
    assert "event loop blocked" in (dog.check() or "")


def test_thread_dumps_and_exits_on_a_hang(tmp_path: Path) -> None:
    lanes = Lanes("n")
    exits: list[int] = []
    dog = Watchdog("n", tmp_path, lanes, limit=0.1, action="restart", on_exit=exits.append)
    dog.loop_beat = time.monotonic() + 3600  # no event loop here: only the lane can be stuck
    with lanes.busy("gradient"):
        dog.start()
        try:
            wait_for(lambda: exits, timeout=5, what="the watchdog to act")
        finally:
            dog.stop()
    assert exits == [1]
    (dump,) = dog.dumps
    text = dump.read_text()
    assert "lane 'gradient'" in text
    assert "test_thread_dumps_and_exits_on_a_hang" in text  # the stuck thread's stack


def test_hung_node_is_dumped_everywhere_and_restarted(short_tmp: Path) -> None:
    topo = write_topology(
        short_tmp / "t.toml",
        "coordinator = 1, producer = 1, consumer = 1",
        extra="[roles.producer]\nrate_hz = 50.0\nimage_px = 8\n"
        "[roles.consumer]\nstall_after_messages = 20\nwatchdog_s = 1.0\n",
    )
    endpoint = f"ipc://{short_tmp}/c.sock"
    up = spawn(
        ["up", str(topo), "--run-dir", str(short_tmp), "--status-every", "0", "--backoff-max", "1"],
        short_tmp / "up.out",
    )
    try:
        stacks = short_tmp / "stacks"
        wait_for(
            lambda: (
                stacks.is_dir()
                and any(p.name.startswith("consumer.h.0") for p in stacks.iterdir())
                and any(p.name.startswith("producer.h.0") for p in stacks.iterdir())
            ),
            timeout=30,
            what="stack dumps from the hung consumer and its peers",
        )
        hung = next(p for p in stacks.iterdir() if p.name.startswith("consumer.h.0"))
        text = hung.read_text()
        assert "event loop blocked" in text or "lane 'consume'" in text
        assert "time.sleep" in text or "demo.py" in text
        wait_for(
            lambda: "consumer.h.0 died" in (short_tmp / "up.out").read_text(),
            timeout=20,
            what="the supervisor to see the hung consumer exit",
        )
        wait_status(
            endpoint,
            lambda st: members_by_node(st)["consumer.h.0"].state == "running",
            what="the consumer restarted and rejoined",
        )
    finally:
        stop(up, timeout=15)
