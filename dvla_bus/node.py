"""The node runtime: one OS process, one asyncio event loop (uvloop when installed), one role.

A role subclasses :class:`Node` and fills in ``setup()`` (acquire resources on
``self.resources``, an :class:`~contextlib.AsyncExitStack` closed after ``teardown()``), ``run()``
(the work; returning ends the node with status 0) and ``teardown()``. The runtime joins the
control bus, heartbeats with the node's statistics, applies commands (pause, resume, checkpoint,
stop) and turns SIGTERM/SIGINT into cancellation of ``run()`` followed by teardown.

Shutdown is bounded: once a stop is requested, :mod:`faulthandler` is armed to dump every
thread's stack to stderr (the node's log) and exit the process with status 1 if teardown has not
finished within the grace period, so a node can never hang on its way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import faulthandler
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Final

from dvla_bus import wire
from dvla_bus.control import ControlClient, JoinInfo, open_control_client
from dvla_bus.errors import ConfigError
from dvla_bus.lanes import Lanes
from dvla_bus.security import Credentials
from dvla_bus.sockets import open_context
from dvla_bus.transport import Inbox, open_inbox
from dvla_bus.watchdog import Watchdog, dump_stacks

__all__ = [
    "Node",
    "NodeConfig",
    "deliberate_exit_marker",
    "mark_deliberate_exit",
    "run_node",
    "run_nodes",
    "set_parent_death_signal",
]

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG: Final = 1


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything one node needs, derived from the topology and the command line."""

    role: str
    host: str
    index: int
    run_dir: Path
    control_endpoint: str
    address: str = "127.0.0.1"
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 5.0
    grace: float = 5.0
    settings: Mapping[str, wire.Scalar] = field(default_factory=dict)
    topology_file: str = ""
    topology_name: str = "adhoc"
    # CURVE for tcp:// connections: control always when set; data per the topology's
    # [data] encrypt (None: that plane is plain, on one host or in trusted-network mode).
    control_credentials: Credentials | None = None
    data_credentials: Credentials | None = None
    # Hang detection (dvla_bus.watchdog): seconds without progress before acting; 0 = off.
    watchdog_s: float = 60.0
    watchdog_action: str = "restart"

    @property
    def node_id(self) -> str:
        return f"{self.role}.{self.host}.{self.index}"

    @property
    def run_id(self) -> str:
        """The run directory's name, made safe for shared-memory segment names."""
        safe = "".join(c if c.isalnum() or c in "_-" else "-" for c in self.run_dir.name)
        return (safe.lstrip("_-") or "run")[:64]


