"""Recordings of bus traffic (``.dvlabag`` files): the library under ``dvla bus record``,
``dvla bus replay`` and ``dvla bus info`` (like ``ros2 bag``).

A recording is a series of numbered files ``NAME.0000.dvlabag``, ``NAME.0001.dvlabag``, ... Each
file is self-contained: a file header (magic, format version, a small MessagePack metadata map)
followed by records, one per message, each a fixed 32-byte little-endian record header (sync word,
CRC32, body length, receive time, frame count) and the message's frames exactly as they came off
the wire (topic, header, payload), each prefixed by its length. PROTOCOL.md §8 describes it byte by
byte. The format is pickle-free (struct + MessagePack + CRC32), append-only (nothing is ever
rewritten) and crash-tolerant: a file cut anywhere still reads up to its last whole record, and the
reader reports how many trailing bytes it ignored.

* :class:`BagWriter` appends records, splits into a new file when the next record would take the
  current one past ``max_bytes``, and bounds what it buffers (see its flush policy).
* :class:`BagReader` iterates the records of one or more files in order, validating each; after a
  file it leaves a :class:`BagFileReport` saying whether the file ended cleanly, was truncated or
  was corrupt and how many bytes were ignored.
* :func:`info` summarises a recording (:class:`BagInfo`) for ``dvla bus info``.
* :func:`replay` paces records at their recorded relative timing scaled by ``rate``, on an
  injectable clock.

Nothing here touches sockets: the live taps that feed the writer and republish what the reader
yields live with the ``dvla bus`` commands.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import re
import socket
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeAlias

import msgspec

from dvla_bus import wire
from dvla_bus.errors import ConfigError, DvlaError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FILE_HEADER",
    "FILE_MAGIC",
    "FORMAT_VERSION",
    "INVALID_KIND",
    "MAX_META_BYTES",
    "RECORD_HEADER",
    "SUFFIX",
    "SYNC",
    "AsyncioClock",
    "BagError",
    "BagFileReport",
    "BagInfo",
    "BagMeta",
    "BagReader",
    "BagRecord",
    "BagStats",
    "BagWriter",
    "ReplayClock",
    "TopicInfo",
    "bag_files",
    "info",
    "replay",
]

FORMAT_VERSION: Final = 1
SUFFIX: Final = ".dvlabag"
#: First 8 bytes of every file. The high first byte catches 7-bit/text-mode damage (as PNG does).
FILE_MAGIC: Final = b"\x89DVLABAG"
#: magic, format version (u16), flags (u16, 0), metadata length (u32), CRC32 (u32) of bytes 8..16
#: of this header followed by the metadata.
FILE_HEADER: Final = struct.Struct("<8sHHII")
#: Starts every record. 0xF7 never occurs in UTF-8 text, so topics and text payloads cannot
#: contain it; a resync scan looks for these four bytes.
SYNC: Final = b"\xf7\xdb\xa9\x3c"
#: sync, CRC32 (u32), body length (u64), receive time (i64 ns since the epoch), frame count (u32),
#: reserved (u32, written 0, ignored). The CRC covers bytes 8..32 of this header, then the body.
RECORD_HEADER: Final = struct.Struct("<4sIQqII")
_FRAME_LEN: Final = struct.Struct("<Q")
_RECORD_TAIL: Final = struct.Struct("<QqII")  # RECORD_HEADER without sync and CRC
MAX_META_BYTES: Final = 1 << 20
DEFAULT_MAX_BYTES: Final = 1 << 30
_SMALL_RECORD: Final = 64 * 1024  # records up to this size are batched; larger ones use writev
_IOV_MAX: Final = max(16, min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024))
_SPLIT_NAME: Final = re.compile(r"^(?P<prefix>.*)\.(?P<index>\d{4,})" + re.escape(SUFFIX) + "$")

Buffer: TypeAlias = bytes | bytearray | memoryview
"""A frame to record: anything with the buffer protocol (or a ``zmq.Frame``, through its
``.buffer``)."""

Status: TypeAlias = Literal["ok", "truncated", "corrupt"]


class BagError(DvlaError):
    """A recording cannot be written or read: the message names the file and what is wrong.

    Truncated or corrupt *records* are not errors (the reader reports them); this is raised for a
    file that is not a recording at all, an unsupported format version, a damaged file header,
    misuse of a writer, or an operating-system error on a named file."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class BagMeta(msgspec.Struct, frozen=True, kw_only=True):
    """The metadata map at the start of every file (MessagePack, string keys).

    Readers ignore keys they do not know, so later versions may add some."""

    format: int = FORMAT_VERSION
    protocol: int = wire.PROTOCOL_VERSION  # dvla wire protocol of the recorded messages
    recorder: str = ""  # who recorded: a tool or node name
    host: str = ""  # hostname of the recorder
    pid: int = 0  # process id of the recorder
    created_ns: int = 0  # wall clock when this file was opened, ns since the Unix epoch
    name: str = ""  # the recording's name (the path prefix's last component)
    index: int = 0  # split number of this file, from 0
    topics: tuple[str, ...] = ()  # the topic filter the recording used; empty: every topic
    extra: dict[str, str | int | float | bool] = {}  # free-form, e.g. the topology file


