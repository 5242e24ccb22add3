"""Flat parameter layout: every parameter of a module is a view into one contiguous buffer.

The manifest (name, dtype, shape, offset in elements) is what the weight pool and replication
need: weights can be written into / read out of one buffer (e.g. a shared-memory slot viewed as a
torch tensor) with a single copy, or a module can be *bound* to an external buffer so its
parameters read it in place, without per-parameter allocation. Offsets are aligned to 16
elements (64 bytes for float32) so each parameter starts on a cache line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dvla_bus.errors import ConfigError

ALIGN = 16


@dataclass(frozen=True, slots=True)
class ParamEntry:
    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    offset: int  # elements from the start of the buffer
    numel: int


@dataclass(frozen=True, slots=True)
class FlatLayout:
    """The manifest of a flat parameter buffer. ``total`` is its length in elements."""

    entries: tuple[ParamEntry, ...]
    total: int
    dtype: str = "float32"

    @property
    def nbytes(self) -> int:
        return self.total * torch.empty((), dtype=_dtype(self.dtype)).element_size()

    @property
    def num_params(self) -> int:
        return sum(e.numel for e in self.entries)

    @staticmethod
    def of(module: nn.Module, align: int = ALIGN) -> FlatLayout:
        entries = []
        offset = 0
        dtypes = set()
        for name, p in module.named_parameters():
            dtypes.add(p.dtype)
            entries.append(
                ParamEntry(
                    name, str(p.dtype).removeprefix("torch."), tuple(p.shape), offset, p.numel()
                )
            )
            offset += -(-p.numel() // align) * align
        if len(dtypes) > 1:
            raise ConfigError(
                f"flat layout needs one parameter dtype, module has {sorted(map(str, dtypes))}"
            )
        dtype = str(dtypes.pop()).removeprefix("torch.") if dtypes else "float32"
        return FlatLayout(tuple(entries), offset, dtype)

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "total": self.total,
            "entries": [
                {"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "offset": e.offset}
                for e in self.entries
            ],
        }

    @staticmethod
    def from_json(obj: dict[str, Any]) -> FlatLayout:
        entries = tuple(
            ParamEntry(
                str(e["name"]),
                str(e["dtype"]),
                tuple(int(s) for s in e["shape"]),
                int(e["offset"]),
                int(np.prod(e["shape"], dtype=np.int64)),
            )
            for e in obj["entries"]
        )
        return FlatLayout(entries, int(obj["total"]), str(obj["dtype"]))

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ConfigError(f"unknown dtype {name!r} in a flat layout")
    return dt


def bind(module: nn.Module, layout: FlatLayout, buffer: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Make every parameter of ``module`` a view into ``buffer`` (no copy of ``buffer``; the
    parameters' old storage is dropped). ``buffer`` is 1-D with at least ``layout.total``
    elements of the layout's dtype; a numpy array is shared, not copied. Returns the tensor view.
    The module's current values are NOT copied in: use :func:`flatten` for that."""
    flat = torch.from_numpy(buffer) if isinstance(buffer, np.ndarray) else buffer
    if flat.dim() != 1 or flat.numel() < layout.total or flat.dtype != _dtype(layout.dtype):
        raise ConfigError(
            f"buffer {tuple(flat.shape)} {flat.dtype} cannot hold a layout of "
            f"{layout.total} {layout.dtype}"
        )
    params = dict(module.named_parameters())
    if set(params) != {e.name for e in layout.entries}:
        raise ConfigError("module parameters do not match the flat layout's manifest")
    for e in layout.entries:
        p = params[e.name]
        if tuple(p.shape) != e.shape:
            raise ConfigError(f"parameter {e.name}: shape {tuple(p.shape)} != manifest {e.shape}")
        p.data = flat[e.offset : e.offset + e.numel].view(e.shape)
    return flat


def flatten(module: nn.Module, align: int = ALIGN) -> tuple[FlatLayout, torch.Tensor]:
    """Move ``module``'s parameters into one new contiguous buffer (values kept) and bind them to
    it. Returns the layout and the buffer; ``buffer.numpy()`` is a zero-copy view on CPU."""
    layout = FlatLayout.of(module, align)
    params = dict(module.named_parameters())
    device = next(iter(params.values())).device if params else torch.device("cpu")
    flat = torch.zeros(layout.total, dtype=_dtype(layout.dtype), device=device)
    for e in layout.entries:
        flat[e.offset : e.offset + e.numel].copy_(params[e.name].detach().reshape(-1))
    bind(module, layout, flat)
    return layout, flat


def flat_grads(module: nn.Module, layout: FlatLayout, buffer: torch.Tensor) -> torch.Tensor:
    """Preallocate every parameter's ``.grad`` as a view into ``buffer`` (same layout), so
    gradients accumulate in one contiguous buffer (one all-reduce, one copy)."""
    params = dict(module.named_parameters())
    for e in layout.entries:
        params[e.name].grad = buffer[e.offset : e.offset + e.numel].view(e.shape)
    return buffer
