"""The ``inference`` role against a real weight pool, over the real data bus: replies carry the
version whose weights produced them (checked by recomputing every log-probability), a version
published mid-stream is picked up between batches and never inside one, concurrent requesters
are batched together, and a request to a dead inference node ends at its deadline."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dvla_bus.errors import DeadlineExceeded, DvlaError
from dvla_bus.node import NodeConfig
from dvla_bus.sockets import open_context
from dvla_bus.weights import Manifest, create_weight_pool
from dvla_nodes.inference import (
    ActRequest,
    InferenceError,
    RemoteAct,
    RemotePolicy,
    open_remote_policy,
)
from dvla_nodes.policy import build_policy, flatten
from dvla_nodes.policy.act import token_log_probs
from tests.helpers import members_by_node, spawn, stop, wait_status, write_topology

IMAGE = 32
VERSIONS = tuple(range(3, 20))  # published in turn; each reuses the slot of the one two before
INSTRUCTIONS = ("reach the red block", "push the blue block to the yellow square")


def _flat_version(base: torch.Tensor, version: int) -> np.ndarray:
    """Weights of ``version``: the initial ones plus noise large enough to change every output."""
    rng = np.random.default_rng(version)
    return (base.numpy() + rng.normal(0, 0.05, base.shape)).astype(np.float32)


class Reference:
    """The same policy in this process, to recompute what a version's weights give."""

    def __init__(self) -> None:
        self.model, self.tok = build_policy("tiny", IMAGE, 256, 0, stem="patch")
        self.layout, self.flat = flatten(self.model)

    @torch.inference_mode()
    def logp(self, weights: np.ndarray, images: np.ndarray, proprio: np.ndarray,
             instructions: list[str], tokens: np.ndarray) -> np.ndarray:  # fmt: skip
        self.flat.copy_(torch.from_numpy(weights))
        self.model.eval()
        logits = self.model(
            torch.from_numpy(images),
            torch.from_numpy(proprio),
            torch.from_numpy(self.tok.encode_batch(instructions)),
        )
        lp = token_log_probs(logits, 1.0)
        return lp.gather(-1, torch.from_numpy(tokens)[..., None])[..., 0].numpy()


def _obs(seed: int, rows: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (rows, IMAGE, IMAGE, 3), dtype=np.uint8)
    proprio = rng.normal(size=(rows, 7)).astype(np.float32)
    return images, proprio, [INSTRUCTIONS[(seed + i) % 2] for i in range(rows)]


def test_request_and_reply_round_trip_and_validate() -> None:
    images, proprio, ins = _obs(0, 3)
    meta, arrays = ActRequest(7, images, proprio, tuple(ins)).encode()
    back = ActRequest.decode(meta, arrays, IMAGE, 7)
    assert back.req == 7
    assert back.instructions == tuple(ins)
    with pytest.raises(InferenceError, match="bad_request: images"):
        ActRequest.decode(meta, arrays, IMAGE * 2, 7)
    with pytest.raises(InferenceError, match="2 instructions for 3 images"):
        ActRequest.decode({**meta, "instructions": "a\x1fb"}, arrays, IMAGE, 7)
    with pytest.raises(InferenceError, match="proprio"):
        ActRequest.decode(meta, {**arrays, "proprio": proprio[:, :3]}, IMAGE, 7)


def test_remote_policy_without_a_live_node_hits_its_deadline(short_tmp: Path) -> None:
    """Nobody listens at the endpoint: the call must fail at the deadline, not hang; and a
    call on the loop's own thread is refused (it would deadlock)."""

    async def main() -> None:
        async with (
            open_context() as ctx,
            open_remote_policy(
                ctx,
                name="nobody",
                host="h",
                deadline_s=0.3,
                endpoints=[f"ipc://{short_tmp}/nobody.sock"],
            ) as policy,
        ):
            images, proprio, ins = _obs(0, 1)
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded, match=r"no answer within 0\.3s"):
                await asyncio.get_running_loop().run_in_executor(None, policy, images, proprio, ins)
            assert 0.25 <= time.monotonic() - t0 < 2.0
            with pytest.raises(DvlaError, match="own event loop"):
                policy(images, proprio, ins)
            assert policy.stats.deadlines == 1

    asyncio.run(main())


