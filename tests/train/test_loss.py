"""The training loss is picked as timm's train.py picks it (BCE, soft-target CE, label smoothing), and a short
BCE run trains while validation keeps reporting plain cross-entropy."""

import pytest
import torch
import torch.nn as nn
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from zoo.train.config import RECIPES_DIR, Config, apply_overrides, load_recipe
from zoo.train.loop import build_loss

from ._common import run_trainer, step_losses, tiny_train_config

BCE_OPTIONS = {"bce_target_thresh": 0.2, "bce_sum": True, "bce_pos_weight": 2.0}


def loss_for(mixup=0.0, cutmix=0.0, smoothing=0.0, **loss):
    cfg = Config()
    cfg.aug.mixup, cfg.aug.cutmix, cfg.aug.label_smoothing = mixup, cutmix, smoothing
    return build_loss(apply_overrides(cfg, {"loss": loss}))


@pytest.mark.parametrize(
    "aug, expected",
    [
        (dict(), nn.CrossEntropyLoss),
        (dict(smoothing=0.1), LabelSmoothingCrossEntropy),
        (dict(mixup=0.8, smoothing=0.1), SoftTargetCrossEntropy),
        (dict(cutmix=1.0), SoftTargetCrossEntropy),
    ],
)
def test_cross_entropy_choices(aug, expected):
    loss = loss_for(**aug)
    assert type(loss) is expected
    if expected is LabelSmoothingCrossEntropy:
        assert loss.smoothing == 0.1


@pytest.mark.parametrize(
    "aug, smoothing",
    [
        (dict(mixup=0.2, cutmix=1.0, smoothing=0.1), 0.0),  # smoothing is already in mixup's dense targets
        (dict(smoothing=0.1), 0.1),  # index targets: BCE one-hot encodes and smooths them itself
        (dict(), 0.0),  # timm falls back to CE here and drops --bce-loss; we keep BCE (documented)
    ],
)
def test_bce_choices(aug, smoothing):
    loss = loss_for(**aug, bce=True, **BCE_OPTIONS)
    assert type(loss) is BinaryCrossEntropy
    assert loss.smoothing == smoothing and loss.target_threshold == 0.2 and loss.sum_classes
    assert float(loss.pos_weight) == 2.0
    plain = loss_for(**aug, bce=True)  # 0 = off for threshold and pos_weight, as timm's None
    assert plain.target_threshold is None and plain.pos_weight is None and not plain.sum_classes


def test_bce_smooths_index_targets():
    logits, target = torch.randn(4, 10), torch.tensor([0, 3, 9, 3])
    dense = torch.full((4, 10), 0.1 / 10).scatter_(1, target[:, None], 1 - 0.1 + 0.1 / 10)
    expected = nn.functional.binary_cross_entropy_with_logits(logits, dense)
    torch.testing.assert_close(loss_for(smoothing=0.1, bce=True)(logits, target), expected)


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_recipe_losses(path):
    cfg = apply_overrides(Config(), load_recipe(path.stem))
    loss = build_loss(cfg)
    if path.stem.startswith("halonet"):  # "ResNet strikes back" A1: BCE with binarised mixup targets
        assert type(loss) is BinaryCrossEntropy and loss.target_threshold == 0.2
    else:
        assert type(loss) is not BinaryCrossEntropy


@pytest.mark.parametrize(
    "sections",
    [
        dict(loss={"bce": True}, aug={"label_smoothing": 0.1}),
        dict(loss={"bce": True, "bce_target_thresh": 0.2}, aug={"mixup": 0.2, "cutmix": 1.0, "label_smoothing": 0.1}),
    ],
    ids=["bce", "bce_mixup_thresh"],
)
def test_short_bce_run_trains(tmp_path, sections):
    trainer, metrics = run_trainer(tiny_train_config(tmp_path, **sections))
    assert type(trainer.loss_fn) is BinaryCrossEntropy
    assert type(trainer.eval_loss_fn) is nn.CrossEntropyLoss
    losses = step_losses(tmp_path)
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    # BCE is a mean over 10 sigmoids (~0.69 at the start); the validation loss is 10-way cross-entropy (~2.3)
    assert losses[0] < 0.75 and metrics["val_loss"] > 1.5
