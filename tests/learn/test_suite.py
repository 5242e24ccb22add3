"""The job's suite (:mod:`dvla_nodes.learn.suite`): one choice in ``[roles.learner]``, checked
before any process starts, a policy shaped by the suite's spec that every role builds alike,
rollouts with the suite's action size, and checkpoints that refuse another suite."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dvla_bus.errors import ConfigError
from dvla_nodes.envs.suites import Scalar, SuiteSpec, check_suite, embedded_spec, suite_settings
from dvla_nodes.envs.tasks import TASK_NAMES
from dvla_nodes.envs.vector import StepBatch
from dvla_nodes.learn.config import TrainConfig
from dvla_nodes.learn.rollout import Assignment, RolloutAborted, run_episodes
from dvla_nodes.learn.suite import (
    JobSuite,
    build_suite_policy,
    check_resume_policy,
    check_resume_suite,
    job_suite,
    open_job_shards,
    policy_from_signature,
    policy_mismatch,
    policy_signature,
    refuse_suite_keys,
)
from dvla_nodes.pipeline import train_config
from dvla_nodes.policy import ActOutput, PolicyActor, build_policy
from dvla_nodes.policy.flat import flatten

CHEETAH = "HalfCheetah-v5"


@pytest.fixture(autouse=True)
def _mujoco_log_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # MuJoCo writes MUJOCO_LOG.TXT into the working directory


def _spec(**changes: Any) -> SuiteSpec:
    base = SuiteSpec(
        suite="metaworld",
        tasks=("reach-v3", "push-v3"),
        instructions=("reach the goal position", "push the puck to the goal"),
        max_steps=(50, 50),
        image_size=32,
        action_dim=4,
        proprio_dim=5,
        state_dim=9,
        has_expert=True,
        action_mapping="identity",
    )
    return dataclasses.replace(base, **changes)


def test_train_config_reads_the_suite_keys() -> None:
    cfg = train_config({"suite": "metaworld", "suite_tasks": "MT10, push-v3", "group_size": 4})
    assert (cfg.suite, cfg.tasks, cfg.group_size) == ("metaworld", ("MT10", "push-v3"), 4)
    assert train_config({"suite": "gym", "tasks": CHEETAH}).tasks == (CHEETAH,)
    # the embedded suite keeps its defaults exactly
    assert train_config({}) == TrainConfig(display=False)
    assert train_config({"suite_tasks": "reach-red"}).tasks == ("reach-red",)
    with pytest.raises(ConfigError, match="needs suite_tasks"):
        train_config({"suite": "metaworld"})
    with pytest.raises(ConfigError, match="both given"):
        train_config({"tasks": "reach-red", "suite_tasks": "reach-red"})
    with pytest.raises(ConfigError, match="suite = 'atari': unknown suite"):
        train_config({"suite": "atari", "suite_tasks": "pong"})
    with pytest.raises(ConfigError, match=r"tasks .*unknown"):
        train_config({"tasks": "reach-v3"})  # a Meta-World task for the embedded suite


def test_suite_choice_is_checked_without_the_suite_installed() -> None:
    check_suite("metaworld", ["MT10", "reach-v3"], {"camera": "corner2", "max_steps": "50"})
    check_suite("libero", ["libero_spatial", "libero_goal/3"], {"rotation": "true"})
    with pytest.raises(ConfigError, match=r"suite_tasks: metaworld: unknown task 'reach-v9'"):
        check_suite("metaworld", ["reach-v9"])
    with pytest.raises(ConfigError, match=r"suite_tasks: libero: task 'spatial/0'"):
        check_suite("libero", ["spatial/0"])
    with pytest.raises(ConfigError, match=r"suite_tasks: gym suite: unknown env id 'Nope-v0'"):
        check_suite("gym", ["Nope-v0"])
    with pytest.raises(ConfigError, match=r"suite_<option>: .*unknown option 'colour'"):
        check_suite("metaworld", ["reach-v3"], {"colour": "red"})
    with pytest.raises(ConfigError, match="suite_camera: the embedded suite takes no options"):
        suite_settings({"suite_camera": "top"})
    s = suite_settings({"suite": "metaworld", "suite_tasks": "reach-v3", "suite_max_steps": 9})
    assert s.options == {"max_steps": 9}


def test_suite_keys_belong_to_the_learner_table() -> None:
    refuse_suite_keys(
        "sampler", {"suite_python": "/x/python", "inference": "local"}, ["suite_python"]
    )
    with pytest.raises(ConfigError, match=r"suite, suite_tasks: .*\[roles\.learner\]"):
        refuse_suite_keys(
            "sampler", {"suite": "metaworld", "suite_tasks": "MT10"}, ["suite_python"]
        )
    with pytest.raises(ConfigError, match=r"suite_python: .*not in \[roles\.inference\]"):
        refuse_suite_keys("inference", {"suite_python": "/x/python"})
    learner: dict[str, Scalar] = {
        "suite": "gym",
        "suite_tasks": CHEETAH,
        "suite_max_steps": 5,
        "suite_python": "a",
    }
    cfg = train_config(learner)
    assert job_suite(cfg, learner) == JobSuite("gym", "a", {"max_steps": 5})
    assert job_suite(cfg, learner, {"suite_python": "b"}).python == "b"  # a sampler's own


def test_the_embedded_policy_is_unchanged_and_another_suite_shapes_its_own() -> None:
    cfg = TrainConfig(display=False, image_size=32, policy_stem="patch")
    ours, tok = build_suite_policy(cfg, embedded_spec(TASK_NAMES[:2], 32))
    theirs, ref_tok = build_policy("tiny", 32, 256, 0, stem="patch")
    assert ours.cfg == theirs.cfg
    assert tok.words == ref_tok.words  # the embedded vocabulary, whatever the tasks
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)

    spec = _spec(state_dim=0, action_dim=7, proprio_dim=8)
    model, tok = build_suite_policy(cfg.replace(suite="metaworld"), spec)
    assert (model.cfg.proprio_dim, model.cfg.action_dim, model.cfg.aux_dim) == (8, 7, 0)
    assert tok.words == spec.vocabulary()
    assert tok.max_tokens == spec.max_instruction_words() + 2
    assert tok.decode(tok.encode("push the puck")) == "push the puck"
    logits, aux = model.forward_with_aux(
        torch.zeros((3, 32, 32, 3), dtype=torch.uint8),
        torch.zeros((3, 8)),
        torch.from_numpy(tok.encode_batch([*spec.instructions, "reach the goal"])),
    )
    assert logits.shape == (3, 7, 256)
    assert aux is None


def test_every_role_builds_the_policy_the_learner_advertises() -> None:
    cfg = TrainConfig(display=False, suite="metaworld", tasks=("reach-v3",), image_size=32)
    model, tok = build_suite_policy(cfg, _spec())
    signature = policy_signature("metaworld", model, tok)
    again, again_tok = policy_from_signature(signature, seed=3)
    assert again.cfg == model.cfg
    assert again_tok.words == tok.words
    assert flatten(again)[0] == flatten(model)[0]  # the same flat layout: one weight pool
    assert policy_mismatch(signature, policy_signature("metaworld", again, again_tok)) == ""
    other, other_tok = build_suite_policy(cfg, _spec(instructions=("reach it", "push it")))
    diff = policy_mismatch(policy_signature("metaworld", other, other_tok), signature)
    assert "vocabulary" in diff
    assert "vocab_size" in diff
    with pytest.raises(ConfigError, match="malformed"):
        policy_from_signature("{}", 0)


def test_checkpoints_of_another_suite_are_refused() -> None:
    embedded_ck = {"version": 3, "step": 2, "config": {"suite": "embedded"}}
    check_resume_suite(embedded_ck, "embedded")
    check_resume_suite({"version": 1, "step": 0, "config": {}}, "embedded")  # before suites
    with pytest.raises(ConfigError, match=r"trained on suite 'embedded'.*suite is 'metaworld'"):
        check_resume_suite(embedded_ck, "metaworld", "run/final.json")
    with pytest.raises(ConfigError, match="'libero', this job's suite is 'metaworld'"):
        check_resume_suite({"suite": {"name": "libero"}}, "metaworld")
    cfg = TrainConfig(display=False, suite="metaworld", tasks=("reach-v3",), image_size=32)
    model, tok = build_suite_policy(cfg, _spec())
    meta = {"policy": model.cfg.to_json(), "suite": {"name": "metaworld", "words": tok.words}}
    check_resume_policy(json.loads(json.dumps(meta)), model, tok)
    other, other_tok = build_suite_policy(cfg, _spec(proprio_dim=6))
    with pytest.raises(ConfigError, match="proprio_dim 5 there, 6 here"):
        check_resume_policy(meta, other, other_tok)
    with pytest.raises(ConfigError, match="vocabulary differs"):
        check_resume_policy({"suite": {"words": ["a"]}}, model, tok)


def test_rollouts_take_the_suites_action_size_and_stop_cleanly() -> None:
    """The gym suite (always installed): 6-d actions, 17-d proprioception, no privileged state
    and no expert, through the same open/build/run path as the pipeline's roles."""
    learner: dict[str, Scalar] = {
        "suite": "gym",
        "suite_tasks": CHEETAH,
        "suite_max_steps": 4,
        "image_size": 16,
    }
    cfg = train_config({**learner, "policy_stem": "patch"})
    with open_job_shards(cfg, job_suite(cfg, learner), 2, 1) as envs:
        spec = envs.spec
        assert (spec.action_dim, spec.proprio_dim, spec.state_dim) == (6, 17, 0)
        assert not spec.has_expert
        model, tok = build_suite_policy(cfg, spec)
        actor = PolicyActor(model, tok)
        gen = torch.Generator().manual_seed(0)

        def policy(im: np.ndarray, pr: np.ndarray, ins: Sequence[str]) -> ActOutput:
            return actor.act(im, pr, ins, generator=gen)

        eps = run_episodes(envs.shards, [Assignment(CHEETAH, s, 0) for s in (1, 1, 2)], policy)
        assert eps.length.tolist() == [4, 4, 4]
        assert eps.tokens.shape == (12, 6)
        assert eps.proprio.shape == (12, 17)
        assert eps.state.shape == (12, 0)
        assert eps.instructions == ("control the half cheetah",) * 3
        stop = threading.Event()
        calls = [0]

        def stopping(im: np.ndarray, pr: np.ndarray, ins: Sequence[str]) -> ActOutput:
            calls[0] += 1
            if calls[0] == 2:
                stop.set()  # as a node's teardown does, from another thread
            return policy(im, pr, ins)

        with pytest.raises(RolloutAborted):
            run_episodes(envs.shards, [Assignment(CHEETAH, 3)] * 4, stopping, stop=stop)
        # nothing is left outstanding: the shard takes a new command at once
        envs.shards[0].send_reset([CHEETAH, CHEETAH], [0, 0])
        batch = envs.shards[0].recv()
        assert isinstance(batch, StepBatch)
        assert batch.proprio.shape == (2, 17)


def test_the_serial_trainer_refuses_another_suite(tmp_path: Path) -> None:
    from dvla_nodes.learn.trainer import SerialTrainer

    cfg = TrainConfig(display=False, suite="gym", tasks=(CHEETAH,))
    with pytest.raises(ConfigError, match="serial trainer runs the embedded suite only"):
        SerialTrainer(cfg, tmp_path / "run").run()
    assert not (tmp_path / "run").exists()
