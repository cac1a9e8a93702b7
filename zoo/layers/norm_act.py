"""Memory-lean BatchNorm + activation (+ residual) for training: keep the BN input, recompute the rest.

Plain autograd keeps three maps per conv -> BN -> act: the BN input (for BN's backward), the BN output (the
activation's input) and the activation output (the next conv's input). :func:`batch_norm_act` keeps only the
BN input and recomputes ``act(bn(x) [+ residual])`` elementwise in backward, so the middle map is never stored;
with ``residual`` (a bottleneck's tail ``act(bn(conv3) + shortcut)``) the pre-activation sum is not stored
either (the shortcut is already kept by the block's first conv). This is the recompute-the-cheap-ops idea of
In-Place ABN (Rota Bulo et al., CVPR 2018) without its invertibility requirement, so it works for any
activation (SiLU, GELU, ...). timm and torch have no such layer, hence this one.

Numerics: the forward calls the same ATen batch-norm entry as ``F.batch_norm`` (``_batch_norm_impl_index``:
cuDNN where ``F.batch_norm`` would use it), so outputs and running statistics are bitwise those of timm's
``BatchNormAct2d``; gradients agree to rounding (the backward sums in another order). Eval mode, ``no_grad``,
a non-identity ``drop`` and TorchScript take timm's path unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d

__all__ = ["LeanBatchNormAct2d", "batch_norm_act", "lean_batch_norm_act_"]


def _bn_forward(x, weight, bias, running_mean, running_var, momentum, eps):
    # the ATen entry F.batch_norm uses (cuDNN where it would be): bitwise the same outputs and running stats
    out, mean, invstd, reserve, impl = torch._batch_norm_impl_index(
        x, weight, bias, running_mean, running_var, True, momentum, eps, torch.backends.cudnn.enabled
    )
    return out, (mean, invstd, reserve, impl)


def _bn_recompute(x, weight, bias, mean, invstd) -> torch.Tensor:
    """The training-mode BN output from its input and the saved batch statistics, in the input's dtype."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return (x * scale.view(shape) + shift.view(shape)).to(x.dtype)


def _bn_backward(grad, x, weight, running_mean, running_var, stats, eps, needs: tuple[bool, bool, bool]):
    mean, invstd, reserve, impl = stats
    grad = grad.to(x.dtype).contiguous(memory_format=_memory_format(x))
    wants = [needs[0], weight is not None and needs[1], needs[2]]
    dx, dw, db = torch.ops.aten._batch_norm_impl_index_backward(
        impl, x, grad, weight, running_mean, running_var, mean, invstd, True, eps, wants, reserve
    )
    return dx if wants[0] else None, dw if wants[1] else None, db if wants[2] else None


class _BatchNormAct(torch.autograd.Function):
    """``act(bn(x) + [bn_r](residual))``; saves ``x``, ``residual`` and the batch statistics only."""

    @staticmethod
    def forward(ctx: Any, act, eps, momentum, x, weight, bias, running_mean, running_var, residual, r_eps,
                r_momentum, r_weight, r_bias, r_running_mean, r_running_var, residual_bn):  # fmt: skip
        out, stats = _bn_forward(x, weight, bias, running_mean, running_var, momentum, eps)
        r_stats = (None,) * 4
        if residual is not None:
            if residual_bn:
                r_out, r_stats = _bn_forward(
                    residual, r_weight, r_bias, r_running_mean, r_running_var, r_momentum, r_eps
                )
                out = out + r_out
                del r_out
            else:
                out = out + residual
        out = act(out)
        ctx.save_for_backward(
            x, weight, bias, running_mean, running_var, *stats[:3],
            residual, r_weight, r_bias, r_running_mean, r_running_var, *r_stats[:3],
        )  # fmt: skip
        ctx.act, ctx.eps, ctx.r_eps, ctx.impl, ctx.r_impl = act, eps, r_eps, stats[3], r_stats[3]
        ctx.residual_bn = residual is not None and residual_bn
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        saved = ctx.saved_tensors
        x, weight, bias, running_mean, running_var, mean, invstd, reserve = saved[:8]
        residual, r_weight, r_bias, r_running_mean, r_running_var, r_mean, r_invstd, r_reserve = saved[8:]
        needs = ctx.needs_input_grad
        # recompute the activation's input (BN output + residual) in the forward's dtype, then its gradient
        pre = _bn_recompute(x, weight, bias, mean, invstd)
        if residual is not None:
            pre = pre + (_bn_recompute(residual, r_weight, r_bias, r_mean, r_invstd) if ctx.residual_bn else residual)
        grad_pre = _act_grad(ctx.act, pre, grad_out)
        del pre
        dx, dw, db = _bn_backward(
            grad_pre, x, weight, running_mean, running_var, (mean, invstd, reserve, ctx.impl), ctx.eps, needs[3:6]
        )
        d_res = d_rw = d_rb = None
        if residual is not None and ctx.residual_bn:
            r_stats = (r_mean, r_invstd, r_reserve, ctx.r_impl)
            r_needs = (needs[8], needs[11], needs[12])
            d_res, d_rw, d_rb = _bn_backward(
                grad_pre, residual, r_weight, r_running_mean, r_running_var, r_stats, ctx.r_eps, r_needs
            )
        elif residual is not None and needs[8]:
            d_res = grad_pre
        return (None, None, None, dx, dw, db, None, None, d_res, None, None, d_rw, d_rb, None, None, None)


