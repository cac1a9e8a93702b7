"""CheckpointManager: atomic writes, keep-last-N + best, corrupt newest falls back, RNG round trip."""

import random

import numpy as np
import pytest
import torch

from zoo.train.checkpoint import CheckpointManager, atomic_save, capture_rng_state, restore_rng_state


def test_keep_last_and_best(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step, acc in [(1, 10.0), (2, 50.0), (3, 30.0), (4, 20.0)]:
        mgr.save({"w": torch.tensor([step])}, step=step, metric=acc)
    assert [p.name for p in mgr.list_checkpoints()] == ["ckpt_00000003.pt", "ckpt_00000004.pt"]
    best = torch.load(mgr.best_path, weights_only=False)
    assert best["step"] == 2 and best["metric"] == 50.0
    assert not list(tmp_path.glob("*.tmp"))  # no temporary files left behind
    # a new manager on the same folder keeps comparing against the stored best
    assert CheckpointManager(tmp_path).best_metric == 50.0


def test_corrupt_newest_falls_back(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        mgr.save({"w": torch.full((1000,), float(step))}, step=step)
    newest = mgr.latest_path()
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a disk full or a copy cut short
    with pytest.warns(UserWarning, match="ckpt_00000003.pt is corrupt or truncated"):
        state = mgr.load_latest()
    assert state["step"] == 2 and state["w"][0] == 2
    with pytest.warns(UserWarning):
        assert mgr.resolve_resume("auto")["step"] == 2
    assert mgr.resolve_resume("") is None
    with pytest.raises(FileNotFoundError, match="--resume"):
        mgr.resolve_resume(str(tmp_path / "nope.pt"))


def test_empty_folder_resume_auto_starts_fresh(tmp_path):
    assert CheckpointManager(tmp_path / "none").resolve_resume("auto") is None


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = atomic_save({"ok": 1}, tmp_path / "x.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=False) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_rng_round_trip():
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.random(), np.random.rand(), torch.rand(1)
    restore_rng_state(state)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])
