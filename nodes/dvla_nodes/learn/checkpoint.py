"""Checkpoints: the flat parameter buffer (and optimiser moments) in safetensors, with the
metadata (version, step, config, metrics, the flat layout's manifest and a SHA-256 of the tensor
data) in the safetensors header itself, plus a JSON copy of that metadata beside it. No pickle.

The ``<name>.safetensors`` file is the checkpoint and its one commit point: it is written to a
temporary name in the same directory, fsync'd and moved into place with a single ``os.replace``,
so a reader finds either the previous complete checkpoint or the new one, never new weights with
old metadata (a kill between two renames could once leave such a pair, and a restarted learner
then refused it). ``<name>.json`` is written the same way right after, for people and tools;
a kill between the two leaves it one save behind, and :func:`load_checkpoint` and
:func:`checkpoint_meta` read the header, not the JSON. Checkpoints of the first format (metadata
only in the JSON, a checksum of the whole file) still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from dvla_bus.errors import ConfigError
from dvla_nodes.policy.flat import FlatLayout

FORMAT = "dvla-checkpoint/2"
LEGACY_FORMAT = "dvla-checkpoint/1"  # metadata only in the JSON; sha256 of the whole file
HEADER_KEY = "dvla"  # safetensors header metadata key holding the JSON metadata


@dataclass(frozen=True, slots=True)
class Checkpoint:
    flat: np.ndarray  # the parameters, layout order
    layout: FlatLayout
    meta: dict[str, Any]  # version, step, config, metrics, policy, ...
    optimizer: dict[str, np.ndarray]  # flat moment buffers ("exp_avg", "exp_avg_sq"), may be empty


def _write_temp(path: Path, write: Any) -> Path:
    """A complete, fsynced file named like ``path`` inside a fresh temporary directory beside
    it (``.<name>.XXXX.tmp/``; removed if writing fails). A directory, not a file, because the
    safetensors writer makes its own temporary file beside its target: a kill must leave
    nothing but names :func:`_clear_temps` knows."""
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp = tmpdir / path.name
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return tmp


def _commit(tmp: Path, path: Path) -> None:
    """``os.replace`` the file from :func:`_write_temp` onto ``path``; remove its directory."""
    try:
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def _clear_temps(directory: Path, *names: str) -> None:
    """Remove what killed saves of these file names left (one writer per name and directory:
    the learner or the serial trainer)."""
    for name in names:
        for stale in directory.glob(f".{name}.*.tmp"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _data_sha256(tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes (sorted by name): the same for
    the arrays saved and the arrays loaded back, without reading the file twice."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        h.update(f"{key}:{arr.dtype.str}:{arr.shape};".encode())
        h.update(arr.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def optimizer_moments(
    optimizer: torch.optim.Optimizer, module: torch.nn.Module, layout: FlatLayout
) -> dict[str, np.ndarray]:
    """Adam-style moments gathered into flat buffers in the layout's order (empty if none)."""
    params = dict(module.named_parameters())
    out: dict[str, np.ndarray] = {}
    for key in ("exp_avg", "exp_avg_sq"):
        buf = np.zeros(layout.total, np.float32)
        found = False
        for e in layout.entries:
            st = optimizer.state.get(params[e.name], {})
            if key in st:
                buf[e.offset : e.offset + e.numel] = st[key].detach().reshape(-1).cpu().numpy()
                found = True
        if found:
            out[key] = buf
    steps = [float(st["step"]) for st in optimizer.state.values() if "step" in st]
    if steps:
        out["step"] = np.array([max(steps)], np.float32)
    return out


def restore_moments(
    optimizer: torch.optim.Optimizer,
    module: torch.nn.Module,
    layout: FlatLayout,
    moments: dict[str, np.ndarray],
) -> None:
    if "exp_avg" not in moments:
        return
    params = dict(module.named_parameters())
    step = float(moments.get("step", np.ones(1))[0])
    for e in layout.entries:
        p = params[e.name]
        optimizer.state[p] = {
            "step": torch.tensor(step),
            **{
                k: torch.from_numpy(moments[k][e.offset : e.offset + e.numel].copy())
                .view(e.shape)
                .to(p.device)
                for k in ("exp_avg", "exp_avg_sq")
            },
        }


