"""Clear errors before any work: data folders, class mismatch, unknown model, corrupt images, NaN loss."""

import pytest
import torch

from zoo.train import loop as loop_lib
from zoo.train.config import Config
from zoo.train.data import DataError, check_image_folder

from ._common import TINY_BIFORMER, make_image_folder


def zoo_cli(argv):
    """The `zoo` command in-process: errors as one line on stderr, exit code 2."""
    from zoo.cli import main

    return main(argv)


def tiny_cfg(tmp_path, source, **loop):
    cfg = Config()
    cfg.model.name = "biformer_tiny"
    cfg.model.kwargs = __import__("yaml").safe_load(TINY_BIFORMER)
    cfg.data.source, cfg.data.img_size, cfg.data.num_workers = str(source), 16, 0
    cfg.loop.batch_size, cfg.loop.threads = 4, 1
    cfg.schedule.epochs = 1
    cfg.log.out, cfg.log.plot = str(tmp_path / "run"), False
    for k, v in loop.items():
        setattr(cfg.loop, k, v)
    return cfg


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        check_image_folder(tmp_path / "nope")
    (tmp_path / "d" / "train").mkdir(parents=True)
    (tmp_path / "d" / "val").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        check_image_folder(tmp_path / "d")
    (tmp_path / "d" / "train" / "cat").mkdir()
    with pytest.raises(DataError, match="without images"):
        check_image_folder(tmp_path / "d")


def test_class_folders_differ(tmp_path):
    make_image_folder(tmp_path, classes=("a", "b"), per_class=1, splits=("train",))
    make_image_folder(tmp_path, classes=("a", "c"), per_class=1, splits=("val",))
    with pytest.raises(DataError, match=r"only in train: \['b'\], only in val: \['c'\]"):
        check_image_folder(tmp_path)


def test_unknown_model_suggests_names(tmp_path, capsys, monkeypatch):
    built = []
    monkeypatch.setattr(loop_lib.data_lib, "build_datasets", lambda *a: built.append(1))
    rc = zoo_cli(["train", "--model", "biformer_tinny", "--data", "digits", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown model 'biformer_tinny'" in err and "biformer_tiny" in err
    assert not built  # failed before any data was loaded
    rc = zoo_cli(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_corrupt_image_skipped_or_fatal(tmp_path, capsys):
    root = make_image_folder(tmp_path / "data", per_class=4)
    bad = root / "train" / "a" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    metrics = loop_lib.train(tiny_cfg(tmp_path, root))
    out = capsys.readouterr().out
    assert f"skipped unreadable image {bad}" in out
    assert metrics["skipped_images"] == 1
    cfg = tiny_cfg(tmp_path / "b", root)
    cfg.data.corrupt = "raise"
    with pytest.raises(RuntimeError, match=f"cannot read image {bad}"):
        loop_lib.train(cfg)


def test_nan_loss_names_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    real = loop_lib.build_loss

    def poisoned(cfg):
        base, calls = real(cfg), []

        def loss(logits, target):
            calls.append(1)
            value = base(logits, target)
            return value * float("nan") if len(calls) == 3 else value

        return loss

    monkeypatch.setattr(loop_lib, "build_loss", poisoned)
    cfg = tiny_cfg(tmp_path, "digits")
    cfg.data.limit_train = 64
    cfg.checkpoint.every_steps = 1
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3 .*ckpt_00000002\.pt"):
        loop_lib.train(cfg)
    latest = torch.load(tmp_path / "run" / "checkpoints" / "ckpt_00000002.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in latest["model"].values() if v.is_floating_point())
