"""``publisher``: a learner-like source of weight versions, for the demo, the tests and
``dvla bench replicate``.

It runs on the replication tree's root (``[replication] source = "publisher"``) and publishes a
synthetic model (``params`` parameters of ``dtype`` in ``tensors`` tensors; deterministic bytes
from ``seed`` and the version) through :meth:`dvla_bus.replication.Replicator.publish` — the same
call a learner makes with its real tensors. With ``wait_hosts`` it first waits until every host
of the tree has a replicator on the control bus, then after each version until every host
reports it active, and appends one JSON line per version to ``report`` (if set): the version,
its content digest, bytes, the publish wall-clock time and each host's commit time.

Settings (``[roles.publisher]``): ``params`` (default 1048576), ``dtype`` (``fp32``, ``bf16``,
``fp16``), ``tensors`` (4), ``seed`` (0), ``versions`` (0 = forever), ``every_s`` (1.0),
``wait_hosts`` (true), ``timeout_s`` (60), ``report`` (path, default none), ``window`` (4)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dvla_bus import wire
from dvla_bus.errors import DeadlineExceeded
from dvla_bus.node import Node
from dvla_bus.replication import Replicator, open_replicator
from dvla_bus.sockets import open_context
from dvla_bus.topology import load_topology
from dvla_bus.weights import Manifest

__all__ = ["Publisher", "SyntheticModel"]

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class SyntheticModel:
    """``params`` parameters in ``tensors`` tensors; version ``v``'s bytes are a seeded random
    base XOR ``v`` (deterministic, distinct per version, made in a preallocated buffer)."""

    def __init__(self, params: int, dtype: str = "fp32", tensors: int = 4, seed: int = 0) -> None:
        np_dtype = _DTYPES.get(dtype, dtype)
        sizes = [params // tensors + (1 if i < params % tensors else 0) for i in range(tensors)]
        self.manifest = Manifest.from_specs(
            (f"layer{i}.weight", np_dtype, (n,)) for i, n in enumerate(sizes) if n
        )
        rng = np.random.default_rng(seed)
        self._base = rng.integers(0, 256, self.manifest.nbytes, dtype=np.uint8)
        self._buf = np.empty_like(self._base)

    def arrays(self, version: int) -> Mapping[str, np.ndarray[Any, Any]]:
        np.bitwise_xor(self._base, np.uint8(version & 0xFF), out=self._buf)
        out = {}
        for t in self.manifest.tensors:
            raw = self._buf[t.offset : t.offset + t.nbytes]
            out[t.name] = raw.view("<u2" if t.dtype == "bfloat16" else t.dtype).reshape(t.shape)
        return out


class Publisher(Node):
    role = "publisher"
    description = "publishes synthetic weight versions down the replication tree (demo, bench)"

    rep: Replicator

    async def setup(self) -> None:
        cfg = self.config
        self.topology = load_topology(cfg.topology_file)
        ctx = await self.resources.enter_async_context(
            open_context(credentials=cfg.data_credentials)
        )
        self.rep = await self.resources.enter_async_context(
            open_replicator(
                ctx,
                self.topology,
                host=cfg.host,
                node_id=cfg.node_id,
                run_id=cfg.run_id,
                window=int(cfg.settings.get("window", 4)),
                credentials=cfg.data_credentials,
            )
        )
        self.endpoints["weights"] = self.rep.inbox.endpoint

    def on_members(self, members: tuple[wire.MemberInfo, ...]) -> None:
        if self.rep.control is None and self._control is not None:
            self.rep.control = self._control
        self.rep.on_members(members)

    def _hosts(self) -> list[str]:
        return [h for h in self.rep.tree.nodes if h != self.config.host]

    async def _status(self) -> dict[str, wire.MemberInfo]:
        status = await self.control.query(timeout=5.0)
        out: dict[str, wire.MemberInfo] = {}
        for m in status.members:
            if m.state != "dead" and "weights" in m.endpoints:
                out[m.host] = m
        return out

    async def _wait(self, what: str, done: Any, timeout: float) -> dict[str, wire.MemberInfo]:
        deadline = time.monotonic() + timeout
        while True:
            members = await self._status()
            if done(members):
                return members
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"{self.config.node_id}: {what} within {timeout:.0f}s")
            await asyncio.sleep(0.01)

    async def run(self) -> None:
        self.rep.control = self.control
        s = self.config.settings
        model = SyntheticModel(
            int(s.get("params", 1 << 20)),
            str(s.get("dtype", "fp32")),
            int(s.get("tensors", 4)),
            int(s.get("seed", 0)),
        )
        versions = int(s.get("versions", 0))
        every = float(s.get("every_s", 1.0))
        wait = bool(s.get("wait_hosts", True))
        timeout = float(s.get("timeout_s", 60.0))
        report = Path(str(s["report"])) if s.get("report") else None
        hosts = self._hosts()
        if wait:
            await self._wait(
                "not every host's replicator joined",
                lambda m: all(h in m for h in hosts),
                timeout,
            )
        published = 0
        while versions == 0 or published < versions:
            v = max(self.rep.active_version + 1, 1)
            arrays = model.arrays(v)
            start = time.time()
            await self.rep.publish(arrays, v, model.manifest)
            published += 1
            self.counters["versions_published"] = published
            line: dict[str, Any] = {"version": v, "start": start, "nbytes": model.manifest.nbytes}
            if wait:
                # Every live host (a dead relay's subtree catches up through another parent).
                members = await self._wait(
                    f"version {v} not active on every live host",
                    lambda m, v=v: all(m[h].weight_version >= v for h in hosts if h in m),
                    timeout,
                )
                line["commits"] = {
                    h: members[h].gauges.get("weights.commit_time", 0.0)
                    for h in hosts
                    if h in members
                }
                line["end"] = time.time()
            assert self.rep.pool is not None
            line["digest"] = self.rep.pool.content_digest(self.rep.pool.active_slot)
            if report is not None:
                with report.open("a") as f:
                    f.write(json.dumps(line) + "\n")
            self.log.info("version %d published: %s", v, line)
            await asyncio.sleep(every)
        await asyncio.Event().wait()

    def statistics(self) -> tuple[dict[str, int], dict[str, float]]:
        counters, gauges = super().statistics()
        counters.update(self.rep.counters())
        return counters, gauges
