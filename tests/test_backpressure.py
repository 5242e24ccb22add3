"""A stalled consumer: producer and consumer memory stay flat, and what the producer could not
send is dropped and counted (drop-oldest) or waited for with a deadline (block)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from dvla_bus.sockets import open_context
from dvla_bus.transport import open_inbox
from tests.helpers import REPO

PRODUCER = """
import asyncio, json, sys, time
import numpy as np
from dvla_bus.sockets import open_context
from dvla_bus.transport import open_outbox

async def main(endpoint, seconds, policy):
    async with open_context() as ctx, open_outbox(
        ctx, name="p", host=sys.argv[4], run="bp", slab_size=1 << 20, slabs=8,
        policy=policy, queue=8,
    ) as out:
        await out.connect(endpoint)
        await out.wait_ready()
        print("ready", flush=True)
        end = time.monotonic() + seconds
        waits = 0
        while time.monotonic() < end:
            try:
                await out.send({}, {"x": np.ones(1 << 19, np.uint8)}, timeout=0.05)
            except Exception:
                waits += 1
            await asyncio.sleep(0.001)
        s = out.statistics()
        print(json.dumps({"sent": s.sent, "dropped": s.dropped, "waits": waits}), flush=True)

asyncio.run(main(sys.argv[1], float(sys.argv[2]), sys.argv[3]))
"""


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("policy", "host"), [("drop_oldest", "h"), ("block", "h"), ("drop_oldest", "other")]
)
async def test_stalled_consumer_keeps_memory_flat(short_tmp: Path, policy: str, host: str) -> None:
    me = psutil.Process()
    async with (
        open_context() as ctx,
        open_inbox(ctx, name="c", host="h", bind=[f"ipc://{short_tmp}/in"], window=4) as inbox,
    ):
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before any awaiting
            [sys.executable, "-c", PRODUCER, inbox.endpoint, "3.0", policy, host],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        try:
            assert proc.stdout is not None
            loop = asyncio.get_running_loop()
            line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 30)
            assert line.strip() == "ready"
            # The consumer takes its window's worth and then stalls, holding everything.
            held = [await inbox.recv(timeout=10) for _ in range(4)]
            producer = psutil.Process(proc.pid)
            # Memory is sampled over wall time: these sleeps are the sampling period, not a
            # wait for a condition.
            await asyncio.sleep(0.5)
            rss0, mine0 = producer.memory_info().rss, me.memory_info().rss
            samples = []
            while proc.poll() is None:
                samples.append(producer.memory_info().rss)
                await asyncio.sleep(0.2)
            out = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.read), 30)
            stats = json.loads(out.strip().splitlines()[-1])
            growth = max([rss0, *samples[:-1]]) - rss0 if samples else 0
            assert growth < 8 << 20, f"producer RSS grew {growth / 2**20:.1f} MiB"
            assert me.memory_info().rss - mine0 < 8 << 20
            assert inbox.pending() == 0  # nothing beyond the window ever arrived
            assert stats["sent"] == 4
            if policy == "drop_oldest":
                assert stats["dropped"]["drop_oldest"] > 10
            else:
                assert stats["waits"] > 10
            for d in held:
                d.release()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