def _act_grad(act: nn.Module, pre: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``d act(pre) / d pre`` applied to ``grad_out``: closed forms for the usual ones, autograd for the rest."""
    if isinstance(act, nn.Identity):
        return grad_out
    if isinstance(act, nn.SiLU):
        sig = torch.sigmoid(pre)
        return grad_out * sig * (1 + pre * (1 - sig))
    if isinstance(act, nn.ReLU):
        return grad_out * (pre > 0)
    with torch.enable_grad():  # any other activation (in-place ones too: they act on a copy)
        leaf = pre.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(act(leaf.clone()), leaf, grad_out)
    return grad


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        else (torch.contiguous_format)
    )


def _momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """BatchNorm's training-step bookkeeping (``num_batches_tracked``, cumulative average when momentum is None)."""
    if not bn.track_running_stats:
        return 0.0
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            return 1.0 / float(bn.num_batches_tracked)
    return 0.0 if bn.momentum is None else bn.momentum


def _bn_args(bn: nn.modules.batchnorm._BatchNorm) -> tuple:
    momentum = _momentum(bn)
    running_mean = bn.running_mean if bn.track_running_stats else None
    running_var = bn.running_var if bn.track_running_stats else None
    return bn.eps, momentum, bn.weight, bn.bias, running_mean, running_var


def batch_norm_act(
    bn: nn.modules.batchnorm._BatchNorm,
    x: torch.Tensor,
    act: nn.Module,
    residual: torch.Tensor | None = None,
    residual_bn: nn.modules.batchnorm._BatchNorm | None = None,
) -> torch.Tensor:
    """``act(bn(x) + residual_bn(residual))`` in training mode, keeping only ``x`` and ``residual`` for backward.

    Args:
        bn: a BatchNorm module in training mode (its parameters, buffers, eps and momentum are used; its running
            statistics and ``num_batches_tracked`` update exactly as its own forward would).
        x: ``(B, C, ...)``.
        act: any elementwise activation module (applied to the sum).
        residual: ``None`` or ``(B, C, ...)``, the block's shortcut.
        residual_bn: ``None`` (the shortcut is added as it is) or the BatchNorm of a projection shortcut, which
            then receives the projection's pre-norm output as ``residual``.

    Returns:
        ``(B, C, ...)`` like ``act(bn(x) + residual_bn(residual))``.
    """
    eps, momentum, weight, bias, running_mean, running_var = _bn_args(bn)
    if residual is not None and residual_bn is not None:
        r_eps, r_momentum, r_weight, r_bias, r_mean, r_var = _bn_args(residual_bn)
    else:
        r_eps, r_momentum, r_weight, r_bias, r_mean, r_var = 0.0, 0.0, None, None, None, None
    return _BatchNormAct.apply(
        act, eps, momentum, x, weight, bias, running_mean, running_var,
        residual, r_eps, r_momentum, r_weight, r_bias, r_mean, r_var, residual_bn is not None,
    )  # fmt: skip


def _lean_applies(module: nn.Module, x: torch.Tensor) -> bool:
    return (
        module.training
        and torch.is_grad_enabled()
        and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()  # leave compiled graphs to the compiler's own recompute
        and x.requires_grad
    )


class LeanBatchNormAct2d(BatchNormAct2d):
    """timm's ``BatchNormAct2d`` (same parameters, buffers and state-dict keys) that keeps only its input for
    backward in training (:func:`batch_norm_act`). ``(B, C, H, W) -> (B, C, H, W)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _lean_applies(self, x) or not isinstance(self.drop, nn.Identity):
            return super().forward(x)
        return batch_norm_act(self, x, self.act)


def lean_batch_norm_act_(model: nn.Module) -> nn.Module:
    """Turn every ``BatchNormAct2d`` of ``model`` (exactly that class) into :class:`LeanBatchNormAct2d`, in place.

    Only the class changes: parameters, buffers, hooks and state-dict keys stay as they are. Returns ``model``.
    """
    for module in model.modules():
        if type(module) is BatchNormAct2d:
            module.__class__ = LeanBatchNormAct2d
    return model
