"""``dvla launch slurm`` against a real Slurm cluster started by the test: a private
``slurm.conf`` (one node, this machine; one partition; ``auth/none``; free ports chosen now;
state, spool and logs in a temp directory), ``slurmctld -D`` and ``slurmd -D`` as child
processes, then a real ``sbatch`` of a two-host deployment whose hosts share the one Slurm node
(``--map a=NODE,b=NODE``, each host its own job step, which needs the script's ``srun
--overlap`` for hosts sharing a node). The control hub must see the nodes of both hosts and
data reaching the consumer; ``scancel`` must end every dvla process.

Skipped, with the reason, when not root, when Slurm is not installed (Debian: ``apt-get install
slurm-wlm``) or when the daemons do not come up here (the reason quotes their logs). The
script's text is checked line by line without Slurm in ``test_launch.py``."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.helpers import members_by_node, wait_for, wait_status

TOOLS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None]

pytestmark = [
    pytest.mark.skipif(
        sys.platform != "linux" or os.geteuid() != 0,
        reason="a private Slurm cluster needs root on Linux (slurmd runs jobs as their user)",
    ),
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"Slurm is not installed ({', '.join(MISSING)} not on PATH; Debian: "
        "apt-get install slurm-wlm)",
    ),
]

#: Seconds for the daemons to bring the node to ``idle``; past it the test is skipped.
START_TIMEOUT = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Slurm:
    """A running private Slurm cluster: its config, the node's name, the environment for its
    client commands (``SLURM_CONF``) and a scratch directory."""

    conf: Path
    node: str
    env: dict[str, str]
    root: Path
    daemons: list[int]

    def run(self, *argv: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def processes(self) -> list[psutil.Process]:
        """Every process started for this cluster's jobs (slurmstepd, the batch script, srun,
        dvla), not the daemons: they carry its ``SLURM_CONF``. slurmstepd is re-parented away
        from slurmd, so these are not children of the test."""
        daemons = set(self.daemons)
        for pid in self.daemons:
            with contextlib.suppress(psutil.Error):
                daemons.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        found = []
        for p in psutil.process_iter():
            if p.pid in daemons or p.pid == os.getpid():
                continue
            with contextlib.suppress(psutil.Error):
                if p.environ().get("SLURM_CONF") == str(self.conf):
                    found.append(p)
        return found


def _node_line(name: str) -> tuple[str, str]:
    """This machine as a slurm.conf node (``slurmd -C``, with NodeAddr 127.0.0.1) and any
    extra ``SlurmdParameters``. The deployment needs 2 CPUs (two job steps of one CPU); a
    one-CPU machine declares 2 and tells slurmd to trust the configuration."""
    proc = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=20, check=False)
    if proc.returncode != 0:
        pytest.skip(f"slurmd -C failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    fields = dict(
        item.split("=", 1) for item in proc.stdout.split("\n", 1)[0].split() if "=" in item
    )
    cpus = int(fields.get("CPUs", "1"))
    memory = fields.get("RealMemory", "1")
    if cpus >= 2:
        hardware = " ".join(
            f"{k}={fields[k]}"
            for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
            if k in fields
        )
        return f"NodeName={name} NodeAddr=127.0.0.1 {hardware} RealMemory={memory}", ""
    return (
        f"NodeName={name} NodeAddr=127.0.0.1 CPUs=2 RealMemory={memory}",
        "SlurmdParameters=config_overrides",
    )


def _write_conf(root: Path, node: str) -> Path:
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    node_line, extra = _node_line(node)
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=dvlatest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
KillWait=5
{extra}
{node_line} State=UNKNOWN
PartitionName=dvla Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""
    )
    (root / "plugstack.conf").write_text("")
    return conf


def _log_problems(root: Path, names: list[str]) -> str:
    """What the daemons ``names`` logged as fatal (else their last errors), for a skip."""
    parts = []
    for name in names:
        text = ""
        for path in (root / "log" / f"{name}.log", root / "log" / f"{name}.out"):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        # The log file's lines start with a time stamp, the console's with the daemon's name.
        lines = [re.sub(rf"^(\[[^]]*\] |{name}: )", "", line.strip()) for line in text.splitlines()]
        bad = [line for line in lines if "fatal" in line.lower()] or [
            line
            for line in lines
            if "error" in line.lower()
            # Noise on every start: no PMIx library (unused here), no state files yet.
            and not any(n in line for n in ("pmix", "state file", "state save file"))
        ]
        shown = " | ".join(dict.fromkeys(bad[-3:])) or (lines or ["(empty log)"])[-1]
        parts.append(f"{name}: {shown}")
    return "; ".join(parts)


def _stop(procs: list[psutil.Process], grace: float) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def slurm(short_tmp: Path) -> Iterator[Slurm]:
    root = short_tmp / "slurm"
    root.mkdir()
    node = socket.gethostname().split(".")[0]
    conf = _write_conf(root, node)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons: dict[str, subprocess.Popen[bytes]] = {}
    cluster = Slurm(conf, node, env, short_tmp, [])
    try:
        for argv in (["slurmctld", "-D"], ["slurmd", "-D", "-N", node]):
            with open(root / "log" / f"{argv[0]}.out", "wb") as out:
                proc = subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root
                )
            daemons[argv[0]] = proc
            cluster.daemons.append(proc.pid)

        def node_state() -> str:
            try:
                shown = cluster.run("sinfo", "-h", "-n", node, "-o", "%T", timeout=10)
            except subprocess.TimeoutExpired:
                return "sinfo timed out"
            return shown.stdout.strip() or shown.stderr.strip()

        def idle_or_dead() -> bool:
            return any(d.poll() is not None for d in daemons.values()) or node_state() == "idle"

        wait_for(idle_or_dead, timeout=START_TIMEOUT, interval=0.2, raise_on_timeout=False)
        dead = [n for n, d in daemons.items() if d.poll() is not None]
        if dead:
            codes = ", ".join(f"{n} exited {daemons[n].returncode}" for n in dead)
            pytest.skip(f"Slurm daemons do not run here ({codes}): {_log_problems(root, dead)}")
        state = node_state()
        if state != "idle":
            pytest.skip(
                f"Slurm node {node} not idle after {START_TIMEOUT:.0f}s (sinfo: {state!r}): "
                + _log_problems(root, list(daemons))
            )
        yield cluster
    finally:
        # Jobs first (their steps get SIGTERM, then SIGKILL after KillWait), then the daemons,
        # then anything of this cluster's jobs still alive (slurmstepd outlives slurmd).
        if len(daemons) == 2 and all(d.poll() is None for d in daemons.values()):
            cluster.run("scancel", "--user", "root", timeout=20)
            wait_for(
                lambda: not cluster.processes(),
                timeout=15,
                interval=0.2,
                raise_on_timeout=False,
            )
        for d in daemons.values():
            if d.poll() is None:
                d.terminate()
        for d in daemons.values():
            try:
                d.wait(timeout=10)
            except subprocess.TimeoutExpired:
                d.kill()
                d.wait(timeout=5)
        _stop(cluster.processes(), grace=5)


def _argv(p: psutil.Process) -> list[str]:
    with contextlib.suppress(psutil.Error):
        return p.cmdline()
    return []


def _topology(path: Path, control_port: int) -> Path:
    path.write_text(
        f"""schema = 1
