"""Memory-lean BN + activation: timm's numerics forward, autograd's gradients backward, fewer saved maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d

from zoo.layers.norm_act import LeanBatchNormAct2d, batch_norm_act, lean_batch_norm_act_


def _pair(act: str | None, **kwargs) -> tuple[nn.Module, nn.Module]:
    ref = BatchNormAct2d(8, act_layer=act, apply_act=act is not None, **kwargs)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    lean = BatchNormAct2d(8, act_layer=act, apply_act=act is not None, **kwargs)
    lean.load_state_dict(ref.state_dict())
    lean_batch_norm_act_(lean)
    assert type(lean) is LeanBatchNormAct2d
    return ref, lean


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(grad)
    grads = [p.grad for p in module.parameters()]
    return (y.detach(), x.grad, *grads)


@pytest.mark.parametrize("act", [None, "silu", "relu", "gelu"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lean_bn_act_matches_timm(act, channels_last):
    ref, lean = _pair(act)
    x = torch.randn(4, 8, 6, 5) * 3 + 1
    grad = torch.randn(4, 8, 6, 5)
    if channels_last:
        x, grad = x.to(memory_format=torch.channels_last), grad.to(memory_format=torch.channels_last)
    for _ in range(2):  # two steps: the running statistics move the same way
        out_ref, out_lean = _step(ref, x, grad), _step(lean, x, grad)
        assert torch.equal(out_ref[0], out_lean[0]), "forward must be bitwise timm's"
        for a, b in zip(out_ref[1:], out_lean[1:]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        ref.zero_grad(), lean.zero_grad()
    for name, buf in ref.named_buffers():
        assert torch.equal(buf, dict(lean.named_buffers())[name]), name
    assert int(lean.num_batches_tracked) == 2


def test_cumulative_momentum_and_untracked_stats():
    ref, lean = _pair("silu", momentum=None)
    x, grad = torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4)
    for scale in (0.5, 1.0, 3.0):  # momentum None: running stats are the cumulative average of the batches
        _step(ref, x * scale, grad), _step(lean, x * scale, grad)
    for name, buf in ref.named_buffers():
        assert torch.equal(buf, dict(lean.named_buffers())[name]), name
    assert int(lean.num_batches_tracked) == 3
    ref, lean = _pair("silu", track_running_stats=False)
    torch.testing.assert_close(_step(lean, x, grad)[1], _step(ref, x, grad)[1], rtol=1e-5, atol=1e-5)


def test_eval_and_no_grad_take_timms_path():
    _, lean = _pair("silu")
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    lean.eval()
    assert lean(x).grad_fn.name() != "_BatchNormActBackward"
    lean.train()
    assert "BatchNormAct" in lean(x).grad_fn.name()
    with torch.no_grad():
        assert lean(x).grad_fn is None


@pytest.mark.parametrize("residual_bn", [False, True])
def test_fused_tail_matches_composition(residual_bn):
    torch.manual_seed(0)
    bn, shortcut_bn, act = nn.BatchNorm2d(8), nn.BatchNorm2d(8), nn.SiLU()
    with torch.no_grad():
        for m in (bn, shortcut_bn):
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-1, 1)
    x, r, grad = torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5)
    results = []
    for lean in (False, True):
        modules = [nn.BatchNorm2d(8), nn.BatchNorm2d(8)]
        modules[0].load_state_dict(bn.state_dict()), modules[1].load_state_dict(shortcut_bn.state_dict())
        xl, rl = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
        if lean:
            y = batch_norm_act(modules[0], xl, act, rl, modules[1] if residual_bn else None)
        else:
            y = act(modules[0](xl) + (modules[1](rl) if residual_bn else rl))
        y.backward(grad)
        params = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
        buffers = [b.clone() for m in modules for b in m.buffers()]
        results.append((y.detach(), xl.grad, rl.grad, params, buffers))
    (y0, gx0, gr0, p0, b0), (y1, gx1, gr1, p1, b1) = results
    assert torch.equal(y0, y1)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gr1, gr0, rtol=1e-5, atol=1e-5)
    assert len(p0) == len(p1) == (4 if residual_bn else 2)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(b0, b1)), "running statistics updated exactly once"


def test_gradcheck_float64():
    torch.manual_seed(0)
    bn, shortcut_bn = nn.BatchNorm2d(3).double(), nn.BatchNorm2d(3).double()
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, r: batch_norm_act(bn, x, nn.SiLU(), r, shortcut_bn), (x, r), eps=1e-6, atol=1e-5
    )


def test_lean_chain_keeps_fewer_maps(saved_bytes):
    """conv -> BN-SiLU -> conv: plain autograd keeps BN input, BN output and SiLU output; lean drops the middle."""
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Conv2d(8, 16, 1), BatchNormAct2d(16, act_layer="silu"), nn.Conv2d(16, 8, 1))
    x = torch.randn(4, 8, 32, 32, requires_grad=True)
    saved_plain = saved_bytes(lambda: chain(x))
    lean_batch_norm_act_(chain)
    saved_lean = saved_bytes(lambda: chain(x))
    map_bytes = 4 * 16 * 32 * 32 * 4  # one (B, 16, 32, 32) fp32 map
    assert saved_plain - saved_lean > 0.99 * map_bytes, (saved_plain, saved_lean)  # less a few statistics
