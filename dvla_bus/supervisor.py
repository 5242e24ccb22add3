"""The supervisor: starts a host's nodes as child processes and keeps them alive.

* A child that exits non-zero is restarted after a backoff (``backoff_initial`` doubling up to
  ``backoff_max`` seconds; reset once a child has run ``stable_after`` seconds).
* A child that exits 0 is *done* and stays down; so is one that exits non-zero after recording
  that it was stopping on purpose (its teardown overran the grace period after a stop command or
  after its work was done: restarting it would only fail once the job is gone). One that exits
  2 (bad configuration: it would fail the same way again) is *failed* and stays down, and by
  default (``stop_on_failure``) the supervisor then stops every other child and returns 1: a
  job that goes on without one of its nodes (say, a learner that cannot load its checkpoint)
  would only hang with its samplers waiting. When no child is left to run, it returns.
* Stopping sends SIGTERM to every child, waits up to ``grace`` seconds, then SIGKILLs what is
  left and reaps everything: no orphans.
* Shared memory of dead processes is reaped at start, right after any child dies, and every
  ``reap_every`` seconds, so a ``kill -9``'d node's ``/dev/shm`` segments are gone within one
  period (the node itself cannot clean up after SIGKILL).
* Each child gets ``DVLA_SUPERVISOR_PID``; ``dvla node start`` then asks the kernel for SIGTERM
  when the supervisor dies (``PR_SET_PDEATHSIG``) and also polls for re-parenting, so even a
  ``kill -9`` of the supervisor leaves no node behind.

The supervisor polls its children (every ``poll_interval`` seconds) rather than using asyncio's
child watchers, so it works the same under uvloop and starts no helper threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psutil

from dvla_bus.deploy import ENV_SUPERVISOR, ChildSpec
from dvla_bus.node import deliberate_exit_marker
from dvla_bus.reaper import reap

__all__ = ["ChildStatus", "Supervisor", "kill_tree"]

EXIT_CONFIG: Final = 2


@dataclass(frozen=True, slots=True)
class ChildStatus:
    """One child as the status table shows it."""

    name: str
    role: str
    pid: int | None
    state: str  # starting | running | backoff | done | failed | stopped
    restarts: int
    last_exit: int | None
    uptime: float


class _Child:
    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self.state = "starting"
        self.restarts = 0
        self.failures_in_a_row = 0
        self.started_at = 0.0
        self.next_start = 0.0
        self.last_exit: int | None = None


EventFn = Callable[[str], None]


class Supervisor:
    """Runs and restarts the children in ``specs``. One event loop; not thread-safe."""

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        *,
        grace: float = 5.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        stable_after: float = 30.0,
        poll_interval: float = 0.1,
        reap_every: float = 5.0,
        on_event: EventFn | None = None,
        run_dir: Path | None = None,
        stop_on_failure: bool = True,
    ) -> None:
        self._children = [_Child(s) for s in specs]
        self.stop_on_failure = stop_on_failure
        self.run_dir = run_dir
        self.grace = grace
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.poll_interval = poll_interval
        self.reap_every = reap_every
        self.reaped = 0
        self._on_event = on_event or (lambda _line: None)

    # --- status --------------------------------------------------------------------------

    def status(self) -> list[ChildStatus]:
        now = time.monotonic()
        return [
            ChildStatus(
                name=c.spec.name,
                role=c.spec.role,
                pid=c.proc.pid if c.proc is not None and c.proc.poll() is None else None,
                state=c.state,
                restarts=c.restarts,
                last_exit=c.last_exit,
                uptime=now - c.started_at if c.state == "running" else 0.0,
            )
            for c in self._children
        ]

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self._children if c.proc is not None and c.proc.poll() is None]

    # --- running -------------------------------------------------------------------------

    def _start(self, child: _Child) -> None:
        spec = child.spec
        env = {**os.environ, **spec.env, ENV_SUPERVISOR: str(os.getpid())}
        spec.log.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log, "ab") as log:
            child.proc = subprocess.Popen(
                spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                close_fds=True,
            )
        child.state = "running"
        child.started_at = time.monotonic()
        self._on_event(f"started {spec.name} (pid {child.proc.pid})")

    def _reap_shm(self) -> None:
        report = reap()
        if report.removed:
            self.reaped += len(report.removed)
            self._on_event(
                f"reaped {len(report.removed)} shared-memory segment(s) of dead processes "
                f"({report.bytes_freed} bytes)"
            )

    def _reap(self, child: _Child, now: float) -> None:
        assert child.proc is not None
        code = child.proc.returncode
        pid = child.proc.pid
        child.last_exit = code
        ran = now - child.started_at
        child.proc = None
        deliberate = self._deliberate(child, pid)  # consumes the record either way
        if code == 0:
            child.state = "done"
            self._on_event(f"{child.spec.name} finished")
            return
        if deliberate:
            child.state = "done"
            self._on_event(
                f"{child.spec.name} finished, but its shutdown exited {code} (see "
                f"{child.spec.log}); not restarting a node that stopped on purpose"
            )
            return
        if code == EXIT_CONFIG:
            child.state = "failed"
            self._on_event(
                f"{child.spec.name} exited 2 (configuration error); not restarting — "
                f"see {child.spec.log}"
            )
            return
        child.failures_in_a_row = 0 if ran >= self.stable_after else child.failures_in_a_row + 1
        delay = min(
            self.backoff_max, self.backoff_initial * 2 ** max(0, child.failures_in_a_row - 1)
        )
        child.state = "backoff"
        child.next_start = now + delay
        how = f"signal {-code}" if code < 0 else f"status {code}"
        self._on_event(
            f"{child.spec.name} died ({how}) after {ran:.1f}s; restarting in {delay:.1f}s"
        )

    def _deliberate(self, child: _Child, pid: int) -> bool:
        """Did this process record that it was stopping on purpose (a stop command, SIGTERM, or
        its work done) before it exited? Only nodes started with a run directory record it."""
        if self.run_dir is None:
            return False
        marker = deliberate_exit_marker(self.run_dir, child.spec.name, pid)
        found = marker.exists()
        with contextlib.suppress(OSError):
            marker.unlink()
        return found

    async def run(self, stop: asyncio.Event) -> int:
        """Supervise until ``stop`` is set, no child is left to run, or (``stop_on_failure``)
        a child failed for good; then stop the children.

        Returns 0 if every child that ended on its own finished cleanly, else 1."""
        try:
            self._reap_shm()
            next_shm_reap = time.monotonic() + self.reap_every
            for child in self._children:
                self._start(child)
            while not stop.is_set():
                now = time.monotonic()
                died = False
                for child in self._children:
                    if child.proc is not None and child.proc.poll() is not None:
                        self._reap(child, now)
                        died = True
                if died or now >= next_shm_reap:
                    self._reap_shm()
                    next_shm_reap = now + self.reap_every
                for child in self._children:
                    if child.state == "backoff" and now >= child.next_start:
                        child.restarts += 1
                        self._start(child)
                if all(c.state in ("done", "failed") for c in self._children):
                    break
                failed = [c.spec.name for c in self._children if c.state == "failed"]
                if failed and self.stop_on_failure:
                    left = [
                        c.spec.name for c in self._children if c.state not in ("done", "failed")
                    ]
                    if left:
                        self._on_event(
                            f"stopping the job: {', '.join(failed)} cannot run (configuration "
                            f"error), so {', '.join(left)} would wait for it forever"
                        )
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_interval)
        finally:
            await self.stop_all()
        return 1 if any(c.state == "failed" for c in self._children) else 0

    async def stop_all(self) -> None:
        """SIGTERM every running child, wait up to ``grace`` seconds, then SIGKILL; reap all."""
        running = [c for c in self._children if c.proc is not None and c.proc.poll() is None]
        for child in running:
            assert child.proc is not None
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(
            c.proc is not None and c.proc.poll() is None for c in running
        ):
            await asyncio.sleep(0.05)
        for child in running:
            assert child.proc is not None
            if child.proc.poll() is None:
                self._on_event(f"{child.spec.name} ignored SIGTERM for {self.grace}s; SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
            child.proc.wait()
            child.last_exit = child.proc.returncode
        if running:
            self._reap_shm()
        for child in self._children:
            if child.state in ("running", "backoff", "starting"):
                child.state = "stopped"
            child.proc = None


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants, then reap them (bounded: 5 s)."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=5)
