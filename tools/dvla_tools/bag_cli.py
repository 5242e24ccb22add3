"""``dvla bus info FILE...``: summarise a recording (``.dvlabag`` files; like ``ros2 bag info``).

Reads files only, never the bus. Each FILE is a recording file or a recording prefix standing for
its numbered files (see :func:`dvla_bus.bag.bag_files`). Prints per file its size, records and
whether it ended cleanly, was truncated (a crash while recording; the ignored trailing bytes are
shown) or is corrupt, then per topic its messages, bytes, header kinds and rate. ``--json`` prints
the same as one JSON object (:meth:`dvla_bus.bag.BagInfo.to_json`). Exit status 0 when the files
could be read (truncation is reported, not an error), 2 when one is not a readable recording.

``dvla bus record`` and ``dvla bus replay`` use the same library (:class:`dvla_bus.bag.BagWriter`,
:class:`dvla_bus.bag.BagReader`, :func:`dvla_bus.bag.replay`) with the live-bus taps.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from dvla_bus import bag

__all__ = ["add_bag_commands"]


def add_bag_commands(verbs: Any) -> None:
    """Add the recording verbs (now: ``info``) to ``verbs``, the subparsers of ``dvla bus``."""
    parser: argparse.ArgumentParser = verbs.add_parser(
        "info",
        help="summarise a recording (.dvlabag files)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "files", nargs="+", metavar="FILE", help="a .dvlabag file or a recording prefix"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--resync",
        action="store_true",
        help="after a corrupt record, scan for the next valid one instead of stopping",
    )
    parser.set_defaults(func=_info)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # unreachable; keeps the type checker content


def _when(ns: int | None) -> str:
    if ns is None:
        return "-"
    return dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC).isoformat(timespec="milliseconds")


def _info(args: argparse.Namespace) -> int:
    summary = bag.info(args.files, resync=args.resync)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
        return 0
    console = Console(width=160)
    first = next((r.meta for r in summary.files if r.meta is not None), None)
    if first is not None:
        console.print(
            f"recording {first.name!r} by {first.recorder or '?'} on {first.host} "
            f"(pid {first.pid}), protocol v{first.protocol}, "
            f"topics: {', '.join(first.topics) or 'all'}"
        )
    console.print(
        f"{summary.messages} messages, {_size(summary.message_bytes)} of frames in "
        f"{len(summary.files)} file(s) of {_size(summary.bytes)}; "
        f"{_when(summary.start_ns)} .. {_when(summary.end_ns)} ({summary.duration_s:.3f} s)"
    )
    files = Table(title="files")
    for col in ("file", "size", "records", "status", "ignored", "skipped", "problem"):
        files.add_column(col)
    for r in summary.files:
        files.add_row(
            str(r.path),
            _size(r.size),
            str(r.records),
            r.status,
            f"{r.ignored_bytes} B",
            f"{r.skipped_bytes} B in {r.corrupt_records}" if r.corrupt_records else "-",
            r.problem or "-",
        )
    console.print(files)
    topics = Table(title="topics")
    for col in ("topic", "messages", "bytes", "rate", "kinds"):
        topics.add_column(col)
    for t in summary.topics:
        topics.add_row(
            t.topic,
            str(t.messages),
            _size(t.bytes),
            f"{t.rate_hz:.2f} Hz",
            " ".join(f"{k}={n}" for k, n in t.kinds.items()),
        )
    console.print(topics)
    return 0
