"""The serial trainer end to end at toy scale, and the ``dvla train`` command's surface."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dvla_bus.errors import ConfigError
from dvla_nodes.learn import (
    Learner,
    SerialTrainer,
    TrainConfig,
    load_checkpoint,
    read_metrics,
    resume_reference,
)
from dvla_nodes.policy import build_policy
from tests.helpers import dvla


def _tiny(**kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        name="t",
        tasks=("reach-red", "pick-blue"),
        image_size=32,
        bins=16,
        env_workers=0,
        torch_threads=1,
        demos_per_task=2,
        bc_epochs=2,
        group_size=2,
        groups_per_iter=2,
        iterations=3,
        eval_every=2,
        eval_seeds=1,
        final_eval_seeds=2,
        checkpoint_every=2,
        display=False,
    )
    base.update(kw)
    return TrainConfig.from_json(base)


def test_serial_run_writes_the_run_directory(tmp_path: Path) -> None:
    seen: list[str] = []
    res = SerialTrainer(_tiny(), tmp_path / "run", lambda r: seen.append(r["kind"])).run()
    names = {p.name for p in (tmp_path / "run").iterdir()}
    for f in (
        "config.json",
        "metrics.jsonl",
        "success.png",
        "warmstart.json",
        "warmstart.safetensors",
        "latest.json",
        "final.json",
        "final.safetensors",
    ):
        assert f in names, f
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["kind"] for r in records] == seen
    assert seen[0] == "bc"
    assert seen[-1] == "final"
    assert seen.count("train") == 3
    tiny = _tiny()
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    assert lrs == pytest.approx([tiny.lr * k / tiny.lr_warmup for k in (1, 2, 3)])  # warm-up
    assert (tmp_path / "run" / "success.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res.iterations == 3
    assert res.final.episodes == 4
    ck = load_checkpoint(tmp_path / "run" / "final.json")
    assert ck.meta["version"] == res.version
    assert TrainConfig.from_json(ck.meta["config"]) == _tiny()
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["tasks"] == ["reach-red", "pick-blue"]


def test_serial_run_is_reproducible(tmp_path: Path) -> None:
    cfg = _tiny(iterations=2, eval_every=0, checkpoint_every=0)
    SerialTrainer(cfg, tmp_path / "a").run()
    SerialTrainer(cfg, tmp_path / "b").run()
    a = load_checkpoint(tmp_path / "a" / "final.json")
    b = load_checkpoint(tmp_path / "b" / "final.json")
    torch.testing.assert_close(torch.from_numpy(a.flat), torch.from_numpy(b.flat))


def test_kl_reference_is_the_warm_start_and_survives_resume(tmp_path: Path) -> None:
    cfg = _tiny(rl_kl_coef=0.5)
    run = tmp_path / "run"
    SerialTrainer(cfg, run).run()
    kls = [r["kl_ref"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert len(kls) == 3
    assert kls[0] == 0.0 or kls[0] < max(kls)  # 0 at the warm start, growing as GRPO moves
    assert max(kls) > 0.0
    # A resumed learner (the final weights) takes the run's warm start as its reference again.
    final, warm = load_checkpoint(run / "final.json"), load_checkpoint(run / "warmstart.json")
    learner = Learner(*build_policy(image_size=32, bins=16, stem=cfg.policy_stem), cfg)
    learner.flat[: final.layout.total].copy_(torch.from_numpy(final.flat))
    assert resume_reference(learner, run) == str(run / "warmstart.json")
    ref = learner._reference
    assert ref is not None
    for e in learner.layout.entries:
        want = torch.from_numpy(warm.flat[e.offset : e.offset + e.numel]).view(e.shape)
        torch.testing.assert_close(ref.get_parameter(e.name).detach(), want)
    assert not torch.equal(torch.from_numpy(final.flat), torch.from_numpy(warm.flat))
    with pytest.raises(ConfigError, match="reference weights have 3 parameters"):
        learner.set_reference(np.zeros(3, np.float32))
    # Without a warm-start checkpoint the resumed weights stand in; without the term, nothing.
    assert "no warmstart" in resume_reference(learner, tmp_path)
    plain = Learner(*build_policy(image_size=32, bins=16, stem=cfg.policy_stem), _tiny())
    assert resume_reference(plain, run) == "none"


def test_cli_requires_serial_and_reports_config_errors(tmp_path: Path) -> None:
    proc = dvla("train", "--runs-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "--serial" in proc.stderr
    proc = dvla("train", "--serial", "--tasks", "fly", "--runs-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "fly" in proc.stderr


def test_cli_serial_run(tmp_path: Path) -> None:
    proc = dvla(
        "train",
        "--serial",
        "--json",
        "--runs-dir",
        str(tmp_path),
        "--tasks",
        "reach-blue",
        "--workers",
        "0",
        "--iterations",
        "1",
        "--demos-per-task",
        "1",
        "--set",
        "image_size=32",
        "--set",
        "bins=8",
        "--set",
        "group_size=2",
        "--set",
        "groups_per_iter=1",
        "--set",
        "eval_seeds=1",
        "--set",
        "final_eval_seeds=1",
        "--set",
        "bc_epochs=1",
        "--set",
        "torch_threads=1",
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert 0.0 <= out["final_success"] <= 1.0
    assert out["iterations"] == 1
    assert (Path(out["run_dir"]) / "metrics.jsonl").exists()
