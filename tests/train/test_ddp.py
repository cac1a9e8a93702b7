"""2 gloo processes under torchrun (DDP, FSDP2) match 1 process with the same global batch (5 steps, 1e-4)."""

import csv
import os
import subprocess
import sys

import pytest
import torch

from ._common import REPO, TINY_VIT


def loss_trajectory(out):
    with open(out / "steps.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


# a model without batch statistics (LayerNorm only), no augmentation randomness, no dropout
COMMON = [
    "--model", "vit_tiny_patch16_224", "--model.kwargs", TINY_VIT, "--model.drop_path_rate", "0",
    "--data", "digits", "--data.img_size", "16", "--data.limit_train", "160", "--data.limit_val", "32",
    "--data.num_workers", "0", "--aug.no_aug", "true", "--aug.label_smoothing", "0", "--batch-size", "32",
    "--epochs", "1", "--loop.max_steps", "5", "--loop.threads", "1", "--log.step_every", "1", "--log.plot", "false",
    "--schedule.warmup_epochs", "0", "--lr", "3e-3",
]  # fmt: skip
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Loss trajectory of the 1-process reference run (global batch 32)."""
    out = tmp_path_factory.mktemp("one")
    one = subprocess.run([sys.executable, "-m", "zoo.train", *COMMON, "--out", str(out)],
                         capture_output=True, text=True, env=ENV, timeout=180)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    return loss_trajectory(out)


def test_two_process_gloo_matches_one_process(tmp_path, one_process):
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "zoo.train", *COMMON, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=ENV, timeout=240,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world 2" in two.stdout
    a, b = one_process, loss_trajectory(tmp_path / "two")
    assert len(a) == len(b) == 5
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)


def test_two_process_fsdp2_matches_one_process(tmp_path, one_process):
    # 33 validation images: rank 1 gets one batch fewer, the spare forward keeps FSDP's all-gathers in step
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "zoo.train",
         *COMMON, "--dist.strategy", "fsdp", "--data.limit_val", "33", "--out", str(tmp_path / "fsdp")],
        capture_output=True, text=True, env=ENV, timeout=240,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = one_process, loss_trajectory(tmp_path / "fsdp")
    assert len(a) == len(b) == 5
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    ckpt = torch.load(sorted((tmp_path / "fsdp" / "checkpoints").glob("ckpt_0*.pt"))[-1], weights_only=False)
    assert not any(hasattr(v, "placements") for v in ckpt["model"].values())  # full tensors, not DTensor shards
