"""The job's benchmark suite: one choice for the whole job, made in ``[roles.learner]``.

The suite fixes the policy's shapes — proprioception, action and auxiliary-target sizes from the
suite's :class:`~dvla_nodes.envs.suites.SuiteSpec`, the tokenizer's vocabulary from its
instructions — so the learner, every sampler and every inference node must build the *same*
policy. They all read the learner's table already (samplers and inference nodes for
:class:`~dvla_nodes.learn.config.TrainConfig`), so that is where the suite lives::

    [roles.learner]
    suite = "metaworld"        # embedded (default) | gym | metaworld | libero
    suite_tasks = "MT10"       # the job's tasks (for the embedded suite, `tasks` says the same)
    suite_python = "..."       # optional: the suite's interpreter (default: dvla env create's)
    suite_camera = "corner"    # any other suite_<option>: the adapter's options

A sampler's own table may set ``suite_python`` (where *its* interpreter is); any other suite key
in a sampler's or inference node's table is refused by ``dvla up`` (exit 2) with the advice to
move it, because a suite chosen per role would give roles different policies.

How each role gets the spec: the learner and samplers open the suite's environments (in worker
processes under the suite's interpreter) and read it from the workers; an inference node has no
environments (and maybe no suite installed), so for a suite other than the embedded one it
builds the policy the learner advertises (:func:`policy_signature`, in the learner's
``policy`` endpoint). Every node compares its policy with that signature, so a sampler whose
suite differs (another version of the suite under its ``suite_python``) is stopped with a
clear error instead of training on garbage.

A suite without scripted experts (``spec.has_expert`` false: LIBERO, gymnasium) has no warm
start: GRPO starts from the initial policy, and the learner says so in its log and metrics.
Checkpoints record the suite (:func:`suite_record`); resuming with another suite is refused
(:func:`check_resume_suite`, also by ``dvla up --resume`` before anything starts).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dvla_bus.errors import ConfigError
from dvla_nodes.envs.suites import (
    Scalar,
    SuiteSpec,
    check_suite,
    embedded_spec,
    has_suite,
    open_suite_shards,
    resolve_python,
    suite_options,
)
from dvla_nodes.learn.config import TrainConfig
from dvla_nodes.learn.rollout import Shard
from dvla_nodes.learn.trainer import open_shards
from dvla_nodes.policy import build_policy
from dvla_nodes.policy.model import PolicyConfig, VLAPolicy, init_weights
from dvla_nodes.policy.tokenizer import Tokenizer

__all__ = [
    "POLICY_ENDPOINT",
    "JobShards",
    "JobSuite",
    "build_suite_policy",
    "check_available",
    "check_resume_policy",
    "check_resume_suite",
    "is_suite_key",
    "job_suite",
    "no_expert_reason",
    "open_job_shards",
    "policy_from_signature",
    "policy_mismatch",
    "policy_signature",
    "refuse_suite_keys",
    "suite_record",
]

POLICY_ENDPOINT = "policy"
"""The learner's endpoint key whose value is its :func:`policy_signature` (JSON)."""

# The fields of PolicyConfig that decide the parameters' shapes and meaning (image_size does
# not: a resumed run may change it, as before suites existed).
_SHAPE_FIELDS = (
    "size",
    "stem",
    "proprio_dim",
    "action_dim",
    "bins",
    "vocab_size",
    "max_tokens",
    "aux_dim",
)


def is_suite_key(key: str) -> bool:
    return key == "suite" or key.startswith("suite_")


def refuse_suite_keys(
    role: str, settings: Mapping[str, Scalar], allowed: Sequence[str] = ()
) -> None:
    """A ConfigError naming every suite key of ``[roles.<role>]`` not in ``allowed``."""
    bad = sorted(k for k in settings if is_suite_key(k) and k not in allowed)
    if bad:
        raise ConfigError(
            f"{', '.join(bad)}: the suite is a job-wide choice; set it in [roles.learner], not "
            f"in [roles.{role}] (the learner, samplers and inference nodes must build the same "
            "policy from it"
            + (f"; [roles.{role}] may set only {', '.join(allowed)})" if allowed else ")")
        )


@dataclass(frozen=True, slots=True)
class JobSuite:
    """The job's suite besides its tasks (which are ``TrainConfig.tasks``): ``python`` is the
    interpreter for its workers (None: :func:`~dvla_nodes.envs.suites.resolve_python` finds
    one), ``options`` the adapter's options."""

    name: str
    python: str | None
    options: dict[str, Scalar]


