"""``dvla bench control``: control-bus round trips idle and under data load (plane decoupling).

Two processes. The server process hosts a control hub and a data inbox; the bench process pings
the hub (a :class:`~dvla_bus.wire.Query` answered by a :class:`~dvla_bus.wire.Status`, the
real control path) while another thread of the same process floods the data bus with 16 MiB
messages to the server. Cases:

* ``idle`` — pings only.
* ``dvla-shm-load`` — data over dvla's same-host path (descriptors over ipc, bytes in shared
  memory), control on its own context and socket: the design.
* ``dvla-tcp-load`` — data over dvla's cross-host path (16 MiB ZeroMQ frames over tcp loopback),
  control still on its own context and socket.
* ``same-socket`` — the baseline: pings and 16 MiB data share one ZeroMQ connection, so each
  ping waits behind the data queued before it.

Reported: p50, p99 and max round-trip time in milliseconds over ``--pings`` pings per case.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import multiprocessing.connection
import statistics
import tempfile
import threading
import time
from typing import Any, Final

import numpy as np
import zmq

from dvla_tools.bench._common import machine_info, write_json

CASES: Final = ("idle", "dvla-shm-load", "dvla-tcp-load", "same-socket")
DATA_BYTES: Final = 16 << 20


def register(sub: Any, name: str, help_text: str) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=__doc__)
    parser.add_argument("--quick", action="store_true", help="200 pings per case (smoke)")
    parser.add_argument("--pings", type=int, default=2000, help="pings per case (default 2000)")
    parser.add_argument("--json", help="write results to this file")
    parser.set_defaults(func=_main)


# --- the server process ----------------------------------------------------------------------


def _server(conn: multiprocessing.connection.Connection) -> None:
    asyncio.run(_serve(conn))


async def _serve(conn: multiprocessing.connection.Connection) -> None:
    from dvla_bus.control import HubConfig, open_control_hub
    from dvla_bus.sockets import open_context
    from dvla_bus.transport import open_inbox

    tmp = tempfile.mkdtemp(prefix="dvla-bc-")
    stop = threading.Event()
    raw_endpoint: list[str] = []
    ready = threading.Event()
    echo = threading.Thread(target=_same_socket_server, args=(stop, raw_endpoint, ready))
    echo.start()
    ready.wait(10)
    async with (
        open_control_hub(HubConfig(endpoint=f"ipc://{tmp}/control")) as hub,
        open_context() as ctx,
        open_inbox(ctx, name="rx-shm", host="bench", bind=[f"ipc://{tmp}/data"], window=4) as shm,
        open_inbox(ctx, name="rx-tcp", host="bench", bind=["tcp://127.0.0.1:0"], window=4) as tcp,
    ):
        conn.send(
            {"hub": hub.endpoint, "shm": shm.endpoint, "tcp": tcp.endpoint, "raw": raw_endpoint[0]}
        )

        async def drain(inbox: Any) -> None:
            while True:
                with await inbox.recv() as d:
                    int(d.arrays["x"][-1])

        tasks = [asyncio.create_task(drain(shm)), asyncio.create_task(drain(tcp))]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, conn.recv)  # "stop"
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    stop.set()
    echo.join(10)


def _same_socket_server(stop: threading.Event, endpoint: list[str], ready: threading.Event) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind("tcp://127.0.0.1:*")
    last = sock.getsockopt(zmq.LAST_ENDPOINT)
    endpoint.append(last.decode() if isinstance(last, bytes) else str(last))
    ready.set()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not stop.is_set():
        if not poller.poll(100):
            continue
        peer, kind, body = sock.recv_multipart(copy=False)
        if kind.bytes == b"ping":
            sock.send_multipart([peer, b"pong", body])
    sock.close()
    ctx.term()


# --- the bench process -----------------------------------------------------------------------


def _flood(kind: str, endpoint: str, stop: threading.Event, sent: list[int]) -> None:
    """Send 16 MiB messages to ``endpoint`` until ``stop`` (own thread, own event loop)."""

    async def run() -> None:
        from dvla_bus.sockets import open_context
        from dvla_bus.transport import open_outbox

        payload = np.ones(DATA_BYTES, dtype=np.uint8)
        async with (
            open_context() as ctx,
            open_outbox(
                ctx,
                name="flood",
                host="bench" if kind == "shm" else "elsewhere",
                run="benchctl",
                slab_size=DATA_BYTES + 4096,
                slabs=6,
            ) as out,
        ):
            await out.connect(endpoint)
            await out.wait_ready()
            while not stop.is_set():
                await out.send({}, {"x": payload}, timeout=10)
                sent[0] += 1
            deadline = time.monotonic() + 5
            while out.statistics().in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.01)

    asyncio.run(run())


async def _ping_hub(endpoint: str, pings: int) -> list[float]:
    from dvla_bus.control import open_control_client

    rtts: list[float] = []
    async with open_control_client(endpoint) as client:
        await client.query(timeout=10)  # connected
        for _ in range(pings):
            t0 = time.perf_counter()
            await client.query(timeout=10)
            rtts.append(time.perf_counter() - t0)
    return rtts


def _same_socket(endpoint: str, pings: int) -> tuple[list[float], int]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = 4
    sock.connect(endpoint)
    payload = memoryview(np.ones(DATA_BYTES, dtype=np.uint8).data)
    rtts: list[float] = []
    sent = 0
    try:
        for i in range(pings):
            t0 = time.perf_counter()
            sock.send_multipart([b"ping", str(i).encode()])
            while True:
                # Keep the connection saturated with data while the ping is out.
                if not sock.poll(0, zmq.POLLIN):
                    try:
                        sock.send_multipart([b"data", payload], flags=zmq.NOBLOCK, copy=False)
                        sent += 1
                    except zmq.Again:
                        sock.poll(1, zmq.POLLIN)
                    continue
                kind, _ = sock.recv_multipart()
                if kind == b"pong":
                    rtts.append(time.perf_counter() - t0)
                    break
    finally:
        sock.close()
        ctx.term()
    return rtts, sent


def _summary(case: str, rtts: list[float], data_messages: int, seconds: float) -> dict[str, Any]:
    ms = sorted(r * 1e3 for r in rtts)
    return {
        "name": case,
        "pings": len(ms),
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        "max_ms": ms[-1],
        "data_gbps": data_messages * DATA_BYTES / seconds / 1e9 if seconds else 0.0,
    }


def run(pings: int) -> list[dict[str, Any]]:
    spawn = mp.get_context("spawn")
    here, there = spawn.Pipe()
    proc = spawn.Process(target=_server, args=(there,), daemon=True)
    proc.start()
    results = []
    try:
        if not here.poll(60):
            raise TimeoutError("bench server did not start")
        ep = here.recv()
        for case in CASES:
            t0 = time.perf_counter()
            if case == "same-socket":
                rtts, sent_n = _same_socket(ep["raw"], pings)
            else:
                stop = threading.Event()
                sent = [0]
                flood = None
                if case != "idle":
                    kind = "shm" if case == "dvla-shm-load" else "tcp"
                    flood = threading.Thread(
                        target=_flood, args=(kind, ep[kind], stop, sent), daemon=True
                    )
                    flood.start()
                    # Let the data plane reach steady state before timing pings.
                    deadline = time.monotonic() + 10
                    while sent[0] < 3 and time.monotonic() < deadline:
                        time.sleep(0.01)
                try:
                    rtts = asyncio.run(_ping_hub(ep["hub"], pings))
                finally:
                    stop.set()
                    if flood is not None:
                        flood.join(30)
                sent_n = sent[0]
            results.append(_summary(case, rtts, sent_n, time.perf_counter() - t0))
        here.send("stop")
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        here.close()
        there.close()
    return results


def _main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    pings = 200 if args.quick else args.pings
    results = run(pings)
    table = Table(title=f"dvla bench control: ping round trip, {pings} pings per case")
    for col in ("case", "p50 ms", "p99 ms", "max ms", "data GB/s"):
        table.add_column(col, justify="right" if col != "case" else "left")
    for r in results:
        table.add_row(
            r["name"],
            f"{r['p50_ms']:.3f}",
            f"{r['p99_ms']:.3f}",
            f"{r['max_ms']:.3f}",
            f"{r['data_gbps']:.2f}",
        )
    console = Console(width=120)
    console.print(table)
    by = {r["name"]: r for r in results}
    checks = {
        "p50_under_load_ms": by["dvla-shm-load"]["p50_ms"],
        "p99_load_over_idle": by["dvla-shm-load"]["p99_ms"] / by["idle"]["p99_ms"],
        "same_socket_p50_over_dvla_p50": by["same-socket"]["p50_ms"]
        / by["dvla-shm-load"]["p50_ms"],
    }
    targets = {"p50_under_load_ms": 1.0, "p99_load_over_idle": 2.0}
    for key, value in checks.items():
        target = targets.get(key)
        verdict = "" if target is None else ("ok" if value <= target else "ABOVE TARGET")
        console.print(
            f"{key}: {value:.2f}" + (f" (target <= {target}) {verdict}" if target else "")
        )
    write_json(
        args.json,
        {
            "benchmark": "control",
            "quick": args.quick,
            "machine": machine_info(),
            "cases": results,
            "checks": checks,
            "targets": targets,
        },
    )
    return 0