def save_checkpoint(
    directory: Path,
    name: str,
    flat: torch.Tensor | np.ndarray,
    *,
    layout: FlatLayout,
    meta: dict[str, Any],
    optimizer: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``<name>.safetensors`` (tensors and metadata, one atomic replace: the commit), then
    its JSON copy ``<name>.json``; returns the JSON path."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = flat.detach().cpu().numpy() if isinstance(flat, torch.Tensor) else flat
    tensors = {"flat": np.ascontiguousarray(weights[: layout.total])}
    for k, v in (optimizer or {}).items():
        tensors[f"optim.{k}"] = np.ascontiguousarray(v)
    st_path = directory / f"{name}.safetensors"
    json_path = directory / f"{name}.json"
    _clear_temps(directory, st_path.name, json_path.name)
    doc = {
        "format": FORMAT,
        "weights": st_path.name,
        "data_sha256": _data_sha256(tensors),
        "layout": layout.to_json(),
        **meta,
    }
    text = json.dumps(doc, indent=1, sort_keys=True)
    header = {"format": FORMAT, HEADER_KEY: text}
    _commit(_write_temp(st_path, lambda tmp: save_file(tensors, tmp, metadata=header)), st_path)
    _fsync_dir(directory)
    _commit(_write_temp(json_path, lambda tmp: Path(tmp).write_text(text)), json_path)
    return json_path


def _weights_path(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """The safetensors file a checkpoint path names (its JSON, or the file itself) and the
    JSON's content when there is one. A JSON that is missing (a kill before the first one was
    written) falls back to ``<name>.safetensors``."""
    path = Path(path)
    if path.suffix != ".json":
        return path, None
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return path.with_suffix(".safetensors"), None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read checkpoint metadata: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("weights"), str):
        raise ConfigError(f"{path}: not a dvla checkpoint (no 'weights' field)")
    return path.parent / doc["weights"], doc


def _header_doc(st_path: Path) -> dict[str, Any] | None:
    """The metadata in the safetensors header (None for a first-format checkpoint)."""
    try:
        with safe_open(str(st_path), framework="numpy") as f:
            header = f.metadata() or {}
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"{st_path}: cannot read checkpoint: {exc}") from exc
    if HEADER_KEY not in header:
        return None
    try:
        doc = json.loads(header[HEADER_KEY])
    except ValueError as exc:
        raise ConfigError(f"{st_path}: checkpoint metadata is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"{st_path}: format {doc.get('format')!r}, expected {FORMAT!r}")
    return doc


def _meta_of(doc: dict[str, Any]) -> dict[str, Any]:
    drop = ("format", "weights", "sha256", "data_sha256", "layout")
    return {k: v for k, v in doc.items() if k not in drop}


def find_checkpoint(directory: Path, name: str) -> Path | None:
    """``<name>.json`` in ``directory``, or ``<name>.safetensors`` when only that is there (a
    kill right after the first commit); None when there is neither."""
    for suffix in (".json", ".safetensors"):
        path = Path(directory) / f"{name}{suffix}"
        if path.exists():
            return path
    return None


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's metadata (version, step, config, metrics, ...) from the safetensors header
    (only the header is read), or from the JSON for a first-format checkpoint. ``path`` is the
    JSON or the safetensors file."""
    st_path, json_doc = _weights_path(path)
    doc = _header_doc(st_path)
    if doc is None:
        if json_doc is None or json_doc.get("format") != LEGACY_FORMAT:
            raise ConfigError(f"{path}: not a dvla checkpoint")
        doc = json_doc
    return _meta_of(doc)


def load_checkpoint(json_path: Path) -> Checkpoint:
    """Read a checkpoint by its JSON file (or its safetensors file); checks format, checksum
    and layout size."""
    st_path, json_doc = _weights_path(json_path)
    doc = _header_doc(st_path)
    try:
        tensors = load_file(str(st_path))
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"{st_path}: cannot read checkpoint: {exc}") from exc
    if doc is not None:
        if _data_sha256(tensors) != doc.get("data_sha256"):
            raise ConfigError(f"{st_path}: checksum of the tensors does not match; file is corrupt")
    else:  # first format: the JSON holds the metadata and the file's checksum
        if json_doc is None or json_doc.get("format") != LEGACY_FORMAT:
            found = None if json_doc is None else json_doc.get("format")
            raise ConfigError(f"{json_path}: format {found!r}, expected {FORMAT!r}")
        if _sha256(st_path) != json_doc.get("sha256"):
            raise ConfigError(f"{st_path}: checksum does not match {json_path}; file is corrupt")
        doc = json_doc
    layout = FlatLayout.from_json(doc["layout"])
    flat = tensors["flat"]
    if flat.shape != (layout.total,):
        raise ConfigError(f"{st_path}: flat weights {flat.shape}, manifest says {layout.total}")
    optim = {k.removeprefix("optim."): v for k, v in tensors.items() if k.startswith("optim.")}
    return Checkpoint(flat=flat, layout=layout, meta=_meta_of(doc), optimizer=optim)
