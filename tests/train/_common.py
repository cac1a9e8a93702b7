"""Shared helpers of the training tests: a tiny BiFormer config, tiny image folders, CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# BiFormer shrunk to run in milliseconds at 16 px: stage maps 4, 2, 1, 1
TINY_BIFORMER = (
    "{depths: [1,1,1,1], embed_dims: [16,32,32,32], n_win: [2,1,1,1], topks: [2,1,1,-2], mlp_ratios: 1, head_dim: 16}"
)
# no batch statistics at all (LayerNorm only): the 1-process vs 2-process test
TINY_VIT = "{img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}"

REPO = Path(__file__).resolve().parents[2]


def base_args(out: Path, *extra: str) -> list[str]:
    """Flags of a fast CPU run on 256 digits at 16 px (1 thread, no workers: predictable on a busy machine)."""
    return [
        "--model", "biformer_tiny", "--model.kwargs", TINY_BIFORMER, "--data", "digits", "--data.img_size", "16",
        "--data.limit_train", "256", "--data.limit_val", "64", "--data.num_workers", "0", "--batch-size", "32",
        "--epochs", "2", "--loop.threads", "1", "--out", str(out), "--log.step_every", "1",
        *extra,
    ]  # fmt: skip


def run_module(args: list[str], timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "zoo.train", *args], capture_output=True, text=True, timeout=timeout, env=env, **kw
    )


def make_image_folder(
    root: Path, classes=("a", "b"), per_class: int = 6, size: int = 16, splits=("train", "val")
) -> Path:
    """ROOT/{train,val}/<class>/*.png with a class-dependent pattern (learnable, deterministic)."""
    rng = np.random.default_rng(0)
    for split in splits:
        for ci, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                img[:, ci * size // len(classes) : (ci + 1) * size // len(classes)] += 150
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def tiny_train_config(out: Path, **sections):
    """In-process ``Config`` of a few fast, learnable steps: tiny BiFormer, 128 digits at 16 px, no augmentation,
    no warm-up (the loss falls from the first step), step losses in OUT/steps.csv. ``sections`` override options,
    e.g. ``loop={"amp": "fp16"}``."""
    import yaml

    from zoo.train.config import Config, apply_overrides

    cfg = Config()
    cfg.model.name, cfg.model.kwargs, cfg.model.drop_path_rate = "biformer_tiny", yaml.safe_load(TINY_BIFORMER), 0.0
    cfg.data.source, cfg.data.img_size, cfg.data.num_workers = "digits", 16, 0
    cfg.data.limit_train, cfg.data.limit_val = 128, 64
    cfg.aug.no_aug, cfg.aug.label_smoothing = True, 0.0
    cfg.optim.lr, cfg.schedule.warmup_epochs, cfg.schedule.epochs = 3e-3, 0, 1
    cfg.loop.batch_size, cfg.loop.threads, cfg.loop.device = 16, 1, "cpu"
    cfg.log.out, cfg.log.plot, cfg.log.step_every = str(out), False, 1
    return apply_overrides(cfg, sections, origin="test")


def build_trainer(cfg):
    """A single-process ``Trainer`` for ``cfg`` (model, scaler, losses inspectable before and after ``run()``)."""
    from zoo.train.distributed import init_distributed
    from zoo.train.loop import Trainer

    return Trainer(cfg, init_distributed(None, cfg.loop.device or None))


def run_trainer(cfg):
    """Build and run a ``Trainer`` in this process; returns it and the final metrics."""
    trainer = build_trainer(cfg)
    return trainer, trainer.run()


def step_losses(out: Path) -> list[float]:
    """The per-step training losses a run wrote to OUT/steps.csv."""
    import csv

    with open(out / "steps.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]
