"""Checkpoints: round trip (weights, optimiser moments, metadata) and atomic replacement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dvla_bus.errors import ConfigError
from dvla_nodes.learn import TrainConfig, load_checkpoint, save_checkpoint
from dvla_nodes.learn import checkpoint as ckmod
from dvla_nodes.learn.checkpoint import optimizer_moments, restore_moments
from dvla_nodes.policy import FlatLayout, VLAPolicy, build_policy, flatten


def _trained(seed: int) -> tuple[VLAPolicy, FlatLayout, torch.Tensor, torch.optim.Optimizer]:
    model, _ = build_policy(bins=16, seed=seed)
    layout, flat = flatten(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.zeros(2, 64, 64, 3, dtype=torch.uint8)
    loss = model(images, torch.zeros(2, 7), torch.ones(2, 5, dtype=torch.int64)).square().mean()
    loss.backward()
    opt.step()
    return model, layout, flat, opt


def test_round_trip(tmp_path: Path) -> None:
    model, layout, flat, opt = _trained(0)
    cfg = TrainConfig(name="ck", seed=4)
    meta = {"version": 7, "step": 3, "config": cfg.to_json(), "metrics": {"success": 0.5}}
    path = save_checkpoint(
        tmp_path,
        "latest",
        flat,
        layout=layout,
        meta=meta,
        optimizer=optimizer_moments(opt, model, layout),
    )
    assert path == tmp_path / "latest.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "latest.safetensors"]
    doc = json.loads(path.read_text())
    assert doc["version"] == 7
    assert doc["config"]["seed"] == 4
    assert b"pickle" not in (tmp_path / "latest.safetensors").read_bytes()[:64]
    ck = load_checkpoint(path)
    np.testing.assert_array_equal(ck.flat, flat.numpy())
    assert ck.layout == layout
    assert ck.meta["step"] == 3
    assert ck.meta["metrics"] == {"success": 0.5}
    assert TrainConfig.from_json(ck.meta["config"]) == cfg
    # restore into a differently initialised model and optimiser
    other, _ = build_policy(bins=16, seed=99)
    layout2, flat2 = flatten(other)
    flat2.copy_(torch.from_numpy(ck.flat))
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    restore_moments(opt2, other, layout2, ck.optimizer)
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        if a.grad is None:  # unused in this forward (the auxiliary head): no moments
            continue
        torch.testing.assert_close(opt.state[a]["exp_avg"], opt2.state[b]["exp_avg"])
        torch.testing.assert_close(opt.state[a]["exp_avg_sq"], opt2.state[b]["exp_avg_sq"])


def test_a_failed_write_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, layout, flat, _ = _trained(0)
    save_checkpoint(tmp_path, "latest", flat, layout=layout, meta={"version": 1})
    good = flat.clone()
    with torch.no_grad():
        flat.add_(1.0)

    def crash(tensors: dict[str, np.ndarray], filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"partial")  # a torn write into the temp file
        raise OSError("disk full")

    monkeypatch.setattr(ckmod, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, "latest", flat, layout=layout, meta={"version": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "latest.safetensors"]
    ck = load_checkpoint(tmp_path / "latest.json")
    assert ck.meta["version"] == 1
    np.testing.assert_array_equal(ck.flat, good.numpy())


def test_corrupt_weights_are_detected(tmp_path: Path) -> None:
    _, layout, flat, _ = _trained(1)
    path = save_checkpoint(tmp_path, "x", flat, layout=layout, meta={"version": 0})
    st = tmp_path / "x.safetensors"
    data = bytearray(st.read_bytes())
    data[-1] ^= 0xFF
    st.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="checksum"):
        load_checkpoint(path)


def test_config_json_round_trip_and_validation() -> None:
    cfg = TrainConfig(name="x", tasks=("reach-red", "pick-blue"), lr=1e-4)
    assert TrainConfig.from_json(json.loads(cfg.dumps())) == cfg
    with pytest.raises(ConfigError):
        TrainConfig.from_json({"nope": 1})
    with pytest.raises(ConfigError):
        TrainConfig(tasks=("fly-to-the-moon",))
    with pytest.raises(ConfigError):
        TrainConfig(group_size=1)


def test_a_kill_between_the_two_files_keeps_the_new_checkpoint_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safetensors file is the commit: a save killed after it and before its JSON copy
    leaves the new weights with their own metadata (the JSON one save behind), never new
    weights with old metadata (which a restarted learner once refused as corrupt)."""
    _, layout, flat, _ = _trained(0)
    save_checkpoint(tmp_path, "latest", flat, layout=layout, meta={"version": 1, "step": 1})
    with torch.no_grad():
        flat.add_(1.0)
    real = ckmod._write_temp

    class Killed(BaseException):
        pass

    def write_temp(path: Path, write: object) -> Path:
        if path.suffix == ".json":
            raise Killed
        return real(path, write)

    monkeypatch.setattr(ckmod, "_write_temp", write_temp)
    with pytest.raises(Killed):
        save_checkpoint(tmp_path, "latest", flat, layout=layout, meta={"version": 2, "step": 2})
    assert json.loads((tmp_path / "latest.json").read_text())["version"] == 1
    ck = load_checkpoint(tmp_path / "latest.json")
    assert (ck.meta["version"], ck.meta["step"]) == (2, 2)
    np.testing.assert_array_equal(ck.flat, flat.numpy())
    assert ckmod.checkpoint_meta(tmp_path / "latest.json")["version"] == 2
    # Killed before the first JSON was ever written: the safetensors file alone is found.
    (tmp_path / "latest.json").unlink()
    found = ckmod.find_checkpoint(tmp_path, "latest")
    assert found == tmp_path / "latest.safetensors"
    assert load_checkpoint(found).meta["version"] == 2
    assert ckmod.find_checkpoint(tmp_path, "final") is None


