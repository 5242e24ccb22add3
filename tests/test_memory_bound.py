"""Memory bound, short: a real training job whose learner is slowed to 20 % of its speed
(SIGSTOP/SIGCONT duty cycle). The samplers keep producing, so flow control must hold: their
sends wait for credit instead of queueing, no more than the credit window is ever in flight,
the learner holds at most window x samplers messages, and no node's RSS grows more than 10 %
over its level after warm-up. (The 5-minute version is ``dvla bench memory``.)"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psutil

from dvla_tools.bench._job import FAST_TRAINING, TrainingJob, hub_observer, write_training_topology
from dvla_tools.bench.memory import counters, growth, learner_pid, rss_by_process, slowed_learner

SAMPLERS = 2
WINDOW = 4  # the learner's inbox credit per sampler (LearnerNode.open_inbox)
WARM_VERSIONS = 30


async def _measure(job: TrainingJob) -> dict[str, Any]:
    async with hub_observer(job.endpoint) as hub:

        def warm(st: Any) -> bool:
            rows = [m for m in st.members if m.state != "dead"]
            # Warm: the learner's RSS climbs over its first ~20 updates (optimiser state,
            # allocator pools) before it levels off; the bound is about what comes after.
            return any(
                m.role == "learner" and m.weight_version >= WARM_VERSIONS for m in rows
            ) and (
                sum(1 for m in rows if m.role == "sampler" and m.weight_version >= 1) == SAMPLERS
            )

        await hub.wait(warm, 90.0, "training to warm up")
        pids = {n: p.pid for n, p in job.nodes().items()}
        before = counters(await hub.status(timeout=2.0))
        settle: list[dict[str, Any]] = []
        measured: list[dict[str, Any]] = []
        flow: list[dict[str, dict[str, int]]] = []
        saw_stopped = False
        async with slowed_learner(job, stop_s=1.5, run_s=0.4):
            end_settle = time.monotonic() + 5.0
            end = end_settle + 10.0
            while time.monotonic() < end:
                status = await hub.status(timeout=1.0)
                flow.append(counters(status))
                sample = {"rss": rss_by_process(job)}
                (settle if time.monotonic() < end_settle else measured).append(sample)
                pid = learner_pid(job)
                if pid is not None and psutil.Process(pid).status() == psutil.STATUS_STOPPED:
                    saw_stopped = True
                await asyncio.sleep(0.5)
        after = counters(await hub.status(timeout=2.0))
        return {
            "pids": pids,
            "pids_after": {n: p.pid for n, p in job.nodes().items()},
            "before": before,
            "after": after,
            "flow": flow,
            "rss": growth(settle, measured),
            "saw_stopped": saw_stopped,
        }


def test_slow_learner_keeps_every_node_within_its_memory_bound(short_tmp: Path) -> None:
    topology = write_training_topology(
        short_tmp,
        samplers=SAMPLERS,
        learner={**FAST_TRAINING, "minutes": 5.0},
        heartbeat_timeout_s=5.0,
    )
    with TrainingJob(short_tmp, topology, grace=3.0) as job:
        got = asyncio.run(_measure(job))
        job.stop()
    assert got["saw_stopped"], "the duty cycle never stopped the learner"
    assert got["pids_after"] == got["pids"], "a node was restarted while the learner was slow"

    samplers = [f"sampler.h.{i}" for i in range(SAMPLERS)]
    for snapshot in got["flow"]:
        for node in samplers:
            if node in snapshot:
                assert snapshot[node].get("tx.in_flight", 0) <= WINDOW, snapshot[node]
                assert snapshot[node].get("tx.queued", 0) == 0, snapshot[node]
        # held: delivered and not yet released (the queue not yet taken included)
        assert snapshot.get("learner.h.0", {}).get("rx.held", 0) <= WINDOW * SAMPLERS
    # Backpressure engaged: the samplers waited for credit while the learner was stopped.
    waits = sum(
        got["after"][n].get("tx.credit_waits", 0) - got["before"][n].get("tx.credit_waits", 0)
        for n in samplers
    )
    assert waits > 0
    for node in samplers:
        assert not any(".dropped." in k for k in got["after"][node]), got["after"][node]

    rss = {name: r for name, r in got["rss"].items() if name != "supervisor"}
    assert {"coordinator.h.0", "learner.h.0", *samplers} <= set(rss)
    over = {name: r for name, r in rss.items() if not r["within_target"]}
    assert not over, f"RSS grew more than 10 %: {over}"
    assert job.shm_segments() == []
    assert job.orphans() == []
