"""kill -9 during an epoch, then --resume auto: the same final weights, bitwise (CPU, fp32)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ._common import REPO, base_args, run_module

# augmentation, drop path, mixup and label smoothing on: every RNG stream must be restored
AUG = ["--aug.scale", "[0.5, 1.0]", "--aug.mixup", "0.8", "--aug.cutmix", "1.0", "--model.drop_path_rate", "0.1"]


def final_weights(out):
    ckpts = sorted((out / "checkpoints").glob("ckpt_0*.pt"))
    state = torch.load(ckpts[-1], weights_only=False)
    return state["step"], state["model"]


def test_kill_and_resume_bitwise(tmp_path):
    ref = run_module(base_args(tmp_path / "ref", *AUG))
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_step, ref_weights = final_weights(tmp_path / "ref")
    assert ref_step == 16  # 2 epochs x 256 / 32

    out = tmp_path / "killed"
    args = base_args(out, *AUG, "--checkpoint.every_steps", "1", "--checkpoint.keep_last", "0")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "zoo.train", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    target = out / "checkpoints" / "ckpt_00000005.pt"  # mid-epoch 1 (8 steps per epoch)
    deadline = time.time() + 150
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (out / "checkpoints").glob("ckpt_0*.pt"))
    if "ckpt_00000016.pt" in done:
        pytest.fail("the run finished before it could be killed; the test needs a slower run")
    # the newest file corrupt as well: resume must fall back to the previous one and still match
    newest = out / "checkpoints" / done[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])

    resumed = run_module(args + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "corrupt or truncated" in resumed.stderr and "resumed from" in resumed.stdout
    step, weights = final_weights(out)
    assert step == ref_step
    for name, tensor in ref_weights.items():
        assert torch.equal(tensor, weights[name]), f"{name} differs after resume"