def job_suite(
    cfg: TrainConfig,
    learner: Mapping[str, Scalar],
    own: Mapping[str, Scalar] | None = None,
) -> JobSuite:
    """The suite of ``cfg`` with the options of the learner's table; ``own`` (a sampler's
    table) may name its own interpreter. Checked as far as possible without the suite."""
    options = suite_options(learner)
    check_suite(cfg.suite, cfg.tasks, options)
    python = (own or {}).get("suite_python") or learner.get("suite_python")
    return JobSuite(cfg.suite, str(python) if python else None, options)


def check_available(suite: JobSuite) -> str | None:
    """The interpreter that will run the suite's workers (None for the embedded suite, which
    runs as dvla's own workers); a ConfigError saying how to get one when there is none or
    it lacks the suite."""
    if suite.name == "embedded":
        return None
    python = resolve_python(suite.name, suite.python)
    if not has_suite(suite.name, python):
        raise ConfigError(
            f"suite = {suite.name!r}: interpreter {python} does not have it; run "
            f"`dvla env create {suite.name}` (or point suite_python at an interpreter that has it)"
        )
    return python


@dataclass(frozen=True, slots=True)
class JobShards:
    """Open environments of the job's suite: ``spec`` (shapes, tasks, instructions, limits),
    ``shards`` for :func:`~dvla_nodes.learn.rollout.run_episodes` and each worker's ready
    message in ``info`` (empty for the embedded suite)."""

    spec: SuiteSpec
    shards: list[Shard]
    info: list[dict[str, Any]]


@contextlib.contextmanager
def open_job_shards(
    cfg: TrainConfig, suite: JobSuite, num_envs: int, workers: int = 1
) -> Iterator[JobShards]:
    """``num_envs`` environments of the job's suite over ``workers`` worker processes. The
    embedded suite opens exactly as before suites existed (:func:`open_shards`); another suite
    through :func:`~dvla_nodes.envs.suites.open_suite_shards` under its own interpreter."""
    if suite.name == "embedded":
        spec = embedded_spec(cfg.tasks, cfg.image_size)
        with open_shards(num_envs, workers, cfg.image_size) as shards:
            yield JobShards(spec, shards, [])
        return
    with open_suite_shards(
        suite.name,
        cfg.tasks,
        num_envs,
        cfg.image_size,
        workers=max(1, workers),
        python=suite.python,
        options=suite.options,
    ) as opened:
        yield JobShards(opened.spec, list[Shard](opened.shards), opened.info)


def build_suite_policy(cfg: TrainConfig, spec: SuiteSpec) -> tuple[VLAPolicy, Tokenizer]:
    """The job's policy for ``spec``: the embedded suite's is exactly :func:`build_policy`'s
    default; another suite's takes its proprioception, action size and auxiliary targets
    (``state_dim``; 0: no auxiliary head) from the spec and a tokenizer over the vocabulary of
    its tasks' instructions."""
    if spec.suite == "embedded":
        return build_policy(
            cfg.policy_size, cfg.image_size, cfg.bins, cfg.seed, stem=cfg.policy_stem
        )
    tok = Tokenizer(spec.vocabulary(), spec.max_instruction_words() + 2)
    return build_policy(
        cfg.policy_size,
        cfg.image_size,
        cfg.bins,
        cfg.seed,
        stem=cfg.policy_stem,
        tokenizer=tok,
        proprio_dim=spec.proprio_dim,
        action_dim=spec.action_dim,
        aux_dim=spec.state_dim,
    )


