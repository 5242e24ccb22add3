"""Shared fixtures: every test fails if it leaves a child process, a thread, an open ZeroMQ
socket/context or a dvla ``/dev/shm`` segment behind (pyzmq's own test-suite does the same)."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq

from dvla_bus.supervisor import kill_tree
from tests.helpers import wait_for

SHM_DIR = Path("/dev/shm")


def _dvla_segments() -> set[str]:
    if not SHM_DIR.is_dir():
        return set()
    return {p.name for p in SHM_DIR.iterdir() if p.name.startswith("dvla")}


def _owned_by_others(name: str, ours: set[int]) -> bool:
    """A segment whose owner (``dvla.<run>.<node>.<pid>.<start>.<name>``) is a live process
    outside this test's process tree belongs to someone else (e.g. a concurrent test run)."""
    parts = name.split(".")
    if len(parts) < 6 or not parts[3].isdigit():
        return False
    pid = int(parts[3])
    return pid not in ours and psutil.pid_exists(pid)


def _pyzmq_internal() -> tuple[set[int], set[threading.Thread]]:
    """pyzmq's own zero-copy garbage collector: one process-wide context, two sockets and a
    thread, started on the first zero-copy send and kept for the process's life. Not a leak."""
    from zmq.utils.garbage import gc as zmq_gc

    ids: set[int] = set()
    threads: set[threading.Thread] = set()
    ctx = zmq_gc._context
    if ctx is not None:
        ids.add(id(ctx))
        for obj in gc.get_objects():
            if issubclass(type(obj), zmq.Socket) and obj.context is ctx:
                ids.add(id(obj))
    if zmq_gc.thread is not None:
        threads.add(zmq_gc.thread)
    return ids, threads


def _open_zmq_objects() -> list[str]:
    gc.collect()
    internal, _ = _pyzmq_internal()
    found: list[str] = []
    for obj in gc.get_objects():
        # type() rather than isinstance(): isinstance reads obj.__class__, which some objects
        # (deprecated torch attributes) answer with a warning, and warnings are errors here.
        kind = type(obj)
        if id(obj) in internal:
            continue
        try:
            if issubclass(kind, zmq.Socket) and not obj.closed:
                found.append(f"socket {obj!r}")
            elif issubclass(kind, zmq.Context) and not obj.closed:
                found.append(f"context {obj!r}")
        except ReferenceError:
            continue
    return found


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    me = psutil.Process()
    shm_before = _dvla_segments()
    threads_before = set(threading.enumerate())
    yield
    problems: list[str] = []

    # Children get a moment to finish exiting; anything still alive is a leak (and is killed so
    # one leaky test does not cascade into the next).
    def no_children() -> bool:
        return not [c for c in me.children(recursive=True) if c.is_running()]

    if not wait_for(no_children, timeout=5.0, raise_on_timeout=False):
        kids = me.children(recursive=True)
        problems.append(
            "child processes left running: "
            + ", ".join(f"{c.pid} {' '.join(c.cmdline()[:6])}" for c in kids if c.is_running())
        )
        for c in kids:
            kill_tree(c.pid)

    def new_threads() -> list[threading.Thread]:
        _, internal_threads = _pyzmq_internal()
        return [
            t
            for t in threading.enumerate()
            if t not in threads_before and t not in internal_threads and t.is_alive()
        ]

    def no_new_threads() -> bool:
        return not new_threads()

    if not wait_for(no_new_threads, timeout=2.0, raise_on_timeout=False):
        extra = [t.name for t in new_threads()]
        problems.append(f"threads left running: {extra}")

    zmq_left = _open_zmq_objects()
    if zmq_left:
        problems.append(f"ZeroMQ objects left open: {zmq_left[:5]}")
        for obj in gc.get_objects():
            if issubclass(type(obj), zmq.Socket) and not obj.closed:
                obj.close(linger=0)
        for obj in gc.get_objects():
            if issubclass(type(obj), zmq.Context) and not obj.closed:
                obj.destroy(linger=0)

    ours = {os.getpid(), *(c.pid for c in me.children(recursive=True))}
    leaked = {n for n in _dvla_segments() - shm_before if not _owned_by_others(n, ours)}
    if leaked:
        problems.append(f"/dev/shm segments left behind: {sorted(leaked)}")
        for name in leaked:
            (SHM_DIR / name).unlink(missing_ok=True)

    if problems:
        pytest.fail("resource leak: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp directory: ``ipc://`` paths must stay under the 107-byte sun_path limit."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="dvla-t-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nodes started by tests must not inherit a developer's deployment settings.
    for key in list(os.environ):
        if key.startswith("DVLA_") and key not in ("DVLA_TORCH_SPEC",):
            monkeypatch.delenv(key)
