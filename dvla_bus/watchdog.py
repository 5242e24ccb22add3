"""Hang detection: a thread that notices when a node stops making progress, says where, and
leaves the evidence (every thread's Python stack) in the run directory instead of hanging.

It watches two things from outside the event loop (so it still runs when the loop is blocked):

* the event loop itself — the runtime stamps :attr:`Watchdog.loop_beat` every ``beat`` seconds;
  a stamp older than ``limit`` means the loop is blocked (a synchronous call that never
  returns, a deadlock);
* the node's lanes (:mod:`dvla_bus.lanes`) — a lane inside one busy interval for longer than
  ``limit`` is stuck mid-step.

On a hang it logs which node and lane, writes ``<run>/stacks/<node>-<time>.txt`` with
:func:`faulthandler.dump_traceback` (all threads), asks every other node to do the same through
the control hub (a ``dump`` command sent on its own short-lived socket, since the node's own
loop may be the thing that is stuck), and then — with ``action="restart"`` (the default) —
exits with status 1 so the supervisor restarts the node; with ``action="dump"`` it only reports
(once per episode).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal

import zmq

from dvla_bus import wire
from dvla_bus.lanes import Lanes
from dvla_bus.security import Credentials, client_options, is_remote

__all__ = ["Watchdog", "dump_stacks"]

log = logging.getLogger(__name__)

EXIT_HUNG: Final = 1


def dump_stacks(run_dir: Path, node: str, reason: str) -> Path:
    """Write every thread's Python stack to ``run_dir/stacks/<node>-<time>.txt``."""
    out = run_dir / "stacks"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{node}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    with open(path, "w") as f:
        f.write(f"# {node} pid {os.getpid()}: {reason}\n")
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)
    return path


class Watchdog:
    """See the module docstring. ``start()`` launches the daemon thread; ``stop()`` ends it."""

    def __init__(
        self,
        node: str,
        run_dir: Path,
        lanes: Lanes,
        *,
        limit: float,
        action: Literal["restart", "dump"] = "restart",
        control_endpoint: str = "",
        credentials: Credentials | None = None,
        on_exit: Callable[[int], Any] = os._exit,
    ) -> None:
        self.node = node
        self.run_dir = run_dir
        self.lanes = lanes
        self.limit = limit
        self.action = action
        self.control_endpoint = control_endpoint
        self.credentials = credentials
        self._exit = on_exit
        self.loop_beat = time.monotonic()
        self.dumps: list[Path] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watchdog-{node}", daemon=True)
        self._reported = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def check(self) -> str | None:
        """What is hung right now (None: nothing). Called by the thread; testable alone."""
        blocked = time.monotonic() - self.loop_beat
        if blocked > self.limit:
            return f"event loop blocked for {blocked:.1f}s"
        stuck = self.lanes.stuck(self.limit)
        if stuck:
            lane, seconds = max(stuck, key=lambda x: x[1])
            return f"lane {lane!r} busy without progress for {seconds:.1f}s"
        return None

    def _run(self) -> None:
        period = max(0.05, min(1.0, self.limit / 4))
        while not self._stop.wait(period):
            problem = self.check()
            if problem is None:
                self._reported = False
                continue
            if self._reported:
                continue
            self._reported = True
            log.error("watchdog: %s is hung: %s; dumping stacks", self.node, problem)
            self.dumps.append(dump_stacks(self.run_dir, self.node, problem))
            self._ask_everyone_to_dump(problem)
            if self.action == "restart":
                logging.shutdown()
                self._exit(EXIT_HUNG)
                return

    def _ask_everyone_to_dump(self, problem: str) -> None:
        if not self.control_endpoint:
            return
        ctx = zmq.Context()
        try:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 1000)
            if self.credentials is not None and is_remote(self.control_endpoint):
                for opt, value in client_options(self.credentials).items():
                    sock.setsockopt(opt, value)
            sock.connect(self.control_endpoint)
            msg = wire.stamp(
                wire.Command(command="dump", args={"reason": f"{self.node}: {problem}"}),
                f"watchdog.{self.node}",
                1,
                time.time(),
            )
            sock.send_multipart(wire.encode("control", msg))
            sock.close()
        except zmq.ZMQError as exc:
            log.warning("watchdog: could not reach the hub to ask for stack dumps: %s", exc)
        finally:
            ctx.term()