def _start(topo: Path, run_dir: Path, role: str) -> subprocess.Popen[bytes]:
    args = ["node", "start", "--role", role, "--topology", str(topo), "--host", "h"]
    args += ["--run-dir", str(run_dir), "--grace", "3"]
    return spawn(args, run_dir / f"{role}.log")


def test_inference_node_batches_and_serves_the_active_version(short_tmp: Path) -> None:
    topo = write_topology(
        short_tmp / "t.toml",
        "coordinator = 1, inference = 1, learner = 0",
        extra=(
            f'[roles.learner]\npolicy_size = "tiny"\nimage_size = {IMAGE}\nseed = 0\n'
            'policy_stem = "patch"\n'
            "[roles.inference]\nmax_batch = 12\ngather_ms = 20.0\n"
        ),
    )
    control = f"ipc://{short_tmp}/c.sock"
    ref = Reference()
    weights = {v: _flat_version(ref.flat, v) for v in VERSIONS}
    run_id = NodeConfig("x", "h", 0, short_tmp, control).run_id
    procs: list[subprocess.Popen[bytes]] = []
    with create_weight_pool(run_id, "test", Manifest.from_arrays({"flat": ref.flat})) as pool:
        try:
            procs.append(_start(topo, short_tmp, "coordinator"))
            inference = _start(topo, short_tmp, "inference")
            procs.append(inference)
            status = wait_status(
                control,
                lambda s: any(m.role == "inference" and m.state == "running" for m in s.members),
                timeout=40,
                what="the inference node joined",
            )
            endpoint = members_by_node(status)["inference.h.0"].endpoints["data"]
            replies, counters = asyncio.run(_drive(control, endpoint, pool, weights, inference))
        finally:
            for proc in procs:
                stop(proc)

    # Every reply's log-probabilities are what its version's weights give: no reply mixed
    # versions, and none came from weights being rewritten under it.
    by_version: dict[int, list[tuple[int, RemoteAct]]] = defaultdict(list)
    for who, act in replies:
        by_version[act.version].append((who, act))
    assert {VERSIONS[0], VERSIONS[-1]} <= set(by_version), sorted(by_version)
    for version, got in by_version.items():
        obs = [_obs(who, 2) for who, _ in got]
        expect = ref.logp(
            weights[version],
            np.concatenate([o[0] for o in obs]),
            np.concatenate([o[1] for o in obs]),
            [s for o in obs for s in o[2]],
            np.concatenate([a.tokens for _, a in got]),
        )
        np.testing.assert_allclose(np.concatenate([a.logp for _, a in got]), expect, atol=2e-4)
        other = ref.logp(weights[3 if version != 3 else 4], *obs[0][:3], got[0][1].tokens)
        assert not np.allclose(other, got[0][1].logp, atol=2e-4)  # the check discriminates
    # Versions change between batches only, and never go back.
    batch_version: dict[int, int] = {}
    for _, act in replies:
        assert batch_version.setdefault(act.batch, act.version) == act.version
    ordered = [batch_version[b] for b in sorted(batch_version)]
    assert ordered == sorted(ordered)
    assert ordered[0] == 3
    assert ordered[-1] == VERSIONS[-1]
    # Concurrent requesters share forward passes.
    sizes = [act.batch_size for _, act in replies]
    assert max(sizes) > 2, sizes
    assert len(batch_version) < len(replies)
    assert counters["requests"] >= len(replies)
    assert counters["bad_requests"] == 1


