"""The embedded task suite: eight language-conditioned tabletop tasks over four skills.

Every task shares one scene (two blocks, two target squares, a parallel gripper), so the
instruction is what tells the policy which object and which skill are meant. Each task has
several paraphrases; an episode draws one with its seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Skill = Literal["reach", "push", "pick", "place"]

BLOCKS: tuple[str, ...] = ("red", "blue")
TARGETS: tuple[str, ...] = ("green", "yellow")

# Episode limits per skill (control steps at 10 Hz); the scripted experts need a third to a
# half (reach ~5, pick ~8, place ~15, push ~20).
MAX_STEPS: dict[Skill, int] = {"reach": 15, "push": 50, "pick": 20, "place": 35}

_TEMPLATES: dict[Skill, tuple[str, ...]] = {
    "reach": (
        "reach the {block} block",
        "move the gripper to the {block} block",
        "touch the {block} cube",
        "go to the {block} block",
    ),
    "push": (
        "push the {block} block to the {target} square",
        "slide the {block} cube onto the {target} square",
        "push the {block} cube to the {target} target",
        "move the {block} block to the {target} square without lifting it",
    ),
    "pick": (
        "pick up the {block} block",
        "lift the {block} cube",
        "grasp the {block} block and lift it",
        "raise the {block} block off the table",
    ),
    "place": (
        "put the {block} block on the {target} square",
        "place the {block} cube on the {target} target",
        "pick up the {block} block and put it on the {target} square",
        "move the {block} cube onto the {target} square",
    ),
}


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task: a skill applied to a block (and, for push/place, a target square)."""

    name: str
    skill: Skill
    block: str
    target: str | None
    max_steps: int

    @property
    def instructions(self) -> tuple[str, ...]:
        """All paraphrases of this task's instruction; the first is the canonical one."""
        return tuple(
            t.format(block=self.block, target=self.target or "") for t in _TEMPLATES[self.skill]
        )


def _spec(skill: Skill, block: str, target: str | None = None) -> TaskSpec:
    name = f"{skill}-{block}" if target is None else f"{skill}-{block}-{target}"
    return TaskSpec(name=name, skill=skill, block=block, target=target, max_steps=MAX_STEPS[skill])


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        _spec("reach", "red"),
        _spec("reach", "blue"),
        _spec("push", "red", "green"),
        _spec("push", "blue", "yellow"),
        _spec("pick", "red"),
        _spec("pick", "blue"),
        _spec("place", "red", "yellow"),
        _spec("place", "blue", "green"),
    )
}
"""Task name -> spec, in the suite's canonical order."""

TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def vocabulary() -> tuple[str, ...]:
    """Every word any instruction of the suite can contain, sorted (the tokenizer's vocabulary)."""
    words: set[str] = set()
    for spec in TASKS.values():
        for text in spec.instructions:
            words.update(text.split())
    return tuple(sorted(words))


def max_instruction_words() -> int:
    """The longest instruction of the suite, in words."""
    return max(len(t.split()) for spec in TASKS.values() for t in spec.instructions)
