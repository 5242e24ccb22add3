"""``dvla bench bus``: data-bus throughput between two processes, against baselines, in one run.

Cases (each payload 64 B, 4 KiB, 64 KiB, 1 MiB, 16 MiB, sender and receiver in two processes,
except memcpy):

* ``memcpy`` — ``np.copyto`` between page-aligned buffers in one process: the physical limit of
  moving the bytes once.
* ``dvla-shm`` — dvla's same-host path: the outbox copies the array into a shared-memory slab,
  the inbox hands the receiver a zero-copy view, credits flow back (window: 32 MiB in flight,
  8 to 1024 messages).
* ``dvla-shm-tap-idle`` / ``dvla-shm-tap-listened`` — the same with the inbox's inspection tap
  bound and nobody listening / a listener (a thread of the receiver process) subscribed to
  everything: the cost of ``dvla bus echo`` being possible, and of it running.
* ``dvla-tcp`` — dvla's cross-host path over loopback TCP (zero-copy frames from 64 KiB).
* ``zmq-{ipc,tcp}-{copy,zerocopy}`` — raw pyzmq PUSH/PULL, ``copy=True`` / ``copy=False``.
* ``mp-queue`` — ``multiprocessing.Queue`` of numpy arrays (pickled).

Every receiver gets the payload as a numpy array and reads its first and last byte. Time runs
from the sender's first timed message to the receiver's report that it has all of them (after a
warm-up). GB/s = payload bytes / time (10^9 bytes/s).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import multiprocessing.connection
import os
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import numpy as np
import zmq

from dvla_tools.bench._common import human_bytes, machine_info, write_json

SIZES: Final = (64, 4 << 10, 64 << 10, 1 << 20, 16 << 20)
CASES: Final = (
    "memcpy",
    "dvla-shm",
    "dvla-shm-tap-idle",
    "dvla-shm-tap-listened",
    "dvla-tcp",
    "zmq-ipc-copy",
    "zmq-ipc-zerocopy",
    "zmq-tcp-copy",
    "zmq-tcp-zerocopy",
    "mp-queue",
)
WARMUP: Final = 20
HWM: Final = 16
#: Bytes the dvla receiver lets be in flight per sender; the credit window follows from it
#: (small messages need a deep window to hide the credit round trip through two event loops).
IN_FLIGHT_BYTES: Final = 32 << 20


def window_for(size: int) -> int:
    return int(max(8, min(1024, IN_FLIGHT_BYTES // max(size, 1))))


def register(sub: Any, name: str, help_text: str) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few messages per case (smoke)")
    parser.add_argument("--json", help="write results to this file")
    parser.add_argument("--cases", help=f"comma-separated subset of: {', '.join(CASES)}")
    parser.add_argument("--sizes", help="comma-separated payload sizes in bytes")
    parser.set_defaults(func=_main)


def message_count(size: int, quick: bool) -> int:
    total = (8 << 20) if quick else (512 << 20)
    cap = 2_000 if quick else 40_000
    return int(max(30 if quick else 100, min(cap, total // size)))


def aligned(size: int) -> np.ndarray[Any, Any]:
    """A page-aligned uint8 buffer (unaligned copies can be ~10x slower here, MEASURED.md)."""
    raw = np.empty(size + 4096, dtype=np.uint8)
    offset = (-raw.ctypes.data) % 4096
    buf = raw[offset : offset + size]
    buf[:] = 7
    return buf


# --- receivers (run in a child process) -------------------------------------------------------


def _receiver(case: str, conn: multiprocessing.connection.Connection) -> None:
    while True:
        job = conn.recv()
        if job is None:
            return
        size, count = job
        if case.startswith("zmq-"):
            _recv_zmq(case, size, count, conn)
        elif case == "mp-queue":
            _recv_queue(count, conn)
        else:
            asyncio.run(_recv_dvla(case, size, count, conn))


def _touch(a: np.ndarray[Any, Any]) -> int:
    return int(a[0]) + int(a[-1])


def _recv_zmq(
    case: str, size: int, count: int, conn: multiprocessing.connection.Connection
) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.rcvhwm = HWM
    sock.linger = 0
    tmp = tempfile.mkdtemp(prefix="dvla-b-")
    if "-ipc-" in case:
        endpoint = f"ipc://{tmp}/s"
        sock.bind(endpoint)
    else:
        sock.bind("tcp://127.0.0.1:*")
        last = sock.getsockopt(zmq.LAST_ENDPOINT)
        endpoint = last.decode() if isinstance(last, bytes) else str(last)
    conn.send(endpoint)
    for _ in range(WARMUP + count):
        frame = sock.recv(copy=False)
        _touch(np.frombuffer(frame.buffer, dtype=np.uint8))
    conn.send("done")
    sock.close()
    ctx.term()
    os.rmdir(tmp) if not os.listdir(tmp) else None


_queue: Any = None


def _recv_queue(count: int, conn: multiprocessing.connection.Connection) -> None:
    conn.send("ready")
    for _ in range(WARMUP + count):
        _touch(_queue.get())
    conn.send("done")


async def _recv_dvla(
    case: str, size: int, count: int, conn: multiprocessing.connection.Connection
) -> None:
    from dvla_bus.sockets import open_context
    from dvla_bus.transport import open_inbox

    tmp = tempfile.mkdtemp(prefix="dvla-b-")
    bind = f"ipc://{tmp}/in" if case.startswith("dvla-shm") else "tcp://127.0.0.1:0"
    tap = f"ipc://{tmp}/tap" if "-tap-" in case else None
    stop = threading.Event()
    listener: threading.Thread | None = None
    async with (
        open_context() as ctx,
        open_inbox(
            ctx, name="bench-rx", host="rx", bind=[bind], window=window_for(size), tap=tap
        ) as inbox,
    ):
        if case.endswith("-listened"):
            listener = threading.Thread(target=_listen, args=(inbox.tap_endpoint, stop))
            listener.start()
            # Only time with the subscription in place.
            deadline = time.monotonic() + 10
            while inbox.counters()["rx.tap_topics"] == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        conn.send(inbox.endpoint)
        for _ in range(WARMUP + count):
            with await inbox.recv(timeout=60) as d:
                _touch(d.arrays["x"])
        conn.send("done")
        # Let the last credits leave before the socket closes.
        await asyncio.sleep(0.05)
        stop.set()
        if listener is not None:
            listener.join(10)
    for leftover in os.listdir(tmp):
        os.unlink(os.path.join(tmp, leftover))
    os.rmdir(tmp)


def _listen(endpoint: str, stop: threading.Event) -> None:
    """A tap listener like ``dvla bus echo``: subscribes to everything and reads each copy."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    sock.subscribe(b"")
    sock.connect(endpoint)
    while not stop.is_set():
        if sock.poll(50):
            frames = sock.recv_multipart(copy=False)
            _touch(np.frombuffer(frames[-1].buffer, dtype=np.uint8))
    sock.close()
    ctx.term()


