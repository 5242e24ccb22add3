"""``dvla bench chaos``: train while nodes are killed, and measure how the job recovers.

Starts a real training job (``dvla up`` on a generated one-host topology: coordinator hosting
the control hub, learner, ``--samplers`` samplers, a small fast training configuration) in a
new run directory. Once the learner publishes versions and every sampler has them, the chaos
phase runs for ``--minutes``: every ``--kill-every`` seconds a random non-learner node that is
not still recovering (the coordinator or a sampler) gets SIGKILL, and once, half-way, the
learner does. Then the job is stopped (SIGTERM to ``dvla up``) and what it left is checked.

Observed only from outside, as a user would: the supervisor's children (pids by node name), the
control hub's status (an observer connection that reconnects when the hub restarts), the run
directory (``metrics.jsonl``, ``latest.json``) and ``/dev/shm``.

Per kill: *restarted* (a new process for the node), *rejoined* (the hub lists the new pid;
for the coordinator: a new hub epoch with its own member row), *recovered* — a sampler reports
a weight version at least the learner's version at the kill (or the learner's current one, if
lower); the coordinator's new hub lists every node running again; the learner publishes a
version again. For the learner the first version it trains after the restart is compared with
the version at the kill and the one in ``latest.json`` then: a learner that resumes from its
checkpoint continues above the checkpoint's version.

Reports kills, recoveries and times to recover per role, the version lag of every sampler
behind the learner over time, ``/dev/shm`` segments of the run left after the job (target 0),
processes left (target 0), and whether training kept improving (the learner's version kept
rising in every window between kills; shaped reward and success in the last quarter of the
updates against the first). ``--json PATH`` writes every kill, every sample and the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import psutil

from dvla_bus import wire
from dvla_bus.shm import SegmentName
from dvla_tools.bench._common import machine_info, write_json
from dvla_tools.bench._job import (
    FAST_TRAINING,
    HubObserver,
    TrainingJob,
    hub_observer,
    member,
    run_id,
    write_training_topology,
)

SEED: Final = 20261128
TICK_S: Final = 0.5
MAX_IPC_PATH: Final = 100  # sun_path is 108 bytes with the terminating NUL; keep a margin


def register(sub: Any, name: str, help_text: str) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=__doc__)
    parser.add_argument("--minutes", type=float, default=3.0, help="length of the chaos phase")
    parser.add_argument(
        "--kill-every", type=float, default=20.0, help="seconds between non-learner kills"
    )
    parser.add_argument("--samplers", type=int, default=3, help="sampler nodes (>= 1)")
    parser.add_argument(
        "--no-learner-kill", action="store_true", help="do not kill the learner half-way"
    )
    parser.add_argument("--seed", type=int, default=SEED, help="seeds the choice of victims")
    parser.add_argument(
        "--settle", type=float, default=60.0, help="seconds to wait for the last recoveries"
    )
    parser.add_argument(
        "--warmup-timeout", type=float, default=300.0, help="seconds allowed for the job to start"
    )
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where the run goes")
    parser.add_argument("--json", help="write results to this file")
    parser.set_defaults(func=_main)


@dataclass(slots=True)
class Kill:
    """One SIGKILL and what followed (times in seconds since the chaos phase began)."""

    node: str
    role: str
    pid: int
    t: float
    learner_version: int  # the learner's published version at the kill (-1: unknown)
    node_version: int  # the victim's reported weight version at the kill
    hub_epoch: str
    metrics_records: int  # lines in metrics.jsonl at the kill
    checkpoint_version: int | None = None  # latest.json's version at the kill (learner only)
    new_pid: int | None = None
    restarted_s: float | None = None
    rejoined_s: float | None = None
    recovered_s: float | None = None
    version_after: int | None = None  # sampler: version when recovered; learner: first trained

    @property
    def pending(self) -> bool:
        return self.recovered_s is None


def _role(node: str) -> str:
    return node.split(".", 1)[0]


def _learner_version(status: wire.Status | None) -> int | None:
    for m in status.members if status is not None else ():
        if m.role == "learner" and m.state != "dead" and m.weight_version >= 1:
            return m.weight_version
    return None


def _sampler_versions(
    status: wire.Status | None, live: dict[str, psutil.Process] | None = None
) -> dict[str, int]:
    """Samplers' reported weight versions; with ``live``, only rows of processes that are
    running now (the hub keeps a killed node's last row until its heartbeats time out)."""
    if status is None:
        return {}
    return {
        m.node: m.weight_version
        for m in status.members
        if m.role == "sampler"
        and m.state != "dead"
        and m.weight_version >= 0
        and (live is None or (m.node in live and live[m.node].pid == m.pid))
    }


def _dead_owner_segments(run: str) -> int:
    """Segments of this run in /dev/shm whose owner process is gone (awaiting the reaper)."""
    count = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir("/dev/shm"):
            if not entry.name.startswith(f"dvla.{run}."):
                continue
            with contextlib.suppress(Exception):
                seg = SegmentName.parse(entry.name)
                if not psutil.pid_exists(seg.pid):
                    count += 1
    return count


class Chaos:
    """The chaos phase's state: the schedule, the kills, the samples."""

    def __init__(self, job: TrainingJob, args: argparse.Namespace, expected: list[str]) -> None:
        self.job = job
        self.args = args
        self.expected = expected
        self.rng = random.Random(args.seed)
        self.kills: list[Kill] = []
        self.samples: list[dict[str, Any]] = []
        self.skipped: list[float] = []
        self.max_dead_segments = 0
        self.t0 = time.monotonic()
        span = args.minutes * 60.0
        every = args.kill_every
        self.schedule: list[tuple[float, str]] = []
        k = 1
        while k * every < span:
            self.schedule.append((k * every, "other"))
            k += 1
        if not args.no_learner_kill:
            mid = span / 2
            if any(abs(mid - t) < every / 4 for t, _ in self.schedule):
                mid += every / 2
            self.schedule.append((mid, "learner"))
        self.schedule.sort()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _victim(self, kind: str, procs: dict[str, psutil.Process]) -> str | None:
        busy = {k.node for k in self.kills if k.pending}
        if kind == "learner":
            candidates = [n for n in procs if _role(n) == "learner"]
        else:
            candidates = sorted(n for n in procs if _role(n) != "learner" and n not in busy)
        return self.rng.choice(candidates) if candidates else None

    def kill(self, kind: str, status: wire.Status | None) -> None:
        procs = self.job.nodes()
        node = self._victim(kind, procs)
        if node is None:
            self.skipped.append(self.now())
            return
        proc = procs[node]
        m = member(status, node)
        records = len(self.job.metrics())
        kill = Kill(
            node=node,
            role=_role(node),
            pid=proc.pid,
            t=self.now(),
            learner_version=_learner_version(status) or -1,
            node_version=m.weight_version if m is not None else -1,
            hub_epoch=status.epoch if status is not None else "",
            metrics_records=records,
            checkpoint_version=self.job.checkpoint_version() if kind == "learner" else None,
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        self.kills.append(kill)
        print(
            f"{kill.t:7.1f}s  SIGKILL {node} (pid {proc.pid}); learner at version "
            f"{kill.learner_version}",
            flush=True,
        )

    def observe(self, status: wire.Status | None) -> None:
        t = self.now()
        procs = self.job.nodes()
        learner = _learner_version(status)
        samplers = _sampler_versions(status, procs)
        lags = {n: learner - v for n, v in samplers.items()} if learner is not None else {}
        dead_segments = _dead_owner_segments(run_id(self.job.run_dir))
        self.max_dead_segments = max(self.max_dead_segments, dead_segments)
        self.samples.append(
            {
                "t": round(t, 2),
                "hub": status is not None,
                "latest_version": status.latest_version if status is not None else None,
                "learner_version": learner,
                "sampler_versions": samplers,
                "max_lag": max(lags.values()) if lags else None,
                "dead_owner_segments": dead_segments,
            }
        )
        for k in self.kills:
            if k.pending:
                self._progress(k, t, procs, status, learner)

    def _progress(
        self,
        k: Kill,
        t: float,
        procs: dict[str, psutil.Process],
        status: wire.Status | None,
        learner: int | None,
    ) -> None:
        proc = procs.get(k.node)
        if k.restarted_s is None and proc is not None and proc.pid != k.pid:
            k.new_pid = proc.pid
            k.restarted_s = t - k.t
        if k.new_pid is None or status is None:
            return
        m = member(status, k.node)
        if k.rejoined_s is None:
            joined = m is not None and m.pid == k.new_pid and m.state != "dead"
            if k.role == "coordinator":
                joined = joined and status.epoch != k.hub_epoch
            if joined:
                k.rejoined_s = t - k.t
        if k.rejoined_s is None or m is None:
            return
        if k.role == "coordinator":
            rows = {x.node: x for x in status.members}
            if all(n in rows and rows[n].state == "running" for n in self.expected):
                k.recovered_s = t - k.t
        elif k.role == "learner":
            if m.weight_version >= 1:
                k.recovered_s = t - k.t
        else:
            target = k.learner_version
            if learner is not None:
                target = min(target, learner)
            if m.weight_version >= max(1, target):
                k.recovered_s = t - k.t
                k.version_after = m.weight_version

    def learner_after(self) -> None:
        """For each learner kill: the first version trained after the restart."""
        records = self.job.metrics()
        for k in self.kills:
            if k.role != "learner":
                continue
            after = [r for r in records[k.metrics_records :] if r.get("kind") == "train"]
            if after:
                k.version_after = int(after[0]["version"])


async def _run_chaos(chaos: Chaos, hub: HubObserver) -> None:
    span = chaos.args.minutes * 60.0
    pending = list(chaos.schedule)
    while True:
        tick = time.monotonic()
        status = await hub.status(timeout=1.0)
        chaos.observe(status)
        t = chaos.now()
        while pending and pending[0][0] <= t:
            _, kind = pending.pop(0)
            chaos.kill(kind, status)
        if t >= span and (not any(k.pending for k in chaos.kills) or t >= span + chaos.args.settle):
            return
        await asyncio.sleep(max(0.0, TICK_S - (time.monotonic() - tick)))


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def _training(records: list[dict[str, Any]]) -> dict[str, Any]:
    train = [r for r in records if r.get("kind") == "train"]
    if len(train) < 8:
        return {"updates": len(train), "improving": None}
    q = len(train) // 4

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return round(sum(float(r[key]) for r in rows) / len(rows), 4)

    first, last = train[:q], train[-q:]
    return {
        "updates": len(train),
        "warm_starts": sum(1 for r in records if r.get("kind") == "bc"),
        "first_quarter": {"success": mean(first, "success"), "reward": mean(first, "reward")},
        "last_quarter": {"success": mean(last, "success"), "reward": mean(last, "reward")},
        "improving": mean(last, "reward") > mean(first, "reward"),
    }


def _windows(chaos: Chaos) -> list[dict[str, Any]]:
    """Versions the learner published between consecutive kills (and after the last)."""
    bounds = [0.0, *(k.t for k in chaos.kills), chaos.now()]
    out = []
    for a, b in itertools.pairwise(bounds):
        vs = [
            s["learner_version"]
            for s in chaos.samples
            if a <= s["t"] < b and s["learner_version"] is not None
        ]
        out.append(
            {
                "from_s": round(a, 1),
                "to_s": round(b, 1),
                "first": vs[0] if vs else None,
                "last": vs[-1] if vs else None,
                "rising": bool(vs) and vs[-1] > vs[0],
            }
        )
    return out


def _longest_stall(chaos: Chaos) -> float:
    """Longest time the learner's version did not change (seconds)."""
    longest = 0.0
    since: float | None = None
    last: int | None = None
    for s in chaos.samples:
        v = s["learner_version"]
        if v is not None and v != last:
            last, since = v, s["t"]
        elif since is not None:
            longest = max(longest, s["t"] - since)
    return round(longest, 1)


def _node_counters(status: wire.Status | None) -> dict[str, dict[str, int]]:
    keep = ("rx.dropped.", "tx.dropped.", "stale_groups", "admitted_groups", "iterations")
    out: dict[str, dict[str, int]] = {}
    for m in status.members if status is not None else ():
        picked = {k: v for k, v in m.counters.items() if k.startswith(keep)}
        if m.role == "coordinator":
            picked.update(
                {
                    k: v
                    for k, v in m.counters.items()
                    if k in ("hub.deaths", "hub.joins", "hub.rejoins_requested")
                }
            )
        out[m.node] = picked
    return out


def summarize(
    chaos: Chaos, left: list[str], orphans: list[int], exit_code: int | None
) -> dict[str, Any]:
    by_role: dict[str, dict[str, Any]] = {}
    for role in sorted({k.role for k in chaos.kills}):
        ks = [k for k in chaos.kills if k.role == role]
        by_role[role] = {
            "kills": len(ks),
            "recovered": sum(1 for k in ks if not k.pending),
            "restart_s": _quantiles([k.restarted_s for k in ks if k.restarted_s is not None]),
            "rejoin_s": _quantiles([k.rejoined_s for k in ks if k.rejoined_s is not None]),
            "recover_s": _quantiles([k.recovered_s for k in ks if k.recovered_s is not None]),
        }
    lags = [s["max_lag"] for s in chaos.samples if s["max_lag"] is not None]
    learner_kills = [
        {
            "t": round(k.t, 1),
            "version_at_kill": k.learner_version,
            "checkpoint_version_at_kill": k.checkpoint_version,
            "first_version_after": k.version_after,
            "recovered_s": k.recovered_s,
            # Resumed = continued above the checkpoint's version instead of starting over.
            "resumed_from_checkpoint": (
                k.version_after is not None
                and k.checkpoint_version is not None
                and k.version_after > k.checkpoint_version
            ),
            # Versions the lost learner had published, made again with other weights.
            "versions_reused": (
                max(0, k.learner_version - k.version_after + 1)
                if k.version_after is not None
                else None
            ),
        }
        for k in chaos.kills
        if k.role == "learner"
    ]
    windows = _windows(chaos)
    versions = [s["learner_version"] for s in chaos.samples if s["learner_version"] is not None]
    return {
        "kills": len(chaos.kills),
        "recoveries": sum(1 for k in chaos.kills if not k.pending),
        "skipped_kills": len(chaos.skipped),
        "by_role": by_role,
        "learner_kills": learner_kills,
        "lag": {
            "samples": len(lags),
            "mean": round(sum(lags) / len(lags), 2) if lags else None,
            "p95": round(sorted(lags)[int(0.95 * (len(lags) - 1))], 2) if lags else None,
            "max": max(lags) if lags else None,
        },
        "versions": {
            "first": versions[0] if versions else None,
            "last": versions[-1] if versions else None,
            "windows": windows,
            "windows_rising": sum(1 for w in windows if w["rising"]),
            "longest_stall_s": _longest_stall(chaos),
        },
        "shm_left_after_stop": left,
        "max_dead_owner_segments_seen": chaos.max_dead_segments,
        "orphans_after_stop": orphans,
        "up_exit_status": exit_code,
    }


def _print_summary(doc: dict[str, Any]) -> None:
    s = doc["summary"]
    print(f"\nkills {s['kills']}, recovered {s['recoveries']}, skipped {s['skipped_kills']}")
    print("| role | kills | recovered | restart s (median/max) | rejoin s | recover s |")
    print("|---|---|---|---|---|---|")
    for role, r in s["by_role"].items():

        def q(x: dict[str, float | None]) -> str:
            return f"{x['median']} / {x['max']}"

        print(
            f"| {role} | {r['kills']} | {r['recovered']} | {q(r['restart_s'])} | "
            f"{q(r['rejoin_s'])} | {q(r['recover_s'])} |"
        )
    for lk in s["learner_kills"]:
        print(
            f"learner kill at {lk['t']}s: version {lk['version_at_kill']} (latest.json "
            f"{lk['checkpoint_version_at_kill']}), first version trained after the restart "
            f"{lk['first_version_after']}; resumed from checkpoint: "
            f"{lk['resumed_from_checkpoint']}; versions published twice: {lk['versions_reused']}"
        )
    lag, v = s["lag"], s["versions"]
    print(
        f"sampler lag behind the learner (versions): mean {lag['mean']}, p95 {lag['p95']}, "
        f"max {lag['max']}"
    )
    print(
        f"learner versions {v['first']} -> {v['last']}; rising in {v['windows_rising']} of "
        f"{len(v['windows'])} windows between kills; longest stall {v['longest_stall_s']}s"
    )
    tr = doc["training"]
    if tr.get("improving") is not None:
        print(
            f"training: {tr['updates']} updates, {tr['warm_starts']} warm start(s); reward "
            f"{tr['first_quarter']['reward']} -> {tr['last_quarter']['reward']}, success "
            f"{tr['first_quarter']['success']} -> {tr['last_quarter']['success']} "
            f"(first vs last quarter of updates)"
        )
    print(
        f"/dev/shm segments left after the job: {len(s['shm_left_after_stop'])} (target 0); "
        f"processes left: {len(s['orphans_after_stop'])} (target 0)"
    )


async def _chaos(args: argparse.Namespace) -> dict[str, Any]:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = (args.runs_dir / f"{stamp}-chaos").resolve()
    longest = len(f"ipc://{run_dir}/data-sampler.h.{args.samplers - 1}.sock")
    if longest > MAX_IPC_PATH:
        raise SystemExit(
            f"dvla bench chaos: {run_dir} is too deep for ipc:// socket paths "
            f"({longest} > {MAX_IPC_PATH} characters); pass a shorter --runs-dir"
        )
    (run_dir / "logs").mkdir(parents=True)
    budget = args.warmup_timeout / 60 + args.minutes + args.settle / 60 + 10
    learner = {**FAST_TRAINING, "minutes": round(budget, 1)}
    topology = write_training_topology(run_dir, samplers=args.samplers, learner=learner)
    expected = ["coordinator.h.0", "learner.h.0", *(f"sampler.h.{i}" for i in range(args.samplers))]
    print(f"run directory {run_dir}", flush=True)
    job = TrainingJob(run_dir, topology)
    final_status: wire.Status | None = None
    with job:
        async with hub_observer(job.endpoint) as hub:
            t_start = time.monotonic()

            def warm(st: wire.Status) -> bool:
                lv = _learner_version(st)
                sv = _sampler_versions(st)
                return (
                    lv is not None
                    and lv >= 2
                    and len(sv) == args.samplers
                    and min(sv.values()) >= 1
                )

            await hub.wait(warm, args.warmup_timeout, "the learner's first versions")
            warmup_s = time.monotonic() - t_start
            print(f"warm after {warmup_s:.1f}s; chaos for {args.minutes:g} min", flush=True)
            chaos = Chaos(job, args, expected)
            await _run_chaos(chaos, hub)
            final_status = await hub.status(timeout=2.0)
            chaos.learner_after()
        exit_code = job.stop()
    left = job.shm_segments()
    orphans = job.orphans()
    records = job.metrics()
    return {
        "benchmark": "chaos",
        "machine": machine_info(),
        "command": " ".join(["dvla", "bench", "chaos", *sys.argv[3:]]),
        "config": {
            "minutes": args.minutes,
            "kill_every_s": args.kill_every,
            "samplers": args.samplers,
            "learner_kill": not args.no_learner_kill,
            "seed": args.seed,
            "training": learner,
            "heartbeat_timeout_s": 3.0,
        },
        "run_dir": str(run_dir),
        "warmup_s": round(warmup_s, 1),
        "kills": [asdict(k) for k in chaos.kills],
        "summary": summarize(chaos, left, orphans, exit_code),
        "training": _training(records),
        "final_counters": _node_counters(final_status),
        "samples": chaos.samples,
    }


def _main(args: argparse.Namespace) -> int:
    if args.samplers < 1 or args.kill_every <= 0 or args.minutes <= 0:
        print("dvla bench chaos: need --samplers >= 1, --kill-every > 0, --minutes > 0")
        return 2
    doc = asyncio.run(_chaos(args))
    _print_summary(doc)
    write_json(args.json, doc)
    s = doc["summary"]
    ok = (
        s["kills"] > 0
        and s["recoveries"] == s["kills"]
        and not s["shm_left_after_stop"]
        and not s["orphans_after_stop"]
    )
    return 0 if ok else 1
