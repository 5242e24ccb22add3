"""``dvla bench envs``: environment steps/s with rendering, bare and through dvla's env workers.

For one suite (``--suite embedded|gym|metaworld|libero``), with uniform random actions and
frames rendered at ``--image-size`` on every step, all in one run:

* ``bare`` — the suite's environments stepped in a plain loop inside one process of the
  suite's own interpreter (``python -m dvla_nodes.envs.suites._worker --bare``): the ceiling
  of one core, with no pipe and no second process;
* ``shards-1`` — the same environments in one worker process driven from this process over
  the pipe protocol the sampler uses (split-phase reset/step, numpy frames), the access
  pattern of :func:`~dvla_nodes.learn.rollout.run_episodes`; target >= 0.9 of bare;
* ``shards-W`` — W workers (default: one per core) driven round-robin: total and per core.

Every case also counts the CPU seconds of the processes it uses (the bare process; this
process plus its workers, all threads) and reports steps per CPU-second: on a machine shared
with other work, wall-clock rates swing with the load (reported as ``load_average``), the cost
per step much less.

Memory per environment: the bare loop's process is measured (psutil RSS and USS) with N
environments and with one; the marginal cost of an environment is the difference over N - 1.
The sampler-plus-inference-over-the-bus case (the full "through dvla" path) joins once the
inference role lands; the JSON says so (``through_bus``: null).

Every case runs ``--repeat`` times (default 3), the cases interleaved, and reports medians.
Writes JSON (``--json PATH``): the machine, the configuration, the versions the workers
report, every case (median steps/s, per core, per CPU-second, and each run), the memory
figures, the load average and the ratios, checked against their target.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import msgspec
import psutil

from dvla_bus.errors import ConfigError
from dvla_tools.bench._common import machine_info, write_json

TARGET_SHARDS_VS_BARE = 0.9
DEFAULT_TASKS = {
    "embedded": "reach-red,reach-blue,push-red-green,push-blue-yellow,pick-red,pick-blue,"
    "place-red-yellow,place-blue-green",
    "gym": "HalfCheetah-v5",
    "metaworld": "reach-v3,push-v3,pick-place-v3,door-open-v3",
    "libero": "libero_spatial/0",
}
DEFAULT_NUM_ENVS = {"embedded": 8, "gym": 8, "metaworld": 4, "libero": 1}


def register(sub: Any, name: str, help_text: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=__doc__)
    p.add_argument("--suite", default="embedded", choices=tuple(DEFAULT_TASKS))
    p.add_argument("--tasks", help="comma-separated (default: a few of the suite's)")
    p.add_argument("--num-envs", type=int, help="environments per process (default per suite)")
    p.add_argument("--image-size", type=int, default=64, help="frame size; 0 = state only")
    p.add_argument("--seconds", type=float, default=10.0, help="measured time per case")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="for shards-W")
    p.add_argument("--python", help="the suite's interpreter (default: found as the sampler does)")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="a suite option"
    )
    p.add_argument(
        "--repeat", type=int, default=3, help="runs of every case, interleaved; medians reported"
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 s per case, one run")
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=run)


def _bare(python: str, config: Any, seconds: float) -> dict[str, Any]:
    cmd = [
        python,
        "-m",
        "dvla_nodes.envs.suites._worker",
        "--bare",
        msgspec.json.encode(config).decode(),
        str(seconds),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-10:])
        raise ConfigError(f"bare loop under {python} failed:\n{tail}")
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def _options(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--option {pair!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def measure(
    suite: str,
    tasks: tuple[str, ...],
    *,
    num_envs: int,
    image_size: int,
    seconds: float,
    workers: int,
    repeat: int = 1,
    python: str | None = None,
    options: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Every case of the benchmark; the JSON document without the machine."""
    from dvla_nodes.envs.suites import WorkerConfig, drive, open_suite_shards, resolve_python

    interp = resolve_python(suite, python)
    load = {"before": os.getloadavg()[0]}
    opts: dict[str, Any] = dict(options or {})
    cores = os.cpu_count() or 1
    config = WorkerConfig(suite, tasks, num_envs, image_size, opts)
    one = _bare(interp, WorkerConfig(suite, tasks, 1, image_size, opts), min(seconds, 1.0))
    counts = sorted({1, max(1, workers)})
    samples: dict[str, list[dict[str, Any]]] = {"bare": []}
    samples.update({f"shards-{w}": [] for w in counts})
    worker_rss: list[float] = []
    bare: dict[str, Any] = {}
    for rep in range(max(1, repeat)):  # cases interleaved: a drifting load hits them alike
        run = _bare(interp, config, seconds)
        bare = bare or run
        samples["bare"].append(
            {k: run[k] for k in ("steps_per_s", "steps_per_cpu_s", "episodes", "seconds")}
        )
        for w in counts:
            with open_suite_shards(
                suite, tasks, num_envs * w, image_size, workers=w, python=interp, options=opts
            ) as opened:
                procs = [psutil.Process(int(i["pid"])) for i in opened.info if "pid" in i]

                def cpu(procs: list[psutil.Process] = procs) -> float:
                    # this process (actions, frames off the pipes) + its workers, all threads
                    times = [p.cpu_times() for p in procs]
                    return time.process_time() + sum(t.user + t.system for t in times)

                result = drive(opened.shards, opened.spec, seconds, cpu=cpu)
                if w == 1 and rep == 0:
                    worker_rss = [p.memory_info().rss / 2**20 for p in procs]
            samples[f"shards-{w}"].append(
                {
                    "steps_per_s": result.steps_per_s,
                    "steps_per_cpu_s": result.steps_per_cpu_s,
                    "episodes": result.episodes,
                    "seconds": result.seconds,
                }
            )
    cases: list[dict[str, Any]] = []
    for name, runs in samples.items():
        procs_n = 1 if name == "bare" else int(name.split("-")[1])
        rate = statistics.median(r["steps_per_s"] for r in runs)
        per_cpu = [r["steps_per_cpu_s"] for r in runs if r["steps_per_cpu_s"]]
        cases.append(
            {
                "name": name,
                "processes": procs_n,
                "envs": num_envs * procs_n,
                "steps_per_s": rate,
                "steps_per_s_per_core": rate / min(procs_n, cores),
                "steps_per_cpu_s": statistics.median(per_cpu) if per_cpu else None,
                "episodes": sum(r["episodes"] for r in runs),
                "runs": runs,
            }
        )
    load["after"] = os.getloadavg()[0]
    n = num_envs
    rss_n, rss_1 = bare["memory"]["rss_mib"], one["memory"]["rss_mib"]
    uss_n, uss_1 = bare["memory"]["uss_mib"], one["memory"]["uss_mib"]
    memory = {
        "process_rss_mib": {"1_env": rss_1, f"{n}_envs": rss_n},
        "process_uss_mib": {"1_env": uss_1, f"{n}_envs": uss_n},
        "per_env_rss_mib": (rss_n - rss_1) / (n - 1) if n > 1 else None,
        "per_env_uss_mib": (uss_n - uss_1) / (n - 1) if n > 1 else None,
        "one_env_process_rss_mib": rss_1,
        "shard_worker_rss_mib": worker_rss,
    }
    ratio = cases[1]["steps_per_s"] / cases[0]["steps_per_s"] if cases[0]["steps_per_s"] else 0.0
    cpu_ratio = (
        cases[1]["steps_per_cpu_s"] / cases[0]["steps_per_cpu_s"]
        if cases[0]["steps_per_cpu_s"] and cases[1]["steps_per_cpu_s"]
        else None
    )
    return {
        "suite": suite,
        "config": {
            "tasks": list(tasks),
            "num_envs_per_process": num_envs,
            "image_size": image_size,
            "seconds_per_case": seconds,
            "repeat": repeat,
            "workers": workers,
            "options": opts,
        },
        "python": interp,
        "versions": bare["versions"],
        "cases": cases,
        "memory": memory,
        "through_bus": None,  # sampler + inference over the bus: with the inference role
        "load_average": load,
        "ratios": {"shards_1_vs_bare": ratio, "shards_1_vs_bare_per_cpu_s": cpu_ratio},
        "targets": {"shards_1_vs_bare": TARGET_SHARDS_VS_BARE},
        "checks": {"shards_1_vs_bare": ratio >= TARGET_SHARDS_VS_BARE},
    }


