"""``dvla bench NAME``: benchmarks that compare against baselines in the same run and write JSON.

Each benchmark is a module ``dvla_tools.bench.<name>`` exposing
``register(subparsers, name, help_text)``; the list below is the menu.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

BENCHES: tuple[tuple[str, str], ...] = (
    ("bus", "data-bus throughput against memcpy, raw pyzmq and multiprocessing.Queue"),
    ("control", "control-bus latency idle and under data load (plane decoupling)"),
    ("replicate", "weight distribution down the replication tree"),
    ("learn", "GRPO on the embedded suite: success rate against wall time"),
    ("pipeline", "the distributed training pipeline: lane utilisation and overlap"),
    ("envs", "environment steps/s bare and through dvla"),
    ("chaos", "training while nodes are killed"),
    ("fuzz", "hostile messages at every endpoint of a live deployment"),
    ("memory", "node memory while the learner is slowed: bounded queues, counted drops"),
    ("vram", "GPU weight slots and trajectory slabs against naive allocation (GPU only)"),
)


def register(sub: Any, name: str, help_text: str) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
    benches = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for bench, bench_help in BENCHES:
        module_name = f"dvla_tools.bench.{bench}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(benches, bench, bench_help)
        bench_parser = benches.choices[bench]
        func = bench_parser.get_default("func")
        if func is not None:
            bench_parser.set_defaults(func=_sigterm_as_interrupt(func))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _sigterm_as_interrupt(func: Callable[[Any], int]) -> Callable[[Any], int]:
    """SIGTERM stops a benchmark as Ctrl-C does: cleanup runs. By default it ends the process
    on the spot, and the jobs a benchmark starts in their own sessions (``dvla up`` children,
    which a terminal's Ctrl-C would not reach either) kept running for their whole budget."""

    @functools.wraps(func)
    def run(args: Any) -> int:
        if threading.current_thread() is not threading.main_thread():
            return func(args)
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return func(args)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return run
