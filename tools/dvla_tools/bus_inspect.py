"""``dvla bus echo | hz | bw | lag | top | record | replay | trace`` (like ``ros2 topic`` and
``ros2 bag``).

Live commands find the job's control hub (``--control``, ``$DVLA_CONTROL_ENDPOINT`` or the
newest ``runs/*/config.json``), read the membership table, and subscribe to the nodes' data
taps (:mod:`dvla_bus.taps`): nothing is copied for inspection until a command listens. Every
read-only command takes ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.live import Live
from rich.table import Table

from dvla_bus import wire
from dvla_bus.bag import BagReader, BagWriter, bag_files, replay
from dvla_bus.control import open_control_client
from dvla_bus.errors import ConfigError
from dvla_bus.lanes import merge_traces
from dvla_bus.sockets import open_context
from dvla_bus.taps import TapMessage, open_tap, summarize
from dvla_bus.transport import open_outbox

__all__ = ["add_inspect_commands"]


def add_inspect_commands(verbs: Any, hub_args: Any, hub_endpoint: Any, credentials: Any) -> None:
    """Add the live verbs to ``verbs`` (the subparsers of ``dvla bus``)."""
    global _hub_endpoint, _credentials
    _hub_endpoint = hub_endpoint
    _credentials = credentials

    echo = verbs.add_parser("echo", help="print messages on a topic (headers + array summaries)")
    hub_args(echo)
    echo.add_argument("topic", help="topic prefix ('' for all)")
    echo.add_argument("--count", type=int, help="stop after N messages")
    echo.add_argument("--duration", type=float, help="stop after S seconds")
    echo.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only messages whose header field (sender, seq, kind) or meta.KEY equals VALUE",
    )
    echo.add_argument("--yaml", action="store_true", help="a YAML-like block per message")
    echo.add_argument("--json", action="store_true", help="one JSON object per line")
    echo.set_defaults(func=_echo)

    for verb, helptext in (("hz", "message rate on a topic"), ("bw", "bandwidth on a topic")):
        p = verbs.add_parser(verb, help=f"{helptext} (min/max/std over a window)")
        hub_args(p)
        p.add_argument("topic", help="topic prefix ('' for all)")
        p.add_argument("--window", type=int, default=100, help="messages per window")
        p.add_argument("--duration", type=float, help="stop after S seconds")
        p.add_argument("--count", type=int, help="stop after N messages")
        p.add_argument("--json", action="store_true", help="print one JSON summary at the end")
        p.set_defaults(func=_rate, verb=verb)

    lag = verbs.add_parser("lag", help="weight version per node vs the latest, and staleness")
    hub_args(lag)
    lag.add_argument("--json", action="store_true", help="machine-readable output")
    lag.set_defaults(func=_lag)

    top = verbs.add_parser("top", help="live per-node view: queues, credits, drops, lanes")
    hub_args(top)
    top.add_argument("--sort", choices=("node", "drops", "rate", "lag"), default="node")
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top.add_argument("--json", action="store_true", help="with --once: machine-readable")
    top.set_defaults(func=_top)

    record = verbs.add_parser("record", help="record topics (payloads included) to .dvlabag")
    hub_args(record)
    record.add_argument("output", help="recording name prefix (NAME.0000.dvlabag, ...)")
    record.add_argument("topics", nargs="*", default=[""], help="topic prefixes (default all)")
    record.add_argument("--duration", type=float, help="stop after S seconds")
    record.add_argument("--count", type=int, help="stop after N messages")
    record.add_argument("--max-bytes", type=int, default=1 << 30, help="split files at this size")
    record.set_defaults(func=_record)

    rep = verbs.add_parser("replay", help="send a recording to a running job's inboxes")
    hub_args(rep)
    rep.add_argument("recording", nargs="+", help="recording prefix or .dvlabag files")
    rep.add_argument("--rate", type=float, default=1.0, help="speed (2 = twice; 0 = max)")
    rep.add_argument("--to", help="node to send to (default: every node with a data inbox)")
    rep.set_defaults(func=_replay)

    trace = verbs.add_parser("trace", help="collect lane busy intervals into a Perfetto trace")
    hub_args(trace)
    trace.add_argument("-o", "--output", type=Path, help="trace file (default RUN/trace.json)")
    trace.set_defaults(func=_trace)


_hub_endpoint: Any = None
_credentials: Any = None


def _stop_after(args: argparse.Namespace) -> float | None:
    return None if getattr(args, "duration", None) is None else time.monotonic() + args.duration


async def _tap_loop(args: argparse.Namespace, topics: list[str], handle: Any) -> None:
    """Feed tap messages to ``handle`` until --count / --duration / Ctrl-C."""
    deadline = _stop_after(args)
    seen = 0
    async with open_tap(
        _hub_endpoint(args), topics, timeout=args.timeout, credentials=_credentials(args)
    ) as tap:
        while args.count is None or seen < args.count:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            try:
                message = await asyncio.wait_for(tap.recv(), remaining)
            except TimeoutError:
                break
            if handle(message):
                seen += 1


def _run(coro: Any) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(coro)
    return 0


# --- echo ------------------------------------------------------------------------------------


def _field(msg: wire.Message, key: str) -> str | None:
    if key.startswith("meta."):
        meta = getattr(msg, "meta", {})
        value = meta.get(key[5:])
        return None if value is None else str(value)
    if key == "kind":
        return str(msg.__struct_config__.tag)
    value = getattr(msg, key, None)
    return None if value is None else str(value)


def _echo(args: argparse.Namespace) -> int:
    filters = []
    for item in args.filter:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--filter {item!r}: expected KEY=VALUE")
        filters.append((key, value))

    def show(m: TapMessage) -> bool:
        msg = m.received.msg
        if any(_field(msg, k) != v for k, v in filters):
            return False
        names = list(getattr(msg, "names", ())) or [str(i) for i in range(len(m.received.arrays))]
        arrays = dict(zip(names, m.received.arrays, strict=False))
        if args.json:
            doc = {
                "topic": m.received.topic,
                "header": msgspec.to_builtins(msg),
                "arrays": {k: summarize(a) for k, a in arrays.items()},
            }
            print(json.dumps(doc), flush=True)
        elif args.yaml:
            print("---")
            print(f"topic: {m.received.topic}")
            for key, value in msgspec.structs.asdict(msg).items():
                if key != "arrays":
                    print(f"{key}: {value}")
            for k, a in arrays.items():
                print(f"array {k}: {summarize(a)}")
            sys.stdout.flush()
        else:
            meta = getattr(msg, "meta", {})
            parts = " | ".join(f"{k}: {summarize(a)}" for k, a in arrays.items())
            print(
                f"{msg.ts:.3f} {m.received.topic} {msg.sender}#{msg.seq} meta={meta} {parts}",
                flush=True,
            )
        return True

    return _run(_tap_loop(args, [args.topic], show))


# --- hz / bw ---------------------------------------------------------------------------------


def _rate(args: argparse.Namespace) -> int:
    times: deque[float] = deque(maxlen=args.window)
    sizes: deque[int] = deque(maxlen=args.window)
    last_print = [time.monotonic()]
    total = [0, 0]

    def window_stats() -> dict[str, float]:
        if len(times) < 2:
            return {"messages": float(total[0])}
        gaps = [b - a for a, b in zip(times, list(times)[1:], strict=False)]
        span = times[-1] - times[0]
        out = {
            "messages": float(total[0]),
            "rate_hz": (len(times) - 1) / span if span > 0 else math.inf,
            "min_gap_s": min(gaps),
            "max_gap_s": max(gaps),
            "std_gap_s": statistics.pstdev(gaps),
            "bytes_per_s": sum(list(sizes)[1:]) / span if span > 0 else math.inf,
            "mean_bytes": statistics.fmean(sizes),
            "min_bytes": float(min(sizes)),
            "max_bytes": float(max(sizes)),
        }
        return out

    def take(m: TapMessage) -> bool:
        times.append(time.monotonic())
        sizes.append(m.nbytes)
        total[0] += 1
        total[1] += m.nbytes
        now = time.monotonic()
        if not args.json and now - last_print[0] >= 1.0 and len(times) >= 2:
            last_print[0] = now
            s = window_stats()
            if args.verb == "hz":
                print(
                    f"average rate: {s['rate_hz']:.2f} Hz  min: {s['min_gap_s'] * 1e3:.2f} ms"
                    f"  max: {s['max_gap_s'] * 1e3:.2f} ms  std dev: {s['std_gap_s'] * 1e3:.2f} ms"
                    f"  window: {len(times)}",
                    flush=True,
                )
            else:
                print(
                    f"{s['bytes_per_s'] / 1e6:.2f} MB/s from {len(times)} messages  "
                    f"mean: {s['mean_bytes']:.0f} B  min: {s['min_bytes']:.0f} B  "
                    f"max: {s['max_bytes']:.0f} B",
                    flush=True,
                )
        return True

    code = _run(_tap_loop(args, [args.topic], take))
    if args.json:
        print(json.dumps({"topic": args.topic, "bytes": total[1], **window_stats()}))
    return code


# --- lag and top -----------------------------------------------------------------------------


async def _status(args: argparse.Namespace) -> wire.Status:
    async with open_control_client(_hub_endpoint(args), credentials=_credentials(args)) as client:
        return await client.query(timeout=args.timeout)


def _lag(args: argparse.Namespace) -> int:
    status = asyncio.run(_status(args))
    rows = []
    for m in status.members:
        stale = sum(v for k, v in m.counters.items() if k == "stale" or k.endswith(".stale"))
        rows.append(
            {
                "node": m.node,
                "role": m.role,
                "state": m.state,
                "version": m.weight_version,
                "lag": status.latest_version - m.weight_version
                if status.latest_version >= 0 and m.weight_version >= 0
                else None,
                "stale_messages": stale,
            }
        )
    if args.json:
        print(json.dumps({"latest_version": status.latest_version, "nodes": rows}, indent=2))
        return 0
    table = Table(title=f"weight versions (latest {status.latest_version})")
    for col in ("node", "role", "state", "version", "lag", "stale msgs"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["node"]),
            str(r["role"]),
            str(r["state"]),
            str(r["version"]),
            "-" if r["lag"] is None else str(r["lag"]),
            str(r["stale_messages"]),
        )
    Console(width=160).print(table)
    return 0


def _row(m: wire.MemberInfo, latest: int) -> dict[str, Any]:
    c, g = m.counters, m.gauges
    drops = sum(v for k, v in c.items() if ".dropped." in k or k.startswith("dropped"))
    lanes = {k[5:-5]: v for k, v in g.items() if k.startswith("lane.") and k.endswith(".busy")}
    return {
        "node": m.node,
        "state": m.state,
        "heartbeat_s": round(m.heartbeat_age, 2),
        "version": m.weight_version,
        "lag": latest - m.weight_version if latest >= 0 and m.weight_version >= 0 else 0,
        "rx_pending": c.get("rx.pending", 0),
        "rx_held": c.get("rx.held", 0),
        "tx_in_flight": c.get("tx.in_flight", 0),
        "tx_queued": c.get("tx.queued", 0),
        "credit_waits": c.get("tx.credit_waits", 0),
        "drops": drops,
        "drops_by_reason": {k: v for k, v in c.items() if ".dropped." in k and v},
        "rate": g.get("msgs_per_s", 0.0),
        "lanes": lanes,
    }


def _top_table(status: wire.Status, sort: str) -> Table:
    rows = [_row(m, status.latest_version) for m in status.members]
    key = {
        "node": lambda r: r["node"],
        "drops": lambda r: -r["drops"],
        "rate": lambda r: -r["rate"],
        "lag": lambda r: -r["lag"],
    }[sort]
    rows.sort(key=key)
    table = Table(
        title=f"dvla bus top — {len(rows)} nodes — latest version {status.latest_version} — "
        f"sort: {sort} (n/d/r/l to sort, q to quit)"
    )
    for col in (
        "node",
        "state",
        "hb",
        "ver",
        "rx pend",
        "rx held",
        "tx flight",
        "tx queue",
        "waits",
        "drops",
        "msgs/s",
        "lanes busy %",
    ):
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(
            r["node"],
            r["state"],
            f"{r['heartbeat_s']:.1f}s",
            str(r["version"]),
            str(r["rx_pending"]),
            str(r["rx_held"]),
            str(r["tx_in_flight"]),
            str(r["tx_queued"]),
            str(r["credit_waits"]),
            str(r["drops"]),
            f"{r['rate']:.1f}",
            " ".join(f"{k}={v * 100:.0f}" for k, v in sorted(r["lanes"].items())),
        )
    return table


def _top(args: argparse.Namespace) -> int:
    if args.once or not sys.stdin.isatty():
        status = asyncio.run(_status(args))
        if args.json:
            rows = [_row(m, status.latest_version) for m in status.members]
            print(json.dumps({"latest_version": status.latest_version, "nodes": rows}, indent=2))
        else:
            Console(width=200).print(_top_table(status, args.sort))
        return 0
    return _run(_top_live(args))


async def _top_live(args: argparse.Namespace) -> None:
    import termios
    import tty

    sort = [args.sort]
    quit_ = asyncio.Event()
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    keys = {"n": "node", "d": "drops", "r": "rate", "l": "lag"}

    def on_key() -> None:
        ch = sys.stdin.read(1)
        if ch in ("q", "\x03"):
            quit_.set()
        elif ch in keys:
            sort[0] = keys[ch]

    tty.setcbreak(fd)
    loop.add_reader(fd, on_key)
    try:
        async with open_control_client(
            _hub_endpoint(args), credentials=_credentials(args)
        ) as client:
            with Live(refresh_per_second=2, screen=True) as live:
                while not quit_.is_set():
                    status = await client.query(timeout=args.timeout)
                    live.update(_top_table(status, sort[0]))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(quit_.wait(), 1.0)
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# --- record / replay -------------------------------------------------------------------------


def _record(args: argparse.Namespace) -> int:
    writer = BagWriter(
        args.output, max_bytes=args.max_bytes, topics=tuple(args.topics), recorder="dvla bus record"
    )
    try:
        _run(_tap_loop(args, list(args.topics), lambda m: writer.write(list(m.frames))))
    finally:
        writer.close()
    stats = writer.statistics()
    print(f"recorded {stats.messages} message(s), {stats.bytes} bytes in {stats.files} file(s)")
    return 0


def _replay(args: argparse.Namespace) -> int:
    return _run(_replay_main(args))


async def _replay_main(args: argparse.Namespace) -> None:
    status = await _status(args)
    targets = [
        m.endpoints["data"]
        for m in status.members
        if m.state != "dead" and m.endpoints.get("data") and (args.to in (None, m.node))
    ]
    if not targets:
        raise ConfigError(f"no data inbox to replay into (--to {args.to!r})")
    reader = BagReader(bag_files(args.recording))
    sent = 0
    creds = _credentials(args)
    async with (
        open_context(credentials=creds) as ctx,
        open_outbox(ctx, name="replay", host="replay", policy="block", credentials=creds) as out,
    ):
        for endpoint in targets:
            await out.connect(endpoint)
        await out.wait_ready(timeout=args.timeout)
        async for record in replay(reader, rate=args.rate):
            got = record.decode()
            msg = got.msg
            if not isinstance(msg, wire.Data):
                continue
            names = list(msg.names) or [str(i) for i in range(len(got.arrays))]
            await out.send(
                dict(msg.meta), dict(zip(names, got.arrays, strict=False)), topic=got.topic
            )
            sent += 1
        deadline = time.monotonic() + 10
        while out.statistics().in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    print(f"replayed {sent} message(s) to {len(targets)} inbox(es)")


# --- trace -----------------------------------------------------------------------------------


def _trace(args: argparse.Namespace) -> int:
    return _run(_trace_main(args))


async def _trace_main(args: argparse.Namespace) -> None:
    tag = f"{time.time():.6f}"
    async with open_control_client(_hub_endpoint(args), credentials=_credentials(args)) as client:
        status = await client.query(timeout=args.timeout)
        live = [m for m in status.members if m.state != "dead"]
        await client.send(wire.Command(command="trace", args={"tag": tag}))
        run_dir = _run_dir(args)
        want = {run_dir / "trace" / f"{m.node}.json" for m in live}
        deadline = time.monotonic() + args.timeout
        parts: dict[Path, list[dict[str, Any]]] = {}
        while time.monotonic() < deadline and len(parts) < len(want):
            for path in want - set(parts):
                with contextlib.suppress(OSError, ValueError):
                    doc = json.loads(path.read_text())
                    if doc.get("tag") == tag:
                        parts[path] = doc["events"]
            await asyncio.sleep(0.05)
    output = args.output or run_dir / "trace.json"
    output.write_text(json.dumps(merge_traces(list(parts.values()))))
    missing = sorted(p.stem for p in want - set(parts))
    print(
        f"wrote {output} ({len(parts)} node(s)"
        + (f"; no answer from {missing})" if missing else ")")
    )


def _run_dir(args: argparse.Namespace) -> Path:
    if args.run_dir is not None:
        return Path(args.run_dir)
    runs = sorted(Path("runs").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise ConfigError("dvla bus trace needs --run-dir (the nodes write into it)")
    return runs[-1].parent
