"""``relay``: one host's weight replication duty (DESIGN.md, *topology-aware replication*).

Owns the host's weight pool, receives each new version from its parent in the replication tree
chunk by chunk, verifies every chunk, forwards it to its children while receiving the next, and
flips the version active at the fence (:mod:`dvla_bus.replication`). Local readers attach the
pool with :func:`dvla_bus.weights.attach_weights` (:func:`dvla_bus.weights.find_weights` finds
it by run). Settings (``[roles.relay]``): ``window`` (chunks in flight per child, default 4),
``stall_s`` (seconds without progress before pulling from an ancestor, default 1.0)."""

from __future__ import annotations

import asyncio

from dvla_bus import wire
from dvla_bus.node import Node
from dvla_bus.replication import Replicator, open_replicator
from dvla_bus.sockets import open_context
from dvla_bus.topology import load_topology

__all__ = ["Relay"]


class Relay(Node):
    role = "relay"
    description = "receives weight versions down the replication tree and forwards them"

    rep: Replicator

    async def setup(self) -> None:
        cfg = self.config
        topology = load_topology(cfg.topology_file)
        ctx = await self.resources.enter_async_context(
            open_context(credentials=cfg.data_credentials)
        )
        self.rep = await self.resources.enter_async_context(
            open_replicator(
                ctx,
                topology,
                host=cfg.host,
                node_id=cfg.node_id,
                run_id=cfg.run_id,
                window=int(cfg.settings.get("window", 4)),
                credentials=cfg.data_credentials,
                stall_s=float(cfg.settings.get("stall_s", 1.0)),
            )
        )
        self.endpoints["weights"] = self.rep.inbox.endpoint

    def _attach(self) -> None:
        if self.rep.control is None and self._control is not None:
            self.rep.control = self._control

    def on_members(self, members: tuple[wire.MemberInfo, ...]) -> None:
        self._attach()
        self.rep.on_members(members)

    def on_version(self, announce: wire.VersionAnnounce) -> None:
        self._attach()
        self.rep.on_version(announce)

    async def run(self) -> None:
        self._attach()
        await asyncio.Event().wait()  # the replicator's tasks do the work

    def statistics(self) -> tuple[dict[str, int], dict[str, float]]:
        counters, gauges = super().statistics()
        counters.update(self.rep.counters())
        gauges["weights.commit_time"] = self.rep.commit_time
        gauges["weights.commit_version"] = float(self.rep.commit_version)
        return counters, gauges
