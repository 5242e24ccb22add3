"""``coordinator``: hosts the control hub (membership, heartbeats, versions, commands).

In the demo job it also plays the weight publisher's part on the control bus: every
``announce_every_s`` seconds it announces a new weight version, which the other nodes adopt and
report back in their heartbeats — so the version table moves while the demo runs."""

from __future__ import annotations

import asyncio
import time

from dvla_bus import wire
from dvla_bus.control import DEFAULT_MAX_NODES, ControlHub, HubConfig, open_control_hub
from dvla_bus.node import Node
from dvla_bus.topology import load_topology

__all__ = ["Coordinator"]


class Coordinator(Node):
    role = "coordinator"
    description = "hosts the control hub"

    hub: ControlHub

    async def setup(self) -> None:
        cfg = self.config
        # [control] max_nodes: always set in a loaded topology (a default when the file omits it).
        topology = load_topology(cfg.topology_file) if cfg.topology_file else None
        max_nodes = (topology.control.max_nodes if topology else None) or DEFAULT_MAX_NODES
        self.hub = await self.resources.enter_async_context(
            open_control_hub(
                HubConfig(
                    endpoint=cfg.control_endpoint,
                    heartbeat_interval=cfg.heartbeat_interval,
                    heartbeat_timeout=cfg.heartbeat_timeout,
                    credentials=cfg.control_credentials,
                    max_nodes=max_nodes,
                ),
                name=f"hub@{cfg.node_id}",
            )
        )
        self.endpoints["control"] = self.hub.endpoint
        self.log.info("control hub listening on %s", self.hub.endpoint)

    async def run(self) -> None:
        every = float(self.config.settings.get("announce_every_s", 0))
        version = 0
        while True:
            if every > 0:
                await asyncio.sleep(every)
                await self.wait_unpaused()
                version += 1
                await self.control.send(wire.VersionAnnounce(version=version))
                self.set_weight_version(version)
            else:
                await asyncio.sleep(3600)

    async def teardown(self) -> None:
        """Keep the hub up until the other members have left (or died), at most ``grace`` less
        a second: a ``stop`` for everyone reaches this node too, and a hub that closed at once
        (linger 0) could drop the copies still queued for the others, which would then run on
        without a hub and hold the job open. Leaves also reach the log this way."""
        hub = getattr(self, "hub", None)
        if hub is None:  # setup failed before the hub was open
            return
        deadline = time.monotonic() + max(0.0, self.config.grace - 1.0)
        others: list[str] = []
        while time.monotonic() < deadline:
            others = [
                m.node for m in hub.members() if m.state != "dead" and m.node != self.config.node_id
            ]
            if not others:
                return
            await asyncio.sleep(0.05)
        if others:
            self.log.warning("closing the hub while %s still hold(s) it", ", ".join(others))

    def statistics(self) -> tuple[dict[str, int], dict[str, float]]:
        counters, gauges = super().statistics()
        counters.update({f"hub.{k}": v for k, v in self.hub.statistics().items()})
        return counters, gauges