_SAVER = """
import sys
from pathlib import Path
import numpy as np
from dvla_nodes.learn.checkpoint import save_checkpoint
from dvla_nodes.policy.flat import FlatLayout, ParamEntry

n = 1 << 19
layout = FlatLayout((ParamEntry("w", "float32", (n,), 0, n),), n)
directory, start = Path(sys.argv[1]), int(sys.argv[2])
for version in range(start, start + 100_000):
    flat = np.full(n, version, np.float32)
    save_checkpoint(directory, "latest", flat, layout=layout, meta={"version": version, "step": 0})
"""


def test_sigkill_at_any_moment_of_saving_leaves_a_loadable_matching_checkpoint(
    tmp_path: Path,
) -> None:
    """A real process saving as fast as it can, SIGKILLed five times at arbitrary moments:
    each time the newest checkpoint loads, its weights are the ones its metadata names, and
    the next save clears the temporary files the kill left."""
    import os
    import signal
    import subprocess
    import sys

    from tests.helpers import wait_for

    start = 0
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(tmp_path), str(start)],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        try:

            def saved_a_few(first: int = start) -> bool:
                # Any error reading here is the bug this test hunts (renames are atomic).
                found = ckmod.find_checkpoint(tmp_path, "latest")
                return found is not None and ckmod.checkpoint_meta(found)["version"] >= first + 3

            wait_for(saved_a_few, timeout=60, what="three saves")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        found = ckmod.find_checkpoint(tmp_path, "latest")
        assert found is not None
        ck = load_checkpoint(found)
        version = int(ck.meta["version"])
        assert version >= start + 3
        np.testing.assert_array_equal(ck.flat, np.full(ck.flat.shape, version, np.float32))
        start = version + 1
    layout = FlatLayout.from_json(json.loads((tmp_path / "latest.json").read_text())["layout"])
    save_checkpoint(
        tmp_path,
        "latest",
        np.zeros(layout.total, np.float32),
        layout=layout,
        meta={"version": start},
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "latest.safetensors"]
