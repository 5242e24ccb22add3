"""The ``dvla`` umbrella command and its aliases ``dvla-node``, ``dvla-topo``, ``dvla-bus``.

Each verb group lives in its own module (``cmd_<group>.py``) exposing
``register(subparsers) -> None``; benchmarks live in ``dvla_tools.bench.<name>`` modules exposing
the same ``register`` for the ``dvla bench`` group. A handler is stored as ``func`` on the parsed
namespace and returns the process exit code. Any :class:`dvla_bus.DvlaError` escaping a handler is
printed as one line naming what went wrong and where, and the process exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from dvla_bus.errors import DvlaError

# Verb groups in the order ``dvla --help`` shows them. A module that is not there yet (a later
# issue adds it) is skipped, so the CLI never fails to start because of a missing group.
GROUPS: tuple[tuple[str, str, str], ...] = (
    ("up", "dvla_tools.cmd_up", "launch and supervise every node of this host (the main job)"),
    ("node", "dvla_tools.cmd_node", "run one node process"),
    ("topo", "dvla_tools.cmd_topo", "author and check topology files"),
    ("bus", "dvla_tools.cmd_bus", "inspect live bus traffic"),
    ("train", "dvla_tools.cmd_train", "train a policy in one process (serial mode)"),
    ("bench", "dvla_tools.cmd_bench", "benchmarks against baselines, written as JSON"),
    ("keys", "dvla_tools.cmd_keys", "CURVE key pairs for authenticated deployments"),
    ("launch", "dvla_tools.cmd_launch", "start a deployment on Slurm, Ray or Kubernetes"),
    ("env", "dvla_tools.cmd_env", "external benchmark suites: their own Python environments"),
)

Handler = Callable[[argparse.Namespace], int]


def build_parser(prog: str = "dvla") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="dvla: distributed RL for vision-language-action policies.",
    )
    sub = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    for name, module_name, help_text in GROUPS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(sub, name, help_text)
    return parser


def _run(argv: Sequence[str], prog: str = "dvla") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(list(argv))
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.parse_args([*argv, "--help"])
        return 2
    try:
        return func(args)
    except DvlaError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return _run(sys.argv[1:] if argv is None else argv)


def _alias(group: str) -> int:
    return _run([group, *sys.argv[1:]], prog="dvla")


def node_main() -> int:
    """``dvla-node ...`` is ``dvla node ...``."""
    return _alias("node")


def topo_main() -> int:
    """``dvla-topo ...`` is ``dvla topo ...``."""
    return _alias("topo")


def bus_main() -> int:
    """``dvla-bus ...`` is ``dvla bus ...``."""
    return _alias("bus")
