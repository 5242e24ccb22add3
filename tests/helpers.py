"""Helpers for tests that run real processes: deadline waits (never bare sleeps), process trees."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dvla_bus.supervisor import kill_tree

REPO = Path(__file__).resolve().parent.parent


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
    raise_on_timeout: bool = True,
) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            if raise_on_timeout:
                raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
            return False
        time.sleep(interval)  # polling granularity, not a wait for a condition


def dvla(
    *args: str,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``dvla`` CLI in a subprocess and capture its output."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "dvla_tools", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"dvla {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def spawn(
    args: Sequence[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``dvla ARGS`` in the background, output to ``log``."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "dvla_tools", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=REPO,
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, wait, then SIGKILL the tree; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait(timeout=5)
    return proc.returncode


def hub_status(endpoint: str, timeout: float = 5.0, credentials: Any = None) -> Any:
    """The control hub's Status, asked for over a real socket (an observer connection)."""
    from dvla_bus.control import open_control_client

    async def ask() -> Any:
        async with open_control_client(endpoint, credentials=credentials) as client:
            return await client.query(timeout=timeout)

    return asyncio.run(ask())


def hub_send(endpoint: str, msg: Any) -> None:
    """Send one message (a command, a version announcement) to the hub as an observer; waits
    until the hub has handled it by asking for a Status afterwards on the same connection."""
    from dvla_bus.control import open_control_client

    async def go() -> None:
        async with open_control_client(endpoint) as client:
            await client.query()  # the connection is up
            assert await client.send(msg)
            await client.query()  # ordered after msg on the same pipe: msg was handled

    asyncio.run(go())


def wait_status(
    endpoint: str,
    predicate: Callable[[Any], object],
    timeout: float = 15.0,
    what: str = "state",
    credentials: Any = None,
) -> Any:
    """Poll the hub until ``predicate(status)`` holds; returns that status."""
    box: list[Any] = []

    def check() -> bool:
        try:
            st = hub_status(endpoint, timeout=2.0, credentials=credentials)
        except TimeoutError:
            return False
        if predicate(st):
            box.append(st)
            return True
        return False

    wait_for(check, timeout=timeout, interval=0.1, what=what)
    return box[0]


def members_by_node(status: Any) -> dict[str, Any]:
    return {m.node: m for m in status.members}


def write_topology(
    path: Path, roles: str, extra: str = "", interval: float = 0.2, timeout: float = 1.5
) -> Path:
    """A one-host topology with its control socket under ``path``'s directory."""
    path.write_text(
        f"""schema = 1
name = "t"
[control]
endpoint = "ipc://{path.parent}/c.sock"
heartbeat_interval_s = {interval}
heartbeat_timeout_s = {timeout}
[[hosts]]
name = "h"
roles = {{ {roles} }}
{extra}
"""
    )
    return path


class Job:
    """Nodes started one by one with ``dvla node start`` (no supervisor), all cleaned up."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.topology = write_topology(
            root / "t.toml",
            "coordinator = 1, producer = 2, consumer = 1",
            extra="[roles.producer]\nrate_hz = 50.0\nimage_px = 8\n",
        )
        self.endpoint = f"ipc://{root}/c.sock"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, role: str, index: int = 0) -> subprocess.Popen[bytes]:
        name = f"{role}.h.{index}"
        proc = spawn(
            [
                "node",
                "start",
                "--role",
                role,
                "--topology",
                str(self.topology),
                "--host",
                "h",
                "--index",
                str(index),
                "--run-dir",
                str(self.root),
                "--grace",
                "3",
            ],
            self.root / f"{name}.log",
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def close(self) -> None:
        for proc in self.procs.values():
            stop(proc)
