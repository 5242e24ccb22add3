"""The one place roles are registered: role name -> ``module:Class``.

Classes are imported only when a node of that role starts, so starting a coordinator never
imports torch or MuJoCo."""

from __future__ import annotations

import importlib
from typing import Final

from dvla_bus.errors import ConfigError
from dvla_bus.node import Node

__all__ = ["ROLES", "known_roles", "load_role"]

ROLES: Final[dict[str, str]] = {
    "coordinator": "dvla_nodes.coordinator:Coordinator",
    "producer": "dvla_nodes.demo:Producer",
    "consumer": "dvla_nodes.demo:Consumer",
    "relay": "dvla_nodes.relay:Relay",
    "publisher": "dvla_nodes.publisher:Publisher",
    "learner": "dvla_nodes.pipeline:LearnerNode",
    "sampler": "dvla_nodes.pipeline:SamplerNode",
    "cheetah_learner": "dvla_nodes.cheetah:CheetahLearner",
    "cheetah_sampler": "dvla_nodes.cheetah:CheetahSampler",
    "inference": "dvla_nodes.inference:InferenceNode",
}


def known_roles() -> list[str]:
    return sorted(ROLES)


def load_role(name: str) -> type[Node]:
    """The node class of role ``name``; unknown roles raise :class:`ConfigError` listing all."""
    target = ROLES.get(name)
    if target is None:
        raise ConfigError(f"unknown role {name!r}; known roles: {', '.join(known_roles())}")
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Node)):
        raise ConfigError(f"role {name!r}: {target} is not a Node subclass")
    return cls
