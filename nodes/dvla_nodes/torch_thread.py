"""One thread for a node's multi-threaded torch compute.

libgomp (the OpenMP runtime of the CPU torch build) gives every thread that runs a parallel
region with more than one thread its own team of worker threads, kept for that thread's life.
Once a process holds more OpenMP threads than CPUs, libgomp stops spin-waiting at its barriers
(its "throttled" spin count) and parks the workers on futexes, so every small parallel region
pays a wake-up. A node that builds its model on the event-loop thread and then trains in an
executor thread has two teams. Measured on 2 cores (two epochs of behaviour cloning of the tiny
policy on 160 demonstrations): 2.3-2.4 s in an executor thread after the main thread had built
the model, 1.8-1.9 s on the main thread alone, 1.7 s with this class; in ``dvla up
topologies/local.toml`` the learner's warm start ended at t = 179 s before (~25,000 context
switches/s, 28 % of the CPU idle while cloning) and 138 s after (~270/s, none idle).

The other side: one team spins at its barriers again, and where other busy processes share the
cores (samplers beside the learner) the second thread's spinning takes CPU they need — the
learner's GRPO updates there run on one thread (``TrainConfig.update_threads``; measured in
BENCHMARKS.md: 29.5 versions/min with two, 40.9 with one).

``torch.set_num_threads`` sets a process-wide default that threads pick up the first time they
use torch, *and* the calling thread's own OpenMP setting. So :class:`TorchThread` first pins the
calling (event-loop) thread to one thread — ``get_num_threads`` makes torch initialise that
thread's setting now, while the default is 1 — and then sets ``threads`` on its own thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

import torch

T = TypeVar("T")


class TorchThread:
    """A single-thread executor whose thread runs torch with ``threads`` intra-op threads; the
    thread that makes it keeps one. Use as a context manager (``close`` waits for the call in
    progress)."""

    def __init__(self, threads: int, name: str = "torch") -> None:
        torch.set_num_threads(1)
        torch.get_num_threads()  # initialises this thread's own setting now, at 1
        self.threads = max(1, int(threads))
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._pool.submit(torch.set_num_threads, self.threads).result()

    @property
    def executor(self) -> concurrent.futures.Executor:
        return self._pool

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the torch thread, from a thread that may block."""
        return self._pool.submit(fn, *args).result()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the torch thread, awaited from an event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    def set_threads(self, threads: int) -> None:
        """Run the torch thread's calls with ``threads`` intra-op threads from now on."""
        self.threads = max(1, int(threads))
        self.call(torch.set_num_threads, self.threads)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> TorchThread:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