class Node:
    """Base of every role. Subclasses set ``role`` and override the three phases."""

    role: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.log = logging.getLogger(f"dvla.{config.node_id}")
        self.resources = contextlib.AsyncExitStack()
        self.counters: dict[str, int] = {}
        self.gauges: dict[str, float] = {}
        # Extra counter sources merged into every heartbeat (e.g. ``inbox.counters``).
        self.meters: list[Callable[[], dict[str, int]]] = []
        self.lanes = Lanes(config.node_id)
        self.endpoints: dict[str, str] = {}  # advertised in Join; set them in setup()
        self.members: tuple[wire.MemberInfo, ...] = ()
        self._control: ControlClient | None = None
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._stop_requested = asyncio.Event()

    # --- the three phases ----------------------------------------------------------------

    @classmethod
    def check_settings(cls, settings: Mapping[str, wire.Scalar]) -> None:
        """Validate this role's ``[roles.<role>]`` settings before any process starts
        (``dvla up``); raise :class:`~dvla_bus.errors.ConfigError` saying what is wrong."""

    async def setup(self) -> None:
        """Acquire resources (enter them on ``self.resources``); runs before joining."""

    async def run(self) -> None:
        """The node's work. The default waits until the node is stopped."""
        await asyncio.Event().wait()

    async def teardown(self) -> None:
        """Release what ``setup()`` did not put on ``self.resources``; runs on every path."""

    # --- hooks ---------------------------------------------------------------------------

    def on_version(self, announce: wire.VersionAnnounce) -> None:
        """A new weight version was announced on the control bus."""

    def on_members(self, members: tuple[wire.MemberInfo, ...]) -> None:
        """The membership table changed."""

    def on_node_dead(self, dead: wire.NodeDead) -> None:
        """A peer died or left."""

    def on_checkpoint(self, command: wire.Command) -> None:
        """A checkpoint was requested."""

    # --- services for roles ----------------------------------------------------------------

    @property
    def control(self) -> ControlClient:
        assert self._control is not None, "the control bus is joined after setup()"
        return self._control

    @property
    def paused(self) -> bool:
        return not self._unpaused.is_set()

    async def wait_unpaused(self) -> None:
        """Return at once unless a ``pause`` command is in force."""
        await self._unpaused.wait()

    def request_stop(self) -> None:
        """Ask the runtime to cancel ``run()`` and tear the node down."""
        self._stop_requested.set()

    async def open_inbox(self, window: int = 8) -> Inbox:
        """This node's data inbox, with its inspection tap, on a private data-plane context:
        ``ipc://`` files in the run directory when the job is on one host, ``tcp://`` on the
        host's address otherwise (CURVE per the topology). Advertised in the Join as
        ``data`` and ``tap``; its counters go into the heartbeats. Closed with the node."""
        cfg = self.config
        ctx = await self.resources.enter_async_context(
            open_context(credentials=cfg.data_credentials)
        )
        if cfg.control_endpoint.startswith("ipc://"):
            bind = f"ipc://{cfg.run_dir}/data-{cfg.node_id}.sock"
            tap = f"ipc://{cfg.run_dir}/tap-{cfg.node_id}.sock"
        else:
            bind = tap = f"tcp://{cfg.address}:0"
        inbox = await self.resources.enter_async_context(
            open_inbox(
                ctx,
                name=cfg.node_id,
                host=cfg.host,
                bind=[bind],
                window=window,
                tap=tap,
                credentials=cfg.data_credentials,
            )
        )
        self.endpoints["data"] = inbox.endpoint
        self.endpoints["tap"] = inbox.tap_endpoint
        self.meters.append(inbox.counters)
        return inbox

    def set_weight_version(self, version: int) -> None:
        self.control.update(weight_version=version)

    def statistics(self) -> tuple[dict[str, int], dict[str, float]]:
        """Counters and gauges for heartbeats (and ``statistics()`` in-process); lane
        utilisation appears as gauges ``lane.<name>.busy`` (fraction of wall time)."""
        counters = dict(self.counters)
        for meter in self.meters:
            counters.update(meter())
        gauges = dict(self.gauges)
        for lane, frac in self.lanes.statistics().utilisation().items():
            gauges[f"lane.{lane}.busy"] = frac
        return counters, gauges

    def _write_trace(self, tag: str) -> None:
        """Write this node's lane intervals for ``dvla bus trace`` (atomically)."""
        out = self.config.run_dir / "trace"
        out.mkdir(parents=True, exist_ok=True)
        target = out / f"{self.config.node_id}.json"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps({"tag": tag, "events": self.lanes.chrome_trace()}))
        os.replace(tmp, target)

    # --- runtime plumbing ----------------------------------------------------------------

    def _dispatch(self, msg: wire.Message) -> None:
        match msg:
            case wire.Command(command="pause"):
                self._unpaused.clear()
                self.control.update(state="paused")
            case wire.Command(command="resume"):
                self._unpaused.set()
                self.control.update(state="running")
            case wire.Command(command="stop"):
                self.log.info("stop command from %s", msg.sender or "the hub")
                self.request_stop()
            case wire.Command(command="checkpoint"):
                self.on_checkpoint(msg)
            case wire.Command(command="trace"):
                self._write_trace(str(msg.args.get("tag", "")))
            case wire.Command(command="dump"):
                dump_stacks(self.config.run_dir, self.config.node_id, str(msg.args.get("reason")))
            case wire.VersionAnnounce():
                self.on_version(msg)
            case wire.Members():
                self.members = msg.members
                self.on_members(msg.members)
            case wire.NodeDead():
                self.on_node_dead(msg)
            case _:
                pass


def deliberate_exit_marker(run_dir: Path, node_id: str, pid: int) -> Path:
    """Where a node process records that it is shutting down on purpose (see
    :func:`mark_deliberate_exit`); the supervisor reads it when the process exits non-zero."""
    return run_dir / "exits" / f"{node_id}.{pid}"


def mark_deliberate_exit(run_dir: Path, node_id: str) -> None:
    """Record that this process stops on purpose, before teardown starts: a teardown that then
    overruns the grace period exits 1 (stacks dumped), and without this record the supervisor
    would restart a node whose job is over — which, with the control hub already gone, fails
    and restarts forever."""
    path = deliberate_exit_marker(run_dir, node_id, os.getpid())
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))