async def _drive(
    control: str,
    endpoint: str,
    pool: Any,
    weights: dict[int, np.ndarray],
    inference: subprocess.Popen[bytes],
) -> tuple[list[tuple[int, RemoteAct]], dict[str, int]]:
    loop = asyncio.get_running_loop()
    replies: list[tuple[int, RemoteAct]] = []
    async with contextlib.AsyncExitStack() as stack:
        ctx = await stack.enter_async_context(open_context())
        policies: list[RemotePolicy] = []
        for i in range(4):
            policies.append(
                await stack.enter_async_context(
                    open_remote_policy(
                        ctx,
                        name=f"req-{i}",
                        host="h",
                        run="inftest",
                        deadline_s=15.0,
                        slab_size=(1 << 16) if i % 2 == 0 else 0,  # shm and inline requests
                        endpoints=[endpoint],
                    )
                )
            )
        for p in policies:
            await p.wait_ready(15.0)
        first = policies[0]
        images, proprio, ins = _obs(0, 2)
        # Before any version is published: a clear error, not a hang.
        with pytest.raises(InferenceError, match="no_weights"):
            await first.act_async(images, proprio, ins)
        with pytest.raises(InferenceError, match="bad_request"):
            await first.act_async(images[:, :16], proprio, ins)
        await loop.run_in_executor(None, pool.publish, 3, {"flat": weights[3]})
        # From a thread, as a sampler's rollout calls it.
        act = await loop.run_in_executor(None, first, images, proprio, ins)
        assert isinstance(act, RemoteAct)
        assert act.version == 3
        assert act.actions.shape == (2, 4)
        replies.append((0, act))

        published = asyncio.Event()
        seen_new = [0] * len(policies)

        async def requester(i: int) -> None:
            im, pr, instr = _obs(i, 2)
            while seen_new[i] < 3:
                got = await policies[i].act_async(im, pr, instr)
                replies.append((i, got))
                if got.version == VERSIONS[-1]:
                    seen_new[i] += 1

        async def publisher() -> None:
            # Mid-stream, while every requester is waiting on the node: pairs of versions back
            # to back, so the second of each pair rewrites the slot a forward pass may still be
            # reading (the pin must hold the writer off until that pass ends).
            for k in range(1, len(VERSIONS), 2):
                while len(replies) < 5 * k:
                    await asyncio.sleep(0.005)
                for version in VERSIONS[k : k + 2]:
                    flat = weights[version]
                    await loop.run_in_executor(None, pool.publish, version, {"flat": flat})
            published.set()

        await asyncio.wait_for(
            asyncio.gather(publisher(), *(requester(i) for i in range(len(policies)))), 60
        )
        assert published.is_set()

        # Its counters reach the control bus (heartbeats).
        served = len(replies)
        status = await loop.run_in_executor(
            None,
            lambda: wait_status(
                control,
                lambda s: members_by_node(s)["inference.h.0"].counters["requests"] >= served,
                what="inference counters in a heartbeat",
            ),
        )
        counters = dict(members_by_node(status)["inference.h.0"].counters)

        # The node dies: a call fails at its deadline instead of hanging.
        inference.kill()
        inference.wait(10)
        first.deadline_s = 1.0
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"no answer within 1\.0s"):
            await loop.run_in_executor(None, first, images, proprio, ins)
        assert 0.9 <= time.monotonic() - t0 < 4.0
    return replies, counters


def test_scaling_benchmark_runs_against_a_real_inference_node() -> None:
    """The sampler-scaling benchmark end to end, tiny: rows per sampler count, linear reference,
    saturation fields; nothing left behind (the leak fixture checks)."""
    from dvla_tools.bench.pipeline_scaling import format_table, run_scaling

    result = run_scaling((1, 3), step_latency_s=0.01, seconds=0.6, warmup_s=0.3, image_size=IMAGE)
    rows = result["rows"]
    assert [r["samplers"] for r in rows] == [1, 3]
    assert all(r["env_steps_per_s"] > 0 and r["versions"] == [1] for r in rows)
    assert rows[1]["linear_steps_per_s"] == pytest.approx(3 * rows[0]["linear_steps_per_s"])
    assert result["baseline_again"]["samplers"] == 1
    assert "asyncio tasks in one process" in result["note"]
    assert "inference" in format_table(result)