_meta_encoder = msgspec.msgpack.Encoder()
_meta_decoder = msgspec.msgpack.Decoder(BagMeta)


# --- writing --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BagStats:
    """A snapshot of a :class:`BagWriter`.

    ``bytes`` counts every byte handed to the files (headers included, buffered or not);
    ``buffered_bytes`` of them are not yet handed to the operating system; ``filtered`` counts
    messages :meth:`BagWriter.write` skipped because of the topic filter."""

    messages: int
    bytes: int
    files: int
    topics: Mapping[str, int]
    filtered: int
    buffered_bytes: int
    path: Path  # the file now being written


def _view(frame: Any) -> memoryview:
    """A flat byte view of ``frame`` (bytes, memoryview, numpy buffer, ``zmq.Frame``): no copy."""
    view = memoryview(getattr(frame, "buffer", frame))
    if view.ndim != 1 or view.format != "B":
        if not view.c_contiguous:
            raise ValueError("frame is not a contiguous buffer")
        view = view.cast("B")
    return view


def _write_all(fd: int, bufs: list[memoryview]) -> None:
    """``os.writev`` every buffer, in batches of at most IOV_MAX, resuming after short writes."""
    bufs = [b for b in bufs if b.nbytes]
    i = 0
    while i < len(bufs):
        n = os.writev(fd, bufs[i : i + _IOV_MAX])
        if n <= 0:
            raise OSError("writev wrote nothing")
        while n:
            size = bufs[i].nbytes
            if n >= size:
                n -= size
                i += 1
            else:
                bufs[i] = bufs[i][n:]
                n = 0


