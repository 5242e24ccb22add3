"""The demo job's data roles (the main job until the training pipeline replaces it).

``producer`` publishes observation-like messages (a ``uint8`` image and a ``float32``
proprioception vector) on the data bus at ``rate_hz``; ``consumer`` discovers producers through
the control bus's membership table, connects to their data endpoints, checks every message and
reports rates, bandwidth, latency and sequence gaps in its heartbeats. Weight versions announced
on the control bus are adopted by both and stamped into the data, so the consumer can count
messages produced under a version older than the one it holds."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from dvla_bus import wire
from dvla_bus.data import Publisher, Subscriber, open_data_bus
from dvla_bus.node import Node

__all__ = ["Consumer", "Producer"]

TOPIC = "obs"


class Producer(Node):
    role = "producer"
    description = "publishes observation-like arrays on the data bus (demo)"

    publisher: Publisher
    version = -1

    async def setup(self) -> None:
        cfg = self.config
        bus = await self.resources.enter_async_context(open_data_bus(cfg.node_id))
        if cfg.control_endpoint.startswith("ipc://"):
            bind = f"ipc://{cfg.run_dir}/data-{cfg.node_id}.sock"
        else:
            bind = f"tcp://{cfg.address}:0"
        self.publisher = await bus.publisher(bind, hwm=int(cfg.settings.get("hwm", 16)))
        self.endpoints["data"] = self.publisher.endpoint

    def on_version(self, announce: wire.VersionAnnounce) -> None:
        self.version = announce.version
        self.set_weight_version(announce.version)

    async def run(self) -> None:
        settings = self.config.settings
        rate = float(settings.get("rate_hz", 100.0))
        side = int(settings.get("image_px", 64))
        rng = np.random.default_rng(self.config.index)
        image = rng.integers(0, 255, size=(side, side, 3), dtype=np.uint8)
        proprio = np.zeros(8, dtype=np.float32)
        period = 1.0 / rate
        next_t = time.monotonic()
        sent = dropped = 0
        while True:
            await self.wait_unpaused()
            if not any(m.role == "consumer" and m.state != "dead" for m in self.members):
                # Nobody to send to yet: wait for the membership table rather than drop.
                await asyncio.sleep(period)
                next_t = time.monotonic()
                continue
            proprio[0] = sent
            ok = await self.publisher.send(
                wire.Data(meta={"step": sent, "version": self.version}),
                TOPIC,
                [image, proprio],
            )
            sent += ok
            dropped += not ok
            self.counters["sent"] = sent
            self.counters["dropped"] = dropped
            next_t += period
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))


class Consumer(Node):
    role = "consumer"
    description = "receives and checks the producers' arrays (demo)"

    subscriber: Subscriber
    version = -1

    async def setup(self) -> None:
        bus = await self.resources.enter_async_context(open_data_bus(self.config.node_id))
        self.subscriber = await bus.subscriber(hwm=int(self.config.settings.get("hwm", 16)))

    def on_members(self, members: tuple[wire.MemberInfo, ...]) -> None:
        for m in members:
            endpoint = m.endpoints.get("data")
            if m.role == "producer" and endpoint:
                if m.state == "dead":
                    self.subscriber.disconnect(endpoint)
                else:
                    self.subscriber.connect(endpoint)

    def on_version(self, announce: wire.VersionAnnounce) -> None:
        self.version = announce.version
        self.set_weight_version(announce.version)

    async def run(self) -> None:
        last_step: dict[str, int] = {}
        received = nbytes = gaps = stale = bad = 0
        window_start = time.monotonic()
        window_msgs = window_bytes = 0
        latency = 0.0
        while True:
            got = await self.subscriber.recv()
            msg = got.msg
            if not isinstance(msg, wire.Data) or len(got.arrays) != 2:
                bad += 1
                continue
            step = int(msg.meta.get("step", -1))
            prev = last_step.get(msg.sender)
            if prev is not None and step > prev + 1:
                gaps += step - prev - 1
            last_step[msg.sender] = step
            if int(msg.meta.get("version", -1)) < self.version:
                stale += 1
            if float(got.arrays[1][0]) != step:
                bad += 1
            received += 1
            nbytes += got.nbytes
            window_msgs += 1
            window_bytes += got.nbytes
            latency = 0.9 * latency + 0.1 * (time.time() - msg.ts)
            now = time.monotonic()
            if now - window_start >= 1.0:
                span = now - window_start
                self.gauges["msgs_per_s"] = window_msgs / span
                self.gauges["mb_per_s"] = window_bytes / span / 1e6
                window_start, window_msgs, window_bytes = now, 0, 0
            self.gauges["latency_ms"] = latency * 1e3
            self.counters.update(
                received=received,
                bytes=nbytes,
                gaps=gaps,
                stale=stale,
                bad=bad,
                producers=len(self.subscriber.connected),
            )
