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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: (final step, final weights)."""
    out = tmp_path_factory.mktemp("reference")
    ref = run_module(base_args(out, *AUG))
    assert ref.returncode == 0, ref.stderr[-3000:]
    return final_weights(out)


def test_kill_and_resume_bitwise(tmp_path, reference):
    ref_step, ref_weights = reference
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


@pytest.mark.parametrize("sig", ["SIGTERM"])
def test_stop_signal_checkpoints_and_resume_continues_exactly(tmp_path, reference, sig):
    """Preemption: the signal stops the run after the current step with a checkpoint; resume ends bitwise equal."""
    ref_step, ref_weights = reference
    out = tmp_path / "stopped"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "zoo.train", *base_args(out, *AUG)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    steps = out / "steps.csv"
    deadline = time.time() + 150
    while proc.poll() is None and time.time() < deadline and (not steps.exists() or len(steps.read_text().split()) < 4):
        time.sleep(0.01)
    proc.send_signal(getattr(signal, sig))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + getattr(signal, sig), stderr[-3000:]
    assert f"stopped by {sig}" in stdout and "Traceback" not in stderr
    saved = sorted((out / "checkpoints").glob("ckpt_0*.pt"))
    stopped_at = torch.load(saved[-1], weights_only=True)["step"]
    assert 3 <= stopped_at < ref_step, stopped_at  # mid-run, not the end
    resumed = run_module(base_args(out, *AUG, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step, weights = final_weights(out)
    assert step == ref_step
    for name, tensor in ref_weights.items():
        assert torch.equal(tensor, weights[name]), f"{name} differs after the stop and resume"


def test_sigusr1_in_process_stops_after_the_step_with_a_checkpoint(tmp_path, monkeypatch):
    """SLURM's warning signal (``--signal=USR1@90``): same path as SIGTERM, checked in-process."""
    from zoo.train.loop import Trainer

    from ._common import run_trainer, tiny_train_config

    real_epoch = Trainer.train_epoch

    def signal_at_step_2(self):
        steps = []

        def after_step(optimizer, args, kwargs):
            steps.append(1)
            if len(steps) == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

        self.optimizer.register_step_post_hook(after_step)
        return real_epoch(self)

    monkeypatch.setattr(Trainer, "train_epoch", signal_at_step_2)
    _, metrics = run_trainer(tiny_train_config(tmp_path / "run"))
    assert metrics["stopped_by"] == "SIGUSR1" and metrics["step"] == 3  # the flag is read at the next step
    assert (tmp_path / "run" / "checkpoints" / "ckpt_00000003.pt").is_file()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored
