"""``dvla bench replicate``: weight distribution, dvla against ``torch.distributed`` gloo.

Cases:

* **same host** — one writer, K = 1, 2, 4, 8 reader processes, a ``--size`` model (256 MiB,
  ``--quick`` 16 MiB) of float32. *dvla*: the writer publishes a version into the host's weight
  pool (copy into staging, BLAKE2b every chunk, flip) and then tells the readers (a line on
  their stdin, as a node hears ``version`` on the control bus); each reader (its pool mapped
  once, at start) pins the new version and takes torch tensors viewing it; time = from the
  writer's start to the last reader holding the new tensors. *dvla + read*: the same, and each
  reader then reads every byte once (what a CPU forward pass does anyway). *gloo*: rank 0
  ``broadcast``s the same buffer to K reader ranks; time = from rank 0's start to the last
  reader's return. Median of ``--reps``.
* **netns tree** (root only; skipped with the reason otherwise) — MEASURED.md's four hosts in
  two racks built as network namespaces (:class:`NetnsLab`: a bridge per rack, a router between
  them, ``tc tbf`` on every host link and on each rack's uplink, burst 32 kB), real
  ``dvla node start`` processes per a generated ``two-rack``-like topology (``publisher`` on h0,
  ``relay`` on h1..h3), a ``--tree-size`` model (32 MiB, ``--quick`` 8 MiB). Time = publish
  start to the last host's flip (the relays' commit times, same kernel clock). Compared with
  *bytes / slowest link* (the 200 Mbit uplink), with the planner's prediction for the same
  file, and with gloo ``broadcast`` over the same namespaces. Bytes into rack r2 are counted
  on its uplink qdisc (``tc -s``): one copy per rack means about 1.0 x the weight bytes.

Writes ``--json PATH``: machine, cases, ratios and their targets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from dvla_tools.bench._common import machine_info, write_json

READERS: Final = (1, 2, 4, 8)
TARGETS: Final = {
    "same_host_k8_over_k1": 1.2,
    "tree_over_bound": 1.15,
    "tree_over_plan": 1.15,
    # Bytes into rack r2 on its uplink / weight bytes: one copy is 1.0 plus TCP/IP, Ethernet and
    # ZeroMQ framing (~4-5 % at 1500-byte frames); a second copy would read >= 2.
    "cross_rack_copies": 1.1,
}
UPLINK: Final = "200mbit"
HOST_NIC: Final = "1gbit"
BURST: Final = "32kb"


def register(sub: Any, name: str, help_text: str) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small models, few repetitions")
    parser.add_argument("--json", help="write results to this file")
    parser.add_argument("--size", type=int, help="same-host model bytes (default 256 MiB)")
    parser.add_argument("--tree-size", type=int, help="netns model bytes (default 32 MiB)")
    parser.add_argument("--reps", type=int, help="repetitions per case (default 5, quick 2)")
    parser.add_argument("--no-netns", action="store_true", help="skip the network-namespace case")
    parser.add_argument("--no-gloo", action="store_true", help="skip the gloo baselines")
    parser.add_argument("--readers", help="comma-separated reader counts (default 1,2,4,8)")
    parser.set_defaults(func=_main)


# --- same host ---------------------------------------------------------------------------------

_READER: Final = """
import sys, time
import numpy as np
from dvla_bus.weights import attach_weights
r = attach_weights(sys.argv[1])
import torch  # noqa: readers hold torch tensors; imported before timing starts
print("ready", flush=True)
for line in sys.stdin:  # "the new version is out" (a node hears it on the control bus)
    want, touch = (int(x) for x in line.split())
    with r.pin() as p:
        assert p.version == want, (p.version, want)
        ts = p.tensors()
        if touch:  # read every byte once (integer sums: no float overflow warnings)
            for a in p.arrays.values():
                np.add.reduce(a.reshape(-1).view(np.uint64))
        t = time.time()
    print(t, flush=True)
