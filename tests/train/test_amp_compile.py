"""fp16 autocast + GradScaler on CPU (scaler state saved and resumed exactly) and the ``--model.compile`` flag."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from ._common import build_trainer, run_trainer, step_losses, tiny_train_config


def final_checkpoint(out):
    return torch.load(sorted((out / "checkpoints").glob("ckpt_0*.pt"))[-1], weights_only=False)


def assert_trains(out, steps):
    losses = step_losses(out)
    assert len(losses) == steps and all(map(torch.isfinite, torch.tensor(losses))), losses
    half = len(losses) // 2
    assert sum(losses[half:]) / (len(losses) - half) < sum(losses[:half]) / half, losses  # second half lower


def test_fp16_gradscaler_on_cpu_and_resume(tmp_path):
    fp16 = {"amp": "fp16"}
    trainer = build_trainer(tiny_train_config(tmp_path / "ref", loop=fp16))
    logits_dtypes = set()
    trainer.model.register_forward_hook(lambda module, args, logits: logits_dtypes.add(logits.dtype))
    trainer.run()
    assert trainer.scaler.is_enabled() and trainer.device.type == "cpu" and logits_dtypes == {torch.float16}
    assert_trains(tmp_path / "ref", 8)
    ref = final_checkpoint(tmp_path / "ref")
    assert ref["step"] == 8 and ref["scaler"]["scale"] == 2.0**16 and ref["scaler"]["_growth_tracker"] == 8

    # stop after 4 steps, then resume: the scaler continues from the checkpoint (growth tracker 4 -> 8)
    out = tmp_path / "resumed"
    run_trainer(tiny_train_config(out, loop=dict(fp16, max_steps=4)))
    assert final_checkpoint(out)["scaler"]["_growth_tracker"] == 4
    resumed = build_trainer(tiny_train_config(out, loop=fp16, checkpoint={"resume": "auto"}))
    assert resumed.scaler.state_dict()["_growth_tracker"] == 4
    resumed.run()
    final = final_checkpoint(out)
    assert final["step"] == 8 and final["scaler"] == ref["scaler"]
    for name, tensor in ref["model"].items():
        assert torch.equal(tensor, final["model"][name]), f"{name} differs after the fp16 resume"


def run_compiled(tmp_path, monkeypatch, backend, steps):
    """A short run with ``--model.compile``, torch.compile pinned to ``backend`` and counting the compiled frames."""
    counter, real_compile = CompileCounterWithBackend(backend), torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counter))
    out = tmp_path / backend
    trainer, _ = run_trainer(tiny_train_config(out, model={"compile": True}, loop={"max_steps": steps}))
    assert counter.frame_count >= 1 and counter.op_count > 0  # the training forward went through dynamo
    assert trainer.train_model is not trainer.model  # evaluation and checkpoints use the eager module
    assert not any("_orig_mod" in key for key in final_checkpoint(out)["model"])
    assert_trains(out, steps)
    return step_losses(out)


def test_compile_flag_matches_eager(tmp_path, monkeypatch):
    # aot_eager: dynamo capture + AOT autograd of forward and backward, no codegen: seconds on CPU
    compiled = run_compiled(tmp_path, monkeypatch, "aot_eager", steps=4)
    run_trainer(tiny_train_config(tmp_path / "eager", loop={"max_steps": 4}))
    assert compiled == pytest.approx(step_losses(tmp_path / "eager"), abs=1e-5)


@pytest.mark.slow  # cold inductor C++ codegen on CPU: 90-210 s on a 2-core machine (about 15 s with a warm cache)
def test_compile_flag_inductor(tmp_path, monkeypatch):
    run_compiled(tmp_path, monkeypatch, "inductor", steps=2)
