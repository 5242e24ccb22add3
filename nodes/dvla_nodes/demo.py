"""The demo job's data roles (the main job until the training pipeline replaces it).

``consumer`` binds a data inbox and advertises it in its Join; ``producer`` finds consumers in
the control bus's membership table, connects an outbox to each and sends observation-like
messages (a ``uint8`` image and a ``float32`` proprioception vector) at ``rate_hz``. On one host
the arrays travel through the producer's shared-memory slab pool (the inbox gets zero-copy
views); across hosts as ZeroMQ frames. Credits bound what is in flight; with
``policy = "drop_oldest"`` a producer facing a slow consumer drops its oldest unsent message
and counts it. Weight versions announced on the control bus are adopted by both and stamped
into the data, so the consumer can count messages produced under an older version."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from dvla_bus import wire
from dvla_bus.node import Node
from dvla_bus.sockets import open_context
from dvla_bus.transport import Inbox, Outbox, open_outbox

__all__ = ["Consumer", "Producer"]

TOPIC = "obs"


class Producer(Node):
    role = "producer"
    description = "sends observation-like arrays to the consumers (demo)"

    outbox: Outbox
    version = -1

    async def setup(self) -> None:
        cfg = self.config
        side = int(cfg.settings.get("image_px", 64))
        ctx = await self.resources.enter_async_context(
            open_context(credentials=cfg.data_credentials)
        )
        policy = str(cfg.settings.get("policy", "drop_oldest"))
        self.outbox = await self.resources.enter_async_context(
            open_outbox(
                ctx,
                name=cfg.node_id,
                host=cfg.host,
                run=cfg.run_id,
                slab_size=side * side * 3 + 4096 + 64,
                slabs=int(cfg.settings.get("slabs", 32)),
                policy="block" if policy == "block" else "drop_oldest",
                queue=int(cfg.settings.get("queue", 8)),
                credentials=cfg.data_credentials,
            )
        )
        self.meters.append(self.outbox.counters)

    def on_members(self, members: tuple[wire.MemberInfo, ...]) -> None:
        for m in members:
            endpoint = m.endpoints.get("data")
            if m.role != "consumer" or not endpoint:
                continue
            if m.state == "dead":
                asyncio.get_running_loop().create_task(self.outbox.disconnect(endpoint))
            else:
                asyncio.get_running_loop().create_task(self.outbox.connect(endpoint))

    def on_version(self, announce: wire.VersionAnnounce) -> None:
        self.version = announce.version
        self.set_weight_version(announce.version)

    async def run(self) -> None:
        settings = self.config.settings
        rate = float(settings.get("rate_hz", 100.0))
        side = int(settings.get("image_px", 64))
        rng = np.random.default_rng(self.config.index)
        period = 1.0 / rate
        next_t = time.monotonic()
        step = 0
        while True:
            await self.wait_unpaused()
            image = rng.integers(0, 255, size=(side, side, 3), dtype=np.uint8)
            proprio = np.full(8, step, dtype=np.float32)
            if self.outbox.statistics().peers:
                with self.lanes.busy("produce"):
                    await self.outbox.send(
                        {"step": step, "version": self.version},
                        {"image": image, "proprio": proprio},
                        topic=TOPIC,
                    )
                step += 1
            stats = self.outbox.statistics()
            self.counters.update(
                sent=stats.sent,
                sent_shm=stats.sent_shm,
                dropped=sum(stats.dropped.values()),
                in_flight=stats.in_flight,
            )
            next_t += period
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))


class Consumer(Node):
    role = "consumer"
    description = "receives and checks the producers' arrays (demo)"

    inbox: Inbox
    version = -1

    async def setup(self) -> None:
        self.inbox = await self.open_inbox(window=int(self.config.settings.get("window", 8)))

    def on_version(self, announce: wire.VersionAnnounce) -> None:
        self.version = announce.version
        self.set_weight_version(announce.version)

    async def run(self) -> None:
        # Fault injection for hang-detection tests and drills: after this many messages the
        # consumer blocks its event loop inside the "consume" lane (0: never).
        stall_after = int(self.config.settings.get("stall_after_messages", 0))
        last_step: dict[str, int] = {}
        received = gaps = stale = bad = 0
        window_start = time.monotonic()
        window_msgs = window_bytes = 0
        latency = 0.0
        while True:
            got = await self.inbox.recv()
            with self.lanes.busy("consume"), got:
                sender = got.msg.sender
                step = int(got.meta.get("step", -1))
                prev = last_step.get(sender)
                if prev is not None and step > prev + 1:
                    gaps += step - prev - 1
                last_step[sender] = step
                if int(got.meta.get("version", -1)) < self.version:
                    stale += 1
                proprio = got.arrays.get("proprio")
                if proprio is None or float(proprio[0]) != step or not got.intact():
                    bad += 1
                received += 1
                if stall_after and received == stall_after:
                    self.log.warning("stall_after_messages=%d reached: blocking", stall_after)
                    time.sleep(3600)  # noqa: ASYNC251 - deliberately blocks: the watchdog must act
                window_msgs += 1
                window_bytes += got.nbytes
                latency = 0.9 * latency + 0.1 * (time.time() - got.msg.ts)
            now = time.monotonic()
            if now - window_start >= 1.0:
                span = now - window_start
                self.gauges["msgs_per_s"] = window_msgs / span
                self.gauges["mb_per_s"] = window_bytes / span / 1e6
                window_start, window_msgs, window_bytes = now, 0, 0
            self.gauges["latency_ms"] = latency * 1e3
            stats = self.inbox.statistics()
            self.counters.update(
                received=received,
                via_shm=stats.received_shm,
                gaps=gaps,
                stale=stale,
                bad=bad,
                producers=stats.peers,
            )