# --- senders (this process) ------------------------------------------------------------------


def _send_zmq(
    case: str, endpoint: str, payload: np.ndarray[Any, Any], count: int, done: Callable[[], None]
) -> float:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.sndhwm = HWM
    sock.linger = -1
    sock.connect(endpoint)
    copy = case.endswith("-copy")
    buf = memoryview(payload.data)
    try:
        for _ in range(WARMUP):
            sock.send(buf, 0, copy)
        t0 = time.perf_counter()
        for _ in range(count):
            sock.send(buf, 0, copy)
        done()
        return time.perf_counter() - t0
    finally:
        sock.close(linger=1000)
        ctx.term()


async def _send_dvla(
    case: str, endpoint: str, payload: np.ndarray[Any, Any], count: int, done: Callable[[], None]
) -> float:
    from dvla_bus.sockets import open_context
    from dvla_bus.transport import open_outbox

    async with (
        open_context() as ctx,
        open_outbox(
            ctx,
            name="bench-tx",
            host="rx" if case.startswith("dvla-shm") else "tx",
            run=f"bench{os.getpid()}",
            slab_size=max(payload.nbytes, 4096) + 4096,
            slabs=window_for(payload.nbytes) + 8,
        ) as outbox,
    ):
        await outbox.connect(endpoint)
        await outbox.wait_ready()
        arrays = {"x": payload}
        for _ in range(WARMUP):
            await outbox.send({}, arrays)
        t0 = time.perf_counter()
        for _ in range(count):
            await outbox.send({}, arrays)
        await asyncio.get_running_loop().run_in_executor(None, done)
        elapsed = time.perf_counter() - t0
        # Wait for the receiver's last credits so no slab is in flight at close.
        deadline = time.monotonic() + 5
        while outbox.statistics().in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return elapsed


def _memcpy(size: int, count: int) -> float:
    src, dst = aligned(size), aligned(size)
    for _ in range(WARMUP):
        np.copyto(dst, src)
    t0 = time.perf_counter()
    for _ in range(count):
        np.copyto(dst, src)
    return time.perf_counter() - t0


