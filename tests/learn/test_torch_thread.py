"""TorchThread: one OpenMP team for a node's torch compute, the event-loop thread held to one."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import torch

from dvla_nodes.torch_thread import TorchThread

# A fresh interpreter: whether a thread already owns an OpenMP team (this pytest process's main
# thread may, from earlier tests) cannot be undone in-process.
_PROBE = """
import json, os, torch
from dvla_nodes.torch_thread import TorchThread

def tasks():
    return len(os.listdir("/proc/self/task"))

with TorchThread(2) as tt:  # before this thread's first torch op: its setting starts at 1
    big = torch.randn(1024, 1024)
    start = tasks()
    tt.call(lambda: (big @ big).sum())          # the torch thread's team: one more thread
    after_torch = tasks()
    for _ in range(3):
        (big @ big).sum(); (big * 2).sum()      # the caller's work: no team of its own
    after_main = tasks()
    print(json.dumps({
        "start": start, "after_torch": after_torch, "after_main": after_main,
        "main_threads": torch.get_num_threads(),
        "torch_threads": tt.call(torch.get_num_threads),
    }))
"""


def test_the_caller_keeps_one_thread_and_starts_no_team() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["main_threads"] == 1
    assert got["torch_threads"] == 2
    # 2 intra-op threads on the torch thread: its team adds one worker ...
    assert got["after_torch"] == got["start"] + 1, got
    # ... and the caller's matrix products and reductions add none (a second team is what
    # made cloning 1.3x slower in the learner node).
    assert got["after_main"] == got["after_torch"], got


def test_calls_run_in_order_on_one_thread_and_close_joins_it() -> None:
    before = torch.get_num_threads()
    try:
        with TorchThread(2, "probe") as tt:
            names = [tt.call(lambda: threading.current_thread().name) for _ in range(3)]

            async def main() -> list[int]:
                return [await tt.run(lambda i=i: i * i) for i in range(4)]

            assert asyncio.run(main()) == [0, 1, 4, 9]
            assert len(set(names)) == 1
            assert names[0].startswith("probe")
            assert names[0] != threading.current_thread().name
            assert tt.call(torch.get_num_threads) == 2
        assert not any(t.name.startswith("probe") for t in threading.enumerate())
    finally:
        torch.set_num_threads(before)
