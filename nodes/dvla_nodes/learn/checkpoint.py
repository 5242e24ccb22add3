"""Checkpoints: the flat parameter buffer (and optimiser moments) in safetensors, plus a JSON
metadata file (version, step, config, metrics, the flat layout's manifest and the weights'
SHA-256). No pickle.

Both files are written to a temporary name in the same directory, fsync'd, then moved into
place with ``os.replace``; the JSON goes last and names the safetensors file it describes, so a
reader that finds ``<name>.json`` always finds complete weights that match it. A crash mid-write
leaves the previous checkpoint of that name intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from dvla_bus.errors import ConfigError
from dvla_nodes.policy.flat import FlatLayout

FORMAT = "dvla-checkpoint/1"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    flat: np.ndarray  # the parameters, layout order
    layout: FlatLayout
    meta: dict[str, Any]  # version, step, config, metrics, policy, ...
    optimizer: dict[str, np.ndarray]  # flat moment buffers ("exp_avg", "exp_avg_sq"), may be empty


def _write_temp(path: Path, write: Any) -> str:
    """A complete, fsynced temporary file beside ``path`` (removed if writing fails)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    """Write ``<name>.safetensors`` then ``<name>.json`` atomically; returns the JSON path."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = flat.detach().cpu().numpy() if isinstance(flat, torch.Tensor) else flat
    tensors = {"flat": np.ascontiguousarray(weights[: layout.total])}
    for k, v in (optimizer or {}).items():
        tensors[f"optim.{k}"] = np.ascontiguousarray(v)
    st_path = directory / f"{name}.safetensors"
    json_path = directory / f"{name}.json"
    st_tmp = _write_temp(st_path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    json_tmp = ""
    try:
        doc = {
            "format": FORMAT,
            "weights": st_path.name,
            "sha256": _sha256(Path(st_tmp)),
            "layout": layout.to_json(),
            **meta,
        }

        def write_json(tmp: str) -> None:
            Path(tmp).write_text(json.dumps(doc, indent=1, sort_keys=True))

        json_tmp = _write_temp(json_path, write_json)
        # Both files are complete on disk before either replaces the old pair, so a kill can
        # tear the pair only between these two renames (it used to be able to between the
        # tensors' rename and the JSON's checksum, write and fsync). Not atomic as a pair yet.
        os.replace(st_tmp, st_path)
        os.replace(json_tmp, json_path)
    except BaseException:
        for tmp in (st_tmp, json_tmp):
            if tmp:
                Path(tmp).unlink(missing_ok=True)
        raise
    return json_path


def load_checkpoint(json_path: Path) -> Checkpoint:
    """Read a checkpoint by its JSON file; checks format, checksum and layout size."""
    try:
        doc = json.loads(Path(json_path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{json_path}: cannot read checkpoint metadata: {exc}") from exc
    if doc.get("format") != FORMAT:
        raise ConfigError(f"{json_path}: format {doc.get('format')!r}, expected {FORMAT!r}")
    st_path = Path(json_path).parent / str(doc["weights"])
    if _sha256(st_path) != doc["sha256"]:
        raise ConfigError(f"{st_path}: checksum does not match {json_path}; file is corrupt")
    tensors = load_file(str(st_path))
    layout = FlatLayout.from_json(doc["layout"])
    flat = tensors["flat"]
    if flat.shape != (layout.total,):
        raise ConfigError(f"{st_path}: flat weights {flat.shape}, manifest says {layout.total}")
    optim = {k.removeprefix("optim."): v for k, v in tensors.items() if k.startswith("optim.")}
    meta = {k: v for k, v in doc.items() if k not in ("format", "weights", "sha256", "layout")}
    return Checkpoint(flat=flat, layout=layout, meta=meta, optimizer=optim)