def run_case(case: str, sizes: tuple[int, ...], quick: bool) -> list[dict[str, Any]]:
    results = []
    if case == "memcpy":
        for size in sizes:
            n = message_count(size, quick) * 4
            results.append(_result(case, "in-process", size, n, _memcpy(size, n)))
        return results
    spawn = mp.get_context("spawn")
    global _queue
    if case == "mp-queue":
        _queue = spawn.Queue(maxsize=HWM)
    here, there = spawn.Pipe()
    proc = spawn.Process(target=_receiver_entry, args=(case, there, _queue), daemon=True)
    proc.start()
    try:
        for size in sizes:
            n = message_count(size, quick)
            payload = aligned(size)
            here.send((size, n))
            endpoint = here.recv()

            def done() -> None:
                if not here.poll(120):
                    raise TimeoutError(f"{case}: receiver did not finish")
                here.recv()

            if case.startswith("zmq-"):
                elapsed = _send_zmq(case, endpoint, payload, n, done)
            elif case == "mp-queue":
                for _ in range(WARMUP):
                    _queue.put(payload)
                t0 = time.perf_counter()
                for _ in range(n):
                    _queue.put(payload)
                done()
                elapsed = time.perf_counter() - t0
            else:
                elapsed = asyncio.run(_send_dvla(case, endpoint, payload, n, done))
            transport = {"dvla-tcp": "tcp", "mp-queue": "pipe"}.get(
                case,
                "shm+ipc"
                if case.startswith("dvla-shm")
                else case.split("-")[1]
                if case.startswith("zmq-")
                else case,
            )
            results.append(_result(case, transport, size, n, elapsed))
        here.send(None)
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        here.close()
        there.close()
        if _queue is not None:
            _queue.close()
            _queue.join_thread()
            _queue = None
    return results


def _receiver_entry(case: str, conn: multiprocessing.connection.Connection, queue: Any) -> None:
    global _queue
    _queue = queue
    _receiver(case, conn)


def _result(case: str, transport: str, size: int, n: int, elapsed: float) -> dict[str, Any]:
    return {
        "name": case,
        "transport": transport,
        "payload_bytes": size,
        "messages": n,
        "seconds": elapsed,
        "gbps": size * n / elapsed / 1e9,
        "msgs_per_s": n / elapsed,
    }


def ratios(cases: list[dict[str, Any]]) -> dict[str, float | None]:
    def get(name: str, size: int, key: str = "gbps") -> float | None:
        for c in cases:
            if c["name"] == name and c["payload_bytes"] == size:
                return float(c[key])
        return None

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    big = 16 << 20
    return {
        "shm_16MiB_vs_memcpy": ratio(get("dvla-shm", big), get("memcpy", big)),
        "shm_16MiB_vs_mp_queue": ratio(get("dvla-shm", big), get("mp-queue", big)),
        "tcp_16MiB_vs_zmq_tcp_copy": ratio(get("dvla-tcp", big), get("zmq-tcp-copy", big)),
        "shm_64B_rate_vs_zmq_ipc_copy": ratio(
            get("dvla-shm", 64, "msgs_per_s"), get("zmq-ipc-copy", 64, "msgs_per_s")
        ),
        "tcp_64B_rate_vs_zmq_tcp_copy": ratio(
            get("dvla-tcp", 64, "msgs_per_s"), get("zmq-tcp-copy", 64, "msgs_per_s")
        ),
        "tap_idle_vs_no_tap_64KiB": ratio(
            get("dvla-shm-tap-idle", 64 << 10), get("dvla-shm", 64 << 10)
        ),
        "tap_idle_vs_no_tap_16MiB": ratio(get("dvla-shm-tap-idle", big), get("dvla-shm", big)),
    }


TARGETS: Final = {
    "shm_16MiB_vs_memcpy": 0.75,
    "shm_16MiB_vs_mp_queue": 15.0,
    "tcp_16MiB_vs_zmq_tcp_copy": 1.5,
    "shm_64B_rate_vs_zmq_ipc_copy": 0.5,
    "tcp_64B_rate_vs_zmq_tcp_copy": 0.5,
    # "No listener = no measurable cost": within run-to-run noise (MEASURED.md: +-30 %).
    "tap_idle_vs_no_tap_64KiB": 0.9,
    "tap_idle_vs_no_tap_16MiB": 0.9,
}


def _main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    cases = tuple(args.cases.split(",")) if args.cases else CASES
    unknown = set(cases) - set(CASES)
    if unknown:
        from dvla_bus.errors import ConfigError

        raise ConfigError(f"--cases: unknown {sorted(unknown)}; known: {', '.join(CASES)}")
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else SIZES
    console = Console(width=140)
    results: list[dict[str, Any]] = []
    for case in cases:
        console.print(f"[dim]running {case}...[/dim]")
        results.extend(run_case(case, sizes, args.quick))
    table = Table(title="dvla bench bus: GB/s (msgs/s)")
    table.add_column("case")
    for size in sizes:
        table.add_column(human_bytes(size), justify="right")
    for case in cases:
        row = [case]
        for size in sizes:
            hit = [r for r in results if r["name"] == case and r["payload_bytes"] == size]
            row.append(f"{hit[0]['gbps']:.3f} ({hit[0]['msgs_per_s']:,.0f})" if hit else "-")
        table.add_row(*row)
    console.print(table)
    got = ratios(results)
    for key, value in got.items():
        if value is not None:
            mark = "ok" if value >= TARGETS[key] else "BELOW TARGET"
            console.print(f"{key}: {value:.2f} (target >= {TARGETS[key]}) {mark}")
    doc = {
        "benchmark": "bus",
        "quick": args.quick,
        "machine": machine_info(),
        "cases": results,
        "ratios": got,
        "targets": TARGETS,
    }
    write_json(args.json, doc)
    return 0