def policy_signature(suite: str, model: VLAPolicy, tok: Tokenizer) -> str:
    """What another node needs to build the same policy (compact JSON): the suite, the
    :class:`PolicyConfig` and the tokenizer's words and length."""
    doc = {
        "suite": suite,
        "policy": model.cfg.to_json(),
        "words": list(tok.words),
        "max_tokens": tok.max_tokens,
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def policy_from_signature(signature: str, seed: int) -> tuple[VLAPolicy, Tokenizer]:
    """Build the policy a :func:`policy_signature` describes (weights from ``seed``; a
    reader binds them to the weight pool anyway)."""
    try:
        doc = json.loads(signature)
        tok = Tokenizer(tuple(str(w) for w in doc["words"]), int(doc["max_tokens"]))
        cfg = PolicyConfig(**doc["policy"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"the learner's policy signature is malformed: {exc}") from None
    if (cfg.vocab_size, cfg.max_tokens) != (tok.vocab_size, tok.max_tokens):
        raise ConfigError("the learner's policy signature: tokenizer and policy disagree")
    model = VLAPolicy(cfg)
    init_weights(model, seed)
    return model, tok


def policy_mismatch(ours: str, theirs: str) -> str:
    """Empty when two signatures describe the same policy, else what differs (for a log)."""
    if ours == theirs:
        return ""
    try:
        a, b = json.loads(ours), json.loads(theirs)
    except ValueError:
        return "an unreadable policy signature"
    out = []
    if a.get("suite") != b.get("suite"):
        out.append(f"suite {a.get('suite')!r} here, {b.get('suite')!r} at the learner")
    pa, pb = a.get("policy", {}), b.get("policy", {})
    out += [
        f"{k} {pa.get(k)!r} here, {pb.get(k)!r} at the learner"
        for k in sorted(pa)
        if pa.get(k) != pb.get(k)
    ]
    if a.get("words") != b.get("words"):
        theirs_only = sorted(set(b.get("words", ())) - set(a.get("words", ())))[:5]
        ours_only = sorted(set(a.get("words", ())) - set(b.get("words", ())))[:5]
        out.append(
            f"instruction vocabulary (only here: {ours_only}, only at the learner: "
            f"{theirs_only}; the suite's instructions differ, e.g. another version of the "
            "suite under suite_python, or other tasks)"
        )
    return "; ".join(out) or "the policy signature differs"


def no_expert_reason(spec: SuiteSpec) -> str:
    return (
        f"suite {spec.suite!r} has no scripted expert: no demonstrations and no behaviour "
        "cloning; GRPO starts from the initial policy (version 1)"
    )


def suite_record(suite: JobSuite, spec: SuiteSpec, tok: Tokenizer) -> dict[str, Any]:
    """The suite as checkpoints record it (with the tokenizer's words: they define the
    policy's input as much as its shapes do)."""
    return {
        "name": spec.suite,
        "tasks": list(spec.tasks),
        "options": dict(suite.options),
        "action_dim": spec.action_dim,
        "proprio_dim": spec.proprio_dim,
        "state_dim": spec.state_dim,
        "has_expert": spec.has_expert,
        "action_mapping": spec.action_mapping,
        "words": list(tok.words),
        "max_tokens": tok.max_tokens,
    }


def _checkpoint_suite(meta: Mapping[str, Any]) -> str:
    recorded = meta.get("suite")
    if isinstance(recorded, dict) and recorded.get("name"):
        return str(recorded["name"])
    config = meta.get("config")
    # checkpoints from before suites existed were all the embedded suite's
    return str(config.get("suite", "embedded")) if isinstance(config, dict) else "embedded"


def check_resume_suite(meta: Mapping[str, Any], suite: str, where: object = "checkpoint") -> None:
    """Refuse to resume a checkpoint (its metadata ``meta``) trained on another suite."""
    theirs = _checkpoint_suite(meta)
    if theirs != suite:
        raise ConfigError(
            f"{where}: the checkpoint was trained on suite {theirs!r}, this job's suite is "
            f"{suite!r} ([roles.learner] suite): a policy does not carry over between suites "
            "(their observations, actions and instructions differ); resume with the topology "
            "it was trained with, or start a new run"
        )


def check_resume_policy(
    meta: Mapping[str, Any], model: VLAPolicy, tok: Tokenizer, where: object = "checkpoint"
) -> None:
    """Refuse to resume a checkpoint whose policy differs from ``model`` in shape or in the
    tokenizer's vocabulary (with the embedded suite, other tasks keep the vocabulary)."""
    recorded = meta.get("policy")
    if isinstance(recorded, dict):
        ours = model.cfg.to_json()
        diff = [
            f"{k} {recorded.get(k)!r} there, {ours.get(k)!r} here"
            for k in _SHAPE_FIELDS
            if k in recorded and recorded.get(k) != ours.get(k)
        ]
        if diff:
            raise ConfigError(f"{where}: its policy differs from this job's: {'; '.join(diff)}")
    suite = meta.get("suite")
    words = suite.get("words") if isinstance(suite, dict) else None
    if words is not None and list(words) != list(tok.words):
        raise ConfigError(
            f"{where}: its instruction vocabulary differs from this job's (other tasks or "
            "another version of the suite): the policy's word embeddings would mean other words"
        )