name = "slurmt"
[control]
endpoint = "tcp://127.0.0.1:{control_port}"
heartbeat_interval_s = 0.2
heartbeat_timeout_s = 2.0
[[hosts]]
name = "a"
address = "127.0.0.1"
roles = {{ coordinator = 1, producer = 1 }}
[[hosts]]
name = "b"
address = "127.0.0.1"
roles = {{ consumer = 1 }}
[roles.producer]
rate_hz = 50.0
image_px = 16
[security]
insecure = true  # loopback only
"""
    )
    return path


@pytest.mark.timeout(150)
def test_sbatch_two_hosts_on_a_real_slurm_node(slurm: Slurm) -> None:
    started = time.monotonic()
    work = slurm.root / "job"
    work.mkdir()
    control_port = _free_port()
    topo = _topology(work / "slurmt.toml", control_port)
    # The real CLI writes the script and submits it with the real sbatch (SLURM_CONF set).
    # One CPU per host step: the default (the most nodes on a host, 2) would ask 4 CPUs.
    submit = subprocess.run(
        [
            sys.executable,
            "-m",
            "dvla_tools",
            "launch",
            "slurm",
            str(topo),
            "--map",
            f"a={slurm.node},b={slurm.node}",
            "--cpus-per-task",
            "1",
            "--time",
            "00:05:00",
            "--dvla",
            f"{sys.executable} -m dvla_tools",
            "--run-dir",
            str(work / "run"),
        ],
        env={**slurm.env, "PYTHONUNBUFFERED": "1"},
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    match = re.search(r"submitted job (\d+) \(dvla-slurmt\)", submit.stdout)
    assert match is not None, submit.stdout
    job = match.group(1)
    out = work / f"dvla-slurmt-{job}.out"

    def job_says_hub() -> bool:
        return out.exists() and "dvla: control hub" in out.read_text()

    wait_for(job_says_hub, timeout=30, interval=0.1, what=f"the job to start ({out})")
    endpoint = re.search(r"control hub (tcp://\S+),", out.read_text())
    assert endpoint is not None, out.read_text()
    # The script found the hub's machine through scontrol (NodeAddr) and getent.
    assert endpoint.group(1) == f"tcp://127.0.0.1:{control_port}"

    def flowing(st: object) -> bool:
        members = members_by_node(st)
        consumer = members.get("consumer.b.0")
        return (
            {"coordinator.a.0", "producer.a.0", "consumer.b.0"} <= set(members)
            and consumer is not None
            and consumer.counters.get("received", 0) > 0
        )

    try:
        status = wait_status(endpoint.group(1), flowing, timeout=45, what="data from a to b")
    except AssertionError:
        table = slurm.run("squeue", "-s", "-j", job).stdout
        logs = {p.name: p.read_text(errors="replace")[-1500:] for p in work.rglob("*.out")}
        raise AssertionError(f"no data flowed; job steps:\n{table}\njob outputs: {logs}") from None
    members = members_by_node(status)
    assert members["consumer.b.0"].host == "b"
    assert members["producer.a.0"].host == "a"

    # Each topology host is its own job step on the one node, both running at once.
    steps = slurm.run("squeue", "-h", "-s", "-j", job, "-o", "%i %j").stdout.split("\n")
    running = {line.split()[1] for line in steps if re.match(r"\d+\.\d+ ", line)}
    assert running == {"dvla-slurmt-a", "dvla-slurmt-b"}, steps
    dvla_procs = [
        p for p in slurm.processes() if _argv(p)[:3] == [sys.executable, "-m", "dvla_tools"]
    ]
    ups = [p for p in dvla_procs if _argv(p)[3:4] == ["up"]]
    assert len(ups) == 2, [_argv(p) for p in dvla_procs]
    assert len(dvla_procs) >= 5, "dvla up x2 and the three nodes they run"

    # scancel ends the job: every step, every dvla process (dvla up stops its nodes).
    cancel = slurm.run("scancel", job)
    assert cancel.returncode == 0, cancel.stderr
    wait_for(
        lambda: not slurm.processes(),
        timeout=20,
        interval=0.2,
        what="every process of the job (slurmstepd, srun, dvla) to end after scancel",
    )
    assert not [p for p in dvla_procs if p.is_running()]

    def job_state() -> str:
        shown = slurm.run("scontrol", "show", "job", job).stdout
        found = re.search(r"JobState=(\S+)", shown)
        return found.group(1) if found else shown

    wait_for(lambda: job_state() == "CANCELLED", timeout=20, interval=0.2, what="CANCELLED")
    assert time.monotonic() - started < 90