def set_parent_death_signal(expected_parent: int) -> bool:
    """Ask Linux to send SIGTERM when our parent dies (``PR_SET_PDEATHSIG``). Returns False when
    the parent is already gone (the caller should exit)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # The parent may have died between fork and prctl: then we were re-parented already.
    return os.getppid() == expected_parent


async def _watch_parent(expected_parent: int, node: Node) -> None:
    """Portable fallback for PR_SET_PDEATHSIG: poll for re-parenting."""
    while True:
        await asyncio.sleep(0.5)
        if os.getppid() != expected_parent:
            node.log.warning("supervisor %d is gone; stopping", expected_parent)
            node.request_stop()
            return


async def _serve(node: Node, parent: int | None, *, signals: bool = True) -> int:
    cfg = node.config
    loop = asyncio.get_running_loop()
    if signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, node.request_stop)
    status = 0
    run_task: asyncio.Task[None] | None = None
    try:
        async with node.resources:
            try:
                await node.setup()
                async with open_control_client(
                    cfg.control_endpoint,
                    JoinInfo(
                        node=cfg.node_id,
                        role=cfg.role,
                        host=cfg.host,
                        index=cfg.index,
                        endpoints=dict(node.endpoints),
                    ),
                    heartbeat_interval=cfg.heartbeat_interval,
                    heartbeat_timeout=cfg.heartbeat_timeout,
                    on_message=node._dispatch,
                    stats=node.statistics,
                    credentials=cfg.control_credentials,
                ) as control:
                    node._control = control
                    control.update(state="running")
                    if cfg.watchdog_s > 0:
                        watchdog = Watchdog(
                            cfg.node_id,
                            cfg.run_dir,
                            node.lanes,
                            limit=cfg.watchdog_s,
                            action="dump" if cfg.watchdog_action == "dump" else "restart",
                            control_endpoint=cfg.control_endpoint,
                            credentials=cfg.control_credentials,
                        )
                        watchdog.start()
                        node.resources.callback(watchdog.stop)
                        node.resources.push_async_callback(
                            _cancel, asyncio.create_task(_beat(watchdog))
                        )
                    run_task = asyncio.create_task(node.run(), name=f"{cfg.node_id}.run")
                    stop_task = asyncio.create_task(node._stop_requested.wait())
                    watchers: list[asyncio.Task[object]] = [stop_task]
                    if parent is not None:
                        watchers.append(asyncio.create_task(_watch_parent(parent, node)))
                    await asyncio.wait([run_task, stop_task], return_when=asyncio.FIRST_COMPLETED)
                    if stop_task.done() or (
                        not run_task.cancelled() and run_task.exception() is None
                    ):
                        # Stopping on purpose (a stop request, or the work is done): even if
                        # teardown then overruns the grace period, the supervisor must not
                        # restart this node.
                        mark_deliberate_exit(cfg.run_dir, cfg.node_id)
                    for w in watchers:
                        w.cancel()
                    if not run_task.done():
                        _arm_hang_guard(cfg.grace)
                        control.update(state="stopping")
                        run_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await run_task
                    await asyncio.gather(*watchers, return_exceptions=True)
            finally:
                _arm_hang_guard(cfg.grace)
                await node.teardown()
    except ConfigError as exc:
        # Bad configuration fails the same way on every restart: exit 2, which the supervisor
        # does not restart (a restart loop would hide the message in the log).
        node.log.error("%s: configuration error: %s", cfg.node_id, exc)
        status = 2
    except Exception:
        node.log.exception("%s failed", cfg.node_id)
        status = 1
    finally:
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    return status


async def _serve_all(nodes: list[Node], parent: int | None) -> int:
    loop = asyncio.get_running_loop()

    def stop_all() -> None:
        for node in nodes:
            node.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_all)
    try:
        statuses = await asyncio.gather(*(_serve(n, parent, signals=False) for n in nodes))
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return max(statuses, default=0)


_guard_armed = False


async def _beat(watchdog: Watchdog) -> None:
    """Stamp the event loop's liveness for the watchdog thread."""
    period = max(0.02, min(0.5, watchdog.limit / 8))
    while True:
        watchdog.loop_beat = time.monotonic()
        await asyncio.sleep(period)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _arm_hang_guard(grace: float) -> None:
    global _guard_armed
    if not _guard_armed:
        _guard_armed = True
        # Dumps all threads' stacks to stderr and _exit(1)s if shutdown overruns the grace.
        faulthandler.dump_traceback_later(grace, exit=True)


def run_node(node: Node, *, parent: int | None = None) -> int:
    """Run ``node`` to completion in a fresh event loop; returns the process exit status."""
    return run_nodes([node], parent=parent)


def run_nodes(nodes: list[Node], *, parent: int | None = None) -> int:
    """Run several nodes on one event loop in this process (``dvla up --serial``: every role of
    a host in one process, for debugging) until all have finished; SIGTERM stops them all.
    Returns the worst exit status."""
    global _guard_armed
    _guard_armed = False
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    try:
        with runner:
            if len(nodes) == 1:
                return runner.run(_serve(nodes[0], parent))
            return runner.run(_serve_all(nodes, parent))
    finally:
        faulthandler.cancel_dump_traceback_later()