class BagWriter:
    """Append messages to ``PREFIX.NNNN.dvlabag`` files, starting a new file when the next record
    would take the current one past ``max_bytes`` (a record larger than that gets a file of its
    own). The first file is created (never overwritten: an existing one is a :class:`BagError`)
    and its header written when the writer is constructed; files are private to the user (0600).

    Flush policy: records of up to 64 KiB are batched in memory; the batch is handed to the
    operating system when it reaches ``flush_bytes``, when a :meth:`write` finds the oldest
    buffered record ``flush_interval`` seconds old, on :meth:`flush`, on a split and on
    :meth:`close`. Larger records are written at once with ``os.writev`` straight from the
    caller's buffers (no copy). So at most ``flush_bytes`` + one small record sit in memory, and a
    crash of the process loses at most those; what was handed over survives it. With
    ``fsync=True`` every hand-over is followed by ``os.fsync`` (survives power loss, costs a disk
    round trip). A caller that records sparse traffic should call :meth:`flush` from a timer.

    Not thread-safe: one writer belongs to one thread (or event loop). Use as a context manager
    or call :meth:`close`.
    """

    def __init__(
        self,
        path_prefix: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        topics: Iterable[str] = (),
        recorder: str = "",
        extra: Mapping[str, str | int | float | bool] | None = None,
        flush_bytes: int = 1 << 20,
        flush_interval: float = 1.0,
        fsync: bool = False,
        clock_ns: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_bytes``: split size per file in bytes; ``topics``: record only these exact
        topics (empty: all); ``flush_interval`` in seconds; ``clock_ns`` gives receive times
        (ns since the epoch) for :meth:`write` calls that pass none; ``monotonic`` (seconds) drives
        the time-based flush."""
        if max_bytes < 1:
            raise ConfigError(f"bag max_bytes must be >= 1, got {max_bytes}")
        if flush_bytes < 0 or not flush_interval >= 0:
            raise ConfigError("bag flush_bytes and flush_interval must be >= 0")
        prefix = os.fspath(path_prefix)
        prefix = prefix.removesuffix(SUFFIX)
        self._prefix = prefix
        self._max_bytes = max_bytes
        self._topics = tuple(topics)
        self._filter = frozenset(t.encode() for t in self._topics)
        self._flush_bytes = flush_bytes
        self._flush_interval = flush_interval
        self._fsync = fsync
        self._clock_ns = clock_ns
        self._monotonic = monotonic
        self._meta_fields: dict[str, Any] = {
            "recorder": recorder,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "name": Path(prefix).name,
            "topics": self._topics,
            "extra": dict(extra or {}),
        }
        self._buf = bytearray()
        self._buf_since = 0.0
        self._messages = 0
        self._bytes = 0
        self._filtered = 0
        self._per_topic: dict[bytes, int] = {}
        self._paths: list[Path] = []
        self._file_bytes = 0
        self._file_records = 0
        self._file: Any = None  # io.FileIO; Any keeps the opener's flags out of the type
        self._open_next()

    # -- files --

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every file this writer has created, in order."""
        return tuple(self._paths)

    def _open_next(self) -> None:
        index = len(self._paths)
        path = Path(f"{self._prefix}.{index:04d}{SUFFIX}")
        meta = BagMeta(created_ns=self._clock_ns(), index=index, **self._meta_fields)
        meta_bytes = _meta_encoder.encode(meta)
        tail = struct.pack("<HHI", FORMAT_VERSION, 0, len(meta_bytes))
        crc = zlib.crc32(meta_bytes, zlib.crc32(tail))
        header = FILE_HEADER.pack(FILE_MAGIC, FORMAT_VERSION, 0, len(meta_bytes), crc)

        def opener(p: str, flags: int) -> int:
            return os.open(p, flags | os.O_CLOEXEC, 0o600)

        try:
            self._file = open(path, "xb", buffering=0, opener=opener)  # noqa: SIM115
        except FileExistsError:
            raise BagError(path, "already exists; choose another recording name") from None
        except OSError as exc:
            raise BagError(path, f"cannot create: {exc.strerror or exc}") from None
        self._paths.append(path)
        self._file_bytes = 0
        self._file_records = 0
        self._append(header + meta_bytes)

    def _append(self, data: bytes) -> None:
        if not self._buf:
            self._buf_since = self._monotonic()
        self._buf += data
        self._file_bytes += len(data)
        self._bytes += len(data)

    def _hand_over(self, bufs: list[memoryview]) -> None:
        try:
            _write_all(self._file.fileno(), bufs)
            if self._fsync:
                os.fsync(self._file.fileno())
        except OSError as exc:
            raise BagError(self._paths[-1], f"cannot write: {exc.strerror or exc}") from None

    def flush(self) -> None:
        """Hand buffered records to the operating system (and fsync if so configured)."""
        self._check_open()
        if self._buf:
            with memoryview(self._buf) as view:
                self._hand_over([view])
            self._buf.clear()

    def _check_open(self) -> None:
        if self._file is None:
            raise BagError(self._paths[-1], "the writer is closed")

    # -- records --

    def write(self, frames: Sequence[Any], recv_ns: int | None = None) -> bool:
        """Record one message: ``frames`` exactly as received (``[topic, header, *payload]``;
        bytes, memoryviews, numpy buffers or ``zmq.Frame``; at least the topic), received at
        ``recv_ns`` (ns since the Unix epoch; default: ``clock_ns()`` now).

        Frames are not validated (a recording may hold malformed messages, to debug them).
        Returns False, writing nothing, when the topic filter excludes the message. Large frames
        are written from the caller's buffers before this returns; the caller may reuse them
        afterwards."""
        self._check_open()
        if not frames:
            raise BagError(self._paths[-1], "a message has at least one frame (its topic)")
        try:
            views = [_view(f) for f in frames]
        except (TypeError, ValueError) as exc:
            raise BagError(self._paths[-1], f"cannot record frame: {exc}") from None
        topic = views[0].tobytes()
        if self._filter and topic not in self._filter:
            self._filtered += 1
            return False
        if recv_ns is None:
            recv_ns = self._clock_ns()
        body_len = sum(v.nbytes for v in views) + _FRAME_LEN.size * len(views)
        if not -(1 << 63) <= recv_ns < (1 << 63):
            raise BagError(self._paths[-1], f"receive time {recv_ns} ns is out of range")
        tail = _RECORD_TAIL.pack(body_len, recv_ns, len(views), 0)
        crc = zlib.crc32(tail)
        prefixes = [_FRAME_LEN.pack(v.nbytes) for v in views]
        for p, v in zip(prefixes, views, strict=True):
            crc = zlib.crc32(v, zlib.crc32(p, crc))
        header = SYNC + struct.pack("<I", crc) + tail
        total = RECORD_HEADER.size + body_len

        if self._file_records and self._file_bytes + total > self._max_bytes:
            self.flush()
            self._close_file()
            self._open_next()
        self._file_records += 1
        self._messages += 1
        self._per_topic[topic] = self._per_topic.get(topic, 0) + 1

        if total <= _SMALL_RECORD:
            self._append(header)
            for p, v in zip(prefixes, views, strict=True):
                self._buf += p
                self._buf += v
            self._file_bytes += body_len
            self._bytes += body_len
            if (
                len(self._buf) >= self._flush_bytes
                or self._monotonic() - self._buf_since >= self._flush_interval
            ):
                self.flush()
        else:
            self.flush()
            bufs = [memoryview(header)]
            for p, v in zip(prefixes, views, strict=True):
                bufs.append(memoryview(p))
                bufs.append(v)
            self._hand_over(bufs)
            self._file_bytes += total
            self._bytes += total
        return True

    def statistics(self) -> BagStats:
        """A snapshot of what was written so far."""
        return BagStats(
            messages=self._messages,
            bytes=self._bytes,
            files=len(self._paths),
            topics={t.decode("utf-8", "replace"): n for t, n in self._per_topic.items()},
            filtered=self._filtered,
            buffered_bytes=len(self._buf),
            path=self._paths[-1],
        )

    # -- closing --

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is None:
            return
        try:
            if self._fsync:
                os.fsync(file.fileno())
        finally:
            file.close()

    def close(self) -> None:
        """Flush and close the current file. Idempotent."""
        if self._file is None:
            return
        try:
            self.flush()
        finally:
            self._close_file()

    def __enter__(self) -> BagWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BagRecord:
    """One recorded message: its frames exactly as received (read-only views over one buffer per
    record; they stay valid as long as they are referenced) and the receive time."""

    recv_ns: int  # receiver's wall clock, ns since the Unix epoch
    frames: tuple[memoryview, ...]
    path: Path  # the file it came from
    offset: int  # byte offset of its record header in that file

    @property
    def topic(self) -> str:
        """Frame 0 as text (invalid UTF-8 replaced, since recordings may hold bad messages)."""
        return self.frames[0].tobytes().decode("utf-8", "replace")

    @property
    def recv_time(self) -> float:
        """Receive time in seconds since the Unix epoch."""
        return self.recv_ns / 1e9

    @property
    def nbytes(self) -> int:
        """Bytes of all frames (topic, header, payload)."""
        return sum(f.nbytes for f in self.frames)

    def decode(self) -> wire.Received:
        """Validate and decode the message with :func:`dvla_bus.wire.decode`; raises
        :class:`~dvla_bus.errors.WireError` for a malformed one. The arrays are views over
        this record's buffer (no copy)."""
        return wire.decode(self.frames)


@dataclass(frozen=True, slots=True)
class BagFileReport:
    """How reading one file went.

    ``status`` is ``ok`` (every byte belonged to a valid record), ``truncated`` (the file ends
    inside a record or inside its header: a crash while recording) or ``corrupt`` (a record
    failed its checks). ``ignored_bytes`` are the bytes after the last record read that were not
    used (the cut-off tail, or everything after a corrupt record when not resyncing);
    ``skipped_bytes`` are bytes a resync scan jumped over between valid records, in
    ``corrupt_records`` places. ``meta`` is None when the file ends before its metadata."""

    path: Path
    size: int
    meta: BagMeta | None
    records: int
    status: Status
    ignored_bytes: int
    skipped_bytes: int = 0
    corrupt_records: int = 0
    problem: str = ""  # what was wrong, for people


class _Bad(Exception):
    """A record at some offset failed to validate (internal control flow)."""

    def __init__(self, status: Status, problem: str) -> None:
        self.status: Status = status
        self.problem = problem
        super().__init__(problem)


def _parse_record(mm: mmap.mmap, pos: int, size: int, path: Path) -> tuple[BagRecord, int]:
    """The record at ``pos`` and the offset after it, or :class:`_Bad`."""
    end_hdr = pos + RECORD_HEADER.size
    if end_hdr > size:
        raise _Bad("truncated", f"record header at {pos} cut off")
    sync, crc, body_len, recv_ns, nframes, _reserved = RECORD_HEADER.unpack_from(mm, pos)
    if sync != SYNC:
        raise _Bad("corrupt", f"no sync word at {pos}")
    if body_len > size - end_hdr:
        raise _Bad("truncated", f"record at {pos}: body of {body_len} bytes cut off")
    if nframes == 0 or nframes * _FRAME_LEN.size > body_len:
        raise _Bad("corrupt", f"record at {pos}: {nframes} frames in {body_len} bytes")
    body = mm[end_hdr : end_hdr + body_len]  # the one copy, out of the mapping
    if zlib.crc32(body, zlib.crc32(mm[pos + 8 : end_hdr])) != crc:
        raise _Bad("corrupt", f"record at {pos}: CRC mismatch")
    view = memoryview(body)
    frames: list[memoryview] = []
    at = 0
    for _ in range(nframes):
        if at + _FRAME_LEN.size > body_len:
            raise _Bad("corrupt", f"record at {pos}: frame table overruns the body")
        (n,) = _FRAME_LEN.unpack_from(body, at)
        at += _FRAME_LEN.size
        if n > body_len - at:
            raise _Bad("corrupt", f"record at {pos}: frame overruns the body")
        frames.append(view[at : at + n])
        at += n
    if at != body_len:
        raise _Bad("corrupt", f"record at {pos}: {body_len - at} stray bytes after the frames")
    return BagRecord(recv_ns, tuple(frames), path, pos), end_hdr + body_len


def _read_file_header(mm: mmap.mmap | None, size: int, path: Path) -> tuple[BagMeta, int]:
    """The metadata and the offset of the first record; :class:`_Bad` ("truncated") when the file
    ends inside its header; :class:`BagError` when it is not a readable recording."""
    head = mm[: FILE_HEADER.size] if mm is not None else b""
    if len(head) < len(FILE_MAGIC):
        if FILE_MAGIC.startswith(head):
            raise _Bad("truncated", "file ends inside its magic")
        raise BagError(path, "not a dvla recording (bad magic)")
    if head[: len(FILE_MAGIC)] != FILE_MAGIC:
        raise BagError(path, "not a dvla recording (bad magic)")
    if len(head) < FILE_HEADER.size:
        raise _Bad("truncated", "file ends inside its header")
    assert mm is not None
    _, version, _flags, meta_len, crc = FILE_HEADER.unpack(head)
    if version != FORMAT_VERSION:
        raise BagError(path, f"format version {version}; this reader reads {FORMAT_VERSION}")
    if meta_len > MAX_META_BYTES:
        raise BagError(path, f"damaged file header (metadata of {meta_len} bytes)")
    start = FILE_HEADER.size + meta_len
    if start > size:
        raise _Bad("truncated", "file ends inside its metadata")
    meta_bytes = mm[FILE_HEADER.size : start]
    if zlib.crc32(meta_bytes, zlib.crc32(head[8:16])) != crc:
        raise BagError(path, "damaged file header (CRC mismatch)")
    try:
        meta = _meta_decoder.decode(meta_bytes)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        raise BagError(path, f"damaged metadata: {exc}") from None
    return meta, start


class _FileScan:
    """Iterates one file's records; leaves its :class:`BagFileReport` in ``report``."""

    def __init__(self, path: Path, resync: bool) -> None:
        self.path = path
        self.resync = resync
        self.report: BagFileReport | None = None

    def __iter__(self) -> Iterator[BagRecord]:
        path = self.path
        try:
            f = open(path, "rb")  # noqa: SIM115
        except OSError as exc:
            raise BagError(path, f"cannot open: {exc.strerror or exc}") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            # Only what the file held when opened is read (a file being written may grow).
            try:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            except (OSError, ValueError) as exc:
                raise BagError(path, f"cannot map: {exc}") from None
            try:
                yield from self._records(mm, size)
            finally:
                if mm is not None:
                    mm.close()

    def _records(self, mm: mmap.mmap | None, size: int) -> Iterator[BagRecord]:
        path = self.path
        try:
            meta, pos = _read_file_header(mm, size, path)
        except _Bad as bad:
            self.report = BagFileReport(path, size, None, 0, bad.status, size, problem=bad.problem)
            return
        assert mm is not None
        records = skipped = corrupt = 0
        status: Status = "ok"
        problem = ""
        while pos < size:
            try:
                record, after = _parse_record(mm, pos, size, path)
            except _Bad as bad:
                found = self._resync(mm, pos, size) if self.resync else None
                if found is None:
                    status, problem = bad.status, bad.problem
                    break
                record, after = found
                skipped += record.offset - pos
                corrupt += 1
                status, problem = "corrupt", bad.problem
            records += 1
            pos = after
            yield record
        self.report = BagFileReport(
            path, size, meta, records, status, size - pos, skipped, corrupt, problem
        )

    def _resync(self, mm: mmap.mmap, pos: int, size: int) -> tuple[BagRecord, int] | None:
        """The next valid record after a bad one at ``pos``, found by scanning for the sync
        word; None when there is none."""
        at = pos
        while True:
            at = mm.find(SYNC, at + 1)
            if at < 0:
                return None
            try:
                return _parse_record(mm, at, size, self.path)
            except _Bad:
                continue


def bag_files(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The files a recording argument names, in reading order. Each argument is an existing file
    (taken as is) or a recording prefix ``NAME`` (or ``NAME.dvlabag``) standing for its numbered
    files ``NAME.NNNN.dvlabag``, sorted by number. :class:`BagError` when an argument names
    nothing."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    out: list[Path] = []
    for arg in paths:
        path = Path(arg)
        if path.is_file():
            out.append(path)
            continue
        prefix = Path(os.fspath(path).removesuffix(SUFFIX))
        parent = prefix.parent
        found: list[tuple[int, Path]] = []
        if parent.is_dir():
            for child in parent.iterdir():
                m = _SPLIT_NAME.match(child.name)
                if m and m["prefix"] == prefix.name and child.is_file():
                    found.append((int(m["index"]), child))
        if not found:
            raise BagError(path, f"no such recording (no file, no {prefix.name}.NNNN{SUFFIX})")
        out.extend(p for _, p in sorted(found))
    return out


class BagReader:
    """Iterate the records of a recording (see :func:`bag_files` for ``paths``), file after file,
    in order. Each record is validated (sync word, lengths, CRC32); at the first record that
    fails the reader stops reading that file — or, with ``resync=True``, scans forward for the
    next valid record — and goes on with the next file. Nothing but :class:`BagError` is raised,
    and only for a file that is not a readable recording (see :class:`BagError`).

    ``topics``: yield only records of these exact topics (empty: all). After a file has been
    read to its end, its :class:`BagFileReport` is appended to :attr:`reports` (iterating again
    starts the reports afresh). Files are memory-mapped read-only while being read; a record
    holds its own copy of its bytes, so it outlives the reader."""

    def __init__(
        self,
        paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        *,
        resync: bool = False,
        topics: Iterable[str] = (),
    ) -> None:
        self.paths: tuple[Path, ...] = tuple(bag_files(paths))
        self.resync = resync
        self._topics = frozenset(topics)
        self.reports: list[BagFileReport] = []

    def __iter__(self) -> Iterator[BagRecord]:
        self.reports = []
        for path in self.paths:
            scan = _FileScan(path, self.resync)
            for record in scan:
                if not self._topics or record.topic in self._topics:
                    yield record
            assert scan.report is not None
            self.reports.append(scan.report)


# --- info -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TopicInfo:
    """One topic of a recording. ``bytes`` counts every frame (topic, header, payload);
    ``kinds`` counts header kinds (``<invalid>`` for a header that is not a MessagePack map with
    a string ``kind``); ``rate_hz`` is (messages - 1) / (last - first receive time), 0 for fewer
    than two messages or no time between them."""

    topic: str
    messages: int
    bytes: int
    kinds: Mapping[str, int]
    first_ns: int
    last_ns: int
    rate_hz: float


@dataclass(frozen=True, slots=True)
class BagInfo:
    """A recording's summary, for ``dvla bus info``. ``bytes`` is the size of the files;
    ``message_bytes`` the frames' bytes; times are receive times (ns since the epoch; None when
    there are no messages); ``duration_s`` = last - first, in seconds."""

    files: tuple[BagFileReport, ...]
    messages: int
    bytes: int
    message_bytes: int
    start_ns: int | None
    end_ns: int | None
    duration_s: float
    topics: tuple[TopicInfo, ...]
    ignored_bytes: int
    skipped_bytes: int
    corrupt_records: int

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able data (paths as strings, metadata as maps)."""
        return {
            "files": [
                {
                    "path": str(r.path),
                    "size": r.size,
                    "records": r.records,
                    "status": r.status,
                    "ignored_bytes": r.ignored_bytes,
                    "skipped_bytes": r.skipped_bytes,
                    "corrupt_records": r.corrupt_records,
                    "problem": r.problem,
                    "meta": msgspec.to_builtins(r.meta),
                }
                for r in self.files
            ],
            "messages": self.messages,
            "bytes": self.bytes,
            "message_bytes": self.message_bytes,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "duration_s": self.duration_s,
            "topics": [
                {
                    "topic": t.topic,
                    "messages": t.messages,
                    "bytes": t.bytes,
                    "kinds": dict(t.kinds),
                    "first_ns": t.first_ns,
                    "last_ns": t.last_ns,
                    "rate_hz": t.rate_hz,
                }
                for t in self.topics
            ],
            "ignored_bytes": self.ignored_bytes,
            "skipped_bytes": self.skipped_bytes,
            "corrupt_records": self.corrupt_records,
        }


class _KindOnly(msgspec.Struct):
    kind: str


_kind_decoder = msgspec.msgpack.Decoder(_KindOnly)
INVALID_KIND: Final = "<invalid>"


def _kind(record: BagRecord) -> str:
    if len(record.frames) < 2:
        return INVALID_KIND
    try:
        return _kind_decoder.decode(record.frames[1]).kind
    except (msgspec.DecodeError, ValueError, RecursionError, OverflowError):
        return INVALID_KIND


@dataclass
class _TopicAcc:
    messages: int = 0
    bytes: int = 0
    first_ns: int = 0
    last_ns: int = 0
    kinds: dict[str, int] = field(default_factory=dict)


def info(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *, resync: bool = False
) -> BagInfo:
    """Read a whole recording and summarise it (see :class:`BagInfo`); ``resync`` as for
    :class:`BagReader`."""
    reader = BagReader(paths, resync=resync)
    topics: dict[str, _TopicAcc] = {}
    start: int | None = None
    end: int | None = None
    messages = message_bytes = 0
    for record in reader:
        acc = topics.get(record.topic)
        if acc is None:
            acc = topics[record.topic] = _TopicAcc(first_ns=record.recv_ns, last_ns=record.recv_ns)
        n = record.nbytes
        acc.messages += 1
        acc.bytes += n
        acc.first_ns = min(acc.first_ns, record.recv_ns)
        acc.last_ns = max(acc.last_ns, record.recv_ns)
        kind = _kind(record)
        acc.kinds[kind] = acc.kinds.get(kind, 0) + 1
        messages += 1
        message_bytes += n
        start = record.recv_ns if start is None else min(start, record.recv_ns)
        end = record.recv_ns if end is None else max(end, record.recv_ns)
    reports = tuple(reader.reports)
    return BagInfo(
        files=reports,
        messages=messages,
        bytes=sum(r.size for r in reports),
        message_bytes=message_bytes,
        start_ns=start,
        end_ns=end,
        duration_s=(end - start) / 1e9 if start is not None and end is not None else 0.0,
        topics=tuple(
            TopicInfo(
                topic=name,
                messages=a.messages,
                bytes=a.bytes,
                kinds=dict(sorted(a.kinds.items())),
                first_ns=a.first_ns,
                last_ns=a.last_ns,
                rate_hz=(
                    (a.messages - 1) / ((a.last_ns - a.first_ns) / 1e9)
                    if a.messages > 1 and a.last_ns > a.first_ns
                    else 0.0
                ),
            )
            for name, a in sorted(topics.items())
        ),
        ignored_bytes=sum(r.ignored_bytes for r in reports),
        skipped_bytes=sum(r.skipped_bytes for r in reports),
        corrupt_records=sum(r.corrupt_records for r in reports),
    )


# --- replay ---------------------------------------------------------------------------------


class ReplayClock(Protocol):
    """What :func:`replay` needs of time: a monotonic clock in seconds and a way to wait."""

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class AsyncioClock:
    """The real clock: ``time.monotonic`` and ``asyncio.sleep``."""

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def replay(
    records: Iterable[BagRecord], rate: float = 1.0, clock: ReplayClock | None = None
) -> AsyncIterator[BagRecord]:
    """Yield ``records`` at their recorded relative timing divided by ``rate`` (2 = twice as
    fast; 0 = as fast as possible).

    Record *i* is due ``(recv_ns[i] - recv_ns[0]) / 1e9 / rate`` seconds after the first was
    yielded, measured on ``clock`` (default: :class:`AsyncioClock`) from that start, so delays do
    not accumulate; a record already late is yielded at once (no catching up by bursts beyond
    that). A receive time earlier than one before it (the recorder's wall clock stepped back) is
    treated as equal to the latest seen. Before every record the generator awaits
    ``clock.sleep`` (with 0 when nothing is left to wait) so a fast replay still lets the event
    loop run. Reading from ``records`` is synchronous file I/O."""
    if not (rate >= 0 and rate != float("inf")):
        raise ConfigError(f"replay rate must be a finite number >= 0, got {rate}")
    clock = clock if clock is not None else AsyncioClock()
    start: float | None = None
    first_ns = latest_ns = 0
    for record in records:
        if start is None:
            start = clock.monotonic()
            first_ns = latest_ns = record.recv_ns
        latest_ns = max(latest_ns, record.recv_ns)
        delay = 0.0
        if rate > 0:
            delay = max(0.0, start + (latest_ns - first_ns) / 1e9 / rate - clock.monotonic())
        await clock.sleep(delay)
        yield record
