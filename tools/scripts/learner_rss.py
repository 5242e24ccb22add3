"""The learner's resident memory over many GRPO updates on batches of varying size, with and
without fixed-shape minibatches (``minibatch_bucket``), each in a fresh process so the two do
not share an allocator.

    .venv/bin/python tools/scripts/learner_rss.py --updates 40 --json PATH

Synthetic episodes of the embedded suite's shape (``dvla_nodes.learn.rollout.
synthetic_episodes``: random 64 px frames, 4-8 groups of 8 episodes of 20-80 steps per
update), the tiny policy, one torch thread, ``MALLOC_ARENA_MAX=2`` as ``dvla up`` starts
nodes. Reported per configuration: RSS just before
each update (the level the process returns to) and the peak during it (sampled every 10 ms by
a thread), the first 5 updates excluded as warm-up, and the trend (last 10 levels' median
against the first 10's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

WARMUP = 5


def _child(bucket: int, updates: int, seed: int) -> dict[str, Any]:
    import numpy as np
    import psutil
    import torch

    from dvla_nodes.learn.config import TrainConfig
    from dvla_nodes.learn.learner import Learner
    from dvla_nodes.learn.rollout import Episodes, synthetic_episodes
    from dvla_nodes.policy import build_policy

    torch.set_num_threads(1)
    cfg = TrainConfig(minibatch_bucket=bucket, torch_threads=1)
    model, tok = build_policy()
    learner = Learner(model, tok, cfg)
    rng = np.random.default_rng(seed)

    def episodes(n_groups: int) -> Episodes:
        lengths = [int(x) for x in rng.integers(20, 80, n_groups * cfg.group_size)]
        return synthetic_episodes(
            int(rng.integers(2**31)),
            lengths,
            group_size=cfg.group_size,
            bins=cfg.bins,
            version=learner.version,
        )

    learner.set_anchor(episodes(4))
    proc = psutil.Process()
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    levels: list[float] = []
    peaks: list[float] = []
    t0 = time.perf_counter()
    for _ in range(updates):
        batch = episodes(int(rng.integers(4, 9)))
        levels.append(proc.memory_info().rss / 2**20)
        peak[0] = 0
        learner.update(batch)
        peaks.append(peak[0] / 2**20)
        del batch
    done.set()
    watcher.join()
    lv, pk = levels[WARMUP:], peaks[WARMUP:]
    return {
        "minibatch_bucket": bucket,
        "updates": updates,
        "seconds": round(time.perf_counter() - t0, 1),
        "level_mib": {"min": round(min(lv)), "median": round(statistics.median(lv))},
        "level_max_mib": round(max(lv)),
        "peak_max_mib": round(max(pk)),
        "trend": round(statistics.median(lv[-10:]) / statistics.median(lv[:10]) - 1.0, 3),
        "levels_mib": [round(x) for x in levels],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--updates", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.child, args.updates, args.seed)))
        return 0
    env = {**os.environ, "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}
    results = []
    for bucket in (0, 64):
        cmd = [sys.executable, __file__, "--child", str(bucket), "--updates", str(args.updates)]
        cmd += ["--seed", str(args.seed)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(
            f"minibatch_bucket={bucket}: level before an update {r['level_mib']['min']}-"
            f"{r['level_max_mib']} MiB (median {r['level_mib']['median']}), peak during one "
            f"{r['peak_max_mib']} MiB, trend {r['trend']:+.1%} ({r['seconds']} s)"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
