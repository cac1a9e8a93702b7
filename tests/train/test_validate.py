"""Train a few steps, then `zoo validate` the checkpoint: same top-1 as the loop, timm's results schema."""

import csv

import yaml

from zoo.train.config import Config
from zoo.train.loop import train

from ._common import TINY_BIFORMER
from .test_errors import zoo_cli


def test_validate_matches_training_eval(tmp_path, capsys):
    cfg = Config()
    cfg.model.kwargs = yaml.safe_load(TINY_BIFORMER)
    cfg.data.source, cfg.data.img_size, cfg.data.num_workers = "digits", 16, 0
    cfg.data.limit_train, cfg.data.limit_val = 128, 64
    cfg.aug.crop_pct = 1.0
    cfg.loop.batch_size, cfg.loop.threads, cfg.loop.max_steps = 32, 1, 3
    cfg.log.out = str(tmp_path / "run")
    metrics = train(cfg)
    assert (tmp_path / "run" / "curves.png").is_file() or "curves" not in metrics
    results = tmp_path / "results.csv"
    rc = zoo_cli([
        "validate", "biformer_tiny", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "ckpt_best.pt"),
        "--data", "digits", "--limit", "64", "--workers", "0", "--results-file", str(results),
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct",
                             "interpolation"]  # fmt: skip
    assert abs(float(rows[0]["top1"]) - metrics["val_acc1"]) < 1e-3
    assert rows[0]["img_size"] == "16" and "img/s" in capsys.readouterr().out


def test_train_checkpoint_loads_through_create_model(tmp_path):
    """A `zoo train` checkpoint is a timm route too: create_model(checkpoint_path=...) takes it as it is."""
    import torch

    import zoo

    cfg = Config()
    cfg.model.kwargs = yaml.safe_load(TINY_BIFORMER)
    cfg.data.source, cfg.data.img_size, cfg.data.num_workers = "digits", 16, 0
    cfg.data.limit_train, cfg.data.limit_val = 32, 16
    cfg.loop.batch_size, cfg.loop.threads, cfg.loop.max_steps = 16, 1, 1
    cfg.log.out, cfg.log.plot = str(tmp_path / "run"), False
    train(cfg)
    path = tmp_path / "run" / "checkpoints" / "ckpt_best.pt"
    state = torch.load(path, weights_only=True)
    model = zoo.create_model(
        "biformer_tiny", checkpoint_path=str(path), num_classes=10, in_chans=state["in_chans"], **cfg.model.kwargs
    )
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["model"][name]), name