"""

_GLOO: Final = """
import os, sys, time, torch, torch.distributed as dist
rank, world, nbytes, reps = (int(x) for x in sys.argv[1:5])
dist.init_process_group("gloo", rank=rank, world_size=world)
buf = torch.zeros(nbytes // 4, dtype=torch.float32)
if rank == 0:
    buf.uniform_()
times = []
for _ in range(reps):
    dist.barrier()
    t0 = time.time()
    dist.broadcast(buf, 0)
    times.append((t0, time.time()))
print(" ".join(f"{a}:{b}" for a, b in times), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def _python(
    code: str, *args: str, prefix: Sequence[str] = (), env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*prefix, sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _stop_all(procs: Sequence[subprocess.Popen[str]]) -> None:
    for p in procs:
        with contextlib.suppress(OSError):
            if p.stdin is not None:
                p.stdin.close()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        if p.stdout is not None:
            p.stdout.close()


def same_host_dvla(
    nbytes: int, readers: Sequence[int], reps: int
) -> dict[tuple[str, int], list[float]]:
    """Seconds per version, by (case, K): writer start -> the last of K readers holding torch
    tensors of the new version (``dvla``), and having read every byte once (``dvla+read``).
    The reader processes start once, map the pool once and serve every K."""
    from dvla_bus.weights import Manifest, create_weight_pool

    manifest = Manifest.from_specs([(f"w{i}", "float32", (nbytes // 16,)) for i in range(4)])
    rng = np.random.default_rng(0)
    src = rng.random(nbytes // 8).view(np.uint8)
    arrays = {
        t.name: src[t.offset : t.offset + t.nbytes].view(np.float32) for t in manifest.tensors
    }
    run = "b" + secrets.token_hex(5)
    out: dict[tuple[str, int], list[float]] = {}
    with create_weight_pool(run, "bench", manifest, chunk_bytes=4 << 20) as pool:
        pool.publish(1, arrays)  # warm: first writes into fresh pages are slow (MEASURED.md)
        pool.publish(2, arrays)
        procs = [_python(_READER, pool.name) for _ in range(max(readers))]
        try:
            for p in procs:
                assert p.stdout is not None
                if p.stdout.readline().strip() != "ready":
                    raise RuntimeError("a reader failed to start")
            v = 2
            # Cases interleaved round by round, so drift (other load, warming) hits them alike.
            for rep in range(reps + 1):
                for k in readers:
                    for name, touch in (("dvla", 0), ("dvla+read", 1)):
                        v += 1
                        t0 = time.time()
                        pool.publish(v, arrays, timeout=30)
                        for p in procs[:k]:  # the announcement, as the control bus would
                            assert p.stdin is not None
                            p.stdin.write(f"{v} {touch}\n")
                            p.stdin.flush()
                        ends = []
                        for p in procs[:k]:
                            assert p.stdout is not None
                            ends.append(float(p.stdout.readline()))
                        if rep:  # the first round warms the readers' views
                            out.setdefault((name, k), []).append(max(ends) - t0)
        finally:
            _stop_all(procs)
    return out


def _gloo(
    nbytes: int,
    prefixes: Sequence[Sequence[str]],
    master: str,
    reps: int,
    env: dict[str, str] | None = None,
) -> list[float]:
    """Seconds per broadcast from rank 0 (``prefixes[0]``) to every other rank."""
    port = str(29500 + secrets.randbelow(20000))
    world = len(prefixes)
    procs = []
    for rank, prefix in enumerate(prefixes):
        e = {"MASTER_ADDR": master, "MASTER_PORT": port, **(env or {})}
        procs.append(
            _python(_GLOO, str(rank), str(world), str(nbytes), str(reps + 1), prefix=prefix, env=e)
        )
    try:
        outs = []
        for p in procs:
            assert p.stdout is not None
            outs.append(
                [tuple(float(x) for x in pair.split(":")) for pair in p.stdout.readline().split()]
            )
    finally:
        _stop_all(procs)
    if any(len(o) != reps + 1 for o in outs):
        raise RuntimeError("gloo: a rank failed")
    return [max(o[i][1] for o in outs[1:]) - outs[0][i][0] for i in range(1, reps + 1)]


# --- the network-namespace lab -----------------------------------------------------------------


class NetnsLab:
    """Four hosts in two racks as network namespaces (the wiring of MEASURED.md).

    Namespaces ``<tag>-h0`` … ``<tag>-h3`` (one ``eth0`` each, 10.77.1.1, .1.2, .2.1, .2.2) and
    ``<tag>-rt`` holding both rack bridges (``br1`` 10.77.1.254, ``br2`` 10.77.2.254) and
    routing between them. ``tc tbf`` shapes every host link both ways (``host_rate``) and each
    rack's uplink (``uplink_rate``, on the bridge device: only routed, cross-rack traffic passes
    it). Everything lives inside the namespaces, so deleting them (:meth:`close`, idempotent,
    also on failure) removes every veth and bridge."""

    HOSTS: Final = (
        ("h0", 1, "10.77.1.1"),
        ("h1", 1, "10.77.1.2"),
        ("h2", 2, "10.77.2.1"),
        ("h3", 2, "10.77.2.2"),
    )

    def __init__(
        self, tag: str | None = None, host_rate: str = HOST_NIC, uplink_rate: str = UPLINK
    ) -> None:
        self.tag = tag or f"dv{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.host_rate = host_rate
        self.uplink_rate = uplink_rate
        self.namespaces: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host)]

    @staticmethod
    def _ip(*args: str) -> None:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")

    def _in(self, host: str, *cmd: str) -> None:
        proc = subprocess.run(
            [*self.exec_prefix(host), *cmd], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{self.ns(host)}: {' '.join(cmd)}: {proc.stderr.strip()}")

    @staticmethod
    def available() -> str | None:
        """None if network namespaces can be made here, else the reason they cannot."""
        if shutil.which("ip") is None or shutil.which("tc") is None:
            return "iproute2 (ip, tc) is not installed"
        probe = f"dvprobe{os.getpid()}{secrets.token_hex(2)}"
        proc = subprocess.run(
            ["ip", "netns", "add", probe], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            why = proc.stderr.strip() or f"exit {proc.returncode}"
            return f"`ip netns add` failed: {why} (needs root or CAP_SYS_ADMIN)"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
        return None

    def _tbf(self, host: str, dev: str, rate: str) -> None:
        self._in(
            host,
            "tc",
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            BURST,
            "latency",
            "200ms",
        )

    def build(self) -> NetnsLab:
        try:
            rt = self.ns("rt")
            for h in ("rt", *(h for h, _, _ in self.HOSTS)):
                self._ip("netns", "add", self.ns(h))
                self.namespaces.append(self.ns(h))
                self._in(h, "ip", "link", "set", "lo", "up")
            for r in (1, 2):
                self._in("rt", "ip", "link", "add", f"br{r}", "type", "bridge")
                self._in("rt", "ip", "addr", "add", f"10.77.{r}.254/24", "dev", f"br{r}")
                self._in("rt", "ip", "link", "set", f"br{r}", "up")
                self._tbf("rt", f"br{r}", self.uplink_rate)  # traffic routed into rack r
            self._in("rt", "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
            for h, r, addr in self.HOSTS:
                port = f"p-{h}"
                self._ip(
                    "link",
                    "add",
                    "eth0",
                    "netns",
                    self.ns(h),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    port,
                    "netns",
                    rt,
                )
                self._in("rt", "ip", "link", "set", port, "master", f"br{r}")
                self._in("rt", "ip", "link", "set", port, "up")
                self._tbf("rt", port, self.host_rate)  # into the host
                self._in(h, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
                self._in(h, "ip", "link", "set", "eth0", "up")
                self._in(h, "ip", "route", "add", "default", "via", f"10.77.{r}.254")
                self._tbf(h, "eth0", self.host_rate)  # out of the host
        except BaseException:
            self.close()
            raise
        return self

    def uplink_bytes(self, rack: int) -> int:
        """Bytes the uplink into ``rack`` has carried (its qdisc's counter)."""
        out = subprocess.run(
            [*self.exec_prefix("rt"), "tc", "-s", "qdisc", "show", "dev", f"br{rack}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        m = re.search(r"Sent (\d+) bytes", out)
        return int(m.group(1)) if m else 0

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self.namespaces.clear()

    def __enter__(self) -> NetnsLab:
        return self.build()

    def __exit__(self, *exc: object) -> None:
        self.close()


def lab_topology(
    path: Path,
    *,
    params: int,
    report: Path,
    versions: int,
    every_s: float = 0.3,
    chunk: str = "1MiB",
    stall_s: float = 0.5,
    interval: float = 0.2,
    timeout: float = 1.5,
) -> Path:
    """A copy of ``topologies/two-rack.toml`` for :class:`NetnsLab`: ``publisher`` on h0 (the
    root), ``relay`` on h1..h3. ``[data] encrypt = "never"``: CURVE on the data bus is not
    used here (two-rack.toml asks for it across racks; the lab is a trusted network, so
    ``[security] insecure = true`` too)."""
    path.write_text(f"""schema = 1
name = "two-rack-lab"
[control]
endpoint = "tcp://10.77.1.1:5555"
hosted_by = "coordinator"
heartbeat_interval_s = {interval}
heartbeat_timeout_s = {timeout}
[links]
host_nic = "1Gbit"
rack_uplink = "200Mbit"
spine = "1Gbit"
host_latency = "50us"
uplink_latency = "100us"
[replication]
source = "publisher"
fanout = 2
rack_fanout = 1
chunk = "{chunk}"
checksum = "blake2b"
[data]
port = 5600
encrypt = "never"
[security]
insecure = true
[[racks]]
name = "r1"
[[racks]]
name = "r2"
[[hosts]]
name = "h0"
rack = "r1"
address = "10.77.1.1"
roles = {{ coordinator = 1, publisher = 1 }}
[[hosts]]
name = "h1"
rack = "r1"
address = "10.77.1.2"
roles = {{ relay = 1 }}
[[hosts]]
name = "h2"
rack = "r2"
address = "10.77.2.1"
roles = {{ relay = 1 }}
[[hosts]]
name = "h3"
rack = "r2"
address = "10.77.2.2"
roles = {{ relay = 1 }}
[roles.coordinator]
announce_every_s = 0.0
[roles.publisher]
params = {params}
dtype = "fp32"
versions = {versions}
every_s = {every_s}
report = "{report}"
timeout_s = 60.0
[roles.relay]
stall_s = {stall_s}
""")
    return path


NODES: Final = (
    ("coordinator", "h0"),
    ("publisher", "h0"),
    ("relay", "h1"),
    ("relay", "h2"),
    ("relay", "h3"),
)


@contextlib.contextmanager
def lab_nodes(
    lab: NetnsLab, topology: Path, workdir: Path, tag: str
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Start every node of :func:`lab_topology` in its namespace (``dvla node start``); on exit
    SIGTERM, then SIGKILL what is left. Run directories ``workdir/<tag>-<host>``; logs beside."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for role, host in NODES:
            run_dir = workdir / f"{tag}-{host}"
            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
            with open(run_dir / "logs" / f"{role}.log", "ab") as log:
                procs[f"{role}.{host}"] = subprocess.Popen(
                    [
                        *lab.exec_prefix(host),
                        sys.executable,
                        "-m",
                        "dvla_tools",
                        "node",
                        "start",
                        "--role",
                        role,
                        "--topology",
                        str(topology),
                        "--host",
                        host,
                        "--run-dir",
                        str(run_dir),
                        "--grace",
                        "3",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
        yield procs
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 8
        for p in procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def read_report(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tree_case(nbytes: int, reps: int, workdir: Path) -> dict[str, Any]:
    """Run the netns tree case; returns its JSON record."""
    from dvla_bus.planner import plan
    from dvla_bus.topology import load_topology

    params = nbytes // 4
    tag = "b" + secrets.token_hex(4)
    report = workdir / "report.jsonl"
    with NetnsLab() as lab:
        topo_path = lab_topology(
            workdir / "lab.toml", params=params, report=report, versions=reps + 1, every_s=0.5
        )
        before = lab.uplink_bytes(2)
        with lab_nodes(lab, topo_path, workdir, tag) as procs:
            deadline = time.monotonic() + 60 + 3 * reps * nbytes / 25e6
            while len(read_report(report)) < reps + 1:
                if time.monotonic() > deadline or procs["publisher.h0"].poll() is not None:
                    raise RuntimeError(f"netns case stalled; logs in {workdir}")
                time.sleep(0.05)
        into_r2 = lab.uplink_bytes(2) - before
    lines = read_report(report)[1:]  # the first version warms connections and pools
    times = [max(line["commits"].values()) - line["start"] for line in lines]
    topology = load_topology(topo_path)
    predicted = plan(topology, params, "fp32")
    uplink_bps = 200e6 / 8
    bound = nbytes / uplink_bps
    measured = statistics.median(times)
    out: dict[str, Any] = {
        "name": "netns-tree",
        "payload_bytes": nbytes,
        "times_s": times,
        "median_s": measured,
        "bound_s": bound,
        "planner_s": predicted.tree.time_s,
        "planner_bound_s": predicted.bound_s,
        "bytes_into_rack_r2": into_r2,
        "versions": reps + 1,
    }
    out["cross_rack_copies"] = into_r2 / ((reps + 1) * nbytes)
    return out


def _main(args: argparse.Namespace) -> int:
    quick = bool(args.quick)
    size = args.size or ((16 << 20) if quick else (256 << 20))
    tree_size = args.tree_size or ((8 << 20) if quick else (32 << 20))
    reps = args.reps or (2 if quick else 5)
    cases: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    skipped: dict[str, str] = {}
    medians: dict[tuple[str, int], float] = {}
    readers = tuple(int(k) for k in args.readers.split(",")) if args.readers else READERS
    for (name, k), t in same_host_dvla(size, readers, reps).items():
        medians[(name, k)] = statistics.median(t)
        cases.append(
            {
                "name": name,
                "readers": k,
                "payload_bytes": size,
                "times_s": t,
                "median_s": medians[(name, k)],
            }
        )
        print(f"same host {name:10s} K={k}: {medians[(name, k)] * 1e3:8.1f} ms", flush=True)
    for k in readers if not args.no_gloo else ():
        t = _gloo(size, [[] for _ in range(k + 1)], "127.0.0.1", reps)
        medians[("gloo", k)] = statistics.median(t)
        cases.append(
            {
                "name": "gloo",
                "readers": k,
                "payload_bytes": size,
                "times_s": t,
                "median_s": medians[("gloo", k)],
            }
        )
        print(f"same host {'gloo':10s} K={k}: {medians[('gloo', k)] * 1e3:8.1f} ms", flush=True)
    kmin, kmax = min(readers), max(readers)
    for name in ("dvla", "dvla+read", "gloo"):
        if (name, kmax) in medians:
            ratios[f"same_host_k8_over_k1.{name}"] = medians[(name, kmax)] / medians[(name, kmin)]
    ratios["same_host_k8_over_k1"] = ratios["same_host_k8_over_k1.dvla"]
    if args.no_netns:
        skipped["netns"] = "--no-netns"
    else:
        reason = NetnsLab.available()
        if reason is not None:
            skipped["netns"] = reason
        else:
            with tempfile.TemporaryDirectory(prefix="dvla-rep-") as tmp:
                rec = tree_case(tree_size, reps, Path(tmp))
            cases.append(rec)
            ratios["tree_over_bound"] = rec["median_s"] / rec["bound_s"]
            ratios["tree_over_plan"] = rec["median_s"] / rec["planner_s"]
            ratios["cross_rack_copies"] = rec["cross_rack_copies"]
            print(
                f"netns tree: {rec['median_s']:.3f} s, bound {rec['bound_s']:.3f} s, "
                f"planner {rec['planner_s']:.3f} s, into r2 {rec['cross_rack_copies']:.3f} copies",
                flush=True,
            )
            if not args.no_gloo:
                lab_gloo = netns_gloo(tree_size, reps)
                cases.append(lab_gloo)
                ratios["tree_over_bound.gloo"] = lab_gloo["median_s"] / rec["bound_s"]
    doc = {
        "bench": "replicate",
        "machine": machine_info(),
        "quick": quick,
        "cases": cases,
        "ratios": ratios,
        "targets": TARGETS,
        "skipped": skipped,
    }
    write_json(args.json, doc)
    for key, value in ratios.items():
        target = TARGETS.get(key)
        print(f"{key:32s} {value:6.3f}" + (f"  (target <= {target})" if target else ""))
    return 0


def netns_gloo(nbytes: int, reps: int) -> dict[str, Any]:
    """gloo ``broadcast`` from h0 to h1..h3 over the same namespaces and shaping."""
    with NetnsLab() as lab:
        prefixes = [lab.exec_prefix(h) for h, _, _ in NetnsLab.HOSTS]
        t = _gloo(nbytes, prefixes, "10.77.1.1", reps, env={"GLOO_SOCKET_IFNAME": "eth0"})
    return {
        "name": "netns-gloo",
        "payload_bytes": nbytes,
        "times_s": t,
        "median_s": statistics.median(t),
    }