def run(args: argparse.Namespace) -> int:
    tasks = tuple(t.strip() for t in (args.tasks or DEFAULT_TASKS[args.suite]).split(",") if t)
    num_envs = args.num_envs or DEFAULT_NUM_ENVS[args.suite]
    seconds = 2.0 if args.quick else args.seconds
    doc = measure(
        args.suite,
        tasks,
        num_envs=num_envs,
        image_size=args.image_size,
        seconds=seconds,
        workers=args.workers,
        repeat=1 if args.quick else args.repeat,
        python=args.python,
        options=_options(args.option),
    )
    doc = {"bench": "envs", "machine": machine_info(), **doc}
    versions = ", ".join(f"{k} {v}" for k, v in doc["versions"].items())
    print(f"suite {args.suite} ({versions}); {args.image_size} px frames; {', '.join(tasks)}")
    print(
        f"{'case':<10} {'procs':>5} {'envs':>5} {'steps/s':>10} {'per core':>10} {'per cpu-s':>10}"
    )
    for c in doc["cases"]:
        print(
            f"{c['name']:<10} {c['processes']:>5} {c['envs']:>5} {c['steps_per_s']:>10.0f} "
            f"{c['steps_per_s_per_core']:>10.0f} {c['steps_per_cpu_s'] or 0:>10.0f}"
        )
    m = doc["memory"]
    per_env, per_uss = m["per_env_rss_mib"], m["per_env_uss_mib"]
    extra = (
        f", {per_env:.1f} MiB RSS ({per_uss:.1f} MiB USS) per further env"
        if per_env is not None
        else ""
    )
    print(f"memory: {m['one_env_process_rss_mib']:.0f} MiB RSS with one env{extra}")
    r = doc["ratios"]["shards_1_vs_bare"]
    rc = doc["ratios"]["shards_1_vs_bare_per_cpu_s"] or 0.0
    print(
        f"shards-1 / bare = {r:.2f} in steps/s, {rc:.2f} in steps per CPU-second "
        f"(target >= {TARGET_SHARDS_VS_BARE}); load average {doc['load_average']['before']:.1f}"
        f" -> {doc['load_average']['after']:.1f} on {os.cpu_count()} cores"
    )
    write_json(args.json, doc)
    if args.json:
        print(f"wrote {Path(args.json)}")
    return 0
