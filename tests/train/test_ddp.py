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
    assert sorted((tmp_path / "fsdp" / "checkpoints").glob("ckpt_0*.dcp"))  # sharded, never gathered
    final = torch.load(tmp_path / "fsdp" / "model_final.pt", weights_only=True)  # the consolidated export
    assert not any(hasattr(v, "placements") for v in final["model"].values())  # full tensors, not DTensor shards


# a model with BatchNorm: each rank's running statistics differ after training
BN_RUN = [
    "--model", "resnet10t", "--model.drop_path_rate", "0", "--data", "digits", "--data.img_size", "32",
    "--data.limit_train", "128", "--data.limit_val", "48", "--data.num_workers", "0", "--aug.no_aug", "true",
    "--batch-size", "32", "--epochs", "1", "--loop.max_steps", "4", "--loop.threads", "1", "--log.plot", "false",
    "--schedule.warmup_epochs", "0", "--aug.crop_pct", "1.0", "--lr", "1e-2",
]  # fmt: skip


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_evaluation_equals_zoo_validate(tmp_path, strategy):
    """Logged validation numbers are those of the saved weights: rank 0's BatchNorm statistics on every rank."""
    out = tmp_path / strategy
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "zoo.train",
         *BN_RUN, "--dist.strategy", strategy, "--out", str(out)],
        capture_output=True, text=True, env=ENV, timeout=240,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    logged = list(csv.DictReader(open(out / "metrics.csv")))[-1]
    from zoo.train.validate import validate

    best = out / "checkpoints" / ("ckpt_best.dcp" if strategy == "fsdp" else "ckpt_best.pt")  # FSDP: sharded
    checked = validate("resnet10t", best, "digits", limit=48, num_workers=0, device="cpu")
    # each rank evaluating with its own running statistics moved the loss by ~1e-3 here (the issue: 1.1853 DDP,
    # 1.1909 FSDP, 1.1832 zoo validate); with rank 0's on every rank only the summation order differs
    assert abs(float(logged["val_loss"]) - checked.loss) < 2e-5, (logged["val_loss"], checked.loss)
    assert float(logged["val_acc1"]) == pytest.approx(checked.top1, abs=1e-6)


def test_sync_bn_on_cpu_is_refused_up_front(tmp_path):
    from zoo.train.config import Config
    from zoo.train.loop import ConfigError, train

    cfg = Config()
    cfg.model.sync_bn, cfg.loop.device, cfg.log.out = True, "cpu", str(tmp_path / "run")
    with pytest.raises(ConfigError, match="sync_bn needs CUDA"):
        train(cfg)


def test_fsdp_with_channels_last_is_refused_up_front():
    from zoo.train.config import Config
    from zoo.train.loop import ConfigError, preflight

    cfg = Config()
    cfg.dist.strategy, cfg.model.channels_last, cfg.data.source = "fsdp", True, "digits"
    cfg.loop.batch_size = 32
    with pytest.raises(ConfigError, match="contiguous parameters"):
        preflight(cfg, world_size=2)
    preflight(cfg, world_size=1)  # one process: no FSDP, channels-last is fine


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "zoo.train",
         *args], capture_output=True, text=True, env=ENV, timeout=240,
    )  # fmt: skip


def _one(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zoo.train", *args], capture_output=True, text=True, env=ENV,
                          timeout=180)  # fmt: skip


def test_fsdp_checkpoints_are_sharded_and_resume_on_another_world_size(tmp_path, one_process):
    """2 FSDP processes -> 1 process and 1 -> 2: the loss trajectory is the uninterrupted one (1e-4)."""
    two_then_one = tmp_path / "two_then_one"
    run = _torchrun(*COMMON, "--dist.strategy", "fsdp", "--loop.max_steps", "3", "--checkpoint.every_steps", "1",
                    "--out", str(two_then_one))  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    sharded = two_then_one / "checkpoints" / "ckpt_00000003.dcp"
    assert sorted(p.name for p in sharded.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert "model" not in torch.load(sharded / "meta.pt", weights_only=True)  # nothing gathered on one process
    final = torch.load(two_then_one / "model_final.pt", weights_only=True)  # the consolidated export
    assert not any(hasattr(v, "placements") for v in final["model"].values())
    run = _one(*COMMON, "--resume", "auto", "--out", str(two_then_one))
    assert run.returncode == 0 and "resumed from" in run.stdout, run.stderr[-3000:]
    assert max(abs(x - y) for x, y in zip(one_process, loss_trajectory(two_then_one))) < 1e-4

    one_then_two = tmp_path / "one_then_two"
    run = _one(*COMMON, "--loop.max_steps", "3", "--out", str(one_then_two))
    assert run.returncode == 0, run.stderr[-3000:]
    run = _torchrun(*COMMON, "--dist.strategy", "fsdp", "--resume", "auto", "--out", str(one_then_two))
    assert run.returncode == 0, run.stderr[-3000:]
    b = loss_trajectory(one_then_two)
    assert len(b) == 5 and max(abs(x - y) for x, y in zip(one_process, b)) < 1e-4, (one_process, b)


def test_sharded_checkpoint_validates_and_refuses_a_planted_metadata(tmp_path):
    import pathlib
    import pickle
    import shutil

    from zoo._io import UnsafeFileError
    from zoo.train.validate import validate

    out = tmp_path / "run"
    run = _torchrun(*COMMON, "--dist.strategy", "fsdp", "--loop.max_steps", "2", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    logged = list(csv.DictReader(open(out / "metrics.csv")))[-1]
    kwargs = dict(limit=32, num_workers=0, device="cpu", img_size=16)
    checked = validate("vit_tiny_patch16_224", out / "checkpoints" / "ckpt_best.dcp", "digits", **kwargs)
    assert abs(checked.loss - float(logged["val_loss"])) < 2e-5

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (tmp_path / "PAYLOAD_RAN",))

    evil = tmp_path / "evil.dcp"
    shutil.copytree(out / "checkpoints" / "ckpt_best.dcp", evil)
    (evil / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UnsafeFileError, match="not checkpoint metadata"):
        validate("vit_tiny_patch16_224", evil, "digits", **kwargs)
    assert not (tmp_path / "PAYLOAD_RAN").exists()
